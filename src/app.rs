//! The router and the one place that builds the middleware stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::config::Settings;
use crate::error::ApiError;
use crate::limiter::Limiter;
use crate::proxy::{self, Served};
use crate::retry::RetryBudget;
use crate::upstream::Upstream;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Shared, read-mostly state of one proxy instance.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    upstream: Upstream,
    limiter: Limiter,
    retry_budget: RetryBudget,
    shutting_down: AtomicBool,
    /// Set when the shutdown grace runs out: whatever is still waiting answers 503.
    abort: watch::Sender<bool>,
}

impl AppState {
    pub fn new(settings: Settings) -> Result<Self, String> {
        // Installs the recorder before the first sample.
        crate::metrics::handle();
        let upstream = Upstream::new(&settings.upstream)?;
        let limiter = Limiter::from_settings(&settings)?;
        let retry_budget = RetryBudget::new(&settings.retry);
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                upstream,
                limiter,
                retry_budget,
                shutting_down: AtomicBool::new(false),
                abort: watch::channel(false).0,
            }),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    pub fn limiter(&self) -> &Limiter {
        &self.inner.limiter
    }

    pub fn retry_budget(&self) -> &RetryBudget {
        &self.inner.retry_budget
    }

    /// From now on `/readyz` reports 503 so load balancers stop sending traffic.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The grace period is over: requests still waiting are answered 503 now.
    pub fn abort_remaining(&self) {
        self.inner.abort.send_replace(true);
    }

    /// Resolves once [`AppState::abort_remaining`] was called.
    pub async fn aborted(&self) {
        let mut rx = self.inner.abort.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }

    fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}

pub fn router(state: AppState) -> Router {
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal().into_response()
        }));
    // The token check costs a boxed future per request: only installed when configured.
    let mut api = any(proxy::forward);
    if !state.settings().server.access_tokens.is_empty() {
        api = api.layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_token,
        ));
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/{*rest}", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are limited (with an envelope) where they are read, in `proxy`.
        .layer(DefaultBodyLimit::disable())
        .layer(stack)
        .with_state(state)
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
async fn access_log(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let _in_flight = crate::metrics::InFlight::enter();
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let logging = tracing::enabled!(target: "smartlead_proxy::access", tracing::Level::INFO);
    let request_id = if logging {
        proxy::request_id(req.headers())
    } else {
        String::new()
    };
    let resp = next.run(req).await;
    let served = resp
        .extensions()
        .get::<Served>()
        .copied()
        .unwrap_or_default();
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    let route = crate::metrics::route_label(&path);
    if logging {
        tracing::info!(
            target: "smartlead_proxy::access",
            request_id,
            method = %method,
            path = %state.upstream().scrub(&path),
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
    crate::metrics::request_done(&route, status, source, elapsed);
    resp
}
