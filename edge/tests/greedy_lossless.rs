//! Greedy speculative decoding emits exactly the target's own tokens, for
//! every draft source, on chat, code and long-context prompts.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tandem_edge::{GenerateRequest, LocalTarget, Speculator};
use tandem_model::{fetch, DraftSpec, LoadedModel, ModelError, SamplingParams};

fn prompts(tok: &tandem_model::Tokenizer) -> Vec<(&'static str, Vec<u32>)> {
    let readme = include_str!("../../README.md");
    let long: String = readme.chars().take(2400).collect();
    vec![
        ("chat", tok.chat_prompt("What are three tips for staying healthy?")),
        ("chat-poem", tok.chat_prompt("Write a haiku about the sea.")),
        ("code-chat", tok.chat_prompt("Write a Python function that checks whether a string is a palindrome.")),
        ("code-raw", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".to_string()),
        ("long-context", tok.chat_prompt(&format!("{long}\n\nSummarise the text above in two sentences."))),
    ]
    .into_iter()
    .map(|(name, text)| (name, tok.encode(&text).unwrap()))
    .collect()
}

/// Writes a copy of `src` with every Q4_1 weight re-quantized to Q4_0 (a
/// cheaper, different model with the same vocabulary), optionally swapping
/// vocabulary entries `i` and `i + 1` (a loadable but different vocabulary).
fn requantized_copy(src: &Path, dst: &Path, corrupt_token: Option<usize>) -> PathBuf {
    let mut file = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let t = if t.dtype() == GgmlDType::Q4_1 { QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q4_0).unwrap() } else { t };
        tensors.push((name.clone(), t));
    }
    let mut metadata = content.metadata.clone();
    if let Some(i) = corrupt_token {
        if let Some(Value::Array(tokens)) = metadata.get_mut("tokenizer.ggml.tokens") {
            tokens.swap(i, i + 1);
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md, &ts).unwrap();
    dst.to_path_buf()
}

fn speculator(target: &LoadedModel, draft: &DraftSpec) -> Speculator<LocalTarget> {
    Speculator::new(LocalTarget::new(target.clone()), draft.build(target).unwrap(), target.tokenizer.clone())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-edge-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_draft_source_reproduces_plain_greedy_decoding() {
    let path = fetch::ensure_default_model(false).unwrap();
    let target = LoadedModel::load(&path).unwrap();
    let dir = scratch("lossless");
    let q4_0 = requantized_copy(&path, &dir.join("q4_0.gguf"), None);
    let lookup = |spec: DraftSpec| DraftSpec::WithLookup(Box::new(spec));
    let drafts = [
        DraftSpec::Ngram,
        DraftSpec::Layers(20),
        DraftSpec::Layers(25),
        DraftSpec::Model(q4_0),
        DraftSpec::Trained(None),
        lookup(DraftSpec::Layers(20)),
        lookup(DraftSpec::Trained(None)),
    ];
    let mut failures = Vec::new();
    for (name, prompt) in prompts(&target.tokenizer) {
        let req = GenerateRequest { prompt, max_new_tokens: 32, draft_len: 4, sampling: SamplingParams::default(), logprobs: None };
        let plain = speculator(&target, &DraftSpec::None).generate(&req, |_| {}).unwrap();
        assert_eq!(plain.rounds, plain.tokens.len() - 1, "plain decoding verifies one token per round");
        for spec in &drafts {
            let mut gen = speculator(&target, spec);
            let mut streamed = Vec::new();
            let g = gen.generate(&req, |e| streamed.push(e.token)).unwrap();
            let label = if matches!(spec, DraftSpec::Model(_)) { "model:q4_0".to_string() } else { spec.to_string() };
            eprintln!("{name:>13} {label:>10}: acceptance {:5.1} %, {:.2} tokens/round, {} rounds", 100.0 * g.acceptance_rate, g.tokens_per_round, g.rounds);
            assert_eq!(streamed, g.tokens, "streamed tokens differ from the result");
            if g.tokens != plain.tokens {
                failures.push(format!("{name} with {label}: {:?} vs {:?}", g.tokens, plain.tokens));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "speculative output differs from plain decoding:\n{}", failures.join("\n"));
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let path = fetch::ensure_default_model(false).unwrap();
    let target = LoadedModel::load(&path).unwrap();
    let dir = scratch("mismatch");
    let other = requantized_copy(&path, &dir.join("other-vocab.gguf"), Some(1000));
    let err = match DraftSpec::Model(other).build(&target) {
        Err(e) => e,
        Ok(_) => panic!("a draft with a different vocabulary was accepted"),
    };
    assert!(matches!(err, ModelError::DraftMismatch { .. }), "{err}");
    assert!(err.to_string().contains("token 1000"), "{err}");
    let err = match DraftSpec::Layers(31).build(&target) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("layers:31 accepted for a 30-layer model"),
    };
    assert!(err.contains("layers:31") && err.contains("30"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
