//! Kubernetes-style resource quantities: CPU (`0.5`, `500m`, `2`) and byte sizes (`64Mi`, `1G`,
//! `1.5Gi`, `1e3`), parsed exactly into integers and written back in one canonical form.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a quantity was rejected; every variant carries the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a number with an optional known suffix.
    #[error("'{0}' is not a quantity")]
    Invalid(String),
    /// A CPU amount with an unknown suffix or none of the expected shape.
    #[error("'{0}' is not a cpu quantity (cores like 0.5 or millicores like 500m)")]
    InvalidCpu(String),
    /// A negative amount.
    #[error("'{0}' is negative")]
    Negative(String),
    /// A CPU amount finer than one millicore.
    #[error("'{0}' is finer than a millicore (at most 3 decimals)")]
    TooPrecise(String),
    /// A byte size that is not a whole number of bytes.
    #[error("'{0}' is not a whole number of bytes")]
    Fractional(String),
    /// An amount that does not fit in 64 bits.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// An amount of CPU in millicores (`1000` is one core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cpu(u64);

impl Cpu {
    /// The amount of `millis` millicores.
    pub const fn from_millis(millis: u64) -> Self {
        Cpu(millis)
    }

    /// The amount in millicores.
    pub const fn millis(self) -> u64 {
        self.0
    }
}

impl FromStr for Cpu {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (number, millis) = match s.strip_suffix('m') {
            Some(number) => (number, true),
            None => (s, false),
        };
        let decimal = match parse_decimal(number) {
            Some(Ok(d)) => d,
            Some(Err(Sign::Negative)) => return Err(QuantityError::Negative(s.to_string())),
            None => return Err(QuantityError::InvalidCpu(s.to_string())),
        };
        let unit_scale = if millis { 0 } else { 3 };
        if decimal.scale > unit_scale {
            return Err(QuantityError::TooPrecise(s.to_string()));
        }
        let value = 10u128
            .checked_pow(unit_scale - decimal.scale)
            .and_then(|f| decimal.mantissa.checked_mul(f))
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| QuantityError::TooLarge(s.to_string()))?;
        Ok(Cpu(value))
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

/// A size in bytes (memory, tmpfs sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(u64);

impl Bytes {
    /// A size of `bytes` bytes.
    pub const fn new(bytes: u64) -> Self {
        Bytes(bytes)
    }

    /// The size in bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Binary suffixes, smallest first: `Ki` is 1024¹ … `Ei` is 1024⁶.
const BINARY: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
/// Decimal suffixes, smallest first: `k` is 1000¹ … `E` is 1000⁶.
const DECIMAL: [&str; 6] = ["k", "M", "G", "T", "P", "E"];

impl FromStr for Bytes {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || QuantityError::Invalid(s.to_string());
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        let decimal = match parse_decimal(number) {
            Some(Ok(d)) => d,
            Some(Err(Sign::Negative)) if parse_suffix(suffix).is_some() => {
                return Err(QuantityError::Negative(s.to_string()));
            }
            _ => return Err(invalid()),
        };
        let (multiplier, exponent) = parse_suffix(suffix).ok_or_else(invalid)?;
        let too_large = || QuantityError::TooLarge(s.to_string());
        let product = decimal
            .mantissa
            .checked_mul(multiplier)
            .ok_or_else(too_large)?;
        // value = mantissa × multiplier × 10^(exponent − scale), which must be a whole number.
        let exponent = exponent - i64::from(decimal.scale);
        let value = if product == 0 {
            0
        } else if exponent >= 0 {
            let factor = u32::try_from(exponent)
                .ok()
                .and_then(|e| 10u128.checked_pow(e))
                .ok_or_else(too_large)?;
            product.checked_mul(factor).ok_or_else(too_large)?
        } else {
            let divisor = u32::try_from(-exponent)
                .ok()
                .and_then(|e| 10u128.checked_pow(e))
                .ok_or_else(|| QuantityError::Fractional(s.to_string()))?;
            if !product.is_multiple_of(divisor) {
                return Err(QuantityError::Fractional(s.to_string()));
            }
            product / divisor
        };
        u64::try_from(value).map(Bytes).map_err(|_| too_large())
    }
}

impl fmt::Display for Bytes {
    /// The exact form with the smallest number in front of a suffix (`1Gi`, `1G`, `1536Mi`,
    /// `100k`), binary on a tie; plain bytes when no suffix divides the size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut best: Option<(u64, &str)> = None;
        for (suffixes, base) in [(BINARY, 1024u64), (DECIMAL, 1000u64)] {
            let mut unit = 1u64;
            for suffix in suffixes {
                let Some(next) = unit.checked_mul(base) else {
                    break;
                };
                unit = next;
                if self.0 != 0
                    && self.0.is_multiple_of(unit)
                    && best.is_none_or(|(quotient, _)| self.0 / unit < quotient)
                {
                    best = Some((self.0 / unit, suffix));
                }
            }
        }
        match best {
            Some((quotient, suffix)) => write!(f, "{quotient}{suffix}"),
            None => write!(f, "{}", self.0),
        }
    }
}

