//! The committed records, copied into the data directory's `events` table as the state
//! machine applies them, so that what reads hale's log (the events API and its stream,
//! `hale verify`, backups) works on a node of a cluster too.
//!
//! The Raft log is what is durable; the copy is written by a thread of its own, in
//! batches, without fsync (`Log::open_copy`), and skips records it holds already (entries
//! are applied again after a restart). [`Mirror::copied`] says how far it has got, so a
//! reader can wait for the records it must see. A node that caught up from a snapshot
//! has no copy of the records before it.

use hale_store::{Log, Record};
use std::path::Path;
use std::sync::mpsc;
use tokio::sync::watch;

/// The copy's writer.
pub struct Mirror {
    records: mpsc::Sender<Vec<Record>>,
    copied: std::sync::Arc<watch::Sender<u64>>,
}

impl Mirror {
    /// Opens (creating if needed) the `events` table of the database at `path` and starts
    /// the thread that copies records into it.
    pub fn open(path: &Path) -> Result<Mirror, hale_store::StoreError> {
        let mut log = Log::open_copy(path)?;
        let copied = std::sync::Arc::new(watch::Sender::new(log.last_seq()?));
        let copied_tx = copied.clone();
        let (records, received) = mpsc::channel::<Vec<Record>>();
        std::thread::Builder::new()
            .name("hale-events-copy".into())
            .spawn(move || {
                while let Ok(mut batch) = received.recv() {
                    while let Ok(more) = received.try_recv() {
                        batch.extend(more);
                    }
                    let last = batch.last().map_or(0, |record| record.seq);
                    match log.copy(&batch) {
                        Ok(()) => advance(&copied_tx, last),
                        Err(error) => tracing::error!(%error, "could not copy committed records into the events table"),
                    }
                }
            })
            .expect("a thread starts");
        Ok(Mirror { records, copied })
    }

    /// Queues `records` (committed, in order) to be copied.
    pub fn send(&self, records: Vec<Record>) {
        if !records.is_empty() {
            let _ = self.records.send(records);
        }
    }

    /// The last sequence number copied, as it moves.
    pub fn copied(&self) -> watch::Receiver<u64> {
        self.copied.subscribe()
    }

    /// The state machine installed a snapshot up to `seq`: the records before it are not
    /// coming (this node's copy has a gap there), so readers need not wait for them.
    pub fn skip_to(&self, seq: u64) {
        advance(&self.copied, seq);
    }
}

fn advance(copied: &watch::Sender<u64>, to: u64) {
    copied.send_if_modified(|copied| {
        let moved = to > *copied;
        *copied = (*copied).max(to);
        moved
    });
}
