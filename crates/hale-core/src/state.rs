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
    /// Retained versions, oldest first; the last one is the current state. Never empty.
    history: VecDeque<(u64, Arc<Value>)>,
    /// Named versions, kept whatever the history bound drops.
    pub recovery_points: BTreeMap<PointName, RecoveryPoint>,
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
                history: VecDeque::from([(0, Arc::new(Value::Object(Map::new())))]),
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
                let mut next = Value::clone(record.state());
                merge_patch(&mut next, patch);
                record.push_version(limits, *version, Arc::new(next));
            }
            Event::RecoveryPointMarked { name, version, .. } => {
                // Only missing after `--repair` set the version's event aside.
                let Some(state) = record.state_at(*version).cloned() else {
                    return;
                };
                let point = RecoveryPoint { version: *version, marked_at: at, state };
                record.recovery_points.insert(name.clone(), point);
            }
            Event::RolledBack { version, state, .. } => {
                record.push_version(limits, *version, Arc::new(state.clone()));
            }
        }
    }
}

impl AgentRecord {
    /// The current version number; 0 before the first checkpoint.
    pub fn version(&self) -> u64 {
        self.history.back().expect("history is never empty").0
    }

    /// The current state.
    pub fn state(&self) -> &Arc<Value> {
        &self.history.back().expect("history is never empty").1
    }

    /// The oldest version still in the history.
    pub fn oldest_retained(&self) -> u64 {
        self.history.front().expect("history is never empty").0
    }

    /// The state at `version`, if the history or a recovery point still holds it.
    pub fn state_at(&self, version: u64) -> Option<&Arc<Value>> {
        // Versions in the history are ascending (consecutive unless `--repair` set one aside).
        if let Ok(index) = self.history.binary_search_by_key(&version, |(found, _)| *found) {
            return Some(&self.history[index].1);
        }
        self.recovery_points.values().find(|point| point.version == version).map(|point| &point.state)
    }

    /// Retained versions, oldest first, with their states.
    pub fn history(&self) -> impl ExactSizeIterator<Item = (u64, &Arc<Value>)> {
        self.history.iter().map(|(version, state)| (*version, state))
    }

    fn push_version(&mut self, limits: &Limits, version: u64, state: Arc<Value>) {
        self.history.push_back((version, state));
        while self.history.len() > limits.history_len.max(1) {
            self.history.pop_front();
        }
    }
}
