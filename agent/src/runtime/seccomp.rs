//! Container seccomp policy: reads Docker-format profiles and turns one into the OCI `linux.seccomp` section for a given container.
//!
//! The policy itself is data (`deploy/seccomp.json`, reviewed like code); this module only
//! selects the rules that apply to a container (its capabilities, the machine's architecture
//! and, optionally, the kernel version), checks them, and merges them into a compact filter.
//! The profile format is moby's `profiles/seccomp/default.json`, so an operator can hand
//! Gantry a profile written for Docker.
//!
//! One runtime quirk shapes the output: libcontainer 0.7 reads a `SCMP_CMP_MASKED_EQ`
//! comparison's `value` and `valueTwo` the other way round from the runtime spec and runc,
//! and with Docker's encoding the clone rule then lets every namespace flag through. The
//! section [`oci_seccomp`] returns is therefore encoded for libcontainer; [`spec_encoding`]
//! re-encodes it for runc or crun. Either encoding given to the other runtime is a silent
//! hole, not an error.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::{
    OciSpecError,
    runtime::{
        Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
        LinuxSeccompBuilder, LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
        LinuxSyscallBuilder,
    },
};
use serde::{Deserialize, Deserializer};

/// The profile shipped in `deploy/seccomp.json`, compiled in so that a node never starts a
/// container without a filter because a file went missing.
const DEFAULT_PROFILE_JSON: &str = include_str!("../../../deploy/seccomp.json");

/// How errors about the built-in profile name it.
const DEFAULT_PROFILE_ORIGIN: &str = "deploy/seccomp.json (built in)";

/// EPERM, the errno runtimes use when an errno rule names none.
const EPERM: u32 = 1;

/// The number of syscall arguments seccomp can inspect.
const SYSCALL_ARGS: u32 = 6;

/// Errors from loading a profile or building a container's filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile file could not be read.
    #[error("failed to read seccomp profile {path}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The profile is not valid JSON or does not have the profile's shape.
    #[error("failed to parse seccomp profile {origin}")]
    Parse {
        /// The file (or built-in profile) being parsed.
        origin: String,
        /// The JSON error, with line and column.
        source: serde_json::Error,
    },
    /// The profile parsed but breaks a rule this loader enforces.
    #[error("invalid seccomp profile {origin}: {reason}")]
    InvalidProfile {
        /// The file (or built-in profile) being checked.
        origin: String,
        /// What is wrong and where.
        reason: String,
    },
    /// A kernel version (from `minKernel` or `uname`) is not of the form `major.minor`.
    #[error("invalid kernel version {version:?}: expected major.minor")]
    InvalidKernelVersion {
        /// The text that did not parse.
        version: String,
    },
    /// A capability handed to [`oci_seccomp`] is not spelled like `CAP_SYS_ADMIN`.
    #[error("invalid capability name {cap:?}: expected the CAP_ form, e.g. CAP_SYS_ADMIN")]
    InvalidCapability {
        /// The name that was given.
        cap: String,
    },
    /// The machine's architecture has no seccomp equivalent known to this module.
    #[error("unsupported architecture {arch:?} for seccomp")]
    UnsupportedArch {
        /// The architecture name, as in `std::env::consts::ARCH`.
        arch: String,
    },
    /// After selecting rules for a container, one syscall would get two different outcomes.
    #[error(
        "conflicting seccomp rules for syscall {name}: {first} and {second} both apply to this container"
    )]
    ConflictingRules {
        /// The syscall.
        name: String,
        /// One outcome, with whether it depends on arguments.
        first: String,
        /// The other outcome.
        second: String,
    },
    /// oci-spec refused to build the section.
    #[error("failed to build the oci seccomp section")]
    Build {
        /// oci-spec's error.
        source: OciSpecError,
    },
}

/// A parsed and checked seccomp profile in Docker's format.
///
/// Build one with [`default_profile`], [`load_profile`] or [`parse_profile`]; turn it into a
/// container's filter with [`oci_seccomp`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default, deserialize_with = "null_as_default")]
    arch_map: Vec<ArchMapEntry>,
    /// moby's older alternative to `archMap`: a fixed list of architectures.
    #[serde(default, deserialize_with = "null_as_default")]
    architectures: Vec<Arch>,
    #[serde(default, deserialize_with = "null_as_default")]
    flags: Vec<LinuxSeccompFilterFlag>,
    #[serde(default, deserialize_with = "null_as_default")]
    syscalls: Vec<Rule>,
}

/// One `archMap` entry: a machine architecture and the others it can run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ArchMapEntry {
    architecture: Arch,
    #[serde(default, deserialize_with = "null_as_default")]
    sub_architectures: Vec<Arch>,
}

/// One entry of `syscalls`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    names: Vec<String>,
    action: LinuxSeccompAction,
    #[serde(default, deserialize_with = "null_as_default")]
    args: Vec<Arg>,
    #[serde(default)]
    errno_ret: Option<u32>,
    // Kept only so that reviewers can write down why a rule exists.
    #[serde(default)]
    #[allow(dead_code)]
    comment: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    includes: Filter,
    #[serde(default, deserialize_with = "null_as_default")]
    excludes: Filter,
}

/// When a rule applies: `includes` must all hold, any `excludes` match drops the rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Filter {
    #[serde(default, deserialize_with = "null_as_default")]
    caps: Vec<String>,
    /// Docker's architecture names (Go's: `amd64`, `arm64`, …), see [`NATIVE_ARCHES`].
    #[serde(default, deserialize_with = "null_as_default")]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<KernelVersion>,
}

/// A comparison of one syscall argument; `value` and `valueTwo` mean what libseccomp's
/// `datum_a` and `datum_b` mean (for `SCMP_CMP_MASKED_EQ`: mask, then expected value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Arg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: LinuxSeccompOperator,
}

/// A kernel version, as far as seccomp profiles care: major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct KernelVersion {
    /// The major version, 6 in 6.18.
    pub major: u32,
    /// The minor version, 18 in 6.18.
    pub minor: u32,
}

