//! Mail through the public `Core` API: sequence numbers, acks, idempotent sends, role
//! routing with sticky conversations, pending replies, bounds, and replay.

use crate::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0 + ms)
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn hello(core: &mut Core, agent: &str, role: &str) {
    let hello =
        Hello { agent: name(agent), role: RoleName::new(role).unwrap(), labels: BTreeMap::new(), incarnation: None };
    core.execute(&Command::Agent(AgentCommand::Hello(hello)), at(0)).unwrap();
}

fn crew(limits: Limits) -> Core {
    let mut core = Core::new(limits);
    hello(&mut core, "planner", "planner");
    hello(&mut core, "writer-1", "writer");
    hello(&mut core, "writer-2", "writer");
    core
}

fn send(from: &str, to: Recipient, conversation: Option<&str>, body: Value) -> Command {
    Command::Mail(MailCommand::Send {
        from: name(from),
        incarnation: 1,
        to,
        conversation: conversation.map(|id| ConversationId::new(id).unwrap()),
        body,
        reply_to: None,
        expects_reply: false,
        key: None,
    })
}

fn to(agent: &str) -> Recipient {
    Recipient::Agent(name(agent))
}

fn role(of: &str) -> Recipient {
    Recipient::Role(RoleName::new(of).unwrap())
}

fn sent(events: &[Event]) -> (u64, u64, String, String) {
    match events {
        [Event::MessageSent { id, seq, to, conversation, .. }] => (*id, *seq, to.to_string(), conversation.to_string()),
        other => panic!("expected one MessageSent, got {other:?}"),
    }
}

fn unacked(core: &Core, agent: &str) -> Vec<u64> {
    core.state()
        .mail()
        .mailbox(agent)
        .map(|mailbox| mailbox.unacked_after(0).map(|m| m.seq).collect())
        .unwrap_or_default()
}

#[test]
fn messages_get_sequence_numbers_per_recipient_and_wait_until_acked() {
    let mut core = crew(Limits::default());
    let first = sent(&core.execute(&send("planner", to("writer-1"), None, json!({"n": 1})), at(1)).unwrap().events);
    let second = sent(&core.execute(&send("planner", to("writer-1"), None, json!({"n": 2})), at(2)).unwrap().events);
    let other = sent(&core.execute(&send("planner", to("writer-2"), None, json!({"n": 3})), at(3)).unwrap().events);
    assert_eq!((first.0, first.1), (1, 1));
    assert_eq!((second.0, second.1), (2, 2));
    assert_eq!((other.0, other.1), (3, 1), "sequence numbers are per mailbox, ids global");
    assert_ne!(first.3, second.3, "a send naming no conversation starts a new one");
    assert_eq!(unacked(&core, "writer-1"), [1, 2]);
    let ack = Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 1 });
    assert_eq!(core.execute(&ack, at(4)).unwrap().events.len(), 1);
    assert_eq!(unacked(&core, "writer-1"), [2]);
    assert!(core.execute(&ack, at(5)).unwrap().events.is_empty(), "a second ack of the same message logs nothing");
    let beyond = Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 3 });
    assert_eq!(core.execute(&beyond, at(6)).unwrap_err().code(), "unknown_message");
    // Delivery is an effect for the recipient's sessions.
    let effects: Vec<Effect> = std::iter::from_fn(|| core.poll_effect()).collect();
    assert!(effects.contains(&Effect::DeliverMail { agent: name("writer-2") }));
}

#[test]
fn a_retried_send_with_the_same_key_is_sent_once() {
    let mut core = crew(Limits::default());
    let keyed = |body: Value| match send("planner", to("writer-1"), Some("draft"), body) {
        Command::Mail(MailCommand::Send {
            from, incarnation, to, conversation, body, reply_to, expects_reply, ..
        }) => Command::Mail(MailCommand::Send {
            from,
            incarnation,
            to,
            conversation,
            body,
            reply_to,
            expects_reply,
            key: Some("k-1".into()),
        }),
        _ => unreachable!(),
    };
    let first = core.execute(&keyed(json!(1)), at(1)).unwrap();
    assert_eq!(first.events.len(), 1);
    let again = core.execute(&keyed(json!(1)), at(2)).unwrap();
    assert!(again.events.is_empty());
    let Answer::Sent { message, to, seq, conversation, new: true } = first.answer else { panic!("{first:?}") };
    assert_eq!(
        again.answer,
        Answer::Sent { message, to, seq, conversation, new: false },
        "a retry answers the first send"
    );
    let remembered = core.state().mail().mailbox("planner").unwrap().sent_with_key("k-1").unwrap();
    assert_eq!((remembered.message, remembered.seq), (1, 1));
    assert_eq!(unacked(&core, "writer-1"), [1]);
}

#[test]
fn a_role_gets_the_least_loaded_agent_and_a_conversation_sticks_to_it() {
    let mut core = crew(Limits::default());
    // writer-1 gets the first (fewest unacked, then by name); writer-2 the next new one.
    let a = sent(&core.execute(&send("planner", role("writer"), Some("review-1"), json!(1)), at(1)).unwrap().events);
    let b = sent(&core.execute(&send("planner", role("writer"), Some("review-2"), json!(2)), at(2)).unwrap().events);
    assert_eq!((a.2.as_str(), b.2.as_str()), ("writer-1", "writer-2"));
    // More of review-1 stays with writer-1 although writer-2 is now as loaded.
    let c = sent(&core.execute(&send("planner", role("writer"), Some("review-1"), json!(3)), at(3)).unwrap().events);
    assert_eq!(c.2, "writer-1");
    let nobody = core.execute(&send("planner", role("critic"), None, json!(0)), at(4)).unwrap_err();
    assert_eq!(nobody.code(), "no_recipient");
    let unknown = core.execute(&send("planner", to("ghost"), None, json!(0)), at(4)).unwrap_err();
    assert_eq!(unknown.code(), "no_recipient");
}

