//! Batched matrix × activations for quantized weights.

use super::dot::{dot_f32, dot_rows, ActRow, BlockKind, BlockRow};
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
    /// Converted exactly to 32-element blocks with f32 scale and minimum.
    Q4K,
    /// Converted exactly to 8-bit quants with one f32 scale per 16 elements.
    Q6K,
    /// f32 and f16 weights, and quantization types without a dedicated
    /// kernel yet (dequantized once at load).
    F32,
}

/// A weight matrix of `rows` output features × `cols` input features,
/// row-major, in the kernels' layout: blocks of 32 weights with f32 scales
/// (GGUF's f16 scales and K-quant sub-scales multiplied out, which is exact)
/// and the quants as stored.
pub struct QMatrix {
    wtype: WeightType,
    kind: Option<BlockKind>,
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
    f32s: Vec<f32>,
}

/// A matrix's storage in the kernels' layout, for backends that upload the
/// weights as they are (the wgpu draft keeps them quantized on the GPU).
pub enum QStorage<'a> {
    /// Row-major blocks of 32 weights: `kind.scales()` scales per block,
    /// one minimum per block (Q4_1 only, else empty), `kind.quant_bytes()`
    /// quant bytes per block.
    Blocks { kind: BlockKind, d: &'a [f32], m: &'a [f32], qs: &'a [u8] },
    /// Row-major f32 values.
    F32(&'a [f32]),
}

const QK: usize = 32;
const ROUND_MAGIC: f32 = 12_582_912.0;

impl QMatrix {
    /// Takes a 2-D GGUF tensor (`[rows, cols]` in candle's order).
    pub fn from_qtensor(name: &str, t: &QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2().map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")))?;
        let dtype = t.dtype();
        let (wtype, kind, block_bytes, block_len) = match dtype {
            GgmlDType::Q4_0 => (WeightType::Q4_0, BlockKind::Q4_0, 18, 32),
            GgmlDType::Q4_1 => (WeightType::Q4_1, BlockKind::Q4_1, 20, 32),
            GgmlDType::Q8_0 => (WeightType::Q8_0, BlockKind::Q8_0, 34, 32),
            GgmlDType::Q4K => (WeightType::Q4K, BlockKind::Q4_1, 144, 256),
            GgmlDType::Q6K => (WeightType::Q6K, BlockKind::Q8Half, 210, 256),
            _ => {
                let deq = t.dequantize(&Device::Cpu)?;
                let values = deq.flatten_all()?.to_vec1::<f32>()?;
                return Ok(QMatrix { wtype: WeightType::F32, ..QMatrix::from_f32(rows, cols, values) });
            }
        };
        if cols % block_len != 0 {
            return Err(ModelError::Format(format!(
                "tensor `{name}`: {cols} input features is not a multiple of the {dtype:?} block size {block_len}"
            )));
        }
        let data = t.data()?;
        let n_blocks = rows * cols / block_len;
        if data.len() != n_blocks * block_bytes {
            return Err(ModelError::Format(format!(
                "tensor `{name}`: {} bytes of {dtype:?} data for shape [{rows}, {cols}]",
                data.len()
            )));
        }
        let n32 = rows * cols / QK;
        let mut mat = QMatrix {
            wtype,
            kind: Some(kind),
            rows,
            cols,
            d: Vec::with_capacity(n32 * kind.scales()),
            m: Vec::new(),
            qs: Vec::with_capacity(n32 * kind.quant_bytes()),
            f32s: vec![],
        };
        for block in data.chunks_exact(block_bytes) {
            match wtype {
                WeightType::Q4_0 | WeightType::Q8_0 => {
                    mat.d.push(f16_at(block, 0));
                    mat.qs.extend_from_slice(&block[2..]);
                }
                WeightType::Q4_1 => {
                    mat.d.push(f16_at(block, 0));
                    mat.m.push(f16_at(block, 2));
                    mat.qs.extend_from_slice(&block[4..]);
                }
                WeightType::Q4K => mat.push_q4k(block),
                WeightType::Q6K => mat.push_q6k(block),
                WeightType::F32 => unreachable!(),
            }
        }
        Ok(mat)
    }

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

    /// Builds an f32 matrix from row-major values.
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols, "QMatrix::from_f32 shape");
        QMatrix { wtype: WeightType::F32, kind: None, rows, cols, d: vec![], m: vec![], qs: vec![], f32s: values }
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
    /// The weights as stored.
    pub fn storage(&self) -> QStorage<'_> {
        match self.kind {
            Some(kind) => QStorage::Blocks { kind, d: &self.d, m: &self.m, qs: &self.qs },
            None => QStorage::F32(&self.f32s),
        }
    }
    /// Bytes the kernels read for one full pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.d.len() * 4 + self.m.len() * 4 + self.qs.len() + self.f32s.len() * 4
    }

    fn block_row(&self, kind: BlockKind, r: usize) -> BlockRow<'_> {
        let nb = self.cols / QK;
        let (ns, qb) = (kind.scales(), kind.quant_bytes());
        BlockRow {
            d: &self.d[r * nb * ns..(r + 1) * nb * ns],
            m: if self.m.is_empty() { &[] } else { &self.m[r * nb..(r + 1) * nb] },
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
        }
    }

    /// Dequantized row `r` (embedding lookups and reference checks).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        let Some(kind) = self.kind else {
            return self.f32s[r * c..(r + 1) * c].to_vec();
        };
        let row = self.block_row(kind, r);
        let mut out = Vec::with_capacity(c);
        for b in 0..c / QK {
            match kind {
                BlockKind::Q8_0 => out.extend(row.qs[b * 32..b * 32 + 32].iter().map(|&q| row.d[b] * q as i8 as f32)),
                BlockKind::Q8Half => out.extend(
                    row.qs[b * 32..b * 32 + 32].iter().enumerate().map(|(i, &q)| row.d[2 * b + i / 16] * q as i8 as f32),
                ),
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
}

/// Several matrices over the same input, as if their rows were stacked:
/// `out[i, ·]` is the concatenation of each part's outputs for row `i`
/// (fused Q/K/V or gate/up projections; parts may differ in type).
///
/// Activations are quantized once per call. Each weight row is decoded once
/// and applied to four activation rows at a time while it is hot in cache;
/// rows are split across threads. `out[i, r]` depends only on row `i` of `x`
/// and weight row `r` (batch invariance): how rows are grouped or split
/// across threads changes no bit.
pub fn matmul_parts(parts: &[&QMatrix], x: &[f32], m: usize) -> Vec<f32> {
    let cols = parts[0].cols;
    assert!(parts.iter().all(|p| p.cols == cols), "matmul_parts: parts differ in input features");
    assert_eq!(x.len(), m * cols, "matmul_parts: activation shape");
    let total: usize = parts.iter().map(|p| p.rows).sum();
    let acts = parts.iter().any(|p| p.kind.is_some()).then(|| quantize_activations(x, m, cols));
    // Transposed result ([rows, m]) so tasks write disjoint contiguous slices.
    let mut out_t = vec![0f32; total * m];
    // About four tasks per thread, whole multiples of 8 rows, never across parts.
    let per_task = total.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(8);
    let mut tasks = Vec::new();
    let mut rest = out_t.as_mut_slice();
    for part in parts {
        for start in (0..part.rows).step_by(per_task) {
            let n = per_task.min(part.rows - start);
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n * m);
            rest = tail;
            tasks.push((*part, start, dst));
        }
    }
    tasks.into_par_iter().for_each(|(part, start, dst)| {
        for (ri, dst) in dst.chunks_mut(m).enumerate() {
            part.row_times(start + ri, x, acts.as_ref(), dst);
        }
    });
    let mut out = vec![0f32; m * total];
    for (r, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * total + r] = v;
        }
    }
    out
}

