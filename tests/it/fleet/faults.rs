//! Redis that misbehaves: a wrong password, a paused server, a full one; every request
//! is still answered, and the instance rejoins.

use std::time::{Duration, Instant};

use serde_json::Value;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::hardening::*;
use crate::support::*;

#[tokio::test]
async fn redis_with_a_wrong_password_falls_back_and_says_so() {
    let mut redis = PrivateRedis::start_with(&["--requirepass", "right"]).await;
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let url = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let proxy = spawn_proxy(quota_settings(
        &sim.base_url(),
        10,
        Duration::from_secs(1),
        Some((&url, "k")),
    ))
    .await;
    let started = Instant::now();
    still_serves(&proxy).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let ready: Value = proxy.get_json("/readyz").await;
    assert_eq!(ready["limiter"]["state"], "fallback", "{ready}");
    assert!(
        !ready.to_string().contains("wrong"),
        "the password is not shown: {ready}"
    );
    proxy.stop().await;
    redis.kill();
}

#[tokio::test]
async fn a_paused_redis_does_not_hang_requests() {
    let redis = PrivateRedis::start().await;
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let mut s = quota_settings(
        &sim.base_url(),
        100,
        Duration::from_secs(1),
        Some((&redis.url(), "k")),
    );
    s.limit.max_wait = Duration::from_secs(2);
    let proxy = spawn_proxy(s).await;
    still_serves(&proxy).await;
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CLIENT",
            "PAUSE",
            "3000",
            "ALL",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let started = Instant::now();
    still_serves(&proxy).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_redis_falls_back_then_rejoins() {
    let redis = PrivateRedis::start().await;
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let proxy = spawn_proxy(quota_settings(
        &sim.base_url(),
        100,
        Duration::from_secs(1),
        Some((&redis.url(), "k")),
    ))
    .await;
    still_serves(&proxy).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(redis.port.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    let state = || async {
        let v: Value = proxy.get_json("/readyz").await;
        v["limiter"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    cli(&["CONFIG", "SET", "maxmemory", "1"]);
    // Redis notices it is over its limit on its next writes; the heartbeat or the next
    // decision then fails and the instance falls back, serving all along.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state().await != "fallback" {
        assert!(Instant::now() < deadline, "did not fall back");
        let started = Instant::now();
        still_serves(&proxy).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serves(&proxy).await;
    cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state().await != "shared" {
        assert!(Instant::now() < deadline, "did not rejoin");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_serves(&proxy).await;
    proxy.stop().await;
}
