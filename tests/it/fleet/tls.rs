//! Two proxies share one quota over `rediss://` with the test's CA.

use std::time::Duration;

use smartlead_proxy::sim::{Sim, SimConfig};

use crate::support::*;

#[tokio::test]
async fn two_proxies_share_one_quota_over_rediss_with_its_ca() {
    let ca = TestCa::new();
    let redis = PrivateRedis::start_tls(&ca).await;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let period = Duration::from_secs(2);
    let sim = Sim::start(SimConfig {
        requests: 4,
        period,
        record: true,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let key = unique_key();
    let mut proxies = Vec::new();
    for _ in 0..2 {
        let mut s = quota_settings(&sim.base_url(), 4, period, Some((&url, &key)));
        s.redis.ca_file = Some(ca.ca.clone());
        proxies.push(spawn_proxy(s).await);
    }
    for p in &proxies {
        let ready: serde_json::Value = p.get_json("/readyz").await;
        assert_eq!(ready["limiter"]["state"], "shared", "{ready}");
    }
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(
        campaigns_at_once(&proxies[0], 4),
        campaigns_at_once(&proxies[1], 4)
    );
    for s in a.into_iter().chain(b) {
        assert_eq!(s, 200);
    }
    assert_eq!(sim.stats().rate_limited, 0, "one quota, shared over TLS");
    assert!(max_in_window(&sim, period, None) <= 4);
    assert!(started.elapsed() >= period, "8 requests at 4 per 2 s");

    // The same server without its CA: the certificate is not trusted, so the proxy
    // falls back to its local share and says why.
    let mut s = quota_settings(&sim.base_url(), 4, period, Some((&url, &key)));
    s.redis.on_error = smartlead_proxy::config::OnRedisError::Local;
    let untrusting = spawn_proxy(s).await;
    // Answered either way (by SmartLead's own 429 here: a fallback instance assumes it is
    // alone, and the shared window is full).
    untrusting.get("/api/v1/campaigns").await;
    let ready: serde_json::Value = untrusting.get_json("/readyz").await;
    assert_eq!(ready["limiter"]["state"], "fallback", "{ready}");
    assert!(ready.to_string().contains("certificate"), "{ready}");
    for p in proxies.into_iter().chain([untrusting]) {
        p.stop().await;
    }
}
