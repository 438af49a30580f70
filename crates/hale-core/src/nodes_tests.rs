//! Nodes and placement through the public `Core` API: where managed agents go on a
//! cluster, what happens to them when their node is lost, and what waits for a node.

use crate::nodes::{NodeInfo, NodeStatus};
use crate::supervision::*;
use crate::*;
use std::collections::{BTreeMap, BTreeSet};

const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0 + ms)
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn node(text: &str) -> NodeName {
    NodeName::new(text).unwrap()
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::kind).collect()
}

fn supervision(restart: RestartPolicy, placement: Placement) -> Supervision {
    Supervision { restart, placement, ..Supervision::default() }
}

/// A node that can start `agents` and instances of the `roles` pools.
fn info(id: u64, labels: &[(&str, &str)], agents: &[&str], roles: &[&str]) -> NodeInfo {
    NodeInfo {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        labels: labels.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect(),
        agents: agents.iter().map(|agent| name(agent)).collect(),
        roles: roles.iter().map(|role| RoleName::new(*role).unwrap()).collect(),
    }
}

fn run(core: &mut Core, command: SupervisionCommand, now: Timestamp) -> Vec<Event> {
    let events = core.execute(&Command::Supervision(command), now).unwrap().events;
    while core.poll_effect().is_some() {}
    events
}

fn up(core: &mut Core, name: &str, info: NodeInfo, now: Timestamp) -> Vec<Event> {
    run(core, SupervisionCommand::NodeUp { node: node(name), info }, now)
}

fn declare(core: &mut Core, agent: &str, supervision: Supervision) {
    let command = SupervisionCommand::Declare {
        agent: name(agent),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        supervision,
    };
    run(core, command, at(0));
}

fn start(core: &mut Core, agent: &str, now: Timestamp) -> Vec<Event> {
    run(core, SupervisionCommand::StartManaged { agent: name(agent) }, now)
}

fn placed_on(core: &Core, agent: &str) -> Option<String> {
    core.state().agent(agent).unwrap().managed.as_ref().unwrap().node.as_ref().map(|node| node.to_string())
}

fn status(core: &Core, agent: &str) -> ManagedStatus {
    core.state().agent(agent).unwrap().managed.as_ref().unwrap().status.clone()
}

/// Every event the core decided, so that a replay can be compared with the live state.
struct Logged {
    core: Core,
    log: Vec<(Timestamp, Event)>,
}

impl Logged {
    fn new() -> Logged {
        let mut core = Core::new(Limits::default());
        core.set_seed(7);
        Logged { core, log: Vec::new() }
    }

    fn run(&mut self, command: SupervisionCommand, now: Timestamp) -> Vec<Event> {
        let events = run(&mut self.core, command, now);
        self.log.extend(events.iter().map(|event| (now, event.clone())));
        events
    }

    fn replayed(&self) -> State {
        let mut core = Core::new(Limits::default());
        for (at, event) in &self.log {
            core.apply(*at, event);
        }
        core.into_state()
    }
}

const ALL: [&str; 3] = ["a", "b", "c"];

#[test]
fn agents_go_to_the_nodes_with_the_fewest_agents_and_restart_where_they_ran() {
    let mut core = Core::new(Limits::default());
    for (id, name) in ["n1", "n2", "n3"].iter().enumerate() {
        let events = up(&mut core, name, info(id as u64 + 1, &[], &ALL, &[]), at(0));
        assert_eq!(kinds(&events), ["node_joined"]);
    }
    for agent in ALL {
        declare(&mut core, agent, supervision(RestartPolicy::Always, Placement::default()));
        let events = start(&mut core, agent, at(10));
        assert_eq!(kinds(&events), ["agent_placed", "incarnation_started"], "{agent}");
    }
    assert_eq!(ALL.map(|agent| placed_on(&core, agent).unwrap()), ["n1", "n2", "n3"]);
    // A crash restarts the agent on the node it ran on, however loaded the others are.
    let cause = Cause::Exited { code: Some(1), signal: None };
    let events = run(&mut core, SupervisionCommand::ReportDown { agent: name("c"), incarnation: 1, cause }, at(20));
    assert_eq!(kinds(&events), ["agent_down", "restart_scheduled", "agent_placed", "incarnation_started"]);
    assert!(matches!(&events[2], Event::AgentPlaced { incarnation: 2, node, .. } if node.as_str() == "n3"));
    // The same node saying the same again logs nothing.
    assert!(up(&mut core, "n1", info(1, &[], &ALL, &[]), at(30)).is_empty());
}

