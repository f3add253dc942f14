//! The accept loop: hyper connections with a header-read timeout (against slowloris
//! clients), the router shared rather than rebuilt per connection, graceful draining.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Most request headers accepted (hyper's default, stated here).
pub const MAX_HEADERS: usize = 100;

fn builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_headers(MAX_HEADERS);
    b.http2().timer(TokioTimer::new());
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
                    let service = TowerToHyperService::new(router.clone());
                    tokio::spawn(async move {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
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