impl KernelVersion {
    /// Parses `major.minor`, ignoring whatever follows, so both a profile's `"4.8"` and a
    /// `uname -r` release such as `"6.18.44-fc-v782"` work.
    pub fn parse(version: &str) -> Result<Self, SeccompError> {
        let invalid = || SeccompError::InvalidKernelVersion {
            version: version.to_owned(),
        };
        let (major, rest) = version.split_once('.').ok_or_else(invalid)?;
        let minor_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (minor, tail) = rest.split_at(minor_len);
        // After the minor number only a patch level or a release suffix may follow.
        if !(tail.is_empty() || tail.starts_with(['.', '-', '+', '_'])) {
            return Err(invalid());
        }
        let number = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            s.parse::<u32>().map_err(|_| invalid())
        };
        Ok(Self {
            major: number(major)?,
            minor: number(minor)?,
        })
    }
}

impl TryFrom<String> for KernelVersion {
    type Error = SeccompError;

    fn try_from(version: String) -> Result<Self, Self::Error> {
        Self::parse(&version)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An architecture Gantry can run on: Rust's name for it, its seccomp name, and the names a
/// profile's `includes.arches` / `excludes.arches` may use for it. Docker compares those
/// lists with Go's `GOARCH` (`amd64`, `arm64`, `386`); the Linux names are accepted too so
/// that `"x86"`, which moby's own profile uses, means what it says.
struct NativeArch {
    rust: &'static str,
    seccomp: Arch,
    profile_names: &'static [&'static str],
}

/// The architectures [`oci_seccomp`] accepts as the machine's.
const NATIVE_ARCHES: &[NativeArch] = &[
    NativeArch {
        rust: "x86_64",
        seccomp: Arch::ScmpArchX86_64,
        profile_names: &["amd64", "x86_64"],
    },
    NativeArch {
        rust: "x86",
        seccomp: Arch::ScmpArchX86,
        profile_names: &["386", "x86"],
    },
    NativeArch {
        rust: "aarch64",
        seccomp: Arch::ScmpArchAarch64,
        profile_names: &["arm64", "aarch64"],
    },
    NativeArch {
        rust: "arm",
        seccomp: Arch::ScmpArchArm,
        profile_names: &["arm"],
    },
    NativeArch {
        rust: "riscv64",
        seccomp: Arch::ScmpArchRiscv64,
        profile_names: &["riscv64"],
    },
    NativeArch {
        rust: "s390x",
        seccomp: Arch::ScmpArchS390x,
        profile_names: &["s390x"],
    },
    NativeArch {
        rust: "loongarch64",
        seccomp: Arch::ScmpArchLoongarch64,
        profile_names: &["loong64", "loongarch64"],
    },
];

/// Architecture names a profile may use that are never a Gantry machine's own (Docker's
/// profile mentions them; rules naming only these simply never apply). Anything outside
/// this list and [`NATIVE_ARCHES`] is rejected, so a typo cannot silently drop a rule.
const FOREIGN_ARCH_NAMES: &[&str] = &[
    "x32",
    "s390",
    "ppc",
    "ppc64",
    "ppc64le",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "mips64n32",
    "mips64len32",
    "riscv32",
];

/// Parses the profile built into the agent from `deploy/seccomp.json`.
pub fn default_profile() -> Result<Profile, SeccompError> {
    parse_profile(DEFAULT_PROFILE_JSON, DEFAULT_PROFILE_ORIGIN)
}

/// Reads and checks an operator-supplied profile file.
pub fn load_profile(path: &Path) -> Result<Profile, SeccompError> {
    let json = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_profile(&json, &path.display().to_string())
}

/// Parses and checks a profile held in memory; `origin` names it in errors.
pub fn parse_profile(json: &str, origin: &str) -> Result<Profile, SeccompError> {
    let profile: Profile = serde_json::from_str(json).map_err(|source| SeccompError::Parse {
        origin: origin.to_owned(),
        source,
    })?;
    profile
        .check()
        .map_err(|reason| SeccompError::InvalidProfile {
            origin: origin.to_owned(),
            reason,
        })?;
    Ok(profile)
}

/// The OCI seccomp section for a container holding `caps` (names like `CAP_SYS_ADMIN`) on a
/// machine whose architecture is `arch` (`std::env::consts::ARCH`), encoded for
/// libcontainer 0.7 (see the module documentation and [`spec_encoding`]).
///
/// Every `minKernel` condition is taken as met: the shipped profile's only one is 4.8 (for
/// ptrace), far below the 5.3 the agent needs anyway for `pidfd_open`. Use
/// [`oci_seccomp_for_kernel`] to honour `minKernel` in an operator's profile.
pub fn oci_seccomp(
    profile: &Profile,
    caps: &[String],
    arch: &str,
) -> Result<LinuxSeccomp, SeccompError> {
    build(profile, caps, arch, None)
}

/// Like [`oci_seccomp`], but compares `minKernel` conditions with the running kernel's
/// version (for instance `KernelVersion::parse(uname_release)`).
pub fn oci_seccomp_for_kernel(
    profile: &Profile,
    caps: &[String],
    arch: &str,
    kernel: KernelVersion,
) -> Result<LinuxSeccomp, SeccompError> {
    build(profile, caps, arch, Some(kernel))
}

/// What a matching rule does to a syscall: the action, and the errno it returns if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    action: LinuxSeccompAction,
    errno: Option<u32>,
}

impl Outcome {
    /// Fills in the errno runtimes use when an errno rule omits it, so that `ERRNO` and
    /// `ERRNO(1)` compare equal.
    fn new(action: LinuxSeccompAction, errno: Option<u32>) -> Self {
        let errno = match action {
            LinuxSeccompAction::ScmpActErrno | LinuxSeccompAction::ScmpActTrace => {
                Some(errno.unwrap_or(EPERM))
            }
            _ => None,
        };
        Self { action, errno }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => write!(f, "{}({errno})", self.action),
            None => write!(f, "{}", self.action),
        }
    }
}

