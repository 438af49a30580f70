//! A progress bar on stderr for long CLI work (backup, restore, verify).
//!
//! A few lines of our own rather than a crate: one bar, redrawn in place at most ten times
//! a second on a terminal; when stderr is not a terminal (a log file, a test), only the
//! last state is printed, as one line, so logs are not filled with carriage returns.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const WIDTH: usize = 30;
const REDRAW_EVERY: Duration = Duration::from_millis(100);

pub struct Bar {
    label: String,
    unit: &'static str,
    terminal: bool,
    drawn_at: Option<Instant>,
    last: Option<(u64, u64)>,
}

impl Bar {
    /// A bar that reads `LABEL [####----] 45% 1234/5000 UNIT`.
    pub fn new(label: impl Into<String>, unit: &'static str) -> Bar {
        Bar { label: label.into(), unit, terminal: std::io::stderr().is_terminal(), drawn_at: None, last: None }
    }

    /// Records progress; redraws if on a terminal and it is time.
    pub fn set(&mut self, done: u64, total: u64) {
        self.last = Some((done, total));
        if self.terminal && self.drawn_at.is_none_or(|at| at.elapsed() >= REDRAW_EVERY) {
            self.draw("\r");
            self.drawn_at = Some(Instant::now());
        }
    }

    /// Draws the last state and ends the line.
    pub fn finish(&mut self) {
        if self.last.is_some() {
            self.draw(if self.terminal { "\r" } else { "" });
            eprintln!();
            self.last = None;
        }
    }

    fn draw(&self, start: &str) {
        let Some((done, total)) = self.last else { return };
        let fraction = if total == 0 { 1.0 } else { (done as f64 / total as f64).clamp(0.0, 1.0) };
        let filled = (fraction * WIDTH as f64).round() as usize;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(
            stderr,
            "{start}{} [{}{}] {:>3.0}% {done}/{total} {}",
            self.label,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            fraction * 100.0,
            self.unit
        );
        let _ = stderr.flush();
    }
}

impl Drop for Bar {
    /// A bar interrupted by an error still ends its line, so the error starts on its own.
    fn drop(&mut self) {
        if self.terminal && self.drawn_at.is_some() && self.last.is_some() {
            eprintln!();
        }
    }
}
