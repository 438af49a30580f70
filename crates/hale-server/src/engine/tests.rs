//! The engine's durability contract, shown without the binary and without sleeping: a log
//! in memory whose commits the test completes or fails by hand, and a clock that moves only
//! when the test advances it. Every "not yet" is checked after a request that the engine
//! handles in order behind the one under test, so it cannot pass by being early.

use super::*;
use hale_core::supervision::{Cause, ProcessRef, RestartPolicy, Supervision};
use hale_core::{AgentCommand, Hello, Limits, Measurement, RoleName, SupervisionCommand, Thresholds};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::mpsc::error::TryRecvError;

/// A log in memory: appends are kept, and nothing is durable until the test says so.
struct ManualLog {
    control: LogControl,
}

/// The test's hold on a [`ManualLog`], which the engine owns.
#[derive(Clone)]
struct LogControl {
    appended: Arc<Mutex<Vec<Record>>>,
    durability: Arc<watch::Sender<Durability>>,
}

impl LogControl {
    fn last_appended(&self) -> u64 {
        self.appended.lock().unwrap().last().map_or(0, |record| record.seq)
    }

    /// Everything appended so far is durable.
    fn commit_appended(&self) {
        let last = self.last_appended();
        self.durability.send_modify(|durability| durability.durable_seq = last);
    }

    /// The next commit failed (an fsync returned EIO): nothing more becomes durable.
    fn fail(&self, reason: &str) {
        self.durability.send_modify(|durability| durability.failed = Some(Arc::from(reason)));
    }
}

impl DurableLog for ManualLog {
    async fn append(&self, records: Vec<Record>) -> Result<(), WriteError> {
        self.control.appended.lock().unwrap().extend(records);
        Ok(())
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.control.durability.subscribe()
    }

    fn shutdown(self) {}
}

struct Harness {
    engine: Engine,
    log: LogControl,
    clock: Clock,
    effects: mpsc::UnboundedReceiver<Effect>,
    snapshots: tempfile::TempDir,
}

const START: Timestamp = Timestamp(1_700_000_000_000);

fn start(snapshot_every_events: u64) -> Harness {
    let snapshots = tempfile::tempdir().unwrap();
    let durability = Arc::new(watch::channel(Durability::at(0)).0);
    let log = LogControl { appended: Arc::default(), durability };
    let (effects_tx, effects) = mpsc::unbounded_channel();
    let clock = Clock::manual(START);
    let options = EngineOptions {
        snapshots: SnapshotPolicy {
            dir: snapshots.path().to_path_buf(),
            every_events: snapshot_every_events,
            every: Duration::from_secs(3_600),
            kept: 100,
        },
        effects: effects_tx,
        key: None,
        metrics: Arc::new(Metrics::new(0, 0, snapshots.path().to_path_buf())),
        clock: clock.clone(),
        tick: None,
        unsnapshotted: 0,
    };
    let engine = Engine::start(Core::new(Limits::default()), 0, ManualLog { control: log.clone() }, options);
    Harness { engine, log, clock, effects, snapshots }
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn hello(agent: &str, incarnation: Option<u64>) -> Command {
    let role = RoleName::new("worker").unwrap();
    Hello { agent: name(agent), role, labels: BTreeMap::new(), incarnation }.into()
}

fn checkpoint(agent: &str, patch: serde_json::Value) -> Command {
    AgentCommand::Checkpoint { agent: name(agent), incarnation: 1, patch, expected_version: None }.into()
}

/// Whether the answer of `submitted` has been released, without waiting for it.
fn released(submitted: &mut Submitted) -> bool {
    !matches!(submitted.ack.try_recv(), Err(oneshot::error::TryRecvError::Empty))
}

/// A request the engine handles after everything submitted before it: once it returns,
/// the engine has decided, appended and held all of that.
async fn barrier(engine: &Engine) {
    engine.tick().await;
}

/// Waits, with a deadline, for `condition`; fails saying what it waited for.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn no_answer_is_released_before_its_events_are_durable() {
    let harness = start(u64::MAX);
    let mut welcome = harness.engine.submit(hello("a", None)).await;
    assert!(matches!(welcome.peek(), Ok(Response::Welcome(_))), "decided at once");
    let mut first = harness.engine.submit(checkpoint("a", json!({"n": 1}))).await;
    barrier(&harness.engine).await;
    assert!(!released(&mut welcome) && !released(&mut first), "nothing is durable yet");
    assert_eq!(harness.log.last_appended(), 3, "registered, started, checkpointed: appended in order");

    // Durable up to the hello's events only: the hello may be answered, the checkpoint not.
    harness.log.durability.send_modify(|durability| durability.durable_seq = 2);
    assert!(matches!(welcome.durable().await, Ok(Response::Welcome(_))));
    barrier(&harness.engine).await;
    assert!(!released(&mut first), "the checkpoint's own event is not durable yet");

    harness.log.commit_appended();
    assert!(matches!(first.durable().await, Ok(Response::Answer(Answer::Checkpointed { version: 1 }))));
}

