//! Budgets: what an agent (per period) or a task may spend in tokens and cost units.
//!
//! A client reserves before an expensive call and reports what it spent after. A
//! reservation that would take the agent or the task over its budget is refused; a report
//! that takes either over is a breach, which opens the agent's breaker, quarantines it if
//! configured, and redistributes its tasks (the fold of `BudgetBreached`). A breached
//! task fails.

use crate::Timestamp;
use crate::names::AgentName;
use crate::tasks::{Budget, Spend};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An agent's budget per period, from hale.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBudget {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub cost: Option<u64>,
    /// Spending is counted per period of this length, from the first spend in it.
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
}

fn default_period_ms() -> u64 {
    3_600_000
}

impl AgentBudget {
    pub fn limits(&self) -> Budget {
        Budget { tokens: self.tokens, cost: self.cost, wall_ms: None }
    }
}

/// Reserved and not yet reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub agent: AgentName,
    pub incarnation: u64,
    pub task: Option<u64>,
    pub spend: Spend,
}

/// What an agent spent in its current period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSpend {
    pub period_start: Timestamp,
    pub spent: Spend,
    pub reserved: Spend,
}

/// Every open reservation and every agent's spending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    reservations: BTreeMap<u64, Reservation>,
    next_id: u64,
    agents: BTreeMap<AgentName, AgentSpend>,
}

impl Budgets {
    pub fn reservation(&self, id: u64) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id + 1
    }

    /// `agent`'s spending in the period that contains `now` (empty if that period has not
    /// started), and when that period started.
    pub fn agent_at(&self, agent: &AgentName, budget: &AgentBudget, now: Timestamp) -> (Timestamp, AgentSpend) {
        match self.agents.get(agent) {
            Some(spend) if now.0 < spend.period_start.0.saturating_add(budget.period_ms) => {
                (spend.period_start, spend.clone())
            }
            Some(spend) => (now, AgentSpend { period_start: now, spent: Spend::default(), reserved: spend.reserved }),
            None => (now, AgentSpend { period_start: now, ..AgentSpend::default() }),
        }
    }

    /// `agent`'s spending as logged.
    pub fn agent(&self, agent: &AgentName) -> Option<&AgentSpend> {
        self.agents.get(agent)
    }

    fn roll(&mut self, agent: &AgentName, period: Timestamp) -> &mut AgentSpend {
        let spend = self.agents.entry(agent.clone()).or_default();
        if spend.period_start != period {
            spend.period_start = period;
            spend.spent = Spend::default();
        }
        spend
    }

    pub(crate) fn reserve(&mut self, id: u64, reservation: Reservation, period: Timestamp) {
        self.next_id = self.next_id.max(id);
        let account = self.roll(&reservation.agent, period);
        account.reserved = account.reserved.plus(reservation.spend);
        self.reservations.insert(id, reservation);
    }

    /// Settles reservation `id` (if any) and counts `spend`; returns the settled reservation.
    pub(crate) fn report(
        &mut self,
        agent: &AgentName,
        id: Option<u64>,
        spend: Spend,
        period: Timestamp,
    ) -> Option<Reservation> {
        let settled = id.and_then(|id| self.reservations.remove(&id));
        let account = self.roll(agent, period);
        if let Some(settled) = &settled {
            account.reserved = account.reserved.minus(settled.spend);
        }
        account.spent = account.spent.plus(spend);
        settled
    }

    /// Drops the reservations of `agent`'s `incarnation` (all of them for `None`): that run
    /// is over and will report nothing. Returns them, so tasks can give theirs back.
    pub(crate) fn drop_run(&mut self, agent: &AgentName, incarnation: Option<u64>) -> Vec<Reservation> {
        let ids: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, held)| held.agent == *agent && incarnation.is_none_or(|wanted| wanted == held.incarnation))
            .map(|(id, _)| *id)
            .collect();
        let mut dropped = Vec::new();
        for id in ids {
            let held = self.reservations.remove(&id).expect("listed");
            if let Some(account) = self.agents.get_mut(agent) {
                account.reserved = account.reserved.minus(held.spend);
            }
            dropped.push(held);
        }
        dropped
    }
}

