//! `restart`: SIGKILL a supervised agent and time how long until its next incarnation has
//! resumed (hello answered with welcome) and has made its first durable checkpoint.
//!
//! hale runs in this process with one declared agent, this binary's `demo-agent`. The
//! trials run on a blocking thread that reads the engine's state every `--poll-us`
//! (tokio's timer only resolves milliseconds), calling into the runtime for each read.

use super::{BenchArgs, machine, micros, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use hale_core::supervision::ManagedStatus;
use hale_core::{AgentName, Rng, RoleName};
use hale_server::engine::Engine;
use hale_server::process::{ProcessSpec, Signal, signal_group};
use hale_server::{DeclaredAgent, ServerConfig, Supervise};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// The demo agent's step: one heartbeat and one checkpoint each.
const STEP_MS: u64 = 100;
/// How long the first incarnation, or any trial, may take before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(30);

pub(super) async fn restart(args: &BenchArgs) -> Result<Value> {
    let trials = args.trials.unwrap_or(100);
    if trials == 0 || args.poll_us == 0 {
        bail!("--trials and --poll-us must be positive");
    }
    let dir = temp_dir(args)?;
    let exe = std::env::current_exe().context("finding this hale binary, to run it as the agent")?;
    let agent = AgentName::new("bench-restart")?;
    let supervision = super::restart_at_once();
    let args_of_agent = vec!["demo-agent".to_string(), "bench".into(), "--step-ms".into(), STEP_MS.to_string()];
    let process =
        ProcessSpec { command: exe.to_string_lossy().into_owned(), args: args_of_agent, ..Default::default() };
    let declared = DeclaredAgent {
        name: agent.clone(),
        role: RoleName::new("bench")?,
        labels: BTreeMap::new(),
        supervision,
        process: process.clone(),
        probe: None,
    };
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    config.supervise = Some(Supervise {
        agents: vec![declared],
        roles: Vec::new(),
        stop_grace: Duration::from_secs(2),
        log_bytes_max: 16 * 1024 * 1024,
        logs_kept: 1,
        workdir_base: None,
        cgroups: hale_server::process::CgroupSetting::default(),
    });
    eprintln!(
        "restart: {trials} SIGKILLs of `{} {}` supervised by a hale in this process, data in {}",
        process.command,
        process.args.join(" "),
        dir.path().display()
    );
    let server = hale_server::start(config).await?;
    let engine = server.engine().clone();
    let runtime = Handle::current();
    let poll = Duration::from_micros(args.poll_us);
    let measured = tokio::task::spawn_blocking(move || run_trials(&runtime, &engine, &agent, trials, poll)).await;
    server.shutdown().await?;
    let run = measured.context("the restart trials panicked")??;

    let mut down_logged: Vec<u32> = run.trials.iter().map(|trial| micros(trial.down_logged)).collect();
    let mut process_started: Vec<u32> = run.trials.iter().map(|trial| micros(trial.process_started)).collect();
    let mut resumed: Vec<u32> = run.trials.iter().map(|trial| micros(trial.resumed)).collect();
    let mut checkpointed: Vec<u32> = run.trials.iter().map(|trial| micros(trial.checkpointed)).collect();
    let resumed = summary_ms(&mut resumed);
    let checkpointed = summary_ms(&mut checkpointed);
    let poll_us = run.polling.as_secs_f64() * 1e6 / run.polls.max(1) as f64;
    Ok(json!({
        "scenario": "restart",
        "trials": run.trials.len(),
        "p50_ms": resumed["p50_ms"],
        "p99_ms": resumed["p99_ms"],
        "max_ms": resumed["max_ms"],
        "checkpoint_p50_ms": checkpointed["p50_ms"],
        "checkpoint_p99_ms": checkpointed["p99_ms"],
        "checkpoint_max_ms": checkpointed["max_ms"],
        "breakdown": {
            "down_logged": summary_ms(&mut down_logged),
            "process_started": summary_ms(&mut process_started),
            "resumed": resumed,
            "first_checkpoint": checkpointed,
        },
        "poll_period_us": poll_us.round() as u64,
        "settings": {
            "agent": format!("{} {} (this binary: a heartbeat and a checkpoint every {STEP_MS} ms)", process.command, process.args.join(" ")),
            "restart": "always",
            "backoff": "off for the bench (base_ms 0: every restart immediate)",
            "intensity": "1,000,000 restarts within 1 ms (never trips)",
            "kill": "SIGKILL to the agent's process group, 50-150 ms after its incarnation's first durable checkpoint",
            "durability": "SQLite WAL, synchronous=FULL: every logged step fsync'd before it is acted on",
            "poll_us": args.poll_us,
        },
        "how": format!(
            "hale runs in this process and supervises one agent, this binary's `demo-agent` (a heartbeat and a \
             checkpoint every {STEP_MS} ms): restart always, backoff off for the bench (base 0 ms, so every restart is \
             immediate; by default hale waits up to 100 ms x 2^(n-2) before the n-th restart within the intensity \
             window), an intensity that never trips. Each of {trials} trials waits until the incarnation has made a \
             durable checkpoint, lets it work 50-150 ms more, sends SIGKILL to its process group, then reads the \
             engine's state every {} us from a blocking thread (measured period {poll_us:.0} us, the read included; a \
             read answers once what it saw is durable and adds no fsync) until the next incarnation has checkpointed. \
             Each time runs from just before kill(2) to the first read that saw the step, so it is late by up to one \
             period; percentiles are nearest-rank over the trials. down_logged: the supervisor's waitpid notice, then \
             AgentDown + RestartScheduled + IncarnationStarted in one fsync'd commit. process_started: the Spawn \
             effect reaches the agent's keeper once that commit is durable; fork/exec of the agent, its start time \
             read from /proc, ProcessStarted fsync'd. resumed (the headline p50/p99/max): the core has the new \
             incarnation's first heartbeat, which the agent sends as soon as hale answered its hello with welcome; \
             this adds the agent's own start (exec and dynamic loading of this binary, a tokio runtime), its \
             WebSocket connect, hello, and welcome (sent once everything before it is durable). first_checkpoint \
             (checkpoint_*): the new incarnation's first checkpoint is durable (one more fsync).",
            args.poll_us
        ),
        "machine": machine(),
    }))
}

/// When each step of one restart was seen, from the kill.
struct Trial {
    down_logged: Duration,
    process_started: Duration,
    resumed: Duration,
    checkpointed: Duration,
}

struct Run {
    trials: Vec<Trial>,
    /// Reads made while waiting for restarts, and the time they took together.
    polls: u64,
    polling: Duration,
}

/// What the engine says about the agent.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    incarnation: u64,
    /// The current incarnation's pid, once its `ProcessStarted` is logged.
    pid: Option<u32>,
    version: u64,
    /// The incarnation the core receives heartbeats from, if any.
    beating: Option<u64>,
}

