//! The task that owns a session's socket: writes requests, matches answers, hands on
//! what hale says unasked, and, with a [`Reconnect`] policy, survives a lost connection.
//!
//! On a drop it reconnects with exponential backoff and full jitter, trying the addresses
//! in turn, says hello with the run's incarnation (so the run resumes: same incarnation,
//! same leases), and then settles what was sent but not answered:
//!
//! * a checkpoint: the welcome's version says whether it was applied. If it was, its
//!   answer is made from that; if not, it is sent again expecting the version it was
//!   meant to follow, so a state that moved in between is a `version_conflict` reported
//!   to the caller, never silently overwritten;
//! * step intents and commits, completions and failures, heartbeats and error reports are
//!   sent again (a step commit replaces itself; the others are harmless twice);
//! * a rollback, recovery point, submit without an idempotency key, reservation or spend
//!   report fails with `Closed`: hale may or may not have applied it, and sending it again
//!   could do it twice.
//!
//! Requests made while offline wait in the session's queue (1,024 at most; then callers
//! wait) and go out in order once the run has resumed. The tasks a resumed run is
//! offered again are handed to the application once per attempt.

use crate::agent::{AgentOptions, Inbox, Outgoing, Reply, Socket, open_socket};
use crate::error::ClientError;
use futures_util::{SinkExt, StreamExt};
use hale_proto::{CheckpointBody, ClientFrame, HelloBody, ServerFrame};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

/// How to come back after a lost connection.
#[derive(Clone, Debug)]
pub struct Reconnect {
    /// The first wait; each further attempt doubles it, up to `cap`, and waits a uniformly
    /// random time up to that (full jitter, so many clients do not come back in step).
    pub base: Duration,
    pub cap: Duration,
    /// Give up after this many attempts in a row (`None`: never).
    pub attempts: Option<u32>,
    /// Addresses to try besides the one connected first, in turn (a cluster's members).
    pub more_urls: Vec<String>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            attempts: None,
            more_urls: Vec::new(),
        }
    }
}

impl Reconnect {
    /// The wait before attempt `attempt` (0-based): uniform in `0..=min(cap, base·2^attempt)`.
    pub fn delay(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let ceiling = self.base.saturating_mul(1u32 << attempt.min(20)).min(self.cap);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(if millis == 0 { 0 } else { rand::rng().random_range(0..=millis) })
    }
}

/// What a session needs to reconnect.
pub(crate) struct Resilience {
    pub(crate) urls: Vec<String>,
    pub(crate) policy: Reconnect,
    pub(crate) options: AgentOptions,
    pub(crate) incarnation: Arc<Mutex<Option<u64>>>,
}

/// A request sent and not yet answered.
struct Pending {
    frame: ClientFrame,
    reply: Reply,
    /// For a checkpoint: the version it makes, if that could be told when it was sent.
    makes: Option<u64>,
}

/// Why a connection ended.
enum Lost {
    /// For good: fenced, ended by hale, or the handle dropped.
    Final(String),
    /// The connection broke: worth reconnecting.
    Broken(String),
    /// The node does not lead its cluster (any more): reconnect, to `leader` (`host:port`)
    /// if it said which node leads. Requests it refused so are sent again there.
    NotLeader { leader: Option<String> },
}

#[derive(Default)]
struct Sent {
    /// In send order (a counter, not the request id).
    pending: BTreeMap<u64, Pending>,
    by_id: std::collections::HashMap<u64, u64>,
    order: u64,
    /// The agent's version as last answered, and checkpoints sent since then.
    version: Option<u64>,
    /// A rollback in flight makes the versions of later checkpoints unknowable.
    rollback_in_flight: bool,
    /// Tasks offered so far, by task and attempt: a resumed run is offered the tasks it
    /// holds again, and the application should see each attempt once.
    offered: std::collections::HashSet<(u64, u32)>,
    /// Outcomes of submitted tasks handed to the application (each is pushed again to
    /// each new connection until taken).
    outcomes: std::collections::HashSet<u64>,
    /// Mailbox sequence numbers handed to the application and not yet acked: a new
    /// connection delivers every unacked message again, and these are dropped.
    handed: std::collections::BTreeSet<u64>,
    /// Sequence numbers acked on this connection that its delivery has not reached yet.
    /// A resumed session's first read of the mailbox may run before a resent ack is
    /// applied, so the message can still arrive once after its ack is answered; on this
    /// connection only (a later one reads after the ack), and in `seq` order, so each is
    /// forgotten when a message at or past it arrives, or when the connection changes.
    acked_here: std::collections::BTreeSet<u64>,
}

