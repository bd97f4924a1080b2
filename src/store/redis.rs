//! The `redis` backend: Redis directly, in exactly Dapr's `state.redis` layout.
//!
//! A route this backend writes reads back through Dapr unchanged, and a value Dapr wrote
//! reads back here with the same ETag. Each key is a Redis HASH with the fields
//!
//! * `data`: the value bytes exactly as written;
//! * `version`: an integer, incremented by every write; the ETag is its decimal string;
//! * `first-write`: `"0"`, present once any write to the key used first-write concurrency.
//!
//! Public keys are stored bare (Dapr's `keyPrefix: none`); private keys as
//! `<private-key-prefix>||<key>`, the prefix being the Plugins app id (default `plugins`).
//!
//! Every operation is one Lua script, so each is atomic in Redis: a save applies Dapr's
//! write rule (see the [`super`] module docs) and its TTL in one step (Dapr itself sends
//! the `EXPIRE` separately; doing it inside the script only closes that gap), and
//! [`Store::update_existing`] checks existence and version in the same step as the write,
//! so it never re-creates a deleted route. Scripts are sent by SHA (`EVALSHA`) and loaded
//! again automatically after a Redis restart (`NOSCRIPT`).
//!
//! Reads are the hot path: [`Store::bulk_get`] reads a tick's keys in script calls of
//! [`BULK_CHUNK`] keys each (`data`, `version` and `PTTL` of each key), a few of them
//! pipelined at a time, parsing each reply as it arrives.
//!
//! The connection is a redis-rs `ConnectionManager`: one multiplexed connection that
//! concurrent operations share (concurrent writes are pipelined on it) and that reconnects
//! by itself after an outage. Every operation is bounded by a timeout, so an outage is an
//! error within seconds, never a hang.
//!
//! The Redis URL may carry a password. It is kept only inside the connection; errors name
//! the host and port, and any text coming back from the client is scrubbed of the
//! password before it is used, so no error, log line or `Debug` output can contain it.

use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, RedisError, RedisWrite, Script, ServerErrorKind, Value};

use super::{Concurrency, Entry, Fence, Save, Store, StoreError, StoreKind};

/// Pause before asking once more after a refused connection (see `eval`).
const RECONNECT_PAUSE: Duration = Duration::from_millis(150);

/// Keys read by one script call in [`Store::bulk_get`]. Large enough that 50 000 keys are
/// 50 calls, small enough that a single call blocks Redis only briefly.
pub const BULK_CHUNK: usize = 1000;

/// Script calls of one [`Store::bulk_get`] in flight at once. Enough to keep the
/// connection busy while a reply is parsed; few enough that a tick at 50 000 plugins holds
/// the replies of only these chunks, not of the whole fleet (its peak memory).
const BULK_IN_FLIGHT: usize = 2;

/// Reads Dapr state hashes. For each key in KEYS it returns three values:
/// the `version` string, or the integer 0 when the key is absent, or -1 when the key is
/// not readable (neither a hash nor a string, or a hash lacking `data` or `version`); then
/// the `data` bytes; then the key's PTTL in milliseconds (-1: no TTL).
/// A plain string key reads as Dapr's `state.redis` reads it (its `HGETALL` fails, it
/// falls back to `GET`): the string as data, with an empty version (no ETag).
/// Lua `false` cannot sit in a reply array, hence the integer markers.
const READ_LUA: &str = r"
local out = {}
local n = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local r = redis.pcall('HMGET', key, 'data', 'version')
  local version, data, ttl = 0, '', -1
  if r.err then
    local plain = redis.pcall('GET', key)
    if type(plain) == 'string' then
      version, data, ttl = '', plain, redis.call('PTTL', key)
    else
      version = -1
    end
  elseif r[1] and r[2] then
    version, data, ttl = r[2], r[1], redis.call('PTTL', key)
  elseif r[1] or r[2] then
    version = -1
  end
  out[n + 1] = version
  out[n + 2] = data
  out[n + 3] = ttl
  n = n + 3
end
return out
";

