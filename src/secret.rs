//! Values that must never be printed: the Redis password and the Dapr API token.

use std::fmt;

/// A secret string. `Debug` and `Display` print `[redacted]`; only [`Secret::expose`]
/// gives the value, and only code that sends it to its one destination calls that.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A connection URL with any password replaced by `[redacted]`, for display.
/// `redis://user:pw@host:6379/0` -> `redis://user:[redacted]@host:6379/0`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    let redacted = if userinfo.contains(':') {
        format!("{user}:[redacted]")
    } else {
        // `redis://secret@host` puts the password where the user name would be.
        "[redacted]".to_string()
    };
    format!("{}://{}@{}", &url[..scheme_end], redacted, &rest[at + 1..])
}

/// `host:port` of a connection URL, for error messages that must not show credentials.
pub fn url_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.is_empty() {
        "(no host)".to_string()
    } else {
        host_port.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:[redacted]@h:1/0");
        assert_eq!(redact_url("redis://u:p@w@h:1"), "redis://u:[redacted]@h:1");
        assert_eq!(redact_url("redis://pw@h:1"), "redis://[redacted]@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(url_host_port("redis://u:p@w@h:1/2"), "h:1");
        assert_eq!(url_host_port("redis://h:1"), "h:1");
    }
}
