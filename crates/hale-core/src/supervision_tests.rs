//! Supervision and liveness through the public `Core` API, with a fake clock: every `now`
//! is a number the test chooses.

use crate::policy::{Backoff, Intensity};
use crate::supervision::*;
use crate::*;
use std::collections::BTreeMap;

const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0 + ms)
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn worker() -> RoleName {
    RoleName::new("worker").unwrap()
}

fn spec(restart: RestartPolicy) -> Supervision {
    Supervision { restart, ..Supervision::default() }
}

fn declare(core: &mut Core, agent: &str, supervision: Supervision, now: Timestamp) {
    let command = Command::Supervision(SupervisionCommand::Declare {
        agent: name(agent),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        supervision,
    });
    core.execute(&command, now).unwrap();
}

fn effects(core: &mut Core) -> Vec<Effect> {
    std::iter::from_fn(|| core.poll_effect()).collect()
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(Event::kind).collect()
}

fn crash(core: &mut Core, agent: &str, now: Timestamp) -> Vec<Event> {
    let incarnation = core.state().agent(agent).unwrap().incarnation;
    let cause = Cause::Exited { code: None, signal: Some(9) };
    core.execute(&Command::Supervision(SupervisionCommand::ReportDown { agent: name(agent), incarnation, cause }), now)
        .unwrap()
        .events
}

fn status(core: &Core, agent: &str) -> ManagedStatus {
    core.state().agent(agent).unwrap().managed.as_ref().unwrap().status.clone()
}

/// A declared and started managed agent, with its effects drained.
fn running(agent: &str, supervision: Supervision) -> Core {
    let mut core = Core::new(Limits::default());
    core.set_seed(7);
    declare(&mut core, agent, supervision, at(0));
    core.execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name(agent) }), at(0)).unwrap();
    let process = ProcessRef { pid: 100, start_ticks: 1 };
    core.execute(
        &Command::Supervision(SupervisionCommand::ProcessStarted { agent: name(agent), incarnation: 1, process }),
        at(1),
    )
    .unwrap();
    effects(&mut core);
    core
}

/// Runs every command `tick` asks for, as the shell does.
/// Runs the commands `tick` asks for; returns their events, except mode changes (the
/// tasks tests cover those).
fn tick(core: &mut Core, now: Timestamp) -> Vec<Event> {
    let mut events = Vec::new();
    for command in core.tick(now) {
        events.extend(core.execute(&command, now).unwrap().events);
    }
    events.retain(|event| !matches!(event, Event::ModeChanged { .. }));
    events
}

#[test]
fn a_declared_agent_starts_as_incarnation_one_and_is_spawned() {
    let mut core = Core::new(Limits::default());
    declare(&mut core, "a", spec(RestartPolicy::Always), at(0));
    assert_eq!(status(&core, "a"), ManagedStatus::Declared);
    let events = core
        .execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name("a") }), at(0))
        .unwrap()
        .events;
    assert_eq!(kinds(&events), ["incarnation_started"]);
    assert_eq!(effects(&mut core), [Effect::Spawn { agent: name("a"), role: worker(), incarnation: 1 }]);
    // Declaring the same spec again logs nothing; starting again does nothing.
    declare(&mut core, "a", spec(RestartPolicy::Always), at(5));
    assert!(
        core.execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name("a") }), at(5))
            .unwrap()
            .events
            .is_empty()
    );
}

#[test]
fn the_first_crash_restarts_at_once_as_the_next_incarnation() {
    let mut core = running("a", spec(RestartPolicy::OnFailure));
    let events = crash(&mut core, "a", at(1_000));
    assert_eq!(kinds(&events), ["agent_down", "restart_scheduled", "incarnation_started"]);
    assert_eq!(
        effects(&mut core),
        [
            Effect::Fence { agent: name("a"), incarnation: 1, reason: "declared down: killed by signal 9".into() },
            Effect::Fence { agent: name("a"), incarnation: 1, reason: "incarnation 2 has started".into() },
            Effect::Spawn { agent: name("a"), role: worker(), incarnation: 2 },
        ]
    );
    assert_eq!(core.state().agent("a").unwrap().incarnation, 2);
    // The old incarnation is fenced: its late write is refused.
    let late = Command::Agent(AgentCommand::Checkpoint {
        agent: name("a"),
        incarnation: 1,
        patch: serde_json::json!({"x": 1}),
        expected_version: None,
    });
    assert_eq!(core.execute(&late, at(1_001)).unwrap_err().code(), "stale_incarnation");
    // A second report of the same exit changes nothing.
    let report = Command::Supervision(SupervisionCommand::ReportDown {
        agent: name("a"),
        incarnation: 1,
        cause: Cause::Vanished,
    });
    assert!(core.execute(&report, at(1_002)).unwrap().events.is_empty());
}

