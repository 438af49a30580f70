//! The engine: one task that owns the core, numbers its events, appends them to the log,
//! and releases what depends on them once the log says they are durable.
//!
//! Requests arrive over a bounded channel and are handled strictly in arrival order: a
//! command is decided and applied at once (`Core::execute`, so the next command sees its
//! effect), its events are numbered and appended to the [`DurableLog`] in that same order,
//! and the caller gets back the core's answer together with a [`DurableAck`] for the
//! position of the last event decided so far. The caller tells nobody the answer before
//! the ack resolves. Rejections and reads wait the same way (for the position of what they
//! saw), and the effects and published events of a command wait for its position too: no
//! client and no process ever acts on a fact that a crash could take back.
//!
//! The engine never waits for the log inside a request: it appends and moves on, and
//! releases held answers, effects and events when the log's durable position moves (see
//! [`Held`]). That is the seam a replicated log plugs into: "durable" then means
//! committed by a quorum, and the durable position is Raft's commit index.

use crate::api::wire;
use crate::clock::Clock;
use crate::metrics::Metrics;
use hale_core::{AgentName, Answer, Command, Core, Decision, Effect, Event, Observation, Rejection, State, Timestamp};
use hale_store::{Durability, DurableLog, Key, Record, WriteError, snapshot};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

#[cfg(test)]
mod tests;

