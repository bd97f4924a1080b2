use std::time::Duration;
use keel_scraper::probe::*;
use keel_scraper::sim::*;
use tokio::time::Instant;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp() {
    let sim = PluginSim::start().unwrap();
    for conc in [1usize, 4, 16, 64] {
        let p = Prober::new(ProbeSettings { concurrency: conc, ..ProbeSettings::new(sim.url_template()) }).unwrap();
        for n in [200usize, 2000, 2000] {
            sim.reset_counters();
            let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let t = Instant::now();
            p.probe_all(&ids, Instant::now() + Duration::from_secs(30)).await;
            println!("conc {conc} n {n}: new connections {} in {:?}", sim.connections(), t.elapsed());
        }
    }
}
