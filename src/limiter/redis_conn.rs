//! How the shared limiter reaches Redis (`redis.mode`): one server through a
//! self-reconnecting connection manager; a cluster from its seed nodes (the cluster client
//! follows `MOVED`/`ASK` and re-reads the slot map); or the master that Sentinel names,
//! asked again after every failure, so a failover is followed.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Client, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use secrecy::ExposeSecret;

use crate::config::{RedisMode, RedisSettings};

/// A connection of whichever kind the mode uses; cheap to clone.
#[derive(Clone)]
pub enum AnyConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Master(MultiplexedConnection),
}

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Master(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Master(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Master(c) => c.get_db(),
        }
    }
}

enum Mode {
    Single {
        client: Client,
        conn: ConnectionManager,
    },
    Cluster {
        client: ClusterClient,
        seeds: Vec<Client>,
    },
    Sentinel {
        sentinels: tokio::sync::Mutex<SentinelClient>,
        /// The master as last named, for subscriptions.
        master: Mutex<Option<Client>>,
    },
}

/// Reaches Redis the way `redis.mode` says; cluster and sentinel connections are made on
/// first use and made again after a failure.
pub struct Connector {
    mode: Mode,
    held: Mutex<Option<AnyConn>>,
    timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `redis.ca_file` as the crate takes it: the roots replacing the built-in ones.
fn certificates(settings: &RedisSettings) -> Result<Option<redis::TlsCertificates>, String> {
    settings
        .ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path)
                .map(|pem| redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
                .map_err(|e| format!("redis.ca_file: cannot read {}: {e}", path.display()))
        })
        .transpose()
}

fn open(url: &str, certs: &Option<redis::TlsCertificates>) -> Result<Client, String> {
    match certs {
        None => Client::open(url),
        Some(c) => Client::build_with_tls(url, c.clone()),
    }
    .map_err(|e| format!("redis.url: {e}"))
}

impl Mode {
    /// One server, through a connection manager that reconnects.
    fn single(
        urls: &[&str],
        certs: &Option<redis::TlsCertificates>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = open(urls.first().copied().unwrap_or_default(), certs)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(250));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(Mode::Single { client, conn })
    }

    /// A cluster, found from its seed nodes.
    fn cluster(
        urls: &[&str],
        certs: &Option<redis::TlsCertificates>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut builder = ClusterClient::builder(urls.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2);
        if let Some(c) = certs.clone() {
            builder = builder.certs(c);
        }
        let client = builder.build().map_err(|e| format!("redis.url: {e}"))?;
        let seeds = urls
            .iter()
            .map(|u| open(u, certs))
            .collect::<Result<_, _>>()?;
        Ok(Mode::Cluster { client, seeds })
    }

    /// Sentinels that say which server is the master.
    fn sentinel(urls: &[&str], master_name: &str) -> Result<Self, String> {
        // The sentinels' URLs carry the master's password (and db) too.
        let first = urls
            .first()
            .copied()
            .unwrap_or_default()
            .into_connection_info()
            .map_err(|e| format!("redis.url: {e}"))?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(first.redis_settings().clone());
        let sentinels = SentinelClient::build(
            urls.to_vec(),
            master_name,
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(|e| format!("redis.url: {e}"))?;
        Ok(Mode::Sentinel {
            sentinels: tokio::sync::Mutex::new(sentinels),
            master: Mutex::new(None),
        })
    }
}

impl Connector {
    /// Every Redis call (and connecting for it) is bounded by `timeout`.
    pub fn new(settings: &RedisSettings, timeout: Duration) -> Result<Self, String> {
        let urls: Vec<&str> = settings
            .url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let certs = certificates(settings)?;
        let mode = match settings.mode {
            RedisMode::Standalone => Mode::single(&urls, &certs, timeout)?,
            RedisMode::Cluster => Mode::cluster(&urls, &certs, timeout)?,
            RedisMode::Sentinel => Mode::sentinel(&urls, settings.master_name.trim())?,
        };
        Ok(Self {
            mode,
            held: Mutex::new(None),
            timeout,
        })
    }

    /// A connection to use now, made if there is none.
    pub async fn conn(&self) -> redis::RedisResult<AnyConn> {
        if let Mode::Single { conn, .. } = &self.mode {
            return Ok(AnyConn::Single(conn.clone()));
        }
        if let Some(held) = lock(&self.held).clone() {
            return Ok(held);
        }
        let made = match &self.mode {
            Mode::Single { .. } => unreachable!("answered above"),
            Mode::Cluster { client, .. } => AnyConn::Cluster(client.get_async_connection().await?),
            Mode::Sentinel { .. } => {
                let master = self.master().await?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                AnyConn::Master(
                    master
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
        };
        *lock(&self.held) = Some(made.clone());
        Ok(made)
    }

    /// The master Sentinel names now.
    async fn master(&self) -> redis::RedisResult<Client> {
        let Mode::Sentinel { sentinels, master } = &self.mode else {
            unreachable!("only in sentinel mode")
        };
        let named = sentinels.lock().await.async_get_client().await?;
        *lock(master) = Some(named.clone());
        Ok(named)
    }

    /// A call failed: the next one connects again (and, with Sentinel, asks for the
    /// master again: after a failover it is another server).
    pub fn failed(&self) {
        lock(&self.held).take();
    }

    /// Where to subscribe to the pause announcements, in order of preference. A cluster
    /// passes every message published on any node to every node.
    pub async fn subscribe_to(&self) -> Vec<Client> {
        match &self.mode {
            Mode::Single { client, .. } => vec![client.clone()],
            Mode::Cluster { seeds, .. } => seeds.clone(),
            // Asked afresh: a subscription is (re)made after a failure, maybe a failover.
            Mode::Sentinel { master, .. } => match self.master().await {
                Ok(m) => vec![m],
                Err(_) => lock(master).clone().into_iter().collect(),
            },
        }
    }
}
