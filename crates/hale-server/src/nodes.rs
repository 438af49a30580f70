//! Managed agents across the nodes of a cluster: each node's lease, the leader's watch
//! over the nodes, and each node's reconciliation of its processes with the log.
//!
//! Every node, the leader included:
//! - **renews its lease** every `lease / 6`: it sends the leader what it says of itself
//!   (name, address, labels, which agents and pools its hale.toml can start). The leader
//!   confirms with a quorum that it still leads (a read index), logs the node up if that
//!   is news, and answers with that index. The lease then runs for `lease` from the moment
//!   the node *sent* the request, by the node's own clock.
//! - **runs what the log places on it**: the incarnations of managed agents placed on it
//!   and neither down nor superseded. It starts an incarnation only while it holds a lease,
//!   only once its committed state has caught up with the index of its last renewal, and
//!   never one it has already run (a run that ended is replaced by a new incarnation,
//!   decided by the leader). It stops every process the log no longer places on it.
//! - **fences itself** when its lease runs out: SIGTERM to every agent `fence_grace`
//!   before the end, SIGKILL at the end. A node cut off from the quorum therefore has no
//!   agent running once its lease is over.
//! - carries out quarantine's `pause` on its own runs (SIGSTOP, SIGCONT on release), from
//!   the log as everything else.
//! - **reports** what its keepers see (a process started or ended, a measurement, tokens
//!   issued at a start) to the leader, in order, retrying until the leader takes them.
//!
//! The leader declares a node lost (`NodeLost`: its agents are down with cause
//! `node_lost` and placed elsewhere in the same decision) once it has had no renewal from
//! it for `lease × (1 + DRIFT_ALLOWANCE)`, counted from when this leader began to lead if
//! that is later.
//!
//! Why no agent runs twice (see ARCHITECTURE.md, "Agents across nodes"): a node's lease
//! begins before the leader confirmed its quorum, and a leader elected later was elected
//! after that confirmation (the quorums intersect), so every lease a node holds ends
//! before `lease × (1 + drift)` has passed on any leader's clock since it last heard the
//! node or began to lead, and only then does it place the node's agents elsewhere.

use crate::auth::Auth;
use crate::engine::{Engine, EngineError};
use crate::supervisor::Supervisor;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hale_cluster::TypeConfig;
use hale_cluster::network::{ClusterSecret, FROM_HEADER, PeerClient};
use hale_cluster::openraft::Raft;
use hale_core::nodes::NodeInfo;
use hale_core::supervision::{Cause, ManagedStatus, ProcessRef};
use hale_core::{
    AgentName, CredentialCommand, Measurement, NodeName, Observation, RoleName, State as CoreState, SupervisionCommand,
    Timestamp,
};
use hale_store::WriteError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A node renews its lease.
pub const RENEW_PATH: &str = "/v1/cluster/node/renew";
/// A node reports what its keepers saw.
pub const REPORT_PATH: &str = "/v1/cluster/node/report";
/// A node that stops says so, after stopping its agents: they start elsewhere at once.
pub const LEAVE_PATH: &str = "/v1/cluster/node/leave";

/// How much longer than a node's lease the leader waits before it declares the node
/// lost: an allowance for clocks that run at different rates (the node measures its lease
/// by its clock, the leader its wait by its own: 20% covers rates that differ by up to 9%
/// each way, where quartz drifts by about 0.01%) and for a renewal's time on the way.
pub const DRIFT_ALLOWANCE: f64 = 0.2;

/// The default node lease (`[cluster] node_lease_ms`).
pub const LEASE_DEFAULT: Duration = Duration::from_secs(3);

/// How long before its lease runs out a node begins to stop its agents (SIGTERM; SIGKILL
/// when the lease is over): the stop grace, at most a quarter of the lease. With renewals
/// every sixth of the lease, a node keeps its agents through `lease × 7/12` without a
/// renewal, which `[cluster] node_lease_ms` of at least three election timeouts keeps
/// above any failover.
pub fn fence_grace(lease: Duration, stop_grace: Duration) -> Duration {
    stop_grace.min(lease / 4)
}

