//! Quota the cache saves on a dashboard workload: 20 clients poll `/campaigns` and two
//! campaigns' analytics every 2 s, through the proxy with SmartLead's default windows,
//! once with the cache off (and no coalescing) and once with the TTLs SmartLead's
//! rate-limit guide recommends (campaign lists 5 minutes, analytics 1 minute). Reports
//! upstream calls, answers and the latency clients saw. The hit throughput against nginx
//! `proxy_cache` is measured by bench/run (it needs nginx and wrk).
//!
//! `cargo bench --bench cache` (BENCH_SECONDS, default 60, sets the length of each run).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smartlead_proxy::Settings;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::time::Instant;

const KEY: &str = "bench-key";
const CLIENTS: usize = 20;
const EVERY: Duration = Duration::from_secs(2);
const PATHS: [&str; 3] = [
    "/api/v1/campaigns",
    "/api/v1/campaigns/1001/analytics",
    "/api/v1/campaigns/1002/analytics",
];

struct Report {
    name: &'static str,
    upstream: usize,
    asked: usize,
    ok: usize,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(name: &'static str, cached: bool, seconds: u64) -> Report {
    let sim = Sim::start(SimConfig {
        api_key: Some(KEY.into()),
        requests: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = Settings::default();
    s.upstream.base_url = sim.base_url().parse().unwrap();
    s.upstream.api_key = Some(ApiKey::new(KEY));
    s.log.level = "warn".into();
    s.cache.coalesce = cached;
    if cached {
        s.cache.ttl = BTreeMap::from([
            ("/campaigns".to_owned(), Duration::from_secs(300)),
            ("/campaigns/*/analytics".to_owned(), Duration::from_secs(60)),
        ]);
    }
    s.validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(smartlead_proxy::run(listener, s, std::future::pending()));
    let client = reqwest::Client::new();
    let waits = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(Mutex::new(0usize));
    let end = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (client, waits, ok) = (client.clone(), waits.clone(), ok.clone());
            tokio::spawn(async move {
                // Spread over the first period, as dashboards opened at different times.
                tokio::time::sleep(EVERY * n as u32 / CLIENTS as u32).await;
                let mut tick = tokio::time::interval(EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while Instant::now() < end {
                    tick.tick().await;
                    for path in PATHS {
                        let began = Instant::now();
                        let answered = client
                            .get(format!("http://{addr}{path}"))
                            .header("x-client-id", format!("dashboard-{n}"))
                            .send()
                            .await;
                        waits.lock().unwrap().push(began.elapsed());
                        if answered.is_ok_and(|r| r.status().is_success()) {
                            *ok.lock().unwrap() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let mut waits = waits.lock().unwrap().clone();
    waits.sort();
    let ok = *ok.lock().unwrap();
    Report {
        name,
        upstream: sim.stats().requests,
        asked: waits.len(),
        ok,
        p50: percentile(&waits, 0.5),
        p99: percentile(&waits, 0.99),
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let off = run("cache off", false, seconds).await;
    let on = run("guide TTLs", true, seconds).await;
    println!(
        "dashboard: {CLIENTS} clients poll /campaigns and 2 campaigns' analytics every {}s for {seconds}s, default windows",
        EVERY.as_secs()
    );
    println!("                 upstream calls   requests   answered 2xx   p50 ms   p99 ms");
    for r in [&off, &on] {
        println!(
            "{:<16} {:>14} {:>10} {:>14} {:>8.1} {:>8.1}",
            r.name,
            r.upstream,
            r.asked,
            r.ok,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "upstream calls with the cache / without: {:.3}; requests answered per upstream call: {:.1} with, {:.1} without",
        on.upstream as f64 / off.upstream.max(1) as f64,
        on.asked as f64 / on.upstream.max(1) as f64,
        off.asked as f64 / off.upstream.max(1) as f64
    );
}
