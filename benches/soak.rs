//! Soak: mixed traffic through the proxy binary (shared Redis limiter) for SOAK_SECONDS
//! (default 600), with faults injected every few seconds: upstream 5xx bursts, resets,
//! hangs, 429s, and a Redis restart. Prints requests sent and answered, answers by
//! status, the largest number of upstream requests seen in any quota window, and the
//! proxy's RSS at start and end.
//!
//! `cargo bench --bench soak` (bench/soak runs it).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smartlead_proxy::sim::{Fault, Sim, SimConfig};
use tokio::time::Instant;

const QUOTA: u32 = 20;
const PERIOD: Duration = Duration::from_secs(1);
const WORKERS: usize = 40;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis(port: u16) -> Kill {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    std::thread::sleep(Duration::from_millis(300));
    Kill(child)
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: skipped (run it with `cargo bench --bench soak` or bench/soak)");
        return;
    }
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let sim = Sim::start(SimConfig {
        api_key: Some("soak".into()),
        requests: QUOTA,
        period: PERIOD,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let redis_port = free_port();
    let mut redis_proc = Some(redis(redis_port));
    let port = free_port();
    let proxy = Command::new(env!("CARGO_BIN_EXE_smartlead-proxy"))
        .env("SMARTLEAD_API_KEY", "soak")
        .env("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", sim.base_url())
        .env("SMARTLEAD_PROXY__UPSTREAM__TIMEOUT", "2s")
        .env(
            "SMARTLEAD_PROXY__SERVER__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("SMARTLEAD_PROXY__LIMIT__REQUESTS", QUOTA.to_string())
        .env("SMARTLEAD_PROXY__LIMIT__PERIOD", "1s")
        .env("SMARTLEAD_PROXY__LIMIT__MARGIN", "100ms")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", "5s")
        .env("SMARTLEAD_PROXY__LIMIT__BACKEND", "redis")
        .env(
            "SMARTLEAD_PROXY__REDIS__URL",
            format!("redis://127.0.0.1:{redis_port}"),
        )
        .env("SMARTLEAD_PROXY__RETRY__BASE_DELAY", "100ms")
        .env("SMARTLEAD_PROXY__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = proxy.id();
    let _proxy = Kill(proxy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = rss_mib(pid);
    let base = format!("http://127.0.0.1:{port}/api/v1");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let tally: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, tally, sent, base) = (client.clone(), tally.clone(), sent.clone(), base.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < end {
                    i += 1;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let req = match i % 4 {
                        0 => client
                            .post(format!("{base}/campaigns/1001/leads"))
                            .json(&serde_json::json!({"lead_list": [{"email": format!("w{w}-{i}@soak.io")}]})),
                        1 => client.post(format!("{base}/campaigns/create")).json(&serde_json::json!({"name": "s"})),
                        _ => client.get(format!("{base}/campaigns")),
                    };
                    let key = match req.send().await {
                        Ok(r) => {
                            let s = r.status().as_u16().to_string();
                            match r.bytes().await {
                                Ok(_) => s,
                                Err(_) => format!("{s} (body cut)"),
                            }
                        }
                        Err(e) if e.is_timeout() => "client timeout".into(),
                        Err(_) => "connection error".into(),
                    };
                    *tally.lock().unwrap().entry(key).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    // Faults every few seconds, round robin; a Redis restart every 60 s.
    let mut tick = 0u64;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tick += 1;
        match tick % 5 {
            0 => sim.push_fault(Fault::html(502).times(5)),
            1 => sim.push_fault(
                Fault::json(503, serde_json::json!({"message": "maintenance"})).times(3),
            ),
            2 => sim.push_fault(Fault::reset().times(2)),
            3 => sim.push_fault(
                Fault::json(429, serde_json::json!({"message": "slow"})).header("retry-after", "1"),
            ),
            _ => sim.push_fault(Fault::hang()),
        }
        if tick % 20 == 10 {
            drop(redis_proc.take()); // killed
            tokio::time::sleep(Duration::from_secs(2)).await;
            redis_proc = Some(redis(redis_port));
        }
    }
    for w in workers {
        let _ = w.await;
    }
    drop(redis_proc);
    let rss_end = rss_mib(pid);
    let tally = tally.lock().unwrap().clone();
    let answered: usize = tally
        .iter()
        .filter(|(k, _)| k.parse::<u16>().is_ok())
        .map(|(_, v)| v)
        .sum();
    let reqs = sim.requests();
    let first = reqs.first().map(|r| r.at).unwrap_or_else(Instant::now);
    let admitted: Vec<u64> = reqs
        .iter()
        .filter(|r| !r.rate_limited)
        .map(|r| r.at.duration_since(first).as_micros() as u64)
        .collect();
    let max_window =
        smartlead_proxy::limiter::log::max_in_window(&admitted, PERIOD.as_micros() as u64);
    println!(
        "soak: {seconds}s, {WORKERS} workers, quota {QUOTA}/s, faults every 3 s, Redis restart every 60 s"
    );
    println!(
        "requests sent:        {}",
        sent.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("answered (a status):  {answered}");
    for (k, v) in &tally {
        println!("  {k:<20} {v}");
    }
    println!(
        "upstream requests:    {} ({} answered 429 by the upstream)",
        reqs.len(),
        sim.stats().rate_limited
    );
    println!(
        "max upstream starts in any {}s window: {max_window} (quota {QUOTA})",
        PERIOD.as_secs()
    );
    println!("proxy RSS start/end:  {rss_start:.1} MiB / {rss_end:.1} MiB");
}
