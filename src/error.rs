//! The only module that knows SmartLead's error envelope
//! `{"error":{"code","message","details"}}`: building it for the proxy's own errors and
//! normalising whatever an upstream sent into it.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::key::Secrets;

/// Longest upstream message kept when wrapping text or HTML.
const MAX_MESSAGE_CHARS: usize = 300;

/// An error answer the proxy writes itself.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
    pub headers: Box<HeaderMap>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            headers: Box::default(),
        }
    }

    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route: the proxy serves /api/v1/*, /healthz, /readyz and /metrics",
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "this method is not allowed on this route",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request body is larger than the proxy's limit of {limit} bytes"),
        )
        .detail("max_body_bytes", limit)
    }

    pub fn upstream_unavailable(reason: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UPSTREAM_UNAVAILABLE",
            format!("could not reach SmartLead: {}", reason.into()),
        )
    }

    pub fn upstream_invalid(reason: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UPSTREAM_ERROR",
            format!("SmartLead sent an invalid response: {}", reason.into()),
        )
    }

    pub fn upstream_timeout(timeout: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "UPSTREAM_TIMEOUT",
            format!(
                "SmartLead did not answer within {}",
                humantime::format_duration(timeout)
            ),
        )
    }

    /// 429 from the proxy's own quota, with an integer `Retry-After`. `reason` is a
    /// short label (`queue_full`, `max_wait`, `paused`) that picks the hint.
    pub fn rate_limited(message: &str, reason: &str, retry_after_secs: u64, attempts: u32) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!("rate limited: {message}; retry after {retry_after_secs}s"),
        )
        .detail("reason", reason)
        .detail("retry_after", retry_after_secs)
        .detail("attempts", attempts);
        e.headers
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        e
    }

    /// 503 for a request whose body would pass `server.max_buffered_bytes`.
    pub fn out_of_body_memory() -> Self {
        let mut e = Self::unavailable(
            "the proxy is holding as many request bodies as server.max_buffered_bytes allows",
        )
        .detail("reason", "memory");
        e.headers
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        e
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "the proxy hit an internal error; this is a bug",
        )
    }

    /// Scrubs secrets from the message and details, which may quote what SmartLead said.
    pub fn scrubbed(mut self, secrets: &Secrets) -> Self {
        if let std::borrow::Cow::Owned(clean) = secrets.scrub(&self.message) {
            self.message = clean;
        }
        for value in self.details.values_mut() {
            secrets.scrub_json(value);
        }
        self
    }

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// The envelope, with `details.hint` added unless the error set its own.
    pub fn body(&self) -> Value {
        let mut details = self.details.clone();
        if !details.contains_key("hint") {
            let hint = hint(self.status, self.code, &details);
            details.insert("hint".into(), hint.into());
        }
        json!({"error": {"code": self.code, "message": self.message, "details": details}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Bytes::from(self.body().to_string());
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().extend(*self.headers);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// The envelope code for an upstream status that is being wrapped.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        405 => "METHOD_NOT_ALLOWED",
        409 => "CONFLICT",
        413 => "PAYLOAD_TOO_LARGE",
        422 => "VALIDATION_ERROR",
        429 => "RATE_LIMITED",
        300..=399 => "UPSTREAM_REDIRECT",
        400..=499 => "BAD_REQUEST",
        _ => "UPSTREAM_ERROR",
    }
}

/// What the caller should do about an error, phrased for someone behind the proxy
/// (SmartLead's status table, plus the proxy's own cases). `details` says where the
/// error came from: `upstream_status` is there when SmartLead's answer is being wrapped.
pub fn hint(status: StatusCode, code: &str, details: &Map<String, Value>) -> String {
    let attempts = details.get("attempts").and_then(Value::as_u64).unwrap_or(1);
    let from_smartlead = details.contains_key("upstream_status");
    let tried = match attempts {
        0 => "before any attempt".to_owned(),
        1 => "after 1 attempt (not retried)".to_owned(),
        n => format!("after {n} attempts (retried {} times)", n - 1),
    };
    match code {
        "RATE_LIMITED" if !from_smartlead || details.contains_key("reason") => {
            rate_limit_hint(details)
        }
        "UPSTREAM_UNAVAILABLE" => format!(
            "SmartLead could not be reached {tried}: check the network and DNS from the \
             proxy's host and upstream.base_url, then SmartLead's status page"
        ),
        "UPSTREAM_TIMEOUT" => format!(
            "SmartLead did not answer in time {tried}: check SmartLead's status page and retry \
             later; raise upstream.timeout (or X-Request-Timeout) if slow answers are expected"
        ),
        "UNAVAILABLE" if details.get("reason").and_then(Value::as_str) == Some("memory") => {
            "many large requests are waiting in the proxy (server.max_buffered_bytes of bodies \
             held): retry after Retry-After, or raise server.max_buffered_bytes"
                .into()
        }
        "UNAVAILABLE" => "the proxy is shutting down or cannot reach its shared limiter \
             (Redis, with redis.on_error = \"reject\"): retry in a moment; GET /readyz says which"
            .into(),
        "INTERNAL_ERROR" => "a bug in the proxy: retry, and report it with this request_id".into(),
        "PAYLOAD_TOO_LARGE" if !from_smartlead => "send a smaller body (split a big lead import \
             into several requests), or raise server.max_body_bytes"
            .into(),
        "REQUEST_TIMEOUT" => "the client stopped sending its request for longer than \
             server.client_timeout: check the client and the network between it and the proxy"
            .into(),
        "METHOD_NOT_ALLOWED" if !from_smartlead => {
            "the proxy's own routes take GET only; SmartLead's API is under /api/v1/".into()
        }
        _ => status_hint(status, from_smartlead, &tried, details),
    }
}

/// The proxy's own 429, by why no slot was found.
fn rate_limit_hint(details: &Map<String, Value>) -> String {
    let after = details
        .get("retry_after")
        .and_then(Value::as_u64)
        .map_or("later".to_owned(), |s| format!("after {s}s (Retry-After)"));
    match details.get("reason").and_then(Value::as_str) {
        Some("queue_full") => format!(
            "the proxy's queue was full (limit.max_queue requests already waiting): retry \
             {after}, or spread the callers out"
        ),
        Some("paused") => format!(
            "SmartLead asked the proxy to pause for longer than this request may wait \
             (limit.max_wait); retry {after}. If this repeats, SmartLead's quota for the key \
             is smaller than limit.requests: lower it or set limit.follow_upstream = true"
        ),
        _ => format!(
            "no quota slot within limit.max_wait (or X-Request-Timeout): retry {after}, raise \
             limit.max_wait, or send fewer requests; the quota itself is limit.requests per \
             limit.period"
        ),
    }
}

/// Hints by status, for SmartLead's answers and the proxy's remaining own errors.
fn status_hint(
    status: StatusCode,
    from_smartlead: bool,
    tried: &str,
    details: &Map<String, Value>,
) -> String {
    match status.as_u16() {
        401 if from_smartlead => "SmartLead refused the proxy's API key: check \
             SMARTLEAD_API_KEY where the proxy runs, not in the client (the proxy replaces \
             clients' keys unless upstream.allow_client_key = true)"
            .into(),
        401 => "the proxy wants an access token: send Authorization: Bearer <token> with one of \
             its server.access_tokens"
            .into(),
        403 => "the proxy's API key has no access to this resource: check that the id belongs \
             to the key's SmartLead account and that the plan allows this endpoint"
            .into(),
        404 if from_smartlead => "SmartLead has no such resource: list campaigns \
             (GET /api/v1/campaigns) to verify the id"
            .into(),
        404 => "not a route of the proxy: point the client's base URL at \
             http://<proxy>/api/v1 (the proxy's own routes are /healthz, /readyz, /metrics)"
            .into(),
        409 => "a duplicate: SmartLead already has it; usually safe to ignore".into(),
        400 | 422 => match field(details) {
            Some(f) => format!("fix {f} in the payload, then send it again"),
            None => "fix the request as the message says, then send it again".into(),
        },
        429 => format!(
            "SmartLead still answered 429 {tried}: its quota for this key is smaller than \
             limit.requests; lower limit.requests or set limit.follow_upstream = true"
        ),
        300..=399 => "SmartLead answered with a redirect, which the proxy does not follow: \
             check upstream.base_url (details.location says where it pointed)"
            .into(),
        500..=599 => {
            format!("SmartLead failed {tried}: check SmartLead's status page and retry later")
        }
        _ => "see the message; details.upstream_status is SmartLead's own status".into(),
    }
}

/// The payload field an error names: the proxy's own `field`, or SmartLead's (in its
/// details object or the first of a list of errors).
fn field(details: &Map<String, Value>) -> Option<String> {
    let named = |v: &Value| {
        v.get("field")
            .or_else(|| v.get("path"))
            .or_else(|| v.get("param"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    if let Some(f) = details.get("field").and_then(Value::as_str) {
        return Some(match details.get("constraint").and_then(Value::as_str) {
            Some(c) => format!("{f} ({c})"),
            None => f.to_owned(),
        });
    }
    let upstream = details
        .get("upstream_details")
        .or_else(|| details.get("upstream_error").and_then(|e| e.get("details")))?;
    match upstream {
        Value::Array(items) => items.iter().find_map(named),
        other => named(other),
    }
}

/// True when `v` is already `{"error":{"code":string,"message":string,...}}`.
pub fn is_envelope(v: &Value) -> bool {
    v.get("error").is_some_and(|e| {
        e.get("code").is_some_and(Value::is_string)
            && e.get("message").is_some_and(Value::is_string)
    })
}

/// What to send back for a non-2xx upstream answer.
#[derive(Debug)]
pub enum Normalized {
    /// Already an envelope: send the bytes unchanged.
    PassThrough(Bytes),
    /// Wrapped into a new envelope.
    Wrapped(Bytes),
}

impl Normalized {
    pub fn into_bytes(self) -> Bytes {
        match self {
            Normalized::PassThrough(b) | Normalized::Wrapped(b) => b,
        }
    }
}

/// Turns any upstream error body into the envelope. `extra` details (request id,
/// attempts, ...) are added to wrapped bodies; conforming bodies pass through untouched
/// unless they carry a secret. Secrets are scrubbed from the raw bytes (also the start of
/// one cut off at the end of a `cut` body), from every JSON string once its escapes are
/// decoded, and from the answer written.
pub fn normalize_upstream(
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
    cut: bool,
    secrets: &Secrets,
    extra: Map<String, Value>,
) -> Normalized {
    let body = if cut {
        secrets.scrub_cut(body)
    } else {
        secrets.scrub_bytes(body)
    };
    let mut parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let decoded_secret = parsed.as_mut().is_some_and(|v| secrets.scrub_json(v));
    if let Some(v) = &parsed
        && is_envelope(v)
    {
        return Normalized::PassThrough(if decoded_secret {
            Bytes::from(v.to_string())
        } else {
            Bytes::copy_from_slice(&body)
        });
    }
    let (message, upstream_details) = match &parsed {
        Some(v) => json_message(v),
        None => (text_message(&body, content_type), None),
    };
    let message = message.unwrap_or_else(|| {
        format!(
            "SmartLead answered {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_owned()
    });
    let mut details = Map::new();
    details.insert("upstream_status".into(), status.as_u16().into());
    if let Some(d) = upstream_details {
        details.insert("upstream_details".into(), d);
    }
    details.extend(extra);
    let code = code_for_status(status);
    let hint = hint(status, code, &details);
    details.insert("hint".into(), hint.into());
    let envelope = json!({"error": {"code": code, "message": message, "details": details}});
    let out = envelope.to_string().into_bytes();
    Normalized::Wrapped(Bytes::from(secrets.scrub_bytes(&out).into_owned()))
}

/// Message and details from a JSON body that is not an envelope.
fn json_message(v: &Value) -> (Option<String>, Option<Value>) {
    let str_at = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let message = match v.get("error") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(e @ Value::Object(_)) => str_at(e, "message").or_else(|| str_at(v, "message")),
        _ => str_at(v, "message").or_else(|| str_at(v, "msg")),
    };
    let details = v
        .get("details")
        .or_else(|| v.get("error").and_then(|e| e.get("details")))
        .cloned()
        .or_else(|| v.get("errors").cloned())
        .or_else(|| message.is_none().then(|| v.clone()));
    (message.map(|m| truncate(&m)), details)
}

/// A short readable message from a text or HTML body.
fn text_message(body: &[u8], content_type: Option<&str>) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let is_html =
        content_type.is_some_and(|c| c.contains("html")) || text.trim_start().starts_with('<');
    let text = if is_html {
        html_title(&text).unwrap_or_else(|| strip_tags(&text))
    } else {
        text.into_owned()
    };
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!collapsed.is_empty()).then(|| truncate(&collapsed))
}

fn html_title(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = lower[start..].find('>')? + start + 1;
    let end = lower[open_end..].find("</title")? + open_end;
    let title = html[open_end..end].trim();
    (!title.is_empty()).then(|| title.to_owned())
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrap(status: u16, ct: Option<&str>, body: &str) -> Value {
        let n = normalize_upstream(
            StatusCode::from_u16(status).unwrap(),
            ct,
            body.as_bytes(),
            false,
            &Secrets::default(),
            Map::new(),
        );
        assert!(
            matches!(n, Normalized::Wrapped(_)),
            "{body} should be wrapped"
        );
        serde_json::from_slice(&n.into_bytes()).unwrap()
    }

    #[test]
    fn conforming_envelope_passes_untouched() {
        let body = r#"{"error":{"code":"VALIDATION_ERROR","message":"bad","details":{"field":"x"}},"extra":1}"#;
        match normalize_upstream(
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            body.as_bytes(),
            false,
            &Secrets::default(),
            Map::new(),
        ) {
            Normalized::PassThrough(b) => assert_eq!(b, body.as_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wraps_message_shapes() {
        let v = wrap(
            404,
            Some("application/json"),
            r#"{"message":"Campaign not found"}"#,
        );
        assert_eq!(v["error"]["code"], "NOT_FOUND");
        assert_eq!(v["error"]["message"], "Campaign not found");
        assert_eq!(v["error"]["details"]["upstream_status"], 404);

        let v = wrap(401, None, r#"{"error":"Invalid API key"}"#);
        assert_eq!(v["error"]["code"], "UNAUTHORIZED");
        assert_eq!(v["error"]["message"], "Invalid API key");

        let v = wrap(
            422,
            None,
            r#"{"error":{"message":"bad email","details":{"field":"email"}}}"#,
        );
        assert_eq!(v["error"]["code"], "VALIDATION_ERROR");
        assert_eq!(v["error"]["details"]["upstream_details"]["field"], "email");
    }

    #[test]
    fn wraps_html_text_and_empty() {
        let v = wrap(
            502,
            Some("text/html"),
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        );
        assert_eq!(v["error"]["code"], "UPSTREAM_ERROR");
        assert_eq!(v["error"]["message"], "502 Bad Gateway");

        let v = wrap(500, Some("text/plain"), "  Internal\n error  ");
        assert_eq!(v["error"]["message"], "Internal error");

        let v = wrap(503, None, "");
        assert_eq!(
            v["error"]["message"],
            "SmartLead answered 503 Service Unavailable"
        );

        let v = wrap(409, None, &"x".repeat(5000));
        assert!(v["error"]["message"].as_str().unwrap().chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn hints_follow_smartleads_status_table() {
        let from_smartlead = |attempts: u32| {
            let mut d = Map::new();
            d.insert("upstream_status".into(), 0.into());
            d.insert("attempts".into(), attempts.into());
            d
        };
        let cases: &[(u16, &str, Map<String, Value>, &str)] = &[
            (
                401,
                "UNAUTHORIZED",
                from_smartlead(1),
                "SMARTLEAD_API_KEY where the proxy runs",
            ),
            (401, "UNAUTHORIZED", Map::new(), "Authorization: Bearer"),
            (
                403,
                "FORBIDDEN",
                from_smartlead(1),
                "no access to this resource",
            ),
            (404, "NOT_FOUND", from_smartlead(1), "list campaigns"),
            (404, "NOT_FOUND", Map::new(), "base URL"),
            (409, "CONFLICT", from_smartlead(1), "safe to ignore"),
            (
                422,
                "VALIDATION_ERROR",
                from_smartlead(1),
                "fix the request",
            ),
            (
                429,
                "RATE_LIMITED",
                from_smartlead(4),
                "smaller than limit.requests",
            ),
            (
                500,
                "UPSTREAM_ERROR",
                from_smartlead(4),
                "after 4 attempts (retried 3 times)",
            ),
            (
                503,
                "UPSTREAM_ERROR",
                from_smartlead(1),
                "after 1 attempt (not retried)",
            ),
            (
                502,
                "UPSTREAM_UNAVAILABLE",
                from_smartlead(2),
                "could not be reached after 2",
            ),
            (504, "UPSTREAM_TIMEOUT", Map::new(), "upstream.timeout"),
            (503, "UNAVAILABLE", Map::new(), "/readyz"),
            (500, "INTERNAL_ERROR", Map::new(), "bug"),
            (
                413,
                "PAYLOAD_TOO_LARGE",
                Map::new(),
                "server.max_body_bytes",
            ),
            (408, "REQUEST_TIMEOUT", Map::new(), "server.client_timeout"),
        ];
        for (status, code, details, wanted) in cases {
            let h = hint(StatusCode::from_u16(*status).unwrap(), code, details);
            assert!(h.contains(wanted), "{status} {code}: {h}");
        }
        for (reason, wanted) in [
            ("queue_full", "limit.max_queue"),
            ("max_wait", "limit.max_wait"),
            ("paused", "limit.follow_upstream"),
        ] {
            let e = ApiError::rate_limited("x", reason, 3, 0);
            let h = e.body()["error"]["details"]["hint"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                h.contains(wanted) && h.contains("after 3s"),
                "{reason}: {h}"
            );
        }
        // A field SmartLead named, in its details or in a list of errors.
        let mut d = from_smartlead(1);
        d.insert(
            "upstream_details".into(),
            json!([{"field": "email", "msg": "bad"}]),
        );
        assert!(hint(StatusCode::BAD_REQUEST, "BAD_REQUEST", &d).contains("fix email"));
        let e = ApiError::bad_request("x").detail("hint", "mine");
        assert_eq!(
            e.body()["error"]["details"]["hint"],
            "mine",
            "an own hint wins"
        );
    }

    #[test]
    fn secrets_never_come_back_in_any_shape() {
        let secrets = crate::key::ApiKey::new("Sk-9f/8e+7d=6c5b4a").secrets();
        let key_gone = |out: &[u8]| {
            let text = String::from_utf8_lossy(out).to_ascii_lowercase();
            !text.contains("sk-9f") && !text.contains("536b2d") && !text.contains("\\u0053")
        };
        for (ct, body, cut) in [
            (None, r#"{"message":"bad \u0053k-9f\/8e+7d=6c5b4a"}"#, false),
            (
                None,
                r#"{"error":{"code":"X","message":"\u0053K-9F\/8E+7D=6C5B4A"}}"#,
                false,
            ),
            (
                None,
                r#"{"error":{"code":"X","message":"m","details":{"u":"Sk%2d9F%2f8e%2B7d=6c5b4a"}}}"#,
                false,
            ),
            (
                Some("text/html"),
                "<title>&#83;k-9f&#x2F;8e+7d=6c5b4a</title>",
                false,
            ),
            (
                Some("text/plain"),
                "   536B2D39662F38652B37643D366335623461",
                false,
            ),
            (Some("text/plain"), "                     Sk-9f/8e+7d", true),
        ] {
            let out = normalize_upstream(
                StatusCode::BAD_REQUEST,
                ct,
                body.as_bytes(),
                cut,
                &secrets,
                Map::new(),
            )
            .into_bytes();
            assert!(
                key_gone(&out),
                "{body} -> {}",
                String::from_utf8_lossy(&out)
            );
            let v: Value = serde_json::from_slice(&out).expect("still JSON");
            assert!(is_envelope(&v));
        }
        // A clean conforming envelope still passes through byte for byte.
        let clean = r#"{"error":{"code":"X","message":"m"}}"#;
        match normalize_upstream(
            StatusCode::BAD_REQUEST,
            None,
            clean.as_bytes(),
            false,
            &secrets,
            Map::new(),
        ) {
            Normalized::PassThrough(b) => assert_eq!(b, clean.as_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrapped_errors_carry_a_hint() {
        let v = wrap(404, None, r#"{"message":"Campaign not found"}"#);
        assert!(
            v["error"]["details"]["hint"]
                .as_str()
                .unwrap()
                .contains("list campaigns")
        );
    }

    #[test]
    fn own_errors_are_envelopes() {
        let e = ApiError::payload_too_large(10);
        assert!(is_envelope(&e.body()));
        assert_eq!(e.body()["error"]["details"]["max_body_bytes"], 10);
    }

    proptest::proptest! {
        /// Any bytes with any content type and status come out as a valid envelope
        /// (or pass through because they already are one).
        #[test]
        fn any_upstream_body_becomes_an_envelope(
            status in 300u16..600,
            ct in proptest::option::of("[a-z/+;= -]{0,30}"),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
        ) {
            let status = StatusCode::from_u16(status).unwrap();
            let out = normalize_upstream(status, ct.as_deref(), &body, false, &Secrets::default(), Map::new()).into_bytes();
            let v: Value = serde_json::from_slice(&out).expect("always JSON");
            proptest::prop_assert!(is_envelope(&v));
        }

        #[test]
        fn json_shaped_bodies_become_envelopes(msg in ".{0,100}", key in "[a-z]{1,8}") {
            let body = serde_json::json!({ key: msg }).to_string();
            let out = normalize_upstream(StatusCode::BAD_GATEWAY, Some("application/json"), body.as_bytes(), false, &Secrets::default(), Map::new()).into_bytes();
            let v: Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert!(is_envelope(&v));
        }
    }
}
