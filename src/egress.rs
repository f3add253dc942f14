//! How the upstream is reached: directly, or through an HTTP proxy with CONNECT
//! (`upstream.proxy`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` and `NO_PROXY` as curl
//! reads them). The upstream is one fixed base URL, so the choice is made once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::UpstreamSettings;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A TCP connector, tunnelled through a proxy or not.
#[derive(Clone, Debug)]
pub enum Connector {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    // Once per new connection, next to a TCP (and TLS) handshake: a box costs nothing here.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Self::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Self::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Self::Tunnel(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
        }
    }
}

/// The connector for `settings.base_url`, and the proxy it goes through (credentials
/// masked) if any.
pub fn connector(settings: &UpstreamSettings) -> Result<(Connector, Option<String>), String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    let matcher = match &settings.proxy {
        Some(proxy) => Matcher::builder().all(proxy.clone()).build(),
        None => Matcher::from_env(),
    };
    let target: Uri = settings
        .base_url
        .to_string()
        .parse()
        .map_err(|e| format!("upstream.base_url: {e}"))?;
    let Some(via) = matcher.intercept(&target) else {
        return Ok((Connector::Direct(http), None));
    };
    if via.uri().scheme_str() != Some("http") {
        return Err(format!(
            "the egress proxy {} must be an http:// proxy (it is reached with CONNECT)",
            crate::config::mask_userinfo(&via.uri().to_string())
        ));
    }
    let shown = crate::config::mask_userinfo(&via.uri().to_string());
    let mut tunnel = Tunnel::new(via.uri().clone(), http);
    if let Some(auth) = via.basic_auth() {
        tunnel = tunnel.with_auth(auth.clone());
    }
    Ok((Connector::Tunnel(tunnel), Some(shown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(proxy: Option<&str>) -> UpstreamSettings {
        UpstreamSettings {
            proxy: proxy.map(str::to_owned),
            ..UpstreamSettings::default()
        }
    }

    #[test]
    fn a_configured_proxy_is_used_and_shown_without_its_password() {
        let (c, via) = connector(&settings(Some("http://me:secret@127.0.0.1:3128"))).unwrap();
        assert!(matches!(c, Connector::Tunnel(_)));
        let via = via.unwrap();
        assert!(via.contains("127.0.0.1:3128"), "{via}");
        assert!(!via.contains("secret"), "{via}");
    }

    #[test]
    fn a_tls_proxy_is_refused() {
        let e = connector(&settings(Some("https://127.0.0.1:3128"))).unwrap_err();
        assert!(e.contains("http://"), "{e}");
    }
}
