//! Tests of `decide` and `apply` through the public `Core` API, and the replay property.

use crate::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const T: Timestamp = Timestamp(1_700_000_000_000);

fn agent(name: &str) -> AgentName {
    AgentName::new(name).unwrap()
}

fn hello(name: &str, incarnation: Option<u64>) -> Command {
    Command::Agent(AgentCommand::Hello(Hello {
        agent: agent(name),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        incarnation,
    }))
}

fn checkpoint(name: &str, incarnation: u64, patch: Value) -> Command {
    Command::Agent(AgentCommand::Checkpoint { agent: agent(name), incarnation, patch, expected_version: None })
}

fn started(name: &str) -> Core {
    let mut core = Core::new(Limits::default());
    core.execute(&hello(name, None), T).unwrap();
    core
}

#[test]
fn first_hello_registers_and_starts_incarnation_one() {
    let mut core = Core::new(Limits::default());
    let events = core.execute(&hello("a", None), T).unwrap().events;
    assert_eq!(events.iter().map(Event::kind).collect::<Vec<_>>(), ["agent_registered", "incarnation_started"]);
    let record = core.state().agent("a").unwrap();
    assert_eq!((record.incarnation, record.version()), (1, 0));
    assert_eq!(**record.state(), json!({}));
}

#[test]
fn hello_with_current_incarnation_resumes_without_events() {
    let mut core = started("a");
    let resumed = core.execute(&hello("a", Some(1)), T).unwrap();
    assert_eq!(resumed.events, vec![]);
    assert_eq!(resumed.answer, Answer::Welcome { agent: agent("a"), incarnation: 1, resumed: true });
    assert_eq!(core.state().agent("a").unwrap().incarnation, 1);
}

#[test]
fn new_run_fences_the_old_incarnation() {
    let mut core = started("a");
    core.execute(&hello("a", None), T).unwrap();
    assert_eq!(core.state().agent("a").unwrap().incarnation, 2);
    let refused = core.execute(&checkpoint("a", 1, json!({"x": 1})), T).unwrap_err();
    assert_eq!(refused, Rejection::StaleIncarnation { agent: "a".into(), given: 1, current: 2 });
    assert_eq!(refused.code(), "stale_incarnation");
    let refused = core.execute(&hello("a", Some(1)), T).unwrap_err();
    assert_eq!(refused.code(), "stale_incarnation");
    assert_eq!(core.execute(&hello("a", Some(7)), T).unwrap_err().code(), "unknown_incarnation");
    assert_eq!(core.state().agent("a").unwrap().version(), 0, "nothing was written");
}

#[test]
fn checkpoints_fold_merge_patches_and_bump_the_version() {
    let mut core = started("a");
    core.execute(&checkpoint("a", 1, json!({"files": {"a.rs": 1}, "step": "plan"})), T).unwrap();
    core.execute(&checkpoint("a", 1, json!({"files": {"b.rs": 2}, "step": null})), T).unwrap();
    let record = core.state().agent("a").unwrap();
    assert_eq!(record.version(), 2);
    assert_eq!(**record.state(), json!({"files": {"a.rs": 1, "b.rs": 2}}));
}

#[test]
fn writes_need_a_registered_started_agent() {
    let mut core = Core::new(Limits::default());
    assert_eq!(core.execute(&checkpoint("nobody", 1, json!({})), T).unwrap_err().code(), "unknown_agent");
}

#[test]
fn patch_must_be_an_object() {
    let mut core = started("a");
    let refused = core.execute(&checkpoint("a", 1, json!([1, 2])), T).unwrap_err();
    assert_eq!(refused, Rejection::PatchNotObject { got: "an array" });
}

#[test]
fn size_limits_refuse_and_change_nothing() {
    let limits = Limits { patch_bytes_max: 64, state_bytes_max: 100, ..Limits::default() };
    let mut core = Core::new(limits);
    core.execute(&hello("a", None), T).unwrap();
    let refused = core.execute(&checkpoint("a", 1, json!({"x": "y".repeat(80)})), T).unwrap_err();
    assert_eq!(refused.code(), "patch_too_large");
    core.execute(&checkpoint("a", 1, json!({"x": "y".repeat(50)})), T).unwrap();
    let refused = core.execute(&checkpoint("a", 1, json!({"z": "y".repeat(50)})), T).unwrap_err();
    assert!(matches!(refused, Rejection::StateTooLarge { max: 100, .. }), "{refused:?}");
    assert_eq!(core.state().agent("a").unwrap().version(), 1);
}

