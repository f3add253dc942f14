//! One fair line for the whole fleet: instances sharing `redis.key` on a real Redis serve
//! their waiters in one fair order (clients, weights, priority classes), a dead instance
//! holds nobody back, and a lost log (FLUSHALL, a restarted Redis) is rebuilt before
//! anything more is granted. Every test also checks that SmartLead (the simulator, at 10
//! per second) never saw more than its quota in a window and never answered 429.

mod accounts;
mod cache;
mod fairness;
mod faults;
mod leads;
mod modes;
mod process;
mod quota;
mod reload;
mod status;
mod tls;

use std::collections::HashMap;
use std::time::Duration;

use smartlead_proxy::Settings;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::*;

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
    // Turns by weight were even: Jain's index near 1, as either instance tells it.
    let status: serde_json::Value = b.get_json("/status.json").await;
    let fairness = &status["fleet_fairness"]["default"];
    assert!(fairness["jain"].as_f64().unwrap_or(0.0) >= 0.9, "{status}");
    assert!(fairness["clients"].as_u64().unwrap_or(0) >= 2, "{status}");
    let metrics = a.get("/metrics").await.text().await.unwrap();
    for needle in [
        "smartlead_proxy_fleet_grants_total{instance=",
        "smartlead_proxy_fleet_requests_total{path=\"fast\"}",
        "smartlead_proxy_fleet_requests_total{path=\"queued\"}",
        "smartlead_proxy_fleet_round_trips_total{path=\"queued\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from {metrics}");
    }
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
    let _heavy = crate::support::heavy().await;
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
                let mut failed = Vec::new();
                while Instant::now() < end {
                    let r = c.get(&url).header("x-client-id", &id).send().await;
                    match r {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => failed.push(format!(
                            "{}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                failed
            }));
        }
    }
    let mut failed = Vec::new();
    for w in workers {
        failed.extend(w.await.unwrap());
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
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );
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

/// One request of the model run.
#[derive(Debug, Clone)]
struct Asked {
    instance: usize,
    client: usize,
    class: usize,
    arrived: Instant,
    deadline: Instant,
    /// When it started (`Ok`) or was refused (`Err`).
    done: Result<Instant, Instant>,
}

