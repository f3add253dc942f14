//! The debug traffic log: one record per upstream attempt (method, path, bodies cut to
//! `log.body_bytes`, status, timing), with the API key redacted everywhere.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::config::LogSettings;
use crate::key::Secrets;

/// The per-request switch, honoured only with `log.allow_debug_header = true`; removed
/// before forwarding.
pub const DEBUG_HEADER: HeaderName = HeaderName::from_static("x-debug-log");
/// The tracing target of the records; `log.bodies` or `log.allow_debug_header` turn it
/// on at debug level whatever `log.level` says.
pub const TARGET: &str = "smartlead_proxy::traffic";

/// Whether this request's attempts are logged.
pub fn wanted(log: &LogSettings, headers: &HeaderMap) -> bool {
    log.bodies
        || (log.allow_debug_header
            && crate::headers::get(headers, &DEBUG_HEADER).is_some_and(is_on))
}

fn is_on(value: &HeaderValue) -> bool {
    let v = value.as_bytes().trim_ascii();
    [b"1".as_slice(), b"true", b"yes", b"on"]
        .iter()
        .any(|w| v.eq_ignore_ascii_case(w))
}

/// What every attempt of one request logs about the request, worked out once.
#[derive(Debug)]
pub struct Traffic {
    request_id: String,
    method: Method,
    path: String,
    request_body: String,
    request_bytes: usize,
    limit: usize,
    secrets: Secrets,
}

impl Traffic {
    pub fn new(
        request_id: &str,
        method: &Method,
        target: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        limit: usize,
        secrets: &Secrets,
    ) -> Self {
        let path = target.path_and_query().map_or("/", |p| p.as_str());
        let encoding = content_encoding(headers);
        Self {
            request_id: request_id.to_owned(),
            method: method.clone(),
            path: secrets.redact(path).into_owned(),
            request_body: preview(
                body,
                body.len(),
                content_type(headers),
                encoding,
                limit,
                secrets,
            ),
            request_bytes: body.len(),
            limit,
            secrets: secrets.clone(),
        }
    }

    /// An attempt that ended without an answer (could not connect, timed out, ...).
    pub fn failed(&self, attempt: u32, outcome: &str, took: Duration) {
        self.emit(attempt, None, outcome, took, None, None);
    }

    /// An attempt whose answer was read whole (and decoded): errors, batch answers.
    pub fn answered(
        &self,
        attempt: u32,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        took: Duration,
    ) {
        let shown = preview(
            body,
            body.len(),
            content_type(headers),
            None,
            self.limit,
            &self.secrets,
        );
        self.emit(
            attempt,
            Some(status),
            status.as_str(),
            took,
            Some((shown, body.len())),
            None,
        );
    }

    /// A streamed answer: the body passes through untouched while its start is kept; the
    /// record is written when it ends (or the client goes away).
    pub fn tap<B>(
        self: &Arc<Self>,
        attempt: u32,
        status: StatusCode,
        headers: &HeaderMap,
        took: Duration,
        body: B,
    ) -> Tap<B>
    where
        B: Body,
    {
        // Enough beyond the cut that a key straddling it is still recognised whole.
        let keep = self.limit + self.secrets.longest_form();
        Tap {
            expected: body.size_hint().exact(),
            inner: body,
            seen: Vec::new(),
            keep,
            total: 0,
            finished: false,
            record: Some(Pending {
                traffic: self.clone(),
                attempt,
                status,
                content_type: content_type(headers).map(str::to_owned),
                encoding: content_encoding(headers).map(str::to_owned),
                took,
                began: Instant::now()
                    .checked_sub(took)
                    .unwrap_or_else(Instant::now),
            }),
        }
    }

