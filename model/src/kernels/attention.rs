//! Causal attention of a sequence's new tokens against its cache, for the
//! query heads that share one kv head, and the exponential it and the
//! SwiGLU activation use.
//!
//! Keys and values are cached in half precision (as llama.cpp does by
//! default: half the memory, and attention reads the whole cache every
//! pass), widened exactly to f32 as they are loaded. Keys are cached in
//! blocks of [`KEY_BLOCK`] positions, transposed (one
//! row of sixteen positions per key element), so a score block is sixteen
//! positions in one register: `s[j..j+16] += q[d] · K[d][j..j+16]`, one
//! fused multiply-add per element of the query, no horizontal sums, and
//! each loaded key row serves a tile of queries (the new tokens of a
//! verification and the heads sharing the kv head: five on AVX-512, four
//! on NEON and the portable path, one on AVX2, whose sixteen registers
//! hold one query's accumulators). The weighted sum of values runs sixteen
//! value elements per register, each loaded value serving the same tile.
//!
//! Every query's arithmetic is fixed whatever else shares its task:
//!
//! * score `j` = `(p0 + p1) + (p2 + p3)`, partial `p_{d mod 4}` a fused
//!   multiply-add chain over the query's elements `d` in order;
//! * softmax: scale, max (exact in any order), `e_j = exp(s_j − max)`, the
//!   sum over sixteen lanes (lane `j mod 16`, in `j` order) reduced by
//!   halving (8, 4, 2, 1);
//! * `out[d]` = a fused multiply-add chain `Σ_j e_j · v_j[d]` in `j` order,
//!   divided by the sum.
//!
//! The SIMD paths (AVX-512, AVX2, NEON) and the scalar twin run the same
//! generic body over sixteen-lane vectors ([`Lanes`]) whose lanes do the
//! same IEEE operations, so all give the same bits, for one token or many.

use super::dot::{simd_level, SimdLevel};
use half::f16;
use std::ops::Range;

/// Positions per transposed key block.
pub const KEY_BLOCK: usize = 16;

/// Key blocks (and spans of positions) walked per step for all queries.
const BLOCKS_PER_STEP: usize = 4;

/// One kv head's keys and values in a sequence's cache (see `KvCache`):
/// keys in blocks of [`KEY_BLOCK`] positions, block `b` holding `head_dim`
/// rows of [`KEY_BLOCK`] values (element `e` of position `16b + l` at
/// `16b · head_dim + 16e + l`); values row-major (position `j`'s at
/// `j · head_dim`).
pub struct KvView<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    pub head_dim: usize,
}

/// Where a call's query rows lie in their run: the run's rows are its
/// `n` tokens' query vectors for the `group` query heads that share a kv
/// head, token-major, and row `r` (token `r / group`) sees positions
/// `0..first_visible + r / group` (its own included).
#[derive(Clone, Copy, Debug)]
pub struct RunRows {
    pub group: usize,
    /// The run's row that the call's first query is.
    pub first_row: usize,
    pub first_visible: usize,
}

/// How a query's dot product with a key becomes its score: times
/// `scale`, then, with `softcap` (Gemma 2), squashed into (−cap, cap) as
/// `cap · tanh(score / cap)`; with `window` (Gemma 3's local layers), only
/// the last `window` positions a query sees count, the others weigh 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scoring {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

impl Scoring {
    pub fn plain(scale: f32) -> Self {
        Scoring { scale, softcap: None, window: None }
    }
}

/// Attention of some consecutive rows of a run of one sequence's new
/// tokens (`queries`: vectors of `head_dim`) against its cache. `out` has
/// the queries' shape. With `share`, a call over a long context offers
/// parts of its work to idle threads: for passes of few calls (each part
/// is less efficient than the whole when no thread takes it).
pub fn attend(queries: &[f32], at: RunRows, kv: &KvView, scale: Scoring, share: bool, out: &mut [f32]) {
    let RunRows { group, first_row, first_visible } = at;
    let hd = kv.head_dim;
    assert!(group > 0 && hd > 0 && !queries.is_empty() && queries.len().is_multiple_of(hd) && out.len() == queries.len());
    let rows = queries.len() / hd;
    let visible = first_visible + (first_row + rows - 1) / group;
    assert!(first_visible > 0, "attend: every token sees itself");
    assert!(kv.keys.len() >= visible.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd && kv.values.len() >= visible * hd, "attend: cache shorter than the tokens see");
    let task = Task { queries, group, first_row, first_visible, kv, scale };
    // Only on a pool thread: from outside, a join hands the work to the
    // pool and waits (an attention call 29 → 86 µs).
    let share = share && visible >= SHARE_FROM && rayon::current_thread_index().is_some();
    run_task(&task, out, share, &|part| dispatch(&task, part));
}

