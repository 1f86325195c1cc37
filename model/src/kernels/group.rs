//! Packed weight groups times 8-bit activation rows: the integer core of
//! every quantized matmul.
//!
//! Weights are packed in groups of [`GROUP`] output rows so that one SIMD
//! register holds the same four input columns of sixteen rows (AVX-512), or
//! of eight (AVX2, two registers per group) or four (NEON, four registers).
//! Four activation bytes are broadcast against it and one `u8 × i8`
//! dot-product instruction advances sixteen outputs by four products each:
//! the weights are decoded once per block for all activation rows, and the
//! floats only enter once per block, not once per four products.
//!
//! Every path computes each output with the same operations in the same
//! order, which the scalar twin spells out: per block, the exact integer dot
//! product of the row's quants with the activation's (split at the half for
//! two-scale blocks), then `acc = fma(d_w · d_a, isum, acc)`; for blocks
//! with a minimum, `macc = fma(m_w, d_a · Σa, macc)` alongside; the output
//! is `acc + macc`. Integer sums are exact and the float steps are the same
//! IEEE operations everywhere, so all paths give the same bits, whatever
//! the number of activation rows or which rows share a call.

use super::dot::SimdLevel;

/// Output rows per packed group.
pub(crate) const GROUP: usize = 16;

/// How a group's quants are stored and multiplied.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pack {
    /// 4-bit unsigned q, w = d·q + m (Q4_1, Q4_K; Q4_0 with m = −8d).
    Nibbles,
    /// 8-bit signed q, w = d·q (Q8_0).
    Bytes,
    /// 8-bit signed q, one scale per 16-element half (Q6_K).
    BytesHalf,
}

impl Pack {
    /// Quant bytes of one 32-element block of one row.
    pub(crate) fn quant_bytes(self) -> usize {
        if self == Pack::Nibbles {
            16
        } else {
            32
        }
    }
    /// Scales per block.
    pub(crate) fn scales(self) -> usize {
        if self == Pack::BytesHalf {
            2
        } else {
            1
        }
    }
}

/// One group of [`GROUP`] weight rows, every block of the row length:
///
/// * `qs`: per block, `quant_bytes / 4` chunks of 64 bytes, each holding
///   four bytes of every row in row order. Nibbles: chunk `c` holds bytes
///   `4c..4c+4` of each row's block (GGUF order: low nibbles are elements
///   `4c..4c+4`, high nibbles elements `16+4c..`); bytes: elements
///   `4c..4c+4`.
/// * `d`: per block and scale, [`GROUP`] scales.
/// * `m`: per block, [`GROUP`] minimums (nibbles only, else empty).
/// * `wsum`: per block and scale, 128 × the sum of the row's quants over
///   the scale's elements (bytes only): what VNNI's unsigned side adds when
///   the activation is offset by 128.
pub(crate) struct GroupView<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
    pub wsum: &'a [i32],
}

/// An activation row quantized to 8 bits in blocks of 32.
pub(crate) struct ActRow<'a> {
    pub d: &'a [f32],
    /// d × (sum of the block's quants): what a weight minimum multiplies.
    pub dsum: &'a [f32],
    pub qs: &'a [i8],
    /// The quants plus 128, as unsigned bytes (VNNI's unsigned side).
    pub qu: &'a [u8],
}

