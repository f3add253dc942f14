//! The real binary: start-up validation, logs without the key, graceful shutdown.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

#[test]
fn missing_key_is_a_startup_error() {
    let err = start_error(&[], &[]);
    assert!(
        err.contains("upstream.api_key") && err.contains("SMARTLEAD_API_KEY"),
        "{err}"
    );
}

#[test]
fn bad_env_values_name_the_key() {
    let key = ("SMARTLEAD_API_KEY", "k");
    let err = start_error(&[key, ("SMARTLEAD_PROXY__LIMIT__REQUESTS", "lots")], &[]);
    assert!(err.contains("limit.requests"), "{err}");
    let err = start_error(&[key, ("SMARTLEAD_PROXY__UPSTREAM__TIMEOUT", "soon")], &[]);
    assert!(err.contains("upstream.timeout"), "{err}");
    let err = start_error(
        &[key, ("SMARTLEAD_PROXY__LIMIT__BACKEND", "memcached")],
        &[],
    );
    assert!(err.contains("limit.backend"), "{err}");
    let err = start_error(&[key, ("SMARTLEAD_PROXY__LIMIT__REQUESTS", "0")], &[]);
    assert!(err.contains("limit.requests"), "{err}");
    let err = start_error(
        &[key, ("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", "ftp://x")],
        &[],
    );
    assert!(err.contains("upstream.base_url"), "{err}");
    let err = start_error(&[key, ("SMARTLEAD_PROXY__SERVER__WORKERS", "5000")], &[]);
    assert!(err.contains("server.workers"), "{err}");
    let err = start_error(&[key, ("SMARTLEAD_PROXY__LIMT__REQUESTS", "5")], &[]);
    assert!(err.contains("limt"), "unknown section named: {err}");
}

#[test]
fn bad_config_files_name_the_key() {
    let key = ("SMARTLEAD_API_KEY", "k");
    let f = temp_file("bad-value.toml", "[server]\nlisten = \"not an address\"\n");
    let err = start_error(&[key], &["--config", f.to_str().unwrap()]);
    assert!(err.contains("server.listen"), "{err}");
    let f = temp_file("bad-duration.toml", "[retry]\nbase_delay = \"fast\"\n");
    let err = start_error(&[key, ("SMARTLEAD_PROXY_CONFIG", f.to_str().unwrap())], &[]);
    assert!(err.contains("retry.base_delay"), "{err}");
    let f = temp_file("unknown.toml", "[limit]\nrequets = 5\n");
    let err = start_error(&[key], &["--config", f.to_str().unwrap()]);
    assert!(err.contains("requets"), "{err}");
    let f = temp_file("broken.toml", "[limit\nrequests = 5\n");
    let err = start_error(&[key], &["--config", f.to_str().unwrap()]);
    assert!(err.contains("broken.toml"), "{err}");
    let err = start_error(&[key], &["--config", "/nonexistent/smartlead.toml"]);
    assert!(err.contains("/nonexistent/smartlead.toml"), "{err}");
}

