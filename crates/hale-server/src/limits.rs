//! Bounds on connections, so that no client can hold the listener for others: how many are
//! open at once, how many one address may hold, how long a new one may wait before its
//! first byte, how long a request head may take once begun, and how long a keep-alive
//! connection may sit idle between requests. Without them, idle, half-open or trickling
//! connections pile up until the process runs out of slots, file descriptors and memory.
//!
//! Two layers. [`Limited`] wraps the TCP stream: it holds the connection's slot and its
//! address's slot while open, and closes a connection that sends nothing in time (under
//! TLS, before the handshake). [`Conn`] wraps what HTTP reads (the TCP stream, or the TLS
//! stream over it) and knows the request boundaries from [`Activity`], which the router's
//! outermost middleware ([`track_requests`]) updates: between requests the connection is
//! *idle* (`first_byte_timeout` on a new connection, `keep_alive_idle_timeout` after a
//! response); from the first byte of a head until the head is parsed it is *in a head*
//! (`request_head_timeout`); while a request is in flight, or after a WebSocket upgrade,
//! no deadline of this module applies (bodies have `body_timeout`, sessions their
//! heartbeats and tokens). Past a deadline a read fails and hyper closes the connection.
//!
//! hyper's own `header_read_timeout` was not enough: it is one timer that starts when the
//! server begins waiting for a head, so the idle time of a keep-alive connection counts
//! against the head's deadline, and hyper has no idle timeout of its own for HTTP/1.

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connection limits, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections at most; past it, new ones are closed at once.
    pub max: usize,
    /// Open connections from one IP address at most; past it, its new ones are closed at once.
    pub per_address_max: usize,
    /// A connection that sends nothing for this long after it opens is closed.
    pub first_byte_timeout: Duration,
    /// A request head (request line and headers) must be complete this long after its
    /// first byte.
    pub request_head_timeout: Duration,
    /// A keep-alive connection that begins no new request this long after its last
    /// response is closed.
    pub keep_alive_idle_timeout: Duration,
    /// A request body must arrive within this (`408 request_timeout` otherwise).
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 4_096,
            // A quarter of `max`: one address cannot take every slot. Managed agents all
            // connect from loopback, one session each, so a host running more than about a
            // thousand raises it.
            per_address_max: 1_024,
            first_byte_timeout: Duration::from_secs(10),
            request_head_timeout: Duration::from_secs(10),
            keep_alive_idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// Who may open a connection: a slot of `max`, and one of its address's `per_address_max`.
#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limits: ConnectionLimits,
}

/// Why a connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `connections_max` are open.
    Full,
    /// `connections_per_address_max` are open from its address.
    AddressFull,
}

impl Admission {
    pub fn new(limits: ConnectionLimits) -> Admission {
        Admission { slots: Arc::new(Semaphore::new(limits.max.max(1))), per_address: Arc::default(), limits }
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Wraps an accepted connection from `peer`, taking its slots, or refuses it.
    pub fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Result<Limited, Refused> {
        let address = AddressSlot::take(&self.per_address, peer.ip(), self.limits.per_address_max.max(1))
            .ok_or(Refused::AddressFull)?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| Refused::Full)?;
        let _ = stream.set_nodelay(true);
        let deadline = Some(Box::pin(tokio::time::sleep(self.limits.first_byte_timeout)));
        Ok(Limited { stream, _permit: permit, _address: address, deadline })
    }

