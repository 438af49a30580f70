//! `hale up` with real agent processes (`hale demo-agent`, misbehaving on purpose): restarts
//! after SIGKILL with state restored, restart intensity, group strategies, adoption after
//! hale itself is SIGKILLed, the stop grace, and the heartbeat and stall detectors.

use crate::support::{self, HALE, eventually, up};
use hale_client::{Admin, AgentSummary};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::Path;

/// A hale.toml whose agents are demo agents; `agents` is `(name, extra demo-agent args,
/// extra toml lines)`.
fn config(dir: &Path, supervision: &str, agents: &[(&str, &[&str], &str)]) -> std::path::PathBuf {
    let mut text = format!("[supervision]\n{supervision}\n");
    for (name, args, extra) in agents {
        let mut all = vec!["demo-agent".to_string(), name.to_string(), "--step-ms".into(), "100".into()];
        all.extend(args.iter().map(|arg| arg.to_string()));
        text.push_str(&format!(
            "\n[[agent]]\nname = \"{name}\"\ncommand = \"{HALE}\"\nargs = {}\n{extra}\n",
            serde_json::to_string(&all).unwrap()
        ));
    }
    let path = dir.join("hale.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn agent(admin: &Admin, name: &str) -> AgentSummary {
    try_agent(admin, name).await.expect("agent listed")
}

async fn try_agent(admin: &Admin, name: &str) -> Option<AgentSummary> {
    admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == name)
}

/// Waits until `name` runs `incarnation` (or later), attached, and has checkpointed
/// beyond `version`. Returns its summary.
async fn running(admin: &Admin, name: &str, incarnation: u64, version: u64) -> AgentSummary {
    eventually(&format!("{name} running as incarnation {incarnation} past version {version}"), 30, || async {
        let agent = try_agent(admin, name).await?;
        let running = agent.managed.as_ref().is_some_and(|managed| managed.status == "running");
        (running && agent.attached && agent.incarnation >= incarnation && agent.version > version).then_some(agent)
    })
    .await
}

/// How many checkpoints `name`'s incarnation `incarnation` has logged.
fn checkpoints(hale: &support::Hale, name: &str, incarnation: u64) -> usize {
    let (status, body) = hale.get(&format!("/v1/events?agent={name}&kind=checkpointed&limit=10000"));
    assert_eq!(status, 200, "{body}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    events.iter().filter(|event| event["event"]["incarnation"] == incarnation).count()
}

/// Asserts that `name`'s incarnation 2, which does not misbehave, stays up. Proof by the
/// run's own progress, not by a timer: incarnation 1 was declared down after some number
/// of its checkpoints; incarnation 2 goes on for twice as many (and ten more) and is still
/// the current run, where a run misbehaving as incarnation 1 did would have been caught.
/// A slow machine only makes this wait longer.
async fn stays_up(hale: &support::Hale, admin: &Admin, name: &str) {
    let caught_after = checkpoints(hale, name, 1);
    let enough = 2 * caught_after + 10;
    let current = support::wait_until(
        &format!("{name}'s incarnation 2 past {enough} checkpoints (incarnation 1 was caught after {caught_after})"),
        60,
        || async {
            let current = agent(admin, name).await.incarnation;
            let made = checkpoints(hale, name, 2);
            if current != 2 || made >= enough {
                Ok(current)
            } else {
                Err(format!("incarnation {current}, {made} checkpoints"))
            }
        },
    )
    .await;
    assert_eq!(current, 2, "{name} went down again");
}

/// The agent that [`support::next_tick`] uses, in tests that must see a tick happen.
const WITNESS: &str = "tick-witness";

fn pid_of(agent: &AgentSummary) -> Pid {
    Pid::from_raw(agent.managed.as_ref().and_then(|managed| managed.pid).expect("a pid") as i32)
}

fn alive(pid: Pid) -> bool {
    // A zombie is not alive: check the state in /proc, not just that the pid exists.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Processes on this machine that the hale at `addr` started for `agent` (from their
/// environment, so other tests' agents do not count).
fn processes_of(addr: std::net::SocketAddr, agent: &str) -> Vec<u32> {
    let wanted = format!("HALE_AGENT={agent}");
    let url = format!("HALE_URL=ws://{addr}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let mut vars = environ.split(|byte| *byte == 0);
        let ours = vars.clone().any(|var| var == url.as_bytes());
        if ours && vars.any(|var| var == wanted.as_bytes()) && alive(Pid::from_raw(pid as i32)) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn a_sigkilled_agent_is_restarted_as_a_new_incarnation_with_its_state() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(temp.path(), "", &[("worker", &[], "restart = \"always\"")]);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let before = running(&admin, "worker", 1, 5).await;
    kill(pid_of(&before), Signal::SIGKILL).unwrap();

    let after = running(&admin, "worker", 2, 0).await;
    assert_eq!(after.incarnation, 2);
    assert_ne!(pid_of(&after), pid_of(&before));
    let down = after.last_down.as_ref().expect("the kill is logged");
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "process_exit"));
    assert!(down.cause.contains("signal 9"), "{}", down.cause);
    // The new run resumed the state: its first checkpoint continued from the old step.
    // (Attached is not yet checkpointed: wait for the new run's first checkpoint.)
    let state = eventually("the new run's first checkpoint", 30, || async {
        let state = admin.state("worker", None).await.ok()?;
        (state.version > before.version).then_some(state)
    })
    .await;
    assert!(state.state["step"].as_u64().unwrap() >= before.version, "{}", state.state);
    // A late write of the killed incarnation is refused.
    let (status, body) =
        hale.post("/v1/agents/worker/checkpoint", &json!({"incarnation": 1, "patch": {"zombie": true}}));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("stale_incarnation"), "{body}");
    let addr = hale.addr;
    assert!(hale.terminate().success());
    assert!(processes_of(addr, "worker").is_empty(), "hale stopped its agents");
}

