//! Integer settings that refuse fractions. The `config` crate rounds a float put into an
//! integer field (`max_body_bytes = 1048576.9` would become 1048577, `1e30` the largest
//! integer), so integer fields are read through [`Whole`]: a whole number that fits, or
//! a number written as text (as environment variables may be), and nothing else. Its
//! errors never quote a string value (it could be a misplaced key).

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// A whole number of type `T`.
pub struct Whole<T>(pub T);

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeVisitor(PhantomData))
    }
}

struct WholeVisitor<T>(PhantomData<T>);

impl<T: TryFrom<u64>> WholeVisitor<T> {
    fn fit<E: de::Error>(n: u64) -> Result<Whole<T>, E> {
        T::try_from(n)
            .map(Whole)
            .map_err(|_| E::custom(format!("{n} is too large for this setting")))
    }
}

impl<T: TryFrom<u64>> Visitor<'_> for WholeVisitor<T> {
    type Value = Whole<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Whole<T>, E> {
        Self::fit(n)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Whole<T>, E> {
        match u64::try_from(n) {
            Ok(n) => Self::fit(n),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Whole<T>, E> {
        if !n.is_finite() || n.fract() != 0.0 || n < 0.0 {
            return Err(E::custom(format!(
                "must be a whole number, not {n} (fractions are refused, not rounded)"
            )));
        }
        if n >= u64::MAX as f64 {
            return Err(E::custom(format!("{n} is too large for this setting")));
        }
        Self::fit(n as u64)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Whole<T>, E> {
        match s.trim().parse::<u64>() {
            Ok(n) => Self::fit(n),
            // Not quoted: a string in the wrong place may be a key.
            Err(_) => Err(E::custom("must be a whole number, not text")),
        }
    }
}

pub fn whole<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    Whole::deserialize(d).map(|w: Whole<T>| w.0)
}

pub fn whole_opt<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(d).map(|w| w.map(|w| w.0))
}

pub fn whole_vec<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Whole<T>>::deserialize(d).map(|v| v.into_iter().map(|w| w.0).collect())
}

pub fn whole_map<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<HashMap<String, T>, D::Error> {
    HashMap::<String, Whole<T>>::deserialize(d)
        .map(|m| m.into_iter().map(|(k, w)| (k, w.0)).collect())
}
