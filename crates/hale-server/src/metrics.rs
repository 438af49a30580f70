//! Metrics for `GET /metrics` (Prometheus text, via `prometheus-client`).
//!
//! Two kinds, kept apart so that hale-core stays pure and nothing is counted twice:
//!
//! * **Counters and histograms of things that happened** live in [`Metrics`]. The engine
//!   hands it every batch of events as it applies them ([`Metrics::observe`]), and tells
//!   it when a run speaks (hello, heartbeat) so it can time recoveries; the log writer
//!   tells it about each commit. They count since this hale started.
//! * **Gauges of how things are** (agents by state, tasks by state, mailbox depths, the
//!   mode, resource use, the newest snapshot) are derived from the state at scrape time
//!   ([`Gauges::read`], run inside the engine like any read) and from `/proc`.
//!
//! Each scrape builds a fresh registry: the long-lived metrics are registered by handle
//! (they share their values), the gauges are made from what was read, so an agent that
//! is gone leaves no stale series behind.

use hale_core::supervision::Cause;
use hale_core::{AgentName, Core, Event, Timestamp};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Recoveries remembered for `hale status` (the last hour's percentiles).
pub const RECENT_RECOVERIES_MAX: usize = 4096;
/// The window `hale status` summarizes recoveries over.
pub const RECENT_WINDOW_MS: u64 = 3_600_000;

/// Time to recovery: from a few tens of milliseconds (a crash noticed at once, restarted
/// at once) to minutes (heartbeats lost, backoff at its cap).
const RECOVERY_BUCKETS: [f64; 14] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// A commit is one SQLite transaction and one fsync: sub-millisecond to tens of ms.
const COMMIT_BUCKETS: [f64; 12] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Records per commit: 1 when quiet, thousands under load (group commit).
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

fn recovery_histogram() -> Histogram {
    Histogram::new(RECOVERY_BUCKETS)
}

/// Who may scrape `GET /metrics`.
#[derive(Clone, Debug, Default)]
pub struct MetricsAccess {
    /// `[server] metrics_public = true`: anyone who can reach the listener.
    pub public: bool,
    /// `[server] metrics_token_file`: a token that reads metrics and nothing else.
    pub token: Option<String>,
}

/// The counters and histograms of things that happened since this hale started.
pub struct Metrics {
    started: Instant,
    downs: Family<Labels, Counter>,
    restarts: Family<Labels, Counter>,
    recovery: Family<Labels, Histogram, fn() -> Histogram>,
    quarantines: Family<Labels, Counter>,
    stalls: Family<Labels, Counter>,
    breaker_opened: Family<Labels, Counter>,
    spend_tokens: Family<Labels, Counter>,
    spend_cost: Family<Labels, Counter>,
    tasks_submitted: Counter,
    redeliveries: Counter,
    shed: Family<Labels, Counter>,
    messages_sent: Counter,
    messages_acked: Counter,
    commit_seconds: Histogram,
    commit_records: Histogram,
    /// Damaged records set aside by recovery: at this start, and by earlier repairs.
    damaged_now: u64,
    damaged_before: u64,
    snapshot_dir: Mutex<Option<PathBuf>>,
    tracking: Mutex<Tracking>,
}

/// What timing recoveries needs: the first detection of each agent that is down and not
/// yet back, and the recent recoveries.
#[derive(Default)]
struct Tracking {
    /// Agent → (incarnation declared down, when, role).
    down: HashMap<AgentName, (u64, Timestamp, String)>,
    /// (when it came back, seconds it took), oldest first, at most RECENT_RECOVERIES_MAX.
    recent: VecDeque<(Timestamp, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            downs: Family::default(),
            restarts: Family::default(),
            recovery: Family::new_with_constructor(recovery_histogram),
            quarantines: Family::default(),
            stalls: Family::default(),
            breaker_opened: Family::default(),
            spend_tokens: Family::default(),
            spend_cost: Family::default(),
            tasks_submitted: Counter::default(),
            redeliveries: Counter::default(),
            shed: Family::default(),
            messages_sent: Counter::default(),
            messages_acked: Counter::default(),
            commit_seconds: Histogram::new(COMMIT_BUCKETS),
            commit_records: Histogram::new(BATCH_BUCKETS),
            damaged_now: 0,
            damaged_before: 0,
            snapshot_dir: Mutex::new(None),
            tracking: Mutex::new(Tracking::default()),
        }
    }
}

