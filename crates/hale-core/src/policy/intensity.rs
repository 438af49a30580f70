use crate::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Restart intensity: more than `restarts_max` restarts within `window_ms` means the agent
/// cannot be kept alive by restarting it, so it is marked failed and a human is told.
/// The default, 5 within 10 s, is systemd's `StartLimitBurst=5` in `StartLimitIntervalSec=10s`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Intensity {
    pub restarts_max: u32,
    pub window_ms: u64,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity { restarts_max: 5, window_ms: 10_000 }
    }
}

/// The recent restarts of one agent, as many as the intensity needs to judge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartWindow {
    restarts: VecDeque<Timestamp>,
}

impl RestartWindow {
    /// Counts a restart at `now`. Returns `false` if it makes more than
    /// `intensity.restarts_max` within the window: the restart must not happen.
    pub fn admit(&mut self, now: Timestamp, intensity: &Intensity) -> bool {
        self.restarts.push_back(now);
        while let Some(&oldest) = self.restarts.front() {
            if now.0.saturating_sub(oldest.0) >= intensity.window_ms {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        // Only the last `restarts_max + 1` can matter.
        while self.restarts.len() > intensity.restarts_max as usize + 1 {
            self.restarts.pop_front();
        }
        self.restarts.len() <= intensity.restarts_max as usize
    }

    /// Forgets the history, e.g. after an operator's `hale restart`.
    pub fn clear(&mut self) {
        self.restarts.clear();
    }

    /// Restarts counted within the window as of the last `admit`.
    pub fn len(&self) -> usize {
        self.restarts.len()
    }

    /// Whether no restart is counted.
    pub fn is_empty(&self) -> bool {
        self.restarts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn the_sixth_restart_within_ten_seconds_is_refused() {
        let intensity = Intensity::default();
        let mut window = RestartWindow::default();
        for n in 0..5 {
            assert!(window.admit(at(n * 1_000), &intensity), "restart {n}");
        }
        assert!(!window.admit(at(5_000), &intensity));
    }

    #[test]
    fn restarts_spread_wider_than_the_window_are_always_admitted() {
        let intensity = Intensity { restarts_max: 2, window_ms: 1_000 };
        let mut window = RestartWindow::default();
        for n in 0..100 {
            assert!(window.admit(at(n * 600), &intensity), "restart {n}");
        }
        assert!(window.len() <= 3);
    }

    #[test]
    fn clearing_revives() {
        let intensity = Intensity { restarts_max: 1, window_ms: 10_000 };
        let mut window = RestartWindow::default();
        assert!(window.admit(at(0), &intensity));
        assert!(!window.admit(at(1), &intensity));
        window.clear();
        assert!(window.admit(at(2), &intensity));
    }

    #[test]
    fn zero_restarts_allowed_refuses_the_first() {
        let intensity = Intensity { restarts_max: 0, window_ms: 10_000 };
        assert!(!RestartWindow::default().admit(at(0), &intensity));
    }
}
