//! Batched matrix × activations for quantized weights.

use super::dot::{dot_f32, simd_level, BlockKind, SimdLevel};
use super::group::{group_times, ActTile, GroupView, Pack, GROUP};
use crate::{ModelError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;

/// The GGUF type a weight matrix was loaded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Q4_0,
    Q4_1,
    Q8_0,
    /// Converted exactly to Q8_0's 8-bit blocks (a 5-bit quant less 16 is
    /// a byte).
    Q5_0,
    /// Converted exactly to 32-element blocks with f32 scale and minimum.
    Q4K,
    /// Converted exactly to 8-bit quants with one f32 scale per 16 elements.
    Q6K,
    /// Other quantized types (Q5_1, Q5_K, Q3_K, Q2_K, IQ…), requantized to
    /// Q8_0 at load: 8-bit steps add under 2 % to a 5-bit type's rounding
    /// error variance, where expanding to f32 would quadruple the memory.
    AsQ8_0,
    /// f32, f16 and bf16 weights (kept exact, as f32).
    F32,
}

/// A weight matrix of `rows` output features × `cols` input features in
/// the kernels' layout: quantized types packed in groups of [`GROUP`] rows
/// (see [`GroupView`]; the last group padded with zero rows), blocks of 32
/// weights with f32 scales (GGUF's f16 scales and K-quant sub-scales
/// multiplied out, which is exact) and the quants as stored; f32 row-major
/// otherwise.
pub struct QMatrix {
    wtype: WeightType,
    /// The block format the quants are in (None: f32 rows).
    kind: Option<BlockKind>,
    rows: usize,
    cols: usize,
    packed: Packed,
    f32s: Vec<f32>,
}

/// A matrix's storage in plain row-major blocks, for backends that upload
/// the weights as they are (the wgpu draft keeps them quantized on the GPU).
pub enum QStorage<'a> {
    /// Row-major blocks of 32 weights: `kind.scales()` scales per block,
    /// one minimum per block (Q4_1 only, else empty), `kind.quant_bytes()`
    /// quant bytes per block.
    Blocks { kind: BlockKind, d: Vec<f32>, m: Vec<f32>, qs: Vec<u8> },
    /// Row-major f32 values.
    F32(&'a [f32]),
}

const QK: usize = 32;
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Row-major blocks as parsed from GGUF: `scales` per block, minimums
/// (Q4_1 only), quant bytes.
#[derive(Default)]
struct RowBlocks {
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
}

/// The packed groups of a quantized matrix, in [`GroupView`]'s layout.
#[derive(Default)]
struct Packed {
    d: Vec<f32>,
    m: Vec<f32>,
    wsum: Vec<i32>,
    qs: Vec<u8>,
}

fn pack_of(kind: BlockKind) -> Pack {
    match kind {
        BlockKind::Q4_0 | BlockKind::Q4_1 => Pack::Nibbles,
        BlockKind::Q8_0 => Pack::Bytes,
        BlockKind::Q8Half => Pack::BytesHalf,
    }
}

