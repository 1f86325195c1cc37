//! Qwen2, Qwen3, Phi-3 and Gemma 2: Q and K rows in rotate-half order in
//! their GGUF files as in Hugging Face folders, Qwen2's Q/K/V biases,
//! Qwen3's norms over each query and key head and heads wider than hidden
//! / heads, Gemma 2's scaled embeddings, GeGLU, output norms and
//! soft-capped scores and logits,
//! Phi-3's stacked projections (`attn_qkv`, `ffn_up` holding gate and up),
//! and the RoPE of
//! Phi-3.5 and Phi-4-mini (LongRoPE's short factors and attention factor,
//! rotation of part of each head). A tiny random model, written each way,
//! gives the logits of a plain forward written here the way transformers
//! computes (rotate-half RoPE, biases added after the projections).

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{scratch, tiny_llama, TinySpec};
use std::collections::HashMap;
use tandem_model::{hf, Llama, LoadedModel, LogitsFor, SeqPass, SessionRng};

const VOCAB: usize = 48;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 40;
/// Layers of the tiny models (Gemma 3's has six: five local, one global).
const LAYERS: usize = 2;
const THETA: f32 = 1_000_000.0;
const EPS: f32 = 1e-6;
/// Gemma 2's soft caps, scaled down to the tiny model's scores (a few
/// units) and logits (about five), so they bend them visibly.
const GEMMA_ATTN_CAP: f32 = 2.0;
const GEMMA_FINAL_CAP: f32 = 3.0;
/// The kernels' f32 arithmetic differs from the plain loops' (order of
/// sums, polynomial exp): a few parts in 10⁴ of logits of about 5.
const TOLERANCE: f32 = 5e-3;

/// Row-major matrices and vectors by Hugging Face name.
type Weights = HashMap<String, (Vec<f32>, Vec<usize>)>;

/// How the model's RoPE turns each head.
#[derive(Clone)]
struct Rope {
    /// The first dimensions of each head, rotated; the rest pass through.
    rotary_dim: usize,
    /// LongRoPE: the short factors (one per rotated pair), the long ones
    /// (which a context within the original one leaves unused) and the
    /// contexts, original and extended.
    long_rope: Option<LongRope>,
    /// Every frequency divided by this (`rope.scaling.factor`, linear).
    linear: f32,
}

#[derive(Clone)]
struct LongRope {
    short: Vec<f32>,
    long: Vec<f32>,
    original: usize,
    extended: usize,
}

impl LongRope {
    /// transformers' default: √(1 + ln(extended/original) / ln(original)).
    fn attn_factor(&self) -> f32 {
        (1.0 + (self.extended as f32 / self.original as f32).ln() / (self.original as f32).ln()).sqrt()
    }
}

const PLAIN: Rope = Rope { rotary_dim: HEAD_DIM, long_rope: None, linear: 1.0 };

/// Gemma's local layers in the tiny models: windows of this many
/// positions (Gemma 2's every other layer, Gemma 3's five of six), and
/// Gemma 3's RoPE base there (llama.cpp's, fixed).
const GEMMA2_WINDOW: usize = 5;
const GEMMA3_WINDOW: usize = 4;
const GEMMA3_LOCAL_THETA: f32 = 10_000.0;

/// Layers in `w`.
fn layers(w: &Weights) -> usize {
    w.keys().filter(|name| name.ends_with(".input_layernorm.weight")).count()
}

/// Gemma 3 (Gemma with per-head Q/K norms), whose layers `l % 6 < 5` are local.
fn is_gemma3(w: &Weights) -> bool {
    w.contains_key("model.layers.0.post_attn_out_norm.weight") && w.contains_key("model.layers.0.self_attn.q_norm.weight")
}

