//! Block dot products: runtime-dispatched AVX2 with a scalar twin that gives
//! identical bits. Lane `l` of an eight-lane accumulator always holds the
//! products of elements `4l..4l+4` of each 32-element block (integer kernels)
//! or elements `i` with `i % 8 == l` (f32 kernel).

use std::sync::OnceLock;

/// Which instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Scalar,
    Avx2,
}

/// Detected once; `TANDEM_SIMD=scalar` forces the portable path (tests use it
/// to check both paths agree).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("TANDEM_SIMD").is_ok_and(|v| v == "scalar") {
            return SimdLevel::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return SimdLevel::Avx2;
        }
        SimdLevel::Scalar
    })
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
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: AVX2 support was detected at runtime above.
        return unsafe { avx2::dot_f32(a, b) };
    }
    dot_f32_scalar(a, b)
}

fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
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

/// One row's worth of 32-element blocks in the layout the kernels read:
/// scales widened to f32 at load, quants packed as in GGUF.
pub(crate) struct BlockRow<'a> {
    pub d: &'a [f32],
    /// Q4_1 minimums; empty for the other types.
    pub m: &'a [f32],
    /// 16 bytes a block for 4-bit types, 32 for Q8_0.
    pub qs: &'a [u8],
}

/// An activation row quantized to 8 bits in blocks of 32.
pub(crate) struct ActRow<'a> {
    pub d: &'a [f32],
    /// Sum of the block's integer quants (for the Q4 offsets and minimums).
    pub isum: &'a [i32],
    pub qs: &'a [i8],
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BlockKind {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// Dot product of one weight row and one activation row.
#[inline]
pub(crate) fn dot_blocks(kind: BlockKind, w: &BlockRow, a: &ActRow) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx2 {
        // SAFETY: AVX2 support was detected at runtime above.
        return unsafe { avx2::dot_blocks(kind, w, a) };
    }
    dot_blocks_scalar(kind, w, a)
}

fn dot_blocks_scalar(kind: BlockKind, w: &BlockRow, a: &ActRow) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_min = 0f32;
    for b in 0..a.d.len() {
        let aq = &a.qs[b * 32..b * 32 + 32];
        let mut lanes = [0i32; 8];
        match kind {
            BlockKind::Q8_0 => {
                let wq = &w.qs[b * 32..b * 32 + 32];
                for (j, (&x, &y)) in wq.iter().zip(aq).enumerate() {
                    lanes[j / 4] += (x as i8 as i32) * y as i32;
                }
            }
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let offset = if kind == BlockKind::Q4_0 { 8 } else { 0 };
                let wq = &w.qs[b * 16..b * 16 + 16];
                for (j, &byte) in wq.iter().enumerate() {
                    lanes[j / 4] += ((byte & 0xF) as i32 - offset) * aq[j] as i32;
                    lanes[4 + j / 4] += ((byte >> 4) as i32 - offset) * aq[16 + j] as i32;
                }
            }
        }
        let scale = w.d[b] * a.d[b];
        for l in 0..8 {
            acc[l] += scale * lanes[l] as f32;
        }
        if kind == BlockKind::Q4_1 {
            acc_min += w.m[b] * (a.d[b] * a.isum[b] as f32);
        }
    }
    reduce8(acc) + acc_min
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{reduce8, ActRow, BlockKind, BlockRow};
    use std::arch::x86_64::*;

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

    /// Widen 16 packed nibbles into 32 bytes: low nibbles first, then high,
    /// matching GGUF's element order.
    #[inline(always)]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        // SAFETY: caller guarantees 16 readable bytes at p.
        let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_blocks(kind: BlockKind, w: &BlockRow, a: &ActRow) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut acc_min = 0f32;
        for b in 0..a.d.len() {
            // SAFETY: each row holds a.d.len() blocks of 32 activations and
            // the matching weight quants (checked when the matrix was built).
            let av = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(b * 32) as *const __m256i) };
            let prod16 = match kind {
                BlockKind::Q8_0 => {
                    let wv = unsafe { _mm256_loadu_si256(w.qs.as_ptr().add(b * 32) as *const __m256i) };
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv))
                }
                BlockKind::Q4_0 => {
                    let wv = _mm256_sub_epi8(unsafe { unpack_nibbles(w.qs.as_ptr().add(b * 16)) }, _mm256_set1_epi8(8));
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv))
                }
                BlockKind::Q4_1 => {
                    let wv = unsafe { unpack_nibbles(w.qs.as_ptr().add(b * 16)) };
                    _mm256_maddubs_epi16(wv, av)
                }
            };
            let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod16, ones));
            let scale = _mm256_set1_ps(w.d[b] * a.d[b]);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(scale, lanes));
            if kind == BlockKind::Q4_1 {
                acc_min += w.m[b] * (a.d[b] * a.isum[b] as f32);
            }
        }
        let mut lanes = [0f32; 8];
        // SAFETY: lanes has room for eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        reduce8(lanes) + acc_min
    }
}
