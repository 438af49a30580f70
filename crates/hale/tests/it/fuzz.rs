//! The fuzz targets of `fuzz/` (issue 6), run by `cargo test` so CI runs them: each for 30 s
//! from its seed corpus under a fixed seed, built once. Needs cargo-fuzz (`.ci/run`
//! installs it); works on the stable toolchain with `-s none` (no sanitizer).
//!
//! Also keeps the seed corpora (`fuzz/seeds/TARGET/`) in step with the formats: they are
//! made here by the production encoders and checked by the production decoders;
//! `HALE_WRITE_FUZZ_SEEDS=1 cargo test -p hale --test it fuzz_seeds` rewrites them.

#[path = "../../../../fuzz/src/fixtures.rs"]
mod fixtures;

use hale_core::{AgentName, Core, Event, Limits, PointName, RoleName, Timestamp};
use hale_server::auth::{Auth, AuthConfig};
use hale_store::{Key, Keyring, Record, snapshot};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TARGETS: [&str; 4] = ["frame", "record", "snapshot", "token"];
const SECONDS_PER_TARGET: u32 = 30;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// `cargo fuzz …` in `fuzz/`, with the fuzz workspace's own target directory (its builds
/// are instrumented, so they must not share the tests' artifacts).
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(fuzz_dir()).arg("fuzz").args(args).env_remove("CARGO_TARGET_DIR");
    command
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn fuzz_targets_run_clean() {
    let installed = cargo_fuzz(&["--version"]).output().is_ok_and(|output| output.status.success());
    assert!(installed, "cargo-fuzz is missing; install cargo-fuzz: cargo install cargo-fuzz --locked");

    let started = Instant::now();
    // `--dev` (fuzz/Cargo.toml: opt-level 1, no debug info): CI builds the targets from
    // scratch, and the release build took 7 minutes of a 2-core machine; this takes 3.
    let build = cargo_fuzz(&["build", "-s", "none", "--dev"]).output().expect("cargo fuzz build runs");
    assert!(build.status.success(), "cargo fuzz build -s none --dev failed:\n{}", tail(&build.stderr, 40));
    eprintln!("fuzz targets built in {:.0?}", started.elapsed());

    for target in TARGETS {
        // New inputs go to a scratch directory; the seeds in git stay as they are.
        let scratch = tempfile::tempdir().unwrap();
        let seeds = fuzz_dir().join("seeds").join(target);
        let max_total_time = format!("-max_total_time={SECONDS_PER_TARGET}");
        let (scratch_dir, seeds_dir) = (scratch.path().to_str().unwrap(), seeds.to_str().unwrap());
        let args = [
            "run",
            target,
            scratch_dir,
            seeds_dir,
            "-s",
            "none",
            "--dev",
            "--",
            &max_total_time,
            "-seed=4711",
            "-timeout=10",
        ];
        let run = cargo_fuzz(&args).output().expect("cargo fuzz run runs");
        let output = [run.stdout.as_slice(), run.stderr.as_slice()].concat();
        assert!(
            run.status.success(),
            "fuzz target {target} failed ({}); the input is in fuzz/artifacts/{target}/ (replay: cd fuzz && cargo \
             fuzz run {target} -s none ARTIFACT); make it a regression test in the owning crate:\n{}",
            run.status,
            tail(&output, 60)
        );
        let text = String::from_utf8_lossy(&output);
        let coverage = text.lines().rev().find(|line| line.contains(" cov: ")).unwrap_or("");
        let done = text.lines().rev().find(|line| line.starts_with("Done ")).unwrap_or("");
        eprintln!("fuzz {target}: {done} | {coverage}");
    }
    // The budget CI plans for: build (warm) and four runs in about three minutes.
    eprintln!("fuzzing took {:.0?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15 * 60), "fuzzing took too long");
}

/// One seed: its file name, its bytes, and whether it comes out the same every time (a
/// sealed seed has a random nonce, a token a time; those are only checked to exist).
struct Seed {
    target: &'static str,
    name: String,
    bytes: Vec<u8>,
    deterministic: bool,
}

#[test]
fn fuzz_seeds_are_current() {
    let write = std::env::var_os("HALE_WRITE_FUZZ_SEEDS").is_some();
    let mut stale = Vec::new();
    for seed in seeds() {
        let path = fuzz_dir().join("seeds").join(seed.target).join(&seed.name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if !path.exists() || seed.deterministic {
                std::fs::write(&path, &seed.bytes).unwrap();
            }
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) if !seed.deterministic || bytes == seed.bytes => {}
            _ => stale.push(format!("{}/{}", seed.target, seed.name)),
        }
    }
    assert!(
        stale.is_empty(),
        "fuzz seeds missing or out of date: {stale:?}; rewrite them with HALE_WRITE_FUZZ_SEEDS=1 cargo test -p hale \
         --test it fuzz_seeds"
    );
}

