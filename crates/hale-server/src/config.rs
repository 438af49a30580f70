use crate::probe::ProbeSpec;
use crate::process::ProcessSpec;
use hale_core::supervision::Supervision;
use hale_core::{AgentName, Limits, LivenessSettings, RoleName};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `hale serve` can be told.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The data directory (log, snapshots, lock).
    pub data_dir: PathBuf,
    /// Where to listen for WebSocket and HTTP.
    pub listen: SocketAddr,
    /// Bounds the core enforces on agents' writes.
    pub limits: Limits,
    /// Take a snapshot after this many events since the last one.
    pub snapshot_every_events: u64,
    /// Take a snapshot after this long if any event was logged since the last one.
    pub snapshot_every: Duration,
    /// How many snapshot files to keep (older ones are deleted).
    pub snapshots_kept: usize,
    /// Set damaged log records aside instead of refusing to start.
    pub repair: bool,
    /// Largest WebSocket message (and frame) accepted, in bytes.
    pub frame_bytes_max: usize,
    /// Largest HTTP request body accepted, in bytes.
    pub body_bytes_max: usize,
    /// Requests one WebSocket session may have in flight before the server stops reading
    /// from it until responses drain.
    pub session_in_flight_max: usize,
    /// The heartbeat detector, reconnect grace and progress logging.
    pub liveness: LivenessSettings,
    /// The agents to run (`hale up`); `None` runs none (`hale serve`).
    pub supervise: Option<Supervise>,
    /// The admin token and token lifetimes.
    pub auth: crate::auth::AuthConfig,
    /// TLS on the listener; `None` is plain TCP (the default, for loopback).
    pub tls: Option<crate::tls::TlsFiles>,
    /// How many connections may be open, and how soon each must speak.
    pub connections: crate::limits::ConnectionLimits,
    /// Encryption at rest: records and snapshots are sealed with the current key; every
    /// key opens what it sealed. `None`: plaintext (sealed data then refuses to start).
    pub encryption: Option<std::sync::Arc<hale_store::Keyring>>,
    /// Who may scrape `GET /metrics` besides the admin token.
    pub metrics: crate::metrics::MetricsAccess,
    /// Automatic backups (`[backup]`); `None` takes none.
    pub backup: Option<BackupSchedule>,
    /// Failure hooks (`[[hook]]`), for `hale serve` and `hale up` alike.
    pub hooks: Vec<crate::hooks::HookConfig>,
    /// `[cluster]`: this hale is a node of a Raft cluster; `None`: a single node.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: who this node is and how it reaches its peers.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Unique in the cluster, at least 1.
    pub node_id: u64,
    /// The address its peers and clients reach it at (`host:port`).
    pub advertise: String,
    /// The secret every node shares (node-to-node requests carry it).
    pub secret: hale_cluster::network::ClusterSecret,
    pub timeouts: hale_cluster::node::Timeouts,
    /// Its name among the nodes (default `node-ID`): what `nodes = [...]` of an agent names.
    pub name: hale_core::NodeName,
    /// What `node_labels` of an agent match.
    pub labels: BTreeMap<String, String>,
    /// How long a lease renewal lets this node run its agents (default 3 s).
    pub node_lease: Duration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("advertise", &self.advertise)
            .field("timeouts", &self.timeouts)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("node_lease", &self.node_lease)
            .finish_non_exhaustive()
    }
}

/// Automatic backups: one every `every` into `dir`, the newest `keep` kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSchedule {
    pub dir: PathBuf,
    pub every: Duration,
    pub keep: usize,
}

/// What `hale up` runs, from hale.toml.
#[derive(Clone, Debug, Default)]
pub struct Supervise {
    pub agents: Vec<DeclaredAgent>,
    /// Role pools with a template: hale starts instances to keep `min` healthy.
    pub roles: Vec<DeclaredRole>,
    /// Between SIGTERM and SIGKILL when stopping an agent.
    pub stop_grace: Duration,
    /// Rotate an agent's log file past this size.
    pub log_bytes_max: u64,
    /// Rotated log files kept per agent.
    pub logs_kept: usize,
    /// Where agents without a `workdir` get theirs (`BASE/NAME`); `None`: `agents` in the
    /// data directory.
    pub workdir_base: Option<PathBuf>,
    /// Whether agents get cgroups (`[supervision] cgroups`).
    pub cgroups: crate::process::CgroupSetting,
}

/// A role pool (`[[role]]` with a template).
#[derive(Clone, Debug)]
pub struct DeclaredRole {
    pub role: RoleName,
    pub min: u32,
    pub max: u32,
    /// How each instance is supervised.
    pub supervision: Supervision,
    /// How each instance is started.
    pub process: ProcessSpec,
    pub probe: Option<ProbeSpec>,
}

/// One managed agent: how the core supervises it and how the shell starts it.
#[derive(Clone, Debug)]
pub struct DeclaredAgent {
    pub name: AgentName,
    pub role: RoleName,
    pub labels: BTreeMap<String, String>,
    pub supervision: Supervision,
    pub process: ProcessSpec,
    pub probe: Option<ProbeSpec>,
}

impl ServerConfig {
    /// The defaults, for a data directory and a listen address.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        let limits = Limits::default();
        let frame_bytes_max = frame_bytes_max(&limits);
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            limits,
            snapshot_every_events: 10_000,
            snapshot_every: Duration::from_secs(60),
            snapshots_kept: 3,
            repair: false,
            frame_bytes_max,
            body_bytes_max: frame_bytes_max,
            session_in_flight_max: 1024,
            liveness: LivenessSettings::default(),
            supervise: None,
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            connections: crate::limits::ConnectionLimits::default(),
            encryption: None,
            metrics: crate::metrics::MetricsAccess::default(),
            backup: None,
            hooks: Vec::new(),
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// Sets the core's limits and the frame and body limits that follow from them.
    pub fn set_limits(&mut self, limits: Limits) {
        self.frame_bytes_max = frame_bytes_max(&limits);
        self.body_bytes_max = self.frame_bytes_max;
        self.limits = limits;
    }
}

/// A message must hold the largest patch plus the frame around it (escaping can double
/// a string's size), and no more: the WebSocket library's own default (64 MiB) would let
/// one client pin that much memory.
fn frame_bytes_max(limits: &Limits) -> usize {
    limits.patch_bytes_max.saturating_mul(2).saturating_add(64 * 1024)
}