/// A short, bounded name of a cause, for a label (the detector is coarser).
fn cause_name(cause: &Cause) -> &'static str {
    match cause {
        Cause::Exited { .. } => "exited",
        Cause::Vanished => "vanished",
        Cause::HeartbeatsLost { .. } => "heartbeats_lost",
        Cause::NotReconnected { .. } => "not_reconnected",
        Cause::StalledProgress { .. } => "stalled_progress",
        Cause::StalledCheckpoints { .. } => "stalled_checkpoints",
        Cause::SiblingFailed { .. } => "sibling_failed",
        Cause::Operator => "operator",
        Cause::Stopped => "stopped",
        Cause::SpawnFailed { .. } => "spawn_failed",
        Cause::ResourceExceeded { .. } => "resource_exceeded",
        Cause::HealthProbe { .. } => "health_probe",
        Cause::OutOfMemory { .. } => "out_of_memory",
        Cause::NodeLost { .. } => "node_lost",
    }
}

fn agent_labels(agent: &str, role: &str) -> Labels {
    vec![("agent".into(), agent.into()), ("role".into(), role.into())]
}

impl Metrics {
    /// With what recovery found: damaged records set aside now and by earlier repairs.
    pub fn new(damaged_now: u64, damaged_before: u64, snapshot_dir: PathBuf) -> Metrics {
        Metrics { damaged_now, damaged_before, snapshot_dir: Mutex::new(Some(snapshot_dir)), ..Metrics::default() }
    }

    /// The hook for the log writer: each commit's size and duration.
    pub fn commit_hook(self: &std::sync::Arc<Self>) -> hale_store::CommitHook {
        let metrics = self.clone();
        hale_store::CommitHook(std::sync::Arc::new(move |records, took: Duration| {
            metrics.commit_seconds.observe(took.as_secs_f64());
            metrics.commit_records.observe(records as f64);
        }))
    }

    /// Counts the events of one command, as the engine applies them. `core` is the state
    /// before them (for an agent's role).
    pub fn observe(&self, core: &Core, now: Timestamp, events: &[Event]) {
        let role_of = |agent: &AgentName| {
            core.state().agent(agent.as_str()).map(|record| record.role.to_string()).unwrap_or_default()
        };
        for event in events {
            match event {
                Event::AgentDown { agent, incarnation, cause } => {
                    let role = role_of(agent);
                    let mut labels = agent_labels(agent.as_str(), &role);
                    labels.push(("cause".into(), cause_name(cause).into()));
                    labels.push(("detector".into(), cause.detector().into()));
                    self.downs.get_or_create(&labels).inc();
                    if cause.detector() == "stall" {
                        self.stalls.get_or_create(&agent_labels(agent.as_str(), &role)).inc();
                    }
                    // Stopped on purpose is no failure: nothing to recover from.
                    let mut tracking = self.tracking.lock().expect("metrics lock");
                    if matches!(cause, Cause::Stopped) {
                        tracking.down.remove(agent);
                    } else {
                        // Down again before it came back: recovery counts from the first.
                        tracking.down.entry(agent.clone()).or_insert((*incarnation, now, role));
                    }
                }
                Event::IncarnationStarted { agent, incarnation } if *incarnation > 1 => {
                    self.restarts.get_or_create(&agent_labels(agent.as_str(), &role_of(agent))).inc();
                }
                Event::Quarantined { agent, .. } => {
                    self.quarantines.get_or_create(&agent_labels(agent.as_str(), &role_of(agent))).inc();
                }
                Event::BreakerOpened { agent, .. } => {
                    self.breaker_opened.get_or_create(&agent_labels(agent.as_str(), &role_of(agent))).inc();
                }
                Event::SpendReported { agent, spend, .. } => {
                    let labels = agent_labels(agent.as_str(), &role_of(agent));
                    self.spend_tokens.get_or_create(&labels).inc_by(spend.tokens);
                    self.spend_cost.get_or_create(&labels).inc_by(spend.cost);
                }
                Event::TaskSubmitted { .. } => {
                    self.tasks_submitted.inc();
                }
                Event::TaskRetried { .. } => {
                    self.redeliveries.inc();
                }
                Event::MessageSent { .. } => {
                    self.messages_sent.inc();
                }
                Event::MessageAcked { .. } => {
                    self.messages_acked.inc();
                }
                _ => {}
            }
        }
    }

