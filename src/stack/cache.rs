//! The cache's part in the request path ([`crate::cache`]; docs/cache.md).
//!
//! - A GET (without a body) of a stored route is answered from the cache while its entry
//!   is fresh: no quota, no queue, no retry.
//! - Otherwise identical GETs in flight share one upstream call ([`flight`]): the leader's
//!   call runs in the leader's future and, when the leader's caller hangs up while anyone
//!   follows, goes on in a task of its own to finish for them; with nobody following, a
//!   hang-up cancels it as any request's.
//! - A 2xx write makes the account's answers it touches stale before it is answered.
//! - While SmartLead fails, an expired entry is served up to `cache.stale_if_error`.
//!
//! Every read answer says how it was served in `Cache-Status` (RFC 9211) and `Age`.
//!
//! A read's path is one boxed future: it awaits the store, the line and the inner stack
//! in turn (joining the line and making the call at once when there is nothing stored to
//! look up). Requests the cache has nothing to do with pass through unboxed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::quota_retry::{Arrived, request_timeout};
use super::{Failure, Reply};
use crate::accounts::Call;
use crate::cache::entry::now_ms;
use crate::cache::fleet::{self, Look};
use crate::cache::flight::{self, Lead, Outcome, Role};
use crate::cache::key::{Asked, asked, is_write, storable};
use crate::cache::routes::Scope;
use crate::cache::shared_error::{SharedError, is_failing};
use crate::cache::{Cache, CacheKey, ReadResult, Stored};
use crate::error::ProxyError;
use crate::served::Served;
use crate::upstream::API_PREFIX;

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The cache's name in `Cache-Status`.
const NAME: &str = "smartlead-proxy";

type Boxed = Pin<Box<dyn Future<Output = Result<Reply, Failure>> + Send>>;

#[derive(Clone, Debug)]
pub struct CacheLayer {
    cache: Arc<Cache>,
    max_wait: Duration,
}

impl CacheLayer {
    pub fn new(cache: &Arc<Cache>, max_wait: Duration) -> Self {
        Self {
            cache: cache.clone(),
            max_wait,
        }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            cache: self.cache.clone(),
            max_wait: self.max_wait,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheService<S> {
    inner: S,
    cache: Arc<Cache>,
    max_wait: Duration,
}

/// What the cache does with a request.
enum Plan {
    Through,
    Read(Read),
    Write { account: Arc<str>, path: String },
}

/// A read the cache may answer, share or store.
struct Read {
    cache: Arc<Cache>,
    call: Call,
    key: CacheKey,
    scopes: Vec<Scope>,
    /// `None`: the route is not stored.
    ttl: Option<Duration>,
    asked: Asked,
    arrived: Instant,
    deadline: Instant,
}

impl<S> CacheService<S> {
    fn plan(&self, req: &Request<Bytes>) -> Plan {
        if !self.cache.in_use() {
            return Plan::Through;
        }
        let Some(call) = req.extensions().get::<Call>() else {
            return Plan::Through;
        };
        let path = req
            .uri()
            .path()
            .strip_prefix(API_PREFIX)
            .unwrap_or(req.uri().path());
        if is_write(req.method()) {
            return Plan::Write {
                account: call.account.id.clone(),
                path: path.to_owned(),
            };
        }
        if req.method() != Method::GET || !req.body().is_empty() {
            return Plan::Through;
        }
        let arrived = Instant::now();
        let wait = match request_timeout(req.headers()) {
            Ok(Some(t)) => t.min(self.max_wait),
            // A bad header is the quota's to refuse.
            _ => self.max_wait,
        };
        let ttl = self.cache.routes.ttl(path);
        Plan::Read(Read {
            cache: self.cache.clone(),
            key: CacheKey::new(&call.account.id, path, req.uri().query()),
            // Only a stored answer depends on them.
            scopes: ttl.map(|_| Scope::read(path)).unwrap_or_default(),
            ttl,
            asked: asked(req.headers()),
            call: call.clone(),
            arrived,
            deadline: arrived + wait,
        })
    }
}

impl<S> Service<Request<Bytes>> for CacheService<S>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = Reply;
    type Error = Failure;
    type Future = CacheFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        match self.plan(&req) {
            Plan::Through => CacheFuture::Through {
                call: self.inner.call(req),
            },
            Plan::Write { account, path } => {
                let cache = self.cache.clone();
                let call = self.inner.call(req);
                CacheFuture::Cached {
                    run: Box::pin(write(cache, account, path, call)),
                }
            }
            Plan::Read(read) => {
                // Stored and shared answers are identity-encoded, whatever one client
                // accepts.
                req.headers_mut().remove(header::ACCEPT_ENCODING);
                let inner = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, inner);
                CacheFuture::Cached {
                    run: read.start(inner, req),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum CacheFuture<F> {
        Through {
            #[pin]
            call: F,
        },
        Cached { run: Boxed },
    }
}

impl<F> Future for CacheFuture<F>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    type Output = Result<Reply, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Through { call } => call.poll(cx),
            Projected::Cached { run } => run.as_mut().poll(cx),
        }
    }
}

