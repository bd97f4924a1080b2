//! Shared test support: real `redis-server` processes, the Dapr sidecar double and helpers
//! for running the real binary. Each integration test file includes it with `mod support;`.
#![allow(dead_code)]

pub mod binary;
pub mod conformance;
pub mod live;
pub mod proxy;
pub mod redis_server;
pub mod sidecar;
pub mod tied;
