//! `decide` for task commands.
//!
//! Every end of a task is decided here and logged as an event, never derived in the fold:
//! ending a task may start its compensations, settle its shadowed parent (and cancel the
//! parent's other runs), or move its aborted parent on to the next compensation, and each
//! of those is an event of the same decision.

use super::model::*;
use super::{Mode, TaskSettings};
use crate::Timestamp;
use crate::command::{Answer, Decision, TaskCommand};
use crate::decide::{Context, running};
use crate::event::Event;
use crate::limits::PATCH_DEPTH_MAX;
use crate::merge::{json_depth, json_size};
use crate::names::AgentName;
use crate::rejection::Rejection;
use crate::state::State;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// The largest task payload, step or result, in bytes of JSON.
pub const TASK_VALUE_BYTES_MAX: usize = 256 * 1024;
/// The most runs of a shadowed task.
pub const SHADOW_MAX: u32 = 16;
/// The most lower rungs of a fallback ladder.
pub const FALLBACK_MAX: usize = 8;

fn check_value(what: &str, value: &Value) -> Result<(), Rejection> {
    let size = json_size(value);
    if size > TASK_VALUE_BYTES_MAX {
        return Err(Rejection::BadTask {
            reason: format!("the {what} is {size} bytes; the limit is {TASK_VALUE_BYTES_MAX}"),
        });
    }
    let depth = json_depth(value);
    if depth > PATCH_DEPTH_MAX {
        return Err(Rejection::BadTask {
            reason: format!("the {what} nests {depth} levels deep; the limit is {PATCH_DEPTH_MAX}"),
        });
    }
    Ok(())
}

fn check_step_name(name: &str) -> Result<(), Rejection> {
    if name.is_empty() || name.len() > 128 {
        return Err(Rejection::BadTask { reason: "a step name has 1 to 128 bytes".into() });
    }
    Ok(())
}

/// The task, if `incarnation` of `agent` holds its lease. A task that does not exist is
/// answered as one it does not hold (`lease_lost`), word for word: an agent learns only
/// whether it holds a task, never which task numbers exist.
pub(crate) fn leased<'s>(
    state: &'s State,
    task: u64,
    agent: &AgentName,
    incarnation: u64,
) -> Result<&'s Task, Rejection> {
    let found = state.tasks().get(task);
    match found.and_then(|found| found.holder().map(|holder| (found, holder))) {
        Some((found, (holder, leased))) if holder == agent && leased == incarnation => Ok(found),
        _ => Err(Rejection::LeaseLost { task, agent: agent.to_string(), incarnation }),
    }
}

fn check_spec(spec: &TaskSpec) -> Result<(), Rejection> {
    let bad = |reason: &str| Err(Rejection::BadTask { reason: reason.into() });
    if let Some(key) = &spec.idempotency_key
        && (key.is_empty() || key.len() > 256)
    {
        return bad("an idempotency key has 1 to 256 bytes");
    }
    if spec.max_attempts == 0 {
        return bad("max_attempts must be at least 1");
    }
    if let Some(shadow) = spec.shadow {
        if !(2..=SHADOW_MAX).contains(&shadow.count) {
            return Err(Rejection::BadTask {
                reason: format!("shadow runs a task on 2 to {SHADOW_MAX} agents; got {}", shadow.count),
            });
        }
        if let Some(quorum) = shadow.quorum
            && !(1..=shadow.count).contains(&quorum)
        {
            return Err(Rejection::BadTask {
                reason: format!("a quorum is 1 to the shadow count ({}); got {quorum}", shadow.count),
            });
        }
    }
    if spec.fallback.len() > FALLBACK_MAX {
        return Err(Rejection::BadTask {
            reason: format!("a fallback ladder has at most {FALLBACK_MAX} rungs; got {}", spec.fallback.len()),
        });
    }
    check_value("payload", &spec.payload)
}

