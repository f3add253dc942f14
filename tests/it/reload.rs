//! Reloading while serving: new windows reschedule requests already waiting, accounts
//! come and go without dropping a waiter, tokens, retries, leads and caps change, a bad
//! configuration keeps the running one, restart-only settings keep their values.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};
use smartlead_proxy::config::{AccountSettings, Window};
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

const KEY_B: &str = "key-of-b";

async fn sim() -> Sim {
    Sim::start(SimConfig {
        more_keys: vec![KEY_B.into()],
        requests: 10_000,
        record: true,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn get(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let mut req = client().get(proxy.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// Sends `n` GETs at once in the background; each gives its status, its
/// `details.reason` (for a 429) and when it was answered.
fn background(
    proxy: &Proxy,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<tokio::task::JoinHandle<(u16, Option<String>, Instant)>> {
    (0..n)
        .map(|_| {
            let req = get(proxy, "/api/v1/campaigns", headers);
            tokio::spawn(async move {
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let reason = body["error"]["details"]["reason"]
                    .as_str()
                    .map(str::to_owned);
                (status, reason, Instant::now())
            })
        })
        .collect()
}

const OK_RELOADS: &str = "smartlead_proxy_config_reloads_total{result=\"ok\"}";
const FAILED_RELOADS: &str = "smartlead_proxy_config_reloads_total{result=\"error\"}";

async fn metric(proxy: &Proxy, line: &str) -> Option<f64> {
    let text = proxy.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn looser_windows_let_waiting_requests_go_sooner() {
    looser_windows(None).await;
}

pub(crate) async fn looser_windows(redis: Option<String>) {
    let sim = sim().await;
    let redis = redis.as_deref().map(|key| (SHARED_REDIS, key));
    let mut s = quota_settings(&sim.base_url(), 2, Duration::from_secs(2), redis);
    let (proxy, reload) = spawn_reloadable(s.clone()).await;
    let ok_before = metric(&proxy, OK_RELOADS).await.unwrap_or(0.0);
    let started = Instant::now();
    // 2 per 2 s: the last of 8 would start 6 s from now.
    let waiting = background(&proxy, 8, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.limit.windows = vec![Window::new(20, Duration::from_secs(1))];
    reload.to(s).await;
    for w in waiting {
        let (status, _, _) = w.await.unwrap();
        assert_eq!(status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "rescheduled under 20/1s: {:?}",
        started.elapsed()
    );
    // The registry is the test process's: other tests reload too.
    assert!(metric(&proxy, OK_RELOADS).await.unwrap() >= ok_before + 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn tighter_windows_hold_for_waiters_and_refuse_those_pushed_past_their_deadline() {
    let sim = sim().await;
    let mut s = quota_settings(&sim.base_url(), 4, Duration::from_secs(1), None);
    s.limit.max_wait = Duration::from_millis(2500);
    let (proxy, reload) = spawn_reloadable(s.clone()).await;
    // 4 per second: 12 requests start at 0, 1 and 2 s (+ margin), all within max_wait.
    let waiting = background(&proxy, 12, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloaded = Instant::now();
    s.limit.windows = vec![Window::new(2, Duration::from_secs(1))];
    reload.to(s).await;
    let (mut served, mut refused) = (0, 0);
    for w in waiting {
        match w.await.unwrap() {
            (200, _, _) => served += 1,
            (429, reason, at) => {
                refused += 1;
                assert_eq!(reason.as_deref(), Some("max_wait"));
                assert!(
                    at.duration_since(reloaded) < Duration::from_millis(800),
                    "refused when its slot moved, not at its deadline"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(served + refused, 12);
    assert!(
        refused >= 2 && served >= 8,
        "served {served}, refused {refused}"
    );
    // Every start after the reload keeps to 2 per second (+ the margin).
    let after = tokio::time::Instant::from_std(reloaded + Duration::from_millis(150));
    assert!(max_in_window(&sim, Duration::from_secs(1), Some(after)) <= 2);
    proxy.stop().await;
}

fn with_account_b(s: &mut smartlead_proxy::Settings, tokens: &[&str]) {
    s.accounts.push(AccountSettings {
        name: "b".into(),
        key_env: "KEY_B".into(),
        windows: Some(vec![Window::new(1, Duration::from_secs(2))]),
        tokens: tokens.iter().map(|t| SecretString::from(*t)).collect(),
        key: Some(ApiKey::new(KEY_B)),
    });
}

#[tokio::test]
async fn a_removed_account_finishes_its_waiters_and_an_added_one_serves() {
    let sim = sim().await;
    let mut s = quota_settings(&sim.base_url(), 100, Duration::from_secs(1), None);
    with_account_b(&mut s, &[]);
    let (proxy, reload) = spawn_reloadable(s.clone()).await;
    // b allows 1 per 2 s: two of these three wait.
    let waiting = background(&proxy, 3, &[("x-smartlead-account", "b")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.accounts.clear();
    s.accounts.push(AccountSettings {
        name: "c".into(),
        key_env: "KEY_C".into(),
        windows: None,
        tokens: vec![],
        key: Some(ApiKey::new(KEY_B)),
    });
    reload.to(s).await;
    let gone = get(&proxy, "/api/v1/campaigns", &[("x-smartlead-account", "b")])
        .send()
        .await
        .unwrap();
    let body = expect_envelope(gone, 400, "BAD_REQUEST").await;
    assert_eq!(body["error"]["details"]["account"], "b");
    let added = get(&proxy, "/api/v1/campaigns", &[("x-smartlead-account", "c")])
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200, "b's waiters finish on b's quota");
    }
    let b_starts: Vec<_> = sim
        .requests()
        .iter()
        .filter(|r| r.api_keys() == [KEY_B])
        .map(|r| r.at)
        .collect();
    assert_eq!(b_starts.len(), 4, "3 for b, 1 for c");
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_retries_leads_and_caps_change_on_reload() {
    let sim = sim().await;
    let mut s = quota_settings(&sim.base_url(), 100, Duration::from_secs(1), None);
    s.server.access_tokens = vec![SecretString::from("old-token")];
    let (proxy, reload) = spawn_reloadable(s.clone()).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let with = |t: &str| get(&proxy, "/api/v1/campaigns", &[]).header("authorization", bearer(t));
    assert_eq!(with("old-token").send().await.unwrap().status(), 200);

    s.server.access_tokens = vec![SecretString::from("ui:new-token")];
    s.retry.max_retries = 2;
    s.leads.max_per_request = 2;
    s.limit.per_client = Some(Window::new(1, Duration::from_secs(60)));
    reload.to(s).await;

    let old = with("old-token").send().await.unwrap();
    expect_envelope(old, 401, "UNAUTHORIZED").await;
    sim.push_fault(Fault::json(503, json!({"message": "busy"})));
    let retried = with("new-token").send().await.unwrap();
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.headers()["x-proxy-attempts"], "2", "retries on");
    // The token's name is the client, now capped at 1 a minute.
    let capped = with("new-token").send().await.unwrap();
    let body = expect_envelope(capped, 429, "RATE_LIMITED").await;
    assert_eq!(body["error"]["details"]["reason"], "client_cap");
    let leads =
        json!({"lead_list": [{"email": "a@x.io"}, {"email": "b@x.io"}, {"email": "c@x.io"}]});
    let import = client()
        .post(proxy.url("/api/v1/campaigns/1/leads"))
        .header("authorization", bearer("ui:new-token"))
        .header("x-client-id", "importer")
        .json(&leads)
        .send()
        .await
        .unwrap();
    assert_eq!(import.status(), 400, "at most 2 leads now");
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_configuration_keeps_the_running_one_and_restart_only_keys_are_kept() {
    let sim = sim().await;
    let s = quota_settings(&sim.base_url(), 100, Duration::from_secs(1), None);
    let (proxy, reload) = spawn_reloadable(s.clone()).await;
    let failed_before = metric(&proxy, FAILED_RELOADS).await.unwrap_or(0.0);
    reload
        .failing("\"0/1s\" is not a whole number of requests above 0")
        .await;
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    assert!(metric(&proxy, FAILED_RELOADS).await.unwrap() >= failed_before + 1.0);
    assert!(any_log_contains(
        "reload refused, the running configuration stays"
    ));
    assert!(any_log_contains("limit.windows"));

    let mut moved = s.clone();
    moved.server.listen = "127.0.0.1:1".parse().unwrap();
    moved.limit.max_wait = Duration::from_secs(7);
    reload.to(moved).await;
    assert_eq!(
        proxy.get("/api/v1/campaigns").await.status(),
        200,
        "same address"
    );
    assert!(any_log_contains("take effect only at start"));
    assert!(any_log_contains("server.listen"));
    proxy.stop().await;
}
