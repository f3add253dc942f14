//! The shared backend: one reservation log in Redis for every instance with the same
//! `redis.key`, one Lua script (one round trip, Redis `TIME`) per decision.
//!
//! Keys are `{<key>}:log` (sorted set: member = reservation id, score = slot in µs),
//! `{<key>}:pause` and `{<key>}:instances`, so a Redis Cluster keeps them in one slot; a
//! pause is announced on the `{<key>}:moved` channel so waiters everywhere re-read their
//! slots. When Redis cannot be reached (`redis.on_error = "local"`), the instance serves
//! from a local log holding its share of the quota (quota ÷ live instances, seeded with
//! its own recent starts) and merges that log back into Redis when it returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::{Either, FutureExt};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio::time::Instant;

use super::local::{LocalBackend, micros};
use super::{Answer, Backend, Limited, Refusal, Status};
use crate::config::{OnRedisError, Settings};

/// Longest any single Redis call may take before the instance falls back.
const OP_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an instance announces itself (and, when degraded, probes for Redis).
const HEARTBEAT: Duration = Duration::from_secs(1);
const PROBE: Duration = Duration::from_millis(250);
/// An instance not heard from for this long no longer counts as live.
const INSTANCE_TTL: Duration = Duration::from_secs(5);

/// Prints a Lua number as an exact integer (the default `%.14g` would round µs times).
const LUA_PRELUDE: &str = r#"
local function s(x) return string.format('%.0f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"#;

const RESERVE: &str = r#"
local limit = tonumber(ARGV[2])
local adopted = tonumber(redis.call('GET', KEYS[3]) or ARGV[2])
if adopted < limit then limit = adopted end
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s(now - window))
local slot = now
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > slot then slot = paused end
local n = redis.call('ZCARD', KEYS[1])
if n > 0 then
  local last = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
  if last > slot then slot = last end
  if n >= limit then
    local edge = tonumber(redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')[2]) + window
    if edge > slot then slot = edge end
  end
end
if slot > now + tonumber(ARGV[4]) then return {0, s(slot - now)} end
redis.call('ZADD', KEYS[1], s(slot), ARGV[1])
redis.call('PEXPIRE', KEYS[1], s(math.ceil((slot - now + window) / 1000) + 1000))
return {1, s(slot - now)}
"#;

/// A new limit for everyone: stored for the reserve script, and slots not yet started
/// spaced out again under it.
const SET_LIMIT: &str = r#"
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', 86400)
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local ids, slots = {}, {}
for i = 1, #all, 2 do
  ids[#ids + 1] = all[i]
  slots[#slots + 1] = tonumber(all[i + 1])
end
local moved = 0
for i = limit + 1, #slots do
  if slots[i] > now then
    local want = slots[i - limit] + window
    if slots[i - 1] > want then want = slots[i - 1] end
    if want > slots[i] then
      slots[i] = want
      redis.call('ZADD', KEYS[1], s(want), ids[i])
      moved = 1
    end
  end
end
if moved == 1 then redis.call('PUBLISH', ARGV[3], 'moved') end
return moved
"#;

const WAIT_OF: &str = r#"
local slot = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not slot then return '-1' end
local w = tonumber(slot) - now
if w < 0 then w = 0 end
return s(w)
"#;

const CANCEL: &str = r#"
local slot = redis.call('ZSCORE', KEYS[1], ARGV[1])
if slot and tonumber(slot) > now then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"#;

const PAUSE: &str = r#"
local target = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if target > cur then
  redis.call('SET', KEYS[2], s(target), 'PX', s(math.ceil(tonumber(ARGV[1]) / 1000) + 1000))
  cur = target
end
local waiting = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. s(now), '+inf', 'WITHSCORES')
if #waiting > 0 and cur > tonumber(waiting[2]) then
  local delta = cur - tonumber(waiting[2])
  for i = 1, #waiting, 2 do
    redis.call('ZADD', KEYS[1], s(tonumber(waiting[i + 1]) + delta), waiting[i])
  end
  redis.call('PEXPIRE', KEYS[1], s(math.ceil((cur - now) / 1000) + 120000))
end
redis.call('PUBLISH', ARGV[2], 'moved')
return 1
"#;

const MERGE: &str = r#"
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], s(now + tonumber(ARGV[i])), ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], s(math.ceil(tonumber(ARGV[1]) / 1000) + 120000))
return 1
"#;

