//! Tandem's wire protocol: limits shared by edge and server.
//!
//! The gRPC schema itself lands with the verification service; the limits
//! live here already because the edge's local loop enforces them too, so
//! that a draft the local loop accepts is one the server will accept.

/// Limits enforced on both ends of the wire. A message that breaks one is
/// refused with a message naming the field and the limit.
pub mod limits {
    /// Largest number of draft tokens in one verification round.
    pub const MAX_DRAFT_TOKENS: usize = 16;
    /// Largest prompt, in tokens.
    pub const MAX_PROMPT_TOKENS: usize = 4096;
    /// Largest support (number of non-zero entries) of one sparse draft
    /// distribution; equals the largest top-k the draft side may use.
    pub const MAX_SPARSE_SUPPORT: usize = 64;
    /// Largest number of tokens one session may generate.
    pub const MAX_NEW_TOKENS: usize = 4096;
}