impl QMatrix {
    /// `dst[i] = row r · x[i]` for every activation row.
    fn row_times(&self, r: usize, x: &[f32], acts: Option<&QActivations>, dst: &mut [f32]) {
        let m = dst.len();
        match (self.kind, acts) {
            (Some(kind), Some(acts)) => {
                let w = self.block_row(kind, r);
                let mut i = 0;
                while i + 4 <= m {
                    let rows = [acts.row(i), acts.row(i + 1), acts.row(i + 2), acts.row(i + 3)];
                    dot_rows::<4>(kind, &w, &rows, &mut dst[i..i + 4]);
                    i += 4;
                }
                for i in i..m {
                    dot_rows::<1>(kind, &w, &[acts.row(i)], &mut dst[i..i + 1]);
                }
            }
            _ => {
                let c = self.cols;
                let w = &self.f32s[r * c..(r + 1) * c];
                for (i, o) in dst.iter_mut().enumerate() {
                    *o = dot_f32(w, &x[i * c..(i + 1) * c]);
                }
            }
        }
    }
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

/// Activation rows quantized to 8 bits in blocks of 32, once per pass.
pub struct QActivations {
    cols: usize,
    d: Vec<f32>,
    dsum: Vec<f32>,
    qs: Vec<i8>,
}

impl QActivations {
    fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.cols / QK;
        ActRow {
            d: &self.d[i * nb..(i + 1) * nb],
            dsum: &self.dsum[i * nb..(i + 1) * nb],
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
        }
    }
}

/// Symmetric 8-bit quantization of each 32-element block (scale = max|x|/127).
/// Row-local, so the result for a row never depends on the other rows.
pub fn quantize_activations(x: &[f32], m: usize, cols: usize) -> QActivations {
    let nb = m * cols / QK;
    let mut acts = QActivations { cols, d: Vec::with_capacity(nb), dsum: Vec::with_capacity(nb), qs: Vec::with_capacity(m * cols) };
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for &v in block {
            // Round half to even by the 1.5·2²³ trick: exact for |v·inv| ≤
            // 127 and plain arithmetic (no libm call, same on every target).
            let q = ((v * inv + ROUND_MAGIC) - ROUND_MAGIC) as i8;
            sum += q as i32;
            acts.qs.push(q);
        }
        acts.d.push(d);
        acts.dsum.push(d * sum as f32);
    }
    acts
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
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::F32, GgmlDType::Q4K, GgmlDType::Q6K] {
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

    #[test]
    fn rows_do_not_depend_on_the_rest_of_the_batch() -> Result<()> {
        let (rows, cols) = (70, 64);
        let w = Tensor::from_vec(values(rows * cols, 4), (rows, cols), &Device::Cpu)?;
        let mat = QMatrix::from_qtensor("w", &QTensor::quantize(&w, GgmlDType::Q4_1)?)?;
        let x = values(7 * cols, 5);
        let all = mat.matmul(&x, 7);
        for i in 0..7 {
            let one = mat.matmul(&x[i * cols..(i + 1) * cols], 1);
            assert_eq!(one, all[i * rows..(i + 1) * rows].to_vec());
        }
        Ok(())
    }
}
