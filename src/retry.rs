//! When to try again and how long to wait: pure policy functions (unit- and
//! property-tested, no sleeping) plus the attempt loop that applies them inside the
//! quota and the caller's deadline.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::app::AppState;
use crate::config::RetrySettings;
use crate::error::ApiError;
use crate::limiter::{Refusal, retry_after_secs};
use crate::traffic::Traffic;
use crate::upstream::AttemptError;

/// Largest upstream error body read; SmartLead's are a few hundred bytes.
pub const ERROR_BODY_CAP: usize = 1024 * 1024;

/// What the caller's request allows.
#[derive(Debug, Clone, Copy)]
pub struct Safety {
    /// Safe to repeat after the upstream may have done the work.
    pub idempotent: bool,
}

impl Safety {
    /// GET, HEAD, PUT, DELETE, OPTIONS; a POST matching `idempotent_posts`; anything with
    /// an `Idempotency-Key`.
    pub fn of(method: &Method, api_path: &str, headers: &HeaderMap, retry: &RetrySettings) -> Self {
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        ) || (*method == Method::POST
            && retry
                .idempotent_posts
                .iter()
                .any(|p| path_matches(p, api_path)))
            || headers.contains_key("idempotency-key");
        Self { idempotent }
    }
}

/// `/campaigns/*/leads` matches `/campaigns/42/leads`: `*` is exactly one segment.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let got: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    pat.len() == got.len()
        && pat
            .iter()
            .zip(&got)
            .all(|(p, g)| *p == *g || (*p == "*" && !g.is_empty()))
}

/// Whether an upstream status is worth another attempt.
pub fn retry_status(status: StatusCode, safety: Safety, retry: &RetrySettings) -> bool {
    if !retry.statuses.contains(&status.as_u16()) {
        return false;
    }
    // 429 and 503 mean the upstream did no work; anything else might have.
    matches!(status.as_u16(), 429 | 503) || safety.idempotent
}

/// Whether a failed attempt is worth another.
pub fn retry_error(err: &AttemptError, safety: Safety) -> bool {
    match err {
        AttemptError::Connect(_) => true,
        AttemptError::Closed(_) | AttemptError::Invalid(_) | AttemptError::Timeout(_) => {
            safety.idempotent
        }
    }
}

/// Full jitter: uniform in `[0, min(max, base · 2^(attempt−1))]`. Spreads a fleet's
/// retries over the whole interval, which is what breaks up synchronized herds.
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    exp.min(max).mul_f64(unit.clamp(0.0, 1.0))
}

/// The wait before the next attempt: the backoff, but never sooner than the upstream's
/// `Retry-After` (itself capped at `max`).
pub fn delay(
    attempt: u32,
    retry_after: Option<Duration>,
    retry: &RetrySettings,
    unit: f64,
) -> Duration {
    let jittered = backoff(attempt, retry.base_delay, retry.max_delay, unit);
    jittered.max(retry_after.unwrap_or_default().min(retry.max_delay))
}

/// `Retry-After` as delay-seconds or an HTTP-date; anything else is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The upstream's requested wait: the header, else `error.retry_after` in a JSON body.
pub fn upstream_retry_after(headers: &HeaderMap, body: &[u8], now: SystemTime) -> Option<Duration> {
    let header = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    header.or_else(|| {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let secs = v.get("error")?.get("retry_after")?;
        let secs = secs
            .as_f64()
            .or_else(|| secs.as_str()?.trim().parse().ok())?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
    })
}

/// A non-2xx upstream answer, body read.
#[derive(Debug)]
pub struct Failed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body is only the start of what was sent (read cap, broken off, stalled).
    pub cut: bool,
}

/// How a request ended.
pub enum Outcome {
    /// A response to stream back as it is.
    Success(http::Response<Incoming>),
    /// An upstream error answer, to normalise.
    Failed(Failed),
    /// The proxy's own error.
    Error(ApiError),
}

/// Retries ≤ `ratio` × requests over a sliding window (plus a floor), as Envoy and
/// linkerd do, so a failing upstream is not hammered by every caller's retries at once.
/// Per process; quota-governed 429 retries do not draw on it.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min: u32,
    /// (second, requests, retries) per second of the window.
    buckets: std::sync::Mutex<Vec<(u64, u32, u32)>>,
    epoch: Instant,
}

