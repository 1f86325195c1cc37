//! Hugging Face model folders as targets and drafts: `config.json`,
//! `model.safetensors` (or the shards `model.safetensors.index.json`
//! lists), `tokenizer.json`, and `tokenizer_config.json` for the chat
//! template. They are read into the tensors and tokenizer a GGUF file
//! gives, so the forward is the same code.
//!
//! Weights are held as f32, whatever the files store (f32, f16 or bf16
//! convert exactly): a folder is the model as published, unquantized.
//! Or they are quantized as they load ([`Quantize`], `--quantize`), into
//! the types a GGUF would hold, and run as fast as that GGUF.

use crate::kernels::MatmulKernels;
use crate::llama::{RotateHalf, Stacked, TensorSource};
use crate::{Llama, LlamaConfig, ModelError, Result, Tokenizer};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Quantizing a folder's weights as it loads, the way llama.cpp's
/// `llama-quantize` lays out a GGUF of that type: every layer's matrices in
/// the type, the token embedding and the output head in Q8_0, which
/// llama.cpp keeps at eight bits or more for quality, and the norms in
/// f32. A matrix whose rows do not divide into the type's
/// blocks (Q4_K and Q6_K: 256 values) takes Q8_0 instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantize(GgmlDType);

impl Quantize {
    const NAMES: [(&str, GgmlDType); 5] =
        [("q4_0", GgmlDType::Q4_0), ("q4_1", GgmlDType::Q4_1), ("q8_0", GgmlDType::Q8_0), ("q4_k", GgmlDType::Q4K), ("q6_k", GgmlDType::Q6K)];

