//! The circuit breaker and quarantine over real sessions and the CLI.

use crate::support::{self, eventually, serve};
use hale_client::{Admin, AgentOptions, AgentSummary};

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