/// How long the leader waits without a renewal before it declares a node lost.
pub fn node_timeout(lease: Duration) -> Duration {
    lease.mul_f64(1.0 + DRIFT_ALLOWANCE)
}

#[derive(Debug, Serialize, Deserialize)]
struct Renewal {
    node: NodeName,
    info: NodeInfo,
}

/// The answer to a renewal: the leader's read index when it confirmed it leads.
#[derive(Debug, Serialize, Deserialize)]
struct Granted {
    index: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Leaving {
    node: NodeName,
}

/// What a node's keepers tell the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Started {
        agent: AgentName,
        incarnation: u64,
        process: ProcessRef,
    },
    Down {
        agent: AgentName,
        incarnation: u64,
        cause: Cause,
    },
    Measured {
        agent: AgentName,
        incarnation: u64,
        measurement: Measurement,
    },
    /// Tokens minted for a start: the refresh token's hash, logged before it is handed out.
    Tokens {
        agent: AgentName,
        refresh_hash: String,
        expires_at: u64,
    },
}

impl Report {
    /// The report of a keeper's command, for the commands keepers send.
    pub fn of(command: SupervisionCommand) -> Option<Report> {
        match command {
            SupervisionCommand::ProcessStarted { agent, incarnation, process } => {
                Some(Report::Started { agent, incarnation, process })
            }
            SupervisionCommand::ReportDown { agent, incarnation, cause } => {
                Some(Report::Down { agent, incarnation, cause })
            }
            _ => None,
        }
    }
}

/// This node's lease, as its last granted renewal left it.
#[derive(Clone, Copy, Debug, Default)]
struct Lease {
    until: Option<Instant>,
    /// The leader's read index at that renewal: nothing starts before the committed state
    /// here has reached it.
    index: u64,
}

/// Why a call to the leader did not go through.
#[derive(Debug)]
enum CallError {
    /// Worth another try: no leader known, not reachable, not leading any more.
    Transient(String),
    /// The leader refused it: trying again would not help.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transient(why) | CallError::Refused(why) => f.write_str(why),
        }
    }
}

impl From<EngineError> for CallError {
    fn from(error: EngineError) -> CallError {
        match error {
            EngineError::Rejected(rejection) => CallError::Refused(rejection.to_string()),
            other => CallError::Transient(other.to_string()),
        }
    }
}

/// Who this node is among the nodes, and how long its lease runs.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub name: NodeName,
    pub info: NodeInfo,
    pub lease: Duration,
    /// The nodes serve TLS: agents are told `wss://` addresses.
    pub tls: bool,
}

/// One node's part in running agents across the cluster (see the module doc).
pub struct Nodes {
    settings: NodeSettings,
    engine: Engine,
    raft: Raft<TypeConfig>,
    peers: PeerClient,
    secret: ClusterSecret,
    auth: Arc<Auth>,
    /// On the leader: when each node last renewed.
    heard: Mutex<HashMap<NodeName, Instant>>,
    lease: watch::Sender<Lease>,
    reports: mpsc::UnboundedSender<Report>,
    /// This node is stopping: its keepers' reports are not sent (it leaves, and the leader
    /// places its agents elsewhere).
    leaving: AtomicBool,
}

impl Nodes {
    /// Starts renewing this node's lease, sending its reports, and (while it leads)
    /// watching the other nodes.
    pub fn start(
        settings: NodeSettings,
        engine: Engine,
        raft: Raft<TypeConfig>,
        peers: PeerClient,
        secret: ClusterSecret,
        auth: Arc<Auth>,
    ) -> Arc<Nodes> {
        let (reports, queued) = mpsc::unbounded_channel();
        let nodes = Arc::new(Nodes {
            settings,
            engine,
            raft,
            peers,
            secret,
            auth,
            heard: Mutex::new(HashMap::new()),
            lease: watch::channel(Lease::default()).0,
            reports,
            leaving: AtomicBool::new(false),
        });
        tokio::spawn(nodes.clone().renew_forever());
        tokio::spawn(nodes.clone().watch_nodes());
        tokio::spawn(nodes.clone().send_reports(queued));
        nodes
    }

