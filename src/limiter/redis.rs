//! The shared backend: one log and one fair line per account in Redis for every instance
//! with the same `redis.key`, Lua scripts (one round trip each, Redis `TIME`).
//!
//! An account's keys are `{<key>:<account>}:log` (sorted set: member = waiter id, score =
//! start in µs), `{<key>:<account>}:pause`, `{<key>:<account>}:limit` (the per-minute
//! limit adopted from SmartLead) and the fleet line's (docs/fleet-queue.md), so a Redis
//! Cluster keeps each account in one hash slot and spreads the accounts. Each account has
//! a driver task ([`drive`]) that runs its steps (`lua/fleet_step.lua`). A pause is
//! announced on `{<key>:<account>}:moved`, so every instance re-checks its waiters.
//!
//! [`RedisLink`] is what the accounts share: one connection, one pattern subscription for
//! every account's announcements, one heartbeat (`{<key>}:instances`) and one health state.
//! When Redis cannot be reached (`redis.on_error = "local"`), each account serves from a
//! local log holding its share of its quota (÷ live instances, seeded with its own recent
//! starts) and merges that log back into Redis when it returns.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{Either, FutureExt};
use redis::Script;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::fleet::{Decision, FleetLine, Round};
use super::local::{LocalBackend, micros};
use super::log::Span;
use super::{Answer, Backend, CapCheck, Limited, Refusal, Status};
use crate::config::{OnRedisError, Settings};

/// Longest any single Redis call may take before the instance falls back.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a degraded instance probes for Redis. A healthy one renews its lease three
/// times per `redis.lease`.
const PROBE: Duration = Duration::from_millis(250);

/// Put in front of every script: it prints a Lua number as an exact integer, reads
/// Redis `TIME` and the windows (lua/prelude.lua).
const LUA_PRELUDE: &str = include_str!("lua/prelude.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{LUA_PRELUDE}{body}"))
}

struct Scripts {
    fleet_step: Script,
    fleet_leave: Script,
    fleet_reseed: Script,
    fleet_shares: Script,
    client_cap: Script,
    fleet: Script,
    reserve_many: Script,
    waits_of: Script,
    cancel: Script,
    pause: Script,
    set_limit: Script,
    used: Script,
    merge: Script,
    heartbeat: Script,
}

type RedisResult<T> = Result<T, String>;

