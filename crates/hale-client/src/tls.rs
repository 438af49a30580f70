//! Verifying a hale that serves TLS, against a CA file (PEM).

use crate::error::ClientError;
use std::path::Path;
use std::sync::Arc;

/// A rustls client configuration that trusts the certificates in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let unreadable = |error: &dyn std::fmt::Display| {
        ClientError::Protocol(format!("cannot read the CA file {}: {error}", ca_file.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|error| unreadable(&error))? {
        roots.add(cert.map_err(|error| unreadable(&error))?).map_err(|error| unreadable(&error))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Protocol(format!("the CA file {} holds no PEM certificate", ca_file.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientError::Protocol(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An HTTP client that trusts `ca_file` (and no other roots) if one is given.
pub fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    let Some(ca_file) = ca_file else { return Ok(reqwest::Client::new()) };
    let pem = std::fs::read(ca_file)
        .map_err(|error| ClientError::Protocol(format!("cannot read the CA file {}: {error}", ca_file.display())))?;
    let mut builder = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false);
    for cert in reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|error| ClientError::Protocol(format!("the CA file {}: {error}", ca_file.display())))?
    {
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|error| ClientError::Protocol(error.to_string()))
}
