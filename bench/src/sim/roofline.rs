//! Verification-time profiles of GPUs nobody measured here: a roofline
//! from the datasheet's memory bandwidth and FLOP/s and the model's bytes
//! and FLOPs per token. Every such profile is labelled "roofline, not
//! measured" and names its assumptions in its label.
//!
//! The cost model is `tandem_estimators::Roofline` (memory time against
//! compute time); this module holds the datasheets and model sizes.
//!
//! The calibration file holds the estimator's linear model, so the profile
//! is that model fitted (non-negative least squares, the estimator's own
//! warm start) to the roofline over a sweep of batch shapes up to the
//! sizes the simulator's GPU runs use; the fit's ratios measured/predicted
//! become the profile's residuals. The profile also carries the roofline
//! itself, which the simulator takes as the ground truth of pass times;
//! the fit is only what the scheduler's estimator starts from.

use tandem_estimators::{BatchShape, Roofline, VerifyTimeEstimator, VerifyTimeProfile};

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

/// The roofline of `model` on `gpu`.
pub fn roofline(gpu: &Gpu, model: &ModelShape) -> Roofline {
    Roofline {
        bandwidth: gpu.bandwidth,
        flops: gpu.flops,
        weight_bytes: model.params * model.bytes_per_param,
        kv_bytes_per_position: model.kv_bytes(),
        flops_per_token: 2.0 * model.params,
        flops_per_token_position: 4.0 * (model.layers * model.hidden) as f64,
    }
}

/// One pass of `seqs` sequences, each with `tokens` new tokens after
/// `context` cached positions, plus a `prefill`-token prompt chunk: its
/// shape and its roofline time, ms.
fn pass(roofline: &Roofline, seqs: usize, tokens: usize, context: usize, prefill: usize) -> (BatchShape, f64) {
    let shape = BatchShape {
        seqs: seqs + usize::from(prefill > 0),
        tokens: seqs * tokens + prefill,
        token_context: seqs * tokens * (context + tokens) + prefill * prefill,
        prefill_tokens: prefill,
    };
    let positions = seqs * (context + tokens) + prefill;
    (shape, roofline.pass_ms(shape.tokens, positions, shape.token_context))
}

/// The profile of `model` on `gpu`, in the calibration file format.
pub fn profile(gpu: &Gpu, model: &ModelShape) -> VerifyTimeProfile {
    let truth = roofline(gpu, model);
    let mut sweep = Vec::new();
    for seqs in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        for tokens in [1usize, 2, 3, 5, 9] {
            for context in [128usize, 256, 512, 1024] {
                if seqs * tokens <= 1024 {
                    sweep.push(pass(&truth, seqs, tokens, context, 0));
                }
            }
        }
    }
    for prefill in [64usize, 128, 256, 512] {
        sweep.push(pass(&truth, 0, 0, 0, prefill));
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
        roofline: Some(truth),
        measured_on: None,
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
        let h100 = roofline(&H100_SXM, &LLAMA3_8B_BF16);
        // 16.06 GB of weights at 3.35 TB/s.
        assert!((pass(&h100, 1, 1, 0, 0).1 - 4.794).abs() < 0.01);
        // A 32-sequence round of 5 tokens costs well under twice a single decode step.
        let one = pass(&h100, 1, 1, 256, 0).1;
        let round = pass(&h100, 32, 5, 256, 0).1;
        assert!(round < 2.0 * one, "{round} vs {one}");
        let p = profile(&H100_SXM, &LLAMA3_8B_BF16);
        assert!(!p.measured && p.label.starts_with("roofline, not measured"));
        assert_eq!(p.roofline.as_ref(), Some(&h100), "the profile carries its roofline");
        let e = VerifyTimeEstimator::from_calibration(&p.calibration, 1.0);
        for (seqs, tokens, context) in [(1, 1, 256), (8, 5, 512), (32, 5, 256), (64, 3, 1024)] {
            let (shape, truth) = pass(&h100, seqs, tokens, context, 0);
            assert!((e.predict(shape) / truth - 1.0).abs() < 0.25, "{seqs}×{tokens}@{context}: fit {} vs roofline {truth}", e.predict(shape));
        }
    }
}
