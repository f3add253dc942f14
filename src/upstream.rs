//! The SmartLead side: the one allowed target URI ([`Target`]: `upstream.base_url`, the
//! key injected, a client's key removed), the headers that never cross the proxy, and
//! the pooled client as a tower service that sends one attempt ([`UpstreamClient`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use percent_encoding::percent_decode_str;

use crate::config::{BaseUrl, UpstreamSettings};
use crate::headers::remove_all;
use crate::key::{ApiKey, is_api_key_name};

/// Idle upstream connections kept for reuse (in all, shared out between the serving
/// threads' pools); a burst beyond this opens more, which close once idle.
pub const POOL_MAX_IDLE: usize = 64;

/// The client-facing prefix that maps onto `upstream.base_url`.
pub const API_PREFIX: &str = "/api/v1";

/// Why one attempt produced no upstream response.
#[derive(Debug)]
pub enum AttemptError {
    /// Could not connect (refused, DNS, TLS, connect timeout): SmartLead did no work.
    Connect(String),
    /// Connected, but the connection closed or reset before a response arrived.
    Closed(String),
    /// The response was not valid HTTP, or not one a client can use.
    Invalid(String),
    /// No response headers within the attempt's time.
    Timeout(Duration),
}

impl AttemptError {
    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect_error",
            AttemptError::Closed(_) => "connection_closed",
            AttemptError::Invalid(_) => "invalid_response",
            AttemptError::Timeout(_) => "timeout",
        }
    }
}

thread_local! {
    /// Where a target is written before it is cut from the slab.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Where requests go: scheme and authority always from `upstream.base_url`, only the
/// path and query the client's, with the configured key in the query.
#[derive(Clone, Debug)]
pub struct Target {
    base: BaseUrl,
    /// `Host` for every request, made once.
    host: HeaderValue,
    key: Option<ApiKey>,
    allow_client_key: bool,
}

impl Target {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let base = settings.base_url.clone();
        Self {
            // An authority that parsed is a valid header value.
            host: HeaderValue::from_str(base.authority()).expect("a valid authority"),
            base,
            key: settings.api_key.clone(),
            allow_client_key: settings.allow_client_key,
        }
    }

    /// The `Host` header every request goes with.
    pub fn host(&self) -> HeaderValue {
        self.host.clone()
    }

    /// The upstream's base path (`/api/v1`), which targets start with.
    pub fn base_path(&self) -> &str {
        self.base.path()
    }

    /// The upstream URI for a client path under `/api/v1` and its raw query, or why the
    /// path cannot be forwarded.
    ///
    /// Dot-segments (raw or percent-encoded), encoded slashes and empty segments are
    /// refused, so a path can neither climb out of the base path nor hide a route.
    pub fn uri(&self, client_path: &str, query: Option<&str>) -> Result<Uri, &'static str> {
        let rest = client_path
            .strip_prefix(API_PREFIX)
            .filter(|r| r.starts_with('/'))
            .ok_or("the path is not under /api/v1/")?;
        check_path(rest)?;
        let base = &self.base;
        // Origin-form (`/api/v1/...?...`): the connection is made to `upstream.base_url`'s
        // host by the client, so nothing in the target can say where to connect.
        let target = SCRATCH.with_borrow_mut(|target| {
            target.clear();
            target.push_str(base.path());
            target.push_str(rest);
            self.push_query(target, query);
            crate::slab::copy(target.as_bytes())
        });
        let uri =
            Uri::from_maybe_shared(target).map_err(|_| "the request path or query is not valid")?;
        // Defence in depth: a target that parsed as anything but a path is refused.
        if uri.authority().is_some() || uri.scheme().is_some() {
            return Err("the request would leave the upstream host");
        }
        Ok(uri)
    }

    /// Appends `?query` without any client `api_key` (in any of the forms
    /// [`is_api_key_name`] knows) and with the configured one; with `allow_client_key`, a
    /// client's first key goes on as plain `api_key=`, its other ones are dropped.
    fn push_query(&self, out: &mut String, query: Option<&str>) {
        let mut client_key = false;
        let mut sep = '?';
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if is_api_key_name(name) {
                if self.allow_client_key && !client_key && !value.is_empty() {
                    client_key = true;
                    out.push(sep);
                    out.push_str("api_key=");
                    out.push_str(value);
                    sep = '&';
                }
                continue;
            }
            out.push(sep);
            out.push_str(pair);
            sep = '&';
        }
        if let (Some(key), false) = (&self.key, client_key) {
            out.push(sep);
            out.push_str("api_key=");
            out.push_str(key.query_value());
        }
    }
}

