//! fsync failure, injected by strace: once a commit's fsync fails, nothing more is
//! acknowledged, hale says why, and a normal restart recovers everything acknowledged.

use crate::support::{self, serve, serve_with};
use hale_client::AgentOptions;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_fsync_nothing_is_acknowledged_and_restart_recovers() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is required for this test: apt-get install strace (.ci/run installs it)");
    }
    let temp = tempfile::tempdir().unwrap();
    // From the 60th fsync/fdatasync on, every one fails with EIO. Start-up takes a handful.
    let mut strace = Command::new("strace");
    strace.args([
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=fsync,fdatasync",
        "-e",
        "inject=fsync,fdatasync:error=EIO:when=60+",
    ]);
    strace.arg(support::HALE);
    let hale = serve_with(strace, temp.path(), &[])
        .unwrap_or_else(|stderr| panic!("hale under strace did not start:\n{stderr}"));

    let mut acked: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut agents = Vec::new();
    for index in 0..3 {
        let agent = hale.connect(AgentOptions::new(format!("fs-{index}"), "fs")).await;
        agent.resume().await.unwrap();
        agents.push(agent);
    }
    let mut first_failure = None;
    let mut acked_after_failure = Vec::new();
    for n in 1..=400u64 {
        for (index, agent) in agents.iter().enumerate() {
            match agent.checkpoint(json!({ "n": n })).await {
                Ok(version) => {
                    if first_failure.is_some() {
                        acked_after_failure.push((index, n));
                    }
                    acked.insert(format!("fs-{index}"), (version, n));
                }
                Err(error) => {
                    if first_failure.is_none() {
                        first_failure = Some(error.to_string());
                        assert_eq!(error.code(), Some("log_unavailable"), "{error}");
                    }
                }
            }
        }
    }
    let failure = first_failure.expect("the injected fsync failure never surfaced");
    assert!(acked_after_failure.is_empty(), "acknowledged after the failed fsync: {acked_after_failure:?}");
    assert!(failure.contains("restart hale"), "the error must say what to do: {failure}");
    assert!(!acked.is_empty(), "nothing was acknowledged before the failure; raise when=");
    let (status, body) = hale.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("log_unavailable"), "{body}");
    assert!(hale.stderr_shows("log commit failed"), "{}", hale.stderr());
    drop(agents);
    // SIGKILL hale itself (its pid is in the LOCK file), then strace.
    let lock = std::fs::read_to_string(temp.path().join("LOCK")).unwrap();
    let pid: i32 = lock.trim().strip_prefix("pid ").and_then(|pid| pid.parse().ok()).expect("pid in LOCK");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    hale.kill();
    wait_for_exit(pid);

    // A normal restart recovers every acknowledged checkpoint.
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    for (agent, (version, n)) in &acked {
        let current = admin.state(agent, None).await.unwrap();
        assert!(current.version >= *version, "{agent}: version {} < acknowledged {version}", current.version);
        let at = admin.state(agent, Some(*version)).await.unwrap();
        assert_eq!(at.state, json!({ "n": n }), "{agent}: acknowledged version {version} lost");
    }
}

fn wait_for_exit(pid: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "hale (pid {pid}) did not die");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
