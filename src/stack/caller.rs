//! Who is calling, and for which account. With tokens configured (`server.access_tokens`
//! or an account's `tokens`), `/api/v1/*` needs `Authorization: Bearer <token>` (compared
//! in constant time); the account is the token's, else the one `X-SmartLead-Account`
//! names, else the client's own key's (with `upstream.allow_client_key`), else `default`.
//! The client is `X-Client-Id`, else the token's name, else the peer address; its
//! priority is `X-Priority` (`high` only for `limit.high_priority_clients`, when set). A
//! client over `limit.per_client` by this process's buckets is refused here, before any
//! queueing; while the quota is the fleet's (Redis), the cap is checked over the fleet
//! just before the request queues instead (`stack::quota_retry`). Refusals (401, a bad header or an unknown account 400, another
//! account's token 403, a client's cap 429) are answered here, nothing sent; the proxy's
//! headers go no further. The account and the client travel down in the request's
//! extensions ([`Call`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, header};
use tower::{Layer, Service};

use super::Reply;
use crate::accounts::{ACCOUNT_HEADER, Account, Accounts, Call};
use crate::client::{
    CLIENT_HEADER, ClientCaps, ClientId, PRIORITY_HEADER, Peer, Priority, Who, valid_client_id,
};
use crate::config::{LimitSettings, Window};
use crate::error::{ProxyError, RateLimited, answer};
use crate::key::Secrets;
use crate::limiter::{InForce, Limited};
use crate::served::Served;

/// How clients are told apart and held to their caps: the same for every serving thread.
#[derive(Clone, Debug)]
pub struct Clients {
    /// `limit.per_client`, and the buckets holding every client to it.
    cap: Option<(Window, Arc<ClientCaps>)>,
    weights: Arc<HashMap<String, u32>>,
    allow_priority: bool,
    /// `limit.high_priority_clients`: when non-empty, only they may use `high`.
    high: Arc<std::collections::HashSet<String>>,
}

impl Clients {
    pub fn new(limit: &LimitSettings) -> Self {
        Self {
            cap: limit
                .per_client
                .clone()
                .map(|w| (w.clone(), Arc::new(ClientCaps::new(w.requests, w.period)))),
            weights: Arc::new(limit.client_weights.clone()),
            allow_priority: limit.allow_priority,
            high: Arc::new(limit.high_priority_clients.iter().cloned().collect()),
        }
    }

    /// Under reloaded settings: the same buckets while the cap is the same.
    pub fn reload(&self, limit: &LimitSettings) -> Self {
        let mut next = Self::new(limit);
        if let (Some((old, caps)), Some((new, _))) = (&self.cap, &next.cap)
            && old == new
        {
            next.cap = Some((new.clone(), caps.clone()));
        }
        next
    }

    /// Who the request is for: its `X-Client-Id`, else its token's name, else its peer.
    fn who(
        &self,
        headers: &HeaderMap,
        token_name: Option<Arc<str>>,
        peer: Option<&Peer>,
    ) -> Result<Who, ProxyError> {
        let may_be_high = self.may_be_high(headers, token_name.as_deref());
        let client = match crate::headers::get(headers, &CLIENT_HEADER) {
            Some(v) => match v.to_str().map(str::trim) {
                Ok(id) if valid_client_id(id) => ClientId::Named(id.into()),
                _ => {
                    return Err(ProxyError::BadHeader {
                        name: CLIENT_HEADER,
                        expected: "1 to 64 characters of A-Z a-z 0-9 . _ : -",
                    });
                }
            },
            None => match (token_name, peer) {
                (Some(name), _) => ClientId::Named(name),
                (None, Some(peer)) => ClientId::Peer(peer.0),
                (None, None) => ClientId::Anonymous,
            },
        };
        let priority = match crate::headers::get(headers, &PRIORITY_HEADER) {
            Some(v) if self.allow_priority => {
                v.to_str()
                    .ok()
                    .and_then(Priority::parse)
                    .ok_or(ProxyError::BadHeader {
                        name: PRIORITY_HEADER,
                        expected: "high, normal or low",
                    })?
            }
            _ => Priority::Normal,
        };
        // Anybody else's `high` counts as `normal`, not as an error: a client cannot
        // tell whether it is listed.
        let priority = match priority {
            Priority::High if !may_be_high => Priority::Normal,
            p => p,
        };
        let weight = if self.weights.is_empty() {
            1
        } else {
            self.weights
                .get(client.to_string().as_str())
                .copied()
                .unwrap_or(1)
        };
        Ok(Who {
            client,
            priority,
            weight,
        })
    }

