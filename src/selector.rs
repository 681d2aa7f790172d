//! Label selectors in Kubernetes syntax (`zone=a,disk in (ssd,nvme),!gpu`), the label key and
//! value rules they check, and matching against a node's or instance's labels. Placement
//! constraints are selectors; the scheduler's placement core reads their `Requirement`s.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Longest label name, and longest label value (Kubernetes' limit).
pub const MAX_NAME_LEN: usize = 63;
/// Longest prefix of a label key (a DNS subdomain).
pub const MAX_PREFIX_LEN: usize = 253;

/// Why a selector, a label key or a label value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The text does not follow the selector grammar at `column` (1-based, in characters).
    #[error("expected {expected} at column {column}, found {found}")]
    Expected {
        /// What the grammar allows there.
        expected: &'static str,
        /// What is there instead: a quoted token or `end of input`.
        found: String,
        /// Where, counting characters from 1.
        column: usize,
    },
    /// A label key that Kubernetes would not accept.
    #[error("'{key}' is not a valid label key: {reason}")]
    InvalidKey {
        /// The key as written.
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A label value that Kubernetes would not accept.
    #[error("'{value}' is not a valid label value: {reason}")]
    InvalidValue {
        /// The value as written.
        value: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// `key in ()` or `key notin ()`.
    #[error("'{key} {op} ()' needs at least one value")]
    EmptySet {
        /// The key of the requirement.
        key: String,
        /// `in` or `notin`.
        op: Operator,
    },
}

/// How a requirement compares a label with its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// `key=value` or `key==value`: the label is present with this value.
    Equals,
    /// `key!=value`: the label is absent or has another value.
    NotEquals,
    /// `key in (a,b)`: the label is present with one of the values.
    In,
    /// `key notin (a,b)`: the label is absent or has none of the values.
    NotIn,
    /// `key`: the label is present, whatever its value.
    Exists,
    /// `!key`: the label is absent.
    DoesNotExist,
}

impl fmt::Display for Operator {
    /// The operator as written in a selector (`=`, `!=`, `in`, `notin`, `exists`, `!`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::Equals => "=",
            Operator::NotEquals => "!=",
            Operator::In => "in",
            Operator::NotIn => "notin",
            Operator::Exists => "exists",
            Operator::DoesNotExist => "!",
        })
    }
}

/// One condition on one label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// The comparison.
    pub op: Operator,
    /// One value for `Equals`/`NotEquals`; one or more, sorted and distinct, for `In`/`NotIn`;
    /// none for `Exists`/`DoesNotExist`.
    pub values: Vec<String>,
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        let listed = value.is_some_and(|v| self.values.contains(v));
        match self.op {
            Operator::Equals | Operator::In => listed,
            Operator::NotEquals | Operator::NotIn => !listed,
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        let first = self.values.first().map_or("", String::as_str);
        match self.op {
            Operator::Equals => write!(f, "{key}={first}"),
            Operator::NotEquals => write!(f, "{key}!={first}"),
            Operator::In => write!(f, "{key} in ({})", self.values.join(",")),
            Operator::NotIn => write!(f, "{key} notin ({})", self.values.join(",")),
            Operator::Exists => write!(f, "{key}"),
            Operator::DoesNotExist => write!(f, "!{key}"),
        }
    }
}

/// A conjunction of requirements; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that requires all of `requirements`.
    pub fn new(requirements: Vec<Requirement>) -> Self {
        Selector { requirements }
    }

    /// The requirements, in the order written.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether there is no requirement (the selector matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for Selector {
    /// The canonical text: requirements joined by `,` without spaces, `=` for equality, set
    /// values sorted (`zone=a,disk in (nvme,ssd),!gpu`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Parses a selector: comma-separated requirements, each one of `key=value`, `key==value`,