fn seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target, name: &str, bytes: Vec<u8>, deterministic| {
        seeds.push(Seed { target, name: name.to_string(), bytes, deterministic });
    };
    for (name, frame) in frames() {
        let decoded = hale_server::api::decode_frame(frame.as_bytes());
        assert!(decoded.is_ok(), "seed frame {name} does not decode: {decoded:?}");
        add("frame", &format!("valid-{name}.json"), frame.into_bytes(), true);
    }

    // record: mode byte, seq, time, format, then the body (see fuzz_targets/record.rs).
    let key = Key::new(fixtures::KEY_ID, &fixtures::KEY_BYTES).unwrap();
    let keys = Keyring::new(key.clone(), []).unwrap();
    let (events, state) = events_and_state();
    for (index, event) in events.iter().enumerate() {
        let (seq, at) = (index as u64 + 1, Timestamp(1_700_000_000_000 + index as u64));
        let fields = |mode: u8, record: &Record| {
            let mut bytes = vec![mode];
            bytes.extend_from_slice(&record.seq.to_le_bytes());
            bytes.extend_from_slice(&record.at.0.to_le_bytes());
            bytes.extend_from_slice(&record.format.to_le_bytes());
            bytes
        };
        let plain = Record::encode(seq, at, event);
        assert_eq!(plain.decode().as_ref(), Ok(event));
        let mut raw = fields(0, &plain);
        raw.extend_from_slice(&plain.crc.to_le_bytes());
        raw.extend_from_slice(&plain.body);
        add("record", &format!("valid-{index}-raw"), raw, true);
        let mut checked = fields(1, &plain);
        checked.extend_from_slice(&plain.body);
        add("record", &format!("valid-{index}-plain"), checked, true);
        let sealed = Record::encode_with(seq, at, event, Some(&key));
        assert_eq!(sealed.open(Some(&keys)).as_ref(), Ok(event));
        let mut stored = fields(2, &sealed);
        stored.extend_from_slice(&sealed.body);
        add("record", &format!("valid-{index}-sealed"), stored, false);
        let mut to_seal = fields(3, &plain);
        to_seal.extend_from_slice(&plain.body);
        add("record", &format!("valid-{index}-to-seal"), to_seal, true);
    }

    // snapshot: mode byte, then the file (modes 0, 1) or seq, time and the state (mode 2).
    let (seq, created) = (events.len() as u64, Timestamp(1_700_000_000_000));
    let file = snapshot::encode(seq, created, &state);
    assert_eq!(snapshot::decode(&file).unwrap(), (seq, created, state.clone()));
    add("snapshot", "valid-raw", [&[0u8][..], &file].concat(), true);
    add("snapshot", "valid-checked", [&[1u8][..], &file].concat(), true);
    let sealed = snapshot::encode_with(seq, created, &state, Some(&key));
    assert!(snapshot::decode_sealed(&sealed, Some(&keys)).is_ok());
    add("snapshot", "valid-sealed", [&[1u8][..], &sealed].concat(), false);
    let mut to_seal = vec![2u8];
    to_seal.extend_from_slice(&seq.to_le_bytes());
    to_seal.extend_from_slice(&created.0.to_le_bytes());
    to_seal.extend_from_slice(&serde_json::to_vec(&state).unwrap());
    add("snapshot", "valid-to-seal", to_seal, true);
    let empty = snapshot::encode(0, Timestamp(0), &hale_core::State::default());
    add("snapshot", "valid-empty", [&[1u8][..], &empty].concat(), true);

    // token: the admin token, a refresh token, and access tokens good for a century.
    let config = AuthConfig { access_ttl: Duration::from_secs(100 * 365 * 24 * 3600), ..AuthConfig::default() };
    let auth = Auth::with_secrets(fixtures::ADMIN_TOKEN.into(), fixtures::SIGNING_KEY, config);
    add("token", "valid-admin", fixtures::ADMIN_TOKEN.into(), true);
    add("token", "refresh", format!("hale_rt_{}", "0123456789abcdef".repeat(4)).into_bytes(), true);
    let (access, _) = auth.mint_access(&AgentName::new("code-generator").unwrap());
    assert!(auth.authenticate(&access).is_ok());
    add("token", "valid-access", access.clone().into_bytes(), false);
    // The same claims with `alg: none` and no signature, which must be refused.
    let mut parts = access.split('.');
    let (_, claims) = (parts.next(), parts.next().unwrap());
    add("token", "alg-none", format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.").into_bytes(), false);
    seeds
}

