//! `hale demo --json`: the README's main command runs to the end by itself, and its
//! timeline shows each expected detection and recovery, and the task story.

use crate::support;
use serde_json::Value;

fn entry<'a>(timeline: &'a [Value], kind: &str, agent: &str) -> &'a Value {
    timeline
        .iter()
        .find(|entry| entry["kind"] == kind && entry["agent"] == agent)
        .unwrap_or_else(|| panic!("no {kind} entry for {agent} in {timeline:#?}"))
}

#[test]
fn the_demo_detects_and_heals_a_kill_and_a_stall_and_leaves_nothing_running() {
    let (code, out, err) = support::hale(&["demo", "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_str(&out).unwrap_or_else(|error| panic!("{error}: {out}"));
    assert_eq!(summary["passed"], true, "{err}");
    let timeline = summary["timeline"].as_array().unwrap();

    let killed = entry(timeline, "killed", "code-generator");
    let detected = entry(timeline, "detected", "code-generator");
    assert_eq!(detected["detector"], "process_exit");
    assert_eq!(detected["incarnation"], 1);
    assert!(detected["t_ms"].as_u64() >= killed["t_ms"].as_u64());
    let restarted = entry(timeline, "restarted", "code-generator");
    assert_eq!(restarted["incarnation"], 2);
    let resumed = entry(timeline, "resumed", "code-generator");
    assert_eq!(resumed["continued"], true);
    assert_eq!(resumed["first_step_after"].as_u64(), resumed["last_step_before"].as_u64().map(|step| step + 1));

    let stalled = entry(timeline, "detected", "creative-writer");
    assert_eq!(stalled["detector"], "stall");
    assert_eq!(entry(timeline, "restarted", "creative-writer")["incarnation"], 2);
    assert_eq!(entry(timeline, "resumed", "creative-writer")["continued"], true);

    // The task story: the killed holder's task moved and finished from its last commit
    // point; the fact-check was shadowed; the small model completed a task at good_enough.
    let moved = timeline.iter().find(|entry| entry["kind"] == "task_moved").expect("a task_moved entry");
    assert_eq!((moved["to"].as_str(), moved["committed_steps"].as_u64()), (Some("code-generator-2"), Some(2)));
    assert!(moved["t_ms"].as_u64() >= killed["t_ms"].as_u64());
    let completed: Vec<&Value> = timeline.iter().filter(|entry| entry["kind"] == "task_completed").collect();
    assert_eq!(completed.len(), 2, "{timeline:#?}");
    assert_eq!(
        (completed[0]["from_last_commit"].as_bool(), completed[0]["steps_rerun"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        (completed[1]["level"].as_str(), completed[1]["by"].as_str()),
        (Some("good_enough"), Some("code-generator-small"))
    );
    let shadow = timeline.iter().find(|entry| entry["kind"] == "shadow_completed").expect("a shadow_completed entry");
    assert_eq!(shadow["agreed"], 2);
    let modes: Vec<&str> =
        timeline.iter().filter(|entry| entry["kind"] == "mode").filter_map(|entry| entry["mode"].as_str()).collect();
    assert!(modes.windows(2).any(|pair| pair == ["degraded", "optimal"]), "{modes:?}");

    // Nobody else went down, and the stop left no agent process behind.
    let downs = timeline.iter().filter(|entry| entry["kind"] == "detected").count();
    assert_eq!(downs, 2, "{timeline:#?}");
    let stopped = timeline.iter().find(|entry| entry["kind"] == "stopped").unwrap();
    assert_eq!(stopped["agents_left_running"], 0);
}
