//! The reload tests that need Redis.

use crate::support::*;

#[allow(unused_imports)]
use crate::reload::*;

#[tokio::test]
async fn looser_windows_let_waiting_requests_go_sooner_on_redis() {
    looser_windows(Some(unique_key())).await;
}
