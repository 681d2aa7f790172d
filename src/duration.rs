//! Durations written the Go and Kubernetes way (`1s`, `5m`, `1h30m`, `250ms`, `1.5h`), parsed
//! exactly to nanoseconds and written back in one canonical form.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a duration was rejected; every variant carries the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a sequence of numbers with units.
    #[error("'{0}' is not a duration (like 10s, 1m30s or 250ms)")]
    Invalid(String),
    /// A number without a unit (other than `0`).
    #[error("'{0}' is missing a unit (like 10s, 5m or 250ms)")]
    MissingUnit(String),
    /// A unit that is none of `ns`, `us`, `ms`, `s`, `m`, `h`.
    #[error("'{input}' has an unknown unit '{unit}' (use ns, us, ms, s, m or h)")]
    UnknownUnit {
        /// The duration as written.
        input: String,
        /// The unit that is not known.
        unit: String,
    },
    /// A negative duration.
    #[error("'{0}' is negative")]
    Negative(String),
    /// A duration beyond what 64 bits of nanoseconds hold (about 584 years).
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// A non-negative span of time with nanosecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// No time at all.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }

    /// The same span as a standard library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whether this is no time at all.
    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Unit suffixes and their length in nanoseconds; `µs` and `μs` are Go's spellings of `us`.
const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("h", 3600 * NANOS_PER_SEC),
];

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DurationError::Invalid(s.to_string());
        let too_large = || DurationError::TooLarge(s.to_string());
        let unsigned = match s.strip_prefix('-') {
            Some(rest) => {
                // Go accepts "-0s"; any other negative duration has no meaning in a spec.
                return match rest.parse::<Duration>() {
                    Ok(d) if d.is_zero() => Ok(d),
                    Ok(_) => Err(DurationError::Negative(s.to_string())),
                    Err(_) => Err(invalid()),
                };
            }
            None => s.strip_prefix('+').unwrap_or(s),
        };
        if unsigned == "0" {
            return Ok(Duration::ZERO);
        }
        if unsigned.is_empty() {
            return Err(invalid());
        }
        let mut nanos: u128 = 0;
        let mut rest = unsigned;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(number_len);
            let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
            if whole.len() + fraction.len() == 0 || fraction.contains('.') {
                return Err(invalid());
            }
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            if unit.is_empty() {
                return Err(DurationError::MissingUnit(s.to_string()));
            }
            let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
                return Err(DurationError::UnknownUnit {
                    input: s.to_string(),
                    unit: unit.to_string(),
                });
            };
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| too_large())?
            };
            // Digits beyond the 19th of a fraction are below a nanosecond even for hours, so they
            // are dropped (Go truncates the same way).
            let fraction = &fraction[..fraction.len().min(19)];
            let fraction_nanos = if fraction.is_empty() {
                0
            } else {
                let digits: u128 = fraction.parse().map_err(|_| invalid())?;
                let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(19));
                digits * unit_nanos / scale
            };
            nanos = whole
                .checked_mul(unit_nanos)
                .and_then(|n| n.checked_add(fraction_nanos))
                .and_then(|n| n.checked_add(nanos))
                .ok_or_else(too_large)?;
            rest = next;
        }
        let nanos = u64::try_from(nanos).map_err(|_| too_large())?;
        Ok(Duration(std::time::Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    /// Hours, minutes and seconds with zero parts left out (`1h30m`, `1m30s`, `1.5s`); below a
    /// second the largest of `ms`, `us`, `ns` (`250ms`, `1.5ms`); `0s` for zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos < 1_000 {
            return write!(f, "{nanos}ns");
        }
        if nanos < 1_000_000 {
            return write!(f, "{}us", Decimal(nanos, 1_000));
        }
        if nanos < NANOS_PER_SEC {
            return write!(f, "{}ms", Decimal(nanos, 1_000_000));
        }
        let secs = self.0.as_secs();
        let (hours, minutes) = (secs / 3600, secs % 3600 / 60);
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        let rest = nanos % (60 * NANOS_PER_SEC);
        if rest > 0 {
            write!(f, "{}s", Decimal(rest, NANOS_PER_SEC))?;
        }
        Ok(())
    }
}