type Connector = HttpsConnector<crate::egress::Connector>;
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One serving thread's HTTP/1.1 client to the upstream, as a service: one request, one
/// attempt, hop-by-hop headers removed from the answer. Retries, timeouts and the quota
/// are the caller's.
///
/// It is hyper's low-level connection API with a pool of its own: the connections are
/// this thread's (no lock another thread takes, no pool shared by key), a request goes
/// on the first idle connection that is ready, else on a new one, and a connection goes
/// back to the pool as soon as its answer's head has come (it takes the next request
/// once that answer's body is done).
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    connector: Connector,
    /// Where connections go: the base URL's scheme and authority.
    connect_to: Uri,
    idle: std::sync::Mutex<Vec<Sender>>,
    max_idle: usize,
}

impl UpstreamClient {
    /// A client whose pool keeps at most `max_idle` idle connections, trusting `tls`'s
    /// roots.
    pub fn new(
        settings: &UpstreamSettings,
        tls: rustls::ClientConfig,
        max_idle: usize,
    ) -> Result<Self, String> {
        let (connector, _) = crate::egress::connector(settings)?;
        Self::with_connector(settings, connector, tls, max_idle)
    }

    /// [`UpstreamClient::new`] over `connector` (direct or through the egress proxy),
    /// chosen once for every serving thread.
    pub fn with_connector(
        settings: &UpstreamSettings,
        connector: crate::egress::Connector,
        tls: rustls::ClientConfig,
        max_idle: usize,
    ) -> Result<Self, String> {
        // HTTP/1.1 only: the pool keeps one request per connection at a time.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let base = &settings.base_url;
        let connect_to = format!("{}://{}/", base.scheme(), base.authority())
            .parse()
            .map_err(|e| format!("upstream.base_url: {e}"))?;
        Ok(Self {
            pool: Arc::new(Pool {
                connector,
                connect_to,
                idle: std::sync::Mutex::new(Vec::with_capacity(max_idle)),
                max_idle,
            }),
        })
    }
}

impl Pool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Sender>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection ready for a request; closed ones are dropped on the way.
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle();
        idle.retain(|s| !s.is_closed());
        let at = idle.iter().rposition(Sender::is_ready)?;
        Some(idle.swap_remove(at))
    }

    fn checkin(&self, sender: Sender) {
        let mut idle = self.idle();
        if idle.len() < self.max_idle && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, AttemptError> {
        let io = tower::ServiceExt::oneshot(self.connector.clone(), self.connect_to.clone())
            .await
            .map_err(|e| AttemptError::Connect(error_chain(&*e)))?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| AttemptError::Connect(error_chain(&e)))?;
        tokio::spawn(async move {
            // The connection's end (closed, reset) shows on the request that meets it.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One attempt: on an idle connection, or a new one. A request that a reused
    /// connection could not even take (it was closing) goes on a new one instead.
    async fn send(
        self: Arc<Self>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let req = match self.checkout() {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(resp) => return self.answered(sender, resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(classify(e.error())),
                },
            },
            None => req,
        };
        // Boxed: connecting (TLS, the egress proxy) would make every attempt's future as
        // large as its own, and most attempts find an idle connection.
        let mut sender = Box::pin(self.connect()).await?;
        match sender.send_request(req).await {
            Ok(resp) => self.answered(sender, resp),
            Err(e) => Err(classify(&e)),
        }
    }

    fn answered(
        &self,
        sender: Sender,
        mut resp: Response<Incoming>,
    ) -> Result<Response<Incoming>, AttemptError> {
        self.checkin(sender);
        strip_hop_by_hop(resp.headers_mut());
        usable(resp)
    }
}

impl tower::Service<Request<Bytes>> for UpstreamClient {
    type Response = Response<Incoming>;
    type Error = AttemptError;
    type Future = SendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AttemptError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> SendFuture {
        SendFuture {
            inner: Box::pin(self.pool.clone().send(req.map(Full::new))),
        }
    }
}

/// One attempt on its way: SmartLead's answer head, or why there is none. Boxed once:
/// hyper's send future has no name to hold it by.
pub struct SendFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<Incoming>, AttemptError>> + Send>>,
}

