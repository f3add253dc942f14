//! Shared state, the routes, and [`handle`]: the one place every request is wrapped.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use std::panic::AssertUnwindSafe;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::body::BodyBudget;
use crate::config::Settings;
use crate::error::ApiError;
use crate::limiter::Limiter;
use crate::proxy::{self, Served};
use crate::retry::RetryBudget;
use crate::upstream::{API_PREFIX, POOL_MAX_IDLE, Upstream};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Shared, read-mostly state of one proxy instance.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
    /// Each serving thread has its own pool: a request and its upstream connection are
    /// then driven by the same event loop, with no hand-over between threads.
    upstream: Arc<Upstream>,
    /// This thread's copy of the abort signal: waiting on a per-thread channel keeps the
    /// per-request registration off a lock shared by all threads.
    abort: watch::Sender<bool>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    limiter: Limiter,
    retry_budget: RetryBudget,
    /// Request bodies held at once (`server.max_buffered_bytes`).
    bodies: BodyBudget,
    shutting_down: AtomicBool,
    /// Every thread's abort signal, set when the shutdown grace runs out: whatever is
    /// still waiting answers 503.
    aborts: std::sync::Mutex<Vec<watch::Sender<bool>>>,
}

impl AppState {
    pub fn new(settings: Settings) -> Result<Self, String> {
        // Installs the recorder before the first sample.
        crate::metrics::handle();
        let upstream = Arc::new(Upstream::new(
            &settings.upstream,
            settings.secrets(),
            pool_share(&settings),
        )?);
        let limiter = Limiter::from_settings(&settings)?;
        let retry_budget = RetryBudget::new(&settings.retry);
        let bodies = BodyBudget::new(settings.server.max_buffered_bytes);
        let abort = watch::channel(false).0;
        Ok(Self {
            upstream,
            abort: abort.clone(),
            inner: Arc::new(Inner {
                settings,
                limiter,
                retry_budget,
                bodies,
                shutting_down: AtomicBool::new(false),
                aborts: std::sync::Mutex::new(vec![abort.clone()]),
            }),
        })
    }

