//! Instruction-set detection, the f32 dot product and attention's two f32
//! kernels (scores against many keys, weighted sum of values):
//! runtime-dispatched AVX2 on x86-64, NEON on aarch64 (edge devices:
//! phones, Apple silicon), and scalar twins that give identical bits. Lane
//! `l` of the eight-lane f32 accumulator holds the products of elements `i`
//! with `i % 8 == l`.

use std::sync::OnceLock;

/// Which instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX2 with FMA and AVX-VNNI (`vpdpbusd` on 256-bit registers: four
    /// u8×i8 products summed into an i32 lane in one instruction).
    Avx2Vnni,
    /// AVX-512 (F, BW) with VNNI: the same on 512-bit registers, sixteen
    /// weight rows at once.
    Avx512Vnni,
    /// aarch64's baseline Advanced SIMD (every aarch64 CPU has it).
    Neon,
}

/// Detected once; `TANDEM_SIMD=scalar|avx2|avxvnni` forces a narrower path
/// (to compare paths; all give the same bits).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let levels = available_levels();
        let forced = std::env::var("TANDEM_SIMD").ok().and_then(|v| match v.as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "avx2" => Some(SimdLevel::Avx2),
            "avxvnni" => Some(SimdLevel::Avx2Vnni),
            _ => None,
        });
        match forced {
            Some(level) if level == SimdLevel::Scalar || levels.contains(&level) => level,
            _ => levels.last().copied().unwrap_or(SimdLevel::Scalar),
        }
    })
}

/// The SIMD paths this machine can run, narrowest first.
pub(crate) fn available_levels() -> Vec<SimdLevel> {
    #[allow(unused_mut)]
    let mut levels = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        levels.push(SimdLevel::Avx2);
        if is_x86_feature_detected!("avxvnni") {
            levels.push(SimdLevel::Avx2Vnni);
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni") {
            levels.push(SimdLevel::Avx512Vnni);
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        levels.push(SimdLevel::Neon);
    }
    levels
}

/// Fixed reduction tree over eight lanes, shared by every path.
#[inline(always)]
pub(crate) fn reduce8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Dot product of two f32 slices of equal length with the eight-lane order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        // SAFETY: AVX2 support was detected at runtime (simd_level).
        return unsafe { avx2::dot_f32(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd_level() == SimdLevel::Neon {
        // SAFETY: NEON support was detected at runtime (simd_level).
        return unsafe { neon::dot_f32(a, b) };
    }
    dot_f32_scalar(a, b)
}

/// `out[j] = dot_f32(q, keys[j · stride + offset..][..q.len()])`, bit for
/// bit: one query against consecutive keys (attention scores).
pub(crate) fn dot_f32_keys(q: &[f32], keys: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    assert!(out.is_empty() || (out.len() - 1) * stride + offset + q.len() <= keys.len());
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        // SAFETY: AVX2 support was detected at runtime (simd_level); the
        // keys' extent was checked above.
        return unsafe { avx2::dot_f32_keys(q, keys, stride, offset, out) };
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_f32(q, &keys[j * stride + offset..j * stride + offset + q.len()]);
    }
}

/// `out[d] = Σ_j p[j] · values[j · stride + offset + d]`, summed in j order
/// with a separate multiply and add (element-wise, so any vector width
/// gives the same bits): attention's weighted sum of values.
pub(crate) fn weighted_sum(p: &[f32], values: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    assert!(p.is_empty() || (p.len() - 1) * stride + offset + out.len() <= values.len());
    #[cfg(target_arch = "x86_64")]
    if simd_level() != SimdLevel::Scalar {
        // SAFETY: AVX2 support was detected at runtime (simd_level); the
        // values' extent was checked above.
        return unsafe { avx2::weighted_sum(p, values, stride, offset, out) };
    }
    weighted_sum_scalar(p, values, stride, offset, out);
}

fn weighted_sum_scalar(p: &[f32], values: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, &w) in p.iter().enumerate() {
        let v = &values[j * stride + offset..j * stride + offset + out.len()];
        for (o, &v) in out.iter_mut().zip(v) {
            *o += w * v;
        }
    }
}

pub(crate) fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let body = a.len() / 8 * 8;
    for i in (0..body).step_by(8) {
        for l in 0..8 {
            acc[l] += a[i + l] * b[i + l];
        }
    }
    for i in body..a.len() {
        acc[i % 8] += a[i] * b[i];
    }
    reduce8(acc)
}

/// Weight block formats the integer kernels read (blocks of 32 weights).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BlockKind {
    /// 4-bit q, w = d·(q − 8).
    Q4_0,
    /// 4-bit q, w = d·q + m (also Q4_K, converted exactly at load).
    Q4_1,
    /// 8-bit signed q, w = d·q.
    Q8_0,
    /// 8-bit signed q with one scale per 16-element half (Q6_K, converted
    /// exactly at load).
    Q8Half,
}

