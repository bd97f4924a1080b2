//! The HTTP limit: `wrk` (C, one thread) at the worker's concurrency against the same
//! simulator, cycling through the N plugin paths.
//!
//! wrk runs for a fixed time, not a fixed count (its reported duration is always the
//! whole `-d`, even when a script stops a thread early), so the limit for N GETs is
//! N divided by the rate it sustained. Connection set-up is a few milliseconds of 64
//! loopback connects, which the rate leaves out and the worker's ticks include.
//!
//! The script prepares the N requests once and only hands them out (no response hook, so
//! wrk does no per-answer work in Lua); its `done` hook prints the exact counts.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_test_support::process::{Exited, Spawn};

/// One timed run.
#[derive(Clone, Copy, Debug)]
pub struct WrkRun {
    pub duration: Duration,
    pub requests: u64,
    /// Socket errors, timeouts and non-2xx answers.
    pub errors: u64,
    /// wrk's own CPU time (user plus system).
    pub cpu: Duration,
}

impl WrkRun {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    /// How long `n` requests take at this rate.
    pub fn time_for(&self, n: usize) -> Duration {
        Duration::from_secs_f64(n as f64 / self.rate().max(1e-9))
    }
}

/// The script for `n` plugins named by `id_format` (a Lua format of one integer from 0).
fn script(n: usize, id_format: &str) -> String {
    format!(
        r#"local n = {n}
local reqs = {{}}
local i = 0
init = function(args)
  for k = 0, n - 1 do
    reqs[k + 1] = wrk.format("GET", "/" .. string.format("{id_format}", k) .. "/v1/status")
  end
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KEEL_WRK %d %d %d\n", summary.duration, summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#
    )
}

/// GETs every plugin's status path in turn for `seconds`, over `connections` keep-alive
/// connections to `origin`.
pub fn timed(
    dir: &Path,
    origin: &str,
    n: usize,
    connections: usize,
    id_format: &str,
    seconds: u32,
) -> Result<WrkRun> {
    let path = dir.join(format!("status-{n}.lua"));
    std::fs::write(&path, script(n, id_format)).context("write the wrk script")?;
    let (out, exited) = run_bounded(
        Spawn::new("wrk")
            .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
            .args(["--timeout", "5s", "-s"])
            .arg(&path)
            .arg(format!("{origin}/")),
        Duration::from_secs(u64::from(seconds) + 30),
    )
    .context("wrk")?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("KEEL_WRK "))
        .with_context(|| format!("wrk printed no summary: {out}"))?;
    let mut fields = line.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(us)), Some(Ok(requests)), Some(Ok(errors))) =
        (fields.next(), fields.next(), fields.next())
    else {
        bail!("cannot read wrk's summary {line:?}");
    };
    Ok(WrkRun {
        duration: Duration::from_micros(us),
        requests,
        errors,
        cpu: exited.cpu,
    })
}

/// Runs a child to completion within `limit`, returning its stdout and how it ended
/// (stderr is added to the error when it fails).
fn run_bounded(spawn: Spawn, limit: Duration) -> Result<(String, Exited)> {
    let mut child = spawn.capture().start()?;
    let exited = child.wait_measured(Instant::now(), limit)?;
    child.join_readers();
    let stdout = child.stdout();
    if exited.code != 0 {
        bail!(
            "exit code {}: {}{}",
            exited.code,
            stdout.trim(),
            child.stderr().trim()
        );
    }
    Ok((stdout, exited))
}
