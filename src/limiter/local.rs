//! The in-process backend: the reservation log behind a mutex.
//!
//! Why not governor: a GCRA bucket cannot give idle bursts of N, an exact N/period
//! sustained rate and a strict sliding window all at once, and it cannot tell a caller
//! its FIFO position ahead of time (which the immediate-429 answer needs).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::log::{Micros, SlotLog, Span};
use super::{Answer, Backend, Limited, Refusal, Status, now};
use crate::config::Window;

pub struct LocalBackend {
    log: Mutex<SlotLog>,
    epoch: Instant,
    moved: watch::Sender<u64>,
    state: &'static str,
}

/// The log's windows for `windows`: each period plus `margin`, in microseconds.
pub fn spans(windows: &[Window], margin: Duration) -> Vec<Span> {
    windows
        .iter()
        .map(|w| Span::new(w.requests as usize, micros(w.period + margin)))
        .collect()
}

impl LocalBackend {
    pub fn new(windows: &[Window], margin: Duration) -> Self {
        Self::with_spans(spans(windows, margin), "local")
    }

    /// A log of these windows (`state` is what [`Status`] reports).
    pub fn with_spans(spans: Vec<Span>, state: &'static str) -> Self {
        Self {
            log: Mutex::new(SlotLog::new(spans)),
            epoch: Instant::now(),
            moved: watch::channel(0).0,
            state,
        }
    }

    fn now(&self) -> Micros {
        micros(self.epoch.elapsed())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, SlotLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reserve_now(&self, id: u64, max_wait: Duration) -> Result<Duration, Refusal> {
        let now = self.now();
        match self.log().reserve(id, now, micros(max_wait)) {
            Ok(slot) => Ok(Duration::from_micros(slot - now)),
            Err((slot, window)) => Err(Refusal::RateLimited {
                retry_after: Duration::from_micros(slot - now),
                why: Limited::PastDeadline,
                window,
            }),
        }
    }

    pub fn pause_now(&self, pause: Duration) {
        let now = self.now();
        if self.log().pause(now + micros(pause), now) {
            self.moved.send_modify(|v| *v += 1);
        }
    }

    pub fn wait_now(&self, id: u64) -> Option<Duration> {
        let now = self.now();
        self.log()
            .slot_of(id)
            .map(|s| Duration::from_micros(s.saturating_sub(now)))
    }

    pub fn set_limit_now(&self, window: usize, limit: usize) {
        let now = self.now();
        if self.log().set_limit(window, limit, now) {
            self.moved.send_modify(|v| *v += 1);
        }
    }

    pub fn set_spans_now(&self, spans: Vec<Span>) {
        let now = self.now();
        if self.log().set_spans(spans, now) {
            self.moved.send_modify(|v| *v += 1);
        }
    }

    pub fn used_now(&self) -> Vec<usize> {
        let now = self.now();
        self.log().used(now)
    }

    pub fn cancel_now(&self, id: u64) {
        let now = self.now();
        self.log().cancel(id, now);
    }

    /// Starts within the last window and still-waiting slots, as (offset from now, id):
    /// negative offsets are in the past.
    pub fn recent(&self) -> Vec<(i64, u64)> {
        let now = self.now();
        self.log()
            .recent(now)
            .map(|(s, id)| (s as i64 - now as i64, id))
            .collect()
    }

    /// Counts a start that happened elsewhere, `offset_micros` from now (negative: in the
    /// past).
    pub fn record(&self, offset_micros: i64, id: u64) {
        let now = self.now() as i64;
        let slot = (now + offset_micros).max(0) as Micros;
        self.log().record(slot, id);
    }
}

pub(crate) fn micros(d: Duration) -> Micros {
    d.as_micros().min(u128::from(u64::MAX)) as Micros
}

impl Backend for LocalBackend {
    fn reserve(&self, id: u64, max_wait: Duration) -> Answer<'_, Result<Duration, Refusal>> {
        now(self.reserve_now(id, max_wait))
    }

    fn waits_of<'a>(&'a self, ids: &'a [u64]) -> Answer<'a, Vec<Option<Duration>>> {
        now(ids.iter().map(|id| self.wait_now(*id)).collect())
    }

