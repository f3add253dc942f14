//! How a request was served: what the access log, the metrics and the envelope's details
//! say about its way through the quota and the upstream.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::client::ClientId;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    /// The account it used, by name (never a key).
    pub account: Option<Arc<str>>,
    /// The client it came from, once known.
    pub client: Option<ClientId>,
    /// Upstream attempts made (retries included).
    pub attempts: u32,
    /// The answer's status came from SmartLead (not from the proxy itself).
    pub upstream: bool,
    /// Time spent waiting for quota slots.
    pub waited: Duration,
    /// Time spent in upstream attempts.
    pub upstream_time: Duration,
    /// The status of the last upstream answer, if any came.
    pub last_status: Option<StatusCode>,
    /// A retry was wanted but the retry budget had none left.
    pub budget_exhausted: bool,
}

impl Served {
    /// Adds another exchange of the same request (an auto-batched import's batches).
    pub fn add(&mut self, other: Served) {
        self.account = other.account.or(self.account.take());
        self.client = other.client.or(self.client.take());
        self.attempts += other.attempts;
        self.waited += other.waited;
        self.upstream_time += other.upstream_time;
        self.last_status = other.last_status.or(self.last_status);
        self.budget_exhausted |= other.budget_exhausted;
    }
}