impl Sent {
    fn push(&mut self, frame: ClientFrame, reply: Reply) {
        let makes = match &frame {
            // A checkpoint that expects a version can only make the next one.
            ClientFrame::Checkpoint { body, .. } if body.expected_version.is_some() => {
                body.expected_version.map(|expected| expected + 1)
            }
            ClientFrame::Checkpoint { .. } if !self.rollback_in_flight => {
                let before =
                    self.pending.values().filter(|pending| matches!(pending.frame, ClientFrame::Checkpoint { .. }));
                self.version.map(|version| version + 1 + before.count() as u64)
            }
            _ => None,
        };
        if matches!(frame, ClientFrame::Rollback { .. }) {
            self.rollback_in_flight = true;
        }
        self.order += 1;
        self.by_id.insert(frame.id(), self.order);
        self.pending.insert(self.order, Pending { frame, reply, makes });
    }

    fn answer(&mut self, id: u64, frame: ServerFrame) {
        match &frame {
            ServerFrame::Welcome { welcome, .. } => self.version = Some(welcome.version),
            ServerFrame::Checkpointed { version, .. } => self.version = Some(*version),
            ServerFrame::RolledBack { rolled_back, .. } => {
                self.version = Some(rolled_back.version);
                self.rollback_in_flight = false;
            }
            _ => {}
        }
        if let Some(order) = self.by_id.remove(&id)
            && let Some(pending) = self.pending.remove(&order)
        {
            // A refused checkpoint made no version: the ones sent after it make one less.
            if let (ServerFrame::Error { .. }, Some(refused)) = (&frame, pending.makes) {
                for later in self.pending.range_mut(order..).map(|(_, later)| later) {
                    let unpinned =
                        matches!(&later.frame, ClientFrame::Checkpoint { body, .. } if body.expected_version.is_none());
                    if unpinned && let Some(makes) = later.makes.as_mut().filter(|makes| **makes > refused) {
                        *makes -= 1;
                    }
                }
            }
            // An acked message is never delivered again: forget its sequence number.
            if let (ServerFrame::Ok { .. }, ClientFrame::Ack { seq, .. }) = (&frame, &pending.frame) {
                self.handed.remove(seq);
                self.acked_here.insert(*seq);
            }
            let _ = pending.reply.send(Ok(frame));
        }
    }

    /// Whether message `seq` is new to the application (and from now on handed to it).
    fn take_message(&mut self, seq: u64) -> bool {
        let acked = self.acked_here.contains(&seq);
        // Delivery on one connection is in `seq` order: nothing at or below `seq` comes again.
        self.acked_here = self.acked_here.split_off(&seq.saturating_add(1));
        !acked && self.handed.insert(seq)
    }

    fn fail_all(&mut self, reason: &str) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(ClientError::Closed(reason.to_string())));
        }
        self.by_id.clear();
    }
}

pub(crate) async fn run(
    socket: Socket,
    mut queue: mpsc::Receiver<Outgoing>,
    ended: watch::Sender<Option<String>>,
    inbox: Inbox,
    resilience: Option<Resilience>,
    mut closing: watch::Receiver<bool>,
) {
    let mut sent = Sent::default();
    let mut socket = socket;
    let reason = loop {
        let lost = pump(socket, &mut queue, &mut sent, &inbox, &mut closing, resilience.is_some()).await;
        let (reason, leader, resilience) = match (lost, &resilience) {
            (Lost::Final(reason), _) | (Lost::Broken(reason), None) => break reason,
            (Lost::NotLeader { .. }, None) => break "the node does not lead its cluster".to_string(),
            (Lost::Broken(reason), Some(resilience)) => (reason, None, resilience),
            (Lost::NotLeader { leader }, Some(resilience)) => {
                (format!("the node does not lead its cluster (leader: {leader:?})"), leader, resilience)
            }
        };
        tracing::info!(%reason, "lost hale; reconnecting");
        match reconnect(resilience, &mut sent, leader).await {
            Ok(again) => socket = again,
            Err(error) => break format!("{reason}; then could not come back: {error}"),
        }
    };
    let _ = ended.send(Some(reason.clone()));
    sent.fail_all(&reason);
    // Requests queued after the end get the same answer.
    queue.close();
    while let Some(Outgoing { reply, .. }) = queue.recv().await {
        let _ = reply.send(Err(ClientError::Closed(reason.clone())));
    }
}

