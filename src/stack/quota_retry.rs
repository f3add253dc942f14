//! Quota and retry: one layer and one loop, because the quota wait, the backoff, an
//! upstream pause and every attempt share the request's one deadline (`limit.max_wait`,
//! cut short by the caller's `X-Request-Timeout`). Each attempt takes a quota slot,
//! goes out through the upstream client within its time, and is tried again while the
//! answer is worth retrying, the retry budget allows and the deadline can be met. A 429
//! from SmartLead pauses the whole limiter and its retry takes a fresh slot.
//!
//! The loop is one async function, as linkerd keeps its retry loop in one function. An
//! async function's future has no name on stable Rust, so [`QuotaRetryFuture`] boxes it,
//! once per request; every other layer's future is a named, unboxed type.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header, request::Parts};
use tokio::time::Instant;
use tower::retry::budget::Budget;
use tower::{Layer, Service, ServiceExt};

use super::{Failure, Reply, Shared};
use crate::accounts::{Account, Call};
use crate::body::{IdleTimeout, READ_CAP, decode_body, read_capped};
use crate::client::Who;
use crate::config::{LogSettings, RetrySettings};
use crate::error::{Failed, ProxyError, RateLimited};
use crate::key::Secrets;
use crate::limiter::{CapCheck, Limited, Refusal};
use crate::retry::{self, Safety};
use crate::served::Served;
use crate::shutdown::Shutdown;
use crate::traffic::{self, Traffic};
use crate::upstream::AttemptError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A caller's own deadline for the whole request: `X-Request-Timeout: 10` (seconds, may
/// be fractional) or a duration such as `2500ms`, `1m`. Not forwarded.
pub const REQUEST_TIMEOUT_HEADER: HeaderName = HeaderName::from_static("x-request-timeout");

/// Longer deadlines are refused: nothing waits that long, and a clock plus a huge
/// duration overflows.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What the loop needs, and nothing else.
#[derive(Debug)]
struct Quota {
    retry: RetrySettings,
    max_wait: Duration,
    /// Per attempt, to the answer's head; also how long a body may stall.
    upstream_timeout: Duration,
    /// The upstream's base path, which targets start with (the rest is what
    /// `retry.idempotent_posts` patterns match).
    base_path: String,
    log: LogSettings,
    secrets: Secrets,
    shutdown: Shutdown,
    /// `limit.per_client`, and this process's buckets for when Redis cannot decide.
    per_client: Option<(crate::config::Window, Arc<crate::client::ClientCaps>)>,
}

#[derive(Clone, Debug)]
pub struct QuotaRetryLayer {
    quota: Arc<Quota>,
}

impl QuotaRetryLayer {
    pub fn new(shared: &Shared, shutdown: &Shutdown) -> Self {
        let s = &shared.settings;
        Self {
            quota: Arc::new(Quota {
                retry: s.retry.clone(),
                max_wait: s.limit.max_wait,
                upstream_timeout: s.upstream.timeout,
                base_path: s.upstream.base_url.path().to_owned(),
                log: s.log.clone(),
                secrets: shared.secrets.clone(),
                shutdown: shutdown.clone(),
                per_client: shared
                    .clients
                    .cap()
                    .map(|(w, caps)| (w.clone(), caps.clone())),
            }),
        }
    }
}

impl<S> Layer<S> for QuotaRetryLayer {
    type Service = QuotaRetry<S>;