/// Positions a call's rows must see before its parts are offered to idle
/// threads: below it, a steal costs about what it balances (one sequence
/// after 300 positions: about even).
const SHARE_FROM: usize = 256;

/// One part on this machine's path.
fn dispatch(t: &Task, part: Part) {
    match simd_level() {
        // SAFETY (both arms): the instruction sets were detected at
        // runtime (simd_level); extents were checked by attend.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => unsafe { x86::part_512(t, part) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni => unsafe { x86::part_avx2(t, part) },
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => unsafe { neon::part_neon(t, part) },
        // SAFETY: Scalar's operations are plain array arithmetic.
        _ => unsafe { part_body::<Scalar>(t, part) },
    }
}

/// A task's parts in order: scores, softmax, weighted sums. With `share`,
/// the scores run as two halves of the key blocks and the weighted sums
/// as two halves of the head, each pair offered to an idle thread
/// (`rayon::join`): one sequence's attention over a long context is
/// three tasks (its kv heads), and two threads otherwise split them two
/// to one.
fn run_task(t: &Task, out: &mut [f32], share: bool, run: &(dyn Fn(Part) + Sync)) {
    let x = t.extent();
    let mut e = vec![0f32; x.rows * x.padded];
    let mut sums = vec![0f32; x.rows];
    let scores = Shared(e.as_mut_ptr());
    let part = |blocks| Part::Scores { blocks, e: scores };
    if share {
        let mid = x.blocks / 2;
        rayon::join(|| run(part(0..mid)), || run(part(mid..x.blocks)));
    } else {
        run(part(0..x.blocks));
    }
    run(Part::Softmax { e: &mut e, sums: &mut sums });
    let (chunks, tail) = (t.kv.head_dim / KEY_BLOCK, !t.kv.head_dim.is_multiple_of(KEY_BLOCK));
    let (e, sums, out) = (&e, &sums, Shared(out.as_mut_ptr()));
    let part = |chunks, tail| Part::Weighted { chunks, tail, e, sums, out };
    if share && chunks >= 2 {
        let mid = chunks / 2;
        rayon::join(|| run(part(0..mid, false)), || run(part(mid..chunks, tail)));
    } else {
        run(part(0..chunks, tail));
    }
}

/// Rows a call of [`attend`] can be split into, without the parts widening
/// more keys and values between them than the whole call would: the tile
/// of rows this machine's path walks together (every tile widens what it
/// reads on its own), four at least (the AVX2 path's one-row tiles share
/// nothing, but a call per row costs more in overhead than it balances).
pub fn attention_split_rows() -> usize {
    let tile = match simd_level() {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => <x86::Zmm as Lanes>::TILE,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni => <x86::Ymm2 as Lanes>::TILE,
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => <neon::Q4 as Lanes>::TILE,
        _ => Scalar::TILE,
    };
    tile * 4usize.div_ceil(tile)
}

struct Task<'a> {
    queries: &'a [f32],
    group: usize,
    /// The run's row that `queries` starts at.
    first_row: usize,
    first_visible: usize,
    kv: &'a KvView<'a>,
    scale: Scoring,
}