/// `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key`, `!key`. Spaces around tokens are
/// ignored; the empty string is the selector that matches everything.
pub fn parse(input: &str) -> Result<Selector, SelectorError> {
    let mut parser = Parser { input, pos: 0 };
    let mut requirements = Vec::new();
    if parser.peek().0 == Token::End {
        return Ok(Selector::new(requirements));
    }
    loop {
        requirements.push(parser.requirement()?);
        match parser.next() {
            (Token::Comma, _) => {}
            (Token::End, _) => return Ok(Selector::new(requirements)),
            (token, at) => return Err(parser.expected("',' or end of input", token, at)),
        }
    }
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// letters, digits, `-`, `_`, `.` that starts and ends with a letter or digit.
pub fn validate_label_key(key: &str) -> Result<(), SelectorError> {
    let invalid = |reason| {
        Err(SelectorError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if key.is_empty() {
        return invalid("must not be empty");
    }
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return invalid(
            "the prefix before '/' must be a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)",
        );
    }
    if name.is_empty() {
        return invalid("the name must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("the name must be at most 63 characters");
    }
    if !is_label_name(name) {
        return invalid(
            "the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit",
        );
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 letters, digits, `-`, `_`, `.` that start and
/// end with a letter or digit.
pub fn validate_label_value(value: &str) -> Result<(), SelectorError> {
    let invalid = |reason| {
        Err(SelectorError::InvalidValue {
            value: value.to_string(),
            reason,
        })
    };
    if value.len() > MAX_NAME_LEN {
        return invalid("must be at most 63 characters");
    }
    if !value.is_empty() && !is_label_name(value) {
        return invalid(
            "must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit",
        );
    }
    Ok(())
}

/// Whether `s` is an RFC 1123 DNS label: 1 to 63 lowercase letters, digits and `-`, starting
/// and ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= MAX_NAME_LEN
        && edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `s` is an RFC 1123 DNS subdomain: DNS labels joined by `.`, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_PREFIX_LEN && s.split('.').all(is_dns_label)
}

/// Letters, digits, `-`, `_`, `.`, starting and ending with a letter or digit (non-empty).
fn is_label_name(s: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A token of the selector grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// A key, a value or the words `in`/`notin`: a run of anything but spaces and `=!(),`.
    Word(&'a str),
    /// `=` or `==`.
    Equals,
    /// `!=`.
    NotEquals,
    /// `!` not followed by `=`.
    Bang,
    LParen,
    RParen,
    Comma,
    End,
}

impl fmt::Display for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "'{w}'"),
            Token::Equals => f.write_str("'='"),
            Token::NotEquals => f.write_str("'!='"),
            Token::Bang => f.write_str("'!'"),
            Token::LParen => f.write_str("'('"),
            Token::RParen => f.write_str("')'"),
            Token::Comma => f.write_str("','"),
            Token::End => f.write_str("end of input"),
        }
    }
}

/// A recursive-descent parser over the input; `pos` is a byte offset.
struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    /// The next token and its byte offset, without consuming it.
    fn peek(&self) -> (Token<'a>, usize) {
        let rest = &self.input[self.pos..];
        let start = self.pos + (rest.len() - rest.trim_start().len());
        let rest = &self.input[start..];
        let token = match rest.chars().next() {
            None => Token::End,
            Some('=') => Token::Equals,
            Some('!') if rest.starts_with("!=") => Token::NotEquals,
            Some('!') => Token::Bang,
            Some('(') => Token::LParen,
            Some(')') => Token::RParen,
            Some(',') => Token::Comma,
            Some(_) => {
                let len = rest
                    .find(|c: char| c.is_whitespace() || "=!(),".contains(c))
                    .unwrap_or(rest.len());
                Token::Word(&rest[..len])
            }
        };
        (token, start)
    }

    /// The next token and its byte offset, consumed.
    fn next(&mut self) -> (Token<'a>, usize) {
        let (token, start) = self.peek();
        let len = match token {
            Token::Word(w) => w.len(),
            Token::NotEquals => 2,
            Token::Equals if self.input[start..].starts_with("==") => 2,
            Token::End => 0,
            _ => 1,
        };
        self.pos = start + len;
        (token, start)
    }

    fn expected(&self, expected: &'static str, found: Token<'_>, at: usize) -> SelectorError {
        SelectorError::Expected {
            expected,
            found: found.to_string(),
            column: self.input[..at].chars().count() + 1,
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let requirement = |key: &str, op, values| Requirement {
            key: key.to_string(),
            op,
            values,
        };
        let key = match self.next() {
            (Token::Bang, _) => {
                let key = self.key()?;
                return Ok(requirement(key, Operator::DoesNotExist, Vec::new()));
            }
            (Token::Word(key), _) => {
                validate_label_key(key)?;
                key
            }
            (token, at) => return Err(self.expected("a label key", token, at)),
        };
        let (token, at) = self.peek();
        let op = match token {
            Token::Comma | Token::End => return Ok(requirement(key, Operator::Exists, Vec::new())),
            Token::Equals => Operator::Equals,
            Token::NotEquals => Operator::NotEquals,
            Token::Word("in") => Operator::In,
            Token::Word("notin") => Operator::NotIn,
            _ => {
                return Err(self.expected(
                    "an operator (=, ==, !=, in, notin), ',' or end of input",
                    token,
                    at,
                ));
            }
        };
        self.next();
        let values = match op {
            Operator::In | Operator::NotIn => self.set(key, op)?,
            _ => vec![self.single_value()?],
        };
        Ok(requirement(key, op, values))
    }

    fn key(&mut self) -> Result<&'a str, SelectorError> {
        match self.next() {
            (Token::Word(key), _) => {
                validate_label_key(key)?;
                Ok(key)
            }
            (token, at) => Err(self.expected("a label key", token, at)),
        }
    }

    /// The value after `=`, `==` or `!=`; nothing before `,` or the end is the empty value.
    fn single_value(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            (Token::Comma | Token::End, _) => Ok(String::new()),
            (Token::Word(value), _) => {
                self.next();
                validate_label_value(value)?;
                Ok(value.to_string())
            }
            (token, at) => Err(self.expected("a label value", token, at)),
        }
    }

    /// `(a,b,…)`, returned sorted and without duplicates.
    fn set(&mut self, key: &str, op: Operator) -> Result<Vec<String>, SelectorError> {
        match self.next() {
            (Token::LParen, _) => {}
            (token, at) => return Err(self.expected("'('", token, at)),
        }
        let mut values = Vec::new();
        if let (Token::RParen, _) = self.peek() {
            return Err(SelectorError::EmptySet {
                key: key.to_string(),
                op,
            });
        }
        loop {
            match self.next() {
                (Token::Word(value), _) => {
                    validate_label_value(value)?;
                    values.push(value.to_string());
                }
                (token, at) => return Err(self.expected("a label value", token, at)),
            }
            match self.next() {
                (Token::Comma, _) => {}
                (Token::RParen, _) => break,
                (token, at) => return Err(self.expected("',' or ')'", token, at)),
            }
        }
        values.sort();
        values.dedup();
        Ok(values)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SelectorVisitor;

        impl Visitor<'_> for SelectorVisitor {
            type Value = Selector;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a label selector like \"disk in (ssd,nvme)\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Selector, E> {
                parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(SelectorVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` and compares its canonical text, or the error message after `error: `.
    #[track_caller]
    fn check(input: &str, expected: &str) {
        let got = match parse(input) {
            Ok(s) => {
                let shown = s.to_string();
                assert_eq!(parse(&shown).as_ref(), Ok(&s), "re-parse of {shown:?}");
                shown
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expected, "{input:?}");
    }

    #[test]
    #[rustfmt::skip]
    fn parse_and_display_table() {
        check("", "");
        check("   ", "");
        check("zone=a", "zone=a");
        check("zone==a", "zone=a");
        check("zone = a", "zone=a");
        check("zone!=a", "zone!=a");
        check("zone=", "zone=");
        check("zone=,gpu", "zone=,gpu");
        check("disk in (ssd,nvme)", "disk in (nvme,ssd)");
        check("disk in ( ssd , nvme , ssd )", "disk in (nvme,ssd)");
        check("disk notin (hdd)", "disk notin (hdd)");
        check("disk in(ssd)", "disk in (ssd)");
        check("gpu", "gpu");
        check("!gpu", "!gpu");
        check("! gpu", "!gpu");
        check("zone=a, disk in (ssd,nvme), !gpu,arch", "zone=a,disk in (nvme,ssd),!gpu,arch");
        check("example.com/tier=gold", "example.com/tier=gold");
        check("in=x", "in=x");
        check("k.s-1_2=V.a-l_1", "k.s-1_2=V.a-l_1");
        check("a,", "error: expected a label key at column 3, found end of input");
        check(",a", "error: expected a label key at column 1, found ','");
        check("a b", "error: expected an operator (=, ==, !=, in, notin), ',' or end of input at column 3, found 'b'");
        check("a=b c", "error: expected ',' or end of input at column 5, found 'c'");
        check("a=(b)", "error: expected a label value at column 3, found '('");
        check("a===b", "error: expected a label value at column 4, found '='");
        check("!a=b", "error: expected ',' or end of input at column 3, found '='");
        check("!", "error: expected a label key at column 2, found end of input");
        check("disk in ssd", "error: expected '(' at column 9, found 'ssd'");
        check("disk in (ssd", "error: expected ',' or ')' at column 13, found end of input");
        check("disk in (ssd,)", "error: expected a label value at column 14, found ')'");
        check("disk in ()", "error: 'disk in ()' needs at least one value");
        check("disk notin ()", "error: 'disk notin ()' needs at least one value");
        check("disk in (ssd nvme)", "error: expected ',' or ')' at column 14, found 'nvme'");
        check("é=x,", "error: 'é' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("-a=b", "error: '-a' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("Example.com/a=b", "error: 'Example.com/a' is not a valid label key: the prefix before '/' must be a DNS subdomain (lowercase letters, digits, '-' and '.', at most 253 characters)");
        check("a/b/c", "error: 'a/b/c' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("example.com/=b", "error: 'example.com/' is not a valid label key: the name must not be empty");
        check(&format!("{}=b", "k".repeat(64)), &format!("error: '{}' is not a valid label key: the name must be at most 63 characters", "k".repeat(64)));
        check(&format!("k={}", "v".repeat(63)), &format!("k={}", "v".repeat(63)));
        check(&format!("k={}", "v".repeat(64)), &format!("error: '{}' is not a valid label value: must be at most 63 characters", "v".repeat(64)));
        check("a=b_", "error: 'b_' is not a valid label value: must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("a in (b,-c)", "error: '-c' is not a valid label value: must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
    }

    /// Matches `selector` against labels written `k=v,k=v` and compares with `expected`.
    #[track_caller]
    fn check_match(selector: &str, labels: &str, expected: bool) {
        let labels: BTreeMap<String, String> = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let s = parse(selector).unwrap();
        assert_eq!(s.matches(&labels), expected, "{selector:?} on {labels:?}");
    }

    #[test]
    #[rustfmt::skip]
    fn matching_table() {
        check_match("", "", true);
        check_match("", "zone=a", true);
        check_match("zone=a", "zone=a", true);
        check_match("zone=a", "zone=b", false);
        check_match("zone=a", "", false);
        check_match("zone=", "zone=", true);
        check_match("zone=", "", false);
        check_match("zone!=a", "zone=b", true);
        check_match("zone!=a", "zone=a", false);
        check_match("zone!=a", "", true);
        check_match("disk in (ssd,nvme)", "disk=nvme", true);
        check_match("disk in (ssd,nvme)", "disk=hdd", false);
        check_match("disk in (ssd,nvme)", "", false);
        check_match("disk notin (ssd,nvme)", "disk=hdd", true);
        check_match("disk notin (ssd,nvme)", "disk=ssd", false);
        check_match("disk notin (ssd,nvme)", "", true);
        check_match("gpu", "gpu=", true);
        check_match("gpu", "zone=a", false);
        check_match("!gpu", "zone=a", true);
        check_match("!gpu", "gpu=nvidia", false);
        check_match("zone=a,disk in (ssd),!gpu", "zone=a,disk=ssd", true);
        check_match("zone=a,disk in (ssd),!gpu", "zone=a,disk=ssd,gpu=x", false);
        check_match("zone=a,disk in (ssd),!gpu", "zone=b,disk=ssd", false);
    }

    #[test]
    fn requirements_are_public_for_the_placement_core() {
        let s = parse("disk in (ssd,nvme),!gpu").unwrap();
        assert_eq!(
            s.requirements(),
            [
                Requirement {
                    key: "disk".into(),
                    op: Operator::In,
                    values: vec!["nvme".into(), "ssd".into()],
                },
                Requirement {
                    key: "gpu".into(),
                    op: Operator::DoesNotExist,
                    values: vec![],
                },
            ]
        );
    }

    #[test]
    fn serde_uses_the_canonical_text() {
        let s: Selector = serde_json::from_str(r#""zone==a, disk in (b,a)""#).unwrap();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#""zone=a,disk in (a,b)""#
        );
        let err = serde_json::from_str::<Selector>(r#""a b""#).unwrap_err();
        assert!(err.to_string().starts_with("expected an operator"), "{err}");
    }
}
