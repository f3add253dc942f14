//! The client's body, read whole before anything else happens, so retries can replay it:
//! at most `server.max_body_bytes` (413), each part within `server.client_timeout` and
//! the whole of it within `server.body_timeout` (408), and all bodies held at once within `server.max_buffered_bytes` (503, after the rest
//! of the body is read and dropped so the client can take the answer in). The body's
//! share of that budget is held until the request is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header, request::Parts};
use http_body::Body;
use tower::{Layer, Service};

use super::{Failure, Reply};
use crate::body::{BodyBudget, BodyShare, IdleTimeout, Stalled, TooSlow};
use crate::config::ServerSettings;
use crate::error::ProxyError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Limits {
    max_body: usize,
    client_timeout: Duration,
    body_timeout: Duration,
    budget: BodyBudget,
}

#[derive(Clone, Debug)]
pub struct BufferLayer {
    limits: Arc<Limits>,
}

impl BufferLayer {
    pub fn new(server: &ServerSettings, budget: &BodyBudget) -> Self {
        Self {
            limits: Arc::new(Limits {
                max_body: server.max_body_bytes,
                client_timeout: server.client_timeout,
                body_timeout: server.body_timeout,
                budget: budget.clone(),
            }),
        }
    }
}

impl<S> Layer<S> for BufferLayer {
    type Service = Buffer<S>;

    fn layer(&self, inner: S) -> Buffer<S> {
        Buffer {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Buffer<S> {
    inner: S,
    limits: Arc<Limits>,
}

impl<S, B> Service<Request<B>> for Buffer<S>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure> + Clone,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = Failure;
    type Future = BufferFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let declared = crate::headers::get(&parts.headers, &header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = self.limits.max_body;
        if declared.is_some_and(|n| n > limit as u64) {
            let error = ProxyError::PayloadTooLarge { limit };
            return BufferFuture::done(Failure::early(error));
        }
        // This service is ready; the clone left behind will be made ready when it is
        // next used.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let share = self.limits.budget.share();
        if body.is_end_stream() {
            return BufferFuture::Calling {
                call: inner.call(Request::from_parts(parts, Bytes::new())),
                _share: share,
            };
        }
        BufferFuture::Reading {
            // Boxed: only a request with a body reads one, and inline this state would
            // add its size to every request's future while it waits for quota.
            reading: Box::new(Reading {
                parts: Some(parts),
                body: IdleTimeout::with_whole_limit(
                    body,
                    self.limits.client_timeout,
                    self.limits.body_timeout,
                ),
                chunks: Vec::new(),
                read: 0,
                room: true,
                share: Some(share),
                inner: Some(inner),
                limits: self.limits.clone(),
            }),
        }
    }
}

/// A body on its way in.
pub struct Reading<S, B> {
    parts: Option<Parts>,
    body: IdleTimeout<B>,
    chunks: Vec<Bytes>,
    read: usize,
    /// False once the memory budget said no: the rest is read and dropped.
    room: bool,
    share: Option<BodyShare>,
    inner: Option<S>,
    limits: Arc<Limits>,
}

impl<S, B> Reading<S, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Bytes, ProxyError>> {
        while let Some(frame) = ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if e.downcast_ref::<Stalled>().is_some() => {
                    let after = self.limits.client_timeout;
                    return Poll::Ready(Err(ProxyError::BodyStalled { after }));
                }
                Err(e) if e.downcast_ref::<TooSlow>().is_some() => {
                    let within = self.limits.body_timeout;
                    return Poll::Ready(Err(ProxyError::BodyTooSlow { within }));
                }
                Err(_) => return Poll::Ready(Err(ProxyError::BodyUnreadable)),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.read += data.len();
            let limit = self.limits.max_body;
            if self.read > limit {
                return Poll::Ready(Err(ProxyError::PayloadTooLarge { limit }));
            }
            let share = self.share.as_mut().expect("held while reading");
            self.room = self.room && share.grow_to(self.read);
            if self.room {
                self.chunks.push(data);
            } else {
                self.chunks.clear();
            }
        }
        if !self.room {
            return Poll::Ready(Err(ProxyError::OutOfBodyMemory));
        }
        Poll::Ready(Ok(match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => Bytes::from(self.chunks.concat()),
        }))
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum BufferFuture<S, B>
    where
        S: Service<Request<Bytes>>,
    {
        Reading { reading: Box<Reading<S, B>> },
        Calling {
            #[pin]
            call: S::Future,
            // The body's share of the budget, given back when the request is done.
            _share: BodyShare,
        },
        // Boxed: rare, and inline it would add its size to every request's future.
        Done { failure: Option<Box<Failure>> },
    }
}

impl<S: Service<Request<Bytes>>, B> BufferFuture<S, B> {
    fn done(failure: Failure) -> Self {
        BufferFuture::Done {
            failure: Some(Box::new(failure)),
        }
    }
}

