//! `hale bench`: measure hale on this machine. Each scenario prints what it measured and
//! how; `--json` prints one JSON object per scenario on stdout.
//!
//! One file per scenario: `durable_append`, `replay`, `restart` (SIGKILL a supervised
//! agent, time its return), `detect` (silence a heartbeating agent, time its `down`),
//! `redeliver` (SIGKILL the agent holding a task, time until another run holds it) and
//! `tasks` (task throughput, submitted to completed, with no-op agents), `reconnect`
//! (restart hale under connected agents, time until all have resumed) and `messages`
//! (messages between two agents, each acked), `failover` (three real nodes, the leader
//! SIGKILLed, time to the first write the new leader acknowledges, beside etcd) and
//! `node-loss` (a node running N agents SIGKILLed with them, time until all run elsewhere).

mod detect;
mod durable_append;
mod failover;
mod heartbeat_capacity;
mod messages;
mod node_loss;
mod reconnect;
mod redeliver;
mod replay;
mod restart;
mod tasks;

use anyhow::Result;
use serde_json::{Value, json};
use std::path::PathBuf;

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
    /// restart, detect, redeliver, failover, node-loss: trials [default: 100 for restart,
    /// 20 for detect and failover, 50 for redeliver, 5 for node-loss].
    #[arg(long)]
    trials: Option<usize>,
    /// restart, redeliver: how often the bench reads the engine's state while it waits for
    /// the agent to come back (or its task to move), in microseconds.
    #[arg(long, default_value_t = 200)]
    poll_us: u64,
    /// detect: agents heartbeating over their own WebSocket sessions (1 s ± 200 ms).
    #[arg(long, default_value_t = 50)]
    detect_agents: usize,
    /// tasks: agents completing tasks, each over its own WebSocket session, one lease each.
    #[arg(long, default_value_t = 32)]
    task_agents: usize,
    /// tasks: tasks to submit.
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// tasks: concurrent HTTP submitters, each one request at a time.
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// reconnect: agents connected when hale restarts.
    #[arg(long, default_value_t = 100)]
    reconnect_clients: usize,
    /// reconnect: restarts of hale.
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// heartbeat-capacity: the agent counts to try, in order, until one falls behind.
    #[arg(long, default_value = "1000,2000,5000,10000,20000,30000,50000,75000,100000")]
    capacity_steps: String,
    /// heartbeat-capacity: seconds measured at each step (after 2 s of warm-up).
    #[arg(long, default_value_t = 5.0)]
    capacity_seconds: f64,
    /// messages: messages to send from one agent to another.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// messages: sends in flight at once.
    #[arg(long, default_value_t = 64)]
    message_window: usize,
    /// failover: the etcd binary to measure beside hale [default: `etcd` on the PATH; not
    /// measured if there is none].
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// Where to write every scenario's result as one JSON file [default with no scenario
    /// named: hale-bench-<unix seconds>.json in this directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to create the temporary data directory (default: the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// durable-append, replay: encryption at rest with a fresh random key (to measure
    /// what sealing and opening every record costs).
    #[arg(long)]
    encrypt: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Websocket,
    Engine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Agents checkpoint over WebSocket sessions as fast as hale acknowledges (fsync'd).
    DurableAppend,
    /// Recover a log of `--events` events, without and with a snapshot.
    Replay,
    /// SIGKILL a supervised agent; time until its next incarnation has resumed.
    Restart,
    /// Silence a heartbeating agent; time from its last heartbeat until it is down.
    Detect,
    /// SIGKILL a managed agent holding a task; time until the task runs on another agent.
    Redeliver,
    /// Task throughput: no-op agents complete tasks submitted over HTTP.
    Tasks,
    /// Restart hale under connected agents; time until every one has resumed.
    Reconnect,
    /// Messages between two agents, each acked; messages per second.
    Messages,
    /// How many agents beating at 1 Hz one hale holds before heartbeats fall behind.
    HeartbeatCapacity,
    /// Three `hale serve` processes, the leader SIGKILLed: time to the first write the new
    /// leader acknowledges (and etcd's, in the same shape, if it is installed).
    Failover,
    /// Three `hale up` nodes, the one running N agents (10, then 100) SIGKILLed with them:
    /// time until every one runs on another node with its state, and any run twice.
    NodeLoss,
}

pub async fn run(args: BenchArgs) -> Result<i32> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; figures are only meaningful from `cargo run --release -- bench`");
    }
    let scenarios = match args.scenario {
        Some(scenario) => vec![scenario],
        None => vec![
            Scenario::DurableAppend,
            Scenario::Replay,
            Scenario::Restart,
            Scenario::Detect,
            Scenario::Redeliver,
            Scenario::Tasks,
            Scenario::Reconnect,
            Scenario::Messages,
            Scenario::HeartbeatCapacity,
            Scenario::Failover,
            Scenario::NodeLoss,
        ],
    };
    let all = args.scenario.is_none();
    let mut results = Vec::new();
    for scenario in scenarios {
        let result = match scenario {
            Scenario::DurableAppend => durable_append::durable_append(&args).await?,
            Scenario::Replay => replay::replay(&args).await?,
            Scenario::Restart => restart::restart(&args).await?,
            Scenario::Detect => detect::detect(&args).await?,
            Scenario::Redeliver => redeliver::redeliver(&args).await?,
            Scenario::Tasks => tasks::tasks(&args).await?,
            Scenario::Reconnect => reconnect::reconnect(&args).await?,
            Scenario::Messages => messages::messages(&args).await?,
            Scenario::HeartbeatCapacity => heartbeat_capacity::heartbeat_capacity(&args).await?,
            Scenario::Failover => failover::failover(&args).await?,
            Scenario::NodeLoss => node_loss::node_loss(&args).await?,
        };
        if args.json {
            println!("{}", serde_json::to_string(&result)?);
        } else if !all {
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        results.push(result);
    }
    if all {
        println!("{}", table(&results));
    }
    let out = args.out.clone().or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        all.then(|| PathBuf::from(format!("hale-bench-{}.json", now.as_secs())))
    });
    if let Some(out) = out {
        let document = json!({ "machine": machine(), "results": results });
        std::fs::write(&out, serde_json::to_string_pretty(&document)?)?;
        eprintln!("every scenario's result, with how it was measured: {}", out.display());
    }
    Ok(0)
}

