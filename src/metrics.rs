//! Prometheus metrics: every name in one place, the recorder installed once per process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::client::{ClientId, Priority};

// The label caches below are read on every request. foldhash hashes their short keys in
// a fraction of the time std's SipHash takes, and each cache is capped in size, so keys
// chosen to collide have nowhere to grow.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

pub const REQUESTS: &str = "smartlead_proxy_requests_total";
pub const REQUEST_DURATION: &str = "smartlead_proxy_request_duration_seconds";
pub const IN_FLIGHT: &str = "smartlead_proxy_in_flight_requests";
pub const UPSTREAM_ATTEMPTS: &str = "smartlead_proxy_upstream_attempts_total";
pub const RETRIES: &str = "smartlead_proxy_retries_total";
pub const LIMITER_WAIT: &str = "smartlead_proxy_limiter_wait_seconds";
pub const QUEUE_DEPTH: &str = "smartlead_proxy_limiter_queue_depth";
pub const QUOTA_REJECTED: &str = "smartlead_proxy_quota_rejected_total";
pub const UPSTREAM_PAUSES: &str = "smartlead_proxy_upstream_pauses_total";
pub const REDIS_ERRORS: &str = "smartlead_proxy_redis_errors_total";
pub const LIMITER_DEGRADED: &str = "smartlead_proxy_limiter_degraded";
pub const UNEXPECTED_UPSTREAM_429: &str = "smartlead_proxy_unexpected_upstream_429_total";
pub const CLIENT_WAIT: &str = "smartlead_proxy_client_wait_seconds";
pub const CONFIG_RELOADS: &str = "smartlead_proxy_config_reloads_total";
pub const LEASE_RENEWALS: &str = "smartlead_proxy_lease_renewals_total";
pub const LEASE_RECLAIMS: &str = "smartlead_proxy_lease_reclaims_total";
pub const FLEET_GRANTS: &str = "smartlead_proxy_fleet_grants_total";
pub const FLEET_REQUESTS: &str = "smartlead_proxy_fleet_requests_total";
pub const FLEET_ROUND_TRIPS: &str = "smartlead_proxy_fleet_round_trips_total";
pub const CACHE_REQUESTS: &str = "smartlead_proxy_cache_requests_total";
pub const CACHE_BYTES: &str = "smartlead_proxy_cache_bytes";
pub const CACHE_ENTRIES: &str = "smartlead_proxy_cache_entries";
pub const CACHE_EVICTIONS: &str = "smartlead_proxy_cache_evictions_total";

/// Seconds buckets from 1 ms to 2 min: quota waits are long, proxy overhead is short.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Distinct route labels kept, besides [`SMARTLEAD_ROUTES`], before new ones become
/// `other`.
const MAX_ROUTES: usize = 200;

/// SmartLead's API routes (after `/api/v1`), ids as `{id}`: always labels of their own,
/// whatever other paths clients send. A shape not here gets a label once SmartLead
/// answers it with anything but 404, while fewer than 200 such labels exist.
pub const SMARTLEAD_ROUTES: &[&str] = &[
    "/campaigns",
    "/campaigns/create",
    "/campaigns/{id}",
    "/campaigns/{id}/status",
    "/campaigns/{id}/settings",
    "/campaigns/{id}/schedule",
    "/campaigns/{id}/sequences",
    "/campaigns/{id}/email-accounts",
    "/campaigns/{id}/leads",
    "/campaigns/{id}/leads/{id}",
    "/campaigns/{id}/leads/{id}/pause",
    "/campaigns/{id}/leads/{id}/resume",
    "/campaigns/{id}/leads/{id}/unsubscribe",
    "/campaigns/{id}/leads/{id}/category",
    "/campaigns/{id}/leads/{id}/message-history",
    "/campaigns/{id}/leads-export",
    "/campaigns/{id}/analytics",
    "/campaigns/{id}/analytics-by-date",
    "/campaigns/{id}/statistics",
    "/campaigns/{id}/webhooks",
    "/campaigns/{id}/reply-email-thread",
    "/leads",
    "/leads/{id}",
    "/leads/{id}/campaigns",
    "/leads/{id}/unsubscribe",
    "/leads/fetch-categories",
    "/leads/add-domain-block-list",
    "/email-accounts",
    "/email-accounts/save",
    "/email-accounts/{id}",
    "/email-accounts/{id}/warmup",
    "/email-accounts/{id}/warmup-stats",
    "/email-accounts/reconnect-failed-email-accounts",
    "/client",
    "/client/save",
];
/// Clients with a `client` label of their own; the rest are `other`.
pub const MAX_CLIENT_LABELS: usize = 20;

