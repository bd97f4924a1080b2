//! The status calls' HTTP/1.1 against the protocol's hard cases, served by the plugin
//! simulator on loopback: chunked, `Connection: close` and close-delimited answers,
//! obsolete line folding, an answer framed twice, idle connections the server closes at
//! any moment, and a reused connection that answers nothing.
//!
//! Every case runs on both HTTP clients the prober can use (this crate's, which makes the
//! worker's status calls, and hyper's connection-level client, which the benchmark
//! measures beside it), and the error kinds of both must be the same.

use std::time::Duration;

use keel_scraper::probe::{ErrorKind, HttpStack, ProbeOutcome, ProbeSettings, Prober};
use keel_scraper::status::RouteStatus;
use keel_test_support::process::bounded;
use keel_test_support::sim::{Behavior, Framing, PluginSim};

/// Every test's body runs under this bound, so a hang fails instead of blocking CI.
const BOUND: Duration = Duration::from_secs(60);

const STACKS: [HttpStack; 2] = [HttpStack::Lean, HttpStack::Hyper];

fn prober(sim: &PluginSim, stack: HttpStack, retries: u32) -> Prober {
    Prober::new(ProbeSettings {
        timeout: Duration::from_secs(3),
        retries,
        concurrency: 8,
        ..ProbeSettings::new(sim.url_template())
    })
    .expect("valid probe settings")
    .with_http_stack(stack)
}

fn sim() -> PluginSim {
    PluginSim::start().expect("the simulator starts")
}

const ACTIVE: ProbeOutcome = ProbeOutcome::Reported(RouteStatus::Active);

/// Probes `id` `times` times one after another on one prober; every probe must report
/// `ACTIVE`. Returns the connections the simulator accepted.
async fn sequential(sim: &PluginSim, stack: HttpStack, id: &str, times: usize) -> u64 {
    let p = prober(sim, stack, 0);
    for k in 0..times {
        assert_eq!(p.probe_one(id).await, ACTIVE, "{stack:?}, probe {k}");
    }
    sim.connections()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_are_decoded_and_the_connection_is_reused() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            // 1-byte and 7-byte chunks, an extension on the first, a trailer field.
            sim.set(
                "one",
                Behavior::framed(Framing::Chunked(1), Behavior::v0("ACTIVE")),
            );
            sim.set(
                "seven",
                Behavior::framed(Framing::Chunked(7), Behavior::v0("ACTIVE")),
            );
            let p = prober(&sim, stack, 0);
            for _ in 0..10 {
                assert_eq!(p.probe_one("one").await, ACTIVE, "{stack:?}");
                assert_eq!(p.probe_one("seven").await, ACTIVE, "{stack:?}");
            }
            assert!(sim.connections() <= 2, "{stack:?}: {}", sim.connections());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_answers_are_read_and_their_connection_is_not_reused() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            sim.set_default(Behavior::framed(
                Framing::ConnectionClose,
                Behavior::v0("ACTIVE"),
            ));
            assert_eq!(sequential(&sim, stack, "p", 5).await, 5, "{stack:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_with_the_connection_is_read() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            sim.set_default(Behavior::framed(
                Framing::UntilClose,
                Behavior::v0("ACTIVE"),
            ));
            assert_eq!(sequential(&sim, stack, "p", 3).await, 3, "{stack:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folded_header_lines_read_as_spaces() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            // Content-Length is on a continuation line: read as a length, the answer
            // ends where it says and the connection is reused.
            sim.set_default(Behavior::framed(
                Framing::FoldedHeaders,
                Behavior::v0("ACTIVE"),
            ));
            let opened = sequential(&sim, stack, "p", 10).await;
            assert!(opened <= 2, "{stack:?}: {opened} connections");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_framed_by_both_transfer_encoding_and_content_length_is_not_pooled() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            // The simulator keeps the connection open; the client must not reuse it.
            sim.set_default(Behavior::framed(
                Framing::ChunkedWithLength,
                Behavior::v0("ACTIVE"),
            ));
            assert_eq!(sequential(&sim, stack, "p", 4).await, 4, "{stack:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_that_answers_nothing_is_resent_once_without_a_retry() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            let p = prober(&sim, stack, 0);
            assert_eq!(p.probe_one("p").await, ACTIVE, "{stack:?}");
            // The server closes the kept connection as the next request arrives.
            sim.drop_requests_on_reused_connections(1);
            assert_eq!(p.probe_one("p").await, ACTIVE, "{stack:?}: resent");
            assert_eq!(sim.requests("p"), 3, "{stack:?}");
            assert_eq!(sim.connections(), 2, "{stack:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resend_happens_once_and_does_not_spend_a_retry() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            let p = prober(&sim, stack, 0);
            assert_eq!(p.probe_one("warm").await, ACTIVE, "{stack:?}");
            // A reset on the reused connection (no byte of an answer), and again on the
            // fresh one: one resend, then the attempt fails as before.
            sim.set("reset", Behavior::Reset);
            let ProbeOutcome::Failed(f) = p.probe_one("reset").await else {
                panic!("{stack:?}: a reset plugin was reported");
            };
            assert_eq!(
                (f.kind, f.attempts),
                (ErrorKind::Protocol, 1),
                "{stack:?}: {f}"
            );
            assert_eq!(sim.requests("reset"), 2, "{stack:?}");
            // An answer that broke off after its first bytes is not resent.
            assert_eq!(p.probe_one("warm").await, ACTIVE, "{stack:?}");
            sim.set("cut", Behavior::Truncated);
            let ProbeOutcome::Failed(f) = p.probe_one("cut").await else {
                panic!("{stack:?}: a truncated answer was reported");
            };
            assert_eq!(f.kind, ErrorKind::Protocol, "{stack:?}: {f}");
            assert_eq!(sim.requests("cut"), 1, "{stack:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_closed_at_random_moments_fail_no_probe() {
    bounded(BOUND, async {
        for stack in STACKS {
            let sim = sim();
            sim.close_idle_connections(Some((Duration::ZERO, Duration::from_millis(3))));
            let p = prober(&sim, stack, 0);
            for k in 0..300u64 {
                let outcome = p.probe_one(&format!("p{}", k % 7)).await;
                assert_eq!(outcome, ACTIVE, "{stack:?}, probe {k}");
                // Pauses around the server's idle limit, so some closes land just before
                // a reuse, some during it and some after.
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3_000))).await;
            }
            assert!(
                sim.connections() > 10,
                "{stack:?}: the server closed only {} connections",
                sim.connections()
            );
        }
    })
    .await;
}

