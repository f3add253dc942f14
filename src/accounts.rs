//! The SmartLead accounts one proxy serves, each with its own key, quota (windows,
//! queue, pause, SmartLead's own limit followed, Redis keys) and retry budget:
//! `default` (`SMARTLEAD_API_KEY`), one per `[[accounts]]` table, and, with
//! `upstream.allow_client_key`, one per client key, made on first use.
//!
//! [`Accounts::choose`] picks a request's account: its access token's, else the one
//! `X-SmartLead-Account` names, else its own client key's (with `allow_client_key`),
//! else `default`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{
    DEFAULT_ACCOUNT, LimitBackend, LimitSettings, Settings, UpstreamSettings, Window,
};
use crate::error::ProxyError;
use crate::key::ApiKey;
use crate::limiter::local::{LocalBackend, spans};
use crate::limiter::redis::RedisLink;
use crate::limiter::{Backend, Limiter};
use crate::retry::RetryBudget;
use crate::upstream::Target;

/// The request header naming an account; the proxy's, never forwarded.
pub const ACCOUNT_HEADER: HeaderName = HeaderName::from_static("x-smartlead-account");

/// One SmartLead account as the request path uses it.
#[derive(Debug)]
pub struct Account {
    /// `default`, an `[[accounts]]` name, or `key:<8 hex>` for a client key: never a key.
    pub name: Arc<str>,
    /// What its Redis keys and cache entries are named by: its name, or for a client key
    /// 32 hex digits of the key's keyed hash.
    pub id: Arc<str>,
    pub target: Target,
    /// How its cached and coalesced reads went.
    pub cache: Arc<crate::cache::Counts>,
    pub limiter: Arc<Limiter>,
    pub retry_budget: RetryBudget,
    /// When a request last chose it (client-key accounts are dropped once idle).
    last_used: Mutex<Instant>,
    /// SmartLead answered its key 401 or 403: a client key's slot is free to take.
    refused: std::sync::atomic::AtomicBool,
}

impl Account {
    /// SmartLead refused this account's key (401 or 403).
    pub fn key_refused(&self) {
        self.refused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it can be forgotten now: nobody holds it and nobody waits in its line.
    fn unused(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1 && self.limiter.queued() == 0
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Makes each account's limiter on the configured backend.
#[derive(Debug)]
struct Quotas {
    limit: LimitSettings,
    retry: crate::config::RetrySettings,
    link: Option<Arc<RedisLink>>,
}

impl Quotas {
    fn new(settings: &Settings) -> Result<Self, String> {
        let link = match settings.limit.backend {
            LimitBackend::Local => None,
            LimitBackend::Redis => Some(RedisLink::start(settings)?),
        };
        Ok(Self {
            limit: settings.limit.clone(),
            retry: settings.retry.clone(),
            link,
        })
    }

    /// An account's parts: its name (shown), the name its Redis keys use, its windows.
    fn account(&self, name: &str, stored_as: &str, windows: &[Window], target: Target) -> Account {
        let spans = spans(windows, self.limit.margin);
        let follow = crate::config::followed_window(windows);
        let backend: Arc<dyn Backend> = match &self.link {
            Some(link) => link.log_for(stored_as, spans, follow),
            None => Arc::new(LocalBackend::with_spans(spans, "local")),
        };
        let longest = windows.iter().map(|w| w.period).max().unwrap_or_default();
        let limiter = Arc::new(Limiter::new(
            backend,
            name,
            windows,
            &self.limit,
            longest.max(self.retry.max_delay),
        ));
        if let Some(link) = &self.link {
            link.counts_waiting(name, &limiter);
        }
        Account {
            name: name.into(),
            id: stored_as.into(),
            target,
            cache: Arc::new(crate::cache::Counts::new(name)),
            limiter,
            retry_budget: RetryBudget::new(&self.retry),
            last_used: Mutex::new(Instant::now()),
            refused: Default::default(),
        }
    }
}

impl Quotas {
    /// A running account under new settings: the same quota (limiter, waiters) with this
    /// target and a retry budget of the new settings.
    fn carry_over(&self, old: &Account, target: Target) -> Account {
        Account {
            name: old.name.clone(),
            id: old.id.clone(),
            target,
            cache: old.cache.clone(),
            limiter: old.limiter.clone(),
            retry_budget: RetryBudget::new(&self.retry),
            last_used: Mutex::new(Instant::now()),
            refused: Default::default(),
        }
    }

    /// `account`'s limiter to `windows` and the rest of these settings.
    async fn retune(&self, account: &Account, windows: &[Window]) {
        let longest = windows.iter().map(|w| w.period).max().unwrap_or_default();
        account
            .limiter
            .retune(windows, &self.limit, longest.max(self.retry.max_delay))
            .await;
    }
}

/// The windows `settings` give the account `name` (client-key accounts: `limit.windows`).
fn windows_of<'a>(settings: &'a Settings, name: &str) -> &'a [Window] {
    settings
        .accounts
        .iter()
        .find(|a| a.name == name)
        .and_then(|a| a.windows.as_deref())
        .unwrap_or(&settings.limit.windows)
}

/// A token, its name when it was written `"name:token"`, and the account it is bound to
/// (`None`: any).
#[derive(Debug)]
struct Token {
    /// As written: a client may present all of it, so a plain token with a colon in it
    /// keeps working.
    written: SecretString,
    /// The part after `name:`, when it has a name.
    secret: Option<SecretString>,
    name: Option<Arc<str>>,
    account: Option<Arc<Account>>,
}

impl Token {
    fn new(written: &SecretString, account: Option<Arc<Account>>) -> Self {
        let named = written
            .expose_secret()
            .split_once(':')
            .filter(|(name, token)| {
                !token.is_empty() && !name.contains(':') && crate::client::valid_client_id(name)
            });
        Self {
            written: written.clone(),
            secret: named.map(|(_, token)| SecretString::from(token)),
            name: named.map(|(name, _)| name.into()),
            account,
        }
    }

