//! Block dot products: runtime-dispatched AVX2 on x86-64, NEON on aarch64
//! (edge devices: phones, Apple silicon), and a scalar twin that gives
//! identical bits. Lane `l` of an eight-lane accumulator always holds the
//! products of elements `4l..4l+4` of each 32-element block (integer kernels)
//! or elements `i` with `i % 8 == l` (f32 kernel).

use std::sync::OnceLock;

/// Which instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX2 with FMA and AVX-VNNI (`vpdpbusd`: four u8×i8 products summed
    /// into an i32 lane in one instruction, the same lanes `maddubs`+`madd`
    /// give, so the bits do not change).
    Avx2Vnni,
    /// aarch64's baseline Advanced SIMD (every aarch64 CPU has it).
    Neon,
}

/// Detected once; `TANDEM_SIMD=scalar` forces the portable path and
/// `TANDEM_SIMD=avx2` plain AVX2 (to compare paths; all give the same bits).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("TANDEM_SIMD").is_ok_and(|v| v == "scalar") {
            return SimdLevel::Scalar;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if std::env::var("TANDEM_SIMD").is_ok_and(|v| v == "avx2") || !is_x86_feature_detected!("avxvnni") {
                return SimdLevel::Avx2;
            }
            return SimdLevel::Avx2Vnni;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return SimdLevel::Neon;
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

/// One weight row in the kernels' layout.
pub(crate) struct BlockRow<'a> {
    /// `kind.scales()` per block.
    pub d: &'a [f32],
    /// Q4_1 minimums, one per block; empty for the other kinds.
    pub m: &'a [f32],
    pub qs: &'a [u8],
}

/// An activation row quantized to 8 bits in blocks of 32.
pub(crate) struct ActRow<'a> {
    pub d: &'a [f32],
    /// d × (sum of the block's quants): what a weight minimum multiplies.
    pub dsum: &'a [f32],
    pub qs: &'a [i8],
}

/// Dot products of one weight row with R activation rows. Each row's result
/// is computed by exactly the same operations whatever R is, so grouping
/// rows never changes a bit.
#[inline]
pub(crate) fn dot_rows<const R: usize>(kind: BlockKind, w: &BlockRow, a: &[ActRow; R], out: &mut [f32]) {
    debug_assert!(a.iter().all(|a| a.qs.len() == a.d.len() * 32 && a.dsum.len() == a.d.len()));
    debug_assert!(w.qs.len() == a[0].d.len() * kind.quant_bytes() && w.d.len() == a[0].d.len() * kind.scales());
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY: the features were detected at runtime (simd_level); the
        // slice lengths are those checked above (guaranteed by QMatrix and
        // quantize_activations).
        SimdLevel::Avx2 => return unsafe { avx2::dot_rows::<R>(kind, w, a, out) },
        SimdLevel::Avx2Vnni => return unsafe { avx2::dot_rows_vnni::<R>(kind, w, a, out) },
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if simd_level() == SimdLevel::Neon {
        // SAFETY: NEON was detected at runtime; slice lengths as above.
        return unsafe { neon::dot_rows::<R>(kind, w, a, out) };
    }
    for (o, a) in out.iter_mut().zip(a) {
        *o = dot_blocks_scalar(kind, w, a);
    }
}

