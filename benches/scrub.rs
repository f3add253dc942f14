//! The cost of scrubbing the configured key out of success bodies as they stream
//! (`crate::key::streamed`), per MB, against copying the same pieces unscrubbed in the
//! same run. The body is JSON like a lead list, in 16 KiB pieces, once with no key in it
//! and once with the key in every 64 KiB, split across pieces where it falls.
//!
//! `cargo bench --bench scrub`

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::key::streamed::Scrubbed;

const KEY: &str = "0f3c9a7d-2b8e-4c61-a5f0-9e3d7b2c8a41_k2x9q7";
const PIECE: usize = 16 * 1024;
const TOTAL: usize = 64 * 1024 * 1024;

/// `TOTAL` bytes of lead-list JSON, the key every `every` bytes when given.
fn body(every: Option<usize>) -> Vec<u8> {
    let lead = br#"{"email":"jane.doe@example.com","first_name":"Jane","last_name":"Doe","company_name":"Example Inc","custom_fields":{"title":"VP Sales","city":"Berlin"}},"#;
    let mut out = Vec::with_capacity(TOTAL + 256);
    let mut next_key = every.unwrap_or(usize::MAX);
    while out.len() < TOTAL {
        if out.len() >= next_key {
            out.extend_from_slice(
                format!(r#"{{"webhook":"https://x/?api_key={KEY}"}},"#).as_bytes(),
            );
            next_key += every.unwrap_or(usize::MAX);
        }
        out.extend_from_slice(lead);
    }
    out.truncate(TOTAL);
    out
}

fn pieces(body: &[u8]) -> Vec<Bytes> {
    body.chunks(PIECE).map(Bytes::copy_from_slice).collect()
}

/// Time to pass `pieces` through a body, scrubbed or not; the bytes that came out.
async fn through(pieces: Vec<Bytes>, scrub: bool) -> (Duration, usize) {
    let frames = futures_util::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(p))),
    );
    let plain = StreamBody::new(frames);
    let started = Instant::now();
    let mut out = 0;
    if scrub {
        let mut body = Scrubbed::new(plain, ApiKey::new(KEY).secrets());
        while let Some(f) = body.frame().await {
            out += f.unwrap().into_data().map_or(0, |d| d.len());
        }
    } else {
        let mut body = plain;
        while let Some(f) = body.frame().await {
            out += f.unwrap().into_data().map_or(0, |d| d.len());
        }
    }
    (started.elapsed(), out)
}

/// `body` through the scrubber, collected (not timed).
async fn scrubbed(body: &[u8]) -> Vec<u8> {
    let frames = futures_util::stream::iter(
        pieces(body)
            .into_iter()
            .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(p))),
    );
    let mut body = Scrubbed::new(StreamBody::new(frames), ApiKey::new(KEY).secrets());
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        out.extend_from_slice(&f.unwrap().into_data().unwrap_or_default());
    }
    out
}

/// The best of five runs, in ms per MB.
async fn ms_per_mb(body: &[u8], scrub: bool) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut out = 0;
    for _ in 0..5 {
        let (took, n) = through(pieces(body), scrub).await;
        best = best.min(took.as_secs_f64() * 1000.0 / (body.len() as f64 / 1e6));
        out = n;
    }
    (best, out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("scrub bench: skipped (run it with `cargo bench --bench scrub`)");
        return;
    }
    println!("Success bodies scrubbed of the key as they stream (16 KiB pieces, 64 MB, best of 5)");
    let clean = body(None);
    let keyed = body(Some(64 * 1024));
    let (copy, _) = ms_per_mb(&clean, false).await;
    let (scrub_clean, n) = ms_per_mb(&clean, true).await;
    assert_eq!(n, clean.len(), "a body without the key comes out whole");
    let (scrub_keyed, n) = ms_per_mb(&keyed, true).await;
    assert_eq!(n, keyed.len(), "masked in place");
    assert!(
        !scrubbed(&keyed)
            .await
            .windows(12)
            .any(|w| w == &KEY.as_bytes()[..12])
    );
    println!("  passed on unscrubbed           {copy:>8.3} ms/MB");
    println!(
        "  scrubbed, no key in it         {scrub_clean:>8.3} ms/MB  ({:.0} MB/s)",
        1000.0 / scrub_clean
    );
    println!(
        "  scrubbed, a key every 64 KiB   {scrub_keyed:>8.3} ms/MB  ({:.0} MB/s)",
        1000.0 / scrub_keyed
    );
}
