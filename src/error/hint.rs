//! `details.hint`: one sentence on what to do about an error, chosen by its variant
//! (and for SmartLead's answers by their status and the field they name).

use super::*;

pub(super) fn tried(attempts: u32) -> String {
    match attempts {
        0 => "before any attempt".to_owned(),
        1 => "after 1 attempt (not retried)".to_owned(),
        n => format!("after {n} attempts (retried {} times)", n - 1),
    }
}

/// What the caller should do about one of the proxy's own errors, phrased for someone
/// behind the proxy.
pub(super) fn hint(error: &ProxyError, served: &Served) -> String {
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
pub(super) fn rate_limit_hint(r: &RateLimited) -> String {
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
pub(super) fn upstream_hint(status: StatusCode, attempts: u32, details: Option<&Value>) -> String {
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
pub(super) fn field(details: &Value) -> Option<String> {
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
