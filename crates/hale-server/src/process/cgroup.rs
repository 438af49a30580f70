//! Kernel limits for agents: a cgroup per agent, on cgroup v2 delegated to hale or on the
//! v1 `memory`, `pids` and `cpu` hierarchies a host mounts instead.
//!
//! Written on the file protocol (mkdir, a few writes, rmdir) rather than with cgroups-rs:
//! its current release (0.5.1) depends on zbus and nix (a D-Bus stack for the systemd
//! driver hale does not use), and it moves a task with `add_task(pid)` after the spawn,
//! which races with the program's start the way `prlimit(2)` did (see `spawn.rs`). hale
//! needs the `cgroup.procs` files opened before the fork, so the child joins its cgroup
//! before its first instruction; the rest is a handful of files.
//!
//! Layout. Every data directory gets a base cgroup `hale-<hash of the data directory>`, so
//! hale instances of different data directories never share one; each agent gets
//! `agent-<name>` under it, kept across its incarnations (a restarted hale adopts running
//! agents and finds their cgroup by name) and removed when the agent stops on purpose and
//! when hale shuts down. On v1 the base sits under hale's own cgroup of each controller
//! (read from `/proc/self/cgroup`), on v2 under hale's own cgroup, which must be delegated
//! to it (`Delegate=yes`): v2 lets no process live in a cgroup that distributes
//! controllers to children, so hale first moves itself into a leaf `supervisor` beside the
//! bases.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// `[supervision] cgroups`: whether hale tries to make cgroups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupSetting {
    /// Use cgroup v2 if delegated, else v1, else poll /proc.
    #[default]
    Auto,
    /// Never: memory and CPU are polled from /proc (the fallback, for hosts where making
    /// cgroups is unwanted).
    Off,
}

/// The limits of one agent's cgroup, from `[agent.resources]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory_mb`: `memory.max` (v2), `memory.limit_in_bytes` (v1), and the same for
    /// memory plus swap where swap is accounted, so the limit is not swapped around.
    pub memory_bytes: Option<u64>,
    /// `pids_max`: `pids.max`.
    pub pids_max: Option<u64>,
    /// `cpu_quota_percent`: percent of one core, as `cpu.max` (v2) or
    /// `cpu.cfs_quota_us`/`cpu.cfs_period_us` (v1) over a 100 ms period.
    pub cpu_quota_percent: Option<u32>,
}

impl CgroupLimits {
    /// No kernel limit is asked for: the agent gets no cgroup.
    pub fn is_empty(&self) -> bool {
        self.memory_bytes.is_none() && self.pids_max.is_none() && self.cpu_quota_percent.is_none()
    }
}

