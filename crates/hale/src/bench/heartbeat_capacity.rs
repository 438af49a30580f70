//! `heartbeat-capacity`: how many attached agents, each beating once a second, one hale
//! holds before heartbeat handling falls behind.
//!
//! hale runs in this process. The load grows in steps (`--capacity-steps`); at each step
//! every agent beats at 1 Hz from a random phase, and for `--capacity-seconds` the bench
//! counts answered beats and their round trips. A step *keeps up* when at least 95% of
//! the offered beats were answered and their p99 round trip is under 250 ms (a beat late
//! by more than a quarter of its interval starts to look like a dying agent to the
//! detector). `agents` is the largest step that kept up.
//!
//! Two transports, both measured: `engine` calls the server's engine in-process (every
//! beat through the engine's queue, the phi detector and a tick over every watched run
//! every 50 ms; no sockets), and `websocket` drives real sessions over loopback, one
//! connection each, as far as this process's open-file limit allows (each session costs
//! two descriptors here, client and server side).

use super::{BenchArgs, machine, micros, summary_ms, temp_dir};
use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hale_core::{AgentCommand, AgentName, Hello, RoleName};
use hale_server::ServerConfig;
use hale_server::engine::{Engine, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// A step keeps up if at least this share of offered beats was answered…
const ANSWERED_MIN: f64 = 0.95;
/// …and 99% of them within this.
const P99_MAX: Duration = Duration::from_millis(250);
const BEAT: Duration = Duration::from_secs(1);

/// Round trips of one step, shared by every agent's beat loop.
#[derive(Default)]
struct Samples {
    answered: AtomicU64,
    failed: AtomicU64,
    round_trips_us: std::sync::Mutex<Vec<u32>>,
    recording: AtomicBool,
}

impl Samples {
    fn record(&self, round_trip: Duration) {
        if self.recording.load(Ordering::Relaxed) {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.round_trips_us.lock().expect("samples lock").push(micros(round_trip));
        }
    }

    fn fail(&self) {
        if self.recording.load(Ordering::Relaxed) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn start(&self) {
        self.answered.store(0, Ordering::Relaxed);
        self.failed.store(0, Ordering::Relaxed);
        self.round_trips_us.lock().expect("samples lock").clear();
        self.recording.store(true, Ordering::Relaxed);
    }
}

pub(super) async fn heartbeat_capacity(args: &BenchArgs) -> Result<Value> {
    let steps = parse_steps(&args.capacity_steps)?;
    let seconds = args.capacity_seconds;
    if seconds < 1.0 {
        bail!("--capacity-seconds must be at least 1");
    }
    let fd_limit = raise_fd_limit();
    eprintln!("heartbeat-capacity: steps {steps:?}, {seconds} s measured per step, open-file limit {fd_limit}");
    let engine = measure(args, &steps, seconds, Transport::Engine).await?;
    // Each session: the client's socket and the server's, plus a margin for the rest.
    let websocket_max = (fd_limit.saturating_sub(256) / 2) as usize;
    let websocket_steps: Vec<usize> = steps.iter().copied().filter(|step| *step <= websocket_max).collect();
    let websocket = measure(args, &websocket_steps, seconds, Transport::Websocket).await?;
    Ok(json!({
        "scenario": "heartbeat-capacity",
        "agents": engine["agents"],
        "websocket_agents": websocket["agents"],
        "engine": engine,
        "websocket": websocket,
        "open_file_limit": fd_limit,
        "websocket_max_here": websocket_max,
        "how": format!(
            "hale runs in this process with the bench's agents. Steps of {steps:?} agents; at each, every agent \
             beats once a second from a random phase and, after 2 s of warm-up, for {seconds} s the bench counts \
             answered beats and their round trips. A step keeps up if ≥ {:.0}% of offered beats were answered and \
             p99 < {} ms; agents = the largest step that kept up. `agents` is the engine transport (each beat \
             through the engine's queue, Core::heartbeat and its phi detector, and the 50 ms tick over every \
             watched run; no sockets). `websocket_agents`: real sessions over loopback (hello, then heartbeat \
             frames answered with heartbeat_ack), limited here by the open-file limit ({fd_limit}, two \
             descriptors per session in one process: at most {websocket_max}); steps above it were not run. \
             Agents register with a logged hello before measuring; beats are not logged (the first of each run \
             is). Both transports share this machine's cores with the load generator.",
            ANSWERED_MIN * 100.0,
            P99_MAX.as_millis()
        ),
        "machine": machine(),
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Engine,
    Websocket,
}

async fn measure(args: &BenchArgs, steps: &[usize], seconds: f64, transport: Transport) -> Result<Value> {
    let dir = temp_dir(args)?;
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    config.connections.max = config.connections.max.max(steps.last().copied().unwrap_or(0) + 64);
    // Every session comes from loopback here.
    config.connections.per_address_max = config.connections.max;
    let server = hale_server::start(config).await?;
    let url = format!("ws://{}", server.local_addr());
    let token = server.admin_token().to_string();
    let engine = server.engine().clone();
    let samples = Arc::new(Samples::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut beaters = tokio::task::JoinSet::new();
    let mut results = Vec::new();
    let mut kept_up = 0usize;
    let run = std::process::id();
    let mut started_agents = 0usize;
    for &step in steps {
        // Bring the agents up to `step`, a few hundred at a time.
        let connecting = Instant::now();
        while started_agents < step {
            let batch = (step - started_agents).min(500);
            let mut joining = tokio::task::JoinSet::new();
            for index in started_agents..started_agents + batch {
                let name = format!("beat-{run}-{index}");
                let (engine, url, token) = (engine.clone(), url.clone(), token.clone());
                joining.spawn(async move {
                    match transport {
                        Transport::Engine => register(&engine, &name).await.map(Beater::Engine),
                        Transport::Websocket => {
                            connect(&url, &token, &name).await.map(|socket| Beater::Socket(Box::new(socket)))
                        }
                    }
                });
            }
            while let Some(joined) = joining.join_next().await {
                let beater = joined.context("an agent's start panicked")??;
                let (samples, stop) = (samples.clone(), stop.clone());
                beaters.spawn(beat(beater, samples, stop));
            }
            started_agents += batch;
        }
        let connect_s = connecting.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        samples.start();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        samples.recording.store(false, Ordering::Relaxed);
        let answered = samples.answered.load(Ordering::Relaxed);
        let failed = samples.failed.load(Ordering::Relaxed);
        let mut round_trips = std::mem::take(&mut *samples.round_trips_us.lock().expect("samples lock"));
        let offered = step as f64 * seconds;
        let share = answered as f64 / offered;
        let latency = summary_ms(&mut round_trips);
        let p99_ms = latency["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let keeps_up = share >= ANSWERED_MIN && p99_ms < P99_MAX.as_secs_f64() * 1000.0 && failed == 0;
        eprintln!(
            "heartbeat-capacity ({transport:?}): {step} agents: {answered} beats answered of ~{offered:.0} offered \
             ({:.1}%), p50 {} ms, p99 {} ms, {failed} failed: {}",
            share * 100.0,
            latency["p50_ms"],
            latency["p99_ms"],
            if keeps_up { "keeps up" } else { "falls behind" }
        );
        results.push(json!({
            "agents": step,
            "answered_share": (share * 1000.0).round() / 1000.0,
            "beats_per_s": (answered as f64 / seconds).round(),
            "round_trip": latency,
            "failed": failed,
            "keeps_up": keeps_up,
            "start_seconds": (connect_s * 100.0).round() / 100.0,
        }));
        if !keeps_up {
            break;
        }
        kept_up = step;
    }
    stop.store(true, Ordering::Relaxed);
    beaters.abort_all();
    server.shutdown().await?;
    Ok(json!({ "transport": format!("{transport:?}").to_lowercase(), "agents": kept_up, "steps": results }))
}

enum Beater {
    Engine((Engine, AgentName, u64)),
    Socket(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>),
}

async fn register(engine: &Engine, name: &str) -> Result<(Engine, AgentName, u64)> {
    let agent = AgentName::new(name)?;
    let hello =
        Hello { agent: agent.clone(), role: RoleName::new("beat")?, labels: BTreeMap::new(), incarnation: None };
    match engine.execute(AgentCommand::Hello(hello)).await? {
        Response::Welcome(welcome) => Ok((engine.clone(), agent, welcome.incarnation)),
        other => bail!("hello answered {other:?}"),
    }
}

async fn connect(
    url: &str,
    token: &str,
    name: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{url}/v1/session").into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.context("connecting")?;
    let hello = json!({"type": "hello", "id": 0, "agent": name, "role": "beat"});
    socket.send(Message::text(hello.to_string())).await?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => return Ok(socket),
            Some(Ok(Message::Text(text))) => bail!("hello answered {text}"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
            None => bail!("closed before the welcome"),
        }
    }
}

async fn beat(beater: Beater, samples: Arc<Samples>, stop: Arc<AtomicBool>) -> Result<()> {
    // A random phase, so the beats spread over the second as real agents' do.
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..1000))).await;
    let mut ticker = tokio::time::interval(BEAT);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    match beater {
        Beater::Engine((engine, agent, incarnation)) => {
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let sent = Instant::now();
                match engine.heartbeat(agent.clone(), incarnation, None, None).await {
                    Ok(()) => samples.record(sent.elapsed()),
                    Err(_) => samples.fail(),
                }
            }
        }
        Beater::Socket(mut socket) => {
            let mut id = 1u64;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                id += 1;
                let sent = Instant::now();
                let frame = format!(r#"{{"type":"heartbeat","id":{id}}}"#);
                if socket.send(Message::text(frame)).await.is_err() {
                    samples.fail();
                    return Ok(());
                }
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) if text.contains("heartbeat_ack") => {
                            samples.record(sent.elapsed());
                            break;
                        }
                        Some(Ok(Message::Text(_))) | Some(Ok(_)) => continue,
                        _ => {
                            samples.fail();
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn parse_steps(text: &str) -> Result<Vec<usize>> {
    let mut steps: Vec<usize> = text
        .split(',')
        .map(|step| step.trim().replace('_', "").parse::<usize>().with_context(|| format!("step {step:?}")))
        .collect::<Result<_>>()?;
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() || steps[0] == 0 {
        bail!("--capacity-steps takes positive agent counts, e.g. 1000,5000,20000");
    }
    Ok(steps)
}

/// Raises the soft open-file limit to the hard one; returns the limit now in force.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