/// Carries requests and answers until the connection ends.
async fn pump(
    socket: Socket,
    queue: &mut mpsc::Receiver<Outgoing>,
    sent: &mut Sent,
    inbox: &Inbox,
    closing: &mut watch::Receiver<bool>,
    follow: bool,
) -> Lost {
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            changed = closing.changed() => {
                // Err: every handle was dropped, which ends the session too.
                let close = changed.is_err() || *closing.borrow();
                if close {
                    let _ = sink.send(Message::Close(None)).await;
                    return Lost::Final("closed by the agent".to_string());
                }
            }
            outgoing = queue.recv() => {
                let Some(Outgoing { frame, reply }) = outgoing else {
                    let _ = sink.send(Message::Close(None)).await;
                    return Lost::Final("the agent handle was dropped".to_string());
                };
                // Write every request already queued, then flush once.
                let mut batch = vec![(frame, reply)];
                while let Ok(Outgoing { frame, reply }) = queue.try_recv() {
                    batch.push((frame, reply));
                }
                let mut failed = None;
                for (frame, reply) in batch {
                    if failed.is_none() {
                        let text = serde_json::to_string(&frame).expect("client frames always serialize");
                        if let Err(error) = sink.feed(Message::text(text)).await {
                            failed = Some(error.to_string());
                        }
                    }
                    // Kept even if the write failed: a reconnect settles it.
                    sent.push(frame, reply);
                }
                if failed.is_none()
                    && let Err(error) = sink.flush().await
                {
                    failed = Some(error.to_string());
                }
                if let Some(reason) = failed {
                    return Lost::Broken(reason);
                }
            }
            message = stream.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map_or("closed by hale".to_string(), |frame| format!("closed by hale: {}", frame.reason));
                        return Lost::Broken(reason);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Lost::Broken(error.to_string()),
                    None => return Lost::Broken("connection closed".to_string()),
                };
                let frame: ServerFrame = match serde_json::from_str(&text) {
                    Ok(frame) => frame,
                    Err(error) => return Lost::Final(format!("undecodable frame from hale: {error}")),
                };
                if let Some(lost) = deliver(frame, sent, inbox, follow) {
                    return lost;
                }
            }
        }
    }
}

/// Hands an answer to its caller, or an unasked frame to the inbox. With `follow` (the
/// session reconnects), a `not_leader` answer is not handed on: the request stays in
/// flight and goes again to the leader.
fn deliver(frame: ServerFrame, sent: &mut Sent, inbox: &Inbox, follow: bool) -> Option<Lost> {
    if let ServerFrame::Error { id, error } = &frame
        && error.code == "not_leader"
        && (follow || id.is_none())
    {
        return Some(Lost::NotLeader { leader: error.leader.clone() });
    }
    let id = match &frame {
        ServerFrame::Welcome { id, .. }
        | ServerFrame::Checkpointed { id, .. }
        | ServerFrame::RecoveryPointMarked { id, .. }
        | ServerFrame::RolledBack { id, .. }
        | ServerFrame::HeartbeatAck { id }
        | ServerFrame::Submitted { id, .. }
        | ServerFrame::Reserved { id, .. }
        | ServerFrame::Ok { id } => Some(*id),
        ServerFrame::Error { id, .. } => *id,
        ServerFrame::Challenge {} => {
            // Not answered here: this task being alive proves only the socket.
            inbox.challenged.notify_one();
            None
        }
        ServerFrame::Task { task } => {
            if sent.offered.insert((task.task, task.attempts)) {
                let _ = inbox.tasks.send(*task.clone());
            }
            None
        }
        ServerFrame::TaskCancelled { task } => {
            inbox.cancelled.lock().expect("cancelled lock").insert(*task);
            None
        }
        ServerFrame::Message { message } => {
            if sent.take_message(message.seq) {
                let _ = inbox.messages.send(*message.clone());
            }
            None
        }
        ServerFrame::TaskOutcome { task } => {
            // Pushed again to each new session until taken: handed on once per process.
            if sent.outcomes.insert(task.task) {
                let _ = inbox.outcomes.send(*task.clone());
            }
            None
        }
        ServerFrame::Sent { id, .. } => Some(*id),
        ServerFrame::Fenced { incarnation, reason } => {
            return Some(Lost::Final(format!("fenced: incarnation {incarnation}: {reason}")));
        }
        ServerFrame::SessionEnded { reason } => return Some(Lost::Final(format!("ended by hale: {reason}"))),
    };
    if let Some(id) = id {
        sent.answer(id, frame);
    }
    None
}

