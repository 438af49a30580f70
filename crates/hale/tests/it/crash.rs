//! Crash consistency with the real binary: clients checkpoint as fast as they can while
//! hale is SIGKILLed at random moments, over and over; after every restart each
//! acknowledged checkpoint must be there, and nothing may be ahead of what was sent.

use crate::support::{self, serve};
use hale_client::{Admin, AgentOptions};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CLIENTS: usize = 4;
const LANES: usize = 2;
const CYCLES: usize = 100;

/// What one client was told and what it sent, over all cycles.
#[derive(Clone, Default)]
struct Ledger {
    /// version -> (lane, n): acknowledged checkpoints of the current cycle.
    acked: BTreeMap<u64, (usize, u64)>,
    /// Per lane, the highest n ever sent (acknowledged or not).
    sent: [u64; LANES],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_checkpoint_survives_repeated_sigkill() {
    let seed = support::seed("crash");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let temp = tempfile::tempdir().unwrap();
    // Frequent snapshots so kills also land during snapshot writes.
    let flags = ["--snapshot-every-events", "150"];
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let mut total_acked = 0usize;

    for cycle in 0..CYCLES {
        let hale = serve(temp.path(), &flags);
        let admin = hale.admin();
        // After the restart: every acknowledged checkpoint of the last cycle is there, and
        // the state is not ahead of what was sent.
        for (client, ledger) in ledgers.iter().enumerate() {
            let seen = ledger.lock().unwrap().clone();
            check_after_restart(&admin, client, &seen, cycle, seed).await;
            ledger.lock().unwrap().acked.clear();
        }

        let mut workers = tokio::task::JoinSet::new();
        for (client, ledger) in ledgers.iter().enumerate() {
            let agent = hale.connect(AgentOptions::new(format!("crash-{client}"), "crash")).await;
            agent.resume().await.unwrap();
            for lane in 0..LANES {
                let (agent, ledger) = (agent.clone(), ledger.clone());
                workers.spawn(async move {
                    loop {
                        let n = {
                            let mut ledger = ledger.lock().unwrap();
                            ledger.sent[lane] += 1;
                            ledger.sent[lane]
                        };
                        match agent.checkpoint(json!({ format!("lane{lane}"): n })).await {
                            Ok(version) => {
                                ledger.lock().unwrap().acked.insert(version, (lane, n));
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..=200))).await;
        hale.kill();
        while workers.join_next().await.is_some() {}
        total_acked += ledgers.iter().map(|ledger| ledger.lock().unwrap().acked.len()).sum::<usize>();
    }
    assert!(total_acked > CYCLES * CLIENTS, "the load was too light to mean anything: {total_acked} acks");

    // Finally every snapshot left behind must equal the fold of the log up to it.
    let hale = serve(temp.path(), &flags);
    for (client, ledger) in ledgers.iter().enumerate() {
        let seen = ledger.lock().unwrap().clone();
        check_after_restart(&hale.admin(), client, &seen, CYCLES, seed).await;
    }
    assert!(hale.terminate().success());
    let (code, out, err) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 0, "verify found damage (seed {seed}):\n{out}\n{err}");
    eprintln!("crash: {CYCLES} SIGKILLs, {total_acked} acknowledged checkpoints, all present");
}

async fn check_after_restart(admin: &Admin, client: usize, ledger: &Ledger, cycle: usize, seed: u64) {
    let Some((&newest_acked, _)) = ledger.acked.last_key_value() else { return };
    let agent = format!("crash-{client}");
    let current = admin.state(&agent, None).await.unwrap();
    let context = format!("cycle {cycle}, {agent}, seed {seed}");
    assert!(current.version >= newest_acked, "{context}: version {} < acknowledged {newest_acked}", current.version);
    for lane in 0..LANES {
        let value = current.state[format!("lane{lane}")].as_u64().unwrap_or(0);
        assert!(value <= ledger.sent[lane], "{context}: lane{lane} = {value}, ahead of the {} sent", ledger.sent[lane]);
    }
    // Each acknowledged version still in the history holds exactly the patch that made it.
    let oldest = current.history.first().copied().unwrap_or(0);
    for (&version, &(lane, n)) in ledger.acked.range(oldest..) {
        let at = admin.state(&agent, Some(version)).await.unwrap();
        assert_eq!(at.state[format!("lane{lane}")], json!(n), "{context}: version {version} lost lane{lane}={n}");
    }
}
