//! Where entries live, and the generations that make them stale.
//!
//! Every answer depends on the generations of its scopes ([`Scope::read`]), read before
//! it is asked for; a 2xx write moves the generations of the scopes it touches
//! ([`Scope::written`]). An entry whose generations no longer match is never served,
//! and an answer asked for before a write is never stored after it. So invalidation is
//! one step, done before the write's answer is sent, on every instance at once.
//!
//! This process keeps entries in moka (bounded by `cache.max_bytes`, least used first,
//! each entry expiring at its ttl plus `cache.stale_if_error`). With the fleet
//! ([`super::fleet`]) entries and generations live in Redis; while Redis does not
//! answer, each instance falls back to its own moka store (emptied when the outage
//! begins, as it may hold answers other instances' writes made stale), and the writes
//! it answers meanwhile move Redis's generations once it is back, before Redis's
//! entries are used again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache as Moka;
use moka::notification::RemovalCause;

use super::entry::Stored;
use super::fleet::Fleet;
use super::key::CacheKey;
use super::routes::Scope;

/// Entries and bytes per account id, kept as entries come and go.
#[derive(Debug, Default)]
pub struct Sizes {
    held: Mutex<Held>,
    evictions: AtomicU64,
}

#[derive(Debug, Default)]
struct Held {
    by_account: HashMap<Arc<str>, (u64, u64)>,
    all: (u64, u64),
}

impl Sizes {
    fn added(&self, account: &str, weight: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let entry = held.by_account.entry(account.into()).or_default();
        entry.0 += 1;
        entry.1 += weight;
        held.all.0 += 1;
        held.all.1 += weight;
        crate::metrics::cache_size(held.all.0, held.all.1);
    }

    fn removed(&self, account: &str, weight: u64, cause: RemovalCause) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.by_account.get_mut(account) {
            entry.0 = entry.0.saturating_sub(1);
            entry.1 = entry.1.saturating_sub(weight);
            if entry.0 == 0 {
                held.by_account.remove(account);
            }
            held.all.0 = held.all.0.saturating_sub(1);
            held.all.1 = held.all.1.saturating_sub(weight);
        }
        crate::metrics::cache_size(held.all.0, held.all.1);
        if cause == RemovalCause::Size {
            self.evictions.fetch_add(1, Ordering::Relaxed);
            crate::metrics::cache_evicted();
        }
    }

    /// (entries, bytes) held for `account_id`.
    pub fn of(&self, account_id: &str) -> (u64, u64) {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.by_account.get(account_id).copied().unwrap_or_default()
    }

    /// (entries, bytes) held in all.
    pub fn totals(&self) -> (u64, u64) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).all
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

/// Each entry lives for its ttl plus the stale window in force when it was stored.
struct Lifetime {
    stale_ms: Arc<AtomicU64>,
}

impl moka::Expiry<CacheKey, Arc<Stored>> for Lifetime {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<Stored>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl + Duration::from_millis(self.stale_ms.load(Ordering::Relaxed)))
    }
}

/// Generations of scopes, per account. A generation is a number no earlier write used
/// (so one that was forgotten and comes back cannot match an old entry); scopes nobody
/// wrote to are 0. A generation is forgotten once every entry that could hold its old
/// value has expired.
#[derive(Debug)]
struct Generations {
    /// By a hash of the account and the scope: two scopes that share a hash share a
    /// generation, so a write to one makes the other's answers stale too (a miss more,
    /// never a stale answer).
    moved: Mutex<HashMap<u64, (u64, Instant)>>,
    next: AtomicU64,
    hasher: foldhash::fast::RandomState,
}

impl Generations {
    fn new() -> Self {
        Self {
            moved: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            hasher: Default::default(),
        }
    }

