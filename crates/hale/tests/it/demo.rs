//! `hale demo --json`: the README's main command runs to the end by itself, and its
//! timeline shows each expected detection and recovery.

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

    // Nobody else went down, and the stop left no agent process behind.
    let downs = timeline.iter().filter(|entry| entry["kind"] == "detected").count();
    assert_eq!(downs, 2, "{timeline:#?}");
    let stopped = timeline.iter().find(|entry| entry["kind"] == "stopped").unwrap();
    assert_eq!(stopped["agents_left_running"], 0);
}
