//! The WebSocket session: JSON frames with request ids, pipelined, answered in order, each
//! answer sent only once what it reports is durable.

use super::{ApiError, AppState, ServerCode, wire};
use crate::engine::{Response as EngineResponse, Submitted};
use crate::sessions::{Push, SessionGuard};
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::{FutureExt, SinkExt};
use hale_core::AgentName;
use hale_proto::{CLIENT_FRAME_TYPES, ClientFrame, ServerFrame};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{Notify, mpsc};

/// `GET /v1/session`: the upgrade to the WebSocket session.
#[utoipa::path(get, path = "/v1/session", tag = "session",
    params(("access_token" = Option<String>, Query,
        description = "The token, for clients that cannot set the Authorization header")),
    responses((status = 101, description = "switching to the WebSocket session protocol: JSON frames, see docs/protocol.md")))]
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(app): State<AppState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Response {
    // tungstenite zero-fills the unused part of its read buffer before every read, so its
    // 128 KiB default costs a 128 KiB memset per small frame; profiled, that was a quarter
    // of all CPU under load. Most frames here are a few hundred bytes: 4 KiB reads suffice
    // (a larger frame simply takes several reads).
    ws.max_message_size(app.frame_bytes_max).max_frame_size(app.frame_bytes_max).read_buffer_size(4 * 1024).on_upgrade(
        move |socket| Session { app, principal, bound: None, pushes: None, bell: None, renewed: None }.run(socket),
    )
}

type Answer = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;
/// A read of the mailbox (and of the outcomes owed to the agent) for a session.
type MailRead = Pin<Box<dyn Future<Output = Unsent> + Send>>;

/// What a session's delivery read: unacked messages after its cursor, and the outcomes of
/// tasks the agent submitted that it has not taken.
#[derive(Default)]
struct Unsent {
    messages: Vec<hale_proto::MessageInfo>,
    outcomes: Vec<hale_proto::TaskInfo>,
}

/// The agent run a session speaks for, fixed by its hello.
struct Bound {
    agent: AgentName,
    incarnation: u64,
    _attached: SessionGuard,
}

struct Session {
    app: AppState,
    /// Who opened the session (its token was checked at the upgrade).
    principal: crate::auth::Principal,
    bound: Option<Bound>,
    /// What the server says unasked (challenges, fencing), once bound.
    pushes: Option<mpsc::Receiver<Push>>,
    /// Rings when the agent has new mail, once bound.
    bell: Option<Arc<Notify>>,
    /// Set by an `auth` frame: how long the renewed token lets the session live.
    renewed: Option<std::time::Duration>,
}

/// Delivers the mailbox over a session: once the welcome is out, every unacked message
/// in `seq` order, then each new one as the bell rings. A read goes through the engine, so
/// what it returns is durable; the cursor keeps a session from sending a message twice
/// (a new session starts from the oldest unacked). The outcomes of tasks the agent
/// submitted travel the same way: each one not taken, once per session.
struct Delivery {
    /// The welcome has been written: messages may follow it.
    open: bool,
    /// The last `seq` written on this session.
    cursor: u64,
    /// The outcomes written on this session.
    outcomes: std::collections::BTreeSet<u64>,
    read: Option<MailRead>,
}

impl Delivery {
    fn start(&mut self, app: &AppState, agent: &AgentName) {
        let (engine, agent, after) = (app.engine.clone(), agent.clone(), self.cursor);
        let sent = self.outcomes.clone();
        self.read = Some(Box::pin(async move {
            engine
                .read(move |state| {
                    let limit = super::mail::READ_BATCH_MAX;
                    let messages = wire::mail::unacked(state, agent.as_str(), after, limit);
                    let outcomes = state
                        .tasks()
                        .owed_to(&agent)
                        .filter(|task| !sent.contains(&task.id))
                        .take(limit)
                        .map(wire::tasks::task_info)
                        .collect();
                    Unsent { messages, outcomes }
                })
                .await
                .unwrap_or_default()
        }));
    }
}

/// Closes a session whose incarnation was fenced (application range 4000–4999).
const CLOSE_FENCED: u16 = 4001;
/// Closes a session whose access token expired without being renewed by an `auth` frame
/// (the client may reconnect with a fresh token and resume).
const CLOSE_TOKEN_EXPIRED: u16 = 4002;
/// Closes a session whose agent's tokens were revoked.
const CLOSE_ENDED: u16 = 4003;
/// Closes a bound session on a node of a cluster that no longer leads (after an error
/// frame `not_leader` naming the leader, if known): the client resumes its run elsewhere.
const CLOSE_NOT_LEADER: u16 = 4004;
/// A deadline that never comes, for a session opened with the admin token.
const NEVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

