//! Debugging aids: the traffic log (truncated, key redacted, switchable per request),
//! a `details.hint` on every envelope the proxy writes or wraps, and lead warnings.

use std::time::Duration;

use serde_json::{Value, json};
use smartlead_proxy::sim::Fault;

use crate::support::{KEY, any_log_contains, client, expect_envelope, logged, sim_and_proxy_with};

/// The traffic records logged for one request, in attempt order.
fn records(request_id: &str) -> Vec<Value> {
    let mut r: Vec<Value> = logged(request_id)
        .into_iter()
        .filter(|v| v["message"] == "upstream traffic")
        .collect();
    r.sort_by_key(|v| v["attempt"].as_u64());
    r
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn traffic_log_records_every_attempt_truncated_and_redacted() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        s.log.bodies = true;
        s.log.body_bytes = 60;
        s.retry.max_retries = 2;
    })
    .await;
    let id = new_id();
    // The client puts a key of its own in the query and the proxy's key in the body.
    let body = json!({
        "lead_list": [{"email": "a@example.com", "first_name": "A", "company_name": "X"}],
        "api_key": "client-secret-1",
        "note": format!("pasted {KEY} here, then a long tail {}", "z".repeat(300)),
    });
    sim.push_fault(
        Fault::respond(503, Some("text/plain"), "down for maintenance").on("/campaigns/1001/leads"),
    );
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/1001/leads?api_key=client-secret-2&x=1"))
        .header("x-request-id", &id)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer = resp.text().await.unwrap();
    assert_eq!(sim.stats().requests, 2, "one retry after the 503");

    let recs = records(&id);
    assert_eq!(recs.len(), 2, "one record per attempt: {recs:#?}");
    // What went upstream: the body without the client's api_key member.
    let mut forwarded = body.clone();
    forwarded.as_object_mut().unwrap().remove("api_key");
    let sent = forwarded.to_string();
    for (n, r) in recs.iter().enumerate() {
        assert_eq!(r["level"], "DEBUG");
        assert_eq!(r["target"], "smartlead_proxy::traffic");
        assert_eq!(r["attempt"], n as u64 + 1);
        assert_eq!(r["method"], "POST");
        let path = r["path"].as_str().unwrap();
        assert!(path.starts_with("/api/v1/campaigns/1001/leads?"), "{path}");
        assert!(
            path.contains("api_key=***") && path.contains("x=1"),
            "{path}"
        );
        assert!(r["upstream_ms"].as_f64().is_some());
        assert_eq!(r["request_bytes"], sent.len() as u64);
        let shown = r["request_body"].as_str().unwrap();
        assert!(
            shown.ends_with(&format!("… [{} bytes in all]", sent.len())),
            "{shown}"
        );
        assert!(
            shown.chars().count() < 60 + 30,
            "cut to body_bytes: {shown}"
        );
    }
    assert_eq!(recs[0]["status"], 503);
    assert_eq!(recs[0]["response_body"], "down for maintenance");
    assert_eq!(recs[1]["status"], 200);
    assert_eq!(recs[1]["response_bytes"], answer.len() as u64);
    let shown = recs[1]["response_body"].as_str().unwrap();
    let expected: String = answer.chars().take(20).collect();
    assert!(shown.starts_with(&expected), "{shown} vs {answer}");
    assert!(
        recs[1]["total_ms"].as_f64().is_some(),
        "streamed: timed to its end"
    );

    // The body's own key fields: the client's api_key is taken out before anything is
    // logged, the proxy's key is redacted; an echo answers with the body it was sent.
    let id = new_id();
    let small = json!({"api_key": "client-secret-3", "note": KEY});
    let resp = client()
        .post(proxy.url("/api/v1/echo"))
        .header("x-request-id", &id)
        .json(&small)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let recs = records(&id);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["request_body"], r#"{"note":"***"}"#);
    for secret in ["client-secret-1", "client-secret-2", "client-secret-3", KEY] {
        assert!(!any_log_contains(secret), "{secret} was logged");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn binary_and_compressed_bodies_are_summarised() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.log.bodies = true).await;
    let id = new_id();
    let mut blob = vec![0u8, 159, 146, 150];
    blob.resize(3000, 7);
    sim.push_fault(
        Fault::respond_bytes(200, Some("application/octet-stream"), blob).on("/campaigns"),
    );
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/1001/attachments"))
        .header("x-request-id", &id)
        .header("content-type", "image/png")
        .body(vec![0x89u8, b'P', b'N', b'G', 0, 0, 0, 13])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.bytes().await.unwrap().len(),
        3000,
        "passed through whole"
    );
    let recs = records(&id);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["request_body"], "[binary: 8 bytes, image/png]");
    assert_eq!(
        recs[0]["response_body"],
        "[binary: 3000 bytes, application/octet-stream]"
    );

    let id = new_id();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"{\"ok\":true}").unwrap();
        e.finish().unwrap()
    };
    let len = gz.len();
    sim.push_fault(
        Fault::respond_bytes(200, Some("application/json"), gz)
            .header("content-encoding", "gzip")
            .on("/campaigns"),
    );
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-request-id", &id)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    resp.bytes().await.unwrap();
    let recs = records(&id);
    assert_eq!(
        recs[0]["response_body"],
        format!("[{len} bytes, gzip-encoded application/json]")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn traffic_log_off_logs_no_bodies_and_the_header_needs_permission() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.log.bodies = false).await;
    let marker = format!("marker-{}", new_id());
    let id = new_id();
    let resp = client()
        .post(proxy.url("/api/v1/echo"))
        .header("x-request-id", &id)
        .header("x-debug-log", "1")
        .body(format!("{{\"note\":\"{marker}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert!(records(&id).is_empty(), "off unless allow_debug_header");
    assert!(!logged(&id).is_empty(), "the request itself was logged");
    assert!(!any_log_contains(&marker), "no body content in the logs");
    let seen = sim.requests();
    assert!(
        seen.iter().all(|r| !r.headers.contains_key("x-debug-log")),
        "the switch is the proxy's, never forwarded"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_debug_header_switches_the_log_on_per_request() {
    let (_sim, proxy) = sim_and_proxy_with(|s| s.log.allow_debug_header = true).await;
    let (on, off) = (new_id(), new_id());
    for (id, header) in [(&on, Some("1")), (&off, None)] {
        let mut req = client()
            .get(proxy.url("/api/v1/campaigns"))
            .header("x-request-id", id);
        if let Some(v) = header {
            req = req.header("x-debug-log", v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let recs = records(&on);
    assert_eq!(recs.len(), 1);
    assert!(
        recs[0]["response_body"]
            .as_str()
            .unwrap()
            .contains("\"id\"")
    );
    assert!(records(&off).is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn an_attempt_that_gets_no_answer_is_recorded_too() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.log.bodies = true).await;
    sim.push_fault(Fault::reset());
    let id = new_id();
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/create"))
        .header("x-request-id", &id)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    let recs = records(&id);
    assert_eq!(recs.len(), 1);
    assert!(recs[0]["status"].is_null());
    assert!(recs[0]["outcome"].as_str().is_some_and(|o| !o.is_empty()));
    assert!(recs[0]["response_body"].is_null());
    proxy.stop().await;
}

async fn hint_for(resp: reqwest::Response, status: u16, code: &str) -> String {
    let v = expect_envelope(resp, status, code).await;
    v["error"]["details"]["hint"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn wrapped_upstream_errors_carry_the_action_for_their_status() {
    let (sim, proxy) = sim_and_proxy_with(|s| s.retry.max_retries = 2).await;
    let cases: &[(u16, &str, &str)] = &[
        (400, "BAD_REQUEST", "fix the request"),
        (
            401,
            "UNAUTHORIZED",
            "SMARTLEAD_API_KEY where the proxy runs",
        ),
        (403, "FORBIDDEN", "no access to this resource"),
        (404, "NOT_FOUND", "list campaigns"),
        (409, "CONFLICT", "usually safe to ignore"),
        (422, "VALIDATION_ERROR", "fix the request"),
        (500, "UPSTREAM_ERROR", "after 3 attempts (retried 2 times)"),
        (503, "UPSTREAM_ERROR", "check SmartLead's status"),
    ];
    for &(status, code, wanted) in cases {
        sim.push_fault(
            Fault::respond(status, Some("text/plain"), "nope")
                .on("/campaigns/1001")
                .times(3),
        );
        let hint = hint_for(proxy.get("/api/v1/campaigns/1001").await, status, code).await;
        assert!(hint.contains(wanted), "{status}: {hint}");
        sim.reset();
    }
    // The field SmartLead named is in the hint.
    sim.push_fault(Fault::json(
        422,
        json!({"message": "invalid", "details": {"field": "lead_list[0].email"}}),
    ));
    let hint = hint_for(
        proxy.get("/api/v1/campaigns").await,
        422,
        "VALIDATION_ERROR",
    )
    .await;
    assert!(
        hint.contains("fix lead_list[0].email in the payload"),
        "{hint}"
    );
    // A 429 that outlasts the retries: SmartLead's quota is smaller than configured.
    sim.push_fault(
        Fault::respond(429, Some("text/plain"), "slow down")
            .header("retry-after", "0")
            .times(3),
    );
    let hint = hint_for(proxy.get("/api/v1/campaigns").await, 429, "RATE_LIMITED").await;
    assert!(hint.contains("smaller than limit.windows"), "{hint}");
    // Conforming envelopes are SmartLead's own words, passed through untouched.
    let own =
        json!({"error": {"code": "NOT_FOUND", "message": "Campaign not found", "details": {}}});
    sim.push_fault(Fault::json(404, own.clone()));
    let resp = proxy.get("/api/v1/campaigns/1001").await;
    assert_eq!(resp.json::<Value>().await.unwrap(), own);
    proxy.stop().await;
}

#[tokio::test]
async fn the_proxys_own_errors_carry_hints() {
    let (sim, proxy) = sim_and_proxy_with(|s| {
        s.server.max_body_bytes = 1024;
        s.limit.one_window(1, Duration::from_secs(60));
        s.limit.max_wait = Duration::from_millis(100);
    })
    .await;
    let c = client();
    let bad_lead = json!({"lead_list": [{"email": "not-an-address"}]});
    let resp = c
        .post(proxy.url("/api/v1/campaigns/1001/leads"))
        .json(&bad_lead)
        .send()
        .await
        .unwrap();
    let hint = hint_for(resp, 400, "VALIDATION_ERROR").await;
    assert!(hint.contains("lead_list[0].email (format)"), "{hint}");
    let resp = c
        .post(proxy.url("/api/v1/campaigns/1001/leads"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    let hint = hint_for(resp, 413, "PAYLOAD_TOO_LARGE").await;
    assert!(hint.contains("server.max_body_bytes"), "{hint}");
    let hint = hint_for(proxy.get("/v1/campaigns").await, 404, "NOT_FOUND").await;
    assert!(hint.contains("base URL"), "{hint}");
    // The one slot goes to the first request; the next waits past max_wait.
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let resp = proxy.get("/api/v1/campaigns").await;
    let v = expect_envelope(resp, 429, "RATE_LIMITED").await;
    assert_eq!(v["error"]["details"]["reason"], "max_wait");
    let hint = v["error"]["details"]["hint"].as_str().unwrap();
    assert!(hint.contains("limit.max_wait"), "{hint}");
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;

    // Nothing listening upstream, and an upstream that never answers.
    let mut s = crate::support::settings(&format!(
        "http://127.0.0.1:{}/api/v1",
        crate::support::closed_port().await
    ));
    s.retry.max_retries = 1;
    let proxy = crate::support::spawn_proxy(s).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    let hint = hint_for(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert!(
        hint.contains("could not be reached after 2 attempts"),
        "{hint}"
    );
    proxy.stop().await;

    let (sim, proxy) = sim_and_proxy_with(|s| {
        s.server.access_tokens = vec![secrecy::SecretString::from("t0ken".to_owned())];
    })
    .await;
    let hint = hint_for(proxy.get("/api/v1/campaigns").await, 401, "UNAUTHORIZED").await;
    assert!(hint.contains("Authorization: Bearer"), "{hint}");
    sim.push_fault(Fault::hang());
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .bearer_auth("t0ken")
        .header("x-request-timeout", "200ms")
        .send()
        .await
        .unwrap();
    let hint = hint_for(resp, 504, "UPSTREAM_TIMEOUT").await;
    assert!(hint.contains("upstream.timeout"), "{hint}");
    proxy.stop().await;
}

#[tokio::test]
async fn imports_without_personalisation_fields_are_sent_with_a_warning() {
    let (sim, proxy) =
        sim_and_proxy_with(|s| s.leads.warn_missing = vec!["first_name".into()]).await;
    let id = new_id();
    let body = json!({"lead_list": [
        {"email": "a@example.com", "first_name": "Ann"},
        {"email": "b@example.com"},
        {"email": "c@example.com", "first_name": ""},
        {"email": "d@example.com", "first_name": null},
    ]});
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/1001/leads"))
        .header("x-request-id", &id)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "not blocked");
    assert_eq!(
        resp.headers()["x-lead-warnings"],
        "3 leads without first_name"
    );
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["upload_count"], 4);
    let warned: Vec<Value> = logged(&id)
        .into_iter()
        .filter(|v| v["level"] == "WARN")
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert_eq!(warned[0]["warnings"], "3 leads without first_name");
    assert_eq!(warned[0]["leads"], "first_name: lead_list[1], [2], [3]");

    // Complete leads: no header.
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/1002/leads"))
        .json(&json!({"lead_list": [{"email": "e@example.com", "first_name": "E"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-lead-warnings").is_none());
    assert_eq!(sim.stats().requests, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn batched_imports_count_warnings_over_the_whole_import() {
    let (_sim, proxy) = sim_and_proxy_with(|s| {
        s.leads.auto_batch = true;
        s.leads.max_per_request = 2;
    })
    .await;
    let list: Vec<Value> = (0..5)
        .map(|i| match i % 2 {
            0 => json!({"email": format!("p{i}@example.com"), "first_name": "P", "company_name": "C"}),
            _ => json!({"email": format!("p{i}@example.com")}),
        })
        .collect();
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/1003/leads"))
        .json(&json!({"lead_list": list}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-lead-batches"], "3");
    assert_eq!(
        resp.headers()["x-lead-warnings"],
        "2 leads without first_name, 2 leads without company_name"
    );
    proxy.stop().await;
}
