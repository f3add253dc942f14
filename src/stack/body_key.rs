//! A client's `api_key` in the body ([`crate::key::in_body`]) is treated like the query
//! parameter: taken out of the body always, and with `upstream.allow_client_key`, when
//! nothing else chose the request's account ([`Call::open`]), taken as the client's key:
//! it chooses that key's quota and goes on in the query, where the target keeps it. The
//! rest of the body goes on byte for byte.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Uri, request::Parts};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use tower::{Layer, Service};

use super::{Failure, Reply};
use crate::accounts::{Accounts, Call};
use crate::error::ProxyError;
use crate::key::in_body::take_api_key;

#[derive(Clone, Debug)]
pub struct BodyKeyLayer {
    accounts: Arc<Accounts>,
}

impl BodyKeyLayer {
    pub fn new(accounts: &Arc<Accounts>) -> Self {
        Self {
            accounts: accounts.clone(),
        }
    }
}

impl<S> Layer<S> for BodyKeyLayer {
    type Service = BodyKey<S>;

    fn layer(&self, inner: S) -> BodyKey<S> {
        BodyKey {
            inner,
            accounts: self.accounts.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BodyKey<S> {
    inner: S,
    accounts: Arc<Accounts>,
}

impl<S> BodyKey<S> {
    /// The request with the key taken out of its body and, when it chooses the account,
    /// put in its query.
    fn take_key(&self, req: Request<Bytes>) -> Result<Request<Bytes>, ProxyError> {
        let Some(taken) = take_api_key(req.headers(), req.body()) else {
            return Ok(req);
        };
        let (mut parts, _) = req.into_parts();
        if let Some(key) = taken.key {
            self.choose_by(&mut parts, &key)?;
        }
        Ok(Request::from_parts(parts, taken.body))
    }

    fn choose_by(&self, parts: &mut Parts, key: &str) -> Result<(), ProxyError> {
        let Some(call) = parts.extensions.get_mut::<Call>().filter(|c| c.open) else {
            return Ok(());
        };
        let Some(account) = self.accounts.for_client_key(key) else {
            return Ok(());
        };
        call.account = account?;
        call.open = false;
        let encoded = utf8_percent_encode(key, NON_ALPHANUMERIC);
        let target = match parts.uri.query() {
            Some(q) if !q.is_empty() => format!("{}?{q}&api_key={encoded}", parts.uri.path()),
            _ => format!("{}?api_key={encoded}", parts.uri.path()),
        };
        parts.uri = Uri::try_from(target)
            .map_err(|_| ProxyError::BadPath("the request path or query is not valid"))?;
        Ok(())
    }
}

impl<S> Service<Request<Bytes>> for BodyKey<S>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure>,
{
    type Response = Reply;
    type Error = Failure;
    type Future = BodyKeyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        match self.take_key(req) {
            Ok(req) => BodyKeyFuture::Sent {
                call: self.inner.call(req),
            },
            Err(e) => BodyKeyFuture::Refused {
                failure: Some(Box::new(Failure::early(e))),
            },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum BodyKeyFuture<F> {
        Sent { #[pin] call: F },
        // Boxed: rare, and inline it would add its size to every request's future.
        Refused { failure: Option<Box<Failure>> },
    }
}

impl<F> Future for BodyKeyFuture<F>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    type Output = Result<Reply, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Sent { call } => call.poll(cx),
            Projected::Refused { failure } => {
                Poll::Ready(Err(*failure.take().expect("polled after completion")))
            }
        }
    }
}
