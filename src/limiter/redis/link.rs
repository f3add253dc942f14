//! [`RedisLink`]: what every account of an instance shares on Redis: the connection, the
//! scripts, one pattern subscription for every account's announcements, one heartbeat
//! (the instance's lease in `{<key>}:instances`) and one health state.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use tokio::sync::watch;

use crate::config::{OnRedisError, Settings};
use crate::limiter::Status;
use crate::limiter::fleet::FleetLine;
use crate::limiter::local::micros;
use crate::limiter::log::Span;

use super::*;

/// Longest any single Redis call may take before the instance falls back.
pub(super) const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a degraded instance probes for Redis. A healthy one renews its lease three
/// times per `redis.lease`.
pub(super) const PROBE: Duration = Duration::from_millis(250);

/// Put in front of every script: it prints a Lua number as an exact integer, reads
/// Redis `TIME` and the windows (lua/prelude.lua).
pub(super) const LUA_PRELUDE: &str = include_str!("../lua/prelude.lua");

pub(super) fn script(body: &str) -> Script {
    Script::new(&format!("{LUA_PRELUDE}{body}"))
}

pub(super) struct Scripts {
    pub(super) fleet_step: Script,
    pub(super) fleet_leave: Script,
    pub(super) fleet_reseed: Script,
    pub(super) fleet_shares: Script,
    pub(super) client_cap: Script,
    pub(super) fleet: Script,
    pub(super) reserve_many: Script,
    pub(super) waits_of: Script,
    pub(super) cancel: Script,
    pub(super) pause: Script,
    pub(super) set_limit: Script,
    pub(super) used: Script,
    pub(super) merge: Script,
    pub(super) heartbeat: Script,
}

pub(super) type RedisResult<T> = Result<T, String>;

/// What every account's log shares: the connection, the subscription, the heartbeat and
/// whether Redis can be reached.
pub struct RedisLink {
    pub(super) conn: crate::limiter::redis_conn::Connector,
    pub(super) scripts: Scripts,
    pub(super) base: String,
    pub(super) instance: String,
    /// Where this instance runs, as the fleet view shows it.
    pub(super) host: String,
    /// Unix seconds.
    pub(super) started: u64,
    /// `redis.lease`: renewed three times per lease; unrenewed for one, the instance is gone.
    pub(super) lease: Duration,
    /// `limit.margin`: the most a granted slot may start late.
    pub(super) margin: Duration,
    /// Each account's line here, by the account's name, for what this instance tells the
    /// fleet (how many wait, and for which clients).
    pub(super) lines: Mutex<Vec<(String, Weak<crate::limiter::Limiter>)>>,
    pub(super) on_error: OnRedisError,
    pub(super) healthy: AtomicBool,
    /// Instances sharing the quota, as the last heartbeat counted them.
    pub(super) live: AtomicUsize,
    /// The last three heartbeats' counts (one lease): after a lost log, how many must
    /// write back their starts (a heartbeat on an emptied Redis counts only itself).
    pub(super) lately_live: Mutex<VecDeque<usize>>,
    pub(super) detail: Mutex<Option<String>>,
    /// Every account's log, by the channel its pauses are announced on.
    pub(super) logs: Mutex<HashMap<String, Weak<RedisBackend>>>,
    /// Moves each time another instance announces a coalesced answer or a freed cache
    /// lock (`c:` on an account's `:moved`), for the cache's followers.
    pub(super) cache_news: watch::Sender<u64>,
    /// Changes (closes) when the link is dropped: its tasks and the accounts' drivers stop.
    pub(super) stop: watch::Receiver<()>,
    /// Dropped with the link, which stops its background tasks.
    pub(super) _stop: watch::Sender<()>,
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
        let conn = crate::limiter::redis_conn::Connector::new(&settings.redis, OP_TIMEOUT)?;
        let (stop, stop_rx) = watch::channel(());
        let link = Arc::new(Self {
            conn,
            scripts: Scripts {
                fleet_step: script(include_str!("../lua/fleet_step.lua")),
                fleet_leave: script(include_str!("../lua/fleet_leave.lua")),
                fleet_reseed: script(include_str!("../lua/fleet_reseed.lua")),
                fleet_shares: script(include_str!("../lua/fleet_shares.lua")),
                reserve_many: script(include_str!("../lua/reserve_many.lua")),
                waits_of: script(include_str!("../lua/waits_of.lua")),
                cancel: script(include_str!("../lua/cancel.lua")),
                pause: script(include_str!("../lua/pause.lua")),
                set_limit: script(include_str!("../lua/set_limit.lua")),
                used: script(include_str!("../lua/used.lua")),
                merge: script(include_str!("../lua/merge.lua")),
                heartbeat: script(include_str!("../lua/heartbeat.lua")),
                client_cap: script(include_str!("../lua/client_cap.lua")),
                fleet: script(include_str!("../lua/fleet.lua")),
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

    pub(super) fn logs(&self) -> Vec<Arc<RedisBackend>> {
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
    pub(super) fn lately_live(&self) -> usize {
        let lately = lock(&self.lately_live).iter().copied().max();
        lately
            .unwrap_or(1)
            .max(self.live.load(Ordering::Relaxed))
            .max(1)
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Every account falls back to its local share (or rejects), once per outage.
    pub(super) fn degrade(&self, reason: String) {
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
    pub(super) async fn recover(&self) -> RedisResult<()> {
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
    pub fn counts_waiting(&self, account: &str, line: &Arc<crate::limiter::Limiter>) {
        let mut all = lock(&self.lines);
        all.retain(|(_, l)| l.strong_count() > 0);
        all.push((account.to_owned(), Arc::downgrade(line)));
    }

    /// Requests waiting here, and per account the clients they are for (the busiest
    /// [`FLEET_CLIENTS`]), as JSON.
    pub(super) fn waiting_here(&self) -> (usize, String) {
        let lines: Vec<(String, Arc<crate::limiter::Limiter>)> = lock(&self.lines)
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
    pub(super) async fn heartbeat(&self) -> RedisResult<usize> {
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

    pub(super) fn fleet_key(&self) -> String {
        format!("{{{}}}:instances", self.base)
    }

    pub(super) fn instance_prefix(&self) -> String {
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

    pub(super) fn status(&self) -> Status {
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
pub(super) const FLEET_CLIENTS: usize = 50;

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
pub(super) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A receiver that changes when either input does.
pub(super) fn merge_moves(
    mut a: watch::Receiver<u64>,
    mut b: watch::Receiver<u64>,
) -> watch::Receiver<u64> {
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
pub(super) async fn maintain(link: Weak<RedisLink>, mut stop: watch::Receiver<()>) {
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
pub(super) fn glob_escape(text: &str) -> String {
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
pub(super) async fn subscribe(
    candidates: Vec<redis::Client>,
    pattern: &str,
) -> Option<redis::aio::PubSub> {
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
pub(super) async fn listen(link: Weak<RedisLink>, mut stop: watch::Receiver<()>) {
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