/// A write's 2xx answer leaves once what it made stale is.
async fn write<F>(
    cache: Arc<Cache>,
    account: Arc<str>,
    path: String,
    call: F,
) -> Result<Reply, Failure>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    let reply = call.await?;
    if reply.response.status().is_success() {
        cache.written(&account, &path).await;
    }
    Ok(reply)
}

impl Read {
    /// The read's future. With no stored answer to look up (the route is not stored, the
    /// store is this process's), the line is joined here and a leader's or a lone
    /// request's call is made at once: its future then holds that call, not the service
    /// and the request it was made from, while the request waits for quota.
    fn start<S>(self, mut inner: S, req: Request<Bytes>) -> Boxed
    where
        S: Service<Request<Bytes>, Response = Reply, Error = Failure> + Send + 'static,
        S::Future: Send + Unpin + 'static,
    {
        if self.ttl.is_some() || self.cache.store().is_shared() {
            return Box::pin(self.run(inner, req, None));
        }
        match self.role() {
            Role::Leader(lead) => {
                let flight = self.fly(lead, self.call(&mut inner, req), None, Vec::new());
                Box::pin(async move {
                    let result = flight.await;
                    self.led(result, None)
                })
            }
            Role::Alone => {
                let call = self.call(&mut inner, req);
                Box::pin(self.alone(call, None))
            }
            follower => Box::pin(self.run(inner, req, Some(follower))),
        }
    }

    /// The inner stack's call for `req`, which keeps the deadlines it arrived with.
    fn call<S>(&self, inner: &mut S, mut req: Request<Bytes>) -> S::Future
    where
        S: Service<Request<Bytes>>,
    {
        req.extensions_mut().insert(Arrived(self.arrived));
        inner.call(req)
    }

    /// Its place in the coalescing line.
    fn role(&self) -> Role {
        if self.cache.coalesce {
            self.cache.flights.join(&self.key)
        } else {
            Role::Alone
        }
    }

    /// The whole way: the stored answer, the line (from `first`, when already joined),
    /// the call.
    // An `async` block, not an `async fn`: see the decisions on what a waiting request holds.
    #[allow(clippy::manual_async_fn)]
    fn run<S>(
        self,
        mut inner: S,
        req: Request<Bytes>,
        mut first: Option<Role>,
    ) -> impl Future<Output = Result<Reply, Failure>>
    where
        S: Service<Request<Bytes>, Response = Reply, Error = Failure> + Send + 'static,
        S::Future: Send + Unpin + 'static,
    {
        async move {
            let found = match self.ttl {
                Some(_) => self.cache.lookup(&self.key, &self.scopes).await,
                None => None,
            };
            let now = now_ms();
            if let Some(hit) = found.as_ref().filter(|f| f.is_fresh(now))
                && self.asked == Asked::Stored
            {
                return Ok(self.answer(hit, ReadResult::Hit, "hit"));
            }
            // Kept for when SmartLead fails.
            let stale = found.filter(|f| !f.is_fresh(now));
            // Followers wait their turn here; the first decision that is not to follow ends
            // the loop, with the request still to send.
            let leader = loop {
                match first.take().unwrap_or_else(|| self.role()) {
                    Role::Leader(lead) => break Some(lead),
                    Role::Alone => break None,
                    Role::Follower(rx) => match Box::pin(flight::follow(rx, self.deadline)).await {
                        Some(Outcome::Answer(stored)) => {
                            let fwd = self.fwd("collapsed");
                            return Ok(self.answer(&stored, ReadResult::Collapsed, &fwd));
                        }
                        Some(Outcome::Failed(shared)) => {
                            let failure = Failure::new(shared.error(), self.served());
                            return self.failed(failure, stale);
                        }
                        // Passed its own deadline, or the answer was too big to share: it
                        // goes through the quota itself, with the deadlines it came with.
                        None | Some(Outcome::TooBig) => break None,
                        // The leader went away: the line decides who leads now.
                        Some(Outcome::Gone | Outcome::Pending) => continue,
                    },
                }
            };
            let call = self.call(&mut inner, req);
            match leader {
                Some(lead) => Box::pin(self.lead(lead, call, stale)).await,
                None => Box::pin(self.alone(call, stale)).await,
            }
        }
    }

