//! `hale demo`: a crew of nine real agent processes under hale, two failures, a few
//! tasks, and a timeline of how hale noticed and healed each failure.
//!
//! The crew is `hale demo-agent` processes (data-analyst, two code-generators and a
//! small-model code-generator, creative-writer, two fact-checkers, orchestrator and a
//! backup orchestrator), each heartbeating with progress and checkpointing its step. The
//! task story (`tasks.rs`): a code task's holder is SIGKILLed after two committed steps and
//! the task finishes on the other code-generator from its last commit point; a fact-check
//! runs shadowed on both fact-checkers; with both code-generators stopped, a code task
//! falls back to the small model and completes at `good_enough`. Later the creative-writer
//! stalls (it keeps heartbeating but makes no progress). The timeline says which detector
//! saw each failure and how fast, the incarnation it was restarted as, the state version it
//! resumed from, and that its work continued from there. Everything runs on a temporary
//! data directory and is stopped at the end; the demo checks that no agent process is left.

mod tasks;

use anyhow::{Context, Result};
use hale_core::policy::{Backoff, Intensity};
use hale_core::supervision::{Criticality, ManagedStatus, RestartPolicy, StallPolicy, Supervision};
use hale_core::{AgentName, RoleName};
use hale_server::process::ProcessSpec;
use hale_server::{DeclaredAgent, ServerConfig, Supervise};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Print the timeline as JSON on stdout at the end (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// When the operator stops both code-generators (after the first code task is done),
    /// in seconds from the start.
    #[arg(long, default_value_t = 9.0)]
    small_at: f64,
    /// When the creative-writer stops making progress, in seconds after it starts.
    #[arg(long, default_value_t = 11.0)]
    stall_at: f64,
    /// How long the demo runs in all, in seconds.
    #[arg(long, default_value_t = 22.0)]
    seconds: f64,
}

const CREW: [&str; 9] = [
    "data-analyst",
    "code-generator",
    "code-generator-2",
    "code-generator-small",
    "creative-writer",
    "fact-checker",
    "fact-checker-2",
    "orchestrator",
    "orchestrator-backup",
];

/// The role of a crew member: its name without `-2` or `-backup`.
fn role_of(agent: &str) -> &str {
    agent.trim_end_matches("-backup").trim_end_matches("-2")
}
const STEP_MS: u64 = 100;
const STALL_BEATS: u32 = 10;

/// What the demo sees of one agent at one moment.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    incarnation: u64,
    version: u64,
    step: u64,
    status: String,
    pid: Option<u32>,
    /// (incarnation, detector, cause, at_ms)
    last_down: Option<(u64, String, String, u64)>,
}

