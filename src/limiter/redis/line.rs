//! The account's part of the fleet's line: a driver task runs its steps
//! (`lua/fleet_step.lua`), each registering this instance's newcomers, granting due slots
//! in fair order and settling what was decided for this instance's waiters.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::limiter::fleet::{Decision, Round};
use crate::limiter::local::micros;

use super::*;

/// Most waiters a step walks to check their deadlines; the ones after them get their 429
/// at their deadline.
pub(super) const MOST_WALKED: usize = 1000;

/// What a step of the fleet line answered.
pub(super) enum Stepped {
    /// The log was lost, or made anew by another instance: write back this instance's
    /// starts, then register its waiters again.
    Reseed(String),
    Done {
        epoch: String,
        /// This instance's lease on the line had run out.
        lapsed: bool,
        /// Until the next slot is due (`None`: nobody waits).
        due: Option<Duration>,
        /// Per join of the round: whether it started at once (else it waits).
        started: Vec<bool>,
        decisions: Vec<Decision>,
        /// Starts each window holds now, the whole fleet's.
        used: Vec<usize>,
    },
}

impl Stepped {
    /// A grant that waited in this instance's list more than `late` is late.
    pub(super) fn parse(out: Vec<String>, late: Duration) -> RedisResult<Self> {
        let mut it = out.into_iter();
        let mut next = || it.next().ok_or("the fleet step answered too little");
        let (status, epoch) = (next()?, next()?);
        if status == "1" {
            return Ok(Stepped::Reseed(epoch));
        }
        let lapsed = next()? == "1";
        let now: f64 = next()?.parse().map_err(|_| "a fleet step's time")?;
        let due: f64 = next()?.parse().map_err(|_| "a fleet step's due time")?;
        let started = next()?;
        let n: usize = next()?.parse().map_err(|_| "a fleet step's count")?;
        let mut decisions = Vec::with_capacity(n);
        for _ in 0..n {
            decisions.extend(Decision::parse(&next()?, now, late));
        }
        let used = it.filter_map(|u| u.parse().ok()).collect();
        Ok(Stepped::Done {
            epoch,
            lapsed,
            due: (due >= 0.0).then(|| Duration::from_micros(due as u64)),
            started: started.bytes().map(|b| b == b'g').collect(),
            decisions,
            used,
        })
    }
}

impl RedisBackend {
    /// Starts the rounds there is something for (at most [`MOST_STEPS_IN_FLIGHT`] at
    /// once); returns when the driver is to come back unasked (`None`: when kicked).
    pub(super) fn start_rounds(&self) -> Option<Instant> {
        if !self.link.is_healthy() {
            // Anyone who came in just before the outage goes to its own line too.
            self.fleet.fail_all();
            return None;
        }
        // Idle, it still steps three times a lease: it sees a lost log, and knows how much
        // of the quota the fleet used should Redis go away.
        let renew = self.link.lease / 3;
        loop {
            let now = Instant::now();
            let due = lock(&self.next_step).is_none_or(|at| at <= now);
            if !due && !self.fleet.has_news() {
                break;
            }
            // A round that ends kicks the driver. A second step only once enough
            // newcomers wait for it to be worth a script run of its own: one run per
            // step costs Redis far more than one more newcomer in it.
            let in_flight = self.steps_in_flight.load(Ordering::Acquire);
            if in_flight >= MOST_STEPS_IN_FLIGHT
                || (in_flight > 0 && self.fleet.unsent() < FULL_ENOUGH)
            {
                break;
            }
            let Some(me) = self.me.upgrade() else { break };
            self.steps_in_flight.store(in_flight + 1, Ordering::Release);
            *lock(&self.next_step) = Some(now + renew);
            tokio::spawn(async move {
                let next = me.fleet_round().await;
                me.steps_in_flight.fetch_sub(1, Ordering::AcqRel);
                if let Some(d) = next {
                    let at = Instant::now() + d;
                    let mut step = lock(&me.next_step);
                    *step = Some(step.map_or(at, |s| s.min(at)));
                }
                me.fleet.kick.notify_one();
            });
        }
        *lock(&self.next_step)
    }

