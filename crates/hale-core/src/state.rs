use crate::Timestamp;
use crate::budget::{Budgets, Reservation};
use crate::event::Event;
use crate::health::{Breaker, HealthRecord, Quarantine};
use crate::limits::Limits;
use crate::liveness::Progress;
use crate::merge::merge_patch;
use crate::names::{AgentName, HookName, PointName, RoleName};
use crate::rejection::Rejection;
use crate::supervision::{self, Cause, Managed, ManagedStatus, RolePool};
use crate::tasks::{Mode, Step, StepState, TaskStatus, Tasks};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// The fold of the log: every agent hale knows of.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    agents: BTreeMap<AgentName, AgentRecord>,
    /// Pools declared in hale.toml.
    #[serde(default)]
    roles: BTreeMap<RoleName, RolePool>,
    #[serde(default)]
    tasks: Tasks,
    #[serde(default)]
    budgets: Budgets,
    /// The system mode, as last logged.
    #[serde(default)]
    mode: Mode,
    /// Agent credentials (by name: an agent may get tokens before its first hello).
    #[serde(default)]
    credentials: BTreeMap<AgentName, crate::credentials::Credential>,
    /// Mailboxes and conversations.
    #[serde(default)]
    mail: crate::mail::Mail,
    /// For each hook, the newest event it has an outcome for (delivered or given up on).
    /// A hook works through its events in log order, so after a restart the events of its
    /// kinds past this mark are the ones it still owes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    hooks: BTreeMap<HookName, u64>,
}

/// Everything the log says about one agent.
///
/// The version history is the current state plus, for each earlier retained version, the
/// undo patch that turns its successor back into it, newest last. A checkpoint moves its
/// patch's values into the current state and the values they displace into the undo
/// patch, so it copies nothing; reading an older version copies the current state once
/// and applies undo patches backwards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: AgentName,
    pub role: RoleName,
    pub labels: BTreeMap<String, String>,
    /// The current run; 0 until the first hello that starts one.
    pub incarnation: u64,
    /// When the agent was first registered.
    pub registered_at: Timestamp,
    /// When the last event about this agent was logged.
    pub updated_at: Timestamp,
    /// The current version and state.
    version: u64,
    current: Arc<Value>,
    /// `(v, undo)`: applying `undo` to the state at `v` gives the state at the retained
    /// version before `v`. Oldest first; versions ascend. Shared, so cloning the state for
    /// a snapshot copies pointers, not patches.
    undo: VecDeque<(u64, Arc<Undo>)>,
    /// The retained version before the oldest undo entry (the oldest retained version).
    oldest: u64,
    /// Named versions, kept whatever the history bound drops.
    pub recovery_points: BTreeMap<PointName, RecoveryPoint>,
    /// Set when hale.toml declares the agent: hale runs its process.
    #[serde(default)]
    pub managed: Option<Managed>,
    /// The last incarnation declared down, and why. It concerns the current run only if
    /// its incarnation is the current one.
    #[serde(default)]
    pub down: Option<Down>,
    /// The last progress logged, and by which incarnation. An incarnation that has
    /// reported progress is watched by the heartbeat detector.
    #[serde(default)]
    pub progress: Option<ProgressRecord>,
    /// Breaker and quarantine.
    #[serde(default)]
    pub health: HealthRecord,
}

/// Why and when an incarnation was declared down.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Down {
    pub incarnation: u64,
    pub cause: Cause,
    pub at: Timestamp,
}

/// Progress as last logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub incarnation: u64,
    pub progress: Progress,
    pub at: Timestamp,
}

/// How to go back one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Undo {
    /// A merge patch: the members a checkpoint changed, with their old values (`null`
    /// for members that were absent; states never hold `null` members, so this is
    /// unambiguous).
    Patch(Value),
    /// The whole state before a rollback replaced it.
    Replace(Arc<Value>),
}

impl Undo {
    fn apply_to(&self, state: &mut Value) {
        match self {
            Undo::Patch(patch) => merge_patch(state, patch),
            Undo::Replace(previous) => *state = Value::clone(previous),
        }
    }
}

