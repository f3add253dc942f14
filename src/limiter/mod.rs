//! One account's quota: callers wait for a slot that every window of the account allows,
//! instead of failing.
//!
//! [`Limiter`] owns what is the same for every backend (the bounded queue, deadlines,
//! waiting, cancellation); `follow` follows SmartLead's own limit; a [`Backend`] owns the
//! reservation log: [`local`] in-process, [`redis`] shared by every instance with the same
//! `redis.key`. The arithmetic is in [`log`]. In one process the log hands out slots in
//! arrival order and [`fair`] decides which waiter uses which of the slots they hold; on
//! a reachable Redis a waiter waits in the fleet's line instead ([`fleet`]), granted its
//! slot when it is due, in fair order over every instance's waiters.

pub mod fair;
pub mod fleet;
mod follow;
pub mod local;
pub mod log;
pub mod redis;
pub mod redis_conn;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either, Ready};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::{LimitSettings, Window};
use fair::{ClientId, Effects, Key, Turn, Who};
use follow::Follow;

/// Why the quota said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The next free slot is after the caller's deadline.
    PastDeadline,
    /// An upstream 429 moved the caller's slot past its deadline.
    PausedPastDeadline,
    /// `limit.max_queue` requests are already waiting here.
    QueueFull,
    /// `limit.max_queue_per_client` of this client's requests are already waiting here.
    ClientQueueFull,
    /// The client is over `limit.per_client`.
    ClientCap,
}

impl Limited {
    pub fn message(self) -> &'static str {
        match self {
            Limited::PastDeadline => "no quota slot frees up within this request's max_wait",
            Limited::PausedPastDeadline => "SmartLead asked to pause past this request's max_wait",
            Limited::QueueFull => "the proxy's queue is full",
            Limited::ClientQueueFull => "this client's share of the proxy's queue is full",
            Limited::ClientCap => "this client is over its own cap (limit.per_client)",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Limited::PastDeadline => "max_wait",
            Limited::PausedPastDeadline => "paused",
            Limited::QueueFull | Limited::ClientQueueFull => "queue_full",
            Limited::ClientCap => "client_cap",
        }
    }
}

/// Why a request gets no slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No slot within the caller's deadline, or the queue is full: 429 `RATE_LIMITED`.
    /// `window` is the index of the window that held it back, when one did.
    RateLimited {
        retry_after: Duration,
        why: Limited,
        window: Option<usize>,
    },
    /// The shared limiter is unreachable and `redis.on_error = "reject"`: 503.
    Unavailable(String),
}

/// What `/readyz` and metrics show about the limiter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    pub backend: &'static str,
    /// `shared`, `local`, `fallback` (Redis unreachable, serving on a local share) or
    /// `unavailable` (Redis unreachable with `on_error = "reject"`).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Status {
    pub fn is_ready(&self) -> bool {
        self.state != "unavailable"
    }
}

/// A backend's answer: at once (the local log, no allocation) or after a round trip
/// (Redis, boxed).
pub type Answer<'a, T> = Either<Ready<T>, BoxFuture<'a, T>>;

/// An answer known at once.
pub fn now<'a, T>(value: T) -> Answer<'a, T> {
    Either::Left(futures_util::future::ready(value))
}

/// What a shared backend says of a client against `limit.per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapCheck {
    Admitted,
    /// Over its cap: this long until it may send again.
    Refused(Duration),
    /// Not decided here (a local backend, or Redis did not answer): the process's own
    /// buckets decide.
    NotShared,
}