impl QMatrix {
    /// Takes a 2-D GGUF tensor (`[rows, cols]` in candle's order).
    pub fn from_qtensor(name: &str, t: &QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2().map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")))?;
        let dtype = t.dtype();
        let (wtype, kind, block_bytes, block_len) = match dtype {
            GgmlDType::Q4_0 => (WeightType::Q4_0, BlockKind::Q4_0, 18, 32),
            GgmlDType::Q4_1 => (WeightType::Q4_1, BlockKind::Q4_1, 20, 32),
            GgmlDType::Q8_0 => (WeightType::Q8_0, BlockKind::Q8_0, 34, 32),
            GgmlDType::Q5_0 => (WeightType::Q5_0, BlockKind::Q8_0, 22, 32),
            GgmlDType::Q4K => (WeightType::Q4K, BlockKind::Q4_1, 144, 256),
            GgmlDType::Q6K => (WeightType::Q6K, BlockKind::Q8Half, 210, 256),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let values = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                return Ok(QMatrix::from_f32(rows, cols, values));
            }
            _ if cols % QK == 0 => {
                let q8 = QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?;
                return Ok(QMatrix { wtype: WeightType::AsQ8_0, ..QMatrix::from_qtensor(name, &q8)? });
            }
            _ => return Err(ModelError::Format(format!("tensor `{name}`: {dtype:?} with {cols} input features is not supported"))),
        };
        if cols % block_len != 0 {
            return Err(ModelError::Format(format!("tensor `{name}`: {cols} input features is not a multiple of the {dtype:?} block size {block_len}")));
        }
        let data = t.data()?;
        let n_blocks = rows * cols / block_len;
        if data.len() != n_blocks * block_bytes {
            return Err(ModelError::Format(format!("tensor `{name}`: {} bytes of {dtype:?} data for shape [{rows}, {cols}]", data.len())));
        }
        let n32 = rows * cols / QK;
        let mut blocks = RowBlocks { d: Vec::with_capacity(n32 * kind.scales()), m: Vec::new(), qs: Vec::with_capacity(n32 * kind.quant_bytes()) };
        for block in data.chunks_exact(block_bytes) {
            match wtype {
                WeightType::Q4_0 | WeightType::Q8_0 => {
                    blocks.d.push(f16_at(block, 0));
                    blocks.qs.extend_from_slice(&block[2..]);
                }
                WeightType::Q4_1 => {
                    blocks.d.push(f16_at(block, 0));
                    blocks.m.push(f16_at(block, 2));
                    blocks.qs.extend_from_slice(&block[4..]);
                }
                WeightType::Q5_0 => blocks.push_q5_0(block),
                WeightType::Q4K => blocks.push_q4k(block),
                WeightType::Q6K => blocks.push_q6k(block),
                WeightType::AsQ8_0 | WeightType::F32 => unreachable!(),
            }
        }
        let packed = Packed::new(kind, rows, cols, &blocks);
        Ok(QMatrix { wtype, kind: Some(kind), rows, cols, packed, f32s: vec![] })
    }

    /// Quantizes row-major f32 values to Q8_0 (GGUF's encoder; `cols` a
    /// multiple of 32).
    pub fn q8_0(name: &str, rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        let t = candle_core::Tensor::from_vec(values, (rows, cols), &Device::Cpu)?;
        QMatrix::from_qtensor(name, &QTensor::quantize(&t, GgmlDType::Q8_0)?)
    }

    /// Builds an f32 matrix from row-major values.
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols, "QMatrix::from_f32 shape");
        QMatrix { wtype: WeightType::F32, kind: None, rows, cols, packed: Packed::default(), f32s: values }
    }

    pub fn weight_type(&self) -> WeightType {
        self.wtype
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The weights in plain row-major blocks (rebuilt from the packing).
    pub fn storage(&self) -> QStorage<'_> {
        let Some(kind) = self.kind else {
            return QStorage::F32(&self.f32s);
        };
        let mut all = RowBlocks::default();
        for r in 0..self.rows {
            let row = self.row_blocks(kind, r);
            all.d.extend(row.d);
            all.m.extend(row.m);
            all.qs.extend(row.qs);
        }
        QStorage::Blocks { kind, d: all.d, m: all.m, qs: all.qs }
    }
    /// Bytes the kernels read for one full pass over the matrix.
    pub fn bytes(&self) -> usize {
        let p = &self.packed;
        (p.d.len() + p.m.len() + p.wsum.len() + self.f32s.len()) * 4 + p.qs.len()
    }

    /// Group `g` of the packing.
    fn group(&self, pack: Pack, g: usize) -> GroupView<'_> {
        let nb = self.cols / QK;
        let (qb, ns) = (pack.quant_bytes() * nb * GROUP, pack.scales() * nb * GROUP);
        let p = &self.packed;
        GroupView {
            qs: &p.qs[g * qb..(g + 1) * qb],
            d: &p.d[g * ns..(g + 1) * ns],
            m: if p.m.is_empty() { &[] } else { &p.m[g * nb * GROUP..(g + 1) * nb * GROUP] },
            wsum: if p.wsum.is_empty() { &[] } else { &p.wsum[g * ns..(g + 1) * ns] },
        }
    }

    /// Row `r` gathered back out of its group, in the source block format.
    fn row_blocks(&self, kind: BlockKind, r: usize) -> RowBlocks {
        let pack = pack_of(kind);
        let (nb, ns, qb) = (self.cols / QK, pack.scales(), pack.quant_bytes());
        let (g, j) = (r / GROUP, r % GROUP);
        let group = self.group(pack, g);
        let mut row = RowBlocks::default();
        for b in 0..nb {
            row.d.extend((0..ns).map(|h| group.d[(b * ns + h) * GROUP + j]));
            if kind == BlockKind::Q4_1 {
                row.m.push(group.m[b * GROUP + j]);
            }
            let chunks = &group.qs[b * qb * GROUP..(b + 1) * qb * GROUP];
            for c in 0..qb / 4 {
                row.qs.extend_from_slice(&chunks[c * 64 + j * 4..c * 64 + j * 4 + 4]);
            }
        }
        row
    }

    /// Dequantized row `r` (embedding lookups and reference checks).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        let Some(kind) = self.kind else {
            return self.f32s[r * c..(r + 1) * c].to_vec();
        };
        let row = self.row_blocks(kind, r);
        let mut out = Vec::with_capacity(c);
        for b in 0..c / QK {
            match kind {
                BlockKind::Q8_0 => out.extend(row.qs[b * 32..b * 32 + 32].iter().map(|&q| row.d[b] * q as i8 as f32)),
                BlockKind::Q8Half => out.extend(row.qs[b * 32..b * 32 + 32].iter().enumerate().map(|(i, &q)| row.d[2 * b + i / 16] * q as i8 as f32)),
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let (off, min) = if kind == BlockKind::Q4_0 { (8.0, 0.0) } else { (0.0, row.m[b]) };
                    let qs = &row.qs[b * 16..b * 16 + 16];
                    out.extend(qs.iter().map(|&q| row.d[b] * ((q & 0xF) as f32 - off) + min));
                    out.extend(qs.iter().map(|&q| row.d[b] * ((q >> 4) as f32 - off) + min));
                }
            }
        }
        out
    }

    /// `out[i, r] = Σ_c self[r, c] · x[i, c]` for `m` activation rows.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_parts(&[self], x, m)
    }

    /// `tile[i][j]` = row `GROUP·g + j` · activation row `i` (zero past the
    /// last weight row).
    fn group_times(&self, g: usize, x: &[f32], acts: Option<&QActivations>, tile: &mut [[f32; GROUP]]) {
        match (self.kind, acts) {
            (Some(kind), Some(acts)) => {
                let (level, pack) = (simd_level(), pack_of(kind));
                let w = self.group(pack, g);
                for (i, a) in acts.tiles() {
                    macro_rules! call {
                        ($($r:literal)*) => {
                            match a.rows() {
                                $($r => group_times::<$r>(level, pack, &w, &a, &mut tile[i..i + $r]),)*
                                _ => unreachable!("at most {} rows per call", tile_rows(level)),
                            }
                        };
                    }
                    call!(1 2 3 4 5 6 7 8);
                }
            }
            _ => {
                let c = self.cols;
                for j in 0..GROUP.min(self.rows - g * GROUP) {
                    let w = &self.f32s[(g * GROUP + j) * c..(g * GROUP + j + 1) * c];
                    for (i, out) in tile.iter_mut().enumerate() {
                        out[j] = dot_f32(w, &x[i * c..(i + 1) * c]);
                    }
                }
            }
        }
    }
}