/// What every account's log shares: the connection, the subscription, the heartbeat and
/// whether Redis can be reached.
pub struct RedisLink {
    conn: super::redis_conn::Connector,
    scripts: Scripts,
    base: String,
    instance: String,
    /// Where this instance runs, as the fleet view shows it.
    host: String,
    /// Unix seconds.
    started: u64,
    /// `redis.lease`: renewed three times per lease; unrenewed for one, the instance is gone.
    lease: Duration,
    /// `limit.margin`: the most a granted slot may start late.
    margin: Duration,
    /// Each account's line here, by the account's name, for what this instance tells the
    /// fleet (how many wait, and for which clients).
    lines: Mutex<Vec<(String, Weak<super::Limiter>)>>,
    on_error: OnRedisError,
    healthy: AtomicBool,
    /// Instances sharing the quota, as the last heartbeat counted them.
    live: AtomicUsize,
    /// The last three heartbeats' counts (one lease): after a lost log, how many must
    /// write back their starts (a heartbeat on an emptied Redis counts only itself).
    lately_live: Mutex<VecDeque<usize>>,
    detail: Mutex<Option<String>>,
    /// Every account's log, by the channel its pauses are announced on.
    logs: Mutex<HashMap<String, Weak<RedisBackend>>>,
    /// Moves each time another instance announces a coalesced answer or a freed cache
    /// lock (`c:` on an account's `:moved`), for the cache's followers.
    cache_news: watch::Sender<u64>,
    /// Changes (closes) when the link is dropped: its tasks and the accounts' drivers stop.
    stop: watch::Receiver<()>,
    /// Dropped with the link, which stops its background tasks.
    _stop: watch::Sender<()>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("key", &self.base)
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisLink {
    pub fn start(settings: &Settings) -> Result<Arc<Self>, String> {
        let conn = super::redis_conn::Connector::new(&settings.redis, OP_TIMEOUT)?;
        let (stop, stop_rx) = watch::channel(());
        let link = Arc::new(Self {
            conn,
            scripts: Scripts {
                fleet_step: script(include_str!("lua/fleet_step.lua")),
                fleet_leave: script(include_str!("lua/fleet_leave.lua")),
                fleet_reseed: script(include_str!("lua/fleet_reseed.lua")),
                fleet_shares: script(include_str!("lua/fleet_shares.lua")),
                reserve_many: script(include_str!("lua/reserve_many.lua")),
                waits_of: script(include_str!("lua/waits_of.lua")),
                cancel: script(include_str!("lua/cancel.lua")),
                pause: script(include_str!("lua/pause.lua")),
                set_limit: script(include_str!("lua/set_limit.lua")),
                used: script(include_str!("lua/used.lua")),
                merge: script(include_str!("lua/merge.lua")),
                heartbeat: script(include_str!("lua/heartbeat.lua")),
                client_cap: script(include_str!("lua/client_cap.lua")),
                fleet: script(include_str!("lua/fleet.lua")),
            },
            base: settings.redis.key.clone(),
            instance: format!("{:016x}", rand::random::<u64>()),
            host: host_name(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            lease: settings.redis.lease,
            margin: settings.limit.margin.max(Duration::from_millis(50)),
            lines: Mutex::new(Vec::new()),
            stop: stop_rx.clone(),
            on_error: settings.redis.on_error,
            healthy: AtomicBool::new(true),
            live: AtomicUsize::new(1),
            lately_live: Mutex::new(VecDeque::new()),
            detail: Mutex::new(None),
            logs: Mutex::new(HashMap::new()),
            cache_news: watch::channel(0).0,
            _stop: stop,
        });
        tokio::spawn(maintain(Arc::downgrade(&link), stop_rx.clone()));
        tokio::spawn(listen(Arc::downgrade(&link), stop_rx));
        Ok(link)
    }

    /// `account`'s log, with its windows; the followed window is `follow`.
    pub fn log_for(
        self: &Arc<Self>,
        account: &str,
        spans: Vec<Span>,
        follow: usize,
    ) -> Arc<RedisBackend> {
        let prefix = format!("{{{}:{account}}}", self.base);
        let backend = Arc::new_cyclic(|me| RedisBackend {
            me: me.clone(),
            batch: Mutex::new(Batch::default()),
            link: self.clone(),
            keys: Keys {
                log: format!("{prefix}:log"),
                pause: format!("{prefix}:pause"),
                limit: format!("{prefix}:limit"),
                channel: format!("{prefix}:moved"),
                lines: [1, 2, 3].map(|c| format!("{prefix}:line:{c}")),
                promoted: format!("{prefix}:promoted"),
                waiters: format!("{prefix}:waiters"),
                tags: format!("{prefix}:tags"),
                leases: format!("{prefix}:leases"),
                epoch: format!("{prefix}:epoch"),
                hold: format!("{prefix}:hold"),
                reseeded: format!("{prefix}:reseeded"),
                busy: format!("{prefix}:busy"),
                granted: format!("{prefix}:granted:"),
                shares: format!("{prefix}:shares:"),
            },
            fleet: FleetLine::default(),
            epoch: Mutex::new(String::new()),
            fleet_used: Mutex::new(None),
            next_step: Mutex::new(None),
            steps_in_flight: AtomicUsize::new(0),
            windows: Mutex::new(script_windows(&spans)),
            spans: Mutex::new(spans),
            follow: AtomicUsize::new(follow),
            fallback: Mutex::new(None),
            own: Mutex::new(VecDeque::new()),
            moved: watch::channel(0).0,
        });
        lock(&self.logs).insert(backend.keys.channel.clone(), Arc::downgrade(&backend));
        tokio::spawn(drive(
            Arc::downgrade(&backend),
            backend.fleet.kick.clone(),
            self.stop.clone(),
        ));
        backend
    }

    fn logs(&self) -> Vec<Arc<RedisBackend>> {
        let mut logs = lock(&self.logs);
        logs.retain(|_, b| b.strong_count() > 0);
        logs.values().filter_map(Weak::upgrade).collect()
    }

    /// The prefix of every Redis key of the account stored as `id`: its hash slot.
    pub fn account_prefix(&self, id: &str) -> String {
        format!("{{{}:{id}}}", self.base)
    }

    /// This instance's id in the fleet.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `redis.lease`.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether Redis answers (as the limiter last found).
    pub fn healthy(&self) -> bool {
        self.is_healthy()
    }

    /// Moves when another instance ends a coalesced call ([`RedisLink::cache_news`]).
    pub fn cache_news(&self) -> watch::Receiver<u64> {
        self.cache_news.subscribe()
    }

    /// Runs a script on the link's connection, within the usual timeout.
    pub async fn call<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let called = async {
            let mut conn = self.conn.conn().await?;
            inv.invoke_async(&mut conn).await
        };
        let result = match tokio::time::timeout(OP_TIMEOUT, called).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}ms", OP_TIMEOUT.as_millis())),
        };
        if result.is_err() {
            crate::metrics::redis_error();
            self.conn.failed();
        }
        result
    }

    /// The most instances the last lease's heartbeats counted.
    fn lately_live(&self) -> usize {
        let lately = lock(&self.lately_live).iter().copied().max();
        lately
            .unwrap_or(1)
            .max(self.live.load(Ordering::Relaxed))
            .max(1)
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Every account falls back to its local share (or rejects), once per outage.
    fn degrade(&self, reason: String) {
        if !self.healthy.swap(false, Ordering::AcqRel) {
            return;
        }
        crate::metrics::limiter_degraded(true);
        let live = self.live.load(Ordering::Relaxed).max(1);
        match self.on_error {
            OnRedisError::Local => {
                tracing::warn!(%reason, live, "Redis unreachable: limiting locally to this instance's share of each account's quota");
            }
            OnRedisError::Reject => {
                tracing::error!(%reason, "Redis unreachable: rejecting requests (redis.on_error = \"reject\")");
            }
        }
        *lock(&self.detail) = Some(reason);
        for log in self.logs() {
            log.fleet.fail_all();
            log.moved.send_modify(|v| *v += 1);
        }
    }

    /// Back on the shared logs, after each account told its log about the starts it made
    /// meanwhile.
    async fn recover(&self) -> RedisResult<()> {
        for log in self.logs() {
            log.merge_fallback().await?;
        }
        *lock(&self.detail) = None;
        self.healthy.store(true, Ordering::Release);
        crate::metrics::limiter_degraded(false);
        for log in self.logs() {
            log.moved.send_modify(|v| *v += 1);
            // Waiters registered before the outage leave the fleet's line.
            log.fleet.kick.notify_one();
        }
        tracing::info!("Redis reachable again: back on the shared quota");
        Ok(())
    }

    /// Counts the waiters of `account`'s line among this instance's, in what it tells
    /// the fleet.
    pub fn counts_waiting(&self, account: &str, line: &Arc<super::Limiter>) {
        let mut all = lock(&self.lines);
        all.retain(|(_, l)| l.strong_count() > 0);
        all.push((account.to_owned(), Arc::downgrade(line)));
    }

    /// Requests waiting here, and per account the clients they are for (the busiest
    /// [`FLEET_CLIENTS`]), as JSON.
    fn waiting_here(&self) -> (usize, String) {
        let lines: Vec<(String, Arc<super::Limiter>)> = lock(&self.lines)
            .iter()
            .filter_map(|(a, l)| Some((a.clone(), l.upgrade()?)))
            .collect();
        let total = lines.iter().map(|(_, l)| l.queued()).sum();
        let mut clients = serde_json::Map::new();
        for (account, line) in &lines {
            let waiting = line.waiting_clients(FLEET_CLIENTS);
            if !waiting.is_empty() {
                let each = waiting.into_iter().map(|(c, n)| (c, n.into())).collect();
                clients.insert(account.clone(), serde_json::Value::Object(each));
            }
        }
        (total, serde_json::Value::Object(clients).to_string())
    }

    /// Renews this instance's lease and what it tells the fleet about itself.
    async fn heartbeat(&self) -> RedisResult<usize> {
        let (waiting, clients) = self.waiting_here();
        let mut inv = self.scripts.heartbeat.key(self.fleet_key());
        inv.arg(&self.instance)
            .arg(micros(self.lease))
            .arg(self.instance_prefix())
            .arg("host")
            .arg(&self.host)
            .arg("waiting")
            .arg(waiting)
            .arg("clients")
            .arg(clients)
            .arg("started")
            .arg(self.started);
        let (live, reclaimed): (usize, u64) = self.call(inv).await?;
        self.live.store(live.max(1), Ordering::Relaxed);
        let mut lately = lock(&self.lately_live);
        if lately.len() == 3 {
            lately.pop_front();
        }
        lately.push_back(live);
        crate::metrics::lease_renewed(reclaimed);
        Ok(live)
    }

    fn fleet_key(&self) -> String {
        format!("{{{}}}:instances", self.base)
    }

    fn instance_prefix(&self) -> String {
        format!("{{{}}}:instance:", self.base)
    }

    /// Every instance with a live lease, this one included (`None`: Redis did not answer).
    pub async fn fleet(&self) -> Option<Vec<Instance>> {
        let mut inv = self.scripts.fleet.key(self.fleet_key());
        inv.arg(micros(self.lease)).arg(self.instance_prefix());
        let flat: Vec<String> = self.call(inv).await.ok()?;
        let mut out = Vec::new();
        let mut rest = flat.as_slice();
        while let Some((len, tail)) = rest.split_first() {
            let len: usize = len.parse().ok()?;
            let (part, tail) = tail.split_at_checked(len)?;
            rest = tail;
            let field = |name: &str| {
                part[2..]
                    .chunks(2)
                    .find(|kv| kv[0] == name)
                    .and_then(|kv| kv.get(1))
                    .cloned()
            };
            out.push(Instance {
                this: part[0] == self.instance,
                id: part[0].clone(),
                lease_age_seconds: part[1].parse::<f64>().unwrap_or(0.0) / 1e6,
                host: field("host").unwrap_or_default(),
                waiting: field("waiting").and_then(|w| w.parse().ok()).unwrap_or(0),
                clients: field("clients")
                    .and_then(|c| serde_json::from_str(&c).ok())
                    .unwrap_or_default(),
                started: field("started").and_then(|w| w.parse().ok()).unwrap_or(0),
            });
        }
        out.sort_by(|a, b| (a.host.as_str(), a.id.as_str()).cmp(&(b.host.as_str(), b.id.as_str())));
        Some(out)
    }

    fn status(&self) -> Status {
        let state = match (self.is_healthy(), self.on_error) {
            (true, _) => "shared",
            (false, OnRedisError::Local) => "fallback",
            (false, OnRedisError::Reject) => "unavailable",
        };
        Status {
            backend: "redis",
            state,
            detail: lock(&self.detail).clone(),
        }
    }
}