/// A named version of an agent's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub version: u64,
    pub marked_at: Timestamp,
    pub state: Arc<Value>,
}

impl State {
    /// The agent named `name`, if it has registered.
    pub fn agent(&self, name: &str) -> Option<&AgentRecord> {
        self.agents.get(name)
    }

    /// Every agent, in name order.
    pub fn agents(&self) -> impl ExactSizeIterator<Item = &AgentRecord> {
        self.agents.values()
    }

    /// Every task.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Reservations and spending.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// The system mode, as last logged.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The seq of the newest event `hook` has an outcome for, if it ever had one.
    pub fn hook_mark(&self, hook: &HookName) -> Option<u64> {
        self.hooks.get(hook).copied()
    }

    /// Mailboxes and conversations.
    pub fn mail(&self) -> &crate::mail::Mail {
        &self.mail
    }

    /// `agent`'s credentials, if any were issued or revoked.
    pub fn credential(&self, agent: &AgentName) -> Option<&crate::credentials::Credential> {
        self.credentials.get(agent)
    }

    /// Every agent's credentials.
    pub fn credentials(&self) -> impl Iterator<Item = (&AgentName, &crate::credentials::Credential)> {
        self.credentials.iter()
    }

    /// Every role pool, in name order.
    pub fn roles(&self) -> impl Iterator<Item = (&RoleName, &RolePool)> {
        self.roles.iter()
    }

    /// Every managed agent, in name order.
    pub(crate) fn managed(&self) -> impl Iterator<Item = (&AgentName, &Managed)> {
        self.agents.iter().filter_map(|(name, record)| record.managed.as_ref().map(|managed| (name, managed)))
    }

    /// A run of `agent` is over (all of its runs for `None`): its leases go back to the
    /// queue and its reservations are dropped.
    fn release_run(&mut self, agent: &AgentName, incarnation: Option<u64>, why: &str, at: Timestamp) {
        self.tasks.release_leases(agent, incarnation, why, at);
        for dropped in self.budgets.drop_run(agent, incarnation) {
            if let Some(task) = dropped.task {
                self.tasks.with_task(task, at, |found| found.reserved = found.reserved.minus(dropped.spend));
            }
        }
    }

