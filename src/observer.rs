//! The observer's own health: is a failed probe the plugin's, or this worker's?
//!
//! - Through Dapr (the status URL goes to the sidecar): the sidecar's HTTP port refusing
//!   connections (a `connect` failure) or `GET /v1.0/healthz/outbound` failing makes the
//!   tick's guarded failures the observer's.
//! - A direct status URL whose host does not contain `{plugin_id}` (one host serves every
//!   plugin): a `connect` failure to that host is the observer's; its own check is a TCP
//!   connect within the probe timeout.
//! - A host that contains `{plugin_id}`: every plugin has its own host, no own check.

use std::time::Duration;

use crate::probe::ProbeFailure;
use crate::status::ErrorKind;

/// Whose health a tick checks besides the plugins'.
#[derive(Clone, Debug)]
pub enum Observer {
    /// No own check.
    None,
    /// Status calls through the sidecar at `endpoint` (`http://host:port`).
    Sidecar {
        endpoint: String,
        client: reqwest::Client,
        timeout: Duration,
    },
    /// One host (`host:port`) serves every plugin.
    SingleHost { address: String, timeout: Duration },
}

/// The authority (`host[:port]`) of an `http://` URL template, as written.
fn authority(template: &str) -> &str {
    let rest = template
        .strip_prefix("http://")
        .or_else(|| template.strip_prefix("https://"))
        .unwrap_or(template);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let auth = &rest[..end];
    // Drop any userinfo: only the host and port are dialled.
    auth.rsplit_once('@').map_or(auth, |(_, host)| host)
}

impl Observer {
    /// The observer for a status URL template; `via_sidecar` when it goes to the
    /// sidecar's HTTP endpoint `sidecar`.
    pub fn for_template(
        template: &str,
        via_sidecar: bool,
        sidecar: &str,
        timeout: Duration,
    ) -> Observer {
        if via_sidecar {
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build();
            // Building a client without TLS or proxies only fails if the system refuses
            // resources; the tick then has no own check rather than no tick.
            return match client {
                Ok(client) => Observer::Sidecar {
                    endpoint: sidecar.trim_end_matches('/').to_string(),
                    client,
                    timeout,
                },
                Err(_) => Observer::None,
            };
        }
        let auth = authority(template);
        if auth.contains(crate::probe::PLUGIN_ID_PLACEHOLDER) || auth.is_empty() {
            return Observer::None;
        }
        let address = if auth.starts_with('[') {
            if auth.contains("]:") {
                auth.to_string()
            } else {
                format!("{auth}:80")
            }
        } else if auth.contains(':') {
            auth.to_string()
        } else {
            format!("{auth}:80")
        };
        Observer::SingleHost { address, timeout }
    }

    /// Whether this failure is the observer's own (its path to the plugins refused).
    pub fn blames(&self, failure: &ProbeFailure) -> bool {
        !matches!(self, Observer::None) && failure.kind == ErrorKind::Connect
    }

    /// What is checked, for events (never a token or a full URL).
    pub fn describe(&self) -> String {
        match self {
            Observer::None => "none".into(),
            Observer::Sidecar { endpoint, .. } => format!("the Dapr sidecar at {endpoint}"),
            Observer::SingleHost { address, .. } => format!("the status host {address}"),
        }
    }

    /// The own check: `Ok` when the path to the plugins works, else why not.
    pub async fn check(&self) -> Result<(), String> {
        match self {
            Observer::None => Ok(()),
            Observer::Sidecar {
                endpoint,
                client,
                timeout,
            } => {
                let url = format!("{endpoint}/v1.0/healthz/outbound");
                match tokio::time::timeout(*timeout, client.get(&url).send()).await {
                    Ok(Ok(r)) if r.status().is_success() => Ok(()),
                    Ok(Ok(r)) => Err(format!(
                        "{endpoint}/v1.0/healthz/outbound answered HTTP {}",
                        r.status().as_u16()
                    )),
                    Ok(Err(e)) if e.is_connect() => Err(format!(
                        "the sidecar's HTTP port at {endpoint} refused the connection"
                    )),
                    Ok(Err(_)) | Err(_) => Err(format!(
                        "{endpoint}/v1.0/healthz/outbound did not answer within {}",
                        humantime::format_duration(*timeout)
                    )),
                }
            }
            Observer::SingleHost { address, timeout } => {
                match tokio::time::timeout(
                    *timeout,
                    tokio::net::TcpStream::connect(address.as_str()),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("cannot connect to the status host {address}: {e}")),
                    Err(_) => Err(format!(
                        "no TCP connection to the status host {address} within {}",
                        humantime::format_duration(*timeout)
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_observer_follows_the_template() {
        let t = Duration::from_secs(1);
        let cases = [
            (
                "http://10.0.0.1:8080/{plugin_id}/v1/status",
                "10.0.0.1:8080",
            ),
            (
                "http://status.local/v1/status?id={plugin_id}",
                "status.local:80",
            ),
            ("http://u:p@[::1]:9/{plugin_id}", "[::1]:9"),
        ];
        for (template, want) in cases {
            match Observer::for_template(template, false, "http://127.0.0.1:3500", t) {
                Observer::SingleHost { address, .. } => assert_eq!(address, want, "{template}"),
                other => panic!("{template}: {other:?}"),
            }
        }
        assert!(matches!(
            Observer::for_template("http://{plugin_id}:8080/v1/status", false, "", t),
            Observer::None
        ));
        assert!(matches!(
            Observer::for_template("http://{plugin_id}-svc.ns/v1/status", false, "", t),
            Observer::None
        ));
        assert!(matches!(
            Observer::for_template(
                "http://127.0.0.1:3500/v1.0/invoke/{plugin_id}/method/v1/status",
                true,
                "http://127.0.0.1:3500",
                t
            ),
            Observer::Sidecar { .. }
        ));
    }
}
