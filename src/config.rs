//! Typed settings: layered loading (defaults → files → env) and one-time validation.
//!
//! Every key and default here is fixed by `shared/DESIGN.md`; unknown keys are rejected so
//! a typo in a file or an environment variable is a start-up error, not a silent default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::key::{ApiKey, Secrets};

mod cache;
mod whole;

pub use cache::{CacheSettings, Pattern};

use crate::shown;
pub use crate::shown::{mask_userinfo, quoted};
use whole::{whole, whole_map, whole_opt, whole_vec};

/// The file read (when present) after the built-in defaults.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";
/// Prefix of `SMARTLEAD_PROXY__<SECTION>__<KEY>` overrides.
pub const ENV_PREFIX: &str = "SMARTLEAD_PROXY";
/// The conventional variable holding the SmartLead key; it wins over every other layer.
pub const API_KEY_VAR: &str = "SMARTLEAD_API_KEY";

/// SmartLead's API, where requests go unless `upstream.base_url` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://server.smartlead.ai/api/v1";

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "server.access_tokens",
    "limit.windows",
    "retry.statuses",
    "retry.idempotent_posts",
    "leads.warn_missing",
];

/// A start-up configuration problem, always printed as one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    /// The same error with every secret in `secrets` replaced.
    fn scrubbed(self, secrets: &Secrets) -> Self {
        let scrub = |s: String| secrets.scrub(&s).into_owned();
        match self {
            Self::Load(s) => Self::Load(scrub(s)),
            Self::Invalid { key, reason } => Self::Invalid {
                key: scrub(key),
                reason: scrub(reason),
            },
        }
    }
}