    pub(crate) fn apply(&mut self, limits: &Limits, at: Timestamp, event: Event) {
        match event {
            Event::AgentRegistered { agent, role, labels } => {
                let record = self.register(&agent, at);
                record.role = role;
                record.labels = labels;
                return;
            }
            Event::RoleDeclared { role, min, max, supervision } => {
                self.roles.insert(role, RolePool { min, max, supervision });
                return;
            }
            Event::TaskSubmitted { task, spec, parent } => return self.tasks.submit(task, spec, parent, at),
            Event::TaskShadowed { task, children } => {
                return self.tasks.set_status(task, TaskStatus::Shadowed { children }, at);
            }
            Event::TaskAssigned { task, agent, incarnation, attempt, rung } => {
                return self.tasks.assign(task, agent, incarnation, attempt, rung, at);
            }
            Event::StepIntended { task, attempt, name } => {
                let rung = self.tasks.get(task).map_or(0, |found| found.rung);
                return self.tasks.intend_step(task, name, attempt, rung, at);
            }
            Event::StepCommitted { task, attempt, name, result, llm, compensation } => {
                let rung = self.tasks.get(task).map_or(0, |found| found.rung);
                let step = Step { name, state: StepState::Done, result, attempt, at, rung, llm, compensation };
                return self.tasks.commit_step(task, step);
            }
            Event::TaskCompleted { task, result, level } => {
                return self.tasks.set_status(task, TaskStatus::Completed { result, level }, at);
            }
            Event::TaskRetried { task, reason, not_before } => return self.tasks.retry(task, reason, not_before, at),
            Event::TaskFailed { task, reason } => {
                return self.tasks.set_status(task, TaskStatus::Failed { reason }, at);
            }
            Event::TaskCancelled { task } => return self.tasks.set_status(task, TaskStatus::Cancelled, at),
            Event::TaskCompensating { task, outcome, step, child } => {
                return self.tasks.set_status(task, TaskStatus::Compensating { outcome, step, child }, at);
            }
            Event::CompensationFailed { task, step, reason } => {
                return self.tasks.with_task(task, at, |found| {
                    found.compensation_errors.push(format!("{step}: {reason}"));
                });
            }
            Event::TaskArbitrated { task, agreed, dissent } => {
                return self.tasks.with_task(task, at, |found| {
                    found.arbitration = Some(crate::tasks::Arbitration { agreed, dissent });
                });
            }
            Event::ModeChanged { mode, .. } => {
                self.mode = mode;
                return;
            }
            // The audit trail of hooks is the log itself; the state keeps each hook's mark.
            Event::HookDelivered { hook, seq, .. } | Event::HookFailed { hook, seq, .. } => {
                let mark = self.hooks.entry(hook).or_default();
                *mark = (*mark).max(seq);
                return;
            }
            Event::TokensIssued { .. } | Event::TokensRefreshed { .. } | Event::TokensRevoked { .. } => {
                return crate::credentials::apply(&mut self.credentials, event);
            }
            Event::MessageSent { .. } | Event::MessageAcked { .. } | Event::ConversationEnded { .. } => {
                return crate::mail::apply(&mut self.mail, at, event);
            }
            Event::BudgetReserved { reservation, agent, incarnation, task, spend, period } => {
                if let Some(task) = task {
                    self.tasks.with_task(task, at, |found| found.reserved = found.reserved.plus(spend));
                }
                self.budgets.reserve(reservation, Reservation { agent, incarnation, task, spend }, period);
                return;
            }
            Event::SpendReported { agent, task, reservation, spend, period, .. } => {
                if let Some(settled) = self.budgets.report(&agent, reservation, spend, period)
                    && let Some(held) = settled.task
                {
                    self.tasks.with_task(held, at, |found| found.reserved = found.reserved.minus(settled.spend));
                }
                if let Some(task) = task {
                    self.tasks.with_task(task, at, |found| found.spent = found.spent.plus(spend));
                }
                return;
            }
            Event::BudgetBreached { ref agent, incarnation, .. } => {
                self.release_run(agent, Some(incarnation), &format!("agent {agent} went over budget"), at);
                return;
            }
            // A lease belongs to an incarnation: it ends with it.
            Event::AgentDown { ref agent, incarnation, ref cause } => {
                self.release_run(agent, Some(incarnation), &format!("agent {agent} down: {cause}"), at);
            }
            Event::IncarnationStarted { ref agent, incarnation } if incarnation > 1 => {
                self.release_run(agent, Some(incarnation - 1), &format!("agent {agent} started a new run"), at);
            }
            Event::Quarantined { ref agent, .. } => {
                self.release_run(agent, None, &format!("agent {agent} quarantined"), at);
            }
            Event::AgentDeclared { agent, role, labels, supervision } => {
                let record = self.register(&agent, at);
                record.role = role;
                record.labels = labels;
                match &mut record.managed {
                    Some(managed) => managed.spec = supervision,
                    None => record.managed = Some(Managed::new(supervision)),
                }
                return;
            }
            _ => {}
        }
        // `decide` only emits events about registered agents, so a miss here means the
        // registration was set aside by `--repair`. `apply` cannot fail: it skips the event.
        let Some(record) = event.agent().and_then(|agent| self.agents.get_mut(agent)) else {
            return;
        };
        record.updated_at = at;
        match event {
            Event::AgentRegistered { .. }
            | Event::AgentDeclared { .. }
            | Event::RoleDeclared { .. }
            | Event::TaskSubmitted { .. }
            | Event::TaskShadowed { .. }
            | Event::TaskAssigned { .. }
            | Event::StepIntended { .. }
            | Event::StepCommitted { .. }
            | Event::TaskCompleted { .. }
            | Event::TaskRetried { .. }
            | Event::TaskFailed { .. }
            | Event::TaskCancelled { .. }
            | Event::TaskCompensating { .. }
            | Event::CompensationFailed { .. }
            | Event::TaskArbitrated { .. }
            | Event::ModeChanged { .. }
            | Event::BudgetReserved { .. }
            | Event::SpendReported { .. }
            | Event::BudgetBreached { .. }
            | Event::TokensIssued { .. }
            | Event::TokensRefreshed { .. }
            | Event::TokensRevoked { .. }
            | Event::MessageSent { .. }
            | Event::MessageAcked { .. }
            | Event::ConversationEnded { .. }
            | Event::HookDelivered { .. }
            | Event::HookFailed { .. } => unreachable!("handled above"),
            Event::IncarnationStarted { incarnation, .. } => {
                record.incarnation = incarnation;
                if let Some(managed) = &mut record.managed {
                    managed.status = ManagedStatus::Starting;
                    managed.process = None;
                }
            }
            Event::ProcessStarted { incarnation, process, .. } => {
                if let Some(managed) = &mut record.managed
                    && incarnation == record.incarnation
                {
                    managed.process = Some(process);
                    managed.status = ManagedStatus::Running;
                }
            }
            Event::AgentDown { incarnation, cause, .. } => {
                if let Some(managed) = &mut record.managed {
                    managed.process = None;
                    managed.status = ManagedStatus::Stopped;
                }
                record.down = Some(Down { incarnation, cause, at });
            }
            Event::RestartScheduled { attempt, due, .. } => {
                if let Some(managed) = &mut record.managed {
                    let intensity = managed.spec.intensity.clone();
                    supervision::admit(managed, at, &intensity);
                    managed.status = ManagedStatus::Backoff { due, attempt };
                }
            }
            Event::AgentFailed { restarts, window_ms, .. } => {
                if let Some(managed) = &mut record.managed {
                    managed.status = ManagedStatus::Failed { restarts, window_ms };
                }
            }
            Event::RestartRequested { .. } => {
                if let Some(managed) = &mut record.managed {
                    managed.window.clear();
                    managed.restarts += 1;
                }
            }
            Event::ProgressReported { incarnation, progress, .. } => {
                record.progress = Some(ProgressRecord { incarnation, progress, at });
            }
            Event::BreakerOpened { until, .. } => {
                record.health.breaker = Breaker::Open { until };
                record.health.breaker_opened += 1;
            }
            Event::BreakerHalfOpened { .. } => record.health.breaker = Breaker::HalfOpen { since: at },
            Event::BreakerClosed { .. } => record.health.breaker = Breaker::Closed,
            Event::ViolationReported { .. } => record.health.record_violation(at),
            Event::Quarantined { by, reason, .. } => record.health.quarantine = Some(Quarantine { reason, by, at }),
            Event::Released { .. } => {
                record.health.quarantine = None;
                record.health.violations.clear();
            }
            other => record.apply_data(limits, at, other),
        }
    }

