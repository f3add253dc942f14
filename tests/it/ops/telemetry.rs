//! What reaches the log sink: every line redacted at the subscriber (whoever wrote it),
//! and a panic as one JSON line. It runs in a process of its own: it installs the global
//! subscriber and panic hook.

use std::io::Write;
use std::sync::{Arc, Mutex};

use smartlead_proxy::config::LogSettings;
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::telemetry::{self, Redacting};

const KEY: &str = "Zx8/Wq+Rt=Yu-Io_Pa.Sd4";

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn lines_are_redacted_at_the_sink_and_a_panic_is_one_json_line() {
    if !crate::support::own_process(
        "ops::telemetry::lines_are_redacted_at_the_sink_and_a_panic_is_one_json_line",
    ) {
        return;
    }
    let sink = Sink::default();
    let log = LogSettings {
        level: "debug".into(),
        ..LogSettings::default()
    };
    let writer = {
        let sink = sink.clone();
        Redacting::new(move || sink.clone(), ApiKey::new(KEY).secrets())
    };
    telemetry::init_with_writer(&log, writer);
    telemetry::install_panic_hook();

    // What hyper-util once wrote for a CONNECT request, key and all.
    let encoded = KEY
        .replace('/', "%2F")
        .replace('+', "%2B")
        .replace('=', "%3D");
    tracing::warn!(
        target: "hyper_util::client::legacy::client",
        "HTTP/1.1 CONNECT request stripping path: /api/v1/campaigns?api_key={encoded}"
    );
    tracing::debug!(target: "some_dependency", uri = %format!("/x?api_key=client-own&k={KEY}"), "sending");
    let caught = std::panic::catch_unwind(|| panic!("a bug with\ntwo lines and {KEY}"));
    assert!(caught.is_err());

    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(v["timestamp"].is_string(), "{line}");
        for piece in [&KEY[..12], &encoded[..12], "Zx8", "client-own"] {
            assert!(!line.contains(piece), "{piece} in {line}");
        }
    }
    assert!(lines[0].contains("api_key=***"), "{}", lines[0]);
    let panic: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["target"], "smartlead_proxy::panic");
    assert!(
        panic["panic"]
            .as_str()
            .unwrap()
            .starts_with("a bug with\ntwo lines")
    );
    assert!(
        panic["location"]
            .as_str()
            .unwrap()
            .contains("tests/it/ops/telemetry.rs")
    );
}
