//! `hale submit`, `tasks`, `task` and `status`.

use crate::cli::ServerArg;
use anyhow::{Context, Result, bail};
use hale_client::{BudgetSpec, HttpSubmitTask, RungSpec, ShadowSpec, TaskInfo};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    role: String,
    /// The task's input, as JSON.
    #[arg(long, default_value = "null")]
    payload: String,
    /// critical, high, normal or background.
    #[arg(long, default_value = "normal")]
    priority: String,
    /// A second submit with the same key returns the first task.
    #[arg(long)]
    key: Option<String>,
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Fail the task if it has not ended within this many seconds.
    #[arg(long)]
    deadline_secs: Option<u64>,
    /// Wait before a retry the agent asks for, doubled for each further attempt.
    #[arg(long)]
    retry_backoff_ms: Option<u64>,
    /// Run on this many distinct agents at once (first valid result wins).
    #[arg(long)]
    shadow: Option<u32>,
    /// With --shadow: this many equal results win instead.
    #[arg(long, requires = "shadow")]
    quorum: Option<u32>,
    /// A lower rung, ROLE:LEVEL (level good_enough or minimal); repeat in order.
    #[arg(long = "fallback", value_name = "ROLE:LEVEL")]
    fallback: Vec<String>,
    #[arg(long)]
    budget_tokens: Option<u64>,
    #[arg(long)]
    budget_cost: Option<u64>,
    /// Fail the task if it runs longer than this from its first assignment.
    #[arg(long)]
    budget_wall_secs: Option<u64>,
    #[command(flatten)]
    server: ServerArg,
}

#[derive(Debug, clap::Args)]
pub struct TasksArgs {
    /// Only tasks in this status (pending, running, shadowed, compensating, completed, failed, cancelled).
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

pub async fn submit(args: SubmitArgs) -> Result<i32> {
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("--payload must be JSON (quote a string: '\"text\"')")?;
    let deadline_ms = args.deadline_secs.map(|secs| now_ms() + secs * 1000);
    let fallback = args
        .fallback
        .iter()
        .map(|rung| match rung.split_once(':') {
            Some((role, level)) => Ok(RungSpec { role: role.to_string(), level: level.to_string() }),
            None => bail!("--fallback takes ROLE:LEVEL, e.g. code-generator-small:good_enough; got {rung:?}"),
        })
        .collect::<Result<Vec<_>>>()?;
    let budget =
        (args.budget_tokens.is_some() || args.budget_cost.is_some() || args.budget_wall_secs.is_some()).then(|| {
            BudgetSpec {
                tokens: args.budget_tokens,
                cost: args.budget_cost,
                wall_ms: args.budget_wall_secs.map(|secs| secs * 1000),
            }
        });
    let task = HttpSubmitTask {
        role: args.role,
        priority: Some(args.priority),
        payload,
        deadline_ms,
        max_attempts: Some(args.max_attempts),
        idempotency_key: args.key,
        retry_backoff_ms: args.retry_backoff_ms,
        shadow: args.shadow.map(|count| ShadowSpec { count, quorum: args.quorum }),
        fallback,
        budget,
    };
    let submitted = args.server.admin()?.submit(&task).await?;
    let note = if submitted.new { "" } else { " (an earlier task with this key)" };
    println!("task {}{note}", submitted.task);
    Ok(0)
}

pub async fn list(args: TasksArgs) -> Result<i32> {
    let mut tasks = args.server.admin()?.tasks().await?;
    if let Some(status) = &args.status {
        tasks.retain(|task| task.status == *status);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
        return Ok(0);
    }
    println!(
        "{:>6} {:<20} {:<10} {:<12} {:<22} {:>8} {:>5} {:<11} NOTE",
        "TASK", "ROLE", "PRIORITY", "STATUS", "AGENT", "ATTEMPTS", "STEPS", "LEVEL"
    );
    for task in &tasks {
        println!(
            "{:>6} {:<20} {:<10} {:<12} {:<22} {:>8} {:>5} {:<11} {}",
            task.task,
            task.role,
            task.priority,
            task.status,
            task.agent.as_deref().unwrap_or("-"),
            format!("{}/{}", task.attempts, task.max_attempts),
            task.steps.len(),
            task.level.as_deref().unwrap_or("-"),
            note(task)
        );
    }
    Ok(0)
}

/// What a row of `hale tasks` says besides its columns.
fn note(task: &TaskInfo) -> String {
    match (task.kind.as_deref(), task.parent_task) {
        (Some("shadow"), Some(parent)) => format!("run of task {parent}"),
        (Some("compensation"), Some(parent)) => {
            format!("undoes {} of task {parent}", task.compensates.as_deref().unwrap_or("?"))
        }
        _ if !task.children.is_empty() => {
            let runs: Vec<String> = task.children.iter().map(u64::to_string).collect();
            format!("runs {}", runs.join(", "))
        }
        _ => task.reason.clone().or_else(|| task.last_error.clone()).unwrap_or_default(),
    }
}

pub async fn show(task: u64, json: bool, server: &ServerArg) -> Result<i32> {
    let task = server.admin()?.task(task).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&task)?);
        return Ok(0);
    }
    println!("task {} ({}, {}): {}", task.task, task.role, task.priority, task.status);
    match (&task.agent, task.incarnation) {
        (Some(agent), Some(incarnation)) => println!("  held by   {agent} (run {incarnation})"),
        (Some(agent), None) => println!("  ran on    {agent} (its last attempt)"),
        _ => {}
    }
    println!("  attempts  {}/{}", task.attempts, task.max_attempts);
    if let Some(level) = &task.level {
        println!("  level     {level} (ran as {})", task.ran_as.as_deref().unwrap_or(&task.role));
    }
    if let Some(result) = &task.result {
        println!("  result    {result}");
    }
    if let Some(reason) = &task.reason {
        println!("  reason    {reason}");
    }
    if let Some(error) = &task.last_error {
        println!("  last end  {error}");
    }
    let extra = note(&task);
    if task.kind.is_some() || !task.children.is_empty() {
        println!("  note      {extra}");
    }
    if let (Some(agreed), Some(dissent)) = (&task.agreed, &task.dissent) {
        let list = |tasks: &[u64]| {
            if tasks.is_empty() {
                return "none".to_string();
            }
            tasks.iter().map(|task| format!("task {task}")).collect::<Vec<_>>().join(", ")
        };
        println!("  quorum    agreed: {}; dissent: {}", list(agreed), list(dissent));
    }
    if task.budget.is_some() || task.spent.tokens + task.spent.cost > 0 {
        let budget = match &task.budget {
            Some(budget) => format!(
                "budget {} tokens, {} cost{}",
                or_dash(budget.tokens),
                or_dash(budget.cost),
                budget.wall_ms.map_or(String::new(), |ms| format!(", {ms} ms wall"))
            ),
            None => "no budget".to_string(),
        };
        println!(
            "  spent     {} tokens, {} cost (reserved {} / {}); {budget}",
            task.spent.tokens, task.spent.cost, task.reserved.tokens, task.reserved.cost
        );
    }
    for error in &task.compensation_errors {
        println!("  compensation failed: {error}");
    }
    println!("  payload   {}", task.payload);
    for step in &task.steps {
        println!("  step {:<20} {:<9} attempt {} {}", step.name, step.state, step.attempt, step.result);
        if let Some(llm) = &step.llm {
            println!(
                "       model {} {} temperature {} top_p {} seed {} prompt {} tokens {}/{}",
                llm.model,
                llm.model_version.as_deref().unwrap_or("-"),
                or_dash(llm.temperature),
                or_dash(llm.top_p),
                or_dash(llm.seed),
                llm.prompt_hash.as_deref().unwrap_or("-"),
                llm.tokens_in.map_or("-".to_string(), |n| n.to_string()),
                llm.tokens_out.map_or("-".to_string(), |n| n.to_string()),
            );
        }
        if let Some(compensation) = &step.compensation {
            println!("       undo {compensation}");
        }
    }
    Ok(0)
}

