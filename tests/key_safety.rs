//! The key, second round: a hostile upstream hides it in every shape it can, and neither
//! the client (status, headers, body) nor the logs ever see it in any form; methods that
//! would carry it elsewhere are refused; a key in a path never becomes a label.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use smartlead_proxy::Settings;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};

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
