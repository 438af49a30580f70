//! `detect`: agents heartbeat every second with jitter over real WebSocket sessions; one
//! after another goes silent with its socket still open, and the time from its last
//! heartbeat to the `down` the core logs is measured. Any other agent found down is a
//! false down.

use super::{BenchArgs, machine, percentile_ms};
use anyhow::{Context, Result, bail};
use hale_client::{Agent, AgentOptions, ProgressBody};
use hale_core::{LivenessSettings, Rng};
use hale_server::ServerConfig;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Heartbeats every `BEAT_MS` ± `JITTER_MS`, uniformly.
const BEAT_MS: u64 = 1_000;
const JITTER_MS: u64 = 200;
/// Every agent beats this long before the first one goes silent.
const WARMUP: Duration = Duration::from_secs(10);
/// A new agent goes silent this often; detections take longer, so trials overlap.
const VICTIM_EVERY: Duration = Duration::from_millis(1_500);
/// An agent goes silent only after this many beats in its run.
const BEATS_BEFORE_SILENCE: u64 = 5;
/// A silenced agent not declared down this long after the last one went silent is missed.
const PATIENCE: Duration = Duration::from_secs(20);
/// How often the bench reads the `down` records (their time comes from the core itself).
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// One agent as its task and the bench see it.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// The current run.
    incarnation: u64,
    /// Heartbeats acknowledged in the current run.
    beats: u64,
    /// Wall-clock ms when the last heartbeat was sent.
    last_beat_ms: u64,
    /// The bench told this run to go silent.
    silence: bool,
}

#[derive(Default)]
struct Board {
    slots: Vec<Slot>,
    /// Runs that went silent, `(agent, incarnation)`, with the wall-clock ms of their last
    /// heartbeat.
    silenced: HashMap<(usize, u64), u64>,
    challenges_answered: u64,
}

type Shared = Arc<Mutex<Board>>;

fn lock(board: &Shared) -> std::sync::MutexGuard<'_, Board> {
    board.lock().expect("the board lock is never poisoned")
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn agent_name(index: usize) -> String {
    format!("detect-{index}")
}