/// A reservation log somewhere. Waits are relative ("this long from now"), so no two
/// hosts' clocks are ever compared.
pub trait Backend: Send + Sync + 'static {
    /// `client` against a cap of `requests` per `period` shared by every instance (a GCRA
    /// on Redis); a local backend leaves it to the process's own buckets.
    fn client_cap(&self, _client: &str, _requests: u32, _period: Duration) -> Answer<'_, CapCheck> {
        now(CapCheck::NotShared)
    }
    /// Whether decisions are the fleet's right now (a shared backend, reachable).
    fn is_shared(&self) -> bool {
        false
    }
    /// The fleet's fair line, while decisions are the fleet's: a request that cannot
    /// start at once waits there, not in this process's line.
    fn fleet(&self) -> Option<&fleet::FleetLine> {
        None
    }
    /// What each client got of the slots granted from the fleet's line over the last
    /// minute, in turns (slots / weight); `None` off the fleet.
    fn shares(&self) -> Answer<'_, Option<Vec<(String, f64)>>> {
        now(None)
    }
    /// A slot starting within `max_wait`: `Ok(wait)` from now, or the refusal.
    fn reserve(&self, id: u64, max_wait: Duration) -> Answer<'_, Result<Duration, Refusal>>;
    /// Time left until each reservation's slot, which a pause may have moved (`None`: the
    /// log no longer has it).
    fn waits_of<'a>(&'a self, ids: &'a [u64]) -> Answer<'a, Vec<Option<Duration>>>;
    /// Gives back a slot that has not started.
    fn cancel(&self, id: u64) -> Answer<'_, ()>;
    /// Nothing starts for `pause`; waiting slots move later together.
    fn pause(&self, pause: Duration) -> Answer<'_, ()>;
    /// The limit of window `window` from now on (`limit.follow_upstream`).
    fn set_limit(&self, window: usize, limit: usize) -> Answer<'_, ()>;
    /// New windows (a reload), `follow` the one SmartLead's headers describe: slots not
    /// yet started are laid out again under them and waiters told.
    fn set_windows(&self, spans: Vec<log::Span>, follow: usize) -> Answer<'_, ()>;
    /// Starts each window holds right now.
    fn used(&self) -> Answer<'_, Vec<usize>>;
    /// Changes whenever waiting slots may have moved.
    fn moved(&self) -> watch::Receiver<u64>;
    fn status(&self) -> Status;
}

/// One account's quota, as this process sees it.
pub struct Limiter {
    backend: Arc<dyn Backend>,
    /// The account's name (never its key), for logs and metrics.
    account: Arc<str>,
    /// What the configuration asks for; replaced whole by a reload.
    plan: RwLock<Arc<Plan>>,
    /// The plan's `max_queue`, read without its lock.
    max_queue: AtomicUsize,
    waiting: AtomicUsize,
    /// This process's waiters and the slots they hold, in the order they are served.
    line: std::sync::Mutex<fair::Queue>,
    /// How many are in `line`: with none, a slot free now is taken without the lock.
    in_line: AtomicUsize,
    /// The latest `moved` version the line's slots were re-read for.
    retimed: AtomicU64,
    ids: AtomicU64,
    follow: Follow,
    /// When the last "SmartLead refused although the windows were kept" warning went out.
    warned_429: std::sync::Mutex<Option<Instant>>,
    /// Requests served per client, for the status page; bounded, the rest under `other`.
    served: dashmap::DashMap<ClientId, AtomicU64, foldhash::fast::RandomState>,
    served_other: AtomicU64,
    /// The end of the latest pause this process asked for.
    pause_ends: std::sync::Mutex<Option<Instant>>,
    /// How long requests waited for their slots (`account` labelled): made at the first
    /// slot served (an account that never serves, such as a junk client key's, makes no
    /// series), then kept, so no request looks it up.
    waited: std::sync::OnceLock<metrics::Histogram>,
}

/// Clients counted by name per account before the rest are counted as `other`.
const MAX_COUNTED_CLIENTS: usize = 1000;
/// Clients the status shows by name per account; the rest are folded into `other`.
pub const MAX_SHOWN_CLIENTS: usize = 50;

/// One client of an account, as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientUse {
    pub id: String,
    pub waiting: usize,
    pub served: u64,
}

