//! `hale.toml`: the server's settings and the agents, groups and roles hale supervises.
//!
//! Every field has a default except an agent's `name` and `command`. Unknown keys are an
//! error that names the key and its line; so is anything that parses but makes no sense
//! (an agent in a group that does not exist, a pool whose minimum exceeds its maximum…).
//! `hale check -c hale.toml` runs exactly this validation. `hale serve -c` applies the
//! `[server]`, `[limits]`, `[snapshots]` and `[backup]` sections; `hale up -c` also runs the agents
//! ([`Manifest::supervise`]).

use crate::config::{DeclaredAgent, DeclaredRole, Supervise};
use crate::probe::ProbeSpec;
use crate::process::ProcessSpec;
use hale_core::health::{BreakerPolicy, QuarantinePolicy};
use hale_core::policy::{Backoff, Intensity, PhiConfig};
pub use hale_core::supervision::{Criticality, RestartPolicy, StallPolicy, Strategy};
use hale_core::supervision::{GroupMembership, Supervision};
use hale_core::{AgentName, Limits, LivenessSettings, RoleName, validate_labels};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A parsed and validated `hale.toml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Manifest {
    pub server: ServerSection,
    pub limits: Limits,
    pub snapshots: SnapshotSection,
    pub supervision: SupervisionSection,
    pub tasks: TasksSection,
    /// `[backup]`: automatic backups; absent, none are taken.
    pub backup: Option<Spanned<BackupSection>>,
    /// `[cluster]`: this hale is a node of a Raft cluster; absent, a single node.
    pub cluster: Option<Spanned<ClusterSection>>,
    #[serde(rename = "agent")]
    pub agents: Vec<AgentSpec>,
    #[serde(rename = "group")]
    pub groups: Vec<GroupSpec>,
    #[serde(rename = "role")]
    pub roles: Vec<RoleSpec>,
    #[serde(rename = "hook")]
    pub hooks: Vec<HookSpec>,
}

/// `[server]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Data directory (default `hale-data`, relative to the working directory).
    pub data: Option<PathBuf>,
    /// Listen address (default `127.0.0.1:7700`).
    pub listen: Option<SocketAddr>,
    /// A file holding the admin token (default: `admin.token` in the data directory, made
    /// at first start). `HALE_ADMIN_TOKEN` overrides both.
    pub admin_token_file: Option<PathBuf>,
    /// TLS: the certificate chain and private key (PEM). Without them, plain TCP.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// What the agents hale runs verify it against (default: `tls_cert_file`).
    pub tls_ca_file: Option<PathBuf>,
    /// Open connections at most (default 4096, plain or TLS).
    pub connections_max: Option<usize>,
    /// Open connections from one IP address at most (default 1024).
    pub connections_per_address_max: Option<usize>,
    /// A new connection must send its first byte within this (default 10000).
    pub first_byte_timeout_ms: Option<u64>,
    /// A request head must be complete within this of its first byte (default 10000).
    pub request_head_timeout_ms: Option<u64>,
    /// A keep-alive connection idle this long after a response is closed (default 30000).
    pub keep_alive_idle_timeout_ms: Option<u64>,
    /// A request body must arrive within this (default 10000).
    pub body_timeout_ms: Option<u64>,
    /// Encryption at rest: a file of keys, `ID:BASE64` one per line, the key for new
    /// writes first (`hale keygen` prints one). `HALE_ENCRYPTION_KEY` overrides it.
    pub encryption_key_file: Option<PathBuf>,
    /// A file holding a token that may read `GET /metrics` and nothing else (for
    /// Prometheus, which cannot refresh short-lived agent tokens).
    pub metrics_token_file: Option<PathBuf>,
    /// Serve `GET /metrics` without any token (default false).
    pub metrics_public: Option<bool>,
    /// How long an agent's access token lasts, in seconds (default 900). A session lives
    /// only as long as its token: clients renew it in band before it expires.
    pub access_token_ttl_s: Option<u64>,
    /// How long an agent's refresh token lasts, in seconds (default 2592000, 30 days).
    pub refresh_token_ttl_s: Option<u64>,
}

/// `[cluster]`: who this node is and how its peers reach it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Required: unique in the cluster, at least 1.
    pub node_id: Option<Spanned<u64>>,
    /// The `host:port` peers and clients reach this node at (default: the listen address).
    pub advertise: Option<String>,
    /// Required: a file holding the secret every node shares (at least 16 bytes; `hale
    /// keygen` makes one). Node-to-node requests carry it. Relative to hale.toml.
    pub secret_file: Option<Spanned<PathBuf>>,
    /// The leader's heartbeat interval (default 100).
    pub heartbeat_ms: Option<u64>,
    /// The random election timeout's range (defaults 500 and 1000): a voter that hears no
    /// leader for a time drawn from it stands for election; the minimum is also the lease
    /// during which voters refuse to depose a leader they hear.
    pub election_min_ms: Option<u64>,
    pub election_max_ms: Option<u64>,
    /// This node's name among the nodes (default `node-ID`).
    pub name: Option<Spanned<String>>,
    /// Labels the `node_labels` of agents match.
    pub labels: BTreeMap<String, String>,
    /// How long a lease renewal lets the node run its agents (default 3000, or three times
    /// election_max_ms if that is more; at least that): cut off from the quorum for this
    /// long, it stops them; the leader places them elsewhere after 1.2 times as long
    /// without hearing from it.
    pub node_lease_ms: Option<u64>,
}

