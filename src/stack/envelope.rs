//! Every error from the layers below becomes SmartLead's JSON envelope, through
//! [`crate::error::answer`]: the proxy's own errors with their hints (and, for its 429s,
//! the RateLimit headers), SmartLead's error answers wrapped or passed through. Every
//! answer, success or not, says in `x-proxy-attempts` how many upstream attempts were made
//! (a conforming envelope passes through unchanged, so the count travels in a header).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::{Failure, Reply};
use crate::error::answer;
use crate::key::Secrets;

/// How many upstream attempts the proxy made for this request.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-proxy-attempts");

#[derive(Clone, Debug)]
pub struct EnvelopeLayer {
    secrets: Arc<Secrets>,
}

impl EnvelopeLayer {
    pub fn new(secrets: &Secrets) -> Self {
        Self {
            secrets: Arc::new(secrets.clone()),
        }
    }
}

impl<S> Layer<S> for EnvelopeLayer {
    type Service = Envelope<S>;

    fn layer(&self, inner: S) -> Envelope<S> {
        Envelope {
            inner,
            secrets: self.secrets.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Envelope<S> {
    inner: S,
    secrets: Arc<Secrets>,
}

impl<S, B> Service<Request<B>> for Envelope<S>
where
    S: Service<Request<B>, Response = Reply, Error = Failure>,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = EnvelopeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The layers below are always ready; an error here would have no request to
        // answer.
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request_id =
            crate::headers::get(req.headers(), &super::request_id::REQUEST_ID).cloned();
        EnvelopeFuture {
            inner: self.inner.call(req),
            request_id,
            secrets: self.secrets.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct EnvelopeFuture<F> {
        #[pin]
        inner: F,
        request_id: Option<HeaderValue>,
        secrets: Arc<Secrets>,
    }
}

impl<F> Future for EnvelopeFuture<F>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    type Output = Result<Reply, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut reply = match ready!(this.inner.poll(cx)) {
            Ok(reply) => reply,
            Err(Failure {
                error,
                mut served,
                headers,
            }) => {
                let id = this.request_id.as_ref().and_then(|v| v.to_str().ok());
                let mut response = answer(&error, &served, id.unwrap_or(""), this.secrets);
                if let Some(headers) = headers {
                    response.headers_mut().extend(*headers);
                }
                served.upstream = error.from_smartlead();
                Reply::new(response, served)
            }
        };
        mark(&mut reply.response, reply.served.attempts);
        Poll::Ready(Ok(reply))
    }
}

/// `x-proxy-attempts`, without allocating for the usual counts.
fn mark(resp: &mut Response<Body>, attempts: u32) {
    const SMALL: [HeaderValue; 5] = [
        HeaderValue::from_static("0"),
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
    ];
    let value = SMALL
        .get(attempts as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(attempts));
    resp.headers_mut().insert(ATTEMPTS_HEADER, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProxyError;
    use crate::served::Served;
    use tower::ServiceExt;

    async fn through(result: Result<Reply, Failure>) -> Reply {
        let result = std::sync::Mutex::new(Some(result));
        let inner = tower::service_fn(move |_: Request<()>| {
            let r = result.lock().unwrap().take().unwrap();
            async move { r }
        });
        let req = Request::builder()
            .header("x-request-id", "rid-7")
            .body(())
            .unwrap();
        EnvelopeLayer::new(&Secrets::default())
            .layer(inner)
            .oneshot(req)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_success_passes_with_its_attempts_counted() {
        let served = Served {
            attempts: 2,
            upstream: true,
            ..Served::default()
        };
        let reply = through(Ok(Reply::new(
            Response::new(Body::from("ok")),
            served.clone(),
        )))
        .await;
        assert_eq!(reply.response.status(), 200);
        assert_eq!(reply.response.headers()[&ATTEMPTS_HEADER], "2");
        assert_eq!(reply.served, served);
    }

    #[tokio::test]
    async fn an_error_becomes_the_envelope_with_the_request_id() {
        let served = Served {
            attempts: 12,
            ..Served::default()
        };
        let mut failure = Failure::new(
            ProxyError::UpstreamTimeout(std::time::Duration::from_secs(1)),
            served,
        );
        let warned = HeaderValue::from_static("1 lead");
        failure.headers_mut().insert("x-lead-warnings", warned);
        let reply = through(Err(failure)).await;
        assert_eq!(reply.response.status(), 504);
        assert_eq!(reply.response.headers()[&ATTEMPTS_HEADER], "12");
        assert_eq!(reply.response.headers()["x-lead-warnings"], "1 lead");
        assert!(!reply.served.upstream, "the proxy's own answer");
        let body = axum::body::to_bytes(reply.response.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "UPSTREAM_TIMEOUT");
        assert_eq!(v["error"]["details"]["request_id"], "rid-7");
        assert_eq!(v["error"]["details"]["attempts"], 12);
    }
}
