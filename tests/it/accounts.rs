//! SmartLead's real quotas: several windows at once, several accounts (by header and by
//! token), a quota per client key, in one process (on Redis: `fleet::accounts`). Real sockets,
//! the simulator enforcing the same windows per key.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use smartlead_proxy::Settings;
use smartlead_proxy::config::{AccountSettings, LimitBackend, Window};
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::limiter::log::{SlotLog, Span};
use smartlead_proxy::sim::{Fault, Sim, SimConfig};
use tokio::time::Instant;

use crate::support::*;

pub(crate) const KEY_A: &str = "account-a-key-0001";
pub(crate) const KEY_B: &str = "account-b-key-0002";

/// A simulator accepting both accounts' keys, each with `windows` of its own.
pub(crate) async fn two_key_sim(windows: &[(u32, Duration)]) -> Sim {
    Sim::start(SimConfig {
        api_key: Some(KEY_A.into()),
        more_keys: vec![KEY_B.into()],
        windows: windows.to_vec(),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn windows(w: &[(u32, Duration)]) -> Vec<Window> {
    w.iter().map(|(n, p)| Window::new(*n, *p)).collect()
}

/// `default` (KEY_A) and `b` (KEY_B, with `tokens`), both on `w`.
pub(crate) fn two_accounts(base_url: &str, w: &[(u32, Duration)], tokens: &[&str]) -> Settings {
    let mut s = quota_settings(base_url, 1, Duration::from_secs(1), None);
    s.upstream.api_key = Some(ApiKey::new(KEY_A));
    s.limit.windows = windows(w);
    s.accounts.push(AccountSettings {
        name: "b".into(),
        key_env: "KEY_B".into(),
        windows: None,
        tokens: tokens.iter().map(|t| SecretString::from(*t)).collect(),
        key: Some(ApiKey::new(KEY_B)),
    });
    s.validate().unwrap();
    s
}

/// Sends `n` GETs at once, each with `headers`; returns the statuses.
pub(crate) async fn burst(
    proxy: &Proxy,
    path: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<u16> {
    let c = client();
    let calls = (0..n).map(|_| {
        let mut req = c.get(proxy.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    });
    futures_util::future::join_all(calls).await
}

/// How long the reservation log itself needs for `n` requests arriving together.
fn ideal(w: &[(u32, Duration)], n: u64) -> Duration {
    let spans = w
        .iter()
        .map(|(l, p)| Span::new(*l as usize, p.as_micros() as u64))
        .collect();
    let mut log = SlotLog::new(spans);
    let last = (0..n).map(|i| log.reserve(i, 0, u64::MAX).unwrap()).max();
    Duration::from_micros(last.unwrap_or(0))
}

#[tokio::test]
async fn three_windows_at_once_are_all_kept() {
    let w = [
        (3, Duration::from_secs(1)),
        (5, Duration::from_secs(2)),
        (7, Duration::from_secs(4)),
    ];
    let sim = two_key_sim(&w).await;
    let mut s = two_accounts(&sim.base_url(), &w, &[]);
    s.limit.max_wait = Duration::from_secs(30);
    let proxy = spawn_proxy(s).await;
    let started = Instant::now();
    let statuses = burst(&proxy, "/api/v1/campaigns", 12, &[]).await;
    let took = started.elapsed();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(sim.stats().rate_limited, 0, "no upstream 429s");
    for (n, period) in w {
        assert!(
            max_in_window(&sim, period, None) <= n as usize,
            "{n}/{period:?}"
        );
    }
    let ideal = ideal(&w, 12);
    assert!(
        took <= ideal.mul_f64(1.3) + Duration::from_millis(300),
        "{took:?} for an ideal {ideal:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_default_windows_keep_to_smartleads_standard_plan() {
    // SmartLead's 10 per second and 60 per minute; the proxy's defaults add 1000 per hour.
    let w = [(10, Duration::from_secs(1)), (60, Duration::from_secs(60))];
    let sim = two_key_sim(&w).await;
    let mut s = two_accounts(&sim.base_url(), &w, &[]);
    s.limit.windows = Settings::default().limit.windows;
    assert_eq!(s.limit.windows.len(), 3);
    let proxy = spawn_proxy(s).await;
    let statuses = burst(&proxy, "/api/v1/campaigns", 25, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        sim.stats().rate_limited,
        0,
        "no upstream 429s in a burst of 25"
    );
    assert!(max_in_window(&sim, Duration::from_secs(1), None) <= 10);
    proxy.stop().await;
}

#[tokio::test]
async fn two_accounts_have_two_quotas() {
    let w = [(4, Duration::from_secs(2))];
    let sim = two_key_sim(&w).await;
    let proxy = spawn_proxy(two_accounts(&sim.base_url(), &w, &[])).await;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        burst(&proxy, "/api/v1/campaigns", 8, &[]),
        burst(
            &proxy,
            "/api/v1/campaigns",
            8,
            &[("x-smartlead-account", "b")]
        ),
    );
    let took = started.elapsed();
    assert!(a.iter().chain(&b).all(|s| *s == 200), "{a:?} {b:?}");
    assert_eq!(sim.stats().rate_limited, 0);
    let keys: Vec<String> = sim.requests().iter().flat_map(|r| r.api_keys()).collect();
    assert_eq!(keys.iter().filter(|k| *k == KEY_A).count(), 8);
    assert_eq!(keys.iter().filter(|k| *k == KEY_B).count(), 8);
    // Two quotas of 4 per 2 s: two windows' time. One shared quota would need four.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        took < Duration::from_millis(4500),
        "{took:?}: one quota, not two"
    );
    assert!(
        sim.requests()
            .iter()
            .all(|r| !r.headers.contains_key("x-smartlead-account")),
        "the header is the proxy's"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_choose_accounts_and_refusals_send_nothing() {
    let w = [(100, Duration::from_secs(1))];
    let sim = two_key_sim(&w).await;
    let mut s = two_accounts(&sim.base_url(), &w, &["token-b"]);
    s.server.access_tokens = vec![SecretString::from("token-all")];
    let proxy = spawn_proxy(s).await;
    let c = client();
    let get = |token: Option<&str>, account: Option<&str>| {
        let mut req = c.get(proxy.url("/api/v1/campaigns"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(a) = account {
            req = req.header("x-smartlead-account", a);
        }
        req.send()
    };
    let last_key = |sim: &Sim| sim.requests().last().unwrap().api_keys();
    assert_eq!(get(Some("token-b"), None).await.unwrap().status(), 200);
    assert_eq!(last_key(&sim), [KEY_B], "the token's account");
    assert_eq!(
        get(Some("token-all"), Some("b")).await.unwrap().status(),
        200
    );
    assert_eq!(last_key(&sim), [KEY_B], "the header's account");
    assert_eq!(get(Some("token-all"), None).await.unwrap().status(), 200);
    assert_eq!(last_key(&sim), [KEY_A], "default");
    assert_eq!(get(Some("token-b"), Some("b")).await.unwrap().status(), 200);
    let sent = sim.stats().requests;
    let forbidden = expect_envelope(
        get(Some("token-b"), Some("default")).await.unwrap(),
        403,
        "FORBIDDEN",
    )
    .await;
    assert_eq!(forbidden["error"]["details"]["token_account"], "b");
    let unknown = expect_envelope(
        get(Some("token-all"), Some("nope")).await.unwrap(),
        400,
        "BAD_REQUEST",
    )
    .await;
    assert_eq!(unknown["error"]["details"]["account"], "nope");
    expect_envelope(get(None, Some("b")).await.unwrap(), 401, "UNAUTHORIZED").await;
    expect_envelope(get(Some("wrong"), None).await.unwrap(), 401, "UNAUTHORIZED").await;
    assert_eq!(sim.stats().requests, sent, "no refusal reached SmartLead");
    assert!(
        sim.requests()
            .iter()
            .all(|r| !r.headers.contains_key("authorization")),
        "the proxy's token is not forwarded"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_429_pauses_only_its_own_account() {
    let w = [(100, Duration::from_secs(1))];
    let sim = two_key_sim(&w).await;
    // Two named accounts and no default: the metrics registry is shared by every test of
    // this binary, and these names are this test's alone.
    let mut s = quota_settings(&sim.base_url(), 1, Duration::from_secs(1), None);
    s.upstream.api_key = None;
    s.limit.windows = windows(&w);
    s.retry.max_retries = 3;
    s.retry.max_delay = Duration::from_secs(5);
    for (name, key) in [("paused", KEY_B), ("other", KEY_A)] {
        s.accounts.push(AccountSettings {
            name: name.into(),
            key_env: name.to_uppercase(),
            windows: None,
            tokens: Vec::new(),
            key: Some(ApiKey::new(key)),
        });
    }
    s.validate().unwrap();
    let proxy = spawn_proxy(s).await;
    // The first request of "paused" meets SmartLead's 429 with Retry-After: 2.
    sim.push_fault(
        Fault::respond(429, Some("application/json"), r#"{"message":"slow down"}"#)
            .header("retry-after", "2")
            .on("/campaigns/1001"),
    );
    let c = client();
    let paused = {
        let req = c
            .get(proxy.url("/api/v1/campaigns/1001"))
            .header("x-smartlead-account", "paused");
        tokio::spawn(async move {
            let started = Instant::now();
            let status = req.send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let other = c
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-smartlead-account", "other")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the other account was not paused: {:?}",
        started.elapsed()
    );
    let (status, took) = paused.await.unwrap();
    assert_eq!(status, 200, "its request was retried after the pause");
    assert!(took >= Duration::from_millis(1900), "paused: {took:?}");
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    for (series, wanted) in [
        (
            "smartlead_proxy_unexpected_upstream_429_total{account=\"paused\"} 1",
            true,
        ),
        (
            "smartlead_proxy_upstream_pauses_total{account=\"paused\"} 1",
            true,
        ),
        (
            "smartlead_proxy_upstream_pauses_total{account=\"other\"}",
            false,
        ),
    ] {
        assert_eq!(metrics.contains(series), wanted, "{series}:\n{metrics}");
    }
    assert!(any_log_contains("SmartLead refused at"), "the warning");
    proxy.stop().await;
}

#[tokio::test]
async fn a_429_names_the_window_that_held_it_back() {
    let w = [(2, Duration::from_secs(1)), (3, Duration::from_secs(30))];
    let sim = two_key_sim(&w).await;
    let mut s = two_accounts(&sim.base_url(), &w, &[]);
    s.limit.max_wait = Duration::from_secs(5);
    let proxy = spawn_proxy(s).await;
    let statuses = burst(&proxy, "/api/v1/campaigns", 3, &[]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // The fourth must wait for the 30-second window, past its max_wait.
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.headers()["ratelimit-limit"], "3");
    assert_eq!(resp.headers()["ratelimit-policy"], "2;w=1, 3;w=30");
    let body = expect_envelope(resp, 429, "RATE_LIMITED").await;
    assert_eq!(body["error"]["details"]["window"], "3/30s");
    assert_eq!(body["error"]["details"]["account"], "default");
    proxy.stop().await;
}

/// With `upstream.allow_client_key`, each client key gets a quota of its own, known only
/// by a keyed hash: no metric, log line or Redis key ever shows a key.
pub(crate) async fn client_keys_get_quotas_of_their_own(redis: bool) {
    const ONE: &str = "client-key-one-4f9a2c";
    const TWO: &str = "client-key-two-8b7e1d";
    let w = [(3, Duration::from_secs(2))];
    let sim = Sim::start(SimConfig {
        api_key: Some(ONE.into()),
        more_keys: vec![TWO.into()],
        windows: w.to_vec(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let redis_key = unique_key();
    let mut s = quota_settings(&sim.base_url(), 1, Duration::from_secs(1), None);
    s.upstream.api_key = None;
    s.upstream.allow_client_key = true;
    s.limit.windows = windows(&w);
    if redis {
        s.limit.backend = LimitBackend::Redis;
        s.redis.key = redis_key.clone();
    }
    s.validate().unwrap();
    let proxy = spawn_proxy(s).await;
    let (one, two) = (
        format!("/api/v1/campaigns?api_key={ONE}"),
        format!("/api/v1/campaigns?api_key={TWO}"),
    );
    let started = Instant::now();
    let (a, b) = tokio::join!(burst(&proxy, &one, 6, &[]), burst(&proxy, &two, 6, &[]));
    let took = started.elapsed();
    assert!(a.iter().chain(&b).all(|s| *s == 200), "{a:?} {b:?}");
    assert_eq!(sim.stats().rate_limited, 0);
    // Two quotas of 3 per 2 s: one window's wait each. One shared quota: three.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        took < Duration::from_millis(4500),
        "{took:?}: one quota, not two"
    );
    let ready: Value = proxy.get_json("/readyz").await;
    let names: Vec<&str> = ready["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("key:") && n.len() == 12)
            .count(),
        2,
        "{ready}"
    );
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("account=\"key:"), "{metrics}");
    let mut seen = vec![metrics, ready.to_string()];
    if redis {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                "6379",
                "--scan",
                "--pattern",
                &format!("{{{redis_key}:*"),
            ])
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(names.contains(":key:"), "client-key logs in Redis: {names}");
        seen.push(names);
    }
    proxy.stop().await;
    seen.push(captured_text());
    for text in &seen {
        for key in [ONE, TWO] {
            assert_no_key(text, key, "metrics, readyz, Redis key names or logs");
        }
    }
}

#[tokio::test]
async fn client_keys_get_quotas_of_their_own_locally() {
    client_keys_get_quotas_of_their_own(false).await;
}

/// With `allow_client_key`, keys SmartLead refuses give their slot back at once, and when
/// every slot is held the least recently used key with no waiter gives way: 1,000 junk
/// keys answered 401 used to hold every slot for an hour (503, Retry-After: 3630).
#[tokio::test]
async fn refused_and_idle_client_keys_give_their_slots_to_new_ones() {
    let _heavy = crate::support::heavy().await;
    const REAL: [&str; 4] = [
        "real-key-one-1a2b3c4d",
        "real-key-two-5e6f7a8b",
        "real-key-three-9c0d1e",
        "real-key-four-2f3a4b5c",
    ];
    let sim = Sim::start(SimConfig {
        api_key: Some(REAL[0].into()),
        more_keys: REAL[1..].iter().map(|k| k.to_string()).collect(),
        requests: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = quota_settings(&sim.base_url(), 10_000, Duration::from_secs(3600), None);
    s.upstream.api_key = None;
    s.upstream.allow_client_key = true;
    s.limit.max_client_keys = 1000;
    // 1,000 connections opened at once can overflow the simulator's accept backlog while
    // other tests run; a dropped SYN is sent again after a second.
    s.upstream.connect_timeout = Duration::from_secs(5);
    let proxy = spawn_proxy(s.clone()).await;
    let c = client();
    let junk: Vec<u16> = futures_util::future::join_all((0..1000).map(|i| {
        let url = proxy.url(&format!("/api/v1/campaigns?api_key=junk-key-{i:06}-xxxxxx"));
        let c = c.clone();
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    let odd: Vec<&u16> = junk.iter().filter(|s| **s != 401).collect();
    assert!(odd.is_empty(), "SmartLead refused them: {odd:?}");
    let resp = proxy
        .get(&format!("/api/v1/campaigns?api_key={}", REAL[0]))
        .await;
    assert_eq!(resp.status(), 200, "a real key gets a slot at once");
    proxy.stop().await;

    // Every slot held by a key in good standing: the least recently used gives way.
    s.limit.max_client_keys = 3;
    let proxy = spawn_proxy(s).await;
    for key in REAL {
        let resp = proxy.get(&format!("/api/v1/campaigns?api_key={key}")).await;
        assert_eq!(resp.status(), 200, "{key}");
    }
    let ready: Value = proxy.get_json("/readyz").await;
    let keys = ready["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"].as_str().unwrap().starts_with("key:"))
        .count();
    assert_eq!(keys, 3, "{ready}");
    proxy.stop().await;
    for key in REAL {
        assert_no_key(&captured_text(), key, "the logs");
    }
}
