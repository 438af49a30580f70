//! Acting on running agents: signalling their process groups and waiting for agents that
//! are not our children.

use super::{ProcessId, is_same_process};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};
use std::io;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Signals every process in the process group `pgid` (which is the agent's pid, since
/// [`super::spawn`] makes each agent lead its own group).
///
/// Signalling the group rather than the pid reaches what the agent started too (a shell
/// script's children, worker processes), so stopping an agent leaves nothing behind.
/// Returns `Ok(true)` if the signal was delivered and `Ok(false)` if the group no longer
/// exists (`ESRCH`), which for a stop is as good as done. A zombie keeps its group until
/// it is reaped (an orphaned one by init, later), and `kill(2)` succeeds on a group of
/// zombies, so `Ok(true)` does not prove that anything is still running: ask
/// [`super::is_same_process`] or wait for the exit for that.
///
/// `pgid` 0 and 1 are refused (`InvalidInput`) because `kill(2)` gives them meanings that
/// must never be reached by accident: 0 is hale's own group, and -1 is every process hale
/// may signal. hale's own group is refused for the same reason.
pub fn signal_group(pgid: u32, signal: Signal) -> io::Result<bool> {
    let group = i32::try_from(pgid).ok().filter(|&raw| raw > 1).and_then(Pid::from_raw).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{pgid} is not an agent's process group"))
    })?;
    if group == rustix::process::getpgrp() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("process group {pgid} is hale's own; refusing to signal it"),
        ));
    }
    match rustix::process::kill_process_group(group, signal) {
        Ok(()) => Ok(true),
        Err(Errno::SRCH) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Waits until a process that is NOT our child exits: an agent adopted after a hale
/// restart, whose exit status belongs to its original parent (or to init).
///
/// It opens a pidfd (`pidfd_open(2)`), which becomes readable when the process exits
/// (becoming a zombie counts), and waits for that with tokio's `AsyncFd`, so nothing polls.
/// It fails if the pidfd cannot be opened; `ESRCH` (an `io::Error` whose
/// `raw_os_error()` is `ESRCH`) means the process is already gone, which the caller
/// treats as "exited". The pidfd is opened when the future is first polled, which must
/// happen within a tokio runtime.
///
/// Prefer [`wait_adopted_exit_of`] when the [`ProcessId`] is known: with a bare pid, a
/// process that died and whose pid was reused before this call is not noticed.
pub async fn wait_adopted_exit(pid: u32) -> io::Result<()> {
    let pidfd = open_pidfd(pid)?;
    wait_readable(pidfd).await
}

/// Like [`wait_adopted_exit`], but also makes sure the pidfd names the process `id`.
///
/// The pidfd is opened first and the start time checked second, so the check cannot be
/// fooled by a pid recycled in between. If `id` is no longer running (exited, a zombie, or
/// the pid now belongs to another process) it fails with `io::ErrorKind::NotFound`, which
/// the caller treats as "exited".
pub async fn wait_adopted_exit_of(id: ProcessId) -> io::Result<()> {
    let pidfd = open_pidfd(id.pid)?;
    if !is_same_process(id) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {} (started at tick {}) is no longer running", id.pid, id.start_ticks),
        ));
    }
    wait_readable(pidfd).await
}

fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{pid} is not a process id")))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::NONBLOCK)?)
}

async fn wait_readable(pidfd: OwnedFd) -> io::Result<()> {
    // tokio 1.54 deprecates the safe `AsyncFd` constructors in favour of `unsafe` ones
    // (tokio-rs/tokio#8587), because an arbitrary `T: AsRawFd` may close or swap its fd
    // while registered. An `OwnedFd` moved into the `AsyncFd` cannot: it owns its fd,
    // always returns the same one and closes it only on drop, after deregistration. So
    // the safe constructor is sound here, and the workspace keeps `unsafe` to one reviewed block.
    #[allow(deprecated)]
    let pidfd = AsyncFd::with_interest(pidfd, Interest::READABLE)?;
    let _ready = pidfd.readable().await?;
    Ok(())
}