    /// Compared in constant time, both forms every time.
    fn matches(&self, presented: &str) -> bool {
        let presented = presented.as_bytes();
        let whole = presented.ct_eq(self.written.expose_secret().as_bytes());
        let part = match &self.secret {
            Some(s) => presented.ct_eq(s.expose_secret().as_bytes()),
            None => subtle::Choice::from(0),
        };
        bool::from(whole | part)
    }
}

/// What the caller layer decided about a request, for the layers below: the account it
/// uses and who it is for.
#[derive(Debug, Clone)]
pub struct Call {
    pub account: Arc<Account>,
    pub who: crate::client::Who,
    /// The account was `default` for want of anything else (no token's, none named, no
    /// client key in the query): a client key in the body may still choose one.
    pub open: bool,
}

impl Call {
    /// For `account`, from no one in particular (in-process callers and tests).
    pub fn anonymous(account: Arc<Account>) -> Self {
        Self {
            account,
            who: Default::default(),
            open: false,
        }
    }
}

/// The account a request uses, and the name of the token it came with (its client, when
/// it sent no `X-Client-Id`).
#[derive(Debug, Clone)]
pub struct Chosen {
    pub account: Arc<Account>,
    pub token_name: Option<Arc<str>>,
    /// See [`Call::open`].
    pub open: bool,
}

/// Every account of this proxy.
#[derive(Debug)]
pub struct Accounts {
    default: Option<Arc<Account>>,
    named: HashMap<String, Arc<Account>>,
    tokens: Vec<Token>,
    client_keys: Option<ClientKeys>,
    quotas: Arc<Quotas>,
}

impl Accounts {
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let quotas = Arc::new(Quotas::new(settings)?);
        Ok(Self::with(settings, quotas, &HashMap::new(), None))
    }

    /// The accounts after a reload: those that stay keep their quota, waiters included
    /// (retuned to the new windows), added ones start, removed ones are only dropped from
    /// here (their waiters still hold them until they are done). The backend and its
    /// Redis link are the running ones: changing them needs a restart.
    pub async fn reload(&self, settings: &Settings) -> Self {
        let quotas = Arc::new(Quotas {
            limit: settings.limit.clone(),
            retry: settings.retry.clone(),
            link: self.quotas.link.clone(),
        });
        let next = Self::with(
            settings,
            quotas.clone(),
            &self.named,
            self.client_keys.as_ref(),
        );
        for account in next.all() {
            quotas
                .retune(&account, windows_of(settings, &account.name))
                .await;
        }
        next
    }

