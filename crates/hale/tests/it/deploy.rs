//! The systemd unit in deploy/ runs what it says: its ExecStartPre and ExecStart command
//! lines, with the binary and paths swapped for the test's, check a hale.toml, start hale
//! with JSON logs, and SIGTERM (what `systemctl stop` sends, with KillMode=process) stops
//! it cleanly. systemd itself is not run here.

use crate::support::{self, HALE};
use std::process::Command;

/// The value of `key=` in the unit, split on spaces (the unit's lines hold no quoting).
fn unit_line(unit: &str, key: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("deploy/hale.service has no {key}="));
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_systemd_unit_checks_the_config_starts_hale_with_json_logs_and_stops_on_sigterm() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/hale.service")).unwrap();
    assert!(unit.contains("KillMode=process"), "agents must outlive a crash of hale, to be adopted");
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, "[supervision]\nstop_grace_ms = 500\n").unwrap();
    let data = temp.path().join("data");
    let swap = |word: &String| -> String {
        match word.as_str() {
            "/usr/local/bin/hale" => HALE.to_string(),
            "/etc/hale/hale.toml" => config.display().to_string(),
            "/var/lib/hale" => data.display().to_string(),
            "127.0.0.1:7700" => "127.0.0.1:0".to_string(),
            other => other.to_string(),
        }
    };
    let pre: Vec<String> = unit_line(&unit, "ExecStartPre").iter().map(swap).collect();
    let status = Command::new(&pre[0]).args(&pre[1..]).status().unwrap();
    assert!(status.success(), "ExecStartPre failed: {pre:?}");

    let start: Vec<String> = unit_line(&unit, "ExecStart").iter().map(swap).collect();
    assert!(start.contains(&"--log-format".to_string()) && start.contains(&"json".to_string()));
    let mut command = Command::new(&start[0]);
    command.args(&start[1..]);
    let hale = support::serve_with_command(command).expect("hale starts as the unit runs it");
    // JSON logs: every line hale wrote to stderr is a JSON object (read by a thread: wait
    // for the first lines to arrive).
    let waited = std::time::Instant::now();
    while hale.stderr().lines().count() < 2 && waited.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stderr = hale.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "hale logged nothing");
    for line in lines {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not a JSON log line: {line}");
    }
    assert!(hale.terminate().success(), "SIGTERM must stop hale cleanly (exit 0)");
}