    /// The `fwd` part of a miss's `Cache-Status`, with `extra` after it.
    fn fwd(&self, extra: &str) -> String {
        let fwd = self.forwarded();
        if extra.is_empty() {
            fwd.to_owned()
        } else {
            format!("{fwd}; {extra}")
        }
    }

    /// Why the request went to SmartLead, as `Cache-Status` says it.
    fn forwarded(&self) -> &'static str {
        self.forwarded_as().0
    }

    /// The `fwd` parameter, and the whole `Cache-Status` of a miss with nothing after it.
    fn forwarded_as(&self) -> (&'static str, &'static str) {
        match (self.ttl, self.asked) {
            (None, _) => FORWARDED[0],
            (Some(_), Asked::Stored) => FORWARDED[1],
            (Some(_), _) => FORWARDED[2],
        }
    }

    /// Marks an answer that went to SmartLead: the plain forms (every answer on a route
    /// not cached is one) are static values, not formatted per request.
    fn mark_forwarded(&self, headers: &mut http::HeaderMap, extra: &str) {
        if !extra.is_empty() {
            return mark(headers, &self.fwd(extra), 0);
        }
        headers.insert(
            CACHE_STATUS,
            HeaderValue::from_static(self.forwarded_as().1),
        );
        headers.insert(header::AGE, HeaderValue::from_static("0"));
    }

    fn miss_result(&self) -> ReadResult {
        if self.ttl.is_some() {
            ReadResult::Miss
        } else {
            ReadResult::Bypass
        }
    }

    fn served(&self) -> Served {
        Served {
            account: Some(self.call.account.name.clone()),
            client: Some(self.call.who.client.clone()),
            ..Served::default()
        }
    }

    fn count(&self, result: ReadResult) {
        self.call.account.cache.count(result);
    }

    /// An answer from a stored one: a hit (`status` is `hit`, its ttl is added) or a
    /// collapsed follower's.
    fn answer(&self, stored: &Stored, result: ReadResult, status: &str) -> Reply {
        self.count(result);
        let now = now_ms();
        let status = if status == "hit" {
            format!("hit; ttl={}", stored.left_ms(now).div_euclid(1000))
        } else {
            status.to_owned()
        };
        let mut response = Response::new(Body::from(stored.body.clone()));
        *response.status_mut() = stored.status;
        *response.headers_mut() = stored.headers.clone();
        mark(response.headers_mut(), &status, stored.age_ms(now) / 1000);
        let mut served = self.served();
        served.upstream = result == ReadResult::Collapsed;
        served.last_status = Some(stored.status);
        Reply::new(response, served)
    }

    /// A failure's answer, or the stale entry when SmartLead is failing.
    #[allow(clippy::result_large_err)] // the path's own error type
    fn failed(&self, mut failure: Failure, stale: Option<Arc<Stored>>) -> Result<Reply, Failure> {
        if let Some(stored) = stale.filter(|s| self.may_serve_stale(s, &failure.error)) {
            return Ok(self.answer(&stored, ReadResult::Stale, "hit"));
        }
        self.count(self.miss_result());
        self.mark_forwarded(failure.headers_mut(), "");
        Err(failure)
    }

    fn may_serve_stale(&self, stored: &Stored, error: &ProxyError) -> bool {
        let expired_for = Duration::from_millis((-stored.left_ms(now_ms())).max(0) as u64);
        self.asked != Asked::NoStore
            && expired_for <= self.cache.stale_if_error
            && !self.cache.stale_if_error.is_zero()
            && is_failing(error)
    }

    /// On its own, as if there were no line: the answer streams, and is stored when it
    /// may be and fits.
    // An `async` block, not an `async fn`: see the decisions on what a waiting request holds.
    #[allow(clippy::manual_async_fn)]
    fn alone<F>(
        self,
        mut call: F,
        stale: Option<Arc<Stored>>,
    ) -> impl Future<Output = Result<Reply, Failure>>
    where
        F: Future<Output = Result<Reply, Failure>> + Unpin,
    {
        async move {
            let gens = self.generations().await;
            // Polled where it lies: `call.await` would move it into a second place.
            let reply = match (&mut call).await {
                Ok(reply) => reply,
                Err(failure) => return self.failed(failure, stale),
            };
            let Some(ttl) = self.storing(&reply) else {
                return Ok(self.streamed(reply, ""));
            };
            // Boxed: only an answer that may be stored is read whole.
            Ok(Box::pin(self.store(reply, ttl, gens)).await)
        }
    }

    /// Reads `reply` whole and stores it when it fits.
    async fn store(&self, reply: Reply, ttl: Duration, gens: Vec<u64>) -> Reply {
        match read_whole(reply, self.cache.max_entry_bytes, ttl, gens).await {
            Whole::Done(stored, reply) => {
                let kept = self
                    .cache
                    .put(&self.key, &self.scopes, Arc::new(stored))
                    .await;
                self.streamed(reply, if kept { "stored" } else { "" })
            }
            Whole::Streaming(reply) => self.streamed(reply, ""),
        }
    }

    /// Leads the key's flight, after the fleet's turn when there is a fleet: the call's
    /// outcome goes to every follower (see [`Leading`] for a caller that hangs up).
    // An `async` block, not an `async fn`: see the decisions on what a waiting request holds.
    #[allow(clippy::manual_async_fn)]
    fn lead<F>(
        self,
        lead: Lead,
        call: F,
        stale: Option<Arc<Stored>>,
    ) -> impl Future<Output = Result<Reply, Failure>>
    where
        F: Future<Output = Result<Reply, Failure>> + Send + Unpin + 'static,
    {
        async move {
            // Boxed, and only with a fleet: its Redis calls would add their size to every
            // leader's future.
            let turn = if self.cache.store().is_shared() {
                Box::pin(self.fleet_turn()).await
            } else {
                Turn::Lead(None)
            };
            let lock = match turn {
                Turn::Lead(lock) => lock,
                Turn::Shared(stored) => {
                    lead.finish(Outcome::Answer(stored.clone()));
                    let fwd = self.fwd("collapsed");
                    return Ok(self.answer(&stored, ReadResult::Collapsed, &fwd));
                }
                Turn::TooBig => {
                    lead.finish(Outcome::TooBig);
                    return Box::pin(self.alone(call, stale)).await;
                }
            };
            let gens = self.generations().await;
            let result = self.fly(lead, call, lock, gens).await;
            self.led(result, stale)
        }
    }

    /// The leader's call and its outcome for the followers.
    fn fly<F>(&self, lead: Lead, call: F, lock: Option<FleetLock>, gens: Vec<u64>) -> Leading
    where
        F: Future<Output = Result<Reply, Failure>> + Send + Unpin + 'static,
    {
        let flight = Flying {
            cache: self.cache.clone(),
            key: self.key.clone(),
            scopes: self.scopes.clone(),
            ttl: self.ttl.filter(|_| self.asked != Asked::NoStore),
            gens,
            lock,
        };
        let watching = lead.watcher();
        Leading {
            run: Some(Box::pin(flight.run(lead, call))),
            watching,
        }
    }

    /// The leader's answer, as its own caller gets it.
    #[allow(clippy::result_large_err)] // the path's own error type
    fn led(
        &self,
        result: Result<Led, Failure>,
        stale: Option<Arc<Stored>>,
    ) -> Result<Reply, Failure> {
        match result {
            Ok(Led::Shared(reply, kept)) => {
                Ok(self.streamed(reply, if kept { "stored" } else { "" }))
            }
            Ok(Led::Streamed(reply)) => Ok(self.streamed(reply, "")),
            Err(failure) => self.failed(failure, stale),
        }
    }

    /// The fleet's line for this key: its lock (`None`: no fleet, Redis does not answer,
    /// or this request waited for another instance's call until its deadline and goes
    /// through the quota itself), or the outcome of another instance's call.
    async fn fleet_turn(&self) -> Turn {
        let Some(fleet) = self.cache.store().fleet().await else {
            return Turn::Lead(None);
        };
        let token = format!("{}:{:016x}", fleet.instance(), rand::random::<u64>());
        let mut news = fleet.news();
        loop {
            match fleet.lock(&self.key, &token).await {
                Ok(true) => {
                    return Turn::Lead(Some(FleetLock::new(&self.cache, &self.key, token)));
                }
                Ok(false) => {}
                Err(_) => return Turn::Lead(None),
            }
            loop {
                // Woken by the other instance's message; a jittered look in case it is
                // lost.
                let pause = Duration::from_millis(40 + rand::random::<u64>() % 80);
                if Instant::now() + pause > self.deadline {
                    return Turn::Lead(None);
                }
                tokio::select! {
                    _ = news.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                match fleet.look(&self.key).await {
                    Ok(Look::Running) => continue,
                    Ok(Look::Answer(stored)) => return Turn::Shared(stored),
                    Ok(Look::TooBig) => return Turn::TooBig,
                    Ok(Look::Free) => break,
                    Err(_) => return Turn::Lead(None),
                }
            }
        }
    }

    /// The generations the answer will depend on, read before it is asked for; none
    /// for a route not stored (its answer is only shared, never kept).
    async fn generations(&self) -> Vec<u64> {
        match self.ttl {
            Some(_) => self.cache.generations(&self.key, &self.scopes).await,
            None => Vec::new(),
        }
    }

    /// An answer that came from SmartLead for this request, marked and counted.
    fn streamed(&self, mut reply: Reply, extra: &str) -> Reply {
        self.count(self.miss_result());
        self.mark_forwarded(reply.response.headers_mut(), extra);
        reply
    }

    /// How long `reply` may be kept, if it may be.
    fn storing(&self, reply: &Reply) -> Option<Duration> {
        let ttl = self.ttl.filter(|_| self.asked != Asked::NoStore)?;
        storable(reply.response.status(), reply.response.headers()).then_some(ttl)
    }
}

