//! The coalescing line: identical GETs in flight share one upstream call.
//!
//! The first request for a key leads: it holds the key's [`Flight`] and makes the call.
//! Later ones follow: they wait on the flight for its [`Outcome`], each within its own
//! deadline. A flight ends in one of these states, as a cache lock does:
//! - `Answer`: the leader's answer, whole, shared with every follower;
//! - `Failed`: a final error (after the leader's retries), shared too;
//! - `TooBig`: the answer was over `cache.max_entry_bytes`; followers go upstream
//!   themselves, and for [`TOO_BIG_FOR`] the key has no line at all;
//! - `Gone`: the leader went away without an outcome (it gave up waiting for quota, it
//!   was refused, it was cancelled); a follower takes over and leads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::entry::Stored;
use super::key::CacheKey;
use super::shared_error::SharedError;

/// How long a key whose answer was too big to share goes without a line.
pub const TOO_BIG_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub enum Outcome {
    Pending,
    Answer(Arc<Stored>),
    Failed(Arc<SharedError>),
    TooBig,
    Gone,
}

#[derive(Debug, Default)]
pub struct Flights {
    line: Mutex<Line>,
}

#[derive(Debug, Default)]
struct Line {
    flying: HashMap<CacheKey, Flight>,
    /// The id the next flight gets.
    next: u64,
    /// Keys whose answers were too big, until when.
    too_big: HashMap<CacheKey, Instant>,
}

/// A key's flight in the line. Its channel is made for its first follower: most flights
/// have none, and a channel costs a few hundred bytes while the leader waits for quota.
#[derive(Debug)]
struct Flight {
    id: u64,
    tx: Option<watch::Sender<Outcome>>,
}

impl Flight {
    fn followed(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.receiver_count() > 0)
    }
}

/// What a request is in the line.
#[derive(Debug)]
pub enum Role {
    Leader(Lead),
    Follower(watch::Receiver<Outcome>),
    /// No line for this key now (its answers are too big to share).
    Alone,
}

impl Flights {
    pub fn join(self: &Arc<Self>, key: &CacheKey) -> Role {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = line.too_big.get(key) {
            if *until > Instant::now() {
                return Role::Alone;
            }
            line.too_big.remove(key);
        }
        if let Some(flight) = line.flying.get_mut(key) {
            let tx = flight
                .tx
                .get_or_insert_with(|| watch::channel(Outcome::Pending).0);
            return Role::Follower(tx.subscribe());
        }
        let id = line.next;
        line.next += 1;
        line.flying.insert(key.clone(), Flight { id, tx: None });
        Role::Leader(Lead {
            flights: self.clone(),
            key: key.clone(),
            id,
            done: false,
        })
    }

    /// Requests in flight as leaders (for the status).
    pub fn len(&self) -> usize {
        self.line
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flying
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes flight `id` of `key` out of the line; its channel, if it has followers to
    /// tell.
    fn end(&self, key: &CacheKey, id: u64, too_big: bool) -> Option<watch::Sender<Outcome>> {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        let tx = match line.flying.get(key) {
            Some(flight) if flight.id == id => line.flying.remove(key).and_then(|f| f.tx),
            _ => None,
        };
        if too_big {
            let now = Instant::now();
            line.too_big.retain(|_, until| *until > now);
            line.too_big.insert(key.clone(), now + TOO_BIG_FOR);
        }
        tx
    }

    /// Whether flight `id` of `key` is still in the line with someone following it.
    fn followed(&self, key: &CacheKey, id: u64) -> bool {
        let line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        line.flying
            .get(key)
            .is_some_and(|f| f.id == id && f.followed())
    }
}

/// The leader's hold on a key's flight. Dropped without [`Lead::finish`], it ends the
/// flight `Gone`.
#[derive(Debug)]
pub struct Lead {
    flights: Arc<Flights>,
    key: CacheKey,
    id: u64,
    done: bool,
}

impl Lead {
    /// Whether anyone waits for this flight's outcome.
    pub fn followed(&self) -> bool {
        self.flights.followed(&self.key, self.id)
    }

