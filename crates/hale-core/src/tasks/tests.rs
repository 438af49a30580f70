//! Tasks through the public `Core` API with a fake clock: submit, assignment by priority
//! and load, leases fenced by incarnation, redistribution at once when the holder is
//! declared down, attempts, cancel, deadline, replay.

use crate::tasks::*;
use crate::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0 + ms)
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn role(text: &str) -> RoleName {
    RoleName::new(text).unwrap()
}

fn spec(priority: Priority) -> TaskSpec {
    TaskSpec { priority, ..TaskSpec::new(role("coder"), json!({"write": "a parser"})) }
}

/// A core with `agents` of role `coder`, each said hello and beating (so eligible).
fn crew(agents: &[&str]) -> Core {
    let roles: Vec<(&str, &str)> = agents.iter().map(|agent| (*agent, "coder")).collect();
    crew_of(&roles)
}

/// A core with agents of the given roles, each said hello and beating.
fn crew_of(agents: &[(&str, &str)]) -> Core {
    let mut core = Core::new(Limits::default());
    for (agent, of) in agents {
        let hello = Hello { agent: name(agent), role: role(of), labels: BTreeMap::new(), incarnation: None };
        core.execute(&Command::Agent(AgentCommand::Hello(hello)), at(0)).unwrap();
        core.heartbeat(at(0), &name(agent), 1, None).unwrap();
    }
    while core.poll_effect().is_some() {}
    core
}

fn commit(task: u64, holder: &(AgentName, u64), step: &str) -> Command {
    Command::Task(TaskCommand::CommitStep {
        task,
        agent: holder.0.clone(),
        incarnation: holder.1,
        name: step.into(),
        result: json!(step),
        llm: None,
        compensation: None,
        reservation: None,
    })
}

fn complete(task: u64, holder: &(AgentName, u64), result: Value) -> Command {
    Command::Task(TaskCommand::Complete { task, agent: holder.0.clone(), incarnation: holder.1, result })
}

fn submit(core: &mut Core, spec: TaskSpec, now: Timestamp) -> u64 {
    let events = core.execute(&Command::Task(TaskCommand::Submit { spec, by: None }), now).unwrap().events;
    match &events[..] {
        [Event::TaskSubmitted { task, .. }] => *task,
        other => panic!("{other:?}"),
    }
}