    fn layer(&self, inner: S) -> QuotaRetry<S> {
        QuotaRetry {
            inner,
            quota: self.quota.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct QuotaRetry<S> {
    inner: S,
    quota: Arc<Quota>,
}

impl<S, B> Service<Request<Bytes>> for QuotaRetry<S>
where
    S: Service<Request<Bytes>, Response = Response<B>, Error = AttemptError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Reply;
    type Error = Failure;
    type Future = QuotaRetryFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        // Readiness is the quota's business, inside the loop, where the deadline is known.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> QuotaRetryFuture {
        let exchange: Pin<Box<dyn Future<Output = _> + Send>> =
            match Attempts::start(self.inner.clone(), self.quota.clone(), req) {
                Ok(attempts) => Box::pin(exchange(attempts)),
                Err(error) => Box::pin(std::future::ready(Err(Failure::early(error)))),
            };
        QuotaRetryFuture { exchange }
    }
}

/// One request's way through the quota and the upstream.
pub struct QuotaRetryFuture {
    exchange: Pin<Box<dyn Future<Output = Result<Reply, Failure>> + Send>>,
}

impl Future for QuotaRetryFuture {
    type Output = Result<Reply, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.exchange.as_mut().poll(cx)
    }
}

/// The loop, ended early if the shutdown grace runs out. Its future holds the loop's
/// state and little else: the request's options were read before it was made (an async
/// function keeps its arguments for its whole life, so it takes only what it keeps).
/// Not an `async fn`: one keeps its arguments twice (as they came, and as the body's
/// bindings); an `async move` block uses what it captured in place.
#[allow(clippy::manual_async_fn)]
fn exchange<S, B>(mut attempts: Attempts<S>) -> impl Future<Output = Result<Reply, Failure>>
where
    S: Service<Request<Bytes>, Response = Response<B>, Error = AttemptError>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    async move {
        // Here, not when the call is made: a read's call may be made and dropped unpolled
        // (another instance of the fleet answered it), and then nothing was sent.
        attempts.account.retry_budget.deposit();
        let quota = attempts.quota.clone();
        let outcome = {
            let run = std::pin::pin!(attempts.run());
            let aborted = std::pin::pin!(quota.shutdown.aborted());
            // The loop first, then the abort signal: no random draw of which goes first.
            match futures_util::future::select(run, aborted).await {
                Either::Left((outcome, _)) => outcome,
                Either::Right(((), _)) => Err(ProxyError::ShuttingDown),
            }
        };
        let served = attempts.served;
        match outcome {
            Ok(response) => Ok(Reply::new(response, served)),
            Err(error) => Err(Failure::new(error, served)),
        }
    }
}

