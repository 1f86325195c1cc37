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

/// The activation rows of one call, quantized to 8 bits in blocks of 32
/// and interleaved block by block. Block `b`'s record holds, for its R
/// rows in order: the quants (8 words a row), the quants plus 128 as
/// unsigned bytes (VNNI's unsigned side; 8 words a row), the scales `d`,
/// and `d` × the sum of the block's quants (what a weight minimum
/// multiplies).
///
/// Why interleaved: a kernel then reaches every row's block through one
/// pointer that advances a record per block, at constant offsets. With a
/// slice per row, each `vpdpbusd` read its broadcast word through a
/// base + index address, which Intel cores split into two micro-ops at
/// issue (a dependency-free loop of such `vpdpbusd` ran 4.0 per ns on a
/// 2-core Intel Xeon, Emerald Rapids, against 5.1 with base + offset).
pub(crate) struct ActTile<'a> {
    rows: usize,
    data: &'a [u32],
}

/// Where, in a `rows`-row tile's block record, row `r`'s quant words
/// start, its quants + 128 start, its scale and its scaled sum lie.
const fn qs_at(r: usize) -> usize {
    r * 8
}
const fn qu_at(rows: usize, r: usize) -> usize {
    (rows + r) * 8
}
const fn d_at(rows: usize, r: usize) -> usize {
    rows * 16 + r
}
const fn dsum_at(rows: usize, r: usize) -> usize {
    rows * 17 + r
}

impl<'a> ActTile<'a> {
    /// Words in one block's record of a `rows`-row tile.
    pub(crate) const fn record_words(rows: usize) -> usize {
        rows * 18
    }

    /// A tile of `rows` rows over `data` (whole records).
    pub(crate) fn new(rows: usize, data: &'a [u32]) -> Self {
        assert!(rows > 0 && data.len().is_multiple_of(Self::record_words(rows)), "activation tile: whole records");
        ActTile { rows, data }
    }

    /// Writes row `r`'s block `b` into a tile's words.
    #[inline(always)]
    pub(crate) fn write(data: &mut [u32], rows: usize, b: usize, r: usize, q: &[i8; 32], d: f32, dsum: f32) {
        let rec = &mut data[b * Self::record_words(rows)..(b + 1) * Self::record_words(rows)];
        let words: [u32; 8] = std::array::from_fn(|k| u32::from_le_bytes([q[4 * k] as u8, q[4 * k + 1] as u8, q[4 * k + 2] as u8, q[4 * k + 3] as u8]));
        rec[qs_at(r)..qs_at(r) + 8].copy_from_slice(&words);
        rec[qu_at(rows, r)..qu_at(rows, r) + 8].copy_from_slice(&words.map(|w| w ^ 0x8080_8080));
        rec[d_at(rows, r)] = d.to_bits();
        rec[dsum_at(rows, r)] = dsum.to_bits();
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    fn blocks(&self) -> usize {
        self.data.len() / Self::record_words(self.rows)
    }

    /// Quant `e` of row `r`'s block `b`.
    fn quant(&self, b: usize, r: usize, e: usize) -> i32 {
        self.data[b * Self::record_words(self.rows) + qs_at(r) + e / 4].to_le_bytes()[e % 4] as i8 as i32
    }

    fn d(&self, b: usize, r: usize) -> f32 {
        f32::from_bits(self.data[b * Self::record_words(self.rows) + d_at(self.rows, r)])
    }

    fn dsum(&self, b: usize, r: usize) -> f32 {
        f32::from_bits(self.data[b * Self::record_words(self.rows) + dsum_at(self.rows, r)])
    }

    /// Every block's record, in order.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    fn records<const R: usize>(&self) -> impl Iterator<Item = Rec<R>> + '_ {
        assert_eq!(self.rows, R);
        self.data.chunks_exact(Self::record_words(R)).map(|rec| Rec(rec.as_ptr()))
    }
}

/// A pointer to one block's record in an R-row [`ActTile`].
#[derive(Clone, Copy)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
struct Rec<const R: usize>(*const u32);

