//! Image references normalised the way Docker does, and the pull policy that decides whether a
//! reference must be fetched.
//!
//! `busybox` means `docker.io/library/busybox:latest`; the first path component is a registry
//! only when it looks like a host (it has a `.` or a `:`, or it is `localhost`). Only `sha256`
//! digests are accepted, since that is the only algorithm the store addresses content by.

use std::fmt;
use std::str::FromStr;

/// The registry a reference without a host name belongs to.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a reference with neither tag nor digest means.
pub const DEFAULT_TAG: &str = "latest";
/// The longest repository name Docker accepts (host included).
const MAX_NAME_LEN: usize = 255;
/// The longest tag Docker accepts.
const MAX_TAG_LEN: usize = 128;

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The string is empty.
    #[error("empty image reference")]
    Empty,
    /// The repository name breaks Docker's grammar.
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The digest is not `sha256:` and 64 lowercase hex digits.
    #[error("invalid digest {digest:?} in image reference (expected sha256:<64 hex digits>)")]
    Digest {
        /// The digest as given.
        digest: String,
    },
    /// A pull policy name that is not one of the three.
    #[error("unknown pull policy {0:?} (expected always, if-not-present or never)")]
    Policy(String),
}

/// A fully qualified image reference: `registry/repository[:tag][@sha256:…]`.
///
/// At least one of `tag` and `digest` is set; a reference that named neither gets the `latest`
/// tag, as with Docker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// The registry host, with its port if any (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path inside the registry (`library/busybox`).
    pub repository: String,
    /// The tag, if the reference names one.
    pub tag: Option<String>,
    /// The manifest digest, if the reference names one (`sha256:…`).
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses and normalises a reference as Docker does.
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let invalid = |reason| ReferenceError::Invalid {
            reference: s.to_string(),
            reason,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest)?;
                (rest, Some(digest.to_string()))
            }
            None => (s, None),
        };
        // A tag follows the last ':' only if no '/' comes after it: "host:5000/name" has none.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        if name.is_empty() {
            return Err(invalid("missing repository name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid("repository name longer than 255 characters"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, path)
            }
            _ => (DEFAULT_REGISTRY, name),
        };
        validate_registry(registry).map_err(invalid)?;
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DEFAULT_REGISTRY
        } else {
            registry
        };
        for component in path.split('/') {
            validate_component(component).map_err(invalid)?;
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(ImageRef {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The short form Docker prints: `busybox:latest` rather than
    /// `docker.io/library/busybox:latest`.
    pub fn familiar(&self) -> String {
        let full = self.to_string();
        if self.registry != DEFAULT_REGISTRY {
            return full;
        }
        let rest = &full[DEFAULT_REGISTRY.len() + 1..];
        rest.strip_prefix("library/").unwrap_or(rest).to_string()
    }

    /// Whether the reference means "whatever `latest` is now": tagged `latest` and no digest.
    pub fn is_latest(&self) -> bool {
        self.digest.is_none() && self.tag.as_deref() == Some(DEFAULT_TAG)
    }

    /// The same name with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<ImageRef, ReferenceError> {
        validate_tag(tag).map_err(|reason| ReferenceError::Invalid {
            reference: format!("{}:{tag}", self.name()),
            reason,
        })?;
        Ok(ImageRef {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<ImageRef, ReferenceError> {
        ImageRef::parse(s)
    }
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits.
pub fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(()),
        _ => Err(ReferenceError::Digest {
            digest: digest.to_string(),
        }),
    }
}

/// Whether `hex` is 64 lowercase hex digits.
pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn validate_tag(tag: &str) -> Result<(), &'static str> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok {
        return Err("a tag starts with a letter, a digit or '_'");
    }
    if tag.len() > MAX_TAG_LEN {
        return Err("a tag is at most 128 characters");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err("a tag may hold only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

fn validate_registry(registry: &str) -> Result<(), &'static str> {
    let (host, port) = match registry.rsplit_once(':') {
        // An IPv6 literal in brackets has colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (registry, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("invalid registry port");
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
    } else {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if host_ok {
        Ok(())
    } else {
        Err("invalid registry host")
    }
}

/// One path component: lowercase letters and digits, separated by `.`, `_`, `__` or runs of `-`.
fn validate_component(component: &str) -> Result<(), &'static str> {
    if component.is_empty() {
        return Err("empty path component in repository name");
    }
    if component.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository name must be lowercase");
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err("a repository path component starts and ends with a letter or digit");
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err("invalid separator in repository name");
        }
    }
    Ok(())
}

/// When an image is fetched from its registry rather than taken from the local store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PullPolicy {
    /// Pull every time (a tag may have moved).
    Always,
    /// Pull only when the store does not hold the reference.
    IfNotPresent,
    /// Never pull: a missing image is an error.
    Never,
}

