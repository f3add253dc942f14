//! Sharing one quota fairly: clients (by `X-Client-Id`, token name or peer address) take
//! turns in each account's line, `X-Priority` orders classes, weights share turns,
//! `limit.per_client` caps a client with governor and `limit.max_queue_per_client`
//! bounds its share of the line. Real sockets, the simulator.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use smartlead_proxy::Settings;
use smartlead_proxy::config::Window;
use smartlead_proxy::sim::{Sim, SimConfig};
use tokio::time::Instant;

use crate::support::*;

/// A simulator without a limit of its own (for tests of order, not of the quota).
pub(crate) async fn unlimited_sim() -> Sim {
    Sim::start(SimConfig {
        requests: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// A proxy whose quota is `requests` per `period`, with no margin: for order tests
/// against an unlimited simulator.
fn exact(sim: &Sim, requests: u32, period: Duration) -> Settings {
    let mut s = quota_settings(&sim.base_url(), requests, period, None);
    s.limit.margin = Duration::ZERO;
    s
}

/// GET /api/v1/campaigns?c=<tag> with `headers`: the status, the body and when it came.
pub(crate) async fn get(
    proxy: &Proxy,
    tag: &str,
    headers: &[(&str, &str)],
) -> (u16, Value, Instant) {
    let mut req = client().get(proxy.url(&format!("/api/v1/campaigns?c={tag}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("the proxy answers");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body, Instant::now())
}

/// Starts `n` requests of client `id` (tagged `id`) at once, each with `extra` headers.
pub(crate) fn queue(
    proxy: &Proxy,
    id: &str,
    n: usize,
    extra: &[(&'static str, &'static str)],
) -> Vec<tokio::task::JoinHandle<(u16, Value, Instant)>> {
    (0..n)
        .map(|_| {
            let (url, id, extra) = (proxy.url(""), id.to_owned(), extra.to_vec());
            tokio::spawn(async move {
                let mut req = client().get(format!("{url}/api/v1/campaigns?c={id}"));
                req = req.header("x-client-id", &id);
                for (k, v) in extra {
                    req = req.header(k, v);
                }
                let resp = req.send().await.expect("the proxy answers");
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                (status, body, Instant::now())
            })
        })
        .collect()
}

pub(crate) async fn all(
    tasks: Vec<tokio::task::JoinHandle<(u16, Value, Instant)>>,
) -> Vec<(u16, Value)> {
    let mut out = Vec::new();
    for t in tasks {
        let (status, body, _) = t.await.unwrap();
        out.push((status, body));
    }
    out
}

async fn metrics(proxy: &Proxy) -> String {
    proxy.get("/metrics").await.text().await.unwrap()
}

#[tokio::test]
async fn an_interactive_client_is_not_stuck_behind_a_bulk_one() {
    // SmartLead's own limit, enforced by the simulator: 10 per 2 s.
    let period = Duration::from_secs(2);
    let sim = Sim::start(SimConfig {
        requests: 10,
        period,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = spawn_proxy(quota_settings(&sim.base_url(), 10, period, None)).await;
    let bulk = queue(&proxy, "bulk", 60, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depth = metrics(&proxy).await;
    let waiting: f64 = depth
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"smartlead_proxy_limiter_queue_depth{account="default",priority="normal"} "#,
            )
        })
        .expect("queue depth by account and priority")
        .parse()
        .unwrap();
    assert!(waiting >= 40.0, "bulk's requests wait in line: {waiting}");
    let asked = Instant::now();
    let (status, _, answered) = get(&proxy, "ui", &[("x-client-id", "ui")]).await;
    let took = answered - asked;
    assert_eq!(status, 200);
    // One window (plus the margin and a loaded machine's slack); FIFO would be ~10 s.
    assert!(
        took < period + Duration::from_millis(900),
        "the interactive request waited {took:?}"
    );
    let bulk = all(bulk).await;
    assert!(
        bulk.iter().all(|(s, _)| *s == 200),
        "bulk still gets all 60"
    );
    assert_eq!(sim.stats().rate_limited, 0, "no upstream 429s");
    assert!(
        max_in_window(&sim, period, None) <= 10,
        "no window over the quota"
    );
    let m = metrics(&proxy).await;
    for client in ["bulk", "ui"] {
        assert!(
            m.contains(&format!(
                r#"smartlead_proxy_client_wait_seconds_count{{client="{client}"}}"#
            )),
            "waits per client: {client}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn weights_share_the_turns() {
    let sim = unlimited_sim().await;
    let mut s = exact(&sim, 20, Duration::from_secs(1));
    s.limit.client_weights = HashMap::from([("heavy".to_owned(), 4)]);
    let proxy = spawn_proxy(s).await;
    // A filler takes this window's slots, so both clients are in line (whatever order
    // their requests arrive in) before the next window serves anyone.
    let mut tasks = queue(&proxy, "filler", 20, &[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    tasks.extend(queue(&proxy, "heavy", 45, &[]));
    tasks.extend(queue(&proxy, "light", 45, &[]));
    let done = all(tasks).await;
    assert!(done.iter().all(|(s, _)| *s == 200));
    let order = seen_order(&sim);
    // While both wait: the first 50 served after the filler.
    let shared: Vec<&String> = order[20..70].iter().collect();
    let heavy = shared.iter().filter(|c| **c == "heavy").count() as f64;
    let light = shared.iter().filter(|c| **c == "light").count() as f64;
    // Four slots in five, within a tenth: which window edge the 50 straddle moves a
    // slot or two (41:9 is as right as 40:10).
    let share = heavy / (heavy + light);
    assert!(
        (0.72..=0.88).contains(&share),
        "4:1 weights gave {heavy}:{light} ({share:.2})"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_high_priority_request_jumps_two_busy_clients() {
    let sim = unlimited_sim().await;
    let proxy = spawn_proxy(exact(&sim, 1, Duration::from_millis(200))).await;
    let mut busy = queue(&proxy, "a", 8, &[]);
    busy.extend(queue(&proxy, "b", 8, &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sim.requests().len();
    let asked = Instant::now();
    let (status, _, answered) = get(
        &proxy,
        "urgent",
        &[("x-client-id", "urgent"), ("x-priority", "high")],
    )
    .await;
    assert_eq!(status, 200);
    let order = seen_order(&sim);
    let at = order.iter().position(|c| c == "urgent").unwrap();
    assert!(
        at <= before + 1,
        "urgent went {} after it arrived: {order:?}",
        at - before
    );
    assert!(answered - asked < Duration::from_millis(700));
    all(busy).await;
    // And a low one goes after the others, but for the floor: once three slots have
    // passed it by, it has the next.
    let before = sim.requests().len();
    let mut busy = queue(&proxy, "a", 6, &[]);
    busy.extend(queue(&proxy, "low", 1, &[("x-priority", "low")]));
    busy.extend(queue(&proxy, "b", 6, &[]));
    all(busy).await;
    let order = &seen_order(&sim)[before..];
    let at = order.iter().position(|c| c == "low").unwrap();
    assert!((2..=4).contains(&at), "low went at {at}: {order:?}");
    proxy.stop().await;
}

/// Sends `n` requests of `client` one after the other as fast as they are queued (each
/// gets its place in line before the next is sent).
async fn queue_in_order(
    proxy: &Proxy,
    client: &'static str,
    n: usize,
    extra: &'static [(&'static str, &'static str)],
) -> Vec<tokio::task::JoinHandle<(u16, Value, Instant)>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.extend(queue(proxy, client, 1, extra));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tasks
}

/// A bulk client that marks its own requests `high` (anybody can send the header):
/// with `limit.high_priority_clients` its `high` is `normal`, so an interactive client
/// takes turns with it; without the list the floor still gives the interactive one a
/// slot within four. On the local backend and on Redis.
pub(crate) async fn self_made_priority(redis: Option<&str>) {
    let sim = unlimited_sim().await;
    let key = unique_key();
    let settings = |listed: &[&str]| {
        let mut s = quota_settings(
            &sim.base_url(),
            1,
            Duration::from_millis(100),
            redis.map(|url| (url, key.as_str())),
        );
        s.limit.margin = Duration::ZERO;
        s.limit.high_priority_clients = listed.iter().map(|c| c.to_string()).collect();
        s
    };
    for listed in [&["ui"][..], &[]] {
        sim.reset();
        let proxy = spawn_proxy(settings(listed)).await;
        let bulk = queue_in_order(&proxy, "bulk", 16, &[("x-priority", "high")]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let before = sim.requests().len();
        let (status, ..) = get(&proxy, "batch", &[("x-client-id", "batch")]).await;
        assert_eq!(status, 200);
        let order = seen_order(&sim);
        let at = order[before..].iter().position(|c| c == "batch").unwrap();
        let most = if listed.is_empty() { 3 } else { 1 };
        assert!(
            at <= most,
            "{listed:?}: batch went {at} after it came: {order:?}"
        );
        if !listed.is_empty() {
            // A listed client's high still goes first.
            let before = sim.requests().len();
            let (status, ..) = get(
                &proxy,
                "ui",
                &[("x-client-id", "ui"), ("x-priority", "high")],
            )
            .await;
            assert_eq!(status, 200);
            let order = seen_order(&sim);
            let at = order[before..].iter().position(|c| c == "ui").unwrap();
            assert!(at <= 1, "ui went {at} after it came: {order:?}");
        }
        all(bulk).await;
        proxy.stop().await;
    }
}

#[tokio::test]
async fn self_made_high_priority_neither_jumps_nor_starves_on_the_local_backend() {
    self_made_priority(None).await;
}

#[tokio::test]
async fn a_waiter_moved_past_its_deadline_is_refused_then() {
    let sim = unlimited_sim().await;
    let proxy = spawn_proxy(exact(&sim, 1, Duration::from_millis(500))).await;
    let (status, ..) = get(&proxy, "a", &[("x-client-id", "a")]).await;
    assert_eq!(status, 200);
    // a's second request may wait 1.2 s: its slot, at 0.5 s, fits.
    let asked = Instant::now();
    let patient = tokio::spawn({
        let url = proxy.url("/api/v1/campaigns?c=a");
        async move {
            let resp = client()
                .get(url)
                .header("x-client-id", "a")
                .header("x-request-timeout", "1.2")
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap(), Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two high-priority requests take 0.5 s and 1.0 s: a's moves to 1.5 s.
    let urgent = queue(&proxy, "urgent", 2, &[("x-priority", "high")]);
    let (status, body, refused_at) = patient.await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["details"]["reason"], "max_wait");
    let after = refused_at - asked;
    assert!(
        after < Duration::from_millis(900),
        "refused when its slot moved, not at its deadline: {after:?}"
    );
    assert!(all(urgent).await.iter().all(|(s, _)| *s == 200));
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_over_its_cap_is_refused_at_once_and_alone() {
    let (_sim, proxy) = sim_and_proxy_with(|s| {
        s.limit.per_client = Some(Window::new(3, Duration::from_secs(10)));
    })
    .await;
    for _ in 0..3 {
        let (status, ..) = get(&proxy, "g", &[("x-client-id", "greedy")]).await;
        assert_eq!(status, 200);
    }
    let asked = Instant::now();
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-client-id", "greedy")
        .send()
        .await
        .unwrap();
    assert!(asked.elapsed() < Duration::from_millis(500), "at once");
    let retry_after = retry_after(&resp);
    assert!(
        (1..=4).contains(&retry_after),
        "governor's wait: {retry_after}"
    );
    assert_eq!(resp.headers()["ratelimit-limit"], "3");
    let body = expect_envelope(resp, 429, "RATE_LIMITED").await;
    let details = &body["error"]["details"];
    assert_eq!(details["reason"], "client_cap");
    assert_eq!(details["client"], "greedy");
    assert_eq!(details["window"], "3/10s");
    for _ in 0..3 {
        let (status, ..) = get(&proxy, "p", &[("x-client-id", "polite")]).await;
        assert_eq!(status, 200, "others are untouched");
    }
    // No header: the peer address is the client, and it has its own bucket.
    let (status, ..) = get(&proxy, "peer", &[]).await;
    assert_eq!(status, 200);
    let m = metrics(&proxy).await;
    assert!(
        m.contains(
            r#"smartlead_proxy_quota_rejected_total{reason="client_cap",account="default"} 1"#
        ) || m.contains(
            r#"smartlead_proxy_quota_rejected_total{account="default",reason="client_cap"} 1"#
        ),
        "{m}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn token_names_and_peers_are_clients() {
    let (_sim, proxy) = sim_and_proxy_with(|s| {
        s.server.access_tokens = vec![
            SecretString::from("alice:tok-alice-1"),
            SecretString::from("plain-token-2"),
        ];
        s.limit.per_client = Some(Window::new(2, Duration::from_secs(30)));
    })
    .await;
    let call = |token: &'static str| {
        let url = proxy.url("/api/v1/campaigns");
        async move {
            let resp = client().get(url).bearer_auth(token).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    // Alice presents her token, or the whole "name:token": either way she is "alice".
    assert_eq!(call("tok-alice-1").await.0, 200);
    assert_eq!(call("alice:tok-alice-1").await.0, 200);
    let (status, body) = call("tok-alice-1").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["details"]["client"], "alice");
    // A plain token's requests are the peer's.
    assert_eq!(call("plain-token-2").await.0, 200);
    assert_eq!(call("plain-token-2").await.0, 200);
    let (status, body) = call("plain-token-2").await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["details"]["client"], "127.0.0.1");
    assert_eq!(call("wrong").await.0, 401);
    proxy.stop().await;
}

#[tokio::test]
async fn one_clients_queue_bound_leaves_the_others_alone() {
    let sim = unlimited_sim().await;
    let mut s = exact(&sim, 1, Duration::from_millis(300));
    s.limit.max_queue_per_client = 3;
    let proxy = spawn_proxy(s).await;
    let (status, ..) = get(&proxy, "a", &[("x-client-id", "a")]).await;
    assert_eq!(status, 200, "takes the free slot");
    let a = queue(&proxy, "a", 6, &[]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = queue(&proxy, "b", 3, &[]);
    let a = all(a).await;
    let full: Vec<&Value> = a
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(full.len(), 3, "{a:?}");
    assert_eq!(a.iter().filter(|(s, _)| *s == 200).count(), 3);
    for body in full {
        assert_eq!(body["error"]["details"]["reason"], "queue_full");
        assert_eq!(body["error"]["details"]["client"], "a");
    }
    assert!(all(b).await.iter().all(|(s, _)| *s == 200), "b untouched");
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxys_client_headers_never_reach_smartlead() {
    let (sim, proxy) = sim_and_proxy().await;
    let (status, ..) = get(
        &proxy,
        "x",
        &[("x-client-id", "worker-1"), ("x-priority", "high")],
    )
    .await;
    assert_eq!(status, 200);
    let seen = sim.requests();
    let headers = &seen.last().unwrap().headers;
    assert!(!headers.contains_key("x-client-id"));
    assert!(!headers.contains_key("x-priority"));
    for (name, value) in [
        ("x-client-id", "has space"),
        ("x-client-id", &*"x".repeat(65)),
        ("x-priority", "urgent"),
    ] {
        let resp = client()
            .get(proxy.url("/api/v1/campaigns"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        let body = expect_envelope(resp, 400, "BAD_REQUEST").await;
        assert_eq!(body["error"]["details"]["header"], name, "{body}");
    }
    assert_eq!(sim.requests().len(), 1, "refused before anything was sent");
    proxy.stop().await;

    // With allow_priority off the header is ignored, whatever it says, and still dropped.
    let (sim, proxy) = sim_and_proxy_with(|s| s.limit.allow_priority = false).await;
    let (status, ..) = get(&proxy, "x", &[("x-priority", "urgent")]).await;
    assert_eq!(status, 200);
    assert!(!sim.requests()[0].headers.contains_key("x-priority"));
    proxy.stop().await;
}

#[tokio::test]
async fn client_labels_stay_bounded() {
    let sim = unlimited_sim().await;
    let proxy = spawn_proxy(exact(&sim, 5, Duration::from_millis(100))).await;
    let mut tasks = queue(&proxy, "filler", 5, &[]);
    for n in 0..30 {
        tasks.extend(queue(&proxy, &format!("c{n}"), 1, &[]));
    }
    assert!(all(tasks).await.iter().all(|(s, _)| *s == 200));
    let m = metrics(&proxy).await;
    let labels: std::collections::HashSet<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("smartlead_proxy_client_wait_seconds_count{client=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(labels.contains("other"), "{labels:?}");
    assert!(labels.len() <= 21, "{} labels: {labels:?}", labels.len());
    assert!(
        labels.len() >= 10,
        "busy clients have their own: {labels:?}"
    );
    proxy.stop().await;
}
