//! The settings' types, their defaults and how each is read and shown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub limit: LimitSettings,
    pub accounts: Vec<AccountSettings>,
    pub redis: RedisSettings,
    pub retry: RetrySettings,
    pub leads: LeadsSettings,
    pub cache: CacheSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    #[serde(deserialize_with = "whole")]
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(serialize_with = "hidden_tokens")]
    pub access_tokens: Vec<SecretString>,
    /// A client must send its request head, and each part of its body, within this.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Threads serving connections, each with its own event loop and upstream pool;
    /// 0 means one per CPU core.
    #[serde(deserialize_with = "whole")]
    pub workers: usize,
    /// Request bodies held in memory at once (waiting ones included); past it, new
    /// requests with bodies get 503.
    #[serde(deserialize_with = "whole")]
    pub max_buffered_bytes: usize,
    /// `/status` and `/status.json` need an access token.
    pub status_requires_token: bool,
    /// Open client connections at most; 0: derived from the file limit at start.
    #[serde(deserialize_with = "whole")]
    pub max_connections: usize,
    /// A request body must arrive whole within this, however slowly it trickles.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl ServerSettings {
    /// `workers`, with 0 resolved to the number of CPU cores.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            max_body_bytes: 10 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            access_tokens: Vec::new(),
            client_timeout: Duration::from_secs(10),
            workers: 0,
            max_buffered_bytes: 256 * 1024 * 1024,
            status_requires_token: false,
            max_connections: 0,
            body_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    pub base_url: BaseUrl,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub allow_client_key: bool,
    /// Usually left unset in files: `SMARTLEAD_API_KEY` fills it.
    #[serde(serialize_with = "hidden_key")]
    pub api_key: Option<ApiKey>,
    /// Extra PEM roots trusted for the upstream besides the built-in ones (a
    /// TLS-inspecting corporate proxy's CA).
    #[serde(deserialize_with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    /// An egress HTTP proxy reached with CONNECT; unset, `HTTPS_PROXY`/`NO_PROXY` decide.
    #[serde(deserialize_with = "empty_is_none", serialize_with = "masked_opt_url")]
    pub proxy: Option<String>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            base_url: BaseUrl::parse(DEFAULT_BASE_URL).expect("the default base URL parses"),
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            allow_client_key: false,
            api_key: None,
            ca_file: None,
            proxy: None,
        }
    }
}

/// `upstream.base_url`, parsed when the configuration is read and split once, so every
/// target keeps its scheme and authority.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BaseUrl {
    scheme: String,
    authority: String,
    /// Without a trailing slash.
    path: String,
}

impl BaseUrl {
    /// Errors show the URL with its credentials and query values masked ([`shown::url`]).
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = shown::url(url);
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{shown} is not a URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            _ => return Err(format!("{shown} must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{shown} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{shown} must not contain credentials"));
        }
        if uri.query().is_some() {
            return Err(format!(
                "{shown} must not have a query (the key goes in SMARTLEAD_API_KEY)"
            ));
        }
        Ok(Self {
            scheme,
            authority: authority.as_str().to_owned(),
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The base path, without a trailing slash (`/api/v1`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl TryFrom<String> for BaseUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl std::str::FromStr for BaseUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitBackend {
    Local,
    Redis,
}

/// One quota window: at most `requests` upstream requests start in any sliding window of
/// `period`, written `"N/duration"` (`"60/60s"`, `"1000/1h"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Window {
    pub requests: u32,
    pub period: Duration,
    /// As it was written, to name the window in answers and logs.
    label: String,
}

impl Window {
    pub fn new(requests: u32, period: Duration) -> Self {
        let label = format!("{requests}/{}", humantime::format_duration(period));
        Self {
            requests,
            period,
            label,
        }
    }

    /// Errors show the text only as [`quoted`] does.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let shown = quoted(text);
        let (n, d) = text
            .split_once('/')
            .ok_or_else(|| format!("{shown} is not of the form N/duration, like \"60/60s\""))?;
        let requests: u32 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            format!("{shown}: the number of requests must be a whole number above 0")
        })?;
        let period = humantime::parse_duration(d.trim())
            .map_err(|_| format!("{shown}: the part after / is not a duration (like 60s, 1h)"))?;
        if period.is_zero() || period > DAY {
            return Err(format!(
                "{shown}: the period must be above 0 and at most 1day"
            ));
        }
        Ok(Self {
            requests,
            period,
            label: text.to_owned(),
        })
    }

    /// `"60/60s"`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The longest gap between starts that keeps to this window for good.
    pub fn spacing(&self) -> Duration {
        self.period / self.requests
    }
}

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// The window SmartLead's `x-ratelimit-*` headers describe: the per-minute one, or the one
/// closest to a minute.
pub fn followed_window(windows: &[Window]) -> usize {
    let minute = Duration::from_secs(60);
    (0..windows.len())
        .min_by_key(|&i| windows[i].period.abs_diff(minute))
        .unwrap_or(0)
}

