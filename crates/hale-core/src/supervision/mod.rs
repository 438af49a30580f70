//! Managed agents: how each is supervised (a durable spec from hale.toml), what the log
//! says about its process, and the restart rules (policy, backoff, intensity, groups).
//!
//! Everything here is folded from events. The decisions that produce those events live in
//! `decide`; the volatile heartbeat side lives in `liveness`.

use crate::Timestamp;
use crate::names::{AgentName, RoleName};
use crate::policy::{Backoff, Intensity, RestartWindow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod decide;
pub(crate) use decide::{decide, down};

/// When a managed agent is restarted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever way it stopped.
    Always,
    /// Unless it exited with status 0.
    #[default]
    OnFailure,
    Never,
}

/// How closely an agent is watched: sets its expected heartbeat interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criticality {
    Critical,
    #[default]
    Normal,
    Background,
}

impl Criticality {
    /// The heartbeat interval an agent of this criticality is expected to keep.
    pub fn heartbeat_interval_ms(self) -> u64 {
        match self {
            Criticality::Critical => 500,
            Criticality::Normal => 1_000,
            Criticality::Background => 5_000,
        }
    }
}

/// What happens to the siblings when one agent of a group fails (OTP's strategies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Only the failed agent is restarted.
    #[default]
    OneForOne,
    /// Every agent of the group is restarted.
    OneForAll,
    /// The failed agent and those declared after it are restarted.
    RestForOne,
}

/// A managed agent's place in a supervision group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    pub name: String,
    pub strategy: Strategy,
    /// Declaration order within the group, for `rest-for-one`.
    pub position: u32,
}

/// When a heartbeating agent counts as stalled: alive but making no progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StallPolicy {
    /// Stalled after this many heartbeats in a row that show no work, while holding a
    /// task (`None`: off).
    pub beats: Option<u32>,
    /// Stalled after this long without a sign of work (a step, a checkpoint, changed
    /// progress) while holding a task (`None`: off).
    pub quiet_ms: Option<u64>,
}

/// Where on a cluster a managed agent may run (a single node ignores it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Placement {
    /// Only on these nodes (`[cluster] name`); any node if none is named.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<crate::names::NodeName>,
    /// Only on nodes that carry every one of these labels (`[cluster] labels`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// For a role pool: its instances go to the nodes with the fewest instances of the
    /// pool first, so they spread over the nodes while there are enough.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub spread: bool,
}

impl Placement {
    /// Anywhere, no spread: what an agent declared without a placement gets.
    pub fn is_unset(&self) -> bool {
        self.nodes.is_empty() && self.node_labels.is_empty() && !self.spread
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.nodes.is_empty() {
            let nodes: Vec<&str> = self.nodes.iter().map(|node| node.as_str()).collect();
            parts.push(format!("nodes = [{}]", nodes.join(", ")));
        }
        if !self.node_labels.is_empty() {
            let labels: Vec<String> =
                self.node_labels.iter().map(|(key, value)| format!("{key} = {value:?}")).collect();
            parts.push(format!("node_labels = {{ {} }}", labels.join(", ")));
        }
        if self.spread {
            parts.push("spread".to_string());
        }
        if parts.is_empty() {
            parts.push("any node".to_string());
        }
        f.write_str(&parts.join("; "))
    }
}

/// How hale supervises one managed agent: the part of its hale.toml entry that decisions
/// depend on. It is logged (in `AgentDeclared`) so that replay decides exactly as the
/// live run did; how to start the process (command, env, limits) stays in the shell.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Supervision {
    pub restart: RestartPolicy,
    pub criticality: Criticality,
    pub backoff: Backoff,
    pub intensity: Intensity,
    pub group: Option<GroupMembership>,
    #[serde(default)]
    pub stall: StallPolicy,
    /// What the agent may spend per period (tokens, cost units).
    #[serde(default)]
    pub budget: Option<crate::budget::AgentBudget>,
    /// Resource and health-probe thresholds (see `measure`). Left out of the log when none
    /// is set, so a spec without them reads and writes as before.
    #[serde(default, skip_serializing_if = "crate::measure::Thresholds::is_unset")]
    pub thresholds: crate::measure::Thresholds,
    /// Where on a cluster it may run. Left out of the log when unset, as thresholds are.
    #[serde(default, skip_serializing_if = "Placement::is_unset")]
    pub placement: Placement,
}

/// A process identity that survives pid reuse: the pid and its start time in clock ticks
/// since boot (`/proc/PID/stat`, field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub start_ticks: u64,
}