#[tokio::test]
async fn an_agent_that_crashes_at_start_fails_after_the_intensity_until_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let supervision = "[supervision.intensity]\nrestarts_max = 3\nwindow_ms = 60000\n[supervision.backoff]\nbase_ms = 10\nmax_ms = 50";
    let config = config(temp.path(), supervision, &[("crasher", &["--misbehave", "exit-now"], "")]);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let failed = eventually("crasher failed", 30, || async {
        let agent = agent(&admin, "crasher").await;
        (agent.managed.as_ref().unwrap().status == "failed").then_some(agent)
    })
    .await;
    // The first start and three restarts, then no more.
    assert_eq!(failed.incarnation, 4);
    assert!(hale.stderr_shows("agent FAILED"), "{}", hale.stderr());
    // Only the engine's tick restarts an agent after its backoff: once a tick has run on
    // the failed state, a restart that was going to happen has happened.
    support::next_tick(&hale, WITNESS).await;
    let still = agent(&admin, "crasher").await;
    assert_eq!((still.incarnation, still.managed.unwrap().status.as_str()), (4, "failed"));

    // `hale restart` revives it: a new incarnation, and a fresh window of three restarts.
    let (code, out, err) = support::hale(&["restart", "crasher", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("incarnation 5"), "{out}");
    let failed = eventually("crasher failed again", 30, || async {
        let agent = agent(&admin, "crasher").await;
        (agent.managed.as_ref().unwrap().status == "failed").then_some(agent)
    })
    .await;
    assert_eq!(failed.incarnation, 8);
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn group_strategies_restart_siblings_as_otp_does() {
    let temp = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    let names: Vec<String> =
        ["one", "all", "rest"].iter().flat_map(|group| ["a", "b", "c"].map(|n| format!("{group}-{n}"))).collect();
    let lines: Vec<String> =
        names.iter().map(|name| format!("group = \"{}\"", name.split('-').next().unwrap())).collect();
    for (name, line) in names.iter().zip(&lines) {
        agents.push((name.as_str(), &[][..], line.as_str()));
    }
    let supervision = "";
    let config_path = config(temp.path(), supervision, &agents);
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str("\n[[group]]\nname = \"one\"\nstrategy = \"one-for-one\"\n");
    text.push_str("[[group]]\nname = \"all\"\nstrategy = \"one-for-all\"\n");
    text.push_str("[[group]]\nname = \"rest\"\nstrategy = \"rest-for-one\"\n");
    std::fs::write(&config_path, text).unwrap();
    let hale = up(&config_path, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    for name in &names {
        running(&admin, name, 1, 0).await;
    }
    for group in ["one", "all", "rest"] {
        let b = agent(&admin, &format!("{group}-b")).await;
        kill(pid_of(&b), Signal::SIGKILL).unwrap();
    }
    let restarted = ["one-b", "all-a", "all-b", "all-c", "rest-b", "rest-c"];
    for name in restarted {
        running(&admin, name, 2, 0).await;
    }
    // A failure takes its siblings down in the same decision as its own down, and a keeper
    // reports the exit of the process it replaces before it starts the new one: by now every
    // restart the three kills call for is decided. Proof by order that no other came: each
    // agent goes on checkpointing in its run after all that, so none was taken down since.
    let versions: Vec<(String, u64)> =
        admin.agents().await.unwrap().into_iter().map(|agent| (agent.agent, agent.version)).collect();
    for (name, version) in &versions {
        let incarnation = if restarted.contains(&name.as_str()) { 2 } else { 1 };
        running(&admin, name, incarnation, *version).await;
    }
    for (name, incarnation) in [("one-a", 1), ("one-c", 1), ("rest-a", 1), ("all-a", 2), ("rest-c", 2)] {
        assert_eq!(agent(&admin, name).await.incarnation, incarnation, "{name}");
    }
    let sibling = agent(&admin, "all-c").await.last_down.unwrap();
    assert_eq!(sibling.detector, "group");
    assert!(sibling.cause.contains("all-b failed"), "{}", sibling.cause);
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn agents_outlive_a_sigkilled_hale_and_are_adopted_without_restarts() {
    let temp = tempfile::tempdir().unwrap();
    let names = ["keep-a", "keep-b", "keep-c"];
    let agents: Vec<(&str, &[&str], &str)> = names.iter().map(|name| (*name, &[][..], "")).collect();
    let config = config(temp.path(), "reconnect_grace_ms = 10000", &agents);
    let data = temp.path().join("data");
    let listen = support::free_address();
    let hale = up(&config, &data, &listen);
    let admin = hale.admin();
    let mut before = Vec::new();
    for name in names {
        before.push(running(&admin, name, 1, 2).await);
    }
    hale.kill();
    // A stray of an older run (as a crash during a stop could leave) is killed at start.
    let canonical = std::fs::canonicalize(&data).unwrap();
    let mut stray = std::process::Command::new("sleep")
        .arg("100")
        .env("HALE_SUPERVISOR", &canonical)
        .env("HALE_AGENT", "keep-b")
        .env("HALE_INCARNATION", "0")
        .process_group(0)
        .spawn()
        .unwrap();

    let hale = up(&config, &data, &listen);
    assert_eq!(hale.http_url(), admin_url(&listen));
    // A client of its own: the old one's pooled connection went down with the old hale,
    // and nothing ran the client while `up` blocked to notice.
    let admin = hale.admin();
    // They outlived hale: alive all the while the new hale recovered and started (no timer
    // needed: a process dying with hale dies at once), and the same processes are adopted
    // below, which no process that died in between could be.
    for agent in &before {
        assert!(alive(pid_of(agent)), "{} died with hale", agent.agent);
    }
    for agent in &before {
        // Same process, same incarnation, attached again and checkpointing.
        let after = running(&admin, &agent.agent, 1, agent.version).await;
        assert_eq!(after.incarnation, 1, "{} was restarted", agent.agent);
        assert_eq!(pid_of(&after), pid_of(agent), "{} is another process", agent.agent);
        assert_eq!(after.managed.as_ref().unwrap().restarts, 0);
        assert_eq!(processes_of(hale.addr, &agent.agent).len(), 1, "{} runs more than once", agent.agent);
    }
    assert!(hale.stderr_shows("adopting a running agent"), "{}", hale.stderr());
    assert!(hale.stderr_shows("killing a stray process of this agent"), "{}", hale.stderr());
    let status = tokio::task::spawn_blocking(move || stray.wait().unwrap()).await.unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "the stray was SIGKILLed");
    // Adopted processes are watched too: killing one is noticed and it is restarted.
    kill(pid_of(&before[0]), Signal::SIGKILL).unwrap();
    running(&admin, "keep-a", 2, 0).await;
    let addr = hale.addr;
    assert!(hale.terminate().success());
    for name in names {
        assert!(processes_of(addr, name).is_empty(), "{name} left running");
    }
}

fn admin_url(listen: &str) -> String {
    format!("http://{listen}")
}

#[tokio::test]
async fn an_agent_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(temp.path(), "stop_grace_ms = 300", &[("stubborn", &["--misbehave", "ignore-sigterm"], "")]);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let agent = running(&admin, "stubborn", 1, 0).await;
    let (code, out, err) = support::hale(&["stop", "stubborn", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}{err}");
    eventually("the stubborn agent gone", 10, || async { (!alive(pid_of(&agent))).then_some(()) }).await;
    assert!(hale.stderr_shows("still running after the grace period: SIGKILL"), "{}", hale.stderr());
    let stopped = self::agent(&admin, "stubborn").await;
    assert_eq!(stopped.managed.unwrap().status, "stopped");
    let logs = std::fs::read_to_string(temp.path().join("data/logs/stubborn.log")).unwrap();
    assert!(logs.contains("SIGTERM ignored"), "{logs}");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn an_agent_stopped_with_hale_stop_saves_its_last_checkpoint_and_closes() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(temp.path(), "stop_grace_ms = 5000", &[("tidy", &[], "")]);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let agent = running(&admin, "tidy", 1, 0).await;
    admin.stop("tidy").await.unwrap();
    eventually("tidy gone", 10, || async { (!alive(pid_of(&agent))).then_some(()) }).await;
    // Its SIGTERM handler checkpointed the step it stopped at and closed: not fenced first,
    // not killed after the grace.
    let state = admin.state("tidy", None).await.unwrap();
    assert!(state.state["stopped_at_step"].is_u64(), "{}", state.state);
    assert_eq!(state.state["stopped_at_step"], state.state["step"]);
    let logs = std::fs::read_to_string(temp.path().join("data/logs/tidy.log")).unwrap();
    assert!(!logs.contains("the last checkpoint failed"), "{logs}");
    // hale logs the SIGKILL after the grace before it logs the end of the process: once the
    // end is in its stderr, so would the SIGKILL be.
    assert!(hale.stderr_shows("agent process ended"), "{}", hale.stderr());
    assert!(!hale.stderr().contains("still running after the grace period"), "{}", hale.stderr());
    assert_eq!(self::agent(&admin, "tidy").await.managed.unwrap().status, "stopped");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn a_hung_agent_is_declared_down_by_the_heartbeat_detector_and_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(
        temp.path(),
        "stop_grace_ms = 300",
        &[("hangs", &["--misbehave", "hang", "--after-ms", "1500"], "criticality = \"critical\"")],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let restarted = running(&admin, "hangs", 2, 0).await;
    let down = restarted.last_down.unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "heartbeat"), "{}", down.cause);
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn a_stalled_agent_is_detected_and_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(
        temp.path(),
        "stop_grace_ms = 300",
        &[("stalls", &["--misbehave", "stall", "--after-ms", "1000"], "stall = { beats = 8 }")],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    // Stalled means holding work and doing none of it: it gets a long task.
    let task =
        hale_client::HttpSubmitTask { role: "stalls".into(), payload: json!({ "steps": 1000 }), ..Default::default() };
    admin.submit(&task).await.unwrap();
    let restarted = running(&admin, "stalls", 2, 0).await;
    let down = restarted.last_down.unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "stall"), "{}", down.cause);
    assert!(down.cause.contains("no sign of work for 8 heartbeats while holding a task"), "{}", down.cause);
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn an_agent_past_its_address_space_limit_dies_and_is_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(
        temp.path(),
        "",
        &[(
            "hungry",
            &["--misbehave", "grow-memory", "--after-ms", "500", "--only-incarnation", "1"],
            "[agent.resources]\naddress_space_mb = 1024",
        )],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let restarted = running(&admin, "hungry", 2, 0).await;
    let down = restarted.last_down.clone().unwrap();
    assert_eq!(down.detector, "process_exit", "{}", down.cause);
    // The allocation past the limit failed inside the agent, which then died.
    let logs = std::fs::read_to_string(temp.path().join("data/logs/hungry.log")).unwrap();
    assert!(logs.contains("memory allocation of 67108864 bytes failed"), "{logs}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pid_of(&restarted))).unwrap();
    let line = limits.lines().find(|line| line.starts_with("Max address space")).unwrap();
    assert!(line.contains(&(1024u64 * 1024 * 1024).to_string()), "{line}");
    assert!(hale.terminate().success());
}

/// The fallback of cgroups, so it runs on every machine: with `cgroups = "off"` (as where
/// the host offers hale none) memory is polled from /proc and judged by the core.
#[tokio::test]
async fn an_agent_over_its_resident_memory_limit_is_detected_and_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(
        temp.path(),
        "stop_grace_ms = 300\ncgroups = \"off\"",
        &[(
            "bloats",
            &["--misbehave", "grow-memory", "--after-ms", "300", "--only-incarnation", "1"],
            "[agent.resources]\nmemory_mb = 96",
        )],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    assert!(hale.stderr_shows("cgroups: none (off in hale.toml"), "{}", hale.stderr());
    let admin = hale.admin();
    let restarted = running(&admin, "bloats", 2, 0).await;
    let down = restarted.last_down.clone().unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "resource"), "{}", down.cause);
    assert!(down.cause.contains("over its limit of 96 MiB"), "{}", down.cause);
    // The new incarnation does not bloat, and stays up.
    stays_up(&hale, &admin, "bloats").await;
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn a_pool_recruits_a_replacement_when_an_instance_fails() {
    let temp = tempfile::tempdir().unwrap();
    // worker-1 crashes at every start; the others work.
    let script =
        format!("if [ \"$HALE_AGENT\" = worker-1 ]; then exit 1; fi; exec {HALE} demo-agent worker --step-ms 100");
    let text = format!(
        "[supervision.intensity]\nrestarts_max = 2\nwindow_ms = 60000\n[supervision.backoff]\nbase_ms = 10\nmax_ms = 20\n\n\
         [[role]]\nname = \"worker\"\nmin = 2\nmax = 3\n[role.template]\ncommand = \"sh\"\nargs = [\"-c\", {}]\n",
        serde_json::to_string(&script).unwrap()
    );
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, text).unwrap();
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    running(&admin, "worker-2", 1, 0).await;
    let failed = eventually("worker-1 failed", 30, || async {
        let agent = agent(&admin, "worker-1").await;
        (agent.managed.as_ref().unwrap().status == "failed").then_some(agent)
    })
    .await;
    assert_eq!(failed.role, "worker");
    // Below the minimum of two healthy: worker-3 is recruited from the template.
    let recruited = running(&admin, "worker-3", 1, 0).await;
    assert_eq!(recruited.labels.get("pool").map(String::as_str), Some("worker"));
    // At the maximum of three: no fourth, whatever happens next. Pools recruit on the
    // engine's tick: once a tick has run at the maximum, no recruit is coming.
    support::next_tick(&hale, WITNESS).await;
    let names: Vec<String> =
        admin.agents().await.unwrap().into_iter().map(|agent| agent.agent).filter(|name| name != WITNESS).collect();
    assert_eq!(names, ["worker-1", "worker-2", "worker-3"]);
    let addr = hale.addr;
    assert!(hale.terminate().success());
    for name in &names {
        assert!(processes_of(addr, name).is_empty(), "{name} left running");
    }
}

