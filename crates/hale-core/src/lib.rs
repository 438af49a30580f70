//! The pure core of hale.
//!
//! Everything durable in hale is an [`Event`] in one log, and the state of the whole
//! system is a fold of that log. This crate holds the fold and the rules that produce
//! events:
//!
//! * [`Core::decide`] checks a [`Command`] against the current [`State`] and returns the
//!   events it causes, or a [`Rejection`] saying what was wrong. It changes nothing.
//! * [`Core::apply`] folds one event into the state. It never fails and never looks at
//!   anything but the event and the state, so replaying a log always gives the same state.
//! * [`Core::execute`] is `decide` followed by `apply` of every event it returned: what the
//!   shell calls for a live command.
//!
//! Architecture invariant: this crate does no I/O, reads no clock, draws no randomness and
//! depends on no async runtime or database crate. Time arrives as a [`Timestamp`] argument.
//! The `clippy.toml` beside this crate's manifest holds that line.

mod command;
mod decide;
mod event;
mod limits;
mod merge;
mod names;
pub mod policy;
mod rejection;
mod rng;
mod state;

pub use command::{Command, Hello, RollbackTarget};
pub use event::Event;
pub use limits::{Limits, PATCH_DEPTH_MAX};
pub use merge::{json_depth, json_size, merge_patch, merged_size};
pub use names::{AgentName, NameError, PointName, RoleName, validate_labels};
pub use rejection::Rejection;
pub use rng::Rng;
pub use state::{AgentRecord, RecoveryPoint, State};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as the shell read them from its clock.
///
/// The core never reads a clock; every input that needs time carries one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

/// The state machine: the folded [`State`] plus the [`Limits`] that `decide` enforces.
///
/// Inputs are commands (`decide`, `execute`) and events (`apply`); there are no outputs
/// to drain yet. Limits are not part of the state: changing a limit never changes what a
/// replay of the log produces, except for how much version history is retained.
#[derive(Clone, Debug)]
pub struct Core {
    state: State,
    limits: Limits,
}

impl Core {
    /// A core with an empty state.
    pub fn new(limits: Limits) -> Self {
        Self::from_state(State::default(), limits)
    }

    /// A core that continues from a state restored from a snapshot.
    pub fn from_state(state: State, limits: Limits) -> Self {
        Core { state, limits }
    }

    /// The folded state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Takes the state out, e.g. to compare replays in tests.
    pub fn into_state(self) -> State {
        self.state
    }

    /// The limits `decide` enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks `command` against the current state at time `now`; returns the events it
    /// causes (possibly none) or why it was refused. Changes nothing.
    pub fn decide(&self, command: &Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
        decide::decide(&self.state, &self.limits, command, now)
    }

    /// Folds one event, logged at `at`, into the state. Never fails: an event that made it
    /// into the log is a fact.
    pub fn apply(&mut self, at: Timestamp, event: &Event) {
        self.state.apply(&self.limits, at, event.clone());
    }

    /// Like [`apply`](Core::apply) for an event the caller no longer needs (replay): its
    /// parts move into the state instead of being copied.
    pub fn apply_owned(&mut self, at: Timestamp, event: Event) {
        self.state.apply(&self.limits, at, event);
    }

    /// `decide`, then `apply` of every event it returned. The caller logs the events.
    pub fn execute(&mut self, command: &Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
        let events = self.decide(command, now)?;
        for event in &events {
            self.apply(now, event);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests;
