//! Durable tasks: submitted work for a role, queued by priority, leased to one incarnation
//! of one agent at a time, with steps that survive the loss of the agent.
//!
//! A lease belongs to an incarnation. When that incarnation is declared down (or its agent
//! is quarantined or breaches its budget), the fold of that event takes the lease back at
//! once: the task is pending again, with its steps, and the next assignment pass gives it
//! to another agent. There is no visibility timeout to wait out, and a late write from the
//! old incarnation finds no lease (`lease_lost`).
//!
//! Every end of a task is decided and logged (`decide.rs`): a task out of attempts is
//! failed by the next tick, not in the fold, so that its compensations, its shadowed
//! parent and its aborted parent follow in the same decision.
//!
//! * `model.rs`: what a task is.
//! * `index.rs`: every task, with the indexes assignment and ticks use.
//! * `decide.rs`: the rules for task commands, and the cascades of an ending task.
//! * `assign.rs`: which pending task goes to which agent, down the fallback ladder.

mod assign;
mod decide;
mod index;
mod model;

pub(crate) use assign::{Candidate, plan};
pub use decide::{FALLBACK_MAX, SHADOW_MAX, TASK_VALUE_BYTES_MAX};
pub(crate) use decide::{decide, fail_task, leased};
pub use index::Tasks;
pub use model::*;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

/// What the whole system can do right now, from the agents that serve each role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every role has a healthy agent.
    #[default]
    Optimal,
    /// Some role has none: its tasks fall back down their ladders, or wait.
    Degraded,
    /// Fewer than half of the roles have one. Background submissions are refused.
    Minimal,
}

impl Mode {
    /// The mode for `serving` of `roles` roles with a healthy agent.
    pub fn from_capacity(serving: u32, roles: u32) -> Mode {
        if serving >= roles {
            Mode::Optimal
        } else if serving * 2 >= roles {
            Mode::Degraded
        } else {
            Mode::Minimal
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Optimal => "optimal",
            Mode::Degraded => "degraded",
            Mode::Minimal => "minimal",
        })
    }
}

/// Settings of the task queue, from `[tasks]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSettings {
    /// Leases one agent holds at once.
    pub per_agent_max: u32,
    /// Background submissions are refused from this many queued tasks (and in `minimal`).
    pub shed_background_at: u64,
    /// Normal submissions are refused from this many.
    pub shed_normal_at: u64,
    /// High submissions are refused from this many. Critical ones never are.
    pub shed_high_at: u64,
    /// The `Retry-After` a refused submission is given.
    pub retry_after_ms: u64,
    /// A budget breach quarantines the agent (it always opens its breaker).
    pub quarantine_on_budget_breach: bool,
    /// A task falls back to a lower rung of its ladder only once the rungs above have had
    /// no healthy agent for this long: a crashed agent restarted within it gets the task.
    pub fallback_grace_ms: u64,
}

impl Default for TaskSettings {
    fn default() -> Self {
        TaskSettings {
            per_agent_max: 1,
            shed_background_at: 10_000,
            shed_normal_at: 50_000,
            shed_high_at: 100_000,
            retry_after_ms: 2_000,
            quarantine_on_budget_breach: false,
            fallback_grace_ms: 2_000,
        }
    }
}