#[tokio::test]
async fn a_rejection_waits_for_the_writes_before_it() {
    let harness = start(u64::MAX);
    harness.engine.submit(hello("a", None)).await;
    let mut accepted = harness.engine.submit(checkpoint("a", json!({"n": 1}))).await;
    let mut refused = harness.engine.submit(checkpoint("a", json!("not an object"))).await;
    assert!(matches!(refused.peek(), Err(EngineError::Rejected(Rejection::PatchNotObject { .. }))));
    barrier(&harness.engine).await;
    assert_eq!(harness.log.last_appended(), 3, "a rejection appends nothing");
    assert!(!released(&mut accepted) && !released(&mut refused), "the refusal saw a checkpoint not yet durable");

    harness.log.commit_appended();
    assert!(matches!(refused.durable().await, Err(EngineError::Rejected(Rejection::PatchNotObject { .. }))));
    assert!(accepted.durable().await.is_ok());
}

#[tokio::test]
async fn effects_and_published_events_wait_for_their_events_to_be_durable() {
    let mut harness = start(u64::MAX);
    let mut published = harness.engine.subscribe_events();
    let declare = SupervisionCommand::Declare {
        agent: name("m"),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        supervision: Supervision::default(),
    };
    harness.engine.submit(declare.into()).await;
    harness.engine.set_supervising(true).await;
    harness.engine.submit(SupervisionCommand::StartManaged { agent: name("m") }.into()).await;
    barrier(&harness.engine).await;
    assert_eq!(harness.effects.try_recv(), Err(TryRecvError::Empty), "no process starts for an undurable run");
    assert!(matches!(published.try_recv(), Err(broadcast::error::TryRecvError::Empty)));

    harness.log.commit_appended();
    let spawn = tokio::time::timeout(Duration::from_secs(10), harness.effects.recv()).await.unwrap();
    assert_eq!(spawn, Some(Effect::Spawn { agent: name("m"), role: RoleName::new("worker").unwrap(), incarnation: 1 }));
    let first = published.recv().await.unwrap();
    assert_eq!((first.seq, first.event.kind()), (1, "agent_declared"));
    assert_eq!(published.recv().await.unwrap().event.kind(), "incarnation_started");
}

#[tokio::test]
async fn after_a_failed_commit_every_later_write_is_refused_and_nothing_after_it_is_answered() {
    let mut harness = start(u64::MAX);
    harness.engine.submit(hello("a", None)).await;
    let declare = SupervisionCommand::Declare {
        agent: name("m"),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        supervision: Supervision::default(),
    };
    harness.engine.set_supervising(true).await;
    harness.engine.submit(declare.into()).await;
    harness.log.commit_appended();
    let durable = harness.log.last_appended();
    let before = harness.engine.submit(checkpoint("a", json!({"n": 1}))).await;
    let start = harness.engine.submit(SupervisionCommand::StartManaged { agent: name("m") }.into()).await;

    harness.log.fail("fsync: Input/output error");
    let failed = |outcome: &Result<Response, EngineError>| matches!(outcome, Err(EngineError::Log(WriteError::Failed(reason))) if reason.contains("Input/output"));
    assert!(failed(&before.durable().await), "decided before the failure, never durable");
    assert!(failed(&start.durable().await));
    let after = harness.engine.submit(checkpoint("a", json!({"n": 2}))).await;
    assert!(failed(after.peek()), "refused at once: {:?}", after.peek());
    assert!(failed(&harness.engine.execute(checkpoint("a", json!({"n": 3}))).await));
    assert!(matches!(harness.engine.read(|_| ()).await, Err(EngineError::Log(WriteError::Failed(_)))));
    barrier(&harness.engine).await;
    assert_eq!(harness.log.last_appended(), durable + 2, "nothing appended after the failure");
    assert_eq!(harness.effects.try_recv(), Err(TryRecvError::Empty), "the start that was never durable spawns nothing");
    assert_eq!(harness.engine.durability().failed.as_deref(), Some("fsync: Input/output error"));
}