fn dot_blocks_scalar(kind: BlockKind, w: &BlockRow, a: &ActRow) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..a.d.len() {
        let aq = &a.qs[b * 32..b * 32 + 32];
        let mut lanes = [0i32; 8];
        match kind {
            BlockKind::Q8_0 | BlockKind::Q8Half => {
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
        let (lo, hi) = if kind == BlockKind::Q8Half {
            (w.d[2 * b] * a.d[b], w.d[2 * b + 1] * a.d[b])
        } else {
            let s = w.d[b] * a.d[b];
            (s, s)
        };
        for l in 0..8 {
            // Fused multiply-add, as the SIMD paths do (one rounding).
            acc[l] = (if l < 4 { lo } else { hi }).mul_add(lanes[l] as f32, acc[l]);
        }
    }
    let min = if kind == BlockKind::Q4_1 { dot_f32_scalar(w.m, a.dsum) } else { 0.0 };
    reduce8(acc) + min
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

    /// Defines a kernel over R activation rows for one weight row; `$idot`
    /// turns 32 unsigned weight bytes and 32 signed activation bytes into
    /// eight i32 lanes of four products each.
    macro_rules! dot_rows_kernel {
        ($name:ident, $inner:ident, $features:literal, |$wu:ident, $av:ident| $idot:expr) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize>(kind: BlockKind, w: &BlockRow, a: &[ActRow; R], out: &mut [f32]) {
                // SAFETY (all arms): forwarded from the caller.
                unsafe {
                    match kind {
                        BlockKind::Q4_0 => $inner::<R, 0>(w, a, out),
                        BlockKind::Q4_1 => $inner::<R, 1>(w, a, out),
                        BlockKind::Q8_0 => $inner::<R, 2>(w, a, out),
                        BlockKind::Q8Half => $inner::<R, 3>(w, a, out),
                    }
                }
            }

            /// K: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0, 3 = Q8Half.
            #[target_feature(enable = $features)]
            unsafe fn $inner<const R: usize, const K: u8>(w: &BlockRow, a: &[ActRow; R], out: &mut [f32]) {
                let mut acc = [_mm256_setzero_ps(); R];
                let nb = a[0].d.len();
                let (wq, wd) = (w.qs.as_ptr(), w.d.as_ptr());
                for b in 0..nb {
                    // The weight block is decoded once for all R rows.
                    // Unsigned 4-bit weights multiply directly; signed ones
                    // use |w| · sign(a, w), since the u8×i8 instructions
                    // want an unsigned side.
                    // SAFETY: the caller guarantees nb blocks of quants and
                    // scales in every row.
                    let (wu, wsign) = unsafe {
                        match K {
                            1 => (unpack_nibbles(wq.add(b * 16)), _mm256_setzero_si256()),
                            0 => {
                                let v = _mm256_sub_epi8(unpack_nibbles(wq.add(b * 16)), _mm256_set1_epi8(8));
                                (_mm256_sign_epi8(v, v), v)
                            }
                            _ => {
                                let v = _mm256_loadu_si256(wq.add(b * 32) as *const __m256i);
                                (_mm256_sign_epi8(v, v), v)
                            }
                        }
                    };
                    for r in 0..R {
                        // SAFETY: as above.
                        let (av, ad) = unsafe {
                            (_mm256_loadu_si256(a[r].qs.as_ptr().add(b * 32) as *const __m256i), *a[r].d.get_unchecked(b))
                        };
                        let av = if K == 1 { av } else { _mm256_sign_epi8(av, wsign) };
                        let lanes = _mm256_cvtepi32_ps({
                            let ($wu, $av) = (wu, av);
                            $idot
                        });
                        // SAFETY: as above.
                        let scale = unsafe {
                            if K == 3 {
                                _mm256_set_m128(_mm_set1_ps(*wd.add(2 * b + 1) * ad), _mm_set1_ps(*wd.add(2 * b) * ad))
                            } else {
                                _mm256_set1_ps(*wd.add(b) * ad)
                            }
                        };
                        acc[r] = _mm256_fmadd_ps(scale, lanes, acc[r]);
                    }
                }
                for r in 0..R {
                    let mut lanes = [0f32; 8];
                    // SAFETY: lanes has room for eight f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
                    // SAFETY: AVX2 is enabled here.
                    let min = if K == 1 { unsafe { dot_f32(w.m, a[r].dsum) } } else { 0.0 };
                    out[r] = reduce8(lanes) + min;
                }
            }
        };
    }

    dot_rows_kernel!(dot_rows, dot_rows_k, "avx2,fma", |wu, av| _mm256_madd_epi16(
        _mm256_maddubs_epi16(wu, av),
        _mm256_set1_epi16(1)
    ));
    dot_rows_kernel!(dot_rows_vnni, dot_rows_vnni_k, "avx2,fma,avxvnni", |wu, av| _mm256_dpbusd_avx_epi32(
        _mm256_setzero_si256(),
        wu,
        av
    ));
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{reduce8, ActRow, BlockKind, BlockRow};
    use std::arch::aarch64::*;

    /// Lanes 0–3 and 4–7 of the eight-lane order, unfused like the scalar twin.
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

    /// Sums of four consecutive products of 16 signed bytes: lane l holds
    /// elements 4l..4l+4 (i8×i8 fits i16; the sums are exact integers, so
    /// the lanes equal every other path's).
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a)));
        let hi = vpaddlq_s16(vmull_high_s8(w, a));
        vpaddq_s32(lo, hi)
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot_rows<const R: usize>(kind: BlockKind, w: &BlockRow, a: &[ActRow; R], out: &mut [f32]) {
        let mut acc = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); R];
        let nb = a[0].d.len();
        let (wq, wd) = (w.qs.as_ptr(), w.d.as_ptr());
        for b in 0..nb {
            // The weight block is decoded once for all R rows: elements
            // 0..16 and 16..32 as signed bytes.
            // SAFETY: the caller guarantees nb blocks of quants and scales.
            let (w_lo, w_hi) = unsafe {
                match kind {
                    BlockKind::Q4_0 | BlockKind::Q4_1 => {
                        let raw = vld1q_u8(wq.add(b * 16));
                        let (lo, hi) = (vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)));
                        if kind == BlockKind::Q4_0 {
                            (vsubq_s8(lo, vdupq_n_s8(8)), vsubq_s8(hi, vdupq_n_s8(8)))
                        } else {
                            (lo, hi)
                        }
                    }
                    BlockKind::Q8_0 | BlockKind::Q8Half => (vld1q_s8(wq.add(b * 32) as *const i8), vld1q_s8(wq.add(b * 32 + 16) as *const i8)),
                }
            };
            for r in 0..R {
                // SAFETY: as above.
                unsafe {
                    let aq = a[r].qs.as_ptr().add(b * 32);
                    let ad = *a[r].d.get_unchecked(b);
                    let lanes_lo = vcvtq_f32_s32(dot16(w_lo, vld1q_s8(aq)));
                    let lanes_hi = vcvtq_f32_s32(dot16(w_hi, vld1q_s8(aq.add(16))));
                    let (s_lo, s_hi) = if kind == BlockKind::Q8Half { (*wd.add(2 * b) * ad, *wd.add(2 * b + 1) * ad) } else { (*wd.add(b) * ad, *wd.add(b) * ad) };
                    // Fused, as the scalar twin's mul_add.
                    acc[r].0 = vfmaq_n_f32(acc[r].0, lanes_lo, s_lo);
                    acc[r].1 = vfmaq_n_f32(acc[r].1, lanes_hi, s_hi);
                }
            }
        }
        for r in 0..R {
            let mut lanes = [0f32; 8];
            // SAFETY: lanes has room for eight f32; NEON is enabled here.
            let min = unsafe {
                vst1q_f32(lanes.as_mut_ptr(), acc[r].0);
                vst1q_f32(lanes.as_mut_ptr().add(4), acc[r].1);
                if kind == BlockKind::Q4_1 { dot_f32(w.m, a[r].dsum) } else { 0.0 }
            };
            out[r] = reduce8(lanes) + min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SessionRng;

    /// The SIMD kernels of this machine (AVX2 and AVX-VNNI, or NEON) and
    /// their scalar twins give identical bits.
    #[test]
    fn simd_and_scalar_paths_agree_bit_for_bit() {
        if simd_level() == SimdLevel::Scalar {
            eprintln!("skipped: this machine has neither AVX2+FMA nor NEON (only the scalar path runs)");
            return;
        }
        let mut rng = SessionRng::new(17);
        let mut f = |scale: f32| (rng.next_f64() as f32 * 2.0 - 1.0) * scale;
        for len in [1, 7, 8, 64, 77] {
            let a: Vec<f32> = (0..len).map(|_| f(3.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| f(3.0)).collect();
            assert_eq!(dot_f32(&a, &b).to_bits(), dot_f32_scalar(&a, &b).to_bits());
        }
        let nb = 5;
        for kind in [BlockKind::Q4_0, BlockKind::Q4_1, BlockKind::Q8_0, BlockKind::Q8Half] {
            let qs: Vec<u8> = (0..nb * kind.quant_bytes()).map(|_| (f(128.0) as i32 & 0xFF) as u8).collect();
            let d: Vec<f32> = (0..nb * kind.scales()).map(|_| f(0.1)).collect();
            let m: Vec<f32> = if kind == BlockKind::Q4_1 { (0..nb).map(|_| f(0.5)).collect() } else { vec![] };
            // The extremes activation quantization makes (±127; never −128,
            // which the AVX2 sign trick could not negate) are included.
            let aq: Vec<Vec<i8>> = (0..4).map(|r| (0..nb * 32).map(|i| if i == r { -127 } else if i == r + 1 { 127 } else { f(127.0) as i8 }).collect()).collect();
            let ad: Vec<Vec<f32>> = (0..4).map(|_| (0..nb).map(|_| f(0.05)).collect()).collect();
            let dsum: Vec<Vec<f32>> = (0..4).map(|_| (0..nb).map(|_| f(2.0)).collect()).collect();
            let w = BlockRow { d: &d, m: &m, qs: &qs };
            let rows: [ActRow; 4] = std::array::from_fn(|r| ActRow { d: &ad[r], dsum: &dsum[r], qs: &aq[r] });
            let mut simd = [0f32; 4];
            dot_rows::<4>(kind, &w, &rows, &mut simd);
            for r in 0..4 {
                let scalar = dot_blocks_scalar(kind, &w, &rows[r]);
                assert_eq!(simd[r].to_bits(), scalar.to_bits(), "{kind:?} row {r}: {} vs {scalar}", simd[r]);
                let mut one = [0f32];
                dot_rows::<1>(kind, &w, &[ActRow { d: &ad[r], dsum: &dsum[r], qs: &aq[r] }], &mut one);
                assert_eq!(one[0].to_bits(), scalar.to_bits());
                // On AVX-VNNI machines the plain AVX2 kernel is checked too.
                #[cfg(target_arch = "x86_64")]
                if simd_level() == SimdLevel::Avx2Vnni {
                    let mut v = [0f32; 4];
                    // SAFETY: AVX-VNNI implies AVX2 and FMA, detected above.
                    unsafe { avx2::dot_rows::<4>(kind, &w, &rows, &mut v) };
                    assert_eq!(v[r].to_bits(), scalar.to_bits(), "{kind:?} AVX2 row {r}");
                }
            }
        }
    }
}
