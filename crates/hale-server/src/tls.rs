//! TLS on the listener, with rustls, when a certificate and key are configured.
//!
//! Handshakes run in tasks of their own, at most `HANDSHAKES_MAX` at once and each within
//! `HANDSHAKE_TIMEOUT`, so a client that opens a connection and says nothing holds one
//! slot for a few seconds and never stops others from connecting.

use crate::limits::{Admission, Conn, ConnActivity, ConnectionLimits, Limited};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

const HANDSHAKES_MAX: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[server] tls_cert_file` and `tls_key_file` (PEM).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// What the agents hale runs verify the server against (`HALE_CA_FILE`); default the
    /// certificate file itself, which suits a self-signed certificate.
    pub ca_file: Option<PathBuf>,
}

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn read_error(what: &str, path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError(format!("cannot read the {what} {}: {error}", path.display()))
}

/// A TLS acceptor for the certificate chain and key in `files`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|error| read_error("certificate file", &files.cert_file, error))?
        .collect::<Result<_, _>>()
        .map_err(|error| read_error("certificate file", &files.cert_file, error))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no PEM certificate", files.cert_file.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|error| read_error("private key file", &files.key_file, error))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| TlsError(format!("the certificate and key do not go together: {error}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener that hands axum connections once their TLS handshake is done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Limited>, SocketAddr)>,
    local: SocketAddr,
    limits: ConnectionLimits,
}

impl TlsListener {
    /// Connections are bounded as on plain TCP (`limits`): open ones hold a slot, and one
    /// that sends nothing in time is closed; handshakes are bounded besides.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, limits: ConnectionLimits) -> std::io::Result<TlsListener> {
        let admission = Admission::new(limits);
        let local = listener.local_addr()?;
        let (done, ready) = mpsc::channel(HANDSHAKES_MAX);
        let slots = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        tokio::spawn(async move {
            let mut refused = 0;
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let stream = match admission.admit(stream, peer) {
                    Ok(stream) => stream,
                    Err(why) => {
                        crate::limits::log_refused(&mut refused, peer, why, admission.limits());
                        continue;
                    }
                };
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local, limits })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Conn<TlsStream<Limited>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some((stream, peer)) => (Conn::new(stream, &self.limits), peer),
            // The accepting task ended (it does not while the listener lives): wait forever,
            // as a listener with nothing to accept does.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for ConnActivity {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.io().activity()
    }
}