/// Windows as `key` gives them: one at least, [`MAX_WINDOWS`] at most.
fn check_windows(key: &str, windows: &[Window]) -> Result<(), ConfigError> {
    if windows.is_empty() {
        return Err(invalid(key, "at least one window is needed"));
    }
    if windows.len() > MAX_WINDOWS {
        return Err(invalid(
            key,
            format!(
                "{} windows; at most {MAX_WINDOWS} per account",
                windows.len()
            ),
        ));
    }
    Ok(())
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

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
#[serde(try_from = "String", rename_all = "lowercase")]
pub enum LimitBackend {
    Local,
    Redis,
}

impl TryFrom<String> for LimitBackend {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "local" => Ok(Self::Local),
            "redis" => Ok(Self::Redis),
            _ => Err(format!(
                "expected \"local\" or \"redis\", not {}",
                quoted(&s)
            )),
        }
    }
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

    fn check(&self) -> Result<(), ConfigError> {
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
struct RawLimit {
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

impl TryFrom<RawLimit> for LimitSettings {
    type Error = String;

    fn try_from(raw: RawLimit) -> Result<Self, String> {
        let older = raw.requests.is_some() || raw.period.is_some();
        let windows = match (raw.windows, older) {
            (Some(_), true) => {
                return Err(
                    "limit.windows and limit.requests/limit.period are two forms of \
                            the same quota: set one of them, not both"
                        .into(),
                );
            }
            (Some(windows), false) => windows,
            (None, true) => {
                let requests = raw.requests.unwrap_or(60);
                if requests == 0 {
                    return Err("limit.requests must be at least 1".into());
                }
                let period = raw.period.unwrap_or(Duration::from_secs(60));
                if period.is_zero() || period > DAY {
                    return Err("limit.period must be above 0 and at most 1day".into());
                }
                vec![Window::new(requests, period)]
            }
            (None, false) => DEFAULT_WINDOWS
                .iter()
                .map(|w| Window::parse(w).expect("the default windows parse"))
                .collect(),
        };
        let per_client = match raw.per_client.trim() {
            "" | "off" => None,
            text => Some(Window::parse(text).map_err(|e| format!("limit.per_client: {e}"))?),
        };
        for (client, weight) in &raw.client_weights {
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
        if let Some(bad) = raw
            .high_priority_clients
            .iter()
            .find(|c| !crate::client::valid_client_id(c))
        {
            return Err(format!(
                "limit.high_priority_clients: {} is not a client id (1-64 of A-Z a-z 0-9 . _ : -)",
                quoted(bad)
            ));
        }
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

fn valid_account_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", rename_all = "lowercase")]
pub enum OnRedisError {
    Local,
    Reject,
}

impl TryFrom<String> for OnRedisError {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "local" => Ok(Self::Local),
            "reject" => Ok(Self::Reject),
            _ => Err(format!(
                "expected \"local\" or \"reject\", not {}",
                quoted(&s)
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// May carry a password, so it is kept secret like the API key.
    #[serde(serialize_with = "masked_url")]
    pub url: SecretString,
    pub mode: RedisMode,
    /// Sentinel mode: the monitored master's name.
    pub master_name: String,
    /// Extra PEM roots for `rediss://`.
    #[serde(deserialize_with = "empty_is_none")]
    pub ca_file: Option<PathBuf>,
    pub key: String,
    pub on_error: OnRedisError,
    /// An instance's registration expires this long after it last renewed it (it died).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

/// How `redis.url` is read: one server, a cluster's seed nodes, or sentinels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", rename_all = "lowercase")]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

impl TryFrom<String> for RedisMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "standalone" => Ok(Self::Standalone),
            "cluster" => Ok(Self::Cluster),
            "sentinel" => Ok(Self::Sentinel),
            _ => Err(format!(
                "expected \"standalone\", \"cluster\" or \"sentinel\", not {}",
                quoted(&s)
            )),
        }
    }
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
#[serde(try_from = "String", rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err(format!(
                "expected \"json\" or \"pretty\", not {}",
                quoted(&s)
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
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

impl Settings {
    /// Loads settings from the process environment and `config/default.toml` in the
    /// working directory, then `explicit` (from `--config` / `SMARTLEAD_PROXY_CONFIG`).
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(Path::new(DEFAULT_CONFIG_FILE), explicit, &env)
    }

    /// The same layering with every input given, so tests need not touch the process.
    pub fn load_from(
        default_file: &Path,
        explicit: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let known = env_secrets(env);
        Self::load_checked(default_file, explicit, env)
            .map_err(|e| e.scrubbed(&known))
            .and_then(|s| {
                let secrets = s.secrets_and_tokens().with_all(&known);
                s.validate().map_err(|e| e.scrubbed(&secrets))?;
                Ok(s)
            })
    }

    /// The layers read and typed, not yet validated.
    fn load_checked(
        default_file: &Path,
        explicit: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(text) = read_file(default_file, false)? {
            builder = builder.add_source(text);
        }
        if let Some(path) = explicit {
            builder = builder.add_source(
                read_file(path, true)?
                    .unwrap_or_else(|| config::File::from_str("", config::FileFormat::Toml)),
            );
        }
        let prefixed: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut env_source = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(prefixed));
        for key in LIST_KEYS {
            env_source = env_source.with_list_parse_key(key);
        }
        let loaded = builder
            .add_source(env_source)
            .build()
            .map_err(|e| ConfigError::Load(shown::load_error(&e)))?;
        let mut settings: Settings = loaded
            .try_deserialize()
            .map_err(|e| ConfigError::Load(shown::load_error(&e)))?;
        if let Some(key) = env.get(API_KEY_VAR).filter(|k| !k.is_empty()) {
            settings.upstream.api_key = Some(ApiKey::new(key.clone()));
        }
        for account in &mut settings.accounts {
            // Checked by validate, which names the account and the variable.
            let key = env.get(&account.key_env).filter(|k| !k.is_empty());
            account.key = key.map(|k| ApiKey::new(k.clone()));
        }
        Ok(settings)
    }

    /// Checks every value once, so nothing fails later at request time.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be at least 1"));
        }
        if s.max_buffered_bytes < s.max_body_bytes {
            return Err(invalid(
                "server.max_buffered_bytes",
                "must be at least server.max_body_bytes",
            ));
        }
        positive("server.client_timeout", s.client_timeout)?;
        at_most("server.client_timeout", s.client_timeout, HOUR)?;
        positive("server.body_timeout", s.body_timeout)?;
        at_most("server.body_timeout", s.body_timeout, HOUR)?;
        at_most("server.shutdown_grace", s.shutdown_grace, HOUR)?;
        if s.workers > 1024 {
            return Err(invalid(
                "server.workers",
                "at most 1024 (0 means one per CPU core)",
            ));
        }
        if s.status_requires_token
            && s.access_tokens.is_empty()
            && self.accounts.iter().all(|a| a.tokens.is_empty())
        {
            return Err(invalid(
                "server.status_requires_token",
                "needs access tokens (server.access_tokens or an account's tokens)",
            ));
        }
        if s.access_tokens.iter().any(|t| t.expose_secret().is_empty()) {
            return Err(invalid("server.access_tokens", "tokens must not be empty"));
        }

        let u = &self.upstream;
        positive("upstream.timeout", u.timeout)?;
        at_most("upstream.timeout", u.timeout, HOUR)?;
        positive("upstream.connect_timeout", u.connect_timeout)?;
        at_most("upstream.connect_timeout", u.connect_timeout, 10 * MINUTE)?;
        match &u.api_key {
            Some(key) => key
                .check()
                .map_err(|reason| invalid("upstream.api_key", reason))?,
            None if !u.allow_client_key && self.accounts.is_empty() => {
                return Err(invalid(
                    "upstream.api_key",
                    format!(
                        "no API key: set {API_KEY_VAR} (or upstream.allow_client_key = true to let clients bring their own)"
                    ),
                ));
            }
            None => {}
        }

        let l = &self.limit;
        l.check()?;
        at_most("limit.max_wait", l.max_wait, DAY)?;
        at_most("limit.margin", l.margin, MINUTE)?;
        if l.max_queue == 0 {
            return Err(invalid("limit.max_queue", "must be at least 1"));
        }
        if l.max_client_keys == 0 {
            return Err(invalid("limit.max_client_keys", "must be at least 1"));
        }
        self.check_accounts()?;

        if let Some(path) = &u.ca_file {
            crate::tls::read_roots(path).map_err(|e| invalid("upstream.ca_file", e))?;
        }
        if let Some(proxy) = &u.proxy {
            check_proxy(proxy).map_err(|e| invalid("upstream.proxy", e))?;
        }
        if l.backend == LimitBackend::Redis {
            self.check_redis()?;
        }
        if !(Duration::from_millis(300)..=MINUTE).contains(&self.redis.lease) {
            return Err(invalid("redis.lease", "must be between 300ms and 1m"));
        }
        if self.redis.key.is_empty() || self.redis.key.contains(['{', '}']) {
            return Err(invalid("redis.key", "must be non-empty and without braces"));
        }

        let r = &self.retry;
        at_most("retry.base_delay", r.base_delay, HOUR)?;
        at_most("retry.max_delay", r.max_delay, HOUR)?;
        if r.base_delay > r.max_delay {
            return Err(invalid(
                "retry.base_delay",
                "must not exceed retry.max_delay",
            ));
        }
        if let Some(bad) = r.statuses.iter().find(|s| !(400..=599).contains(*s)) {
            return Err(invalid(
                "retry.statuses",
                format!("{bad} is not an HTTP error status (400-599)"),
            ));
        }
        if !(0.0..=1.0).contains(&r.budget_ratio) {
            return Err(invalid("retry.budget_ratio", "must be between 0.0 and 1.0"));
        }
        if !(1..=3600).contains(&r.budget_window.as_secs()) {
            return Err(invalid("retry.budget_window", "must be between 1s and 1h"));
        }
        if let Some(bad) = r.idempotent_posts.iter().find(|p| !p.starts_with('/')) {
            return Err(invalid(
                "retry.idempotent_posts",
                format!("{} must start with '/'", quoted(bad)),
            ));
        }

        if !(1..=400).contains(&self.leads.max_per_request) {
            return Err(invalid(
                "leads.max_per_request",
                "must be between 1 and 400",
            ));
        }
        self.cache.validate()?;
        if self.log.body_bytes > 1024 * 1024 {
            return Err(invalid("log.body_bytes", "must be at most 1048576 (1 MiB)"));
        }
        // The filter's own error quotes the text, so it is not passed on.
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|_| {
            invalid(
                "log.level",
                format!(
                    "{} is not a level or filter (like \"info\" or \"smartlead_proxy=debug\")",
                    quoted(&self.log.level)
                ),
            )
        })?;
        Ok(())
    }

    /// `[redis]` when the limiter uses it: every URL, the mode's needs, the CA file.
    fn check_redis(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        let urls: Vec<&str> = r.url.expose_secret().split(',').map(str::trim).collect();
        for url in &urls {
            if !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(invalid(
                    "redis.url",
                    format!(
                        "{} must start with redis://, rediss:// or unix://",
                        shown::url(url)
                    ),
                ));
            }
        }
        match r.mode {
            RedisMode::Standalone if urls.len() > 1 => {
                return Err(invalid(
                    "redis.url",
                    "several URLs need redis.mode = \"cluster\" or \"sentinel\"",
                ));
            }
            RedisMode::Sentinel if r.master_name.trim().is_empty() => {
                return Err(invalid(
                    "redis.master_name",
                    "sentinel mode needs the monitored master's name",
                ));
            }
            _ => {}
        }
        if let Some(path) = &r.ca_file {
            crate::tls::read_roots(path).map_err(|e| invalid("redis.ca_file", e))?;
        }
        Ok(())
    }

    /// `[[accounts]]`: names, keys and tokens.
    fn check_accounts(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        let mut tokens: std::collections::HashSet<&str> = self
            .server
            .access_tokens
            .iter()
            .map(|t| t.expose_secret())
            .collect();
        for (i, a) in self.accounts.iter().enumerate() {
            let at = |field: &str| format!("accounts[{i}].{field}");
            if !valid_account_name(&a.name) {
                return Err(invalid(
                    at("name"),
                    format!("{} must be 1-32 of a-z, 0-9, _ and -", quoted(&a.name)),
                ));
            }
            if a.name == DEFAULT_ACCOUNT {
                return Err(invalid(
                    at("name"),
                    "\"default\" is SMARTLEAD_API_KEY's account; pick another name",
                ));
            }
            if !names.insert(a.name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("{} is named twice", quoted(&a.name)),
                ));
            }
            let here = |field: &str| format!("accounts[{}].{field}", a.name);
            match &a.key {
                None => {
                    return Err(invalid(
                        here("key_env"),
                        format!(
                            "the environment variable {} that holds the account's key is not set",
                            quoted_var(&a.key_env)
                        ),
                    ));
                }
                Some(key) => key
                    .check()
                    .map_err(|reason| invalid(here("key_env"), reason))?,
            }
            if let Some(windows) = &a.windows {
                check_windows(&here("windows"), windows)?;
            }
            for t in &a.tokens {
                if t.expose_secret().is_empty() {
                    return Err(invalid(here("tokens"), "tokens must not be empty"));
                }
                if !tokens.insert(t.expose_secret()) {
                    return Err(invalid(
                        here("tokens"),
                        "a token may belong to one account only",
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`Settings::secrets`] and the access tokens: what no configuration error may show.
    fn secrets_and_tokens(&self) -> Secrets {
        let tokens = self
            .server
            .access_tokens
            .iter()
            .chain(self.accounts.iter().flat_map(|a| &a.tokens));
        tokens.fold(self.secrets(), |s, t| s.with(t.expose_secret()))
    }

    /// Every secret in these settings, to keep out of answers and logs: the API keys and
    /// the Redis password.
    pub fn secrets(&self) -> Secrets {
        let keys = self.upstream.api_key.iter();
        let secrets = Secrets::default()
            .with_keys(keys.chain(self.accounts.iter().filter_map(|a| a.key.as_ref())));
        let passwords = self
            .redis
            .url
            .expose_secret()
            .split(',')
            .chain(self.upstream.proxy.as_deref())
            .filter_map(url_password)
            .collect::<Vec<_>>();
        passwords.iter().fold(secrets, |s, p| s.with(p))
    }
}

/// Secrets the environment holds, to scrub from configuration errors before the settings
/// exist: the key, every variable named like a key, token, secret or password, and the
/// password of any URL among them.
fn env_secrets(env: &HashMap<String, String>) -> Secrets {
    let secret_name = |name: &str| {
        let upper = name.to_ascii_uppercase();
        ["KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD"]
            .iter()
            .any(|w| upper.contains(w))
            || upper == format!("{ENV_PREFIX}__REDIS__URL")
    };
    let mut secrets = Secrets::default();
    for (_, value) in env.iter().filter(|(n, _)| secret_name(n)) {
        for part in value.split(',') {
            secrets = secrets.with(part.trim());
            if let Some(p) = url_password(part) {
                secrets = secrets.with(&p);
            }
        }
    }
    secrets
}

/// An environment variable's name, as an error may show it (a name, not a value, unless
/// a value was put there).
fn quoted_var(name: &str) -> String {
    let looks_like_a_name = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if looks_like_a_name {
        format!("{name:?}")
    } else {
        quoted(name)
    }
}

/// A configuration file as a source, or `None` when an optional one is not there. A file
/// that cannot be read, or is not TOML, is named in the error; the error quotes none of
/// its lines.
fn read_file(
    path: &Path,
    required: bool,
) -> Result<Option<config::File<config::FileSourceString, config::FileFormat>>, ConfigError> {
    let shown = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
                _ => e.to_string(),
            };
            return Err(ConfigError::Load(format!(
                "config file {shown} cannot be read: {why}"
            )));
        }
    };
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(ConfigError::Load(format!(
            "config file {shown}: {}",
            shown::syntax_error(&e.to_string())
        )));
    }
    Ok(Some(config::File::from_str(
        &text,
        config::FileFormat::Toml,
    )))
}