/// The CFS period hale sets with a CPU quota, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// The controllers hale uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// What hale found at start and uses for every agent.
#[derive(Clone, Debug)]
pub enum Cgroups {
    /// cgroup v2: `base` is `<hale's delegated cgroup>/hale-<hash>`.
    V2 { base: PathBuf },
    /// cgroup v1: the base of each controller hale uses (memory always; pids and cpu
    /// where mounted).
    V1 { bases: Vec<(&'static str, PathBuf)> },
    /// No cgroups: memory and CPU are polled from /proc. `reason` says why.
    None { reason: String },
}

/// One agent's cgroup (one directory on v2, one per controller on v1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCgroup {
    v2: bool,
    dirs: Vec<(&'static str, PathBuf)>,
}

impl Cgroups {
    /// Finds what this host offers, makes hale's base cgroup, and removes agent cgroups a
    /// previous hale of the same data directory left empty. `data_dir_id` names the data
    /// directory (its canonical path).
    pub fn detect(setting: CgroupSetting, data_dir_id: &str) -> Cgroups {
        if setting == CgroupSetting::Off {
            return Cgroups::None { reason: "off in hale.toml ([supervision] cgroups = \"off\")".into() };
        }
        let base_name = format!("hale-{:016x}", fnv1a(data_dir_id.as_bytes()));
        let own = match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(text) => text,
            Err(error) => return Cgroups::None { reason: format!("cannot read /proc/self/cgroup: {error}") },
        };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v2_problem = match try_v2(&own, &mounts, &base_name) {
            Ok(cgroups) => return cgroups.cleaned(),
            Err(problem) => problem,
        };
        match try_v1(&own, &mounts, &base_name) {
            Ok(cgroups) => cgroups.cleaned(),
            Err(v1_problem) => Cgroups::None { reason: format!("{v2_problem}; {v1_problem}") },
        }
    }

    /// Whether agents get cgroups (and the memory limit is the kernel's, not polled).
    pub fn active(&self) -> bool {
        !matches!(self, Cgroups::None { .. })
    }

    /// One line for the log at start and for `hale status`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base } => format!("v2 delegated at {}", base.display()),
            Cgroups::V1 { bases } => {
                let names: Vec<&str> = bases.iter().map(|(name, _)| *name).collect();
                let memory = bases.iter().find(|(name, _)| *name == "memory").map(|(_, path)| path.display());
                format!("v1 ({}) under {}", names.join(", "), memory.map(|path| path.to_string()).unwrap_or_default())
            }
            Cgroups::None { reason } => format!("none ({reason}); memory and CPU are polled from /proc"),
        }
    }

    /// Makes (or finds) the cgroup of `agent` and writes its limits. A limit it cannot
    /// write is an error: the agent is not started without the limit it was given.
    pub fn agent(&self, agent: &str, limits: &CgroupLimits) -> io::Result<Option<AgentCgroup>> {
        let Some(cgroup) = self.named(agent) else { return Ok(None) };
        for (_, dir) in &cgroup.dirs {
            create_dir(dir)?;
        }
        cgroup.apply(limits)?;
        Ok(Some(cgroup))
    }

    /// The cgroup of `agent` if it exists: where an agent adopted after a restart of hale
    /// still runs.
    pub fn existing(&self, agent: &str) -> Option<AgentCgroup> {
        self.named(agent).filter(|cgroup| cgroup.dirs.iter().all(|(_, dir)| dir.is_dir()))
    }

    fn named(&self, agent: &str) -> Option<AgentCgroup> {
        let leaf = format!("agent-{agent}");
        match self {
            Cgroups::None { .. } => None,
            Cgroups::V2 { base } => Some(AgentCgroup { v2: true, dirs: vec![("", base.join(&leaf))] }),
            Cgroups::V1 { bases } => Some(AgentCgroup {
                v2: false,
                dirs: bases.iter().map(|(name, base)| (*name, base.join(&leaf))).collect(),
            }),
        }
    }

    /// Removes every agent cgroup with no process left, then the base. Called when hale
    /// shuts down, after its agents stopped; a cgroup that still holds a process (an agent
    /// hale could not stop) is kept and named in the log.
    pub fn remove_all(&self) {
        for base in self.bases() {
            for dir in agent_dirs(&base) {
                if let Err(error) = remove_dir(&dir) {
                    tracing::warn!(path = %dir.display(), %error, "could not remove an agent's cgroup");
                }
            }
            let _ = std::fs::remove_dir(&base);
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { base } => vec![base.clone()],
            Cgroups::V1 { bases } => bases.iter().map(|(_, base)| base.clone()).collect(),
            Cgroups::None { .. } => Vec::new(),
        }
    }

    /// Removes the empty agent cgroups a previous hale of this data directory left (it
    /// died before removing them); those with processes are agents to adopt.
    fn cleaned(self) -> Cgroups {
        for base in self.bases() {
            for dir in agent_dirs(&base) {
                if procs(&dir).is_empty() {
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        self
    }
}

impl AgentCgroup {
    /// The files a process writes "0" to in order to join this cgroup: opened before the
    /// fork, written in the child (see `spawn`).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, dir)| dir.join("cgroup.procs")).collect()
    }

    /// The directories, one per v1 controller or the one of v2.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, dir)| dir.as_path())
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup since it
    /// was made: `oom_kill` of `memory.events` (v2) or `memory.oom_control` (v1, kernel
    /// 4.13 and later). `None` where the kernel does not count.
    pub fn oom_kills(&self) -> Option<u64> {
        let (file, dir) = if self.v2 {
            ("memory.events", &self.dirs.first()?.1)
        } else {
            ("memory.oom_control", &self.dirs.iter().find(|(name, _)| *name == "memory")?.1)
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        text.lines().find_map(|line| line.strip_prefix("oom_kill ")).and_then(|count| count.trim().parse().ok())
    }

    /// Removes the cgroup once the agent stopped on purpose. A process of the agent that
    /// left its process group (`setsid`) was not reached by the stop's signals, but is
    /// still in the cgroup: it is killed, since the agent is meant to be gone.
    pub fn remove(&self) {
        for (_, dir) in &self.dirs {
            for pid in procs(dir) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    tracing::warn!(pid = pid.as_raw_nonzero().get(), path = %dir.display(), "killing a process left in a stopped agent's cgroup");
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        for (_, dir) in &self.dirs {
            if let Err(error) = remove_dir(dir) {
                tracing::warn!(path = %dir.display(), %error, "could not remove an agent's cgroup");
            }
        }
    }

    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs.iter().find(|(name, _)| self.v2 || *name == controller).map(|(_, dir)| dir.as_path())
    }

    /// Writes `limits`; a key left out is written as "no limit", so removing one from
    /// hale.toml takes effect at the next start.
    fn apply(&self, limits: &CgroupLimits) -> io::Result<()> {
        let memory = self.dir_of("memory").expect("memory is always one of the controllers");
        if self.v2 {
            let value = limits.memory_bytes.map_or("max".to_string(), |bytes| bytes.to_string());
            write_file(&memory.join("memory.max"), &value)?;
            // No swap for a limited agent, or the limit is only a hint; absent without
            // swap accounting.
            let swap = if limits.memory_bytes.is_some() { "0" } else { "max" };
            write_optional(&memory.join("memory.swap.max"), swap)?;
        } else {
            let value = limits.memory_bytes.map_or("-1".to_string(), |bytes| bytes.to_string());
            // memsw must stay at or above the memory limit: lift it first, set it last.
            write_optional(&memory.join("memory.memsw.limit_in_bytes"), "-1")?;
            write_file(&memory.join("memory.limit_in_bytes"), &value)?;
            write_optional(&memory.join("memory.memsw.limit_in_bytes"), &value)?;
        }
        match (self.dir_of("pids"), limits.pids_max) {
            (Some(dir), pids) => write_file(&dir.join("pids.max"), &pids.map_or("max".into(), |n| n.to_string()))?,
            (None, Some(_)) => return Err(missing("pids")),
            (None, None) => {}
        }
        let quota = limits.cpu_quota_percent.map(|percent| u64::from(percent) * CPU_PERIOD_US / 100);
        match (self.dir_of("cpu"), quota) {
            (Some(dir), quota) if self.v2 => {
                let quota = quota.map_or("max".into(), |quota| quota.to_string());
                write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            (Some(dir), quota) => {
                write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(&dir.join("cpu.cfs_quota_us"), &quota.map_or("-1".into(), |quota| quota.to_string()))?;
            }
            (None, Some(_)) => return Err(missing("cpu")),
            (None, None) => {}
        }
        Ok(())
    }
}

fn missing(controller: &str) -> io::Error {
    io::Error::other(format!(
        "the {controller} controller is not available to hale on this host; remove the limit or mount it"
    ))
}

/// cgroup v2: hale's own cgroup must have the controllers and be writable (delegated).
fn try_v2(own: &str, mounts: &str, base_name: &str) -> Result<Cgroups, String> {
    let Some(relative) = own.lines().find_map(|line| line.strip_prefix("0::")) else {
        return Err("no cgroup v2 hierarchy".into());
    };
    let Some(mount) = mount_point(mounts, |fs_type, _| fs_type == "cgroup2") else {
        return Err("cgroup v2 is not mounted".into());
    };
    let mut own_dir = mount.join(relative.trim_start_matches('/'));
    // A hale restarted in the same service finds itself in the leaf an earlier one made.
    if own_dir.file_name().is_some_and(|name| name == "supervisor") {
        own_dir.pop();
    }
    let available = std::fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> =
        CONTROLLERS.iter().copied().filter(|name| !available.split_whitespace().any(|have| have == *name)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 at {} lacks {} (not delegated to hale?)",
            own_dir.display(),
            missing.join(", ")
        ));
    }
    let enable = "+memory +pids +cpu";
    let result = (|| -> io::Result<PathBuf> {
        let leaf = own_dir.join("supervisor");
        create_dir(&leaf)?;
        write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write_file(&own_dir.join("cgroup.subtree_control"), enable)?;
        let base = own_dir.join(base_name);
        create_dir(&base)?;
        write_file(&base.join("cgroup.subtree_control"), enable)?;
        Ok(base)
    })();
    result
        .map(|base| Cgroups::V2 { base })
        .map_err(|error| format!("cgroup v2 at {} is not delegated to hale: {error}", own_dir.display()))
}

/// cgroup v1: a `memory` hierarchy (and `pids`, `cpu` where mounted) hale can write to.
fn try_v1(own: &str, mounts: &str, base_name: &str) -> Result<Cgroups, String> {
    let mut bases = Vec::new();
    for controller in CONTROLLERS {
        let relative = own.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
            names.split(',').any(|name| name == controller).then_some(path)
        });
        let mount = mount_point(mounts, |fs_type, options| {
            fs_type == "cgroup" && options.split(',').any(|option| option == controller)
        });
        let (Some(relative), Some(mount)) = (relative, mount) else {
            if controller == "memory" {
                return Err("no cgroup v1 memory hierarchy is mounted".into());
            }
            continue;
        };
        let base = mount.join(relative.trim_start_matches('/')).join(base_name);
        if let Err(error) = create_dir(&base) {
            if controller == "memory" {
                return Err(format!("cannot make {} (cgroup v1): {error}", base.display()));
            }
            tracing::warn!(controller, path = %base.display(), %error, "cannot use this cgroup v1 controller");
            continue;
        }
        if controller == "memory" {
            // Charges of the agent count in hale's own memory cgroup too, as v2 always does.
            let _ = write_file(&base.join("memory.use_hierarchy"), "1");
        }
        bases.push((controller, base));
    }
    Ok(Cgroups::V1 { bases })
}

