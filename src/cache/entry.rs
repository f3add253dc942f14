//! A stored answer: exactly what clients are sent (scrubbed, hop-by-hop headers gone),
//! when it was asked for, how long it is fresh, and the generations of the scopes it
//! depends on ([`super::routes::Scope`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Bytes an entry costs besides its headers and body (its bookkeeping in the cache).
const OVERHEAD: usize = 160;

#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When SmartLead answered, in Unix milliseconds (shared by every instance).
    pub at_ms: u64,
    pub ttl: Duration,
    pub gens: Vec<u64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Stored {
    /// Headers plus body plus bookkeeping, as `cache.max_bytes` counts them.
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        headers + self.body.len() + OVERHEAD
    }

    /// Milliseconds since SmartLead answered.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.at_ms)
    }

    /// Milliseconds of freshness left; negative once expired.
    pub fn left_ms(&self, now_ms: u64) -> i64 {
        self.ttl.as_millis() as i64 - self.age_ms(now_ms) as i64
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        self.left_ms(now_ms) > 0
    }

    /// As kept in Redis: a version byte, then fixed fields, headers and the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(self.weight());
        out.put_u8(VERSION);
        out.put_u16(self.status.as_u16());
        out.put_u64(self.at_ms);
        out.put_u64(self.ttl.as_millis() as u64);
        out.put_u8(self.gens.len() as u8);
        for g in &self.gens {
            out.put_u64(*g);
        }
        out.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_slice(&self.body);
        out.to_vec()
    }

    /// `None` for anything [`Stored::encode`] did not write (another version, a cut
    /// value): it is treated as absent.
    pub fn decode(mut raw: Bytes) -> Option<Self> {
        let fixed = 1 + 2 + 8 + 8 + 1;
        if raw.remaining() < fixed || raw.get_u8() != VERSION {
            return None;
        }
        let status = StatusCode::from_u16(raw.get_u16()).ok()?;
        let at_ms = raw.get_u64();
        let ttl = Duration::from_millis(raw.get_u64());
        let n = raw.get_u8() as usize;
        if raw.remaining() < n * 8 + 4 {
            return None;
        }
        let gens = (0..n).map(|_| raw.get_u64()).collect();
        let count = raw.get_u32() as usize;
        let mut headers = HeaderMap::with_capacity(count.min(64));
        for _ in 0..count {
            let name = take(&mut raw, 2)?;
            let value = take(&mut raw, 4)?;
            headers.append(
                HeaderName::from_bytes(&name).ok()?,
                HeaderValue::from_maybe_shared(value).ok()?,
            );
        }
        Some(Self {
            status,
            headers,
            body: raw,
            at_ms,
            ttl,
            gens,
        })
    }
}

const VERSION: u8 = 1;

/// A length-prefixed field (`width` bytes of big-endian length).
fn take(raw: &mut Bytes, width: usize) -> Option<Bytes> {
    if raw.remaining() < width {
        return None;
    }
    let len = if width == 2 {
        raw.get_u16() as usize
    } else {
        raw.get_u32() as usize
    };
    (raw.remaining() >= len).then(|| raw.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_did_not_write() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        let stored = Stored {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"[{\"id\":1}]"),
            at_ms: 1_700_000_000_000,
            ttl: Duration::from_secs(60),
            gens: vec![3, 9],
        };
        let raw = Bytes::from(stored.encode());
        let back = Stored::decode(raw.clone()).unwrap();
        assert_eq!(back.headers, stored.headers);
        assert_eq!(
            (back.body, back.gens, back.ttl),
            (stored.body, stored.gens, stored.ttl)
        );
        // Whatever is cut off, decoding never panics.
        for cut in 0..raw.len() {
            let _ = Stored::decode(raw.slice(..cut));
        }
        assert!(Stored::decode(Bytes::from_static(b"\x02garbage-garbage-garbage")).is_none());
        assert!(Stored::decode(raw.slice(..10)).is_none());
    }

    #[test]
    fn freshness_and_age() {
        let s = Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            at_ms: 10_000,
            ttl: Duration::from_secs(5),
            gens: vec![],
        };
        assert!(s.is_fresh(14_999));
        assert!(!s.is_fresh(15_000));
        assert_eq!(s.left_ms(17_000), -2_000);
        assert_eq!(s.age_ms(9_000), 0);
    }
}
