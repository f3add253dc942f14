//! The quota shared through Redis: three proxies, a pause after an upstream 429 for
//! every instance, Redis down (reject and fallback), batched reservations.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::quota::*;
use crate::support::*;

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
