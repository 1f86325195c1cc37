//! Helpers shared by the model tests: tiny random llama GGUF files and the
//! default model.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tandem_model::{fetch, LoadedModel, SessionRng};

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