fn url_password(url: &str) -> Option<String> {
    let url = url::Url::parse(url.trim()).ok()?;
    let raw = url.password()?;
    Some(
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

impl Settings {
    /// For a reload: every setting that only takes effect at start (the listening socket,
    /// threads, the upstream connection pools, the limiter's backend and Redis link, the
    /// log format) is put back to its `running` value; returns the keys that differed.
    pub fn keep_restart_only(&mut self, running: &Settings) -> Vec<&'static str> {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident).+) => {
                if self.$($field).+ != running.$($field).+ {
                    kept.push(stringify!($($field).+));
                    self.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!(server.listen);
        keep!(server.workers);
        keep!(server.client_timeout);
        keep!(server.shutdown_grace);
        keep!(server.max_buffered_bytes);
        keep!(server.max_connections);
        keep!(upstream.base_url);
        keep!(upstream.connect_timeout);
        keep!(upstream.ca_file);
        keep!(upstream.proxy);
        keep!(limit.backend);
        keep!(redis.mode);
        keep!(redis.master_name);
        keep!(redis.ca_file);
        keep!(redis.key);
        keep!(redis.on_error);
        keep!(redis.lease);
        keep!(cache.max_bytes);
        keep!(log.format);
        if self.redis.url.expose_secret() != running.redis.url.expose_secret() {
            kept.push("redis.url");
            self.redis.url = running.redis.url.clone();
        }
        kept
    }
}

/// An egress proxy is reached with CONNECT over plain HTTP: `http://[user:pass@]host:port`.
fn check_proxy(proxy: &str) -> Result<(), String> {
    let shown = shown::url(proxy);
    let url = url::Url::parse(proxy).map_err(|e| format!("{shown} is not a URL ({e})"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "{shown} must be an http:// proxy (it is reached with CONNECT)"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown} has no host"));
    }
    Ok(())
}

/// What `check-config` shows for a secret.
const HIDDEN: &str = "***";

fn hidden_key<S: Serializer>(key: &Option<ApiKey>, s: S) -> Result<S::Ok, S::Error> {
    match key {
        Some(_) => s.serialize_str(HIDDEN),
        None => s.serialize_none(),
    }
}

/// Tokens as `***`, or `name:***` for a named one: the name is not a secret.
fn hidden_tokens<S: Serializer>(tokens: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        tokens
            .iter()
            .map(|t| match t.expose_secret().split_once(':') {
                Some((name, _)) => format!("{name}:{HIDDEN}"),
                None => HIDDEN.to_owned(),
            }),
    )
}

fn masked_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_urls(url.expose_secret()))
}