/// Rules that share an outcome and argument conditions, with their names merged.
struct Group {
    outcome: Outcome,
    args: Vec<Arg>,
    names: Vec<String>,
}

fn build(
    profile: &Profile,
    caps: &[String],
    arch: &str,
    kernel: Option<KernelVersion>,
) -> Result<LinuxSeccomp, SeccompError> {
    for cap in caps {
        if !is_capability_name(cap) {
            return Err(SeccompError::InvalidCapability { cap: cap.clone() });
        }
    }
    let native = NATIVE_ARCHES
        .iter()
        .find(|a| a.rust == arch)
        .ok_or_else(|| SeccompError::UnsupportedArch {
            arch: arch.to_owned(),
        })?;
    let caps: HashSet<&str> = caps.iter().map(String::as_str).collect();
    // No kernel version means "new enough": see oci_seccomp.
    let kernel_at_least = |min: KernelVersion| kernel.is_none_or(|k| k >= min);
    let names_native = |names: &[String]| {
        names
            .iter()
            .any(|n| native.profile_names.contains(&n.as_str()))
    };

    let mut groups: Vec<Group> = Vec::new();
    for rule in &profile.syscalls {
        let (inc, exc) = (&rule.includes, &rule.excludes);
        let excluded = names_native(&exc.arches)
            || exc.caps.iter().any(|c| caps.contains(c.as_str()))
            || exc.min_kernel.is_some_and(kernel_at_least);
        let included = (inc.arches.is_empty() || names_native(&inc.arches))
            && inc.caps.iter().all(|c| caps.contains(c.as_str()))
            && inc.min_kernel.is_none_or(kernel_at_least);
        if excluded || !included {
            continue;
        }
        let outcome = Outcome::new(rule.action, rule.errno_ret);
        let at = match groups
            .iter()
            .position(|g| g.outcome == outcome && g.args == rule.args)
        {
            Some(at) => at,
            None => {
                groups.push(Group {
                    outcome,
                    args: rule.args.clone(),
                    names: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let group = &mut groups[at];
        for name in &rule.names {
            if !group.names.contains(name) {
                group.names.push(name.clone());
            }
        }
    }

    check_conflicts(&groups)?;

    let default = Outcome::new(profile.default_action, profile.default_errno_ret);
    let mut syscalls = Vec::new();
    // A rule whose outcome is the default changes nothing; dropping it keeps the filter small
    // and spares libcontainer's "same as the default action" warning. The profile's explicit
    // denials end here, after check_conflicts has made sure nothing allows them.
    for group in groups.into_iter().filter(|g| g.outcome != default) {
        syscalls.push(oci_syscall(group)?);
    }

    let mut seccomp = LinuxSeccompBuilder::default()
        .default_action(profile.default_action)
        .architectures(architectures(profile, native))
        .syscalls(syscalls);
    if let Some(errno) = default.errno {
        seccomp = seccomp.default_errno_ret(errno);
    }
    if !profile.flags.is_empty() {
        seccomp = seccomp.flags(profile.flags.clone());
    }
    seccomp
        .build()
        .map_err(|source| SeccompError::Build { source })
}

/// The architectures the filter must cover on this machine: the `archMap` entry for the
/// native architecture with its sub-architectures, so that (for instance) 32-bit x86
/// binaries in an x86-64 container are filtered too instead of being refused outright.
fn architectures(profile: &Profile, native: &NativeArch) -> Vec<Arch> {
    if !profile.architectures.is_empty() {
        return profile.architectures.clone();
    }
    match profile
        .arch_map
        .iter()
        .find(|entry| entry.architecture == native.seccomp)
    {
        Some(entry) => std::iter::once(entry.architecture)
            .chain(entry.sub_architectures.iter().copied())
            .collect(),
        // Docker leaves the list empty here, which runtimes read as "native only".
        None => vec![native.seccomp],
    }
}

/// Refuses a filter in which a syscall that one rule handles whatever its arguments also
/// gets a different outcome from another rule. libseccomp would either reject such a filter
/// when the container starts, with an error naming nothing, or let the broader rule win;
/// neither is what the profile's author meant.
fn check_conflicts(groups: &[Group]) -> Result<(), SeccompError> {
    for (i, unconditional) in groups.iter().enumerate() {
        if !unconditional.args.is_empty() {
            continue;
        }
        for (j, other) in groups.iter().enumerate() {
            if i == j || other.outcome == unconditional.outcome {
                continue;
            }
            if let Some(name) = unconditional.names.iter().find(|n| other.names.contains(n)) {
                let describe = |g: &Group| {
                    if g.args.is_empty() {
                        g.outcome.to_string()
                    } else {
                        format!("{} on some arguments", g.outcome)
                    }
                };
                return Err(SeccompError::ConflictingRules {
                    name: name.clone(),
                    first: describe(unconditional),
                    second: describe(other),
                });
            }
        }
    }
    Ok(())
}

fn oci_syscall(group: Group) -> Result<LinuxSyscall, SeccompError> {
    let mut args = Vec::with_capacity(group.args.len());
    for arg in &group.args {
        args.push(oci_arg(arg)?);
    }
    let mut syscall = LinuxSyscallBuilder::default()
        .names(group.names)
        .action(group.outcome.action);
    if let Some(errno) = group.outcome.errno {
        syscall = syscall.errno_ret(errno);
    }
    if !args.is_empty() {
        syscall = syscall.args(args);
    }
    syscall
        .build()
        .map_err(|source| SeccompError::Build { source })
}

fn oci_arg(arg: &Arg) -> Result<LinuxSeccompArg, SeccompError> {
    let (value, value_two) = if arg.op == LinuxSeccompOperator::ScmpCmpMaskedEq {
        // libcontainer 0.7 hands libseccomp valueTwo as the mask and value as the expected
        // value, the other way round from the runtime spec and runc; libseccomp then masks
        // the expected value too, so Docker's clone rule read that way matches every call.
        // Swapped here, the filter means what the profile says; spec_encoding undoes it.
        (arg.value_two, Some(arg.value))
    } else {
        (arg.value, (arg.value_two != 0).then_some(arg.value_two))
    };
    let mut oci = LinuxSeccompArgBuilder::default()
        // check() keeps index below SYSCALL_ARGS, so this widening is lossless.
        .index(arg.index as usize)
        .value(value)
        .op(arg.op);
    if let Some(value_two) = value_two {
        oci = oci.value_two(value_two);
    }
    oci.build().map_err(|source| SeccompError::Build { source })
}

/// The same filter encoded as the runtime spec, runc and crun read it: `value` is the mask
/// of a masked comparison and `valueTwo` the expected value. [`oci_seccomp`] writes masked
/// comparisons the other way round because libcontainer 0.7, which runs Gantry's
/// containers, reads them so; use this when writing a `config.json` for another runtime.
/// Applying it twice gives back the original.
pub fn spec_encoding(seccomp: &LinuxSeccomp) -> Result<LinuxSeccomp, SeccompError> {
    let mut seccomp = seccomp.clone();
    if let Some(syscalls) = seccomp.syscalls().clone() {
        let mut swapped = Vec::with_capacity(syscalls.len());
        for mut syscall in syscalls {
            if let Some(args) = syscall.args().clone() {
                let args = args
                    .into_iter()
                    .map(swap_masked)
                    .collect::<Result<Vec<_>, _>>()?;
                syscall.set_args(Some(args));
            }
            swapped.push(syscall);
        }
        seccomp.set_syscalls(Some(swapped));
    }
    Ok(seccomp)
}

fn swap_masked(arg: LinuxSeccompArg) -> Result<LinuxSeccompArg, SeccompError> {
    if arg.op() != LinuxSeccompOperator::ScmpCmpMaskedEq {
        return Ok(arg);
    }
    LinuxSeccompArgBuilder::default()
        .index(arg.index())
        .value(arg.value_two().unwrap_or(0))
        .value_two(arg.value())
        .op(arg.op())
        .build()
        .map_err(|source| SeccompError::Build { source })
}

impl Profile {
    /// Checks what serde cannot: returns a sentence saying what is wrong and where.
    fn check(&self) -> Result<(), String> {
        if !self.architectures.is_empty() && !self.arch_map.is_empty() {
            return Err("both architectures and archMap are set; use one".to_owned());
        }
        check_action(self.default_action, self.default_errno_ret)
            .map_err(|e| format!("defaultAction: {e}"))?;
        if self.default_action == LinuxSeccompAction::ScmpActAllow {
            // An allow-by-default profile is a denylist; Gantry's policy is an allowlist.
            return Err("defaultAction SCMP_ACT_ALLOW is not accepted".to_owned());
        }
        for (i, entry) in self.arch_map.iter().enumerate() {
            if self.arch_map[..i]
                .iter()
                .any(|e| e.architecture == entry.architecture)
            {
                return Err(format!(
                    "archMap lists {} more than once",
                    entry.architecture
                ));
            }
        }
        for (i, rule) in self.syscalls.iter().enumerate() {
            rule.check()
                .map_err(|e| format!("syscalls[{i}] ({}): {e}", rule.names.join(", ")))?;
        }
        Ok(())
    }
}

impl Rule {
    fn check(&self) -> Result<(), String> {
        if self.names.is_empty() {
            return Err("names is empty".to_owned());
        }
        let mut seen = HashSet::new();
        for name in &self.names {
            if !is_syscall_name(name) {
                return Err(format!(
                    "{name:?} is not a syscall name (lowercase letters, digits, underscores)"
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(format!("{name} is listed twice"));
            }
        }
        check_action(self.action, self.errno_ret)?;
        let mut indexes = HashSet::new();
        for arg in &self.args {
            if arg.index >= SYSCALL_ARGS {
                return Err(format!(
                    "argument index {} is out of range (0 to {})",
                    arg.index,
                    SYSCALL_ARGS - 1
                ));
            }
            // runc and libcontainer turn two comparisons of one argument into two rules,
            // i.e. an OR, which makes "NE 38 and NE 40" allow everything.
            if !indexes.insert(arg.index) {
                return Err(format!(
                    "argument {} is compared twice; runtimes treat that as OR, so write separate rules",
                    arg.index
                ));
            }
        }
        for filter in [&self.includes, &self.excludes] {
            if let Some(cap) = filter.caps.iter().find(|c| !is_capability_name(c)) {
                return Err(format!(
                    "{cap:?} is not a capability name (expected e.g. CAP_SYS_ADMIN)"
                ));
            }
            if let Some(arch) = filter.arches.iter().find(|a| !is_known_arch_name(a)) {
                return Err(format!("unknown architecture {arch:?}"));
            }
        }
        Ok(())
    }
}

fn check_action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<(), String> {
    match action {
        // Gantry runs no seccomp agent, so a notified syscall would hang forever.
        LinuxSeccompAction::ScmpActNotify => {
            Err("SCMP_ACT_NOTIFY is not supported: gantry has no seccomp agent".to_owned())
        }
        LinuxSeccompAction::ScmpActErrno | LinuxSeccompAction::ScmpActTrace => Ok(()),
        _ if errno.is_some() => Err(format!(
            "errnoRet only goes with SCMP_ACT_ERRNO or SCMP_ACT_TRACE, not {action}"
        )),
        _ => Ok(()),
    }
}

fn is_syscall_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn is_capability_name(cap: &str) -> bool {
    cap.strip_prefix("CAP_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

fn is_known_arch_name(name: &str) -> bool {
    FOREIGN_ARCH_NAMES.contains(&name)
        || NATIVE_ARCHES
            .iter()
            .any(|a| a.profile_names.contains(&name))
}

/// Reads JSON `null` as the type's default, because moby's Go-written profiles use `null`
/// for empty lists (e.g. `"subArchitectures": null`).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker's default capability set.
    const DEFAULT_CAPS: &[&str] = &[
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];

    /// Every capability of Linux 6.18.
    const ALL_CAPS: &[&str] = &[
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];

    /// Syscalls no container may make, whatever it was given.
    const NEVER_ALLOWED: &[&str] = &[
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "keyctl",
        "add_key",
        "request_key",
        "kexec_load",
        "kexec_file_load",
        "swapon",
        "swapoff",
        "userfaultfd",
        "vm86",
        "vm86old",
    ];

    const AF_ALG: u64 = 38;
    const AF_VSOCK: u64 = 40;
    const CLONE_NEWNS: u64 = 0x0002_0000;
    const CLONE_NEWCGROUP: u64 = 0x0200_0000;
    const CLONE_NEWUTS: u64 = 0x0400_0000;
    const CLONE_NEWIPC: u64 = 0x0800_0000;
    const CLONE_NEWUSER: u64 = 0x1000_0000;
    const CLONE_NEWPID: u64 = 0x2000_0000;
    const CLONE_NEWNET: u64 = 0x4000_0000;
    /// The flags glibc's pthread_create passes to clone.
    const THREAD_FLAGS: u64 = 0x003d_0f00;
    const ENOSYS: u32 = 38;

    fn caps(names: &[&str]) -> Vec<String> {
        names.iter().map(|c| (*c).to_owned()).collect()
    }

    fn with(extra: &str) -> Vec<String> {
        let mut caps = caps(DEFAULT_CAPS);
        caps.push(extra.to_owned());
        caps
    }

    fn filter(caps: &[String], arch: &str) -> LinuxSeccomp {
        let profile = default_profile().expect("built-in profile parses");
        oci_seccomp(&profile, caps, arch).expect("filter builds")
    }

    fn syscalls(seccomp: &LinuxSeccomp) -> &[LinuxSyscall] {
        seccomp.syscalls().as_deref().unwrap_or_default()
    }

    fn arg_matches(arg: &LinuxSeccompArg, value: u64) -> bool {
        let (a, b) = (arg.value(), arg.value_two().unwrap_or(0));
        match arg.op() {
            LinuxSeccompOperator::ScmpCmpNe => value != a,
            LinuxSeccompOperator::ScmpCmpLt => value < a,
            LinuxSeccompOperator::ScmpCmpLe => value <= a,
            LinuxSeccompOperator::ScmpCmpEq => value == a,
            LinuxSeccompOperator::ScmpCmpGe => value >= a,
            LinuxSeccompOperator::ScmpCmpGt => value > a,
            // As libcontainer 0.7 builds it: SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, valueTwo,
            // value), and libseccomp masks the expected value as well.
            LinuxSeccompOperator::ScmpCmpMaskedEq => value & b == a & b,
        }
    }

    /// What the filter does to `name` called with `args`, read the way libseccomp reads it:
    /// a rule matches when all its comparisons hold; nothing matching means the default.
    fn evaluate(seccomp: &LinuxSeccomp, name: &str, args: [u64; 6]) -> Outcome {
        let matching: Vec<Outcome> = syscalls(seccomp)
            .iter()
            .filter(|s| s.names().iter().any(|n| n == name))
            .filter(|s| {
                s.args()
                    .iter()
                    .flatten()
                    .all(|a| arg_matches(a, args[a.index()]))
            })
            .map(|s| Outcome::new(s.action(), s.errno_ret()))
            .collect();
        if let Some(first) = matching.first() {
            assert!(
                matching.iter().all(|o| o == first),
                "{name}{args:?} matches rules with different outcomes: {matching:?}"
            );
            return *first;
        }
        Outcome::new(seccomp.default_action(), seccomp.default_errno_ret())
    }

    fn call(seccomp: &LinuxSeccomp, name: &str, arg0: u64) -> Outcome {
        evaluate(seccomp, name, [arg0, 0, 0, 0, 0, 0])
    }

    const ALLOW: Outcome = Outcome {
        action: LinuxSeccompAction::ScmpActAllow,
        errno: None,
    };
    const DENY: Outcome = Outcome {
        action: LinuxSeccompAction::ScmpActErrno,
        errno: Some(EPERM),
    };

    /// Whether some rule allows `name` for every argument.
    fn allowed_outright(seccomp: &LinuxSeccomp, name: &str) -> bool {
        syscalls(seccomp).iter().any(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow
                && s.args().as_ref().is_none_or(Vec::is_empty)
                && s.names().iter().any(|n| n == name)
        })
    }

    fn mentioned(seccomp: &LinuxSeccomp, name: &str) -> bool {
        syscalls(seccomp)
            .iter()
            .any(|s| s.names().iter().any(|n| n == name))
    }

    #[test]
    fn built_in_profile_parses() {
        let profile = default_profile().expect("built-in profile parses");
        assert!(profile.syscalls.len() > 10);
        assert_eq!(profile.arch_map.len(), 2);
    }

    #[test]
    fn default_action_is_errno_eperm() {
        let profile = default_profile().expect("built-in profile parses");
        assert_eq!(profile.default_action, LinuxSeccompAction::ScmpActErrno);
        assert_eq!(profile.default_errno_ret, Some(EPERM));
        let seccomp = filter(&caps(DEFAULT_CAPS), "x86_64");
        assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(seccomp.default_errno_ret(), Some(EPERM));
        assert_eq!(call(&seccomp, "no_such_syscall", 0), DENY);
    }

    #[test]
    fn default_caps_get_ordinary_syscalls() {
        let seccomp = filter(&caps(DEFAULT_CAPS), "x86_64");
        for name in [
            "read",
            "write",
            "execve",
            "openat",
            "openat2",
            "statx",
            "faccessat2",
            "close_range",
            "epoll_pwait2",
            "pidfd_open",
            "pidfd_send_signal",
            "rseq",
            "futex_waitv",
            "landlock_create_ruleset",
            "chroot",
            "ptrace",
        ] {
            assert!(allowed_outright(&seccomp, name), "{name} should be allowed");
        }
        assert_eq!(
            call(&seccomp, "clone3", 0),
            Outcome::new(LinuxSeccompAction::ScmpActErrno, Some(ENOSYS))
        );
    }

    #[test]
    fn default_caps_are_refused_privileged_syscalls() {
        let seccomp = filter(&caps(DEFAULT_CAPS), "x86_64");
        for name in [
            "unshare",
            "mount",
            "umount2",
            "setns",
            "pivot_root",
            "bpf",
            "keyctl",
            "kexec_load",
            "init_module",
            "finit_module",
            "perf_event_open",
            "io_uring_setup",
            "open_by_handle_at",
            "name_to_handle_at",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "clock_adjtime",
            "sethostname",
            "reboot",
            "syslog",
        ] {
            assert!(
                !mentioned(&seccomp, name),
                "{name} should be left to the default"
            );
            assert_eq!(call(&seccomp, name, 0), DENY, "{name}");
        }
    }

    #[test]
    fn sys_admin_gets_mount_namespaces_and_plain_clone() {
        let seccomp = filter(&with("CAP_SYS_ADMIN"), "x86_64");
        for name in [
            "mount",
            "umount2",
            "unshare",
            "setns",
            "pivot_root",
            "clone",
            "clone3",
        ] {
            assert!(allowed_outright(&seccomp, name), "{name} should be allowed");
        }
        // No argument-checked clone rule is left to narrow the outright one.
        let clone_rules = syscalls(&seccomp)
            .iter()
            .filter(|s| s.names().iter().any(|n| n == "clone"))
            .count();
        assert_eq!(clone_rules, 1);
        assert_eq!(call(&seccomp, "clone", CLONE_NEWUSER | CLONE_NEWNS), ALLOW);
    }

    #[test]
    fn clone_without_sys_admin_refuses_namespace_flags() {
        let seccomp = filter(&caps(DEFAULT_CAPS), "x86_64");
        let rule = syscalls(&seccomp)
            .iter()
            .find(|s| s.names().iter().any(|n| n == "clone"))
            .expect("a clone rule");
        let args = rule.args().as_deref().unwrap_or_default();
        assert_eq!(args.len(), 1);
        let all_namespaces = CLONE_NEWNS
            | CLONE_NEWUTS
            | CLONE_NEWIPC
            | CLONE_NEWUSER
            | CLONE_NEWPID
            | CLONE_NEWNET
            | CLONE_NEWCGROUP;
        assert_eq!(all_namespaces, 2_114_060_288);
        assert_eq!(args[0].index(), 0);
        assert_eq!(args[0].op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        // libcontainer's reading: valueTwo is the mask, value the expected value.
        assert_eq!(args[0].value(), 0);
        assert_eq!(args[0].value_two(), Some(all_namespaces));
        // The runtime spec's (and runc's) reading is the other way round.
        let spec = spec_encoding(&seccomp).expect("re-encodes");
        let spec_clone = syscalls(&spec)
            .iter()
            .find(|s| s.names().iter().any(|n| n == "clone"))
            .and_then(|s| s.args().as_ref())
            .expect("a clone rule with arguments");
        assert_eq!(spec_clone[0].value(), all_namespaces);
        assert_eq!(spec_clone[0].value_two(), Some(0));
        assert_eq!(spec_encoding(&spec).expect("re-encodes"), seccomp);
        // Only masked comparisons move.
        let socket = |s: &LinuxSeccomp| {
            syscalls(s)
                .iter()
                .filter(|r| r.names().iter().any(|n| n == "socket"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(socket(&spec), socket(&seccomp));

        assert_eq!(call(&seccomp, "clone", THREAD_FLAGS), ALLOW);
        assert_eq!(call(&seccomp, "clone", 17 /* SIGCHLD: fork */), ALLOW);
        for flag in [
            CLONE_NEWNS,
            CLONE_NEWUTS,
            CLONE_NEWIPC,
            CLONE_NEWUSER,
            CLONE_NEWPID,
            CLONE_NEWNET,
            CLONE_NEWCGROUP,
        ] {
            assert_eq!(
                call(&seccomp, "clone", THREAD_FLAGS | flag),
                DENY,
                "{flag:#x}"
            );
        }
    }

    #[test]
    fn socket_refuses_alg_and_vsock() {
        for arch in ["x86_64", "aarch64"] {
            let seccomp = filter(&caps(DEFAULT_CAPS), arch);
            for family in 0..=45 {
                let expected = if family == AF_ALG || family == AF_VSOCK {
                    DENY
                } else {
                    ALLOW
                };
                assert_eq!(
                    call(&seccomp, "socket", family),
                    expected,
                    "family {family}"
                );
            }
            // The kernel reads family as an int, so garbage above bit 31 must not sneak a
            // refused family past the filter.
            for family in [AF_ALG, AF_VSOCK] {
                assert_eq!(call(&seccomp, "socket", (1 << 32) | family), DENY);
                assert_eq!(
                    call(&seccomp, "socket", 0xffff_ffff_0000_0000 | family),
                    DENY
                );
            }
            // socketpair takes no family worth refusing and stays allowed.
            assert!(allowed_outright(&seccomp, "socketpair"));
        }
    }

    #[test]
    fn personality_allows_only_safe_personas() {
        let seccomp = filter(&caps(DEFAULT_CAPS), "x86_64");
        for persona in [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
            assert_eq!(
                call(&seccomp, "personality", persona),
                ALLOW,
                "{persona:#x}"
            );
        }
        // READ_IMPLIES_EXEC and ADDR_NO_RANDOMIZE.
        for persona in [0x40_0000, 0x4_0000] {
            assert_eq!(call(&seccomp, "personality", persona), DENY, "{persona:#x}");
        }
    }

    #[test]
    fn never_allowed_whatever_the_capabilities() {
        for arch in ["x86_64", "aarch64"] {
            for caps in [Vec::new(), caps(DEFAULT_CAPS), caps(ALL_CAPS)] {
                let seccomp = filter(&caps, arch);
                for name in NEVER_ALLOWED {
                    assert_eq!(call(&seccomp, name, 0), DENY, "{name} with {caps:?}");
                }
            }
        }
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        for (cap, name) in [
            ("CAP_SYS_ADMIN", "bpf"),
            ("CAP_BPF", "bpf"),
            ("CAP_PERFMON", "perf_event_open"),
            ("CAP_SYS_MODULE", "init_module"),
            ("CAP_SYS_TIME", "clock_settime"),
            ("CAP_SYS_TIME", "adjtimex"),
            ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
            ("CAP_SYS_BOOT", "reboot"),
            ("CAP_SYSLOG", "syslog"),
            ("CAP_SYS_PTRACE", "process_madvise"),
            ("CAP_SYS_NICE", "mbind"),
        ] {
            assert!(!allowed_outright(
                &filter(&caps(DEFAULT_CAPS), "x86_64"),
                name
            ));
            assert!(
                allowed_outright(&filter(&with(cap), "x86_64"), name),
                "{cap} should open {name}"
            );
        }
    }

    #[test]
    fn architectures_follow_the_machine() {
        let x86 = filter(&caps(DEFAULT_CAPS), "x86_64");
        assert_eq!(
            x86.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        assert!(allowed_outright(&x86, "arch_prctl"));
        assert!(allowed_outright(&x86, "modify_ldt"));
        assert!(!mentioned(&x86, "set_tls"));
        assert!(!mentioned(&x86, "cacheflush"));

        let arm = filter(&caps(DEFAULT_CAPS), "aarch64");
        assert_eq!(
            arm.architectures().as_deref(),
            Some(&[Arch::ScmpArchAarch64, Arch::ScmpArchArm][..])
        );
        assert!(!mentioned(&arm, "arch_prctl"));
        assert!(!mentioned(&arm, "modify_ldt"));
        assert!(allowed_outright(&arm, "set_tls"));
        assert!(allowed_outright(&arm, "cacheflush"));

        // A machine with no archMap entry of its own gets a native-only filter, as in Docker.
        let riscv = filter(&caps(DEFAULT_CAPS), "riscv64");
        assert_eq!(
            riscv.architectures().as_deref(),
            Some(&[Arch::ScmpArchRiscv64][..])
        );
    }

    #[test]
    fn unknown_machine_architecture_is_an_error() {
        let profile = default_profile().expect("built-in profile parses");
        let err = oci_seccomp(&profile, &[], "sparc64").expect_err("sparc64 is unsupported");
        assert!(matches!(err, SeccompError::UnsupportedArch { ref arch } if arch == "sparc64"));
        assert!(err.to_string().contains("sparc64"));
    }

    #[test]
    fn capability_names_are_checked() {
        let profile = default_profile().expect("built-in profile parses");
        let err = oci_seccomp(&profile, &caps(&["SYS_ADMIN"]), "x86_64")
            .expect_err("a name without CAP_ is refused");
        assert!(err.to_string().contains("\"SYS_ADMIN\""), "{err}");
    }

    #[test]
    fn min_kernel_is_compared_when_known() {
        let profile = default_profile().expect("built-in profile parses");
        let caps = caps(DEFAULT_CAPS);
        let old = KernelVersion::parse("4.7.10").expect("valid version");
        let new = KernelVersion::parse("6.18.44-fc-v782").expect("valid version");
        assert_eq!(
            new,
            KernelVersion {
                major: 6,
                minor: 18
            }
        );
        let on_old = oci_seccomp_for_kernel(&profile, &caps, "x86_64", old).expect("builds");
        let on_new = oci_seccomp_for_kernel(&profile, &caps, "x86_64", new).expect("builds");
        assert!(!mentioned(&on_old, "ptrace"));
        assert!(allowed_outright(&on_new, "ptrace"));
        // With CAP_SYS_PTRACE the capability rule allows it on any kernel.
        let traced = oci_seccomp_for_kernel(&profile, &with("CAP_SYS_PTRACE"), "x86_64", old)
            .expect("builds");
        assert!(allowed_outright(&traced, "ptrace"));
    }

    #[test]
    fn kernel_versions_parse() {
        for (text, major, minor) in [("4.8", 4, 8), ("5.10.0-21-amd64", 5, 10), ("6.1+", 6, 1)] {
            assert_eq!(
                KernelVersion::parse(text).expect("valid version"),
                KernelVersion { major, minor }
            );
        }
        for text in ["", "4", "4.", ".8", "4.8x", "v4.8", "4.-1"] {
            assert!(KernelVersion::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn rules_are_merged_into_a_compact_filter() {
        for caps in [caps(DEFAULT_CAPS), caps(ALL_CAPS)] {
            let seccomp = filter(&caps, "x86_64");
            let rules = syscalls(&seccomp);
            for (i, a) in rules.iter().enumerate() {
                for b in &rules[i + 1..] {
                    assert!(
                        (a.action(), a.errno_ret(), a.args())
                            != (b.action(), b.errno_ret(), b.args()),
                        "rules for {:?} and {:?} should have been merged",
                        a.names(),
                        b.names()
                    );
                }
                let unique: HashSet<&String> = a.names().iter().collect();
                assert_eq!(unique.len(), a.names().len(), "{:?}", a.names());
                // Rules equal to the default action are dropped, not passed on.
                assert!(Outcome::new(a.action(), a.errno_ret()) != DENY);
            }
            // The big allowlist, clone, clone3, seven socket rules, five personas.
            assert!(rules.len() <= 16, "{} rules", rules.len());
        }
        // ptrace appears both under minKernel and under CAP_SYS_PTRACE; merged, it is one name.
        let seccomp = filter(&with("CAP_SYS_PTRACE"), "x86_64");
        let count = syscalls(&seccomp)
            .iter()
            .flat_map(|s| s.names())
            .filter(|n| *n == "ptrace")
            .count();
        assert_eq!(count, 1);
    }

    #[test]
    fn profile_names_are_syscall_identifiers_without_duplicates() {
        let profile = default_profile().expect("built-in profile parses");
        for rule in &profile.syscalls {
            let mut seen = HashSet::new();
            for name in &rule.names {
                assert!(is_syscall_name(name), "{name:?}");
                assert!(seen.insert(name), "{name} twice in one rule");
            }
        }
        // The big allowlist is the first rule; none of its names is repeated anywhere that
        // applies unconditionally, which would be dead weight in review.
        let allowlist = &profile.syscalls[0];
        assert!(allowlist.args.is_empty() && allowlist.includes == Filter::default());
        assert!(allowlist.names.len() > 300, "{}", allowlist.names.len());
        for rule in &profile.syscalls[1..] {
            for name in &rule.names {
                assert!(
                    !allowlist.names.contains(name),
                    "{name} is also in the allowlist"
                );
            }
        }
        let mut sorted = allowlist.names.clone();
        sorted.sort_by(|a, b| a.trim_start_matches('_').cmp(b.trim_start_matches('_')));
        assert_eq!(
            sorted, allowlist.names,
            "keep the allowlist sorted for review"
        );
    }

    #[test]
    fn name_checks_accept_and_refuse() {
        for good in [
            "read",
            "_llseek",
            "_newselect",
            "epoll_pwait2",
            "clock_gettime64",
        ] {
            assert!(is_syscall_name(good), "{good}");
        }
        for bad in ["", "Read", "read ", "2read", "read-x", "READ"] {
            assert!(!is_syscall_name(bad), "{bad:?}");
        }
        assert!(is_capability_name("CAP_SYS_ADMIN"));
        for bad in ["CAP_", "cap_sys_admin", "SYS_ADMIN", "CAP_SYS ADMIN"] {
            assert!(!is_capability_name(bad), "{bad:?}");
        }
    }

    fn invalid(json: &str) -> String {
        match parse_profile(json, "test.json") {
            Err(SeccompError::InvalidProfile { origin, reason }) => {
                assert_eq!(origin, "test.json");
                reason
            }
            other => panic!("expected an invalid-profile error, got {other:?}"),
        }
    }

    fn profile_with(rule: &str) -> String {
        format!(r#"{{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{rule}]}}"#)
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for (rule, reason) in [
            (
                r#"{"names": ["Read"], "action": "SCMP_ACT_ALLOW"}"#,
                "\"Read\"",
            ),
            (
                r#"{"names": ["read", "read"], "action": "SCMP_ACT_ALLOW"}"#,
                "read is listed twice",
            ),
            (
                r#"{"names": [], "action": "SCMP_ACT_ALLOW"}"#,
                "names is empty",
            ),
            (
                r#"{"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 0, "value": 38, "op": "SCMP_CMP_NE"},
                    {"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]}"#,
                "argument 0 is compared twice",
            ),
            (
                r#"{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}"#,
                "out of range",
            ),
            (
                r#"{"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}"#,
                "errnoRet only goes with",
            ),
            (
                r#"{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}"#,
                "SCMP_ACT_NOTIFY",
            ),
            (
                r#"{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd46"]}}"#,
                "unknown architecture \"amd46\"",
            ),
            (
                r#"{"names": ["read"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["SYS_ADMIN"]}}"#,
                "\"SYS_ADMIN\" is not a capability name",
            ),
        ] {
            let reason_given = invalid(&profile_with(rule));
            assert!(
                reason_given.contains(reason),
                "{reason_given:?} lacks {reason:?}"
            );
        }
        let allow_all = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}"#;
        assert!(invalid(allow_all).contains("SCMP_ACT_ALLOW"));
    }

    #[test]
    fn conflicting_rules_are_refused_when_they_meet() {
        let profile = parse_profile(
            &profile_with(
                r#"{"names": ["read", "chroot"], "action": "SCMP_ACT_ALLOW"},
                   {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                    "includes": {"caps": ["CAP_SYS_BOOT"]}}"#,
            ),
            "test.json",
        )
        .expect("the profile itself is consistent");
        oci_seccomp(&profile, &[], "x86_64").expect("without CAP_SYS_BOOT no conflict");
        let err = oci_seccomp(&profile, &caps(&["CAP_SYS_BOOT"]), "x86_64")
            .expect_err("both rules apply");
        let message = err.to_string();
        assert!(message.contains("chroot"), "{message}");
        assert!(message.contains("SCMP_ACT_ERRNO(38)"), "{message}");
    }

    #[test]
    fn docker_style_nulls_and_omissions_are_accepted() {
        let profile = parse_profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "archMap": [{"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": null}],
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": null,
                              "comment": "", "includes": {}, "excludes": {}}]}"#,
            "test.json",
        )
        .expect("moby writes profiles like this");
        let seccomp = oci_seccomp(&profile, &[], "riscv64").expect("builds");
        // No defaultErrnoRet: runtimes use EPERM, and the section says so explicitly.
        assert_eq!(seccomp.default_errno_ret(), Some(EPERM));
        assert!(allowed_outright(&seccomp, "read"));
    }

    #[test]
    fn load_profile_names_the_file_it_could_not_use() {
        let dir = tempfile::tempdir().expect("temp dir");

        let missing = dir.path().join("missing.json");
        let err = load_profile(&missing).expect_err("no such file");
        assert!(matches!(err, SeccompError::Read { .. }));
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, "{\"defaultAction\": ").expect("write");
        let err = load_profile(&broken).expect_err("truncated JSON");
        assert!(matches!(err, SeccompError::Parse { .. }));
        assert!(
            err.to_string().contains(&broken.display().to_string()),
            "{err}"
        );
        let source = std::error::Error::source(&err).expect("the JSON error is kept");
        assert!(source.to_string().contains("line 1"), "{source}");

        let typo = dir.path().join("typo.json");
        std::fs::write(
            &typo,
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "sycalls": []}"#,
        )
        .expect("write");
        let err = load_profile(&typo).expect_err("unknown field");
        let source = std::error::Error::source(&err).expect("the JSON error is kept");
        assert!(source.to_string().contains("sycalls"), "{source}");

        let good = dir.path().join("good.json");
        std::fs::write(&good, DEFAULT_PROFILE_JSON).expect("write");
        assert_eq!(
            load_profile(&good).expect("a copy of the built-in profile loads"),
            default_profile().expect("built-in profile parses")
        );
    }
}
