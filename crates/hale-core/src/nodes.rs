//! The nodes of a hale cluster, and which of them each managed agent runs on.
//!
//! A single node has no nodes in its state, and nothing here changes what it does.
//!
//! On a cluster, every node tells the leader that it is up: its name, its address, its
//! labels, and which agents and role pools its hale.toml can start. The leader logs that
//! (`NodeJoined`) the first time, when any of it changes, and when a lost node comes back.
//! The leader's shell declares a node lost (`NodeLost`) when it has not heard from it for
//! the node timeout; in the same decision every agent running there is down with cause
//! `node_lost` and, by its restart policy, starts again as a new incarnation elsewhere.
//!
//! Placement: each new incarnation of a managed agent is placed in the decision that
//! starts it (`AgentPlaced` just before its `IncarnationStarted`). It stays on the node it
//! ran on if that node is up and may still run it (a restart stays where it was, as with
//! supervisord or systemd); otherwise it goes to the eligible node with the fewest agents
//! (with `spread`, the fewest of its own role first), by name on a tie. A node is eligible
//! if it is up, its hale.toml can start the agent, it is one of the agent's `nodes` (if
//! any are named) and it carries all of the agent's `node_labels`. An agent no node may
//! run is `pending` (`AgentPending`, with the reason) until a node that may run it comes
//! up.

use crate::Timestamp;
use crate::event::Event;
use crate::names::{AgentName, NodeName, RoleName};
use crate::rejection::Rejection;
use crate::state::State;
use crate::supervision::{Cause, ManagedStatus, Placement};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What a node of the cluster says of itself when it comes up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its Raft node id.
    pub id: u64,
    /// Where its listener is reached (`host:port`).
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The managed agents its hale.toml can start.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub agents: BTreeSet<AgentName>,
    /// The role pools its hale.toml can start instances of.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub roles: BTreeSet<RoleName>,
}

/// Whether a node is up, as the log says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum NodeStatus {
    Up {
        since: Timestamp,
    },
    /// The leader did not hear from it for `silent_ms`.
    Lost {
        at: Timestamp,
        silent_ms: u64,
    },
}

/// Everything the log says about one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub info: NodeInfo,
    pub status: NodeStatus,
}

impl NodeRecord {
    pub fn is_up(&self) -> bool {
        matches!(self.status, NodeStatus::Up { .. })
    }
}

/// A node says it is up: logged if it is new, changed, or back from being lost; agents
/// waiting for a node are then placed (by [`place`]).
pub(crate) fn node_up(state: &State, node: &NodeName, info: &NodeInfo) -> Result<Vec<Event>, Rejection> {
    crate::names::validate_labels(&info.labels)?;
    if state.node(node).is_some_and(|record| record.is_up() && record.info == *info) {
        return Ok(Vec::new());
    }
    if let Some(record) = state.node(node)
        && record.info.id != info.id
    {
        let by = format!("node id {}", record.info.id);
        return Err(Rejection::NodeTaken { node: node.to_string(), id: info.id, by });
    }
    if let Some((other, _)) = state.nodes().find(|(other, record)| *other != node && record.info.id == info.id) {
        return Err(Rejection::NodeTaken { node: node.to_string(), id: info.id, by: format!("node {other}") });
    }
    let mut events = vec![Event::NodeJoined { node: node.clone(), info: info.clone() }];
    for record in state.agents() {
        if record.managed.as_ref().is_some_and(|managed| matches!(managed.status, ManagedStatus::Pending { .. })) {
            events.push(Event::IncarnationStarted { agent: record.name.clone(), incarnation: record.incarnation + 1 });
        }
    }
    Ok(events)
}

