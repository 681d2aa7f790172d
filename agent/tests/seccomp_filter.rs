//! Checks the shipped seccomp profile against its real consumers: libseccomp must resolve its
//! names, and the filter loaded through libcontainer (as the agent loads it) must refuse and
//! allow what it should.
//!
//! Loading a filter cannot be undone, so the behaviour checks run in a child copy of this test
//! binary. Loading it needs root (libcontainer leaves `no_new_privs` unset, so the kernel wants
//! CAP_SYS_ADMIN); without root the behaviour test is skipped on a laptop and fails under CI.

use std::collections::BTreeSet;
use std::io;
use std::process::Command;

use gantry_agent::runtime::seccomp::{default_profile, oci_seccomp};
use gantry_agent::runtime::spec::DEFAULT_CAPABILITIES;
use libcontainer::oci_spec::runtime::LinuxSeccomp;
use libseccomp::{ScmpArch, ScmpSyscall};

/// Syscalls newer than the table of Debian 12's libseccomp 2.5.4. libcontainer skips a name
/// libseccomp cannot resolve (with a warning), so on such a machine these get the default
/// EPERM whatever the profile says.
const NEWER_THAN_LIBSECCOMP: &[&str] = &[
    "cachestat",
    "fchmodat2",
    "futex_requeue",
    "futex_wait",
    "futex_wake",
    "getxattrat",
    "listxattrat",
    "map_shadow_stack",
    "mseal",
    "removexattrat",
    "set_mempolicy_home_node",
    "setxattrat",
    "uretprobe",
];

/// Every syscall name the shipped profile mentions, read from the file itself rather than
/// through the agent's parser, so a name the parser dropped would still be checked.
fn profile_names() -> BTreeSet<String> {
    let json: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/seccomp.json")).expect("profile is JSON");
    json["syscalls"]
        .as_array()
        .expect("syscalls is a list")
        .iter()
        .flat_map(|rule| rule["names"].as_array().expect("names is a list"))
        .map(|n| n.as_str().expect("name is a string").to_owned())
        .collect()
}

#[test]
fn every_name_is_a_syscall_on_a_target_architecture() {
    let names = profile_names();
    // An empty list would make the loop below pass vacuously.
    assert!(
        names.len() > 100,
        "only {} names in the profile",
        names.len()
    );
    let arches = [
        ScmpArch::X8664,
        ScmpArch::X86,
        ScmpArch::X32,
        ScmpArch::Aarch64,
        ScmpArch::Arm,
    ];
    let mut unknown = Vec::new();
    for name in names {
        // libseccomp hands out negative pseudo-numbers for names that are not syscalls on
        // an architecture, so only a non-negative number counts.
        let exists = arches.iter().any(|&arch| {
            ScmpSyscall::from_name_by_arch(&name, arch).is_ok_and(|nr| nr.as_raw_syscall() >= 0)
        });
        if !exists {
            unknown.push(name);
        }
    }
    for name in &unknown {
        assert!(
            NEWER_THAN_LIBSECCOMP.contains(&name.as_str()),
            "{name} is not a syscall on x86_64, x86, x32, aarch64 or arm"
        );
    }
    eprintln!("names this libseccomp does not know: {unknown:?}");
}

/// The filter the agent would give a container with the default capabilities plus `extra_caps`.
fn container_filter(extra_caps: &[&str]) -> LinuxSeccomp {
    let caps: Vec<String> = DEFAULT_CAPABILITIES
        .iter()
        .chain(extra_caps)
        .map(|c| (*c).to_owned())
        .collect();
    let profile = default_profile().expect("built-in profile parses");
    oci_seccomp(&profile, &caps, std::env::consts::ARCH).expect("filter builds")
}

/// Set in the child copy of the test binary to the case it checks; its absence marks the parent.
const CASE_VAR: &str = "GANTRY_SECCOMP_CHILD_CASE";
const BEHAVIOUR_TEST: &str = "libcontainer_loads_the_filter_and_it_behaves";

/// Whether the filter can be loaded here; under CI a missing piece is a failure.
fn can_load_filter() -> bool {
    if rustix::process::geteuid().is_root() {
        true
    } else if std::env::var_os("CI").is_some() {
        panic!("the seccomp behaviour test needs root; CI runs tests as root");
    } else {
        eprintln!("skipping: loading a seccomp filter through libcontainer needs root");
        false
    }
}

#[test]
fn libcontainer_loads_the_filter_and_it_behaves() {
    // The child is this same test, re-run alone with the case in the environment: it loads the
    // filter into its own process and checks it, leaving this process unfiltered.
    if let Ok(case) = std::env::var(CASE_VAR) {
        check_filter_in_this_process(&case);
        return;
    }
    if !can_load_filter() {
        return;
    }
    for case in ["default", "sys_admin"] {
        let out = Command::new(std::env::current_exe().expect("test binary path"))
            .args(["--exact", BEHAVIOUR_TEST, "--nocapture"])
            .env(CASE_VAR, case)
            .output()
            .expect("child test runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // "1 passed" guards against a filter that matched no test and so checked nothing.
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "case {case} failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("checks passed: {case}")),
            "{stderr}"
        );
    }
}