impl ClusterSection {
    /// The node lease: `node_lease_ms`, else 3 s or three election timeouts if longer.
    pub fn node_lease(&self) -> std::time::Duration {
        match self.node_lease_ms {
            Some(ms) => std::time::Duration::from_millis(ms),
            None => crate::nodes::LEASE_DEFAULT.max(self.timeouts().election_max * 3),
        }
    }

    /// Raft's timing from this section.
    pub fn timeouts(&self) -> hale_cluster::node::Timeouts {
        let defaults = hale_cluster::node::Timeouts::default();
        let millis = std::time::Duration::from_millis;
        hale_cluster::node::Timeouts {
            heartbeat: self.heartbeat_ms.map_or(defaults.heartbeat, millis),
            election_min: self.election_min_ms.map_or(defaults.election_min, millis),
            election_max: self.election_max_ms.map_or(defaults.election_max, millis),
        }
    }
}

/// `[snapshots]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotSection {
    pub every_events: u64,
    pub every_secs: u64,
    pub kept: usize,
}

impl Default for SnapshotSection {
    fn default() -> Self {
        SnapshotSection { every_events: 10_000, every_secs: 60, kept: 3 }
    }
}

/// `[backup]`: a backup of the log into `dir` every `every_s` seconds, the newest `keep`
/// kept (older `hale-backup-*.db` files there are removed).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupSection {
    /// Required. Relative to the directory hale runs in, like `[server] data`.
    pub dir: Option<Spanned<PathBuf>>,
    /// Default 3600.
    pub every_s: Option<Spanned<u64>>,
    /// Default 24.
    pub keep: Option<Spanned<u64>>,
}

impl BackupSection {
    pub const EVERY_S_DEFAULT: u64 = 3600;
    pub const KEEP_DEFAULT: u64 = 24;
}

/// `[supervision]`: defaults for every managed agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionSection {
    pub backoff: Backoff,
    pub intensity: Intensity,
    /// Between SIGTERM and SIGKILL when stopping an agent.
    pub stop_grace_ms: u64,
    pub detector: PhiConfig,
    /// The default stall detector of every agent (each may override it).
    pub stall: StallPolicy,
    /// How long agents have to reconnect after hale restarts before they are declared down.
    pub reconnect_grace_ms: u64,
    /// At most one progress event per agent per this interval.
    pub progress_log_ms: u64,
    /// Rotate an agent's log file past this size.
    pub log_bytes_max: u64,
    /// Rotated log files kept per agent.
    pub logs_kept: usize,
    pub breaker: BreakerPolicy,
    pub quarantine: QuarantinePolicy,
    /// hale's variables every agent gets (their values as hale has them); nothing else of
    /// hale's environment reaches an agent. Default: PATH, HOME, USER, LOGNAME, SHELL,
    /// LANG, LANGUAGE, LC_ALL, LC_CTYPE, LC_MESSAGES, TZ, TMPDIR, TERM, SSL_CERT_FILE,
    /// SSL_CERT_DIR. An agent's own `pass_env` adds to it.
    pub pass_env: Vec<String>,
    /// Where agents without a `workdir` get their own working directory, `BASE/NAME`
    /// (default `agents` in the data directory). Relative to the directory of hale.toml.
    pub workdir_base: Option<PathBuf>,
    /// `"auto"` (default): a cgroup per agent where the host offers one; `"off"`: none,
    /// memory and CPU polled from /proc.
    pub cgroups: crate::process::CgroupSetting,
}

impl Default for SupervisionSection {
    fn default() -> Self {
        SupervisionSection {
            backoff: Backoff::default(),
            intensity: Intensity::default(),
            stop_grace_ms: 5_000,
            detector: PhiConfig::default(),
            // Ten minutes: the default timeout of the model SDKs (OpenAI's, Anthropic's), so a
            // slow model call that its SDK would still wait for is not called a stall.
            stall: StallPolicy { beats: None, quiet_ms: Some(600_000) },
            reconnect_grace_ms: 10_000,
            progress_log_ms: 10_000,
            log_bytes_max: 10 * 1024 * 1024,
            logs_kept: 5,
            breaker: BreakerPolicy::default(),
            quarantine: QuarantinePolicy::default(),
            pass_env: crate::process::environment::DEFAULT_PASS_ENV.iter().map(|name| name.to_string()).collect(),
            workdir_base: None,
            cgroups: crate::process::CgroupSetting::default(),
        }
    }
}

/// `[tasks]`: the task queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksSection {
    /// Leases one agent holds at once.
    pub per_agent_max: u32,
    /// Queued tasks from which background submissions are refused (503, Retry-After).
    pub shed_background_at: u64,
    /// … normal submissions.
    pub shed_normal_at: u64,
    /// … high submissions. Critical ones are always accepted.
    pub shed_high_at: u64,
    /// The Retry-After of a refused submission.
    pub retry_after_ms: u64,
    /// A budget breach also quarantines the agent (it always opens its breaker).
    pub quarantine_on_budget_breach: bool,
    /// A task falls back to a lower rung only after the rungs above had no healthy agent
    /// for this long.
    pub fallback_grace_ms: u64,
}