    /// The same instance with its own upstream connection pool, for another serving
    /// thread.
    pub fn for_worker(&self) -> Result<Self, String> {
        let abort = watch::channel(*self.abort.borrow()).0;
        self.inner
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(abort.clone());
        Ok(Self {
            inner: self.inner.clone(),
            upstream: Arc::new(Upstream::new(
                &self.inner.settings.upstream,
                self.upstream.secrets().clone(),
                pool_share(&self.inner.settings),
            )?),
            abort,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    pub fn retry_budget(&self) -> &RetryBudget {
        &self.inner.retry_budget
    }

    pub fn bodies(&self) -> &BodyBudget {
        &self.inner.bodies
    }

    /// From now on `/readyz` reports 503 so load balancers stop sending traffic.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The grace period is over: requests still waiting are answered 503 now.
    pub fn abort_remaining(&self) {
        for abort in self
            .inner
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            abort.send_replace(true);
        }
    }

    /// Resolves once [`AppState::abort_remaining`] was called.
    pub async fn aborted(&self) {
        let mut rx = self.abort.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }

    fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}

/// Each serving thread's part of [`POOL_MAX_IDLE`].
fn pool_share(settings: &Settings) -> usize {
    POOL_MAX_IDLE.div_ceil(settings.server.worker_count())
}

/// The routes other than `/api/v1/*` (which [`handle`] sends straight to the proxy).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every request goes through here: the one place that wraps requests with what every
/// answer gets (a request id, a panic turned into a 500 envelope, the access log and
/// metrics, and for `/api/v1/*` the access-token check).
///
/// Written as one function rather than a tower stack: the layers (each boxing its future,
/// cloning boxed services and inserting extensions) cost more than the proxying itself
/// (bench/RESULTS.md, overhead).
pub async fn handle(state: AppState, router: Router, req: Request<Incoming>) -> Response {
    let _in_flight = crate::metrics::InFlight::enter();
    let start = Instant::now();
    let mut req = req.map(Body::new);
    let request_id = ensure_request_id(req.headers_mut());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let api = is_api(&path);
    let answer = async {
        // CONNECT would have the upstream client tunnel (and log the target, key and
        // all); TRACE echoes the request back. Neither is for SmartLead.
        if method == http::Method::CONNECT || method == http::Method::TRACE {
            let refused = ApiError::method_not_allowed()
                .detail("request_id", proxy::request_id(req.headers()))
                .detail("method", method.as_str());
            return (refused.into_response(), Served::default());
        }
        if !api {
            let resp = router.oneshot(req).await.unwrap_or_else(|e| match e {});
            return (resp, Served::default());
        }
        if let Some(refused) = crate::auth::refusal(&state, req.headers_mut()) {
            return (refused, Served::default());
        }
        proxy::forward(&state, req).await
    };
    let (mut resp, served) = rescue(answer, &request_id).await;
    resp.headers_mut()
        .insert(REQUEST_ID_HEADER, request_id.clone());
    access_log(
        &state,
        &method,
        &path,
        &request_id,
        &resp,
        served,
        start.elapsed(),
    );
    resp
}

/// Runs `answer`; a panic in it (a bug) becomes a 500 envelope carrying the request id,
/// so the one log line the panic hook writes can be found from the caller's side.
async fn rescue(
    answer: impl Future<Output = (Response, Served)>,
    request_id: &HeaderValue,
) -> (Response, Served) {
    match AssertUnwindSafe(answer).catch_unwind().await {
        Ok(answered) => answered,
        Err(_) => {
            let id = request_id.to_str().unwrap_or("");
            let err = ApiError::internal().detail("request_id", id);
            (err.into_response(), Served::default())
        }
    }
}

/// Paths the proxy forwards: `/api/v1/` and at least one more character.
fn is_api(path: &str) -> bool {
    path.len() > API_PREFIX.len() + 1
        && path.starts_with(API_PREFIX)
        && path.as_bytes()[API_PREFIX.len()] == b'/'
}

/// Keeps the caller's `x-request-id`, or assigns a fresh UUID.
fn ensure_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID_HEADER) {
        return id.clone();
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let id = HeaderValue::from_str(text).expect("a UUID is a valid header value");
    headers.insert(REQUEST_ID_HEADER, id.clone());
    id
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_shutting_down() {
        return ApiError::unavailable("the proxy is shutting down")
            .detail("reason", "shutting_down")
            .into_response();
    }
    let limiter = state.limiter().status();
    if !limiter.is_ready() {
        return ApiError::unavailable("the shared rate limiter (Redis) is unreachable")
            .detail("reason", "redis_unavailable")
            .detail(
                "limiter",
                serde_json::to_value(&limiter).unwrap_or_default(),
            )
            .into_response();
    }
    Json(json!({"status": "ready", "limiter": limiter})).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(state.limiter().queued());
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found()
        .detail("request_id", proxy::request_id(req.headers()))
        .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::method_not_allowed()
        .detail("request_id", proxy::request_id(req.headers()))
        .into_response()
}

/// One log line and one metrics sample per request. Only the path is logged: the query
/// may hold a client's key.
fn access_log(
    state: &AppState,
    method: &http::Method,
    path: &str,
    request_id: &HeaderValue,
    resp: &Response,
    served: Served,
    elapsed: std::time::Duration,
) {
    let status = resp.status().as_u16();
    // A key a client put in the path must not become a label or a log field.
    let path = state.upstream().secrets().scrub(path);
    let route = crate::metrics::route_label(&path);
    if tracing::enabled!(target: "smartlead_proxy::access", tracing::Level::INFO) {
        tracing::info!(
            target: "smartlead_proxy::access",
            request_id = request_id.to_str().unwrap_or(""),
            method = %method,
            path = %path,
            route,
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            attempts = served.attempts,
            queue_wait_ms = served.waited.as_secs_f64() * 1000.0,
            upstream_ms = served.upstream_time.as_secs_f64() * 1000.0,
            "request"
        );
    }
    let source = if served.upstream { "upstream" } else { "proxy" };
    crate::metrics::request_done(route, status, source, elapsed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_a_500_envelope_with_the_request_id() {
        let id = HeaderValue::from_static("req-42");
        let bug = async {
            if id.len() > 1 {
                panic!("a bug");
            }
            (Response::default(), Served::default())
        };
        let (resp, served) = rescue(bug, &id).await;
        assert_eq!(resp.status(), 500);
        assert_eq!(served.attempts, 0);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "INTERNAL_ERROR");
        assert_eq!(v["error"]["details"]["request_id"], "req-42");
    }
}