#[tokio::test]
async fn a_pool_starts_its_instances_once_and_stopping_hale_recruits_no_replacements() {
    let temp = tempfile::tempdir().unwrap();
    // They take the whole stop grace to go: hale's detectors tick meanwhile.
    let script = format!("exec {HALE} demo-agent worker --step-ms 100 --misbehave ignore-sigterm");
    let text = format!(
        "[supervision]\nstop_grace_ms = 600\n\n[[role]]\nname = \"worker\"\nmin = 3\nmax = 6\n[role.template]\ncommand = \"sh\"\nargs = [\"-c\", {}]\n",
        serde_json::to_string(&script).unwrap()
    );
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, text).unwrap();
    let data = temp.path().join("data");
    let hale = up(&config, &data, "127.0.0.1:0");
    let admin = hale.admin();
    for name in ["worker-1", "worker-2", "worker-3"] {
        running(&admin, name, 1, 0).await;
    }
    // Recruited once at start: none mistaken for a vanished process and restarted.
    let downs = |hale: &support::Hale| {
        let (status, body) = hale.get("/v1/events?kind=agent_down");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    };
    // Restarts and recruits are decided on the engine's tick: once a tick has run with all
    // three running, anything it was going to start is in the log.
    support::next_tick(&hale, WITNESS).await;
    assert_eq!(downs(&hale), Vec::<serde_json::Value>::new());
    for agent in admin.agents().await.unwrap().into_iter().filter(|agent| agent.agent != WITNESS) {
        assert_eq!(agent.incarnation, 1, "{} restarted", agent.agent);
    }
    let addr = hale.addr;
    assert!(hale.terminate().success());
    // Each instance stopped on purpose is no reason to recruit another while hale stops.
    for n in 1..=6 {
        let name = format!("worker-{n}");
        assert!(processes_of(addr, &name).is_empty(), "{name} left running");
    }
    let hale = support::serve(&data, &[]);
    let names: Vec<String> = hale
        .admin()
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|agent| agent.agent)
        .filter(|name| name != WITNESS)
        .collect();
    assert_eq!(names, ["worker-1", "worker-2", "worker-3"], "no instance recruited during the stop");
}

