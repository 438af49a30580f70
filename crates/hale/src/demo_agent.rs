//! `hale demo-agent ROLE`: a small agent that hale can run. It resumes its state, then
//! works in steps: each step it heartbeats with its progress and checkpoints the step.
//!
//! It also takes the tasks hale leases to it, one at a time: a task's payload says how
//! many steps it has (`{"steps": 4}`, default 3), each committed with the model call
//! behind it, and what to answer. A retry skips the steps an earlier attempt committed.
//! A compensation task (`{"compensate": …}`) is answered at once.
//!
//! `--misbehave` makes it fail in one of the ways real agents do, so the detectors and
//! the supervisor can be tested and demonstrated on a real process.

use anyhow::{Context, Result, bail};
use hale_client::{Agent, AgentOptions, LlmCallInfo, ProgressBody, StepExtras, TaskInfo};
use serde_json::json;
use std::time::Duration;

/// The ways the demo agent can misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Misbehave {
    /// Work normally.
    None,
    /// Exit with status 1 at once, before saying hello.
    ExitNow,
    /// Exit with status 1 after `--after-ms`.
    ExitAfter,
    /// Exit with status 0 after `--after-ms`: finished, not failed.
    FinishAfter,
    /// Stop heartbeating (and everything else) after `--after-ms`, but keep running.
    Hang,
    /// Keep heartbeating after `--after-ms`, but make no more progress.
    Stall,
    /// Ignore SIGTERM (so a stop must end in SIGKILL).
    IgnoreSigterm,
    /// After `--after-ms`, allocate and touch 64 MiB every step, without end.
    GrowMemory,
    /// After `--after-ms`, burn a core in a busy loop on a thread of its own.
    Spin,
    /// After `--after-ms`, answer the health endpoint (`--health-listen`) with 503, while
    /// heartbeating and progressing as usual.
    Unhealthy,
    /// When hale refuses its run (fenced: a newer incarnation runs), keep running, idle,
    /// until a signal ends it: a process stuck in a long call, which only the hale that
    /// started it can stop.
    OutliveFence,
}

#[derive(Debug, clap::Args)]
pub struct DemoAgentArgs {
    /// The role this agent plays (it shows in its progress messages).
    pub role: String,
    /// The agent's name [default: $HALE_AGENT, else the role].
    #[arg(long)]
    pub name: Option<String>,
    /// The hale to connect to [default: $HALE_URL].
    #[arg(long)]
    pub server: Option<String>,
    /// Time per step (one heartbeat and one checkpoint each).
    #[arg(long, default_value_t = 200)]
    pub step_ms: u64,
    /// Steps in one unit of work; progress goes from 0 to 1 over them, then starts again.
    #[arg(long, default_value_t = 50)]
    pub steps: u64,
    #[arg(long, value_enum, default_value_t = Misbehave::None)]
    pub misbehave: Misbehave,
    /// When the misbehaviour starts, after the agent has resumed.
    #[arg(long, default_value_t = 0)]
    pub after_ms: u64,
    /// Misbehave only in this incarnation (from `HALE_INCARNATION`), e.g. 1 for an agent
    /// that fails once and then works after its restart.
    #[arg(long)]
    pub only_incarnation: Option<u64>,
    /// Serve a health endpoint (any path; 200, or 503 when unhealthy) on this address.
    #[arg(long)]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Time per step of a task.
    #[arg(long, default_value_t = 300)]
    pub task_step_ms: u64,
}

