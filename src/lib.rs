//! keel-scraper keeps tKeel plugin routes true.
//!
//! On a schedule one replica takes the `scrape_state` lease in the private store, reads the
//! plugin registry and every route, probes each plugin's `/v1/status` concurrently, decides
//! each route's status and writes the changed ones with ETag compare-and-set.
//!
//! Data flows one way: [`schedule`] -> [`lease`] -> [`registry`] -> [`route`] reads beside
//! [`probe`]s -> [`plan`] (the fleet over [`decision`]) -> fenced route writes -> release,
//! all in [`tick`]; [`events`] throughout. [`wiring`] builds the parts, [`worker`] runs
//! the commands.
//! See `ARCHITECTURE.md`.

pub mod config;
pub mod decision;
pub mod demo;
pub mod events;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod observations;
pub mod observer;
pub mod plan;
pub mod probe;
pub mod registry;
pub mod route;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod status_page;
pub mod store;
pub mod telemetry;
pub mod tick;
pub mod wiring;
pub mod worker;

/// The log filter used when neither `SCRAPER_LOG` nor `RUST_LOG` is set.
pub const DEFAULT_LOG_FILTER: &str = "info,tokio_cron_scheduler=warn";
