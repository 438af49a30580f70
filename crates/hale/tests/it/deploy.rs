//! The systemd unit in deploy/ runs what it says: its ExecStartPre and ExecStart command
//! lines, with the binary and paths swapped for the test's, check a hale.toml, start hale
//! with JSON logs, and SIGTERM (what `systemctl stop` sends, with KillMode=process) stops
//! it cleanly. systemd itself is not run here.

use crate::support::{self, HALE};
use std::path::Path;
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

/// Every `key=value` of the unit's [Service] section, in order (comments left out).
fn service_keys(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut keys = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
            keys.push((key.to_string(), value.to_string()));
        }
    }
    keys
}

#[test]
fn the_systemd_unit_is_type_notify_with_a_watchdog_delegation_credentials_and_hardening() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/hale.service")).unwrap();
    let keys = service_keys(&unit);
    let value = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    for (key, wanted) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Delegate", "yes"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "true"),
        ("ProtectKernelTunables", "true"),
        ("ProtectKernelModules", "true"),
        ("UMask", "0077"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(value(key), Some(wanted), "deploy/hale.service: {key}=");
    }
    assert!(value("WatchdogSec").is_some_and(|sec| sec.trim_end_matches('s').parse::<u64>().is_ok()), "WatchdogSec=");
    // With Delegate=yes hale writes per-agent cgroups under its own: a read-only cgroup
    // tree would forbid it.
    assert_eq!(value("ProtectControlGroups"), None, "ProtectControlGroups would make the delegated subtree read-only");
    // hale reads HALE_LOG, not RUST_LOG.
    assert!(!unit.contains("RUST_LOG"), "hale does not read RUST_LOG");
    assert_eq!(value("Environment"), Some("HALE_LOG=info"));
    // The credentials are the names hale looks for in $CREDENTIALS_DIRECTORY.
    let credentials: Vec<&str> = keys
        .iter()
        .filter(|(key, _)| key == "LoadCredential")
        .map(|(_, value)| value.split_once(':').expect("NAME:PATH").0)
        .collect();
    assert_eq!(credentials, ["admin.token", "encryption.keys"]);

    // systemd's own parser, where it is installed: it warns on stderr (and still exits 0)
    // about an unknown key or a bad value, so the test wants no output at all.
    let analyze =
        ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].into_iter().find(|path| Path::new(path).exists());
    let Some(analyze) = analyze else {
        eprintln!("systemd-analyze is not installed: the unit's keys were checked by the test alone");
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    // verify wants the programs it runs to exist.
    let copy = temp.path().join("hale.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/hale", HALE)).unwrap();
    let output = Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}
