//! Tandem's wire protocol (`tandem.v1`): the gRPC schema, the limits both
//! ends enforce, and the checks that turn a message into something the
//! server may act on. Generated code stays in the private `pb` module; the
//! message types are re-exported from [`wire`].

mod pb {
    tonic::include_proto!("tandem.v1");
}

mod validate;

pub use validate::{validate_open, validate_verify, WireError};

/// The generated message types, services and clients.
pub mod wire {
    pub use crate::pb::edge_message::Kind as EdgeKind;
    pub use crate::pb::server_message::Kind as ServerKind;
    pub use crate::pb::verifier_client::VerifierClient;
    pub use crate::pb::verifier_server::{Verifier, VerifierServer};
    pub use crate::pb::{
        Close, DraftMode, EdgeMessage, Hints, Open, Opened, Sampling, ServerMessage, Slo, SparseDist, Tokens, Verdict,
        Verify,
    };
}

/// Limits enforced on both ends of the wire. A message that breaks one is
/// refused with a message naming the field and the limit.
pub mod limits {
    /// Largest number of draft tokens in one verification round.
    pub const MAX_DRAFT_TOKENS: usize = 16;
    /// Largest prompt, in tokens (resumed tokens included).
    pub const MAX_PROMPT_TOKENS: usize = 4096;
    /// Largest support of one sparse draft distribution; equals the largest
    /// top-k the draft side may use.
    pub const MAX_SPARSE_SUPPORT: usize = 64;
    /// Largest number of tokens one session may generate.
    pub const MAX_NEW_TOKENS: usize = 4096;
    /// Largest encoded message, either direction.
    pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
    /// Tolerance on the total mass of a sparse distribution (f32 rounding).
    pub const MASS_TOLERANCE: f32 = 1e-3;
}
