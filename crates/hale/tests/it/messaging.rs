//! Durable messaging end to end: two agents exchange messages with acks while hale is
//! SIGKILLed and started again (each message arrives once, in order, and is logged once);
//! a resumed agent gets back its unacked messages, conversations and pending replies;
//! bad sends get clear errors; one agent cannot read or ack another's mail.

use crate::support::{self, ADMIN, http_as, serve};
use hale_client::{Agent, AgentOptions, Recipient, Reconnect};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const MESSAGES: u64 = 300;

fn writer() -> Recipient {
    Recipient::Agent("writer".into())
}

#[tokio::test]
async fn messages_arrive_once_and_in_order_across_a_sigkill_of_hale() {
    let temp = tempfile::tempdir().unwrap();
    let listen = support::free_address();
    let hale = support::serve_on(temp.path(), &listen);
    let policy = Reconnect { base: Duration::from_millis(20), cap: Duration::from_millis(300), ..Reconnect::default() };
    let connect = async |name: &str| {
        let options = AgentOptions::new(name, "r").token(ADMIN).reconnect(policy.clone());
        let agent = Agent::connect(&hale.ws_url(), options).await.unwrap();
        agent.resume().await.unwrap();
        agent
    };
    let planner = connect("planner").await;
    let receiver = connect("writer").await;
    let session = receiver.session_id().unwrap();
    let handed = Arc::new(AtomicU64::new(0));

    let count = handed.clone();
    let reading = tokio::spawn(async move {
        let mut received = Vec::new();
        while (received.len() as u64) < MESSAGES {
            let message = tokio::time::timeout(Duration::from_secs(30), receiver.next_message())
                .await
                .expect("a message within 30 s")
                .expect("the session lasts");
            assert_eq!(message.from, "planner");
            received.push(message.body.as_u64().unwrap());
            count.store(received.len() as u64, Ordering::SeqCst);
            receiver.ack(message.seq).await.expect("ack");
        }
        (received, receiver)
    });
    let sending = tokio::spawn(async move {
        let mut sent = Vec::new();
        for n in 0..MESSAGES {
            let answer = planner.send(writer(), Some("stream"), json!(n)).await.expect("send");
            sent.push(answer.seq);
        }
        sent
    });
    // The kill lands in the middle of the stream.
    support::eventually("the stream under way", 30, || async {
        (handed.load(Ordering::SeqCst) >= MESSAGES / 10).then_some(())
    })
    .await;
    hale.kill();
    // The outage: the clients' first retries fail and back off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hale = support::serve_on(temp.path(), &listen);

    let sent = sending.await.unwrap();
    let (received, receiver) = reading.await.unwrap();
    assert_eq!(sent, (1..=MESSAGES).collect::<Vec<_>>(), "each send made one mailbox entry, in order");
    assert_eq!(received, (0..MESSAGES).collect::<Vec<_>>(), "each message handed over once, in order");
    assert_eq!(receiver.session_id().unwrap(), session, "the same session across the restart");
    let (status, _, body) = http_as(hale.addr, Some(ADMIN), "GET", "/v1/agents/writer/mailbox", b"");
    assert_eq!(status, 200, "{body}");
    let mailbox: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(mailbox["last_seq"], MESSAGES, "no message logged twice: {mailbox}");
    assert_eq!(mailbox["unacked"], 0, "{mailbox}");
}

#[tokio::test]
async fn a_resumed_agent_gets_unacked_messages_conversations_and_pending_replies() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let planner = hale.connect(AgentOptions::new("planner", "planner")).await;
    planner.resume().await.unwrap();
    let first = hale.connect(AgentOptions::new("writer", "writer")).await;
    let incarnation = first.resume().await.unwrap().incarnation;

    let by_role = || Recipient::Role("writer".into());
    let ask_a = planner.ask(by_role(), Some("plan-a"), json!("outline A?")).await.unwrap();
    assert_eq!(ask_a.to, "writer", "the role's only agent");
    planner.send(by_role(), Some("plan-a"), json!("also: be brief")).await.unwrap();
    let ask_b = planner.ask(by_role(), Some("plan-b"), json!("outline B?")).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(first.next_message().await.unwrap());
    }
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(got[0].expects_reply && !got[1].expects_reply);
    first.ack(1).await.unwrap();
    let reply = first.reply(&got[0], json!("A: intro, body, end")).await.unwrap();
    assert_eq!((reply.to.as_str(), reply.conversation.as_str()), ("planner", "plan-a"));
    let answer = planner.next_message().await.unwrap();
    assert_eq!(answer.reply_to, Some(ask_a.message));
    let session = first.session_id().unwrap();
    drop(first); // the process dies with messages 2 and 3 unacked and plan-b unanswered

    let second = hale.connect(AgentOptions::new("writer", "writer").incarnation(incarnation)).await;
    let welcome = second.resume().await.unwrap();
    assert!(welcome.resumed);
    assert_eq!(welcome.session, session, "the run's session id");
    assert_eq!(second.session_id().unwrap(), session);
    assert_eq!(welcome.unacked, 2);
    let conversations: Vec<&str> = welcome.conversations.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(conversations, ["plan-a", "plan-b"]);
    let pending: Vec<u64> = welcome.pending_replies.iter().map(|p| p.message).collect();
    assert_eq!(pending, [ask_b.message], "plan-a was answered, plan-b still waits");
    let again: Vec<u64> =
        [second.next_message().await.unwrap(), second.next_message().await.unwrap()].iter().map(|m| m.seq).collect();
    assert_eq!(again, [2, 3], "the unacked messages, in order");
    second.end_conversation("plan-b").await.unwrap();
    let (_, _, body) = http_as(hale.addr, Some(ADMIN), "GET", "/v1/agents/writer/mailbox", b"");
    let mailbox: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(mailbox["pending_replies"], json!([]), "{mailbox}");
    assert_eq!(mailbox["conversations"].as_array().unwrap().len(), 1, "{mailbox}");
}

