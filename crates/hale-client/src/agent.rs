use crate::error::ClientError;
use hale_proto::{
    CheckpointBody, ClientFrame, HelloBody, HttpSubmitTask, LlmCallInfo, MessageInfo, ProgressBody, Recipient,
    RecoveryPointInfo, RollbackTo, RolledBack, SESSION_PATH, SendBody, Sent, ServerFrame, TaskInfo, Welcome,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Who the agent is.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub agent: String,
    pub role: String,
    pub labels: BTreeMap<String, String>,
    /// Resume this run instead of starting a new one (a managed agent is told its
    /// incarnation by hale in `HALE_INCARNATION`).
    pub incarnation: Option<u64>,
    /// The agent's tokens; shared by clones, so a refreshed token is used by the next
    /// connection.
    pub credentials: Credentials,
    /// What a `wss://` hale is verified against (`HALE_CA_FILE` for agents hale runs).
    pub ca_file: Option<std::path::PathBuf>,
    /// Reconnect and resume the run when the connection drops; `None`: the session ends.
    pub reconnect: Option<crate::session::Reconnect>,
}

/// An agent's access token and, if it has one, its refresh token. Clones share them.
#[derive(Clone, Debug, Default)]
pub struct Credentials(Arc<CredentialsInner>);

#[derive(Debug, Default)]
struct CredentialsInner {
    held: Mutex<Option<Held>>,
    /// One refresh at a time: a refresh token works once, and a reused one revokes the
    /// agent's tokens (the renewal task and a reconnect may both find the token due).
    refreshing: tokio::sync::Mutex<()>,
}

/// An access token, and the refresh token if one is held.
type Held = (String, Option<String>);

/// How long before its expiry an access token is renewed: a minute, or a third of its
/// lifetime if that is shorter.
const RENEW_AHEAD_S: u64 = 60;

impl Credentials {
    /// The access token, if any.
    pub fn access(&self) -> Option<String> {
        self.0.held.lock().expect("credentials lock").as_ref().map(|(access, _)| access.clone())
    }

    fn set(&self, access: String, refresh: Option<String>) {
        *self.0.held.lock().expect("credentials lock") = Some((access, refresh));
    }

    /// How long until the access token should be renewed (zero if it is due), if it is a
    /// token hale issued and a refresh token is held.
    pub fn renew_in(&self) -> Option<std::time::Duration> {
        let held = self.0.held.lock().expect("credentials lock").clone();
        let Some((access, Some(_))) = held else { return None };
        let (issued, expires) = lifetime(&access)?;
        let ahead = (RENEW_AHEAD_S as f64).min(expires.saturating_sub(issued) as f64 / 3.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Some(std::time::Duration::from_secs_f64((expires as f64 - ahead - now.as_secs_f64()).max(0.0)))
    }

    /// Refreshes the tokens at the hale at `url` if the access token is due for renewal
    /// (see [`renew_in`](Credentials::renew_in)) and a refresh token is held.
    pub async fn refresh_if_due(
        &self,
        url: &str,
        agent: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<(), ClientError> {
        let _one = self.0.refreshing.lock().await;
        if self.renew_in().is_none_or(|left| !left.is_zero()) {
            return Ok(());
        }
        let held = self.0.held.lock().expect("credentials lock").clone();
        let Some((_, Some(refresh))) = held else { return Ok(()) };
        let base = url.replacen("ws://", "http://", 1).replacen("wss://", "https://", 1);
        let endpoint = format!("{}/v1/auth/refresh", base.trim_end_matches('/'));
        let body = hale_proto::HttpRefresh { agent: agent.to_string(), refresh_token: refresh };
        let response = crate::tls::http_client(ca_file)?
            .post(&endpoint)
            .json(&body)
            .send()
            .await
            .map_err(|error| ClientError::Connect { url: endpoint.clone(), reason: error.to_string() })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| ClientError::Closed(error.to_string()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<hale_proto::HttpError>(&bytes) {
                Ok(error) => ClientError::Server(error.error),
                Err(_) => ClientError::Protocol(format!("HTTP {status} from {endpoint}")),
            });
        }
        let pair: hale_proto::TokenPair =
            serde_json::from_slice(&bytes).map_err(|error| ClientError::Protocol(error.to_string()))?;
        self.set(pair.access_token, Some(pair.refresh_token));
        Ok(())
    }
}

/// The `iat` (or `nbf`) and `exp` of a JWT, read without checking it (the server checks).
fn lifetime(token: &str) -> Option<(u64, u64)> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims = serde_json::from_slice::<Value>(&bytes).ok()?;
    let expires = claims.get("exp")?.as_u64()?;
    let issued = claims.get("iat").or_else(|| claims.get("nbf")).and_then(Value::as_u64).unwrap_or(0);
    Some((issued, expires))
}

