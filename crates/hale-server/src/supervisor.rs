//! The process supervisor: carries out the core's `Spawn` and `Stop` effects on real
//! processes and reports what happens to them (started, exited) back as commands.
//!
//! One keeper task per managed agent handles that agent's effects strictly in order, so a
//! new incarnation is spawned only after the previous one's process is gone (stopped with
//! SIGTERM to its group, a grace period, then SIGKILL): two processes of one agent never
//! run at once. Decisions (whether to restart, when, as which incarnation) are all the
//! core's; a keeper only acts and reports.
//!
//! At start, [`Supervisor::adopt_or_start`] reconciles the log with the machine: a process
//! the log says is running and that is still the same process (pid and start time) is
//! adopted and watched through a pidfd; one that is gone is reported `vanished` (and the
//! core restarts it per its policy); agents never started or stopped are started. Every
//! agent process carries `HALE_SUPERVISOR` (the data directory) in its environment, so the
//! machine is also searched: a process of the current incarnation that hale died before
//! logging is adopted, and one of an older incarnation (fenced, but still running) is
//! killed. No agent runs twice.

use crate::clock;
use crate::engine::{Engine, EngineError};
use crate::probe::{Probe, ProbeSpec};
use crate::process::{self, AgentCgroup, AgentLogs, Cgroups, ProcessId, ProcessSpec, Signal};
use hale_core::supervision::{Cause, ManagedStatus, ProcessRef};
use hale_core::{AgentName, Effect, Measurement, Observation, RoleName, SupervisionCommand};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How to run one managed agent.
#[derive(Clone, Debug)]
pub struct ManagedAgent {
    pub name: AgentName,
    pub spec: ProcessSpec,
    pub logs: Arc<AgentLogs>,
    /// The core has memory or CPU thresholds for it: sample its usage from /proc.
    pub sample_usage: bool,
    pub probe: Option<ProbeSpec>,
}

/// How often the resource detector samples /proc.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How to start an instance of a role pool (`[[role]]` template).
#[derive(Clone, Debug)]
pub struct Template {
    pub spec: ProcessSpec,
    /// As [`ManagedAgent::sample_usage`].
    pub sample_usage: bool,
    pub probe: Option<ProbeSpec>,
}

/// Settings of the supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub agents: Vec<ManagedAgent>,
    /// Templates of the role pools, for the instances the core recruits.
    pub templates: BTreeMap<RoleName, Template>,
    /// What agents are told in `HALE_URL`.
    pub hale_url: String,
    /// Between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// How often log files are checked for rotation.
    pub rotate_every: Duration,
    /// Marks the agents of this data directory (`HALE_SUPERVISOR` in their environment).
    pub supervisor_id: String,
    /// Where recruited instances get their log files, and how they rotate.
    pub logs_dir: PathBuf,
    pub log_bytes_max: u64,
    pub logs_kept: usize,
    /// Mints each agent's tokens at spawn (`HALE_TOKEN`, `HALE_REFRESH_TOKEN`).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// What agents verify a TLS hale against (`HALE_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// An agent without a `workdir` works in its own `BASE/NAME`, made at its start.
    pub workdir_base: PathBuf,
    /// The cgroups agents get (or why none), found once at start.
    pub cgroups: Arc<Cgroups>,
    /// Where keepers report; `None`: the engine's (a single node).
    pub reporter: Option<Reporter>,
}

/// The running supervisor: one keeper per managed agent.
pub struct Supervisor {
    /// `stop_all` has begun: no process is started any more.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    keepers: Mutex<BTreeMap<AgentName, mpsc::UnboundedSender<Order>>>,
    logs: Arc<Mutex<Vec<Arc<AgentLogs>>>>,
    config: SupervisorConfig,
    engine: Engine,
    live_tx: Arc<watch::Sender<usize>>,
    /// How many agent processes are alive, as the keepers know it.
    live: watch::Receiver<usize>,
    rotation: tokio::task::JoinHandle<()>,
}