impl Default for TasksSection {
    fn default() -> Self {
        let core = hale_core::tasks::TaskSettings::default();
        TasksSection {
            per_agent_max: core.per_agent_max,
            shed_background_at: core.shed_background_at,
            shed_normal_at: core.shed_normal_at,
            shed_high_at: core.shed_high_at,
            retry_after_ms: core.retry_after_ms,
            quarantine_on_budget_breach: core.quarantine_on_budget_breach,
            fallback_grace_ms: core.fallback_grace_ms,
        }
    }
}

/// `budget = { tokens = …, cost = …, period_ms = … }` of an agent.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    pub tokens: Option<u64>,
    pub cost: Option<u64>,
    /// Spending is counted per period (default an hour).
    #[serde(default = "default_budget_period_ms")]
    pub period_ms: u64,
}

fn default_budget_period_ms() -> u64 {
    3_600_000
}

impl BudgetSpec {
    fn core(&self) -> hale_core::budget::AgentBudget {
        hale_core::budget::AgentBudget { tokens: self.tokens, cost: self.cost, period_ms: self.period_ms }
    }
}

/// `[[agent]]`, and the `template` of a `[[role]]` (which has no `name`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSpec {
    pub name: Option<Spanned<String>>,
    /// Defaults to the agent's name.
    pub role: Option<String>,
    pub command: Option<Spanned<String>>,
    pub args: Vec<String>,
    /// Variables of the agent's own. It gets none of hale's environment but these, the
    /// `pass_env` names and what hale sets (`HALE_URL`, `HALE_AGENT`, its tokens…).
    pub env: BTreeMap<String, String>,
    /// More of hale's variables to pass, on top of `[supervision] pass_env`.
    pub pass_env: Vec<String>,
    /// A file of `NAME=value` lines read at each start, for secrets the agent needs
    /// (relative to the directory of hale.toml).
    pub env_file: Option<Spanned<PathBuf>>,
    /// Run as this user: `name`, `name:group` or numeric ids (hale must be root or hold
    /// CAP_SETUID and CAP_SETGID…; see `process::identity`). Default: hale's own user.
    pub user: Option<Spanned<String>>,
    /// Working directory; relative paths are relative to the directory of hale.toml.
    /// Default: the agent's own, `[supervision] workdir_base`/NAME, made at start.
    pub workdir: Option<PathBuf>,
    pub restart: RestartPolicy,
    pub criticality: Criticality,
    pub group: Option<Spanned<String>>,
    pub labels: BTreeMap<String, String>,
    pub resources: Resources,
    pub health: Option<HealthProbe>,
    /// Overrides `[supervision.stall]` for this agent; `stall = {}` turns it off.
    pub stall: Option<StallPolicy>,
    /// What the agent may spend per period.
    pub budget: Option<BudgetSpec>,
    /// On a cluster: the nodes (`[cluster] name`) it may run on; any node if empty.
    pub nodes: Vec<String>,
    /// On a cluster: it runs only on nodes with every one of these labels.
    pub node_labels: BTreeMap<String, String>,
    /// On a cluster, in a `[[role]]` template: the pool's instances spread over the nodes.
    pub spread: bool,
}

/// Resource limits, applied at spawn where the kernel allows and watched from /proc.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Where hale makes the agent a cgroup: its memory limit (the kernel's OOM killer
    /// ends the agent past it; cause `out_of_memory`). Elsewhere: resident memory of the
    /// agent's process group, watched from /proc once a second; over it, the agent is
    /// declared down (cause `resource`) and restarted.
    pub memory_mb: Option<u64>,
    /// The most processes and threads the agent's cgroup may hold (`pids.max`); a fork
    /// past it fails with EAGAIN. Needs a cgroup.
    pub pids_max: Option<u64>,
    /// A CPU quota in percent of one core (150 = one and a half cores), enforced by the
    /// kernel's scheduler (the agent is throttled, not stopped). Needs a cgroup.
    pub cpu_quota_percent: Option<u32>,
    /// Percent of one core, averaged over `cpu_window_ms`: over it, the agent is declared down.
    pub cpu_percent: Option<u32>,
    /// The CPU averaging window (default 10,000 ms).
    #[serde(default = "default_cpu_window_ms")]
    pub cpu_window_ms: u64,
    /// RLIMIT_AS, applied at spawn: allocations past it fail inside the agent. Virtual
    /// memory, so set it well above `memory_mb` (runtimes reserve much more than they use).
    pub address_space_mb: Option<u64>,
    /// RLIMIT_NOFILE, applied at spawn.
    pub open_files: Option<u64>,
}

/// An optional HTTP health endpoint of the agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    pub url: String,
    #[serde(default = "default_probe_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    /// Failed probes in a row that declare the agent down.
    #[serde(default = "default_probe_failures_max")]
    pub failures_max: u32,
}

fn default_probe_failures_max() -> u32 {
    3
}

fn default_cpu_window_ms() -> u64 {
    10_000
}

fn default_probe_interval_ms() -> u64 {
    5_000
}

fn default_probe_timeout_ms() -> u64 {
    1_000
}

/// `[[group]]`: agents restarted together as OTP's supervisors do.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub strategy: Strategy,
}