    /// Whether the request may use `X-Priority: high`: anybody may while
    /// `limit.high_priority_clients` is empty; else a request with a named token only when
    /// the token's name is listed (its `X-Client-Id` cannot lend it the right), and one
    /// without only when its `X-Client-Id` is.
    fn may_be_high(&self, headers: &HeaderMap, token_name: Option<&str>) -> bool {
        if self.high.is_empty() {
            return true;
        }
        let name = match token_name {
            Some(name) => Some(name),
            None => headers
                .get(CLIENT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim),
        };
        name.is_some_and(|n| self.high.contains(n))
    }

    /// `limit.per_client` and this process's buckets, for the fleet check when Redis
    /// does not answer it.
    pub fn cap(&self) -> Option<(&Window, &Arc<ClientCaps>)> {
        self.cap.as_ref().map(|(w, c)| (w, c))
    }

    /// A 429 when the client is over `limit.per_client` by this process's buckets. While
    /// the quota is the fleet's, the cap is too: it is checked on Redis before the
    /// request queues (`stack::quota_retry`), not here.
    fn check_cap(&self, who: &Who, account: &Account) -> Result<(), ProxyError> {
        let Some((window, caps)) = &self.cap else {
            return Ok(());
        };
        if account.limiter.is_shared() {
            return Ok(());
        }
        let Err(retry_after) = caps.check(&who.client) else {
            return Ok(());
        };
        Err(client_capped(window, retry_after, &account.name, who))
    }
}

/// The 429 for a client over `limit.per_client`, counted.
pub fn client_capped(
    window: &Window,
    retry_after: std::time::Duration,
    account: &Arc<str>,
    who: &Who,
) -> ProxyError {
    crate::metrics::quota_rejected(account, Limited::ClientCap.label());
    let cap = InForce {
        label: window.to_string(),
        limit: window.requests as usize,
        period: window.period,
    };
    ProxyError::RateLimited(Box::new(RateLimited {
        why: Limited::ClientCap,
        retry_after,
        window: cap.clone(),
        policy: vec![cap],
        account: account.clone(),
        client: Some(who.client.to_string()),
    }))
}

impl Clients {}

#[derive(Clone, Debug)]
pub struct CallerLayer {
    accounts: Arc<Accounts>,
    clients: Clients,
}

impl CallerLayer {
    pub fn new(accounts: &Arc<Accounts>, clients: &Clients) -> Self {
        Self {
            accounts: accounts.clone(),
            clients: clients.clone(),
        }
    }
}

impl<S> Layer<S> for CallerLayer {
    type Service = Caller<S>;

    fn layer(&self, inner: S) -> Caller<S> {
        Caller {
            inner,
            accounts: self.accounts.clone(),
            clients: self.clients.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Caller<S> {
    inner: S,
    accounts: Arc<Accounts>,
    clients: Clients,
}

impl<S> Caller<S> {
    /// The account and the client, or the answer refusing the request.
    // The refusal is moved once, on the way to its answer: boxing it would cost an
    // allocation per refused request for nothing.
    #[allow(clippy::result_large_err)]
    fn decide<B>(&self, req: &Request<B>) -> Result<Call, (ProxyError, Served)> {
        let accounts = &self.accounts;
        let headers = req.headers();
        let token = accounts
            .tokens_required()
            .then(|| crate::headers::get(headers, &header::AUTHORIZATION))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        let named = crate::headers::get(headers, &ACCOUNT_HEADER)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").trim());
        let own_key = accounts
            .keeps_client_keys()
            .then(|| crate::upstream::client_key(req.uri().query()))
            .flatten();
        let chosen = accounts
            .choose(token, named, own_key.as_deref())
            .map_err(|e| (e, Served::default()))?;
        let served = || Served {
            account: Some(chosen.account.name.clone()),
            ..Served::default()
        };
        // A request extension (in-process callers, tests), else the connection's.
        let peer = req
            .extensions()
            .get::<Peer>()
            .copied()
            .or_else(crate::client::current_peer);
        let who = self
            .clients
            .who(headers, chosen.token_name.clone(), peer.as_ref())
            .map_err(|e| (e, served()))?;
        self.clients.check_cap(&who, &chosen.account).map_err(|e| {
            let mut served = served();
            served.client = Some(who.client.clone());
            (e, served)
        })?;
        Ok(Call {
            account: chosen.account,
            who,
            open: chosen.open && accounts.keeps_client_keys(),
        })
    }
}

impl<S, B> Service<Request<B>> for Caller<S>
where
    S: Service<Request<B>, Response = Reply, Error = Infallible>,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = CallerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let call = match self.decide(&req) {
            Ok(call) => call,
            Err((refused, served)) => {
                let id = super::request_id::of(req.headers());
                let resp = answer(&refused, &served, id, Secrets::empty());
                return CallerFuture::Refused {
                    reply: Some(Box::new(Reply::new(resp, served))),
                };
            }
        };
        let headers = req.headers_mut();
        if self.accounts.tokens_required() {
            headers.remove(header::AUTHORIZATION);
        }
        crate::headers::remove_all(headers, &[ACCOUNT_HEADER, CLIENT_HEADER, PRIORITY_HEADER]);
        req.extensions_mut().insert(call);
        CallerFuture::Allowed {
            call: self.inner.call(req),
        }
    }
}

/// The token from `Bearer <token>` (scheme case-insensitive).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum CallerFuture<F> {
        Allowed { #[pin] call: F },
        // Boxed: rare, and inline it would add its size to every request's future.
        Refused { reply: Option<Box<Reply>> },
    }
}