/// What a keeper is told to do.
#[derive(Debug)]
enum Order {
    /// The core's `Spawn`, `Stop`, `Pause` or `Resume`.
    Effect(Effect),
    /// On a node of a cluster: run `incarnation`, adopting `logged` (the process the log
    /// names for it) if that process still lives. The caller read the log, not the keeper.
    Run { incarnation: u64, logged: Option<ProcessRef> },
    /// The node's lease is running out: stop `incarnation` within `grace` (SIGTERM, then
    /// SIGKILL when it is over), and report its end as `cause` whatever its exit status
    /// (a clean exit on SIGTERM must not read as the agent's own decision to stop).
    Fence { incarnation: u64, grace: Duration, cause: Cause },
    /// This node stops: stop whatever runs, with the usual grace; say so when done (every
    /// order before it is done too).
    StopAny(tokio::sync::oneshot::Sender<()>),
}

/// Where a keeper's reports go: this hale's engine, or, on a node of a cluster, the
/// leader's (through [`crate::nodes::Nodes`], which sends them on in order).
#[derive(Clone)]
pub enum Reporter {
    Local(Engine),
    Cluster(Arc<crate::nodes::Nodes>),
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reporter::Local(_) => "Reporter::Local",
            Reporter::Cluster(_) => "Reporter::Cluster",
        })
    }
}

/// What a keeper learns about its process.
struct Exit {
    incarnation: u64,
    cause: Cause,
}

struct Current {
    incarnation: u64,
    pid: u32,
}

impl Current {
    fn new(incarnation: u64, pid: u32) -> Current {
        Current { incarnation, pid }
    }
}

struct Keeper {
    agent: ManagedAgent,
    engine: Engine,
    reporter: Reporter,
    hale_url: String,
    supervisor_id: String,
    stop_grace: Duration,
    current: Option<Current>,
    /// Whether this keeper has handled a spawn since hale started.
    spawned_before: bool,
    /// The run stopped because this node's lease ran out, and the cause to report for it.
    fenced: Option<(u64, Cause)>,
    /// This hale stops its agents: nothing more is started.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    live: Arc<watch::Sender<usize>>,
    auth: Option<Arc<crate::auth::Auth>>,
    ca_file: Option<PathBuf>,
    workdir_base: PathBuf,
    cgroups: Arc<Cgroups>,
    /// The agent's cgroup, once made (kept across incarnations, removed when it stops).
    cgroup: Option<AgentCgroup>,
}

impl Supervisor {
    /// Starts a keeper for every agent of `config`. Nothing is spawned until effects arrive
    /// or [`adopt_or_start`](Supervisor::adopt_or_start) runs.
    pub fn start(engine: Engine, config: SupervisorConfig) -> Supervisor {
        let (live_tx, live) = watch::channel(0usize);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let every = config.rotate_every;
        let rotated = logs.clone();
        let rotation = tokio::spawn(async move {
            let mut timer = tokio::time::interval(every);
            loop {
                timer.tick().await;
                let logs: Vec<Arc<AgentLogs>> = rotated.lock().expect("logs lock").clone();
                let _ = tokio::task::spawn_blocking(move || {
                    for log in &logs {
                        if let Err(error) = log.rotate_if_needed() {
                            tracing::warn!(path = %log.path().display(), %error, "could not rotate an agent log");
                        }
                    }
                })
                .await;
            }
        });
        let supervisor = Supervisor {
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            keepers: Mutex::new(BTreeMap::new()),
            logs,
            engine,
            live_tx: Arc::new(live_tx),
            live,
            rotation,
            config,
        };
        for agent in supervisor.config.agents.clone() {
            supervisor.add_keeper(agent);
        }
        supervisor
    }

    /// Starts the keeper of `agent`, unless it has one.
    fn add_keeper(&self, agent: ManagedAgent) -> mpsc::UnboundedSender<Order> {
        let mut keepers = self.keepers.lock().expect("keepers lock");
        if let Some(existing) = keepers.get(&agent.name) {
            return existing.clone();
        }
        let (effects_tx, effects) = mpsc::unbounded_channel();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        self.logs.lock().expect("logs lock").push(agent.logs.clone());
        let name = agent.name.clone();
        let keeper = Keeper {
            agent,
            engine: self.engine.clone(),
            reporter: self.config.reporter.clone().unwrap_or_else(|| Reporter::Local(self.engine.clone())),
            hale_url: self.config.hale_url.clone(),
            supervisor_id: self.config.supervisor_id.clone(),
            stop_grace: self.config.stop_grace,
            current: None,
            spawned_before: false,
            fenced: None,
            stopping: self.stopping.clone(),
            exits_tx,
            exits,
            live: self.live_tx.clone(),
            auth: self.config.auth.clone(),
            ca_file: self.config.ca_file.clone(),
            workdir_base: self.config.workdir_base.clone(),
            cgroups: self.config.cgroups.clone(),
            cgroup: None,
        };
        tokio::spawn(keeper.run(effects));
        keepers.insert(name, effects_tx.clone());
        effects_tx
    }