#[test]
fn later_restarts_back_off_with_jitter_within_the_bound() {
    let backoff = Backoff { base_ms: 1_000, max_ms: 8_000 };
    let supervision = Supervision {
        backoff: backoff.clone(),
        intensity: Intensity { restarts_max: 100, window_ms: 1_000_000 },
        ..spec(RestartPolicy::Always)
    };
    let mut core = running("a", supervision);
    let mut now = at(10);
    crash(&mut core, "a", now);
    for attempt in 2..=6u32 {
        now = Timestamp(now.0 + 5);
        let events = crash(&mut core, "a", now);
        assert_eq!(kinds(&events), ["agent_down", "restart_scheduled"], "attempt {attempt}");
        let ManagedStatus::Backoff { due, attempt: logged } = status(&core, "a") else { panic!("not backing off") };
        assert_eq!(logged, attempt);
        let delay = due.0 - now.0;
        assert!(delay <= backoff.bound_ms(attempt), "attempt {attempt}: {delay} ms");
        // Nothing before the due time; the restart at it.
        if due > now {
            assert!(tick(&mut core, Timestamp(due.0 - 1)).is_empty());
        }
        let events = tick(&mut core, due);
        assert_eq!(kinds(&events), ["incarnation_started"], "attempt {attempt}");
        now = due;
    }
}

#[test]
fn the_same_seed_gives_the_same_delays() {
    let delays = |seed| {
        let mut core = running("a", spec(RestartPolicy::Always));
        core.set_seed(seed);
        crash(&mut core, "a", at(10));
        crash(&mut core, "a", at(20));
        let ManagedStatus::Backoff { due, .. } = status(&core, "a") else { panic!() };
        due
    };
    assert_eq!(delays(1), delays(1));
    let distinct: std::collections::BTreeSet<_> = (0..20).map(delays).collect();
    assert!(distinct.len() > 10, "jitter must vary with the seed: {distinct:?}");
}

#[test]
fn too_many_restarts_in_the_window_fail_the_agent_until_the_operator_restarts_it() {
    let supervision = Supervision {
        backoff: Backoff { base_ms: 0, max_ms: 0 },
        intensity: Intensity { restarts_max: 5, window_ms: 10_000 },
        ..spec(RestartPolicy::Always)
    };
    let mut core = running("a", supervision);
    for n in 0..5 {
        let events = crash(&mut core, "a", at(100 + n * 100));
        assert!(kinds(&events).contains(&"incarnation_started"), "restart {n}: {events:?}");
    }
    effects(&mut core);
    let events = crash(&mut core, "a", at(700));
    assert_eq!(kinds(&events), ["agent_down", "agent_failed"]);
    assert!(matches!(status(&core, "a"), ManagedStatus::Failed { restarts: 5, window_ms: 10_000 }));
    assert!(effects(&mut core).contains(&Effect::Escalate { agent: name("a"), restarts: 5, window_ms: 10_000 }));
    // Failed stays failed, however long we wait.
    assert!(tick(&mut core, at(1_000_000)).is_empty());
    let revived =
        core.execute(&Command::Supervision(SupervisionCommand::Restart { agent: name("a") }), at(1_000_001)).unwrap();
    assert_eq!(kinds(&revived.events), ["restart_requested", "incarnation_started"]);
    let incarnation = core.state().agent("a").unwrap().incarnation;
    assert_eq!(revived.answer, Answer::Restarted { incarnation }, "the answer names the run the restart started");
    assert_eq!(status(&core, "a"), ManagedStatus::Starting);
    assert!(core.state().agent("a").unwrap().managed.as_ref().unwrap().window.is_empty());
}

#[test]
fn restart_policies_decide_after_clean_and_failed_exits() {
    let exit = |code| Cause::Exited { code: Some(code), signal: None };
    let cases = [
        (RestartPolicy::Always, 0, true),
        (RestartPolicy::Always, 1, true),
        (RestartPolicy::OnFailure, 0, false),
        (RestartPolicy::OnFailure, 3, true),
        (RestartPolicy::Never, 1, false),
    ];
    for (policy, code, restarts) in cases {
        let mut core = running("a", spec(policy));
        let command = Command::Supervision(SupervisionCommand::ReportDown {
            agent: name("a"),
            incarnation: 1,
            cause: exit(code),
        });
        let events = core.execute(&command, at(50)).unwrap().events;
        assert_eq!(kinds(&events).contains(&"incarnation_started"), restarts, "{policy:?} exit {code}");
        if !restarts {
            assert_eq!(status(&core, "a"), ManagedStatus::Stopped);
        }
    }
}

