//! Who goes next among one account's waiters in this process.
//!
//! The local backend's log (and a Redis fallback's) hands out slots in arrival order;
//! this queue decides which of this process's waiters uses which of the slots they hold
//! between them. On a reachable Redis the same order is kept over the fleet by
//! `lua/fleet_step.lua` instead. Waiters are
//! ordered by priority class (`high` before `normal` before `low`), then within a class
//! by self-clocked fair queueing: each request gets a virtual finish tag, its client's
//! previous tag (or the class's virtual time, whichever is later) plus `1/weight`, so
//! clients take turns (a client with weight 4 four turns to another's one) and each
//! client's own requests keep their order. The earliest slot goes to the first waiter.
//!
//! Classes are strict with one exception, the starvation floor: while a lower class
//! waits it gets at least one slot in [`FLOOR`]. A class that has watched `FLOOR - 1`
//! slots in a row go to other classes has its first waiter promoted to the head of the
//! line, ahead of every class, until it is served; so `high` can delay `normal` and `low`
//! but never starve them. With all three waiting the slots go high, high, normal, low,
//! ...: a quarter each to `normal` and `low`; when both come due at the same slot, `low`
//! goes right after `normal` (its one gap of `FLOOR` slots).
//!
//! Serving someone first moves others later: a waiter whose slot moves past its deadline
//! is refused at that moment, and a newcomer whose own slot would be past its deadline is
//! refused at once. Pure: time comes in as an argument; waking waiters is the caller's.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Limited, Refusal};
pub use crate::client::{ClientId, Priority, Who};

/// A waiter's id in its line.
pub type Key = u64;

/// One virtual-time unit: a client of weight w advances by `TURN / w` per request.
const TURN: u64 = 1 << 20;
/// Tags of clients with nothing waiting are forgotten every this many arrivals.
const TIDY_EVERY: u64 = 1024;
/// A waiting class gets at least one slot in this many.
pub const FLOOR: u32 = 4;

#[derive(Debug)]
struct Waiter {
    id: Key,
    class: Priority,
    /// Its virtual finish tag: its client's previous one (or the class's virtual time,
    /// whichever is later) plus `step`.
    tag: u64,
    /// `TURN / weight`.
    step: u64,
    /// Moved ahead of every class by the starvation floor.
    promoted: bool,
    client: ClientId,
    deadline: Instant,
    wake: Arc<Notify>,
}

impl Waiter {
    /// The order waiters are served in.
    fn order(&self) -> (bool, Priority, u64, Key) {
        (!self.promoted, self.class, self.tag, self.id)
    }
}

/// What a waiter should do now.
#[derive(Debug, PartialEq)]
pub enum Turn {
    /// Its slot has come: it starts now (and has left the line).
    Go,
    /// It is first in line: wake at its slot.
    At(Instant),
    /// Others go first: wait to be woken.
    Wait,
    /// Refused: it has left the line.
    Refused(Refusal),
}

/// What changed for others, for the caller to act on.
#[derive(Debug, Default)]
pub struct Effects {
    /// Reservations no waiter holds any more: give them back to the log.
    pub give_back: Vec<u64>,
    /// Waiters to wake (refused ones, and a new first in line).
    pub wake: Vec<Arc<Notify>>,
}

impl Effects {
    pub fn wake_all(&self) {
        for w in &self.wake {
            w.notify_one();
        }
    }
}

/// One account's waiters in this process, and the slots they hold between them.
#[derive(Debug, Default)]
pub struct Queue {
    /// In the order they are served in.
    waiters: Vec<Waiter>,
    /// (start, reservation id), sorted by start: the i-th goes to the i-th waiter.
    slots: Vec<(Instant, u64)>,
    refused: HashMap<Key, Refusal>,
    /// Each class's virtual time: the tag of the last one served.
    vtime: [u64; 3],
    /// Each (class, client)'s last tag.
    last: HashMap<(Priority, ClientId), u64>,
    /// Per class, the slots that went to higher classes in a row while it waited.
    passed_over: [u32; 3],
    /// Requests each client has in the line (or about to be).
    seats: HashMap<ClientId, usize>,
    ids: Key,
}

impl Queue {
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Waiting now, per client.
    pub fn waiting_by_client(&self) -> Vec<(ClientId, usize)> {
        self.seats.iter().map(|(c, n)| (c.clone(), *n)).collect()
    }

    /// Waiting now, per class.
    pub fn depth(&self) -> [usize; 3] {
        let mut d = [0; 3];
        for w in &self.waiters {
            d[w.class as usize] += 1;
        }
        d
    }

