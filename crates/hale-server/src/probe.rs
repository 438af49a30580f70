//! The health probe detector: an HTTP GET of an agent's own health endpoint.
//!
//! A tiny HTTP/1.1 client over a tokio `TcpStream` (one request, `Connection: close`,
//! status line only): a full HTTP client crate would be a heavy dependency for reading
//! three digits.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An agent's health probe, from hale.toml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub url: String,
    pub every: Duration,
    pub timeout: Duration,
}

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A 2xx answer.
    Healthy,
    /// Anything else: the reason, for the log and the cause of a down.
    Unhealthy(String),
}

/// `GET url` with a `timeout` for the whole exchange. Only `http://host:port/path` URLs
/// (the manifest checks the scheme).
pub async fn probe(url: &str, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, get_status(url)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => Probe::Healthy,
        Ok(Ok(status)) => Probe::Unhealthy(format!("{url} answered HTTP {status}")),
        Ok(Err(error)) => Probe::Unhealthy(format!("{url}: {error}")),
        Err(_) => Probe::Unhealthy(format!("{url} did not answer within {} ms", timeout.as_millis())),
    }
}

async fn get_status(url: &str) -> std::io::Result<u16> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let rest = url.strip_prefix("http://").ok_or_else(|| invalid("not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: hale-probe\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The status line is all we need; 64 bytes hold it.
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < head.len() {
        let n = stream.read(&mut head[read..]).await?;
        if n == 0 {
            break;
        }
        read += n;
        if head[..read].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP answer: {line:?}")))
}
