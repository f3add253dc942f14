//! `smartlead-proxy healthcheck`: a self-check for container HEALTHCHECKs (distroless
//! images have no curl).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

/// The `/healthz` URL of a proxy listening on `listen` (a wildcard address means loopback).
pub fn url_for(listen: SocketAddr) -> String {
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
    format!("http://{host}:{}/healthz", listen.port())
}

/// True when `url` answers 200 within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    match tokio::time::timeout(timeout, client.get(uri)).await {
        Ok(Ok(resp)) if resp.status() == http::StatusCode::OK => Ok(()),
        Ok(Ok(resp)) => Err(format!("{url} answered {}", resp.status())),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no answer within {}s", timeout.as_secs())),
    }
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
