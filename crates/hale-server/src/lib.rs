//! The tokio shell of hale.
//!
//! It turns network input into `hale_core::Command`s, has the [`engine`] decide and apply
//! them, logs the resulting events through the `hale_store::Writer`, and answers only once
//! those events are durable. [`start`] recovers the data directory and serves the HTTP API
//! and the WebSocket session endpoint; [`RunningServer::shutdown`] stops accepting, closes
//! sessions, takes a final snapshot and flushes the log.

pub mod api;
mod clock;
mod config;
pub mod engine;
pub mod manifest;
mod sessions;

pub use config::ServerConfig;
pub use sessions::Sessions;

use engine::{Engine, SnapshotPolicy};
use hale_store::{DataDir, RecoveryOptions, RecoveryReport, StoreError, Writer, WriterOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why the server could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}; choose another --listen address or stop what uses it")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
    #[error("the log failed while running ({0}); acknowledged writes are safe in the log, restart hale to recover")]
    LogFailed(String),
}

/// A server that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    recovery: RecoveryReport,
    recovered_seq: u64,
    shutdown: watch::Sender<bool>,
    serving: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    engine: Engine,
    data_dir: DataDir,
}

/// Recovers the data directory and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let options = RecoveryOptions { limits: config.limits.clone(), repair: config.repair, now: clock::now() };
    let snapshot_dir = data_dir.snapshot_dir();
    let (data_dir, recovered) = tokio::task::spawn_blocking(move || {
        let recovered = hale_store::recover(&data_dir, &options);
        (data_dir, recovered)
    })
    .await
    .expect("recovery does not panic");
    let recovered = recovered?;
    let writer = Writer::start(recovered.log, recovered.last_seq, WriterOptions::default());
    let policy = SnapshotPolicy {
        dir: snapshot_dir,
        every_events: config.snapshot_every_events.max(1),
        every: config.snapshot_every,
        kept: config.snapshots_kept,
    };
    let engine = Engine::start(recovered.core, recovered.last_seq, writer, policy);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
    let (shutdown, stopping) = watch::channel(false);
    let app = api::AppState {
        engine: engine.clone(),
        sessions: Arc::new(Sessions::default()),
        frame_bytes_max: config.frame_bytes_max,
        body_bytes_max: config.body_bytes_max,
        session_in_flight_max: config.session_in_flight_max,
        shutdown: stopping.clone(),
    };
    let router = api::router(app);
    let mut stop_serving = stopping;
    let serving = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_serving.wait_for(|stopping| *stopping).await;
            })
            .await
    });
    Ok(RunningServer {
        local_addr,
        recovery: recovered.report,
        recovered_seq: recovered.last_seq,
        shutdown,
        serving,
        engine,
        data_dir,
    })
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What recovery found.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The last event recovered from the log.
    pub fn recovered_seq(&self) -> u64 {
        self.recovered_seq
    }

    /// The engine, for in-process use (benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Graceful shutdown: stop accepting, close sessions after answering what they asked,
    /// take a final snapshot, flush the log, release the data directory.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        let mut serving = self.serving;
        let served = match tokio::time::timeout(Duration::from_secs(10), &mut serving).await {
            Ok(result) => result.expect("the server task does not panic"),
            Err(_) => {
                tracing::warn!("connections did not close within 10 s; closing them");
                serving.abort();
                Ok(())
            }
        };
        self.engine.shutdown().await;
        let failed = self.engine.durability().failed;
        drop(self.data_dir);
        served.map_err(ServerError::Serve)?;
        match failed {
            Some(reason) => Err(ServerError::LogFailed(reason.to_string())),
            None => Ok(()),
        }
    }
}
