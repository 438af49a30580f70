//! The engine: one task that owns the core, numbers events, and hands them to the writer.
//!
//! Requests arrive over a bounded channel and are handled strictly in arrival order: a
//! command is decided and applied at once (so the next command sees its effect), its events
//! are numbered and queued for the writer in that same order, and the caller gets back the
//! response together with the writer's acknowledgement. The caller sends the response only
//! once the acknowledgement resolves, i.e. once everything the response depends on is
//! durable. Reads and rejections wait the same way (an empty append is a barrier), so no
//! client ever sees a fact that a crash could take back.

use crate::clock;
use crate::metrics::Metrics;
use hale_core::{AgentName, AgentRecord, Command, Core, Effect, Event, Progress, Rejection, State, Timestamp};
use hale_proto::{RecoveryPointInfo, RolledBack, Welcome};
use hale_store::{AppendAck, Durability, Key, Record, WriteError, Writer, snapshot};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// What a successful command answers.
#[derive(Debug)]
pub enum Response {
    Welcome(Box<Welcome>),
    Checkpointed {
        version: u64,
    },
    RecoveryPointMarked(RecoveryPointInfo),
    RolledBack(RolledBack),
    /// A supervision command was carried out (it may have changed nothing).
    Done,
    /// A task was accepted (`new`), or an earlier one with the same idempotency key found.
    TaskSubmitted {
        task: u64,
        new: bool,
    },
    /// Spending was reserved as number `reservation`.
    Reserved {
        reservation: u64,
    },
    /// A message was sent (`new`), or an earlier send with the same key found.
    Sent(hale_proto::Sent),
}

/// Why the engine did not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error(transparent)]
    Log(#[from] WriteError),
    #[error("hale is shutting down; reconnect to the next instance")]
    ShuttingDown,
}

type Read = Box<dyn FnOnce(&Core) + Send>;

enum Request {
    Execute {
        command: Command,
        reply: oneshot::Sender<(Result<Response, EngineError>, AppendAck)>,
    },
    Heartbeat {
        agent: AgentName,
        incarnation: u64,
        progress: Option<Progress>,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    ReportError {
        agent: AgentName,
        incarnation: u64,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    Read {
        read: Read,
        reply: oneshot::Sender<AppendAck>,
    },
    Shutdown {
        reply: oneshot::Sender<Option<Writer>>,
    },
    /// Turns restarts and recruits on (agents reconciled) or off (hale stopping them).
    Supervise {
        on: bool,
        reply: oneshot::Sender<()>,
    },
}

/// Snapshot policy.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    pub dir: PathBuf,
    pub every_events: u64,
    pub every: Duration,
    pub kept: usize,
}

/// A cloneable handle to the engine task.
#[derive(Clone)]
pub struct Engine {
    requests: mpsc::Sender<Request>,
    durability: watch::Receiver<Durability>,
    events: broadcast::Sender<Arc<DurableEvent>>,
}

/// An event that is in the log for good (committed and fsync'd), as record `seq`.
#[derive(Debug)]
pub struct DurableEvent {
    pub seq: u64,
    pub at: Timestamp,
    pub event: Event,
}

/// How many durable events a subscriber may fall behind before it is told it lagged (and
/// reads the rest from the log): a slow reader must not hold the engine or the memory.
pub const EVENTS_BUFFERED: usize = 1024;

/// What the forwarder passes on once a barrier is durable.
type Outputs = (AppendAck, Vec<Effect>, Vec<Arc<DurableEvent>>);

/// How often the core's timers and detectors are consulted.
pub const TICK: Duration = Duration::from_millis(50);

impl Engine {
    /// Starts the engine task over a recovered core whose last event is `last_seq`.
    /// Effects go to `effects`, each only once the events that caused it are durable.
    /// With `key`, every record and snapshot is sealed with it (encryption at rest).
    /// `metrics` is told of every event as it is applied, and of runs that speak.
    pub fn start(
        core: Core,
        last_seq: u64,
        writer: Writer,
        policy: SnapshotPolicy,
        effects: mpsc::UnboundedSender<Effect>,
        key: Option<Key>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        let (requests, receiver) = mpsc::channel(4096);
        let (pending_effects, pending) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        tokio::spawn(forward_effects(pending, effects, events.clone()));
        let durability = writer.durability();
        let task = EngineTask {
            work_moved: false,
            core,
            next_seq: last_seq + 1,
            writer: Some(Arc::new(writer)),
            policy,
            events_since_snapshot: 0,
            last_snapshot: Instant::now(),
            snapshot_in_flight: None,
            pending_effects,
            key,
            metrics,
            events: events.clone(),
            published: Vec::new(),
        };
        tokio::spawn(task.run(receiver));
        Engine { requests, durability, events }
    }

