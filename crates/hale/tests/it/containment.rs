//! An agent that tries to break out: read hale's secrets from the data directory, from
//! hale's environment and its own, then act as the admin or as another agent with what it
//! found. It runs as a user of its own (`user` in hale.toml) while hale runs as root with
//! its admin token and encryption key in its environment, the way the issue found them
//! leaking; every attempt must fail.

use crate::support::{self, ADMIN, HALE};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A uid no account has: numeric users need no entry in /etc/passwd.
const AGENT_UID: u32 = 4_000_123;

/// The intruder: stdlib Python, so it runs as any user. It prints one line per attempt,
/// `ATTEMPT {json}`, then `DONE`, and exits 0 (restart = "never").
const INTRUDER: &str = r#"
import json, os, sys, urllib.request, urllib.error

data, victim, extra_files = sys.argv[1], sys.argv[2], sys.argv[3:]
base = os.environ["HALE_URL"].replace("ws://", "http://", 1)
found = set()

def attempt(what, succeeded, detail=""):
    print("ATTEMPT " + json.dumps({"what": what, "succeeded": succeeded, "detail": str(detail)[:300]}), flush=True)

def read(path):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        attempt("read " + path, True, text[:80])
        for word in text.replace("\0", "\n").replace("=", "\n").split():
            if len(word) >= 16:
                found.add(word.strip())
    except OSError as e:
        attempt("read " + path, False, e)

# 1. The data directory: list it, then every name hale is known to keep there.
try:
    names = os.listdir(data)
    attempt("list " + data, True, names)
except OSError as e:
    names = []
    attempt("list " + data, False, e)
known = ["hale.db", "hale.db-wal", "hale.db-shm", "admin.token", "signing.key", "LOCK",
         "logs/" + victim + ".log", "agents/" + victim]
for name in sorted(set(names) | set(known)):
    path = os.path.join(data, name)
    if os.path.isdir(path):
        try:
            attempt("list " + path, True, os.listdir(path))
        except OSError as e:
            attempt("list " + path, False, e)
    else:
        read(path)
for path in extra_files:
    read(path)

# 2. hale's environment, through /proc, and a signal to hale.
hale_pid = os.getppid()
read("/proc/%d/environ" % hale_pid)
try:
    os.kill(hale_pid, 0)
    attempt("signal hale (signal 0)", True)
except OSError as e:
    attempt("signal hale (signal 0)", False, e)

# 3. Its own environment.
for name in ("HALE_ADMIN_TOKEN", "HALE_ENCRYPTION_KEY", "HALE_ENCRYPTION_KEY_FILE"):
    value = os.environ.get(name)
    attempt("own environment " + name, value is not None, value or "absent")
    if value:
        found.add(value)

# 4. Every admin route, with whatever it found and with its own token.
own = os.environ.get("HALE_TOKEN", "")
tokens = sorted(found) + [own]
def call(method, path, body, token):
    request = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode())
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:
        return str(e)
routes = [
    ("GET", "/v1/events", None),
    ("GET", "/v1/agents", None),
    ("POST", "/v1/agents/%s/tokens" % victim, {}),
    ("POST", "/v1/agents/%s/quarantine" % victim, {"reason": "intruder"}),
    ("POST", "/v1/agents/%s/stop" % victim, {}),
    ("POST", "/v1/agents/%s/restart" % victim, {}),
    ("POST", "/v1/backups", {"path": "/tmp/hale-intruder-backup.db"}),
]
for index, token in enumerate(tokens):
    label = "own token" if token == own else "found secret #%d" % index
    for method, path, body in routes:
        status = call(method, path, body, token)
        attempt("%s %s with %s" % (method, path, label), isinstance(status, int) and status < 300, status)

# 5. Another agent's state, with its own token.
status = call("POST", "/v1/agents/%s/checkpoint" % victim, {"incarnation": 1, "patch": {"owned": True}}, own)
attempt("checkpoint %s's state with own token" % victim, isinstance(status, int) and status < 300, status)
status = call("POST", "/v1/agents/%s/hello" % victim, {"role": victim}, own)
attempt("hello as %s with own token" % victim, isinstance(status, int) and status < 300, status)
print("DONE", flush=True)
"#;

/// A directory everyone may read, for the script and its interpreter's sake (the test's
/// own temporary directory is private to root).
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn key_line() -> String {
    let (code, out, err) = support::hale(&["keygen", "--id", "k1"]);
    assert_eq!(code, 0, "{err}");
    out.trim().to_string()
}

/// The attempts the intruder reported in its log, once it is done.
async fn report(log: &Path) -> Vec<serde_json::Value> {
    let text = support::eventually("the intruder to finish", 60, || async {
        std::fs::read_to_string(log).ok().filter(|text| text.contains("\nDONE\n") || text.starts_with("DONE\n"))
    })
    .await;
    text.lines()
        .filter_map(|line| line.strip_prefix("ATTEMPT "))
        .map(|json| serde_json::from_str(json).unwrap())
        .collect()
}