/// Why an incarnation was declared down. Every detection is logged with one of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The managed process exited: `code` if it exited, `signal` if a signal killed it.
    Exited { code: Option<i32>, signal: Option<i32> },
    /// The managed process was gone when hale looked (after a restart of hale, or an
    /// adopted process whose exit status hale cannot read).
    Vanished,
    /// The phi-accrual detector crossed its threshold: no heartbeat for `silent_ms`.
    HeartbeatsLost { silent_ms: u64, phi: f64 },
    /// The agent did not reconnect within the grace period after hale restarted.
    NotReconnected { grace_ms: u64 },
    /// Heartbeats arrive but progress has not changed for `beats` beats.
    StalledProgress { beats: u32 },
    /// Heartbeats arrive, a task is held, but no sign of work for `quiet_ms`.
    StalledCheckpoints { quiet_ms: u64 },
    /// Restarted because a sibling in its group failed (`one-for-all`, `rest-for-one`).
    SiblingFailed { sibling: AgentName },
    /// The operator asked for a restart (`hale restart`).
    Operator,
    /// Stopped on purpose (`hale stop`, or hale itself stopping): not restarted.
    Stopped,
    /// The process could not be started at all.
    SpawnFailed { error: String },
    /// The process (with its process group) used more than its limit: `resource` is
    /// `memory` (resident bytes) or `cpu` (percent of one core over the window).
    ResourceExceeded { resource: String, value: u64, limit: u64 },
    /// The agent's health endpoint failed `failures` probes in a row; `last` says how.
    HealthProbe { failures: u32, last: String },
    /// The kernel's OOM killer killed the process: its cgroup reached its memory limit of
    /// `limit_bytes` (`memory_mb`). Added after the others, so older logs read as before.
    OutOfMemory { limit_bytes: u64 },
    /// The node it ran on was lost: the leader of the cluster had not heard from it for
    /// `silent_ms`. That node stops its agents by itself when its lease runs out.
    NodeLost { node: String, silent_ms: u64 },
}

impl Cause {
    /// An exit with status 0: `on-failure` does not restart after it.
    pub fn is_clean_exit(&self) -> bool {
        matches!(self, Cause::Exited { code: Some(0), .. })
    }

    /// The detector that saw it, as shown in timelines and metrics.
    pub fn detector(&self) -> &'static str {
        match self {
            Cause::Exited { .. } | Cause::Vanished | Cause::SpawnFailed { .. } => "process_exit",
            Cause::HeartbeatsLost { .. } | Cause::NotReconnected { .. } => "heartbeat",
            Cause::StalledProgress { .. } | Cause::StalledCheckpoints { .. } => "stall",
            Cause::SiblingFailed { .. } => "group",
            Cause::Operator | Cause::Stopped => "operator",
            Cause::ResourceExceeded { .. } | Cause::OutOfMemory { .. } => "resource",
            Cause::HealthProbe { .. } => "health_probe",
            Cause::NodeLost { .. } => "node",
        }
    }

    /// True for causes where the process may still be running and must be stopped.
    pub fn process_may_live(&self) -> bool {
        !matches!(self, Cause::Exited { .. } | Cause::Vanished | Cause::SpawnFailed { .. } | Cause::OutOfMemory { .. })
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Exited { code: Some(code), .. } => write!(f, "exited with status {code}"),
            Cause::Exited { signal: Some(signal), .. } => write!(f, "killed by signal {signal}"),
            Cause::Exited { .. } => write!(f, "exited"),
            Cause::Vanished => write!(f, "process gone"),
            Cause::HeartbeatsLost { silent_ms, phi } => write!(f, "no heartbeat for {silent_ms} ms (phi {phi:.1})"),
            Cause::NotReconnected { grace_ms } => write!(f, "did not reconnect within {grace_ms} ms of a hale restart"),
            Cause::StalledProgress { beats } => {
                write!(f, "stalled: no sign of work for {beats} heartbeats while holding a task")
            }
            Cause::StalledCheckpoints { quiet_ms } => {
                write!(f, "stalled: no sign of work for {quiet_ms} ms while holding a task")
            }
            Cause::SiblingFailed { sibling } => write!(f, "restarted with its group: {sibling} failed"),
            Cause::Operator => write!(f, "restart requested by the operator"),
            Cause::Stopped => write!(f, "stopped on purpose"),
            Cause::SpawnFailed { error } => write!(f, "could not start: {error}"),
            Cause::ResourceExceeded { resource, value, limit } if resource == "memory" => {
                write!(
                    f,
                    "resident memory {} MiB over its limit of {} MiB",
                    value / (1024 * 1024),
                    limit / (1024 * 1024)
                )
            }
            Cause::ResourceExceeded { resource, value, limit } => {
                write!(f, "{resource} {value}% over its limit of {limit}%")
            }
            Cause::HealthProbe { failures, last } => write!(f, "health probe failed {failures} times in a row: {last}"),
            Cause::OutOfMemory { limit_bytes } => {
                write!(f, "killed by the kernel: out of memory at its limit of {} MiB", limit_bytes / (1024 * 1024))
            }
            Cause::NodeLost { node, silent_ms } => {
                write!(f, "its node {node} was lost (not heard from for {silent_ms} ms)")
            }
        }
    }
}

/// Where a managed agent is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ManagedStatus {
    /// Declared, never started.
    Declared,
    /// An incarnation was started; its process is being spawned.
    Starting,
    /// The current incarnation's process is running.
    Running,
    /// Waiting out the backoff before restart number `attempt` (within the window).
    Backoff { due: Timestamp, attempt: u32 },
    /// Too many restarts within the intensity window: not restarted until `hale restart`.
    Failed { restarts: u32, window_ms: u64 },
    /// Down and not restarted: by its policy (`never`, or a clean exit under
    /// `on-failure`) or on purpose. The next `hale up` starts it again.
    Stopped,
    /// On a cluster: to be started, but no node that is up may run it, for `reason`. It
    /// starts as soon as one comes up.
    Pending { reason: String },
}

