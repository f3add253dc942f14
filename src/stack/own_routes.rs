//! The proxy's own routes (`/healthz`, `/readyz`, `/metrics`, and a 404 envelope for
//! anything else) on an axum router; `/api/v1/*` goes on down the stack. CONNECT and
//! TRACE are refused on every path before anything else happens.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{future::RouteFuture, get};
use http::Request;
use serde_json::json;
use tower::{Layer, Service};

use super::Reply;
use crate::accounts::Accounts;
use crate::connections::Connections;
use crate::error::{ProxyError, answer, is_never_forwarded};
use crate::key::Secrets;
use crate::served::Served;
use crate::shutdown::Shutdown;
use crate::upstream::API_PREFIX;

/// Paths the proxy forwards: `/api/v1/` and at least one more character.
pub fn is_api(path: &str) -> bool {
    path.len() > API_PREFIX.len() + 1
        && path.starts_with(API_PREFIX)
        && path.as_bytes()[API_PREFIX.len()] == b'/'
}

/// What the own routes report on.
#[derive(Clone)]
struct Health {
    accounts: Arc<Accounts>,
    cache: Arc<crate::cache::Cache>,
    connections: Connections,
    shutdown: Shutdown,
    /// `/status` and `/status.json` need an access token.
    status_requires_token: bool,
}

#[derive(Clone)]
pub struct OwnRoutesLayer {
    router: Router,
}

impl OwnRoutesLayer {
    pub fn new(
        accounts: &Arc<Accounts>,
        cache: &Arc<crate::cache::Cache>,
        connections: &Connections,
        shutdown: &Shutdown,
        status_requires_token: bool,
    ) -> Self {
        let health = Health {
            accounts: accounts.clone(),
            cache: cache.clone(),
            connections: connections.clone(),
            shutdown: shutdown.clone(),
            status_requires_token,
        };
        Self {
            router: Router::new()
                .route("/healthz", get(healthz))
                .route("/readyz", get(readyz))
                .route("/metrics", get(metrics))
                .route("/status", get(status_page))
                .route("/status.json", get(status_json))
                .fallback(not_found)
                .method_not_allowed_fallback(method_not_allowed)
                .with_state(health),
        }
    }
}

impl<S> Layer<S> for OwnRoutesLayer {
    type Service = OwnRoutes<S>;