fn observe(runtime: &Handle, engine: &Engine, agent: &AgentName) -> Result<Seen> {
    let agent = agent.clone();
    let seen = runtime.block_on(engine.read_core(move |core| {
        let Some(record) = core.state().agent(agent.as_str()) else { return Seen::default() };
        let pid = record
            .managed
            .as_ref()
            .filter(|managed| managed.status == ManagedStatus::Running)
            .and_then(|managed| managed.process)
            .map(|process| process.pid);
        let beating = core.liveness(agent.as_str()).map(|live| live.incarnation);
        Seen { incarnation: record.incarnation, pid, version: record.version(), beating }
    }))?;
    Ok(seen)
}

fn run_trials(runtime: &Handle, engine: &Engine, agent: &AgentName, trials: usize, poll: Duration) -> Result<Run> {
    // The first incarnation: wait until it heartbeats and has checkpointed.
    let started = Instant::now();
    loop {
        let seen = observe(runtime, engine, agent)?;
        if seen.pid.is_some() && seen.beating == Some(seen.incarnation) && seen.version > 0 {
            break;
        }
        if started.elapsed() > PATIENCE {
            bail!(
                "the agent did not start, resume and checkpoint within {PATIENCE:?} (its log is in logs/ of the data dir)"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let mut run = Run { trials: Vec::with_capacity(trials), polls: 0, polling: Duration::ZERO };
    for _ in 0..trials {
        // Let it work a while, so the kill lands anywhere in its step.
        std::thread::sleep(Duration::from_millis(STEP_MS / 2 + rng.up_to(STEP_MS)));
        let before = observe(runtime, engine, agent)?;
        let Some(pid) = before.pid else { bail!("the agent is not running before a trial: {before:?}") };
        let next = before.incarnation + 1;
        let killed = Instant::now();
        signal_group(pid, Signal::KILL).with_context(|| format!("sending SIGKILL to process group {pid}"))?;
        let (mut down_logged, mut process_started, mut resumed) = (None, None, None);
        // The version when the next incarnation was first seen: the old one can no longer
        // write by then, and the new one has not yet checkpointed (checked below).
        let mut base_version = None;
        let checkpointed = loop {
            std::thread::sleep(poll);
            let seen = observe(runtime, engine, agent)?;
            let at = killed.elapsed();
            run.polls += 1;
            if seen.incarnation > next {
                bail!("incarnation {next} was itself replaced by {} within one trial", seen.incarnation);
            }
            if seen.incarnation == next {
                if base_version.is_none() && seen.beating == Some(next) {
                    bail!("incarnation {next} was first seen after it had resumed; poll more often (--poll-us)");
                }
                let base = *base_version.get_or_insert(seen.version);
                down_logged.get_or_insert(at);
                if seen.pid.is_some() {
                    process_started.get_or_insert(at);
                }
                if seen.beating == Some(next) {
                    resumed.get_or_insert(at);
                }
                if seen.version > base {
                    break at;
                }
            }
            if at > PATIENCE {
                bail!("incarnation {next} did not resume and checkpoint within {PATIENCE:?} of the kill: {seen:?}");
            }
        };
        run.polling += checkpointed;
        run.trials.push(Trial {
            down_logged: down_logged.unwrap_or(checkpointed),
            process_started: process_started.unwrap_or(checkpointed),
            resumed: resumed.unwrap_or(checkpointed),
            checkpointed,
        });
    }
    Ok(run)
}
