//! The key, second round: a hostile upstream hides it in every shape it can, and neither
//! the client (status, headers, body) nor the logs ever see it in any form; methods that
//! would carry it elsewhere are refused; a key in a path never becomes a label.

use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::Settings;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::*;

fn hostile_settings(base_url: &str) -> Settings {
    let mut s = settings(base_url);
    s.upstream.api_key = Some(ApiKey::new(HOSTILE_KEY));
    // Every hostile answer also goes through the traffic log.
    s.log.bodies = true;
    s.log.body_bytes = 4096;
    s
}

fn header_text(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .iter()
        .map(|(n, v)| format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

#[tokio::test]
async fn hostile_answers_never_show_the_key() {
    let base = hostile_upstream().await;
    let proxy = spawn_proxy(hostile_settings(&base)).await;
    for (shape, status) in SHAPES {
        let resp = client()
            .get(proxy.url(&format!("/api/v1/hostile/{shape}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), *status, "{shape}");
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap();
        let body_text = String::from_utf8_lossy(&body);
        assert_no_key(
            &header_text(&headers),
            HOSTILE_KEY,
            &format!("{shape}: headers"),
        );
        assert_no_key(&body_text, HOSTILE_KEY, &format!("{shape}: body"));
        if *status >= 300 {
            let v: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{shape}: not JSON ({e}): {body_text}"));
            assert!(v["error"]["code"].is_string(), "{shape}: {v}");
            assert_eq!(headers["content-type"], "application/json", "{shape}");
        }
        let retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap());
        match *shape {
            // The proxy's own whole seconds, capped like its own pauses (the larger of
            // limit.period, 60 s here, and retry.max_delay).
            "retry-after-huge" => assert_eq!(retry_after, Some("60")),
            "retry-after-1990" => assert_eq!(retry_after, Some("1")),
            "retry-after-negative" | "retry-after-key" | "headers-success" => {
                assert_eq!(retry_after, None, "{shape}")
            }
            "location-201" => {
                let location = headers["location"].to_str().unwrap();
                assert!(
                    location.starts_with("https://server/x/1?api_key=***"),
                    "{location}"
                );
            }
            "envelope-raw" => {
                // Still SmartLead's own envelope, only the key gone.
                assert_eq!(
                    body_text,
                    r#"{"error":{"code":"CONFLICT","message":"dup","details":{"seen":"***"}}}"#
                );
            }
            "redirect" => {
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["error"]["code"], "UPSTREAM_REDIRECT");
                assert!(headers.get("location").is_none());
            }
            _ => {}
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn connect_and_trace_are_refused_before_anything_is_spent() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let mut s = settings(&sim.base_url());
    // One slot a minute: a request that spent it would hold back the GET below.
    s.limit.one_window(1, Duration::from_secs(60));
    s.limit.max_wait = Duration::from_millis(200);
    let proxy = spawn_proxy(s).await;
    for request in [
        "CONNECT /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "CONNECT server.smartlead.ai:443 HTTP/1.1\r\nHost: server.smartlead.ai:443\r\nConnection: close\r\n\r\n",
        "TRACE /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "TRACE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_request(proxy.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{request}: {answer}");
        assert!(answer.contains("application/json"), "{answer}");
        assert!(answer.contains("METHOD_NOT_ALLOWED"), "{answer}");
        assert!(answer.contains("request_id"), "{answer}");
    }
    assert_eq!(sim.stats().requests, 0, "nothing reached SmartLead");
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200, "the quota's one slot was still free");
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_key_in_the_path_is_neither_a_label_nor_a_log_field() {
    let (sim, proxy) = sim_and_proxy().await;
    for path in [
        "/api/v1/campaigns/sim-key",
        "/api/v1/sim-key/leads",
        "/api/v1/campaigns/SIM%2dKEY/x",
    ] {
        let resp = proxy.get(path).await;
        assert!(resp.status().is_client_error(), "{path}");
    }
    assert!(sim.stats().requests >= 2);
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("/api/v1/campaigns/***"), "{metrics}");
    assert_no_key(&metrics, KEY, "/metrics");
    // The access log's route and path fields are checked with every other log line.
    proxy.stop().await;
}

#[test]
fn the_leak_checker_finds_every_form() {
    let key = HOSTILE_KEY;
    let each = |f: &dyn Fn(u8) -> String| key.bytes().map(f).collect::<String>();
    for text in [
        key.to_owned(),
        key.to_uppercase(),
        each(&|b| format!("%{b:02x}")),
        each(&|b| format!("\\u{b:04X}")),
        each(&|b| format!("&#{b};")),
        each(&|b| format!("%25{b:02X}")),
        each(&|b| format!("{b:02X}")),
        key[3..15].to_owned(),
    ] {
        assert!(key_form_in(&format!("x {text} y"), key).is_some(), "{text}");
    }
    assert!(key_form_in("x *** y", key).is_none());
    assert!(
        key_form_in(&key[..11], key).is_none(),
        "11 characters are allowed"
    );
}

/// A client's own key, in every place SmartLead reads one from.
const THEIRS: &str = "client-own-key-0123456789abcdef";

/// What the simulator received for one request: its query and body.
fn received(sim: &Sim) -> (String, String, smartlead_proxy::sim::Recorded) {
    let got = sim.requests().pop().expect("forwarded");
    let query = got.query.clone().unwrap_or_default();
    let body = String::from_utf8(got.body.to_vec()).unwrap();
    (query, body, got)
}

#[tokio::test]
async fn an_api_key_in_a_body_or_a_bracket_query_name_never_reaches_smartlead() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        s.log.bodies = true;
        s.log.level = "trace".into();
    })
    .await;
    let c = client();
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    for (content_type, body, forwarded) in [
        (
            json,
            format!(r#"{{"name":"x","api_key":"{THEIRS}"}}"#),
            r#"{"name":"x"}"#.to_owned(),
        ),
        (
            json,
            format!(r#"{{ "api_key" : "{THEIRS}" ,  "n": [1, 2] }}"#),
            r#"{ "n": [1, 2] }"#.to_owned(),
        ),
        (
            json,
            format!(r#"{{"API_KEY":"{THEIRS}","a":{{"api_key":"nested"}}}}"#),
            r#"{"a":{"api_key":"nested"}}"#.to_owned(),
        ),
        (
            json,
            format!(r#"{{"api\u005fkey":"{THEIRS}"}}"#),
            "{}".to_owned(),
        ),
        (
            form,
            format!("a=1&api_key={THEIRS}&b=2"),
            "a=1&b=2".to_owned(),
        ),
        (
            form,
            format!("api_key%5B%5D={THEIRS}&api_key[0]={THEIRS}&c=3"),
            "c=3".to_owned(),
        ),
    ] {
        for method in ["POST", "PATCH", "PUT"] {
            let resp = c
                .request(
                    method.parse().unwrap(),
                    proxy.url("/api/v1/campaigns/7/settings"),
                )
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(
                resp.status().as_u16() < 500,
                "{method} {body}: {}",
                resp.status()
            );
            let (query, got_body, got) = received(&sim);
            assert_eq!(got_body, forwarded, "{method} {body}");
            let length = got.headers["content-length"].to_str().unwrap();
            assert_eq!(length, forwarded.len().to_string(), "{method} {body}");
            assert_eq!(got.api_keys(), [KEY], "{method} {body}: {query}");
            assert!(!query.contains(THEIRS), "{query}");
        }
    }
    for name in [
        "api_key[]",
        "api_key%5B%5D",
        "api_key[0]",
        "api_key[x]",
        "API_KEY%5b0%5d",
        "api%5Fkey",
    ] {
        let resp = proxy
            .get(&format!(
                "/api/v1/campaigns?limit=5&{name}={THEIRS}&offset=0"
            ))
            .await;
        assert_eq!(resp.status(), 200, "{name}");
        let (query, _, got) = received(&sim);
        assert_eq!(got.api_keys(), [KEY], "{name}");
        assert!(
            !query.contains(THEIRS) && query.contains("limit=5&offset=0"),
            "{name}: {query}"
        );
    }
    // The traffic log, at trace, with bodies: never the client's key, in any form.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_no_key(&captured_text(), THEIRS, "the logs");
    assert_key_not_logged();
    proxy.stop().await;
}

#[tokio::test]
async fn with_client_keys_allowed_a_key_in_the_body_chooses_its_own_quota() {
    let sim = Sim::start(SimConfig {
        api_key: Some(THEIRS.into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = settings(&sim.base_url());
    s.upstream.api_key = None;
    s.upstream.allow_client_key = true;
    let proxy = spawn_proxy(s).await;
    let c = client();
    for (content_type, body, forwarded) in [
        (
            "application/json",
            format!(r#"{{"lead_list":[],"api_key":"{THEIRS}"}}"#),
            r#"{"lead_list":[]}"#,
        ),
        (
            "application/x-www-form-urlencoded",
            format!("api_key={THEIRS}&x=1"),
            "x=1",
        ),
    ] {
        let resp = c
            .post(proxy.url("/api/v1/campaigns/7/settings"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        // The simulator checks the key before the route: not 401 means it was taken.
        assert_ne!(resp.status(), 401, "SmartLead saw the client's key");
        let (_, got_body, got) = received(&sim);
        assert_eq!(got_body, forwarded);
        assert_eq!(got.api_keys(), [THEIRS], "moved to the query");
    }
    let status: Value = proxy.get_json("/status.json").await;
    let names: Vec<&str> = status["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("key:")),
        "its own quota: {names:?}"
    );
    assert_no_key(&status.to_string(), THEIRS, "/status.json");
    proxy.stop().await;
}

/// An upstream that answers 200 with `first`, then a moment later `second`, as two
/// chunks of one body (so the proxy gets them as two pieces).
async fn two_chunk_upstream(first: String, second: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (first, second) = (first.clone(), second.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                let chunk = |c: &str| format!("{:x}\r\n{c}\r\n", c.len());
                let _ = s
                    .write_all(format!("{head}{}", chunk(&first)).as_bytes())
                    .await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = s
                    .write_all(format!("{}0\r\n\r\n", chunk(&second)).as_bytes())
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        }
    });
    format!("http://{addr}/api/v1")
}

#[tokio::test]
async fn a_key_echoed_in_a_success_body_is_replaced_even_split_across_chunks() {
    let body =
        format!(r#"{{"id":7,"webhook_url":"https://hooks.example/in?api_key={KEY}","name":"x"}}"#);
    let masked = "*".repeat(KEY.len());
    let want = &format!(
        r#"{{"id":7,"webhook_url":"https://hooks.example/in?api_key={masked}","name":"x"}}"#
    );
    let split = body.find(KEY).unwrap() + KEY.len() / 2;
    let (first, second) = body.split_at(split);
    let base = two_chunk_upstream(first.to_owned(), second.to_owned()).await;
    let proxy = spawn_proxy(settings(&base)).await;
    let resp = client()
        .get(proxy.url("/api/v1/webhooks/7"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(&text, want);
    assert_no_key(&text, KEY, "the 200 body");
    proxy.stop().await;
    // A whole body with a Content-Length: the length it gets is the scrubbed one's.
    let (sim, proxy) = sim_and_proxy().await;
    sim.push_fault(smartlead_proxy::sim::Fault::respond(
        200,
        Some("application/json"),
        body,
    ));
    let resp = proxy
        .get_with("/api/v1/campaigns/7", &[("accept-encoding", "gzip, br")])
        .await;
    assert_eq!(resp.status(), 200);
    let length = resp.headers().get("content-length").cloned();
    let text = resp.text().await.unwrap();
    assert_eq!(&text, want);
    let length = length.expect("the answer keeps its Content-Length");
    assert_eq!(length.to_str().unwrap(), want.len().to_string());
    assert!(
        !sim.requests()[0].headers.contains_key("accept-encoding"),
        "asked for an uncompressed body it can read"
    );
    proxy.stop().await;
}