    /// Every event from now on, in log order, each once it is durable. A subscriber more
    /// than [`EVENTS_BUFFERED`] events behind gets `Lagged` and must read the log to catch
    /// up. Events decided before this call may be missed; an [`Engine::read`] after it
    /// waits until they are durable, so the log has them.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<DurableEvent>> {
        self.events.subscribe()
    }

    /// A heartbeat: volatile, answered at once (nothing about it is logged here).
    pub async fn heartbeat(
        &self,
        agent: AgentName,
        incarnation: u64,
        progress: Option<Progress>,
    ) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Heartbeat { agent, incarnation, progress, reply };
        self.requests.send(request).await.map_err(|_| EngineError::ShuttingDown)?;
        Ok(answer.await.map_err(|_| EngineError::ShuttingDown)??)
    }

    /// An error the agent reports, for its breaker: volatile, answered at once.
    pub async fn report_error(&self, agent: AgentName, incarnation: u64) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::ReportError { agent, incarnation, reply };
        self.requests.send(request).await.map_err(|_| EngineError::ShuttingDown)?;
        Ok(answer.await.map_err(|_| EngineError::ShuttingDown)??)
    }

    /// Carries out `command`; resolves once the outcome is durable.
    pub async fn execute(&self, command: Command) -> Result<Response, EngineError> {
        self.submit(command).await.durable().await
    }

    /// Has `command` decided and applied, in the order `submit` is called, and returns
    /// the outcome still held back until it is durable. Sessions use this to pipeline.
    pub async fn submit(&self, command: Command) -> Submitted {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Execute { command, reply }).await.is_err() {
            return Submitted { outcome: Err(EngineError::ShuttingDown), ack: closed_ack() };
        }
        match answer.await {
            Ok((outcome, ack)) => Submitted { outcome, ack },
            Err(_) => Submitted { outcome: Err(EngineError::ShuttingDown), ack: closed_ack() },
        }
    }

    /// Runs `read` against the state; resolves once everything it saw is durable.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        self.read_core(move |core| read(core.state())).await
    }

    /// Like [`read`](Engine::read), with the volatile liveness table in view too.
    pub async fn read_core<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (result_tx, result) = oneshot::channel();
        let read: Read = Box::new(move |state| {
            let _ = result_tx.send(read(state));
        });
        let (reply, ack) = oneshot::channel();
        self.requests.send(Request::Read { read, reply }).await.map_err(|_| EngineError::ShuttingDown)?;
        wait_durable(ack.await.map_err(|_| EngineError::ShuttingDown)?).await?;
        result.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Whether the core restarts managed agents and recruits for pools: on once the
    /// supervisor has reconciled the log with the machine, off while it stops them all.
    /// Resolves once the engine has taken it in.
    pub async fn set_supervising(&self, on: bool) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Supervise { on, reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    /// What the writer has made durable, and whether it has failed.
    pub fn durability(&self) -> Durability {
        self.durability.borrow().clone()
    }

    /// Stops the engine: refuses later requests, takes a final snapshot if the log is
    /// healthy, then flushes and stops the writer.
    pub async fn shutdown(&self) {
        let (reply, writer) = oneshot::channel();
        if self.requests.send(Request::Shutdown { reply }).await.is_err() {
            return;
        }
        if let Ok(Some(writer)) = writer.await {
            let _ = tokio::task::spawn_blocking(move || writer.shutdown()).await;
        }
    }
}

/// A decided command whose outcome may not be told until it is durable.
pub struct Submitted {
    outcome: Result<Response, EngineError>,
    ack: AppendAck,
}

impl Submitted {
    /// The outcome as decided, to look at (not to tell anyone) before it is durable.
    pub fn peek(&self) -> &Result<Response, EngineError> {
        &self.outcome
    }

    /// Waits until the outcome is durable, then returns it.
    pub async fn durable(self) -> Result<Response, EngineError> {
        wait_durable(self.ack).await?;
        self.outcome
    }
}