    /// The node-to-node routes of the leader's side, behind the cluster secret.
    pub fn routes(self: &Arc<Self>) -> Router {
        let routes = Router::new()
            .route(RENEW_PATH, post(renew))
            .route(REPORT_PATH, post(report))
            .route(LEAVE_PATH, post(leave));
        hale_cluster::network::under_secret(routes, self.secret.clone()).with_state(self.clone())
    }

    /// This node's name.
    pub fn name(&self) -> &NodeName {
        &self.settings.name
    }

    /// On the leader: how long ago each node last renewed its lease, in milliseconds (this
    /// node itself included; empty on a node that has not led).
    pub fn heard_ago(&self) -> BTreeMap<String, u64> {
        let heard = self.heard.lock().expect("heard lock");
        heard.iter().map(|(node, at)| (node.to_string(), at.elapsed().as_millis() as u64)).collect()
    }

    /// What agents started here are told in `HALE_URL`: every member of the cluster, this
    /// node first, so that their clients find the leader among them.
    pub fn hale_url(&self) -> String {
        let scheme = if self.settings.tls { "wss" } else { "ws" };
        let mut addresses = vec![self.settings.info.address.clone()];
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        for (_, node) in metrics.membership_config.membership().nodes() {
            if !addresses.contains(&node.addr) {
                addresses.push(node.addr.clone());
            }
        }
        addresses.iter().map(|address| format!("{scheme}://{address}")).collect::<Vec<_>>().join(",")
    }

    /// Whether this node's engine leads (has taken leadership over from Raft).
    fn leads(&self) -> bool {
        let durability = self.engine.durability();
        durability.not_leader.is_none() && durability.failed.is_none()
    }

    fn not_leader(&self) -> EngineError {
        let leader = self.engine.durability().not_leader.and_then(|not_leader| not_leader.leader);
        EngineError::Log(WriteError::NotLeader { leader })
    }

    /// The address of the leader Raft knows of, if any.
    fn leader_address(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        metrics.membership_config.membership().get_node(&leader).map(|node| node.addr.clone())
    }

