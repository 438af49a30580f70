//! The pure core of hale.
//!
//! Everything durable in hale is an [`Event`] in one log, and the state of the whole
//! system is a fold of that log. This crate holds the fold and the rules that produce
//! events:
//!
//! * [`Core::decide`] checks a [`Command`] against the current [`State`] and returns a
//!   [`Decision`]: the events it causes and the [`Answer`] to give once they are durable,
//!   or a [`Rejection`] saying what was wrong. It changes nothing.
//! * [`Core::apply`] folds one event into the state. It never fails and never looks at
//!   anything but the event and the state, so replaying a log always gives the same state.
//! * [`Core::execute`] is `decide` followed by `apply` of every event it returned: what the
//!   shell calls for a live command. It returns the decision, for the shell to log the
//!   events and, once they are durable, give the answer.
//!
//! Architecture invariant: this crate does no I/O, reads no clock, draws no randomness and
//! depends on no async runtime or database crate. Time arrives as a [`Timestamp`] argument.
//! The `clippy.toml` beside this crate's manifest holds that line.

mod agents;
pub mod budget;
mod command;
pub mod credentials;
mod decide;
mod effect;
mod event;
pub mod health;
pub mod hooks;
mod limits;
mod liveness;
pub mod mail;
pub mod measure;
mod merge;
mod names;
pub mod nodes;
pub mod policy;
mod rejection;
mod rng;
mod state;
pub mod supervision;
pub mod tasks;

pub use command::{
    AgentCommand, Answer, BudgetCommand, Command, CredentialCommand, Decision, HealthCommand, Hello, HookCommand,
    MailCommand, Recipient, RollbackTarget, SupervisionCommand, TaskCommand,
};
pub use decide::REASON_BYTES_MAX;
pub use effect::Effect;
pub use event::Event;
pub use limits::{Limits, PATCH_DEPTH_MAX};
pub use liveness::{Health, Liveness, LivenessSettings, PROGRESS_BYTES_MAX, Progress};
pub use measure::{Measurement, Thresholds};
pub use merge::{json_depth, json_size, merge_patch, merged_size};
pub use names::{AgentName, ConversationId, HookName, NameError, NodeName, PointName, RoleName, validate_labels};
pub use rejection::Rejection;
pub use rng::Rng;
pub use state::{AgentRecord, Down, ProgressRecord, RecoveryPoint, State};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use supervision::{Cause, ManagedStatus};

/// Milliseconds since the Unix epoch, as the shell read them from its clock.
///
/// The core never reads a clock; every input that needs time carries one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

/// A volatile input about an agent's run (see [`Core::observe`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// A heartbeat, with the progress it reports.
    Heartbeat(Option<Progress>),
    /// The run is in a call that may take `ms` milliseconds (0: it is over): see
    /// [`Core::busy`].
    Busy { ms: u64 },
    /// An error the agent reports, for its breaker.
    Error,
    /// What the shell measured of a managed run.
    Measured(Measurement),
}

/// The state machine: the folded [`State`], the [`Limits`] that `decide` enforces, and the
/// volatile liveness table.
///
/// Inputs, each taking `now`:
/// * commands: [`execute`](Core::execute) decides and applies, and returns the events to
///   log and the answer to give once they are durable;
/// * observations, volatile ([`observe`](Core::observe)): heartbeats, errors an agent
///   reports, and the shell's measurements of a managed run (memory, CPU, health probes);
/// * time: [`tick`](Core::tick), which returns the commands that timers and detectors call
///   for (due restarts, agents down, stalled or over a threshold, progress to log). The
///   shell executes them like any other command.
///
/// Outputs: [`poll_effect`](Core::poll_effect) drains what the shell must do once the
/// events that caused it are durable. Replay uses [`apply`](Core::apply) and produces no
/// effects.
///
/// Limits are not part of the state: changing a limit never changes what a replay of the
/// log produces, except for how much version history is retained.
#[derive(Clone, Debug)]
pub struct Core {
    state: State,
    limits: Limits,
    /// Seeds the restart jitter (mixed with agent, incarnation and attempt).
    seed: u64,
    /// This hale runs the managed agents' processes.
    supervising: bool,
    settings: LivenessSettings,
    liveness: BTreeMap<AgentName, Liveness>,
    /// Errors agents reported, within the breaker window. Volatile.
    errors: BTreeMap<AgentName, health::ErrorWindow>,
    /// What the resource and probe detectors measured of managed runs. Volatile.
    measured: BTreeMap<AgentName, measure::Measured>,
    /// Since when each role a pending task asked for has had no healthy agent (see
    /// `fallback_grace_ms`). Volatile.
    unserved: BTreeMap<RoleName, Timestamp>,
    effects: VecDeque<Effect>,
}

