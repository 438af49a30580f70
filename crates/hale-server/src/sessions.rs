//! Which agents have a WebSocket session open now, and a way to reach them. Volatile by
//! design: attachment is not a durable fact, so it lives here in the shell and not in the
//! log.

use hale_core::AgentName;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc};

/// Something the server tells a session without being asked.
#[derive(Clone, Debug, PartialEq)]
pub enum Push {
    /// The detector suspects the agent: answer with a heartbeat.
    Challenge,
    /// The session's incarnation was superseded or declared down: it is closed after this.
    Fenced { reason: String },
    /// A task leased to this run.
    Task(Box<hale_proto::TaskInfo>),
    /// A task this run holds was cancelled.
    TaskCancelled(u64),
    /// The agent's tokens were revoked: the session is closed.
    Ended { reason: String },
}

/// Pushes queued per session before the oldest is dropped: a session that does not read
/// them is closed by the fence anyway, and a lost challenge is harmless: the detector goes on judging the agent by its beats.
const PUSHES_QUEUED_MAX: usize = 16;

type Key = (AgentName, u64);
/// Each open session of one incarnation: its id and where its pushes go.
type Open = Vec<(u64, mpsc::Sender<Push>)>;
/// The mail bells of one agent's open sessions, by session id.
type Bells = Vec<(u64, Arc<Notify>)>;

/// Open sessions per agent and incarnation.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<Key, Open>>,
    /// The mail bells of each agent's open sessions, by session id.
    bells: Mutex<HashMap<AgentName, Bells>>,
    next_id: AtomicU64,
}

/// Counts a session as open until dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    key: Key,
    id: u64,
}

impl Sessions {
    /// Records a session of `agent`'s `incarnation`; pushes for it arrive on the receiver,
    /// and the bell rings when its agent has new mail.
    ///
    /// Mail is not pushed through the bounded queue, where a burst would drop it: the bell
    /// only says "read the mailbox", and ringing it twice before it is heard is one ring.
    pub fn attach(
        self: &Arc<Self>,
        agent: AgentName,
        incarnation: u64,
    ) -> (SessionGuard, mpsc::Receiver<Push>, Arc<Notify>) {
        let key = (agent, incarnation);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(PUSHES_QUEUED_MAX);
        let bell = Arc::new(Notify::new());
        self.open.lock().expect("sessions lock").entry(key.clone()).or_default().push((id, sender));
        self.bells.lock().expect("bells lock").entry(key.0.clone()).or_default().push((id, bell.clone()));
        (SessionGuard { sessions: self.clone(), key, id }, receiver, bell)
    }

    /// Rings the mail bell of every session of `agent`, whatever its incarnation.
    pub fn ring(&self, agent: &AgentName) {
        let bells = self.bells.lock().expect("bells lock");
        for (_, bell) in bells.get(agent).into_iter().flatten() {
            bell.notify_one();
        }
    }

    /// Whether a session of `agent`'s `incarnation` is open.
    pub fn is_attached(&self, agent: &AgentName, incarnation: u64) -> bool {
        self.open.lock().expect("sessions lock").contains_key(&(agent.clone(), incarnation))
    }

    /// Tells every session of `agent`'s `incarnation`. Never waits: a full queue drops it.
    pub fn push(&self, agent: &AgentName, incarnation: u64, push: Push) {
        let open = self.open.lock().expect("sessions lock");
        for (_, sender) in open.get(&(agent.clone(), incarnation)).into_iter().flatten() {
            let _ = sender.try_send(push.clone());
        }
    }
}

impl Sessions {
    /// Ends every session of `agent`, whatever its incarnation.
    pub fn end(&self, agent: &AgentName, reason: &str) {
        let open = self.open.lock().expect("sessions lock");
        for ((holder, _), senders) in open.iter() {
            if holder == agent {
                for (_, sender) in senders {
                    let _ = sender.try_send(Push::Ended { reason: reason.to_string() });
                }
            }
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.sessions.open.lock().expect("sessions lock");
        if let Some(senders) = open.get_mut(&self.key) {
            senders.retain(|(id, _)| *id != self.id);
            if senders.is_empty() {
                open.remove(&self.key);
            }
        }
        drop(open);
        let mut bells = self.sessions.bells.lock().expect("bells lock");
        if let Some(rung) = bells.get_mut(&self.key.0) {
            rung.retain(|(id, _)| *id != self.id);
            if rung.is_empty() {
                bells.remove(&self.key.0);
            }
        }
    }
}
