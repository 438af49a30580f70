//! `node-loss`: three `hale up` nodes on loopback at the default timeouts, a node running N
//! agents (`hale demo-agent`, N = 10 and 100) SIGKILLed together with its agents' process
//! groups, as when its machine is lost; the time from the kill until every one of its
//! agents runs on another node: placed there, its process started, its session attached
//! and its state resumed (a newer incarnation, at least at the version it had).
//!
//! Each trial starts a fresh cluster: node 1 alone first (so every agent is placed on it),
//! then nodes 2 and 3 join; node 1, which also leads, is the one lost. So the time includes
//! a Raft election before the node timeout (1.2 node leases, 3.6 s at the defaults) runs.
//! `ran_twice` counts agents seen with two live processes at once by a poll of /proc every
//! 20 ms (from the processes' environment, not from hale's view). Resolution: 20 ms.

use super::{BenchArgs, micros, summary_ms, temp_dir};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-node-loss-admin-token-0123";
const SECRET: &str = "bench-node-loss-cluster-secret-0123456789";
/// How long a trial may wait for a step (the agents up, the nodes joined, the recovery).
const DEADLINE: Duration = Duration::from_secs(120);
const SIZES: [usize; 2] = [10, 100];

pub(super) async fn node_loss(args: &BenchArgs) -> Result<Value> {
    let trials = args.trials.unwrap_or(5).max(1);
    let hale = std::env::current_exe().context("finding this hale binary")?;
    let mut runs = Vec::new();
    for agents in SIZES {
        let mut samples = Vec::with_capacity(trials);
        let (mut ran_twice, mut state_lost) = (0, 0);
        for trial in 1..=trials {
            let dir = temp_dir(args)?;
            let outcome =
                trial_of(&hale, dir.path(), agents).await.with_context(|| format!("{agents} agents, trial {trial}"))?;
            eprintln!(
                "node-loss {agents} agents: trial {trial}: {} ms, {} ran twice, {} lost state",
                outcome.elapsed.as_millis(),
                outcome.ran_twice,
                outcome.state_lost
            );
            samples.push(micros(outcome.elapsed));
            ran_twice += outcome.ran_twice;
            state_lost += outcome.state_lost;
        }
        let mut run = json!({ "agents": agents, "trials": trials, "ran_twice": ran_twice, "state_lost": state_lost });
        let summary = summary_ms(&mut samples);
        for field in ["p50_ms", "p99_ms", "max_ms"] {
            run[field] = summary[field].clone();
        }
        runs.push(run);
    }
    let mut top = runs.last().cloned().unwrap_or_default();
    top["scenario"] = json!("node-loss");
    top["ran_twice"] = json!(runs.iter().map(|run| run["ran_twice"].as_u64().unwrap_or(0)).sum::<u64>());
    top["method"] = json!(
        "3 hale up nodes on loopback at the default timeouts (node lease 3 s: lost after 3.6 s), fresh data each trial; every agent placed on node 1 (the leader), which is SIGKILLed with its agents' process groups; time until every one of them runs on another node, attached, with its state resumed; ran_twice from a 20 ms poll of /proc"
    );
    top["runs"] = Value::Array(runs);
    Ok(top)
}

struct Outcome {
    elapsed: Duration,
    ran_twice: u64,
    state_lost: u64,
}

/// `hale up` processes, stopped with SIGTERM (so they stop their agents) when dropped,
/// and SIGKILLed if they take longer than 30 s.
struct Nodes(Vec<Option<Child>>);

impl Nodes {
    fn sigkill(&mut self, at: usize) -> Result<()> {
        let mut child = self.0[at].take().context("that node was stopped already")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(child.id() as i32).expect("a child's pid"),
                rustix::process::Signal::TERM,
            );
        }
        for child in self.0.iter_mut().flatten() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Node `id`'s hale.toml with `agents` demo agents.