/// A non-negative decimal number as written: `mantissa × 10^-scale`.
struct Decimal {
    mantissa: u128,
    scale: u32,
}

/// A number that parsed but has a sign that quantities do not take.
enum Sign {
    Negative,
}

/// Parses `[+|-]digits[.digits]` (at least one digit). `None` is a syntax error.
fn parse_decimal(s: &str) -> Option<Result<Decimal, Sign>> {
    let (negative, unsigned) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !digits(whole) || !digits(fraction) {
        return None;
    }
    // Trailing zeros of the fraction change nothing (`0.50` is `0.5`).
    let fraction = fraction.trim_end_matches('0');
    let mut mantissa = 0u128;
    for b in whole.bytes().chain(fraction.bytes()) {
        // Saturating keeps an absurdly long number "too large" rather than failing to parse.
        mantissa = mantissa
            .saturating_mul(10)
            .saturating_add(u128::from(b - b'0'));
    }
    if negative && mantissa != 0 {
        return Some(Err(Sign::Negative));
    }
    let scale = u32::try_from(fraction.len()).unwrap_or(u32::MAX);
    Some(Ok(Decimal { mantissa, scale }))
}

/// The multiplier and power of ten of a byte-size suffix: ``, `Ki`…`Ei`, `k`…`E`, `e3`, `E-2`.
fn parse_suffix(suffix: &str) -> Option<(u128, i64)> {
    if suffix.is_empty() {
        return Some((1, 0));
    }
    if let Some(i) = BINARY.iter().position(|s| *s == suffix) {
        return Some((1u128 << (10 * (i + 1)), 0));
    }
    if let Some(i) = DECIMAL.iter().position(|s| *s == suffix) {
        return Some((1, 3 * (i as i64 + 1)));
    }
    // An exponent: `e`/`E` then a signed integer (`E` alone is the exa suffix, handled above).
    let exponent = suffix.strip_prefix(['e', 'E'])?;
    let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // An exponent beyond any 64-bit size saturates, so it reads as too large or fractional.
    let magnitude: i64 = unsigned.parse().unwrap_or(i64::from(i32::MAX));
    Some((
        1,
        if exponent.starts_with('-') {
            -magnitude
        } else {
            magnitude
        },
    ))
}

/// Deserializes a quantity from a string or a number (YAML `cpu: 0.5`, JSON `"memory": 512`).
struct QuantityVisitor<T>(std::marker::PhantomData<T>, &'static str);

impl<T> Visitor<'_> for QuantityVisitor<T>
where
    T: FromStr<Err = QuantityError>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // Rust prints floats without an exponent and with the shortest exact digits
        // (0.1 → "0.1", 1e3 → "1000"), which is what the user wrote as far as it matters.
        self.visit_str(&v.to_string())
    }
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(QuantityVisitor(
            std::marker::PhantomData,
            "a cpu quantity like 0.5 or 500m",
        ))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(QuantityVisitor(
            std::marker::PhantomData,
            "a byte quantity like 64Mi or 1G",
        ))
    }
}