#[test]
fn deep_patches_are_refused_before_they_reach_the_log() {
    let mut core = started("a");
    let mut deep = json!(1);
    for _ in 0..PATCH_DEPTH_MAX {
        deep = json!({ "d": deep });
    }
    assert_eq!(json_depth(&deep), PATCH_DEPTH_MAX);
    core.execute(&checkpoint("a", 1, deep.clone()), T).unwrap();
    let refused = core.execute(&checkpoint("a", 1, json!({ "d": deep })), T).unwrap_err();
    assert_eq!(refused, Rejection::PatchTooDeep { depth: PATCH_DEPTH_MAX + 1, max: PATCH_DEPTH_MAX });
    // The deepest state still round-trips through JSON inside a snapshot's envelope.
    let bytes = serde_json::to_vec(core.state()).unwrap();
    let back: State = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(&back, core.state());
}

#[test]
fn expected_version_detects_conflicts() {
    let mut core = started("a");
    let command = Command::Agent(AgentCommand::Checkpoint {
        agent: agent("a"),
        incarnation: 1,
        patch: json!({}),
        expected_version: Some(3),
    });
    assert_eq!(core.execute(&command, T).unwrap_err(), Rejection::VersionConflict { expected: 3, current: 0 });
}

#[test]
fn rollback_to_a_point_survives_the_history_bound() {
    let limits = Limits { history_len: 3, ..Limits::default() };
    let mut core = Core::new(limits);
    core.execute(&hello("a", None), T).unwrap();
    core.execute(&checkpoint("a", 1, json!({"n": 1})), T).unwrap();
    let mark = Command::Agent(AgentCommand::MarkRecoveryPoint {
        agent: agent("a"),
        incarnation: 1,
        name: PointName::new("one").unwrap(),
    });
    core.execute(&mark, T).unwrap();
    for n in 2..=10 {
        core.execute(&checkpoint("a", 1, json!({"n": n})), T).unwrap();
    }
    let record = core.state().agent("a").unwrap();
    assert_eq!(record.history().collect::<Vec<_>>(), [8, 9, 10]);
    let too_old = Command::Agent(AgentCommand::Rollback {
        agent: agent("a"),
        incarnation: 1,
        target: RollbackTarget::Version(5),
    });
    let refused = core.execute(&too_old, T).unwrap_err();
    assert_eq!(refused, Rejection::VersionNotRetained { agent: "a".into(), version: 5, oldest: 8, newest: 10 });

    let back = Command::Agent(AgentCommand::Rollback {
        agent: agent("a"),
        incarnation: 1,
        target: RollbackTarget::Point(PointName::new("one").unwrap()),
    });
    core.execute(&back, T).unwrap();
    let record = core.state().agent("a").unwrap();
    assert_eq!((record.version(), &**record.state()), (11, &json!({"n": 1})));
    // The version a point names stays reachable by number too.
    let by_number = Command::Agent(AgentCommand::Rollback {
        agent: agent("a"),
        incarnation: 1,
        target: RollbackTarget::Version(1),
    });
    core.execute(&by_number, T).unwrap();
    assert_eq!(core.state().agent("a").unwrap().version(), 12);
}

#[test]
fn recovery_points_are_bounded_but_names_can_be_reused() {
    let limits = Limits { recovery_points_max: 1, ..Limits::default() };
    let mut core = Core::new(limits);
    core.execute(&hello("a", None), T).unwrap();
    let mark = |name: &str| {
        Command::Agent(AgentCommand::MarkRecoveryPoint {
            agent: agent("a"),
            incarnation: 1,
            name: PointName::new(name).unwrap(),
        })
    };
    core.execute(&mark("p"), T).unwrap();
    core.execute(&mark("p"), T).unwrap();
    assert_eq!(core.execute(&mark("q"), T).unwrap_err().code(), "too_many_recovery_points");
    let unknown = Command::Agent(AgentCommand::Rollback {
        agent: agent("a"),
        incarnation: 1,
        target: RollbackTarget::Point(PointName::new("q").unwrap()),
    });
    assert_eq!(core.execute(&unknown, T).unwrap_err().code(), "unknown_recovery_point");
}

#[test]
fn hello_updates_role_and_labels() {
    let mut core = started("a");
    let mut labels = BTreeMap::new();
    labels.insert("zone".to_string(), "eu".to_string());
    let command = Command::Agent(AgentCommand::Hello(Hello {
        agent: agent("a"),
        role: RoleName::new("planner").unwrap(),
        labels: labels.clone(),
        incarnation: Some(1),
    }));
    let events = core.execute(&command, T).unwrap().events;
    assert_eq!(events.iter().map(Event::kind).collect::<Vec<_>>(), ["agent_registered"]);
    let record = core.state().agent("a").unwrap();
    assert_eq!((record.role.as_str(), &record.labels, record.incarnation), ("planner", &labels, 1));
}

