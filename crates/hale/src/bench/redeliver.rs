//! `redeliver`: SIGKILL a managed agent while it holds a task, and time how long until
//! the task is running on another agent (leased to another agent's run, or to a new
//! incarnation of the same agent).
//!
//! hale runs in this process and supervises `WORKERS` agents of one role, each this
//! binary's `demo-agent`, which takes the tasks hale pushes over its session and commits
//! their steps. The trials run on a blocking thread that reads the engine's state every
//! `--poll-us`, like `restart`.

use super::{BenchArgs, machine, micros, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use hale_core::supervision::ManagedStatus;
use hale_core::tasks::{StepState, TaskSpec};
use hale_core::{AgentName, Answer, Rng, RoleName, TaskCommand};
use hale_server::engine::{Engine, Response};
use hale_server::process::{ProcessSpec, Signal, signal_group};
use hale_server::{DeclaredAgent, ServerConfig, Supervise};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// Managed agents of the one role: the holder and somewhere for its task to go.
const WORKERS: usize = 2;
/// The demo agent's time per task step (one `intend` + `commit` each).
const TASK_STEP_MS: u64 = 200;
/// Steps per task: enough that no task ends within a trial.
const TASK_STEPS: u64 = 1_000;
/// How long any wait of the bench may take before it gives up.
const PATIENCE: Duration = Duration::from_secs(30);

pub(super) async fn redeliver(args: &BenchArgs) -> Result<Value> {
    let trials = args.trials.unwrap_or(50);
    if trials == 0 || args.poll_us == 0 {
        bail!("--trials and --poll-us must be positive");
    }
    let dir = temp_dir(args)?;
    let exe = std::env::current_exe().context("finding this hale binary, to run it as the agents")?;
    let role = RoleName::new("worker")?;
    let supervision = super::restart_at_once();
    let args_of_agent =
        vec!["demo-agent".to_string(), role.to_string(), "--task-step-ms".into(), TASK_STEP_MS.to_string()];
    let process =
        ProcessSpec { command: exe.to_string_lossy().into_owned(), args: args_of_agent, ..Default::default() };
    let mut names = Vec::with_capacity(WORKERS);
    let mut declared = Vec::with_capacity(WORKERS);
    for index in 1..=WORKERS {
        let name = AgentName::new(format!("worker-{index}"))?;
        names.push(name.clone());
        declared.push(DeclaredAgent {
            name,
            role: role.clone(),
            labels: BTreeMap::new(),
            supervision: supervision.clone(),
            process: process.clone(),
            probe: None,
        });
    }
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    config.supervise = Some(Supervise {
        agents: declared,
        roles: Vec::new(),
        stop_grace: Duration::from_secs(2),
        log_bytes_max: 16 * 1024 * 1024,
        logs_kept: 1,
        workdir_base: None,
        cgroups: hale_server::process::CgroupSetting::default(),
    });
    eprintln!(
        "redeliver: {trials} SIGKILLs of a task's holder among {WORKERS} agents `{} {}` supervised by a hale in this \
         process, data in {}",
        process.command,
        process.args.join(" "),
        dir.path().display()
    );
    let server = hale_server::start(config).await?;
    let engine = server.engine().clone();
    let runtime = Handle::current();
    let poll = Duration::from_micros(args.poll_us);
    let workers = names.clone();
    let measured = tokio::task::spawn_blocking(move || {
        let mut bench = Bench { runtime, engine, workers, role, polls: 0, polling: Duration::ZERO };
        bench.run(trials, poll)
    })
    .await;
    server.shutdown().await?;
    let (run, polls, polling) = measured.context("the redeliver trials panicked")??;

    let mut down_logged: Vec<u32> = run.iter().filter_map(|trial| trial.down_logged.map(micros)).collect();
    let mut released: Vec<u32> = run.iter().map(|trial| micros(trial.released)).collect();
    let mut moved: Vec<u32> = run.iter().map(|trial| micros(trial.moved)).collect();
    let mut back: Vec<u32> = run.iter().map(|trial| micros(trial.back)).collect();
    let down_seen = down_logged.len();
    let moved_summary = summary_ms(&mut moved);
    let to_other = run.iter().filter(|trial| trial.to_other_agent).count();
    let pending_seen = run.iter().filter(|trial| trial.pending_seen).count();
    let mut killed_per_agent: BTreeMap<String, usize> = BTreeMap::new();
    for trial in &run {
        *killed_per_agent.entry(trial.killed.clone()).or_default() += 1;
    }
    let poll_us = polling.as_secs_f64() * 1e6 / polls.max(1) as f64;
    Ok(json!({
        "scenario": "redeliver",
        "trials": run.len(),
        "p50_ms": moved_summary["p50_ms"],
        "p99_ms": moved_summary["p99_ms"],
        "max_ms": moved_summary["max_ms"],
        "moved_to": {
            "other_agent": to_other,
            "same_agent_new_incarnation": run.len() - to_other,
        },
        "killed": killed_per_agent,
        "breakdown": {
            "down_logged": summary_ms(&mut down_logged),
            "down_logged_seen_in": down_seen,
            "lease_released": summary_ms(&mut released),
            "pending_seen_in": pending_seen,
            "running_elsewhere": moved_summary,
            "killed_agent_back": summary_ms(&mut back),
        },
        "poll_period_us": poll_us.round() as u64,
        "settings": {
            "agents": format!(
                "{WORKERS} managed agents of role worker (worker-1..worker-{WORKERS}), each `{} {}` (this binary: \
                 takes a task pushed over its session, one `intend` + `commit` per step every {TASK_STEP_MS} ms)",
                process.command,
                process.args.join(" ")
            ),
            "task": format!("payload {{\"steps\": {TASK_STEPS}}}, normal priority, 3 attempts, submitted through the engine in-process"),
            "per_agent_max": 1,
            "restart": "always",
            "backoff": "off for the bench (base_ms 0: every restart immediate)",
            "intensity": "1,000,000 restarts within 1 ms (never trips)",
            "kill": format!("SIGKILL to the holder's process group, 0-{TASK_STEP_MS} ms after its first committed step was seen"),
            "durability": "SQLite WAL, synchronous=FULL: every logged step fsync'd before it is acted on",
            "poll_us": args.poll_us,
        },
        "how": format!(
            "hale runs in this process and supervises {WORKERS} agents of one role, this binary's `demo-agent` (it \
             takes the tasks hale pushes over its WebSocket session and commits one step, intend then commit, every \
             {TASK_STEP_MS} ms): restart always, backoff off (base 0 ms), an intensity that never trips, one lease per \
             agent. Each of {trials} trials submits a task of {TASK_STEPS} steps through the engine, waits until it is \
             leased to an agent whose run heartbeats, that run has committed a step of it, and every other agent can \
             take tasks (alive, heartbeating, breaker closed); waits 0-{TASK_STEP_MS} ms more so the kill lands \
             anywhere in a step; then sends SIGKILL to the holder's process group and reads the engine's state every \
             {} us from a blocking thread (measured period {poll_us:.0} us, the read included; a read answers once \
             what it saw is durable) until the task is leased to another run. The headline p50/p99/max \
             (running_elsewhere) runs from just before kill(2) to the first read that saw the task leased \
             (TaskStatus::Running, durable) to another agent or to a new incarnation of the killed one (moved_to \
             counts which); percentiles are nearest-rank over the trials. It is the lease in hale's log, not the \
             new holder's first step: the agent is offered the task over its session once the lease is durable, \
             then works at its own pace. down_logged: the first read that saw the holder's run declared down (the \
             supervisor's waitpid notice, then AgentDown + RestartScheduled + IncarnationStarted in one fsync'd \
             commit); lease_released: the first read that saw the task no longer leased to the killed run (pending or \
             leased elsewhere). The engine runs an assignment pass right after a command that frees work, before it \
             reads its next request, so a read normally never sees the task pending in between (pending_seen_in \
             counts the trials where one did). After each trial the task is cancelled and the bench waits for the \
             killed agent's next incarnation to heartbeat and be able to take tasks (killed_agent_back, from the \
             kill) before the next trial.",
            args.poll_us
        ),
        "machine": machine(),
    }))
}

/// When each step of one redelivery was seen, from the kill.
struct Trial {
    killed: String,
    down_logged: Option<Duration>,
    released: Duration,
    moved: Duration,
    pending_seen: bool,
    to_other_agent: bool,
    back: Duration,
}

/// What the engine says about one worker.
#[derive(Clone, Debug, Default)]
struct Worker {
    incarnation: u64,
    /// The current incarnation's pid, once its process runs.
    pid: Option<u32>,
    /// The incarnation the core receives heartbeats from, if any.
    beating: Option<u64>,
    /// The current run may be given tasks (alive, not down, breaker closed).
    ready: bool,
    /// The incarnation last declared down, if any.
    down: Option<u64>,
    /// Leases held.
    load: usize,
}

/// What the engine says about the task.
#[derive(Clone, Debug)]
struct TaskSeen {
    holder: Option<(AgentName, u64)>,
    word: &'static str,
    steps_done: usize,
}

#[derive(Clone, Debug)]
struct Seen {
    workers: Vec<Worker>,
    task: Option<TaskSeen>,
}

struct Bench {
    runtime: Handle,
    engine: Engine,
    workers: Vec<AgentName>,
    role: RoleName,
    /// Reads made while waiting for redeliveries, and the time they took together.
    polls: u64,
    polling: Duration,
}

impl Bench {
    fn observe(&self, task: Option<u64>) -> Result<Seen> {
        let names = self.workers.clone();
        let seen = self.runtime.block_on(self.engine.read_core(move |core| {
            let state = core.state();
            let workers = names
                .iter()
                .map(|name| {
                    let Some(record) = state.agent(name.as_str()) else { return Worker::default() };
                    let pid = record
                        .managed
                        .as_ref()
                        .filter(|managed| managed.status == ManagedStatus::Running)
                        .and_then(|managed| managed.process)
                        .map(|process| process.pid);
                    Worker {
                        incarnation: record.incarnation,
                        pid,
                        beating: core.liveness(name.as_str()).map(|live| live.incarnation),
                        ready: core.can_take_tasks(name),
                        down: record.down.as_ref().map(|down| down.incarnation),
                        load: state.tasks().load(name),
                    }
                })
                .collect();
            let task = task.and_then(|id| state.tasks().get(id)).map(|task| TaskSeen {
                holder: task.holder().map(|(agent, incarnation)| (agent.clone(), incarnation)),
                word: task.status.word(),
                steps_done: task.steps.iter().filter(|step| step.state == StepState::Done).count(),
            });
            Seen { workers, task }
        }))?;
        Ok(seen)
    }

    /// Reads the state every few ms until `ready` says so, or fails with `what`.
    fn wait_for(&self, task: Option<u64>, what: &str, ready: impl Fn(&Seen) -> bool) -> Result<Seen> {
        let started = Instant::now();
        loop {
            let seen = self.observe(task)?;
            if ready(&seen) {
                return Ok(seen);
            }
            if started.elapsed() > PATIENCE {
                bail!(
                    "{what} did not happen within {PATIENCE:?} (agents' logs are in logs/ of the data dir): {seen:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn index_of(&self, agent: &AgentName) -> Result<usize> {
        self.workers.iter().position(|name| name == agent).with_context(|| format!("{agent} is not a bench worker"))
    }

    fn run(&mut self, trials: usize, poll: Duration) -> Result<(Vec<Trial>, u64, Duration)> {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let mut rng = Rng::new(seed);
        let mut run = Vec::with_capacity(trials);
        for _ in 0..trials {
            run.push(self.trial(&mut rng, poll)?);
        }
        Ok((run, self.polls, self.polling))
    }

    fn trial(&mut self, rng: &mut Rng, poll: Duration) -> Result<Trial> {
        // Every worker heartbeats, may take tasks and holds none.
        self.wait_for(None, "every worker ready and idle", |seen| {
            seen.workers.iter().all(|worker| worker.ready && worker.load == 0)
        })?;
        let spec = TaskSpec::new(self.role.clone(), json!({ "steps": TASK_STEPS }));
        let task = match self.runtime.block_on(self.engine.execute(TaskCommand::Submit { spec, by: None }))? {
            Response::Answer(Answer::TaskSubmitted { task, .. }) => task,
            other => bail!("submitting a task answered {other:?}"),
        };
        // Leased to a heartbeating run that has committed a step, with every other worker
        // able to take it.
        let holding = |seen: &Seen| -> Option<(usize, u64, u32)> {
            let state = seen.task.as_ref()?;
            let (agent, incarnation) = state.holder.as_ref()?;
            let index = self.workers.iter().position(|name| name == agent)?;
            let holder = &seen.workers[index];
            let others_ready = seen.workers.iter().enumerate().all(|(i, worker)| i == index || worker.ready);
            let pid = holder.pid?;
            (holder.incarnation == *incarnation
                && holder.beating == Some(*incarnation)
                && state.steps_done >= 1
                && others_ready)
                .then_some((index, *incarnation, pid))
        };
        self.wait_for(Some(task), "the task leased to a heartbeating worker with a committed step", |seen| {
            holding(seen).is_some()
        })?;
        // Let it work a while more, so the kill lands anywhere in its step.
        std::thread::sleep(Duration::from_millis(rng.up_to(TASK_STEP_MS)));
        let before = self.observe(Some(task))?;
        let Some((index, incarnation, pid)) = holding(&before) else {
            bail!("the task's holder changed before the kill: {before:?}")
        };
        let killed_name = self.workers[index].clone();
        let killed = Instant::now();
        signal_group(pid, Signal::KILL).with_context(|| format!("sending SIGKILL to process group {pid}"))?;
        let (mut down_logged, mut released, mut pending_seen) = (None, None, false);
        let (moved, to_other_agent) = loop {
            std::thread::sleep(poll);
            let seen = self.observe(Some(task))?;
            let at = killed.elapsed();
            self.polls += 1;
            let holder = &seen.workers[index];
            if holder.down == Some(incarnation) || holder.incarnation > incarnation {
                down_logged.get_or_insert(at);
            }
            let Some(state) = &seen.task else { bail!("task {task} vanished") };
            match &state.holder {
                Some((agent, now_incarnation)) if (agent, *now_incarnation) != (&killed_name, incarnation) => {
                    released.get_or_insert(at);
                    let to_other = self.index_of(agent)? != index;
                    break (at, to_other);
                }
                Some(_) => {}
                None => {
                    released.get_or_insert(at);
                    pending_seen |= state.word == "pending";
                    if state.word != "pending" {
                        bail!("task {task} is {} after its holder was killed", state.word);
                    }
                }
            }
            if at > PATIENCE {
                bail!("task {task} was not leased again within {PATIENCE:?} of the kill: {seen:?}");
            }
        };
        self.polling += moved;
        // Clean up: cancel the task, and wait for the killed agent's next run.
        self.runtime.block_on(self.engine.execute(TaskCommand::Cancel { task }))?;
        self.wait_for(Some(task), "the killed agent's next incarnation ready", |seen| {
            let worker = &seen.workers[index];
            worker.incarnation > incarnation && worker.beating == Some(worker.incarnation) && worker.ready
        })?;
        let back = killed.elapsed();
        Ok(Trial {
            killed: killed_name.to_string(),
            down_logged,
            released: released.unwrap_or(moved),
            moved,
            pending_seen,
            to_other_agent,
            back,
        })
    }
}