/// The `fwd` parameters and the `Cache-Status` each makes alone (`NAME` written out, as a
/// static header value needs; a test checks the two agree).
const FORWARDED: [(&str, &str); 3] = [
    ("fwd=bypass", "smartlead-proxy; fwd=bypass"),
    ("fwd=uri-miss", "smartlead-proxy; fwd=uri-miss"),
    ("fwd=request", "smartlead-proxy; fwd=request"),
];

/// Sets `Cache-Status` and `Age`.
fn mark(headers: &mut http::HeaderMap, status: &str, age_s: u64) {
    if let Ok(v) = HeaderValue::from_str(&format!("{NAME}; {status}")) {
        headers.insert(CACHE_STATUS, v);
    }
    headers.insert(header::AGE, HeaderValue::from(age_s));
}

enum Whole {
    /// Read whole: the answer as it would be stored (asked for now, kept `ttl` with the
    /// generations `gens`), and the reply again with the same body.
    Done(Stored, Reply),
    /// Over the limit (or broken off): the reply, streaming what was read and the rest.
    Streaming(Reply),
}

/// Reads `reply`'s body up to `limit` bytes. Callers box it: only answers that are
/// stored or shared are read whole, and its future would add its size to every read's.
async fn read_whole(reply: Reply, limit: usize, ttl: Duration, gens: Vec<u64>) -> Whole {
    let Reply { response, served } = reply;
    let (parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                read.extend_from_slice(&data);
                if read.len() > limit {
                    let body = Body::new(Prefixed {
                        prefix: Some(read.freeze()),
                        rest: body,
                    });
                    let response = Response::from_parts(parts, body);
                    return Whole::Streaming(Reply::new(response, served));
                }
            }
            Some(Err(e)) => {
                // What was read, then the same error: the client sees the cut it would
                // have seen.
                let failing = http_body_util::StreamBody::new(futures_util::stream::iter([
                    Ok(http_body::Frame::data(read.freeze())),
                    Err(e),
                ]));
                let response = Response::from_parts(parts, Body::new(failing));
                return Whole::Streaming(Reply::new(response, served));
            }
            None => break,
        }
    }
    let body = read.freeze();
    let stored = Stored {
        status: parts.status,
        headers: parts.headers.clone(),
        body: body.clone(),
        at_ms: now_ms(),
        ttl,
        gens,
    };
    let response = Response::from_parts(parts, Body::from(body));
    Whole::Done(stored, Reply::new(response, served))
}