#[tokio::test]
async fn an_agent_failing_its_health_probe_is_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let health = support::free_address();
    let config = config(
        temp.path(),
        "stop_grace_ms = 300",
        &[(
            "sickly",
            &["--misbehave", "unhealthy", "--after-ms", "800", "--only-incarnation", "1", "--health-listen", &health],
            &format!(
                "[agent.health]\nurl = \"http://{health}/healthz\"\ninterval_ms = 200\ntimeout_ms = 500\nfailures_max = 3"
            ),
        )],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let restarted = running(&admin, "sickly", 2, 0).await;
    let down = restarted.last_down.clone().unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "health_probe"), "{}", down.cause);
    assert!(down.cause.contains("failed 3 times in a row") && down.cause.contains("HTTP 503"), "{}", down.cause);
    // The new incarnation is healthy and stays up.
    stays_up(&hale, &admin, "sickly").await;
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn an_agent_spinning_a_core_past_its_cpu_limit_is_restarted() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(
        temp.path(),
        "stop_grace_ms = 300",
        &[(
            "spinner",
            &["--misbehave", "spin", "--after-ms", "200", "--only-incarnation", "1"],
            "[agent.resources]\ncpu_percent = 50\ncpu_window_ms = 2000",
        )],
    );
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let restarted = running(&admin, "spinner", 2, 0).await;
    let down = restarted.last_down.clone().unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "resource"), "{}", down.cause);
    assert!(down.cause.starts_with("cpu ") && down.cause.contains("over its limit of 50%"), "{}", down.cause);
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn hale_logs_prints_and_follows_an_agents_output() {
    let temp = tempfile::tempdir().unwrap();
    let config = config(temp.path(), "", &[("chatty", &[], "")]);
    let data = temp.path().join("data");
    let hale = up(&config, &data, "127.0.0.1:0");
    let admin = hale.admin();
    running(&admin, "chatty", 1, 0).await;
    let data_arg = data.to_str().unwrap();
    let (code, out, err) = support::hale(&["logs", "chatty", "--data", data_arg, "-n", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("demo-agent chatty (chatty): incarnation 1"), "{out}");
    // -f keeps printing: a restart's first line shows up in the followed output.
    let mut follow = std::process::Command::new(HALE)
        .args(["logs", "chatty", "--data", data_arg, "-f"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = printed.clone();
    let reader = std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while !seen.lock().unwrap().contains("incarnation 2") {
            match std::io::Read::read(&mut stdout, &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n])),
            }
        }
    });
    // It prints the tail first, then follows: once the tail is out, whatever the restart
    // writes can only come by following.
    eventually("hale logs -f to print the tail", 30, || async {
        printed.lock().unwrap().contains("incarnation 1").then_some(())
    })
    .await;
    kill(pid_of(&agent(&admin, "chatty").await), Signal::SIGKILL).unwrap();
    running(&admin, "chatty", 2, 0).await;
    eventually("the followed log to show incarnation 2", 30, || async { reader.is_finished().then_some(()) }).await;
    reader.join().unwrap();
    let seen = printed.lock().unwrap().clone();
    assert!(seen.contains("demo-agent chatty (chatty): incarnation 2"), "{seen}");
    let _ = follow.kill();
    let _ = follow.wait();
    // An agent with no log gets a clear error.
    let (code, _, err) = support::hale(&["logs", "nobody", "--data", data_arg]);
    assert_eq!(code, 1);
    assert!(err.contains("no log for agent \"nobody\""), "{err}");
    assert!(hale.terminate().success());
}