impl BlockKind {
    /// Bytes of quants per block.
    pub fn quant_bytes(self) -> usize {
        match self {
            BlockKind::Q4_0 | BlockKind::Q4_1 => 16,
            BlockKind::Q8_0 | BlockKind::Q8Half => 32,
        }
    }
    /// Scales per block.
    pub fn scales(self) -> usize {
        if self == BlockKind::Q8Half {
            2
        } else {
            1
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::reduce8;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let body = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 <= body <= len of both slices.
            let x = unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) };
            let y = unsafe { _mm256_loadu_ps(b.as_ptr().add(i)) };
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes has room for eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        for i in body..n {
            lanes[i % 8] += a[i] * b[i];
        }
        reduce8(lanes)
    }

    /// Eight keys at a time: eight accumulators in dot_f32's lane order,
    /// then its reduction tree for all eight at once (the same additions,
    /// lane by lane: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_f32_keys(q: &[f32], keys: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
        let n = q.len();
        let mut j = 0;
        if n.is_multiple_of(8) {
            while j + 8 <= out.len() {
                // SAFETY: the caller checked the keys' extent.
                unsafe {
                    let base = keys.as_ptr().add(j * stride + offset);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..n).step_by(8) {
                        let x = _mm256_loadu_ps(q.as_ptr().add(c));
                        for (p, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, _mm256_loadu_ps(base.add(p * stride + c))));
                        }
                    }
                    // [lanes 0–3 of key a + lanes 4–7 of key a | same for b].
                    let halves = |a, b| _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
                    let (t0, t1, t2, t3) = (halves(acc[0], acc[4]), halves(acc[1], acc[5]), halves(acc[2], acc[6]), halves(acc[3], acc[7]));
                    // (b0 + b2, b1 + b3) of two keys per 128-bit lane.
                    let pairs = |a, b| _mm256_add_ps(_mm256_shuffle_ps(a, b, 0b01_00_01_00), _mm256_shuffle_ps(a, b, 0b11_10_11_10));
                    let (u01, u23) = (pairs(t0, t1), pairs(t2, t3));
                    let sums = _mm256_add_ps(_mm256_shuffle_ps(u01, u23, 0b10_00_10_00), _mm256_shuffle_ps(u01, u23, 0b11_01_11_01));
                    _mm256_storeu_ps(out.as_mut_ptr().add(j), sums);
                }
                j += 8;
            }
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            // SAFETY: AVX2 is enabled here; the key is in bounds (checked).
            *o = unsafe { dot_f32(q, &keys[j * stride + offset..j * stride + offset + n]) };
        }
    }

    /// Sixty-four output elements at a time in eight registers across all
    /// positions (the same multiply and add per element as the scalar twin).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weighted_sum(p: &[f32], values: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
        let n = out.len();
        let full = n / 64 * 64;
        for d0 in (0..full).step_by(64) {
            // SAFETY: the caller checked the values' extent.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (j, &w) in p.iter().enumerate() {
                    let (w, v) = (_mm256_set1_ps(w), values.as_ptr().add(j * stride + offset + d0));
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, _mm256_loadu_ps(v.add(8 * c))));
                    }
                }
                for (c, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * c), *acc);
                }
            }
        }
        super::weighted_sum_scalar(p, values, stride, offset + full, &mut out[full..]);
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::reduce8;
    use std::arch::aarch64::*;

    /// Lanes 0–3 and 4–7 of the eight-lane order, unfused like the scalar twin.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let body = n / 8 * 8;
        let (mut lo, mut hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i < body {
            // SAFETY: i + 8 <= body <= len of both slices.
            unsafe {
                lo = vaddq_f32(lo, vmulq_f32(vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i))));
                hi = vaddq_f32(hi, vmulq_f32(vld1q_f32(a.as_ptr().add(i + 4)), vld1q_f32(b.as_ptr().add(i + 4))));
            }
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes has room for eight f32.
        unsafe {
            vst1q_f32(lanes.as_mut_ptr(), lo);
            vst1q_f32(lanes.as_mut_ptr().add(4), hi);
        }
        for i in body..n {
            lanes[i % 8] += a[i] * b[i];
        }
        reduce8(lanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionRng;

    /// The f32 dot product of this machine's SIMD path and its scalar twin
    /// give identical bits, for lengths with and without a tail.
    #[test]
    fn simd_and_scalar_f32_dots_agree_bit_for_bit() {
        let mut rng = SessionRng::new(17);
        let mut f = |scale: f32| (rng.next_f64() as f32 * 2.0 - 1.0) * scale;
        for len in [1, 7, 8, 64, 77] {
            let a: Vec<f32> = (0..len).map(|_| f(3.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| f(3.0)).collect();
            assert_eq!(dot_f32(&a, &b).to_bits(), dot_f32_scalar(&a, &b).to_bits());
        }
        // Attention's kernels: 19 keys (two blocks of eight and a tail) of
        // 64 and of 12 values, strided as in a cache of two kv heads.
        for hd in [64, 12] {
            let (stride, n) = (2 * hd, 19);
            let q: Vec<f32> = (0..hd).map(|_| f(3.0)).collect();
            let cache: Vec<f32> = (0..n * stride).map(|_| f(3.0)).collect();
            let mut scores = vec![0f32; n];
            dot_f32_keys(&q, &cache, stride, hd, &mut scores);
            for (j, s) in scores.iter().enumerate() {
                assert_eq!(s.to_bits(), dot_f32_scalar(&q, &cache[j * stride + hd..(j + 1) * stride]).to_bits(), "hd {hd} key {j}");
            }
            let mut simd = vec![0f32; hd];
            weighted_sum(&scores, &cache, stride, hd, &mut simd);
            let mut scalar = vec![0f32; hd];
            weighted_sum_scalar(&scores, &cache, stride, hd, &mut scalar);
            assert_eq!(simd.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }
}
