//! Tests with real processes. Nothing asserts on timing: waits poll with a generous
//! deadline, so a busy machine only makes them slower.

use super::proc_fs::{parse_stat, read_stat};
use super::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` until it holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec { command: "sh".into(), args: vec!["-c".into(), script.into()], ..ProcessSpec::default() }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn append(path: &Path, text: &str) {
    let mut file = fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A spawned agent that is killed (with its group) if a test ends while it still runs.
struct Agent {
    child: tokio::process::Child,
    id: ProcessId,
}

impl Agent {
    fn start(spec: &ProcessSpec, logs: &AgentLogs) -> Agent {
        let (child, id) = spawn(spec, logs).unwrap_or_else(|error| panic!("spawn failed: {error}"));
        Agent { child, id }
    }

    /// Waits for the exit (and reaps).
    async fn exited(&mut self) -> ExitStatus {
        tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("the agent exits in time").unwrap()
    }

    async fn kill(&mut self) -> ExitStatus {
        assert!(signal_group(self.id.pid, Signal::KILL).unwrap());
        self.exited().await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Only while not reaped: after that the group id could in principle be reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = signal_group(self.id.pid, Signal::KILL);
        }
    }
}

fn temp_logs(max_bytes: u64, keep: usize) -> (tempfile::TempDir, AgentLogs) {
    let dir = tempfile::tempdir().unwrap();
    let logs = AgentLogs::new(dir.path(), "scout", max_bytes, keep);
    (dir, logs)
}

#[tokio::test]
async fn spawn_logs_stdout_and_stderr_to_the_file_in_a_process_group_of_its_own() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let mut agent = Agent::start(&sh("echo out; echo err >&2; sleep 30"), &logs);

    eventually("both lines in the log", || {
        let text = read(&logs.path());
        text.contains("out\n") && text.contains("err\n")
    })
    .await;
    let stat = read_stat(agent.id.pid).unwrap();
    assert_eq!(stat.pgrp as u32, agent.id.pid, "pgid (field 5) equals the pid");
    assert_ne!(stat.pgrp, rustix::process::getpgrp().as_raw_pid(), "not hale's group");
    assert_eq!(agent.id.start_ticks, stat.start_ticks);
    let mode = fs::metadata(logs.path()).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 & !0o640, 0, "at most 0640");
    agent.kill().await;
}

#[tokio::test]
async fn spawn_adds_the_env_and_applies_the_workdir() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let workdir = tempfile::tempdir().unwrap();
    let mut spec = sh("echo \"agent=$HALE_AGENT\"; echo \"home=${HOME:+set}\"; echo \"cwd=$(pwd -P)\"");
    spec.env.insert("HALE_AGENT".into(), "scout".into());
    spec.workdir = Some(workdir.path().to_path_buf());
    let mut agent = Agent::start(&spec, &logs);
    assert!(agent.exited().await.success());

    let text = read(&logs.path());
    assert!(text.contains("agent=scout\n"), "env var given in the spec is visible: {text:?}");
    if std::env::var_os("HOME").is_some() {
        assert!(text.contains("home=set\n"), "hale's own environment is inherited: {text:?}");
    }
    let cwd = fs::canonicalize(workdir.path()).unwrap();
    assert!(text.contains(&format!("cwd={}\n", cwd.display())), "workdir applies: {text:?}");
}

#[tokio::test]
async fn spawn_errors_name_the_command() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let spec = ProcessSpec { command: "hale-no-such-program".into(), ..ProcessSpec::default() };
    let error = spawn(&spec, &logs).map(|_| ()).unwrap_err();
    assert!(matches!(error, SpawnError::Start { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("`hale-no-such-program`"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
    assert!(message.contains("is it on PATH?"), "{message}");

    let mut spec = sh("true");
    spec.workdir = Some("/nonexistent/hale-workdir".into());
    let message = spawn(&spec, &logs).map(|_| ()).unwrap_err().to_string();
    assert!(message.contains("`sh`") && message.contains("/nonexistent/hale-workdir"), "{message}");
    assert!(!message.contains("PATH"), "a missing workdir is not reported as a missing program: {message}");
}

/// Reads one row of /proc/PID/limits as (soft, hard).
fn limit_row(pid: u32, row: &str) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|line| line.starts_with(row)).unwrap_or_else(|| panic!("no {row:?} in {limits}"));
    let mut values = line[row.len()..].split_whitespace();
    (values.next().unwrap().to_owned(), values.next().unwrap().to_owned())
}

#[tokio::test]
async fn spawn_applies_the_memory_and_open_file_limits() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let spec = ProcessSpec {
        command: "sleep".into(),
        args: vec!["30".into()],
        address_space_mb: Some(512),
        open_files: Some(64),
        ..ProcessSpec::default()
    };
    let mut agent = Agent::start(&spec, &logs);
    let bytes = (512u64 * 1024 * 1024).to_string();
    assert_eq!(limit_row(agent.id.pid, "Max address space"), (bytes.clone(), bytes));
    assert_eq!(limit_row(agent.id.pid, "Max open files"), ("64".into(), "64".into()));
    agent.kill().await;

    // Without limits in the spec, the child keeps hale's.
    let mut agent = Agent::start(&sh("sleep 30"), &logs);
    let ours = limit_row(std::process::id(), "Max open files");
    assert_eq!(limit_row(agent.id.pid, "Max open files"), ours);
    agent.kill().await;
}

#[tokio::test]
async fn spawn_fails_and_kills_the_child_when_a_limit_cannot_be_applied() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    // Above fs.nr_open (at most 2^30): refused even to root.
    let mut spec = sh("echo started; sleep 30");
    spec.open_files = Some(1 << 40);
    let error = spawn(&spec, &logs).map(|_| ()).unwrap_err();
    let SpawnError::Limit { pid, .. } = &error else { panic!("expected a limit error, got {error:?}") };
    let message = error.to_string();
    assert!(message.contains("`sh`") && message.contains("open files"), "{message}");
    let pid = *pid;
    eventually("the child to be killed", || start_ticks(pid).is_none()).await;
}

#[tokio::test]
async fn signal_group_reaches_a_grandchild() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let mut agent = Agent::start(&sh("sleep 100 & echo \"grandchild $!\"; wait"), &logs);
    let mut grandchild = 0;
    eventually("the grandchild's pid in the log", || {
        let text = read(&logs.path());
        let pid = text.lines().find_map(|line| line.strip_prefix("grandchild ")?.trim().parse().ok());
        grandchild = pid.unwrap_or(0);
        pid.is_some()
    })
    .await;
    assert_eq!(read_stat(grandchild).unwrap().pgrp as u32, agent.id.pid, "the grandchild is in the agent's group");
    assert!(start_ticks(grandchild).is_some());

    assert!(signal_group(agent.id.pid, Signal::TERM).unwrap(), "delivered");
    let status = agent.exited().await;
    assert!(!status.success(), "sh died of SIGTERM: {status:?}");
    // Nobody reaps the orphaned sleep for us, but a zombie counts as gone.
    eventually("the grandchild to be gone", || start_ticks(grandchild).is_none()).await;
    // A zombie stays in its group (and kill(2) "delivers" to it) until it is reaped, here
    // by init, which has adopted it; only then is the group gone.
    eventually("the group to be gone (ESRCH is Ok(false))", || !signal_group(agent.id.pid, Signal::TERM).unwrap())
        .await;
}

#[test]
fn signal_group_refuses_groups_that_are_not_an_agents() {
    for pgid in [0, 1, u32::MAX] {
        let error = signal_group(pgid, Signal::TERM).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "pgid {pgid}");
    }
    let own = rustix::process::getpgrp().as_raw_pid() as u32;
    assert_eq!(signal_group(own, Signal::TERM).unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    // Above any pid_max (at most 2^22): certainly no such group.
    assert!(!signal_group(1 << 30, Signal::TERM).unwrap());
}

#[tokio::test]
async fn start_ticks_identify_a_process_until_it_is_reaped() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let mut agent = Agent::start(&sh("sleep 30"), &logs);
    let id = agent.id;
    assert_eq!(start_ticks(id.pid), Some(id.start_ticks));
    assert!(is_same_process(id), "a live child is the same process");
    assert!(!is_same_process(ProcessId { start_ticks: id.start_ticks + 1, ..id }), "other start time: reused pid");
    assert!(!is_same_process(ProcessId { pid: 0, start_ticks: 0 }));

    agent.kill().await;
    assert_eq!(start_ticks(id.pid), None, "gone after exit and reaping");
    assert!(!is_same_process(id));
}

#[tokio::test]
async fn a_zombie_is_not_alive() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    eventually("the child to become a zombie", || read_stat(pid).is_ok_and(|stat| stat.state == b'Z')).await;
    let stat = read_stat(pid).unwrap();
    assert_eq!(start_ticks(pid), None);
    assert!(!is_same_process(ProcessId { pid, start_ticks: stat.start_ticks }));
    assert_eq!(usage(pid), None);
    child.wait().unwrap();
}

#[test]
fn parse_stat_splits_after_the_last_parenthesis() {
    let text = "4242 (evil) name (x) S) Z 1 4242 4242 0 -1 4194560 0 0 0 0 7 3 0 0 20 0 1 0 98765 0 0\n";
    let stat = parse_stat(text).unwrap();
    assert_eq!(stat, proc_fs::Stat { state: b'Z', pgrp: 4242, utime: 7, stime: 3, start_ticks: 98765 });
    assert!(!stat.is_alive());
    assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
    assert_eq!(parse_stat("no parenthesis"), None);
}

#[tokio::test]
async fn a_command_name_with_spaces_and_parentheses_is_parsed() {
    let (dir, logs) = temp_logs(1 << 20, 2);
    let sleep = which("sleep");
    let odd = dir.path().join("a) b (c");
    std::os::unix::fs::symlink(sleep, &odd).unwrap();
    let spec = ProcessSpec { command: odd.display().to_string(), args: vec!["30".into()], ..ProcessSpec::default() };
    let mut agent = Agent::start(&spec, &logs);
    let text = fs::read_to_string(format!("/proc/{}/stat", agent.id.pid)).unwrap();
    assert!(text.contains("(a) b (c)"), "{text}");
    assert_eq!(read_stat(agent.id.pid).unwrap().pgrp as u32, agent.id.pid);
    assert!(is_same_process(agent.id));
    agent.kill().await;
}

fn which(program: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap();
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file()).unwrap()
}

#[tokio::test]
async fn wait_adopted_exit_resolves_when_a_process_that_is_not_our_child_exits() {
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let id = ProcessId { pid, start_ticks: start_ticks(pid).unwrap() };
    let mut waiting = Box::pin(wait_adopted_exit(pid));
    let mut waiting_of = Box::pin(wait_adopted_exit_of(id));
    // Polling once opens the pidfds; a live process does not resolve them.
    assert!(tokio::time::timeout(Duration::from_millis(100), &mut waiting).await.is_err());
    assert!(tokio::time::timeout(Duration::from_millis(1), &mut waiting_of).await.is_err());

    let reaper = std::thread::spawn(move || {
        child.kill().unwrap();
        child.wait().unwrap()
    });
    tokio::time::timeout(PATIENCE, waiting).await.expect("resolves after the exit").unwrap();
    tokio::time::timeout(PATIENCE, waiting_of).await.expect("resolves after the exit").unwrap();
    reaper.join().unwrap();

    // Gone (reaped): pidfd_open fails with ESRCH.
    let error = wait_adopted_exit(pid).await.unwrap_err();
    assert_eq!(error.raw_os_error(), Some(rustix::io::Errno::SRCH.raw_os_error()), "{error}");
}

#[tokio::test]
async fn wait_adopted_exit_of_refuses_another_process_on_the_same_pid() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let mut agent = Agent::start(&sh("sleep 30"), &logs);
    let reused = ProcessId { start_ticks: agent.id.start_ticks + 1, ..agent.id };
    let error = wait_adopted_exit_of(reused).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
    agent.kill().await;
}

#[tokio::test]
async fn usage_reads_a_live_process_and_nothing_for_a_dead_one() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let mut agent = Agent::start(&sh("while :; do :; done"), &logs);
    let first = usage(agent.id.pid).expect("a live process has usage");
    assert!(first.rss_bytes > 0, "{first:?}");
    assert!(first.rss_bytes < 1 << 30, "a busy shell is not a gigabyte: {first:?}");
    eventually("the busy loop to use CPU time", || usage(agent.id.pid).is_some_and(|now| now.cpu_ms >= 10)).await;
    let pid = agent.id.pid;
    agent.kill().await;
    assert_eq!(usage(pid), None);
}

#[test]
fn rotation_copies_truncates_and_shifts() {
    let (dir, logs) = temp_logs(100, 2);
    assert!(!logs.rotate_if_needed().unwrap(), "no file, nothing to rotate");
    append(&logs.path(), &"first\n".repeat(10));
    assert!(!logs.rotate_if_needed().unwrap(), "60 bytes is under the limit");

    let generation = |name: &str| format!("{name}\n").repeat(60);
    append(&logs.path(), &generation("a"));
    let a = read(&logs.path());
    assert!(logs.rotate_if_needed().unwrap());
    assert_eq!(read(&logs.rotated_path(1)), a, ".1 holds the old content");
    assert_eq!(fs::metadata(logs.path()).unwrap().len(), 0, "the current file is empty");

    for name in ["b", "c"] {
        append(&logs.path(), &generation(name));
        assert!(logs.rotate_if_needed().unwrap());
    }
    assert_eq!(read(&logs.rotated_path(1)), generation("c"));
    assert_eq!(read(&logs.rotated_path(2)), generation("b"));
    assert!(!logs.rotated_path(3).exists(), "beyond keep is dropped");
    let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 3, "current, .1, .2 and no staging file: {leftovers:?}");

    let (_dir, logs) = temp_logs(10, 0);
    append(&logs.path(), &generation("d"));
    assert!(logs.rotate_if_needed().unwrap());
    assert_eq!(fs::metadata(logs.path()).unwrap().len(), 0, "keep = 0 only truncates");
    assert!(!logs.rotated_path(1).exists());
}

#[tokio::test]
async fn after_rotation_a_running_child_appends_from_the_start_of_the_file() {
    let (_dir, logs) = temp_logs(1000, 2);
    let mut agent = Agent::start(&sh("i=0; while :; do i=$((i+1)); echo \"tick $i\"; sleep 0.01; done"), &logs);
    eventually("more than max_bytes of output", || fs::metadata(logs.path()).is_ok_and(|meta| meta.len() > 1000)).await;
    assert!(logs.rotate_if_needed().unwrap());
    let old = fs::read(logs.rotated_path(1)).unwrap();
    assert!(old.starts_with(b"tick 1\ntick 2\n"), ".1 holds the old content");

    eventually("new lines after the rotation", || read(&logs.path()).lines().count() >= 3).await;
    let new = fs::read(logs.path()).unwrap();
    assert!(!new.contains(&0), "no hole of zeros: the O_APPEND writer went on at offset 0");
    assert!(new.starts_with(b"tick "), "{:?}", String::from_utf8_lossy(&new));
    let number = |line: &str| line.strip_prefix("tick ").unwrap().parse::<u64>().unwrap();
    let old_text = String::from_utf8(old).unwrap();
    let new_text = String::from_utf8(new).unwrap();
    let last_old = old_text.lines().last().map(number).unwrap();
    let first_new = new_text.lines().next().map(number).unwrap();
    assert!(first_new > last_old, "nothing is duplicated: {last_old} then {first_new}");
    agent.kill().await;
}

#[test]
fn tail_reads_across_rotated_files() {
    let (_dir, logs) = temp_logs(1 << 20, 3);
    fs::write(logs.rotated_path(2), "a1\na2\n").unwrap();
    fs::write(logs.rotated_path(1), "b1\nb2\n").unwrap();
    fs::write(logs.path(), "c1\nc2\n").unwrap();
    assert_eq!(tail(&logs, 0).unwrap(), "");
    assert_eq!(tail(&logs, 1).unwrap(), "c2\n");
    assert_eq!(tail(&logs, 2).unwrap(), "c1\nc2\n");
    assert_eq!(tail(&logs, 3).unwrap(), "b2\nc1\nc2\n");
    assert_eq!(tail(&logs, 5).unwrap(), "a2\nb1\nb2\nc1\nc2\n");
    assert_eq!(tail(&logs, 100).unwrap(), "a1\na2\nb1\nb2\nc1\nc2\n");

    fs::write(logs.path(), "c1\nc2").unwrap();
    assert_eq!(tail(&logs, 1).unwrap(), "c2", "an unfinished last line is a line");
    assert_eq!(tail(&logs, 2).unwrap(), "c1\nc2");
    fs::write(logs.path(), "").unwrap();
    assert_eq!(tail(&logs, 1).unwrap(), "b2\n", "an empty current file: the rotated one");

    let (_dir, logs) = temp_logs(1 << 20, 3);
    assert_eq!(tail(&logs, 10).unwrap(), "", "no files yet");
}

#[test]
fn tail_of_a_big_file_reads_across_chunks() {
    let (_dir, logs) = temp_logs(1 << 30, 1);
    let text: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
    fs::write(logs.path(), &text).unwrap();
    assert_eq!(tail(&logs, 3).unwrap(), "line 49997\nline 49998\nline 49999\n");
    let many = tail(&logs, 20_000).unwrap();
    assert_eq!(many.lines().count(), 20_000);
    assert!(many.starts_with("line 30000\n"));
}

/// Runs `follow` in a task, collecting what it hands out.
fn start_follow(logs: &AgentLogs, from_len: u64) -> (Arc<Mutex<Vec<u8>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let logs = logs.clone();
    let task = tokio::spawn(async move {
        follow(&logs, from_len, move |bytes| sink.lock().unwrap().extend_from_slice(bytes)).await.unwrap();
    });
    (seen, task)
}

fn text_of(seen: &Mutex<Vec<u8>>) -> String {
    String::from_utf8(seen.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn follow_sees_appends_and_data_after_a_truncation() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    fs::write(logs.path(), "old\n").unwrap();
    let (seen, task) = start_follow(&logs, 4);

    append(&logs.path(), "new one\n");
    eventually("the appended line", || text_of(&seen) == "new one\n").await;
    fs::OpenOptions::new().write(true).open(logs.path()).unwrap().set_len(0).unwrap();
    append(&logs.path(), "x\n");
    eventually("the data after the truncation", || text_of(&seen) == "new one\nx\n").await;
    append(&logs.path(), "y\n");
    eventually("later appends", || text_of(&seen) == "new one\nx\ny\n").await;
    task.abort();
}

#[tokio::test]
async fn follow_goes_on_across_a_rotation_without_losing_or_repeating() {
    let (_dir, logs) = temp_logs(1, 2);
    append(&logs.path(), "one\n");
    let (seen, task) = start_follow(&logs, 0);
    eventually("the first line", || text_of(&seen) == "one\n").await;
    // Whether or not `follow` sees "two" before the rotation, it shows it exactly once.
    append(&logs.path(), "two\n");
    assert!(logs.rotate_if_needed().unwrap());
    append(&logs.path(), "three\n");
    eventually("every line once", || text_of(&seen) == "one\ntwo\nthree\n").await;
    append(&logs.path(), "four\n");
    eventually("lines after the rotation", || text_of(&seen) == "one\ntwo\nthree\nfour\n").await;
    task.abort();
}

#[test]
fn process_id_round_trips_through_json() {
    let id = ProcessId { pid: 4242, start_ticks: 98765 };
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, r#"{"pid":4242,"start_ticks":98765}"#);
    assert_eq!(serde_json::from_str::<ProcessId>(&json).unwrap(), id);
}

#[tokio::test]
async fn find_agents_finds_group_leaders_by_their_hale_environment() {
    let (_dir, logs) = temp_logs(1 << 20, 2);
    let supervisor = format!("/tmp/find-agents-test-{}", std::process::id());
    let mut spec = sh("sleep 100 & wait");
    spec.env.insert("HALE_SUPERVISOR".into(), supervisor.clone());
    spec.env.insert("HALE_AGENT".into(), "finder".into());
    spec.env.insert("HALE_INCARNATION".into(), "7".into());
    let mut agent = Agent::start(&spec, &logs);
    // The grandchild (sleep) has the same environment but is not a group leader.
    eventually("the agent found", || find_agents(&supervisor).len() == 1).await;
    let found = find_agents(&supervisor);
    assert_eq!(found, [Found { id: agent.id, agent: "finder".into(), incarnation: 7 }]);
    assert!(find_agents("/some/other/data").iter().all(|found| found.id != agent.id));
    signal_group(agent.id.pid, Signal::KILL).unwrap();
    agent.exited().await;
    assert!(find_agents(&supervisor).is_empty());
}