impl Future for SendFuture {
    type Output = Result<Response<Incoming>, AttemptError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// What a failed exchange on an open connection was.
fn classify(e: &hyper::Error) -> AttemptError {
    let chain = error_chain(e);
    if e.is_parse() || e.is_parse_status() {
        AttemptError::Invalid(chain)
    } else {
        AttemptError::Closed(chain)
    }
}

/// An answer a client can be given: the proxy never asks to switch protocols, so a 101
/// is as wrong as a status past 599.
fn usable<B>(resp: Response<B>) -> Result<Response<B>, AttemptError> {
    let status = resp.status();
    if status == http::StatusCode::SWITCHING_PROTOCOLS || status.as_u16() >= 600 {
        return Err(AttemptError::Invalid(format!(
            "status {} is not an answer to this request",
            status.as_u16()
        )));
    }
    Ok(resp)
}

/// `api_key` in any case, also percent- or plus-encoded.
/// The `api_key` a client sent in `query` itself, decoded, if any.
pub fn client_key(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !is_api_key_name(name) || value.is_empty() {
            return None;
        }
        let value = value.replace('+', " ");
        Some(percent_decode_str(&value).decode_utf8_lossy().into_owned())
    })
}

/// Refuses dot-segments and encoded separators anywhere in the path.
fn check_path(path: &str) -> Result<(), &'static str> {
    // Most paths hold no `%`, `\\` or `.` and no empty segment: one pass says so, and
    // only the others are looked at closely.
    let mut previous = 0;
    let plain = path.bytes().all(|b| {
        let special = matches!(b, b'%' | b'\\' | b'.') || (b == b'/' && previous == b'/');
        previous = b;
        !special
    });
    if plain {
        return Ok(());
    }
    let encoded_slash = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
    });
    if encoded_slash || path.contains('\\') {
        return Err("encoded slashes are not allowed in the path");
    }
    // Upstream routers merge empty segments, so `/campaigns/1//leads` would reach the
    // lead import without being recognised as one.
    if path.contains("//") {
        return Err("empty path segments (//) are not allowed in the path");
    }
    for segment in path.split('/') {
        if is_dot_segment(segment) {
            return Err("dot-segments are not allowed in the path");
        }
    }
    Ok(())
}

