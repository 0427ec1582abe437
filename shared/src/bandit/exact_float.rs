//! Serde for `f64` that restores the exact bits in every format, for `#[serde(with = …)]`.
//!
//! serde_json parses numbers with a fast algorithm that is off by one unit in the last place
//! for roughly one value in eight (unless its `float_roundtrip` feature is on), and a bandit
//! restored with slightly different statistics can choose differently. Human-readable formats
//! therefore get the value as a string in Rust's shortest round-trip notation (`"0.0551"`,
//! `"1e-7"`), which `str::parse` reads back exactly; plain numbers are accepted too, for
//! hand-written state. Binary formats get the `f64` itself, which they store exactly.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Serialises one `f64`.
pub(super) fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        serializer.collect_str(&format_args!("{value:?}"))
    } else {
        serializer.serialize_f64(*value)
    }
}

/// Deserialises one `f64`.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    if deserializer.is_human_readable() {
        deserializer.deserialize_any(ExactVisitor)
    } else {
        deserializer.deserialize_f64(ExactVisitor)
    }
}

/// A `Vec<f64>`, element by element.
pub(super) mod vec {
    use super::Exact;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises the vector.
    pub(in super::super) fn serialize<S: Serializer>(
        values: &[f64],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(|&v| Exact(v)))
    }

    /// Deserialises the vector.
    pub(in super::super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<f64>, D::Error> {
        let values = Vec::<Exact>::deserialize(deserializer)?;
        Ok(values.into_iter().map(|Exact(v)| v).collect())
    }
}

/// An `f64` serialised exactly, for collections.
struct Exact(f64);

impl Serialize for Exact {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Exact {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Exact)
    }
}

struct ExactVisitor;

impl Visitor<'_> for ExactVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, or a string holding one")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        v.parse()
            .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Holder {
        #[serde(with = "super")]
        one: f64,
        #[serde(with = "super::vec")]
        many: Vec<f64>,
    }

    #[test]
    fn json_restores_every_bit() {
        // Values that serde_json's default number parser gets wrong by one unit in the last
        // place are common among arbitrary doubles; a deterministic sweep finds plenty.
        let mut x = 0.0123_f64;
        let many: Vec<f64> = (0..2000)
            .map(|i| {
                x = (x * 1.37 + 0.01 * f64::from(i).sin()).fract().abs() * 0.1;
                x
            })
            .chain([0.1 + 0.2, 1.0 / 3.0, 5e-324, f64::MAX, -0.0, 1e-7])
            .collect();
        let plain = serde_json::to_string(&many).expect("serialises");
        let parsed: Vec<f64> = serde_json::from_str(&plain).expect("parses");
        assert!(
            parsed
                .iter()
                .zip(&many)
                .any(|(a, b)| a.to_bits() != b.to_bits()),
            "plain serde_json loses bits on these values, which is why this module exists"
        );

        let holder = Holder {
            one: 0.1 + 0.2,
            many,
        };
        let json = serde_json::to_string(&holder).expect("serialises");
        let back: Holder = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.one.to_bits(), holder.one.to_bits());
        assert!(
            back.many
                .iter()
                .zip(&holder.many)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn accepts_plain_numbers_and_rejects_garbage() {
        let back: Holder =
            serde_json::from_str(r#"{"one": 2, "many": [0.5, "1e-3", -4]}"#).expect("parses");
        assert_eq!(
            back,
            Holder {
                one: 2.0,
                many: vec![0.5, 1e-3, -4.0]
            }
        );
        assert!(serde_json::from_str::<Holder>(r#"{"one": "x", "many": []}"#).is_err());
    }
}
