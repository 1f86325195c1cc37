//! Batched matrix × activations for quantized weights.

use super::dot::{dot_blocks, dot_f32, ActRow, BlockKind, BlockRow};
use crate::{ModelError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;

/// How a weight matrix is stored for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Q4_0,
    Q4_1,
    Q8_0,
    /// f32 and f16 weights, and quantization types without a dedicated
    /// kernel yet (dequantized once at load).
    F32,
}

/// A weight matrix of `rows` output features × `cols` input features,
/// row-major, in the kernels' layout: GGUF blocks with their f16 scales
/// widened to f32 (exact), quants untouched.
pub struct QMatrix {
    wtype: WeightType,
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    m: Vec<f32>,
    qs: Vec<u8>,
    f32s: Vec<f32>,
}

const QK: usize = 32;

impl QMatrix {
    /// Takes a 2-D GGUF tensor (`[rows, cols]` in candle's order).
    pub fn from_qtensor(name: &str, t: &QTensor) -> Result<Self> {
        let (rows, cols) = t.shape().dims2().map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")))?;
        let dtype = t.dtype();
        let wtype = match dtype {
            GgmlDType::Q4_0 => WeightType::Q4_0,
            GgmlDType::Q4_1 => WeightType::Q4_1,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            _ => WeightType::F32,
        };
        let mut mat = QMatrix { wtype, rows, cols, d: vec![], m: vec![], qs: vec![], f32s: vec![] };
        if wtype == WeightType::F32 {
            let deq = t.dequantize(&Device::Cpu)?;
            mat.f32s = deq.flatten_all()?.to_vec1::<f32>()?;
            return Ok(mat);
        }
        if cols % QK != 0 {
            return Err(ModelError::Format(format!(
                "tensor `{name}`: {cols} input features is not a multiple of the block size {QK}"
            )));
        }
        let data = t.data()?;
        let (block_bytes, q_bytes) = match wtype {
            WeightType::Q4_0 => (18, 16),
            WeightType::Q4_1 => (20, 16),
            WeightType::Q8_0 => (34, 32),
            WeightType::F32 => unreachable!(),
        };
        let n_blocks = rows * cols / QK;
        if data.len() != n_blocks * block_bytes {
            return Err(ModelError::Format(format!(
                "tensor `{name}`: {} bytes of {dtype:?} data for shape [{rows}, {cols}]",
                data.len()
            )));
        }
        mat.d.reserve(n_blocks);
        mat.qs.reserve(n_blocks * q_bytes);
        let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for block in data.chunks_exact(block_bytes) {
            mat.d.push(f16_at(block, 0));
            let q_start = if wtype == WeightType::Q4_1 {
                mat.m.push(f16_at(block, 2));
                4
            } else {
                2
            };
            mat.qs.extend_from_slice(&block[q_start..q_start + q_bytes]);
        }
        Ok(mat)
    }

    /// Builds an f32 matrix from row-major values (used for tests and for
    /// weights stored unquantized).
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Self {
        assert_eq!(values.len(), rows * cols, "QMatrix::from_f32 shape");
        QMatrix { wtype: WeightType::F32, rows, cols, d: vec![], m: vec![], qs: vec![], f32s: values }
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
    /// Bytes the kernels read for one full pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.d.len() * 4 + self.m.len() * 4 + self.qs.len() + self.f32s.len() * 4
    }

    fn block_kind(&self) -> Option<BlockKind> {
        match self.wtype {
            WeightType::Q4_0 => Some(BlockKind::Q4_0),
            WeightType::Q4_1 => Some(BlockKind::Q4_1),
            WeightType::Q8_0 => Some(BlockKind::Q8_0),
            WeightType::F32 => None,
        }
    }

