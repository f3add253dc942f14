//! Production concerns over real sockets: access tokens, readiness while draining,
//! metrics that move with traffic.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

#[tokio::test]
async fn access_tokens_guard_the_api_but_not_the_probes() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let mut s = settings(&sim.base_url());
    s.server.access_tokens = vec![SecretString::from("tok-one"), SecretString::from("tok-two")];
    let proxy = spawn_proxy(s).await;
    let c = client();
    let url = proxy.url("/api/v1/campaigns");

    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"smartlead-proxy\""
    );
    expect_envelope(resp, 401, "UNAUTHORIZED").await;
    for bad in [
        "Bearer nope",
        "Bearer tok-one-and-more",
        "Basic dG9rLW9uZQ==",
        "tok-one",
        "Bearer ",
    ] {
        let resp = c
            .get(&url)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        expect_envelope(resp, 401, "UNAUTHORIZED").await;
    }
    assert_eq!(
        sim.stats().requests,
        0,
        "nothing unauthorised reached upstream"
    );

    for good in ["Bearer tok-one", "bearer tok-two"] {
        let resp = c
            .get(&url)
            .header("authorization", good)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{good}");
    }
    for r in sim.requests() {
        assert!(
            !r.headers.contains_key("authorization"),
            "the proxy's token is not forwarded"
        );
    }
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(proxy.get(open).await.status(), 200, "{open}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn readyz_turns_503_when_draining() {
    use tower::ServiceExt;
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let shared = smartlead_proxy::stack::Shared::new(settings(&sim.base_url())).unwrap();
    let shutdown = smartlead_proxy::shutdown::Shutdown::default();
    let client = smartlead_proxy::upstream::UpstreamClient::new(
        &shared.settings.upstream,
        smartlead_proxy::tls::client_config(None).unwrap(),
        1,
    )
    .unwrap();
    let stack = smartlead_proxy::stack::build(&shared, &shutdown, client);
    let ready = || async {
        let req = http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        stack.clone().oneshot(req).await.unwrap()
    };
    assert_eq!(ready().await.status(), 200);
    shutdown.begin();
    let resp = ready().await;
    assert_eq!(resp.status(), 503);
    let body = axum::body::to_bytes(resp.into_body(), 10_000)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "UNAVAILABLE");
    assert_eq!(v["error"]["details"]["reason"], "shutting_down");
}

/// The value of one series in a Prometheus text scrape (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let sim = Sim::start(SimConfig {
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = settings(&sim.base_url());
    s.retry.max_retries = 2;
    let proxy = spawn_proxy(s).await;
    let scrape = || async { proxy.get("/metrics").await.text().await.unwrap() };
    let before = scrape().await;

    sim.push_fault(Fault::json(502, json!({"message": "x"})));
    sim.push_fault(Fault::json(429, json!({"message": "slow"})).header("retry-after", "1"));
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    assert_eq!(proxy.get("/api/v1/campaigns/1001").await.status(), 200);
    assert_eq!(proxy.get("/nope").await.status(), 404);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = scrape().await;

    let grew = |series: &str, by: f64| {
        let d = sample(&after, series) - sample(&before, series);
        assert!(d >= by, "{series} grew by {d}, expected {by}:\n{after}");
    };
    grew(
        "smartlead_proxy_requests_total{route=\"/api/v1/campaigns\",status=\"200\",source=\"upstream\",account=\"default\"}",
        1.0,
    );
    grew(
        "smartlead_proxy_requests_total{route=\"/api/v1/campaigns/{id}\",status=\"200\",source=\"upstream\",account=\"default\"}",
        1.0,
    );
    grew(
        "smartlead_proxy_requests_total{route=\"other\",status=\"404\",source=\"proxy\"}",
        1.0,
    );
    grew(
        "smartlead_proxy_upstream_attempts_total{outcome=\"502\"}",
        1.0,
    );
    grew(
        "smartlead_proxy_upstream_attempts_total{outcome=\"429\"}",
        1.0,
    );
    grew("smartlead_proxy_retries_total{reason=\"502\"}", 1.0);
    grew("smartlead_proxy_retries_total{reason=\"429\"}", 1.0);
    grew(
        "smartlead_proxy_upstream_pauses_total{account=\"default\"}",
        1.0,
    );
    grew(
        "smartlead_proxy_limiter_wait_seconds_count{account=\"default\"}",
        4.0,
    );
    assert!(after.contains("# TYPE smartlead_proxy_request_duration_seconds histogram"));
    proxy.stop().await;
}

/// Random paths cannot use up the route labels: those SmartLead answers 404 are `other`,
/// and its own routes keep their labels however many other shapes were labelled.
#[tokio::test]
async fn random_paths_leave_smartleads_routes_their_labels() {
    let (_sim, proxy) = sim_and_proxy().await;
    // Letters only: a digit would make a segment an `{id}`, and all of them one shape.
    let word = |i: usize, salt: usize| -> String {
        (0..8)
            .map(|k| (b'a' + ((i * 7 + k * salt) % 26) as u8) as char)
            .collect()
    };
    for i in 0..200 {
        let resp = proxy.get(&format!("/api/v1/random/{}", word(i, 5))).await;
        assert_eq!(resp.status(), 404);
    }
    // Shapes SmartLead answers (the simulator's echo route) are labelled up to the cap.
    for i in 0..250 {
        let path = format!("/api/v1/echo/{}", word(i, 3));
        assert_eq!(proxy.get(&path).await.status(), 200);
    }
    let campaigns: serde_json::Value = proxy.get_json("/api/v1/campaigns").await;
    let id = campaigns[0]["id"].as_u64().expect("a campaign");
    let resp = client()
        .post(proxy.url(&format!("/api/v1/campaigns/{id}/leads")))
        .json(&serde_json::json!({"lead_list": [{"email": "a@example.com"}]}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"route="/api/v1/campaigns/{id}/leads",status=""#),
        "{metrics}"
    );
    assert!(!metrics.contains("/random/"), "404s are other");
    let routes: std::collections::HashSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("smartlead_proxy_requests_total{"))
        .filter_map(|l| l.split("route=\"").nth(1)?.split('"').next())
        .collect();
    assert!(routes.len() <= 200 + 3, "bounded: {}", routes.len());
    proxy.stop().await;
}