/// `out[r][j]` = weight row `j` of the group · activation row `r`, for
/// R activation rows, on the given instruction set (which the caller has
/// detected).
pub(crate) fn group_times<const R: usize>(level: SimdLevel, pack: Pack, w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
    let nb = a[0].d.len();
    assert!(out.len() == R && a.iter().all(|a| a.qs.len() == nb * 32 && a.qu.len() == nb * 32 && a.dsum.len() == nb));
    let (qb, ns) = (pack.quant_bytes(), pack.scales());
    assert!(w.qs.len() == nb * qb * GROUP && w.d.len() == nb * ns * GROUP);
    assert!(w.m.len() == if pack == Pack::Nibbles { nb * GROUP } else { 0 });
    assert!(w.wsum.len() == if pack == Pack::Nibbles { 0 } else { nb * ns * GROUP });
    match level {
        // SAFETY (every SIMD arm): the caller detected the instruction set;
        // the slice lengths were checked above.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => unsafe { x86::group_512::<R>(pack, w, a, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2Vnni => unsafe { x86::group_vnni::<R>(pack, w, a, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if pack == Pack::Nibbles => unsafe { x86::nibbles_avx2::<R>(w, a, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::bytes_avx2::<R>(pack, w, a, out) },
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => unsafe { neon::group::<R>(pack, w, a, out) },
        _ => {
            for (a, out) in a.iter().zip(out) {
                group_scalar(pack, w, a, out);
            }
        }
    }
}