#[tokio::test]
async fn a_snapshot_never_holds_an_event_that_is_not_durable() {
    let harness = start(3);
    harness.engine.submit(hello("a", None)).await;
    harness.engine.submit(checkpoint("a", json!({"n": 1}))).await;
    barrier(&harness.engine).await;
    let written = || snapshot::list(harness.snapshots.path()).unwrap();
    assert!(written().is_empty(), "three events are due a snapshot, but none is durable");

    harness.log.commit_appended();
    wait_until("the snapshot of the three durable events", || !written().is_empty()).await;
    assert_eq!(written().iter().map(|file| file.seq).collect::<Vec<_>>(), [3]);

    // Three more events, then the log fails before they are durable: no snapshot of them,
    // neither the one they are due nor the final one at shutdown.
    for n in 2..=4 {
        harness.engine.submit(checkpoint("a", json!({ "n": n }))).await;
    }
    harness.log.fail("fsync: Input/output error");
    harness.engine.shutdown().await;
    assert_eq!(written().iter().map(|file| file.seq).collect::<Vec<_>>(), [3]);
}

#[tokio::test]
async fn the_detectors_run_on_the_clock_the_test_advances() {
    let mut harness = start(u64::MAX);
    let engine = &harness.engine;
    // An attached agent that stops beating is declared down once enough time has passed,
    // and only then.
    engine.submit(hello("a", None)).await;
    engine.heartbeat(name("a"), 1, None, None).await.unwrap();
    harness.clock.advance(500);
    engine.tick().await;
    harness.log.commit_appended();
    let down = |state: &State| state.agent("a").unwrap().down.as_ref().map(|down| down.cause.detector());
    assert_eq!(engine.read(down).await.unwrap(), None, "half a second of silence is no failure");
    harness.clock.advance(60_000);
    engine.tick().await;
    harness.log.commit_appended();
    assert_eq!(engine.read(down).await.unwrap(), Some("heartbeat"));

    // A managed agent whose process uses more memory than its threshold is declared down
    // by the core at the next tick: the shell only measured.
    let thresholds = Thresholds { memory_bytes_max: Some(1 << 20), ..Thresholds::default() };
    let supervision = Supervision { restart: RestartPolicy::Never, thresholds, ..Supervision::default() };
    let declare = SupervisionCommand::Declare {
        agent: name("m"),
        role: RoleName::new("worker").unwrap(),
        labels: BTreeMap::new(),
        supervision,
    };
    engine.set_supervising(true).await;
    engine.submit(declare.into()).await;
    engine.submit(SupervisionCommand::StartManaged { agent: name("m") }.into()).await;
    let process = ProcessRef { pid: 4_242, start_ticks: 1 };
    engine.submit(SupervisionCommand::ProcessStarted { agent: name("m"), incarnation: 1, process }.into()).await;
    harness.log.commit_appended();
    let usage = Measurement::Usage { rss_bytes: 2 << 20, cpu_ms: 0 };
    engine.observe(name("m"), 1, Observation::Measured(usage)).await.unwrap();
    engine.tick().await;
    harness.log.commit_appended();
    let cause = engine.read(|state| state.agent("m").unwrap().down.clone().map(|down| down.cause)).await.unwrap();
    assert_eq!(cause, Some(Cause::ResourceExceeded { resource: "memory".into(), value: 2 << 20, limit: 1 << 20 }));
    let stop = loop {
        match tokio::time::timeout(Duration::from_secs(10), harness.effects.recv()).await.unwrap() {
            Some(Effect::Stop { agent, incarnation }) => break (agent, incarnation),
            Some(_) => continue,
            None => panic!("the effects channel closed"),
        }
    };
    assert_eq!(stop, (name("m"), 1), "the shell is told to stop the process");
}
