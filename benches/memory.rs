//! Memory: the proxy binary's RSS idle, and with 9,000 requests waiting in its queue,
//! against the floor of the stack itself measured in the same run: a bare hyper HTTP/1
//! server (same allocator) holding the same 9,000 requests without answering, built
//! against hyper as published (`STOCK_FLOOR`, bench/floor; bench/run builds it) and
//! against the repository's patched hyper (this bench binary run again). `PROXY_BINS` adds other builds to compare. nginx's
//! `limit_req` holding the same requests is reported as a reference when nginx is
//! installed.
//!
//! `cargo bench --bench memory` (raise `ulimit -n` above 20,000 first; bench/run does).

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::{Command, Stdio};
use std::time::Duration;

use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::io::AsyncWriteExt;

const WAITING: usize = 9_000;

fn rss_kib(pid: u32) -> u64 {
    // A process that is gone (or a kernel thread) counts nothing.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn queued(addr: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Summed over its labels (by account, then by priority too, in newer builds).
    text.lines()
        .filter(|l| l.starts_with("smartlead_proxy_limiter_queue_depth"))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// The floor: hyper's HTTP/1 server on one thread, every request left pending.
fn bare_hyper(addr: &str) {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| {
                    std::future::pending::<
                        Result<
                            hyper::Response<http_body_util::Empty<bytes::Bytes>>,
                            std::convert::Infallible,
                        >,
                    >()
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Opens `n` connections to `addr`, each sending one request; returns them (open).
async fn send_waiting(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(mut s) => {
                let req = format!("GET /api/v1/campaigns?n={i} HTTP/1.1\r\nHost: x\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                conns.push(s);
            }
            Err(e) => {
                eprintln!("stopped at {i} connections: {e} (raise ulimit -n)");
                break;
            }
        }
    }
    conns
}

async fn wait_listening(addr: &str) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// RSS (KiB, summed over `pids()`) idle, then with `WAITING` requests sent to `addr`.
/// With no queue to watch, the second is read once the RSS stops growing.
async fn idle_and_held(addr: &str, pids: impl Fn() -> Vec<u32>) -> (u64, u64) {
    let rss = || pids().into_iter().map(rss_kib).sum::<u64>();
    let idle = rss();
    let conns = send_waiting(addr, WAITING).await;
    let mut last = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rss();
        if now == last {
            break;
        }
        last = now;
    }
    drop(conns);
    (idle, last)
}

/// RSS of a bare hyper server: idle, then with `WAITING` pending requests. `stock` is
/// one built against hyper as published (bench/floor, its path in `STOCK_FLOOR`);
/// without it, this bench binary, whose hyper is the repository's patched one.
async fn floor(stock: Option<&str>) -> (u64, u64) {
    let addr = free_addr();
    let mut command = match stock {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.arg("--bare-hyper");
            c
        }
    };
    let mut child = command.arg(&addr).stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    wait_listening(&addr).await;
    let measured = idle_and_held(&addr, || vec![pid]).await;
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// The reference: nginx (all its processes) with `limit_req` delaying the same requests
/// (one per minute, a burst of 20,000 allowed to wait), in front of `upstream`. `None`
/// when nginx is not installed.
async fn nginx_limit_req(upstream: &str) -> Option<(u64, u64)> {
    let dir = std::env::temp_dir().join(format!("memory-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let addr = free_addr();
    let upstream = upstream.trim_start_matches("http://");
    let upstream = upstream.split('/').next().unwrap_or(upstream);
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\nworker_rlimit_nofile 65536;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{ worker_connections 30000; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}; proxy_temp_path {d};\n\
         fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         limit_req_zone $server_name zone=quota:1m rate=1r/m;\n\
         server {{\n    listen {addr};\n    location /api/v1/ {{\n\
         limit_req zone=quota burst=20000;\n      proxy_pass http://{upstream};\n    }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).ok()?;
    let started = Command::new("nginx")
        .args(["-c", &dir.join("nginx.conf").display().to_string()])
        .stderr(Stdio::null())
        .status();
    if !matches!(started, Ok(s) if s.success()) {
        let _ = std::fs::remove_dir_all(&dir);
        return None;
    }
    wait_listening(&addr).await;
    let master: u32 = std::fs::read_to_string(dir.join("nginx.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let measured = idle_and_held(&addr, || process_tree(master)).await;
    let _ = Command::new("kill").arg(master.to_string()).status();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Some(measured)
}

/// `root` and its children.
fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent is the second field after the command, which is in parentheses.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(root) {
            pids.push(pid);
        }
    }
    pids
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bare-hyper") {
        bare_hyper(&args[i + 1]);
        return;
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

/// Settings added to a proxy's environment.
type Settings = &'static [(&'static str, &'static str)];

/// RSS of one proxy binary: idle, and with `WAITING` requests in its queue; `env` adds
/// settings.
async fn proxy_rss(bin: &str, upstream: &str, env: Settings) -> (u64, u64, f64) {
    let addr = free_addr();
    // Run outside the repository: an older binary may not know every key of today's
    // config/default.toml.
    let mut child = Command::new(bin)
        .current_dir(std::env::temp_dir())
        .env("SMARTLEAD_API_KEY", "bench")
        .env("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", upstream)
        .env("SMARTLEAD_PROXY__SERVER__LISTEN", &addr)
        // One slot every 6 s: 10,000 waiting fit within a day's max_wait (the longest
        // allowed), and only a few are served while the RSS is read.
        .env("SMARTLEAD_PROXY__LIMIT__REQUESTS", "1")
        .env("SMARTLEAD_PROXY__LIMIT__PERIOD", "6s")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", "24h")
        .env("SMARTLEAD_PROXY__LIMIT__MAX_QUEUE", "20000")
        .env("SMARTLEAD_PROXY__LOG__LEVEL", "warn")
        .envs(env.iter().copied())
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
    let conns = send_waiting(&addr, WAITING).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let wanted = conns.len().saturating_sub(20) as f64;
    while queued(&addr).await < wanted && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting = queued(&addr).await;
    let loaded = rss_kib(pid);
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
    (idle, loaded, waiting)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `PROXY_BINS="name=path ..."` measures other builds too (bench/run passes the baseline
/// it compares against); the binary built with this bench is always measured.
fn binaries() -> Vec<(String, String)> {
    let mut bins = vec![(
        "smartlead-proxy".to_owned(),
        env!("CARGO_BIN_EXE_smartlead-proxy").to_owned(),
    )];
    for entry in std::env::var("PROXY_BINS")
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Some((name, path)) = entry.split_once('=') {
            bins.push((name.to_owned(), path.to_owned()));
        }
    }
    bins
}

async fn bench() {
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
    // The floor the target is set against is hyper as published; the patched one (what
    // this build serves with) is shown beside it.
    let stock = std::env::var("STOCK_FLOOR").ok();
    let (bare_idle, bare_loaded) = floor(stock.as_deref()).await;
    println!(
        "{:<36} {:>9} {:>13} {:>13} {:>9}",
        "", "idle MiB", "9,000 waiting", "per waiting", "vs floor"
    );
    // Per waiting request: what holding it adds to the idle process.
    let row = |name: &str, idle: u64, loaded: u64, waiting: f64, note: String| {
        println!(
            "{:<36} {:>9.1} {:>13.1} {:>9.2} KiB {:>9.2}{note}",
            name,
            mib(idle),
            mib(loaded),
            loaded.saturating_sub(idle) as f64 / waiting.max(1.0),
            loaded as f64 / bare_loaded.max(1) as f64,
        )
    };
    let all = WAITING as f64;
    let floor_name = match stock {
        Some(_) => "bare hyper 1.12.0 (the floor)",
        None => "bare hyper, patched (floor)",
    };
    row(floor_name, bare_idle, bare_loaded, all, String::new());
    if stock.is_some() {
        let (idle, loaded) = floor(None).await;
        row("bare hyper, patched here", idle, loaded, all, String::new());
    }
    match nginx_limit_req(&sim.base_url()).await {
        Some((idle, loaded)) => row(
            "nginx limit_req (reference)",
            idle,
            loaded,
            all,
            String::new(),
        ),
        None => println!("nginx limit_req (reference): skipped, nginx is not installed"),
    }
    // This build twice: as it starts (identical GETs in flight share one upstream call, so
    // every waiting GET leads a line of its own), and with that line off.
    let mut runs: Vec<(String, String, Settings)> = Vec::new();
    for (i, (name, bin)) in binaries().into_iter().enumerate() {
        runs.push((name.clone(), bin.clone(), &[]));
        if i == 0 {
            let off: Settings = &[("SMARTLEAD_PROXY__CACHE__COALESCE", "false")];
            runs.push((format!("{name}, coalescing off"), bin, off));
        }
    }
    for (name, bin, env) in runs {
        let (idle, loaded, waiting) = proxy_rss(&bin, &sim.base_url(), env).await;
        let short = waiting < all - 20.0;
        let note = if short {
            format!("  (only {waiting:.0} waiting)")
        } else {
            String::new()
        };
        row(&name, idle, loaded, waiting, note);
    }
}
