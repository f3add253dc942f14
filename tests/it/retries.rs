//! Retries against the scripted simulator: statuses, method safety, Retry-After,
//! deadlines, connection failures, the retry budget.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use smartlead_proxy::sim::{Fault, Sim};

use crate::support::*;

async fn setup(tweak: impl FnOnce(&mut smartlead_proxy::Settings)) -> (Sim, Proxy) {
    sim_and_proxy_with(|s| {
        s.retry.max_retries = 3;
        s.retry.base_delay = Duration::from_millis(20);
        s.retry.max_delay = Duration::from_secs(5);
        tweak(s);
    })
    .await
}

fn gaps(sim: &Sim) -> Vec<Duration> {
    let r = sim.requests();
    r.windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect()
}

#[tokio::test]
async fn transient_errors_are_retried_until_success() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(Fault::html(500));
    sim.push_fault(Fault::respond(502, Some("text/plain"), "bad gateway"));
    sim.push_fault(Fault::json(503, json!({"message": "maintenance"})));
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests, 4);
    proxy.stop().await;
}

#[tokio::test]
async fn retry_after_seconds_is_honoured() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(Fault::json(503, json!({"message": "busy"})).header("retry-after", "2"));
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    let g = gaps(&sim);
    assert_eq!(g.len(), 1);
    assert!(
        g[0] >= Duration::from_millis(1950),
        "retried after {:?}",
        g[0]
    );
    assert!(
        g[0] < Duration::from_millis(3500),
        "retried after {:?}",
        g[0]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    let (sim, proxy) = setup(|_| {}).await;
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    sim.push_fault(Fault::respond(503, None, "").header("retry-after", &at));
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    // An HTTP-date has whole seconds: the wait is between 2 and 3 s.
    let g = gaps(&sim)[0];
    assert!(
        g >= Duration::from_millis(1900) && g < Duration::from_millis(3500),
        "{g:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_plain_post_is_not_retried_after_a_500_but_is_after_a_503() {
    let (sim, proxy) = setup(|_| {}).await;
    let c = client();
    sim.push_fault(Fault::json(500, json!({"message": "boom"})));
    let resp = c
        .post(proxy.url("/api/v1/campaigns/create"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    let v = expect_envelope(resp, 500, "UPSTREAM_ERROR").await;
    assert_eq!(v["error"]["details"]["attempts"], 1);
    assert_eq!(sim.stats().requests, 1, "upstream saw exactly one call");

    sim.reset();
    sim.push_fault(Fault::json(503, json!({"message": "later"})));
    let (status, _) = proxy
        .post_json("/api/v1/campaigns/create", &json!({"name": "y"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(sim.stats().requests, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn lead_imports_and_idempotency_keys_are_retried_after_a_500() {
    let (sim, proxy) = setup(|_| {}).await;
    let c = client();
    sim.push_fault(Fault::html(500));
    let leads = json!({"lead_list": [{"email": "a@b.co"}]});
    let resp = c
        .post(proxy.url("/api/v1/campaigns/1001/leads"))
        .json(&leads)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests, 2);
    let bodies: Vec<_> = sim.requests().iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies[0], bodies[1], "the body is replayed unchanged");

    sim.reset();
    sim.push_fault(Fault::html(502));
    let resp = c
        .post(proxy.url("/api/v1/campaigns/create"))
        .header("idempotency-key", "k-1")
        .json(&json!({"name": "z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reqs = sim.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1].headers["idempotency-key"], "k-1",
        "forwarded upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn exhausted_retries_say_how_many_attempts() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(Fault::json(502, json!({"message": "down"})).times(10));
    let resp = proxy.get("/api/v1/campaigns").await;
    let v = expect_envelope(resp, 502, "UPSTREAM_ERROR").await;
    assert_eq!(v["error"]["details"]["attempts"], 4);
    assert_eq!(v["error"]["details"]["upstream_status"], 502);
    assert_eq!(v["error"]["message"], "down");
    assert_eq!(sim.stats().requests, 4);
    proxy.stop().await;
}

#[tokio::test]
async fn a_deadline_shorter_than_retry_after_answers_now() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(Fault::json(503, json!({"message": "busy"})).header("retry-after", "5"));
    let started = Instant::now();
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-request-timeout", "1.5")
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    let v = expect_envelope(resp, 503, "UPSTREAM_ERROR").await;
    assert_eq!(v["error"]["details"]["attempts"], 1);
    assert_eq!(sim.stats().requests, 1);
    assert!(
        !sim.requests()[0].headers.contains_key("x-request-timeout"),
        "our header stays ours"
    );

    // The same with max_wait as the only deadline.
    proxy.stop().await;
    let (sim, proxy) = setup(|s| s.limit.max_wait = Duration::from_secs(1)).await;
    sim.push_fault(Fault::json(503, json!({"message": "busy"})).header("retry-after", "4"));
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(resp.status(), 503);
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_request_timeout_header_is_a_400() {
    let (sim, proxy) = setup(|_| {}).await;
    for bad in ["soon", "0", "-3", "nan"] {
        let resp = client()
            .get(proxy.url("/api/v1/campaigns"))
            .header("x-request-timeout", bad)
            .send()
            .await
            .unwrap();
        expect_envelope(resp, 400, "BAD_REQUEST").await;
    }
    let ok = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-request-timeout", "2500ms")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn the_callers_deadline_cuts_a_hanging_attempt() {
    let (sim, proxy) = setup(|s| s.upstream.timeout = Duration::from_secs(10)).await;
    sim.push_fault(Fault::hang());
    let started = Instant::now();
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-request-timeout", "700ms")
        .send()
        .await
        .unwrap();
    expect_envelope(resp, 504, "UPSTREAM_TIMEOUT").await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn resets_and_hangs_are_retried_for_safe_methods() {
    let (sim, proxy) = setup(|s| s.upstream.timeout = Duration::from_millis(300)).await;
    let c = client();
    sim.push_fault(Fault::reset());
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.stats().requests, 2);

    sim.reset();
    sim.push_fault(Fault::hang());
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(
        resp.status(),
        200,
        "the hung attempt timed out and the retry worked"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(sim.stats().requests, 2);

    // A plain POST that reached the upstream before the reset is not repeated.
    sim.reset();
    sim.push_fault(Fault::reset());
    let resp = c
        .post(proxy.url("/api/v1/campaigns/create"))
        .json(&json!({"name": "once"}))
        .send()
        .await
        .unwrap();
    expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(sim.stats().requests, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn connection_refused_is_retried_for_every_method() {
    let port = closed_port().await;
    let mut s = settings(&format!("http://127.0.0.1:{port}/api/v1"));
    s.retry.max_retries = 2;
    let proxy = spawn_proxy(s).await;
    let resp = client()
        .post(proxy.url("/api/v1/campaigns/create"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let v = expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(
        v["error"]["details"]["attempts"], 3,
        "a refused connect did no work: retried"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let (sim, proxy) = setup(|s| {
        s.retry.budget_ratio = 0.2;
        s.retry.budget_min_retries = 2;
        s.retry.budget_window = Duration::from_secs(10);
    })
    .await;
    sim.push_fault(Fault::json(500, json!({"message": "down"})).times(1000));
    let mut attempts = Vec::new();
    let mut exhausted = 0;
    for _ in 0..10 {
        let resp = proxy.get("/api/v1/campaigns").await;
        let v = expect_envelope(resp, 500, "UPSTREAM_ERROR").await;
        attempts.push(v["error"]["details"]["attempts"].as_u64().unwrap());
        if v["error"]["details"]["retry_budget_exhausted"] == true {
            exhausted += 1;
        }
    }
    // 10 requests: at most max(2, 20% of 10) = 2 retries in all, not 30.
    let total: u64 = attempts.iter().sum();
    assert_eq!(total, 10 + 2, "{attempts:?}");
    assert_eq!(
        exhausted, 10,
        "every request ended on an empty budget: {attempts:?}"
    );
    assert_eq!(sim.stats().requests as u64, total);
    proxy.stop().await;
}
