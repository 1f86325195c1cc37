//! The trained block in candle with autograd: one llama decoder layer (the
//! target's shape), plus, for the EAGLE-style head, the projection of
//! (token embedding, previous target feature) into it. The frozen parts
//! (embedding, final norm, head) come from the target and get no gradient.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::HashMap;
use tandem_model::{LlamaConfig, LoadedModel};

/// Names of the trained tensors, as the draft file stores them.
pub const LAYER_TENSORS: [&str; 9] = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

pub struct Block {
    pub vars: HashMap<String, Var>,
    cfg: LlamaConfig,
}

/// The target's frozen pieces, dequantized once.
pub struct Frozen {
    /// `vocab × hidden`: the embedding table, also the tied head.
    pub embed: Tensor,
    pub head: Tensor,
    pub final_norm: Tensor,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// The target's RMS-norm epsilon.
    pub eps: f32,
    /// Scale at which the draft's own predicted states are fed back
    /// (the target's median state RMS).
    pub state_scale: f32,
}

impl Frozen {
    pub fn new(model: &LoadedModel) -> Result<Self> {
        let llama = &model.llama;
        let cfg = llama.config();
        let embed = dequantize(llama.embedding())?;
        let head = match llama.head().parts() {
            // Tied (SmolLM2): the head is the embedding table itself.
            [m] if std::ptr::eq(m.as_ref(), llama.embedding()) => embed.clone(),
            [m] => dequantize(m)?,
            _ => anyhow::bail!("the target's head is not one matrix"),
        };
        let final_norm = Tensor::from_slice(llama.output_norm(), cfg.hidden, &Device::Cpu)?;
        let (cos, sin) = llama.rope_tables();
        Ok(Frozen { embed, head, final_norm, cos: cos.to_vec(), sin: sin.to_vec(), eps: cfg.rms_eps, state_scale: 1.0 })
    }

    /// A copy whose head scores only the tokens used as labels in `seqs`,
    /// with the labels renumbered into that subset, and the subset's ids.
    pub fn restricted_to_labels(&self, mut seqs: Vec<crate::train_draft::data::Traced>) -> Result<(Frozen, Vec<crate::train_draft::data::Traced>, Vec<u32>)> {
        let mut used: Vec<u32> = seqs.iter().flat_map(|s| s.labels.iter().copied()).collect();
        used.sort_unstable();
        used.dedup();
        for s in &mut seqs {
            for l in &mut s.labels {
                *l = used.binary_search(l).expect("every label is in the subset") as u32;
            }
        }
        let idx = Tensor::from_slice(&used, used.len(), &Device::Cpu)?;
        let head = self.head.index_select(&idx, 0)?;
        let frozen = Frozen { head, embed: self.embed.clone(), final_norm: self.final_norm.clone(), cos: self.cos.clone(), sin: self.sin.clone(), ..*self };
        Ok((frozen, seqs, used))
    }

    /// Embeddings of `tokens`, `n × hidden`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
        Ok(self.embed.index_select(&idx, 0)?)
    }

    /// `(cos, sin)` at `positions`, each `n × head_dim/2 × 1`.
    fn rope_at(&self, positions: &[usize], half: usize) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let table = |t: &[f32]| Tensor::from_vec(positions.iter().flat_map(|&p| &t[p * half..(p + 1) * half]).copied().collect(), (n, half, 1), &Device::Cpu);
        Ok((table(&self.cos)?, table(&self.sin)?))
    }
}

fn dequantize(m: &tandem_model::kernels::QMatrix) -> Result<Tensor> {
    let rows: Vec<f32> = (0..m.rows()).flat_map(|r| m.dequantize_row(r)).collect();
    Ok(Tensor::from_vec(rows, (m.rows(), m.cols()), &Device::Cpu)?)
}

pub fn rms_norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps as f64)?.sqrt()?)?)
}

fn linear(x: &Tensor, w: &Var) -> Result<Tensor> {
    Ok(x.matmul(&w.as_tensor().t()?)?)
}

