//! The response cache and the coalescing line, over real sockets in front of the
//! simulator: hits spend no quota, per-route ttls, client directives, what is never
//! stored, isolation, coalescing (with a leader that hangs up and an answer too big to
//! share), invalidation by writes, stale answers while SmartLead fails, and memory. The
//! fleet's shared cache is tested in `fleet::cache`.

use std::collections::BTreeMap;
use std::time::Duration;

use smartlead_proxy::Settings;
use smartlead_proxy::sim::{Fault, Sim};

use crate::support::*;

fn ttl(s: &mut Settings, routes: &[(&str, u64)]) {
    s.cache.ttl = routes
        .iter()
        .map(|(p, ms)| (p.to_string(), Duration::from_millis(*ms)))
        .collect::<BTreeMap<_, _>>();
    s.cache.coalesce = true;
}

pub(crate) fn calls(sim: &Sim, path: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.path == format!("/api/v1{path}") && !r.rate_limited)
        .count()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// `Cache-Status` as an RFC 8941 list: each member a token with parameters.
fn cache_status(resp: &reqwest::Response) -> Vec<(String, Vec<(String, String)>)> {
    let text = header(resp, "cache-status");
    let list = sfv::Parser::new(&text)
        .parse::<sfv::List>()
        .unwrap_or_else(|e| panic!("Cache-Status {text:?} is not an RFC 8941 list: {e}"));
    list.iter()
        .map(|member| match member {
            sfv::ListEntry::Item(item) => {
                let name = match &item.bare_item {
                    sfv::BareItem::Token(t) => t.as_str().to_owned(),
                    other => panic!("a cache's name is a token, not {other:?}"),
                };
                let params = item
                    .params
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            sfv::BareItem::Token(t) => t.as_str().to_owned(),
                            sfv::BareItem::Integer(i) => i.to_string(),
                            sfv::BareItem::Boolean(b) => b.to_string(),
                            other => format!("{other:?}"),
                        };
                        (k.as_str().to_owned(), v)
                    })
                    .collect();
                (name, params)
            }
            other => panic!("not an item: {other:?}"),
        })
        .collect()
}

