//! Shared test helpers: a proxy on 127.0.0.1:0 in front of a simulated SmartLead
//! (in-process here, the real binary in `binary`), private Redis servers, a test CA and
//! TLS fronts (`tls`), a hostile upstream (`hostile`) and the key-leak scanner (`leaks`).

mod binary;
mod hostile;
mod leaks;
mod tls;

pub use binary::*;
pub use hostile::*;
pub use leaks::*;
pub use tls::*;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::Settings;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const KEY: &str = "sim-key";

/// A running proxy; dropping it does not stop it, call [`Proxy::stop`].
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), smartlead_proxy::RunError>>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A GET through the proxy.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.get_with(path, &[]).await
    }

    /// A GET whose answer is JSON (any status), as a value.
    pub async fn get_json(&self, path: &str) -> Value {
        get_json(&self.url(path)).await
    }

    /// A POST of `body` as JSON: the status and the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        post_json(&self.url(path), body).await
    }

    /// A GET through the proxy with `headers`.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = client().get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("proxy did not stop within 10s")
            .expect("proxy task panicked");
        res.expect("proxy returned an error");
        // Every test's traffic is also a key-safety test of the logs.
        assert_key_not_logged();
    }
}

/// Settings pointing at `base_url` with the simulator's key and short timeouts.
pub fn settings(base_url: &str) -> Settings {
    let mut s = Settings::default();
    s.upstream.base_url = base_url.parse().expect("a valid base URL");
    s.upstream.api_key = Some(ApiKey::new(KEY));
    s.upstream.timeout = Duration::from_secs(5);
    s.upstream.connect_timeout = Duration::from_secs(1);
    s.server.shutdown_grace = Duration::from_secs(2);
    // Error-shape tests want exactly one attempt; retry tests turn retries back on.
    s.retry.max_retries = 0;
    s.retry.base_delay = Duration::from_millis(10);
    s.retry.max_delay = Duration::from_millis(200);
    s.limit.one_window(10_000, Duration::from_secs(60));
    // Tests of the quota, the line and the retries count one upstream call per request,
    // and send many identical GETs at once; tests/it/cache.rs turns coalescing back on (it
    // is on by default, as the process tests run it).
    s.cache.coalesce = false;
    s.validate().expect("test settings are valid");
    s
}

/// Every log line any in-process proxy of this test binary wrote (debug level and up).
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| LogSink)
            .try_init();
        Default::default()
    })
}

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        captured_logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log records (their fields, plus `target` and `level`) that carry
/// `request_id`.
pub fn logged(request_id: &str) -> Vec<Value> {
    let logs = captured_logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let mut fields = v.get("fields")?.clone();
            (fields["request_id"] == request_id).then(|| {
                fields["target"] = v["target"].clone();
                fields["level"] = v["level"].clone();
                fields
            })
        })
        .collect()
}

/// Everything the in-process proxies of this test binary logged so far.
pub fn captured_text() -> String {
    String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned()
}

/// Whether any captured log line contains `text`.
pub fn any_log_contains(text: &str) -> bool {
    let logs = captured_logs().lock().unwrap();
    String::from_utf8_lossy(&logs).contains(text)
}

/// Fails if the simulator's key or the hostile upstream's, in any form a reader could
/// decode back, is in any captured log line.
pub fn assert_key_not_logged() {
    // Each check reads only the whole lines written since the last one.
    static CHECKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let logs = captured_logs().lock().unwrap();
    let from = CHECKED
        .load(std::sync::atomic::Ordering::SeqCst)
        .min(logs.len());
    let to = logs[from..]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(from, |i| from + i + 1);
    let text = String::from_utf8_lossy(&logs[from..to]);
    for key in [KEY, HOSTILE_KEY] {
        assert_no_key(&text, key, "the logs");
    }
    CHECKED.store(to, std::sync::atomic::Ordering::SeqCst);
}