/// An account's quota as configured.
#[derive(Debug)]
struct Plan {
    windows: Vec<Window>,
    margin: Duration,
    max_queue: usize,
    max_queue_per_client: usize,
    /// The longest anyone may wait: how far ahead a slot is reserved for a request that
    /// may go before others.
    max_wait: Duration,
    /// The longest gap between starts the windows allow for good: a full queue's
    /// `Retry-After` is this per request ahead.
    spacing: Duration,
    /// The longest an upstream 429 pauses everyone.
    longest_pause: Duration,
    /// The window SmartLead's `x-ratelimit-*` headers describe (the per-minute one), and
    /// its configured limit.
    followed: usize,
    configured: usize,
    follow_upstream: bool,
}

impl Plan {
    fn in_force(&self, k: usize, follow: &Follow) -> InForce {
        let w = &self.windows[k.min(self.windows.len() - 1)];
        let limit = if k == self.followed {
            follow.in_force.load(Ordering::Relaxed)
        } else {
            w.requests as usize
        };
        InForce {
            label: w.label().to_owned(),
            limit,
            period: w.period,
        }
    }

    fn new(windows: &[Window], limit: &LimitSettings, longest_pause: Duration) -> Self {
        let followed = crate::config::followed_window(windows);
        Self {
            windows: windows.to_vec(),
            margin: limit.margin,
            max_queue: limit.max_queue,
            max_queue_per_client: limit.max_queue_per_client,
            max_wait: limit.max_wait,
            spacing: windows
                .iter()
                .map(Window::spacing)
                .max()
                .unwrap_or_default(),
            longest_pause,
            followed,
            configured: windows.get(followed).map_or(1, |w| w.requests as usize),
            follow_upstream: limit.follow_upstream,
        }
    }
}

/// At most one "SmartLead refused anyway" warning per account in this long.
const UNEXPECTED_429_QUIET: Duration = Duration::from_secs(600);

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("account", &self.account)
            .field("status", &self.backend.status())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish()
    }
}

/// A window as it is enforced now.
#[derive(Debug, Clone, PartialEq)]
pub struct InForce {
    pub label: String,
    pub limit: usize,
    pub period: Duration,
}

impl Limiter {
    /// The quota of `account` with `windows` (and the rest of `limit`), on `backend`.
    pub fn new(
        backend: Arc<dyn Backend>,
        account: &str,
        windows: &[Window],
        limit: &LimitSettings,
        longest_pause: Duration,
    ) -> Self {
        let plan = Plan::new(windows, limit, longest_pause);
        let follow = Follow::default();
        follow.in_force.store(plan.configured, Ordering::Relaxed);
        Self {
            backend,
            account: account.into(),
            max_queue: AtomicUsize::new(plan.max_queue),
            plan: RwLock::new(Arc::new(plan)),
            waiting: AtomicUsize::new(0),
            line: Default::default(),
            in_line: AtomicUsize::new(0),
            retimed: AtomicU64::new(0),
            // Random high bits keep ids unique across instances sharing one Redis log.
            ids: AtomicU64::new(rand::random::<u64>() & !0xFFFF_FFFF),
            follow,
            warned_429: Default::default(),
            served: Default::default(),
            served_other: AtomicU64::new(0),
            pause_ends: Default::default(),
            waited: std::sync::OnceLock::new(),
        }
    }

