//! The accept loop and the per-thread connection loops: HTTP/1.1 connections (what
//! SmartLead clients speak) with a header-read timeout against slowloris clients and a
//! write timeout against clients that stop reading, the thread's stack shared by its
//! connections, request heads copied out of hyper's buffers, graceful draining.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tower::{Service, ServiceExt};

use crate::client::Peer;
use crate::connections::{Connections, Held};

/// An accepted connection, its peer, and its place among the counted connections.
pub type Accepted = (std::net::TcpStream, SocketAddr, Held);

/// A request may carry at most 100 headers (hyper's default; more get a 431). Left to
/// hyper rather than set: given any `max_headers`, hyper fills its two 100-slot parse
/// arrays on every request head (6 KB of writes) instead of leaving them uninitialised.
fn builder(header_read_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    b
}

/// Accepts connections until `stop` resolves and deals them round-robin to the serving
/// threads (one listening socket; each connection then stays on one thread), up to
/// `connections`' cap; past it a connection gets its answer from
/// [`crate::connections::over_cap`]. Dropping the senders on return tells the threads to
/// stop serving new connections.
pub async fn accept(
    listener: TcpListener,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
    connections: &Connections,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut next = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted.and_then(|(s, peer)| Ok((s.into_std()?, peer))) {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(held) = connections.try_open() else {
                        crate::connections::over_cap(stream, connections);
                        continue;
                    };
                    // A worker that is gone has stopped; its connection is just closed.
                    let _ = workers[next].send((stream, peer, held));
                    next = (next + 1) % workers.len();
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
}

/// Where a thread's connections get their stack: the one in force, rebuilt after a
/// reload.
pub trait Stacks: Clone + Send + 'static {
    type Stack;
    /// The stack in force and its generation.
    fn current(&self) -> (u64, Self::Stack);
    /// Whether a stack of `generation` is still the one in force (checked per request,
    /// so it must be cheap).
    fn is_current(&self, generation: u64) -> bool;
}

/// Serves the connections this thread is dealt with the stacks `stacks` gives until the
/// acceptor stops, then returns the handle that drains them.
pub async fn serve_connections<T, S>(
    mut incoming: mpsc::UnboundedReceiver<Accepted>,
    stacks: T,
    header_read_timeout: Duration,
) -> GracefulShutdown
where
    T: Stacks<Stack = S>,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = builder(header_read_timeout);
    while let Some((stream, peer, counted)) = incoming.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not take over a connection");
                continue;
            }
        };
        let watcher = graceful.watcher();
        // This connection's copy of the stack, swapped for the new one after a reload
        // (hyper calls a connection's service one request at a time).
        let (stacks, held) = (stacks.clone(), std::cell::RefCell::new(stacks.current()));
        // The peer tells clients apart when nothing else does (crate::client).
        let peer = Peer(peer.ip().to_canonical());
        let service = hyper::service::service_fn(move |req| {
            let req = detach_head(req);
            let mut held = held.borrow_mut();
            if !stacks.is_current(held.0) {
                *held = stacks.current();
            }
            call_ready(&mut held.1, req)
        });
        let io = TokioIo::new(WriteTimeout::new(stream, header_read_timeout));
        // A combinator, not an `async` block: a block would keep what it captured and,
        // once awaited, a second copy of the connection.
        let conn = watcher
            .watch(builder.serve_connection(io, service))
            // Client resets and timeouts end here; nothing to report.
            .map(move |_| drop(counted));
        tokio::spawn(crate::client::serving(peer, conn));
    }
    graceful
}

/// Calls the connection's own copy of `stack` when it is ready at once (every layer of
/// the proxy's is: none holds capacity), else a clone of it once it is ready. Calling the
/// copy the connection holds saves cloning every layer's handles for each request, and
/// keeps the stack out of the request's future; the clone's way is boxed, so the request's
/// future does not carry a stack and a request either.
fn call_ready<S, R>(
    stack: &mut S,
    req: R,
) -> Either<S::Future, Pin<Box<tower::util::Oneshot<S, R>>>>
where
    S: Service<R> + Clone,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stack.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => Either::Left(stack.call(req)),
        _ => Either::Right(Box::pin(stack.clone().oneshot(req))),
    }
}

/// A connection whose writes give up after `limit` without progress, so a client that
/// stops reading its answer cannot hold the connection (and what feeds it) for ever.
/// The timer is made the first time a write has to wait, and re-armed on each wait.
struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: None,
            armed: false,
        }
    }

    /// After a write that could not proceed: has the client been stuck for `limit`?
    fn stuck(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its answer (server.client_timeout)",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                self.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => self.stuck(cx).map(Err),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.written(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies the request head out of hyper's read buffer. Header values and the path
/// normally point into that buffer, which keeps it alive while the request waits for a
/// quota slot; with the head copied it is freed (or reused) at once. The copies share one
/// allocation, and the values are replaced in hyper's own map.
fn detach_head(req: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    // Origin form is what HTTP/1 clients send; anything else is re-parsed on its own.
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    let target = match (origin_form, parts.uri.path_and_query()) {
        (true, Some(p)) => p.as_str(),
        _ => "",
    };
    let total = target.len() + parts.headers.values().map(HeaderValue::len).sum::<usize>();
    // In the thread's slab: no allocation of its own, and slicing it costs none either.
    let copy = crate::slab::write(total, |copy| {
        copy.extend_from_slice(target.as_bytes());
        for value in parts.headers.values() {
            copy.extend_from_slice(value.as_bytes());
        }
    });
    let target_len = target.len();
    let mut at = target_len;
    for value in parts.headers.values_mut() {
        let end = at + value.len();
        if let Ok(mut copied) = HeaderValue::from_maybe_shared(copy.slice(at..end)) {
            copied.set_sensitive(value.is_sensitive());
            *value = copied;
        }
        at = end;
    }
    let uri = if target_len == 0 {
        parts.uri.to_string().parse().ok()
    } else {
        http::Uri::from_maybe_shared(copy.slice(..target_len)).ok()
    };
    if let Some(uri) = uri {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Not ready until it was polled `busy` more times; `copies` counts the copies alive
    /// by its reference count.
    #[derive(Clone)]
    struct Probe {
        busy: Arc<std::sync::atomic::AtomicUsize>,
        copies: Arc<()>,
    }

    impl Service<u32> for Probe {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.busy.load(SeqCst) == 0 {
                return Poll::Ready(Ok(()));
            }
            self.busy.fetch_sub(1, SeqCst);
            cx.waker().wake_by_ref();
            Poll::Pending
        }

        fn call(&mut self, req: u32) -> Self::Future {
            std::future::ready(Ok(req + 1))
        }
    }

    fn probe(busy: usize) -> Probe {
        Probe {
            busy: Arc::new(busy.into()),
            copies: Arc::new(()),
        }
    }

    #[tokio::test]
    async fn a_ready_stack_is_called_in_place_and_a_busy_one_through_a_clone() {
        let mut ready = probe(0);
        let answered = call_ready(&mut ready, 1);
        assert!(matches!(answered, Either::Left(_)), "called in place");
        assert_eq!(answered.await.unwrap(), 2);

        let mut busy = probe(2);
        let answered = call_ready(&mut busy, 41);
        assert!(matches!(answered, Either::Right(_)), "waits for readiness");
        assert_eq!(answered.await.unwrap(), 42);
        assert_eq!(Arc::strong_count(&busy.copies), 1, "the clone is gone");
    }
}
