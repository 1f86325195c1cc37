//! Llama-family decoder (llama, SmolLM, Mistral-style GQA, Qwen2's Q/K/V
//! biases, Qwen3's Q/K norms, Phi-3's stacked projections, Gemma 2's
//! soft-capped GeGLU layers) from GGUF files (or a Hugging Face
//! folder, read by `hf` into the same tensors).
//!
//! Unlike candle-transformers' `quantized_llama`, one forward call takes a
//! ragged batch of sequences, each with its own KV cache and start position,
//! concatenates their new tokens so every linear layer runs once over the
//! whole batch, runs attention per sequence, and returns logits for every
//! position asked for. Every kernel is batch-invariant (see `kernels`).

use crate::kernels::{attend, attention_split_rows, residual_add, rms_norm, rope_heads, silu_mul, KvView, MatmulKernels, QLinear, QMatrix, RunRows, Scoring};
use crate::{KvCache, ModelError, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::io::{Read, Seek};
use std::ops::Range;
use std::sync::Arc;

/// Shape of a llama-family model, read once from GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Longest sequence (prompt + generated) the model accepts.
    pub context_len: usize,
    pub rope_theta: f32,
    /// Dimensions of each head RoPE rotates, the first ones: `head_dim`
    /// but for partial rotary (Phi-4-mini rotates 3/4); the rest pass
    /// through unrotated.
    pub rotary_dim: usize,
    /// Divisors of RoPE's pair frequencies, one per rotated pair: the
    /// long-context scaling of Llama 3.1 and later (GGUF `rope_freqs.weight`,
    /// or `rope_scaling` in config.json), LongRoPE's short factors (GGUF
    /// `rope_factors_short.weight`). None: plain RoPE.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Scale of RoPE's cos and sin: LongRoPE's attention factor (Phi-3
    /// 128k, Phi-3.5, Phi-4-mini), 1 otherwise.
    pub rope_attn_factor: f32,
    pub rms_eps: f32,
    /// Gemma 2's differences from llama; None for llama.
    pub gemma: Option<GemmaConfig>,
}

/// What Gemma 2 and 3 do beyond llama: embeddings scaled by √hidden,
/// GeGLU (GELU, tanh approximation, for SiLU) in the feed-forward, norms on
/// the attention's and the feed-forward's outputs (the layers'
/// `post_*_norm`), their own query scale, attention scores and output
/// logits soft-capped (`cap · tanh(x / cap)`; Gemma 2), and local layers
/// (Gemma 3).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    pub query_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub local_layers: Option<LocalLayers>,
}

/// Gemma's local layers: all but the last of every `every` (layer `i`
/// with `i % every < every - 1`) attend to the last `window` positions
/// only, with RoPE of base `rope_theta`, unscaled; the others attend to
/// the whole context.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalLayers {
    pub window: usize,
    pub every: usize,
    pub rope_theta: f32,
}

impl LlamaConfig {
    /// Whether layer `i` is a local (sliding-window) layer.
    pub fn is_local_layer(&self, i: usize) -> bool {
        self.gemma.as_ref().and_then(|g| g.local_layers.as_ref()).is_some_and(|l| i % l.every < l.every - 1)
    }
}

