//! Every task, with the indexes that assignment, downs and ticks need, so none of them
//! scans every task ever submitted.

use super::model::*;
use crate::Timestamp;
use crate::names::AgentName;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Every task, with the indexes assignment needs. Each index is a function of the tasks:
/// every change goes through `update`, which takes the task out of them and puts it back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tasks {
    tasks: BTreeMap<u64, Task>,
    next_id: u64,
    by_key: BTreeMap<String, u64>,
    /// Pending tasks that may run now, in assignment order: priority, then submission.
    pending: BTreeSet<(Priority, u64)>,
    /// Pending tasks backing off before a retry, by when they may run.
    waiting: BTreeSet<(Timestamp, u64)>,
    /// Pending tasks out of attempts: the next tick fails them.
    exhausted: BTreeSet<u64>,
    /// Leases per agent.
    leases: BTreeMap<AgentName, BTreeSet<u64>>,
    /// Deadlines (and ends of wall-time budgets) of pending and running tasks, soonest first.
    due: BTreeSet<(Timestamp, u64)>,
    /// Ended tasks whose outcome the agent that submitted them has not taken yet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    owed: BTreeMap<AgentName, BTreeSet<u64>>,
}

impl Tasks {
    /// The task `id`.
    pub fn get(&self, id: u64) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// Every task, by id.
    pub fn all(&self) -> impl DoubleEndedIterator<Item = &Task> {
        self.tasks.values()
    }

    /// The task submitted with `key`, if any.
    pub fn by_key(&self, key: &str) -> Option<&Task> {
        self.by_key.get(key).and_then(|id| self.tasks.get(id))
    }

    /// The id the next submitted task gets.
    pub fn next_id(&self) -> u64 {
        self.next_id + 1
    }

    /// Tasks waiting for an agent (backing off or not, out of attempts excluded).
    pub fn queued(&self) -> usize {
        self.pending.len() + self.waiting.len()
    }