/// SmartLead's Standard plan, all three limits at once.
pub const DEFAULT_WINDOWS: [&str; 3] = ["10/1s", "60/60s", "1000/1h"];

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawLimit")]
pub struct LimitSettings {
    /// Every window enforced together: `limit.windows`, or the one window of the older
    /// `limit.requests` / `limit.period` form.
    pub windows: Vec<Window>,
    pub max_wait: Duration,
    pub max_queue: usize,
    pub margin: Duration,
    pub backend: LimitBackend,
    /// Adopt SmartLead's `x-ratelimit-limit` for the per-minute window when it is smaller.
    pub follow_upstream: bool,
    /// With `upstream.allow_client_key`: most client-key quotas held at once.
    pub max_client_keys: usize,
    /// A governor cap per client (`limit.per_client`), checked before any queueing.
    pub per_client: Option<Window>,
    /// Fair-share weights by client (default 1).
    pub client_weights: HashMap<String, u32>,
    /// Most requests of one client waiting in an account's line (default `max_queue`).
    pub max_queue_per_client: usize,
    /// Honour `X-Priority`.
    pub allow_priority: bool,
    /// When non-empty, only these clients may use `X-Priority: high`.
    pub high_priority_clients: Vec<String>,
}

/// Most windows one account may have: each is kept, checked and shown per request.
pub const MAX_WINDOWS: usize = 16;

/// The largest weight `limit.client_weights` accepts: a turn is split into this many.
pub const MAX_CLIENT_WEIGHT: u32 = 1000;

impl LimitSettings {
    /// The quota as one window, as the older form gives it.
    pub fn one_window(&mut self, requests: u32, period: Duration) {
        self.windows = vec![Window::new(requests, period)];
    }

    /// The longest window's period.
    pub fn longest(&self) -> Duration {
        self.windows
            .iter()
            .map(|w| w.period)
            .max()
            .unwrap_or_default()
    }

    pub(super) fn check(&self) -> Result<(), ConfigError> {
        check_windows("limit.windows", &self.windows)
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        RawLimit::default()
            .try_into()
            .expect("the default limit settings are valid")
    }
}

impl Serialize for LimitSettings {
    /// As `[limit]` is written, in its `windows` form.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Shown<'a> {
            windows: &'a [Window],
            #[serde(with = "humantime_serde")]
            max_wait: Duration,
            max_queue: usize,
            #[serde(with = "humantime_serde")]
            margin: Duration,
            backend: LimitBackend,
            follow_upstream: bool,
            max_client_keys: usize,
            per_client: String,
            client_weights: std::collections::BTreeMap<&'a str, u32>,
            max_queue_per_client: usize,
            allow_priority: bool,
            high_priority_clients: &'a [String],
        }
        Shown {
            windows: &self.windows,
            max_wait: self.max_wait,
            max_queue: self.max_queue,
            margin: self.margin,
            backend: self.backend,
            follow_upstream: self.follow_upstream,
            max_client_keys: self.max_client_keys,
            per_client: self
                .per_client
                .as_ref()
                .map_or_else(|| "off".to_owned(), Window::to_string),
            client_weights: self
                .client_weights
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect(),
            max_queue_per_client: self.max_queue_per_client,
            allow_priority: self.allow_priority,
            high_priority_clients: &self.high_priority_clients,
        }
        .serialize(s)
    }
}