/// A tiny model of `layers` layers with heads `head_dim` wide (Q/K/V
/// biases included), and Qwen3's Q and K norms with `qk_norms`.
fn random_weights(seed: u64, layers: usize, head_dim: usize, qk_norms: bool) -> Weights {
    let mut rng = SessionRng::new(seed);
    let mut w = Weights::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let v = (0..shape.iter().product()).map(|_| offset + (rng.next_f64() as f32 * 2.0 - 1.0) * scale).collect();
        w.insert(name, (v, shape));
    };
    let (q, kv) = (HEADS * head_dim, KV_HEADS * head_dim);
    put("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    put("model.norm.weight".into(), vec![HIDDEN], 0.2, 1.0);
    put("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.5, 0.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let s = 1.0 / (HIDDEN as f32).sqrt();
        put(format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN], 0.2, 1.0);
        put(format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN], 1.7 * s, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN], 1.7 * s, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN], 1.7 * s, 0.0);
        // Biases as large as Qwen2's (its K biases reach tens).
        put(format!("{p}.self_attn.q_proj.bias"), vec![q], 1.0, 0.0);
        put(format!("{p}.self_attn.k_proj.bias"), vec![kv], 2.0, 0.0);
        put(format!("{p}.self_attn.v_proj.bias"), vec![kv], 0.5, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q], 1.7 / (q as f32).sqrt(), 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN], 1.7 * s, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN], 1.7 * s, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN], 1.7 / (FFN as f32).sqrt(), 0.0);
        if qk_norms {
            // Gains far from one, so a gain on the wrong dimension shows.
            put(format!("{p}.self_attn.q_norm.weight"), vec![head_dim], 0.6, 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), vec![head_dim], 0.6, 1.0);
        }
    }
    w
}

/// Each head's width in `w`.
fn head_dim(w: &Weights) -> usize {
    w["model.layers.0.self_attn.q_proj.weight"].1[0] / HEADS
}