    fn emit(
        &self,
        attempt: u32,
        status: Option<StatusCode>,
        outcome: &str,
        took: Duration,
        response: Option<(String, usize)>,
        total: Option<Duration>,
    ) {
        let (response_body, response_bytes) = match response {
            Some((shown, n)) => (Some(shown), Some(n)),
            None => (None, None),
        };
        tracing::debug!(
            target: TARGET,
            request_id = %self.request_id,
            attempt,
            method = %self.method,
            path = %self.path,
            status = status.map(|s| s.as_u16()),
            outcome,
            upstream_ms = took.as_secs_f64() * 1000.0,
            total_ms = total.map(|t| t.as_secs_f64() * 1000.0),
            request_bytes = self.request_bytes,
            request_body = %self.request_body,
            response_bytes,
            response_body = response_body.as_deref(),
            "upstream traffic"
        );
    }
}

/// A streamed attempt's record, waiting for its body to end.
struct Pending {
    traffic: Arc<Traffic>,
    attempt: u32,
    status: StatusCode,
    content_type: Option<String>,
    encoding: Option<String>,
    took: Duration,
    began: Instant,
}

/// A body that keeps its first bytes for the traffic log and writes the record when it
/// ends or is dropped.
pub struct Tap<B> {
    inner: B,
    seen: Vec<u8>,
    keep: usize,
    total: usize,
    /// The length the upstream declared: a server stops polling a body once it has
    /// sent that much, so reaching it counts as the end.
    expected: Option<u64>,
    finished: bool,
    record: Option<Pending>,
}

impl<B> Tap<B> {
    fn write_record(&mut self) {
        let Some(p) = self.record.take() else { return };
        let t = &p.traffic;
        let mut shown = preview(
            &self.seen,
            self.total,
            p.content_type.as_deref(),
            p.encoding.as_deref(),
            t.limit,
            &t.secrets,
        );
        if !self.finished && self.expected != Some(self.total as u64) {
            shown.push_str(" [body cut off: not read to the end]");
        }
        let outcome = p.status.as_str();
        let response = Some((shown, self.total));
        t.emit(
            p.attempt,
            Some(p.status),
            outcome,
            p.took,
            response,
            Some(p.began.elapsed()),
        );
    }
}

impl<B> Drop for Tap<B> {
    fn drop(&mut self) {
        self.write_record();
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.total += data.len();
                    let room = this.keep.saturating_sub(this.seen.len());
                    this.seen.extend_from_slice(&data[..room.min(data.len())]);
                }
            }
            Poll::Ready(None) => {
                this.finished = true;
                this.write_record();
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

fn content_encoding(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
}

/// A body as the log shows it: text cut to `limit` bytes with the full size noted,
/// secrets and `api_key` values redacted; compressed or binary bodies only summarised.
/// `body` may be the first part of a body of `total` bytes.
pub fn preview(
    body: &[u8],
    total: usize,
    content_type: Option<&str>,
    encoding: Option<&str>,
    limit: usize,
    secrets: &Secrets,
) -> String {
    if total == 0 {
        return String::new();
    }
    let kind = content_type.unwrap_or("no content type");
    if let Some(enc) = encoding {
        return format!("[{total} bytes, {enc}-encoded {kind}]");
    }
    // Redacting only what can be shown (plus room for a key cut in half) keeps a large
    // body from costing more than a small one.
    let head = &body[..body.len().min(limit + secrets.longest_form())];
    let Some(text) = as_text(head, content_type) else {
        return format!("[binary: {total} bytes, {kind}]");
    };
    let cut = head.len() < total;
    // The start of a key cut off where the kept part ends is dropped, not shown.
    let scrubbed = if cut {
        secrets.scrub_cut(text.as_bytes())
    } else {
        secrets.scrub_bytes(text.as_bytes())
    };
    let scrubbed = String::from_utf8_lossy(&scrubbed);
    let text = match crate::key::redact_api_key_values(&scrubbed) {
        Some(t) => std::borrow::Cow::Owned(t),
        None => scrubbed,
    };
    if text.len() <= limit && !cut {
        return text.into_owned();
    }
    let mut at = limit.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}… [{total} bytes in all]", &text[..at])
}

