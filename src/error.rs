//! What can go wrong on the way through the proxy ([`ProxyError`], with its data) and
//! the one place it becomes an answer ([`answer`]): SmartLead's envelope
//! `{"error":{"code","message","details"}}`. The proxy's own errors are written into it;
//! SmartLead's own error answers are wrapped into it, or passed through when they already
//! are one. Hints are chosen by matching on the variant.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::key::Secrets;
use crate::leads::Refusal;
use crate::limiter::{InForce, Limited, Status};
use crate::served::Served;
use crate::upstream::AttemptError;

/// Longest upstream message kept when wrapping text or HTML.
const MAX_MESSAGE_CHARS: usize = 300;

/// A non-2xx upstream answer, body read.
#[derive(Debug, Clone)]
pub struct Failed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body is only the start of what was sent (read cap, broken off, stalled).
    pub cut: bool,
}

/// No quota slot in time: why, when one would be free, the window that held the request
/// back, and every window of the account's quota (as enforced: SmartLead's smaller
/// per-minute limit when it is followed).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimited {
    pub why: Limited,
    pub retry_after: Duration,
    pub window: InForce,
    pub policy: Vec<InForce>,
    pub account: std::sync::Arc<str>,
    /// The client, when it alone was refused (its cap, its share of the queue).
    pub client: Option<String>,
}

/// An auto-batched lead import that stopped at a failing batch.
#[derive(Debug)]
pub struct BatchStop {
    /// 1-based.
    pub batch: usize,
    pub batches: usize,
    /// The failing batch's leads, `lead_list[400..800]`.
    pub leads: String,
    /// Leads the batches before it carried, if any.
    pub imported: Option<String>,
    pub not_imported: String,
    /// The merged answer of the batches that went through.
    pub completed: Value,
    pub cause: ProxyError,
}