/// GGUF's name of a Hugging Face tensor name.
fn gguf_name(hf_name: &str) -> String {
    let names = ["token_embd.weight", "output_norm.weight", "output.weight"];
    if let Some(n) = names.iter().find(|n| hf::hf_name(n).as_deref() == Some(hf_name)) {
        return n.to_string();
    }
    // Gemma 2's output norms, named here apart from llama's names (its
    // folders call its pre-feed-forward norm `pre_feedforward_layernorm`
    // and its attention output's `post_attention_layernorm`).
    for (here, gguf) in [("post_attn_out_norm", "post_attention_norm"), ("post_ffn_out_norm", "post_ffw_norm")] {
        if let Some(layer) = hf_name.strip_prefix("model.layers.").and_then(|r| r.strip_suffix(&format!(".{here}.weight"))) {
            return format!("blk.{layer}.{gguf}.weight");
        }
    }
    let parts = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_q_norm", "attn_k_norm"];
    for l in 0..8 {
        for part in parts {
            for kind in ["weight", "bias"] {
                let name = format!("blk.{l}.{part}.{kind}");
                if hf::hf_name(&name).as_deref() == Some(hf_name) {
                    return name;
                }
            }
        }
    }
    panic!("no GGUF name for {hf_name}")
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Writes the weights as llama.cpp writes a GGUF of `arch` (`qwen2` or
/// `phi3`): tensors in rotate-half order, metadata under `ARCH.`; Phi-3's
/// Q, K and V stacked in `attn_qkv`, its gate and up in `ffn_up`.
fn write_gguf(w: &Weights, rope: &Rope, path: &std::path::Path, arch: &str) {
    let u = |v: usize| gguf_file::Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata = vec![
        ("general.architecture".to_string(), gguf_file::Value::String(arch.into())),
        (key("block_count"), u(layers(w))),
        (key("context_length"), u(rope.long_rope.as_ref().map_or(64, |l| l.extended))),
        (key("embedding_length"), u(HIDDEN)),
        (key("feed_forward_length"), u(FFN)),
        (key("attention.head_count"), u(HEADS)),
        (key("attention.head_count_kv"), u(KV_HEADS)),
        (key("rope.dimension_count"), u(rope.rotary_dim)),
        (key("rope.freq_base"), gguf_file::Value::F32(THETA)),
        (key("attention.layer_norm_rms_epsilon"), gguf_file::Value::F32(EPS)),
    ];
    if arch == "gemma2" {
        metadata.push((key("attn_logit_softcapping"), gguf_file::Value::F32(GEMMA_ATTN_CAP)));
        metadata.push((key("final_logit_softcapping"), gguf_file::Value::F32(GEMMA_FINAL_CAP)));
        metadata.push((key("attention.sliding_window"), u(GEMMA2_WINDOW)));
    }
    if arch == "gemma3" {
        metadata.push((key("attention.sliding_window"), u(GEMMA3_WINDOW)));
    }
    if rope.linear != 1.0 {
        metadata.push((key("rope.scaling.type"), gguf_file::Value::String("linear".into())));
        metadata.push((key("rope.scaling.factor"), gguf_file::Value::F32(rope.linear)));
    }
    if head_dim(w) != HIDDEN / HEADS {
        metadata.push((key("attention.key_length"), u(head_dim(w))));
        metadata.push((key("attention.value_length"), u(head_dim(w))));
    }
    let mut named: HashMap<String, (Vec<f32>, Vec<usize>)> = w.iter().map(|(name, t)| (gguf_name(name), t.clone())).collect();
    // As llama.cpp's converter writes LongRoPE: both factor sets as
    // tensors, the original context and the attention factor as metadata.
    if let Some(l) = &rope.long_rope {
        metadata.push((key("rope.scaling.original_context_length"), u(l.original)));
        metadata.push((key("rope.scaling.attn_factor"), gguf_file::Value::F32(l.attn_factor())));
        named.insert("rope_factors_short.weight".into(), (l.short.clone(), vec![l.short.len()]));
        named.insert("rope_factors_long.weight".into(), (l.long.clone(), vec![l.long.len()]));
    }
    if arch == "phi3" {
        for l in 0..layers(w) {
            let mut stack = |parts: [&str; 3], into: &str| {
                let (mut values, mut rows) = (Vec::new(), 0);
                for part in parts.iter().filter(|p| !p.is_empty()) {
                    let (v, shape) = named.remove(&format!("blk.{l}.{part}.weight")).unwrap();
                    values.extend(v);
                    rows += shape[0];
                }
                named.insert(format!("blk.{l}.{into}.weight"), (values, vec![rows, HIDDEN]));
            };
            stack(["attn_q", "attn_k", "attn_v"], "attn_qkv");
            stack(["ffn_gate", "ffn_up", ""], "ffn_up");
        }
    }
    let tensors: Vec<(String, QTensor)> =
        named.iter().map(|(name, (v, shape))| (name.clone(), QTensor::quantize(&tensor(v, shape), GgmlDType::F32).unwrap())).collect();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &ts).unwrap();
}

/// Writes the weights as a Hugging Face folder of `model_type` (`qwen2`, or
/// `phi3` with Q, K and V stacked in `qkv_proj` and gate and up in
/// `gate_up_proj`), with a tokenizer of the same size borrowed from a tiny
/// llama.
fn write_folder(w: &Weights, rope: &Rope, dir: &std::path::Path, model_type: &str) {
    let mut tensors: HashMap<String, Tensor> = w.iter().map(|(name, (v, shape))| (name.clone(), tensor(v, shape))).collect();
    if model_type == "phi3" {
        for l in 0..layers(w) {
            let p = format!("model.layers.{l}");
            let mut stack = |parts: &[&str], into: &str| {
                let parts: Vec<Tensor> = parts.iter().map(|part| tensors.remove(&format!("{p}.{part}.weight")).unwrap()).collect();
                tensors.insert(format!("{p}.{into}.weight"), Tensor::cat(&parts, 0).unwrap());
            };
            stack(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.qkv_proj");
            stack(&["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj");
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers(w),
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "head_dim": head_dim(w),
        "rope_theta": THETA,
        "rms_norm_eps": EPS,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
    });
    // As Phi-3.5 and Phi-4-mini write them.
    if rope.rotary_dim != head_dim(w) {
        config["partial_rotary_factor"] = (rope.rotary_dim as f64 / head_dim(w) as f64).into();
    }
    if let Some(l) = &rope.long_rope {
        config["rope_scaling"] = serde_json::json!({ "type": "longrope", "short_factor": l.short, "long_factor": l.long });
        config["original_max_position_embeddings"] = l.original.into();
        config["max_position_embeddings"] = l.extended.into();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let spec = TinySpec { vocab: VOCAB, hidden: 8, heads: 2, kv_heads: 1, ffn: 8, layers: 1, dtype: GgmlDType::F32, head_gain: 1.0 };
    let tok = LoadedModel::load(&tiny_llama(dir, "tokenizer-source.gguf", &spec, 1)).unwrap().tokenizer;
    std::fs::write(dir.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    std::fs::remove_file(dir.join("tokenizer-source.gguf")).unwrap();
}

fn matvec(w: &Weights, name: &str, x: &[f32]) -> Vec<f32> {
    let (v, shape) = &w[name];
    let mut out: Vec<f32> = v.chunks_exact(shape[1]).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
    if let Some((bias, _)) = w.get(&name.replace(".weight", ".bias")) {
        out.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
    }
    out
}

fn rms_norm(x: &[f32], gain: &[f32]) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + EPS).sqrt();
    x.iter().zip(gain).map(|(v, g)| v * r * g).collect()
}

/// Rotate-half RoPE on the first `rope.rotary_dim` dimensions of every
/// head of `x` at `pos`, as transformers computes it (`local`: a Gemma 3
/// local layer's, of its own base and unscaled).
fn apply_rope(rope: &Rope, x: &mut [f32], head_dim: usize, pos: usize, local: bool) {
    let half = rope.rotary_dim / 2;
    let scale = rope.long_rope.as_ref().map_or(1.0, |l| l.attn_factor() as f64);
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let factor = rope.long_rope.as_ref().map_or(1.0, |l| l.short[i] as f64);
            let theta = if local { GEMMA3_LOCAL_THETA } else { THETA } as f64;
            let divisor = if local { 1.0 } else { factor * rope.linear as f64 };
            let angle = pos as f64 / (theta.powf(2.0 * i as f64 / rope.rotary_dim as f64) * divisor);
            let (c, s) = ((angle.cos() * scale) as f32, (angle.sin() * scale) as f32);
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

/// Logits of every position of `tokens`, computed plainly.
fn reference(w: &Weights, rope: &Rope, tokens: &[u32]) -> Vec<Vec<f32>> {
    let hd = head_dim(w);
    // Qwen3's norm over each head, where the model has one.
    let head_norm = |x: &mut Vec<f32>, name: String| {
        if let Some((gain, _)) = w.get(&name) {
            *x = x.chunks_exact(hd).flat_map(|head| rms_norm(head, gain)).collect();
        }
    };
    let gemma = w.contains_key("model.layers.0.post_attn_out_norm.weight");
    // Gemma 2 and 3: norms of the attention's and the feed-forward's
    // outputs; Gemma 2: soft caps.
    let capped = gemma && !is_gemma3(w);
    let cap = |x: f32, cap: f32| if capped { cap * (x / cap).tanh() } else { x };
    let out_norm = |y: Vec<f32>, name: String| match w.get(&name) {
        Some((gain, _)) => rms_norm(&y, gain),
        None => y,
    };
    let embed = &w["model.embed_tokens.weight"].0;
    let embed_scale = if gemma { (HIDDEN as f32).sqrt() } else { 1.0 };
    let mut xs: Vec<Vec<f32>> = tokens.iter().map(|&t| embed[t as usize * HIDDEN..][..HIDDEN].iter().map(|v| v * embed_scale).collect()).collect();
    for l in 0..layers(w) {
        let p = format!("model.layers.{l}");
        // Local layers: their window, and Gemma 3's own RoPE.
        let window = match (w.contains_key("model.layers.0.post_attn_out_norm.weight"), is_gemma3(w)) {
            (true, true) => Some(GEMMA3_WINDOW).filter(|_| l % 6 < 5),
            (true, false) => Some(GEMMA2_WINDOW).filter(|_| l % 2 == 0),
            _ => None,
        };
        let local = window.is_some() && is_gemma3(w);
        let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let h = rms_norm(x, &w[&format!("{p}.input_layernorm.weight")].0);
            let (mut q, mut k) = (matvec(w, &format!("{p}.self_attn.q_proj.weight"), &h), matvec(w, &format!("{p}.self_attn.k_proj.weight"), &h));
            head_norm(&mut q, format!("{p}.self_attn.q_norm.weight"));
            head_norm(&mut k, format!("{p}.self_attn.k_norm.weight"));
            apply_rope(rope, &mut q, hd, pos, local);
            apply_rope(rope, &mut k, hd, pos, local);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(w, &format!("{p}.self_attn.v_proj.weight"), &h));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f32; HEADS * hd];
            for head in 0..HEADS {
                let kv = head / (HEADS / KV_HEADS);
                let q = &qs[pos][head * hd..][..hd];
                let scores: Vec<f32> = (0..=pos)
                    .map(|j| cap(q.iter().zip(&ks[j][kv * hd..][..hd]).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt(), GEMMA_ATTN_CAP))
                    .collect();
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let max = scores[first..].iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().enumerate().map(|(j, s)| if j < first { 0.0 } else { (s - max).exp() }).collect();
                let sum: f32 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += p / sum * vs[j][kv * hd + d];
                    }
                }
            }
            let o = out_norm(matvec(w, &format!("{p}.self_attn.o_proj.weight"), &attn), format!("{p}.post_attn_out_norm.weight"));
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rms_norm(x, &w[&format!("{p}.post_attention_layernorm.weight")].0);
            let (gate, up) = (matvec(w, &format!("{p}.mlp.gate_proj.weight"), &h), matvec(w, &format!("{p}.mlp.up_proj.weight"), &h));
            let act = |g: f32| {
                if gemma {
                    0.5 * g * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (g + 0.044715 * g.powi(3))).tanh())
                } else {
                    g / (1.0 + (-g).exp())
                }
            };
            let gated: Vec<f32> = gate.iter().zip(&up).map(|(&g, u)| act(g) * u).collect();
            let down = out_norm(matvec(w, &format!("{p}.mlp.down_proj.weight"), &gated), format!("{p}.post_ffn_out_norm.weight"));
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
    }
    // Tied (Gemma): the embedding table is the head.
    let head = if w.contains_key("lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
    xs.iter().map(|x| matvec(w, head, &rms_norm(x, &w["model.norm.weight"].0)).into_iter().map(|l| cap(l, GEMMA_FINAL_CAP)).collect()).collect()
}

