//! `smartlead-proxy healthcheck`: a self-check for container HEALTHCHECKs (distroless
//! images have no curl); and the small HTTP GET the `status` command uses too.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

/// The `/healthz` URL of a proxy listening on `listen` (a wildcard address means loopback).
pub fn url_for(listen: SocketAddr) -> String {
    format!("{}/healthz", base_url_for(listen))
}

/// `http://host:port` of a proxy listening on `listen` (a wildcard address means loopback).
pub fn base_url_for(listen: SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        match listen {
            SocketAddr::V4(_) => "127.0.0.1".to_owned(),
            SocketAddr::V6(_) => "[::1]".to_owned(),
        }
    } else {
        match listen {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    format!("http://{host}:{}", listen.port())
}

/// True when `url` answers 200 within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), String> {
    get(url, None, timeout).await.map(drop)
}

/// The body of `url` when it answers 200 within `timeout` (with `token` as a bearer
/// token); otherwise one line saying what happened.
pub async fn get(url: &str, token: Option<&str>, timeout: Duration) -> Result<Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = http::Request::get(uri);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
    let fetched = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{url} answered {}", resp.status()));
        }
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("{url}: {e}"))
    };
    tokio::time::timeout(timeout, fetched)
        .await
        .unwrap_or_else(|_| Err(format!("{url}: no answer within {}s", timeout.as_secs())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn wildcard_listen_means_loopback() {
        assert_eq!(
            super::url_for("0.0.0.0:8787".parse().unwrap()),
            "http://127.0.0.1:8787/healthz"
        );
        assert_eq!(
            super::url_for("127.0.0.2:9".parse().unwrap()),
            "http://127.0.0.2:9/healthz"
        );
        assert_eq!(
            super::url_for("[::]:80".parse().unwrap()),
            "http://[::1]:80/healthz"
        );
    }
}