    /// A submission refused because the queue is too long for its priority.
    pub fn shed(&self, priority: &str) {
        self.shed.get_or_create(&vec![("priority".into(), priority.into())]).inc();
    }

    /// `incarnation` of `agent` spoke (hello or heartbeat) at `now`: if it is a newer run
    /// than the one declared down, the agent has recovered.
    pub fn resumed(&self, agent: &AgentName, incarnation: u64, now: Timestamp) {
        let mut tracking = self.tracking.lock().expect("metrics lock");
        let Some((down, _, _)) = tracking.down.get(agent) else { return };
        if incarnation <= *down {
            return;
        }
        let (_, at, role) = tracking.down.remove(agent).expect("just found");
        let seconds = now.0.saturating_sub(at.0) as f64 / 1000.0;
        self.recovery.get_or_create(&agent_labels(agent.as_str(), &role)).observe(seconds);
        if tracking.recent.len() == RECENT_RECOVERIES_MAX {
            tracking.recent.pop_front();
        }
        tracking.recent.push_back((now, seconds));
    }

    /// Recoveries within the last hour before `now`: how many, and the 50th and 99th
    /// percentiles of their time to recovery in seconds (nearest rank).
    pub fn recent_recoveries(&self, now: Timestamp) -> (u64, Option<f64>, Option<f64>) {
        let tracking = self.tracking.lock().expect("metrics lock");
        let since = now.0.saturating_sub(RECENT_WINDOW_MS);
        let mut seconds: Vec<f64> =
            tracking.recent.iter().filter(|(at, _)| at.0 >= since).map(|(_, seconds)| *seconds).collect();
        seconds.sort_by(f64::total_cmp);
        let rank = |p: f64| -> Option<f64> {
            let n = seconds.len();
            (n > 0).then(|| seconds[((p * n as f64).ceil() as usize).clamp(1, n) - 1])
        };
        (seconds.len() as u64, rank(0.50), rank(0.99))
    }

    /// The text of one scrape: these metrics and the `gauges` read for it.
    pub fn encode(&self, gauges: &Gauges) -> String {
        let mut registry = Registry::with_prefix("hale");
        self.register_events(&mut registry);
        gauges.register(&mut registry, self);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String does not fail");
        text
    }

    fn register_events(&self, registry: &mut Registry) {
        registry.register(
            "agent_downs",
            "Runs of agents declared down, by cause and by the detector that saw it",
            self.downs.clone(),
        );
        registry.register("agent_restarts", "New runs of agents that had run before", self.restarts.clone());
        registry.register_with_unit(
            "agent_recovery",
            "Time to recovery: from an agent's run declared down to the first hello or heartbeat of a later run",
            Unit::Seconds,
            self.recovery.clone(),
        );
        registry.register("agent_quarantines", "Times agents were quarantined", self.quarantines.clone());
        registry.register(
            "agent_stalls",
            "Runs declared down by the stall detectors (progress or checkpoints)",
            self.stalls.clone(),
        );
        registry.register(
            "agent_breaker_opens",
            "Times an agent's circuit breaker opened",
            self.breaker_opened.clone(),
        );
        registry.register("agent_spend_tokens", "Tokens agents reported spending", self.spend_tokens.clone());
        registry.register("agent_spend_cost", "Cost units agents reported spending", self.spend_cost.clone());
        registry.register("tasks_submitted", "Tasks accepted", self.tasks_submitted.clone());
        registry.register(
            "task_redeliveries",
            "Task attempts that ended without an outcome, putting the task back in the queue for another",
            self.redeliveries.clone(),
        );
        registry.register(
            "task_submissions_shed",
            "Task submissions refused because the queue was too long for their priority",
            self.shed.clone(),
        );
        registry.register("messages_sent", "Messages put in a mailbox", self.messages_sent.clone());
        registry.register("messages_acked", "Messages acknowledged by their recipient", self.messages_acked.clone());
        registry.register_with_unit(
            "log_commit",
            "Time of one log commit (SQLite transaction and fsync) by the writer",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        registry.register(
            "log_commit_records",
            "Records written per log commit (group commit batch size)",
            self.commit_records.clone(),
        );
        let damaged: Family<Labels, Gauge> = Family::default();
        damaged.get_or_create(&vec![("when".into(), "this_start".into())]).set(self.damaged_now as i64);
        damaged.get_or_create(&vec![("when".into(), "earlier".into())]).set(self.damaged_before as i64);
        registry.register(
            "log_damaged_records",
            "Damaged log records set aside by recovery (--repair), at this start or earlier",
            damaged,
        );
    }
}

/// Gauges read from the state (inside the engine) for one scrape.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Agent → (role, state word).
    agents: BTreeMap<String, (String, &'static str)>,
    /// Breaker state word → agents.
    breakers: BTreeMap<&'static str, i64>,
    tasks: BTreeMap<&'static str, i64>,
    queued: i64,
    mailboxes: BTreeMap<String, i64>,
    mode: String,
    /// Managed agents' current process ids, for their resource use (on a cluster, of the
    /// agents placed on this node only: the others' run on other machines).
    pids: BTreeMap<String, u32>,
    /// On a cluster: node → (`up` or `lost`, managed agents placed on it and live).
    nodes: BTreeMap<String, (&'static str, i64)>,
}

/// The states `hale_agents` always reports (zero when none), so dashboards see each.
pub const AGENT_STATES: [&str; 13] = [
    "declared",
    "pending",
    "starting",
    "running",
    "backoff",
    "failed",
    "stopped",
    "quarantined",
    "down",
    "alive",
    "suspect",
    "reconnecting",
    "disconnected",
];

/// What state an agent is in, in one word: quarantine first; a managed agent's
/// supervision status; an attached agent's liveness (or `down`, or `disconnected`).
pub fn agent_state(core: &Core, record: &hale_core::AgentRecord) -> &'static str {
    if record.health.quarantine.is_some() {
        return "quarantined";
    }
    if let Some(managed) = &record.managed {
        return managed.status.name();
    }
    if record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation) {
        return "down";
    }
    match core.liveness(record.name.as_str()).filter(|live| live.incarnation == record.incarnation) {
        Some(live) => match live.health {
            hale_core::Health::Alive => "alive",
            hale_core::Health::Suspect => "suspect",
            hale_core::Health::Reconnecting => "reconnecting",
        },
        None => "disconnected",
    }
}

