//! Following SmartLead's own `x-ratelimit-*` headers: a limit smaller than the per-minute
//! window is logged once and (with `limit.follow_upstream`) adopted for every instance,
//! and `x-ratelimit-remaining: 0` pauses the account until the reset.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use super::Limiter;

/// What SmartLead's `x-ratelimit-*` headers have told us so far.
#[derive(Default)]
pub(super) struct Follow {
    pub(super) in_force: AtomicUsize,
    pub(super) warned: AtomicBool,
    /// The end of the latest pause asked for by `x-ratelimit-remaining: 0`.
    pub(super) paused_until: std::sync::Mutex<Option<Instant>>,
}

impl Limiter {
    /// Applies what SmartLead's `x-ratelimit-*` headers say: at `remaining: 0` every
    /// instance pauses until the reset; a limit different from the per-minute window's is
    /// logged once and, with `limit.follow_upstream`, the smaller of the two is used.
    pub async fn observe(&self, headers: &HeaderMap) {
        // A limit under 1 says nothing usable (following 0 would leave one request a
        // window until restart): it is ignored.
        if let Some(upstream) = header_number(headers, RATELIMIT_LIMIT).filter(|n| *n >= 1.0) {
            self.follow_limit(upstream as usize).await;
        }
        if header_number(headers, RATELIMIT_REMAINING) != Some(0.0) {
            return;
        }
        let Some(reset) = reset_after(headers, std::time::SystemTime::now()) else {
            return;
        };
        // Whole seconds are taken as rounded up: the quota may free up to a second
        // sooner, and pausing too short is safe (an early request meets a 429 whose
        // Retry-After pauses everyone), while too long wastes quota.
        let reset = if reset.subsec_nanos() == 0 {
            reset.saturating_sub(Duration::from_secs(1))
        } else {
            reset
        };
        if reset.is_zero() {
            return;
        }
        let pause = reset.min(self.plan().longest_pause);
        let until = Instant::now() + pause;
        {
            let mut paused = self
                .follow
                .paused_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Concurrent answers all report the same reset: pause once.
            if paused.is_some_and(|p| p + Duration::from_millis(100) >= until) {
                return;
            }
            *paused = Some(until);
        }
        tracing::debug!(
            account = %self.account,
            pause_ms = pause.as_millis() as u64,
            "SmartLead reports no requests left: pausing until its reset"
        );
        self.pause(pause).await;
    }

    async fn follow_limit(&self, upstream: usize) {
        let (f, plan) = (&self.follow, self.plan());
        // Plain loads first: this runs on every answer, from every serving thread.
        if upstream != plan.configured
            && !f.warned.load(Ordering::Relaxed)
            && !f.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                account = %self.account,
                configured = plan.configured,
                window = %plan.windows[plan.followed],
                upstream,
                follow_upstream = plan.follow_upstream,
                "SmartLead reports a rate limit different from the per-minute window{}",
                if plan.follow_upstream && upstream < plan.configured {
                    ": using SmartLead's"
                } else {
                    ""
                }
            );
        }
        if !plan.follow_upstream {
            return;
        }
        let want = upstream.min(plan.configured);
        if f.in_force.load(Ordering::Relaxed) != want
            && f.in_force.swap(want, Ordering::Relaxed) != want
        {
            tracing::info!(account = %self.account, limit = want, window = %plan.windows[plan.followed], "quota limit now in force");
            self.backend.set_limit(plan.followed, want).await;
        }
    }
}

// SmartLead's rate-limit headers, named once (a `&str` name is parsed on every lookup).
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn header_number(headers: &HeaderMap, name: HeaderName) -> Option<f64> {
    crate::headers::get(headers, &name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

/// `x-ratelimit-reset` as a wait: seconds from now, or (for values that can only be
/// one) a Unix time in seconds.
fn reset_after(headers: &HeaderMap, now: std::time::SystemTime) -> Option<Duration> {
    let v = header_number(headers, RATELIMIT_RESET)?;
    const UNIX_TIME_FROM: f64 = 1_000_000_000.0;
    let secs = if v >= UNIX_TIME_FROM {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        v - now
    } else {
        v
    };
    (secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}
