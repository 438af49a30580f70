use crate::Timestamp;
use crate::event::Event;
use crate::limits::Limits;
use crate::merge::merge_patch;
use crate::names::{AgentName, PointName, RoleName};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// The fold of the log: every agent hale knows of.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    agents: BTreeMap<AgentName, AgentRecord>,
}

/// Everything the log says about one agent.
///
/// The version history is kept as the state at the oldest retained version (`base`) plus
/// the step (merge patch or wholesale replacement) that made each later version, and the
/// current state folded. A checkpoint then costs two in-place merges of its small patch
/// (into the current state, and into the base once the oldest step falls out of the
/// bound), never a copy of the whole state: that keeps live checkpoints and replay cheap.
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
    /// The oldest retained version and its state.
    base: (u64, Arc<Value>),
    /// The steps from `base` to `current`, oldest first, each with the version it made.
    steps: VecDeque<(u64, Step)>,
    /// Named versions, kept whatever the history bound drops.
    pub recovery_points: BTreeMap<PointName, RecoveryPoint>,
}

/// How one version was made from the one before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Patch(Value),
    Replace(Arc<Value>),
}

impl Step {
    fn apply_to(&self, state: &mut Value) {
        match self {
            Step::Patch(patch) => merge_patch(state, patch),
            Step::Replace(replacement) => *state = Value::clone(replacement),
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

    pub(crate) fn apply(&mut self, limits: &Limits, at: Timestamp, event: &Event) {
        if let Event::AgentRegistered { agent, role, labels } = event {
            let record = self.agents.entry(agent.clone()).or_insert_with(|| AgentRecord {
                name: agent.clone(),
                role: role.clone(),
                labels: BTreeMap::new(),
                incarnation: 0,
                registered_at: at,
                updated_at: at,
                version: 0,
                current: Arc::new(Value::Object(Map::new())),
                base: (0, Arc::new(Value::Object(Map::new()))),
                steps: VecDeque::new(),
                recovery_points: BTreeMap::new(),
            });
            record.role = role.clone();
            record.labels = labels.clone();
            record.updated_at = at;
            return;
        }
        // `decide` only emits events about registered agents, so a miss here means the
        // registration was set aside by `--repair`. `apply` cannot fail: it skips the event.
        let Some(record) = self.agents.get_mut(event.agent()) else {
            return;
        };
        record.updated_at = at;
        match event {
            Event::AgentRegistered { .. } => unreachable!("handled above"),
            Event::IncarnationStarted { incarnation, .. } => record.incarnation = *incarnation,
            Event::Checkpointed { version, patch, .. } => {
                merge_patch(Arc::make_mut(&mut record.current), patch);
                record.push_step(limits, *version, Step::Patch(patch.clone()));
            }
            Event::RecoveryPointMarked { name, version, .. } => {
                // Only missing after `--repair` set the version's event aside.
                let Some(state) = record.state_at(*version) else {
                    return;
                };
                let point = RecoveryPoint { version: *version, marked_at: at, state };
                record.recovery_points.insert(name.clone(), point);
            }
            Event::RolledBack { version, state, .. } => {
                let state = Arc::new(state.clone());
                record.current = state.clone();
                record.push_step(limits, *version, Step::Replace(state));
            }
        }
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
        self.base.0
    }

    /// The state at `version`, if the history or a recovery point still holds it.
    pub fn state_at(&self, version: u64) -> Option<Arc<Value>> {
        if version == self.version {
            return Some(self.current.clone());
        }
        if version == self.base.0 {
            return Some(self.base.1.clone());
        }
        // Versions in the history ascend (consecutive unless `--repair` set one aside).
        if version > self.base.0
            && version < self.version
            && let Ok(index) = self.steps.binary_search_by_key(&version, |(found, _)| *found)
        {
            let mut state = Value::clone(&self.base.1);
            for (_, step) in self.steps.range(..=index) {
                step.apply_to(&mut state);
            }
            return Some(Arc::new(state));
        }
        self.recovery_points.values().find(|point| point.version == version).map(|point| point.state.clone())
    }

    /// The retained version numbers, oldest first; the last is the current version.
    pub fn history(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.base.0).chain(self.steps.iter().map(|(version, _)| *version))
    }

    fn push_step(&mut self, limits: &Limits, version: u64, step: Step) {
        self.version = version;
        self.steps.push_back((version, step));
        // `history_len` versions are retained: the base and `history_len - 1` steps.
        while self.steps.len() >= limits.history_len.max(1) {
            let (version, step) = self.steps.pop_front().expect("not empty");
            match step {
                Step::Patch(patch) => merge_patch(Arc::make_mut(&mut self.base.1), &patch),
                Step::Replace(state) => self.base.1 = state,
            }
            self.base.0 = version;
        }
        if self.steps.is_empty() {
            // With a history of one version, the base is the current state.
            self.base = (self.version, self.current.clone());
        }
    }
}