/// Passes effects on in order, each batch once the barrier queued after its events is
/// durable: nothing outside acts on an event a crash could take back. The events
/// themselves go to the subscribers of [`Engine::subscribe_events`] the same way.
async fn forward_effects(
    mut pending: mpsc::UnboundedReceiver<Outputs>,
    effects: mpsc::UnboundedSender<Effect>,
    events: broadcast::Sender<Arc<DurableEvent>>,
) {
    let mut routing = true;
    while let Some((barrier, batch, published)) = pending.recv().await {
        if wait_durable(barrier).await.is_err() {
            // The log failed: what these effects stand on may be lost. Act on nothing more.
            tracing::error!(dropped = batch.len(), "the log failed; effects of unlogged events are dropped");
            continue;
        }
        for effect in batch {
            routing = routing && effects.send(effect).is_ok();
        }
        for event in published {
            // No subscriber is fine: the log keeps everything.
            let _ = events.send(event);
        }
    }
}

async fn wait_durable(ack: AppendAck) -> Result<(), EngineError> {
    match ack.await {
        Ok(result) => Ok(result?),
        Err(_) => Err(EngineError::Log(WriteError::Stopped)),
    }
}

struct EngineTask {
    core: Core,
    next_seq: u64,
    writer: Option<Arc<Writer>>,
    policy: SnapshotPolicy,
    events_since_snapshot: u64,
    last_snapshot: Instant,
    snapshot_in_flight: Option<tokio::task::JoinHandle<()>>,
    pending_effects: mpsc::UnboundedSender<Outputs>,
    /// Where durable events go, and the ones waiting for the next barrier. Events are
    /// copied only while someone subscribes: the hot path pays nothing otherwise.
    events: broadcast::Sender<Arc<DurableEvent>>,
    published: Vec<Arc<DurableEvent>>,
    /// A command queued or freed work, or lost an agent: assign now, not at the next tick.
    work_moved: bool,
    /// Records and snapshots are sealed with this key (encryption at rest), if set.
    key: Option<Key>,
    /// Counts events as they are applied (see `crate::metrics`).
    metrics: Arc<Metrics>,
}