/// A frame of each type, as clients send them.
fn frames() -> Vec<(&'static str, String)> {
    let frames = [
        (
            "hello",
            r#"{"type":"hello","id":1,"agent":"code-generator","role":"coder","labels":{"tier":"gpu"},"incarnation":3}"#,
        ),
        (
            "checkpoint",
            r#"{"type":"checkpoint","id":2,"patch":{"files_done":12,"notes":{"a":[1,2.5,null,true]}},"expected_version":4}"#,
        ),
        ("recovery_point", r#"{"type":"recovery_point","id":3,"name":"before-refactor"}"#),
        ("rollback", r#"{"type":"rollback","id":4,"to":{"point":"before-refactor"}}"#),
        ("rollback-version", r#"{"type":"rollback","id":5,"to":{"version":7}}"#),
        (
            "heartbeat",
            r#"{"type":"heartbeat","id":6,"progress":{"fraction":0.4,"message":"writing tests","task":"7","fields":{"k":"v"}}}"#,
        ),
        ("report_error", r#"{"type":"report_error","id":7,"message":"tool call failed"}"#),
        (
            "report_violation",
            r#"{"type":"report_violation","id":8,"agent":"other","critical":true,"reason":"exfiltration"}"#,
        ),
        ("intend_step", r#"{"type":"intend_step","id":9,"task":1,"name":"plan"}"#),
        (
            "commit_step",
            r#"{"type":"commit_step","id":10,"task":1,"name":"plan","result":{"ok":true},"llm":{"model":"m","temperature":0.2,"seed":4,"tokens_in":10,"tokens_out":20},"compensation":{"undo":"plan"}}"#,
        ),
        (
            "submit",
            r#"{"type":"submit","id":11,"task":{"role":"coder","priority":"high","payload":{"goal":"parser"},"deadline_ms":60000,"max_attempts":3,"idempotency_key":"k-1"}}"#,
        ),
        ("reserve", r#"{"type":"reserve","id":12,"task":1,"tokens":1000,"cost":5}"#),
        ("report_spend", r#"{"type":"report_spend","id":13,"task":1,"reservation":2,"tokens":900,"cost":4}"#),
        ("complete", r#"{"type":"complete","id":14,"task":1,"result":{"files":["a.rs"]}}"#),
        ("fail", r#"{"type":"fail","id":15,"task":1,"reason":"model refused","retry":false}"#),
        (
            "send",
            r#"{"type":"send","id":16,"to":{"agent":"writer-1"},"conversation":"c-1","body":{"text":"hi"},"reply_to":3,"expects_reply":true,"key":"m-1"}"#,
        ),
        ("send-role", r#"{"type":"send","id":17,"to":{"role":"writer"},"body":"hello"}"#),
        ("ack", r#"{"type":"ack","id":18,"seq":4}"#),
        ("end_conversation", r#"{"type":"end_conversation","id":19,"conversation":"c-1"}"#),
        ("auth", r#"{"type":"auth","id":20,"token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ3cml0ZXItMSJ9.c2ln"}"#),
    ];
    frames.into_iter().map(|(name, frame)| (name, frame.to_string())).collect()
}

/// A few events of an agent's life, and the state they fold into.
fn events_and_state() -> (Vec<Event>, hale_core::State) {
    let agent = AgentName::new("code-generator").unwrap();
    let role = RoleName::new("coder").unwrap();
    let labels = [("tier".to_string(), "gpu".to_string())].into();
    let events = vec![
        Event::AgentRegistered { agent: agent.clone(), role: role.clone(), labels },
        Event::IncarnationStarted { agent: agent.clone(), incarnation: 1 },
        Event::Checkpointed {
            agent: agent.clone(),
            incarnation: 1,
            version: 1,
            patch: serde_json::json!({"files_done": 12, "notes": {"a": [1, 2.5, null, true]}}),
        },
        Event::RecoveryPointMarked {
            agent: agent.clone(),
            incarnation: 1,
            name: PointName::new("before-refactor").unwrap(),
            version: 1,
        },
        Event::Checkpointed {
            agent: agent.clone(),
            incarnation: 1,
            version: 2,
            patch: serde_json::json!({"files_done": 13}),
        },
    ];
    let mut core = Core::new(Limits::default());
    for (index, event) in events.iter().enumerate() {
        core.apply(Timestamp(1_700_000_000_000 + index as u64), event);
    }
    let state = core.state().clone();
    (events, state)
}