pin_project_lite::pin_project! {
    /// What was read of a body, then the rest of it.
    struct Prefixed {
        prefix: Option<Bytes>,
        #[pin]
        rest: Body,
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        this.rest.poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.size_hint();
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = http_body::SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(rest.lower() + prefix);
        hint
    }
}

/// Where this request stands in the fleet's line for its key.
enum Turn {
    Lead(Option<FleetLock>),
    Shared(Arc<Stored>),
    TooBig,
}

/// The fleet's lock on a key, held for one call: renewed while it runs, released with
/// its outcome. Dropped unreleased (the call was cancelled), it is released with none.
struct FleetLock {
    cache: Arc<Cache>,
    key: CacheKey,
    token: String,
    released: bool,
}

impl FleetLock {
    fn new(cache: &Arc<Cache>, key: &CacheKey, token: String) -> Self {
        Self {
            cache: cache.clone(),
            key: key.clone(),
            token,
            released: false,
        }
    }

    /// `call`, with the lock renewed three times a lease while it runs.
    async fn renewing<F: Future>(&self, call: F) -> F::Output {
        let Some(fleet) = self.cache.store().shared() else {
            return call.await;
        };
        let mut every = tokio::time::interval(fleet.lease() / 3);
        every.tick().await;
        tokio::pin!(call);
        loop {
            tokio::select! {
                done = &mut call => return done,
                _ = every.tick() => {
                    // A failed renewal lets another instance lead: a second call, never
                    // a wrong answer.
                    let _ = fleet.lock(&self.key, &self.token).await;
                }
            }
        }
    }