fn config(dir: &Path, id: u64, agents: usize, hale: &Path) -> Result<std::path::PathBuf> {
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, SECRET)?;
    let mut text = format!(
        "[cluster]\nnode_id = {id}\nsecret_file = {:?}\n\n[supervision]\nstop_grace_ms = 1000\n",
        secret.display().to_string()
    );
    for n in 1..=agents {
        let name = format!("agent-{n}");
        text.push_str(&format!(
            "\n[[agent]]\nname = \"{name}\"\ncommand = {:?}\nargs = [\"demo-agent\", \"{name}\", \"--step-ms\", \"1000\"]\nrestart = \"always\"\n",
            hale.display().to_string()
        ));
    }
    let path = dir.join(format!("node{id}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts `hale up` for node `id` on a free loopback port; its child and its address.
fn start(hale: &Path, dir: &Path, id: u64, agents: usize) -> Result<(Child, String)> {
    let config = config(dir, id, agents, hale)?;
    super::failover::start_node(hale, "up", &config, &dir.join(format!("data{id}")), TOKEN)
}

async fn until<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    every: Duration,
    check: impl FnMut() -> Fut,
) -> Result<T> {
    super::poll_until(what, every, DEADLINE, check).await
}

fn admin(addrs: &[String]) -> hale_client::Admin {
    let urls: Vec<String> = addrs.iter().map(|addr| format!("http://{addr}")).collect();
    hale_client::Admin::new(&urls.join(",")).with_token(TOKEN)
}

/// The data directory marker of node `id`'s agents (`HALE_SUPERVISOR`).
fn marker(dir: &Path, id: u64) -> String {
    let data = dir.join(format!("data{id}"));
    std::fs::canonicalize(&data).unwrap_or(data).to_string_lossy().into_owned()
}

/// Polls /proc every 20 ms until `stop`; returns the agents seen with two live processes
/// (of different incarnations or pids) in one poll.
fn watch_twice(markers: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<BTreeSet<String>> {
    std::thread::spawn(move || {
        let mut twice = BTreeSet::new();
        while !stop.load(Ordering::SeqCst) {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for marker in &markers {
                for found in hale_server::process::find_agents(marker) {
                    *seen.entry(found.agent).or_default() += 1;
                }
            }
            twice.extend(seen.into_iter().filter(|(_, count)| *count > 1).map(|(agent, _)| agent));
            std::thread::sleep(Duration::from_millis(20));
        }
        twice
    })
}

async fn trial_of(hale: &Path, dir: &Path, agents: usize) -> Result<Outcome> {
    let mut nodes = Nodes(Vec::new());
    let mut addrs = Vec::new();
    let (first, addr) = start(hale, dir, 1, agents)?;
    nodes.0.push(Some(first));
    addrs.push(addr);
    hale_client::Admin::new(&format!("http://{}", addrs[0])).with_token(TOKEN).cluster_init().await?;
    let one = admin(&addrs);
    let running = |agent: &hale_client::AgentSummary| {
        agent.attached && agent.managed.as_ref().is_some_and(|managed| managed.status == "running")
    };
    let node_of = |agent: &hale_client::AgentSummary| agent.managed.as_ref().and_then(|managed| managed.node.clone());
    until("every agent running on node 1", Duration::from_millis(200), || async {
        let listed = one.agents().await.ok()?;
        let ready = listed.len() == agents
            && listed.iter().all(|agent| running(agent) && node_of(agent).as_deref() == Some("node-1"));
        ready.then_some(())
    })
    .await?;
    for id in 2..=3 {
        let (child, addr) = start(hale, dir, id, agents)?;
        nodes.0.push(Some(child));
        hale_client::Admin::new(&format!("http://{addr}")).with_token(TOKEN).cluster_join(&addrs[0]).await?;
        addrs.push(addr);
    }
    let all = admin(&addrs);
    until("three nodes up", Duration::from_millis(100), || async {
        let listed = all.nodes().await.ok()?;
        (listed.iter().filter(|node| node.status == "up").count() == 3).then_some(())
    })
    .await?;
    let before: BTreeMap<String, u64> =
        all.agents().await?.into_iter().map(|agent| (agent.agent.clone(), agent.version)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let watching = watch_twice((1..=3).map(|id| marker(dir, id)).collect(), stop.clone());
    let victims = hale_server::process::find_agents(&marker(dir, 1));
    nodes.sigkill(0)?;
    let killed = Instant::now();
    for victim in &victims {
        let _ = hale_server::process::signal_group(victim.id.pid, hale_server::process::Signal::KILL);
    }
    let survivors = admin(&addrs[1..]);
    let after = until("every agent running on another node", Duration::from_millis(20), || async {
        let listed = survivors.agents().await.ok()?;
        let moved = listed.len() == agents
            && listed.iter().all(|agent| {
                running(agent) && node_of(agent).is_some_and(|node| node != "node-1") && agent.incarnation >= 2
            });
        moved.then_some(listed)
    })
    .await?;
    let elapsed = killed.elapsed();
    stop.store(true, Ordering::SeqCst);
    let twice = watching.join().unwrap_or_default();
    let state_lost =
        after.iter().filter(|agent| before.get(&agent.agent).is_some_and(|was| agent.version < *was)).count() as u64;
    drop(nodes);
    // Whatever the nodes left (nothing, when they stop as they should).
    for id in 1..=3 {
        for found in hale_server::process::find_agents(&marker(dir, id)) {
            let _ = hale_server::process::signal_group(found.id.pid, hale_server::process::Signal::KILL);
        }
    }
    Ok(Outcome { elapsed, ran_twice: twice.len() as u64, state_lost })
}
