//! A reload under the fleet's line: looser windows let waiting requests go sooner.

use crate::reload::*;
use crate::support::*;

#[tokio::test]
async fn looser_windows_let_waiting_requests_go_sooner_on_redis() {
    looser_windows(Some(unique_key())).await;
}