/// Connects again, resumes the run and settles what was in flight; the new socket is
/// ready for more.
async fn reconnect(resilience: &Resilience, sent: &mut Sent, leader: Option<String>) -> Result<Socket, String> {
    let incarnation = *resilience.incarnation.lock().expect("incarnation lock");
    let mut attempt = 0u32;
    // The backoff grows with each full round of addresses that none answered. A node that
    // answers but does not lead shows the cluster is alive, electing a leader within a
    // second or so: the backoff starts again from its base, so the session finds the new
    // leader soon after it is elected.
    let mut unanswered = 0u32;
    let addresses = resilience.urls.len().max(1) as u32;
    // A node that named the leader is taken at its word, at once.
    let mut hint = leader.map(|leader| crate::admin::with_authority(&resilience.urls[0], &leader));
    loop {
        if resilience.policy.attempts.is_some_and(|attempts| attempt >= attempts) {
            return Err(format!("gave up after {attempt} attempts"));
        }
        let url = match hint.take() {
            Some(url) => url,
            None => {
                tokio::time::sleep(resilience.policy.delay(unanswered / addresses)).await;
                resilience.urls[attempt as usize % resilience.urls.len()].clone()
            }
        };
        let url = &url;
        attempt += 1;
        let mut socket = match open_socket(url, &resilience.options).await {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(%url, %error, attempt, "reconnect attempt failed");
                unanswered += 1;
                continue;
            }
        };
        let Some(incarnation) = incarnation else {
            // Never resumed: nothing to come back to. A hello that a node which does not
            // lead refused goes again as it is, and so does whatever was sent after it.
            resend_as_they_are(&mut socket, sent).await.map_err(|error| error.to_string())?;
            return Ok(socket);
        };
        let options = &resilience.options;
        let body =
            HelloBody { role: options.role.clone(), labels: options.labels.clone(), incarnation: Some(incarnation) };
        let hello = ClientFrame::Hello { id: 0, agent: options.agent.clone(), body };
        let text = serde_json::to_string(&hello).expect("client frames always serialize");
        if socket.send(Message::text(text)).await.is_err() {
            unanswered += 1;
            continue;
        }
        let welcome = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Welcome { welcome, .. }) => break Some(welcome),
                    // Not the leader: on to the one it names, or the next address.
                    Ok(ServerFrame::Error { error, .. }) if error.code == "not_leader" => {
                        hint = error.leader.map(|leader| crate::admin::with_authority(url, &leader));
                        unanswered = 0;
                        break None;
                    }
                    // The run is over (fenced, down, superseded): coming back is not possible.
                    Ok(ServerFrame::Error { error, .. }) => {
                        return Err(format!("hale refused to resume run {incarnation}: {}", error.message));
                    }
                    Ok(_) => continue,
                    Err(error) => return Err(format!("undecodable frame from hale: {error}")),
                },
                Some(Ok(_)) => continue,
                _ => {
                    unanswered += 1;
                    break None;
                }
            }
        };
        let Some(welcome) = welcome else { continue };
        tracing::info!(incarnation, version = welcome.version, attempt, "resumed after reconnecting");
        settle(&mut socket, sent, &welcome).await.map_err(|error| error.to_string())?;
        return Ok(socket);
    }
}

/// Sends every request in flight again, unchanged, on a new connection of a session that
/// has not resumed a run yet.
async fn resend_as_they_are(socket: &mut Socket, sent: &mut Sent) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let pending = std::mem::take(&mut sent.pending);
    sent.by_id.clear();
    for (_, Pending { frame, reply, .. }) in pending {
        let text = serde_json::to_string(&frame).expect("client frames always serialize");
        socket.feed(Message::text(text)).await?;
        sent.push(frame, reply);
    }
    socket.flush().await
}

