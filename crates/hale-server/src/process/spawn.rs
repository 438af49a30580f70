//! Starting an agent incarnation.

use super::proc_fs::read_stat;
use super::{AgentLogs, ProcessId, ProcessSpec, signal_group};
use rustix::io::Errno;
use rustix::process::{Resource, Rlimit, Signal};
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
/// Resource limits are set in the child between `fork` and `exec` (a `pre_exec` hook that
/// calls `setrlimit(2)`), so the program runs under them from its first instruction. An
/// earlier version applied them with `prlimit(2)` right after the spawn, which raced with
/// the program's start: a runtime that reserves its heap early (mimalloc, thread stacks)
/// sometimes started under the limit and sometimes not. Both soft and hard limits are set,
/// so the agent cannot raise them again. A limit that cannot be set (above hale's own hard
/// limit without privilege, or above `fs.nr_open` for open files) is refused before the
/// spawn with [`SpawnError::Limit`] (its `pid` is 0: nothing was started).
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

    let mut limits: Vec<(Resource, u64)> = Vec::new();
    let wanted = [
        (
            Resource::As,
            "the address space",
            spec.address_space_mb.map(|mb| (mb.saturating_mul(1024 * 1024), format!("{mb} MiB"))),
        ),
        (Resource::Nofile, "open files", spec.open_files.map(|n| (n, n.to_string()))),
    ];
    for (resource, what, wanted) in wanted {
        let Some((limit, value)) = wanted else { continue };
        if let Err(source) = check_limit(resource, limit) {
            return Err(SpawnError::Limit { command: command_name(), pid: 0, what, value, source });
        }
        limits.push((resource, limit));
    }

    let mut command = std::process::Command::new(&spec.command);
    command.args(&spec.args).envs(&spec.env).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
    // systemd's notify socket, watchdog settings and credentials are hale's alone.
    for name in crate::notify::SYSTEMD_VARIABLES {
        command.env_remove(name);
    }
    if let Some(workdir) = &spec.workdir {
        command.current_dir(workdir);
    }
    if !limits.is_empty() {
        set_limits_before_exec(&mut command, limits);
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
    Ok((child, ProcessId { pid, start_ticks }))
}

/// Whether this process could set `resource` to `limit` in a child: raising a hard limit
/// needs privilege, and open files cannot go above `fs.nr_open` even for root. Checked
/// before the spawn so the error names the limit instead of failing the `exec`.
fn check_limit(resource: Resource, limit: u64) -> io::Result<()> {
    let own = rustix::process::getrlimit(resource);
    let privileged = rustix::process::geteuid().is_root();
    if own.maximum.is_some_and(|maximum| limit > maximum) && !privileged {
        return Err(io::Error::from(Errno::PERM));
    }
    if resource == Resource::Nofile {
        let nr_open =
            std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|text| text.trim().parse::<u64>().ok());
        if nr_open.is_some_and(|nr_open| limit > nr_open) {
            return Err(io::Error::from(Errno::PERM));
        }
    }
    Ok(())
}

/// Makes the child set `limits` (soft and hard) on itself after `fork`, before `exec`.
#[allow(unsafe_code)]
fn set_limits_before_exec(command: &mut std::process::Command, limits: Vec<(Resource, u64)>) {
    let hook = move || -> io::Result<()> {
        for (resource, limit) in &limits {
            let rlimit = Rlimit { current: Some(*limit), maximum: Some(*limit) };
            rustix::process::setrlimit(*resource, rlimit)
                .map_err(|errno| io::Error::from_raw_os_error(errno.raw_os_error()))?;
        }
        Ok(())
    };
    // SAFETY: `pre_exec` runs the hook in the child between fork and exec, where only
    // async-signal-safe operations are allowed. The hook reads a Vec built before the
    // fork (no allocation, no lock), calls setrlimit(2) through rustix (one raw system
    // call, no libc state), and on failure builds an io::Error from a raw OS error code,
    // which allocates nothing. It touches no other memory of the parent.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Kills a child that `spawn` is giving up on, with everything it may have started. The
/// dropped tokio `Child` is reaped by tokio in the background.
fn kill_new_child(child: &mut tokio::process::Child, pid: u32) {
    let _ = signal_group(pid, Signal::KILL);
    let _ = child.start_kill();
}
