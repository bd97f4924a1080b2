//! Shared test support: the Dapr sidecar double, the store conformance suite and helpers
//! for running the real binary. Each integration test file includes it with `mod support;`.
//! Child processes, `redis-server` and the plugin simulator come from the
//! `keel-test-support` crate (shared with the benchmark); `redis_server` is re-exported
//! here under its old path.
#![allow(dead_code)]

pub mod binary;
pub mod conformance;
pub mod daprd;
pub mod live;
pub mod proxy;
pub mod sidecar;

pub use keel_test_support::redis_server;