    /// A handle that tells, later, whether anyone follows.
    pub fn watcher(&self) -> Watcher {
        Watcher {
            flights: self.flights.clone(),
            key: self.key.clone(),
            id: self.id,
        }
    }

    /// Ends the line for this key if nobody follows, so that nobody will: the answer
    /// may then stream to the leader alone. Decided under the line's lock, which
    /// followers join under.
    pub fn close_if_alone(&mut self) -> bool {
        let mut line = self.flights.line.lock().unwrap_or_else(|e| e.into_inner());
        match line.flying.get(&self.key) {
            Some(flight) if flight.id == self.id => {
                if flight.followed() {
                    return false;
                }
                line.flying.remove(&self.key);
            }
            _ => {}
        }
        self.done = true;
        true
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        let too_big = matches!(outcome, Outcome::TooBig);
        // The key leaves the line first: a request arriving after the outcome leads anew
        // (or finds the stored answer), never follows a finished flight.
        if let Some(tx) = self.flights.end(&self.key, self.id, too_big) {
            tx.send_replace(outcome);
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.end(Outcome::Gone);
    }
}

#[derive(Debug)]
pub struct Watcher {
    flights: Arc<Flights>,
    key: CacheKey,
    id: u64,
}

impl Watcher {
    pub fn followed(&self) -> bool {
        self.flights.followed(&self.key, self.id)
    }
}

/// A follower's wait for the outcome, until its deadline (`None`: it passed).
pub async fn follow(
    mut rx: watch::Receiver<Outcome>,
    deadline: tokio::time::Instant,
) -> Option<Outcome> {
    let waited = tokio::time::timeout_at(deadline, rx.wait_for(|o| !matches!(o, Outcome::Pending)));
    match waited.await {
        Ok(Ok(outcome)) => Some(outcome.clone()),
        // The sender went without a word: as if the leader went away.
        Ok(Err(_)) => Some(Outcome::Gone),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> CacheKey {
        CacheKey::new("default", p, None)
    }

    #[tokio::test]
    async fn followers_get_the_leaders_outcome_and_later_requests_lead_again() {
        let flights = Arc::new(Flights::default());
        let Role::Leader(lead) = flights.join(&key("/a")) else {
            panic!()
        };
        let Role::Follower(rx) = flights.join(&key("/a")) else {
            panic!()
        };
        assert!(matches!(flights.join(&key("/b")), Role::Leader(_)));
        assert!(lead.followed());
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        let waiting = tokio::spawn(follow(rx, far));
        lead.finish(Outcome::TooBig);
        assert!(matches!(waiting.await.unwrap(), Some(Outcome::TooBig)));
        assert!(matches!(flights.join(&key("/a")), Role::Alone));
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_hands_over() {
        let flights = Arc::new(Flights::default());
        let Role::Leader(lead) = flights.join(&key("/a")) else {
            panic!()
        };
        let Role::Follower(rx) = flights.join(&key("/a")) else {
            panic!()
        };
        drop(lead);
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        assert!(matches!(follow(rx, far).await, Some(Outcome::Gone)));
        assert!(matches!(flights.join(&key("/a")), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_follower_keeps_its_own_deadline() {
        let flights = Arc::new(Flights::default());
        let Role::Leader(_lead) = flights.join(&key("/a")) else {
            panic!()
        };
        let Role::Follower(rx) = flights.join(&key("/a")) else {
            panic!()
        };
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(follow(rx, soon).await.is_none());
    }

    #[tokio::test]
    async fn a_lonely_leader_closes_its_line() {
        let flights = Arc::new(Flights::default());
        let Role::Leader(mut lead) = flights.join(&key("/a")) else {
            panic!()
        };
        assert!(lead.close_if_alone());
        assert!(matches!(flights.join(&key("/a")), Role::Leader(_)));
        let Role::Leader(mut other) = flights.join(&key("/c")) else {
            panic!()
        };
        let _rx = flights.join(&key("/c"));
        assert!(!other.close_if_alone());
    }
}
