//! The supervisor with a real log and real processes. Waits poll for the condition they
//! assert, with a deadline.

use super::*;
use crate::engine::{EngineOptions, SnapshotPolicy};
use hale_core::supervision::{RestartPolicy, Supervision};
use hale_core::{Core, Limits};
use std::time::Instant;

const PATIENCE: Duration = Duration::from_secs(30);

async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An engine on a real log in `dir`, and the receiver of its effects.
fn engine(dir: &std::path::Path) -> (Engine, mpsc::UnboundedReceiver<Effect>) {
    let log = hale_store::Log::open(&dir.join("hale.db")).unwrap();
    let writer = hale_store::Writer::start(log, 0, hale_store::WriterOptions::default());
    let (effects_tx, effects) = mpsc::unbounded_channel();
    let options = EngineOptions {
        snapshots: SnapshotPolicy {
            dir: dir.join("snapshots"),
            every_events: u64::MAX,
            every: Duration::from_secs(3_600),
            kept: 1,
        },
        effects: effects_tx,
        key: None,
        metrics: Arc::new(crate::metrics::Metrics::new(0, 0, dir.join("snapshots"))),
        clock: crate::Clock::system(),
        tick: Some(Duration::from_millis(50)),
        unsnapshotted: 0,
    };
    (Engine::start(Core::new(Limits::default()), 0, writer, options), effects)
}

fn config(dir: &std::path::Path, agent: &AgentName, command: &str) -> SupervisorConfig {
    let logs_dir = dir.join("logs");
    std::fs::create_dir_all(&logs_dir).unwrap();
    let spec = ProcessSpec { command: "sh".into(), args: vec!["-c".into(), command.into()], ..ProcessSpec::default() };
    SupervisorConfig {
        agents: vec![ManagedAgent {
            name: agent.clone(),
            spec,
            logs: Arc::new(AgentLogs::new(&logs_dir, agent.as_str(), 1 << 20, 1)),
            sample_usage: false,
            probe: None,
        }],
        templates: BTreeMap::new(),
        hale_url: "ws://127.0.0.1:1".into(),
        stop_grace: Duration::from_secs(2),
        rotate_every: Duration::from_secs(60),
        supervisor_id: dir.to_string_lossy().into_owned(),
        logs_dir,
        log_bytes_max: 1 << 20,
        logs_kept: 1,
        auth: None,
        ca_file: None,
        workdir_base: dir.join("agents"),
        cgroups: Arc::new(Cgroups::None { reason: "not needed by this test".into() }),
        reporter: None,
    }
}

/// The window `Keeper::adopt` used to leave open: hale's start-up scan saw the logged
/// process of the current run alive, and it died before the keeper looked. The keeper
/// then started a new process under the same incarnation, with no down logged and no
/// restart counted. Now that run is reported down and the next incarnation starts.
#[tokio::test]
async fn a_process_that_dies_between_the_scan_and_its_adoption_is_down_and_replaced_by_a_new_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, mut effects) = engine(dir.path());
    let agent = AgentName::new("a").unwrap();
    let role = hale_core::supervision::default_role(&agent);
    let supervision = Supervision { restart: RestartPolicy::Always, ..Supervision::default() };
    let declare =
        SupervisionCommand::Declare { agent: agent.clone(), role: role.clone(), labels: BTreeMap::new(), supervision };
    engine.execute(declare).await.unwrap();
    engine.execute(SupervisionCommand::StartManaged { agent: agent.clone() }).await.unwrap();
    // An earlier hale started incarnation 1 and logged its process.
    let mut earlier = std::process::Command::new("sleep").arg("100").spawn().unwrap();
    let pid = earlier.id();
    let start_ticks = process::start_ticks(pid).unwrap();
    let logged = ProcessRef { pid, start_ticks };
    let started = SupervisionCommand::ProcessStarted { agent: agent.clone(), incarnation: 1, process: logged };
    engine.execute(started).await.unwrap();
    while effects.try_recv().is_ok() {}

    let supervisor = Arc::new(Supervisor::start(engine.clone(), config(dir.path(), &agent, "exec sleep 100")));
    let routed = supervisor.clone();
    tokio::spawn(async move {
        while let Some(effect) = effects.recv().await {
            routed.dispatch(effect);
        }
    });
    // The scan saw it alive; it dies now, before the keeper gets to it.
    earlier.kill().unwrap();
    earlier.wait().unwrap();
    supervisor.dispatch(Effect::Spawn { agent: agent.clone(), role, incarnation: 1 });

    let name = agent.clone();
    let (down, process, restarts) = eventually("incarnation 2 running", async || {
        let name = name.clone();
        engine
            .read(move |state| {
                let record = state.agent(name.as_str())?;
                let managed = record.managed.as_ref()?;
                (record.incarnation == 2 && managed.status == ManagedStatus::Running)
                    .then(|| (record.down.clone(), managed.process, managed.restarts))
            })
            .await
            .unwrap()
    })
    .await;
    let down = down.expect("incarnation 1's down is logged");
    assert_eq!((down.incarnation, down.cause), (1, Cause::Vanished));
    assert_eq!(restarts, 1, "the replacement is counted as a restart");
    let process = process.expect("incarnation 2 has a process");
    assert_ne!(process.pid, pid);
    let machine = process::find_agents(&dir.path().to_string_lossy());
    let runs: Vec<u64> = machine.iter().filter(|found| found.agent == "a").map(|found| found.incarnation).collect();
    assert_eq!(runs, [2], "one process, of incarnation 2, and none started under incarnation 1");
    supervisor.stop_all(Duration::from_secs(2)).await;
}
