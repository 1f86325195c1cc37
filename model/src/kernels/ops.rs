//! The kernels as candle custom ops, so the model file stays a plain forward.

use super::dot::dot_f32;
use super::matmul::QMatrix;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Arc;

/// A linear layer without bias over a quantized weight: `[t, in] → [t, out]`.
#[derive(Clone)]
pub struct QLinear {
    weight: Arc<QMatrix>,
}

impl QLinear {
    pub fn new(weight: QMatrix) -> Self {
        QLinear { weight: Arc::new(weight) }
    }
    /// Shares a weight with another user (tied embedding and output head).
    pub fn from_arc(weight: Arc<QMatrix>) -> Self {
        QLinear { weight }
    }
    pub fn weight(&self) -> &QMatrix {
        &self.weight
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op1_no_bwd(self)
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
        if cols != self.weight.cols() {
            candle_core::bail!("qlinear: input has {cols} features, weight expects {}", self.weight.cols());
        }
        let x = contiguous_f32(storage, layout, "qlinear")?;
        let out = self.weight.matmul(x, t);
        Ok((CpuStorage::F32(out), Shape::from((t, self.weight.rows()))))
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
