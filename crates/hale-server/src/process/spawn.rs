//! Starting an agent incarnation.

use super::proc_fs::read_stat;
use super::{AgentLogs, ProcessId, ProcessSpec, signal_group};
use rustix::io::Errno;
use rustix::process::{Pid, Resource, Rlimit, Signal};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

/// Why an agent could not be started. Every message names the command, because the
/// operator reads it in `hale agents` or the server log next to many others.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program could not be executed (not found, not executable, ...).
    #[error("cannot start `{command}`: {source}{}", start_hint(.command, .source))]
    Start { command: String, source: io::Error },
    /// The working directory does not exist or is not a directory.
    #[error("cannot start `{command}` in {}: {source}", .workdir.display())]
    Workdir { command: String, workdir: PathBuf, source: io::Error },
    /// The log file could not be created or opened.
    #[error("cannot open the log file {} for `{command}`: {source}", .path.display())]
    Log { command: String, path: PathBuf, source: io::Error },
    /// A resource limit could not be applied; the process was killed rather than left
    /// running without the limit it was configured with.
    #[error(
        "cannot limit {what} of `{command}` (pid {pid}) to {value}: {source}{}",
        limit_hint(.source)
    )]
    Limit { command: String, pid: u32, what: &'static str, value: String, source: io::Error },
    /// The new process's start time could not be read from `/proc`, so it could not be
    /// recorded in a form that survives pid reuse; it was killed.
    #[error("started `{command}` (pid {pid}) but cannot read /proc/{pid}/stat: {source}; is /proc mounted?")]
    Identity { command: String, pid: u32, source: io::Error },
}

fn start_hint(command: &str, error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::NotFound if command.contains('/') => " (no such file)",
        io::ErrorKind::NotFound => " (is it on PATH?)",
        io::ErrorKind::PermissionDenied => " (is it executable?)",
        _ => "",
    }
}

fn limit_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied {
        " (is it above hale's own hard limit, or above the system's maximum?)"
    } else {
        ""
    }
}

/// Spawns `spec` as a new agent process and returns its tokio `Child` (whose `wait` gives
/// the exit status) and its [`ProcessId`] (what the log records, to adopt it later).
///
/// The process:
/// - leads a process group of its own (pgid = pid, via the safe
///   `CommandExt::process_group(0)`), so [`signal_group`] reaches everything it starts and
///   a Ctrl-C in hale's terminal does not reach the agent;
/// - reads `/dev/null`, and writes stdout and stderr straight into `logs`' file (see
///   [`AgentLogs::open_for_child`]); hale keeps no handle on it, so the agent keeps running
///   and logging if hale dies, and is not killed when its `Child` is dropped;
/// - gets `spec.env` on top of hale's environment and runs in `spec.workdir`.
///
/// Resource limits are applied with `prlimit(2)` on the child right after the spawn
/// returns. That is the nearest we get to "at spawn" without an `unsafe` `pre_exec` hook:
/// the program is already running for a moment without them. Lowering a limit does not
/// take back what the process already has: a process that already maps more than the
/// address-space limit keeps its mappings and only further allocations fail, and
/// descriptors already open stay open. Both soft and hard limits are set, so the agent
/// cannot raise them again. If a limit cannot be applied the process group is killed and
/// [`SpawnError::Limit`] returned. A process that exits before the limits are applied
/// needs none; its exit status is in the `Child`.
///
/// It must be called within a tokio runtime (tokio's process driver reaps the child). The
/// `Child` should be waited for; if it is dropped instead, tokio reaps the process in the
/// background once it exits, and the process itself is left running.
pub fn spawn(spec: &ProcessSpec, logs: &AgentLogs) -> Result<(tokio::process::Child, ProcessId), SpawnError> {
    let command_name = || spec.command.clone();
    if let Some(workdir) = &spec.workdir {
        let checked = std::fs::metadata(workdir)
            .and_then(|meta| if meta.is_dir() { Ok(()) } else { Err(io::Error::from(io::ErrorKind::NotADirectory)) });
        if let Err(source) = checked {
            return Err(SpawnError::Workdir { command: command_name(), workdir: workdir.clone(), source });
        }
    }
    let (stdout, stderr) = logs.open_for_child().map_err(|source| SpawnError::Log {
        command: command_name(),
        path: logs.path(),
        source,
    })?;

    let mut command = std::process::Command::new(&spec.command);
    command.args(&spec.args).envs(&spec.env).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
    if let Some(workdir) = &spec.workdir {
        command.current_dir(workdir);
    }
    // tokio's Command does not kill on drop unless asked, which is what we want: an agent
    // outlives the value (and hale).
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .map_err(|source| SpawnError::Start { command: command_name(), source })?;
    // The temporary `Command` is gone, and with it hale's copies of the log handles.
    let pid = child.id().expect("a child that was just spawned and not waited for has a pid");

    // The child cannot be reaped before we wait on it, so its /proc entry is there even if
    // it already exited (as a zombie, whose stat still holds the start time).
    let start_ticks = match read_stat(pid) {
        Ok(stat) => stat.start_ticks,
        Err(source) => {
            kill_new_child(&mut child, pid);
            return Err(SpawnError::Identity { command: command_name(), pid, source });
        }
    };

    let limits = [
        (
            Resource::As,
            "the address space",
            spec.address_space_mb.map(|mb| (mb.saturating_mul(1024 * 1024), format!("{mb} MiB"))),
        ),
        (Resource::Nofile, "open files", spec.open_files.map(|n| (n, n.to_string()))),
    ];
    for (resource, what, wanted) in limits {
        let Some((limit, value)) = wanted else { continue };
        if let Err(source) = set_limit(pid, resource, limit) {
            kill_new_child(&mut child, pid);
            return Err(SpawnError::Limit { command: command_name(), pid, what, value, source });
        }
    }
    Ok((child, ProcessId { pid, start_ticks }))
}

/// Sets the soft and hard limit of `resource` of process `pid` to `limit`.
///
/// `ESRCH` is success: our child cannot have been reaped yet, so `ESRCH` means it already
/// exited, and an exited process needs no limit.
fn set_limit(pid: u32, resource: Resource, limit: u64) -> io::Result<()> {
    let target = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let Some(target) = target else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{pid} is not a process id")));
    };
    let rlimit = Rlimit { current: Some(limit), maximum: Some(limit) };
    match rustix::process::prlimit(Some(target), resource, rlimit) {
        Ok(_previous) => Ok(()),
        Err(Errno::SRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Kills a child that `spawn` is giving up on, with everything it may have started. The
/// dropped tokio `Child` is reaped by tokio in the background.
fn kill_new_child(child: &mut tokio::process::Child, pid: u32) {
    let _ = signal_group(pid, Signal::KILL);
    let _ = child.start_kill();
}
