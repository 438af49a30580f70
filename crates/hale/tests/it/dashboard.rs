//! The dashboard in a real headless Chromium, and the events API it stands on.
//!
//! The browser is driven over the W3C WebDriver protocol against `chromedriver`, with a
//! few plain HTTP calls through reqwest (already built for hale-client) rather than the
//! fantoccini crate: the test needs five commands (new session, navigate, run a script,
//! screenshot, quit), and fantoccini would add its own HTTP client stack to every build
//! of the test binary for them. WebDriver over the DevTools protocol because chromedriver
//! from Debian matches the Chromium it drives, so the test speaks a stable, specified
//! protocol and not Chromium's internal one.

use crate::support::{self, ADMIN, HALE, eventually, http_as, up};
use hale_client::{EventFilter, EventInfo};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A hale.toml with one demo agent, `worker`, restarted always.
fn config(dir: &Path) -> PathBuf {
    let text = format!(
        "[[agent]]\nname = \"worker\"\ncommand = \"{HALE}\"\nargs = [\"demo-agent\", \"worker\", \"--step-ms\", \"100\"]\nrestart = \"always\"\n"
    );
    let path = dir.join("hale.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn worker(admin: &hale_client::Admin) -> Option<hale_client::AgentSummary> {
    admin.agents().await.ok()?.into_iter().find(|agent| agent.agent == "worker")
}

/// Waits until `worker` runs incarnation `incarnation` and has checkpointed; returns its pid.
async fn running(admin: &hale_client::Admin, incarnation: u64) -> Pid {
    eventually(&format!("worker running as incarnation {incarnation}"), 30, || async {
        let agent = worker(admin).await?;
        let managed = agent.managed.as_ref()?;
        let ready = managed.status == "running" && agent.incarnation == incarnation && agent.version > 0;
        ready.then(|| Pid::from_raw(managed.pid.expect("a running agent has a pid") as i32))
    })
    .await
}

/// chromedriver (in its own process group, with the Chromium it starts) and one session.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
}

