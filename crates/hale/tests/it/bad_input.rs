//! Bad input on the wire: each gets its documented error, the connection or at least the
//! server stays usable, memory stays bounded, and nothing is written.

use crate::support::{self, serve};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{url}/v1/session").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn exchange(socket: &mut Socket, message: Message) -> Value {
    socket.send(message).await.unwrap();
    next_frame(socket).await.expect("an answer")
}

async fn next_frame(socket: &mut Socket) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// `{"d": {"d": … 1}}`, `depth` objects deep.
pub fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "d": inner }))
}

fn text(value: Value) -> Message {
    Message::text(value.to_string())
}

#[tokio::test]
async fn bad_frames_get_typed_errors_and_change_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &["--patch-bytes-max", "1024"]);
    let url = hale.ws_url();
    let mut socket = open(&url).await;

    // Before hello, writes are refused.
    let answer = exchange(&mut socket, text(json!({"type": "checkpoint", "id": 1, "patch": {}}))).await;
    assert_eq!((answer["id"].clone(), answer["code"].clone()), (json!(1), json!("hello_required")));

    let welcome = exchange(&mut socket, text(json!({"type": "hello", "id": 2, "agent": "target", "role": "r"}))).await;
    assert_eq!(welcome["type"], "welcome");
    let ok = exchange(&mut socket, text(json!({"type": "checkpoint", "id": 3, "patch": {"good": 1}}))).await;
    assert_eq!(ok["version"], 1);
    let rss_before = hale.rss_kib();

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_patch = format!(r#"{{"type":"checkpoint","id":9,"patch":{{"a":{deep}}}}}"#);
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "bad_frame"),
        (Message::text(deep.clone()), "bad_frame"),
        (Message::text(deep_patch), "bad_frame"),
        (Message::binary(vec![0xff, 0xfe, 0x00, 0x80]), "bad_frame"),
        (text(json!({"type": "teleport", "id": 4})), "unknown_frame_type"),
        (text(json!({"type": "checkpoint", "id": 5, "patch": {"x": "y".repeat(2_000)}})), "patch_too_large"),
        (text(json!({"type": "checkpoint", "id": 6, "patch": [1, 2]})), "patch_not_object"),
        (text(json!({"type": "checkpoint", "id": 14, "patch": nested(100)})), "patch_too_deep"),
        (text(json!({"type": "checkpoint", "id": 7, "patch": {}, "extra": true})), "bad_frame"),
        (text(json!({"type": "recovery_point", "id": 8, "name": "../../etc"})), "invalid_name"),
        (text(json!({"type": "rollback", "id": 10, "to": {"version": 99}})), "version_not_retained"),
        (text(json!({"type": "rollback", "id": 11, "to": {"point": "nope"}})), "unknown_recovery_point"),
        (text(json!({"type": "hello", "id": 12, "agent": "other", "role": "r"})), "hello_repeated"),
        (text(json!({"type": "heartbeat", "id": 15, "progress": {"fraction": 1.5}})), "bad_fraction"),
        (
            text(json!({"type": "heartbeat", "id": 16, "progress": {"message": "m".repeat(9_000)}})),
            "progress_too_large",
        ),
        (text(json!({"type": "heartbeat", "id": 17, "progress": {"percent": 50}})), "bad_frame"),
        (text(json!({"type": "heartbeat", "id": 18, "progress": {"fields": {"deep": nested(80)}}})), "patch_too_deep"),
        (text(json!({"type": "report_violation", "id": 19, "reason": "r".repeat(2_000)})), "reason_too_long"),
        (text(json!({"type": "report_violation", "id": 20, "agent": "ghost", "reason": "x"})), "unknown_agent"),
        (text(json!({"type": "commit_step", "id": 21, "task": 99, "name": "s"})), "lease_lost"),
        (text(json!({"type": "intend_step", "id": 31, "task": 99, "name": "s"})), "lease_lost"),
        (text(json!({"type": "submit", "id": 32, "task": {"role": "r", "shadow": {"count": 1}}})), "bad_task"),
        (text(json!({"type": "submit", "id": 33, "task": {"role": "r", "priority": "now"}})), "bad_request"),
        (text(json!({"type": "submit", "id": 34, "task": {"role": "r", "max_attempts": 0}})), "bad_task"),
        (text(json!({"type": "reserve", "id": 35, "task": 99, "tokens": 1})), "lease_lost"),
        (text(json!({"type": "report_spend", "id": 36, "reservation": 5, "tokens": 1})), "bad_task"),
        (text(json!({"type": "reserve", "id": 37, "tokens": -1})), "bad_frame"),
        (text(json!({"type": "complete", "id": 22, "task": 99})), "lease_lost"),
        (text(json!({"type": "fail", "id": 23, "task": 99, "reason": "r"})), "lease_lost"),
    ];
    for _round in 0..20 {
        for (message, code) in &cases {
            let answer = exchange(&mut socket, message.clone()).await;
            assert_eq!(answer["type"], "error", "{answer}");
            assert_eq!(answer["code"], *code, "{answer}");
            assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    // The connection is still usable, and nothing of the above was written.
    let ok = exchange(&mut socket, text(json!({"type": "checkpoint", "id": 13, "patch": {"good": 2}}))).await;
    assert_eq!(ok["version"], 2, "{ok}");

    // A text frame that is not UTF-8 breaks the WebSocket protocol: that session ends, the
    // server goes on.
    let mut broken = open(&url).await;
    broken.send(Message::Frame(Frame::message(vec![0xc3, 0x28], OpCode::Data(Data::Text), true))).await.unwrap();
    assert!(next_frame(&mut broken).await.is_none(), "the session must end");

    // A frame over the limit ends its session without the server buffering it all.
    for _ in 0..20 {
        let mut big = open(&url).await;
        let _ = big
            .send(Message::text(format!(r#"{{"type":"checkpoint","id":1,"patch":{{"x":"{}"}}}}"#, "a".repeat(4 << 20))))
            .await;
        assert!(next_frame(&mut big).await.is_none(), "an oversized frame must end the session");
    }

    // Unknown agent and stale incarnation, over a fresh session.
    let mut fresh = open(&url).await;
    let answer =
        exchange(&mut fresh, text(json!({"type": "hello", "id": 1, "agent": "target", "role": "r", "incarnation": 7})))
            .await;
    assert_eq!(answer["code"], "unknown_incarnation");
    let answer =
        exchange(&mut fresh, text(json!({"type": "hello", "id": 2, "agent": "target", "role": "r", "incarnation": 0})))
            .await;
    assert_eq!(answer["code"], "stale_incarnation");

    let rss_after = hale.rss_kib();
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");

    let (status, body) = hale.get("/v1/agents/target/state");
    assert_eq!(status, 200);
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((state["version"].clone(), state["state"].clone()), (json!(2), json!({"good": 2})));
    drop((socket, fresh));
    assert!(hale.terminate().success());
    // The log holds exactly: registered, incarnation started, two checkpoints.
    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["records"], 4, "{out}");
}

#[test]
fn bad_http_requests_get_typed_errors() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &["--patch-bytes-max", "1024"]);
    let post = |path: &str, body: &[u8]| {
        let (status, body) = support::http(hale.addr, "POST", path, body);
        let code =
            serde_json::from_str::<Value>(&body).map(|value| value["error"]["code"].clone()).unwrap_or(json!(body));
        (status, code)
    };
    assert_eq!(post("/v1/agents/a/hello", br#"{"role": "r"}"#).0, 200);
    assert_eq!(post("/v1/agents/a/checkpoint", b"{oops"), (400, json!("bad_request")));
    assert_eq!(post("/v1/agents/a/checkpoint", &[0xff, 0xfe, 0xfd]), (400, json!("bad_request")));
    let deep = format!(r#"{{"incarnation":1,"patch":{{"a":{}{}}}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(post("/v1/agents/a/checkpoint", deep.as_bytes()), (400, json!("bad_request")));
    let big = format!(r#"{{"incarnation":1,"patch":{{"x":"{}"}}}}"#, "a".repeat(8 << 20));
    assert_eq!(post("/v1/agents/a/checkpoint", big.as_bytes()), (413, json!("body_too_large")));
    let over_patch = format!(r#"{{"incarnation":1,"patch":{{"x":"{}"}}}}"#, "a".repeat(2_000));
    assert_eq!(post("/v1/agents/a/checkpoint", over_patch.as_bytes()), (413, json!("patch_too_large")));
    assert_eq!(post("/v1/agents/bad%20name/checkpoint", br#"{"incarnation":1,"patch":{}}"#).0, 400);
    assert_eq!(post("/v1/agents/ghost/checkpoint", br#"{"incarnation":1,"patch":{}}"#), (404, json!("unknown_agent")));
    assert_eq!(post("/v1/agents/a/checkpoint", br#"{"incarnation":0,"patch":{}}"#), (409, json!("stale_incarnation")));
    assert_eq!(post("/v1/nowhere", b"{}"), (404, json!("not_found")));
    assert_eq!(
        post("/v1/agents/a/heartbeat", br#"{"incarnation":1,"progress":{"fraction":-1}}"#),
        (400, json!("bad_fraction"))
    );
    assert_eq!(post("/v1/agents/a/restart", b""), (409, json!("not_managed")));
    assert_eq!(post("/v1/agents/ghost/stop", b""), (404, json!("unknown_agent")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","priority":"urgent"}"#), (400, json!("bad_request")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","max_attempts":0}"#), (400, json!("bad_task")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","idempotency_key":""}"#), (400, json!("bad_task")));
    assert_eq!(post("/v1/tasks/99/complete", br#"{"agent":"a","incarnation":1}"#), (409, json!("lease_lost")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","shadow":{"count":100}}"#), (400, json!("bad_task")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","shadow":{"count":2,"quorum":3}}"#), (400, json!("bad_task")));
    assert_eq!(post("/v1/tasks", br#"{"role":"r","shadow":{"count":2,"x":1}}"#), (400, json!("bad_request")));
    assert_eq!(
        post("/v1/tasks", br#"{"role":"r","fallback":[{"role":"s","level":"great"}]}"#),
        (400, json!("bad_request"))
    );
    assert_eq!(post("/v1/tasks", br#"{"role":"r","fallback":[{"role":"bad name","level":"minimal"}]}"#).0, 400);
    assert_eq!(post("/v1/tasks", br#"{"role":"r","budget":{"tokens":-1}}"#), (400, json!("bad_request")));
    assert_eq!(post("/v1/tasks/99/intents", br#"{"agent":"a","incarnation":1}"#), (400, json!("bad_request")));
    assert_eq!(
        post("/v1/tasks/99/intents", br#"{"agent":"a","incarnation":1,"name":"s"}"#),
        (409, json!("lease_lost"))
    );
    assert_eq!(post("/v1/agents/a/reservations", br#"{"incarnation":1,"tokens":5,"reservation":3}"#).0, 400);
    assert_eq!(
        post("/v1/agents/a/reservations", br#"{"incarnation":1,"task":99,"tokens":5}"#),
        (409, json!("lease_lost"))
    );
    assert_eq!(
        post("/v1/agents/a/spend", br#"{"incarnation":1,"reservation":42,"tokens":5}"#),
        (400, json!("bad_task"))
    );
    assert_eq!(post("/v1/agents/a/spend", br#"{"incarnation":7,"tokens":5}"#), (409, json!("unknown_incarnation")));
    assert_eq!(post("/v1/tasks/abc/cancel", b"").0, 400);
    let (status, body) = hale.get("/v1/tasks/99");
    assert_eq!(status, 404, "{body}");
    let (status, body) = hale.get("/v1/tasks");
    assert_eq!((status, body.as_str()), (200, "[]"), "no task was accepted");
    let (status, body) = hale.get("/v1/tasks?limit=abc");
    assert_eq!(status, 400, "{body}");
    let (status, body) = hale.get("/v1/status");
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["queued"], 0);
    let (status, body) = hale.get("/v1/agents/a/state?version=abc");
    assert_eq!(status, 400, "{body}");
    let (status, body) = hale.get("/v1/agents/a/state");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], 0, "nothing was written");
}
