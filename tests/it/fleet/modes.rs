//! Redis Cluster and Sentinel for real: a 3-master cluster and a master + replica +
//! sentinel, started by the test on free ports.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::Value;
use smartlead_proxy::config::{AccountSettings, RedisMode};
use smartlead_proxy::key::ApiKey;
use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::*;

const KEY_B: &str = "key-of-b";

/// `redis-cli` against 127.0.0.1:`port`; its output, trimmed.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (.ci/run installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Redis servers started here, killed (and their files removed) on drop.
struct Servers {
    children: Vec<(u16, Child)>,
    dir: std::path::PathBuf,
}

impl Servers {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "slp-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            children: Vec::new(),
            dir,
        }
    }

    /// Starts a server on `port`; false if it exits instead (the port was taken after
    /// it was picked), so the caller can pick another.
    async fn try_start(&mut self, port: u16, args: &[&str]) -> bool {
        let dir = self.dir.to_str().unwrap().to_owned();
        let mut child = spawn_redis(args, port, &["--dir", &dir]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while cli(port, &["ping"]) != "PONG" {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "waited 20 s for redis-server on {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.children.push((port, child));
        true
    }

    /// A server on a free port (both picked again if one was taken meanwhile), with the
    /// arguments `args` makes of a second free port: its port.
    async fn start(&mut self, args: impl Fn(u16) -> Vec<String>) -> u16 {
        for _ in 0..5 {
            let (port, spare) = (closed_port().await, closed_port().await);
            let args = args(spare);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if self.try_start(port, &args).await {
                return port;
            }
        }
        panic!("no redis-server would start on a free port");
    }

    fn kill(&mut self, port: u16) {
        if let Some(at) = self.children.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.children.remove(at);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

async fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "waited 20 s for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster of three masters (no replicas); the nodes' ports.
async fn cluster(servers: &mut Servers) -> Vec<u16> {
    let mut ports = Vec::new();
    for n in 0..3 {
        let conf = format!("nodes-{n}.conf");
        let port = servers
            .start(|bus| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    "2000",
                ]
                .map(str::to_owned)
                .to_vec()
            })
            .await;
        ports.push(port);
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&nodes)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for p in &ports {
        wait_for(
            || cli(*p, &["cluster", "info"]).contains("cluster_state:ok"),
            "cluster_state:ok",
        )
        .await;
    }
    ports
}

fn slot_of(port: u16, key: &str) -> u16 {
    cli(port, &["cluster", "keyslot", key]).parse().unwrap()
}

/// The node (port) serving `slot`.
fn owner(ports: &[u16], slot: u16) -> u16 {
    let slots = cli(ports[0], &["cluster", "slots"]);
    // redis-cli prints each range as: start, end, then the master's ip, port, id, ...
    let lines: Vec<&str> = slots.lines().map(str::trim).collect();
    let mut i = 0;
    while i + 3 < lines.len() {
        let (start, end) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>());
        if let (Ok(start), Ok(end)) = (start, end)
            && (start..=end).contains(&slot)
        {
            return lines[i + 3].parse().unwrap();
        }
        i += 1;
    }
    panic!("no owner for slot {slot}: {slots}");
}

/// Moves `slot` (and its keys) from node `from` to node `to`, as a resharding does.
fn move_slot(ports: &[u16], slot: u16, from: u16, to: u16) {
    let (from_id, to_id) = (
        cli(from, &["cluster", "myid"]),
        cli(to, &["cluster", "myid"]),
    );
    let s = slot.to_string();
    cli(to, &["cluster", "setslot", &s, "importing", &from_id]);
    cli(from, &["cluster", "setslot", &s, "migrating", &to_id]);
    let keys = cli(from, &["cluster", "getkeysinslot", &s, "1000"]);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        cli(
            from,
            &["migrate", "127.0.0.1", &to.to_string(), key, "0", "5000"],
        );
    }
    for p in ports {
        cli(*p, &["cluster", "setslot", &s, "node", &to_id]);
    }
}