impl LlamaConfig {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| md.get(key).ok_or_else(|| ModelError::Format(format!("missing metadata `{key}`")));
        let arch = get("general.architecture")?.to_string()?.clone();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3") {
            return Err(ModelError::Format(format!(
                "architecture `{arch}` is not llama-family (expected `llama`, `mistral`, `qwen2`, `qwen3`, `phi3`, `gemma2` or `gemma3`)"
            )));
        }
        let u = |key: &str| -> Result<usize> { Ok(get(&format!("{arch}.{key}"))?.to_u32()? as usize) };
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        // Qwen3 and Mistral Nemo give heads a width of their own.
        let key_length = u("attention.key_length").ok();
        if key_length.is_some() && u("attention.value_length").ok() != key_length {
            return Err(ModelError::Format("keys and values of different widths (`attention.key_length`, `attention.value_length`) are not supported".into()));
        }
        let head_dim = Self::head_dim(hidden, n_heads, n_kv_heads, key_length)?;
        let rotary_dim = Self::rotary_dim(u("rope.dimension_count").unwrap_or(head_dim), head_dim)?;
        let mut context_len = u("context_length").unwrap_or(4096);
        // LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) has two sets of
        // frequency divisors: the short ones up to the original context,
        // the long ones beyond, chosen once for the whole context, as
        // llama.cpp chooses by its context size. Tandem serves these
        // models within the original context (4096 for all three), with
        // the short factors (`Llama::from_source` reads them): the long
        // ones would rotate every position differently, short prompts
        // included, for a context this server's KV budget rarely holds.
        if content.tensor_infos.contains_key("rope_factors_short.weight") {
            context_len = context_len.min(u("rope.scaling.original_context_length").unwrap_or(context_len));
        }
        let float = |key: &str| md.get(&format!("{arch}.{key}")).map(|v| v.to_f32()).transpose();
        let gemma = match arch.as_str() {
            "gemma2" | "gemma3" => {
                // Queries scaled by 1/√(query_pre_attn_scalar): the head
                // width, but hidden / heads for the 27B models (Gemma 2's
                // 46 layers, Gemma 3's 62), as llama.cpp decides, its GGUF
                // files not saying.
                let query_width = if matches!((arch.as_str(), u("block_count")?), ("gemma2", 46) | ("gemma3", 62)) { hidden / n_heads } else { head_dim };
                // Local layers attend to a window (`Scoring::window`):
                // Gemma 2's every other one, 4096 positions, with the
                // global RoPE; Gemma 3's five of six, 512 or more, with
                // RoPE of base 10000, as llama.cpp fixes them.
                let theta = md.get(&format!("{arch}.rope.freq_base")).map_or(Ok(10_000.0), |v| v.to_f32())?;
                let (every, rope_theta) = if arch == "gemma2" { (2, theta) } else { (6, 10_000.0) };
                let local_layers = u("attention.sliding_window").ok().map(|window| LocalLayers { window, every, rope_theta });
                Some(GemmaConfig {
                    query_scale: 1.0 / (query_width as f32).sqrt(),
                    attn_softcap: float("attn_logit_softcapping")?,
                    final_softcap: float("final_logit_softcapping")?,
                    local_layers,
                })
            }
            _ => None,
        };
        let embd = content.tensor_infos.get("token_embd.weight").ok_or_else(|| ModelError::Format("missing tensor `token_embd.weight`".into()))?;
        Ok(LlamaConfig {
            hidden,
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: u("feed_forward_length")?,
            vocab: embd.shape.dims2()?.0,
            context_len,
            rope_theta: md.get(&format!("{arch}.rope.freq_base")).map_or(Ok(10_000.0), |v| v.to_f32())?,
            rotary_dim,
            // A `rope_freqs.weight` tensor replaces these when the file
            // has one (`Llama::from_source`).
            rope_freq_factors: Self::gguf_rope_scaling(md, &arch, rotary_dim)?,
            // llama.cpp scales by the file's factor, 1 when it has none
            // (LongRoPE files converted before mid-2024).
            rope_attn_factor: md.get(&format!("{arch}.rope.scaling.attn_factor")).map_or(Ok(1.0), |v| v.to_f32())?,
            rms_eps: md.get(&format!("{arch}.attention.layer_norm_rms_epsilon")).map_or(Ok(1e-5), |v| v.to_f32())?,
            gemma,
        })
    }

    /// The frequency divisors of a GGUF's `rope.scaling.type` and
    /// `.factor`, as llama.cpp applies them: `linear` divides every
    /// frequency by the factor (Gemma 3 4B and up, on its global layers).
    /// YaRN is refused; other types are carried by tensors
    /// (`rope_freqs.weight`, LongRoPE's factors) or change nothing.
    fn gguf_rope_scaling(md: &std::collections::HashMap<String, gguf_file::Value>, arch: &str, rotary_dim: usize) -> Result<Option<Vec<f32>>> {
        let Some(kind) = md.get(&format!("{arch}.rope.scaling.type")) else { return Ok(None) };
        let factor = md.get(&format!("{arch}.rope.scaling.factor")).map(|v| v.to_f32()).transpose()?.unwrap_or(1.0);
        match kind.to_string()?.as_str() {
            "linear" if factor != 1.0 => Ok(Some(vec![factor; rotary_dim / 2])),
            "yarn" => Err(ModelError::Format(format!("RoPE scaling of type `yarn` (`{arch}.rope.scaling.type`) is not supported (linear is)"))),
            _ => Ok(None),
        }
    }

    /// Each head's width (`explicit`, else hidden / heads), for the head
    /// layouts this forward runs: query heads sharing K/V heads evenly, and
    /// an even width for RoPE's pairs.
    pub(crate) fn head_dim(hidden: usize, n_heads: usize, n_kv_heads: usize, explicit: Option<usize>) -> Result<usize> {
        let head_dim = match explicit {
            Some(d) => d,
            None if n_heads > 0 && hidden.is_multiple_of(n_heads) => hidden / n_heads,
            None => 0,
        };
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::Format(format!("unsupported head layout: {n_heads} heads of {head_dim}, {n_kv_heads} kv heads, hidden {hidden}")));
        }
        Ok(head_dim)
    }

    /// How many of each head's dimensions RoPE rotates: an even number,
    /// at most the head's.
    pub(crate) fn rotary_dim(rotary_dim: usize, head_dim: usize) -> Result<usize> {
        if rotary_dim == 0 || rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
            return Err(ModelError::Format(format!(
                "RoPE over {rotary_dim} of each head's {head_dim} dimensions (expected an even number, at most {head_dim})"
            )));
        }
        Ok(rotary_dim)
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

#[derive(Clone)]
pub(crate) struct Layer {
    attn_norm: Arc<Vec<f32>>,
    /// Q, K and V projections fused: `[t, hidden] → [t, q_dim + 2·kv_dim]`.
    qkv: QLinear,
    /// Their biases, in the same order (Qwen2; llama has none).
    qkv_bias: Option<Arc<Vec<f32>>>,
    /// Gains of the RMS norms over each query and key head before RoPE
    /// (Qwen3; llama has none).
    qk_norm: Option<QkNorm>,
    wo: QLinear,
    ffn_norm: Arc<Vec<f32>>,
    /// Gate and up projections fused: `[t, hidden] → [t, 2·ffn]`.
    gate_up: QLinear,
    down: QLinear,
    post_norms: Option<PostNorms>,
}

/// Gemma 2's norms of the attention's and the feed-forward's outputs,
/// before each joins the residual.
#[derive(Clone)]
struct PostNorms {
    attn: Arc<Vec<f32>>,
    ffn: Arc<Vec<f32>>,
}

/// Values of a named `rows × cols` tensor, row-major.
pub(crate) type TensorValues<'a> = dyn FnMut(&str, usize, usize) -> Result<Vec<f32>> + 'a;

impl Layer {
    /// A layer of `cfg`'s shape from f32 tensors named like GGUF's
    /// (`attn_q`, …, `ffn_down`, without the `blk.N.` prefix and
    /// `.weight` suffix), `get` returning each tensor's values row-major.
    /// The matrices are quantized to Q8_0 (a trained draft layer then
    /// costs what a target layer costs, not four times as many bytes).
    pub(crate) fn from_f32(cfg: &LlamaConfig, get: &mut TensorValues) -> Result<Layer> {
        let (h, q, kv, ffn) = (cfg.hidden, cfg.n_heads * cfg.head_dim, cfg.kv_dim(), cfg.ffn);
        let mut linear =
            |name: &str, rows: usize, cols: usize| -> Result<QLinear> { Ok(QLinear::new(QMatrix::q8_0(name, rows, cols, get(name, rows, cols)?)?)) };
        Ok(Layer {
            qkv: QLinear::fused(vec![linear("attn_q", q, h)?, linear("attn_k", kv, h)?, linear("attn_v", kv, h)?]),
            qkv_bias: None,
            qk_norm: None,
            wo: linear("attn_output", h, q)?,
            gate_up: QLinear::fused(vec![linear("ffn_gate", ffn, h)?, linear("ffn_up", ffn, h)?]),
            down: linear("ffn_down", h, ffn)?,
            attn_norm: Arc::new(get("attn_norm", 1, h)?),
            ffn_norm: Arc::new(get("ffn_norm", 1, h)?),
            post_norms: None,
        })
    }
}

