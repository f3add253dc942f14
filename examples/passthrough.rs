//! The floor of the stack for the overhead benchmark: hyper's HTTP/1 server and client
//! doing what the proxy does with nothing else (no layers, no quota, no metrics), shaped
//! like the proxy: one event loop per core, each with its own pool of upstream
//! connections. bench/run measures it beside nginx, HAProxy and the proxy.
//!
//! `cargo run --release --example passthrough -- <listen addr> <upstream addr>`

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Pool = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: passthrough <listen addr> <upstream addr>");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("an upstream address");
    let listener = std::net::TcpListener::bind(listen).expect("the listen address");
    listener.set_nonblocking(true).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone().unwrap();
            std::thread::spawn(move || serve(listener, upstream))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn serve(listener: std::net::TcpListener, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let pool: Pool = Rc::default();
        // Made once, as the proxy makes its `Host` once.
        let host = hyper::header::HeaderValue::from_str(&upstream.to_string()).unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (pool, host) = (pool.clone(), host.clone());
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| {
                    forward(pool.clone(), upstream, host.clone(), req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn forward(
    pool: Pool,
    upstream: SocketAddr,
    host: hyper::header::HeaderValue,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, hyper::Error> {
    let popped = pool.borrow_mut().pop();
    let mut sender = match popped {
        Some(s) => s,
        None => {
            let stream = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let _ = stream.set_nodelay(true);
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(conn);
            sender
        }
    };
    sender.ready().await?;
    req.headers_mut().insert(hyper::header::HOST, host);
    let answer = sender.send_request(req).await;
    // Back once the head is in: the next user's ready() waits for this body's end.
    pool.borrow_mut().push(sender);
    answer
}
