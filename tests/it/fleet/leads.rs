//! Instances sharing Redis follow SmartLead's own lower limit together.

use crate::leads::*;

#[tokio::test]
async fn proxies_sharing_redis_follow_the_upstream_limit_together() {
    let (ok, limited, late) = converge(true, 2).await;
    assert_eq!(ok, 24, "every request succeeded");
    assert!(limited <= 8, "{limited} upstream 429s");
    assert_eq!(late, 0, "no 429s once the limit was learnt");
}