impl Browser {
    async fn start(profile: &Path) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
            "the dashboard test needs Chromium and its WebDriver: `apt-get install -y chromium chromium-driver` \
             (.ci/run installs them)"
        );
        let port = support::free_address().rsplit_once(':').unwrap().1.to_string();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { http, base, session: String::new(), driver };
        eventually("chromedriver ready", 20, || async {
            let status: Value =
                browser.http.get(format!("{}/status", browser.base)).send().await.ok()?.json().await.ok()?;
            (status["value"]["ready"] == true).then_some(())
        })
        .await;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let created = browser.call(reqwest::Method::POST, "/session", Some(capabilities)).await;
        browser.session = created["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let request = self.http.request(method, &url).timeout(Duration::from_secs(60));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request.send().await.unwrap_or_else(|error| panic!("WebDriver {url}: {error}"));
        let status = response.status();
        let answer: Value = response.json().await.expect("WebDriver answers JSON");
        assert!(status.is_success(), "WebDriver {url}: {status} {answer}");
        answer["value"].clone()
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, &self.session_path("/url"), Some(json!({"url": url}))).await;
    }

    /// Runs `script` (a function body) in the page; what it returns.
    async fn script(&self, script: &str) -> Value {
        let body = json!({"script": script, "args": []});
        self.call(reqwest::Method::POST, &self.session_path("/execute/sync"), Some(body)).await
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, &self.session_path("/screenshot"), None).await;
        base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("a base64 PNG")).unwrap()
    }

    async fn quit(&self) {
        let _ = self.http.delete(format!("{}{}", self.base, self.session_path(""))).send().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share its process group.
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

#[tokio::test]
async fn the_dashboard_shows_a_killed_agent_come_back_live() {
    let temp = tempfile::tempdir().unwrap();
    let hale = up(&config(temp.path()), &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running(&admin, 1).await;

    let browser = Browser::start(&temp.path().join("chromium-profile")).await;
    browser.goto(&format!("{}/#token={ADMIN}", hale.http_url())).await;
    let row = r#"const row = document.querySelector('#agents tr[data-agent="worker"]');
        return row ? {state: row.dataset.state, incarnation: Number(row.dataset.incarnation),
                      restarts: row.querySelector('.restarts').textContent} : null;"#;
    eventually("the page shows worker running as incarnation 1", 20, || async {
        let shown = browser.script(row).await;
        (shown["state"] == "running" && shown["incarnation"] == 1).then_some(())
    })
    .await;
    // The token left the address bar for this tab's sessionStorage.
    let kept = browser.script("return [location.href, sessionStorage.getItem('hale-admin-token')];").await;
    assert!(!kept[0].as_str().unwrap().contains("token"), "{kept}");
    assert_eq!(kept[1], ADMIN);
    // The page lists the agents and opens its event stream at the same time: either may
    // come first.
    eventually("the page's event stream live", 20, || async {
        let state = browser.script("return document.getElementById('connection').dataset.state;").await;
        (state == "live").then_some(())
    })
    .await;
    // It reads the timeline's history once the list is shown; an event that history holds is
    // not taken from the stream again. Kill only once the history is read, so the down
    // reaches the page over the stream.
    eventually("the page to have read the timeline's history", 20, || async {
        let read = "return performance.getEntriesByType('resource')
            .some((entry) => entry.name.includes('/v1/events?kind=') && entry.responseEnd > 0);";
        (browser.script(read).await == true).then_some(())
    })
    .await;

    kill(pid, Signal::SIGKILL).unwrap();
    let shown = eventually("the page shows worker back as incarnation 2", 20, || async {
        let shown = browser.script(row).await;
        (shown["state"] == "running" && shown["incarnation"] == 2).then_some(shown)
    })
    .await;
    assert_eq!(shown["restarts"], "1", "{shown}");
    // The timeline has the failure and how long it took to come back.
    let entry = eventually("a timeline entry for the kill, with its duration", 20, || async {
        let script = r#"const item = document.querySelector('#timeline li[data-agent="worker"][data-recovered="true"]');
            return item ? item.textContent : null;"#;
        browser.script(script).await.as_str().map(str::to_string)
    })
    .await;
    assert!(entry.contains("incarnation 1 down") && entry.contains("signal 9"), "{entry}");
    assert!(entry.contains("back as incarnation 2"), "{entry}");
    assert!(entry.contains(" ms") || entry.contains(" s"), "a duration: {entry}");
    // The live list has the down too (it came over the stream).
    eventually("the down in the page's live list", 20, || async {
        let recent = browser.script("return document.getElementById('events').textContent;").await;
        recent.as_str().unwrap().contains("agent_down").then_some(())
    })
    .await;

    // Once a heartbeat of the new run fills its progress bar, keep a picture of it.
    running(&admin, 2).await;
    eventually("the page shows the progress of incarnation 2", 20, || async {
        let bar = r#"const row = document.querySelector('#agents tr[data-agent="worker"][data-incarnation="2"]');
            const bar = row && row.querySelector('.bar');
            return bar ? bar.title : null;"#;
        browser.script(bar).await.as_str().is_some_and(|title| title.ends_with('%')).then_some(())
    })
    .await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(temp.path().join("dashboard.png"), &png).unwrap();
    let target = Path::new(HALE).parent().and_then(Path::parent).expect("hale is in target/debug");
    std::fs::write(target.join("dashboard.png"), &png).unwrap();
    browser.quit().await;
}

#[tokio::test]
async fn the_page_asks_for_a_token_it_lacks_or_that_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let hale = support::serve(temp.path(), &[]);
    let browser = Browser::start(&temp.path().join("chromium-profile")).await;
    browser.goto(&format!("{}/#token=wrong", hale.http_url())).await;
    let form = "const form = document.getElementById('login');
        return form.hidden ? null : document.getElementById('login-problem').textContent;";
    let problem = eventually("the page asks for the token again", 20, || async {
        browser.script(form).await.as_str().filter(|text| !text.is_empty()).map(str::to_string)
    })
    .await;
    assert!(problem.contains("refused"), "{problem}");
    let typed = format!(
        "document.getElementById('token').value = '{ADMIN}';
         document.getElementById('login').requestSubmit();"
    );
    browser.script(&typed).await;
    eventually("the page opens with the typed token", 20, || async {
        let state = browser.script("return document.getElementById('connection').dataset.state;").await;
        (state == "live").then_some(())
    })
    .await;
    browser.quit().await;
}

#[tokio::test]
async fn the_events_api_lists_a_kill_and_streams_new_events() {
    let temp = tempfile::tempdir().unwrap();
    let hale = up(&config(temp.path()), &temp.path().join("data"), "127.0.0.1:0");
    let admin = hale.admin();
    let pid = running(&admin, 1).await;
    kill(pid, Signal::SIGKILL).unwrap();
    running(&admin, 2).await;

    let downs = EventFilter { agent: Some("worker".into()), kind: Some("agent_down".into()), ..Default::default() };
    let found = admin.events(&downs).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let down = &found[0];
    assert_eq!((down.kind.as_str(), down.agent.as_deref()), ("agent_down", Some("worker")));
    assert_eq!(down.event["incarnation"], 1);
    assert!(down.summary.contains("signal 9"), "{}", down.summary);
    let (status, body) = hale.get("/v1/events?agent=worker&kind=agent_down,incarnation_started");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<EventInfo> = serde_json::from_str(&body).unwrap();
    let kinds: Vec<&str> = listed.iter().map(|event| event.kind.as_str()).collect();
    assert_eq!(kinds, ["incarnation_started", "agent_down", "incarnation_started"]);
    assert!(listed.windows(2).all(|pair| pair[0].seq < pair[1].seq), "in log order");
    let (status, body) = hale.get("/v1/events?limit=0");
    assert_eq!(status, 400, "{body}");
    let (status, body) = hale.get("/v1/events?since=yesterday");
    assert_eq!(status, 400, "{body}");

    // The stream: a new checkpoint of the running incarnation arrives within seconds.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let follower = admin.clone();
    let checkpoints =
        EventFilter { agent: Some("worker".into()), kind: Some("checkpointed".into()), ..Default::default() };
    let following =
        tokio::spawn(async move { follower.follow_events(&checkpoints, |event| drop(sender.send(event))).await });
    let checkpoint = tokio::time::timeout(Duration::from_secs(30), received.recv())
        .await
        .expect("a checkpoint streamed within 30 s")
        .unwrap();
    assert_eq!((checkpoint.kind.as_str(), checkpoint.event["incarnation"].as_u64()), ("checkpointed", Some(2)));
    let next = tokio::time::timeout(Duration::from_secs(30), received.recv()).await.unwrap().unwrap();
    assert!(next.seq > checkpoint.seq);
    following.abort();

    // From `after`, the stream first catches up from the log: the restart is there.
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let follower = admin.clone();
    let restarts = EventFilter {
        agent: Some("worker".into()),
        kind: Some("incarnation_started".into()),
        after: Some(down.seq),
        ..Default::default()
    };
    let following =
        tokio::spawn(async move { follower.follow_events(&restarts, |event| drop(sender.send(event))).await });
    let restart = tokio::time::timeout(Duration::from_secs(30), received.recv()).await.unwrap().unwrap();
    assert_eq!(restart.event["incarnation"], 2);
    following.abort();

    // The CLI: lines, JSON lines, a relative --since, and the dashboard's address.
    let url = hale.http_url();
    let (code, out, err) = support::hale(&["events", "--server", &url, "--agent", "worker", "--kind", "agent_down"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("agent_down") && out.contains("worker: incarnation 1 DOWN"), "{out}");
    let (code, out, err) = support::hale(&["events", "--server", &url, "--since", "10m", "--json", "--limit", "3"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<EventInfo> = out.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    let (code, out, err) = support::hale(&["dashboard", "--server", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{url}/#token={ADMIN}"));

    // The page and its files need no token; the data does; nothing else slips through.
    for public in ["/", "/assets/dashboard.js", "/assets/dashboard.css"] {
        let (status, _, body) = http_as(hale.addr, None, "GET", public, b"");
        assert_eq!(status, 200, "{public}: {body}");
    }
    for private in ["/v1/events", "/v1/events/stream", "/index.html", "/assets/", "/assets/other.js"] {
        let (status, _, body) = http_as(hale.addr, None, "GET", private, b"");
        assert_eq!(status, 401, "{private}: {body}");
    }
}

#[tokio::test]
async fn on_a_cluster_the_dashboard_shows_the_nodes_and_where_each_agent_runs() {
    let temp = tempfile::tempdir().unwrap();
    let secret = temp.path().join("cluster.secret");
    std::fs::write(&secret, "dashboard-test-cluster-secret-0042").unwrap();
    let config = config(temp.path());
    let agents = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[cluster]\nnode_id = 1\nsecret_file = {secret:?}\nlabels = {{ zone = \"test\" }}\n\n{agents}"),
    )
    .unwrap();
    let hale = up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let (code, out, err) = support::hale(&["cluster", "init", "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}{err}");
    running(&hale.admin(), 1).await;

    let browser = Browser::start(&temp.path().join("chromium-profile")).await;
    browser.goto(&format!("{}/#token={ADMIN}", hale.http_url())).await;
    let node = r#"const row = document.querySelector('#nodes tr[data-node="node-1"]');
        return row && !document.getElementById('nodes-card').hidden
            ? {status: row.dataset.status, raft: row.dataset.raft, agents: row.querySelector('.agents').textContent,
               heard: row.querySelector('.heard').textContent}
            : null;"#;
    let shown = eventually("the page shows node-1 up, leading, running worker", 20, || async {
        let shown = browser.script(node).await;
        (shown["status"] == "up" && shown["raft"] == "leader" && shown["agents"] == "worker").then_some(shown)
    })
    .await;
    assert!(shown["heard"].as_str().unwrap().ends_with("ago"), "{shown}");
    let placed = r#"const row = document.querySelector('#agents tr[data-agent="worker"] .node');
        return row ? row.textContent : null;"#;
    assert_eq!(browser.script(placed).await, "on node-1");
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(temp.path().join("dashboard-cluster.png"), &png).unwrap();
    let target = Path::new(HALE).parent().and_then(Path::parent).expect("hale is in target/debug");
    std::fs::write(target.join("dashboard-cluster.png"), &png).unwrap();
    browser.quit().await;
    assert!(hale.terminate().success());
}
