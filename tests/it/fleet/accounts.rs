//! Several accounts and client-key quotas, each shared by instances on one Redis.

use std::time::Duration;

use secrecy::SecretString;
use smartlead_proxy::config::LimitBackend;
use tokio::time::Instant;

use crate::accounts::*;
use crate::support::*;

#[tokio::test]
async fn client_keys_get_quotas_of_their_own_on_redis() {
    client_keys_get_quotas_of_their_own(true).await;
}

#[tokio::test]
async fn two_proxies_on_redis_share_each_accounts_quota() {
    let w = [(4, Duration::from_secs(2))];
    let sim = two_key_sim(&w).await;
    let key = unique_key();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let mut s = two_accounts(&sim.base_url(), &w, &[]);
        s.limit.backend = LimitBackend::Redis;
        s.redis.url = SecretString::from(SHARED_REDIS);
        s.redis.key = key.clone();
        proxies.push(spawn_proxy(s).await);
    }
    let started = Instant::now();
    let (a1, a2, b1, b2) = tokio::join!(
        burst(&proxies[0], "/api/v1/campaigns", 4, &[]),
        burst(&proxies[1], "/api/v1/campaigns", 4, &[]),
        burst(
            &proxies[0],
            "/api/v1/campaigns",
            4,
            &[("x-smartlead-account", "b")]
        ),
        burst(
            &proxies[1],
            "/api/v1/campaigns",
            4,
            &[("x-smartlead-account", "b")]
        ),
    );
    let took = started.elapsed();
    for s in [a1, a2, b1, b2].concat() {
        assert_eq!(s, 200);
    }
    assert_eq!(
        sim.stats().rate_limited,
        0,
        "each account's quota was shared"
    );
    // Per key, no window of 2 s (less the margin the proxies keep) ever saw more than 4.
    for key in [KEY_A, KEY_B] {
        let starts: Vec<u64> = sim
            .requests()
            .iter()
            .filter(|r| r.api_keys() == [key])
            .map(|r| r.at.duration_since(started).as_micros() as u64)
            .collect();
        assert_eq!(starts.len(), 8);
        let most = smartlead_proxy::limiter::log::max_in_window(&starts, 2_000_000);
        assert!(most <= 4, "{key}: {most} in one window");
    }
    assert!(
        took >= Duration::from_secs(2),
        "one quota per account: {took:?}"
    );
    for p in proxies {
        p.stop().await;
    }
}