/// What a successful command answers.
#[derive(Debug)]
pub enum Response {
    /// The core's answer.
    Answer(Answer),
    /// A hello's answer: everything the run needs to resume, read in the same moment the
    /// hello was decided.
    Welcome(Box<hale_proto::Welcome>),
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

/// Resolves once what it stands for is durable, or says why it never will be.
pub type DurableAck = oneshot::Receiver<Result<(), WriteError>>;

type Read = Box<dyn FnOnce(&Core) + Send>;

enum Request {
    Execute {
        command: Command,
        reply: oneshot::Sender<(Result<Response, EngineError>, DurableAck)>,
    },
    Observe {
        agent: AgentName,
        incarnation: u64,
        observation: Observation,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    Read {
        read: Read,
        reply: oneshot::Sender<DurableAck>,
    },
    Tick {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// Turns restarts and recruits on (agents reconciled) or off (hale stopping them).
    Supervise {
        on: bool,
        reply: oneshot::Sender<()>,
    },
    Rebuild {
        core: Box<Core>,
        last_seq: u64,
        reply: oneshot::Sender<()>,
    },
    /// A node of a cluster that does not lead takes the committed state in, for reads
    /// that accept it (ignored once the node leads).
    Refresh {
        core: Box<Core>,
        last_seq: u64,
    },
    /// A read of the state as it is, durable or not (a follower's stale read).
    ReadNow {
        read: Read,
    },
}

tokio::task_local! {
    /// Set for a request that accepts a stale read on a node that does not lead
    /// (`Hale-Read: stale-ok`); becomes `true` once a read was served that way.
    pub static STALE_READ: std::cell::Cell<bool>;
}

/// Whether the request being served accepts a stale read (see [`STALE_READ`]).
fn stale_ok() -> bool {
    STALE_READ.try_with(|_| ()).is_ok()
}

/// Snapshot policy.
#[derive(Clone, Debug)]
pub struct SnapshotPolicy {
    pub dir: PathBuf,
    pub every_events: u64,
    pub every: Duration,
    pub kept: usize,
}

/// How the engine runs, besides its core and its log.
pub struct EngineOptions {
    pub snapshots: SnapshotPolicy,
    /// Where effects go, each once the events that caused it are durable.
    pub effects: mpsc::UnboundedSender<Effect>,
    /// With a key, every record and snapshot is sealed with it (encryption at rest).
    pub key: Option<Key>,
    /// Told of every event as it is applied, and of runs that speak.
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// How often the core's timers and detectors run: [`TICK`], or only when
    /// [`Engine::tick`] asks (tests that drive time themselves).
    pub tick: Option<Duration>,
    /// Events the log holds past its newest snapshot (those recovery replayed): counted as
    /// not yet snapshotted, so a graceful stop snapshots them even if it logged nothing new.
    pub unsnapshotted: u64,
}

/// A cloneable handle to the engine task.
#[derive(Clone)]
pub struct Engine {
    requests: mpsc::Sender<Request>,
    durability: watch::Receiver<Durability>,
    events: broadcast::Sender<Arc<DurableEvent>>,
    /// Awaited before each read (a node of a cluster: its read index).
    read_barrier: Option<hale_store::ReadBarrier>,
}

/// An event that is in the log for good (durable), as record `seq`.
#[derive(Debug)]
pub struct DurableEvent {
    pub seq: u64,
    pub at: Timestamp,
    pub event: Event,
}

/// How many durable events a subscriber may fall behind before it is told it lagged (and
/// reads the rest from the log): a slow reader must not hold the engine or the memory.
pub const EVENTS_BUFFERED: usize = 1024;

/// How often the core's timers and detectors are consulted.
pub const TICK: Duration = Duration::from_millis(50);

impl Engine {
    /// Starts the engine task over a recovered core whose last event is `last_seq`, which
    /// `log` holds durably.
    pub fn start<L: DurableLog>(core: Core, last_seq: u64, log: L, options: EngineOptions) -> Engine {
        let (requests, receiver) = mpsc::channel(4096);
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        let durability = log.durability();
        let read_barrier = log.read_barrier();
        let last_snapshot = options.clock.now();
        let task = EngineTask {
            core,
            next_seq: last_seq + 1,
            durability: durability.clone(),
            log: Some(log),
            log_running: true,
            held: VecDeque::new(),
            policy: options.snapshots,
            events_since_snapshot: options.unsnapshotted,
            last_snapshot,
            snapshot_in_flight: None,
            effects: options.effects,
            events: events.clone(),
            published: Vec::new(),
            key: options.key,
            metrics: options.metrics,
            clock: options.clock,
        };
        tokio::spawn(task.run(receiver, options.tick));
        Engine { requests, durability, events, read_barrier }
    }

    /// Replaces the core with `core`, whose last event is `last_seq` (the committed state
    /// of a replicated log), dropping what was speculative: held answers fail with
    /// `not_leader`. A node that is about to lead again calls it before its log takes
    /// appends, so decisions start from what a quorum committed.
    pub async fn rebuild(&self, core: Core, last_seq: u64) -> Result<(), EngineError> {
        let (reply, done) = oneshot::channel();
        let request = Request::Rebuild { core: Box::new(core), last_seq, reply };
        self.requests.send(request).await.map_err(|_| EngineError::ShuttingDown)?;
        done.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Every event from now on, in log order, each once it is durable. A subscriber more
    /// than [`EVENTS_BUFFERED`] events behind gets `Lagged` and must read the log to catch
    /// up. Events decided before this call may be missed; an [`Engine::read`] after it
    /// waits until they are durable, so the log has them.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<DurableEvent>> {
        self.events.subscribe()
    }

    /// A heartbeat (saying the run is in a long call if `busy_ms` is given): volatile,
    /// answered at once (nothing about it is logged here).
    pub async fn heartbeat(
        &self,
        agent: AgentName,
        incarnation: u64,
        progress: Option<hale_core::Progress>,
        busy_ms: Option<u64>,
    ) -> Result<(), EngineError> {
        match busy_ms {
            None => self.observe(agent, incarnation, Observation::Heartbeat(progress)).await,
            Some(ms) => {
                self.observe(agent.clone(), incarnation, Observation::Heartbeat(progress)).await?;
                self.observe(agent, incarnation, Observation::Busy { ms }).await
            }
        }
    }

    /// An error the agent reports, for its breaker: volatile, answered at once.
    pub async fn report_error(&self, agent: AgentName, incarnation: u64) -> Result<(), EngineError> {
        self.observe(agent, incarnation, Observation::Error).await
    }

    /// A volatile input about a run (a heartbeat, an error it reports, a measurement of
    /// its process): answered as soon as the core has taken it in.
    pub async fn observe(
        &self,
        agent: AgentName,
        incarnation: u64,
        observation: Observation,
    ) -> Result<(), EngineError> {
        // A node of a cluster that does not lead knows nothing current about runs: its
        // answer (alive, unknown, fenced) would be about a state the leader has left.
        if let Some(not_leader) = &self.durability.borrow().not_leader {
            return Err(WriteError::NotLeader { leader: not_leader.leader.clone() }.into());
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::Observe { agent, incarnation, observation, reply };
        self.requests.send(request).await.map_err(|_| EngineError::ShuttingDown)?;
        Ok(answer.await.map_err(|_| EngineError::ShuttingDown)??)
    }

    /// Carries out `command`; resolves once the outcome is durable.
    pub async fn execute(&self, command: impl Into<Command>) -> Result<Response, EngineError> {
        self.submit(command.into()).await.durable().await
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
    ///
    /// On a node of a cluster the read is linearizable: the node first confirms with a
    /// quorum that it still leads (its log's read barrier), and its state holds everything
    /// committed before that, so the read sees every write acknowledged before it began.
    pub async fn read_core<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        if stale_ok() && self.durability.borrow().not_leader.is_some() {
            // A follower's committed state, as of its last refresh: said to be stale.
            let (result_tx, result) = oneshot::channel();
            let read: Read = Box::new(move |state| {
                let _ = result_tx.send(read(state));
            });
            self.requests.send(Request::ReadNow { read }).await.map_err(|_| EngineError::ShuttingDown)?;
            let _ = STALE_READ.try_with(|served| served.set(true));
            return result.await.map_err(|_| EngineError::ShuttingDown);
        }
        if let Some(barrier) = &self.read_barrier {
            barrier().await?;
        }
        let (result_tx, result) = oneshot::channel();
        let read: Read = Box::new(move |state| {
            let _ = result_tx.send(read(state));
        });
        let (reply, ack) = oneshot::channel();
        self.requests.send(Request::Read { read, reply }).await.map_err(|_| EngineError::ShuttingDown)?;
        wait_durable(ack.await.map_err(|_| EngineError::ShuttingDown)?).await?;
        result.await.map_err(|_| EngineError::ShuttingDown)
    }

    /// Runs the core's timers and detectors now (the engine does so every [`TICK`] unless
    /// it was started without a tick); resolves once their commands are decided.
    pub async fn tick(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Tick { reply }).await.is_ok() {
            let _ = done.await;
        }
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

    /// What the log has made durable, and whether it has failed.
    pub fn durability(&self) -> Durability {
        self.durability.borrow().clone()
    }

    /// [`durability`](Engine::durability) as it changes (on a cluster node: whether it
    /// leads).
    pub fn watch_durability(&self) -> watch::Receiver<Durability> {
        self.durability.clone()
    }

    /// On a node of a cluster that does not lead: takes in `core`, the committed state
    /// whose last record is `last_seq`, for the reads that accept a stale answer. Ignored
    /// by an engine that leads.
    pub async fn refresh(&self, core: Core, last_seq: u64) {
        let _ = self.requests.send(Request::Refresh { core: Box::new(core), last_seq }).await;
    }

    /// Stops the engine: refuses later requests, takes a final snapshot if the log is
    /// healthy, then flushes and stops the log. Resolves once the log has stopped.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.requests.send(Request::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// A decided command whose outcome may not be told until it is durable.
pub struct Submitted {
    outcome: Result<Response, EngineError>,
    ack: DurableAck,
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

async fn wait_durable(ack: DurableAck) -> Result<(), EngineError> {
    match ack.await {
        Ok(result) => Ok(result?),
        Err(_) => Err(EngineError::Log(WriteError::Stopped)),
    }
}

fn closed_ack() -> DurableAck {
    let (ack, done) = oneshot::channel();
    let _ = ack.send(Err(WriteError::Stopped));
    done
}

/// What waits for the log: released, in order, once the log is durable up to `position`.
enum Held {
    /// An answer (or a read) that may be told.
    Answer { position: u64, ack: oneshot::Sender<Result<(), WriteError>> },
    /// Effects to carry out and events to publish.
    Outputs { position: u64, effects: Vec<Effect>, events: Vec<Arc<DurableEvent>> },
}

impl Held {
    fn position(&self) -> u64 {
        match self {
            Held::Answer { position, .. } | Held::Outputs { position, .. } => *position,
        }
    }
}

struct EngineTask<L> {
    core: Core,
    /// The sequence number the next event gets.
    next_seq: u64,
    log: Option<L>,
    durability: watch::Receiver<Durability>,
    /// The log still reports progress (its side of `durability` is alive).
    log_running: bool,
    /// Positions only grow along the queue: it is released from the front.
    held: VecDeque<Held>,
    policy: SnapshotPolicy,
    events_since_snapshot: u64,
    last_snapshot: Timestamp,
    snapshot_in_flight: Option<tokio::task::JoinHandle<()>>,
    effects: mpsc::UnboundedSender<Effect>,
    /// Where durable events go, and the ones waiting for the next release. Events are
    /// copied only while someone subscribes: the hot path pays nothing otherwise.
    events: broadcast::Sender<Arc<DurableEvent>>,
    published: Vec<Arc<DurableEvent>>,
    key: Option<Key>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl<L: DurableLog> EngineTask<L> {
    async fn run(mut self, mut receiver: mpsc::Receiver<Request>, tick: Option<Duration>) {
        let mut timer = tick.map(|every| {
            let mut timer = tokio::time::interval(every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        });
        loop {
            tokio::select! {
                biased;
                changed = self.durability.changed(), if self.log_running => {
                    if changed.is_err() {
                        // The log has stopped: what it made durable is final.
                        self.log_running = false;
                    }
                    self.release();
                }
                request = receiver.recv() => {
                    let Some(request) = request else { break };
                    self.handle(request).await;
                }
                _ = async { timer.as_mut().expect("guarded").tick().await }, if timer.is_some() => {
                    self.tick().await;
                    self.maybe_snapshot(false);
                }
            }
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Execute { command, reply } => {
                let (outcome, moved) = self.execute(command).await;
                let ack = self.hold_answer();
                let _ = reply.send((outcome, ack));
                if moved {
                    self.dispatch().await;
                }
                self.hold_outputs();
                self.maybe_snapshot(false);
            }
            Request::Observe { agent, incarnation, observation, reply } => {
                let now = self.clock.now();
                let heartbeat = matches!(observation, Observation::Heartbeat(_));
                let observed = self.core.observe(now, &agent, incarnation, observation);
                if heartbeat && observed.is_ok() {
                    self.metrics.resumed(&agent, incarnation, now);
                }
                let _ = reply.send(observed);
                // A challenge answered, or not: effects of observations are volatile.
                self.hold_outputs();
            }
            Request::Read { read, reply } => {
                if self.log.is_none() {
                    drop(read);
                    let _ = reply.send(closed_ack());
                    return;
                }
                read(&self.core);
                let _ = reply.send(self.hold_answer());
            }
            Request::Tick { reply } => {
                self.tick().await;
                self.maybe_snapshot(false);
                let _ = reply.send(());
            }
            Request::Supervise { on, reply } => {
                self.core.set_supervising(on);
                let _ = reply.send(());
            }
            Request::Shutdown { reply } => {
                self.shutdown().await;
                let _ = reply.send(());
            }
            Request::Rebuild { core, last_seq, reply } => {
                // Whatever was speculative goes: held answers fail (they may or may not
                // have been committed; clients settle by resuming, as after a reconnect).
                self.fail_held(WriteError::NotLeader { leader: None });
                let supervising = self.core.supervising();
                self.core = *core;
                self.core.set_supervising(supervising);
                self.next_seq = last_seq + 1;
                self.events_since_snapshot = 0;
                let _ = reply.send(());
            }
            Request::Refresh { core, last_seq } => {
                if self.durability.borrow().not_leader.is_some() && self.held.is_empty() {
                    let supervising = self.core.supervising();
                    self.core = *core;
                    self.core.set_supervising(supervising);
                    self.next_seq = last_seq + 1;
                }
            }
            Request::ReadNow { read } => read(&self.core),
        }
    }

    /// Where leadership enters. A single node is always the leader, so only a failed or
    /// stopped log refuses writes here. A replicated log refuses them here too while this
    /// node does not lead (`not_leader`, naming the leader if it knows it); losing
    /// leadership fails what was held with `not_leader` (see `release`), and whoever
    /// hands leadership back rebuilds the core from the committed state first
    /// ([`Engine::rebuild`]).
    fn writable(&self) -> Result<(), EngineError> {
        if self.log.is_none() {
            return Err(EngineError::ShuttingDown);
        }
        let durability = self.durability.borrow();
        if let Some(reason) = durability.failed.clone() {
            return Err(WriteError::Failed(reason).into());
        }
        if let Some(not_leader) = &durability.not_leader {
            return Err(WriteError::NotLeader { leader: not_leader.leader.clone() }.into());
        }
        Ok(())
    }

    /// Decides and applies `command`, appends its events, and says whether it may have
    /// made work assignable.
    async fn execute(&mut self, command: Command) -> (Result<Response, EngineError>, bool) {
        if let Err(error) = self.writable() {
            return (Err(error), false);
        }
        let now = self.clock.now();
        let Decision { events, answer } = match self.core.execute(&command, now) {
            Ok(decision) => decision,
            Err(rejection) => {
                if let Rejection::Overloaded { priority, .. } = &rejection {
                    self.metrics.shed(priority);
                }
                return (Err(rejection.into()), false);
            }
        };
        // Counted as applied: a log failure after this stops hale taking writes at all.
        self.metrics.observe(&self.core, now, &events);
        for event in &events {
            if let Event::AgentDown { agent, incarnation, cause } = event
                && cause.detector() != "operator"
            {
                tracing::warn!(%agent, incarnation, detector = cause.detector(), %cause, "agent declared down");
            }
        }
        let moved = events.iter().any(Event::moves_work);
        self.append(now, events).await;
        let response = match answer {
            Answer::Welcome { agent, incarnation, resumed } => {
                self.metrics.resumed(&agent, incarnation, now);
                let state = self.core.state();
                let record = state.agent(agent.as_str()).expect("a welcomed agent is registered");
                Response::Welcome(Box::new(wire::welcome(state, record, resumed)))
            }
            other => Response::Answer(other),
        };
        (Ok(response), moved)
    }

    /// Numbers, encodes and appends `events`, decided at `now`.
    async fn append(&mut self, now: Timestamp, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let publish = self.events.receiver_count() > 0;
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            records.push(Record::encode_with(self.next_seq, now, &event, self.key.as_ref()));
            if publish {
                self.published.push(Arc::new(DurableEvent { seq: self.next_seq, at: now, event }));
            }
            self.next_seq += 1;
        }
        self.events_since_snapshot += records.len() as u64;
        if let Some(log) = &self.log
            && let Err(error) = log.append(records).await
        {
            // Nothing held past this point will be reported durable: the release fails it.
            tracing::error!(%error, "the log refused an append");
        }
    }

    /// An answer for everything decided so far: it resolves once the last event decided
    /// is durable.
    fn hold_answer(&mut self) -> DurableAck {
        let (ack, done) = oneshot::channel();
        self.held.push_back(Held::Answer { position: self.next_seq - 1, ack });
        self.release();
        done
    }

    /// Holds the effects the core queued, and the events for subscribers, until the last
    /// event decided is durable.
    fn hold_outputs(&mut self) {
        let effects: Vec<Effect> = std::iter::from_fn(|| self.core.poll_effect()).collect();
        if effects.is_empty() && self.published.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.published);
        self.held.push_back(Held::Outputs { position: self.next_seq - 1, effects, events });
        self.release();
    }

    /// Releases, in order, what the log has made durable; fails what it never will.
    fn release(&mut self) {
        let durability = self.durability.borrow().clone();
        if let Some(not_leader) = &durability.not_leader {
            // Deposed: nothing held is this log's to make durable any more (another leader
            // decides what is committed, and may number its records the same). What was
            // committed before is already released; the rest gets `not_leader`.
            self.fail_held(WriteError::NotLeader { leader: not_leader.leader.clone() });
            return;
        }
        while let Some(front) = self.held.front() {
            let durable = front.position() <= durability.durable_seq;
            let never = durability.failed.is_some() || !self.log_running;
            if !durable && !never {
                break;
            }
            match self.held.pop_front().expect("not empty") {
                Held::Answer { ack, .. } => {
                    let outcome = match (&durability.failed, durable) {
                        (_, true) => Ok(()),
                        (Some(reason), false) => Err(WriteError::Failed(reason.clone())),
                        (None, false) => Err(WriteError::Stopped),
                    };
                    let _ = ack.send(outcome);
                }
                Held::Outputs { effects, events, .. } if durable => {
                    for effect in effects {
                        let _ = self.effects.send(effect);
                    }
                    for event in events {
                        // No subscriber is fine: the log keeps everything.
                        let _ = self.events.send(event);
                    }
                }
                Held::Outputs { effects, .. } => {
                    // What these effects stand on may be lost. Act on nothing more.
                    tracing::error!(dropped = effects.len(), "the log failed; effects of unlogged events are dropped");
                }
            }
        }
    }

    /// Fails every held answer with `error` and drops the held outputs (what they stand on
    /// may never be durable).
    fn fail_held(&mut self, error: WriteError) {
        let mut dropped = 0;
        for held in self.held.drain(..) {
            match held {
                Held::Answer { ack, .. } => {
                    let _ = ack.send(Err(error.clone()));
                }
                Held::Outputs { effects, .. } => dropped += effects.len(),
            }
        }
        self.published.clear();
        if dropped > 0 {
            tracing::warn!(dropped, %error, "effects of events that may not be durable are dropped");
        }
    }

    /// Assigns what can be assigned right away (and fails what must fail), so that a lost
    /// agent's tasks move within the command that lost it rather than at the next tick.
    async fn dispatch(&mut self) {
        // Each pass's commands can free more work (a cascade): bounded, the tick catches up.
        for _ in 0..4 {
            let commands = self.core.dispatch(self.clock.now());
            if commands.is_empty() {
                break;
            }
            let (mut logged, mut moved) = (false, false);
            for command in commands {
                let before = self.next_seq;
                let (outcome, more) = self.execute(command).await;
                if let Err(error) = outcome {
                    tracing::debug!(%error, "a dispatch command was refused");
                }
                logged |= self.next_seq > before;
                moved |= more;
            }
            if !logged || !moved {
                break;
            }
        }
    }

    /// Runs what the core's timers and detectors ask for, like any other command.
    async fn tick(&mut self) {
        // Only the leader's detectors and timers decide; a follower's core is not current.
        if self.log.is_none() || self.durability.borrow().not_leader.is_some() {
            return;
        }
        for command in self.core.tick(self.clock.now()) {
            let kind = command_kind(&command);
            let (outcome, _) = self.execute(command).await;
            if let Err(error) = outcome {
                tracing::warn!(%error, kind, "a command from the detectors was refused");
            }
        }
        self.hold_outputs();
    }

    /// Starts a snapshot if the policy says so (or `force`) and none is being written.
    fn maybe_snapshot(&mut self, force: bool) {
        // `kept == 0`: the engine takes none (a cluster node's state machine does).
        if self.events_since_snapshot == 0 || self.log.is_none() || self.policy.kept == 0 {
            return;
        }
        let now = self.clock.now();
        let due = force
            || self.events_since_snapshot >= self.policy.every_events
            || now.0.saturating_sub(self.last_snapshot.0) >= self.policy.every.as_millis() as u64;
        if !due || self.snapshot_in_flight.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        if self.durability.borrow().failed.is_some() {
            // Memory is ahead of disk: a snapshot now could hold events the log lost.
            return;
        }
        let seq = self.next_seq - 1;
        let state = self.core.state().clone();
        let policy = self.policy.clone();
        let key = self.key.clone();
        let mut durability = self.durability.clone();
        self.events_since_snapshot = 0;
        self.last_snapshot = now;
        self.snapshot_in_flight = Some(tokio::spawn(async move {
            // Only durable state may be snapshotted: wait until everything up to `seq` is.
            let durable = durability.wait_for(|d| d.durable_seq >= seq || d.failed.is_some()).await;
            if !durable.is_ok_and(|durable| durable.durable_seq >= seq) {
                return;
            }
            let written = tokio::task::spawn_blocking(move || -> Result<(PathBuf, usize), hale_store::StoreError> {
                let encoded = snapshot::encode_with(seq, now, &state, key.as_ref());
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

    /// Takes a final snapshot, stops the log once it has made everything durable, and
    /// settles everything still held. Later requests are refused.
    async fn shutdown(&mut self) {
        if let Some(in_flight) = self.snapshot_in_flight.take() {
            let _ = in_flight.await;
        }
        self.maybe_snapshot(true);
        if let Some(in_flight) = self.snapshot_in_flight.take() {
            let _ = in_flight.await;
        }
        if let Some(log) = self.log.take() {
            let _ = tokio::task::spawn_blocking(move || log.shutdown()).await;
        }
        self.log_running = false;
        self.release();
    }
}

fn command_kind(command: &Command) -> &'static str {
    use hale_core::{AgentCommand, SupervisionCommand};
    match command {
        Command::Supervision(SupervisionCommand::StartManaged { .. }) => "start_managed",
        Command::Supervision(SupervisionCommand::ReportDown { .. }) => "report_down",
        Command::Supervision(SupervisionCommand::Recruit { .. }) => "recruit",
        Command::Agent(AgentCommand::RecordProgress { .. }) => "record_progress",
        Command::Health(_) => "breaker",
        _ => "other",
    }
}