impl<S, B> Future for BufferFuture<S, B>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Reply, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                Projected::Reading { reading } => match ready!(reading.poll_body(cx)) {
                    Err(error) => BufferFuture::done(Failure::early(error)),
                    Ok(body) => {
                        let parts = reading.parts.take().expect("read once");
                        let mut inner = reading.inner.take().expect("called once");
                        BufferFuture::Calling {
                            call: inner.call(Request::from_parts(parts, body)),
                            _share: reading.share.take().expect("held while reading"),
                        }
                    }
                },
                Projected::Calling { call, .. } => return call.poll(cx),
                Projected::Done { failure } => {
                    return Poll::Ready(Err(*failure.take().expect("polled after completion")));
                }
            };
            self.set(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::served::Served;
    use axum::body::Body as AxumBody;
    use http::Response;
    use http_body_util::{Full, StreamBody};
    use tower::ServiceExt;

    /// Answers 200 with the body it was given.
    fn echo() -> impl Service<Request<Bytes>, Response = Reply, Error = Failure> + Clone {
        tower::service_fn(|req: Request<Bytes>| async move {
            let resp = Response::new(AxumBody::from(req.into_body()));
            Ok::<_, Failure>(Reply::new(resp, Served::default()))
        })
    }

    fn layer(max_body: usize, budget: &BodyBudget) -> BufferLayer {
        let server = ServerSettings {
            max_body_bytes: max_body,
            client_timeout: Duration::from_millis(100),
            ..ServerSettings::default()
        };
        BufferLayer::new(&server, budget)
    }

    async fn body_of(reply: Reply) -> Bytes {
        axum::body::to_bytes(reply.response.into_body(), usize::MAX)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn reads_the_body_whole_and_passes_it_on() {
        let budget = BodyBudget::new(1000);
        let chunks = futures_util::stream::iter(
            ["ab", "cd", "ef"].map(|c| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(c)))),
        );
        let req = Request::new(StreamBody::new(chunks));
        let reply = layer(100, &budget)
            .layer(echo())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(body_of(reply).await, "abcdef");
        assert_eq!(budget.held(), 0, "the share came back");
    }

    #[tokio::test]
    async fn refuses_bodies_over_the_limit_declared_or_not() {
        let budget = BodyBudget::new(1000);
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "11")
            .body(Full::new(Bytes::from("01234567890")))
            .unwrap();
        let err = layer(10, &budget)
            .layer(echo())
            .oneshot(req)
            .await
            .unwrap_err();
        assert!(matches!(
            err.error,
            ProxyError::PayloadTooLarge { limit: 10 }
        ));
        let req = Request::new(Full::new(Bytes::from("01234567890")));
        let err = layer(10, &budget)
            .layer(echo())
            .oneshot(req)
            .await
            .unwrap_err();
        assert!(matches!(err.error, ProxyError::PayloadTooLarge { .. }));
    }

    #[tokio::test]
    async fn refuses_a_body_past_the_memory_budget_and_holds_the_share_while_waiting() {
        let budget = BodyBudget::new(10);
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let wait = Arc::new(std::sync::Mutex::new(Some(wait)));
        // Holds the first request until told, as a request waiting for the quota would.
        let held = tower::service_fn(move |req: Request<Bytes>| {
            let wait = wait.lock().unwrap().take();
            async move {
                if let Some(w) = wait {
                    let _ = w.await;
                }
                let resp = Response::new(AxumBody::from(req.into_body()));
                Ok::<_, Failure>(Reply::new(resp, Served::default()))
            }
        });
        let svc = layer(100, &budget).layer(held);
        let first = tokio::spawn(
            svc.clone()
                .oneshot(Request::new(Full::new(Bytes::from("0123456")))),
        );
        while budget.held() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(budget.held(), 7);
        let err = svc
            .clone()
            .oneshot(Request::new(Full::new(Bytes::from("0123"))))
            .await
            .unwrap_err();
        assert!(matches!(err.error, ProxyError::OutOfBodyMemory));
        release.send(()).unwrap();
        assert_eq!(body_of(first.await.unwrap().unwrap()).await, "0123456");
        assert_eq!(budget.held(), 0);
        let reply = svc
            .oneshot(Request::new(Full::new(Bytes::from("0123"))))
            .await
            .unwrap();
        assert_eq!(body_of(reply).await, "0123");
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_a_408() {
        let stalled =
            futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
        let req = Request::new(StreamBody::new(stalled));
        let err = layer(100, &BodyBudget::new(100))
            .layer(echo())
            .oneshot(req)
            .await
            .unwrap_err();
        assert!(matches!(err.error, ProxyError::BodyStalled { .. }));
    }

    use std::convert::Infallible;
}
