//! The one thread that appends to the log, with group commit.

use crate::log::Log;
use crate::record::Record;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Tuning of the writer.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Appends that may wait for the writer before senders are held back.
    pub queue_len_max: usize,
    /// Most records committed in one transaction.
    pub batch_records_max: usize,
    /// Told of every commit that wrote records (for metrics); it decides nothing.
    pub on_commit: Option<CommitHook>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { queue_len_max: 65_536, batch_records_max: 16_384, on_commit: None }
    }
}

/// Called on the writer thread after each successful commit with the number of records
/// and how long the commit (transaction and fsync) took. It must be quick: it delays the
/// acknowledgements of that batch.
#[derive(Clone)]
pub struct CommitHook(pub Arc<dyn Fn(usize, Duration) + Send + Sync>);

impl std::fmt::Debug for CommitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitHook")
    }
}

/// Why an append was not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A commit failed (for example fsync returned EIO). Nothing after it is written: the
    /// process must restart and recover from the log.
    #[error(
        "the log could not be written ({0}); hale has stopped accepting writes. Fix the disk, then restart hale: it recovers every acknowledged write from the log"
    )]
    Failed(Arc<str>),
    /// The writer has shut down.
    #[error("the log writer has stopped")]
    Stopped,
}

/// What is durable so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durability {
    /// Every record up to this sequence number is committed and fsync'd.
    pub durable_seq: u64,
    /// Set once a commit has failed; no later record will become durable.
    pub failed: Option<Arc<str>>,
}

/// Resolves once the append is durable, or says why it never will be.
pub type AppendAck = oneshot::Receiver<Result<(), WriteError>>;

struct Append {
    records: Vec<Record>,
    ack: oneshot::Sender<Result<(), WriteError>>,
}

/// Handle to the writer thread. Appends are committed in the order they are sent.
pub struct Writer {
    queue: mpsc::Sender<Append>,
    durability: watch::Receiver<Durability>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread over `log`, whose last durable record is `durable_seq`.
    pub fn start(log: Log, durable_seq: u64, options: WriterOptions) -> Writer {
        let (queue, receiver) = mpsc::channel(options.queue_len_max);
        let (durability_tx, durability) = watch::channel(Durability { durable_seq, failed: None });
        let thread = std::thread::Builder::new()
            .name("hale-writer".into())
            .spawn(move || run(log, receiver, durability_tx, options))
            .expect("spawning the writer thread");
        Writer { queue, durability, thread: Some(thread) }
    }

    /// Queues `records` (consecutive sequence numbers, following what was queued before)
    /// and returns what resolves when they are durable. Waits while the queue is full.
    /// An empty `records` is a barrier: it resolves when everything queued before is durable.
    pub async fn append(&self, records: Vec<Record>) -> AppendAck {
        let (ack, done) = oneshot::channel();
        if let Err(mpsc::error::SendError(append)) = self.queue.send(Append { records, ack }).await {
            let _ = append.ack.send(Err(WriteError::Stopped));
        }
        done
    }

    /// What is durable now; `changed()` on the receiver waits for progress.
    pub fn durability(&self) -> watch::Receiver<Durability> {
        self.durability.clone()
    }

    /// Stops taking appends, commits what is queued, and waits for the thread to end.
    pub fn shutdown(mut self) {
        let (queue, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, queue));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    mut log: Log,
    mut receiver: mpsc::Receiver<Append>,
    durability: watch::Sender<Durability>,
    options: WriterOptions,
) {
    let mut failed: Option<Arc<str>> = None;
    let mut pending: Vec<Append> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    while let Some(first) = receiver.blocking_recv() {
        let mut record_count = first.records.len();
        pending.push(first);
        while record_count < options.batch_records_max {
            match receiver.try_recv() {
                Ok(append) => {
                    record_count += append.records.len();
                    pending.push(append);
                }
                Err(_) => break,
            }
        }
        if let Some(reason) = &failed {
            for append in pending.drain(..) {
                let _ = append.ack.send(Err(WriteError::Failed(reason.clone())));
            }
            continue;
        }
        records.clear();
        for append in &mut pending {
            records.append(&mut append.records);
        }
        let began = Instant::now();
        let result = if records.is_empty() { Ok(()) } else { log.append(&records) };
        match result {
            Ok(()) => {
                if let Some(hook) = options.on_commit.as_ref().filter(|_| !records.is_empty()) {
                    (hook.0)(records.len(), began.elapsed());
                }
                if let Some(last) = records.last() {
                    durability.send_modify(|d| d.durable_seq = last.seq);
                }
                for append in pending.drain(..) {
                    let _ = append.ack.send(Ok(()));
                }
            }
            Err(error) => {
                // Never retry: after a failed fsync the kernel may have dropped the dirty
                // pages, so a retry that "succeeds" can still have lost them.
                let reason: Arc<str> = Arc::from(error.to_string());
                tracing::error!(%reason, "log commit failed; refusing all further writes");
                failed = Some(reason.clone());
                durability.send_modify(|d| d.failed = Some(reason.clone()));
                for append in pending.drain(..) {
                    let _ = append.ack.send(Err(WriteError::Failed(reason.clone())));
                }
            }
        }
    }
}