/// Which positions of a sequence's pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new token (verification: k + 1 rows).
    All,
    /// Only the last new token (prefill, decode step).
    Last,
    /// None (a prefill chunk that is not the last).
    None,
}

/// One sequence's share of a batched forward pass.
pub struct SeqPass<'a> {
    pub cache: &'a mut KvCache,
    /// New tokens, placed at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
}

/// Logits of one sequence, `rows × vocab`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn rows(&self) -> usize {
        self.data.len() / self.vocab
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
    /// Row `i`, owned (no copy when it is the only row).
    pub fn into_row(mut self, i: usize) -> Vec<f32> {
        if self.rows() == 1 {
            return self.data;
        }
        self.data.drain(..i * self.vocab);
        self.data.truncate(self.vocab);
        self.data
    }
}

/// One decoder layer's weights, for backends that run the forward elsewhere.
pub struct LayerWeights<'a> {
    pub attn_norm: &'a [f32],
    /// Q, K and V projections stacked in that order.
    pub qkv: &'a QLinear,
    /// Their biases, stacked the same way, if the model has them.
    pub qkv_bias: Option<&'a [f32]>,
    /// Norms over each query and key head before RoPE, if the model has them.
    pub qk_norm: Option<&'a QkNorm>,
    pub wo: &'a QLinear,
    pub ffn_norm: &'a [f32],
    /// Gate and up projections stacked in that order.
    pub gate_up: &'a QLinear,
    pub down: &'a QLinear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Arc<QMatrix>,
    layers: Vec<Layer>,
    norm: Arc<Vec<f32>>,
    head: QLinear,
    /// cos/sin per (position, pair), `context_len × head_dim/2` each.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// The same for Gemma's local layers, where their RoPE differs.
    local_rope: Option<(Vec<f32>, Vec<f32>)>,
}

impl Llama {
    pub fn from_gguf<R: Read + Seek>(content: &gguf_file::Content, reader: &mut R) -> Result<Self> {
        Self::from_gguf_with(content, reader, MatmulKernels::Tandem)
    }

