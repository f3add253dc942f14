//! When to try again and how long to wait: pure policy functions (unit- and
//! property-tested, no sleeping) and the retry budget. The loop that applies them inside
//! the quota and the caller's deadline is the quota-and-retry layer
//! (`stack::quota_retry`).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::config::RetrySettings;
use crate::limiter::retry_after_secs;
use crate::upstream::AttemptError;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

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
            || crate::headers::contains(headers, &IDEMPOTENCY_KEY);
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
        // An untrusted certificate stays untrusted: another attempt would only wait.
        AttemptError::Connect(why) => !crate::tls::untrusted_certificate(why),
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

/// Retries ≤ `ratio` × requests over a sliding window (plus a floor), as Envoy and
/// linkerd do, so a failing upstream is not hammered by every caller's retries at once.
/// Per process; quota-governed 429 retries do not draw on it.
///
/// Why not tower's `TpsBudget`, which has the same purpose (and whose [`Budget`] trait
/// this implements): its window (`ttl`) must be 1–60 s, where `retry.budget_window` takes
/// up to an hour; its floor is a whole number of retries per second, added to the ratio,
/// where `retry.budget_min_retries` is a count per window that the ratio may not go
/// below (10 per 10 s is its 1 per second, but 5 per 10 s has no equivalent); and it
/// panics on values outside its ranges.
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

    /// Retries the budget allows now.
    pub fn left(&self) -> u32 {
        let (ratio, min) = (self.ratio, self.min);
        let mut left = 0;
        self.update(|_, requests, retries| {
            let allowed = (f64::from(requests) * ratio).floor() as u32;
            left = allowed.max(min).saturating_sub(retries);
            true
        });
        left
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        self.withdraw()
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        self.record_request();
    }

    fn withdraw(&self) -> bool {
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
