//! Durable messaging between agents: mailboxes with sequence numbers, conversations, and
//! the replies an agent still owes.
//!
//! A message is one `MessageSent` event; it waits in its recipient's mailbox until the
//! recipient acks its sequence number (`MessageAcked`). Delivery is at least once: the
//! shell hands every unacked message to each new session of the recipient, in sequence
//! order, and the client drops a sequence number it has already handed to the
//! application. A mailbox holds at most `limits.mailbox_max` unacked messages; past that a
//! send is refused (`mailbox_full`), so a recipient that stops reading slows its senders
//! down instead of growing hale's memory.
//!
//! A message sent to a role goes to one agent of that role: the one already taking part in
//! the conversation if there is one (conversations are sticky), otherwise the agent of the
//! role that is not down or quarantined and has the fewest unacked messages (by name on a
//! tie). A message that `expects_reply` is a *pending response* of its recipient until the
//! recipient sends a message with `reply_to` naming it, or the conversation ends.

use crate::Timestamp;
use crate::command::{Answer, Decision, MailCommand, Recipient};
use crate::decide::{Context, running};
use crate::event::Event;
use crate::merge::{json_depth, json_size};
use crate::names::{AgentName, ConversationId};
use crate::rejection::Rejection;
use crate::state::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Idempotency keys remembered per sender (the most recent ones): a send retried with a
/// key still remembered returns the first message instead of sending again.
pub const SEND_KEYS_KEPT: usize = 4096;
/// Longest idempotency key, in bytes.
pub const SEND_KEY_BYTES_MAX: usize = 128;

/// One message, as it waits in its recipient's mailbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unique across hale, in sending order.
    pub id: u64,
    /// The recipient's mailbox sequence number: 1, 2, 3… per recipient.
    pub seq: u64,
    pub from: AgentName,
    pub to: AgentName,
    pub conversation: ConversationId,
    pub body: Value,
    /// The message this one answers.
    pub reply_to: Option<u64>,
    /// The sender waits for an answer (a message with `reply_to` naming this one).
    pub expects_reply: bool,
    pub sent_at: Timestamp,
}

/// A message its recipient has yet to answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReply {
    pub message: u64,
    pub seq: u64,
    pub from: AgentName,
    pub conversation: ConversationId,
    pub sent_at: Timestamp,
}

/// What a send made: the answer to the first send with a key, and to every retry of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub message: u64,
    pub to: AgentName,
    pub seq: u64,
    pub conversation: ConversationId,
}

/// A conversation that has not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub participants: BTreeSet<AgentName>,
    pub started_at: Timestamp,
    pub last_at: Timestamp,
    pub messages: u64,
}

/// One agent's mailbox, and what it owes and has sent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mailbox {
    /// The last sequence number given out (0: none yet).
    last_seq: u64,
    /// Shared, so a snapshot copies pointers, not bodies.
    unacked: BTreeMap<u64, Arc<Message>>,
    /// Messages that wait for this agent's reply, by message id.
    awaiting_reply: BTreeMap<u64, PendingReply>,
    /// The conversations this agent takes part in that have not ended.
    conversations: BTreeSet<ConversationId>,
    /// This agent's recent sends by idempotency key, oldest first in `key_order`.
    sent_keys: BTreeMap<String, Sent>,
    key_order: VecDeque<String>,
}

impl Mailbox {
    /// The last sequence number given out.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// How many messages wait for an ack.
    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    /// The unacked messages after sequence number `after`, in order.
    pub fn unacked_after(&self, after: u64) -> impl Iterator<Item = &Arc<Message>> {
        self.unacked.range(after.saturating_add(1)..).map(|(_, message)| message)
    }

    /// The messages that wait for this agent's reply, oldest first.
    pub fn pending_replies(&self) -> impl Iterator<Item = &PendingReply> {
        self.awaiting_reply.values()
    }

    /// The conversations this agent takes part in.
    pub fn conversations(&self) -> impl Iterator<Item = &ConversationId> {
        self.conversations.iter()
    }

    /// The send this agent made with idempotency key `key`, if still remembered.
    pub fn sent_with_key(&self, key: &str) -> Option<&Sent> {
        self.sent_keys.get(key)
    }
}

/// Every mailbox and conversation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Mail {
    last_message: u64,
    /// The highest `N` of a conversation named `c-N` (hale's own names).
    last_conversation: u64,
    boxes: BTreeMap<AgentName, Mailbox>,
    conversations: BTreeMap<ConversationId, Conversation>,
}

impl Mail {
    /// `agent`'s mailbox, if anything was ever sent to or by it.
    pub fn mailbox(&self, agent: &str) -> Option<&Mailbox> {
        self.boxes.get(agent)
    }