impl Core {
    /// A core with an empty state.
    pub fn new(limits: Limits) -> Self {
        Self::from_state(State::default(), limits)
    }

    /// A core that continues from a state restored from a snapshot.
    pub fn from_state(state: State, limits: Limits) -> Self {
        Core {
            state,
            limits,
            seed: 0,
            supervising: true,
            settings: LivenessSettings::default(),
            liveness: BTreeMap::new(),
            errors: BTreeMap::new(),
            measured: BTreeMap::new(),
            unserved: BTreeMap::new(),
            effects: VecDeque::new(),
        }
    }

    /// Whether this hale runs the managed agents (`hale up`). Without it (`hale serve`),
    /// `tick` neither restarts managed agents nor recruits for pools, and `Restart` is
    /// refused: nobody would start the processes.
    /// Whether managed agents are started and restarted (see [`set_supervising`](Core::set_supervising)).
    pub fn supervising(&self) -> bool {
        self.supervising
    }

    pub fn set_supervising(&mut self, supervising: bool) {
        self.supervising = supervising;
    }

    /// Sets the seed of the restart jitter (the shell draws one at start).
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// The task queue settings.
    pub fn task_settings(&self) -> &tasks::TaskSettings {
        &self.settings.tasks
    }

    /// Sets the detector and progress settings.
    pub fn set_liveness_settings(&mut self, settings: LivenessSettings) {
        self.settings = settings;
    }

    /// The folded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Takes the state out, e.g. to compare replays in tests.
    pub fn into_state(self) -> State {
        self.state
    }

    /// The limits `decide` enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks `command` against the current state at time `now`; returns the events it
    /// causes (possibly none) and the answer, or why it was refused. Changes nothing.
    pub fn decide(&self, command: &Command, now: Timestamp) -> Result<Decision, Rejection> {
        if !self.supervising
            && let Command::Supervision(
                SupervisionCommand::Restart { agent } | SupervisionCommand::StartManaged { agent },
            ) = command
            && self.state.agent(agent.as_str()).is_some_and(|record| record.managed.is_some())
        {
            return Err(Rejection::NotSupervising { agent: agent.to_string() });
        }
        let context = decide::Context {
            state: &self.state,
            limits: &self.limits,
            settings: &self.settings,
            now,
            seed: self.seed,
        };
        decide::decide(&context, command)
    }

    /// Folds one event, logged at `at`, into the state. Never fails: an event that made it
    /// into the log is a fact.
    pub fn apply(&mut self, at: Timestamp, event: &Event) {
        self.state.apply(&self.limits, at, event.clone());
    }

    /// Like [`apply`](Core::apply) for an event the caller no longer needs (replay): its
    /// parts move into the state instead of being copied.
    pub fn apply_owned(&mut self, at: Timestamp, event: Event) {
        self.state.apply(&self.limits, at, event);
    }

