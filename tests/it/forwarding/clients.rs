//! A real SmartLead client nobody here wrote, pointed at the proxy: `smartlead-cli` from
//! PyPI, installed in a virtualenv under `target/`. Without network (or Python) the test
//! says why and skips; it never fails CI for the network.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::{KEY, settings, spawn_proxy};

const PACKAGE: &str = "smartlead-cli==0.1.4";

/// The CLI's executable, installing it on first use; `None` when that is impossible here.
fn smartlead_cli() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/smartlead-cli-venv");
    let exe = venv.join("bin/smartlead");
    if exe.exists() {
        return Some(exe);
    }
    let ok = |out: std::io::Result<Output>, what: &str| match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "skipped: {what} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("skipped: {what} could not run: {e}");
            false
        }
    };
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output();
    if !ok(made, "python3 -m venv") {
        return None;
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "20",
            PACKAGE,
        ])
        .output();
    if !ok(installed, &format!("pip install {PACKAGE}")) {
        let _ = std::fs::remove_dir_all(&venv);
        return None;
    }
    exe.exists().then_some(exe)
}

async fn run(exe: &PathBuf, base_url: &str, args: &[&str]) -> (bool, Value) {
    let home = std::env::temp_dir().join(format!("slcli-home-{}", std::process::id()));
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .env("SMARTLEAD_BASE_URL", base_url)
        // The CLI refuses to start without some key; the real one is only the proxy's.
        .env("SMARTLEAD_API_KEY", "placeholder-not-the-key")
        .env("SMARTLEAD_PRETTY", "false");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("the CLI runs");
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .into_owned();
    let json = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        // Errors may go to stdout instead.
        serde_json::from_slice(&out.stdout).unwrap_or(Value::String(text))
    });
    (out.status.success(), json)
}

#[tokio::test]
async fn smartlead_cli_works_unchanged_through_the_proxy() {
    let Some(exe) = tokio::task::spawn_blocking(smartlead_cli).await.unwrap() else {
        return;
    };
    let sim = Sim::start(SimConfig {
        api_key: Some(KEY.into()),
        requests: 1000,
        period: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let proxy = spawn_proxy(settings(&sim.base_url())).await;
    let base = proxy.url("/api/v1");

    let (ok, campaigns) = run(&exe, &base, &["campaigns", "list"]).await;
    assert!(ok, "{campaigns}");
    assert!(
        campaigns
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["id"] == 1001)),
        "{campaigns}"
    );

    let (ok, campaign) = run(&exe, &base, &["campaigns", "get", "1001"]).await;
    assert!(ok, "{campaign}");
    assert_eq!(campaign["name"], "Q4 outreach");

    let body =
        r#"{"lead_list":[{"email":"a@example.com","first_name":"A"},{"email":"b@example.com"}]}"#;
    let (ok, added) = run(
        &exe,
        &base,
        &["campaigns", "leads", "add", "1001", "--body-json", body],
    )
    .await;
    assert!(ok, "{added}");
    assert_eq!(added["upload_count"], 2);

    let (ok, listed) = run(&exe, &base, &["campaigns", "leads", "list", "1001"]).await;
    assert!(ok, "{listed}");
    assert_eq!(listed["total_leads"], 2);

    // Errors reach the CLI in the envelope it understands.
    let (ok, missing) = run(&exe, &base, &["campaigns", "get", "99"]).await;
    assert!(!ok);
    assert!(missing.to_string().contains("NOT_FOUND"), "{missing}");
    let before = sim.stats().requests;
    let bad = r#"{"lead_list":[{"email":"not-an-address"}]}"#;
    let (ok, refused) = run(
        &exe,
        &base,
        &["campaigns", "leads", "add", "1001", "--body-json", bad],
    )
    .await;
    assert!(!ok);
    assert!(
        refused.to_string().contains("VALIDATION_ERROR"),
        "{refused}"
    );
    assert_eq!(sim.stats().requests, before, "refused by the proxy itself");

    // SmartLead only ever saw the proxy's key.
    for r in sim.requests() {
        assert_eq!(r.api_keys(), vec![KEY.to_owned()], "{}", r.path);
    }
    proxy.stop().await;
}
