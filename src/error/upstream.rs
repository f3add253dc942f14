//! SmartLead's own error answers: what their bodies say (JSON, text or HTML), secrets
//! scrubbed, passed through when already an envelope, else wrapped into one.

use super::*;

/// The envelope code for an upstream status that is being wrapped.
pub fn code_for_status(status: StatusCode) -> Code {
    match status.as_u16() {
        401 => Code::Unauthorized,
        403 => Code::Forbidden,
        404 => Code::NotFound,
        405 => Code::MethodNotAllowed,
        409 => Code::Conflict,
        413 => Code::PayloadTooLarge,
        422 => Code::ValidationError,
        429 => Code::RateLimited,
        300..=399 => Code::UpstreamRedirect,
        400..=499 => Code::BadRequest,
        _ => Code::UpstreamError,
    }
}

/// What an upstream error body says, secrets scrubbed: the raw bytes (also the start of
/// one cut off at the end of a cut body), then every JSON string once its escapes are
/// decoded.
pub(super) struct UpstreamParts {
    /// Already an envelope: what to pass through.
    pub(super) envelope: Option<Value>,
    /// Bytes to pass through unchanged when nothing had to be scrubbed.
    pub(super) raw: Option<Bytes>,
    pub(super) message: String,
    pub(super) details: Option<Value>,
}

pub(super) fn upstream_parts(failed: &Failed, secrets: &Secrets) -> UpstreamParts {
    let body = if failed.cut {
        secrets.scrub_cut(&failed.body)
    } else {
        secrets.scrub_bytes(&failed.body)
    };
    let mut parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let decoded_secret = parsed.as_mut().is_some_and(|v| secrets.scrub_json(v));
    if let Some(v) = parsed.as_ref().filter(|v| is_envelope(v)) {
        let raw = match (&body, decoded_secret) {
            (std::borrow::Cow::Borrowed(_), false) => Some(failed.body.clone()),
            (std::borrow::Cow::Owned(b), false) => Some(Bytes::from(b.clone())),
            (_, true) => None,
        };
        let message = v["error"]["message"].as_str().unwrap_or("").to_owned();
        return UpstreamParts {
            envelope: parsed,
            raw,
            message,
            details: None,
        };
    }
    let content_type = failed
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let (message, details) = match &parsed {
        Some(v) => json_message(v),
        None => (text_message(&body, content_type), None),
    };
    let message = message.unwrap_or_else(|| {
        format!(
            "SmartLead answered {} {}",
            failed.status.as_u16(),
            failed.status.canonical_reason().unwrap_or("")
        )
        .trim_end()
        .to_owned()
    });
    UpstreamParts {
        envelope: None,
        raw: None,
        message,
        details,
    }
}

/// The envelope wrapping an upstream answer that was not one.
pub(super) fn upstream_envelope(
    failed: &Failed,
    parts: &UpstreamParts,
    extra: Map<String, Value>,
    served: Option<&Served>,
) -> Value {
    let mut details = Map::new();
    details.insert("upstream_status".into(), failed.status.as_u16().into());
    if let Some(d) = &parts.details {
        details.insert("upstream_details".into(), d.clone());
    }
    details.extend(extra);
    let attempts = served.map_or(1, |s| s.attempts);
    let hint = upstream_hint(failed.status, attempts, parts.details.as_ref());
    details.insert("hint".into(), hint.into());
    let code = code_for_status(failed.status);
    json!({"error": {"code": code, "message": parts.message, "details": details}})
}

/// SmartLead's error answer for the client: its envelope passed through (scrubbed), or
/// its body wrapped into one, keeping the status and (scrubbed) headers.
pub(super) fn wrap(
    failed: &Failed,
    served: &Served,
    request_id: &str,
    secrets: &Secrets,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = failed.headers.clone();
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ETAG,
        header::LAST_MODIFIED,
    ] {
        headers.remove(name);
    }
    let parts = upstream_parts(failed, secrets);
    if let Some(envelope) = &parts.envelope {
        let body = parts
            .raw
            .clone()
            .unwrap_or_else(|| Bytes::from(envelope.to_string()));
        return (failed.status, headers, body);
    }
    let mut extra = Map::new();
    extra.insert("request_id".into(), request_id.into());
    extra.insert("attempts".into(), served.attempts.into());
    if served.budget_exhausted {
        extra.insert("retry_budget_exhausted".into(), true.into());
    }
    if failed.status.is_redirection() {
        // A redirect cannot be followed through the proxy; say where it pointed.
        if let Some(loc) = headers.remove(header::LOCATION) {
            let loc = String::from_utf8_lossy(loc.as_bytes());
            extra.insert("location".into(), secrets.scrub(&loc).into_owned().into());
        }
    }
    let value = upstream_envelope(failed, &parts, extra, Some(served));
    (failed.status, headers, Bytes::from(value.to_string()))
}

pub(super) fn json_message(v: &Value) -> (Option<String>, Option<Value>) {
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
pub(super) fn text_message(body: &[u8], content_type: Option<&str>) -> Option<String> {
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

pub(super) fn html_title(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = lower[start..].find('>')? + start + 1;
    let end = lower[open_end..].find("</title")? + open_end;
    let title = html[open_end..end].trim();
    (!title.is_empty()).then(|| title.to_owned())
}

pub(super) fn strip_tags(html: &str) -> String {
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
