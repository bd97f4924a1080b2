//! `run` stops its background tasks (the health server and the store pinger) on every
//! return path: a start-up failure after the health server is listening leaves nothing
//! answering on its port.

use keel_test_support::process::free_port;
use std::time::{Duration, Instant};

use keel_scraper::config::{parse_cli, Env, Settings};
use keel_scraper::worker::{self, CommandError, Exit};

struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_after_listening_stops_the_health_server() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // The configuration accepts an https status URL, the prober refuses it: `run` fails
    // after the health server started and the store connected.
    let (cli, _) = parse_cli([
        "keel-scraper",
        "--backend",
        "memory",
        "--status-url",
        "https://127.0.0.1:9/{plugin_id}/v1/status",
        "--listen",
        &listen,
        "run",
    ])
    .expect("valid arguments");
    let settings = Settings::from_options(&cli.options, &NoEnv).expect("valid settings");
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        worker::run(&settings, std::future::pending()),
    )
    .await
    .expect("run returns by itself");
    let err = result.expect_err("run fails on the prober");
    assert!(matches!(err, CommandError::Wiring(_)), "{err}");
    assert_eq!(err.exit(), Exit::Failed);
    assert!(err.to_string().contains("https"), "{err}");

    // The server task is aborted: within a bounded wait the port refuses connections.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpStream::connect(&listen).await {
            Err(_) => break,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the health server still answers on {listen} after run returned"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
