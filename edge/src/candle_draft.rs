//! The draft model on a candle device with candle's own kernels:
//! `--backend metal` (Apple GPUs, cargo feature `metal`). The forward is
//! plain candle tensor code, so it also runs on candle's CPU device, which
//! is how it is tested on machines without Metal (`--backend candle-cpu`;
//! slower than `--backend cpu`, whose kernels are Tandem's own).

use crate::EdgeError;
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor, D};
use std::path::Path;
use tandem_model::{LlamaConfig, ModelError, StepForward};

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    /// Q, K and V biases (Qwen2).
    biases: Option<[Tensor; 3]>,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// The first `n_layers` of a llama-family GGUF (llama, mistral, qwen2) on
/// `device`.
pub struct CandleLayers {
    cfg: LlamaConfig,
    device: Device,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head: QMatMul,
    /// RoPE tables, (context, head_dim / 2, 1).
    cos: Tensor,
    sin: Tensor,
    /// Rotate-half RoPE (Qwen2's GGUF files keep Hugging Face's Q/K row
    /// order) instead of adjacent pairs.
    rotate_half: bool,
    /// Per layer: keys and values, (kv_heads, positions, head_dim).
    cache: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

fn model_err(e: candle_core::Error) -> ModelError {
    ModelError::from(e)
}

impl CandleLayers {
    pub fn load(path: &Path, n_layers: Option<usize>, device: &Device) -> Result<Self, EdgeError> {
        if path.is_dir() {
            return Err(EdgeError::InvalidArgument(format!(
                "`{}` is a folder: the candle backends read GGUF files (a Hugging Face folder runs on the cpu and wgpu backends)",
                path.display()
            )));
        }
        let io = |e: std::io::Error| EdgeError::Model(ModelError::Io { path: path.display().to_string(), source: e });
        let mut file = std::fs::File::open(path).map_err(io)?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Format(format!("`{}` is not a readable GGUF file: {e}", path.display())))?;
        let cfg = LlamaConfig::from_gguf(&content)?;
        let arch = content.metadata.get("general.architecture").and_then(|a| a.to_string().ok()).cloned().unwrap_or_default();
        match arch.as_str() {
            "phi3" => return Err(EdgeError::InvalidArgument("the candle backends do not run Phi-3's stacked projections; use --backend cpu or wgpu".into())),
            "qwen3" => return Err(EdgeError::InvalidArgument("the candle backends do not run Qwen3's Q/K norms; use --backend cpu".into())),
            "gemma2" | "gemma3" => return Err(EdgeError::InvalidArgument("the candle backends do not run Gemma's layers; use --backend cpu".into())),
            _ => {}
        }
        if cfg.rotary_dim != cfg.head_dim {
            return Err(EdgeError::InvalidArgument("the candle backends rotate whole heads, not RoPE over part of each; use --backend cpu or wgpu".into()));
        }
        let n_layers = n_layers.unwrap_or(cfg.n_layers);
        if n_layers == 0 || n_layers > cfg.n_layers {
            return Err(EdgeError::InvalidArgument(format!("`--draft layers:{n_layers}`: N must be between 1 and the model's {} layers", cfg.n_layers)));
        }
        let mut qtensor = |name: &str| content.tensor(&mut file, name, device).map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")));
        let embed = qtensor("token_embd.weight")?.dequantize(device).map_err(model_err)?;
        let head = match qtensor("output.weight") {
            Ok(t) => t,
            // Tied embedding: the head is the embedding matrix.
            Err(_) => qtensor("token_embd.weight")?,
        };
        let head = QMatMul::from_qtensor(head).map_err(model_err)?;
        let norm = qtensor("output_norm.weight")?.dequantize(device).map_err(model_err)?;
        let mut blocks = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let mut mm = |w: &str| -> Result<QMatMul, EdgeError> { Ok(QMatMul::from_qtensor(qtensor(&format!("blk.{i}.{w}.weight"))?).map_err(model_err)?) };
            let (wq, wk, wv, wo) = (mm("attn_q")?, mm("attn_k")?, mm("attn_v")?, mm("attn_output")?);
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let mut vector = |name: String| -> Result<Tensor, EdgeError> { Ok(qtensor(&name)?.dequantize(device).map_err(model_err)?) };
            let biases = match content.tensor_infos.contains_key(&format!("blk.{i}.attn_q.bias")) {
                true => Some([vector(format!("blk.{i}.attn_q.bias"))?, vector(format!("blk.{i}.attn_k.bias"))?, vector(format!("blk.{i}.attn_v.bias"))?]),
                false => None,
            };
            let (attn_norm, ffn_norm) = (vector(format!("blk.{i}.attn_norm.weight"))?, vector(format!("blk.{i}.ffn_norm.weight"))?);
            blocks.push(Block { attn_norm, ffn_norm, wq, wk, wv, biases, wo, gate, up, down });
        }
        let half = cfg.head_dim / 2;
        // Llama 3.1 and later divide some pair frequencies.
        let factors = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => {
                content.tensor(&mut file, "rope_freqs.weight", &Device::Cpu).and_then(|t| t.dequantize(&Device::Cpu)?.to_vec1::<f32>()).map_err(model_err)?
            }
            false => vec![1.0; half],
        };
        if factors.len() != half {
            return Err(EdgeError::Model(ModelError::Format(format!("`rope_freqs.weight` has {} values, expected {half}", factors.len()))));
        }
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32) / factors[i]).collect();
        let angles: Vec<f32> = (0..cfg.context_len).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
        let angles = Tensor::from_vec(angles, (cfg.context_len, half, 1), device).map_err(model_err)?;
        Ok(CandleLayers {
            cos: angles.cos().map_err(model_err)?,
            sin: angles.sin().map_err(model_err)?,
            rotate_half: arch == "qwen2",
            cache: vec![None; n_layers],
            len: 0,
            device: device.clone(),
            embed,
            blocks,
            norm,
            head,
            cfg,
        })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + self.cfg.rms_eps as f64)?.sqrt()?.recip()?;
        x.broadcast_mul(&scale)?.broadcast_mul(w)
    }

    /// Rotates adjacent pairs of every head (GGUF's interleaved RoPE), or
    /// its two halves (`rotate_half`): `x` is (heads, t, head_dim) for
    /// positions `start..start + t`.
    fn rope(&self, x: &Tensor, start: usize) -> candle_core::Result<Tensor> {
        let (h, t, hd) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?.unsqueeze(0)?;
        let sin = self.sin.narrow(0, start, t)?.unsqueeze(0)?;
        // Pair i as (a, b) along the last axis: (head_dim/2, 2) for adjacent
        // pairs, (2, head_dim/2) transposed for halves.
        let pairs = match self.rotate_half {
            true => x.reshape((h, t, 2, hd / 2))?.transpose(2, 3)?,
            false => x.reshape((h, t, hd / 2, 2))?,
        };
        let (a, b) = (pairs.narrow(3, 0, 1)?, pairs.narrow(3, 1, 1)?);
        let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        let rotated = Tensor::cat(&[ra, rb], 3)?;
        match self.rotate_half {
            true => rotated.transpose(2, 3)?.contiguous()?.reshape((h, t, hd)),
            false => rotated.reshape((h, t, hd)),
        }
    }

    fn forward(&mut self, tokens: &[u32]) -> candle_core::Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (t, start) = (tokens.len(), self.len);
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let group = nh / nkv;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        // Causal mask for the new rows against every cached position, one
        // copy per query head of a group.
        let total = start + t;
        let mask: Vec<f32> = (0..group * t).flat_map(|r| (0..total).map(move |j| if j <= start + r % t { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (1, group * t, total), &self.device)?;
        for (li, block) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &block.attn_norm)?;
            let heads = |w: &QMatMul, bias: usize, n: usize| -> candle_core::Result<Tensor> {
                let y = match &block.biases {
                    Some(b) => w.forward(&h)?.broadcast_add(&b[bias])?,
                    None => w.forward(&h)?,
                };
                y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()
            };
            let q = self.rope(&heads(&block.wq, 0, nh)?, start)?;
            let k = self.rope(&heads(&block.wk, 1, nkv)?, start)?;
            let v = heads(&block.wv, 2, nkv)?;
            let (k, v) = match &self.cache[li] {
                Some((ck, cv)) => (Tensor::cat(&[ck, &k], 1)?, Tensor::cat(&[cv, &v], 1)?),
                None => (k, v),
            };
            self.cache[li] = Some((k.clone(), v.clone()));
            // Query heads sharing a kv head are consecutive: fold them into rows.
            let q = q.reshape((nkv, group * t, hd))?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let weights = scores.broadcast_sub(&max)?.exp()?;
            let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
            let attn = weights.matmul(&v)?.reshape((nh, t, hd))?.transpose(0, 1)?.reshape((t, nh * hd))?;
            x = (x + block.wo.forward(&attn)?)?;
            let h = self.rms_norm(&x, &block.ffn_norm)?;
            let gated = (block.gate.forward(&h)?.silu()? * block.up.forward(&h)?)?;
            x = (x + block.down.forward(&gated)?)?;
        }
        self.len = total;
        let last = self.rms_norm(&x.narrow(0, t - 1, 1)?, &self.norm)?;
        self.head.forward(&last)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
    }
}

