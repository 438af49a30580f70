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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    demo_agent_with(name, &[], extra)
}

/// [`demo_agent`] with more arguments.
fn demo_agent_with(name: &str, args: &[&str], extra: &str) -> String {
    let mut all = vec!["demo-agent", name, "--step-ms", "100"];
    all.extend(args);
    format!(
        "\n[[agent]]\nname = \"{name}\"\ncommand = \"{HALE}\"\nargs = {}\nrestart = \"always\"\n{extra}\n",
        serde_json::to_string(&all).unwrap()
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

/// Waits until every agent of [`AGENTS`] is placed on a node, running there and has
/// checkpointed a few times; returns the list.
async fn all_placed_and_running(admin: &Admin) -> Vec<AgentSummary> {
    support::eventually("every agent placed, running and checkpointing", 60, || async {
        let listed = admin.agents().await.ok()?;
        let ready = listed.len() == AGENTS.len()
            && listed.iter().all(|agent| node_of(agent).is_some() && running(agent) && agent.version >= 5);
        ready.then_some(listed)
    })
    .await
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
    let before = all_placed_and_running(&admin).await;
    for agent in &before {
        let node = node_of(agent).unwrap();
        let id: u64 = node.strip_prefix("node-").unwrap().parse().unwrap();
        let here: Vec<String> = agents_of(&data(dir, id)).into_iter().map(|(_, name)| name).collect();
        assert!(here.contains(&agent.agent), "{} is not running on {node}: {here:?}", agent.agent);
    }

    // `a` works a task of 20 steps; a few are committed when its node goes.
    let submit = hale_proto::HttpSubmitTask {
        role: "a".into(),
        priority: None,
        payload: serde_json::json!({"steps": 20}),
        deadline_ms: None,
        max_attempts: Some(5),
        idempotency_key: Some("node-loss-task".into()),
        retry_backoff_ms: None,
        shadow: None,
        fallback: Vec::new(),
        budget: None,
    };
    let task = admin.submit(&submit).await.unwrap().task;
    let committed_before = support::eventually("three steps of the task committed by a", 60, || async {
        let info = admin.task(task).await.ok()?;
        let done: Vec<hale_client::StepInfo> = info.steps.into_iter().filter(|step| step.state == "done").collect();
        (done.len() >= 3).then_some(done)
    })
    .await;

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
    // The task finished on a's new run, from its last committed step: every step once,
    // the ones committed before the loss as they were.
    let finished = support::eventually("the task completed after the node loss", 90, || async {
        let info = admin.task(task).await.ok()?;
        (info.status == "completed").then_some(info)
    })
    .await;
    let names: Vec<&str> = finished.steps.iter().map(|step| step.name.as_str()).collect();
    let expected: Vec<String> = (1..=20).map(|n| format!("step-{n}")).collect();
    assert_eq!(names, expected, "{names:?}");
    for earlier in &committed_before {
        let now = finished.steps.iter().find(|step| step.name == earlier.name).unwrap();
        assert_eq!((&now.result, now.attempt), (&earlier.result, earlier.attempt), "{} was redone", earlier.name);
    }
    // The rest by a's new run, on its second attempt (the node loss gave the lease back).
    let a_after = after.iter().find(|agent| agent.agent == "a").unwrap();
    let by_new = serde_json::json!(format!("a/{}", a_after.incarnation));
    let rest = finished.steps.iter().filter(|step| !committed_before.iter().any(|earlier| earlier.name == step.name));
    assert!(rest.clone().any(|step| step.result["by"] == by_new), "{finished:?}");
    assert_eq!(finished.attempts, 2, "{finished:?}");
    assert!(finished.last_error.as_deref().is_some_and(|error| error.contains("was lost")), "{finished:?}");
    // `hale nodes`: the lost node lost, the others up and heard from, each with its agents.
    let listed = admin.nodes().await.unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    for node in &listed {
        if node.name == lost {
            assert_eq!((node.status.as_str(), node.agents.len()), ("lost", 0), "{node:?}");
        } else {
            assert_eq!(node.status, "up", "{node:?}");
            assert!(node.last_heard_ms_ago.is_some_and(|ms| ms < 10_000), "{node:?}");
            let placed: Vec<String> = after
                .iter()
                .filter(|agent| node_of(agent) == Some(node.name.as_str()))
                .map(|agent| agent.agent.clone())
                .collect();
            assert_eq!(node.agents, placed, "{node:?}");
        }
    }
    assert_eq!(listed.iter().filter(|node| node.raft == "leader").count(), 1, "{listed:?}");
    // The metrics say the same, on the leader.
    let leader = listed.iter().find(|node| node.raft == "leader").unwrap();
    let leader_addr = addrs[leader.node_id as usize - 1].parse().unwrap();
    let (code, _, text) = support::http_as(leader_addr, Some(ADMIN), "GET", "/metrics", b"");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("hale_nodes{status=\"lost\"} 1") && text.contains("hale_nodes{status=\"up\"} 2"), "{text}");
    let moved_count = after.iter().filter(|agent| node_of(agent) == Some(leader.name.as_str())).count();
    assert!(text.contains(&format!("hale_node_agents{{node=\"{}\"}} {moved_count}", leader.name)), "{text}");
    let servers: Vec<String> = survivors.iter().map(|addr| format!("http://{addr}")).collect();
    let (code, out, err) = support::hale(&["nodes", "--server", &servers.join(",")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&lost) && out.contains("lost") && out.contains("LAST HEARD"), "{out}");
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
    // `hale check --live` finds it before it is started: against the cluster's nodes up.
    let config = dir.join("node1.toml");
    let server = format!("http://{}", addrs[0]);
    let (code, out, err) = support::hale(&["check", "-c", config.to_str().unwrap(), "--live", "--server", &server]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("agent \"gpu-worker\": no node that is up matches its placement")
            && err.contains("gpu")
            && err.contains("node-1 ["),
        "{err}"
    );
    // Without the placement it passes.
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, std::fs::read_to_string(&config).unwrap().replace("node_labels = { gpu = \"true\" }", ""))
        .unwrap();
    let (code, out, err) = support::hale(&["check", "-c", plain.to_str().unwrap(), "--live", "--server", &server]);
    assert_eq!(code, 0, "{out}{err}");
    for hale in nodes.iter_mut().filter_map(Option::take) {
        assert!(hale.terminate().success());
    }
}