impl RowBlocks {
    /// One Q4_K super-block (256 weights) as eight Q4_1-style blocks:
    /// w = (d·sc)·q − dmin·m, with d·sc and dmin·m exact in f32.
    fn push_q4k(&mut self, block: &[u8]) {
        let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
        let scales = &block[4..16];
        let qs = &block[16..144];
        for j in 0..8 {
            let (sc, min) = q4k_scale_min(j, scales);
            self.d.push(d * sc as f32);
            self.m.push(-(dmin * min as f32));
            // Sub-block j: low (even j) or high (odd j) nibbles of 32 bytes.
            let bytes = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
            let nib = |l: usize| if j % 2 == 0 { bytes[l] & 0xF } else { bytes[l] >> 4 };
            self.qs.extend((0..16).map(|l| nib(l) | (nib(l + 16) << 4)));
        }
    }

    /// One Q5_0 block (32 weights, w = d·(q − 16) with a 5-bit q: low
    /// nibbles of 16 bytes, fifth bits in a 32-bit word) as a Q8_0 block.
    fn push_q5_0(&mut self, block: &[u8]) {
        self.d.push(f16_at(block, 0));
        let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let qs = &block[6..22];
        let q = |i: usize| {
            let nibble = if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 };
            (nibble | ((((high >> i) & 1) as u8) << 4)) as i8 - 16
        };
        self.qs.extend((0..32).map(|i| q(i) as u8));
    }

    /// One Q6_K super-block (256 weights) as eight 8-bit blocks with one
    /// scale per 16 weights: w = (d·sc)·(q − 32).
    fn push_q6k(&mut self, block: &[u8]) {
        let (ql, qh, sc) = (&block[0..128], &block[128..192], &block[192..208]);
        let d = f16_at(block, 208);
        let mut values = [0i8; 256];
        for half in 0..2 {
            let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
            for l in 0..32 {
                let y = &mut values[half * 128..];
                y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        self.d.extend(sc.iter().map(|&s| d * s as i8 as f32));
        self.qs.extend(values.iter().map(|&v| v as u8));
    }
}

impl Packed {
    /// Regroups row-major blocks into groups of GROUP rows. Q4_0 becomes
    /// nibbles with the minimum −8d (d·(q − 8) = d·q − 8d; 8d is exact).
    fn new(kind: BlockKind, rows: usize, cols: usize, src: &RowBlocks) -> Packed {
        let pack = pack_of(kind);
        let (nb, ns, qb) = (cols / QK, pack.scales(), pack.quant_bytes());
        let groups = rows.div_ceil(GROUP);
        let mut p = Packed {
            d: vec![0.0; groups * nb * ns * GROUP],
            m: if pack == Pack::Nibbles { vec![0.0; groups * nb * GROUP] } else { vec![] },
            wsum: if pack == Pack::Nibbles { vec![] } else { vec![0; groups * nb * ns * GROUP] },
            qs: vec![0; groups * nb * qb * GROUP],
        };
        for r in 0..rows {
            let (g, j) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let (gb, rb) = (g * nb + b, r * nb + b);
                for h in 0..ns {
                    p.d[(gb * ns + h) * GROUP + j] = src.d[rb * ns + h];
                }
                let quants = &src.qs[rb * qb..(rb + 1) * qb];
                match kind {
                    BlockKind::Q4_0 => p.m[gb * GROUP + j] = -8.0 * src.d[rb],
                    BlockKind::Q4_1 => p.m[gb * GROUP + j] = src.m[rb],
                    BlockKind::Q8_0 | BlockKind::Q8Half => {
                        for (h, half) in quants.chunks(32 / ns).enumerate() {
                            p.wsum[(gb * ns + h) * GROUP + j] = 128 * half.iter().map(|&q| q as i8 as i32).sum::<i32>();
                        }
                    }
                }
                for (c, word) in quants.chunks_exact(4).enumerate() {
                    let at = gb * qb * GROUP + c * 64 + j * 4;
                    p.qs[at..at + 4].copy_from_slice(word);
                }
            }
        }
        p
    }
}

