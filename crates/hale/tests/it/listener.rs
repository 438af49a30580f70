//! The listener, tried as an attacker would, on the real binary: thousands of connections
//! that send one byte, a head sent a byte a second, connections left idle after a
//! request, one address opening too many, bodies and frames that are not JSON objects,
//! malformed bodies and oversized heads, and task numbers probed with an agent's token.
//! Each is closed or refused while a normal client keeps being served, and nothing is
//! written to the log.

use crate::support::{self, serve};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
}

/// `hale serve` with `[server]` set to `server` (TOML lines).
fn serve_with_limits(dir: &Path, server: &str) -> support::Hale {
    let config = dir.join("hale.toml");
    std::fs::write(&config, format!("[server]\n{server}\n")).unwrap();
    serve(&dir.join("data"), &["-c", config.to_str().unwrap()])
}

/// A connection to `addr` from `source` (any 127.x.y.z is this machine's loopback): the
/// per-address limit counts by source address, so a second address is "another client".
async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    socket.connect(addr).await
}

/// `GET /healthz` on a new connection from `source`; the time to the whole answer.
async fn healthz_from(source: &str, addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = connect_from(source, addr).await.map_err(|error| error.to_string())?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|error| error.to_string())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(|error| error.to_string())?;
        let answer = String::from_utf8_lossy(&answer).to_string();
        if answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n") { Ok(()) } else { Err(answer) }
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(error)) => Err(error),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// Reads one answer (head, then `content-length` bytes of body) off a kept-alive connection.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed mid-answer: {}", String::from_utf8_lossy(&answer));
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|length| length.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    answer.extend_from_slice(&body);
    String::from_utf8_lossy(&answer).to_string()
}

/// Waits up to `within` for the server to close `stream` (EOF or reset); returns when.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Option<Instant> {
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// The events in the log, as `GET /v1/events` lists them.
fn events(hale: &support::Hale) -> Vec<Value> {
    let (status, body) = hale.get("/v1/events?limit=1000");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

const FLOOD: usize = 2_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_one_byte_connections_are_closed_at_the_head_deadline_while_others_are_served() {
    raise_fd_limit();
    let temp = tempfile::tempdir().unwrap();
    // Room for the whole flood from one address: this test is about the head deadline.
    let hale = serve_with_limits(
        temp.path(),
        "connections_max = 8000\nconnections_per_address_max = 8000\nrequest_head_timeout_ms = 2000\n\
         first_byte_timeout_ms = 2000\nkeep_alive_idle_timeout_ms = 2000",
    );
    let addr = hale.addr;
    let rss_before = hale.rss_kib();

    // A normal client on another address keeps asking for /healthz throughout.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut answered = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let took = healthz_from("127.0.0.2", addr).await.expect("/healthz during the flood");
                slowest = slowest.max(took);
                answered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (answered, slowest)
        })
    };

    let mut flood = Vec::with_capacity(FLOOD);
    for n in 0..FLOOD {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        stream.write_all(b"G").await.unwrap();
        flood.push(stream);
        if n % 250 == 249 {
            // Paced a little, so the kernel's SYN queue is not what is measured.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let opened = Instant::now();
    let rss_during = hale.rss_kib();

    // Every one is closed by hale: the head did not end within its deadline.
    let mut last_closed = opened;
    for stream in flood.iter_mut() {
        let closed = closed_by_server(stream, Duration::from_secs(30)).await;
        last_closed = last_closed.max(closed.expect("a one-byte connection was not closed by hale"));
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (answered, slowest) = watcher.await.unwrap();
    assert!(answered >= 5, "only {answered} /healthz answers during the flood");
    assert!(slowest < Duration::from_secs(1), "a /healthz answer took {slowest:?} during the flood");
    // A kept connection costs about 60-70 KiB in this debug build (hyper's buffers, the
    // router's service, its task: see abuse.rs); the bound is generous, and would fail
    // long before a leak of the flood's size mattered less than its count.
    let grown = rss_during.saturating_sub(rss_before);
    assert!(grown < FLOOD as u64 * 120, "{FLOOD} one-byte connections took {grown} KiB");
    println!(
        "{FLOOD} one-byte connections: RSS {rss_before} KiB before, {rss_during} KiB during; all closed {:?} \
         after the last opened; {answered} /healthz answers, slowest {slowest:?}",
        last_closed - opened
    );
    // Served again as before.
    healthz_from("127.0.0.1", addr).await.expect("/healthz after the flood");
}

#[tokio::test]
async fn a_head_sent_a_byte_a_second_is_closed_at_the_head_deadline() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve_with_limits(temp.path(), "request_head_timeout_ms = 3000");
    let mut slow = TcpStream::connect(hale.addr).await.unwrap();
    let started = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        if let Some(at) = closed_by_server(&mut slow, Duration::from_secs(1)).await {
            closed_at = Some(at);
            break;
        }
        // Meanwhile others are served.
        let took = healthz_from("127.0.0.2", hale.addr).await.expect("/healthz beside the slow head");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    let closed_after = closed_at.expect("the slow head was never closed").duration_since(started);
    assert!(
        closed_after >= Duration::from_millis(2_900) && closed_after < Duration::from_secs(10),
        "closed {closed_after:?} after its first byte (deadline 3 s)"
    );
}

#[tokio::test]
async fn a_keep_alive_connection_idle_after_a_request_is_closed_and_a_session_is_not() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve_with_limits(temp.path(), "keep_alive_idle_timeout_ms = 2000\nrequest_head_timeout_ms = 2000");
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut kept = TcpStream::connect(hale.addr).await.unwrap();
    // Requests 1 s apart keep it open past the idle timeout: it counts from each answer.
    for _ in 0..4 {
        kept.write_all(request).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut kept)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
    // Then left idle: closed about 2 s after its last answer.
    let idle_from = Instant::now() - Duration::from_millis(1_000);
    let closed = closed_by_server(&mut kept, Duration::from_secs(10)).await.expect("an idle connection stays open");
    let idle_for = closed.duration_since(idle_from);
    assert!(idle_for >= Duration::from_millis(1_900), "closed after {idle_for:?} idle (timeout 2 s)");

    // A WebSocket session is long-lived: neither deadline cuts it.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{}/v1/session", hale.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = json!({"type": "hello", "id": 1, "agent": "steady", "role": "r"});
    socket.send(Message::text(hello.to_string())).await.unwrap();
    let welcome = next_frame(&mut socket).await.expect("a welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let quiet_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quiet_until {
        let beat = json!({"type": "heartbeat", "id": 2});
        socket.send(Message::text(beat.to_string())).await.unwrap();
        let answer = next_frame(&mut socket).await.expect("the session was closed");
        assert_ne!(answer["type"], "error", "{answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn one_address_past_its_limit_is_refused_and_others_are_served() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve_with_limits(temp.path(), "connections_per_address_max = 20\nfirst_byte_timeout_ms = 60000");
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from("127.0.0.1", hale.addr).await.unwrap());
    }
    // Hale accepts them in its own time: wait until the 21st is refused.
    let mut refused = support::eventually("the 21st connection from 127.0.0.1 to be refused", 20, || async {
        let mut extra = connect_from("127.0.0.1", hale.addr).await.ok()?;
        closed_by_server(&mut extra, Duration::from_millis(500)).await.map(|_| extra)
    })
    .await;
    // Past the limit, a request is not answered at all.
    let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), refused.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // Another address is served.
    let took = healthz_from("127.0.0.2", hale.addr).await.expect("/healthz from another address");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Once some go, that address is accepted again.
    held.truncate(15);
    support::eventually("127.0.0.1 to be served again", 20, || async {
        healthz_from("127.0.0.1", hale.addr).await.ok()
    })
    .await;
    drop(held);
}

