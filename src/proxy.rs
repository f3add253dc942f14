//! The `/api/v1/*` handler: read the client's request, run it through the quota and the
//! retry loop, then stream a success back or turn an error into the envelope.

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::app::AppState;
use crate::body::{BodyBudget, BodyShare, IdleTimeout, Stalled};
use crate::error::{ApiError, code_for_status, normalize_upstream};
use crate::leads::{self, Plan};
use crate::retry::{self, Failed, Outcome, Safety};
use crate::traffic::{self, Traffic};
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

impl Served {
    /// Adds another exchange of the same request (auto-batched imports).
    fn add(&mut self, other: Served) {
        self.attempts += other.attempts;
        self.waited += other.waited;
        self.upstream_time += other.upstream_time;
    }
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
/// How many batches an auto-batched lead import was sent in.
pub const BATCHES_HEADER: &str = "x-lead-batches";
/// What a lead import that was sent anyway lacks: `3 leads without first_name`.
pub const LEAD_WARNINGS_HEADER: &str = "x-lead-warnings";
/// How many upstream attempts the proxy made for this request.
pub const ATTEMPTS_HEADER: &str = "x-proxy-attempts";

/// Longer deadlines are refused: nothing waits that long, and a clock plus a huge
/// duration overflows.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(86_400);

fn request_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    let parsed = text
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .or_else(|| humantime::parse_duration(text).ok())
        .filter(|d| !d.is_zero() && *d <= MAX_REQUEST_TIMEOUT);
    parsed.map(Some).ok_or_else(|| {
        ApiError::bad_request(
            "X-Request-Timeout must be a positive number of seconds or a duration like 2500ms, \
             at most a day",
        )
        .detail("header", REQUEST_TIMEOUT_HEADER)
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
        let read = read_body(body, &parts.headers, &settings.server, state.bodies()).await?;
        Ok::<_, ApiError>((target, timeout, read))
    };
    // The body's share of server.max_buffered_bytes is held until the request is done.
    let (target, timeout, (body, _share)) = match prepared.await {
        Ok(p) => p,
        Err(e) => return finish(state, e, &request_id(&parts.headers), Served::default()),
    };
    state.retry_budget().record_request();
    let api_path = parts.uri.path().strip_prefix(API_PREFIX).unwrap_or("");
    let safety = Safety::of(&parts.method, api_path, &parts.headers, &settings.retry);
    let import = leads::is_import(&parts.method, api_path);
    let logged = traffic::wanted(&settings.log, &parts.headers);
    let mut headers = request_headers(parts.headers);
    headers.remove(REQUEST_TIMEOUT_HEADER);
    headers.remove(traffic::DEBUG_HEADER);
    let call = Call {
        target,
        headers,
        safety,
        deadline: timeout.map(|t| Instant::now() + t),
        logged,
    };
    if !import {
        return send(state, &call, parts.method, body).await;
    }
    // Checked before any quota is spent.
    let (plan, warnings) = match leads::plan(&settings.leads, &body) {
        Ok(checked) => checked,
        Err(e) => return finish(state, e, &request_id(&call.headers), Served::default()),
    };
    if let Some(w) = &warnings {
        tracing::warn!(
            request_id = %request_id(&call.headers),
            path = api_path,
            warnings = %w.header(),
            leads = %w.positions(),
            "lead import: leads without personalisation fields (sent anyway)"
        );
    }
    let (mut resp, served) = match plan {
        Plan::Batches(batches) => import_in_batches(state, &call, batches).await,
        Plan::Forward => send(state, &call, parts.method, body).await,
    };
    if let Some(value) = warnings.and_then(|w| HeaderValue::from_str(&w.header()).ok()) {
        resp.headers_mut().insert(LEAD_WARNINGS_HEADER, value);
    }
    (resp, served)
}

/// One request body sent as it is: a success streams back, an error becomes the envelope.
async fn send(state: &AppState, call: &Call, method: Method, body: Bytes) -> (Response, Served) {
    let (outcome, exchange) = exchange(state, call, method, body).await;
    let served = exchange.served();
    let mut resp = match outcome {
        Outcome::Success(resp) => {
            let (mut head, body) = resp.into_parts();
            client_headers(state, &mut head.headers);
            // A body that stalls is cut (the client sees a broken response, never a
            // truncated one passed off as complete).
            let body = IdleTimeout::new(body, state.settings().upstream.timeout);
            let body = match &exchange.traffic {
                Some(t) => Body::new(t.tap(
                    exchange.attempts,
                    head.status,
                    &head.headers,
                    exchange.last_attempt_time,
                    body,
                )),
                None => Body::new(body),
            };
            Response::from_parts(head, body)
        }
        Outcome::Failed(failed) => {
            let mut extra = Map::new();
            if exchange.budget_exhausted {
                extra.insert("retry_budget_exhausted".into(), true.into());
            }
            let request_id = request_id(&call.headers);
            error_response(state, failed, &request_id, served.attempts, extra)
        }
        Outcome::Error(e) => {
            let e = exchange.explain(e);
            let served = Served {
                upstream: false,
                ..served
            };
            return finish(state, e, &request_id(&call.headers), served);
        }
    };
    mark(&mut resp, served.attempts);
    (resp, served)
}

/// Where and how a request goes upstream, for each of its exchanges.
struct Call {
    target: Uri,
    headers: HeaderMap,
    safety: Safety,
    /// The caller's own deadline (`X-Request-Timeout`) for everything.
    deadline: Option<Instant>,
    /// Each attempt goes in the traffic log.
    logged: bool,
}

/// One request body through the quota and the retry loop (ended early if the shutdown
/// grace runs out).
async fn exchange<'a>(
    state: &'a AppState,
    call: &Call,
    method: Method,
    body: Bytes,
) -> (Outcome, retry::Exchange<'a>) {
    let headers = call.headers.clone();
    let mut exchange = retry::Exchange::new(
        state,
        method,
        call.target.clone(),
        headers,
        body,
        call.safety,
    );
    if let Some(at) = call.deadline {
        exchange = exchange.with_deadline(at.saturating_duration_since(Instant::now()));
    }
    if call.logged {
        exchange.traffic = Some(Arc::new(Traffic::new(
            &request_id(&call.headers),
            &exchange.method,
            &call.target,
            &call.headers,
            &exchange.body,
            state.settings().log.body_bytes,
            state.upstream().secrets(),
        )));
    }
    let outcome = tokio::select! {
        outcome = exchange.run() => outcome,
        _ = state.aborted() => Outcome::Error(ApiError::unavailable(
            "the proxy is shutting down and its grace period ran out before this request could finish",
        )),
    };
    (outcome, exchange)
}