/// The clients per account an instance tells the fleet about.
const FLEET_CLIENTS: usize = 50;

/// One instance of the fleet, as its lease says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Instance {
    pub id: String,
    pub host: String,
    /// Requests waiting there, at its last renewal.
    pub waiting: usize,
    /// By account, the clients those requests are for (its busiest ones).
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>>,
    /// Since its last renewal.
    pub lease_age_seconds: f64,
    /// Unix seconds.
    pub started: u64,
    /// The instance answering.
    pub this: bool,
}

/// This host's name, for the fleet view: `HOSTNAME` (set in containers), else the
/// kernel's, else `unknown`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

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

/// Most waiters a step walks to check their deadlines; the ones after them get their 429
/// at their deadline.
const MOST_WALKED: usize = 1000;

/// What a step of the fleet line answered.
enum Stepped {
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
    fn parse(out: Vec<String>, late: Duration) -> RedisResult<Self> {
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
    fn start_rounds(&self) -> Option<Instant> {
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
    async fn fleet_round(&self) -> Option<Duration> {
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
    fn settle(&self, round: &Round, started: &[bool], decisions: Vec<Decision>) {
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
    async fn leave_all(&self, round: &Round) -> RedisResult<()> {
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
    async fn step(&self, round: &Round) -> RedisResult<Stepped> {
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
            .arg(super::fair::FLOOR)
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
    async fn reseed(&self) -> RedisResult<()> {
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
    fn spacing(&self) -> Duration {
        lock(&self.spans)
            .iter()
            .map(|s| Duration::from_micros(s.length) / s.limit.max(1) as u32)
            .max()
            .unwrap_or_default()
    }

    /// What each client got of the slots granted from the line over the last minute, in
    /// turns (slots / weight).
    async fn shares_now(&self) -> Option<Vec<(String, f64)>> {
        let mut inv = self.link.scripts.fleet_shares.key(&self.keys.tags);
        inv.arg(&self.keys.shares);
        let flat: Vec<String> = self.link.call(inv).await.ok()?;
        Some(
            flat.chunks(2)
                .filter_map(|kv| {
                    let turns: f64 = kv.get(1)?.parse().ok()?;
                    Some((kv[0].clone(), turns / super::fleet::TURN as f64))
                })
                .collect(),
        )
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

/// A receiver that changes when either input does.
fn merge_moves(mut a: watch::Receiver<u64>, mut b: watch::Receiver<u64>) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = a.changed() => if r.is_err() { return },
                r = b.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
            tx.send_modify(|v| *v += 1);
        }
    });
    rx
}

/// Heartbeats while healthy; probes and rejoins while degraded.
async fn maintain(link: Weak<RedisLink>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(l) = link.upgrade() else { return };
        let healthy = l.is_healthy();
        match l.heartbeat().await {
            Ok(_) if !healthy => {
                if let Err(e) = l.recover().await {
                    tracing::debug!(error = %e, "rejoining the shared quota failed; will retry");
                }
            }
            Ok(_) => {}
            Err(e) => l.degrade(e),
        }
        let pause = if l.is_healthy() { l.lease / 3 } else { PROBE };
        drop(l);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// `*`, `?`, `[` and `\` are special in a subscription pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The first of `candidates` that takes a subscription to `pattern`.
async fn subscribe(candidates: Vec<redis::Client>, pattern: &str) -> Option<redis::aio::PubSub> {
    for client in candidates {
        let connected = tokio::time::timeout(OP_TIMEOUT, client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = connected
            && pubsub.psubscribe(pattern).await.is_ok()
        {
            return Some(pubsub);
        }
    }
    None
}

/// Follows pause announcements from other instances, for every account.
async fn listen(link: Weak<RedisLink>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(l) = link.upgrade() else { return };
        let pattern = format!("{{{}:*}}:moved", glob_escape(&l.base));
        let candidates = tokio::time::timeout(OP_TIMEOUT, l.conn.subscribe_to())
            .await
            .unwrap_or_default();
        drop(l);
        if let Some(mut pubsub) = subscribe(candidates, &pattern).await {
            // Anything may have moved while we were not listening.
            match link.upgrade() {
                Some(l) => {
                    for log in l.logs() {
                        log.moved.send_modify(|v| *v += 1);
                    }
                }
                None => return,
            }
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    msg = messages.next() => {
                        let Some(msg) = msg else { break };
                        let Some(l) = link.upgrade() else { return };
                        let log = lock(&l.logs).get(msg.get_channel_name()).and_then(Weak::upgrade);
                        let payload: String = msg.get_payload().unwrap_or_default();
                        if payload.starts_with("c:") {
                            l.cache_news.send_modify(|n| *n += 1);
                            continue;
                        }
                        match (log, payload.strip_prefix("g:")) {
                            // Decisions for this instance's waiters are in its list.
                            (Some(log), Some(to)) if to == l.instance => log.fleet.kick.notify_one(),
                            (_, Some(_)) | (None, _) => {}
                            (Some(log), None) => {
                                log.moved.send_modify(|v| *v += 1);
                                log.fleet.walk_soon();
                            }
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE) => {}
            _ = stop.changed() => return,
        }
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
