//! Failure hooks with `hale up` and real `demo-agent` processes: a SIGKILLed agent is
//! POSTed to a webhook served by the test, a failing webhook is retried (and one that
//! cannot be reached is given up on) while the agent is already back, a command hook gets
//! the event on stdin, and every outcome is in the log.

use crate::support::{self, HALE, eventually, up};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A hale.toml with one demo agent `worker` (restarted always) and `hooks` appended.
fn config(dir: &Path, hooks: &str) -> std::path::PathBuf {
    let args = serde_json::to_string(&["demo-agent", "worker", "--step-ms", "100"]).unwrap();
    let text =
        format!("[[agent]]\nname = \"worker\"\ncommand = \"{HALE}\"\nargs = {args}\nrestart = \"always\"\n\n{hooks}");
    let path = dir.join("hale.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// What the test's webhook answers, request by request (the last one repeats).
#[derive(Clone, Copy)]
enum Answer {
    /// Read the request and say nothing (the hook's timeout must end it).
    Hang,
    Status(u16),
}

/// A webhook receiver: a TCP listener speaking just enough HTTP/1.1.
struct Webhook {
    url: String,
    /// The JSON bodies received, with when they arrived (and the wall clock's ms then, to
    /// compare with the times in hale's log).
    received: Arc<Mutex<Vec<(Instant, u64, Value)>>>,
}

impl Webhook {
    async fn start(answers: Vec<Answer>) -> Webhook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hale", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let seen = seen.clone();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let Some(body) = read_request(&mut stream).await else { return };
                    let index = {
                        let mut seen = seen.lock().unwrap();
                        let wall_ms =
                            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                                as u64;
                        seen.push((Instant::now(), wall_ms, body));
                        seen.len() - 1
                    };
                    match answers[index.min(answers.len() - 1)] {
                        Answer::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
                        Answer::Status(status) => {
                            let response =
                                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            let _ = stream.write_all(response.as_bytes()).await;
                        }
                    }
                });
            }
        });
        Webhook { url, received }
    }

    fn bodies(&self) -> Vec<Value> {
        self.received.lock().unwrap().iter().map(|(_, _, body)| body.clone()).collect()
    }
}

/// Reads one request (headers, then Content-Length bytes) and returns its JSON body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Value> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
    assert!(head.starts_with("post /hale "), "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let length: usize = head.lines().find_map(|line| line.strip_prefix("content-length:"))?.trim().parse().ok()?;
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    serde_json::from_slice(&buffer[head_end..head_end + length]).ok()
}

