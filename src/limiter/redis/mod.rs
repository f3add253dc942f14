//! The shared backend: one log and one fair line per account in Redis for every instance
//! with the same `redis.key`, Lua scripts (one round trip each, Redis `TIME`).
//!
//! An account's keys are `{<key>:<account>}:log` (sorted set: member = waiter id, score =
//! start in µs), `{<key>:<account>}:pause`, `{<key>:<account>}:limit` (the per-minute
//! limit adopted from SmartLead) and the fleet line's (docs/fleet.md), so a Redis
//! Cluster keeps each account in one hash slot and spreads the accounts. Each account has
//! a driver task (`line`) that runs its steps (`lua/fleet_step.lua`). A pause is
//! announced on `{<key>:<account>}:moved`, so every instance re-checks its waiters.
//!
//! [`RedisLink`] (`link`) is what the accounts share: one connection, one pattern
//! subscription for every account's announcements, one heartbeat (`{<key>}:instances`)
//! and one health state.
//! When Redis cannot be reached (`redis.on_error = "local"`), each account serves from a
//! local log holding its share of its quota (÷ live instances, seeded with its own recent
//! starts) and merges that log back into Redis when it returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::{Either, FutureExt};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::fleet::FleetLine;
use super::local::{LocalBackend, micros};
use super::log::Span;
use super::{Answer, Backend, CapCheck, Limited, Refusal, Status};
use crate::config::OnRedisError;

mod line;
mod link;

use link::*;
pub use link::{Instance, RedisLink};

struct Keys {
    log: String,
    pause: String,
    /// The per-minute limit adopted from SmartLead's headers (`limit.follow_upstream`).
    limit: String,
    channel: String,
    /// The fleet line (`lua/fleet_step.lua`): waiters by class, the promoted one, each
    /// waiter's details, virtual times and tags, the instances' leases on the line.
    lines: [String; 3],
    promoted: String,
    waiters: String,
    tags: String,
    leases: String,
    /// Set when the log is first made: gone, the log was lost.
    epoch: String,
    /// While set, nothing is granted: the instances are writing back their starts.
    hold: String,
    reseeded: String,
    /// Set while anyone may wait in the line (the fast path reads it with the others).
    busy: String,
    /// Prefixes: each instance's decisions list, and the slots' shares per 10 s.
    granted: String,
    shares: String,
}

/// Reservations asked for while another batch was on its way to Redis: the next batch.
#[derive(Default)]
struct Batch {
    waiting: Vec<Asked>,
    /// Tasks sending batches (at most [`MOST_IN_FLIGHT`]).
    senders: usize,
}

/// One reservation asked for: its id, how long it may wait, and where its answer goes.
struct Asked {
    id: u64,
    max_wait: Duration,
    answer: tokio::sync::oneshot::Sender<RedisResult<Granted>>,
}

/// Redis' answer to one reservation.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Granted {
    /// After this wait.
    After(Duration),
    /// Its slot would come after this wait, past its deadline, held back by this window
    /// (1-based; 0 for none).
    Refused(Duration, i64),
}

impl Granted {
    /// The script's number for one reservation of a batch sent with `windows` windows
    /// (see `RESERVE_MANY`).
    fn of(n: i64, windows: usize) -> Self {
        let micros = |m: i64| Duration::from_micros(m.max(0) as u64);
        if n >= 0 {
            return Granted::After(micros(n));
        }
        let packed = -(n + 1);
        let wide = windows as i64 + 1;
        Granted::Refused(micros(packed / wide), packed % wide)
    }
}

/// Most reservations sent in one call.
const MOST_PER_BATCH: usize = 256;
/// Batches of one account on their way to Redis at once: while one is run there, the
/// next is gathered and sent, so neither side waits for the other. Redis runs them in
/// the order they were sent; which waiter uses which slot is the line's business
/// (`fair`), so the order between two batches does not matter.
const MOST_IN_FLIGHT: usize = 2;
/// Reservations waiting that make a second batch worth sending before the first is back.
const FULL_ENOUGH: usize = 32;

/// The windows as the scripts take them: a limit and a length (µs) each.
fn script_windows(spans: &[Span]) -> Vec<usize> {
    spans
        .iter()
        .flat_map(|s| [s.limit, s.length as usize])
        .collect()
}