impl ManagedStatus {
    /// The short name shown by `hale agents`.
    pub fn name(&self) -> &'static str {
        match self {
            ManagedStatus::Declared => "declared",
            ManagedStatus::Starting => "starting",
            ManagedStatus::Running => "running",
            ManagedStatus::Backoff { .. } => "backoff",
            ManagedStatus::Failed { .. } => "failed",
            ManagedStatus::Stopped => "stopped",
            ManagedStatus::Pending { .. } => "pending",
        }
    }
}

/// Everything the log says about the supervision of one managed agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Managed {
    pub spec: Supervision,
    pub status: ManagedStatus,
    /// The process of the current incarnation, once spawned.
    pub process: Option<ProcessRef>,
    /// Restarts within the intensity window.
    pub window: RestartWindow,
    /// Restarts over the agent's whole life.
    pub restarts: u64,
    /// On a cluster: the node its current (or last) incarnation was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<crate::names::NodeName>,
}

impl Managed {
    pub(crate) fn new(spec: Supervision) -> Managed {
        Managed {
            spec,
            status: ManagedStatus::Declared,
            process: None,
            window: RestartWindow::default(),
            restarts: 0,
            node: None,
        }
    }

    /// Whether a process of the current incarnation is (believed to be) alive.
    pub fn is_live(&self) -> bool {
        matches!(self.status, ManagedStatus::Starting | ManagedStatus::Running)
    }
}

/// The decision about one down agent: restart now, later, or not at all.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RestartPlan {
    /// The policy says no restart.
    None,
    /// Restart number `attempt` within the window, due at `due` (now for the first).
    Restart { attempt: u32, due: Timestamp },
    /// The intensity is exceeded.
    GiveUp { restarts: u32, window_ms: u64 },
}

/// Applies restart policy, intensity and backoff. `seed` makes the jitter a pure function
/// of the agent, its incarnation and the attempt, so replay and tests see the same delays.
pub(crate) fn plan_restart(
    managed: &Managed,
    agent: &AgentName,
    incarnation: u64,
    cause: &Cause,
    now: Timestamp,
    seed: u64,
) -> RestartPlan {
    if *cause == Cause::Stopped {
        return RestartPlan::None;
    }
    let restart = match managed.spec.restart {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !cause.is_clean_exit(),
        RestartPolicy::Never => false,
    };
    if !restart {
        return RestartPlan::None;
    }
    let mut window = managed.window.clone();
    let intensity = &managed.spec.intensity;
    if !window.admit(now, intensity) {
        return RestartPlan::GiveUp { restarts: intensity.restarts_max, window_ms: intensity.window_ms };
    }
    let attempt = window.len() as u32;
    let mut rng = crate::Rng::new(seed ^ fnv1a(agent.as_str()) ^ incarnation.rotate_left(32) ^ u64::from(attempt));
    let delay = managed.spec.backoff.delay_ms(attempt, &mut rng);
    RestartPlan::Restart { attempt, due: Timestamp(now.0.saturating_add(delay)) }
}

/// Applies a `RestartScheduled` at `at` to the window, as `plan_restart` foresaw.
pub(crate) fn admit(managed: &mut Managed, at: Timestamp, intensity: &Intensity) {
    managed.window.admit(at, intensity);
    managed.restarts += 1;
}

/// The siblings a failure of `failed` takes down with it, by its group's strategy.
pub(crate) fn siblings<'a>(
    failed: &GroupMembership,
    failed_agent: &AgentName,
    agents: impl Iterator<Item = (&'a AgentName, &'a Managed)>,
) -> Vec<AgentName> {
    if failed.strategy == Strategy::OneForOne {
        return Vec::new();
    }
    agents
        .filter(|(name, _)| *name != failed_agent)
        .filter(|(_, managed)| managed.is_live())
        .filter(|(_, managed)| {
            managed.spec.group.as_ref().is_some_and(|group| {
                group.name == failed.name
                    && (failed.strategy == Strategy::OneForAll || group.position > failed.position)
            })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// A 64-bit FNV-1a hash: stable across versions and platforms, unlike std's hashers.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// A role name for a managed agent declared without one: its own name.
pub fn default_role(agent: &AgentName) -> RoleName {
    RoleName::new(agent.as_str()).expect("an agent name is a valid role name")
}

/// A pool of interchangeable managed agents (`[[role]]`): hale keeps at least `min` of
/// them healthy by starting new instances, named `ROLE-1`, `ROLE-2`…, and never starts
/// more than `max` in all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolePool {
    pub min: u32,
    pub max: u32,
    pub supervision: Supervision,
}

/// The name of instance `n` of a pool.
pub fn instance_name(role: &RoleName, n: u32) -> AgentName {
    AgentName::new(format!("{role}-{n}")).expect("a role name plus a number is a valid agent name")
}