/// `[[role]]`: a pool of interchangeable agents.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub min: u32,
    #[serde(default = "default_pool_max")]
    pub max: u32,
    /// How to start a new instance when the pool is below `min`.
    pub template: Option<AgentSpec>,
}

fn default_pool_max() -> u32 {
    1
}

/// `[[hook]]`: who to tell when something goes wrong (a webhook or a command).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    pub name: Spanned<String>,
    /// Event kinds, e.g. `agent.down` (see [`HookKind`](hale_core::hooks::HookKind)).
    #[serde(default)]
    pub on: Vec<Spanned<String>>,
    /// `POST` the event as JSON here.
    pub webhook: Option<Spanned<String>>,
    /// Or run this, the event as JSON on stdin.
    pub command: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: Spanned<u64>,
    #[serde(default = "default_hook_retries")]
    pub retries: Spanned<u32>,
    #[serde(default = "default_hook_backoff_ms")]
    pub backoff_ms: Spanned<u64>,
    /// A webhook's signing secret from this environment variable of hale's.
    pub secret_env: Option<Spanned<String>>,
    /// Or from this file (relative to hale.toml's directory), its content trimmed.
    pub secret_file: Option<Spanned<PathBuf>>,
}

/// Retries at most: with the backoff's cap (60 s) that is over an hour of trying.
pub const HOOK_RETRIES_MAX: u32 = 100;

fn default_hook_timeout_ms() -> Spanned<u64> {
    Spanned::new(0..0, 5_000)
}

fn default_hook_retries() -> Spanned<u32> {
    Spanned::new(0..0, 5)
}

fn default_hook_backoff_ms() -> Spanned<u64> {
    Spanned::new(0..0, 500)
}

/// Why a hale.toml was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A syntax error, a key that does not exist, or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Parsed, but inconsistent.
    #[error("{path}, line {line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
}

impl Manifest {
    /// The detector and progress settings of `[supervision]`.
    pub fn liveness(&self) -> LivenessSettings {
        LivenessSettings {
            detector: self.supervision.detector.clone(),
            reconnect_grace_ms: self.supervision.reconnect_grace_ms,
            progress_log_ms: self.supervision.progress_log_ms,
            breaker: self.supervision.breaker.clone(),
            quarantine: self.supervision.quarantine.clone(),
            tasks: hale_core::tasks::TaskSettings {
                per_agent_max: self.tasks.per_agent_max,
                shed_background_at: self.tasks.shed_background_at,
                shed_normal_at: self.tasks.shed_normal_at,
                shed_high_at: self.tasks.shed_high_at,
                retry_after_ms: self.tasks.retry_after_ms,
                quarantine_on_budget_breach: self.tasks.quarantine_on_budget_breach,
                fallback_grace_ms: self.tasks.fallback_grace_ms,
            },
        }
    }

    /// The automatic backups of `[backup]`, if the section is there.
    pub fn backup_schedule(&self) -> Option<crate::config::BackupSchedule> {
        let section = self.backup.as_ref()?.get_ref();
        Some(crate::config::BackupSchedule {
            dir: section.dir.as_ref().expect("validated").get_ref().clone(),
            every: std::time::Duration::from_secs(
                section.every_s.as_ref().map_or(BackupSection::EVERY_S_DEFAULT, |every| *every.get_ref()),
            ),
            keep: section.keep.as_ref().map_or(BackupSection::KEEP_DEFAULT, |keep| *keep.get_ref()) as usize,
        })
    }

    /// The failure hooks, with a `command` that holds a slash relative to `base` (the
    /// directory of hale.toml), as agents' commands are.
    ///
    /// Reads each webhook's signing secret (`secret_env`, `secret_file`): the error names
    /// the hook and what is missing.
    pub fn hooks(&self, base: &Path) -> Result<Vec<crate::hooks::HookConfig>, String> {
        use crate::hooks::{HookConfig, HookTarget};
        self.hooks
            .iter()
            .map(|spec| {
                let secret = hook_secret(spec, base)?;
                let target = match (&spec.webhook, &spec.command) {
                    (Some(url), _) => HookTarget::Webhook { url: url.get_ref().clone() },
                    (None, Some(argv)) => {
                        let mut argv = argv.get_ref().clone();
                        if argv[0].contains('/') && Path::new(&argv[0]).is_relative() {
                            argv[0] = base.join(&argv[0]).to_string_lossy().into_owned();
                        }
                        HookTarget::Command { argv }
                    }
                    (None, None) => unreachable!("validated"),
                };
                let mut on: Vec<_> = spec
                    .on
                    .iter()
                    .map(|kind| hale_core::hooks::HookKind::parse(kind.get_ref()).expect("validated"))
                    .collect();
                on.sort();
                on.dedup();
                Ok(HookConfig {
                    name: hale_core::HookName::new(spec.name.get_ref().as_str()).expect("validated"),
                    on,
                    target,
                    timeout: std::time::Duration::from_millis(*spec.timeout_ms.get_ref()),
                    retries: *spec.retries.get_ref(),
                    backoff: std::time::Duration::from_millis(*spec.backoff_ms.get_ref()),
                    secret,
                })
            })
            .collect()
    }

