//! Tasks through the public `Core` API with a fake clock: submit, assignment by priority
//! and load, leases fenced by incarnation, redistribution at once when the holder is
//! declared down, attempts, cancel, deadline, replay.

use crate::tasks::*;
use crate::*;
use serde_json::json;
use std::collections::BTreeMap;

const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0 + ms)
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn spec(priority: Priority) -> TaskSpec {
    TaskSpec {
        role: RoleName::new("coder").unwrap(),
        priority,
        payload: json!({"write": "a parser"}),
        deadline: None,
        max_attempts: 3,
        idempotency_key: None,
    }
}

/// A core with `agents` of role `coder`, each said hello and beating (so eligible).
fn crew(agents: &[&str]) -> Core {
    let mut core = Core::new(Limits::default());
    for agent in agents {
        let hello = Hello {
            agent: name(agent),
            role: RoleName::new("coder").unwrap(),
            labels: BTreeMap::new(),
            incarnation: None,
        };
        core.execute(&Command::Hello(hello), at(0)).unwrap();
        core.heartbeat(at(0), &name(agent), 1, None).unwrap();
    }
    while core.poll_effect().is_some() {}
    core
}

fn submit(core: &mut Core, spec: TaskSpec, now: Timestamp) -> u64 {
    let events = core.execute(&Command::SubmitTask { spec }, now).unwrap();
    match &events[..] {
        [Event::TaskSubmitted { task, .. }] => *task,
        other => panic!("{other:?}"),
    }
}

/// Runs the commands `tick` asks for.
fn tick(core: &mut Core, now: Timestamp) -> Vec<Event> {
    let mut events = Vec::new();
    for command in core.tick(now) {
        events.extend(core.execute(&command, now).unwrap());
    }
    events
}

fn status(core: &Core, task: u64) -> TaskStatus {
    core.state().tasks().get(task).unwrap().status.clone()
}

fn holder(core: &Core, task: u64) -> (AgentName, u64) {
    match status(core, task) {
        TaskStatus::Running { agent, incarnation, .. } => (agent, incarnation),
        other => panic!("task {task} is {other:?}"),
    }
}

#[test]
fn a_second_submit_with_the_same_key_returns_the_first_task() {
    let mut core = crew(&[]);
    let keyed = TaskSpec { idempotency_key: Some("order-7".into()), ..spec(Priority::Normal) };
    let first = submit(&mut core, keyed.clone(), at(1));
    assert!(core.execute(&Command::SubmitTask { spec: keyed }, at(2)).unwrap().is_empty());
    assert_eq!(core.state().tasks().by_key("order-7").unwrap().id, first);
    assert_eq!(core.state().tasks().all().count(), 1);
    let bad = TaskSpec { max_attempts: 0, ..spec(Priority::Normal) };
    assert_eq!(core.execute(&Command::SubmitTask { spec: bad }, at(3)).unwrap_err().code(), "bad_task");
}

#[test]
fn critical_work_is_assigned_before_background_work() {
    let mut core = crew(&["a"]);
    let background = submit(&mut core, spec(Priority::Background), at(1));
    let normal = submit(&mut core, spec(Priority::Normal), at(2));
    let critical = submit(&mut core, spec(Priority::Critical), at(3));
    // One agent, one lease at a time: the critical task goes first.
    tick(&mut core, at(10));
    assert_eq!(holder(&core, critical).0, name("a"));
    assert_eq!((status(&core, normal), status(&core, background)), (TaskStatus::Pending, TaskStatus::Pending));
    assert!(core.poll_effect() == Some(Effect::OfferTask { agent: name("a"), incarnation: 1, task: critical }));
    core.execute(
        &Command::CompleteTask { task: critical, agent: name("a"), incarnation: 1, result: json!("ok") },
        at(20),
    )
    .unwrap();
    tick(&mut core, at(30));
    assert_eq!(holder(&core, normal).0, name("a"));
}

#[test]
fn tasks_spread_over_the_least_loaded_healthy_agents() {
    let mut core = crew(&["a", "b", "c"]);
    // c is quarantined, so it gets nothing.
    core.execute(&Command::Quarantine { agent: name("c"), reason: "test".into() }, at(1)).unwrap();
    let tasks: Vec<u64> = (0..3).map(|n| submit(&mut core, spec(Priority::Normal), at(2 + n))).collect();
    tick(&mut core, at(10));
    let holders: Vec<String> = tasks[..2].iter().map(|task| holder(&core, *task).0.to_string()).collect();
    assert_eq!(holders, ["a", "b"]);
    assert_eq!(status(&core, tasks[2]), TaskStatus::Pending, "no free healthy agent left");
}

