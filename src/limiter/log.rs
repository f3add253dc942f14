//! The reservation log: pure quota arithmetic on microsecond timestamps, shared by the
//! local backend and mirrored line for line by the Redis Lua scripts.
//!
//! Each granted slot's start time is kept while it can still share a window with a future
//! slot. Several windows hold at once (SmartLead's 10 per second, 60 per minute and 1,000
//! per hour); a new slot is `max(now, paused_until, last slot, slot[len−N_k] + L_k)` over
//! every window `k` of `N_k` starts per length `L_k` (its period plus the margin): the
//! last terms keep every window to its `N_k`, the `last slot` term keeps arrivals
//! first-come first-served.

use std::collections::VecDeque;

/// Microseconds on some monotonic clock (local) or Redis `TIME` (shared).
pub type Micros = u64;

/// One window: at most `limit` starts in any `length` (period plus margin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub limit: usize,
    pub length: Micros,
}

impl Span {
    pub fn new(limit: usize, length: Micros) -> Self {
        Self {
            limit: limit.max(1),
            length,
        }
    }
}

/// Why a slot is where it is: the window that held it back, if one did.
pub type Binding = Option<usize>;

#[derive(Debug, Clone)]
pub struct SlotLog {
    spans: Vec<Span>,
    longest: Micros,
    /// (slot, reservation id), sorted by slot.
    entries: VecDeque<(Micros, u64)>,
    paused_until: Micros,
}

impl SlotLog {
    pub fn new(spans: Vec<Span>) -> Self {
        let longest = spans.iter().map(|s| s.length).max().unwrap_or(0);
        Self {
            spans,
            longest,
            entries: VecDeque::new(),
            paused_until: 0,
        }
    }

    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Forgets slots that can no longer share a window with any slot at or after `now`.
    fn trim(&mut self, now: Micros) {
        while self
            .entries
            .front()
            .is_some_and(|(s, _)| s.saturating_add(self.longest) <= now)
        {
            self.entries.pop_front();
        }
    }

    /// The earliest slot a new arrival at `now` could get, and the window that held it
    /// back (if any did).
    pub fn next_slot(&mut self, now: Micros) -> (Micros, Binding) {
        self.trim(now);
        let mut slot = now.max(self.paused_until);
        if let Some((last, _)) = self.entries.back() {
            slot = slot.max(*last);
        }
        let mut binding = None;
        let n = self.entries.len();
        for (k, span) in self.spans.iter().enumerate() {
            if n >= span.limit {
                let edge = self.entries[n - span.limit].0 + span.length;
                if edge > slot || (edge == slot && binding.is_none() && slot > now) {
                    slot = edge;
                    binding = Some(k);
                }
            }
        }
        (slot, binding)
    }

    /// Grants a slot no later than `now + max_wait`, or says which slot it would have been
    /// and which window held it back.
    pub fn reserve(
        &mut self,
        id: u64,
        now: Micros,
        max_wait: Micros,
    ) -> Result<Micros, (Micros, Binding)> {
        let (slot, binding) = self.next_slot(now);
        if slot > now.saturating_add(max_wait) {
            return Err((slot, binding));
        }
        self.entries.push_back((slot, id));
        Ok(slot)
    }

    /// Records starts that happened elsewhere (e.g. while a fallback was in use).
    pub fn record(&mut self, slot: Micros, id: u64) {
        let at = self.entries.partition_point(|(s, _)| *s <= slot);
        self.entries.insert(at, (slot, id));
    }

    /// Drops a reservation that has not started yet; a started one stays counted.
    pub fn cancel(&mut self, id: u64, now: Micros) -> bool {
        match self.entries.iter().position(|(s, i)| *i == id && *s > now) {
            Some(at) => {
                self.entries.remove(at);
                true
            }
            None => false,
        }
    }

    pub fn slot_of(&self, id: u64) -> Option<Micros> {
        self.entries.iter().find(|(_, i)| *i == id).map(|(s, _)| *s)
    }

