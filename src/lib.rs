//! smartlead-proxy: one polite SmartLead client in front of many.
//!
//! A request's way through, in the order it meets each part ([`stack`] composes them,
//! once, with a `tower::ServiceBuilder`):
//!
//! - [`server`]: the acceptor deals connections to the serving threads, up to the cap
//!   [`connections`] keeps (past it: a 503 and close; it also raises the open-files
//!   limit at start); each thread serves its connections (HTTP/1.1, header-read and
//!   write timeouts) with its own [`stack`] and its own upstream connection pool.
//! - [`stack::request_id`] → [`stack::panic_guard`] → [`stack::access_log`] (with
//!   [`metrics`]) → [`stack::own_routes`] (`/healthz`, `/readyz`, `/metrics`; CONNECT and
//!   TRACE refused) → [`stack::caller`] (the token, the account the request uses:
//!   [`accounts`]; the client it comes from, its priority and cap: [`client`]) →
//!   [`stack::envelope`] (every error becomes
//!   the JSON envelope in [`error::answer`], the one place that answers) →
//!   [`stack::buffer`] (the body, bounded; [`body`]) → [`stack::body_key`] (a client's
//!   `api_key` taken out of the body: [`key::in_body`]) → [`stack::cache`] (the response
//!   cache and the coalescing line: [`cache`]) → [`stack::lead_import`] (the
//!   lead-import guard and batching; [`leads`]) → [`stack::key_injection`] (the target
//!   and the key from [`upstream::Target`]; secrets scrubbed from what comes back, success
//!   bodies as they stream: [`key::streamed`]) →
//!   [`stack::quota_retry`] (the [`limiter`]: when slots are, and the fair line that
//!   decides who uses each; the [`retry`] policy in one loop; the [`traffic`] log) →
//!   [`upstream::UpstreamClient`] (one attempt).
//!
//! Around it:
//! - settings: [`config`] (typed settings, layered loading, validation) with [`shown`]
//!   (how errors show a user's values without secrets), [`reload`] (the settings in
//!   force, stacks rebuilt per generation, SIGHUP reloads);
//! - the key: [`key`] (the self-redacting key, and [`key::Secrets`], which owns all
//!   redaction), [`telemetry`] (the redacting log sink, one-line panics);
//! - the way out: [`tls`] and [`egress`] (trusted roots and the CONNECT proxy);
//! - seeing it: [`status`] (the status page, its JSON and terminal table), [`recent`] (the
//!   last error answers), [`served`] (how a request was served), [`metrics`];
//! - plumbing: [`headers`] (taking headers out of a message), [`slab`] (small
//!   per-request strings cut from a per-thread slab), [`shutdown`] (draining and the
//!   grace deadline);
//! - around the proxy: [`sim`] (the simulated SmartLead of tests, demos and benchmarks),
//!   [`healthcheck`] and [`demo`] (subcommands).
//!
//! [`run`] serves on a bound listener until `shutdown` resolves, then drains.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod body;
pub mod cache;
pub mod client;
pub mod config;
pub mod connections;
pub mod demo;
pub mod egress;
pub mod error;
pub mod headers;
pub mod healthcheck;
pub mod key;
pub mod leads;
pub mod limiter;
pub mod metrics;
pub mod recent;
pub mod reload;
pub mod retry;
pub mod served;
pub mod server;
pub mod shown;
pub mod shutdown;
pub mod sim;
pub mod slab;
pub mod stack;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// After the grace period, how long the 503 answers get to reach their callers.
const ABORT_FLUSH: Duration = Duration::from_secs(2);

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub use config::Settings;
use shutdown::Shutdown;
use upstream::{POOL_MAX_IDLE, UpstreamClient};

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
    run_with(listener, settings, shutdown, None).await
}

