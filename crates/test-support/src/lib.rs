//! Test support shared by keel-scraper's integration tests and its benchmark (a benchmark
//! cannot import `tests/`, so it lives in this workspace crate, never published):
//! the plugin simulator ([`sim`]).

pub mod sim;