impl StepForward for CandleLayers {
    type Scores = Vec<f32>;
    fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for entry in self.cache.iter_mut() {
            *entry = match entry.take() {
                Some((k, v)) if len > 0 => Some((k.narrow(1, 0, len).expect("len < cached"), v.narrow(1, 0, len).expect("len < cached"))),
                _ => None,
            };
        }
        self.len = len;
    }

    fn step(&mut self, tokens: &[u32]) -> tandem_model::Result<Vec<f32>> {
        if self.len + tokens.len() > self.cfg.context_len {
            return Err(ModelError::InvalidArgument(format!("the draft's context is limited to {} tokens", self.cfg.context_len)));
        }
        self.forward(tokens).map_err(model_err)
    }
}

/// The device `--backend` names: `metal` (feature `metal`) or `candle-cpu`.
pub fn device(backend: &str) -> Result<Device, EdgeError> {
    match backend {
        "candle-cpu" => Ok(Device::Cpu),
        #[cfg(feature = "metal")]
        "metal" => Device::new_metal(0).map_err(|e| EdgeError::InvalidArgument(format!("`--backend metal`: no Metal device: {e}"))),
        #[cfg(not(feature = "metal"))]
        "metal" => Err(EdgeError::InvalidArgument("`--backend metal`: this build has no Metal support (build on macOS with `--features metal`)".into())),
        other => Err(EdgeError::InvalidArgument(format!("`--backend {other}`: not a candle device"))),
    }
}
