//! The tokio shell of hale.
//!
//! It turns network input into `hale_core::Command`s, has the [`engine`] decide and apply
//! them, logs the resulting events through the `hale_store::Writer`, and answers only once
//! those events are durable. [`start`] recovers the data directory and serves the HTTP API
//! and the WebSocket session endpoint; [`RunningServer::shutdown`] stops accepting, closes
//! sessions, takes a final snapshot and flushes the log.

pub mod api;
pub mod auth;
pub mod backup;
mod clock;
mod config;
pub mod engine;
pub mod hooks;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod nodes;
pub mod notify;
pub mod probe;
pub mod process;
mod sessions;
pub mod supervisor;
pub mod tls;

pub use clock::Clock;
pub use config::{BackupSchedule, ClusterConfig, DeclaredAgent, DeclaredRole, ServerConfig, Supervise};
/// The cluster secret, for `[cluster] secret_file`.
pub use hale_cluster::network::ClusterSecret;
pub use sessions::{Push, Sessions};

use engine::{Engine, EngineOptions, SnapshotPolicy};
use hale_core::{Core, Effect, SupervisionCommand};
use hale_store::{DataDir, RecoveryOptions, RecoveryReport, StoreError, Writer, WriterOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use supervisor::{ManagedAgent, Supervisor, SupervisorConfig};
use tokio::sync::watch;

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}; choose another --listen address or stop what uses it")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
    #[error("the log failed while running ({0}); acknowledged writes are safe in the log, restart hale to recover")]
    LogFailed(String),
    #[error("cannot create the agent log directory {}: {source}", .path.display())]
    Logs { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot start supervising the agents of hale.toml: {0}")]
    Supervise(String),
    #[error("cannot read or create the server's secrets: {0}; check the data directory's permissions")]
    Secrets(String),
    #[error("{0}; check [server] tls_cert_file and tls_key_file (PEM)")]
    Tls(String),
    #[error("cannot create the backup directory {}: {source}; check [backup] dir", .path.display())]
    BackupDir { path: std::path::PathBuf, source: std::io::Error },
}

/// A server that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    recovery: RecoveryReport,
    recovered_seq: u64,
    shutdown: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    engine: Engine,
    data_dir: DataDir,
    supervisor: Option<Arc<Supervisor>>,
    /// On a cluster: this node's part in running agents across the nodes.
    nodes: Option<Arc<nodes::Nodes>>,
    stop_grace: Duration,
    auth: Arc<auth::Auth>,
    backups: Arc<backup::Backups>,
    scheduled_backups: Option<tokio::task::JoinHandle<()>>,
    hooks: Arc<hooks::Hooks>,
}

/// What the engine stands on: the single node's log, or a cluster node's Raft.
enum Backing {
    Single(hale_store::Log),
    /// With the state of a single node's log this node holds, for `hale cluster init`.
    Cluster(hale_cluster::node::NodeParts, ClusterConfig, Option<Box<(u64, hale_core::State)>>),
}

/// The settings every core of this server gets, after recovery and after each rebuild.
fn prepare_core(core: &mut Core, config: &ServerConfig) {
    core.set_seed(clock::seed());
    // Off until the supervisor has reconciled the log with the machine (`hale up`), and
    // for good with `hale serve`: nobody would start the processes.
    core.set_supervising(false);
    core.set_liveness_settings(config.liveness.clone());
    // Runs that were heartbeating before this start get a grace period to come back.
    core.begin_grace(clock::now());
}

/// How often at most a node of a cluster that does not lead takes the committed state in
/// for stale reads: how far behind its stale answers may be besides replication.
const FOLLOWER_REFRESH: std::time::Duration = std::time::Duration::from_millis(200);

/// Recovers the single node's log (the `events` table) of `data_dir`, off the runtime.
async fn recover_events(
    data_dir: DataDir,
    config: &ServerConfig,
    repair: bool,
) -> (DataDir, Result<hale_store::Recovered, hale_store::StoreError>) {
    let options =
        RecoveryOptions { limits: config.limits.clone(), repair, now: clock::now(), keys: config.encryption.clone() };
    tokio::task::spawn_blocking(move || {
        let recovered = hale_store::recover(&data_dir, &options);
        (data_dir, recovered)
    })
    .await
    .expect("recovery does not panic")
}

