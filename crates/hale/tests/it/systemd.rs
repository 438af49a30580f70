//! hale under systemd's `Type=notify`, with the test playing systemd's part: a datagram
//! socket bound where `NOTIFY_SOCKET` points, as systemd binds it, and `WATCHDOG_USEC`
//! set. systemd itself is not run.

use crate::support::{self, HALE, eventually};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A datagram hale sent, when it arrived, and whether `/healthz` answered 200 right then
/// (asked only when the datagram says `READY=1`).
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    text: String,
    healthz_at_ready: Option<u16>,
}

/// Reads every datagram on `socket` into `log` until `done`; on `READY=1` asks `/healthz`
/// at `addr` at once.
fn collect(socket: UnixDatagram, addr: std::net::SocketAddr, log: Arc<Mutex<Vec<Received>>>, done: Arc<Mutex<bool>>) {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buffer = [0u8; 4096];
    while !*done.lock().unwrap() {
        let Ok(n) = socket.recv(&mut buffer) else { continue };
        let at = Instant::now();
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        let healthz_at_ready =
            text.lines().any(|line| line == "READY=1").then(|| support::http(addr, "GET", "/healthz", b"").0);
        log.lock().unwrap().push(Received { at, text, healthz_at_ready });
    }
}

fn environ(pid: u32) -> Vec<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    bytes.split(|byte| *byte == 0).map(|var| String::from_utf8_lossy(var).into_owned()).collect()
}

