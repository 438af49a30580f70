//! `durable-append`: agents checkpoint as fast as hale acknowledges, each ack after fsync.

use super::{BenchArgs, Transport, bench_keys, machine, percentile_ms, temp_dir};
use anyhow::{Context, Result, bail};
use hale_client::{Agent, AgentOptions};
use hale_core::{AgentCommand, AgentName, Hello, RoleName};
use hale_server::ServerConfig;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// 256 agents over real loopback WebSocket sessions checkpoint small patches as fast as
/// the server acknowledges them (each ack after fsync); latency is from send to ack.
pub(super) async fn durable_append(args: &BenchArgs) -> Result<Value> {
    if args.agents == 0 || args.in_flight == 0 || args.seconds <= 0.0 {
        bail!("--agents, --in-flight and --seconds must be positive");
    }
    // Either a hale this process starts on a temporary directory, or one given by --server.
    let dir = temp_dir(args)?;
    let server = match &args.server {
        Some(_) if args.transport == Transport::Engine => {
            bail!("--transport engine needs the in-process server; drop --server")
        }
        Some(_) if args.encrypt => bail!("--encrypt configures the in-process server; give the external one its key"),
        Some(_) => None,
        None => {
            let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
            config.snapshot_every_events = 1_000_000;
            config.encryption = bench_keys(args)?;
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
        "durable-append: {} agents x {} in flight, {} s measured after 1 s warm-up, server {where_} at {url}{}",
        args.agents,
        args.in_flight,
        args.seconds,
        if args.encrypt { ", encryption at rest on" } else { "" },
    );
    let run = format!("{}", std::process::id());
    // The admin token may act for any agent; an external hale's comes from HALE_TOKEN.
    let token = match &server {
        Some(server) => server.admin_token().to_string(),
        None => std::env::var("HALE_TOKEN").unwrap_or_default(),
    };

    let mut agents = Vec::with_capacity(args.agents);
    for index in 0..args.agents {
        agents.push(match args.transport {
            Transport::Websocket => {
                let agent = Agent::connect(
                    &url,
                    AgentOptions::new(format!("bench-{run}-{index}"), "bench").token(token.clone()),
                )
                .await?;
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
                server.engine().execute(AgentCommand::Hello(hello)).await?;
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
            "encrypted": args.encrypt,
            "warmup_s": 1,
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
                    AgentCommand::Checkpoint { agent: agent.clone(), incarnation: 1, patch, expected_version: None };
                engine.execute(command).await?;
            }
        }
        Ok(())
    }
}