/// The errno of a raw syscall's result, or `None` if it succeeded.
fn errno(ret: libc::c_long) -> Option<i32> {
    (ret < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// clone with `flags | SIGCHLD` and no new stack, i.e. a fork; the child exits at once.
/// Raw, because glibc's fork would never pass namespace flags, which are what the filter checks.
fn raw_clone(flags: libc::c_int) -> Option<i32> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: without CLONE_VM the child runs on a copy of this stack and calls only
    // _exit, which is async-signal-safe; the parent reaps it below.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    if pid == 0 {
        // SAFETY: see above.
        unsafe { libc::_exit(0) };
    }
    let result = errno(pid);
    if pid > 0 {
        let mut status = 0;
        // SAFETY: pid is our child and status a valid out-pointer.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    }
    result
}

/// socket with a 64-bit family argument: raw, so the high bits reach the filter untruncated
/// (the kernel reads only the low 32, so the filter must not be fooled by the rest).
fn raw_socket(family: u64) -> Option<i32> {
    // SAFETY: socket takes only integers; a descriptor it returns is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_socket, family, libc::SOCK_SEQPACKET, 0) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us and is not used elsewhere.
        unsafe { libc::close(fd as libc::c_int) };
    }
    errno(fd)
}

fn raw(nr: libc::c_long, a0: u64, a1: u64) -> Option<i32> {
    // SAFETY: only called with syscalls that, given these arguments, either fail or act on
    // this throw-away child process (unshare, personality queries).
    errno(unsafe { libc::syscall(nr, a0, a1, 0usize, 0usize, 0usize) })
}

/// Loads the filter for `case` into this (child) process and checks what it refuses and allows.
fn check_filter_in_this_process(case: &str) {
    let sys_admin = match case {
        "default" => false,
        "sys_admin" => true,
        other => panic!("unknown {CASE_VAR} {other:?}"),
    };
    let seccomp = container_filter(if sys_admin { &["CAP_SYS_ADMIN"] } else { &[] });
    libcontainer::seccomp::initialize_seccomp(&seccomp).expect("libcontainer loads the filter");

    // Threads and processes still start: glibc tries clone3 first and falls back to clone.
    let answer = std::thread::Builder::new()
        .spawn(|| 7)
        .expect("a thread starts under the filter")
        .join()
        .expect("the thread finishes");
    assert_eq!(answer, 7);
    let status = Command::new("/bin/true")
        .status()
        .expect("a process starts under the filter");
    assert!(status.success());

    let eperm = Some(libc::EPERM);
    if sys_admin {
        // CAP_SYS_ADMIN lifts the namespace restrictions, as in Docker's profile.
        assert_eq!(raw_clone(libc::CLONE_NEWUTS), None, "clone(CLONE_NEWUTS)");
        assert_eq!(raw(libc::SYS_unshare, libc::CLONE_NEWUTS as u64, 0), None);
    } else {
        // clone3 hides its flags in memory the filter cannot read, so it must fail with ENOSYS
        // (making glibc fall back to clone) rather than be allowed.
        assert_eq!(raw(libc::SYS_clone3, 0, 0), Some(libc::ENOSYS), "clone3");
        for flag in [libc::CLONE_NEWUTS, libc::CLONE_NEWNET, libc::CLONE_NEWUSER] {
            assert_eq!(raw_clone(flag), eperm, "clone({flag:#x})");
        }
        assert_eq!(raw(libc::SYS_unshare, libc::CLONE_NEWUTS as u64, 0), eperm);
        assert_eq!(raw(libc::SYS_setns, u64::MAX, 0), eperm, "setns");
        assert_eq!(raw(libc::SYS_mount, 0, 0), eperm, "mount");
        assert_eq!(raw(libc::SYS_bpf, 0, 0), eperm, "bpf");
        assert_eq!(
            raw(libc::SYS_perf_event_open, 0, 0),
            eperm,
            "perf_event_open"
        );
    }
    // Refused whatever the capabilities.
    assert_eq!(raw(libc::SYS_keyctl, 0, 0), eperm, "keyctl");
    assert_eq!(raw(libc::SYS_io_uring_setup, 1, 0), eperm, "io_uring_setup");
    assert_eq!(raw(libc::SYS_kexec_load, 0, 0), eperm, "kexec_load");

    let (af_alg, af_vsock) = (libc::AF_ALG as u64, libc::AF_VSOCK as u64);
    for family in [af_alg, af_vsock, (1 << 32) | af_alg, (1 << 32) | af_vsock] {
        assert_eq!(raw_socket(family), eperm, "socket({family:#x})");
    }
    assert_eq!(raw_socket(libc::AF_UNIX as u64), None, "socket(AF_UNIX)");

    // Only the query and the plain Linux personalities are allowed.
    assert_eq!(
        raw(libc::SYS_personality, 0xffff_ffff, 0),
        None,
        "query persona"
    );
    assert_eq!(
        raw(libc::SYS_personality, libc::ADDR_NO_RANDOMIZE as u64, 0),
        eperm,
        "personality(ADDR_NO_RANDOMIZE)"
    );
    eprintln!("checks passed: {case}");
}
