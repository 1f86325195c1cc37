//! A Hugging Face folder as the model: the default GGUF written out as one
//! (the weights dequantized to f32, Q and K rows back in Hugging Face's
//! rotate-half order, names, config and tokenizer as transformers writes
//! them) loads into the same model: the same tokens, and logits within
//! float rounding of the same weights run by candle's f32 matmuls.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::scratch;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tandem_model::kernels::MatmulKernels;
use tandem_model::*;

/// Undoes llama.cpp's converter: each head's rows from pair order
/// (r0, r_half, r1, r_half+1, …) back to halves.
fn rotate_half_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, rows / heads / 2, 2, cols)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((rows, cols)).unwrap()
}

/// Writes the GGUF at `gguf` as a Hugging Face folder in `dir`.
fn write_folder(gguf: &Path, dir: &Path, target: &LoadedModel) -> PathBuf {
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
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
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
        "tie_word_embeddings": !tensors.contains_key("lm_head.weight"),
        "bos_token_id": tok.bos_token(),
        "eos_token_id": tok.eos_tokens()[0],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let template = content.metadata.get("tokenizer.chat_template").map(|v| v.to_string().unwrap().clone());
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({ "chat_template": template }).to_string()).unwrap();
    dir.to_path_buf()
}

fn last_logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(model.config().n_layers);
    model.forward(&mut [SeqPass { cache: &mut cache, tokens, logits: LogitsFor::Last }]).unwrap().remove(0).into_row(0)
}

#[test]
fn a_hugging_face_folder_of_the_default_model_loads_as_the_same_model() {
    let gguf = fetch::ensure_default_model(false).unwrap();
    let target = LoadedModel::load(&gguf).unwrap();
    let dir = write_folder(&gguf, &scratch("hf-folder"), &target);
    let folder = LoadedModel::load(&dir).unwrap();

    // The tokenizer: the same ids, end tokens and chat format.
    let (a, b) = (&target.tokenizer, &folder.tokenizer);
    for text in ["Hello, world!", "def f(x):\n    return x ** 2  # 12345", "naïve café — 東京 🚀", "<|im_start|>user\nhi<|im_end|>"] {
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{text:?}");
    }
    assert_eq!(a.chat_prompt("Name a fruit."), b.chat_prompt("Name a fruit."));
    let sorted = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    assert_eq!(sorted(a.eos_tokens()), sorted(b.eos_tokens()));
    assert_eq!(a.bos_token(), b.bos_token());
    assert_eq!(target.llama.config(), folder.llama.config());

    // The weights: the folder's f32 forward against candle's stock f32
    // matmuls over the same dequantized weights.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let reference = LoadedModel::load_with(&gguf, MatmulKernels::CandleStock).unwrap();
    let mut prompt = a.encode(&a.chat_prompt("What are three tips for staying healthy?")).unwrap();
    for step in 0..8 {
        let (got, want) = (last_logits(&folder.llama, &prompt), last_logits(&reference.llama, &prompt));
        let mut rel: Vec<f32> = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).collect();
        rel.sort_by(f32::total_cmp);
        let (median, worst) = (rel[rel.len() / 2], rel[rel.len() - 1]);
        eprintln!("step {step}: relative logit difference median {median:.2e}, worst {worst:.2e}; argmax {} vs {}", argmax(&got), argmax(&want));
        // Rounding apart (the K/V cache is half precision, and the sums run
        // in another order): about 1e-4 typically, under 1e-2 at worst.
        assert!(median < 2e-3 && worst < 2e-2, "step {step}: logits differ by {median:e} (median), {worst:e} (worst), relative");
        prompt.push(argmax(&want));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn what_the_forward_cannot_run_is_refused_by_name() {
    let dir = scratch("hf-refused");
    std::fs::create_dir_all(&dir).unwrap();
    let config = |extra: serde_json::Value| {
        let mut c = serde_json::json!({ "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 50 });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    };
    for (extra, needle) in [
        (serde_json::json!({ "rope_scaling": { "rope_type": "llama3", "factor": 8.0 } }), "rope_scaling"),
        (serde_json::json!({ "model_type": "qwen2" }), "qwen2"),
        (serde_json::json!({}), "model.safetensors"),
    ] {
        config(extra);
        let err = LoadedModel::load(&dir).err().expect("refused").to_string();
        assert!(err.contains(needle), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
