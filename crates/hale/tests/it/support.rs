//! Starting and stopping the real `hale` binary on loopback.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const HALE: &str = env!("CARGO_BIN_EXE_hale");

/// A running `hale serve`.
pub struct Hale {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// The thread that reads hale's stderr: it ends when hale has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// `hale serve --data DATA --listen 127.0.0.1:0 EXTRA…`, waiting until it listens.
pub fn serve(data: &Path, extra: &[&str]) -> Hale {
    serve_with(Command::new(HALE), data, extra).unwrap_or_else(|stderr| panic!("hale did not start:\n{stderr}"))
}

/// Like [`serve`] with a prepared command (e.g. under strace); `Err(stderr)` if it exits
/// before listening.
pub fn serve_with(mut command: Command, data: &Path, extra: &[&str]) -> Result<Hale, String> {
    command.args(["serve", "--data"]).arg(data).args(["--listen", "127.0.0.1:0"]).args(extra);
    launch(command)
}

/// `hale serve --data DATA --listen LISTEN` (a fixed address, for a hale that must come
/// back on it).
pub fn serve_on(data: &Path, listen: &str) -> Hale {
    let mut command = Command::new(HALE);
    command.args(["serve", "--data"]).arg(data).args(["--listen", listen]);
    launch(command).unwrap_or_else(|stderr| panic!("hale did not start:\n{stderr}"))
}

/// `hale up -c CONFIG --data DATA --listen LISTEN`, waiting until it listens (its agents
/// are started by then).
pub fn up(config: &Path, data: &Path, listen: &str) -> Hale {
    let mut command = Command::new(HALE);
    command.args(["up", "-c"]).arg(config).arg("--data").arg(data).args(["--listen", listen]);
    launch(command).unwrap_or_else(|stderr| panic!("hale up did not start:\n{stderr}"))
}

/// A loopback address with a port that was free a moment ago, for a hale that must come
/// back on the same address.
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `seconds`.
pub async fn eventually<T, F, Fut>(what: &str, seconds: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until(what, seconds, || {
        let probed = probe();
        async move { probed.await.ok_or_else(|| "not yet".to_string()) }
    })
    .await
}

/// Polls `probe` every 50 ms until it returns `Ok`, for at most `seconds`; `Err` says what
/// it saw instead, and a timeout fails with what it waited for and the last thing it saw.
/// Every test waits for the condition it asserts this way, never for a fixed time: CI
/// runs on a busy machine.
pub async fn wait_until<T, F, Fut>(what: &str, seconds: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let seen = match probe().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(Instant::now() < deadline, "timed out after {seconds} s waiting for: {what}; last seen: {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until hale's engine has run a tick that began after this call: every timer and
/// detector that runs on the tick (restarts due after their backoff, pool recruits, the
/// circuit breakers) has decided again since, on the state as it is now. Tests that assert
/// something does *not* happen wait for this instead of sleeping.
///
/// The proof is by order. `witness` is an agent of the test's own (over HTTP, unmanaged): a
/// run's first heartbeat with progress is logged (`progress_reported`) by the next tick and
/// by nothing else, and a tick decides restarts, recruits and breakers before it logs
/// progress. The witness then starts a new run, so the heartbeat detector does not watch it
/// (it is never declared down). Tests that list every agent must leave the witness out.
pub async fn next_tick(hale: &Hale, witness: &str) {
    let (status, welcome) =
        hale.post(&format!("/v1/agents/{witness}/hello"), &serde_json::json!({"role": "tick-witness"}));
    assert_eq!(status, 200, "{welcome}");
    let incarnation = serde_json::from_str::<serde_json::Value>(&welcome).unwrap()["incarnation"].as_u64().unwrap();
    let beat = serde_json::json!({"incarnation": incarnation, "progress": {"message": "waiting for a tick"}});
    let (status, body) = hale.post(&format!("/v1/agents/{witness}/heartbeat"), &beat);
    assert_eq!(status, 200, "{body}");
    let path = format!("/v1/events?agent={witness}&kind=progress_reported");
    wait_until(&format!("a tick of hale's engine (the progress of {witness}/{incarnation} logged)"), 30, || {
        let (status, body) = hale.get(&path);
        let logged = status == 200
            && serde_json::from_str::<Vec<serde_json::Value>>(&body)
                .is_ok_and(|events| events.iter().any(|event| event["event"]["incarnation"] == incarnation));
        async move { if logged { Ok(()) } else { Err(format!("{status} {body}")) } }
    })
    .await;
    let (status, body) =
        hale.post(&format!("/v1/agents/{witness}/hello"), &serde_json::json!({"role": "tick-witness"}));
    assert_eq!(status, 200, "{body}");
}

/// The admin token every hale of these tests runs with (`HALE_ADMIN_TOKEN`), so the
/// CLI, `Admin` and sessions can be given it. The auth tests start hale without it.
pub const ADMIN: &str = "test-admin-token-6b1f0c2e9d";

/// Starts a prepared `hale` command line as it is (e.g. the systemd unit's ExecStart).
pub fn serve_with_command(command: Command) -> Result<Hale, String> {
    launch(command)
}

fn launch(mut command: Command) -> Result<Hale, String> {
    if !command.get_envs().any(|(key, _)| key == "HALE_ADMIN_TOKEN") {
        command.env("HALE_ADMIN_TOKEN", ADMIN);
    }
    command
        .env("HALE_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawning hale");
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().unwrap();
    let collected = stderr.clone();
    let reader = std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            collected.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reading hale's stdout");
    let Some(addr) = line.trim().strip_prefix("hale listening on ") else {
        // hale exited: its stderr is closed, so the reader ends once it has read it all.
        let _ = child.wait();
        let _ = reader.join();
        return Err(stderr.lock().unwrap().clone());
    };
    let addr = addr.parse().expect("a socket address");
    Ok(Hale { child, addr, stderr, reader: Some(reader) })
}

impl Hale {
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// What hale has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until hale's stderr contains `text`: it is read by another
    /// thread, so a line hale wrote a moment ago may not have arrived yet. For a line that
    /// must *not* be there, wait for a later line that comes after it, then look at
    /// [`stderr`](Hale::stderr).
    pub fn stderr_shows(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.stderr().contains(text) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        kill(self.pid(), Signal::SIGKILL).expect("SIGKILL");
        self.child.wait().expect("reaping hale");
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM");
        wait_with_timeout(&mut self.child, Duration::from_secs(30)).expect("hale did not exit within 30 s of SIGTERM")
    }

    /// SIGTERM, and the exit status; if it has not exited within `timeout`, SIGKILL and
    /// `Err` with everything it wrote to stderr, to say what it was waiting for.
    pub fn terminate_within(mut self, timeout: Duration) -> Result<ExitStatus, String> {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM");
        match wait_with_timeout(&mut self.child, timeout) {
            Some(status) => Ok(status),
            None => {
                let _ = kill(self.pid(), Signal::SIGKILL);
                let _ = self.child.wait();
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                let text = self.stderr.lock().unwrap().clone();
                Err(text)
            }
        }
    }

    /// Like [`terminate`](Hale::terminate), and everything hale wrote to stderr, to its
    /// last line: what it did while it stopped is in it too.
    pub fn terminate_with_stderr(mut self) -> (ExitStatus, String) {
        let reader = self.reader.take();
        let stderr = self.stderr.clone();
        let status = self.terminate();
        if let Some(reader) = reader {
            reader.join().expect("the stderr reader does not panic");
        }
        let text = stderr.lock().unwrap().clone();
        (status, text)
    }

    /// An HTTP client of this hale with the admin token.
    pub fn admin(&self) -> hale_client::Admin {
        hale_client::Admin::new(&self.http_url()).with_token(ADMIN)
    }

    /// A session of this hale for `options` (with the admin token, which may act for any
    /// agent).
    pub async fn connect(&self, options: hale_client::AgentOptions) -> hale_client::Agent {
        hale_client::Agent::connect(&self.ws_url(), options.token(ADMIN)).await.expect("connecting a session")
    }

    /// The HTTP status and body of `GET path`.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, b"")
    }

    /// The HTTP status and body of `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        http(self.addr, "POST", path, body.to_string().as_bytes())
    }

    /// The resident set size of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Hale {
    /// A test that fails midway still stops hale gracefully, so `hale up` stops its agents
    /// instead of leaving them to outlive the test; SIGKILL only if that takes too long.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(self.pid(), Signal::SIGTERM);
            if wait_with_timeout(&mut self.child, Duration::from_secs(15)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A minimal HTTP/1.1 request on a fresh connection, with the admin token: status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, body);
    (status, body)
}

/// Like [`http`], with the response's head (status line and headers) too.
pub fn http_full(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, String) {
    http_as(addr, Some(ADMIN), method, path, body)
}

/// A request with `token` (or none): status, head and body.
pub fn http_as(addr: SocketAddr, token: Option<&str>, method: &str, path: &str, body: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connecting to hale");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let authorization = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading the whole body; a failed write is fine then.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}

/// Runs `hale ARGS…` to completion (with the tests' admin token in `HALE_TOKEN`): exit
/// code, stdout, stderr.
pub fn hale(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(HALE)
        .args(args)
        .env("HALE_TOKEN", ADMIN)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running hale");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// A seed from `HALE_TEST_SEED` or the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("HALE_TEST_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: seed {seed} (rerun with HALE_TEST_SEED={seed})");
    seed
}
