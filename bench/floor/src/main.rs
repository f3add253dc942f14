//! hyper's HTTP/1 server on one thread, every request left pending: what the stack
//! itself needs to hold requests. `bare-hyper-floor <listen addr>`

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;

type Never = hyper::Response<http_body_util::Empty<bytes::Bytes>>;

fn main() {
    let addr = std::env::args().nth(1).expect("a listen address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| {
                    std::future::pending::<Result<Never, std::convert::Infallible>>()
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