async fn next_frame(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await.ok()?? {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Bodies that are JSON but not objects: serde would fill a struct by position from the
/// arrays.
fn not_objects() -> Vec<Value> {
    vec![json!([]), json!(["r"]), json!([null, true, "reason"]), json!("text"), json!(7), json!(null), json!(true)]
}

#[tokio::test]
async fn every_body_and_frame_that_is_not_a_json_object_is_refused_and_nothing_is_written() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(&temp.path().join("data"), &[]);
    // An agent and a task exist, so a write that got through would show.
    let agent = hale.connect(hale_client::AgentOptions::new("probe", "r")).await;
    agent.resume().await.unwrap();
    let beats = agent.spawn_heartbeats(Duration::from_millis(200), || None);
    let submit = hale_client::HttpSubmitTask { role: "nobody".into(), ..Default::default() };
    let task = hale.admin().submit(&submit).await.unwrap().task;
    let before = events(&hale);

    // Every route the OpenAPI document says takes a body.
    let (status, document) = hale.get("/v1/openapi.json");
    assert_eq!(status, 200);
    let document: Value = serde_json::from_str(&document).unwrap();
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if operation.get("requestBody").is_some() {
                let path = path.replace("{agent}", "probe").replace("{task}", &task.to_string());
                routes.push((method.to_uppercase(), path));
            }
        }
    }
    assert!(routes.len() >= 20, "{routes:?}");
    let mut refused = 0;
    for (method, path) in &routes {
        for body in not_objects() {
            // The revoke route documents an empty body or `null` as "no reason given".
            if path.ends_with("/tokens/revoke") && body.is_null() {
                continue;
            }
            let (status, answer) = support::http(hale.addr, method, path, body.to_string().as_bytes());
            assert_eq!(status, 400, "{method} {path} with {body}: {answer}");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["error"]["code"], "bad_request", "{method} {path} with {body}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("JSON object"), "{method} {path} with {body}: {message}");
            refused += 1;
        }
    }

    // Every frame type, sent as an array with its type first, and the other shapes.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("{}/v1/session", hale.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", support::ADMIN).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = json!({"type": "hello", "id": 1, "agent": "framer", "role": "r"});
    socket.send(Message::text(hello.to_string())).await.unwrap();
    assert_eq!(next_frame(&mut socket).await.unwrap()["type"], "welcome");
    let before = events(&hale).len().max(before.len());
    let mut frames: Vec<Value> = hale_proto::CLIENT_FRAME_TYPES
        .iter()
        .flat_map(|kind| [json!([kind, 77]), json!([kind, 1, "probe", true, "reason"]), json!([kind])])
        .collect();
    frames.extend(not_objects());
    for frame in &frames {
        socket.send(Message::text(frame.to_string())).await.unwrap();
        let answer = next_frame(&mut socket).await.expect("an answer");
        assert_eq!(answer["type"], "error", "{frame}: {answer}");
        assert_eq!(answer["code"], "bad_frame", "{frame}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("JSON object"), "{frame}: {answer}");
        refused += 1;
    }
    // The session still works.
    let ok = json!({"type": "checkpoint", "id": 5, "patch": {"fine": true}});
    socket.send(Message::text(ok.to_string())).await.unwrap();
    assert_eq!(next_frame(&mut socket).await.unwrap()["type"], "checkpointed");

    // Nothing was written but that last checkpoint (and what the detectors log of an
    // agent that does not beat, on a busy machine).
    let after = events(&hale);
    let new: Vec<&str> = after.iter().skip(before).map(|event| event["kind"].as_str().unwrap()).collect();
    let written: Vec<&&str> = new.iter().filter(|kind| !["agent_down", "progress_reported"].contains(kind)).collect();
    assert_eq!(written, [&"checkpointed"], "{new:?}");
    let state = hale.admin().state("probe", None).await.unwrap();
    assert_eq!(state.version, 0, "{state:?}");
    let agents = hale.admin().agents().await.unwrap();
    assert!(agents.iter().all(|agent| agent.quarantine.is_none()), "{agents:?}");
    let tasks = hale.admin().tasks().await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    println!("{refused} bodies and frames refused across {} routes and {} frame types", routes.len(), frames.len());
    beats.abort();
}

