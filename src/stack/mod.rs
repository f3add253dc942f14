//! The request path as a tower stack, composed once in [`build`]. A request meets the
//! layers in this order, each one concern in its own module (a `Layer`, a `Service` and a
//! named future):
//!
//! 1. [`request_id`]: every request gets an `x-request-id`, every answer carries it.
//! 2. [`panic_guard`]: a panic (a bug) becomes a 500 envelope with that id.
//! 3. [`access_log`]: one log line and one metrics sample per request.
//! 4. [`own_routes`]: `/healthz`, `/readyz`, `/metrics` and 404s go to the proxy's own
//!    router; CONNECT and TRACE are refused; `/api/v1/*` goes on.
//! 5. [`caller`]: `Authorization: Bearer` when tokens are configured, the account the
//!    request uses ([`crate::accounts`]), and the client it is for ([`crate::client`]:
//!    its priority, weight and `limit.per_client` cap).
//! 6. [`envelope`]: every error below becomes SmartLead's JSON envelope (via
//!    [`crate::error::answer`], the one place that answers), with `x-proxy-attempts`.
//! 7. [`buffer`]: the body is read (bounded in size, time and total memory) so retries
//!    can replay it.
//! 8. [`body_key`]: a client's `api_key` in a JSON or form body is taken out (and with
//!    `upstream.allow_client_key` may choose the account, like the query's).
//! 9. [`cache`]: GETs answered from the response cache or shared with an identical one
//!    in flight; writes make what they touch stale ([`crate::cache`]).
//! 10. [`lead_import`]: lead imports are checked before any quota is spent, and split into
//!     batches when `leads.auto_batch` says so.
//! 11. [`key_injection`]: the one allowed upstream target, with the account's key;
//!     secrets scrubbed from every header that comes back.
//! 12. [`quota_retry`]: a slot of the account's quota, an attempt, and another within the
//!     deadline while the answer is worth retrying (one layer, one loop: they share one
//!     deadline).
//! 13. [`crate::upstream::UpstreamClient`]: one attempt over the pooled client.

pub mod access_log;
pub mod body_key;
pub mod buffer;
pub mod cache;
pub mod caller;
pub mod envelope;
pub mod key_injection;
pub mod lead_import;
pub mod own_routes;
pub mod panic_guard;
pub mod quota_retry;
pub mod request_id;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use http::{HeaderMap, Request, Response};
use tower::{Service, ServiceBuilder};

use crate::accounts::Accounts;
use crate::body::BodyBudget;
use crate::cache::Cache;
use crate::cache::store::Store;
use crate::config::Settings;
use crate::connections::Connections;
use crate::error::ProxyError;
use crate::key::Secrets;
use crate::served::Served;
use crate::shutdown::Shutdown;
use crate::upstream::UpstreamClient;

/// An answer and how it was served.
#[derive(Debug)]
pub struct Reply {
    pub response: Response<Body>,
    pub served: Served,
}

impl Reply {
    pub fn new(response: Response<Body>, served: Served) -> Self {
        Self { response, served }
    }
}

/// What went wrong, and how far the request got before it did.
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    pub served: Served,
    /// Headers its answer carries whatever the error (`x-lead-warnings`); rare, so
    /// boxed to keep every `Result` small.
    pub headers: Option<Box<HeaderMap>>,
}

impl Failure {
    pub fn new(error: ProxyError, served: Served) -> Self {
        Self {
            error,
            served,
            headers: None,
        }
    }

    /// Headers the answer gets, made on first use.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        self.headers.get_or_insert_with(Default::default)
    }

    /// An error before anything was sent.
    pub fn early(error: ProxyError) -> Self {
        Self::new(error, Served::default())
    }
}

/// What every serving thread builds its stack from: the settings and the parts all
/// threads share.
#[derive(Clone, Debug)]
pub struct Shared {
    pub settings: Settings,
    pub secrets: Secrets,
    /// Every account, each with its key, quota and retry budget.
    pub accounts: Arc<Accounts>,
    /// How clients are told apart and held to their caps.
    pub clients: caller::Clients,
    pub bodies: BodyBudget,
    /// Open client connections and their cap (`server.max_connections`).
    pub connections: Connections,
    /// The response cache and the coalescing line.
    pub cache: Arc<Cache>,
}

impl Shared {
    /// The accounts (on the backend `limit.backend` names) and the body budget for
    /// `settings`.
    pub fn new(settings: Settings) -> Result<Self, String> {
        // Installs the recorder before the first sample.
        crate::metrics::handle();
        let accounts = Arc::new(Accounts::new(&settings)?);
        let fleet = accounts.redis_link().map(crate::cache::fleet::Fleet::new);
        let store = Store::start(settings.cache.max_bytes, fleet);
        Ok(Self {
            secrets: settings.secrets(),
            accounts,
            clients: caller::Clients::new(&settings.limit),
            bodies: BodyBudget::new(settings.server.max_buffered_bytes),
            connections: Connections::new(settings.server.max_connections),
            cache: Arc::new(Cache::new(&settings.cache, store)),
            settings,
        })
    }
}

impl Shared {
    /// The same process under reloaded `settings` (restart-only ones already put back):
    /// accounts keep their quotas and waiters, clients keep their caps while
    /// `limit.per_client` is unchanged, the body budget stays.
    pub async fn reload(&self, settings: Settings) -> Self {
        Self {
            secrets: settings.secrets(),
            accounts: Arc::new(self.accounts.reload(&settings).await),
            clients: self.clients.reload(&settings.limit),
            bodies: self.bodies.clone(),
            connections: self.connections.clone(),
            cache: Arc::new(self.cache.reload(&settings.cache)),
            settings,
        }
    }
}

/// One serving thread's stack: every layer holds its own handle (an `Arc` of its own,
/// so cloning the stack per request touches no counter another thread touches).
/// `B` is hyper's request body when serving; tests may use any other.
pub fn build<B>(
    shared: &Shared,
    shutdown: &Shutdown,
    client: UpstreamClient,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ 'static
+ use<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    let s = &shared.settings;
    ServiceBuilder::new()
        .layer(request_id::RequestIdLayer)
        .layer(panic_guard::PanicGuardLayer)
        .layer(access_log::AccessLogLayer::new(&shared.secrets))
        .layer(own_routes::OwnRoutesLayer::new(
            &shared.accounts,
            &shared.cache,
            &shared.connections,
            shutdown,
            s.server.status_requires_token,
        ))
        .layer(caller::CallerLayer::new(&shared.accounts, &shared.clients))
        .layer(envelope::EnvelopeLayer::new(&shared.secrets))
        .layer(buffer::BufferLayer::new(&s.server, &shared.bodies))
        .layer(body_key::BodyKeyLayer::new(&shared.accounts))
        .layer(cache::CacheLayer::new(&shared.cache, s.limit.max_wait))
        .layer(lead_import::LeadImportLayer::new(
            &s.leads,
            &s.upstream,
            &shared.secrets,
        ))
        .layer(key_injection::KeyInjectionLayer::new(&shared.secrets))
        .layer(quota_retry::QuotaRetryLayer::new(shared, shutdown))
        .service(client)
}