/// When the request arrived, if that was before it came here: a coalesced follower that
/// gave up waiting for its leader keeps the deadlines it arrived with.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// A caller's `X-Request-Timeout`, if it sent one.
pub fn request_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ProxyError> {
    let Some(v) = crate::headers::get(headers, &REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    let parsed = text
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .or_else(|| humantime::parse_duration(text).ok())
        .filter(|d| !d.is_zero() && *d <= MAX_REQUEST_TIMEOUT);
    parsed.map(Some).ok_or(ProxyError::BadHeader {
        name: REQUEST_TIMEOUT_HEADER,
        expected: "a positive number of seconds or a duration like 2500ms, at most a day",
    })
}

/// The loop's state: the request, its deadlines and what happened so far.
struct Attempts<S> {
    quota: Arc<Quota>,
    /// Its quota, retry budget and how long its pauses may be.
    account: Arc<Account>,
    /// Whose turn in the account's line each attempt waits for.
    who: Who,
    inner: S,
    parts: Parts,
    body: Bytes,
    safety: Safety,
    /// The last moment an attempt may start (quota waits and backoff included).
    start_by: Instant,
    /// When the caller stops listening (`X-Request-Timeout`), if it said.
    give_up_at: Option<Instant>,
    served: Served,
    /// Set when this request's attempts go in the traffic log.
    traffic: Option<Arc<Traffic>>,
}

impl<S, B> Attempts<S>
where
    S: Service<Request<Bytes>, Response = Response<B>, Error = AttemptError>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// The request's options (its account, its own deadline, whether it is logged),
    /// read before anything waits.
    fn start(inner: S, quota: Arc<Quota>, req: Request<Bytes>) -> Result<Self, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // Taken whole: nothing below reads them, and a map left empty would keep its
        // allocation while the request waits.
        let mut extensions = std::mem::take(&mut parts.extensions);
        // The caller layer always chooses one: a request without is a bug.
        let Call { account, who, .. } = extensions.remove::<Call>().ok_or(ProxyError::Internal)?;
        let timeout = request_timeout(&parts.headers)?;
        let logged = traffic::wanted(&quota.log, &parts.headers);
        crate::headers::remove_all(
            &mut parts.headers,
            &[REQUEST_TIMEOUT_HEADER, traffic::DEBUG_HEADER],
        );
        let now = extensions
            .remove::<Arrived>()
            .map_or_else(Instant::now, |a| a.0);
        let give_up_at = timeout.map(|t| now + t);
        let start_by = (now + quota.max_wait).min(give_up_at.unwrap_or(now + quota.max_wait));
        let api_path = parts
            .uri
            .path()
            .strip_prefix(&quota.base_path)
            .unwrap_or("");
        let safety = Safety::of(&parts.method, api_path, &parts.headers, &quota.retry);
        let traffic = logged.then(|| {
            Arc::new(Traffic::new(
                super::request_id::of(&parts.headers),
                &parts.method,
                &parts.uri,
                &parts.headers,
                &body,
                quota.log.body_bytes,
                &quota.secrets,
            ))
        });
        Ok(Self {
            served: Served {
                upstream: true,
                account: Some(account.name.clone()),
                client: Some(who.client.clone()),
                ..Served::default()
            },
            quota,
            account,
            who,
            inner,
            parts,
            body,
            safety,
            start_by,
            give_up_at,
            traffic,
        })
    }

    async fn run(&mut self) -> Result<Response<Body>, ProxyError> {
        let account = self.account.clone();
        if let Some((window, caps)) = &self.quota.per_client
            && account.limiter.is_shared()
        {
            // Boxed: only a fleet with `limit.per_client` makes this round trip.
            Box::pin(fleet_cap(&account, &self.who, window, caps)).await?;
        }
        loop {
            match account.limiter.acquire(self.start_by, &self.who).await {
                Ok(waited) => self.served.waited += waited,
                Err(refusal) => return Err(self.refused(refusal)),
            }
            self.served.attempts += 1;
            // Made at slot time: while it waits for a slot, a request holds only the
            // small state above, not the attempt's (its upstream call, its timers). Boxed
            // in a statement of its own, so the unboxed future's room ends with it instead
            // of staying in this future's state across the await.
            let attempt = Box::pin(self.attempt());
            if let Some(done) = attempt.await {
                return done;
            }
        }
    }

    /// One attempt and what follows it: the answer, or `None` once it is time to try
    /// again (after a pause or a backoff).
    async fn attempt(&mut self) -> Option<Result<Response<Body>, ProxyError>> {
        let timeout = self.attempt_timeout();
        let began = Instant::now();
        let sent = self.send(timeout).await;
        let status = sent.as_ref().ok().map(Response::status);
        let outcome = match (&status, &sent) {
            (Some(status), _) => status.as_str(),
            (None, Err(e)) => e.kind(),
            (None, Ok(_)) => "",
        };
        let answered = sent.as_ref().ok().map(|r| (r.status(), r.headers()));
        self.note_attempt(answered, outcome, began).await;
        let miss = match sent {
            Ok(resp) if is_pass_through(resp.status()) => {
                self.served.upstream_time += began.elapsed();
                return Some(Ok(self.success(resp, began.elapsed())));
            }
            Ok(resp) => self.upstream_failure(resp, timeout, began).await,
            Err(err) => self.attempt_failure(err, began),
        };
        self.served.upstream_time += began.elapsed();
        self.retry_or_answer(miss, outcome).await
    }

    /// What every attempt tells: SmartLead's rate-limit headers to the limiter, a refused
    /// client key to its account, the outcome to the log and the metrics.
    async fn note_attempt(
        &mut self,
        answered: Option<(StatusCode, &HeaderMap)>,
        outcome: &str,
        began: Instant,
    ) {
        if let Some((status, headers)) = answered {
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                // A client key's slot is given back (limit.max_client_keys).
                self.account.key_refused();
            }
            self.account.limiter.observe(headers).await;
        }
        tracing::debug!(
            attempt = self.served.attempts,
            outcome,
            upstream_ms = began.elapsed().as_secs_f64() * 1000.0,
            "upstream attempt"
        );
        crate::metrics::upstream_attempt(outcome);
    }

    /// SmartLead answered with an error: read whole (within the attempt's time), logged,
    /// and judged worth another attempt or not.
    async fn upstream_failure(
        &mut self,
        resp: Response<B>,
        timeout: Duration,
        began: Instant,
    ) -> Miss {
        let failed = read_failed(resp, timeout).await;
        if let Some(t) = &self.traffic {
            let (status, headers, body) = (failed.status, &failed.headers, &failed.body);
            t.answered(self.served.attempts, status, headers, body, began.elapsed());
        }
        self.served.last_status = Some(failed.status);
        Miss {
            asked: retry::upstream_retry_after(&failed.headers, &failed.body, SystemTime::now()),
            retryable: retry::retry_status(failed.status, self.safety, &self.quota.retry),
            last: ProxyError::Upstream(Box::new(failed)),
        }
    }

    /// No answer from SmartLead (connect, timeout, a broken response).
    fn attempt_failure(&self, err: AttemptError, began: Instant) -> Miss {
        if let Some(t) = &self.traffic {
            t.failed(self.served.attempts, err.kind(), began.elapsed());
        }
        Miss {
            retryable: retry::retry_error(&err, self.safety),
            asked: None,
            last: err.into(),
        }
    }

    /// After a failed attempt: the last error as the answer, or `None` once the pause
    /// (an upstream 429: everyone pauses) or the backoff is over.
    async fn retry_or_answer(
        &mut self,
        miss: Miss,
        outcome: &str,
    ) -> Option<Result<Response<Body>, ProxyError>> {
        let Miss {
            retryable,
            asked,
            last,
        } = miss;
        let limiter = &self.account.limiter;
        let limited =
            matches!(&last, ProxyError::Upstream(f) if f.status == StatusCode::TOO_MANY_REQUESTS);
        if limited {
            // Every window was kept, so SmartLead's own limit is lower.
            limiter.refused_anyway().await;
        }
        if !retryable || self.served.attempts > self.quota.retry.max_retries {
            return Some(Err(self.last(last)));
        }
        if !limited && !self.account.retry_budget.withdraw() {
            self.served.budget_exhausted = true;
            tracing::warn!(
                attempt = self.served.attempts,
                "retry budget exhausted; answering with the last error"
            );
            return Some(Err(self.last(last)));
        }
        tracing::info!(attempt = self.served.attempts, outcome, "retrying");
        crate::metrics::retry(outcome);
        if limited {
            // The quota is shared: everyone pauses, and the limiter spaces the restart.
            limiter.pause(self.pause_for(asked)).await;
            return None;
        }
        match self.wait_or_give_up(asked) {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return Some(Err(self.last(last))),
        }
        None
    }

    /// One attempt within `timeout`.
    async fn send(&mut self, timeout: Duration) -> Result<Response<B>, AttemptError> {
        let mut req = Request::new(self.body.clone());
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.headers_mut() = attempt_headers(&self.parts.headers);
        let attempt = async {
            let ready = self.inner.ready().await?;
            ready.call(req).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(sent) => sent,
            Err(_) => Err(AttemptError::Timeout(timeout)),
        }
    }

    /// A success, to stream back as it is: a body that stalls is cut (the client sees a
    /// broken response, never a truncated one passed off as complete).
    fn success(&self, resp: Response<B>, took: Duration) -> Response<Body> {
        let (mut head, body) = resp.into_parts();
        if crate::headers::contains(&head.headers, &header::RETRY_AFTER) {
            own_retry_after(&mut head.headers, self.account.limiter.longest_pause());
        }
        let body = IdleTimeout::new(body, self.quota.upstream_timeout);
        let body = match &self.traffic {
            Some(t) => {
                Body::new(t.tap(self.served.attempts, head.status, &head.headers, took, body))
            }
            None => Body::new(body),
        };
        Response::from_parts(head, body)
    }

    /// The last error, as the client will get it. An upstream 429 always says when to come
    /// back: SmartLead's `Retry-After` (or its body's `retry_after`) as whole seconds, or,
    /// when it gave none that is usable, the pause the proxy put everyone in.
    fn last(&self, mut error: ProxyError) -> ProxyError {
        if let ProxyError::Upstream(failed) = &mut error {
            let cap = self.account.limiter.longest_pause();
            own_retry_after(&mut failed.headers, cap);
            if failed.status == StatusCode::TOO_MANY_REQUESTS
                && !failed.headers.contains_key(header::RETRY_AFTER)
            {
                let asked =
                    retry::upstream_retry_after(&failed.headers, &failed.body, SystemTime::now());
                let secs = crate::limiter::retry_after_secs(self.pause_for(asked));
                failed
                    .headers
                    .insert(header::RETRY_AFTER, http::HeaderValue::from(secs));
            }
        }
        error
    }

    fn refused(&self, refusal: Refusal) -> ProxyError {
        match refusal {
            Refusal::RateLimited {
                retry_after,
                why,
                window,
            } => {
                let limiter = &self.account.limiter;
                // A full queue or a pause names the window SmartLead's headers describe.
                let window = limiter.in_force(window.unwrap_or(limiter.followed()));
                ProxyError::RateLimited(Box::new(RateLimited {
                    why,
                    retry_after,
                    window,
                    policy: limiter.windows(),
                    account: self.account.name.clone(),
                    client: (why == Limited::ClientQueueFull).then(|| self.who.client.to_string()),
                }))
            }
            Refusal::Unavailable(reason) => ProxyError::LimiterUnavailable(reason),
        }
    }

    /// `upstream.timeout`, cut short by the caller's own deadline.
    fn attempt_timeout(&self) -> Duration {
        let t = self.quota.upstream_timeout;
        match self.give_up_at {
            Some(at) => t.min(at.saturating_duration_since(Instant::now())),
            None => t,
        }
    }

    /// The backoff before the next attempt, or `None` when it would end past the deadline.
    fn wait_or_give_up(&self, asked: Option<Duration>) -> Option<Duration> {
        let attempt = self.served.attempts;
        let wait = retry::delay(attempt, asked, &self.quota.retry, rand::random());
        (Instant::now() + wait <= self.start_by).then_some(wait)
    }

    /// How long an upstream 429 pauses the whole limiter.
    fn pause_for(&self, asked: Option<Duration>) -> Duration {
        let asked = asked.unwrap_or(self.quota.retry.base_delay);
        asked.min(self.account.limiter.longest_pause())
    }
}

