//! Verification-time profiles of GPUs nobody measured here: a roofline
//! from the datasheet's memory bandwidth and FLOP/s and the model's bytes
//! and FLOPs per token. Every such profile is labelled "roofline, not
//! measured" and carries its assumptions in its label.
//!
//! In the estimator's terms (`T = c0 + c1·seqs + c2·tokens +
//! c3·Σ(tokens×context)/1000 + c4·prefill`):
//! - c0: reading every weight once per pass (bytes / bandwidth);
//! - c2: the linear layers' 2·params FLOPs per token (FLOPs / FLOP/s);
//! - c3: each token reading its context's K and V (an upper bound: a
//!   sequence's tokens share one read in a fused kernel) plus the
//!   attention FLOPs;
//! - c1 = c4 = 0.
//!
//! Memory and compute time are added, not maxed (the linear model cannot
//! express a max): the profile overstates a pass by at most 2×, so it is
//! conservative for the policies that batch more.

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

/// The coefficients c0..c4 (ms) of `model` on `gpu`.
pub fn coefficients(gpu: &Gpu, model: &ModelShape) -> [f64; 5] {
    let weights_ms = model.params * model.bytes_per_param / gpu.bandwidth * 1e3;
    let per_token_ms = 2.0 * model.params / gpu.flops * 1e3;
    // K and V of one position, all layers.
    let kv_bytes = 2.0 * (model.layers * model.kv_heads * model.head_dim) as f64 * model.bytes_per_param;
    // QKᵀ and AV: 2 FLOPs per multiply-add, twice, per layer and hidden unit.
    let attention_flops = 4.0 * (model.layers * model.hidden) as f64;
    let per_1000_token_context_ms = 1000.0 * (kv_bytes / gpu.bandwidth + attention_flops / gpu.flops) * 1e3;
    [weights_ms, 0.0, per_token_ms, per_1000_token_context_ms, 0.0]
}

/// The profile, in the calibration file format, with an estimator state
/// warm-started on a sweep of GPU-sized batches (so online refitting in
/// the simulator starts from a settled fit, as on a real server).
pub fn profile(gpu: &Gpu, model: &ModelShape) -> VerifyTimeProfile {
    let c = coefficients(gpu, model);
    let time = |s: BatchShape| c[0] + c[1] * s.seqs as f64 + c[2] * s.tokens as f64 + c[3] * s.token_context as f64 / 1000.0 + c[4] * s.prefill_tokens as f64;
    let mut sweep = Vec::new();
    for seqs in [1usize, 4, 16, 64, 128] {
        for tokens in [1usize, 3, 5, 9] {
            for context in [64usize, 256, 1024] {
                let shape = BatchShape { seqs, tokens: seqs * tokens, token_context: seqs * tokens * (context + tokens), prefill_tokens: 0 };
                sweep.push((shape, time(shape)));
            }
        }
    }
    for prefill in [128usize, 512] {
        let shape = BatchShape { seqs: 1, tokens: prefill, token_context: prefill * prefill, prefill_tokens: prefill };
        sweep.push((shape, time(shape)));
    }
    let mut estimator = VerifyTimeEstimator::new(0.9, 0.995);
    estimator.warm_start(&sweep);
    let mut calibration = estimator.calibration();
    calibration.coefficients = c;
    VerifyTimeProfile {
        label: format!(
            "roofline, not measured: {} running {} (weights {:.1} GB, KV {:.0} KiB/position); c0 {:.2} ms + {:.4} ms/token + {:.4} ms per 1000 token×context",
            gpu.name,
            model.name,
            model.params * model.bytes_per_param / 1e9,
            2.0 * (model.layers * model.kv_heads * model.head_dim) as f64 * model.bytes_per_param / 1024.0,
            c[0],
            c[2],
            c[3]
        ),
        measured: false,
        calibration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_llama3_8b_roofline_is_nearly_flat_in_batch_size() {
        let c = coefficients(&H100_SXM, &LLAMA3_8B_BF16);
        // 16.06 GB of weights at 3.35 TB/s.
        assert!((c[0] - 4.794).abs() < 0.01, "{c:?}");
        // A 256-token pass costs less than twice a 1-token pass.
        assert!(c[0] + 256.0 * c[2] < 2.0 * (c[0] + c[2]), "{c:?}");
        let p = profile(&H100_SXM, &LLAMA3_8B_BF16);
        assert!(!p.measured && p.label.starts_with("roofline, not measured"));
        let e = VerifyTimeEstimator::from_calibration(&p.calibration, 1.0);
        let shape = BatchShape { seqs: 32, tokens: 160, token_context: 160 * 300, prefill_tokens: 0 };
        let direct = c[0] + 160.0 * c[2] + 48.0 * c[3];
        assert!((e.predict(shape) - direct).abs() < 1e-9, "the profile predicts its own roofline");
    }
}