/// [`run`], reloading the configuration each time `reloader` asks.
pub async fn run_with(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reloader: Option<reload::Reloader>,
) -> Result<(), RunError> {
    let addr = listener.local_addr()?;
    status::start_clock();
    start_up_notes(addr, &settings);
    let workers = settings.server.worker_count();
    let shared = stack::Shared::new(settings).map_err(RunError::Setup)?;
    let clients = upstream_clients(&shared.settings.upstream, workers)?;
    let stopping = Shutdown::default();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let mut threads = receivers.into_iter().zip(clients);
    let (mine, my_client) = threads.next().expect("at least one serving thread");
    let grace = shared.settings.server.shutdown_grace;
    let client_timeout = shared.settings.server.client_timeout;
    let connections = shared.connections.clone();
    tracing::info!(
        max = connections.max(),
        "client connections (server.max_connections)"
    );
    let live = reload::Live::new(shared);
    let thread = |incoming, client, shutdown| Thread {
        incoming,
        live: live.clone(),
        shutdown,
        client,
        grace,
        client_timeout,
    };
    let mut finished = Vec::with_capacity(workers);
    for (n, (incoming, client)) in threads.enumerate() {
        finished.push(spawn_worker(
            n + 1,
            thread(incoming, client, stopping.for_thread()),
        )?);
    }
    let me = thread(mine, my_client, stopping.clone());
    tracing::info!(%addr, workers, "listening");
    if let Some(reloader) = reloader {
        tokio::spawn(reload::follow(live.clone(), reloader));
    }
    let stop = async move {
        shutdown.await;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: draining in-flight requests");
        stopping.begin();
    };
    tokio::join!(
        server::accept(listener, senders, &connections, stop),
        serve(me)
    );
    for done in finished {
        let _ = done.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// What start-up tells the log before serving: the open-files limit it raised, and a
/// warning when the quota is open to anyone who can reach the port.
fn start_up_notes(addr: std::net::SocketAddr, settings: &Settings) {
    if let Some(files) = connections::raise_file_limit() {
        tracing::info!(
            soft_before = files.soft_before,
            soft = files.soft,
            hard = files.hard,
            "open files limit (the soft limit is raised to the hard one)"
        );
    }
    let tokens = !settings.server.access_tokens.is_empty()
        || settings.accounts.iter().any(|a| !a.tokens.is_empty());
    if !addr.ip().is_loopback() && !tokens {
        tracing::warn!(%addr, "listening beyond loopback without access tokens (server.access_tokens, or an account's tokens): anyone who can reach this port can spend the API quota");
    }
}

/// One upstream client per serving thread, sharing the TLS roots, the egress route and
/// the idle-connection budget.
fn upstream_clients(
    upstream: &config::UpstreamSettings,
    workers: usize,
) -> Result<Vec<UpstreamClient>, RunError> {
    let pool = POOL_MAX_IDLE.div_ceil(workers);
    let tls = tls::client_config(upstream.ca_file.as_deref()).map_err(RunError::Setup)?;
    let (connector, via) = egress::connector(upstream).map_err(RunError::Setup)?;
    if let Some(via) = via {
        tracing::info!(proxy = %via, "the upstream is reached through an egress proxy");
    }
    (0..workers)
        .map(|_| UpstreamClient::with_connector(upstream, connector.clone(), tls.clone(), pool))
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::Setup)
}

/// What one serving thread serves with.
struct Thread {
    incoming: mpsc::UnboundedReceiver<server::Accepted>,
    live: Arc<reload::Live>,
    shutdown: Shutdown,
    client: UpstreamClient,
    grace: Duration,
    client_timeout: Duration,
}

/// One more serving thread with its own event loop; the receiver resolves when it ends.
fn spawn_worker(n: usize, thread: Thread) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("worker-{n}"))
        .spawn(move || {
            runtime.block_on(serve(thread));
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Serves this thread's connections until the acceptor stops, then drains them within
/// the grace period; whatever still waits after it is answered 503.
async fn serve(thread: Thread) {
    let (grace, client_timeout) = (thread.grace, thread.client_timeout);
    let (shutdown, client) = (thread.shutdown.clone(), thread.client);
    let stacks = reload::ThreadStacks::new(thread.live, move |shared: &stack::Shared| {
        stack::build(shared, &shutdown, client.clone())
    });
    let graceful = server::serve_connections(thread.incoming, stacks, client_timeout).await;
    let drain = graceful.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace expired: answering requests still waiting with 503");
            thread.shutdown.abort_remaining();
            // Give those answers a moment to be written, then stop regardless.
            if tokio::time::timeout(ABORT_FLUSH, &mut drain).await.is_err() {
                tracing::warn!("closing connections still streaming after the grace period");
            }
        }
    }
}
