//! smartlead-proxy: one polite SmartLead client in front of many.
//!
//! Layout (one concept per file):
//! - [`config`]: typed settings, layered loading and validation.
//! - [`key`]: the API key as a self-redacting secret.
//! - [`error`]: the only module that knows the JSON error envelope.
//! - [`upstream`]: the HTTPS client, target URI building, one attempt.
//! - [`proxy`]: the `/api/v1/*` handler.
//! - [`leads`]: the lead-import guard (validation, batching, merged answers).
//! - [`limiter`]: the shared quota (reservation log; local or Redis backend).
//! - [`retry`]: retry policy (pure functions) and the attempt loop.
//! - [`app`]: router and the middleware stack.
//! - [`server`]: the accept loop (header-read timeout, graceful drain).
//! - [`auth`]: bearer-token access control.
//! - [`body`]: bodies that end when the other side stalls.
//! - [`telemetry`]: tracing subscriber set-up.
//! - [`traffic`]: the debug traffic log (bodies truncated, key redacted).
//! - [`metrics`]: Prometheus metric names and the recorder.
//! - [`sim`]: the simulated SmartLead used by tests, demos and benchmarks.
//! - [`healthcheck`]: the `healthcheck` subcommand for container images.
//! - [`demo`]: the `demo` subcommand.
//!
//! [`run`] serves on a bound listener until `shutdown` resolves, then drains.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod body;
pub mod config;
pub mod demo;
pub mod error;
pub mod healthcheck;
pub mod key;
pub mod leads;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod traffic;
pub mod upstream;

use std::future::Future;
use std::time::Duration;

/// After the grace period, how long the 503 answers get to reach their callers.
const ABORT_FLUSH: Duration = Duration::from_secs(2);

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub use config::Settings;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("start-up failed: {0}")]
    Setup(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the proxy on `listener` until `shutdown` resolves; then stops accepting, lets
/// in-flight requests finish within `server.shutdown_grace` and returns.
///
/// The calling task serves too; `server.workers - 1` more threads each run their own
/// single-threaded event loop on the same listening socket (thread-per-core: a request
/// never changes threads, which is what keeps the added latency low).
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && settings.server.access_tokens.is_empty() {
        tracing::warn!(%addr, "listening beyond loopback without server.access_tokens: anyone who can reach this port can spend the API quota");
    }
    let workers = settings.server.worker_count();
    let state = app::AppState::new(settings).map_err(RunError::Setup)?;
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let mine = receivers.remove(0);
    let mut finished = Vec::with_capacity(workers);
    for (n, incoming) in receivers.into_iter().enumerate() {
        let state = state.for_worker().map_err(RunError::Setup)?;
        finished.push(spawn_worker(n + 1, incoming, state)?);
    }
    tracing::info!(%addr, workers, "listening");
    let signal_state = state.clone();
    let stop = async move {
        shutdown.await;
        let grace = signal_state.settings().server.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
        signal_state.begin_shutdown();
    };
    tokio::join!(server::accept(listener, senders, stop), serve(mine, state));
    for done in finished {
        let _ = done.await;
    }
    tracing::info!("stopped");
    Ok(())
}

type Incoming = mpsc::UnboundedReceiver<std::net::TcpStream>;

/// One more serving thread with its own event loop; the receiver resolves when it ends.
fn spawn_worker(
    n: usize,
    incoming: Incoming,
    state: app::AppState,
) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("worker-{n}"))
        .spawn(move || {
            runtime.block_on(serve(incoming, state));
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Serves this thread's connections until the acceptor stops, then drains them within
/// the grace period; whatever still waits after it is answered 503.
async fn serve(incoming: Incoming, state: app::AppState) {
    let grace = state.settings().server.shutdown_grace;
    let client_timeout = state.settings().server.client_timeout;
    let router = app::router(state.clone());
    let graceful = server::serve_connections(incoming, state.clone(), router, client_timeout).await;
    let drain = graceful.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace expired: answering requests still waiting with 503");
            state.abort_remaining();
            // Give those answers a moment to be written, then stop regardless.
            if tokio::time::timeout(ABORT_FLUSH, &mut drain).await.is_err() {
                tracing::warn!("closing connections still streaming after the grace period");
            }
        }
    }
}
