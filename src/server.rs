//! The accept loop and the per-thread connection loops: HTTP/1.1 connections (what SmartLead clients speak) with a
//! header-read timeout against slowloris clients, the router shared rather than rebuilt
//! per connection, request heads copied out of hyper's buffers, graceful draining.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::app::{AppState, handle};

/// Most request headers accepted (hyper's default, stated here).
pub const MAX_HEADERS: usize = 100;

fn builder(header_read_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(MAX_HEADERS);
    b
}

/// Accepts connections until `stop` resolves and deals them round-robin to the serving
/// threads (one listening socket; each connection then stays on one thread). Dropping
/// the senders on return tells the threads to stop serving new connections.
pub async fn accept(
    listener: TcpListener,
    workers: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut next = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted.and_then(|(s, _)| s.into_std()) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    // A worker that is gone has stopped; its connection is just closed.
                    let _ = workers[next].send(stream);
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

/// Serves the connections this thread is dealt until the acceptor stops, then returns
/// the handle that drains them.
pub async fn serve_connections(
    mut incoming: mpsc::UnboundedReceiver<std::net::TcpStream>,
    state: AppState,
    router: Router,
    header_read_timeout: Duration,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(header_read_timeout));
    while let Some(stream) = incoming.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not take over a connection");
                continue;
            }
        };
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let (state, router) = (state.clone(), router.clone());
        let service = hyper::service::service_fn(move |req| {
            let answer = handle(state.clone(), router.clone(), detach_head(req));
            answer.map(Ok::<_, Infallible>)
        });
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Client resets and timeouts end here; nothing to report.
            let _ = watcher.watch(conn).await;
        });
    }
    graceful
}

/// Copies the request head out of hyper's read buffer. Header values normally point into
/// that buffer, which keeps it alive while the request waits for a quota slot, so hyper
/// allocates a second one for its next read; with the head copied, the first is reused.
fn detach_head(req: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let shared = std::mem::take(&mut parts.headers);
    let mut owned = HeaderMap::with_capacity(shared.len());
    for (name, value) in &shared {
        let name =
            HeaderName::from_bytes(name.as_str().as_bytes()).unwrap_or_else(|_| name.clone());
        let value = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        owned.append(name, value);
    }
    parts.headers = owned;
    if let Ok(uri) = parts.uri.to_string().parse() {
        parts.uri = uri;
    }
    Request::from_parts(parts, body)
}
