//! Test support shared by keel-scraper's integration tests and its benchmark (a benchmark
//! cannot import `tests/`, so it lives in this workspace crate, never published):
//!
//! * [`sim`]: the plugin simulator, a real HTTP/1.1 server on loopback with healthy and
//!   hostile behaviours;
//! * [`process`]: child processes tied to the test process, one environment policy, line
//!   readers, bounded waits, signals, kill on drop; [`process::bounded`] for test bodies;
//! * [`redis_server`]: a real `redis-server` per test on a free port.

pub mod process;
pub mod redis_server;
pub mod sim;