/// `limit.per_client` (`window`, and this process's buckets `caps` for when Redis does
/// not decide) over the fleet, while the quota is shared: one round trip before the
/// request queues.
async fn fleet_cap(
    account: &Account,
    who: &Who,
    window: &crate::config::Window,
    caps: &crate::client::ClientCaps,
) -> Result<(), ProxyError> {
    let refused = match account.limiter.client_cap(&who.client, window).await {
        CapCheck::Admitted => None,
        CapCheck::Refused(wait) => Some(wait),
        CapCheck::NotShared => caps.check(&who.client).err(),
    };
    match refused {
        Some(wait) => Err(crate::stack::caller::client_capped(
            window,
            wait,
            &account.name,
            who,
        )),
        None => Ok(()),
    }
}

/// Headers an attempt's map has room for: hyper parses the answer's head into the map
/// the request was written from, and the proxy adds its own headers to it on the way
/// back. A clone has no room at all, and grew twice on every answer. (12 is what a map
/// of 16 slots holds: one more would double it.)
const ANSWER_HEADERS: usize = 12;

/// The request's headers for one attempt, in a map with room for the answer's.
fn attempt_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(ANSWER_HEADERS.max(headers.len() + 4));
    for (name, value) in headers {
        copy.append(name.clone(), value.clone());
    }
    copy
}