#[test]
fn a_down_holder_loses_its_lease_at_once_and_the_task_resumes_elsewhere_with_its_steps() {
    let mut core = crew(&["a", "b"]);
    let task = submit(&mut core, spec(Priority::Normal), at(1));
    tick(&mut core, at(2));
    let (first, incarnation) = holder(&core, task);
    for step in ["plan", "draft"] {
        let commit =
            Command::CommitStep { task, agent: first.clone(), incarnation, name: step.into(), result: json!(step) };
        core.execute(&commit, at(3)).unwrap();
    }
    // The holder is declared down: the task is pending again, in the same fold.
    let down = Command::ReportDown { agent: first.clone(), incarnation, cause: supervision::Cause::Vanished };
    core.execute(&down, at(4)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Pending);
    tick(&mut core, at(5));
    let (second, second_incarnation) = holder(&core, task);
    assert_ne!(second, first);
    let found = core.state().tasks().get(task).unwrap();
    assert_eq!(found.attempts, 2);
    assert_eq!(found.steps.iter().map(|step| step.name.as_str()).collect::<Vec<_>>(), ["plan", "draft"]);
    // The old holder's late writes are refused; the new holder finishes.
    let late = Command::CompleteTask { task, agent: first.clone(), incarnation, result: json!("zombie") };
    assert_eq!(core.execute(&late, at(6)).unwrap_err().code(), "lease_lost");
    let step = Command::CommitStep { task, agent: first, incarnation, name: "x".into(), result: json!(1) };
    assert_eq!(core.execute(&step, at(6)).unwrap_err().code(), "lease_lost");
    let done = Command::CompleteTask { task, agent: second, incarnation: second_incarnation, result: json!("parser") };
    core.execute(&done, at(7)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Completed { result: json!("parser") });
}

#[test]
fn a_task_fails_when_its_attempts_run_out() {
    let mut core = crew(&["a"]);
    let task = submit(&mut core, TaskSpec { max_attempts: 2, ..spec(Priority::Normal) }, at(1));
    for attempt in 1..=2u64 {
        tick(&mut core, at(attempt * 10));
        let (agent, incarnation) = holder(&core, task);
        let fail = Command::FailTask { task, agent, incarnation, reason: format!("tool error {attempt}"), retry: true };
        core.execute(&fail, at(attempt * 10 + 1)).unwrap();
    }
    match status(&core, task) {
        TaskStatus::Failed { reason } => assert!(reason.contains("out of attempts (2)"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(tick(&mut core, at(100)).is_empty(), "a failed task is not assigned again");
}

#[test]
fn cancel_stops_a_task_and_tells_its_holder_and_deadlines_fail_tasks() {
    let mut core = crew(&["a"]);
    let task = submit(&mut core, spec(Priority::Normal), at(1));
    tick(&mut core, at(2));
    while core.poll_effect().is_some() {}
    core.execute(&Command::CancelTask { task }, at(3)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Cancelled);
    assert_eq!(core.poll_effect(), Some(Effect::CancelTask { agent: name("a"), incarnation: 1, task }));
    assert_eq!(core.execute(&Command::CancelTask { task }, at(4)).unwrap_err().code(), "task_ended");
    let late = Command::CompleteTask { task, agent: name("a"), incarnation: 1, result: json!(1) };
    assert_eq!(core.execute(&late, at(5)).unwrap_err().code(), "lease_lost");

    let due = submit(&mut core, TaskSpec { deadline: Some(at(1_000)), ..spec(Priority::Normal) }, at(6));
    tick(&mut core, at(10));
    assert!(matches!(status(&core, due), TaskStatus::Running { .. }));
    let events = tick(&mut core, at(1_000));
    assert!(events.contains(&Event::TaskFailed { task: due, reason: "past its deadline".into() }), "{events:?}");
}

#[test]
fn replaying_task_events_gives_the_live_state() {
    let mut live = crew(&["a", "b"]);
    let mut log: Vec<(Timestamp, Event)> = Vec::new();
    let start = live.state().clone();
    for n in 0..20u64 {
        let now = at(100 * n);
        let events = live
            .execute(
                &Command::SubmitTask { spec: spec(if n % 3 == 0 { Priority::Critical } else { Priority::Normal }) },
                now,
            )
            .unwrap();
        log.extend(events.into_iter().map(|event| (now, event)));
        let events = tick(&mut live, now);
        log.extend(events.into_iter().map(|event| (now, event)));
        if n % 4 == 3 {
            let (agent, incarnation) = (
                name(if n % 8 == 3 { "a" } else { "b" }),
                live.state().agent(if n % 8 == 3 { "a" } else { "b" }).unwrap().incarnation,
            );
            let events = live
                .execute(
                    &Command::ReportDown { agent: agent.clone(), incarnation, cause: supervision::Cause::Vanished },
                    now,
                )
                .unwrap();
            log.extend(events.into_iter().map(|event| (now, event)));
            let hello = Hello {
                agent: agent.clone(),
                role: RoleName::new("coder").unwrap(),
                labels: BTreeMap::new(),
                incarnation: None,
            };
            let events = live.execute(&Command::Hello(hello), now).unwrap();
            log.extend(events.into_iter().map(|event| (now, event)));
            live.heartbeat(now, &agent, incarnation + 1, None).unwrap();
        }
    }
    let mut replayed = Core::from_state(start, Limits::default());
    for (at, event) in &log {
        replayed.apply(*at, event);
    }
    assert_eq!(replayed.state(), live.state());
    assert!(live.state().tasks().all().any(|task| task.attempts > 1), "some task was redistributed");
}