impl Block {
    /// Initialised from the target's decoder layer `init_layer` (a trained
    /// layer is a far better start than noise); `eagle` adds the input
    /// projection, initialised to "previous feature + token embedding".
    /// A draft layer has no Q/K/V biases: a Qwen2 target's are left out
    /// of the start, and training adapts the weights to their absence.
    pub fn from_target(model: &LoadedModel, init_layer: usize, eagle: bool) -> Result<Self> {
        let llama = &model.llama;
        let cfg = llama.config().clone();
        let w = llama.layer(init_layer);
        let mut vars = HashMap::new();
        let mut put = |name: &str, t: Tensor| -> Result<()> {
            vars.insert(name.to_string(), Var::from_tensor(&t)?);
            Ok(())
        };
        let dequant_parts = |l: &tandem_model::kernels::QLinear| -> Result<Vec<Tensor>> { l.parts().iter().map(|m| dequantize(m)).collect() };
        put("attn_norm", Tensor::from_slice(w.attn_norm, cfg.hidden, &Device::Cpu)?)?;
        let qkv = dequant_parts(w.qkv)?;
        put("attn_q", qkv[0].clone())?;
        put("attn_k", qkv[1].clone())?;
        put("attn_v", qkv[2].clone())?;
        put("attn_output", dequant_parts(w.wo)?.remove(0))?;
        put("ffn_norm", Tensor::from_slice(w.ffn_norm, cfg.hidden, &Device::Cpu)?)?;
        let gate_up = dequant_parts(w.gate_up)?;
        put("ffn_gate", gate_up[0].clone())?;
        put("ffn_up", gate_up[1].clone())?;
        put("ffn_down", dequant_parts(w.down)?.remove(0))?;
        if eagle {
            let eye = Tensor::eye(cfg.hidden, DType::F32, &Device::Cpu)?;
            put("fc", Tensor::cat(&[&eye, &eye], 1)?)?;
        }
        Ok(Block { vars, cfg })
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, cfg: LlamaConfig) -> Result<Self> {
        let vars = tensors.into_iter().map(|(k, t)| Ok((k, Var::from_tensor(&t.to_dtype(DType::F32)?)?))).collect::<Result<_>>()?;
        Ok(Block { vars, cfg })
    }

    fn var(&self, name: &str) -> &Var {
        &self.vars[name]
    }

    pub fn is_eagle(&self) -> bool {
        self.vars.contains_key("fc")
    }

    /// EAGLE-style input: `[embedding | previous feature] · fcᵀ`.
    pub fn project(&self, embedded: &Tensor, previous: &Tensor) -> Result<Tensor> {
        linear(&Tensor::cat(&[embedded, previous], 1)?, self.var("fc"))
    }

    /// One decoder layer over `b` sequences of `t` positions each
    /// (`x`: `b·t × hidden`, positions from 0), causal: the teacher-forced
    /// pass, each position reading the target's previous state. Returns the
    /// output rows and the pass's keys and values, which later drafting
    /// steps attend to.
    pub fn forward(&self, x: &Tensor, b: usize, t: usize, frozen: &Frozen) -> Result<(Tensor, PassKv)> {
        let positions: Vec<usize> = (0..t).collect();
        let (q, kv) = self.attention_inputs(x, b, &positions, frozen)?;
        let scores = q.matmul(&kv.k.t()?)?;
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
        let scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, t), &Device::Cpu)?)?;
        let probs = softmax_last(&scores)?;
        let attn = probs.matmul(&kv.v)?;
        Ok((self.finish(x, attn, b, t)?, kv))
    }

    /// A later drafting step of `b × n` chains (`b` as in `first`;
    /// EAGLE-3's training-time test): chain `c` of each sequence starts
    /// from the teacher-forced position `starts[c]` and has reached
    /// position `positions[c]`. Each
    /// row attends, as drafting does, to the teacher-forced pass's keys up
    /// to its chain's start, to its chain's earlier steps (`chain`, in
    /// order) and to itself: a drafted token sees the verified context
    /// through the target's states and the round's drafts through the
    /// draft's own.
    pub fn forward_chain(
        &self,
        x: &Tensor,
        starts: &[usize],
        positions: &[usize],
        first: &PassKv,
        chain: &[PassKv],
        frozen: &Frozen,
    ) -> Result<(Tensor, PassKv)> {
        let (b, _, t, _) = first.k.dims4()?;
        let n = positions.len();
        let (q, kv) = self.attention_inputs(x, b, positions, frozen)?;
        let mask: Vec<f32> = (0..n * t).map(|i| if i % t > starts[i / t] { -1e9 } else { 0.0 }).collect();
        let verified = q.matmul(&first.k.t()?)?.broadcast_add(&Tensor::from_vec(mask, (n, t), &Device::Cpu)?)?;
        // The chain's steps so far, this one last: one score each.
        let steps: Vec<&PassKv> = chain.iter().chain([&kv]).collect();
        let drafted: Vec<Tensor> = steps.iter().map(|step| (&q * &step.k)?.sum_keepdim(3)).collect::<candle_core::Result<_>>()?;
        let scores = Tensor::cat(&[&[verified], drafted.as_slice()].concat(), 3)?;
        let probs = softmax_last(&scores)?;
        let mut attn = probs.narrow(3, 0, t)?.matmul(&first.v)?;
        for (i, step) in steps.iter().enumerate() {
            attn = (attn + probs.narrow(3, t + i, 1)?.broadcast_mul(&step.v)?)?;
        }
        Ok((self.finish(x, attn, b, n)?, kv))
    }

    /// Queries (scaled by 1/√head_dim) and keys/values of rows `b × n` at
    /// `positions`, `b × heads × n × head_dim`, kv heads repeated.
    fn attention_inputs(&self, x: &Tensor, b: usize, positions: &[usize], frozen: &Frozen) -> Result<(Tensor, PassKv)> {
        let c = &self.cfg;
        let (hd, nh, nkv, n) = (c.head_dim, c.n_heads, c.n_kv_heads, positions.len());
        let h = rms_norm(x, c.rms_eps)?.broadcast_mul(self.var("attn_norm").as_tensor())?;
        let (cos, sin) = frozen.rope_at(positions, hd / 2)?;
        let heads = |y: Tensor, heads: usize| -> Result<Tensor> { Ok(y.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()?) };
        let group = nh / nkv;
        let repeat = |y: Tensor| -> Result<Tensor> { Ok(y.unsqueeze(2)?.broadcast_as((b, nkv, group, n, hd))?.contiguous()?.reshape((b, nh, n, hd))?) };
        let q = (rope(&heads(linear(&h, self.var("attn_q"))?, nh)?, &cos, &sin)? * (1.0 / (hd as f64).sqrt()))?;
        let k = repeat(rope(&heads(linear(&h, self.var("attn_k"))?, nkv)?, &cos, &sin)?)?;
        let v = repeat(heads(linear(&h, self.var("attn_v"))?, nkv)?)?;
        Ok((q, PassKv { k, v }))
    }

    /// The attention output (`b × heads × n × head_dim`) through the output
    /// projection and the residual, then the feed-forward half.
    fn finish(&self, x: &Tensor, attn: Tensor, b: usize, n: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let attn = attn.transpose(1, 2)?.contiguous()?.reshape((b * n, c.n_heads * c.head_dim))?;
        let x = (x + linear(&attn, self.var("attn_output"))?)?;
        let h = rms_norm(&x, c.rms_eps)?.broadcast_mul(self.var("ffn_norm").as_tensor())?;
        let gated = (linear(&h, self.var("ffn_gate"))?.silu()? * linear(&h, self.var("ffn_up"))?)?;
        Ok((&x + linear(&gated, self.var("ffn_down"))?)?)
    }
}