impl Gauges {
    /// Reads them from the core (run inside the engine: keep it linear and quick).
    pub fn read(core: &Core) -> Gauges {
        Gauges::read_on(core, None)
    }

    /// [`read`](Gauges::read) on node `local` of a cluster.
    pub fn read_on(core: &Core, local: Option<&hale_core::NodeName>) -> Gauges {
        let state = core.state();
        let mut gauges = Gauges { mode: state.mode().to_string(), ..Gauges::default() };
        for record in state.agents() {
            let name = record.name.to_string();
            gauges.agents.insert(name.clone(), (record.role.to_string(), agent_state(core, record)));
            let breaker = match record.health.breaker {
                hale_core::health::Breaker::Closed => "closed",
                hale_core::health::Breaker::Open { .. } => "open",
                hale_core::health::Breaker::HalfOpen { .. } => "half_open",
            };
            *gauges.breakers.entry(breaker).or_default() += 1;
            if let Some(mailbox) = state.mail().mailbox(record.name.as_str()) {
                gauges.mailboxes.insert(name.clone(), mailbox.unacked_len() as i64);
            }
            let live = record.managed.as_ref().filter(|managed| managed.is_live());
            let here = live.filter(|managed| managed.node.is_none() || managed.node.as_ref() == local);
            if let Some(process) = here.and_then(|managed| managed.process) {
                gauges.pids.insert(name, process.pid);
            }
            if let Some(node) = live.and_then(|managed| managed.node.as_ref()) {
                gauges.nodes.entry(node.to_string()).or_insert(("up", 0)).1 += 1;
            }
        }
        for (name, record) in state.nodes() {
            let status = if record.is_up() { "up" } else { "lost" };
            gauges.nodes.entry(name.to_string()).or_insert((status, 0)).0 = status;
        }
        for task in state.tasks().all() {
            *gauges.tasks.entry(task.status.word()).or_default() += 1;
        }
        gauges.queued = state.tasks().queued() as i64;
        gauges
    }