pub async fn run(mut args: DemoAgentArgs) -> Result<i32> {
    if let Some(only) = args.only_incarnation {
        let incarnation = std::env::var("HALE_INCARNATION").ok().and_then(|text| text.parse::<u64>().ok());
        if incarnation != Some(only) {
            args.misbehave = Misbehave::None;
        }
    }
    if args.misbehave == Misbehave::ExitNow {
        eprintln!("demo-agent {}: exiting at once, as told (--misbehave exit-now)", args.role);
        return Ok(1);
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let server = match args.server.clone().or_else(hale_client::url_from_env) {
        Some(server) => server,
        None => bail!("no hale to connect to: set --server or HALE_URL (hale sets it for the agents it runs)"),
    };
    let mut options = AgentOptions::from_env(&args.role).unwrap_or_else(|| AgentOptions::new(&args.role, &args.role));
    if let Some(name) = &args.name {
        options.agent = name.clone();
    }
    let started = tokio::time::Instant::now();
    if let Some(listen) = args.health_listen {
        let unhealthy_after = (args.misbehave == Misbehave::Unhealthy).then(|| Duration::from_millis(args.after_ms));
        serve_health(listen, started, unhealthy_after).await?;
    }
    let mut work = Work { args: &args, started, ballast: Vec::new(), spinning: false, job: None };
    // Survive hale restarting: reconnect and resume the same run until hale says it is
    // over (fenced, or down). A real agent gets this from the client library.
    let mut delay = Duration::from_millis(50);
    loop {
        let agent = match Agent::connect(&server, options.clone()).await {
            Ok(agent) => agent,
            Err(error) => {
                eprintln!("demo-agent: {error}; retrying in {} ms", delay.as_millis());
                if stopped_while_waiting(&mut terminate, delay, args.misbehave).await {
                    return Ok(0);
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let welcome = match agent.resume().await {
            Ok(welcome) => welcome,
            Err(error) if error.code().is_some() && args.misbehave == Misbehave::OutliveFence => {
                return outlive(&error.to_string(), &mut terminate).await;
            }
            Err(error) if error.code().is_some() => {
                println!("demo-agent: hale refused to resume this run ({error}); exiting");
                return Ok(3);
            }
            Err(error) => {
                eprintln!("demo-agent: {error}; retrying");
                if stopped_while_waiting(&mut terminate, delay, args.misbehave).await {
                    return Ok(0);
                }
                continue;
            }
        };
        delay = Duration::from_millis(50);
        options.incarnation = Some(welcome.incarnation);
        println!(
            "demo-agent {} ({}): incarnation {}, resumed at version {} from step {}",
            welcome.agent,
            args.role,
            welcome.incarnation,
            welcome.version,
            welcome.state.get("step").and_then(|step| step.as_u64()).unwrap_or(0)
        );
        let step = welcome.state.get("step").and_then(|step| step.as_u64()).unwrap_or(0);
        match work.run(&agent, step, &mut terminate).await {
            Outcome::Exit(code) => return Ok(code),
            Outcome::Disconnected(reason)
                if reason.starts_with("fenced") && args.misbehave == Misbehave::IgnoreSigterm =>
            {
                // A stuck process ignores the fence too; only SIGKILL ends it.
                println!("demo-agent: {reason}; staying anyway, as told (--misbehave ignore-sigterm)");
                loop {
                    terminate.recv().await;
                    println!("demo-agent: SIGTERM ignored, as told (--misbehave ignore-sigterm)");
                }
            }
            Outcome::Disconnected(reason)
                if reason.starts_with("fenced") && args.misbehave == Misbehave::OutliveFence =>
            {
                return outlive(&reason, &mut terminate).await;
            }
            Outcome::Disconnected(reason) if reason.starts_with("fenced") => {
                println!("demo-agent: {reason}; exiting");
                return Ok(3);
            }
            Outcome::Disconnected(reason) => println!("demo-agent: lost hale ({reason}); reconnecting"),
        }
    }
}

/// A minimal health endpoint: every request gets 200, or 503 once `unhealthy_after` has
/// passed since `started`.
async fn serve_health(
    listen: std::net::SocketAddr,
    started: tokio::time::Instant,
    unhealthy_after: Option<Duration>,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let healthy = unhealthy_after.is_none_or(|after| started.elapsed() < after);
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let status = if healthy { "200 OK" } else { "503 Service Unavailable" };
                let body = if healthy { "ok\n" } else { "unhealthy, as told\n" };
                let response =
                    format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Sleeps `delay` unless SIGTERM comes first (which ends the agent, unless it ignores it).
/// `--misbehave outlive-fence`: the run is over, and the process stays until SIGTERM.
async fn outlive(reason: &str, terminate: &mut tokio::signal::unix::Signal) -> Result<i32> {
    println!("demo-agent: {reason}; staying until a signal ends me, as told (--misbehave outlive-fence)");
    terminate.recv().await;
    Ok(0)
}

async fn stopped_while_waiting(
    terminate: &mut tokio::signal::unix::Signal,
    delay: Duration,
    misbehave: Misbehave,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = terminate.recv() => misbehave != Misbehave::IgnoreSigterm,
    }
}

enum Outcome {
    Exit(i32),
    Disconnected(String),
}

struct Work<'a> {
    args: &'a DemoAgentArgs,
    started: tokio::time::Instant,
    ballast: Vec<Vec<u8>>,
    spinning: bool,
    /// The task being worked on, and when its next step is due.
    job: Option<(TaskInfo, tokio::time::Instant)>,
}

impl Work<'_> {
    async fn run(&mut self, agent: &Agent, mut step: u64, terminate: &mut tokio::signal::unix::Signal) -> Outcome {
        let args = self.args;
        let mut ticker = tokio::time::interval(Duration::from_millis(args.step_ms.max(1)));
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                // Suspected: beat at once (from this loop, so a hung loop cannot answer).
                _ = agent.challenged() => {}
                _ = terminate.recv() => {
                    if args.misbehave == Misbehave::IgnoreSigterm {
                        println!("demo-agent: SIGTERM ignored, as told (--misbehave ignore-sigterm)");
                        continue;
                    }
                    println!("demo-agent: SIGTERM, stopping at step {step}");
                    // The last state, then a clean close.
                    if let Err(error) = agent.close(Some(json!({ "step": step, "stopped_at_step": step }))).await {
                        println!("demo-agent: the last checkpoint failed: {error}");
                    }
                    return Outcome::Exit(0);
                }
                reason = agent.ended() => return Outcome::Disconnected(reason),
                offered = agent.next_task(), if self.job.is_none() => {
                    if let Some(task) = offered {
                        println!("demo-agent: took task {} (attempt {}, {} steps done before)", task.task, task.attempts, task.steps.iter().filter(|step| step.state == "done").count());
                        let due = tokio::time::Instant::now() + Duration::from_millis(args.task_step_ms);
                        self.job = Some((task, due));
                    }
                    continue;
                }
            }
            let mut progressing = true;
            if self.started.elapsed() >= Duration::from_millis(args.after_ms) {
                match args.misbehave {
                    Misbehave::ExitAfter => {
                        println!("demo-agent: exiting with status 1 at step {step}, as told");
                        return Outcome::Exit(1);
                    }
                    Misbehave::FinishAfter => {
                        println!("demo-agent: finished at step {step}");
                        return Outcome::Exit(0);
                    }
                    Misbehave::Hang => {
                        println!("demo-agent: hanging at step {step}, as told (no more heartbeats)");
                        std::future::pending::<()>().await;
                    }
                    Misbehave::Stall => progressing = false,
                    Misbehave::Spin if !self.spinning => {
                        self.spinning = true;
                        println!("demo-agent: spinning a core, as told");
                        std::thread::spawn(|| {
                            let mut x = 0u64;
                            loop {
                                x = std::hint::black_box(x.wrapping_add(1));
                            }
                        });
                    }
                    Misbehave::GrowMemory => {
                        let mut chunk = vec![0u8; 64 * 1024 * 1024];
                        // Touch every page, so the memory is resident, not just reserved.
                        for page in chunk.chunks_mut(4096) {
                            page[0] = 1;
                        }
                        self.ballast.push(chunk);
                    }
                    _ => {}
                }
            }
            if progressing {
                step += 1;
            }
            let steps = args.steps.max(1);
            let mut progress = ProgressBody {
                fraction: Some((step % steps) as f64 / steps as f64),
                message: Some(format!("{} step {step}", args.role)),
                task: Some(format!("{}-work-{}", args.role, step / steps)),
                fields: serde_json::Map::new(),
            };
            if progressing && let Some((task, _)) = &self.job {
                let total = task_steps(task);
                let done = task.steps.iter().filter(|step| step.state == "done").count() as u64;
                progress.fraction = Some(done as f64 / total.max(1) as f64);
                progress.message = Some(format!("task {} step {done}/{total}", task.task));
                progress.task = Some(format!("task-{}", task.task));
            }
            let sent = match agent.heartbeat(Some(progress)).await {
                Ok(()) if progressing => agent.checkpoint(json!({ "step": step, "role": args.role })).await.map(|_| ()),
                other => other,
            };
            let sent = match sent {
                Ok(()) if progressing => self.task_step(agent).await,
                other => other,
            };
            if let Err(error) = sent {
                return match error.code() {
                    Some(code) => Outcome::Disconnected(format!("fenced: hale refused a write ({code})")),
                    None => Outcome::Disconnected(agent.ended().await),
                };
            }
        }
    }

    /// One step of the task at hand, if one is due: the next step not yet done (an
    /// uncertain one is checked, then committed), or the completion.
    async fn task_step(&mut self, agent: &Agent) -> Result<(), hale_client::ClientError> {
        let Some((task, due)) = &mut self.job else { return Ok(()) };
        if tokio::time::Instant::now() < *due {
            return Ok(());
        }
        *due += Duration::from_millis(self.args.task_step_ms);
        let id = task.task;
        if agent.is_cancelled(id) {
            println!("demo-agent: task {id} was cancelled; dropping it");
            self.job = None;
            return Ok(());
        }
        let written = if let Some(undo) = task.payload.get("compensate") {
            println!("demo-agent: undoing step {} of task {}", undo["step"], undo["task"]);
            agent.complete(id, json!({ "undone": undo["step"] })).await.map(|()| true)
        } else {
            let total = task_steps(task);
            let done = |name: &str| task.steps.iter().any(|step| step.name == name && step.state == "done");
            match (1..=total).map(|n| format!("step-{n}")).find(|name| !done(name)) {
                Some(name) => {
                    if task.steps.iter().any(|step| step.name == name && step.state == "uncertain") {
                        println!("demo-agent: {name} of task {id} is uncertain: checking whether it happened");
                    }
                    agent.intend(id, &name).await?;
                    let result = json!({
                        "by": agent_label(agent),
                        "output": format!("{} output for {name}", self.args.role),
                    });
                    let extras = StepExtras {
                        llm: Some(LlmCallInfo {
                            model: format!("demo-{}", self.args.role),
                            model_version: Some("1".into()),
                            temperature: Some(0.0),
                            prompt_hash: Some(format!("demo:{id}:{name}")),
                            tokens_in: Some(100),
                            tokens_out: Some(40),
                            ..LlmCallInfo::default()
                        }),
                        compensation: task.payload.get("compensable").map(|_| json!({ "undo": name })),
                        reservation: None,
                    };
                    match agent.commit(id, &name, result.clone(), extras).await {
                        Ok(()) => {
                            println!("demo-agent: task {id}: committed {name}");
                            task.steps.retain(|step| step.name != name);
                            task.steps.push(hale_client::StepInfo {
                                name,
                                state: "done".into(),
                                result,
                                attempt: task.attempts,
                                at_ms: 0,
                                llm: None,
                                compensation: None,
                            });
                            Ok(false)
                        }
                        Err(error) => Err(error),
                    }
                }
                None => {
                    let answer =
                        task.payload.get("answer").cloned().unwrap_or_else(|| json!(format!("{total} steps done")));
                    println!("demo-agent: task {id}: complete");
                    agent.complete(id, json!({ "answer": answer, "steps": total })).await.map(|()| true)
                }
            }
        };
        match written {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.job = None;
                Ok(())
            }
            // The lease moved on (cancelled, or this run lost it): drop the task, keep going.
            Err(error) if matches!(error.code(), Some("lease_lost" | "task_ended" | "step_done")) => {
                println!("demo-agent: task {id}: {error}; dropping it");
                self.job = None;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// The steps a task's payload asks for (default 3).
fn task_steps(task: &TaskInfo) -> u64 {
    task.payload.get("steps").and_then(|steps| steps.as_u64()).unwrap_or(3).clamp(1, 1_000)
}

/// `agent/incarnation`, for step results.
fn agent_label(agent: &Agent) -> String {
    format!("{}/{}", agent.name(), agent.incarnation().unwrap_or(0))
}
