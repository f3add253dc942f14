//! The real binary as a child process: start it with a config and environment, read
//! its log lines, stop it with a signal.

use serde_json::Value;
use smartlead_proxy::sim::{Sim, SimConfig};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// A key with characters that URL-encode, so both forms can be searched for.
pub const SECRET: &str = "sk/live+TESTKEY=42";

/// The proxy binary with output captured line by line.
pub struct Running {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub addr: std::net::SocketAddr,
}

pub const BIN: &str = env!("CARGO_BIN_EXE_smartlead-proxy");

pub const SECRET_ENCODED: &str = "sk%2Flive%2BTESTKEY%3D42";

pub fn command(envs: &[(&str, &str)]) -> Command {
    command_via(&[], envs)
}

/// The binary run by `wrapper` (a command and its arguments, like `prlimit`), if any.
pub fn command_via(wrapper: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(BIN);
            cmd
        }
        None => Command::new(BIN),
    };
    cmd.env_clear()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary expecting a start-up failure; returns its stderr.
pub fn start_error(envs: &[(&str, &str)], args: &[&str]) -> String {
    let mut child = command(envs).args(args).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("started instead of refusing the configuration: {envs:?} {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

/// A simulator that accepts only [`SECRET`].
pub async fn secret_sim() -> Sim {
    Sim::start(SimConfig {
        api_key: Some(SECRET.into()),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

pub fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

pub fn start(base_url: &str, extra: &[(&str, &str)]) -> Running {
    start_via(&[], base_url, extra)
}

pub fn start_via(wrapper: &[&str], base_url: &str, extra: &[(&str, &str)]) -> Running {
    let mut envs = vec![
        ("SMARTLEAD_API_KEY", SECRET),
        ("SMARTLEAD_PROXY__UPSTREAM__BASE_URL", base_url),
        ("SMARTLEAD_PROXY__SERVER__LISTEN", "127.0.0.1:0"),
        ("SMARTLEAD_PROXY__LOG__LEVEL", "debug"),
        ("SMARTLEAD_PROXY__RETRY__BASE_DELAY", "10ms"),
        ("SMARTLEAD_PROXY__SERVER__MAX_BODY_BYTES", "1024"),
    ];
    // Later ones win; an empty value leaves the variable unset.
    envs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    envs.extend(extra.iter().filter(|(_, v)| !v.is_empty()));
    let mut child = command_via(wrapper, &envs).spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let found = lines.lock().unwrap().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["message"] == "listening").then(|| v["addr"].as_str().unwrap().parse().unwrap())
        });
        if let Some(a) = found {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no listening line: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Running { child, lines, addr }
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        client().get(self.url(path)).send().await.unwrap()
    }

    /// A GET whose answer is JSON (any status), as a value.
    pub async fn get_json(&self, path: &str) -> Value {
        get_json(&self.url(path)).await
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM")
    }

    /// Sends `signal` without waiting for anything.
    pub fn send(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn signal(&mut self, signal: &str) -> std::process::ExitStatus {
        self.send(signal);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50)); // let readers drain
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// Polls `check` every 50 ms for up to 5 s.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    mut check: impl FnMut() -> F,
) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