    /// Lets the lock go, with the outcome for other instances. Boxed, as every Redis call
    /// a leader's task may make: laid inline, its future would add its size to every
    /// leader's.
    fn release<'a>(mut self, outcome: Option<fleet::Outcome<'a>>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.released = true;
            if let Some(fleet) = self.cache.store().shared() {
                let _ = fleet.release(&self.key, &self.token, outcome).await;
            }
        })
    }
}

impl Drop for FleetLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (cache, key, token) = (
            self.cache.clone(),
            self.key.clone(),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Some(fleet) = cache.store().shared() {
                    let _ = fleet.release(&key, &token, None).await;
                }
            });
        }
    }
}

/// What the leader's task needs to end its flight.
struct Flying {
    cache: Arc<Cache>,
    key: CacheKey,
    scopes: Vec<Scope>,
    /// `Some` when the answer may be stored (a stored route, not `no-store`).
    ttl: Option<Duration>,
    gens: Vec<u64>,
    /// The fleet's lock, when this call leads for every instance.
    lock: Option<FleetLock>,
}

/// How the leader's call went.
enum Led {
    /// Read whole and shared (and `true`: kept).
    Shared(Reply, bool),
    /// Passed on as it streams: nobody shares it.
    Streamed(Reply),
}

impl Flying {
    /// The leader's call, then its outcome for every follower. While the call waits
    /// (for quota, for SmartLead), this future holds the call and the flight only: what
    /// follows the answer is boxed, made when it comes, but for the usual ends. (Those
    /// are decided here rather than in `land` alone: written once, in a form that borrows
    /// the reply in this future, it measured about 150 B more per waiting GET.)
    // An `async` block, not an `async fn`: see the decisions on what a waiting request holds.
    #[allow(clippy::manual_async_fn)]
    fn run<F>(mut self, mut lead: Lead, mut call: F) -> impl Future<Output = Result<Led, Failure>>
    where
        F: Future<Output = Result<Reply, Failure>> + Unpin,
    {
        async move {
            let lock = self.lock.take();
            let answered = match &lock {
                // Boxed, as every step with the fleet's lock: a Redis call's future
                // would add its size to every leader's task.
                Some(lock) => Box::pin(lock.renewing(&mut call)).await,
                // Polled where it lies: `call.await` would move it into a second place.
                None => (&mut call).await,
            };
            if lock.is_none() {
                // The usual ends, unboxed: a failure, or an answer that is not stored and
                // that nobody follows.
                match answered {
                    Err(failure) => {
                        finish_failed(lead, &failure.error);
                        return Err(failure);
                    }
                    Ok(reply) if self.ttl_of(&reply).is_none() && lead.close_if_alone() => {
                        return Ok(Led::Streamed(reply));
                    }
                    answered => return Box::pin(self.land(lead, None, answered)).await,
                }
            }
            Box::pin(self.land(lead, lock, answered)).await
        }
    }