    /// Loads with a choice of matmul kernels (the bench's stock baseline).
    pub fn from_gguf_with<R: Read + Seek>(content: &gguf_file::Content, reader: &mut R, kernels: MatmulKernels) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(content)?;
        // llama.cpp's converter reorders llama's Q and K rows for pair
        // RoPE; architectures it runs with NEOX (rotate-half) RoPE keep
        // Hugging Face's order, and are reordered here.
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let rotate_half = matches!(arch.as_str(), "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3").then(|| RotateHalf::of(&cfg));
        let stacked = Stacked::of(&cfg);
        Self::from_source(cfg, GgufSource { content, reader, rotate_half, stacked }, kernels)
    }

    /// Builds the model from tensors named as in GGUF files.
    pub(crate) fn from_source(mut cfg: LlamaConfig, source: impl TensorSource, kernels: MatmulKernels) -> Result<Self> {
        let mut tensors = TensorReader { source, kernels };
        // A LongRoPE file's short factors: see `LlamaConfig::from_gguf`.
        if let Some(name) = ["rope_freqs.weight", "rope_factors_short.weight"].into_iter().find(|n| tensors.source.contains(n)) {
            cfg.rope_freq_factors = Some(tensors.vector(name, cfg.rotary_dim / 2)?);
        }
        let embed = Arc::new(tensors.matrix("token_embd.weight")?);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("blk.{i}");
            let (q, kv) = (cfg.n_heads * cfg.head_dim, cfg.kv_dim());
            let qkv_bias = if tensors.source.contains(&format!("{p}.attn_q.bias")) {
                let mut bias = tensors.vector(&format!("{p}.attn_q.bias"), q)?;
                bias.extend(tensors.vector(&format!("{p}.attn_k.bias"), kv)?);
                bias.extend(tensors.vector(&format!("{p}.attn_v.bias"), kv)?);
                Some(Arc::new(bias))
            } else {
                None
            };
            let post_norms = if tensors.source.contains(&format!("{p}.post_attention_norm.weight")) {
                let gain = |tensors: &mut TensorReader<_>, part: &str| tensors.vector(&format!("{p}.{part}.weight"), cfg.hidden).map(Arc::new);
                Some(PostNorms { attn: gain(&mut tensors, "post_attention_norm")?, ffn: gain(&mut tensors, "post_ffw_norm")? })
            } else {
                None
            };
            let qk_norm = if tensors.source.contains(&format!("{p}.attn_q_norm.weight")) {
                let gain = |tensors: &mut TensorReader<_>, part: &str| tensors.vector(&format!("{p}.{part}.weight"), cfg.head_dim).map(Arc::new);
                Some(QkNorm { q: gain(&mut tensors, "attn_q_norm")?, k: gain(&mut tensors, "attn_k_norm")? })
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: Arc::new(tensors.vector(&format!("{p}.attn_norm.weight"), cfg.hidden)?),
                qkv: QLinear::fused(vec![
                    tensors.linear(&format!("{p}.attn_q.weight"), cfg.n_heads * cfg.head_dim, cfg.hidden)?,
                    tensors.linear(&format!("{p}.attn_k.weight"), cfg.kv_dim(), cfg.hidden)?,
                    tensors.linear(&format!("{p}.attn_v.weight"), cfg.kv_dim(), cfg.hidden)?,
                ]),
                qkv_bias,
                qk_norm,
                wo: tensors.linear(&format!("{p}.attn_output.weight"), cfg.hidden, cfg.n_heads * cfg.head_dim)?,
                ffn_norm: Arc::new(tensors.vector(&format!("{p}.ffn_norm.weight"), cfg.hidden)?),
                gate_up: QLinear::fused(vec![
                    tensors.linear(&format!("{p}.ffn_gate.weight"), cfg.ffn, cfg.hidden)?,
                    tensors.linear(&format!("{p}.ffn_up.weight"), cfg.ffn, cfg.hidden)?,
                ]),
                down: tensors.linear(&format!("{p}.ffn_down.weight"), cfg.hidden, cfg.ffn)?,
                post_norms,
            });
        }
        let norm = Arc::new(tensors.vector("output_norm.weight", cfg.hidden)?);
        // Tied embeddings (SmolLM2) have no `output.weight`: reuse the table.
        let head = if tensors.source.contains("output.weight") {
            tensors.linear("output.weight", cfg.vocab, cfg.hidden)?
        } else {
            tensors.stock(QLinear::from_arc(embed.clone()), "token_embd.weight")?
        };
        let (rope_cos, rope_sin) = rope_tables(&cfg);
        // Tables of their own only where local layers turn otherwise.
        let plain_global = cfg.rope_freq_factors.is_none() && cfg.rope_attn_factor == 1.0;
        let local_rope = cfg
            .gemma
            .as_ref()
            .and_then(|g| g.local_layers.as_ref())
            .filter(|l| !(plain_global && l.rope_theta == cfg.rope_theta))
            .map(|l| rope_tables(&LlamaConfig { rope_theta: l.rope_theta, rope_freq_factors: None, rope_attn_factor: 1.0, ..cfg.clone() }));
        Ok(Llama { cfg, embed, layers, norm, head, rope_cos, rope_sin, local_rope })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The token embedding table, `vocab × hidden`.
    pub fn embedding(&self) -> &QMatrix {
        &self.embed
    }

    /// Weights of decoder layer `i` (< `n_layers`).
    pub fn layer(&self, i: usize) -> LayerWeights<'_> {
        let l = &self.layers[i];
        LayerWeights {
            attn_norm: &l.attn_norm,
            qkv: &l.qkv,
            qkv_bias: l.qkv_bias.as_deref().map(Vec::as_slice),
            qk_norm: l.qk_norm.as_ref(),
            wo: &l.wo,
            ffn_norm: &l.ffn_norm,
            gate_up: &l.gate_up,
            down: &l.down,
        }
    }

    /// Gain of the final RMS norm.
    pub fn output_norm(&self) -> &[f32] {
        &self.norm
    }

    /// The output head, `vocab × hidden` (the embedding table when tied).
    pub fn head(&self) -> &QLinear {
        &self.head
    }

    /// RoPE `(cos, sin)` tables, `context_len × head_dim/2` each, row-major
    /// by position.
    pub fn rope_tables(&self) -> (&[f32], &[f32]) {
        (&self.rope_cos, &self.rope_sin)
    }

    /// An empty cache for this model's first `n_layers` layers.
    pub fn new_cache(&self, n_layers: usize) -> KvCache {
        KvCache::new(n_layers.min(self.cfg.n_layers), self.cfg.n_kv_heads, self.cfg.head_dim)
    }

    /// Bytes of weights the kernels read in one pass over `n_layers` layers.
    pub fn weight_bytes(&self, n_layers: usize) -> usize {
        let per_layer = |l: &Layer| [&l.qkv, &l.wo, &l.gate_up, &l.down].iter().map(|w| w.bytes()).sum::<usize>();
        self.layers.iter().take(n_layers).map(per_layer).sum::<usize>() + self.head.bytes()
    }

    /// Runs one batched pass. Every sequence's cache must cover the same
    /// number of layers (the full model, or the first N for a layer-skip
    /// draft; the final norm and head are always applied). Returns one
    /// `Logits` per sequence with the rows `logits` asked for. On error every
    /// cache is left as it was.
    pub fn forward(&self, batch: &mut [SeqPass]) -> Result<Vec<Logits>> {
        Ok(self.forward_capturing(batch, &[])?.0)
    }

    /// [`Llama::forward`], also returning the residual stream after each
    /// of `capture`'s layer counts (0: the embeddings; `n_layers`: the final
    /// hidden state before the norm), `tokens × hidden` row-major over the
    /// whole batch in order: what a trained draft learns from.
    pub fn forward_capturing(&self, batch: &mut [SeqPass], capture: &[usize]) -> Result<(Vec<Logits>, Vec<Vec<f32>>)> {
        let n_layers = self.validate(batch)?;
        if let Some(&c) = capture.iter().find(|&&c| c > n_layers) {
            return Err(ModelError::InvalidArgument(format!("cannot capture layer {c} of a pass over {n_layers}")));
        }
        let starts: Vec<usize> = batch.iter().map(|s| s.cache.len()).collect();
        // The whole pass runs on a pool thread: the kernels' parallel loops
        // are then cheap work-stealing joins, where each one entered from
        // outside the pool would cost a thread hand-off (hundreds a pass).
        let result = rayon::scope(|_| self.forward_unchecked(batch, n_layers, &starts, capture, None));
        if result.is_err() {
            for (s, &start) in batch.iter_mut().zip(&starts) {
                s.cache.truncate(start);
            }
        }
        result
    }

    fn validate(&self, batch: &[SeqPass]) -> Result<usize> {
        let n_layers = batch.first().map_or(self.cfg.n_layers, |s| s.cache.n_layers());
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::InvalidArgument(format!("sequence {i}: `tokens` is empty")));
            }
            if s.cache.n_layers() != n_layers || n_layers > self.cfg.n_layers || s.cache.kv_dim() != self.cfg.kv_dim() {
                return Err(ModelError::InvalidArgument(format!(
                    "sequence {i}: cache for {} layers × {} values does not fit a pass over {n_layers} of {} layers × {}",
                    s.cache.n_layers(),
                    s.cache.kv_dim(),
                    self.cfg.n_layers,
                    self.cfg.kv_dim()
                )));
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                return Err(ModelError::InvalidArgument(format!("sequence {i}: token id {t} is outside the vocabulary of {}", self.cfg.vocab)));
            }
            let end = s.cache.len() + s.tokens.len();
            if end > self.cfg.context_len {
                return Err(ModelError::InvalidArgument(format!("sequence {i}: {end} positions exceed the model's context length {}", self.cfg.context_len)));
            }
        }
        Ok(n_layers)
    }

    /// One sequence whose input rows (`tokens × hidden`) are given instead
    /// of its tokens' embeddings (an EAGLE-style draft feeds projected
    /// target features); returns its logits and the final hidden state
    /// (before the norm) of every new token.
    pub fn forward_with_inputs(&self, mut pass: SeqPass, inputs: Vec<f32>) -> Result<(Logits, Vec<f32>)> {
        let n_layers = self.validate(std::slice::from_ref(&pass))?;
        if inputs.len() != pass.tokens.len() * self.cfg.hidden {
            return Err(ModelError::InvalidArgument(format!("{} input values for {} tokens of {} features", inputs.len(), pass.tokens.len(), self.cfg.hidden)));
        }
        let start = pass.cache.len();
        let x = Tensor::from_vec(inputs, (pass.tokens.len(), self.cfg.hidden), &Device::Cpu)?;
        let batch = std::slice::from_mut(&mut pass);
        let result = rayon::scope(|_| self.forward_unchecked(batch, n_layers, &[start], &[n_layers], Some(x)));
        match result {
            Ok((mut logits, mut hidden)) => Ok((logits.remove(0), hidden.remove(0))),
            Err(e) => {
                batch[0].cache.truncate(start);
                Err(e)
            }
        }
    }

    /// A model sharing this one's embedding, final norm and head (and
    /// its first `keep` layers) with `extra` layers after them: how a
    /// trained draft runs on the same code and kernels.
    pub(crate) fn with_layers(&self, keep: usize, extra: Vec<Layer>) -> Llama {
        let layers: Vec<Layer> = self.layers.iter().take(keep).cloned().chain(extra).collect();
        let cfg = LlamaConfig { n_layers: layers.len(), ..self.cfg.clone() };
        Llama {
            cfg,
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            head: self.head.clone(),
            rope_cos: self.rope_cos.clone(),
            rope_sin: self.rope_sin.clone(),
            local_rope: self.local_rope.clone(),
        }
    }

    /// The same model with another output head: a trained draft's head
    /// over part of the vocabulary, whose logits rows are that head's width.
    pub(crate) fn with_head(mut self, head: QLinear) -> Llama {
        self.head = head;
        self
    }

    fn forward_unchecked(
        &self,
        batch: &mut [SeqPass],
        n_layers: usize,
        starts: &[usize],
        capture: &[usize],
        input: Option<Tensor>,
    ) -> Result<(Vec<Logits>, Vec<Vec<f32>>)> {
        let cfg = &self.cfg;
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let positions: Vec<usize> = batch.iter().zip(starts).flat_map(|(s, &start)| start..start + s.tokens.len()).collect();
        // Which sequence each new token belongs to.
        let rows: Vec<usize> = batch.iter().enumerate().flat_map(|(i, s)| std::iter::repeat_n(i, s.tokens.len())).collect();
        let rows: Vec<(usize, usize)> = rows.into_iter().zip(positions.iter().copied()).collect();

        let mut x = match input {
            Some(x) => x,
            None => {
                let mut embedded = Vec::with_capacity(total * cfg.hidden);
                for s in batch.iter() {
                    for &t in s.tokens {
                        embedded.extend(self.embed.dequantize_row(t as usize));
                    }
                }
                if cfg.gemma.is_some() {
                    let scale = (cfg.hidden as f32).sqrt();
                    embedded.iter_mut().for_each(|x| *x *= scale);
                }
                Tensor::from_vec(embedded, (total, cfg.hidden), &Device::Cpu)?
            }
        };
        let mut captured = vec![Vec::new(); capture.len()];
        let mut keep = |after: usize, x: &Tensor| -> Result<()> {
            for (slot, _) in captured.iter_mut().zip(capture).filter(|(_, &c)| c == after) {
                *slot = x.flatten_all()?.to_vec1::<f32>()?;
            }
            Ok(())
        };
        keep(0, &x)?;

        for (li, layer) in self.layers.iter().take(n_layers).enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            let mut qkv = layer.qkv.forward_split(&h, &[total])?.pop().expect("one run");
            if let Some(bias) = &layer.qkv_bias {
                for row in qkv.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias.iter()).for_each(|(x, b)| *x += b);
                }
            }
            let (mut q, mut k, v) = split_qkv(&qkv, total, cfg.n_heads * cfg.head_dim, cfg.kv_dim());
            if let Some(norm) = &layer.qk_norm {
                head_rms_norm(&mut q, &norm.q, cfg.rms_eps);
                head_rms_norm(&mut k, &norm.k, cfg.rms_eps);
            }
            let local = cfg.is_local_layer(li);
            self.apply_rope(&mut q, cfg.n_heads, &positions, local);
            self.apply_rope(&mut k, cfg.n_kv_heads, &positions, local);

            let kvd = cfg.kv_dim();
            let mut row = 0;
            for s in batch.iter_mut() {
                let n = s.tokens.len();
                s.cache.append(li, &k[row * kvd..(row + n) * kvd], &v[row * kvd..(row + n) * kvd]);
                row += n;
            }
            let caches: Vec<&KvCache> = batch.iter().map(|s| &*s.cache).collect();
            let attn = self.attention(&caches, &rows, li, &q);
            let attn = Tensor::from_vec(attn, (total, cfg.n_heads * cfg.head_dim), &Device::Cpu)?;
            let post_norm = |y: Tensor, gain: Option<&Arc<Vec<f32>>>| match gain {
                Some(gain) => rms_norm(&y, gain, cfg.rms_eps),
                None => Ok(y),
            };
            x = residual_add(&x, &post_norm(layer.wo.forward(&attn)?, layer.post_norms.as_ref().map(|n| &n.attn))?)?;

            let h = rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            let gated = layer.gate_up.forward(&h)?.apply_op1_no_bwd(&GatedFfn { gelu: cfg.gemma.is_some() })?;
            x = residual_add(&x, &post_norm(layer.down.forward(&gated)?, layer.post_norms.as_ref().map(|n| &n.ffn))?)?;
            keep(li + 1, &x)?;
        }

        // Only the rows whose logits are wanted go through the head; each
        // sequence's come back as its own buffer.
        let (mut wanted, mut runs) = (Vec::new(), Vec::with_capacity(batch.len()));
        let mut row = 0u32;
        for s in batch.iter() {
            let n = s.tokens.len() as u32;
            let first = wanted.len();
            match s.logits {
                LogitsFor::All => wanted.extend(row..row + n),
                LogitsFor::Last => wanted.push(row + n - 1),
                LogitsFor::None => {}
            }
            runs.push(wanted.len() - first);
            row += n;
        }
        let out = if wanted.is_empty() {
            runs.iter().map(|_| Logits { vocab: self.head.rows(), data: vec![] }).collect()
        } else {
            let n = wanted.len();
            let idx = Tensor::from_vec(wanted, n, &Device::Cpu)?;
            let h = rms_norm(&x.index_select(&idx, 0)?, &self.norm, cfg.rms_eps)?;
            let mut rows = self.head.forward_split(&h, &runs)?;
            if let Some(cap) = cfg.gemma.as_ref().and_then(|g| g.final_softcap) {
                rows.iter_mut().flatten().for_each(|l| *l = cap * (*l / cap).tanh());
            }
            rows.into_iter().map(|data| Logits { vocab: self.head.rows(), data }).collect()
        };
        Ok((out, captured))
    }

    /// Rotates adjacent pairs `(x[2i], x[2i+1])` of every head (GGUF stores
    /// llama Q/K weights permuted for this interleaved form).
    fn apply_rope(&self, x: &mut [f32], n_heads: usize, positions: &[usize], local: bool) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        for (t, &pos) in positions.iter().enumerate() {
            let (cos, sin) = match (&self.local_rope, local) {
                (Some((cos, sin)), true) => (cos, sin),
                _ => (&self.rope_cos, &self.rope_sin),
            };
            let (cos, sin) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
            rope_heads(&mut x[t * n_heads * hd..(t + 1) * n_heads * hd], cos, sin);
        }
    }

    /// Causal attention for every new token of the batch against its own
    /// sequence's cache, which already holds the new keys and values.
    /// `rows[t]` = (sequence, position) of token t. A unit is a run of up
    /// to eight consecutive tokens of a sequence × a kv head: the tokens and
    /// query heads of a unit share each key and value they load. Every
    /// query's arithmetic is fixed (see `kernels::attention`), so results
    /// never depend on the batch or on how its tokens are split into tasks.
    fn attention(&self, caches: &[&KvCache], rows: &[(usize, usize)], layer: usize, q: &[f32]) -> Vec<f32> {
        const TOKENS_PER_UNIT: usize = 8;
        let cfg = &self.cfg;
        let hd = cfg.head_dim;
        let group = cfg.n_heads / cfg.n_kv_heads;
        let width = cfg.n_heads * hd;
        let scale = match &cfg.gemma {
            Some(g) => Scoring {
                scale: g.query_scale,
                softcap: g.attn_softcap,
                window: g.local_layers.as_ref().filter(|_| cfg.is_local_layer(layer)).map(|l| l.window),
            },
            None => Scoring::plain(1.0 / (hd as f32).sqrt()),
        };
        // (first token, tokens, kv head): runs of one sequence's tokens.
        let mut units = Vec::new();
        let mut t = 0;
        while t < rows.len() {
            let run = rows[t..].iter().take(TOKENS_PER_UNIT).take_while(|r| r.0 == rows[t].0).count();
            units.extend((0..cfg.n_kv_heads).map(|g| (t, run, g)));
            t += run;
        }
        // Few units (one sequence's verification has one per kv head: three
        // here, on two threads) are split into tasks of the query rows the
        // kernel walks together anyway, so no thread idles through a long
        // context while another finishes its second unit, and a task over
        // a long context offers halves of its work to idle threads (a
        // 1-token step's units are one tile each). Many units are kept
        // whole: the rows after a unit's first tile find its keys in L1.
        let few = units.len() < 4 * rayon::current_num_threads();
        let split = if few { attention_split_rows() } else { usize::MAX };
        // (first token, kv head, the unit's rows of this task).
        let mut tasks: Vec<(usize, usize, Range<usize>)> = Vec::new();
        for &(t, n, g) in &units {
            let unit_rows = n * group;
            tasks.extend((0..unit_rows).step_by(split.min(unit_rows)).map(|r0| (t, g, r0..(r0 + split).min(unit_rows))));
        }
        // Longest contexts first, one task per steal: the threads finish
        // together however unequal the sequences.
        tasks.sort_by_key(|task| std::cmp::Reverse(rows[task.0].1));
        // Row r of a unit is query head g·group + r mod group of token t + r / group.
        let row_at = |t: usize, g: usize, r: usize| (t + r / group) * width + (g * group + r % group) * hd;
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .with_max_len(1)
            .map(|(t, g, unit_rows)| {
                let (seq, pos) = rows[*t];
                let (keys, values) = caches[seq].head(layer, *g);
                let kv = KvView { keys, values, head_dim: hd };
                let mut queries = Vec::with_capacity(unit_rows.len() * hd);
                for r in unit_rows.clone() {
                    queries.extend_from_slice(&q[row_at(*t, *g, r)..][..hd]);
                }
                let mut o = vec![0f32; queries.len()];
                attend(&queries, RunRows { group, first_row: unit_rows.start, first_visible: pos + 1 }, &kv, scale, few, &mut o);
                o
            })
            .collect();
        let mut out = vec![0f32; rows.len() * width];
        for ((t, g, unit_rows), o) in tasks.iter().zip(&results) {
            for (r, o) in unit_rows.clone().zip(o.chunks_exact(hd)) {
                out[row_at(*t, *g, r)..][..hd].copy_from_slice(o);
            }
        }
        out
    }
}

