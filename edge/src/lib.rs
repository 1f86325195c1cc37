//! Tandem's edge side: a draft source proposes tokens, a target verifies
//! them (the model in this process, or a Tandem server over gRPC), and the
//! accepted text streams out.

pub mod client;
pub mod controller;
mod error;
mod generate;
mod target;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use error::EdgeError;
pub use generate::{ControllerSample, GenerateRequest, Generation, Speculator};
pub use target::{LocalTarget, RoundOutcome, Target};
