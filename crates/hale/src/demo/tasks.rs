//! The demo's task story: a code task whose holder is SIGKILLed after two commits and
//! finishes on the other code-generator from its last commit point; a fact-check shadowed
//! on both fact-checkers with a quorum of two; and, with both code-generators stopped by
//! the operator, a code task that falls back to the small model and completes at
//! `good_enough` while the system mode says `degraded`. The creative-writer gets a long
//! story to write, so that when it stops making progress it is holding work: what the
//! stall detector watches for.

use super::Timeline;
use anyhow::{Context, Result};
use hale_core::tasks::{Level, Priority, Rung, Shadow, TaskSpec, TaskStatus};
use hale_core::{AgentName, RoleName, SupervisionCommand, TaskCommand};
use hale_server::RunningServer;
use serde_json::{Value, json};
use std::time::Instant;

const CODE_ANSWER: &str = "fn parse(input: &str) -> Ast";
const SMALL_ANSWER: &str = "fn parse(input: &str) -> Ast /* small model */";
const FACT_ANSWER: &str = "the claim holds";
/// Steps of the first code task, and how many are committed before its holder is killed.
const CODE_STEPS: u64 = 6;
const KILL_AFTER_STEPS: usize = 2;
/// Steps of the creative-writer's story: more than it writes before it stalls.
const STORY_STEPS: u64 = 100;

/// The holder of the code task when it was killed.
#[derive(Clone, Debug)]
pub struct Victim {
    pub agent: String,
    pub incarnation: u64,
    pub steps: usize,
    pub at: Instant,
}

#[derive(Default)]
pub struct TaskStory {
    code: Option<u64>,
    fact: Option<u64>,
    small: Option<u64>,
    pub victim: Option<Victim>,
    moved: bool,
    code_done: bool,
    fact_done: bool,
    stopped: bool,
    small_done: bool,
    restarted: bool,
    last_mode: Option<String>,
    // The checks.
    pub resumed_from_commit: bool,
    pub shadow_agreed: bool,
    pub good_enough: bool,
    pub degraded_and_back: bool,
    modes: Vec<String>,
}

fn role(name: &str) -> RoleName {
    RoleName::new(name).expect("a valid role")
}

/// What the story reads from hale each round.
struct Look {
    mode: String,
    serving: (u32, u32),
    can_code: bool,
    can_fact: bool,
    code: Option<hale_core::tasks::Task>,
    fact: Option<(hale_core::tasks::Task, Vec<hale_core::tasks::Task>)>,
    small: Option<hale_core::tasks::Task>,
    pids: Vec<(String, u64, Option<u32>)>,
}

impl TaskStory {
    async fn look(&self, server: &RunningServer) -> Result<Look> {
        let (code, fact, small) = (self.code, self.fact, self.small);
        Ok(server
            .engine()
            .read_core(move |core| {
                let state = core.state();
                let take = |name: &str| core.can_take_tasks(&AgentName::new(name).expect("a name"));
                let task = |id: Option<u64>| id.and_then(|id| state.tasks().get(id).cloned());
                let fact = task(fact).map(|parent| {
                    let runs = match &parent.status {
                        TaskStatus::Shadowed { children } => children.clone(),
                        _ => state
                            .tasks()
                            .all()
                            .filter(|run| run.parent.as_ref().is_some_and(|of| of.task() == parent.id))
                            .map(|run| run.id)
                            .collect(),
                    };
                    let runs = runs.iter().filter_map(|id| state.tasks().get(*id).cloned()).collect();
                    (parent, runs)
                });
                Look {
                    mode: state.mode().to_string(),
                    serving: core.serving(),
                    can_code: take("code-generator") && take("code-generator-2"),
                    can_fact: take("fact-checker") && take("fact-checker-2"),
                    code: task(code),
                    fact,
                    small: task(small),
                    pids: state
                        .agents()
                        .map(|record| {
                            let pid =
                                record.managed.as_ref().and_then(|managed| managed.process).map(|process| process.pid);
                            (record.name.to_string(), record.incarnation, pid)
                        })
                        .collect(),
                }
            })
            .await?)
    }

    async fn submit(server: &RunningServer, spec: TaskSpec) -> Result<u64> {
        server.engine().execute(TaskCommand::Submit { spec, by: None }).await.context("submitting a demo task")?;
        let latest = server
            .engine()
            .read(|state| state.tasks().all().filter(|task| task.parent.is_none()).map(|task| task.id).max())
            .await?;
        latest.context("the submitted task is not there")
    }

    fn code_spec(steps: u64, answer: &str) -> TaskSpec {
        TaskSpec {
            fallback: vec![Rung { role: role("code-generator-small"), level: Level::GoodEnough }],
            ..TaskSpec::new(role("code-generator"), json!({ "steps": steps, "answer": answer }))
        }
    }