    /// How long the answer is stored, if it is.
    fn ttl_of(&self, reply: &Reply) -> Option<Duration> {
        self.ttl
            .filter(|_| storable(reply.response.status(), reply.response.headers()))
    }

    /// The call's answer: shared (read whole, and stored when it may be) or streamed to
    /// the leader alone, and the fleet's lock let go.
    async fn land(
        self,
        mut lead: Lead,
        lock: Option<FleetLock>,
        answered: Result<Reply, Failure>,
    ) -> Result<Led, Failure> {
        let reply = match answered {
            Ok(reply) => reply,
            Err(failure) => {
                lead_failed(lead, lock, &failure.error).await;
                return Err(failure);
            }
        };
        let ttl = self.ttl_of(&reply);
        // Followers on other instances may wait: with the fleet's lock the answer is
        // read to be shared.
        if ttl.is_none() && lock.is_none() && lead.close_if_alone() {
            return Ok(Led::Streamed(reply));
        }
        let limit = self.cache.max_entry_bytes;
        let whole = read_whole(reply, limit, ttl.unwrap_or_default(), self.gens).await;
        let (stored, reply) = match whole {
            Whole::Done(stored, reply) => (Arc::new(stored), reply),
            Whole::Streaming(reply) => {
                if let Some(lock) = lock {
                    lock.release(Some(fleet::Outcome::TooBig)).await;
                }
                lead.finish(Outcome::TooBig);
                return Ok(Led::Streamed(reply));
            }
        };
        let kept = match ttl {
            Some(_) => {
                self.cache
                    .put(&self.key, &self.scopes, stored.clone())
                    .await
            }
            None => false,
        };
        if let Some(lock) = lock {
            lock.release(Some(fleet::Outcome::Answer(&stored))).await;
        }
        lead.finish(Outcome::Answer(stored));
        Ok(Led::Shared(reply, kept))
    }
}

/// The leader's call failed: the followers get the error when it is final (a follower
/// takes over otherwise), and the fleet's lock is let go.
async fn lead_failed(lead: Lead, lock: Option<FleetLock>, error: &ProxyError) {
    finish_failed(lead, error);
    if let Some(lock) = lock {
        lock.release(None).await;
    }
}

/// The followers' part of a failed call: the error when it is final, else a handover.
fn finish_failed(lead: Lead, error: &ProxyError) {
    match SharedError::of(error) {
        Some(shared) => lead.finish(Outcome::Failed(Arc::new(shared))),
        None => lead.finish(Outcome::Gone),
    }
}

/// The leader's flight, run by the leader's own future. Dropped before it ends (the
/// caller hung up), it goes on in a task of its own while anyone follows, and is cancelled
/// otherwise: then nobody needs its answer, and a request that waits for quota leaves the
/// line as any other does. (A task for every flight would cost each waiting leader about
/// 2 KB and a spawn.)
struct Leading {
    run: Option<BoxFuture<'static, Result<Led, Failure>>>,
    watching: flight::Watcher,
}

impl Future for Leading {
    type Output = Result<Led, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let run = self.run.as_mut().expect("polled after completion");
        let done = std::task::ready!(run.as_mut().poll(cx));
        self.run = None;
        Poll::Ready(done)
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        if self.watching.followed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_cache_statuses_are_what_mark_would_write() {
        for (fwd, whole) in FORWARDED {
            assert_eq!(whole, format!("{NAME}; {fwd}"));
        }
    }
}
