/// Errors of the edge client.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
    /// A request argument out of range; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
}
