//! A cluster of three real `hale serve` processes on loopback: formed with `hale cluster
//! init` and `join`, writes through the leader, a follower that refuses them naming the
//! leader, the leader SIGKILLed and another elected that continues from the committed
//! version, and the killed node back from its directory, caught up.

use crate::support::{self, HALE};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

const SECRET: &str = "cluster-test-secret-5f0c2a9e71";

/// Starts node `id` on a loopback port that is free, trying another if one is taken
/// between finding it free and binding it (tests run in parallel); returns it and its
/// address.
fn fresh_node(dir: &Path, id: u64) -> (support::Hale, String) {
    for _ in 0..20 {
        let addr = support::free_address();
        match try_node(dir, id, &addr) {
            Ok(hale) => return (hale, addr),
            Err(stderr) if stderr.contains("Address already in use") => continue,
            Err(stderr) => panic!("node {id} did not start:\n{stderr}"),
        }
    }
    panic!("no free loopback port for node {id} in 20 tries");
}

fn node(dir: &Path, id: u64, listen: &str) -> support::Hale {
    try_node(dir, id, listen).unwrap_or_else(|stderr| panic!("node {id} did not start:\n{stderr}"))
}

fn try_node(dir: &Path, id: u64, listen: &str) -> Result<support::Hale, String> {
    let config = dir.join(format!("node{id}.toml"));
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, SECRET).unwrap();
    // A directory with a certificate in it makes TLS nodes.
    let (cert, key) = (dir.join("node.pem"), dir.join("node-key.pem"));
    let tls = match cert.exists() {
        true => format!("[server]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n\n"),
        false => String::new(),
    };
    std::fs::write(
        &config,
        format!(
            "{tls}[cluster]\nnode_id = {id}\nsecret_file = {:?}\nheartbeat_ms = 100\nelection_min_ms = 1000\nelection_max_ms = 2000\n",
            secret.display().to_string()
        ),
    )
    .unwrap();
    let mut command = Command::new(HALE);
    command.args(["serve", "-c"]).arg(&config).arg("--data").arg(data(dir, id)).args(["--listen", listen]);
    support::serve_with_command(command)
}

fn data(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("node{id}"))
}

fn cli(args: &[&str]) -> (i32, String, String) {
    support::hale(args)
}

fn status(addr: &str) -> Option<Value> {
    let (code, out, _) = cli(&["cluster", "status", "--json", "--server", &format!("http://{addr}")]);
    (code == 0).then(|| serde_json::from_str(&out).unwrap())
}

/// The node that `addrs` agree leads, once they do and it is one of them.
async fn leader(addrs: &[&str]) -> u64 {
    support::eventually("an agreed leader among these nodes", 30, || async {
        let seen: Vec<Value> = addrs.iter().map(|addr| status(addr)).collect::<Option<_>>()?;
        let first = seen[0]["leader"].as_u64()?;
        let agreed = seen.iter().all(|status| status["leader"].as_u64() == Some(first));
        let among = seen.iter().any(|status| status["node_id"].as_u64() == Some(first) && status["role"] == "leader");
        (agreed && among).then_some(first)
    })
    .await
}

fn checkpoint(hale: &support::Hale, n: u64) -> (u16, String) {
    hale.post("/v1/agents/writer/checkpoint", &json!({"incarnation": 1, "patch": {"n": n}}))
}

/// Three nodes in `dir`, formed into a cluster through the CLI.
fn form(dir: &Path) -> (Vec<Option<support::Hale>>, Vec<String>) {
    form_of(dir, 3)
}