/// The mount point of the first mount whose file system type and super options match.
/// Only mounts of the hierarchy's root count: a bind mount of a sub-cgroup would shift
/// every path read from `/proc/self/cgroup`.
fn mount_point(mountinfo: &str, matches: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split_whitespace();
        let (root, point) = (fields.nth(3)?, fields.next()?);
        let mut after = after.split_whitespace();
        let (fs_type, _source, options) = (after.next()?, after.next()?, after.next().unwrap_or(""));
        (root == "/" && matches(fs_type, options)).then(|| PathBuf::from(unescape(point)))
    })
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(text: &str) -> String {
    text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

fn agent_dirs(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(base) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("agent-"))
        .map(|entry| entry.path())
        .collect()
}

/// The pids in a cgroup.
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn create_dir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            Err(io::Error::new(error.kind(), format!("cannot make {}: {error}", dir.display())))
        }
        _ => Ok(()),
    }
}

/// Removes a cgroup directory. A process that just exited may still be leaving it for a
/// moment (the kernel answers EBUSY), so it is tried again for up to a second.
fn remove_dir(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Writes one value to a cgroup file (one `write(2)`, as the kernel wants).
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
        .map_err(|error| io::Error::new(error.kind(), format!("cannot write {value:?} to {}: {error}", path.display())))
}

/// As [`write_file`], for a file that exists only with some kernel options (swap).
fn write_optional(path: &Path, value: &str) -> io::Result<()> {
    match write_file(path, value) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// FNV-1a, 64 bits: a stable short name for a data directory (std's hasher may change
/// between releases, and the name must stay the same across hale upgrades).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