    fn register(&mut self, agent: &AgentName, at: Timestamp) -> &mut AgentRecord {
        let record = self.agents.entry(agent.clone()).or_insert_with(|| AgentRecord {
            name: agent.clone(),
            role: RoleName::new(agent.as_str()).expect("an agent name is a valid role name"),
            labels: BTreeMap::new(),
            incarnation: 0,
            registered_at: at,
            updated_at: at,
            version: 0,
            current: Arc::new(Value::Object(Map::new())),
            undo: VecDeque::new(),
            oldest: 0,
            recovery_points: BTreeMap::new(),
            managed: None,
            down: None,
            progress: None,
            health: HealthRecord::default(),
        });
        record.updated_at = at;
        record
    }
}

impl AgentRecord {
    /// Folds an event about the agent's state (checkpoint, recovery point, rollback).
    fn apply_data(&mut self, limits: &Limits, at: Timestamp, event: Event) {
        let record = self;
        match event {
            Event::Checkpointed { version, patch, .. } => {
                let undo = merge_patch_undo(Arc::make_mut(&mut record.current), patch);
                record.push_undo(limits, version, Undo::Patch(undo));
            }
            Event::RecoveryPointMarked { name, version, .. } => {
                // Only missing after `--repair` set the version's event aside.
                let Some(state) = record.state_at(version) else {
                    return;
                };
                let point = RecoveryPoint { version, marked_at: at, state };
                record.recovery_points.insert(name, point);
            }
            Event::RolledBack { version, state, .. } => {
                let previous = std::mem::replace(&mut record.current, Arc::new(state));
                record.push_undo(limits, version, Undo::Replace(previous));
            }
            _ => unreachable!("State::apply handles every other event"),
        }
    }

