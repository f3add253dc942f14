//! The envelope the proxy writes for its own errors, and the table of its codes.

use super::*;

/// Makes [`Code`], its [`Code::ALL`] and [`Code::as_str`] from one list, so a code is
/// named once and spelled once.
macro_rules! codes {
    ($($variant:ident => $text:literal,)+) => {
        /// The envelope's `code`: every value the proxy writes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Code {
            $($variant,)+
        }

        impl Code {
            /// Every code, for the docs check that each is documented.
            pub const ALL: &[Code] = &[$(Code::$variant,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $text,)+
                }
            }
        }
    };
}

codes! {
    NotFound => "NOT_FOUND",
    MethodNotAllowed => "METHOD_NOT_ALLOWED",
    BadRequest => "BAD_REQUEST",
    Unauthorized => "UNAUTHORIZED",
    Forbidden => "FORBIDDEN",
    Conflict => "CONFLICT",
    PayloadTooLarge => "PAYLOAD_TOO_LARGE",
    RequestTimeout => "REQUEST_TIMEOUT",
    ValidationError => "VALIDATION_ERROR",
    RateLimited => "RATE_LIMITED",
    Unavailable => "UNAVAILABLE",
    UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
    UpstreamError => "UPSTREAM_ERROR",
    UpstreamTimeout => "UPSTREAM_TIMEOUT",
    UpstreamRedirect => "UPSTREAM_REDIRECT",
    InternalError => "INTERNAL_ERROR",
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every 429 carries an integer `Retry-After` of at least 1: one that is missing or is
/// not whole seconds becomes 1 (the paths that know better set their own before).
pub(super) fn whole_retry_after(headers: &mut HeaderMap) {
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
pub(super) fn own_envelope(
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

pub(super) fn batch_message(stop: &BatchStop, secrets: &Secrets) -> String {
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

pub(super) fn batch_details(details: &mut Map<String, Value>, stop: &BatchStop, secrets: &Secrets) {
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

/// True when `v` is already `{"error":{"code":string,"message":string,...}}`.
pub fn is_envelope(v: &Value) -> bool {
    v.get("error").is_some_and(|e| {
        e.get("code").is_some_and(Value::is_string)
            && e.get("message").is_some_and(Value::is_string)
    })
}
