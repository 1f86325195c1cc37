//! Instruction-set detection and the f32 dot product (f32 weight rows):
//! runtime-dispatched AVX2 on x86-64, NEON on aarch64 (edge devices:
//! phones, Apple silicon), and scalar twins that give identical bits. Lane
//! `l` of the eight-lane f32 accumulator holds the products of elements `i`
//! with `i % 8 == l`.

use std::sync::OnceLock;

/// Which instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 with FMA (and F16C, which every such CPU has).
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
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
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
    }
}
