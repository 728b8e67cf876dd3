//! Typed config values: durations (`"250ms"`), sizes (`"64KiB"`) and rates (`"20/s"`).
//!
//! Each type parses itself during deserialization, so a bad value becomes a TOML
//! error that carries the position of the offending key.

use serde::{Deserialize, Deserializer, de};
use std::{fmt, str::FromStr, time::Duration};

/// A duration written like `"250ms"`, `"30s"`, `"5m"`.
/// Longest part of a bad value echoed in an error message.
const SHOWN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim()).map(HumanDuration).map_err(|_| {
            format!(
                "invalid duration \"{}\": use a number and a unit, like \"250ms\", \"30s\" or \"5m\"",
                crate::util::escape(s, SHOWN)
            )
        })
    }
}

/// A byte size written like `"64KiB"`, `"1MiB"` or a bare number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid size \"{}\": use a number and a unit, like \"64KiB\" or \"1MiB\"",
                crate::util::escape(s, SHOWN)
            )
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

/// An event rate written like `"20/s"`, `"600/min"`, `"1000/h"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Events allowed per `per`.
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The interval between two events at this rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid rate \"{}\": use a count and a unit, like \"20/s\" or \"600/min\"",
                crate::util::escape(s, SHOWN)
            )
        };
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$t, E> {
                        n.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    )*};
}
deserialize_from_str!(HumanDuration, ByteSize, Rate);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(250));
        assert_eq!("5m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(300));
        assert!("5x".parse::<HumanDuration>().is_err());
        assert!("".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert_eq!("2 KB".parse::<ByteSize>().unwrap().0, 2000);
        assert!("1XB".parse::<ByteSize>().is_err());
        assert!("KiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn rates() {
        let r: Rate = "20/s".parse().unwrap();
        assert_eq!((r.count, r.per), (20, Duration::from_secs(1)));
        assert_eq!("600/min".parse::<Rate>().unwrap().interval(), Duration::from_millis(100));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("20/fortnight".parse::<Rate>().is_err());
        assert!("20".parse::<Rate>().is_err());
    }
}
