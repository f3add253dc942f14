//! What can go wrong on the way through the proxy ([`ProxyError`], with its data) and
//! the one place it becomes an answer ([`answer`]): SmartLead's envelope
//! `{"error":{"code","message","details"}}`.
//!
//! - `envelope`: the proxy's own errors written into it, and the table of codes ([`Code`]);
//! - `upstream`: SmartLead's own error answers, classified and wrapped into it, or passed
//!   through when they already are one;
//! - `hint`: `details.hint`, chosen by matching on the variant.

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

mod envelope;
mod hint;
mod upstream;

use envelope::*;
pub use envelope::{Code, is_envelope};
use hint::*;
pub use upstream::code_for_status;
use upstream::*;

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

    pub fn code(&self) -> Code {
        use ProxyError::*;
        match self {
            NotFound => Code::NotFound,
            MethodNotAllowed(_) => Code::MethodNotAllowed,
            BadPath(_) | BadHeader { .. } | BodyUnreadable => Code::BadRequest,
            UnknownAccount(_) | NoAccount => Code::BadRequest,
            WrongAccount { .. } => Code::Forbidden,
            TooManyClientKeys { .. } => Code::Unavailable,
            InvalidLeads(_) => Code::ValidationError,
            PayloadTooLarge { .. } => Code::PayloadTooLarge,
            BodyStalled { .. } | BodyTooSlow { .. } => Code::RequestTimeout,
            TooManyConnections { .. } => Code::Unavailable,
            Unauthorized => Code::Unauthorized,
            RateLimited(_) => Code::RateLimited,
            OutOfBodyMemory | LimiterUnavailable(_) | NotReady { .. } | ShuttingDown => {
                Code::Unavailable
            }
            UpstreamUnreachable(_) => Code::UpstreamUnavailable,
            UpstreamInvalid(_) => Code::UpstreamError,
            UpstreamTimeout(_) => Code::UpstreamTimeout,
            Upstream(f) => code_for_status(f.status),
            BatchStopped(stop) => stop.cause.code(),
            Internal => Code::InternalError,
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

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