    /// Folds an event decided live at `now`: queues the effects it calls for and keeps the
    /// volatile tables in step, then applies it.
    fn apply_live(&mut self, now: Timestamp, event: Event) {
        self.queue_effects(&event);
        match &event {
            Event::IncarnationStarted { agent, .. } | Event::AgentDown { agent, .. } => {
                self.liveness.remove(agent);
                self.measured.remove(agent);
            }
            // A paused run was not heard from for as long as it was paused: its detectors
            // start again from now.
            Event::Released { agent } => {
                if let Some(live) = self.liveness.get_mut(agent) {
                    live.restart_watch(now, self.settings.reconnect_grace_ms);
                }
                self.measured.remove(agent);
            }
            // Signs of work: the stall detectors start counting again.
            Event::Checkpointed { agent, .. }
            | Event::RolledBack { agent, .. }
            | Event::TaskAssigned { agent, .. }
            | Event::SpendReported { agent, .. } => {
                if let Some(live) = self.liveness.get_mut(agent) {
                    live.worked(now);
                }
            }
            Event::StepIntended { task, .. }
            | Event::StepCommitted { task, .. }
            | Event::TaskCompleted { task, .. }
            | Event::TaskRetried { task, .. }
            | Event::TaskFailed { task, .. }
            | Event::TaskCancelled { task } => {
                if let Some((agent, _)) = self.state.tasks().get(*task).and_then(|found| found.holder())
                    && let Some(live) = self.liveness.get_mut(agent)
                {
                    live.worked(now);
                }
            }
            Event::ProgressReported { agent, progress, .. } => {
                if let Some(live) = self.liveness.get_mut(agent) {
                    live.progress_logged_at = Some(now);
                    live.progress_unlogged = live.progress.as_ref() != Some(progress);
                }
            }
            _ => {}
        }
        self.state.apply(&self.limits, now, event);
    }

    /// Decides `command` at `now` and applies the events at once, so the next command sees
    /// them. The caller logs the events, in order, and gives the answer once they are
    /// durable; the effects they call for wait in [`poll_effect`](Core::poll_effect).
    pub fn execute(&mut self, command: &Command, now: Timestamp) -> Result<Decision, Rejection> {
        let decision = self.decide(command, now)?;
        for event in &decision.events {
            self.apply_live(now, event.clone());
        }
        Ok(decision)
    }