    /// One more request of `client` got its slot.
    fn count_served(&self, client: &ClientId) {
        if let Some(n) = self.served.get(client) {
            n.fetch_add(1, Ordering::Relaxed);
        } else if self.served.len() < MAX_COUNTED_CLIENTS {
            self.served
                .entry(client.clone())
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.served_other.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The busiest clients (waiting, then served), at most [`MAX_SHOWN_CLIENTS`] by name
    /// and the rest folded into `other`.
    pub fn clients(&self) -> Vec<ClientUse> {
        let mut by: std::collections::HashMap<ClientId, (usize, u64)> = self
            .served
            .iter()
            .map(|e| (e.key().clone(), (0, e.value().load(Ordering::Relaxed))))
            .collect();
        for (client, waiting) in self.line().waiting_by_client() {
            by.entry(client).or_default().0 += waiting;
        }
        let mut all: Vec<ClientUse> = by
            .into_iter()
            .map(|(c, (waiting, served))| ClientUse {
                id: c.to_string(),
                waiting,
                served,
            })
            .collect();
        all.sort_by(|a, b| (b.waiting, b.served, &a.id).cmp(&(a.waiting, a.served, &b.id)));
        let other_served = self.served_other.load(Ordering::Relaxed);
        if all.len() <= MAX_SHOWN_CLIENTS && other_served == 0 {
            return all;
        }
        let rest = all.split_off(all.len().min(MAX_SHOWN_CLIENTS));
        all.push(ClientUse {
            id: "other".into(),
            waiting: rest.iter().map(|c| c.waiting).sum(),
            served: rest.iter().map(|c| c.served).sum::<u64>() + other_served,
        });
        all
    }

    /// When the pause this process last asked for ends, if it has not yet.
    pub fn paused_until(&self) -> Option<Instant> {
        let ends = *self.pause_ends.lock().unwrap_or_else(|e| e.into_inner());
        ends.filter(|at| *at > Instant::now())
    }

    fn plan(&self) -> Arc<Plan> {
        self.plan.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reload's quota for this account. Waiters stay in line; under new windows their
    /// slots (and everyone's not yet started) are laid out again, and a waiter whose slot
    /// moves past its deadline gets its 429 then. SmartLead's followed limit starts over.
    pub async fn retune(&self, windows: &[Window], limit: &LimitSettings, longest_pause: Duration) {
        let plan = Plan::new(windows, limit, longest_pause);
        let rewindowed = {
            let old = self.plan();
            old.windows != plan.windows || old.margin != plan.margin
        };
        let (followed, configured) = (plan.followed, plan.configured);
        self.max_queue.store(plan.max_queue, Ordering::Relaxed);
        *self.plan.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(plan);
        self.follow.in_force.store(configured, Ordering::Relaxed);
        self.follow.warned.store(false, Ordering::Relaxed);
        if rewindowed {
            let spans = local::spans(windows, limit.margin);
            self.backend.set_windows(spans, followed).await;
            // Before the waiters read the move as a pause: a slot pushed past its deadline
            // by new windows is a max_wait refusal.
            self.reread(Limited::PastDeadline).await;
        }
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn status(&self) -> Status {
        self.backend.status()
    }

    /// Whether the quota is the fleet's right now (Redis, reachable): then
    /// `limit.per_client` is checked there ([`Limiter::client_cap`]).
    pub fn is_shared(&self) -> bool {
        self.backend.is_shared()
    }

    /// `client` against `cap`, over every instance sharing the quota.
    pub async fn client_cap(&self, client: &ClientId, cap: &crate::config::Window) -> CapCheck {
        let client = client.to_string();
        self.backend
            .client_cap(&client, cap.requests, cap.period)
            .await
    }

    /// Jain's fairness index of the turns the fleet's line gave the clients that waited
    /// over the last minute (1: equal turns by weight), and how many clients; `None`
    /// off the fleet or while nobody waited.
    pub async fn fairness(&self) -> Option<(f64, usize)> {
        let shares = self.backend.shares().await?;
        let (sum, squares) = shares
            .iter()
            .fold((0.0, 0.0), |(s, q), (_, x)| (s + x, q + x * x));
        (squares > 0.0).then(|| (sum * sum / (shares.len() as f64 * squares), shares.len()))
    }

    /// The `most` clients with the most requests waiting in this process's line, and how
    /// many each (for the fleet's view).
    pub fn waiting_clients(&self, most: usize) -> Vec<(String, usize)> {
        let mut all: Vec<(String, usize)> = self
            .line()
            .waiting_by_client()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.to_string(), n))
            .collect();
        all.sort_by(|a, b| (b.1, &a.0).cmp(&(a.1, &b.0)));
        all.truncate(most);
        all
    }

    /// Requests currently waiting for a slot in this process.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests waiting in line in this process, by priority (high, normal, low).
    pub fn depth(&self) -> [usize; 3] {
        let mut depth = self.line().depth();
        if let Some(fleet) = self.backend.fleet() {
            for (d, f) in depth.iter_mut().zip(fleet.depth()) {
                *d += f;
            }
        }
        depth
    }

    fn line(&self) -> std::sync::MutexGuard<'_, fair::Queue> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest an upstream 429 pauses everyone (and the largest `Retry-After` a
    /// client is given).
    pub fn longest_pause(&self) -> Duration {
        self.plan().longest_pause
    }

    /// The window SmartLead's `x-ratelimit-*` headers describe.
    pub fn followed(&self) -> usize {
        self.plan().followed
    }

    /// Window `k` as it is enforced now (SmartLead's smaller limit, when followed).
    pub fn in_force(&self, k: usize) -> InForce {
        self.plan().in_force(k, &self.follow)
    }

    /// Every window as enforced now.
    pub fn windows(&self) -> Vec<InForce> {
        let plan = self.plan();
        (0..plan.windows.len())
            .map(|k| plan.in_force(k, &self.follow))
            .collect()
    }

    /// Starts each window holds right now, with the windows.
    pub async fn usage(&self) -> Vec<(InForce, usize)> {
        let used = self.backend.used().await;
        self.windows().into_iter().zip(used).collect()
    }

    pub async fn pause(&self, pause: Duration) {
        crate::metrics::upstream_pause(&self.account);
        {
            let until = Instant::now() + pause;
            let mut ends = self.pause_ends.lock().unwrap_or_else(|e| e.into_inner());
            *ends = Some(ends.map_or(until, |e| e.max(until)));
        }
        self.backend.pause(pause).await;
    }

    /// SmartLead answered 429 although every window was kept: counted, and said once in a
    /// while with each window's use at that moment.
    pub async fn refused_anyway(&self) {
        crate::metrics::unexpected_upstream_429(&self.account);
        {
            let mut last = self.warned_429.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < UNEXPECTED_429_QUIET) {
                return;
            }
            *last = Some(Instant::now());
        }
        let use_of: Vec<String> = self
            .usage()
            .await
            .iter()
            .map(|(w, used)| format!("{used}/{}", w.label.split_once('/').map_or("", |p| p.1)))
            .collect();
        tracing::warn!(
            account = %self.account,
            "SmartLead refused at {}: its limit is lower than limit.windows",
            use_of.join(", ")
        );
    }

    /// Waits for a slot that starts no later than `deadline`, in `who`'s turn; returns
    /// how long it waited. Refuses at once when the slot would come too late, and later
    /// when others served first move its slot past the deadline. Dropping the future
    /// while it waits gives a slot back.
    pub async fn acquire(&self, deadline: Instant, who: &Who) -> Result<Duration, Refusal> {
        let result = self.wait_for_slot(deadline, who).await;
        match &result {
            Ok(waited) => {
                self.count_served(&who.client);
                self.waited
                    .get_or_init(|| crate::metrics::limiter_wait(&self.account))
                    .record(waited.as_secs_f64());
                crate::metrics::client_wait(&who.client, *waited);
            }
            Err(Refusal::RateLimited { why, .. }) => {
                crate::metrics::quota_rejected(&self.account, why.label())
            }
            Err(Refusal::Unavailable(_)) => {
                crate::metrics::quota_rejected(&self.account, "unavailable")
            }
        }
        result
    }

    async fn wait_for_slot(&self, deadline: Instant, who: &Who) -> Result<Duration, Refusal> {
        let arrived = Instant::now();
        let _queued = self.enter_queue()?;
        let mut id = self.ids.fetch_add(1, Ordering::Relaxed);
        if let Some(fleet) = self.backend.fleet() {
            let plan = self.plan();
            let _seat = self.seat(&who.client, &plan)?;
            // Boxed: a request on the local line holds none of the fleet's state.
            match Box::pin(fleet.wait(id, who, deadline, plan.spacing)).await {
                fleet::Joined::Go => return Ok(arrived.elapsed()),
                fleet::Joined::Refused(refusal) => return Err(refusal),
                // Redis went away meanwhile: this process's line, as for any request now,
                // under an id of its own (the fleet's line may still hold the old one,
                // which leaves it once Redis is back, taking that id's slot with it).
                fleet::Joined::Local => id = self.ids.fetch_add(1, Ordering::Relaxed),
            }
        }
        let mut moved = self.backend.moved();
        moved.borrow_and_update();
        let own = deadline.saturating_duration_since(arrived);
        // With others in line this one may go before some of them: it reserves as far
        // ahead as anyone may wait, and its place in line decides which slot it uses.
        let ahead = if self.in_line.load(Ordering::Acquire) > 0 {
            own.max(self.plan().max_wait)
        } else {
            own
        };
        let wait = self.backend.reserve(id, ahead).await?;
        if wait.is_zero() && self.in_line.load(Ordering::Acquire) == 0 {
            return Ok(arrived.elapsed());
        }
        let place = self.join(who, deadline, (Instant::now() + wait, id))?;
        place.wait(&mut moved, deadline).await?;
        Ok(arrived.elapsed())
    }

    /// Gets in line holding the slot `slot`, unless the client's share of the line is
    /// full or its place comes after its deadline.
    fn join(
        &self,
        who: &Who,
        deadline: Instant,
        slot: (Instant, u64),
    ) -> Result<Place<'_>, Refusal> {
        let wake = Arc::new(Notify::new());
        let plan = self.plan();
        let key = self.with_line(|line, fx| {
            if let Err(held) = line.seat(&who.client, plan.max_queue_per_client) {
                fx.give_back.push(slot.1);
                return Err(Refusal::RateLimited {
                    retry_after: plan.spacing * held.min(u32::MAX as usize) as u32,
                    why: Limited::ClientQueueFull,
                    window: None,
                });
            }
            let joined = line.join(who, deadline, wake.clone(), slot, Instant::now(), fx);
            if joined.is_err() {
                line.unseat(&who.client);
            }
            joined
        })?;
        Ok(Place {
            limiter: self,
            key,
            client: who.client.clone(),
            wake,
        })
    }