#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
impl<const R: usize> Rec<R> {
    /// Row `r`'s quants `4k..4k+4` as one little-endian word (what the
    /// broadcasts replicate). SAFETY (these four): the record is in the
    /// tile, r < R, k < 8.
    #[inline(always)]
    unsafe fn qs(self, r: usize, k: usize) -> i32 {
        unsafe { *self.0.add(qs_at(r) + k) as i32 }
    }
    /// The same word of the quants plus 128.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    #[inline(always)]
    unsafe fn qu(self, r: usize, k: usize) -> i32 {
        unsafe { *self.0.add(qu_at(R, r) + k) as i32 }
    }
    #[inline(always)]
    unsafe fn d(self, r: usize) -> f32 {
        unsafe { f32::from_bits(*self.0.add(d_at(R, r))) }
    }
    #[inline(always)]
    unsafe fn dsum(self, r: usize) -> f32 {
        unsafe { f32::from_bits(*self.0.add(dsum_at(R, r))) }
    }
}

/// `out[r][j]` = weight row `j` of the group · activation row `r`, for
/// R activation rows, on the given instruction set (which the caller has
/// detected).
pub(crate) fn group_times<const R: usize>(level: SimdLevel, pack: Pack, w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
    let nb = a.blocks();
    assert!(out.len() == R && a.rows == R);
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
            for (r, out) in out.iter_mut().enumerate() {
                group_scalar(pack, w, a, r, out);
            }
        }
    }
}

