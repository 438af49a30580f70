//! TLS end to end, with certificates made by the test: `hale up` serving wss:// and
//! https://, its managed agent connecting by itself (HALE_URL and HALE_CA_FILE), the
//! client and the CLI verifying against the CA file, and what is refused: plain HTTP, and
//! a client that trusts another CA.

use crate::support::{self, ADMIN, HALE, eventually};
use hale_client::{Admin, Agent, AgentOptions};
use serde_json::json;

fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn hale_serves_tls_to_its_agents_the_client_and_the_cli_and_refuses_plain_or_untrusted_peers() {
    let temp = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(temp.path(), "hale");
    let (other_ca, _) = certificate(temp.path(), "other");
    let config = temp.path().join("hale.toml");
    let agent_args = json!(["demo-agent", "secure", "--step-ms", "100"]);
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n\n[[agent]]\nname = \"secure\"\ncommand = \"{HALE}\"\nargs = {agent_args}\n"
        ),
    )
    .unwrap();
    let hale = support::up(&config, &temp.path().join("data"), "127.0.0.1:0");
    let https = format!("https://{}", hale.addr);
    let wss = format!("wss://{}", hale.addr);
    let admin = Admin::new(&https).with_ca_file(&cert).unwrap().with_token(ADMIN);
    // The managed agent was told wss:// and the CA, and connected by itself.
    eventually("the managed agent attached over TLS", 30, || async {
        let agents = admin.agents().await.ok()?;
        agents.iter().any(|agent| agent.agent == "secure" && agent.attached && agent.version > 0).then_some(())
    })
    .await;
    // A session of the Rust client over wss://.
    let agent = Agent::connect(&wss, AgentOptions::new("own", "r").token(ADMIN).ca_file(&cert)).await.unwrap();
    agent.resume().await.unwrap();
    assert_eq!(agent.checkpoint(json!({"secret": "kept"})).await.unwrap(), 1);
    // The CLI, with the CA file.
    let out = std::process::Command::new(HALE)
        .args(["agents", "--server", &https, "--ca-file", cert.to_str().unwrap(), "--token", ADMIN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("secure"));
    // Plain HTTP on the TLS port gets no answer.
    let (status, _, _) = support::http_as(hale.addr, Some(ADMIN), "GET", "/v1/agents", b"");
    assert_eq!(status, 0, "plain HTTP must not be served on a TLS listener");
    // A client that trusts another CA refuses the server.
    let untrusted = Agent::connect(&wss, AgentOptions::new("own", "r").token(ADMIN).ca_file(&other_ca)).await;
    let error = untrusted.err().expect("an untrusted certificate is refused").to_string();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let refused = Admin::new(&https).with_ca_file(&other_ca).unwrap().with_token(ADMIN).agents().await;
    assert!(refused.is_err());
    // Without a CA file, the client says what it needs.
    let error = Agent::connect(&wss, AgentOptions::new("own", "r").token(ADMIN)).await.err().unwrap().to_string();
    assert!(error.contains("CA file"), "{error}");
}