    /// The keeper of `agent`; for an instance of a role pool, started on first use from
    /// the role's template.
    fn keeper(&self, agent: &AgentName, role: Option<&RoleName>) -> Option<mpsc::UnboundedSender<Order>> {
        if let Some(keeper) = self.keepers.lock().expect("keepers lock").get(agent) {
            return Some(keeper.clone());
        }
        let template = self.config.templates.get(role?)?;
        let logs =
            AgentLogs::new(&self.config.logs_dir, agent.as_str(), self.config.log_bytes_max, self.config.logs_kept);
        Some(self.add_keeper(ManagedAgent {
            name: agent.clone(),
            spec: template.spec.clone(),
            logs: Arc::new(logs),
            sample_usage: template.sample_usage,
            probe: template.probe.clone(),
        }))
    }

    /// Hands a `Spawn`, `Stop`, `Pause` or `Resume` effect to the agent's keeper.
    pub fn dispatch(&self, effect: Effect) {
        if let Effect::Spawn { agent, incarnation, .. } = &effect
            && self.stopping.load(std::sync::atomic::Ordering::SeqCst)
        {
            // Decided just before the stop began: the next start finds it never ran.
            tracing::warn!(%agent, incarnation, "hale is stopping its agents: not starting this one");
            return;
        }
        let (agent, role) = match &effect {
            Effect::Spawn { agent, role, .. } => (agent, Some(role)),
            Effect::Stop { agent, .. } | Effect::Pause { agent, .. } | Effect::Resume { agent, .. } => (agent, None),
            _ => return,
        };
        match self.keeper(agent, role) {
            Some(keeper) => {
                let _ = keeper.send(Order::Effect(effect));
            }
            None => tracing::warn!(%agent, ?effect, "no process spec for this agent in hale.toml; ignoring"),
        }
    }

