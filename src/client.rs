//! Who a request is for: its client (the `X-Client-Id` header, else its access token's
//! name, else its peer address), its `X-Priority`, and the client's fair-share weight.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;

/// The request header naming a client; the proxy's, never forwarded.
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-client-id");
/// The request header asking for a priority; the proxy's, never forwarded.
pub const PRIORITY_HEADER: HeaderName = HeaderName::from_static("x-priority");

/// 1-64 characters of `[A-Za-z0-9._:-]`: what `X-Client-Id` and token names may be.
pub fn valid_client_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The address a request came from: the connection's (see [`serving`]), or a request
/// extension of this type (in-process callers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub IpAddr);

tokio::task_local! {
    /// The peer of the connection whose future is being polled.
    static PEER: Peer;
}

/// `conn` (a connection's future), with its peer known to everything it calls: no
/// per-request work, unlike a request extension.
pub fn serving<F: std::future::Future>(
    peer: Peer,
    conn: F,
) -> impl std::future::Future<Output = F::Output> {
    PEER.scope(peer, conn)
}

/// The peer of the connection being served now, if there is one.
pub fn current_peer() -> Option<Peer> {
    PEER.try_with(|p| *p).ok()
}

/// `X-Priority`: classes served strictly in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];
}

/// A client: its `X-Client-Id`, else its access token's name, else its peer address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    Named(Arc<str>),
    Peer(IpAddr),
    /// No header, no named token, no peer address (in-process callers).
    Anonymous,
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Named(name) => f.write_str(name),
            ClientId::Peer(ip) => write!(f, "{ip}"),
            ClientId::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// Who a request is for: its client, its priority, and the client's weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub client: ClientId,
    pub priority: Priority,
    pub weight: u32,
}

impl Default for Who {
    fn default() -> Self {
        Self {
            client: ClientId::Anonymous,
            priority: Priority::Normal,
            weight: 1,
        }
    }
}

/// `limit.per_client`: a token bucket per client (governor's GCRA), checked before any
/// queueing. A bucket's looseness is harmless here: the account's windows still hold
/// every request to the quota; this only stops one client taking more than its cap.
pub struct ClientCaps {
    buckets: governor::DefaultKeyedRateLimiter<ClientId>,
    checks: std::sync::atomic::AtomicU32,
}

/// Buckets of clients gone quiet are dropped after this many checks.
const TIDY_EVERY: u32 = 4096;

impl std::fmt::Debug for ClientCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCaps")
            .field("clients", &self.buckets.len())
            .finish()
    }
}

impl ClientCaps {
    /// At most `requests` per `period` for each client, all of them at once if it has
    /// been quiet.
    pub fn new(requests: u32, period: std::time::Duration) -> Self {
        let requests = std::num::NonZeroU32::new(requests.max(1)).expect("at least 1");
        let every = (period / requests.get()).max(std::time::Duration::from_nanos(1));
        let quota = governor::Quota::with_period(every)
            .expect("a period above zero")
            .allow_burst(requests);
        Self {
            buckets: governor::RateLimiter::keyed(quota),
            checks: Default::default(),
        }
    }

    /// `Err(wait)`: the client is over its cap until `wait` from now.
    pub fn check(&self, client: &ClientId) -> Result<(), std::time::Duration> {
        use governor::clock::Clock;
        use std::sync::atomic::Ordering;
        if self.checks.fetch_add(1, Ordering::Relaxed) % TIDY_EVERY == TIDY_EVERY - 1 {
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
        }
        self.buckets
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(valid_client_id("worker-7.eu:blue_2"));
        assert!(valid_client_id(&"a".repeat(64)));
        for bad in ["", "a b", "é", "a/b", &"a".repeat(65)] {
            assert!(!valid_client_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn priorities() {
        assert_eq!(Priority::parse(" HIGH "), Some(Priority::High));
        assert_eq!(Priority::parse("low"), Some(Priority::Low));
        assert_eq!(Priority::parse("urgent"), None);
        assert!(Priority::High < Priority::Normal && Priority::Normal < Priority::Low);
    }

    #[test]
    fn a_cap_is_per_client_and_says_when() {
        let caps = ClientCaps::new(3, std::time::Duration::from_secs(60));
        let a = ClientId::Named("a".into());
        let b = ClientId::Named("b".into());
        for _ in 0..3 {
            assert!(caps.check(&a).is_ok());
        }
        let wait = caps.check(&a).unwrap_err();
        assert!(
            wait > std::time::Duration::from_secs(15) && wait <= std::time::Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(caps.check(&b).is_ok(), "others are untouched");
    }
}