    /// What `hale up` runs: every `[[agent]]`, with paths relative to `base` (the
    /// directory of hale.toml).
    pub fn supervise(&self, base: &Path) -> Supervise {
        let mut positions: BTreeMap<&str, u32> = BTreeMap::new();
        let agents = self
            .agents
            .iter()
            .map(|spec| {
                let name =
                    AgentName::new(spec.name.as_ref().expect("validated").get_ref().as_str()).expect("validated");
                let role = match &spec.role {
                    Some(role) => RoleName::new(role.as_str()).expect("validated"),
                    None => hale_core::supervision::default_role(&name),
                };
                let group = spec.group.as_ref().map(|group| {
                    let group = group.get_ref().as_str();
                    let position = positions.entry(group).or_default();
                    *position += 1;
                    let strategy = self
                        .groups
                        .iter()
                        .find(|declared| declared.name.get_ref() == group)
                        .map(|declared| declared.strategy)
                        .unwrap_or_default();
                    GroupMembership { name: group.to_string(), strategy, position: *position }
                });
                let supervision = Supervision {
                    restart: spec.restart,
                    criticality: spec.criticality,
                    backoff: self.supervision.backoff.clone(),
                    intensity: self.supervision.intensity.clone(),
                    group,
                    stall: spec.stall.clone().unwrap_or_else(|| self.supervision.stall.clone()),
                    budget: spec.budget.as_ref().map(BudgetSpec::core),
                    thresholds: thresholds(spec),
                    placement: placement(spec),
                };
                DeclaredAgent {
                    name,
                    role,
                    labels: spec.labels.clone(),
                    supervision,
                    process: process_spec(spec, base, &self.supervision.pass_env),
                    probe: probe_spec(spec),
                }
            })
            .collect();
        let roles = self
            .roles
            .iter()
            .filter_map(|role| {
                let template = role.template.as_ref()?;
                let name = RoleName::new(role.name.get_ref().as_str()).expect("validated");
                Some(DeclaredRole {
                    role: name,
                    min: role.min,
                    max: role.max,
                    supervision: Supervision {
                        restart: template.restart,
                        criticality: template.criticality,
                        backoff: self.supervision.backoff.clone(),
                        intensity: self.supervision.intensity.clone(),
                        group: None,
                        stall: template.stall.clone().unwrap_or_else(|| self.supervision.stall.clone()),
                        budget: template.budget.as_ref().map(BudgetSpec::core),
                        thresholds: thresholds(template),
                        placement: placement(template),
                    },
                    process: process_spec(template, base, &self.supervision.pass_env),
                    probe: probe_spec(template),
                })
            })
            .collect();
        Supervise {
            agents,
            roles,
            stop_grace: std::time::Duration::from_millis(self.supervision.stop_grace_ms),
            log_bytes_max: self.supervision.log_bytes_max,
            logs_kept: self.supervision.logs_kept,
            workdir_base: self.supervision.workdir_base.as_ref().map(|dir| base.join(dir)),
            cgroups: self.supervision.cgroups,
        }
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_path_buf(), source })?;
        Manifest::parse(&text, path)
    }

    /// Parses and validates `text`, read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text)
            .map_err(|error| ManifestError::Parse { path: path.to_path_buf(), message: error.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        manifest
            .validate(text)
            .and_then(|()| manifest.check_machine(text, base))
            .map_err(|(line, message)| ManifestError::Invalid { path: path.to_path_buf(), line, message })?;
        Ok(manifest)
    }

    /// What only this machine can tell: the agents' users exist and hale may switch to
    /// them, and their env files are there and readable. `base` is hale.toml's directory.
    fn check_machine(&self, text: &str, base: &Path) -> Result<(), (usize, String)> {
        let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let specs = self.agents.iter().chain(self.roles.iter().filter_map(|role| role.template.as_ref()));
        for spec in specs {
            let what = match &spec.name {
                Some(name) => format!("agent {:?}", name.get_ref()),
                None => "a role's template".to_string(),
            };
            if let Some(user) = &spec.user {
                let line = line_of(user.span());
                crate::process::identity::can_switch()
                    .and_then(|()| crate::process::identity::resolve(user.get_ref()))
                    .map_err(|reason| (line, format!("{what} runs as user {:?}: {reason}", user.get_ref())))?;
            }
            if let Some(file) = &spec.env_file {
                let path = base.join(file.get_ref());
                std::fs::read_to_string(&path)
                    .map_err(|error| error.to_string())
                    .and_then(|text| crate::process::environment::parse_env_file(&text))
                    .map_err(|reason| {
                        (line_of(file.span()), format!("{what}: env_file {}: {reason}", path.display()))
                    })?;
            }
        }
        Ok(())
    }

    fn validate(&self, text: &str) -> Result<(), (usize, String)> {
        let line_of = |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let mut groups = BTreeSet::new();
        for group in &self.groups {
            let line = line_of(group.name.span());
            check_name(group.name.get_ref(), "group", line)?;
            if !groups.insert(group.name.get_ref().as_str()) {
                return Err((line, format!("group {:?} is declared twice", group.name.get_ref())));
            }
        }
        let mut agents = BTreeSet::new();
        for (index, agent) in self.agents.iter().enumerate() {
            let Some(name) = &agent.name else {
                return Err((
                    1,
                    format!("agent number {} has no name; every [[agent]] needs name = \"...\"", index + 1),
                ));
            };
            let line = line_of(name.span());
            AgentName::new(name.get_ref().as_str()).map_err(|error| (line, error.to_string()))?;
            if !agents.insert(name.get_ref().as_str()) {
                return Err((line, format!("agent {:?} is declared twice", name.get_ref())));
            }
            check_process(agent, line, &format!("agent {:?}", name.get_ref()))?;
            if agent.spread {
                return Err((
                    line,
                    format!(
                        "agent {:?}: spread applies to the instances of a [[role]] pool; put it in the role's template",
                        name.get_ref()
                    ),
                ));
            }
            if let Some(group) = &agent.group
                && !groups.contains(group.get_ref().as_str())
            {
                return Err((
                    line_of(group.span()),
                    format!(
                        "agent {:?} is in group {:?}, which no [[group]] declares",
                        name.get_ref(),
                        group.get_ref()
                    ),
                ));
            }
        }
        let mut roles = BTreeSet::new();
        for role in &self.roles {
            let line = line_of(role.name.span());
            RoleName::new(role.name.get_ref().as_str()).map_err(|error| (line, error.to_string()))?;
            if !roles.insert(role.name.get_ref().as_str()) {
                return Err((line, format!("role {:?} is declared twice", role.name.get_ref())));
            }
            if role.min > role.max {
                return Err((
                    line,
                    format!("role {:?}: min {} is more than max {}", role.name.get_ref(), role.min, role.max),
                ));
            }
            match &role.template {
                None if role.min > 0 => {
                    return Err((
                        line,
                        format!(
                            "role {:?} has min {} but no template to start instances from",
                            role.name.get_ref(),
                            role.min
                        ),
                    ));
                }
                None => {}
                Some(template) => {
                    if let Some(name) = &template.name {
                        return Err((
                            line_of(name.span()),
                            "a role's template takes no name: instances are named after the role".into(),
                        ));
                    }
                    check_process(template, line, &format!("the template of role {:?}", role.name.get_ref()))?;
                }
            }
        }
        if self.supervision.detector.suspect_threshold > self.supervision.detector.threshold {
            return Err((1, "supervision.detector.suspect_threshold must not exceed threshold".into()));
        }
        if let Some(backup) = &self.backup {
            let section = backup.get_ref();
            match &section.dir {
                None => {
                    return Err((
                        line_of(backup.span()),
                        "[backup] needs dir = \"...\": the directory the backups are written to".into(),
                    ));
                }
                Some(dir) if dir.get_ref().as_os_str().is_empty() => {
                    return Err((line_of(dir.span()), "backup.dir is empty; name a directory".into()));
                }
                Some(_) => {}
            }
            if let Some(every) = section.every_s.as_ref().filter(|every| *every.get_ref() == 0) {
                return Err((
                    line_of(every.span()),
                    "backup.every_s must be at least 1 (seconds between backups)".into(),
                ));
            }
            if let Some(keep) = section.keep.as_ref().filter(|keep| *keep.get_ref() == 0) {
                return Err((
                    line_of(keep.span()),
                    "backup.keep must be at least 1; leave [backup] out to take no automatic backups".into(),
                ));
            }
        }
        let mut hooks = BTreeSet::new();
        for hook in &self.hooks {
            check_hook(hook, &line_of)?;
            if !hooks.insert(hook.name.get_ref().as_str()) {
                return Err((line_of(hook.name.span()), format!("hook {:?} is declared twice", hook.name.get_ref())));
            }
        }
        for name in &self.supervision.pass_env {
            if let Some(why) = crate::process::environment::refused(name, "pass_env") {
                return Err((1, format!("[supervision] {why}")));
            }
        }
        if let Some(section) = &self.cluster {
            let line = line_of(section.span());
            let cluster = section.get_ref();
            match &cluster.node_id {
                None => return Err((line, "[cluster] needs node_id, unique in the cluster and at least 1".into())),
                Some(id) if *id.get_ref() == 0 => {
                    return Err((line_of(id.span()), "[cluster] node_id must be at least 1".into()));
                }
                Some(_) => {}
            }
            if cluster.secret_file.is_none() {
                return Err((
                    line,
                    "[cluster] needs secret_file: a file with the secret every node shares (`hale keygen > FILE`)"
                        .into(),
                ));
            }
            let timeouts = cluster.timeouts();
            timeouts.config("hale").map_err(|error| (line, format!("[cluster] {error}")))?;
            if let Some(name) = &cluster.name {
                hale_core::NodeName::new(name.get_ref().as_str())
                    .map_err(|error| (line_of(name.span()), format!("[cluster] name: {error}")))?;
            }
            validate_labels(&cluster.labels).map_err(|error| (line, format!("[cluster] labels: {error}")))?;
            let election_max = timeouts.election_max.as_millis() as u64;
            if let Some(lease) = cluster.node_lease_ms
                && lease < 3 * election_max
            {
                return Err((
                    line,
                    format!(
                        "[cluster] node_lease_ms ({lease}) must be at least three times election_max_ms ({election_max}): \
                         a node must keep its lease through an election, or every failover stops its agents"
                    ),
                ));
            }
        }
        if self.limits.history_len == 0 {
            return Err((1, "limits.history_len must be at least 1 (the current version)".into()));
        }
        Ok(())
    }
}

