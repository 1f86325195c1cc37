//! Verification-time profiles of GPUs nobody measured here: a roofline
//! from the datasheet's memory bandwidth and FLOP/s and the model's bytes
//! and FLOPs per token. Every such profile is labelled "roofline, not
//! measured" and names its assumptions in its label.
//!
//! A pass takes the longer of its memory time and its compute time:
//! - memory: every weight once, plus each sequence's K and V once (a fused
//!   attention kernel reads a sequence's cache once for all its new
//!   tokens) at its context length;
//! - compute: 2·params FLOPs per new token, plus the attention's
//!   4·layers·hidden FLOPs per token and context position.
//!
//! The calibration file holds the estimator's linear model, so the profile
//! is that model fitted (non-negative least squares, the estimator's own
//! warm start) to the roofline over a sweep of batch shapes up to the
//! sizes the simulator's GPU runs use; the fit's ratios measured/predicted
//! become the profile's residuals.

use tandem_estimators::{BatchShape, VerifyTimeEstimator, VerifyTimeProfile};

/// A GPU's datasheet figures.
#[derive(Clone, Debug)]
pub struct Gpu {
    pub name: &'static str,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dense FLOP/s at the model's precision.
    pub flops: f64,
}

/// NVIDIA H100 SXM5: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (datasheet).
pub const H100_SXM: Gpu = Gpu { name: "NVIDIA H100 SXM (3.35 TB/s, 989 TFLOP/s dense bf16, datasheet)", bandwidth: 3.35e12, flops: 989e12 };

/// NVIDIA A100 SXM 80GB: 2.039 TB/s HBM2e, 312 TFLOP/s dense BF16 (datasheet).
pub const A100_SXM_80GB: Gpu = Gpu { name: "NVIDIA A100 SXM 80GB (2.039 TB/s, 312 TFLOP/s dense bf16, datasheet)", bandwidth: 2.039e12, flops: 312e12 };

/// A transformer's size, as the roofline needs it.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub name: &'static str,
    pub params: f64,
    pub bytes_per_param: f64,
    pub layers: usize,
    pub hidden: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Llama-3-8B in bf16: 8.03 B parameters, 32 layers, hidden 4096, 8 KV
/// heads of 128 (model card / config.json).
pub const LLAMA3_8B_BF16: ModelShape =
    ModelShape { name: "Llama-3-8B bf16", params: 8.03e9, bytes_per_param: 2.0, layers: 32, hidden: 4096, kv_heads: 8, head_dim: 128 };

/// Qwen3-32B in bf16 (the WISP paper's target): 32.8 B parameters, 64
/// layers, hidden 5120, 8 KV heads of 128 (model card / config.json).
pub const QWEN3_32B_BF16: ModelShape =
    ModelShape { name: "Qwen3-32B bf16", params: 32.8e9, bytes_per_param: 2.0, layers: 64, hidden: 5120, kv_heads: 8, head_dim: 128 };

impl ModelShape {
    /// K and V of one position, all layers, bytes.
    fn kv_bytes(&self) -> f64 {
        2.0 * (self.layers * self.kv_heads * self.head_dim) as f64 * self.bytes_per_param
    }
}

/// One pass of `seqs` sequences, each with `tokens` new tokens after
/// `context` cached positions, plus a `prefill`-token prompt chunk, ms.
pub fn pass_ms(gpu: &Gpu, model: &ModelShape, seqs: usize, tokens: usize, context: usize, prefill: usize) -> f64 {
    let new_tokens = (seqs * tokens + prefill) as f64;
    let cached = (seqs * (context + tokens) + prefill) as f64;
    let memory = (model.params * model.bytes_per_param + cached * model.kv_bytes()) / gpu.bandwidth;
    let token_context = (seqs * tokens * (context + tokens) + prefill * prefill) as f64;
    let compute = (2.0 * model.params * new_tokens + 4.0 * (model.layers * model.hidden) as f64 * token_context) / gpu.flops;
    memory.max(compute) * 1e3
}

/// The profile of `model` on `gpu`, in the calibration file format.
pub fn profile(gpu: &Gpu, model: &ModelShape) -> VerifyTimeProfile {
    let mut sweep = Vec::new();
    for seqs in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        for tokens in [1usize, 2, 3, 5, 9] {
            for context in [128usize, 256, 512, 1024] {
                if seqs * tokens <= 1024 {
                    let shape = BatchShape { seqs, tokens: seqs * tokens, token_context: seqs * tokens * (context + tokens), prefill_tokens: 0 };
                    sweep.push((shape, pass_ms(gpu, model, seqs, tokens, context, 0)));
                }
            }
        }
    }
    for prefill in [64usize, 128, 256, 512] {
        let shape = BatchShape { seqs: 1, tokens: prefill, token_context: prefill * prefill, prefill_tokens: prefill };
        sweep.push((shape, pass_ms(gpu, model, 0, 0, 0, prefill)));
    }
    let mut estimator = VerifyTimeEstimator::new(0.9, 1.0);
    estimator.warm_start(&sweep);
    let c = estimator.coefficients();
    VerifyTimeProfile {
        label: format!(
            "roofline, not measured: {} running {} (weights {:.1} GB, K/V {:.0} KiB per position); max(memory, compute) time fitted linearly: {:.2} ms + {:.4} ms/sequence + {:.4} ms/token + {:.4} ms per 1000 token×context",
            gpu.name,
            model.name,
            model.params * model.bytes_per_param / 1e9,
            model.kv_bytes() / 1024.0,
            c[0],
            c[1],
            c[2],
            c[3]
        ),
        measured: false,
        calibration: estimator.calibration(),
        idle_penalty: Default::default(),
    }
}

/// A named roofline profile (`roofline:NAME`).
pub fn named(name: &str) -> Option<VerifyTimeProfile> {
    match name {
        "h100-llama3-8b" => Some(profile(&H100_SXM, &LLAMA3_8B_BF16)),
        "a100-qwen3-32b" => Some(profile(&A100_SXM_80GB, &QWEN3_32B_BF16)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_llama3_8b_roofline_is_nearly_flat_in_batch_size_and_the_fit_follows_it() {
        // 16.06 GB of weights at 3.35 TB/s.
        assert!((pass_ms(&H100_SXM, &LLAMA3_8B_BF16, 1, 1, 0, 0) - 4.794).abs() < 0.01);
        // A 32-sequence round of 5 tokens costs well under twice a single decode step.
        let one = pass_ms(&H100_SXM, &LLAMA3_8B_BF16, 1, 1, 256, 0);
        let round = pass_ms(&H100_SXM, &LLAMA3_8B_BF16, 32, 5, 256, 0);
        assert!(round < 2.0 * one, "{round} vs {one}");
        let p = profile(&H100_SXM, &LLAMA3_8B_BF16);
        assert!(!p.measured && p.label.starts_with("roofline, not measured"));
        let e = VerifyTimeEstimator::from_calibration(&p.calibration, 1.0);
        for (seqs, tokens, context) in [(1, 1, 256), (8, 5, 512), (32, 5, 256), (64, 3, 1024)] {
            let shape = BatchShape { seqs, tokens: seqs * tokens, token_context: seqs * tokens * (context + tokens), prefill_tokens: 0 };
            let truth = pass_ms(&H100_SXM, &LLAMA3_8B_BF16, seqs, tokens, context, 0);
            assert!((e.predict(shape) / truth - 1.0).abs() < 0.25, "{seqs}×{tokens}@{context}: fit {} vs roofline {truth}", e.predict(shape));
        }
    }
}
