//! The shared quota: callers wait first-come first-served for a slot instead of failing.
//!
//! [`Limiter`] owns what is the same for every backend (the bounded queue, deadlines,
//! waiting, cancellation); a [`Backend`] owns the reservation log: [`local`] in-process,
//! [`redis`] shared by every instance with the same `redis.key`. The arithmetic is in
//! [`log`].

pub mod local;
pub mod log;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either, Ready};
use http::HeaderMap;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Settings;

/// Why the quota said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The next free slot is after the caller's deadline.
    PastDeadline,
    /// An upstream 429 moved the caller's slot past its deadline.
    PausedPastDeadline,
    /// `limit.max_queue` requests are already waiting here.
    QueueFull,
}

impl Limited {
    pub fn message(self) -> &'static str {
        match self {
            Limited::PastDeadline => "no quota slot frees up within this request's max_wait",
            Limited::PausedPastDeadline => "SmartLead asked to pause past this request's max_wait",
            Limited::QueueFull => "the proxy's queue is full",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Limited::PastDeadline => "max_wait",
            Limited::PausedPastDeadline => "paused",
            Limited::QueueFull => "queue_full",
        }
    }
}

/// Why a request gets no slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No slot within the caller's deadline, or the queue is full: 429 `RATE_LIMITED`.
    RateLimited { retry_after: Duration, why: Limited },
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

/// A reservation log somewhere. Waits are relative ("this long from now"), so no two
/// hosts' clocks are ever compared.
pub trait Backend: Send + Sync + 'static {
    /// A slot starting within `max_wait`: `Ok(wait)` from now, or the refusal.
    fn reserve(&self, id: u64, max_wait: Duration) -> Answer<'_, Result<Duration, Refusal>>;
    /// Time left until the reservation's slot, which a pause may have moved.
    fn wait_of(&self, id: u64) -> Answer<'_, Option<Duration>>;
    /// Gives back a slot that has not started.
    fn cancel(&self, id: u64) -> Answer<'_, ()>;
    /// Nothing starts for `pause`; waiting slots move later together.
    fn pause(&self, pause: Duration) -> Answer<'_, ()>;
    /// The limit for reservations from now on (`limit.follow_upstream`).
    fn set_limit(&self, limit: usize) -> Answer<'_, ()>;
    /// Changes whenever waiting slots may have moved.
    fn moved(&self) -> watch::Receiver<u64>;
    fn status(&self) -> Status;
}

/// The per-process face of the quota.
pub struct Limiter {
    backend: Arc<dyn Backend>,
    waiting: AtomicUsize,
    max_queue: usize,
    per_request: Duration,
    period: Duration,
    ids: AtomicU64,
    follow: Follow,
}

/// What SmartLead's `x-ratelimit-*` headers have told us so far.
struct Follow {
    configured: usize,
    enabled: bool,
    in_force: AtomicUsize,
    warned: std::sync::atomic::AtomicBool,
    /// The end of the latest pause asked for by `x-ratelimit-remaining: 0`.
    paused_until: std::sync::Mutex<Option<Instant>>,
    longest_pause: Duration,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("status", &self.backend.status())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish()
    }
}

impl Limiter {
    pub fn new(backend: Arc<dyn Backend>, settings: &Settings) -> Self {
        let l = &settings.limit;
        Self {
            backend,
            waiting: AtomicUsize::new(0),
            max_queue: l.max_queue,
            per_request: l.period / l.requests,
            period: l.period,
            // Random high bits keep ids unique across instances sharing one Redis log.
            ids: AtomicU64::new(rand::random::<u64>() & !0xFFFF_FFFF),
            follow: Follow {
                configured: l.requests as usize,
                enabled: l.follow_upstream,
                in_force: AtomicUsize::new(l.requests as usize),
                warned: Default::default(),
                paused_until: Default::default(),
                longest_pause: l.period.max(settings.retry.max_delay),
            },
        }
    }

    /// Builds the backend `limit.backend` names.
    pub fn from_settings(settings: &Settings) -> Result<Self, String> {
        let backend: Arc<dyn Backend> = match settings.limit.backend {
            crate::config::LimitBackend::Local => {
                Arc::new(local::LocalBackend::new(&settings.limit))
            }
            crate::config::LimitBackend::Redis => redis::RedisBackend::start(settings)?,
        };
        Ok(Self::new(backend, settings))
    }

    pub fn status(&self) -> Status {
        self.backend.status()
    }

    /// The limit in force (SmartLead's, when it is followed and smaller) and its period.
    pub fn window(&self) -> (usize, Duration) {
        (self.follow.in_force.load(Ordering::Relaxed), self.period)
    }

