//! What identifies a stored answer, and what a request or an answer says about storing.
//!
//! The key is the account's identity (its name, or for a client key the keyed hash of
//! it: never the key), the path and the query with every `api_key` parameter left out,
//! the other parameters in the order they came.

use std::sync::Arc;

use http::{HeaderMap, Method, StatusCode, header};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// `<account id>\n<path>?<query>`.
    text: Arc<str>,
    /// Where the path starts in `text`.
    path_at: usize,
}

impl CacheKey {
    /// `path` is after `/api/v1`.
    pub fn new(account_id: &str, path: &str, query: Option<&str>) -> Self {
        let mut text =
            String::with_capacity(account_id.len() + path.len() + 2 + query.map_or(0, str::len));
        text.push_str(account_id);
        text.push('\n');
        let path_at = text.len();
        text.push_str(path);
        let mut first = true;
        for pair in query.unwrap_or("").split('&') {
            let name = pair.split('=').next().unwrap_or("");
            if pair.is_empty() || is_api_key(name) {
                continue;
            }
            text.push(if first { '?' } else { '&' });
            first = false;
            text.push_str(pair);
        }
        Self {
            text: text.into(),
            path_at,
        }
    }

    pub fn account(&self) -> &str {
        &self.text[..self.path_at - 1]
    }

    /// The path and the kept query.
    pub fn target(&self) -> &str {
        &self.text[self.path_at..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// `api_key`, however its name is percent-encoded.
fn is_api_key(name: &str) -> bool {
    name.eq_ignore_ascii_case("api_key")
        || percent_encoding::percent_decode_str(name)
            .decode_utf8()
            .is_ok_and(|n| n.eq_ignore_ascii_case("api_key"))
}

/// What the client's `Cache-Control` asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Anything stored will do.
    Stored,
    /// `no-cache` or `max-age=0`: ask SmartLead; its answer refreshes the entry.
    Fresh,
    /// `no-store`: ask SmartLead and keep nothing.
    NoStore,
}

pub fn asked(headers: &HeaderMap) -> Asked {
    let mut asked = Asked::Stored;
    for value in headers.get_all(header::CACHE_CONTROL) {
        for directive in value.to_str().unwrap_or("").split(',') {
            let d = directive.trim().to_ascii_lowercase();
            match d.as_str() {
                "no-store" => return Asked::NoStore,
                "no-cache" => asked = Asked::Fresh,
                d if d.strip_prefix("max-age=").map(str::trim) == Some("0") => asked = Asked::Fresh,
                _ => {}
            }
        }
    }
    asked
}

/// Whether SmartLead's answer may be stored: a 200 without `Cache-Control: no-store` or
/// `private` and without `Set-Cookie`.
pub fn storable(status: StatusCode, headers: &HeaderMap) -> bool {
    if status != StatusCode::OK || headers.contains_key(header::SET_COOKIE) {
        return false;
    }
    !headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|d| {
            let d = d.trim();
            let name = d.split('=').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("private")
        })
    })
}

/// A write: its 2xx answer makes stored answers stale ([`super::routes::Scope`]).
pub fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_key_leaves_out_every_api_key() {
        let k = CacheKey::new(
            "default",
            "/campaigns",
            Some("api_key=SECRET&a=1&API_KEY=x&%61pi_key=y&b=2"),
        );
        assert_eq!(k.as_str(), "default\n/campaigns?a=1&b=2");
        assert_eq!(k.account(), "default");
        assert_eq!(k.target(), "/campaigns?a=1&b=2");
        assert_eq!(CacheKey::new("a", "/x", Some("api_key=1")).target(), "/x");
        assert_ne!(
            CacheKey::new("a", "/x", None),
            CacheKey::new("b", "/x", None)
        );
    }

    fn cc(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn client_directives() {
        assert_eq!(asked(&HeaderMap::new()), Asked::Stored);
        assert_eq!(asked(&cc("No-Cache")), Asked::Fresh);
        assert_eq!(asked(&cc("max-age=0")), Asked::Fresh);
        assert_eq!(asked(&cc("max-age=10")), Asked::Stored);
        assert_eq!(asked(&cc("no-cache, no-store")), Asked::NoStore);
    }

    #[test]
    fn what_is_never_stored() {
        assert!(storable(StatusCode::OK, &HeaderMap::new()));
        assert!(!storable(StatusCode::NOT_FOUND, &HeaderMap::new()));
        assert!(!storable(StatusCode::CREATED, &HeaderMap::new()));
        assert!(!storable(StatusCode::OK, &cc("private, max-age=60")));
        assert!(!storable(StatusCode::OK, &cc("no-store")));
        assert!(storable(StatusCode::OK, &cc("max-age=60")));
        let mut cookie = HeaderMap::new();
        cookie.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        assert!(!storable(StatusCode::OK, &cookie));
    }
}