    /// One round of this account's fleet line: leavers out, newcomers in, the slots that
    /// are due granted, decisions handed over. Returns when to come back (`None`: only
    /// when there is news).
    pub(super) async fn fleet_round(&self) -> Option<Duration> {
        if !self.link.is_healthy() {
            return None;
        }
        let renew = self.link.lease / 3;
        // Callers woken with this one get to join the same step.
        tokio::task::yield_now().await;
        let round = self.fleet.take_round();
        if let Err(e) = self.leave_all(&round).await {
            self.link.degrade(e);
            return None;
        }
        let stepped = match self.step(&round).await {
            Ok(s) => s,
            Err(e) => {
                self.link.degrade(e);
                return None;
            }
        };
        match stepped {
            Stepped::Reseed(epoch) => {
                if let Err(e) = self.reseed().await {
                    self.link.degrade(e);
                    return None;
                }
                tracing::warn!(account = %self.keys.log, "the shared quota's log was lost (FLUSHALL or a new Redis): this instance wrote back its recent starts and registers its waiters again");
                *lock(&self.epoch) = epoch;
                self.fleet.rejoin_all();
                Some(Duration::ZERO)
            }
            Stepped::Done {
                epoch,
                lapsed,
                due,
                started,
                decisions,
                used,
            } => {
                *lock(&self.epoch) = epoch;
                *lock(&self.fleet_used) = Some((Instant::now(), used));
                self.settle(&round, &started, decisions);
                if lapsed && round.registered {
                    tracing::warn!(
                        "this instance's lease on the fleet line had run out: its waiters register again, in their order"
                    );
                    self.fleet.rejoin_all();
                    return Some(Duration::ZERO);
                }
                Some(due.map_or(renew, |d| d.min(renew)))
            }
        }
    }

    /// Hands the decisions over (`started`: per join, whether it started at once) and
    /// counts what the round cost.
    pub(super) fn settle(&self, round: &Round, started: &[bool], decisions: Vec<Decision>) {
        let fast = started.iter().filter(|s| **s).count();
        let news = round.joins.iter().filter(|j| !j.rejoin).count();
        crate::metrics::fleet_requests(fast, news.saturating_sub(fast));
        let path = if round.registered || fast < round.joins.len() {
            "queued"
        } else if round.joins.is_empty() {
            // Three times a lease with nobody in line: the lease, the epoch, the counts.
            "idle"
        } else {
            "fast"
        };
        crate::metrics::fleet_round_trip(path);
        let at_once = round
            .joins
            .iter()
            .zip(started)
            .filter(|(_, s)| **s)
            .map(|(j, _)| Decision::Granted(j.id));
        let went: Vec<(u64, Duration)> = at_once
            .chain(decisions)
            .filter_map(|d| self.fleet.decided(d))
            .map(|id| (id, Duration::ZERO))
            .collect();
        if !went.is_empty() {
            crate::metrics::fleet_granted(&self.link.instance, went.len());
            self.remember_own(went.into_iter());
        }
    }

    /// Takes the round's leavers out of the line; the ones past their deadline learn
    /// whether they were granted after all.
    pub(super) async fn leave_all(&self, round: &Round) -> RedisResult<()> {
        let back: Vec<u64> = round
            .leave_back
            .iter()
            .chain(&round.give_back)
            .copied()
            .collect();
        for (ids, mode) in [(&round.leave_go, "go"), (&back, "back")] {
            if ids.is_empty() {
                continue;
            }
            let k = &self.keys;
            let mut inv = self.link.scripts.fleet_leave.key(&k.log);
            inv.key(&k.lines[0])
                .key(&k.lines[1])
                .key(&k.lines[2])
                .key(&k.promoted)
                .key(&k.waiters)
                .key(&k.tags)
                .arg(&self.link.instance)
                .arg(&k.granted)
                .arg(mode);
            for id in ids.iter() {
                inv.arg(*id);
            }
            let answers: Vec<String> = self.link.call(inv).await?;
            crate::metrics::fleet_round_trip("queued");
            if mode == "go" {
                self.fleet.left(ids, &answers, self.spacing());
            }
        }
        Ok(())
    }

