//! The real binary on Redis: the fleet is every live lease, a killed instance's waiters
//! hold nobody back, and an instance back after its lease ran out registers again.

use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::*;

/// A SmartLead at 10 per second and two proxy processes sharing it through Redis (a
/// lease of 1 s, a key of their own from `name`), each waiting up to `max_wait`.
async fn two_on_redis(name: &str, max_wait: &str) -> (Sim, Running, Running) {
    let sim = Sim::start(SimConfig {
        api_key: Some(SECRET.into()),
        requests: 10,
        period: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = format!("{name}-{}", std::process::id());
    let env = [
        ("SMARTLEAD_PROXY__LIMIT__BACKEND", "redis"),
        ("SMARTLEAD_PROXY__REDIS__URL", "redis://127.0.0.1:6379"),
        ("SMARTLEAD_PROXY__REDIS__KEY", key.as_str()),
        ("SMARTLEAD_PROXY__REDIS__LEASE", "1s"),
        ("SMARTLEAD_PROXY__LIMIT__REQUESTS", "10"),
        ("SMARTLEAD_PROXY__LIMIT__PERIOD", "1s"),
        ("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", max_wait),
        ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
    ];
    let a = start(&sim.base_url(), &env);
    let b = start(&sim.base_url(), &env);
    (sim, a, b)
}

/// Each instance holds a lease in Redis, renewed three times per `redis.lease`, and
/// `/status.json` shows the fleet: id, host, waiting, lease age. An instance killed with
/// SIGKILL leaves the fleet within its lease; nobody has to clean up after it.
#[tokio::test]
async fn the_fleet_is_every_live_lease_and_a_killed_instance_leaves_it() {
    let sim = secret_sim().await;
    let key = format!("fleet-{}", std::process::id());
    let on_redis = |host: &'static str| {
        [
            ("SMARTLEAD_PROXY__LIMIT__BACKEND", "redis"),
            ("SMARTLEAD_PROXY__REDIS__URL", "redis://127.0.0.1:6379"),
            ("SMARTLEAD_PROXY__REDIS__LEASE", "1s"),
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
            ("HOSTNAME", host),
        ]
    };
    let mut a_env = on_redis("host-a").to_vec();
    a_env.push(("SMARTLEAD_PROXY__REDIS__KEY", &key));
    let mut b_env = on_redis("host-b").to_vec();
    b_env.push(("SMARTLEAD_PROXY__REDIS__KEY", &key));
    let mut a = start(&sim.base_url(), &a_env);
    let mut b = start(&sim.base_url(), &b_env);
    let fleet = |proxy: &Running| {
        let url = proxy.url("/status.json");
        async move {
            let s: Value = client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            s["fleet"].as_array().cloned().unwrap_or_default()
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let seen = loop {
        let seen = fleet(&b).await;
        if seen.len() == 2 || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hosts: Vec<&str> = seen.iter().map(|i| i["host"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["host-a", "host-b"], "{seen:?}");
    for i in &seen {
        assert!(i["lease_age_seconds"].as_f64().unwrap() < 1.0, "{i}");
        assert_eq!(i["id"].as_str().unwrap().len(), 16, "{i}");
        assert_eq!(i["this"], i["host"] == "host-b", "{i}");
    }
    a.child.kill().unwrap(); // SIGKILL: no goodbye
    let killed = std::time::Instant::now();
    let left = loop {
        let seen = fleet(&b).await;
        if seen.len() == 1 {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(3), "still {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left <= Duration::from_millis(1400), "left after {left:?}");
    assert_eq!(fleet(&b).await[0]["host"], "host-b");
    let metrics = b.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("smartlead_proxy_lease_renewals_total"),
        "{metrics}"
    );
    assert!(b.terminate().success());
    let _ = a.child.wait();
}

/// An instance killed with SIGKILL while 100 requests wait on it holds nobody back: its
/// waiters leave the fleet's line with its lease, and the next requests on another
/// instance are served within the lease and two windows, SmartLead's quota kept.
#[tokio::test]
async fn a_killed_instances_waiters_hold_nobody_back() {
    let (sim, mut a, mut b) = two_on_redis("fleet-kill", "60s").await;
    let c = client();
    let bulk: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), a.url("/api/v1/campaigns"));
            tokio::spawn(async move { c.get(url).header("x-client-id", "bulk").send().await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.child.kill().unwrap();
    let killed = std::time::Instant::now();
    let next: Vec<_> = (0..10)
        .map(|_| {
            let (c, url) = (c.clone(), b.url("/api/v1/campaigns"));
            tokio::spawn(async move {
                // The same client: in fair order behind every one of its dead waiters.
                let r = c.get(url).header("x-client-id", "bulk").send().await;
                (
                    r.map(|r| r.status().as_u16()).unwrap_or(0),
                    killed.elapsed(),
                )
            })
        })
        .collect();
    for n in next {
        let (status, took) = n.await.unwrap();
        assert_eq!(status, 200);
        // The lease (1 s) and two windows of 1 s (and their margins).
        assert!(
            took < Duration::from_millis(3300),
            "answered after {took:?}"
        );
    }
    for t in bulk {
        t.abort();
    }
    let reqs = sim.requests();
    let first = reqs[0].at;
    let starts: Vec<u64> = reqs
        .iter()
        .map(|r| r.at.duration_since(first).as_micros() as u64)
        .collect();
    assert!(smartlead_proxy::limiter::log::max_in_window(&starts, 1_000_000) <= 10);
    assert_eq!(sim.stats().rate_limited, 0);
    assert!(b.terminate().success());
    let _ = a.child.wait();
}

/// An instance stopped (SIGSTOP) past its lease loses its waiters' places; when it runs
/// again it is told so and registers the requests it still holds, in their order: every
/// one of them is served.
#[tokio::test]
async fn an_instance_back_after_its_lease_ran_out_registers_its_waiters_again() {
    let (sim, mut a, mut b) = two_on_redis("fleet-stop", "20s").await;
    let c = client();
    let send = |proxy: &Running, n: usize, id: &'static str| -> Vec<_> {
        (0..n)
            .map(|n| {
                // Each its own request: identical ones would share one upstream call.
                let path = format!("/api/v1/campaigns?client={id}&n={n}");
                let (c, url) = (c.clone(), proxy.url(&path));
                tokio::spawn(async move {
                    let r = c.get(url).header("x-client-id", id).send().await;
                    r.map(|r| r.status().as_u16()).unwrap_or(0)
                })
            })
            .collect()
    };
    let held = send(&a, 25, "a");
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.send("-STOP");
    // B keeps the line busy meanwhile; A's registrations age out with its lease.
    let others = send(&b, 20, "b");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.send("-CONT");
    for t in held.into_iter().chain(others) {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        a.output()
            .iter()
            .any(|l| l.contains("lease on the fleet line had run out")),
        "A was told and registered again"
    );
    assert_eq!(sim.stats().rate_limited, 0);
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}