    /// A new limit for window `k`: slots not yet started are laid out again so every
    /// window keeps to its limit (order kept). True if any slot moved.
    pub fn set_limit(&mut self, k: usize, limit: usize, now: Micros) -> bool {
        let Some(span) = self.spans.get_mut(k) else {
            return false;
        };
        span.limit = limit.max(1);
        self.relayout(now)
    }

    /// New windows altogether (a reload): slots not yet started are laid out again under
    /// them, earlier or later, order kept. A longer window than before only counts the
    /// starts remembered, which go back as far as the old longest window. True if any
    /// slot moved.
    pub fn set_spans(&mut self, spans: Vec<Span>, now: Micros) -> bool {
        self.longest = spans.iter().map(|s| s.length).max().unwrap_or(0);
        self.spans = spans;
        self.relayout(now)
    }

    /// Gives every slot not yet started the earliest time the windows allow after the
    /// slots before it, as a newcomer would get.
    fn relayout(&mut self, now: Micros) -> bool {
        let mut moved = false;
        for i in 0..self.entries.len() {
            if self.entries[i].0 <= now {
                continue;
            }
            let mut want = now.max(self.paused_until);
            if i > 0 {
                want = want.max(self.entries[i - 1].0);
            }
            for span in &self.spans {
                if i >= span.limit {
                    want = want.max(self.entries[i - span.limit].0 + span.length);
                }
            }
            if want != self.entries[i].0 {
                self.entries[i].0 = want;
                moved = true;
            }
        }
        moved
    }

    /// Nothing starts before `until`; slots not yet started move later together, which
    /// keeps their order and spacing (so every window stays within its limit).
    pub fn pause(&mut self, until: Micros, now: Micros) -> bool {
        self.paused_until = self.paused_until.max(until);
        let first_future = self.entries.iter().position(|(s, _)| *s > now);
        let Some(first) = first_future else {
            return false;
        };
        let earliest = self.entries[first].0;
        if self.paused_until <= earliest {
            return false;
        }
        let delta = self.paused_until - earliest;
        for entry in self.entries.iter_mut().skip(first) {
            entry.0 += delta;
        }
        true
    }

    pub fn paused_until(&self) -> Micros {
        self.paused_until
    }

    /// How many starts each window holds right now (started within its length, up to now).
    pub fn used(&self, now: Micros) -> Vec<usize> {
        self.spans
            .iter()
            .map(|span| {
                self.entries
                    .iter()
                    .filter(|(s, _)| *s <= now && s.saturating_add(span.length) > now)
                    .count()
            })
            .collect()
    }

    /// Slots (with ids) that are not older than the longest window before `now`.
    pub fn recent(&self, now: Micros) -> impl Iterator<Item = (Micros, u64)> + '_ {
        self.entries
            .iter()
            .copied()
            .filter(move |(s, _)| s.saturating_add(self.longest) > now)
    }
}