/// `count` nodes in `dir`, formed into a cluster through the CLI, one join at a time.
fn form_of(dir: &Path, count: u64) -> (Vec<Option<support::Hale>>, Vec<String>) {
    let (mut nodes, mut addrs) = (Vec::new(), Vec::new());
    for id in 1..=count {
        let (hale, addr) = fresh_node(dir, id);
        nodes.push(Some(hale));
        addrs.push(addr);
    }
    let (code, out, err) = cli(&["cluster", "init", "--server", &format!("http://{}", addrs[0])]);
    assert_eq!(code, 0, "{out}{err}");
    for id in 2..=count as usize {
        let (code, out, err) = cli(&["cluster", "join", &addrs[0], "--server", &format!("http://{}", addrs[id - 1])]);
        assert_eq!(code, 0, "node {id}: {out}{err}");
    }
    (nodes, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_survive_the_leaders_sigkill_and_catch_a_returning_node_up() {
    let temp = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = form(temp.path());
    // A second init is refused, saying why.
    let (code, _, err) = cli(&["cluster", "init", "--server", &format!("http://{}", addrs[0])]);
    assert_eq!(code, 1);
    assert!(err.contains("cluster_refused") && err.contains("member already"), "{err}");
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = leader(&all).await;
    let members = status(&addrs[0]).unwrap()["members"].as_array().unwrap().clone();
    assert_eq!(members.iter().filter(|member| member["voter"] == true).count(), 3, "{members:?}");

    // Writes through the leader.
    let leading = nodes[first as usize - 1].as_ref().unwrap();
    let (code, body) = leading.post("/v1/agents/writer/hello", &json!({"role": "writer"}));
    assert_eq!(code, 200, "{body}");
    for n in 1..=10 {
        let (code, body) = checkpoint(leading, n);
        assert_eq!(code, 200, "{body}");
    }
    // A follower refuses them, naming the leader.
    let follower = (1..=3u64).find(|id| *id != first).unwrap();
    let (code, body) = checkpoint(nodes[follower as usize - 1].as_ref().unwrap(), 99);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not_leader") && body.contains(&addrs[first as usize - 1]), "{body}");
    // A read there goes to the leader too, unless it accepts a stale answer: then the
    // follower answers from the committed state it has taken in, and says so.
    let follower_addr = addrs[follower as usize - 1].clone();
    let (code, body) = nodes[follower as usize - 1].as_ref().unwrap().get("/v1/agents/writer/state");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not_leader"), "{body}");
    let stale_read = |addr: String| async move {
        let answer = reqwest::Client::new()
            .get(format!("http://{addr}/v1/agents/writer/state"))
            .bearer_auth(support::ADMIN)
            .header("Hale-Read", "stale-ok")
            .send()
            .await
            .ok()?;
        let stale = answer.headers().get("hale-read").map(|value| value.to_str().unwrap().to_string());
        let body: Value = answer.json().await.ok()?;
        Some((stale, body["version"].as_u64()?))
    };
    support::eventually("the follower to answer a stale read at version 10", 30, || async {
        let (stale, version) = stale_read(follower_addr.clone()).await?;
        assert_eq!(stale.as_deref(), Some("stale"));
        (version == 10).then_some(())
    })
    .await;
    let (stale, version) = stale_read(addrs[first as usize - 1].clone()).await.unwrap();
    assert_eq!((stale, version), (None, 10), "the leader's answer is current, not stale");
    // So is a heartbeat: a follower knows nothing current about runs.
    let beat =
        nodes[follower as usize - 1].as_ref().unwrap().post("/v1/agents/writer/heartbeat", &json!({"incarnation": 1}));
    assert_eq!(beat.0, 503, "{}", beat.1);
    assert!(beat.1.contains("not_leader"), "{}", beat.1);

    // The leader is SIGKILLed; the other two elect one of themselves.
    nodes[first as usize - 1].take().unwrap().kill();
    let rest: Vec<&str> = (1..=3u64).filter(|id| *id != first).map(|id| addrs[id as usize - 1].as_str()).collect();
    let second = leader(&rest).await;
    assert_ne!(second, first);
    let leading = nodes[second as usize - 1].as_ref().unwrap();
    // Its engine continues from the committed version: the next checkpoint is version 11.
    let answer = support::eventually("the new leader to take writes", 30, || async {
        let (code, body) = checkpoint(leading, 11);
        (code == 200).then_some(body)
    })
    .await;
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["version"], 11, "{answer}");
    // The new leader's event log holds every checkpoint, those it applied as a follower too.
    let (code, events) = leading.get("/v1/events?agent=writer&kind=checkpointed");
    assert_eq!(code, 200, "{events}");
    let events: Vec<Value> = serde_json::from_str(&events).unwrap();
    let versions: Vec<u64> = events.iter().filter_map(|event| event["event"]["version"].as_u64()).collect();
    assert_eq!(versions, (1..=11).collect::<Vec<u64>>(), "{events:?}");

    // The killed node comes back from its directory and catches up.
    nodes[first as usize - 1] = Some(node(temp.path(), first, &addrs[first as usize - 1]));
    let target = status(&addrs[second as usize - 1]).unwrap()["last_applied_index"].as_u64().unwrap();
    support::eventually("the returning node to catch up", 30, || async {
        let applied = status(&addrs[first as usize - 1])?["last_applied_index"].as_u64()?;
        (applied >= target).then_some(())
    })
    .await;
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

#[tokio::test]
async fn a_single_node_says_it_is_not_part_of_a_cluster() {
    let temp = tempfile::tempdir().unwrap();
    let hale = support::serve(temp.path(), &[]);
    for args in [vec!["cluster", "status"], vec!["cluster", "init"], vec!["cluster", "join", "127.0.0.1:9"]] {
        let server = hale.http_url();
        let args: Vec<&str> = args.into_iter().chain(["--server", server.as_str()]).collect();
        let (code, out, err) = cli(&args);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(err.contains("not_clustered") && err.contains("[cluster]"), "{args:?}: {err}");
    }
    assert!(hale.terminate().success());
}

/// A session given every node's address starts on a follower, follows it to the leader,
/// and when the leader is SIGKILLed while it checkpoints, resumes the same run on the new
/// leader: every checkpoint is answered, each once, at consecutive versions. The CLI,
/// given a dead node and a follower, reads through to the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_and_the_cli_given_every_node_follow_the_leader_through_its_sigkill() {
    let temp = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = form(temp.path());
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = leader(&all).await;
    // Followers first, so the first hello meets one.
    let mut order: Vec<&String> = addrs.iter().collect();
    order.sort_by_key(|addr| **addr == addrs[first as usize - 1]);
    let urls = order.iter().map(|addr| format!("ws://{addr}")).collect::<Vec<_>>().join(",");
    let policy = hale_client::Reconnect {
        base: std::time::Duration::from_millis(20),
        cap: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let options = hale_client::AgentOptions::new("writer", "writer").token(support::ADMIN).reconnect(policy);
    let agent = hale_client::Agent::connect(&urls, options).await.unwrap();
    let welcome = agent.resume().await.unwrap();
    assert_eq!((welcome.incarnation, welcome.version), (1, 0));

    // Checkpoints one after another, while the leader is killed after the tenth.
    let writer = agent.clone();
    let (tenth_tx, tenth) = tokio::sync::oneshot::channel();
    let writes = tokio::spawn(async move {
        let mut tenth_tx = Some(tenth_tx);
        let mut versions = Vec::new();
        for n in 1..=40u64 {
            versions
                .push(writer.checkpoint(json!({"n": n})).await.map_err(|error| format!("checkpoint {n}: {error}"))?);
            if n == 10 {
                let _ = tenth_tx.take().unwrap().send(());
            }
        }
        Ok::<_, String>(versions)
    });
    tenth.await.unwrap();
    nodes[first as usize - 1].take().unwrap().kill();
    let versions = writes.await.unwrap().unwrap();
    assert_eq!(versions, (1..=40).collect::<Vec<u64>>(), "each checkpoint applied once, none lost");
    assert_eq!(agent.incarnation(), Some(1), "the same run, resumed");

    // The CLI, given the dead node first and then a follower or the leader, finds the leader.
    let dead = format!("http://{}", addrs[first as usize - 1]);
    let rest: Vec<String> =
        (1..=3u64).filter(|id| *id != first).map(|id| format!("http://{}", addrs[id as usize - 1])).collect();
    let (code, out, err) = cli(&["state", "writer", "--server", &dead, "--server", &rest.join(",")]);
    assert_eq!(code, 0, "{out}{err}");
    let state: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((state["version"].as_u64(), state["state"]["n"].as_u64()), (Some(40), Some(40)), "{state}");
    agent.close(None).await.unwrap();
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// A data directory a single hale wrote becomes the first node of a cluster with
/// everything in it: `init` brings its log in, the nodes that join get it with the
/// snapshot, and after the first node is SIGKILLed the others still have it and go on
/// from it. A node with a single node's log of its own is refused a join, which would
/// lose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_data_directory_becomes_the_first_node_of_a_cluster_with_everything_intact() {
    let temp = tempfile::tempdir().unwrap();
    let single = |id: u64| {
        let mut command = Command::new(HALE);
        command.arg("serve").arg("--data").arg(data(temp.path(), id)).args(["--listen", "127.0.0.1:0"]);
        support::serve_with_command(command).unwrap()
    };
    let alone = single(1);
    let (code, body) = alone.post("/v1/agents/writer/hello", &json!({"role": "writer"}));
    assert_eq!(code, 200, "{body}");
    for n in 1..=7 {
        let (code, body) = checkpoint(&alone, n);
        assert_eq!(code, 200, "{body}");
    }
    assert!(alone.terminate().success());
    // Another single node's directory, to be refused a join.
    let other = single(4);
    assert_eq!(other.post("/v1/agents/other/hello", &json!({"role": "r"})).0, 200);
    assert!(other.terminate().success());

    let (first, first_addr) = fresh_node(temp.path(), 1);
    let (code, out, err) = cli(&["cluster", "init", "--server", &format!("http://{first_addr}")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("from this node's log (9 events)"), "init says what it brought in: {out}");
    let mut nodes = vec![Some(first), None, None];
    let mut addrs = vec![first_addr.clone()];
    for id in [2u64, 3] {
        let (hale, addr) = fresh_node(temp.path(), id);
        let (code, out, err) = cli(&["cluster", "join", &first_addr, "--server", &format!("http://{addr}")]);
        assert_eq!(code, 0, "node {id}: {out}{err}");
        nodes[id as usize - 1] = Some(hale);
        addrs.push(addr);
    }
    let (refused, refused_addr) = fresh_node(temp.path(), 4);
    let (code, _, err) = cli(&["cluster", "join", &first_addr, "--server", &format!("http://{refused_addr}")]);
    assert_eq!(code, 1);
    assert!(err.contains("cluster_refused") && err.contains("single node's log"), "{err}");
    assert!(refused.terminate().success());

    // The first node goes; the others have everything and go on from it.
    nodes[0].take().unwrap().kill();
    let rest: Vec<&str> = addrs[1..].iter().map(String::as_str).collect();
    let second = leader(&rest).await;
    let leading = nodes[second as usize - 1].as_ref().unwrap();
    let body = support::eventually("the new leader to answer reads", 30, || async {
        let (code, body) = leading.get("/v1/agents/writer/state");
        (code == 200).then_some(body)
    })
    .await;
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((state["version"].as_u64(), state["state"]["n"].as_u64()), (Some(7), Some(7)), "{state}");
    let answer = support::eventually("the new leader to take writes", 30, || async {
        let (code, body) = checkpoint(leading, 8);
        (code == 200).then_some(body)
    })
    .await;
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["version"], 8, "{answer}");
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// Every node SIGKILLed at once and started again from its directory: everything that
/// was acknowledged is there, and the cluster goes on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_sigkilled_and_restarted_keeps_everything_acknowledged() {
    let temp = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = form(temp.path());
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = leader(&all).await;
    let leading = nodes[first as usize - 1].as_ref().unwrap();
    assert_eq!(leading.post("/v1/agents/writer/hello", &json!({"role": "writer"})).0, 200);
    let mut acknowledged = 0;
    for n in 1..=25 {
        let (code, body) = checkpoint(leading, n);
        assert_eq!(code, 200, "{body}");
        acknowledged = n;
    }
    let (code, body) =
        leading.post("/v1/tasks", &json!({"role": "writer", "payload": {"q": 1}, "idempotency_key": "kept"}));
    assert_eq!(code, 200, "{body}");
    for node in nodes.iter_mut() {
        node.take().unwrap().kill();
    }
    for id in 1..=3u64 {
        nodes[id as usize - 1] = Some(node(temp.path(), id, &addrs[id as usize - 1]));
    }
    let again = leader(&all).await;
    let leading = nodes[again as usize - 1].as_ref().unwrap();
    let body = support::eventually("the restarted leader to answer reads", 30, || async {
        let (code, body) = leading.get("/v1/agents/writer/state");
        (code == 200).then_some(body)
    })
    .await;
    let state: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["version"].as_u64(), Some(acknowledged), "{state}");
    assert_eq!(state["state"]["n"].as_u64(), Some(acknowledged), "{state}");
    let (code, body) = leading.get("/v1/tasks");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"q\":1"), "the submitted task is there: {body}");
    let (code, body) = checkpoint(leading, 26);
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], 26);
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// Five voters survive two failures (the N+2 of the requirement): the leader and a
/// follower SIGKILLed, the other three elect a leader and take writes. Then members leave
/// one at a time: a dead one removed through a live node, and a live one leaving itself;
/// the cluster keeps taking writes with what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_voters_survive_two_failures_and_members_leave_one_at_a_time() {
    let temp = tempfile::tempdir().unwrap();
    let (mut nodes, addrs) = form_of(temp.path(), 5);
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = leader(&all).await;
    let leading = nodes[first as usize - 1].as_ref().unwrap();
    assert_eq!(leading.post("/v1/agents/writer/hello", &json!({"role": "writer"})).0, 200);
    for n in 1..=5 {
        assert_eq!(checkpoint(leading, n).0, 200);
    }
    let voters = |addr: &str| {
        let members = status(addr).unwrap()["members"].as_array().unwrap().clone();
        members.iter().filter(|member| member["voter"] == true).count()
    };
    assert_eq!(voters(&addrs[0]), 5);

    // Two down: the leader and a follower.
    let follower = (1..=5u64).find(|id| *id != first).unwrap();
    nodes[first as usize - 1].take().unwrap().kill();
    nodes[follower as usize - 1].take().unwrap().kill();
    let live: Vec<u64> = (1..=5u64).filter(|id| *id != first && *id != follower).collect();
    let live_addrs: Vec<&str> = live.iter().map(|id| addrs[*id as usize - 1].as_str()).collect();
    let second = leader(&live_addrs).await;
    let leading = nodes[second as usize - 1].as_ref().unwrap();
    let answer = support::eventually("three of five to take writes", 30, || async {
        let (code, body) = checkpoint(leading, 6);
        (code == 200).then_some(body)
    })
    .await;
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["version"], 6, "{answer}");

    // The dead follower is removed through any live node (the request finds the leader).
    let servers = live_addrs.iter().map(|addr| format!("http://{addr}")).collect::<Vec<_>>().join(",");
    let node_arg = follower.to_string();
    let (code, out, err) = cli(&["cluster", "leave", "--node", &node_arg, "--server", &servers]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(voters(live_addrs[0]), 4);
    // A live follower leaves by itself.
    let leaving = *live.iter().find(|id| **id != second).unwrap();
    let (code, out, err) = cli(&["cluster", "leave", "--server", &format!("http://{}", addrs[leaving as usize - 1])]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, body) = checkpoint(leading, 7);
    assert_eq!(code, 200, "{body}");
    assert_eq!(voters(&addrs[second as usize - 1]), 3);
    // A stranger is not a member.
    let (code, _, err) =
        cli(&["cluster", "leave", "--node", "42", "--server", &format!("http://{}", addrs[second as usize - 1])]);
    assert_eq!(code, 1);
    assert!(err.contains("not a member"), "{err}");
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// With TLS configured, nodes speak HTTPS to each other and verify each other against the
/// cluster's CA: a cluster forms, replicates and fails over; a client that does not trust
/// the CA, or speaks plain HTTP, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_serve_tls_replicate_and_fail_over_over_tls() {
    let temp = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = temp.path().join("node.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(temp.path().join("node-key.pem"), made.key_pair.serialize_pem()).unwrap();
    let ca = cert.display().to_string();
    let (mut nodes, mut addrs) = (Vec::new(), Vec::new());
    for id in 1..=3u64 {
        let (hale, addr) = fresh_node(temp.path(), id);
        nodes.push(Some(hale));
        addrs.push(addr);
    }
    let https = |addr: &str| format!("https://{addr}");
    let (code, out, err) = cli(&["cluster", "init", "--server", &https(&addrs[0]), "--ca-file", &ca]);
    assert_eq!(code, 0, "{out}{err}");
    for id in [2usize, 3] {
        let (code, out, err) =
            cli(&["cluster", "join", &addrs[0], "--server", &https(&addrs[id - 1]), "--ca-file", &ca]);
        assert_eq!(code, 0, "node {id}: {out}{err}");
    }
    let status = |addr: &str| {
        let (code, out, _) = cli(&["cluster", "status", "--json", "--server", &https(addr), "--ca-file", &ca]);
        (code == 0).then(|| serde_json::from_str::<Value>(&out).unwrap())
    };
    let leader_among = |addrs: Vec<String>| async move {
        support::eventually("a leader over TLS", 30, || async {
            let seen: Vec<Value> = addrs.iter().map(|addr| status(addr)).collect::<Option<_>>()?;
            let first = seen[0]["leader"].as_u64()?;
            let voters = seen[0]["members"].as_array()?.iter().filter(|member| member["voter"] == true).count();
            (voters == 3 && seen.iter().all(|status| status["leader"].as_u64() == Some(first))).then_some(first)
        })
        .await
    };
    let first = leader_among(addrs.clone()).await;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let post = |addr: String, path: &'static str, body: Value| {
        let client = client.clone();
        async move {
            let answer =
                client.post(format!("https://{addr}{path}")).bearer_auth(support::ADMIN).json(&body).send().await;
            match answer {
                Ok(answer) => (answer.status().as_u16(), answer.text().await.unwrap_or_default()),
                Err(error) => (0, error.to_string()),
            }
        }
    };
    let leading = addrs[first as usize - 1].clone();
    assert_eq!(post(leading.clone(), "/v1/agents/writer/hello", json!({"role": "writer"})).await.0, 200);
    for n in 1..=5 {
        let (code, body) =
            post(leading.clone(), "/v1/agents/writer/checkpoint", json!({"incarnation": 1, "patch": {"n": n}})).await;
        assert_eq!(code, 200, "{body}");
    }
    // Plain HTTP to a node's node-to-node route gets nothing.
    let plain = reqwest::Client::new().post(format!("http://{leading}/v1/cluster/raft/vote")).body("{}").send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    nodes[first as usize - 1].take().unwrap().kill();
    let rest: Vec<String> = (1..=3u64).filter(|id| *id != first).map(|id| addrs[id as usize - 1].clone()).collect();
    let answer = support::eventually("a new leader over TLS to take writes", 30, || {
        let rest = rest.clone();
        let post = &post;
        async move {
            for addr in rest {
                let (code, body) =
                    post(addr, "/v1/agents/writer/checkpoint", json!({"incarnation": 1, "patch": {"n": 6}})).await;
                if code == 200 {
                    return Some(body);
                }
            }
            None
        }
    })
    .await;
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["version"], 6, "{answer}");
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// A follower that was stopped (SIGSTOP) for several election timeouts and resumes does
/// not depose the leader the others still hear: it asks them first (a pre-vote) and
/// stands only if a majority has not heard a leader either. The term stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_back_from_a_pause_does_not_depose_a_healthy_leader() {
    let temp = tempfile::tempdir().unwrap();
    let (nodes, addrs) = form(temp.path());
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let first = leader(&all).await;
    let term = status(&addrs[first as usize - 1]).unwrap()["term"].as_u64().unwrap();
    let follower = (1..=3u64).find(|id| *id != first).unwrap();
    let paused = nodes[follower as usize - 1].as_ref().unwrap().pid();
    nix::sys::signal::kill(paused, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The fault itself: stopped for three times the longest election timeout (2 s here),
    // so every timer it has has run out when it resumes.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    nix::sys::signal::kill(paused, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Caught up again: it has heard the leader, and everyone still agrees on it.
    let target = status(&addrs[first as usize - 1]).unwrap()["last_log_index"].as_u64().unwrap();
    support::eventually("the resumed follower to catch up", 30, || async {
        let applied = status(&addrs[follower as usize - 1])?["last_applied_index"].as_u64()?;
        (applied >= target).then_some(())
    })
    .await;
    // What must not happen needs a window to (not) happen in: two election timeouts.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    for addr in &addrs {
        let seen = status(addr).unwrap();
        assert_eq!((seen["leader"].as_u64(), seen["term"].as_u64()), (Some(first), Some(term)), "{addr}: {seen}");
    }
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}