    fn name(&self, account: &str, scope: &Scope) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((account, scope))
    }

    fn read(&self, account: &str, scopes: &[Scope]) -> Vec<u64> {
        let moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        scopes
            .iter()
            .map(|s| moved.get(&self.name(account, s)).map_or(0, |(g, _)| *g))
            .collect()
    }

    fn bump(&self, account: &str, scopes: &[Scope], keep: Duration) {
        let now = Instant::now();
        let mut moved = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        if moved.len() >= 4096 {
            moved.retain(|_, (_, at)| now.duration_since(*at) < keep);
        }
        for scope in scopes {
            let g = self.next.fetch_add(1, Ordering::Relaxed);
            moved.insert(self.name(account, scope), (g, now));
        }
    }
}

#[derive(Debug)]
pub struct Local {
    entries: Moka<CacheKey, Arc<Stored>>,
    generations: Generations,
    stale_ms: Arc<AtomicU64>,
    pub sizes: Arc<Sizes>,
}

impl Local {
    pub fn new(max_bytes: u64) -> Self {
        let sizes = Arc::new(Sizes::default());
        let stale_ms = Arc::new(AtomicU64::new(0));
        let listener = {
            let sizes = sizes.clone();
            move |key: Arc<CacheKey>, value: Arc<Stored>, cause: RemovalCause| {
                sizes.removed(key.account(), value.weight() as u64, cause);
            }
        };
        let entries = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &CacheKey, v: &Arc<Stored>| v.weight().try_into().unwrap_or(u32::MAX))
            .expire_after(Lifetime {
                stale_ms: stale_ms.clone(),
            })
            .eviction_listener(listener)
            .build();
        Self {
            entries,
            generations: Generations::new(),
            stale_ms,
            sizes,
        }
    }

    fn keep_stale_for(&self, stale: Duration) {
        self.stale_ms
            .store(stale.as_millis() as u64, Ordering::Relaxed);
    }

    fn stale(&self) -> Duration {
        Duration::from_millis(self.stale_ms.load(Ordering::Relaxed))
    }

    fn clear(&self) {
        self.entries.invalidate_all();
    }

    async fn get(&self, key: &CacheKey, scopes: &[Scope]) -> Option<Arc<Stored>> {
        let stored = self.entries.get(key).await?;
        if stored.gens != self.generations.read(key.account(), scopes) {
            self.entries.invalidate(key).await;
            return None;
        }
        Some(stored)
    }

    fn generations(&self, account: &str, scopes: &[Scope]) -> Vec<u64> {
        self.generations.read(account, scopes)
    }

    async fn put(&self, key: &CacheKey, scopes: &[Scope], stored: Arc<Stored>) -> bool {
        if stored.gens != self.generations.read(key.account(), scopes) {
            return false;
        }
        self.sizes.added(key.account(), stored.weight() as u64);
        self.entries.insert(key.clone(), stored).await;
        true
    }

    fn bump(&self, account: &str, scopes: &[Scope]) {
        self.generations
            .bump(account, scopes, longest_life(self.stale()));
    }
}

/// Moves the generations of writes answered while Redis did not answer, once it does.
async fn carry_over(store: std::sync::Weak<Store>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(store) = store.upgrade() else { return };
        if store.has_pending.load(Ordering::Acquire) {
            let _ = store.fleet().await;
        }
    }
}

/// Past this, no entry stored before a write can still be held (`cache.ttl` is at most
/// a day).
fn longest_life(stale: Duration) -> Duration {
    Duration::from_secs(86_400) + stale
}

/// Where entries live: this process, or Redis with this process as the fallback.
#[derive(Debug)]
pub struct Store {
    local: Local,
    fleet: Option<Fleet>,
    /// Writes answered while Redis did not: their scopes, to move there once it does
    /// (held while they are moved, so no request reads Redis before they are).
    pending: tokio::sync::Mutex<Vec<(String, Vec<Scope>)>>,
    has_pending: AtomicBool,
    /// The last Redis call failed: entries come from `local` until one succeeds.
    down: AtomicBool,
    pub sizes: Arc<Sizes>,
    max_bytes: u64,
}

impl Store {
    pub fn local(max_bytes: u64) -> Self {
        Self::new(max_bytes, None)
    }

