//! Which routes are stored, for how long (`cache.ttl`), and which stored routes a write
//! makes stale.
//!
//! Patterns are paths after `/api/v1`: a segment is a name, `*` (any one segment) or, as
//! the last segment only, `**` (any rest, none included). When several patterns match,
//! the most specific wins: the one whose first differing segment is the more exact (a
//! name over `*` over `**`; `/X` over `/X/**` for `/X` itself).

use std::time::Duration;

use crate::config::Pattern;

/// `cache.ttl`, ready to match.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Most specific first.
    patterns: Vec<(Pattern, Duration)>,
}

impl Routes {
    /// Patterns were checked when the settings were.
    pub fn new(ttl: &std::collections::BTreeMap<String, Duration>) -> Self {
        let mut patterns: Vec<(Pattern, Duration)> = ttl
            .iter()
            .filter_map(|(p, ttl)| Some((Pattern::parse(p).ok()?, *ttl)))
            .collect();
        patterns.sort_by_key(|(p, _)| std::cmp::Reverse(p.specificity()));
        Self { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// How long an answer for `path` (after `/api/v1`) is kept, if it is stored at all.
    pub fn ttl(&self, path: &str) -> Option<Duration> {
        if self.patterns.is_empty() {
            return None;
        }
        let segments = segments(path);
        self.patterns
            .iter()
            .find(|(p, _)| p.matches(&segments))
            .map(|(_, ttl)| *ttl)
    }
}

/// A path's segments, without empty ones (`/campaigns/` is `/campaigns`).
pub fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// What a stored answer depends on, and what a write makes stale: a write to `/X/Y/...`
/// drops `/X` and everything from `/X/Y` down; a write to `/X` drops `/X` and everything
/// under it. An entry remembers the generation of each scope it depends on when its
/// answer was asked for, and is stale once one has moved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `/X` itself: moved by every write under `/X`.
    Top(String),
    /// Everything under `/X`: moved by a write to `/X` alone.
    Under(String),
    /// `/X/Y` and everything under it: moved by every write under `/X/Y`.
    Pair(String, String),
}

impl Scope {
    /// The scopes an answer for `path` depends on.
    pub fn read(path: &str) -> Vec<Scope> {
        match segments(path)[..] {
            [] => vec![],
            [x] => vec![Scope::Top(x.into())],
            [x, y, ..] => vec![Scope::Under(x.into()), Scope::Pair(x.into(), y.into())],
        }
    }

    /// The scopes a write to `path` moves.
    pub fn written(path: &str) -> Vec<Scope> {
        match segments(path)[..] {
            [] => vec![],
            [x] => vec![Scope::Top(x.into()), Scope::Under(x.into())],
            [x, y, ..] => vec![Scope::Top(x.into()), Scope::Pair(x.into(), y.into())],
        }
    }

    /// The scope in a Redis key: segments are percent-encoded in paths already, so `/`
    /// cannot occur inside one.
    pub fn label(&self) -> String {
        match self {
            Scope::Top(x) => format!("t/{x}"),
            Scope::Under(x) => format!("u/{x}"),
            Scope::Pair(x, y) => format!("p/{x}/{y}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn routes(pairs: &[(&str, u64)]) -> Routes {
        let map: BTreeMap<String, Duration> = pairs
            .iter()
            .map(|(p, s)| (p.to_string(), Duration::from_secs(*s)))
            .collect();
        Routes::new(&map)
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let r = routes(&[
            ("/campaigns", 300),
            ("/campaigns/*/analytics", 60),
            ("/campaigns/**", 10),
            ("/campaigns/7/analytics", 5),
            ("/**", 1),
        ]);
        let ttl = |p| r.ttl(p).map(|d| d.as_secs());
        assert_eq!(ttl("/campaigns"), Some(300));
        assert_eq!(ttl("/campaigns/"), Some(300));
        assert_eq!(ttl("/campaigns/3/analytics"), Some(60));
        assert_eq!(ttl("/campaigns/7/analytics"), Some(5));
        assert_eq!(ttl("/campaigns/3/leads"), Some(10));
        assert_eq!(ttl("/campaigns/3/analytics/x"), Some(10));
        assert_eq!(ttl("/email-accounts"), Some(1));
        assert_eq!(routes(&[("/campaigns", 1)]).ttl("/campaigns/3"), None);
        assert_eq!(routes(&[("/campaigns/*", 1)]).ttl("/campaigns"), None);
        assert_eq!(
            routes(&[("/campaigns/**", 1)]).ttl("/campaigns"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            routes(&[("/campaigns/**", 1), ("/campaigns", 2)]).ttl("/campaigns"),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in ["campaigns", "/a//b", "/**/x", "/camp*", "/a?x=1", "/"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_write_moves_what_reads_depend_on() {
        let moved = |write: &str, read: &str| {
            let w = Scope::written(write);
            Scope::read(read).iter().any(|s| w.contains(s))
        };
        assert!(moved("/campaigns/create", "/campaigns"));
        assert!(moved("/campaigns/3/leads", "/campaigns"));
        assert!(moved("/campaigns/3/leads", "/campaigns/3/analytics"));
        assert!(moved("/campaigns/3", "/campaigns/3/leads"));
        assert!(moved("/campaigns", "/campaigns/3/analytics"));
        assert!(!moved("/campaigns/create", "/campaigns/3/analytics"));
        assert!(!moved("/campaigns/4/leads", "/campaigns/3/analytics"));
        assert!(!moved("/leads/1", "/campaigns"));
    }
}
