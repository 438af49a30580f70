//! Mail between the wire and the core: sends, acks and ends of conversations in; mailbox
//! messages, conversations and pending replies out.

use crate::api::ApiError;
use hale_core::mail::Message;
use hale_core::{AgentName, Command, ConversationId, MailCommand, RoleName, State as CoreState};
use hale_proto::{ConversationInfo, Mailbox, MessageInfo, PendingReplyInfo, SendBody};

/// The command for a send by `from`'s run `incarnation`.
pub fn send_command(from: AgentName, incarnation: u64, message: SendBody) -> Result<Command, ApiError> {
    let to = match message.to {
        hale_proto::Recipient::Agent(agent) => hale_core::Recipient::Agent(AgentName::new(agent)?),
        hale_proto::Recipient::Role(role) => hale_core::Recipient::Role(RoleName::new(role)?),
    };
    let conversation = message.conversation.map(ConversationId::new).transpose()?;
    Ok(Command::Mail(MailCommand::Send {
        from,
        incarnation,
        to,
        conversation,
        body: message.body,
        reply_to: message.reply_to,
        expects_reply: message.expects_reply,
        key: message.key,
    }))
}

/// The command to end `conversation`.
pub fn end_command(agent: AgentName, incarnation: u64, conversation: String) -> Result<Command, ApiError> {
    Ok(MailCommand::EndConversation { agent, incarnation, conversation: ConversationId::new(conversation)? }.into())
}

/// The command to ack message `seq` of `agent`'s mailbox.
pub fn ack_command(agent: AgentName, incarnation: u64, seq: u64) -> Command {
    MailCommand::Ack { agent, incarnation, seq }.into()
}

/// A mailbox message on the wire.
pub fn message_info(message: &Message) -> MessageInfo {
    MessageInfo {
        seq: message.seq,
        message: message.id,
        from: message.from.to_string(),
        conversation: message.conversation.to_string(),
        body: message.body.clone(),
        reply_to: message.reply_to,
        expects_reply: message.expects_reply,
        sent_at_ms: message.sent_at.0,
    }
}

/// `agent`'s unacked messages after `after` (at most `limit`).
pub fn unacked(state: &CoreState, agent: &str, after: u64, limit: usize) -> Vec<MessageInfo> {
    let Some(mailbox) = state.mail().mailbox(agent) else { return Vec::new() };
    mailbox.unacked_after(after).take(limit).map(|message| message_info(message)).collect()
}

/// `agent`'s mailbox without its messages: what the welcome carries.
pub fn summary(state: &CoreState, agent: &AgentName) -> Mailbox {
    let mail = state.mail();
    let Some(mailbox) = mail.mailbox(agent.as_str()) else {
        return Mailbox {
            agent: agent.to_string(),
            last_seq: 0,
            unacked: 0,
            messages: Vec::new(),
            conversations: Vec::new(),
            pending_replies: Vec::new(),
        };
    };
    let conversations = mailbox
        .conversations()
        .filter_map(|id| {
            let talk = mail.conversation(id.as_str())?;
            Some(ConversationInfo {
                id: id.to_string(),
                participants: talk.participants.iter().map(ToString::to_string).collect(),
                started_at_ms: talk.started_at.0,
                last_at_ms: talk.last_at.0,
                messages: talk.messages,
            })
        })
        .collect();
    let pending_replies = mailbox
        .pending_replies()
        .map(|pending| PendingReplyInfo {
            message: pending.message,
            seq: pending.seq,
            from: pending.from.to_string(),
            conversation: pending.conversation.to_string(),
            sent_at_ms: pending.sent_at.0,
        })
        .collect();
    Mailbox {
        agent: agent.to_string(),
        last_seq: mailbox.last_seq(),
        unacked: mailbox.unacked_len() as u64,
        messages: Vec::new(),
        conversations,
        pending_replies,
    }
}
