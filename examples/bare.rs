use std::convert::Infallible;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() {
    let up = std::env::var("UP").unwrap();
    let listener = tokio::net::TcpListener::bind(std::env::var("LISTEN").unwrap()).await.unwrap();
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
}