/// What to do for one reference under a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullDecision {
    /// Fetch from the registry.
    Pull,
    /// Use the image the store already holds.
    UseLocal,
    /// The image is absent and the policy forbids pulling it.
    Missing,
}

impl PullPolicy {
    /// Kubernetes' default: `Always` for a reference that means `latest` (no tag, or the
    /// `latest` tag, and no digest), `IfNotPresent` otherwise.
    pub fn default_for(reference: &ImageRef) -> PullPolicy {
        if reference.is_latest() {
            PullPolicy::Always
        } else {
            PullPolicy::IfNotPresent
        }
    }

    /// What this policy does given whether the store holds the reference.
    pub fn decide(self, present: bool) -> PullDecision {
        match (self, present) {
            (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => PullDecision::Pull,
            (PullPolicy::IfNotPresent, true) | (PullPolicy::Never, true) => PullDecision::UseLocal,
            (PullPolicy::Never, false) => PullDecision::Missing,
        }
    }
}

impl FromStr for PullPolicy {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<PullPolicy, ReferenceError> {
        match s {
            "always" | "Always" => Ok(PullPolicy::Always),
            "if-not-present" | "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
            "never" | "Never" => Ok(PullPolicy::Never),
            other => Err(ReferenceError::Policy(other.to_string())),
        }
    }
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_like_docker() {
        let cases: &[(&str, &str)] = &[
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("host:5000/ns/name:tag", "host:5000/ns/name:tag"),
            ("host:5000/name", "host:5000/name:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/a/b/c", "localhost:5000/a/b/c:latest"),
            (
                "127.0.0.1:5000/test/busybox:1",
                "127.0.0.1:5000/test/busybox:1",
            ),
            (
                "quay.io/a-b/c_d.e__f:T_1.0-x",
                "quay.io/a-b/c_d.e__f:T_1.0-x",
            ),
            ("a--b", "docker.io/library/a--b:latest"),
            ("[::1]:5000/x", "[::1]:5000/x:latest"),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.to_string(), *want, "{input}");
            // Normalisation is idempotent.
            assert_eq!(ImageRef::parse(want).unwrap(), got, "{want}");
        }
    }

    #[test]
    fn digests() {
        let r = ImageRef::parse(&format!("busybox@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{D}"));
        let r = ImageRef::parse(&format!("host:5000/x:1@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.to_string(), format!("host:5000/x:1@{D}"));
        assert!(!r.is_latest());
    }

    #[test]
    fn rejects_bad_references() {
        let bad = [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "busybox:a/b",
            ":tag",
            "/busybox",
            "busybox/",
            "a//b",
            "-a",
            "a.",
            "a...b",
            "a___b",
            "host:port/x",
            "host:123456/x",
            "bad_host.com/x",
            "busybox@sha256:abc",
            "busybox@md5:0123456789abcdef0123456789abcdef",
            &format!("busybox@{}", D.to_uppercase()),
            "busybox:tag with space",
        ];
        for input in bad {
            assert!(
                ImageRef::parse(input).is_err(),
                "{input:?} should be refused"
            );
        }
        let long_tag = format!("busybox:{}", "a".repeat(129));
        assert!(ImageRef::parse(&long_tag).is_err());
        let long_name = "a".repeat(256);
        assert!(ImageRef::parse(&long_name).is_err());
    }

    #[test]
    fn familiar_names() {
        let cases = [
            ("busybox", "busybox:latest"),
            ("user/app:v1", "user/app:v1"),
            ("host:5000/name:t", "host:5000/name:t"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().familiar(), want);
        }
    }

    #[test]
    fn default_pull_policy() {
        let cases = [
            ("busybox", PullPolicy::Always),
            ("busybox:latest", PullPolicy::Always),
            ("busybox:1.36", PullPolicy::IfNotPresent),
            (&format!("busybox@{D}") as &str, PullPolicy::IfNotPresent),
            (&format!("busybox:latest@{D}"), PullPolicy::IfNotPresent),
        ];
        for (input, want) in cases {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(PullPolicy::default_for(&r), want, "{input}");
        }
    }

    #[test]
    fn pull_decisions() {
        use PullDecision::*;
        use PullPolicy::*;
        let cases = [
            (Always, false, Pull),
            (Always, true, Pull),
            (IfNotPresent, false, Pull),
            (IfNotPresent, true, UseLocal),
            (Never, false, Missing),
            (Never, true, UseLocal),
        ];
        for (policy, present, want) in cases {
            assert_eq!(policy.decide(present), want, "{policy} {present}");
        }
        for (s, p) in [
            ("always", Always),
            ("if-not-present", IfNotPresent),
            ("never", Never),
        ] {
            assert_eq!(s.parse::<PullPolicy>().unwrap(), p);
            assert_eq!(p.to_string(), s);
        }
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
