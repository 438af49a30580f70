//! Failure hooks: telling a human (a webhook, or a command) when an agent goes down, fails,
//! stalls, is quarantined, breaches its budget, a task fails or the system mode changes.
//!
//! One dispatcher task follows the engine's broadcast of durable events
//! ([`Engine::subscribe_events`]), asks the core which hook kind an event calls for
//! ([`HookKind::of`]; hook events call for none, so hooks never loop) and puts a delivery
//! on the queue of every hook that wants it. Each hook has one worker that delivers its
//! queue in log order, one delivery at a time, retrying with exponential backoff and full
//! jitter, and reports the outcome as `RecordHookOutcome`, which logs `HookDelivered` or
//! `HookFailed`: the log is the audit trail of who was told what.
//!
//! Nothing here can slow the engine or a restart: the broadcast never waits for its
//! readers, the dispatcher never waits for a worker (a hook's queue holds
//! [`QUEUE_MAX`] deliveries; when it is full the oldest is dropped, counted and logged),
//! and a worker waits only for its own deliveries.
//!
//! Deliveries are at least once across restarts. The core keeps, for each hook, the newest
//! event it has an outcome for (its mark); a hook works in log order, so the events of its
//! kinds past its mark were queued or under way when hale stopped or crashed. At start a
//! background task reads them from the log (at most [`QUEUE_MAX`] per hook, the newest)
//! and puts them at the front of the queue, before what happens after the start. A hook
//! that never had an outcome has no mark and is owed nothing: a hook newly added to
//! hale.toml is not called about the past.

use crate::engine::{DurableEvent, Engine, EngineError};
use hale_core::hooks::HookKind;
use hale_core::{HookCommand, HookName};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, broadcast};

/// Deliveries one hook may have queued; past it the oldest is dropped.
pub const QUEUE_MAX: usize = 1024;
/// The longest wait between two attempts, whatever `backoff_ms` and `retries` say.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The most of an error (or a command's stderr) that is logged.
const ERROR_BYTES_MAX: usize = 512;

/// One `[[hook]]` of hale.toml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookConfig {
    pub name: HookName,
    /// The kinds of event it is called on.
    pub on: Vec<HookKind>,
    pub target: HookTarget,
    /// Each attempt gets this long (the webhook's whole exchange; the command's run).
    pub timeout: Duration,
    /// Attempts after the first before it gives up.
    pub retries: u32,
    /// The first retry waits up to this long, each later one up to twice the one before.
    pub backoff: Duration,
    /// A webhook's signing secret: each POST then carries [`TIMESTAMP_HEADER`] and
    /// [`SIGNATURE_HEADER`].
    pub secret: Option<HookSecret>,
}

/// The seconds since the Unix epoch when a signed webhook was sent.
pub const TIMESTAMP_HEADER: &str = "x-hale-timestamp";
/// `sha256=` and the lowercase hex HMAC-SHA256, under the hook's secret, of
/// `{timestamp}.{body}`.
pub const SIGNATURE_HEADER: &str = "x-hale-signature";

/// A webhook's signing secret (its bytes as configured), wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct HookSecret(zeroize::Zeroizing<Vec<u8>>);

impl HookSecret {
    pub fn new(bytes: Vec<u8>) -> HookSecret {
        HookSecret(zeroize::Zeroizing::new(bytes))
    }

    /// The value of [`SIGNATURE_HEADER`] for `body` sent at `timestamp`.
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut context = ring::hmac::Context::with_key(&key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        let mut text = String::with_capacity(7 + 64);
        text.push_str("sha256=");
        for byte in tag.as_ref() {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }
}

impl std::fmt::Debug for HookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str("HookSecret(..)")
    }
}

/// Where a hook goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookTarget {
    /// `POST url` with the delivery as JSON; a 2xx answer is success.
    Webhook { url: String },
    /// Run `argv` with the delivery as JSON on stdin; exit status 0 is success.
    Command { argv: Vec<String> },
}

/// What a hook is told: the body of the POST, the stdin of the command.
#[derive(Clone, Debug, Serialize)]
struct Body {
    hook: String,
    kind: HookKind,
    seq: u64,
    at_ms: u64,
    agent: Option<String>,
    summary: String,
    /// The event's fields as the log holds them (`GET /v1/events` shows the same).
    event: serde_json::Value,
}

