//! Helpers shared by the model tests: tiny random llama GGUF files, the
//! default model, and a GGUF written out as a Hugging Face folder.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tandem_model::{fetch, hf, LoadedModel, SessionRng};

/// Shape of a tiny test model.
pub struct TinySpec {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub layers: usize,
    /// Type of the linear weights (norms stay f32).
    pub dtype: GgmlDType,
    /// Multiplies the output head, to sharpen or flatten the distributions.
    pub head_gain: f32,
}

fn random(shape: (usize, usize), scale: f32, rng: &mut SessionRng) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Writes a llama GGUF with random weights (and a byte-level vocabulary of
/// single characters, so its tokenizer loads too). Returns the path.
pub fn tiny_llama(dir: &Path, name: &str, spec: &TinySpec, seed: u64) -> PathBuf {
    let mut rng = SessionRng::new(seed);
    let hd = spec.hidden / spec.heads;
    let w = |rows, cols, rng: &mut SessionRng| QTensor::quantize(&random((rows, cols), 1.0 / (cols as f32).sqrt() * 1.7, rng), spec.dtype).unwrap();
    let ones = |n| QTensor::quantize(&Tensor::ones((n,), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), QTensor::quantize(&random((spec.vocab, spec.hidden), 1.0, &mut rng), GgmlDType::F32).unwrap()),
        ("output_norm.weight".into(), ones(spec.hidden)),
        (
            "output.weight".into(),
            QTensor::quantize(&random((spec.vocab, spec.hidden), spec.head_gain / (spec.hidden as f32).sqrt(), &mut rng), GgmlDType::F32).unwrap(),
        ),
    ];
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        tensors.push((format!("{p}.attn_norm.weight"), ones(spec.hidden)));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(spec.hidden)));
        tensors.push((format!("{p}.attn_q.weight"), w(spec.heads * hd, spec.hidden, &mut rng)));
        tensors.push((format!("{p}.attn_k.weight"), w(spec.kv_heads * hd, spec.hidden, &mut rng)));
        tensors.push((format!("{p}.attn_v.weight"), w(spec.kv_heads * hd, spec.hidden, &mut rng)));
        tensors.push((format!("{p}.attn_output.weight"), w(spec.hidden, spec.heads * hd, &mut rng)));
        tensors.push((format!("{p}.ffn_gate.weight"), w(spec.ffn, spec.hidden, &mut rng)));
        tensors.push((format!("{p}.ffn_up.weight"), w(spec.ffn, spec.hidden, &mut rng)));
        tensors.push((format!("{p}.ffn_down.weight"), w(spec.hidden, spec.ffn, &mut rng)));
    }
    let tokens: Vec<Value> = (0..spec.vocab).map(|i| Value::String(char::from(b'a' + (i % 26) as u8).to_string().repeat(1 + i / 26))).collect();
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(spec.layers as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(spec.hidden as u32)),
        ("llama.feed_forward_length", Value::U32(spec.ffn as u32)),
        ("llama.attention.head_count", Value::U32(spec.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(spec.kv_heads as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
    ];
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts).unwrap();
    path
}

/// A fresh scratch folder in the system temp dir, unique per call.
pub fn scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tandem-test-{}-{name}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The default model, fetched on first use, loaded once per test binary.
pub fn default_model() -> LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = fetch::ensure_default_model(false).expect("default model (run `tandem-edge model fetch`)");
            LoadedModel::load(&path).expect("loading the default model")
        })
        .clone()
}

pub fn default_model_arc() -> Arc<tandem_model::Llama> {
    default_model().llama
}

/// Undoes llama.cpp's converter: each head's rows from pair order
/// (r0, r_half, r1, r_half+1, …) back to halves.
pub fn rotate_half_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, rows / heads / 2, 2, cols)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((rows, cols)).unwrap()
}

/// Writes the GGUF at `gguf` (loaded as `target`) as a Hugging Face folder
/// in `dir`, as transformers saves one: names, config, tokenizer, and the
/// weights in one file or, with `shards` > 1, split over that many with an
/// index.
pub fn write_folder(gguf: &Path, dir: &Path, target: &LoadedModel, shards: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let cfg = target.llama.config().clone();
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let t = match name.rsplit('.').nth(1) {
            Some("attn_q") => rotate_half_rows(&t, cfg.n_heads),
            Some("attn_k") => rotate_half_rows(&t, cfg.n_kv_heads),
            _ => t,
        };
        tensors.insert(hf::hf_name(name).expect("a llama tensor"), t);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    if shards <= 1 {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    } else {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let mut weight_map = serde_json::Map::new();
        for (i, part) in names.chunks(names.len().div_ceil(shards)).enumerate() {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
            let part: HashMap<&String, Tensor> = part.iter().map(|n| (n, tensors[n].clone())).collect();
            candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
            weight_map.extend(part.keys().map(|n| (n.to_string(), file.clone().into())));
        }
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string()).unwrap();
    }
    let tok = &target.tokenizer;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab,
        "max_position_embeddings": cfg.context_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "rope_scaling": null,
        "tie_word_embeddings": tied,
        "bos_token_id": tok.bos_token(),
        "eos_token_id": tok.eos_tokens().first(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let template = content.metadata.get("tokenizer.chat_template").map(|v| v.to_string().unwrap().clone());
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({ "chat_template": template }).to_string()).unwrap();
    dir.to_path_buf()
}
