//! Shared test helpers: a proxy on 127.0.0.1:0 in front of a simulated SmartLead.
#![allow(dead_code)]

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

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("proxy did not stop within 10s")
            .expect("proxy task panicked");
        res.expect("proxy returned an error");
    }
}

/// Settings pointing at `base_url` with the simulator's key and short timeouts.
pub fn settings(base_url: &str) -> Settings {
    let mut s = Settings::default();
    s.upstream.base_url = base_url.to_owned();
    s.upstream.api_key = Some(ApiKey::new(KEY));
    s.upstream.timeout = Duration::from_secs(5);
    s.upstream.connect_timeout = Duration::from_secs(1);
    s.server.shutdown_grace = Duration::from_secs(2);
    // Error-shape tests want exactly one attempt; retry tests turn retries back on.
    s.retry.max_retries = 0;
    s.retry.base_delay = Duration::from_millis(10);
    s.retry.max_delay = Duration::from_millis(200);
    s.limit.requests = 10_000;
    s.validate().expect("test settings are valid");
    s
}

pub async fn spawn_proxy(settings: Settings) -> Proxy {
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

/// A simulator with a generous limit, and a proxy in front of it.
pub async fn sim_and_proxy() -> (Sim, Proxy) {
    let sim = Sim::start(SimConfig {
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = spawn_proxy(settings(&sim.base_url())).await;
    (sim, proxy)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
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