/// Runs the commands `tick` asks for.
fn tick(core: &mut Core, now: Timestamp) -> Vec<Event> {
    let mut events = Vec::new();
    for command in core.tick(now) {
        events.extend(core.execute(&command, now).unwrap().events);
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

/// Executes `command` at `now`, keeping its events in `log`.
fn logged(core: &mut Core, log: &mut Vec<(Timestamp, Event)>, command: &Command, now: Timestamp) -> Decision {
    let decision = core.execute(command, now).unwrap();
    log.extend(decision.events.iter().map(|event| (now, event.clone())));
    decision
}

#[test]
fn the_submitter_is_owed_each_outcome_until_it_takes_it_and_only_its_own() {
    let mut core = crew_of(&[("orch", "orchestrator"), ("a", "coder")]);
    let start = core.state().clone();
    let mut log = Vec::new();
    let by = |agent: &str| Command::Task(TaskCommand::Submit { spec: spec(Priority::Normal), by: Some(name(agent)) });
    let number = |decision: Decision| match decision.answer {
        Answer::TaskSubmitted { task, .. } => task,
        other => panic!("{other:?}"),
    };
    let done = number(logged(&mut core, &mut log, &by("orch"), at(1)));
    let cancelled = number(logged(&mut core, &mut log, &by("orch"), at(1)));
    let anonymous = Command::Task(TaskCommand::Submit { spec: spec(Priority::Normal), by: None });
    let anonymous = number(logged(&mut core, &mut log, &anonymous, at(1)));
    let owed = |core: &Core| core.state().tasks().owed_to(&name("orch")).map(|task| task.id).collect::<Vec<_>>();
    assert!(owed(&core).is_empty(), "nothing has ended");
    for command in core.tick(at(2)) {
        logged(&mut core, &mut log, &command, at(2));
    }
    let runner = holder(&core, done);
    while core.poll_effect().is_some() {}
    logged(&mut core, &mut log, &complete(done, &runner, json!({"parser": "ok"})), at(3));
    assert!(
        std::iter::from_fn(|| core.poll_effect()).any(|effect| effect == Effect::DeliverMail { agent: name("orch") }),
        "the submitter's sessions are told"
    );
    for task in [cancelled, anonymous] {
        logged(&mut core, &mut log, &Command::Task(TaskCommand::Cancel { task }), at(4));
    }
    assert_eq!(owed(&core), [done, cancelled], "an operator's task is owed to no one");

    let take = |agent: &str, task| Command::Task(TaskCommand::TakeOutcome { agent: name(agent), incarnation: 1, task });
    assert_eq!(core.execute(&take("a", done), at(5)).unwrap_err().code(), "unknown_task", "only the submitter's");
    let taken = logged(&mut core, &mut log, &take("orch", done), at(5)).events;
    assert_eq!(taken, [Event::OutcomeTaken { agent: name("orch"), task: done }]);
    assert!(core.execute(&take("orch", done), at(6)).unwrap().events.is_empty(), "idempotent");
    assert_eq!(owed(&core), [cancelled]);

    // Replayed from the log, the same debts.
    let mut replayed = Core::from_state(start, Limits::default());
    for (at, event) in &log {
        replayed.apply(*at, event);
    }
    assert_eq!(replayed.state(), core.state());
}

#[test]
fn a_retry_goes_to_another_agent_when_one_has_room_and_back_when_none_has() {
    let mut core = crew(&["a", "b"]);
    let retried = TaskSpec { max_attempts: 4, ..spec(Priority::Normal) };
    let task = submit(&mut core, retried, at(1));
    let fail = |core: &mut Core, holder: &(AgentName, u64), now| {
        let command = TaskCommand::Fail {
            task,
            agent: holder.0.clone(),
            incarnation: holder.1,
            reason: "the tool broke".into(),
            retry: true,
        };
        core.execute(&Command::Task(command), now).unwrap();
    };
    let first = assigned(&mut core, task, at(2));
    fail(&mut core, &first, at(3));
    let second = assigned(&mut core, task, at(4));
    assert_ne!(second.0, first.0, "the retry went back to the agent whose attempt failed");
    fail(&mut core, &second, at(5));
    let third = assigned(&mut core, task, at(6));
    assert_eq!(third.0, first.0, "and then away from the second");
    // With the other agent busy, the retry does not wait for it.
    let other = submit(&mut core, spec(Priority::Normal), at(7));
    tick(&mut core, at(7));
    assert_ne!(holder(&core, other).0, third.0, "the other task went to the free agent");
    fail(&mut core, &third, at(8));
    tick(&mut core, at(9));
    assert_eq!(holder(&core, task).0, third.0, "the retry took the only agent with room");
}

#[test]
fn a_second_submit_with_the_same_key_returns_the_first_task() {
    let mut core = crew(&[]);
    let keyed = TaskSpec { idempotency_key: Some("order-7".into()), ..spec(Priority::Normal) };
    let first = submit(&mut core, keyed.clone(), at(1));
    let again = core.execute(&Command::Task(TaskCommand::Submit { spec: keyed, by: None }), at(2)).unwrap();
    assert!(again.events.is_empty(), "a resubmit logs nothing");
    assert_eq!(again.answer, Answer::TaskSubmitted { task: first, new: false }, "and answers with the first task");
    assert_eq!(core.state().tasks().by_key("order-7").unwrap().id, first);
    assert_eq!(core.state().tasks().all().count(), 1);
    let bad = TaskSpec { max_attempts: 0, ..spec(Priority::Normal) };
    assert_eq!(
        core.execute(&Command::Task(TaskCommand::Submit { spec: bad, by: None }), at(3)).unwrap_err().code(),
        "bad_task"
    );
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
        &Command::Task(TaskCommand::Complete { task: critical, agent: name("a"), incarnation: 1, result: json!("ok") }),
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
    core.execute(&Command::Health(HealthCommand::Quarantine { agent: name("c"), reason: "test".into() }), at(1))
        .unwrap();
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
        core.execute(&commit(task, &(first.clone(), incarnation), step), at(3)).unwrap();
    }
    // The holder is declared down: the task is pending again, in the same fold.
    let down = Command::Supervision(SupervisionCommand::ReportDown {
        agent: first.clone(),
        incarnation,
        cause: supervision::Cause::Vanished,
    });
    core.execute(&down, at(4)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Pending);
    tick(&mut core, at(5));
    let (second, second_incarnation) = holder(&core, task);
    assert_ne!(second, first);
    let found = core.state().tasks().get(task).unwrap();
    assert_eq!(found.attempts, 2);
    assert_eq!(found.steps.iter().map(|step| step.name.as_str()).collect::<Vec<_>>(), ["plan", "draft"]);
    // The old holder's late writes are refused; the new holder finishes.
    let late =
        Command::Task(TaskCommand::Complete { task, agent: first.clone(), incarnation, result: json!("zombie") });
    assert_eq!(core.execute(&late, at(6)).unwrap_err().code(), "lease_lost");
    assert_eq!(core.execute(&commit(task, &(first, incarnation), "x"), at(6)).unwrap_err().code(), "lease_lost");
    let done = Command::Task(TaskCommand::Complete {
        task,
        agent: second,
        incarnation: second_incarnation,
        result: json!("parser"),
    });
    core.execute(&done, at(7)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Completed { result: json!("parser"), level: Level::Optimal });
}

#[test]
fn a_task_fails_when_its_attempts_run_out() {
    let mut core = crew(&["a"]);
    let task = submit(&mut core, TaskSpec { max_attempts: 2, ..spec(Priority::Normal) }, at(1));
    for attempt in 1..=2u64 {
        tick(&mut core, at(attempt * 10));
        let (agent, incarnation) = holder(&core, task);
        let fail = Command::Task(TaskCommand::Fail {
            task,
            agent,
            incarnation,
            reason: format!("tool error {attempt}"),
            retry: true,
        });
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
    core.execute(&Command::Task(TaskCommand::Cancel { task }), at(3)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Cancelled);
    assert_eq!(core.poll_effect(), Some(Effect::CancelTask { agent: name("a"), incarnation: 1, task }));
    assert_eq!(core.execute(&Command::Task(TaskCommand::Cancel { task }), at(4)).unwrap_err().code(), "task_ended");
    let late = Command::Task(TaskCommand::Complete { task, agent: name("a"), incarnation: 1, result: json!(1) });
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
                &Command::Task(TaskCommand::Submit {
                    spec: spec(if n % 3 == 0 { Priority::Critical } else { Priority::Normal }),
                    by: None,
                }),
                now,
            )
            .unwrap()
            .events;
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
                    &Command::Supervision(SupervisionCommand::ReportDown {
                        agent: agent.clone(),
                        incarnation,
                        cause: supervision::Cause::Vanished,
                    }),
                    now,
                )
                .unwrap()
                .events;
            log.extend(events.into_iter().map(|event| (now, event)));
            let hello = Hello {
                agent: agent.clone(),
                role: RoleName::new("coder").unwrap(),
                labels: BTreeMap::new(),
                incarnation: None,
            };
            let events = live.execute(&Command::Agent(AgentCommand::Hello(hello)), now).unwrap().events;
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

/// Runs `tick` and returns the holder `task` got.
fn assigned(core: &mut Core, task: u64, now: Timestamp) -> (AgentName, u64) {
    tick(core, now);
    holder(core, task)
}

#[test]
fn a_step_left_at_intent_by_a_lost_attempt_is_handed_on_as_uncertain() {
    let mut core = crew(&["a", "b"]);
    let task = submit(&mut core, spec(Priority::Normal), at(1));
    let first = assigned(&mut core, task, at(2));
    let intend = |name: &str, who: &(AgentName, u64)| {
        Command::Task(TaskCommand::IntendStep { task, agent: who.0.clone(), incarnation: who.1, name: name.into() })
    };
    let llm = LlmCall {
        model: "claude".into(),
        model_version: Some("2026-10".into()),
        temperature: Some(0.0),
        prompt_hash: Some("sha256:ab12".into()),
        tokens_in: Some(1200),
        tokens_out: Some(300),
        ..LlmCall::default()
    };
    core.execute(&intend("charge-card", &first), at(3)).unwrap();
    let mut done = commit(task, &first, "charge-card");
    if let Command::Task(TaskCommand::CommitStep { llm: record, .. }) = &mut done {
        *record = Some(llm.clone());
    }
    core.execute(&done, at(4)).unwrap();
    core.execute(&intend("send-email", &first), at(5)).unwrap();
    // An intent for a step already done is refused: its result is known.
    assert_eq!(core.execute(&intend("charge-card", &first), at(5)).unwrap_err().code(), "step_done");
    // The holder dies between the intent and the done.
    core.execute(
        &Command::Supervision(SupervisionCommand::ReportDown {
            agent: first.0.clone(),
            incarnation: first.1,
            cause: supervision::Cause::Vanished,
        }),
        at(6),
    )
    .unwrap();
    let second = assigned(&mut core, task, at(7));
    assert_ne!(second.0, first.0);
    let steps = &core.state().tasks().get(task).unwrap().steps;
    let states: Vec<(&str, StepState)> = steps.iter().map(|step| (step.name.as_str(), step.state)).collect();
    assert_eq!(states, [("charge-card", StepState::Done), ("send-email", StepState::Uncertain)]);
    assert_eq!(steps[0].llm.as_ref(), Some(&llm));
    // The next attempt reconciles and commits it.
    core.execute(&commit(task, &second, "send-email"), at(8)).unwrap();
    let steps = &core.state().tasks().get(task).unwrap().steps;
    assert_eq!(steps[1].state, StepState::Done);
    assert_eq!(steps[1].attempt, 2);
}

#[test]
fn a_retry_backs_off_and_a_cancel_during_the_backoff_stops_the_next_attempt() {
    let mut core = crew(&["a"]);
    let task = submit(&mut core, TaskSpec { retry_backoff_ms: 1_000, ..spec(Priority::Normal) }, at(1));
    let first = assigned(&mut core, task, at(2));
    let fail = Command::Task(TaskCommand::Fail {
        task,
        agent: first.0,
        incarnation: first.1,
        reason: "rate limited".into(),
        retry: true,
    });
    core.execute(&fail, at(10)).unwrap();
    assert_eq!(core.state().tasks().get(task).unwrap().not_before, Some(at(1_010)));
    tick(&mut core, at(500));
    assert_eq!(status(&core, task), TaskStatus::Pending, "still backing off");
    // The second failure doubles the wait.
    let second = assigned(&mut core, task, at(1_010));
    let fail = Command::Task(TaskCommand::Fail {
        task,
        agent: second.0,
        incarnation: second.1,
        reason: "again".into(),
        retry: true,
    });
    core.execute(&fail, at(1_100)).unwrap();
    assert_eq!(core.state().tasks().get(task).unwrap().not_before, Some(at(3_100)));
    // Cancelled while it waits: it never runs again.
    core.execute(&Command::Task(TaskCommand::Cancel { task }), at(1_200)).unwrap();
    for now in [3_100, 10_000, 100_000] {
        tick(&mut core, at(now));
        assert_eq!(status(&core, task), TaskStatus::Cancelled);
    }
    assert_eq!(core.state().tasks().get(task).unwrap().attempts, 2);
}

/// Commits `steps` on `holder`, each with a compensation.
fn commit_compensable(core: &mut Core, task: u64, holder: &(AgentName, u64), steps: &[&str], now: Timestamp) {
    for step in steps {
        let mut command = commit(task, holder, step);
        if let Command::Task(TaskCommand::CommitStep { compensation, .. }) = &mut command {
            *compensation = Some(json!({"undo": step}));
        }
        core.execute(&command, now).unwrap();
    }
}

/// The step a compensation task undoes.
fn compensates(core: &Core, task: u64) -> String {
    match &core.state().tasks().get(task).unwrap().parent {
        Some(Parent::Compensation { step, .. }) => step.clone(),
        other => panic!("task {task} is no compensation: {other:?}"),
    }
}

#[test]
fn a_cancelled_task_runs_its_compensations_in_reverse_order_then_ends_cancelled() {
    let mut core = crew(&["a", "b"]);
    let task = submit(&mut core, spec(Priority::Normal), at(1));
    let first = assigned(&mut core, task, at(2));
    commit_compensable(&mut core, task, &first, &["reserve-flight", "reserve-hotel"], at(3));
    core.execute(&commit(task, &first, "plan"), at(3)).unwrap(); // nothing to undo
    while core.poll_effect().is_some() {}
    core.execute(&Command::Task(TaskCommand::Cancel { task }), at(4)).unwrap();
    // The holder is told to stop; the task waits for its compensations.
    assert_eq!(core.poll_effect(), Some(Effect::CancelTask { agent: first.0.clone(), incarnation: first.1, task }));
    let mut order = Vec::new();
    for round in 0..2u64 {
        let TaskStatus::Compensating { child, outcome, .. } = status(&core, task) else {
            panic!("{:?}", status(&core, task))
        };
        assert_eq!(outcome, Outcome::Cancelled);
        order.push(compensates(&core, child));
        let runner = assigned(&mut core, child, at(10 + round));
        let payload = &core.state().tasks().get(child).unwrap().spec.payload;
        assert_eq!(payload["compensate"]["compensation"], json!({"undo": order.last().unwrap()}));
        core.execute(&complete(child, &runner, json!("undone")), at(11 + round)).unwrap();
    }
    assert_eq!(order, ["reserve-hotel", "reserve-flight"]);
    assert_eq!(status(&core, task), TaskStatus::Cancelled);
    // A second cancel finds it ended.
    assert_eq!(core.execute(&Command::Task(TaskCommand::Cancel { task }), at(20)).unwrap_err().code(), "task_ended");
}

#[test]
fn a_task_out_of_attempts_compensates_then_fails_and_a_failed_compensation_is_recorded() {
    let mut core = crew(&["a"]);
    let task = submit(&mut core, TaskSpec { max_attempts: 1, ..spec(Priority::Normal) }, at(1));
    let first = assigned(&mut core, task, at(2));
    commit_compensable(&mut core, task, &first, &["one", "two"], at(3));
    core.execute(
        &Command::Supervision(SupervisionCommand::ReportDown {
            agent: first.0.clone(),
            incarnation: first.1,
            cause: supervision::Cause::Vanished,
        }),
        at(4),
    )
    .unwrap();
    // Out of attempts: the next tick fails it, which starts the compensations.
    let hello = Hello { agent: name("a"), role: role("coder"), labels: BTreeMap::new(), incarnation: None };
    core.execute(&Command::Agent(AgentCommand::Hello(hello)), at(5)).unwrap();
    core.heartbeat(at(5), &name("a"), 2, None).unwrap();
    tick(&mut core, at(6));
    let TaskStatus::Compensating { child, .. } = status(&core, task) else { panic!("{:?}", status(&core, task)) };
    assert_eq!(compensates(&core, child), "two");
    let runner = assigned(&mut core, child, at(7));
    let give_up = Command::Task(TaskCommand::Fail {
        task: child,
        agent: runner.0,
        incarnation: runner.1,
        reason: "hotel API gone".into(),
        retry: false,
    });
    core.execute(&give_up, at(8)).unwrap();
    let TaskStatus::Compensating { child, .. } = status(&core, task) else { panic!("{:?}", status(&core, task)) };
    assert_eq!(compensates(&core, child), "one");
    let runner = assigned(&mut core, child, at(9));
    core.execute(&complete(child, &runner, json!("undone")), at(10)).unwrap();
    match status(&core, task) {
        TaskStatus::Failed { reason } => assert!(reason.contains("out of attempts (1)"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(core.state().tasks().get(task).unwrap().compensation_errors, ["two: hotel API gone"]);
}

#[test]
fn a_shadowed_task_runs_on_distinct_agents_and_the_first_result_wins() {
    let mut core = crew(&["a", "b", "c"]);
    let shadowed = TaskSpec { shadow: Some(Shadow { count: 2, quorum: None }), ..spec(Priority::Critical) };
    let task = submit_all(&mut core, shadowed, at(1));
    let TaskStatus::Shadowed { children } = status(&core, task) else { panic!("{:?}", status(&core, task)) };
    tick(&mut core, at(2));
    let holders: Vec<(AgentName, u64)> = children.iter().map(|child| holder(&core, *child)).collect();
    assert_ne!(holders[0].0, holders[1].0, "runs go to distinct agents");
    // The second run commits a compensable step, then the first run wins.
    commit_compensable(&mut core, children[1], &holders[1], &["draft"], at(3));
    core.execute(&complete(children[0], &holders[0], json!("verdict: true")), at(4)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Completed { result: json!("verdict: true"), level: Level::Optimal });
    // The loser is cancelled, through its compensation; its late result does not count.
    assert!(matches!(status(&core, children[1]), TaskStatus::Compensating { .. }));
    let late = complete(children[1], &holders[1], json!("verdict: false"));
    assert_eq!(core.execute(&late, at(5)).unwrap_err().code(), "lease_lost");
}

/// Submits and returns the number of the task (not of its runs).
fn submit_all(core: &mut Core, spec: TaskSpec, now: Timestamp) -> u64 {
    match core.execute(&Command::Task(TaskCommand::Submit { spec, by: None }), now).unwrap().answer {
        Answer::TaskSubmitted { task, new: true } => task,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_quorum_of_equal_results_wins_and_the_dissent_is_recorded() {
    let mut core = crew(&["a", "b", "c"]);
    let shadowed = TaskSpec { shadow: Some(Shadow { count: 3, quorum: Some(2) }), ..spec(Priority::Critical) };
    let task = submit_all(&mut core, shadowed, at(1));
    let TaskStatus::Shadowed { children } = status(&core, task) else { panic!() };
    tick(&mut core, at(2));
    let holders: Vec<(AgentName, u64)> = children.iter().map(|child| holder(&core, *child)).collect();
    core.execute(&complete(children[0], &holders[0], json!({"claim": "false"})), at(3)).unwrap();
    assert!(matches!(status(&core, task), TaskStatus::Shadowed { .. }), "one result is no quorum");
    core.execute(&complete(children[1], &holders[1], json!({"claim": "true"})), at(4)).unwrap();
    core.execute(&complete(children[2], &holders[2], json!({"claim": "true"})), at(5)).unwrap();
    assert_eq!(status(&core, task), TaskStatus::Completed { result: json!({"claim": "true"}), level: Level::Optimal });
    let arbitration = core.state().tasks().get(task).unwrap().arbitration.clone().unwrap();
    assert_eq!((arbitration.agreed, arbitration.dissent), (vec![children[1], children[2]], vec![children[0]]));

    // Three different answers can never make a quorum of two out of three: it fails.
    let shadowed = TaskSpec { shadow: Some(Shadow { count: 3, quorum: Some(2) }), ..spec(Priority::Critical) };
    let task = submit_all(&mut core, shadowed, at(10));
    let TaskStatus::Shadowed { children } = status(&core, task) else { panic!() };
    tick(&mut core, at(11));
    for (n, child) in children.iter().enumerate() {
        let runner = holder(&core, *child);
        core.execute(&complete(*child, &runner, json!(n)), at(12)).unwrap();
    }
    match status(&core, task) {
        TaskStatus::Failed { reason } => assert!(reason.contains("no quorum"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_healthy_agent_of_a_role_the_task_falls_back_and_says_at_what_level() {
    let mut core = crew_of(&[("big", "code-generator"), ("small", "code-generator-small")]);
    let laddered = TaskSpec {
        fallback: vec![
            Rung { role: role("code-generator-small"), level: Level::GoodEnough },
            Rung { role: role("template"), level: Level::Minimal },
        ],
        ..TaskSpec::new(role("code-generator"), json!("write a parser"))
    };
    // While the big model serves, it gets the work.
    let first = submit(&mut core, laddered.clone(), at(1));
    assert_eq!(assigned(&mut core, first, at(2)).0, name("big"));
    let lose_big = |core: &mut Core, now| {
        let incarnation = core.state().agent("big").unwrap().incarnation;
        let cause = supervision::Cause::Vanished;
        let down = SupervisionCommand::ReportDown { agent: name("big"), incarnation, cause };
        core.execute(&Command::Supervision(down), now).unwrap();
    };
    // The big model is lost: the task waits for it, for the grace.
    lose_big(&mut core, at(3));
    let events = tick(&mut core, at(4));
    assert!(events.iter().any(|event| matches!(event, Event::ModeChanged { mode: Mode::Degraded, .. })), "{events:?}");
    assert_eq!(core.state().mode(), Mode::Degraded);
    assert_eq!(status(&core, first), TaskStatus::Pending, "no fallback at once");
    // It comes back within the grace, and gets the task again.
    let hello = Hello { agent: name("big"), role: role("code-generator"), labels: BTreeMap::new(), incarnation: None };
    core.execute(&Command::Agent(AgentCommand::Hello(hello)), at(500)).unwrap();
    core.heartbeat(at(500), &name("big"), 2, None).unwrap();
    tick(&mut core, at(600));
    assert_eq!(holder(&core, first), (name("big"), 2), "the full agent, back within the grace");
    // Lost again and not back: the task falls back once the grace (2 s) is over.
    lose_big(&mut core, at(700));
    let small_beats = |core: &mut Core, now| core.heartbeat(now, &name("small"), 1, None).unwrap();
    for now in (701..=2_700).step_by(333) {
        small_beats(&mut core, at(now));
        tick(&mut core, at(now));
    }
    assert_eq!(status(&core, first), TaskStatus::Pending, "within the grace");
    small_beats(&mut core, at(2_701));
    tick(&mut core, at(2_701));
    let small = holder(&core, first);
    assert_eq!(small.0, name("small"));
    core.execute(&complete(first, &small, json!("fn parse() {}")), at(2_705)).unwrap();
    assert_eq!(
        status(&core, first),
        TaskStatus::Completed { result: json!("fn parse() {}"), level: Level::GoodEnough }
    );
    // A busy rung is waited for, not skipped: with "small" busy, a second task waits.
    let second = submit(&mut core, laddered.clone(), at(2_706));
    let third = submit(&mut core, laddered, at(2_706));
    small_beats(&mut core, at(2_707));
    tick(&mut core, at(2_707));
    assert_eq!(holder(&core, second).0, name("small"));
    assert_eq!(status(&core, third), TaskStatus::Pending);
}

#[test]
fn load_shedding_refuses_background_then_normal_but_accepts_critical() {
    let mut core = crew(&[]);
    let settings = LivenessSettings {
        tasks: TaskSettings { shed_background_at: 2, shed_normal_at: 3, ..TaskSettings::default() },
        ..LivenessSettings::default()
    };
    core.set_liveness_settings(settings);
    submit(&mut core, spec(Priority::Background), at(1));
    submit(&mut core, spec(Priority::Normal), at(1));
    let refused = core
        .execute(&Command::Task(TaskCommand::Submit { spec: spec(Priority::Background), by: None }), at(2))
        .unwrap_err();
    assert_eq!(refused.code(), "overloaded");
    assert!(refused.to_string().contains("retry in 2000 ms"), "{refused}");
    submit(&mut core, spec(Priority::Normal), at(3));
    let refused = core
        .execute(&Command::Task(TaskCommand::Submit { spec: spec(Priority::Normal), by: None }), at(4))
        .unwrap_err();
    assert_eq!(refused.code(), "overloaded");
    // High and critical work still get in.
    submit(&mut core, spec(Priority::High), at(5));
    for n in 0..5 {
        submit(&mut core, spec(Priority::Critical), at(6 + n));
    }
    assert_eq!(core.state().tasks().queued(), 9);
}

#[test]
fn a_reservation_over_the_budget_is_refused_and_a_breach_opens_the_breaker_and_moves_the_work() {
    let mut core = crew(&["a", "b"]);
    let budgeted =
        TaskSpec { budget: Some(Budget { tokens: Some(1_000), cost: None, wall_ms: None }), ..spec(Priority::Normal) };
    let task = submit(&mut core, budgeted, at(1));
    let other = submit(&mut core, spec(Priority::Normal), at(1));
    let runner = assigned(&mut core, task, at(2));
    let spend = |tokens| Spend { tokens, cost: 0 };
    let reserve = |tokens| {
        Command::Budget(BudgetCommand::Reserve {
            agent: runner.0.clone(),
            incarnation: runner.1,
            task: Some(task),
            spend: spend(tokens),
        })
    };
    let reserved = core.execute(&reserve(600), at(3)).unwrap();
    let Event::BudgetReserved { reservation, .. } = reserved.events[0] else { panic!("{reserved:?}") };
    assert_eq!(reserved.answer, Answer::Reserved { reservation }, "the answer names the reservation logged");
    // 600 reserved: another 600 would go over 1,000.
    assert_eq!(core.execute(&reserve(600), at(4)).unwrap_err().code(), "over_budget");
    let report = Command::Budget(BudgetCommand::ReportSpend {
        agent: runner.0.clone(),
        incarnation: runner.1,
        task: Some(task),
        reservation: Some(reservation),
        spend: spend(500),
    });
    core.execute(&report, at(5)).unwrap();
    assert_eq!(core.state().tasks().get(task).unwrap().spent, spend(500));
    assert_eq!(core.state().tasks().get(task).unwrap().reserved, spend(0));
    // The run then spends more than it reserved, and more than the task may: a breach.
    let report = Command::Budget(BudgetCommand::ReportSpend {
        agent: runner.0.clone(),
        incarnation: runner.1,
        task: Some(task),
        reservation: None,
        spend: spend(700),
    });
    let events = core.execute(&report, at(6)).unwrap().events;
    assert!(events.iter().any(|event| matches!(event, Event::BudgetBreached { .. })), "{events:?}");
    match status(&core, task) {
        TaskStatus::Failed { reason } => assert!(reason.contains("over its budget"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let record = core.state().agent(runner.0.as_str()).unwrap();
    assert!(matches!(record.health.breaker, health::Breaker::Open { .. }));
    // The other task goes to the agent whose breaker is closed.
    let other_holder = assigned(&mut core, other, at(7));
    assert_ne!(other_holder.0, runner.0);
}

#[test]
fn a_steps_model_tokens_are_spent_in_its_commit_and_a_done_step_is_immutable() {
    let mut core = crew(&["a", "b"]);
    let budgeted =
        TaskSpec { budget: Some(Budget { tokens: Some(1_000), cost: None, wall_ms: None }), ..spec(Priority::Normal) };
    let task = submit(&mut core, budgeted, at(1));
    let runner = assigned(&mut core, task, at(2));
    let with_tokens = |step: &str, tokens_in: u64, tokens_out: u64, reservation: Option<u64>| {
        let llm = LlmCall {
            model: "m".into(),
            tokens_in: Some(tokens_in),
            tokens_out: Some(tokens_out),
            ..LlmCall::default()
        };
        Command::Task(TaskCommand::CommitStep {
            task,
            agent: runner.0.clone(),
            incarnation: runner.1,
            name: step.into(),
            result: json!(step),
            llm: Some(llm),
            compensation: None,
            reservation,
        })
    };
    let reserve = Command::Budget(BudgetCommand::Reserve {
        agent: runner.0.clone(),
        incarnation: runner.1,
        task: Some(task),
        spend: Spend { tokens: 500, cost: 0 },
    });
    let reserved = core.execute(&reserve, at(3)).unwrap();
    let Answer::Reserved { reservation } = reserved.answer else { panic!("{reserved:?}") };
    // The step settles its reservation and spends its tokens in one decision.
    let events = core.execute(&with_tokens("outline", 300, 100, Some(reservation)), at(4)).unwrap().events;
    assert_eq!(events.iter().map(Event::kind).collect::<Vec<_>>(), ["step_committed", "spend_reported"], "{events:?}");
    let found = core.state().tasks().get(task).unwrap();
    assert_eq!((found.spent, found.reserved), (Spend { tokens: 400, cost: 0 }, Spend::default()));

    // The same commit again (a resend after a lost connection) logs nothing and spends
    // nothing; another result for a done step is refused.
    let again = core.execute(&with_tokens("outline", 300, 100, None), at(5)).unwrap();
    assert!(again.events.is_empty(), "{again:?}");
    assert_eq!(again.answer, Answer::Done);
    assert_eq!(core.state().tasks().get(task).unwrap().spent.tokens, 400);
    let changed = core.execute(&with_tokens("outline", 300, 101, None), at(6)).unwrap_err();
    assert_eq!(changed.code(), "step_done");
    let mut other_result = with_tokens("outline", 300, 100, None);
    if let Command::Task(TaskCommand::CommitStep { result, .. }) = &mut other_result {
        *result = json!("another outline");
    }
    assert_eq!(core.execute(&other_result, at(6)).unwrap_err().code(), "step_done");

    // A step whose model call takes the task over its budget fails the task, as a report
    // of spending would.
    let events = core.execute(&with_tokens("draft", 500, 200, None), at(7)).unwrap().events;
    assert!(events.iter().any(|event| matches!(event, Event::BudgetBreached { .. })), "{events:?}");
    assert!(matches!(status(&core, task), TaskStatus::Failed { .. }), "{:?}", status(&core, task));
}

#[test]
fn an_agent_budget_counts_per_period_and_a_breach_can_quarantine() {
    let mut core = Core::new(Limits::default());
    core.set_liveness_settings(LivenessSettings {
        tasks: TaskSettings { quarantine_on_budget_breach: true, ..TaskSettings::default() },
        ..LivenessSettings::default()
    });
    let supervision = supervision::Supervision {
        budget: Some(budget::AgentBudget { tokens: None, cost: Some(100), period_ms: 60_000 }),
        ..supervision::Supervision::default()
    };
    let declare = Command::Supervision(SupervisionCommand::Declare {
        agent: name("a"),
        role: role("coder"),
        labels: BTreeMap::new(),
        supervision,
    });
    core.execute(&declare, at(0)).unwrap();
    core.execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name("a") }), at(0)).unwrap();
    let spend = |cost| Spend { tokens: 0, cost };
    let report = |cost| {
        Command::Budget(BudgetCommand::ReportSpend {
            agent: name("a"),
            incarnation: 1,
            task: None,
            reservation: None,
            spend: spend(cost),
        })
    };
    core.execute(&report(80), at(1)).unwrap();
    let reserve = |cost| {
        Command::Budget(BudgetCommand::Reserve { agent: name("a"), incarnation: 1, task: None, spend: spend(cost) })
    };
    assert_eq!(core.execute(&reserve(30), at(2)).unwrap_err().code(), "over_budget");
    // With its whole budget used, the agent gets no work (it would only breach).
    core.heartbeat(at(2), &name("a"), 1, None).unwrap();
    core.execute(&report(20), at(3)).unwrap();
    let waiting = submit(&mut core, spec(Priority::Normal), at(4));
    tick(&mut core, at(5));
    assert_eq!(status(&core, waiting), TaskStatus::Pending, "an agent out of budget gets no work");
    // A new period starts a minute after the first spend.
    core.execute(&reserve(30), at(60_001)).unwrap();
    let events = core.execute(&report(120), at(60_002)).unwrap().events;
    assert!(
        events.iter().any(|event| matches!(event, Event::Quarantined { by: health::Reporter::Hale, .. })),
        "{events:?}"
    );
    assert!(core.state().agent("a").unwrap().health.quarantine.is_some());
}

#[test]
fn a_wall_time_budget_fails_a_task_that_runs_too_long() {
    let mut core = crew(&["a"]);
    let budgeted =
        TaskSpec { budget: Some(Budget { wall_ms: Some(5_000), ..Budget::default() }), ..spec(Priority::Normal) };
    let task = submit(&mut core, budgeted, at(1));
    assigned(&mut core, task, at(1_000));
    for now in (1_500..6_000).step_by(500) {
        core.heartbeat(at(now), &name("a"), 1, None).unwrap();
    }
    tick(&mut core, at(5_999));
    assert!(matches!(status(&core, task), TaskStatus::Running { .. }));
    tick(&mut core, at(6_000));
    match status(&core, task) {
        TaskStatus::Failed { reason } => assert!(reason.contains("wall-time budget"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