/// `decide` for reservations and reports of spending.
pub(crate) fn decide(
    context: &crate::decide::Context<'_>,
    command: &crate::command::BudgetCommand,
) -> Result<crate::command::Decision, crate::rejection::Rejection> {
    use crate::command::{Answer, BudgetCommand, Decision};
    use crate::event::Event;
    use crate::rejection::Rejection;
    let crate::decide::Context { state, now, .. } = *context;
    let (agent, incarnation, task) = match command {
        BudgetCommand::Reserve { agent, incarnation, task, .. }
        | BudgetCommand::ReportSpend { agent, incarnation, task, .. } => (agent, *incarnation, *task),
    };
    let record = crate::decide::running(state, agent, incarnation)?;
    let held = match task {
        Some(task) => Some(crate::tasks::leased(state, task, agent, incarnation)?),
        None => None,
    };
    let agent_budget = record.managed.as_ref().and_then(|managed| managed.spec.budget);
    let period = agent_budget.map_or(now, |budget| state.budgets().agent_at(agent, &budget, now).0);
    match command {
        BudgetCommand::Reserve { spend, .. } => {
            if let Some(budget) = &agent_budget {
                let (_, account) = state.budgets().agent_at(agent, budget, now);
                if let Some(detail) = account.spent.plus(account.reserved).plus(*spend).over(&budget.limits()) {
                    return Err(Rejection::OverBudget { whose: format!("agent {agent}"), detail });
                }
            }
            if let Some(found) = held
                && let Some(budget) = &found.spec.budget
                && let Some(detail) = found.spent.plus(found.reserved).plus(*spend).over(budget)
            {
                return Err(Rejection::OverBudget { whose: format!("task {}", found.id), detail });
            }
            let reservation = state.budgets().next_id();
            Ok(Decision {
                events: vec![Event::BudgetReserved {
                    reservation,
                    agent: agent.clone(),
                    incarnation,
                    task,
                    spend: *spend,
                    period,
                }],
                answer: Answer::Reserved { reservation },
            })
        }
        BudgetCommand::ReportSpend { reservation, spend, .. } => {
            Ok(Decision::done(spent(context, record, held, *reservation, *spend)?))
        }
    }
}

/// The events of spending `spend` by run `incarnation` of `record` (for the task `held`,
/// if given; settling `reservation`, if given): the report, and if it goes over the
/// agent's budget or the task's, the breach and what follows it. Used by `report_spend`
/// and by a committed step whose model call used tokens.
pub(crate) fn spent(
    context: &crate::decide::Context<'_>,
    record: &crate::state::AgentRecord,
    held: Option<&crate::tasks::Task>,
    reservation: Option<u64>,
    spend: Spend,
) -> Result<Vec<crate::event::Event>, crate::rejection::Rejection> {
    use crate::event::Event;
    use crate::rejection::Rejection;
    let crate::decide::Context { state, settings, now, .. } = *context;
    let agent = &record.name;
    let incarnation = record.incarnation;
    let task = held.map(|found| found.id);
    let agent_budget = record.managed.as_ref().and_then(|managed| managed.spec.budget);
    let period = agent_budget.map_or(now, |budget| state.budgets().agent_at(agent, &budget, now).0);
    if let Some(id) = reservation
        && !state
            .budgets()
            .reservation(id)
            .is_some_and(|found| found.agent == *agent && found.incarnation == incarnation)
    {
        return Err(Rejection::BadTask { reason: format!("run {incarnation} of {agent} holds no reservation {id}") });
    }
    let mut events = vec![Event::SpendReported { agent: agent.clone(), incarnation, task, reservation, spend, period }];
    let mut breach = None;
    if let Some(budget) = &agent_budget {
        let (_, account) = state.budgets().agent_at(agent, budget, now);
        if let Some(detail) = account.spent.plus(spend).over(&budget.limits()) {
            breach = Some((None, format!("agent {agent} spent {detail} in its period")));
        }
    }
    if let Some(found) = held
        && let Some(budget) = &found.spec.budget
        && let Some(detail) = found.spent.plus(spend).over(budget)
    {
        breach = Some((Some(found.id), format!("task {} spent {detail}", found.id)));
    }
    if let Some((over_task, detail)) = breach {
        if let Some(id) = over_task {
            events.extend(crate::tasks::fail_task(state, id, format!("over its budget: {detail}")));
        }
        events.push(Event::BudgetBreached {
            agent: agent.clone(),
            incarnation,
            task: over_task,
            detail: detail.clone(),
        });
        if !matches!(record.health.breaker, crate::health::Breaker::Open { .. }) {
            let until = Timestamp(now.0.saturating_add(settings.breaker.open_ms));
            events.push(Event::BreakerOpened { agent: agent.clone(), errors: 0, until });
        }
        if settings.tasks.quarantine_on_budget_breach && record.health.quarantine.is_none() {
            let reason = format!("over budget: {detail}");
            events.extend(crate::health::quarantine(context, agent, crate::health::Reporter::Hale, reason));
        }
    }
    Ok(events)
}
