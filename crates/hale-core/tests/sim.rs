//! A deterministic simulation of the core: one u64 seed drives random submissions, agent
//! crashes, restarts and reconnects, lost and duplicated messages, clock jumps (forward,
//! and small steps back) and restarts of hale itself (a replay of the log). No I/O: the
//! core is driven through its public API, as the shell drives it.
//!
//! After every step it checks the safety properties:
//! * no acknowledged task is lost: every `TaskSubmitted` in the log is in the state;
//! * no task is completed twice, or completed and also failed or cancelled;
//! * no step or completion is accepted from a fenced incarnation (down or superseded);
//! * a running task's lease belongs to its agent's current, live incarnation, and the
//!   indexes agree with the tasks;
//! * a replay of the log gives the live state (at every restart of hale).
//!
//! Then faults stop and agents behave (the liveness phase): every task must end.
//!
//! `HALE_SIM_SEEDS=N` runs N seeds (default 1000); `HALE_SIM_SEED=S` runs seed S alone and
//! prints its trace. A failure prints its seed and the command that replays it.

use hale_core::supervision::Cause;
use hale_core::tasks::{Budget, Level, Priority, Rung, Shadow, Spend, TaskSpec, TaskStatus};
use hale_core::{AgentName, Command, Core, Effect, Event, Hello, Limits, Rng, RoleName, Timestamp};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

const AGENTS: [(&str, &str); 5] =
    [("coder-1", "coder"), ("coder-2", "coder"), ("coder-3", "coder"), ("small-1", "small"), ("small-2", "small")];
const FAULT_STEPS: u32 = 250;
const CALM_STEPS: u32 = 600;

/// What one agent process believes.
#[derive(Clone, Debug, Default)]
struct Process {
    /// The incarnation it runs as, if it is running.
    incarnation: Option<u64>,
    /// Hung: running but not beating or working.
    hung: bool,
    /// Tasks it believes it holds, with the steps it did.
    held: BTreeMap<u64, u32>,
    /// Open reservations.
    reservations: Vec<u64>,
}

struct Sim {
    rng: Rng,
    core: Core,
    now: u64,
    log: Vec<(Timestamp, Event)>,
    processes: BTreeMap<AgentName, Process>,
    /// Processes cut off by a partition that still run and still write, as their old
    /// incarnation, while hale has replaced them.
    zombies: Vec<(AgentName, Process)>,
    /// Incarnations that were fenced, with when.
    fenced: BTreeSet<(AgentName, u64)>,
    completed: BTreeMap<u64, u32>,
    ended: BTreeMap<u64, u32>,
    keys: Vec<String>,
    trace: bool,
    faults: bool,
}

fn name(text: &str) -> AgentName {
    AgentName::new(text).unwrap()
}