pub(crate) fn decide(context: &Context<'_>, command: &TaskCommand) -> Result<Decision, Rejection> {
    let Context { state, settings, now, .. } = *context;
    let settings = &settings.tasks;
    let tasks = state.tasks();
    let mut ends = Ends::new(state);
    let events = match command {
        TaskCommand::Submit { spec, by } => {
            check_spec(spec)?;
            if let Some(key) = &spec.idempotency_key
                && let Some(first) = tasks.by_key(key)
            {
                // A resubmit with a known key logs nothing and answers with the first task.
                return Ok(Decision::answer(Answer::TaskSubmitted { task: first.id, new: false }));
            }
            if let Some(by) = by {
                crate::decide::not_quarantined(state, by)?;
            }
            shed(state, settings, spec)?;
            let id = ends.allocate();
            ends.events.push(Event::TaskSubmitted { task: id, spec: spec.clone(), parent: None, by: by.clone() });
            if let Some(shadow) = spec.shadow {
                let run = TaskSpec { shadow: None, idempotency_key: None, ..spec.clone() };
                let children: Vec<u64> = (0..shadow.count).map(|_| ends.allocate()).collect();
                for child in &children {
                    ends.events.push(Event::TaskSubmitted {
                        task: *child,
                        spec: run.clone(),
                        parent: Some(Parent::Shadow { task: id }),
                        by: None,
                    });
                }
                ends.events.push(Event::TaskShadowed { task: id, children });
            }
            return Ok(Decision { events: ends.events, answer: Answer::TaskSubmitted { task: id, new: true } });
        }
        TaskCommand::Assign { task, agent, incarnation, rung } => {
            let found = tasks.get(*task).ok_or(Rejection::UnknownTask { task: *task })?;
            let record = running(state, agent, *incarnation)?;
            let serves = found.spec.rung(*rung).is_some_and(|step| step.role == record.role);
            let waiting = found.not_before.is_some_and(|not_before| not_before > now);
            if found.status != TaskStatus::Pending || found.exhausted() || waiting || !serves {
                return Ok(Decision::done(Vec::new()));
            }
            if shadow_siblings_on(state, found, agent) {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::TaskAssigned {
                task: *task,
                agent: agent.clone(),
                incarnation: *incarnation,
                attempt: found.attempts + 1,
                rung: *rung,
            }]
        }
        TaskCommand::IntendStep { task, agent, incarnation, name } => {
            let found = leased(state, *task, agent, *incarnation)?;
            check_step_name(name)?;
            if found.steps.iter().any(|step| step.name == *name && step.state == StepState::Done) {
                return Err(Rejection::StepDone { task: *task, step: name.clone() });
            }
            vec![Event::StepIntended { task: *task, attempt: found.attempts, name: name.clone() }]
        }
        TaskCommand::CommitStep { task, agent, incarnation, name, result, llm, compensation, reservation } => {
            let found = leased(state, *task, agent, *incarnation)?;
            check_step_name(name)?;
            check_value("step result", result)?;
            if let Some(compensation) = compensation {
                check_value("compensation", compensation)?;
            }
            if let Some(llm) = llm {
                check_value("llm record", &serde_json::to_value(llm).unwrap_or(Value::Null))?;
            }
            // A done step is immutable. The same commit again (a client resending after a
            // lost connection) is answered as the first was, and logs nothing: its tokens
            // are not spent twice.
            if let Some(done) = found.steps.iter().find(|step| step.name == *name && step.state == StepState::Done) {
                if done.result == *result && done.llm == *llm && done.compensation == *compensation {
                    return Ok(Decision::done(Vec::new()));
                }
                return Err(Rejection::StepDone { task: *task, step: name.clone() });
            }
            let mut events = vec![Event::StepCommitted {
                task: *task,
                attempt: found.attempts,
                name: name.clone(),
                result: result.clone(),
                llm: llm.clone(),
                compensation: compensation.clone(),
            }];
            // The model call's tokens are spent by the task and the agent, in the same
            // commit as the step: a crash cannot keep one without the other.
            let tokens =
                llm.as_ref().map_or(0, |llm| llm.tokens_in.unwrap_or(0).saturating_add(llm.tokens_out.unwrap_or(0)));
            if tokens > 0 || reservation.is_some() {
                let record = running(state, agent, *incarnation)?;
                let spend = Spend { tokens, cost: 0 };
                events.extend(crate::budget::spent(context, record, Some(found), *reservation, spend)?);
            }
            events
        }
        TaskCommand::Complete { task, agent, incarnation, result } => {
            let found = leased(state, *task, agent, *incarnation)?;
            check_value("result", result)?;
            let level = found.spec.rung(found.rung).map(|rung| rung.level).unwrap_or_default();
            ends.end(*task, End::Completed { result: result.clone(), level });
            ends.events
        }
        TaskCommand::Fail { task, agent, incarnation, reason, retry } => {
            let found = leased(state, *task, agent, *incarnation)?;
            if *retry && found.attempts < found.spec.max_attempts {
                let delay = retry_delay(found.spec.retry_backoff_ms, found.attempts);
                let not_before = (delay > 0).then(|| Timestamp(now.0.saturating_add(delay)));
                return Ok(Decision::done(vec![Event::TaskRetried {
                    task: *task,
                    reason: reason.clone(),
                    not_before,
                }]));
            }
            let reason = if *retry {
                format!("out of attempts ({}); the last: {reason}", found.attempts)
            } else {
                reason.clone()
            };
            ends.end(*task, End::Failed { reason });
            ends.events
        }
        TaskCommand::TakeOutcome { agent, incarnation, task } => {
            running(state, agent, *incarnation)?;
            // Only the submitter's own tasks; another agent's is answered as unknown.
            let found = tasks
                .get(*task)
                .filter(|found| found.submitted_by.as_ref() == Some(agent))
                .ok_or(Rejection::UnknownTask { task: *task })?;
            if !found.outcome_owed() {
                // Taken already, or not ended yet (nothing to take): nothing to log.
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::OutcomeTaken { agent: agent.clone(), task: *task }]
        }
        TaskCommand::Cancel { task } => {
            let found = tasks.get(*task).ok_or(Rejection::UnknownTask { task: *task })?;
            if found.status.is_final() {
                return Err(Rejection::TaskEnded { task: *task, status: found.status.word().to_string() });
            }
            // Already aborted: the compensations finish, then the task ends.
            if !matches!(found.status, TaskStatus::Compensating { .. }) {
                ends.end(*task, End::Cancelled);
            }
            ends.events
        }
        TaskCommand::Expire { task } => {
            let found = tasks.get(*task).ok_or(Rejection::UnknownTask { task: *task })?;
            if !matches!(found.status, TaskStatus::Pending | TaskStatus::Running { .. }) {
                return Ok(Decision::done(Vec::new()));
            }
            let reason = if found.exhausted() {
                let last = found.last_error.as_deref().unwrap_or("unknown");
                format!("out of attempts ({}); the last ended: {last}", found.attempts)
            } else if found.spec.deadline.is_some_and(|deadline| deadline <= now) {
                "past its deadline".to_string()
            } else if found.due().is_some_and(|due| due <= now) {
                let wall = found.spec.budget.and_then(|budget| budget.wall_ms).unwrap_or(0);
                format!("over its wall-time budget of {wall} ms")
            } else {
                return Ok(Decision::done(Vec::new()));
            };
            ends.end(*task, End::Failed { reason });
            ends.events
        }
        TaskCommand::SetMode { mode, serving, roles } => {
            if state.mode() == *mode {
                return Ok(Decision::done(Vec::new()));
            }
            vec![Event::ModeChanged { mode: *mode, serving: *serving, roles: *roles }]
        }
    };
    Ok(Decision::done(events))
}

