//! The secrets the settings and the environment hold, and how `check-config` hides them.

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;

use super::*;

impl Settings {
    /// [`Settings::secrets`] and the access tokens: what no configuration error may show.
    pub(super) fn secrets_and_tokens(&self) -> Secrets {
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
pub(super) fn env_secrets(env: &HashMap<String, String>) -> Secrets {
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

pub(super) fn url_password(url: &str) -> Option<String> {
    let url = url::Url::parse(url.trim()).ok()?;
    let raw = url.password()?;
    Some(
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// What `check-config` shows for a secret.
pub(super) const HIDDEN: &str = "***";

pub(super) fn hidden_key<S: Serializer>(key: &Option<ApiKey>, s: S) -> Result<S::Ok, S::Error> {
    match key {
        Some(_) => s.serialize_str(HIDDEN),
        None => s.serialize_none(),
    }
}

/// Tokens as `***`, or `name:***` for a named one: the name is not a secret.
pub(super) fn hidden_tokens<S: Serializer>(
    tokens: &[SecretString],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        tokens
            .iter()
            .map(|t| match t.expose_secret().split_once(':') {
                Some((name, _)) => format!("{name}:{HIDDEN}"),
                None => HIDDEN.to_owned(),
            }),
    )
}

pub(super) fn masked_url<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_urls(url.expose_secret()))
}

pub(super) fn masked_opt_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
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
