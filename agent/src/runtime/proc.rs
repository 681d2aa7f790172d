//! Process identity that survives PID reuse: a PID plus its start time from /proc, checked after
//! a pidfd is opened, so that a recorded PID is never trusted on its own after a restart.

use std::io;
use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags, pidfd_open};
use serde::{Deserialize, Serialize};

/// A process as recorded in a state file: its PID and its start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Host PID.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat.
    pub start_time: u64,
}

impl ProcId {
    /// Identifies the live process `pid`.
    pub fn of(pid: i32) -> io::Result<ProcId> {
        Ok(ProcId {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// A pidfd for this process if it is still the same process (same start time), else `None`
    /// (it exited and its PID may have been reused).
    pub fn open(&self) -> io::Result<Option<OwnedFd>> {
        let Some(pid) = Pid::from_raw(self.pid) else {
            return Ok(None);
        };
        let fd = match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // The pidfd pins the process: if the start time matches now, the fd is the recorded
        // process and stays so, whatever happens to the PID later.
        match start_time(self.pid) {
            Ok(t) if t == self.start_time => Ok(Some(fd)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })
}

/// Field 22 of a /proc/PID/stat line. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3, 4, …; field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is a zombie or gone (used where a pidfd is not available).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_with_odd_command_names() {
        let line =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2 3";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_process_identity_opens_and_a_wrong_start_time_does_not() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert!(me.open().unwrap().is_some());
        let stale = ProcId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(stale.open().unwrap().is_none());
    }
}