/// One instance's share of `spans` while Redis is unreachable.
fn share(spans: &[Span], live: usize) -> Vec<Span> {
    spans
        .iter()
        .map(|s| Span::new((s.limit / live).max(1), s.length))
        .collect()
}

/// One account's log in Redis.
pub struct RedisBackend {
    me: Weak<RedisBackend>,
    /// Reservations waiting to go to Redis together.
    batch: Mutex<Batch>,
    link: Arc<RedisLink>,
    keys: Keys,
    /// The windows as the scripts take them: a limit and a length (µs) each.
    windows: Mutex<Vec<usize>>,
    /// The windows, with the followed one's limit as it is in force.
    spans: Mutex<Vec<Span>>,
    /// The window SmartLead's headers describe (0-based).
    follow: AtomicUsize,
    /// Serving share while Redis is unreachable.
    fallback: Mutex<Option<Arc<LocalBackend>>>,
    /// This instance's recent shared starts, to seed a fallback or a lost log.
    own: Mutex<VecDeque<(Instant, u64)>>,
    moved: watch::Sender<u64>,
    /// This instance's waiters in the fleet's line.
    fleet: FleetLine,
    /// The log's epoch as this instance last saw it (empty: not yet).
    epoch: Mutex<String>,
    /// The fleet's starts per window at the last step, and when.
    fleet_used: Mutex<Option<(Instant, Vec<usize>)>>,
    /// When the driver steps unasked next (`None`: only when there is news).
    next_step: Mutex<Option<Instant>>,
    steps_in_flight: AtomicUsize,
}