    /// The accounts `settings` describe, reusing the limiters of `running` ones by name
    /// and the client-key quotas `keys` holds.
    fn with(
        settings: &Settings,
        quotas: Arc<Quotas>,
        running: &HashMap<String, Arc<Account>>,
        keys: Option<&ClientKeys>,
    ) -> Self {
        let windows = &settings.limit.windows;
        let upstream = &settings.upstream;
        let fixed = |key: Option<ApiKey>| {
            Target::new(&UpstreamSettings {
                api_key: key,
                allow_client_key: false,
                ..upstream.clone()
            })
        };
        let make = |name: &str, windows: &[Window], target: Target| {
            Arc::new(match running.get(name) {
                Some(old) => quotas.carry_over(old, target),
                None => quotas.account(name, name, windows, target),
            })
        };
        // With allow_client_key and no key of its own, `default` forwards what it gets.
        let default = (upstream.api_key.is_some() || upstream.allow_client_key)
            .then(|| make(DEFAULT_ACCOUNT, windows, fixed(upstream.api_key.clone())));
        let mut named = HashMap::new();
        if let Some(d) = &default {
            named.insert(DEFAULT_ACCOUNT.to_owned(), d.clone());
        }
        let mut tokens: Vec<Token> = settings
            .server
            .access_tokens
            .iter()
            .map(|t| Token::new(t, None))
            .collect();
        for a in &settings.accounts {
            let windows = a.windows.as_deref().unwrap_or(windows);
            let account = make(&a.name, windows, fixed(a.key.clone()));
            for t in &a.tokens {
                tokens.push(Token::new(t, Some(account.clone())));
            }
            named.insert(a.name.clone(), account);
        }
        let client_keys = upstream.allow_client_key.then(|| {
            let fresh = ClientKeys::new(settings, quotas.clone());
            if let Some(old) = keys {
                fresh.take_over(old, &quotas);
            }
            fresh
        });
        Self {
            default,
            named,
            tokens,
            client_keys,
            quotas,
        }
    }

    /// Every account in use: the configured ones, then the client keys' (for `/readyz`,
    /// metrics and status).
    pub fn all(&self) -> Vec<Arc<Account>> {
        let mut all: Vec<Arc<Account>> = self.named.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(keys) = &self.client_keys {
            all.extend(keys.all());
        }
        all
    }

    /// The instances sharing the quota through Redis (`None` on the local backend, or
    /// when Redis does not answer).
    pub async fn fleet(&self) -> Option<Vec<crate::limiter::redis::Instance>> {
        self.quotas.link.as_ref()?.fleet().await
    }

    /// The Redis link every account shares, with `limit.backend = "redis"`.
    pub fn redis_link(&self) -> Option<Arc<RedisLink>> {
        self.quotas.link.clone()
    }

    /// Once any token is configured, every `/api/v1` request needs one.
    pub fn tokens_required(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether client keys get quotas of their own (`upstream.allow_client_key`).
    pub fn keeps_client_keys(&self) -> bool {
        self.client_keys.is_some()
    }

    /// The account a request uses: its token's (when tokens are configured, a token is
    /// required), else the one it names, else its own key's, else `default`.
    pub fn choose(
        &self,
        token: Option<&str>,
        named: Option<&str>,
        client_key: Option<&str>,
    ) -> Result<Chosen, ProxyError> {
        let (bound, token_name) = if self.tokens_required() {
            let token = token.ok_or(ProxyError::Unauthorized)?;
            let found = self.token(token).ok_or(ProxyError::Unauthorized)?;
            (found.account.clone(), found.name.clone())
        } else {
            (None, None)
        };
        let open = bound.is_none() && named.is_none() && client_key.is_none();
        let chosen = match (bound, named) {
            (Some(account), Some(asked)) if *account.name != *asked => {
                return Err(ProxyError::WrongAccount {
                    asked: asked.to_owned(),
                    token_account: account.name.to_string(),
                });
            }
            (Some(account), _) => account,
            (None, Some(asked)) => self
                .named
                .get(asked)
                .cloned()
                .ok_or_else(|| ProxyError::UnknownAccount(asked.to_owned()))?,
            (None, None) => match (&self.client_keys, client_key) {
                (Some(keys), Some(key)) => keys.get(key)?,
                _ => self.default.clone().ok_or(ProxyError::NoAccount)?,
            },
        };
        chosen.touch();
        Ok(Chosen {
            account: chosen,
            token_name,
            open,
        })
    }

    /// The quota of a client key found in the body of a request whose account was still
    /// [`Call::open`]; `None` when client keys do not get quotas of their own.
    pub fn for_client_key(&self, key: &str) -> Option<Result<Arc<Account>, ProxyError>> {
        let keys = self.client_keys.as_ref()?;
        Some(keys.get(key).inspect(|a| a.touch()))
    }

    /// The token presented, comparing every token in constant time without stopping at
    /// the first match.
    /// Whether `presented` is one of the access tokens.
    pub fn knows_token(&self, presented: &str) -> bool {
        self.token(presented).is_some()
    }

    fn token(&self, presented: &str) -> Option<&Token> {
        let mut found = None;
        for t in &self.tokens {
            if t.matches(presented) {
                found = Some(t);
            }
        }
        found
    }
}

/// One quota per client key, identified by a keyed hash of the key (HMAC-SHA-256), never
/// the key: in memory, in Redis keys (`{<redis.key>:key:<32 hex>}`) and wherever it is
/// shown (`key:<8 hex>`). The hash is keyed with `redis.key`, so every instance sharing a
/// quota gives a client key the same one.
#[derive(Debug)]
struct ClientKeys {
    hmac: HmacKey,
    quotas: Arc<Quotas>,
    windows: Vec<Window>,
    target: Target,
    max: usize,
    /// A quota idle this long is dropped: its windows hold none of its starts any more.
    idle_after: Duration,
    held: Mutex<HashMap<[u8; 32], Arc<Account>>>,
}

struct HmacKey(ring::hmac::Key);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey")
    }
}

