//! The simulator's routes: a gate (record, rate limit, faults, auth) in front of
//! SmartLead-shaped handlers, plus the `/_sim` control endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::server::ConnKill;
use super::{Campaign, Fault, FaultAction, Recorded, SimState, lock, query_values, reset, stats};

type St = State<Arc<SimState>>;

pub fn router(state: Arc<SimState>) -> Router {
    let api = Router::new()
        .route("/api/v1/campaigns", get(list_campaigns))
        .route("/api/v1/campaigns/create", post(create_campaign))
        .route(
            "/api/v1/campaigns/{id}",
            get(get_campaign).delete(delete_campaign),
        )
        .route(
            "/api/v1/campaigns/{id}/leads",
            get(list_leads).post(import_leads),
        )
        .route("/api/v1/campaigns/{id}/analytics", get(campaign_analytics))
        .route("/api/v1/echo", any(echo))
        .route("/api/v1/echo/{*rest}", any(echo))
        .fallback(|| async {
            envelope(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Route not found",
                json!({}),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), gate));
    let control = Router::new()
        .route("/_sim/faults", post(add_fault))
        .route("/_sim/requests", get(recorded))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/reset", post(sim_reset));
    api.merge(control).with_state(state)
}

fn envelope(status: StatusCode, code: &str, message: &str, details: Value) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "details": details}})),
    )
        .into_response()
}

/// Records the request, applies the rate limit, a scripted fault and the key check.
async fn gate(State(state): St, req: Request, next: Next) -> Response {
    let now = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let query = parts.uri.query().map(str::to_owned);
    let key = query_values(query.as_deref(), "api_key")
        .pop()
        .unwrap_or_default();
    let admitted = state.admit(&key, now);
    record(&state, &parts, query, &body, now, admitted.is_err());
    let limit = state.described().map_or(0, |(n, _)| n);
    let (remaining, reset) = match admitted {
        Ok(r) => r,
        Err(retry_after) => return rate_limited(limit, retry_after),
    };

    if !state.config.latency.is_zero() {
        tokio::time::sleep(state.config.latency).await;
    }
    let api_path = parts.uri.path().trim_start_matches("/api/v1");
    let mut resp = match state.take_fault(api_path) {
        Some(FaultAction::Hang) => std::future::pending().await,
        Some(FaultAction::Truncated { first, reset }) => {
            let kill = parts.extensions.get::<ConnKill>().cloned();
            truncated(first, reset, kill)
        }
        Some(FaultAction::Reset) => {
            if let Some(kill) = parts.extensions.get::<ConnKill>() {
                kill.kill();
            }
            std::future::pending().await
        }
        Some(FaultAction::Respond {
            status,
            body,
            content_type,
            headers,
            bytes,
        }) => {
            let body = bytes.map_or_else(|| Body::from(body), Body::from);
            scripted(status, body, content_type, headers)
        }
        other => {
            if let Some(FaultAction::Delay { ms }) = other {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if state.key_ok(&key) {
                next.run(Request::from_parts(parts, Body::from(body))).await
            } else {
                envelope(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "Invalid or missing API key",
                    json!({}),
                )
            }
        }
    };
    if limit > 0 {
        set_rate_headers(&mut resp, limit, remaining, reset);
    }
    resp
}

/// Counts the request, and keeps it when the simulator records.
fn record(
    state: &SimState,
    parts: &http::request::Parts,
    query: Option<String>,
    body: &bytes::Bytes,
    at: Instant,
    rate_limited: bool,
) {
    use std::sync::atomic::Ordering::Relaxed;
    state.seen.fetch_add(1, Relaxed);
    if rate_limited {
        state.limited.fetch_add(1, Relaxed);
    }
    if state.config.record {
        lock(&state.log).push(Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query,
            headers: parts.headers.clone(),
            body: body.clone(),
            at,
            rate_limited,
        });
    }
}

fn scripted(
    status: u16,
    body: Body,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, body).into_response();
    resp.headers_mut().remove(http::header::CONTENT_TYPE);
    let h = resp.headers_mut();
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(http::header::CONTENT_TYPE, ct);
    }
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            h.append(n, v);
        }
    }
    resp
}