fn masked_opt_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => s.serialize_str(&mask_userinfo(url)),
        None => s.serialize_none(),
    }
}

/// A comma-separated list of URLs (cluster nodes, sentinels), each masked.
pub fn mask_urls(urls: &str) -> String {
    urls.split(',')
        .map(mask_userinfo)
        .collect::<Vec<_>>()
        .join(",")
}

/// `""` (the documented "unset") as `None`.
fn empty_is_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    let s = String::deserialize(d)?;
    Ok((!s.trim().is_empty()).then(|| T::from(s)))
}

impl Settings {
    /// The effective settings as TOML, every key and token shown as `***` (for
    /// `check-config`), also where one was put into a setting that takes any text
    /// (`redis.key`, `log.level`).
    pub fn to_toml(&self) -> String {
        let text =
            toml::to_string(self).unwrap_or_else(|e| format!("# cannot show the settings: {e}\n"));
        self.secrets_and_tokens().scrub(&text).into_owned()
    }
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Durations past any sane value are refused at start: added to a clock they would
/// overflow, or leave requests waiting for years.
fn at_most(key: &'static str, d: Duration, max: Duration) -> Result<(), ConfigError> {
    if d > max {
        return Err(invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

fn positive(key: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)], file: Option<&str>) -> Result<Settings, ConfigError> {
        let mut env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.entry(API_KEY_VAR.into())
            .or_insert_with(|| "key".into());
        let path = file.map(|text| {
            let path =
                std::env::temp_dir().join(format!("slp-config-{}.toml", uuid::Uuid::new_v4()));
            std::fs::write(&path, text).unwrap();
            path
        });
        Settings::load_from(Path::new("/nonexistent"), path.as_deref(), &env)
    }

    fn labels(s: &Settings) -> Vec<&str> {
        s.limit.windows.iter().map(Window::label).collect()
    }

    #[test]
    fn cache_routes_come_as_a_table_or_as_text() {
        let file =
            "[cache]\nttl = { \"/campaigns\" = \"5m\", \"/campaigns/*/analytics\" = \"1m\" }\n";
        let from_file = load(&[], Some(file)).unwrap().cache.ttl;
        let env = [(
            "SMARTLEAD_PROXY__CACHE__TTL",
            "/campaigns=5m, /campaigns/*/analytics=1m",
        )];
        assert_eq!(load(&env, None).unwrap().cache.ttl, from_file);
        assert_eq!(from_file["/campaigns"], Duration::from_secs(300));
        for (bad, says) in [
            ("/campaigns=soon", "is not a duration"),
            ("campaigns=5m", "must start with '/'"),
            ("/a/**/b=5m", "'**' may only be the last segment"),
            ("/campaigns=0s", "between 1ms and 1d"),
            ("/campaigns", "is not route=duration"),
        ] {
            let err = load(&[("SMARTLEAD_PROXY__CACHE__TTL", bad)], None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cache.ttl") && err.contains(says),
                "{bad}: {err}"
            );
        }
        let err = load(&[("SMARTLEAD_PROXY__CACHE__MAX_BYTES", "10")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.max_bytes"), "{err}");
    }

    #[test]
    fn the_quota_has_two_forms_never_both() {
        assert_eq!(labels(&load(&[], None).unwrap()), DEFAULT_WINDOWS);
        let pro = [("SMARTLEAD_PROXY__LIMIT__WINDOWS", "20/1s,120/60s,3000/1h")];
        assert_eq!(
            labels(&load(&pro, None).unwrap()),
            ["20/1s", "120/60s", "3000/1h"]
        );
        let older = load(&[("SMARTLEAD_PROXY__LIMIT__REQUESTS", "5")], None).unwrap();
        assert_eq!(
            older.limit.windows,
            [Window::new(5, Duration::from_secs(60))]
        );
        let older = load(&[], Some("[limit]\nperiod = \"10s\"\n")).unwrap();
        assert_eq!(
            older.limit.windows,
            [Window::new(60, Duration::from_secs(10))]
        );
        let both = load(&pro, Some("[limit]\nrequests = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(
            both.contains("limit.windows") && both.contains("limit.requests"),
            "{both}"
        );
        for bad in ["ten/1s", "10", "0/1s", "10/2days", "10/0s"] {
            let err = load(&[("SMARTLEAD_PROXY__LIMIT__WINDOWS", bad)], None).unwrap_err();
            assert!(err.to_string().contains("limit.windows"), "{bad}: {err}");
        }
    }

    #[test]
    fn accounts_take_their_keys_from_the_environment_only() {
        let file = "[[accounts]]\nname = \"acme\"\nkey_env = \"KEY_ACME\"\nwindows = [\"5/1s\"]\ntokens = [\"t-acme\"]\n";
        let s = load(&[("KEY_ACME", "acme-key-123")], Some(file)).unwrap();
        assert_eq!(s.accounts[0].windows.as_ref().unwrap()[0].label(), "5/1s");
        assert!(s.accounts[0].key.is_some());
        assert!(
            !format!("{s:?}").contains("acme-key-123"),
            "Debug redacts the key"
        );
        let missing = load(&[], Some(file)).unwrap_err().to_string();
        assert!(
            missing.contains("accounts[acme].key_env") && missing.contains("KEY_ACME"),
            "{missing}"
        );
        let named = |name: &str| format!("[[accounts]]\nname = \"{name}\"\nkey_env = \"K\"\n");
        for bad in ["Acme", "default", "a b", ""] {
            let err = load(&[("K", "some-key-1")], Some(&named(bad)))
                .unwrap_err()
                .to_string();
            assert!(err.contains("accounts[0].name"), "{bad}: {err}");
        }
        let twice = format!("{}{}", named("x"), named("x"));
        assert!(load(&[("K", "some-key-1")], Some(&twice)).is_err());
        // With accounts, SMARTLEAD_API_KEY may be left out: there is then no default.
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("KEY_ACME".into(), "acme-key-123".into());
        let path = std::env::temp_dir().join(format!("slp-config-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, file).unwrap();
        assert!(Settings::load_from(Path::new("/nonexistent"), Some(&path), &env).is_ok());
    }

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let running = Settings::default();
        let mut next = Settings::default();
        next.server.listen = "127.0.0.1:9999".parse().unwrap();
        next.redis.url = SecretString::from("redis://elsewhere:6379");
        next.limit.max_wait = Duration::from_secs(5);
        let kept = next.keep_restart_only(&running);
        assert_eq!(kept, vec!["server.listen", "redis.url"]);
        assert_eq!(next.server.listen, running.server.listen);
        assert_eq!(
            next.redis.url.expose_secret(),
            running.redis.url.expose_secret()
        );
        assert_eq!(next.limit.max_wait, Duration::from_secs(5), "applied");
    }

    #[test]
    fn fairness_settings_are_checked() {
        let s = load(&[], None).unwrap();
        assert_eq!(s.limit.per_client, None);
        assert_eq!(s.limit.max_queue_per_client, s.limit.max_queue);
        assert!(s.limit.allow_priority);
        let file = "[limit]\nper_client = \"30/60s\"\nmax_queue = 50\nclient_weights = { UI = 4, \"batch.eu-1\" = 2 }\n";
        let s = load(&[], Some(file)).unwrap();
        let cap = s.limit.per_client.unwrap();
        assert_eq!((cap.requests, cap.period), (30, Duration::from_secs(60)));
        assert_eq!(s.limit.max_queue_per_client, 50, "follows max_queue");
        assert_eq!(
            s.limit.client_weights.get("UI"),
            Some(&4),
            "{:?}",
            s.limit.client_weights
        );
        assert_eq!(
            s.limit.client_weights.get("batch.eu-1"),
            Some(&2),
            "{:?}",
            s.limit.client_weights
        );
        let env = [("SMARTLEAD_PROXY__LIMIT__PER_CLIENT", "5/1s")];
        assert_eq!(
            load(&env, None).unwrap().limit.per_client.unwrap().requests,
            5
        );
        for bad in [
            "per_client = \"thirty\"",
            "client_weights = { ui = 0 }",
            "client_weights = { ui = 1001 }",
            "client_weights = { \"a b\" = 2 }",
            "max_queue_per_client = 0",
        ] {
            let err = load(&[], Some(&format!("[limit]\n{bad}\n")))
                .unwrap_err()
                .to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(&format!("limit.{key}")), "{bad}: {err}");
        }
    }

    /// A key as SmartLead issues them, planted where it does not belong.
    const PLANTED: &str = "0f3c9a7d-2b8e-4c61-a5f0-9e3d7b2c8a41_k2x9q7";

    /// Environment variables and a config file's text.
    type Planting = (Vec<(String, String)>, Option<String>);

    /// Every way of putting `PLANTED` into setting `section.key`: as text, in a URL's
    /// query, in a list, as a map's name, and through the environment.
    fn plantings(section: &str, key: &str) -> Vec<Planting> {
        let url = format!("https://server.smartlead.ai/api/v1?api_key={PLANTED}");
        let mut out = Vec::new();
        for value in [
            format!("{PLANTED:?}"),
            format!("{url:?}"),
            format!("[{PLANTED:?}]"),
            format!("{{ {PLANTED:?} = 1 }}"),
            format!("{{ a = {PLANTED:?} }}"),
        ] {
            let file = if section == "accounts" {
                let other = if key == "name" {
                    "key_env = \"K\""
                } else {
                    "name = \"a\""
                };
                format!("[[accounts]]\n{other}\n{key} = {value}\n")
            } else {
                format!("[{section}]\n{key} = {value}\n")
            };
            out.push((vec![], Some(file)));
        }
        if section != "accounts" {
            let var = format!(
                "SMARTLEAD_PROXY__{}__{}",
                section.to_uppercase(),
                key.to_uppercase()
            );
            out.push((vec![(var.clone(), PLANTED.to_owned())], None));
            out.push((vec![(var, url)], None));
        }
        out
    }

    #[test]
    fn no_configuration_error_shows_a_key_put_in_any_setting() {
        let defaults: toml::Table = Settings::default().to_toml().parse().unwrap();
        let mut settings: Vec<(String, String)> = defaults
            .iter()
            .filter_map(|(section, t)| Some((section, t.as_table()?)))
            .flat_map(|(section, t)| t.keys().map(move |k| (section.clone(), k.clone())))
            .collect();
        for key in ["name", "key_env", "windows", "tokens"] {
            settings.push(("accounts".into(), key.into()));
        }
        for key in ["api_key", "requests", "period", "lease"] {
            settings.push(("upstream".into(), key.into()));
            settings.push(("limit".into(), key.into()));
        }
        assert!(settings.len() > 50, "{settings:?}");
        let matcher = ApiKey::new(PLANTED).secrets();
        let mut refused = 0;
        for (section, key) in &settings {
            for (vars, file) in plantings(section, key) {
                // The environment's key is another one: the error has nothing to scrub
                // with, so it must not have shown the value in the first place.
                let mut vars: Vec<(&str, &str)> =
                    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                vars.push(("K", "another-key-entirely"));
                let Err(err) = load(&vars, file.as_deref()) else {
                    continue;
                };
                refused += 1;
                let err = err.to_string();
                assert!(
                    matches!(matcher.scrub(&err), std::borrow::Cow::Borrowed(_)),
                    "{section}.{key} ({file:?} {vars:?}): {err}"
                );
            }
        }
        assert!(refused > 200, "{refused} refused");
    }

    #[test]
    fn the_shown_settings_hold_no_key_even_in_a_free_text_setting() {
        let file = format!("[redis]\nkey = {PLANTED:?}\n[log]\nlevel = {PLANTED:?}\n");
        let s = load(&[(API_KEY_VAR, PLANTED)], Some(&file)).unwrap();
        let shown = s.to_toml();
        let matcher = ApiKey::new(PLANTED).secrets();
        assert!(
            matches!(matcher.scrub(&shown), std::borrow::Cow::Borrowed(_)),
            "{shown}"
        );
        assert!(shown.contains("[redis]"), "{shown}");
    }

    #[test]
    fn integer_settings_refuse_fractions_and_errors_name_the_key_set() {
        for (setting, value) in [
            ("server]\nmax_body_bytes", "1048576.9"),
            ("server]\nmax_body_bytes", "1e30"),
            ("limit]\nmax_queue", "0"),
            ("limit]\nmax_queue", "2.5"),
            ("retry]\nstatuses", "[429.5]"),
            ("limit]\nclient_weights", "{ ui = 1.5 }"),
            ("leads]\nmax_per_request", "-1"),
        ] {
            let err = load(&[], Some(&format!("[{setting} = {value}\n")))
                .unwrap_err()
                .to_string();
            let key = setting.replace("]\n", ".");
            assert!(err.contains(&key), "{key} = {value}: {err}");
        }
        let ok = load(&[("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", "2048")], None).unwrap();
        assert_eq!(
            ok.server.max_body_bytes, 2048,
            "whole numbers from the environment"
        );
        let ok = load(&[], Some("[server]\nmax_body_bytes = 1024.0\n")).unwrap();
        assert_eq!(
            ok.server.max_body_bytes, 1024,
            "a float with no fraction is whole"
        );
    }

    #[test]
    fn an_account_has_at_most_sixteen_windows() {
        let windows = |n: usize| {
            (1..=n)
                .map(|i| format!("\"{i}/{i}s\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(
            load(
                &[],
                Some(&format!("[limit]\nwindows = [{}]\n", windows(16)))
            )
            .is_ok()
        );
        let err = load(
            &[],
            Some(&format!("[limit]\nwindows = [{}]\n", windows(17))),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("limit.windows") && err.contains("16"), "{err}");
        let file = format!(
            "[[accounts]]\nname = \"a\"\nkey_env = \"K\"\nwindows = [{}]\n",
            windows(17)
        );
        let err = load(&[("K", "some-key-1")], Some(&file))
            .unwrap_err()
            .to_string();
        assert!(err.contains("accounts[a].windows"), "{err}");
    }

    #[test]
    fn an_unreadable_or_broken_file_is_named() {
        let dir = std::env::temp_dir().join(format!("slp-dir-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let env: HashMap<String, String> = [(API_KEY_VAR.to_owned(), "key".to_owned())].into();
        let err = Settings::load_from(Path::new("/nonexistent"), Some(&dir), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");
        let err = Settings::load_from(&dir, None, &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&dir.display().to_string()),
            "the default file too: {err}"
        );
        let broken = dir.join("broken.toml");
        std::fs::write(&broken, format!("[upstream]\nbase_url = {PLANTED}\n")).unwrap();
        let err = Settings::load_from(Path::new("/nonexistent"), Some(&broken), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.toml") && err.contains("line 2"),
            "{err}"
        );
        assert!(!err.contains(&PLANTED[..12]), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn base_url_is_checked_and_credentials_masked() {
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("https://x/api?a=1").is_err());
        assert!(BaseUrl::parse("not a url").is_err());
        let err = BaseUrl::parse("https://user:s3cret@x/api").unwrap_err();
        assert!(
            err.contains("https://***@x/api") && !err.contains("s3cret"),
            "{err}"
        );
        let err = BaseUrl::parse("ftp://user:s3cret@x/api").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let url = BaseUrl::parse("http://127.0.0.1:9/api/v1/").unwrap();
        assert_eq!(url.path(), "/api/v1");
        assert_eq!(url.to_string(), "http://127.0.0.1:9/api/v1");
    }
}