pub(super) async fn detect(args: &BenchArgs) -> Result<Value> {
    let trials = args.trials.unwrap_or(20);
    let agents = args.detect_agents;
    if trials == 0 || agents < 2 {
        bail!("detect needs --trials of at least 1 and --detect-agents of at least 2");
    }
    let dir = super::temp_dir(args)?;
    let config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse()?);
    let liveness: LivenessSettings = config.liveness.clone();
    let server = hale_server::start(config).await?;
    let url = format!("ws://{}", server.local_addr());
    eprintln!(
        "detect: {agents} agents beating every {BEAT_MS} ms ± {JITTER_MS} ms; after {} s one goes silent every {} ms, \
         {trials} in all; data in {}",
        WARMUP.as_secs(),
        VICTIM_EVERY.as_millis(),
        dir.path().display()
    );
    let board: Shared = Arc::new(Mutex::new(Board { slots: vec![Slot::default(); agents], ..Board::default() }));
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let began = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..agents {
        let (url, board, token) = (url.clone(), board.clone(), server.admin_token().to_string());
        let agent_seed = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        workers.spawn(async move { keep_beating(&url, &token, index, &board, agent_seed).await });
    }
    let outcome = watch_downs(&server, &board, &mut workers, agents, trials, seed).await;
    workers.shutdown().await;
    server.shutdown().await?;
    let outcome = outcome?;
    let seconds = began.elapsed().as_secs_f64();

    let mut latencies_us: Vec<u32> = outcome.latencies_ms.iter().map(|ms| (*ms).min(4_000_000) as u32 * 1000).collect();
    latencies_us.sort_unstable();
    let detected = latencies_us.len();
    let challenges_answered = lock(&board).challenges_answered;
    let detector = &liveness.detector;
    Ok(json!({
        "scenario": "detect",
        "trials": detected,
        "missed": trials - detected,
        "agents": agents,
        "p50_ms": percentile_ms(&latencies_us, 0.50),
        "p99_ms": percentile_ms(&latencies_us, 0.99),
        "max_ms": percentile_ms(&latencies_us, 1.0),
        "min_ms": percentile_ms(&latencies_us, 0.0),
        "false_downs": outcome.false_downs.len(),
        "false_down_details": outcome.false_downs,
        "causes": outcome.causes,
        "challenges_answered": challenges_answered,
        "seconds": (seconds * 10.0).round() / 10.0,
        "settings": {
            "heartbeat": format!("every {BEAT_MS} ms ± {JITTER_MS} ms (uniform), progress without a task"),
            "silence": "stops heartbeating and ignores challenges; keeps its WebSocket open",
            "detector": {
                "threshold": detector.threshold,
                "suspect_threshold": detector.suspect_threshold,
                "acceptable_pause_ms": detector.acceptable_pause_ms,
                "min_std_deviation_ms": detector.min_std_deviation_ms,
                "window": detector.window,
                "first_interval_ms": detector.first_interval_ms,
            },
            "tick_ms": hale_server::engine::TICK.as_millis() as u64,
            "warmup_s": WARMUP.as_secs(),
            "victim_every_ms": VICTIM_EVERY.as_millis() as u64,
        },
        "how": format!(
            "hale runs in this process (no supervised agents). {agents} agents (hale_client::Agent, each its own \
             WebSocket session on loopback) heartbeat every {BEAT_MS} ms ± {JITTER_MS} ms, uniform, with progress that \
             names no task (so the stall detector never counts them), and answer challenges at once. After {} s of \
             warm-up, one agent after another ({trials} trials, a new one every {} ms, so several are silent at once; \
             each had beaten at least {BEATS_BEFORE_SILENCE} times in its run) stops heartbeating and ignores \
             challenges but keeps its socket open, the hard case. A trial's time is the core's `down` record time \
             (record.down.at: the wall-clock ms at which the engine's tick logged AgentDown) minus the wall-clock ms at \
             which the agent sent its last heartbeat, the same clock in the same process. A silenced agent comes back \
             as a fresh run once hale has fenced it. false_downs: any other run that ends up with a `down` record, \
             checked every {} ms throughout and once more at the end. The detector is the phi-accrual one with \
             PhiConfig::default(): down at phi >= {}, suspect (challenged) at phi >= {}, acceptable pause {} ms, \
             min std deviation {} ms, window {} intervals, seeded with {} ms +/- 25%; the engine ticks every {} ms, \
             so a detection is up to one tick late.",
            WARMUP.as_secs(),
            VICTIM_EVERY.as_millis(),
            LOOK_EVERY.as_millis(),
            detector.threshold,
            detector.suspect_threshold,
            detector.acceptable_pause_ms,
            detector.min_std_deviation_ms,
            detector.window,
            detector.first_interval_ms,
            hale_server::engine::TICK.as_millis(),
        ),
        "machine": machine(),
    }))
}

/// One agent: run after run, heartbeat with jitter until told to go silent (then wait,
/// socket open, until hale fences the run) or until hale ends the session.
async fn keep_beating(url: &str, token: &str, index: usize, board: &Shared, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    loop {
        let agent = Agent::connect(url, AgentOptions::new(agent_name(index), "bench").token(token)).await?;
        let welcome = agent.resume().await?;
        let incarnation = welcome.incarnation;
        lock(board).slots[index] = Slot { incarnation, ..Slot::default() };
        // Start at a random phase, so the agents' beats spread over the second.
        let mut wait = Duration::from_millis(rng.up_to(BEAT_MS));
        loop {
            let mut challenged = false;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = agent.challenged() => challenged = true,
                _ = agent.ended() => break,
            }
            let silent = {
                let mut board = lock(board);
                let slot = &board.slots[index];
                let (silence, last_beat_ms) = (slot.silence, slot.last_beat_ms);
                if silence {
                    board.silenced.insert((index, incarnation), last_beat_ms);
                } else if challenged {
                    board.challenges_answered += 1;
                }
                silence
            };
            if silent {
                // Silent, socket open, challenges unanswered, until hale fences the run.
                agent.ended().await;
                break;
            }
            let sent = wall_ms();
            let progress = ProgressBody {
                fraction: None,
                message: Some("idle".into()),
                task: None,
                fields: serde_json::Map::new(),
            };
            if agent.heartbeat(Some(progress)).await.is_err() {
                break;
            }
            let mut board = lock(board);
            let slot = &mut board.slots[index];
            slot.last_beat_ms = sent;
            slot.beats += 1;
            wait = Duration::from_millis(BEAT_MS - JITTER_MS + rng.up_to(2 * JITTER_MS));
        }
    }
}

