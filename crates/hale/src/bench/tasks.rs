//! `tasks`: task throughput. Agents over real WebSocket sessions complete every task they
//! are leased at once (no-op work) while submitters post tasks over HTTP as fast as hale
//! accepts them; the time from the first submit to the last completion is measured.

use super::{BenchArgs, machine, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use hale_client::{Admin, Agent, AgentOptions, HttpSubmitTask};
use hale_core::AgentName;
use hale_core::tasks::TaskStatus;
use hale_server::ServerConfig;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Every agent heartbeats this often, so it stays alive (and may take tasks).
const BEAT: Duration = Duration::from_millis(500);
/// The run fails if no task completes for this long.
const PATIENCE: Duration = Duration::from_secs(30);
/// The role every bench agent plays and every task asks for.
const ROLE: &str = "noop";

pub(super) async fn tasks(args: &BenchArgs) -> Result<Value> {
    let (agents_n, tasks_n, submitters_n) = (args.task_agents, args.tasks, args.submitters);
    if agents_n == 0 || tasks_n == 0 || submitters_n == 0 {
        bail!("--task-agents, --tasks and --submitters must be positive");
    }
    let dir = temp_dir(args)?;
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    // One lease per agent (the default); no submission shed, however many are queued.
    let queued_max = (tasks_n as u64).saturating_mul(2).max(100_000);
    let settings = &mut config.liveness.tasks;
    settings.shed_background_at = queued_max;
    settings.shed_normal_at = queued_max;
    settings.shed_high_at = queued_max;
    let per_agent_max = settings.per_agent_max;
    let snapshot_every_events = config.snapshot_every_events;
    let server = hale_server::start(config).await?;
    let ws_url = format!("ws://{}", server.local_addr());
    let http_url = format!("http://{}", server.local_addr());
    eprintln!(
        "tasks: {tasks_n} no-op tasks, {submitters_n} HTTP submitters, {agents_n} agents over WebSocket, hale in this \
         process at {http_url}, data in {}",
        dir.path().display()
    );
    let run = format!("{}", std::process::id());

    // The agents: a session each, heartbeating, completing whatever they are leased.
    let completed = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let mut names = Vec::with_capacity(agents_n);
    let mut sessions = Vec::with_capacity(agents_n);
    for index in 0..agents_n {
        let name = format!("noop-{run}-{index}");
        let agent = Agent::connect(&ws_url, AgentOptions::new(name.clone(), ROLE).token(server.admin_token())).await?;
        agent.resume().await?;
        agent.heartbeat(None).await?;
        names.push(AgentName::new(name)?);
        let beating = agent.clone();
        workers.spawn(async move {
            let mut ticker = tokio::time::interval(BEAT);
            loop {
                ticker.tick().await;
                if beating.heartbeat(None).await.is_err() {
                    return Ok(());
                }
            }
        });
        let working = agent.clone();
        let completed = completed.clone();
        workers.spawn(async move {
            while let Some(task) = working.next_task().await {
                working
                    .complete(task.task, json!(null))
                    .await
                    .with_context(|| format!("completing task {}", task.task))?;
                completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
        sessions.push(agent);
    }
    // Every agent may take tasks before the first submit.
    let engine = server.engine().clone();
    let waiting = Instant::now();
    loop {
        let names = names.clone();
        let ready = engine.read_core(move |core| names.iter().all(|name| core.can_take_tasks(name))).await?;
        if ready {
            break;
        }
        if waiting.elapsed() > PATIENCE {
            bail!("the {agents_n} agents could not all take tasks within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Submit over HTTP from a few concurrent submitters, each one request at a time.
    let admin = Admin::new(&http_url).with_token(server.admin_token());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut submitters = tokio::task::JoinSet::new();
    for _ in 0..submitters_n {
        let (admin, next) = (admin.clone(), next.clone());
        submitters.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= tasks_n {
                    return Ok::<_, anyhow::Error>(ids);
                }
                let task = HttpSubmitTask { role: ROLE.into(), payload: json!({ "n": n }), ..Default::default() };
                let submitted = admin.submit(&task).await.with_context(|| format!("submitting task {n}"))?;
                ids.push(submitted.task);
            }
        });
    }
    let mut ids = Vec::with_capacity(tasks_n);
    while let Some(joined) = submitters.join_next().await {
        ids.extend(joined.context("a submitter panicked")??);
    }
    let submitted_in = started.elapsed();
    // Wait for the last completion (each acknowledged once durable).
    let (mut last, mut last_change) = (0, Instant::now());
    let wall = loop {
        let done = completed.load(Ordering::Relaxed);
        if done >= tasks_n {
            break started.elapsed();
        }
        if done != last {
            (last, last_change) = (done, Instant::now());
        } else if last_change.elapsed() > PATIENCE {
            bail!("only {done} of {tasks_n} tasks completed; none for {PATIENCE:?}");
        }
        if let Some(Ok(Err(error))) = workers.try_join_next() {
            return Err(error.context("an agent failed"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };

    // The tasks as hale's log has them.
    let wanted = ids.clone();
    let records = engine
        .read(move |state| {
            wanted
                .iter()
                .map(|id| {
                    state.tasks().get(*id).map(|task| {
                        let done = matches!(task.status, TaskStatus::Completed { .. });
                        (done, task.submitted_at.0, task.started_at.map(|at| at.0), task.updated_at.0, task.attempts)
                    })
                })
                .collect::<Vec<_>>()
        })
        .await?;
    drop(sessions);
    workers.abort_all();
    server.shutdown().await?;

    let mut latency_us = Vec::with_capacity(tasks_n);
    let mut queued_us = Vec::with_capacity(tasks_n);
    let mut running_us = Vec::with_capacity(tasks_n);
    let (mut first_submitted, mut last_completed, mut retried) = (u64::MAX, 0, 0);
    for (id, record) in ids.iter().zip(&records) {
        let Some((done, submitted_at, started_at, updated_at, attempts)) = *record else {
            bail!("task {id} is not in hale's state")
        };
        if !done {
            bail!("task {id} was acknowledged completed, but hale's state has it otherwise");
        }
        let ms_to_us = |ms: u64| ms.saturating_mul(1_000).min(u64::from(u32::MAX)) as u32;
        latency_us.push(ms_to_us(updated_at.saturating_sub(submitted_at)));
        let started_at = started_at.unwrap_or(submitted_at);
        queued_us.push(ms_to_us(started_at.saturating_sub(submitted_at)));
        running_us.push(ms_to_us(updated_at.saturating_sub(started_at)));
        first_submitted = first_submitted.min(submitted_at);
        last_completed = last_completed.max(updated_at);
        retried += usize::from(attempts > 1);
    }
    let latency = summary_ms(&mut latency_us);
    let seconds = wall.as_secs_f64();
    let log_ms = last_completed.saturating_sub(first_submitted);
    Ok(json!({
        "scenario": "tasks",
        "tasks": tasks_n,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "throughput_per_s": (tasks_n as f64 / seconds).round(),
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "max_ms": latency["max_ms"],
        "breakdown": {
            "submit_seconds": (submitted_in.as_secs_f64() * 1000.0).round() / 1000.0,
            "submit_per_s": (tasks_n as f64 / submitted_in.as_secs_f64()).round(),
            "queued": summary_ms(&mut queued_us),
            "running": summary_ms(&mut running_us),
            "log_span_ms": log_ms,
            "retried": retried,
        },
        "settings": {
            "agents": agents_n,
            "submitters": submitters_n,
            "submit": "HTTP POST /v1/tasks (hale_client::Admin::submit) on loopback, one request at a time per submitter",
            "agent": "hale_client::Agent over a WebSocket session on loopback: heartbeat every 500 ms, complete(task, null) as soon as a task is offered",
            "per_agent_max": per_agent_max,
            "shed_at": queued_max,
            "payload": "{\"n\": N}",
            "snapshot_every_events": snapshot_every_events,
            "durability": "SQLite WAL, synchronous=FULL: every submit and completion answered after fsync",
        },
        "how": format!(
            "hale runs in this process (no supervised agents, like `hale serve`); {agents_n} agents in this process \
             each open a real WebSocket session on loopback, resume, heartbeat every 500 ms, and complete each task \
             they are offered at once, with a null result (no-op work). One lease per agent ([tasks] per_agent_max \
             {per_agent_max}); the shed limits are raised to {queued_max} so no submission is refused. Once every \
             agent can take tasks, {submitters_n} submitters post {tasks_n} tasks for role `{ROLE}` over HTTP \
             (POST /v1/tasks, each answered once the submit is durable), each one request at a time. seconds and \
             throughput_per_s: from just before the first submit until the bench had the last completion \
             acknowledged (durable), tasks/s = tasks / seconds; submits, assignments and completions overlap. \
             p50/p99/max: per task from submitted_at to the completion's updated_at, as hale's log recorded them \
             (millisecond clock); with every task submitted at once they include the wait in the queue \
             (breakdown.queued: submitted_at to started_at, the first lease; breakdown.running: lease to \
             completion: the offer over the session, the agent's complete and its fsync). Submitters, agents and \
             hale share this machine's cores. Assignment runs right after any command that frees work (a \
             completion, a submit) and at every 50 ms tick."
        ),
        "machine": machine(),
    }))
}
