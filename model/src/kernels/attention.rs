//! Attention of one token for the query heads that share a kv head, and
//! the exponential it and the SwiGLU activation use.
//!
//! The scores and the weighted sum of values have SIMD kernels with scalar
//! twins (`dot_f32_keys`, `weighted_sum`); every other step is element-wise
//! or a left-to-right fold, which IEEE arithmetic evaluates identically at
//! any vector width; so the body is compiled twice, for AVX2 and for the
//! baseline, and both give the same bits.

use super::dot::{dot_f32_keys, weighted_sum};
#[cfg(target_arch = "x86_64")]
use super::dot::{simd_level, SimdLevel};

/// Where one kv head's keys and values sit in a sequence's cache: position
/// `j`'s vector is `keys[j · stride + offset..][..head_dim]`.
pub struct KvView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub head_dim: usize,
    pub stride: usize,
    pub offset: usize,
    /// Positions the token sees (its own included).
    pub visible: usize,
}

/// `out[i]` = softmax(scale · q_i · K) · V for each query head `i` in
/// `queries` (`head_dim` values each, side by side); `out` has the same
/// shape and is overwritten.
pub fn attend(queries: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
    assert!(out.len() == queries.len() && queries.len().is_multiple_of(kv.head_dim));
    assert!(kv.visible == 0 || (kv.offset + kv.head_dim <= kv.stride && kv.keys.len().min(kv.values.len()) >= kv.visible * kv.stride));
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        // SAFETY: AVX2 support was detected at runtime (simd_level).
        return unsafe { attend_avx2(queries, kv, scale, out) };
    }
    attend_body(queries, kv, scale, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(queries: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
    attend_body(queries, kv, scale, out)
}

#[inline(always)]
fn attend_body(queries: &[f32], kv: &KvView, scale: f32, out: &mut [f32]) {
    let (hd, n) = (kv.head_dim, kv.visible);
    let mut p = vec![0f32; n];
    for (q, out) in queries.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        dot_f32_keys(q, kv.keys, kv.stride, kv.offset, &mut p);
        let mut max = f32::NEG_INFINITY;
        for s in p.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        for s in p.iter_mut() {
            *s = exp(*s - max);
        }
        let sum = p.iter().fold(0f32, |a, &s| a + s);
        for s in p.iter_mut() {
            *s /= sum;
        }
        weighted_sum(&p, kv.values, kv.stride, kv.offset, out);
    }
}

/// `silu(gate) · up` element-wise, appended to `out`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        // SAFETY: AVX2 support was detected at runtime (simd_level).
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    silu_mul_body(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut Vec<f32>) {
    silu_mul_body(gate, up, out)
}

#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut Vec<f32>) {
    out.extend(gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + exp(-g)) * u));
}

const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x in plain f32 arithmetic (no libm call, so it vectorizes and gives
/// the same bits on every target): x = n·ln 2 + r with |r| ≤ ln 2 / 2, a
/// degree-6 Taylor polynomial for e^r (error below 2e-7 relative), scaled
/// by 2^n through the exponent bits. Clamped to [−87, 88]: e^−87 ≈ 1.6e-38
/// stands for 0 in a softmax, e^88 for overflow in SiLU's 1 + e^−g.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick; n in the mantissa's low bits.
    let shifted = x * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    p * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_and_silu_range() {
        let mut worst = 0f64;
        for i in 0..=20_000 {
            let x = -87.0 + 175.0 * i as f32 / 20_000.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite());
    }

    /// The AVX2 build of the body and the baseline build agree bit for bit,
    /// and match a direct f64 softmax to float rounding.
    #[test]
    fn attention_paths_agree_and_match_a_reference() {
        let mut rng = crate::SessionRng::new(9);
        let mut f = || rng.next_f64() as f32 * 2.0 - 1.0;
        let (hd, group, kv_heads, n) = (16, 3, 2, 37);
        let stride = hd * kv_heads;
        let keys: Vec<f32> = (0..n * stride).map(|_| 3.0 * f()).collect();
        let values: Vec<f32> = (0..n * stride).map(|_| f()).collect();
        let queries: Vec<f32> = (0..group * hd).map(|_| f()).collect();
        let kv = KvView { keys: &keys, values: &values, head_dim: hd, stride, offset: hd, visible: n };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut got = vec![0f32; group * hd];
        attend(&queries, &kv, 0.25, &mut got);
        let mut plain = vec![1f32; group * hd];
        attend_body(&queries, &kv, 0.25, &mut plain);
        assert_eq!(bits(&got), bits(&plain));
        for i in 0..group {
            let q = &queries[i * hd..(i + 1) * hd];
            let s: Vec<f64> = (0..n).map(|j| 0.25 * (0..hd).map(|d| q[d] as f64 * keys[j * stride + hd + d] as f64).sum::<f64>()).collect();
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
            for d in 0..hd {
                let want: f64 = (0..n).map(|j| (s[j] - max).exp() / z * values[j * stride + hd + d] as f64).sum();
                assert!((got[i * hd + d] as f64 - want).abs() < 1e-5, "head {i} dim {d}: {} vs {want}", got[i * hd + d]);
            }
        }
    }
}