/// The reference every SIMD path reproduces bit for bit.
fn group_scalar(pack: Pack, w: &GroupView, a: &ActTile, r: usize, out: &mut [f32; GROUP]) {
    let (qb, ns) = (pack.quant_bytes(), pack.scales());
    let span = 32 / ns;
    for (j, out) in out.iter_mut().enumerate() {
        let (mut acc, mut macc) = (0f32, 0f32);
        for b in 0..a.blocks() {
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
                let isum: i32 = (h * span..(h + 1) * span).map(|e| quant(e) * a.quant(b, r, e)).sum();
                let scale = w.d[(b * ns + h) * GROUP + j] * a.d(b, r);
                acc = scale.mul_add(isum as f32, acc);
            }
            if pack == Pack::Nibbles {
                macc = w.m[b * GROUP + j].mul_add(a.dsum(b, r), macc);
            }
        }
        *out = acc + macc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActTile, GroupView, Pack, GROUP};
    use std::arch::x86_64::*;

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
    pub(super) unsafe fn group_512<const R: usize>(pack: Pack, w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
        let (mut acc, mut macc) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            for (b, rec) in a.records::<R>().enumerate() {
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
                    // One chain per row, the rows' steps interleaved in
                    // program order, so the core always finds R
                    // independent `vpdpbusd` to issue. Row after row, each
                    // row's eight dependent steps (latency 5–6 cycles)
                    // filled the scheduler and the rows hardly overlapped.
                    let mut isums = [_mm512_setzero_si512(); R];
                    for (k, wv) in wv.iter().enumerate() {
                        for (r, isum) in isums.iter_mut().enumerate() {
                            *isum = _mm512_dpbusd_epi32(*isum, *wv, _mm512_set1_epi32(rec.qs(r, k)));
                        }
                    }
                    for (r, isum) in isums.iter().enumerate() {
                        let isum = _mm512_cvtepi32_ps(*isum);
                        let scale = _mm512_mul_ps(dv, _mm512_set1_ps(rec.d(r)));
                        acc[r] = _mm512_fmadd_ps(scale, isum, acc[r]);
                        macc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(rec.dsum(r)), macc[r]);
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
                    let per = 8 / ns;
                    for h in 0..ns {
                        // Rows interleaved as in the nibbles arm.
                        let mut isums = [_mm512_setzero_si512(); R];
                        for (k, wv) in wv.iter().enumerate().skip(h * per).take(per) {
                            for (r, isum) in isums.iter_mut().enumerate() {
                                *isum = _mm512_dpbusd_epi32(*isum, _mm512_set1_epi32(rec.qu(r, k)), *wv);
                            }
                        }
                        let wsum = _mm512_loadu_si512(w.wsum.as_ptr().add((b * ns + h) * GROUP) as *const _);
                        let d = _mm512_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP));
                        for (r, isum) in isums.iter().enumerate() {
                            let isum = _mm512_cvtepi32_ps(_mm512_sub_epi32(*isum, wsum));
                            let scale = _mm512_mul_ps(d, _mm512_set1_ps(rec.d(r)));
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
    pub(super) unsafe fn group_vnni<const R: usize>(pack: Pack, w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the
        // lengths group_times checked.
        unsafe {
            for half in 0..2 {
                let row0 = half * 8;
                let (mut acc, mut macc) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                for (b, rec) in a.records::<R>().enumerate() {
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
                        // Rows interleaved as in `group_512`.
                        let mut isums = [_mm256_setzero_si256(); R];
                        for (k, &v) in wv.iter().enumerate() {
                            for (r, isum) in isums.iter_mut().enumerate() {
                                *isum = _mm256_dpbusd_avx_epi32(*isum, v, _mm256_set1_epi32(rec.qs(r, k)));
                            }
                        }
                        for (r, &isum) in isums.iter().enumerate() {
                            let scale = _mm256_mul_ps(dv, _mm256_set1_ps(rec.d(r)));
                            acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
                            macc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(rec.dsum(r)), macc[r]);
                        }
                    } else {
                        let ns = pack.scales();
                        let per = 8 / ns;
                        let mut wv = [_mm256_setzero_si256(); 8];
                        for (k, v) in wv.iter_mut().enumerate() {
                            *v = _mm256_loadu_si256(q.add(b * 512 + k * 64 + row0 * 4) as *const _);
                        }
                        for h in 0..ns {
                            // Rows interleaved as in `group_512`.
                            let mut isums = [_mm256_setzero_si256(); R];
                            for (k, &v) in wv.iter().enumerate().skip(h * per).take(per) {
                                for (r, isum) in isums.iter_mut().enumerate() {
                                    *isum = _mm256_dpbusd_avx_epi32(*isum, _mm256_set1_epi32(rec.qu(r, k)), v);
                                }
                            }
                            let wsum = _mm256_loadu_si256(w.wsum.as_ptr().add((b * ns + h) * GROUP + row0) as *const _);
                            let d = _mm256_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                            for (r, &isum) in isums.iter().enumerate() {
                                let isum = _mm256_sub_epi32(isum, wsum);
                                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(rec.d(r))), _mm256_cvtepi32_ps(isum), acc[r]);
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
    pub(super) unsafe fn nibbles_avx2<const R: usize>(w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            let (mask, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
            for half in 0..2 {
                let row0 = half * 8;
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, rec) in a.records::<R>().enumerate() {
                    if half == 0 {
                        prefetch_ahead(Pack::Nibbles, w, b);
                    }
                    // Chunk by chunk: its low and high nibbles meet every
                    // row's activation words c and c + 4.
                    let mut pairs = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let raw = _mm256_loadu_si256(q.add(b * 256 + c * 64 + row0 * 4) as *const _);
                        let (lo, hi) = (_mm256_and_si256(raw, mask), _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask));
                        for (r, pairs) in pairs.iter_mut().enumerate() {
                            let low = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(rec.qs(r, c)));
                            let high = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(rec.qs(r, c + 4)));
                            *pairs = _mm256_add_epi16(*pairs, _mm256_add_epi16(low, high));
                        }
                    }
                    let dv = _mm256_loadu_ps(w.d.as_ptr().add(b * GROUP + row0));
                    for r in 0..R {
                        let isum = _mm256_madd_epi16(pairs[r], ones);
                        let scale = _mm256_mul_ps(dv, _mm256_set1_ps(rec.d(r)));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[r]);
                    }
                }
                let mut macc = [_mm256_setzero_ps(); R];
                for (b, rec) in a.records::<R>().enumerate() {
                    let mv = _mm256_loadu_ps(w.m.as_ptr().add(b * GROUP + row0));
                    for (r, macc) in macc.iter_mut().enumerate() {
                        *macc = _mm256_fmadd_ps(mv, _mm256_set1_ps(rec.dsum(r)), *macc);
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
    pub(super) unsafe fn bytes_avx2<const R: usize>(pack: Pack, w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
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
                for (b, rec) in a.records::<R>().enumerate() {
                    if half == 0 {
                        prefetch_ahead(pack, w, b);
                    }
                    for h in 0..ns {
                        let mut isum = [_mm256_setzero_si256(); R];
                        for k in h * per..(h + 1) * per {
                            let wk = _mm256_loadu_si256(q.add(b * 512 + k * 64 + row0 * 4) as *const _);
                            let magnitude = _mm256_abs_epi8(wk);
                            for (r, isum) in isum.iter_mut().enumerate() {
                                let signed = _mm256_sign_epi8(_mm256_set1_epi32(rec.qs(r, k)), wk);
                                *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed), ones));
                            }
                        }
                        let d = _mm256_loadu_ps(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                        for r in 0..R {
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(rec.d(r)));
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
    use super::{ActTile, GroupView, Pack, GROUP};
    use std::arch::aarch64::*;

    /// Baseline Advanced SIMD (no dot-product extension): the group in four
    /// quarters of four rows; products widen to i16, pairs of pairs to i32
    /// (at most 128·127·2 per i16 pair sum).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group<const R: usize>(pack: Pack, w: &GroupView, a: &ActTile, out: &mut [[f32; GROUP]]) {
        let q = w.qs.as_ptr();
        // SAFETY (all pointer reads): offsets stay within the lengths
        // group_times checked.
        unsafe {
            for quarter in 0..4 {
                let row0 = quarter * 4;
                let (mut acc, mut macc) = ([vdupq_n_f32(0.0); R], [vdupq_n_f32(0.0); R]);
                for (b, rec) in a.records::<R>().enumerate() {
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
                        let ad = rec.d(r);
                        let per = 8 / ns;
                        for h in 0..ns {
                            let mut isum = vdupq_n_s32(0);
                            for k in h * per..(h + 1) * per {
                                let act = vreinterpretq_s8_s32(vdupq_n_s32(rec.qs(r, k)));
                                let pairs = vpaddq_s16(vmull_s8(vget_low_s8(wv[k]), vget_low_s8(act)), vmull_high_s8(wv[k], act));
                                isum = vpadalq_s16(isum, pairs);
                            }
                            let d = vld1q_f32(w.d.as_ptr().add((b * ns + h) * GROUP + row0));
                            acc[r] = vfmaq_f32(acc[r], vmulq_n_f32(d, ad), vcvtq_f32_s32(isum));
                        }
                        if nibbles {
                            let m = vld1q_f32(w.m.as_ptr().add(b * GROUP + row0));
                            macc[r] = vfmaq_f32(macc[r], m, vdupq_n_f32(rec.dsum(r)));
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
    /// for each packing, one activation row at a time or eight at once.
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
            let aq: Vec<Vec<i8>> = (0..8)
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
            let ad: Vec<Vec<f32>> = (0..8).map(|_| (0..nb).map(|_| f(0.05)).collect()).collect();
            let dsum: Vec<Vec<f32>> = (0..8).map(|_| (0..nb).map(|_| f(2.0)).collect()).collect();
            let tile = |rows: &[usize]| {
                let mut data = vec![0u32; nb * ActTile::record_words(rows.len())];
                for (r, &row) in rows.iter().enumerate() {
                    for b in 0..nb {
                        let q: &[i8; 32] = aq[row][b * 32..(b + 1) * 32].try_into().unwrap();
                        ActTile::write(&mut data, rows.len(), b, r, q, ad[row][b], dsum[row][b]);
                    }
                }
                data
            };
            let data = tile(&[0, 1, 2, 3, 4, 5, 6, 7]);
            let rows = ActTile::new(8, &data);
            let mut want = [[0f32; GROUP]; 8];
            group_times::<8>(SimdLevel::Scalar, pack, &w, &rows, &mut want);
            for level in available_levels() {
                let mut eight = [[0f32; GROUP]; 8];
                group_times::<8>(level, pack, &w, &rows, &mut eight);
                for r in 0..8 {
                    let mut one = [[0f32; GROUP]];
                    let alone = tile(&[r]);
                    group_times::<1>(level, pack, &w, &ActTile::new(1, &alone), &mut one);
                    for j in 0..GROUP {
                        assert_eq!(eight[r][j].to_bits(), want[r][j].to_bits(), "{level:?} {pack:?} row {r} lane {j}");
                        assert_eq!(one[0][j].to_bits(), want[r][j].to_bits(), "{level:?} {pack:?} row {r} lane {j}, alone");
                    }
                }
            }
        }
    }
}
