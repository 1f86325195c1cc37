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
//!   exact; the float steps after them (one fused multiply-add per block,
//!   see `group`) and the f32 dot's eight lanes (separate multiply and add)
//!   run in a fixed order that the scalar twins spell out.
//!
//! A batched matmul reads each weight group once per pass and applies it to
//! all activation rows while it sits in L1, so verification batches pay.

/// Changes whenever the kernels' arithmetic changes (and with it the bits of
/// any output): caches of model outputs put it in their keys.
pub const NUMERICS: u32 = 3;

mod attention;
mod dot;
mod group;
mod matmul;
mod ops;

pub use attention::{attend, attention_split_rows, silu_mul, KvView, RunRows, Scoring, KEY_BLOCK};
pub use dot::{dot_f32, simd_level, BlockKind, SimdLevel};
pub use matmul::{matmul_parts, matmul_parts_split, quantize_activations, QActivations, QMatrix, QStorage, WeightType};
pub use ops::{residual_add, rms_norm, rope_heads, MatmulKernels, QLinear};