/// Where each output row starts, shared by tasks that write disjoint
/// column ranges.
struct OutRows(Vec<*mut f32>);
// SAFETY: tasks write disjoint elements (see matmul_parts_split) and the
// buffers outlive the parallel loop.
unsafe impl Sync for OutRows {}

impl OutRows {
    fn rows(&self) -> &[*mut f32] {
        &self.0
    }
}

/// Activation rows per kernel call. The rows of a call share each decoded
/// weight vector, so wider calls spend fewer instructions per product,
/// as far as the registers hold them: AVX-512's 32 hold eight decoded
/// weight vectors beside eight rows' two accumulators; AVX2's and NEON's
/// 16 hold four rows' (see `group`). On a 2-core Intel Xeon (Emerald
/// Rapids), eight rows instead of four made 40-row matmuls 1.10–1.23×
/// faster with the weights hot in L2 (`matmul_micro`: Q4_1 1536×576 and
/// 576×1536, the Q8_0 head), but not in the model, whose weights stream
/// from L3: there what pays is a 5-token pass making one call per group
/// instead of two, together with the weight prefetch (`group`).
fn tile_rows(level: SimdLevel) -> usize {
    if level == SimdLevel::Avx512Vnni {
        8
    } else {
        4
    }
}

/// Several matrices over the same input, as if their rows were stacked:
/// `out[i, ·]` is the concatenation of each part's outputs for row `i`
/// (fused Q/K/V or gate/up projections; parts may differ in type).
///
/// Activations are quantized once per call, into the kernels' tiles. Each
/// group of GROUP weight rows is decoded once per block for a tile of up to
/// eight activation rows (four without AVX-512) while it is hot in cache; groups are split across threads. `out[i, r]` depends
/// only on row `i` of `x` and weight row `r` (batch invariance): how rows
/// are grouped or split across threads changes no bit.
pub fn matmul_parts(parts: &[&QMatrix], x: &[f32], m: usize) -> Vec<f32> {
    matmul_parts_split(parts, x, &[m]).pop().expect("one output")
}

