//! The `/api/v1/*` handler: read the client's request, run it through the quota and the
//! retry loop, then stream a success back or turn an error into the envelope.

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};
use std::time::Duration;

use crate::app::AppState;
use crate::body::{IdleTimeout, Stalled};
use crate::error::{ApiError, normalize_upstream};
use crate::retry::{self, Failed, Outcome, Safety};
use crate::upstream::{API_PREFIX, request_headers, strip_hop_by_hop};

/// How a request was served, for the access log and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Served {
    pub attempts: u32,
    /// The status came from SmartLead (not from the proxy itself).
    pub upstream: bool,
    /// Time spent waiting for quota slots.
    pub waited: Duration,
    /// Time spent in upstream attempts.
    pub upstream_time: Duration,
}

/// The request id the request-id layer assigned (or the client's own).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(crate::app::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A caller's own deadline for the whole request: `X-Request-Timeout: 10` (seconds, may
/// be fractional) or a duration such as `2500ms`, `1m`.
pub const REQUEST_TIMEOUT_HEADER: &str = "x-request-timeout";
/// How many upstream attempts the proxy made for this request.
pub const ATTEMPTS_HEADER: &str = "x-proxy-attempts";

fn request_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    let parsed = text
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .or_else(|| {
            humantime::parse_duration(text)
                .ok()
                .filter(|d| !d.is_zero())
        });
    parsed.map(Some).ok_or_else(|| {
        ApiError::bad_request(
            "X-Request-Timeout must be a positive number of seconds or a duration like 2500ms",
        )
    })
}

/// Forwards one `/api/v1/*` request; also says how it was served, for the access log.
pub async fn forward(state: &AppState, req: Request) -> (Response, Served) {
    let (parts, body) = req.into_parts();
    let upstream = state.upstream();
    let settings = state.settings();
    let prepared = async {
        let target = upstream.target(parts.uri.path(), parts.uri.query())?;
        let timeout = request_timeout(&parts.headers)?;
        let body = read_body(body, &parts.headers, &settings.server).await?;
        Ok::<_, ApiError>((target, timeout, body))
    };
    let (target, timeout, body) = match prepared.await {
        Ok(p) => p,
        Err(e) => return finish(state, e, &request_id(&parts.headers), Served::default()),
    };
    state.retry_budget().record_request();
    let api_path = parts.uri.path().strip_prefix(API_PREFIX).unwrap_or("");
    let safety = Safety::of(&parts.method, api_path, &parts.headers, &settings.retry);
    let mut headers = request_headers(parts.headers);
    headers.remove(REQUEST_TIMEOUT_HEADER);
    let mut exchange = retry::Exchange::new(state, parts.method, target, headers, body, safety);
    if let Some(t) = timeout {
        exchange = exchange.with_deadline(t);
    }
    let outcome = tokio::select! {
        outcome = exchange.run() => outcome,
        _ = state.aborted() => Outcome::Error(ApiError::unavailable(
            "the proxy is shutting down and its grace period ran out before this request could finish",
        )),
    };
    let served = Served {
        attempts: exchange.attempts,
        upstream: true,
        waited: exchange.waited,
        upstream_time: exchange.upstream_time,
    };
    let mut resp = match outcome {
        Outcome::Success(resp) => {
            let (mut head, body) = resp.into_parts();
            strip_hop_by_hop(&mut head.headers);
            // A body that stalls is cut (the client sees a broken response, never a
            // truncated one passed off as complete).
            let body = IdleTimeout::new(body, settings.upstream.timeout);
            Response::from_parts(head, Body::new(body))
        }
        Outcome::Failed(failed) => {
            let mut extra = Map::new();
            if exchange.budget_exhausted {
                extra.insert("retry_budget_exhausted".into(), true.into());
            }
            let request_id = request_id(&exchange.headers);
            error_response(state, failed, &request_id, served.attempts, extra)
        }
        Outcome::Error(mut e) => {
            if let Some(s) = exchange.last_status {
                e = e.detail("upstream_status", s.as_u16());
            }
            if exchange.budget_exhausted {
                e = e.detail("retry_budget_exhausted", true);
            }
            let served = Served {
                upstream: false,
                ..served
            };
            return finish(state, e, &request_id(&exchange.headers), served);
        }
    };
    mark(&mut resp, served.attempts);
    (resp, served)
}

/// `x-proxy-attempts` for the caller (conforming upstream envelopes pass through
/// unchanged, so the count travels in a header).
fn mark(resp: &mut Response, attempts: u32) {
    const SMALL: [HeaderValue; 4] = [
        HeaderValue::from_static("0"),
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
    ];
    let value = SMALL
        .get(attempts as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(attempts));
    resp.headers_mut().insert(ATTEMPTS_HEADER, value);
}

/// The envelope for one of the proxy's own errors.
fn finish(state: &AppState, err: ApiError, request_id: &str, served: Served) -> (Response, Served) {
    let limited = err.status == StatusCode::TOO_MANY_REQUESTS;
    let mut resp = err
        .detail("request_id", request_id)
        .detail("attempts", served.attempts)
        .into_response();
    if limited {
        add_ratelimit_headers(state, resp.headers_mut());
    }
    mark(&mut resp, served.attempts);
    (resp, served)
}

/// `RateLimit-*` headers (draft-ietf-httpapi-ratelimit-headers) on the proxy's own 429s.
fn add_ratelimit_headers(state: &AppState, headers: &mut HeaderMap) {
    let l = &state.settings().limit;
    let reset = headers.get(header::RETRY_AFTER).cloned();
    headers.insert("ratelimit-limit", HeaderValue::from(l.requests));
    headers.insert("ratelimit-remaining", HeaderValue::from(0));
    if let Some(reset) = reset {
        headers.insert("ratelimit-reset", reset);
    }
    let policy = format!("{};w={}", l.requests, l.period.as_secs().max(1));
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert("ratelimit-policy", v);
    }
}

/// Reads the client's body, refusing it as soon as it passes `max_body_bytes`.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    server: &crate::config::ServerSettings,
) -> Result<Bytes, ApiError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    if http_body::Body::is_end_stream(&body) {
        return Ok(Bytes::new());
    }
    let body = IdleTimeout::new(body, server.client_timeout);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) if e.downcast_ref::<Stalled>().is_some() => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            format!(
                "the request body stalled for {} (server.client_timeout)",
                humantime::format_duration(server.client_timeout)
            ),
        )),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}

/// The client's answer for a non-2xx upstream response.
fn error_response(
    state: &AppState,
    failed: Failed,
    request_id: &str,
    attempts: u32,
    mut extra: Map<String, Value>,
) -> Response {
    let Failed {
        status,
        mut headers,
        body,
    } = failed;
    strip_hop_by_hop(&mut headers);
    let upstream = state.upstream();
    let scrubbed = upstream.key().and_then(|k| k.scrub_bytes(&body));
    let body = scrubbed.as_deref().unwrap_or(&body);
    extra.insert("request_id".into(), request_id.into());
    extra.insert("attempts".into(), attempts.into());
    if status.is_redirection() {
        // A redirect cannot be followed through the proxy; say where it pointed.
        if let Some(loc) = headers.remove(header::LOCATION) {
            let loc = String::from_utf8_lossy(loc.as_bytes());
            extra.insert("location".into(), Value::from(upstream.scrub(&loc)));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let out = normalize_upstream(status, content_type.as_deref(), body, extra).into_bytes();
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::ETAG,
        header::LAST_MODIFIED,
    ] {
        headers.remove(name);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut resp = (status, out).into_response();
    resp.headers_mut().extend(headers);
    resp
}