/// A model of the fleet's line against a real Redis (no HTTP): three instances, each its
/// own link, random arrivals of six clients with weights 1–3, three classes and deadlines
/// of 0.2–3 s at 5 slots per 200 ms; instance 2 dies (its runtime is dropped: no goodbye)
/// halfway. Every deadline is honoured, no slot goes unused while anyone waits, and a
/// class's waiters are never passed by a client's later requests beyond their turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_line_keeps_deadlines_slots_and_turns_under_random_arrivals() {
    let _heavy = crate::support::heavy().await;
    use smartlead_proxy::accounts::Accounts;
    use smartlead_proxy::client::{ClientId, Priority, Who};
    let key = unique_key();
    let period = Duration::from_millis(200);
    let lease = Duration::from_millis(600);
    let settings = || {
        let mut s = quota_settings("http://127.0.0.1:9", 5, period, Some((SHARED_REDIS, &key)));
        s.limit.margin = Duration::ZERO;
        s.redis.lease = lease;
        s
    };
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let start = Instant::now() + Duration::from_millis(300);
    let death = start + Duration::from_millis(2500);
    let plan: Vec<(usize, usize, usize, Duration, Duration)> = (0..240)
        .map(|i| {
            let at = Duration::from_millis(i * 20 + rand(20));
            let class = match rand(20) {
                0..=2 => 0,
                3..=16 => 1,
                _ => 2,
            };
            let wait = Duration::from_millis(200 + rand(2800));
            (rand(3) as usize, rand(6) as usize, class, at, wait)
        })
        .collect();
    let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Asked>::new()));
    let run = |instance: usize, handle: tokio::runtime::Handle| {
        let account = Accounts::new(&settings()).unwrap().all()[0].clone();
        let mine: Vec<_> = plan.iter().filter(|p| p.0 == instance).cloned().collect();
        let records = records.clone();
        handle.clone().spawn(async move {
            let tasks: Vec<_> = mine
                .into_iter()
                .map(|(instance, client, class, at, wait)| {
                    let (account, records) = (account.clone(), records.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep_until(start + at).await;
                        let who = Who {
                            client: ClientId::Named(format!("c{client}").into()),
                            priority: Priority::ALL[class],
                            weight: 1 + client as u32 % 3,
                        };
                        let arrived = Instant::now();
                        let deadline = arrived + wait;
                        let r = account.limiter.acquire(deadline, &who).await;
                        let done = if r.is_ok() {
                            Ok(Instant::now())
                        } else {
                            Err(Instant::now())
                        };
                        records.lock().unwrap().push(Asked {
                            instance,
                            client,
                            class,
                            arrived,
                            deadline,
                            done,
                        });
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let survivors = [
        run(0, tokio::runtime::Handle::current()),
        run(1, tokio::runtime::Handle::current()),
    ];
    let _dies = {
        let _in = doomed.enter();
        run(2, doomed.handle().clone())
    };
    tokio::time::sleep_until(death).await;
    doomed.shutdown_background();
    for s in survivors {
        s.await.unwrap();
    }
    let all = records.lock().unwrap().clone();
    let mine: Vec<&Asked> = all.iter().filter(|a| a.instance < 2).collect();
    assert!(mine.len() > 100, "{} answered", mine.len());
    // Deadlines: a start by the deadline, a refusal no later than just after it.
    for a in &mine {
        match a.done {
            Ok(at) => assert!(at <= a.deadline + Duration::from_millis(30), "{a:?}"),
            Err(at) => assert!(
                at <= a.deadline + Duration::from_millis(150),
                "late 429: {a:?}"
            ),
        }
    }
    // No slot unused while anyone waits: every 200 ms during which a survivor's request
    // waited throughout (outside the dead instance's lease) saw at least 4 of 5 starts.
    let starts: Vec<Instant> = all.iter().filter_map(|a| a.done.ok()).collect();
    let waited = |from: Instant, to: Instant| {
        mine.iter().any(|a| {
            let end = match a.done {
                Ok(t) | Err(t) => t,
            };
            a.arrived <= from && end >= to && a.done.is_ok()
        })
    };
    let mut t = start;
    let mut checked = 0;
    while t + period < start + Duration::from_secs(8) {
        let near_death = t + period > death && t < death + lease + period;
        if !near_death && waited(t, t + period) {
            let n = starts
                .iter()
                .filter(|s| **s >= t && **s < t + period)
                .count();
            assert!(
                n >= 4,
                "{n} starts in [{:?}, +200ms) while someone waited",
                t - start
            );
            checked += 1;
        }
        t += Duration::from_millis(50);
    }
    assert!(checked > 10, "the line was busy: {checked} periods checked");
    // Turns: within a class, a client's requests start in the order they came, and a
    // waiter is passed by another client's later arrivals at most a few turns' worth.
    for class in 0..3 {
        let mut served: Vec<&&Asked> = mine
            .iter()
            .filter(|a| a.class == class && a.done.is_ok())
            .collect();
        served.sort_by_key(|a| a.done.unwrap());
        for (i, a) in served.iter().enumerate() {
            for later in &served[i + 1..] {
                if later.client == a.client && later.instance == a.instance {
                    assert!(
                        later.arrived >= a.arrived,
                        "a client's order: {a:?} {later:?}"
                    );
                }
            }
            let passed = served[..i]
                .iter()
                .filter(|b| b.client != a.client && b.arrived > a.arrived)
                .count();
            let ahead = served[..i]
                .iter()
                .filter(|b| b.client == a.client && b.arrived <= a.arrived)
                .count();
            assert!(
                passed <= 3 * 6 * (ahead + 2),
                "{a:?} passed by {passed} later arrivals"
            );
        }
    }
}