impl AgentOptions {
    pub fn new(agent: impl Into<String>, role: impl Into<String>) -> Self {
        AgentOptions {
            agent: agent.into(),
            role: role.into(),
            labels: BTreeMap::new(),
            incarnation: None,
            credentials: Credentials::default(),
            ca_file: None,
            reconnect: None,
        }
    }

    /// Reconnects (with backoff and full jitter) and resumes the run when the connection
    /// drops, as `policy` says.
    pub fn reconnect(mut self, policy: crate::session::Reconnect) -> Self {
        self.reconnect = Some(policy);
        self
    }

    /// Verifies a `wss://` hale against the certificates in `path` (PEM).
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Connects with this token: the agent's access token, or the admin token.
    pub fn token(self, token: impl Into<String>) -> Self {
        self.credentials.set(token.into(), None);
        self
    }

    /// Connects with this access token and refreshes it with `refresh` when it is due.
    pub fn tokens(self, access: impl Into<String>, refresh: impl Into<String>) -> Self {
        self.credentials.set(access.into(), Some(refresh.into()));
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = Some(incarnation);
        self
    }

    /// The options of an agent that hale started: its name from `HALE_AGENT` and the run
    /// to resume from `HALE_INCARNATION`. `None` if `HALE_AGENT` is not set.
    pub fn from_env(role: impl Into<String>) -> Option<Self> {
        let agent = std::env::var("HALE_AGENT").ok()?;
        let mut options = AgentOptions::new(agent, role);
        options.incarnation = std::env::var("HALE_INCARNATION").ok().and_then(|text| text.parse().ok());
        options.ca_file = std::env::var_os("HALE_CA_FILE").map(std::path::PathBuf::from);
        // An agent hale runs outlives a restart of hale: it reconnects.
        options.reconnect = Some(crate::session::Reconnect::default());
        if let Ok(access) = std::env::var("HALE_TOKEN") {
            options.credentials.set(access, std::env::var("HALE_REFRESH_TOKEN").ok());
        }
        Some(options)
    }
}

/// The address of hale from `HALE_URL` (set for every agent hale starts).
pub fn url_from_env() -> Option<String> {
    std::env::var("HALE_URL").ok()
}

pub(crate) type Reply = oneshot::Sender<Result<ServerFrame, ClientError>>;

pub(crate) struct Outgoing {
    pub(crate) frame: ClientFrame,
    pub(crate) reply: Reply,
}