/// Who is cut off from whom, for the [`Proxy`]s in front of the nodes.
#[derive(Default)]
struct Partition {
    /// The node cut off from the others (node-to-node traffic only).
    isolated: std::sync::Mutex<Option<u64>>,
    /// Bumped at every change: connections made before it are dropped.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl Partition {
    fn set(&self, isolated: Option<u64>) {
        *self.isolated.lock().unwrap() = isolated;
        self.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Whether node-to-node traffic from `from` to `to` is cut.
    fn cuts(&self, from: u64, to: u64) -> bool {
        let isolated = *self.isolated.lock().unwrap();
        isolated.is_some_and(|isolated| from != to && (from == isolated || to == isolated))
    }
}

/// A TCP proxy in front of node `node`: what its peers (and clients) reach it by. It reads
/// the first request head of each connection and, if it carries `x-hale-node: N` (a
/// node's own request: Raft, leases, reports) and the partition cuts N from this node,
/// drops the connection; otherwise it relays bytes both ways. Agents' and the CLI's
/// traffic carries no such header and always passes.
async fn proxy(node: u64, target: String, partition: Arc<Partition>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { continue };
            let (target, partition) = (target.clone(), partition.clone());
            tokio::spawn(async move {
                let mut epoch = partition.epoch.subscribe();
                epoch.borrow_and_update();
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < 65_536 {
                    match inbound.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let from = String::from_utf8_lossy(&head).lines().find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim().eq_ignore_ascii_case("x-hale-node").then(|| value.trim().parse::<u64>().ok())?
                });
                if from.is_some_and(|from| partition.cuts(from, node)) {
                    return;
                }
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                if outbound.write_all(&head).await.is_err() {
                    return;
                }
                // A node's connection is dropped when the partition changes, so that its next
                // request is looked at again.
                let relay = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                if from.is_some() {
                    tokio::select! {
                        _ = relay => {}
                        _ = epoch.changed() => {}
                    }
                } else {
                    let _ = relay.await;
                }
            });
        }
    });
    addr
}