impl EngineTask {
    async fn run(mut self, mut receiver: mpsc::Receiver<Request>) {
        let mut timer = tokio::time::interval(TICK);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = tokio::select! {
                request = receiver.recv() => request,
                _ = timer.tick() => {
                    self.tick().await;
                    self.maybe_snapshot(false);
                    continue;
                }
            };
            let Some(request) = request else { break };
            match request {
                Request::Execute { command, reply } => {
                    let Some(writer) = self.writer.clone() else {
                        let _ = reply.send((Err(EngineError::ShuttingDown), closed_ack()));
                        continue;
                    };
                    let (outcome, records) = self.execute(&writer, command);
                    let ack = writer.append(records).await;
                    let _ = reply.send((outcome, ack));
                    if self.work_moved {
                        self.dispatch(&writer).await;
                    }
                    self.flush_effects(&writer).await;
                    self.maybe_snapshot(false);
                }
                Request::Heartbeat { agent, incarnation, progress, reply } => {
                    let now = clock::now();
                    let beat = self.core.heartbeat(now, &agent, incarnation, progress);
                    if beat.is_ok() {
                        self.metrics.resumed(&agent, incarnation, now);
                    }
                    let _ = reply.send(beat);
                    // A challenge answered, or not: effects of heartbeats are volatile.
                    if let Some(writer) = self.writer.clone() {
                        self.flush_effects(&writer).await;
                    }
                }
                Request::ReportError { agent, incarnation, reply } => {
                    let _ = reply.send(self.core.report_error(clock::now(), &agent, incarnation));
                }
                Request::Read { read, reply } => {
                    let Some(writer) = self.writer.clone() else {
                        drop(read);
                        let _ = reply.send(closed_ack());
                        continue;
                    };
                    read(&self.core);
                    let _ = reply.send(writer.append(Vec::new()).await);
                }
                Request::Supervise { on, reply } => {
                    self.core.set_supervising(on);
                    let _ = reply.send(());
                }
                Request::Shutdown { reply } => {
                    if let Some(in_flight) = self.snapshot_in_flight.take() {
                        let _ = in_flight.await;
                    }
                    self.maybe_snapshot(true);
                    if let Some(in_flight) = self.snapshot_in_flight.take() {
                        let _ = in_flight.await;
                    }
                    let writer = self.writer.take().and_then(Arc::into_inner);
                    let _ = reply.send(writer);
                }
            }
        }
    }

    /// Assigns what can be assigned right away (and fails what must fail), so that a lost
    /// agent's tasks move within the command that lost it rather than at the next tick.
    async fn dispatch(&mut self, writer: &Writer) {
        // Each pass's commands can free more work (a cascade): bounded, the tick catches up.
        for _ in 0..4 {
            self.work_moved = false;
            let commands = self.core.dispatch(clock::now());
            if commands.is_empty() {
                break;
            }
            let mut logged = 0;
            for command in commands {
                let (outcome, records) = self.execute(writer, command);
                if let Err(error) = outcome {
                    tracing::debug!(%error, "a dispatch command was refused");
                }
                logged += records.len();
                drop(writer.append(records).await);
            }
            if logged == 0 || !self.work_moved {
                break;
            }
        }
        self.work_moved = false;
    }

    /// Runs what the core's timers and detectors ask for, like any other command.
    async fn tick(&mut self) {
        let Some(writer) = self.writer.clone() else { return };
        let commands = self.core.tick(clock::now());
        for command in commands {
            let kind = command_kind(&command);
            let (outcome, records) = self.execute(&writer, command);
            if let Err(error) = outcome {
                tracing::warn!(%error, kind, "a command from the detectors was refused");
            }
            // Nobody waits for these acks: effects wait on their own barrier.
            drop(writer.append(records).await);
        }
        self.flush_effects(&writer).await;
    }

    /// Hands the effects the core queued, and the events for subscribers, to the
    /// forwarder, behind a barrier.
    async fn flush_effects(&mut self, writer: &Writer) {
        let mut batch = Vec::new();
        while let Some(effect) = self.core.poll_effect() {
            batch.push(effect);
        }
        if batch.is_empty() && self.published.is_empty() {
            return;
        }
        let barrier = writer.append(Vec::new()).await;
        let _ = self.pending_effects.send((barrier, batch, std::mem::take(&mut self.published)));
    }

    fn execute(&mut self, writer: &Writer, command: Command) -> (Result<Response, EngineError>, Vec<Record>) {
        if let Some(reason) = writer.durability().borrow().failed.clone() {
            return (Err(WriteError::Failed(reason).into()), Vec::new());
        }
        let now = clock::now();
        let events = match self.core.decide(&command, now) {
            Ok(events) => events,
            Err(rejection) => {
                if let Rejection::Overloaded { priority, .. } = &rejection {
                    self.metrics.shed(priority);
                }
                return (Err(rejection.into()), Vec::new());
            }
        };
        // Counted as applied: a log failure after this stops hale taking writes at all.
        self.metrics.observe(&self.core, now, &events);
        let publish = self.events.receiver_count() > 0;
        let records: Vec<Record> = events
            .iter()
            .map(|event| {
                let record = Record::encode_with(self.next_seq, now, event, self.key.as_ref());
                if publish {
                    let event = event.clone();
                    self.published.push(Arc::new(DurableEvent { seq: self.next_seq, at: now, event }));
                }
                self.next_seq += 1;
                record
            })
            .collect();
        self.events_since_snapshot += records.len() as u64;
        let facts = Facts::of(&events);
        self.work_moved |= facts.moves_work;
        // Encoded already: the events' parts can move into the state.
        for event in events {
            self.core.apply_live(now, event);
        }
        if let Command::SubmitTask { spec } = &command {
            // A resubmit with a known key logs nothing and answers with the first task.
            let task = facts.task.or_else(|| {
                let key = spec.idempotency_key.as_deref()?;
                self.core.state().tasks().by_key(key).map(|task| task.id)
            });
            return (
                Ok(Response::TaskSubmitted { task: task.unwrap_or_default(), new: facts.task.is_some() }),
                records,
            );
        }
        if let Some(reservation) = facts.reservation {
            return (Ok(Response::Reserved { reservation }), records);
        }
        if let Command::SendMessage { from, key, .. } = &command {
            return (Ok(Response::Sent(sent(self.core.state(), from, key.as_deref(), facts.sent))), records);
        }
        let state = self.core.state();
        let record = command.agent().and_then(|agent| state.agent(agent.as_str()));
        if let (Command::Hello(hello), Some(record)) = (&command, record) {
            self.metrics.resumed(&hello.agent, record.incarnation, now);
        }
        (Ok(respond(state, &command, facts, record)), records)
    }

    /// Starts a snapshot if the policy says so (or `force`) and none is being written.
    fn maybe_snapshot(&mut self, force: bool) {
        if self.events_since_snapshot == 0 {
            return;
        }
        let due = force
            || self.events_since_snapshot >= self.policy.every_events
            || self.last_snapshot.elapsed() >= self.policy.every;
        if !due || self.snapshot_in_flight.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Some(writer) = self.writer.clone() else { return };
        if writer.durability().borrow().failed.is_some() {
            // Memory is ahead of disk: a snapshot now could hold events the log lost.
            return;
        }
        let seq = self.next_seq - 1;
        let state = self.core.state().clone();
        let policy = self.policy.clone();
        let key = self.key.clone();
        self.events_since_snapshot = 0;
        self.last_snapshot = Instant::now();
        self.snapshot_in_flight = Some(tokio::spawn(async move {
            // Only durable state may be snapshotted: wait for everything up to `seq`.
            let barrier = writer.append(Vec::new()).await;
            drop(writer);
            if !matches!(barrier.await, Ok(Ok(()))) {
                return;
            }
            let written = tokio::task::spawn_blocking(move || -> Result<(PathBuf, usize), hale_store::StoreError> {
                let encoded = snapshot::encode_with(seq, clock::now(), &state, key.as_ref());
                let path = snapshot::write(&policy.dir, seq, &encoded)?;
                snapshot::prune(&policy.dir, policy.kept)?;
                Ok((path, encoded.len()))
            })
            .await;
            match written {
                Ok(Ok((path, bytes))) => tracing::info!(seq, bytes, path = %path.display(), "snapshot written"),
                Ok(Err(error)) => tracing::error!(%error, "snapshot failed; the log still holds everything"),
                Err(error) => tracing::error!(%error, "snapshot task failed"),
            }
        }));
    }
}

