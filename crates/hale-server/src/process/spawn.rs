//! Starting an agent incarnation.

use super::identity::{self, RunAs};
use super::proc_fs::read_stat;
use super::{AgentLogs, ProcessId, ProcessSpec, environment, signal_group};
use rustix::io::Errno;
use rustix::process::{Resource, Rlimit, Signal};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Why an agent could not be started. Every message names the command, because the
/// operator reads it in `hale agents` or the server log next to many others.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program could not be executed (not found, not executable, ...).
    #[error("cannot start `{command}`: {source}{}", start_hint(.command, .source))]
    Start { command: String, source: io::Error },
    /// The `user` to run as is unknown, or hale may not switch to it.
    #[error("cannot start `{command}` as user {user:?}: {reason}")]
    User { command: String, user: String, reason: String },
    /// The `env_file` could not be read or is not `NAME=value` lines.
    #[error("cannot start `{command}`: its env_file {}: {reason}", .path.display())]
    EnvFile { command: String, path: PathBuf, reason: String },
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
/// - gets only the environment [`environment::agent_environment`] builds (never hale's
///   secrets), and runs in `spec.workdir`;
/// - runs as `spec.user` if set: its groups, group and user are set in the child before
///   `exec`, after the rlimits (which may need hale's privilege), and the umask hale had
///   before it restricted its own ([`protect_secrets`]) is restored.
///
/// The process joins `spec.cgroup` (when set) and gets its resource limits in the child
/// between `fork` and `exec` (a `pre_exec` hook that writes to the cgroups' `cgroup.procs`
/// and calls `setrlimit(2)`), so the program runs under them from its first instruction. An
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

    let run_as = match &spec.user {
        Some(user) => {
            Some(identity::can_switch().and_then(|()| identity::resolve(user)).map_err(|reason| SpawnError::User {
                command: command_name(),
                user: user.clone(),
                reason,
            })?)
        }
        None => None,
    };
    let file = match &spec.env_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| error.to_string())
            .and_then(|text| environment::parse_env_file(&text))
            .map_err(|reason| SpawnError::EnvFile { command: command_name(), path: path.clone(), reason })?,
        None => Vec::new(),
    };
    let who: Vec<(&str, std::ffi::OsString)> = match &run_as {
        Some(run_as) => vec![
            ("HOME", run_as.home.clone().into_os_string()),
            ("USER", run_as.name.clone().into()),
            ("LOGNAME", run_as.name.clone().into()),
        ],
        None => Vec::new(),
    };
    let env = environment::agent_environment(&spec.pass_env, std::env::vars_os(), &who, &file, &spec.env);

    let mut command = std::process::Command::new(&spec.command);
    command.args(&spec.args).env_clear().envs(env).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
    if let Some(workdir) = &spec.workdir {
        command.current_dir(workdir);
    }
    // Opened before the fork, so the child only writes (see `join_cgroups`).
    let mut cgroup_procs = Vec::new();
    for path in spec.cgroup.iter().flat_map(|cgroup| cgroup.procs_files()) {
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(file) => cgroup_procs.push(file),
            Err(source) => {
                let value = path.parent().unwrap_or(&path).display().to_string();
                return Err(SpawnError::Limit { command: command_name(), pid: 0, what: "the cgroup", value, source });
            }
        }
    }
    prepare_before_exec(&mut command, cgroup_procs, limits, run_as.as_ref(), saved_umask());
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

/// Makes `dir`, an agent's own working directory, private to the user it runs as (0700,
/// owned by `spec.user` when it has one). Its parent, the base of all agents' directories,
/// is made traversable but not listable (0711) when hale creates it, so an agent running
/// as another user can reach its own directory and cannot see the others'.
pub fn make_workdir(dir: &Path, spec: &ProcessSpec) -> Result<(), SpawnError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail =
        |source: io::Error| SpawnError::Workdir { command: spec.command.clone(), workdir: dir.to_path_buf(), source };
    if let Some(base) = dir.parent()
        && !base.exists()
    {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(base).map_err(fail)?;
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711)).map_err(fail)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(error) => return Err(fail(error)),
    }
    if let Some(user) = &spec.user {
        let run_as = identity::resolve(user).map_err(|reason| SpawnError::User {
            command: spec.command.clone(),
            user: user.clone(),
            reason,
        })?;
        let (uid, gid) = (rustix::process::Uid::from_raw(run_as.uid), rustix::process::Gid::from_raw(run_as.gid));
        rustix::fs::chown(dir, Some(uid), Some(gid)).map_err(|errno| fail(errno.into()))?;
    }
    Ok(())
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