/// How to start an agent: a command with a slash and relative paths are taken relative
/// to the directory of hale.toml, which is also the default working directory.
fn process_spec(spec: &AgentSpec, base: &Path, pass_env: &[String]) -> ProcessSpec {
    let command = spec.command.as_ref().expect("validated").get_ref().clone();
    let command = if command.contains('/') && Path::new(&command).is_relative() {
        base.join(&command).to_string_lossy().into_owned()
    } else {
        command
    };
    let workdir = spec.workdir.as_ref().map(|dir| base.join(dir));
    let mut passed = pass_env.to_vec();
    passed.extend(spec.pass_env.iter().filter(|name| !pass_env.contains(name)).cloned());
    ProcessSpec {
        command,
        args: spec.args.clone(),
        env: spec.env.clone(),
        pass_env: passed,
        env_file: spec.env_file.as_ref().map(|file| base.join(file.get_ref())),
        user: spec.user.as_ref().map(|user| user.get_ref().clone()),
        workdir,
        address_space_mb: spec.resources.address_space_mb,
        open_files: spec.resources.open_files,
        cgroup_limits: crate::process::CgroupLimits {
            memory_bytes: spec.resources.memory_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
            pids_max: spec.resources.pids_max,
            cpu_quota_percent: spec.resources.cpu_quota_percent,
        },
        cgroup: None,
    }
}