/// The events that fail task `id` now (with its compensations and its parent's cascade).
pub(crate) fn fail_task(state: &State, id: u64, reason: String) -> Vec<Event> {
    let mut ends = Ends::new(state);
    ends.end(id, End::Failed { reason });
    ends.events
}

/// Refuses a submission the queue has no room for: background first, then normal, then
/// high; critical work is always accepted.
fn shed(state: &State, settings: &TaskSettings, spec: &TaskSpec) -> Result<(), Rejection> {
    let queued = state.tasks().queued();
    let limit = match spec.priority {
        Priority::Critical => return Ok(()),
        Priority::High => settings.shed_high_at,
        Priority::Normal => settings.shed_normal_at,
        Priority::Background if state.mode() == Mode::Minimal => 0,
        Priority::Background => settings.shed_background_at,
    };
    if queued as u64 >= limit {
        return Err(Rejection::Overloaded {
            priority: format!("{:?}", spec.priority).to_lowercase(),
            queued: queued as u64,
            limit,
            mode: state.mode().to_string(),
            retry_after_ms: settings.retry_after_ms,
        });
    }
    Ok(())
}

/// Whether `agent` holds, or produced a result for, another run of `task`'s shadowed parent.
pub(crate) fn shadow_siblings_on(state: &State, task: &Task, agent: &AgentName) -> bool {
    let Some(Parent::Shadow { task: parent }) = &task.parent else { return false };
    let Some(TaskStatus::Shadowed { children }) = state.tasks().get(*parent).map(|parent| &parent.status) else {
        return false;
    };
    children.iter().filter(|child| **child != task.id).filter_map(|child| state.tasks().get(*child)).any(|sibling| {
        sibling.holder().is_some_and(|(holder, _)| holder == agent)
            || (matches!(sibling.status, TaskStatus::Completed { .. }) && sibling.last_holder.as_ref() == Some(agent))
    })
}