/// [`matmul_parts`] with the output rows handed back in consecutive runs of
/// `runs[k]` rows, each its own Vec (the output head's logits, one Vec per
/// sequence, written in place rather than copied out of one buffer).
pub fn matmul_parts_split(parts: &[&QMatrix], x: &[f32], runs: &[usize]) -> Vec<Vec<f32>> {
    let m: usize = runs.iter().sum();
    let cols = parts[0].cols;
    assert!(parts.iter().all(|p| p.cols == cols), "matmul_parts: parts differ in input features");
    assert_eq!(x.len(), m * cols, "matmul_parts: activation shape");
    let total: usize = parts.iter().map(|p| p.rows).sum();
    let acts = parts.iter().any(|p| p.kind.is_some()).then(|| quantize_activations(x, m, cols));
    // Work units: one group of one part, with the output column its first
    // row lands in.
    let mut units = Vec::new();
    let mut col = 0;
    for part in parts {
        units.extend((0..part.rows.div_ceil(GROUP)).map(|g| (*part, g, col + g * GROUP)));
        col += part.rows;
    }
    // Every element is written below (the units cover every column of every
    // row), so the buffers start uninitialized: no zeroing pass.
    let mut outs: Vec<Vec<f32>> = runs.iter().map(|&rows| Vec::with_capacity(rows * total)).collect();
    let mut starts = Vec::with_capacity(m);
    for (out, &rows) in outs.iter_mut().zip(runs) {
        let base = out.as_mut_ptr();
        starts.extend((0..rows).map(|i| base.wrapping_add(i * total)));
    }
    let dst = OutRows(starts);
    // About four tasks per thread.
    let per_task = units.len().div_ceil(4 * rayon::current_num_threads()).max(1);
    units.par_chunks(per_task).for_each(|units| {
        let mut tile = vec![[0f32; GROUP]; m];
        for &(part, g, col) in units {
            part.group_times(g, x, acts.as_ref(), &mut tile);
            let n = GROUP.min(part.rows - g * GROUP);
            for (row, &dst) in tile.iter().zip(dst.rows()) {
                // SAFETY: each output row has room for `total` elements and
                // units cover disjoint column ranges col..col + n ≤ total,
                // so no two tasks write the same element and all writes are
                // in bounds. A whole group is a fixed-size copy (one store,
                // not a memcpy call).
                unsafe {
                    if n == GROUP {
                        (dst.add(col) as *mut [f32; GROUP]).write_unaligned(*row);
                    } else {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(col), n);
                    }
                }
            }
        }
    });
    for (out, &rows) in outs.iter_mut().zip(runs) {
        // SAFETY: the loop above wrote all rows × total elements.
        unsafe { out.set_len(rows * total) };
    }
    outs
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scale and minimum of sub-block `j` from Q4_K's 12 packed 6-bit bytes.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Activation rows quantized to 8 bits in blocks of 32, once per pass,
/// stored as the tiles the kernels are called with ([`ActTile`]). Rows are
/// split evenly into as few tiles as [`tile_rows`] allows (40 rows: five
/// of eight; 5 rows: one of five, not four and one), so every call shares
/// the weight decode among as many rows as it can.
pub struct QActivations {
    cols: usize,
    /// Per tile: its first row, its rows, its first word in `data`.
    tiles: Vec<(usize, usize, usize)>,
    data: Vec<u32>,
}

