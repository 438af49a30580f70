//! `failover`: three `hale serve` processes on loopback, the leader SIGKILLed; time from
//! the kill until a write is acknowledged by the new leader, and whether any acknowledged
//! write went missing. At the default Raft timeouts and at tuned ones, and, in the same
//! run and the same shape, etcd (if an `etcd` binary is on the PATH or given with
//! `--etcd`) at its defaults and at the tuned timeouts.
//!
//! Each trial starts a fresh cluster (fresh data directories), writes five values through
//! the leader, SIGKILLs it, and then starts a write on each survivor every 10 ms (each
//! with its own 500 ms timeout, in parallel, so a write that hangs while there is no
//! leader does not hold the clock) until one is acknowledged: the figure is the time of
//! that first acknowledgement. Then every acknowledged write is read back from the new
//! leader; `lost` counts those missing. hale's writes are checkpoints that each set a key
//! of their own; etcd's are puts through its HTTP gateway. Resolution: 10 ms.

use super::{BenchArgs, micros, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(10);
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a trial may wait for a leader (to form, or after the kill).
const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "bench-failover-admin-token-0123";
const SECRET: &str = "bench-failover-cluster-secret-0123456789";
/// The tuned timeouts, the same for hale and etcd: 20 ms heartbeats and a 100 ms
/// election timeout (hale draws from 100–200 ms; etcd from 1–2× its `--election-timeout`).
const TUNED: (u64, u64, u64) = (20, 100, 200);

/// One kind of cluster under test.
#[derive(Clone, Copy)]
enum System {
    /// hale at these timeouts (heartbeat, election min, election max), `None`: defaults.
    Hale(Option<(u64, u64, u64)>),
    /// etcd at (heartbeat, election timeout), `None`: its defaults.
    Etcd(Option<(u64, u64)>),
}

pub(super) async fn failover(args: &BenchArgs) -> Result<Value> {
    let trials = args.trials.unwrap_or(20).max(1);
    let etcd = args.etcd.clone().or_else(|| which("etcd"));
    let mut runs = vec![("hale-default", System::Hale(None)), ("hale-tuned", System::Hale(Some(TUNED)))];
    if etcd.is_some() {
        runs.push(("etcd-default", System::Etcd(None)));
        runs.push(("etcd-tuned", System::Etcd(Some((TUNED.0, TUNED.1)))));
    }
    let hale = std::env::current_exe().context("finding this hale binary")?;
    let client = reqwest::Client::builder().timeout(WRITE_TIMEOUT).build()?;
    let mut results = Vec::new();
    for (name, system) in runs {
        let mut samples = Vec::with_capacity(trials);
        let mut lost = 0;
        for trial in 1..=trials {
            let dir = temp_dir(args)?;
            let outcome = match system {
                System::Hale(timeouts) => hale_trial(&hale, dir.path(), timeouts, &client).await,
                System::Etcd(timeouts) => {
                    etcd_trial(etcd.as_deref().expect("checked"), dir.path(), timeouts, &client, trial).await
                }
            };
            let (elapsed, missing) = outcome.with_context(|| format!("{name}, trial {trial}"))?;
            eprintln!("failover {name}: trial {trial}: {} ms, {missing} lost", elapsed.as_millis());
            samples.push(micros(elapsed));
            lost += missing;
        }
        let mut result = json!({ "scenario": name, "trials": trials, "lost": lost });
        let summary = summary_ms(&mut samples);
        for field in ["p50_ms", "p99_ms", "max_ms"] {
            result[field] = summary[field].clone();
        }
        result["timeouts"] = match system {
            System::Hale(None) => json!("hale's defaults: 100 ms heartbeats, 500-1000 ms elections"),
            System::Hale(Some((heartbeat, min, max))) => {
                json!(format!("{heartbeat} ms heartbeats, {min}-{max} ms elections"))
            }
            System::Etcd(None) => json!("etcd's defaults: 100 ms heartbeats, 1000-2000 ms elections"),
            System::Etcd(Some((heartbeat, election))) => {
                json!(format!("{heartbeat} ms heartbeats, {election}-{} ms elections", 2 * election))
            }
        };
        results.push(result);
    }
    let mut top = results[0].clone();
    top["scenario"] = json!("failover");
    top["method"] = json!(
        "3 nodes on loopback, fresh data each trial, the leader SIGKILLed; time to the first write acknowledged by a survivor (a write started on each survivor every 10 ms); lost = acknowledged writes missing afterwards"
    );
    top["runs"] = Value::Array(results);
    if etcd.is_none() {
        top["etcd"] =
            json!("not measured: no etcd binary on the PATH (Debian: apt-get install etcd-server; or --etcd PATH)");
    }
    Ok(top)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(name)).find(|path| path.is_file())
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Children killed (SIGKILL) when dropped, whatever happened.
struct Processes(Vec<Option<Child>>);

impl Processes {
    /// SIGKILLs the process at `at` and reaps it.
    fn sigkill(&mut self, at: usize) -> Result<()> {
        let mut child = self.0[at].take().context("that process was stopped already")?;
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a write on each of `targets` every [`POLL`] until one is acknowledged; returns
/// the time from `killed` to the first acknowledgement and every key acknowledged (all
/// writes in flight are waited for, so none is acknowledged unseen).
async fn first_acknowledged<F, Fut>(targets: &[String], killed: Instant, write: F) -> Result<(Duration, Vec<String>)>
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let acked: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let mut writes = tokio::task::JoinSet::new();
    let mut sequence = 0u64;
    while acked.lock().expect("acked lock").is_empty() {
        if killed.elapsed() > DEADLINE {
            bail!("no write was acknowledged within {} s of the kill", DEADLINE.as_secs());
        }
        for target in targets {
            sequence += 1;
            let key = format!("post-{sequence}");
            let (done, acked) = (write(target.clone(), key.clone()), acked.clone());
            writes.spawn(async move {
                if done.await {
                    acked.lock().expect("acked lock").push((Instant::now(), key));
                }
            });
        }
        tokio::time::sleep(POLL).await;
    }
    while writes.join_next().await.is_some() {}
    let acked = std::mem::take(&mut *acked.lock().expect("acked lock"));
    let first = acked.iter().map(|(at, _)| *at).min().expect("one at least");
    Ok((first.saturating_duration_since(killed), acked.into_iter().map(|(_, key)| key).collect()))
}

async fn wait_for<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    check: impl FnMut() -> Fut,
) -> Result<T> {
    super::poll_until(what, Duration::from_millis(20), DEADLINE, check).await
}

async fn hale_trial(
    hale: &Path,
    dir: &Path,
    timeouts: Option<(u64, u64, u64)>,
    client: &reqwest::Client,
) -> Result<(Duration, u64)> {
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, SECRET)?;
    let mut processes = Processes(Vec::new());
    let mut addrs = Vec::new();
    for id in 1..=3u64 {
        let timing = timeouts.map_or(String::new(), |(heartbeat, min, max)| {
            format!("heartbeat_ms = {heartbeat}\nelection_min_ms = {min}\nelection_max_ms = {max}\n")
        });
        let config = dir.join(format!("node{id}.toml"));
        std::fs::write(
            &config,
            format!("[cluster]\nnode_id = {id}\nsecret_file = {:?}\n{timing}", secret.display().to_string()),
        )?;
        let (child, addr) = start_hale(hale, &config, &dir.join(format!("data{id}")))?;
        processes.0.push(Some(child));
        addrs.push(addr);
    }
    let admin = |addr: &str| hale_client::Admin::new(&format!("http://{addr}")).with_token(TOKEN);
    admin(&addrs[0]).cluster_init().await?;
    for addr in &addrs[1..] {
        admin(addr).cluster_join(&addrs[0]).await?;
    }
    let leader = wait_for("leader", || async {
        let info = admin(&addrs[0]).cluster().await.ok()?;
        let voters = info.members.iter().filter(|member| member.voter).count();
        (info.role == "leader" && voters == 3).then_some(0usize)
    })
    .await?;
    let post = |addr: String, path: String, body: Value| {
        let client = client.clone();
        async move {
            let sent = client.post(format!("http://{addr}{path}")).bearer_auth(TOKEN).json(&body).send().await;
            sent.is_ok_and(|answer| answer.status().is_success())
        }
    };
    let hello = json!({"role": "bench"});
    wait_for("hello answered", || {
        let hello = post(addrs[leader].clone(), "/v1/agents/bench/hello".into(), hello.clone());
        async move { hello.await.then_some(()) }
    })
    .await?;
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for n in 0..5 {
        let key = format!("pre-{n}");
        let body = json!({"incarnation": 1, "patch": {key.as_str(): true}});
        if !post(addrs[leader].clone(), "/v1/agents/bench/checkpoint".into(), body).await {
            bail!("a checkpoint before the kill was refused");
        }
        expected.insert(key);
    }
    processes.sigkill(leader)?;
    let killed = Instant::now();
    let survivors: Vec<String> =
        addrs.iter().enumerate().filter(|(at, _)| *at != leader).map(|(_, addr)| addr.clone()).collect();
    let (elapsed, acked) = first_acknowledged(&survivors, killed, |addr, key| {
        post(addr, "/v1/agents/bench/checkpoint".into(), json!({"incarnation": 1, "patch": {key.as_str(): true}}))
    })
    .await?;
    expected.extend(acked);
    let everyone = survivors.iter().map(|addr| format!("http://{addr}")).collect::<Vec<_>>().join(",");
    let state = hale_client::Admin::new(&everyone).with_token(TOKEN).state("bench", None).await?;
    let lost = expected.iter().filter(|key| state.state.get(key.as_str()) != Some(&json!(true))).count() as u64;
    Ok((elapsed, lost))
}