/// Successes stream through untouched; 304 has no body to wrap.
fn is_pass_through(status: StatusCode) -> bool {
    status.is_success() || status.is_informational() || status == StatusCode::NOT_MODIFIED
}

/// `Retry-After` only as the proxy's own whole seconds, at most `cap`; never the
/// upstream's raw text.
fn own_retry_after(headers: &mut HeaderMap, cap: Duration) {
    if headers.contains_key(header::RETRY_AFTER) {
        match retry::client_retry_after(headers, cap) {
            Some(v) => headers.insert(header::RETRY_AFTER, v),
            None => headers.remove(header::RETRY_AFTER),
        };
    }
}

/// An error answer, read whole (up to [`READ_CAP`]) and decoded; a body that breaks off
/// or stalls yields what arrived, since the status alone is enough to answer.
async fn read_failed<B>(resp: Response<B>, timeout: Duration) -> Failed
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let (head, body) = resp.into_parts();
    let (raw, raw_cut) = read_capped(body, READ_CAP, Instant::now() + timeout).await;
    let (body, cut) = decode_body(&head.headers, raw, raw_cut, READ_CAP);
    Failed {
        status: head.status,
        headers: head.headers,
        body,
        cut,
    }
}

/// A failed attempt: whether another may follow, the wait SmartLead asked for, and the
/// error to answer with if none does.
struct Miss {
    retryable: bool,
    asked: Option<Duration>,
    last: ProxyError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use http_body_util::Full;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An upstream that answers each attempt with the next status of a script.
    #[derive(Clone)]
    struct Scripted {
        statuses: Arc<Mutex<Vec<u16>>>,
        calls: Arc<AtomicU32>,
    }