/// The one member's parameters, as `name=value` (`name` alone for a true boolean).
pub(crate) fn status_of(resp: &reqwest::Response) -> Vec<String> {
    let members = cache_status(resp);
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].0, "smartlead-proxy");
    members[0]
        .1
        .iter()
        .map(|(k, v)| {
            if v == "true" {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect()
}

#[tokio::test]
async fn a_hit_spends_no_quota_and_says_so() {
    let (sim, proxy) = sim_and_proxy_with(|s| ttl(s, &[("/campaigns", 300_000)])).await;
    let first = proxy.get("/api/v1/campaigns").await;
    assert_eq!(first.status(), 200);
    assert_eq!(status_of(&first), ["fwd=uri-miss", "stored"]);
    assert_eq!(header(&first, "age"), "0");
    let first_id = header(&first, "x-request-id");
    let first_body = first.text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = proxy.get("/api/v1/campaigns").await;
    assert_eq!(second.status(), 200);
    let status = status_of(&second);
    assert_eq!(status[0], "hit");
    let left: i64 = status[1].strip_prefix("ttl=").unwrap().parse().unwrap();
    assert!((297..300).contains(&left), "{status:?}");
    assert!(header(&second, "age").parse::<u64>().unwrap() >= 1);
    assert_ne!(header(&second, "x-request-id"), first_id);
    assert_eq!(header(&second, "x-proxy-attempts"), "0");
    assert_eq!(second.text().await.unwrap(), first_body);
    assert_eq!(calls(&sim, "/campaigns"), 1);
    // A route not stored says so, and goes upstream every time.
    let other = proxy.get("/api/v1/campaigns/1001").await;
    assert_eq!(status_of(&other), ["fwd=bypass"]);
    proxy.get("/api/v1/campaigns/1001").await;
    assert_eq!(calls(&sim, "/campaigns/1001"), 2);
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    for result in ["hit", "miss", "bypass"] {
        let line = format!(
            "smartlead_proxy_cache_requests_total{{account=\"default\",result=\"{result}\"}}"
        );
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains("smartlead_proxy_cache_bytes "));
    let status: serde_json::Value = proxy.get_json("/status.json").await;
    let cache = &status["cache"]["accounts"]["default"];
    assert_eq!(cache["entries"], 1, "{status:#}");
    assert_eq!(cache["hits"], 1);
    assert_eq!(cache["saved"], 1);
    assert!(cache["bytes"].as_u64().unwrap() > first_body.len() as u64);
    // The page and the terminal view show the same.
    let page = proxy.get("/status").await.text().await.unwrap();
    assert!(
        page.contains("upstream calls saved") && page.contains("data-cache-account=\"default\"")
    );
    let snapshot: smartlead_proxy::status::Snapshot = serde_json::from_value(status).unwrap();
    let table = smartlead_proxy::status::table(&snapshot);
    assert!(
        table.contains("upstream calls saved") && table.contains("hit ratio"),
        "{table}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn each_route_keeps_its_own_ttl() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        ttl(
            s,
            &[("/campaigns", 300_000), ("/campaigns/*/analytics", 400)],
        )
    })
    .await;
    for path in ["/campaigns", "/campaigns/1001/analytics"] {
        proxy.get(&format!("/api/v1{path}")).await;
        proxy.get(&format!("/api/v1{path}")).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let analytics = proxy.get("/api/v1/campaigns/1001/analytics").await;
    assert_eq!(status_of(&analytics), ["fwd=uri-miss", "stored"]);
    let list = proxy.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&list)[0], "hit");
    assert_eq!(calls(&sim, "/campaigns"), 1);
    assert_eq!(calls(&sim, "/campaigns/1001/analytics"), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_says_no_cache_is_answered_by_smartlead() {
    let (sim, proxy) = sim_and_proxy_with(|s| ttl(s, &[("/campaigns", 300_000)])).await;
    proxy.get("/api/v1/campaigns").await;
    for directive in ["no-cache", "max-age=0", "no-store"] {
        let resp = proxy
            .get_with("/api/v1/campaigns", &[("cache-control", directive)])
            .await;
        assert_eq!(resp.status(), 200);
        let expected: &[&str] = if directive == "no-store" {
            &["fwd=request"]
        } else {
            &["fwd=request", "stored"]
        };
        assert_eq!(status_of(&resp), expected, "{directive}");
    }
    assert_eq!(calls(&sim, "/campaigns"), 4);
    // The refreshed entry answers the next plain request.
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&resp)[0], "hit");
    assert_eq!(calls(&sim, "/campaigns"), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn what_smartlead_refuses_or_marks_private_is_not_stored() {
    let (sim, proxy) = sim_and_proxy_with(|s| ttl(s, &[("/campaigns/**", 300_000)])).await;
    for _ in 0..2 {
        let resp = proxy.get("/api/v1/campaigns/999999/analytics").await;
        assert_eq!(resp.status(), 404);
        assert_eq!(status_of(&resp), ["fwd=uri-miss"]);
    }
    assert_eq!(calls(&sim, "/campaigns/999999/analytics"), 2);
    for (name, value) in [("cache-control", "private"), ("set-cookie", "sid=1")] {
        sim.push_fault(
            Fault::respond(200, Some("application/json"), "{\"ok\":1}")
                .header(name, value)
                .on("/campaigns/1002"),
        );
        let resp = proxy.get("/api/v1/campaigns/1002").await;
        assert_eq!(status_of(&resp), ["fwd=uri-miss"], "{name}");
    }
    let resp = proxy.get("/api/v1/campaigns/1002").await;
    assert_eq!(status_of(&resp), ["fwd=uri-miss", "stored"]);
    proxy.stop().await;
}

#[tokio::test]
async fn accounts_and_client_keys_never_share_entries() {
    let sim = Sim::start(smartlead_proxy::sim::SimConfig {
        requests: 10_000,
        more_keys: vec!["client-key-one".into(), "client-key-two".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = settings(&sim.base_url());
    ttl(&mut s, &[("/campaigns", 300_000)]);
    s.upstream.allow_client_key = true;
    s.accounts.push(smartlead_proxy::config::AccountSettings {
        name: "b".into(),
        key_env: "KEY_B".into(),
        windows: None,
        tokens: vec![],
        key: Some(smartlead_proxy::key::ApiKey::new("client-key-two")),
    });
    let proxy = spawn_proxy(s).await;
    for key in ["client-key-one", "client-key-two", "client-key-one"] {
        proxy.get(&format!("/api/v1/campaigns?api_key={key}")).await;
    }
    let keys: Vec<Vec<String>> = sim.requests().iter().map(|r| r.api_keys()).collect();
    assert_eq!(
        keys,
        [
            vec!["client-key-one".to_string()],
            vec!["client-key-two".to_string()]
        ]
    );
    // The proxy's own account has its own entry too, and so has a named one, although
    // its key is one a client also sent.
    let own = proxy.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&own), ["fwd=uri-miss", "stored"]);
    for _ in 0..2 {
        let named = proxy
            .get_with("/api/v1/campaigns", &[("x-smartlead-account", "b")])
            .await;
        assert_eq!(named.status(), 200);
    }
    let named = proxy
        .get_with("/api/v1/campaigns", &[("x-smartlead-account", "b")])
        .await;
    assert_eq!(status_of(&named)[0], "hit");
    assert_eq!(sim.requests().len(), 4);
    let status = proxy.get("/status.json").await.text().await.unwrap();
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    for text in [&status, &metrics] {
        assert!(!text.contains("client-key-"), "a client key shown:\n{text}");
    }
    assert_key_not_logged();
    proxy.stop().await;
}

/// `n` identical GETs at once; their statuses and `Cache-Status` members.
pub(crate) async fn at_once(proxy: &Proxy, path: &str, n: usize) -> Vec<(u16, Vec<String>, usize)> {
    let calls = (0..n).map(|_| async {
        let resp = proxy.get(path).await;
        let status = resp.status().as_u16();
        let cache = status_of(&resp);
        let len = resp.bytes().await.unwrap().len();
        (status, cache, len)
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test]
async fn twenty_identical_gets_in_flight_make_one_upstream_call() {
    let (sim, proxy) = sim_and_proxy_with(|s| ttl(s, &[("/campaigns", 300_000)])).await;
    for path in ["/campaigns", "/campaigns/1001/leads"] {
        sim.push_fault(Fault::delay(Duration::from_millis(400)).on(path));
        let answers = at_once(&proxy, &format!("/api/v1{path}"), 20).await;
        assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
        assert_eq!(calls(&sim, path), 1, "{path}");
        let collapsed = answers
            .iter()
            .filter(|(_, c, _)| c.contains(&"collapsed".to_string()))
            .count();
        assert_eq!(collapsed, 19, "{answers:?}");
    }
    let status: serde_json::Value = proxy.get_json("/status.json").await;
    assert_eq!(status["cache"]["accounts"]["default"]["collapsed"], 38);
    assert_eq!(status["cache"]["accounts"]["default"]["saved"], 38);
    proxy.stop().await;
}

#[tokio::test]
async fn followers_are_answered_when_the_leaders_caller_hangs_up() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.cache.coalesce = true).await;
    sim.push_fault(Fault::delay(Duration::from_millis(600)).on("/campaigns"));
    let leader = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let url = proxy.url("/api/v1/campaigns");
    let gone = leader.get(&url).send();
    let followers = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        at_once(&proxy, "/api/v1/campaigns", 5).await
    };
    let (gone, answers) = tokio::join!(gone, followers);
    assert!(gone.is_err(), "the leader's caller was meant to hang up");
    assert!(
        answers
            .iter()
            .all(|(s, c, _)| *s == 200 && c.contains(&"collapsed".into())),
        "{answers:?}"
    );
    assert_eq!(calls(&sim, "/campaigns"), 1);
    // With nobody following, a caller that hangs up takes its call with it: the
    // simulator never answers it, and a later request leads anew.
    sim.push_fault(Fault::delay(Duration::from_millis(600)).on("/campaigns"));
    assert!(leader.get(&url).send().await.is_err());
    let after = proxy.get("/api/v1/campaigns").await;
    assert_eq!(after.status(), 200);
    assert_eq!(status_of(&after), ["fwd=bypass"]);
    proxy.stop().await;
}

#[tokio::test]
async fn an_answer_too_big_to_share_sends_followers_upstream() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        ttl(s, &[("/campaigns", 300_000)]);
        s.cache.max_entry_bytes = 64;
    })
    .await;
    sim.push_fault(Fault::delay(Duration::from_millis(300)).on("/campaigns"));
    let answers = at_once(&proxy, "/api/v1/campaigns", 8).await;
    let whole = answers[0].2;
    assert!(whole > 64);
    assert!(
        answers
            .iter()
            .all(|(s, c, len)| *s == 200 && *len == whole && !c.contains(&"stored".into())),
        "{answers:?}"
    );
    let first_round = calls(&sim, "/campaigns");
    assert!((2..=8).contains(&first_round), "{first_round}");
    // For a while the key has no line: identical requests go upstream on their own.
    sim.push_fault(
        Fault::delay(Duration::from_millis(200))
            .on("/campaigns")
            .times(4),
    );
    let answers = at_once(&proxy, "/api/v1/campaigns", 4).await;
    assert!(
        answers
            .iter()
            .all(|(_, c, _)| !c.contains(&"collapsed".into()))
    );
    assert_eq!(calls(&sim, "/campaigns"), first_round + 4);
    proxy.stop().await;
}

