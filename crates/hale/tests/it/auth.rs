//! Authentication and authorization on the real binary: the admin token made at first
//! start and found by the CLI; issue, refresh (rotation, reuse), revoke ending sessions;
//! and a matrix of every route and frame against forged, expired, revoked and other
//! agents' tokens.

use crate::support::{self, ADMIN, HALE, http_as, serve};
use base64::Engine;
use hale_client::{Admin, AgentOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT with these claims, signed with the server's own key (as a forger who stole it
/// could), so only the claims are wrong.
fn forge(key: &str, algorithm: Algorithm, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &EncodingKey::from_secret(key.as_bytes())).unwrap()
}

fn claims(agent: &str, iat: u64, nbf: u64, exp: u64) -> Value {
    json!({"iss": "hale", "aud": "hale-agent", "sub": agent, "iat": iat, "nbf": nbf, "exp": exp, "jti": "x", "gen": 0})
}

#[test]
fn the_admin_token_is_made_at_first_start_and_the_cli_finds_it() {
    let temp = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(HALE);
    command.env("HALE_ADMIN_TOKEN", "");
    let hale = support::serve_with(command, temp.path(), &[]).unwrap();
    let file = temp.path().join("admin.token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin token is readable by its owner only");
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    let (status, _, body) = http_as(hale.addr, None, "GET", "/v1/agents", b"");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthenticated") && body.contains("Bearer"), "{body}");
    let (status, _, body) = http_as(hale.addr, Some(&token), "GET", "/v1/agents", b"");
    assert_eq!(status, 200, "{body}");
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(http_as(hale.addr, None, "GET", probe, b"").0, 200, "{probe} needs no token");
    }
    // The CLI on the same machine finds the token in the data directory by itself.
    let cli = |args: &[&str]| {
        std::process::Command::new(HALE).args(args).env_remove("HALE_TOKEN").output().expect("running hale")
    };
    let url = hale.http_url();
    let found = cli(&["agents", "--server", &url, "--data", temp.path().to_str().unwrap()]);
    assert!(found.status.success(), "{}", String::from_utf8_lossy(&found.stderr));
    let lost = cli(&["agents", "--server", &url, "--data", "/nonexistent"]);
    assert!(!lost.status.success());
    assert!(String::from_utf8_lossy(&lost.stderr).contains("unauthenticated"));
}