impl<F> Future for CallerFuture<F>
where
    F: Future<Output = Result<Reply, Infallible>>,
{
    type Output = Result<Reply, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Allowed { call } => call.poll(cx),
            Projected::Refused { reply } => {
                Poll::Ready(Ok(*reply.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccountSettings, Settings};
    use crate::key::ApiKey;
    use axum::body::Body;
    use http::Response;
    use secrecy::SecretString;
    use tower::ServiceExt;

    /// Answers 200 with the account it was given and the headers that reached it.
    fn inner() -> impl Service<Request<()>, Response = Reply, Error = Infallible> + Clone {
        tower::service_fn(|req: Request<()>| async move {
            let account = &req.extensions().get::<Call>().unwrap().account;
            let seen = format!(
                "{} auth={} header={}",
                account.name,
                req.headers().contains_key(header::AUTHORIZATION),
                req.headers().contains_key(ACCOUNT_HEADER)
            );
            Ok::<_, Infallible>(Reply::new(
                Response::new(Body::from(seen)),
                Served::default(),
            ))
        })
    }

    fn accounts(tokens: &[&str], acme_tokens: &[&str]) -> Arc<Accounts> {
        let mut s = Settings::default();
        s.upstream.api_key = Some(ApiKey::new("default-key"));
        s.server.access_tokens = tokens.iter().map(|t| SecretString::from(*t)).collect();
        s.accounts.push(AccountSettings {
            name: "acme".into(),
            key_env: "ACME".into(),
            windows: None,
            tokens: acme_tokens.iter().map(|t| SecretString::from(*t)).collect(),
            key: Some(ApiKey::new("acme-key")),
        });
        Arc::new(Accounts::new(&s).unwrap())
    }

    async fn call(
        accounts: &Arc<Accounts>,
        auth: Option<&str>,
        named: Option<&str>,
    ) -> (u16, String) {
        let mut req = Request::builder().uri("/api/v1/campaigns");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(n) = named {
            req = req.header(ACCOUNT_HEADER, n);
        }
        let clients = Clients::new(&Default::default());
        let reply = CallerLayer::new(accounts, &clients)
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
    async fn without_tokens_the_header_or_default_chooses() {
        let a = accounts(&[], &[]);
        assert_eq!(
            call(&a, None, None).await,
            (200, "default auth=false header=false".into())
        );
        assert_eq!(
            call(&a, Some("Bearer x"), Some("acme")).await,
            (200, "acme auth=true header=false".into())
        );
        let (status, body) = call(&a, None, Some("nope")).await;
        assert_eq!(status, 400);
        assert!(body.contains(r#""account":"nope""#), "{body}");
    }

    #[tokio::test]
    async fn with_tokens_a_right_one_is_needed_and_chooses_its_account() {
        let a = accounts(&["global"], &["acme-token"]);
        assert_eq!(
            call(&a, Some("Bearer acme-token"), None).await,
            (200, "acme auth=false header=false".into())
        );
        assert_eq!(call(&a, Some("Bearer global"), None).await.0, 200);
        assert_eq!(
            call(&a, Some("Bearer global"), Some("acme")).await,
            (200, "acme auth=false header=false".into())
        );
        assert_eq!(
            call(&a, Some("Bearer acme-token"), Some("acme")).await.0,
            200
        );
        let (status, body) = call(&a, Some("Bearer acme-token"), Some("default")).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("FORBIDDEN"));
        for wrong in [None, Some("Bearer nope"), Some("Basic acme-token")] {
            assert_eq!(call(&a, wrong, None).await.0, 401, "{wrong:?}");
        }
        // Tokens of an account alone also make tokens required.
        let only_acme = accounts(&[], &["acme-token"]);
        assert_eq!(call(&only_acme, None, None).await.0, 401);
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
