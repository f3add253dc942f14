//! Body helpers: bodies that give up when the other side stops sending (an upstream
//! that stalls mid-response, or a client mid-upload, is cut instead of held forever), and
//! decoding of compressed error bodies.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct Stalled(pub Duration);

/// The error a body that took longer than its whole-body limit ends with.
#[derive(Debug, thiserror::Error)]
#[error("not whole within {0:?}")]
pub struct TooSlow(pub Duration);

/// Wraps a body so that a gap longer than `idle` between frames ends it with [`Stalled`],
/// and, with a whole-body limit, a body not done by then ends with [`TooSlow`]: a client
/// trickling a byte at a time never stalls, but it does run out of time.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    /// The whole-body limit and when it runs out.
    whole: Option<(Duration, Instant)>,
    /// Started the first time the inner body has nothing ready: a small body that arrives
    /// in one piece never touches the timer. One timer serves both limits: it is set to
    /// whichever comes first.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            whole: None,
            sleep: None,
        }
    }

    /// Also ends the body with [`TooSlow`] once `whole` has passed from now.
    pub fn with_whole_limit(inner: B, idle: Duration, whole: Duration) -> Self {
        Self {
            whole: Some((whole, Instant::now() + whole)),
            ..Self::new(inner, idle)
        }
    }

    /// When the timer should next fire.
    fn next_deadline(&self) -> Instant {
        let idle = Instant::now() + self.idle;
        self.whole.map_or(idle, |(_, at)| idle.min(at))
    }

    fn timed_out(&self) -> BoxError {
        match self.whole {
            Some((within, at)) if Instant::now() >= at => Box::new(TooSlow(within)),
            _ => Box::new(Stalled(self.idle)),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = this.next_deadline();
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(next);
                }
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let next = this.next_deadline();
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.timed_out()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The bytes of request bodies held at once, across every serving thread: requests wait
/// for the quota with their bodies (to replay them on retries), so without a cap a crowd
/// of large waiting requests could take all the memory there is.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    held: Arc<AtomicUsize>,
    max: usize,
}

impl BodyBudget {
    pub fn new(max: usize) -> Self {
        Self {
            held: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A share of nothing yet, to grow as a body arrives.
    pub fn share(&self) -> BodyShare {
        BodyShare {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One request's part of the [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct BodyShare {
    budget: BodyBudget,
    bytes: usize,
}

impl BodyShare {
    /// Grows this share to `bytes`, if the budget has room.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        let more = bytes.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        let budget = &self.budget;
        let taken = budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|h| *h <= budget.max)
            });
        if taken.is_ok() {
            self.bytes = bytes;
        }
        taken.is_ok()
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Largest upstream body read whole (error answers, lead-import batch answers);
/// SmartLead's are a few hundred bytes.
pub const READ_CAP: usize = 1024 * 1024;

/// Up to `cap` bytes of a body, and whether that is not all of it (over the cap, broken
/// off, or not done by `deadline`): what arrived is kept either way.
pub async fn read_capped<B>(mut body: B, cap: usize, deadline: Instant) -> (Bytes, bool)
where
    B: Body<Data = Bytes> + Unpin,
{
    use http_body_util::BodyExt;
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

/// Undoes a gzip/deflate `Content-Encoding`, keeping at most `cap` bytes; says whether
/// the result was cut short (over `cap`, a broken stream, or `raw` itself cut). An
/// encoding we cannot read gives an empty body: the status alone still answers.
pub fn decode_body(headers: &HeaderMap, raw: Bytes, raw_cut: bool, cap: usize) -> (Bytes, bool) {
    use std::io::Read;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let decoded = |reader: &mut dyn Read| {
        let mut out = Vec::new();
        // Whatever was decoded before an error stays in `out`.
        let broken = reader.take(cap as u64 + 1).read_to_end(&mut out).is_err();
        let cut = broken || raw_cut || out.len() > cap;
        out.truncate(cap);
        (Bytes::from(out), cut)
    };
    match encoding.as_deref() {
        None | Some("identity") | Some("") => (raw, raw_cut),
        Some("gzip") | Some("x-gzip") => decoded(&mut flate2::read::GzDecoder::new(&raw[..])),
        Some("deflate") => decoded(&mut flate2::read::ZlibDecoder::new(&raw[..])),
        Some(_) => (Bytes::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shares_stay_within_the_budget_and_come_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.share();
        assert!(a.grow_to(60));
        let mut b = budget.share();
        assert!(!b.grow_to(41), "over the budget");
        assert!(b.grow_to(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(b.grow_to(100));
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