    fn cancel(&self, id: u64) -> Answer<'_, ()> {
        self.cancel_now(id);
        now(())
    }

    fn pause(&self, pause: Duration) -> Answer<'_, ()> {
        self.pause_now(pause);
        now(())
    }

    fn set_limit(&self, window: usize, limit: usize) -> Answer<'_, ()> {
        self.set_limit_now(window, limit);
        now(())
    }

    fn set_windows(&self, spans: Vec<Span>, _follow: usize) -> Answer<'_, ()> {
        self.set_spans_now(spans);
        now(())
    }

    fn used(&self) -> Answer<'_, Vec<usize>> {
        now(self.used_now())
    }

    fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }

    fn status(&self) -> Status {
        Status {
            backend: "local",
            state: self.state,
            detail: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;
    use crate::limiter::Limiter;
    use std::sync::Arc;

    fn limiter(requests: u32, period: Duration, max_queue: usize) -> Arc<Limiter> {
        let mut s = Settings::default();
        s.limit.one_window(requests, period);
        s.limit.margin = Duration::ZERO;
        s.limit.max_queue = max_queue;
        let backend = Arc::new(LocalBackend::new(&s.limit.windows, s.limit.margin));
        let pause = Duration::from_secs(3600);
        Arc::new(Limiter::new(
            backend,
            "default",
            &s.limit.windows,
            &s.limit,
            pause,
        ))
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn burst_waits_in_fifo_order_at_the_exact_rate() {
        let l = limiter(2, Duration::from_secs(10), 100);
        let start = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                l.acquire(far(), &Default::default()).await.unwrap();
                order.lock().unwrap().push((i, start.elapsed().as_secs()));
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let got = order.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![(0, 0), (1, 0), (2, 10), (3, 10), (4, 20), (5, 20)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_slot_is_refused_at_once_with_an_honest_retry_after() {
        let l = limiter(1, Duration::from_secs(10), 100);
        l.acquire(far(), &Default::default()).await.unwrap();
        let asked = Instant::now();
        let refusal = l
            .acquire(Instant::now() + Duration::from_secs(4), &Default::default())
            .await
            .unwrap_err();
        assert_eq!(asked.elapsed(), Duration::ZERO, "no sleeping to find out");
        assert_eq!(
            refusal,
            Refusal::RateLimited {
                retry_after: Duration::from_secs(10),
                why: Limited::PastDeadline,
                window: Some(0),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_refused_at_once() {
        let l = limiter(1, Duration::from_secs(10), 2);
        l.acquire(far(), &Default::default()).await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.acquire(far(), &Default::default()).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(l.queued(), 2);
        match l.acquire(far(), &Default::default()).await {
            Err(Refusal::RateLimited {
                why, retry_after, ..
            }) => {
                assert_eq!(why, Limited::QueueFull);
                assert_eq!(retry_after, Duration::from_secs(20));
            }
            other => panic!("{other:?}"),
        }
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(l.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_gives_its_slot_back() {
        let l = limiter(1, Duration::from_secs(10), 100);
        l.acquire(far(), &Default::default()).await.unwrap();
        let l2 = l.clone();
        let gone = tokio::spawn(async move { l2.acquire(far(), &Default::default()).await });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        tokio::task::yield_now().await; // the cancel runs
        let start = Instant::now();
        l.acquire(far(), &Default::default()).await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(10),
            "took the freed slot, not the next"
        );
        assert_eq!(l.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_back_waiters_and_new_arrivals() {
        let l = limiter(5, Duration::from_secs(10), 100);
        let start = Instant::now();
        l.acquire(far(), &Default::default()).await.unwrap();
        l.pause(Duration::from_secs(3)).await;
        l.acquire(far(), &Default::default()).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_past_the_deadline_refuses_the_waiter() {
        let l = limiter(1, Duration::from_secs(10), 100);
        l.acquire(far(), &Default::default()).await.unwrap();
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            l2.acquire(
                Instant::now() + Duration::from_secs(12),
                &Default::default(),
            )
            .await
        });
        tokio::task::yield_now().await;
        l.pause(Duration::from_secs(15)).await;
        match waiter.await.unwrap() {
            Err(Refusal::RateLimited { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(15))
            }
            other => panic!("{other:?}"),
        }
    }
}