/// Opens the WebSocket of a session at `url`, refreshing the access token first if it is
/// about to expire.
pub(crate) async fn open_socket(url: &str, options: &AgentOptions) -> Result<Socket, ClientError> {
    let endpoint = format!("{}{SESSION_PATH}", url.trim_end_matches('/'));
    options.credentials.refresh_if_due(url, &options.agent, options.ca_file.as_deref()).await?;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = endpoint
        .as_str()
        .into_client_request()
        .map_err(|error| ClientError::Connect { url: endpoint.clone(), reason: error.to_string() })?;
    if let Some(token) = options.credentials.access() {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Protocol("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    // Small reads: tungstenite zero-fills its whole read buffer before each read.
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let connector = match (url.starts_with("wss://"), &options.ca_file) {
        (false, _) => None,
        (true, Some(ca_file)) => Some(tokio_tungstenite::Connector::Rustls(crate::tls::client_config(ca_file)?)),
        (true, None) => {
            return Err(ClientError::Connect {
                url: endpoint,
                reason: "a wss:// hale is verified against a CA file: set AgentOptions::ca_file or HALE_CA_FILE".into(),
            });
        }
    };
    let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector)
        .await
        .map_err(|error| ClientError::Connect { url: endpoint.clone(), reason: error.to_string() })?;
    Ok(socket)
}

struct Shared {
    options: AgentOptions,
    next_id: Arc<AtomicU64>,
    outgoing: mpsc::Sender<Outgoing>,
    incarnation: Arc<Mutex<Option<u64>>>,
    /// Why the session ended, once it has (e.g. `fenced: …`).
    ended: watch::Receiver<Option<String>>,
    /// Signalled when hale challenges this agent (it suspects it is dead).
    challenged: Arc<Notify>,
    /// Tasks hale leased to this run, in the order offered.
    tasks: tokio::sync::Mutex<mpsc::UnboundedReceiver<TaskInfo>>,
    /// Tasks cancelled while this run held them.
    cancelled: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    /// Messages from the mailbox, each sequence number once.
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<MessageInfo>>,
    /// Outcomes of tasks this agent submitted, each task once.
    outcomes: tokio::sync::Mutex<mpsc::UnboundedReceiver<TaskInfo>>,
    /// Makes the idempotency keys of sends unique to this session.
    key_prefix: String,
    /// Set to end the session cleanly.
    close: watch::Sender<bool>,
}

/// What a committed step may carry besides its result.
#[derive(Clone, Debug, Default)]
pub struct StepExtras {
    /// The model call behind the step, so a rerun can tell whether it would match.
    pub llm: Option<LlmCallInfo>,
    /// What undoes the step if the task is aborted (handed to a compensation task).
    pub compensation: Option<Value>,
    /// The reservation the model call's tokens settle. The tokens count as spent by the
    /// task and the agent either way.
    pub reservation: Option<u64>,
}

/// A session of one agent with hale. Clones share the session.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Opens a session to the hale at `url` (e.g. `ws://127.0.0.1:7700`). Nothing is said
    /// to hale until [`resume`](Agent::resume).
    ///
    /// The nodes of a cluster are given separated by commas (`HALE_URL` takes the same
    /// form): the first that answers is used, and with a [`Reconnect`](crate::Reconnect)
    /// policy the session follows the leader: a node that does not lead names the leader,
    /// and the session resumes the same run there, settling what was in flight as after a
    /// reconnect (a checkpoint is applied once).
    pub async fn connect(url: &str, options: AgentOptions) -> Result<Agent, ClientError> {
        let given: Vec<String> =
            url.split(',').map(|one| one.trim().to_string()).filter(|one| !one.is_empty()).collect();
        let mut opened = None;
        let mut last_error = None;
        for (at, candidate) in given.iter().enumerate() {
            match open_socket(candidate, &options).await {
                Ok(socket) => {
                    opened = Some((socket, at));
                    break;
                }
                Err(error) => last_error = Some(error),
            }
        }
        let Some((socket, at)) = opened else {
            return Err(last_error.unwrap_or_else(|| ClientError::Connect {
                url: url.to_string(),
                reason: "no address given".to_string(),
            }));
        };
        // The one that answered first, then the others in turn.
        let mut urls: Vec<String> = given[at..].iter().chain(&given[..at]).cloned().collect();
        let url = urls[0].clone();
        let url = url.as_str();
        let (outgoing, queue) = mpsc::channel(1024);
        let next_id = Arc::new(AtomicU64::new(1));
        let (ended_tx, ended) = watch::channel(None);
        let challenged = Arc::new(Notify::new());
        let (tasks_tx, tasks) = mpsc::unbounded_channel();
        let cancelled = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        let inbox = Inbox {
            challenged: challenged.clone(),
            tasks: tasks_tx,
            cancelled: cancelled.clone(),
            messages: messages_tx,
            outcomes: outcomes_tx,
        };
        let incarnation = Arc::new(Mutex::new(options.incarnation));
        let resilience = options.reconnect.clone().map(|policy| crate::session::Resilience {
            urls: {
                urls.extend(policy.more_urls.iter().filter(|more| !urls.contains(more)).cloned().collect::<Vec<_>>());
                urls
            },
            policy,
            options: options.clone(),
            incarnation: incarnation.clone(),
        });
        let (close, closing) = watch::channel(false);
        tokio::spawn(crate::session::run(socket, queue, ended_tx, inbox, resilience, closing));
        let tasks = tokio::sync::Mutex::new(tasks);
        let messages = tokio::sync::Mutex::new(messages);
        let outcomes = tokio::sync::Mutex::new(outcomes);
        let key_prefix = format!("{}-{:016x}", options.agent, rand::random::<u64>());
        let agent = Agent {
            shared: Arc::new(Shared {
                options,
                next_id,
                outgoing,
                incarnation,
                ended,
                challenged,
                tasks,
                cancelled,
                messages,
                outcomes,
                key_prefix,
                close,
            }),
        };
        if agent.shared.options.credentials.renew_in().is_some() {
            agent.spawn_renewal(url.to_string());
        }
        Ok(agent)
    }

    /// Renews the access token before it expires, for as long as the session lasts: hale
    /// ends a session whose token expired. The new token is sent in band (an `auth` frame)
    /// and used by the next connection.
    fn spawn_renewal(&self, url: String) {
        let weak = Arc::downgrade(&self.shared);
        let mut ended = self.shared.ended.clone();
        tokio::spawn(async move {
            let mut retry = std::time::Duration::ZERO;
            loop {
                let wait = match weak.upgrade() {
                    Some(shared) => shared.options.credentials.renew_in().map(|wait| wait.max(retry)),
                    None => return,
                };
                let Some(wait) = wait else { return };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = ended.wait_for(Option::is_some) => return,
                }
                // Held only while renewing: a dropped agent ends the session as before.
                let Some(shared) = weak.upgrade() else { return };
                let agent = Agent { shared };
                match agent.renew(&url).await {
                    Ok(()) => retry = std::time::Duration::ZERO,
                    Err(error) => {
                        tracing::warn!(%error, "could not renew the access token; trying again");
                        retry =
                            (retry * 2).clamp(std::time::Duration::from_millis(250), std::time::Duration::from_secs(5));
                    }
                }
            }
        });
    }

    async fn renew(&self, url: &str) -> Result<(), ClientError> {
        let options = &self.shared.options;
        options.credentials.refresh_if_due(url, &options.agent, options.ca_file.as_deref()).await?;
        let token = options.credentials.access().unwrap_or_default();
        self.request(ClientFrame::Auth { id: self.next_id(), token }).await?;
        Ok(())
    }

    /// Checkpoints `last` (if given), then closes the session cleanly: what was asked before
    /// is answered first. For a graceful stop on SIGTERM:
    /// `tokio::select! { _ = hale_client::sigterm() => agent.close(Some(state)).await?, … }`.
    pub async fn close(&self, last: Option<Value>) -> Result<(), ClientError> {
        if let Some(patch) = last {
            self.checkpoint(patch).await?;
        }
        let _ = self.shared.close.send(true);
        self.ended().await;
        Ok(())
    }

    /// Heartbeats every `interval` with what `progress` reports, until the session ends.
    /// It proves the process is alive, not that its work loop is: report progress that
    /// the work loop moves (a counter, a step), so the stall detector still sees a loop
    /// that stopped, and answer [`challenged`](Agent::challenged) from the work loop.
    pub fn spawn_heartbeats(
        &self,
        interval: std::time::Duration,
        progress: impl Fn() -> Option<ProgressBody> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = agent.ended() => return,
                }
                if let Err(error) = agent.heartbeat(progress()).await
                    && error.code().is_some()
                {
                    // Refused (fenced, down): the run is over; the session ends too.
                    return;
                }
            }
        })
    }

    /// The next task hale leases to this run (with the steps earlier attempts committed),
    /// or `None` once the session has ended. A resumed run gets the tasks it still holds.
    pub async fn next_task(&self) -> Option<TaskInfo> {
        self.shared.tasks.lock().await.recv().await
    }

    /// The next message from this agent's mailbox, or `None` once the session has ended.
    /// Every message not yet acked is delivered again after a reconnect; this hands each
    /// sequence number to the application once per process. [`ack`](Agent::ack) it once
    /// acted on (and once what it changed is checkpointed): a message not acked when the
    /// process dies is delivered to the next run.
    pub async fn next_message(&self) -> Option<MessageInfo> {
        self.shared.messages.lock().await.recv().await
    }

    /// Sends `body` to an agent or a role (`Recipient::Role`: one agent of it; see
    /// docs/protocol.md) in `conversation` (a new one if `None`). Durable when it returns.
    /// A send is retried safely across reconnects: it carries an idempotency key.
    pub async fn send(&self, to: Recipient, conversation: Option<&str>, body: Value) -> Result<Sent, ClientError> {
        let message = SendBody {
            to,
            conversation: conversation.map(str::to_string),
            body,
            reply_to: None,
            expects_reply: false,
            key: None,
        };
        self.send_message(message).await
    }

    /// Like [`send`](Agent::send), and the recipient owes a reply: until it sends one, the
    /// message is among its pending replies, which it gets back when it resumes.
    pub async fn ask(&self, to: Recipient, conversation: Option<&str>, body: Value) -> Result<Sent, ClientError> {
        let message = SendBody {
            to,
            conversation: conversation.map(str::to_string),
            body,
            reply_to: None,
            expects_reply: true,
            key: None,
        };
        self.send_message(message).await
    }

    /// Answers `message` (to its sender, in its conversation).
    pub async fn reply(&self, message: &MessageInfo, body: Value) -> Result<Sent, ClientError> {
        let answer = SendBody {
            to: Recipient::Agent(message.from.clone()),
            conversation: Some(message.conversation.clone()),
            body,
            reply_to: Some(message.message),
            expects_reply: false,
            key: None,
        };
        self.send_message(answer).await
    }

    /// Sends a message with every option; a key is made up if none is given.
    pub async fn send_message(&self, mut message: SendBody) -> Result<Sent, ClientError> {
        self.require_resumed("send")?;
        if message.key.is_none() {
            message.key = Some(format!("{}-{}", self.shared.key_prefix, self.next_id()));
        }
        match self.request(ClientFrame::Send { id: self.next_id(), message }).await? {
            ServerFrame::Sent { sent, .. } => Ok(sent),
            other => Err(unexpected(other)),
        }
    }

    /// Says message `seq` of the mailbox was acted on: it is not delivered again.
    pub async fn ack(&self, seq: u64) -> Result<(), ClientError> {
        self.task_write(ClientFrame::Ack { id: self.next_id(), seq }).await
    }

    /// The next outcome of a task this agent submitted (ended: completed, failed or
    /// cancelled), or `None` once the session has ended. hale pushes every outcome the
    /// agent has not taken to each new session, also to a later run;
    /// [`take_outcome`](Agent::take_outcome) it once handled.
    pub async fn next_outcome(&self) -> Option<TaskInfo> {
        self.shared.outcomes.lock().await.recv().await
    }

    /// Says the outcome of task `task` (submitted by this agent) was handled: it is not
    /// pushed again. Idempotent.
    pub async fn take_outcome(&self, task: u64) -> Result<(), ClientError> {
        self.task_write(ClientFrame::TakeOutcome { id: self.next_id(), task }).await
    }

    /// Ends a conversation: what its participants owed in it is no longer pending.
    pub async fn end_conversation(&self, conversation: &str) -> Result<(), ClientError> {
        let frame = ClientFrame::EndConversation { id: self.next_id(), conversation: conversation.to_string() };
        self.task_write(frame).await
    }

    /// The session id of this run (`agent/incarnation`), once resumed: the same across
    /// reconnects, new when a new run starts.
    pub fn session_id(&self) -> Option<String> {
        self.incarnation().map(|incarnation| format!("{}/{incarnation}", self.name()))
    }

    /// Whether hale cancelled `task` while this run held it: stop working on it.
    pub fn is_cancelled(&self, task: u64) -> bool {
        self.shared.cancelled.lock().expect("cancelled lock").contains(&task)
    }

    /// Commits a step of a task this run holds; durable when it returns. A later attempt
    /// (on this agent or another) is handed every committed step.
    pub async fn commit_step(&self, task: u64, name: &str, result: Value) -> Result<(), ClientError> {
        self.commit(task, name, result, StepExtras::default()).await
    }

    /// Commits a step with the model call behind it and what would undo it (`extras`).
    pub async fn commit(&self, task: u64, name: &str, result: Value, extras: StepExtras) -> Result<(), ClientError> {
        let frame = ClientFrame::CommitStep {
            id: self.next_id(),
            task,
            name: name.to_string(),
            result,
            llm: extras.llm,
            compensation: extras.compensation,
            reservation: extras.reservation,
        };
        self.task_write(frame).await
    }

    /// Says a step with side effects is about to run; durable when it returns. If this run
    /// is lost before it commits the step, the next attempt is handed the step as
    /// `uncertain`: find out whether the side effect happened before doing it again.
    pub async fn intend(&self, task: u64, name: &str) -> Result<(), ClientError> {
        self.task_write(ClientFrame::IntendStep { id: self.next_id(), task, name: name.to_string() }).await
    }

    /// Submits a task (e.g. an orchestrator handing out work); returns its number once
    /// durable, and whether it is new (false: the idempotency key named an earlier one).
    pub async fn submit(&self, task: HttpSubmitTask) -> Result<(u64, bool), ClientError> {
        self.require_resumed("submit")?;
        match self.request(ClientFrame::Submit { id: self.next_id(), task }).await? {
            ServerFrame::Submitted { task, new, .. } => Ok((task, new)),
            other => Err(unexpected(other)),
        }
    }

    /// Reserves spending before an expensive call (for `task`, if given): refused
    /// (`over_budget`) if it would take the agent or the task over its budget. Returns the
    /// reservation to name in [`report_spend`](Agent::report_spend).
    pub async fn reserve(&self, task: Option<u64>, tokens: u64, cost: u64) -> Result<u64, ClientError> {
        self.require_resumed("reserve")?;
        match self.request(ClientFrame::Reserve { id: self.next_id(), task, tokens, cost }).await? {
            ServerFrame::Reserved { reservation, .. } => Ok(reservation),
            other => Err(unexpected(other)),
        }
    }

    /// Reports what was spent, settling `reservation`. Going over a budget is a breach:
    /// hale opens this agent's breaker and moves its tasks to other agents.
    pub async fn report_spend(
        &self,
        task: Option<u64>,
        reservation: Option<u64>,
        tokens: u64,
        cost: u64,
    ) -> Result<(), ClientError> {
        self.task_write(ClientFrame::ReportSpend { id: self.next_id(), task, reservation, tokens, cost }).await
    }

    /// Completes a task this run holds.
    pub async fn complete(&self, task: u64, result: Value) -> Result<(), ClientError> {
        self.task_write(ClientFrame::Complete { id: self.next_id(), task, result }).await
    }

    /// Fails this attempt at a task (retried while attempts are left, if `retry`).
    pub async fn fail(&self, task: u64, reason: &str, retry: bool) -> Result<(), ClientError> {
        self.task_write(ClientFrame::Fail { id: self.next_id(), task, reason: reason.to_string(), retry: Some(retry) })
            .await
    }

    async fn task_write(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.require_resumed("a task write")?;
        match self.request(frame).await? {
            ServerFrame::Ok { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Tells hale about an error this agent ran into (a failed tool call, a refusal…).
    /// Enough of them within the breaker window open the agent's circuit breaker, so no
    /// work is routed to it for a while. Not logged one by one.
    pub async fn report_error(&self, message: Option<&str>) -> Result<(), ClientError> {
        self.require_resumed("report_error")?;
        let frame = ClientFrame::ReportError { id: self.next_id(), message: message.map(str::to_string) };
        match self.request(frame).await? {
            ServerFrame::Ok { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reports a policy violation: by this agent itself (`about` = `None`) or by another
    /// agent (`about` = its name), e.g. a fact-checker catching a writer. Enough of them,
    /// or one `critical`, quarantine the agent. Returns once logged.
    pub async fn report_violation(&self, about: Option<&str>, critical: bool, reason: &str) -> Result<(), ClientError> {
        self.require_resumed("report_violation")?;
        let frame = ClientFrame::ReportViolation {
            id: self.next_id(),
            agent: about.map(str::to_string),
            critical,
            reason: reason.to_string(),
        };
        match self.request(frame).await? {
            ServerFrame::Ok { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Resolves when hale challenges this agent: its detector suspects the agent is dead,
    /// and the answer is a [`heartbeat`](Agent::heartbeat) sent at once. Wait on this in
    /// the same loop that does the work and heartbeats, not in a task of its own: the
    /// challenge asks whether the agent is working, not whether its socket is open.
    pub async fn challenged(&self) {
        self.shared.challenged.notified().await;
    }

    /// Tells hale this run is alive, and how far it got. hale expects one about every
    /// heartbeat interval of the agent's criticality (1 s for `normal`); a run that holds a
    /// task and shows no work (no step, checkpoint or change of progress) for many beats
    /// may be declared stalled.
    pub async fn heartbeat(&self, progress: Option<ProgressBody>) -> Result<(), ClientError> {
        self.beat(progress, None).await
    }

    /// Says this run is entering a call that may take up to `expected` (a slow model call,
    /// a long tool run): the stall detectors do not count until it has passed, or until
    /// [`busy_over`](Agent::busy_over). Heartbeats must go on meanwhile.
    pub async fn busy(&self, expected: std::time::Duration) -> Result<(), ClientError> {
        let ms = u64::try_from(expected.as_millis()).unwrap_or(u64::MAX).max(1);
        self.beat(None, Some(ms)).await
    }

    /// Says the long call announced with [`busy`](Agent::busy) is over.
    pub async fn busy_over(&self) -> Result<(), ClientError> {
        self.beat(None, Some(0)).await
    }

    async fn beat(&self, progress: Option<ProgressBody>, busy_ms: Option<u64>) -> Result<(), ClientError> {
        self.require_resumed("heartbeat")?;
        match self.request(ClientFrame::Heartbeat { id: self.next_id(), progress, busy_ms }).await? {
            ServerFrame::HeartbeatAck { .. } => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Resolves when the session has ended, with the reason (e.g. hale fenced this run
    /// because a newer one started or it was declared down).
    pub async fn ended(&self) -> String {
        let mut ended = self.shared.ended.clone();
        match ended.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the session task has ended".to_string(),
        }
    }

    /// Says hello: registers the agent and starts a new run (or resumes the run named in
    /// the options, or the one this session already has). Returns everything needed to
    /// carry on: state, version, recovery points, incarnation.
    pub async fn resume(&self) -> Result<Welcome, ClientError> {
        let incarnation = *self.shared.incarnation.lock().expect("incarnation lock");
        let options = &self.shared.options;
        let body = HelloBody { role: options.role.clone(), labels: options.labels.clone(), incarnation };
        let frame = ClientFrame::Hello { id: self.next_id(), agent: options.agent.clone(), body };
        match self.request(frame).await? {
            ServerFrame::Welcome { welcome, .. } => {
                *self.shared.incarnation.lock().expect("incarnation lock") = Some(welcome.incarnation);
                Ok(welcome)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Folds `patch` (an RFC 7396 merge patch) into the agent's state. Returns the new
    /// version once it is durable.
    pub async fn checkpoint(&self, patch: Value) -> Result<u64, ClientError> {
        self.checkpoint_body(CheckpointBody { patch, expected_version: None }).await
    }

    /// Like [`checkpoint`](Agent::checkpoint), but refused with `version_conflict` unless
    /// the state is at `expected_version`.
    pub async fn checkpoint_expecting(&self, patch: Value, expected_version: u64) -> Result<u64, ClientError> {
        self.checkpoint_body(CheckpointBody { patch, expected_version: Some(expected_version) }).await
    }

    async fn checkpoint_body(&self, body: CheckpointBody) -> Result<u64, ClientError> {
        self.require_resumed("checkpoint")?;
        match self.request(ClientFrame::Checkpoint { id: self.next_id(), body }).await? {
            ServerFrame::Checkpointed { version, .. } => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    /// Names the current version `name`, so it can be rolled back to later.
    pub async fn recovery_point(&self, name: &str) -> Result<RecoveryPointInfo, ClientError> {
        self.require_resumed("recovery_point")?;
        match self.request(ClientFrame::RecoveryPoint { id: self.next_id(), name: name.to_string() }).await? {
            ServerFrame::RecoveryPointMarked { point, .. } => Ok(point),
            other => Err(unexpected(other)),
        }
    }

    /// Makes a new version whose state is that of an earlier version or recovery point.
    pub async fn rollback(&self, to: RollbackTo) -> Result<RolledBack, ClientError> {
        self.require_resumed("rollback")?;
        match self.request(ClientFrame::Rollback { id: self.next_id(), to }).await? {
            ServerFrame::RolledBack { rolled_back, .. } => Ok(rolled_back),
            other => Err(unexpected(other)),
        }
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.shared.options.agent
    }

    /// The incarnation of this session's run, once resumed.
    pub fn incarnation(&self) -> Option<u64> {
        *self.shared.incarnation.lock().expect("incarnation lock")
    }

    fn require_resumed(&self, what: &'static str) -> Result<(), ClientError> {
        self.incarnation().map(|_| ()).ok_or(ClientError::NotResumed(what))
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .outgoing
            .send(Outgoing { frame, reply })
            .await
            .map_err(|_| ClientError::Closed("the session task has ended".into()))?;
        let frame = answer.await.map_err(|_| ClientError::Closed("the session task has ended".into()))??;
        match frame {
            ServerFrame::Error { error, .. } => Err(ClientError::Server(error)),
            frame => Ok(frame),
        }
    }
}

fn unexpected(frame: ServerFrame) -> ClientError {
    ClientError::Protocol(format!("{frame:?}"))
}

pub(crate) type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Where unasked frames go.
pub(crate) struct Inbox {
    pub(crate) challenged: Arc<Notify>,
    pub(crate) tasks: mpsc::UnboundedSender<TaskInfo>,
    pub(crate) cancelled: Arc<Mutex<std::collections::BTreeSet<u64>>>,
    pub(crate) messages: mpsc::UnboundedSender<MessageInfo>,
    pub(crate) outcomes: mpsc::UnboundedSender<TaskInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn token(issued: u64, expires: u64) -> String {
        let encode = |value: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
        format!(
            "{}.{}.sig",
            encode(serde_json::json!({"alg": "HS256"})),
            encode(serde_json::json!({"iat": issued, "exp": expires}))
        )
    }

    #[test]
    fn a_token_is_renewed_a_minute_ahead_or_at_two_thirds_of_a_shorter_life() {
        let clock = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let now = clock() as u64;
        let credentials = Credentials::default();
        // The wait until `renew_at` (seconds since the epoch), bounded by the clock read just
        // before and just after asking: it holds wherever in its second the test runs, and
        // however slowly (the tokens' times are whole seconds; the clock is not).
        let renews_at = |renew_at: u64| {
            let before = clock();
            let wait = credentials.renew_in().unwrap().as_secs_f64();
            let after = clock();
            let left = |at: f64| (renew_at as f64 - at).max(0.0);
            let (earliest, latest) = (left(after) - 1e-6, left(before) + 1e-6);
            assert!((earliest..=latest).contains(&wait), "renews in {wait} s, not in {earliest}..={latest} s");
        };
        credentials.set(token(now, now + 900), Some("hale_rt_x".into()));
        renews_at(now + 900 - 60);
        credentials.set(token(now, now + 3), Some("hale_rt_x".into()));
        // Two thirds of 3 s, not at expiry.
        renews_at(now + 2);
        credentials.set(token(now - 100, now - 10), Some("hale_rt_x".into()));
        assert_eq!(credentials.renew_in(), Some(std::time::Duration::ZERO), "due");
        credentials.set(token(now, now + 900), None);
        assert_eq!(credentials.renew_in(), None, "nothing to renew with");
    }
}
