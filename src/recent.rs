//! The last error answers the proxy gave, for the status page: what, when, to whom, and
//! the hint, kept in a small ring (process-wide: one proxy per process).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::served::Served;

/// How many are kept.
pub const KEPT: usize = 50;

/// One error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// RFC 3339, UTC.
    pub at: String,
    pub status: u16,
    pub code: String,
    pub request_id: String,
    pub hint: Option<String>,
    pub account: Option<String>,
    pub client: Option<String>,
}

fn ring() -> &'static Mutex<VecDeque<ErrorAnswer>> {
    static RING: OnceLock<Mutex<VecDeque<ErrorAnswer>>> = OnceLock::new();
    RING.get_or_init(|| Mutex::new(VecDeque::with_capacity(KEPT)))
}

/// Keeps the error answer with `status` and envelope `body` (already scrubbed).
pub fn record(status: u16, body: &[u8], request_id: &str, served: &Served) {
    let envelope: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &envelope["error"];
    let answer = ErrorAnswer {
        at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        status,
        code: error["code"].as_str().unwrap_or("UNKNOWN").to_owned(),
        request_id: request_id.to_owned(),
        hint: error["details"]["hint"].as_str().map(str::to_owned),
        account: served.account.as_deref().map(str::to_owned),
        client: served.client.as_ref().map(ToString::to_string),
    };
    let mut ring = ring().lock().unwrap_or_else(|e| e.into_inner());
    if ring.len() == KEPT {
        ring.pop_front();
    }
    ring.push_back(answer);
}

/// The kept answers, newest first.
pub fn newest_first() -> Vec<ErrorAnswer> {
    let ring = ring().lock().unwrap_or_else(|e| e.into_inner());
    ring.iter().rev().cloned().collect()
}