impl QActivations {
    /// Zeroed storage for `m` rows, in the tiles of this machine's kernels.
    fn zeroed(m: usize, cols: usize) -> Self {
        let calls = m.div_ceil(tile_rows(simd_level()));
        let (mut tiles, mut row, mut at) = (Vec::with_capacity(calls), 0, 0);
        for c in 0..calls {
            let rows = (m - row).div_ceil(calls - c);
            tiles.push((row, rows, at));
            row += rows;
            at += cols / QK * ActTile::record_words(rows);
        }
        QActivations { cols, tiles, data: vec![0; at] }
    }

    /// Each tile with its first row.
    fn tiles(&self) -> impl Iterator<Item = (usize, ActTile<'_>)> {
        self.tiles.iter().map(|&(first, rows, at)| (first, ActTile::new(rows, &self.data[at..at + self.cols / QK * ActTile::record_words(rows)])))
    }
}

/// Symmetric 8-bit quantization of each 32-element block (scale = max|x|/127).
/// Row-local, so the result for a row never depends on the other rows.
pub fn quantize_activations(x: &[f32], m: usize, cols: usize) -> QActivations {
    quantize_activations_on(simd_level(), x, m, cols)
}

/// [`quantize_activations`] with this machine's quantizer or the scalar
/// one. Tiles are quantized in parallel when there are several: done on
/// one thread, a 40-row pass's quantizations left the other thread idle
/// for about 2 % of the pass.
fn quantize_activations_on(level: SimdLevel, x: &[f32], m: usize, cols: usize) -> QActivations {
    assert!(level == SimdLevel::Scalar || level == simd_level(), "quantizer for an undetected instruction set");
    assert_eq!(x.len(), m * cols);
    let mut acts = QActivations::zeroed(m, cols);
    let mut jobs = Vec::with_capacity(acts.tiles.len());
    let mut rest = acts.data.as_mut_slice();
    for &(first, rows, _) in &acts.tiles {
        let (tile, tail) = rest.split_at_mut(cols / QK * ActTile::record_words(rows));
        jobs.push((&x[first * cols..(first + rows) * cols], rows, tile));
        rest = tail;
    }
    let quantize = |(x, rows, tile): (&[f32], usize, &mut [u32])| match level {
        // SAFETY: AVX-512 support was detected (simd_level, asserted above).
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512Vnni => unsafe { quantize_tile_512(x, rows, tile) },
        // SAFETY: AVX2 support was detected (simd_level, asserted above).
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni => unsafe { quantize_tile_avx2(x, rows, tile) },
        _ => quantize_tile_body(x, rows, tile),
    };
    if jobs.len() > 1 {
        jobs.into_par_iter().for_each(quantize);
    } else {
        jobs.into_iter().for_each(quantize);
    }
    acts
}

/// The same steps on 512-bit registers, spelled out (the compiler leaves the
/// body's max and sum scalar): the max is exact in any order, the rounding
/// is the same multiply then add, the sum is of integers, so the bits match.
/// `x` holds the tile's `rows` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn quantize_tile_512(x: &[f32], rows: usize, tile: &mut [u32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / rows / QK;
    let (abs, magic, magic_bits) = (_mm512_set1_epi32(0x7FFF_FFFF), _mm512_set1_ps(ROUND_MAGIC), _mm512_set1_epi32(ROUND_MAGIC.to_bits() as i32));
    for (b, block) in x.chunks_exact(QK).enumerate() {
        // SAFETY: each block holds QK values.
        unsafe {
            let v = [_mm512_loadu_ps(block.as_ptr()), _mm512_loadu_ps(block.as_ptr().add(16))];
            let mags = v.map(|v| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(mags[0], mags[1])).max(0.0);
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|v| _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(v, inv), magic)), magic_bits));
            let mut bytes = [0i8; QK];
            for (h, q) in q.iter().enumerate() {
                _mm_storeu_si128(bytes.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(*q));
            }
            let dsum = d * _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1])) as f32;
            ActTile::write(tile, rows, b % nb, b / nb, &bytes, d, dsum);
        }
    }
}

