//! A panic below (a bug) becomes a 500 `INTERNAL_ERROR` envelope carrying the request
//! id, instead of a dropped connection. The panic hook has logged the panic itself; this
//! layer logs which request it ended and counts it (under the route `other`), since the
//! access log below it never finished.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response};
use tower::{Layer, Service};

use crate::error::{ProxyError, answer};
use crate::key::Secrets;
use crate::served::Served;

#[derive(Clone, Copy, Debug, Default)]
pub struct PanicGuardLayer;

impl<S> Layer<S> for PanicGuardLayer {
    type Service = PanicGuard<S>;

    fn layer(&self, inner: S) -> PanicGuard<S> {
        PanicGuard { inner }
    }
}

#[derive(Clone, Debug)]
pub struct PanicGuard<S> {
    inner: S,
}

/// What the guard keeps to answer and report a panic (little: this is every request).
struct Seen {
    id: HeaderValue,
    method: Method,
    start: Instant,
}

impl<S, B> Service<Request<B>> for PanicGuard<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = PanicGuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let seen = Seen {
            id: crate::headers::get(req.headers(), &super::request_id::REQUEST_ID)
                .cloned()
                .unwrap_or(HeaderValue::from_static("")),
            method: req.method().clone(),
            start: Instant::now(),
        };
        let inner = catch_unwind(AssertUnwindSafe(|| self.inner.call(req))).ok();
        PanicGuardFuture {
            inner,
            seen: Some(seen),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct PanicGuardFuture<F> {
        // `None` once the call itself panicked.
        #[pin]
        inner: Option<F>,
        seen: Option<Seen>,
    }
}

impl<F, E> Future for PanicGuardFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(inner) = this.inner.as_mut().as_pin_mut() {
            match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(answered)) => return Poll::Ready(answered),
                Err(_) => {}
            }
        }
        // Dropping what panicked could panic again: leave it where it is.
        let seen = this.seen.take();
        Poll::Ready(Ok(panicked(seen)))
    }
}

fn panicked(seen: Option<Seen>) -> Response<Body> {
    let Some(seen) = seen else {
        return Response::default();
    };
    let id = seen.id.to_str().unwrap_or("");
    tracing::error!(
        target: "smartlead_proxy::access",
        request_id = id,
        method = %seen.method,
        status = 500,
        latency_ms = seen.start.elapsed().as_secs_f64() * 1000.0,
        "request ended in a panic (a bug): answered 500"
    );
    crate::metrics::request_done("other", 500, "proxy", None, seen.start.elapsed());
    answer(
        &ProxyError::Internal,
        &Served::default(),
        id,
        Secrets::empty(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    async fn envelope(resp: Response<Body>) -> serde_json::Value {
        assert_eq!(resp.status(), 500);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    fn request() -> Request<()> {
        Request::builder()
            .uri("/api/v1/campaigns")
            .header("x-request-id", "req-42")
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_panic_while_answering_becomes_a_500_envelope_with_the_request_id() {
        let svc = tower::service_fn(|req: Request<()>| async move {
            if req.uri().path().len() > 1 {
                panic!("a bug");
            }
            Ok::<_, Infallible>(Response::new(Body::empty()))
        });
        let resp = PanicGuardLayer.layer(svc).oneshot(request()).await.unwrap();
        let v = envelope(resp).await;
        assert_eq!(v["error"]["code"], "INTERNAL_ERROR");
        assert_eq!(v["error"]["details"]["request_id"], "req-42");
    }

    #[tokio::test]
    async fn a_panic_in_the_call_itself_is_caught_too() {
        #[derive(Clone)]
        struct Broken;
        impl Service<Request<()>> for Broken {
            type Response = Response<Body>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<Body>, Infallible>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: Request<()>) -> Self::Future {
                panic!("a bug before any future")
            }
        }
        let resp = PanicGuardLayer
            .layer(Broken)
            .oneshot(request())
            .await
            .unwrap();
        assert_eq!(
            envelope(resp).await["error"]["details"]["request_id"],
            "req-42"
        );
    }

    #[tokio::test]
    async fn answers_pass_through_untouched() {
        let svc = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Body::from("fine")))
        });
        let resp = PanicGuardLayer.layer(svc).oneshot(request()).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
}
