//! The candle-device draft (`--backend metal`, tested here on candle's CPU
//! device) drafts what the CPU backend drafts, across cache reuse and
//! rollback.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tandem_edge::{build_draft, Backend};
use tandem_model::{fetch, DraftSpec, LlamaConfig, LoadedModel, SamplingParams, SessionRng};

#[test]
fn candle_device_drafts_match_the_cpu_backend() {
    let path: PathBuf = fetch::ensure_default_model(false).unwrap();
    let model = LoadedModel::load(&path).unwrap();
    let spec = DraftSpec::Layers(12);
    let mut cpu = build_draft(&spec, Backend::Cpu, &model, &path).unwrap();
    let mut candle = build_draft(&spec, Backend::CandleCpu, &model, &path).unwrap();
    let greedy = SamplingParams::default();
    let mut rng = SessionRng::new(0);
    let prompt = model.tokenizer.encode(&model.tokenizer.chat_prompt("Write a haiku about autumn leaves.")).unwrap();
    let mut context = prompt.clone();
    let mut compared = 0;
    // Extend by the drafts, then roll back by two (the cached prefix is
    // reused and truncated), several times.
    for round in 0..4 {
        let a = cpu.propose(&context, 0, 6, &greedy, &mut rng).unwrap();
        let b = candle.propose(&context, 0, 6, &greedy, &mut rng).unwrap();
        assert_eq!(a.tokens, b.tokens, "round {round}: drafts differ");
        // Different kernels (candle's quantize activations differently)
        // move this small model's probabilities by a few hundredths: on
        // this prompt the first 12 layers on Tandem's kernels differ from
        // candle's dequantized f32 forward by up to 0.065 in top-1
        // probability (0.055 with the kernels' previous float order), and
        // entropies differ by up to 15 %.
        for (fa, fb) in a.features.iter().zip(&b.features) {
            assert!((fa.top1 - fb.top1).abs() < 0.1, "round {round}: top-1 {} vs {}", fa.top1, fb.top1);
            assert!((fa.entropy - fb.entropy).abs() < 0.2 * fa.entropy.max(1.0), "round {round}: entropy {} vs {}", fa.entropy, fb.entropy);
        }
        compared += a.tokens.len();
        context.extend_from_slice(&a.tokens[..a.tokens.len() - 2]);
    }
    assert!(compared >= 20, "{compared}");
    // A fresh, shorter context after all that: the cache rolls back fully.
    let a = cpu.propose(&prompt, 0, 4, &greedy, &mut rng).unwrap();
    let b = candle.propose(&prompt, 0, 4, &greedy, &mut rng).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

/// The default model rewritten as a Qwen2 GGUF: Q and K rows in
/// rotate-half order (as llama.cpp writes Qwen2), `qwen2.*` metadata, and
/// random Q/K/V biases.
fn as_qwen2(src: &Path, dst: &Path) {
    let mut file = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let cfg = LlamaConfig::from_gguf(&content).unwrap();
    let mut rng = SessionRng::new(3);
    let mut biases = |n: usize, scale: f32| {
        let v: Vec<f32> = (0..n).map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect();
        QTensor::quantize(&Tensor::from_vec(v, n, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => cfg.n_heads,
            Some("attn_k") => cfg.n_kv_heads,
            _ => {
                tensors.push((name.clone(), t));
                continue;
            }
        };
        // Pair order (row 2p + s of a head) to halves (row s·hd/2 + p).
        let (rows, data) = (t.shape().dims()[0], t.data().unwrap().to_vec());
        let (row_bytes, hd) = (data.len() / rows, rows / heads);
        let mut out = vec![0u8; data.len()];
        for r in 0..rows {
            let (base, j) = (r - r % hd, r % hd);
            let to = base + (j % 2) * (hd / 2) + j / 2;
            out[to * row_bytes..][..row_bytes].copy_from_slice(&data[r * row_bytes..][..row_bytes]);
        }
        tensors.push((name.clone(), qtensor_from_ggml(t.dtype(), &out, t.shape().dims().to_vec(), &Device::Cpu).unwrap()));
        let layer = name.trim_end_matches(".weight");
        // Q and K biases large enough to move attention (Qwen2's K biases
        // reach tens), V's small.
        tensors.push((format!("{layer}.bias"), biases(rows, 1.0)));
        if heads == cfg.n_kv_heads {
            tensors.push((layer.replace("attn_k", "attn_v") + ".bias", biases(rows, 0.1)));
        }
    }
    let metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| match k.as_str() {
            "general.architecture" => (k.clone(), Value::String("qwen2".into())),
            _ => (k.replacen("llama.", "qwen2.", 1), v.clone()),
        })
        .collect();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &ts).unwrap();
}

/// On a Qwen2 model (Q/K/V biases, rotate-half RoPE) the candle device
/// drafts what the CPU backend drafts too.
#[test]
fn candle_device_drafts_match_the_cpu_backend_on_qwen2() {
    let src: PathBuf = fetch::ensure_default_model(false).unwrap();
    let path = std::env::temp_dir().join(format!("tandem-qwen2-{}.gguf", std::process::id()));
    as_qwen2(&src, &path);
    let model = LoadedModel::load(&path).unwrap();
    let spec = DraftSpec::Layers(12);
    let mut cpu = build_draft(&spec, Backend::Cpu, &model, &path).unwrap();
    let mut candle = build_draft(&spec, Backend::CandleCpu, &model, &path).unwrap();
    let (greedy, mut rng) = (SamplingParams::default(), SessionRng::new(0));
    let mut context = model.tokenizer.encode(&model.tokenizer.chat_prompt("Write a haiku about autumn leaves.")).unwrap();
    for round in 0..3 {
        let a = cpu.propose(&context, 0, 6, &greedy, &mut rng).unwrap();
        let b = candle.propose(&context, 0, 6, &greedy, &mut rng).unwrap();
        assert_eq!(a.tokens, b.tokens, "round {round}: drafts differ");
        context.extend_from_slice(&a.tokens);
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn backends_that_are_not_built_in_say_which_feature_they_need() {
    let path: PathBuf = fetch::ensure_default_model(false).unwrap();
    let model = LoadedModel::load(&path).unwrap();
    if !cfg!(feature = "metal") {
        let err = build_draft(&DraftSpec::Layers(4), Backend::Metal, &model, &path).err().expect("no Metal in this build").to_string();
        assert!(err.contains("--backend metal") && err.contains("--features metal"), "{err}");
    }
    let err = "tpu".parse::<Backend>().unwrap_err().to_string();
    assert!(err.contains("--backend tpu"), "{err}");
}
