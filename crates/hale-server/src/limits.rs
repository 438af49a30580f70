//! Bounds on connections: how many are open at once, and how long one may sit without
//! sending its first byte. Without them, idle or half-open connections pile up until the
//! process runs out of file descriptors and memory.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connection limits, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections at most; past it, new ones are closed at once.
    pub max: usize,
    /// A connection that sends nothing for this long after it opens is closed.
    pub first_byte_timeout: Duration,
    /// A request body must arrive within this (`408 request_timeout` otherwise).
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 4_096,
            first_byte_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// A plain TCP listener with the limits applied.
pub struct LimitedListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    refused: u64,
}

impl LimitedListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> LimitedListener {
        LimitedListener { listener, slots: Arc::new(Semaphore::new(limits.max.max(1))), limits, refused: 0 }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Limited;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: back off a little rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(limited) = Limited::admit(stream, &self.slots, &self.limits) else {
                // Said once per thousand, so a flood of connections is not also a flood of logs.
                self.refused += 1;
                if self.refused % 1000 == 1 {
                    tracing::warn!(%peer, max = self.limits.max, refused = self.refused, "too many open connections; closing new ones");
                }
                continue;
            };
            return (limited, peer);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl Limited {
    /// Wraps an accepted connection, taking a slot of `slots` (or `None` if none is free).
    pub fn admit(stream: TcpStream, slots: &Arc<Semaphore>, limits: &ConnectionLimits) -> Option<Limited> {
        let permit = slots.clone().try_acquire_owned().ok()?;
        let _ = stream.set_nodelay(true);
        let deadline = Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout)));
        Some(Limited { stream, _permit: permit, deadline })
    }
}

/// A connection that holds a slot while open and must say something in time.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &read
            && buf.filled().len() > before
        {
            self.deadline = None;
        }
        if read.is_pending()
            && let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "nothing sent in time")));
        }
        read
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
