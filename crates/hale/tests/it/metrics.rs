//! `GET /metrics` and `hale status` after a real crash: an agent under `hale up` is
//! SIGKILLed, comes back, and the scrape shows the crash, the restart and the time it
//! took to recover.

use crate::support::{self, ADMIN, HALE, eventually, http_as, up};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::collections::BTreeMap;

/// One sample of the scrape: `name{labels} value` → (name, labels text, value).
fn samples(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                value => value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}")),
            };
            (name.to_string(), labels.to_string(), value)
        })
        .collect()
}

/// The value of the sample named `name` whose labels contain every one of `labels`.
fn value(samples: &[(String, String, f64)], name: &str, labels: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|(found, have, _)| found == name && labels.iter().all(|label| have.split(',').any(|l| l == *label)))
        .map(|(_, _, value)| *value)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Checks the text is Prometheus/OpenMetrics exposition: every family has a `# TYPE`
/// of a known type before its samples, names are valid, values parse.
fn check_exposition(text: &str) -> BTreeMap<String, String> {
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE NAME KIND");
            assert!(valid_name(name), "bad metric name {name:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "unknown", "info", "stateset"].contains(&kind),
                "unknown type in {line:?}"
            );
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(valid_name(name), "bad sample name in {line:?}");
            let family = types
                .keys()
                .filter(|family| name.starts_with(family.as_str()))
                .max_by_key(|family| family.len())
                .unwrap_or_else(|| panic!("{name} has no # TYPE before it"));
            assert!(name.starts_with("hale_"), "{name} lacks the hale_ prefix");
            let kind = &types[family];
            if kind == "counter" {
                assert_eq!(name, format!("{family}_total"), "a counter's sample ends in _total");
            }
        }
    }
    assert_eq!(text.lines().last(), Some("# EOF"), "the text ends with # EOF");
    samples(text);
    types
}

