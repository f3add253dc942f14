//! Fairness over the fleet: self-made priorities, each instance's own waiters through a
//! Redis pause, `limit.per_client` across instances, and the status of the fleet's clients.

use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::config::Window;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::time::Instant;

use crate::fairness::*;
use crate::support::*;

#[tokio::test]
async fn self_made_high_priority_neither_jumps_nor_starves_on_redis() {
    self_made_priority(Some(SHARED_REDIS)).await;
}

#[tokio::test]
async fn on_redis_each_instance_is_fair_among_its_own_waiters_through_a_pause() {
    let period = Duration::from_secs(1);
    let sim = Sim::start(SimConfig {
        requests: 5,
        period,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = unique_key();
    let mut s = quota_settings(&sim.base_url(), 5, period, Some((SHARED_REDIS, &key)));
    // Retry-After is capped by the longest window or retry.max_delay: allow 3 s.
    s.retry.max_delay = Duration::from_secs(5);
    s.retry.max_retries = 3;
    let proxy = spawn_proxy(s).await;
    let started = Instant::now();
    let bulk = queue(&proxy, "bulk", 25, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first five have gone; the next request SmartLead sees (at the next window) is
    // refused with Retry-After: 3. Every waiting slot moves past the pause, and whoever
    // is first in line re-reads them from Redis.
    let pushed = Instant::now();
    sim.push_fault(
        smartlead_proxy::sim::Fault::json(
            429,
            serde_json::json!({"error": {"code": "RATE_LIMITED", "message": "slow down"}}),
        )
        .header("retry-after", "3"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let (status, _, answered) = get(&proxy, "ui", &[("x-client-id", "ui")]).await;
    assert_eq!(status, 200);
    let took = answered - asked;
    assert!(all(bulk).await.iter().all(|(s, _)| *s == 200));
    let reqs = sim.requests();
    let timeline: Vec<(u128, &str)> = reqs
        .iter()
        .map(|r| {
            let tag = r
                .query
                .as_deref()
                .unwrap_or("")
                .split('&')
                .next()
                .unwrap_or("");
            (r.at.saturating_duration_since(started).as_millis(), tag)
        })
        .collect();
    // Nothing after the 429 (beyond the ones already on their way with it) goes out
    // before its Retry-After.
    let refused = reqs
        .iter()
        .find(|r| r.at > pushed)
        .expect("the refused one")
        .at;
    for later in reqs
        .iter()
        .filter(|r| r.at > refused + Duration::from_millis(100))
    {
        let after = later.at.duration_since(refused);
        assert!(
            after >= Duration::from_millis(2900),
            "sent {after:?} after the 429: {timeline:?}"
        );
    }
    // The pause, then the next turn; behind bulk's 20 it would be three windows more.
    assert!(
        took < Duration::from_millis(4500),
        "ui waited {took:?}: {timeline:?}"
    );
    assert!(max_in_window(&sim, period, None) <= 5);
    proxy.stop().await;
}

/// `limit.per_client` is one cap per client over the whole fleet (a GCRA on Redis): 30
/// requests of one client spread over two instances, at a cap of 20 per 30 s, admit 20.
#[tokio::test]
async fn a_per_client_cap_holds_across_instances() {
    let sim = unlimited_sim().await;
    let key = unique_key();
    let settings = || {
        let mut s = quota_settings(
            &sim.base_url(),
            1000,
            Duration::from_secs(1),
            Some((SHARED_REDIS, key.as_str())),
        );
        s.limit.per_client = Some(Window::parse("20/30s").unwrap());
        s
    };
    let (a, b) = (spawn_proxy(settings()).await, spawn_proxy(settings()).await);
    let mut statuses = Vec::new();
    for i in 0..30 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let (status, body, _) = get(proxy, "w", &[("x-client-id", "worker")]).await;
        if status == 429 {
            assert_eq!(body["error"]["details"]["reason"], "client_cap", "{body}");
        }
        statuses.push(status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 20, "{statuses:?}");
    // Another client has a cap of its own.
    let (status, ..) = get(&a, "other", &[("x-client-id", "other")]).await;
    assert_eq!(status, 200);
    a.stop().await;
    b.stop().await;
}

/// While Redis is unreachable the cap is this process's again (governor), as before.
#[tokio::test]
async fn a_per_client_cap_falls_back_to_the_process_without_redis() {
    let sim = unlimited_sim().await;
    let url = format!("redis://127.0.0.1:{}", closed_port().await);
    let mut s = quota_settings(
        &sim.base_url(),
        1000,
        Duration::from_secs(1),
        Some((&url, "gone")),
    );
    s.limit.per_client = Some(Window::parse("5/30s").unwrap());
    let proxy = spawn_proxy(s).await;
    let mut admitted = 0;
    for _ in 0..8 {
        let (status, ..) = get(&proxy, "w", &[("x-client-id", "worker")]).await;
        admitted += usize::from(status == 200);
    }
    assert_eq!(admitted, 5);
    proxy.stop().await;
}

/// `/status.json` shows who waits over the whole fleet, as each instance's lease tells.
#[tokio::test]
async fn the_status_shows_waiting_clients_over_the_fleet() {
    let sim = unlimited_sim().await;
    let key = unique_key();
    let settings = || {
        let mut s = quota_settings(
            &sim.base_url(),
            1,
            Duration::from_millis(250),
            Some((SHARED_REDIS, key.as_str())),
        );
        s.redis.lease = Duration::from_millis(600);
        s
    };
    let (a, b) = (spawn_proxy(settings()).await, spawn_proxy(settings()).await);
    let mut waiting = queue(&a, "bulk", 6, &[]);
    waiting.extend(queue(&b, "ui", 3, &[]));
    let deadline = Instant::now() + Duration::from_secs(3);
    let seen = loop {
        let s: Value = a.get_json("/status.json").await;
        let seen = s["fleet_waiting"]["default"].clone();
        let both = seen["bulk"].as_u64().unwrap_or(0) > 0 && seen["ui"].as_u64().unwrap_or(0) > 0;
        if both || Instant::now() > deadline {
            break (seen, s["fleet"].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seen.0["ui"].as_u64().unwrap_or(0) > 0,
        "B's client, seen from A: {seen:?}"
    );
    assert!(seen.0["bulk"].as_u64().unwrap_or(0) > 0, "{seen:?}");
    assert_eq!(seen.1.as_array().map(Vec::len), Some(2), "{seen:?}");
    all(waiting).await;
    a.stop().await;
    b.stop().await;
}