#[tokio::test]
async fn hale_notifies_systemd_ready_once_it_serves_pings_the_watchdog_and_says_it_stops() {
    let temp = tempfile::tempdir().unwrap();
    let socket_path = temp.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let hook_env = temp.path().join("hook.env");
    let config = temp.path().join("hale.toml");
    std::fs::write(
        &config,
        format!(
            "[supervision]\nstop_grace_ms = 500\n\n[[agent]]\nname = \"worker\"\ncommand = \"{HALE}\"\nargs = [\"demo-agent\", \"worker\", \"--step-ms\", \"100\"]\n\n\
             [[hook]]\nname = \"env\"\non = [\"agent.down\"]\ncommand = [\"/bin/sh\", \"-c\", \"env > {}\"]\n",
            hook_env.display()
        ),
    )
    .unwrap();
    let listen = support::free_address();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let received = Arc::new(Mutex::new(Vec::<Received>::new()));
    let done = Arc::new(Mutex::new(false));
    let collector = {
        let (received, done) = (received.clone(), done.clone());
        std::thread::spawn(move || collect(socket, addr, received, done))
    };

    let mut command = std::process::Command::new(HALE);
    command
        .args(["up", "-c"])
        .arg(&config)
        .arg("--data")
        .arg(temp.path().join("data"))
        .args(["--listen", &listen])
        .env("NOTIFY_SOCKET", &socket_path)
        // 400 ms: a ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        // Unset: the watchdog is meant for whichever process gets it.
        .env_remove("WATCHDOG_PID");
    let hale = support::serve_with_command(command).expect("hale up starts");
    let seen = |received: &Arc<Mutex<Vec<Received>>>| received.lock().unwrap().clone();

    // READY=1, with /healthz answering when it arrives, after a status line about recovery.
    let ready = eventually("READY=1 from hale", 30, || {
        let log = seen(&received);
        async move { log.iter().position(|message| message.text.lines().any(|line| line == "READY=1")) }
    })
    .await;
    let log = seen(&received);
    assert_eq!(log[ready].healthz_at_ready, Some(200), "/healthz must answer once hale says READY=1: {log:?}");
    assert!(
        log[..ready].iter().any(|message| message.text.starts_with("STATUS=recovering")),
        "a status line while recovering comes before READY=1: {log:?}"
    );
    assert!(
        log[ready].text.contains(&format!("STATUS=serving on {addr} with ")),
        "READY=1 comes with the address served: {:?}",
        log[ready].text
    );

    // The watchdog: pings keep coming, about every half WATCHDOG_USEC.
    let pings = eventually("five WATCHDOG=1 pings", 30, || {
        let log = seen(&received);
        async move {
            let pings: Vec<Instant> =
                log.iter().filter(|message| message.text == "WATCHDOG=1").map(|message| message.at).collect();
            (pings.len() >= 5).then_some(pings)
        }
    })
    .await;
    let mut gaps: Vec<Duration> = pings.windows(2).map(|pair| pair[1] - pair[0]).collect();
    gaps.sort();
    assert!(gaps[gaps.len() / 2] < Duration::from_millis(400), "pings must come within the interval: {gaps:?}");

    // Neither the agent nor a hook command hale starts gets systemd's variables.
    let admin = hale.admin();
    let pid = eventually("the agent running", 30, || async {
        let agents = admin.agents().await.ok()?;
        let worker = agents.into_iter().find(|agent| agent.agent == "worker")?;
        worker.managed.and_then(|managed| managed.pid)
    })
    .await;
    let agent_env = environ(pid);
    assert!(agent_env.iter().any(|var| var == "HALE_AGENT=worker"), "read the agent's own environment: {agent_env:?}");
    for var in &agent_env {
        assert!(
            !var.starts_with("NOTIFY_SOCKET=") && !var.starts_with("WATCHDOG_"),
            "the agent inherited {var} from hale"
        );
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let hook_env = eventually("the agent.down hook's command to run", 30, || {
        let text = std::fs::read_to_string(&hook_env).ok();
        async move { text.filter(|text| text.contains("HALE_HOOK_KIND=agent.down")) }
    })
    .await;
    assert!(
        !hook_env.contains("NOTIFY_SOCKET=") && !hook_env.contains("WATCHDOG_USEC="),
        "the hook command inherited systemd's variables:\n{hook_env}"
    );

    // SIGTERM (what systemctl stop sends): STOPPING=1, then a clean exit.
    let before_stop = seen(&received).len();
    assert!(hale.terminate().success(), "SIGTERM stops hale cleanly");
    // Sent before hale exited; the collector may still be reading it.
    eventually("STOPPING=1 from hale", 10, || {
        let log = seen(&received);
        async move {
            log[before_stop..]
                .iter()
                .any(|message| message.text.starts_with("STOPPING=1\nSTATUS=stopping"))
                .then_some(())
        }
    })
    .await;
    let log = seen(&received);
    assert_eq!(log.iter().filter(|message| message.text.contains("READY=1")).count(), 1, "READY=1 once");
    *done.lock().unwrap() = true;
    collector.join().unwrap();
}

#[test]
fn hale_takes_its_admin_token_and_encryption_keys_from_systemd_credentials() {
    let temp = tempfile::tempdir().unwrap();
    let credentials = temp.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let token = "credential-admin-token-5d0c7a";
    std::fs::write(credentials.join("admin.token"), format!("{token}\n")).unwrap();
    let (code, key, _) = support::hale(&["keygen", "--id", "cred1"]);
    assert_eq!(code, 0);
    std::fs::write(credentials.join("encryption.keys"), key).unwrap();
    let data = temp.path().join("data");
    let mut command = std::process::Command::new(HALE);
    command
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .env("CREDENTIALS_DIRECTORY", &credentials)
        // Empty: not set, so the credential is what hale has.
        .env("HALE_ADMIN_TOKEN", "")
        .env_remove("HALE_ENCRYPTION_KEY")
        .env_remove("HALE_ENCRYPTION_KEY_FILE");
    let hale = support::serve_with_command(command).expect("hale starts with credentials");
    let (status, body, _) = support::http_as(hale.addr, Some(token), "GET", "/v1/agents", b"");
    assert_eq!(status, 200, "the credential's admin token is the admin token: {body}");
    let (status, _, _) = support::http_as(hale.addr, Some(support::ADMIN), "GET", "/v1/agents", b"");
    assert_eq!(status, 401, "no other admin token");
    assert!(!data.join("admin.token").exists(), "no admin token made in the data directory");
    assert!(
        hale.stderr_shows("key_id") && hale.stderr().contains("cred1"),
        "encryption at rest with the credential's key:\n{}",
        hale.stderr()
    );
    assert!(hale.terminate().success());
}