impl RetryBudget {
    pub fn new(retry: &RetrySettings) -> Self {
        let seconds = retry.budget_window.as_secs().clamp(1, 3600) as usize;
        Self {
            ratio: retry.budget_ratio,
            min: retry.budget_min_retries,
            buckets: std::sync::Mutex::new(vec![(u64::MAX, 0, 0); seconds]),
            epoch: Instant::now(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut (u64, u32, u32), u32, u32) -> bool) -> bool {
        let now = self.epoch.elapsed().as_secs();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let len = buckets.len() as u64;
        let (mut requests, mut retries) = (0, 0);
        for b in buckets.iter_mut() {
            if b.0 == u64::MAX || b.0 + len <= now {
                *b = (u64::MAX, 0, 0);
            } else {
                requests += b.1;
                retries += b.2;
            }
        }
        let slot = &mut buckets[(now % len) as usize];
        if slot.0 != now {
            *slot = (now, 0, 0);
        }
        f(slot, requests, retries)
    }

    /// Counts one incoming request.
    pub fn record_request(&self) {
        self.update(|b, _, _| {
            b.1 = b.1.saturating_add(1);
            true
        });
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        let (ratio, min) = (self.ratio, self.min);
        self.update(|b, requests, retries| {
            let allowed = (f64::from(requests) * ratio).floor() as u32;
            let ok = retries < allowed.max(min);
            if ok {
                b.2 = b.2.saturating_add(1);
            }
            ok
        })
    }
}

/// One request's way through the limiter and the upstream, attempt by attempt.
pub struct Exchange<'a> {
    pub state: &'a AppState,
    pub method: Method,
    pub target: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub safety: Safety,
    /// The last moment an attempt may start (quota waits and backoff included).
    pub start_by: Instant,
    /// When the caller stops listening (`X-Request-Timeout`), if it said.
    pub give_up_at: Option<Instant>,
    pub attempts: u32,
    /// Time spent waiting for quota slots.
    pub waited: Duration,
    /// Time spent in upstream attempts.
    pub upstream_time: Duration,
    pub last_status: Option<StatusCode>,
    /// How long the last attempt took to answer (its head, for a streamed success).
    pub last_attempt_time: Duration,
    pub budget_exhausted: bool,
    /// Set when this request's attempts go in the traffic log.
    pub traffic: Option<Arc<Traffic>>,
}

impl<'a> Exchange<'a> {
    pub fn new(
        state: &'a AppState,
        method: Method,
        target: Uri,
        headers: HeaderMap,
        body: Bytes,
        safety: Safety,
    ) -> Self {
        let start_by = Instant::now() + state.settings().limit.max_wait;
        Self {
            state,
            method,
            target,
            headers,
            body,
            safety,
            start_by,
            give_up_at: None,
            attempts: 0,
            waited: Duration::ZERO,
            upstream_time: Duration::ZERO,
            last_status: None,
            last_attempt_time: Duration::ZERO,
            budget_exhausted: false,
            traffic: None,
        }
    }

    /// How this exchange was served, for the access log.
    pub fn served(&self) -> crate::proxy::Served {
        crate::proxy::Served {
            attempts: self.attempts,
            upstream: true,
            waited: self.waited,
            upstream_time: self.upstream_time,
        }
    }

    /// Adds what the attempts learnt to one of the proxy's own errors.
    pub fn explain(&self, mut e: ApiError) -> ApiError {
        if let Some(s) = self.last_status {
            e = e.detail("upstream_status", s.as_u16());
        }
        if self.budget_exhausted {
            e = e.detail("retry_budget_exhausted", true);
        }
        e
    }

    /// The caller's own deadline: nothing starts, waits or runs past it.
    pub fn with_deadline(mut self, timeout: Duration) -> Self {
        let at = Instant::now() + timeout;
        self.give_up_at = Some(at);
        self.start_by = self.start_by.min(at);
        self
    }

