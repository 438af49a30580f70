//! The Rust client survives hale: SIGKILL hale while agents checkpoint as fast as they
//! can, start it again on the same address; the agents reconnect by themselves (backoff
//! with jitter), resume the same run, and every checkpoint they were told succeeded is in
//! the state exactly once.

use crate::support::{self, ADMIN};
use hale_client::{Agent, AgentOptions, Reconnect};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const AGENTS: usize = 8;

#[tokio::test]
async fn agents_reconnect_after_hale_is_sigkilled_and_no_checkpoint_is_lost_or_applied_twice() {
    let temp = tempfile::tempdir().unwrap();
    let listen = support::free_address();
    let hale = support::serve_on(temp.path(), &listen);
    let url = hale.ws_url();
    let policy = Reconnect { base: Duration::from_millis(20), cap: Duration::from_millis(500), ..Reconnect::default() };
    let running = Arc::new(AtomicBool::new(true));
    // Per agent, how many checkpoints were acknowledged so far.
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..AGENTS).map(|_| AtomicU64::new(0)).collect());
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..AGENTS {
        let options = AgentOptions::new(format!("steady-{index}"), "r").token(ADMIN).reconnect(policy.clone());
        let agent = Agent::connect(&url, options).await.unwrap();
        let incarnation = agent.resume().await.unwrap().incarnation;
        let (running, progress) = (running.clone(), progress.clone());
        workers.spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                n += 1;
                match agent.checkpoint(json!({ format!("c{n}"): n })).await {
                    Ok(version) => {
                        acked.push((n, version));
                        progress[index].store(acked.len() as u64, Ordering::SeqCst);
                    }
                    Err(error) => panic!("steady-{index}: checkpoint {n} failed: {error}"),
                }
            }
            (index, incarnation, acked, agent)
        });
    }
    let acknowledged = |progress: &[AtomicU64]| progress.iter().map(|p| p.load(Ordering::SeqCst)).collect::<Vec<_>>();
    support::wait_until("every agent past 5 acknowledged checkpoints", 30, || {
        let now = acknowledged(&progress);
        async move { if now.iter().all(|&count| count > 5) { Ok(()) } else { Err(format!("{now:?}")) } }
    })
    .await;
    hale.kill();
    let at_kill = acknowledged(&progress);
    // The outage: long enough for the clients' first retries to fail and back off.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hale = support::serve_on(temp.path(), &listen);
    // They go on after the restart, then stop: three more acknowledged checkpoints each (at
    // most one was still in flight to the old hale, so the new one took at least two).
    support::wait_until("every agent three checkpoints on after the restart", 30, || {
        let now = acknowledged(&progress);
        let on = now.iter().zip(&at_kill).all(|(now, before)| *now >= before + 3);
        let seen = format!("{now:?}, at the kill {at_kill:?}");
        async move { if on { Ok(()) } else { Err(seen) } }
    })
    .await;
    running.store(false, Ordering::Relaxed);
    let admin = hale.admin();
    while let Some(joined) = workers.join_next().await {
        let (index, incarnation, acked, agent) = joined.unwrap();
        assert_eq!(agent.incarnation(), Some(incarnation), "steady-{index} kept its run");
        let state = admin.state(&format!("steady-{index}"), None).await.unwrap();
        // Versions are 1, 2, 3… in the order of the checkpoints, none skipped or doubled.
        let versions: Vec<u64> = acked.iter().map(|(_, version)| *version).collect();
        assert_eq!(versions, (1..=acked.len() as u64).collect::<Vec<_>>(), "steady-{index}");
        assert_eq!(state.version, acked.len() as u64, "steady-{index}: applied once each");
        for (n, _) in &acked {
            assert_eq!(state.state[format!("c{n}")], json!(n), "steady-{index} lost checkpoint {n}");
        }
        assert_eq!(state.state.as_object().unwrap().len(), acked.len(), "steady-{index}: nothing extra");
        assert!(acked.len() > 5, "steady-{index} barely worked: {}", acked.len());
    }
}

/// A TCP proxy in front of hale that the test can cut: open connections are dropped and
/// new ones refused until it is restored. It records when connections were attempted.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    attempts: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

async fn proxy(target: std::net::SocketAddr) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (cut_flag, log, current) = (cut.clone(), attempts.clone(), generation.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            log.lock().unwrap().push(std::time::Instant::now());
            if cut_flag.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let mine = current.load(Ordering::SeqCst);
            let current = current.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                let copying = tokio::io::copy_bidirectional(&mut client, &mut server);
                let severed = async {
                    while current.load(Ordering::SeqCst) == mine {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                };
                tokio::select! { _ = copying => {}, _ = severed => {} }
            });
        }
    });
    Proxy { addr, cut, attempts, generation }
}

