/// Everything that can go wrong in the model core.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("reading `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("model file: {0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A caller passed something out of range; the message names the argument.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("draft `{draft}` cannot serve this target: {reason}")]
    DraftMismatch { draft: String, reason: String },
    /// A draft running outside this crate (a GPU backend) failed.
    #[error("draft backend: {0}")]
    Backend(String),
    /// Obtaining a model or data file: pip, the Hugging Face Hub, a path.
    #[error("{0}")]
    Fetch(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