/// One line per scenario: what it measures, its headline figure, p50 and p99.
fn table(results: &[Value]) -> String {
    let number = |value: &Value| match value.as_f64() {
        Some(n) if n.fract() == 0.0 => format!("{n:.0}"),
        Some(n) => format!("{n:.2}"),
        None => "-".to_string(),
    };
    let ms = |value: &Value| if value.is_null() { "-".to_string() } else { format!("{} ms", number(value)) };
    let mut rows = vec![["scenario".to_string(), "result".to_string(), "p50".to_string(), "p99".to_string()]];
    for result in results {
        let scenario = result["scenario"].as_str().unwrap_or("?").to_string();
        let row = match scenario.as_str() {
            "replay" => [
                format!("{} events recovered in {} s cold", number(&result["ops"]), number(&result["cold_seconds"])),
                format!("{} s from a snapshot", number(&result["snapshot_seconds"])),
                "-".into(),
            ],
            "heartbeat-capacity" => [
                format!(
                    "{} agents at 1 Hz (engine); {} over WebSocket (fd limit {})",
                    number(&result["agents"]),
                    number(&result["websocket_agents"]),
                    number(&result["open_file_limit"])
                ),
                "-".into(),
                "-".into(),
            ],
            "messages" => [
                format!("{} messages/s delivered and acked", number(&result["delivered_acked_per_s"])),
                ms(&result["send_to_receive"]["p50_ms"]),
                ms(&result["send_to_receive"]["p99_ms"]),
            ],
            "detect" => [
                format!("silence to down, {} false downs", number(&result["false_downs"])),
                ms(&result["p50_ms"]),
                ms(&result["p99_ms"]),
            ],
            _ if !result["throughput_per_s"].is_null() => {
                [format!("{}/s", number(&result["throughput_per_s"])), ms(&result["p50_ms"]), ms(&result["p99_ms"])]
            }
            _ => ["time to recover".into(), ms(&result["p50_ms"]), ms(&result["p99_ms"])],
        };
        let [what, p50, p99] = row;
        rows.push([scenario, what, p50, p99]);
    }
    let widths: Vec<usize> = (0..4).map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The supervision of the benches' agents: restart always and at once (no backoff), with
/// an intensity that never trips, so every kill is followed by an immediate restart.
fn restart_at_once() -> hale_core::supervision::Supervision {
    use hale_core::policy::{Backoff, Intensity};
    use hale_core::supervision::{Criticality, RestartPolicy, StallPolicy, Supervision};
    Supervision {
        restart: RestartPolicy::Always,
        criticality: Criticality::Normal,
        backoff: Backoff { base_ms: 0, max_ms: 0 },
        // A million restarts within 1 ms.
        intensity: Intensity { restarts_max: 1_000_000, window_ms: 1 },
        group: None,
        stall: StallPolicy::default(),
        budget: None,
        thresholds: Default::default(),
        placement: Default::default(),
    }
}

fn temp_dir(args: &BenchArgs) -> Result<tempfile::TempDir> {
    let dir = match &args.dir {
        Some(dir) => tempfile::Builder::new().prefix("hale-bench-").tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("hale-bench-").tempdir()?,
    };
    Ok(dir)
}

/// A fresh random key for `--encrypt`, or none.
fn bench_keys(args: &BenchArgs) -> Result<Option<std::sync::Arc<hale_store::Keyring>>> {
    if !args.encrypt {
        return Ok(None);
    }
    let line = hale_store::generate_key_line("bench")?;
    Ok(Some(std::sync::Arc::new(hale_store::Keyring::parse(&line)?)))
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

/// p50, p99 and max of microsecond samples, in milliseconds.
fn summary_ms(samples_us: &mut [u32]) -> Value {
    samples_us.sort_unstable();
    json!({
        "p50_ms": percentile_ms(samples_us, 0.50),
        "p99_ms": percentile_ms(samples_us, 0.99),
        "max_ms": percentile_ms(samples_us, 1.0),
    })
}

/// Calls `check` every `every` until it finds something, failing after `deadline`.
async fn poll_until<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    every: std::time::Duration,
    deadline: std::time::Duration,
    mut check: impl FnMut() -> Fut,
) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        if start.elapsed() > deadline {
            anyhow::bail!("no {what} within {} s", deadline.as_secs());
        }
        tokio::time::sleep(every).await;
    }
}

/// Microseconds of `duration`, saturating.
fn micros(duration: std::time::Duration) -> u32 {
    duration.as_micros().min(u128::from(u32::MAX)) as u32
}