/// The process-wide handle that renders `/metrics`.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Only fails if something else installed a recorder first; then we render nothing.
        let _ = metrics::set_global_recorder(recorder);
        // Histograms keep raw samples until drained: drain them even if nobody scrapes.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        handle
    })
}

/// A request's route as it arrives: a label already, or a shape to label once the answer
/// shows SmartLead knows it.
#[derive(Debug)]
pub enum Route {
    Known(&'static str),
    Unknown(String),
}

/// The route of `path`: ids become `{id}`; SmartLead's own routes, the proxy's and
/// anything outside `/api/v1` are labels at once, with no allocation.
pub fn route_of(path: &str) -> Route {
    let Some(rest) = path.strip_prefix(crate::upstream::API_PREFIX) else {
        return Route::Known(match path {
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        });
    };
    thread_local! {
        static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUF.with_borrow_mut(|label| {
        label.clear();
        label.push_str(crate::upstream::API_PREFIX);
        for seg in rest.split('/').filter(|s| !s.is_empty()).take(6) {
            label.push('/');
            let id_like = seg.len() > 24 || seg.bytes().any(|b| b.is_ascii_digit());
            label.push_str(if id_like { "{id}" } else { seg });
        }
        match known_routes().get(label.as_str()) {
            Some(known) => Route::Known(known),
            None => Route::Unknown(label.clone()),
        }
    })
}

/// The label a request is counted under, once answered: `other` when SmartLead said 404
/// (so clients cannot use up the label set with paths that do not exist).
pub fn route_label(route: &Route, upstream_not_found: bool) -> &'static str {
    match route {
        _ if upstream_not_found => "other",
        Route::Known(label) => label,
        Route::Unknown(shape) => intern(shape),
    }
}

/// [`SMARTLEAD_ROUTES`] under `/api/v1`, made once.
fn known_routes() -> &'static FastSet<&'static str> {
    static KNOWN: OnceLock<FastSet<&'static str>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        SMARTLEAD_ROUTES
            .iter()
            .map(|r| &*Box::leak(format!("{}{r}", crate::upstream::API_PREFIX).into_boxed_str()))
            .collect()
    })
}

fn intern(label: &str) -> &'static str {
    static SEEN: OnceLock<RwLock<FastSet<&'static str>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(l) = seen.read().unwrap_or_else(|e| e.into_inner()).get(label) {
        return l;
    }
    let mut seen = seen.write().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = seen.get(label) {
        return l;
    }
    if seen.len() >= MAX_ROUTES {
        return "other";
    }
    // Bounded by MAX_ROUTES, so leaking is a fixed cost, not a leak that grows.
    let l: &'static str = Box::leak(label.to_owned().into_boxed_str());
    seen.insert(l);
    l
}

/// Counter and histogram handles per (route, status, source, account), so the hot path
/// skips the registry's hashing and label allocation after the first request of a kind.
/// Each serving thread keeps its own (no lock), keyed by where the labels are: route and
/// source are static strings, and the account is held by its entry, so its address
/// names it for as long as the entry is there.
struct RequestHandles {
    count: metrics::Counter,
    duration: metrics::Histogram,
    _account: Option<Arc<str>>,
}
/// Each label string by its address and length (the linker may lay one literal at the
/// start of another).
type RequestKey = ([(usize, usize); 3], u16);

/// Handles kept before new kinds of requests are counted without a cache (client-key
/// accounts can make many).
const MAX_CACHED: usize = 4096;

