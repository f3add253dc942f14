//! The SmartLead API key, a secret that redacts itself, and [`Secrets`]: the one place
//! that finds the proxy's secrets in text (bodies, headers, log lines) in any form a
//! reader could decode back, and replaces them with `***`.

mod find;
pub mod in_body;
pub mod streamed;

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

pub use find::MIN_RUN;

/// What a secret is replaced with wherever it would otherwise be shown.
pub const REDACTED: &str = "***";

/// Secrets shorter than this (no SmartLead key is) are not searched for in text: they
/// would match ordinary words. They are still redacted as `api_key` values.
pub const MIN_SEARCHED: usize = 6;

/// The key. `Debug` prints `[REDACTED]`; there is no `Display`, so it can only leave the
/// process through [`ApiKey::query_value`].
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct ApiKey {
    secret: SecretString,
    /// The key percent-encoded, as it goes into the upstream query.
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
        if !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the API key must be printable ASCII (no spaces or control characters)".into(),
            );
        }
        Ok(())
    }

    /// The key percent-encoded for a query string.
    pub fn query_value(&self) -> &str {
        self.encoded.expose_secret()
    }

    /// A [`Secrets`] holding just this key.
    pub fn secrets(&self) -> Secrets {
        Secrets::default().with(self.secret.expose_secret())
    }
}

/// The secrets to keep out of everything a client or a log reader sees; cheap to clone.
///
/// A secret is found raw or encoded (percent-encoding in any case and however partial or
/// nested, JSON `\u` and `\/` escapes, HTML numeric entities, hex), in any letter case,
/// whole or as any run of [`MIN_RUN`] of its characters, and, in text that was cut, as
/// however much of its start the cut left.
#[derive(Clone, Default)]
pub struct Secrets {
    patterns: Arc<[find::Pattern]>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} held)", self.patterns.len())
    }
}

