//! The key, both ways. Going out, the request gets the one allowed upstream target of its
//! account (scheme and host from `upstream.base_url`, a client's `api_key` replaced by the
//! account's) and loses the headers that never cross the proxy (hop-by-hop, `Host`,
//! lengths).
//! Coming back, every header of SmartLead's answer, success or error, is scrubbed of the
//! proxy's secrets before a client can see it, and so is a success's body as it streams
//! ([`crate::key::streamed`]; error bodies are scrubbed where they are wrapped). So that
//! the body can be read, SmartLead is asked for it uncompressed (`Accept-Encoding` is
//! not passed on while there are secrets to scrub); a secret in it is masked in place,
//! so the answer keeps its length.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Request;
use tower::{Layer, Service};

use super::{Failure, Reply};
use crate::accounts::Call;
use crate::error::ProxyError;
use crate::key::Secrets;
use crate::key::streamed::Scrubbed;
use crate::upstream::request_headers;

#[derive(Debug)]
struct State {
    secrets: Secrets,
}

#[derive(Clone, Debug)]
pub struct KeyInjectionLayer {
    state: Arc<State>,
}

impl KeyInjectionLayer {
    pub fn new(secrets: &Secrets) -> Self {
        Self {
            state: Arc::new(State {
                secrets: secrets.clone(),
            }),
        }
    }
}

impl<S> Layer<S> for KeyInjectionLayer {
    type Service = KeyInjection<S>;