#[test]
fn a_lost_nodes_agents_are_down_and_start_again_on_the_survivors_in_the_same_decision() {
    let mut logged = Logged::new();
    for (id, name) in ["n1", "n2"].iter().enumerate() {
        logged.run(SupervisionCommand::NodeUp { node: node(name), info: info(id as u64 + 1, &[], &ALL, &[]) }, at(0));
    }
    for agent in ALL {
        let command = SupervisionCommand::Declare {
            agent: name(agent),
            role: RoleName::new("worker").unwrap(),
            labels: BTreeMap::new(),
            supervision: supervision(RestartPolicy::OnFailure, Placement::default()),
        };
        logged.run(command, at(0));
        logged.run(SupervisionCommand::StartManaged { agent: name(agent) }, at(10));
    }
    let on_n1: Vec<&str> = ALL.into_iter().filter(|agent| placed_on(&logged.core, agent).unwrap() == "n1").collect();
    assert_eq!(on_n1, ["a", "c"]);
    let events = logged.run(SupervisionCommand::NodeLost { node: node("n1"), silent_ms: 3_300 }, at(5_000));
    assert_eq!(
        kinds(&events),
        [
            "node_lost",
            "agent_down",
            "restart_scheduled",
            "agent_placed",
            "incarnation_started",
            "agent_down",
            "restart_scheduled",
            "agent_placed",
            "incarnation_started"
        ]
    );
    let cause = Cause::NodeLost { node: "n1".into(), silent_ms: 3_300 };
    assert_eq!(events[1], Event::AgentDown { agent: name("a"), incarnation: 1, cause: cause.clone() });
    assert_eq!(cause.detector(), "node");
    assert_eq!(crate::hooks::HookKind::of(&events[1]), Some(crate::hooks::HookKind::AgentDown));
    for agent in ["a", "c"] {
        assert_eq!(placed_on(&logged.core, agent).as_deref(), Some("n2"), "{agent}");
        assert_eq!(logged.core.state().agent(agent).unwrap().incarnation, 2);
    }
    assert!(matches!(logged.core.state().node(&node("n1")).unwrap().status, NodeStatus::Lost { silent_ms: 3_300, .. }));
    // Losing it again changes nothing; nor does a node that never joined.
    assert!(logged.run(SupervisionCommand::NodeLost { node: node("n1"), silent_ms: 9_000 }, at(9_000)).is_empty());
    assert!(logged.run(SupervisionCommand::NodeLost { node: node("n9"), silent_ms: 9_000 }, at(9_000)).is_empty());
    // Back: it joins again and takes new placements, but nothing moves back by itself.
    let events = logged.run(SupervisionCommand::NodeUp { node: node("n1"), info: info(1, &[], &ALL, &[]) }, at(10_000));
    assert_eq!(kinds(&events), ["node_joined"]);
    assert_eq!(placed_on(&logged.core, "a").as_deref(), Some("n2"));
    assert_eq!(logged.replayed(), *logged.core.state(), "replay folds the same placements");
}

#[test]
fn an_agent_no_node_may_run_is_pending_with_the_reason_until_one_comes_up() {
    let mut core = Core::new(Limits::default());
    up(&mut core, "n1", info(1, &[("zone", "eu")], &["a"], &[]), at(0));
    let gpu = Placement { node_labels: BTreeMap::from([("gpu".into(), "true".into())]), ..Placement::default() };
    declare(&mut core, "a", supervision(RestartPolicy::Always, gpu));
    let events = start(&mut core, "a", at(10));
    assert_eq!(kinds(&events), ["agent_pending"]);
    let ManagedStatus::Pending { reason } = status(&core, "a") else { panic!("{:?}", status(&core, "a")) };
    assert!(reason.contains("matches its placement") && reason.contains("gpu"), "{reason}");
    assert_eq!(core.state().agent("a").unwrap().incarnation, 0, "no incarnation was started");
    // Asking again while nothing changed logs nothing more.
    assert!(start(&mut core, "a", at(20)).is_empty());
    // A node with the label but without the agent in its hale.toml does not take it (and
    // the reason is the same, so nothing more is logged).
    let events = up(&mut core, "n2", info(2, &[("gpu", "true")], &[], &[]), at(30));
    assert_eq!(kinds(&events), ["node_joined"]);
    assert_eq!(status(&core, "a"), ManagedStatus::Pending { reason });
    // An agent no node's hale.toml has waits too, and says so.
    declare(&mut core, "b", supervision(RestartPolicy::Always, Placement::default()));
    assert_eq!(kinds(&start(&mut core, "b", at(35))), ["agent_pending"]);
    let ManagedStatus::Pending { reason } = status(&core, "b") else { panic!() };
    assert!(reason.contains("no node that is up (n1, n2) has the agent b in its hale.toml"), "{reason}");
    // One that has both: placed there in the decision that logs it joining.
    // (b is still pending: its reason now names n3 too.)
    let events = up(&mut core, "n3", info(3, &[("gpu", "true")], &["a"], &[]), at(40));
    assert_eq!(kinds(&events), ["node_joined", "agent_placed", "incarnation_started", "agent_pending"]);
    assert_eq!(placed_on(&core, "a").as_deref(), Some("n3"));
    assert_eq!(status(&core, "a"), ManagedStatus::Starting);
}