    fn block_row(&self, r: usize) -> BlockRow<'_> {
        let nb = self.cols / QK;
        let qb = if self.wtype == WeightType::Q8_0 { 32 } else { 16 };
        BlockRow {
            d: &self.d[r * nb..(r + 1) * nb],
            m: if self.m.is_empty() { &[] } else { &self.m[r * nb..(r + 1) * nb] },
            qs: &self.qs[r * nb * qb..(r + 1) * nb * qb],
        }
    }

    /// Dequantized row `r` (for embedding lookups and reference checks).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        if self.wtype == WeightType::F32 {
            return self.f32s[r * c..(r + 1) * c].to_vec();
        }
        let row = self.block_row(r);
        let mut out = Vec::with_capacity(c);
        for b in 0..c / QK {
            let d = row.d[b];
            match self.wtype {
                WeightType::Q8_0 => out.extend(row.qs[b * 32..b * 32 + 32].iter().map(|&q| d * q as i8 as f32)),
                WeightType::Q4_0 | WeightType::Q4_1 => {
                    let (off, min) = if self.wtype == WeightType::Q4_0 { (8.0, 0.0) } else { (0.0, row.m[b]) };
                    let qs = &row.qs[b * 16..b * 16 + 16];
                    out.extend(qs.iter().map(|&q| d * ((q & 0xF) as f32 - off) + min));
                    out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - off) + min));
                }
                WeightType::F32 => unreachable!(),
            }
        }
        out
    }

    /// `out[i, r] = Σ_c self[r, c] · x[i, c]` for `m` activation rows.
    ///
    /// Each weight row is loaded once and applied to every activation row
    /// while it is hot in cache; output features are split across threads.
    /// The value of `out[i, r]` depends only on row `i` of `x` and row `r`
    /// of the weights (batch invariance).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "QMatrix::matmul activation shape");
        let n = self.rows;
        // Transposed result ([n, m]) so threads write disjoint contiguous chunks.
        let mut out_t = vec![0f32; n * m];
        const CHUNK_ROWS: usize = 32;
        match self.block_kind() {
            Some(kind) => {
                let acts = quantize_activations(x, m, self.cols);
                out_t.par_chunks_mut(CHUNK_ROWS * m).enumerate().for_each(|(ci, chunk)| {
                    for (ri, dst) in chunk.chunks_mut(m).enumerate() {
                        let w = self.block_row(ci * CHUNK_ROWS + ri);
                        for (i, o) in dst.iter_mut().enumerate() {
                            *o = dot_blocks(kind, &w, &acts.row(i));
                        }
                    }
                });
            }
            None => {
                let c = self.cols;
                out_t.par_chunks_mut(CHUNK_ROWS * m).enumerate().for_each(|(ci, chunk)| {
                    for (ri, dst) in chunk.chunks_mut(m).enumerate() {
                        let r = ci * CHUNK_ROWS + ri;
                        let w = &self.f32s[r * c..(r + 1) * c];
                        for (i, o) in dst.iter_mut().enumerate() {
                            *o = dot_f32(w, &x[i * c..(i + 1) * c]);
                        }
                    }
                });
            }
        }
        let mut out = vec![0f32; m * n];
        for (r, col) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + r] = v;
            }
        }
        out
    }
}

/// Activation rows quantized to 8 bits in blocks of 32, once per pass.
pub struct QActivations {
    cols: usize,
    d: Vec<f32>,
    isum: Vec<i32>,
    qs: Vec<i8>,
}

impl QActivations {
    fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.cols / QK;
        ActRow {
            d: &self.d[i * nb..(i + 1) * nb],
            isum: &self.isum[i * nb..(i + 1) * nb],
            qs: &self.qs[i * self.cols..(i + 1) * self.cols],
        }
    }
}

/// Symmetric 8-bit quantization of each 32-element block (scale = max|x|/127).
/// Row-local, so the result for a row never depends on the other rows.
pub fn quantize_activations(x: &[f32], m: usize, cols: usize) -> QActivations {
    let nb = m * cols / QK;
    let mut acts = QActivations { cols, d: Vec::with_capacity(nb), isum: Vec::with_capacity(nb), qs: Vec::with_capacity(m * cols) };
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for &v in block {
            let q = (v * inv).round() as i8;
            sum += q as i32;
            acts.qs.push(q);
        }
        acts.d.push(d);
        acts.isum.push(sum);
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
        // 37 rows: not a multiple of the 32-row chunk; 3 activation rows.
        let (rows, cols, m) = (37, 96, 3);
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
        let x = values(5 * cols, 5);
        let all = mat.matmul(&x, 5);
        for i in 0..5 {
            let one = mat.matmul(&x[i * cols..(i + 1) * cols], 1);
            assert_eq!(one, all[i * rows..(i + 1) * rows].to_vec());
        }
        Ok(())
    }
}