/// A 200 whose body breaks off after `first`: it then hangs, or the connection resets.
fn truncated(first: String, reset: bool, kill: Option<ConnKill>) -> Response {
    use futures_util::StreamExt;
    let promised = first.len() + 1000;
    let head =
        futures_util::stream::once(
            async move { Ok::<_, std::io::Error>(bytes::Bytes::from(first)) },
        );
    let tail = futures_util::stream::once(async move {
        if reset {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(k) = kill {
                k.kill();
            }
        }
        std::future::pending::<Result<bytes::Bytes, std::io::Error>>().await
    });
    let mut resp = Response::new(Body::from_stream(head.chain(tail)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(promised));
    resp
}

fn rate_limited(limit: u32, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = envelope(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        "Rate limit exceeded",
        json!({"retry_after": secs}),
    );
    // SmartLead may also carry it inside the error object.
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    set_rate_headers(&mut resp, limit, 0, retry_after);
    resp
}

fn set_rate_headers(resp: &mut Response, limit: u32, remaining: u32, reset: Duration) {
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    h.insert(
        "x-ratelimit-reset",
        HeaderValue::from(reset.as_secs_f64().ceil() as u64),
    );
}

fn campaign_json(c: &Campaign) -> Value {
    json!({"id": c.id, "name": c.name, "status": c.status, "lead_count": c.leads.len()})
}

fn no_campaign(id: u64) -> Response {
    envelope(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "Campaign not found",
        json!({"campaign_id": id}),
    )
}

async fn list_campaigns(State(state): St) -> Json<Value> {
    Json(Value::Array(
        lock(&state.campaigns).values().map(campaign_json).collect(),
    ))
}

async fn create_campaign(State(state): St, body: axum::body::Bytes) -> Response {
    let name = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "Untitled".into());
    let mut campaigns = lock(&state.campaigns);
    let id = campaigns.keys().next_back().copied().unwrap_or(1000) + 1;
    let c = Campaign {
        id,
        name,
        status: "DRAFTED",
        leads: Vec::new(),
        emails: Default::default(),
    };
    let out = json!({"ok": true, "id": id, "name": c.name});
    campaigns.insert(id, c);
    Json(out).into_response()
}

async fn get_campaign(State(state): St, Path(id): Path<u64>) -> Response {
    match lock(&state.campaigns).get(&id) {
        Some(c) => Json(campaign_json(c)).into_response(),
        None => no_campaign(id),
    }
}

async fn delete_campaign(State(state): St, Path(id): Path<u64>) -> Response {
    match lock(&state.campaigns).remove(&id) {
        Some(_) => Json(json!({"ok": true})).into_response(),
        None => no_campaign(id),
    }
}

async fn list_leads(State(state): St, Path(id): Path<u64>) -> Response {
    match lock(&state.campaigns).get(&id) {
        Some(c) => Json(json!({"total_leads": c.leads.len(), "data": c.leads})).into_response(),
        None => no_campaign(id),
    }
}

/// Counts SmartLead's analytics has, from what the simulator knows: its leads.
async fn campaign_analytics(State(state): St, Path(id): Path<u64>) -> Response {
    match lock(&state.campaigns).get(&id) {
        Some(c) => Json(json!({
            "id": c.id,
            "name": c.name,
            "status": c.status,
            "campaign_lead_stats": {"total": c.leads.len()},
            "sent_count": "0",
            "open_count": "0",
            "reply_count": "0",
        }))
        .into_response(),
        None => no_campaign(id),
    }
}

fn invalid(field: &str, constraint: &str, message: &str) -> Response {
    envelope(
        StatusCode::UNPROCESSABLE_ENTITY,
        "VALIDATION_ERROR",
        message,
        json!({"field": field, "constraint": constraint}),
    )
}

async fn import_leads(State(state): St, Path(id): Path<u64>, body: axum::body::Bytes) -> Response {
    let Some(list) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("lead_list").and_then(Value::as_array).cloned())
    else {
        return invalid("lead_list", "required", "lead_list must be an array");
    };
    if list.len() > 400 {
        return invalid("lead_list", "max_items", "at most 400 leads per request");
    }
    if let Some(i) = list.iter().position(|l| {
        l.get("email")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    }) {
        return invalid(
            &format!("lead_list[{i}].email"),
            "required",
            "every lead needs an email",
        );
    }
    let mut campaigns = lock(&state.campaigns);
    let Some(c) = campaigns.get_mut(&id) else {
        return no_campaign(id);
    };
    let mut added = 0;
    for lead in list.iter() {
        let email = lead["email"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if c.emails.insert(email) {
            c.leads.push(lead.clone());
            added += 1;
        }
    }
    Json(json!({
        "ok": true,
        "upload_count": added,
        "total_leads": list.len(),
        "already_added_to_campaign": list.len() - added,
        "invalid_email_count": 0,
        "unsubscribed_leads": 0
    }))
    .into_response()
}

/// Answers with what arrived (the key's value hidden), for forwarding tests.
async fn echo(req: Request) -> Json<Value> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| {
                let v = if k == "api_key" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    Json(json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": query,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    }))
}

async fn add_fault(State(state): St, Json(fault): Json<Fault>) -> StatusCode {
    lock(&state.faults).push_back(fault);
    StatusCode::NO_CONTENT
}

async fn recorded(State(state): St) -> Json<Value> {
    let log = lock(&state.log);
    Json(Value::Array(
        log.iter()
            .map(|r| json!({"method": r.method, "path": r.path, "rate_limited": r.rate_limited}))
            .collect(),
    ))
}

async fn sim_stats(State(state): St) -> Json<super::SimStats> {
    Json(stats(&state))
}

async fn sim_reset(State(state): St) -> StatusCode {
    reset(&state);
    StatusCode::NO_CONTENT
}
