//! Memory: the proxy binary's RSS idle, and with 10,000 requests waiting in its queue
//! (target < 64 MiB). The baseline is its own idle RSS, measured in the same run.
//!
//! `cargo bench --bench memory` (raise `ulimit -n` above 20,000 first; bench/run does).

use std::process::{Command, Stdio};
use std::time::Duration;

use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::io::AsyncWriteExt;

const WAITING: usize = 10_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn queued(addr: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("smartlead_proxy_limiter_queue_depth "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("memory bench: skipped (run it with `cargo bench --bench memory`)");
        return;
    }
    let sim = Sim::start(SimConfig {
        api_key: None,
        requests: 0,
        record: false,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_smartlead-proxy"))
        .env("SMARTLEAD_API_KEY", "bench")
        .env("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", sim.base_url())
        .env("SMARTLEAD_PROXY__SERVER__LISTEN", &addr)
        .env("SMARTLEAD_PROXY__LIMIT__REQUESTS", "1")
        .env("SMARTLEAD_PROXY__LIMIT__PERIOD", "1h")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", "100000h")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_QUEUE", "20000")
        .env("SMARTLEAD_PROXY__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    for _ in 0..100 {
        if reqwest::get(format!("http://{addr}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One request through, so the upstream connection pool and TLS-free client exist.
    reqwest::get(format!("http://{addr}/api/v1/campaigns"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(pid);

    let mut conns = Vec::with_capacity(WAITING);
    for i in 0..WAITING {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(mut s) => {
                if std::env::var("IDLE_ONLY").is_err() {
                    let req = format!("GET /api/v1/campaigns?n={i} HTTP/1.1\r\nHost: x\r\n\r\n");
                    s.write_all(req.as_bytes()).await.unwrap();
                }
                conns.push(s);
            }
            Err(e) => {
                eprintln!("stopped at {i} connections: {e} (raise ulimit -n)");
                break;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    if std::env::var("IDLE_ONLY").is_ok() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("idle conns rss {} MiB", rss_kib(pid) / 1024);
    }
    while std::env::var("IDLE_ONLY").is_err()
        && queued(&addr).await < conns.len() as f64
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting = queued(&addr).await;
    let loaded = rss_kib(pid);
    let per = (loaded.saturating_sub(idle) * 1024) as f64 / waiting.max(1.0);
    println!(
        "RSS idle:                         {:>8.1} MiB",
        idle as f64 / 1024.0
    );
    println!(
        "RSS with {waiting:>6.0} waiting requests:  {:>8.1} MiB (target < 64 MiB)",
        loaded as f64 / 1024.0
    );
    println!(
        "ratio loaded/idle:                {:>8.2}",
        loaded as f64 / idle as f64
    );
    println!("per waiting request:              {:>8.0} bytes", per);
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
}