async fn limiter_state(proxy: &Proxy) -> String {
    let ready: Value = proxy.get_json("/readyz").await;
    ready["limiter"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_cluster_shares_one_quota_keeps_accounts_in_their_slots_and_follows_a_resharding() {
    let mut servers = Servers::new("cluster");
    let ports = cluster(&mut servers).await;
    let period = Duration::from_secs(2);
    let sim = Sim::start(SimConfig {
        requests: 4,
        period,
        more_keys: vec![KEY_B.into()],
        record: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = unique_key();
    let mut proxies = Vec::new();
    // Each proxy knows a different seed node.
    for seed in &ports[..2] {
        let url = format!("redis://127.0.0.1:{seed}");
        let mut s = quota_settings(&sim.base_url(), 4, period, Some((&url, &key)));
        s.redis.mode = RedisMode::Cluster;
        s.redis.url = SecretString::from(format!("{url},redis://127.0.0.1:{}", ports[2]));
        s.accounts.push(AccountSettings {
            name: "b".into(),
            key_env: "KEY_B".into(),
            windows: None,
            tokens: vec![],
            key: Some(ApiKey::new(KEY_B)),
        });
        proxies.push(spawn_proxy(s).await);
    }
    let started = Instant::now();
    let (a, b) = tokio::join!(
        campaigns_at_once(&proxies[0], 4),
        campaigns_at_once(&proxies[1], 4)
    );
    assert!(a.iter().chain(&b).all(|s| *s == 200), "{a:?} {b:?}");
    assert!(
        started.elapsed() >= period,
        "8 requests at 4 per 2 s: one quota"
    );
    assert_eq!(sim.stats().rate_limited, 0);
    for p in &proxies {
        assert_eq!(limiter_state(p).await, "shared");
    }

    // The account's keys all live in one hash slot, on the node that owns it.
    let log = format!("{{{key}:default}}:log");
    let slot = slot_of(ports[0], &log);
    assert_eq!(slot, slot_of(ports[0], &format!("{{{key}:default}}:pause")));
    let from = owner(&ports, slot);
    assert_eq!(
        cli(from, &["exists", &log]),
        "1",
        "{log} on its slot's node"
    );
    // Another account: its own slot (almost surely another), on the node that owns it.
    let b = proxies[0]
        .get_with("/api/v1/campaigns", &[("x-smartlead-account", "b")])
        .await;
    assert_eq!(b.status(), 200);
    let b_log = format!("{{{key}:b}}:log");
    let b_slot = slot_of(ports[0], &b_log);
    assert_ne!(b_slot, slot, "each account in its own slot");
    assert_eq!(cli(owner(&ports, b_slot), &["exists", &b_log]), "1");

    // Reshard that slot to another node: the next decisions meet MOVED and follow it.
    let to = *ports.iter().find(|p| **p != from).unwrap();
    move_slot(&ports, slot, from, to);
    assert_eq!(owner(&ports, slot), to);
    let before = sim.stats().requests;
    let (a, b) = tokio::join!(
        campaigns_at_once(&proxies[0], 4),
        campaigns_at_once(&proxies[1], 4)
    );
    assert!(a.iter().chain(&b).all(|s| *s == 200), "{a:?} {b:?}");
    assert_eq!(sim.stats().requests - before, 8);
    assert_eq!(
        sim.stats().rate_limited,
        0,
        "still one quota after the move"
    );
    for p in &proxies {
        assert_eq!(
            limiter_state(p).await,
            "shared",
            "no fallback: MOVED was followed"
        );
    }
    assert_eq!(
        cli(to, &["exists", &log]),
        "1",
        "the log lives on the new owner"
    );
    // So does the fleet's line (its waiters queued above, over both instances).
    for part in ["leases", "epoch"] {
        let k = format!("{{{key}:default}}:{part}");
        assert_eq!(slot_of(to, &k), slot, "{k}");
        assert_eq!(cli(to, &["exists", &k]), "1", "{k} on the new owner");
    }
    // The fleet's leases (and each lease's hash) share the `{key}` slot.
    let fleet: serde_json::Value = proxies[0].get("/status.json").await.json().await.unwrap();
    let fleet = fleet["fleet"].as_array().expect("the fleet on a cluster");
    assert_eq!(fleet.len(), 2, "{fleet:?}");
    assert!(
        fleet
            .iter()
            .all(|i| i["lease_age_seconds"].as_f64().unwrap() < 3.0),
        "{fleet:?}"
    );
    for p in proxies {
        p.stop().await;
    }
}

#[tokio::test]
async fn sentinel_failover_is_followed_back_to_the_shared_limiter() {
    let mut servers = Servers::new("sentinel");
    let master = servers.start(|_| Vec::new()).await;
    let replica = servers
        .start(|_| {
            ["--replicaof", "127.0.0.1", &master.to_string()]
                .map(str::to_owned)
                .to_vec()
        })
        .await;
    wait_for(
        || cli(replica, &["info", "replication"]).contains("master_link_status:up"),
        "the replica to sync",
    )
    .await;
    let conf = servers.dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "sentinel monitor mymaster 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n"
        ),
    )
    .unwrap();
    let sentinel = servers
        .start(|_| {
            [conf.to_str().unwrap(), "--sentinel"]
                .map(str::to_owned)
                .to_vec()
        })
        .await;
    wait_for(
        || cli(sentinel, &["sentinel", "replicas", "mymaster"]).contains(&replica.to_string()),
        "the sentinel to find the replica",
    )
    .await;

    let sim = Sim::start(SimConfig {
        requests: 10_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = unique_key();
    let url = format!("redis://127.0.0.1:{sentinel}");
    let mut s = quota_settings(
        &sim.base_url(),
        100,
        Duration::from_secs(1),
        Some((&url, &key)),
    );
    s.redis.mode = RedisMode::Sentinel;
    s.redis.master_name = "mymaster".into();
    let proxy = spawn_proxy(s).await;
    assert!(campaigns_at_once(&proxy, 5).await.iter().all(|s| *s == 200));
    assert_eq!(limiter_state(&proxy).await, "shared");
    let log = format!("{{{key}:default}}:log");
    assert_eq!(cli(master, &["exists", &log]), "1");

    servers.kill(master);
    // Every request is answered meanwhile (on the local share).
    let failed_over = Instant::now();
    let mut back = false;
    while failed_over.elapsed() < Duration::from_secs(20) {
        assert!(
            campaigns_at_once(&proxy, 2).await.iter().all(|s| *s == 200),
            "answered during the failover"
        );
        if cli(replica, &["role"]).starts_with("master") && limiter_state(&proxy).await == "shared"
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        back,
        "back on the shared limiter within 20 s of the master's death"
    );
    assert!(campaigns_at_once(&proxy, 3).await.iter().all(|s| *s == 200));
    assert_eq!(
        cli(replica, &["exists", &log]),
        "1",
        "decisions go to the promoted replica"
    );
    proxy.stop().await;
}
