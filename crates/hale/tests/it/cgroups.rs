//! Kernel limits: each agent in a cgroup of its own (v2 delegated to hale, or the v1
//! hierarchies a host mounts), with its memory limit enforced by the kernel's OOM killer
//! and reported as such, its pids limit and its CPU quota. Where this machine offers no
//! cgroup to hale, the tests that need one say so and return; the polling fallback is
//! tested with cgroups turned off, so it runs everywhere (supervise.rs,
//! `an_agent_over_its_resident_memory_limit_is_detected_and_restarted`).

use crate::support::{self, HALE, eventually, up};
use hale_client::{Admin, AgentSummary};
use std::path::{Path, PathBuf};

/// A hale.toml with `[supervision]` lines and agents given as TOML.
fn config(dir: &Path, supervision: &str, agents: &str) -> PathBuf {
    let path = dir.join("hale.toml");
    std::fs::write(&path, format!("[supervision]\n{supervision}\n{agents}")).unwrap();
    path
}

/// A demo agent (`hale demo-agent`) with extra arguments and extra TOML lines.
fn demo_agent(name: &str, args: &[&str], extra: &str) -> String {
    let mut all = vec!["demo-agent".to_string(), name.to_string(), "--step-ms".into(), "100".into()];
    all.extend(args.iter().map(|arg| arg.to_string()));
    format!(
        "\n[[agent]]\nname = \"{name}\"\ncommand = \"{HALE}\"\nargs = {}\n{extra}\n",
        serde_json::to_string(&all).unwrap()
    )
}

/// What hale said at start about cgroups: `Some(line)` if agents get them, `None` (after
/// printing why the test is skipped) if not.
fn cgroups_in_use(hale: &support::Hale, test: &str) -> Option<String> {
    assert!(hale.stderr_shows("cgroups: "), "hale did not say whether it uses cgroups:\n{}", hale.stderr());
    let stderr = hale.stderr();
    let line = stderr.lines().find(|line| line.contains("cgroups: ")).unwrap();
    let said = line[line.find("cgroups: ").unwrap()..].to_string();
    if said.starts_with("cgroups: none") {
        eprintln!("{test}: SKIPPED, no cgroup for hale on this machine: {said}");
        return None;
    }
    Some(said)
}

async fn summary(admin: &Admin, name: &str) -> Option<AgentSummary> {
    admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == name)
}

/// `name` running as `incarnation` (or later), with a pid.
async fn running(admin: &Admin, name: &str, incarnation: u64) -> (AgentSummary, u32) {
    eventually(&format!("{name} running as incarnation {incarnation}"), 60, || async {
        let agent = summary(admin, name).await?;
        let managed = agent.managed.as_ref()?;
        let pid = managed.pid?;
        (managed.status == "running" && agent.incarnation >= incarnation).then_some((agent, pid))
    })
    .await
}

/// The cgroup directories of `pid`, one per v1 controller hale uses or the one of v2,
/// from `/proc/PID/cgroup` and the mounts: `(controller, directory)`.
fn cgroup_dirs(pid: u32) -> Vec<(String, PathBuf)> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, names, path) = (fields.next().unwrap(), fields.next().unwrap(), fields.next().unwrap());
        if !path.contains("/agent-") {
            continue;
        }
        let mount = mounts.lines().find_map(|mount| {
            let (before, after) = mount.split_once(" - ")?;
            let point = before.split_whitespace().nth(4)?;
            let mut after = after.split_whitespace();
            let (fs_type, _, options) = (after.next()?, after.next()?, after.next()?);
            let matches = if names.is_empty() {
                fs_type == "cgroup2"
            } else {
                fs_type == "cgroup" && options.split(',').any(|option| option == names)
            };
            matches.then(|| PathBuf::from(point))
        });
        let mount = mount.unwrap_or_else(|| panic!("no mount for {line}"));
        dirs.push((names.to_string(), mount.join(path.trim_start_matches('/'))));
    }
    dirs
}

/// The directory of `controller` among `dirs` (the v2 one serves every controller).
fn dir_of<'a>(dirs: &'a [(String, PathBuf)], controller: &str) -> &'a Path {
    let found = dirs.iter().find(|(names, _)| names.is_empty() || names == controller);
    &found.unwrap_or_else(|| panic!("no {controller} cgroup in {dirs:?}")).1
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())).trim().to_string()
}