    /// The current version number; 0 before the first checkpoint.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The current state.
    pub fn state(&self) -> &Arc<Value> {
        &self.current
    }

    /// The oldest version still in the history.
    pub fn oldest_retained(&self) -> u64 {
        self.oldest
    }

    /// The state at `version`, if the history or a recovery point still holds it.
    pub fn state_at(&self, version: u64) -> Option<Arc<Value>> {
        if version == self.version {
            return Some(self.current.clone());
        }
        if let Some(point) = self.recovery_points.values().find(|point| point.version == version) {
            return Some(point.state.clone());
        }
        if version < self.oldest || version > self.version {
            return None;
        }
        // Walk back from the current state. Versions ascend (consecutive unless
        // `--repair` set one aside), so `version` is retained if it is the oldest or
        // names an undo entry's predecessor.
        let mut state = Value::clone(&self.current);
        for (index, (_, undo)) in self.undo.iter().enumerate().rev() {
            undo.apply_to(&mut state);
            let reached = if index == 0 { self.oldest } else { self.undo[index - 1].0 };
            if reached == version {
                return Some(Arc::new(state));
            }
            if reached < version {
                return None;
            }
        }
        None
    }

    /// Like [`state_at`](AgentRecord::state_at), with the rejection a client gets when the
    /// version is not retained.
    pub fn retained_state(&self, version: u64) -> Result<Arc<Value>, Rejection> {
        self.state_at(version).ok_or_else(|| Rejection::VersionNotRetained {
            agent: self.name.to_string(),
            version,
            oldest: self.oldest_retained(),
            newest: self.version(),
        })
    }

    /// The retained version numbers, oldest first; the last is the current version.
    pub fn history(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.oldest).chain(self.undo.iter().map(|(version, _)| *version))
    }

    fn push_undo(&mut self, limits: &Limits, version: u64, undo: Undo) {
        self.version = version;
        self.undo.push_back((version, Arc::new(undo)));
        // `history_len` versions are retained: the current one and `history_len - 1` more.
        while self.undo.len() >= limits.history_len.max(1) {
            let (dropped, _) = self.undo.pop_front().expect("not empty");
            self.oldest = dropped;
        }
    }
}

/// Applies `patch` to `target` as [`merge_patch`] does, moving the patch's values in, and
/// returns the merge patch that undoes it, holding the values they displaced.
fn merge_patch_undo(target: &mut Value, patch: Value) -> Value {
    let Value::Object(patch_members) = patch else {
        return std::mem::replace(target, patch);
    };
    if !target.is_object() {
        // Only reached below the top level: the undo of turning a non-object into an
        // object is the non-object itself, which replaces wholesale.
        let previous = std::mem::replace(target, Value::Object(Map::new()));
        merge_patch_undo(target, Value::Object(patch_members));
        return previous;
    }
    let Value::Object(target_members) = target else { unreachable!("checked above") };
    let mut undo = Map::new();
    for (key, value) in patch_members {
        if value.is_null() {
            if let Some(previous) = target_members.remove(&key) {
                undo.insert(key, previous);
            }
            continue;
        }
        match target_members.get_mut(&key) {
            Some(existing) if value.is_object() && existing.is_object() => {
                let inner = merge_patch_undo(existing, value);
                undo.insert(key, inner);
            }
            Some(existing) => {
                let mut replacement = Value::Null;
                merge_patch_undo(&mut replacement, value);
                undo.insert(key, std::mem::replace(existing, replacement));
            }
            None => {
                let mut fresh = Value::Null;
                merge_patch_undo(&mut fresh, value);
                target_members.insert(key.clone(), fresh);
                undo.insert(key, Value::Null);
            }
        }
    }
    Value::Object(undo)
}