pub async fn spawn_proxy(settings: Settings) -> Proxy {
    captured_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let handle = tokio::spawn(smartlead_proxy::run(listener, settings, async {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        stop: Some(tx),
        handle,
    }
}

/// What a reloadable proxy reloads from: the test sets the next settings (or error),
/// then asks.
#[derive(Clone)]
pub struct Reload {
    next: std::sync::Arc<std::sync::Mutex<Result<Settings, String>>>,
    ask: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Reload {
    /// Reloads `settings` (validated as start-up would), and gives the proxy a moment to
    /// apply them.
    pub async fn to(&self, settings: Settings) {
        settings.validate().expect("reloaded settings are valid");
        *self.next.lock().unwrap() = Ok(settings);
        self.ask().await;
    }

    /// Reloads a configuration that fails to load with `error`.
    pub async fn failing(&self, error: &str) {
        *self.next.lock().unwrap() = Err(error.to_owned());
        self.ask().await;
    }

    async fn ask(&self) {
        self.ask.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A proxy that reloads whatever [`Reload`] is given.
pub async fn spawn_reloadable(settings: Settings) -> (Proxy, Reload) {
    captured_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let (ask, requests) = tokio::sync::mpsc::unbounded_channel();
    let next = std::sync::Arc::new(std::sync::Mutex::new(Ok(settings.clone())));
    let from = next.clone();
    let reloader = smartlead_proxy::reload::Reloader {
        requests,
        load: Box::new(move || {
            from.lock().unwrap().clone().map_err(|reason| {
                smartlead_proxy::config::ConfigError::Invalid {
                    key: "limit.windows".into(),
                    reason,
                }
            })
        }),
    };
    let handle = tokio::spawn(smartlead_proxy::run_with(
        listener,
        settings,
        async {
            let _ = rx.await;
        },
        Some(reloader),
    ));
    let proxy = Proxy {
        addr,
        stop: Some(tx),
        handle,
    };
    (proxy, Reload { next, ask })
}

/// A simulator with a generous limit, and a proxy in front of it.
pub async fn sim_and_proxy() -> (Sim, Proxy) {
    sim_and_proxy_with(|_| {}).await
}

/// The same, with the proxy's settings adjusted by `tweak`.
pub async fn sim_and_proxy_with(tweak: impl FnOnce(&mut Settings)) -> (Sim, Proxy) {
    let sim = Sim::start(SimConfig {
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = settings(&sim.base_url());
    tweak(&mut s);
    s.validate().expect("tweaked settings are valid");
    let proxy = spawn_proxy(s).await;
    (sim, proxy)
}

/// `n` GETs of `/api/v1/campaigns` at once through `proxy`; the statuses.
pub async fn campaigns_at_once(proxy: &Proxy, n: usize) -> Vec<u16> {
    let calls = (0..n).map(|_| proxy.get("/api/v1/campaigns"));
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The answer's `Retry-After`, which must be whole seconds.
pub fn retry_after(resp: &reqwest::Response) -> u64 {
    let v = resp.headers()["retry-after"].to_str().unwrap();
    v.parse()
        .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {v}"))
}

/// Asserts the response is an envelope with `status` and `code`; returns the body.
pub async fn expect_envelope(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ct.as_deref(), Some("application/json"), "content-type");
    assert!(resp.headers().contains_key("x-request-id"), "x-request-id");
    let text = resp.text().await.unwrap();
    assert!(!text.contains(KEY), "key leaked in body: {text}");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["error"]["details"].is_object(), "{body}");
    // The proxy's own and wrapped envelopes carry the request id, and then a hint too;
    // only SmartLead's conforming envelopes pass through without either.
    let details = &body["error"]["details"];
    if details.get("request_id").is_some() {
        assert!(
            details["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "no hint: {body}"
        );
    }
    body
}

/// Sends raw bytes on a fresh connection and returns everything read until close/timeout.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Settings for a proxy with a quota of `requests` per `period` on `backend`.
pub fn quota_settings(
    base_url: &str,
    requests: u32,
    period: Duration,
    redis: Option<(&str, &str)>,
) -> Settings {
    let mut s = settings(base_url);
    s.limit.one_window(requests, period);
    s.limit.max_wait = Duration::from_secs(30);
    // The margin must cover the jitter between a slot and its arrival upstream; on a
    // loaded 2-core CI machine running many tests at once that is far above the
    // production default of 50ms.
    s.limit.margin = Duration::from_millis(200);
    if let Some((url, key)) = redis {
        s.limit.backend = smartlead_proxy::config::LimitBackend::Redis;
        s.redis.url = secrecy::SecretString::from(url.to_owned());
        s.redis.key = key.to_owned();
    }
    s.validate().expect("quota settings are valid");
    s
}

/// A Redis key no other test uses.
pub fn unique_key() -> String {
    format!("test-{}", uuid::Uuid::new_v4())
}

pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// The largest number of recorded (not rate-limited) arrivals in any window of `period`.
pub fn max_in_window(sim: &Sim, period: Duration, since: Option<tokio::time::Instant>) -> usize {
    let reqs = sim.requests();
    let Some(first) = reqs.first().map(|r| r.at) else {
        return 0;
    };
    let slots: Vec<u64> = reqs
        .iter()
        .filter(|r| since.is_none_or(|s| r.at >= s))
        .map(|r| r.at.duration_since(first).as_micros() as u64)
        .collect();
    smartlead_proxy::limiter::log::max_in_window(&slots, period.as_micros() as u64)
}

/// `redis-server <before> --port <port>` on loopback, without persistence, then
/// `<after>` (a config file, as Sentinel needs, goes in `before`: it must come first).
pub fn spawn_redis(before: &[&str], port: u16, after: &[&str]) -> std::process::Child {
    std::process::Command::new("redis-server")
        .args(before)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .args(after)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (.ci/run installs it)")
}

/// A private `redis-server` on a free port, killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Self {
        let port = closed_port().await;
        let mut r = Self {
            port,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart().await;
        r
    }

    /// A TLS-only server (no plain port) with `ca`'s server certificate.
    pub async fn start_tls(ca: &TestCa) -> Self {
        let port = closed_port().await;
        let path = |p: &std::path::Path| p.display().to_string();
        let mut r = Self {
            port,
            child: None,
            extra: vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                path(&ca.cert),
                "--tls-key-file".into(),
                path(&ca.key),
                "--tls-ca-cert-file".into(),
                path(&ca.ca),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        // Later arguments win: `extra` may replace the plain port.
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let child = spawn_redis(&[], self.port, &extra);
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status();
        assert!(sent.unwrap().success());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw upstream that answers every connection with `reply` after reading the request,
/// then resets the connection (`reset`) or keeps it open a moment.
pub async fn raw_upstream(reply: Vec<u8>, reset: bool) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&reply).await;
                if reset {
                    let _ = s.set_zero_linger();
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    });
    addr
}

/// The `c` tag of each request SmartLead saw, in the order it saw them.
pub fn seen_order(sim: &Sim) -> Vec<String> {
    sim.requests()
        .iter()
        .map(|r| {
            r.query
                .as_deref()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("c=")))
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// For a test that must have the process to itself (it installs the global log
/// subscriber, or measures the process's peak RSS): in the suite's process this runs
/// the test binary again with only `test` (its full path, `module::name`), checks that
/// it passed and returns false; in that child it returns true, and the test goes on.
pub fn own_process(test: &str) -> bool {
    const CHILD: &str = "SMARTLEAD_PROXY_TEST_CHILD";
    if std::env::var(CHILD).is_ok_and(|t| t == test) {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} in its own process: {}\n{text}",
        out.status
    );
    false
}

/// Held by the tests that load the machine (thousands of connections, minutes of
/// saturation, memory measured in the process) and by the ones that need its full speed
/// to keep their goodput or their timing (the fleet line's model counts starts per
/// 200 ms): with the whole suite in one binary they would otherwise run
/// side by side on a 2-core machine. Ordinary tests run beside any of them, as before.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// [`heavy`] from a blocking thread: a headless browser takes both cores while it starts.
pub fn heavy_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A GET of `url` whose answer is JSON (any status), as a value.
pub async fn get_json(url: &str) -> Value {
    let resp = client().get(url).send().await.unwrap();
    resp.json().await.expect("a JSON answer")
}

/// A POST of `body` as JSON to `url`: the status and the JSON answer.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let resp = client().post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("a JSON answer"))
}