    pub async fn run(&mut self) -> Outcome {
        let retry = &self.state.settings().retry;
        loop {
            match self.state.limiter().acquire(self.start_by).await {
                Ok(waited) => self.waited += waited,
                Err(refusal) => return Outcome::Error(refusal_error(refusal, self.attempts)),
            }
            self.attempts += 1;
            let timeout = self.attempt_timeout();
            let began = Instant::now();
            // Boxed: the sending state is large, and a request waiting for a slot
            // should not carry it (10,000 waiting requests are the memory budget).
            let sent = Box::pin(self.state.upstream().send(
                self.method.clone(),
                self.target.clone(),
                self.headers.clone(),
                self.body.clone(),
                timeout,
            ))
            .await;
            if let Ok(resp) = &sent {
                self.state.limiter().observe(resp.headers()).await;
            }
            let status;
            let outcome: &str = match &sent {
                Ok(resp) => {
                    status = resp.status();
                    status.as_str()
                }
                Err(e) => e.kind(),
            };
            let took = began.elapsed();
            self.last_attempt_time = took;
            tracing::debug!(attempt = self.attempts, %outcome, upstream_ms = took.as_secs_f64() * 1000.0, "upstream attempt");
            crate::metrics::upstream_attempt(outcome);
            let (retryable, asked, last) = match sent {
                Ok(resp) if is_pass_through(resp.status()) => {
                    // Its traffic record is written when the body has streamed.
                    self.upstream_time += took;
                    return Outcome::Success(resp);
                }
                Ok(resp) => {
                    let failed = Box::pin(read_failed(resp, timeout)).await;
                    if let Some(t) = &self.traffic {
                        let took = began.elapsed();
                        t.answered(
                            self.attempts,
                            failed.status,
                            &failed.headers,
                            &failed.body,
                            took,
                        );
                    }
                    self.last_status = Some(failed.status);
                    let asked =
                        upstream_retry_after(&failed.headers, &failed.body, SystemTime::now());
                    (
                        retry_status(failed.status, self.safety, retry),
                        asked,
                        Outcome::Failed(failed),
                    )
                }
                Err(err) => {
                    if let Some(t) = &self.traffic {
                        t.failed(self.attempts, err.kind(), began.elapsed());
                    }
                    (
                        retry_error(&err, self.safety),
                        None,
                        Outcome::Error(err.into_api_error()),
                    )
                }
            };
            self.upstream_time += began.elapsed();
            if !retryable || self.attempts > retry.max_retries {
                return last;
            }
            let limited = self.last_status == Some(StatusCode::TOO_MANY_REQUESTS)
                && matches!(last, Outcome::Failed(_));
            if !limited && !self.state.retry_budget().try_retry() {
                self.budget_exhausted = true;
                tracing::warn!(
                    attempt = self.attempts,
                    "retry budget exhausted; answering with the last error"
                );
                return last;
            }
            tracing::info!(attempt = self.attempts, %outcome, "retrying");
            crate::metrics::retry(outcome.to_owned());
            if limited {
                // The quota is shared: everyone pauses, and the limiter spaces the restart.
                self.state.limiter().pause(self.pause_for(asked)).await;
                continue;
            }
            match self.wait_or_give_up(asked) {
                Some(w) => tokio::time::sleep(w).await,
                None => return last,
            }
        }
    }

    /// `upstream.timeout`, cut short by the caller's own deadline.
    fn attempt_timeout(&self) -> Duration {
        let t = self.state.settings().upstream.timeout;
        match self.give_up_at {
            Some(at) => t.min(at.saturating_duration_since(Instant::now())),
            None => t,
        }
    }

    /// The backoff before the next attempt, or `None` when it would end past the deadline.
    fn wait_or_give_up(&self, asked: Option<Duration>) -> Option<Duration> {
        let wait = delay(
            self.attempts,
            asked,
            &self.state.settings().retry,
            rand::random(),
        );
        (Instant::now() + wait <= self.start_by).then_some(wait)
    }

    /// How long an upstream 429 pauses the whole limiter.
    fn pause_for(&self, asked: Option<Duration>) -> Duration {
        let s = self.state.settings();
        let cap = s.limit.period.max(s.retry.max_delay);
        asked.unwrap_or(s.retry.base_delay).min(cap)
    }
}

/// Successes stream through untouched; 304 has no body to wrap.
pub fn is_pass_through(status: StatusCode) -> bool {
    status.is_success() || status.is_informational() || status == StatusCode::NOT_MODIFIED
}

fn refusal_error(refusal: Refusal, attempts: u32) -> ApiError {
    match refusal {
        Refusal::RateLimited { retry_after, why } => ApiError::rate_limited(
            why.message(),
            why.label(),
            retry_after_secs(retry_after),
            attempts,
        ),
        Refusal::Unavailable(reason) => ApiError::unavailable(reason),
    }
}

/// Reads at most [`ERROR_BODY_CAP`] of a body (error answers, lead-import batch
/// answers), decoded; a body that breaks off or stalls yields what arrived, since the
/// status alone is enough to answer.
pub async fn read_failed(resp: http::Response<Incoming>, timeout: Duration) -> Failed {
    let (head, body) = resp.into_parts();
    let (raw, raw_cut) = read_capped(body, ERROR_BODY_CAP, Instant::now() + timeout).await;
    let (body, cut) = crate::body::decode_body(&head.headers, raw, raw_cut, ERROR_BODY_CAP);
    Failed {
        status: head.status,
        headers: head.headers,
        body,
        cut,
    }
}

