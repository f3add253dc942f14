//! This instance's side of an account's fleet line (`limit.backend = "redis"`).
//!
//! A request that cannot start at once is registered in Redis and waits there, in the
//! fair order of every instance's waiters (`lua/fleet_step.lua`), until a step run by any
//! instance grants it the slot that is due or refuses it; the decision comes back in this
//! instance's list and is handed to the waiting request here. Nothing is reserved ahead:
//! the slot is chosen when it is due.
//!
//! This module is the bookkeeping only: what the next step sends (newcomers, leavers,
//! slots to give back) and what each decision means for a waiter. The round trips are
//! made by the account's driver in [`super::redis`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::fair::{Priority, Who};
use super::{Limited, Refusal};

/// One virtual-time unit: a client of weight w advances by `TURN / w` per request.
pub const TURN: u64 = 1 << 20;
/// Most newcomers one step registers.
pub const MOST_PER_STEP: usize = 256;
/// How long past its deadline a waiter whose grant may be on its way waits for it.
const LATE: Duration = Duration::from_millis(10);
/// How long a waiter past its deadline waits for the answer to its leaving.
const LEAVING: Duration = Duration::from_secs(1);

/// How a wait in the fleet line ended.
#[derive(Debug, PartialEq)]
pub enum Joined {
    /// Its slot: it starts now.
    Go,
    Refused(Refusal),
    /// Redis went away meanwhile: the request waits in this process's own line.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Not yet sent.
    New,
    /// Sent before, to be registered again (this instance's lease had run out, or the
    /// log was lost).
    Rejoin,
    /// Registered.
    Sent,
    /// To be taken out of the line; `go`: past its deadline, it still goes if its grant
    /// is on its way.
    Leaving { go: bool },
}

struct Waiter {
    client: String,
    class: u8,
    step: u64,
    deadline: Instant,
    state: State,
    /// `None` once nobody waits for the answer (its caller went away, or Redis did).
    answer: Option<oneshot::Sender<Joined>>,
}

#[derive(Default)]
struct Book {
    /// By id: ids grow, so this is the order they arrived in.
    waiters: BTreeMap<u64, Waiter>,
    /// Granted slots nobody took: out of the log again.
    give_back: Vec<u64>,
}

/// One newcomer as the step script takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    pub id: u64,
    pub client: String,
    /// 1 high, 2 normal, 3 low.
    pub class: u8,
    pub step: u64,
    pub deadline: Instant,
    /// Registered before: its old entry goes first.
    pub rejoin: bool,
}

/// What one step sends.
#[derive(Debug, Default)]
pub struct Round {
    pub joins: Vec<Join>,
    /// Past their deadline: they leave unless granted already.
    pub leave_go: Vec<u64>,
    /// Their callers went away: out, slots back.
    pub leave_back: Vec<u64>,
    /// Slots granted that nobody took (or taken too late): back to the log.
    pub give_back: Vec<u64>,
    /// Some waiter was registered before this step (a lapsed lease means re-registering).
    pub registered: bool,
    /// Every deadline is to be checked again (a pause, new windows).
    pub walk: bool,
}

/// A decision of the step script for one of this instance's waiters.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Granted(u64),
    /// Granted, but the grant waited in this instance's list longer than a slot may
    /// start late (the instance was stopped): the slot goes back and the waiter joins
    /// again.
    Late(u64),
    Refused {
        id: u64,
        retry_after: Duration,
        paused: bool,
        window: Option<usize>,
    },
}

impl Decision {
    /// `g <id> [<granted at, µs>]`, or `r|p <id> <retry µs> <window, 1-based, 0 none>`;
    /// a grant made more than `late` before `now` (both Redis time, µs) is `Late`.
    pub fn parse(text: &str, now: f64, late: Duration) -> Option<Self> {
        let mut parts = text.split(' ');
        let kind = parts.next()?;
        let id = parts.next()?.parse().ok()?;
        if kind == "g" {
            let at: Option<f64> = parts.next().and_then(|a| a.parse().ok());
            if at.is_some_and(|at| now - at > late.as_micros() as f64) {
                return Some(Decision::Late(id));
            }
            return Some(Decision::Granted(id));
        }
        let retry: f64 = parts.next()?.parse().ok()?;
        let window: usize = parts.next()?.parse().ok()?;
        Some(Decision::Refused {
            id,
            retry_after: Duration::from_micros(retry.max(0.0) as u64),
            paused: kind == "p",
            window: window.checked_sub(1),
        })
    }
}

/// The script's number for a priority class.
fn class_of(p: Priority) -> u8 {
    match p {
        Priority::High => 1,
        Priority::Normal => 2,
        Priority::Low => 3,
    }
}