// ---- The replay property ----------------------------------------------------------------

/// One step of a random workload; incarnations are given relative to the current one so
/// most writes are valid and some are stale or from the future.
#[derive(Clone, Debug)]
enum Op {
    Hello { agent: usize, resume: bool },
    Checkpoint { agent: usize, incarnation_delta: i8, patch: Value },
    Mark { agent: usize, point: usize },
    RollbackVersion { agent: usize, version: u64 },
    RollbackPoint { agent: usize, point: usize },
}

const AGENTS: [&str; 3] = ["a", "b", "c"];
const POINTS: [&str; 2] = ["p", "q"];

fn patch_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i32>().prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from),
        prop::collection::vec(any::<u8>().prop_map(Value::from), 0..3).prop_map(Value::from),
    ];
    let nested = leaf.prop_recursive(3, 16, 4, |inner| {
        prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|map| Value::Object(map.into_iter().collect()))
    });
    prop::collection::btree_map("[a-e]", nested, 0..4).prop_map(|map| Value::Object(map.into_iter().collect()))
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS.len();
    prop_oneof![
        1 => (agent.clone(), any::<bool>()).prop_map(|(agent, resume)| Op::Hello { agent, resume }),
        6 => (agent.clone(), prop_oneof![8 => Just(0i8), 1 => Just(-1), 1 => Just(1)], patch_strategy())
            .prop_map(|(agent, incarnation_delta, patch)| Op::Checkpoint { agent, incarnation_delta, patch }),
        1 => (agent.clone(), 0..POINTS.len()).prop_map(|(agent, point)| Op::Mark { agent, point }),
        1 => (agent.clone(), 0..30u64).prop_map(|(agent, version)| Op::RollbackVersion { agent, version }),
        1 => (agent, 0..POINTS.len()).prop_map(|(agent, point)| Op::RollbackPoint { agent, point }),
    ]
}

fn to_command(core: &Core, op: &Op) -> Command {
    let current = |index: usize| core.state().agent(AGENTS[index]).map_or(0, |record| record.incarnation);
    match op {
        Op::Hello { agent, resume } => hello(AGENTS[*agent], resume.then(|| current(*agent))),
        Op::Checkpoint { agent, incarnation_delta, patch } => {
            let incarnation = current(*agent).saturating_add_signed(i64::from(*incarnation_delta));
            checkpoint(AGENTS[*agent], incarnation, patch.clone())
        }
        Op::Mark { agent, point } => Command::Agent(AgentCommand::MarkRecoveryPoint {
            agent: self::agent(AGENTS[*agent]),
            incarnation: current(*agent),
            name: PointName::new(POINTS[*point]).unwrap(),
        }),
        Op::RollbackVersion { agent, version } => Command::Agent(AgentCommand::Rollback {
            agent: self::agent(AGENTS[*agent]),
            incarnation: current(*agent),
            target: RollbackTarget::Version(*version),
        }),
        Op::RollbackPoint { agent, point } => Command::Agent(AgentCommand::Rollback {
            agent: self::agent(AGENTS[*agent]),
            incarnation: current(*agent),
            target: RollbackTarget::Point(PointName::new(POINTS[*point]).unwrap()),
        }),
    }
}

/// What the state says a command that succeeded made, read after its events: the core's
/// answer must agree (`started`: the hello's events started a run).
fn answer_from_state(state: &State, command: &Command, now: Timestamp, started: bool) -> Answer {
    let Command::Agent(command) = command else { unreachable!("the ops are agent commands") };
    let record = |name: &AgentName| state.agent(name.as_str()).unwrap();
    match command {
        AgentCommand::Hello(hello) => Answer::Welcome {
            agent: hello.agent.clone(),
            incarnation: record(&hello.agent).incarnation,
            resumed: !started,
        },
        AgentCommand::Checkpoint { agent, .. } => Answer::Checkpointed { version: record(agent).version() },
        AgentCommand::MarkRecoveryPoint { agent, name, .. } => {
            let point = &record(agent).recovery_points[name];
            assert_eq!(point.marked_at, now);
            Answer::RecoveryPointMarked { name: name.clone(), version: point.version, marked_at: point.marked_at }
        }
        AgentCommand::Rollback { agent, target, .. } => {
            let record = record(agent);
            let target_version = match target {
                RollbackTarget::Version(version) => *version,
                RollbackTarget::Point(name) => record.recovery_points[name].version,
            };
            Answer::RolledBack { version: record.version(), target_version, state: record.state().clone() }
        }
        AgentCommand::RecordProgress { .. } => Answer::Done,
    }
}

