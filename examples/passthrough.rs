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

mod floor;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Pool = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

fn main() {
    floor::run("passthrough", |upstream| {
        let pool: Pool = Rc::default();
        // Made once, as the proxy makes its `Host` once.
        let host = hyper::header::HeaderValue::from_str(&upstream.to_string()).unwrap();
        move |stream| {
            let (pool, host) = (pool.clone(), host.clone());
            let service = hyper::service::service_fn(move |req| {
                forward(pool.clone(), upstream, host.clone(), req)
            });
            async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
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