/// Up to `cap` bytes of a body, and whether that is not all of it.
async fn read_capped(mut body: Incoming, cap: usize, deadline: Instant) -> (Bytes, bool) {
    let mut out = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => return (out.freeze(), false),
            Ok(Some(Err(_))) | Err(_) => return (out.freeze(), true),
        };
        if let Ok(data) = frame.into_data() {
            let room = cap - out.len();
            if data.len() > room {
                out.extend_from_slice(&data[..room]);
                return (out.freeze(), true);
            }
            out.extend_from_slice(&data);
        }
    }
}

/// The `Retry-After` a client is given on an upstream answer: whole seconds of the
/// proxy's own, at most `cap`, never the upstream's raw text (`None`: no usable value).
pub fn client_retry_after(headers: &HeaderMap, cap: Duration) -> Option<http::HeaderValue> {
    let asked = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()
        .and_then(|v| parse_retry_after(v, SystemTime::now()))?;
    Some(http::HeaderValue::from(retry_after_secs(asked.min(cap))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> RetrySettings {
        RetrySettings::default()
    }

    #[test]
    fn method_safety() {
        let r = settings();
        let h = HeaderMap::new();
        let s = |m: Method, p: &str, h: &HeaderMap| Safety::of(&m, p, h, &r).idempotent;
        assert!(s(Method::GET, "/campaigns", &h));
        assert!(s(Method::DELETE, "/campaigns/1", &h));
        assert!(!s(Method::POST, "/campaigns/create", &h));
        assert!(!s(Method::PATCH, "/campaigns/1", &h));
        assert!(s(Method::POST, "/campaigns/42/leads", &h));
        assert!(!s(Method::POST, "/campaigns/42/leads/x", &h));
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "abc".parse().unwrap());
        assert!(s(Method::POST, "/campaigns/create", &keyed));
    }

    #[test]
    fn which_statuses_retry() {
        let r = settings();
        let post = Safety { idempotent: false };
        let get = Safety { idempotent: true };
        for code in [429, 503] {
            assert!(retry_status(StatusCode::from_u16(code).unwrap(), post, &r));
        }
        for code in [500, 502, 504] {
            assert!(!retry_status(StatusCode::from_u16(code).unwrap(), post, &r));
            assert!(retry_status(StatusCode::from_u16(code).unwrap(), get, &r));
        }
        for code in [400, 401, 404, 422, 501] {
            assert!(!retry_status(StatusCode::from_u16(code).unwrap(), get, &r));
        }
        assert!(retry_error(&AttemptError::Connect("x".into()), post));
        assert!(!retry_error(
            &AttemptError::Timeout(Duration::from_secs(1)),
            post
        ));
        assert!(retry_error(&AttemptError::Closed("x".into()), get));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        for junk in [
            "",
            "-1",
            "1.5",
            "soon",
            "99999999999999999999999",
            "Mon, 99 Foo",
        ] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(
            upstream_retry_after(
                &h,
                br#"{"error":{"code":"RATE_LIMITED","retry_after":4}}"#,
                now
            ),
            Some(Duration::from_secs(4))
        );
        h.insert(header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(
            upstream_retry_after(&h, b"", now),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn budget_allows_a_floor_then_a_ratio() {
        let r = RetrySettings {
            budget_ratio: 0.2,
            budget_min_retries: 2,
            ..settings()
        };
        let b = RetryBudget::new(&r);
        assert!(b.try_retry() && b.try_retry());
        assert!(!b.try_retry(), "floor of 2 spent");
        for _ in 0..20 {
            b.record_request();
        }
        assert!(b.try_retry() && b.try_retry(), "20% of 20 = 4 in all");
        assert!(!b.try_retry());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(backoff(1, b, m, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, b, m, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(10, b, m, 1.0), m);
        assert_eq!(backoff(3, b, m, 0.0), Duration::ZERO);
        assert_eq!(backoff(u32::MAX, b, m, 0.5), Duration::from_secs(15));
    }

    proptest! {
        #[test]
        fn delay_is_bounded_and_respects_retry_after(attempt in 0u32..100, unit in 0.0f64..=1.0, asked in proptest::option::of(0u64..100_000)) {
            let r = settings();
            let asked = asked.map(Duration::from_millis);
            let d = delay(attempt, asked, &r, unit);
            prop_assert!(d <= r.max_delay);
            if let Some(a) = asked {
                prop_assert!(d >= a.min(r.max_delay));
            }
        }

        #[test]
        fn retry_after_never_panics(s in ".{0,40}") {
            let _ = parse_retry_after(&s, SystemTime::now());
            let _ = upstream_retry_after(&HeaderMap::new(), s.as_bytes(), SystemTime::now());
        }
    }
}
