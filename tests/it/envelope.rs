//! Every non-2xx answer is the JSON envelope: upstream errors wrapped or passed through,
//! and the proxy's own errors.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use smartlead_proxy::sim::Fault;

use crate::support::*;

const TABLE: &[(u16, &str)] = &[
    (400, "BAD_REQUEST"),
    (401, "UNAUTHORIZED"),
    (403, "FORBIDDEN"),
    (404, "NOT_FOUND"),
    (409, "CONFLICT"),
    (422, "VALIDATION_ERROR"),
    (500, "UPSTREAM_ERROR"),
    (503, "UPSTREAM_ERROR"),
];

#[tokio::test]
async fn conforming_upstream_envelopes_pass_through_unchanged() {
    let (sim, proxy) = sim_and_proxy().await;
    for &(status, code) in TABLE {
        let body = json!({"error": {"code": code, "message": format!("upstream says {status}"), "details": {"field": "x"}}}).to_string();
        sim.push_fault(Fault::respond(
            status,
            Some("application/json"),
            body.clone(),
        ));
        let resp = proxy.get("/api/v1/campaigns").await;
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(
            resp.text().await.unwrap(),
            body,
            "{status} passed through byte for byte"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn non_conforming_bodies_are_wrapped_keeping_status_and_message() {
    let (sim, proxy) = sim_and_proxy().await;
    let shapes: Vec<(Option<&str>, String, Option<&str>)> = vec![
        (
            Some("text/html"),
            "<html><head><title>Gateway trouble</title></head><body>x</body></html>".into(),
            Some("Gateway trouble"),
        ),
        (
            Some("text/plain"),
            "plain words".into(),
            Some("plain words"),
        ),
        (
            Some("application/json"),
            r#"{"message":"json message"}"#.into(),
            Some("json message"),
        ),
        (
            Some("application/json"),
            r#"{"error":"string error"}"#.into(),
            Some("string error"),
        ),
        (None, String::new(), None),
    ];
    for &(status, code) in TABLE {
        for (ct, body, message) in &shapes {
            sim.push_fault(Fault::respond(status, *ct, body.clone()));
            let resp = client()
                .get(proxy.url("/api/v1/campaigns"))
                .header("x-request-id", "req-1")
                .send()
                .await
                .unwrap();
            let v = expect_envelope(resp, status, code).await;
            if let Some(m) = message {
                assert_eq!(v["error"]["message"], *m, "{status} {body}");
            }
            assert_eq!(v["error"]["details"]["upstream_status"], status);
            assert_eq!(v["error"]["details"]["request_id"], "req-1");
            assert_eq!(v["error"]["details"]["attempts"], 1);
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_details_and_rate_headers_are_kept() {
    let (sim, proxy) = sim_and_proxy().await;
    sim.push_fault(Fault::json(
        422,
        json!({"message": "bad lead", "details": {"field": "lead_list[0].email"}}),
    ));
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.headers()["x-ratelimit-limit"], "10000");
    let v = expect_envelope(resp, 422, "VALIDATION_ERROR").await;
    assert_eq!(
        v["error"]["details"]["upstream_details"]["field"],
        "lead_list[0].email"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_key_is_scrubbed_from_upstream_error_bodies() {
    let (sim, proxy) = sim_and_proxy().await;
    sim.push_fault(Fault::respond(
        400,
        Some("text/plain"),
        format!("bad request for api_key={KEY}"),
    ));
    sim.push_fault(Fault::json(
        400,
        json!({"error": {"code": "BAD_REQUEST", "message": format!("key {KEY} rejected")}}),
    ));
    sim.push_fault(Fault::respond(302, None, "").header(
        "location",
        &format!("https://elsewhere.example/x?api_key={KEY}"),
    ));
    for _ in 0..3 {
        let resp = proxy.get("/api/v1/campaigns").await;
        assert!(resp.headers().get("location").is_none());
        let text = resp.text().await.unwrap();
        assert!(!text.contains(KEY), "{text}");
        assert!(text.contains("***"), "{text}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn gzip_error_bodies_are_decoded_before_wrapping() {
    use std::io::Write;
    let (sim, proxy) = sim_and_proxy().await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"{"message":"compressed trouble"}"#)
        .unwrap();
    let body = gz.finish().unwrap();
    sim.push_fault(
        Fault::respond_bytes(500, Some("application/json"), body)
            .header("content-encoding", "gzip"),
    );
    let resp = proxy.get("/api/v1/campaigns").await;
    let v = expect_envelope(resp, 500, "UPSTREAM_ERROR").await;
    assert_eq!(v["error"]["message"], "compressed trouble");
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    let port = closed_port().await;
    let proxy = spawn_proxy(settings(&format!("http://127.0.0.1:{port}/api/v1"))).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    let v = expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(v["error"]["details"]["attempts"], 1);
    proxy.stop().await;
}

#[tokio::test]
async fn connection_reset_is_502_upstream_unavailable() {
    let (sim, proxy) = sim_and_proxy().await;
    sim.push_fault(Fault::reset());
    let resp = proxy.get("/api/v1/campaigns").await;
    expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    // The next request works on a fresh connection.
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    proxy.stop().await;
}

#[tokio::test]
async fn garbage_from_upstream_is_502_upstream_error() {
    let addr = raw_upstream(b"THIS IS NOT HTTP\r\n\r\n".to_vec(), false).await;
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    expect_envelope(resp, 502, "UPSTREAM_ERROR").await;
    proxy.stop().await;
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout_in_time() {
    let sim = smartlead_proxy::sim::Sim::start(Default::default())
        .await
        .unwrap();
    let mut s = settings(&sim.base_url());
    s.upstream.timeout = Duration::from_millis(300);
    let proxy = spawn_proxy(s).await;
    sim.push_fault(Fault::delay(Duration::from_secs(3)));
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    let v = expect_envelope(resp, 504, "UPSTREAM_TIMEOUT").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("300ms"),
        "{v}"
    );
    sim.push_fault(Fault::hang());
    let resp = proxy.get("/api/v1/campaigns").await;
    expect_envelope(resp, 504, "UPSTREAM_TIMEOUT").await;
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_without_reaching_upstream() {
    let (sim, _) = sim_and_proxy().await;
    let mut s = settings(&sim.base_url());
    s.server.max_body_bytes = 1000;
    let proxy = spawn_proxy(s).await;
    let c = client();
    let resp = c
        .post(proxy.url("/api/v1/echo"))
        .body(vec![b'a'; 1001])
        .send()
        .await
        .unwrap();
    let v = expect_envelope(resp, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(v["error"]["details"]["max_body_bytes"], 1000);

    // Chunked, so the size is only known while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b'b'; 100])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = c
        .post(proxy.url("/api/v1/echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    expect_envelope(resp, 413, "PAYLOAD_TOO_LARGE").await;

    let resp = c
        .post(proxy.url("/api/v1/echo"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "exactly the limit is fine");
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_envelopes() {
    let (sim, proxy) = sim_and_proxy().await;
    let c = client();
    for path in [
        "/",
        "/nope",
        "/api/v2/campaigns",
        "/api/v1",
        "/api/v1/",
        "/apiv1/campaigns",
    ] {
        let resp = proxy.get(path).await;
        let v = expect_envelope(resp, 404, "NOT_FOUND").await;
        assert!(v["error"]["details"]["request_id"].is_string());
    }
    let resp = c.post(proxy.url("/healthz")).send().await.unwrap();
    expect_envelope(resp, 405, "METHOD_NOT_ALLOWED").await;
    assert_eq!(sim.stats().requests, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_404_route_is_wrapped_or_passed() {
    let (_sim, proxy) = sim_and_proxy().await;
    let resp = proxy.get("/api/v1/campaigns/424242").await;
    let v: Value = {
        assert_eq!(resp.status(), 404);
        resp.json().await.unwrap()
    };
    assert_eq!(v["error"]["code"], "NOT_FOUND");
    assert_eq!(v["error"]["details"]["campaign_id"], 424242);
    proxy.stop().await;
}