fn group_of_three(strategy: Strategy) -> Core {
    let mut core = Core::new(Limits::default());
    for (position, agent) in ["a", "b", "c"].into_iter().enumerate() {
        let group = GroupMembership { name: "g".into(), strategy, position: position as u32 };
        declare(&mut core, agent, Supervision { group: Some(group), ..spec(RestartPolicy::Always) }, at(0));
        core.execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name(agent) }), at(0)).unwrap();
    }
    effects(&mut core);
    core
}

fn restarted(core: &mut Core, failed: &str) -> Vec<String> {
    crash(core, failed, at(100));
    let mut spawned: Vec<String> = effects(core)
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::Spawn { agent, .. } => Some(agent.to_string()),
            _ => None,
        })
        .collect();
    spawned.sort();
    spawned
}

#[test]
fn group_strategies_restart_siblings_as_otp_does() {
    assert_eq!(restarted(&mut group_of_three(Strategy::OneForOne), "b"), ["b"]);
    assert_eq!(restarted(&mut group_of_three(Strategy::OneForAll), "b"), ["a", "b", "c"]);
    assert_eq!(restarted(&mut group_of_three(Strategy::RestForOne), "b"), ["b", "c"]);
    // The siblings' old processes are stopped, and their downs carry the cause.
    let mut core = group_of_three(Strategy::OneForAll);
    let events = crash(&mut core, "b", at(100));
    assert!(events.iter().any(|event| matches!(event,
        Event::AgentDown { agent, cause: Cause::SiblingFailed { sibling }, .. } if agent.as_str() == "a" && sibling.as_str() == "b")));
    let stops: Vec<_> = effects(&mut core).into_iter().filter(|effect| matches!(effect, Effect::Stop { .. })).collect();
    assert_eq!(stops.len(), 2, "{stops:?}");
}

fn attached(agent: &str) -> Core {
    let mut core = Core::new(Limits::default());
    let hello =
        Hello { agent: name(agent), role: RoleName::new("r").unwrap(), labels: BTreeMap::new(), incarnation: None };
    core.execute(&Command::Agent(AgentCommand::Hello(hello)), at(0)).unwrap();
    effects(&mut core);
    core
}

#[test]
fn a_silent_agent_is_suspected_challenged_then_down_and_fenced() {
    let mut core = attached("a");
    let a = name("a");
    for n in 0..10 {
        core.heartbeat(at(n * 1_000), &a, 1, None).unwrap();
        tick(&mut core, at(n * 1_000 + 1));
    }
    effects(&mut core);
    let last = 9_000;
    let mut suspected_at = None;
    let mut down_at = None;
    for ms in (last..last + 10_000).step_by(100) {
        let events = tick(&mut core, at(ms));
        if suspected_at.is_none()
            && effects(&mut core).contains(&Effect::Challenge { agent: a.clone(), incarnation: 1 })
        {
            suspected_at = Some(ms - last);
        }
        if kinds(&events).contains(&"agent_down") {
            down_at = Some(ms - last);
            break;
        }
    }
    let (suspected_at, down_at) = (suspected_at.expect("suspected"), down_at.expect("down"));
    assert!(suspected_at < down_at);
    assert!(down_at <= 3_000, "down {down_at} ms after the last beat");
    let record = core.state().agent("a").unwrap();
    assert!(matches!(record.down.as_ref().unwrap().cause, Cause::HeartbeatsLost { .. }));
    assert_eq!(core.heartbeat(at(20_000), &a, 1, None).unwrap_err().code(), "incarnation_down");
    let write = Command::Agent(AgentCommand::Checkpoint {
        agent: a.clone(),
        incarnation: 1,
        patch: serde_json::json!({}),
        expected_version: None,
    });
    assert_eq!(core.execute(&write, at(20_000)).unwrap_err().code(), "incarnation_down");
    let resume =
        Hello { agent: a.clone(), role: RoleName::new("r").unwrap(), labels: BTreeMap::new(), incarnation: Some(1) };
    assert_eq!(
        core.execute(&Command::Agent(AgentCommand::Hello(resume)), at(20_000)).unwrap_err().code(),
        "incarnation_down"
    );
}

#[test]
fn an_agent_that_never_beats_is_not_watched() {
    let mut core = attached("a");
    assert!(tick(&mut core, at(3_600_000)).is_empty());
}

/// Submits a task for `worker` and lets `tick` lease it to the beating agent; its number.
fn hold_a_task(core: &mut Core, now: Timestamp) -> u64 {
    let spec = crate::tasks::TaskSpec::new(worker(), serde_json::json!({"work": 1}));
    let submitted = core.execute(&Command::Task(TaskCommand::Submit { spec, by: None }), now).unwrap();
    let Answer::TaskSubmitted { task, .. } = submitted.answer else { panic!("{:?}", submitted.answer) };
    let events = tick(core, now);
    assert!(kinds(&events).contains(&"task_assigned"), "{events:?}");
    effects(core);
    task
}

