//! Tasks over HTTP against the real binary (issue 4, first part): two agents of a role;
//! the holder commits two steps and goes silent; the heartbeat detector declares it down,
//! the task moves at once to the other agent with its steps, the silent one's late
//! completion is refused, and the other completes it.

use crate::support::{self, eventually, serve};
use hale_client::Admin;
use serde_json::{Value, json};

fn post(hale: &support::Hale, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = hale.post(path, &body);
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn a_task_moves_with_its_steps_when_its_holder_goes_silent() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = Admin::new(&hale.http_url());
    for agent in ["coder-a", "coder-b"] {
        let (status, body) = post(&hale, &format!("/v1/agents/{agent}/hello"), json!({"role": "coder"}));
        assert_eq!(status, 200, "{body}");
    }
    let beat = |agent: &str| post(&hale, &format!("/v1/agents/{agent}/heartbeat"), json!({"incarnation": 1}));
    beat("coder-a");
    beat("coder-b");

    let submit = json!({"role": "coder", "payload": {"write": "a parser"}, "idempotency_key": "parser-1"});
    let (status, submitted) = post(&hale, "/v1/tasks", submit.clone());
    assert_eq!(status, 200, "{submitted}");
    assert_eq!(submitted["new"], true);
    let task = submitted["task"].as_u64().unwrap();
    let (_, again) = post(&hale, "/v1/tasks", submit);
    assert_eq!((again["task"].as_u64(), again["new"].as_bool()), (Some(task), Some(false)));

    let first = eventually("the task leased", 10, || async {
        let found = admin.task(task).await.unwrap();
        found.agent.filter(|_| found.status == "running")
    })
    .await;
    let other = if first == "coder-a" { "coder-b" } else { "coder-a" };
    for step in ["plan", "draft"] {
        let body = json!({"agent": first, "incarnation": 1, "name": step, "result": format!("{step} done")});
        let (status, answer) = post(&hale, &format!("/v1/tasks/{task}/steps"), body);
        assert_eq!(status, 200, "{answer}");
    }
    // The holder goes silent; the other keeps beating until the task is its own.
    let second = eventually("the task moved to the other agent", 20, || async {
        beat(other);
        let found = admin.task(task).await.unwrap();
        found.agent.filter(|agent| agent == other && found.status == "running")
    })
    .await;
    let moved = admin.task(task).await.unwrap();
    assert_eq!(moved.attempts, 2);
    let steps: Vec<&str> = moved.steps.iter().map(|step| step.name.as_str()).collect();
    assert_eq!(steps, ["plan", "draft"], "the committed steps moved with the task");

    let late = json!({"agent": first, "incarnation": 1, "result": "zombie"});
    let (status, answer) = post(&hale, &format!("/v1/tasks/{task}/complete"), late);
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "lease_lost");

    let done = json!({"agent": second, "incarnation": 1, "result": "a parser"});
    let (status, answer) = post(&hale, &format!("/v1/tasks/{task}/complete"), done);
    assert_eq!(status, 200, "{answer}");
    let (code, out, err) = support::hale(&["task", &task.to_string(), "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("): completed") && out.contains("result    \"a parser\""), "{out}");
    assert!(out.contains("step plan") && out.contains("level     optimal"), "{out}");

    // The log keeps it all across a restart.
    assert!(hale.terminate().success());
    let hale = serve(temp.path(), &[]);
    let found = Admin::new(&hale.http_url()).task(task).await.unwrap();
    assert_eq!((found.status.as_str(), found.steps.len()), ("completed", 2));
    let (code, _, err) = support::hale(&["cancel", &task.to_string(), "--server", &hale.http_url()]);
    assert_eq!(code, 1);
    assert!(err.contains("task_ended"), "{err}");
    assert!(hale.terminate().success());
}

/// The same story over sessions: the task is pushed to the holder's session; when the
/// holder stops beating (its socket still open) it is declared down and fenced, and the
/// task with its steps is pushed to the other agent, which completes it.
#[tokio::test]
async fn tasks_are_pushed_over_sessions_and_move_when_the_holder_is_fenced() {
    use hale_client::{Agent, AgentOptions};
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = Admin::new(&hale.http_url());
    let a = Agent::connect(&hale.ws_url(), AgentOptions::new("writer-a", "writer")).await.unwrap();
    let b = Agent::connect(&hale.ws_url(), AgentOptions::new("writer-b", "writer")).await.unwrap();
    a.resume().await.unwrap();
    b.resume().await.unwrap();
    // Only a heartbeats for now, so only a is eligible.
    a.heartbeat(None).await.unwrap();
    let submit = hale_client::HttpSubmitTask {
        role: "writer".into(),
        priority: Some("critical".into()),
        payload: json!({"topic": "tides"}),
        deadline_ms: None,
        max_attempts: Some(3),
        ..Default::default()
    };
    let task = admin.submit(&submit).await.unwrap().task;
    let offered = tokio::time::timeout(std::time::Duration::from_secs(10), a.next_task()).await.unwrap().unwrap();
    assert_eq!((offered.task, offered.payload.clone(), offered.attempts), (task, json!({"topic": "tides"}), 1));
    a.commit_step(task, "outline", json!(["intro", "moon"])).await.unwrap();
    a.commit_step(task, "draft", json!("The moon pulls...")).await.unwrap();

    // Now b beats and a goes silent with its socket open.
    let beating = b.clone();
    let keep_beating = tokio::spawn(async move {
        while beating.heartbeat(None).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    let ended = tokio::time::timeout(std::time::Duration::from_secs(15), a.ended()).await.unwrap();
    assert!(ended.contains("fenced") && ended.contains("declared down"), "{ended}");
    let moved = tokio::time::timeout(std::time::Duration::from_secs(10), b.next_task()).await.unwrap().unwrap();
    assert_eq!((moved.task, moved.attempts), (task, 2));
    let steps: Vec<&str> = moved.steps.iter().map(|step| step.name.as_str()).collect();
    assert_eq!(steps, ["outline", "draft"], "b resumes after the last committed step");
    assert!(a.complete(task, json!("zombie")).await.is_err(), "the fenced session can write nothing");
    b.complete(task, json!("The moon pulls the sea.")).await.unwrap();
    let done = admin.task(task).await.unwrap();
    assert_eq!((done.status.as_str(), done.result), ("completed", Some(json!("The moon pulls the sea."))));
    keep_beating.abort();
    assert!(hale.terminate().success());
}