/// Everything the proxy answers with an error, and the data each answer needs.
#[derive(Debug)]
pub enum ProxyError {
    /// Not a route of the proxy.
    NotFound,
    /// A method the route does not take; CONNECT and TRACE on any route.
    MethodNotAllowed(Method),
    /// A path the proxy will not forward.
    BadPath(&'static str),
    /// A request header the proxy reads, with a value it cannot use.
    BadHeader {
        name: HeaderName,
        expected: &'static str,
    },
    PayloadTooLarge {
        limit: usize,
    },
    /// The client stopped sending its body for `server.client_timeout`.
    BodyStalled {
        after: Duration,
    },
    BodyUnreadable,
    /// Request bodies held at once would pass `server.max_buffered_bytes`.
    OutOfBodyMemory,
    /// The body did not arrive whole within `server.body_timeout`.
    BodyTooSlow {
        within: Duration,
    },
    /// `server.max_connections` client connections are open.
    TooManyConnections {
        max: usize,
    },
    /// A missing or wrong access token.
    Unauthorized,
    /// A lead import refused before anything was sent.
    InvalidLeads(Box<Refusal>),
    /// No quota slot within the request's deadline, or the queue was full.
    RateLimited(Box<RateLimited>),
    /// The shared limiter is unreachable and `redis.on_error = "reject"`.
    LimiterUnavailable(String),
    /// `X-SmartLead-Account` names no account of this proxy.
    UnknownAccount(String),
    /// No account was chosen and there is no `default` (no `SMARTLEAD_API_KEY`).
    NoAccount,
    /// The token belongs to one account and `X-SmartLead-Account` names another.
    WrongAccount {
        asked: String,
        token_account: String,
    },
    /// `limit.max_client_keys` client-key quotas are held and none is idle.
    TooManyClientKeys {
        retry_after: Duration,
    },
    /// `/readyz`: not ready, and why.
    NotReady {
        reason: &'static str,
        limiter: Option<Box<Status>>,
    },
    /// The grace period ran out before the request could finish.
    ShuttingDown,
    UpstreamUnreachable(String),
    /// SmartLead's answer was not HTTP a client can use.
    UpstreamInvalid(String),
    UpstreamTimeout(Duration),
    /// SmartLead answered with an error.
    Upstream(Box<Failed>),
    BatchStopped(Box<BatchStop>),
    /// A bug.
    Internal,
}

impl From<AttemptError> for ProxyError {
    fn from(e: AttemptError) -> Self {
        match e {
            AttemptError::Connect(reason) | AttemptError::Closed(reason) => {
                ProxyError::UpstreamUnreachable(reason)
            }
            AttemptError::Invalid(reason) => ProxyError::UpstreamInvalid(reason),
            AttemptError::Timeout(after) => ProxyError::UpstreamTimeout(after),
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            BadPath(_) | BadHeader { .. } | BodyUnreadable | InvalidLeads(_) => {
                StatusCode::BAD_REQUEST
            }
            UnknownAccount(_) | NoAccount => StatusCode::BAD_REQUEST,
            WrongAccount { .. } => StatusCode::FORBIDDEN,
            TooManyClientKeys { .. } => StatusCode::SERVICE_UNAVAILABLE,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyStalled { .. } | BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            TooManyConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Unauthorized => StatusCode::UNAUTHORIZED,
            RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            OutOfBodyMemory | LimiterUnavailable(_) | NotReady { .. } | ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamUnreachable(_) | UpstreamInvalid(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Upstream(f) => f.status,
            BatchStopped(stop) => stop.cause.status(),
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ProxyError::*;
        match self {
            NotFound => "NOT_FOUND",
            MethodNotAllowed(_) => "METHOD_NOT_ALLOWED",
            BadPath(_) | BadHeader { .. } | BodyUnreadable => "BAD_REQUEST",
            UnknownAccount(_) | NoAccount => "BAD_REQUEST",
            WrongAccount { .. } => "FORBIDDEN",
            TooManyClientKeys { .. } => "UNAVAILABLE",
            InvalidLeads(_) => "VALIDATION_ERROR",
            PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            BodyStalled { .. } | BodyTooSlow { .. } => "REQUEST_TIMEOUT",
            TooManyConnections { .. } => "UNAVAILABLE",
            Unauthorized => "UNAUTHORIZED",
            RateLimited(_) => "RATE_LIMITED",
            OutOfBodyMemory | LimiterUnavailable(_) | NotReady { .. } | ShuttingDown => {
                "UNAVAILABLE"
            }
            UpstreamUnreachable(_) => "UPSTREAM_UNAVAILABLE",
            UpstreamInvalid(_) => "UPSTREAM_ERROR",
            UpstreamTimeout(_) => "UPSTREAM_TIMEOUT",
            Upstream(f) => code_for_status(f.status),
            BatchStopped(stop) => stop.cause.code(),
            Internal => "INTERNAL_ERROR",
        }
    }

    /// The envelope's message for one of the proxy's own errors.
    fn message(&self) -> String {
        use ProxyError::*;
        match self {
            NotFound => {
                "no such route: the proxy serves /api/v1/*, /healthz, /readyz and /metrics".into()
            }
            MethodNotAllowed(m) if is_never_forwarded(m) => {
                format!("{m} is never forwarded to SmartLead")
            }
            MethodNotAllowed(_) => "this method is not allowed on this route".into(),
            BadPath(why) => (*why).into(),
            BadHeader { name, expected } => format!("{name} must be {expected}"),
            PayloadTooLarge { limit } => {
                format!("request body is larger than the proxy's limit of {limit} bytes")
            }
            BodyStalled { after } => format!(
                "the request body stalled for {} (server.client_timeout)",
                humantime::format_duration(*after)
            ),
            BodyTooSlow { within } => format!(
                "the request body did not arrive whole within {} (server.body_timeout)",
                humantime::format_duration(*within)
            ),
            TooManyConnections { max } => format!(
                "the proxy has {max} client connections open, its most (server.max_connections)"
            ),
            BodyUnreadable => "the request body could not be read".into(),
            OutOfBodyMemory => "the proxy is holding as many request bodies as \
                                server.max_buffered_bytes allows"
                .into(),
            Unauthorized => "missing or wrong access token: send Authorization: Bearer <token> \
                             (server.access_tokens)"
                .into(),
            InvalidLeads(r) => r.message.clone(),
            RateLimited(r) => format!(
                "rate limited: {}; retry after {}s",
                r.why.message(),
                crate::limiter::retry_after_secs(r.retry_after)
            ),
            LimiterUnavailable(reason) => reason.clone(),
            UnknownAccount(name) => format!("no account named {name:?} (X-SmartLead-Account)"),
            NoAccount => "no account chosen, and this proxy has no default account \
                          (SMARTLEAD_API_KEY is not set): name one in X-SmartLead-Account or \
                          use one of its access tokens"
                .into(),
            WrongAccount {
                asked,
                token_account,
            } => format!("this access token is for the account {token_account:?}, not {asked:?}"),
            TooManyClientKeys { .. } => "the proxy holds as many client-key quotas as \
                                         limit.max_client_keys allows, none of them idle"
                .into(),
            NotReady { reason, .. } if *reason == "shutting_down" => {
                "the proxy is shutting down".into()
            }
            NotReady { .. } => "the shared rate limiter (Redis) is unreachable".into(),
            ShuttingDown => "the proxy is shutting down and its grace period ran out before \
                             this request could finish"
                .into(),
            UpstreamUnreachable(reason) => format!("could not reach SmartLead: {reason}"),
            UpstreamInvalid(reason) => format!("SmartLead sent an invalid response: {reason}"),
            UpstreamTimeout(after) => format!(
                "SmartLead did not answer within {}",
                humantime::format_duration(*after)
            ),
            Upstream(f) => format!("SmartLead answered {}", f.status.as_u16()),
            BatchStopped(stop) => stop.cause.message(),
            Internal => "the proxy hit an internal error; this is a bug".into(),
        }
    }

    /// The variant's own details.
    fn details(&self) -> Map<String, Value> {
        use ProxyError::*;
        let mut d = Map::new();
        match self {
            MethodNotAllowed(m) => {
                d.insert("method".into(), m.as_str().into());
            }
            BadHeader { name, .. } => {
                d.insert("header".into(), name.as_str().into());
            }
            PayloadTooLarge { limit } => {
                d.insert("max_body_bytes".into(), (*limit).into());
            }
            OutOfBodyMemory => {
                d.insert("reason".into(), "memory".into());
            }
            TooManyConnections { max } => {
                d.insert("reason".into(), "connections".into());
                d.insert("max_connections".into(), (*max).into());
            }
            InvalidLeads(r) => {
                d.insert("field".into(), r.field.clone().into());
                d.insert("constraint".into(), r.constraint.into());
                if let Some((max, items)) = r.too_many {
                    d.insert("max_items".into(), max.into());
                    d.insert("items".into(), items.into());
                }
            }
            RateLimited(r) => {
                d.insert("reason".into(), r.why.label().into());
                let secs = crate::limiter::retry_after_secs(r.retry_after);
                d.insert("retry_after".into(), secs.into());
                d.insert("window".into(), r.window.label.clone().into());
                d.insert("account".into(), (*r.account).into());
                if let Some(client) = &r.client {
                    d.insert("client".into(), client.clone().into());
                }
            }
            UnknownAccount(name) => {
                d.insert("account".into(), name.clone().into());
            }
            NoAccount => {
                d.insert("account".into(), crate::config::DEFAULT_ACCOUNT.into());
            }
            WrongAccount {
                asked,
                token_account,
            } => {
                d.insert("account".into(), asked.clone().into());
                d.insert("token_account".into(), token_account.clone().into());
            }
            TooManyClientKeys { retry_after } => {
                d.insert("reason".into(), "client_keys".into());
                let secs = crate::limiter::retry_after_secs(*retry_after);
                d.insert("retry_after".into(), secs.into());
            }
            NotReady { reason, limiter } => {
                d.insert("reason".into(), (*reason).into());
                if let Some(l) = limiter {
                    d.insert(
                        "limiter".into(),
                        serde_json::to_value(l).unwrap_or_default(),
                    );
                }
            }
            _ => {}
        }
        d
    }

    /// Headers the answer carries besides its content type.
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        match self {
            ProxyError::RateLimited(r) => {
                let secs = crate::limiter::retry_after_secs(r.retry_after);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                // draft-ietf-httpapi-ratelimit-headers: the window that held it back...
                h.insert("ratelimit-limit", HeaderValue::from(r.window.limit));
                h.insert("ratelimit-remaining", HeaderValue::from(0));
                h.insert("ratelimit-reset", HeaderValue::from(secs));
                // ...and every window of the quota.
                let policy: Vec<String> = r
                    .policy
                    .iter()
                    .map(|w| format!("{};w={}", w.limit, w.period.as_secs().max(1)))
                    .collect();
                if let Ok(v) = HeaderValue::from_str(&policy.join(", ")) {
                    h.insert("ratelimit-policy", v);
                }
            }
            ProxyError::TooManyClientKeys { retry_after } => {
                let secs = crate::limiter::retry_after_secs(*retry_after);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::OutOfBodyMemory | ProxyError::TooManyConnections { .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"smartlead-proxy\""),
                );
            }
            _ => {}
        }
        h
    }