    /// One run of `lua/fleet_step.lua` with the round's newcomers.
    pub(super) async fn step(&self, round: &Round) -> RedisResult<Stepped> {
        let k = &self.keys;
        let known = lock(&self.epoch).clone();
        let mut inv = self.link.scripts.fleet_step.key(&k.log);
        for key in [
            &k.pause,
            &k.limit,
            &k.lines[0],
            &k.lines[1],
            &k.lines[2],
            &k.promoted,
            &k.waiters,
            &k.tags,
            &k.leases,
            &k.epoch,
            &k.hold,
            &k.reseeded,
            &k.busy,
        ] {
            inv.key(key);
        }
        // Grants wait for the instances to write back their starts at most until each has
        // renewed its lease once (and seen the loss).
        let hold = self.link.lease / 3 + OP_TIMEOUT;
        inv.arg(&self.link.instance)
            .arg(micros(self.link.lease))
            .arg(known)
            .arg(format!("{:016x}", rand::random::<u64>()))
            .arg(self.link.lately_live())
            .arg(hold.as_millis() as u64)
            .arg(self.follow.load(Ordering::Relaxed) + 1)
            .arg(MOST_WALKED)
            .arg(format!(
                "{}{}",
                u8::from(round.walk),
                u8::from(round.registered)
            ))
            .arg(&k.channel)
            .arg(&k.granted)
            .arg(crate::limiter::fair::FLOOR)
            .arg(&k.shares);
        self.windows_args(&mut inv);
        inv.arg(round.joins.len());
        let now = Instant::now();
        for j in &round.joins {
            let max_wait = micros(j.deadline.saturating_duration_since(now));
            inv.arg(j.id).arg(format!(
                "{}{} {} {max_wait} {}",
                u8::from(j.rejoin),
                j.class,
                j.step,
                j.client
            ));
        }
        // A grant that sat in the list longer than the margin (the instance was stopped)
        // would start after its slot's windows moved on.
        Stepped::parse(self.link.call(inv).await?, self.link.margin)
    }

    /// Writes this instance's starts within the longest window back into a lost log.
    pub(super) async fn reseed(&self) -> RedisResult<()> {
        let k = &self.keys;
        let mut inv = self.link.scripts.fleet_reseed.key(&k.log);
        inv.key(&k.hold)
            .key(&k.reseeded)
            .arg(&self.link.instance)
            .arg(self.longest());
        let now = Instant::now();
        let longest = Duration::from_micros(self.longest() as u64);
        for (slot, id) in lock(&self.own).iter() {
            if *slot + longest > now {
                inv.arg(micros_between(now, *slot)).arg(*id);
            }
        }
        self.link.call::<i64>(inv).await.map(|_| ())
    }

    /// The longest gap between starts the windows allow for good.
    pub(super) fn spacing(&self) -> Duration {
        lock(&self.spans)
            .iter()
            .map(|s| Duration::from_micros(s.length) / s.limit.max(1) as u32)
            .max()
            .unwrap_or_default()
    }

    /// What each client got of the slots granted from the line over the last minute, in
    /// turns (slots / weight).
    pub(super) async fn shares_now(&self) -> Option<Vec<(String, f64)>> {
        let mut inv = self.link.scripts.fleet_shares.key(&self.keys.tags);
        inv.arg(&self.keys.shares);
        let flat: Vec<String> = self.link.call(inv).await.ok()?;
        Some(
            flat.chunks(2)
                .filter_map(|kv| {
                    let turns: f64 = kv.get(1)?.parse().ok()?;
                    Some((kv[0].clone(), turns / crate::limiter::fleet::TURN as f64))
                })
                .collect(),
        )
    }
}