impl Secrets {
    /// No secrets, for answers that carry nothing from outside the proxy.
    pub fn empty() -> &'static Secrets {
        static EMPTY: std::sync::OnceLock<Secrets> = std::sync::OnceLock::new();
        EMPTY.get_or_init(Secrets::default)
    }

    /// These secrets and one more (blank and very short ones are ignored: see
    /// [`MIN_SEARCHED`]).
    pub fn with(&self, secret: &str) -> Self {
        if secret.trim().len() < MIN_SEARCHED {
            return self.clone();
        }
        let mut patterns = self.patterns.to_vec();
        patterns.push(find::Pattern::new(secret.as_bytes()));
        Self {
            patterns: patterns.into(),
        }
    }

    /// These secrets and every key in `keys`.
    pub fn with_keys<'a>(&self, keys: impl IntoIterator<Item = &'a ApiKey>) -> Self {
        keys.into_iter()
            .fold(self.clone(), |s, k| s.with(k.secret.expose_secret()))
    }

    /// These secrets and all of `other`'s.
    pub fn with_all(&self, other: &Secrets) -> Self {
        if other.is_empty() {
            return self.clone();
        }
        let patterns: Vec<_> = self
            .patterns
            .iter()
            .chain(other.patterns.iter())
            .cloned()
            .collect();
        Self {
            patterns: patterns.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The most bytes a secret can take in text (every character as a 6-byte escape): a
    /// text cut this far after a point still shows a secret there whole.
    pub fn longest_form(&self) -> usize {
        self.patterns.iter().map(|p| p.len() * 6).max().unwrap_or(0)
    }

    fn found(&self, text: &[u8], cut: bool) -> Vec<Range<usize>> {
        let mut found = Vec::new();
        for p in self.patterns.iter() {
            p.find(text, cut, &mut found);
        }
        found
    }

    fn scrubbed<'a>(&self, text: &'a [u8], cut: bool) -> Cow<'a, [u8]> {
        let found = self.found(text, cut);
        if found.is_empty() {
            return Cow::Borrowed(text);
        }
        Cow::Owned(find::replace(text, found, REDACTED.as_bytes()))
    }

    /// For a body streamed in pieces: of `pending` (what has come and not been sent), the
    /// part that can be sent now with every secret replaced by as many `*` (so the body
    /// keeps its length), and how many bytes of `pending` it stands for. What is kept back
    /// is the trailing run of bytes that could be part of a secret, at most
    /// [`Secrets::longest_form`] of them, moved back further to the start of any secret
    /// that reaches into them: a secret split between pieces is seen whole, and a piece
    /// that ends in anything else goes on at once. At the body's `end` everything goes.
    pub fn scrub_streamed<'a>(&self, pending: &'a [u8], end: bool) -> (Cow<'a, [u8]>, usize) {
        let found = self.found(pending, false);
        let mut send = if end {
            pending.len()
        } else {
            let tail = self
                .patterns
                .iter()
                .map(|p| p.trailing_run(pending))
                .max()
                .unwrap_or(0);
            pending.len() - tail.min(self.longest_form())
        };
        // Moving back past one secret can reach into another that overlaps it.
        while let Some(r) = found.iter().find(|r| r.start < send && r.end > send) {
            send = r.start;
        }
        let inside: Vec<Range<usize>> = found.into_iter().filter(|r| r.end <= send).collect();
        let head = &pending[..send];
        if inside.is_empty() {
            return (Cow::Borrowed(head), send);
        }
        (Cow::Owned(find::mask(head, &inside)), send)
    }

    /// Bytes with every secret replaced.
    pub fn scrub_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        self.scrubbed(bytes, false)
    }

    /// Bytes that were cut at their end: also drops the start of a secret cut off there.
    pub fn scrub_cut<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        self.scrubbed(bytes, true)
    }

    /// Text with every secret replaced.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.scrubbed(text.as_bytes(), false) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Matches are ASCII runs replaced by ASCII, so the text stays UTF-8.
            Cow::Owned(b) => Cow::Owned(String::from_utf8_lossy(&b).into_owned()),
        }
    }

    /// Every string (and object key) in a JSON value, after its escapes were decoded.
    /// True if anything changed.
    pub fn scrub_json(&self, value: &mut Value) -> bool {
        if self.is_empty() {
            return false;
        }
        match value {
            Value::String(s) => match self.scrub(s) {
                Cow::Owned(clean) => {
                    *s = clean;
                    true
                }
                Cow::Borrowed(_) => false,
            },
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |changed, v| self.scrub_json(v) | changed),
            Value::Object(map) => {
                let dirty_keys = map.keys().any(|k| matches!(self.scrub(k), Cow::Owned(_)));
                let mut changed = dirty_keys;
                if dirty_keys {
                    let old = std::mem::take(map);
                    for (k, v) in old {
                        map.insert(self.scrub(&k).into_owned(), v);
                    }
                }
                for v in map.values_mut() {
                    changed |= self.scrub_json(v);
                }
                changed
            }
            _ => false,
        }
    }

    /// A header value with every secret replaced, or `None` when it holds none.
    pub fn scrub_header(&self, value: &HeaderValue) -> Option<HeaderValue> {
        match self.scrub_bytes(value.as_bytes()) {
            Cow::Borrowed(_) => None,
            Cow::Owned(clean) => HeaderValue::from_bytes(&clean).ok(),
        }
    }

    /// Scrubs every header value, and drops headers whose name carries a secret.
    pub fn scrub_headers(&self, headers: &mut HeaderMap) {
        if self.is_empty() {
            return;
        }
        let named: Vec<HeaderName> = headers
            .keys()
            .filter(|n| matches!(self.scrub(n.as_str()), Cow::Owned(_)))
            .cloned()
            .collect();
        for name in named {
            headers.remove(name);
        }
        for value in headers.values_mut() {
            if let Some(clean) = self.scrub_header(value) {
                *value = clean;
            }
        }
    }

    /// For logs: every secret, and the value of any `api_key` field (query, form or
    /// JSON, so a client's own key too), replaced.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let scrubbed = self.scrub(text);
        match redact_api_key_values(&scrubbed) {
            Some(s) => Cow::Owned(s),
            None => scrubbed,
        }
    }
}