#[tokio::test]
async fn writes_make_what_they_touch_stale_before_they_are_answered() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        ttl(
            s,
            &[
                ("/campaigns", 300_000),
                ("/campaigns/*/analytics", 60_000),
                ("/campaigns/*/leads", 60_000),
            ],
        )
    })
    .await;
    let list = proxy.get("/api/v1/campaigns").await.text().await.unwrap();
    proxy.get("/api/v1/campaigns/1002/analytics").await;
    let created = client()
        .post(proxy.url("/api/v1/campaigns/create"))
        .json(&serde_json::json!({"name": "New"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let after = proxy.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&after), ["fwd=uri-miss", "stored"]);
    let after = after.text().await.unwrap();
    assert_ne!(after, list);
    assert!(after.contains("\"New\""));
    // Another campaign's analytics did not move.
    let other = proxy.get("/api/v1/campaigns/1002/analytics").await;
    assert_eq!(status_of(&other)[0], "hit");

    // A lead import: the campaign's leads and analytics, and the list, are asked again.
    let before = proxy
        .get("/api/v1/campaigns/1001/leads")
        .await
        .text()
        .await
        .unwrap();
    proxy.get("/api/v1/campaigns/1001/analytics").await;
    let imported = client()
        .post(proxy.url("/api/v1/campaigns/1001/leads"))
        .json(&serde_json::json!({"lead_list": [{"email": "a@example.com", "first_name": "A", "company_name": "C"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);
    for path in [
        "/campaigns/1001/leads",
        "/campaigns/1001/analytics",
        "/campaigns",
    ] {
        let resp = proxy.get(&format!("/api/v1{path}")).await;
        assert_eq!(status_of(&resp), ["fwd=uri-miss", "stored"], "{path}");
    }
    let leads = proxy
        .get("/api/v1/campaigns/1001/leads")
        .await
        .text()
        .await
        .unwrap();
    assert_ne!(leads, before);
    assert!(leads.contains("a@example.com"));
    assert_eq!(calls(&sim, "/campaigns/1002/analytics"), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn an_expired_answer_is_served_while_smartlead_fails() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        ttl(s, &[("/campaigns", 300)]);
        s.cache.stale_if_error = Duration::from_secs(30);
    })
    .await;
    let fresh = proxy.get("/api/v1/campaigns").await.text().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1400)).await;
    sim.push_fault(Fault::respond(503, Some("text/plain"), "down").on("/campaigns"));
    let stale = proxy.get("/api/v1/campaigns").await;
    assert_eq!(stale.status(), 200);
    let status = status_of(&stale);
    assert_eq!(status[0], "hit");
    let left: i64 = status[1].strip_prefix("ttl=").unwrap().parse().unwrap();
    assert!(left < 0, "{status:?}");
    assert_eq!(stale.text().await.unwrap(), fresh);
    // Unreachable counts as failing too.
    sim.push_fault(Fault::reset().on("/campaigns"));
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    // A 4xx is SmartLead's answer, not a failure: it is passed on.
    sim.push_fault(Fault::respond(400, Some("application/json"), "{}").on("/campaigns"));
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 400);
    let status: serde_json::Value = proxy.get_json("/status.json").await;
    assert_eq!(status["cache"]["accounts"]["default"]["stale"], 2);
    proxy.stop().await;
}

