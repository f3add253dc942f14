//! Every value checked once at start (and on reload), so nothing fails at request time;
//! each error names the key the user set.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

impl Settings {
    /// Checks every value once, so nothing fails later at request time. The sections are
    /// checked in this order, so the first error is always the same one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_server()?;
        self.check_upstream()?;
        self.check_limit()?;
        self.check_accounts()?;
        self.check_egress()?;
        self.check_fleet()?;
        self.check_retry()?;
        self.check_leads()?;
        self.cache.validate()?;
        self.check_log()
    }

    /// `[server]`: sizes, timeouts, threads and tokens.
    fn check_server(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[upstream]`: timeouts and the key (or clients bringing their own).
    fn check_upstream(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[limit]`: the windows, waits and queue sizes.
    fn check_limit(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `upstream.ca_file` and `upstream.proxy`.
    fn check_egress(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        if let Some(path) = &u.ca_file {
            crate::tls::read_roots(path).map_err(|e| invalid("upstream.ca_file", e))?;
        }
        if let Some(proxy) = &u.proxy {
            check_proxy(proxy).map_err(|e| invalid("upstream.proxy", e))?;
        }
        Ok(())
    }

    /// `[redis]`: its lease and key always (a reload may switch the backend), the rest when
    /// the limiter uses it.
    fn check_fleet(&self) -> Result<(), ConfigError> {
        if self.limit.backend == LimitBackend::Redis {
            self.check_redis()?;
        }
        if !(Duration::from_millis(300)..=MINUTE).contains(&self.redis.lease) {
            return Err(invalid("redis.lease", "must be between 300ms and 1m"));
        }
        if self.redis.key.is_empty() || self.redis.key.contains(['{', '}']) {
            return Err(invalid("redis.key", "must be non-empty and without braces"));
        }
        Ok(())
    }

    /// `[retry]`: delays, statuses, the budget and the idempotent POST paths.
    fn check_retry(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[leads]`.
    fn check_leads(&self) -> Result<(), ConfigError> {
        if !(1..=400).contains(&self.leads.max_per_request) {
            return Err(invalid(
                "leads.max_per_request",
                "must be between 1 and 400",
            ));
        }
        Ok(())
    }

    /// `[log]`: the traffic log's cut and the level filter.
    fn check_log(&self) -> Result<(), ConfigError> {
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
    pub(super) fn check_redis(&self) -> Result<(), ConfigError> {
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
    pub(super) fn check_accounts(&self) -> Result<(), ConfigError> {
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
}

/// Windows as `key` gives them: one at least, [`MAX_WINDOWS`] at most.
pub(super) fn check_windows(key: &str, windows: &[Window]) -> Result<(), ConfigError> {
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

pub(super) fn valid_account_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// An egress proxy is reached with CONNECT over plain HTTP: `http://[user:pass@]host:port`.
pub(super) fn check_proxy(proxy: &str) -> Result<(), String> {
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

pub(super) const MINUTE: Duration = Duration::from_secs(60);

pub(super) const HOUR: Duration = Duration::from_secs(3600);

pub(super) const DAY: Duration = Duration::from_secs(86_400);

/// Durations past any sane value are refused at start: added to a clock they would
/// overflow, or leave requests waiting for years.
pub(super) fn at_most(key: &'static str, d: Duration, max: Duration) -> Result<(), ConfigError> {
    if d > max {
        return Err(invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

pub(super) fn positive(key: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(invalid(key, "must be greater than zero"))
    } else {
        Ok(())
    }
}