const HEARTBEAT_SCRIPT: &str = r#"
redis.call('ZADD', KEYS[1], s(now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s(now - tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], s(math.ceil(tonumber(ARGV[2]) / 1000) * 2))
return redis.call('ZCARD', KEYS[1])
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{LUA_PRELUDE}{body}"))
}

struct Scripts {
    reserve: Script,
    wait_of: Script,
    cancel: Script,
    pause: Script,
    set_limit: Script,
    merge: Script,
    heartbeat: Script,
}

struct Keys {
    log: String,
    pause: String,
    /// The limit adopted from SmartLead's headers (`limit.follow_upstream`).
    limit: String,
    instances: String,
    channel: String,
}

pub struct RedisBackend {
    client: redis::Client,
    conn: ConnectionManager,
    scripts: Scripts,
    keys: Keys,
    instance: String,
    /// The limit in force (`limit.requests`, or SmartLead's smaller one when followed).
    limit: AtomicUsize,
    window: Duration,
    on_error: OnRedisError,
    healthy: AtomicBool,
    live: AtomicUsize,
    /// Serving share while Redis is unreachable.
    fallback: Mutex<Option<Arc<LocalBackend>>>,
    /// This instance's recent shared starts, to seed a fallback.
    own: Mutex<VecDeque<(Instant, u64)>>,
    detail: Mutex<Option<String>>,
    moved: watch::Sender<u64>,
    /// Dropped with the backend, which stops its background tasks.
    _stop: watch::Sender<()>,
}

type RedisResult<T> = Result<T, String>;

