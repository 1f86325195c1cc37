use tonic::{Code, Status};

/// Why the server refused or ended a session.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The message broke a limit or a rule; it names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the session's state (stale `base_len`,
    /// second `Open` on a stream, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// KV memory budget or a tenant's session cap.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Shutting down: resume elsewhere.
    #[error("{0}")]
    Unavailable(String),
    #[error("idle session: {0}")]
    Idle(String),
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
}

impl From<tandem_protocol::WireError> for ServeError {
    fn from(e: tandem_protocol::WireError) -> Self {
        match e.code {
            Code::FailedPrecondition => ServeError::FailedPrecondition(e.message),
            _ => ServeError::InvalidArgument(e.message),
        }
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        let code = match &e {
            ServeError::InvalidArgument(_) => Code::InvalidArgument,
            ServeError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServeError::NotFound(_) => Code::NotFound,
            ServeError::Unauthenticated(_) => Code::Unauthenticated,
            ServeError::ResourceExhausted(_) => Code::ResourceExhausted,
            ServeError::Unavailable(_) => Code::Unavailable,
            ServeError::Idle(_) => Code::DeadlineExceeded,
            ServeError::Model(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