#[tokio::test]
async fn bad_sends_get_clear_errors_and_mail_stays_with_its_owner() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, "[limits]\nmailbox_max = 3\n").unwrap();
    let hale = serve(&temp.path().join("data"), &["-c", config.to_str().unwrap()]);
    let admin = hale.admin();
    let alice = admin.issue_tokens("alice").await.unwrap();
    let bob = admin.issue_tokens("bob").await.unwrap();
    for (agent, token) in [("alice", &alice.access_token), ("bob", &bob.access_token)] {
        let path = format!("/v1/agents/{agent}/hello");
        assert_eq!(http_as(hale.addr, Some(token), "POST", &path, br#"{"role": "r"}"#).0, 200);
    }
    let send = |token: &str, from: &str, body: Value| {
        let path = format!("/v1/agents/{from}/messages");
        http_as(hale.addr, Some(token), "POST", &path, body.to_string().as_bytes())
    };
    let alice_token = alice.access_token.as_str();
    let (status, _, body) = send(alice_token, "alice", json!({"incarnation": 1, "to": {"agent": "nobody"}, "body": 1}));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no_recipient") && body.contains("nobody"), "{body}");
    let big = json!({"incarnation": 1, "to": {"agent": "bob"}, "body": "x".repeat(100_000)});
    let (status, _, body) = send(alice_token, "alice", big);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("message_too_large") && body.contains("message_bytes_max"), "{body}");
    let (status, _, body) = send(alice_token, "alice", json!({"incarnation": 1, "to": {"team": "x"}, "body": 1}));
    assert_eq!(status, 400, "{body}");
    for n in 0..3 {
        let (status, _, body) =
            send(alice_token, "alice", json!({"incarnation": 1, "to": {"agent": "bob"}, "body": n}));
        assert_eq!(status, 200, "{body}");
    }
    let (status, _, body) = send(alice_token, "alice", json!({"incarnation": 1, "to": {"agent": "bob"}, "body": 3}));
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("mailbox_full") && body.contains("\"retryable\":true"), "{body}");

    // alice cannot send as bob, read bob's mailbox or ack bob's mail.
    let (status, _, _) = send(alice_token, "bob", json!({"incarnation": 1, "to": {"agent": "alice"}, "body": 1}));
    assert_eq!(status, 403);
    let (status, _, _) = http_as(hale.addr, Some(alice_token), "GET", "/v1/agents/bob/mailbox", b"");
    assert_eq!(status, 403);
    let ack = br#"{"incarnation": 1, "seq": 1}"#;
    assert_eq!(http_as(hale.addr, Some(alice_token), "POST", "/v1/agents/bob/mailbox/ack", ack).0, 403);
    // bob reads his own: three messages, each from alice (the sender is the token's agent).
    let (status, _, body) = http_as(hale.addr, Some(&bob.access_token), "GET", "/v1/agents/bob/mailbox", b"");
    assert_eq!(status, 200, "{body}");
    let mailbox: Value = serde_json::from_str(&body).unwrap();
    let messages = mailbox["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert!(messages.iter().all(|m| m["from"] == "alice"), "{mailbox}");
    assert_eq!(http_as(hale.addr, Some(&bob.access_token), "POST", "/v1/agents/bob/mailbox/ack", ack).0, 200);
    let (status, _, body) = send(alice_token, "alice", json!({"incarnation": 1, "to": {"agent": "bob"}, "body": 3}));
    assert_eq!(status, 200, "room again after bob's ack: {body}");
}
