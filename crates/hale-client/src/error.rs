use hale_proto::ErrorBody;

/// What can go wrong talking to hale.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The session ended before the answer arrived; whether the request took effect is
    /// unknown until the agent resumes.
    #[error("the session closed before hale answered: {0}")]
    Closed(String),
    /// hale refused the request; `code` says why (see docs/errors.md).
    #[error("hale refused the request ({}): {}", .0.code, .0.message)]
    Server(ErrorBody),
    /// hale answered with something this client does not understand.
    #[error("unexpected answer from hale: {0}")]
    Protocol(String),
    /// A request was made before `resume`.
    #[error("call resume() before {0}")]
    NotResumed(&'static str),
}

impl ClientError {
    /// The server's error code, if hale refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server(body) => Some(&body.code),
            _ => None,
        }
    }
}
