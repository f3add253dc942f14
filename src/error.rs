//! The only module that knows SmartLead's error envelope
//! `{"error":{"code","message","details"}}`: building it for the proxy's own errors and
//! normalising whatever an upstream sent into it.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};

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

    /// 429 from the proxy's own quota, with an integer `Retry-After`.
    pub fn rate_limited(reason: &str, retry_after_secs: u64, attempts: u32) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!("rate limited: {reason}; retry after {retry_after_secs}s"),
        )
        .detail("retry_after", retry_after_secs)
        .detail("attempts", attempts);
        e.headers
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
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

    pub fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message, "details": self.details}})
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
/// attempts, ...) are added to wrapped bodies; conforming bodies pass through untouched.
pub fn normalize_upstream(
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
    extra: Map<String, Value>,
) -> Normalized {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(v) = &parsed
        && is_envelope(v)
    {
        return Normalized::PassThrough(Bytes::copy_from_slice(body));
    }
    let (message, upstream_details) = match &parsed {
        Some(v) => json_message(v),
        None => (text_message(body, content_type), None),
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
    let envelope =
        json!({"error": {"code": code_for_status(status), "message": message, "details": details}});
    Normalized::Wrapped(Bytes::from(envelope.to_string()))
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
            let out = normalize_upstream(status, ct.as_deref(), &body, Map::new()).into_bytes();
            let v: Value = serde_json::from_slice(&out).expect("always JSON");
            proptest::prop_assert!(is_envelope(&v));
        }

        #[test]
        fn json_shaped_bodies_become_envelopes(msg in ".{0,100}", key in "[a-z]{1,8}") {
            let body = serde_json::json!({ key: msg }).to_string();
            let out = normalize_upstream(StatusCode::BAD_GATEWAY, Some("application/json"), body.as_bytes(), Map::new()).into_bytes();
            let v: Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert!(is_envelope(&v));
        }
    }
}