/// `[limit]` as written; both forms of the quota are accepted, never together.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLimit {
    windows: Option<Vec<Window>>,
    #[serde(deserialize_with = "whole_opt")]
    requests: Option<u32>,
    #[serde(with = "humantime_serde::option")]
    period: Option<Duration>,
    #[serde(with = "humantime_serde")]
    max_wait: Duration,
    #[serde(deserialize_with = "whole")]
    max_queue: usize,
    #[serde(with = "humantime_serde")]
    margin: Duration,
    #[serde(deserialize_with = "by_name")]
    backend: LimitBackend,
    follow_upstream: bool,
    #[serde(deserialize_with = "whole")]
    max_client_keys: usize,
    per_client: String,
    #[serde(deserialize_with = "whole_map")]
    client_weights: HashMap<String, u32>,
    #[serde(deserialize_with = "whole_opt")]
    max_queue_per_client: Option<usize>,
    allow_priority: bool,
    high_priority_clients: Vec<String>,
}

impl Default for RawLimit {
    fn default() -> Self {
        Self {
            windows: None,
            requests: None,
            period: None,
            max_wait: Duration::from_secs(30),
            max_queue: 10_000,
            margin: Duration::from_millis(50),
            backend: LimitBackend::Local,
            follow_upstream: false,
            max_client_keys: 1000,
            per_client: String::new(),
            client_weights: HashMap::new(),
            max_queue_per_client: None,
            allow_priority: true,
            high_priority_clients: Vec::new(),
        }
    }
}

/// The quota's windows from either form (`limit.windows`, or the older
/// `limit.requests`/`limit.period`), the defaults when neither is set.
fn raw_windows(
    windows: Option<Vec<Window>>,
    requests: Option<u32>,
    period: Option<Duration>,
) -> Result<Vec<Window>, String> {
    let older = requests.is_some() || period.is_some();
    match (windows, older) {
        (Some(_), true) => Err(
            "limit.windows and limit.requests/limit.period are two forms \
                                of the same quota: set one of them, not both"
                .into(),
        ),
        (Some(windows), false) => Ok(windows),
        (None, true) => {
            let requests = requests.unwrap_or(60);
            if requests == 0 {
                return Err("limit.requests must be at least 1".into());
            }
            let period = period.unwrap_or(Duration::from_secs(60));
            if period.is_zero() || period > DAY {
                return Err("limit.period must be above 0 and at most 1day".into());
            }
            Ok(vec![Window::new(requests, period)])
        }
        (None, false) => Ok(DEFAULT_WINDOWS
            .iter()
            .map(|w| Window::parse(w).expect("the default windows parse"))
            .collect()),
    }
}

/// `limit.client_weights` and `limit.high_priority_clients` name real client ids, and
/// each weight is in range.
fn check_clients(weights: &HashMap<String, u32>, high: &[String]) -> Result<(), String> {
    for (client, weight) in weights {
        if !crate::client::valid_client_id(client) {
            return Err(format!(
                "limit.client_weights: {} is not a client id (1-64 of A-Z a-z 0-9 . _ : -)",
                quoted(client)
            ));
        }
        if !(1..=MAX_CLIENT_WEIGHT).contains(weight) {
            return Err(format!(
                "limit.client_weights: the weight of {} must be 1 to {MAX_CLIENT_WEIGHT}",
                quoted(client)
            ));
        }
    }
    if let Some(bad) = high.iter().find(|c| !crate::client::valid_client_id(c)) {
        return Err(format!(
            "limit.high_priority_clients: {} is not a client id (1-64 of A-Z a-z 0-9 . _ : -)",
            quoted(bad)
        ));
    }
    Ok(())
}

impl TryFrom<RawLimit> for LimitSettings {
    type Error = String;

    fn try_from(mut raw: RawLimit) -> Result<Self, String> {
        let windows = raw_windows(raw.windows.take(), raw.requests, raw.period)?;
        let per_client = match raw.per_client.trim() {
            "" | "off" => None,
            text => Some(Window::parse(text).map_err(|e| format!("limit.per_client: {e}"))?),
        };
        check_clients(&raw.client_weights, &raw.high_priority_clients)?;
        // Checked here, before the per-client share that follows it, so the error names
        // the key that was set.
        if raw.max_queue == 0 {
            return Err("limit.max_queue must be at least 1".into());
        }
        let max_queue_per_client = raw.max_queue_per_client.unwrap_or(raw.max_queue);
        if max_queue_per_client == 0 {
            return Err("limit.max_queue_per_client must be at least 1".into());
        }
        Ok(Self {
            windows,
            max_wait: raw.max_wait,
            max_queue: raw.max_queue,
            margin: raw.margin,
            backend: raw.backend,
            follow_upstream: raw.follow_upstream,
            max_client_keys: raw.max_client_keys,
            per_client,
            client_weights: raw.client_weights,
            max_queue_per_client,
            allow_priority: raw.allow_priority,
            high_priority_clients: raw.high_priority_clients,
        })
    }
}

