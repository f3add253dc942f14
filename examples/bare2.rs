use std::convert::Infallible;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let up = std::env::var("UP").unwrap();
    let addr: std::net::SocketAddr = std::env::var("LISTEN").unwrap().parse().unwrap();
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let mut hs = vec![];
    for _ in 0..n {
        let up = up.clone();
        hs.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.set_reuse_port(true).unwrap(); s.set_reuse_address(true).unwrap();
                s.bind(&addr.into()).unwrap(); s.listen(4096).unwrap(); s.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(s.into()).unwrap();
                let mut c = HttpConnector::new();
                c.set_nodelay(true);
                let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build(c);
                loop {
                    let (s, _) = listener.accept().await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let client = client.clone();
                    let up = up.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let client = client.clone();
                            let up = up.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                let uri: hyper::Uri = format!("{}{}", up, parts.uri.path_and_query().unwrap()).parse().unwrap();
                                let mut r = hyper::Request::new(Full::new(body));
                                *r.uri_mut() = uri;
                                *r.method_mut() = parts.method;
                                let resp = client.request(r).await.unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                    });
                }
            })
        }));
    }
    for h in hs { h.join().unwrap(); }
}