/// `.` or `..`, also percent-encoded (up to three times, so double encoding is caught).
fn is_dot_segment(segment: &str) -> bool {
    if !segment.contains('%') {
        return segment == "." || segment == "..";
    }
    let mut decoded = segment.to_owned();
    for _ in 0..3 {
        decoded = percent_decode_str(&decoded)
            .decode_utf8_lossy()
            .into_owned();
    }
    decoded == "." || decoded == ".."
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Headers that describe one connection, never forwarded either way (RFC 9110 §7.6.1;
/// `Keep-Alive` and `Proxy-Connection` from older clients and servers).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none or only `Connection: keep-alive`: one pass over the names
    // finds the ones present, and a name whose length is none of theirs is passed over
    // without comparing it to each.
    let mut present = 0u16;
    for name in headers.keys() {
        if matches!(name.as_str().len(), 2 | 7 | 10 | 16..=19)
            && let Some(i) = HOP_BY_HOP.iter().position(|h| h == name)
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let has = |name: &HeaderName| {
        let i = HOP_BY_HOP.iter().position(|h| h == name);
        i.is_some_and(|i| present & (1 << i) != 0)
    };
    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): the body was framed by
    // the former, and is framed again for the other side.
    if has(&header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // Names `Connection` lists (`keep-alive` is on the list already): collected only
    // when there are others, so the usual `Connection: keep-alive` makes no vector.
    let named: Vec<HeaderName> = if has(&header::CONNECTION) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    remove_all(headers, &named);
}

/// The client's headers as they should reach SmartLead, with `host` (the upstream's) as
/// `Host`.
pub fn request_headers(mut headers: HeaderMap, host: HeaderValue) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    // Length is recomputed from the buffered body.
    remove_all(&mut headers, &[header::CONTENT_LENGTH, header::EXPECT]);
    // Replaces the client's in place: `insert` makes room for one more header first,
    // which grows a full map (the request's usually is) for a header it already has.
    match headers.get_mut(header::HOST) {
        Some(value) => *value = host,
        None => {
            headers.insert(header::HOST, host);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(allow_client_key: bool) -> Target {
        let settings = UpstreamSettings {
            base_url: "https://server.smartlead.ai/api/v1".parse().unwrap(),
            api_key: Some(ApiKey::new("K3Y")),
            allow_client_key,
            ..UpstreamSettings::default()
        };
        Target::new(&settings)
    }

    #[test]
    fn builds_target_with_key() {
        let u = target(false);
        let uri = u
            .uri(
                "/api/v1/campaigns/7",
                Some("offset=0&api_key=theirs&limit=5"),
            )
            .unwrap();
        // Origin-form: the client connects to upstream.base_url's host whatever this says.
        assert_eq!(
            uri.to_string(),
            "/api/v1/campaigns/7?offset=0&limit=5&api_key=K3Y"
        );
        let uri = u.uri("/api/v1/campaigns", Some("API%5FKEY=x")).unwrap();
        assert_eq!(uri.query(), Some("api_key=K3Y"));
    }

    #[test]
    fn every_name_parsers_read_as_api_key_is_the_key() {
        let u = target(false);
        for name in [
            "api_key",
            "API_KEY",
            "api%5Fkey",
            "api_key[]",
            "api_key%5B%5D",
            "api_key%5b%5d",
            "api_key[0]",
            "api_key[x]",
            "api_key[a][b]",
            "api.key",
            "api+key",
            "api%20key",
            "Api_Key%5B0%5D",
        ] {
            let uri = u
                .uri("/api/v1/campaigns", Some(&format!("a=1&{name}=theirs&b=2")))
                .unwrap();
            assert_eq!(uri.query(), Some("a=1&b=2&api_key=K3Y"), "{name}");
        }
        for name in ["api_keys", "xapi_key", "api_key]", "api_key[", "apikey"] {
            assert!(!is_api_key_name(name), "{name}");
        }
        let u = target(true);
        let uri = u
            .uri("/api/v1/campaigns", Some("api_key[]=theirs&api_key=second"))
            .unwrap();
        assert_eq!(
            uri.query(),
            Some("api_key=theirs"),
            "one key, plainly named"
        );
        assert_eq!(
            client_key(Some("api_key%5B0%5D=theirs")).as_deref(),
            Some("theirs")
        );
    }

    #[test]
    fn client_key_kept_when_allowed() {
        let u = target(true);
        let uri = u.uri("/api/v1/campaigns", Some("api_key=theirs")).unwrap();
        assert_eq!(uri.query(), Some("api_key=theirs"));
    }

    #[test]
    fn refuses_traversal() {
        let u = target(false);
        for p in [
            "/api/v1/../admin",
            "/api/v1/%2e%2e/admin",
            "/api/v1/%252E%252e/x",
            "/api/v1/a/./b",
            "/api/v1/a%2fb",
            "/api/v1/a\\b",
            "/api/v1//evil.example/x",
            "/api/v1/campaigns/1//leads",
        ] {
            assert!(u.uri(p, None).is_err(), "{p}");
        }
        assert!(
            u.uri("/api/v1/campaigns/", None).is_ok(),
            "a trailing slash"
        );
        assert!(u.uri("/api/v1@evil.example/x", None).is_err());
    }

    #[test]
    fn strips_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::HOST, "evil.example".parse().unwrap());
        h.insert("x-custom", "kept".parse().unwrap());
        let out = request_headers(h, HeaderValue::from_static("upstream.example"));
        assert_eq!(out.len(), 2);
        assert_eq!(out[header::HOST], "upstream.example");
        assert_eq!(out["x-custom"], "kept");
    }

    #[test]
    fn strips_every_hop_by_hop_name_and_frames_by_transfer_encoding() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name, "x".parse().unwrap());
            h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name}");
            let te = *name == header::TRANSFER_ENCODING;
            assert_eq!(h.contains_key(header::CONTENT_LENGTH), !te, "{name}");
            assert!(h.contains_key("x-kept"));
        }
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, "close".parse().unwrap());
        h.append(header::CONNECTION, "X-Gone".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    proptest::proptest! {
        /// Whatever path and query a client sends, the target is a path (the connection
        /// goes to the upstream host only) under its base path, and carries the
        /// configured key exactly once.
        #[test]
        fn any_uri_stays_on_the_upstream_with_one_key(
            path in "(/[a-zA-Z0-9._~%@:!$&'()*+,;=-]{0,12}){1,5}",
            query in proptest::option::of("[a-zA-Z0-9_%=&+.-]{0,60}"),
        ) {
            let u = target(false);
            let client_path = format!("{API_PREFIX}{path}");
            if let Ok(uri) = u.uri(&client_path, query.as_deref()) {
                proptest::prop_assert_eq!(uri.host(), None);
                proptest::prop_assert_eq!(uri.scheme_str(), None);
                proptest::prop_assert!(uri.path().starts_with("/api/v1/"));
                let keys: Vec<String> = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                    .filter(|(k, _)| k.eq_ignore_ascii_case("api_key"))
                    .map(|(_, v)| v.into_owned())
                    .collect();
                proptest::prop_assert_eq!(keys, vec!["K3Y".to_string()]);
                for seg in uri.path().split('/') {
                    proptest::prop_assert!(seg != ".." && seg != ".");
                }
            }
        }
    }
}