    /// POSTs `body` to `path` on the leader.
    async fn call_leader<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let Some(address) = self.leader_address() else {
            return Err(CallError::Transient("no leader is known".into()));
        };
        let sent = self
            .peers
            .client()
            .post(self.peers.url(&address, path))
            .bearer_auth(self.secret.expose())
            .header(FROM_HEADER, self.settings.info.id)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|error| CallError::Transient(format!("{address}: {error}")))?;
        let status = sent.status();
        if !status.is_success() {
            let text = sent.text().await.unwrap_or_default();
            let why = format!("{address} answered {status}: {text}");
            return Err(if status.is_client_error() { CallError::Refused(why) } else { CallError::Transient(why) });
        }
        sent.json().await.map_err(|error| CallError::Transient(format!("{address}: {error}")))
    }

    // The leader's side.

    /// A node renews its lease: if this node leads (confirmed with a quorum), notes when,
    /// logs the node up if that is news, and answers with the read index.
    async fn grant(&self, renewal: Renewal) -> Result<Granted, EngineError> {
        let received = Instant::now();
        if !self.leads() {
            return Err(self.not_leader());
        }
        let read = self.raft.ensure_linearizable().await.map_err(|_| self.not_leader())?;
        let index = read.map_or(0, |log_id| log_id.index);
        let Renewal { node, info } = renewal;
        let (asked, told) = (node.clone(), info.clone());
        let known = self
            .engine
            .read(move |state| state.node(&asked).is_some_and(|record| record.is_up() && record.info == told))
            .await?;
        if !known {
            self.engine.execute(SupervisionCommand::NodeUp { node: node.clone(), info }).await?;
        }
        self.heard.lock().expect("heard lock").insert(node, received);
        Ok(Granted { index })
    }

    /// Takes in a node's report (on the leader).
    async fn take_report(&self, report: Report) -> Result<(), EngineError> {
        match report {
            Report::Started { agent, incarnation, process } => {
                self.engine.execute(SupervisionCommand::ProcessStarted { agent, incarnation, process }).await?;
            }
            Report::Down { agent, incarnation, cause } => {
                self.engine.execute(SupervisionCommand::ReportDown { agent, incarnation, cause }).await?;
            }
            Report::Measured { agent, incarnation, measurement } => {
                self.engine.observe(agent, incarnation, Observation::Measured(measurement)).await?;
            }
            Report::Tokens { agent, refresh_hash, expires_at } => {
                let command = CredentialCommand::Issue { agent, refresh_hash, expires_at: Timestamp(expires_at) };
                self.engine.execute(command).await?;
            }
        }
        Ok(())
    }

    /// Declares lost every node that has not renewed for the node timeout, while this
    /// node leads.
    async fn watch_nodes(self: Arc<Self>) {
        let timeout = node_timeout(self.settings.lease);
        let every = (self.settings.lease / 30).max(Duration::from_millis(20));
        let mut leading_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(every).await;
            if !self.leads() {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(Instant::now);
            let me = self.settings.name.clone();
            let up = self.engine.read(move |state| {
                state
                    .nodes()
                    .filter(|(name, record)| record.is_up() && **name != me)
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>()
            });
            let Ok(up) = up.await else { continue };
            for node in up {
                let heard = self.heard.lock().expect("heard lock").get(&node).copied();
                let last = heard.map_or(since, |heard| heard.max(since));
                let silent = last.elapsed();
                if silent > timeout {
                    let silent_ms = silent.as_millis() as u64;
                    tracing::warn!(%node, silent_ms, "node LOST: no lease renewal within the node timeout; its agents start elsewhere");
                    let command = SupervisionCommand::NodeLost { node: node.clone(), silent_ms };
                    if let Err(error) = self.engine.execute(command).await {
                        tracing::warn!(%node, %error, "could not log the node lost");
                    }
                }
            }
        }
    }

    // Every node's side.

    /// Renews this node's lease every `lease / 6`, for as long as the server runs.
    async fn renew_forever(self: Arc<Self>) {
        let every = self.settings.lease / 6;
        loop {
            let sent = Instant::now();
            let renewal = Renewal { node: self.settings.name.clone(), info: self.settings.info.clone() };
            let granted = if self.leads() {
                self.grant(renewal).await.map_err(CallError::from)
            } else {
                self.call_leader::<_, Granted>(RENEW_PATH, &renewal, every.max(Duration::from_millis(200))).await
            };
            match granted {
                Ok(granted) => {
                    self.lease.send_replace(Lease { until: Some(sent + self.settings.lease), index: granted.index });
                }
                Err(CallError::Refused(why)) => {
                    tracing::error!(node = %self.settings.name, %why, "the leader refused this node's lease: it runs no agents");
                }
                Err(CallError::Transient(why)) => tracing::debug!(%why, "lease not renewed this time"),
            }
            tokio::time::sleep_until((sent + every).into()).await;
        }
    }

    /// Queues a keeper's report for the leader (sent in order, see `send_reports`).
    pub fn report(&self, report: Report) {
        let _ = self.reports.send(report);
    }

    /// Sends reports to the leader in order. A report the leader cannot take now (no
    /// leader, not reachable) is tried again until it is taken or refused; measurements
    /// are tried once (a later one will come).
    async fn send_reports(self: Arc<Self>, mut queued: mpsc::UnboundedReceiver<Report>) {
        while let Some(report) = queued.recv().await {
            let mut wait = Duration::from_millis(20);
            loop {
                if self.leaving.load(Ordering::SeqCst) {
                    break;
                }
                let sent = if self.leads() {
                    self.take_report(report.clone()).await.map_err(CallError::from)
                } else {
                    self.call_leader::<_, serde_json::Value>(REPORT_PATH, &report, Duration::from_secs(2))
                        .await
                        .map(drop)
                };
                match sent {
                    Ok(()) => break,
                    Err(CallError::Refused(why)) => {
                        tracing::debug!(?report, %why, "the leader refused a report");
                        break;
                    }
                    Err(CallError::Transient(_)) if matches!(report, Report::Measured { .. }) => break,
                    Err(CallError::Transient(why)) => {
                        tracing::debug!(%why, "a report waits for the leader");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Tokens for an agent this node starts: minted here (every node signs with the key
    /// the cluster secret gives), the refresh token's hash logged by the leader first.
    pub async fn issue_tokens(&self, agent: &AgentName) -> Result<hale_proto::TokenPair, String> {
        let minted = self.auth.mint(agent);
        let report = Report::Tokens {
            agent: agent.clone(),
            refresh_hash: minted.refresh_hash.clone(),
            expires_at: minted.refresh_expires_at_ms,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let sent = if self.leads() {
                self.take_report(report.clone()).await.map_err(CallError::from)
            } else {
                self.call_leader::<_, serde_json::Value>(REPORT_PATH, &report, Duration::from_secs(2)).await.map(drop)
            };
            match sent {
                Ok(()) => break,
                Err(CallError::Transient(why)) if Instant::now() < deadline => {
                    tracing::debug!(%why, "the tokens wait for the leader");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error.to_string()),
            }
        }
        Ok(hale_proto::TokenPair {
            agent: agent.to_string(),
            access_token: minted.access_token,
            access_expires_at_ms: minted.access_expires_at_ms,
            refresh_token: minted.refresh_token,
            refresh_expires_at_ms: minted.refresh_expires_at_ms,
        })
    }

    /// Runs what the log places on this node and stops what it does not, fencing this
    /// node when its lease runs out (see the module doc). Returns when the server stops.
    pub async fn reconcile(
        self: Arc<Self>,
        supervisor: Arc<Supervisor>,
        committed: hale_cluster::CommittedView,
        stop_grace: Duration,
    ) {
        let fence_grace = fence_grace(self.settings.lease, stop_grace);
        let mut applied = committed.applied();
        let mut lease = self.lease.subscribe();
        // What each keeper was last told to run, and the newest incarnation run here.
        let mut running: BTreeMap<AgentName, u64> = BTreeMap::new();
        let mut ran: BTreeMap<AgentName, u64> = BTreeMap::new();
        // The runs here that quarantine's `pause` has stopped (SIGSTOP).
        let mut paused: BTreeSet<(AgentName, u64)> = BTreeSet::new();
        let mut swept = false;
        loop {
            if self.leaving.load(Ordering::SeqCst) {
                return;
            }
            let now = Instant::now();
            let Lease { until, index } = *lease.borrow_and_update();
            let fence_at = until.map(|until| until.checked_sub(fence_grace).unwrap_or(until));
            let holds = fence_at.is_some_and(|fence_at| now < fence_at);
            let fresh = committed.last_applied().map_or(0, |log_id| log_id.index) >= index;
            let me = self.settings.name.clone();
            let placed: BTreeMap<AgentName, (u64, RoleName, Option<ProcessRef>)> =
                if holds { committed.with_state(|_, state| placed_on(state, &me)) } else { BTreeMap::new() };
            // Stop what the log no longer places here (or everything, without a lease).
            for (agent, incarnation) in running.clone() {
                if placed.get(&agent).map(|(placed, ..)| *placed) == Some(incarnation) {
                    continue;
                }
                if holds {
                    supervisor.dispatch(hale_core::Effect::Stop { agent: agent.clone(), incarnation });
                } else {
                    let grace = until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
                    tracing::warn!(%agent, incarnation, grace_ms = grace.as_millis() as u64, "this node's lease is running out: stopping the agent");
                    let cause = Cause::NodeLost {
                        node: self.settings.name.to_string(),
                        silent_ms: (self.settings.lease + fence_grace).saturating_sub(grace).as_millis() as u64,
                    };
                    supervisor.fence(&agent, incarnation, grace, cause);
                }
                running.remove(&agent);
            }
            if holds && fresh {
                if !swept {
                    // The first time this node may run anything: processes of this data
                    // directory that an earlier hale left and the log no longer places here
                    // are killed; the others are adopted below.
                    swept = true;
                    sweep(&supervisor, &placed).await;
                }
                for (agent, (incarnation, role, logged)) in &placed {
                    if running.get(agent) == Some(incarnation) || ran.get(agent).is_some_and(|ran| ran >= incarnation) {
                        continue;
                    }
                    supervisor.run(agent, role, *incarnation, *logged);
                    running.insert(agent.clone(), *incarnation);
                    ran.insert(agent.clone(), *incarnation);
                }
            }
            // Quarantine's `pause`, as the leader's effects carry it out on a single node:
            // SIGSTOP while the log has the run quarantined so, SIGCONT once released.
            let want_paused: BTreeSet<(AgentName, u64)> =
                if holds { committed.with_state(|_, state| paused_on(state, &me)) } else { BTreeSet::new() };
            for (agent, incarnation) in want_paused.difference(&paused) {
                if running.get(agent) == Some(incarnation) {
                    supervisor.dispatch(hale_core::Effect::Pause { agent: agent.clone(), incarnation: *incarnation });
                }
            }
            for (agent, incarnation) in paused.difference(&want_paused) {
                supervisor.dispatch(hale_core::Effect::Resume { agent: agent.clone(), incarnation: *incarnation });
            }
            paused = want_paused
                .into_iter()
                .filter(|(agent, incarnation)| running.get(agent) == Some(incarnation))
                .collect();
            let wake = fence_at.filter(|fence_at| *fence_at > now).unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                _ = lease.changed() => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// This node is about to stop its agents and leave: from now on it starts nothing and
    /// reports nothing (their exits would have the leader restart them here).
    pub fn begin_leaving(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    /// This node stops: its agents are stopped here first (by the caller), then the leader
    /// is told, and places them elsewhere at once rather than after the node timeout.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        let leaving = Leaving { node: self.settings.name.clone() };
        // Bounded: a cluster without a quorum commits nothing, and the node stops anyway.
        let wait = Duration::from_secs(2);
        let told = if self.leads() {
            let command = SupervisionCommand::NodeLost { node: leaving.node.clone(), silent_ms: 0 };
            match tokio::time::timeout(wait, self.engine.execute(command)).await {
                Ok(done) => done.map(drop).map_err(CallError::from),
                Err(_) => Err(CallError::Transient("not committed within 2 s: no quorum".into())),
            }
        } else {
            self.call_leader::<_, serde_json::Value>(LEAVE_PATH, &leaving, wait).await.map(drop)
        };
        match told {
            Ok(()) => tracing::info!(node = %leaving.node, "left: the leader places this node's agents elsewhere"),
            Err(error) => {
                tracing::warn!(%error, "could not tell the leader this node leaves; it will find out after the node timeout")
            }
        }
    }
}

/// The runs the log places on `node`: current, not down, starting or running.
fn placed_on(state: &CoreState, node: &NodeName) -> BTreeMap<AgentName, (u64, RoleName, Option<ProcessRef>)> {
    state
        .agents()
        .filter_map(|record| {
            let managed = record.managed.as_ref()?;
            let live = matches!(managed.status, ManagedStatus::Starting | ManagedStatus::Running);
            let down = record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation);
            (managed.node.as_ref() == Some(node) && live && !down).then(|| {
                let logged = (managed.status == ManagedStatus::Running).then_some(managed.process).flatten();
                (record.name.clone(), (record.incarnation, record.role.clone(), logged))
            })
        })
        .collect()
}

/// The runs placed on `node` that are quarantined with the `pause` action.
fn paused_on(state: &CoreState, node: &NodeName) -> BTreeSet<(AgentName, u64)> {
    state
        .agents()
        .filter(|record| {
            let here = record.managed.as_ref().is_some_and(|managed| managed.node.as_ref() == Some(node));
            let pausing = record
                .health
                .quarantine
                .as_ref()
                .is_some_and(|quarantine| quarantine.action == hale_core::health::QuarantineAction::Pause);
            here && pausing
        })
        .map(|record| (record.name.clone(), record.incarnation))
        .collect()
}

/// Kills every process of this data directory that is not the logged process of a run
/// placed here (an earlier hale's, whose runs the leader has moved on from).
async fn sweep(supervisor: &Supervisor, placed: &BTreeMap<AgentName, (u64, RoleName, Option<ProcessRef>)>) {
    let marker = supervisor.supervisor_id().to_string();
    let found = tokio::task::spawn_blocking(move || crate::process::find_agents(&marker)).await.unwrap_or_default();
    for process in found {
        let keep = placed.iter().any(|(agent, (incarnation, _, logged))| {
            agent.as_str() == process.agent
                && *incarnation == process.incarnation
                && logged
                    .is_some_and(|logged| logged.pid == process.id.pid && logged.start_ticks == process.id.start_ticks)
        });
        if !keep {
            tracing::warn!(agent = %process.agent, pid = process.id.pid, incarnation = process.incarnation, "killing a process this node no longer runs");
            let _ = crate::process::signal_group(process.id.pid, crate::process::Signal::KILL);
        }
    }
}

async fn renew(State(nodes): State<Arc<Nodes>>, Json(renewal): Json<Renewal>) -> Response {
    match nodes.grant(renewal).await {
        Ok(granted) => Json(granted).into_response(),
        Err(error) => crate::api::ApiError::from(error).into_response(),
    }
}

async fn report(State(nodes): State<Arc<Nodes>>, Json(report): Json<Report>) -> Response {
    match nodes.take_report(report).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(error) => crate::api::ApiError::from(error).into_response(),
    }
}

async fn leave(State(nodes): State<Arc<Nodes>>, Json(leaving): Json<Leaving>) -> Response {
    let command = SupervisionCommand::NodeLost { node: leaving.node, silent_ms: 0 };
    match nodes.engine.execute(command).await {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({}))).into_response(),
        Err(error) => crate::api::ApiError::from(error).into_response(),
    }
}

/// On every node of a cluster: each time this node begins to lead, and once the log has
/// it up among the nodes (so that what it starts is placed on a node), declares the agents
/// and pools of its hale.toml (the leader's hale.toml says how agents are supervised),
/// turns supervision on in its core (restarts after a backoff, recruits for pools), and
/// starts the declared agents that never started or wait for a node. Returns when the
/// engine stops.
pub async fn lead_agents(engine: Engine, me: NodeName, declarations: Vec<SupervisionCommand>) {
    let mut durability = engine.watch_durability();
    let mut leading = false;
    loop {
        let leads = {
            let durability = durability.borrow_and_update();
            durability.not_leader.is_none() && durability.failed.is_none()
        };
        if leads && !leading {
            // Its own renewal logs it up; until then a start would be placed nowhere.
            let mut up = false;
            while !up && engine.durability().not_leader.is_none() {
                let asked = me.clone();
                up = engine
                    .read(move |state| state.node(&asked).is_some_and(|node| node.is_up()))
                    .await
                    .unwrap_or(false);
                if !up {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if !up {
                leading = false;
                continue;
            }
            for command in &declarations {
                if let Err(error) = engine.execute(command.clone()).await {
                    tracing::warn!(%error, "could not declare an agent of hale.toml");
                }
            }
            engine.set_supervising(true).await;
            let waiting = engine.read(|state| {
                state
                    .agents()
                    .filter(|record| {
                        record.managed.as_ref().is_some_and(|managed| {
                            matches!(managed.status, ManagedStatus::Declared | ManagedStatus::Pending { .. })
                        })
                    })
                    .map(|record| record.name.clone())
                    .collect::<Vec<_>>()
            });
            for agent in waiting.await.unwrap_or_default() {
                if let Err(error) = engine.execute(SupervisionCommand::StartManaged { agent: agent.clone() }).await {
                    tracing::warn!(%agent, %error, "could not start a declared agent");
                }
            }
        }
        leading = leads;
        if durability.changed().await.is_err() {
            return;
        }
    }
}