/// Dapr's write rule. KEYS[1]: the key. ARGV[1]: the request's ETag as a canonical
/// integer, `0` when it has none; ARGV[2]: the data; ARGV[3]: `1` for first-write
/// concurrency; ARGV[4]: empty (leave the TTL), `persist`, or a positive number of seconds.
/// With KEYS[2] (a fence), the write lands only while that key still holds version
/// ARGV[5] and data ARGV[6]. Returns the new version, 0 when the write is refused, -2
/// when the fence no longer holds.
const SAVE_LUA: &str = r"
local key = KEYS[1]
if KEYS[2] then
  local fence = redis.pcall('HMGET', KEYS[2], 'version', 'data')
  if type(fence) ~= 'table' or fence.err or fence[1] ~= ARGV[5] or fence[2] ~= ARGV[6] then
    return -2
  end
end
local current = redis.pcall('HGET', key, 'version')
if type(current) == 'table' then
  -- Not a hash: Dapr's rule counts it as absent, and the write replaces it.
  redis.call('DEL', key)
  current = false
end
if current and current ~= '' and current ~= ARGV[1] then
  if ARGV[1] ~= '0' or redis.call('HEXISTS', key, 'first-write') == 1 then
    return 0
  end
end
if ARGV[3] == '1' then
  redis.call('HSET', key, 'data', ARGV[2], 'first-write', '0')
else
  redis.call('HSET', key, 'data', ARGV[2])
end
local version = redis.call('HINCRBY', key, 'version', 1)
if ARGV[4] == 'persist' then
  redis.call('PERSIST', key)
elseif ARGV[4] ~= '' then
  redis.call('EXPIRE', key, ARGV[4])
end
return version
";

/// Rewrites an existing key whose version is still ARGV[1] (first-write, TTL untouched).
/// KEYS[1]: the key; ARGV[2]: the data. Returns the new version, 0 when the version
/// differs, -1 when the key is gone.
const UPDATE_LUA: &str = r"
local key = KEYS[1]
if KEYS[2] then
  local fence = redis.pcall('HMGET', KEYS[2], 'version', 'data')
  if type(fence) ~= 'table' or fence.err or fence[1] ~= ARGV[3] or fence[2] ~= ARGV[4] then
    return -2
  end
end
local current = redis.pcall('HGET', key, 'version')
if type(current) == 'table' or not current or current == '' then
  return -1
end
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', key, 'data', ARGV[2], 'first-write', '0')
return redis.call('HINCRBY', key, 'version', 1)
";

/// Deletes KEYS[1] if it is absent, not a Dapr state hash, or at version ARGV[1].
/// Returns 1 when deleted (or absent), 0 when the version differs.
const DELETE_LUA: &str = r"
local key = KEYS[1]
local current = redis.pcall('HGET', key, 'version')
if type(current) == 'table' or not current or current == '' or current == ARGV[1] then
  redis.call('DEL', key)
  return 1
end
return 0
";

/// Timeouts of the Redis backend.
#[derive(Clone, Copy, Debug)]
pub struct RedisOptions {
    /// Bound on every operation, the initial connection included: an outage is reported
    /// as an error after at most this long.
    pub timeout: Duration,
    /// Bound on one TCP connection attempt (a reconnection makes at most two).
    pub connect_attempt_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_secs(5),
            connect_attempt_timeout: Duration::from_secs(2),
        }
    }
}

/// How Dapr's `keyPrefix` metadata is applied, as the `redis` backend applies
/// `--private-key-prefix` (Dapr lower-cases the value, then: `none` = bare keys;
/// `appid`, `name`, `namespace` = strategies naming the caller's app id, the component
/// name or the namespace, which this process cannot know; anything else = a fixed prefix,
/// lower-cased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPrefix {
    /// `none`: the bare key.
    Bare,
    /// `<prefix>||<key>`.
    Fixed(String),
}

impl KeyPrefix {
    /// Applies Dapr's rules to `raw`; `Err` says why it cannot be applied here.
    pub fn parse(raw: &str) -> Result<KeyPrefix, String> {
        let lower = raw.to_lowercase();
        match lower.as_str() {
            "" => Err("is empty; use `none` for bare keys or the Plugins app id (e.g. plugins)".into()),
            "none" => Ok(KeyPrefix::Bare),
            "appid" | "name" | "namespace" => Err(format!(
                "is {raw:?}, a Dapr keyPrefix strategy (prefix = the calling app id, the                  component name or <namespace>.<app id>) that the redis backend cannot apply;                  give the prefix itself, e.g. plugins, or none for bare keys"
            )),
            _ if lower.contains("||") => Err("must not contain \"||\"".into()),
            _ => Ok(KeyPrefix::Fixed(lower)),
        }
    }
}