    pub fn from_smartlead(&self) -> bool {
        match self {
            ProxyError::Upstream(_) => true,
            ProxyError::BatchStopped(stop) => stop.cause.from_smartlead(),
            _ => false,
        }
    }
}

/// CONNECT would have the upstream client tunnel (and log its target, key and all);
/// TRACE echoes the request back.
pub fn is_never_forwarded(method: &Method) -> bool {
    *method == Method::CONNECT || *method == Method::TRACE
}

/// The answer for `error`: the envelope (SmartLead's own, passed through, or the
/// proxy's), with what `served` says about the request's way through the proxy and its
/// `request_id`. Secrets are scrubbed from the body.
pub fn answer(
    error: &ProxyError,
    served: &Served,
    request_id: &str,
    secrets: &Secrets,
) -> Response<Body> {
    let (status, mut headers, body) = match error {
        ProxyError::Upstream(failed) => wrap(failed, served, request_id, secrets),
        _ => {
            let value = own_envelope(error, served, Some(request_id), secrets);
            (
                error.status(),
                error.headers(),
                Bytes::from(value.to_string()),
            )
        }
    };
    let body = match secrets.scrub_bytes(&body) {
        std::borrow::Cow::Borrowed(_) => body,
        std::borrow::Cow::Owned(clean) => Bytes::from(clean),
    };
    crate::recent::record(status.as_u16(), &body, request_id, served);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        whole_retry_after(&mut headers);
    }
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Every 429 carries an integer `Retry-After` of at least 1: one that is missing or is
/// not whole seconds becomes 1 (the paths that know better set their own before).
fn whole_retry_after(headers: &mut HeaderMap) {
    let whole = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|secs| secs >= 1);
    if !whole {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
}

/// The envelope of one of the proxy's own errors, as a value.
fn own_envelope(
    error: &ProxyError,
    served: &Served,
    request_id: Option<&str>,
    secrets: &Secrets,
) -> Value {
    let mut details = error.details();
    if let ProxyError::BatchStopped(stop) = error {
        batch_details(&mut details, stop, secrets);
    }
    if let Some(id) = request_id {
        details.insert("request_id".into(), id.into());
        details.insert("attempts".into(), served.attempts.into());
    }
    if let Some(status) = served.last_status.filter(|_| !error.from_smartlead()) {
        details.insert("upstream_status".into(), status.as_u16().into());
    }
    if served.budget_exhausted {
        details.insert("retry_budget_exhausted".into(), true.into());
    }
    details.insert("hint".into(), hint(error, served).into());
    for value in details.values_mut() {
        secrets.scrub_json(value);
    }
    let message = match error {
        ProxyError::BatchStopped(stop) => batch_message(stop, secrets),
        _ => secrets.scrub(&error.message()).into_owned(),
    };
    json!({"error": {"code": error.code(), "message": message, "details": details}})
}

fn batch_message(stop: &BatchStop, secrets: &Secrets) -> String {
    let cause = match &stop.cause {
        ProxyError::Upstream(failed) => upstream_parts(failed, secrets).message,
        other => secrets.scrub(&other.message()).into_owned(),
    };
    format!(
        "lead import stopped at batch {} of {} ({}): {}. {} were imported; {} were not \
         (SmartLead skips duplicates, so sending the whole import again is safe)",
        stop.batch,
        stop.batches,
        stop.leads,
        cause,
        stop.imported.as_deref().unwrap_or("no leads"),
        stop.not_imported,
    )
}

fn batch_details(details: &mut Map<String, Value>, stop: &BatchStop, secrets: &Secrets) {
    details.insert("failed_batch".into(), stop.batch.into());
    details.insert("batches".into(), stop.batches.into());
    details.insert("imported".into(), stop.imported.clone().into());
    details.insert("not_imported".into(), stop.not_imported.clone().into());
    details.insert("completed".into(), stop.completed.clone());
    if let ProxyError::Upstream(failed) = &stop.cause {
        details.insert("upstream_status".into(), failed.status.as_u16().into());
        // SmartLead's own error object, as the caller would have seen it.
        let parts = upstream_parts(failed, secrets);
        let error = match parts.envelope {
            Some(mut v) => v["error"].take(),
            None => upstream_envelope(failed, &parts, Map::new(), None)["error"].take(),
        };
        details.insert("upstream_error".into(), error);
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

/// What an upstream error body says, secrets scrubbed: the raw bytes (also the start of
/// one cut off at the end of a cut body), then every JSON string once its escapes are
/// decoded.
struct UpstreamParts {
    /// Already an envelope: what to pass through.
    envelope: Option<Value>,
    /// Bytes to pass through unchanged when nothing had to be scrubbed.
    raw: Option<Bytes>,
    message: String,
    details: Option<Value>,
}

fn upstream_parts(failed: &Failed, secrets: &Secrets) -> UpstreamParts {
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
fn upstream_envelope(
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
fn wrap(
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

/// True when `v` is already `{"error":{"code":string,"message":string,...}}`.
pub fn is_envelope(v: &Value) -> bool {
    v.get("error").is_some_and(|e| {
        e.get("code").is_some_and(Value::is_string)
            && e.get("message").is_some_and(Value::is_string)
    })
}

fn tried(attempts: u32) -> String {
    match attempts {
        0 => "before any attempt".to_owned(),
        1 => "after 1 attempt (not retried)".to_owned(),
        n => format!("after {n} attempts (retried {} times)", n - 1),
    }
}

/// What the caller should do about one of the proxy's own errors, phrased for someone
/// behind the proxy.
fn hint(error: &ProxyError, served: &Served) -> String {
    use ProxyError::*;
    let tried = tried(served.attempts);
    match error {
        NotFound => "not a route of the proxy: point the client's base URL at \
             http://<proxy>/api/v1 (the proxy's own routes are /healthz, /readyz, /metrics, /status)"
            .into(),
        MethodNotAllowed(m) if is_never_forwarded(m) => "the proxy never tunnels (CONNECT) or \
             echoes (TRACE) requests: send SmartLead's API calls as GET, POST, PUT, PATCH or \
             DELETE under /api/v1/"
            .into(),
        MethodNotAllowed(_) => {
            "the proxy's own routes take GET only; SmartLead's API is under /api/v1/".into()
        }
        BadPath(_) | BodyUnreadable => {
            "fix the request as the message says, then send it again".into()
        }
        BadHeader { name, .. } => {
            format!("fix or drop the {name} header as the message says, then send it again")
        }
        PayloadTooLarge { .. } => "send a smaller body (split a big lead import into several \
             requests), or raise server.max_body_bytes"
            .into(),
        BodyStalled { .. } => "the client stopped sending its request for longer than \
             server.client_timeout: check the client and the network between it and the proxy"
            .into(),
        BodyTooSlow { .. } => "the client sent its request body more slowly than \
             server.body_timeout allows for the whole of it: check the client and the network, \
             or raise server.body_timeout"
            .into(),
        TooManyConnections { .. } => "every connection the proxy may hold is open: clients \
             should reuse keep-alive connections; raise server.max_connections (and the file \
             limit, LimitNOFILE) if this is real load"
            .into(),
        OutOfBodyMemory => "many large requests are waiting in the proxy \
             (server.max_buffered_bytes of bodies held): retry after Retry-After, or raise \
             server.max_buffered_bytes"
            .into(),
        Unauthorized => "the proxy wants an access token: send Authorization: Bearer <token> \
             with one of its server.access_tokens"
            .into(),
        InvalidLeads(r) => format!(
            "fix {} ({}) in the payload, then send it again",
            r.field, r.constraint
        ),
        RateLimited(r) => rate_limit_hint(r),
        UnknownAccount(_) | NoAccount => "name one of the proxy's accounts in \
             X-SmartLead-Account ([[accounts]] names, or default), or send one of its access tokens"
            .into(),
        WrongAccount { .. } => "use the token of the account you name, or leave \
             X-SmartLead-Account out: a token's requests use its own account"
            .into(),
        TooManyClientKeys { .. } => "too many distinct client keys are in use at once: retry \
             after Retry-After, or raise limit.max_client_keys"
            .into(),
        LimiterUnavailable(_) | NotReady { .. } | ShuttingDown => "the proxy is shutting down \
             or cannot reach its shared limiter (Redis, with redis.on_error = \"reject\"): retry \
             in a moment; GET /readyz says which"
            .into(),
        UpstreamUnreachable(reason) if crate::tls::untrusted_certificate(reason) => format!(
            "the upstream's TLS certificate is not trusted {tried}: behind a TLS-inspecting \
             proxy, set upstream.ca_file to the PEM file of the CA that signs its certificates"
        ),
        UpstreamUnreachable(_) => format!(
            "SmartLead could not be reached {tried}: check the network and DNS from the \
             proxy's host and upstream.base_url, then SmartLead's status page"
        ),
        UpstreamInvalid(_) => {
            format!("SmartLead failed {tried}: check SmartLead's status page and retry later")
        }
        UpstreamTimeout(_) => format!(
            "SmartLead did not answer in time {tried}: check SmartLead's status page and retry \
             later; raise upstream.timeout (or X-Request-Timeout) if slow answers are expected"
        ),
        Upstream(f) => upstream_hint(f.status, served.attempts, None),
        BatchStopped(stop) => match &stop.cause {
            Upstream(f) => upstream_hint(f.status, served.attempts, None),
            cause => hint(cause, served),
        },
        Internal => "a bug in the proxy: retry, and report it with this request_id".into(),
    }
}

/// The proxy's own 429, by why no slot was found.
fn rate_limit_hint(r: &RateLimited) -> String {
    let after = format!(
        "after {}s (Retry-After)",
        crate::limiter::retry_after_secs(r.retry_after)
    );
    match r.why {
        Limited::QueueFull => format!(
            "the proxy's queue was full (limit.max_queue requests already waiting): retry \
             {after}, or spread the callers out"
        ),
        Limited::PausedPastDeadline => format!(
            "SmartLead asked the proxy to pause for longer than this request may wait \
             (limit.max_wait); retry {after}. If this repeats, SmartLead's quota for the key \
             is smaller than limit.windows: lower its per-minute window or set \
             limit.follow_upstream = true"
        ),
        Limited::PastDeadline => format!(
            "no quota slot within limit.max_wait (or X-Request-Timeout): the {} window of \
             account {} is full, or other clients' turns come first; retry {after}, raise \
             limit.max_wait, or send fewer requests",
            r.window.label, r.account
        ),
        Limited::ClientQueueFull => format!(
            "this client already has limit.max_queue_per_client requests waiting; retry \
             {after}, or wait for earlier answers before sending more"
        ),
        Limited::ClientCap => format!(
            "this client is over its own cap of {} (limit.per_client); retry {after}",
            r.window.label
        ),
    }
}

/// SmartLead's status table, for someone behind the proxy; `details` are SmartLead's own
/// (a field it named goes in the hint).
fn upstream_hint(status: StatusCode, attempts: u32, details: Option<&Value>) -> String {
    let tried = tried(attempts);
    match status.as_u16() {
        401 => "SmartLead refused the proxy's API key: check SMARTLEAD_API_KEY where the proxy \
             runs, not in the client (the proxy replaces clients' keys unless \
             upstream.allow_client_key = true)"
            .into(),
        403 => "the proxy's API key has no access to this resource: check that the id belongs \
             to the key's SmartLead account and that the plan allows this endpoint"
            .into(),
        404 => "SmartLead has no such resource: list campaigns (GET /api/v1/campaigns) to \
             verify the id"
            .into(),
        409 => "a duplicate: SmartLead already has it; usually safe to ignore".into(),
        400 | 422 => match details.and_then(field) {
            Some(f) => format!("fix {f} in the payload, then send it again"),
            None => "fix the request as the message says, then send it again".into(),
        },
        429 => format!(
            "SmartLead still answered 429 {tried}: its quota for this key is smaller than \
             limit.windows; lower its per-minute window or set limit.follow_upstream = true"
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

/// The payload field SmartLead named, in its details object or the first of a list.
fn field(details: &Value) -> Option<String> {
    let named = |v: &Value| {
        v.get("field")
            .or_else(|| v.get("path"))
            .or_else(|| v.get("param"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match details {
        Value::Array(items) => items.iter().find_map(named),
        other => named(other),
    }
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

    fn failed(status: u16, ct: Option<&str>, body: &str) -> ProxyError {
        let mut headers = HeaderMap::new();
        if let Some(ct) = ct {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        ProxyError::Upstream(Box::new(Failed {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
            cut: false,
        }))
    }

    fn served(attempts: u32) -> Served {
        Served {
            attempts,
            ..Served::default()
        }
    }

    async fn body_of(error: &ProxyError, served: &Served, secrets: &Secrets) -> (u16, Bytes) {
        let resp = answer(error, served, "rid", secrets);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let status = resp.status().as_u16();
        (
            status,
            axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
    }

    async fn wrap_value(status: u16, ct: Option<&str>, body: &str) -> Value {
        let (got, out) = body_of(&failed(status, ct, body), &served(1), &Secrets::default()).await;
        assert_eq!(got, status);
        serde_json::from_slice(&out).unwrap()
    }

    #[tokio::test]
    async fn a_conforming_envelope_passes_through_untouched() {
        let body = r#"{"error":{"code":"VALIDATION_ERROR","message":"bad","details":{"field":"x"}},"extra":1}"#;
        let (_, out) = body_of(&failed(422, None, body), &served(1), &Secrets::default()).await;
        assert_eq!(out, body.as_bytes());
    }

    #[tokio::test]
    async fn wraps_message_shapes() {
        let v = wrap_value(
            404,
            Some("application/json"),
            r#"{"message":"Campaign not found"}"#,
        )
        .await;
        assert_eq!(v["error"]["code"], "NOT_FOUND");
        assert_eq!(v["error"]["message"], "Campaign not found");
        assert_eq!(v["error"]["details"]["upstream_status"], 404);
        assert_eq!(v["error"]["details"]["request_id"], "rid");
        assert!(
            v["error"]["details"]["hint"]
                .as_str()
                .unwrap()
                .contains("list campaigns")
        );

        let v = wrap_value(401, None, r#"{"error":"Invalid API key"}"#).await;
        assert_eq!(v["error"]["code"], "UNAUTHORIZED");
        assert_eq!(v["error"]["message"], "Invalid API key");

        let v = wrap_value(
            422,
            None,
            r#"{"error":{"message":"bad email","details":{"field":"email"}}}"#,
        )
        .await;
        assert_eq!(v["error"]["code"], "VALIDATION_ERROR");
        assert_eq!(v["error"]["details"]["upstream_details"]["field"], "email");
        assert!(
            v["error"]["details"]["hint"]
                .as_str()
                .unwrap()
                .contains("fix email")
        );
    }

    #[tokio::test]
    async fn wraps_html_text_and_empty() {
        let v = wrap_value(
            502,
            Some("text/html"),
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        )
        .await;
        assert_eq!(v["error"]["code"], "UPSTREAM_ERROR");
        assert_eq!(v["error"]["message"], "502 Bad Gateway");
        let v = wrap_value(500, Some("text/plain"), "  Internal\n error  ").await;
        assert_eq!(v["error"]["message"], "Internal error");
        let v = wrap_value(503, None, "").await;
        assert_eq!(
            v["error"]["message"],
            "SmartLead answered 503 Service Unavailable"
        );
        let v = wrap_value(409, None, &"x".repeat(5000)).await;
        assert!(v["error"]["message"].as_str().unwrap().chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    #[tokio::test]
    async fn hints_follow_smartleads_status_table_and_the_proxys_own_cases() {
        let limited = |why| {
            ProxyError::RateLimited(Box::new(RateLimited {
                why,
                retry_after: Duration::from_secs(3),
                window: in_force("60/60s", 60, 60),
                policy: vec![in_force("60/60s", 60, 60)],
                account: "default".into(),
                client: None,
            }))
        };
        let cases: Vec<(ProxyError, u32, &str)> = vec![
            (
                failed(401, None, "x"),
                1,
                "SMARTLEAD_API_KEY where the proxy runs",
            ),
            (ProxyError::Unauthorized, 0, "Authorization: Bearer"),
            (failed(403, None, "x"), 1, "no access to this resource"),
            (failed(404, None, "x"), 1, "list campaigns"),
            (ProxyError::NotFound, 0, "base URL"),
            (failed(409, None, "x"), 1, "safe to ignore"),
            (failed(422, None, "x"), 1, "fix the request"),
            (failed(429, None, "x"), 4, "smaller than limit.windows"),
            (
                failed(500, None, "x"),
                4,
                "after 4 attempts (retried 3 times)",
            ),
            (failed(503, None, "x"), 1, "after 1 attempt (not retried)"),
            (
                ProxyError::UpstreamUnreachable("refused".into()),
                2,
                "could not be reached after 2",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                1,
                "upstream.timeout",
            ),
            (ProxyError::ShuttingDown, 0, "/readyz"),
            (ProxyError::Internal, 0, "bug"),
            (
                ProxyError::PayloadTooLarge { limit: 10 },
                0,
                "server.max_body_bytes",
            ),
            (
                ProxyError::BodyStalled {
                    after: Duration::from_secs(1),
                },
                0,
                "server.client_timeout",
            ),
            (ProxyError::OutOfBodyMemory, 0, "server.max_buffered_bytes"),
            (
                ProxyError::BodyTooSlow {
                    within: Duration::from_secs(60),
                },
                0,
                "server.body_timeout",
            ),
            (
                ProxyError::TooManyConnections { max: 10 },
                0,
                "server.max_connections",
            ),
            (
                ProxyError::MethodNotAllowed(Method::CONNECT),
                0,
                "never tunnels",
            ),
            (limited(Limited::QueueFull), 0, "limit.max_queue"),
            (limited(Limited::PastDeadline), 0, "limit.max_wait"),
            (
                limited(Limited::ClientQueueFull),
                0,
                "limit.max_queue_per_client",
            ),
            (limited(Limited::ClientCap), 0, "limit.per_client"),
            (
                limited(Limited::PausedPastDeadline),
                0,
                "limit.follow_upstream",
            ),
        ];
        for (error, attempts, wanted) in cases {
            let (_, out) = body_of(&error, &served(attempts), &Secrets::default()).await;
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert!(is_envelope(&v), "{v}");
            let hint = v["error"]["details"]["hint"].as_str().unwrap();
            assert!(hint.contains(wanted), "{error:?}: {hint}");
        }
        let (_, out) = body_of(
            &limited(Limited::QueueFull),
            &served(0),
            &Secrets::default(),
        )
        .await;
        assert!(String::from_utf8_lossy(&out).contains("after 3s"));
        // A field SmartLead named, in a list of errors.
        let v = wrap_value(
            400,
            None,
            r#"{"message":"bad","errors":[{"field":"email","msg":"bad"}]}"#,
        )
        .await;
        assert!(
            v["error"]["details"]["hint"]
                .as_str()
                .unwrap()
                .contains("fix email")
        );
    }

    fn in_force(label: &str, limit: usize, secs: u64) -> InForce {
        InForce {
            label: label.into(),
            limit,
            period: Duration::from_secs(secs),
        }
    }

    #[tokio::test]
    async fn a_rate_limit_answer_says_which_window_and_when() {
        let error = ProxyError::RateLimited(Box::new(RateLimited {
            why: Limited::PastDeadline,
            retry_after: Duration::from_millis(2500),
            window: in_force("1000/1h", 1000, 3600),
            policy: vec![
                in_force("10/1s", 10, 1),
                in_force("60/60s", 12, 60),
                in_force("1000/1h", 1000, 3600),
            ],
            account: "acme".into(),
            client: None,
        }));
        let resp = answer(&error, &served(0), "rid", &Secrets::default());
        assert_eq!(resp.status(), 429);
        let h = resp.headers().clone();
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["ratelimit-limit"], "1000");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-reset"], "3");
        assert_eq!(h["ratelimit-policy"], "10;w=1, 12;w=60, 1000;w=3600");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["details"]["window"], "1000/1h");
        assert_eq!(v["error"]["details"]["account"], "acme");
    }

    #[tokio::test]
    async fn secrets_never_come_back_in_any_shape() {
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
            let mut error = failed(400, ct, body);
            if let ProxyError::Upstream(f) = &mut error {
                f.cut = cut;
            }
            let (_, out) = body_of(&error, &served(1), &secrets).await;
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
        let (_, out) = body_of(&failed(400, None, clean), &served(1), &secrets).await;
        assert_eq!(out, clean.as_bytes());
    }

    #[tokio::test]
    async fn a_stopped_import_says_what_went_through_and_keeps_smartleads_error() {
        let stop = BatchStop {
            batch: 2,
            batches: 3,
            leads: "lead_list[400..800]".into(),
            imported: Some("lead_list[0..400]".into()),
            not_imported: "lead_list[400..1000]".into(),
            completed: json!({"upload_count": 400}),
            cause: failed(500, Some("application/json"), r#"{"message":"down"}"#),
        };
        let (status, out) = body_of(
            &ProxyError::BatchStopped(Box::new(stop)),
            &served(5),
            &Secrets::default(),
        )
        .await;
        assert_eq!(status, 500);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let d = &v["error"]["details"];
        assert_eq!(v["error"]["code"], "UPSTREAM_ERROR");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("lead import stopped at batch 2 of 3 (lead_list[400..800]): down.")
        );
        assert_eq!(d["failed_batch"], 2);
        assert_eq!(d["imported"], "lead_list[0..400]");
        assert_eq!(d["not_imported"], "lead_list[400..1000]");
        assert_eq!(d["completed"]["upload_count"], 400);
        assert_eq!(d["upstream_status"], 500);
        assert_eq!(d["upstream_error"]["message"], "down");
        assert_eq!(d["attempts"], 5);
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
            let mut headers = HeaderMap::new();
            if let Some(ct) = ct.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
                headers.insert(header::CONTENT_TYPE, ct);
            }
            let failed = Failed { status: StatusCode::from_u16(status).unwrap(), headers, body: Bytes::from(body), cut: false };
            let (_, _, out) = wrap(&failed, &served(1), "rid", &Secrets::default());
            let v: Value = serde_json::from_slice(&out).expect("always JSON");
            proptest::prop_assert!(is_envelope(&v));
        }
    }
}
