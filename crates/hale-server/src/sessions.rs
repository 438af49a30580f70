//! Which agents have a WebSocket session open now. Volatile by design: attachment is not a
//! durable fact, so it lives here in the shell and not in the log.

use hale_core::AgentName;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Open sessions per agent and incarnation.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<(AgentName, u64), usize>>,
}

/// Counts a session as open until dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    key: (AgentName, u64),
}

impl Sessions {
    /// Records a session of `agent`'s `incarnation`.
    pub fn attach(self: &Arc<Self>, agent: AgentName, incarnation: u64) -> SessionGuard {
        let key = (agent, incarnation);
        *self.open.lock().expect("sessions lock").entry(key.clone()).or_default() += 1;
        SessionGuard { sessions: self.clone(), key }
    }

    /// Whether a session of `agent`'s `incarnation` is open.
    pub fn is_attached(&self, agent: &AgentName, incarnation: u64) -> bool {
        self.open.lock().expect("sessions lock").contains_key(&(agent.clone(), incarnation))
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.sessions.open.lock().expect("sessions lock");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}
