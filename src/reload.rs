//! Reloading the configuration while serving (SIGHUP): the settings in force and their
//! generation ([`Live`]), each serving thread's stack rebuilt when the generation moves
//! ([`ThreadStacks`]), and the task that re-reads and applies ([`follow`]).
//!
//! Nothing waiting is dropped: accounts keep their limiters (and so their waiters) across
//! a reload, requests already on their way finish with the stack they started on, and
//! the next request on any connection meets the new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;

use crate::config::{ConfigError, Settings};
use crate::stack::Shared;

/// The settings in force, and how many reloads have been applied.
#[derive(Debug)]
pub struct Live {
    generation: AtomicU64,
    shared: RwLock<Shared>,
}

impl Live {
    pub fn new(shared: Shared) -> Arc<Self> {
        Arc::new(Self {
            generation: AtomicU64::new(0),
            shared: RwLock::new(shared),
        })
    }

    pub fn generation(&self) -> u64 {
        // Relaxed is enough: the stack is read under the lock, which orders the rest.
        self.generation.load(Ordering::Relaxed)
    }

    /// What is in force now, and its generation.
    pub fn current(&self) -> (u64, Shared) {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        (self.generation(), shared.clone())
    }

    fn publish(&self, next: Shared) {
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        *shared = next;
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a running proxy reloads from: a request per SIGHUP (or per test), and how the
/// settings are read, exactly as at start.
pub struct Reloader {
    pub requests: mpsc::UnboundedReceiver<()>,
    pub load: Box<dyn Fn() -> Result<Settings, ConfigError> + Send>,
}

/// Applies a reload per request until the requests end.
pub async fn follow(live: Arc<Live>, mut reloader: Reloader) {
    while reloader.requests.recv().await.is_some() {
        apply(&live, (reloader.load)()).await;
    }
}

async fn apply(live: &Live, loaded: Result<Settings, ConfigError>) {
    let mut settings = match loaded {
        Ok(s) => s,
        Err(e) => {
            crate::metrics::config_reload("error");
            tracing::error!("reload refused, the running configuration stays: {e}");
            return;
        }
    };
    let (_, running) = live.current();
    let kept = settings.keep_restart_only(&running.settings);
    if !kept.is_empty() {
        tracing::warn!(
            keys = %kept.join(", "),
            "reload: these settings take effect only at start; their running values are kept"
        );
    }
    let next = running.reload(settings).await;
    if let Err(e) = crate::telemetry::reload(&next.settings.log, next.secrets.clone()) {
        tracing::warn!("reload: the log level stays as it was: {e}");
    }
    let accounts: Vec<String> = next
        .accounts
        .all()
        .iter()
        .map(|a| a.name.to_string())
        .collect();
    live.publish(next);
    crate::metrics::config_reload("ok");
    tracing::info!(accounts = %accounts.join(", "), "configuration reloaded");
}

/// One serving thread's stack, rebuilt from [`Live`] once per reload and shared by the
/// thread's connections.
pub struct ThreadStacks<S, F> {
    live: Arc<Live>,
    build: Arc<F>,
    cached: Arc<Mutex<(u64, S)>>,
}

impl<S: Clone, F: Fn(&Shared) -> S> ThreadStacks<S, F> {
    pub fn new(live: Arc<Live>, build: F) -> Self {
        let (generation, shared) = live.current();
        let stack = build(&shared);
        Self {
            live,
            build: Arc::new(build),
            cached: Arc::new(Mutex::new((generation, stack))),
        }
    }
}

impl<S, F> Clone for ThreadStacks<S, F> {
    fn clone(&self) -> Self {
        Self {
            live: self.live.clone(),
            build: self.build.clone(),
            cached: self.cached.clone(),
        }
    }
}

impl<S, F> crate::server::Stacks for ThreadStacks<S, F>
where
    S: Clone + Send + 'static,
    F: Fn(&Shared) -> S + Send + Sync + 'static,
{
    type Stack = S;

    fn current(&self) -> (u64, S) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != self.live.generation() {
            let (generation, shared) = self.live.current();
            *cached = (generation, (self.build)(&shared));
        }
        (cached.0, cached.1.clone())
    }

    fn is_current(&self, generation: u64) -> bool {
        self.live.generation() == generation
    }
}
