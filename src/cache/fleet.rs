//! The cache shared by every instance of a `redis.key` (`limit.backend = "redis"`).
//!
//! Keys live in the account's hash slot (`{<redis.key>:<account id>}`), named by a hash
//! of the path and query (never the key):
//! - `:c:<h>` an entry, expiring with PX at its ttl plus `cache.stale_if_error`;
//! - `:cg:<scope>` a scope's generation ([`super::store`]);
//! - `:cl:<h>` the coalescing lock: SET NX PX `redis.lease` with a token, renewed while
//!   the call runs, freed by compare-and-delete;
//! - `:cr:<h>` the outcome of a coalesced call for followers on other instances: the
//!   answer, or `B` when it was too big to share, kept [`OUTCOME_FOR`].
//!
//! Followers elsewhere are woken by `c:<h>` on the account's `:moved` channel, and look
//! again at a jittered interval in case the message is lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Script;

use super::entry::Stored;
use super::key::CacheKey;
use super::routes::Scope;
use crate::limiter::redis::RedisLink;

/// How long a coalesced call's outcome waits for followers on other instances.
pub const OUTCOME_FOR: Duration = Duration::from_secs(5);
/// What a follower elsewhere finds for an answer too big to share.
const TOO_BIG: &[u8] = b"B";

struct Scripts {
    get: Script,
    put: Script,
    bump: Script,
    lock: Script,
    release: Script,
    look: Script,
}

pub struct Fleet {
    link: Arc<RedisLink>,
    scripts: Scripts,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("instance", &self.link.instance())
            .finish()
    }
}

/// What a look at another instance's call found.
#[derive(Debug)]
pub enum Look {
    /// Still running.
    Running,
    Answer(Arc<Stored>),
    TooBig,
    /// Over without an outcome (it failed or its instance died): take the lock.
    Free,
}