    /// Agents by state word, every known state present.
    pub fn agents_by_state(&self) -> BTreeMap<String, u64> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (_, state) in self.agents.values() {
            *counts.entry((*state).to_string()).or_default() += 1;
        }
        counts
    }

    fn register(&self, registry: &mut Registry, metrics: &Metrics) {
        let uptime = FloatGauge::default();
        uptime.set(metrics.started.elapsed().as_secs_f64());
        registry.register_with_unit("uptime", "Time since this hale started", Unit::Seconds, uptime);

        let agents: Family<Labels, Gauge> = Family::default();
        for state in AGENT_STATES {
            agents.get_or_create(&vec![("state".into(), state.into())]).set(0);
        }
        for (_, state) in self.agents.values() {
            agents.get_or_create(&vec![("state".into(), (*state).into())]).inc();
        }
        registry.register("agents", "Agents by state", agents);

        let agent_state: Family<Labels, Gauge> = Family::default();
        for (agent, (role, state)) in &self.agents {
            let mut labels = agent_labels(agent, role);
            labels.push(("state".into(), (*state).into()));
            agent_state.get_or_create(&labels).set(1);
        }
        registry.register("agent_state", "1 for each agent, labelled with its current state", agent_state);

        let quarantined = Gauge::<i64>::default();
        quarantined.set(self.agents.values().filter(|(_, state)| *state == "quarantined").count() as i64);
        registry.register("agents_quarantined", "Agents in quarantine now", quarantined);

        let breakers: Family<Labels, Gauge> = Family::default();
        for state in ["closed", "open", "half_open"] {
            breakers.get_or_create(&vec![("state".into(), state.into())]).set(0);
        }
        for (state, count) in &self.breakers {
            breakers.get_or_create(&vec![("state".into(), (*state).into())]).set(*count);
        }
        registry.register("agent_breakers", "Agents by the state of their circuit breaker", breakers);

        let tasks: Family<Labels, Gauge> = Family::default();
        for state in ["pending", "running", "shadowed", "compensating", "completed", "failed", "cancelled"] {
            tasks.get_or_create(&vec![("state".into(), state.into())]).set(0);
        }
        for (state, count) in &self.tasks {
            tasks.get_or_create(&vec![("state".into(), (*state).into())]).set(*count);
        }
        registry.register("tasks", "Tasks by state (the log keeps every task)", tasks);
        let queued = Gauge::<i64>::default();
        queued.set(self.queued);
        registry.register("tasks_queued", "Tasks waiting for an agent", queued);

        let depth: Family<Labels, Gauge> = Family::default();
        for (agent, unacked) in &self.mailboxes {
            depth.get_or_create(&vec![("agent".into(), agent.clone())]).set(*unacked);
        }
        registry.register("mailbox_depth", "Messages in an agent's mailbox not yet acknowledged", depth);

        let mode: Family<Labels, Gauge> = Family::default();
        for name in ["optimal", "degraded", "minimal"] {
            mode.get_or_create(&vec![("mode".into(), name.into())]).set(i64::from(self.mode == name));
        }
        registry.register("mode", "The system mode: 1 for the current one", mode);

        let nodes: Family<Labels, Gauge> = Family::default();
        let node_agents: Family<Labels, Gauge> = Family::default();
        if !self.nodes.is_empty() {
            for status in ["up", "lost"] {
                nodes.get_or_create(&vec![("status".into(), status.into())]).set(0);
            }
        }
        for (node, (status, agents)) in &self.nodes {
            nodes.get_or_create(&vec![("status".into(), (*status).into())]).inc();
            node_agents.get_or_create(&vec![("node".into(), node.clone())]).set(*agents);
        }
        registry.register("nodes", "The nodes of the cluster by status (none on a single node)", nodes);
        registry.register("node_agents", "Managed agents placed on each node and starting or running", node_agents);

        let (bytes, age) = metrics.newest_snapshot();
        let snapshot_bytes = Gauge::<i64>::default();
        snapshot_bytes.set(bytes.unwrap_or(0) as i64);
        registry.register_with_unit(
            "snapshot_size",
            "Size of the newest snapshot (0: none)",
            Unit::Bytes,
            snapshot_bytes,
        );
        let snapshot_age = FloatGauge::default();
        snapshot_age.set(age.map_or(-1.0, |age| age.as_secs_f64()));
        registry.register_with_unit(
            "snapshot_age",
            "Time since the newest snapshot was written (-1: none)",
            Unit::Seconds,
            snapshot_age,
        );

        let own = crate::process::usage(std::process::id());
        let rss = Gauge::<i64>::default();
        rss.set(own.map_or(0, |usage| usage.rss_bytes as i64));
        registry.register_with_unit("process_resident_memory", "hale's resident memory", Unit::Bytes, rss);
        let cpu = FloatGauge::default();
        cpu.set(own.map_or(0.0, |usage| usage.cpu_ms as f64 / 1000.0));
        // A gauge set from /proc rather than a counter: its value is read, not counted.
        registry.register_with_unit("process_cpu", "CPU time hale has used (user and system)", Unit::Seconds, cpu);
        let fds = Gauge::<i64>::default();
        fds.set(std::fs::read_dir("/proc/self/fd").map_or(0, |entries| entries.count() as i64));
        registry.register("process_open_fds", "File descriptors hale has open", fds);

        let agent_rss: Family<Labels, Gauge> = Family::default();
        let pids: Vec<u32> = self.pids.values().copied().collect();
        let usage = if pids.is_empty() { Default::default() } else { crate::process::groups_usage(&pids) };
        for (agent, pid) in &self.pids {
            if let Some(usage) = usage.get(pid) {
                agent_rss.get_or_create(&vec![("agent".into(), agent.clone())]).set(usage.rss_bytes as i64);
            }
        }
        registry.register_with_unit(
            "agent_resident_memory",
            "Resident memory of a managed agent's process group",
            Unit::Bytes,
            agent_rss,
        );
    }
}

