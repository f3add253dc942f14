//! A simulated SmartLead API: the real routes' shapes, a strict sliding-window limit per
//! key, scripted faults and a record of every request. Tests, the demo and benchmarks all
//! run against it; `smartlead-proxy simulate` serves it on its own.
//!
//! Control endpoints (not rate limited, not recorded): `POST /_sim/faults` (a [`Fault`] as
//! JSON), `GET /_sim/requests`, `GET /_sim/stats`, `POST /_sim/reset`.

mod routes;
mod server;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The key accepted; `None` accepts any key, or none.
    pub api_key: Option<String>,
    /// More keys accepted besides `api_key` (several accounts), each with a quota of its own.
    pub more_keys: Vec<String>,
    /// Requests allowed per key in any sliding window of `period`; 0 for no limit. Used
    /// when `windows` is empty.
    pub requests: u32,
    pub period: Duration,
    /// Several limits per key at once (`(10, 1s), (60, 60s), ...`), as SmartLead's plans
    /// have; `x-ratelimit-*` describe the one closest to a minute.
    pub windows: Vec<(u32, Duration)>,
    /// Added before every answer.
    pub latency: Duration,
    /// Keep every request for [`Sim::requests`] (off for long benchmarks).
    pub record: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_key: Some("sim-key".into()),
            more_keys: Vec::new(),
            requests: 60,
            period: Duration::from_secs(60),
            windows: Vec::new(),
            latency: Duration::ZERO,
            record: true,
        }
    }
}

/// A scripted misbehaviour for the next matching request(s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub action: FaultAction,
    /// Only requests whose path (under `/api/v1`) starts with this; all when absent.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer with this status, body and content type.
    Respond {
        status: u16,
        #[serde(default)]
        body: String,
        #[serde(default)]
        content_type: Option<String>,
        #[serde(default)]
        headers: Vec<(String, String)>,
        /// Raw body bytes, used instead of `body` when present (e.g. gzip).
        #[serde(default)]
        bytes: Option<Vec<u8>>,
    },
    /// Never answer.
    Hang,
    /// Reset the connection (TCP RST) before any response byte.
    Reset,
    /// Wait this long, then answer normally.
    Delay { ms: u64 },
    /// Answer 200 promising a longer body, send `first`, then hang (or reset the
    /// connection when `reset`).
    Truncated {
        first: String,
        #[serde(default)]
        reset: bool,
    },
}

impl Fault {
    pub fn new(action: FaultAction) -> Self {
        Self {
            action,
            path_prefix: None,
            times: 1,
        }
    }

    pub fn respond(status: u16, content_type: Option<&str>, body: impl Into<String>) -> Self {
        Self::new(FaultAction::Respond {
            status,
            body: body.into(),
            content_type: content_type.map(str::to_owned),
            headers: Vec::new(),
            bytes: None,
        })
    }

    pub fn respond_bytes(status: u16, content_type: Option<&str>, bytes: Vec<u8>) -> Self {
        let mut fault = Self::respond(status, content_type, "");
        if let FaultAction::Respond { bytes: b, .. } = &mut fault.action {
            *b = Some(bytes);
        }
        fault
    }

    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self::respond(status, Some("application/json"), body.to_string())
    }

    pub fn html(status: u16) -> Self {
        let body = format!(
            "<html><head><title>{status} Server Error</title></head><body><h1>Oops</h1></body></html>"
        );
        Self::respond(status, Some("text/html"), body)
    }

    pub fn hang() -> Self {
        Self::new(FaultAction::Hang)
    }

    pub fn reset() -> Self {
        Self::new(FaultAction::Reset)
    }

    pub fn truncated(first: &str, reset: bool) -> Self {
        Self::new(FaultAction::Truncated {
            first: first.into(),
            reset,
        })
    }

    pub fn delay(d: Duration) -> Self {
        Self::new(FaultAction::Delay {
            ms: d.as_millis() as u64,
        })
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let FaultAction::Respond { headers, .. } = &mut self.action {
            headers.push((name.into(), value.into()));
        }
        self
    }

    pub fn on(mut self, path_prefix: &str) -> Self {
        self.path_prefix = Some(path_prefix.into());
        self
    }

    pub fn times(mut self, n: u32) -> Self {
        self.times = n;
        self
    }
}

/// One request as the simulator received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Full path, including `/api/v1`.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// True when the simulator's own limit answered 429.
    pub rate_limited: bool,
}

impl Recorded {
    /// Every `api_key` value in the query, decoded.
    pub fn api_keys(&self) -> Vec<String> {
        query_values(self.query.as_deref(), "api_key")
    }
}

pub(crate) fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// Counters for quick assertions.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct SimStats {
    pub requests: usize,
    pub rate_limited: usize,
}

#[derive(Debug)]
struct Campaign {
    id: u64,
    name: String,
    status: &'static str,
    leads: Vec<serde_json::Value>,
    emails: HashSet<String>,
}