impl RedisBackend {
    pub fn start(settings: &Settings) -> Result<Arc<dyn Backend>, String> {
        let client = redis::Client::open(settings.redis.url.expose_secret())
            .map_err(|e| format!("redis.url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(PROBE);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("redis: {e}"))?;
        let base = &settings.redis.key;
        let (stop, stop_rx) = watch::channel(());
        let backend = Arc::new(Self {
            client,
            conn,
            scripts: Scripts {
                reserve: script(RESERVE),
                wait_of: script(WAIT_OF),
                cancel: script(CANCEL),
                pause: script(PAUSE),
                set_limit: script(SET_LIMIT),
                merge: script(MERGE),
                heartbeat: script(HEARTBEAT_SCRIPT),
            },
            keys: Keys {
                log: format!("{{{base}}}:log"),
                pause: format!("{{{base}}}:pause"),
                limit: format!("{{{base}}}:limit"),
                instances: format!("{{{base}}}:instances"),
                channel: format!("{{{base}}}:moved"),
            },
            instance: format!("{:016x}", rand::random::<u64>()),
            limit: AtomicUsize::new(settings.limit.requests as usize),
            window: settings.limit.period + settings.limit.margin,
            on_error: settings.redis.on_error,
            healthy: AtomicBool::new(true),
            live: AtomicUsize::new(1),
            fallback: Mutex::new(None),
            own: Mutex::new(VecDeque::new()),
            detail: Mutex::new(None),
            moved: watch::channel(0).0,
            _stop: stop,
        });
        tokio::spawn(maintain(Arc::downgrade(&backend), stop_rx.clone()));
        tokio::spawn(listen(Arc::downgrade(&backend), stop_rx));
        Ok(backend)
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        let mut conn = self.conn.clone();
        let result = match tokio::time::timeout(OP_TIMEOUT, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}ms", OP_TIMEOUT.as_millis())),
        };
        if result.is_err() {
            crate::metrics::redis_error();
        }
        result
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn fallback(&self) -> Option<Arc<LocalBackend>> {
        lock(&self.fallback).clone()
    }

    /// Switches to the local share, once per outage.
    fn degrade(&self, reason: String) {
        if !self.healthy.swap(false, Ordering::AcqRel) {
            return;
        }
        crate::metrics::limiter_degraded(true);
        let live = self.live.load(Ordering::Relaxed).max(1);
        let share = (self.limit.load(Ordering::Relaxed) / live).max(1);
        match self.on_error {
            OnRedisError::Local => {
                let fb = LocalBackend::with_limit(share, self.window, "fallback");
                let now = Instant::now();
                for (slot, id) in lock(&self.own).iter() {
                    let offset = micros_between(now, *slot);
                    fb.record(offset, *id);
                }
                *lock(&self.fallback) = Some(Arc::new(fb));
                tracing::warn!(%reason, share, live, "Redis unreachable: limiting locally to this instance's share of the quota");
            }
            OnRedisError::Reject => {
                tracing::error!(%reason, "Redis unreachable: rejecting requests (redis.on_error = \"reject\")");
            }
        }
        *lock(&self.detail) = Some(reason);
    }

    /// Rejoins the shared log, first telling it about the starts made meanwhile.
    async fn recover(&self) -> RedisResult<()> {
        if let Some(fb) = self.fallback() {
            let recent = fb.recent();
            if !recent.is_empty() {
                let mut inv = self.scripts.merge.key(&self.keys.log);
                inv.arg(micros(self.window));
                for (offset, id) in recent {
                    inv.arg(offset).arg(id.to_string());
                }
                self.call::<i64>(inv).await?;
            }
        }
        *lock(&self.fallback) = None;
        *lock(&self.detail) = None;
        self.healthy.store(true, Ordering::Release);
        crate::metrics::limiter_degraded(false);
        self.moved.send_modify(|v| *v += 1);
        tracing::info!("Redis reachable again: back on the shared quota");
        Ok(())
    }

    async fn heartbeat(&self) -> RedisResult<usize> {
        let mut inv = self.scripts.heartbeat.key(&self.keys.instances);
        inv.arg(&self.instance).arg(micros(INSTANCE_TTL));
        let live: usize = self.call(inv).await?;
        self.live.store(live.max(1), Ordering::Relaxed);
        Ok(live)
    }

    fn remember_own(&self, id: u64, wait: Duration) {
        let now = Instant::now();
        let mut own = lock(&self.own);
        while own.front().is_some_and(|(s, _)| *s + self.window <= now) {
            own.pop_front();
        }
        own.push_back((now + wait, id));
    }

    fn reserve_degraded(&self, id: u64, max_wait: Duration) -> Result<Duration, Refusal> {
        match self.fallback() {
            Some(fb) => fb.reserve_now(id, max_wait),
            None => Err(Refusal::Unavailable(format!(
                "the shared rate limiter (Redis) is unreachable: {}",
                lock(&self.detail).clone().unwrap_or_default()
            ))),
        }
    }

    async fn reserve_shared(&self, id: u64, max_wait: Duration) -> Result<Duration, Refusal> {
        let mut inv = self.scripts.reserve.key(&self.keys.log);
        inv.key(&self.keys.pause)
            .key(&self.keys.limit)
            .arg(id.to_string())
            .arg(self.limit.load(Ordering::Relaxed))
            .arg(micros(self.window))
            .arg(micros(max_wait));
        match self.call::<(i64, i64)>(inv).await {
            Ok((1, wait)) => {
                let wait = Duration::from_micros(wait.max(0) as u64);
                self.remember_own(id, wait);
                Ok(wait)
            }
            Ok((_, wait)) => Err(Refusal::RateLimited {
                retry_after: Duration::from_micros(wait.max(0) as u64),
                why: Limited::PastDeadline,
            }),
            Err(e) => {
                self.degrade(e);
                self.reserve_degraded(id, max_wait)
            }
        }
    }
}

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
    fn reserve(&self, id: u64, max_wait: Duration) -> Answer<'_, Result<Duration, Refusal>> {
        Either::Right(
            async move {
                if self.is_healthy() {
                    self.reserve_shared(id, max_wait).await
                } else {
                    self.reserve_degraded(id, max_wait)
                }
            }
            .boxed(),
        )
    }