impl Metrics {
    /// The newest snapshot file's size and age.
    fn newest_snapshot(&self) -> (Option<u64>, Option<Duration>) {
        let dir = self.snapshot_dir.lock().expect("metrics lock").clone();
        let Some(newest) =
            dir.and_then(|dir| hale_store::snapshot::list(&dir).ok()).and_then(|files| files.into_iter().next())
        else {
            return (None, None);
        };
        let Ok(meta) = std::fs::metadata(&newest.path) else { return (None, None) };
        let age = meta.modified().ok().and_then(|modified| modified.elapsed().ok());
        (Some(meta.len()), age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_the_last_hour() {
        let metrics = Metrics::default();
        let agent = AgentName::new("a").unwrap();
        for (i, seconds) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
            let down = Timestamp(10_000_000 + i as u64 * 100_000);
            metrics.tracking.lock().unwrap().down.insert(agent.clone(), (i as u64 + 1, down, "r".into()));
            metrics.resumed(&agent, i as u64 + 2, Timestamp(down.0 + (seconds * 1000.0) as u64));
        }
        let (count, p50, p99) = metrics.recent_recoveries(Timestamp(10_400_000));
        assert_eq!((count, p50, p99), (4, Some(2.0), Some(4.0)));
        // An hour later none is recent.
        assert_eq!(metrics.recent_recoveries(Timestamp(10_400_000 + RECENT_WINDOW_MS)).0, 0);
    }

    #[test]
    fn an_older_run_speaking_is_no_recovery() {
        let metrics = Metrics::default();
        let agent = AgentName::new("a").unwrap();
        metrics.tracking.lock().unwrap().down.insert(agent.clone(), (3, Timestamp(1000), "r".into()));
        metrics.resumed(&agent, 3, Timestamp(2000));
        assert_eq!(metrics.recent_recoveries(Timestamp(3000)).0, 0);
        metrics.resumed(&agent, 4, Timestamp(2500));
        assert_eq!(metrics.recent_recoveries(Timestamp(3000)), (1, Some(1.5), Some(1.5)));
    }

    #[test]
    fn the_text_has_valid_names_and_types() {
        let metrics = Metrics::default();
        let agent = AgentName::new("a").unwrap();
        metrics.tracking.lock().unwrap().down.insert(agent.clone(), (1, Timestamp(1000), "r".into()));
        metrics.resumed(&agent, 2, Timestamp(1250));
        let text = metrics.encode(&Gauges::default());
        // A family without series is left out (no agent has gone down here).
        assert!(!text.contains("hale_agent_downs"), "{text}");
        assert!(text.contains("# TYPE hale_agent_recovery_seconds histogram"), "{text}");
        assert!(text.contains("hale_agent_recovery_seconds_sum{agent=\"a\",role=\"r\"} 0.25"), "{text}");
        assert!(text.contains("# TYPE hale_tasks_submitted counter\nhale_tasks_submitted_total 0"), "{text}");
        assert!(text.contains("hale_log_commit_seconds_count 0"), "{text}");
        assert!(text.contains("hale_agents{state=\"running\"} 0"), "{text}");
    }
}