/// Whether a query or form name is read as `api_key` by common parsers: any case,
/// percent- or plus-encoded, with PHP's `.` or space for the `_`, and the bracket forms
/// `api_key[]`, `api_key[0]`, `api_key[x]` (qs, PHP and Rails read them as `api_key`).
pub fn is_api_key_name(name: &str) -> bool {
    if !name.contains(['%', '+']) {
        return reads_as_api_key(name.as_bytes());
    }
    let decoded = percent_decode_str(&name.replace('+', " ")).collect::<Vec<u8>>();
    reads_as_api_key(&decoded)
}

fn reads_as_api_key(name: &[u8]) -> bool {
    let Some((head, rest)) = name.split_at_checked(7) else {
        return false;
    };
    let spelled = head[..3].eq_ignore_ascii_case(b"api")
        && matches!(head[3], b'_' | b'.' | b' ')
        && head[4..].eq_ignore_ascii_case(b"key");
    spelled && (rest.is_empty() || (rest.starts_with(b"[") && rest.ends_with(b"]")))
}

/// `api_key=v`, `"api_key": "v"`, `api_key: v` (any case, also inside a JSON string
/// where the quotes are escaped, and in every name form that parsers read as `api_key`:
/// `api%5Fkey`, `api.key`, `api_key[]`, `api_key%5B0%5D`...) with `v` replaced.
pub fn redact_api_key_values(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let skip = |mut i: usize, also: &[u8]| {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || also.contains(&bytes[i])) {
            i += 1;
        }
        i
    };
    let find_name = |from: usize| {
        (from..bytes.len().saturating_sub(6)).find_map(|at| {
            let end = api_key_name_at(bytes, at)?;
            Some((at, end))
        })
    };
    let (mut out, mut copied, mut from) = (String::new(), 0, 0);
    while let Some((_, name_end)) = find_name(from) {
        from = name_end;
        let mut i = skip(name_end, b"\\\"");
        if !matches!(bytes.get(i), Some(b'=' | b':')) {
            continue;
        }
        i = skip(i + 1, b"");
        // How the value is quoted decides where it ends.
        let close: &[u8] = if bytes.get(i) == Some(&b'"') {
            i += 1;
            b"\""
        } else if bytes[i..].starts_with(b"\\\"") {
            i += 2;
            b"\\"
        } else {
            b"&,}];\"\\"
        };
        let start = i;
        while i < bytes.len() {
            let b = bytes[i];
            let escaped_quote = b == b'"' && close == b"\"" && bytes[i - 1] == b'\\';
            if (close.contains(&b) && !escaped_quote)
                || (close.len() > 2 && b.is_ascii_whitespace())
            {
                break;
            }
            i += 1;
        }
        if i > start {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = i;
        }
        from = i;
    }
    (copied > 0).then(|| {
        out.push_str(&text[copied..]);
        out
    })
}