    impl Scripted {
        fn new(statuses: &[u16]) -> Self {
            Self {
                statuses: Arc::new(Mutex::new(statuses.iter().rev().copied().collect())),
                calls: Arc::new(AtomicU32::new(0)),
            }
        }
    }

    impl Service<Request<Bytes>> for Scripted {
        type Response = Response<Full<Bytes>>;
        type Error = AttemptError;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, AttemptError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Bytes>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            assert!(
                req.headers().get(REQUEST_TIMEOUT_HEADER).is_none(),
                "never forwarded"
            );
            let status = self.statuses.lock().unwrap().pop().unwrap_or(200);
            if status == 0 {
                return std::future::ready(Err(AttemptError::Connect("refused".into())));
            }
            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                http::HeaderValue::from_static("1000000"),
            );
            std::future::ready(Ok(resp))
        }
    }

    fn shared(tweak: impl FnOnce(&mut Settings)) -> Shared {
        let mut s = Settings::default();
        s.upstream.api_key = Some(crate::key::ApiKey::new("k"));
        s.retry.base_delay = Duration::from_millis(1);
        s.retry.max_delay = Duration::from_millis(5);
        s.limit.margin = Duration::ZERO;
        tweak(&mut s);
        Shared::new(s).unwrap()
    }

    async fn call(
        shared: &Shared,
        upstream: &Scripted,
        req: Request<Bytes>,
    ) -> Result<Reply, Failure> {
        QuotaRetryLayer::new(shared, &Shutdown::default())
            .layer(upstream.clone())
            .oneshot(for_default(shared, req))
            .await
    }

    /// The request, for the `default` account (the caller layer's choice).
    fn for_default(shared: &Shared, mut req: Request<Bytes>) -> Request<Bytes> {
        let account = Call::anonymous(shared.accounts.choose(None, None, None).unwrap().account);
        req.extensions_mut().insert(account);
        req
    }

    fn get() -> Request<Bytes> {
        Request::builder()
            .uri("https://server.smartlead.ai/api/v1/campaigns")
            .header(REQUEST_TIMEOUT_HEADER, "20")
            .body(Bytes::new())
            .unwrap()
    }

    #[tokio::test]
    async fn retries_a_transient_failure_then_streams_the_success() {
        let shared = shared(|_| {});
        let upstream = Scripted::new(&[503, 0, 200]);
        let reply = call(&shared, &upstream, get()).await.unwrap();
        assert_eq!(reply.response.status(), 200);
        assert_eq!(reply.served.attempts, 3);
        assert_eq!(
            reply.served.last_status,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(
            reply.response.headers()[header::RETRY_AFTER],
            "3600",
            "the proxy's own value, capped at the longest window (1h)"
        );
    }

    #[tokio::test]
    async fn gives_up_after_max_retries_with_the_last_upstream_error() {
        let shared = shared(|s| s.retry.max_retries = 2);
        let upstream = Scripted::new(&[500, 502, 504, 200]);
        let err = call(&shared, &upstream, get()).await.unwrap_err();
        assert_eq!(err.served.attempts, 3);
        match err.error {
            ProxyError::Upstream(f) => {
                assert_eq!(f.status, 504);
                assert_eq!(f.headers[header::RETRY_AFTER], "3600");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_post_is_not_repeated_after_a_5xx_that_may_have_done_the_work() {
        let shared = shared(|_| {});
        let upstream = Scripted::new(&[500, 200]);
        let mut req = get();
        *req.method_mut() = http::Method::POST;
        let err = call(&shared, &upstream, req).await.unwrap_err();
        assert_eq!(err.served.attempts, 1);
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_slot_before_the_deadline_is_an_honest_429_at_once() {
        let shared = shared(|s| {
            s.limit.one_window(1, Duration::from_secs(60));
            s.limit.max_wait = Duration::from_secs(5);
        });
        let upstream = Scripted::new(&[]);
        call(&shared, &upstream, get()).await.unwrap();
        let asked = Instant::now();
        let err = call(&shared, &upstream, get()).await.unwrap_err();
        assert_eq!(asked.elapsed(), Duration::ZERO, "no waiting to find out");
        match err.error {
            ProxyError::RateLimited(r) => {
                assert_eq!(r.retry_after, Duration::from_secs(60));
                assert_eq!(
                    (r.window.limit, r.window.period),
                    (1, Duration::from_secs(60))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_bad_request_timeout_is_refused_before_any_quota_is_spent() {
        let shared = shared(|_| {});
        let upstream = Scripted::new(&[]);
        let mut req = get();
        req.headers_mut().insert(
            REQUEST_TIMEOUT_HEADER,
            http::HeaderValue::from_static("18446744073709551615s"),
        );
        let err = call(&shared, &upstream, req).await.unwrap_err();
        assert!(matches!(err.error, ProxyError::BadHeader { .. }));
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn waiting_requests_are_answered_503_when_the_grace_runs_out() {
        let shared = shared(|s| {
            s.limit.one_window(1, Duration::from_secs(60));
            s.limit.max_wait = Duration::from_secs(120);
        });
        let upstream = Scripted::new(&[]);
        let shutdown = Shutdown::default();
        let svc = QuotaRetryLayer::new(&shared, &shutdown).layer(upstream.clone());
        svc.clone()
            .oneshot(for_default(&shared, get()))
            .await
            .unwrap();
        let mut req = for_default(&shared, get());
        req.headers_mut().remove(REQUEST_TIMEOUT_HEADER);
        let waiting = tokio::spawn(svc.oneshot(req));
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.abort_remaining();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(matches!(err.error, ProxyError::ShuttingDown));
    }
}