/// Where a model's tensors come from, by their GGUF names
/// (`blk.N.attn_q.weight`), in GGUF's layout.
pub(crate) trait TensorSource {
    fn qtensor(&mut self, name: &str) -> Result<QTensor>;
    fn contains(&self, name: &str) -> bool;
}

struct GgufSource<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    /// Set when the file's Q and K rows are in rotate-half order.
    rotate_half: Option<RotateHalf>,
    stacked: Stacked,
}

/// Where Phi-3 keeps projections stacked: Q, K and V in one tensor
/// (`attn_qkv`; Hugging Face's `qkv_proj`), gate and up in another
/// (`ffn_gate_up` here; GGUF's `ffn_up`, Hugging Face's `gate_up_proj`).
pub(crate) struct Stacked {
    q: usize,
    kv: usize,
    ffn: usize,
}

impl Stacked {
    pub(crate) fn of(cfg: &LlamaConfig) -> Stacked {
        Stacked { q: cfg.n_heads * cfg.head_dim, kv: cfg.kv_dim(), ffn: cfg.ffn }
    }

    /// For projection `part` (`attn_q`, …, `ffn_up`): the stacked tensor
    /// that would hold it and its rows there.
    pub(crate) fn rows(&self, part: &str) -> Option<(&'static str, Range<usize>)> {
        let Stacked { q, kv, ffn } = *self;
        match part {
            "attn_q" => Some(("attn_qkv", 0..q)),
            "attn_k" => Some(("attn_qkv", q..q + kv)),
            "attn_v" => Some(("attn_qkv", q + kv..q + 2 * kv)),
            "ffn_gate" => Some(("ffn_gate_up", 0..ffn)),
            "ffn_up" => Some(("ffn_gate_up", ffn..2 * ffn)),
            _ => None,
        }
    }
}