    fn layer(&self, inner: S) -> KeyInjection<S> {
        KeyInjection {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct KeyInjection<S> {
    inner: S,
    state: Arc<State>,
}

impl<S> Service<Request<Bytes>> for KeyInjection<S>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure>,
{
    type Response = Reply;
    type Error = Failure;
    type Future = KeyInjectionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let Some(call) = parts.extensions.get::<Call>() else {
            // The caller layer always chooses one: a request without is a bug.
            return KeyInjectionFuture::Refused {
                failure: Some(Box::new(Failure::early(ProxyError::Internal))),
            };
        };
        let target = &call.account.target;
        let host = target.host();
        let uri = match target.uri(parts.uri.path(), parts.uri.query()) {
            Ok(uri) => uri,
            Err(why) => {
                let failure = Failure::early(ProxyError::BadPath(why));
                return KeyInjectionFuture::Refused {
                    failure: Some(Box::new(failure)),
                };
            }
        };
        parts.uri = uri;
        parts.headers = request_headers(std::mem::take(&mut parts.headers), host);
        if !self.state.secrets.is_empty() {
            parts.headers.remove(http::header::ACCEPT_ENCODING);
        }
        let head = parts.method == http::Method::HEAD;
        KeyInjectionFuture::Sent {
            call: self.inner.call(Request::from_parts(parts, body)),
            state: self.state.clone(),
            head,
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum KeyInjectionFuture<F> {
        Sent {
            #[pin]
            call: F,
            state: Arc<State>,
            // A HEAD answer has no body to scrub, and keeps its length.
            head: bool,
        },
        // Boxed: rare, and inline it would add its size to every request's future.
        Refused { failure: Option<Box<Failure>> },
    }
}

impl<F> Future for KeyInjectionFuture<F>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    type Output = Result<Reply, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Sent { call, state, head } => {
                let mut answered = ready!(call.poll(cx));
                let secrets = &state.secrets;
                match &mut answered {
                    Ok(reply) => {
                        secrets.scrub_headers(reply.response.headers_mut());
                        if !*head {
                            scrub_body(&mut reply.response, secrets);
                        }
                    }
                    Err(Failure {
                        error: ProxyError::Upstream(failed),
                        ..
                    }) => secrets.scrub_headers(&mut failed.headers),
                    Err(_) => {}
                }
                Poll::Ready(answered)
            }
            Projected::Refused { failure } => {
                Poll::Ready(Err(*failure.take().expect("polled after completion")))
            }
        }
    }
}

/// A success with a body streams through [`Scrubbed`].
fn scrub_body(response: &mut http::Response<axum::body::Body>, secrets: &Secrets) {
    let status = response.status();
    if secrets.is_empty()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
    {
        return;
    }
    let body = std::mem::take(response.body_mut());
    *response.body_mut() = axum::body::Body::new(Scrubbed::new(body, secrets.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ApiKey;
    use crate::served::Served;
    use axum::body::Body;
    use http::{HeaderValue, Response};
    use tower::ServiceExt;

    const KEY: &str = "k3y/secret+1";

    fn layer() -> KeyInjectionLayer {
        KeyInjectionLayer::new(&ApiKey::new(KEY).secrets())
    }

    /// A request for the `default` account, whose key is [`KEY`].
    fn request(uri: &str) -> http::request::Builder {
        let mut s = crate::config::Settings::default();
        s.upstream.base_url = "https://up.example/api/v1".parse().unwrap();
        s.upstream.api_key = Some(ApiKey::new(KEY));
        let accounts = crate::accounts::Accounts::new(&s).unwrap();
        let account = Call::anonymous(accounts.choose(None, None, None).unwrap().account);
        Request::builder().uri(uri).extension(account)
    }

    /// Answers with the URI it was sent to in the body and the key in a header.
    fn echo_uri() -> impl Service<Request<Bytes>, Response = Reply, Error = Failure> + Clone {
        tower::service_fn(|req: Request<Bytes>| async move {
            let mut resp = Response::new(Body::from(req.uri().to_string()));
            let cookie = HeaderValue::from_str(&format!("sid={KEY}")).unwrap();
            resp.headers_mut().insert("set-cookie", cookie);
            let hosts: Vec<_> = req.headers().get_all("host").iter().cloned().collect();
            resp.headers_mut()
                .insert("x-hosts", HeaderValue::from(hosts.len()));
            resp.headers_mut().insert("x-host", hosts[0].clone());
            Ok::<_, Failure>(Reply::new(resp, Served::default()))
        })
    }

    #[tokio::test]
    async fn the_request_goes_to_the_target_with_the_key_and_the_answer_comes_back_without() {
        let req = request("/api/v1/campaigns?api_key=theirs&limit=5")
            .header("host", "evil.example")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(Bytes::new())
            .unwrap();
        let reply = layer().layer(echo_uri()).oneshot(req).await.unwrap();
        assert_eq!(reply.response.headers()["set-cookie"], "sid=***");
        assert_eq!(
            reply.response.headers()["x-hosts"],
            "1",
            "the client's is replaced"
        );
        assert_eq!(reply.response.headers()["x-host"], "up.example");
        let body = axum::body::to_bytes(reply.response.into_body(), 1 << 16)
            .await
            .unwrap();
        // A path only: the client connects to the base URL's host (up.example, the
        // Host header above), never anywhere a target could name.
        // The key went out in the query (encoded, 16 characters) and, echoed back in a
        // success body, is masked in place.
        let masked = format!("/api/v1/campaigns?limit=5&api_key={}", "*".repeat(16));
        assert_eq!(body, masked.as_bytes());
    }

    #[tokio::test]
    async fn a_path_that_would_escape_is_refused() {
        for path in [
            "/api/v1/../x",
            "/api/v1/a%2fb",
            "/api/v1/campaigns/1//leads",
        ] {
            let req = request(path).body(Bytes::new()).unwrap();
            let err = layer().layer(echo_uri()).oneshot(req).await.unwrap_err();
            assert!(matches!(err.error, ProxyError::BadPath(_)), "{path}");
        }
    }

    #[tokio::test]
    async fn an_upstream_error_answer_loses_the_key_from_its_headers() {
        let failing = tower::service_fn(|_: Request<Bytes>| async {
            let mut headers = http::HeaderMap::new();
            headers.insert("www-authenticate", HeaderValue::from_str(KEY).unwrap());
            let failed = crate::error::Failed {
                status: http::StatusCode::UNAUTHORIZED,
                headers,
                body: Bytes::new(),
                cut: false,
            };
            Err::<Reply, _>(Failure::early(ProxyError::Upstream(Box::new(failed))))
        });
        let req = request("/api/v1/x").body(Bytes::new()).unwrap();
        let err = layer().layer(failing).oneshot(req).await.unwrap_err();
        match err.error {
            ProxyError::Upstream(f) => assert_eq!(f.headers["www-authenticate"], "***"),
            other => panic!("{other:?}"),
        }
    }
}