fn config(dir: &Path, script: &Path, data: &Path, key_file: &Path, user: Option<&str>) -> PathBuf {
    let user = user.map(|user| format!("user = \"{user}\"\n")).unwrap_or_default();
    let text = format!(
        "[[agent]]\nname = \"victim\"\ncommand = \"sleep\"\nargs = [\"600\"]\n\n\
         [[agent]]\nname = \"intruder\"\ncommand = \"/usr/bin/python3\"\n\
         args = [{script:?}, {data:?}, \"victim\", {key_file:?}]\nrestart = \"never\"\n{user}",
        script = script.display().to_string(),
        data = data.display().to_string(),
        key_file = key_file.display().to_string(),
    );
    let path = dir.join("hale.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn up_with_secrets(config: &Path, data: &Path, key: &str) -> support::Hale {
    let mut command = Command::new(HALE);
    command
        .args(["up", "-c"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .env("HALE_ADMIN_TOKEN", ADMIN)
        .env("HALE_ENCRYPTION_KEY", key);
    support::serve_with_command(command).unwrap_or_else(|stderr| panic!("hale up did not start:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_running_as_its_own_user_can_read_no_secret_and_act_as_no_one_else() {
    if !Path::new("/usr/bin/python3").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root (to run the agent as another user) and /usr/bin/python3");
        return;
    }
    let shared = shared_dir();
    let script = shared.path().join("intruder.py");
    std::fs::write(&script, INTRUDER).unwrap();
    let data = shared.path().join("data");
    let key = key_line();
    // An operator's key file next to the data directory, private to hale's user.
    let key_file = shared.path().join("hale.keys");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = config(shared.path(), &script, &data, &key_file, Some(&AGENT_UID.to_string()));
    let hale = up_with_secrets(&config, &data, &key);

    let attempts = report(&data.join("logs/intruder.log")).await;
    eprintln!("what the intruder tried:");
    for attempt in &attempts {
        eprintln!("  {} -> {}", attempt["what"], attempt["detail"]);
    }
    let succeeded: Vec<_> = attempts.iter().filter(|attempt| attempt["succeeded"] == true).collect();
    assert!(succeeded.is_empty(), "the intruder got through: {succeeded:#?}");
    // It did try all of it (a script that broke early would also report no success).
    let tried = |what: &str| attempts.iter().any(|attempt| attempt["what"].as_str().unwrap().contains(what));
    for what in [
        "read /proc/",
        "admin.token",
        "signing.key",
        "hale.db",
        "hale.keys",
        "own environment HALE_ADMIN_TOKEN",
        "own environment HALE_ENCRYPTION_KEY",
        "POST /v1/agents/victim/tokens with own token",
        "checkpoint victim's state with own token",
        "hello as victim",
        "signal hale",
    ] {
        assert!(tried(what), "the intruder did not try {what:?}");
    }

    // It ran as its user, in its own working directory, which nobody else can enter.
    let workdir = data.join("agents/intruder");
    let meta = std::fs::metadata(&workdir).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (AGENT_UID, 0o700));
    let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o777;
    assert_eq!(mode(&data), 0o711, "traversable only, for the agents' own directories");
    for secret in ["hale.db", "signing.key", "LOCK"] {
        assert_eq!(mode(&data.join(secret)) & 0o077, 0, "{secret} is private to hale's user");
    }
    // And the victim's state is untouched.
    let (status, body) = hale.get("/v1/agents/victim");
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("owned"), "{body}");
    hale.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_its_own_environment_and_none_of_hales() {
    let shared = shared_dir();
    let env_file = shared.path().join("agent.env");
    std::fs::write(&env_file, "# the agent's own secret\nMODEL_API_KEY=\"sk-own 1\"\n").unwrap();
    let config = shared.path().join("hale.toml");
    std::fs::write(
        &config,
        format!(
            "[[agent]]\nname = \"printer\"\ncommand = \"sh\"\n\
             args = [\"-c\", \"env | sort; pwd; echo DONE; sleep 600\"]\n\
             env = {{ FROM_TOML = \"yes\" }}\nenv_file = {:?}\n",
            env_file.display().to_string()
        ),
    )
    .unwrap();
    let data = shared.path().join("data");
    let mut command = Command::new(HALE);
    command
        .args(["up", "-c"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .env("HALE_ENCRYPTION_KEY", key_line())
        .env("SOME_OTHER_SECRET", "hale-only");
    let hale = support::serve_with_command(command).unwrap_or_else(|stderr| panic!("hale up did not start:\n{stderr}"));
    let log = data.join("logs/printer.log");
    let text = support::eventually("the agent to print its environment", 30, || async {
        std::fs::read_to_string(&log).ok().filter(|text| text.contains("DONE"))
    })
    .await;
    for absent in ["HALE_ADMIN_TOKEN", "HALE_ENCRYPTION_KEY", "SOME_OTHER_SECRET", "HALE_LOG", ADMIN] {
        assert!(!text.contains(absent), "the agent got {absent}:\n{text}");
    }
    for present in
        ["PATH=", "FROM_TOML=yes", "MODEL_API_KEY=sk-own 1", "HALE_URL=", "HALE_AGENT=printer", "HALE_TOKEN="]
    {
        assert!(text.contains(present), "the agent lacks {present}:\n{text}");
    }
    // Its working directory is its own, under the data directory.
    let workdir = std::fs::canonicalize(data.join("agents/printer")).unwrap();
    assert!(text.contains(&format!("\n{}\n", workdir.display())), "runs in {}:\n{text}", workdir.display());
    hale.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hales_environment_is_not_readable_by_other_processes_of_its_user() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run hale as an unprivileged user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // hale as an ordinary user, with its admin token in its environment; then a process of
    // that same user reads hale's /proc/PID/environ.
    let shared = shared_dir();
    let home = shared.path().join("home");
    std::fs::create_dir(&home).unwrap();
    rustix::fs::chown(&home, Some(rustix::fs::Uid::from_raw(AGENT_UID)), Some(rustix::fs::Gid::from_raw(AGENT_UID)))
        .unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut command = Command::new(HALE);
    command
        .uid(AGENT_UID)
        .gid(AGENT_UID)
        .args(["serve", "--data"])
        .arg(home.join("data"))
        .args(["--listen", "127.0.0.1:0"]);
    let hale = support::serve_with_command(command).unwrap_or_else(|stderr| panic!("hale did not start:\n{stderr}"));
    let environ = format!("/proc/{}/environ", hale.child.id());
    let read = Command::new("cat").arg(&environ).uid(AGENT_UID).gid(AGENT_UID).output().unwrap();
    assert!(!read.status.success(), "hale's user read {environ}: {}", String::from_utf8_lossy(&read.stdout));
    assert!(!String::from_utf8_lossy(&read.stdout).contains(ADMIN));
    // And the data directory it made is its user's alone.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(home.join("data")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (AGENT_UID, 0o700));
    hale.terminate();
}

#[test]
fn check_refuses_a_secret_in_an_agents_environment_and_a_user_that_does_not_exist() {
    let temp = tempfile::tempdir().unwrap();
    let cases = [
        ("env = { HALE_ADMIN_TOKEN = \"x\" }\n", "secret of hale's"),
        ("pass_env = [\"HALE_ENCRYPTION_KEY\"]\n", "secret of hale's"),
        ("env = { HALE_URL = \"ws://elsewhere\" }\n", "hale sets itself"),
        ("user = \"hale-no-such-user\"\n", "no user \"hale-no-such-user\""),
        ("env_file = \"missing.env\"\n", "missing.env"),
    ];
    for (line, expected) in cases {
        let config = temp.path().join("hale.toml");
        std::fs::write(&config, format!("[[agent]]\nname = \"a\"\ncommand = \"sleep\"\n{line}")).unwrap();
        let (code, out, err) = support::hale(&["check", "-c", config.to_str().unwrap()]);
        assert_ne!(code, 0, "{line}: accepted\n{out}");
        assert!(err.contains(expected) && err.contains("line "), "{line}: {err}");
    }
}

#[test]
fn a_hale_that_may_not_switch_users_says_so_at_check_and_at_start() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run hale as an unprivileged user");
        return;
    }
    use std::os::unix::process::CommandExt;
    let shared = shared_dir();
    let config = shared.path().join("hale.toml");
    std::fs::write(&config, "[[agent]]\nname = \"a\"\ncommand = \"sleep\"\nargs = [\"60\"]\nuser = \"nobody\"\n")
        .unwrap();
    let home = shared.path().join("home");
    std::fs::create_dir(&home).unwrap();
    rustix::fs::chown(&home, Some(rustix::fs::Uid::from_raw(AGENT_UID)), Some(rustix::fs::Gid::from_raw(AGENT_UID)))
        .unwrap();
    let data = home.join("data");
    let check: Vec<String> = vec!["check".into(), "-c".into(), config.display().to_string()];
    let mut up: Vec<String> = vec!["up".into(), "-c".into(), config.display().to_string(), "--data".into()];
    up.extend([data.display().to_string(), "--listen".into(), "127.0.0.1:0".into()]);
    for args in [check, up] {
        let mut command = Command::new(HALE);
        command.uid(AGENT_UID).gid(AGENT_UID).args(&args).env_remove("HALE_ADMIN_TOKEN");
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} accepted a user it cannot switch to: {stderr}");
        for expected in ["runs as user \"nobody\"", "CAP_SETUID", "line 5"] {
            assert!(stderr.contains(expected), "{args:?}: {expected:?} missing from:\n{stderr}");
        }
    }
}
