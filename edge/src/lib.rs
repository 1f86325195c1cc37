//! Tandem's edge side: draft sources drive speculative rounds against a
//! verifier. For now the verifier is the target model in the same process
//! (`generate --local`); the gRPC client plugs in behind the same loop.

mod error;
mod local;

pub use error::EdgeError;
pub use local::{GenerateRequest, Generation, LocalGenerator};
