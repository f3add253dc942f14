//! SmartLead-aware extras: the lead-import guard, auto-batching, and a quota that follows
//! SmartLead's own `x-ratelimit-*` headers.

use std::time::Duration;

use serde_json::{Value, json};
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::{client, expect_envelope, quota_settings, sim_and_proxy_with, spawn_proxy};

const IMPORT: &str = "/api/v1/campaigns/1001/leads";

fn leads(n: usize) -> Value {
    let list: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("lead{i}@example.com"), "first_name": format!("L{i}")}))
        .collect();
    json!({"lead_list": list})
}

async fn post(proxy: &crate::support::Proxy, body: &Value) -> reqwest::Response {
    client()
        .post(proxy.url(IMPORT))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_imports_are_refused_before_spending_quota() {
    let (sim, proxy) = sim_and_proxy_with(|_| {}).await;
    let mut body = leads(3);
    body["lead_list"][2]
        .as_object_mut()
        .unwrap()
        .remove("email");
    let v = expect_envelope(post(&proxy, &body).await, 400, "VALIDATION_ERROR").await;
    assert_eq!(v["error"]["details"]["field"], "lead_list[2].email");
    assert_eq!(v["error"]["details"]["constraint"], "required");
    assert!(v["error"]["details"]["request_id"].is_string());

    body["lead_list"][2]["email"] = json!("someone@@example");
    let v = expect_envelope(post(&proxy, &body).await, 400, "VALIDATION_ERROR").await;
    assert_eq!(v["error"]["details"]["constraint"], "format");

    let v = expect_envelope(post(&proxy, &leads(401)).await, 400, "VALIDATION_ERROR").await;
    assert_eq!(v["error"]["details"]["field"], "lead_list");
    assert_eq!(v["error"]["details"]["constraint"], "max_items");
    assert_eq!(v["error"]["details"]["max_items"], 400);

    let v = expect_envelope(
        post(&proxy, &json!({"lead_list": "a@example.com"})).await,
        400,
        "VALIDATION_ERROR",
    )
    .await;
    assert_eq!(v["error"]["details"]["field"], "lead_list");
    assert_eq!(sim.stats().requests, 0, "nothing reached SmartLead");

    // A good import, and other methods and paths, go through untouched.
    let (status, v) = proxy.post_json(IMPORT, &leads(400)).await;
    assert_eq!(status, 200);
    assert_eq!(v["upload_count"], 400);
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn validation_can_be_turned_off() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.leads.validate = false).await;
    let resp = post(&proxy, &json!({"lead_list": [{"first_name": "x"}]})).await;
    // SmartLead's own answer (the simulator's 422), not the proxy's 400.
    expect_envelope(resp, 422, "VALIDATION_ERROR").await;
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn big_imports_are_batched_and_merged() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.leads.auto_batch = true).await;
    let mut body = leads(1000);
    body["settings"] = json!({"ignore_global_block_list": true});
    let resp = post(&proxy, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-lead-batches"], "3");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["upload_count"], 1000);
    assert_eq!(v["total_leads"], 1000);
    let batches = v["batches"].as_array().unwrap();
    let ranges: Vec<_> = batches.iter().map(|b| b["leads"].clone()).collect();
    assert_eq!(
        ranges,
        vec![
            json!("lead_list[0..400]"),
            json!("lead_list[400..800]"),
            json!("lead_list[800..1000]")
        ]
    );
    // Sent in order, each whole, with the other fields kept.
    let sent = sim.requests();
    assert_eq!(sent.len(), 3);
    for (n, r) in sent.iter().enumerate() {
        let b: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            b["lead_list"][0]["email"],
            format!("lead{}@example.com", n * 400)
        );
        assert_eq!(b["settings"]["ignore_global_block_list"], true);
    }
    // Importing the same leads again is harmless: all already there.
    let again: Value = post(&proxy, &body).await.json().await.unwrap();
    assert_eq!(again["upload_count"], 0);
    assert_eq!(again["already_added_to_campaign"], 1000);
    proxy.stop().await;
}