#[derive(Debug)]
pub(crate) struct SimState {
    config: SimConfig,
    log: Mutex<Vec<Recorded>>,
    faults: Mutex<VecDeque<Fault>>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    campaigns: Mutex<BTreeMap<u64, Campaign>>,
    seen: std::sync::atomic::AtomicUsize,
    limited: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not poison the simulator for the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimState {
    fn new(config: SimConfig) -> Self {
        let campaigns = [
            (1001, "Q4 outreach"),
            (1002, "Webinar follow-up"),
            (1003, "Partners"),
        ]
        .into_iter()
        .map(|(id, name)| {
            let c = Campaign {
                id,
                name: name.into(),
                status: "ACTIVE",
                leads: Vec::new(),
                emails: HashSet::new(),
            };
            (id, c)
        })
        .collect();
        Self {
            config,
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            windows: Mutex::new(HashMap::new()),
            campaigns: Mutex::new(campaigns),
            seen: Default::default(),
            limited: Default::default(),
        }
    }

    fn take_fault(&self, api_path: &str) -> Option<FaultAction> {
        let mut faults = lock(&self.faults);
        let idx = faults.iter().position(|f| {
            f.path_prefix
                .as_deref()
                .is_none_or(|p| api_path.starts_with(p))
        })?;
        let fault = &mut faults[idx];
        let action = fault.action.clone();
        fault.times = fault.times.saturating_sub(1);
        if fault.times == 0 {
            faults.remove(idx);
        }
        Some(action)
    }

    /// The windows enforced per key: `windows`, else `requests` per `period` (none when
    /// `requests` is 0).
    pub(crate) fn limits(&self) -> Vec<(u32, Duration)> {
        if !self.config.windows.is_empty() {
            return self.config.windows.clone();
        }
        if self.config.requests == 0 {
            return Vec::new();
        }
        vec![(self.config.requests, self.config.period)]
    }

    /// The window the `x-ratelimit-*` headers describe: the one closest to a minute.
    pub(crate) fn described(&self) -> Option<(u32, Duration)> {
        self.limits()
            .into_iter()
            .min_by_key(|(_, p)| p.abs_diff(Duration::from_secs(60)))
    }

    pub(crate) fn key_ok(&self, key: &str) -> bool {
        match &self.config.api_key {
            Some(k) => k == key || self.config.more_keys.iter().any(|m| m == key),
            None => true,
        }
    }

    /// Strict sliding windows, every one at once: Ok((remaining, reset)) of the described
    /// window when admitted, Err(retry_after) when not.
    fn admit(&self, key: &str, now: Instant) -> Result<(u32, Duration), Duration> {
        let limits = self.limits();
        let Some(described) = self.described() else {
            return Ok((u32::MAX, Duration::ZERO));
        };
        let longest = limits.iter().map(|(_, p)| *p).max().unwrap_or_default();
        let mut windows = lock(&self.windows);
        let starts = windows.entry(key.to_owned()).or_default();
        while starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= longest)
        {
            starts.pop_front();
        }
        // Starts within `period` of now, and the oldest of them.
        let within = |starts: &VecDeque<Instant>, period: Duration| {
            let first = starts.partition_point(|t| now.duration_since(*t) >= period);
            (starts.len() - first, starts.get(first).copied())
        };
        let mut wait = Duration::ZERO;
        for (n, period) in &limits {
            let (count, _) = within(starts, *period);
            if count >= *n as usize {
                let edge = starts[starts.len() - *n as usize] + *period;
                wait = wait.max(edge.saturating_duration_since(now));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        starts.push_back(now);
        let (n, period) = described;
        let (count, oldest) = within(starts, period);
        let reset = oldest.map_or(Duration::ZERO, |t| {
            (t + period).saturating_duration_since(now)
        });
        Ok((n.saturating_sub(count as u32), reset))
    }
}

/// A running simulator; dropping it stops the server and resets its connections.
pub struct Sim {
    addr: SocketAddr,
    state: Arc<SimState>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Sim {
    /// Starts on an ephemeral port of 127.0.0.1.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: SimConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState::new(config));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(server::serve(
            listener,
            routes::router(state.clone()),
            stop_rx,
        ));
        Ok(Self {
            addr,
            state,
            _stop: stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What a proxy's `upstream.base_url` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    pub fn push_fault(&self, fault: Fault) {
        lock(&self.state.faults).push_back(fault);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.log).clone()
    }

    pub fn stats(&self) -> SimStats {
        stats(&self.state)
    }

    /// A cheap, `'static` handle on the counters (for progress displays).
    pub fn shared(&self) -> SimCounters {
        SimCounters(self.state.clone())
    }

    /// Forgets recorded requests, faults and rate windows (campaigns stay).
    pub fn reset(&self) {
        reset(&self.state);
    }
}

/// The simulator's counters, shareable across tasks.
#[derive(Clone)]
pub struct SimCounters(Arc<SimState>);

impl SimCounters {
    pub fn stats(&self) -> SimStats {
        stats(&self.0)
    }
}

fn stats(state: &SimState) -> SimStats {
    use std::sync::atomic::Ordering::Relaxed;
    SimStats {
        requests: state.seen.load(Relaxed),
        rate_limited: state.limited.load(Relaxed),
    }
}

fn reset(state: &SimState) {
    use std::sync::atomic::Ordering::Relaxed;
    state.seen.store(0, Relaxed);
    state.limited.store(0, Relaxed);
    lock(&state.log).clear();
    lock(&state.faults).clear();
    lock(&state.windows).clear();
}
