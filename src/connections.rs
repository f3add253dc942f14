//! Client connections and the file descriptors they take.
//!
//! Every connection is a file descriptor, and so is every upstream connection, the Redis
//! link and each file the proxy opens. Without a cap, clients that open connections and
//! trickle their bodies take every descriptor the process may have, and then nothing
//! else can be accepted, `/healthz` included. So:
//! - at start the soft limit on open files is raised to its hard limit ([`raise_file_limit`]);
//! - open client connections are capped at `server.max_connections` (0: that limit less a
//!   reserve for everything else, [`derived_cap`]);
//! - a connection past the cap is answered by [`over_cap`]: `/healthz` answers, `/readyz`
//!   says 503 `connections`, anything else gets the 503 envelope, and it is closed. At
//!   most [`OVERFLOW`] of those are open at once; past that a connection is closed at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::error::{ProxyError, answer};
use crate::key::Secrets;
use crate::served::Served;

/// Connections past the cap answered at once; each is held a few seconds at most.
pub const OVERFLOW: usize = 64;
/// How long a connection past the cap may take to send its request head.
const OVERFLOW_HEAD: Duration = Duration::from_secs(2);

/// The open-files limit before and after [`raise_file_limit`].
#[derive(Debug, Clone, Copy)]
pub struct FileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit on open files to the hard limit (systemd's default soft limit
/// is 1024, far below what a proxy may need).
pub fn raise_file_limit() -> Option<FileLimit> {
    let (soft_before, hard) = rlimit::Resource::NOFILE.get().ok()?;
    let soft = rlimit::increase_nofile_limit(hard).unwrap_or(soft_before);
    Some(FileLimit {
        soft_before,
        soft,
        hard,
    })
}

/// The soft limit on open files now.
fn file_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// The cap `server.max_connections = 0` means: the file limit less a reserve (a quarter,
/// at least 128) for upstream connections, Redis, the overflow answers and files.
pub fn derived_cap(file_limit: u64) -> usize {
    let reserve = (file_limit / 4).max(128);
    usize::try_from(file_limit.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(16)
}

/// Open client connections against their cap; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Counts>,
}

#[derive(Debug)]
struct Counts {
    open: AtomicUsize,
    overflow: AtomicUsize,
    max: usize,
}

impl Connections {
    /// `max` connections at most (`server.max_connections`; 0 derives it from the file
    /// limit now).
    pub fn new(max: usize) -> Self {
        let max = match max {
            0 => file_limit().map_or(4096, derived_cap),
            n => n,
        };
        Self {
            inner: Arc::new(Counts {
                open: AtomicUsize::new(0),
                overflow: AtomicUsize::new(0),
                max,
            }),
        }
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }

    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Whether every connection the proxy may hold is open.
    pub fn at_cap(&self) -> bool {
        self.open() >= self.inner.max
    }

    /// A place for one more connection, held until the guard is dropped.
    pub fn try_open(&self) -> Option<Held> {
        take(&self.inner.open, self.inner.max).then(|| Held {
            counts: self.inner.clone(),
            overflow: false,
        })
    }

    /// A place for one more connection past the cap, to answer and close.
    fn try_overflow(&self) -> Option<Held> {
        take(&self.inner.overflow, OVERFLOW).then(|| Held {
            counts: self.inner.clone(),
            overflow: true,
        })
    }
}

fn take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// One counted connection; the count drops with it.
#[derive(Debug)]
pub struct Held {
    counts: Arc<Counts>,
    overflow: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        let count = if self.overflow {
            &self.counts.overflow
        } else {
            &self.counts.open
        };
        count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection past the cap: answered on its own task (one request, then closed), or
/// closed at once when [`OVERFLOW`] such answers are under way.
pub fn over_cap(stream: std::net::TcpStream, connections: &Connections) {
    let Some(held) = connections.try_overflow() else {
        return;
    };
    let max = connections.max();
    tokio::spawn(async move {
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(OVERFLOW_HEAD)
            .keep_alive(false);
        let service = hyper::service::service_fn(move |req| {
            std::future::ready(Ok::<_, std::convert::Infallible>(answer_over_cap(
                &req, max,
            )))
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(OVERFLOW_HEAD * 2, conn).await;
        drop(held);
    });
}

/// `/healthz` is alive; `/readyz` is not ready; anything else is refused.
fn answer_over_cap(req: &Request<Incoming>, max: usize) -> Response<Body> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut resp = match req.uri().path() {
        "/healthz" => Response::new(Body::from(r#"{"status":"ok"}"#)),
        "/readyz" => {
            let error = ProxyError::NotReady {
                reason: "connections",
                limiter: None,
            };
            answer(&error, &Served::default(), &id, Secrets::empty())
        }
        _ => answer(
            &ProxyError::TooManyConnections { max },
            &Served::default(),
            &id,
            Secrets::empty(),
        ),
    };
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&id) {
        headers.insert("x-request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_reserve_and_counts_both_ways() {
        assert_eq!(derived_cap(1024), 768);
        assert_eq!(derived_cap(65536), 49152);
        assert_eq!(derived_cap(100), 16);
        let c = Connections::new(2);
        let a = c.try_open().unwrap();
        let _b = c.try_open().unwrap();
        assert!(c.try_open().is_none() && c.at_cap());
        drop(a);
        assert!(!c.at_cap() && c.try_open().is_some());
        let overflow: Vec<_> = (0..OVERFLOW).map_while(|_| c.try_overflow()).collect();
        assert_eq!(overflow.len(), OVERFLOW);
        assert!(c.try_overflow().is_none());
    }
}