impl RedisBackend {
    /// Adds the windows to `inv`; returns how many there are.
    fn windows_args<'a>(&self, inv: &mut redis::ScriptInvocation<'a>) -> usize {
        let windows = lock(&self.windows);
        inv.arg(windows.len() / 2);
        for n in windows.iter() {
            inv.arg(*n);
        }
        windows.len() / 2
    }

    /// Sends what is waiting, batch after batch, until nothing is.
    async fn send_batches(&self) {
        loop {
            // Callers just answered (and others woken meanwhile) get to run and ask
            // again first: one script run per batch costs Redis far more than one more
            // reservation in it, so fuller batches are what raise the decision rate.
            tokio::task::yield_now().await;
            let asked: Vec<Asked> = {
                let mut batch = lock(&self.batch);
                if batch.waiting.is_empty() {
                    batch.senders -= 1;
                    return;
                }
                let take = batch.waiting.len().min(MOST_PER_BATCH);
                batch.waiting.drain(..take).collect()
            };
            let mut inv = self.link.scripts.reserve_many.key(&self.keys.log);
            inv.key(&self.keys.pause)
                .key(&self.keys.limit)
                .arg(self.follow.load(Ordering::Relaxed) + 1);
            let windows = self.windows_args(&mut inv);
            inv.arg(asked.len());
            for a in &asked {
                inv.arg(a.id).arg(micros(a.max_wait));
            }
            let answers = match self.link.call::<Vec<i64>>(inv).await {
                Ok(all) if all.len() == asked.len() => Ok(all),
                Ok(all) => Err(format!(
                    "reserve_many answered {} values for {} reservations",
                    all.len(),
                    asked.len()
                )),
                Err(e) => Err(e),
            };
            if let Ok(all) = &answers {
                self.remember_own(asked.iter().zip(all).filter_map(|(a, n)| {
                    match Granted::of(*n, windows) {
                        Granted::After(wait) => Some((a.id, wait)),
                        Granted::Refused(..) => None,
                    }
                }));
            }
            for (i, a) in asked.into_iter().enumerate() {
                let granted = match &answers {
                    Ok(all) => Ok(Granted::of(all[i], windows)),
                    Err(e) => Err(e.clone()),
                };
                // A caller that went away meanwhile gives its slot back.
                if let Err(Ok(Granted::After(_))) = a.answer.send(granted) {
                    Backend::cancel(self, a.id).await;
                }
            }
        }
    }

    /// Runs the layout script: `limit` for the followed window `window` (0-based), or 0
    /// for none.
    async fn relayout(&self, limit: usize, window: usize) {
        let mut inv = self.link.scripts.set_limit.key(&self.keys.log);
        inv.key(&self.keys.limit)
            .key(&self.keys.pause)
            .arg(limit)
            .arg(window + 1)
            .arg(&self.keys.channel);
        self.windows_args(&mut inv);
        if let Err(e) = self.link.call::<i64>(inv).await {
            self.link.degrade(e);
        }
    }

    fn longest(&self) -> usize {
        lock(&self.windows)
            .iter()
            .skip(1)
            .step_by(2)
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// This account's local share while Redis is unreachable, made on first use; `None`
    /// with `on_error = "reject"`.
    fn fallback(&self) -> Option<Arc<LocalBackend>> {
        if self.link.is_healthy() || self.link.on_error == OnRedisError::Reject {
            return lock(&self.fallback).clone();
        }
        let mut fallback = lock(&self.fallback);
        if fallback.is_none() {
            let live = self.link.live.load(Ordering::Relaxed).max(1);
            let fb = LocalBackend::with_spans(share(&lock(&self.spans), live), "fallback");
            let now = Instant::now();
            for (slot, id) in lock(&self.own).iter() {
                fb.record(micros_between(now, *slot), *id);
            }
            // The others' starts, as the last step counted them, are taken to have been
            // made at that step (later than they were: they hold the share longer, never
            // shorter): the fleet stays within every window while each serves its share.
            if let Some((at, others)) = self.others_started(now) {
                let offset = micros_between(now, at);
                for n in 0..others {
                    fb.record(offset, u64::MAX - n as u64);
                }
            }
            *fallback = Some(Arc::new(fb));
        }
        fallback.clone()
    }

    /// How many starts of other instances the last step's count holds beyond this
    /// instance's own, in the window where that is most, and when it was counted.
    fn others_started(&self, now: Instant) -> Option<(Instant, usize)> {
        let (at, used) = lock(&self.fleet_used).clone()?;
        let own = lock(&self.own);
        let spans = lock(&self.spans);
        let others = spans
            .iter()
            .zip(&used)
            .map(|(span, used)| {
                let length = Duration::from_micros(span.length);
                let mine = own
                    .iter()
                    .filter(|(s, _)| *s + length > at.min(now))
                    .count();
                used.saturating_sub(mine)
            })
            .max()?;
        Some((at, others))
    }

    /// Writes the starts made on the local share into the shared log.
    async fn merge_fallback(&self) -> RedisResult<()> {
        let Some(fb) = lock(&self.fallback).clone() else {
            return Ok(());
        };
        let recent = fb.recent();
        if !recent.is_empty() {
            let mut inv = self.link.scripts.merge.key(&self.keys.log);
            inv.arg(self.longest());
            for (offset, id) in recent {
                inv.arg(offset).arg(id);
            }
            self.link.call::<i64>(inv).await?;
        }
        *lock(&self.fallback) = None;
        Ok(())
    }

    /// This instance's starts just granted (`(id, wait)`), kept to seed a fallback; one
    /// lock per batch.
    fn remember_own(&self, granted: impl Iterator<Item = (u64, Duration)>) {
        let now = Instant::now();
        let longest = Duration::from_micros(self.longest() as u64);
        let mut own = lock(&self.own);
        while own.front().is_some_and(|(s, _)| *s + longest <= now) {
            own.pop_front();
        }
        own.extend(granted.map(|(id, wait)| (now + wait, id)));
    }

    fn reserve_degraded(&self, id: u64, max_wait: Duration) -> Result<Duration, Refusal> {
        match self.fallback() {
            Some(fb) => fb.reserve_now(id, max_wait),
            None => Err(Refusal::Unavailable(format!(
                "the shared rate limiter (Redis) is unreachable: {}",
                lock(&self.link.detail).clone().unwrap_or_default()
            ))),
        }
    }

    /// Reservations are sent in batches: concurrent waiters share one round trip and one
    /// script run (the decisions of one instance pipelined), in the order they asked.
    async fn reserve_shared(&self, id: u64, max_wait: Duration) -> Result<Duration, Refusal> {
        let (answer, granted) = tokio::sync::oneshot::channel();
        let start = {
            let mut batch = lock(&self.batch);
            batch.waiting.push(Asked {
                id,
                max_wait,
                answer,
            });
            // A second batch only once enough wait for it to be worth a script run.
            let start = batch.senders == 0
                || (batch.senders < MOST_IN_FLIGHT && batch.waiting.len() >= FULL_ENOUGH);
            batch.senders += usize::from(start);
            start
        };
        if start && let Some(me) = self.me.upgrade() {
            // A task of its own: the batch must reach Redis even if this caller goes.
            tokio::spawn(async move { me.send_batches().await });
        }
        let granted = granted
            .await
            .unwrap_or_else(|_| Err("the reservation was not sent".to_owned()));
        match granted {
            Ok(Granted::After(wait)) => Ok(wait),
            Ok(Granted::Refused(wait, binding)) => Err(Refusal::RateLimited {
                retry_after: wait,
                why: Limited::PastDeadline,
                window: usize::try_from(binding - 1).ok(),
            }),
            Err(e) => {
                self.link.degrade(e);
                self.reserve_degraded(id, max_wait)
            }
        }
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        // Its driver wakes and finds it gone.
        self.fleet.kick.notify_one();
    }
}

