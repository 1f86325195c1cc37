//! Tandem's edge side: a draft source proposes tokens, a target verifies
//! them (the model in this process, or a Tandem server over gRPC), and the
//! accepted text streams out.

mod candle_draft;
pub mod chat;
pub mod client;
pub mod config;
pub mod controller;
mod edge;
mod error;
mod generate;
pub mod openai;
mod target;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use edge::{build_draft, Backend, Edge, EdgeOptions, Verifier};
pub use error::{explain, EdgeError};
pub use generate::{ControllerSample, GenerateRequest, Generation, Speculator};
pub use target::{Decoded, Emitted, LocalTarget, LogprobInbox, LogprobsWanted, RoundOutcome, Target, TargetFeatures};
