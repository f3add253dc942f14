//! `[cache]`: which routes are stored and for how long, stale answers while SmartLead
//! fails, coalescing of identical GETs, and the memory the cache may use.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::whole::whole;
use super::{ConfigError, DAY, invalid};
use crate::shown;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// Route pattern (after `/api/v1`) → how long its 200 answers are kept.
    #[serde(with = "ttl_map")]
    pub ttl: BTreeMap<String, Duration>,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    pub coalesce: bool,
    #[serde(deserialize_with = "whole")]
    pub max_bytes: u64,
    #[serde(deserialize_with = "whole")]
    pub max_entry_bytes: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: BTreeMap::new(),
            stale_if_error: Duration::ZERO,
            coalesce: true,
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
        }
    }
}

/// Entries are weighed in `u32` by moka: one answer can never be this big anyway.
const MAX_ENTRY_LIMIT: u64 = 512 * 1024 * 1024;

impl CacheSettings {
    /// Whether the request path needs the cache at all.
    pub fn in_use(&self) -> bool {
        self.coalesce || !self.ttl.is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (pattern, ttl) in &self.ttl {
            Pattern::parse(pattern)
                .map_err(|why| invalid("cache.ttl", format!("{}: {why}", shown::route(pattern))))?;
            if ttl.is_zero() || *ttl > DAY {
                return Err(invalid(
                    "cache.ttl",
                    format!("{}: must be between 1ms and 1d", shown::route(pattern)),
                ));
            }
        }
        if self.stale_if_error > DAY {
            return Err(invalid("cache.stale_if_error", "must be at most 1d"));
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > MAX_ENTRY_LIMIT {
            return Err(invalid(
                "cache.max_entry_bytes",
                format!("must be between 1 and {MAX_ENTRY_LIMIT}"),
            ));
        }
        if self.max_bytes < self.max_entry_bytes {
            return Err(invalid(
                "cache.max_bytes",
                "must be at least cache.max_entry_bytes",
            ));
        }
        Ok(())
    }
}

/// A `cache.ttl` route: a path after `/api/v1` whose segments are names, `*` (any one
/// segment) or, last only, `**` (any rest, none included). Matched by
/// the cache (its `routes` module).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Segment {
    // Declared from the least exact, so a pattern's segments sort by specificity.
    Rest,
    Any,
    Name(String),
}

impl Segment {
    fn rank(&self) -> u8 {
        match self {
            Segment::Rest => 0,
            Segment::Any => 1,
            Segment::Name(_) => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Vec<Segment>);

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err("must start with '/' (a path after /api/v1)".into());
        };
        if text.contains(['?', '#']) {
            return Err("must be a path, without a query".into());
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (n, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err("has an empty segment".into()),
                "**" if n + 1 == parts.len() => Segment::Rest,
                "**" => return Err("'**' may only be the last segment".into()),
                "*" => Segment::Any,
                name if name.contains('*') => {
                    return Err(format!(
                        "{}: '*' stands for a whole segment",
                        shown::quoted(name)
                    ));
                }
                name => Segment::Name(name.to_owned()),
            };
            segments.push(segment);
        }
        Ok(Self(segments))
    }

    pub fn matches(&self, path: &[&str]) -> bool {
        let mut at = 0;
        for segment in &self.0 {
            match segment {
                Segment::Rest => return true,
                Segment::Any if at < path.len() => at += 1,
                Segment::Name(name) if path.get(at) == Some(&name.as_str()) => at += 1,
                _ => return false,
            }
        }
        at == path.len()
    }

    /// Ordered so that the most specific pattern is the greatest. A pattern that ends
    /// where the path does beats one whose `**` takes the (empty) rest.
    pub fn specificity(&self) -> Vec<u8> {
        let mut ranks: Vec<u8> = self.0.iter().map(Segment::rank).collect();
        if self.0.last() != Some(&Segment::Rest) {
            ranks.push(3);
        }
        ranks
    }
}

/// `{ "/campaigns" = "5m" }`, durations in humantime form both ways.
mod ttl_map {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let shown: BTreeMap<&str, String> = map
            .iter()
            .map(|(k, v)| (k.as_str(), humantime::format_duration(*v).to_string()))
            .collect();
        shown.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Table(BTreeMap<String, String>),
            /// `"/campaigns=5m,/campaigns/*/analytics=1m"`: the form an environment
            /// variable can hold.
            Text(String),
        }
        let written = match Written::deserialize(d)? {
            Written::Table(t) => t,
            Written::Text(text) => text
                .split(',')
                .map(str::trim)
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (route, ttl) = pair.rsplit_once('=').ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "cache.ttl: {} is not route=duration",
                            crate::shown::route(pair)
                        ))
                    })?;
                    Ok((route.trim().to_owned(), ttl.trim().to_owned()))
                })
                .collect::<Result<_, D::Error>>()?,
        };
        written
            .into_iter()
            .map(|(k, v)| {
                let ttl = humantime::parse_duration(&v).map_err(|_| {
                    serde::de::Error::custom(format!(
                        "cache.ttl {}: {} is not a duration (like \"5m\" or \"500ms\")",
                        crate::shown::route(&k),
                        crate::shown::quoted(&v)
                    ))
                })?;
                Ok((k, ttl))
            })
            .collect()
    }
}