/// Makes the child, after `fork` and before `exec`, in this order, each a step of its
/// own: join its cgroups, set `limits` (soft and hard) on itself, drop any ambient
/// capabilities, take the identity of `run_as` (supplementary groups, group, then user:
/// the order that leaves it no way back; after the limits, which may need hale's
/// privilege), and the `umask` hale started with.
#[allow(unsafe_code)]
fn prepare_before_exec(
    command: &mut std::process::Command,
    cgroup_procs: Vec<std::fs::File>,
    limits: Vec<(Resource, u64)>,
    run_as: Option<&RunAs>,
    umask: Option<u32>,
) {
    // Everything the hook needs is built here, before the fork.
    let ids = run_as.map(|run_as| {
        let groups: Vec<rustix::process::Gid> =
            run_as.groups.iter().map(|gid| rustix::process::Gid::from_raw(*gid)).collect();
        (groups, rustix::process::Gid::from_raw(run_as.gid), rustix::process::Uid::from_raw(run_as.uid))
    });
    let umask = umask.map(rustix::fs::Mode::from_raw_mode);
    let hook = move || -> io::Result<()> {
        join_cgroups(&cgroup_procs)?;
        set_limits(&limits)?;
        drop_ambient_capabilities()?;
        if let Some((groups, gid, uid)) = &ids {
            switch_identity(groups, *gid, *uid)?;
        }
        if let Some(umask) = umask {
            rustix::process::umask(umask);
        }
        Ok(())
    };
    // SAFETY: `pre_exec` runs the hook in the child between fork and exec, where only
    // async-signal-safe operations are allowed. Every step makes raw system calls through
    // rustix (write, setrlimit, prctl, setgroups, setgid, setuid, umask: one system call
    // each, no libc state; the set-id calls are the kernel's per-thread ones, and the
    // child has one thread) on values built before the fork (no allocation, no lock).
    // Joining the cgroups writes the static buffer "0" to `cgroup.procs` files opened
    // before the fork (inherited; close-on-exec, so the program does not keep them). On
    // failure an io::Error is built from a raw OS error code, which allocates nothing.
    // The hook touches no other memory of the parent.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Step one in the child: join the agent's cgroups (one file on v2, one per controller
/// on v1). Writing "0" to `cgroup.procs` moves the writing process, so the program runs
/// under the cgroup's limits from its first instruction.
fn join_cgroups(cgroup_procs: &[std::fs::File]) -> io::Result<()> {
    for file in cgroup_procs {
        rustix::io::write(file, b"0").map_err(os_error)?;
    }
    Ok(())
}

/// Step two in the child: the rlimits, soft and hard.
fn set_limits(limits: &[(Resource, u64)]) -> io::Result<()> {
    for (resource, limit) in limits {
        let rlimit = Rlimit { current: Some(*limit), maximum: Some(*limit) };
        rustix::process::setrlimit(*resource, rlimit).map_err(os_error)?;
    }
    Ok(())
}

/// Step three: capabilities hale holds in its ambient set (systemd's
/// `AmbientCapabilities=`) would pass to every agent through exec: never. Older kernels
/// have no ambient set.
fn drop_ambient_capabilities() -> io::Result<()> {
    match rustix::thread::clear_ambient_capability_set() {
        Ok(()) | Err(Errno::INVAL) => Ok(()),
        Err(errno) => Err(os_error(errno)),
    }
}

/// Step four: become the agent's user, for good.
fn switch_identity(
    groups: &[rustix::process::Gid],
    gid: rustix::process::Gid,
    uid: rustix::process::Uid,
) -> io::Result<()> {
    rustix::thread::set_thread_groups(groups).map_err(os_error)?;
    rustix::thread::set_thread_gid(gid).map_err(os_error)?;
    rustix::thread::set_thread_uid(uid).map_err(os_error)
}

fn os_error(errno: Errno) -> io::Error {
    io::Error::from_raw_os_error(errno.raw_os_error())
}

/// The umask hale had before [`protect_secrets`], which agents get back.
static SAVED_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn saved_umask() -> Option<u32> {
    SAVED_UMASK.get().copied()
}

/// Keeps hale's secrets from its own user's other processes, agents first. `hale serve`
/// and `hale up` call it before anything else:
/// - every file hale creates from now on is private to hale's user (umask 0077: the log,
///   its WAL, snapshots, backups, agents' log files); the umask hale had is remembered so
///   the agents it starts get that one back;
/// - hale becomes non-dumpable (`PR_SET_DUMPABLE` 0), so its `/proc/PID/environ` and
///   memory, which may hold `HALE_ADMIN_TOKEN` and `HALE_ENCRYPTION_KEY`, are root's
///   alone and no process of its user can ptrace it. Children are dumpable again after
///   `exec`.
pub fn protect_secrets() {
    let before = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let _ = SAVED_UMASK.set(before.as_raw_mode());
    if let Err(error) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        tracing::warn!(%error, "cannot make hale non-dumpable: processes of its user may read its environment");
    }
}

/// Kills a child that `spawn` is giving up on, with everything it may have started. The
/// dropped tokio `Child` is reaped by tokio in the background.
fn kill_new_child(child: &mut tokio::process::Child, pid: u32) {
    let _ = signal_group(pid, Signal::KILL);
    let _ = child.start_kill();
}