/// How a task ends.
#[derive(Clone, Debug)]
enum End {
    Completed { result: Value, level: Level },
    Failed { reason: String },
    Cancelled,
}

/// The events of one decision that ends tasks, with what they ended so far: a cascade
/// must not end a task twice or read a status this decision already changed.
struct Ends<'s> {
    state: &'s State,
    next_id: u64,
    ended: BTreeSet<u64>,
    /// Results of runs completed in this decision (for a quorum).
    completed: Vec<(u64, Value, Level)>,
    events: Vec<Event>,
}

impl<'s> Ends<'s> {
    fn new(state: &'s State) -> Self {
        Ends {
            state,
            next_id: state.tasks().next_id(),
            ended: BTreeSet::new(),
            completed: Vec::new(),
            events: Vec::new(),
        }
    }

    fn allocate(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn task(&self, id: u64) -> &'s Task {
        self.state.tasks().get(id).expect("tasks that cascades name exist")
    }

    fn is_over(&self, id: u64) -> bool {
        self.ended.contains(&id) || self.task(id).status.is_final()
    }

    fn end(&mut self, id: u64, end: End) {
        if !self.ended.insert(id) {
            return;
        }
        let task = self.task(id);
        match end {
            End::Completed { result, level } => {
                self.completed.push((id, result.clone(), level));
                self.events.push(Event::TaskCompleted { task: id, result, level });
                self.settle_parent(task, true, None);
            }
            End::Failed { reason } => self.abort(task, Outcome::Failed { reason }),
            End::Cancelled => self.abort(task, Outcome::Cancelled),
        }
    }

    /// Ends `task` as `outcome` says, after its compensations if it has any. A shadowed
    /// task's running runs are cancelled with it.
    fn abort(&mut self, task: &'s Task, outcome: Outcome) {
        if let TaskStatus::Shadowed { children } = &task.status {
            for child in children.clone() {
                if !self.is_over(child) {
                    self.end(child, End::Cancelled);
                }
            }
        }
        let is_compensation = matches!(task.parent, Some(Parent::Compensation { .. }));
        let last = if is_compensation { None } else { compensations(task).last().map(|step| step.name.clone()) };
        match last {
            Some(step) => {
                // Not over yet: it ends when its compensations have run.
                self.ended.remove(&task.id);
                self.compensate(task, outcome, &step);
            }
            None => self.finish(task, outcome),
        }
    }

    /// Submits the compensation of `step` of `task` and marks the task compensating.
    fn compensate(&mut self, task: &'s Task, outcome: Outcome, step: &str) {
        let found = task.steps.iter().find(|candidate| candidate.name == step).expect("compensations are steps");
        let role = task.spec.rung(found.rung).map_or_else(|| task.spec.role.clone(), |rung| rung.role);
        let spec = TaskSpec {
            priority: task.spec.priority,
            max_attempts: task.spec.max_attempts.max(3),
            retry_backoff_ms: task.spec.retry_backoff_ms,
            ..TaskSpec::new(
                role,
                json!({
                    "compensate": {
                        "task": task.id,
                        "step": step,
                        "result": found.result,
                        "compensation": found.compensation,
                    }
                }),
            )
        };
        let child = self.allocate();
        self.events.push(Event::TaskSubmitted {
            task: child,
            spec,
            parent: Some(Parent::Compensation { task: task.id, step: step.to_string() }),
            by: None,
        });
        self.events.push(Event::TaskCompensating { task: task.id, outcome, step: step.to_string(), child });
    }

    /// Logs the end of an aborted task and settles its parent.
    fn finish(&mut self, task: &'s Task, outcome: Outcome) {
        let reason = match outcome {
            Outcome::Failed { reason } => {
                self.events.push(Event::TaskFailed { task: task.id, reason: reason.clone() });
                Some(reason)
            }
            Outcome::Cancelled => {
                self.events.push(Event::TaskCancelled { task: task.id });
                Some("cancelled".to_string())
            }
        };
        self.settle_parent(task, false, reason);
    }