#[test]
fn named_nodes_bound_where_an_agent_may_run() {
    let mut core = Core::new(Limits::default());
    up(&mut core, "n1", info(1, &[], &["a"], &[]), at(0));
    up(&mut core, "n2", info(2, &[], &["a"], &[]), at(0));
    let only_n2 = Placement { nodes: vec![node("n2")], ..Placement::default() };
    declare(&mut core, "a", supervision(RestartPolicy::Always, only_n2));
    start(&mut core, "a", at(10));
    assert_eq!(placed_on(&core, "a").as_deref(), Some("n2"));
    // n2 lost: n1 may not run it, so it waits rather than going there.
    let events = run(&mut core, SupervisionCommand::NodeLost { node: node("n2"), silent_ms: 3_000 }, at(100));
    assert_eq!(kinds(&events), ["node_lost", "agent_down", "restart_scheduled", "agent_pending"]);
    let ManagedStatus::Pending { reason } = status(&core, "a") else { panic!() };
    assert!(reason.contains("nodes = [n2]"), "{reason}");
}

#[test]
fn a_spread_pool_puts_its_instances_on_distinct_nodes() {
    let mut core = Core::new(Limits::default());
    // n1 already runs an agent of another role: spread looks at the pool's own first.
    for (id, name) in ["n1", "n2", "n3"].iter().enumerate() {
        up(&mut core, name, info(id as u64 + 1, &[], &["other"], &["worker"]), at(0));
    }
    let other = SupervisionCommand::Declare {
        agent: name("other"),
        role: RoleName::new("other").unwrap(),
        labels: BTreeMap::new(),
        supervision: supervision(RestartPolicy::Always, Placement::default()),
    };
    run(&mut core, other, at(0));
    start(&mut core, "other", at(0));
    assert_eq!(placed_on(&core, "other").as_deref(), Some("n1"));
    let spread = Placement { spread: true, ..Placement::default() };
    let pool = SupervisionCommand::DeclareRole {
        role: RoleName::new("worker").unwrap(),
        min: 3,
        max: 3,
        supervision: supervision(RestartPolicy::Always, spread),
    };
    run(&mut core, pool, at(0));
    for _ in 0..3 {
        let events = run(&mut core, SupervisionCommand::Recruit { role: RoleName::new("worker").unwrap() }, at(5));
        assert_eq!(kinds(&events), ["agent_declared", "agent_placed", "incarnation_started"]);
    }
    let nodes: BTreeSet<String> =
        ["worker-1", "worker-2", "worker-3"].iter().map(|agent| placed_on(&core, agent).unwrap()).collect();
    assert_eq!(nodes.len(), 3, "one instance per node: {nodes:?}");
}

#[test]
fn a_name_or_id_another_node_has_is_refused() {
    let mut core = Core::new(Limits::default());
    up(&mut core, "n1", info(1, &[], &[], &[]), at(0));
    let taken = |core: &mut Core, name: &str, id: u64| {
        let command =
            Command::Supervision(SupervisionCommand::NodeUp { node: node(name), info: info(id, &[], &[], &[]) });
        core.execute(&command, at(1)).unwrap_err()
    };
    assert_eq!(taken(&mut core, "n1", 2).code(), "node_taken");
    assert_eq!(taken(&mut core, "n2", 1).code(), "node_taken");
    // A new address or new labels for the same node are taken in.
    let events = up(&mut core, "n1", info(1, &[("zone", "eu")], &[], &[]), at(2));
    assert_eq!(kinds(&events), ["node_joined"]);
}

#[test]
fn a_single_node_places_nothing_and_logs_what_it_always_did() {
    let mut core = Core::new(Limits::default());
    declare(&mut core, "a", supervision(RestartPolicy::Always, Placement::default()));
    assert_eq!(kinds(&start(&mut core, "a", at(0))), ["incarnation_started"]);
    assert_eq!(placed_on(&core, "a"), None);
    // An unset placement is left out of the logged spec: older logs read the same.
    let logged = serde_json::to_value(Supervision::default()).unwrap();
    assert!(logged.get("placement").is_none(), "{logged}");
}