/// Runs an account's fleet line while the account lives.
async fn drive(backend: Weak<RedisBackend>, kick: Arc<Notify>, mut stop: watch::Receiver<()>) {
    let mut wake = Some(Instant::now());
    loop {
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = kick.notified() => {}
            _ = stop.changed() => return,
        }
        let Some(b) = backend.upgrade() else { return };
        wake = b.start_rounds();
    }
}

/// Steps of one account on their way to Redis at once: while one is run there, the next
/// gathers the newcomers that came meanwhile, so neither side waits for the other.
const MOST_STEPS_IN_FLIGHT: usize = 2;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Signed microseconds from `now` to `at`.
fn micros_between(now: Instant, at: Instant) -> i64 {
    if at >= now {
        micros(at - now) as i64
    } else {
        -(micros(now - at) as i64)
    }
}

impl Backend for RedisBackend {
    fn is_shared(&self) -> bool {
        self.link.is_healthy()
    }

    fn fleet(&self) -> Option<&FleetLine> {
        self.link.is_healthy().then_some(&self.fleet)
    }

    fn shares(&self) -> Answer<'_, Option<Vec<(String, f64)>>> {
        Either::Right(self.shares_now().boxed())
    }

    fn client_cap(&self, client: &str, requests: u32, period: Duration) -> Answer<'_, CapCheck> {
        let key = format!("{{{}}}:cap:{client}", self.link.base);
        let interval = micros(period / requests.max(1)).max(1);
        Either::Right(
            async move {
                if !self.link.is_healthy() {
                    return CapCheck::NotShared;
                }
                let mut inv = self.link.scripts.client_cap.key(key);
                inv.arg(interval).arg(micros(period));
                match self.link.call::<i64>(inv).await {
                    Ok(0) => CapCheck::Admitted,
                    Ok(wait) => CapCheck::Refused(Duration::from_micros(wait.max(1) as u64)),
                    Err(_) => CapCheck::NotShared,
                }
            }
            .boxed(),
        )
    }

    fn reserve(&self, id: u64, max_wait: Duration) -> Answer<'_, Result<Duration, Refusal>> {
        Either::Right(
            async move {
                // While Redis answers, requests wait in the fleet's line; a reservation
                // reaches here then only when Redis came back between the caller's
                // look and this call: it is made in the shared log, at arrival.
                if self.link.is_healthy() {
                    self.reserve_shared(id, max_wait).await
                } else {
                    self.reserve_degraded(id, max_wait)
                }
            }
            .boxed(),
        )
    }

    fn waits_of<'a>(&'a self, ids: &'a [u64]) -> Answer<'a, Vec<Option<Duration>>> {
        Either::Right(
            async move {
                if let Some(fb) = lock(&self.fallback).clone() {
                    return ids.iter().map(|id| fb.wait_now(*id)).collect();
                }
                let mut inv = self.link.scripts.waits_of.key(&self.keys.log);
                for id in ids {
                    inv.arg(*id);
                }
                match self.link.call::<Vec<i64>>(inv).await {
                    Ok(waits) if waits.len() == ids.len() => waits
                        .into_iter()
                        .map(|w| (w >= 0).then(|| Duration::from_micros(w as u64)))
                        .collect(),
                    _ => vec![None; ids.len()],
                }
            }
            .boxed(),
        )
    }

    fn cancel(&self, id: u64) -> Answer<'_, ()> {
        Either::Right(
            async move {
                if let Some(fb) = lock(&self.fallback).clone() {
                    fb.cancel_now(id);
                }
                if self.link.is_healthy() {
                    let mut inv = self.link.scripts.cancel.key(&self.keys.log);
                    inv.arg(id);
                    let _ = self.link.call::<i64>(inv).await;
                }
            }
            .boxed(),
        )
    }

    fn pause(&self, pause: Duration) -> Answer<'_, ()> {
        Either::Right(
            async move {
                if let Some(fb) = lock(&self.fallback).clone() {
                    fb.pause_now(pause);
                }
                if self.link.is_healthy() {
                    let mut inv = self.link.scripts.pause.key(&self.keys.log);
                    inv.key(&self.keys.pause)
                        .arg(micros(pause))
                        .arg(&self.keys.channel);
                    if let Err(e) = self.link.call::<i64>(inv).await {
                        self.link.degrade(e);
                        if let Some(fb) = self.fallback() {
                            fb.pause_now(pause);
                        }
                    }
                }
            }
            .boxed(),
        )
    }

    fn set_limit(&self, window: usize, limit: usize) -> Answer<'_, ()> {
        Either::Right(
            async move {
                if let Some(span) = lock(&self.spans).get_mut(window) {
                    span.limit = limit.max(1);
                }
                if let Some(fb) = lock(&self.fallback).clone() {
                    let live = self.link.live.load(Ordering::Relaxed).max(1);
                    fb.set_limit_now(window, (limit / live).max(1));
                }
                if self.link.is_healthy() {
                    // The stored limit is kept a day: longer than any window, and
                    // rewritten by whoever next sees SmartLead report a different one.
                    self.relayout(limit, window).await;
                }
                self.fleet.walk_soon();
            }
            .boxed(),
        )
    }

    fn set_windows(&self, spans: Vec<Span>, follow: usize) -> Answer<'_, ()> {
        Either::Right(
            async move {
                *lock(&self.windows) = script_windows(&spans);
                self.follow.store(follow, Ordering::Relaxed);
                if let Some(fb) = lock(&self.fallback).clone() {
                    let live = self.link.live.load(Ordering::Relaxed).max(1);
                    fb.set_spans_now(share(&spans, live));
                }
                *lock(&self.spans) = spans;
                if self.link.is_healthy() {
                    // 0: no adopted limit; SmartLead's headers set one again if need be.
                    self.relayout(0, follow).await;
                }
                self.fleet.walk_soon();
            }
            .boxed(),
        )
    }

    fn used(&self) -> Answer<'_, Vec<usize>> {
        Either::Right(
            async move {
                if let Some(fb) = lock(&self.fallback).clone() {
                    return fb.used_now();
                }
                let mut inv = self.link.scripts.used.key(&self.keys.log);
                self.windows_args(&mut inv);
                self.link
                    .call::<Vec<usize>>(inv)
                    .await
                    .unwrap_or_else(|_| vec![0; lock(&self.windows).len() / 2])
            }
            .boxed(),
        )
    }

    fn moved(&self) -> watch::Receiver<u64> {
        let mut rx = self.moved.subscribe();
        // A waiter in the fallback also listens to the fallback's own moves.
        if let Some(fb) = lock(&self.fallback).clone() {
            rx = merge_moves(rx, fb.moved());
        }
        rx
    }

    fn status(&self) -> Status {
        self.link.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `RESERVE_MANY` answers, with `windows` windows, for a refusal after `wait` µs
    /// held back by `binding`.
    fn refused(wait: i64, binding: i64, windows: i64) -> i64 {
        -(wait * (windows + 1) + binding) - 1
    }

    #[test]
    fn the_script_s_numbers_read_back_as_what_it_decided() {
        let us = Duration::from_micros;
        assert_eq!(Granted::of(0, 3), Granted::After(us(0)));
        assert_eq!(Granted::of(1_500, 3), Granted::After(us(1_500)));
        assert_eq!(Granted::of(refused(0, 0, 3), 3), Granted::Refused(us(0), 0));
        assert_eq!(
            Granted::of(refused(2_000, 2, 3), 3),
            Granted::Refused(us(2_000), 2)
        );
        // A day's wait, held back by the last of a thousand windows.
        let day = 86_400_000_000;
        assert_eq!(
            Granted::of(refused(day, 1_000, 1_000), 1_000),
            Granted::Refused(us(day as u64), 1_000)
        );
    }
}
