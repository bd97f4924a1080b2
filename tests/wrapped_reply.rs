//! A wrapped, indented `/v1/status` reply ending in a newline and sent without a
//! `Content-Type` header, from a real HTTP server on loopback, is read by the prober.

use std::time::Duration;

use keel_scraper::probe::{ProbeOutcome, ProbeSettings, Prober};
use keel_scraper::status::RouteStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BODY: &str = "{\n  \"code\": \"io.tkeel.SUCCESS\",\n  \"msg\": \"ok\",\n  \"data\": {\n    \"@type\": \"type.googleapis.com/openapi.v1.StatusResponse\",\n    \"res\": {\n      \"ret\": \"OK\",\n      \"msg\": \"ok\"\n    },\n    \"status\": \"RUNNING\"\n  }\n}\n";

/// Answers every request on one connection with [`BODY`], no `Content-Type`.
async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            loop {
                let Ok(n) = conn.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    seen.drain(..end + 4);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{BODY}",
                        BODY.len()
                    );
                    if conn.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_reply_without_content_type_reports_its_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(serve(listener));
    let prober = Prober::new(ProbeSettings {
        timeout: Duration::from_secs(2),
        retries: 0,
        ..ProbeSettings::new(format!("http://{addr}/{{plugin_id}}/v1/status"))
    })
    .expect("prober");
    for id in ["iothub", "rudder"] {
        assert_eq!(
            prober.probe_one(id).await,
            ProbeOutcome::Reported(RouteStatus::Active),
            "{id}"
        );
    }
    server.abort();
}