/// One process of an agent as the record saw it: when it started (clock ticks since boot,
/// from /proc), the first and the last poll that saw it alive, and the first that did not.
#[derive(Clone, Debug)]
struct Seen {
    agent: String,
    incarnation: u64,
    node: u64,
    started: u64,
    first_seen: std::time::Instant,
    last_alive: std::time::Instant,
    gone: Option<std::time::Instant>,
}

/// Records every agent process of the nodes in `dir` by polling /proc every 20 ms, with
/// no help from hale: the start time is the kernel's, the end is bounded by the first
/// poll that no longer sees it.
fn record_processes(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Seen>> {
    std::thread::spawn(move || {
        let mut seen: std::collections::BTreeMap<(i32, u64), Seen> = std::collections::BTreeMap::new();
        let markers: Vec<(u64, String)> = (1..=3)
            .map(|id| {
                let data = data(&dir, id);
                std::fs::create_dir_all(&data).unwrap();
                (id, format!("HALE_SUPERVISOR={}", std::fs::canonicalize(&data).unwrap().display()))
            })
            .collect();
        while !stop.load(Ordering::SeqCst) {
            let now = std::time::Instant::now();
            let mut alive_now = std::collections::BTreeSet::new();
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
                let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
                let vars: Vec<&[u8]> = environ.split(|byte| *byte == 0).collect();
                let Some((node, _)) = markers.iter().find(|(_, marker)| vars.contains(&marker.as_bytes())) else {
                    continue;
                };
                let Some(started) = start_ticks(pid) else { continue };
                let var = |name: &str| {
                    vars.iter()
                        .find_map(|var| var.strip_prefix(name.as_bytes()))
                        .map(|value| String::from_utf8_lossy(value).into_owned())
                };
                let (Some(agent), Some(incarnation)) = (var("HALE_AGENT="), var("HALE_INCARNATION=")) else { continue };
                alive_now.insert((pid, started));
                let record = seen.entry((pid, started)).or_insert_with(|| Seen {
                    agent,
                    incarnation: incarnation.parse().unwrap_or(0),
                    node: *node,
                    started,
                    first_seen: now,
                    last_alive: now,
                    gone: None,
                });
                record.last_alive = now;
            }
            for (key, record) in seen.iter_mut() {
                if record.gone.is_none() && !alive_now.contains(key) {
                    record.gone = Some(now);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        seen.into_values().collect()
    })
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), if it
/// is alive and not a zombie.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Node `id`'s hale.toml for the partition test: advertised at its proxy.
fn config_behind(dir: &Path, id: u64, agents: &str, advertise: &str) -> PathBuf {
    let path = config(dir, id, agents);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("[cluster]\n", &format!("[cluster]\nadvertise = \"{advertise}\"\n"), 1))
        .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_stops_its_agents_before_they_start_elsewhere_and_after_the_heal_each_runs_once() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let _reaper = Reaper((1..=3).map(|id| data(&dir, id)).collect());
    let stop_recording = Arc::new(AtomicBool::new(false));
    let recording = record_processes(dir.clone(), stop_recording.clone());
    // Agents that stay when hale fences their run (as one stuck in a long call would):
    // only their node can stop them.
    let agents: String =
        AGENTS.iter().map(|name| demo_agent_with(name, &["--misbehave", "outlive-fence"], "")).collect();
    let partition = Arc::new(Partition::default());
    let (mut nodes, mut addrs) = (Vec::new(), Vec::new());
    for id in 1..=3u64 {
        let mut started = None;
        for _ in 0..20 {
            let listen = support::free_address();
            let advertise = proxy(id, listen.clone(), partition.clone()).await;
            let config = config_behind(&dir, id, &agents, &advertise);
            let mut command = Command::new(HALE);
            command.args(["up", "-c"]).arg(&config).arg("--data").arg(data(&dir, id)).args(["--listen", &listen]);
            match support::serve_with_command(command) {
                Ok(hale) => {
                    started = Some((hale, advertise));
                    break;
                }
                Err(stderr) if stderr.contains("Address already in use") => continue,
                Err(stderr) => panic!("node {id} did not start:\n{stderr}"),
            }
        }
        let (hale, advertise) = started.expect("a free port");
        nodes.push(Some(hale));
        addrs.push(advertise);
    }
    let (code, out, err) = support::hale(&["cluster", "init", "--server", &format!("http://{}", addrs[0])]);
    assert_eq!(code, 0, "{out}{err}");
    for at in 1..3 {
        let (code, out, err) =
            support::hale(&["cluster", "join", &addrs[0], "--server", &format!("http://{}", addrs[at])]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let admin = admin(&addrs);
    let before = all_placed_and_running(&admin).await;

    // Cut off the node that runs `a` (the leader or not).
    let cut = node_of(&before[0]).unwrap().to_string();
    let cut_id: u64 = cut.strip_prefix("node-").unwrap().parse().unwrap();
    let moved: Vec<&AgentSummary> = before.iter().filter(|agent| node_of(agent) == Some(cut.as_str())).collect();
    partition.set(Some(cut_id));
    let cut_at = std::time::Instant::now();
    let others: Vec<String> =
        addrs.iter().enumerate().filter(|(at, _)| *at as u64 + 1 != cut_id).map(|(_, addr)| addr.clone()).collect();
    let admin = self::admin(&others);
    support::eventually("the cut-off node's agents running on the others", 90, || async {
        let listed = admin.agents().await.ok()?;
        moved
            .iter()
            .all(|was| {
                listed
                    .iter()
                    .any(|now| now.agent == was.agent && node_of(now).is_some_and(|node| node != cut) && running(now))
            })
            .then_some(())
    })
    .await;
    // Within its lease the cut-off node stopped them: nothing of it runs any more.
    assert!(agents_of(&data(&dir, cut_id)).is_empty(), "{cut} still runs agents after its lease");
    let moved_after = cut_at.elapsed();

    // Heal; the node comes back, catches up and runs nothing the log places elsewhere.
    partition.set(None);
    let all = self::admin(&addrs);
    let servers: Vec<String> = addrs.iter().map(|addr| format!("http://{addr}")).collect();
    let servers = servers.join(",");
    support::eventually("the healed node up again", 60, || async {
        let (code, out, _) = support::hale(&["events", "--kind", "node_joined", "--server", &servers]);
        (code == 0 && out.lines().filter(|line| line.contains(&format!("node {cut} ("))).count() >= 2).then_some(())
    })
    .await;
    let after = support::eventually("every agent running once", 60, || async {
        let listed = all.agents().await.ok()?;
        (listed.len() == AGENTS.len() && listed.iter().all(running)).then_some(listed)
    })
    .await;
    for now in &after {
        let id: u64 = node_of(now).unwrap().strip_prefix("node-").unwrap().parse().unwrap();
        let processes: Vec<u64> = (1..=3)
            .flat_map(|node| agents_of(&data(&dir, node)).into_iter().map(move |(_, name)| (node, name)))
            .filter(|(_, name)| *name == now.agent)
            .map(|(node, _)| node)
            .collect();
        assert_eq!(processes, [id], "{}: one process, on the node the log says", now.agent);
    }

    stop_recording.store(true, Ordering::SeqCst);
    let record = recording.join().unwrap();
    // From the record alone: no two processes of one agent alive at the same time. Every
    // poll (20 ms apart) sees each live process, so two lives that overlapped by more than
    // a poll would have been seen together by one; the fencing argument leaves seconds
    // between them.
    for agent in AGENTS {
        let mut lives: Vec<&Seen> = record.iter().filter(|seen| seen.agent == agent).collect();
        lives.sort_by_key(|seen| (seen.first_seen, seen.started));
        assert!(!lives.is_empty(), "{agent} never seen");
        for pair in lives.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            assert!(
                next.first_seen > first.last_alive,
                "{agent}: incarnation {} on node-{} and incarnation {} on node-{} were seen alive at once",
                first.incarnation,
                first.node,
                next.incarnation,
                next.node
            );
        }
    }
    let cut_lives: Vec<&Seen> = record.iter().filter(|seen| seen.node == cut_id && seen.gone.is_some()).collect();
    assert!(!cut_lives.is_empty(), "the cut-off node's agents were seen and seen to end");
    eprintln!("moved after {moved_after:?}; processes recorded: {}", record.len());
    for hale in nodes.iter_mut().filter_map(Option::take) {
        match hale.terminate_within(std::time::Duration::from_secs(30)) {
            Ok(status) => assert!(status.success()),
            Err(stderr) => panic!("a node did not stop within 30 s of SIGTERM:\n{stderr}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_hale_restarts_within_its_lease_adopts_the_agents_it_still_runs() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let _reaper = Reaper((1..=3).map(|id| data(dir, id)).collect());
    // `b` runs on node-2 only: the node whose hale is killed.
    let agents = format!("{}{}", demo_agent("a", ""), demo_agent("b", "nodes = [\"node-2\"]"));
    let (mut nodes, addrs) = cluster(dir, 3, &agents);
    let admin = admin(&addrs);
    let b_of = |listed: Vec<AgentSummary>| listed.into_iter().find(|agent| agent.agent == "b");
    let before = support::eventually("b running on node-2 and checkpointing", 60, || async {
        let b = b_of(admin.agents().await.ok()?)?;
        (node_of(&b) == Some("node-2") && running(&b) && b.version >= 3).then_some(b)
    })
    .await;
    let pid = before.managed.as_ref().and_then(|managed| managed.pid).unwrap();

    // Only hale dies; b's process lives on and hale comes back on the same address.
    nodes[1].take().unwrap().kill();
    assert!(alive(pid as i32), "b died with its node's hale");
    let config = dir.join("node2.toml");
    let mut command = Command::new(HALE);
    command.args(["up", "-c"]).arg(&config).arg("--data").arg(data(dir, 2)).args(["--listen", &addrs[1]]);
    nodes[1] = Some(support::serve_with_command(command).expect("node 2 back on its address"));

    // The same process, the same run: adopted, not restarted, and still checkpointing.
    let after = support::eventually("b adopted and checkpointing further", 60, || async {
        let b = b_of(admin.agents().await.ok()?)?;
        (running(&b) && b.version > before.version + 3).then_some(b)
    })
    .await;
    assert_eq!(
        (after.incarnation, after.managed.as_ref().and_then(|managed| managed.pid)),
        (before.incarnation, Some(pid)),
        "{after:?}"
    );
    assert_eq!(agents_of(&data(dir, 2)).into_iter().filter(|(_, name)| name == "b").count(), 1);
    let stderr = nodes[1].as_ref().unwrap().stderr();
    assert!(!stderr.contains("killing a process this node no longer runs"), "{stderr}");
    for hale in nodes.iter_mut().filter_map(Option::take) {
        match hale.terminate_within(std::time::Duration::from_secs(30)) {
            Ok(status) => assert!(status.success()),
            Err(stderr) => panic!("a node did not stop within 30 s of SIGTERM:\n{stderr}"),
        }
    }
}

/// The state letter of `/proc/PID/stat` (`T` stopped, `S` sleeping, `R` running…).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_pause_stops_an_agent_on_its_node_and_release_resumes_it() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let _reaper = Reaper(vec![data(dir, 1)]);
    let agents = format!("[supervision.quarantine]\naction = \"pause\"\n{}", demo_agent("a", ""));
    let (mut nodes, addrs) = cluster(dir, 1, &agents);
    let admin = admin(&addrs);
    let pid = support::eventually("a running on node-1", 60, || async {
        let a = admin.agents().await.ok()?.into_iter().find(|agent| agent.agent == "a")?;
        (running(&a) && a.version >= 3).then_some(a.managed?.pid?)
    })
    .await;
    admin.quarantine("a", "spent on a forbidden tool").await.unwrap();
    support::eventually("its process stopped", 20, || async { (process_state(pid) == Some('T')).then_some(()) }).await;
    admin.release("a").await.unwrap();
    support::eventually("its process running again", 20, || async { (process_state(pid) != Some('T')).then_some(()) })
        .await;
    // The same run goes on.
    let before = admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == "a").unwrap();
    support::eventually("a checkpointing again as the same run", 30, || async {
        let a = admin.agents().await.ok()?.into_iter().find(|agent| agent.agent == "a")?;
        (a.incarnation == before.incarnation && a.version > before.version).then_some(())
    })
    .await;
    for hale in nodes.iter_mut().filter_map(Option::take) {
        assert!(hale.terminate().success());
    }
}