fn role(text: &str) -> RoleName {
    RoleName::new(text).unwrap()
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut processes = BTreeMap::new();
        for (agent, _) in AGENTS {
            processes.insert(name(agent), Process::default());
        }
        Sim {
            rng: Rng::new(seed),
            core: Core::new(Limits::default()),
            now: 1_700_000_000_000,
            log: Vec::new(),
            processes,
            zombies: Vec::new(),
            fenced: BTreeSet::new(),
            completed: BTreeMap::new(),
            ended: BTreeMap::new(),
            keys: Vec::new(),
            trace,
            faults: true,
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.up_to(99) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        Some(items[self.rng.up_to(items.len() as u64 - 1) as usize].clone())
    }

    fn at(&self) -> Timestamp {
        Timestamp(self.now)
    }

    /// Executes a command; logs and checks its events. Returns whether it was accepted.
    fn run(&mut self, command: &Command) -> bool {
        let now = self.at();
        match self.core.execute(command, now) {
            Ok(events) => {
                if self.trace {
                    println!("{now:?} {command:?}\n    -> {events:?}");
                }
                self.check_writer(command);
                for event in events {
                    self.observe(&event);
                    self.log.push((now, event));
                }
                true
            }
            Err(rejection) => {
                if self.trace {
                    println!("{now:?} {command:?}\n    refused: {}", rejection.code());
                }
                false
            }
        }
    }

    /// A write accepted from a fenced incarnation would be a lost fence.
    fn check_writer(&self, command: &Command) {
        if let Command::CommitStep { agent, incarnation, .. }
        | Command::CompleteTask { agent, incarnation, .. }
        | Command::IntendStep { agent, incarnation, .. } = command
        {
            assert!(
                !self.fenced.contains(&(agent.clone(), *incarnation)),
                "a write from fenced incarnation {incarnation} of {agent} was accepted: {command:?}"
            );
        }
    }

    fn observe(&mut self, event: &Event) {
        match event {
            Event::AgentDown { agent, incarnation, .. } => {
                self.fenced.insert((agent.clone(), *incarnation));
            }
            Event::IncarnationStarted { agent, incarnation } if *incarnation > 1 => {
                self.fenced.insert((agent.clone(), incarnation - 1));
            }
            Event::TaskCompleted { task, .. } => {
                *self.completed.entry(*task).or_default() += 1;
                *self.ended.entry(*task).or_default() += 1;
            }
            Event::TaskFailed { task, .. } | Event::TaskCancelled { task } => {
                *self.ended.entry(*task).or_default() += 1;
            }
            _ => {}
        }
    }

    /// Hands the effects to the processes; a lost message is dropped.
    fn deliver(&mut self) {
        while let Some(effect) = self.core.poll_effect() {
            if self.faults && self.chance(10) {
                continue;
            }
            match effect {
                Effect::OfferTask { agent, incarnation, task } => {
                    if let Some(process) = self.processes.get_mut(&agent)
                        && process.incarnation == Some(incarnation)
                    {
                        process.held.entry(task).or_default();
                    }
                }
                Effect::CancelTask { agent, task, .. } => {
                    if let Some(process) = self.processes.get_mut(&agent) {
                        process.held.remove(&task);
                    }
                }
                Effect::Fence { agent, incarnation, .. } => {
                    if let Some(process) = self.processes.get_mut(&agent)
                        && process.incarnation == Some(incarnation)
                    {
                        // A fenced process stops (as the client does on `fenced`).
                        *process = Process::default();
                    }
                }
                _ => {}
            }
        }
    }

    fn hello(&mut self, agent: &AgentName, resume: Option<u64>) {
        let of = AGENTS.iter().find(|(each, _)| *each == agent.as_str()).unwrap().1;
        let hello = Hello { agent: agent.clone(), role: role(of), labels: BTreeMap::new(), incarnation: resume };
        let now = self.at();
        if self.run(&Command::Hello(hello)) {
            let incarnation = self.core.state().agent(agent.as_str()).unwrap().incarnation;
            let process = self.processes.get_mut(agent).unwrap();
            if resume.is_none() {
                *process = Process::default();
            }
            process.incarnation = Some(incarnation);
            process.hung = false;
            let _ = self.core.heartbeat(now, agent, incarnation, None);
        } else if resume.is_some() {
            // Refused resume: the process starts a new run.
            self.hello(agent, None);
        }
    }

    fn submit(&mut self) {
        let priority =
            self.pick(&[Priority::Critical, Priority::High, Priority::Normal, Priority::Background]).unwrap();
        let mut spec = TaskSpec { priority, ..TaskSpec::new(role("coder"), json!({"n": self.rng.up_to(1000)})) };
        spec.max_attempts = 1 + self.rng.up_to(3) as u32;
        if self.chance(30) {
            spec.retry_backoff_ms = self.rng.up_to(2_000);
        }
        if self.chance(20) {
            let key = format!("key-{}", self.rng.up_to(20));
            self.keys.push(key.clone());
            spec.idempotency_key = Some(key);
        }
        if self.chance(15) {
            spec.shadow = Some(Shadow { count: 2, quorum: if self.chance(50) { Some(2) } else { None } });
        }
        if self.chance(30) {
            spec.fallback = vec![Rung { role: role("small"), level: Level::GoodEnough }];
        }
        if self.chance(10) {
            spec.deadline = Some(Timestamp(self.now + self.rng.up_to(20_000)));
        }
        if self.chance(15) {
            spec.budget = Some(Budget { tokens: Some(1_000), cost: None, wall_ms: None });
        }
        let repeat = if self.faults && self.chance(10) { 2 } else { 1 };
        for _ in 0..repeat {
            self.run(&Command::SubmitTask { spec: spec.clone() });
        }
    }

    /// One step of one agent's process: beat, work on what it holds, maybe ask for work.
    fn act(&mut self, agent: &AgentName) {
        let process = self.processes[agent].clone();
        let Some(incarnation) = process.incarnation else { return };
        if process.hung {
            return;
        }
        let now = self.at();
        if !self.faults || self.chance(92) {
            let _ = self.core.heartbeat(now, agent, incarnation, None);
        }
        // An agent that lost an offer finds its leases by asking (GET /v1/agents/{a}/tasks).
        if self.chance(if self.faults { 10 } else { 50 }) {
            let leased: Vec<u64> = self
                .core
                .state()
                .tasks()
                .running_on(agent)
                .filter(|task| task.holder().is_some_and(|(_, held)| held == incarnation))
                .map(|task| task.id)
                .collect();
            let process = self.processes.get_mut(agent).unwrap();
            for task in leased {
                process.held.entry(task).or_default();
            }
        }
        let held: Vec<u64> = self.processes[agent].held.keys().copied().collect();
        let Some(task) = self.pick(&held) else { return };
        let done = self.processes[agent].held[&task];
        let write = |command: Command| command;
        let command = match self.rng.up_to(9) {
            0..=2 if done < 3 => {
                let step = format!("step-{done}");
                if self.chance(50) {
                    self.run(&write(Command::IntendStep {
                        task,
                        agent: agent.clone(),
                        incarnation,
                        name: step.clone(),
                    }));
                }
                let compensation = self.chance(40).then(|| json!({"undo": step}));
                Command::CommitStep {
                    task,
                    agent: agent.clone(),
                    incarnation,
                    name: step,
                    result: json!(done),
                    llm: None,
                    compensation,
                }
            }
            3 if self.faults => Command::FailTask {
                task,
                agent: agent.clone(),
                incarnation,
                reason: "tool error".into(),
                retry: self.chance(80),
            },
            4 if self.faults => {
                let spend = Spend { tokens: self.rng.up_to(800), cost: 0 };
                let command = Command::Reserve { agent: agent.clone(), incarnation, task: Some(task), spend };
                if self.run(&command)
                    && let Some((_, Event::BudgetReserved { reservation, .. })) = self.log.last()
                {
                    let reservation = *reservation;
                    self.processes.get_mut(agent).unwrap().reservations.push(reservation);
                }
                return;
            }
            5 if self.faults => {
                let reservation = self.processes.get_mut(agent).unwrap().reservations.pop();
                let spend = Spend { tokens: self.rng.up_to(900), cost: 0 };
                Command::ReportSpend { agent: agent.clone(), incarnation, task: Some(task), reservation, spend }
            }
            _ => Command::CompleteTask { task, agent: agent.clone(), incarnation, result: json!(task % 2) },
        };
        let accepted = self.run(&command);
        let duplicate = self.faults && self.chance(5);
        if duplicate {
            self.run(&command);
        }
        let process = self.processes.get_mut(agent).unwrap();
        match command {
            Command::CommitStep { .. } if accepted => *process.held.get_mut(&task).unwrap() += 1,
            Command::CommitStep { .. } | Command::CompleteTask { .. } | Command::FailTask { .. } => {
                process.held.remove(&task);
            }
            _ => {}
        }
    }

    /// A fault, now and then.
    fn fault(&mut self) {
        let agents: Vec<AgentName> = self.processes.keys().cloned().collect();
        let agent = self.pick(&agents).unwrap();
        match self.rng.up_to(99) {
            // Crash: the process dies; hale sees the exit (or, half the time, only silence).
            0..=11 => {
                if let Some(incarnation) = self.processes[&agent].incarnation {
                    *self.processes.get_mut(&agent).unwrap() = Process::default();
                    if self.chance(50) {
                        let cause = Cause::Exited { code: None, signal: Some(9) };
                        self.run(&Command::ReportDown { agent: agent.clone(), incarnation, cause });
                    }
                }
            }
            // Hang: alive but silent.
            12..=15 => {
                if let Some(process) = self.processes.get_mut(&agent) {
                    process.hung = process.incarnation.is_some();
                }
            }
            // A network blip: the process reconnects and resumes its run.
            16..=25 => {
                if let Some(incarnation) = self.processes[&agent].incarnation {
                    self.hello(&agent, Some(incarnation));
                }
            }
            // A partition: the process runs on, cut off; hale will replace it.
            46..=52 => {
                let process = std::mem::take(self.processes.get_mut(&agent).unwrap());
                if process.incarnation.is_some() {
                    self.zombies.push((agent, process));
                }
            }
            // The clock jumps forward, or steps back a little.
            26..=29 => self.now += 5_000 + self.rng.up_to(55_000),
            30..=32 => self.now = self.now.saturating_sub(self.rng.up_to(1_000)),
            // hale restarts: the state is a replay of the log.
            33..=35 => self.restart_hale(),
            // The operator cancels something.
            36..=45 => {
                let count = self.core.state().tasks().all().count() as u64;
                if count > 0 {
                    let task = 1 + self.rng.up_to(count - 1);
                    self.run(&Command::CancelTask { task });
                }
            }
            _ => {}
        }
    }

    /// Cut-off processes write what they would have written: every such write must be
    /// refused once hale has fenced their incarnation.
    fn haunt(&mut self) {
        if !self.faults {
            self.zombies.clear();
            return;
        }
        for index in 0..self.zombies.len() {
            if !self.chance(30) {
                continue;
            }
            let (agent, process) = self.zombies[index].clone();
            let incarnation = process.incarnation.expect("zombies ran");
            let held: Vec<u64> = process.held.keys().copied().collect();
            let Some(task) = self.pick(&held) else { continue };
            let command = match self.rng.up_to(2) {
                0 => Command::IntendStep { task, agent: agent.clone(), incarnation, name: "zombie".into() },
                1 => Command::CommitStep {
                    task,
                    agent: agent.clone(),
                    incarnation,
                    name: "zombie".into(),
                    result: json!("stale"),
                    llm: None,
                    compensation: None,
                },
                _ => Command::CompleteTask { task, agent: agent.clone(), incarnation, result: json!("stale") },
            };
            self.run(&command);
        }
    }

    fn restart_hale(&mut self) {
        let mut replayed = Core::new(Limits::default());
        for (at, event) in &self.log {
            replayed.apply(*at, event);
        }
        assert!(replayed.state() == self.core.state(), "a replay of the log differs from the live state");
        replayed.begin_grace(self.at());
        self.core = replayed;
        if self.trace {
            println!("{:?} hale restarted from {} events", self.at(), self.log.len());
        }
    }

    fn tick(&mut self) {
        let now = self.at();
        for command in self.core.tick(now) {
            self.run(&command);
        }
    }

    fn step(&mut self) {
        self.now += 1 + self.rng.up_to(if self.faults { 200 } else { 400 });
        if self.faults {
            if self.chance(30) {
                self.submit();
            }
            if self.chance(40) {
                self.fault();
            }
        }
        // Dead processes come back (a supervisor, or a person).
        let agents: Vec<AgentName> = self.processes.keys().cloned().collect();
        for agent in &agents {
            let process = &self.processes[agent];
            let dead = process.incarnation.is_none();
            let hung = process.hung;
            if (dead && self.chance(if self.faults { 20 } else { 100 })) || (!self.faults && hung) {
                self.hello(agent, None);
            }
        }
        for agent in &agents {
            self.act(agent);
        }
        self.haunt();
        self.tick();
        self.deliver();
        self.check();
    }

    fn check(&self) {
        let state = self.core.state();
        let tasks = state.tasks();
        for (_, event) in &self.log {
            if let Event::TaskSubmitted { task, .. } = event {
                assert!(tasks.get(*task).is_some(), "acknowledged task {task} is lost");
            }
        }
        for (task, count) in &self.completed {
            assert_eq!(*count, 1, "task {task} completed {count} times");
        }
        for (task, count) in &self.ended {
            assert_eq!(*count, 1, "task {task} ended {count} times");
        }
        let pending: BTreeSet<u64> = tasks.pending().map(|task| task.id).collect();
        for task in tasks.all() {
            match &task.status {
                TaskStatus::Running { agent, incarnation, .. } => {
                    let record = state.agent(agent.as_str()).unwrap();
                    assert_eq!(record.incarnation, *incarnation, "task {} leased to a superseded run", task.id);
                    assert!(
                        record.down.as_ref().is_none_or(|down| down.incarnation != *incarnation),
                        "task {} leased to a run that is down",
                        task.id
                    );
                    assert!(
                        tasks.running_on(agent).any(|held| held.id == task.id),
                        "lease index lost task {}",
                        task.id
                    );
                }
                TaskStatus::Pending => {
                    assert!(pending.contains(&task.id) || task.exhausted(), "pending task {} not queued", task.id);
                }
                _ => assert!(!pending.contains(&task.id), "task {} queued while {}", task.id, task.status.word()),
            }
            if task.status.is_final() {
                assert_eq!(self.ended.get(&task.id), Some(&1), "task {} ended without its event", task.id);
            }
        }
    }
}

