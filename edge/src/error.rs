/// Errors of the edge client.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    /// A request argument out of range; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    /// The server refused the request (status code and message).
    #[error("server: {0}")]
    Server(tonic::Status),
    /// The server could not be reached (after retries).
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
}