fn commit_step(core: &mut Core, task: u64, step: &str, now: Timestamp) {
    let incarnation = core.state().agent("a").unwrap().incarnation;
    let command = Command::Task(TaskCommand::CommitStep {
        task,
        agent: name("a"),
        incarnation,
        name: step.into(),
        result: serde_json::json!(step),
        llm: None,
        compensation: None,
        reservation: None,
    });
    core.execute(&command, now).unwrap();
}

#[test]
fn unchanged_progress_for_n_beats_is_a_stall_and_restarts_a_managed_agent() {
    let supervision =
        Supervision { stall: StallPolicy { beats: Some(5), quiet_ms: None }, ..spec(RestartPolicy::Always) };
    let mut core = running("a", supervision);
    let a = name("a");
    let progress = |step: u32| Progress { fraction: Some(f64::from(step) / 100.0), ..Progress::default() };
    core.heartbeat(at(0), &a, 1, None).unwrap();
    hold_a_task(&mut core, at(1));
    for n in 0..10 {
        core.heartbeat(at(n * 1_000), &a, 1, Some(progress(n as u32))).unwrap();
        assert!(!kinds(&tick(&mut core, at(n * 1_000 + 1))).contains(&"agent_down"));
    }
    let mut events = Vec::new();
    for n in 10..20 {
        core.heartbeat(at(n * 1_000), &a, 1, Some(progress(9))).unwrap();
        events = tick(&mut core, at(n * 1_000 + 1));
        if !events.is_empty() && kinds(&events).contains(&"agent_down") {
            assert_eq!(n, 14, "stalled after 5 unchanged beats");
            break;
        }
    }
    assert!(matches!(&events[0], Event::AgentDown { cause: Cause::StalledProgress { beats: 5 }, .. }), "{events:?}");
    let effects = effects(&mut core);
    assert!(effects.contains(&Effect::Stop { agent: a.clone(), incarnation: 1 }), "{effects:?}");
    assert!(effects.contains(&Effect::Spawn { agent: a.clone(), role: worker(), incarnation: 2 }), "{effects:?}");
}

#[test]
fn progress_is_logged_at_once_then_at_a_bounded_rate() {
    let mut core = attached("a");
    let a = name("a");
    let mut logged = 0;
    for n in 0..100u64 {
        let progress = Progress { message: Some(format!("step {n}")), ..Progress::default() };
        core.heartbeat(at(n * 500), &a, 1, Some(progress)).unwrap();
        logged += kinds(&tick(&mut core, at(n * 500 + 1))).iter().filter(|kind| **kind == "progress_reported").count();
        if n == 0 {
            assert_eq!(logged, 1, "the first beat is logged at once");
        }
    }
    // 50 s of changing progress, one log per 10 s at most.
    assert!((5..=6).contains(&logged), "{logged} progress events");
}

#[test]
fn after_a_restart_of_hale_watched_runs_get_a_grace_period() {
    let mut live = attached("a");
    let a = name("a");
    live.heartbeat(at(0), &a, 1, None).unwrap();
    tick(&mut live, at(1)); // logs the first progress: the run is watched
    let mut core = Core::from_state(live.state().clone(), Limits::default());
    core.begin_grace(at(60_000));
    assert_eq!(core.liveness("a").unwrap().health, Health::Reconnecting);
    assert!(tick(&mut core, at(69_000)).is_empty(), "within the grace");
    let events = tick(&mut core, at(70_000));
    assert!(matches!(&events[0], Event::AgentDown { cause: Cause::NotReconnected { .. }, .. }), "{events:?}");

    // One that beats within the grace is alive, judged afresh.
    let mut core = Core::from_state(live.state().clone(), Limits::default());
    core.begin_grace(at(60_000));
    core.heartbeat(at(65_000), &a, 1, None).unwrap();
    assert!(tick(&mut core, at(70_000 - 4_000)).is_empty());
    assert_eq!(core.liveness("a").unwrap().health, Health::Alive);
}

