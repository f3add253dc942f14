//! The shared quota over real sockets: a simulated SmartLead with a strict sliding window,
//! many concurrent clients, one proxy (several sharing a real Redis: `fleet::quota`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

pub(crate) async fn strict_sim(requests: u32, period: Duration) -> Sim {
    Sim::start(SimConfig {
        requests,
        period,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// Sends `n` concurrent GETs spread over `proxies`; returns the statuses.
pub(crate) async fn burst(proxies: &[&Proxy], n: usize) -> Vec<u16> {
    let c = client();
    let calls = (0..n).map(|i| {
        let url = proxies[i % proxies.len()].url("/api/v1/campaigns");
        let c = c.clone();
        async move {
            c.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    join_all(calls).await
}

#[tokio::test]
async fn two_hundred_clients_through_one_proxy_never_trip_the_upstream() {
    let _heavy = crate::support::heavy().await;
    let period = Duration::from_secs(1);
    let sim = strict_sim(50, period).await;
    let proxy = spawn_proxy(quota_settings(&sim.base_url(), 50, period, None)).await;
    let statuses = burst(&[&proxy], 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = sim.stats();
    assert_eq!(stats.rate_limited, 0);
    assert_eq!(stats.requests, 200);
    assert!(max_in_window(&sim, period, None) <= 50);
    proxy.stop().await;
}

#[tokio::test]
async fn a_wait_past_max_wait_is_refused_at_once() {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let mut s = quota_settings(&sim.base_url(), 2, Duration::from_secs(10), None);
    s.limit.max_wait = Duration::from_secs(1);
    let proxy = spawn_proxy(s).await;
    for _ in 0..2 {
        assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    }
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered at once"
    );
    let retry_after = retry_after(&resp);
    assert!(
        (9..=11).contains(&retry_after),
        "honest Retry-After: {retry_after}"
    );
    assert_eq!(resp.headers()["ratelimit-limit"], "2");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert_eq!(resp.headers()["ratelimit-policy"], "2;w=10");
    let v = expect_envelope(resp, 429, "RATE_LIMITED").await;
    assert_eq!(v["error"]["details"]["retry_after"], retry_after);
    assert_eq!(v["error"]["details"]["attempts"], 0);
    assert_eq!(sim.stats().requests, 2, "nothing extra reached upstream");
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_and_a_gone_client_leaves_it() {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let mut s = quota_settings(&sim.base_url(), 1, Duration::from_secs(2), None);
    s.limit.max_queue = 1;
    let proxy = spawn_proxy(s).await;
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    // This one would wait ~2 s for its slot; its client gives up after 300 ms.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = tokio::spawn(impatient.get(proxy.url("/api/v1/campaigns")).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The queue (size 1) is held: the next caller is refused at once.
    let started = Instant::now();
    let refused = proxy.get("/api/v1/campaigns").await;
    assert!(started.elapsed() < Duration::from_millis(500));
    let v = expect_envelope(refused, 429, "RATE_LIMITED").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{v}"
    );
    assert!(
        gone.await.unwrap().is_err(),
        "the impatient client timed out"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Its seat and its slot are free again: the next caller waits and gets through.
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_gives_its_slot_back() {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let proxy = spawn_proxy(quota_settings(
        &sim.base_url(),
        1,
        Duration::from_secs(2),
        None,
    ))
    .await;
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let t0 = Instant::now();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(
        impatient
            .get(proxy.url("/api/v1/campaigns"))
            .send()
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Had the slot stayed taken, this would wait ~4 s instead of ~2 s.
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let waited = t0.elapsed();
    assert!(waited < Duration::from_millis(3000), "waited {waited:?}");
    assert_eq!(
        sim.stats().requests,
        2,
        "the gone client never reached upstream"
    );
    proxy.stop().await;
}

/// One instance sees a 429 with `Retry-After: 3`; every instance holds back for ~3 s.
pub(crate) async fn upstream_429_pauses_everyone(redis_key: Option<String>) {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let mut proxies = Vec::new();
    // Local limiters are per process: one proxy, two callers. Redis: two proxies.
    let instances = if redis_key.is_some() { 2 } else { 1 };
    for _ in 0..instances {
        let redis = redis_key.as_deref().map(|k| (SHARED_REDIS, k));
        let mut s = quota_settings(&sim.base_url(), 100, Duration::from_secs(10), redis);
        s.retry.max_retries = 3;
        proxies.push(spawn_proxy(s).await);
    }
    let (a, b) = (&proxies[0], &proxies[proxies.len() - 1]);
    sim.push_fault(
        Fault::json(
            429,
            serde_json::json!({"error": {"code": "RATE_LIMITED", "message": "slow down"}}),
        )
        .header("retry-after", "3"),
    );
    let c = client();
    let started = Instant::now();
    let first = tokio::spawn({
        let (c, url) = (c.clone(), a.url("/api/v1/campaigns"));
        async move { c.get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = c.get(b.url("/api/v1/campaigns/1001")).send().await.unwrap();
    assert_eq!(second.status(), 200, "callers see a delay, not a 429");
    assert_eq!(first.await.unwrap(), 200);
    assert!(started.elapsed() >= Duration::from_millis(2900));
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 3, "the 429, then both after the pause");
    for later in &reqs[1..] {
        let gap = later.at.duration_since(reqs[0].at);
        assert!(
            gap >= Duration::from_millis(2900),
            "sent {gap:?} after the 429"
        );
    }
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn an_upstream_429_pauses_the_local_limiter() {
    upstream_429_pauses_everyone(None).await;
}

#[tokio::test]
async fn metrics_show_the_quota_at_work() {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let mut s = quota_settings(&sim.base_url(), 2, Duration::from_secs(1), None);
    s.limit.max_wait = Duration::from_millis(200);
    let proxy = spawn_proxy(s).await;
    let statuses = burst(&[&proxy], 5).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
    let text = proxy.get("/metrics").await.text().await.unwrap();
    for needle in [
        "smartlead_proxy_quota_rejected_total{reason=\"max_wait\",account=\"default\"}",
        "smartlead_proxy_limiter_wait_seconds_bucket",
        "smartlead_proxy_limiter_queue_depth",
        "smartlead_proxy_upstream_attempts_total{outcome=\"200\"}",
        "smartlead_proxy_requests_total{route=\"/api/v1/campaigns\",status=\"429\",source=\"proxy\",account=\"default\"}",
        "smartlead_proxy_in_flight_requests",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(!text.contains(KEY));
    proxy.stop().await;
}
