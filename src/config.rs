//! Typed settings: layered loading (defaults → files → env) and one-time validation.
//!
//! Every key and default here is fixed by `shared/DESIGN.md`; unknown keys are rejected so
//! a typo in a file or an environment variable is a start-up error, not a silent default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::key::{ApiKey, Secrets};

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
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub limit: LimitSettings,
    pub redis: RedisSettings,
    pub retry: RetrySettings,
    pub leads: LeadsSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub access_tokens: Vec<SecretString>,
    /// A client must send its request head, and each part of its body, within this.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Threads serving connections, each with its own event loop and upstream pool;
    /// 0 means one per CPU core.
    pub workers: usize,
    /// Request bodies held in memory at once (waiting ones included); past it, new
    /// requests with bodies get 503.
    pub max_buffered_bytes: usize,
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    pub base_url: BaseUrl,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub allow_client_key: bool,
    /// Usually left unset in files: `SMARTLEAD_API_KEY` fills it.
    pub api_key: Option<ApiKey>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            base_url: BaseUrl::parse(DEFAULT_BASE_URL).expect("the default base URL parses"),
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            allow_client_key: false,
            api_key: None,
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
    /// Errors show the URL with any credentials in it masked.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = mask_userinfo(url);
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{shown:?} is not a URL ({e})"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            _ => return Err(format!("{shown:?} must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{shown:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{shown:?} must not contain credentials"));
        }
        if uri.query().is_some() {
            return Err(format!("{shown:?} must not have a query"));
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

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path)
    }
}

/// `scheme://user:password@host/...` as `scheme://***@host/...` (any text works: it need
/// not parse).
pub fn mask_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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
            _ => Err(format!("expected \"local\" or \"redis\", got {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub requests: u32,
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    pub max_queue: usize,
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
    pub backend: LimitBackend,
    /// Adopt SmartLead's `x-ratelimit-limit` when it is smaller than `requests`.
    pub follow_upstream: bool,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            requests: 60,
            period: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            max_queue: 10_000,
            margin: Duration::from_millis(50),
            backend: LimitBackend::Local,
            follow_upstream: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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
            _ => Err(format!("expected \"local\" or \"reject\", got {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// May carry a password, so it is kept secret like the API key.
    pub url: SecretString,
    pub key: String,
    pub on_error: OnRedisError,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379"),
            key: "smartlead-proxy".into(),
            on_error: OnRedisError::Local,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    pub max_retries: u32,
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    pub statuses: Vec<u16>,
    pub idempotent_posts: Vec<String>,
    /// Retries may be at most this share of requests over `budget_window`...
    pub budget_ratio: f64,
    /// ...but this many are always allowed per window.
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

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeadsSettings {
    pub validate: bool,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
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
            _ => Err(format!("expected \"json\" or \"pretty\", got {s:?}")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    pub bodies: bool,
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
        let mut builder =
            config::Config::builder().add_source(config::File::from(default_file).required(false));
        if let Some(path) = explicit {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} is not a readable file",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(PathBuf::from(path)));
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
            .map_err(|e| ConfigError::Load(one_line(&e.to_string())))?;
        let mut settings: Settings = loaded
            .try_deserialize()
            .map_err(|e| ConfigError::Load(one_line(&e.to_string())))?;
        if let Some(key) = env.get(API_KEY_VAR).filter(|k| !k.is_empty()) {
            settings.upstream.api_key = Some(ApiKey::new(key.clone()));
        }
        settings.validate()?;
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
        at_most("server.shutdown_grace", s.shutdown_grace, HOUR)?;
        if s.workers > 1024 {
            return Err(invalid(
                "server.workers",
                "at most 1024 (0 means one per CPU core)",
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
            None if !u.allow_client_key => {
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
        if l.requests == 0 {
            return Err(invalid("limit.requests", "must be at least 1"));
        }
        positive("limit.period", l.period)?;
        at_most("limit.period", l.period, DAY)?;
        at_most("limit.max_wait", l.max_wait, DAY)?;
        at_most("limit.margin", l.margin, MINUTE)?;
        if l.max_queue == 0 {
            return Err(invalid("limit.max_queue", "must be at least 1"));
        }

        if l.backend == LimitBackend::Redis {
            let url = self.redis.url.expose_secret();
            if !["redis://", "rediss://", "unix://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(invalid(
                    "redis.url",
                    "must start with redis://, rediss:// or unix://",
                ));
            }
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
                format!("{bad:?} must start with '/'"),
            ));
        }

        if !(1..=400).contains(&self.leads.max_per_request) {
            return Err(invalid(
                "leads.max_per_request",
                "must be between 1 and 400",
            ));
        }
        if self.log.body_bytes > 1024 * 1024 {
            return Err(invalid("log.body_bytes", "must be at most 1048576 (1 MiB)"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", one_line(&e.to_string())))?;
        Ok(())
    }

    /// Every secret in these settings, to keep out of answers and logs: the API key and
    /// the Redis password.
    pub fn secrets(&self) -> Secrets {
        let secrets = Secrets::default().with_keys(self.upstream.api_key.iter());
        match redis_password(self.redis.url.expose_secret()) {
            // A very short password would blank out every word that happens to match it.
            Some(p) if p.len() >= MIN_LOGGED_SECRET => secrets.with(&p),
            _ => secrets,
        }
    }
}

/// Passwords shorter than this are not searched for in logs and answers.
const MIN_LOGGED_SECRET: usize = 6;

fn redis_password(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let raw = url.password()?;
    Some(
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
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

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

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