/// One more SmartLead account (`[[accounts]]`): its own key, quota and tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    /// `[a-z0-9_-]{1,32}`; shown in logs, metrics, status and errors.
    pub name: String,
    /// The environment variable holding the account's key (the only place it comes from).
    pub key_env: String,
    /// Its quota; `limit.windows` when absent.
    #[serde(default)]
    pub windows: Option<Vec<Window>>,
    /// Access tokens whose requests use this account.
    #[serde(default, serialize_with = "hidden_tokens")]
    pub tokens: Vec<SecretString>,
    /// Read from `key_env` when the configuration is loaded.
    #[serde(skip)]
    pub key: Option<ApiKey>,
}

/// The account `SMARTLEAD_API_KEY` is for.
pub const DEFAULT_ACCOUNT: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    Local,
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// May carry a password, so it is kept secret like the API key.
    #[serde(serialize_with = "masked_url")]
    pub url: SecretString,
    #[serde(deserialize_with = "by_name")]
    pub mode: RedisMode,
    /// Sentinel mode: the monitored master's name.
    pub master_name: String,
    /// Extra PEM roots for `rediss://`.
    #[serde(deserialize_with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    pub key: String,
    #[serde(deserialize_with = "by_name")]
    pub on_error: OnRedisError,
    /// An instance's registration expires this long after it last renewed it (it died).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

/// How `redis.url` is read: one server, a cluster's seed nodes, or sentinels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379"),
            mode: RedisMode::Standalone,
            master_name: String::new(),
            ca_file: None,
            key: "smartlead-proxy".into(),
            on_error: OnRedisError::Local,
            lease: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(deserialize_with = "whole")]
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    #[serde(deserialize_with = "whole_vec")]
    pub statuses: Vec<u16>,
    pub idempotent_posts: Vec<String>,
    /// Retries may be at most this share of requests over `budget_window`...
    pub budget_ratio: f64,
    /// ...but this many are always allowed per window.
    #[serde(deserialize_with = "whole")]
    pub budget_min_retries: u32,
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            statuses: vec![429, 500, 502, 503, 504],
            idempotent_posts: vec!["/campaigns/*/leads".into()],
            budget_ratio: 0.2,
            budget_min_retries: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeadsSettings {
    pub validate: bool,
    #[serde(deserialize_with = "whole")]
    pub max_per_request: usize,
    pub auto_batch: bool,
    /// Personalisation fields whose absence is reported in `X-Lead-Warnings`.
    pub warn_missing: Vec<String>,
}

impl Default for LeadsSettings {
    fn default() -> Self {
        Self {
            validate: true,
            max_per_request: 400,
            auto_batch: false,
            warn_missing: vec!["first_name".into(), "company_name".into()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    #[serde(deserialize_with = "by_name")]
    pub format: LogFormat,
    pub level: String,
    pub bodies: bool,
    #[serde(deserialize_with = "whole")]
    pub body_bytes: usize,
    /// Lets a request turn the traffic log on for itself with `X-Debug-Log: 1`.
    pub allow_debug_header: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
            bodies: false,
            body_bytes: 500,
            allow_debug_header: false,
        }
    }
}

/// `""` (the documented "unset") as `None`.
pub(super) fn empty_is_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    let s = String::deserialize(d)?;
    Ok((!s.trim().is_empty()).then(|| T::from(s)))
}

/// An enum read from its name. serde's own error for an unknown name lists the names it
/// could be; the value itself is shown as [`quoted`] shows any (it may be a key pasted
/// into the wrong setting).
fn by_name<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::{Error, IntoDeserializer, value};
    let name = String::deserialize(d)?;
    T::deserialize(IntoDeserializer::<value::Error>::into_deserializer(
        name.as_str(),
    ))
    .map_err(|e| {
        let e = e.to_string();
        let names = e
            .split_once(", expected ")
            .map_or("another name", |(_, n)| n);
        D::Error::custom(format!("expected {names}, not {}", quoted(&name)))
    })
}