#[tokio::test]
async fn a_sigkilled_agent_shows_in_metrics_as_a_crash_a_restart_and_a_recovery() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(
        &config,
        format!(
            "[[agent]]\nname = \"worker\"\nrole = \"builder\"\ncommand = \"{HALE}\"\n\
             args = [\"demo-agent\", \"worker\", \"--step-ms\", \"100\"]\nrestart = \"always\"\n"
        ),
    )
    .unwrap();
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let running = |incarnation: u64| {
        let admin = admin.clone();
        async move {
            let agent = admin.agents().await.ok()?.into_iter().find(|agent| agent.agent == "worker")?;
            let managed = agent.managed.as_ref()?;
            (managed.status == "running" && agent.attached && agent.incarnation >= incarnation && agent.version > 1)
                .then_some(agent)
        }
    };
    let before = eventually("worker running", 30, || running(1)).await;
    let pid = before.managed.as_ref().and_then(|managed| managed.pid).expect("a pid");

    // Before the crash: no downs, no recoveries.
    let (status, _, text) = http_as(hale.addr, Some(ADMIN), "GET", "/metrics", b"");
    assert_eq!(status, 200, "{text}");
    let first = samples(&text);
    assert_eq!(value(&first, "hale_agent_downs_total", &["agent=\"worker\""]), None, "{text}");
    assert_eq!(value(&first, "hale_agents", &["state=\"running\""]), Some(1.0), "{text}");

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually("worker back as incarnation 2", 30, || running(2)).await;

    // The recovery is timed at the new run's first hello or heartbeat, which "running and
    // attached" implies; the scrape reads it from the same engine.
    let (status, head, text) = http_as(hale.addr, Some(ADMIN), "GET", "/metrics", b"");
    assert_eq!(status, 200, "{text}");
    assert!(head.to_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    let types = check_exposition(&text);
    assert_eq!(types.get("hale_agent_downs").map(String::as_str), Some("counter"));
    assert_eq!(types.get("hale_agent_restarts").map(String::as_str), Some("counter"));
    assert_eq!(types.get("hale_agent_recovery_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(types.get("hale_uptime_seconds").map(String::as_str), Some("gauge"));
    let after = samples(&text);
    let worker = ["agent=\"worker\"", "role=\"builder\""];
    let crash = ["agent=\"worker\"", "role=\"builder\"", "cause=\"exited\"", "detector=\"process_exit\""];
    assert_eq!(value(&after, "hale_agent_downs_total", &crash), Some(1.0), "{text}");
    assert_eq!(value(&after, "hale_agent_restarts_total", &worker), Some(1.0), "{text}");
    let count = value(&after, "hale_agent_recovery_seconds_count", &worker).expect("a recovery observed");
    let sum = value(&after, "hale_agent_recovery_seconds_sum", &worker).unwrap();
    assert!(count >= 1.0, "{text}");
    assert!(sum > 0.0 && sum < 30.0, "time to recovery {sum} s\n{text}");
    assert_eq!(value(&after, "hale_agents", &["state=\"running\""]), Some(1.0), "{text}");
    assert_eq!(value(&after, "hale_mode", &["mode=\"optimal\""]), Some(1.0), "{text}");
    assert!(value(&after, "hale_log_commit_seconds_count", &[]).unwrap() > 0.0, "{text}");
    assert!(value(&after, "hale_process_resident_memory_bytes", &[]).unwrap() > 0.0, "{text}");
    assert!(value(&after, "hale_process_open_fds", &[]).unwrap() > 0.0, "{text}");
    assert!(value(&after, "hale_agent_resident_memory_bytes", &["agent=\"worker\""]).unwrap() > 0.0, "{text}");

    // Without a token: 401, and nothing of the metrics.
    let (status, _, body) = http_as(hale.addr, None, "GET", "/metrics", b"");
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("hale_agent"), "{body}");
    // A wrong token is no better.
    let (status, _, body) = http_as(hale.addr, Some("not-the-token"), "GET", "/metrics", b"");
    assert_eq!(status, 401, "{body}");

    // `hale status --json` carries the recovery and the agents by state.
    let (code, out, err) = support::hale(&["status", "--json", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["recoveries_last_hour"], 1, "{out}");
    let p50 = status["mttr_p50_seconds"].as_f64().expect("p50");
    let p99 = status["mttr_p99_seconds"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p50 <= p99, "{out}");
    assert!((p99 - sum).abs() < 1e-6, "one recovery: p99 {p99} is the histogram's sum {sum}");
    assert_eq!(status["agents_by_state"]["running"], 1, "{out}");
    let (code, out, err) = support::hale(&["status", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("agents 1 running"), "{out}");
    assert!(out.contains("recovery 1 in the last hour: time to recovery p50"), "{out}");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn metrics_take_their_own_token_or_none_when_public() {
    let temp = tempfile::tempdir().unwrap();
    let token_file = temp.path().join("metrics.token");
    std::fs::write(&token_file, "scrape-me-3f9a\n").unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, format!("[server]\nmetrics_token_file = {:?}\n", token_file.display().to_string()))
        .unwrap();
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let (status, _, text) = http_as(hale.addr, Some("scrape-me-3f9a"), "GET", "/metrics", b"");
    assert_eq!(status, 200, "{text}");
    check_exposition(&text);
    // The metrics token reads metrics and nothing else.
    let (status, _, body) = http_as(hale.addr, Some("scrape-me-3f9a"), "GET", "/v1/status", b"");
    assert_eq!(status, 401, "{body}");
    assert!(hale.terminate().success());

    std::fs::write(&config, "[server]\nmetrics_public = true\n").unwrap();
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let (status, _, text) = http_as(hale.addr, None, "GET", "/metrics", b"");
    assert_eq!(status, 200, "{text}");
    let (status, _, body) = http_as(hale.addr, None, "GET", "/v1/status", b"");
    assert_eq!(status, 401, "{body}");
    assert!(hale.terminate().success());
}
