//! systemd's notify protocol (`sd_notify(3)`): readiness, status lines, the stop, and
//! watchdog pings, each one datagram of `KEY=VALUE` lines sent to the unix socket named by
//! `NOTIFY_SOCKET` (a path, or an abstract address written with a leading `@`).
//!
//! Written here rather than taken from a crate: the protocol is one `sendto` that std's
//! `UnixDatagram` does, abstract addresses included, and the crates that offer it unset
//! `NOTIFY_SOCKET` with `std::env::remove_var`, which is unsound in a process that has
//! threads (and `unsafe` in edition 2024). hale instead keeps the variables
//! ([`SYSTEMD_VARIABLES`]) out of every process it starts: agents and hook commands.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use crate::engine::Engine;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Variables systemd gives hale alone: its notify socket, watchdog settings and
/// credentials. A child that inherited them could report hale ready or alive, or find
/// hale's credentials; they are removed from the environment of every process hale starts.
pub const SYSTEMD_VARIABLES: [&str; 4] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY"];

/// A send that would wait longer than this (systemd not reading its socket) gives up.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where to tell systemd about hale.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for messages.
    name: String,
}

/// `NOTIFY_SOCKET` could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use NOTIFY_SOCKET={name:?} to notify systemd: {source}")]
pub struct NotifyError {
    name: String,
    source: io::Error,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names; `Ok(None)` when it is unset or empty (hale is
    /// not run by systemd's `Type=notify`).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(name) if !name.is_empty() => Notifier::new(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `name`: a filesystem path, or `@NAME` for the abstract
    /// address `NAME` (as systemd writes it).
    pub fn new(name: &str) -> Result<Notifier, NotifyError> {
        let fail = |source| NotifyError { name: name.to_string(), source };
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes()).map_err(fail)?
            }
            None if name.starts_with('/') => SocketAddr::from_pathname(name).map_err(fail)?,
            None => {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "expected an absolute path or @ABSTRACT-NAME",
                )));
            }
        };
        let socket = UnixDatagram::unbound().map_err(fail)?;
        socket.set_write_timeout(Some(SEND_TIMEOUT)).map_err(fail)?;
        Ok(Notifier { socket, address, name: name.to_string() })
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.address).map(|_| ())
    }

    /// Sends `state`; a failure is logged, not returned: systemd not listening must not
    /// stop hale (without `READY=1` systemd's start timeout says what went wrong).
    pub fn notify(&self, state: &str) {
        if let Err(error) = self.send(state) {
            tracing::warn!(socket = %self.name, %error, state, "could not notify systemd");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A status line (`systemctl status` shows the last).
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// A status is one line of the datagram: a newline would start another assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`), when it is set
/// and meant for this process (`WATCHDOG_PID` unset or hale's pid).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok().filter(|usec| *usec > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if !pid.trim().is_empty() && pid.trim() != std::process::id().to_string() => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Pings systemd's watchdog (`WATCHDOG=1`) every half `interval`, each time only after the
/// engine answered a read within that half: a wedged engine stops the pings, and systemd
/// restarts hale once `interval` passes without one. Runs until aborted.
pub async fn watchdog(notifier: Arc<Notifier>, engine: Engine, interval: Duration) {
    let half = (interval / 2).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(half);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match tokio::time::timeout(half, engine.read(|_| ())).await {
            Ok(Ok(())) => notifier.notify("WATCHDOG=1"),
            // Stopping: the pings end with the engine.
            Ok(Err(crate::engine::EngineError::ShuttingDown)) => return,
            Ok(Err(error)) => tracing::warn!(%error, "the engine did not answer: no watchdog ping"),
            Err(_) => tracing::warn!(
                waited_ms = half.as_millis() as u64,
                "the engine did not answer in time: no watchdog ping (systemd restarts hale if this goes on)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).expect("a datagram within 10 s");
        String::from_utf8(buffer[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_socket_bound_at_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
        notifier.ready("serving on 127.0.0.1:7700\nwith 2 agents");
        assert_eq!(receive(&receiver), "READY=1\nSTATUS=serving on 127.0.0.1:7700 with 2 agents");
        notifier.status("replaying the log");
        assert_eq!(receive(&receiver), "STATUS=replaying the log");
        notifier.stopping("stopping");
        assert_eq!(receive(&receiver), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn notifications_reach_an_abstract_socket_named_with_an_at_sign() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hale-notify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let notifier = Notifier::new(&format!("@{name}")).unwrap();
        notifier.send("WATCHDOG=1").unwrap();
        assert_eq!(receive(&receiver), "WATCHDOG=1");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_to_send_and_a_relative_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::new(dir.path().join("nobody").to_str().unwrap()).unwrap();
        assert!(notifier.send("READY=1").is_err());
        let error = Notifier::new("relative/notify").unwrap_err().to_string();
        assert!(error.contains("NOTIFY_SOCKET=\"relative/notify\"") && error.contains("absolute path"), "{error}");
    }
}