/// A hex digest of `text`, short enough for a key and long enough never to collide.
fn digest(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Fleet {
    pub fn new(link: Arc<RedisLink>) -> Self {
        Self {
            link,
            scripts: Scripts {
                get: Script::new(include_str!("lua/get.lua")),
                put: Script::new(include_str!("lua/put.lua")),
                bump: Script::new(include_str!("lua/bump.lua")),
                lock: Script::new(include_str!("lua/lock.lua")),
                release: Script::new(include_str!("lua/release.lua")),
                look: Script::new(include_str!("lua/look.lua")),
            },
        }
    }

    /// Whether Redis answers now, as the limiter found it.
    pub fn usable(&self) -> bool {
        self.link.healthy()
    }

    pub fn instance(&self) -> &str {
        self.link.instance()
    }

    pub fn lease(&self) -> Duration {
        self.link.lease()
    }

    pub fn news(&self) -> tokio::sync::watch::Receiver<u64> {
        self.link.cache_news()
    }

    fn prefix(&self, account: &str) -> String {
        self.link.account_prefix(account)
    }

    fn key_of(&self, key: &CacheKey, kind: &str) -> String {
        format!(
            "{}:{kind}:{}",
            self.prefix(key.account()),
            digest(key.target())
        )
    }

    fn generation_keys(&self, account: &str, scopes: &[Scope]) -> Vec<String> {
        let prefix = self.prefix(account);
        scopes
            .iter()
            .map(|s| format!("{prefix}:cg:{}", s.label()))
            .collect()
    }

    /// The entry and whether its generations still match.
    pub async fn get(
        &self,
        key: &CacheKey,
        scopes: &[Scope],
    ) -> Result<Option<Arc<Stored>>, String> {
        let mut inv = self.scripts.get.key(self.key_of(key, "c"));
        for g in self.generation_keys(key.account(), scopes) {
            inv.key(g);
        }
        let found: Vec<Option<Vec<u8>>> = self.link.call(inv).await?;
        let mut found = found.into_iter();
        let Some(Some(raw)) = found.next() else {
            return Ok(None);
        };
        let gens: Vec<u64> = found.map(|g| parse_gen(g.as_deref())).collect();
        Ok(Stored::decode(Bytes::from(raw))
            .filter(|s| s.gens == gens)
            .map(Arc::new))
    }

    pub async fn generations(&self, account: &str, scopes: &[Scope]) -> Result<Vec<u64>, String> {
        if scopes.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.generation_keys(account, scopes);
        let mut inv = self.scripts.get.key(&keys[0]);
        for g in &keys[1..] {
            inv.key(g);
        }
        let found: Vec<Option<Vec<u8>>> = self.link.call(inv).await?;
        Ok(found.iter().map(|g| parse_gen(g.as_deref())).collect())
    }

    /// Keeps `stored` for `life` unless a write moved its scopes since it was asked for.
    pub async fn put(
        &self,
        key: &CacheKey,
        scopes: &[Scope],
        stored: &Stored,
        life: Duration,
    ) -> Result<bool, String> {
        let mut inv = self.scripts.put.key(self.key_of(key, "c"));
        for g in self.generation_keys(key.account(), scopes) {
            inv.key(g);
        }
        inv.arg(stored.encode()).arg(life.as_millis().max(1) as u64);
        for g in &stored.gens {
            inv.arg(g.to_string());
        }
        let kept: i64 = self.link.call(inv).await?;
        Ok(kept == 1)
    }

    /// Moves `scopes`' generations, kept for `keep`.
    pub async fn bump(
        &self,
        account: &str,
        scopes: &[Scope],
        keep: Duration,
    ) -> Result<(), String> {
        let keys = self.generation_keys(account, scopes);
        let Some(first) = keys.first() else {
            return Ok(());
        };
        let mut inv = self.scripts.bump.key(first);
        for k in &keys[1..] {
            inv.key(k);
        }
        inv.arg(keep.as_millis() as u64);
        for _ in &keys {
            // Never 0 (what an absent generation reads as).
            inv.arg((rand::random::<u64>() | 1).to_string());
        }
        let _: i64 = self.link.call(inv).await?;
        Ok(())
    }

    /// Takes (or renews) the key's lock with `token`: `true` when this token holds it.
    pub async fn lock(&self, key: &CacheKey, token: &str) -> Result<bool, String> {
        let mut inv = self.scripts.lock.key(self.key_of(key, "cl"));
        inv.arg(token).arg(self.lease().as_millis() as u64);
        let held: i64 = self.link.call(inv).await?;
        Ok(held == 1)
    }

    /// Ends this token's call with `outcome` for the followers elsewhere (`None`:
    /// nothing to share, they take over).
    pub async fn release(
        &self,
        key: &CacheKey,
        token: &str,
        outcome: Option<Outcome<'_>>,
    ) -> Result<(), String> {
        let digest = digest(key.target());
        let prefix = self.prefix(key.account());
        let mut inv = self.scripts.release.key(format!("{prefix}:cl:{digest}"));
        inv.key(format!("{prefix}:cr:{digest}"));
        let value = match outcome {
            Some(Outcome::Answer(stored)) => stored.encode(),
            Some(Outcome::TooBig) => TOO_BIG.to_vec(),
            None => Vec::new(),
        };
        inv.arg(token)
            .arg(value)
            .arg(OUTCOME_FOR.as_millis() as u64)
            .arg(format!("{prefix}:moved"))
            .arg(format!("c:{digest}"));
        let _: i64 = self.link.call(inv).await?;
        Ok(())
    }

    /// How another instance's call for `key` stands.
    pub async fn look(&self, key: &CacheKey) -> Result<Look, String> {
        let mut inv = self.scripts.look.key(self.key_of(key, "cl"));
        inv.key(self.key_of(key, "cr"));
        let (locked, outcome): (i64, Option<Vec<u8>>) = self.link.call(inv).await?;
        Ok(match outcome {
            Some(raw) if raw == TOO_BIG => Look::TooBig,
            Some(raw) => match Stored::decode(Bytes::from(raw)) {
                Some(stored) => Look::Answer(Arc::new(stored)),
                None => Look::Free,
            },
            None if locked == 1 => Look::Running,
            None => Look::Free,
        })
    }
}

/// What a coalesced call leaves for followers elsewhere.
pub enum Outcome<'a> {
    Answer(&'a Stored),
    TooBig,
}

fn parse_gen(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|r| std::str::from_utf8(r).ok())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}