    /// On a node of a cluster: runs `incarnation` of `agent` here (adopting `logged`, the
    /// process the log names for it, if it still lives), after stopping any earlier one.
    pub fn run(&self, agent: &AgentName, role: &RoleName, incarnation: u64, logged: Option<ProcessRef>) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match self.keeper(agent, Some(role)) {
            Some(keeper) => {
                let _ = keeper.send(Order::Run { incarnation, logged });
            }
            None => tracing::warn!(%agent, "placed on this node, but this node's hale.toml does not say how to run it"),
        }
    }

    /// On a node of a cluster whose lease runs out: stops `incarnation` of `agent` within
    /// `grace`, SIGKILL at its end, and reports its end as `cause`.
    pub fn fence(&self, agent: &AgentName, incarnation: u64, grace: Duration, cause: Cause) {
        if let Some(keeper) = self.keepers.lock().expect("keepers lock").get(agent) {
            let _ = keeper.send(Order::Fence { incarnation, grace, cause });
        }
    }

    /// On a node of a cluster that stops: stops every process here (nothing is logged: the
    /// node then tells the leader it leaves, and its agents start elsewhere) and waits
    /// until they are gone, at most `grace` plus a second.
    pub async fn stop_here(&self, grace: Duration) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut stopped = Vec::new();
        for keeper in self.keepers.lock().expect("keepers lock").values() {
            let (done, stopped_here) = tokio::sync::oneshot::channel();
            if keeper.send(Order::StopAny(done)).is_ok() {
                stopped.push(stopped_here);
            }
        }
        // Each keeper answers once what it was doing (a start, say) and the stop are done:
        // nothing is started after this.
        let all_stopped = futures_util::future::join_all(stopped);
        if tokio::time::timeout(grace + Duration::from_secs(2), all_stopped).await.is_err() {
            tracing::warn!(left = *self.live.borrow(), "agents still running after the stop grace");
        }
        let cgroups = self.config.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_all()).await;
    }

    /// Reconciles the log with the machine, once at start: adopts agents still running,
    /// reports those gone, starts those not running; then turns supervision on in the core
    /// (hale starts with it off).
    pub async fn adopt_or_start(&self) -> Result<(), crate::engine::EngineError> {
        let seen = self
            .engine
            .read(move |state| {
                state
                    .agents()
                    .filter_map(|record| {
                        let managed = record.managed.as_ref()?;
                        let process = managed.process;
                        Some((
                            record.name.clone(),
                            record.role.clone(),
                            record.incarnation,
                            managed.status.clone(),
                            process,
                        ))
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        let supervisor = self.config.supervisor_id.clone();
        let on_machine =
            tokio::task::spawn_blocking(move || process::find_agents(&supervisor)).await.unwrap_or_default();
        let mut to_start = Vec::new();
        for (agent, role, incarnation, status, mut process) in seen {
            // Agents of hale.toml have keepers; instances of a pool get theirs now.
            let Some(keeper) = self.keeper(&agent, Some(&role)) else { continue };
            for found in on_machine.iter().filter(|found| found.agent == agent.as_str()) {
                let logged = process.is_some_and(|process| id_of(process) == found.id);
                if logged {
                    continue;
                }
                if found.incarnation == incarnation && status == ManagedStatus::Starting {
                    // Spawned, but hale died before logging it: record it, then adopt it.
                    tracing::warn!(%agent, incarnation, pid = found.id.pid, "found an unlogged process of the current run; adopting it");
                    let found_ref = ProcessRef { pid: found.id.pid, start_ticks: found.id.start_ticks };
                    let command =
                        SupervisionCommand::ProcessStarted { agent: agent.clone(), incarnation, process: found_ref };
                    self.engine.execute(command).await?;
                    process = Some(found_ref);
                    continue;
                }
                tracing::warn!(%agent, pid = found.id.pid, its_incarnation = found.incarnation, incarnation, "killing a stray process of this agent");
                let _ = process::signal_group(found.id.pid, Signal::KILL);
            }
            let status =
                if process.is_some() && status == ManagedStatus::Starting { ManagedStatus::Running } else { status };
            match (status, process) {
                (ManagedStatus::Running, Some(process)) if process::is_same_process(id_of(process)) => {
                    tracing::info!(%agent, incarnation, pid = process.pid, "adopting a running agent");
                    let _ = keeper.send(Order::Effect(Effect::Spawn { agent: agent.clone(), role, incarnation }));
                    // The keeper treats a Spawn of an incarnation whose process it was told
                    // about as an adoption: see `Keeper::adopt`.
                }
                (ManagedStatus::Running | ManagedStatus::Starting, _) => {
                    tracing::warn!(%agent, incarnation, "its process is gone; reporting it down");
                    let command = SupervisionCommand::ReportDown { agent, incarnation, cause: Cause::Vanished };
                    self.engine.execute(command).await?;
                }
                (ManagedStatus::Declared | ManagedStatus::Stopped | ManagedStatus::Pending { .. }, _) => {
                    to_start.push(agent)
                }
                (ManagedStatus::Backoff { .. } | ManagedStatus::Failed { .. }, _) => {}
            }
        }
        // Reconciled: from here the core restarts and recruits (until now it did not, so
        // nothing it started could be mistaken above for a process that vanished).
        self.engine.set_supervising(true).await;
        for agent in to_start {
            self.engine.execute(SupervisionCommand::StartManaged { agent }).await?;
        }
        Ok(())
    }

    /// Stops every agent (logged as stopped on purpose) and waits until their processes
    /// are gone, at most `grace` plus a second.
    pub async fn stop_all(&self, grace: Duration) {
        // First: no restart or recruit from here on. An instance stopped on purpose leaves
        // its pool short, and the detectors tick while the agents take their grace.
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.engine.set_supervising(false).await;
        let agents: Vec<AgentName> = self.keepers.lock().expect("keepers lock").keys().cloned().collect();
        for agent in &agents {
            if let Err(error) = self.engine.execute(SupervisionCommand::Stop { agent: agent.clone() }).await {
                tracing::warn!(%agent, %error, "could not log the stop of an agent");
            }
        }
        let mut live = self.live.clone();
        let all_gone = live.wait_for(|count| *count == 0);
        if tokio::time::timeout(grace + Duration::from_secs(1), all_gone).await.is_err() {
            tracing::warn!(left = *self.live.borrow(), "agents still running after the stop grace");
        }
        let cgroups = self.config.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_all()).await;
    }

    /// What marks this data directory's agents (`HALE_SUPERVISOR`).
    pub fn supervisor_id(&self) -> &str {
        &self.config.supervisor_id
    }

    /// The cgroups agents get, for `hale status` and the log.
    pub fn cgroups(&self) -> &Cgroups {
        &self.config.cgroups
    }

    /// How many agent processes are alive now.
    pub fn live(&self) -> usize {
        *self.live.borrow()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.rotation.abort();
    }
}

/// `Some(OutOfMemory)` if the OOM killer's count of the agent's cgroup rose since the
/// process started (`oom` holds the cgroup, the count then, and the memory limit).
async fn oom_cause(oom: Option<(AgentCgroup, Option<u64>, u64)>) -> Option<Cause> {
    let (cgroup, before, limit_bytes) = oom?;
    let after = tokio::task::spawn_blocking(move || cgroup.oom_kills()).await.ok().flatten()?;
    (after > before.unwrap_or(0)).then_some(Cause::OutOfMemory { limit_bytes })
}

fn id_of(process: ProcessRef) -> ProcessId {
    ProcessId { pid: process.pid, start_ticks: process.start_ticks }
}

impl Keeper {
    async fn run(mut self, mut effects: mpsc::UnboundedReceiver<Order>) {
        let watching = self.agent.sample_usage;
        let mut sampler = tokio::time::interval(SAMPLE_EVERY);
        sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probing = self.agent.probe.is_some();
        let every = self.agent.probe.as_ref().map_or(Duration::from_secs(3600), |probe| probe.every);
        // The first probe waits one interval: a process just started needs time to listen.
        let mut prober = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        prober.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sampler.tick(), if watching => self.sample().await,
                _ = prober.tick(), if probing => self.probe().await,
                effect = effects.recv() => {
                    let Some(effect) = effect else { break };
                    match effect {
                        Order::Effect(Effect::Spawn { incarnation, .. }) => self.spawn(incarnation, None).await,
                        Order::Effect(Effect::Stop { incarnation, .. }) => self.stop(incarnation, self.stop_grace).await,
                        Order::Effect(Effect::Pause { incarnation, .. }) => self.pause(incarnation, true),
                        Order::Effect(Effect::Resume { incarnation, .. }) => self.pause(incarnation, false),
                        Order::Effect(_) => {}
                        Order::Run { incarnation, logged } => self.spawn(incarnation, Some(logged)).await,
                        Order::Fence { incarnation, grace, cause } => {
                            self.fenced = Some((incarnation, cause));
                            self.stop(incarnation, grace).await;
                        }
                        Order::StopAny(done) => {
                            if let Some(incarnation) = self.current.as_ref().map(|current| current.incarnation) {
                                self.stop(incarnation, self.stop_grace).await;
                            }
                            let _ = done.send(());
                        }
                    }
                }
                Some(exit) = self.exits.recv() => self.exited(exit).await,
            }
        }
    }

    /// Starts `incarnation`, after stopping whatever process of an earlier one still runs.
    /// If the log says `incarnation` already has a live process (hale restarted), adopts it.
    /// `logged` is that process as the caller read it from the log (`Some(None)`: none);
    /// `None`: the keeper reads the log itself.
    async fn spawn(&mut self, incarnation: u64, logged: Option<Option<ProcessRef>>) {
        if let Some(current) = &self.current {
            if current.incarnation == incarnation {
                return;
            }
            let old = current.incarnation;
            self.stop(old, self.stop_grace).await;
        }
        // Only the first spawn of a keeper can be an adoption (hale just started); later
        // ones follow exits this keeper saw, and skip the read of the log it costs.
        let first = !self.spawned_before;
        self.spawned_before = true;
        if first {
            let logged = match logged {
                Some(logged) => logged,
                None => self.logged_process(incarnation).await,
            };
            if let Some(process) = logged
                && self.adopt(incarnation, process).await
            {
                return;
            }
        }
        let mut spec = self.agent.spec.clone();
        let hale_url = match &self.reporter {
            Reporter::Local(_) => self.hale_url.clone(),
            Reporter::Cluster(nodes) => nodes.hale_url(),
        };
        spec.env.insert("HALE_URL".into(), hale_url);
        spec.env.insert("HALE_AGENT".into(), self.agent.name.to_string());
        spec.env.insert("HALE_INCARNATION".into(), incarnation.to_string());
        spec.env.insert("HALE_SUPERVISOR".into(), self.supervisor_id.clone());
        if let Some(ca) = &self.ca_file {
            spec.env.insert("HALE_CA_FILE".into(), ca.to_string_lossy().into_owned());
        }
        if let Some(auth) = &self.auth {
            // Its own tokens, for this agent only; the refresh token's hash is logged first.
            let issued = match &self.reporter {
                Reporter::Local(engine) => crate::api::tokens::issue_tokens(auth, engine, &self.agent.name)
                    .await
                    .map_err(|error| error.body.message),
                Reporter::Cluster(nodes) => nodes.issue_tokens(&self.agent.name).await,
            };
            match issued {
                Ok(pair) => {
                    spec.env.insert("HALE_TOKEN".into(), pair.access_token);
                    spec.env.insert("HALE_REFRESH_TOKEN".into(), pair.refresh_token);
                }
                Err(error) => tracing::error!(agent = %self.agent.name, %error, "could not issue the agent's tokens"),
            }
        }
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            // The start waited (for tokens, say) while hale began to stop its agents.
            tracing::info!(agent = %self.agent.name, incarnation, "hale is stopping its agents: not starting this one");
            return;
        }
        let logs = self.agent.logs.clone();
        let (cgroups, name) = (self.cgroups.clone(), self.agent.name.to_string());
        let own_workdir = spec.workdir.is_none().then(|| self.workdir_base.join(self.agent.name.as_str()));
        let spawned = tokio::task::spawn_blocking(move || -> Result<_, String> {
            if let Some(dir) = own_workdir {
                process::make_workdir(&dir, &spec).map_err(|error| error.to_string())?;
                spec.workdir = Some(dir);
            }
            // Made (or found) and its limits written at every start, so a changed
            // hale.toml takes effect; its OOM count is read before the process runs. Only
            // for an agent with kernel limits: joining a cgroup costs each start several
            // milliseconds on v1 (the kernel's migration waits for an RCU grace period).
            let cgroup = if spec.cgroup_limits.is_empty() {
                None
            } else {
                cgroups
                    .agent(&name, &spec.cgroup_limits)
                    .map_err(|error| format!("cannot make the cgroup of `{}`: {error}", spec.command))?
            };
            let oom_before = cgroup.as_ref().and_then(AgentCgroup::oom_kills);
            spec.cgroup = cgroup.clone();
            let spawned = process::spawn(&spec, &logs).map_err(|error| error.to_string())?;
            Ok((spawned, cgroup, oom_before))
        })
        .await;
        let agent = self.agent.name.clone();
        let memory_limit = self.agent.spec.cgroup_limits.memory_bytes;
        let ((mut child, id), oom) = match spawned {
            Ok(Ok((spawned, cgroup, oom_before))) => {
                self.cgroup = cgroup.clone();
                (spawned, cgroup.zip(memory_limit).map(|(cgroup, limit)| (cgroup, oom_before, limit)))
            }
            Ok(Err(error)) => {
                tracing::error!(%agent, incarnation, %error, "could not start the agent");
                let cause = Cause::SpawnFailed { error };
                self.report(SupervisionCommand::ReportDown { agent, incarnation, cause }).await;
                return;
            }
            Err(error) => {
                tracing::error!(%agent, incarnation, %error, "the spawn task failed");
                return;
            }
        };
        tracing::info!(%agent, incarnation, pid = id.pid, "agent started");
        self.current = Some(Current::new(incarnation, id.pid));
        self.live.send_modify(|count| *count += 1);
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let cause = match child.wait().await {
                Ok(status) if status.signal() == Some(Signal::KILL.as_raw()) => {
                    oom_cause(oom).await.unwrap_or(Cause::Exited { code: None, signal: status.signal() })
                }
                Ok(status) => Cause::Exited { code: status.code(), signal: status.signal() },
                Err(_) => Cause::Vanished,
            };
            let _ = exits.send(Exit { incarnation, cause });
        });
        let process = ProcessRef { pid: id.pid, start_ticks: id.start_ticks };
        self.report(SupervisionCommand::ProcessStarted { agent, incarnation, process }).await;
    }

    /// The live process the log names for `incarnation`, if it names one.
    async fn logged_process(&self, incarnation: u64) -> Option<ProcessRef> {
        let agent = self.agent.name.clone();
        self.engine
            .read(move |state| {
                let record = state.agent(agent.as_str())?;
                let managed = record.managed.as_ref()?;
                (record.incarnation == incarnation && managed.status == ManagedStatus::Running)
                    .then_some(managed.process)
                    .flatten()
            })
            .await
            .ok()
            .flatten()
    }

    /// After a restart of hale: if `process`, which the log names for `incarnation`, is
    /// still the same process, watch it instead of starting another. If it is gone, that
    /// run is over: reported down, and nothing is started under its number.
    async fn adopt(&mut self, incarnation: u64, process: ProcessRef) -> bool {
        let id = id_of(process);
        if !process::is_same_process(id) {
            // It ended after hale's start-up scan saw it: that run is over. Report it
            // down, as the scan would have, and start nothing under its number; the core
            // restarts it, by its policy, as a new incarnation whose spawn comes next.
            tracing::warn!(agent = %self.agent.name, incarnation, pid = id.pid, "the process to adopt is gone; reporting it down");
            let agent = self.agent.name.clone();
            self.report(SupervisionCommand::ReportDown { agent, incarnation, cause: Cause::Vanished }).await;
            return true;
        }
        self.current = Some(Current::new(incarnation, id.pid));
        self.live.send_modify(|count| *count += 1);
        // It is still in the cgroup an earlier hale made for it (found by name); no limit
        // is rewritten under a running process.
        self.cgroup = self.cgroups.existing(self.agent.name.as_str());
        let memory_limit = self.agent.spec.cgroup_limits.memory_bytes;
        let cgroup = self.cgroup.clone();
        let oom_before = cgroup.as_ref().and_then(AgentCgroup::oom_kills);
        let oom = cgroup.zip(memory_limit).map(|(cgroup, limit)| (cgroup, oom_before, limit));
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            // Not our child: no exit status to read, only that it is gone, and whether the
            // OOM killer's count of its cgroup rose meanwhile.
            let _ = process::wait_adopted_exit_of(id).await;
            let cause = oom_cause(oom).await.unwrap_or(Cause::Vanished);
            let _ = exits.send(Exit { incarnation, cause });
        });
        true
    }

    /// Stops the process of `incarnation`, if it is the one running: SIGTERM to its group,
    /// then SIGKILL after the grace period. Returns once it is gone.
    /// Quarantine's `pause`: SIGSTOP to the process group of `incarnation` (SIGCONT when
    /// `pause` is false, on release).
    fn pause(&self, incarnation: u64, pause: bool) {
        let Some(current) = self.current.as_ref().filter(|current| current.incarnation == incarnation) else {
            return;
        };
        let (signal, what) = if pause { (Signal::STOP, "pausing") } else { (Signal::CONT, "resuming") };
        tracing::info!(agent = %self.agent.name, incarnation, pid = current.pid, "{what} the quarantined agent");
        if let Err(error) = process::signal_group(current.pid, signal) {
            tracing::warn!(agent = %self.agent.name, pid = current.pid, %error, "could not signal the agent");
        }
    }

    async fn stop(&mut self, incarnation: u64, grace: Duration) {
        let Some(current) = &self.current else { return };
        if current.incarnation != incarnation {
            return;
        }
        let pid = current.pid;
        let agent = self.agent.name.clone();
        tracing::info!(%agent, incarnation, pid, "stopping the agent: SIGTERM to its process group");
        if let Err(error) = process::signal_group(pid, Signal::TERM) {
            tracing::warn!(%agent, pid, %error, "could not signal the agent");
        }
        // A paused (quarantined) agent must run to act on its SIGTERM, as systemd does it.
        let _ = process::signal_group(pid, Signal::CONT);
        let exit = match tokio::time::timeout(grace, self.wait_exit(incarnation)).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(%agent, incarnation, pid, grace_ms = grace.as_millis() as u64, "still running after the grace period: SIGKILL");
                let _ = process::signal_group(pid, Signal::KILL);
                self.wait_exit(incarnation).await
            }
        };
        if let Some(exit) = exit {
            self.exited(exit).await;
        }
        // Stopped on purpose (or to make way for the next incarnation, which makes it
        // again): its cgroup goes with it.
        if let Some(cgroup) = self.cgroup.take() {
            let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
        }
    }

    /// Waits for the exit of `incarnation`, handling exits of others on the way.
    async fn wait_exit(&mut self, incarnation: u64) -> Option<Exit> {
        while let Some(exit) = self.exits.recv().await {
            if exit.incarnation == incarnation {
                return Some(exit);
            }
        }
        None
    }

    async fn exited(&mut self, mut exit: Exit) {
        if let Some((incarnation, cause)) = self.fenced.take() {
            if incarnation == exit.incarnation {
                exit.cause = cause;
            } else {
                self.fenced = Some((incarnation, cause));
            }
        }
        let agent = self.agent.name.clone();
        tracing::info!(%agent, incarnation = exit.incarnation, cause = %exit.cause, at = clock::now().0, "agent process ended");
        // The core ignores it if the incarnation is already down or superseded.
        self.report(SupervisionCommand::ReportDown { agent, incarnation: exit.incarnation, cause: exit.cause }).await;
        // Counted gone only once reported, so a stop of all agents waits for the reports.
        if self.current.as_ref().is_some_and(|current| current.incarnation == exit.incarnation) {
            self.current = None;
            self.live.send_modify(|count| *count = count.saturating_sub(1));
        }
    }

    /// The resource detector's reading: resident memory and CPU time of the process
    /// group, from /proc. The core judges it against the agent's thresholds.
    async fn sample(&mut self) {
        let Some(current) = &self.current else { return };
        let (pid, incarnation) = (current.pid, current.incarnation);
        let Ok(Some(usage)) = tokio::task::spawn_blocking(move || process::group_usage(pid)).await else { return };
        self.measured(incarnation, Measurement::Usage { rss_bytes: usage.rss_bytes, cpu_ms: usage.cpu_ms }).await;
    }

    /// The health probe detector's reading: one probe of the agent's endpoint. The core
    /// counts failures in a row.
    async fn probe(&mut self) {
        let Some(spec) = self.agent.probe.clone() else { return };
        let Some(incarnation) = self.current.as_ref().map(|current| current.incarnation) else { return };
        let failure = match crate::probe::probe(&spec.url, spec.timeout).await {
            Probe::Healthy => None,
            Probe::Unhealthy(reason) => {
                tracing::warn!(agent = %self.agent.name, incarnation, %reason, "health probe failed");
                Some(reason)
            }
        };
        // The process may have changed while the probe was out.
        if self.current.as_ref().is_some_and(|current| current.incarnation == incarnation) {
            self.measured(incarnation, Measurement::Probe { failure }).await;
        }
    }

    async fn measured(&self, incarnation: u64, measurement: Measurement) {
        let engine = match &self.reporter {
            Reporter::Local(engine) => engine,
            Reporter::Cluster(nodes) => {
                let agent = self.agent.name.clone();
                nodes.report(crate::nodes::Report::Measured { agent, incarnation, measurement });
                return;
            }
        };
        let observation = Observation::Measured(measurement);
        match engine.observe(self.agent.name.clone(), incarnation, observation).await {
            // A run already declared down (by this or another detector) is judged no more.
            Ok(()) | Err(EngineError::Rejected(_)) => {}
            Err(error) => tracing::warn!(agent = %self.agent.name, %error, "could not report a measurement"),
        }
    }

    async fn report(&self, command: SupervisionCommand) {
        match &self.reporter {
            Reporter::Local(engine) => {
                if let Err(error) = engine.execute(command).await {
                    tracing::warn!(agent = %self.agent.name, %error, "could not report to the engine");
                }
            }
            Reporter::Cluster(nodes) => match crate::nodes::Report::of(command) {
                Some(report) => nodes.report(report),
                None => tracing::warn!(agent = %self.agent.name, "a keeper's report the leader does not take"),
            },
        }
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