/// One event to tell one hook of.
struct Delivery {
    body: Arc<Body>,
}

/// Where the events a hook still owes since before this start are read from.
pub struct Backlog {
    pub log: std::path::PathBuf,
    pub keys: Option<Arc<hale_store::Keyring>>,
    /// The last event logged before this start: later ones arrive by the broadcast.
    pub through: u64,
    /// Each hook's mark (in the order of the hooks) as recovered, before any delivery of
    /// this start could move it.
    pub marks: Vec<Option<u64>>,
}

/// The running hooks, for `GET /v1/hooks`.
pub struct Hooks {
    hooks: Vec<Arc<Hook>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Hook {
    config: HookConfig,
    queue: Mutex<VecDeque<Delivery>>,
    wake: Notify,
    status: Mutex<hale_proto::HookStatus>,
}

impl Hooks {
    /// Subscribes to the engine's durable events and starts a worker per hook. Call it
    /// before anything that causes events it should see (the supervisor's start).
    pub fn start(engine: &Engine, configs: Vec<HookConfig>, backlog: Backlog) -> Arc<Hooks> {
        let hooks: Vec<Arc<Hook>> = configs
            .into_iter()
            .map(|config| {
                let status = hale_proto::HookStatus {
                    name: config.name.to_string(),
                    on: config.on.iter().map(|kind| kind.to_string()).collect(),
                    target: match &config.target {
                        HookTarget::Webhook { url } => format!("webhook {url}"),
                        HookTarget::Command { argv } => format!("command {}", argv.join(" ")),
                    },
                    ..hale_proto::HookStatus::default()
                };
                Arc::new(Hook {
                    config,
                    queue: Mutex::new(VecDeque::new()),
                    wake: Notify::new(),
                    status: Mutex::new(status),
                })
            })
            .collect();
        let mut tasks = Vec::new();
        if !hooks.is_empty() {
            // Subscribed only when there are hooks: the engine copies events for
            // subscribers, and with none it copies nothing.
            let events = engine.subscribe_events();
            tasks.push(tokio::spawn(dispatch(events, hooks.clone())));
            tasks.push(tokio::spawn(catch_up(hooks.clone(), backlog)));
            for hook in &hooks {
                let client = match webhook_client(&hook.config) {
                    Ok(client) => client,
                    Err(error) => {
                        tracing::error!(hook = %hook.config.name, %error, "cannot build the hook's HTTP client");
                        continue;
                    }
                };
                tasks.push(tokio::spawn(work(hook.clone(), engine.clone(), client)));
            }
            tracing::info!(hooks = hooks.len(), "failure hooks on");
        }
        Arc::new(Hooks { hooks, tasks: Mutex::new(tasks) })
    }

    /// Each hook's counters and last outcomes, in hale.toml order.
    pub fn status(&self) -> Vec<hale_proto::HookStatus> {
        self.hooks
            .iter()
            .map(|hook| {
                let mut status = hook.status.lock().expect("not poisoned").clone();
                status.queued = hook.queue.lock().expect("not poisoned").len() as u64;
                status
            })
            .collect()
    }