fn command_kind(command: &Command) -> &'static str {
    match command {
        Command::StartManaged { .. } => "start_managed",
        Command::ReportDown { .. } => "report_down",
        Command::RecordProgress { .. } => "record_progress",
        Command::OpenBreaker { .. } | Command::HalfOpenBreaker { .. } | Command::CloseBreaker { .. } => "breaker",
        Command::Recruit { .. } => "recruit",
        _ => "other",
    }
}

fn closed_ack() -> AppendAck {
    let (ack, done) = oneshot::channel();
    let _ = ack.send(Err(WriteError::Stopped));
    done
}

/// What an answer needs from the events of a command, read before they are applied.
struct Facts {
    /// A hello resumed the run it named (it started no new incarnation).
    resumed: bool,
    /// The version a rollback returned to.
    target_version: Option<u64>,
    /// The number a submitted task got.
    task: Option<u64>,
    /// The number a reservation got.
    reservation: Option<u64>,
    /// What a send made.
    sent: Option<hale_proto::Sent>,
    /// Work may have become assignable: a task queued or freed, an agent lost.
    moves_work: bool,
}

impl Facts {
    fn of(events: &[Event]) -> Facts {
        let mut facts =
            Facts { resumed: true, target_version: None, task: None, reservation: None, sent: None, moves_work: false };
        for event in events {
            match event {
                Event::IncarnationStarted { .. } => facts.resumed = false,
                Event::RolledBack { target_version, .. } => facts.target_version = Some(*target_version),
                Event::TaskSubmitted { task, .. } => facts.task = facts.task.or(Some(*task)),
                Event::BudgetReserved { reservation, .. } => facts.reservation = Some(*reservation),
                Event::MessageSent { id, seq, to, conversation, .. } => {
                    facts.sent = Some(hale_proto::Sent {
                        message: *id,
                        to: to.to_string(),
                        seq: *seq,
                        conversation: conversation.to_string(),
                        new: true,
                    })
                }
                _ => {}
            }
            facts.moves_work |= matches!(
                event,
                Event::TaskSubmitted { .. }
                    | Event::TaskRetried { .. }
                    | Event::TaskCompleted { .. }
                    | Event::TaskFailed { .. }
                    | Event::TaskCancelled { .. }
                    | Event::TaskCompensating { .. }
                    | Event::AgentDown { .. }
                    | Event::Quarantined { .. }
                    | Event::BudgetBreached { .. }
                    | Event::BreakerOpened { .. }
            );
        }
        facts
    }
}