/// Rows `rows` of `t` (named `name`), checked to be there.
fn take_rows(t: &QTensor, name: &str, rows: Range<usize>) -> Result<QTensor> {
    if t.shape().dims()[0] < rows.end {
        return Err(ModelError::Format(format!("tensor `{name}` has {} rows, fewer than a stacked projection's {rows:?}", t.shape().dims()[0])));
    }
    select_rows(t, rows)
}

impl<R: Read + Seek> GgufSource<'_, R> {
    fn read(&mut self, name: &str) -> Result<QTensor> {
        self.content.tensor(self.reader, name, &Device::Cpu).map_err(|e| ModelError::Format(format!("tensor `{name}`: {e}")))
    }

    /// Where a projection the file stores stacked with others lies (a
    /// file without `ffn_gate` holds gate and up in `ffn_up`): the stacked
    /// tensor's name and the projection's rows in it.
    fn stacked(&self, name: &str) -> Option<(String, Range<usize>)> {
        let (layer, part) = name.strip_suffix(".weight")?.rsplit_once('.')?;
        let has = |t: &str| self.content.tensor_infos.contains_key(&format!("{layer}.{t}.weight"));
        let (stacked, rows) = self.stacked.rows(part)?;
        // GGUF names the gate-and-up stack `ffn_up`; a file with
        // `ffn_gate` holds the two apart.
        let (stacked, apart) = match stacked {
            "ffn_gate_up" => ("ffn_up", has("ffn_gate")),
            other => (other, has(part)),
        };
        (!apart && has(stacked)).then(|| (format!("{layer}.{stacked}.weight"), rows))
    }
}