#[tokio::test]
async fn an_agent_past_its_memory_limit_is_oom_killed_by_the_kernel_and_reported_as_such() {
    let temp = tempfile::tempdir().unwrap();
    let agents = demo_agent(
        "hog",
        &["--misbehave", "grow-memory", "--after-ms", "300", "--only-incarnation", "1"],
        "[agent.resources]\nmemory_mb = 96\npids_max = 64\ncpu_quota_percent = 150",
    );
    let config = config(temp.path(), "stop_grace_ms = 300", &agents);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let Some(said) = cgroups_in_use(&hale, "oom") else { return };
    let admin = hale.admin();
    // Incarnation 1 grows by 64 MiB a step; the kernel kills it at 96 MiB, and hale
    // restarts it (incarnation 2 does not grow).
    let (restarted, pid) = running(&admin, "hog", 2).await;
    let down = restarted.last_down.clone().unwrap();
    assert_eq!((down.incarnation, down.detector.as_str()), (1, "resource"), "{}", down.cause);
    assert!(down.cause.contains("out of memory at its limit of 96 MiB"), "{}", down.cause);
    // The log holds the cause as its own kind, with the limit.
    let (status, body) = hale.get("/v1/events?agent=hog&kind=agent_down");
    assert_eq!(status, 200, "{body}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let cause = &events.first().unwrap_or_else(|| panic!("no agent_down in {body}"))["event"]["cause"];
    assert_eq!(cause["out_of_memory"]["limit_bytes"], 96u64 * 1024 * 1024, "{body}");

    // Incarnation 2 runs in the agent's own cgroup, under hale's base for this data
    // directory, and the limit files hold the configured values.
    let dirs = cgroup_dirs(pid);
    assert!(!dirs.is_empty(), "{pid} is in no agent cgroup: {}", read(Path::new(&format!("/proc/{pid}/cgroup"))));
    for (_, dir) in &dirs {
        assert!(dir.ends_with("agent-hog"), "{}", dir.display());
        assert!(dir.parent().unwrap().file_name().unwrap().to_string_lossy().starts_with("hale-"), "{}", dir.display());
    }
    let memory = dir_of(&dirs, "memory");
    let limit = if said.contains("v2") { memory.join("memory.max") } else { memory.join("memory.limit_in_bytes") };
    assert_eq!(read(&limit), (96u64 * 1024 * 1024).to_string());
    assert_eq!(read(&dir_of(&dirs, "pids").join("pids.max")), "64");
    let cpu = dir_of(&dirs, "cpu");
    if said.contains("v2") {
        assert_eq!(read(&cpu.join("cpu.max")), "150000 100000");
    } else {
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "150000");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
    }

    // Stopped for good with hale: the agent's cgroups and hale's bases are gone.
    let (status, stderr) = hale.terminate_with_stderr();
    assert!(status.success(), "{stderr}");
    for (_, dir) in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
        assert!(!dir.parent().unwrap().exists(), "{} is left", dir.parent().unwrap().display());
    }
}

#[tokio::test]
async fn an_agent_that_forks_past_its_pids_limit_gets_eagain() {
    let temp = tempfile::tempdir().unwrap();
    // It forks children that sleep until it reports, then sleeps itself (hale stops the
    // whole group at the end).
    let script = "import os, time\n\
        kids = []\n\
        try:\n\
        \x20   for _ in range(50):\n\
        \x20       pid = os.fork()\n\
        \x20       if pid == 0:\n\
        \x20           time.sleep(600)\n\
        \x20           os._exit(0)\n\
        \x20       kids.append(pid)\n\
        except OSError as error:\n\
        \x20   print('fork failed after', len(kids), 'children:', error.strerror, flush=True)\n\
        time.sleep(600)\n";
    // The interpreter itself: a version manager's shim (pyenv's is a shell script) would
    // fork on its own and meet the limit first.
    let python = std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output();
    let Some(python) = python.ok().filter(|out| out.status.success()) else {
        eprintln!("pids: SKIPPED, python3 is not available to play the forking agent");
        return;
    };
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    let agents = format!(
        "\n[[agent]]\nname = \"forker\"\ncommand = {}\nargs = [\"-c\", {}]\n[agent.resources]\npids_max = 5\n",
        serde_json::to_string(&python).unwrap(),
        serde_json::to_string(script).unwrap()
    );
    let config = config(temp.path(), "stop_grace_ms = 300", &agents);
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let Some(_) = cgroups_in_use(&hale, "pids") else { return };
    let admin = hale.admin();
    let (_, pid) = running(&admin, "forker", 1).await;
    let log = temp.path().join("data/logs/forker.log");
    let said = eventually("the forker's report", 30, || async {
        std::fs::read_to_string(&log).ok().filter(|text| text.contains("fork failed"))
    })
    .await;
    // The agent itself and 4 children make 5.
    assert!(said.contains("fork failed after 4 children: Resource temporarily unavailable"), "{said}");
    let dirs = cgroup_dirs(pid);
    assert_eq!(read(&dir_of(&dirs, "pids").join("pids.max")), "5");
    assert!(hale.terminate().success());
}