impl Session {
    async fn run(mut self, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let mut answers: FuturesOrdered<Answer> = FuturesOrdered::new();
        let mut shutdown = self.app.shutdown.clone();
        let mut durability = self.app.engine.watch_durability();
        let in_flight_max = self.app.session_in_flight_max;
        let mut delivery = Delivery { open: false, cursor: 0, outcomes: Default::default(), read: None };
        // A session lives as long as its access token, renewed in band by `auth` frames.
        let lifetime = self.principal.lifetime();
        let expires = lifetime.is_some();
        let expiry = tokio::time::sleep(lifetime.unwrap_or(NEVER));
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                biased;
                Some(frame) = answers.next(), if !answers.is_empty() => {
                    // Write every answer that is ready, then flush once: one syscall for
                    // a whole group commit's worth of answers instead of one per frame.
                    let mut welcomed = matches!(frame, ServerFrame::Welcome { .. });
                    if sink.feed(encode(&frame)).await.is_err() {
                        return;
                    }
                    while let Some(Some(frame)) = answers.next().now_or_never() {
                        welcomed |= matches!(frame, ServerFrame::Welcome { .. });
                        if sink.feed(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    if welcomed && !delivery.open && let Some(bound) = &self.bound {
                        delivery.open = true;
                        delivery.start(&self.app, &bound.agent);
                    }
                }
                unsent = async { delivery.read.as_mut().expect("guarded").await }, if delivery.read.is_some() => {
                    delivery.read = None;
                    let limit = super::mail::READ_BATCH_MAX;
                    let full = unsent.messages.len() == limit || unsent.outcomes.len() == limit;
                    for message in unsent.messages {
                        delivery.cursor = delivery.cursor.max(message.seq);
                        let frame = ServerFrame::Message { message: Box::new(message) };
                        if sink.feed(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    for task in unsent.outcomes {
                        delivery.outcomes.insert(task.task);
                        let frame = ServerFrame::TaskOutcome { task: Box::new(task) };
                        if sink.feed(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    if full && let Some(bound) = &self.bound {
                        delivery.start(&self.app, &bound.agent);
                    }
                }
                () = async { self.bell.as_ref().expect("guarded").notified().await },
                    if delivery.open && delivery.read.is_none() && self.bell.is_some() => {
                    if let Some(bound) = &self.bound {
                        delivery.start(&self.app, &bound.agent);
                    }
                }
                // Pushes wait for the welcome: a client reads nothing before it.
                Some(push) = async { self.pushes.as_mut()?.recv().await }, if self.pushes.is_some() && delivery.open => {
                    match push {
                        Push::Challenge | Push::Task(_) | Push::TaskCancelled(_) => {
                            let frame = match push {
                                Push::Task(task) => ServerFrame::Task { task },
                                Push::TaskCancelled(task) => ServerFrame::TaskCancelled { task },
                                _ => ServerFrame::Challenge {},
                            };
                            if sink.send(encode(&frame)).await.is_err() {
                                return;
                            }
                        }
                        Push::Ended { reason } => {
                            while let Some(frame) = answers.next().await {
                                if sink.feed(encode(&frame)).await.is_err() {
                                    return;
                                }
                            }
                            let _ = sink.feed(encode(&ServerFrame::SessionEnded { reason })).await;
                            let close = CloseFrame { code: CLOSE_ENDED, reason: Utf8Bytes::from_static("session ended") };
                            let _ = sink.send(Message::Close(Some(close))).await;
                            return;
                        }
                        Push::Fenced { reason } => {
                            // Answers still owed go first: they were decided before the fence.
                            while let Some(frame) = answers.next().await {
                                if sink.feed(encode(&frame)).await.is_err() {
                                    return;
                                }
                            }
                            let incarnation = self.bound.as_ref().map_or(0, |bound| bound.incarnation);
                            let _ = sink.feed(encode(&ServerFrame::Fenced { incarnation, reason })).await;
                            let close = CloseFrame { code: CLOSE_FENCED, reason: Utf8Bytes::from_static("incarnation fenced") };
                            let _ = sink.send(Message::Close(Some(close))).await;
                            return;
                        }
                    }
                }
                _ = async { let _ = shutdown.wait_for(|stopping| *stopping).await; } => {
                    // Answer what was asked, then say goodbye: the client reconnects elsewhere.
                    while let Some(frame) = answers.next().await {
                        if sink.send(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    let close = CloseFrame { code: close_code::RESTART, reason: Utf8Bytes::from_static("hale is shutting down") };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    return;
                }
                // A run's session is of no use on a node that does not lead: answer what was
                // asked, name the leader and close, so the client resumes on the leader.
                // (An unbound session stays: its hello is answered `not_leader`.)
                deposed = async {
                    let seen = durability.wait_for(|now| now.not_leader.is_some()).await.map(|now| now.clone());
                    match seen {
                        Ok(now) => now,
                        // The log stopped: the shutdown branch closes the session.
                        Err(_) => std::future::pending().await,
                    }
                },
                    if self.bound.is_some() => {
                    while let Some(frame) = answers.next().await {
                        if sink.feed(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    let leader = deposed.not_leader.and_then(|lost| lost.leader);
                    let error = ApiError::from(crate::engine::EngineError::Log(hale_store::WriteError::NotLeader { leader }));
                    let _ = sink.feed(encode(&ServerFrame::Error { id: None, error: error.body })).await;
                    let close = CloseFrame { code: CLOSE_NOT_LEADER, reason: Utf8Bytes::from_static("this node no longer leads the cluster") };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    return;
                }
                () = &mut expiry, if expires => {
                    // Answers owed go first: they were decided while the token was valid.
                    while let Some(frame) = answers.next().await {
                        if sink.feed(encode(&frame)).await.is_err() {
                            return;
                        }
                    }
                    let reason = Utf8Bytes::from_static("access token expired: renew it with an auth frame, or reconnect with a fresh one");
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: CLOSE_TOKEN_EXPIRED, reason }))).await;
                    return;
                }
                message = stream.next(), if answers.len() < in_flight_max => {
                    let bytes = match message {
                        Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                        Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        // A close, a protocol violation (such as a text frame that is not
                        // UTF-8) or a message over the size limit ends the session: the
                        // library reports an error and the connection is dropped without a
                        // close frame. Nothing of the offending message was acted on.
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    };
                    let answer = self.handle(&bytes).await;
                    answers.push_back(answer);
                    if let Some(left) = self.renewed.take() {
                        expiry.as_mut().reset(tokio::time::Instant::now() + left);
                    }
                }
            }
        }
        // The client left: answers still owed are dropped with the connection. What they
        // report is durable or will be; the client learns it on resume.
    }

    async fn handle(&mut self, bytes: &[u8]) -> Answer {
        let frame = match decode_frame(bytes) {
            Ok(frame) => frame,
            Err(error) => return ready(*error),
        };
        let id = frame.id();
        if let ClientFrame::Auth { token, .. } = &frame {
            return ready(self.renew(id, token));
        }
        if matches!(frame, ClientFrame::Heartbeat { .. } | ClientFrame::ReportError { .. }) {
            return self.volatile(id, frame).await;
        }
        let command = match self.command(frame) {
            Ok(command) => command,
            Err(error) => return ready(ServerFrame::Error { id: Some(id), error: error.body }),
        };
        let submitted = self.app.engine.submit(command).await;
        if let Ok(EngineResponse::Welcome(welcome)) = submitted.peek() {
            let agent = AgentName::new(welcome.agent.clone()).expect("the core only welcomes valid names");
            let (attached, pushes, bell) = self.app.sessions.attach(agent.clone(), welcome.incarnation);
            self.bound = Some(Bound { agent: agent.clone(), incarnation: welcome.incarnation, _attached: attached });
            self.pushes = Some(pushes);
            self.bell = Some(bell);
            // A resumed run gets the tasks it holds again (after its welcome, in order).
            let (sessions, incarnation) = (self.app.sessions.clone(), welcome.incarnation);
            let held = self
                .app
                .engine
                .read(move |state| {
                    state
                        .tasks()
                        .running_on(&agent)
                        .filter(|task| task.holder().is_some_and(|(_, leased)| leased == incarnation))
                        .map(wire::tasks::task_info)
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            if let Some(bound) = &self.bound {
                for task in held {
                    sessions.push(&bound.agent, bound.incarnation, Push::Task(Box::new(task)));
                }
            }
        }
        Box::pin(answer(id, submitted))
    }

    /// An `auth` frame: a fresh token for the same party extends the session to its expiry.
    fn renew(&mut self, id: u64, token: &str) -> ServerFrame {
        let principal = match self.app.auth.authenticate(token) {
            Ok(principal) => principal,
            Err(error) => return ServerFrame::Error { id: Some(id), error: error.body },
        };
        if !self.principal.same_party(&principal) {
            let error = crate::auth::forbidden(
                "an auth frame renews the token the session was opened with: it must be for the same agent; open a new session to act for another".into(),
            );
            return ServerFrame::Error { id: Some(id), error: error.body };
        }
        self.renewed = principal.lifetime();
        self.principal = principal;
        ServerFrame::Ok { id }
    }

    /// Heartbeats and error reports are volatile: answered as soon as the engine has seen
    /// them, with no wait for the log (they change nothing durable).
    async fn volatile(&mut self, id: u64, frame: ClientFrame) -> Answer {
        let kind = if matches!(frame, ClientFrame::Heartbeat { .. }) { "heartbeat" } else { "report_error" };
        let Some(bound) = &self.bound else {
            return ready(ServerFrame::Error { id: Some(id), error: hello_required(kind).body });
        };
        let (agent, incarnation) = (bound.agent.clone(), bound.incarnation);
        let engine = &self.app.engine;
        let done = match frame {
            ClientFrame::Heartbeat { progress, busy_ms, .. } => engine
                .heartbeat(agent, incarnation, progress.map(wire::progress), busy_ms)
                .await
                .map(|()| ServerFrame::HeartbeatAck { id }),
            _ => engine.report_error(agent, incarnation).await.map(|()| ServerFrame::Ok { id }),
        };
        ready(done.unwrap_or_else(|error| ServerFrame::Error { id: Some(id), error: ApiError::from(error).body }))
    }

    fn command(&self, frame: ClientFrame) -> Result<hale_core::Command, ApiError> {
        let bound = |kind: &str| {
            self.bound
                .as_ref()
                .map(|bound| (bound.agent.clone(), bound.incarnation))
                .ok_or_else(|| hello_required(kind))
        };
        match frame {
            ClientFrame::Hello { agent, body, .. } => {
                if let Some(bound) = &self.bound {
                    return Err(ApiError::coded(
                        axum::http::StatusCode::CONFLICT,
                        ServerCode::HelloRepeated,
                        format!(
                            "this session already speaks for agent {:?}; open a new session to say hello again",
                            bound.agent.as_str()
                        ),
                        false,
                    ));
                }
                // A token acts for its own agent only, and only while it is not revoked.
                self.principal.require_agent(&agent)?;
                if let crate::auth::Principal::Agent { agent: own, generation, .. } = &self.principal
                    && self.app.auth.generation_of(own) != *generation
                {
                    return Err(ApiError::coded(
                        axum::http::StatusCode::UNAUTHORIZED,
                        ServerCode::TokenRevoked,
                        format!("the tokens of agent {:?} were revoked; ask the operator for new ones", own.as_str()),
                        false,
                    ));
                }
                wire::hello(&agent, body)
            }
            ClientFrame::Checkpoint { body, .. } => {
                let (agent, incarnation) = bound("checkpoint")?;
                Ok(wire::checkpoint(agent, incarnation, body.patch, body.expected_version))
            }
            ClientFrame::RecoveryPoint { name, .. } => {
                let (agent, incarnation) = bound("recovery_point")?;
                wire::recovery_point(agent, incarnation, name)
            }
            ClientFrame::Rollback { to, .. } => {
                let (agent, incarnation) = bound("rollback")?;
                wire::rollback(agent, incarnation, to)
            }
            ClientFrame::ReportViolation { agent, critical, reason, .. } => {
                let (own, _) = bound("report_violation")?;
                wire::session_violation(own, agent, critical, reason)
            }
            ClientFrame::IntendStep { task, name, .. } => {
                let (agent, incarnation) = bound("intend_step")?;
                Ok(wire::intend_step(task, agent, incarnation, name))
            }
            ClientFrame::CommitStep { task, name, result, llm, compensation, reservation, .. } => {
                let (agent, incarnation) = bound("commit_step")?;
                let step = wire::Step { name, result, llm, compensation, reservation };
                Ok(wire::commit_step(task, agent, incarnation, step))
            }
            ClientFrame::Submit { task, .. } => {
                let (agent, _) = bound("submit")?;
                wire::submit(task, Some(agent))
            }
            ClientFrame::Reserve { task, tokens, cost, .. } => {
                let (agent, incarnation) = bound("reserve")?;
                Ok(wire::reserve(agent, incarnation, task, tokens, cost))
            }
            ClientFrame::ReportSpend { task, reservation, tokens, cost, .. } => {
                let (agent, incarnation) = bound("report_spend")?;
                Ok(wire::report_spend(agent, incarnation, task, reservation, tokens, cost))
            }
            ClientFrame::Complete { task, result, .. } => {
                let (agent, incarnation) = bound("complete")?;
                Ok(wire::complete(task, agent, incarnation, result))
            }
            ClientFrame::Fail { task, reason, retry, .. } => {
                let (agent, incarnation) = bound("fail")?;
                Ok(wire::fail(task, agent, incarnation, Some(reason), retry))
            }
            ClientFrame::Send { message, .. } => {
                let (agent, incarnation) = bound("send")?;
                wire::mail::send_command(agent, incarnation, message)
            }
            ClientFrame::Ack { seq, .. } => {
                let (agent, incarnation) = bound("ack")?;
                Ok(wire::mail::ack_command(agent, incarnation, seq))
            }
            ClientFrame::EndConversation { conversation, .. } => {
                let (agent, incarnation) = bound("end_conversation")?;
                wire::mail::end_command(agent, incarnation, conversation)
            }
            ClientFrame::TakeOutcome { task, .. } => {
                let (agent, incarnation) = bound("take_outcome")?;
                Ok(hale_core::TaskCommand::TakeOutcome { agent, incarnation, task }.into())
            }
            ClientFrame::Heartbeat { .. } | ClientFrame::ReportError { .. } | ClientFrame::Auth { .. } => {
                unreachable!("handled before commands")
            }
        }
    }
}

async fn answer(id: u64, submitted: Submitted) -> ServerFrame {
    wire::frame(id, submitted.durable().await)
}

/// The error for a frame that needs the session to have said hello first.
fn hello_required(kind: &str) -> ApiError {
    ApiError::coded(
        axum::http::StatusCode::CONFLICT,
        ServerCode::HelloRequired,
        format!("a {kind} frame must follow a hello on the same session"),
        false,
    )
}

fn ready(frame: ServerFrame) -> Answer {
    Box::pin(std::future::ready(frame))
}

fn encode(frame: &ServerFrame) -> Message {
    Message::Text(serde_json::to_string(frame).expect("server frames always serialize").into())
}

/// Decodes one client frame as a session does, or gives the error frame it answers with
/// (public for fuzzing and tests: `fuzz/fuzz_targets/frame.rs` feeds it arbitrary bytes).
pub fn decode_frame(bytes: &[u8]) -> Result<ClientFrame, Box<ServerFrame>> {
    // `["report_error", 77]` would read as a frame: the tag first, then fields by position.
    if !wire::is_json_object(bytes) {
        let error =
            ApiError::coded(axum::http::StatusCode::BAD_REQUEST, ServerCode::BadFrame, wire::NOT_AN_OBJECT, false);
        return Err(Box::new(ServerFrame::Error { id: None, error: error.body }));
    }
    serde_json::from_slice::<ClientFrame>(bytes).map_err(|error| Box::new(frame_error(bytes, &error)))
}

/// The error for a frame that did not parse, with its id if one can be read.
fn frame_error(bytes: &[u8], error: &serde_json::Error) -> ServerFrame {
    #[derive(serde::Deserialize)]
    struct Envelope {
        id: Option<u64>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let envelope = serde_json::from_slice::<Envelope>(bytes).ok();
    let id = envelope.as_ref().and_then(|envelope| envelope.id);
    let kind = envelope.and_then(|envelope| envelope.kind);
    let error = match kind {
        Some(kind) if !CLIENT_FRAME_TYPES.contains(&kind.as_str()) => ApiError::coded(
            axum::http::StatusCode::BAD_REQUEST,
            ServerCode::UnknownFrameType,
            format!(
                "unknown frame type {:?}; expected one of {}",
                kind.chars().take(64).collect::<String>(),
                CLIENT_FRAME_TYPES.join(", ")
            ),
            false,
        ),
        _ => ApiError::coded(
            axum::http::StatusCode::BAD_REQUEST,
            ServerCode::BadFrame,
            wire::describe_json_error(error),
            false,
        ),
    };
    ServerFrame::Error { id, error: error.body }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzz/frame: without serde_json's `float_roundtrip`, a long float in a frame
    /// decoded to a number that wrote back as digits reading as another number (one ulp
    /// off), so the state replayed from the log differed from the live one.
    #[test]
    fn a_decoded_frame_round_trips_exactly_through_json() {
        let bytes = br#"{"type":"commit_step","id":10,"task":1,"name":"plan","result":{"re":0,"seed":4,"tokens_in":10,"tokens_out":4444444444444444444444444444444444444444444},"compensation":{"undo":"plan"}}"#;
        let frame = decode_frame(bytes).unwrap();
        let again = decode_frame(&serde_json::to_vec(&frame).unwrap()).unwrap();
        assert_eq!(again, frame);
    }
}