impl<R: Read + Seek> TensorSource for GgufSource<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let t = match self.stacked(name) {
            Some((stacked, rows)) => take_rows(&self.read(&stacked)?, &stacked, rows)?,
            None => self.read(name)?,
        };
        match self.rotate_half {
            Some(rotate_half) => rotate_half.rows_for_pair_rope(t, name),
            None => Ok(t),
        }
    }

    fn contains(&self, name: &str) -> bool {
        if self.stacked(name).is_some() {
            return true;
        }
        self.content.tensor_infos.contains_key(name)
    }
}

/// Reads named tensors, checking their shapes.
struct TensorReader<S> {
    source: S,
    kernels: MatmulKernels,
}

impl<S: TensorSource> TensorReader<S> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.source.qtensor(name)
    }

    fn matrix(&mut self, name: &str) -> Result<QMatrix> {
        QMatrix::from_qtensor(name, &self.qtensor(name)?)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = self.qtensor(name)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        if v.len() != len {
            return Err(ModelError::Format(format!("tensor `{name}` has {} values, expected {len}", v.len())));
        }
        Ok(v)
    }

    fn linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<QLinear> {
        let m = self.matrix(name)?;
        if (m.rows(), m.cols()) != (rows, cols) {
            return Err(ModelError::Format(format!("tensor `{name}` is [{}, {}], expected [{rows}, {cols}]", m.rows(), m.cols())));
        }
        self.stock(QLinear::new(m), name)
    }

    fn stock(&mut self, linear: QLinear, name: &str) -> Result<QLinear> {
        Ok(match self.kernels {
            MatmulKernels::Tandem => linear,
            MatmulKernels::CandleStock => linear.with_stock(QMatMul::from_qtensor(self.qtensor(name)?)?),
        })
    }
}

/// Hugging Face orders each head's rotated Q and K rows (weights and
/// biases) for rotate-half RoPE; this forward, like llama GGUF files,
/// rotates adjacent pairs. Interleaving the two halves of each head's
/// rotated rows, as llama.cpp's converter does, makes both give the same
/// attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RotateHalf {
    /// Query and key heads.
    pub heads: (usize, usize),
    /// Rows of each head RoPE rotates, the first ones (see
    /// `LlamaConfig::rotary_dim`); the others stay where they are.
    pub rotary_dim: usize,
}