    /// Open connections from `ip` (for tests).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let counts = self.per_address.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

/// One of an address's slots, given back on drop.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d: one address.
        let ip = ip.to_canonical();
        let mut open = counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { counts: counts.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            // Forgotten at zero, so a scan of many addresses leaves no table behind.
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A plain TCP listener with the limits applied.
pub struct LimitedListener {
    listener: TcpListener,
    admission: Admission,
    refused: u64,
}

impl LimitedListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> LimitedListener {
        LimitedListener { listener, admission: Admission::new(limits), refused: 0 }
    }
}

/// Logs a refused connection, once per thousand, so a flood of connections is not also a
/// flood of logs.
pub(crate) fn log_refused(refused: &mut u64, peer: SocketAddr, why: Refused, limits: &ConnectionLimits) {
    *refused += 1;
    if *refused % 1000 != 1 {
        return;
    }
    match why {
        Refused::Full => {
            tracing::warn!(%peer, max = limits.max, refused = *refused, "too many open connections; closing new ones")
        }
        Refused::AddressFull => tracing::warn!(
            %peer,
            per_address_max = limits.per_address_max,
            refused = *refused,
            "too many open connections from one address; closing its new ones"
        ),
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Conn<Limited>;
    type Addr = SocketAddr;

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
            match self.admission.admit(stream, peer) {
                Ok(limited) => return (Conn::new(limited, self.admission.limits()), peer),
                Err(why) => log_refused(&mut self.refused, peer, why, self.admission.limits()),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A TCP connection that holds its slots while open and must say something in time.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    _address: AddressSlot,
    /// Until the first byte arrives.
    deadline: Option<Pin<Box<Sleep>>>,
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

/// Where a connection is between requests, as its reads see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a head (`first_byte_timeout` on a new connection,
    /// `keep_alive_idle_timeout` after a response).
    Idle,
    /// A head has begun and is not parsed yet (`request_head_timeout` from its first byte).
    Head,
    /// A request is in flight, or the connection was upgraded: no deadline here.
    Busy,
}

/// What the router tells a connection about its requests (see [`track_requests`]).
#[derive(Default)]
pub struct Activity {
    /// Requests begun and ended on the connection.
    begun: AtomicU64,
    ended: AtomicU64,
    /// Answered `101 Switching Protocols`: a WebSocket session, long-lived by design.
    upgraded: AtomicBool,
    /// The connection's reader, woken when a request ends so it arms the idle deadline.
    reader: AtomicWaker,
}

impl Activity {
    fn in_flight(&self) -> bool {
        self.begun.load(Ordering::Acquire) != self.ended.load(Ordering::Acquire)
    }
}

/// A handle on a connection's [`Activity`], which axum puts in every request's extensions
/// (`ConnectInfo<ConnActivity>`), so the router's middleware can mark request boundaries.
#[derive(Clone, Default)]
pub struct ConnActivity(pub Arc<Activity>);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LimitedListener>> for ConnActivity {
    fn connect_info(stream: axum::serve::IncomingStream<'_, LimitedListener>) -> Self {
        stream.io().activity()
    }
}

/// The router's outermost middleware: marks a request begun on its connection, and ended
/// once its answer's body is written (a stream's, when the stream ends); an answer of
/// `101 Switching Protocols` marks the connection upgraded.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let Some(ConnectInfo(ConnActivity(activity))) = request.extensions().get::<ConnectInfo<ConnActivity>>().cloned()
    else {
        return next.run(request).await;
    };
    activity.begun.fetch_add(1, Ordering::AcqRel);
    let guard = RequestGuard(activity);
    let response = next.run(request).await;
    if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
        guard.0.upgraded.store(true, Ordering::Release);
    }
    response.map(|body| Body::new(Tracked { body, _guard: guard }))
}

/// Ends its request when dropped.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        self.0.reader.wake();
    }
}

/// An answer's body, with the guard that ends its request once hyper is done with it.
struct Tracked {
    body: Body,
    _guard: RequestGuard,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What HTTP reads and writes: a connection with the deadlines between requests, and
/// hyper's own answers to heads it cannot parse given hale's JSON error body.
pub struct Conn<S> {
    stream: S,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    phase: Phase,
    /// The `ended` count last seen, to notice a request that began and ended between reads.
    ended_seen: u64,
    deadline: Pin<Box<Sleep>>,
    /// hale's answer in place of hyper's bare one, while it is being written.
    rewritten: Option<Rewrite>,
}

struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// The length of hyper's answer, reported written once ours is.
    replaces: usize,
}

impl<S> Conn<S> {
    pub fn new(stream: S, limits: &ConnectionLimits) -> Conn<S> {
        Conn {
            stream,
            activity: Arc::default(),
            limits: *limits,
            phase: Phase::Idle,
            ended_seen: 0,
            deadline: Box::pin(tokio::time::sleep(limits.first_byte_timeout)),
            rewritten: None,
        }
    }

    /// The connection's activity, shared with the requests it carries.
    pub fn activity(&self) -> ConnActivity {
        ConnActivity(self.activity.clone())
    }

