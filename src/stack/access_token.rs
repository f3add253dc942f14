//! With `server.access_tokens` set, `/api/v1/*` needs `Authorization: Bearer <token>`
//! (compared in constant time); the header is the proxy's and is removed before going
//! on. Without tokens the layer lets everything through untouched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, header};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use super::Reply;
use crate::error::{ProxyError, answer};
use crate::key::Secrets;
use crate::served::Served;

#[derive(Clone, Debug)]
pub struct AccessTokenLayer {
    tokens: Arc<[SecretString]>,
}

impl AccessTokenLayer {
    pub fn new(tokens: &[SecretString]) -> Self {
        Self {
            tokens: tokens.into(),
        }
    }
}

impl<S> Layer<S> for AccessTokenLayer {
    type Service = AccessToken<S>;

    fn layer(&self, inner: S) -> AccessToken<S> {
        AccessToken {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AccessToken<S> {
    inner: S,
    tokens: Arc<[SecretString]>,
}

impl<S> AccessToken<S> {
    fn allows(&self, presented: Option<&str>) -> bool {
        // Compare against every token, without stopping at the first match.
        presented.is_some_and(|p| {
            self.tokens.iter().fold(false, |found, t| {
                found | bool::from(p.as_bytes().ct_eq(t.expose_secret().as_bytes()))
            })
        })
    }
}

impl<S, B> Service<Request<B>> for AccessToken<S>
where
    S: Service<Request<B>, Response = Reply, Error = Infallible>,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = AccessTokenFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !self.tokens.is_empty() {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            if !self.allows(presented) {
                let id = super::request_id::of(req.headers());
                let resp = answer(
                    &ProxyError::Unauthorized,
                    &Served::default(),
                    id,
                    Secrets::empty(),
                );
                return AccessTokenFuture::Refused {
                    reply: Some(Reply::new(resp, Served::default())),
                };
            }
            req.headers_mut().remove(header::AUTHORIZATION);
        }
        AccessTokenFuture::Allowed {
            call: self.inner.call(req),
        }
    }
}

/// The token from `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum AccessTokenFuture<F> {
        Allowed { #[pin] call: F },
        Refused { reply: Option<Reply> },
    }
}

impl<F> Future for AccessTokenFuture<F>
where
    F: Future<Output = Result<Reply, Infallible>>,
{
    type Output = Result<Reply, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Allowed { call } => call.poll(cx),
            Projected::Refused { reply } => {
                Poll::Ready(Ok(reply.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Response;
    use tower::ServiceExt;

    /// Answers 200 with whatever Authorization header reached it in the body.
    fn inner() -> impl Service<Request<()>, Response = Reply, Error = Infallible> + Clone {
        tower::service_fn(|req: Request<()>| async move {
            let seen = req
                .headers()
                .get(header::AUTHORIZATION)
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            Ok::<_, Infallible>(Reply::new(
                Response::new(Body::from(seen)),
                Served::default(),
            ))
        })
    }

    async fn call(tokens: &[&str], auth: Option<&str>) -> (u16, String) {
        let tokens: Vec<SecretString> = tokens.iter().map(|t| SecretString::from(*t)).collect();
        let mut req = Request::builder().uri("/api/v1/campaigns");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let reply = AccessTokenLayer::new(&tokens)
            .layer(inner())
            .oneshot(req.body(()).unwrap())
            .await
            .unwrap();
        let status = reply.response.status().as_u16();
        let body = axum::body::to_bytes(reply.response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn without_tokens_everything_passes_untouched() {
        assert_eq!(call(&[], None).await, (200, "none".into()));
        assert_eq!(call(&[], Some("Bearer x")).await, (200, "Bearer x".into()));
    }

    #[tokio::test]
    async fn with_tokens_only_a_right_bearer_passes_and_the_header_stops_here() {
        assert_eq!(
            call(&["t1", "t2"], Some("Bearer t2")).await,
            (200, "none".into())
        );
        assert_eq!(
            call(&["t1"], Some("bearer  t1 ")).await,
            (200, "none".into())
        );
        for wrong in [None, Some("Bearer t3"), Some("Basic t1"), Some("Bearer ")] {
            let (status, body) = call(&["t1"], wrong).await;
            assert_eq!(status, 401, "{wrong:?}");
            assert!(body.contains("UNAUTHORIZED"), "{body}");
        }
    }

    #[test]
    fn parses_bearer() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