    /// Requests currently waiting for a slot in this process.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub async fn pause(&self, pause: Duration) {
        crate::metrics::upstream_pause();
        self.backend.pause(pause).await;
    }

    /// Applies what SmartLead's `x-ratelimit-*` headers say: at `remaining: 0` every
    /// instance pauses until the reset; a limit different from `limit.requests` is logged
    /// once and, with `limit.follow_upstream`, the smaller of the two is used.
    pub async fn observe(&self, headers: &HeaderMap) {
        if let Some(upstream) = header_number(headers, "x-ratelimit-limit") {
            self.follow_limit(upstream.max(1.0) as usize).await;
        }
        if header_number(headers, "x-ratelimit-remaining") != Some(0.0) {
            return;
        }
        let Some(reset) = reset_after(headers, std::time::SystemTime::now()) else {
            return;
        };
        // Whole seconds are taken as rounded up: the quota may free up to a second
        // sooner, and pausing too short is safe (an early request meets a 429 whose
        // Retry-After pauses everyone), while too long wastes quota.
        let reset = if reset.subsec_nanos() == 0 {
            reset.saturating_sub(Duration::from_secs(1))
        } else {
            reset
        };
        if reset.is_zero() {
            return;
        }
        let pause = reset.min(self.follow.longest_pause);
        let until = Instant::now() + pause;
        {
            let mut paused = self
                .follow
                .paused_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Concurrent answers all report the same reset: pause once.
            if paused.is_some_and(|p| p + Duration::from_millis(100) >= until) {
                return;
            }
            *paused = Some(until);
        }
        tracing::debug!(
            pause_ms = pause.as_millis() as u64,
            "SmartLead reports no requests left: pausing until its reset"
        );
        self.pause(pause).await;
    }

    async fn follow_limit(&self, upstream: usize) {
        let f = &self.follow;
        // Plain loads first: this runs on every answer, from every serving thread.
        if upstream != f.configured
            && !f.warned.load(Ordering::Relaxed)
            && !f.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                configured = f.configured,
                upstream,
                follow_upstream = f.enabled,
                "SmartLead reports a rate limit different from limit.requests{}",
                if f.enabled && upstream < f.configured {
                    ": using SmartLead's"
                } else {
                    ""
                }
            );
        }
        if !f.enabled {
            return;
        }
        let want = upstream.min(f.configured);
        if f.in_force.load(Ordering::Relaxed) != want
            && f.in_force.swap(want, Ordering::Relaxed) != want
        {
            tracing::info!(limit = want, "quota limit now in force");
            self.backend.set_limit(want).await;
        }
    }

    /// Waits for a slot that starts no later than `deadline`; returns how long it waited.
    /// Refuses at once when the slot would come too late. Dropping the future while it
    /// waits gives the slot back.
    pub async fn acquire(&self, deadline: Instant) -> Result<Duration, Refusal> {
        let result = self.wait_for_slot(deadline).await;
        match &result {
            Ok(waited) => crate::metrics::limiter_wait(*waited),
            Err(Refusal::RateLimited { why, .. }) => crate::metrics::quota_rejected(why.label()),
            Err(Refusal::Unavailable(_)) => crate::metrics::quota_rejected("unavailable"),
        }
        result
    }

    async fn wait_for_slot(&self, deadline: Instant) -> Result<Duration, Refusal> {
        let arrived = Instant::now();
        let _queued = self.enter_queue()?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut moved = self.backend.moved();
        moved.borrow_and_update();
        let max_wait = deadline.saturating_duration_since(arrived);
        let wait = self.backend.reserve(id, max_wait).await?;
        if wait.is_zero() {
            return Ok(arrived.elapsed());
        }
        let mut reservation = Reservation {
            backend: self.backend.clone(),
            id,
            held: true,
        };
        let mut start_at = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(start_at) => break,
                changed = moved.changed() => {
                    if changed.is_err() {
                        // The backend is gone; keep the slot we have.
                        tokio::time::sleep_until(start_at).await;
                        break;
                    }
                    if let Some(wait) = self.backend.wait_of(id).await {
                        start_at = Instant::now() + wait;
                        if start_at > deadline {
                            return Err(Refusal::RateLimited {
                                retry_after: wait,
                                why: Limited::PausedPastDeadline,
                            });
                        }
                    }
                }
            }
        }
        reservation.held = false;
        Ok(arrived.elapsed())
    }

    fn enter_queue(&self) -> Result<QueueSeat<'_>, Refusal> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let seat = QueueSeat(&self.waiting);
        if before >= self.max_queue {
            // An honest estimate: the time the queue ahead needs to drain.
            let retry_after = self.per_request * before.min(u32::MAX as usize) as u32;
            return Err(Refusal::RateLimited {
                retry_after,
                why: Limited::QueueFull,
            });
        }
        Ok(seat)
    }
}

struct QueueSeat<'a>(&'a AtomicUsize);

impl Drop for QueueSeat<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A granted slot not yet used; dropped unused (the caller went away) it is given back.
struct Reservation {
    backend: Arc<dyn Backend>,
    id: u64,
    held: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let backend = self.backend.clone();
            let id = self.id;
            rt.spawn(async move { backend.cancel(id).await });
        }
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<f64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

/// `x-ratelimit-reset` as a wait: seconds from now, or (for values that can only be
/// one) a Unix time in seconds.
fn reset_after(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let v = header_number(headers, "x-ratelimit-reset")?;
    const UNIX_TIME_FROM: f64 = 1_000_000_000.0;
    let secs = if v >= UNIX_TIME_FROM {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        v - now
    } else {
        v
    };
    (secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}
