//! smartlead-proxy: one polite SmartLead client in front of many.
//!
//! Layout (one concept per file):
//! - [`config`]: typed settings, layered loading and validation.
//! - [`key`]: the API key as a self-redacting secret.
//! - [`error`]: the only module that knows the JSON error envelope.
//! - [`upstream`]: the HTTPS client, target URI building, one attempt.
//! - [`proxy`]: the `/api/v1/*` handler.
//! - [`limiter`]: the shared quota (reservation log; local or Redis backend).
//! - [`retry`]: retry policy (pure functions) and the attempt loop.
//! - [`app`]: router and the middleware stack.
//! - [`server`]: the accept loop (header-read timeout, graceful drain).
//! - [`auth`]: bearer-token access control.
//! - [`body`]: bodies that end when the other side stalls.
//! - [`telemetry`]: tracing subscriber set-up.
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
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::time::Duration;

/// After the grace period, how long the 503 answers get to reach their callers.
const ABORT_FLUSH: Duration = Duration::from_secs(2);

use tokio::net::TcpListener;

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
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let grace = settings.server.shutdown_grace;
    let client_timeout = settings.server.client_timeout;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && settings.server.access_tokens.is_empty() {
        tracing::warn!(%addr, "listening beyond loopback without server.access_tokens: anyone who can reach this port can spend the API quota");
    }
    let state = app::AppState::new(settings).map_err(RunError::Setup)?;
    let router = app::router(state.clone());
    tracing::info!(%addr, "listening");
    let draining = state.clone();

    let signal = async move {
        shutdown.await;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
        state.begin_shutdown();
    };
    let graceful = server::accept(listener, router, client_timeout, signal).await;
    let drain = graceful.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace expired: answering requests still waiting with 503");
            draining.abort_remaining();
            // Give those answers a moment to be written, then stop regardless.
            if tokio::time::timeout(ABORT_FLUSH, &mut drain).await.is_err() {
                tracing::warn!("closing connections still streaming after the grace period");
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}