impl Proxy {
    fn sever(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_network_cut_is_ridden_out_with_jittered_backoff_and_buffered_writes_flushed_in_order() {
    const CLIENTS: usize = 20;
    let temp = tempfile::tempdir().unwrap();
    let hale = support::serve(temp.path(), &[]);
    let proxy = proxy(hale.addr).await;
    let url = format!("ws://{}", proxy.addr);
    let policy = Reconnect { base: Duration::from_millis(50), cap: Duration::from_millis(400), ..Reconnect::default() };
    let mut agents = Vec::new();
    for index in 0..CLIENTS {
        let options = AgentOptions::new(format!("cut-{index}"), "r").token(ADMIN).reconnect(policy.clone());
        let agent = Agent::connect(&url, options).await.unwrap();
        agent.resume().await.unwrap();
        agent.checkpoint(json!({"before": true})).await.unwrap();
        agents.push(agent);
    }
    proxy.sever();
    let severed_at = std::time::Instant::now();
    // Written while the network is down: they wait in each client's queue.
    let mut writes = tokio::task::JoinSet::new();
    for (index, agent) in agents.iter().enumerate() {
        let agent = agent.clone();
        writes.spawn(async move {
            let mut versions = Vec::new();
            for n in 1..=5u64 {
                versions.push((n, agent.checkpoint(json!({ format!("w{n}"): n })).await.unwrap()));
            }
            (index, versions)
        });
    }
    let since_cut = || -> Vec<Duration> {
        let attempts = proxy.attempts.lock().unwrap();
        attempts.iter().filter(|at| **at > severed_at).map(|at| at.duration_since(severed_at)).collect()
    };
    support::wait_until("every client retried during the cut", 30, || {
        let made = since_cut().len();
        async move { if made >= CLIENTS { Ok(()) } else { Err(format!("{made} attempts")) } }
    })
    .await;
    // Each client retried on its own schedule: the first retries after the cut are spread.
    let firsts = since_cut();
    assert!(firsts.len() >= CLIENTS, "every client retried during the cut: {} attempts", firsts.len());
    let mut sorted: Vec<u128> = firsts.iter().take(CLIENTS).map(Duration::as_millis).collect();
    sorted.sort_unstable();
    let spread = sorted[sorted.len() - 1] - sorted[0];
    assert!(spread >= 20, "the first retries of {CLIENTS} clients came within {spread} ms: no jitter? {sorted:?}");
    proxy.restore();
    let admin = hale.admin();
    while let Some(done) = writes.join_next().await {
        let (index, versions) = done.unwrap();
        // Flushed in order: w1..w5 made versions 2..6.
        assert_eq!(versions, (1..=5).map(|n| (n, n + 1)).collect::<Vec<_>>(), "cut-{index}");
        let state = admin.state(&format!("cut-{index}"), None).await.unwrap();
        assert_eq!(state.version, 6, "cut-{index}: each write applied once");
    }
    println!("first reconnect attempts after the cut (ms): {sorted:?}");
}

#[tokio::test]
async fn a_heartbeat_task_reports_progress_and_close_checkpoints_then_ends_the_session_cleanly() {
    let temp = tempfile::tempdir().unwrap();
    let hale = support::serve(temp.path(), &[]);
    let agent = hale.connect(AgentOptions::new("tidy", "r")).await;
    agent.resume().await.unwrap();
    let step = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = step.clone();
    let beats = agent.spawn_heartbeats(Duration::from_millis(100), move || {
        Some(hale_client::ProgressBody {
            message: Some(format!("step {}", counter.load(Ordering::Relaxed))),
            ..Default::default()
        })
    });
    step.store(7, Ordering::Relaxed);
    let admin = hale.admin();
    support::eventually("the heartbeat task's progress is seen", 10, || async {
        let agents = admin.agents().await.ok()?;
        let tidy = agents.into_iter().find(|agent| agent.agent == "tidy")?;
        (tidy.attached && tidy.progress.as_ref()?.message.as_deref() == Some("step 7")).then_some(())
    })
    .await;
    agent.close(Some(json!({"stopped_at": 7}))).await.unwrap();
    assert_eq!(agent.ended().await, "closed by the agent");
    tokio::time::timeout(Duration::from_secs(5), beats)
        .await
        .expect("the heartbeat task ends with the session")
        .unwrap();
    let state = admin.state("tidy", None).await.unwrap();
    assert_eq!(state.state["stopped_at"], json!(7));
    support::eventually("the session is gone", 10, || async {
        let tidy = admin.agents().await.ok()?.into_iter().find(|agent| agent.agent == "tidy")?;
        (!tidy.attached).then_some(())
    })
    .await;
}