/// One request done, with the account it used by name (none for the proxy's own routes
/// and refusals before an account was chosen: those have no `account` label).
pub fn request_done(
    route: &'static str,
    status: u16,
    source: &'static str,
    account: Option<&Arc<str>>,
    elapsed: Duration,
) {
    thread_local! {
        static CACHE: std::cell::RefCell<FastMap<RequestKey, RequestHandles>> =
            std::cell::RefCell::new(FastMap::default());
    }
    let at = |s: &str| (s.as_ptr() as usize, s.len());
    let key = (
        [at(route), at(source), account.map_or((0, 0), |a| at(a))],
        status,
    );
    CACHE.with_borrow_mut(|cache| {
        if let Some(h) = cache.get(&key) {
            h.count.increment(1);
            h.duration.record(elapsed.as_secs_f64());
            return;
        }
        let status = status.to_string();
        let count = match account {
            Some(a) => counter!(REQUESTS, "route" => route, "status" => status, "source" => source, "account" => a.to_string()),
            None => counter!(REQUESTS, "route" => route, "status" => status, "source" => source),
        };
        let duration = histogram!(REQUEST_DURATION, "route" => route);
        count.increment(1);
        duration.record(elapsed.as_secs_f64());
        if cache.len() < MAX_CACHED {
            let _account = account.cloned();
            cache.insert(key, RequestHandles { count, duration, _account });
        }
    });
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// A handle per label value (an account, an outcome), made once.
fn per_label<H: Clone>(
    cache: &'static OnceLock<RwLock<FastMap<String, H>>>,
    label: &str,
    make: impl FnOnce() -> H,
) -> H {
    let cache = cache.get_or_init(Default::default);
    if let Some(h) = read(cache).get(label) {
        return h.clone();
    }
    let h = make();
    let mut cache = write(cache);
    if cache.len() < MAX_CACHED {
        cache.insert(label.to_owned(), h.clone());
    }
    h
}

static IN_FLIGHT_NOW: AtomicI64 = AtomicI64::new(0);

/// Counts requests in progress (an atomic, exported at scrape time); the guard keeps the
/// count right if the client goes away.
pub struct InFlight;

impl InFlight {
    pub fn enter() -> Self {
        IN_FLIGHT_NOW.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT_NOW.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Renders the scrape, first setting the gauges that are kept as plain counters on the
/// hot path: requests in flight, and the requests waiting in each account's line by
/// priority.
pub fn render(queues: &[(Arc<str>, [usize; 3])]) -> String {
    let handle = handle();
    gauge!(IN_FLIGHT).set(IN_FLIGHT_NOW.load(Ordering::Relaxed) as f64);
    for (account, depth) in queues {
        for (priority, waiting) in Priority::ALL.iter().zip(depth) {
            gauge!(QUEUE_DEPTH, "account" => account.to_string(), "priority" => priority.label())
                .set(*waiting as f64);
        }
    }
    handle.render()
}

/// How long a client's requests waited for their quota slots. The first
/// [`MAX_CLIENT_LABELS`] clients to wait in line (the busy ones: a client that never
/// queues needs no label) get a label of their own for the process's life, so the label
/// set stays bounded; every other client is `other`.
pub fn client_wait(client: &ClientId, waited: Duration) {
    static NAMED: OnceLock<RwLock<FastMap<ClientId, metrics::Histogram>>> = OnceLock::new();
    static OTHER: OnceLock<metrics::Histogram> = OnceLock::new();
    let named = NAMED.get_or_init(Default::default);
    if let Some(h) = read(named).get(client) {
        h.record(waited.as_secs_f64());
        return;
    }
    let other = || OTHER.get_or_init(|| histogram!(CLIENT_WAIT, "client" => "other"));
    if waited.is_zero() {
        other().record(0.0);
        return;
    }
    let mut named = write(named);
    if named.len() < MAX_CLIENT_LABELS && !matches!(client, ClientId::Anonymous) {
        let h = histogram!(CLIENT_WAIT, "client" => client.to_string());
        h.record(waited.as_secs_f64());
        named.insert(client.clone(), h);
    } else {
        other().record(waited.as_secs_f64());
    }
}

pub fn upstream_attempt(outcome: &str) {
    static CACHE: OnceLock<RwLock<FastMap<String, metrics::Counter>>> = OnceLock::new();
    per_label(
        &CACHE,
        outcome,
        || counter!(UPSTREAM_ATTEMPTS, "outcome" => outcome.to_owned()),
    )
    .increment(1);
}

pub fn retry(reason: &str) {
    counter!(RETRIES, "reason" => reason.to_owned()).increment(1);
}

/// How long an account's requests waited for their slots: made once per account, kept
/// by its limiter.
pub fn limiter_wait(account: &str) -> metrics::Histogram {
    histogram!(LIMITER_WAIT, "account" => account.to_owned())
}

pub fn quota_rejected(account: &str, reason: &'static str) {
    counter!(QUOTA_REJECTED, "reason" => reason, "account" => account.to_owned()).increment(1);
}

/// A reload applied (`ok`) or refused (`error`).
pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

pub fn upstream_pause(account: &str) {
    counter!(UPSTREAM_PAUSES, "account" => account.to_owned()).increment(1);
}

pub fn unexpected_upstream_429(account: &str) {
    counter!(UNEXPECTED_UPSTREAM_429, "account" => account.to_owned()).increment(1);
}

pub fn redis_error() {
    counter!(REDIS_ERRORS).increment(1);
}

/// This instance renewed its lease, and reclaimed `reclaimed` others that had not.
pub fn lease_renewed(reclaimed: u64) {
    counter!(LEASE_RENEWALS).increment(1);
    if reclaimed > 0 {
        counter!(LEASE_RECLAIMS).increment(reclaimed);
    }
}

/// This instance's waiters were granted `n` slots by the fleet's line (labelled with the
/// instance's id, so a fleet's scrapes add up by instance).
pub fn fleet_granted(instance: &str, n: usize) {
    counter!(FLEET_GRANTS, "instance" => instance.to_owned()).increment(n as u64);
}

/// Requests that came to the fleet's line, and the Redis round trips made for them, by
/// path: `fast` (nobody waiting, a slot free: started by the call that registered it) or
/// `queued`; round trips also `idle` (a step with nobody in line, three times a lease).
pub fn fleet_round_trip(path: &'static str) {
    counter!(FLEET_ROUND_TRIPS, "path" => path).increment(1);
}

pub fn fleet_requests(fast: usize, queued: usize) {
    for (path, n) in [("fast", fast), ("queued", queued)] {
        if n > 0 {
            counter!(FLEET_REQUESTS, "path" => path).increment(n as u64);
        }
    }
}

/// The counter of an account's cached or coalesced reads with one result (hit, stale,
/// miss, bypass, collapsed): made once per account, kept by it.
pub fn cache_counter(account: &str, result: &'static str) -> metrics::Counter {
    counter!(CACHE_REQUESTS, "account" => account.to_owned(), "result" => result)
}

/// Entries and bytes the cache holds in this process.
pub fn cache_size(entries: u64, bytes: u64) {
    gauge!(CACHE_ENTRIES).set(entries as f64);
    gauge!(CACHE_BYTES).set(bytes as f64);
}

/// An entry pushed out to keep within `cache.max_bytes`.
pub fn cache_evicted() {
    counter!(CACHE_EVICTIONS).increment(1);
}

pub fn limiter_degraded(degraded: bool) {
    gauge!(LIMITER_DEGRADED).set(if degraded { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(path: &str, not_found: bool) -> &'static str {
        route_label(&route_of(path), not_found)
    }

    #[test]
    fn route_labels_hide_ids() {
        assert_eq!(
            label("/api/v1/campaigns/123/leads", false),
            "/api/v1/campaigns/{id}/leads"
        );
        assert_eq!(label("/api/v1/campaigns", false), "/api/v1/campaigns");
        assert_eq!(label("/healthz", false), "/healthz");
        assert_eq!(label("/wp-admin", false), "other");
        assert!(matches!(
            route_of("/api/v1/campaigns/9/leads"),
            Route::Known(_)
        ));
    }

    #[test]
    fn paths_smartlead_does_not_know_cannot_use_up_the_labels() {
        for i in 0..(MAX_ROUTES * 2) {
            let path =
                format!("/api/v1/junk-{}/x", (b'a' + (i % 26) as u8) as char) + &"y".repeat(i % 20);
            assert_eq!(label(&path, true), "other", "answered 404");
        }
        for i in 0..(MAX_ROUTES * 2) {
            // Answered, say, 400: these do get labels, up to the cap.
            let _ = label(&format!("/api/v1/odd/{}", "z".repeat(i % 24 + 1)), false);
        }
        assert_eq!(
            label("/api/v1/campaigns/123/leads", false),
            "/api/v1/campaigns/{id}/leads",
            "SmartLead's routes keep their labels past the cap"
        );
        assert_eq!(label("/api/v1/campaigns/123", true), "other");
    }
}
