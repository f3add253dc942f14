//! Allocations per proxied request (target: at most 20). The proxy runs in this process
//! on one serving thread behind a counting allocator; the simulated SmartLead runs as a
//! separate process, and the client's own allocations are not counted. Logs are off, as
//! in the throughput benchmark.
//!
//! `cargo bench --bench allocs`

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the client's thread: its allocations are not the proxy's.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { tikv_jemallocator::Jemalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) }
    }
}

fn count(bytes: usize) {
    if !UNCOUNTED.try_with(Cell::get).unwrap_or(true) {
        let n = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed) && n.is_multiple_of(7) {
            trace(bytes);
        }
    }
}

/// `ALLOC_TRACE=1`: where a sample of the measured allocations come from.
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TRACES: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());

fn trace(bytes: usize) {
    UNCOUNTED.with(|u| u.set(true));
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<String> = bt
        .lines()
        .filter(|l| !l.trim_start().starts_with("at "))
        .map(|l| l.split(": ").nth(1).unwrap_or("").to_owned())
        .filter(|f| {
            !f.contains("alloc::")
                && !f.contains("allocs::")
                && !f.contains("std::backtrace")
                && !f.starts_with("__rust")
                && !f.contains("RawVec")
                && !f.is_empty()
        })
        .take(4)
        .collect();
    TRACES.lock().unwrap().push((bytes, frames.join(" < ")));
    UNCOUNTED.with(|u| u.set(false));
}

fn report_traces() {
    let traces = TRACES.lock().unwrap();
    let mut by: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    for (bytes, frames) in traces.iter() {
        let e = by.entry(frames.as_str()).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    let total = traces.len().max(1);
    for (frames, (n, bytes)) in rows.iter().take(40) {
        println!(
            "{:5.1}% {:6} B/each  {}",
            100.0 * *n as f64 / total as f64,
            bytes / n,
            frames
        );
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const WARMUP: usize = 2_000;
const MEASURED: usize = 20_000;
const CONNECTIONS: usize = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {port}");
}

/// Sends `n` keep-alive GETs over `conns`, round-robin, each answer read whole.
fn send(conns: &mut [std::net::TcpStream], n: usize) {
    let request = b"GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..n {
        let c = &mut conns[i % conns.len()];
        c.write_all(request).unwrap();
        let mut got = 0;
        loop {
            let read = c.read(&mut buf[got..]).unwrap();
            assert!(read > 0, "connection closed");
            got += read;
            if let Some(end) = complete(&buf[..got]) {
                assert!(
                    buf.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&buf[..end])
                );
                break;
            }
        }
    }
}

/// The length of one whole answer (content-length framed), if it has all arrived.
fn complete(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end])
        .ok()?
        .to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("allocs bench: skipped (run it with `cargo bench --bench allocs`)");
        return;
    }
    UNCOUNTED.with(|u| u.set(true));
    let sim_port = free_port();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_smartlead-proxy"))
        .args([
            "simulate",
            "--port",
            &sim_port.to_string(),
            "--api-key",
            "",
            "--requests",
            "0",
            "--no-record",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sim_port);

    let mut settings = smartlead_proxy::Settings::default();
    settings.upstream.base_url = format!("http://127.0.0.1:{sim_port}/api/v1")
        .parse()
        .unwrap();
    settings.upstream.api_key = Some(smartlead_proxy::key::ApiKey::new("bench"));
    settings
        .limit
        .one_window(4_000_000_000, Duration::from_secs(1));
    settings.server.workers = 1;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        UNCOUNTED.with(|u| u.set(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            smartlead_proxy::run(listener, settings, std::future::pending())
                .await
                .unwrap();
        });
    });
    wait_for(port);

    let mut conns: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_nodelay(true).unwrap();
            c
        })
        .collect();
    send(&mut conns, WARMUP);
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    );
    TRACING.store(std::env::var_os("ALLOC_TRACE").is_some(), Ordering::SeqCst);
    send(&mut conns, MEASURED);
    TRACING.store(false, Ordering::SeqCst);
    let (a1, b1) = (
        ALLOCATIONS.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    );
    let per = (a1 - a0) as f64 / MEASURED as f64;
    let bytes = (b1 - b0) as f64 / MEASURED as f64;
    println!("allocations per proxied request: {per:>6.1} (target <= 20), {bytes:>7.0} bytes");
    if std::env::var_os("ALLOC_TRACE").is_some() {
        report_traces();
    }
    let _ = sim.kill();
    let _ = sim.wait();
}
