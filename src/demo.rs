//! `demo`: the real worker against simulated plugins and the embedded store, with no
//! external service. Four plugins answer on a loopback HTTP server: a healthy v0 plugin, a
//! healthy v1 plugin, one that crashes midway (its connections drop) and one that answers
//! garbage. The worker ticks every second, the route table is printed before and after,
//! with every status change, and the command exits 0 by itself in under ten seconds.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};

use crate::config::Settings;
use crate::decision::Thresholds;
use crate::lease::{Lease, TickKind};
use crate::probe::{ProbeSettings, Prober};
use crate::registry::REGISTRY_KEY;
use crate::route::route_key;
use crate::store::memory::MemoryStore;
use crate::store::{Save, Store, StoreKind};
use crate::tick::{TickOutcome, Ticker};
use crate::worker::{route_table, CommandError, RouteRow};
use plugins::{Plugin, Plugins};

mod plugins;

const TICKS: usize = 6;
/// The tick after which the crashing plugin stops answering.
const CRASH_AFTER: usize = 2;

fn table(rows: &[RouteRow]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "  {:<16} {}\n",
            r.plugin_id,
            r.status.as_deref().unwrap_or("(no route)")
        ));
    }
    out
}

/// Runs the demo. Events go to the log as in `run`; the summary is printed on stdout.
pub async fn run(s: &Settings) -> Result<(), CommandError> {
    demo(s).await.map_err(CommandError::Demo)
}

/// The demo's ticker: the real tick on the embedded store, a one-second lease.
fn demo_ticker(
    s: &Settings,
    store: Arc<dyn Store>,
    url_template: String,
) -> Result<Ticker, String> {
    let prober = Prober::new(ProbeSettings {
        url_template,
        timeout: Duration::from_millis(300),
        retries: 1,
        concurrency: s.concurrency,
        dapr_api_token: None,
        sidecar_origin: None,
        dapr_invoke: false,
    })
    .map_err(|e| e.to_string())?;
    let interval = Duration::from_secs(1);
    let ticker = Ticker::new(
        store.clone(),
        Arc::new(prober),
        Arc::new(Lease::new(
            store.clone(),
            s.holder_id.clone(),
            interval,
            interval,
        )),
        Thresholds {
            unhealthy: 2,
            healthy: 1,
        },
        s.concurrency,
    );
    Ok(ticker)
}

async fn demo(s: &Settings) -> Result<(), String> {
    let sim = Plugins::start().map_err(|e| format!("cannot start the plugin simulator: {e}"))?;
    sim.set("iothub", Plugin::HealthyV0);
    sim.set("rudder", Plugin::HealthyV1);
    sim.set("console", Plugin::HealthyV0);
    sim.set("tenant-admin", Plugin::Garbage);

    let store = Arc::new(MemoryStore::new(&s.public_store, &s.private_store));
    let registry = br#"{"iothub":"true","rudder":"true","console":"true","tenant-admin":"true"}"#;
    let seed = |key: &str, data: &[u8]| {
        let store = store.clone();
        let (key, data) = (key.to_string(), data.to_vec());
        async move {
            let kind = if key == REGISTRY_KEY {
                StoreKind::Private
            } else {
                StoreKind::Public
            };
            store
                .save(kind, Save::cas(&key, &data, crate::store::ABSENT_ETAG))
                .await
                .map_err(|e| e.to_string())
        }
    };
    seed(REGISTRY_KEY, registry).await?;
    for (id, status) in [
        ("iothub", "STARTING"),
        ("rudder", "STARTING"),
        ("console", "STARTING"),
        ("tenant-admin", "ACTIVE"),
    ] {
        let route = format!(
            r#"{{"status":"{status}","tkeel_version":"v0.4.0","register_addons":{{"{id}_created":"{id}/v1/hook"}}}}"#
        );
        seed(&route_key(id), route.as_bytes()).await?;
    }

    let store_dyn: Arc<dyn Store> = store.clone();
    let ticker = demo_ticker(s, store_dyn.clone(), sim.url_template())?;

    let before = route_table(&*store_dyn).await.map_err(|e| e.to_string())?;
    let mut previous = before.clone();
    let mut changes = Vec::new();
    for n in 1..=TICKS {
        if n == CRASH_AFTER + 1 {
            sim.set("console", Plugin::Crashed);
        }
        let slot = Utc::now().trunc_subsecs(0);
        // The tick takes and releases its lease.
        if let TickOutcome::Failed(e) = ticker.tick(TickKind::Scheduled(slot)).await {
            return Err(format!("tick {n} failed: {e}"));
        }
        let now = route_table(&*store_dyn).await.map_err(|e| e.to_string())?;
        for (old, new) in previous.iter().zip(&now) {
            if old.status != new.status {
                changes.push(format!(
                    "  tick {n}: {:<16} {} -> {}",
                    new.plugin_id,
                    old.status.as_deref().unwrap_or("-"),
                    new.status.as_deref().unwrap_or("-")
                ));
            }
        }
        previous = now;
        // Sleep to the next whole second: the next scheduled slot.
        let to_next = 1000 - u64::from(Utc::now().timestamp_subsec_millis()).min(999);
        tokio::time::sleep(Duration::from_millis(to_next + 5)).await;
    }
    drop(sim);

    println!("\nkeel-scraper demo: {TICKS} ticks against 4 simulated plugins");
    println!("  iothub: healthy (v0)   rudder: healthy (v1)");
    println!("  console: crashes after tick {CRASH_AFTER}   tenant-admin: answers garbage\n");
    println!("routes before:\n{}", table(&before));
    println!(
        "status changes:\n{}",
        if changes.is_empty() {
            "  (none)\n".to_string()
        } else {
            changes.join("\n") + "\n"
        }
    );
    println!("routes after:\n{}", table(&previous));
    Ok(())
}