/// The bytes as text, unless the type says binary or they are not readable text (a
/// character cut in half at the end is fine: the body was cut there).
fn as_text<'a>(body: &'a [u8], content_type: Option<&str>) -> Option<&'a str> {
    let binary_type = content_type.is_some_and(|c| {
        let c = c.trim().to_ascii_lowercase();
        ["image/", "audio/", "video/", "font/", "multipart/"]
            .iter()
            .any(|p| c.starts_with(p))
            || ["octet-stream", "pdf", "zip", "gzip", "protobuf", "msgpack"]
                .iter()
                .any(|t| c.contains(t))
    });
    if binary_type {
        return None;
    }
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&body[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    let readable = text
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'));
    readable.then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ApiKey;

    #[test]
    fn previews_cut_summarise_and_redact() {
        let k = ApiKey::new("sekrit-key").secrets();
        let none = Secrets::default();
        assert_eq!(preview(b"", 0, None, None, 10, &none), "");
        assert_eq!(preview(b"hello", 5, None, None, 10, &none), "hello");
        assert_eq!(
            preview(b"hello world", 11, None, None, 5, &none),
            "hello… [11 bytes in all]"
        );
        // Only the start of a streamed body was kept.
        assert_eq!(
            preview(b"abcdef", 1000, None, None, 5, &none),
            "abcde… [1000 bytes in all]"
        );
        // A key straddling the cut is still redacted whole.
        let shown = preview(b"0123sekrit-key tail", 19, None, None, 8, &k);
        assert_eq!(shown, "0123*** … [19 bytes in all]");
        // Only part of a streamed body was kept, ending inside a key, after a whole one
        // whose redaction pulled the cut-off part within the limit.
        let kept = b"sekrit-key ab sekr";
        let shown = preview(kept, 500, None, None, 16, &k);
        assert_eq!(shown, "*** ab ***… [500 bytes in all]");
        assert_eq!(
            preview(
                &[0, 159, 146, 150],
                4,
                Some("application/json"),
                None,
                10,
                &none
            ),
            "[binary: 4 bytes, application/json]"
        );
        assert_eq!(
            preview(
                b"\x1f\x8b...",
                900,
                Some("application/json"),
                Some("gzip"),
                10,
                &none
            ),
            "[900 bytes, gzip-encoded application/json]"
        );
        assert_eq!(
            preview(b"%PDF-1.4", 8, Some("application/pdf"), None, 10, &none),
            "[binary: 8 bytes, application/pdf]"
        );
        // A multi-byte character cut at the end of what was kept.
        let s = "ééé".as_bytes();
        assert_eq!(
            preview(&s[..5], 6, None, None, 3, &none),
            "é… [6 bytes in all]"
        );
    }

    proptest::proptest! {
        /// Any text, cut anywhere: no panic, and the key never survives.
        #[test]
        fn previews_never_panic_or_show_the_key(
            before in ".{0,80}",
            after in ".{0,80}",
            limit in 0usize..120,
            cut in 0usize..400,
        ) {
            let k = ApiKey::new("K3y-sekrit").secrets();
            let text = format!("{before}K3y-sekrit{after} api_key={before}");
            let bytes = text.as_bytes();
            let kept = &bytes[..cut.min(bytes.len())];
            let shown = preview(kept, bytes.len(), None, None, limit, &k);
            proptest::prop_assert!(!shown.contains("K3y-s"), "{}", shown);
        }
    }

    #[test]
    fn the_header_switch() {
        let mut log = LogSettings::default();
        let mut h = HeaderMap::new();
        h.insert(DEBUG_HEADER, HeaderValue::from_static("1"));
        assert!(!wanted(&log, &h), "ignored unless allowed");
        log.allow_debug_header = true;
        assert!(wanted(&log, &h));
        h.insert(DEBUG_HEADER, HeaderValue::from_static("0"));
        assert!(!wanted(&log, &h));
        h.insert(DEBUG_HEADER, HeaderValue::from_static(" TRUE "));
        assert!(wanted(&log, &h));
        log.bodies = true;
        assert!(wanted(&log, &HeaderMap::new()));
    }
}
