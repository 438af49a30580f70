//! Failure hooks: which events call for a human, by the names hale.toml uses for them.
//!
//! The shell delivers hooks (a webhook or a command) and reports each outcome back as
//! `RecordHookOutcome`, which logs `HookDelivered` or `HookFailed`: the log is the audit
//! trail of who was told what. The mapping lives here, beside the events, so that a new
//! event kind is decided on where the events are defined, and so that the rule "hook
//! events never call hooks" is a property of one pure function.

use crate::command::{Decision, HookCommand};
use crate::decide::check_reason;
use crate::event::Event;
use crate::rejection::Rejection;
use crate::supervision::Cause;
use serde::{Deserialize, Serialize};

/// A kind of event a hook can be called on, named as in hale.toml (`agent.down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HookKind {
    /// An incarnation was declared down (not stopped on purpose, not a stall).
    #[serde(rename = "agent.down")]
    AgentDown,
    /// Too many restarts within the window: hale has given up on the agent.
    #[serde(rename = "agent.failed")]
    AgentFailed,
    /// An incarnation was declared down by the stall detector.
    #[serde(rename = "agent.stalled")]
    AgentStalled,
    #[serde(rename = "agent.quarantined")]
    AgentQuarantined,
    /// A new incarnation started after an earlier one (a restart).
    #[serde(rename = "agent.restarted")]
    AgentRestarted,
    #[serde(rename = "budget.breached")]
    BudgetBreached,
    #[serde(rename = "task.failed")]
    TaskFailed,
    #[serde(rename = "mode.changed")]
    ModeChanged,
}

impl HookKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [HookKind; 8] = [
        HookKind::AgentDown,
        HookKind::AgentFailed,
        HookKind::AgentStalled,
        HookKind::AgentQuarantined,
        HookKind::AgentRestarted,
        HookKind::BudgetBreached,
        HookKind::TaskFailed,
        HookKind::ModeChanged,
    ];

    /// The name hale.toml and the hook's body use.
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::AgentDown => "agent.down",
            HookKind::AgentFailed => "agent.failed",
            HookKind::AgentStalled => "agent.stalled",
            HookKind::AgentQuarantined => "agent.quarantined",
            HookKind::AgentRestarted => "agent.restarted",
            HookKind::BudgetBreached => "budget.breached",
            HookKind::TaskFailed => "task.failed",
            HookKind::ModeChanged => "mode.changed",
        }
    }

    /// The kind named `name`, if there is one.
    pub fn parse(name: &str) -> Option<HookKind> {
        HookKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The kind of hook `event` calls for, if any. `HookDelivered` and `HookFailed` call
    /// for none, so a hook can never be called about a hook (no loops).
    pub fn of(event: &Event) -> Option<HookKind> {
        Some(match event {
            Event::AgentDown { cause: Cause::Stopped, .. } => return None,
            Event::AgentDown { cause: Cause::StalledProgress { .. } | Cause::StalledCheckpoints { .. }, .. } => {
                HookKind::AgentStalled
            }
            Event::AgentDown { .. } => HookKind::AgentDown,
            Event::AgentFailed { .. } => HookKind::AgentFailed,
            Event::Quarantined { .. } => HookKind::AgentQuarantined,
            Event::IncarnationStarted { incarnation, .. } if *incarnation > 1 => HookKind::AgentRestarted,
            Event::BudgetBreached { .. } => HookKind::BudgetBreached,
            Event::TaskFailed { .. } => HookKind::TaskFailed,
            Event::ModeChanged { .. } => HookKind::ModeChanged,
            _ => return None,
        })
    }
}

/// `decide` for a hook's outcome: logged as delivered, or as given up on with its error.
pub(crate) fn decide(command: &HookCommand) -> Result<Decision, Rejection> {
    let HookCommand::RecordOutcome { hook, kind, seq, attempts, error } = command;
    let (hook, kind, seq, attempts) = (hook.clone(), *kind, *seq, (*attempts).max(1));
    Ok(Decision::done(vec![match error {
        None => Event::HookDelivered { hook, kind, seq, attempts },
        Some(error) => {
            check_reason(error)?;
            Event::HookFailed { hook, kind, seq, attempts, error: error.clone() }
        }
    }]))
}

