//! The HTTP limit: `wrk` (C, one thread) sending exactly N status GETs, one per plugin
//! path, over the same number of keep-alive connections as the worker's concurrency.
//!
//! A Lua script prepares the N requests once, cycles through them, counts answers and
//! stops the thread at the N-th; its `done` hook prints the exact duration and counts.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::procs::run_bounded;

/// One counted run.
#[derive(Clone, Copy, Debug)]
pub struct WrkRun {
    pub duration: Duration,
    pub requests: u64,
    pub errors: u64,
    /// wrk's own CPU time (user plus system).
    pub cpu: Duration,
}

impl WrkRun {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// The script for `n` plugins named by `id_format` (a Lua format with one integer from 0).
fn script(n: usize, id_format: &str) -> String {
    format!(
        r#"local n = {n}
local reqs = {{}}
local i = 0
local answered = 0
local bad = 0
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
response = function(status, headers, body)
  answered = answered + 1
  if status ~= 200 then bad = bad + 1 end
  if answered >= n then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KEEL_WRK %d %d %d\n", summary.duration, summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#
    )
}

/// Sends `n` GETs (one per plugin) at `connections` concurrency to `origin`.
pub fn counted(
    dir: &Path,
    origin: &str,
    n: usize,
    connections: usize,
    id_format: &str,
) -> Result<WrkRun> {
    let path = dir.join(format!("status-{n}.lua"));
    std::fs::write(&path, script(n, id_format)).context("write the wrk script")?;
    // -d only bounds a run that never reaches n answers; the script stops it at n.
    let (out, exited) = run_bounded(
        Command::new("wrk")
            .args(["-t1", &format!("-c{connections}"), "-d30s", "--timeout", "5s", "-s"])
            .arg(&path)
            .arg(format!("{origin}/")),
        Duration::from_secs(60),
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