impl RotateHalf {
    pub fn of(cfg: &LlamaConfig) -> Self {
        RotateHalf { heads: (cfg.n_heads, cfg.n_kv_heads), rotary_dim: cfg.rotary_dim }
    }

    /// `t` with its rows reordered when `name`'s GGUF name says it is a Q
    /// or K tensor (or a Q or K norm's gains); other tensors pass
    /// unchanged. Rows are moved whole, so
    /// a quantized tensor stays as it is, block for block.
    pub fn rows_for_pair_rope(&self, t: QTensor, name: &str) -> Result<QTensor> {
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => self.heads.0,
            Some("attn_k") => self.heads.1,
            // Qwen3's per-head norm gains: one head's dimensions.
            Some("attn_q_norm" | "attn_k_norm") => 1,
            _ => return Ok(t),
        };
        let rows = t.shape().dims()[0];
        let head_rows = rows / heads;
        if !rows.is_multiple_of(heads) || head_rows < self.rotary_dim {
            return Err(ModelError::Format(format!("tensor `{name}`: {rows} rows are not {heads} heads of at least {} rows", self.rotary_dim)));
        }
        let half = self.rotary_dim / 2;
        select_rows(
            &t,
            (0..rows).map(|row| {
                let (head, j) = (row / head_rows, row % head_rows);
                let from = if j < self.rotary_dim { (j % 2) * half + j / 2 } else { j };
                head * head_rows + from
            }),
        )
    }
}

/// A tensor of `t`'s rows in the order (and number) `rows` gives. Rows
/// are moved whole, so a quantized tensor keeps its blocks as they are.
fn select_rows(t: &QTensor, rows: impl ExactSizeIterator<Item = usize>) -> Result<QTensor> {
    let mut dims = t.shape().dims().to_vec();
    let data = t.data()?;
    let row_bytes = data.len() / dims[0];
    dims[0] = rows.len();
    let mut out = Vec::with_capacity(dims[0] * row_bytes);
    for row in rows {
        out.extend_from_slice(&data[row * row_bytes..][..row_bytes]);
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(t.dtype(), &out, dims, &Device::Cpu)?)
}

/// cos and sin for every (position, pair of a head). Pairs past
/// `rotary_dim` turn by nothing (cos 1, sin 0), so every backend rotates
/// whole heads and partial rotary costs nothing to support.
fn rope_tables(cfg: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let (half, rotated) = (cfg.head_dim / 2, cfg.rotary_dim / 2);
    let scale = cfg.rope_attn_factor as f64;
    let mut cos = Vec::with_capacity(cfg.context_len * half);
    let mut sin = Vec::with_capacity(cfg.context_len * half);
    for pos in 0..cfg.context_len {
        for i in 0..rotated {
            let divisor = cfg.rope_freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
            let freq = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rotary_dim as f64) / divisor;
            let angle = pos as f64 * freq;
            cos.push((angle.cos() * scale) as f32);
            sin.push((angle.sin() * scale) as f32);
        }
        cos.extend(std::iter::repeat_n(1.0, half - rotated));
        sin.extend(std::iter::repeat_n(0.0, half - rotated));
    }
    (cos, sin)
}

/// Qwen3's norms over each query and key head, before RoPE: one gain per
/// dimension of a head, shared by all heads (in the pair order the Q and K
/// rows were loaded in).
#[derive(Clone, Debug)]
pub struct QkNorm {
    pub q: Arc<Vec<f32>>,
    pub k: Arc<Vec<f32>>,
}

/// RMS norm of every `gain.len()`-wide head of `x`, in place.
fn head_rms_norm(x: &mut [f32], gain: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(gain.len()) {
        let mean_square = head.iter().map(|v| v * v).sum::<f32>() / head.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        head.iter_mut().zip(gain).for_each(|(v, g)| *v *= scale * g);
    }
}

/// Splits fused `[t, q | k | v]` rows into three row-major buffers.
fn split_qkv(qkv: &[f32], t: usize, q_dim: usize, kv_dim: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = q_dim + 2 * kv_dim;
    let (mut q, mut k, mut v) = (Vec::with_capacity(t * q_dim), Vec::with_capacity(t * kv_dim), Vec::with_capacity(t * kv_dim));
    for row in qkv.chunks_exact(width) {
        q.extend_from_slice(&row[..q_dim]);
        k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
        v.extend_from_slice(&row[q_dim + kv_dim..]);
    }
    (q, k, v)
}

/// `silu(gate) · up` (or, `gelu`, Gemma's `gelu(gate) · up` with GELU's
/// tanh approximation) over fused `[t, gate | up]` rows → `[t, ffn]`.
struct GatedFfn {
    gelu: bool,
}

/// `gelu(gate) · up`, GELU by its tanh approximation (Gemma's
/// `gelu_pytorch_tanh`, llama.cpp's GEGLU).
fn gelu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = 0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh()) * u;
    }
}

impl CustomOp1 for GatedFfn {
    fn name(&self) -> &'static str {
        "tandem-gated-ffn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, width) = layout.shape().dims2()?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("swiglu: expected f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("swiglu: input must be contiguous");
        };
        let ffn = width / 2;
        let mut out = vec![0f32; t * ffn];
        let row = |(row, out): (&[f32], &mut [f32])| {
            let (gate, up) = row.split_at(ffn);
            if self.gelu {
                gelu_mul(gate, up, out);
            } else {
                silu_mul(gate, up, out);
            }
        };
        // Rows in parallel from four rows: on one thread, a 40-row pass's
        // activations left the other thread idle for about 2 % of the
        // pass, and a 5-token pass took about 4 % longer; at two rows
        // waking the other thread costs what it saves.
        if t >= 4 {
            data[start..end].par_chunks_exact(width).zip(out.par_chunks_exact_mut(ffn)).for_each(row);
        } else {
            data[start..end].chunks_exact(width).zip(out.chunks_exact_mut(ffn)).for_each(row);
        }
        Ok((CpuStorage::F32(out), Shape::from((t, ffn))))
    }
}