#[test]
fn replaying_supervision_events_gives_the_live_state() {
    let mut core = group_of_three(Strategy::OneForAll);
    let mut log: Vec<(Timestamp, Event)> = Vec::new();
    let mut now = at(0);
    let mut record = |events: Vec<Event>, now| log.extend(events.into_iter().map(|e| (now, e)));
    for n in 0..30u64 {
        now = Timestamp(now.0 + 37 * n);
        let agent = ["a", "b", "c"][(n % 3) as usize];
        let events = crash(&mut core, agent, now);
        record(events, now);
        let events = tick(&mut core, Timestamp(now.0 + 50_000));
        record(events, Timestamp(now.0 + 50_000));
        now = Timestamp(now.0 + 50_000);
    }
    let events =
        core.execute(&Command::Supervision(SupervisionCommand::Restart { agent: name("a") }), now).unwrap().events;
    record(events, now);
    let mut replayed = group_of_three(Strategy::OneForAll);
    for (at, event) in &log {
        replayed.apply(*at, event);
    }
    assert_eq!(replayed.state(), core.state());
}

#[test]
fn a_stopped_agent_is_not_restarted_until_started_again() {
    let mut core = running("a", spec(RestartPolicy::Always));
    let events =
        core.execute(&Command::Supervision(SupervisionCommand::Stop { agent: name("a") }), at(10)).unwrap().events;
    assert_eq!(kinds(&events), ["agent_down"]);
    assert!(effects(&mut core).contains(&Effect::Stop { agent: name("a"), incarnation: 1 }));
    assert_eq!(status(&core, "a"), ManagedStatus::Stopped);
    // Its exit, reported when the stop lands, changes nothing.
    assert!(crash(&mut core, "a", at(20)).is_empty());
    assert!(tick(&mut core, at(1_000_000)).is_empty());
    // `hale up` starts it again, as a new incarnation.
    let events = core
        .execute(&Command::Supervision(SupervisionCommand::StartManaged { agent: name("a") }), at(1_000_001))
        .unwrap()
        .events;
    assert_eq!(events, [Event::IncarnationStarted { agent: name("a"), incarnation: 2 }]);
    // Stopping during a backoff cancels the restart.
    let supervision =
        Supervision { backoff: Backoff { base_ms: 60_000, max_ms: 60_000 }, ..spec(RestartPolicy::Always) };
    let mut core = running("b", supervision);
    crash(&mut core, "b", at(10));
    crash(&mut core, "b", at(20));
    assert!(matches!(status(&core, "b"), ManagedStatus::Backoff { .. }));
    core.execute(&Command::Supervision(SupervisionCommand::Stop { agent: name("b") }), at(30)).unwrap();
    assert!(tick(&mut core, at(10_000_000)).is_empty());
    assert_eq!(status(&core, "b"), ManagedStatus::Stopped);
}

#[test]
fn a_run_that_holds_no_lease_is_idle_whatever_its_progress_says() {
    let both = StallPolicy { beats: Some(3), quiet_ms: Some(5_000) };
    let mut core = running("a", Supervision { stall: both, ..spec(RestartPolicy::Always) });
    // An error path that forgot to clear its progress: it still names a task.
    let stale = Progress { message: Some("working on task 7".into()), task: Some("7".into()), ..Progress::default() };
    for n in 0..50 {
        let progress = (n % 2 == 0).then(|| stale.clone());
        core.heartbeat(at(n * 1_000), &name("a"), 1, progress).unwrap();
        assert!(!kinds(&tick(&mut core, at(n * 1_000 + 1))).contains(&"agent_down"), "beat {n}");
    }
}

#[test]
fn a_run_that_holds_a_lease_and_shows_no_work_stalls_however_it_beats() {
    let supervision =
        Supervision { stall: StallPolicy { beats: Some(5), quiet_ms: None }, ..spec(RestartPolicy::Always) };
    let mut core = running("a", supervision);
    let a = name("a");
    core.heartbeat(at(0), &a, 1, None).unwrap();
    let task = hold_a_task(&mut core, at(10));
    // Beats with no progress at all (a client's own heartbeat thread, its work loop stuck),
    // with a step committed now and then: each step starts the count again.
    let mut down_at = None;
    for n in 1..40u64 {
        if n == 3 || n == 7 {
            commit_step(&mut core, task, &format!("step-{n}"), at(n * 1_000 - 500));
        }
        core.heartbeat(at(n * 1_000), &a, 1, None).unwrap();
        let events = tick(&mut core, at(n * 1_000 + 1));
        if let Some(Event::AgentDown { cause, .. }) = events.first() {
            assert_eq!(*cause, Cause::StalledProgress { beats: 5 });
            down_at = Some(n);
            break;
        }
    }
    assert_eq!(down_at, Some(11), "five beats (7 s to 11 s) after the last step (at 6.5 s)");
    // The task goes back to the queue with the run.
    assert_eq!(core.state().tasks().load(&a), 0);
}