    /// Pending tasks that may be assigned at `now`, in assignment order: priority, then
    /// submission. Lazy: the queue is walked only as far as the caller goes.
    pub fn assignable(&self, now: Timestamp) -> impl Iterator<Item = &Task> + '_ {
        let mut due: Vec<(Priority, u64)> = self
            .waiting
            .range(..=(now, u64::MAX))
            .filter_map(|(_, id)| self.tasks.get(id))
            .map(|task| (task.spec.priority, task.id))
            .collect();
        due.sort_unstable();
        let mut ready = self.pending.iter().copied().peekable();
        let mut due = due.into_iter().peekable();
        std::iter::from_fn(move || match (ready.peek(), due.peek()) {
            (Some(a), Some(b)) if b < a => due.next(),
            (Some(_), _) => ready.next(),
            (None, _) => due.next(),
        })
        .filter_map(|(_, id)| self.tasks.get(&id))
    }

    /// Pending tasks in the order they are assigned (backing off or not).
    pub fn pending(&self) -> impl Iterator<Item = &Task> {
        self.pending
            .iter()
            .map(|(_, id)| id)
            .chain(self.waiting.iter().map(|(_, id)| id))
            .filter_map(|id| self.tasks.get(id))
    }

    /// Tasks leased to `agent` (any incarnation).
    pub fn running_on<'a>(&'a self, agent: &'a AgentName) -> impl Iterator<Item = &'a Task> + 'a {
        self.leases.get(agent).into_iter().flatten().filter_map(|id| self.tasks.get(id))
    }

    /// How many leases `agent` holds.
    pub fn load(&self, agent: &AgentName) -> usize {
        self.leases.get(agent).map_or(0, BTreeSet::len)
    }

    /// Tasks that must end now: past their deadline or wall-time budget, or out of attempts.
    pub fn overdue(&self, now: Timestamp) -> impl Iterator<Item = u64> + '_ {
        self.due.range(..=(now, u64::MAX)).map(|(_, id)| *id).chain(self.exhausted.iter().copied())
    }

    /// Changes task `id` through `change`, keeping every index true.
    fn update(&mut self, id: u64, at: Timestamp, change: impl FnOnce(&mut Task)) {
        let Some(mut task) = self.tasks.remove(&id) else { return };
        self.unindex(&task);
        change(&mut task);
        task.updated_at = at;
        self.index(&task);
        self.tasks.insert(id, task);
    }

    fn unindex(&mut self, task: &Task) {
        let id = task.id;
        if let Some(by) = &task.submitted_by
            && let Some(owed) = self.owed.get_mut(by)
        {
            owed.remove(&id);
            if owed.is_empty() {
                self.owed.remove(by);
            }
        }
        self.pending.remove(&(task.spec.priority, id));
        if let Some(not_before) = task.not_before {
            self.waiting.remove(&(not_before, id));
        }
        self.exhausted.remove(&id);
        if let Some(due) = task.due() {
            self.due.remove(&(due, id));
        }
        if let Some((agent, _)) = task.holder()
            && let Some(held) = self.leases.get_mut(agent)
        {
            held.remove(&id);
            if held.is_empty() {
                self.leases.remove(agent);
            }
        }
    }

    fn index(&mut self, task: &Task) {
        let id = task.id;
        if task.outcome_owed()
            && let Some(by) = &task.submitted_by
        {
            self.owed.entry(by.clone()).or_default().insert(id);
        }
        match &task.status {
            TaskStatus::Pending if task.exhausted() => {
                self.exhausted.insert(id);
            }
            TaskStatus::Pending => match task.not_before {
                Some(not_before) => {
                    self.waiting.insert((not_before, id));
                }
                None => {
                    self.pending.insert((task.spec.priority, id));
                }
            },
            TaskStatus::Running { agent, .. } => {
                self.leases.entry(agent.clone()).or_default().insert(id);
            }
            _ => {}
        }
        if matches!(task.status, TaskStatus::Pending | TaskStatus::Running { .. })
            && let Some(due) = task.due()
        {
            self.due.insert((due, id));
        }
    }

    /// The ended tasks `agent` submitted whose outcome it has not taken, oldest first.
    pub fn owed_to<'a>(&'a self, agent: &AgentName) -> impl Iterator<Item = &'a Task> + 'a {
        self.owed.get(agent).into_iter().flatten().filter_map(|id| self.tasks.get(id))
    }

    /// The submitter of `id` took its outcome.
    pub(crate) fn outcome_taken(&mut self, id: u64, at: Timestamp) {
        self.update(id, at, |task| task.outcome_taken = true);
    }

    pub(crate) fn submit(
        &mut self,
        id: u64,
        spec: TaskSpec,
        parent: Option<Parent>,
        by: Option<AgentName>,
        at: Timestamp,
    ) {
        self.next_id = self.next_id.max(id);
        if let Some(key) = &spec.idempotency_key {
            self.by_key.insert(key.clone(), id);
        }
        let task = Task {
            id,
            spec,
            status: TaskStatus::Pending,
            attempts: 0,
            steps: Vec::new(),
            submitted_at: at,
            updated_at: at,
            parent,
            not_before: None,
            rung: 0,
            last_holder: None,
            started_at: None,
            last_error: None,
            spent: Spend::default(),
            reserved: Spend::default(),
            arbitration: None,
            compensation_errors: Vec::new(),
            submitted_by: by,
            outcome_taken: false,
        };
        self.index(&task);
        self.tasks.insert(id, task);
    }

    pub(crate) fn assign(
        &mut self,
        id: u64,
        agent: AgentName,
        incarnation: u64,
        attempt: u32,
        rung: u32,
        at: Timestamp,
    ) {
        self.update(id, at, |task| {
            task.last_holder = Some(agent.clone());
            task.status = TaskStatus::Running { agent, incarnation, attempt };
            task.attempts = attempt;
            task.rung = rung;
            task.not_before = None;
            task.started_at.get_or_insert(at);
        });
    }

    pub(crate) fn set_status(&mut self, id: u64, status: TaskStatus, at: Timestamp) {
        self.update(id, at, |task| {
            if task.holder().is_some() {
                end_attempt(task);
            }
            task.status = status;
        });
    }

    /// The attempt failed and the task waits for the next one (after `not_before`).
    pub(crate) fn retry(&mut self, id: u64, reason: String, not_before: Option<Timestamp>, at: Timestamp) {
        self.update(id, at, |task| {
            end_attempt(task);
            task.status = TaskStatus::Pending;
            task.not_before = not_before;
            task.last_error = Some(reason);
        });
    }

    pub(crate) fn intend_step(&mut self, id: u64, name: String, attempt: u32, rung: u32, at: Timestamp) {
        self.update(id, at, |task| {
            let step = Step {
                name,
                state: StepState::Intent,
                result: Value::Null,
                attempt,
                at,
                rung,
                llm: None,
                compensation: None,
            };
            match task.steps.iter_mut().find(|existing| existing.name == step.name) {
                Some(existing) => *existing = step,
                None => task.steps.push(step),
            }
        });
    }

    pub(crate) fn commit_step(&mut self, id: u64, step: Step) {
        self.update(id, step.at, |task| match task.steps.iter_mut().find(|existing| existing.name == step.name) {
            Some(existing) => *existing = step,
            None => task.steps.push(step),
        });
    }

    pub(crate) fn with_task(&mut self, id: u64, at: Timestamp, change: impl FnOnce(&mut Task)) {
        self.update(id, at, change);
    }

    /// Takes back every lease of `agent`'s `incarnation` (all of them for `None`): each task
    /// is pending again at once, with its steps; one out of attempts waits for the next
    /// tick to fail it (a decided, logged event, so that its parent and compensations
    /// follow).
    pub(crate) fn release_leases(&mut self, agent: &AgentName, incarnation: Option<u64>, why: &str, at: Timestamp) {
        let held: Vec<u64> = self
            .running_on(agent)
            .filter(|task| task.holder().is_some_and(|(_, leased)| incarnation.is_none_or(|wanted| wanted == leased)))
            .map(|task| task.id)
            .collect();
        for id in held {
            self.update(id, at, |task| {
                end_attempt(task);
                task.status = TaskStatus::Pending;
                task.last_error = Some(why.to_string());
            });
        }
    }
}

/// The attempt holding the lease is over: its unfinished intents become uncertain.
fn end_attempt(task: &mut Task) {
    for step in &mut task.steps {
        if step.state == StepState::Intent {
            step.state = StepState::Uncertain;
        }
    }
}