/// `leads.auto_batch`: the batches in order, each through the quota and retries, then
/// one merged answer; the first failure stops the import and says what was sent.
async fn import_in_batches(
    state: &AppState,
    call: &Call,
    batches: Vec<leads::Batch>,
) -> (Response, Served) {
    let total_leads: usize = batches.iter().map(|b| b.count).sum();
    let mut merged = leads::Merged::default();
    let mut served = Served {
        upstream: true,
        ..Served::default()
    };
    for (n, batch) in batches.iter().enumerate() {
        let (outcome, exchange) = exchange(state, call, Method::POST, batch.body.clone()).await;
        served.add(exchange.served());
        let failure = match outcome {
            Outcome::Success(resp) => {
                let status = resp.status();
                let timeout = state.settings().upstream.timeout;
                let read = retry::read_failed(resp, timeout).await;
                if let Some(t) = &exchange.traffic {
                    let took = exchange.last_attempt_time;
                    t.answered(exchange.attempts, status, &read.headers, &read.body, took);
                }
                // The merged answer is the proxy's own body: the key never goes in it.
                let secrets = state.upstream().secrets();
                let body = if read.cut {
                    secrets.scrub_cut(&read.body)
                } else {
                    secrets.scrub_bytes(&read.body)
                };
                let mut answer = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
                secrets.scrub_json(&mut answer);
                merged.add(batch, status, answer);
                continue;
            }
            Outcome::Failed(failed) => batch_failure(state, failed),
            Outcome::Error(e) => exchange.explain(e),
        };
        let sent = merged.leads();
        let message = format!(
            "lead import stopped at batch {} of {} ({}): {}. {} were imported; {} were not \
             (SmartLead skips duplicates, so sending the whole import again is safe)",
            n + 1,
            batches.len(),
            leads::range(batch.first, batch.count),
            failure.message,
            if sent == 0 {
                "no leads".to_owned()
            } else {
                leads::range(0, sent)
            },
            leads::range(batch.first, total_leads - batch.first),
        );
        let mut err = ApiError { message, ..failure };
        err = err
            .detail("failed_batch", n + 1)
            .detail("batches", batches.len())
            .detail("imported", (sent > 0).then(|| leads::range(0, sent)))
            .detail(
                "not_imported",
                leads::range(batch.first, total_leads - batch.first),
            )
            .detail("completed", merged.into_answer());
        return finish(state, err, &request_id(&call.headers), served);
    }
    let mut resp = Json(merged.into_answer()).into_response();
    resp.headers_mut()
        .insert(BATCHES_HEADER, HeaderValue::from(batches.len()));
    mark(&mut resp, served.attempts);
    (resp, served)
}