/// The end of an `api_key` name that starts at `at`: `api`, then `_` (or `.`, space,
/// `+`, or any of them percent-encoded), then `key`, then any bracket groups (`[..]`,
/// `%5B..%5D`).
fn api_key_name_at(bytes: &[u8], at: usize) -> Option<usize> {
    let word = |i: usize, w: &[u8]| {
        let end = i + w.len();
        (end <= bytes.len() && bytes[i..end].eq_ignore_ascii_case(w)).then_some(end)
    };
    let i = word(at, b"api")?;
    let i = match bytes.get(i)? {
        b'_' | b'.' | b' ' | b'+' => i + 1,
        b'%' => ["5f", "2e", "20"]
            .iter()
            .find_map(|e| word(i + 1, e.as_bytes()))?,
        _ => return None,
    };
    let mut i = word(i, b"key")?;
    loop {
        let (open, close): (&[u8], &[u8]) = match bytes.get(i) {
            Some(b'[') => (b"[", b"]"),
            Some(b'%') if word(i, b"%5b").is_some() => (b"%5b", b"%5d"),
            _ => return Some(i),
        };
        let inner = i + open.len();
        let close_at = (inner..bytes.len())
            .take(64)
            .find(|&j| word(j, close).is_some())?;
        i = close_at + close.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn debug_is_redacted() {
        let k = ApiKey::new("s3cr3t/key+1");
        assert!(!format!("{k:?}").contains("s3cr3t"));
        assert!(!format!("{:?}", k.secrets()).contains("s3cr3t"));
    }

    #[test]
    fn scrubs_raw_and_encoded_forms() {
        let s = ApiKey::new("s3cr3t/key+1").secrets();
        let text = "a s3cr3t/key+1 b s3cr3t%2Fkey%2B1 c s3cr3t%2fkey%2b1 d";
        assert_eq!(s.scrub(text), "a *** b *** c *** d");
        assert_eq!(&*s.scrub_bytes(text.as_bytes()), b"a *** b *** c *** d");
        assert!(matches!(s.scrub_bytes(b"clean"), Cow::Borrowed(_)));
        assert!(matches!(s.scrub("clean"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_cut_text_loses_the_start_of_a_key() {
        let s = ApiKey::new("s3cr3t/k").secrets();
        assert_eq!(&*s.scrub_cut(b"abc s3cr"), b"abc ***");
        assert_eq!(&*s.scrub_cut(b"abc s3cr3t%2"), b"abc ***", "encoded form");
        assert_eq!(&*s.scrub_cut(b"abc"), b"abc");
        assert_eq!(&*s.scrub_bytes(b"abc s3cr"), b"abc s3cr", "not cut");
    }

    #[test]
    fn json_strings_are_scrubbed_after_decoding() {
        let s = ApiKey::new("K3Y-secret").secrets();
        let mut v: Value = serde_json::from_str(
            r#"{"a":"x \\u004B3Y-secret","K3Y-secret":1,"n":[{"m":"k3y-SECRET"}]}"#,
        )
        .unwrap();
        assert!(s.scrub_json(&mut v));
        let out = v.to_string();
        assert!(!out.to_ascii_lowercase().contains("k3y-secret"), "{out}");
        assert!(!s.scrub_json(&mut v), "clean now");
    }

    #[test]
    fn very_short_secrets_are_not_searched_for() {
        let s = ApiKey::new("k").secrets();
        assert!(s.is_empty());
        assert_eq!(s.redact("workers=2 api_key=k"), "workers=2 api_key=***");
    }

    #[test]
    fn headers_are_scrubbed_and_named_keys_dropped() {
        let s = ApiKey::new("k3y-secret").secrets();
        let mut h = HeaderMap::new();
        h.insert(
            "set-cookie",
            HeaderValue::from_static("sid=k3y-secret; Path=/"),
        );
        h.insert("k3y-secret", HeaderValue::from_static("1"));
        h.insert("x-ok", HeaderValue::from_static("fine"));
        s.scrub_headers(&mut h);
        assert_eq!(h["set-cookie"], "sid=***; Path=/");
        assert!(!h.contains_key("k3y-secret"));
        assert_eq!(h["x-ok"], "fine");
    }

    #[test]
    fn rejects_keys_that_cannot_be_smartleads() {
        assert!(ApiKey::new(" ").check().is_err());
        assert!(ApiKey::new("a b").check().is_err());
        assert!(ApiKey::new("ké").check().is_err());
        assert!(ApiKey::new("abc/+=-_.").check().is_ok());
    }

    #[test]
    fn api_key_values_are_redacted_in_every_shape() {
        let s = ApiKey::new("s3cr3t/k").secrets();
        for (text, want) in [
            (
                "/api/v1/campaigns?limit=5&api_key=abc",
                "/api/v1/campaigns?limit=5&api_key=***",
            ),
            (
                r#"{"api_key": "client-key", "x": 1}"#,
                r#"{"api_key": "***", "x": 1}"#,
            ),
            (
                r#"{"API_KEY":"a\"b","n":"s3cr3t/k"}"#,
                r#"{"API_KEY":"***","n":"***"}"#,
            ),
            ("api_key=x&api_key=y", "api_key=***&api_key=***"),
            ("the api_key is missing", "the api_key is missing"),
            ("api_key=s3cr3t%2Fk", "api_key=***"),
            ("cut: {\"api_key\":\"abc", "cut: {\"api_key\":\"***"),
            (
                r#"{"body":"{\"api_key\":\"c-key\",\"n\":1}"}"#,
                r#"{"body":"{\"api_key\":\"***\",\"n\":1}"}"#,
            ),
            ("api_key: abc def", "api_key: *** def"),
            ("a=1&api_key[]=abc&b=2", "a=1&api_key[]=***&b=2"),
            (
                "api_key%5B0%5D=abc&api_key[x][y]=d",
                "api_key%5B0%5D=***&api_key[x][y]=***",
            ),
            (
                "api%5Fkey=abc&API.KEY=d&api+key=e",
                "api%5Fkey=***&API.KEY=***&api+key=***",
            ),
        ] {
            assert_eq!(s.redact(text), want, "{text}");
        }
    }

    /// Keys of the characters a SmartLead key is made of, plus ones that need encoding.
    const KEY: &str = "[A-Za-z0-9/+=._-]{16,48}";

    /// The key in one of the forms a client could decode back, one character at a time.
    fn encode(key: &str, forms: &[u8]) -> String {
        key.bytes()
            .zip(forms.iter().cycle())
            .map(|(b, form)| match form % 6 {
                0 => (b as char).to_string(),
                1 => format!("%{b:02X}"),
                2 => format!("%{b:02x}"),
                3 => format!("\\u{:04x}", b),
                4 if b == b'/' => "\\/".to_owned(),
                4 => format!("&#{b};"),
                _ => format!("%25{b:02X}"),
            })
            .collect()
    }

    proptest! {
        /// A random key, hidden in random text with random encodings, is never found
        /// after scrubbing; text without it comes out unchanged.
        #[test]
        fn scrubbed_text_never_holds_the_key(
            key in KEY,
            before in "[ -~]{0,60}",
            after in "[ -~]{0,60}",
            forms in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let secrets = ApiKey::new(key.clone()).secrets();
            let hidden = encode(&key, &forms);
            let text = format!("{before}{hidden}{after}");
            let clean = secrets.scrub(&text);
            prop_assert!(!clean.contains(&hidden), "{clean}");
            let lower = clean.to_ascii_lowercase();
            let key_lower = key.to_ascii_lowercase();
            for w in key_lower.as_bytes().windows(MIN_RUN) {
                prop_assert!(!lower.contains(std::str::from_utf8(w).unwrap()), "{clean}");
            }
        }

        /// Cut anywhere inside the hidden key (even inside an escape): what is left of
        /// the key is dropped, and nothing before it.
        #[test]
        fn a_key_cut_anywhere_is_dropped(
            key in KEY,
            before in "[ !$()*,:<>?@^{|}~]{0,40}",
            forms in proptest::collection::vec(any::<u8>(), 1..8),
            cut in 1usize..400,
        ) {
            let secrets = ApiKey::new(key.clone()).secrets();
            let hidden = encode(&key, &forms);
            let text = format!("{before}{}", &hidden[..cut.min(hidden.len())]);
            let clean = secrets.scrub_cut(text.as_bytes());
            prop_assert_eq!(String::from_utf8_lossy(&clean), format!("{before}{REDACTED}"));
        }

        #[test]
        fn text_without_the_key_is_unchanged(
            key in KEY,
            text in "[ -~]{0,200}",
        ) {
            let secrets = ApiKey::new(key.clone()).secrets();
            prop_assume!(!text.to_ascii_lowercase().contains(&key.to_ascii_lowercase()[..MIN_RUN]));
            let has_piece = key.to_ascii_lowercase().as_bytes().windows(MIN_RUN)
                .any(|w| text.to_ascii_lowercase().contains(std::str::from_utf8(w).unwrap()));
            prop_assume!(!has_piece);
            prop_assert_eq!(secrets.scrub(&text), Cow::Borrowed(text.as_str()));
        }
    }
}