    /// A conversation that has not ended.
    pub fn conversation(&self, id: &str) -> Option<&Conversation> {
        self.conversations.get(id)
    }

    /// The last message id given out.
    pub fn last_message(&self) -> u64 {
        self.last_message
    }

    /// Folds a `MessageSent` (sent at `message.sent_at`, with the sender's idempotency
    /// `key`).
    pub(crate) fn apply_sent(&mut self, message: Message, key: Option<String>) {
        let Message { id, seq, from, to, conversation, reply_to, expects_reply, sent_at: at, .. } = &message;
        let (id, seq, at) = (*id, *seq, *at);
        self.last_message = self.last_message.max(id);
        if let Some(n) = conversation.as_str().strip_prefix("c-").and_then(|n| n.parse::<u64>().ok()) {
            self.last_conversation = self.last_conversation.max(n);
        }
        let talk = self.conversations.entry(conversation.clone()).or_insert_with(|| Conversation {
            participants: BTreeSet::new(),
            started_at: at,
            last_at: at,
            messages: 0,
        });
        talk.participants.insert(from.clone());
        talk.participants.insert(to.clone());
        talk.last_at = at;
        talk.messages += 1;
        let sender = self.boxes.entry(from.clone()).or_default();
        sender.conversations.insert(conversation.clone());
        if let Some(answered) = reply_to {
            sender.awaiting_reply.remove(answered);
        }
        if let Some(key) = key {
            let sent = Sent { message: id, to: to.clone(), seq, conversation: conversation.clone() };
            if sender.sent_keys.insert(key.clone(), sent).is_none() {
                sender.key_order.push_back(key);
            }
            while sender.key_order.len() > SEND_KEYS_KEPT {
                if let Some(oldest) = sender.key_order.pop_front() {
                    sender.sent_keys.remove(&oldest);
                }
            }
        }
        let recipient = self.boxes.entry(to.clone()).or_default();
        recipient.last_seq = recipient.last_seq.max(seq);
        recipient.conversations.insert(conversation.clone());
        if *expects_reply {
            recipient.awaiting_reply.insert(
                id,
                PendingReply { message: id, seq, from: from.clone(), conversation: conversation.clone(), sent_at: at },
            );
        }
        recipient.unacked.insert(seq, Arc::new(message));
    }

    /// Folds a `MessageAcked`.
    pub(crate) fn apply_acked(&mut self, agent: &AgentName, seq: u64) {
        if let Some(mailbox) = self.boxes.get_mut(agent) {
            mailbox.unacked.remove(&seq);
        }
    }

    /// Folds a `ConversationEnded`.
    pub(crate) fn apply_ended(&mut self, conversation: &ConversationId) {
        let Some(talk) = self.conversations.remove(conversation) else { return };
        for agent in talk.participants {
            if let Some(mailbox) = self.boxes.get_mut(&agent) {
                mailbox.conversations.remove(conversation);
                mailbox.awaiting_reply.retain(|_, pending| pending.conversation != *conversation);
            }
        }
    }
}