/// Two instances sharing `redis.key` on a private Redis, each with the cache on.
pub(crate) async fn two_on_redis(
    routes: &[(&str, u64)],
) -> (Sim, PrivateRedis, Proxy, Proxy, String) {
    let sim = Sim::start(smartlead_proxy::sim::SimConfig {
        requests: 10_000,
        ..Default::default()
    })
    .await
    .unwrap();
    let redis = PrivateRedis::start().await;
    let key = unique_key();
    let member = || {
        let mut s = quota_settings(
            &sim.base_url(),
            10_000,
            Duration::from_secs(60),
            Some((&redis.url(), &key)),
        );
        ttl(&mut s, routes);
        s
    };
    let (a, b) = (spawn_proxy(member()).await, spawn_proxy(member()).await);
    (sim, redis, a, b, key)
}

/// No Redis key or value holds the proxy's key.
pub(crate) async fn assert_key_nowhere_in(redis: &PrivateRedis) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let mut cache_keys = 0;
    for key in keys {
        let text = String::from_utf8_lossy(&key).into_owned();
        assert!(!text.contains(KEY), "a key's name holds it: {text}");
        cache_keys += usize::from(text.contains(":c:"));
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let dumped: Vec<u8> = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            _ => redis::cmd("DUMP")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
        };
        let dumped = String::from_utf8_lossy(&dumped);
        assert!(!dumped.contains(KEY), "{text} holds the key");
    }
    assert!(cache_keys >= 1, "no cache entry in Redis");
}

