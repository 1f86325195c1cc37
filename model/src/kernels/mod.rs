//! CPU kernels for the model's hot loops.
//!
//! Two properties shape everything here:
//!
//! * **Batch invariance.** Each output element is computed by the same code,
//!   in the same order, whatever the number of rows in the pass or which other
//!   sequences share it. That makes "lossless" exactly testable: a sequence's
//!   logits are bit-identical alone, beside others, one token at a time or
//!   k+1 at once.
//! * **SIMD and scalar agree bit for bit.** Integer block dot products are
//!   exact; floats are accumulated in eight lanes in a fixed order that the
//!   scalar path emulates, with separate multiply and add (never a fused
//!   multiply-add, which rounds differently).
//!
//! A batched matmul reads each weight row once per pass and applies it to all
//! activation rows while it sits in L1, so verification batches pay.

mod dot;
mod matmul;
mod ops;

pub use dot::{dot_f32, simd_level, BlockKind, SimdLevel};
pub use matmul::{matmul_parts, quantize_activations, QActivations, QMatrix, QStorage, WeightType};
pub use ops::{rms_norm, MatmulKernels, QLinear};