#[test]
fn a_declared_long_call_is_not_a_stall_until_it_has_passed() {
    let both = StallPolicy { beats: Some(5), quiet_ms: Some(8_000) };
    let mut core = running("a", Supervision { stall: both, ..spec(RestartPolicy::Always) });
    let a = name("a");
    core.heartbeat(at(0), &a, 1, None).unwrap();
    hold_a_task(&mut core, at(10));
    // A model call expected to take up to 30 s: 30 beats with nothing to show.
    core.busy(at(500), &a, 1, 30_000).unwrap();
    for n in 1..30u64 {
        core.heartbeat(at(n * 1_000), &a, 1, None).unwrap();
        assert!(!kinds(&tick(&mut core, at(n * 1_000 + 1))).contains(&"agent_down"), "beat {n}");
    }
    // Past the declared time, the counts start from where the call ended.
    let mut down_at = None;
    for n in 30..60u64 {
        core.heartbeat(at(n * 1_000), &a, 1, None).unwrap();
        if kinds(&tick(&mut core, at(n * 1_000 + 1))).contains(&"agent_down") {
            down_at = Some(n);
            break;
        }
    }
    assert_eq!(down_at, Some(35), "five unchanged beats after the call's 30.5 s");

    // Saying the call is over (busy 0) ends the exemption at once.
    let quiet = StallPolicy { beats: None, quiet_ms: Some(8_000) };
    let mut core = running("a", Supervision { stall: quiet, ..spec(RestartPolicy::Always) });
    core.heartbeat(at(0), &a, 1, None).unwrap();
    hold_a_task(&mut core, at(10));
    core.busy(at(1_000), &a, 1, 600_000).unwrap();
    core.heartbeat(at(2_000), &a, 1, None).unwrap();
    core.busy(at(2_500), &a, 1, 0).unwrap();
    let mut down_at = None;
    for n in 3..30u64 {
        core.heartbeat(at(n * 1_000), &a, 1, None).unwrap();
        let events = tick(&mut core, at(n * 1_000 + 1));
        if let Some(Event::AgentDown { cause, .. }) = events.first() {
            assert_eq!(*cause, Cause::StalledCheckpoints { quiet_ms: 8_000 });
            down_at = Some(n);
            break;
        }
    }
    assert_eq!(down_at, Some(11), "8 s after the call was said to be over (2.5 s)");
}

#[test]
fn an_error_spike_opens_the_breaker_then_a_quiet_probe_closes_it() {
    use crate::health::Breaker;
    let mut core = attached("a");
    let a = name("a");
    let breaker = |core: &Core| core.state().agent("a").unwrap().health.breaker.clone();
    // Four errors in the window: below the default five.
    for n in 0..4 {
        core.report_error(at(n * 100), &a, 1).unwrap();
    }
    assert!(tick(&mut core, at(500)).is_empty());
    core.report_error(at(600), &a, 1).unwrap();
    let events = tick(&mut core, at(650));
    assert_eq!(kinds(&events), ["breaker_opened"]);
    assert_eq!(breaker(&core), Breaker::Open { until: at(650 + 30_000) });
    // Open for 30 s, then half-open; an error while probing opens it again.
    assert!(tick(&mut core, at(30_000)).is_empty());
    assert_eq!(kinds(&tick(&mut core, at(30_650))), ["breaker_half_opened"]);
    core.report_error(at(31_000), &a, 1).unwrap();
    assert_eq!(kinds(&tick(&mut core, at(31_050))), ["breaker_opened"]);
    // The next probe window passes without errors: closed.
    assert_eq!(kinds(&tick(&mut core, at(61_050))), ["breaker_half_opened"]);
    assert!(tick(&mut core, at(65_000)).is_empty());
    assert_eq!(kinds(&tick(&mut core, at(71_050))), ["breaker_closed"]);
    assert_eq!(breaker(&core), Breaker::Closed);
    assert_eq!(core.state().agent("a").unwrap().health.breaker_opened, 2);
    // A stale incarnation cannot report errors.
    assert_eq!(core.report_error(at(80_000), &a, 0).unwrap_err().code(), "stale_incarnation");
}