    /// Runs `change` on the line, then wakes whoever it says and gives back the slots
    /// nobody holds any more.
    fn with_line<T>(&self, change: impl FnOnce(&mut fair::Queue, &mut Effects) -> T) -> T {
        let mut fx = Effects::default();
        let out = {
            let mut line = self.line();
            let out = change(&mut line, &mut fx);
            self.in_line.store(line.len(), Ordering::Release);
            out
        };
        fx.wake_all();
        for id in fx.give_back {
            self.give_back(id);
        }
        out
    }

    fn give_back(&self, id: u64) {
        // A local log cancels as the call is made; a shared one needs its round trip
        // driven, and the caller may be gone by then.
        if let Either::Right(_) = self.backend.cancel(id) {
            let backend = self.backend.clone();
            tokio::spawn(async move { backend.cancel(id).await });
        }
    }

    /// Re-reads the line's slots after the log moved them (once per `version`); waiters
    /// whose slot moved past their deadline are refused, `why` saying what moved them.
    async fn retime(&self, version: u64, why: Limited) {
        if self.retimed.fetch_max(version, Ordering::AcqRel) >= version {
            return;
        }
        self.reread(why).await;
    }

    /// Re-reads the line's slots now.
    async fn reread(&self, why: Limited) {
        let ids = self.line().held();
        if ids.is_empty() {
            return;
        }
        let waits = self.backend.waits_of(&ids).await;
        let now = Instant::now();
        let times: Vec<(u64, Instant)> = ids
            .iter()
            .zip(waits)
            .filter_map(|(id, wait)| wait.map(|w| (*id, now + w)))
            .collect();
        self.with_line(|line, fx| line.retime(&times, now, why, fx));
    }