/// One hostile behaviour, and the kind both clients must report for it.
struct Case {
    behavior: Behavior,
    kind: ErrorKind,
    http_status: Option<u16>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_map_failures_to_the_same_kinds() {
    bounded(BOUND, async {
        let cases = [
            Case {
                behavior: Behavior::NotHttp,
                kind: ErrorKind::Protocol,
                http_status: None,
            },
            Case {
                behavior: Behavior::Reset,
                kind: ErrorKind::Protocol,
                http_status: None,
            },
            Case {
                behavior: Behavior::Truncated,
                kind: ErrorKind::Protocol,
                http_status: None,
            },
            Case {
                behavior: Behavior::Huge(200_000),
                kind: ErrorKind::TooLarge,
                http_status: None,
            },
            Case {
                behavior: Behavior::framed(
                    Framing::Chunked(4096),
                    Behavior::raw(200, vec![b' '; 70_000]),
                ),
                kind: ErrorKind::TooLarge,
                http_status: None,
            },
            Case {
                behavior: Behavior::RedirectLoop,
                kind: ErrorKind::HttpStatus,
                http_status: Some(302),
            },
            Case {
                behavior: Behavior::Unknown404,
                kind: ErrorKind::HttpStatus,
                http_status: Some(404),
            },
            Case {
                behavior: Behavior::framed(Framing::Chunked(3), Behavior::raw(503, b"{}".to_vec())),
                kind: ErrorKind::HttpStatus,
                http_status: Some(503),
            },
            Case {
                behavior: Behavior::InvalidUtf8,
                kind: ErrorKind::BadBody,
                http_status: None,
            },
            Case {
                behavior: Behavior::framed(Framing::Chunked(5), Behavior::raw(200, b"[1,2]")),
                kind: ErrorKind::BadBody,
                http_status: None,
            },
        ];
        for stack in STACKS {
            let sim = sim();
            let p = prober(&sim, stack, 0);
            for (i, case) in cases.iter().enumerate() {
                let id = format!("case{i}");
                sim.set(id.clone(), case.behavior.clone());
                let ProbeOutcome::Failed(f) = p.probe_one(&id).await else {
                    panic!("{stack:?}: {:?} was reported", case.behavior);
                };
                assert_eq!(
                    (f.kind, f.http_status),
                    (case.kind, case.http_status),
                    "{stack:?}: {:?}: {f}",
                    case.behavior
                );
                // A healthy plugin on the same prober is still reported afterwards.
                assert_eq!(p.probe_one("healthy").await, ACTIVE, "{stack:?} after {i}");
            }
        }
    })
    .await;
}
