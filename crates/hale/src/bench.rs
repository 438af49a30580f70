//! `hale bench`: measure hale on this machine. Each scenario prints what it measured and
//! how; `--json` prints one JSON object per scenario on stdout.

use anyhow::{Context, Result, bail};
use hale_client::{Agent, AgentOptions};
use hale_core::{AgentName, Command, Core, Hello, Limits, RoleName, Timestamp};
use hale_server::ServerConfig;
use hale_store::{DataDir, Log, Record, RecoveryOptions, recover, snapshot};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario; all of them if omitted.
    #[arg(value_enum)]
    scenario: Option<Scenario>,
    /// Print one JSON object per scenario on stdout (the human summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// durable-append: concurrent agents, each with its own WebSocket session.
    #[arg(long, default_value_t = 256)]
    agents: usize,
    /// durable-append: checkpoints each agent keeps in flight (pipelined on its session).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// durable-append: seconds of measured load (after one second of warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// durable-append: `websocket` drives real sessions over loopback; `engine` calls the
    /// server's engine in-process, to show what the core and the log sustain without the
    /// network stack.
    #[arg(long, value_enum, default_value_t = Transport::Websocket)]
    transport: Transport,
    /// durable-append: drive an already running hale at this WebSocket URL (e.g.
    /// ws://127.0.0.1:7700) instead of starting one in this process.
    #[arg(long)]
    server: Option<String>,
    /// replay: events in the log to recover.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Where to create the temporary data directory (default: the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Websocket,
    Engine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    DurableAppend,
    Replay,
}

pub async fn run(args: BenchArgs) -> Result<i32> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are only meaningful from `cargo run --release -- bench`");
    }
    let scenarios = match args.scenario {
        Some(scenario) => vec![scenario],
        None => vec![Scenario::DurableAppend, Scenario::Replay],
    };
    for scenario in scenarios {
        let result = match scenario {
            Scenario::DurableAppend => durable_append(&args).await?,
            Scenario::Replay => replay(&args).await?,
        };
        if args.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
    }
    Ok(0)
}

fn temp_dir(args: &BenchArgs) -> Result<tempfile::TempDir> {
    let dir = match &args.dir {
        Some(dir) => tempfile::Builder::new().prefix("hale-bench-").tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("hale-bench-").tempdir()?,
    };
    Ok(dir)
}

fn machine() -> Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    json!({ "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH })
}

/// Percentile of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u32], fraction: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() as f64 - 1.0) * fraction).round() as usize;
    f64::from(sorted_us[index]) / 1000.0
}