    /// One round of the story at `elapsed` seconds; `small_at` is when the operator stops
    /// the code-generators.
    pub async fn advance(
        &mut self,
        server: &RunningServer,
        timeline: &mut Timeline,
        small_at: f64,
        elapsed: f64,
    ) -> Result<()> {
        let look = self.look(server).await?;
        if self.last_mode.as_deref() != Some(look.mode.as_str()) {
            if self.last_mode.is_some() {
                timeline.note(
                    json!({ "kind": "mode", "mode": look.mode, "serving": look.serving.0, "roles": look.serving.1 }),
                    format!(
                        "system mode: {} ({} of {} roles have a healthy agent)",
                        look.mode, look.serving.0, look.serving.1
                    ),
                );
            }
            self.modes.push(look.mode.clone());
            self.last_mode = Some(look.mode.clone());
        }
        // 1. Submit once both code-generators and both fact-checkers can take work.
        if self.code.is_none() && look.can_code && look.can_fact {
            let code = Self::submit(server, Self::code_spec(CODE_STEPS, CODE_ANSWER)).await?;
            self.code = Some(code);
            timeline.note(
                json!({ "kind": "task_submitted", "task": code, "role": "code-generator", "steps": CODE_STEPS, "fallback": "code-generator-small (good_enough)" }),
                format!("task {code} submitted: write a parser ({CODE_STEPS} steps, role code-generator, falls back to code-generator-small)"),
            );
            let fact_spec = TaskSpec {
                priority: Priority::Critical,
                shadow: Some(Shadow { count: 2, quorum: Some(2) }),
                ..TaskSpec::new(role("fact-checker"), json!({ "steps": 2, "answer": FACT_ANSWER }))
            };
            let fact = Self::submit(server, fact_spec).await?;
            self.fact = Some(fact);
            timeline.note(
                json!({ "kind": "task_submitted", "task": fact, "role": "fact-checker", "shadow": 2, "quorum": 2 }),
                format!(
                    "task {fact} submitted: a critical fact-check, shadowed on 2 fact-checkers, 2 equal results needed"
                ),
            );
            let story_spec =
                TaskSpec::new(role("creative-writer"), json!({ "steps": STORY_STEPS, "answer": "once upon a time" }));
            let story = Self::submit(server, story_spec).await?;
            timeline.note(
                json!({ "kind": "task_submitted", "task": story, "role": "creative-writer", "steps": STORY_STEPS }),
                format!("task {story} submitted: a long story for the creative-writer ({STORY_STEPS} steps)"),
            );
        }
        // 2. Kill the code task's holder once it has committed two steps.
        if let Some(task) = &look.code
            && self.victim.is_none()
            && let TaskStatus::Running { agent, incarnation, .. } = &task.status
        {
            let done = task.steps.iter().filter(|step| step.state == hale_core::tasks::StepState::Done).count();
            let pid = look.pids.iter().find(|(name, ..)| name == agent.as_str()).and_then(|(_, _, pid)| *pid);
            if done >= KILL_AFTER_STEPS
                && let Some(pid) = pid
            {
                hale_server::process::signal_group(pid, hale_server::process::Signal::KILL)
                    .context("killing the holder")?;
                self.victim = Some(Victim {
                    agent: agent.to_string(),
                    incarnation: *incarnation,
                    steps: done,
                    at: Instant::now(),
                });
                timeline.note(
                    json!({ "kind": "killed", "agent": agent.as_str(), "pid": pid, "incarnation": incarnation, "signal": "SIGKILL",
                            "task": task.id, "committed_steps": done }),
                    format!("SIGKILL {agent} (pid {pid}, incarnation {incarnation}) while it holds task {} with {done} committed steps", task.id),
                );
            }
        }
        // 3. The task moves at once, and finishes from its last commit point.
        if let (Some(task), Some(victim)) = (&look.code, &self.victim) {
            if !self.moved
                && let TaskStatus::Running { agent, incarnation, .. } = &task.status
                && (agent.as_str() != victim.agent || *incarnation != victim.incarnation)
            {
                self.moved = true;
                let after = victim.at.elapsed().as_millis() as u64;
                timeline.note(
                    json!({ "kind": "task_moved", "task": task.id, "to": agent.as_str(), "incarnation": incarnation,
                            "after_kill_ms": after, "committed_steps": victim.steps, "attempt": task.attempts }),
                    format!(
                        "task {} moved to {agent} (attempt {}) {after} ms after the kill, with its {} committed steps",
                        task.id, task.attempts, victim.steps
                    ),
                );
            }
            if !self.code_done
                && let TaskStatus::Completed { result, level } = &task.status
            {
                self.code_done = true;
                let killed = format!("{}/{}", victim.agent, victim.incarnation);
                let redone = task
                    .steps
                    .iter()
                    .take(victim.steps)
                    .any(|step| step.attempt != 1 || step.result["by"] != json!(killed));
                let rest_elsewhere = task
                    .steps
                    .iter()
                    .skip(victim.steps)
                    .all(|step| step.attempt > 1 && step.result["by"] != json!(killed));
                let right = result == &json!({ "answer": CODE_ANSWER, "steps": CODE_STEPS });
                self.resumed_from_commit = !redone && rest_elsewhere && task.steps.len() as u64 == CODE_STEPS && right;
                let finished_by =
                    task.steps.last().and_then(|step| step.result["by"].as_str()).unwrap_or("?").to_string();
                timeline.note(
                    json!({ "kind": "task_completed", "task": task.id, "level": level, "result": result,
                            "steps_rerun": redone, "finished_by": finished_by, "from_last_commit": self.resumed_from_commit }),
                    format!(
                        "task {} completed by {finished_by} at {level}: steps 1-{} kept from the killed run, {}-{CODE_STEPS} done after it; result {}",
                        task.id, victim.steps, victim.steps + 1, if right { "right" } else { "WRONG" }
                    ),
                );
            }
        }
        // 4. The shadowed fact-check.
        if !self.fact_done
            && let Some((parent, runs)) = &look.fact
            && let TaskStatus::Completed { result, .. } = &parent.status
        {
            self.fact_done = true;
            let agreed = parent.arbitration.as_ref().map_or(0, |arbitration| arbitration.agreed.len());
            let holders: Vec<String> =
                runs.iter().filter_map(|run| run.last_holder.as_ref().map(ToString::to_string)).collect();
            let distinct = holders.len() == 2 && holders[0] != holders[1];
            self.shadow_agreed = agreed == 2 && distinct && result["answer"] == json!(FACT_ANSWER);
            timeline.note(
                json!({ "kind": "shadow_completed", "task": parent.id, "runs_on": holders, "agreed": agreed, "result": result }),
                format!("task {} (fact-check) completed: runs on {} agreed ({agreed} of 2 equal results)", parent.id, holders.join(" and ")),
            );
        }
        // 5. The operator stops both code-generators: only the small model serves code.
        if !self.stopped && self.code_done && elapsed >= small_at {
            self.stopped = true;
            for agent in ["code-generator", "code-generator-2"] {
                server.engine().execute(SupervisionCommand::Stop { agent: AgentName::new(agent)? }).await?;
            }
            timeline.note(
                json!({ "kind": "operator_stop", "agents": ["code-generator", "code-generator-2"] }),
                "the operator stops both code-generators: only code-generator-small can write code now".to_string(),
            );
            let small = Self::submit(server, Self::code_spec(3, SMALL_ANSWER)).await?;
            self.small = Some(small);
            timeline.note(
                json!({ "kind": "task_submitted", "task": small, "role": "code-generator", "steps": 3 }),
                format!("task {small} submitted: another parser, for role code-generator"),
            );
        }
        if !self.small_done
            && let Some(task) = &look.small
            && let TaskStatus::Completed { result, level } = &task.status
        {
            self.small_done = true;
            self.good_enough = *level == Level::GoodEnough && result["answer"] == json!(SMALL_ANSWER);
            let by = task.last_holder.as_ref().map_or("?".to_string(), ToString::to_string);
            timeline.note(
                json!({ "kind": "task_completed", "task": task.id, "level": level, "by": by, "result": result }),
                format!("task {} completed by {by} at {level}, and says so", task.id),
            );
            for agent in ["code-generator", "code-generator-2"] {
                server.engine().execute(SupervisionCommand::StartManaged { agent: AgentName::new(agent)? }).await?;
            }
            self.restarted = true;
            timeline.note(
                json!({ "kind": "operator_start", "agents": ["code-generator", "code-generator-2"] }),
                "the operator starts both code-generators again".to_string(),
            );
        }
        if self.restarted && look.mode == "optimal" {
            self.degraded_and_back = self.modes.iter().any(|mode| mode == "degraded");
        }
        Ok(())
    }

    pub fn report(&self) -> Value {
        json!({
            "the code task's holder was killed after 2 commits and the task finished elsewhere from its last commit point": self.resumed_from_commit,
            "the fact-check ran shadowed on two fact-checkers and 2 equal results agreed": self.shadow_agreed,
            "with only the small model left, a code task completed at good_enough": self.good_enough,
            "the system mode went degraded and came back to optimal": self.degraded_and_back,
        })
    }
}