    /// With the fleet, a task moves Redis's generations for the writes answered while
    /// it did not answer, as soon as it does (not only at this instance's next read).
    pub fn start(max_bytes: u64, fleet: Option<Fleet>) -> Arc<Self> {
        let shared = fleet.is_some();
        let store = Arc::new(Self::new(max_bytes, fleet));
        if shared {
            tokio::spawn(carry_over(Arc::downgrade(&store)));
        }
        store
    }

    fn new(max_bytes: u64, fleet: Option<Fleet>) -> Self {
        let local = Local::new(max_bytes);
        Self {
            sizes: local.sizes.clone(),
            local,
            fleet,
            pending: tokio::sync::Mutex::new(Vec::new()),
            has_pending: AtomicBool::new(false),
            down: AtomicBool::new(false),
            max_bytes,
        }
    }

    pub fn keep_stale_for(&self, stale: Duration) {
        self.local.keep_stale_for(stale);
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The fleet's store as it is, Redis answering or not (for a lock already held).
    pub fn shared(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    /// Whether entries are shared with the fleet.
    pub fn is_shared(&self) -> bool {
        self.fleet.is_some()
    }

    /// Pending evictions and expiries done now (the status reads exact sizes).
    pub async fn settle(&self) {
        self.local.entries.run_pending_tasks().await;
    }

    /// The fleet, when Redis answers and every write answered meanwhile has reached it.
    pub async fn fleet(&self) -> Option<&Fleet> {
        let fleet = self.fleet.as_ref().filter(|f| f.usable())?;
        if self.has_pending.load(Ordering::Acquire) {
            let mut pending = self.pending.lock().await;
            let keep = longest_life(self.local.stale());
            while let Some((account, scopes)) = pending.first() {
                if fleet.bump(account, scopes, keep).await.is_err() {
                    self.failed();
                    return None;
                }
                pending.remove(0);
            }
            self.has_pending.store(false, Ordering::Release);
        }
        Some(fleet)
    }

    /// A Redis call failed: what this process stored before may be stale (other
    /// instances wrote meanwhile), so the fallback starts empty.
    fn failed(&self) {
        if !self.down.swap(true, Ordering::AcqRel) {
            self.local.clear();
        }
    }

    fn answered(&self) {
        self.down.store(false, Ordering::Release);
    }

    pub async fn get(&self, key: &CacheKey, scopes: &[Scope]) -> Option<Arc<Stored>> {
        if let Some(fleet) = self.fleet().await {
            match fleet.get(key, scopes).await {
                Ok(found) => {
                    self.answered();
                    return found;
                }
                Err(_) => self.failed(),
            }
        }
        self.local.get(key, scopes).await
    }

    pub async fn generations(&self, account: &str, scopes: &[Scope]) -> Vec<u64> {
        if let Some(fleet) = self.fleet().await {
            match fleet.generations(account, scopes).await {
                Ok(gens) => return gens,
                Err(_) => self.failed(),
            }
        }
        self.local.generations(account, scopes)
    }

    /// Kept where its generations were read: an answer asked for with Redis's goes to
    /// Redis; with Redis gone meanwhile, the local generations differ and it is not kept.
    pub async fn put(&self, key: &CacheKey, scopes: &[Scope], stored: Arc<Stored>) -> bool {
        if let Some(fleet) = self.fleet().await {
            let life = stored.ttl + self.local.stale();
            match fleet.put(key, scopes, &stored, life).await {
                Ok(kept) => return kept,
                Err(_) => self.failed(),
            }
        }
        self.local.put(key, scopes, stored).await
    }

    /// A write: this process's generations move, and Redis's now or once it answers.
    pub async fn bump(&self, account: &str, scopes: &[Scope]) {
        self.local.bump(account, scopes);
        if self.fleet.is_none() {
            return;
        }
        if let Some(fleet) = self.fleet().await {
            let keep = longest_life(self.local.stale());
            if fleet.bump(account, scopes, keep).await.is_ok() {
                return;
            }
            self.failed();
        }
        let mut pending = self.pending.lock().await;
        pending.push((account.to_owned(), scopes.to_vec()));
        self.has_pending.store(true, Ordering::Release);
    }
}