impl Serialize for Cpu {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` as CPU and compares millicores, or the error message after `error: `.
    #[track_caller]
    fn check_cpu(input: &str, expected: &str) {
        let got = match input.parse::<Cpu>() {
            Ok(c) => c.millis().to_string(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expected, "cpu {input:?}");
    }

    #[track_caller]
    fn check_bytes(input: &str, expected: &str) {
        let got = match input.parse::<Bytes>() {
            Ok(b) => b.get().to_string(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expected, "bytes {input:?}");
    }

    #[test]
    #[rustfmt::skip]
    fn cpu_table() {
        check_cpu("0.5", "500");
        check_cpu("500m", "500");
        check_cpu("2", "2000");
        check_cpu("1.25", "1250");
        check_cpu("0.001", "1");
        check_cpu("0.5000", "500");
        check_cpu(".5", "500");
        check_cpu("+1", "1000");
        check_cpu("0", "0");
        check_cpu("-0", "0");
        check_cpu("1500m", "1500");
        check_cpu("0.0005", "error: '0.0005' is finer than a millicore (at most 3 decimals)");
        check_cpu("0.5m", "error: '0.5m' is finer than a millicore (at most 3 decimals)");
        check_cpu("-0.5", "error: '-0.5' is negative");
        check_cpu("-500m", "error: '-500m' is negative");
        check_cpu("", "error: '' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu("m", "error: 'm' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu("abc", "error: 'abc' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu("2k", "error: '2k' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu("1.2.3", "error: '1.2.3' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu(" 1", "error: ' 1' is not a cpu quantity (cores like 0.5 or millicores like 500m)");
        check_cpu("18446744073709551615m", "18446744073709551615");
        check_cpu("18446744073709551616m", "error: '18446744073709551616m' is too large");
        check_cpu("18446744073709552", "error: '18446744073709552' is too large");
    }

    #[test]
    #[rustfmt::skip]
    fn bytes_table() {
        check_bytes("512", "512");
        check_bytes("64Mi", "67108864");
        check_bytes("1G", "1000000000");
        check_bytes("1.5Gi", "1610612736");
        check_bytes("100k", "100000");
        check_bytes("1Ki", "1024");
        check_bytes("1Ti", "1099511627776");
        check_bytes("1Pi", "1125899906842624");
        check_bytes("1Ei", "1152921504606846976");
        check_bytes("1E", "1000000000000000000");
        check_bytes("1e3", "1000");
        check_bytes("1E3", "1000");
        check_bytes("1.5e3", "1500");
        check_bytes("1000e-3", "1");
        check_bytes("2e+2", "200");
        check_bytes("0.5Ki", "512");
        check_bytes("0", "0");
        check_bytes("0Mi", "0");
        check_bytes("15Ei", "17293822569102704640");
        check_bytes("16Ei", "error: '16Ei' is too large");
        check_bytes("19E", "error: '19E' is too large");
        check_bytes("1e20", "error: '1e20' is too large");
        check_bytes("1e99999999999999", "error: '1e99999999999999' is too large");
        check_bytes("99999999999999999999999999999999999999999", "error: '99999999999999999999999999999999999999999' is too large");
        check_bytes("1.5", "error: '1.5' is not a whole number of bytes");
        check_bytes("1e-3", "error: '1e-3' is not a whole number of bytes");
        check_bytes("0.1k1", "error: '0.1k1' is not a quantity");
        check_bytes("-1Gi", "error: '-1Gi' is negative");
        check_bytes("64Q", "error: '64Q' is not a quantity");
        check_bytes("64mi", "error: '64mi' is not a quantity");
        check_bytes("500m", "error: '500m' is not a quantity");
        check_bytes("Mi", "error: 'Mi' is not a quantity");
        check_bytes("", "error: '' is not a quantity");
        check_bytes("1e", "error: '1e' is not a quantity");
        check_bytes("1 Gi", "error: '1 Gi' is not a quantity");
        check_bytes("-Gi", "error: '-Gi' is not a quantity");
    }

    #[test]
    fn canonical_form_round_trips() {
        #[track_caller]
        fn check(input: &str, expected: &str) {
            let b: Bytes = input.parse().unwrap();
            assert_eq!(b.to_string(), expected, "display of {input:?}");
            assert_eq!(
                expected.parse::<Bytes>().unwrap(),
                b,
                "re-parse of {expected:?}"
            );
        }
        check("0", "0");
        check("512", "512");
        check("1024", "1Ki");
        check("1.5Gi", "1536Mi");
        check("1G", "1G");
        check("1T", "1T");
        check("100k", "100k");
        check("1e3", "1k");
        check("2048000", "2000Ki");
        check("15Ei", "15Ei");
        check("18446744073709551615", "18446744073709551615");

        #[track_caller]
        fn check_cpu(input: &str, expected: &str) {
            let c: Cpu = input.parse().unwrap();
            assert_eq!(c.to_string(), expected, "display of {input:?}");
            assert_eq!(
                expected.parse::<Cpu>().unwrap(),
                c,
                "re-parse of {expected:?}"
            );
        }
        check_cpu("0.5", "500m");
        check_cpu("2", "2");
        check_cpu("2000m", "2");
        check_cpu("1.5", "1500m");
        check_cpu("0", "0");
    }

    #[test]
    #[rustfmt::skip]
    fn serde_takes_strings_and_numbers() {
        #[track_caller]
        fn check(json: &str, expected: &str) {
            let got = match serde_json::from_str::<(Cpu, Bytes)>(json) {
                Ok((c, b)) => serde_json::to_string(&(c, b)).unwrap(),
                Err(e) => format!("error: {e}"),
            };
            assert_eq!(got, expected, "{json}");
        }
        check(r#"["0.5", "64Mi"]"#, r#"["500m","64Mi"]"#);
        check(r#"[2, 512]"#, r#"["2","512"]"#);
        check(r#"[0.25, 1e3]"#, r#"["250m","1k"]"#);
        check(r#"[-1, 1]"#, "error: '-1' is negative at line 1 column 3");
        check(r#"[1, 1.5]"#, "error: '1.5' is not a whole number of bytes at line 1 column 7");
        check(r#"[0.0001, 1]"#, "error: '0.0001' is finer than a millicore (at most 3 decimals) at line 1 column 7");
        check(r#"[true, 1]"#, "error: invalid type: boolean `true`, expected a cpu quantity like 0.5 or 500m at line 1 column 5");
    }
}
