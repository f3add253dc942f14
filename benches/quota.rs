//! Quota efficiency under 10× oversubscription: the proxy (one instance, and three sharing
//! one Redis) against the retry recipe from SmartLead's error-handling guide (the guide
//! recipe), on the same simulated SmartLead in the same run; then the proxy against a
//! SmartLead with three windows at once, as its plans have; then one bulk client and
//! twenty interactive ones sharing a quota, served fairly and (for comparison) as one
//! first-come first-served line.
//!
//! `cargo bench --bench quota` (BENCH_SECONDS, default 30, sets the length of each run).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use smartlead_proxy::Settings;
use smartlead_proxy::config::LimitBackend;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::time::Instant;

const KEY: &str = "bench-key";
const QUOTA: u32 = 20;
const PERIOD: Duration = Duration::from_secs(2);
/// Offered load: each of these wants one request per PERIOD, 10× the quota.
const WORKERS: usize = 10 * QUOTA as usize;

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    waits: Vec<Duration>,
}

struct Report {
    name: String,
    goodput: f64,
    upstream_429: usize,
    failed: usize,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn start_proxy(sim: &Sim, redis_key: Option<&str>) -> std::net::SocketAddr {
    start_proxy_with(sim, redis_key, |s| s.limit.one_window(QUOTA, PERIOD)).await
}

async fn start_proxy_with(
    sim: &Sim,
    redis_key: Option<&str>,
    quota: impl FnOnce(&mut Settings),
) -> std::net::SocketAddr {
    let mut s = Settings::default();
    s.upstream.base_url = sim.base_url().parse().unwrap();
    s.upstream.api_key = Some(ApiKey::new(KEY));
    s.limit.margin = Duration::from_millis(20);
    quota(&mut s);
    s.limit.max_wait = Duration::from_secs(60);
    s.log.level = "warn".into();
    if let Some(k) = redis_key {
        s.limit.backend = LimitBackend::Redis;
        s.redis.key = k.to_owned();
    }
    s.validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(smartlead_proxy::run(listener, s, std::future::pending()));
    addr
}

/// The SmartLead guide's client: up to 3 retries, `2^attempt + uniform(0,1)` s, at least
/// `Retry-After`.
async fn guide_request(c: &reqwest::Client, url: &str) -> bool {
    for attempt in 0..=3u32 {
        let resp = c.get(url).send().await;
        let retry_after = match resp {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) if [429, 500, 502, 503].contains(&r.status().as_u16()) => r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                .unwrap_or(0.0),
            _ => return false,
        };
        if attempt == 3 {
            break;
        }
        let backoff = 2f64.powi(attempt as i32 + 1) + rand::random::<f64>();
        tokio::time::sleep(Duration::from_secs_f64(backoff.max(retry_after))).await;
    }
    false
}

/// The offered load and what the quota allows of it.
struct Load {
    workers: usize,
    /// Each worker wants one request this often.
    every: Duration,
    /// Upstream starts the quota allows in the run.
    possible: f64,
}

async fn run(name: &str, targets: Vec<String>, guide: bool, sim: &Sim, seconds: u64) -> Report {
    let load = Load {
        workers: WORKERS,
        every: PERIOD,
        possible: QUOTA as f64 * (seconds as f64 / PERIOD.as_secs_f64()),
    };
    run_load(name, targets, guide, sim, seconds, load).await
}

async fn run_load(
    name: &str,
    targets: Vec<String>,
    guide: bool,
    sim: &Sim,
    seconds: u64,
    load: Load,
) -> Report {
    sim.reset();
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(load.workers)
        .build()
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    let (workers, every) = (load.workers, load.every);
    for w in 0..workers {
        let (c, tally) = (c.clone(), tally.clone());
        let url = targets[w % targets.len()].clone();
        tasks.push(tokio::spawn(async move {
            // Spread the first requests over one period, then one per period each.
            let mut next = start + every.mul_f64(w as f64 / workers as f64);
            while next < end {
                tokio::time::sleep_until(next).await;
                let sent = Instant::now();
                let ok = if guide {
                    guide_request(&c, &url).await
                } else {
                    c.get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                };
                let mut t = tally.lock().unwrap();
                if ok {
                    t.ok += 1;
                    t.waits.push(sent.elapsed());
                } else {
                    t.failed += 1;
                }
                next = (next + every).max(Instant::now());
            }
        }));
    }
    // No new requests after `end`; the ones under way finish (or fail) and are counted.
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(90), t).await;
    }
    let served = sim
        .requests()
        .iter()
        .filter(|r| !r.rate_limited && r.at < end)
        .count();
    let possible = load.possible;
    let t = tally.lock().unwrap();
    let mut waits = t.waits.clone();
    waits.sort();
    Report {
        name: name.to_owned(),
        goodput: 100.0 * served as f64 / possible,
        upstream_429: sim.stats().rate_limited,
        failed: t.failed,
        p50: percentile(&waits, 0.5),
        p99: percentile(&waits, 0.99),
    }
}