/// The leader has not heard from `node` for `silent_ms`: the node is lost, and so is every
/// run on it, each of which restarts elsewhere as its policy says.
pub(crate) fn node_lost(
    state: &State,
    node: &NodeName,
    silent_ms: u64,
    now: Timestamp,
    seed: u64,
) -> Result<Vec<Event>, Rejection> {
    if !state.node(node).is_some_and(NodeRecord::is_up) {
        return Ok(Vec::new());
    }
    let mut events = vec![Event::NodeLost { node: node.clone(), silent_ms }];
    let cause = Cause::NodeLost { node: node.to_string(), silent_ms };
    // An agent taken down with a sibling earlier in this decision is not taken down twice.
    let mut handled: BTreeSet<AgentName> = BTreeSet::new();
    let on_node: Vec<(AgentName, u64)> = state
        .agents()
        .filter(|record| {
            record.managed.as_ref().is_some_and(|managed| managed.node.as_ref() == Some(node) && managed.is_live())
        })
        .map(|record| (record.name.clone(), record.incarnation))
        .collect();
    for (agent, incarnation) in on_node {
        if handled.contains(&agent) {
            continue;
        }
        let downs = crate::supervision::down(state, &agent, incarnation, &cause, now, seed)?;
        let fresh: Vec<Event> = downs
            .into_iter()
            .filter(|event| match event {
                Event::AgentDown { agent, .. } | Event::IncarnationStarted { agent, .. } => !handled.contains(agent),
                _ => true,
            })
            .collect();
        for event in &fresh {
            if let Event::AgentDown { agent, .. } = event {
                handled.insert(agent.clone());
            }
        }
        events.extend(fresh);
    }
    Ok(events)
}

/// What placement needs to know of one managed agent.
struct Placing<'a> {
    role: &'a RoleName,
    /// An instance of a role pool: any node whose hale.toml has the pool can start it.
    instance: bool,
    rule: &'a Placement,
    /// Where its last incarnation ran.
    previous: Option<&'a NodeName>,
    /// Already pending, for this reason.
    pending: Option<&'a str>,
}

/// Places every managed incarnation that `events` start, in order: an `AgentPlaced` goes
/// just before each `IncarnationStarted`, or an `AgentPending` replaces it when no node
/// may run the agent (nothing at all if it was already pending for that reason). Nodes
/// that join or are lost earlier in `events` count as such. On a single node (no nodes in
/// the state or in `events`) `events` come back as they are.
pub(crate) fn place(state: &State, events: Vec<Event>) -> Vec<Event> {
    let joins = |events: &[Event]| events.iter().any(|event| matches!(event, Event::NodeJoined { .. }));
    if state.nodes().next().is_none() && !joins(&events) {
        return events;
    }
    let mut nodes: BTreeMap<NodeName, NodeRecord> =
        state.nodes().map(|(name, record)| (name.clone(), record.clone())).collect();
    // Where each live (or restarting) managed agent runs, and its role.
    let mut running: BTreeMap<AgentName, (NodeName, RoleName)> = state
        .agents()
        .filter_map(|record| {
            let managed = record.managed.as_ref()?;
            let counts = managed.is_live() || matches!(managed.status, ManagedStatus::Backoff { .. });
            let node = managed.node.clone().filter(|_| counts)?;
            Some((record.name.clone(), (node, record.role.clone())))
        })
        .collect();
    // Agents declared in this very decision (a pool's new instance) are not in the state.
    let mut declared: BTreeMap<AgentName, (RoleName, bool, Placement)> = BTreeMap::new();
    let mut placed = Vec::with_capacity(events.len() + 1);
    for event in events {
        match &event {
            Event::NodeJoined { node, info } => {
                let status = NodeStatus::Up { since: Timestamp(0) };
                nodes.insert(node.clone(), NodeRecord { info: info.clone(), status });
            }
            Event::NodeLost { node, silent_ms } => {
                if let Some(record) = nodes.get_mut(node) {
                    record.status = NodeStatus::Lost { at: Timestamp(0), silent_ms: *silent_ms };
                }
                running.retain(|_, (on, _)| on != node);
            }
            Event::AgentDeclared { agent, role, labels, supervision } => {
                let instance = labels.get("pool").is_some_and(|pool| pool == role.as_str());
                declared.insert(agent.clone(), (role.clone(), instance, supervision.placement.clone()));
            }
            Event::AgentDown { agent, .. } => {
                running.remove(agent);
            }
            Event::IncarnationStarted { agent, incarnation } => {
                let from_state = state.agent(agent.as_str()).and_then(|record| {
                    let managed = record.managed.as_ref()?;
                    let pending = match &managed.status {
                        ManagedStatus::Pending { reason } => Some(reason.as_str()),
                        _ => None,
                    };
                    let instance = record.labels.get("pool").is_some_and(|pool| pool == record.role.as_str());
                    Some(Placing {
                        role: &record.role,
                        instance,
                        rule: &managed.spec.placement,
                        previous: managed.node.as_ref(),
                        pending,
                    })
                });
                let placing = from_state.or_else(|| {
                    declared.get(agent).map(|(role, instance, rule)| Placing {
                        role,
                        instance: *instance,
                        rule,
                        previous: None,
                        pending: None,
                    })
                });
                if let Some(placing) = placing {
                    running.remove(agent);
                    match choose(&nodes, &running, agent, &placing) {
                        Ok(node) => {
                            running.insert(agent.clone(), (node.clone(), placing.role.clone()));
                            placed.push(Event::AgentPlaced { agent: agent.clone(), incarnation: *incarnation, node });
                        }
                        Err(reason) => {
                            if placing.pending != Some(reason.as_str()) {
                                placed.push(Event::AgentPending { agent: agent.clone(), reason });
                            }
                            continue;
                        }
                    }
                }
            }
            _ => {}
        }
        placed.push(event);
    }
    placed
}

