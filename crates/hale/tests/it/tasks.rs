//! Tasks over HTTP against the real binary (issue 4, first part): two agents of a role;
//! the holder commits two steps and goes silent; the heartbeat detector declares it down,
//! the task moves at once to the other agent with its steps, the silent one's late
//! completion is refused, and the other completes it.

use crate::support::{self, eventually, serve};

use serde_json::{Value, json};

fn post(hale: &support::Hale, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = hale.post(path, &body);
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn a_task_moves_with_its_steps_when_its_holder_goes_silent() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
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
    assert!(!out.contains("Some(") && !out.contains("None"), "no Rust debug text: {out}");

    // The log keeps it all across a restart.
    assert!(hale.terminate().success());
    let hale = serve(temp.path(), &[]);
    let found = hale.admin().task(task).await.unwrap();
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
    use hale_client::AgentOptions;
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let a = hale.connect(AgentOptions::new("writer-a", "writer")).await;
    let b = hale.connect(AgentOptions::new("writer-b", "writer")).await;
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

/// The end-to-end story with real processes: two managed demo agents; the holder
/// of a four-step task is SIGKILLed after committing two steps; the task finishes on the
/// other agent from the last commit point (steps 1 and 2 are not run again), with the
/// right result; the killed run's late completion is refused.
#[tokio::test]
async fn a_task_whose_holder_is_sigkilled_finishes_elsewhere_from_its_last_commit() {
    let temp = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for name in ["coder-1", "coder-2"] {
        let args = ["demo-agent", "coder", "--step-ms", "100", "--task-step-ms", "400"];
        text.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\nrole = \"coder\"\ncommand = \"{}\"\nargs = {}\nrestart = \"always\"\n\n",
            support::HALE,
            serde_json::to_string(&args).unwrap()
        ));
    }
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, text).unwrap();
    let hale = support::up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    eventually("both agents attached", 30, || async {
        let agents = admin.agents().await.ok()?;
        (agents.iter().filter(|agent| agent.attached).count() == 2).then_some(())
    })
    .await;

    let submit = hale_client::HttpSubmitTask {
        role: "coder".into(),
        payload: json!({"steps": 4, "answer": "fn parse() {}"}),
        ..Default::default()
    };
    let task = admin.submit(&submit).await.unwrap().task;
    let holding = eventually("two steps committed", 30, || async {
        let found = admin.task(task).await.ok()?;
        let done = found.steps.iter().filter(|step| step.state == "done").count();
        (found.status == "running" && done == 2).then_some(found)
    })
    .await;
    let holder = holding.agent.clone().unwrap();
    let incarnation = holding.incarnation.unwrap();
    let summary = admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == holder).unwrap();
    let pid = summary.managed.as_ref().and_then(|managed| managed.pid).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    let done = eventually("the task completed", 30, || async {
        let found = admin.task(task).await.ok()?;
        (found.status == "completed").then_some(found)
    })
    .await;
    assert_eq!(done.result, Some(json!({"answer": "fn parse() {}", "steps": 4})));
    let names: Vec<&str> = done.steps.iter().map(|step| step.name.as_str()).collect();
    assert_eq!(names, ["step-1", "step-2", "step-3", "step-4"]);
    let killed = format!("{holder}/{incarnation}");
    for step in &done.steps[..2] {
        // Committed by the killed run and never run again.
        assert_eq!((step.attempt, step.result["by"].as_str()), (1, Some(killed.as_str())), "{step:?}");
    }
    for step in &done.steps[2..] {
        assert_eq!(step.attempt, 2, "{step:?}");
        let by = step.result["by"].as_str().unwrap();
        assert!(!by.starts_with(&format!("{holder}/")), "step {} ran on the killed agent: {by}", step.name);
        assert!(step.llm.as_ref().is_some_and(|llm| llm.model == "demo-coder"), "{step:?}");
    }
    assert_eq!(done.attempts, 2);
    assert!(done.last_error.as_deref().is_some_and(|error| error.contains("down")), "{done:?}");
    let finisher = done.agent.as_deref().expect("a completed task names who completed it");
    assert!(done.steps[3].result["by"].as_str().unwrap().starts_with(&format!("{finisher}/")), "{done:?}");
    assert_eq!(done.incarnation, None, "no lease any more");

    // What the killed run might still have sent is refused.
    let late = json!({"agent": holder, "incarnation": incarnation, "result": "zombie"});
    let (status, answer) = post(&hale, &format!("/v1/tasks/{task}/complete"), late);
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "lease_lost");
    assert_eq!(admin.task(task).await.unwrap().result, done.result);
}

/// Load shedding over HTTP: with the queue at its limits, background (then normal)
/// submissions get 503 with Retry-After and a retryable `overloaded` error; critical ones
/// are accepted; `hale status` shows the queue and its limits.
#[tokio::test]
async fn load_shedding_answers_503_for_background_while_critical_is_accepted() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, "[tasks]\nshed_background_at = 2\nshed_normal_at = 3\nretry_after_ms = 5000\n").unwrap();
    let hale = serve(&temp.path().join("data"), &["-c", config.to_str().unwrap()]);
    let submit = |priority: &str| {
        let body = json!({"role": "writer", "priority": priority, "payload": {"topic": "tides"}});
        support::http_full(hale.addr, "POST", "/v1/tasks", body.to_string().as_bytes())
    };
    // No writer is connected, so everything queues.
    for priority in ["normal", "background"] {
        let (status, _, body) = submit(priority);
        assert_eq!(status, 200, "{body}");
    }
    let (status, head, body) = submit("background");
    assert_eq!(status, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 5"), "{head}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (error["error"]["code"].as_str(), error["error"]["retryable"].as_bool()),
        (Some("overloaded"), Some(true))
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("critical"), "{body}");
    let (status, _, body) = submit("normal");
    assert_eq!(status, 200, "normal is refused only from 3 queued: {body}");
    let (status, _, body) = submit("normal");
    assert_eq!(status, 503, "{body}");
    for _ in 0..3 {
        let (status, _, body) = submit("critical");
        assert_eq!(status, 200, "critical work is never shed: {body}");
    }
    let (code, out, err) = support::hale(&["status", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("queue 6 waiting (background refused from 2, normal from 3"), "{out}");
    assert!(out.contains("6 pending"), "{out}");
}