/// Recovers the data directory and starts serving.
pub async fn start(mut config: ServerConfig) -> Result<RunningServer, ServerError> {
    let data_dir = DataDir::open(&config.data_dir)?;
    // Bound before the cluster is opened: a node listening on port 0 (tests) advertises the
    // port it got, which its peers and its agents must reach.
    let listener = bind(config.listen).map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
    if let Some(cluster) = config.cluster.as_mut()
        && cluster.advertise.parse::<SocketAddr>().is_ok_and(|advertised| advertised.port() == 0)
    {
        cluster.advertise = agent_address(local_addr).to_string();
    }
    let snapshot_dir = data_dir.snapshot_dir();
    let (data_dir, mut core, last_seq, report, backing) = match config.cluster.clone() {
        // A cluster node's state is its Raft state machine's: its snapshot, then the
        // committed entries openraft applies again as it starts.
        Some(cluster) => {
            // Nodes that serve TLS verify each other against the cluster's CA: the
            // certificate agents are told to trust (`tls_ca_file`, else the node's own).
            let peer_ca = match &config.tls {
                Some(tls) => {
                    let ca = tls.ca_file.as_ref().unwrap_or(&tls.cert_file);
                    Some(std::fs::read(ca).map_err(|error| {
                        ServerError::Supervise(format!(
                            "[cluster] the CA peers are verified against, {}: {error}",
                            ca.display()
                        ))
                    })?)
                }
                None => None,
            };
            let options = hale_cluster::StateMachineOptions {
                limits: config.limits.clone(),
                keys: config.encryption.clone(),
                snapshots_kept: 0,
                copy_events: true,
            };
            let parts = hale_cluster::node::open(
                cluster.node_id,
                &data_dir,
                cluster.timeouts,
                cluster.secret.clone(),
                peer_ca.as_deref(),
                options,
            )
            .await
            .map_err(|error| ServerError::Supervise(format!("cluster node {}: {error}", cluster.node_id)))?;
            let (last_seq, state) = parts.committed.state();
            let core = Core::from_state(state, config.limits.clone());
            // A node that has never been part of a cluster may hold a single node's log:
            // `hale cluster init` brings it in (and `join` refuses, rather than lose it).
            let pristine = {
                let metrics = parts.raft.metrics().borrow().clone();
                metrics.current_term == 0 && metrics.last_log_index.is_none() && last_seq == 0
            };
            let (data_dir, importable) = if pristine {
                let (data_dir, recovered) = recover_events(data_dir, &config, false).await;
                let recovered = recovered?;
                let importable =
                    (recovered.last_seq > 0).then(|| Box::new((recovered.last_seq, recovered.core.state().clone())));
                if let Some(imported) = &importable {
                    let seq = imported.0;
                    tracing::info!(
                        events = seq,
                        "this node holds a single node's log: `hale cluster init` makes it the cluster's first state"
                    );
                }
                (data_dir, importable)
            } else {
                (data_dir, None)
            };
            let backing = Backing::Cluster(parts, cluster, importable);
            (data_dir, core, last_seq, hale_store::RecoveryReport::default(), backing)
        }
        None => {
            let (data_dir, recovered) = recover_events(data_dir, &config, config.repair).await;
            let recovered = recovered?;
            (data_dir, recovered.core, recovered.last_seq, recovered.report, Backing::Single(recovered.log))
        }
    };
    prepare_core(&mut core, &config);
    let auth = match &config.cluster {
        None => auth::Auth::open(data_dir.path(), config.auth.clone()),
        Some(cluster) => auth::Auth::open_clustered(data_dir.path(), config.auth.clone(), cluster.secret.expose()),
    };
    let auth = Arc::new(auth.map_err(|error| ServerError::Secrets(error.to_string()))?);
    for (agent, credential) in core.state().credentials() {
        auth.set_generation(agent, credential.generation);
    }
    let metrics = Arc::new(metrics::Metrics::new(
        report.set_aside.len() as u64,
        report.previously_set_aside.len() as u64,
        snapshot_dir.clone(),
    ));
    let policy = SnapshotPolicy {
        dir: snapshot_dir,
        every_events: config.snapshot_every_events.max(1),
        every: config.snapshot_every,
        // A cluster node's snapshots are its state machine's.
        kept: if config.cluster.is_some() { 0 } else { config.snapshots_kept },
    };
    let (effects_tx, effects) = tokio::sync::mpsc::unbounded_channel();
    let key = config.encryption.as_ref().map(|keys| keys.current().clone());
    if let Some(key) = &key {
        tracing::info!(key_id = key.id(), "encryption at rest: new records and snapshots are sealed with this key");
    }
    let hook_marks = config.hooks.iter().map(|hook| core.state().hook_mark(&hook.name)).collect();
    let options = EngineOptions {
        snapshots: policy,
        effects: effects_tx,
        key,
        metrics: metrics.clone(),
        clock: clock::Clock::system(),
        tick: Some(engine::TICK),
        unsnapshotted: report.replayed,
    };
    let (engine, cluster) = match backing {
        Backing::Single(log) => {
            let writer_options = WriterOptions { on_commit: Some(metrics.commit_hook()), ..WriterOptions::default() };
            let writer = Writer::start(log, last_seq, writer_options);
            (Engine::start(core, last_seq, writer, options), None)
        }
        Backing::Cluster(parts, cluster, importable) => {
            let log = hale_cluster::RaftLog::new(parts.raft.clone(), &parts.committed);
            let leadership = log.leadership();
            let engine = Engine::start(core, last_seq, log, options);
            let (rebuilt, settings) = (engine.clone(), config.clone());
            tokio::spawn(hale_cluster::follow_leadership(
                parts.raft.clone(),
                parts.committed.clone(),
                leadership,
                move |seq, state| {
                    let (engine, settings) = (rebuilt.clone(), settings.clone());
                    async move {
                        let mut core = Core::from_state(state, settings.limits.clone());
                        prepare_core(&mut core, &settings);
                        if let Err(error) = engine.rebuild(core, seq).await {
                            tracing::error!(%error, "could not hand leadership to the engine");
                        }
                    }
                },
            ));
            // While it does not lead, the engine takes in the committed state now and
            // then, for the reads that accept a stale answer (`Hale-Read: stale-ok`).
            let (refreshed, committed, settings) = (engine.clone(), parts.committed.clone(), config.clone());
            tokio::spawn(async move {
                let mut applied = committed.applied();
                while applied.changed().await.is_ok() {
                    if refreshed.durability().not_leader.is_some() {
                        let (seq, state) = committed.state();
                        let mut core = Core::from_state(state, settings.limits.clone());
                        prepare_core(&mut core, &settings);
                        refreshed.refresh(core, seq).await;
                    }
                    tokio::time::sleep(FOLLOWER_REFRESH).await;
                }
            });
            tracing::info!(node = cluster.node_id, advertise = %cluster.advertise, "a node of a hale cluster");
            (engine, Some(api::cluster::ClusterControl::new(parts, cluster, importable.map(|boxed| *boxed))))
        }
    };

    let tls = match &config.tls {
        Some(files) => Some(tls::acceptor(files).map_err(|error| ServerError::Tls(error.to_string()))?),
        None => None,
    };
    let sessions = Arc::new(Sessions::default());
    // Before the supervisor: the events of the agents' first starts may call for hooks.
    let backlog = hooks::Backlog {
        log: data_dir.log_path(),
        keys: config.encryption.clone(),
        through: last_seq,
        marks: hook_marks,
    };
    let hooks = hooks::Hooks::start(&engine, config.hooks.clone(), backlog);
    let mut stop_grace = Duration::from_secs(5);
    // On a cluster, every node runs its part in placing and running agents, agents or not.
    let nodes = match (&cluster, &config.cluster) {
        (Some(control), Some(settings)) => {
            let (agents, roles) = match &config.supervise {
                Some(supervise) => (
                    supervise.agents.iter().map(|agent| agent.name.clone()).collect(),
                    supervise.roles.iter().map(|pool| pool.role.clone()).collect(),
                ),
                None => Default::default(),
            };
            let info = hale_core::nodes::NodeInfo {
                id: settings.node_id,
                address: settings.advertise.clone(),
                labels: settings.labels.clone(),
                agents,
                roles,
            };
            let node = nodes::NodeSettings {
                name: settings.name.clone(),
                info,
                lease: settings.node_lease,
                tls: config.tls.is_some(),
            };
            let (raft, peers) = (control.raft().clone(), control.peers().clone());
            Some(nodes::Nodes::start(node, engine.clone(), raft, peers, settings.secret.clone(), auth.clone()))
        }
        _ => None,
    };
    let supervisor = match &config.supervise {
        None => None,
        Some(supervise) => {
            stop_grace = supervise.stop_grace;
            let reporter = nodes.clone().map(supervisor::Reporter::Cluster);
            let tls = config.tls.as_ref();
            let (supervisor, declarations) =
                start_supervisor(&engine, supervise, &data_dir, local_addr, auth.clone(), tls, reporter).await?;
            let supervisor = Arc::new(supervisor);
            if let (Some(nodes), Some(control)) = (&nodes, &cluster) {
                tokio::spawn(nodes.clone().reconcile(supervisor.clone(), control.committed().clone(), stop_grace));
                tokio::spawn(nodes::lead_agents(engine.clone(), nodes.name().clone(), declarations));
            }
            Some(supervisor)
        }
    };
    if let (Some(nodes), None) = (&nodes, &config.supervise) {
        // Whichever node leads restarts and recruits, whether or not it runs agents.
        tokio::spawn(nodes::lead_agents(engine.clone(), nodes.name().clone(), Vec::new()));
    }
    // On a cluster, processes follow the log on each node (`Nodes::reconcile`), not the
    // leader's effects.
    let process_effects = if nodes.is_some() { None } else { supervisor.clone() };
    tokio::spawn(route_effects(effects, engine.clone(), sessions.clone(), process_effects, nodes.is_some()));
    if let (Some(supervisor), None) = (&supervisor, &nodes) {
        supervisor.adopt_or_start().await.map_err(|error| ServerError::Supervise(error.to_string()))?;
    }
    let (shutdown, stopping) = watch::channel(false);
    let backups = Arc::new(backup::Backups::new(data_dir.log_path()));
    let scheduled_backups = match &config.backup {
        None => None,
        Some(schedule) => {
            std::fs::create_dir_all(&schedule.dir)
                .map_err(|source| ServerError::BackupDir { path: schedule.dir.clone(), source })?;
            tracing::info!(dir = %schedule.dir.display(), every_s = schedule.every.as_secs(), keep = schedule.keep, "automatic backups on");
            Some(tokio::spawn(backup::run_schedule(backups.clone(), schedule.clone(), stopping.clone())))
        }
    };
    let app = api::AppState {
        engine: engine.clone(),
        sessions,
        frame_bytes_max: config.frame_bytes_max,
        body_bytes_max: config.body_bytes_max,
        session_in_flight_max: config.session_in_flight_max,
        auth: auth.clone(),
        body_timeout: config.connections.body_timeout,
        shutdown: stopping.clone(),
        metrics,
        metrics_access: Arc::new(config.metrics.clone()),
        backups: backups.clone(),
        log_path: data_dir.log_path(),
        keys: config.encryption.clone(),
        hooks: hooks.clone(),
        events_copied: cluster.as_ref().and_then(api::cluster::ClusterControl::events_copied),
        cluster: cluster.clone(),
        nodes: nodes.clone(),
    };
    let mut router = api::router(app);
    if let Some(cluster) = &cluster {
        // Node-to-node routes answer the cluster secret, not tokens; a request to them is
        // in flight on its connection like any other (limits.rs).
        let routes = cluster.routes().layer(axum::middleware::from_fn(limits::track_requests));
        router = router.merge(routes);
    }
    if let Some(nodes) = &nodes {
        router = router.merge(nodes.routes().layer(axum::middleware::from_fn(limits::track_requests)));
    }
    let stop_serving = stopping;
    let serving = match tls {
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor, config.connections).map_err(ServerError::Serve)?;
            tokio::spawn(serve_until(listener, router, stop_serving))
        }
        None => {
            // TCP_NODELAY is set on each connection: frames are small and often go out back
            // to back (an answer, then a pushed task); with Nagle's algorithm on, the second
            // waits for the client's delayed ACK, about 40 ms (the task throughput bench
            // showed it: 716 tasks/s, 44 ms per lease → 3,049/s off).
            let listener = limits::LimitedListener::new(listener, config.connections);
            tokio::spawn(serve_until(listener, router, stop_serving))
        }
    };
    Ok(RunningServer {
        local_addr,
        recovery: report,
        recovered_seq: last_seq,
        shutdown,
        serving,
        engine,
        data_dir,
        supervisor,
        nodes,
        stop_grace,
        auth,
        backups,
        scheduled_backups,
        hooks,
    })
}