    /// The type of the matrix `name` (GGUF name) with `cols` columns.
    fn dtype_of(self, name: &str, cols: usize) -> GgmlDType {
        let wanted = match name {
            "token_embd.weight" | "output.weight" => GgmlDType::Q8_0,
            _ => self.0,
        };
        if cols.is_multiple_of(wanted.block_size()) {
            wanted
        } else if cols.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Self::NAMES.iter().find(|(n, _)| *n == lower).map(|&(_, t)| Quantize(t)).ok_or_else(|| {
            let names: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
            ModelError::InvalidArgument(format!("`--quantize {s}`: expected one of {}", names.join(", ")))
        })
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::NAMES.iter().find(|(_, t)| *t == self.0).map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

/// Loads a Hugging Face llama-family folder.
pub(crate) fn load(dir: &Path, kernels: MatmulKernels, quantize: Option<Quantize>) -> Result<(Llama, Tokenizer)> {
    let config = read_json(&dir.join("config.json"))?;
    let mut cfg = config_of(&config)?;
    let mut source = Safetensors::read(dir, &cfg)?;
    source.quantize = quantize;
    // The embedding's rows, as from GGUF (`vocab_size` may count padding).
    if let Some(rows) = source.rows("model.embed_tokens.weight") {
        cfg.vocab = rows;
    }
    let llama = Llama::from_source(cfg, source, kernels)?;
    let tokenizer = Tokenizer::from_hf_folder(dir, &config)?;
    Ok((llama, tokenizer))
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Format(format!("`{}` is not JSON: {e}", path.display())))
}

/// The model's shape from `config.json`. What this forward does not
/// implement is refused by name rather than run wrongly.
fn config_of(c: &Value) -> Result<LlamaConfig> {
    let model_type = c["model_type"].as_str().unwrap_or_default();
    if !matches!(model_type, "llama" | "mistral" | "qwen2" | "qwen3" | "phi3") {
        return Err(ModelError::Format(format!(
            "config.json: model_type `{model_type}` is not llama-family (expected `llama`, `mistral`, `qwen2`, `qwen3` or `phi3`)"
        )));
    }
    // Qwen2 and Qwen3 may restrict some layers' attention to a window; this forward
    // attends to the whole context.
    if c["use_sliding_window"].as_bool() == Some(true) {
        return Err(ModelError::Format("config.json: use_sliding_window is not supported (attention here spans the whole context)".into()));
    }
    let uint = |key: &str| c[key].as_u64().map(|v| v as usize).ok_or_else(|| ModelError::Format(format!("config.json: missing `{key}`")));
    let float = |key: &str, default: f64| c[key].as_f64().unwrap_or(default) as f32;
    let hidden = uint("hidden_size")?;
    let n_heads = uint("num_attention_heads")?;
    let n_kv_heads = uint("num_key_value_heads").unwrap_or(n_heads);
    // The checks GGUF files get too, their messages naming the key.
    let in_config = |key: &'static str| {
        move |e| match e {
            ModelError::Format(m) => ModelError::Format(format!("config.json: {key}{m}")),
            e => e,
        }
    };
    let head_dim = LlamaConfig::head_dim(hidden, n_heads, n_kv_heads, uint("head_dim").ok()).map_err(in_config(""))?;
    // transformers rounds the rotated width down (Phi-4-mini: 3/4 of 128).
    let rotary_dim = (head_dim as f64 * c["partial_rotary_factor"].as_f64().unwrap_or(1.0)) as usize;
    let rotary_dim = LlamaConfig::rotary_dim(rotary_dim, head_dim).map_err(in_config("partial_rotary_factor: "))?;
    // transformers 5 writes `rope_parameters` (theta included) where
    // earlier versions wrote `rope_theta` and `rope_scaling`.
    let scaling = if c["rope_parameters"].is_object() { &c["rope_parameters"] } else { &c["rope_scaling"] };
    let rope_theta = scaling["rope_theta"].as_f64().map_or(float("rope_theta", 10_000.0), |t| t as f32);
    let context_len = uint("max_position_embeddings").unwrap_or(4096);
    let rope = rope_scaling(scaling, c, rotary_dim, rope_theta, context_len)?;
    Ok(LlamaConfig {
        hidden,
        n_layers: uint("num_hidden_layers")?,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn: uint("intermediate_size")?,
        vocab: uint("vocab_size")?,
        context_len: rope.context_len,
        rope_theta,
        rotary_dim,
        rope_freq_factors: rope.freq_factors,
        rope_attn_factor: rope.attn_factor,
        rms_eps: float("rms_norm_eps", 1e-5),
        // Gemma 2 folders are refused above (their norms hold w for
        // 1 + w, under other names): GGUF files only.
        gemma: None,
    })
}

/// What `rope_scaling` changes: see the fields of the same names in
/// [`LlamaConfig`].
#[derive(Debug, PartialEq)]
struct RopeScaling {
    freq_factors: Option<Vec<f32>>,
    attn_factor: f32,
    context_len: usize,
}