/// A value, or `-` when it is not set.
fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

pub async fn status(json: bool, server: &ServerArg) -> Result<i32> {
    let status = server.admin()?.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(0);
    }
    println!("mode {}: {} of {} roles have a healthy agent", status.mode, status.serving, status.roles);
    println!(
        "queue {} waiting (background refused from {}, normal from {}, high from {}; critical always accepted)",
        status.queued, status.shed_background_at, status.shed_normal_at, status.shed_high_at
    );
    let agents: Vec<String> = status.agents_by_state.iter().map(|(word, count)| format!("{count} {word}")).collect();
    println!("agents {}", if agents.is_empty() { "none".to_string() } else { agents.join(", ") });
    let counts: Vec<String> = status.tasks_by_status.iter().map(|(word, count)| format!("{count} {word}")).collect();
    println!("tasks {}", if counts.is_empty() { "none".to_string() } else { counts.join(", ") });
    match (status.mttr_p50_seconds, status.mttr_p99_seconds) {
        (Some(p50), Some(p99)) => println!(
            "recovery {} in the last hour: time to recovery p50 {p50:.2} s, p99 {p99:.2} s",
            status.recoveries_last_hour
        ),
        _ => println!("recovery none in the last hour"),
    }
    println!("{:<24} {:>6} {:>8} {:>7} {:>7}", "ROLE", "AGENTS", "HEALTHY", "LEASES", "QUEUED");
    for role in &status.per_role {
        println!("{:<24} {:>6} {:>8} {:>7} {:>7}", role.role, role.agents, role.healthy, role.leases, role.queued);
    }
    Ok(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