/// Keys and values of one pass of the trained layer,
/// `b × heads × rows × head_dim` (after RoPE, kv heads repeated).
pub struct PassKv {
    pub k: Tensor,
    pub v: Tensor,
}

fn softmax_last(scores: &Tensor) -> Result<Tensor> {
    let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?.detach())?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Interleaved RoPE (pairs `(2i, 2i+1)`, as GGUF llama weights expect)
/// on `b × heads × t × head_dim`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let pairs = x.reshape((b, h, t, hd / 2, 2))?;
    let (x0, x1) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    Ok(Tensor::cat(&[r0, r1], 4)?.reshape((b, h, t, hd))?)
}

/// Logits of the frozen head over the block's output rows.
pub fn logits(out: &Tensor, frozen: &Frozen) -> Result<Tensor> {
    let h = rms_norm(out, frozen.eps)?.broadcast_mul(&frozen.final_norm)?;
    Ok(h.matmul(&frozen.head.t()?)?)
}

/// AdamW over the block's variables.
pub struct AdamW {
    pub m: HashMap<String, Tensor>,
    pub v: HashMap<String, Tensor>,
    /// Position in the learning-rate schedule.
    pub step: usize,
    /// Updates since `m` and `v` started from zero: their bias correction
    /// and the warm-up count these, so a run continued from a draft file
    /// (weights only) restarts its moments cleanly mid-schedule.
    pub moment_updates: usize,
}

impl AdamW {
    pub fn new(block: &Block) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = block.vars.iter().map(|(k, v)| Ok((k.clone(), zeros(v)?))).collect::<Result<_>>()?;
        let v = block.vars.iter().map(|(k, v)| Ok((k.clone(), zeros(v)?))).collect::<Result<_>>()?;
        Ok(AdamW { m, v, step: 0, moment_updates: 0 })
    }

    pub fn update(&mut self, block: &Block, grads: &candle_core::backprop::GradStore, lr: f64, weight_decay: f64) -> Result<()> {
        let (b1, b2, eps): (f64, f64, f64) = (0.9, 0.98, 1e-8);
        self.step += 1;
        self.moment_updates += 1;
        let t = self.moment_updates as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (name, var) in &block.vars {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let m = ((&self.m[name] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[name] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + eps)?)?;
            // No decay on norm gains (vectors).
            let decay = if var.as_tensor().rank() == 2 { weight_decay } else { 0.0 };
            let theta = var.as_tensor();
            var.set(&((theta * (1.0 - lr * decay))? - (step * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }
}
