//! The shared quota over real sockets: a simulated SmartLead with a strict sliding window,
//! many concurrent clients, one proxy or several sharing a real Redis.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::Value;
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

async fn strict_sim(requests: u32, period: Duration) -> Sim {
    Sim::start(SimConfig {
        requests,
        period,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// Sends `n` concurrent GETs spread over `proxies`; returns the statuses.
async fn burst(proxies: &[&Proxy], n: usize) -> Vec<u16> {
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
async fn three_proxies_on_one_redis_share_the_quota() {
    let period = Duration::from_secs(1);
    let sim = strict_sim(50, period).await;
    let key = unique_key();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let s = quota_settings(&sim.base_url(), 50, period, Some((SHARED_REDIS, &key)));
        proxies.push(spawn_proxy(s).await);
    }
    let refs: Vec<&Proxy> = proxies.iter().collect();
    let statuses = burst(&refs, 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(sim.stats().rate_limited, 0);
    assert!(max_in_window(&sim, period, None) <= 50);
    let ready: Value = client()
        .get(proxies[0].url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["limiter"]["state"], "shared", "{ready}");
    for p in proxies {
        p.stop().await;
    }
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
async fn upstream_429_pauses_everyone(redis_key: Option<String>) {
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
async fn an_upstream_429_pauses_every_instance_via_redis() {
    upstream_429_pauses_everyone(Some(unique_key())).await;
}

#[tokio::test]
async fn redis_down_with_reject_answers_503_and_readyz_says_why() {
    let sim = strict_sim(1000, Duration::from_secs(60)).await;
    let port = closed_port().await;
    let mut s = quota_settings(
        &sim.base_url(),
        10,
        Duration::from_secs(1),
        Some((&format!("redis://127.0.0.1:{port}"), "k")),
    );
    s.redis.on_error = smartlead_proxy::config::OnRedisError::Reject;
    let proxy = spawn_proxy(s).await;
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no hang on a dead Redis"
    );
    expect_envelope(resp, 503, "UNAVAILABLE").await;
    let ready = proxy.get("/readyz").await;
    let v = expect_envelope(ready, 503, "UNAVAILABLE").await;
    assert_eq!(v["error"]["details"]["limiter"]["state"], "unavailable");
    assert_eq!(sim.stats().requests, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn redis_killed_mid_run_falls_back_then_rejoins() {
    let period = Duration::from_secs(1);
    let quota = 20;
    let sim = strict_sim(10_000, period).await;
    let mut redis = PrivateRedis::start().await;
    let key = unique_key();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let mut s = quota_settings(&sim.base_url(), quota, period, Some((&redis.url(), &key)));
        s.limit.max_wait = Duration::from_secs(3);
        proxies.push(spawn_proxy(s).await);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await; // heartbeats: both instances live
    let refs: Vec<&Proxy> = proxies.iter().collect();
    let c = client();
    let state = |p: &Proxy| {
        let (c, url) = (c.clone(), p.url("/readyz"));
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["limiter"]["state"]
                .clone()
        }
    };

    assert!(burst(&refs, 20).await.iter().all(|s| *s == 200));
    redis.kill();
    let killed = tokio::time::Instant::now();
    let started = Instant::now();
    let during = burst(&refs, 40).await;
    // Every request is answered: a slot from the local share, or a 429 at once.
    assert!(during.iter().all(|s| *s == 200 || *s == 429), "{during:?}");
    assert!(
        during.iter().filter(|s| **s == 200).count() >= 20,
        "{during:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3 + 2),
        "nothing hung past max_wait"
    );
    assert_eq!(state(&proxies[0]).await, "fallback");

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(&proxies[0]).await != "shared" || state(&proxies[1]).await != "shared" {
        assert!(Instant::now() < deadline, "did not rejoin the shared quota");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = burst(&refs, 40).await;
    assert!(after.iter().all(|s| *s == 200 || *s == 429), "{after:?}");
    // After the failure transition, no window saw more than the quota.
    let settled = killed + period + Duration::from_millis(100);
    assert!(max_in_window(&sim, period, Some(settled)) <= quota as usize);
    for p in proxies {
        p.stop().await;
    }
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

/// Concurrent reservations on Redis go in batches: each still gets the slot every window
/// allows after the ones before it, and a refusal names the window that held it back.
#[tokio::test]
async fn batched_reservations_on_redis_keep_every_window() {
    use smartlead_proxy::config::Window;
    use smartlead_proxy::limiter::Refusal;
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let mut s = quota_settings(
        &sim.base_url(),
        3,
        Duration::from_secs(1),
        Some((SHARED_REDIS, &unique_key())),
    );
    s.limit.windows = vec![
        Window::new(3, Duration::from_secs(1)),
        Window::new(5, Duration::from_secs(3)),
    ];
    s.limit.margin = Duration::from_millis(50);
    let account = smartlead_proxy::accounts::Accounts::new(&s).unwrap().all()[0].clone();
    let asked = tokio::time::Instant::now();
    let deadline = asked + Duration::from_millis(2500);
    let calls = (0..12).map(|_| {
        let account = account.clone();
        async move {
            let r = account.limiter.acquire(deadline, &Default::default()).await;
            (r, tokio::time::Instant::now())
        }
    });
    let results = join_all(calls).await;
    let mut starts = Vec::new();
    for (r, at) in results {
        match r {
            Ok(_) => starts.push(at.duration_since(asked).as_micros() as u64),
            Err(Refusal::RateLimited { window, .. }) => {
                assert_eq!(window, Some(1), "the 5/3s window held it back");
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    starts.sort();
    assert_eq!(
        starts.len(),
        5,
        "3 at once, 2 a second later, then 5/3s is full: {starts:?}"
    );
    assert!(
        smartlead_proxy::limiter::log::max_in_window(&starts, 1_000_000) <= 3,
        "{starts:?}"
    );
    assert!(starts[3] >= 1_000_000, "the second second's: {starts:?}");
}