    /// A seat in the client's share of the line, for a request waiting in the fleet's.
    fn seat(&self, client: &ClientId, plan: &Plan) -> Result<ClientSeat<'_>, Refusal> {
        self.with_line(|line, _| line.seat(client, plan.max_queue_per_client))
            .map_err(|held| Refusal::RateLimited {
                retry_after: plan.spacing * held.min(u32::MAX as usize) as u32,
                why: Limited::ClientQueueFull,
                window: None,
            })?;
        Ok(ClientSeat {
            limiter: self,
            client: client.clone(),
        })
    }

    fn enter_queue(&self) -> Result<QueueSeat<'_>, Refusal> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let seat = QueueSeat(&self.waiting);
        // Read on every request: an atomic of its own, not the plan behind its lock.
        if before >= self.max_queue.load(Ordering::Relaxed) {
            // An honest estimate: the time the queue ahead needs to drain.
            let retry_after = self.plan().spacing * before.min(u32::MAX as usize) as u32;
            return Err(Refusal::RateLimited {
                retry_after,
                why: Limited::QueueFull,
                window: None,
            });
        }
        Ok(seat)
    }
}

struct QueueSeat<'a>(&'a AtomicUsize);

struct ClientSeat<'a> {
    limiter: &'a Limiter,
    client: ClientId,
}

