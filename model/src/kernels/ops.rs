//! The kernels as candle custom ops, so the model file stays a plain forward.

use super::dot::dot_f32;
#[cfg(target_arch = "x86_64")]
use super::dot::{simd_level, SimdLevel};
use super::matmul::{matmul_parts, matmul_parts_split, QMatrix};
use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Module, Shape, Tensor};
use std::sync::Arc;

/// Which implementation the linear layers run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulKernels {
    /// Tandem's batched, batch-invariant kernels.
    #[default]
    Tandem,
    /// candle's own `QMatMul`: the baseline `tandem-bench kernels` measures
    /// against in the same run. Not guaranteed batch-invariant.
    CandleStock,
}

/// A linear layer without bias, `[t, in] → [t, out]`, over one weight
/// matrix or several stacked ones (fused projections).
#[derive(Clone)]
pub struct QLinear {
    parts: Vec<Arc<QMatrix>>,
    /// candle's stock kernels for the same parts, when benchmarking them.
    stock: Vec<Arc<QMatMul>>,
}

impl QLinear {
    pub fn new(weight: QMatrix) -> Self {
        Self::from_arc(Arc::new(weight))
    }
    /// Shares a weight with another user (tied embedding and output head).
    pub fn from_arc(weight: Arc<QMatrix>) -> Self {
        QLinear { parts: vec![weight], stock: vec![] }
    }
    /// Runs on candle's stock kernel instead (same weights, for baselines).
    pub fn with_stock(mut self, stock: QMatMul) -> Self {
        self.stock = vec![Arc::new(stock)];
        self
    }
    /// One layer computing all of `linears` over the same input, outputs
    /// side by side in order.
    pub fn fused(linears: Vec<QLinear>) -> Self {
        let stock_all = linears.iter().all(|l| !l.stock.is_empty());
        let mut fused = QLinear { parts: vec![], stock: vec![] };
        for l in linears {
            fused.parts.extend(l.parts);
            fused.stock.extend(l.stock);
        }
        if !stock_all {
            fused.stock.clear();
        }
        fused
    }
    /// The stacked weight matrices, in output order.
    pub fn parts(&self) -> &[Arc<QMatrix>] {
        &self.parts
    }
    /// Output features.
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows()).sum()
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        self.parts[0].cols()
    }
    /// Weight bytes one pass reads.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
    /// [`QLinear::forward`] as row-major Vecs of `runs[k]` consecutive rows
    /// each: on Tandem's kernels written in place, not copied out of a
    /// tensor (the output head's logits are megabytes per pass).
    pub fn forward_split(&self, x: &Tensor, runs: &[usize]) -> candle_core::Result<Vec<Vec<f32>>> {
        if !self.stock.is_empty() {
            let all = self.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
            let width = self.rows();
            let mut rest = &all[..];
            return Ok(runs
                .iter()
                .map(|&n| {
                    let (run, tail) = rest.split_at(n * width);
                    rest = tail;
                    run.to_vec()
                })
                .collect());
        }
        let parts: Vec<&QMatrix> = self.parts.iter().map(|p| p.as_ref()).collect();
        Ok(matmul_parts_split(&parts, &x.flatten_all()?.to_vec1::<f32>()?, runs))
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.stock.as_slice() {
            [] => x.apply_op1_no_bwd(self),
            [one] => one.forward(x),
            many => Tensor::cat(&many.iter().map(|s| s.forward(x)).collect::<candle_core::Result<Vec<_>>>()?, 1),
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 input");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "tandem-qlinear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, cols) = layout.shape().dims2()?;
        if cols != self.cols() {
            candle_core::bail!("qlinear: input has {cols} features, weight expects {}", self.cols());
        }
        let x = contiguous_f32(storage, layout, "qlinear")?;
        let parts: Vec<&QMatrix> = self.parts.iter().map(|p| p.as_ref()).collect();
        let out = matmul_parts(&parts, x, t);
        Ok((CpuStorage::F32(out), Shape::from((t, self.rows()))))
    }
}

/// `x + y` element-wise on one thread: the residual adds are a few thousand
/// values a pass, less than the wake-up of candle's parallel map.
pub fn residual_add(x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(y, &ResidualAdd)
}

struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "tandem-residual-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("residual add: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let (a, b) = (contiguous_f32(s1, l1, "residual add")?, contiguous_f32(s2, l2, "residual add")?);
        let out = a.iter().zip(b).map(|(x, y)| x + y).collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Rotates adjacent pairs `(x[2i], x[2i+1])` of each head in `heads` (one
/// token's heads side by side, `2 · cos.len()` values each) by the
/// position's angles. Element-wise, so the AVX-512 build (which vectorizes
/// the pairs) gives the portable build's bits.
pub fn rope_heads(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_level() == SimdLevel::Avx512Vnni {
        // SAFETY: AVX-512 support was detected at runtime (simd_level).
        return unsafe { rope_heads_512(heads, cos, sin) };
    }
    rope_heads_body(heads, cos, sin)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn rope_heads_512(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    rope_heads_body(heads, cos, sin)
}

#[inline(always)]
fn rope_heads_body(heads: &mut [f32], cos: &[f32], sin: &[f32]) {
    for head in heads.chunks_exact_mut(2 * cos.len()) {
        for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// Row-wise RMS normalisation with a learned gain.
pub fn rms_norm(x: &Tensor, gain: &Arc<Vec<f32>>, eps: f32) -> candle_core::Result<Tensor> {
    x.apply_op1_no_bwd(&RmsNorm { gain: gain.clone(), eps })
}

struct RmsNorm {
    gain: Arc<Vec<f32>>,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "tandem-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, cols) = layout.shape().dims2()?;
        if cols != self.gain.len() {
            candle_core::bail!("rms_norm: input has {cols} features, gain has {}", self.gain.len());
        }
        let x = contiguous_f32(storage, layout, "rms_norm")?;
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(cols) {
            let scale = 1.0 / (dot_f32(row, row) / cols as f32 + self.eps).sqrt();
            out.extend(row.iter().zip(self.gain.iter()).map(|(v, g)| v * scale * g));
        }
        Ok((CpuStorage::F32(out), Shape::from((t, cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's RoPE path and the portable body agree bit for bit.
    #[test]
    fn rope_paths_agree() {
        let mut rng = crate::SessionRng::new(5);
        let mut f = || rng.next_f64() as f32 * 2.0 - 1.0;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..32).map(|_| (f(), f())).unzip();
        let x: Vec<f32> = (0..3 * 64).map(|_| 4.0 * f()).collect();
        let (mut fast, mut plain) = (x.clone(), x);
        rope_heads(&mut fast, &cos, &sin);
        rope_heads_body(&mut plain, &cos, &sin);
        assert_eq!(fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }
}
