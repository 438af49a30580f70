//! `replay`: recovery of a large log, cold and from a snapshot.

use super::{BenchArgs, bench_keys, machine, temp_dir};
use anyhow::{Result, bail};
use hale_core::{AgentCommand, AgentName, Command, Core, Hello, Limits, RoleName, Timestamp};
use hale_store::{DataDir, Log, Record, RecoveryOptions, recover, snapshot};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Instant;

/// Builds a log of `--events` checkpoint events (1,000 agents), then times recovery
/// without a snapshot (every event decoded, checksummed and folded) and from a snapshot
/// of the final state.
pub(super) async fn replay(args: &BenchArgs) -> Result<Value> {
    let events = args.events;
    let dir = temp_dir(args)?;
    let path = dir.path().to_path_buf();
    let keys = bench_keys(args)?;
    tokio::task::spawn_blocking(move || replay_blocking(&path, events, keys)).await?
}

fn replay_blocking(
    path: &std::path::Path,
    events: u64,
    keys: Option<std::sync::Arc<hale_store::Keyring>>,
) -> Result<Value> {
    let key = keys.as_ref().map(|keys| keys.current().clone());
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
        let decision = core.execute(&command, at).map_err(|rejection| anyhow::anyhow!("{rejection}"))?;
        for event in decision.events {
            seq += 1;
            batch.push(Record::encode_with(seq, at, &event, key.as_ref()));
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
        push(&mut core, Command::Agent(AgentCommand::Hello(hello)), &mut batch, &mut log)?;
    }
    let checkpoints = events.saturating_sub(2 * AGENTS);
    for n in 0..checkpoints {
        let agent = names[(n % AGENTS) as usize].clone();
        let patch = json!({ "step": n, "note": "step done", "files": { format!("f{}", n % 8): n } });
        push(
            &mut core,
            Command::Agent(AgentCommand::Checkpoint { agent, incarnation: 1, patch, expected_version: None }),
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

    let options = RecoveryOptions { limits: Limits::default(), repair: false, now: at, keys: keys.clone() };
    let cold_started = Instant::now();
    let cold = recover(&data_dir, &options)?;
    let cold_seconds = cold_started.elapsed().as_secs_f64();
    if cold.core.state() != &expected || cold.report.replayed != events.max(2 * AGENTS) {
        bail!("cold recovery did not reproduce the state ({} events replayed)", cold.report.replayed);
    }
    let last_seq = cold.last_seq;
    let encoded = snapshot::encode_with(last_seq, at, cold.core.state(), key.as_ref());
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
            "encrypted": keys.is_some(),
            "cold": "open the log, read, checksum, decode and fold every event",
            "snapshot": "read, checksum and decode a snapshot of the final state; replay nothing",
        },
        "machine": machine(),
    }))
}