/// RoPE's scaling for `rope_scaling` (of a `config` with the model's
/// `context_len`), as transformers computes it:
/// - `llama3` (Llama 3.1 and later): low frequencies divided by `factor`,
///   high ones kept, a smooth blend between;
/// - `linear`: every frequency divided by `factor`;
/// - `longrope` (`su` in early Phi-3 files): the short factors and the
///   attention factor, the context cut to the original one (see
///   `LlamaConfig::from_gguf` for why).
///
/// Others (dynamic NTK, YaRN, …) are refused by name.
fn rope_scaling(scaling: &Value, config: &Value, rotary_dim: usize, theta: f32, context_len: usize) -> Result<RopeScaling> {
    let plain = RopeScaling { freq_factors: None, attn_factor: 1.0, context_len };
    if scaling.is_null() {
        return Ok(plain);
    }
    let kind = scaling["rope_type"].as_str().or(scaling["type"].as_str()).unwrap_or_default();
    let number =
        |key: &str| scaling[key].as_f64().ok_or_else(|| ModelError::Format(format!("config.json: rope_scaling of type `{kind}` without a numeric `{key}`")));
    let half = rotary_dim / 2;
    let factors: Vec<f64> = match kind {
        // transformers writes plain RoPE this way too.
        "default" => return Ok(plain),
        "linear" => vec![number("factor")?; half],
        "llama3" => {
            let factor = number("factor")?;
            let (low, high, old) = (number("low_freq_factor")?, number("high_freq_factor")?, number("original_max_position_embeddings")?);
            (0..half)
                .map(|i| {
                    let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / rotary_dim as f64);
                    let wavelength = 2.0 * std::f64::consts::PI / freq;
                    if wavelength < old / high {
                        1.0
                    } else if wavelength > old / low {
                        factor
                    } else {
                        let smooth = (old / wavelength - low) / (high - low);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect()
        }
        "longrope" | "su" => {
            // Phi-3 keeps the original context beside `rope_scaling`.
            let original = scaling["original_max_position_embeddings"]
                .as_u64()
                .or(config["original_max_position_embeddings"].as_u64())
                .ok_or_else(|| ModelError::Format("config.json: longrope without `original_max_position_embeddings`".into()))?
                as usize;
            let factor = context_len as f64 / original as f64;
            let attn_factor = match scaling["attention_factor"].as_f64() {
                Some(f) => f,
                None if factor > 1.0 => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                None => 1.0,
            };
            let short: Vec<f64> = scaling["short_factor"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
            if short.len() != half {
                return Err(ModelError::Format(format!("config.json: longrope's `short_factor` has {} numbers, expected {half}", short.len())));
            }
            let freq_factors = Some(short.into_iter().map(|f| f as f32).collect());
            return Ok(RopeScaling { freq_factors, attn_factor: attn_factor as f32, context_len: context_len.min(original) });
        }
        other => return Err(ModelError::Format(format!("config.json: rope_scaling of type `{other}` is not supported (llama3, linear and longrope are)"))),
    };
    Ok(RopeScaling { freq_factors: Some(factors.into_iter().map(|f| f as f32).collect()), ..plain })
}

/// The folder's tensors, by their Hugging Face names. The files are
/// mapped, not read: each tensor is converted (and quantized) on its own,
/// so loading holds the model as it will run plus one tensor in flight,
/// not the files' contents beside it.
struct Safetensors {
    files: MmapedSafetensors,
    rotate_half: RotateHalf,
    /// Phi-3's stacked projections.
    stacked: Stacked,
    quantize: Option<Quantize>,
}

impl Safetensors {
    fn read(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let paths = weight_files(dir)?;
        // SAFETY: the mapping is only read, and only while loading; a file
        // rewritten underneath by another process meanwhile is undefined
        // behaviour, the contract of every memory-mapped model loader
        // (candle's, llama.cpp's).
        let files = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| ModelError::Format(format!("`{}`: {e}", dir.display())))?;
        Ok(Safetensors { files, rotate_half: RotateHalf::of(cfg), stacked: Stacked::of(cfg), quantize: None })
    }

    /// Rows of the tensor `hf`, if there is one.
    fn rows(&self, hf: &str) -> Option<usize> {
        self.files.get(hf).ok().and_then(|view| view.shape().first().copied())
    }
}

/// `model.safetensors`, or every shard the index names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX);
    if !index.is_file() {
        return Err(ModelError::Format(format!("`{}` holds neither model.safetensors nor {SHARD_INDEX}", dir.display())));
    }
    Ok(shards(&index)?.into_iter().map(|f| dir.join(f)).collect())
}

/// The index of a model whose weights are split over several files.
pub(crate) const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The files a shard index names, each once.
pub(crate) fn shards(index: &Path) -> Result<Vec<String>> {
    let map = read_json(index)?;
    let mut files: Vec<String> = map["weight_map"]
        .as_object()
        .ok_or_else(|| ModelError::Format(format!("`{}`: no `weight_map`", index.display())))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The Hugging Face (transformers) name of a llama tensor's GGUF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        // Phi-3's stacked projections (see `llama::Stacked`).
        "attn_qkv.weight" => "self_attn.qkv_proj.weight",
        "ffn_gate_up.weight" => "mlp.gate_up_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

impl TensorSource for Safetensors {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let hf = hf_name(name).ok_or_else(|| ModelError::Format(format!("tensor `{name}` has no Hugging Face name")))?;
        let t = match self.files.get(&hf) {
            Ok(_) => self.files.load(&hf, &Device::Cpu)?,
            Err(_) => {
                let (stacked, rows) = self.stacked_rows(name).ok_or_else(|| ModelError::Format(format!("missing tensor `{hf}`")))?;
                let t = self.files.load(&stacked, &Device::Cpu)?;
                if t.dim(0)? < rows.end {
                    return Err(ModelError::Format(format!("tensor `{stacked}` has {} rows, fewer than a stacked projection's {rows:?}", t.dim(0)?)));
                }
                // Its own storage: the quantizer reads a tensor's storage
                // from the start.
                t.narrow(0, rows.start, rows.len())?.force_contiguous()?
            }
        }
        .to_dtype(DType::F32)?;
        let dtype = match (self.quantize, t.dims()) {
            (Some(q), &[_, cols]) => q.dtype_of(name, cols),
            _ => GgmlDType::F32,
        };
        self.rotate_half.rows_for_pair_rope(QTensor::quantize(&t, dtype)?, name)
    }

    fn contains(&self, name: &str) -> bool {
        hf_name(name).is_some_and(|hf| self.files.get(&hf).is_ok()) || self.stacked_rows(name).is_some()
    }
}

impl Safetensors {
    /// The stacked tensor (Hugging Face name) holding projection `name`,
    /// if the folder has one, and the projection's rows in it.
    fn stacked_rows(&self, name: &str) -> Option<(String, std::ops::Range<usize>)> {
        let (layer, part) = name.strip_suffix(".weight")?.rsplit_once('.')?;
        let (stacked, rows) = self.stacked.rows(part)?;
        let hf = hf_name(&format!("{layer}.{stacked}.weight"))?;
        self.files.get(&hf).is_ok().then_some((hf, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// Llama 3.2-1B's rope_scaling (head_dim 64, theta 500000): the
    /// divisors transformers' `_compute_llama3_parameters` gives.
    #[test]
    fn llama3_rope_scaling_divides_the_low_frequencies() {
        let factors = |scaling: Value, rotary_dim| rope_scaling(&scaling, &Value::Null, rotary_dim, 500_000.0, 131_072).unwrap().freq_factors;
        let scaling = serde_json::json!({ "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192 });
        let f = factors(scaling, 64).unwrap();
        assert_eq!(f.len(), 32);
        assert!(f[..15].iter().all(|&x| x == 1.0) && f[18..].iter().all(|&x| x == 32.0), "{f:?}");
        for (got, want) in f[15..18].iter().zip([1.651329, 3.292262, 9.666729]) {
            assert!((got - want).abs() < 1e-5, "{f:?}");
        }
        assert_eq!(factors(serde_json::json!({ "type": "linear", "factor": 4.0 }), 8), Some(vec![4.0; 4]));
        assert_eq!(factors(Value::Null, 64), None);
        assert_eq!(factors(serde_json::json!({ "rope_type": "default" }), 64), None);
        let err = rope_scaling(&serde_json::json!({ "rope_type": "yarn", "factor": 4.0 }), &Value::Null, 64, 10_000.0, 4096).unwrap_err().to_string();
        assert!(err.contains("`yarn`"), "{err}");
    }

    /// Phi-3.5-mini's rope_scaling (96 rotated dimensions, 131072
    /// positions from 4096): its short factors, the attention factor
    /// llama.cpp's converter writes into its GGUF files (1.190238), and
    /// the original context.
    #[test]
    fn longrope_takes_the_short_factors_and_the_original_context() {
        let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 * 0.05).collect();
        let scaling = serde_json::json!({ "type": "longrope", "short_factor": short, "long_factor": vec![2.0; 48] });
        let config = serde_json::json!({ "original_max_position_embeddings": 4096 });
        let rope = rope_scaling(&scaling, &config, 96, 10_000.0, 131_072).unwrap();
        assert_eq!(rope.freq_factors, Some(short.iter().map(|&f| f as f32).collect()));
        assert!((rope.attn_factor - 1.190_238).abs() < 1e-6, "{}", rope.attn_factor);
        assert_eq!(rope.context_len, 4096);
        // A given attention factor wins; the factors must cover the rotated pairs.
        let scaling = serde_json::json!({ "rope_type": "longrope", "short_factor": short, "attention_factor": 1.5, "original_max_position_embeddings": 4096 });
        assert_eq!(rope_scaling(&scaling, &Value::Null, 96, 10_000.0, 131_072).unwrap().attn_factor, 1.5);
        let err = rope_scaling(&scaling, &Value::Null, 128, 10_000.0, 131_072).unwrap_err().to_string();
        assert!(err.contains("`short_factor` has 48 numbers, expected 64"), "{err}");
    }

    #[test]
    fn quantize_types_parse_and_fall_back_where_blocks_do_not_fit() {
        let q = |s: &str| s.parse::<Quantize>().unwrap();
        assert_eq!(q("Q4_K").to_string(), "q4_k");
        // SmolLM2's 576 columns are not whole 256-value blocks; 1536 are.
        assert_eq!(q("q4_k").dtype_of("blk.0.attn_q.weight", 576), GgmlDType::Q8_0);
        assert_eq!(q("q4_k").dtype_of("blk.0.ffn_down.weight", 1536), GgmlDType::Q4K);
        assert_eq!(q("q4_0").dtype_of("token_embd.weight", 576), GgmlDType::Q8_0);
        assert_eq!(q("q6_k").dtype_of("output.weight", 1536), GgmlDType::Q8_0);
        assert_eq!(q("q8_0").dtype_of("blk.0.attn_q.weight", 40), GgmlDType::F32);
        let err = "q5_k".parse::<Quantize>().unwrap_err().to_string();
        assert!(err.contains("`--quantize q5_k`") && err.contains("q4_0, q4_1, q8_0, q4_k, q6_k"), "{err}");
    }

    /// Rotate-half RoPE on a query (Hugging Face's forward) gives, rows
    /// reordered, what this forward's pair RoPE gives on the query with
    /// its rows reordered as the loader reorders the weights' rows.
    #[test]
    fn reordered_rows_turn_rotate_half_rope_into_pair_rope() {
        let (heads, head_dim, pos) = (3usize, 8usize, 7.0f64);
        let half = head_dim / 2;
        let angles: Vec<f64> = (0..half).map(|i| pos / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos() as f32, a.sin() as f32)).unzip();
        let q: Vec<f32> = (0..heads * head_dim).map(|i| (i as f32 * 0.37).sin() + 0.1).collect();
        let rotate_half: Vec<f32> = (0..heads * head_dim)
            .map(|k| {
                let (base, j) = (k - k % head_dim, k % head_dim);
                let rotated = if j < half { -q[base + j + half] } else { q[base + j - half] };
                q[k] * cos[j % half] + rotated * sin[j % half]
            })
            .collect();
        let reorder = |v: Vec<f32>| {
            let t = QTensor::quantize(&Tensor::from_vec(v, (heads * head_dim, 1), &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
            let t = RotateHalf { heads: (heads, 1), rotary_dim: head_dim }.rows_for_pair_rope(t, "blk.0.attn_q.weight").unwrap();
            t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let mut pair = reorder(q.clone());
        crate::kernels::rope_heads(&mut pair, &cos, &sin);
        let expected = reorder(rotate_half.clone());
        for (a, b) in pair.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{pair:?} vs {expected:?}");
        }
        // Pair RoPE on the rows as Hugging Face orders them is another rotation.
        let mut plain = q;
        crate::kernels::rope_heads(&mut plain, &cos, &sin);
        assert!(plain.iter().zip(&rotate_half).any(|(a, b)| (a - b).abs() > 1e-2));
    }
}