pub async fn run(args: DemoArgs) -> Result<i32> {
    let temp = tempfile::tempdir().context("creating a temporary data directory")?;
    let mut config = ServerConfig::new(temp.path().join("data"), "127.0.0.1:0".parse().expect("an address"));
    config.supervise = Some(crew(&args)?);
    // The demo's failures are a kill and a stall, not silence. It also runs in CI beside
    // other tests on two busy cores, so the heartbeat detector tolerates pauses of 3 s
    // here (1 s by default) rather than declare a descheduled demo agent down.
    config.liveness.detector.acceptable_pause_ms = 3_000;
    let server = hale_server::start(config).await.context("starting hale for the demo")?;
    let url = format!("ws://{}", server.local_addr());
    let started = Instant::now();
    let mut timeline = Timeline { started, entries: Vec::new(), json: args.json };
    timeline.note(
        json!({ "kind": "hale_started", "url": url, "agents": CREW }),
        format!("hale is up at {url}; starting the crew: {}", CREW.join(", ")),
    );

    let mut last: BTreeMap<String, Seen> = BTreeMap::new();
    let mut story = tasks::TaskStory::default();
    let mut downs: BTreeMap<String, (u64, u64)> = BTreeMap::new(); // agent → (version, step) at its down
    let mut checks = Checks::default();
    let mut progressed: BTreeMap<String, Instant> = BTreeMap::new(); // agent → when its step last changed
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut progress_shown = Instant::now();
    while Instant::now() < deadline {
        let now = observe(&server).await?;
        for (agent, seen) in &now {
            let before = last.get(agent);
            if let Some((incarnation, detector, cause, at_ms)) = &seen.last_down
                && before.is_none_or(|before| before.last_down.as_ref().map(|down| down.0) != Some(*incarnation))
            {
                let (version, step) = before.map_or((seen.version, seen.step), |before| (before.version, before.step));
                downs.insert(agent.clone(), (version, step));
                if detector == "operator" {
                    // Stopped on purpose by the story: not a failure.
                    continue;
                }
                let after_ms = match &story.victim {
                    Some(victim) if victim.agent == *agent && victim.incarnation == *incarnation => {
                        Some(ms_between(victim.at, at_ms))
                    }
                    _ => None,
                };
                // For a stall: how long its progress had been standing still.
                let still_ms = progressed.get(agent).map(|when| ms_between(*when, at_ms));
                let text = match (after_ms, still_ms) {
                    (Some(after), _) => format!(
                        "{agent}: incarnation {incarnation} DOWN, detected {after} ms after the kill by {detector}: {cause}"
                    ),
                    (None, Some(still)) if detector == "stall" => format!(
                        "{agent}: incarnation {incarnation} DOWN, detected by {detector} {still} ms after its last progress: {cause}"
                    ),
                    _ => format!("{agent}: incarnation {incarnation} DOWN, detected by {detector}: {cause}"),
                };
                timeline.note(
                    json!({ "kind": "detected", "agent": agent, "incarnation": incarnation, "detector": detector,
                            "cause": cause, "after_kill_ms": after_ms, "after_last_progress_ms": still_ms,
                            "state_version": version, "step": step }),
                    text,
                );
                checks.detected(agent, detector, *incarnation);
            }
            if before.is_none_or(|before| before.incarnation != seen.incarnation) && seen.incarnation > 0 {
                let kind = if seen.incarnation == 1 { "started" } else { "restarted" };
                let after_down_ms = seen.last_down.as_ref().map(|down| ms_since(down.3));
                let text = match after_down_ms {
                    Some(after) if seen.incarnation > 1 => {
                        format!(
                            "{agent}: restarted as incarnation {} (pid {}), {after} ms after it was declared down",
                            seen.incarnation,
                            seen.pid.map_or("?".into(), |pid| pid.to_string())
                        )
                    }
                    _ => format!("{agent}: {kind} as incarnation {}", seen.incarnation),
                };
                timeline.note(
                    json!({ "kind": kind, "agent": agent, "incarnation": seen.incarnation, "pid": seen.pid,
                            "after_down_ms": if seen.incarnation > 1 { after_down_ms } else { None } }),
                    text,
                );
            }
            if let (Some(before), Some((down_version, down_step))) = (before, downs.get(agent))
                && seen.incarnation > 1
                && before.version <= *down_version
                && seen.version > *down_version
            {
                // The first checkpoint of the new run: its step follows the last one the
                // old run checkpointed, so the state was restored, not started over.
                let first = first_step_of_run(&server, agent, *down_version + 1).await?;
                let continued = first == Some(down_step + 1);
                timeline.note(
                    json!({ "kind": "resumed", "agent": agent, "incarnation": seen.incarnation,
                            "resumed_from_version": down_version, "last_step_before": down_step,
                            "first_step_after": first, "continued": continued }),
                    format!(
                        "{agent}: incarnation {} resumed from state version {down_version} (step {down_step}); its next step was {}: {}",
                        seen.incarnation,
                        first.map_or("?".into(), |step| step.to_string()),
                        if continued { "work continued where it stopped" } else { "NOT a continuation" }
                    ),
                );
                if seen.incarnation == 2 {
                    checks.resumed(agent, continued);
                }
            }
        }
        for (agent, seen) in &now {
            if last.get(agent).is_none_or(|before| before.step != seen.step) {
                progressed.insert(agent.clone(), Instant::now());
            }
        }
        last = now;
        let elapsed = started.elapsed().as_secs_f64();
        story.advance(&server, &mut timeline, args.small_at, elapsed).await?;
        if !args.json && progress_shown.elapsed() >= Duration::from_secs(3) {
            progress_shown = Instant::now();
            let line: Vec<String> = CREW
                .iter()
                .filter_map(|agent| {
                    last.get(*agent).map(|seen| format!("{agent} #{} v{}", seen.incarnation, seen.version))
                })
                .collect();
            eprintln!("  [{elapsed:5.1}s] {}", line.join(" · "));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let running = CREW.iter().filter(|agent| last.get(**agent).is_some_and(|seen| seen.status == "running")).count();
    let port = server.local_addr().port();
    timeline.note(json!({ "kind": "stopping" }), "stopping hale and the crew".to_string());
    server.shutdown().await.context("stopping hale")?;
    let left = left_running(port);
    timeline.note(
        json!({ "kind": "stopped", "agents_left_running": left }),
        format!("hale stopped; agent processes left running: {left}"),
    );
    let mut report = checks.report(running, left);
    if let (Some(report), Some(story)) = (report.as_object_mut(), story.report().as_object()) {
        report.extend(story.clone());
    }
    let passed = report.as_object().expect("an object").values().all(|ok| ok.as_bool() == Some(true));
    let summary = json!({
        "passed": passed,
        "checks": report,
        "timeline": timeline.entries,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!();
        for (check, ok) in report.as_object().expect("an object") {
            eprintln!("  {} {check}", if ok.as_bool() == Some(true) { "ok  " } else { "FAIL" });
        }
        eprintln!("\n{}", if passed { "demo passed: every failure was detected and healed" } else { "demo FAILED" });
    }
    Ok(if passed { 0 } else { 1 })
}

/// Milliseconds from a wall-clock time in ms (as the core logs them) to now.
fn ms_since(at_ms: u64) -> i64 {
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    now_ms - at_ms as i64
}

/// Milliseconds from `when` to a wall-clock time in ms (as the core logs them).
fn ms_between(when: Instant, at_ms: &u64) -> i64 {
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    let when_ms = now_ms - when.elapsed().as_millis() as i64;
    *at_ms as i64 - when_ms
}

/// The crew as hale runs it: every agent restarts always; the creative-writer stalls once
/// (in its first incarnation only) and has a tight stall detector, so the demo is short.
fn crew(args: &DemoArgs) -> Result<Supervise> {
    let exe = std::env::current_exe().context("finding the hale binary to run the demo agents")?;
    let agents = CREW
        .iter()
        .map(|agent| {
            let task_step_ms = if role_of(agent) == "code-generator" { 500 } else { 300 };
            let mut demo_args = vec![
                "demo-agent".to_string(),
                agent.to_string(),
                "--step-ms".into(),
                STEP_MS.to_string(),
                "--task-step-ms".into(),
                task_step_ms.to_string(),
            ];
            if *agent == "creative-writer" {
                let after_ms = (args.stall_at * 1000.0) as u64;
                demo_args.extend(
                    ["--misbehave", "stall", "--after-ms", &after_ms.to_string(), "--only-incarnation", "1"]
                        .map(String::from),
                );
            }
            let name = AgentName::new(*agent).expect("a valid name");
            DeclaredAgent {
                role: RoleName::new(role_of(agent)).expect("a valid role"),
                labels: BTreeMap::from([("crew".to_string(), "demo".to_string())]),
                supervision: Supervision {
                    restart: RestartPolicy::Always,
                    criticality: if agent.starts_with("orchestrator") {
                        Criticality::Critical
                    } else {
                        Criticality::Normal
                    },
                    backoff: Backoff::default(),
                    intensity: Intensity::default(),
                    group: None,
                    stall: StallPolicy { beats: Some(STALL_BEATS), quiet_ms: None },
                    budget: None,
                    thresholds: Default::default(),
                    placement: Default::default(),
                },
                process: ProcessSpec {
                    command: exe.to_string_lossy().into_owned(),
                    args: demo_args,
                    ..ProcessSpec::default()
                },
                probe: None,
                name,
            }
        })
        .collect();
    Ok(Supervise {
        agents,
        roles: Vec::new(),
        stop_grace: Duration::from_secs(2),
        log_bytes_max: 1024 * 1024,
        logs_kept: 1,
        workdir_base: None,
        cgroups: hale_server::process::CgroupSetting::default(),
    })
}

async fn observe(server: &hale_server::RunningServer) -> Result<BTreeMap<String, Seen>> {
    Ok(server
        .engine()
        .read(|state| {
            state
                .agents()
                .map(|record| {
                    let managed = record.managed.as_ref();
                    let seen = Seen {
                        incarnation: record.incarnation,
                        version: record.version(),
                        step: record.state().get("step").and_then(Value::as_u64).unwrap_or(0),
                        status: managed.map_or("-".into(), |managed| match managed.status {
                            ManagedStatus::Running => "running".to_string(),
                            ref other => other.name().to_string(),
                        }),
                        pid: managed.and_then(|managed| managed.process.map(|process| process.pid)),
                        last_down: record.down.as_ref().map(|down| {
                            (down.incarnation, down.cause.detector().to_string(), down.cause.to_string(), down.at.0)
                        }),
                    };
                    (record.name.to_string(), seen)
                })
                .collect()
        })
        .await?)
}

/// The step recorded at `version` (the first checkpoint of a resumed run).
async fn first_step_of_run(server: &hale_server::RunningServer, agent: &str, version: u64) -> Result<Option<u64>> {
    let agent = agent.to_string();
    Ok(server
        .engine()
        .read(move |state| {
            let record = state.agent(&agent)?;
            record.state_at(version)?.get("step").and_then(Value::as_u64)
        })
        .await?)
}

/// Processes still running that were told to talk to the demo's hale.
fn left_running(port: u16) -> usize {
    let marker = format!("HALE_URL=ws://127.0.0.1:{port}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
                .unwrap_or(true);
            !zombie && environ.split(|byte| *byte == 0).any(|var| var == marker.as_bytes())
        })
        .count()
}

pub(crate) struct Timeline {
    started: Instant,
    entries: Vec<Value>,
    json: bool,
}

impl Timeline {
    pub(crate) fn note(&mut self, mut entry: Value, text: String) {
        let t_ms = self.started.elapsed().as_millis() as u64;
        entry["t_ms"] = json!(t_ms);
        eprintln!("[{:5.1}s] {text}", t_ms as f64 / 1000.0);
        let _ = self.json;
        self.entries.push(entry);
    }
}

#[derive(Default)]
struct Checks {
    killed_detected_by_exit: bool,
    stall_detected: bool,
    killed_resumed: bool,
    stalled_resumed: bool,
    unexpected: Vec<String>,
}

impl Checks {
    fn detected(&mut self, agent: &str, detector: &str, incarnation: u64) {
        match (agent, detector) {
            ("code-generator", "process_exit") if incarnation == 1 => self.killed_detected_by_exit = true,
            ("creative-writer", "stall") if incarnation == 1 => self.stall_detected = true,
            _ => self.unexpected.push(format!("{agent} incarnation {incarnation} down by {detector}")),
        }
    }

    fn resumed(&mut self, agent: &str, continued: bool) {
        match agent {
            "code-generator" => self.killed_resumed = continued,
            "creative-writer" => self.stalled_resumed = continued,
            _ => {}
        }
    }

    fn report(&self, running: usize, left: usize) -> Value {
        json!({
            "code-generator killed: detected by process exit": self.killed_detected_by_exit,
            "code-generator restarted as incarnation 2 and continued from its state": self.killed_resumed,
            "creative-writer stalled: detected by the stall detector": self.stall_detected,
            "creative-writer restarted as incarnation 2 and continued from its state": self.stalled_resumed,
            "no other agent was declared down": self.unexpected.is_empty(),
            "all nine agents running before the stop": running == CREW.len(),
            "no agent process left running after the stop": left == 0,
        })
    }
}
