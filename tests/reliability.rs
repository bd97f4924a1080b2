//! Reliability under faults, with real processes and a real Redis.
//!
//! Every scenario runs real `keel-scraper run` replicas (`--listen 127.0.0.1:0`, JSON
//! events on stdout read line by line), a real `redis-server` that requires a password,
//! and plugin simulators on loopback; one multi-replica run goes through the Dapr sidecar
//! double instead. What each scenario proves, and the figures it prints, are described in
//! the README (section "Reliability under faults"):
//!
//! 1. three replicas on a 1 s schedule complete every tick exactly once (and the Dapr
//!    backend does the same through the sidecar double);
//! 2. a lock holder killed with SIGKILL in the middle of a tick is taken over by another
//!    replica at the first tick after its lease expires, with no route left inconsistent
//!    (and a holder frozen with SIGSTOP, 2p, or cut off from Redis, 2n, past its lease
//!    lands nothing stale when it comes back);
//! 3. a lock holder stopped with SIGTERM hands the next tick to another replica;
//! 4. a Redis outage of 5 s ends no replica, is logged, and scraping resumes;
//! 5. a concurrent editor of `register_addons` loses no edit to the worker's rewrites;
//! 6. plugins unregistered while ticks run never get their routes back;
//! 7. hostile plugins each fail with their `error_kind`, ticks keep their deadline and
//!    memory stays bounded;
//! 8. replicas whose wall clocks differ by a third of the interval (skewed from outside
//!    with `faketime`) still scrape each tick exactly once, also (8b) with a `--lease`
//!    shorter than the interval;
//! 10. a lock holder blind to the plugins (its own path cut through a proxy) stands back,
//!     demotes nothing, and the standby scrapes within two ticks and blocks a real death.
//!
//! Security runs through all of them: registry ids built to escape the status URL are
//! never requested, and nothing any process printed contains the Redis password or the
//! Dapr API token. Property tests (scenario 9) are in `tests/properties.rs`.
//!
//! Each scenario prints its figures as `reliability|<scenario>|<figure>|<value>` on
//! standard error, visible in a plain `cargo test` run.

mod support;

#[path = "reliability/faults.rs"]
mod faults;
#[path = "reliability/figures.rs"]
mod figures;
#[path = "reliability/guard.rs"]
mod guard;
#[path = "reliability/harness.rs"]
mod harness;
#[path = "reliability/races.rs"]
mod races;
#[path = "reliability/replicas.rs"]
mod replicas;
#[path = "reliability/security.rs"]
mod security;
#[path = "reliability/world.rs"]
mod world;

/// Runs a scenario, failing it when it overstays its bound (every wait inside is bounded
/// too; this is the last line of defence). Dropping the scenario kills its processes.
pub use keel_test_support::process::bounded;