fn run_seed(seed: u64, trace: bool) {
    let mut sim = Sim::new(seed, trace);
    for agent in sim.processes.keys().cloned().collect::<Vec<_>>() {
        sim.hello(&agent, None);
    }
    for _ in 0..FAULT_STEPS {
        sim.step();
    }
    // Faults stop; agents behave: every task must end.
    sim.faults = false;
    for _ in 0..CALM_STEPS {
        sim.step();
        if sim.core.state().tasks().all().all(|task| task.status.is_final()) {
            break;
        }
    }
    let open: Vec<String> = sim
        .core
        .state()
        .tasks()
        .all()
        .filter(|task| !task.status.is_final())
        .map(|task| format!("{} {}", task.id, task.status.word()))
        .collect();
    assert!(open.is_empty(), "tasks that never ended once faults stopped: {open:?}");
    sim.restart_hale();
}

#[test]
fn the_core_keeps_its_promises_under_random_faults() {
    if let Ok(seed) = std::env::var("HALE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("HALE_SIM_SEED is a u64");
        run_seed(seed, true);
        return;
    }
    let seeds: u64 = std::env::var("HALE_SIM_SEEDS").ok().and_then(|text| text.parse().ok()).unwrap_or(1_000);
    let base: u64 = std::env::var("HALE_SIM_BASE").ok().and_then(|text| text.parse().ok()).unwrap_or(0);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = Vec::new();
    for seed in base..base + seeds {
        if let Err(panic) = std::panic::catch_unwind(|| run_seed(seed, false)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            failed.push((seed, message));
        }
    }
    std::panic::set_hook(hook);
    for (seed, message) in &failed {
        println!("seed {seed} failed: {message}");
        println!("  replay: HALE_SIM_SEED={seed} cargo test -p hale-core --test sim -- --nocapture");
    }
    assert!(failed.is_empty(), "{} of {seeds} seeds failed; the first: seed {}", failed.len(), failed[0].0);
}