#[test]
fn violations_past_the_threshold_or_one_critical_quarantine_until_released() {
    use crate::health::{Reporter, Severity};
    let mut core = attached("a");
    let violation = |severity, n: u64| {
        Command::Health(HealthCommand::ReportViolation {
            agent: name("a"),
            by: Reporter::Agent(name("checker")),
            severity,
            reason: format!("made up a citation ({n})"),
        })
    };
    assert_eq!(kinds(&core.execute(&violation(Severity::Minor, 1), at(0)).unwrap().events), ["violation_reported"]);
    assert_eq!(kinds(&core.execute(&violation(Severity::Minor, 2), at(10)).unwrap().events), ["violation_reported"]);
    let events = core.execute(&violation(Severity::Minor, 3), at(20)).unwrap().events;
    assert_eq!(kinds(&events), ["violation_reported", "quarantined"]);
    let quarantine = core.state().agent("a").unwrap().health.quarantine.clone().unwrap();
    assert!(quarantine.reason.contains("3 violations"), "{}", quarantine.reason);
    assert_eq!(quarantine.by, Reporter::Agent(name("checker")));
    assert_eq!(
        kinds(&core.execute(&Command::Health(HealthCommand::Release { agent: name("a") }), at(30)).unwrap().events),
        ["released"]
    );
    assert!(core.state().agent("a").unwrap().health.quarantine.is_none());
    // One critical violation is enough; the operator can quarantine directly too.
    let events = core.execute(&violation(Severity::Critical, 4), at(40)).unwrap().events;
    assert_eq!(kinds(&events), ["violation_reported", "quarantined"]);
    core.execute(&Command::Health(HealthCommand::Release { agent: name("a") }), at(50)).unwrap();
    let events = core
        .execute(
            &Command::Health(HealthCommand::Quarantine { agent: name("a"), reason: "leaked a key".into() }),
            at(60),
        )
        .unwrap()
        .events;
    assert_eq!(kinds(&events), ["quarantined"]);
    // Violations spread wider than the window do not add up.
    core.execute(&Command::Health(HealthCommand::Release { agent: name("a") }), at(70)).unwrap();
    for n in 0..10u64 {
        let events = core.execute(&violation(Severity::Minor, n), at(100 + n * 2_000_000)).unwrap().events;
        assert_eq!(kinds(&events), ["violation_reported"], "violation {n}");
    }
    let long = Command::Health(HealthCommand::Quarantine { agent: name("a"), reason: "x".repeat(2_000) });
    assert_eq!(core.execute(&long, at(0)).unwrap_err().code(), "reason_too_long");
}

#[test]
fn a_pool_below_its_minimum_recruits_new_instances_up_to_its_maximum() {
    let mut core = Core::new(Limits::default());
    let supervision =
        Supervision { intensity: Intensity { restarts_max: 1, window_ms: 60_000 }, ..spec(RestartPolicy::Always) };
    let declare = Command::Supervision(SupervisionCommand::DeclareRole { role: worker(), min: 2, max: 3, supervision });
    assert_eq!(kinds(&core.execute(&declare, at(0)).unwrap().events), ["role_declared"]);
    assert!(core.execute(&declare, at(1)).unwrap().events.is_empty(), "declaring the same pool again logs nothing");
    // At start the pool is empty: two instances are recruited, one per tick.
    let events = tick(&mut core, at(10));
    assert_eq!(kinds(&events), ["agent_declared", "incarnation_started"]);
    tick(&mut core, at(20));
    assert!(tick(&mut core, at(30)).is_empty(), "two healthy: the minimum");
    let names: Vec<String> = core.state().agents().map(|record| record.name.to_string()).collect();
    assert_eq!(names, ["worker-1", "worker-2"]);
    assert!(effects(&mut core).contains(&Effect::Spawn { agent: name("worker-2"), role: worker(), incarnation: 1 }));
    // worker-1 crash-loops past its intensity: failed, so the pool recruits worker-3.
    crash(&mut core, "worker-1", at(100));
    let events = crash(&mut core, "worker-1", at(200));
    assert!(kinds(&events).contains(&"agent_failed"), "{events:?}");
    let events = tick(&mut core, at(300));
    assert!(matches!(&events[0], Event::AgentDeclared { agent, .. } if agent.as_str() == "worker-3"), "{events:?}");
    // At the maximum: another failure recruits no one.
    crash(&mut core, "worker-2", at(400));
    crash(&mut core, "worker-2", at(500));
    assert!(tick(&mut core, at(600)).iter().all(|event| !matches!(event, Event::AgentDeclared { .. })));
    assert_eq!(core.state().agents().count(), 3);
}

#[test]
fn a_managed_agent_cannot_start_a_run_of_its_own() {
    let mut core = running("a", spec(RestartPolicy::Always));
    let hello = Hello { agent: name("a"), role: worker(), labels: BTreeMap::new(), incarnation: None };
    let refused = core.execute(&Command::Agent(AgentCommand::Hello(hello.clone())), at(5)).unwrap_err();
    assert_eq!(refused.code(), "managed_by_hale");
    assert!(refused.to_string().contains("HALE_INCARNATION (now 1)"), "{refused}");
    // Resuming the run hale started is how it says hello.
    let resume = Hello { incarnation: Some(1), ..hello };
    assert!(core.execute(&Command::Agent(AgentCommand::Hello(resume)), at(6)).unwrap().events.is_empty());
}

