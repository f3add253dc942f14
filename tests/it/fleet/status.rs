//! The status page and the `status` command show the fleet.

use std::time::Duration;

use smartlead_proxy::sim::{Sim, SimConfig};

use crate::status::*;
use crate::support::*;

/// With Redis, the page (as a browser renders it, and as served) and the `status`
/// command show the fleet: every instance with a live lease, and who waits over it.
#[tokio::test]
async fn the_page_and_the_command_show_the_fleet() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let key = unique_key();
    let settings = || {
        let mut s = quota_settings(
            &sim.base_url(),
            100,
            Duration::from_secs(60),
            Some((SHARED_REDIS, key.as_str())),
        );
        s.redis.lease = Duration::from_millis(600);
        s
    };
    let (a, b) = (spawn_proxy(settings()).await, spawn_proxy(settings()).await);
    // Both leases renewed at least once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let html = a.get("/status").await.text().await.unwrap();
    assert_eq!(instances(&html), 2, "{html}");
    assert!(
        html.contains("(this one)") && html.contains("waiting over the fleet"),
        "{html}"
    );
    let url = a.url("/status");
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert!(dom.contains("data-refreshed="), "the script ran: {dom}");
    assert_eq!(instances(&dom), 2, "{dom}");
    let out = status_command(&a).await;
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("fleet") && shown.contains("(this one)"),
        "{shown}"
    );
    a.stop().await;
    b.stop().await;
}