/// This instance's waiters in one account's fleet line.
#[derive(Default)]
pub struct FleetLine {
    book: Mutex<Book>,
    /// Wakes the account's driver.
    pub kick: std::sync::Arc<Notify>,
    walk: AtomicBool,
}

impl FleetLine {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits in the fleet's line until granted (`Go`), refused, or until Redis goes away
    /// (`Local`). Dropped before its answer, it leaves the line (and a slot granted to it
    /// goes back).
    pub async fn wait(&self, id: u64, who: &Who, deadline: Instant, spacing: Duration) -> Joined {
        let (tx, rx) = oneshot::channel();
        self.book().waiters.insert(
            id,
            Waiter {
                client: who.client.to_string(),
                class: class_of(who.priority),
                step: (TURN / u64::from(who.weight.max(1))).max(1),
                deadline,
                state: State::New,
                answer: Some(tx),
            },
        );
        self.kick.notify_one();
        let mut seat = Seat {
            line: self,
            id,
            rx,
            done: false,
        };
        let late = Joined::Refused(Refusal::RateLimited {
            retry_after: spacing,
            why: Limited::PastDeadline,
            window: None,
        });
        tokio::select! {
            answer = &mut seat.rx => {
                seat.done = true;
                return answer.unwrap_or(Joined::Local);
            }
            _ = tokio::time::sleep_until(deadline + LATE) => {}
        }
        if self.leave_late(id) {
            seat.done = true;
            return late;
        }
        self.kick.notify_one();
        match tokio::time::timeout(LEAVING, &mut seat.rx).await {
            Ok(Ok(answer)) => {
                seat.done = true;
                answer
            }
            _ => late,
        }
    }

    /// Past its deadline: `true` when it was never sent (it is gone now); else it is
    /// marked to leave unless granted.
    fn leave_late(&self, id: u64) -> bool {
        let mut book = self.book();
        let Some(w) = book.waiters.get_mut(&id) else {
            return false;
        };
        if w.state == State::New {
            book.waiters.remove(&id);
            return true;
        }
        w.state = State::Leaving { go: true };
        false
    }

    /// Its caller went away before an answer.
    fn abandon(&self, id: u64, rx: &mut oneshot::Receiver<Joined>) {
        let mut book = self.book();
        match book.waiters.get_mut(&id) {
            Some(w) if w.state == State::New => {
                book.waiters.remove(&id);
                return;
            }
            Some(w) => {
                w.state = State::Leaving { go: false };
                w.answer = None;
            }
            // Decided meanwhile: a grant nobody will use goes back.
            None if rx.try_recv() == Ok(Joined::Go) => book.give_back.push(id),
            None => return,
        }
        drop(book);
        self.kick.notify_one();
    }

    /// What the next step sends; the newcomers it takes count as registered from now.
    pub fn take_round(&self) -> Round {
        let mut book = self.book();
        let mut round = Round {
            walk: self.walk.swap(false, Ordering::AcqRel),
            give_back: std::mem::take(&mut book.give_back),
            ..Round::default()
        };
        for (id, w) in book.waiters.iter_mut() {
            // Anyone but a newcomer is (or was) in the fleet's line.
            round.registered |= w.state != State::New;
            match w.state {
                State::Sent => {}
                State::Leaving { go: true } => round.leave_go.push(*id),
                State::Leaving { go: false } => round.leave_back.push(*id),
                State::New | State::Rejoin if round.joins.len() < MOST_PER_STEP => {
                    round.joins.push(Join {
                        id: *id,
                        client: w.client.clone(),
                        class: w.class,
                        step: w.step,
                        deadline: w.deadline,
                        rejoin: w.state == State::Rejoin,
                    });
                    w.state = State::Sent;
                }
                State::New | State::Rejoin => {}
            }
        }
        // Leavers whose callers are gone are gone here too; the step answers for them.
        for id in &round.leave_back {
            book.waiters.remove(id);
        }
        round
    }

    /// The answers to a `leave_go` round: `granted` ones go, `left` ones are refused,
    /// and the others' decisions are on their way.
    pub fn left(&self, ids: &[u64], answers: &[String], spacing: Duration) {
        let mut book = self.book();
        for (id, answer) in ids.iter().zip(answers) {
            let outcome = match answer.as_str() {
                "granted" => Joined::Go,
                "left" => Joined::Refused(Refusal::RateLimited {
                    retry_after: spacing,
                    why: Limited::PastDeadline,
                    window: None,
                }),
                _ => {
                    if let Some(w) = book.waiters.get_mut(id) {
                        w.state = State::Sent;
                    }
                    continue;
                }
            };
            let granted = outcome == Joined::Go;
            let taken = book
                .waiters
                .remove(id)
                .and_then(|w| w.answer)
                .is_some_and(|tx| tx.send(outcome).is_ok());
            if granted && !taken {
                book.give_back.push(*id);
            }
        }
    }

