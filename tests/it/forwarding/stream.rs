//! A body far bigger than memory would like streams through: the proxy never holds it.
//! (It runs in a process of its own, so the process's peak RSS measures only this.)

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 2048; // 128 MiB

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

#[tokio::test]
async fn a_128_mib_body_streams_without_being_buffered() {
    if !own_process("forwarding::stream::a_128_mib_body_streams_without_being_buffered") {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            CHUNK * CHUNKS
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; CHUNK];
        for _ in 0..CHUNKS {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let proxy = spawn_proxy(settings(&format!("http://{addr}/api/v1"))).await;
    let before = peak_rss_mib();
    let mut resp = proxy.get("/api/v1/export").await;
    assert_eq!(resp.status(), 200);
    let mut total = 0usize;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, CHUNK * CHUNKS);
    let grew = peak_rss_mib().saturating_sub(before);
    assert!(
        grew < 48,
        "peak RSS grew {grew} MiB while 128 MiB passed through"
    );
    proxy.stop().await;
}
