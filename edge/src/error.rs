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

/// A message for the person at the keyboard: the error, and for the usual
/// causes what to do about it.
pub fn explain(e: &EdgeError) -> String {
    use tonic::Code;
    match e {
        EdgeError::Server(s) => {
            let hint = match s.code() {
                Code::Unauthenticated => " — the server wants an API key: pass `--api-key`, set TANDEM_API_KEY, or `api_key` in the config file",
                Code::PermissionDenied => " — the server refused this API key",
                Code::ResourceExhausted => " — the server is at capacity; try again shortly",
                Code::Unavailable => " — the server is unreachable or shutting down",
                _ => "",
            };
            format!("server said {:?}: {}{hint}", s.code(), s.message())
        }
        EdgeError::Connect { url, reason } => {
            format!("cannot reach the server at {url} ({reason}) — is it running? (`--server`, TANDEM_SERVER or `server` in the config file)")
        }
        other => other.to_string(),
    }
}