/// Whether a node called `name` with `labels` is one `rule` allows (its names and labels;
/// whether the node is up and its hale.toml has the agent are not looked at).
pub fn allows(rule: &Placement, name: &NodeName, labels: &BTreeMap<String, String>) -> bool {
    (rule.nodes.is_empty() || rule.nodes.contains(name))
        && rule.node_labels.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// The node `agent` goes to, or why none may run it.
fn choose(
    nodes: &BTreeMap<NodeName, NodeRecord>,
    running: &BTreeMap<AgentName, (NodeName, RoleName)>,
    agent: &AgentName,
    placing: &Placing<'_>,
) -> Result<NodeName, String> {
    let can_start = |record: &NodeRecord| {
        record.info.agents.contains(agent) || (placing.instance && record.info.roles.contains(placing.role))
    };
    let eligible = |name: &NodeName, record: &NodeRecord| {
        record.is_up() && can_start(record) && allows(placing.rule, name, &record.info.labels)
    };
    if let Some(previous) = placing.previous
        && nodes.get(previous).is_some_and(|record| eligible(previous, record))
    {
        return Ok(previous.clone());
    }
    let load = |node: &NodeName| {
        let (mut all, mut same_role) = (0usize, 0usize);
        for (on, role) in running.values() {
            if on == node {
                all += 1;
                same_role += usize::from(role == placing.role);
            }
        }
        (if placing.rule.spread { same_role } else { 0 }, all)
    };
    let best = nodes.iter().filter(|(name, record)| eligible(name, record)).min_by_key(|(name, _)| (load(name), *name));
    if let Some((name, _)) = best {
        return Ok(name.clone());
    }
    let up: Vec<&str> = nodes.iter().filter(|(_, record)| record.is_up()).map(|(name, _)| name.as_str()).collect();
    if up.is_empty() {
        return Err("no node is up".to_string());
    }
    let starters: Vec<&str> =
        nodes.iter().filter(|(_, record)| record.is_up() && can_start(record)).map(|(name, _)| name.as_str()).collect();
    if starters.is_empty() {
        let what = if placing.instance { format!("role pool {}", placing.role) } else { format!("agent {agent}") };
        return Err(format!("no node that is up ({}) has the {what} in its hale.toml", up.join(", ")));
    }
    Err(format!(
        "no node that is up and can start it ({}) matches its placement ({})",
        starters.join(", "),
        placing.rule
    ))
}
