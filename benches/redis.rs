//! Redis limiter decisions per second per instance, against raw Redis round trips (PING
//! over the same kind of connection, same concurrency) measured in the same run; and the
//! same with the callers spread over 20 accounts (each its own log in Redis).
//!
//! `cargo bench --bench redis` (needs Redis on 127.0.0.1:6379).

// The proxy's allocator, so the client side costs what it does in the proxy.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use smartlead_proxy::Settings;
use smartlead_proxy::accounts::{Account, Accounts};
use smartlead_proxy::config::{AccountSettings, LimitBackend};
use smartlead_proxy::key::ApiKey;
use tokio::time::Instant;

const CONCURRENCY: usize = 64;
const RUN: Duration = Duration::from_secs(5);

async fn rate<F, Fut>(op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + RUN;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (op, done) = (op.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    if op().await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64()
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("redis bench: skipped (run it with `cargo bench --bench redis`)");
        return;
    }
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("Redis on 127.0.0.1:6379");
    let ping = rate(move || {
        let mut c = conn.clone();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        }
    })
    .await;

    let one = accounts(1, NEVER_BINDS);
    let one_rate = decisions(one.clone()).await;
    let twenty = accounts(20, NEVER_BINDS);
    let twenty_rate = decisions(twenty.clone()).await;
    // Every request waits in the fleet's line and is granted when its slot is due.
    let queued_rate = decisions(accounts(1, QUEUED_QUOTA)).await;
    println!(
        "{CONCURRENCY} concurrent callers, {}s each, one connection to local Redis",
        RUN.as_secs()
    );
    println!("raw PING round trips:           {ping:>10.0} /s");
    println!("limiter decisions, 1 account:   {one_rate:>10.0} /s");
    println!("limiter decisions, 20 accounts: {twenty_rate:>10.0} /s");
    println!(
        "queued path, quota {}/100ms:    {queued_rate:>10.0} /s ({:.0}% of the quota)",
        QUEUED_QUOTA / 10,
        100.0 * queued_rate / QUEUED_QUOTA as f64
    );
    println!("ratio decisions/PING:           {:>10.2}", one_rate / ping);
    println!(
        "ratio queued decisions/PING:    {:>10.2}",
        queued_rate / ping
    );
    println!(
        "ratio 20 accounts/1 account:    {:>10.2}",
        twenty_rate / one_rate
    );
    println!(
        "limiter state after run:        {:?}",
        one[0].limiter.status().state
    );
}

/// A quota no run reaches: every decision takes the fast path.
const NEVER_BINDS: u32 = 4_000_000_000;
/// Per second, as one window of a tenth of it per 100 ms: 64 callers always wait.
const QUEUED_QUOTA: u32 = 2_000;

/// `n` accounts (`default` and `n - 1` more) on Redis, each with `per_second`.
fn accounts(n: usize, per_second: u32) -> Vec<Arc<Account>> {
    let mut s = Settings::default();
    s.upstream.api_key = Some(ApiKey::new("k"));
    s.limit.backend = LimitBackend::Redis;
    if per_second == NEVER_BINDS {
        s.limit.one_window(per_second, Duration::from_secs(1));
    } else {
        s.limit
            .one_window(per_second / 10, Duration::from_millis(100));
        s.limit.margin = Duration::ZERO;
    }
    s.limit.max_queue = 1_000_000;
    s.redis.key = format!("bench-{}", uuid::Uuid::new_v4());
    for i in 1..n {
        s.accounts.push(AccountSettings {
            name: format!("account-{i}"),
            key_env: format!("KEY_{i}"),
            windows: None,
            tokens: Vec::new(),
            key: Some(ApiKey::new(format!("key-{i}"))),
        });
    }
    Accounts::new(&s).unwrap().all()
}

/// Decisions per second with the callers spread over `accounts`.
async fn decisions(accounts: Vec<Arc<Account>>) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    rate(move || {
        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
        let account = accounts[i % accounts.len()].clone();
        async move {
            account
                .limiter
                .acquire(Instant::now() + Duration::from_secs(1), &Default::default())
                .await
                .is_ok()
        }
    })
    .await
}
