//! The Python client's own suite (clients/python/tests), run against this build of the
//! binary: it starts `hale serve` and `hale up` itself, SIGKILLs hale under Python agents,
//! cuts their network, and runs the example agent.

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_client_suite_passes_against_this_binary() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let clients = repo.join("clients/python");
    let missing = Command::new("python3")
        .args(["-c", "import pytest, websockets, hale"])
        .current_dir(&repo)
        .output()
        .map(|output| (!output.status.success()).then(|| String::from_utf8_lossy(&output.stderr).into_owned()))
        .unwrap_or_else(|error| Some(format!("python3 could not run: {error}")));
    if let Some(why) = missing {
        panic!(
            "the Python client's tests need python3 with pytest and the client installed: \
             run `pip install -e 'clients/python[test]'` (as .ci/run does)\n{why}"
        );
    }
    let output = Command::new("python3")
        .args(["-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"])
        .current_dir(&clients)
        .env("HALE_BIN", env!("CARGO_BIN_EXE_hale"))
        .output()
        .expect("running python3 -m pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the Python client's tests failed:\n{stdout}\n{stderr}");
}
