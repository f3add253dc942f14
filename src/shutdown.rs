//! Shutdown as every part of the proxy sees it: `/readyz` turns 503 once it begins, and
//! when the grace period runs out every request still waiting is answered 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A cheap-clone handle. Each serving thread takes its own [`Shutdown::for_thread`], so
/// waiting on the abort signal registers with a channel of its own thread only.
#[derive(Clone, Debug)]
pub struct Shutdown {
    shared: Arc<Shared>,
    abort: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Shared {
    begun: AtomicBool,
    /// Every thread's abort signal.
    aborts: Mutex<Vec<watch::Sender<bool>>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let abort = watch::channel(false).0;
        let shared = Shared::default();
        shared
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(abort.clone());
        Self {
            shared: Arc::new(shared),
            abort,
        }
    }
}

impl Shutdown {
    /// The same shutdown, with an abort signal for another serving thread.
    pub fn for_thread(&self) -> Self {
        let abort = watch::channel(*self.abort.borrow()).0;
        self.shared
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(abort.clone());
        Self {
            shared: self.shared.clone(),
            abort,
        }
    }

    /// From now on `/readyz` reports 503 so load balancers stop sending traffic.
    pub fn begin(&self) {
        self.shared.begun.store(true, Ordering::SeqCst);
    }

    pub fn has_begun(&self) -> bool {
        self.shared.begun.load(Ordering::SeqCst)
    }

    /// The grace period is over: requests still waiting are answered 503 now.
    pub fn abort_remaining(&self) {
        for abort in self
            .shared
            .aborts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            abort.send_replace(true);
        }
    }

    /// Resolves once [`Shutdown::abort_remaining`] was called.
    pub async fn aborted(&self) {
        let mut rx = self.abort.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }
}