/// 256 agents over real loopback WebSocket sessions checkpoint small patches as fast as
/// the server acknowledges them (each ack after fsync); latency is from send to ack.
async fn durable_append(args: &BenchArgs) -> Result<Value> {
    if args.agents == 0 || args.in_flight == 0 || args.seconds <= 0.0 {
        bail!("--agents, --in-flight and --seconds must be positive");
    }
    // Either a hale this process starts on a temporary directory, or one given by --server.
    let dir = temp_dir(args)?;
    let server = match &args.server {
        Some(_) if args.transport == Transport::Engine => {
            bail!("--transport engine needs the in-process server; drop --server")
        }
        Some(_) => None,
        None => {
            let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
            config.snapshot_every_events = 1_000_000;
            Some(hale_server::start(config).await?)
        }
    };
    let url = match (&args.server, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => format!("ws://{}", server.local_addr()),
        (None, None) => unreachable!("a server was started"),
    };
    let where_ =
        if server.is_some() { format!("in this process, data in {}", dir.path().display()) } else { "external".into() };
    eprintln!(
        "durable-append: {} agents x {} in flight, {} s measured after 1 s warm-up, server {where_} at {url}",
        args.agents, args.in_flight, args.seconds,
    );
    let run = format!("{}", std::process::id());

    let mut agents = Vec::with_capacity(args.agents);
    for index in 0..args.agents {
        agents.push(match args.transport {
            Transport::Websocket => {
                let agent = Agent::connect(&url, AgentOptions::new(format!("bench-{run}-{index}"), "bench")).await?;
                agent.resume().await?;
                Writer::Session(agent)
            }
            Transport::Engine => {
                let server = server.as_ref().expect("checked above");
                let name = AgentName::new(format!("bench-{index}"))?;
                let hello = Hello {
                    agent: name.clone(),
                    role: RoleName::new("bench")?,
                    labels: BTreeMap::new(),
                    incarnation: None,
                };
                server.engine().execute(Command::Hello(hello)).await?;
                Writer::Engine(server.engine().clone(), name)
            }
        });
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let measure_until = measure_from + Duration::from_secs_f64(args.seconds);
    let mut workers = tokio::task::JoinSet::new();
    for agent in &agents {
        for lane in 0..args.in_flight {
            let agent = agent.clone();
            workers.spawn(async move {
                let mut latencies_us: Vec<u32> = Vec::new();
                let mut n: u64 = 0;
                loop {
                    let sent = Instant::now();
                    if sent >= measure_until {
                        break;
                    }
                    n += 1;
                    agent.checkpoint(json!({ "lane": lane, "n": n, "note": "step done" })).await?;
                    if sent >= measure_from && Instant::now() <= measure_until {
                        latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                }
                Ok::<_, anyhow::Error>(latencies_us)
            });
        }
    }
    let mut latencies_us = Vec::new();
    while let Some(joined) = workers.join_next().await {
        latencies_us.extend(joined.context("a bench worker panicked")??);
    }
    drop(agents);
    if let Some(server) = server {
        server.shutdown().await?;
    }
    latencies_us.sort_unstable();
    let ops = latencies_us.len() as u64;
    let seconds = args.seconds;
    Ok(json!({
        "scenario": match args.transport {
            Transport::Websocket => "durable-append",
            Transport::Engine => "durable-append-engine",
        },
        "ops": ops,
        "seconds": seconds,
        "throughput_per_s": (ops as f64 / seconds).round(),
        "p50_ms": percentile_ms(&latencies_us, 0.50),
        "p99_ms": percentile_ms(&latencies_us, 0.99),
        "max_ms": percentile_ms(&latencies_us, 1.0),
        "settings": {
            "agents": args.agents,
            "in_flight_per_agent": args.in_flight,
            "patch": "{\"lane\":L,\"n\":N,\"note\":\"step done\"} (~40 bytes)",
            "transport": match (args.transport, &args.server) {
                (Transport::Websocket, Some(_)) => "WebSocket to an external hale (--server)",
                (Transport::Websocket, None) => "WebSocket on loopback, client and server in one process",
                (Transport::Engine, _) => "none: the server's engine called in-process (no sockets, no JSON frames)",
            },
            "durability": "SQLite WAL, synchronous=FULL: every ack after fsync",
            "warmup_s": 1,
        },
        "machine": machine(),
    }))
}

/// Builds a log of `--events` checkpoint events (1,000 agents), then times recovery
/// without a snapshot (every event decoded, checksummed and folded) and from a snapshot
/// of the final state.
async fn replay(args: &BenchArgs) -> Result<Value> {
    let events = args.events;
    let dir = temp_dir(args)?;
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || replay_blocking(&path, events)).await?
}

fn replay_blocking(path: &std::path::Path, events: u64) -> Result<Value> {
    const AGENTS: u64 = 1_000;
    eprintln!("replay: building a log of {events} events for {AGENTS} agents in {}", path.display());
    let build_started = Instant::now();
    let data_dir = DataDir::open(path)?;
    let mut log = Log::open(&data_dir.log_path())?;
    let mut core = Core::new(Limits::default());
    let mut batch: Vec<Record> = Vec::with_capacity(50_000);
    let mut seq = 0u64;
    let at = Timestamp(1_700_000_000_000);
    let mut push = |core: &mut Core, command: Command, batch: &mut Vec<Record>, log: &mut Log| -> Result<()> {
        for event in core.execute(&command, at).map_err(|rejection| anyhow::anyhow!("{rejection}"))? {
            seq += 1;
            batch.push(Record::encode(seq, at, &event));
        }
        if batch.len() >= 50_000 {
            log.append(batch)?;
            batch.clear();
        }
        Ok(())
    };
    let names: Vec<AgentName> = (0..AGENTS).map(|i| AgentName::new(format!("agent-{i}")).expect("valid")).collect();
    for name in &names {
        let hello =
            Hello { agent: name.clone(), role: RoleName::new("worker")?, labels: BTreeMap::new(), incarnation: None };
        push(&mut core, Command::Hello(hello), &mut batch, &mut log)?;
    }
    let checkpoints = events.saturating_sub(2 * AGENTS);
    for n in 0..checkpoints {
        let agent = names[(n % AGENTS) as usize].clone();
        let patch = json!({ "step": n, "note": "step done", "files": { format!("f{}", n % 8): n } });
        push(
            &mut core,
            Command::Checkpoint { agent, incarnation: 1, patch, expected_version: None },
            &mut batch,
            &mut log,
        )?;
    }
    if !batch.is_empty() {
        log.append(&batch)?;
    }
    drop(log);
    let expected = core.into_state();
    let build_seconds = build_started.elapsed().as_secs_f64();
    eprintln!("replay: built in {build_seconds:.1} s; recovering cold (no snapshot)");

    let options = RecoveryOptions { limits: Limits::default(), repair: false, now: at };
    let cold_started = Instant::now();
    let cold = recover(&data_dir, &options)?;
    let cold_seconds = cold_started.elapsed().as_secs_f64();
    if cold.core.state() != &expected || cold.report.replayed != events.max(2 * AGENTS) {
        bail!("cold recovery did not reproduce the state ({} events replayed)", cold.report.replayed);
    }
    let last_seq = cold.last_seq;
    let encoded = snapshot::encode(last_seq, at, cold.core.state());
    snapshot::write(&data_dir.snapshot_dir(), last_seq, &encoded)?;
    drop(cold);

    eprintln!("replay: cold recovery took {cold_seconds:.3} s; recovering from a snapshot");
    let warm_started = Instant::now();
    let warm = recover(&data_dir, &options)?;
    let snapshot_seconds = warm_started.elapsed().as_secs_f64();
    if warm.report.snapshot_seq != Some(last_seq) || warm.core.state() != &expected {
        bail!("recovery from the snapshot did not reproduce the state");
    }
    Ok(json!({
        "scenario": "replay",
        "ops": last_seq,
        "seconds": cold_seconds,
        "throughput_per_s": (last_seq as f64 / cold_seconds).round(),
        "cold_seconds": cold_seconds,
        "snapshot_seconds": snapshot_seconds,
        "snapshot_bytes": encoded.len(),
        "build_seconds": build_seconds,
        "settings": {
            "agents": AGENTS,
            "events": last_seq,
            "event": "checkpointed, patch {\"step\":N,\"note\":\"step done\",\"files\":{\"fK\":N}}",
            "history_len": Limits::default().history_len,
            "cold": "open the log, read, checksum, decode and fold every event",
            "snapshot": "read, checksum and decode a snapshot of the final state; replay nothing",
        },
        "machine": machine(),
    }))
}

/// One benchmark agent: a real session, or the engine called directly.
#[derive(Clone)]
enum Writer {
    Session(Agent),
    Engine(hale_server::engine::Engine, AgentName),
}

impl Writer {
    async fn checkpoint(&self, patch: Value) -> Result<()> {
        match self {
            Writer::Session(agent) => {
                agent.checkpoint(patch).await?;
            }
            Writer::Engine(engine, agent) => {
                let command =
                    Command::Checkpoint { agent: agent.clone(), incarnation: 1, patch, expected_version: None };
                engine.execute(command).await?;
            }
        }
        Ok(())
    }
}
