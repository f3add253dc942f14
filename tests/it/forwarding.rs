//! Requests under /api/v1 reach the simulated SmartLead intact, with the key injected.

mod clients;
mod stream;

use serde_json::{Value, json};
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::*;

#[tokio::test]
async fn forwards_every_method_with_query_body_and_headers() {
    let (sim, proxy) = sim_and_proxy().await;
    let c = client();
    for method in ["GET", "POST", "PATCH", "DELETE", "PUT"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = c
            .request(
                m,
                proxy.url("/api/v1/echo/campaigns/7?offset=10&limit=5&tag=a%20b"),
            )
            .header("x-custom", "kept")
            .header("content-type", "application/json")
            .body(json!({"method": method}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        let echoed: Value = resp.json().await.unwrap();
        assert_eq!(echoed["method"], method);
        assert_eq!(echoed["path"], "/api/v1/echo/campaigns/7");
        assert_eq!(echoed["body"], json!({"method": method}).to_string());
        assert_eq!(echoed["headers"]["x-custom"], "kept");
        assert_eq!(echoed["headers"]["content-type"], "application/json");
        assert_eq!(
            echoed["query"],
            json!([
                ["offset", "10"],
                ["limit", "5"],
                ["tag", "a b"],
                ["api_key", "***"]
            ])
        );
    }
    let recorded = sim.requests();
    assert_eq!(recorded.len(), 5);
    for r in &recorded {
        assert_eq!(
            r.api_keys(),
            vec![KEY.to_string()],
            "key injected exactly once"
        );
    }
    proxy.stop().await;
}

/// The head is copied out of hyper's buffer (`server::detach_head`): a header sent more
/// than once keeps every value, in order, and the others are untouched.
#[tokio::test]
async fn a_header_sent_twice_reaches_smartlead_with_both_values_in_order() {
    let (sim, proxy) = sim_and_proxy().await;
    let request = b"GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nx-twice: first\r\n\
        accept: application/json\r\nx-twice: second\r\nx-once: only\r\n\
        Connection: close\r\n\r\n";
    let answer = raw_request(proxy.addr, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let recorded = sim.requests();
    let headers = &recorded.last().unwrap().headers;
    let twice: Vec<_> = headers.get_all("x-twice").iter().collect();
    assert_eq!(twice, ["first", "second"]);
    assert_eq!(headers["x-once"], "only");
    assert_eq!(headers["accept"], "application/json");
    proxy.stop().await;
}

#[tokio::test]
async fn real_routes_work_unchanged() {
    let (sim, proxy) = sim_and_proxy().await;
    let c = client();
    let campaigns: Value = proxy.get_json("/api/v1/campaigns").await;
    assert_eq!(campaigns.as_array().unwrap().len(), 3);

    let leads = json!({"lead_list": [{"email": "a@x.io", "first_name": "A"}, {"email": "b@x.io"}]});
    let url = proxy.url("/api/v1/campaigns/1001/leads");
    let first: Value = c
        .post(&url)
        .json(&leads)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["upload_count"], 2);
    let again: Value = c
        .post(&url)
        .json(&leads)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["upload_count"], 0, "duplicates skipped");
    assert_eq!(again["already_added_to_campaign"], 2);
    assert_eq!(sim.stats().requests, 3);
    proxy.stop().await;
}

#[tokio::test]
async fn client_key_is_replaced_by_the_configured_one() {
    let (sim, proxy) = sim_and_proxy().await;
    let resp = proxy
        .get("/api/v1/campaigns?api_key=client-secret&API_KEY=other&limit=1")
        .await;
    assert_eq!(resp.status(), 200);
    let r = &sim.requests()[0];
    assert_eq!(r.api_keys(), vec![KEY.to_string()]);
    let q = r.query.clone().unwrap();
    assert!(!q.contains("client-secret") && !q.contains("other"), "{q}");
    assert!(q.contains("limit=1"));
    proxy.stop().await;
}

#[tokio::test]
async fn client_key_kept_when_allowed_and_no_key_configured() {
    let sim = Sim::start(SimConfig {
        api_key: Some("client-own".into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut s = settings(&sim.base_url());
    s.upstream.api_key = None;
    s.upstream.allow_client_key = true;
    s.validate().unwrap();
    let proxy = spawn_proxy(s).await;
    let resp = proxy.get("/api/v1/campaigns?api_key=client-own").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.requests()[0].api_keys(), vec!["client-own".to_string()]);
    proxy.stop().await;
}

#[tokio::test]
async fn request_id_is_generated_or_kept_and_forwarded() {
    let (sim, proxy) = sim_and_proxy().await;
    let c = client();
    let resp = proxy.get("/api/v1/campaigns").await;
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let resp = c
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-request-id", "mine-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "mine-123");
    let got = sim.requests();
    assert_eq!(got[0].headers["x-request-id"], generated.as_str());
    assert_eq!(got[1].headers["x-request-id"], "mine-123");
    let resp = proxy.get("/healthz").await;
    assert!(resp.headers().contains_key("x-request-id"));
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let (sim, proxy) = sim_and_proxy().await;
    let reply = raw_request(
        proxy.addr,
        b"GET /api/v1/echo HTTP/1.1\r\nHost: evil.example\r\nConnection: close, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9v\r\nTE: trailers\r\nx-end: 2\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let r = &sim.requests()[0];
    for h in ["x-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(!r.headers.contains_key(h), "{h} forwarded");
    }
    assert_eq!(r.headers["x-end"], "2");
    assert_eq!(
        r.headers["host"],
        sim.addr().to_string().as_str(),
        "client Host replaced"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_uri_and_forged_host_cannot_redirect() {
    let (sim, proxy) = sim_and_proxy().await;
    let evil = Sim::start(SimConfig {
        api_key: None,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let req = format!(
        "GET http://{evil}/api/v1/echo HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n",
        evil = evil.addr()
    );
    let reply = raw_request(proxy.addr, req.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let forged = format!(
        "GET /api/v1/echo HTTP/1.1\r\nHost: {}\r\nX-Forwarded-Host: {0}\r\nConnection: close\r\n\r\n",
        evil.addr()
    );
    let reply = raw_request(proxy.addr, forged.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(evil.stats().requests, 0, "the other host was contacted");
    assert_eq!(sim.stats().requests, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn traversal_is_refused_before_any_upstream_call() {
    let (sim, proxy) = sim_and_proxy().await;
    for path in [
        "/api/v1/../admin",
        "/api/v1/campaigns/%2e%2e/%2e%2e/admin",
        "/api/v1/campaigns/%2E%2E",
        "/api/v1/campaigns/..%2fadmin",
        "/api/v1/./campaigns",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let reply = raw_request(proxy.addr, req.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
        assert!(reply.contains(r#""code":"BAD_REQUEST""#), "{path}: {reply}");
    }
    assert_eq!(sim.stats().requests, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let (_sim, proxy) = sim_and_proxy().await;
    let h: Value = proxy.get_json("/healthz").await;
    assert_eq!(h["status"], "ok");
    let resp = proxy.get("/readyz").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "ready");
    proxy.stop().await;
}

#[tokio::test]
async fn successful_responses_stream_without_buffering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n[1,2,\r\n").await.unwrap();
        // The rest only once the client has seen the first chunk through the proxy.
        let _ = release_rx.await;
        s.write_all(b"2\r\n3]\r\n0\r\n\r\n").await.unwrap();
    });
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let mut resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), resp.chunk())
        .await
        .expect("first chunk arrived before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"[1,2,");
    release_tx.send(()).unwrap();
    let rest = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&rest[..], b"3]");
    proxy.stop().await;
}
