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
    /// No usable GPU, or the GPU backend failed (the message says which).
    #[error("gpu: {0}")]
    Gpu(String),
    /// The model does not fit a device limit of the GPU adapter.
    #[error("gpu: {what} needs {needed} for `{limit}`, the adapter allows {allowed}")]
    GpuLimit { what: String, limit: &'static str, needed: u64, allowed: u64 },
    /// The server could not be reached (after retries).
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
}
