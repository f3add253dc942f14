//! One fair line for the whole fleet: instances sharing `redis.key` on a real Redis serve
//! their waiters in one fair order (clients, weights, priority classes), a dead instance
//! holds nobody back, and a lost log (FLUSHALL, a restarted Redis) is rebuilt before
//! anything more is granted. Every test also checks that SmartLead (the simulator, at 10
//! per second) never saw more than its quota in a window and never answered 429.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use smartlead_proxy::Settings;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const QUOTA: u32 = 10;
const PERIOD: Duration = Duration::from_secs(1);

/// A simulator that answers 429 past 10 per second, as SmartLead would.
async fn strict_sim() -> Sim {
    Sim::start(SimConfig {
        requests: QUOTA,
        period: PERIOD,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// An instance of the fleet `key` on the shared Redis, at 10 per second.
fn member_of(sim: &Sim, redis: &str, key: &str) -> Settings {
    quota_settings(&sim.base_url(), QUOTA, PERIOD, Some((redis, key)))
}

type Answer = (u16, Instant);

/// `n` GETs of client `id` at once, each with `extra` headers, tagged `c=<id>`
/// (one client per test, made before: making one costs a moment).
fn send(
    c: &reqwest::Client,
    proxy: &Proxy,
    id: &str,
    n: usize,
    extra: &[(&'static str, &'static str)],
) -> Vec<JoinHandle<Answer>> {
    (0..n)
        .map(|_| {
            let (url, id, extra) = (proxy.url(""), id.to_owned(), extra.to_vec());
            let c = c.clone();
            tokio::spawn(async move {
                let mut req = c
                    .get(format!("{url}/api/v1/campaigns?c={id}"))
                    .header("x-client-id", &id);
                for (k, v) in extra {
                    req = req.header(k, v);
                }
                let status = match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                (status, Instant::now())
            })
        })
        .collect()
}

/// The `c` tag of each request SmartLead saw, in order.
fn seen_order(sim: &Sim) -> Vec<String> {
    sim.requests()
        .iter()
        .map(|r| {
            r.query
                .as_deref()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("c=")))
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// What SmartLead saw kept its quota: no window over, no 429.
fn assert_quota_kept(sim: &Sim) {
    assert!(
        max_in_window(sim, PERIOD, None) <= QUOTA as usize,
        "a window saw {} starts",
        max_in_window(sim, PERIOD, None)
    );
    assert_eq!(sim.stats().rate_limited, 0, "SmartLead answered 429");
}

async fn stop_all(tasks: Vec<JoinHandle<Answer>>, proxies: Vec<Proxy>) {
    for t in tasks {
        t.abort();
    }
    for p in proxies {
        p.stop().await;
    }
}

/// A bulk client queues 120 on A; an interactive request on B half a second later is
/// served in the next turn, not after A's queue.
#[tokio::test]
async fn an_interactive_request_on_one_instance_is_not_stuck_behind_a_bulk_queue_on_another() {
    let sim = strict_sim().await;
    let key = unique_key();
    let c = client();
    let a = spawn_proxy(member_of(&sim, SHARED_REDIS, &key)).await;
    let b = spawn_proxy(member_of(&sim, SHARED_REDIS, &key)).await;
    let bulk = send(&c, &a, "bulk", 120, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let ui = send(&c, &b, "ui", 1, &[]).pop().unwrap().await.unwrap();
    assert_eq!(ui.0, 200);
    let took = ui.1 - asked;
    assert!(took < Duration::from_millis(1500), "ui waited {took:?}");
    assert_quota_kept(&sim);
    stop_all(bulk, vec![a, b]).await;
}

/// Weights 4:1 with the two clients on different instances: the heavier one gets about
/// four slots in five while both wait.
#[tokio::test]
async fn weights_share_the_turns_across_instances() {
    let sim = strict_sim().await;
    let key = unique_key();
    let weighted = || {
        let mut s = member_of(&sim, SHARED_REDIS, &key);
        s.limit.client_weights = HashMap::from([("heavy".to_owned(), 4)]);
        s
    };
    let (a, b) = (spawn_proxy(weighted()).await, spawn_proxy(weighted()).await);
    let c = client();
    // A filler takes the first window, so both clients are in line before anyone is
    // served in fair order.
    let mut tasks = send(&c, &a, "filler", 10, &[]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.extend(send(&c, &a, "heavy", 40, &[]));
    tasks.extend(send(&c, &b, "light", 40, &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.requests().len() < 40 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = seen_order(&sim);
    let shared: Vec<&String> = order[10..40].iter().collect();
    let heavy = shared.iter().filter(|c| **c == "heavy").count() as f64;
    let share = heavy / shared.len() as f64;
    assert!(
        (0.72..=0.88).contains(&share),
        "the heavier client's share: {share:.2} of {shared:?}"
    );
    assert_quota_kept(&sim);
    stop_all(tasks, vec![a, b]).await;
}

/// `X-Priority: high` on B goes before A's bulk queue.
#[tokio::test]
async fn a_high_priority_request_on_one_instance_goes_before_another_instances_queue() {
    let sim = strict_sim().await;
    let key = unique_key();
    let c = client();
    let a = spawn_proxy(member_of(&sim, SHARED_REDIS, &key)).await;
    let b = spawn_proxy(member_of(&sim, SHARED_REDIS, &key)).await;
    let mut tasks = send(&c, &a, "bulk", 30, &[]);
    // Another client on B, already waiting too.
    tasks.extend(send(&c, &b, "other", 15, &[]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sim.requests().len();
    let urgent = send(&c, &b, "urgent", 1, &[("x-priority", "high")])
        .pop()
        .unwrap()
        .await
        .unwrap();
    assert_eq!(urgent.0, 200);
    let order = seen_order(&sim);
    let at = order
        .iter()
        .position(|c| c == "urgent")
        .expect("urgent was sent");
    // Within the next window's slots, while 20 of bulk's and 5 of the other's wait:
    // not behind them, as it would be with slots handed out first come.
    assert!(
        at < before + QUOTA as usize,
        "urgent went {}th after asking: {order:?}",
        at - before
    );
    assert_quota_kept(&sim);
    stop_all(tasks, vec![a, b]).await;
}

/// Under sustained demand from three instances, the fleet uses the quota in full.
#[tokio::test]
async fn three_instances_under_saturation_use_the_whole_quota() {
    let sim = strict_sim().await;
    let key = unique_key();
    let margin = Duration::from_millis(50);
    let member = || {
        let mut s = member_of(&sim, SHARED_REDIS, &key);
        s.limit.margin = margin;
        s
    };
    let proxies = vec![
        spawn_proxy(member()).await,
        spawn_proxy(member()).await,
        spawn_proxy(member()).await,
    ];
    let run = Duration::from_secs(60);
    let start = Instant::now();
    let end = start + run;
    let mut workers = Vec::new();
    for (i, p) in proxies.iter().enumerate() {
        for w in 0..4 {
            let url = p.url(&format!("/api/v1/campaigns?c=w{i}-{w}"));
            let id = format!("w{i}-{w}");
            workers.push(tokio::spawn(async move {
                let c = client();
                let mut failed = 0;
                while Instant::now() < end {
                    let r = c.get(&url).header("x-client-id", &id).send().await;
                    failed += usize::from(!r.is_ok_and(|r| r.status().is_success()));
                }
                failed
            }));
        }
    }
    let mut failed = 0;
    for w in workers {
        failed += w.await.unwrap();
    }
    let served = sim.requests().iter().filter(|r| r.at < end).count();
    // What the windows allow (each window is `PERIOD + margin` long in the proxy): one
    // window's worth at once, then the rate.
    let cycle = PERIOD + margin;
    let possible = QUOTA as f64 * (1.0 + (run - cycle).as_secs_f64() / cycle.as_secs_f64());
    let goodput = served as f64 / possible;
    assert!(
        goodput >= 0.98,
        "goodput {goodput:.3} ({served} of {possible:.0})"
    );
    assert_eq!(failed, 0, "a worker's request failed");
    assert_quota_kept(&sim);
    for p in proxies {
        p.stop().await;
    }
}

/// Redis flushed (FLUSHALL) under load: the log and the line are gone, the instances
/// write back their recent starts and register their waiters again before anything
/// more is granted: nothing lost, no window over, no 429 from SmartLead.
#[tokio::test]
async fn a_flushall_under_load_loses_no_waiter_and_keeps_every_window() {
    fault_under_load(Fault::Flushall).await;
}

/// Redis killed and started again (empty) under load: the instances serve their local
/// share meanwhile and rebuild the log when it is back.
#[tokio::test]
async fn a_redis_restart_under_load_loses_no_waiter_and_keeps_every_window() {
    fault_under_load(Fault::Restart).await;
}

enum Fault {
    Flushall,
    /// Down for 3 s, back empty.
    Restart,
}

/// Two instances, 16 closed-loop clients; `fault` strikes after 3 s; the load runs 6 s
/// more.
async fn fault_under_load(fault: Fault) {
    let mut redis = PrivateRedis::start().await;
    let sim = strict_sim().await;
    let key = unique_key();
    let url = redis.url();
    let member = || {
        let mut s = member_of(&sim, &url, &key);
        s.redis.lease = Duration::from_millis(900);
        s
    };
    let proxies = vec![spawn_proxy(member()).await, spawn_proxy(member()).await];
    let end = Instant::now() + Duration::from_secs(9);
    let mut workers = Vec::new();
    for i in 0..16 {
        let url = proxies[i % 2].url(&format!("/api/v1/campaigns?c=w{i}"));
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            while Instant::now() < end {
                let r = c
                    .get(&url)
                    .header("x-client-id", format!("w{i}"))
                    .send()
                    .await;
                statuses.push(r.map_or(0, |r| r.status().as_u16()));
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    match fault {
        Fault::Flushall => {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &redis.port.to_string(), "FLUSHALL"])
                .output()
                .expect("redis-cli runs");
            assert!(out.status.success());
        }
        Fault::Restart => {
            redis.kill();
            tokio::time::sleep(Duration::from_secs(3)).await;
            redis.restart().await;
        }
    }
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    // Every request was answered: a slot, or (past its max_wait) a 429 of the proxy's.
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 60,
        "{statuses:?}"
    );
    assert_quota_kept(&sim);
    for p in proxies {
        p.stop().await;
    }
}
