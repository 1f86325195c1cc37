//! A Hugging Face folder as the model: the default GGUF written out as one
//! (the weights dequantized to f32, Q and K rows back in Hugging Face's
//! rotate-half order, names, config and tokenizer as transformers writes
//! them) loads into the same model: the same tokens, and logits within
//! float rounding of the same weights run by candle's f32 matmuls.

mod common;

use common::{scratch, write_folder};
use tandem_model::kernels::MatmulKernels;
use tandem_model::*;

fn last_logits(model: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(model.config().n_layers);
    model.forward(&mut [SeqPass { cache: &mut cache, tokens, logits: LogitsFor::Last }]).unwrap().remove(0).into_row(0)
}

#[test]
fn a_hugging_face_folder_of_the_default_model_loads_as_the_same_model() {
    let gguf = fetch::ensure_default_model(false).unwrap();
    let target = LoadedModel::load(&gguf).unwrap();
    let dir = write_folder(&gguf, &scratch("hf-folder"), &target, 1);
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

    // Quantized as it loads into the types the GGUF holds (Q4_1 layers, a
    // Q8_0 embedding), the folder is that GGUF again: quantizing the
    // GGUF's dequantized blocks gives back their scales and quants, so the
    // logits are the same bits.
    let quantized = LoadedModel::load_as(&dir, MatmulKernels::Tandem, Some("q4_1".parse().unwrap())).unwrap();
    let prompt = &prompt[..prompt.len() - 3];
    assert!(last_logits(&quantized.llama, prompt) == last_logits(&target.llama, prompt), "a Q4_1 load of the folder is not the Q4_1 GGUF");
    let err = LoadedModel::load_as(&gguf, MatmulKernels::Tandem, Some("q8_0".parse().unwrap())).err().expect("a GGUF is not quantized again").to_string();
    assert!(err.contains("`--quantize q8_0`") && err.contains("quantized already"), "{err}");
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
        (serde_json::json!({ "rope_scaling": { "rope_type": "yarn", "factor": 8.0 } }), "rope_scaling of type `yarn`"),
        (serde_json::json!({ "rope_scaling": { "rope_type": "llama3", "factor": 8.0 } }), "without a numeric `low_freq_factor`"),
        (serde_json::json!({ "model_type": "gemma" }), "model_type `gemma`"),
        (serde_json::json!({ "model_type": "qwen2", "use_sliding_window": true }), "use_sliding_window"),
        // One dimension of each head's 16: not a pair.
        (serde_json::json!({ "model_type": "phi3", "partial_rotary_factor": 0.1 }), "partial_rotary_factor: RoPE over 1 of each head's 16"),
        (
            serde_json::json!({ "rope_scaling": { "type": "longrope", "long_factor": [1.0] }, "original_max_position_embeddings": 64 }),
            "`short_factor` has 0 numbers",
        ),
        (serde_json::json!({}), "model.safetensors"),
    ] {
        config(extra);
        let err = LoadedModel::load(&dir).err().expect("refused").to_string();
        assert!(err.contains(needle), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A GGUF's `rope_freqs.weight` (llama.cpp writes it for Llama 3.1 and
/// later) divides each pair's RoPE frequency, as config.json's
/// `rope_scaling` does for a folder.
#[test]
fn a_gguf_s_rope_frequency_factors_divide_its_rope_frequencies() {
    use candle_core::quantized::gguf_file;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let dir = scratch("rope-freqs");
    let spec = common::TinySpec { vocab: 50, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, layers: 1, dtype: GgmlDType::Q8_0, head_gain: 1.0 };
    let plain = common::tiny_llama(&dir, "plain.gguf", &spec, 3);
    // The same file with a rope_freqs tensor: head_dim 16, so 8 pairs.
    let factors = [1.0f32, 1.0, 1.5, 2.0, 4.0, 8.0, 8.0, 8.0];
    let mut file = std::fs::File::open(&plain).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = content.tensor_infos.keys().map(|n| (n.clone(), content.tensor(&mut file, n, &Device::Cpu).unwrap())).collect();
    let freqs = Tensor::from_vec(factors.to_vec(), 8, &Device::Cpu).unwrap();
    tensors.push(("rope_freqs.weight".into(), QTensor::quantize(&freqs, GgmlDType::F32).unwrap()));
    let scaled = dir.join("scaled.gguf");
    let md: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&scaled).unwrap(), &md, &ts).unwrap();

    let (plain, scaled) = (LoadedModel::load(&plain).unwrap(), LoadedModel::load(&scaled).unwrap());
    assert_eq!(scaled.llama.config().rope_freq_factors.as_deref(), Some(&factors[..]));
    let ((cos0, sin0), (cos1, sin1)) = (plain.llama.rope_tables(), scaled.llama.rope_tables());
    let pos = 100;
    for (i, &f) in factors.iter().enumerate() {
        let (a0, a1) = (sin0[pos * 8 + i].atan2(cos0[pos * 8 + i]), sin1[pos * 8 + i].atan2(cos1[pos * 8 + i]));
        // The angle, divided by the factor (modulo a turn).
        let expected = (pos as f64 / 10_000f64.powf(2.0 * i as f64 / 16.0) / f as f64).rem_euclid(std::f64::consts::TAU);
        let got = (a1 as f64).rem_euclid(std::f64::consts::TAU);
        assert!((got - expected).abs() < 1e-4 || (got - expected).abs() > std::f64::consts::TAU - 1e-4, "pair {i}: {got} vs {expected}");
        if f == 1.0 {
            assert_eq!(a0, a1, "pair {i}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
