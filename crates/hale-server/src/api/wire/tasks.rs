//! Tasks between the wire and the core: submissions in, tasks out.

use super::ApiError;
use hale_core::tasks::{Budget, Level, LlmCall, Parent, Priority, Rung, Shadow, Spend, Task, TaskSpec, TaskStatus};
use hale_core::{RoleName, Timestamp};
use hale_proto::{BudgetSpec, HttpSubmitTask, LlmCallInfo, RungSpec, ShadowSpec, SpendBody, StepInfo, TaskInfo};

fn priority(text: Option<&str>) -> Result<Priority, ApiError> {
    Ok(match text {
        None | Some("normal") => Priority::Normal,
        Some("critical") => Priority::Critical,
        Some("high") => Priority::High,
        Some("background") => Priority::Background,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "priority {other:?} is not one of critical, high, normal, background"
            )));
        }
    })
}

fn level(text: &str) -> Result<Level, ApiError> {
    Ok(match text {
        "optimal" => Level::Optimal,
        "good_enough" | "good-enough" => Level::GoodEnough,
        "minimal" => Level::Minimal,
        other => {
            return Err(ApiError::bad_request(format!("level {other:?} is not one of optimal, good_enough, minimal")));
        }
    })
}

fn level_word(level: Level) -> String {
    match level {
        Level::Optimal => "optimal",
        Level::GoodEnough => "good_enough",
        Level::Minimal => "minimal",
    }
    .to_string()
}

/// A submission, with its names and words checked.
pub fn spec(body: HttpSubmitTask) -> Result<TaskSpec, ApiError> {
    let fallback = body
        .fallback
        .into_iter()
        .map(|rung| Ok(Rung { role: RoleName::new(rung.role)?, level: level(&rung.level)? }))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(TaskSpec {
        role: RoleName::new(body.role)?,
        priority: priority(body.priority.as_deref())?,
        payload: body.payload,
        deadline: body.deadline_ms.map(Timestamp),
        max_attempts: body.max_attempts.unwrap_or(3),
        idempotency_key: body.idempotency_key,
        retry_backoff_ms: body.retry_backoff_ms.unwrap_or(0),
        shadow: body.shadow.map(|shadow| Shadow { count: shadow.count, quorum: shadow.quorum }),
        fallback,
        budget: body.budget.map(|budget| Budget { tokens: budget.tokens, cost: budget.cost, wall_ms: budget.wall_ms }),
    })
}

pub fn llm(info: LlmCallInfo) -> LlmCall {
    LlmCall {
        model: info.model,
        model_version: info.model_version,
        temperature: info.temperature,
        top_p: info.top_p,
        seed: info.seed,
        max_tokens: info.max_tokens,
        prompt_hash: info.prompt_hash,
        tokens_in: info.tokens_in,
        tokens_out: info.tokens_out,
    }
}

fn llm_info(call: &LlmCall) -> LlmCallInfo {
    LlmCallInfo {
        model: call.model.clone(),
        model_version: call.model_version.clone(),
        temperature: call.temperature,
        top_p: call.top_p,
        seed: call.seed,
        max_tokens: call.max_tokens,
        prompt_hash: call.prompt_hash.clone(),
        tokens_in: call.tokens_in,
        tokens_out: call.tokens_out,
    }
}

pub fn spend(tokens: u64, cost: u64) -> Spend {
    Spend { tokens, cost }
}

fn spend_body(spend: Spend) -> SpendBody {
    SpendBody { tokens: spend.tokens, cost: spend.cost }
}

/// A task as the wire shows it.
fn last_holder(task: &Task) -> Option<String> {
    task.last_holder.as_ref().map(ToString::to_string)
}

pub fn task_info(task: &Task) -> TaskInfo {
    let (agent, incarnation, result, reason, mut level) = match &task.status {
        TaskStatus::Running { agent, incarnation, .. } => {
            (Some(agent.to_string()), Some(*incarnation), None, None, None)
        }
        TaskStatus::Completed { result, level } => {
            (last_holder(task), None, Some(result.clone()), None, Some(level_word(*level)))
        }
        TaskStatus::Failed { reason } => (last_holder(task), None, None, Some(reason.clone()), None),
        TaskStatus::Compensating { outcome: hale_core::tasks::Outcome::Failed { reason }, .. } => {
            (None, None, None, Some(reason.clone()), None)
        }
        _ => (None, None, None, None, None),
    };
    let rung = task.spec.rung(task.rung);
    if level.is_none() && task.attempts > 0 {
        level = rung.as_ref().map(|rung| level_word(rung.level));
    }
    let children = match &task.status {
        TaskStatus::Shadowed { children } => children.clone(),
        TaskStatus::Compensating { child, .. } => vec![*child],
        _ => Vec::new(),
    };
    let (kind, parent_task, compensates) = match &task.parent {
        None => (None, None, None),
        Some(Parent::Shadow { task }) => (Some("shadow".to_string()), Some(*task), None),
        Some(Parent::Compensation { task, step }) => {
            (Some("compensation".to_string()), Some(*task), Some(step.clone()))
        }
    };
    TaskInfo {
        task: task.id,
        role: task.spec.role.to_string(),
        priority: format!("{:?}", task.spec.priority).to_lowercase(),
        status: task.status.word().to_string(),
        agent,
        incarnation,
        attempts: task.attempts,
        max_attempts: task.spec.max_attempts,
        payload: task.spec.payload.clone(),
        result,
        reason,
        steps: task
            .steps
            .iter()
            .map(|step| StepInfo {
                name: step.name.clone(),
                state: format!("{:?}", step.state).to_lowercase(),
                result: step.result.clone(),
                attempt: step.attempt,
                at_ms: step.at.0,
                llm: step.llm.as_ref().map(llm_info),
                compensation: step.compensation.clone(),
            })
            .collect(),
        submitted_at_ms: task.submitted_at.0,
        updated_at_ms: task.updated_at.0,
        level,
        ran_as: (task.attempts > 0).then(|| rung.map(|rung| rung.role.to_string())).flatten(),
        kind,
        parent_task,
        compensates,
        children,
        not_before_ms: task.not_before.filter(|_| task.status == TaskStatus::Pending).map(|at| at.0),
        last_error: task.last_error.clone(),
        shadow: task.spec.shadow.map(|shadow| ShadowSpec { count: shadow.count, quorum: shadow.quorum }),
        fallback: task
            .spec
            .fallback
            .iter()
            .map(|rung| RungSpec { role: rung.role.to_string(), level: level_word(rung.level) })
            .collect(),
        budget: task.spec.budget.map(|budget| BudgetSpec {
            tokens: budget.tokens,
            cost: budget.cost,
            wall_ms: budget.wall_ms,
        }),
        spent: spend_body(task.spent),
        reserved: spend_body(task.reserved),
        agreed: task.arbitration.as_ref().map(|arbitration| arbitration.agreed.clone()),
        dissent: task.arbitration.as_ref().map(|arbitration| arbitration.dissent.clone()),
        compensation_errors: task.compensation_errors.clone(),
    }
}
