//! The fleet shares one cache: a hit, an invalidation and a coalesced call on one
//! instance serve every other; without Redis each instance keeps its own.

use std::time::Duration;

use smartlead_proxy::sim::Fault;

use crate::cache::*;
use crate::support::*;

#[tokio::test]
async fn the_fleet_shares_one_cache_and_one_invalidation() {
    let (sim, redis, a, b, _) =
        two_on_redis(&[("/campaigns", 300_000), ("/campaigns/*/analytics", 60_000)]).await;
    let first = a.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&first), ["fwd=uri-miss", "stored"]);
    let on_b = b.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&on_b)[0], "hit");
    assert_eq!(calls(&sim, "/campaigns"), 1);
    b.get("/api/v1/campaigns/1001/analytics").await;
    assert_eq!(
        status_of(&a.get("/api/v1/campaigns/1001/analytics").await)[0],
        "hit"
    );
    // A write on A: B's next read goes upstream, and sees it.
    let created = client()
        .post(a.url("/api/v1/campaigns/create"))
        .json(&serde_json::json!({"name": "Made on A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let after = b.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&after), ["fwd=uri-miss", "stored"]);
    assert!(after.text().await.unwrap().contains("Made on A"));
    // A lead import on B: A's analytics and leads of that campaign are asked again.
    let imported = client()
        .post(b.url("/api/v1/campaigns/1001/leads"))
        .json(&serde_json::json!({"lead_list": [{"email": "b@example.com", "first_name": "B", "company_name": "C"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);
    let analytics = a.get("/api/v1/campaigns/1001/analytics").await;
    assert_eq!(status_of(&analytics), ["fwd=uri-miss", "stored"]);
    assert!(analytics.text().await.unwrap().contains("\"total\":1"));
    assert_key_nowhere_in(&redis).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn twenty_identical_gets_on_two_instances_make_at_most_two_calls() {
    let (sim, redis, a, b, _) = two_on_redis(&[("/campaigns", 300_000)]).await;
    for path in ["/campaigns", "/campaigns/1002/leads"] {
        sim.push_fault(Fault::delay(Duration::from_millis(500)).on(path));
        let url = format!("/api/v1{path}");
        let (on_a, on_b) = tokio::join!(at_once(&a, &url, 10), at_once(&b, &url, 10));
        assert!(
            on_a.iter().chain(&on_b).all(|(s, _, _)| *s == 200),
            "{on_a:?} {on_b:?}"
        );
        let made = calls(&sim, path);
        assert!((1..=2).contains(&made), "{path}: {made} upstream calls");
    }
    assert_key_nowhere_in(&redis).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_follower_on_another_instance_gets_the_leaders_answer() {
    let (sim, _redis, a, b, _) = two_on_redis(&[]).await;
    sim.push_fault(Fault::delay(Duration::from_millis(600)).on("/campaigns"));
    let leader = a.get("/api/v1/campaigns");
    let follower = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.get("/api/v1/campaigns").await
    };
    let (leader, follower) = tokio::join!(leader, follower);
    assert_eq!(leader.status(), 200);
    assert_eq!(status_of(&follower), ["fwd=bypass", "collapsed"]);
    assert_eq!(follower.text().await.unwrap(), leader.text().await.unwrap());
    assert_eq!(calls(&sim, "/campaigns"), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn with_redis_gone_each_instance_keeps_its_own_cache() {
    let (sim, mut redis, a, b, _) = two_on_redis(&[("/campaigns", 300_000)]).await;
    a.get("/api/v1/campaigns").await;
    redis.kill();
    for proxy in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
        }
        let resp = proxy.get("/api/v1/campaigns").await;
        assert_eq!(status_of(&resp)[0], "hit");
    }
    assert!(calls(&sim, "/campaigns") <= 5);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_write_answered_while_redis_stalls_reaches_the_fleet_once_it_answers() {
    let (_sim, redis, a, b, _) = two_on_redis(&[("/campaigns", 300_000)]).await;
    a.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&b.get("/api/v1/campaigns").await)[0], "hit");
    redis.signal("-STOP");
    let created = client()
        .post(a.url("/api/v1/campaigns/create"))
        .json(&serde_json::json!({"name": "Made in the stall"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    redis.signal("-CONT");
    until_shared(&a).await;
    until_shared(&b).await;
    // A reads nothing meanwhile: its write reaches Redis by itself.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let on_b = b.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&on_b), ["fwd=uri-miss", "stored"]);
    assert!(on_b.text().await.unwrap().contains("Made in the stall"));
    a.stop().await;
    b.stop().await;
}
