//! The Rust client survives hale: SIGKILL hale while agents checkpoint as fast as they
//! can, start it again on the same address; the agents reconnect by themselves (backoff
//! with jitter), resume the same run, and every checkpoint they were told succeeded is in
//! the state exactly once.

use crate::support::{self, ADMIN};
use hale_client::{Agent, AgentOptions, Reconnect};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..AGENTS {
        let options = AgentOptions::new(format!("steady-{index}"), "r").token(ADMIN).reconnect(policy.clone());
        let agent = Agent::connect(&url, options).await.unwrap();
        let incarnation = agent.resume().await.unwrap().incarnation;
        let running = running.clone();
        workers.spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                n += 1;
                match agent.checkpoint(json!({ format!("c{n}"): n })).await {
                    Ok(version) => acked.push((n, version)),
                    Err(error) => panic!("steady-{index}: checkpoint {n} failed: {error}"),
                }
            }
            (index, incarnation, acked, agent)
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    hale.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hale = support::serve_on(temp.path(), &listen);
    // Let them go on a while after the restart, then stop.
    tokio::time::sleep(Duration::from_millis(700)).await;
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