/// Starts `hale serve` with `config` on a free port (another if it was taken meanwhile).
fn start_hale(hale: &Path, config: &Path, data: &Path) -> Result<(Child, String)> {
    start_node(hale, "serve", config, data, TOKEN)
}

/// Starts `hale SUBCOMMAND` (`serve` or `up`) with `config` and `token` as its admin token
/// on a free loopback port (another if it was taken meanwhile); the child and its address.
pub(super) fn start_node(
    hale: &Path,
    subcommand: &str,
    config: &Path,
    data: &Path,
    token: &str,
) -> Result<(Child, String)> {
    use std::io::BufRead;
    for _ in 0..20 {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut child = Command::new(hale)
            .args([subcommand, "-c"])
            .arg(config)
            .arg("--data")
            .arg(data)
            .args(["--listen", &addr])
            .env("HALE_ADMIN_TOKEN", token)
            .env("HALE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.starts_with("hale listening on ") {
            return Ok((child, addr));
        }
        let _ = child.wait();
    }
    bail!("hale did not start on a free loopback port in 20 tries")
}

async fn etcd_trial(
    etcd: &Path,
    dir: &Path,
    timeouts: Option<(u64, u64)>,
    client: &reqwest::Client,
    trial: usize,
) -> Result<(Duration, u64)> {
    use base64::Engine as _;
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let members: Vec<(String, String)> = (0..3)
        .map(|_| Ok((format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?))))
        .collect::<Result<_>>()?;
    let initial =
        members.iter().enumerate().map(|(at, (_, peer))| format!("n{at}=http://{peer}")).collect::<Vec<_>>().join(",");
    let mut processes = Processes(Vec::new());
    for (at, (client_addr, peer)) in members.iter().enumerate() {
        let mut command = Command::new(etcd);
        command
            .args(["--name", &format!("n{at}")])
            .arg("--data-dir")
            .arg(dir.join(format!("n{at}")))
            .args(["--listen-client-urls", &format!("http://{client_addr}")])
            .args(["--advertise-client-urls", &format!("http://{client_addr}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &format!("bench-{}-{trial}", std::process::id())])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((heartbeat, election)) = timeouts {
            command.args(["--heartbeat-interval", &heartbeat.to_string(), "--election-timeout", &election.to_string()]);
        }
        processes.0.push(Some(command.spawn().with_context(|| format!("starting {}", etcd.display()))?));
    }
    let call = |addr: String, path: &'static str, body: Value| {
        let client = client.clone();
        async move {
            let answer = client.post(format!("http://{addr}{path}")).json(&body).send().await.ok()?;
            if !answer.status().is_success() {
                return None;
            }
            answer.json::<Value>().await.ok()
        }
    };
    // The member all three agree leads.
    let leader = wait_for("etcd leader", || async {
        let mut seen = Vec::new();
        for (addr, _) in &members {
            let status = call(addr.clone(), "/v3/maintenance/status", json!({})).await?;
            seen.push((status["header"]["member_id"].as_str()?.to_string(), status["leader"].as_str()?.to_string()));
        }
        let lead = &seen[0].1;
        if seen.iter().any(|(_, leader)| leader != lead) {
            return None;
        }
        seen.iter().position(|(id, _)| id == lead)
    })
    .await?;
    let put = |addr: String, key: String| {
        let request = call(addr, "/v3/kv/put", json!({"key": b64(&key), "value": b64(&key)}));
        async move { request.await.is_some_and(|answer| answer.get("header").is_some()) }
    };
    let mut expected = Vec::new();
    for n in 0..5 {
        let key = format!("pre-{n}");
        if !put(members[leader].0.clone(), key.clone()).await {
            bail!("a put before the kill failed");
        }
        expected.push(key);
    }
    processes.sigkill(leader)?;
    let killed = Instant::now();
    let survivors: Vec<String> =
        members.iter().enumerate().filter(|(at, _)| *at != leader).map(|(_, (addr, _))| addr.clone()).collect();
    let (elapsed, acked) = first_acknowledged(&survivors, killed, put).await?;
    expected.extend(acked);
    let mut lost = 0;
    for key in &expected {
        let found = call(survivors[0].clone(), "/v3/kv/range", json!({"key": b64(key)})).await;
        let value = found.as_ref().and_then(|found| found["kvs"][0]["value"].as_str().map(str::to_string));
        if value.as_deref() != Some(b64(key).as_str()) {
            lost += 1;
        }
    }
    Ok((elapsed, lost))
}
