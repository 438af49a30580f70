//! The circuit breaker and quarantine over real sessions and the CLI.

use crate::support::{self, eventually, serve};
use hale_client::{Admin, AgentOptions, AgentSummary, Recipient};
use serde_json::json;
use std::time::Duration;

async fn summary(admin: &Admin, name: &str) -> AgentSummary {
    admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == name).unwrap()
}

#[tokio::test]
async fn an_error_spike_opens_the_breaker() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let agent = hale.connect(AgentOptions::new("flaky", "worker")).await;
    agent.resume().await.unwrap();
    for n in 0..4 {
        agent.report_error(Some(&format!("tool call {n} failed"))).await.unwrap();
    }
    // The breaker opens on the engine's tick: once a tick has run on the four errors, it
    // would be open if four were enough.
    support::next_tick(&hale, "tick-witness").await;
    assert_eq!(summary(&admin, "flaky").await.breaker, "closed", "four errors are below the default five");
    agent.report_error(Some("tool call 4 failed")).await.unwrap();
    eventually("the breaker open", 10, || async { (summary(&admin, "flaky").await.breaker == "open").then_some(()) })
        .await;
    let (code, out, _) = support::hale(&["agents", "--server", &hale.http_url()]);
    assert_eq!(code, 0);
    let line = out.lines().find(|line| line.starts_with("flaky")).unwrap();
    assert!(line.contains(" open "), "{out}");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn violations_reported_by_another_agent_quarantine_until_released() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let writer = hale.connect(AgentOptions::new("writer", "writer")).await;
    writer.resume().await.unwrap();
    let checker = hale.connect(AgentOptions::new("checker", "fact-checker")).await;
    checker.resume().await.unwrap();

    checker.report_violation(Some("writer"), false, "cited a paper that does not exist").await.unwrap();
    writer.report_violation(None, false, "my guardrail caught an unsafe answer").await.unwrap();
    assert!(summary(&admin, "writer").await.quarantine.is_none(), "two minor violations are below three");
    checker.report_violation(Some("writer"), false, "made up a quote").await.unwrap();
    let quarantine = summary(&admin, "writer").await.quarantine.expect("quarantined after the third");
    assert_eq!(quarantine.by, "agent checker");
    assert!(quarantine.reason.contains("3 violations"), "{}", quarantine.reason);
    let (_, out, _) = support::hale(&["agents", "--server", &hale.http_url()]);
    assert!(out.lines().any(|line| line.starts_with("writer") && line.contains("quarantined")), "{out}");

    let (code, out, err) = support::hale(&["release", "writer", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(summary(&admin, "writer").await.quarantine.is_none());
    // The operator quarantines directly, with a reason; the log keeps it across a restart.
    let (code, out, err) =
        support::hale(&["quarantine", "writer", "--reason", "leaked an API key", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(hale.terminate().success());
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let quarantine = summary(&admin, "writer").await.quarantine.expect("still quarantined after a restart");
    assert_eq!((quarantine.by.as_str(), quarantine.reason.as_str()), ("the operator", "leaked an API key"));
    // An unknown agent and an oversized reason get clear errors.
    let (code, _, err) = support::hale(&["quarantine", "nobody", "--reason", "x", "--server", &hale.http_url()]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_agent"), "{err}");
    let (status, body) = hale.post("/v1/agents/writer/quarantine", &serde_json::json!({"reason": "x".repeat(5000)}));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reason_too_long"), "{body}");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn a_quarantined_agent_may_checkpoint_but_not_submit_send_ask_or_reply() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let peer = hale.connect(AgentOptions::new("peer", "peer")).await;
    peer.resume().await.unwrap();
    let suspect = hale.connect(AgentOptions::new("suspect", "worker")).await;
    suspect.resume().await.unwrap();
    // A question it owes an answer to, from before the quarantine.
    peer.ask(Recipient::Agent("suspect".into()), None, json!({"q": "sources?"})).await.unwrap();
    let question = tokio::time::timeout(Duration::from_secs(10), suspect.next_message()).await.unwrap().unwrap();

    admin.quarantine("suspect", "wrote outside its sandbox").await.unwrap();
    // Its session stays open and it may save its state: nothing it did is lost.
    let version = suspect.checkpoint(json!({"draft": "kept"})).await.expect("a quarantined agent still checkpoints");
    assert!(version >= 1);
    suspect.heartbeat(None).await.expect("and heartbeats");
    // But it may not reach anyone else.
    let task = hale_client::HttpSubmitTask { role: "worker".into(), payload: json!({}), ..Default::default() };
    let refusals = [
        ("submit", suspect.submit(task.clone()).await.map(|_| ())),
        ("send", suspect.send(Recipient::Agent("peer".into()), None, json!({"hi": 1})).await.map(|_| ())),
        ("ask", suspect.ask(Recipient::Agent("peer".into()), None, json!({"q": 1})).await.map(|_| ())),
        ("reply", suspect.reply(&question, json!({"a": "none"})).await.map(|_| ())),
        ("report another", suspect.report_violation(Some("peer"), true, "revenge").await.map(|_| ())),
    ];
    for (what, result) in refusals {
        let error = result.expect_err(what);
        assert_eq!(error.code(), Some("quarantined"), "{what}: {error}");
        assert!(error.to_string().contains("hale release suspect"), "{what}: {error}");
    }
    // Over HTTP with its own token too.
    let pair = admin.issue_tokens("suspect").await.unwrap();
    let (status, _, body) = support::http_as(
        hale.addr,
        Some(&pair.access_token),
        "POST",
        "/v1/tasks",
        json!({"role": "worker", "payload": {}}).to_string().as_bytes(),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"quarantined\""), "{body}");
    assert!(summary(&admin, "peer").await.quarantine.is_none(), "its report about peer was refused");

    // Released, it may again.
    admin.release("suspect").await.unwrap();
    let suspect = hale.connect(AgentOptions::new("suspect", "worker")).await;
    suspect.resume().await.unwrap();
    suspect.submit(task).await.expect("submits after release");
    suspect.send(Recipient::Agent("peer".into()), None, json!({"hi": 2})).await.expect("sends after release");
    assert!(hale.terminate().success());
}

fn managed_config(dir: &std::path::Path, action: &str) -> std::path::PathBuf {
    let path = dir.join("hale.toml");
    let text = format!(
        "[supervision]\nstop_grace_ms = 500\n[supervision.detector]\nfirst_interval_ms = 200\nacceptable_pause_ms = 300\n\
         [supervision.quarantine]\naction = \"{action}\"\n\n[[agent]]\nname = \"worker\"\ncommand = \"{}\"\n\
         args = [\"demo-agent\", \"worker\", \"--step-ms\", \"100\"]\nrestart = \"always\"\n",
        support::HALE
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The state letter of `/proc/PID/stat` (`T` stopped, `S` sleeping, `R` running…).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

async fn running_pid(admin: &Admin, incarnation: u64) -> u32 {
    eventually("the worker running", 30, || async {
        let agent = summary(admin, "worker").await;
        let managed = agent.managed?;
        (agent.incarnation == incarnation && managed.status == "running" && agent.last_heartbeat_ms.is_some())
            .then_some(managed.pid?)
    })
    .await
}

#[tokio::test]
async fn quarantine_pause_stops_the_process_without_declaring_it_down_and_release_resumes_it() {
    let temp = tempfile::tempdir().unwrap();
    let config = managed_config(temp.path(), "pause");
    let hale = support::up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running_pid(&admin, 1).await;
    admin.quarantine("worker", "spent on a forbidden tool").await.unwrap();
    eventually("the process stopped", 10, || async { (process_state(pid) == Some('T')).then_some(()) }).await;
    let quarantine = summary(&admin, "worker").await.quarantine.unwrap();
    assert_eq!(quarantine.action, "pause");
    // Silent far past the detector's limit (200 ms beats, 300 ms pause): paused by hale,
    // not down. A second tick witness proves the detectors ran over that time.
    let since = std::time::Instant::now();
    while since.elapsed() < Duration::from_secs(3) {
        support::next_tick(&hale, "tick-witness").await;
        let agent = summary(&admin, "worker").await;
        assert!(agent.down.is_none() && agent.incarnation == 1, "a paused agent was declared down: {:?}", agent.down);
    }
    admin.release("worker").await.unwrap();
    eventually("the process running again", 10, || async { (process_state(pid) != Some('T')).then_some(()) }).await;
    // It beats again as the same run.
    let before = summary(&admin, "worker").await.last_heartbeat_ms;
    eventually("a heartbeat after release", 30, || async {
        let agent = summary(&admin, "worker").await;
        (agent.incarnation == 1 && agent.last_heartbeat_ms > before).then_some(())
    })
    .await;
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn quarantine_stop_stops_the_agent_and_release_starts_it_again() {
    let temp = tempfile::tempdir().unwrap();
    let config = managed_config(temp.path(), "stop");
    let hale = support::up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running_pid(&admin, 1).await;
    admin.quarantine("worker", "tried to exfiltrate").await.unwrap();
    eventually("the process gone", 15, || async { process_state(pid).is_none_or(|state| state == 'Z').then_some(()) })
        .await;
    let agent = summary(&admin, "worker").await;
    assert_eq!(agent.managed.unwrap().status, "stopped", "restart = always does not bring it back");
    assert_eq!(agent.quarantine.unwrap().action, "stop");
    admin.release("worker").await.unwrap();
    let pid = running_pid(&admin, 2).await;
    assert_ne!(process_state(pid), Some('T'));
    assert!(hale.terminate().success());
}