/// The largest number of slots inside any half-open window of `window` micros.
pub fn max_in_window(slots: &[Micros], window: Micros) -> usize {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Micros = 1_000_000;

    fn one(limit: usize, length: Micros) -> SlotLog {
        SlotLog::new(vec![Span::new(limit, length)])
    }

    #[test]
    fn idle_burst_then_exact_rate() {
        let mut log = one(3, 10 * S);
        let slots: Vec<_> = (0..7)
            .map(|i| log.reserve(i, 0, u64::MAX).unwrap())
            .collect();
        assert_eq!(slots, vec![0, 0, 0, 10 * S, 10 * S, 10 * S, 20 * S]);
    }

    #[test]
    fn several_windows_hold_at_once() {
        // 2 per second and 3 per 10 seconds: a burst of 2, one more a second later, then
        // nothing until the 10-second window lets the first go.
        let mut log = SlotLog::new(vec![Span::new(2, S), Span::new(3, 10 * S)]);
        let slots: Vec<_> = (0..5)
            .map(|i| log.reserve(i, 0, u64::MAX).unwrap())
            .collect();
        assert_eq!(slots, vec![0, 0, S, 10 * S, 10 * S]);
        let mut log = SlotLog::new(vec![Span::new(2, S), Span::new(3, 10 * S)]);
        for i in 0..3 {
            log.reserve(i, 0, u64::MAX).unwrap();
        }
        assert_eq!(
            log.reserve(9, 0, S),
            Err((10 * S, Some(1))),
            "the 10 s window"
        );
        let mut log = SlotLog::new(vec![Span::new(2, S), Span::new(3, 10 * S)]);
        log.reserve(1, 0, 0).unwrap();
        log.reserve(2, 0, 0).unwrap();
        assert_eq!(log.reserve(3, 0, 0), Err((S, Some(0))), "the 1 s window");
    }

    #[test]
    fn denial_reports_the_slot_and_keeps_nothing() {
        let mut log = one(1, 10 * S);
        assert_eq!(log.reserve(1, 0, 0), Ok(0));
        assert_eq!(log.reserve(2, S, 5 * S), Err((10 * S, Some(0))));
        assert_eq!(log.reserve(3, S, 9 * S), Ok(10 * S));
    }

    #[test]
    fn cancel_frees_only_unstarted_slots() {
        let mut log = one(1, 10 * S);
        log.reserve(1, 0, u64::MAX).unwrap();
        log.reserve(2, 0, u64::MAX).unwrap();
        assert!(!log.cancel(1, 0), "slot 0 already started");
        assert!(log.cancel(2, 0));
        assert_eq!(log.reserve(3, 0, u64::MAX), Ok(10 * S));
    }

    #[test]
    fn pause_moves_waiting_slots_together() {
        let mut log = one(2, 10 * S);
        for i in 0..4 {
            log.reserve(i, 0, u64::MAX).unwrap();
        }
        assert!(log.pause(15 * S, S));
        assert_eq!(log.slot_of(2), Some(15 * S));
        assert_eq!(log.slot_of(3), Some(15 * S));
        assert_eq!(log.reserve(9, S, u64::MAX), Ok(25 * S));
        assert!(log.reserve(10, 16 * S, 0).is_err());
    }

    #[test]
    fn new_windows_lay_waiting_slots_out_again_either_way() {
        let mut log = one(2, 1000);
        for id in 0..6 {
            log.reserve(id, 0, u64::MAX).unwrap();
        }
        // 2 per 1000: 0, 0, 1000, 1000, 2000, 2000.
        assert_eq!(log.slot_of(5), Some(2000));
        // Looser: 3 per 1000 moves the waiting ones earlier.
        assert!(log.set_spans(vec![Span::new(3, 1000)], 1));
        let slots: Vec<u64> = (0..6).map(|id| log.slot_of(id).unwrap()).collect();
        assert_eq!(slots, vec![0, 0, 1, 1000, 1000, 1001]);
        // Tighter, with a second window: later again, never over either.
        assert!(log.set_spans(vec![Span::new(1, 1000), Span::new(2, 5000)], 0));
        let slots: Vec<u64> = (0..6).map(|id| log.slot_of(id).unwrap()).collect();
        assert!(max_in_window(&slots[2..], 1000) <= 1, "{slots:?}");
        assert!(max_in_window(&slots, 5000) <= 2, "{slots:?}");
    }

    #[test]
    fn a_lower_limit_for_one_window_spaces_waiting_slots_out() {
        let mut log = SlotLog::new(vec![Span::new(10, S), Span::new(6, 60 * S)]);
        log.pause(5 * S, 0);
        let slots: Vec<_> = (0..8)
            .map(|i| log.reserve(i, 0, u64::MAX).unwrap())
            .collect();
        let early = 5 * S;
        assert_eq!(
            slots,
            vec![early, early, early, early, early, early, 65 * S, 65 * S]
        );
        assert!(log.set_limit(1, 4, 0));
        assert_eq!(log.slot_of(3), Some(early));
        assert_eq!(log.slot_of(4), Some(65 * S), "only 4 in the minute now");
        assert_eq!(log.used(0), vec![0, 0], "none started yet");
        assert_eq!(log.used(5 * S), vec![4, 4]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Arrive { gap: Micros, max_wait: Micros },
        Cancel { pick: usize },
        Pause { gap: Micros, len: Micros },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3 * S, 0..40 * S).prop_map(|(gap, max_wait)| Op::Arrive { gap, max_wait }),
            1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            1 => (0..S, 0..20 * S).prop_map(|(gap, len)| Op::Pause { gap, len }),
        ]
    }

    fn spans() -> impl Strategy<Value = Vec<Span>> {
        prop::collection::vec((1usize..8, 1..30 * S), 1..=3)
            .prop_map(|v| v.into_iter().map(|(l, len)| Span::new(l, len)).collect())
    }

    proptest! {
        /// Whatever the windows, arrivals, cancellations and pauses: no window ever holds
        /// more than its limit of started slots, grants are FIFO, and a denial happens
        /// only when the slot really was past the deadline.
        #[test]
        fn never_over_any_limit(spans in spans(), ops in prop::collection::vec(op(), 1..200)) {
            let mut log = SlotLog::new(spans.clone());
            let mut now = 0;
            let mut granted: Vec<(u64, Micros)> = Vec::new();
            let mut last_grant = 0;
            for (id, op) in ops.into_iter().enumerate() {
                let id = id as u64;
                match op {
                    Op::Arrive { gap, max_wait } => {
                        now += gap;
                        match log.reserve(id, now, max_wait) {
                            Ok(slot) => {
                                prop_assert!(slot >= now && slot <= now + max_wait);
                                prop_assert!(slot >= last_grant, "FIFO");
                                last_grant = slot;
                                granted.push((id, slot));
                            }
                            Err((slot, binding)) => {
                                prop_assert!(slot > now + max_wait);
                                prop_assert!(binding.is_none_or(|k| k < spans.len()));
                            }
                        }
                    }
                    Op::Cancel { pick } => {
                        if !granted.is_empty() {
                            let (gid, _) = granted[pick % granted.len()];
                            if log.cancel(gid, now) {
                                granted.retain(|(i, _)| *i != gid);
                                // FIFO is among requests still waiting.
                                last_grant = granted.iter().map(|g| g.1).max().unwrap_or(0);
                            }
                        }
                    }
                    Op::Pause { gap, len } => {
                        now += gap;
                        log.pause(now + len, now);
                        for g in granted.iter_mut() {
                            if let Some(s) = log.slot_of(g.0) { g.1 = s; }
                        }
                        last_grant = granted.iter().map(|g| g.1).max().unwrap_or(0);
                    }
                }
            }
            let slots: Vec<Micros> = granted.iter().map(|g| g.1).collect();
            for span in &spans {
                prop_assert!(max_in_window(&slots, span.length) <= span.limit, "{span:?}");
            }
        }

        /// Under constant oversubscription the tightest window's whole quota is used.
        #[test]
        fn sustained_demand_uses_the_whole_quota(limit in 1usize..20, burst in 1usize..20) {
            let window = 10 * S;
            // A short burst window on top of the long one changes nothing in the long run.
            let mut log = SlotLog::new(vec![Span::new(burst, S), Span::new(limit, window)]);
            let mut count = 0;
            for id in 0..(limit as u64 * 10) {
                if log.reserve(id, 0, u64::MAX).unwrap() < 10 * window {
                    count += 1;
                }
            }
            let per_second_cap = burst * 10 * 10;
            prop_assert_eq!(count, (limit * 10).min(per_second_cap));
        }
    }
}