    /// Hands a decision to its waiter; returns the id of a slot it started, for the
    /// instance's record of its own starts. A grant nobody takes goes back.
    pub fn decided(&self, decision: Decision) -> Option<u64> {
        let mut book = self.book();
        match decision {
            Decision::Granted(id) => {
                let taken = book
                    .waiters
                    .remove(&id)
                    .and_then(|w| w.answer)
                    .is_some_and(|tx| tx.send(Joined::Go).is_ok());
                if taken {
                    return Some(id);
                }
                book.give_back.push(id);
                None
            }
            Decision::Late(id) => {
                if let Some(w) = book.waiters.get_mut(&id) {
                    w.state = State::Rejoin;
                }
                book.give_back.push(id);
                None
            }
            Decision::Refused {
                id,
                retry_after,
                paused,
                window,
            } => {
                let why = if paused {
                    Limited::PausedPastDeadline
                } else {
                    Limited::PastDeadline
                };
                if let Some(tx) = book.waiters.remove(&id).and_then(|w| w.answer) {
                    let _ = tx.send(Joined::Refused(Refusal::RateLimited {
                        retry_after,
                        why,
                        window,
                    }));
                }
                None
            }
        }
    }

    /// Every registered waiter is registered again, in the order they came.
    pub fn rejoin_all(&self) {
        for w in self.book().waiters.values_mut() {
            if w.state == State::Sent {
                w.state = State::Rejoin;
            }
        }
    }

    /// Redis went away: every waiter goes to this process's own line, and the registered
    /// ones leave the fleet's line when Redis is back.
    pub fn fail_all(&self) {
        let mut book = self.book();
        book.waiters.retain(|_, w| {
            if let Some(tx) = w.answer.take() {
                let _ = tx.send(Joined::Local);
            }
            let registered = !matches!(w.state, State::New);
            w.state = State::Leaving { go: false };
            registered
        });
    }

    /// Deadlines are to be checked again at the next step.
    pub fn walk_soon(&self) {
        self.walk.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    /// Newcomers and re-registrations a step has not taken yet.
    pub fn unsent(&self) -> usize {
        let book = self.book();
        book.waiters
            .values()
            .filter(|w| matches!(w.state, State::New | State::Rejoin))
            .count()
    }

    /// Something a step has not sent yet: newcomers, re-registrations, leavers, slots to
    /// give back, deadlines to check again.
    pub fn has_news(&self) -> bool {
        if self.walk.load(Ordering::Acquire) {
            return true;
        }
        let book = self.book();
        !book.give_back.is_empty() || book.waiters.values().any(|w| w.state != State::Sent)
    }

    /// Waiting here, by class (high, normal, low).
    pub fn depth(&self) -> [usize; 3] {
        let mut d = [0; 3];
        for w in self.book().waiters.values() {
            if w.answer.is_some() {
                d[usize::from(w.class.clamp(1, 3) - 1)] += 1;
            }
        }
        d
    }
}

/// A waiter's hold on its answer: dropped before it, the waiter leaves.
struct Seat<'a> {
    line: &'a FleetLine,
    id: u64,
    rx: oneshot::Receiver<Joined>,
    done: bool,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.line.abandon(self.id, &mut self.rx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_read_back() {
        let late = Duration::from_millis(50);
        assert_eq!(
            Decision::parse("g 42", 0.0, late),
            Some(Decision::Granted(42))
        );
        assert_eq!(
            Decision::parse("g 42 1000000", 1_040_000.0, late),
            Some(Decision::Granted(42))
        );
        assert_eq!(
            Decision::parse("g 42 1000000", 1_060_000.0, late),
            Some(Decision::Late(42))
        );
        assert_eq!(
            Decision::parse("p 7 2500000 2", 0.0, late),
            Some(Decision::Refused {
                id: 7,
                retry_after: Duration::from_millis(2500),
                paused: true,
                window: Some(1),
            })
        );
        assert_eq!(
            Decision::parse("r 7 0 0", 0.0, late),
            Some(Decision::Refused {
                id: 7,
                retry_after: Duration::ZERO,
                paused: false,
                window: None,
            })
        );
        assert_eq!(Decision::parse("x", 0.0, late), None);
    }
}
