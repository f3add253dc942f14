//! Load: 10,000 concurrent clients against a small quota, through the real binary. Every
//! client gets an answer (a slot, or a 429 at once), memory stays bounded and every file
//! descriptor comes back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 10_000;

fn proc_value(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Kills the child process however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn one(addr: std::net::SocketAddr, i: usize) -> u16 {
    let connect = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    let Ok(Ok(mut s)) = connect else { return 0 };
    let req =
        format!("GET /api/v1/campaigns?i={i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    if read.is_err() {
        return 1; // hung
    }
    let text = String::from_utf8_lossy(&out);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_all_get_an_answer() {
    let _heavy = crate::support::heavy().await;
    let sim = Sim::start(SimConfig {
        api_key: None,
        requests: 0,
        record: false,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let port = crate::support::closed_port().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smartlead-proxy"))
        .env_clear()
        .env("SMARTLEAD_API_KEY", "load-key")
        .env("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", sim.base_url())
        .env("SMARTLEAD_PROXY__SERVER__LISTEN", addr.to_string())
        .env("SMARTLEAD_PROXY__LIMIT__REQUESTS", "200")
        .env("SMARTLEAD_PROXY__LIMIT__PERIOD", "1s")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", "2s")
        .env("SMARTLEAD_PROXY__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _child = KillOnDrop(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(one(addr, 0).await, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fds_before = fds(pid);

    let started = Instant::now();
    let statuses = join_all((1..=CLIENTS).map(|i| tokio::spawn(one(addr, i)))).await;
    let statuses: Vec<u16> = statuses.into_iter().map(|r| r.unwrap()).collect();
    let elapsed = started.elapsed();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let peak_rss_kib = proc_value(pid, "status", "VmHWM:");
    assert_eq!(
        ok + limited,
        CLIENTS,
        "every client got 200 or 429: {:?}",
        {
            let mut other: Vec<_> = statuses
                .iter()
                .filter(|s| **s != 200 && **s != 429)
                .collect();
            other.dedup();
            other.into_iter().take(10).collect::<Vec<_>>()
        }
    );
    // 200 per second over a 2 s max_wait: roughly 400-600 slots, the rest refused at once.
    assert!(ok >= 300, "{ok} succeeded");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(
        peak_rss_kib < 512 * 1024,
        "peak RSS {} MiB",
        peak_rss_kib / 1024
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    // What remains is at most the pool of idle upstream connections.
    let allowed = fds_before + smartlead_proxy::upstream::POOL_MAX_IDLE + 5;
    while fds(pid) > allowed {
        assert!(
            Instant::now() < deadline,
            "fd leak: {} before, {} now",
            fds_before,
            fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(one(addr, 0).await, 200, "still serving");
}