    /// Stops every hook: deliveries still queued or under way are abandoned (and logged).
    pub fn stop(&self) {
        for hook in &self.hooks {
            let queued = hook.queue.lock().expect("not poisoned").len();
            if queued > 0 {
                tracing::warn!(hook = %hook.config.name, queued, "hale is stopping: queued hook deliveries are dropped");
            }
        }
        for task in self.tasks.lock().expect("not poisoned").drain(..) {
            task.abort();
        }
    }
}

/// Puts the events each hook owes since before this start at the front of its queue.
async fn catch_up(hooks: Vec<Arc<Hook>>, backlog: Backlog) {
    let Some(from) = backlog.marks.iter().flatten().min().copied() else { return };
    let kinds: Vec<Vec<HookKind>> = hooks.iter().map(|hook| hook.config.on.clone()).collect();
    let read = tokio::task::spawn_blocking(move || owed(&backlog, from, &kinds)).await;
    let owed = match read {
        Ok(Ok(owed)) => owed,
        Ok(Err(error)) => {
            tracing::error!(%error, "could not read the hook deliveries owed from before this start");
            return;
        }
        Err(_) => return,
    };
    for (hook, owed) in hooks.iter().zip(owed) {
        if owed.is_empty() {
            continue;
        }
        tracing::info!(
            hook = %hook.config.name, owed = owed.len(), first_seq = owed[0].body.seq,
            "hook deliveries owed from before this start are queued again"
        );
        hook.requeue(owed);
    }
}

/// For each hook with a mark, the events of its kinds after the mark and up to
/// `backlog.through`, in log order (the newest [`QUEUE_MAX`]).
fn owed(backlog: &Backlog, from: u64, kinds: &[Vec<HookKind>]) -> Result<Vec<Vec<Delivery>>, hale_store::StoreError> {
    let marks = &backlog.marks;
    /// Why a scan stopped early.
    enum Stop {
        Through,
        Store(hale_store::StoreError),
    }
    impl From<hale_store::StoreError> for Stop {
        fn from(error: hale_store::StoreError) -> Stop {
            Stop::Store(error)
        }
    }
    let log = hale_store::Log::open_read_only(&backlog.log)?;
    let mut owed: Vec<VecDeque<Delivery>> = marks.iter().map(|_| VecDeque::new()).collect();
    let scanned = log.scan(from, |record: hale_store::Record| {
        if record.seq > backlog.through {
            return Err(Stop::Through);
        }
        // A record that cannot be read is reported by recovery and `hale verify`.
        let Ok(event) = record.open(backlog.keys.as_deref()) else { return Ok(()) };
        let Some(kind) = HookKind::of(&event) else { return Ok(()) };
        let mut body = None;
        for (index, mark) in marks.iter().enumerate() {
            if mark.is_some_and(|mark| record.seq > mark) && kinds[index].contains(&kind) {
                let body = body.get_or_insert_with(|| Arc::new(Body::of(record.seq, record.at, kind, &event))).clone();
                let queue = &mut owed[index];
                if queue.len() >= QUEUE_MAX {
                    queue.pop_front();
                }
                queue.push_back(Delivery { body });
            }
        }
        Ok(())
    });
    match scanned {
        Ok(()) | Err(Stop::Through) => Ok(owed.into_iter().map(Vec::from).collect()),
        Err(Stop::Store(error)) => Err(error),
    }
}

/// Puts every event that calls for a hook on the queues of the hooks that want it.
async fn dispatch(mut events: broadcast::Receiver<Arc<DurableEvent>>, hooks: Vec<Arc<Hook>>) {
    loop {
        let durable = match events.recv().await {
            Ok(durable) => durable,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Only when the dispatcher was not scheduled while 1,024 events were
                // logged; the missed ones are in the log.
                tracing::error!(
                    missed,
                    "the hook dispatcher fell behind: hooks for some of the missed events were not called"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(kind) = HookKind::of(&durable.event) else { continue };
        let mut body = None;
        for hook in hooks.iter().filter(|hook| hook.config.on.contains(&kind)) {
            let body =
                body.get_or_insert_with(|| Arc::new(Body::of(durable.seq, durable.at, kind, &durable.event))).clone();
            hook.enqueue(Delivery { body });
        }
    }
}

impl Body {
    fn of(seq: u64, at: hale_core::Timestamp, kind: HookKind, event: &hale_core::Event) -> Body {
        let info = crate::api::events::info(seq, at, event);
        Body {
            hook: String::new(),
            kind,
            seq,
            at_ms: at.0,
            agent: info.agent,
            summary: info.summary,
            event: info.event,
        }
    }
}

impl Hook {
    /// Puts `owed` (older than anything queued) at the front, in order; past
    /// [`QUEUE_MAX`] the oldest are dropped as `enqueue` drops them.
    fn requeue(&self, owed: Vec<Delivery>) {
        let dropped = {
            let mut queue = self.queue.lock().expect("not poisoned");
            for delivery in owed.into_iter().rev() {
                queue.push_front(delivery);
            }
            let dropped = queue.len().saturating_sub(QUEUE_MAX);
            queue.drain(..dropped);
            dropped
        };
        if dropped > 0 {
            self.status.lock().expect("not poisoned").dropped += dropped as u64;
            tracing::warn!(hook = %self.config.name, dropped, "hook queue full ({QUEUE_MAX}): the oldest deliveries were dropped");
        }
        self.wake.notify_one();
    }

    fn enqueue(&self, delivery: Delivery) {
        let dropped = {
            let mut queue = self.queue.lock().expect("not poisoned");
            let dropped = if queue.len() >= QUEUE_MAX { queue.pop_front() } else { None };
            queue.push_back(delivery);
            dropped
        };
        if let Some(dropped) = dropped {
            self.status.lock().expect("not poisoned").dropped += 1;
            tracing::warn!(
                hook = %self.config.name,
                seq = dropped.body.seq,
                kind = %dropped.body.kind,
                "hook queue full ({QUEUE_MAX}): the oldest delivery was dropped"
            );
        }
        self.wake.notify_one();
    }

    fn next(&self) -> Option<Delivery> {
        self.queue.lock().expect("not poisoned").pop_front()
    }
}

/// One hook's worker: delivers its queue in order and reports each outcome.
async fn work(hook: Arc<Hook>, engine: Engine, client: reqwest::Client) {
    loop {
        let Some(delivery) = hook.next() else {
            hook.wake.notified().await;
            continue;
        };
        let config = &hook.config;
        let body = Body { hook: config.name.to_string(), ..Body::clone(&delivery.body) };
        let (attempts, outcome) = deliver(config, &client, &body).await;
        let at_ms = crate::clock::now().0;
        let last = hale_proto::HookOutcome {
            seq: body.seq,
            kind: body.kind.to_string(),
            at_ms,
            attempts,
            error: outcome.as_ref().err().cloned(),
        };
        {
            let mut status = hook.status.lock().expect("not poisoned");
            match &outcome {
                Ok(()) => {
                    status.delivered += 1;
                    status.last_delivered = Some(last);
                }
                Err(_) => {
                    status.failed += 1;
                    status.last_failed = Some(last);
                }
            }
        }
        match &outcome {
            Ok(()) => {
                tracing::info!(hook = %config.name, seq = body.seq, kind = %body.kind, attempts, "hook delivered")
            }
            Err(error) => tracing::error!(
                hook = %config.name, seq = body.seq, kind = %body.kind, attempts, %error,
                "hook FAILED: giving up after {attempts} attempts"
            ),
        }
        let command = HookCommand::RecordOutcome {
            hook: config.name.clone(),
            kind: body.kind,
            seq: body.seq,
            attempts,
            error: outcome.err(),
        };
        match engine.execute(command).await {
            Ok(_) => {}
            Err(EngineError::ShuttingDown) => return,
            Err(error) => tracing::warn!(hook = %config.name, %error, "the hook's outcome could not be logged"),
        }
    }
}

/// Tries up to `1 + retries` times; the attempts made, and the last error if all failed.
async fn deliver(config: &HookConfig, client: &reqwest::Client, body: &Body) -> (u32, Result<(), String>) {
    let json = serde_json::to_vec(body).expect("hook bodies serialize");
    let mut attempt = 1;
    loop {
        let result = match &config.target {
            HookTarget::Webhook { url } => post(client, url, &json, config.secret.as_ref(), config.timeout).await,
            HookTarget::Command { argv } => run(argv, &json, body, config.timeout).await,
        };
        match result {
            Ok(()) => return (attempt, Ok(())),
            Err(error) if attempt > config.retries => return (attempt, Err(truncate(error))),
            Err(error) => {
                let wait = backoff(config.backoff, attempt, random_fraction());
                tracing::warn!(
                    hook = %config.name, seq = body.seq, attempt, %error, wait_ms = wait.as_millis() as u64,
                    "hook attempt failed; retrying"
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// Full jitter: a uniform wait in `[0, min(base · 2^(attempt-1), BACKOFF_MAX)]`, where
/// `fraction` is uniform in `[0, 1)`.
fn backoff(base: Duration, attempt: u32, fraction: f64) -> Duration {
    let ceiling = base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20))).min(BACKOFF_MAX);
    ceiling.mul_f64(fraction.clamp(0.0, 1.0))
}

fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn truncate(mut error: String) -> String {
    if error.len() > ERROR_BYTES_MAX {
        let mut end = ERROR_BYTES_MAX;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push('…');
    }
    error
}

/// The client of one hook: its timeout, no redirects (a pager that moved should be
/// configured anew, not followed), and for https the system's roots: rustls-native-certs
/// reads the platform's store, or `SSL_CERT_FILE` and `SSL_CERT_DIR` when they are set.
fn webhook_client(config: &HookConfig) -> reqwest::Result<reqwest::Client> {
    let https = matches!(&config.target, HookTarget::Webhook { url } if url.starts_with("https://"));
    reqwest::Client::builder()
        .timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("hale/", env!("CARGO_PKG_VERSION")))
        .use_rustls_tls()
        // Read only where they are used.
        .tls_built_in_native_certs(https)
        .build()
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    json: &[u8],
    secret: Option<&HookSecret>,
    timeout: Duration,
) -> Result<(), String> {
    let mut request = client.post(url).header("content-type", "application/json");
    if let Some(secret) = secret {
        // Each attempt is signed anew, with its own time, so a receiver can refuse old ones.
        let timestamp = crate::clock::now().0 / 1000;
        request = request
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, secret.sign(timestamp, json));
    }
    let sent = request.body(json.to_vec()).send().await;
    match sent {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("{url} answered HTTP {}", response.status().as_u16())),
        Err(error) if error.is_timeout() => Err(format!("{url} did not answer within {} ms", timeout.as_millis())),
        Err(error) => Err(format!("{url}: {}", error_chain(&error))),
    }
}

/// An error with its causes: reqwest's own message alone ("error sending request") does
/// not say that the connection was refused.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs the hook's command in its own process group, the delivery on stdin; on timeout
/// the whole group is killed.
async fn run(argv: &[String], json: &[u8], body: &Body, timeout: Duration) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("the hook has an empty command")?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("HALE_HOOK_NAME", &body.hook)
        .env("HALE_HOOK_KIND", body.kind.as_str())
        .env("HALE_HOOK_AGENT", body.agent.as_deref().unwrap_or(""))
        .env("HALE_HOOK_SEQ", body.seq.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // systemd's notify socket, watchdog settings and credentials are hale's alone.
    for name in crate::notify::SYSTEMD_VARIABLES {
        command.env_remove(name);
    }
    let mut child = command.spawn().map_err(|error| format!("cannot run {program}: {error}"))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let json = json.to_vec();
    let ran = tokio::time::timeout(timeout, async move {
        // A command that does not read its stdin is fine: a broken pipe is not a failure.
        let _ = stdin.write_all(&json).await;
        drop(stdin);
        child.wait_with_output().await
    })
    .await;
    match ran {
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = stderr.trim();
            let said = if stderr.is_empty() { String::new() } else { format!(": {stderr}") };
            Err(format!("{program} {}{said}", output.status))
        }
        Ok(Err(error)) => Err(format!("{program}: {error}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = crate::process::signal_group(pid, crate::process::Signal::KILL);
            }
            Err(format!("{program} did not finish within {} ms; killed", timeout.as_millis()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_up_to_the_cap_with_full_jitter() {
        let base = Duration::from_millis(500);
        assert_eq!(backoff(base, 1, 0.999_999).as_millis(), 499);
        assert_eq!(backoff(base, 3, 0.5), Duration::from_millis(1000));
        assert_eq!(backoff(base, 1, 0.0), Duration::ZERO);
        assert_eq!(backoff(base, 40, 1.0), BACKOFF_MAX);
        let fraction = random_fraction();
        assert!((0.0..1.0).contains(&fraction), "{fraction}");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_timestamp_a_dot_and_the_body() {
        // The reference: ring's one-shot HMAC of the joined bytes.
        let secret = HookSecret::new(b"Jefe".to_vec());
        let expected = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe"),
            b"1700000000.{\"hook\":\"pager\"}",
        );
        let hex: String = expected.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(secret.sign(1_700_000_000, b"{\"hook\":\"pager\"}"), format!("sha256={hex}"));
        assert_ne!(HookSecret::new(b"other".to_vec()).sign(1_700_000_000, b"{}"), secret.sign(1_700_000_000, b"{}"));
        assert_ne!(secret.sign(1_700_000_001, b"{}"), secret.sign(1_700_000_000, b"{}"));
        assert_eq!(format!("{secret:?}"), "HookSecret(..)");
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let cut = truncate("é".repeat(400));
        assert!(cut.len() <= ERROR_BYTES_MAX + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }
}