/// `decide` for sends, acks and ends of conversations.
pub(crate) fn decide(context: &Context<'_>, command: &MailCommand) -> Result<Decision, Rejection> {
    let Context { state, limits, .. } = *context;
    let mail = state.mail();
    let events = match command {
        MailCommand::Send { from, incarnation, to, conversation, body, reply_to, expects_reply, key } => {
            running(state, from, *incarnation)?;
            if let Some(key) = key {
                if key.is_empty() || key.len() > SEND_KEY_BYTES_MAX {
                    return Err(Rejection::BadMessage {
                        reason: format!("an idempotency key must be 1 to {SEND_KEY_BYTES_MAX} bytes"),
                    });
                }
                if let Some(first) = mail.mailbox(from.as_str()).and_then(|mailbox| mailbox.sent_with_key(key)) {
                    // A retry of a send that was logged: it answers with the first message.
                    return Ok(Decision::answer(Answer::Sent {
                        message: first.message,
                        to: first.to.clone(),
                        seq: first.seq,
                        conversation: first.conversation.clone(),
                        new: false,
                    }));
                }
            }
            // A retry of a send logged before the quarantine is answered above; nothing new.
            crate::decide::not_quarantined(state, from)?;
            let size = json_size(body);
            if size > limits.message_bytes_max {
                return Err(Rejection::MessageTooLarge { size, max: limits.message_bytes_max });
            }
            let depth = json_depth(body);
            if depth > limits.patch_depth_max {
                return Err(Rejection::BadMessage {
                    reason: format!(
                        "the body nests {depth} levels deep; the limit is {} (limits.patch_depth_max)",
                        limits.patch_depth_max
                    ),
                });
            }
            if let Some(answered) = reply_to
                && (*answered == 0 || *answered > mail.last_message)
            {
                return Err(Rejection::UnknownMessage {
                    detail: format!("reply_to names message {answered}, which was never sent"),
                });
            }
            let conversation = match conversation {
                Some(conversation) => conversation.clone(),
                None => ConversationId::new(format!("c-{}", mail.last_conversation + 1)).expect("c-N is a valid id"),
            };
            let to = recipient(state, from, to, &conversation)?;
            let mailbox = mail.mailbox(to.as_str());
            let unacked = mailbox.map_or(0, Mailbox::unacked_len);
            if unacked >= limits.mailbox_max {
                return Err(Rejection::MailboxFull { agent: to.to_string(), max: limits.mailbox_max });
            }
            if mail.conversation(conversation.as_str()).is_none() {
                for agent in [from, &to] {
                    let active = mail.mailbox(agent.as_str()).map_or(0, |mailbox| mailbox.conversations.len());
                    if active >= limits.conversations_max {
                        return Err(Rejection::TooManyConversations {
                            agent: agent.to_string(),
                            max: limits.conversations_max,
                        });
                    }
                }
            }
            let (message, seq) = (mail.last_message + 1, mailbox.map_or(0, Mailbox::last_seq) + 1);
            let answer = Answer::Sent { message, to: to.clone(), seq, conversation: conversation.clone(), new: true };
            let event = Event::MessageSent {
                id: message,
                seq,
                from: from.clone(),
                to,
                conversation,
                body: body.clone(),
                reply_to: *reply_to,
                expects_reply: *expects_reply,
                key: key.clone(),
            };
            return Ok(Decision { events: vec![event], answer });
        }
        MailCommand::Ack { agent, incarnation, seq } => {
            running(state, agent, *incarnation)?;
            let mailbox = mail.mailbox(agent.as_str());
            let last = mailbox.map_or(0, Mailbox::last_seq);
            if *seq == 0 || *seq > last {
                return Err(Rejection::UnknownMessage {
                    detail: format!("agent {agent:?} has no message {seq} (its mailbox is at {last})"),
                });
            }
            if !mailbox.is_some_and(|mailbox| mailbox.unacked.contains_key(seq)) {
                // Acked before: acks are idempotent.
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::MessageAcked { agent: agent.clone(), seq: *seq }]
        }
        MailCommand::EndConversation { agent, incarnation, conversation } => {
            running(state, agent, *incarnation)?;
            let Some(talk) = mail.conversation(conversation.as_str()) else {
                // Ended before (or never begun): ending is idempotent.
                return Ok(Decision::done(Vec::new()));
            };
            if !talk.participants.contains(agent) {
                return Err(Rejection::UnknownConversation {
                    agent: agent.to_string(),
                    conversation: conversation.to_string(),
                });
            }
            vec![Event::ConversationEnded { conversation: conversation.clone(), by: agent.clone() }]
        }
    };
    Ok(Decision::done(events))
}

/// Who gets a message sent to `to` in `conversation`.
fn recipient(
    state: &State,
    from: &AgentName,
    to: &Recipient,
    conversation: &ConversationId,
) -> Result<AgentName, Rejection> {
    match to {
        Recipient::Agent(agent) => match state.agent(agent.as_str()) {
            Some(record) => Ok(record.name.clone()),
            None => Err(Rejection::NoRecipient {
                detail: format!("no agent named {:?}; an agent is registered by its first hello", agent.as_str()),
            }),
        },
        Recipient::Role(role) => {
            let of_role = |agent: &AgentName| {
                state.agent(agent.as_str()).filter(|record| record.role == *role && record.incarnation > 0)
            };
            // Sticky: the agent of the role already in the conversation keeps it.
            if let Some(talk) = state.mail().conversation(conversation.as_str())
                && let Some(record) = talk
                    .participants
                    .iter()
                    .filter(|agent| *agent != from)
                    .filter_map(of_role)
                    .find(|record| record.health.quarantine.is_none())
            {
                return Ok(record.name.clone());
            }
            let unacked = |agent: &AgentName| state.mail().mailbox(agent.as_str()).map_or(0, Mailbox::unacked_len);
            state
                .agents()
                .filter(|record| record.role == *role && record.incarnation > 0)
                .filter(|record| record.health.quarantine.is_none())
                .min_by_key(|record| {
                    let down = record.down.as_ref().is_some_and(|down| down.incarnation == record.incarnation);
                    (down, unacked(&record.name), record.name.clone())
                })
                .map(|record| record.name.clone())
                .ok_or_else(|| Rejection::NoRecipient {
                    detail: format!("no agent of role {:?} has started (or every one is quarantined)", role.as_str()),
                })
        }
    }
}

#[cfg(test)]
mod tests;