/// The `redis` backend. Clones of the inner connection share one socket.
pub struct RedisStore {
    conn: ConnectionManager,
    public_name: String,
    private_name: String,
    private_prefix: KeyPrefix,
    /// Replicas `INFO replication` reported at connect: with n > 0, every write is
    /// followed by `WAIT n 1000`, as Dapr's strong consistency does.
    replicas: u64,
    /// `host:port`, the only part of the URL errors may show.
    endpoint: String,
    /// Texts that must never leave this type (the password, raw and percent-decoded).
    redact: Vec<String>,
    timeout: Duration,
    read: Script,
    save: Script,
    update: Script,
    delete: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written: the connection manager's own Debug prints the connection info,
        // which holds the password.
        f.debug_struct("RedisStore")
            .field("endpoint", &self.endpoint)
            .field("public_name", &self.public_name)
            .field("private_name", &self.private_name)
            .field("private_prefix", &self.private_prefix)
            .field("replicas", &self.replicas)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What a Redis URL says, as far as messages may repeat it.
struct ParsedUrl {
    /// `host:port` (`[v6]:port` for IPv6 literals).
    endpoint: String,
    /// The password (and a username given without one, which some clients send as the
    /// password), raw and percent-decoded, for scrubbing.
    secrets: Vec<String>,
}

/// Splits a `redis://[[user]:password@]host[:port][/db][?query]` URL just far enough to
/// name its endpoint and know its secrets. Errors never repeat the URL.
fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    const SHAPE: &str = "expected redis://[[user]:password@]host[:port][/db]";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("invalid Redis URL: {SHAPE}"));
    };
    if !matches!(scheme, "redis" | "rediss" | "valkey" | "valkeys") {
        return Err(format!("unsupported Redis URL scheme {scheme:?}: {SHAPE}"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let mut secrets = Vec::new();
    if let Some(userinfo) = userinfo {
        let secret = match userinfo.split_once(':') {
            Some((_, password)) => password,
            None => userinfo,
        };
        if !secret.is_empty() {
            secrets.push(secret.to_owned());
            let decoded = percent_decode(secret);
            if decoded != secret {
                secrets.push(decoded);
            }
        }
    }
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(format!("invalid Redis URL host: {SHAPE}"));
        };
        (format!("[{host}]"), after.strip_prefix(':'))
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (host_port.to_owned(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("invalid Redis URL: no host; {SHAPE}"));
    }
    let port = match port {
        None | Some("") => 6379,
        Some(port) => port
            .parse::<u16>()
            .map_err(|_| format!("invalid Redis URL port for host {host}: {SHAPE}"))?,
    };
    Ok(ParsedUrl {
        endpoint: format!("{host}:{port}"),
        secrets,
    })
}

/// Decodes `%XX` escapes (as the client does for URL passwords); other bytes pass through.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(byte) = hex {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces every secret in `text` by `[redacted]`.
fn scrub(mut text: String, secrets: &[String]) -> String {
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "[redacted]");
        }
    }
    text
}

/// Describes a client error in words that cannot include the URL (scrubbed anyway).
fn describe(err: &RedisError, secrets: &[String]) -> String {
    let text = if err.is_timeout() {
        format!("no answer in time ({err})")
    } else if err.kind() == ErrorKind::AuthenticationFailed
        || err
            .code()
            .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
    {
        format!("authentication failed ({err})")
    } else if err.is_connection_refusal() {
        format!("connection refused ({err})")
    } else {
        err.to_string()
    };
    scrub(text, secrets)
}

/// A key as one Redis argument, prefixed for the private store, written straight into
/// the command buffer (no per-key `String`).
fn write_key(cmd: &mut Cmd, prefix: Option<&str>, key: &str) {
    let mut arg = cmd.writer_for_next_arg();
    // Writing into the command's in-memory buffer cannot fail.
    if let Some(prefix) = prefix {
        let _ = arg.write_all(prefix.as_bytes());
        let _ = arg.write_all(b"||");
    }
    let _ = arg.write_all(key.as_bytes());
}

