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
        Close, DraftMode, EdgeMessage, Handoff, Hints, Open, Opened, PromptLogprobs, Sampling, ServerMessage, Slo, SparseDist, TokenLogprob, Tokens,
        TopLogprob, Verdict, Verify,
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
    /// Largest `opened.features`: the latest prompt positions' states that fit.
    pub const MAX_FEATURE_BYTES: usize = 512 << 10;
    /// Most alternatives listed with a token's log-probability (OpenAI's
    /// and vLLM's limit).
    pub const MAX_TOP_LOGPROBS: usize = 20;
    /// Most tokens one `logit_bias` may list.
    pub const MAX_LOGIT_BIAS: usize = 1024;
    /// Most tokens `stop_token_ids` may list.
    pub const MAX_STOP_TOKEN_IDS: usize = 64;
    /// Largest `json_schema`, in bytes of JSON text.
    pub const MAX_JSON_SCHEMA_BYTES: usize = 64 << 10;
    /// Largest `regex`, in bytes.
    pub const MAX_REGEX_BYTES: usize = 16 << 10;
    /// Largest `grammar`, in bytes.
    pub const MAX_GRAMMAR_BYTES: usize = 16 << 10;
    /// Tolerance on the total mass of a sparse distribution (f32 rounding).
    pub const MASS_TOLERANCE: f32 = 1e-3;
}

/// Target hidden states on the wire: IEEE half floats, little-endian.
pub mod features {
    pub fn encode(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()
    }

    /// `values` as they arrive after a trip over the wire.
    pub fn round_trip(values: &[f32]) -> Vec<f32> {
        values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
    }

    /// None when the byte count is odd.
    pub fn decode(bytes: &[u8]) -> Option<Vec<f32>> {
        bytes.len().is_multiple_of(2).then(|| bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
    }
}
