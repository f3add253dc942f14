//! The floor under any proxy on tokio, for the overhead benchmark: a pass-through with no
//! HTTP engine at all. Heads are parsed in place with `httparse`, the request is written
//! upstream with its `Host` replaced, and the answer (`Content-Length` bodies only) is
//! copied back byte for byte; no header maps, no body channels, no timers, no features.
//! Shaped like the proxy and `passthrough.rs`: one event loop per core, each with its
//! own pool of upstream connections. bench/run measures it beside nginx: no proxy built
//! on tokio does less per request than this.
//!
//! `cargo run --release --example no_engine -- <listen addr> <upstream addr>`

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod floor;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Idle upstream connections of one thread, each with its read buffer.
type Pool = Rc<RefCell<Vec<(TcpStream, Vec<u8>)>>>;

fn main() {
    floor::run("no_engine", |upstream| {
        let pool: Pool = Rc::default();
        let host: Rc<[u8]> = upstream.to_string().into_bytes().into();
        move |stream| {
            let (pool, host) = (pool.clone(), host.clone());
            async move {
                let _ = connection(stream, pool, upstream, &host).await;
            }
        }
    });
}

fn content_length(headers: &[httparse::Header]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads from `io` into `buf` until `parse` finds a whole message; returns its length,
/// or `None` at EOF.
async fn read_message(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> io::Result<Option<(usize, usize)>>,
) -> io::Result<Option<(usize, usize)>> {
    loop {
        if let Some(lengths) = parse(buf)? {
            while buf.len() < lengths.0 + lengths.1 {
                if io.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            }
            return Ok(Some(lengths));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(4096);
        }
        if io.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Writes the request head in `buf` to `out` with `Host` replaced; returns the head's and
/// the body's lengths once the head is whole.
fn rewrite_request(
    buf: &[u8],
    host: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = req.parse(buf).map_err(io::Error::other)? else {
        return Ok(None);
    };
    out.clear();
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    for h in req
        .headers
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("host"))
    {
        for part in [h.name.as_bytes(), b": ", h.value, b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((head, content_length(req.headers))))
}

fn response_lengths(buf: &[u8]) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(buf).map_err(io::Error::other)? {
        httparse::Status::Complete(head) => Ok(Some((head, content_length(res.headers)))),
        httparse::Status::Partial => Ok(None),
    }
}

async fn connection(
    mut client: TcpStream,
    pool: Pool,
    upstream: SocketAddr,
    host: &[u8],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(1024);
    loop {
        let parse = |b: &[u8]| rewrite_request(b, host, &mut out);
        let Some((head, body)) = read_message(&mut client, &mut buf, parse).await? else {
            return Ok(());
        };
        out.extend_from_slice(&buf[head..head + body]);
        buf.drain(..head + body);
        let idle = pool.borrow_mut().pop();
        let (mut up, mut answer) = match idle {
            Some(idle) => idle,
            None => {
                let up = TcpStream::connect(upstream).await?;
                up.set_nodelay(true)?;
                (up, Vec::with_capacity(4096))
            }
        };
        up.write_all(&out).await?;
        let Some((head, body)) = read_message(&mut up, &mut answer, response_lengths).await? else {
            return Ok(());
        };
        client.write_all(&answer[..head + body]).await?;
        answer.drain(..head + body);
        pool.borrow_mut().push((up, answer));
    }
}