#[tokio::test]
async fn a_failed_batch_says_what_was_sent() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.leads.auto_batch = true).await;
    // The first batch goes through; the second meets a (non-retried) 500.
    sim.push_fault(
        Fault::delay(Duration::ZERO)
            .on("/campaigns/1001/leads")
            .times(1),
    );
    sim.push_fault(Fault::html(500).on("/campaigns/1001/leads").times(1));
    let v = expect_envelope(post(&proxy, &leads(1000)).await, 500, "UPSTREAM_ERROR").await;
    let d = &v["error"]["details"];
    assert_eq!(d["failed_batch"], 2);
    assert_eq!(d["batches"], 3);
    assert_eq!(d["imported"], "lead_list[0..400]");
    assert_eq!(d["not_imported"], "lead_list[400..1000]");
    assert_eq!(d["upstream_status"], 500);
    assert_eq!(d["completed"]["upload_count"], 400);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("batch 2 of 3"), "{message}");
    assert_eq!(sim.stats().requests, 2, "the third batch was never sent");
    proxy.stop().await;
}

/// The simulator allows 4 per second; the proxy (or `proxies` sharing one Redis) is
/// configured for 12.
pub(crate) async fn converge(follow: bool, proxies: usize) -> (usize, usize, usize) {
    let sim = Sim::start(SimConfig {
        requests: 4,
        period: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = crate::support::unique_key();
    let redis = (proxies > 1).then_some((crate::support::SHARED_REDIS, key.as_str()));
    let mut running = Vec::new();
    for _ in 0..proxies {
        let mut s = quota_settings(&sim.base_url(), 12, Duration::from_secs(1), redis);
        s.limit.follow_upstream = follow;
        s.limit.max_wait = Duration::from_secs(60);
        s.retry.max_retries = 10;
        running.push(spawn_proxy(s).await);
    }
    let c = client();
    let started = tokio::time::Instant::now();
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let proxy = &running[i % proxies];
            let (c, url) = (c.clone(), proxy.url("/api/v1/campaigns"));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        if call.await.unwrap() == 200 {
            ok += 1;
        }
    }
    let late = started + Duration::from_millis(1500);
    let records = sim.requests();
    let limited = records.iter().filter(|r| r.rate_limited).count();
    let limited_late = records
        .iter()
        .filter(|r| r.rate_limited && r.at > late)
        .count();
    for proxy in running {
        proxy.stop().await;
    }
    (ok, limited, limited_late)
}

#[tokio::test]
async fn quota_follows_a_smaller_upstream_limit_without_a_429_storm() {
    let (ok, limited, late) = converge(true, 1).await;
    assert_eq!(ok, 24, "every request succeeded");
    // Only the opening burst (sent before SmartLead's limit was known) can meet 429s.
    assert!(limited <= 8, "{limited} upstream 429s");
    assert_eq!(late, 0, "no 429s once the limit was learnt");
}

#[tokio::test]
async fn without_following_remaining_zero_still_pauses() {
    let (ok, limited, _) = converge(false, 1).await;
    assert_eq!(ok, 24, "every request succeeded, by pausing and retrying");
    // Each window's burst of 12 meets the limit of 4 before the pause; it is bounded,
    // but far more than when following.
    assert!(limited > 8, "{limited} upstream 429s");
}

/// The proxy's own 429 reports the limit it enforces: SmartLead's smaller one once it is
/// followed, not `limit.requests`.
#[tokio::test]
async fn a_429_reports_the_limit_in_force_once_smartleads_is_followed() {
    let sim = Sim::start(SimConfig {
        requests: 4,
        period: Duration::from_secs(10),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = quota_settings(&sim.base_url(), 12, Duration::from_secs(10), None);
    s.limit.follow_upstream = true;
    s.limit.max_wait = Duration::from_millis(500);
    let proxy = spawn_proxy(s).await;
    // The first answer carries x-ratelimit-limit: 4, which the proxy adopts.
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let mut refused = None;
    for _ in 0..6 {
        let resp = proxy.get("/api/v1/campaigns").await;
        if resp.status() == 429 && resp.headers().contains_key("ratelimit-limit") {
            refused = Some(resp);
            break;
        }
    }
    let resp = refused.expect("the proxy refused once 4 slots were taken");
    assert_eq!(resp.headers()["ratelimit-limit"], "4");
    assert_eq!(resp.headers()["ratelimit-policy"], "4;w=10");
    expect_envelope(resp, 429, "RATE_LIMITED").await;
    proxy.stop().await;
}