/// Settles the requests in flight when the connection dropped, in order (see the module
/// documentation), now that the resumed run is at `version`.
async fn settle(
    socket: &mut Socket,
    sent: &mut Sent,
    welcome: &hale_proto::Welcome,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let version = welcome.version;
    sent.version = Some(version);
    sent.rollback_in_flight = false;
    // This connection's delivery reads the mailbox after the acks answered so far.
    sent.acked_here.clear();
    let pending = std::mem::take(&mut sent.pending);
    sent.by_id.clear();
    for (_, Pending { frame, reply, makes }) in pending {
        let again = match frame {
            ClientFrame::Checkpoint { id, body } => match makes {
                Some(made) if made <= version => {
                    let _ = reply.send(Ok(ServerFrame::Checkpointed { id, version: made }));
                    continue;
                }
                Some(made) => ClientFrame::Checkpoint {
                    id,
                    body: CheckpointBody { patch: body.patch, expected_version: Some(made - 1) },
                },
                None if body.expected_version.is_some() => ClientFrame::Checkpoint { id, body },
                None => {
                    let _ = reply.send(Err(ClientError::Closed(
                        "the connection was lost before hale answered a checkpoint sent after a rollback; it may or may not be applied: read the state".into(),
                    )));
                    continue;
                }
            },
            frame @ (ClientFrame::CommitStep { .. }
            | ClientFrame::IntendStep { .. }
            | ClientFrame::Complete { .. }
            | ClientFrame::Fail { .. }
            | ClientFrame::Heartbeat { .. }
            | ClientFrame::ReportError { .. }
            | ClientFrame::Ack { .. }
            | ClientFrame::EndConversation { .. }
            | ClientFrame::TakeOutcome { .. }
            | ClientFrame::Auth { .. }) => frame,
            // A hello resuming the run the reconnect has just resumed (a node that does not
            // lead refused it, or the connection dropped under it): resuming is what it
            // asked, and the reconnect's welcome is its answer.
            ClientFrame::Hello { id, body, .. } if body.incarnation == Some(welcome.incarnation) => {
                let _ = reply.send(Ok(ServerFrame::Welcome { id, welcome: welcome.clone() }));
                continue;
            }
            // Sends carry an idempotency key: the retry is answered with the first message.
            frame @ ClientFrame::Send { .. } if send_has_key(&frame) => frame,
            frame @ ClientFrame::Submit { .. } if submit_has_key(&frame) => frame,
            frame => {
                let what = serde_json::to_value(&frame).ok().and_then(|value| value["type"].as_str().map(String::from));
                let _ = reply.send(Err(ClientError::Closed(format!(
                    "the connection was lost before hale answered this {}; it may or may not have been applied, so it is not sent again",
                    what.unwrap_or_default()
                ))));
                continue;
            }
        };
        let text = serde_json::to_string(&again).expect("client frames always serialize");
        socket.feed(Message::text(text)).await?;
        sent.push(again, reply);
    }
    socket.flush().await
}

fn send_has_key(frame: &ClientFrame) -> bool {
    matches!(frame, ClientFrame::Send { message, .. } if message.key.is_some())
}

fn submit_has_key(frame: &ClientFrame) -> bool {
    matches!(frame, ClientFrame::Submit { task, .. } if task.idempotency_key.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(sent: &mut Sent, id: u64, seq: u64) {
        let (reply, _answer) = tokio::sync::oneshot::channel();
        sent.push(ClientFrame::Ack { id, seq }, reply);
        sent.answer(id, ServerFrame::Ok { id });
    }

    #[test]
    fn a_message_acked_before_its_redelivery_arrives_is_not_handed_again() {
        let mut sent = Sent::default();
        // Connection 1: 36 and 37 handed, the ack of 36 lost with the connection.
        assert!(sent.take_message(36) && sent.take_message(37));
        // Connection 2 starts reading the mailbox before the resent ack of 36 is applied,
        // and the ack's answer overtakes the redelivered messages.
        sent.acked_here.clear();
        ack(&mut sent, 1, 36);
        assert!(!sent.take_message(36), "acked, then redelivered once: dropped");
        assert!(!sent.take_message(37), "handed and not acked yet: dropped");
        assert!(sent.take_message(38), "new");
        assert!(sent.acked_here.is_empty(), "forgotten once delivery is past it");
    }

    #[test]
    fn an_acked_message_is_forgotten_once_delivery_passes_it() {
        let mut sent = Sent::default();
        assert!(sent.take_message(1));
        ack(&mut sent, 1, 1);
        assert!(sent.handed.is_empty());
        assert_eq!(sent.acked_here.len(), 1, "kept until a later message shows delivery is past it");
        assert!(sent.take_message(2));
        assert!(sent.acked_here.is_empty());
    }
}