#[tokio::test]
async fn a_hit_waits_in_no_queue_while_the_quota_is_spent() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        ttl(s, &[("/campaigns", 300_000)]);
        s.limit.one_window(1, Duration::from_secs(20));
        s.limit.max_wait = Duration::from_secs(60);
    })
    .await;
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    // The window's one slot is spent: this one waits in the line...
    let waiting = tokio::spawn({
        let url = proxy.url("/api/v1/campaigns/1001");
        async move { client().get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while a hit is answered at once, and is never counted as a start.
    let began = std::time::Instant::now();
    let hit = proxy.get("/api/v1/campaigns").await;
    assert_eq!(status_of(&hit)[0], "hit");
    assert!(
        began.elapsed() < Duration::from_millis(500),
        "{:?}",
        began.elapsed()
    );
    let status: serde_json::Value = proxy.get_json("/status.json").await;
    assert_eq!(status["accounts"][0]["waiting"], 1, "{status:#}");
    assert_eq!(status["accounts"][0]["windows"][0]["used"], 1);
    assert_eq!(calls(&sim, "/campaigns"), 1);
    waiting.abort();
    proxy.stop().await;
}

/// Until `proxy`'s limiter says Redis answers again.
pub(crate) async fn until_shared(proxy: &Proxy) {
    for _ in 0..100 {
        let status: serde_json::Value = proxy.get_json("/status.json").await;
        if status["limiter"]["state"] == "shared" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Redis never answered again");
}
