//! The accept loop: HTTP/1.1 connections (what SmartLead clients speak) with a
//! header-read timeout against slowloris clients, the router shared rather than rebuilt
//! per connection, request heads copied out of hyper's buffers, graceful draining.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Most request headers accepted (hyper's default, stated here).
pub const MAX_HEADERS: usize = 100;

fn builder(header_read_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(MAX_HEADERS);
    b
}

/// Serves connections until `stop` resolves, then returns the handle that drains them.
pub async fn accept(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(header_read_timeout));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let (builder, watcher) = (builder.clone(), graceful.watcher());
                    let router = router.clone();
                    let service = hyper::service::service_fn(move |req| {
                        router.clone().oneshot(detach_head(req))
                    });
                    tokio::spawn(async move {
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        // Client resets and timeouts end here; nothing to report.
                        let _ = watcher.watch(conn).await;
                    });
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