impl Drop for ClientSeat<'_> {
    fn drop(&mut self) {
        self.limiter.with_line(|line, _| line.unseat(&self.client));
    }
}

impl Drop for QueueSeat<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long past its deadline a waiter whose turn has not come waits for the ones ahead
/// (already due) to go, before it is refused anyway.
const LATE: Duration = Duration::from_millis(10);

/// A request's place in line. Dropped before its turn (the caller went away), it leaves,
/// and the slot it would have used goes to the next in line.
struct Place<'a> {
    limiter: &'a Limiter,
    key: Key,
    client: fair::ClientId,
    wake: Arc<Notify>,
}

impl Place<'_> {
    /// Until its turn comes (or it is refused). The first in line sleeps until its slot
    /// and re-reads the slots when the log moves them; the others wait to be woken.
    async fn wait(
        &self,
        moved: &mut watch::Receiver<u64>,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let limiter = self.limiter;
        let mut follow_moves = true;
        loop {
            let turn = limiter.with_line(|line, fx| line.turn(self.key, Instant::now(), fx));
            match turn {
                Turn::Go => return Ok(()),
                Turn::Refused(refusal) => return Err(refusal),
                // Boxed: only the first in line waits here, and laid inline its timer and
                // its watch on the log would add their size to every waiter's future.
                Turn::At(at) => Box::pin(self.first_in_line(at, moved, &mut follow_moves)).await,
                Turn::Wait => tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep_until(deadline + LATE) => {
                        return Err(Refusal::RateLimited {
                            retry_after: limiter.plan().spacing,
                            why: Limited::PastDeadline,
                            window: None,
                        });
                    }
                },
            }
        }
    }

    /// The first in line: until its slot, a wake, or the log moving the slots (which
    /// re-reads them).
    async fn first_in_line(
        &self,
        at: Instant,
        moved: &mut watch::Receiver<u64>,
        follow_moves: &mut bool,
    ) {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {}
            _ = self.wake.notified() => {}
            changed = moved.changed(), if *follow_moves => match changed {
                Ok(()) => {
                    let version = *moved.borrow_and_update();
                    self.limiter.retime(version, Limited::PausedPastDeadline).await;
                }
                // The backend is gone: the slots stay where they are.
                Err(_) => *follow_moves = false,
            },
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.limiter.with_line(|line, fx| {
            line.leave(self.key, fx);
            line.unseat(&self.client);
        });
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}
