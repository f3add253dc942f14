//! The HTTPS path to SmartLead, for real: a simulator behind a TLS front with a CA made
//! in the test, trusted through `upstream.ca_file` or not, reached directly or through an
//! HTTP CONNECT proxy (`upstream.proxy`, or `HTTPS_PROXY` / `NO_PROXY`).

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

async fn sim() -> Sim {
    Sim::start(SimConfig {
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn https_base(front: std::net::SocketAddr) -> String {
    format!("https://127.0.0.1:{}/api/v1", front.port())
}

#[tokio::test]
async fn over_tls_with_the_ca_the_key_retries_and_envelope_work() {
    let ca = TestCa::new();
    let sim = sim().await;
    let (front, handshakes) = tls_front(&ca, sim.addr()).await;
    let mut s = settings(&https_base(front));
    s.upstream.ca_file = Some(ca.ca.clone());
    s.retry.max_retries = 2;
    let proxy = spawn_proxy(s).await;

    let ok = proxy.get("/api/v1/campaigns").await;
    assert_eq!(ok.status(), 200);
    assert!(handshakes.load(Ordering::SeqCst) >= 1, "went over TLS");
    assert_eq!(sim.requests().last().unwrap().api_keys(), vec![KEY]);

    sim.push_fault(Fault::json(503, serde_json::json!({"message": "busy"})));
    let retried = proxy.get("/api/v1/campaigns").await;
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.headers()["x-proxy-attempts"], "2");

    sim.push_fault(Fault::respond(404, Some("text/plain"), "no such campaign"));
    let missing = proxy.get("/api/v1/campaigns/7").await;
    let body = expect_envelope(missing, 404, "NOT_FOUND").await;
    assert_eq!(body["error"]["details"]["upstream_status"], 404);
    proxy.stop().await;
}

#[tokio::test]
async fn without_the_ca_the_certificate_is_not_trusted() {
    let ca = TestCa::new();
    let sim = sim().await;
    let (front, _) = tls_front(&ca, sim.addr()).await;
    let mut s = settings(&https_base(front));
    s.retry.max_retries = 3;
    let proxy = spawn_proxy(s).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    let body = expect_envelope(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    let details = &body["error"]["details"];
    let hint = details["hint"].as_str().unwrap();
    assert!(
        hint.contains("not trusted") && hint.contains("upstream.ca_file"),
        "{hint}"
    );
    assert_eq!(details["attempts"], 1, "no retry can fix a certificate");
    assert_eq!(sim.stats().requests, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_configured_egress_proxy_carries_the_tls_connection() {
    let ca = TestCa::new();
    let sim = sim().await;
    let (front, handshakes) = tls_front(&ca, sim.addr()).await;
    let (egress, asked) = connect_proxy().await;
    let mut s = settings(&https_base(front));
    s.upstream.ca_file = Some(ca.ca.clone());
    s.upstream.proxy = Some(format!("http://127.0.0.1:{}", egress.port()));
    let proxy = spawn_proxy(s).await;
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    assert_eq!(
        asked.lock().unwrap().clone(),
        vec![format!("127.0.0.1:{}", front.port())]
    );
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "TLS inside the tunnel"
    );
    assert_eq!(sim.requests().last().unwrap().api_keys(), vec![KEY]);
    proxy.stop().await;
}

/// The binary on a free port with `envs`; answers one GET through it, then stops it.
async fn one_request_through_the_binary(envs: &[(&str, String)]) -> u16 {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smartlead-proxy"));
    cmd.env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "SMARTLEAD_PROXY__SERVER__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("SMARTLEAD_PROXY__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}/api/v1/campaigns");
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = client().get(&url).send().await {
            status = r.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    status
}

#[tokio::test]
async fn https_proxy_and_no_proxy_from_the_environment_are_honoured() {
    let ca = TestCa::new();
    let sim = sim().await;
    let (front, _) = tls_front(&ca, sim.addr()).await;
    let (egress, asked) = connect_proxy().await;
    let mut envs = vec![
        ("SMARTLEAD_API_KEY", KEY.to_owned()),
        ("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", https_base(front)),
        (
            "SMARTLEAD_PROXY__UPSTREAM__CA_FILE",
            ca.ca.display().to_string(),
        ),
        ("HTTPS_PROXY", format!("http://127.0.0.1:{}", egress.port())),
    ];
    assert_eq!(one_request_through_the_binary(&envs).await, 200);
    assert_eq!(asked.lock().unwrap().len(), 1, "through HTTPS_PROXY");
    envs.push(("NO_PROXY", "127.0.0.1".to_owned()));
    assert_eq!(one_request_through_the_binary(&envs).await, 200);
    assert_eq!(asked.lock().unwrap().len(), 1, "NO_PROXY skips it");
    assert_eq!(sim.stats().requests, 2);
}
