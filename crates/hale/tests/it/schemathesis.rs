//! Schemathesis (PyPI `schemathesis`) against this build's `GET /v1/openapi.json`: it
//! generates requests from the document, sends them to a real hale with the admin token,
//! and fails on any 5xx answer and on any answer that breaks the document's schemas.
//!
//! Bounded and repeatable: a fixed seed, one worker, a few examples per operation and a
//! time limit, so it takes well under two minutes. Two operations are left out: `POST
//! /v1/backups` writes a file wherever the generated path points (this runs as root in
//! CI), and `GET /v1/events/stream` never ends by design.

use crate::support;
use std::process::Command;

/// The seed of the generated requests: fixed, so a failure replays.
const SEED: &str = "20260601";
/// Test cases per operation and phase, and the whole run's time limit in seconds.
const EXAMPLES_MAX: &str = "25";
const TIME_MAX_S: &str = "60";

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_outside_the_schema() {
    let version = Command::new("schemathesis").arg("--version").output();
    match &version {
        Ok(output) if output.status.success() => {}
        _ => panic!(
            "this test runs schemathesis against the OpenAPI document: run `pip install schemathesis` \
             (as .ci/run does); {:?}",
            version.map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
        ),
    }
    let data = tempfile::tempdir().unwrap();
    let hale = support::serve(data.path(), &[]);
    // Its Hypothesis database and reports go to a directory of their own, not the repo.
    let scratch = tempfile::tempdir().unwrap();
    let output = Command::new("schemathesis")
        .arg("run")
        .arg(format!("{}/v1/openapi.json", hale.http_url()))
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--header", &format!("Authorization: Bearer {}", support::ADMIN)])
        .args(["--workers", "1", "--seed", SEED, "--max-examples", EXAMPLES_MAX, "--max-time", TIME_MAX_S])
        .args(["--request-timeout", "10", "--no-color"])
        .args(["--exclude-path", "/v1/backups", "--exclude-path", "/v1/events/stream"])
        .current_dir(scratch.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems (seed {SEED}):\n{stdout}\n{stderr}\nhale's log:\n{}",
        hale.stderr()
    );
}
