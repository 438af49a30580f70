//! `reconnect`: hale restarts under connected agents; how long until every agent has
//! resumed its run and had a checkpoint acknowledged.
//!
//! hale runs in this process. `--reconnect-clients` agents (the Rust client, with its
//! default reconnect policy) each hold a WebSocket session. Each round stops hale (its
//! sessions are closed with "restarting"), starts it again on the same data directory
//! and address, and times each agent from the moment hale listens again until a
//! checkpoint it made while hale was down is acknowledged: reconnect (backoff with full
//! jitter), hello and welcome, settling, and the checkpoint's fsync.

use super::{BenchArgs, machine, micros, summary_ms, temp_dir};
use anyhow::{Result, bail};
use hale_client::{Agent, AgentOptions, Reconnect};
use hale_server::ServerConfig;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub(super) async fn reconnect(args: &BenchArgs) -> Result<Value> {
    let clients = args.reconnect_clients;
    if clients == 0 || args.restarts == 0 {
        bail!("--reconnect-clients and --restarts must be positive");
    }
    let dir = temp_dir(args)?;
    // A fixed address, so hale comes back where the agents look for it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = ServerConfig::new(dir.path(), addr);
    let mut server = hale_server::start(config.clone()).await?;
    let token = server.admin_token().to_string();
    let url = format!("ws://{addr}");
    let policy = Reconnect::default();
    let mut agents = Vec::with_capacity(clients);
    for index in 0..clients {
        let options = AgentOptions::new(format!("reconnect-{index}"), "bench").token(&token).reconnect(policy.clone());
        let agent = Agent::connect(&url, options).await?;
        agent.resume().await?;
        agent.checkpoint(json!({ "round": 0 })).await?;
        agents.push(agent);
    }
    eprintln!("reconnect: {clients} agents, {} restarts of hale, data in {}", args.restarts, dir.path().display());
    let mut samples = Vec::with_capacity(clients * args.restarts);
    for round in 1..=args.restarts {
        server.shutdown().await?;
        // Each agent writes while hale is down; the write waits in its session's queue.
        let mut writes = tokio::task::JoinSet::new();
        for agent in &agents {
            let agent = agent.clone();
            writes.spawn(async move {
                let result = agent.checkpoint(json!({ "round": round })).await;
                (Instant::now(), result)
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        server = hale_server::start(config.clone()).await?;
        let back = Instant::now();
        while let Some(done) = writes.join_next().await {
            let (at, result) = done?;
            if let Err(error) = result {
                bail!("a checkpoint made while hale was down failed: {error}");
            }
            samples.push(micros(at.saturating_duration_since(back)));
        }
    }
    server.shutdown().await?;
    let summary = summary_ms(&mut samples);
    Ok(json!({
        "scenario": "reconnect",
        "clients": clients,
        "restarts": args.restarts,
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "settings": {
            "reconnect": format!("base {} ms doubling to {} ms, full jitter", policy.base.as_millis(), policy.cap.as_millis()),
            "down_for_ms": 200,
        },
        "how": format!(
            "hale runs in this process; {clients} agents (the Rust client with its default reconnect policy) hold \
             WebSocket sessions. Each of {} rounds stops hale gracefully (sessions closed), has every agent make a \
             checkpoint while it is down (it waits in the session's queue), starts hale again 200 ms later on the same \
             data directory and address, and times each agent from the moment hale listens again until that \
             checkpoint is acknowledged (reconnect after a jittered backoff, hello and welcome, settling, fsync). \
             Percentiles are nearest-rank over all agents and rounds.",
            args.restarts
        ),
        "machine": machine(),
    }))
}
