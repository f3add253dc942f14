//! One log line and one metrics sample per request, with how it was served. Only the
//! path is logged (the query may hold a client's key), with secrets scrubbed from it, and
//! the route label is made from that scrubbed path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response};
use tower::{Layer, Service};

use super::Reply;
use crate::key::Secrets;
use crate::metrics::InFlight;
use crate::served::Served;

#[derive(Clone, Debug)]
pub struct AccessLogLayer {
    secrets: Arc<Secrets>,
}

impl AccessLogLayer {
    pub fn new(secrets: &Secrets) -> Self {
        Self {
            secrets: Arc::new(secrets.clone()),
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            secrets: self.secrets.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
    secrets: Arc<Secrets>,
}

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Reply, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        // A key a client put in the path must not become a label or a log field.
        let path = self.secrets.scrub(req.uri().path());
        let entry = Entry {
            in_flight: InFlight::enter(),
            start,
            route: crate::metrics::route_of(&path),
            path: logging().then(|| path.into_owned()),
            method: req.method().clone(),
            request_id: crate::headers::get(req.headers(), &super::request_id::REQUEST_ID).cloned(),
        };
        AccessLogFuture {
            inner: self.inner.call(req),
            entry: Some(entry),
        }
    }
}

fn logging() -> bool {
    tracing::enabled!(target: "smartlead_proxy::access", tracing::Level::INFO)
}

/// What the line says about the request, taken when it arrived.
struct Entry {
    // Counts the request as in flight until the entry is written.
    #[allow(dead_code)]
    in_flight: InFlight,
    start: Instant,
    route: crate::metrics::Route,
    /// Only kept when the line will be written.
    path: Option<String>,
    method: Method,
    request_id: Option<HeaderValue>,
}

impl Entry {
    fn write(self, resp: &Response<Body>, served: &Served) {
        let elapsed = self.start.elapsed();
        let status = resp.status().as_u16();
        let not_found = served.upstream && status == 404;
        let route = crate::metrics::route_label(&self.route, not_found);
        if let Some(path) = &self.path {
            let id = self.request_id.as_ref().and_then(|v| v.to_str().ok());
            tracing::info!(
                target: "smartlead_proxy::access",
                request_id = id.unwrap_or(""),
                method = %self.method,
                path = %path,
                route,
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                account = served.account.as_deref().unwrap_or(""),
                attempts = served.attempts,
                queue_wait_ms = served.waited.as_secs_f64() * 1000.0,
                upstream_ms = served.upstream_time.as_secs_f64() * 1000.0,
                "request"
            );
        }
        let source = if served.upstream { "upstream" } else { "proxy" };
        crate::metrics::request_done(route, status, source, served.account.as_ref(), elapsed);
    }
}

pin_project_lite::pin_project! {
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        entry: Option<Entry>,
    }
}

impl<F> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Reply, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(reply) = ready!(this.inner.poll(cx));
        if let Some(entry) = this.entry.take() {
            entry.write(&reply.response, &reply.served);
        }
        Poll::Ready(Ok(reply.response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn answers_with_the_inner_response_and_counts_it_under_a_scrubbed_route() {
        crate::metrics::handle();
        let secrets = crate::key::ApiKey::new("s3cr3t-key").secrets();
        let svc = tower::service_fn(|_: Request<()>| async {
            let mut resp = Response::new(Body::from("ok"));
            *resp.status_mut() = http::StatusCode::ACCEPTED;
            let served = Served {
                attempts: 2,
                upstream: true,
                account: Some("acme".into()),
                ..Served::default()
            };
            Ok::<_, Infallible>(Reply::new(resp, served))
        });
        let req = Request::builder()
            .uri("/api/v1/campaigns/s3cr3t-key?api_key=x")
            .body(())
            .unwrap();
        let resp = AccessLogLayer::new(&secrets)
            .layer(svc)
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let metrics = crate::metrics::render(&[]);
        assert!(
            metrics.contains(
                r#"route="/api/v1/campaigns/***",status="202",source="upstream",account="acme""#
            ),
            "{metrics}"
        );
        assert!(!metrics.contains("s3cr3t"));
    }
}