    /// Moves the phase on from what the requests say; returns whether a deadline applies.
    fn update_phase(&mut self, cx: &Context<'_>) -> bool {
        let activity = &self.activity;
        if activity.upgraded.load(Ordering::Acquire) {
            self.phase = Phase::Busy;
            return false;
        }
        if activity.in_flight() {
            // Woken when it ends, to arm the idle deadline even if nothing else reads.
            activity.reader.register(cx.waker());
            // A request may end between the two loads: then go on as idle.
            if activity.in_flight() {
                self.phase = Phase::Busy;
                return false;
            }
        }
        let ended = activity.ended.load(Ordering::Acquire);
        if self.phase == Phase::Busy || ended != self.ended_seen {
            self.ended_seen = ended;
            self.phase = Phase::Idle;
            self.deadline.as_mut().reset(Instant::now() + self.limits.keep_alive_idle_timeout);
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let timed = self.update_phase(cx);
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if !timed {
            return read;
        }
        if let Poll::Ready(Ok(())) = &read
            && buf.filled().len() > before
            && self.phase == Phase::Idle
        {
            self.phase = Phase::Head;
            let deadline = Instant::now() + self.limits.request_head_timeout;
            self.deadline.as_mut().reset(deadline);
        }
        if read.is_pending() && self.deadline.as_mut().poll(cx).is_ready() {
            let what = match self.phase {
                Phase::Head => "the request head was not complete within request_head_timeout_ms",
                _ => "no request began within the idle timeout",
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.rewritten.is_none()
            && !self.activity.in_flight()
            && !self.activity.upgraded.load(Ordering::Acquire)
            && let Some(bytes) = json_answer_for_bare_error(data)
        {
            self.rewritten = Some(Rewrite { bytes, written: 0, replaces: data.len() });
        }
        let this = &mut *self;
        let Some(rewrite) = this.rewritten.as_mut() else {
            return Pin::new(&mut this.stream).poll_write(cx, data);
        };
        while rewrite.written < rewrite.bytes.len() {
            let n = std::task::ready!(Pin::new(&mut this.stream).poll_write(cx, &rewrite.bytes[rewrite.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rewrite.written += n;
        }
        // The connection closes after such an answer; nothing more goes out on it.
        let replaces = rewrite.replaces;
        Poll::Ready(Ok(replaces))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// hyper answers a head it cannot parse on its own, before any request reaches hale:
/// `400` (a malformed request line or header), `414` (a URI too long) or `431` (headers
/// too large or too many), each with an empty body. Every answer of hale's router carries
/// a JSON body with a content type, so an answer with neither, written while no request is
/// in flight, is hyper's: the same answer with the documented body (docs/errors.md).
fn json_answer_for_bare_error(data: &[u8]) -> Option<Vec<u8>> {
    let status = data.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    let head_end = data.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    if head.contains("\r\ncontent-type:") || !head.contains("\r\ncontent-length: 0") {
        return None;
    }
    let (code, message) = match status {
        b"431" => (
            crate::api::ServerCode::HeadersTooLarge,
            "the request's headers are too large or too many; send fewer or shorter headers",
        ),
        b"414" => (crate::api::ServerCode::BadRequest, "the request's URI is too long"),
        b"400" => (
            crate::api::ServerCode::BadRequest,
            "malformed HTTP request head (request line or a header); send HTTP/1.1",
        ),
        _ => return None,
    };
    let reason = match status {
        b"431" => "Request Header Fields Too Large",
        b"414" => "URI Too Long",
        _ => "Bad Request",
    };
    let body = serde_json::to_vec(&hale_proto::HttpError { error: code.body(message, false) }).ok()?;
    let mut answer = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        String::from_utf8_lossy(status),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    Some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bare_431_gets_the_json_error_body() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_answer_for_bare_error(bare).unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "headers_too_large");
    }

    #[test]
    fn answers_of_the_router_are_left_alone() {
        let json =
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":1234}";
        assert_eq!(json_answer_for_bare_error(json), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(json_answer_for_bare_error(ok), None);
        let partial = b"HTTP/1.1 431 Request Header";
        assert_eq!(json_answer_for_bare_error(partial), None);
    }

    #[tokio::test]
    async fn an_address_past_its_limit_is_refused_and_admitted_again_once_one_closes() {
        let limits = ConnectionLimits { per_address_max: 2, ..ConnectionLimits::default() };
        let admission = Admission::new(limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut admitted = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, peer) = listener.accept().await.unwrap();
            admitted.push(admission.admit(stream, peer));
        }
        assert!(admitted[0].is_ok() && admitted[1].is_ok());
        assert_eq!(admitted[2].as_ref().err(), Some(&Refused::AddressFull));
        assert_eq!(admission.open_from("127.0.0.1".parse().unwrap()), 2);
        drop(admitted.remove(0));
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (stream, peer) = listener.accept().await.unwrap();
        assert!(admission.admit(stream, peer).is_ok());
        drop(admitted);
        // The last admitted one was dropped at once: nothing is left counted.
        assert_eq!(admission.open_from("127.0.0.1".parse().unwrap()), 0);
    }
}