impl std::fmt::Display for HookKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{AgentName, HookName};

    #[test]
    fn names_round_trip_and_serde_uses_them() {
        for kind in HookKind::ALL {
            assert_eq!(HookKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), serde_json::json!(kind.as_str()));
        }
        assert_eq!(HookKind::parse("agent.exploded"), None);
    }

    #[test]
    fn events_map_to_kinds_and_hook_events_to_none() {
        let agent = AgentName::new("a").unwrap();
        let down = |cause| Event::AgentDown { agent: agent.clone(), incarnation: 1, cause };
        assert_eq!(HookKind::of(&down(Cause::Exited { code: None, signal: Some(9) })), Some(HookKind::AgentDown));
        assert_eq!(HookKind::of(&down(Cause::StalledProgress { beats: 3 })), Some(HookKind::AgentStalled));
        assert_eq!(HookKind::of(&down(Cause::Stopped)), None);
        let started = |incarnation| Event::IncarnationStarted { agent: agent.clone(), incarnation };
        assert_eq!(HookKind::of(&started(1)), None);
        assert_eq!(HookKind::of(&started(2)), Some(HookKind::AgentRestarted));
        let hook = HookName::new("pager").unwrap();
        let delivered = Event::HookDelivered { hook: hook.clone(), kind: HookKind::AgentDown, seq: 7, attempts: 1 };
        let failed =
            Event::HookFailed { hook, kind: HookKind::AgentDown, seq: 7, attempts: 6, error: "HTTP 500".into() };
        assert_eq!(HookKind::of(&delivered), None);
        assert_eq!(HookKind::of(&failed), None);
    }

    #[test]
    fn an_outcome_logs_one_event_and_an_overlong_error_is_refused() {
        use crate::{Command, Core, Limits, Rejection, Timestamp};
        let mut core = Core::new(Limits::default());
        let hook = HookName::new("pager").unwrap();
        let outcome = |error: Option<String>| {
            Command::from(HookCommand::RecordOutcome {
                hook: hook.clone(),
                kind: HookKind::TaskFailed,
                seq: 3,
                attempts: 2,
                error,
            })
        };
        let delivered = core.execute(&outcome(None), Timestamp(1)).unwrap().events;
        assert_eq!(
            delivered,
            [Event::HookDelivered { hook: hook.clone(), kind: HookKind::TaskFailed, seq: 3, attempts: 2 }]
        );
        let failed = core.execute(&outcome(Some("HTTP 503".into())), Timestamp(2)).unwrap().events;
        assert!(matches!(&failed[..], [Event::HookFailed { error, .. }] if error == "HTTP 503"), "{failed:?}");
        let refused = core.execute(&outcome(Some("x".repeat(5000))), Timestamp(3));
        assert!(matches!(refused, Err(Rejection::ReasonTooLong { .. })), "{refused:?}");
    }

    #[test]
    fn each_hook_keeps_the_newest_event_it_has_an_outcome_for() {
        use crate::{Command, Core, Limits, Timestamp};
        let mut core = Core::new(Limits::default());
        let (pager, mail) = (HookName::new("pager").unwrap(), HookName::new("mail").unwrap());
        let outcome = |hook: &HookName, seq, error: Option<&str>| {
            Command::from(HookCommand::RecordOutcome {
                hook: hook.clone(),
                kind: HookKind::AgentDown,
                seq,
                attempts: 1,
                error: error.map(String::from),
            })
        };
        assert_eq!(core.state().hook_mark(&pager), None, "no outcome yet");
        core.execute(&outcome(&pager, 7, None), Timestamp(1)).unwrap();
        core.execute(&outcome(&pager, 9, Some("HTTP 500")), Timestamp(2)).unwrap();
        core.execute(&outcome(&mail, 3, None), Timestamp(3)).unwrap();
        // An older outcome logged late does not move the mark back.
        core.execute(&outcome(&pager, 8, None), Timestamp(4)).unwrap();
        assert_eq!((core.state().hook_mark(&pager), core.state().hook_mark(&mail)), (Some(9), Some(3)));
        let snapshot: crate::State = serde_json::from_value(serde_json::to_value(core.state()).unwrap()).unwrap();
        assert_eq!(snapshot.hook_mark(&pager), Some(9), "kept in snapshots");
    }
}
