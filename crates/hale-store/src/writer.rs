//! The one thread that appends to the log, with group commit: the single-node
//! [`DurableLog`].

use crate::durable::{Durability, DurableLog, WriteError};
use crate::log::Log;
use crate::record::Record;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

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

/// Handle to the writer thread. Appends are committed in the order they are sent; what
/// is durable is published on [`durability`](DurableLog::durability).
pub struct Writer {
    queue: mpsc::Sender<Vec<Record>>,
    durability: watch::Receiver<Durability>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread over `log`, whose last durable record is `durable_seq`.
    pub fn start(log: Log, durable_seq: u64, options: WriterOptions) -> Writer {
        let (queue, receiver) = mpsc::channel(options.queue_len_max);
        let (durability_tx, durability) = watch::channel(Durability::at(durable_seq));
        let thread = std::thread::Builder::new()
            .name("hale-writer".into())
            .spawn(move || run(log, receiver, durability_tx, options))
            .expect("spawning the writer thread");
        Writer { queue, durability, thread: Some(thread) }
    }
}

impl DurableLog for Writer {
    async fn append(&self, records: Vec<Record>) -> Result<(), WriteError> {
        self.queue.send(records).await.map_err(|_| WriteError::Stopped)
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.durability.clone()
    }

    fn shutdown(mut self) {
        let (queue, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, queue));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    mut log: Log,
    mut receiver: mpsc::Receiver<Vec<Record>>,
    durability: watch::Sender<Durability>,
    options: WriterOptions,
) {
    let mut failed = false;
    let mut records: Vec<Record> = Vec::new();
    while let Some(mut first) = receiver.blocking_recv() {
        records.clear();
        records.append(&mut first);
        while records.len() < options.batch_records_max {
            match receiver.try_recv() {
                Ok(mut more) => records.append(&mut more),
                Err(_) => break,
            }
        }
        // After a failure nothing more is written: the appends are drained and dropped,
        // and `durability` keeps saying why.
        if failed || records.is_empty() {
            continue;
        }
        let began = Instant::now();
        match log.append(&records) {
            Ok(()) => {
                if let Some(hook) = &options.on_commit {
                    (hook.0)(records.len(), began.elapsed());
                }
                let last = records.last().expect("not empty").seq;
                durability.send_modify(|d| d.durable_seq = last);
            }
            Err(error) => {
                // Never retry: after a failed fsync the kernel may have dropped the dirty
                // pages, so a retry that "succeeds" can still have lost them.
                let reason: Arc<str> = Arc::from(error.to_string());
                tracing::error!(%reason, "log commit failed; refusing all further writes");
                failed = true;
                durability.send_modify(|d| d.failed = Some(reason));
            }
        }
    }
}