/// Declares every agent of hale.toml to the core, then starts a keeper for each. On a
/// node of a cluster (`reporter` given) nothing is declared here: the declarations come
/// back for the leader to make when this node leads.
async fn start_supervisor(
    engine: &Engine,
    supervise: &Supervise,
    data_dir: &DataDir,
    local_addr: SocketAddr,
    auth: Arc<auth::Auth>,
    tls: Option<&tls::TlsFiles>,
    reporter: Option<supervisor::Reporter>,
) -> Result<(Supervisor, Vec<SupervisionCommand>), ServerError> {
    let logs_dir = data_dir.path().join("logs");
    std::fs::create_dir_all(&logs_dir).map_err(|source| ServerError::Logs { path: logs_dir.clone(), source })?;
    let workdir_base = supervise.workdir_base.clone().unwrap_or_else(|| data_dir.path().join("agents"));
    let other_users = supervise
        .agents
        .iter()
        .map(|agent| &agent.process)
        .chain(supervise.roles.iter().map(|pool| &pool.process))
        .any(|process| process.user.is_some() && process.workdir.is_none());
    if rustix::process::geteuid().is_root() {
        let as_root: Vec<&str> = supervise
            .agents
            .iter()
            .filter(|agent| agent.process.user.is_none())
            .map(|agent| agent.name.as_str())
            .chain(supervise.roles.iter().filter(|pool| pool.process.user.is_none()).map(|pool| pool.role.as_str()))
            .collect();
        if !as_root.is_empty() {
            tracing::warn!(agents = %as_root.join(", "), "hale runs as root and these agents would too, able to read hale's secrets; give each a `user` in hale.toml");
        }
    }
    if other_users && workdir_base.starts_with(data_dir.path()) {
        // Agents of other users must reach their own directories under it: traversable,
        // not listable, and everything else in it stays 0600/0700.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|source| ServerError::Logs { path: data_dir.path().to_path_buf(), source })?;
        tracing::info!(dir = %data_dir.path().display(), "the data directory is 0711: agents running as other users work under it");
    }
    let supervisor_id = std::fs::canonicalize(data_dir.path())
        .unwrap_or_else(|_| data_dir.path().to_path_buf())
        .to_string_lossy()
        .into_owned();
    let (setting, id) = (supervise.cgroups, supervisor_id.clone());
    let cgroups = tokio::task::spawn_blocking(move || process::Cgroups::detect(setting, &id))
        .await
        .unwrap_or_else(|error| process::Cgroups::None { reason: error.to_string() });
    tracing::info!("cgroups: {}", cgroups.describe());
    // With a cgroup the kernel holds the memory limit; polling RSS against it would only
    // duplicate it (the CPU threshold, a detector rather than a quota, is still polled).
    let kernel_memory = cgroups.active();
    let judged = |supervision: &hale_core::supervision::Supervision| {
        let mut supervision = supervision.clone();
        if kernel_memory {
            supervision.thresholds.memory_bytes_max = None;
        }
        supervision
    };
    let mut agents = Vec::new();
    let mut declarations = Vec::new();
    for declared in &supervise.agents {
        let supervision = judged(&declared.supervision);
        declarations.push(SupervisionCommand::Declare {
            agent: declared.name.clone(),
            role: declared.role.clone(),
            labels: declared.labels.clone(),
            supervision: supervision.clone(),
        });
        let logs =
            process::AgentLogs::new(&logs_dir, declared.name.as_str(), supervise.log_bytes_max, supervise.logs_kept);
        agents.push(ManagedAgent {
            name: declared.name.clone(),
            spec: declared.process.clone(),
            logs: Arc::new(logs),
            sample_usage: samples_usage(&supervision),
            probe: declared.probe.clone(),
        });
    }
    let mut templates = std::collections::BTreeMap::new();
    for pool in &supervise.roles {
        let supervision = judged(&pool.supervision);
        declarations.push(SupervisionCommand::DeclareRole {
            role: pool.role.clone(),
            min: pool.min,
            max: pool.max,
            supervision: supervision.clone(),
        });
        let template = supervisor::Template {
            spec: pool.process.clone(),
            sample_usage: samples_usage(&supervision),
            probe: pool.probe.clone(),
        };
        templates.insert(pool.role.clone(), template);
    }
    let config = SupervisorConfig {
        agents,
        templates,
        logs_dir: logs_dir.clone(),
        supervisor_id,
        cgroups: Arc::new(cgroups),
        log_bytes_max: supervise.log_bytes_max,
        logs_kept: supervise.logs_kept,
        hale_url: format!("{}://{}", if tls.is_some() { "wss" } else { "ws" }, agent_address(local_addr)),
        ca_file: tls.and_then(|files| files.ca_file.clone().or(Some(files.cert_file.clone()))),
        auth: Some(auth),
        stop_grace: supervise.stop_grace,
        rotate_every: Duration::from_secs(5),
        workdir_base,
        reporter: reporter.clone(),
    };
    if reporter.is_none() {
        for command in declarations.drain(..) {
            engine.execute(command).await.map_err(|error| ServerError::Supervise(error.to_string()))?;
        }
    }
    Ok((Supervisor::start(engine.clone(), config), declarations))
}