#[test]
fn a_message_expecting_a_reply_is_pending_until_answered_or_the_conversation_ends() {
    let mut core = crew(Limits::default());
    let ask = |conversation: &str| {
        Command::Mail(MailCommand::Send {
            from: name("planner"),
            incarnation: 1,
            to: to("writer-1"),
            conversation: Some(ConversationId::new(conversation).unwrap()),
            body: json!({"q": "outline?"}),
            reply_to: None,
            expects_reply: true,
            key: None,
        })
    };
    let first = sent(&core.execute(&ask("plan-a"), at(1)).unwrap().events);
    sent(&core.execute(&ask("plan-b"), at(2)).unwrap().events);
    let pending = |core: &Core| -> Vec<u64> {
        core.state().mail().mailbox("writer-1").unwrap().pending_replies().map(|p| p.message).collect()
    };
    assert_eq!(pending(&core), [1, 2]);
    // Acking is not answering.
    core.execute(&Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 1 }), at(3)).unwrap();
    assert_eq!(pending(&core), [1, 2]);
    let reply = Command::Mail(MailCommand::Send {
        from: name("writer-1"),
        incarnation: 1,
        to: to("planner"),
        conversation: Some(ConversationId::new("plan-a").unwrap()),
        body: json!({"a": "..."}),
        reply_to: Some(first.0),
        expects_reply: false,
        key: None,
    });
    core.execute(&reply, at(4)).unwrap();
    assert_eq!(pending(&core), [2]);
    let conversations: Vec<String> =
        core.state().mail().mailbox("writer-1").unwrap().conversations().map(|c| c.to_string()).collect();
    assert_eq!(conversations, ["plan-a", "plan-b"]);
    let end = Command::Mail(MailCommand::EndConversation {
        agent: name("writer-1"),
        incarnation: 1,
        conversation: ConversationId::new("plan-b").unwrap(),
    });
    core.execute(&end, at(5)).unwrap();
    assert!(pending(&core).is_empty());
    assert!(core.execute(&end, at(6)).unwrap().events.is_empty(), "ending twice is a no-op");
    let outsider = Command::Mail(MailCommand::EndConversation {
        agent: name("writer-2"),
        incarnation: 1,
        conversation: ConversationId::new("plan-a").unwrap(),
    });
    assert_eq!(core.execute(&outsider, at(7)).unwrap_err().code(), "unknown_conversation");
}

#[test]
fn bounds_refuse_with_the_limit_named() {
    let limits = Limits { mailbox_max: 3, message_bytes_max: 64, conversations_max: 3, ..Limits::default() };
    let mut core = crew(limits);
    for n in 0..3 {
        core.execute(&send("planner", to("writer-1"), Some("x"), json!(n)), at(1)).unwrap();
    }
    let full = core.execute(&send("planner", to("writer-1"), Some("x"), json!(3)), at(3)).unwrap_err();
    assert_eq!(full.code(), "mailbox_full");
    assert!(full.to_string().contains("mailbox_max"), "{full}");
    core.execute(&Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 1 }), at(4)).unwrap();
    core.execute(&send("planner", to("writer-1"), Some("x"), json!(3)), at(5)).expect("room again after an ack");
    let big = core.execute(&send("planner", to("writer-2"), None, json!("x".repeat(100))), at(6)).unwrap_err();
    assert_eq!(big.code(), "message_too_large");
    for conversation in ["y", "z"] {
        core.execute(&send("planner", to("writer-2"), Some(conversation), json!(0)), at(7)).unwrap();
    }
    let many = core.execute(&send("planner", to("writer-2"), Some("w"), json!(0)), at(8)).unwrap_err();
    assert_eq!(many.code(), "too_many_conversations");
}

#[test]
fn a_fenced_run_cannot_send_or_ack() {
    let mut core = crew(Limits::default());
    core.execute(&send("planner", to("writer-1"), None, json!(1)), at(1)).unwrap();
    hello(&mut core, "writer-1", "writer"); // incarnation 2
    let stale = Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 1 });
    assert_eq!(core.execute(&stale, at(2)).unwrap_err().code(), "stale_incarnation");
    // The mailbox belongs to the agent: the new run still has the message.
    assert_eq!(unacked(&core, "writer-1"), [1]);
}

#[test]
fn replay_of_the_log_gives_the_same_mail() {
    let mut core = crew(Limits::default());
    let mut log = Vec::new();
    let mut run = |core: &mut Core, command: Command, ms: u64| {
        for event in core.execute(&command, at(ms)).unwrap().events {
            log.push((at(ms), event));
        }
    };
    for n in 0..20u64 {
        run(&mut core, send("planner", role("writer"), Some(&format!("t-{}", n % 3)), json!(n)), n);
    }
    run(&mut core, Command::Mail(MailCommand::Ack { agent: name("writer-1"), incarnation: 1, seq: 2 }), 30);
    run(
        &mut core,
        Command::Mail(MailCommand::EndConversation {
            agent: name("planner"),
            incarnation: 1,
            conversation: ConversationId::new("t-1").unwrap(),
        }),
        31,
    );
    let mut replayed = crew(Limits::default());
    for (when, event) in log {
        replayed.apply(when, &event);
    }
    assert_eq!(replayed.state().mail(), core.state().mail());
    // A snapshot round trip keeps it too.
    let encoded = serde_json::to_string(core.state()).unwrap();
    let decoded: State = serde_json::from_str(&encoded).unwrap();
    assert_eq!(decoded.mail(), core.state().mail());
}