    fn wait_of(&self, id: u64) -> Answer<'_, Option<Duration>> {
        Either::Right(
            async move {
                if let Some(w) = self.fallback().and_then(|fb| fb.wait_now(id)) {
                    return Some(w);
                }
                let mut inv = self.scripts.wait_of.key(&self.keys.log);
                inv.arg(id.to_string());
                match self.call::<i64>(inv).await {
                    Ok(w) if w >= 0 => Some(Duration::from_micros(w as u64)),
                    _ => None,
                }
            }
            .boxed(),
        )
    }

    fn cancel(&self, id: u64) -> Answer<'_, ()> {
        Either::Right(
            async move {
                if let Some(fb) = self.fallback() {
                    fb.cancel_now(id);
                }
                if self.is_healthy() {
                    let mut inv = self.scripts.cancel.key(&self.keys.log);
                    inv.arg(id.to_string());
                    let _ = self.call::<i64>(inv).await;
                }
            }
            .boxed(),
        )
    }

    fn pause(&self, pause: Duration) -> Answer<'_, ()> {
        Either::Right(
            async move {
                if let Some(fb) = self.fallback() {
                    fb.pause_now(pause);
                }
                if self.is_healthy() {
                    let mut inv = self.scripts.pause.key(&self.keys.log);
                    inv.key(&self.keys.pause)
                        .arg(micros(pause))
                        .arg(&self.keys.channel);
                    if let Err(e) = self.call::<i64>(inv).await {
                        self.degrade(e);
                        if let Some(fb) = self.fallback() {
                            fb.pause_now(pause);
                        }
                    }
                }
            }
            .boxed(),
        )
    }

    fn set_limit(&self, limit: usize) -> Answer<'_, ()> {
        Either::Right(
            async move {
                self.limit.store(limit, Ordering::Relaxed);
                if let Some(fb) = self.fallback() {
                    let live = self.live.load(Ordering::Relaxed).max(1);
                    fb.set_limit_now((limit / live).max(1));
                }
                if self.is_healthy() {
                    // The stored limit is kept a day: longer than any window, and rewritten by
                    // whoever next sees SmartLead report a different one.
                    let mut inv = self.scripts.set_limit.key(&self.keys.log);
                    inv.key(&self.keys.limit)
                        .arg(limit)
                        .arg(micros(self.window))
                        .arg(&self.keys.channel);
                    if let Err(e) = self.call::<i64>(inv).await {
                        self.degrade(e);
                    }
                }
            }
            .boxed(),
        )
    }

    fn moved(&self) -> watch::Receiver<u64> {
        let mut rx = self.moved.subscribe();
        // A waiter in the fallback also listens to the fallback's own moves.
        if let Some(fb) = self.fallback() {
            rx = merge_moves(rx, fb.moved());
        }
        rx
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
async fn maintain(backend: Weak<RedisBackend>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        let healthy = b.is_healthy();
        match b.heartbeat().await {
            Ok(_) if !healthy => {
                if let Err(e) = b.recover().await {
                    tracing::debug!(error = %e, "rejoining the shared quota failed; will retry");
                }
            }
            Ok(_) => {}
            Err(e) => b.degrade(e),
        }
        let pause = if b.is_healthy() { HEARTBEAT } else { PROBE };
        drop(b);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Follows pause announcements from other instances.
async fn listen(backend: Weak<RedisBackend>, mut stop: watch::Receiver<()>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        let (client, channel) = (b.client.clone(), b.keys.channel.clone());
        drop(b);
        let connected = tokio::time::timeout(OP_TIMEOUT, client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = connected
            && pubsub.subscribe(&channel).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            loop {
                // Anything may have moved while we were not listening.
                match backend.upgrade() {
                    Some(b) => b.moved.send_modify(|v| *v += 1),
                    None => return,
                }
                tokio::select! {
                    msg = messages.next() => if msg.is_none() { break },
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