/// The answer to a send: what it made, or (a retry with a known key) what the first made.
fn sent(state: &State, from: &AgentName, key: Option<&str>, made: Option<hale_proto::Sent>) -> hale_proto::Sent {
    made.or_else(|| {
        let first = state.mail().mailbox(from.as_str())?.sent_with_key(key?)?;
        Some(hale_proto::Sent {
            message: first.message,
            to: first.to.to_string(),
            seq: first.seq,
            conversation: first.conversation.to_string(),
            new: false,
        })
    })
    .expect("a send that logs nothing is a retry of a remembered key")
}

/// The answer to a command that succeeded, from the state after its events.
fn respond(state: &State, command: &Command, facts: Facts, record: Option<&AgentRecord>) -> Response {
    let data = matches!(
        command,
        Command::Hello(_) | Command::Checkpoint { .. } | Command::MarkRecoveryPoint { .. } | Command::Rollback { .. }
    );
    let Some(record) = record.filter(|_| data) else { return Response::Done };
    match command {
        Command::Hello(_) => Response::Welcome(Box::new(welcome(state, record, facts.resumed))),
        Command::Checkpoint { .. } => Response::Checkpointed { version: record.version() },
        Command::MarkRecoveryPoint { name, .. } => {
            let point = &record.recovery_points[name];
            Response::RecoveryPointMarked(RecoveryPointInfo {
                name: name.to_string(),
                version: point.version,
                marked_at_ms: point.marked_at.0,
            })
        }
        Command::Rollback { .. } => {
            let target_version = facts.target_version.expect("a rollback emits RolledBack");
            Response::RolledBack(RolledBack {
                version: record.version(),
                target_version,
                state: serde_json::Value::clone(record.state()),
            })
        }
        Command::Declare { .. }
        | Command::StartManaged { .. }
        | Command::ProcessStarted { .. }
        | Command::ReportDown { .. }
        | Command::Restart { .. }
        | Command::Stop { .. }
        | Command::RecordProgress { .. }
        | Command::OpenBreaker { .. }
        | Command::HalfOpenBreaker { .. }
        | Command::CloseBreaker { .. }
        | Command::ReportViolation { .. }
        | Command::Quarantine { .. }
        | Command::Release { .. }
        | Command::DeclareRole { .. }
        | Command::Recruit { .. }
        | Command::SubmitTask { .. }
        | Command::AssignTask { .. }
        | Command::CommitStep { .. }
        | Command::CompleteTask { .. }
        | Command::FailTask { .. }
        | Command::CancelTask { .. }
        | Command::ExpireTask { .. }
        | Command::IntendStep { .. }
        | Command::SetMode { .. }
        | Command::Reserve { .. }
        | Command::ReportSpend { .. }
        | Command::IssueTokens { .. }
        | Command::RefreshTokens { .. }
        | Command::RevokeTokens { .. }
        | Command::SendMessage { .. }
        | Command::AckMessage { .. }
        | Command::EndConversation { .. }
        | Command::RecordHookOutcome { .. } => Response::Done,
    }
}

/// Everything an agent needs to resume, from its record and its mailbox.
pub fn welcome(state: &State, record: &AgentRecord, resumed: bool) -> Welcome {
    let mailbox = crate::api::mail::summary(state, &record.name);
    Welcome {
        protocol: hale_proto::PROTOCOL_VERSION,
        agent: record.name.to_string(),
        role: record.role.to_string(),
        labels: record.labels.clone(),
        incarnation: record.incarnation,
        resumed,
        version: record.version(),
        state: serde_json::Value::clone(record.state()),
        recovery_points: recovery_points(record),
        history: record.history().collect(),
        session: format!("{}/{}", record.name, record.incarnation),
        unacked: mailbox.unacked,
        conversations: mailbox.conversations,
        pending_replies: mailbox.pending_replies,
    }
}

/// The agent's recovery points, in name order.
pub fn recovery_points(record: &AgentRecord) -> Vec<RecoveryPointInfo> {
    record
        .recovery_points
        .iter()
        .map(|(name, point)| RecoveryPointInfo {
            name: name.to_string(),
            version: point.version,
            marked_at_ms: point.marked_at.0,
        })
        .collect()
}