impl ClientKeys {
    fn new(settings: &Settings, quotas: Arc<Quotas>) -> Self {
        let salt = format!("smartlead-proxy client keys/{}", settings.redis.key);
        let windows = settings.limit.windows.clone();
        let longest = windows.iter().map(|w| w.period).max().unwrap_or_default();
        Self {
            hmac: HmacKey(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                salt.as_bytes(),
            )),
            quotas,
            windows,
            target: Target::new(&UpstreamSettings {
                api_key: None,
                allow_client_key: true,
                ..settings.upstream.clone()
            }),
            max: settings.limit.max_client_keys,
            idle_after: longest + settings.limit.margin + settings.limit.max_wait,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The quotas `old` holds, carried over (so a key keeps its one quota across a
    /// reload).
    /// Frees slots: every key SmartLead refused (its requests in flight keep their
    /// quota), every quota unused and idle past its longest window, and if that frees
    /// none, the least recently used quota with no waiter. Forgetting a quota forgets its
    /// past starts (docs/security.md, "Client-key slots"): on the local backend a key that comes back
    /// within its longest window starts afresh; on Redis its log is kept there.
    fn make_room(&self, held: &mut HashMap<[u8; 32], Arc<Account>>) {
        held.retain(|_, a| !a.is_refused() && (!a.unused() || a.idle_for() < self.idle_after));
        if held.len() < self.max {
            return;
        }
        let lru = held
            .iter()
            .filter(|(_, a)| a.unused())
            .max_by_key(|(_, a)| a.idle_for())
            .map(|(hash, _)| *hash);
        if let Some(hash) = lru {
            held.remove(&hash);
        }
    }

    fn take_over(&self, old: &ClientKeys, quotas: &Quotas) {
        let old_held = old.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (hash, account) in old_held.iter() {
            let target = self.target.clone();
            held.insert(*hash, Arc::new(quotas.carry_over(account, target)));
        }
    }

    fn all(&self) -> Vec<Arc<Account>> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<Arc<Account>> = held.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn get(&self, key: &str) -> Result<Arc<Account>, ProxyError> {
        let tag = ring::hmac::sign(&self.hmac.0, key.as_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(tag.as_ref());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(account) = held.get(&hash) {
            // A key SmartLead refused may have been fixed since: it is tried again.
            account
                .refused
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return Ok(account.clone());
        }
        if held.len() >= self.max {
            self.make_room(&mut held);
        }
        if held.len() >= self.max {
            let soonest = held
                .values()
                .map(|a| self.idle_after.saturating_sub(a.idle_for()))
                .min()
                .unwrap_or(self.idle_after);
            return Err(ProxyError::TooManyClientKeys {
                retry_after: soonest,
            });
        }
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("key:{}", &hex[..8]);
        let stored_as = format!("key:{}", &hex[..32]);
        let account =
            Arc::new(
                self.quotas
                    .account(&name, &stored_as, &self.windows, self.target.clone()),
            );
        held.insert(hash, account.clone());
        Ok(account)
    }
}