/// A batch's upstream error as the proxy's own error, keeping SmartLead's message and
/// its error object.
fn batch_failure(state: &AppState, failed: Failed) -> ApiError {
    let content_type = failed
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let envelope = normalize_upstream(
        failed.status,
        content_type,
        &failed.body,
        failed.cut,
        state.upstream().secrets(),
        Map::new(),
    )
    .into_bytes();
    let envelope: Value = serde_json::from_slice(&envelope).unwrap_or_default();
    let message = envelope["error"]["message"]
        .as_str()
        .unwrap_or("SmartLead refused the batch")
        .to_owned();
    ApiError::new(failed.status, code_for_status(failed.status), message)
        .detail("upstream_status", failed.status.as_u16())
        .detail("upstream_error", envelope["error"].clone())
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
        .scrubbed(state.upstream().secrets())
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

/// Reads the client's body, refusing it as soon as it passes `max_body_bytes`, or when
/// the bodies held at once would pass `max_buffered_bytes` (then the rest of it is read
/// and dropped, so the client can take the 503 in).
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    server: &crate::config::ServerSettings,
    bodies: &BodyBudget,
) -> Result<(Bytes, BodyShare), ApiError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut share = bodies.share();
    if http_body::Body::is_end_stream(&body) {
        return Ok((Bytes::new(), share));
    }
    let mut body = IdleTimeout::new(body, server.client_timeout);
    let mut chunks: Vec<Bytes> = Vec::new();
    let (mut read, mut room) = (0, true);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&*e, server))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read += data.len();
        if read > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        room = room && share.grow_to(read);
        if room {
            chunks.push(data);
        } else {
            chunks.clear();
        }
    }
    if !room {
        return Err(ApiError::out_of_body_memory());
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    };
    Ok((body, share))
}

fn body_error(
    e: &(dyn std::error::Error + 'static),
    server: &crate::config::ServerSettings,
) -> ApiError {
    if e.downcast_ref::<Stalled>().is_some() {
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            format!(
                "the request body stalled for {} (server.client_timeout)",
                humantime::format_duration(server.client_timeout)
            ),
        );
    }
    ApiError::bad_request("the request body could not be read")
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
        cut,
    } = failed;
    let secrets = state.upstream().secrets();
    extra.insert("request_id".into(), request_id.into());
    extra.insert("attempts".into(), attempts.into());
    if status.is_redirection() {
        // A redirect cannot be followed through the proxy; say where it pointed.
        if let Some(loc) = headers.remove(header::LOCATION) {
            let loc = String::from_utf8_lossy(loc.as_bytes());
            extra.insert("location".into(), Value::from(secrets.scrub(&loc)));
        }
    }
    client_headers(state, &mut headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let out = normalize_upstream(status, content_type.as_deref(), &body, cut, secrets, extra)
        .into_bytes();
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

/// An upstream answer's headers as a client may see them: no hop-by-hop headers, no
/// secret in any value (or name), and `Retry-After` only as the proxy's own whole
/// seconds, capped like its own pauses.
fn client_headers(state: &AppState, headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    state.upstream().secrets().scrub_headers(headers);
    if headers.contains_key(header::RETRY_AFTER) {
        let s = state.settings();
        let cap = s.limit.period.max(s.retry.max_delay);
        match retry::client_retry_after(headers, cap) {
            Some(v) => headers.insert(header::RETRY_AFTER, v),
            None => headers.remove(header::RETRY_AFTER),
        };
    }
}