    /// A child ended: settle what its parent waits for.
    fn settle_parent(&mut self, child: &'s Task, completed: bool, reason: Option<String>) {
        match &child.parent {
            None => {}
            Some(Parent::Shadow { task: parent }) => self.arbitrate(*parent, reason),
            Some(Parent::Compensation { task: parent, step }) => {
                let parent = self.task(*parent);
                let TaskStatus::Compensating { outcome, step: current, child: running } = &parent.status else {
                    return;
                };
                if *running != child.id || current != step {
                    return;
                }
                if !completed {
                    let reason = reason.unwrap_or_default();
                    self.events.push(Event::CompensationFailed { task: parent.id, step: step.clone(), reason });
                }
                // The next compensation back, or the end.
                let steps = compensations(parent);
                let position = steps.iter().position(|candidate| candidate.name == *step);
                let next = position.and_then(|at| at.checked_sub(1)).map(|at| steps[at].name.clone());
                match next {
                    Some(next) => self.compensate(parent, outcome.clone(), &next),
                    None => {
                        self.ended.insert(parent.id);
                        self.finish(parent, outcome.clone());
                    }
                }
            }
        }
    }

    /// A run of shadowed `parent` ended: the first valid result wins, or a quorum of equal
    /// results; the runs still going are cancelled once it is settled.
    fn arbitrate(&mut self, parent: u64, reason: Option<String>) {
        if self.is_over(parent) {
            return;
        }
        let found = self.task(parent);
        let TaskStatus::Shadowed { children } = &found.status else { return };
        let quorum = found.spec.shadow.and_then(|shadow| shadow.quorum).unwrap_or(1) as usize;
        // Results so far: from the log, and from this decision.
        let mut results: Vec<(u64, Value, Level)> = children
            .iter()
            .filter_map(|id| self.state.tasks().get(*id))
            .filter_map(|run| match &run.status {
                TaskStatus::Completed { result, level } => Some((run.id, result.clone(), *level)),
                _ => None,
            })
            .collect();
        results.extend(self.completed.iter().filter(|(id, ..)| children.contains(id)).cloned());
        let open = children.iter().filter(|id| !self.is_over(**id)).count();
        let best = results
            .iter()
            .map(|(_, result, _)| results.iter().filter(|(_, other, _)| other == result).count())
            .max()
            .unwrap_or(0);
        let winner = results
            .iter()
            .find(|(_, result, _)| results.iter().filter(|(_, other, _)| other == result).count() >= quorum);
        let children = children.clone();
        if let Some((_, result, level)) = winner.cloned() {
            if found.spec.shadow.and_then(|shadow| shadow.quorum).is_some() {
                let (agreed, dissent): (Vec<_>, Vec<_>) = results.iter().partition(|(_, other, _)| *other == result);
                self.events.push(Event::TaskArbitrated {
                    task: parent,
                    agreed: agreed.iter().map(|(id, ..)| *id).collect(),
                    dissent: dissent.iter().map(|(id, ..)| *id).collect(),
                });
            }
            self.ended.insert(parent);
            self.events.push(Event::TaskCompleted { task: parent, result, level });
            for run in children {
                if !self.is_over(run) {
                    self.end(run, End::Cancelled);
                }
            }
            self.settle_parent(found, true, None);
        } else if best + open < quorum {
            let why = match (results.len(), quorum) {
                (0, _) => format!("every run failed; the last: {}", reason.unwrap_or_default()),
                (n, 1) => format!("{n} runs completed but none was valid"),
                (n, q) => format!("no quorum: {q} equal results needed, {n} results, at most {best} equal"),
            };
            if quorum > 1 {
                self.events.push(Event::TaskArbitrated {
                    task: parent,
                    agreed: Vec::new(),
                    dissent: results.iter().map(|(id, ..)| *id).collect(),
                });
            }
            self.ended.insert(parent);
            for run in children {
                if !self.is_over(run) {
                    self.end(run, End::Cancelled);
                }
            }
            self.events.push(Event::TaskFailed { task: parent, reason: why.clone() });
            self.settle_parent(found, false, Some(why));
        }
    }
}

/// The done steps of `task` that registered a compensation, in commit order.
fn compensations(task: &Task) -> Vec<&Step> {
    task.steps.iter().filter(|step| step.state == StepState::Done && step.compensation.is_some()).collect()
}