/// The same code compiled for AVX2: every step is element-wise, a max (exact
/// in any order) or an integer sum, so the bits do not change.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_tile_avx2(x: &[f32], rows: usize, tile: &mut [u32]) {
    quantize_tile_body(x, rows, tile)
}

#[inline(always)]
fn quantize_tile_body(x: &[f32], rows: usize, tile: &mut [u32]) {
    let nb = x.len() / rows / QK;
    for (b, block) in x.chunks_exact(QK).enumerate() {
        // Fixed-size arrays and integer steps, so the compiler vectorizes.
        let block: &[f32; QK] = block.try_into().expect("chunks of QK");
        // The largest |v| (in any order: max is exact; NaN ignored as
        // f32::max does), written as the compare that vmaxps is.
        let mut lanes = [0f32; 8];
        for part in block.chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(part) {
                let a = v.abs();
                *l = if a > *l { a } else { *l };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; QK];
        for (q, &v) in q.iter_mut().zip(block) {
            // Round half to even by the 1.5·2²³ trick: v·inv + 1.5·2²³ is
            // that float plus the rounded integer, exact for |v·inv| ≤ 127,
            // and the integer is the difference of their bits (plain
            // arithmetic: no libm call, same on every target).
            *q = ((v * inv + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC.to_bits() as i32) as i8;
        }
        let sum: i32 = q.iter().map(|&q| q as i32).sum();
        ActTile::write(tile, rows, b % nb, b / nb, &q, d, d * sum as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::SessionRng::new(seed);
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    fn reference(weights: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|c| weights[r * cols + c] as f64 * x[i * cols + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    /// Quantizes random weights with candle (GGUF's own block encoders),
    /// then checks the kernel against an f64 matmul of the dequantized
    /// weights. The only error left is the 8-bit activation rounding.
    #[test]
    fn kernels_match_dequantized_reference_for_every_type() -> Result<()> {
        // 37 rows: not a multiple of the 8-row task unit; 6 activation rows:
        // one group of four and a tail of two.
        let (rows, cols, m) = (37, 96, 6);
        let x = values(m * cols, 2);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::F16, GgmlDType::F32, GgmlDType::Q4K, GgmlDType::Q6K] {
            let cols = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { 256 } else { cols };
            let x = if cols == 96 { x.clone() } else { values(m * cols, 3) };
            let w = Tensor::from_vec(values(rows * cols, 1), (rows, cols), &Device::Cpu)?;
            let q = QTensor::quantize(&w, dtype)?;
            let deq = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let mat = QMatrix::from_qtensor("w", &q)?;
            for r in [0, 5, 36] {
                assert_eq!(mat.dequantize_row(r), deq[r * cols..(r + 1) * cols].to_vec(), "{dtype:?} row {r}");
            }
            let got = mat.matmul(&x, m);
            let want = reference(&deq, rows, cols, &x, m);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            let tol = if mat.weight_type() == WeightType::F32 { 1e-4 } else { 0.02 };
            assert!(worst <= tol * scale, "{dtype:?}: worst error {worst} vs scale {scale}");
        }
        Ok(())
    }

    /// Quantized types without a kernel of their own run as Q8_0: each
    /// weight within half an 8-bit step of its dequantized value (and the
    /// step's rounding to f16: 127 steps of up to 2⁻¹¹ each), the matmul as
    /// close to the reference as the native types'.
    #[test]
    fn other_quantized_types_run_requantized_to_q8_0() -> Result<()> {
        let (rows, cols, m) = (19, 256, 3);
        let w = Tensor::from_vec(values(rows * cols, 8), (rows, cols), &Device::Cpu)?;
        let x = values(m * cols, 9);
        for dtype in [GgmlDType::Q5_1, GgmlDType::Q5K, GgmlDType::Q3K, GgmlDType::Q2K] {
            let q = QTensor::quantize(&w, dtype)?;
            let deq = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            let mat = QMatrix::from_qtensor("w", &q)?;
            assert_eq!(mat.weight_type(), WeightType::AsQ8_0, "{dtype:?}");
            for r in 0..rows {
                for (block, want) in mat.dequantize_row(r).chunks(QK).zip(deq[r * cols..(r + 1) * cols].chunks(QK)) {
                    let step = want.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                    let worst = block.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst <= 0.57 * step + 1e-6, "{dtype:?} row {r}: {worst} vs step {step}");
                }
            }
            let (got, want) = (mat.matmul(&x, m), reference(&deq, rows, cols, &x, m));
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst <= 0.02 * scale, "{dtype:?}: worst error {worst} vs scale {scale}");
        }
        Ok(())
    }

    /// This machine's activation quantizer and the plain body agree bit for
    /// bit (a block of zeros, tiny and large values included).
    #[test]
    fn activation_quantizers_agree_bit_for_bit() {
        let mut x = values(5 * 96, 7);
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e-30);
        x[96..128].iter_mut().for_each(|v| *v *= 1e30);
        let (fast, plain) = (quantize_activations(&x, 5, 96), quantize_activations_on(SimdLevel::Scalar, &x, 5, 96));
        assert_eq!(fast.tiles, plain.tiles);
        // Quants, scales and sums as stored words: equal bits.
        assert_eq!(fast.data, plain.data);
    }

    #[test]
    fn rows_do_not_depend_on_the_rest_of_the_batch() -> Result<()> {
        // 70 rows: a partial last group. 5, 19 and 24 activation rows: on
        // AVX-512 calls of 5; 7, 6 and 6; 8, 8 and 8 rows; on AVX2 and
        // NEON 3 and 2; 4, 4, 4, 4 and 3; six of 4.
        let (rows, cols) = (70, 256);
        let w = Tensor::from_vec(values(rows * cols, 4), (rows, cols), &Device::Cpu)?;
        let x = values(24 * cols, 5);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let mat = QMatrix::from_qtensor("w", &QTensor::quantize(&w, dtype)?)?;
            let alone: Vec<Vec<f32>> = (0..24).map(|i| mat.matmul(&x[i * cols..(i + 1) * cols], 1)).collect();
            for m in [5, 19, 24] {
                let all = mat.matmul(&x[..m * cols], m);
                for (i, one) in alone.iter().take(m).enumerate() {
                    assert_eq!(one, &all[i * rows..(i + 1) * rows], "{dtype:?} row {i} of {m}");
                }
            }
        }
        Ok(())
    }

    /// The wgpu backend uploads `storage()`: the packing must give back
    /// the rows exactly as GGUF stored them.
    #[test]
    fn storage_rebuilds_the_row_major_blocks() -> Result<()> {
        let (rows, cols) = (19, 64);
        let w = Tensor::from_vec(values(rows * cols, 6), (rows, cols), &Device::Cpu)?;
        let mat = QMatrix::from_qtensor("w", &QTensor::quantize(&w, GgmlDType::Q4_1)?)?;
        let QStorage::Blocks { kind, d, m, qs } = mat.storage() else { panic!("Q4_1 is stored in blocks") };
        assert_eq!((kind, d.len(), m.len(), qs.len()), (BlockKind::Q4_1, rows * 2, rows * 2, rows * 2 * 16));
        let q = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let raw = q.data()?;
        for (b, block) in raw.chunks_exact(20).enumerate() {
            assert_eq!((d[b], m[b]), (f16_at(block, 0), f16_at(block, 2)), "block {b} scales");
            assert_eq!(&qs[b * 16..(b + 1) * 16], &block[4..], "block {b} quants");
        }
        Ok(())
    }
}
