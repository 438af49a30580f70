//! Managed agents across the nodes of a cluster: three real `hale up` nodes on loopback,
//! each with the same agents in its hale.toml; the leader places each on a node, every node
//! runs what is placed on it, and when a node is SIGKILLed together with its agents, its
//! agents run on the others, resuming their state.

use crate::support::{self, ADMIN, HALE};
use hale_client::{Admin, AgentSummary};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "nodes-test-cluster-secret-8d31c0";
const AGENTS: [&str; 3] = ["a", "b", "c"];

/// Node `id`'s hale.toml: Raft at the tests' patient timeouts, a node lease of 6 s (the
/// least it may be with elections of up to 2 s), and `agents` (demo agents) in it.
fn config(dir: &Path, id: u64, agents: &str) -> PathBuf {
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let path = dir.join(format!("node{id}.toml"));
    let text = format!(
        "[cluster]\nnode_id = {id}\nsecret_file = {secret:?}\nheartbeat_ms = 100\nelection_min_ms = 1000\nelection_max_ms = 2000\nnode_lease_ms = 6000\n\n[supervision]\nstop_grace_ms = 2000\n{agents}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A demo agent checkpointing every 100 ms, restarted whatever way it stops.
fn demo_agent(name: &str, extra: &str) -> String {
    format!(
        "\n[[agent]]\nname = \"{name}\"\ncommand = \"{HALE}\"\nargs = [\"demo-agent\", \"{name}\", \"--step-ms\", \"100\"]\nrestart = \"always\"\n{extra}\n"
    )
}

fn data(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}"))
}

/// `hale up` of node `id` on a loopback port that is free (another if it was taken
/// meanwhile by a test running in parallel).
fn start(dir: &Path, id: u64, agents: &str) -> (support::Hale, String) {
    let config = config(dir, id, agents);
    for _ in 0..20 {
        let addr = support::free_address();
        let mut command = Command::new(HALE);
        command.args(["up", "-c"]).arg(&config).arg("--data").arg(data(dir, id)).args(["--listen", &addr]);
        match support::serve_with_command(command) {
            Ok(hale) => return (hale, addr),
            Err(stderr) if stderr.contains("Address already in use") => continue,
            Err(stderr) => panic!("node {id} did not start:\n{stderr}"),
        }
    }
    panic!("no free loopback port for node {id} in 20 tries");
}

/// `count` nodes with `agents`, formed into a cluster with the CLI.
fn cluster(dir: &Path, count: u64, agents: &str) -> (Vec<Option<support::Hale>>, Vec<String>) {
    let (mut nodes, mut addrs) = (Vec::new(), Vec::new());
    for id in 1..=count {
        let (hale, addr) = start(dir, id, agents);
        nodes.push(Some(hale));
        addrs.push(addr);
    }
    let (code, out, err) = support::hale(&["cluster", "init", "--server", &format!("http://{}", addrs[0])]);
    assert_eq!(code, 0, "{out}{err}");
    for at in 1..count as usize {
        let (code, out, err) =
            support::hale(&["cluster", "join", &addrs[0], "--server", &format!("http://{}", addrs[at])]);
        assert_eq!(code, 0, "node {}: {out}{err}", at + 1);
    }
    (nodes, addrs)
}

/// An admin client that follows the leader among `addrs`.
fn admin(addrs: &[String]) -> Admin {
    let urls: Vec<String> = addrs.iter().map(|addr| format!("http://{addr}")).collect();
    Admin::new(&urls.join(",")).with_token(ADMIN)
}

/// The processes on this machine that the node with data directory `data` started (from
/// their environment), with their agent's name.
fn agents_of(data: &Path) -> Vec<(Pid, String)> {
    let marker = format!("HALE_SUPERVISOR={}", std::fs::canonicalize(data).unwrap().display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: Vec<&[u8]> = environ.split(|byte| *byte == 0).collect();
        if !vars.contains(&marker.as_bytes()) || !alive(pid) {
            continue;
        }
        let agent = vars.iter().find_map(|var| var.strip_prefix(b"HALE_AGENT=")).map(String::from_utf8_lossy);
        found.push((Pid::from_raw(pid), agent.unwrap_or_default().into_owned()));
    }
    found
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Kills whatever agent processes the nodes in `dir` left, however the test ends.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for data in &self.0 {
            if data.exists() {
                for (pid, _) in agents_of(data) {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
        }
    }
}

fn node_of(agent: &AgentSummary) -> Option<&str> {
    agent.managed.as_ref().and_then(|managed| managed.node.as_deref())
}

fn running(agent: &AgentSummary) -> bool {
    agent.managed.as_ref().is_some_and(|managed| managed.status == "running") && agent.attached
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_agents_run_on_the_others_with_their_state_and_the_rest_run_on() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let _reaper = Reaper((1..=3).map(|id| data(dir, id)).collect());
    let agents: String = AGENTS.iter().map(|name| demo_agent(name, "")).collect();
    let (mut nodes, addrs) = cluster(dir, 3, &agents);
    let admin = admin(&addrs);

    // Every agent placed on a node, running there and checkpointing.
    let before = support::eventually("every agent placed, running and checkpointing", 60, || async {
        let listed = admin.agents().await.ok()?;
        let ready = listed.len() == AGENTS.len()
            && listed.iter().all(|agent| node_of(agent).is_some() && running(agent) && agent.version >= 5);
        ready.then_some(listed)
    })
    .await;
    for agent in &before {
        let node = node_of(agent).unwrap();
        let id: u64 = node.strip_prefix("node-").unwrap().parse().unwrap();
        let here: Vec<String> = agents_of(&data(dir, id)).into_iter().map(|(_, name)| name).collect();
        assert!(here.contains(&agent.agent), "{} is not running on {node}: {here:?}", agent.agent);
    }

    // The node that runs `a` goes down with its agents: hale SIGKILLed, then each agent's
    // process group.
    let lost = node_of(&before[0]).unwrap().to_string();
    let lost_id: u64 = lost.strip_prefix("node-").unwrap().parse().unwrap();
    let victims = agents_of(&data(dir, lost_id));
    nodes[lost_id as usize - 1].take().unwrap().kill();
    for (pid, _) in &victims {
        let _ = killpg(*pid, Signal::SIGKILL);
    }
    let moved: Vec<&AgentSummary> = before.iter().filter(|agent| node_of(agent) == Some(lost.as_str())).collect();
    let stayed: Vec<&AgentSummary> = before.iter().filter(|agent| node_of(agent) != Some(lost.as_str())).collect();
    assert!(!moved.is_empty());

    let survivors: Vec<String> =
        addrs.iter().enumerate().filter(|(at, _)| *at as u64 + 1 != lost_id).map(|(_, addr)| addr.clone()).collect();
    let admin = self::admin(&survivors);
    let after = support::eventually("every agent of the lost node running on another, resumed", 90, || async {
        let listed = admin.agents().await.ok()?;
        let settled = moved.iter().all(|was| {
            listed.iter().any(|now| {
                now.agent == was.agent
                    && node_of(now).is_some_and(|node| node != lost)
                    && running(now)
                    && now.incarnation > was.incarnation
                    && now.version > was.version
            })
        });
        settled.then_some(listed)
    })
    .await;
    for was in &moved {
        let now = after.iter().find(|now| now.agent == was.agent).unwrap();
        let down = now.last_down.as_ref().expect("the lost run's down is logged");
        assert_eq!(down.detector, "node", "{}: {down:?}", was.agent);
        assert!(down.cause.contains(&format!("its node {lost} was lost")), "{}", down.cause);
        // Its state came along: the demo agent resumes from the step its state holds, so
        // the step goes on from where it was rather than from 0.
        let state = admin.state(&was.agent, None).await.unwrap();
        let step = state.state["step"].as_u64().unwrap();
        assert!(step >= was.version, "{}: step {step}, version {} before", was.agent, was.version);
    }
    // The agents of the nodes still up were neither moved nor restarted, and nothing runs
    // twice: each agent has one process, on the node the log places it on.
    for was in &stayed {
        let now = after.iter().find(|now| now.agent == was.agent).unwrap();
        assert_eq!(
            (node_of(now), now.incarnation),
            (node_of(was), was.incarnation),
            "{}: {:?}",
            was.agent,
            now.last_down
        );
    }
    for now in &after {
        let id: u64 = node_of(now).unwrap().strip_prefix("node-").unwrap().parse().unwrap();
        let processes: Vec<String> = (1..=3)
            .flat_map(|node| agents_of(&data(dir, node)).into_iter().map(move |(_, name)| (node, name)))
            .filter(|(_, name)| *name == now.agent)
            .map(|(node, _)| format!("node-{node}"))
            .collect();
        assert_eq!(processes, [format!("node-{id}")], "{}", now.agent);
    }
    // The survivors stop cleanly, and their agents with them.
    for hale in nodes.iter_mut().filter_map(Option::take) {
        match hale.terminate_within(std::time::Duration::from_secs(30)) {
            Ok(status) => assert!(status.success()),
            Err(stderr) => panic!("a node did not stop within 30 s of SIGTERM:\n{stderr}"),
        }
    }
    for id in 1..=3 {
        assert!(agents_of(&data(dir, id)).is_empty(), "node-{id} left agents running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_no_node_may_run_waits_and_says_why() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let _reaper = Reaper(vec![data(dir, 1)]);
    let agents = demo_agent("gpu-worker", "node_labels = { gpu = \"true\" }");
    let (mut nodes, addrs) = cluster(dir, 1, &agents);
    let admin = admin(&addrs);
    let waiting = support::eventually("the agent pending", 30, || async {
        let listed = admin.agents().await.ok()?;
        listed.into_iter().find(|agent| agent.managed.as_ref().is_some_and(|managed| managed.status == "pending"))
    })
    .await;
    let reason = waiting.managed.unwrap().pending.unwrap();
    assert!(reason.contains("matches its placement") && reason.contains("gpu"), "{reason}");
    let (code, out, _) = support::hale(&["agents", "--server", &format!("http://{}", addrs[0])]);
    assert_eq!(code, 0);
    assert!(out.contains("pending") && out.contains("waits for a node"), "{out}");
    assert!(agents_of(&data(dir, 1)).is_empty(), "nothing runs it");
    for hale in nodes.iter_mut().filter_map(Option::take) {
        assert!(hale.terminate().success());
    }
}