/// The events of `kind` in the log.
fn events(hale: &support::Hale, kind: &str) -> Vec<Value> {
    let (status, body) = hale.get(&format!("/v1/events?kind={kind}"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `worker` runs `incarnation` (its process started), and returns its pid.
async fn running(admin: &hale_client::Admin, incarnation: u64) -> Pid {
    eventually(&format!("worker running as incarnation {incarnation}"), 30, || async {
        let agents = admin.agents().await.ok()?;
        let worker = agents.into_iter().find(|agent| agent.agent == "worker")?;
        let managed = worker.managed.as_ref()?;
        (worker.incarnation == incarnation && managed.status == "running")
            .then(|| Pid::from_raw(managed.pid.expect("a running agent has a pid") as i32))
    })
    .await
}

/// The seq of the `agent_down` of `worker`'s incarnation `incarnation`.
fn down_seq(hale: &support::Hale, incarnation: u64) -> u64 {
    let downs = events(hale, "agent_down");
    let down = downs.iter().find(|down| down["event"]["incarnation"] == incarnation).expect("the down is logged");
    down["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_posted_to_the_webhook_and_the_delivery_is_logged() {
    let temp = tempfile::tempdir().unwrap();
    let webhook = Webhook::start(vec![Answer::Status(204)]).await;
    let hooks =
        format!("[[hook]]\nname = \"pager\"\non = [\"agent.down\", \"agent.failed\"]\nwebhook = \"{}\"\n", webhook.url);
    let hale = up(&config(temp.path(), &hooks), &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running(&admin, 1).await;
    kill(pid, Signal::SIGKILL).unwrap();

    let body = eventually("the webhook called", 20, || async { webhook.bodies().into_iter().next() }).await;
    let seq = down_seq(&hale, 1);
    assert_eq!(body["hook"], "pager", "{body}");
    assert_eq!(body["kind"], "agent.down", "{body}");
    assert_eq!(body["agent"], "worker", "{body}");
    assert_eq!(body["seq"], seq, "{body}");
    assert!(body["at_ms"].as_u64().unwrap() > 0, "{body}");
    assert!(body["summary"].as_str().unwrap().contains("signal 9"), "{body}");
    assert_eq!(body["event"]["incarnation"], 1, "{body}");

    let delivered =
        eventually("hook_delivered in the log", 10, || async { events(&hale, "hook_delivered").into_iter().next() })
            .await;
    let logged = &delivered["event"];
    assert_eq!((logged["hook"].as_str(), logged["kind"].as_str()), (Some("pager"), Some("agent.down")), "{delivered}");
    assert_eq!((logged["seq"].as_u64(), logged["attempts"].as_u64()), (Some(seq), Some(1)), "{delivered}");

    let (status, listed) = hale.get("/v1/hooks");
    assert_eq!(status, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!((listed[0]["name"].as_str(), listed[0]["delivered"].as_u64()), (Some("pager"), Some(1)), "{listed}");
    assert_eq!(listed[0]["last_delivered"]["seq"], seq, "{listed}");
    // The hook's own event calls for no hook: only the one delivery, ever. Proof by order:
    // a hook delivers in log order, one at a time, so the down of a second kill (logged
    // after hook_delivered) is posted after anything hook_delivered could have called for.
    let pid = running(&admin, 2).await;
    kill(pid, Signal::SIGKILL).unwrap();
    let next = eventually("the second kill posted", 20, || async { webhook.bodies().into_iter().nth(1) }).await;
    assert_eq!((next["kind"].as_str(), next["event"]["incarnation"].as_u64()), (Some("agent.down"), Some(2)), "{next}");
    assert_eq!(webhook.bodies().len(), 2, "{:?}", webhook.bodies());
    // A clean stop of the agents is no failure: nobody is paged for it.
    assert!(hale.terminate().success());
    assert_eq!(webhook.bodies().len(), 2, "{:?}", webhook.bodies());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_retried_and_given_up_on_while_the_agent_is_already_back() {
    let temp = tempfile::tempdir().unwrap();
    // The first attempt hangs until the hook's 3 s timeout, the second gets a 500, the third a 200.
    let webhook = Webhook::start(vec![Answer::Hang, Answer::Status(500), Answer::Status(200)]).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hale", listener.local_addr().unwrap())
    };
    let hooks = format!(
        "[[hook]]\nname = \"slow\"\non = [\"agent.down\"]\nwebhook = \"{}\"\ntimeout_ms = 3000\nretries = 2\nbackoff_ms = 50\n\n\
         [[hook]]\nname = \"gone\"\non = [\"agent.down\"]\nwebhook = \"{closed}\"\ntimeout_ms = 1000\nretries = 1\nbackoff_ms = 20\n",
        webhook.url
    );
    let hale = up(&config(temp.path(), &hooks), &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running(&admin, 1).await;
    kill(pid, Signal::SIGKILL).unwrap();

    // The restart does not wait for the hook: incarnation 2 runs while the first attempt
    // still hangs (for its 3 s timeout), before any retry (checked below, on hale's clock
    // and in log order, not on when this test happened to look).
    running(&admin, 2).await;
    let started = events(&hale, "process_started");
    let second = started.iter().find(|event| event["event"]["incarnation"] == 2).expect("incarnation 2 started");

    let delivered = eventually("hook_delivered after the retries", 20, || async {
        events(&hale, "hook_delivered").into_iter().next()
    })
    .await;
    let seq = down_seq(&hale, 1);
    assert!(second["seq"].as_u64() < delivered["seq"].as_u64(), "started before the hook was delivered");
    let retried_ms = webhook.received.lock().unwrap().get(1).map(|(_, wall_ms, _)| *wall_ms).expect("a retry");
    let started_ms = second["at_ms"].as_u64().unwrap();
    assert!(started_ms <= retried_ms, "incarnation 2 started at {started_ms}, after the first retry at {retried_ms}");
    assert_eq!(delivered["event"]["hook"], "slow", "{delivered}");
    assert_eq!((delivered["event"]["seq"].as_u64(), delivered["event"]["attempts"].as_u64()), (Some(seq), Some(3)));
    let bodies = webhook.bodies();
    assert_eq!(bodies.len(), 3, "three attempts: {bodies:?}");
    assert!(bodies.iter().all(|body| body["seq"] == seq && body["kind"] == "agent.down"), "{bodies:?}");
    let attempts: Vec<Instant> = webhook.received.lock().unwrap().iter().map(|(at, _, _)| *at).collect();
    assert!(attempts[1] - attempts[0] >= Duration::from_millis(2900), "the first attempt waited for its timeout");

    let failed =
        eventually("hook_failed for the closed port", 20, || async { events(&hale, "hook_failed").into_iter().next() })
            .await;
    let logged = &failed["event"];
    assert_eq!((logged["hook"].as_str(), logged["seq"].as_u64()), (Some("gone"), Some(seq)), "{failed}");
    assert_eq!(logged["attempts"], 2, "one try and one retry: {failed}");
    assert!(!logged["error"].as_str().unwrap().is_empty(), "{failed}");
    let (_, listed) = hale.get("/v1/hooks");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!((listed[1]["name"].as_str(), listed[1]["failed"].as_u64()), (Some("gone"), Some(1)), "{listed}");
    assert!(hale.stderr_shows("hook FAILED"), "{}", hale.stderr());
    assert!(hale.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_under_way_when_hale_is_sigkilled_is_made_after_the_restart() {
    let temp = tempfile::tempdir().unwrap();
    // The down is delivered; the restart's delivery hangs until hale is killed; the one
    // made after the restart is answered.
    let webhook = Webhook::start(vec![Answer::Status(204), Answer::Hang, Answer::Status(204)]).await;
    let hooks = format!(
        "[[hook]]\nname = \"pager\"\non = [\"agent.down\", \"agent.restarted\"]\nwebhook = \"{}\"\ntimeout_ms = 20000\nretries = 0\n",
        webhook.url
    );
    let config = config(temp.path(), &hooks);
    let data = temp.path().join("data");
    let listen = support::free_address();
    let hale = up(&config, &data, &listen);
    let admin = hale.admin();
    let pid = running(&admin, 1).await;
    kill(pid, Signal::SIGKILL).unwrap();
    running(&admin, 2).await;
    eventually("the restart's delivery under way", 20, || async { (webhook.bodies().len() >= 2).then_some(()) }).await;
    let down = down_seq(&hale, 1);
    let restarted = webhook.bodies()[1]["seq"].as_u64().unwrap();
    assert_eq!(webhook.bodies()[1]["kind"], "agent.restarted", "{:?}", webhook.bodies());
    eventually("the down's delivery logged", 10, || async {
        events(&hale, "hook_delivered").iter().any(|logged| logged["event"]["seq"] == down).then_some(())
    })
    .await;
    hale.kill();

    let hale = up(&config, &data, &listen);
    let again = eventually("the owed delivery made after the restart", 20, || async {
        webhook.bodies().into_iter().skip(2).find(|body| body["seq"] == restarted)
    })
    .await;
    assert_eq!(again["kind"], "agent.restarted", "{again}");
    // What was delivered before the kill is not delivered again. Proof by order: what is
    // owed is queued again in log order and delivered one at a time, so a second delivery
    // of the down (logged before the restart) would have come before this one.
    let downs = webhook.bodies().iter().filter(|body| body["seq"] == down).count();
    assert_eq!(downs, 1, "{:?}", webhook.bodies());
    let delivered = eventually("its outcome logged", 10, || async {
        events(&hale, "hook_delivered").into_iter().find(|logged| logged["event"]["seq"] == restarted)
    })
    .await;
    assert_eq!(delivered["event"]["hook"], "pager", "{delivered}");
    assert!(hale.stderr_shows("owed from before this start"), "{}", hale.stderr());
    assert!(hale.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_hook_gets_the_event_on_stdin_and_in_its_environment() {
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("told.json");
    let script = "cat > \"$0.tmp\" && env | grep '^HALE_HOOK_' | sort > \"$0.env\" && mv \"$0.tmp\" \"$0\"";
    let argv = serde_json::to_string(&["/bin/sh", "-c", script, out.to_str().unwrap()]).unwrap();
    let hooks = format!("[[hook]]\nname = \"notify\"\non = [\"agent.down\"]\ncommand = {argv}\n");
    let hale = up(&config(temp.path(), &hooks), &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running(&admin, 1).await;
    kill(pid, Signal::SIGKILL).unwrap();

    let told = eventually("the command wrote its stdin", 20, || async { std::fs::read_to_string(&out).ok() }).await;
    let body: Value = serde_json::from_str(&told).unwrap();
    let seq = down_seq(&hale, 1);
    assert_eq!((body["hook"].as_str(), body["kind"].as_str()), (Some("notify"), Some("agent.down")), "{body}");
    assert_eq!((body["agent"].as_str(), body["seq"].as_u64()), (Some("worker"), Some(seq)), "{body}");
    let env = std::fs::read_to_string(temp.path().join("told.json.env")).unwrap();
    let expected =
        format!("HALE_HOOK_AGENT=worker\nHALE_HOOK_KIND=agent.down\nHALE_HOOK_NAME=notify\nHALE_HOOK_SEQ={seq}\n");
    assert_eq!(env, expected);
    let delivered =
        eventually("hook_delivered", 10, || async { events(&hale, "hook_delivered").into_iter().next() }).await;
    assert_eq!((delivered["event"]["hook"].as_str(), delivered["event"]["seq"].as_u64()), (Some("notify"), Some(seq)));
    assert!(hale.terminate().success());
}

#[test]
fn an_unknown_hook_kind_is_refused_with_its_line_and_the_valid_kinds() {
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("hale.toml");
    std::fs::write(
        &path,
        "[[hook]]\nname = \"pager\"\non = [\"agent.down\", \"agent.exploded\"]\nwebhook = \"http://127.0.0.1:9/\"\n",
    )
    .unwrap();
    let (code, out, err) = support::hale(&["check", "-c", path.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("\"agent.exploded\""), "{err}");
    assert!(err.contains("agent.down, agent.failed, agent.stalled, agent.quarantined"), "{err}");
}

/// One POST an HTTPS receiver got: its headers (lowercase names) and its raw body.
#[derive(Clone, Debug)]
struct SignedPost {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl SignedPost {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// An HTTPS webhook receiver on loopback with a certificate of its own (self-signed: the
/// test hands it to hale as `SSL_CERT_FILE`, the CA bundle hale must trust); answers 204.
async fn https_receiver(dir: &Path) -> (String, std::path::PathBuf, Arc<Mutex<Vec<SignedPost>>>) {
    use tokio_rustls::rustls;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let ca_file = dir.join("webhook-ca.pem");
    std::fs::write(&ca_file, made.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}/hale", listener.local_addr().unwrap().port());
    let received = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake here.
                let Ok(mut stream) = acceptor.accept(stream).await else { return };
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                        break end + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
                let headers: Vec<(String, String)> = head
                    .lines()
                    .skip(1)
                    .filter_map(|line| line.split_once(':'))
                    .map(|(key, value)| (key.trim().to_lowercase(), value.trim().to_string()))
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(key, _)| key == "content-length")
                    .and_then(|(_, value)| value.parse().ok())
                    .unwrap_or(0);
                while buffer.len() < head_end + length {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                }
                let body = buffer[head_end..head_end + length].to_vec();
                seen.lock().unwrap().push(SignedPost { headers, body });
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, ca_file, received)
}

/// What a receiver computes: `sha256=` and the hex HMAC-SHA256 of `{timestamp}.{body}`.
fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    format!("sha256={}", tag.as_ref().iter().map(|byte| format!("{byte:02x}")).collect::<String>())
}

#[tokio::test]
async fn an_https_webhook_trusted_through_ssl_cert_file_gets_a_signature_the_receiver_can_check() {
    let temp = tempfile::tempdir().unwrap();
    let (url, ca_file, received) = https_receiver(temp.path()).await;
    let secret = "a-shared-secret-3c9e1f";
    std::fs::write(temp.path().join("pager.secret"), format!("{secret}\n")).unwrap();
    let hooks = format!(
        "[[hook]]\nname = \"pager\"\non = [\"agent.down\"]\nwebhook = \"{url}\"\nsecret_file = \"pager.secret\"\nretries = 0\n"
    );
    let config = config(temp.path(), &hooks);

    // Without SSL_CERT_FILE the receiver's certificate is trusted by nothing: the delivery fails.
    let untrusted = {
        let mut command = std::process::Command::new(HALE);
        command.args(["up", "-c"]).arg(&config).arg("--data").arg(temp.path().join("data-untrusted"));
        command.args(["--listen", "127.0.0.1:0"]).env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        support::serve_with_command(command).expect("hale up starts")
    };
    kill_worker_and_wait_for_the_hook(&untrusted, "last_failed").await;
    let (_, status) = untrusted.get("/v1/hooks");
    assert!(status.contains("certificate") || status.contains("Certificate"), "an untrusted certificate: {status}");
    assert!(received.lock().unwrap().is_empty(), "nothing reached the receiver");
    assert!(untrusted.terminate().success());

    // With SSL_CERT_FILE naming its CA, it is delivered, signed.
    let trusted = {
        let mut command = std::process::Command::new(HALE);
        command.args(["up", "-c"]).arg(&config).arg("--data").arg(temp.path().join("data"));
        command.args(["--listen", "127.0.0.1:0"]).env("SSL_CERT_FILE", &ca_file).env_remove("SSL_CERT_DIR");
        support::serve_with_command(command).expect("hale up starts")
    };
    let sent_after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    kill_worker_and_wait_for_the_hook(&trusted, "last_delivered").await;
    let post = received.lock().unwrap().first().cloned().expect("the receiver got the POST");
    let body: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!((body["hook"].as_str(), body["kind"].as_str()), (Some("pager"), Some("agent.down")), "{body}");
    let timestamp = post.header("x-hale-timestamp").expect("a timestamp header");
    let seconds: u64 = timestamp.parse().expect("seconds since the epoch");
    assert!(seconds + 1 >= sent_after && seconds <= sent_after + 60, "a current timestamp: {seconds} vs {sent_after}");
    let signature = post.header("x-hale-signature").expect("a signature header");
    assert_eq!(signature, expected_signature(secret.as_bytes(), timestamp, &post.body), "the receiver's HMAC matches");
    assert_ne!(signature, expected_signature(b"another-secret", timestamp, &post.body), "a wrong secret does not");
    let other_time = (seconds + 1).to_string();
    assert_ne!(signature, expected_signature(secret.as_bytes(), &other_time, &post.body), "the time is signed too");
    assert!(trusted.terminate().success());
}

/// SIGKILLs the running `worker` of `hale`, then waits until the pager hook's status in
/// `GET /v1/hooks` has `field` (`last_delivered` or `last_failed`).
async fn kill_worker_and_wait_for_the_hook(hale: &support::Hale, field: &str) {
    let admin = hale.admin();
    let pid = eventually("the worker running", 30, || async {
        let agents = admin.agents().await.ok()?;
        agents.into_iter().find(|agent| agent.agent == "worker")?.managed?.pid
    })
    .await;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually(&format!("the pager hook's {field}"), 30, || async {
        let (status, body) = hale.get("/v1/hooks");
        let hooks: Value = serde_json::from_str(&body).ok()?;
        let found = hooks.as_array()?.iter().any(|hook| !hook[field].is_null());
        (status == 200 && found).then_some(())
    })
    .await;
}
