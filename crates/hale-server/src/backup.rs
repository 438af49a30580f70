//! Backups while hale runs: on request (`POST /v1/backups`, `hale backup FILE`) and on a
//! schedule (`[backup]` in hale.toml) with rotation.
//!
//! Each backup is `hale_store::backup` on a blocking thread with a read connection of its
//! own; the writer never waits for it. One backup runs at a time: a second waits for the
//! first, so a manual backup and a scheduled one never double the load.

use crate::config::BackupSchedule;
use hale_store::{BackupReport, CopyProgress, PAGES_PER_STEP, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The backups of one server.
pub struct Backups {
    log_path: PathBuf,
    one_at_a_time: tokio::sync::Mutex<()>,
    /// Set at shutdown: a backup in progress stops at its next step.
    cancel: Arc<AtomicBool>,
}

/// Scheduled backups are named `hale-backup-<unix ms>.db`; only such files are rotated.
const PREFIX: &str = "hale-backup-";
const SUFFIX: &str = ".db";

impl Backups {
    pub fn new(log_path: PathBuf) -> Backups {
        Backups { log_path, one_at_a_time: tokio::sync::Mutex::new(()), cancel: Arc::new(AtomicBool::new(false)) }
    }

    /// Backs the log up into the new file `target`; `progress` is told of every step and
    /// may cancel by returning `false`. Returns the report and how long the copy took.
    /// Each backup written and each failure is logged here as `what` (`backup`, `scheduled
    /// backup`), whoever asked for it.
    pub async fn run(
        &self,
        what: &'static str,
        target: PathBuf,
        mut progress: impl FnMut(CopyProgress) -> bool + Send + 'static,
    ) -> Result<(BackupReport, Duration), StoreError> {
        let _turn = self.one_at_a_time.lock().await;
        let started = Instant::now();
        let log_path = self.log_path.clone();
        let cancel = self.cancel.clone();
        let path = target.clone();
        let written = tokio::task::spawn_blocking(move || {
            hale_store::backup(&log_path, &target, PAGES_PER_STEP, |done| {
                !cancel.load(Ordering::Relaxed) && progress(done)
            })
        })
        .await
        .expect("a backup does not panic");
        let elapsed = started.elapsed();
        match &written {
            Ok(report) => tracing::info!(
                path = %report.path.display(),
                bytes = report.bytes,
                records = report.records,
                last_seq = report.last_seq,
                elapsed_ms = elapsed.as_millis() as u64,
                "{what} written"
            ),
            Err(StoreError::Cancelled) => tracing::info!(path = %path.display(), "{what} cancelled"),
            Err(error) => tracing::error!(path = %path.display(), %error, "{what} FAILED"),
        }
        Ok((written?, elapsed))
    }

    /// Stops a backup in progress at its next step, and every later one (at shutdown).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Takes a backup into `schedule.dir` every `schedule.every` (the first one `every` after
/// start) until `stop`, keeping the newest `schedule.keep`. Each backup and each failure is
/// logged; a failure does not stop the schedule.
pub async fn run_schedule(backups: Arc<Backups>, schedule: BackupSchedule, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + schedule.every, schedule.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        let target = schedule.dir.join(format!("{PREFIX}{}{SUFFIX}", crate::clock::now().0));
        match backups.run("scheduled backup", target.clone(), |_| true).await {
            Ok(_) => match rotate(&schedule.dir, schedule.keep) {
                Ok(removed) => {
                    for path in removed {
                        tracing::info!(path = %path.display(), keep = schedule.keep, "old backup removed");
                    }
                }
                Err(error) => {
                    tracing::error!(dir = %schedule.dir.display(), %error, "removing old backups failed")
                }
            },
            Err(StoreError::Cancelled) => return,
            // Logged by `run`; the schedule goes on.
            Err(_) => tracing::info!(next_in_s = schedule.every.as_secs(), "the next scheduled backup is tried later"),
        }
    }
}

/// Removes the oldest `hale-backup-<ms>.db` files of `dir` past the newest `keep`; other
/// files are never touched. Returns what it removed.
pub fn rotate(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(ms) = name
            .to_str()
            .and_then(|name| name.strip_prefix(PREFIX))
            .and_then(|rest| rest.strip_suffix(SUFFIX))
            .and_then(|ms| ms.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((ms, entry.path()));
    }
    found.sort();
    let excess = found.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in found.into_iter().take(excess) {
        std::fs::remove_file(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["hale-backup-100.db", "hale-backup-300.db", "hale-backup-200.db", "mine.db", "hale-backup-x.db"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let removed = rotate(dir.path(), 2).unwrap();
        assert_eq!(removed, vec![dir.path().join("hale-backup-100.db")]);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["hale-backup-200.db", "hale-backup-300.db", "hale-backup-x.db", "mine.db"]);
    }
}