#[tokio::test]
async fn tokens_refresh_by_rotation_a_reused_refresh_token_revokes_and_revoke_ends_sessions() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let pair = admin.issue_tokens("bob").await.unwrap();
    // Bob's own token works for bob, over HTTP and a session.
    let bob = Admin::new(&hale.http_url()).with_token(&pair.access_token);
    let (status, _, body) =
        http_as(hale.addr, Some(&pair.access_token), "POST", "/v1/agents/bob/hello", br#"{"role": "r"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(bob.state("bob", None).await.unwrap().version, 0);
    // Rotation: the refresh token works once.
    let refresh = |token: &str| {
        let body = json!({"agent": "bob", "refresh_token": token}).to_string();
        http_as(hale.addr, None, "POST", "/v1/auth/refresh", body.as_bytes())
    };
    let (status, _, body) = refresh(&pair.refresh_token);
    assert_eq!(status, 200, "{body}");
    let rotated: Value = serde_json::from_str(&body).unwrap();
    let (status, _, body) = refresh(rotated["refresh_token"].as_str().unwrap());
    assert_eq!(status, 200, "{body}");
    let latest: Value = serde_json::from_str(&body).unwrap();
    // A session on the latest access token.
    let session = hale_client::Agent::connect(
        &hale.ws_url(),
        AgentOptions::new("bob", "r").token(latest["access_token"].as_str().unwrap()),
    )
    .await
    .unwrap();
    session.resume().await.unwrap();
    // The first, rotated-out refresh token comes back: someone copied it. Everything is
    // revoked, the live session ends, and every token of bob stops working.
    let (status, _, body) = refresh(rotated["refresh_token"].as_str().unwrap());
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token_revoked"), "{body}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), session.ended()).await.unwrap();
    assert!(ended.contains("tokens revoked"), "{ended}");
    for token in [&pair.access_token, latest["access_token"].as_str().unwrap()] {
        let (status, _, body) = http_as(hale.addr, Some(token), "GET", "/v1/agents/bob/state", b"");
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("token_revoked"), "{body}");
    }
    let (status, _, body) = refresh(latest["refresh_token"].as_str().unwrap());
    assert_eq!(status, 401, "{body}");
    // New tokens from the operator work again; `hale token revoke` ends them too.
    let again = admin.issue_tokens("bob").await.unwrap();
    assert_eq!(
        Admin::new(&hale.http_url()).with_token(&again.access_token).state("bob", None).await.unwrap().agent,
        "bob"
    );
    let (code, out, err) = support::hale(&["token", "revoke", "bob", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (status, _, _) = http_as(hale.addr, Some(&again.access_token), "GET", "/v1/agents/bob/state", b"");
    assert_eq!(status, 401);
    // The refresh hashes are in the log, never the tokens.
    let db = std::fs::read(temp.path().join("hale.db")).unwrap();
    let wal = std::fs::read(temp.path().join("hale.db-wal")).unwrap_or_default();
    for token in [&pair.refresh_token, &again.refresh_token] {
        let needle = token.as_bytes();
        assert!(!db.windows(needle.len()).any(|window| window == needle), "a refresh token is in the log");
        assert!(!wal.windows(needle.len()).any(|window| window == needle), "a refresh token is in the WAL");
    }
}

/// Every route, with bob as the owner of what it touches (`admin_only` routes refuse any
/// agent's token).
fn routes() -> Vec<(&'static str, &'static str, Value, bool)> {
    let bob = |extra: Value| {
        let mut body = json!({"agent": "bob", "incarnation": 1});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    vec![
        ("GET", "/v1/agents", Value::Null, true),
        ("GET", "/v1/agents/bob", Value::Null, false),
        ("GET", "/v1/agents/bob/state", Value::Null, false),
        ("POST", "/v1/agents/bob/hello", json!({"role": "r", "incarnation": 1}), false),
        ("POST", "/v1/agents/bob/checkpoint", json!({"incarnation": 1, "patch": {"x": 1}}), false),
        ("POST", "/v1/agents/bob/recovery-points", json!({"incarnation": 1, "name": "p"}), false),
        ("POST", "/v1/agents/bob/rollback", json!({"incarnation": 1, "to": {"version": 0}}), false),
        ("POST", "/v1/agents/bob/heartbeat", json!({"incarnation": 1}), false),
        ("POST", "/v1/agents/bob/errors", json!({"incarnation": 1}), false),
        ("POST", "/v1/agents/bob/violations", json!({"reason": "x", "by": "bob"}), false),
        ("POST", "/v1/agents/bob/restart", Value::Null, true),
        ("POST", "/v1/agents/bob/stop", Value::Null, true),
        ("POST", "/v1/agents/bob/quarantine", json!({"reason": "x"}), true),
        ("POST", "/v1/agents/bob/release", Value::Null, true),
        ("GET", "/v1/agents/bob/tasks", Value::Null, false),
        ("POST", "/v1/agents/bob/reservations", json!({"incarnation": 1, "tokens": 1}), false),
        ("POST", "/v1/agents/bob/spend", json!({"incarnation": 1, "tokens": 1}), false),
        ("POST", "/v1/agents/bob/messages", json!({"incarnation": 1, "to": {"agent": "alice"}, "body": 1}), false),
        ("GET", "/v1/agents/bob/mailbox", Value::Null, false),
        ("POST", "/v1/agents/bob/mailbox/ack", json!({"incarnation": 1, "seq": 1}), false),
        ("POST", "/v1/agents/bob/conversations/c-1/end", json!({"incarnation": 1}), false),
        ("POST", "/v1/agents/bob/tokens", Value::Null, true),
        ("POST", "/v1/agents/bob/tokens/revoke", Value::Null, true),
        ("GET", "/v1/tasks", Value::Null, true),
        ("GET", "/v1/tasks/1", Value::Null, false),
        ("POST", "/v1/tasks/1/cancel", Value::Null, true),
        ("POST", "/v1/tasks/1/intents", bob(json!({"name": "s"})), false),
        ("POST", "/v1/tasks/1/steps", bob(json!({"name": "s", "result": 1})), false),
        ("POST", "/v1/tasks/1/complete", bob(json!({"result": 1})), false),
        ("POST", "/v1/tasks/1/fail", bob(json!({"reason": "x"})), false),
        ("GET", "/v1/status", Value::Null, true),
        ("GET", "/v1/events", Value::Null, true),
        ("GET", "/v1/events/stream", Value::Null, true),
        ("GET", "/v1/hooks", Value::Null, true),
        ("POST", "/v1/tasks", json!({"role": "r"}), false),
        ("GET", "/v1/session", Value::Null, false),
    ]
}

#[tokio::test]
async fn an_authorization_matrix_of_every_route_and_frame_refuses_all_but_the_owner() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let admin = hale.admin();
    let key = std::fs::read_to_string(temp.path().join("signing.key")).unwrap().trim().to_string();
    let alice = admin.issue_tokens("alice").await.unwrap();
    let bob = admin.issue_tokens("bob").await.unwrap();
    let carol = admin.issue_tokens("carol").await.unwrap();
    admin.revoke_tokens("carol").await.unwrap();
    // bob runs and holds task 1 (alice says hello but only bob beats, so bob is leased it).
    for (agent, token) in [("bob", &bob.access_token), ("alice", &alice.access_token)] {
        let path = format!("/v1/agents/{agent}/hello");
        assert_eq!(http_as(hale.addr, Some(token), "POST", &path, br#"{"role": "r"}"#).0, 200);
    }
    let beat = br#"{"incarnation": 1}"#;
    assert_eq!(http_as(hale.addr, Some(&bob.access_token), "POST", "/v1/agents/bob/heartbeat", beat).0, 200);
    let (status, _, body) = http_as(hale.addr, Some(ADMIN), "POST", "/v1/tasks", br#"{"role": "r"}"#);
    assert_eq!(status, 200, "{body}");
    support::eventually("task 1 leased", 10, || async {
        let task = admin.task(1).await.ok()?;
        (task.status == "running").then_some(())
    })
    .await;
    assert_eq!(admin.task(1).await.unwrap().agent.as_deref(), Some("bob"));

    let t = now();
    let valid = forge(&key, Algorithm::HS256, claims("bob", t, t, t + 600));
    let (header, payload, signature) = {
        let mut parts = valid.split('.');
        (parts.next().unwrap().to_string(), parts.next().unwrap().to_string(), parts.next().unwrap().to_string())
    };
    let mut tampered_claims = claims("bob", t, t, t + 600);
    tampered_claims["sub"] = json!("alice");
    let mut bad: Vec<(String, String)> = vec![
        ("garbage".into(), "not-a-token".into()),
        ("expired".into(), forge(&key, Algorithm::HS256, claims("bob", t - 7200, t - 7200, t - 3600))),
        ("not yet valid".into(), forge(&key, Algorithm::HS256, claims("bob", t, t + 3600, t + 7200))),
        (
            "wrong audience".into(),
            forge(&key, Algorithm::HS256, {
                let mut c = claims("bob", t, t, t + 600);
                c["aud"] = json!("someone-else");
                c
            }),
        ),
        (
            "wrong issuer".into(),
            forge(&key, Algorithm::HS256, {
                let mut c = claims("bob", t, t, t + 600);
                c["iss"] = json!("evil");
                c
            }),
        ),
        ("HS512 (algorithm confusion)".into(), forge(&key, Algorithm::HS512, claims("bob", t, t, t + 600))),
        (
            "RS256 header, HMAC signature".into(),
            format!("{}.{payload}.{signature}", b64(br#"{"alg":"RS256","typ":"JWT"}"#)),
        ),
        ("tampered payload".into(), format!("{header}.{}.{signature}", b64(tampered_claims.to_string().as_bytes()))),
        ("signed with another key".into(), forge("another-key", Algorithm::HS256, claims("bob", t, t, t + 600))),
        ("revoked (carol)".into(), carol.access_token.clone()),
        ("a refresh token".into(), bob.refresh_token.clone()),
    ];
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        bad.push((format!("alg {alg}"), format!("{header}.{payload}.")));
    }
    let mut cells = 0;
    for (method, path, body, admin_only) in routes() {
        let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let (status, _, answer) = http_as(hale.addr, None, method, path, &body);
        assert_eq!(status, 401, "{method} {path} without a token: {answer}");
        cells += 1;
        for (what, token) in &bad {
            let (status, _, answer) = http_as(hale.addr, Some(token), method, path, &body);
            assert_eq!(status, 401, "{method} {path} with {what}: {answer}");
            cells += 1;
        }
        // Another agent's valid token: refused wherever the resource is bob's (a session
        // is bound to an agent by its hello: the frames below check that).
        if (method, path) == ("GET", "/v1/tasks/1") {
            // Another agent's task reads as one that does not exist: no task numbers leak.
            let (status, _, answer) = http_as(hale.addr, Some(&alice.access_token), method, path, &body);
            assert_eq!(status, 404, "{method} {path} with alice's token: {answer}");
            assert!(answer.contains("unknown_task"), "{answer}");
            cells += 1;
        } else if path != "/v1/tasks" && path != "/v1/session" {
            let (status, _, answer) = http_as(hale.addr, Some(&alice.access_token), method, path, &body);
            assert_eq!(status, 403, "{method} {path} with alice's token: {answer}");
            assert!(answer.contains("forbidden"), "{answer}");
            cells += 1;
        }
        // The owner's token: refused only where the admin is needed.
        let owner_may = !admin_only;
        if path == "/v1/session" || path.ends_with("/tokens/revoke") {
            continue;
        }
        let (status, _, answer) = http_as(hale.addr, Some(&bob.access_token), method, path, &body);
        if owner_may {
            assert!(status != 401 && status != 403, "{method} {path} with bob's own token: {status} {answer}");
        } else {
            assert_eq!(status, 403, "{method} {path} with bob's token: {answer}");
        }
        cells += 1;
    }

    // Frames: alice's session cannot speak for bob, nor touch bob's lease or budget.
    let version_before = admin.state("bob", None).await.unwrap().version;
    let steps_before = admin.task(1).await.unwrap().steps.len();
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let mut request = format!("{}/v1/session", hale.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", alice.access_token).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut ask = async |frame: Value| -> Value {
        socket.send(Message::text(frame.to_string())).await.unwrap();
        loop {
            if let Some(Ok(Message::Text(text))) = socket.next().await {
                let answer: Value = serde_json::from_str(&text).unwrap();
                // Unasked frames (bob's message to alice, sent in the route matrix) are not answers.
                if answer["type"] != "message" {
                    return answer;
                }
            }
        }
    };
    let answer = ask(json!({"type": "hello", "id": 1, "agent": "bob", "role": "r"})).await;
    assert_eq!(answer["code"], "forbidden", "{answer}");
    cells += 1;
    let answer = ask(json!({"type": "hello", "id": 2, "agent": "alice", "role": "r", "incarnation": 1})).await;
    assert_eq!(answer["type"], "welcome", "{answer}");
    {
        let frames = [
            json!({"type": "commit_step", "id": 3, "task": 1, "name": "s", "result": 1}),
            json!({"type": "intend_step", "id": 4, "task": 1, "name": "s"}),
            json!({"type": "complete", "id": 5, "task": 1, "result": 1}),
            json!({"type": "fail", "id": 6, "task": 1, "reason": "x"}),
            json!({"type": "reserve", "id": 7, "task": 1, "tokens": 1}),
            json!({"type": "report_spend", "id": 8, "task": 1, "tokens": 1}),
        ];
        for frame in frames {
            let answer = ask(frame.clone()).await;
            assert_eq!(answer["code"], "lease_lost", "{frame} from alice: {answer}");
            cells += 1;
        }
    }
    let answer = ask(json!({"type": "report_violation", "id": 9, "agent": "bob", "reason": "x"})).await;
    assert_eq!(answer["type"], "ok", "an agent may report another, as itself: {answer}");
    let violations = admin.agents().await.unwrap().into_iter().find(|agent| agent.agent == "bob").unwrap();
    assert!(violations.quarantine.is_none());
    // An auth frame renews the session's own token only: every bad token and bob's are
    // refused, and the session goes on.
    let refused = ["token_invalid", "token_expired", "token_not_yet_valid", "token_revoked"];
    for (what, token) in &bad {
        let answer = ask(json!({"type": "auth", "id": 10, "token": token})).await;
        assert!(refused.contains(&answer["code"].as_str().unwrap_or_default()), "auth with {what}: {answer}");
        cells += 1;
    }
    let answer = ask(json!({"type": "auth", "id": 11, "token": bob.access_token})).await;
    assert_eq!(answer["code"], "forbidden", "alice's session renewed with bob's token: {answer}");
    cells += 1;
    let answer = ask(json!({"type": "auth", "id": 12, "token": alice.access_token})).await;
    assert_eq!(answer["type"], "ok", "{answer}");
    // Nothing of bob's changed through alice: no version, no step.
    assert_eq!(admin.state("bob", None).await.unwrap().version, version_before);
    assert_eq!(admin.task(1).await.unwrap().steps.len(), steps_before);
    println!("authorization matrix: {cells} cells checked");
    assert!(cells > 400, "{cells}");
}

#[tokio::test]
async fn a_session_lasts_as_long_as_its_token_unless_the_client_renews_it_in_band() {
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, "[server]\naccess_token_ttl_s = 2\n").unwrap();
    let hale = serve(temp.path(), &["-c", config.to_str().unwrap()]);
    let admin = hale.admin();

    // The Rust client, without reconnects (a closed session would end it), renews in band.
    let pair = admin.issue_tokens("dave").await.unwrap();
    let options = AgentOptions::new("dave", "r").tokens(&pair.access_token, &pair.refresh_token);
    let credentials = options.credentials.clone();
    let dave = hale_client::Agent::connect(&hale.ws_url(), options).await.unwrap();
    dave.resume().await.unwrap();

    // A session that never renews is closed (4002) when its token and the 5 s leeway for
    // clock skew run out.
    let stale = admin.issue_tokens("carol").await.unwrap();
    let mut request = format!("{}/v1/session", hale.ws_url()).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", stale.access_token).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::text(json!({"type": "hello", "id": 1, "agent": "carol", "role": "r"}).to_string()))
        .await
        .unwrap();
    let close = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = socket.next().await {
            if let Ok(Message::Close(frame)) = message {
                return frame;
            }
        }
        None
    })
    .await
    .expect("closed within 30 s")
    .expect("a close frame");
    assert_eq!(u16::from(close.code), 4002, "{close:?}");
    assert!(close.reason.as_str().contains("expired"), "{close:?}");

    // By now dave's first token is past its expiry too: the session lives on a renewed one.
    assert!(now() >= hale_token_expiry(&pair.access_token) + 5);
    assert_ne!(credentials.access().unwrap(), pair.access_token, "renewed");
    assert_eq!(dave.checkpoint(json!({"alive": true})).await.unwrap(), 1, "the same session still works");
    assert!(tokio::time::timeout(Duration::ZERO, dave.ended()).await.is_err(), "never ended");
}

/// The `exp` of one of hale's access tokens.
fn hale_token_expiry(token: &str) -> u64 {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["exp"].as_u64().unwrap()
}

#[tokio::test]
async fn a_quarantined_agents_session_stays_open_and_refuses_what_reaches_others() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let pair = hale.admin().issue_tokens("mallory").await.unwrap();
    let options = AgentOptions::new("mallory", "r").tokens(&pair.access_token, &pair.refresh_token);
    let session = hale_client::Agent::connect(&hale.ws_url(), options).await.unwrap();
    session.resume().await.unwrap();
    hale.admin().quarantine("mallory", "exfiltrated a key").await.unwrap();
    // The same session: its checkpoint lands, its submit is refused.
    session.checkpoint(json!({"note": "still mine"})).await.expect("checkpoints on the same session");
    let task = hale_client::HttpSubmitTask { role: "r".into(), payload: json!({}), ..Default::default() };
    let refused = session.submit(task).await.unwrap_err();
    assert_eq!(refused.code(), Some("quarantined"), "{refused}");
    // A revoke still ends it.
    hale.admin().revoke_tokens("mallory").await.unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), session.ended()).await.unwrap();
    assert!(ended.contains("tokens revoked"), "{ended}");
}