    fn layer(&self, inner: S) -> OwnRoutes<S> {
        OwnRoutes {
            inner,
            router: self.router.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OwnRoutes<S> {
    inner: S,
    router: Router,
}

impl<S, B> Service<Request<B>> for OwnRoutes<S>
where
    S: Service<Request<B>, Response = Reply, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = OwnRoutesFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if is_never_forwarded(req.method()) {
            let refused = ProxyError::MethodNotAllowed(req.method().clone());
            let id = super::request_id::of(req.headers());
            let resp = answer(&refused, &Served::default(), id, Secrets::empty());
            return OwnRoutesFuture::Refused {
                reply: Some(Box::new(Reply::new(resp, Served::default()))),
            };
        }
        if is_api(req.uri().path()) {
            return OwnRoutesFuture::Api {
                call: self.inner.call(req),
            };
        }
        OwnRoutesFuture::Own {
            call: Box::pin(self.router.call(req.map(Body::new))),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum OwnRoutesFuture<F> {
        Api { #[pin] call: F },
        // Boxed: the router's future would add its size to every request's, and the
        // proxy's own routes are the rare ones.
        Own { call: Pin<Box<RouteFuture<Infallible>>> },
        // Boxed: rare, and inline it would add its size to every request's future.
        Refused { reply: Option<Box<Reply>> },
    }
}

impl<F> Future for OwnRoutesFuture<F>
where
    F: Future<Output = Result<Reply, Infallible>>,
{
    type Output = Result<Reply, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Api { call } => call.poll(cx),
            Projected::Own { call } => {
                let Ok(resp) = ready!(call.as_mut().poll(cx));
                Poll::Ready(Ok(Reply::new(resp, Served::default())))
            }
            Projected::Refused { reply } => {
                Poll::Ready(Ok(*reply.take().expect("polled after completion")))
            }
        }
    }
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(health): State<Health>, req: Request<Body>) -> Response {
    let id = super::request_id::of(req.headers());
    let not_ready = |reason, limiter| {
        let error = ProxyError::NotReady { reason, limiter };
        answer(&error, &Served::default(), id, Secrets::empty())
    };
    if health.shutdown.has_begun() {
        return not_ready("shutting_down", None);
    }
    if health.connections.at_cap() {
        return not_ready("connections", None);
    }
    let accounts = health.accounts.all();
    // The backend is the same for every account: Redis is up for all or for none.
    let Some(limiter) = accounts.first().map(|a| a.limiter.status()) else {
        return axum::Json(json!({"status": "ready", "accounts": []})).into_response();
    };
    if !limiter.is_ready() {
        return not_ready("redis_unavailable", Some(Box::new(limiter)));
    }
    let each: Vec<serde_json::Value> = accounts
        .iter()
        .map(|a| json!({"name": &*a.name, "limiter": a.limiter.status(), "waiting": a.limiter.queued()}))
        .collect();
    axum::Json(json!({"status": "ready", "limiter": limiter, "accounts": each})).into_response()
}

async fn metrics(State(health): State<Health>) -> Response {
    let queues: Vec<(Arc<str>, [usize; 3])> = health
        .accounts
        .all()
        .iter()
        .map(|a| (a.name.clone(), a.limiter.depth()))
        .collect();
    let body = crate::metrics::render(&queues);
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// A 401 unless the request may see the status.
fn status_refused(health: &Health, req: &Request<Body>) -> Option<Response> {
    if !health.status_requires_token {
        return None;
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::caller::bearer);
    if presented.is_some_and(|t| health.accounts.knows_token(t)) {
        return None;
    }
    let id = super::request_id::of(req.headers());
    Some(answer(
        &ProxyError::Unauthorized,
        &Served::default(),
        id,
        Secrets::empty(),
    ))
}

async fn status_json(State(health): State<Health>, req: Request<Body>) -> Response {
    if let Some(refused) = status_refused(&health, &req) {
        return refused;
    }
    let snapshot = crate::status::snapshot(&health.accounts, &health.cache).await;
    (
        [(http::header::CACHE_CONTROL, "no-store")],
        axum::Json(snapshot),
    )
        .into_response()
}

async fn status_page(State(health): State<Health>, req: Request<Body>) -> Response {
    if let Some(refused) = status_refused(&health, &req) {
        return refused;
    }
    let snapshot = crate::status::snapshot(&health.accounts, &health.cache).await;
    (
        [
            (http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (http::header::CACHE_CONTROL, "no-store"),
            (
                http::header::CONTENT_SECURITY_POLICY,
                crate::status::content_security_policy(),
            ),
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (http::header::REFERRER_POLICY, "no-referrer"),
            (http::header::X_FRAME_OPTIONS, "DENY"),
        ],
        crate::status::page(&snapshot),
    )
        .into_response()
}

async fn not_found(req: Request<Body>) -> Response {
    let id = super::request_id::of(req.headers());
    answer(
        &ProxyError::NotFound,
        &Served::default(),
        id,
        Secrets::empty(),
    )
}

async fn method_not_allowed(req: Request<Body>) -> Response {
    let id = super::request_id::of(req.headers());
    let error = ProxyError::MethodNotAllowed(req.method().clone());
    answer(&error, &Served::default(), id, Secrets::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use tower::ServiceExt;

    fn layer() -> OwnRoutesLayer {
        let mut settings = crate::Settings::default();
        settings.upstream.api_key = Some(crate::key::ApiKey::new("k"));
        let accounts = Arc::new(Accounts::new(&settings).unwrap());
        let store = Arc::new(crate::cache::store::Store::local(1 << 20));
        let cache = Arc::new(crate::cache::Cache::new(&settings.cache, store));
        OwnRoutesLayer::new(
            &accounts,
            &cache,
            &Connections::new(100),
            &Shutdown::default(),
            false,
        )
    }

    /// Answers 299 for anything that reaches it.
    fn api() -> impl Service<Request<Body>, Response = Reply, Error = Infallible> + Clone {
        tower::service_fn(|_: Request<Body>| async {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = http::StatusCode::from_u16(299).unwrap();
            Ok::<_, Infallible>(Reply::new(resp, Served::default()))
        })
    }

    async fn status(method: Method, path: &str) -> u16 {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let reply = layer().layer(api()).oneshot(req).await.unwrap();
        reply.response.status().as_u16()
    }

    #[tokio::test]
    async fn routes_api_paths_on_and_answers_the_rest() {
        assert_eq!(status(Method::GET, "/api/v1/campaigns").await, 299);
        assert_eq!(status(Method::POST, "/api/v1/campaigns/1/leads").await, 299);
        assert_eq!(status(Method::GET, "/healthz").await, 200);
        assert_eq!(status(Method::GET, "/readyz").await, 200);
        assert_eq!(status(Method::GET, "/metrics").await, 200);
        assert_eq!(status(Method::GET, "/api/v1").await, 404);
        assert_eq!(status(Method::GET, "/api/v1/").await, 404);
        assert_eq!(status(Method::GET, "/v1/campaigns").await, 404);
        assert_eq!(status(Method::POST, "/healthz").await, 405);
    }

    #[tokio::test]
    async fn connect_and_trace_never_reach_the_api() {
        for method in [Method::CONNECT, Method::TRACE] {
            assert_eq!(status(method.clone(), "/api/v1/campaigns").await, 405);
            assert_eq!(status(method, "/healthz").await, 405);
        }
    }
}
