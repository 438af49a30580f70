//! The low-level process layer the supervisor stands on (Linux only).
//!
//! An agent incarnation is an ordinary child process, started so that it outlives hale:
//! it leads a process group of its own (so one signal reaches everything it started), it
//! reads `/dev/null`, and it writes straight into its log file opened `O_APPEND` (so no
//! pipe runs through hale: a pipe would break, and `SIGPIPE` the agent, when hale dies).
//! A restarted hale finds its agents again by [`ProcessId`] (pid plus start time, which a
//! reused pid does not repeat), waits for them with a pidfd ([`wait_adopted_exit`]), and
//! reads their resource use from `/proc` ([`usage`]).
//!
//! - [`spawn`] (in `spawn.rs`) starts a [`ProcessSpec`] and applies its rlimits.
//! - `cgroup.rs` makes each agent's cgroup (v2 delegated, or v1) and reads its OOM kills.
//! - `control.rs` signals process groups and waits for processes that are not our children.
//! - `proc_fs.rs` parses `/proc/PID/stat` and `/proc/PID/statm`.
//! - `logs.rs` owns the per-agent log files: rotation by copy-and-truncate, `tail`, `follow`.
//!
//! The one `unsafe` block of the workspace is here: the `pre_exec` hook that sets the
//! agent's rlimits between fork and exec (see [`spawn`]); applying them afterwards with
//! `prlimit(2)` raced with the program's start and made limits apply only sometimes.

mod cgroup;
mod control;
pub mod environment;
pub mod identity;
mod logs;
mod proc_fs;
mod spawn;
#[cfg(test)]
mod tests;

pub use cgroup::{AgentCgroup, CPU_PERIOD_US, CgroupLimits, CgroupSetting, Cgroups};
pub use control::{signal_group, wait_adopted_exit, wait_adopted_exit_of};
pub use logs::{AgentLogs, follow, tail};
pub use proc_fs::{Found, find_agents, group_usage, groups_usage, is_same_process, start_ticks, usage};
/// The signals [`signal_group`] sends, re-exported so the supervisor need not name rustix.
pub use rustix::process::Signal;
pub use spawn::{SpawnError, make_workdir, protect_secrets, spawn};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What to run for one agent incarnation.
///
/// The supervisor builds one from the agent's manifest entry each time it starts an
/// incarnation, so everything that shapes the process is in one value that can be logged
/// and compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program. A name without a slash is looked up on `PATH` the way
    /// `std::process::Command` does; a relative path with a slash is ambiguous once
    /// `workdir` is set, so the manifest resolves it against the directory of hale.toml.
    pub command: String,
    /// The arguments after the program name.
    pub args: Vec<String>,
    /// The agent's own variables (hale.toml's `env`, and what hale sets for it). The agent
    /// gets none of hale's environment but these and `pass_env` (see [`environment`]).
    pub env: BTreeMap<String, String>,
    /// Names of hale's own variables the agent gets too (default
    /// [`environment::DEFAULT_PASS_ENV`]); hale's secrets never pass.
    pub pass_env: Vec<String>,
    /// A file of `NAME=value` lines read at each start: secrets the agent itself needs.
    pub env_file: Option<PathBuf>,
    /// Run as this user: `name`, `name:group`, or numeric ids (see [`identity`]).
    pub user: Option<String>,
    /// The working directory; `None` keeps hale's. It must exist: [`spawn`] checks it first
    /// so that a missing directory is not reported as a missing program.
    pub workdir: Option<PathBuf>,
    /// The address-space limit (`RLIMIT_AS`) in MiB, soft and hard, so the agent cannot
    /// raise it again. `None` leaves hale's limit.
    pub address_space_mb: Option<u64>,
    /// The open-file limit (`RLIMIT_NOFILE`), soft and hard. `None` leaves hale's limit.
    pub open_files: Option<u64>,
    /// The limits of the agent's cgroup, where hale makes one (see [`Cgroups`]).
    pub cgroup_limits: CgroupLimits,
    /// The cgroup the process joins before it runs (set by the supervisor when it starts
    /// an incarnation); `None` runs it in hale's own.
    pub cgroup: Option<AgentCgroup>,
}

impl Default for ProcessSpec {
    fn default() -> Self {
        ProcessSpec {
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            pass_env: environment::DEFAULT_PASS_ENV.iter().map(|name| name.to_string()).collect(),
            env_file: None,
            user: None,
            workdir: None,
            address_space_mb: None,
            open_files: None,
            cgroup_limits: CgroupLimits::default(),
            cgroup: None,
        }
    }
}

/// A process identity that survives pid reuse: the pid plus its start time in clock
/// ticks since boot (field 22 of `/proc/PID/stat`).
///
/// Pids are recycled, so a pid alone recorded before a hale restart may name some other
/// process afterwards; two processes with the same pid never share a start time, so the
/// pair identifies one process for as long as the machine is up. It is what the log keeps
/// so a restarted hale can tell whether to adopt a running agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    /// The process id, which is also the agent's process group id (see [`spawn`]).
    pub pid: u32,
    /// When the process started, in clock ticks since boot.
    pub start_ticks: u64,
}

/// Resource figures of one process, read from `/proc` for the detectors (memory growth,
/// a spinning or a stalled agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The resident set in bytes: what the process occupies in RAM now.
    pub rss_bytes: u64,
    /// User plus system CPU time since the process started, in milliseconds; the rate at
    /// which it grows tells a busy process from an idle one.
    pub cpu_ms: u64,
}
