//! The status page, /status.json and `smartlead-proxy status`, against a proxy under load.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use smartlead_proxy::sim::{Fault, Sim, SimConfig};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_smartlead-proxy");

/// A proxy at 2 requests per 2 s with `a` and `b` queueing behind it: three of `a`'s
/// requests and two of `b`'s.
async fn under_load() -> (Sim, Proxy, Vec<tokio::task::JoinHandle<u16>>) {
    let sim = Sim::start(SimConfig {
        requests: 2,
        period: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = spawn_proxy(quota_settings(
        &sim.base_url(),
        2,
        Duration::from_secs(2),
        None,
    ))
    .await;
    let mut waiting = Vec::new();
    for (client, n) in [("bulk-worker", 3), ("ui-worker", 2)] {
        for _ in 0..n {
            let req = client_req(&proxy, client);
            waiting.push(tokio::spawn(async move {
                req.send().await.map(|r| r.status().as_u16()).unwrap_or(0)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    (sim, proxy, waiting)
}

fn client_req(proxy: &Proxy, id: &str) -> reqwest::RequestBuilder {
    client()
        .get(proxy.url("/api/v1/campaigns"))
        .header("x-client-id", id)
}

async fn finish(proxy: Proxy, waiting: Vec<tokio::task::JoinHandle<u16>>) {
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn status_json_shows_accounts_windows_and_waiting_clients() {
    let (_sim, proxy, waiting) = under_load().await;
    let resp = proxy.get("/status.json").await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(KEY), "no key: {text}");
    let s: Value = serde_json::from_str(&text).unwrap();
    let account = &s["accounts"][0];
    assert_eq!(account["name"], "default");
    let used = account["windows"][0]["used"].as_u64().unwrap();
    assert!((1..=2).contains(&used), "used {used} of 2");
    assert_eq!(account["windows"][0]["requests"], 2);
    assert_eq!(account["windows"][0]["period_seconds"], 2.0);
    assert!(account["waiting"].as_u64().unwrap() >= 2, "{account}");
    for id in ["bulk-worker", "ui-worker"] {
        let c = account["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {account}"));
        assert!(c["waiting"].as_u64().unwrap() + c["served"].as_u64().unwrap() >= 1);
    }
    assert!(
        account["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["waiting"].as_u64().unwrap() >= 1)
    );
    assert_eq!(s["limiter"]["backend"], "local");
    assert!(s["retry_budget"][0]["left"].is_u64());
    assert!(s["uptime_seconds"].is_u64());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    finish(proxy, waiting).await;
}

#[tokio::test]
async fn a_request_failed_after_its_retries_is_among_the_recent_errors() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let mut s = settings(&sim.base_url());
    s.retry.max_retries = 1;
    let proxy = spawn_proxy(s).await;
    for _ in 0..2 {
        sim.push_fault(Fault::json(503, json!({"message": "maintenance"})));
    }
    let failed = proxy
        .get_with("/api/v1/campaigns", &[("x-client-id", "nightly-sync")])
        .await;
    assert_eq!(failed.status(), 503);
    let id = failed.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = proxy.get("/status.json").await.text().await.unwrap();
    assert!(!text.contains(KEY));
    let s: Value = serde_json::from_str(&text).unwrap();
    let e = s["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} in {text}"));
    assert_eq!(e["status"], 503);
    assert_eq!(e["code"], "UPSTREAM_ERROR");
    assert_eq!(e["account"], "default");
    assert_eq!(e["client"], "nightly-sync");
    assert!(e["hint"].as_str().unwrap().len() > 10, "{e}");
    assert!(e["at"].as_str().unwrap().ends_with('Z'));
    proxy.stop().await;
}

/// Headless Chromium's DOM of `url` after the page's script had 3 s of (virtual) time.
/// One browser at a time (they share a profile directory, and each takes both cores
/// while it starts).
pub(crate) fn rendered(url: &str) -> String {
    let _heavy = crate::support::heavy_blocking();
    let profile = std::env::temp_dir().join(format!("slp-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("chromium (.ci/run installs Debian's chromium package)");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The account, both clients and the window's use, as the page shows them.
fn assert_shows_the_load(dom: &str) {
    assert!(dom.contains("data-account=\"default\""), "{dom}");
    for id in ["bulk-worker", "ui-worker"] {
        assert!(
            dom.contains(&format!("<td class=\"client\">{id}</td>")),
            "{id}: {dom}"
        );
    }
    assert!(dom.contains("2s</span>"), "the window's label: {dom}");
    assert!(
        dom.contains("<span class=\"num\">1/2</span>")
            || dom.contains("<span class=\"num\">2/2</span>"),
        "the window's use: {dom}"
    );
}

#[tokio::test]
async fn a_real_browser_renders_the_page_and_its_script_refreshes_it() {
    let (_sim, proxy, waiting) = under_load().await;
    let url = proxy.url("/status");
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert_shows_the_load(&dom);
    // The script re-rendered it from /status.json.
    assert!(dom.contains("data-refreshed="), "{dom}");
    finish(proxy, waiting).await;
}

#[tokio::test]
async fn without_scripts_the_server_rendered_page_shows_the_same() {
    let (_sim, proxy, waiting) = under_load().await;
    let html = proxy.get("/status").await.text().await.unwrap();
    assert_shows_the_load(&html);
    assert!(!html.contains("data-refreshed="));
    finish(proxy, waiting).await;
}

#[tokio::test]
async fn the_page_is_self_contained() {
    let (_sim, proxy) = sim_and_proxy().await;
    let resp = proxy.get("/status").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'sha256-",
        "frame-ancestors 'none'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(directive), "{directive}: {csp}");
    }
    assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["referrer-policy"], "no-referrer");
    let html = resp.text().await.unwrap();
    assert!(html.contains("prefers-color-scheme"));
    assert!(html.contains("name=\"viewport\""));
    for attr in ["src=", "href=", "url(", "@import"] {
        for (at, _) in html.match_indices(attr) {
            let after = &html[at + attr.len()..(at + attr.len() + 12).min(html.len())];
            assert!(
                !after.contains("http") && !after.contains("//"),
                "{attr}{after} points off the proxy"
            );
            if attr == "href=" {
                assert!(after.starts_with("\"data:"), "only an inline icon: {after}");
            }
        }
    }
    assert!(!html.contains("stylesheet"), "no stylesheet links");
    assert!(
        html.contains("fetch('status.json'"),
        "refreshes from this proxy only"
    );
    proxy.stop().await;
}

/// `smartlead-proxy status --url` against `proxy`, run as a process.
pub(crate) async fn status_command(proxy: &Proxy) -> std::process::Output {
    let base = format!("http://{}", proxy.addr);
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["status", "--url", &base])
            .env_clear()
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_status_command_prints_the_picture_or_one_line() {
    let (_sim, proxy, waiting) = under_load().await;
    let out = status_command(&proxy).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    for part in ["default", "2/2s", "bulk-worker", "ui-worker", "waiting"] {
        assert!(shown.contains(part), "{part}: {shown}");
    }
    let port = closed_port().await;
    let out = Command::new(BIN)
        .args(["status", "--url", &format!("http://127.0.0.1:{port}")])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cannot read the proxy's status"), "{err}");
    finish(proxy, waiting).await;
}

#[tokio::test]
async fn the_status_can_require_a_token() {
    let (_sim, proxy) = sim_and_proxy_with(|s| {
        s.server.access_tokens = vec![secrecy::SecretString::from("ops:letmein")];
        s.server.status_requires_token = true;
    })
    .await;
    for path in ["/status", "/status.json"] {
        expect_envelope(proxy.get(path).await, 401, "UNAUTHORIZED").await;
        let ok = proxy
            .get_with(path, &[("authorization", "Bearer letmein")])
            .await;
        assert_eq!(ok.status(), 200, "{path}");
    }
    assert_eq!(
        proxy.get("/metrics").await.status(),
        200,
        "metrics stay open"
    );
    proxy.stop().await;
}

/// Instance rows in a page: `data-instance="<id>"` (the page's script has the attribute
/// in its text too, without an id).
pub(crate) fn instances(html: &str) -> usize {
    html.match_indices("data-instance=\"")
        .filter(|(at, m)| html[at + m.len()..].starts_with(|c: char| c.is_ascii_hexdigit()))
        .count()
}
