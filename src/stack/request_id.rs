//! Every request gets an `x-request-id` (a client's own is kept, and forwarded to
//! SmartLead), and every answer carries it back.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, as [`RequestId`] left it in the headers.
pub fn of(headers: &HeaderMap) -> &str {
    crate::headers::get(headers, &REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = ensure(req.headers_mut());
        RequestIdFuture {
            inner: self.inner.call(req),
            id: Some(id),
        }
    }
}

/// The longest `x-request-id` a caller's is kept at: ids are stored with recent errors
/// and logged, so one of 60 KB would be kept that size.
pub const MAX_ID: usize = 128;

/// Keeps the caller's `x-request-id` when it is 1 to [`MAX_ID`] visible ASCII
/// characters; else (or without one) assigns a fresh UUID.
fn ensure(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = crate::headers::get(headers, &REQUEST_ID).filter(|id| usable(id)) {
        return id.clone();
    }
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    let id = HeaderValue::from_maybe_shared(crate::slab::copy(&text))
        .expect("a UUID is a valid header value");
    headers.insert(REQUEST_ID, id.clone());
    id
}

fn usable(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    (1..=MAX_ID).contains(&id.len()) && id.iter().all(u8::is_ascii_graphic)
}

pin_project_lite::pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, R, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut answered = ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(id)) = (&mut answered, this.id.take()) {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        Poll::Ready(answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_visible_ids_are_kept() {
        let kept = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
            ensure(&mut h).as_bytes() == v && h[REQUEST_ID].as_bytes() == v
        };
        assert!(kept(b"mine-123"));
        assert!(kept(&[b'a'; MAX_ID]));
        assert!(!kept(&[b'a'; MAX_ID + 1]));
        assert!(!kept(&[b'a'; 60_000]));
        assert!(!kept(b"has space"));
        assert!(!kept(b"tab\there"));
        assert!(!kept("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn ids_from_the_slab_are_whole_and_distinct_across_slabs() {
        let ids: std::collections::HashSet<HeaderValue> =
            (0..1000).map(|_| ensure(&mut HeaderMap::new())).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let text = id.to_str().unwrap();
            assert!(uuid::Uuid::parse_str(text).is_ok(), "{text}");
        }
    }
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// Answers with the id it was given, in its body.
    fn echo_id() -> impl Service<Request<()>, Response = Response<String>, Error = Infallible> {
        tower::service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(of(req.headers()).to_owned()))
        })
    }

    #[tokio::test]
    async fn assigns_an_id_and_answers_with_it() {
        let svc = RequestIdLayer.layer(echo_id());
        let resp = svc.oneshot(Request::new(())).await.unwrap();
        let id = resp.headers()[REQUEST_ID].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 36, "a UUID: {id}");
        assert_eq!(resp.body(), &id, "the inner service saw the same id");
    }

    #[tokio::test]
    async fn keeps_the_callers_id() {
        let svc = RequestIdLayer.layer(echo_id());
        let req = Request::builder()
            .header(REQUEST_ID, "mine-1")
            .body(())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.headers()[REQUEST_ID], "mine-1");
        assert_eq!(resp.body(), "mine-1");
    }
}