fn replay(start: State, limits: &Limits, log: &[(Timestamp, Event)]) -> State {
    let mut core = Core::from_state(start, limits.clone());
    for (at, event) in log {
        core.apply(*at, event);
    }
    core.into_state()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any sequence of commands, the live state equals a replay of the log from
    /// scratch, and a replay from a snapshot (serialized and read back, as on disk) at any
    /// point plus the tail after it.
    #[test]
    fn replay_from_scratch_or_any_snapshot_gives_the_live_state(
        ops in prop::collection::vec(op_strategy(), 0..60),
        history_len in 1usize..5,
        snapshot_at in any::<prop::sample::Index>(),
    ) {
        let limits = Limits { history_len, recovery_points_max: 1, ..Limits::default() };
        let mut live = Core::new(limits.clone());
        let mut log = Vec::new();
        let mut snapshots = vec![(0, serde_json::to_vec(live.state()).unwrap())];
        for (step, op) in ops.iter().enumerate() {
            let now = Timestamp(T.0 + step as u64);
            let command = to_command(&live, op);
            let before = live.state().clone();
            match live.execute(&command, now) {
                Ok(Decision { events, answer }) => {
                    let started = events.iter().any(|event| matches!(event, Event::IncarnationStarted { .. }));
                    prop_assert_eq!(answer, answer_from_state(live.state(), &command, now, started));
                    log.extend(events.into_iter().map(|event| (now, event)));
                }
                Err(_) => prop_assert_eq!(&before, live.state(), "a rejection changed the state"),
            }
            snapshots.push((log.len(), serde_json::to_vec(live.state()).unwrap()));
        }
        let from_scratch = replay(State::default(), &limits, &log);
        prop_assert_eq!(&from_scratch, live.state());

        let (covered, bytes) = &snapshots[snapshot_at.index(snapshots.len())];
        let restored: State = serde_json::from_slice(bytes).unwrap();
        let from_snapshot = replay(restored, &limits, &log[*covered..]);
        prop_assert_eq!(&from_snapshot, live.state());
    }
}

#[test]
fn every_retained_version_reads_back_as_it_was() {
    let limits = Limits { history_len: 4, ..Limits::default() };
    let mut core = Core::new(limits);
    core.execute(&hello("a", None), T).unwrap();
    for n in 1..=10 {
        core.execute(&checkpoint("a", 1, json!({ "n": n, format!("k{n}"): n, format!("k{}", n - 1): null })), T)
            .unwrap();
    }
    let record = core.state().agent("a").unwrap();
    assert_eq!(record.history().collect::<Vec<_>>(), [7, 8, 9, 10]);
    for n in 7..=10 {
        assert_eq!(*record.state_at(n).unwrap(), json!({ "n": n, format!("k{n}"): n }), "version {n}");
    }
    assert!(record.state_at(6).is_none());
    assert!(record.state_at(11).is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every retained version reads back exactly as a plain fold of the patches made it,
    /// whatever the patches (nested objects, deletions, type changes) and rollbacks.
    #[test]
    fn retained_versions_match_a_plain_fold(
        steps in prop::collection::vec(prop_oneof![
            4 => patch_strategy().prop_map(Ok),
            1 => (0u64..40).prop_map(Err),
        ], 1..40),
        history_len in 1usize..8,
    ) {
        let limits = Limits { history_len, ..Limits::default() };
        let mut core = Core::new(limits);
        core.execute(&hello("a", None), T).unwrap();
        let mut expected = vec![json!({})];
        for step in steps {
            let command = match step {
                Ok(patch) => checkpoint("a", 1, patch),
                Err(version) => Command::Agent(AgentCommand::Rollback { agent: agent("a"), incarnation: 1, target: RollbackTarget::Version(version) }),
            };
            let Ok(Decision { events, .. }) = core.execute(&command, T) else { continue };
            match &events[0] {
                Event::Checkpointed { patch, .. } => {
                    let mut next = expected.last().unwrap().clone();
                    merge_patch(&mut next, patch);
                    expected.push(next);
                }
                Event::RolledBack { target_version, .. } => {
                    expected.push(expected[*target_version as usize].clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let record = core.state().agent("a").unwrap();
        let history: Vec<u64> = record.history().collect();
        prop_assert_eq!(history.len(), history_len.min(expected.len()));
        prop_assert_eq!(*history.last().unwrap(), expected.len() as u64 - 1);
        for version in history {
            prop_assert_eq!(&*record.state_at(version).unwrap(), &expected[version as usize], "version {}", version);
        }
    }
}