/// A simulated SmartLead enforcing one window of `requests` per `period`.
async fn one_window_sim(requests: u32, period: Duration) -> Sim {
    Sim::start(SimConfig {
        api_key: Some(KEY.into()),
        requests,
        period,
        latency: Duration::from_millis(5),
        record: true,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("quota bench: skipped (run it with `cargo bench --bench quota`)");
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let sim = one_window_sim(QUOTA, PERIOD).await;
    println!(
        "quota {QUOTA} per {}s, {WORKERS} workers each wanting 1 request per {}s (10x), {seconds}s per run\n",
        PERIOD.as_secs(),
        PERIOD.as_secs()
    );
    let one = start_proxy(&sim, None).await;
    let key = format!("bench-{}", uuid::Uuid::new_v4());
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(start_proxy(&sim, Some(&key)).await);
    }
    let url = |a: &std::net::SocketAddr| format!("http://{a}/api/v1/campaigns");
    let reports = vec![
        run(
            "guide recipe, direct",
            vec![format!("{}/campaigns?api_key={KEY}", sim.base_url())],
            true,
            &sim,
            seconds,
        )
        .await,
        run("1 proxy (local)", vec![url(&one)], false, &sim, seconds).await,
        run(
            "3 proxies, 1 Redis",
            three.iter().map(url).collect(),
            false,
            &sim,
            seconds,
        )
        .await,
    ];
    println!(
        "{:<22} {:>10} {:>13} {:>14} {:>9} {:>9}",
        "", "goodput", "upstream 429", "client errors", "p50", "p99"
    );
    for r in &reports {
        println!(
            "{:<22} {:>9.1}% {:>13} {:>14} {:>8.2}s {:>8.2}s",
            r.name,
            r.goodput,
            r.upstream_429,
            r.failed,
            r.p50.as_secs_f64(),
            r.p99.as_secs_f64()
        );
    }
    let guide = &reports[0];
    for r in &reports[1..] {
        println!(
            "\n{} vs guide recipe: goodput {:.2}x, upstream 429s {} vs {}, client errors {} vs {}",
            r.name,
            r.goodput / guide.goodput.max(0.1),
            r.upstream_429,
            guide.upstream_429,
            r.failed,
            guide.failed
        );
    }
    three_windows(seconds).await;
    mixed().await;
}

/// The mixed run's quota: one window of this many per second.
const MIXED_RATE: u32 = 100;
const MIXED_WINDOW: Duration = Duration::from_secs(1);
/// A hundred requests leave at each window's edge: the margin covers the spread of their
/// arrival on a loaded 2-core machine.
const MIXED_MARGIN: Duration = Duration::from_millis(150);
const BULK: usize = 1000;
const INTERACTIVE: usize = 20;
const EACH: usize = 5;

/// How a mixed run went.
struct Mixed {
    /// From the first bulk request to its last answer.
    bulk_done: Duration,
    bulk_failed: usize,
    /// Upstream starts over what the window allowed while bulk had requests waiting.
    goodput: f64,
    interactive: Vec<Duration>,
    interactive_failed: usize,
    upstream_429: usize,
}

/// One bulk client queues `BULK` requests at once on `bulk_to`; meanwhile (unless `alone`)
/// twenty interactive clients each send `EACH`, one after another, a second apart, spread
/// over `interactive_to`. With `fifo` the interactive ones say they are the bulk client:
/// one line, first come first served.
async fn mixed_run(
    sim: &Sim,
    bulk_to: std::net::SocketAddr,
    interactive_to: &[std::net::SocketAddr],
    alone: bool,
    fifo: bool,
) -> Mixed {
    // The previous run's last slots still hold the window: start once they are out of it.
    tokio::time::sleep(MIXED_WINDOW + MIXED_MARGIN + Duration::from_millis(100)).await;
    sim.reset();
    let url = format!("http://{bulk_to}/api/v1/campaigns");
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(BULK + INTERACTIVE)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let start = Instant::now();
    let bulk: Vec<_> = (0..BULK)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.get(&url).header("x-client-id", "bulk").send().await;
                (r.is_ok_and(|r| r.status().is_success()), Instant::now())
            })
        })
        .collect();
    let interactive: Vec<_> = (0..if alone { 0 } else { INTERACTIVE })
        .map(|i| {
            let to = interactive_to[i % interactive_to.len()];
            let (c, url) = (c.clone(), format!("http://{to}/api/v1/campaigns"));
            let id = if fifo {
                "bulk".to_owned()
            } else {
                format!("ui-{i}")
            };
            tokio::spawn(async move {
                let mut waits = Vec::new();
                let mut failed = 0;
                tokio::time::sleep_until(start + Duration::from_millis(500 + 200 * i as u64)).await;
                for _ in 0..EACH {
                    let sent = Instant::now();
                    let r = c.get(&url).header("x-client-id", &id).send().await;
                    if r.is_ok_and(|r| r.status().is_success()) {
                        waits.push(sent.elapsed());
                    } else {
                        failed += 1;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                (waits, failed)
            })
        })
        .collect();
    let (mut bulk_failed, mut last) = (0, start);
    for t in bulk {
        let (ok, at) = t.await.unwrap();
        bulk_failed += usize::from(!ok);
        last = last.max(at);
    }
    let (mut waits, mut interactive_failed) = (Vec::new(), 0);
    for t in interactive {
        let (w, f) = t.await.unwrap();
        waits.extend(w);
        interactive_failed += f;
    }
    waits.sort();
    let served = sim
        .requests()
        .iter()
        .filter(|r| !r.rate_limited && r.at <= last)
        .count();
    // Starts the window allowed from the first to the last bulk answer: one window's worth
    // at once, then the rate.
    let window = MIXED_WINDOW;
    let possible = MIXED_RATE as f64 * (1.0 + (last - start).saturating_sub(window).as_secs_f64());
    Mixed {
        bulk_done: last - start,
        bulk_failed,
        goodput: 100.0 * served as f64 / possible,
        interactive: waits,
        interactive_failed,
        upstream_429: sim.stats().rate_limited,
    }
}

/// 1 bulk client × 1,000 plus 20 interactive × 5 on a quota of 100 per second: the
/// interactive ones should wait about one window at most, the quota stay fully used.
async fn mixed() {
    let window = MIXED_WINDOW;
    let sim = one_window_sim(MIXED_RATE, window).await;
    let proxy = start_proxy_with(&sim, None, |s| {
        s.limit.one_window(MIXED_RATE, window);
        s.limit.margin = MIXED_MARGIN;
    })
    .await;
    println!(
        "\nmixed: 1 bulk client x {BULK} (all at once) + {INTERACTIVE} interactive x {EACH} (1 per second each), quota {MIXED_RATE}/1s"
    );
    println!(
        "{:<22} {:>10} {:>9} {:>7} {:>16} {:>16} {:>13}",
        "", "bulk done", "goodput", "errors", "interactive p50", "interactive p99", "upstream 429"
    );
    // The fleet: bulk on A, the interactive clients over B and C, one Redis.
    let key = format!("bench-mixed-{}", uuid::Uuid::new_v4());
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(
            start_proxy_with(&sim, Some(&key), |s| {
                s.limit.one_window(MIXED_RATE, window);
                s.limit.margin = MIXED_MARGIN;
            })
            .await,
        );
    }
    let runs = [
        ("bulk alone", proxy, vec![proxy], true, false),
        ("mixed, fair", proxy, vec![proxy], false, false),
        ("mixed, one FIFO line", proxy, vec![proxy], false, true),
        (
            "3 on Redis, bulk alone",
            fleet[0],
            vec![fleet[0]],
            true,
            false,
        ),
        (
            "3 on Redis, mixed",
            fleet[0],
            fleet[1..].to_vec(),
            false,
            false,
        ),
    ];
    let mut results = Vec::new();
    for (name, bulk_to, interactive_to, alone, fifo) in runs {
        let m = mixed_run(&sim, bulk_to, &interactive_to, alone, fifo).await;
        let p = |q: f64| {
            if m.interactive.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}s", percentile(&m.interactive, q).as_secs_f64())
            }
        };
        println!(
            "{name:<22} {:>9.2}s {:>8.1}% {:>7} {:>16} {:>16} {:>13}",
            m.bulk_done.as_secs_f64(),
            m.goodput,
            m.bulk_failed + m.interactive_failed,
            p(0.5),
            p(0.99),
            m.upstream_429
        );
        results.push(m);
    }
    let (alone, fair) = (&results[0], &results[1]);
    let p99 = percentile(&fair.interactive, 0.99);
    println!(
        "interactive p99 / window: {:.2} (target <= 1.2); goodput mixed/alone: {:.2}; FIFO p99 / window: {:.2}",
        p99.as_secs_f64() / window.as_secs_f64(),
        fair.goodput / alone.goodput.max(0.1),
        percentile(&results[2].interactive, 0.99).as_secs_f64() / window.as_secs_f64()
    );
    let (alone, mixed) = (&results[3], &results[4]);
    println!(
        "3 on Redis: interactive p99 / window: {:.2} (target <= 1.5); bulk goodput mixed/alone: {:.2}",
        percentile(&mixed.interactive, 0.99).as_secs_f64() / window.as_secs_f64(),
        mixed.goodput / alone.goodput.max(0.1),
    );
    let mut trips = std::collections::BTreeMap::<String, f64>::new();
    for p in &fleet {
        let text = reqwest::get(format!("http://{p}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with("smartlead_proxy_fleet_"))
        {
            if let Some((name, value)) = line.rsplit_once(' ') {
                *trips.entry(name.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    for path in ["fast", "queued"] {
        let of = |metric: &str| {
            trips
                .get(&format!(
                    "smartlead_proxy_fleet_{metric}_total{{path=\"{path}\"}}"
                ))
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "3 on Redis, {path} path: {:.0} requests, {:.0} Redis round trips, {:.2} per request",
            of("requests"),
            of("round_trips"),
            of("round_trips") / of("requests").max(1.0)
        );
    }
}

/// SmartLead's plans hold several limits at once; scaled down: 4 per second, 12 per 5 s,
/// 30 per 15 s (a sustained 2 per second), against 10× that demand.
async fn three_windows(seconds: u64) {
    let windows = [
        (4, Duration::from_secs(1)),
        (12, Duration::from_secs(5)),
        (30, Duration::from_secs(15)),
    ];
    let sim = Sim::start(SimConfig {
        api_key: Some(KEY.into()),
        windows: windows.to_vec(),
        latency: Duration::from_millis(5),
        record: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = start_proxy_with(&sim, None, |s| {
        s.limit.windows = windows
            .iter()
            .map(|(n, p)| smartlead_proxy::config::Window::new(*n, *p))
            .collect();
    })
    .await;
    // The tightest window's sustained rate is what the upstream can take.
    let tightest = windows
        .iter()
        .map(|(n, p)| *n as f64 / p.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    let load = Load {
        workers: 40,
        every: Duration::from_secs(2),
        possible: tightest * seconds as f64,
    };
    let url = format!("http://{proxy}/api/v1/campaigns");
    let r = run_load("1 proxy, 3 windows", vec![url], false, &sim, seconds, load).await;
    println!(
        "\nthree windows at once (4/1s, 12/5s, 30/15s), 40 workers each wanting 1 request per 2s (10x)"
    );
    println!(
        "{:<22} {:>9.1}% {:>13} {:>14} {:>8.2}s {:>8.2}s   (goodput: of the tightest window's rate, {tightest:.1}/s)",
        r.name,
        r.goodput,
        r.upstream_429,
        r.failed,
        r.p50.as_secs_f64(),
        r.p99.as_secs_f64()
    );
}
