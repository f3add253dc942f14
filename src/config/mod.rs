//! Typed settings: layered loading (defaults → files → env), one-time validation, and
//! `check-config`'s view with every secret hidden.
//!
//! - `types`: the sections, their defaults, and how each value is read and shown;
//! - `validate`: one check per section, each error naming the key the user set;
//! - `secret`: the keys, tokens and passwords the settings hold, and how they are hidden;
//! - `cache`: the `[cache]` section and its route patterns; `whole`: integers that must
//!   be whole numbers.
//!
//! Unknown keys are rejected, so a typo in a file or an environment variable is a
//! start-up error, not a silent default. docs/configuration.md is the reference users
//! read; a test checks that it and `check-config` name the same keys.
//!
//! Adding a config key:
//! 1. the field in its section's struct in `types` (or `cache`), with its default in the
//!    section's `Default` and a serde attribute for durations (`humantime_serde`),
//!    integers (`whole`), secrets (a `secret` serializer) or names (`by_name`);
//! 2. its bounds in the section's check in `validate`, with a message naming the key;
//! 3. a list value read from the environment goes in `LIST_KEYS`;
//! 4. if it only takes effect at start, `keep_restart_only`;
//! 5. a row in docs/configuration.md's table (and in config/default.toml when it has a
//!    default worth showing); the configuration-check test fails until there is one.

use std::collections::HashMap;
use std::path::Path;

use secrecy::ExposeSecret;
use serde::Serializer;

use crate::key::{ApiKey, Secrets};
use crate::shown;
pub use crate::shown::{mask_userinfo, quoted};

mod cache;
mod secret;
mod types;
mod validate;
mod whole;

pub use cache::{CacheSettings, Pattern};
pub use secret::mask_urls;
use secret::*;
pub use types::*;
use validate::*;
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

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
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
}

#[cfg(test)]
mod tests;
