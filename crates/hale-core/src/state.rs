use crate::Timestamp;
use crate::budget::{Budgets, Reservation};
use crate::event::Event;
use crate::health::{Breaker, HealthRecord, Quarantine};
use crate::limits::Limits;
use crate::liveness::Progress;
use crate::merge::merge_patch;
use crate::names::{AgentName, HookName, NodeName, PointName, RoleName};
use crate::nodes::{NodeRecord, NodeStatus};
use crate::rejection::Rejection;
use crate::supervision::{self, Cause, Managed, ManagedStatus, RolePool};
use crate::tasks::{Mode, Step, StepState, TaskStatus, Tasks};
use crate::{credentials, mail::Message};
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
    /// The nodes of a cluster (none on a single node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    nodes: BTreeMap<NodeName, NodeRecord>,
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

    /// The node named `name`, if it ever joined the cluster.
    pub fn node(&self, name: &NodeName) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// Every node of the cluster, in name order (none on a single node).
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeName, &NodeRecord)> {
        self.nodes.iter()
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

    /// Folds one event logged at `at`. Every event has its own arm; an event about an
    /// agent the state does not hold (its registration was set aside by `--repair`) is
    /// skipped, since `apply` cannot fail.
    pub(crate) fn apply(&mut self, limits: &Limits, at: Timestamp, event: Event) {
        match event {
            // Agents and their runs.
            Event::AgentRegistered { agent, role, labels } => {
                let record = self.register(&agent, at);
                record.role = role;
                record.labels = labels;
            }
            Event::AgentDeclared { agent, role, labels, supervision } => {
                let record = self.register(&agent, at);
                record.role = role;
                record.labels = labels;
                match &mut record.managed {
                    Some(managed) => managed.spec = supervision,
                    None => record.managed = Some(Managed::new(supervision)),
                }
            }
            Event::IncarnationStarted { agent, incarnation } => {
                // A lease belongs to an incarnation: it ends with it.
                if incarnation > 1 {
                    self.release_run(&agent, Some(incarnation - 1), &format!("agent {agent} started a new run"), at);
                }
                self.with_agent(&agent, at, |record| {
                    record.incarnation = incarnation;
                    if let Some(managed) = &mut record.managed {
                        managed.status = ManagedStatus::Starting;
                        managed.process = None;
                    }
                });
            }
            Event::ProcessStarted { agent, incarnation, process } => self.with_agent(&agent, at, |record| {
                if let Some(managed) = &mut record.managed
                    && incarnation == record.incarnation
                {
                    managed.process = Some(process);
                    managed.status = ManagedStatus::Running;
                }
            }),
            Event::AgentDown { agent, incarnation, cause } => {
                self.release_run(&agent, Some(incarnation), &format!("agent {agent} down: {cause}"), at);
                self.with_agent(&agent, at, |record| {
                    if let Some(managed) = &mut record.managed {
                        managed.process = None;
                        managed.status = ManagedStatus::Stopped;
                    }
                    record.down = Some(Down { incarnation, cause, at });
                });
            }
            Event::RestartScheduled { agent, attempt, due } => self.with_managed(&agent, at, |managed| {
                let intensity = managed.spec.intensity.clone();
                supervision::admit(managed, at, &intensity);
                managed.status = ManagedStatus::Backoff { due, attempt };
            }),
            Event::AgentFailed { agent, restarts, window_ms } => self.with_managed(&agent, at, |managed| {
                managed.status = ManagedStatus::Failed { restarts, window_ms };
            }),
            Event::RestartRequested { agent } => self.with_managed(&agent, at, |managed| {
                managed.window.clear();
                managed.restarts += 1;
            }),
            Event::ProgressReported { agent, incarnation, progress } => self.with_agent(&agent, at, |record| {
                record.progress = Some(ProgressRecord { incarnation, progress, at });
            }),
            Event::RoleDeclared { role, min, max, supervision } => {
                self.roles.insert(role, RolePool { min, max, supervision });
            }
            // Nodes and placements.
            Event::NodeJoined { node, info } => {
                self.nodes.insert(node, NodeRecord { info, status: NodeStatus::Up { since: at } });
            }
            Event::NodeLost { node, silent_ms } => {
                if let Some(record) = self.nodes.get_mut(&node) {
                    record.status = NodeStatus::Lost { at, silent_ms };
                }
            }
            Event::AgentPlaced { agent, node, .. } => self.with_managed(&agent, at, |managed| {
                managed.node = Some(node);
            }),
            Event::AgentPending { agent, reason } => self.with_managed(&agent, at, |managed| {
                managed.status = ManagedStatus::Pending { reason };
                managed.node = None;
            }),
            // State versions.
            Event::Checkpointed { agent, version, patch, .. } => self.with_agent(&agent, at, |record| {
                let undo = merge_patch_undo(Arc::make_mut(&mut record.current), patch);
                record.push_undo(limits, version, Undo::Patch(undo));
            }),
            Event::RecoveryPointMarked { agent, name, version, .. } => self.with_agent(&agent, at, |record| {
                // Only missing after `--repair` set the version's event aside.
                if let Some(state) = record.state_at(version) {
                    record.recovery_points.insert(name, RecoveryPoint { version, marked_at: at, state });
                }
            }),
            Event::RolledBack { agent, version, state, .. } => self.with_agent(&agent, at, |record| {
                let previous = std::mem::replace(&mut record.current, Arc::new(state));
                record.push_undo(limits, version, Undo::Replace(previous));
            }),
            // Health.
            Event::BreakerOpened { agent, until, .. } => self.with_agent(&agent, at, |record| {
                record.health.breaker = Breaker::Open { until };
                record.health.breaker_opened += 1;
            }),
            Event::BreakerHalfOpened { agent } => {
                self.with_agent(&agent, at, |record| record.health.breaker = Breaker::HalfOpen { since: at });
            }
            Event::BreakerClosed { agent } => {
                self.with_agent(&agent, at, |record| record.health.breaker = Breaker::Closed);
            }
            Event::ViolationReported { agent, .. } => {
                self.with_agent(&agent, at, |record| record.health.record_violation(at));
            }
            Event::Quarantined { agent, by, reason, action } => {
                self.release_run(&agent, None, &format!("agent {agent} quarantined"), at);
                self.with_agent(&agent, at, |record| {
                    record.health.quarantine = Some(Quarantine { reason, by, at, action });
                });
            }
            Event::Released { agent } => self.with_agent(&agent, at, |record| {
                record.health.quarantine = None;
                record.health.violations.clear();
            }),
            // Tasks.
            Event::TaskSubmitted { task, spec, parent, by } => self.tasks.submit(task, spec, parent, by, at),
            Event::OutcomeTaken { task, .. } => self.tasks.outcome_taken(task, at),
            Event::TaskShadowed { task, children } => {
                self.tasks.set_status(task, TaskStatus::Shadowed { children }, at);
            }
            Event::TaskAssigned { task, agent, incarnation, attempt, rung } => {
                self.tasks.assign(task, agent, incarnation, attempt, rung, at);
            }
            Event::StepIntended { task, attempt, name } => {
                let rung = self.tasks.get(task).map_or(0, |found| found.rung);
                self.tasks.intend_step(task, name, attempt, rung, at);
            }
            Event::StepCommitted { task, attempt, name, result, llm, compensation } => {
                let rung = self.tasks.get(task).map_or(0, |found| found.rung);
                let step = Step { name, state: StepState::Done, result, attempt, at, rung, llm, compensation };
                self.tasks.commit_step(task, step);
            }
            Event::TaskCompleted { task, result, level } => {
                self.tasks.set_status(task, TaskStatus::Completed { result, level }, at);
            }
            Event::TaskRetried { task, reason, not_before } => self.tasks.retry(task, reason, not_before, at),
            Event::TaskFailed { task, reason } => self.tasks.set_status(task, TaskStatus::Failed { reason }, at),
            Event::TaskCancelled { task } => self.tasks.set_status(task, TaskStatus::Cancelled, at),
            Event::TaskCompensating { task, outcome, step, child } => {
                self.tasks.set_status(task, TaskStatus::Compensating { outcome, step, child }, at);
            }
            Event::CompensationFailed { task, step, reason } => self.tasks.with_task(task, at, |found| {
                found.compensation_errors.push(format!("{step}: {reason}"));
            }),
            Event::TaskArbitrated { task, agreed, dissent } => self.tasks.with_task(task, at, |found| {
                found.arbitration = Some(crate::tasks::Arbitration { agreed, dissent });
            }),
            Event::ModeChanged { mode, .. } => self.mode = mode,
            // Budgets.
            Event::BudgetReserved { reservation, agent, incarnation, task, spend, period } => {
                if let Some(task) = task {
                    self.tasks.with_task(task, at, |found| found.reserved = found.reserved.plus(spend));
                }
                self.budgets.reserve(reservation, Reservation { agent, incarnation, task, spend }, period);
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
            }
            Event::BudgetBreached { agent, incarnation, .. } => {
                self.release_run(&agent, Some(incarnation), &format!("agent {agent} went over budget"), at);
            }
            // Credentials.
            Event::TokensIssued { agent, generation, refresh_hash, expires_at } => {
                credentials::apply_issued(&mut self.credentials, agent, generation, refresh_hash, expires_at);
            }
            Event::TokensRefreshed { agent, refresh_hash, expires_at } => {
                credentials::apply_refreshed(&mut self.credentials, agent, refresh_hash, expires_at);
            }
            Event::TokensRevoked { agent, .. } => credentials::apply_revoked(&mut self.credentials, agent),
            // Mail.
            Event::MessageSent { id, seq, from, to, conversation, body, reply_to, expects_reply, key } => {
                let message = Message { id, seq, from, to, conversation, body, reply_to, expects_reply, sent_at: at };
                self.mail.apply_sent(message, key);
            }
            Event::MessageAcked { agent, seq } => self.mail.apply_acked(&agent, seq),
            Event::ConversationEnded { conversation, .. } => self.mail.apply_ended(&conversation),
            // The audit trail of hooks is the log itself; the state keeps each hook's mark.
            Event::HookDelivered { hook, seq, .. } | Event::HookFailed { hook, seq, .. } => {
                let mark = self.hooks.entry(hook).or_default();
                *mark = (*mark).max(seq);
            }
        }
    }

    /// Changes the record of `agent`, now updated at `at`, if the state holds it.
    fn with_agent(&mut self, agent: &AgentName, at: Timestamp, change: impl FnOnce(&mut AgentRecord)) {
        if let Some(record) = self.agents.get_mut(agent) {
            record.updated_at = at;
            change(record);
        }
    }

    /// Changes the supervision of `agent`, if it is managed (the record counts as updated
    /// at `at` either way).
    fn with_managed(&mut self, agent: &AgentName, at: Timestamp, change: impl FnOnce(&mut Managed)) {
        self.with_agent(agent, at, |record| {
            if let Some(managed) = &mut record.managed {
                change(managed);
            }
        });
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
