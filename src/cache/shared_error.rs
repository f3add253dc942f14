//! The errors a flight may share: final ones, which any follower would have met too
//! after the same retries. Errors about the leader itself (its deadline, its cap, its
//! place in the queue, shutting down) are not shared: a follower takes over.

use std::time::Duration;

use crate::error::{Failed, ProxyError};

#[derive(Debug, Clone)]
pub enum SharedError {
    Upstream(Failed),
    Unreachable(String),
    Invalid(String),
    Timeout(Duration),
}

impl SharedError {
    pub fn of(error: &ProxyError) -> Option<Self> {
        Some(match error {
            ProxyError::Upstream(f) => SharedError::Upstream(Failed::clone(f)),
            ProxyError::UpstreamUnreachable(why) => SharedError::Unreachable(why.clone()),
            ProxyError::UpstreamInvalid(why) => SharedError::Invalid(why.clone()),
            ProxyError::UpstreamTimeout(after) => SharedError::Timeout(*after),
            _ => return None,
        })
    }

    pub fn error(&self) -> ProxyError {
        match self {
            SharedError::Upstream(f) => ProxyError::Upstream(Box::new(f.clone())),
            SharedError::Unreachable(why) => ProxyError::UpstreamUnreachable(why.clone()),
            SharedError::Invalid(why) => ProxyError::UpstreamInvalid(why.clone()),
            SharedError::Timeout(after) => ProxyError::UpstreamTimeout(*after),
        }
    }
}

/// SmartLead failing, as `cache.stale_if_error` means it: a 5xx after retries, no
/// answer, a timeout, or a quota wait that would pass the request's deadline.
pub fn is_failing(error: &ProxyError) -> bool {
    use crate::limiter::Limited;
    match error {
        ProxyError::Upstream(f) => f.status.is_server_error(),
        ProxyError::UpstreamUnreachable(_)
        | ProxyError::UpstreamInvalid(_)
        | ProxyError::UpstreamTimeout(_) => true,
        ProxyError::RateLimited(r) => {
            matches!(r.why, Limited::PastDeadline | Limited::PausedPastDeadline)
        }
        _ => false,
    }
}
