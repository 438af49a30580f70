use crate::bench;
use crate::demo;
use crate::demo_agent;
use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hale_client::Admin;
use hale_server::ServerConfig;
use hale_server::manifest::Manifest;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// hale keeps AI agents alive: durable agent state, checkpoints and recovery points over a
/// session protocol, on one durable log.
#[derive(Debug, Parser)]
#[command(name = "hale", version, about)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HALE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the server: recover the data directory, then serve WebSocket sessions and HTTP.
    Serve(ServeArgs),
    /// Run the server and the agents of hale.toml: start them, restart them when they
    /// fail, adopt the ones still running from before. Ctrl-C stops them all.
    Up(ServeArgs),
    /// Restart a managed agent now (this also revives a `failed` one).
    Restart {
        agent: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Stop a managed agent; it stays stopped until `hale restart` or the next `hale up`.
    Stop {
        agent: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Quarantine an agent: it gets no work until `hale release`.
    Quarantine {
        agent: String,
        /// Why; shown by `hale agents` and kept in the log.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// A cluster of hale nodes: form it, join it, see it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Release an agent from quarantine (its violations are forgotten).
    Release {
        agent: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Submit a task for a role; prints its number.
    Submit(crate::tasks_cli::SubmitArgs),
    /// List the tasks, newest first.
    Tasks(crate::tasks_cli::TasksArgs),
    /// Print one task: its status, level, steps (with their model calls) and runs.
    Task {
        task: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Cancel a task wherever it is (compensations run first, if it has any).
    Cancel {
        task: u64,
        #[command(flatten)]
        server: ServerArg,
    },
    /// An agent's tokens: `issue` prints new ones (as environment lines), `revoke` ends
    /// them and the agent's sessions.
    Token {
        #[arg(value_enum)]
        action: TokenAction,
        agent: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// The system mode (optimal, degraded, minimal), capacity per role and the queue.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Print the log as an audit trail: time, kind, agent and a line for each event
    /// (--follow keeps printing them as they happen).
    Events(crate::events_cli::EventsArgs),
    /// Print the address of the live dashboard, with the admin token in its fragment
    /// (`http://…/#token=…`); opens nothing.
    Dashboard {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Print an agent's output (stdout and stderr), from its log files.
    Logs {
        agent: String,
        /// Keep printing what it writes.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many lines to print first.
        #[arg(long, short = 'n', default_value_t = 50)]
        lines: usize,
        /// hale.toml, to find the data directory.
        #[arg(long, short = 'c', env = "HALE_CONFIG")]
        config: Option<PathBuf>,
        /// The data directory [default: from hale.toml, else hale-data].
        #[arg(long, env = "HALE_DATA")]
        data: Option<PathBuf>,
    },
    /// See hale heal a crew of six agents: one is SIGKILLed, one stalls; prints a timeline
    /// of detection and recovery and exits by itself in about 22 s, leaving nothing running.
    Demo(demo::DemoArgs),
    /// A small example agent that heartbeats with progress and checkpoints its work; it can
    /// misbehave on purpose (for tests and `hale demo`).
    DemoAgent(demo_agent::DemoAgentArgs),
    /// List the agents hale knows.
    Agents {
        #[command(flatten)]
        server: ServerArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the nodes of a cluster: status, Raft role, the agents on each, and when the
    /// leader last heard from it.
    Nodes {
        #[command(flatten)]
        server: ServerArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an agent's state (the current version, or a retained one).
    State {
        /// The agent's name.
        agent: String,
        /// A version still in the agent's history or named by a recovery point.
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Check every record and snapshot of a data directory (or every record of a backup
    /// file, with --file) and print what was found. Reads only; exits 1 if anything is damaged.
    Verify {
        #[arg(long, default_value = "hale-data", env = "HALE_DATA")]
        data: PathBuf,
        /// Check this backup file instead of a data directory.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Decrypt encrypted records and snapshots with these keys (ID:BASE64 lines), to
        /// check their events too; `HALE_ENCRYPTION_KEY` overrides it. Without a key,
        /// encrypted data is checked by its checksums alone.
        #[arg(long, env = "HALE_ENCRYPTION_KEY_FILE")]
        encryption_key_file: Option<PathBuf>,
    },
    /// Seal every record and snapshot with the first (current) key, so the keys after it
    /// can be retired; also encrypts records written before encryption was turned on. Run
    /// it with hale stopped; it can be interrupted and run again.
    Rekey {
        #[arg(long, default_value = "hale-data", env = "HALE_DATA")]
        data: PathBuf,
        /// The key list (ID:BASE64 lines): the first seals everything, the others open
        /// what they sealed; `HALE_ENCRYPTION_KEY` overrides it.
        #[arg(long, env = "HALE_ENCRYPTION_KEY_FILE")]
        encryption_key_file: Option<PathBuf>,
    },
    /// Print a new key for encryption at rest, as a line `ID:BASE64` (32 random bytes) for
    /// [server] encryption_key_file or HALE_ENCRYPTION_KEY.
    Keygen {
        /// The key's id, stored beside everything it encrypts [default: k<unix seconds>].
        #[arg(long)]
        id: Option<String>,
    },
    /// Back the log up into FILE while hale runs: a consistent copy of the log as it was
    /// when the backup began, in one file. hale writes it, so FILE is a path on the
    /// server's machine (a relative one is taken from this directory); it must not exist.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Install a backup as the log of a data directory, after checking every record of
    /// it. Refused while a hale runs on the directory; refused for a directory that is not
    /// empty unless --force (which moves its log and snapshots aside, never deletes them).
    Restore {
        file: PathBuf,
        /// The data directory to restore into.
        #[arg(long, env = "HALE_DATA")]
        data: PathBuf,
        /// Restore over an existing log (moved into DATA/replaced-<time>/ first).
        #[arg(long)]
        force: bool,
    },
    /// Validate a hale.toml: unknown keys, bad values and inconsistencies are reported
    /// with their line. Exits 1 if the file is refused.
    Check {
        #[arg(long, short = 'c', default_value = "hale.toml", env = "HALE_CONFIG")]
        config: PathBuf,
        /// Also check the agents' placements (`nodes`, `node_labels`) against the nodes of
        /// the running cluster at --server: an agent no node that is up may run is an error.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Measure hale on this machine: durable-append, replay, restart, detect (all if none is named).
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// hale.toml to read [server], [limits] and [snapshots] from; flags and HALE_*
    /// variables override it.
    #[arg(long, short = 'c', env = "HALE_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory: the log, snapshots and a lock [default: hale-data].
    #[arg(long, env = "HALE_DATA")]
    data: Option<PathBuf>,
    /// Address for WebSocket sessions and HTTP [default: 127.0.0.1:7700].
    #[arg(long, env = "HALE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Start even if log records are damaged: set each aside (kept in the damaged_events
    /// table and reported), instead of refusing.
    #[arg(long)]
    repair: bool,
    /// Snapshot after this many events [default: 10000].
    #[arg(long, env = "HALE_SNAPSHOT_EVERY_EVENTS")]
    snapshot_every_events: Option<u64>,
    /// Snapshot after this many seconds if anything was logged [default: 60].
    #[arg(long, env = "HALE_SNAPSHOT_EVERY_SECS")]
    snapshot_every_secs: Option<u64>,
    /// Largest checkpoint patch, in bytes [default: 262144].
    #[arg(long, env = "HALE_PATCH_BYTES_MAX")]
    patch_bytes_max: Option<usize>,
    /// Largest agent state, in bytes [default: 4194304].
    #[arg(long, env = "HALE_STATE_BYTES_MAX")]
    state_bytes_max: Option<usize>,
    /// Versions of each agent's state kept for rollback [default: 16].
    #[arg(long, env = "HALE_HISTORY_LEN")]
    history_len: Option<usize>,
    /// Encryption at rest: a file of keys, `ID:BASE64` per line, the one for new writes
    /// first (overrides [server] encryption_key_file; `HALE_ENCRYPTION_KEY` overrides both).
    #[arg(long, env = "HALE_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TokenAction {
    Issue,
    Revoke,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArg {
    /// The hale to ask; the nodes of a cluster by repeating it or separated by commas
    /// (requests follow the leader).
    #[arg(long, default_value = "http://127.0.0.1:7700", env = "HALE_URL", value_delimiter = ',')]
    pub(crate) server: Vec<String>,
    /// The token to send [default: the admin token in the data directory, admin.token].
    #[arg(long, env = "HALE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The data directory whose admin.token to use when --token is not given.
    #[arg(long = "data", env = "HALE_DATA", default_value = "hale-data")]
    pub(crate) data: PathBuf,
    /// Verify an https:// hale against this CA file (PEM).
    #[arg(long, env = "HALE_CA_FILE")]
    pub(crate) ca_file: Option<PathBuf>,
}

impl ServerArg {
    /// `--token`/`HALE_TOKEN`, else the admin token hale keeps in its data directory.
    pub(crate) fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            std::fs::read_to_string(self.data.join(hale_server::auth::ADMIN_TOKEN_FILE))
                .ok()
                .map(|text| text.trim().to_string())
        })
    }

    /// A client of the hale asked, with the token: `--token`/`HALE_TOKEN`, else the admin
    /// token hale keeps in its data directory on this machine.
    pub(crate) fn admin(&self) -> Result<Admin> {
        let bases: Vec<String> = self.server.iter().map(|server| http_base(server)).collect();
        let mut admin = Admin::new(&bases.join(","));
        if let Some(ca_file) = &self.ca_file {
            admin = admin.with_ca_file(ca_file)?;
        }
        Ok(match self.token() {
            Some(token) => admin.with_token(token),
            None => admin,
        })
    }
}

pub fn init_logging(cli: &Cli) {
    // The demo tells its own story; hale's log would drown it unless asked for.
    let default = if matches!(cli.command, Commands::Demo(_)) { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HALE_LOG").unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Commands::Serve(args) => serve(args, false).await,
        Commands::Up(args) => serve(args, true).await,
        Commands::Restart { agent, server } => {
            let incarnation = server.admin()?.restart(&agent).await?;
            println!("{agent}: restarted as incarnation {incarnation}");
            Ok(0)
        }
        Commands::Stop { agent, server } => {
            server.admin()?.stop(&agent).await?;
            println!("{agent}: stopped");
            Ok(0)
        }
        Commands::Quarantine { agent, reason, server } => {
            server.admin()?.quarantine(&agent, &reason).await?;
            println!("{agent}: quarantined");
            Ok(0)
        }
        Commands::Cluster { command } => cluster(command).await,
        Commands::Release { agent, server } => {
            server.admin()?.release(&agent).await?;
            println!("{agent}: released");
            Ok(0)
        }
        Commands::Submit(args) => crate::tasks_cli::submit(args).await,
        Commands::Tasks(args) => crate::tasks_cli::list(args).await,
        Commands::Task { task, json, server } => crate::tasks_cli::show(task, json, &server).await,
        Commands::Cancel { task, server } => {
            server.admin()?.cancel(task).await?;
            println!("task {task}: cancelled");
            Ok(0)
        }
        Commands::Token { action: TokenAction::Issue, agent, json, server } => {
            let pair = server.admin()?.issue_tokens(&agent).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pair)?);
            } else {
                println!("HALE_AGENT={}", pair.agent);
                println!("HALE_TOKEN={}", pair.access_token);
                println!("HALE_REFRESH_TOKEN={}", pair.refresh_token);
                eprintln!(
                    "(the access token expires in {} s; the client refreshes it with the refresh token, which works once)",
                    pair.access_expires_at_ms.saturating_sub(now_ms()) / 1000
                );
            }
            Ok(0)
        }
        Commands::Token { action: TokenAction::Revoke, agent, server, .. } => {
            server.admin()?.revoke_tokens(&agent).await?;
            println!("{agent}: tokens revoked, sessions ended");
            Ok(0)
        }
        Commands::Status { json, server } => crate::tasks_cli::status(json, &server).await,
        Commands::Events(args) => crate::events_cli::events(args).await,
        Commands::Dashboard { server } => crate::events_cli::dashboard(&server),
        Commands::Logs { agent, follow, lines, config, data } => logs(&agent, follow, lines, config, data).await,
        Commands::Demo(args) => demo::run(args).await,
        Commands::DemoAgent(args) => demo_agent::run(args).await,
        Commands::Agents { server, json } => agents(&server, json).await,
        Commands::Nodes { server, json } => nodes(&server, json).await,
        Commands::State { agent, version, server } => {
            let state = server.admin()?.state(&agent, version).await?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(0)
        }
        Commands::Keygen { id } => {
            let id = id.unwrap_or_else(|| format!("k{}", now_ms() / 1000));
            println!("{}", hale_store::generate_key_line(&id)?);
            Ok(0)
        }
        Commands::Rekey { data, encryption_key_file } => rekey(&data, encryption_key_file.as_deref()),
        Commands::Verify { data, file, json, encryption_key_file } => {
            verify(&data, file.as_deref(), json, encryption_key_file.as_deref())
        }
        Commands::Backup { file, server } => backup(&file, &server).await,
        Commands::Restore { file, data, force } => restore(&file, &data, force),
        Commands::Check { config, live, server } => {
            let manifest = Manifest::load(&config)?;
            // Relative to where hale runs, as `hale serve` reads it.
            load_keys(key_file(None, &manifest).as_deref())?;
            // The webhooks' secrets are there (relative to hale.toml, as `hale up` reads them).
            let base = std::path::absolute(&config)?.parent().map(PathBuf::from).unwrap_or_default();
            manifest.hooks(&base).map_err(|error| anyhow!("{}: {error}", config.display()))?;
            if live {
                check_placements(&manifest, &base, &server, &config).await?;
            }
            println!(
                "{}: ok ({} agents, {} groups, {} roles)",
                config.display(),
                manifest.agents.len(),
                manifest.groups.len(),
                manifest.roles.len()
            );
            Ok(0)
        }
        Commands::Bench(args) => bench::run(args).await,
    }
}

/// `hale check --live`: every agent of hale.toml (and every pool's template) must be one
/// that some node of the running cluster, up now, may run by its `nodes` and
/// `node_labels`; otherwise it would wait as `pending` once started.
async fn check_placements(manifest: &Manifest, base: &Path, server: &ServerArg, config: &Path) -> Result<()> {
    let nodes = server.admin()?.nodes().await.context("reading the nodes of the cluster (--live)")?;
    let up: Vec<&hale_client::NodeSummary> = nodes.iter().filter(|node| node.status == "up").collect();
    let supervise = manifest.supervise(base);
    let placements = supervise
        .agents
        .iter()
        .map(|agent| (format!("agent {:?}", agent.name.as_str()), &agent.supervision.placement))
        .chain(
            supervise.roles.iter().map(|pool| (format!("role {:?}", pool.role.as_str()), &pool.supervision.placement)),
        );
    let mut problems = Vec::new();
    for (what, rule) in placements {
        let fits = up.iter().any(|node| {
            hale_core::NodeName::new(node.name.as_str())
                .is_ok_and(|name| hale_core::nodes::allows(rule, &name, &node.labels))
        });
        if !fits {
            problems.push(format!("{what}: no node that is up matches its placement ({rule})"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let described: Vec<String> = up
        .iter()
        .map(|node| {
            let labels: Vec<String> = node.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
            format!("{} [{}]", node.name, labels.join(", "))
        })
        .collect();
    bail!(
        "{}: {}; the nodes up are {}: give a node the label (its [cluster] labels) or change the placement",
        config.display(),
        problems.join("; "),
        if described.is_empty() { "none".to_string() } else { described.join(", ") }
    )
}

/// hale.toml's path for messages, or that there is none.
fn config_path_text(path: &Option<PathBuf>) -> String {
    path.as_ref().map_or("(no hale.toml)".to_string(), |path| path.display().to_string())
}

/// Accepts `ws://` or `http://` forms of the server address.
pub(crate) fn http_base(server: &str) -> String {
    if let Some(rest) = server.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = server.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        server.to_string()
    }
}

async fn serve(args: ServeArgs, supervise: bool) -> Result<i32> {
    // Whatever hale writes from here on (the log, snapshots, backups, secrets) is hale's
    // user's alone, and so are its environment and memory.
    hale_server::process::protect_secrets();
    let config_path = match (&args.config, supervise) {
        (Some(path), _) => Some(path.clone()),
        (None, true) => Some(PathBuf::from("hale.toml")),
        (None, false) => None,
    };
    let manifest = match &config_path {
        Some(path) => Manifest::load(path)?,
        None => Manifest::default(),
    };
    let data = args.data.or(manifest.server.data.clone()).unwrap_or_else(|| PathBuf::from("hale-data"));
    let listen =
        args.listen.or(manifest.server.listen).unwrap_or_else(|| "127.0.0.1:7700".parse().expect("a valid address"));
    let liveness = manifest.liveness();
    let mut limits = manifest.limits.clone();
    limits.patch_bytes_max = args.patch_bytes_max.unwrap_or(limits.patch_bytes_max);
    limits.state_bytes_max = args.state_bytes_max.unwrap_or(limits.state_bytes_max);
    limits.history_len = args.history_len.unwrap_or(limits.history_len);
    if limits.history_len == 0 {
        bail!("--history-len must be at least 1 (the current version)");
    }
    let mut config = ServerConfig::new(&data, listen);
    config.set_limits(limits);
    config.repair = args.repair;
    config.snapshot_every_events = args.snapshot_every_events.unwrap_or(manifest.snapshots.every_events);
    config.snapshot_every =
        Duration::from_secs(args.snapshot_every_secs.unwrap_or(manifest.snapshots.every_secs).max(1));
    config.snapshots_kept = manifest.snapshots.kept.max(1);
    config.liveness = liveness;
    config.backup = manifest.backup_schedule();
    // The admin token: HALE_ADMIN_TOKEN, else [server] admin_token_file, else the one hale
    // keeps (and makes at first start) in the data directory.
    // Under systemd, `LoadCredential=admin.token:…` comes before hale.toml's file.
    let admin_token_file = credential(ADMIN_TOKEN_CREDENTIAL).or(manifest.server.admin_token_file.clone());
    config.auth.admin_token = match (std::env::var("HALE_ADMIN_TOKEN"), &admin_token_file) {
        (Ok(token), _) if !token.trim().is_empty() => Some(zeroize::Zeroizing::new(token.trim().to_string())),
        (_, Some(path)) => {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                format!(
                    "reading the admin token from {} ([server] admin_token_file, or the {ADMIN_TOKEN_CREDENTIAL} credential)",
                    path.display()
                )
            })?);
            Some(zeroize::Zeroizing::new(text.trim().to_string()))
        }
        _ => None,
    };
    let server = &manifest.server;
    if let Some(ttl) = server.access_token_ttl_s {
        config.auth.access_ttl = Duration::from_secs(ttl.max(1));
    }
    if let Some(ttl) = server.refresh_token_ttl_s {
        config.auth.refresh_ttl = Duration::from_secs(ttl.max(1));
    }
    config.metrics = hale_server::metrics::MetricsAccess {
        public: server.metrics_public.unwrap_or(false),
        token: match &server.metrics_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| {
                        format!("reading the metrics token from {} ([server] metrics_token_file)", path.display())
                    })?
                    .trim()
                    .to_string(),
            )
            .filter(|token| !token.is_empty()),
            None => None,
        },
    };
    let defaults = hale_server::limits::ConnectionLimits::default();
    config.connections = hale_server::limits::ConnectionLimits {
        max: server.connections_max.unwrap_or(defaults.max).max(1),
        per_address_max: server.connections_per_address_max.unwrap_or(defaults.per_address_max).max(1),
        first_byte_timeout: server.first_byte_timeout_ms.map_or(defaults.first_byte_timeout, Duration::from_millis),
        request_head_timeout: server
            .request_head_timeout_ms
            .map_or(defaults.request_head_timeout, Duration::from_millis),
        keep_alive_idle_timeout: server
            .keep_alive_idle_timeout_ms
            .map_or(defaults.keep_alive_idle_timeout, Duration::from_millis),
        body_timeout: server.body_timeout_ms.map_or(defaults.body_timeout, Duration::from_millis),
    };
    config.tls = match (&manifest.server.tls_cert_file, &manifest.server.tls_key_file) {
        (Some(cert_file), Some(key_file)) => Some(hale_server::tls::TlsFiles {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            ca_file: manifest.server.tls_ca_file.clone(),
        }),
        (None, None) => None,
        _ => bail!("[server] needs both tls_cert_file and tls_key_file for TLS, or neither for plain TCP"),
    };
    config.encryption = load_keys(key_file(args.encryption_key_file, &manifest).as_deref())?;
    if let Some(section) = &manifest.cluster {
        let section = section.get_ref();
        let base = match config_path.as_deref() {
            Some(path) => std::path::absolute(path)?.parent().map(PathBuf::from).unwrap_or_default(),
            None => std::env::current_dir()?,
        };
        let secret_file = base.join(section.secret_file.as_ref().expect("validated").get_ref());
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(&secret_file).with_context(|| {
            format!("reading the cluster secret from {} ([cluster] secret_file)", secret_file.display())
        })?);
        let secret = hale_server::ClusterSecret::new(&text)
            .map_err(|error| anyhow!("{} ([cluster] secret_file): {error}", secret_file.display()))?;
        let node_id = *section.node_id.as_ref().expect("validated").get_ref();
        let name = match &section.name {
            Some(name) => hale_core::NodeName::new(name.get_ref().as_str()).expect("validated"),
            None => hale_core::NodeName::new(format!("node-{node_id}")).expect("a valid node name"),
        };
        config.cluster = Some(hale_server::ClusterConfig {
            node_id,
            advertise: section.advertise.clone().unwrap_or_else(|| listen.to_string()),
            secret,
            timeouts: section.timeouts(),
            name,
            labels: section.labels.clone(),
            node_lease: section.node_lease(),
        });
    }
    // Relative commands of agents and hooks resolve against the directory of hale.toml.
    let base = match config_path.as_deref() {
        Some(path) => std::path::absolute(path)?.parent().map(PathBuf::from).unwrap_or_default(),
        None => std::env::current_dir()?,
    };
    config.hooks = manifest.hooks(&base).map_err(|error| anyhow!("{}: {error}", config_path_text(&config_path)))?;
    if supervise {
        config.supervise = Some(manifest.supervise(&base));
    }
    // Handlers first: a SIGTERM that arrives the moment we are listening must mean a clean
    // stop, not the default action (which kills the process and fails its exit status).
    let stop = StopSignals::install()?;
    // Under systemd's Type=notify: readiness, status lines, the stop and the watchdog.
    let notifier = match hale_server::notify::Notifier::from_env() {
        Ok(notifier) => notifier.map(Arc::new),
        Err(error) => {
            tracing::warn!(%error, "systemd will not hear that hale is ready");
            None
        }
    };
    if let Some(notifier) = &notifier {
        notifier.status(&format!("recovering {}: reading the newest snapshot, replaying the log", data.display()));
    }
    let server = match hale_server::start(config).await {
        Ok(server) => server,
        Err(error) => {
            if let Some(notifier) = &notifier {
                notifier.status(&format!("could not start: {error}"));
            }
            return Err(anyhow::Error::new(error).context(format!("hale could not start on {}", data.display())));
        }
    };
    let report = server.recovery();
    for skipped in &report.skipped_snapshots {
        if skipped.older {
            tracing::info!(seq = skipped.seq, path = %skipped.path.display(), reason = %skipped.reason, "skipped a snapshot");
        } else {
            tracing::warn!(seq = skipped.seq, path = %skipped.path.display(), reason = %skipped.reason, "skipped a snapshot");
        }
    }
    for (seq, reason) in &report.set_aside {
        tracing::error!(seq, %reason, "--repair set a damaged log record aside (kept in damaged_events)");
    }
    if !report.previously_set_aside.is_empty() {
        tracing::warn!(seqs = ?report.previously_set_aside, "log records set aside by an earlier --repair are still in damaged_events");
    }
    // One line on stdout, for scripts and tests that start hale on port 0.
    println!("hale listening on {}", server.local_addr());
    tracing::info!(
        listen = %server.local_addr(),
        data = %data.display(),
        last_seq = server.recovered_seq(),
        snapshot = ?report.snapshot_seq,
        replayed = report.replayed,
        "hale is ready"
    );
    let mut watchdog = None;
    if let Some(notifier) = &notifier {
        let agents = match server.supervisor() {
            Some(supervisor) => format!(" with {} agents running", supervisor.live()),
            None => String::new(),
        };
        notifier.ready(&format!("serving on {}{agents}", server.local_addr()));
        if let Some(interval) = hale_server::notify::watchdog_interval() {
            tracing::info!(
                interval_ms = interval.as_millis() as u64,
                "systemd's watchdog is on: pinging it while the engine answers"
            );
            watchdog =
                Some(tokio::spawn(hale_server::notify::watchdog(notifier.clone(), server.engine().clone(), interval)));
        }
    }
    stop.received().await;
    tracing::info!("shutting down: closing sessions, taking a snapshot, flushing the log");
    if let Some(notifier) = &notifier {
        notifier.stopping("stopping: the agents, then sessions, a final snapshot and the log");
    }
    let stopped = server.shutdown().await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    match stopped {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(0)
        }
        Err(error) => {
            tracing::error!(%error, "stopped with an error");
            Ok(1)
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment of `install` (a signal that arrives before
/// anyone awaits `received` is kept, not lost).
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    async fn received(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

async fn logs(agent: &str, follow: bool, lines: usize, config: Option<PathBuf>, data: Option<PathBuf>) -> Result<i32> {
    use hale_server::process::{AgentLogs, follow as follow_log, tail};
    use std::io::Write;
    let manifest = match &config {
        Some(path) => Some(Manifest::load(path)?),
        None if std::path::Path::new("hale.toml").exists() => Manifest::load(std::path::Path::new("hale.toml")).ok(),
        None => None,
    };
    let supervision = manifest.as_ref().map(|manifest| manifest.supervision.clone()).unwrap_or_default();
    let data = data
        .or_else(|| manifest.as_ref().and_then(|manifest| manifest.server.data.clone()))
        .unwrap_or_else(|| PathBuf::from("hale-data"));
    hale_core::AgentName::new(agent)?;
    let logs = AgentLogs::new(&data.join("logs"), agent, supervision.log_bytes_max, supervision.logs_kept);
    if !logs.path().exists() {
        bail!("no log for agent {agent:?} at {}; is it a managed agent of this data directory?", logs.path().display());
    }
    print!("{}", tail(&logs, lines)?);
    std::io::stdout().flush()?;
    if follow {
        let from = std::fs::metadata(logs.path()).map(|meta| meta.len()).unwrap_or(0);
        follow_log(&logs, from, |bytes| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        })
        .await?;
    }
    Ok(0)
}

async fn agents(server: &ServerArg, json: bool) -> Result<i32> {
    let agents = server.admin()?.agents().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(0);
    }
    // On a cluster, the node each agent runs on.
    let clustered = agents.iter().any(|agent| agent.managed.as_ref().is_some_and(|managed| managed.node.is_some()));
    let node_column = |node: &str| if clustered { format!("{node:<12} ") } else { String::new() };
    println!(
        "{:<24} {:<16} {:<12} {}{:>5} {:>8} {:>8} {:>8} {:<8} {:<9}  PROGRESS / CAUSE",
        "AGENT",
        "ROLE",
        "STATUS",
        node_column("NODE"),
        "INC",
        "VERSION",
        "PID",
        "RESTARTS",
        "ATTACHED",
        "BREAKER"
    );
    for agent in &agents {
        let managed = agent.managed.as_ref();
        // The most telling word: down beats health beats the supervisor's view.
        let status = match (&agent.down, &agent.health, managed) {
            (Some(_), _, Some(managed)) if managed.status != "running" && managed.status != "starting" => {
                managed.status.clone()
            }
            (Some(_), _, _) => "down".to_string(),
            (None, Some(health), _) => health.clone(),
            (None, None, Some(managed)) => managed.status.clone(),
            (None, None, None) => "-".to_string(),
        };
        let status = if agent.quarantine.is_some() { "quarantined".to_string() } else { status };
        let detail = match (&agent.down, &agent.progress) {
            (Some(down), _) => format!("{} ({})", down.cause, down.detector),
            (None, Some(progress)) => {
                let fraction =
                    progress.fraction.map(|fraction| format!("{:>3.0}% ", fraction * 100.0)).unwrap_or_default();
                format!("{fraction}{}", progress.message.clone().unwrap_or_default())
            }
            (None, None) => String::new(),
        };
        let detail = match (&agent.quarantine, managed.and_then(|managed| managed.pending.as_ref())) {
            (Some(quarantine), _) => format!("quarantined by {}: {}", quarantine.by, quarantine.reason),
            (None, Some(pending)) => format!("waits for a node: {pending}"),
            (None, None) => detail,
        };
        let node = managed.and_then(|managed| managed.node.as_deref()).unwrap_or("-");
        println!(
            "{:<24} {:<16} {:<12} {}{:>5} {:>8} {:>8} {:>8} {:<8} {:<9}  {}",
            agent.agent,
            agent.role,
            status,
            node_column(node),
            agent.incarnation,
            agent.version,
            managed.and_then(|managed| managed.pid).map_or("-".to_string(), |pid| pid.to_string()),
            managed.map_or("-".to_string(), |managed| managed.restarts.to_string()),
            if agent.attached { "yes" } else { "no" },
            agent.breaker,
            detail
        );
    }
    if agents.is_empty() {
        println!("(no agents yet: an agent is registered by its first hello)");
    }
    Ok(0)
}

async fn nodes(server: &ServerArg, json: bool) -> Result<i32> {
    let nodes = server.admin()?.nodes().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(0);
    }
    println!("{:<16} {:>4} {:<24} {:<6} {:<8} {:>11}  AGENTS", "NODE", "ID", "ADDRESS", "STATUS", "RAFT", "LAST HEARD");
    for node in &nodes {
        let heard = node.last_heard_ms_ago.map_or("-".to_string(), |ms| format!("{ms} ms ago"));
        let agents = if node.agents.is_empty() { "-".to_string() } else { node.agents.join(", ") };
        println!(
            "{:<16} {:>4} {:<24} {:<6} {:<8} {:>11}  {}",
            node.name, node.node_id, node.address, node.status, node.raft, heard, agents
        );
    }
    if nodes.is_empty() {
        println!("(no node has renewed its lease yet: each does within a second of the cluster forming)");
    }
    Ok(0)
}

/// The systemd credential (`LoadCredential=admin.token:PATH`) hale takes its admin token
/// from, before [server] admin_token_file.
const ADMIN_TOKEN_CREDENTIAL: &str = "admin.token";
/// The systemd credential hale takes its encryption keys from, after
/// `--encryption-key-file` and before [server] encryption_key_file.
const ENCRYPTION_KEYS_CREDENTIAL: &str = "encryption.keys";

/// The file of systemd credential `name` (in `$CREDENTIALS_DIRECTORY`, which systemd sets
/// for a unit with `LoadCredential=`), if there is one.
fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|dir| !dir.is_empty())?;
    let path = Path::new(&dir).join(name);
    path.is_file().then_some(path)
}

/// The encryption key file: the flag (or `HALE_ENCRYPTION_KEY_FILE`), else the
/// `encryption.keys` credential, else [server] encryption_key_file.
fn key_file(flag: Option<PathBuf>, manifest: &Manifest) -> Option<PathBuf> {
    flag.or_else(|| credential(ENCRYPTION_KEYS_CREDENTIAL)).or_else(|| manifest.server.encryption_key_file.clone())
}

/// The keys for encryption at rest: `HALE_ENCRYPTION_KEY` (entries separated by commas or
/// newlines), else the key file; `None` if neither is given.
fn load_keys(file: Option<&Path>) -> Result<Option<Arc<hale_store::Keyring>>> {
    if let Ok(text) = std::env::var("HALE_ENCRYPTION_KEY")
        && !text.trim().is_empty()
    {
        let keys = hale_store::Keyring::parse(&text)
            .map_err(|error| anyhow!("HALE_ENCRYPTION_KEY is not a valid key list: {error}"))?;
        return Ok(Some(Arc::new(keys)));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the encryption keys from {} (encryption_key_file)", path.display()))?;
    let keys = hale_store::Keyring::parse(&text)
        .map_err(|error| anyhow!("the encryption key file {} is not valid: {error}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the encryption key file can be read by other users; chmod 600 it");
        }
    }
    Ok(Some(Arc::new(keys)))
}

async fn backup(file: &std::path::Path, server: &ServerArg) -> Result<i32> {
    // hale resolves nothing against its own working directory: send an absolute path.
    let file = std::path::absolute(file)?;
    let path = file.to_str().context("the backup path is not UTF-8")?;
    let mut bar = crate::progress::Bar::new("backing up", "pages");
    let done = server.admin()?.backup(path, |done, total| bar.set(done, total)).await;
    bar.finish();
    let done = done.with_context(|| format!("backing up into {path}"))?;
    println!(
        "backup written: {} ({} records, last seq {}, {:.1} MiB, {} ms)",
        done.path,
        done.records,
        done.last_seq,
        done.bytes as f64 / (1024.0 * 1024.0),
        done.elapsed_ms
    );
    Ok(0)
}

fn restore(file: &std::path::Path, data: &std::path::Path, force: bool) -> Result<i32> {
    let options = hale_store::RestoreOptions { limits: hale_core::Limits::default(), force, now_ms: now_ms() };
    let mut copying = crate::progress::Bar::new("copying  ", "pages");
    let mut verifying = crate::progress::Bar::new("verifying", "records");
    let report = hale_store::restore(file, data, &options, |progress| match progress {
        hale_store::RestoreProgress::Copying(done) => copying.set(done.pages_done, done.pages_total),
        hale_store::RestoreProgress::Verifying { records_done, records_total } => {
            copying.finish();
            verifying.set(records_done, records_total)
        }
    });
    copying.finish();
    verifying.finish();
    let report = report.with_context(|| format!("restoring {} into {}", file.display(), data.display()))?;
    if let Some(replaced) = &report.replaced {
        println!("the previous log and snapshots were moved to {}", replaced.display());
    }
    println!(
        "restored {} into {}: {} records, last seq {}, {} agents; start hale on it (it replays the log and takes new snapshots)",
        file.display(),
        data.display(),
        report.records,
        report.last_seq,
        report.agents
    );
    Ok(0)
}

fn rekey(data: &Path, key_file: Option<&Path>) -> Result<i32> {
    let Some(keys) = load_keys(key_file)? else {
        bail!(
            "hale rekey needs the keys: --encryption-key-file FILE (or HALE_ENCRYPTION_KEY), the key to seal everything with first, then every key the log still uses"
        );
    };
    if !data.join("hale.db").exists() {
        bail!("{} holds no hale log (no hale.db); pass the directory `hale serve --data` used", data.display());
    }
    let dir = hale_store::DataDir::open(data).map_err(|error| match error {
        hale_store::StoreError::Locked { .. } => anyhow!("{error}: stop hale before rekeying"),
        other => other.into(),
    })?;
    let mut bar = crate::progress::Bar::new("rekeying", "records");
    let report = hale_store::rekey(&dir, &keys, |done, total| bar.set(done, total));
    bar.finish();
    let report = report?;
    println!(
        "sealed {} of {} records and {} snapshots anew with key {}",
        report.resealed, report.records, report.snapshots, report.key_id
    );
    for (seq, reason) in &report.unreadable {
        println!("record {seq} left as it was: {reason} (hale verify says more)");
    }
    for (seq, reason) in &report.unreadable_snapshots {
        println!("snapshot {seq} left as it was: {reason}");
    }
    if !report.retired.is_empty() {
        println!(
            "no longer needed: {} (remove them from the key list; backups taken before still need them)",
            report.retired.join(", ")
        );
    }
    Ok(if report.unreadable.is_empty() && report.unreadable_snapshots.is_empty() { 0 } else { 1 })
}

fn verify(data: &std::path::Path, file: Option<&std::path::Path>, json: bool, key_file: Option<&Path>) -> Result<i32> {
    let limits = hale_core::Limits::default();
    let keys = load_keys(key_file)?;
    let mut bar = crate::progress::Bar::new("verifying", "records");
    let report = match file {
        Some(file) => hale_store::verify_backup(file, &limits, |done, total| bar.set(done, total)),
        None => {
            if !data.join("hale.db").exists() {
                bail!("{} holds no hale log (no hale.db); pass the directory `hale serve --data` used", data.display());
            }
            hale_store::verify_with(data, &limits, keys.as_deref(), |done, total| bar.set(done, total))
        }
    };
    bar.finish();
    let report = report?;
    if json {
        let snapshots: Vec<_> = report
            .snapshots
            .iter()
            .map(|s| serde_json::json!({"seq": s.seq, "path": s.path, "problem": s.problem, "not_compared": s.not_compared}))
            .collect();
        let value = serde_json::json!({
            "clean": report.is_clean(),
            "records": report.records,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "corrupt": report.corrupt.iter().map(|(seq, reason)| serde_json::json!({"seq": seq, "reason": reason})).collect::<Vec<_>>(),
            "missing": report.missing,
            "set_aside": report.set_aside,
            "snapshots": snapshots,
            "agents": report.agents,
            "encrypted": report.encrypted,
            "not_decrypted": report.not_decrypted,
            "key_ids": report.key_ids,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match file {
            Some(file) => println!("backup file: {}", file.display()),
            None => println!("data directory: {}", data.display()),
        }
        match (report.first_seq, report.last_seq) {
            (Some(first), Some(last)) => println!("log: {} records, seq {first}..={last}", report.records),
            _ => println!("log: empty"),
        }
        if report.encrypted > 0 {
            println!("encrypted: {} records, with keys {}", report.encrypted, report.key_ids.join(", "));
        }
        if report.not_decrypted > 0 {
            println!(
                "not decrypted (no key given): {} records; their checksums verified, their events not checked",
                report.not_decrypted
            );
        }
        for (seq, reason) in &report.corrupt {
            println!("CORRUPT record {seq}: {reason}");
        }
        for seq in &report.missing {
            println!("MISSING record {seq}");
        }
        for seq in &report.set_aside {
            println!("set aside by --repair: record {seq} (kept in damaged_events)");
        }
        for snapshot in &report.snapshots {
            match &snapshot.problem {
                None if snapshot.older.is_some() => println!(
                    "snapshot at {}: {} ({})",
                    snapshot.seq,
                    snapshot.older.as_deref().unwrap_or_default(),
                    snapshot.path.display()
                ),
                None if snapshot.not_compared.is_some() => println!(
                    "snapshot at {}: checksum ok, not compared: {} ({})",
                    snapshot.seq,
                    snapshot.not_compared.as_deref().unwrap_or_default(),
                    snapshot.path.display()
                ),
                None => println!("snapshot at {}: ok ({})", snapshot.seq, snapshot.path.display()),
                Some(problem) => {
                    println!("DAMAGED snapshot at {}: {problem} ({})", snapshot.seq, snapshot.path.display())
                }
            }
        }
        println!("agents: {}", report.agents);
        println!("{}", if report.is_clean() { "verdict: clean" } else { "verdict: DAMAGED" });
    }
    Ok(if report.is_clean() { 0 } else { 1 })
}

/// `hale cluster …`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Make the node at --server a cluster of one; the others then join it.
    Init {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Have the node at --server join the cluster a member of which listens at ADDRESS.
    Join {
        /// `host:port` of any member (the request follows it to the leader).
        address: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove the node at --server from its cluster (or, with --node, another member, such
    /// as one that is down). One node at a time; the last voter cannot leave.
    Leave {
        /// The id of the member to remove [default: the node at --server].
        #[arg(long = "node")]
        node: Option<u64>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// The leader, the term, and each member with how far it lags behind the leader.
    Status {
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
}

async fn cluster(command: ClusterCommand) -> Result<i32> {
    match command {
        ClusterCommand::Init { server } => {
            let imported = server.admin()?.cluster_init().await?;
            if imported > 0 {
                println!("a cluster of one, from this node's log ({imported} events)");
            } else {
                println!("a cluster of one");
            }
            println!("other nodes join it with `hale cluster join ADDRESS`");
        }
        ClusterCommand::Leave { node, server } => {
            let voters = server.admin()?.cluster_leave(node).await?;
            let who = node.map_or("the node".to_string(), |id| format!("node {id}"));
            println!("{who} left the cluster; its voters are now {voters:?}");
        }
        ClusterCommand::Join { address, server } => {
            server.admin()?.cluster_join(&address).await?;
            println!("joined the cluster of {address}");
        }
        ClusterCommand::Status { json, server } => {
            let status = server.admin()?.cluster().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(0);
            }
            let leader = status.leader.map_or("none known".to_string(), |leader| format!("node {leader}"));
            println!("node {} is {} in term {}; leader: {leader}", status.node_id, status.role, status.term);
            println!("{:<6} {:<24} {:<8} {:>10} {:>8}", "NODE", "ADDRESS", "VOTER", "MATCHED", "LAG");
            for member in &status.members {
                let matched = member.matched_index.map_or("-".to_string(), |index| index.to_string());
                let lag = member.lag.map_or("-".to_string(), |lag| lag.to_string());
                println!("{:<6} {:<24} {:<8} {:>10} {:>8}", member.node_id, member.address, member.voter, matched, lag);
            }
        }
    }
    Ok(0)
}