/// `value / unit` written with as many decimals as it needs (`1500, 1000` → `1.5`).
struct Decimal(u128, u128);

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Decimal(value, unit) = *self;
        write!(f, "{}", value / unit)?;
        let remainder = value % unit;
        if remainder > 0 {
            let width = unit.ilog10() as usize;
            let digits = format!("{remainder:0width$}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 10s, 1m30s or 250ms")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }

            // A bare number is read as written, so `0` is accepted and `30` asks for a unit.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                self.visit_str(&v.to_string())
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` and compares its canonical form, or the error message after `error: `.
    #[track_caller]
    fn check(input: &str, expected: &str) {
        let got = match input.parse::<Duration>() {
            Ok(d) => {
                let shown = d.to_string();
                assert_eq!(shown.parse::<Duration>(), Ok(d), "re-parse of {shown:?}");
                shown
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expected, "{input:?}");
    }

    #[test]
    #[rustfmt::skip]
    fn parse_and_display_table() {
        check("1s", "1s");
        check("5m", "5m");
        check("1h30m", "1h30m");
        check("90m", "1h30m");
        check("90s", "1m30s");
        check("250ms", "250ms");
        check("1.5s", "1.5s");
        check("1.5h", "1h30m");
        check(".5s", "500ms");
        check("1h0m5s", "1h5s");
        check("2h45m30.25s", "2h45m30.25s");
        check("1500ms", "1.5s");
        check("1500us", "1.5ms");
        check("1500µs", "1.5ms");
        check("1500μs", "1.5ms");
        check("999ns", "999ns");
        check("1000ns", "1us");
        check("1m1ms", "1m0.001s");
        check("0", "0s");
        check("0s", "0s");
        check("-0s", "0s");
        check("+5s", "5s");
        check("48h", "48h");
        check("1.000000001s", "1.000000001s");
        check("1.0000000009s", "1s");
        check("0.1ns", "0s");
        check("30", "error: '30' is missing a unit (like 10s, 5m or 250ms)");
        check("1h30", "error: '1h30' is missing a unit (like 10s, 5m or 250ms)");
        check("1d", "error: '1d' has an unknown unit 'd' (use ns, us, ms, s, m or h)");
        check("5 s", "error: '5 s' has an unknown unit ' s' (use ns, us, ms, s, m or h)");
        check("-1s", "error: '-1s' is negative");
        check("", "error: '' is not a duration (like 10s, 1m30s or 250ms)");
        check("s", "error: 's' is not a duration (like 10s, 1m30s or 250ms)");
        check("1..5s", "error: '1..5s' is not a duration (like 10s, 1m30s or 250ms)");
        check("-x", "error: '-x' is not a duration (like 10s, 1m30s or 250ms)");
        check("5124095h", "5124095h");
        check("5124096h", "error: '5124096h' is too large");
        check("99999999999999999999999999999999999999999h", "error: '99999999999999999999999999999999999999999h' is too large");
    }

    #[test]
    #[rustfmt::skip]
    fn serde_takes_strings_and_zero() {
        #[track_caller]
        fn check(json: &str, expected: &str) {
            let got = match serde_json::from_str::<Duration>(json) {
                Ok(d) => serde_json::to_string(&d).unwrap(),
                Err(e) => format!("error: {e}"),
            };
            assert_eq!(got, expected, "{json}");
        }
        check(r#""1h30m""#, r#""1h30m""#);
        check("0", r#""0s""#);
        check("10", "error: '10' is missing a unit (like 10s, 5m or 250ms) at line 1 column 2");
        check("[]", "error: invalid type: sequence, expected a duration like 10s, 1m30s or 250ms at line 1 column 2");
    }
}