fn probe_spec(spec: &AgentSpec) -> Option<ProbeSpec> {
    spec.health.as_ref().map(|health| ProbeSpec {
        url: health.url.clone(),
        every: std::time::Duration::from_millis(health.interval_ms.max(100)),
        timeout: std::time::Duration::from_millis(health.timeout_ms.max(10)),
    })
}

/// What the core judges the shell's measurements of the agent against: `[agent.resources]`
/// memory and CPU, and `[agent.health]`'s failures in a row.
/// Where on a cluster it may run (checked by `validate`).
fn placement(spec: &AgentSpec) -> hale_core::supervision::Placement {
    hale_core::supervision::Placement {
        nodes: spec.nodes.iter().map(|node| hale_core::NodeName::new(node.as_str()).expect("validated")).collect(),
        node_labels: spec.node_labels.clone(),
        spread: spec.spread,
    }
}

fn thresholds(spec: &AgentSpec) -> hale_core::Thresholds {
    hale_core::Thresholds {
        memory_bytes_max: spec.resources.memory_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        cpu_percent_max: spec.resources.cpu_percent,
        cpu_window_ms: spec.resources.cpu_window_ms,
        probe_failures_max: spec.health.as_ref().map(|health| health.failures_max.max(1)),
    }
}

/// A webhook's signing secret, from hale's environment or a file; `None` when it has none.
fn hook_secret(spec: &HookSpec, base: &Path) -> Result<Option<crate::hooks::HookSecret>, String> {
    let name = spec.name.get_ref();
    let text = match (&spec.secret_env, &spec.secret_file) {
        (Some(variable), _) => {
            let variable = variable.get_ref();
            let value = std::env::var(variable).unwrap_or_default();
            if value.trim().is_empty() {
                return Err(format!(
                    "hook {name:?}: secret_env {variable} is not set (or empty) in hale's environment; set it, or remove secret_env to send unsigned webhooks"
                ));
            }
            zeroize::Zeroizing::new(value)
        }
        (None, Some(path)) => {
            let path = base.join(path.get_ref());
            let text = std::fs::read_to_string(&path).map_err(|error| {
                format!("hook {name:?}: cannot read secret_file {}: {error}; create it (readable by hale only) or fix the path", path.display())
            })?;
            let text = zeroize::Zeroizing::new(text);
            if text.trim().is_empty() {
                return Err(format!(
                    "hook {name:?}: secret_file {} is empty; put the shared secret in it",
                    path.display()
                ));
            }
            text
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(crate::hooks::HookSecret::new(text.trim().as_bytes().to_vec())))
}

fn check_hook(hook: &HookSpec, line_of: &dyn Fn(std::ops::Range<usize>) -> usize) -> Result<(), (usize, String)> {
    use hale_core::hooks::HookKind;
    let line = line_of(hook.name.span());
    let name = hook.name.get_ref();
    hale_core::HookName::new(name.as_str()).map_err(|error| (line, error.to_string()))?;
    let what = format!("hook {name:?}");
    let valid = || HookKind::ALL.map(HookKind::as_str).join(", ");
    if hook.on.is_empty() {
        return Err((line, format!("{what} has no `on`: list the events it is for, any of {}", valid())));
    }
    for kind in &hook.on {
        if HookKind::parse(kind.get_ref()).is_none() {
            return Err((
                line_of(kind.span()),
                format!("{what}: unknown event kind {:?} in `on`; the kinds are {}", kind.get_ref(), valid()),
            ));
        }
    }
    match (&hook.webhook, &hook.command) {
        (None, None) => {
            return Err((
                line,
                format!("{what} needs webhook = \"http://...\" or command = [\"program\", \"arg\", ...]"),
            ));
        }
        (Some(_), Some(command)) => {
            return Err((
                line_of(command.span()),
                format!("{what} has both webhook and command; one hook does one thing, declare two"),
            ));
        }
        (Some(url), None) => {
            let text = url.get_ref();
            let host = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
            if host.is_none_or(|host| host.is_empty() || host.starts_with('/')) {
                return Err((
                    line_of(url.span()),
                    format!("{what}: webhook must be an http:// or https:// URL with a host, got {text:?}"),
                ));
            }
        }
        (None, Some(command)) => {
            if command.get_ref().first().is_none_or(|program| program.trim().is_empty()) {
                return Err((
                    line_of(command.span()),
                    format!("{what}: command is empty; name the program first, e.g. [\"/usr/local/bin/notify\"]"),
                ));
            }
        }
    }
    if let (Some(_), Some(file)) = (&hook.secret_env, &hook.secret_file) {
        return Err((
            line_of(file.span()),
            format!("{what} has both secret_env and secret_file; give the secret one way"),
        ));
    }
    let secret_span =
        hook.secret_env.as_ref().map(|env| env.span()).or_else(|| hook.secret_file.as_ref().map(|file| file.span()));
    if let (Some(span), None) = (secret_span.clone(), &hook.webhook) {
        return Err((line_of(span), format!("{what}: a secret signs webhooks; a command hook has no use for one")));
    }
    if let Some(env) = &hook.secret_env
        && env.get_ref().trim().is_empty()
    {
        return Err((line_of(env.span()), format!("{what}: secret_env names no variable")));
    }
    if *hook.timeout_ms.get_ref() == 0 {
        return Err((line_of(hook.timeout_ms.span()), format!("{what}: timeout_ms must be at least 1")));
    }
    if *hook.retries.get_ref() > HOOK_RETRIES_MAX {
        return Err((
            line_of(hook.retries.span()),
            format!("{what}: retries is {}; at most {HOOK_RETRIES_MAX}", hook.retries.get_ref()),
        ));
    }
    Ok(())
}

fn check_name(name: &str, kind: &str, line: usize) -> Result<(), (usize, String)> {
    AgentName::new(name).map(|_| ()).map_err(|error| (line, format!("{kind} name: {error}")))
}

/// 1 PiB: a larger `memory_mb` is a typo (bytes given as MiB), not a limit.
const MEMORY_MB_MAX: u64 = 1 << 30;
/// 1,000 cores.
const CPU_QUOTA_PERCENT_MAX: u32 = 100_000;
/// The kernel's own ceiling of `pids.max` (`PID_MAX_LIMIT`, 4 Mi).
const PIDS_MAX_MAX: u64 = 1 << 22;

fn check_process(spec: &AgentSpec, line: usize, what: &str) -> Result<(), (usize, String)> {
    match &spec.command {
        None => return Err((line, format!("{what} has no command; say what to run, e.g. command = \"python3\""))),
        Some(command) if command.get_ref().trim().is_empty() => {
            return Err((line, format!("{what} has an empty command")));
        }
        Some(_) => {}
    }
    if let Some(role) = &spec.role {
        RoleName::new(role.as_str()).map_err(|error| (line, format!("{what}: {error}")))?;
    }
    validate_labels(&spec.labels).map_err(|error| (line, format!("{what}: {error}")))?;
    for node in &spec.nodes {
        hale_core::NodeName::new(node.as_str()).map_err(|error| (line, format!("{what}: nodes: {error}")))?;
    }
    validate_labels(&spec.node_labels).map_err(|error| (line, format!("{what}: node_labels: {error}")))?;
    use crate::process::environment::refused;
    let names = spec.env.keys().map(|name| (name, "env")).chain(spec.pass_env.iter().map(|name| (name, "pass_env")));
    for (name, source) in names {
        if let Some(why) = refused(name, source) {
            return Err((line, format!("{what}: {why}")));
        }
    }
    if spec.resources.memory_mb == Some(0)
        || spec.resources.cpu_percent == Some(0)
        || spec.resources.address_space_mb == Some(0)
        || spec.resources.open_files == Some(0)
        || spec.resources.pids_max == Some(0)
        || spec.resources.cpu_quota_percent == Some(0)
    {
        return Err((
            line,
            format!("{what}: a resource limit of 0 would stop it from running; leave the key out for no limit"),
        ));
    }
    if spec.resources.memory_mb.is_some_and(|mb| mb > MEMORY_MB_MAX) {
        return Err((
            line,
            format!("{what}: memory_mb is in MiB and at most {MEMORY_MB_MAX} (1 PiB); leave it out for no limit"),
        ));
    }
    if spec.resources.cpu_quota_percent.is_some_and(|percent| percent > CPU_QUOTA_PERCENT_MAX) {
        return Err((
            line,
            format!(
                "{what}: cpu_quota_percent is percent of one core (150 = 1.5 cores), at most {CPU_QUOTA_PERCENT_MAX}; leave it out for no quota"
            ),
        ));
    }
    if spec.resources.pids_max.is_some_and(|pids| pids > PIDS_MAX_MAX) {
        return Err((line, format!("{what}: pids_max is at most {PIDS_MAX_MAX}; leave it out for no limit")));
    }
    if let Some(health) = &spec.health
        && !health.url.starts_with("http://")
    {
        return Err((line, format!("{what}: health.url must be an http:// URL, got {:?}", health.url)));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