#[test]
fn a_hale_that_runs_no_agents_neither_restarts_nor_recruits() {
    let mut core = running("a", spec(RestartPolicy::Always));
    let pool = Command::Supervision(SupervisionCommand::DeclareRole {
        role: RoleName::new("pool").unwrap(),
        min: 1,
        max: 1,
        supervision: Supervision::default(),
    });
    core.execute(&pool, at(2)).unwrap();
    core.set_supervising(false);
    // A crash with backoff due later: nothing starts it, and no pool instance appears.
    crash(&mut core, "a", at(10));
    crash(&mut core, "a", at(20));
    assert!(tick(&mut core, at(10_000_000)).is_empty());
    let refused = core
        .execute(&Command::Supervision(SupervisionCommand::Restart { agent: name("a") }), at(10_000_001))
        .unwrap_err();
    assert_eq!(refused.code(), "not_supervising");
}

#[test]
fn memory_over_its_threshold_takes_the_run_down_at_the_next_tick_and_restarts_it() {
    const MIB: u64 = 1024 * 1024;
    let thresholds = Thresholds { memory_bytes_max: Some(64 * MIB), ..Thresholds::default() };
    let mut core = running("a", Supervision { thresholds, ..spec(RestartPolicy::Always) });
    let usage = |rss_mb: u64| Observation::Measured(Measurement::Usage { rss_bytes: rss_mb * MIB, cpu_ms: 0 });
    core.observe(at(1_000), &name("a"), 1, usage(64)).unwrap();
    assert!(tick(&mut core, at(1_050)).is_empty(), "at the threshold is not over it");
    core.observe(at(2_000), &name("a"), 1, usage(65)).unwrap();
    let events = tick(&mut core, at(2_050));
    assert_eq!(kinds(&events), ["agent_down", "restart_scheduled", "incarnation_started"]);
    let limit = 64 * MIB;
    let cause = Cause::ResourceExceeded { resource: "memory".into(), value: 65 * MIB, limit };
    assert_eq!(events[0], Event::AgentDown { agent: name("a"), incarnation: 1, cause });
    assert!(tick(&mut core, at(2_100)).is_empty(), "concluded once");
    // The old run's late readings are refused; the new run starts with a clean slate.
    assert_eq!(core.observe(at(2_200), &name("a"), 1, usage(65)).unwrap_err().code(), "stale_incarnation");
    core.observe(at(2_300), &name("a"), 2, usage(10)).unwrap();
    assert!(tick(&mut core, at(2_350)).is_empty());
}

#[test]
fn failed_probes_in_a_row_take_the_run_down_and_an_agent_without_thresholds_is_not_judged() {
    let thresholds = Thresholds { probe_failures_max: Some(2), ..Thresholds::default() };
    let mut core = running("a", Supervision { thresholds, ..spec(RestartPolicy::Never) });
    let probe =
        |failure: Option<&str>| Observation::Measured(Measurement::Probe { failure: failure.map(String::from) });
    core.observe(at(1_000), &name("a"), 1, probe(Some("HTTP 503"))).unwrap();
    core.observe(at(2_000), &name("a"), 1, probe(None)).unwrap();
    core.observe(at(3_000), &name("a"), 1, probe(Some("HTTP 503"))).unwrap();
    assert!(tick(&mut core, at(3_050)).is_empty(), "a pass between failures resets the count");
    core.observe(at(4_000), &name("a"), 1, probe(Some("timed out after 1000 ms"))).unwrap();
    let events = tick(&mut core, at(4_050));
    let cause = Cause::HealthProbe { failures: 2, last: "timed out after 1000 ms".into() };
    assert_eq!(events, [Event::AgentDown { agent: name("a"), incarnation: 1, cause }]);
    // No thresholds: readings are taken and nothing is concluded.
    let mut plain = running("b", spec(RestartPolicy::Always));
    for second in 0..5 {
        plain.observe(at(second * 1_000), &name("b"), 1, probe(Some("HTTP 500"))).unwrap();
    }
    assert!(tick(&mut plain, at(5_000)).is_empty());
}

#[test]
fn thresholds_are_logged_with_the_spec_and_a_spec_without_them_reads_as_before() {
    let bare = serde_json::to_value(Supervision::default()).unwrap();
    assert!(bare.get("thresholds").is_none(), "left out when unset: {bare}");
    let older: Supervision = serde_json::from_value(bare).unwrap();
    assert!(older.thresholds.is_unset());
    let watched =
        Supervision { thresholds: Thresholds { cpu_percent_max: Some(80), ..Thresholds::default() }, ..older };
    let text = serde_json::to_string(&watched).unwrap();
    assert_eq!(serde_json::from_str::<Supervision>(&text).unwrap(), watched);
}
