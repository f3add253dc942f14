//! Body helpers: bodies that give up when the other side stops sending (an upstream
//! that stalls mid-response, or a client mid-upload, is cut instead of held forever), and
//! decoding of compressed error bodies.

use std::pin::Pin;
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

/// Wraps a body so that a gap longer than `idle` between frames ends it with [`Stalled`].
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    /// Started the first time the inner body has nothing ready: a small body that arrives
    /// in one piece never touches the timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: None,
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
                if let Some(sleep) = this.sleep.as_mut() {
                    sleep.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(this.idle))))),
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

/// Undoes a gzip/deflate `Content-Encoding` (at most `cap` bytes out); an encoding we
/// cannot read, or a broken stream, gives an empty body: the status alone still answers.
pub fn decode_body(headers: &HeaderMap, raw: Bytes, cap: usize) -> Bytes {
    use std::io::Read;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let decoded = |reader: &mut dyn Read| {
        let mut out = Vec::new();
        match reader.take(cap as u64).read_to_end(&mut out) {
            Ok(_) => Bytes::from(out),
            Err(_) => Bytes::new(),
        }
    };
    match encoding.as_deref() {
        None | Some("identity") | Some("") => raw,
        Some("gzip") | Some("x-gzip") => decoded(&mut flate2::read::GzDecoder::new(&raw[..])),
        Some("deflate") => decoded(&mut flate2::read::ZlibDecoder::new(&raw[..])),
        Some(_) => Bytes::new(),
    }
}
