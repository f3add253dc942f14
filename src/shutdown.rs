//! Shutdown as every part of the proxy sees it: `/readyz` turns 503 once it begins, and
//! when the grace period runs out every request still waiting is answered 503.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A cheap-clone handle. Each serving thread takes its own [`Shutdown::for_thread`], so
/// waiting on the abort signal registers with a signal of its own thread only.
#[derive(Clone, Debug)]
pub struct Shutdown {
    shared: Arc<Shared>,
    abort: Arc<Abort>,
}

#[derive(Debug, Default)]
struct Shared {
    begun: AtomicBool,
    /// Every thread's abort signal.
    aborts: Mutex<Vec<Arc<Abort>>>,
}

/// One thread's abort signal: every request in flight waits on it, so it is a flag and
/// a `Notify` (a waiter costs a lock and a list entry) rather than a watch channel.
#[derive(Debug)]
struct Abort {
    done: AtomicBool,
    wake: Notify,
}

impl Default for Shutdown {
    fn default() -> Self {
        let shared = Arc::new(Shared::default());
        let abort = Shutdown::register(&shared);
        Self { shared, abort }
    }
}

impl Shutdown {
    /// A new thread's abort signal, already given when the others were: it is read and
    /// added under the lock `abort_remaining` takes, so no abort falls between the two.
    fn register(shared: &Shared) -> Arc<Abort> {
        let mut aborts = shared.aborts.lock().unwrap_or_else(|e| e.into_inner());
        let done = aborts.iter().any(|a| a.done.load(Ordering::SeqCst));
        let abort = Arc::new(Abort {
            done: AtomicBool::new(done),
            wake: Notify::new(),
        });
        aborts.push(abort.clone());
        abort
    }

    /// The same shutdown, with an abort signal for another serving thread.
    pub fn for_thread(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            abort: Shutdown::register(&self.shared),
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
            abort.done.store(true, Ordering::SeqCst);
            abort.wake.notify_waiters();
        }
    }

    /// Resolves once [`Shutdown::abort_remaining`] was called.
    pub async fn aborted(&self) {
        // Made before the flag is read: a `Notified` receives every `notify_waiters`
        // from its making on, so an abort between the two is not missed.
        let woken = self.abort.wake.notified();
        if self.abort.done.load(Ordering::SeqCst) {
            return;
        }
        woken.await;
    }
}