#[test]
fn help_and_version() {
    let out = command(&[]).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("--config") && help.contains("simulate"),
        "{help}"
    );
    let out = command(&[]).arg("--version").output().unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains(env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn the_key_never_appears_in_logs_or_bodies() {
    let sim = secret_sim().await;
    let mut proxy = start(&sim.base_url(), &[]);
    let c = client();
    let mut bodies = Vec::new();
    let check = |resp: reqwest::Response| {
        for (name, value) in resp.headers() {
            let v = value.to_str().unwrap_or_default();
            assert!(
                !v.contains(SECRET) && !v.contains(SECRET_ENCODED),
                "header {name} leaks"
            );
        }
        resp
    };
    sim.push_fault(Fault::respond(
        400,
        Some("text/plain"),
        format!("invalid api_key={SECRET_ENCODED}"),
    ));
    sim.push_fault(Fault::respond(
        401,
        Some("application/json"),
        format!(r#"{{"message":"key {SECRET} revoked"}}"#),
    ));
    sim.push_fault(Fault::reset());
    for path in [
        "/api/v1/campaigns?api_key=client-key",
        "/api/v1/campaigns",
        "/api/v1/campaigns/1001",
        "/api/v1/campaigns",
        "/api/v1/campaigns/999",
        "/api/v1/../etc",
        "/nope",
    ] {
        let resp = check(proxy.get(path).await);
        bodies.push(resp.text().await.unwrap());
    }
    let resp = check(
        c.post(proxy.url("/api/v1/campaigns/1001/leads"))
            .json(&serde_json::json!({"lead_list": [{"email": "a@b.c"}]}))
            .send()
            .await
            .unwrap(),
    );
    bodies.push(resp.text().await.unwrap());
    // Six reach upstream; the reset GET is retried once.
    assert_eq!(sim.stats().requests, 7);
    // Proxy-made errors too: a body over the limit, a stalled upstream, and the metrics.
    let resp = check(
        c.post(proxy.url("/api/v1/echo"))
            .body(vec![b'x'; 2048])
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(resp.status(), 413);
    bodies.push(resp.text().await.unwrap());
    sim.push_fault(Fault::hang());
    let resp = check(
        c.get(proxy.url("/api/v1/campaigns"))
            .header("x-request-timeout", "300ms")
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(resp.status(), 504);
    bodies.push(resp.text().await.unwrap());
    let resp = check(proxy.get("/metrics").await);
    bodies.push(resp.text().await.unwrap());

    let status = proxy.terminate();
    assert!(status.success(), "exit status {status:?}");
    let output = proxy.output();
    let access: Vec<Value> = output
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    assert_eq!(access.len(), 11, "one access line per request: {output:#?}");
    for line in &access {
        for field in [
            "request_id",
            "method",
            "path",
            "status",
            "latency_ms",
            "attempts",
        ] {
            assert!(!line[field].is_null(), "{field} missing in {line}");
        }
    }
    assert!(output.iter().any(|l| l.contains("shutting down")));
    for text in output.iter().chain(bodies.iter()) {
        assert!(
            !text.contains(SECRET) && !text.contains(SECRET_ENCODED),
            "key leaked: {text}"
        );
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let sim = secret_sim().await;
    let mut proxy = start(
        &sim.base_url(),
        &[("SMARTLEAD_PROXY__SERVER__SHUTDOWN_GRACE", "5s")],
    );
    sim.push_fault(Fault::delay(Duration::from_millis(800)));
    let url = proxy.url("/api/v1/campaigns");
    let in_flight = tokio::spawn(async move { client().get(url).send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request was answered"
    );
}

#[test]
fn default_config_file_matches_the_built_in_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let env = std::collections::HashMap::from([("SMARTLEAD_API_KEY".to_string(), "k".to_string())]);
    let from_file =
        smartlead_proxy::Settings::load_from(&root.join("config/default.toml"), None, &env)
            .unwrap();
    let built_in =
        smartlead_proxy::Settings::load_from(Path::new("/nonexistent"), None, &env).unwrap();
    assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
    assert!(
        !format!("{from_file:?}").contains("ApiKey(k"),
        "Debug redacts the key"
    );
}

#[tokio::test]
async fn sigint_stops_it_cleanly() {
    let sim = secret_sim().await;
    let mut proxy = start(&sim.base_url(), &[]);
    assert_eq!(proxy.get("/api/v1/campaigns").await.status(), 200);
    let status = tokio::task::spawn_blocking(move || proxy.signal("-INT"))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sigterm_answers_queued_requests_with_503_at_the_grace_deadline() {
    let sim = secret_sim().await;
    let mut proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY__SERVER__SHUTDOWN_GRACE", "2s"),
            ("SMARTLEAD_PROXY__LIMIT__REQUESTS", "1"),
            ("SMARTLEAD_PROXY__LIMIT__PERIOD", "60s"),
            ("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", "300s"),
            // Connections are dealt round-robin: every thread holds some of the requests.
            ("SMARTLEAD_PROXY__SERVER__WORKERS", "3"),
        ],
    );
    // The one slot goes to a slow request still running when SIGTERM comes ...
    sim.push_fault(Fault::delay(Duration::from_millis(1000)));
    let c = client();
    let spawn_get = |path: &str| {
        let (c, url) = (c.clone(), proxy.url(path));
        tokio::spawn(async move {
            let r = c.get(url).send().await.expect("answered, not dropped");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        })
    };
    let in_flight = spawn_get("/api/v1/campaigns");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... and these wait for slots a minute away (each its own request: identical ones
    // would share the one in flight).
    let queued: Vec<_> = (0..3)
        .map(|n| spawn_get(&format!("/api/v1/campaigns?n={n}")))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || proxy.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "exited within grace + flush"
    );
    assert_eq!(in_flight.await.unwrap().0, 200, "in-flight work finished");
    for q in queued {
        let (status, body) = q.await.unwrap();
        assert_eq!(status, 503, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "UNAVAILABLE");
    }
    assert_eq!(
        sim.stats().requests,
        1,
        "queued requests never reached upstream"
    );
}

#[tokio::test]
async fn healthcheck_subcommand_reports_liveness() {
    let sim = secret_sim().await;
    let mut proxy = start(&sim.base_url(), &[]);
    let url = proxy.url("/healthz");
    let ok = command(&[])
        .args(["healthcheck", "--url", &url])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let port = closed_port().await;
    let listen = format!("127.0.0.1:{port}");
    let down = command(&[("SMARTLEAD_PROXY__SERVER__LISTEN", &listen)])
        .arg("healthcheck")
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains(&port.to_string()));
    let _ = tokio::task::spawn_blocking(move || proxy.terminate()).await;
}

#[tokio::test]
async fn listening_beyond_loopback_without_tokens_warns() {
    let sim = secret_sim().await;
    let mut proxy = start(
        &sim.base_url(),
        &[("SMARTLEAD_PROXY__SERVER__LISTEN", "0.0.0.0:0")],
    );
    let output = tokio::task::spawn_blocking(move || {
        assert!(proxy.terminate().success());
        proxy.output()
    })
    .await
    .unwrap();
    assert!(
        output
            .iter()
            .any(|l| l.contains("WARN") && l.contains("server.access_tokens")),
        "{output:#?}"
    );
}

#[tokio::test]
async fn log_bodies_shows_the_traffic_log_whatever_the_level() {
    let sim = secret_sim().await;
    let mut proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
            ("SMARTLEAD_PROXY__LOG__BODIES", "true"),
            ("SMARTLEAD_PROXY__LOG__BODY_BYTES", "24"),
        ],
    );
    let body = format!(r#"{{"note":"{SECRET} {}"}}"#, "x".repeat(100));
    let resp = client()
        .post(proxy.url("/api/v1/echo?api_key=client-own"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert!(proxy.terminate().success());
    let output = proxy.output();
    let records: Vec<Value> = output
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "upstream traffic")
        .collect();
    assert_eq!(records.len(), 1, "{output:#?}");
    let r = &records[0];
    assert_eq!(r["level"], "DEBUG");
    assert_eq!(r["path"], "/api/v1/echo?api_key=***");
    assert_eq!(
        r["request_body"],
        format!(
            r#"{{"note":"*** xxxxxxxxxxx… [{} bytes in all]"#,
            body.len()
        )
    );
    assert_eq!(r["status"], 200);
    assert!(
        !output
            .iter()
            .any(|l| l.contains("\"DEBUG\"") && !l.contains("upstream traffic")),
        "only the traffic log is let through at debug level: {output:#?}"
    );
    for line in &output {
        assert!(
            !line.contains(SECRET)
                && !line.contains(SECRET_ENCODED)
                && !line.contains("client-own"),
            "leaked: {line}"
        );
    }
}

#[test]
fn absurd_durations_are_start_up_errors() {
    let key = ("SMARTLEAD_API_KEY", "k");
    for name in [
        "LIMIT__MAX_WAIT",
        "LIMIT__PERIOD",
        "LIMIT__MARGIN",
        "UPSTREAM__TIMEOUT",
        "UPSTREAM__CONNECT_TIMEOUT",
        "SERVER__CLIENT_TIMEOUT",
        "SERVER__SHUTDOWN_GRACE",
        "RETRY__MAX_DELAY",
    ] {
        let var = format!("SMARTLEAD_PROXY__{name}");
        let config_key = name.to_ascii_lowercase().replace("__", ".");
        for value in ["500000000000years", "400days"] {
            let err = start_error(&[key, (&var, value)], &[]);
            assert!(err.contains(&config_key), "{var}={value}: {err}");
        }
    }
}

#[test]
fn credentials_in_the_base_url_are_masked_in_the_error() {
    let err = start_error(
        &[
            ("SMARTLEAD_API_KEY", "k"),
            (
                "SMARTLEAD_PROXY__UPSTREAM__BASE_URL",
                "https://user:hunter2-s3cret@server.smartlead.ai/api/v1",
            ),
        ],
        &[],
    );
    assert!(err.contains("upstream.base_url"), "{err}");
    assert!(
        err.contains("https://***@server.smartlead.ai/api/v1"),
        "{err}"
    );
    assert!(!err.contains("hunter2") && !err.contains("user:"), "{err}");
}

/// A terminal hangup, logrotate or `systemctl reload` sends SIGHUP: no waiting request is
/// dropped, and the proxy says it changed nothing.
#[tokio::test]
async fn sighup_drops_no_waiting_request() {
    let sim = Sim::start(SimConfig {
        api_key: Some(SECRET.into()),
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY__LIMIT__REQUESTS", "25"),
            ("SMARTLEAD_PROXY__LIMIT__PERIOD", "1s"),
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
        ],
    );
    let c = client();
    let waiting: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), proxy.url("/api/v1/campaigns"));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        proxy.send("-HUP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in waiting {
        assert_eq!(w.await.unwrap().expect("answered"), 200);
    }
    let mut proxy = proxy;
    assert!(proxy.child.try_wait().unwrap().is_none(), "still running");
    let hups = proxy
        .output()
        .iter()
        .filter(|l| l.contains("SIGHUP"))
        .count();
    assert_eq!(hups, 3, "{:#?}", proxy.output());
    assert!(proxy.terminate().success());
}

/// The binary at debug level (its dependencies' records included) against a hostile
/// upstream: the key shows in no line of its output, no body and no header.
#[tokio::test]
async fn the_binary_at_debug_level_never_shows_a_hostile_key() {
    let base = hostile_upstream().await;
    let mut proxy = start(
        &base,
        &[
            ("SMARTLEAD_API_KEY", HOSTILE_KEY),
            ("SMARTLEAD_PROXY__LOG__BODIES", "true"),
            ("SMARTLEAD_PROXY__LOG__BODY_BYTES", "4096"),
            ("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", "10485760"),
            ("RUST_LOG", "debug"),
        ],
    );
    let mut seen = Vec::new();
    for (shape, status) in SHAPES {
        let resp = proxy.get(&format!("/api/v1/hostile/{shape}")).await;
        assert_eq!(resp.status().as_u16(), *status, "{shape}");
        for (name, value) in resp.headers() {
            seen.push(format!(
                "{name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        seen.push(String::from_utf8_lossy(&resp.bytes().await.unwrap()).into_owned());
    }
    for raw in [
        "CONNECT /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "TRACE /api/v1/campaigns HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_request(proxy.addr, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        seen.push(answer);
    }
    seen.push(proxy.get("/metrics").await.text().await.unwrap());
    assert!(proxy.terminate().success());
    let output = proxy.output();
    assert!(
        output.iter().any(|l| l.contains("upstream traffic")),
        "the traffic log ran"
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("\"level\":\"DEBUG\"") && !l.contains("smartlead_proxy")),
        "dependencies logged at debug too"
    );
    for (n, line) in output.iter().enumerate() {
        assert_no_key(line, HOSTILE_KEY, &format!("output line {n}"));
    }
    for text in &seen {
        assert_no_key(text, HOSTILE_KEY, "an answer");
    }
}

#[test]
fn check_config_prints_the_effective_settings_without_secrets() {
    let f = temp_file(
        "check.toml",
        "[server]\naccess_tokens = [\"ui:tok-secret-1\", \"plain-secret-2\"]\n[limit]\nwindows = [\"5/1s\"]\n",
    );
    let out = command(&[
        ("SMARTLEAD_API_KEY", SECRET),
        (
            "SMARTLEAD_PROXY__REDIS__URL",
            "redis://:redis-pass-3@127.0.0.1:6379",
        ),
    ])
    .args(["check-config", "--config", f.to_str().unwrap()])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let shown = String::from_utf8(out.stdout).unwrap();
    for secret in [
        SECRET,
        SECRET_ENCODED,
        "tok-secret-1",
        "plain-secret-2",
        "redis-pass-3",
    ] {
        assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
    }
    assert!(shown.contains("api_key = \"***\""), "{shown}");
    assert!(
        shown.contains("access_tokens = [\"ui:***\", \"***\"]"),
        "{shown}"
    );
    assert!(shown.contains("windows = [\"5/1s\"]"), "{shown}");
    assert!(
        shown.contains("url = \"redis://***@127.0.0.1:6379\""),
        "{shown}"
    );
    // What it prints is itself a configuration (secrets aside) that loads.
    let parsed: toml::Table = toml::from_str(&shown).unwrap();
    assert_eq!(parsed["limit"]["max_wait"].as_str(), Some("30s"));
}

#[test]
fn check_config_refuses_like_start_up() {
    let out = command(&[
        ("SMARTLEAD_API_KEY", "k"),
        ("SMARTLEAD_PROXY__LIMIT__MAX_QUEUE", "0"),
    ])
    .arg("check-config")
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("limit.max_queue"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn tls_and_egress_settings_are_checked_at_start() {
    let key = ("SMARTLEAD_API_KEY", "k");
    let err = start_error(
        &[
            key,
            ("SMARTLEAD_PROXY__UPSTREAM__CA_FILE", "/nonexistent/ca.pem"),
        ],
        &[],
    );
    assert!(
        err.contains("upstream.ca_file") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let not_pem = temp_file("not-a-ca.pem", "hello\n");
    let err = start_error(
        &[
            key,
            (
                "SMARTLEAD_PROXY__UPSTREAM__CA_FILE",
                not_pem.to_str().unwrap(),
            ),
        ],
        &[],
    );
    assert!(err.contains("no PEM certificate"), "{err}");
    let err = start_error(
        &[
            key,
            (
                "SMARTLEAD_PROXY__UPSTREAM__PROXY",
                "socks5://127.0.0.1:1080",
            ),
        ],
        &[],
    );
    assert!(err.contains("upstream.proxy"), "{err}");
    let redis = [key, ("SMARTLEAD_PROXY__LIMIT__BACKEND", "redis")];
    let err = start_error(
        &[
            redis[0],
            redis[1],
            ("SMARTLEAD_PROXY__REDIS__MODE", "sentinel"),
        ],
        &[],
    );
    assert!(err.contains("redis.master_name"), "{err}");
    let err = start_error(
        &[
            redis[0],
            redis[1],
            ("SMARTLEAD_PROXY__REDIS__URL", "redis://a:1,redis://b:2"),
        ],
        &[],
    );
    assert!(err.contains("redis.mode"), "{err}");
    let err = start_error(
        &[redis[0], redis[1], ("SMARTLEAD_PROXY__REDIS__MODE", "ring")],
        &[],
    );
    assert!(err.contains("redis.mode"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_a_bad_one_changes_nothing() {
    let sim = secret_sim().await;
    let file = temp_file(
        "reload.toml",
        "[server]\naccess_tokens = [\"first-token\"]\n[log]\nlevel = \"info\"\n",
    );
    let proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY_CONFIG", file.to_str().unwrap()),
            ("SMARTLEAD_PROXY__LOG__LEVEL", ""),
        ],
    );
    let with = |token: &'static str| {
        let req = client()
            .get(proxy.url("/api/v1/campaigns"))
            .header("authorization", format!("Bearer {token}"));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(with("first-token").await, 200);
    let access_lines = |p: &Running| {
        p.output()
            .iter()
            .filter(|l| l.contains("/api/v1/campaigns"))
            .count()
    };
    assert!(
        eventually(|| async { access_lines(&proxy) >= 1 }).await,
        "info level logs each request"
    );

    std::fs::write(
        &file,
        "[server]\naccess_tokens = [\"second-token\"]\n[log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    proxy.send("-HUP");
    assert!(
        eventually(|| async { with("second-token").await == 200 }).await,
        "new token"
    );
    // Lines reach us through a reader thread: let the ones from before settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged_after_reload = access_lines(&proxy);
    assert_eq!(with("first-token").await, 401);
    assert_eq!(with("second-token").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        access_lines(&proxy),
        logged_after_reload,
        "warn level: requests no longer logged"
    );

    std::fs::write(&file, "[limit]\nmax_queue = 0\n").unwrap();
    proxy.send("-HUP");
    assert!(
        eventually(|| async {
            proxy
                .output()
                .iter()
                .any(|l| l.contains("reload refused") && l.contains("limit.max_queue"))
        })
        .await,
        "one ERROR line naming the key: {:#?}",
        proxy.output()
    );
    assert_eq!(
        with("second-token").await,
        200,
        "the running configuration stays"
    );
    let metrics = proxy.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("smartlead_proxy_config_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smartlead_proxy_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    let mut proxy = proxy;
    assert!(proxy.terminate().success());
}

/// A key as SmartLead issues them, pasted where it does not belong.
const PASTED: &str = "0f3c9a7d-2b8e-4c61-a5f0-9e3d7b2c8a41_k2x9q7";

/// Config files with [`PASTED`] in a wrong setting, each with the key its error names.
fn pasted_configs() -> Vec<(&'static str, String)> {
    let url = format!("https://server.smartlead.ai/api/v1?api_key={PASTED}");
    vec![
        (
            "upstream.base_url",
            format!("[upstream]\nbase_url = {url:?}\n"),
        ),
        (
            "limit.windows",
            format!("[limit]\nwindows = [\"10/1s\", {PASTED:?}]\n"),
        ),
        (
            "limit.max_wait",
            format!("[limit]\nmax_wait = {PASTED:?}\n"),
        ),
        (
            "limit.max_queue",
            format!("[limit]\nmax_queue = {PASTED:?}\n"),
        ),
        (
            "redis.url",
            format!("[limit]\nbackend = \"redis\"\n[redis]\nurl = {PASTED:?}\n"),
        ),
        (
            "accounts[0].name",
            format!("[[accounts]]\nname = {PASTED:?}\nkey_env = \"K\"\n"),
        ),
        (
            "accounts[a].key_env",
            format!("[[accounts]]\nname = \"a\"\nkey_env = {PASTED:?}\n"),
        ),
        ("log.format", format!("[log]\nformat = {PASTED:?}\n")),
        (
            "upstream.proxy",
            format!("[upstream]\nproxy = \"ftp://{PASTED}\"\n"),
        ),
        ("config file", format!("[upstream]\nbase_url = {PASTED}\n")),
    ]
}

#[test]
fn a_key_in_the_wrong_setting_is_never_printed_at_start_or_by_check_config() {
    let key = ("SMARTLEAD_API_KEY", SECRET);
    for (i, (named, text)) in pasted_configs().into_iter().enumerate() {
        let f = temp_file(&format!("pasted-{i}.toml"), &text);
        let path = f.to_str().unwrap();
        for args in [
            vec!["--config", path],
            vec!["check-config", "--config", path],
        ] {
            let err = start_error(&[key], &args);
            assert!(err.contains(named), "{named}: {err}");
            assert_no_key(&err, PASTED, &format!("{named} ({args:?})"));
            assert_no_key(&err, SECRET, &format!("{named} ({args:?})"));
        }
    }
    // Through the environment too, where the value may also be a URL with the key.
    let url = format!("https://server.smartlead.ai/api/v1?api_key={PASTED}");
    for (var, value) in [
        ("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", url.as_str()),
        ("SMARTLEAD_PROXY__LIMIT__WINDOWS", PASTED),
        ("SMARTLEAD_PROXY__LIMIT__MAX_WAIT", PASTED),
        ("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", PASTED),
    ] {
        let err = start_error(&[key, (var, value)], &[]);
        assert_no_key(&err, PASTED, var);
    }
}

#[tokio::test]
async fn a_reload_refused_for_a_pasted_key_does_not_print_it() {
    let sim = secret_sim().await;
    let f = temp_file("reloaded.toml", "[limit]\nmax_wait = \"5s\"\n");
    let path = f.to_str().unwrap().to_owned();
    let mut proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY_CONFIG", &path),
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
        ],
    );
    // start() sets upstream.base_url in the environment, which wins over the file.
    let mut configs = pasted_configs();
    configs.retain(|(named, _)| *named != "upstream.base_url");
    for (i, (named, text)) in configs.iter().enumerate() {
        std::fs::write(&f, text).unwrap();
        proxy.send("-HUP");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proxy
            .output()
            .iter()
            .filter(|l| l.contains("reload refused"))
            .count()
            <= i
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{named}: {:#?}",
                proxy.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        proxy.get("/api/v1/campaigns").await.status(),
        200,
        "the old one serves"
    );
    let output = proxy.output().join("\n");
    assert_no_key(&output, PASTED, "the reload errors");
    assert_no_key(&output, SECRET, "the reload errors");
    assert!(proxy.terminate().success());
}

/// Connections that send a POST head and then trickle their body: with the systemd
/// default of 1024 open files they used to take every descriptor, so that nothing else,
/// `/healthz` included, could be accepted.
#[tokio::test]
async fn trickling_clients_past_the_file_limit_lock_nobody_out() {
    let _heavy = crate::support::heavy().await;
    let _ = rlimit::increase_nofile_limit(8192); // the test's own 1,100 connections
    let sim = secret_sim().await;
    let mut proxy = start_via(
        &["prlimit", "--nofile=1024:1024"],
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY__SERVER__BODY_TIMEOUT", "4s"),
            ("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", "100000"),
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
        ],
    );
    let mut trickling = Vec::new();
    for _ in 0..1100 {
        let Ok(mut s) = tokio::net::TcpStream::connect(proxy.addr).await else {
            continue;
        };
        use tokio::io::AsyncWriteExt;
        let head = b"POST /api/v1/campaigns/1/settings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
        if s.write_all(head).await.is_ok() {
            trickling.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let health = c
        .get(proxy.url("/healthz"))
        .send()
        .await
        .expect("healthz answers");
    assert_eq!(health.status(), 200);
    let ready = c
        .get(proxy.url("/readyz"))
        .send()
        .await
        .expect("readyz answers");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["details"]["reason"], "connections", "{body}");
    let refused = c
        .get(proxy.url("/api/v1/campaigns"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    assert_eq!(body["error"]["details"]["reason"], "connections", "{body}");
    // server.body_timeout ends the trickles (a byte now and then never stalls them).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for s in &mut trickling {
            use tokio::io::AsyncWriteExt;
            let _ = s.try_write(b" ");
            let _ = s.flush().await;
        }
    }
    let served = c.get(proxy.url("/api/v1/campaigns")).send().await.unwrap();
    assert_eq!(served.status(), 200, "the trickles were timed out");
    assert_eq!(
        c.get(proxy.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let mut timed_out = 0;
    for s in trickling.iter_mut().take(50) {
        let mut buf = vec![0u8; 2048];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
            && String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408")
        {
            timed_out += 1;
        }
    }
    assert!(timed_out > 0, "the trickles got 408");
    drop(trickling);
    let output = proxy.output();
    let accept_failures = output
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert_eq!(accept_failures, 0, "{:#?}", &output[..output.len().min(20)]);
    let limits = output
        .iter()
        .find(|l| l.contains("open files limit"))
        .expect("logged");
    assert!(
        limits.contains("\"soft\":1024") && limits.contains("\"hard\":1024"),
        "{limits}"
    );
    assert!(proxy.terminate().success());
}

#[test]
fn loose_numbers_and_files_are_start_up_errors_naming_what_was_set() {
    let key = ("SMARTLEAD_API_KEY", SECRET);
    let windows = (1..=17)
        .map(|i| format!("\"{i}/{i}s\""))
        .collect::<Vec<_>>()
        .join(",");
    for (text, named) in [
        (
            "[server]\nmax_body_bytes = 1048576.9\n",
            "server.max_body_bytes",
        ),
        ("[server]\nmax_body_bytes = 1e30\n", "server.max_body_bytes"),
        ("[limit]\nmax_queue = 0\n", "limit.max_queue"),
        ("[retry]\nmax_retries = 2.5\n", "retry.max_retries"),
        (
            &format!("[limit]\nwindows = [{windows}]\n"),
            "limit.windows",
        ),
    ] {
        let f = temp_file("loose.toml", text);
        let err = start_error(&[key], &["--config", f.to_str().unwrap()]);
        assert!(
            err.contains(&format!("{named}:")) || err.contains(&format!("{named} ")),
            "{text}: {err}"
        );
        assert!(
            !err.contains("max_buffered_bytes") && !err.contains("max_queue_per_client"),
            "{err}"
        );
    }
    let dir = temp_file("x", "")
        .parent()
        .unwrap()
        .join("a-directory.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let err = start_error(&[key], &["--config", dir.to_str().unwrap()]);
    assert!(
        err.contains("a-directory.toml") && err.contains("cannot be read"),
        "{err}"
    );
}

/// The cache keeps to `cache.max_bytes`: 1,500 distinct 10 KB answers through a cache
/// of 2 MiB grow the process by less than 24 MiB (its own process, so nothing else
/// counts).
#[tokio::test]
async fn the_cache_keeps_memory_within_max_bytes() {
    let _heavy = crate::support::heavy().await;
    let sim = Sim::start(SimConfig {
        api_key: Some(SECRET.into()),
        requests: 0,
        record: false,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let config = temp_file(
        "cache-memory.toml",
        "[cache]\nttl = { \"/echo/**\" = \"5m\" }\nmax_bytes = 2097152\nmax_entry_bytes = 65536\n",
    );
    let config = config.to_str().unwrap();
    let mut proxy = start(
        &sim.base_url(),
        &[
            ("SMARTLEAD_PROXY_CONFIG", config),
            ("SMARTLEAD_PROXY__LOG__LEVEL", "info"),
            ("SMARTLEAD_PROXY__LIMIT__WINDOWS", "100000/1s"),
        ],
    );
    let body = "x".repeat(10 * 1024);
    sim.push_fault(
        Fault::respond(200, Some("application/json"), body)
            .on("/echo")
            .times(1600),
    );
    let get = |n: usize| {
        let url = proxy.url(&format!("/api/v1/echo/{n}"));
        async move {
            let resp = client().get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap().len()
        }
    };
    // Warm up the allocator, the threads and the connections first.
    for n in 0..100 {
        get(100_000 + n).await;
    }
    let before = rss_kib(proxy.child.id());
    for chunk in (0..1500).collect::<Vec<_>>().chunks(25) {
        for len in futures_util::future::join_all(chunk.iter().map(|n| get(*n))).await {
            assert_eq!(len, 10 * 1024);
        }
    }
    let grown_mib = rss_kib(proxy.child.id()).saturating_sub(before) / 1024;
    let status: Value = proxy.get_json("/status.json").await;
    let bytes = status["cache"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 2 * 1024 * 1024, "{bytes}");
    let entries = status["cache"]["entries"].as_u64().unwrap();
    assert!((150..210).contains(&entries), "{entries}");
    assert!(status["cache"]["evictions"].as_u64().unwrap() >= 1300);
    assert!(grown_mib < 24, "RSS grew by {grown_mib} MiB");
    assert!(proxy.terminate().success());
}
