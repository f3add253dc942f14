//! Faults and hostile input: broken or stalled upstream bodies, slow or malformed clients,
//! odd headers (Redis that misbehaves: `fleet::faults`). Every case ends in an envelope
//! or a closed connection within its deadline, and the proxy keeps serving.

use std::time::{Duration, Instant};

use serde_json::Value;
use smartlead_proxy::sim::{Fault, Sim};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

async fn setup(tweak: impl FnOnce(&mut smartlead_proxy::Settings)) -> (Sim, Proxy) {
    sim_and_proxy_with(tweak).await
}

pub(crate) async fn still_serves(proxy: &Proxy) {
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200, "the proxy kept serving");
}

/// Reads until the server closes the connection; panics if it stays open past `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after {limit:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[tokio::test]
async fn a_body_reset_mid_stream_is_cut_not_passed_off_as_complete() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(Fault::truncated(r#"[{"id":1"#, true));
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200, "the status had already been sent");
    assert!(
        resp.bytes().await.is_err(),
        "the client must see a broken body"
    );
    still_serves(&proxy).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_that_hangs_mid_stream_is_cut_after_the_upstream_timeout() {
    let (sim, proxy) = setup(|s| s.upstream.timeout = Duration::from_millis(500)).await;
    sim.push_fault(Fault::truncated(r#"[{"id":1"#, false));
    let started = Instant::now();
    let resp = proxy.get("/api/v1/campaigns").await;
    assert!(resp.bytes().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        started.elapsed()
    );
    still_serves(&proxy).await;
    proxy.stop().await;
}

#[tokio::test]
async fn slowloris_headers_are_dropped() {
    let (sim, proxy) = setup(|s| s.server.client_timeout = Duration::from_millis(500)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(sim.stats().requests, 0);
    still_serves(&proxy).await;
    proxy.stop().await;
}

/// Sends one GET on `s` and reads its whole answer (a `Content-Length` body).
async fn one_keep_alive_exchange(s: &mut tokio::net::TcpStream) -> String {
    s.write_all(b"GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..head_end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        if got.len() >= head_end + 4 + length {
            return text;
        }
    }
}

/// The header-read timer is moved lazily across a keep-alive connection's requests
/// (vendor/README.md): heads that arrive in time never trip it, however long the
/// connection lives, and a slow head still does.
#[tokio::test]
async fn the_header_timeout_spans_each_head_not_the_connection() {
    let (sim, proxy) = setup(|s| s.server.client_timeout = Duration::from_millis(300)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    // Past three timeout periods, a prompt head every 100 ms.
    while started.elapsed() < Duration::from_millis(1000) {
        let answer = one_keep_alive_exchange(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = sim.stats().requests;
    assert!(served >= 5, "{served} requests");
    s.write_all(b"GET /api/v1/campaigns HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let stalled = Instant::now();
    read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(
        stalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        stalled.elapsed()
    );
    assert_eq!(sim.stats().requests, served);
    still_serves(&proxy).await;
    proxy.stop().await;
}

/// At most 100 headers (hyper's default, src/server.rs): 90 are served, 120 refused.
#[tokio::test]
async fn a_request_with_too_many_headers_is_refused_before_upstream() {
    let (sim, proxy) = setup(|_| {}).await;
    let head = |n: usize| {
        let mut h = String::from("GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\n");
        for i in 0..n {
            h.push_str(&format!("X-Filler-{i}: {i}\r\n"));
        }
        h + "Connection: close\r\n\r\n"
    };
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(head(90).as_bytes()).await.unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let served = sim.stats().requests;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(head(120).as_bytes()).await.unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert_eq!(sim.stats().requests, served);
    still_serves(&proxy).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let (sim, proxy) = setup(|s| s.server.client_timeout = Duration::from_millis(500)).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /api/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains(r#""code":"REQUEST_TIMEOUT""#), "{reply}");
    assert_eq!(sim.stats().requests, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_requests_never_reach_upstream() {
    let (sim, proxy) = setup(|_| {}).await;
    let cases: Vec<Vec<u8>> = vec![
        b"GET /api/v1/echo HTTP/1.1\r\nHost: x\r\nX-Evil: a\rb\r\n\r\n".to_vec(),
        b"GET /api/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            .to_vec(),
        [
            b"GET /api/v1/echo HTTP/1.1\r\nHost: x\r\nX-Huge: ".to_vec(),
            vec![b'a'; 512 * 1024],
            b"\r\n\r\n".to_vec(),
        ]
        .concat(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n".to_vec(),
    ];
    for raw in cases {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(&raw).await;
        let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
            "{reply}"
        );
    }
    assert_eq!(sim.stats().requests, 0);
    still_serves(&proxy).await;
    proxy.stop().await;
}

/// RFC 9112: with both, Transfer-Encoding wins and the connection closes afterwards. The
/// proxy re-frames what it forwards, so no smuggled second request can reach SmartLead.
#[tokio::test]
async fn content_length_and_chunked_together_cannot_smuggle() {
    let (sim, proxy) = setup(|_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /api/v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/v1/campaigns/1001 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let reply = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let got = sim.requests();
    assert_eq!(got.len(), 1, "the smuggled GET was not forwarded: {got:?}");
    assert_eq!(got[0].method, "POST");
    assert!(got[0].body.is_empty());
    assert!(!got[0].headers.contains_key("transfer-encoding"));
    proxy.stop().await;
}

#[tokio::test]
async fn huge_upstream_headers_are_a_502() {
    let mut reply = b"HTTP/1.1 200 OK\r\nX-Huge: ".to_vec();
    reply.extend(vec![b'a'; 1024 * 1024]);
    reply.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
    let addr = raw_upstream(reply, false).await;
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    expect_envelope(resp, 502, "UPSTREAM_ERROR").await;
    proxy.stop().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn thousands_of_idle_connections_leak_nothing() {
    let (_sim, proxy) = setup(|_| {}).await;
    still_serves(&proxy).await;
    let before = open_fds();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    still_serves(&proxy).await;
    drop(idle);
    // The proxy notices the closed connections; its descriptors come back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > before + 10 {
        assert!(
            Instant::now() < deadline,
            "fds: {} before, {} after",
            before,
            open_fds()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_reset_in_the_middle_of_the_headers_is_a_502() {
    let addr = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: appl".to_vec(), true).await;
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    expect_envelope(
        proxy.get("/api/v1/campaigns").await,
        502,
        "UPSTREAM_UNAVAILABLE",
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_gzip_success_passes_through_compressed() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"[{"id":1}]"#).unwrap();
    let body = gz.finish().unwrap();
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(&body);
    let addr = raw_upstream(reply, false).await;
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let resp = client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(
        resp.bytes().await.unwrap().to_vec(),
        body,
        "bytes untouched"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_api_key_in_the_body_is_taken_out_like_the_querys() {
    let (sim, proxy) = setup(|_| {}).await;
    let resp = client()
        .post(proxy.url("/api/v1/echo?api_key=mine"))
        .json(&serde_json::json!({"api_key": "mine", "name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = &sim.requests()[0];
    assert_eq!(
        r.api_keys(),
        vec![KEY.to_string()],
        "the configured key, once, in the query"
    );
    assert_eq!(
        r.body.as_ref(),
        br#"{"name":"x"}"#,
        "the rest of the body is forwarded as sent"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_timeout_too_big_for_the_clock_is_a_400() {
    let (sim, proxy) = setup(|_| {}).await;
    for value in [
        "18446744073709551615s",
        "1e300",
        "100000000000",
        "500000000000years",
        "2d",
    ] {
        let resp = client()
            .get(proxy.url("/api/v1/campaigns"))
            .header("x-request-timeout", value)
            .send()
            .await
            .unwrap();
        let body = expect_envelope(resp, 400, "BAD_REQUEST").await;
        assert_eq!(
            body["error"]["details"]["header"], "x-request-timeout",
            "{value}"
        );
    }
    assert_eq!(sim.stats().requests, 0);
    still_serves(&proxy).await;
    proxy.stop().await;
}

#[tokio::test]
async fn answers_a_client_cannot_use_are_502() {
    for status_line in [
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        "HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}",
        "HTTP/1.1 999 Odder\r\nContent-Length: 2\r\n\r\n{}",
    ] {
        let addr = raw_upstream(status_line.as_bytes().to_vec(), false).await;
        let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
        let resp = proxy.get("/api/v1/campaigns").await;
        let body = expect_envelope(resp, 502, "UPSTREAM_ERROR").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("not an answer to this request"),
            "{message}"
        );
        proxy.stop().await;
    }
}

/// RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, so the client must get the
/// whole de-chunked body, framed by the proxy, not cut at the stale length.
#[tokio::test]
async fn an_upstream_answer_with_both_lengths_is_framed_right() {
    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n01234567890123456789\r\n0\r\n\r\n";
    let addr = raw_upstream(reply.to_vec(), false).await;
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let resp = proxy.get("/api/v1/campaigns").await;
    assert_eq!(resp.status(), 200);
    assert_ne!(resp.content_length(), Some(5));
    assert_eq!(resp.text().await.unwrap(), "01234567890123456789");
    proxy.stop().await;
}

#[tokio::test]
async fn the_lead_guard_cannot_be_walked_around() {
    let (sim, proxy) = setup(|_| {}).await;
    let leads: Vec<Value> = (0..401)
        .map(|i| serde_json::json!({"email": format!("l{i}@example.com")}))
        .collect();
    let body = serde_json::json!({ "lead_list": leads });
    for (path, code) in [
        ("/api/v1/campaigns/1//leads", "BAD_REQUEST"),
        ("/api/v1/campaigns//1/leads", "BAD_REQUEST"),
        ("/api/v1/Campaigns/1/LEADS", "VALIDATION_ERROR"),
        ("/api/v1/campaigns/1/%6Ceads/", "VALIDATION_ERROR"),
    ] {
        let resp = client()
            .post(proxy.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_envelope(resp, 400, code).await;
    }
    assert_eq!(sim.stats().requests, 0, "nothing unchecked was sent");
    proxy.stop().await;
}

/// Bodies wait with their requests; past `server.max_buffered_bytes` new requests with
/// bodies get 503 at once, and none already waiting is lost.
#[tokio::test]
async fn request_bodies_held_at_once_are_capped() {
    let (sim, proxy) = setup(|s| {
        s.server.max_body_bytes = 400_000;
        s.server.max_buffered_bytes = 1_000_000;
        s.limit.one_window(1, Duration::from_millis(700));
        s.limit.margin = Duration::ZERO;
    })
    .await;
    let post = |n: u8| {
        client()
            .post(proxy.url("/api/v1/echo"))
            .header("content-type", "text/plain")
            .body(vec![b'a' + n; 300_000])
            .send()
    };
    // Spend the slot, so the next three wait with 900 KB of bodies between them.
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let waiting: Vec<_> = (0..3).map(|n| tokio::spawn(post(n))).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = post(9).await.unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    let body = expect_envelope(refused, 503, "UNAVAILABLE").await;
    assert_eq!(body["error"]["details"]["reason"], "memory");
    // A request without a body still gets in line.
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    for (n, w) in waiting.into_iter().enumerate() {
        let resp = w.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "waiting request {n} was answered");
        assert!(resp.bytes().await.unwrap().len() > 300_000);
    }
    // Their memory was given back.
    assert_eq!(post(7).await.unwrap().status(), 200);
    assert_eq!(sim.stats().requests, 6);
    proxy.stop().await;
}

/// A client that stops reading its answer is cut off after `server.client_timeout`, and
/// the upstream connection feeding it is let go.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let size = 256 * 1024 * 1024;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            if s.write_all(&chunk).await.is_err() {
                let _ = stopped_tx.send(sent);
                return;
            }
            sent += chunk.len();
        }
    });
    let proxy = spawn_proxy({
        let mut s = settings(&format!("http://{addr}/api/v1"));
        s.server.client_timeout = Duration::from_millis(500);
        s
    })
    .await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /api/v1/export HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Never read: the proxy's writes to us stall, and it gives up.
    let sent = tokio::time::timeout(Duration::from_secs(10), stopped_rx)
        .await
        .expect("the upstream connection was let go")
        .unwrap();
    assert!(sent < 256 * 1024 * 1024, "sent {sent}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(rest.len() < 256 * 1024 * 1024);
    assert_eq!(proxy.get("/healthz").await.status(), 200);
    proxy.stop().await;
}

/// Requests a client sends before its first is answered (here while that one waits for
/// the quota: one byte of the next, then the rest with a third) are each answered, in
/// order. The patched hyper (vendor/hyper) lets go of the read buffer between requests
/// and watches for a hang-up with a one-byte read; neither may lose what was sent.
#[tokio::test]
async fn requests_sent_ahead_while_one_waits_are_all_answered_in_order() {
    let (sim, proxy) = setup(|s| s.limit.one_window(1, Duration::from_millis(500))).await;
    still_serves(&proxy).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let get = |n: u32, last: bool| {
        let close = if last { "Connection: close\r\n" } else { "" };
        format!("GET /api/v1/campaigns?n={n} HTTP/1.1\r\nHost: x\r\n{close}\r\n")
    };
    stream.write_all(get(1, false).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let rest = format!("{}{}", get(2, false), get(3, true));
    stream.write_all(&rest.as_bytes()[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream.write_all(&rest.as_bytes()[1..]).await.unwrap();
    let answers = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let heads: Vec<&str> = answers
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| &a[..3])
        .collect();
    assert_eq!(heads, ["200", "200", "200"], "{answers}");
    assert_eq!(sim.stats().requests, 4, "each reached SmartLead once");
    still_serves(&proxy).await;
}

/// Ids over 128 characters or outside visible ASCII are replaced by the proxy's own:
/// 50 ids of 60 KB used to make `/status.json` 1.5 MB.
#[tokio::test]
async fn long_or_odd_request_ids_are_replaced() {
    let (sim, proxy) = setup(|_| {}).await;
    sim.push_fault(
        smartlead_proxy::sim::Fault::json(400, serde_json::json!({"message": "no"})).times(60),
    );
    let long = "x".repeat(60_000);
    for id in [long.as_str(), &"y".repeat(129), "tab\there"] {
        let resp = proxy
            .get_with("/api/v1/campaigns", &[("x-request-id", id)])
            .await;
        let got = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(got, id);
        assert_eq!(got.len(), 36, "a UUID of the proxy's own: {got}");
    }
    for _ in 0..50 {
        proxy
            .get_with("/api/v1/campaigns", &[("x-request-id", &long)])
            .await;
    }
    let kept = "z".repeat(128);
    let resp = proxy
        .get_with("/api/v1/campaigns", &[("x-request-id", &kept)])
        .await;
    assert_eq!(resp.headers()["x-request-id"], kept.as_str(), "128 is kept");
    let status = proxy.get("/status.json").await.text().await.unwrap();
    assert!(
        status.len() < 64 * 1024,
        "/status.json is {} bytes",
        status.len()
    );
    assert!(!status.contains(&"x".repeat(200)));
    proxy.stop().await;
}

/// `x-ratelimit-limit: 0` (or less) says nothing usable: with `follow_upstream` it used to
/// turn the per-minute window into 1 until restart.
#[tokio::test]
async fn a_zero_upstream_limit_is_ignored() {
    let (sim, proxy) = setup(|s| {
        s.limit.follow_upstream = true;
        s.limit.one_window(100, Duration::from_secs(60));
        s.limit.max_wait = Duration::from_millis(300);
    })
    .await;
    for value in ["0", "-5", "0.4"] {
        sim.push_fault(
            smartlead_proxy::sim::Fault::json(200, serde_json::json!([]))
                .header("x-ratelimit-limit", value),
        );
        assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    }
    for _ in 0..10 {
        assert_eq!(
            proxy.get("/api/v1/campaigns").await.status(),
            200,
            "still 100/60s"
        );
    }
    let status: serde_json::Value = proxy.get_json("/status.json").await;
    let window = &status["accounts"][0]["windows"][0];
    assert_eq!(window["requests"], 100, "{window}");
    proxy.stop().await;
}

/// Every 429 carries an integer `Retry-After` of at least 1, an upstream one passed on
/// included, whatever (if anything) SmartLead put in its own.
#[tokio::test]
async fn every_429_says_when_to_come_back() {
    let (sim, proxy) = setup(|_| {}).await;
    for retry_after in [
        Some(KEY),
        Some("soon"),
        Some("-3"),
        Some("0"),
        Some("1.5"),
        None,
    ] {
        let mut fault = smartlead_proxy::sim::Fault::json(
            429,
            serde_json::json!({"error": {"code": "RATE_LIMITED", "message": "slow down"}}),
        );
        if let Some(v) = retry_after {
            fault = fault.header("retry-after", v);
        }
        sim.push_fault(fault);
        let resp = proxy.get("/api/v1/campaigns").await;
        assert_eq!(resp.status(), 429, "{retry_after:?}");
        let secs: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{retry_after:?}: {:?}", resp.headers()));
        assert!(secs >= 1, "{retry_after:?}: {secs}");
        let text = resp.text().await.unwrap();
        assert_no_key(&text, KEY, "the 429");
        // The whole limiter paused for it; let it pass before the next.
        tokio::time::sleep(Duration::from_millis(secs * 1000 + 100)).await;
    }
    proxy.stop().await;
}