    /// The next thing the shell must do, oldest first.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn queue_effects(&mut self, event: &Event) {
        // A task an agent submitted ended: its outcome goes to that agent's sessions.
        if let Event::TaskCompleted { task, .. } | Event::TaskFailed { task, .. } | Event::TaskCancelled { task } =
            event
            && let Some(by) = self.state.tasks().get(*task).and_then(|found| found.submitted_by.clone())
        {
            self.effects.push_back(Effect::DeliverMail { agent: by });
        }
        let managed =
            event.agent().and_then(|agent| self.state.agent(agent.as_str())).and_then(|record| record.managed.as_ref());
        match event {
            Event::IncarnationStarted { agent, incarnation } => {
                if *incarnation > 1 {
                    self.effects.push_back(Effect::Fence {
                        agent: agent.clone(),
                        incarnation: incarnation - 1,
                        reason: format!("incarnation {incarnation} has started"),
                    });
                }
                if let Some(record) = self.state.agent(agent.as_str())
                    && record.managed.is_some()
                {
                    let role = record.role.clone();
                    self.effects.push_back(Effect::Spawn { agent: agent.clone(), role, incarnation: *incarnation });
                }
            }
            Event::AgentDown { agent, incarnation, cause } => {
                if managed.is_some() && cause.process_may_live() {
                    self.effects.push_back(Effect::Stop { agent: agent.clone(), incarnation: *incarnation });
                }
                // A managed run stopped on purpose gets SIGTERM with its session open, so it
                // can checkpoint its last state and close (see `stopping_or_running`).
                if managed.is_some() && *cause == Cause::Stopped {
                    return;
                }
                self.effects.push_back(Effect::Fence {
                    agent: agent.clone(),
                    incarnation: *incarnation,
                    reason: format!("declared down: {cause}"),
                });
            }
            Event::TaskAssigned { task, agent, incarnation, .. } => {
                self.effects.push_back(Effect::OfferTask {
                    agent: agent.clone(),
                    incarnation: *incarnation,
                    task: *task,
                });
            }
            // The holder of a task that ends or is aborted under it must stop.
            Event::TaskCancelled { task } | Event::TaskFailed { task, .. } | Event::TaskCompensating { task, .. } => {
                if let Some((agent, incarnation)) = self.state.tasks().get(*task).and_then(|found| found.holder()) {
                    let agent = agent.clone();
                    self.effects.push_back(Effect::CancelTask { agent, incarnation, task: *task });
                }
            }
            Event::TokensRevoked { agent, reason } => {
                self.effects.push_back(Effect::EndSessions {
                    agent: agent.clone(),
                    reason: format!("tokens revoked: {reason}"),
                });
            }
            // Its sessions stay open: what it may no longer do is refused on them, and its
            // checkpoints and heartbeats go on, so it is neither cut off mid-write nor
            // declared down for going quiet.
            Event::Quarantined { agent, action, .. } => {
                if *action == health::QuarantineAction::Pause
                    && let Some(record) = self.state.agent(agent.as_str())
                    && record.down.as_ref().is_none_or(|down| down.incarnation != record.incarnation)
                {
                    let incarnation = record.incarnation;
                    self.effects.push_back(Effect::Pause { agent: agent.clone(), incarnation });
                }
            }
            Event::Released { agent } => {
                if let Some(record) = self.state.agent(agent.as_str())
                    && record.health.quarantine.as_ref().is_some_and(|q| q.action == health::QuarantineAction::Pause)
                {
                    let incarnation = record.incarnation;
                    self.effects.push_back(Effect::Resume { agent: agent.clone(), incarnation });
                }
            }
            Event::MessageSent { to, .. } => self.effects.push_back(Effect::DeliverMail { agent: to.clone() }),
            Event::AgentFailed { agent, restarts, window_ms } => {
                self.effects.push_back(Effect::Escalate {
                    agent: agent.clone(),
                    restarts: *restarts,
                    window_ms: *window_ms,
                });
            }
            _ => {}
        }
    }

    /// A volatile input about run `incarnation` of `agent`, at `now`: nothing is logged,
    /// and what the detectors conclude comes out of the next [`tick`](Core::tick). Refused
    /// like a write if the incarnation is not the current one or was declared down.
    pub fn observe(
        &mut self,
        now: Timestamp,
        agent: &AgentName,
        incarnation: u64,
        observation: Observation,
    ) -> Result<(), Rejection> {
        match observation {
            Observation::Heartbeat(progress) => self.heartbeat(now, agent, incarnation, progress),
            Observation::Busy { ms } => self.busy(now, agent, incarnation, ms),
            Observation::Error => self.report_error(now, agent, incarnation),
            Observation::Measured(measurement) => self.measure(now, agent, incarnation, measurement),
        }
    }

    /// What the shell measured of a managed run (see `measure`): judged against the
    /// thresholds hale.toml gave the agent. An agent with none is not watched.
    pub fn measure(
        &mut self,
        now: Timestamp,
        agent: &AgentName,
        incarnation: u64,
        measurement: Measurement,
    ) -> Result<(), Rejection> {
        let record = decide::running(&self.state, agent, incarnation)?;
        let Some(managed) = record.managed.as_ref().filter(|managed| !managed.spec.thresholds.is_unset()) else {
            return Ok(());
        };
        let measured = self.measured.entry(agent.clone()).or_insert_with(|| measure::Measured::new(incarnation));
        if measured.incarnation != incarnation {
            *measured = measure::Measured::new(incarnation);
        }
        measured.record(now, measurement, &managed.spec.thresholds);
        Ok(())
    }

    /// A heartbeat of `incarnation`, with the progress it reports. Volatile: changes only
    /// the liveness table. Refused like a write if the incarnation is not the current one
    /// or was declared down.
    pub fn heartbeat(
        &mut self,
        now: Timestamp,
        agent: &AgentName,
        incarnation: u64,
        progress: Option<Progress>,
    ) -> Result<(), Rejection> {
        let record = decide::running(&self.state, agent, incarnation)?;
        if let Some(progress) = &progress {
            decide::check_progress(progress)?;
        }
        let holding = self.state.tasks().load(agent) > 0;
        let live = match self.liveness.get_mut(agent) {
            Some(live) if live.incarnation == incarnation => live,
            _ => {
                let mut config = self.settings.detector.clone();
                let mut stall = supervision::StallPolicy::default();
                if let Some(managed) = &record.managed {
                    config.first_interval_ms = managed.spec.criticality.heartbeat_interval_ms();
                    stall = managed.spec.stall.clone();
                }
                let mut live = Liveness::new(incarnation, now, config, stall);
                // The first beat of a run is logged at once: it makes the run watched, so
                // a restarted hale knows to expect it back.
                let watched = record.progress.as_ref().is_some_and(|logged| logged.incarnation == incarnation);
                live.progress_unlogged = !watched;
                self.liveness.entry(agent.clone()).insert_entry(live).into_mut()
            }
        };
        live.beat(now, progress, holding);
        Ok(())
    }

    /// Run `incarnation` of `agent` says at `now` that it is in a call that may take `ms`
    /// (at most [`BUSY_MS_MAX`](liveness::BUSY_MS_MAX)); 0 says the call is over. The stall
    /// detectors do not count until then; the heartbeats must go on. Volatile. A run that
    /// has not beaten yet is not watched, and this changes nothing for it.
    pub fn busy(&mut self, now: Timestamp, agent: &AgentName, incarnation: u64, ms: u64) -> Result<(), Rejection> {
        decide::running(&self.state, agent, incarnation)?;
        if let Some(live) = self.liveness.get_mut(agent).filter(|live| live.incarnation == incarnation) {
            let ms = ms.min(liveness::BUSY_MS_MAX);
            live.busy_until = (ms > 0).then(|| Timestamp(now.0.saturating_add(ms)));
            live.worked(now);
        }
        Ok(())
    }

    /// An error the agent reports (a failed tool call, a model refusal…): counted over the
    /// breaker's window; a spike opens the breaker at the next `tick`. Volatile.
    pub fn report_error(&mut self, now: Timestamp, agent: &AgentName, incarnation: u64) -> Result<(), Rejection> {
        decide::running(&self.state, agent, incarnation)?;
        let window_ms = self.settings.breaker.window_ms;
        self.errors.entry(agent.clone()).or_default().record(now, window_ms);
        Ok(())
    }

    /// What timers and detectors call for at `now`: restarts whose backoff is over,
    /// incarnations whose heartbeats stopped or whose progress stalled, progress to log.
    /// A suspect agent is challenged (an effect), once per suspicion.
    pub fn tick(&mut self, now: Timestamp) -> Vec<Command> {
        let mut commands = Vec::new();
        for (agent, managed) in self.state.managed().filter(|_| self.supervising) {
            if let ManagedStatus::Backoff { due, .. } = managed.status
                && due <= now
            {
                commands.push(SupervisionCommand::StartManaged { agent: agent.clone() }.into());
            }
        }
        if self.supervising {
            commands.extend(self.recruits());
        }
        commands.extend(self.dispatch(now));
        let policy = &self.settings.breaker;
        for record in self.state.agents() {
            let agent = &record.name;
            // Most agents report no errors: skip the lookup when none has.
            let errors = if self.errors.is_empty() { None } else { self.errors.get_mut(agent) };
            match record.health.breaker {
                health::Breaker::Closed => {
                    let count = errors.map_or(0, |errors| errors.count(now, policy.window_ms));
                    if count >= policy.errors_max && policy.errors_max > 0 {
                        commands.push(HealthCommand::OpenBreaker { agent: agent.clone(), errors: count }.into());
                    }
                }
                health::Breaker::Open { until } if until <= now => {
                    commands.push(HealthCommand::HalfOpenBreaker { agent: agent.clone() }.into());
                }
                health::Breaker::Open { .. } => {}
                health::Breaker::HalfOpen { since } => {
                    if errors.as_ref().and_then(|errors| errors.last()).is_some_and(|last| last >= since) {
                        let count = errors.map_or(1, |errors| errors.count(now, policy.window_ms));
                        commands.push(HealthCommand::OpenBreaker { agent: agent.clone(), errors: count }.into());
                    } else if now.0.saturating_sub(since.0) >= policy.window_ms {
                        commands.push(HealthCommand::CloseBreaker { agent: agent.clone() }.into());
                    }
                }
            }
        }
        let threshold = self.settings.detector.threshold;
        let suspect_threshold = self.settings.detector.suspect_threshold;
        let paused = |state: &State, agent: &AgentName| {
            state
                .agent(agent.as_str())
                .and_then(|record| record.health.quarantine.as_ref())
                .is_some_and(|quarantine| quarantine.action == health::QuarantineAction::Pause)
        };
        for (agent, live) in &mut self.liveness {
            // A paused run is silent because hale stopped it: not a failure.
            if paused(&self.state, agent) {
                continue;
            }
            let down = |cause| {
                Command::from(SupervisionCommand::ReportDown {
                    agent: agent.clone(),
                    incarnation: live.incarnation,
                    cause,
                })
            };
            if let Some(grace_until) = live.grace_until {
                if now >= grace_until {
                    let grace_ms = self.settings.reconnect_grace_ms;
                    commands.push(down(Cause::NotReconnected { grace_ms }));
                }
                continue;
            }
            let phi = live.phi_if_late(now);
            let silent_ms = now.0.saturating_sub(live.last_beat.0);
            if phi >= threshold {
                commands.push(down(Cause::HeartbeatsLost { silent_ms, phi: (phi * 10.0).round() / 10.0 }));
                continue;
            }
            // Working means holding a task's lease, outside a call the run declared long.
            let working = self.state.tasks().load(agent) > 0 && !live.busy(now);
            if let Some(beats) = live.stall.beats
                && working
                && live.unchanged_beats >= beats
            {
                commands.push(down(Cause::StalledProgress { beats: live.unchanged_beats }));
                continue;
            }
            if let Some(quiet_ms) = live.stall.quiet_ms
                && working
                && now.0.saturating_sub(live.last_activity.0) >= quiet_ms
            {
                commands.push(down(Cause::StalledCheckpoints { quiet_ms }));
                continue;
            }
            if phi >= suspect_threshold && live.health == Health::Alive {
                live.health = Health::Suspect;
                self.effects.push_back(Effect::Challenge { agent: agent.clone(), incarnation: live.incarnation });
            }
            if live.progress_due(now, self.settings.progress_log_ms) {
                commands.push(
                    AgentCommand::RecordProgress {
                        agent: agent.clone(),
                        incarnation: live.incarnation,
                        progress: live.progress.clone().unwrap_or_default(),
                    }
                    .into(),
                );
                // Not logged yet, but asked for: do not ask again before it is.
                live.progress_unlogged = false;
            }
        }
        // The resource and probe detectors concluded on what the shell measured.
        for (agent, measured) in &mut self.measured {
            if paused(&self.state, agent) {
                continue;
            }
            if let Some(cause) = measured.verdict.clone().filter(|_| !measured.reported) {
                measured.reported = true;
                let incarnation = measured.incarnation;
                commands.push(SupervisionCommand::ReportDown { agent: agent.clone(), incarnation, cause }.into());
            }
        }
        commands
    }

    /// What the task queue calls for at `now`: tasks to fail (past their deadline or
    /// wall-time budget, out of attempts), pending tasks to assign, and the system mode if
    /// capacity changed it. `tick` includes these; the shell also calls this right after
    /// a batch of commands, so that a lost agent's tasks move at once rather than at the
    /// next tick.
    pub fn dispatch(&mut self, now: Timestamp) -> Vec<Command> {
        // Taken out while the candidates borrow the rest of the core, and put back after.
        let mut unserved = std::mem::take(&mut self.unserved);
        let (commands, served) = self.plan(now, &unserved);
        match served {
            Some((served, seen)) => {
                unserved.retain(|role, _| !served.contains(role));
                for role in seen.into_iter().filter(|role| !served.contains(role)) {
                    unserved.entry(role).or_insert(now);
                }
            }
            // Nothing waits for an agent: nothing is watched (the candidates are not even
            // gathered), and the grace starts afresh for the next task.
            None => unserved.clear(),
        }
        self.unserved = unserved;
        commands
    }

    /// The commands of [`dispatch`](Core::dispatch), and (when there was anything to
    /// assign) the roles that had a healthy agent and the roles the ladders asked for.
    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        now: Timestamp,
        unserved: &BTreeMap<RoleName, Timestamp>,
    ) -> (Vec<Command>, Option<(std::collections::BTreeSet<RoleName>, Vec<RoleName>)>) {
        let tasks = self.state.tasks();
        let mut commands: Vec<Command> = tasks.overdue(now).map(|task| TaskCommand::Expire { task }.into()).collect();
        // Candidates are only worth gathering when something waits for one: the tick runs
        // this over every agent 20 times a second.
        let (mut healthy, serving, roles) = self.capacity(tasks.pending().next().is_some());
        // An agent that has used its whole budget for this period gets no more work.
        for candidates in healthy.values_mut() {
            candidates.retain(|candidate| self.within_budget(candidate.agent, now));
        }
        let mode = tasks::Mode::from_capacity(serving, roles);
        if mode != self.state.mode() {
            commands.push(TaskCommand::SetMode { mode, serving, roles }.into());
        }
        let capacity = self.settings.tasks.per_agent_max.max(1) as usize;
        let grace_ms = self.settings.tasks.fallback_grace_ms;
        // A rung with no healthy agent is passed over once it has had none for the grace.
        let unserved_long =
            |role: &RoleName| unserved.get(role).is_some_and(|since| now.0.saturating_sub(since.0) >= grace_ms);
        let planned = tasks::plan(&self.state, tasks, &mut healthy, capacity, now, &unserved_long);
        commands.extend(planned.commands);
        if tasks.pending().next().is_none() {
            return (commands, None);
        }
        let served = healthy.iter().filter(|(_, agents)| !agents.is_empty()).map(|(role, _)| (*role).clone()).collect();
        (commands, Some((served, planned.unserved)))
    }

    /// How many roles have a healthy agent, of how many roles hale knows (see `Mode`).
    pub fn serving(&self) -> (u32, u32) {
        let (_, serving, roles) = self.capacity(false);
        (serving, roles)
    }

    /// Whether `agent`'s current run may be given tasks now: it heartbeats and is alive
    /// (not suspect, not reconnecting), is not down, its breaker is closed and it is not
    /// quarantined.
    pub fn can_take_tasks(&self, agent: &AgentName) -> bool {
        self.state.agent(agent.as_str()).is_some_and(|record| self.takes_tasks(record, self.liveness.get(agent)))
    }

    /// Whether `agent` has budget left in its current period (or has no budget).
    fn within_budget(&self, agent: &AgentName, now: Timestamp) -> bool {
        let Some(budget) = self.state.agent(agent.as_str()).and_then(|record| record.managed.as_ref()?.spec.budget)
        else {
            return true;
        };
        let (_, account) = self.state.budgets().agent_at(agent, &budget, now);
        let used = account.spent.plus(account.reserved);
        budget.tokens.is_none_or(|max| used.tokens < max) && budget.cost.is_none_or(|max| used.cost < max)
    }

    /// `live`: the agent's entry in the liveness table, if any.
    fn takes_tasks(&self, record: &AgentRecord, live: Option<&Liveness>) -> bool {
        live.is_some_and(|live| live.incarnation == record.incarnation && live.health == Health::Alive)
            && record.down.as_ref().is_none_or(|down| down.incarnation != record.incarnation)
            && record.health.quarantine.is_none()
            && record.health.breaker == health::Breaker::Closed
    }

    /// The agents that may take tasks now, per role, and how many of the roles hale knows
    /// have one. Healthy: its current run heartbeats and is alive (not suspect, not
    /// reconnecting), not down, breaker closed, not quarantined. A role counts if a
    /// managed agent, a watched run or a run that was lost (down, not stopped) has it; a
    /// run reconnecting after a restart of hale,
    /// or a managed agent starting, still counts as serving it (for the mode only).
    /// `candidates`: gather the agents that may take tasks (else only count the roles).
    fn capacity(&self, candidates: bool) -> (BTreeMap<&RoleName, Vec<tasks::Candidate<'_>>>, u32, u32) {
        let tasks = self.state.tasks();
        let mut healthy: BTreeMap<&RoleName, Vec<tasks::Candidate<'_>>> = BTreeMap::new();
        let mut roles: BTreeMap<&RoleName, bool> = BTreeMap::new();
        // Both maps are in name order: walk them side by side instead of looking every
        // agent up (with tens of thousands of agents the lookups were most of the tick).
        let mut watched = self.liveness.iter().peekable();
        for record in self.state.agents() {
            while watched.next_if(|(name, _)| **name < record.name).is_some() {}
            let entry = watched.peek().filter(|(name, _)| **name == record.name).map(|(_, live)| *live);
            let live = entry.filter(|live| live.incarnation == record.incarnation);
            let managed = record.managed.as_ref();
            let lost = record.down.as_ref().is_some_and(|down| {
                down.incarnation == record.incarnation && down.cause != supervision::Cause::Stopped
            });
            if live.is_none() && managed.is_none() && !lost {
                continue;
            }
            let up = record.down.as_ref().is_none_or(|down| down.incarnation != record.incarnation)
                && record.health.quarantine.is_none()
                && !matches!(record.health.breaker, health::Breaker::Open { .. });
            let alive = live.is_some_and(|live| live.health == Health::Alive);
            let coming = live.is_some_and(|live| live.health == Health::Reconnecting)
                || (live.is_none()
                    && managed.is_some_and(|managed| {
                        matches!(managed.status, ManagedStatus::Starting | ManagedStatus::Running)
                    }));
            let serving = roles.entry(&record.role).or_default();
            *serving |= up && (alive || coming);
            if candidates && self.takes_tasks(record, entry) {
                healthy.entry(&record.role).or_default().push(tasks::Candidate {
                    agent: &record.name,
                    incarnation: record.incarnation,
                    load: tasks.load(&record.name),
                });
            }
        }
        let serving = roles.values().filter(|serving| **serving).count() as u32;
        (healthy, serving, roles.len() as u32)
    }

    /// Pools below their minimum of healthy agents, with room under their maximum.
    fn recruits(&self) -> Vec<Command> {
        let mut commands = Vec::new();
        for (role, pool) in self.state.roles() {
            let (mut healthy, mut total) = (0u32, 0u32);
            for record in self.state.agents().filter(|record| record.role == *role && record.managed.is_some()) {
                total += 1;
                let managed = record.managed.as_ref().expect("filtered");
                let backing_off = matches!(managed.status, ManagedStatus::Backoff { .. });
                if (managed.is_live() || backing_off) && record.health.quarantine.is_none() {
                    healthy += 1;
                }
            }
            if healthy < pool.min && total < pool.max {
                commands.push(SupervisionCommand::Recruit { role: role.clone() }.into());
            }
        }
        commands
    }

    /// After a restart of hale: every run that was heartbeating (its progress is in the
    /// log) and is not down gets until `now` + the reconnect grace to beat again, and is
    /// declared down if it does not.
    pub fn begin_grace(&mut self, now: Timestamp) {
        let grace_until = Timestamp(now.0.saturating_add(self.settings.reconnect_grace_ms));
        for record in self.state.agents() {
            let watched = record.progress.as_ref().is_some_and(|logged| logged.incarnation == record.incarnation);
            let down = record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation);
            if record.incarnation == 0 || !watched || down {
                continue;
            }
            let mut config = self.settings.detector.clone();
            let mut stall = supervision::StallPolicy::default();
            if let Some(managed) = &record.managed {
                config.first_interval_ms = managed.spec.criticality.heartbeat_interval_ms();
                stall = managed.spec.stall.clone();
            }
            let mut live = Liveness::new(record.incarnation, now, config, stall);
            live.health = Health::Reconnecting;
            live.grace_until = Some(grace_until);
            self.liveness.insert(record.name.clone(), live);
        }
    }

    /// The liveness of an agent's current run, if it is watched.
    pub fn liveness(&self, agent: &str) -> Option<&Liveness> {
        self.liveness.get(agent)
    }
}

#[cfg(test)]
mod nodes_tests;
#[cfg(test)]
mod supervision_tests;
#[cfg(test)]
mod tests;
