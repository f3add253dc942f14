//! The `/api/v1/*` handler: read the client's request, send it upstream, stream a success
//! back or turn an error into the envelope.

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};

use crate::app::AppState;
use crate::error::{ApiError, normalize_upstream};
use crate::upstream::{request_headers, strip_hop_by_hop};

/// Largest upstream error body read for normalising; SmartLead's are a few hundred bytes.
const ERROR_BODY_CAP: usize = 1024 * 1024;

/// How many upstream attempts a request made, for the access log.
#[derive(Debug, Clone, Copy)]
pub struct Attempts(pub u32);

/// The request id the request-id layer assigned (or the client's own).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(crate::app::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

pub async fn forward(State(state): State<AppState>, req: Request) -> Response {
    let request_id = request_id(req.headers());
    match forward_inner(&state, req, &request_id).await {
        Ok(resp) => resp,
        Err((err, attempts)) => {
            let mut resp = err
                .detail("request_id", request_id)
                .detail("attempts", attempts)
                .into_response();
            resp.extensions_mut().insert(Attempts(attempts));
            resp
        }
    }
}

async fn forward_inner(
    state: &AppState,
    req: Request,
    request_id: &str,
) -> Result<Response, (ApiError, u32)> {
    let (parts, body) = req.into_parts();
    let upstream = state.upstream();
    let target = upstream
        .target(parts.uri.path(), parts.uri.query())
        .map_err(|e| (e, 0))?;
    let body = read_body(body, &parts.headers, state.settings().server.max_body_bytes)
        .await
        .map_err(|e| (e, 0))?;
    let headers = request_headers(&parts.headers);

    let attempts = 1;
    let resp = upstream
        .send(parts.method.clone(), target, &headers, body)
        .await
        .map_err(|e| (e.into_api_error(), attempts))?;

    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let status = head.status;
    let mut resp = if passes_through(status) {
        Response::from_parts(head, Body::new(body))
    } else {
        let bytes = read_error_body(body, &head.headers, state.settings().upstream.timeout).await;
        let mut extra = Map::new();
        extra.insert("request_id".into(), request_id.into());
        extra.insert("attempts".into(), attempts.into());
        error_response(state, status, head.headers, &bytes, extra)
    };
    resp.extensions_mut().insert(Attempts(attempts));
    Ok(resp)
}

/// Successes stream through untouched; 304 has no body to wrap.
fn passes_through(status: StatusCode) -> bool {
    status.is_success() || status.is_informational() || status == StatusCode::NOT_MODIFIED
}

/// Reads the client's body, refusing it as soon as it passes `max_body_bytes`.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}

/// Reads at most [`ERROR_BODY_CAP`] of an error body, decoded; a body that breaks off or
/// stalls yields what arrived, since the status alone is enough to answer.
async fn read_error_body(
    body: hyper::body::Incoming,
    headers: &HeaderMap,
    timeout: Duration,
) -> Bytes {
    let limited = Limited::new(body, ERROR_BODY_CAP);
    let raw = match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        _ => Bytes::new(),
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") | Some("") => raw,
        Some("gzip") | Some("x-gzip") => decode(flate2::read::GzDecoder::new(&raw[..])),
        Some("deflate") => decode(flate2::read::ZlibDecoder::new(&raw[..])),
        // An encoding we cannot read: answer from the status alone.
        Some(_) => Bytes::new(),
    }
}

fn decode(reader: impl Read) -> Bytes {
    let mut out = Vec::new();
    match reader.take(ERROR_BODY_CAP as u64).read_to_end(&mut out) {
        Ok(_) => Bytes::from(out),
        Err(_) => Bytes::new(),
    }
}

/// The client's answer for a non-2xx upstream response.
fn error_response(
    state: &AppState,
    status: StatusCode,
    mut headers: HeaderMap,
    body: &[u8],
    mut extra: Map<String, Value>,
) -> Response {
    let upstream = state.upstream();
    let scrubbed = upstream.key().and_then(|k| k.scrub_bytes(body));
    let body = scrubbed.as_deref().unwrap_or(body);
    if status.is_redirection() {
        // A redirect cannot be followed through the proxy; say where it pointed.
        if let Some(loc) = headers.remove(header::LOCATION) {
            let loc = String::from_utf8_lossy(loc.as_bytes());
            extra.insert("location".into(), upstream.scrub(&loc).into());
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