struct Outcome {
    latencies_ms: Vec<u64>,
    false_downs: Vec<Value>,
    causes: BTreeMap<String, u64>,
}

/// Silences agents on schedule and reads every `down` record until each trial is
/// detected (or given up on); sorts every `down` into a trial or a false down.
async fn watch_downs(
    server: &hale_server::RunningServer,
    board: &Shared,
    workers: &mut tokio::task::JoinSet<Result<()>>,
    agents: usize,
    trials: usize,
    seed: u64,
) -> Result<Outcome> {
    let index_of: HashMap<String, usize> = (0..agents).map(|index| (agent_name(index), index)).collect();
    // Victims in a shuffled order (Fisher-Yates), then round again if trials > agents.
    let mut rng = Rng::new(seed.rotate_left(17));
    let mut order: Vec<usize> = (0..agents).collect();
    for i in (1..agents).rev() {
        order.swap(i, rng.up_to(i as u64) as usize);
    }
    let mut cursor = 0usize;
    let mut outcome = Outcome { latencies_ms: Vec::new(), false_downs: Vec::new(), causes: BTreeMap::new() };
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let mut silenced = 0usize;
    let mut next_silence = Instant::now() + WARMUP;
    let mut last_silence: Option<Instant> = None;
    let deadline = next_silence + VICTIM_EVERY * trials as u32 + 2 * PATIENCE;
    let mut ticker = tokio::time::interval(LOOK_EVERY);
    let mut finished = false;
    loop {
        ticker.tick().await;
        if let Some(ended) = workers.try_join_next() {
            ended.context("an agent task panicked")?.context("an agent task failed")?;
            bail!("an agent task ended early");
        }
        if silenced < trials && Instant::now() >= next_silence {
            let mut board = lock(board);
            // The next agent in the order that is beating steadily and not silent already.
            for _ in 0..agents {
                let index = order[cursor % agents];
                cursor += 1;
                let slot = &mut board.slots[index];
                if !slot.silence && slot.beats >= BEATS_BEFORE_SILENCE {
                    slot.silence = true;
                    silenced += 1;
                    last_silence = Some(Instant::now());
                    break;
                }
            }
            next_silence += VICTIM_EVERY;
        }
        let downs = server
            .engine()
            .read(|state| {
                state
                    .agents()
                    .filter_map(|record| record.down.as_ref().map(|down| (record.name.to_string(), down.clone())))
                    .collect::<Vec<_>>()
            })
            .await?;
        {
            let board = lock(board);
            for (name, down) in downs {
                let Some(&index) = index_of.get(&name) else { continue };
                let key = (index, down.incarnation);
                if seen.contains(&key) {
                    continue;
                }
                let cause = serde_json::to_value(&down.cause)?;
                let kind = match &cause {
                    Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
                    Value::String(kind) => kind.clone(),
                    _ => String::new(),
                };
                if let Some(&last_beat_ms) = board.silenced.get(&key) {
                    outcome.latencies_ms.push(down.at.0.saturating_sub(last_beat_ms));
                    *outcome.causes.entry(kind).or_default() += 1;
                } else if board.slots[index].silence && board.slots[index].incarnation == down.incarnation {
                    // Told to go silent, not yet noticed by its task: look again next time.
                    continue;
                } else {
                    outcome.false_downs.push(json!({
                        "agent": name,
                        "incarnation": down.incarnation,
                        "cause": cause,
                        "at_ms": down.at.0,
                        "last_beat_ms": board.slots[index].last_beat_ms,
                    }));
                }
                seen.insert(key);
            }
        }
        if finished {
            return Ok(outcome);
        }
        let all_detected = outcome.latencies_ms.len() >= trials;
        let given_up =
            (silenced >= trials && last_silence.is_some_and(|at| at.elapsed() > PATIENCE)) || Instant::now() > deadline;
        // One more look after the last detection, so a late false down is counted too.
        finished = all_detected || given_up;
    }
}
