//! The SmartLead API key: a secret that redacts itself and scrubs itself out of text.

use std::borrow::Cow;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// What the key is replaced with wherever it would otherwise be shown.
pub const REDACTED: &str = "***";

/// The key. `Debug` prints `[REDACTED]`; there is no `Display`, so it can only leave the
/// process through [`ApiKey::query_value`].
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct ApiKey {
    secret: SecretString,
    /// The forms of the key that could appear in text we write: raw and URL-encoded.
    encoded: SecretString,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

impl From<String> for ApiKey {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        let key: String = key.into();
        let encoded = utf8_percent_encode(&key, NON_ALPHANUMERIC).to_string();
        Self {
            secret: SecretString::from(key),
            encoded: SecretString::from(encoded),
        }
    }

    /// Rejects keys that cannot be a SmartLead key and would only fail later.
    pub fn check(&self) -> Result<(), String> {
        let k = self.secret.expose_secret();
        if k.trim().is_empty() {
            return Err("the API key is empty".into());
        }
        if k.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("the API key contains whitespace or control characters".into());
        }
        Ok(())
    }

    /// The key percent-encoded for a query string.
    pub fn query_value(&self) -> &str {
        self.encoded.expose_secret()
    }

    /// The length of the longer form (raw or URL-encoded) the key can take in text.
    pub fn max_len(&self) -> usize {
        self.secret
            .expose_secret()
            .len()
            .max(self.encoded.expose_secret().len())
    }

    /// How many bytes at the end of `text` could be the start of the key (raw or
    /// URL-encoded) cut off there: text that was cut must lose them before it is shown.
    pub fn partial_len_at_end(&self, text: &[u8]) -> usize {
        [self.secret.expose_secret(), self.encoded.expose_secret()]
            .iter()
            .map(|form| {
                let form = form.as_bytes();
                (1..form.len().min(text.len() + 1))
                    .rev()
                    .find(|&n| text.ends_with(&form[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// Replaces every occurrence of the key (raw or URL-encoded) with `***`.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let raw = self.secret.expose_secret();
        let enc = self.encoded.expose_secret();
        if !text.contains(raw) && !text.contains(enc) {
            return Cow::Borrowed(text);
        }
        Cow::Owned(text.replace(raw, REDACTED).replace(enc, REDACTED))
    }

    /// Byte form of [`ApiKey::scrub`], for bodies that may not be UTF-8.
    pub fn scrub_bytes(&self, body: &[u8]) -> Option<Vec<u8>> {
        let raw = self.secret.expose_secret().as_bytes();
        let enc = self.encoded.expose_secret().as_bytes();
        let mut out = None;
        for needle in [raw, enc] {
            let current: &[u8] = out.as_deref().unwrap_or(body);
            if let Some(replaced) = replace_bytes(current, needle, REDACTED.as_bytes()) {
                out = Some(replaced);
            }
        }
        out
    }
}

fn replace_bytes(hay: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    let mut found = false;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
            found = true;
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = ApiKey::new("s3cr3t/key+1");
        assert!(!format!("{k:?}").contains("s3cr3t"));
    }

    #[test]
    fn scrubs_raw_and_encoded_forms() {
        let k = ApiKey::new("s3cr3t/key+1");
        let text = "a s3cr3t/key+1 b s3cr3t%2Fkey%2B1 c";
        assert_eq!(k.scrub(text), "a *** b *** c");
        assert_eq!(
            k.scrub_bytes(text.as_bytes()).unwrap(),
            b"a *** b *** c".to_vec()
        );
        assert!(k.scrub_bytes(b"clean").is_none());
        assert!(matches!(k.scrub("clean"), Cow::Borrowed(_)));
    }

    #[test]
    fn finds_a_key_cut_at_the_end() {
        let k = ApiKey::new("s3cr3t/k");
        assert_eq!(k.partial_len_at_end(b"abc s3cr"), 4);
        assert_eq!(k.partial_len_at_end(b"abc s3cr3t%2"), 8, "encoded form");
        assert_eq!(
            k.partial_len_at_end(b"abc s3cr3t/k"),
            0,
            "whole: scrubbed, not cut"
        );
        assert_eq!(k.partial_len_at_end(b"abc"), 0);
        assert_eq!(k.partial_len_at_end(b""), 0);
    }

    #[test]
    fn rejects_blank_keys() {
        assert!(ApiKey::new(" ").check().is_err());
        assert!(ApiKey::new("a b").check().is_err());
        assert!(ApiKey::new("abc").check().is_ok());
    }
}