    /// Takes a seat for `client` unless it already holds `max`; `Err` says how many it holds.
    pub fn seat(&mut self, client: &ClientId, max: usize) -> Result<(), usize> {
        let held = self.seats.entry(client.clone()).or_default();
        if *held >= max {
            return Err(*held);
        }
        *held += 1;
        Ok(())
    }

    /// Gives a seat back (the request is done waiting, one way or another).
    pub fn unseat(&mut self, client: &ClientId) {
        if let Some(held) = self.seats.get_mut(client) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.seats.remove(client);
            }
        }
    }

    /// A waiter arrives with `slot` reserved for it. Returns its key, or its refusal when
    /// its place in line comes after its deadline; `effects` says what changed for others.
    pub fn join(
        &mut self,
        who: &Who,
        deadline: Instant,
        wake: Arc<Notify>,
        slot: (Instant, u64),
        now: Instant,
        effects: &mut Effects,
    ) -> Result<Key, Refusal> {
        let class = who.priority;
        let step = TURN / u64::from(who.weight.max(1));
        let start = self.vtime[class as usize];
        let last = self.last.get(&(class, who.client.clone())).copied();
        let tag = start.max(last.unwrap_or(0)) + step;
        self.ids += 1;
        if self.ids.is_multiple_of(TIDY_EVERY) {
            self.tidy();
        }
        let waiter = Waiter {
            id: self.ids,
            class,
            tag,
            step,
            promoted: false,
            client: who.client.clone(),
            deadline,
            wake,
        };
        let at = self.slots.partition_point(|s| *s <= slot);
        self.slots.insert(at, slot);
        let place = self.waiters.partition_point(|w| w.order() < waiter.order());
        let mine = self.slots[place].0;
        if mine > deadline {
            // Its own slot is past its deadline: it never joins; the last slot goes back.
            let (_, id) = self.slots.pop().expect("just inserted");
            effects.give_back.push(id);
            return Err(Refusal::RateLimited {
                retry_after: mine.saturating_duration_since(now),
                why: Limited::PastDeadline,
                window: None,
            });
        }
        let first_before = self.first();
        self.last.insert((class, who.client.clone()), tag);
        let id = waiter.id;
        self.waiters.insert(place, waiter);
        self.refuse_late(place + 1, now, Limited::PastDeadline, effects);
        self.wake_new_first(first_before, effects);
        if at == 0 && place != 0 {
            // An earlier slot for whoever is first.
            self.wake_first(effects);
        }
        Ok(id)
    }

    /// Where `key` stands now.
    pub fn turn(&mut self, key: Key, now: Instant, effects: &mut Effects) -> Turn {
        if let Some(refusal) = self.refused.remove(&key) {
            return Turn::Refused(refusal);
        }
        if self.first() != Some(key) {
            return Turn::Wait;
        }
        let (at, _) = self.slots[0];
        if at > now {
            return Turn::At(at);
        }
        let first = self.waiters.remove(0);
        self.slots.remove(0);
        let class = first.class as usize;
        self.vtime[class] = self.vtime[class].max(first.tag);
        self.served(first.class);
        self.promote_passed_over(now, effects);
        self.wake_first(effects);
        self.forget_if_empty();
        Turn::Go
    }

    /// A slot went to `class`: every other class still waiting was passed over once more.
    fn served(&mut self, class: Priority) {
        let mut waiting = [false; 3];
        for w in &self.waiters {
            waiting[w.class as usize] = true;
        }
        for c in Priority::ALL {
            let i = c as usize;
            self.passed_over[i] = match (c, waiting[i]) {
                (c, _) if c == class => 0,
                (_, true) => self.passed_over[i] + 1,
                (_, false) => 0,
            };
        }
    }

    /// The starvation floor: the highest class passed over `FLOOR - 1` times has its first
    /// waiter moved to the head of the line (those it passes each move one slot later).
    fn promote_passed_over(&mut self, now: Instant, effects: &mut Effects) {
        if self.waiters.first().is_none_or(|w| w.promoted) {
            return;
        }
        let Some(class) = Priority::ALL
            .into_iter()
            .find(|c| self.passed_over[*c as usize] >= FLOOR - 1)
        else {
            return;
        };
        let Some(at) = self.waiters.iter().position(|w| w.class == class) else {
            return;
        };
        let mut waiter = self.waiters.remove(at);
        waiter.promoted = true;
        self.waiters.insert(0, waiter);
        self.refuse_late(1, now, Limited::PastDeadline, effects);
    }

    /// `key` leaves without starting (its caller went away, or its deadline passed): the
    /// last slot goes back, and everyone after it moves one slot earlier.
    pub fn leave(&mut self, key: Key, effects: &mut Effects) {
        self.refused.remove(&key);
        let Some(at) = self.waiters.iter().position(|w| w.id == key) else {
            return;
        };
        let first_before = self.first();
        self.remove(at);
        if let Some((_, id)) = self.slots.pop() {
            effects.give_back.push(id);
        }
        self.wake_new_first(first_before, effects);
    }

    /// The reservations held, to re-read their times after the log moved them.
    pub fn held(&self) -> Vec<u64> {
        self.slots.iter().map(|(_, id)| *id).collect()
    }

    /// New times for the reservations held (after a pause or new windows moved them);
    /// waiters whose slot is now past their deadline are refused, `why` saying what moved
    /// them. Reservations the log no longer has keep their old time.
    pub fn retime(
        &mut self,
        times: &[(u64, Instant)],
        now: Instant,
        why: Limited,
        effects: &mut Effects,
    ) {
        let new: HashMap<u64, Instant> = times.iter().copied().collect();
        for slot in &mut self.slots {
            if let Some(at) = new.get(&slot.1) {
                slot.0 = *at;
            }
        }
        self.slots.sort();
        self.refuse_late(0, now, why, effects);
        // The first in line wakes at another time.
        self.wake_first(effects);
    }

    /// Removes the waiter at `at`. Its client's later waiters of the same class take its
    /// turn and those after it: leaving never costs a client its place.
    fn remove(&mut self, at: usize) -> Waiter {
        let gone = self.waiters.remove(at);
        let mut moved = false;
        for w in &mut self.waiters[at..] {
            if w.class == gone.class && w.client == gone.client {
                w.tag -= gone.step;
                moved = true;
            }
        }
        if let Some(last) = self.last.get_mut(&(gone.class, gone.client.clone()))
            && *last >= gone.tag
        {
            *last -= gone.step;
        }
        if moved {
            self.waiters.sort_by_key(Waiter::order);
        }
        self.forget_if_empty();
        gone
    }

    /// With nobody waiting there is nobody to be fair to: past turns are forgotten, so
    /// what is kept is bounded by who is waiting.
    fn forget_if_empty(&mut self) {
        if self.waiters.is_empty() {
            self.last.clear();
            self.passed_over = [0; 3];
        }
    }

    /// Refuses every waiter from `from` on whose slot is past its deadline (each refusal
    /// moves the ones after it a slot earlier) and gives their slots back.
    fn refuse_late(&mut self, from: usize, now: Instant, why: Limited, effects: &mut Effects) {
        let first_before = self.first();
        let mut i = from;
        let mut refused = 0;
        while i < self.waiters.len() {
            let at = self.slots[i].0;
            if at <= self.waiters[i].deadline {
                i += 1;
                continue;
            }
            let w = self.remove(i);
            self.refused.insert(
                w.id,
                Refusal::RateLimited {
                    retry_after: at.saturating_duration_since(now),
                    why,
                    window: None,
                },
            );
            effects.wake.push(w.wake);
            refused += 1;
            // Removing may have moved a waiter of that client earlier, before `i`.
            i = from.min(i);
        }
        for _ in 0..refused {
            if let Some((_, id)) = self.slots.pop() {
                effects.give_back.push(id);
            }
        }
        self.wake_new_first(first_before, effects);
    }

    fn first(&self) -> Option<Key> {
        self.waiters.first().map(|w| w.id)
    }

    fn wake_first(&self, effects: &mut Effects) {
        if let Some(first) = self.waiters.first() {
            effects.wake.push(first.wake.clone());
        }
    }

    fn wake_new_first(&self, before: Option<Key>, effects: &mut Effects) {
        if self.first() != before {
            self.wake_first(effects);
        }
    }

    /// Forgets tags of clients that have nothing queued and are behind the class's
    /// virtual time (a returning client starts from the virtual time anyway).
    fn tidy(&mut self) {
        let vtime = self.vtime;
        let waiting: std::collections::HashSet<(Priority, &ClientId)> =
            self.waiters.iter().map(|w| (w.class, &w.client)).collect();
        self.last.retain(|(class, client), tag| {
            *tag > vtime[*class as usize] || waiting.contains(&(*class, client))
        });
    }

    /// How many (class, client) tags are kept.
    pub fn remembered(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const SPACING: Duration = Duration::from_millis(100);

    fn who(client: &str, priority: Priority, weight: u32) -> Who {
        Who {
            client: ClientId::Named(client.into()),
            priority,
            weight,
        }
    }

    /// A log handing out one slot every `SPACING` from `t0`, in order.
    struct Log {
        t0: Instant,
        next: u64,
    }

    impl Log {
        fn slot(&mut self) -> (Instant, u64) {
            self.next += 1;
            (self.t0 + SPACING * (self.next as u32), self.next)
        }
    }

    fn far(t0: Instant) -> Instant {
        t0 + Duration::from_secs(3600)
    }

    fn add(q: &mut Queue, log: &mut Log, w: &Who, keys: &mut Vec<(Key, String)>) {
        let t0 = log.t0;
        let key = q
            .join(
                w,
                far(t0),
                Arc::new(Notify::new()),
                log.slot(),
                t0,
                &mut Effects::default(),
            )
            .unwrap();
        keys.push((key, w.client.to_string()));
    }

    /// Serves everything queued, in order, returning the clients in the order served.
    fn drain(q: &mut Queue, keys: &mut Vec<(Key, String)>, t0: Instant) -> Vec<String> {
        let mut served = Vec::new();
        let mut now = t0;
        while !q.is_empty() {
            let mut progressed = false;
            for (key, client) in keys.clone() {
                match q.turn(key, now, &mut Effects::default()) {
                    Turn::Go => {
                        served.push(client.clone());
                        keys.retain(|(k, _)| *k != key);
                        progressed = true;
                    }
                    Turn::At(at) => now = now.max(at),
                    _ => {}
                }
            }
            if !progressed {
                now += SPACING;
            }
        }
        served
    }

    #[test]
    fn clients_take_turns_and_keep_their_own_order() {
        let t0 = Instant::now();
        let (mut q, mut log, mut keys) = (Queue::default(), Log { t0, next: 0 }, Vec::new());
        for (client, n) in [("bulk", 6), ("ui", 2)] {
            for _ in 0..n {
                add(
                    &mut q,
                    &mut log,
                    &who(client, Priority::Normal, 1),
                    &mut keys,
                );
            }
        }
        let order: Vec<Key> = keys.iter().map(|k| k.0).collect();
        let served = drain(&mut q, &mut keys, t0);
        assert_eq!(
            served,
            ["bulk", "ui", "bulk", "ui", "bulk", "bulk", "bulk", "bulk"]
        );
        assert!(order.is_sorted(), "keys are handed out in arrival order");
        assert_eq!(q.remembered(), 0, "nothing kept once nobody waits");
    }

    #[test]
    fn a_higher_class_goes_first_and_weights_share_turns() {
        let t0 = Instant::now();
        let (mut q, mut log, mut keys) = (Queue::default(), Log { t0, next: 0 }, Vec::new());
        for _ in 0..10 {
            add(
                &mut q,
                &mut log,
                &who("heavy", Priority::Normal, 4),
                &mut keys,
            );
            add(
                &mut q,
                &mut log,
                &who("light", Priority::Normal, 1),
                &mut keys,
            );
        }
        add(
            &mut q,
            &mut log,
            &who("urgent", Priority::High, 1),
            &mut keys,
        );
        add(&mut q, &mut log, &who("later", Priority::Low, 1), &mut keys);
        let served = drain(&mut q, &mut keys, t0);
        assert_eq!(served[0], "urgent");
        // The floor: passed over three times (urgent and two normal), low goes fourth.
        assert_eq!(served[3], "later", "{served:?}");
        let normal: Vec<&String> = served
            .iter()
            .filter(|c| *c == "heavy" || *c == "light")
            .collect();
        let heavy = normal[..10].iter().filter(|c| **c == "heavy").count();
        assert_eq!(heavy, 8, "4:1 in turns: {normal:?}");
    }

    #[test]
    fn a_lower_class_gets_one_slot_in_four_while_it_waits() {
        let t0 = Instant::now();
        let (mut q, mut log, mut keys) = (Queue::default(), Log { t0, next: 0 }, Vec::new());
        for _ in 0..4 {
            add(&mut q, &mut log, &who("bulk", Priority::Low, 1), &mut keys);
            add(
                &mut q,
                &mut log,
                &who("batch", Priority::Normal, 1),
                &mut keys,
            );
        }
        for _ in 0..24 {
            add(&mut q, &mut log, &who("ui", Priority::High, 1), &mut keys);
        }
        let served = drain(&mut q, &mut keys, t0);
        assert_eq!(served.len(), 32);
        // While a class waits it has a quarter of the slots, and no more than FLOOR in a
        // row pass it by (two classes due at once go one after the other).
        for class in ["batch", "bulk"] {
            let last = served.iter().rposition(|c| c == class).unwrap();
            for run in served[..=last].windows(FLOOR as usize + 1) {
                assert!(run.iter().any(|c| c == class), "{class}: {served:?}");
            }
            let share = served[..=last].iter().filter(|c| *c == class).count();
            assert!(
                share * 4 >= last,
                "{class}: {share} of {}: {served:?}",
                last + 1
            );
        }
        assert_eq!(&served[..4], ["ui", "ui", "ui", "batch"], "{served:?}");
        // High still goes first most of the time: half the slots while both others wait.
        let ui = served[..16].iter().filter(|c| *c == "ui").count();
        assert!(ui >= 8, "{served:?}");
    }

    #[test]
    fn leaving_costs_a_client_no_turn() {
        let t0 = Instant::now();
        let (mut q, mut log, mut keys) = (Queue::default(), Log { t0, next: 0 }, Vec::new());
        for _ in 0..4 {
            add(&mut q, &mut log, &who("a", Priority::Normal, 1), &mut keys);
            add(&mut q, &mut log, &who("b", Priority::Normal, 1), &mut keys);
        }
        // a's first three give up: its fourth takes the first of their turns.
        for k in keys
            .iter()
            .filter(|k| k.1 == "a")
            .take(3)
            .map(|k| k.0)
            .collect::<Vec<_>>()
        {
            let mut fx = Effects::default();
            q.leave(k, &mut fx);
            assert_eq!(fx.give_back.len(), 1, "the last slot goes back");
            keys.retain(|x| x.0 != k);
        }
        let served = drain(&mut q, &mut keys, t0);
        assert_eq!(served, ["b", "a", "b", "b", "b"]);
    }

    #[test]
    fn a_waiter_pushed_past_its_deadline_is_refused_then() {
        let t0 = Instant::now();
        let (mut q, mut log) = (Queue::default(), Log { t0, next: 0 });
        let mut fx = Effects::default();
        // bulk's second request may wait 250 ms: its slot is at 200 ms.
        let tight = t0 + Duration::from_millis(250);
        let bulk = who("bulk", Priority::Normal, 1);
        let wake = || Arc::new(Notify::new());
        q.join(&bulk, far(t0), wake(), log.slot(), t0, &mut fx)
            .unwrap();
        let second = q
            .join(&bulk, tight, wake(), log.slot(), t0, &mut fx)
            .unwrap();
        // A high-priority request takes the first slot: bulk's second moves to 300 ms.
        let mut fx = Effects::default();
        let high = who("ui", Priority::High, 1);
        q.join(&high, far(t0), wake(), log.slot(), t0, &mut fx)
            .unwrap();
        assert_eq!(fx.give_back, [3], "the last slot went back");
        assert_eq!(
            fx.wake.len(),
            2,
            "the refused one, and the new first in line"
        );
        match q.turn(second, t0, &mut Effects::default()) {
            Turn::Refused(Refusal::RateLimited {
                retry_after, why, ..
            }) => {
                assert_eq!(retry_after, Duration::from_millis(300));
                assert_eq!(why, Limited::PastDeadline);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_moved_slot_past_a_deadline_refuses_at_once() {
        let t0 = Instant::now();
        let (mut q, mut log) = (Queue::default(), Log { t0, next: 0 });
        let mut fx = Effects::default();
        let w = who("a", Priority::Normal, 1);
        let (slot, id) = log.slot();
        let k = q
            .join(
                &w,
                t0 + SPACING * 3,
                Arc::new(Notify::new()),
                (slot, id),
                t0,
                &mut fx,
            )
            .unwrap();
        let mut fx = Effects::default();
        q.retime(
            &[(id, t0 + SPACING * 5)],
            t0,
            Limited::PausedPastDeadline,
            &mut fx,
        );
        assert_eq!(fx.give_back, [id]);
        assert!(matches!(
            q.turn(k, t0, &mut fx),
            Turn::Refused(Refusal::RateLimited {
                why: Limited::PausedPastDeadline,
                ..
            })
        ));
    }

    #[test]
    fn seats_bound_each_client() {
        let mut q = Queue::default();
        let a = ClientId::Named("a".into());
        assert!(q.seat(&a, 2).is_ok());
        assert!(q.seat(&a, 2).is_ok());
        assert_eq!(q.seat(&a, 2), Err(2));
        assert!(q.seat(&ClientId::Named("b".into()), 2).is_ok());
        q.unseat(&a);
        assert!(q.seat(&a, 2).is_ok());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive {
            client: u8,
            class: u8,
            patience: u64,
        },
        Tick,
        Leave {
            pick: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..4, 0u8..3, 1u64..40).prop_map(|(client, class, patience)| Op::Arrive { client, class, patience }),
            4 => Just(Op::Tick),
            1 => any::<usize>().prop_map(|pick| Op::Leave { pick }),
        ]
    }

    /// A waiter in the property test: its key, deadline, client and class.
    type Waiting = (Key, Instant, u8, u8);

    proptest! {
        /// Whatever arrives, waits and leaves: a slot never goes unused while anyone waits
        /// for it, nobody starts after their deadline, everyone refused is refused no
        /// later than it and honestly, and within a class no client is served more than
        /// twice between two turns of another client that keeps waiting (no starvation).
        #[test]
        fn the_queue_keeps_its_promises(ops in prop::collection::vec(op(), 1..200)) {
            let t0 = Instant::now();
            let (mut q, mut log) = (Queue::default(), Log { t0, next: 0 });
            let mut now = t0;
            let mut waiting: Vec<Waiting> = Vec::new();
            // (class, X) -> Y -> times Y was served since X last was, while X waited.
            let mut ahead: HashMap<(u8, u8), HashMap<u8, usize>> = HashMap::new();
            for op in ops {
                // Clients with nothing waiting start afresh.
                ahead.retain(|(class, x), _| waiting.iter().any(|w| w.3 == *class && w.2 == *x));
                match op {
                    Op::Arrive { client, class, patience } => {
                        let deadline = now + SPACING * patience as u32;
                        let w = who(&format!("c{client}"), Priority::ALL[class as usize], 1);
                        let mut fx = Effects::default();
                        match q.join(&w, deadline, Arc::new(Notify::new()), log.slot(), now, &mut fx) {
                            Ok(key) => waiting.push((key, deadline, client, class)),
                            Err(Refusal::RateLimited { retry_after, .. }) => {
                                prop_assert!(now + retry_after > deadline, "honest refusal");
                            }
                            Err(other) => prop_assert!(false, "{other:?}"),
                        }
                    }
                    Op::Leave { pick } => {
                        if !waiting.is_empty() {
                            let (key, ..) = waiting.remove(pick % waiting.len());
                            q.leave(key, &mut Effects::default());
                        }
                    }
                    Op::Tick => {
                        now += SPACING;
                        loop {
                            let mut went = None;
                            for (key, deadline, client, class) in waiting.clone() {
                                match q.turn(key, now, &mut Effects::default()) {
                                    Turn::Go => {
                                        prop_assert!(now <= deadline + SPACING, "started by its deadline");
                                        went = Some((key, client, class));
                                        break;
                                    }
                                    Turn::Refused(Refusal::RateLimited { retry_after, .. }) => {
                                        prop_assert!(now <= deadline + SPACING, "refused no later than its deadline");
                                        prop_assert!(now + retry_after > deadline, "honest refusal");
                                        waiting.retain(|w| w.0 != key);
                                        // Answered (by its own deadline): that was its turn.
                                        ahead.remove(&(class, client));
                                    }
                                    Turn::Refused(other) => prop_assert!(false, "{other:?}"),
                                    _ => {}
                                }
                            }
                            let Some((key, client, class)) = went else { break };
                            waiting.retain(|w| w.0 != key);
                            ahead.remove(&(class, client));
                            let others: std::collections::BTreeSet<u8> = waiting
                                .iter()
                                .filter(|w| w.3 == class && w.2 != client)
                                .map(|w| w.2)
                                .collect();
                            for other in others {
                                {
                                    let seen = ahead.entry((class, other)).or_default().entry(client).or_default();
                                    *seen += 1;
                                    prop_assert!(*seen <= 2, "c{client} served {seen} times while c{other} waited");
                                }
                            }
                        }
                        // No slot goes unused while someone waits for it.
                        if let Some(first) = waiting.iter().find(|w| q.first() == Some(w.0)) {
                            let turn = q.turn(first.0, now, &mut Effects::default());
                            prop_assert!(!matches!(turn, Turn::Go), "a due slot was left unused");
                        }
                        prop_assert_eq!(q.len(), waiting.len());
                    }
                }
            }
        }
    }
}
