//! Compiles a container's OCI seccomp section to a BPF program once, with libseccomp, so that each
//! container's init only installs ready-made bytes. libcontainer compiles the filter inside every
//! container's init: with Gantry's profile (three x86 ABIs, ~350 syscalls) that took ~20 ms per
//! container, a third of a whole create+start. Programs are cached per distinct filter.
//!
//! The translation follows libcontainer's (`libcontainer::seccomp`), including its reading of
//! masked comparisons (mask in `valueTwo`), which the profile loader writes for.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::sync::{Arc, Mutex};

use libcontainer::oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator,
};
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use seccompiler::sock_filter;

/// Errors compiling or loading a filter.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// libseccomp refused part of the filter.
    #[error("compiling the seccomp filter: {0}")]
    Compile(String),
    /// The seccomp section uses something Gantry does not support.
    #[error("seccomp filter: {0}")]
    Unsupported(String),
    /// A compiled program file is malformed.
    #[error("seccomp program is malformed: {0}")]
    Malformed(String),
    /// The profile could not be turned into a filter.
    #[error(transparent)]
    Profile(#[from] super::seccomp::SeccompError),
    /// Installing the filter failed.
    #[error("installing the seccomp filter: {0}")]
    Install(String),
}

/// A compiled BPF program, as bytes in the kernel's `struct sock_filter` layout.
pub type Program = Arc<Vec<u8>>;

/// Compiled programs by their filter, so identical containers share one compile.
#[derive(Default)]
pub struct Cache {
    programs: Mutex<HashMap<String, Program>>,
}

impl Cache {
    /// The program cached under `key`, compiling the filter `make` returns on first use. The key
    /// must identify the filter (Gantry uses the capability set: the profile is fixed for the
    /// runtime's life).
    pub fn get(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<LinuxSeccomp, BpfError>,
    ) -> Result<Program, BpfError> {
        if let Some(p) = self.lock().get(key) {
            return Ok(p.clone());
        }
        let program = Arc::new(compile(&make()?)?);
        self.lock().insert(key.to_string(), program.clone());
        Ok(program)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Program>> {
        self.programs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn err(e: impl std::fmt::Display) -> BpfError {
    BpfError::Compile(e.to_string())
}

/// Compiles `seccomp` to BPF bytes.
pub fn compile(seccomp: &LinuxSeccomp) -> Result<Vec<u8>, BpfError> {
    let default = action(seccomp.default_action(), seccomp.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(err)?;
    if let Some(arches) = seccomp.architectures() {
        for &a in arches {
            ctx.add_arch(arch(a)?).map_err(err)?;
        }
    }
    // The runtime sets no_new_privs itself, before the filter is installed.
    ctx.set_ctl_nnp(false).map_err(err)?;
    for rule in seccomp.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let mut compares = Vec::new();
        let mut seen = HashSet::new();
        let mut duplicate_index = false;
        for a in rule.args().iter().flatten() {
            duplicate_index |= !seen.insert(a.index());
            compares.push(ScmpArgCompare::new(
                a.index() as u32,
                op(a.op(), a.value_two()),
                a.value(),
            ));
        }
        for name in rule.names() {
            // A name this libseccomp does not know is a syscall the kernel headers it was built
            // with lack: it keeps the default action, as with libcontainer and runc.
            let Ok(sc) = ScmpSyscall::from_name(name) else {
                continue;
            };
            if compares.is_empty() {
                ctx.add_rule(act, sc).map_err(err)?;
            } else if duplicate_index {
                // Two comparisons of one argument in a rule are an OR, as runc makes them.
                for c in &compares {
                    ctx.add_rule_conditional(act, sc, std::slice::from_ref(c))
                        .map_err(err)?;
                }
            } else {
                ctx.add_rule_conditional(act, sc, &compares).map_err(err)?;
            }
        }
    }
    let memfd =
        rustix::fs::memfd_create("gantry-seccomp", rustix::fs::MemfdFlags::CLOEXEC).map_err(err)?;
    ctx.export_bpf(&memfd).map_err(err)?;
    let mut file = std::fs::File::from(memfd);
    file.rewind().map_err(err)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(err)?;
    decode(&bytes)?;
    Ok(bytes)
}

/// Splits BPF bytes into instructions.
pub fn decode(bytes: &[u8]) -> Result<Vec<sock_filter>, BpfError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(BpfError::Malformed(format!(
            "{} bytes is not a whole number of instructions",
            bytes.len()
        )));
    }
    if bytes.len() / 8 > 4096 {
        return Err(BpfError::Malformed("more than 4096 instructions".into()));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// Installs `program` on the calling thread (which sets no_new_privs first). Called in the
/// container's process right before it executes the program.
pub fn install(program: &[sock_filter]) -> Result<(), BpfError> {
    seccompiler::apply_filter(program).map_err(|e| BpfError::Install(e.to_string()))
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, BpfError> {
    let errno = errno.map_or(1, |e| e as i32); // EPERM
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(errno as u16),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(BpfError::Unsupported(
                "SCMP_ACT_NOTIFY is not supported".into(),
            ));
        }
    })
}

fn op(o: LinuxSeccompOperator, value_two: Option<u64>) -> ScmpCompareOp {
    match o {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(value_two.unwrap_or(0)),
    }
}

fn arch(a: Arch) -> Result<ScmpArch, BpfError> {
    Ok(match a {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        other => return Err(BpfError::Unsupported(format!("architecture {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::seccomp::{default_profile, oci_seccomp};
    use crate::runtime::spec::DEFAULT_CAPABILITIES;

    fn default_filter() -> LinuxSeccomp {
        let caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        oci_seccomp(&default_profile().unwrap(), &caps, std::env::consts::ARCH).unwrap()
    }

    #[test]
    fn compiles_the_default_profile_and_caches_it() {
        let filter = default_filter();
        let cache = Cache::default();
        let a = cache.get("default", || Ok(filter.clone())).unwrap();
        let b = cache
            .get("default", || panic!("second lookup must not compile"))
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second lookup must hit the cache");
        let program = decode(&a).unwrap();
        // A real filter: an arch check, hundreds of syscall comparisons, a default return.
        assert!(program.len() > 100, "{} instructions", program.len());
        // It returns the default action (SECCOMP_RET_ERRNO | EPERM), allows (SECCOMP_RET_ALLOW),
        // and answers clone3 with ENOSYS (SECCOMP_RET_ERRNO | 38) so libc falls back to clone.
        let returns: Vec<u32> = program
            .iter()
            .filter(|i| i.code == 0x06)
            .map(|i| i.k)
            .collect();
        for want in [0x0005_0000 | 1, 0x7fff_0000, 0x0005_0000 | 38] {
            assert!(returns.contains(&want), "no RET {want:#x} in {returns:x?}");
        }
    }

    #[test]
    fn malformed_programs_are_refused() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[0u8; 7]).is_err());
        assert!(decode(&vec![0u8; 8 * 5000]).is_err());
    }
}