/// Listens on `addr` with a backlog of 4,096 (tokio's default is 1,024): a burst of new
/// connections while the accept loop is descheduled is queued by the kernel rather than
/// dropped, which costs each dropped client a one-second SYN retransmit.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Whether the core has memory or CPU thresholds for an agent supervised so: then the
/// supervisor samples its process group from /proc.
fn samples_usage(supervision: &hale_core::supervision::Supervision) -> bool {
    let thresholds = &supervision.thresholds;
    thresholds.memory_bytes_max.is_some() || thresholds.cpu_percent_max.is_some()
}

/// Serves `router` on `listener` until `stop` turns true.
async fn serve_until<L>(listener: L, router: axum::Router, mut stop: watch::Receiver<bool>) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
    for<'a> limits::ConnActivity: axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    // Each request carries its connection's activity, so the deadlines between requests
    // know where requests begin and end (limits.rs).
    axum::serve(listener, router.into_make_service_with_connect_info::<limits::ConnActivity>())
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        })
        .await
}

/// The address agents on this machine connect to: the listen address, with an unspecified
/// IP (`0.0.0.0`, `::`) replaced by loopback, which is not an address one can connect to.
fn agent_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, listen.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    }
}

/// Carries out the core's effects once they are durable: processes through the
/// supervisor, fences and challenges through the sessions, escalations to the log.
async fn route_effects(
    mut effects: tokio::sync::mpsc::UnboundedReceiver<Effect>,
    engine: Engine,
    sessions: Arc<Sessions>,
    supervisor: Option<Arc<Supervisor>>,
    clustered: bool,
) {
    while let Some(effect) = effects.recv().await {
        match effect {
            Effect::Spawn { .. } | Effect::Stop { .. } | Effect::Pause { .. } | Effect::Resume { .. } => {
                match &supervisor {
                    Some(supervisor) => supervisor.dispatch(effect),
                    None if clustered => {}
                    None => tracing::warn!(
                        ?effect,
                        "a managed agent needs its process started or stopped, but this hale runs no agents (use `hale up -c hale.toml`)"
                    ),
                }
            }
            Effect::Fence { agent, incarnation, reason } => {
                sessions.push(&agent, incarnation, Push::Fenced { reason });
            }
            Effect::Challenge { agent, incarnation } => sessions.push(&agent, incarnation, Push::Challenge),
            Effect::OfferTask { agent, incarnation, task } => {
                // An agent without a session finds it with GET /v1/agents/{agent}/tasks.
                let info = engine.read(move |state| state.tasks().get(task).map(api::wire::tasks::task_info)).await;
                if let Ok(Some(info)) = info {
                    sessions.push(&agent, incarnation, Push::Task(Box::new(info)));
                }
            }
            Effect::CancelTask { agent, incarnation, task } => {
                sessions.push(&agent, incarnation, Push::TaskCancelled(task))
            }
            Effect::EndSessions { agent, reason } => sessions.end(&agent, &reason),
            Effect::DeliverMail { agent } => sessions.ring(&agent),
            Effect::Escalate { agent, restarts, window_ms } => {
                tracing::error!(%agent, restarts, window_ms, "agent FAILED: too many restarts within the window; not restarting until `hale restart {agent}`");
            }
        }
    }
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin token (for in-process callers: the demo, the benches).
    pub fn admin_token(&self) -> &str {
        self.auth.admin_token()
    }

    /// Mints tokens for `agent` and logs its refresh token (for in-process agents).
    pub async fn issue_tokens(&self, agent: &hale_core::AgentName) -> Result<hale_proto::TokenPair, api::ApiError> {
        api::tokens::issue_tokens(&self.auth, &self.engine, agent).await
    }

    /// What recovery found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The last event recovered from the log.
    pub fn recovered_seq(&self) -> u64 {
        self.recovered_seq
    }

    /// The supervisor, when this hale runs agents.
    pub fn supervisor(&self) -> Option<&Supervisor> {
        self.supervisor.as_deref()
    }

    /// The engine, for in-process use (benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Graceful shutdown: stop accepting, close sessions after answering what they asked,
    /// take a final snapshot, flush the log, release the data directory.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        // Agents first, while the log still takes their stops: the next `hale up` starts
        // them again rather than counting a crash. On a cluster, the node stops its
        // processes and then leaves: the leader starts its agents elsewhere at once.
        match (&self.supervisor, &self.nodes) {
            (Some(supervisor), Some(nodes)) => {
                // Not reported as exits: the leader would restart them here meanwhile.
                nodes.begin_leaving();
                supervisor.stop_here(self.stop_grace).await;
                nodes.leave().await;
            }
            (Some(supervisor), None) => supervisor.stop_all(self.stop_grace).await,
            (None, _) => {}
        }
        // After the agents' stops (which call for no hook), before the engine stops.
        self.hooks.stop();
        let _ = self.shutdown.send(true);
        // A backup in progress stops at its next step and leaves no file.
        self.backups.cancel();
        if let Some(scheduled) = self.scheduled_backups {
            let _ = scheduled.await;
        }
        let mut serving = self.serving;
        let served = match tokio::time::timeout(Duration::from_secs(10), &mut serving).await {
            Ok(result) => result.expect("the server task does not panic"),
            Err(_) => {
                tracing::warn!("connections did not close within 10 s; closing them");
                serving.abort();
                Ok(())
            }
        };
        self.engine.shutdown().await;
        let failed = self.engine.durability().failed;
        drop(self.data_dir);
        served.map_err(ServerError::Serve)?;
        match failed {
            Some(reason) => Err(ServerError::LogFailed(reason.to_string())),
            None => Ok(()),
        }
    }
}
