//! The response cache and the coalescing line (`[cache]`; docs/cache.md).
//!
//! - [`routes`]: which routes are stored and for how long; which a write makes stale.
//! - [`key`]: the cache key (never a key), what a request asks and what may be stored.
//! - [`entry`]: a stored answer, its weight and its form in Redis.
//! - [`flight`]: identical GETs in flight share one upstream call.
//! - [`store`]: where entries live: this process (moka) or Redis for the fleet, with the
//!   generations that invalidate them.
//!
//! The request path's part is the `stack` module's `cache` layer.

pub mod entry;
pub mod fleet;
pub mod flight;
pub mod key;
pub mod routes;
pub mod shared_error;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::CacheSettings;

pub use entry::Stored;
pub use key::CacheKey;
use routes::{Routes, Scope};
use store::Store;

/// The cache as one generation of settings uses it; the store and the line outlive
/// reloads.
#[derive(Debug)]
pub struct Cache {
    pub routes: Routes,
    pub stale_if_error: Duration,
    pub coalesce: bool,
    pub max_entry_bytes: usize,
    store: Arc<Store>,
    pub flights: Arc<flight::Flights>,
}

impl Cache {
    pub fn new(settings: &CacheSettings, store: Arc<Store>) -> Self {
        store.keep_stale_for(settings.stale_if_error);
        Self {
            routes: Routes::new(&settings.ttl),
            stale_if_error: settings.stale_if_error,
            coalesce: settings.coalesce,
            max_entry_bytes: settings.max_entry_bytes as usize,
            store,
            flights: Arc::default(),
        }
    }

    /// The same store and line under new settings.
    pub fn reload(&self, settings: &CacheSettings) -> Self {
        Self {
            flights: self.flights.clone(),
            ..Self::new(settings, self.store.clone())
        }
    }

    pub fn in_use(&self) -> bool {
        self.coalesce || !self.routes.is_empty()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    // Every call into the store is boxed here. Its futures (moka's, and the fleet's Redis
    // calls) are about 3.9 KB each; laid inline they would add that to the future of every
    // request that may make the call, while it waits for the quota too.

    /// The entry for `key` unless a write made it stale, fresh or not.
    pub fn lookup<'a>(
        &'a self,
        key: &'a CacheKey,
        scopes: &'a [Scope],
    ) -> BoxFuture<'a, Option<Arc<Stored>>> {
        Box::pin(self.store.get(key, scopes))
    }

    /// The generations an answer asked for now depends on (read before asking).
    pub fn generations<'a>(
        &'a self,
        key: &'a CacheKey,
        scopes: &'a [Scope],
    ) -> BoxFuture<'a, Vec<u64>> {
        Box::pin(self.store.generations(key.account(), scopes))
    }

    /// Keeps `stored` unless a write moved its scopes since its generations were read.
    pub fn put<'a>(
        &'a self,
        key: &'a CacheKey,
        scopes: &'a [Scope],
        stored: Arc<Stored>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(self.store.put(key, scopes, stored))
    }

    /// A write to `path` answered 2xx: the account's answers it touches are stale.
    pub async fn written(&self, account_id: &str, path: &str) {
        let scopes = Scope::written(path);
        if !scopes.is_empty() {
            Box::pin(self.store.bump(account_id, &scopes)).await;
        }
    }
}

/// How an account's cached reads went (the status and its hit ratio), with the
/// account's metric handles, made once (a read counts without a label lookup).
#[derive(Debug, Default)]
pub struct Counts {
    pub hit: AtomicU64,
    pub stale: AtomicU64,
    pub miss: AtomicU64,
    pub bypass: AtomicU64,
    pub collapsed: AtomicU64,
    /// The `account` label, for the handles made at the first counted read (an account
    /// that never reads through the cache, a junk client key, makes no series).
    account: Option<Arc<str>>,
    metrics: std::sync::OnceLock<[metrics::Counter; 5]>,
}

/// What became of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadResult {
    Hit,
    Stale,
    Miss,
    Bypass,
    Collapsed,
}

impl ReadResult {
    pub fn label(self) -> &'static str {
        match self {
            ReadResult::Hit => "hit",
            ReadResult::Stale => "stale",
            ReadResult::Miss => "miss",
            ReadResult::Bypass => "bypass",
            ReadResult::Collapsed => "collapsed",
        }
    }
}

impl ReadResult {
    const ALL: [ReadResult; 5] = [
        ReadResult::Hit,
        ReadResult::Stale,
        ReadResult::Miss,
        ReadResult::Bypass,
        ReadResult::Collapsed,
    ];
}

impl Counts {
    /// For the account named `account` (its `account` label).
    pub fn new(account: &str) -> Self {
        Self {
            account: Some(account.into()),
            ..Self::default()
        }
    }

    pub fn count(&self, result: ReadResult) {
        let (counter, n) = match result {
            ReadResult::Hit => (&self.hit, 0),
            ReadResult::Stale => (&self.stale, 1),
            ReadResult::Miss => (&self.miss, 2),
            ReadResult::Bypass => (&self.bypass, 3),
            ReadResult::Collapsed => (&self.collapsed, 4),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(account) = &self.account {
            let handles = self.metrics.get_or_init(|| {
                ReadResult::ALL.map(|r| crate::metrics::cache_counter(account, r.label()))
            });
            handles[n].increment(1);
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Upstream calls the cache and the line saved: every hit, stale answer and
    /// collapsed follower.
    pub fn saved(&self) -> u64 {
        Self::get(&self.hit) + Self::get(&self.stale) + Self::get(&self.collapsed)
    }

    /// Reads answered without an upstream call of their own, of all reads.
    pub fn hit_ratio(&self) -> f64 {
        let all = self.saved() + Self::get(&self.miss) + Self::get(&self.bypass);
        if all == 0 {
            0.0
        } else {
            self.saved() as f64 / all as f64
        }
    }

    pub fn snapshot(&self) -> [u64; 5] {
        [
            Self::get(&self.hit),
            Self::get(&self.stale),
            Self::get(&self.miss),
            Self::get(&self.bypass),
            Self::get(&self.collapsed),
        ]
    }
}