/// The reference every SIMD path reproduces bit for bit.
fn group_scalar(pack: Pack, w: &GroupView, a: &ActRow, out: &mut [f32; GROUP]) {
    let (qb, ns) = (pack.quant_bytes(), pack.scales());
    let span = 32 / ns;
    for (j, out) in out.iter_mut().enumerate() {
        let (mut acc, mut macc) = (0f32, 0f32);
        for b in 0..a.d.len() {
            let chunks = &w.qs[b * qb * GROUP..(b + 1) * qb * GROUP];
            let quant = |e: usize| -> i32 {
                if pack == Pack::Nibbles {
                    let byte = chunks[(e % 16 / 4) * 64 + j * 4 + e % 4];
                    (if e < 16 { byte & 0xF } else { byte >> 4 }) as i32
                } else {
                    chunks[(e / 4) * 64 + j * 4 + e % 4] as i8 as i32
                }
            };
            for h in 0..ns {
                let isum: i32 = (h * span..(h + 1) * span).map(|e| quant(e) * a.qs[b * 32 + e] as i32).sum();
                let scale = w.d[(b * ns + h) * GROUP + j] * a.d[b];
                acc = scale.mul_add(isum as f32, acc);
            }
            if pack == Pack::Nibbles {
                macc = w.m[b * GROUP + j].mul_add(a.dsum[b], macc);
            }
        }
        *out = acc + macc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActRow, GroupView, Pack, GROUP};
    use std::arch::x86_64::*;

    /// Four activation bytes starting at element `4k` of block `b`, as one
    /// little-endian word (what the broadcasts replicate).
    #[inline(always)]
    unsafe fn word<T>(qs: &[T], b: usize, k: usize) -> i32 {
        // SAFETY: the caller keeps b within the row's blocks (checked
        // lengths), k < 8.
        unsafe { (qs.as_ptr().add(b * 32 + 4 * k) as *const i32).read_unaligned() }
    }

    /// Bytes ahead of the block in use at which the weight streams are
    /// fetched into L1.
    const PREFETCH_BYTES: usize = 2048;

    /// Asks for the weights [`PREFETCH_BYTES`] past block `b` of the
    /// group's quants, and as many blocks ahead of its scales (and
    /// minimums or weight sums). Past the group's end these are the next
    /// group's (the groups of a matrix lie back to back), which the next
    /// call reads. A pass streams 115 MB of weights, each byte read once,
    /// and without this the first call over a group waited on memory at
    /// every block: on a 2-core Intel Xeon (Emerald Rapids) a 5-token pass
    /// read its weights at 12 GB/s against 33 for a 1-token step. With it
    /// (and calls of five rows rather than four and one), 5 tokens took
    /// 6.4–6.6 ms instead of 7.7–8.9 in alternated steady-state runs; on
    /// the AVX2 path 12.7 instead of 14.7.
    #[inline(always)]
    unsafe fn prefetch_ahead(pack: Pack, w: &GroupView, b: usize) {
        let block = pack.quant_bytes() * GROUP;
        let ahead = PREFETCH_BYTES / block;
        let q = w.qs.as_ptr().wrapping_add((b + ahead) * block);
        for line in (0..block).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(line) as *const i8);
        }
        let ns = pack.scales();
        for line in 0..ns {
            _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().wrapping_add((b + ahead) * ns * GROUP + line * GROUP) as *const i8);
        }
        if pack == Pack::Nibbles {
            _mm_prefetch::<_MM_HINT_T0>(w.m.as_ptr().wrapping_add((b + ahead) * GROUP) as *const i8);
        } else {
            for line in 0..ns {
                _mm_prefetch::<_MM_HINT_T0>(w.wsum.as_ptr().wrapping_add((b + ahead) * ns * GROUP + line * GROUP) as *const i8);
            }
        }
    }

    /// Sixteen rows per register: `vpdpbusd` on 512-bit registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn group_512<const R: usize>(pack: Pack, w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
        let nb = a[0].d.len();
        let (mut acc, mut macc) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            for b in 0..nb {
                prefetch_ahead(pack, w, b);
                if pack == Pack::Nibbles {
                    let mask = _mm512_set1_epi8(0x0F);
                    // wv[k] holds activation word k's weights: low nibbles
                    // of chunk k (k < 4), high nibbles of chunk k − 4.
                    let mut wv = [_mm512_setzero_si512(); 8];
                    for c in 0..4 {
                        let raw = _mm512_loadu_si512(q.add(b * 256 + c * 64) as *const _);
                        wv[c] = _mm512_and_si512(raw, mask);
                        wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
                    }
                    let dv = _mm512_loadu_ps(w.d.as_ptr().add(b * GROUP));
                    let mv = _mm512_loadu_ps(w.m.as_ptr().add(b * GROUP));
                    for r in 0..R {
                        // One chain per row: the rows give the parallelism.
                        let mut isum = _mm512_setzero_si512();
                        for (k, wv) in wv.iter().enumerate() {
                            isum = _mm512_dpbusd_epi32(isum, *wv, _mm512_set1_epi32(word(a[r].qs, b, k)));
                        }
                        let isum = _mm512_cvtepi32_ps(isum);
                        let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*a[r].d.get_unchecked(b)));
                        acc[r] = _mm512_fmadd_ps(scale, isum, acc[r]);
                        macc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*a[r].dsum.get_unchecked(b)), macc[r]);
                    }
                } else {
                    // Signed weights on the signed side; the activation
                    // offset by 128 on the unsigned side, its 128·Σw taken
                    // back out (exact integers).
                    let ns = pack.scales();
                    let mut wv = [_mm512_setzero_si512(); 8];
                    for (k, v) in wv.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(q.add(b * 512 + k * 64) as *const _);
                    }
                    for r in 0..R {
                        let ad = _mm512_set1_ps(*a[r].d.get_unchecked(b));
                        let per = 8 / ns;
                        for h in 0..ns {
                            let mut isum = _mm512_setzero_si512();
                            for (k, wv) in wv.iter().enumerate().skip(h * per).take(per) {
                                isum = _mm512_dpbusd_epi32(isum, _mm512_set1_epi32(word(a[r].qu, b, k)), *wv);
                            }
                            let wsum = _mm512_loadu_si512(w.wsum.as_ptr().add((b * ns + h) * GROUP) as *const _);
                            let isum = _mm512_cvtepi32_ps(_mm512_sub_epi32(isum, wsum));
                            let scale = _mm512_mul_ps(_mm512_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP)), ad);
                            acc[r] = _mm512_fmadd_ps(scale, isum, acc[r]);
                        }
                    }
                }
            }
            for r in 0..R {
                _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], macc[r]));
            }
        }
    }

    /// AVX-VNNI: eight rows per register (the group in two halves), one
    /// `vpdpbusd` per activation word; byte weights on the signed side
    /// against the activation offset by 128, its 128·Σw taken back out.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn group_vnni<const R: usize>(pack: Pack, w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
        let nb = a[0].d.len();
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the
        // lengths group_times checked.
        unsafe {
            for half in 0..2 {
                let row0 = half * 8;
                let (mut acc, mut macc) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                for b in 0..nb {
                    if half == 0 {
                        prefetch_ahead(pack, w, b);
                    }
                    if pack == Pack::Nibbles {
                        let mask = _mm256_set1_epi8(0x0F);
                        let mut wv = [_mm256_setzero_si256(); 8];
                        for c in 0..4 {
                            let raw = _mm256_loadu_si256(q.add(b * 256 + c * 64 + row0 * 4) as *const _);
                            wv[c] = _mm256_and_si256(raw, mask);
                            wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        }
                        let dv = _mm256_loadu_ps(w.d.as_ptr().add(b * GROUP + row0));
                        let mv = _mm256_loadu_ps(w.m.as_ptr().add(b * GROUP + row0));
                        for r in 0..R {
                            let mut isum = _mm256_setzero_si256();
                            for (k, &v) in wv.iter().enumerate() {
                                isum = _mm256_dpbusd_avx_epi32(isum, v, _mm256_set1_epi32(word(a[r].qs, b, k)));
                            }
                            let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
                            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
                            macc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*a[r].dsum.get_unchecked(b)), macc[r]);
                        }
                    } else {
                        let ns = pack.scales();
                        let per = 8 / ns;
                        let mut wv = [_mm256_setzero_si256(); 8];
                        for (k, v) in wv.iter_mut().enumerate() {
                            *v = _mm256_loadu_si256(q.add(b * 512 + k * 64 + row0 * 4) as *const _);
                        }
                        for r in 0..R {
                            let ad = _mm256_set1_ps(*a[r].d.get_unchecked(b));
                            for h in 0..ns {
                                let mut isum = _mm256_setzero_si256();
                                for (k, &v) in wv.iter().enumerate().skip(h * per).take(per) {
                                    isum = _mm256_dpbusd_avx_epi32(isum, _mm256_set1_epi32(word(a[r].qu, b, k)), v);
                                }
                                let wsum = _mm256_loadu_si256(w.wsum.as_ptr().add((b * ns + h) * GROUP + row0) as *const _);
                                isum = _mm256_sub_epi32(isum, wsum);
                                let d = _mm256_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, ad), _mm256_cvtepi32_ps(isum), acc[r]);
                            }
                        }
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(row0), _mm256_add_ps(acc[r], macc[r]));
                }
            }
        }
    }

    /// Nibble weights without VNNI (`u8 × i8` pairs to i16, pairs of i16
    /// to i32). A block's sixteen pair sums per lane stay within i16
    /// (16 · 15 · 128 = 30720), so they are added there and widened once:
    /// one `vpmaddwd` a block instead of eight. The block is taken chunk by
    /// chunk, each chunk's two nibble vectors against every row, and the
    /// minimums' chain runs after the quants' (the two are independent;
    /// each keeps its order): R sums and R accumulators then fit AVX2's
    /// sixteen registers, where eight decoded weight vectors beside them
    /// spilled.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nibbles_avx2<const R: usize>(w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
        let nb = a[0].d.len();
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            let (mask, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
            for half in 0..2 {
                let row0 = half * 8;
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    if half == 0 {
                        prefetch_ahead(Pack::Nibbles, w, b);
                    }
                    // Chunk by chunk: its low and high nibbles meet every
                    // row's activation words c and c + 4.
                    let mut pairs = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let raw = _mm256_loadu_si256(q.add(b * 256 + c * 64 + row0 * 4) as *const _);
                        let (lo, hi) = (_mm256_and_si256(raw, mask), _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                        for r in 0..R {
                            let low = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(word(a[r].qs, b, c)));
                            let high = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(word(a[r].qs, b, c + 4)));
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_add_epi16(low, high));
                        }
                    }
                    let dv = _mm256_loadu_ps(w.d.as_ptr().add(b * GROUP + row0));
                    for r in 0..R {
                        let isum = _mm256_madd_epi16(pairs[r], ones);
                        let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
                    }
                }
                let mut macc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    let mv = _mm256_loadu_ps(w.m.as_ptr().add(b * GROUP + row0));
                    for r in 0..R {
                        macc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*a[r].dsum.get_unchecked(b)), macc[r]);
                    }
                }
                for r in 0..R {
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(row0), _mm256_add_ps(acc[r], macc[r]));
                }
            }
        }
    }

    /// Signed byte weights without VNNI, chunk by chunk: a chunk's
    /// absolute values are taken once for all rows, and each row's
    /// activation word carries the weights' signs (at most 128 · 127 · 2
    /// per i16 pair, so every chunk widens to i32 on its own).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn bytes_avx2<const R: usize>(pack: Pack, w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
        let nb = a[0].d.len();
        let q = w.qs.as_ptr();
        let ns = pack.scales();
        let per = 8 / ns;
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            for half in 0..2 {
                let row0 = half * 8;
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..nb {
                    if half == 0 {
                        prefetch_ahead(pack, w, b);
                    }
                    for h in 0..ns {
                        let mut isum = [_mm256_setzero_si256(); R];
                        for k in h * per..(h + 1) * per {
                            let wk = _mm256_loadu_si256(q.add(b * 512 + k * 64 + row0 * 4) as *const _);
                            let magnitude = _mm256_abs_epi8(wk);
                            for r in 0..R {
                                let signed = _mm256_sign_epi8(_mm256_set1_epi32(word(a[r].qs, b, k)), wk);
                                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed), ones));
                            }
                        }
                        let d = _mm256_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                        for r in 0..R {
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
                            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[r]), acc[r]);
                        }
                    }
                }
                for r in 0..R {
                    // As the scalar twin: + 0 (no minimums) turns −0 into +0.
                    _mm256_storeu_ps(out[r].as_mut_ptr().add(row0), _mm256_add_ps(acc[r], _mm256_setzero_ps()));
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{ActRow, GroupView, Pack, GROUP};
    use std::arch::aarch64::*;

    /// Baseline Advanced SIMD (no dot-product extension): the group in four
    /// quarters of four rows; products widen to i16, pairs of pairs to i32
    /// (at most 128·127·2 per i16 pair sum).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group<const R: usize>(pack: Pack, w: &GroupView, a: &[ActRow; R], out: &mut [[f32; GROUP]]) {
        let nb = a[0].d.len();
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            for quarter in 0..4 {
                let row0 = quarter * 4;
                let (mut acc, mut macc) = ([vdupq_n_f32(0.0); R], [vdupq_n_f32(0.0); R]);
                for b in 0..nb {
                    let (ns, nibbles) = (pack.scales(), pack == Pack::Nibbles);
                    let mut wv = [vdupq_n_s8(0); 8];
                    if nibbles {
                        for c in 0..4 {
                            let raw = vld1q_u8(q.add(b * 256 + c * 64 + row0 * 4));
                            wv[c] = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F)));
                            wv[c + 4] = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
                        }
                    } else {
                        for (k, v) in wv.iter_mut().enumerate() {
                            *v = vld1q_s8(q.add(b * 512 + k * 64 + row0 * 4) as *const i8);
                        }
                    }
                    for r in 0..R {
                        let ad = *a[r].d.get_unchecked(b);
                        let per = 8 / ns;
                        for h in 0..ns {
                            let mut isum = vdupq_n_s32(0);
                            for k in h * per..(h + 1) * per {
                                let word = (a[r].qs.as_ptr().add(b * 32 + 4 * k) as *const i32).read_unaligned();
                                let act = vreinterpretq_s8_s32(vdupq_n_s32(word));
                                let pairs = vpaddq_s16(vmull_s8(vget_low_s8(wv[k]), vget_low_s8(act)), vmull_high_s8(wv[k], act));
                                isum = vpadalq_s16(isum, pairs);
                            }
                            let d = vld1q_f32(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                            acc[r] = vfmaq_f32(acc[r], vmulq_n_f32(d, ad), vcvtq_f32_s32(isum));
                        }
                        if nibbles {
                            let m = vld1q_f32(w.m.as_ptr().add(b * GROUP + row0));
                            macc[r] = vfmaq_f32(macc[r], m, vdupq_n_f32(*a[r].dsum.get_unchecked(b)));
                        }
                    }
                }
                for r in 0..R {
                    vst1q_f32(out[r].as_mut_ptr().add(row0), vaddq_f32(acc[r], macc[r]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dot::available_levels;
    use crate::SessionRng;

    /// Every instruction set this machine has gives the scalar twin's bits,
    /// for each packing, one activation row at a time or four at once.
    #[test]
    fn simd_and_scalar_paths_agree_bit_for_bit() {
        let mut rng = SessionRng::new(17);
        let mut f = |scale: f32| (rng.next_f64() as f32 * 2.0 - 1.0) * scale;
        let nb = 5;
        for pack in [Pack::Nibbles, Pack::Bytes, Pack::BytesHalf] {
            let (qb, ns) = (pack.quant_bytes(), pack.scales());
            // Extremes included: nibbles 0 and 15, bytes −128 and 127.
            let qs: Vec<u8> = (0..nb * qb * GROUP).map(|i| if i < 2 { [0x80, 0x7F][i] } else { (f(128.0) as i32 & 0xFF) as u8 }).collect();
            let d: Vec<f32> = (0..nb * ns * GROUP).map(|_| f(0.1)).collect();
            let m: Vec<f32> = if pack == Pack::Nibbles { (0..nb * GROUP).map(|_| f(0.5)).collect() } else { vec![] };
            let wsum: Vec<i32> = if pack == Pack::Nibbles {
                vec![]
            } else {
                let span = 32 / ns;
                (0..nb * ns * GROUP)
                    .map(|i| {
                        let (b, h, j) = (i / (ns * GROUP), i / GROUP % ns, i % GROUP);
                        let block = &qs[b * 512..(b + 1) * 512];
                        (h * span..(h + 1) * span).map(|e| 128 * block[(e / 4) * 64 + j * 4 + e % 4] as i8 as i32).sum()
                    })
                    .collect()
            };
            let w = GroupView { qs: &qs, d: &d, m: &m, wsum: &wsum };
            // Activation quants span what quantization makes: ±127, never −128.
            let aq: Vec<Vec<i8>> = (0..4)
                .map(|r| {
                    (0..nb * 32)
                        .map(|i| {
                            if i == r {
                                -127
                            } else if i == r + 1 {
                                127
                            } else {
                                f(127.0) as i8
                            }
                        })
                        .collect()
                })
                .collect();
            let au: Vec<Vec<u8>> = aq.iter().map(|row| row.iter().map(|&q| (q as i32 + 128) as u8).collect()).collect();
            let ad: Vec<Vec<f32>> = (0..4).map(|_| (0..nb).map(|_| f(0.05)).collect()).collect();
            let dsum: Vec<Vec<f32>> = (0..4).map(|_| (0..nb).map(|_| f(2.0)).collect()).collect();
            let rows: [ActRow; 4] = std::array::from_fn(|r| ActRow { d: &ad[r], dsum: &dsum[r], qs: &aq[r], qu: &au[r] });
            let mut want = [[0f32; GROUP]; 4];
            group_times::<4>(SimdLevel::Scalar, pack, &w, &rows, &mut want);
            for level in available_levels() {
                let mut four = [[0f32; GROUP]; 4];
                group_times::<4>(level, pack, &w, &rows, &mut four);
                for r in 0..4 {
                    let mut one = [[0f32; GROUP]];
                    group_times::<1>(level, pack, &w, &[ActRow { d: &ad[r], dsum: &dsum[r], qs: &aq[r], qu: &au[r] }], &mut one);
                    for j in 0..GROUP {
                        assert_eq!(four[r][j].to_bits(), want[r][j].to_bits(), "{level:?} {pack:?} row {r} lane {j}");
                        assert_eq!(one[0][j].to_bits(), want[r][j].to_bits(), "{level:?} {pack:?} row {r} lane {j}, alone");
                    }
                }
            }
        }
    }
}