/// Sixteen f32 lanes; every operation is lane-wise IEEE arithmetic, so an
/// implementation over one 512-bit register, two 256-bit or four 128-bit
/// ones or a plain array gives the same bits.
trait Lanes: Copy {
    /// Query rows per tile (what the registers hold: 4 partial sums or up
    /// to 4 value chunks per row). At most 6.
    const TILE: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// Sixteen values from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// Sixteen half-precision values from `p`, widened (exact).
    unsafe fn load_f16(p: *const f16) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a · b + c`, rounded once.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
}

#[derive(Clone, Copy)]
struct Scalar([f32; 16]);

impl Lanes for Scalar {
    const TILE: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Scalar([x; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees sixteen readable values.
        Scalar(unsafe { (p as *const [f32; 16]).read_unaligned() })
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self {
        // SAFETY: the caller guarantees sixteen readable values.
        Scalar(unsafe { (p as *const [f16; 16]).read_unaligned() }.map(f16::to_f32))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees sixteen writable values.
        unsafe { (p as *mut [f32; 16]).write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Scalar(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Scalar(std::array::from_fn(|l| a.0[l] + b.0[l]))
    }
}

/// The shape of one task: its rows, the key blocks they see, and the
/// padded width of a score row.
struct Extent {
    rows: usize,
    blocks: usize,
    padded: usize,
}

impl Task<'_> {
    fn visible(&self, r: usize) -> usize {
        self.first_visible + (self.first_row + r) / self.group
    }

    fn extent(&self) -> Extent {
        let rows = self.queries.len() / self.kv.head_dim;
        let blocks = self.visible(rows - 1).div_ceil(KEY_BLOCK);
        Extent { rows, blocks, padded: blocks * KEY_BLOCK }
    }
}

/// A buffer that parts of one task running at once write at disjoint
/// places (score blocks; output elements).
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: parts write disjoint elements (see `Part`), and a part only runs
// while the buffer it points into is borrowed by `attend`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// One part of a task (see `attend`); every part computes its elements
/// with the arithmetic the module notes fix, so how a task is cut into
/// parts changes no bit.
enum Part<'a> {
    /// Scores of key blocks `blocks` into the score rows (`rows × padded`).
    Scores { blocks: Range<usize>, e: Shared },
    /// Each score row to exponentials in place, and its sum.
    Softmax { e: &'a mut [f32], sums: &'a mut [f32] },
    /// Output elements of the head's sixteen-element chunks `chunks` (and
    /// the tail past the last whole chunk, with `tail`) for every row:
    /// the weighted sums of values, divided by the row's sum.
    Weighted { chunks: Range<usize>, tail: bool, e: &'a [f32], sums: &'a [f32], out: Shared },
}

/// One part over lanes `V`.
#[inline(always)]
unsafe fn part_body<V: Lanes>(t: &Task, part: Part) {
    let x = t.extent();
    match part {
        // SAFETY (both SIMD parts): the caller's buffers have the
        // extent's shape; extents of the cache were checked by attend.
        Part::Scores { blocks, e } => unsafe { scores_part::<V>(t, &x, blocks, e.0) },
        Part::Softmax { e, sums } => softmax(t, &x, e, sums),
        Part::Weighted { chunks, tail, e, sums, out } => unsafe { weighted_part::<V>(t, &x, chunks, tail, e, sums, out.0) },
    }
}

/// Key blocks outermost, a few at a time, so the tiles of queries after
/// the first find them in L1.
#[inline(always)]
unsafe fn scores_part<V: Lanes>(t: &Task, x: &Extent, blocks: Range<usize>, e: *mut f32) {
    for b0 in blocks.clone().step_by(BLOCKS_PER_STEP) {
        let step = b0..(b0 + BLOCKS_PER_STEP).min(blocks.end);
        let mut r = 0;
        while r < x.rows {
            let take = (x.rows - r).min(V::TILE);
            // SAFETY: rows r..r + take exist; key blocks 0..blocks were
            // checked by attend.
            unsafe {
                match take {
                    6 => scores::<V, 6>(t, r, step.clone(), x.padded, e),
                    5 => scores::<V, 5>(t, r, step.clone(), x.padded, e),
                    4 => scores::<V, 4>(t, r, step.clone(), x.padded, e),
                    3 => scores::<V, 3>(t, r, step.clone(), x.padded, e),
                    2 => scores::<V, 2>(t, r, step.clone(), x.padded, e),
                    _ => scores::<V, 1>(t, r, step.clone(), x.padded, e),
                }
            }
            r += take;
        }
    }
}

/// Scores to exponentials in place; lanes past a row's visible positions
/// become zero.
#[inline(always)]
fn softmax(t: &Task, x: &Extent, e: &mut [f32], sums: &mut [f32]) {
    for (r, (row, sum)) in e.chunks_exact_mut(x.padded).zip(sums.iter_mut()).enumerate() {
        let (seen, unseen) = row.split_at_mut(t.visible(r));
        match t.scale.softcap {
            None => seen.iter_mut().for_each(|s| *s *= t.scale.scale),
            Some(cap) => seen.iter_mut().for_each(|s| *s = cap * (*s * t.scale.scale / cap).tanh()),
        }
        unseen.fill(f32::NEG_INFINITY);
        // Positions before the window: scored (the key loops stay the
        // same for every row), then left out of the max and weighted 0.
        let outside = t.scale.window.map_or(0, |w| t.visible(r).saturating_sub(w));
        row[..outside].fill(f32::NEG_INFINITY);
        // The max is exact in any order: sixteen lanes over whole blocks,
        // written as the compare that vmaxps is, so it vectorizes (NaN
        // scores are not expected; a NaN is skipped rather than propagated).
        let mut lanes = [f32::NEG_INFINITY; KEY_BLOCK];
        for block in row.chunks_exact(KEY_BLOCK) {
            let block: &[f32; KEY_BLOCK] = block.try_into().expect("whole blocks");
            for (l, &v) in lanes.iter_mut().zip(block) {
                *l = if v > *l { v } else { *l };
            }
        }
        let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let (seen, unseen) = row.split_at_mut(t.visible(r));
        for s in seen.iter_mut() {
            *s = exp(*s - max);
        }
        unseen.fill(0.0);
        row[..outside].fill(0.0);
        let mut lanes = [0f32; KEY_BLOCK];
        for block in row.chunks_exact(KEY_BLOCK) {
            let block: &[f32; KEY_BLOCK] = block.try_into().expect("whole blocks");
            for (l, &v) in lanes.iter_mut().zip(block) {
                *l += v;
            }
        }
        for width in [8, 4, 2, 1] {
            for l in 0..width {
                lanes[l] += lanes[l + width];
            }
        }
        *sum = lanes[0];
    }
}

/// Weighted sums, sixteen elements of the head at a time (a scalar chain
/// for a head_dim tail), then the division. Positions outermost, a span at
/// a time (the chains go on from what the previous span stored: loads and
/// stores are exact).
#[inline(always)]
unsafe fn weighted_part<V: Lanes>(t: &Task, x: &Extent, chunks: Range<usize>, tail: bool, e: &[f32], sums: &[f32], out: *mut f32) {
    let hd = t.kv.head_dim;
    let dims = chunks.start * KEY_BLOCK..if tail { hd } else { chunks.end * KEY_BLOCK };
    // SAFETY: out holds rows × hd elements; this part's are `dims` of
    // each row, which no other part touches while it runs.
    let mine = |r: usize| unsafe { std::slice::from_raw_parts_mut(out.add(r * hd + dims.start), dims.len()) };
    for r in 0..x.rows {
        mine(r).fill(0.0);
    }
    for j0 in (0..t.visible(x.rows - 1)).step_by(BLOCKS_PER_STEP * KEY_BLOCK) {
        let span = j0..j0 + BLOCKS_PER_STEP * KEY_BLOCK;
        let mut r = 0;
        while r < x.rows {
            let take = (x.rows - r).min(V::TILE);
            // SAFETY: as above; values of every visible position exist.
            unsafe {
                match take {
                    6 => weighted::<V, 6>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                    5 => weighted::<V, 5>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                    4 => weighted::<V, 4>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                    3 => weighted::<V, 3>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                    2 => weighted::<V, 2>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                    _ => weighted::<V, 1>(t, r, chunks.clone(), span.clone(), x.padded, e, out),
                }
            }
            r += take;
        }
    }
    if tail {
        let kv = t.kv;
        for r in 0..x.rows {
            for d in hd / KEY_BLOCK * KEY_BLOCK..hd {
                let mut acc = 0f32;
                for (j, &w) in e[r * x.padded..][..t.visible(r)].iter().enumerate() {
                    acc = w.mul_add(kv.values[j * hd + d].to_f32(), acc);
                }
                mine(r)[d - dims.start] = acc;
            }
        }
    }
    for (r, &sum) in sums.iter().enumerate() {
        for v in mine(r) {
            *v /= sum;
        }
    }
}

/// Scores of query rows `r0..r0 + R` against key blocks `blocks`, into
/// `e` (rows of `padded` values).
#[inline(always)]
unsafe fn scores<V: Lanes, const R: usize>(t: &Task, r0: usize, blocks: Range<usize>, padded: usize, e: *mut f32) {
    let (kv, hd) = (t.kv, t.kv.head_dim);
    let q: [&[f32]; R] = std::array::from_fn(|i| &t.queries[(r0 + i) * hd..(r0 + i + 1) * hd]);
    let body = hd / 4 * 4;
    for b in blocks {
        let base = &kv.keys[b * KEY_BLOCK * hd..];
        // SAFETY (loads and stores): key rows offset..offset + hd of block b
        // and score block b of each row are in bounds (checked by attend).
        unsafe {
            let mut acc = [[V::zero(); 4]; R];
            let mut d = 0;
            while d < body {
                for p in 0..4 {
                    let row = V::load_f16(base.as_ptr().add((d + p) * KEY_BLOCK));
                    for (acc, q) in acc.iter_mut().zip(&q) {
                        acc[p] = V::fma(V::splat(*q.get_unchecked(d + p)), row, acc[p]);
                    }
                }
                d += 4;
            }
            // A head_dim tail: element body + p goes to partial p.
            // Constant partial indices: with an index computed at run time
            // the accumulators lived in memory, and every multiply-add of
            // the loop above stored its result there (ragged attention
            // 1.2–1.3× slower on a 2-core Intel Xeon, Emerald Rapids).
            for p in 0..3 {
                if body + p < hd {
                    let row = V::load_f16(base.as_ptr().add((body + p) * KEY_BLOCK));
                    for (acc, q) in acc.iter_mut().zip(&q) {
                        let part = match p {
                            0 => &mut acc[0],
                            1 => &mut acc[1],
                            _ => &mut acc[2],
                        };
                        *part = V::fma(V::splat(q[body + p]), row, *part);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let s = V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3]));
                s.store(e.add((r0 + i) * padded + b * KEY_BLOCK));
            }
        }
    }
}

/// Adds Σ_j e_j · v_j over the positions of `span` each row sees to `out`
/// rows `r0..r0 + R`, head chunks `chunks`.
#[inline(always)]
unsafe fn weighted<V: Lanes, const R: usize>(t: &Task, r0: usize, chunks: Range<usize>, span: Range<usize>, padded: usize, e: &[f32], out: *mut f32) {
    let mut c = chunks.start;
    // Up to four chunks at once: R × 4 independent accumulator chains keep
    // the FMA units busy.
    while c < chunks.end {
        let take = (chunks.end - c).min(4);
        // SAFETY: chunks c..c + take lie within the head.
        unsafe {
            match take {
                4 => weighted_chunks::<V, R, 4>(t, r0, c, span.clone(), padded, e, out),
                3 => weighted_chunks::<V, R, 3>(t, r0, c, span.clone(), padded, e, out),
                2 => weighted_chunks::<V, R, 2>(t, r0, c, span.clone(), padded, e, out),
                _ => weighted_chunks::<V, R, 1>(t, r0, c, span.clone(), padded, e, out),
            }
        }
        c += take;
    }
}

#[inline(always)]
unsafe fn weighted_chunks<V: Lanes, const R: usize, const C: usize>(
    t: &Task,
    r0: usize,
    c0: usize,
    span: Range<usize>,
    padded: usize,
    e: &[f32],
    out: *mut f32,
) {
    let (kv, hd) = (t.kv, t.kv.head_dim);
    let visible: [usize; R] = std::array::from_fn(|i| t.visible(r0 + i).min(span.end));
    let w: [&[f32]; R] = std::array::from_fn(|i| &e[(r0 + i) * padded..(r0 + i + 1) * padded]);
    let at = |j: usize| j * hd + c0 * KEY_BLOCK;
    let dst = |i: usize, c: usize| (r0 + i) * hd + (c0 + c) * KEY_BLOCK;
    // SAFETY (loads and stores): positions below each row's visible count
    // and elements within the head are in bounds (checked by attend); out
    // rows r0..r0 + R exist.
    unsafe {
        let mut acc: [[V; C]; R] = std::array::from_fn(|i| std::array::from_fn(|c| V::load(out.add(dst(i, c)))));
        // Positions every row sees, each loaded value serving all R rows;
        // then each row's remaining positions, in order.
        for j in span.start..visible[0] {
            let v: [V; C] = std::array::from_fn(|c| V::load_f16(kv.values.as_ptr().add(at(j) + c * KEY_BLOCK)));
            for (acc, w) in acc.iter_mut().zip(&w) {
                let w = V::splat(*w.get_unchecked(j));
                for (acc, &v) in acc.iter_mut().zip(&v) {
                    *acc = V::fma(w, v, *acc);
                }
            }
        }
        for i in 0..R {
            for j in span.start.max(visible[0])..visible[i] {
                let w = V::splat(w[i][j]);
                for (c, acc) in acc[i].iter_mut().enumerate() {
                    *acc = V::fma(w, V::load_f16(kv.values.as_ptr().add(at(j) + c * KEY_BLOCK)), *acc);
                }
            }
            for (c, acc) in acc[i].iter().enumerate() {
                acc.store(out.add(dst(i, c)));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{f16, part_body, Lanes, Part, Task};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Zmm(__m512);

    impl Lanes for Zmm {
        const TILE: usize = 5;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Zmm(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Zmm(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Zmm(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            Zmm(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Zmm(unsafe { _mm512_fmadd_ps(a.0, b.0, c.0) })
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Zmm(unsafe { _mm512_add_ps(a.0, b.0) })
        }
    }

    /// Lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub(super) struct Ymm2(__m256, __m256);

    impl Lanes for Ymm2 {
        // Sixteen registers: one query row's four partial scores (or four
        // value chunks) take eight. A tile of four rows spilled every
        // accumulator; one row, re-reading the keys from L1 for each query,
        // made the ragged 8×5 pass ~15 % faster on an AVX2-only AMD EPYC.
        const TILE: usize = 1;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Ymm2(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Ymm2(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Ymm2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            unsafe { Ymm2(_mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)), _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(8), self.1);
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { Ymm2(_mm256_fmadd_ps(a.0, b.0, c.0), _mm256_fmadd_ps(a.1, b.1, c.1)) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Ymm2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1)) }
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn part_512(t: &Task, part: Part) {
        // SAFETY: AVX-512F was detected by the caller.
        unsafe { part_body::<Zmm>(t, part) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn part_avx2(t: &Task, part: Part) {
        // SAFETY: AVX2, FMA and F16C were detected by the caller.
        unsafe { part_body::<Ymm2>(t, part) }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{f16, part_body, Lanes, Part, Task};
    use std::arch::aarch64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Q4([float32x4_t; 4]);

    impl Lanes for Q4 {
        const TILE: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Q4([vdupq_n_f32(0.0); 4]) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Q4([vdupq_n_f32(x); 4]) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Q4(std::array::from_fn(|i| vld1q_f32(p.add(4 * i)))) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            // Rust's NEON half-precision types are not stable: widen with
            // `half` (exact, as the hardware conversion is), then load.
            let wide = unsafe { (p as *const [f16; 16]).read_unaligned() }.map(f16::to_f32);
            unsafe { Self::load(wide.as_ptr()) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            for (i, v) in self.0.into_iter().enumerate() {
                unsafe { vst1q_f32(p.add(4 * i), v) }
            }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            // vfmaq_f32(c, a, b) = c + a·b, rounded once.
            unsafe { Q4(std::array::from_fn(|i| vfmaq_f32(c.0[i], a.0[i], b.0[i]))) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            unsafe { Q4(std::array::from_fn(|i| vaddq_f32(a.0[i], b.0[i]))) }
        }
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn part_neon(t: &Task, part: Part) {
        // SAFETY: NEON was detected by the caller.
        unsafe { part_body::<Q4>(t, part) }
    }
}

/// `out = silu(gate) · up`, element-wise.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && out.len() == gate.len());
    #[cfg(target_arch = "x86_64")]
    match simd_level() {
        // SAFETY (both arms): the instruction set was detected at runtime
        // (simd_level).
        SimdLevel::Avx512Vnni => return unsafe { silu_mul_512(gate, up, out) },
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni => return unsafe { silu_mul_avx2(gate, up, out) },
        _ => {}
    }
    silu_mul_body(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_body(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn silu_mul_512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_body(gate, up, out)
}

/// Element-wise, so every vector width gives the same bits.
#[inline(always)]
fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
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

    /// This machine's SwiGLU path and the plain body agree bit for bit.
    #[test]
    fn silu_mul_paths_agree() {
        let mut rng = crate::SessionRng::new(3);
        let gate: Vec<f32> = (0..1000).map(|_| (rng.next_f64() as f32 - 0.5) * 40.0).collect();
        let up: Vec<f32> = (0..1000).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let (mut fast, mut plain) = (vec![0f32; 1000], vec![0f32; 1000]);
        silu_mul(&gate, &up, &mut fast);
        silu_mul_body(&gate, &up, &mut plain);
        assert_eq!(fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// Keys of `n` positions (`hd` each, row-major) in the cache's
    /// transposed blocks.
    fn blocked(keys: &[f16], hd: usize) -> Vec<f16> {
        let n = keys.len() / hd;
        let mut out = vec![f16::ZERO; n.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd];
        for (j, key) in keys.chunks_exact(hd).enumerate() {
            for (e, &v) in key.iter().enumerate() {
                out[j / KEY_BLOCK * KEY_BLOCK * hd + e * KEY_BLOCK + j % KEY_BLOCK] = v;
            }
        }
        out
    }

    /// This machine's SIMD path and the scalar twin agree bit for bit; a
    /// token's output does not depend on how many tokens share the call;
    /// and both match a direct f64 softmax to float rounding. Head dims 64
    /// and 20 (a tail past sixteen and past four), 37 positions (a partial
    /// block) and 150 (several steps of blocks and spans), seven tokens of
    /// three heads (whole tiles and a tail), in one call or split by rows.
    #[test]
    fn attention_paths_agree_are_batch_invariant_and_match_a_reference() {
        let mut rng = crate::SessionRng::new(9);
        let mut f = || rng.next_f64() as f32 * 2.0 - 1.0;
        for (hd, n) in [(64, 37), (20, 37), (64, 150)] {
            let (group, tokens) = (3, 7);
            let raw_keys: Vec<f16> = (0..n * hd).map(|_| f16::from_f32(3.0 * f())).collect();
            let keys = blocked(&raw_keys, hd);
            let values: Vec<f16> = (0..n * hd).map(|_| f16::from_f32(f())).collect();
            let queries: Vec<f32> = (0..tokens * group * hd).map(|_| f()).collect();
            let kv = KvView { keys: &keys, values: &values, head_dim: hd };
            let first = n - tokens + 1;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut got = vec![0f32; queries.len()];
            attend(&queries, RunRows { group, first_row: 0, first_visible: first }, &kv, Scoring::plain(0.25), false, &mut got);
            let task = Task { queries: &queries, group, first_row: 0, first_visible: first, kv: &kv, scale: Scoring::plain(0.25) };
            let mut plain = vec![1f32; queries.len()];
            // SAFETY: plain array arithmetic.
            run_task(&task, &mut plain, false, &|part| unsafe { part_body::<Scalar>(&task, part) });
            assert_eq!(bits(&got), bits(&plain), "hd {hd}: SIMD and scalar differ");
            let mut shared = vec![1f32; queries.len()];
            run_task(&task, &mut shared, true, &|part| dispatch(&task, part));
            assert_eq!(bits(&shared), bits(&got), "hd {hd}: shared between threads vs not");
            let per_token = group * hd;
            for t in 0..tokens {
                let mut one = vec![0f32; per_token];
                attend(
                    &queries[t * per_token..(t + 1) * per_token],
                    RunRows { group, first_row: 0, first_visible: first + t },
                    &kv,
                    Scoring::plain(0.25),
                    false,
                    &mut one,
                );
                assert_eq!(bits(&one), bits(&got[t * per_token..(t + 1) * per_token]), "hd {hd} token {t}: alone vs batched");
            }
            // Split into calls of some rows each, cutting across tokens.
            let rows = tokens * group;
            for split in [1, 2, 4, 5, attention_split_rows()] {
                let mut parts = vec![0f32; queries.len()];
                for r0 in (0..rows).step_by(split) {
                    let r = r0 * hd..(r0 + split).min(rows) * hd;
                    attend(&queries[r.clone()], RunRows { group, first_row: r0, first_visible: first }, &kv, Scoring::plain(0.25), false, &mut parts[r]);
                }
                assert_eq!(bits(&parts), bits(&got), "hd {hd}: calls of {split} rows vs one call");
            }
            for r in 0..tokens * group {
                let q = &queries[r * hd..(r + 1) * hd];
                let visible = first + r / group;
                let s: Vec<f64> = (0..visible).map(|j| 0.25 * (0..hd).map(|d| q[d] as f64 * raw_keys[j * hd + d].to_f64()).sum::<f64>()).collect();
                let max = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                for d in 0..hd {
                    let want: f64 = (0..visible).map(|j| (s[j] - max).exp() / z * values[j * hd + d].to_f64()).sum();
                    assert!((got[r * hd + d] as f64 - want).abs() < 1e-5, "hd {hd} row {r} dim {d}: {} vs {want}", got[r * hd + d]);
                }
            }
        }
    }
}