fn logits(llama: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = llama.new_cache(llama.config().n_layers);
    let out = llama.forward(&mut [SeqPass { cache: &mut cache, tokens, logits: LogitsFor::All }]).unwrap();
    (0..tokens.len()).map(|i| out[0].row(i).to_vec()).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn a_qwen2_gguf_and_folder_give_the_plain_forwards_logits() {
    let w = random_weights(11, LAYERS, HEAD_DIM, false);
    let tokens: Vec<u32> = vec![3, 17, 42, 5, 5, 29, 0, 11, 38, 47, 2, 20];
    let want = assert_gguf_and_folder_match_the_plain_forward(&w, &PLAIN, &tokens, "qwen2");
    // The biases matter here: without them the logits are far off.
    let mut unbiased = w.clone();
    unbiased.retain(|name, _| !name.ends_with(".bias"));
    assert!(max_diff(&reference(&unbiased, &PLAIN, &tokens), &want) > 100.0 * TOLERANCE);
}

#[test]
fn a_phi3_gguf_and_folder_with_stacked_projections_give_the_plain_forwards_logits() {
    let mut w = random_weights(12, LAYERS, HEAD_DIM, false);
    w.retain(|name, _| !name.ends_with(".bias"));
    assert_gguf_and_folder_match_the_plain_forward(&w, &PLAIN, &[9, 1, 33, 33, 14, 40, 7, 26, 2, 45], "phi3");
}

/// Qwen3: no biases, a norm over each query and key head before RoPE,
/// and heads wider than hidden / heads (12 here, as Qwen3-0.6B's 16 heads
/// of 128 make 2048 for a hidden size of 1024).
#[test]
fn a_qwen3_gguf_and_folder_with_head_norms_and_wide_heads_give_the_plain_forwards_logits() {
    let mut w = random_weights(14, LAYERS, 12, true);
    w.retain(|name, _| !name.ends_with(".bias"));
    let rope = Rope { rotary_dim: 12, long_rope: None, linear: 1.0 };
    let tokens: Vec<u32> = vec![4, 19, 19, 40, 2, 33, 8, 27, 11, 46, 0, 5];
    let want = assert_gguf_and_folder_match_the_plain_forward(&w, &rope, &tokens, "qwen3");
    // The norms matter: without them the logits are far off.
    let mut unnormed = w.clone();
    unnormed.retain(|name, _| !name.ends_with(".q_norm.weight") && !name.ends_with(".k_norm.weight"));
    assert!(max_diff(&reference(&unnormed, &rope, &tokens), &want) > 100.0 * TOLERANCE);
}

/// Gemma 2, as llama.cpp writes its GGUF files: tied embeddings scaled by
/// √hidden, GeGLU, norms of the attention's and the feed-forward's
/// outputs, soft-capped scores and logits, every other layer (the even
/// ones) attending to the last 5 positions. Hugging Face folders of Gemma
/// are refused (`model/tests/hf_folder.rs`).
#[test]
fn a_gemma2_gguf_gives_the_plain_forwards_logits() {
    let mut w = random_weights(15, LAYERS, HEAD_DIM, false);
    as_gemma(&mut w, 16);
    let tokens: Vec<u32> = vec![6, 31, 2, 2, 45, 17, 9, 38, 0, 23, 12, 41];
    let want = assert_gguf_matches_the_plain_forward(&w, &PLAIN, &tokens, "gemma2");
    // What Gemma adds matters: as a llama, the logits are far off.
    let mut as_llama = w.clone();
    as_llama.retain(|name, _| !name.contains("_out_norm"));
    as_llama.insert("lm_head.weight".into(), (w["model.embed_tokens.weight"].0.clone(), vec![VOCAB, HIDDEN]));
    assert!(max_diff(&reference(&as_llama, &PLAIN, &tokens), &want) > 100.0 * TOLERANCE);
}

/// Writes `w` as an `arch` GGUF, checks that it gives the plain forward's
/// logits for `tokens` and serves the context it should (all 64 positions,
/// or LongRoPE's original context), and returns those logits.
fn assert_gguf_matches_the_plain_forward(w: &Weights, rope: &Rope, tokens: &[u32], arch: &str) -> Vec<Vec<f32>> {
    let want = reference(w, rope, tokens);
    let path = scratch(arch).join(format!("tiny-{arch}.gguf"));
    write_gguf(w, rope, &path, arch);
    let llama = load_gguf(&path);
    assert_eq!(llama.config().context_len, context_served(rope));
    let got = logits(&llama, tokens);
    assert!(max_diff(&got, &want) < TOLERANCE, "{arch} GGUF: max |Δ| {}", max_diff(&got, &want));
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    want
}

fn context_served(rope: &Rope) -> usize {
    rope.long_rope.as_ref().map_or(64, |l| l.original)
}

/// `w` as Gemma's: no biases, a tied head, norms of each layer's
/// attention and feed-forward outputs.
fn as_gemma(w: &mut Weights, seed: u64) {
    w.retain(|name, _| !name.ends_with(".bias") && name != "lm_head.weight");
    let mut rng = SessionRng::new(seed);
    for l in 0..layers(w) {
        for norm in ["post_attn_out_norm", "post_ffn_out_norm"] {
            let gain = (0..HIDDEN).map(|_| 1.0 + (rng.next_f64() as f32 * 2.0 - 1.0) * 0.2).collect();
            w.insert(format!("model.layers.{l}.{norm}.weight"), (gain, vec![HIDDEN]));
        }
    }
}

/// Gemma 3, its 1B layout scaled down: Gemma 2's layers without soft
/// caps, Qwen3's per-head norms, and six layers, the first five local
/// (the last 4 positions, RoPE of base 10000 unscaled), the sixth global
/// (the whole context, RoPE frequencies divided by the linear factor of
/// the 4B and larger models). The context is not cut to the window.
#[test]
fn a_gemma3_gguf_with_local_layers_gives_the_plain_forwards_logits() {
    let mut w = random_weights(17, 6, HEAD_DIM, true);
    as_gemma(&mut w, 18);
    let tokens: Vec<u32> = (0..14).map(|i| (i * 11 + 5) % VOCAB as u32).collect();
    assert_gguf_matches_the_plain_forward(&w, &Rope { linear: 2.0, ..PLAIN }, &tokens, "gemma3");
}

/// Phi-4-mini's RoPE, scaled down: LongRoPE over 3/4 of each head. The
/// model serves its original context, with the short factors.
#[test]
fn a_phi3_with_long_rope_over_part_of_each_head_gives_the_plain_forwards_logits() {
    let mut w = random_weights(13, LAYERS, HEAD_DIM, false);
    w.retain(|name, _| !name.ends_with(".bias"));
    let long_rope = LongRope { short: vec![1.0, 1.7, 3.1], long: vec![2.0, 5.0, 9.0], original: 48, extended: 256 };
    let rope = Rope { rotary_dim: 6, long_rope: Some(long_rope), linear: 1.0 };
    // Positions far enough apart for the factors to turn them visibly.
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let want = assert_gguf_and_folder_match_the_plain_forward(&w, &rope, &tokens, "phi3");
    // Each part matters: the whole head rotated, or plain frequencies, or
    // no attention factor, give other logits.
    let long_rope = rope.long_rope.clone().unwrap();
    let whole_heads = LongRope { short: vec![1.0, 1.7, 3.1, 1.0], long: vec![1.0; 4], ..long_rope.clone() };
    let plain_factors = LongRope { short: vec![1.0; 3], ..long_rope.clone() };
    let unscaled = LongRope { extended: 48, ..long_rope };
    let others = [(HEAD_DIM, whole_heads), (6, plain_factors), (6, unscaled)];
    for other in others.map(|(rotary_dim, l)| Rope { rotary_dim, long_rope: Some(l), linear: 1.0 }) {
        assert!(max_diff(&reference(&w, &other, &tokens), &want) > 20.0 * TOLERANCE);
    }
}

/// [`assert_gguf_matches_the_plain_forward`], and the same of `w` written
/// as a Hugging Face folder.
fn assert_gguf_and_folder_match_the_plain_forward(w: &Weights, rope: &Rope, tokens: &[u32], arch: &str) -> Vec<Vec<f32>> {
    let want = assert_gguf_matches_the_plain_forward(w, rope, tokens, arch);
    let dir = scratch(&format!("{arch}-folder"));
    let llama = load_folder(w, rope, &dir, arch);
    assert_eq!(llama.config().context_len, context_served(rope));
    let got = logits(&llama, tokens);
    assert!(max_diff(&got, &want) < TOLERANCE, "{arch} folder: max |Δ| {}", max_diff(&got, &want));
    std::fs::remove_dir_all(dir).unwrap();
    want
}

fn load_folder(w: &Weights, rope: &Rope, dir: &std::path::Path, model_type: &str) -> std::sync::Arc<Llama> {
    let folder = dir.join(model_type);
    std::fs::create_dir_all(&folder).unwrap();
    write_folder(w, rope, &folder, model_type);
    LoadedModel::load(&folder).unwrap().llama
}

fn load_gguf(path: &std::path::Path) -> Llama {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Llama::from_gguf(&content, &mut file).unwrap()
}