/// Sends raw `request` bytes, half-closes, and returns the whole answer.
async fn raw(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

fn head_of(method: &str, path: &str, extra: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{extra}\r\n", support::ADMIN)
}

fn error_code(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    let body: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON error body: {answer}"));
    body["error"]["code"].clone()
}

#[tokio::test]
async fn truncated_bodies_and_bad_chunks_get_400_and_an_oversized_head_431_with_a_json_body() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve_with_limits(temp.path(), "body_timeout_ms = 1500");
    let path = "/v1/agents/probe/hello";

    // Shorter than its Content-Length, then half-closed: 400, not 413.
    let mut request = head_of("POST", path, "Content-Type: application/json\r\nContent-Length: 100\r\n").into_bytes();
    request.extend_from_slice(br#"{"role": "r"}"#);
    let answer = raw(hale.addr, &request, true).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(error_code(&answer), "bad_request", "{answer}");
    assert!(answer.contains("ended early"), "{answer}");

    // Shorter than its Content-Length and left open: the body's deadline (408).
    let answer = raw(hale.addr, &request, false).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(error_code(&answer), "request_timeout", "{answer}");

    // A chunk size that is not hexadecimal: 400.
    let mut request =
        head_of("POST", path, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n").into_bytes();
    request.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    let answer = raw(hale.addr, &request, false).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(error_code(&answer), "bad_request", "{answer}");

    // Really over the limit: still 413.
    let big = format!("{{\"role\": \"{}\"}}", "x".repeat(1_000_000));
    let request = format!("{}{big}", head_of("POST", path, &format!("Content-Length: {}\r\n", big.len())));
    let answer = raw(hale.addr, request.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", &answer[..answer.len().min(300)]);
    assert_eq!(error_code(&answer), "body_too_large");

    // Headers too large, or too many: 431 with the JSON error body.
    let huge = head_of("GET", "/healthz", &format!("X-Big: {}\r\n", "y".repeat(600_000)));
    let answer = raw(hale.addr, huge.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{}", &answer[..answer.len().min(300)]);
    assert_eq!(error_code(&answer), "headers_too_large", "{answer}");
    let many: String = (0..200).map(|n| format!("X-H{n}: v\r\n")).collect();
    let answer = raw(hale.addr, head_of("GET", "/healthz", &many).as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(error_code(&answer), "headers_too_large", "{answer}");
    // A malformed request line: hyper's 400, with the body too.
    let answer = raw(hale.addr, b"GET\x01 / HTTP/1.1\r\n\r\n", false).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(error_code(&answer), "bad_request", "{answer}");

    // Nothing of it was written.
    assert!(events(&hale).iter().all(|event| event.to_string().find("probe").is_none()));
}

#[tokio::test]
async fn an_agent_is_answered_alike_for_a_missing_task_and_another_agents() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(&temp.path().join("data"), &[]);
    let admin = hale.admin();
    let alice = admin.issue_tokens("alice").await.unwrap();
    let submit = hale_client::HttpSubmitTask { role: "nobody".into(), ..Default::default() };
    let task = admin.submit(&submit).await.unwrap().task;
    let missing = task + 1000;
    let as_alice = |task: u64| {
        let (status, _, body) =
            support::http_as(hale.addr, Some(&alice.access_token), "GET", &format!("/v1/tasks/{task}"), b"");
        (status, body.replace(&task.to_string(), "N"))
    };
    let (existing, absent) = (as_alice(task), as_alice(missing));
    assert_eq!(existing, absent, "another agent's task {task} and a missing one answered differently");
    assert_eq!(existing.0, 404, "{existing:?}");
    assert!(existing.1.contains("unknown_task"), "{existing:?}");
    // Nor do the writes tell them apart: each is "not yours" (lease_lost), word for word.
    let hello =
        support::http_as(hale.addr, Some(&alice.access_token), "POST", "/v1/agents/alice/hello", br#"{"role":"r"}"#);
    assert_eq!(hello.0, 200, "{hello:?}");
    let body = br#"{"agent":"alice","incarnation":1,"name":"s","reason":"r"}"#;
    for route in ["intents", "steps", "complete", "fail"] {
        let write = |task: u64| {
            let path = format!("/v1/tasks/{task}/{route}");
            let (status, _, answer) = support::http_as(hale.addr, Some(&alice.access_token), "POST", &path, body);
            (status, answer.replace(&format!("task {task}"), "task N"))
        };
        let (existing, absent) = (write(task), write(missing));
        assert_eq!(existing, absent, "{route}: task {task} and a missing one answered differently");
        assert!(existing.1.contains("lease_lost"), "{route}: {existing:?}");
    }
    let reserve = |task: u64| {
        let body = format!(r#"{{"incarnation":1,"task":{task},"tokens":1}}"#);
        let path = "/v1/agents/alice/reservations";
        let (status, _, answer) = support::http_as(hale.addr, Some(&alice.access_token), "POST", path, body.as_bytes());
        (status, answer.replace(&format!("task {task}"), "task N"))
    };
    assert_eq!(reserve(task), reserve(missing));
    // The admin still tells them apart.
    assert_eq!(support::http(hale.addr, "GET", &format!("/v1/tasks/{task}"), b"").0, 200);
    assert_eq!(support::http(hale.addr, "GET", &format!("/v1/tasks/{missing}"), b"").0, 404);
}

/// The snapshots in `data`, by the sequence number each holds the state at.
fn snapshot_seqs(data: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(data.join("snapshots")) else { return Vec::new() };
    let mut seqs: Vec<u64> = entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_string_lossy().to_string();
            name.strip_prefix("snapshot-")?.strip_suffix(".bin")?.parse().ok()
        })
        .collect();
    seqs.sort();
    seqs
}

#[tokio::test]
async fn a_graceful_stop_that_logged_nothing_still_snapshots_the_tail_it_recovered() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let hale = serve(&data, &[]);
    let submit = hale_client::HttpSubmitTask { role: "nobody".into(), ..Default::default() };
    hale.admin().submit(&submit).await.unwrap();
    let logged = events(&hale);
    let last = logged.last().unwrap()["seq"].as_u64().unwrap();
    // Killed: no final snapshot, so the next start replays the log.
    hale.kill();
    assert!(snapshot_seqs(&data).iter().all(|seq| *seq < last), "{:?}", snapshot_seqs(&data));
    // A start that logs nothing, then a graceful stop: the recovered tail is snapshotted.
    let hale = serve(&data, &[]);
    assert_eq!(events(&hale).last().unwrap()["seq"].as_u64().unwrap(), last, "the second run logged something");
    assert!(hale.terminate().success());
    assert_eq!(snapshot_seqs(&data).last(), Some(&last), "no final snapshot at seq {last}");
    // The next start replays nothing.
    let hale = serve(&data, &[]);
    let (_, stderr) = hale.terminate_with_stderr();
    let plain = strip_colours(&stderr);
    let ready = plain.lines().find(|line| line.contains("hale is ready")).expect("a ready line");
    assert!(ready.contains(&format!("snapshot=Some({last})")) && ready.contains("replayed=0"), "{ready}");
}

/// `text` without the terminal's colour sequences (`ESC [ … m`).
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