/// A `EVALSHA <sha> <numkeys>` command, ready for keys and arguments.
fn evalsha(script: &Script, numkeys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(numkeys);
    cmd
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Why one stored value could not be turned into an [`Entry`].
const NOT_STATE_HASH: &str =
    "the key is not a Dapr state hash (expected a HASH with `data` and `version` fields)";

impl RedisStore {
    /// Connects with default timeouts (see [`RedisOptions`]).
    pub async fn connect(
        url: &str,
        public_name: &str,
        private_name: &str,
        private_prefix: &str,
    ) -> Result<RedisStore, StoreError> {
        Self::connect_with(
            url,
            public_name,
            private_name,
            private_prefix,
            RedisOptions::default(),
        )
        .await
    }

    /// Connects, checks that Redis answers (`PING`, authentication included) and loads
    /// the scripts. Fails within `options.timeout` with a message naming host and port.
    pub async fn connect_with(
        url: &str,
        public_name: &str,
        private_name: &str,
        private_prefix: &str,
        options: RedisOptions,
    ) -> Result<RedisStore, StoreError> {
        let connect_error = |to: &str, message: String| StoreError::Failed {
            store: format!("{public_name}, {private_name}"),
            operation: "connect to",
            key: to.to_owned(),
            message,
        };
        let parsed = parse_url(url).map_err(|e| connect_error("Redis", e))?;
        let private_prefix = KeyPrefix::parse(private_prefix)
            .map_err(|e| connect_error("Redis", format!("the private key prefix {e}")))?;
        let endpoint = parsed.endpoint;
        let secrets = parsed.secrets;
        let client = redis::Client::open(url).map_err(|e| {
            connect_error(
                &endpoint,
                format!("invalid Redis URL: {}", describe(&e, &secrets)),
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_attempt_timeout))
            .set_response_timeout(Some(options.timeout))
            // A reconnection makes at most two attempts, so a command issued during an
            // outage fails fast; the next command starts a new reconnection.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let scripts = [READ_LUA, SAVE_LUA, UPDATE_LUA, DELETE_LUA].map(Script::new);
        let connecting = async {
            let mut conn = client.get_connection_manager_with_config(config).await?;
            // PING proves the server answers (and that authentication passed); loading the
            // scripts now makes the first operations plain EVALSHAs.
            let mut pipe = redis::pipe();
            pipe.cmd("PING").ignore();
            for script in &scripts {
                pipe.load_script(script).ignore();
            }
            // As Dapr's `state.redis` at init: how many replicas writes must wait for.
            pipe.cmd("INFO").arg("replication");
            let (info,): (String,) = pipe.query_async(&mut conn).await?;
            Ok::<_, RedisError>((conn, connected_replicas(&info)))
        };
        let (conn, replicas) = match tokio::time::timeout(options.timeout, connecting).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => return Err(connect_error(&endpoint, describe(&e, &secrets))),
            Err(_) => {
                return Err(connect_error(
                    &endpoint,
                    format!("no answer within {:?}", options.timeout),
                ))
            }
        };
        let [read, save, update, delete] = scripts;
        let store = RedisStore {
            conn,
            public_name: public_name.to_owned(),
            private_name: private_name.to_owned(),
            private_prefix,
            replicas,
            endpoint,
            redact: secrets,
            timeout: options.timeout,
            read,
            save,
            update,
            delete,
        };
        Ok(store)
    }

    /// `host:port` of the Redis server.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The full Redis key of `key` in the logical store `kind`.
    pub fn redis_key(&self, kind: StoreKind, key: &str) -> String {
        match self.prefix(kind) {
            None => key.to_owned(),
            Some(prefix) => format!("{prefix}||{key}"),
        }
    }

    fn prefix(&self, kind: StoreKind) -> Option<&str> {
        match (kind, &self.private_prefix) {
            (StoreKind::Public, _) | (StoreKind::Private, KeyPrefix::Bare) => None,
            (StoreKind::Private, KeyPrefix::Fixed(prefix)) => Some(prefix),
        }
    }

    /// How many replicas writes wait for (`INFO replication` at connect).
    pub fn replicas(&self) -> u64 {
        self.replicas
    }

    fn name(&self, kind: StoreKind) -> &str {
        match kind {
            StoreKind::Public => &self.public_name,
            StoreKind::Private => &self.private_name,
        }
    }

    /// One key holds something that is not a Dapr state value.
    fn unreadable(&self, kind: StoreKind, key: &str, why: &str) -> StoreError {
        StoreError::Unreadable {
            store: self.name(kind).to_owned(),
            key: key.to_owned(),
            message: why.to_owned(),
        }
    }

    fn failed(
        &self,
        kind: StoreKind,
        operation: &'static str,
        key: &str,
        what: String,
    ) -> StoreError {
        StoreError::Failed {
            store: self.name(kind).to_owned(),
            operation,
            key: key.to_owned(),
            message: format!("Redis at {}: {what}", self.endpoint),
        }
    }

    fn redis_failed(
        &self,
        kind: StoreKind,
        operation: &'static str,
        key: &str,
        err: &RedisError,
    ) -> StoreError {
        self.failed(kind, operation, key, describe(err, &self.redact))
    }

    fn invalid(&self, kind: StoreKind, key: &str, etag: &str) -> StoreError {
        StoreError::InvalidEtag {
            store: self.name(kind).to_owned(),
            key: key.to_owned(),
            etag: etag.to_owned(),
        }
    }

    fn conflict(&self, kind: StoreKind, key: &str) -> StoreError {
        StoreError::Conflict {
            store: self.name(kind).to_owned(),
            key: key.to_owned(),
        }
    }

    /// Dapr's strong consistency: after a write, `WAIT <replicas> 1000` when Redis had
    /// replicas at connect (Dapr ignores how many acknowledged; so does this).
    async fn wait_for_replicas(
        &self,
        kind: StoreKind,
        operation: &'static str,
        key: &str,
    ) -> Result<(), StoreError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(1000);
        match tokio::time::timeout(self.timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(_acknowledged)) => Ok(()),
            Ok(Err(e)) => Err(self.failed(
                kind,
                operation,
                key,
                format!(
                    "waiting for {} replicas to acknowledge the write: {}",
                    self.replicas,
                    describe(&e, &self.redact)
                ),
            )),
            Err(_) => Err(self.failed(
                kind,
                operation,
                key,
                format!(
                    "waiting for {} replicas: no answer within {:?}",
                    self.replicas, self.timeout
                ),
            )),
        }
    }

    /// Runs one script command, loading the script first if Redis lost it (restart,
    /// `SCRIPT FLUSH`), all within the operation timeout.
    async fn eval(&self, script: &Script, cmd: &Cmd) -> Result<Value, EvalError> {
        let run = async {
            let mut conn = self.conn.clone();
            let first = match cmd.query_async::<Value>(&mut conn).await {
                // Nothing was sent: after an outage the connection manager answers the
                // first command with the old failure while it reconnects; ask once more.
                Err(e) if e.is_connection_refusal() => {
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    cmd.query_async::<Value>(&mut conn).await
                }
                other => other,
            };
            match first {
                Err(e) if is_noscript(&e) => {
                    script.load_async(&mut conn).await?;
                    cmd.query_async::<Value>(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(EvalError::Redis(e)),
            Err(_) => Err(EvalError::Timeout),
        }
    }

    fn eval_failed(
        &self,
        kind: StoreKind,
        operation: &'static str,
        key: &str,
        err: EvalError,
    ) -> StoreError {
        match err {
            EvalError::Redis(e) => self.redis_failed(kind, operation, key, &e),
            EvalError::Timeout => self.failed(
                kind,
                operation,
                key,
                format!("no answer within {:?}", self.timeout),
            ),
        }
    }

    /// The update script, fenced by the lock record when `fence` is given (one script:
    /// the fence check and the write are atomic). Fencing needs both keys on one Redis
    /// node, as on a single server or a primary with replicas.
    async fn update(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        // An empty ETag is sent as is: no stored version equals it, so it is a conflict.
        if !etag.is_empty() && etag.parse::<i64>().is_err() {
            return Err(self.invalid(kind, key, etag));
        }
        let mut cmd = evalsha(&self.update, if fence.is_some() { 2 } else { 1 });
        write_key(&mut cmd, self.prefix(kind), key);
        if let Some(f) = fence {
            write_key(&mut cmd, self.prefix(StoreKind::Private), &f.key);
        }
        match etag.parse::<i64>() {
            Ok(version) => cmd.arg(version),
            Err(_) => cmd.arg(""),
        };
        cmd.write_arg(data);
        if let Some(f) = fence {
            cmd.arg(&f.etag);
            cmd.write_arg(&f.data);
        }
        let reply = self
            .eval(&self.update, &cmd)
            .await
            .map_err(|e| self.eval_failed(kind, "update", key, e))?;
        match reply {
            Value::Int(version) if version > 0 => self.wait_for_replicas(kind, "update", key).await,
            Value::Int(0) => Err(self.conflict(kind, key)),
            Value::Int(-2) => Err(StoreError::Fenced {
                store: self.name(kind).to_owned(),
                key: key.to_owned(),
            }),
            Value::Int(-1) => Err(StoreError::Missing {
                store: self.name(kind).to_owned(),
                key: key.to_owned(),
            }),
            _ => Err(self.failed(
                kind,
                "update",
                key,
                "unexpected reply to the update script".to_owned(),
            )),
        }
    }

    /// The save script, fenced by the lock record when `fence` is given (one script: the
    /// fence check and the write are atomic).
    async fn save_with(
        &self,
        kind: StoreKind,
        save: Save<'_>,
        fence: Option<&Fence>,
    ) -> Result<(), StoreError> {
        // Dapr's rule: under last-write concurrency the ETag counts as 0 whatever it says;
        // a refusal is still a mismatch when an ETag was sent.
        let has_etag = save.etag.is_some_and(|e| !e.is_empty());
        let etag = match save.concurrency {
            Concurrency::LastWrite => 0,
            Concurrency::FirstWrite => etag_arg(save.etag)
                .map_err(|()| self.invalid(kind, save.key, save.etag.unwrap_or_default()))?,
        };
        let mut cmd = evalsha(&self.save, if fence.is_some() { 2 } else { 1 });
        write_key(&mut cmd, self.prefix(kind), save.key);
        if let Some(f) = fence {
            write_key(&mut cmd, self.prefix(StoreKind::Private), &f.key);
        }
        cmd.arg(etag);
        cmd.write_arg(save.data);
        cmd.arg(match save.concurrency {
            Concurrency::FirstWrite => "1",
            Concurrency::LastWrite => "0",
        });
        match save.ttl_seconds {
            None => cmd.arg(""),
            Some(seconds) if seconds > 0 => cmd.arg(seconds),
            Some(_) => cmd.arg("persist"),
        };
        if let Some(f) = fence {
            cmd.arg(&f.etag);
            cmd.write_arg(&f.data);
        }
        let reply = self
            .eval(&self.save, &cmd)
            .await
            .map_err(|e| self.eval_failed(kind, "save", save.key, e))?;
        match reply {
            Value::Int(version) if version > 0 => {
                self.wait_for_replicas(kind, "save", save.key).await
            }
            Value::Int(-2) => Err(StoreError::Fenced {
                store: self.name(kind).to_owned(),
                key: save.key.to_owned(),
            }),
            Value::Int(0) if has_etag => Err(self.conflict(kind, save.key)),
            Value::Int(0) => Err(self.failed(
                kind,
                "save",
                save.key,
                "the key exists and was written with first-write concurrency; a save \
                 without an ETag cannot replace it"
                    .to_owned(),
            )),
            _ => Err(self.failed(
                kind,
                "save",
                save.key,
                "unexpected reply to the save script".to_owned(),
            )),
        }
    }

    /// Builds one read-script call for `keys`.
    fn read_cmd(&self, kind: StoreKind, keys: &[String]) -> Cmd {
        let mut cmd = evalsha(&self.read, keys.len());
        let prefix = self.prefix(kind);
        for key in keys {
            write_key(&mut cmd, prefix, key);
        }
        cmd
    }

    /// Appends the entries of one read-script reply to `out`; on a malformed value
    /// returns the index (within this reply) of the key at fault and why.
    fn parse_read(
        reply: Value,
        expected: usize,
        out: &mut Vec<Option<Entry>>,
    ) -> Result<(), (usize, &'static str)> {
        let Value::Array(values) = reply else {
            return Err((0, "unexpected reply to the read script"));
        };
        if values.len() != expected * 3 {
            return Err((0, "unexpected reply length from the read script"));
        }
        let mut values = values.into_iter();
        let mut index = 0;
        while let (Some(version), Some(data), Some(ttl)) =
            (values.next(), values.next(), values.next())
        {
            let entry = match version {
                Value::Int(0) => None,
                Value::BulkString(version) => {
                    let etag = String::from_utf8(version)
                        .map_err(|_| (index, "the stored `version` is not text"))?;
                    let Value::BulkString(data) = data else {
                        return Err((index, NOT_STATE_HASH));
                    };
                    let ttl = match ttl {
                        Value::Int(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
                        _ => None,
                    };
                    Some(Entry { data, etag, ttl })
                }
                _ => return Err((index, NOT_STATE_HASH)),
            };
            out.push(entry);
            index += 1;
        }
        Ok(())
    }
}

/// A script call that did not produce a reply.
enum EvalError {
    Redis(RedisError),
    Timeout,
}

impl From<RedisError> for EvalError {
    fn from(e: RedisError) -> Self {
        EvalError::Redis(e)
    }
}

/// `connected_slaves:<n>` of an `INFO replication` reply (0 when absent or unreadable,
/// as Dapr reads it).
fn connected_replicas(info: &str) -> u64 {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The ETag argument of the save script: Dapr's `0` for "none", else the canonical integer.
fn etag_arg(etag: Option<&str>) -> Result<i64, ()> {
    match etag {
        None | Some("") => Ok(0),
        Some(text) => text.parse::<i64>().map_err(|_| ()),
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn store_name(&self, kind: StoreKind) -> &str {
        self.name(kind)
    }

    fn locate(&self, kind: StoreKind, key: &str) -> String {
        self.redis_key(kind, key)
    }

    async fn get(&self, kind: StoreKind, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut cmd = evalsha(&self.read, 1);
        write_key(&mut cmd, self.prefix(kind), key);
        let reply = self
            .eval(&self.read, &cmd)
            .await
            .map_err(|e| self.eval_failed(kind, "get", key, e))?;
        let mut out = Vec::with_capacity(1);
        Self::parse_read(reply, 1, &mut out).map_err(|(_, why)| self.unreadable(kind, key, why))?;
        Ok(out.pop().flatten())
    }

    async fn bulk_get(
        &self,
        kind: StoreKind,
        keys: &[String],
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let Some(first_key) = keys.first().map(String::as_str) else {
            return Ok(Vec::new());
        };
        // The chunks go out as a bounded stream: a few script calls in flight on the
        // multiplexed connection, each reply parsed into entries as soon as it is in, so
        // only those few replies are ever held as `redis::Value`s.
        let run = async {
            let mut out = Vec::with_capacity(keys.len());
            // Indices, not borrowed chunks, keep the future `Send` (no higher-ranked closure).
            let chunks: Vec<&[String]> = keys.chunks(BULK_CHUNK).collect();
            let chunks = &chunks;
            let mut replies = stream::iter(0..chunks.len())
                .map(|i| async move {
                    // `i` comes from `0..chunks.len()`.
                    let chunk = chunks[i];
                    let reply = self.eval(&self.read, &self.read_cmd(kind, chunk)).await;
                    (chunk, reply)
                })
                .buffered(BULK_IN_FLIGHT);
            while let Some((chunk, reply)) = replies.next().await {
                let key = chunk.first().map_or(first_key, String::as_str);
                let reply = reply.map_err(|e| self.eval_failed(kind, "bulk get", key, e))?;
                Self::parse_read(reply, chunk.len(), &mut out).map_err(|(index, why)| {
                    let key = chunk.get(index).map_or(first_key, String::as_str);
                    self.unreadable(kind, key, why)
                })?;
            }
            Ok(out)
        };
        let out = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(self.failed(
                    kind,
                    "bulk get",
                    first_key,
                    format!("no answer within {:?}", self.timeout),
                ))
            }
        };
        if out.len() != keys.len() {
            return Err(self.failed(
                kind,
                "bulk get",
                first_key,
                "fewer replies than keys".to_owned(),
            ));
        }
        Ok(out)
    }

    async fn save(&self, kind: StoreKind, save: Save<'_>) -> Result<(), StoreError> {
        self.save_with(kind, save, None).await
    }

    async fn save_fenced(
        &self,
        kind: StoreKind,
        save: Save<'_>,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.save_with(kind, save, Some(fence)).await
    }

    async fn update_existing(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
    ) -> Result<(), StoreError> {
        self.update(kind, key, data, etag, None).await
    }

    async fn update_fenced(
        &self,
        kind: StoreKind,
        key: &str,
        data: &[u8],
        etag: &str,
        fence: &Fence,
    ) -> Result<(), StoreError> {
        self.update(kind, key, data, etag, Some(fence)).await
    }

    fn fences_writes(&self) -> bool {
        true
    }

    async fn delete(
        &self,
        kind: StoreKind,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(), StoreError> {
        let version =
            etag_arg(etag).map_err(|()| self.invalid(kind, key, etag.unwrap_or_default()))?;
        if version == 0 {
            // No ETag (or Dapr's explicit "0"): unconditional.
            let mut cmd = redis::cmd("DEL");
            write_key(&mut cmd, self.prefix(kind), key);
            let run = async {
                let mut conn = self.conn.clone();
                cmd.query_async::<()>(&mut conn).await
            };
            return match tokio::time::timeout(self.timeout, run).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.redis_failed(kind, "delete", key, &e)),
                Err(_) => Err(self.failed(
                    kind,
                    "delete",
                    key,
                    format!("no answer within {:?}", self.timeout),
                )),
            };
        }
        let mut cmd = evalsha(&self.delete, 1);
        write_key(&mut cmd, self.prefix(kind), key);
        cmd.arg(version);
        let reply = self
            .eval(&self.delete, &cmd)
            .await
            .map_err(|e| self.eval_failed(kind, "delete", key, e))?;
        match reply {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(self.conflict(kind, key)),
            _ => Err(self.failed(
                kind,
                "delete",
                key,
                "unexpected reply to the delete script".to_owned(),
            )),
        }
    }

    fn update_checks_existence(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let run = async {
            let mut conn = self.conn.clone();
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        let what = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => describe(&e, &self.redact),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        Err(StoreError::Failed {
            store: format!("{}, {}", self.public_name, self.private_name),
            operation: "ping Redis at",
            key: self.endpoint.clone(),
            message: what,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing_names_host_and_port_and_collects_the_password() {
        let p = parse_url("redis://:s%40cret@db.example:6380/2").unwrap();
        assert_eq!(p.endpoint, "db.example:6380");
        assert_eq!(p.secrets, vec!["s%40cret".to_owned(), "s@cret".to_owned()]);

        let p = parse_url("redis://user:pw@[::1]:7000").unwrap();
        assert_eq!(p.endpoint, "[::1]:7000");
        assert_eq!(p.secrets, vec!["pw".to_owned()]);

        let p = parse_url("redis://localhost").unwrap();
        assert_eq!(p.endpoint, "localhost:6379");
        assert!(p.secrets.is_empty());
    }

    #[test]
    fn url_errors_never_repeat_the_url() {
        for url in [
            "hunter2",
            "http://:hunter2@host:1",
            "redis://:hunter2@host:notaport",
            "redis://:hunter2@",
        ] {
            let err = parse_url(url).err().unwrap();
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }

    #[test]
    fn scrub_removes_every_secret() {
        let secrets = vec!["pw1".to_owned(), "p w".to_owned()];
        assert_eq!(
            scrub("a pw1 b p w c".to_owned(), &secrets),
            "a [redacted] b [redacted] c"
        );
    }

    #[test]
    fn key_prefixes_follow_daprs_rules() {
        assert_eq!(KeyPrefix::parse("none"), Ok(KeyPrefix::Bare));
        assert_eq!(KeyPrefix::parse("NONE"), Ok(KeyPrefix::Bare));
        assert_eq!(
            KeyPrefix::parse("Plugins"),
            Ok(KeyPrefix::Fixed("plugins".into()))
        );
        for strategy in ["appid", "AppID", "name", "namespace"] {
            let err = KeyPrefix::parse(strategy).expect_err(strategy);
            assert!(err.contains("strategy"), "{err}");
        }
        assert!(KeyPrefix::parse("").is_err());
        assert!(KeyPrefix::parse("a||b").is_err());
    }

    #[test]
    fn connected_replicas_reads_info_replication() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=x\r\n";
        assert_eq!(connected_replicas(info), 2);
        assert_eq!(connected_replicas("# Replication\r\nrole:slave\r\n"), 0);
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }
}
