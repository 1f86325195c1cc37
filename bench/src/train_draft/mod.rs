//! `tandem-bench train-draft`: trains a small draft for a target GGUF on
//! this machine's CPU and writes its weights (safetensors) and a JSON card.
//!
//! Two methods share the trainer; both train one decoder layer of the
//! target's shape (initialised from one of the target's own layers) whose
//! output goes through the target's frozen final norm and head:
//! - `early-exit`: the target's first N layers, then the trained layer
//!   (LayerSkip-style); a self-contained draft.
//! - `eagle`: the trained layer reads the target's final hidden state at
//!   the previous position together with the token's embedding (EAGLE).
//!
//! Loss: cross-entropy against the target's greedy token plus a
//! regression of the normalised final hidden state. Data: see `data`.

pub mod data;
pub mod net;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use data::Traced;
use net::{Block, Frozen};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_model::{LoadedModel, LogitsFor, SeqPass};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    EarlyExit,
    Eagle,
    /// EAGLE on top of the target's first N layers: the trained layer
    /// reads `[layer-N state of token i | target state at i − 1]`.
    EagleLayers,
}

impl Method {
    /// Whether the trained layer reads the target's previous final state.
    pub fn reads_target_states(self) -> bool {
        matches!(self, Method::Eagle | Method::EagleLayers)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainDraftConfig {
    pub method: Method,
    /// Target layers the early-exit draft runs before the trained layer
    /// (the traced data always records this layer's output).
    pub exit_layer: usize,
    /// Which target layer initialises the trained one.
    pub init_layer: usize,
    pub chat_prompts: usize,
    pub code_prompts: usize,
    /// Greedy tokens generated per training prompt.
    pub max_new_tokens: usize,
    pub steps: usize,
    /// Positions per optimiser step (sequences are padded to the longest
    /// of their batch).
    pub batch_tokens: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the hidden-state regression next to the cross-entropy.
    pub regression_weight: f64,
    /// Weight of each later drafting step (EAGLE-style methods), which
    /// reads the draft's own predicted states as drafting past the first
    /// token does.
    #[serde(alias = "second_pass_weight")]
    pub later_step_weight: f64,
    /// Drafting steps trained per chain (1: teacher-forced only): step
    /// `s` is the `s`-th drafted token of a round.
    #[serde(default = "one_later_step")]
    pub unroll: usize,
    /// Later steps run on chains starting at every `unroll_stride`-th
    /// position (offset rotating by step): each later step then costs a
    /// fraction of the teacher-forced pass.
    #[serde(default = "every_position")]
    pub unroll_stride: usize,
    pub seed: u64,
    pub eval_every: usize,
}

impl Default for TrainDraftConfig {
    fn default() -> Self {
        TrainDraftConfig {
            method: Method::EagleLayers,
            exit_layer: 20,
            init_layer: 20,
            chat_prompts: 2979,
            code_prompts: 1000,
            max_new_tokens: 128,
            steps: 1800,
            batch_tokens: 2048,
            lr: 3e-4,
            weight_decay: 0.01,
            regression_weight: 1.0,
            later_step_weight: 0.3,
            unroll: 4,
            unroll_stride: 3,
            seed: 7,
            eval_every: 100,
        }
    }
}

/// What cards written before `unroll` trained: one step past the first.
fn one_later_step() -> usize {
    2
}

fn every_position() -> usize {
    1
}

/// Held-out teacher-forced agreement with the target's greedy token on
/// the positions a draft is asked about (after the first generated token).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Agreement {
    pub chat: f64,
    pub code: f64,
    pub all: f64,
    pub positions: usize,
    /// EAGLE-style drafts: agreement at the second draft position (reading
    /// the draft's own prediction of the previous state), all prompts.
    #[serde(default)]
    pub second: f64,
    /// Agreement at draft positions 2, 3, … up to `unroll`, each reading
    /// what drafting reads there: the verified context through the
    /// target's states, the round's earlier drafts through the draft's
    /// own (cards before `unroll` judged the second position with every
    /// earlier position read through the draft's states).
    #[serde(default)]
    pub later: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: usize,
    pub loss: f64,
    pub train_agreement: f64,
    pub held_out: Agreement,
    pub elapsed_s: f64,
}

/// What the card says about a trained draft.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DraftCard {
    pub target: String,
    pub method: Method,
    pub config: TrainDraftConfig,
    pub data: String,
    pub train_positions: usize,
    pub eval: String,
    pub steps: usize,
    pub train_seconds: f64,
    pub held_out: Agreement,
    /// Share of the held-out positions whose target token is outside the
    /// draft's head list (`vocab`): the draft can never propose those.
    #[serde(default)]
    pub held_out_outside_list: f64,
    /// Untrained drafts on the same held-out positions, with the weight
    /// bytes they read per token as a fraction of the target's.
    pub baselines: Vec<(String, Agreement, f64)>,
    pub history: Vec<EvalPoint>,
    pub why: String,
}

/// Everything one run needs.
pub struct TrainRun<'a> {
    pub model: &'a LoadedModel,
    pub model_path: &'a Path,
    pub out: &'a Path,
    pub cfg: TrainDraftConfig,
    pub resume: bool,
    /// A draft folder (`draft.safetensors` + `card.json`) whose weights and
    /// schedule position start the run, with fresh optimiser moments: how a
    /// committed draft keeps training once its checkpoint is gone.
    pub init_from: Option<&'a Path>,
    pub max_minutes: Option<f64>,
}

pub fn run(r: &TrainRun) -> Result<DraftCard> {
    std::fs::create_dir_all(r.out).with_context(|| format!("creating {}", r.out.display()))?;
    let ckpt = r.out.join("checkpoint.safetensors");
    // Checked before tracing (minutes): a mistyped `--out` must not quietly
    // train from scratch.
    anyhow::ensure!(!r.resume || ckpt.exists(), "--resume: no checkpoint at {} (check --out)", ckpt.display());
    // The draft layer trains as a llama layer and runs as one of the
    // target's: Gemma's would run with GeGLU and soft caps it never trained with.
    anyhow::ensure!(r.model.llama.config().gemma.is_none(), "--model: training a draft layer for a Gemma target is not supported");
    let cfg = &r.cfg;
    let (train, data_desc) = training_data(r)?;
    let eval = eval_data(r)?;
    let mut frozen = Frozen::new(r.model)?;
    frozen.state_scale = state_scale(&train, r.model.llama.config().hidden);
    // Training scores only the tokens the target ever chose in the data
    // (a few thousand of the vocabulary): the full head would cost most of
    // every step. Held-out agreement always uses the full head; the draft
    // file lists these tokens and the draft's head computes only them.
    let (train_frozen, train, vocab) = frozen.restricted_to_labels(train)?;
    let eagle = cfg.method.reads_target_states();

    let (block, mut opt, mut history, mut elapsed0) = if r.resume {
        load_checkpoint(r, &ckpt)?
    } else if let Some(dir) = r.init_from {
        continue_from_draft(r, dir)?
    } else {
        let block = Block::from_target(r.model, cfg.init_layer, eagle)?;
        let opt = net::AdamW::new(&block)?;
        (block, opt, Vec::new(), 0.0)
    };
    let batches = make_batches(&train, cfg.batch_tokens);
    let positions: usize = train.iter().map(|s| s.positions()).sum();
    eprintln!(
        "train-draft: {} sequences, {positions} positions, {} batches per epoch, {} distinct target tokens; {} eval sequences",
        train.len(),
        batches.len(),
        train_frozen.head.dim(0)?,
        eval.len()
    );

    let bar = crate::progress::bar(cfg.steps as u64, "");
    bar.set_position(opt.step as u64);
    let started = Instant::now();
    let mut order: Vec<usize> = (0..batches.len()).collect();
    let (mut loss_avg, mut agree_avg) = (0.0, 0.0);
    while opt.step < cfg.steps {
        let epoch = opt.step / batches.len();
        if opt.step % batches.len() == 0 || order.is_empty() {
            order = (0..batches.len()).collect();
            data::shuffle(&mut order, cfg.seed ^ epoch as u64);
        }
        let batch = &batches[order[opt.step % batches.len()]];
        let (loss, agree) = train_step(&block, &mut opt, &train_frozen, &train, batch, cfg)?;
        loss_avg = if opt.step == 1 { loss } else { 0.95 * loss_avg + 0.05 * loss };
        agree_avg = if opt.step == 1 { agree } else { 0.95 * agree_avg + 0.05 * agree };
        bar.inc(1);
        let out_of_time = r.max_minutes.is_some_and(|m| elapsed0 + started.elapsed().as_secs_f64() > m * 60.0);
        if opt.step % cfg.eval_every == 0 || opt.step == cfg.steps || out_of_time {
            let held_out = evaluate(&block, cfg, &frozen, &eval)?;
            let line = format!(
                "loss {loss_avg:.3} · train agreement {:.1}% · held-out chat {:.1}% code {:.1}% later positions {}",
                100.0 * agree_avg,
                100.0 * held_out.chat,
                100.0 * held_out.code,
                held_out.later.iter().map(|a| format!("{:.1}%", 100.0 * a)).collect::<Vec<_>>().join(" ")
            );
            if bar.is_hidden() {
                eprintln!("train-draft: step {}: {line}", opt.step);
            }
            bar.set_message(line);
            let elapsed_s = elapsed0 + started.elapsed().as_secs_f64();
            history.push(EvalPoint { step: opt.step, loss: loss_avg, train_agreement: agree_avg, held_out, elapsed_s });
            save_checkpoint(&block, &opt, &history, elapsed_s, &ckpt)?;
        }
        if out_of_time {
            eprintln!("train-draft: --max-minutes reached at step {}; resume with --resume", opt.step);
            break;
        }
    }
    bar.finish();
    elapsed0 += started.elapsed().as_secs_f64();

    let held_out = history.last().map(|p| p.held_out.clone()).unwrap_or_default();
    let baselines = baselines(r.model, &eval)?;
    let card = DraftCard {
        target: r.model_path.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
        method: cfg.method,
        config: cfg.clone(),
        data: data_desc,
        train_positions: positions,
        eval: "teacher-forced on the target's greedy outputs (96 tokens) for the 12 bench chat requests and the first 40 HumanEval prompts, positions after the first generated token".into(),
        steps: opt.step,
        train_seconds: elapsed0,
        held_out,
        held_out_outside_list: outside_list(&eval, &vocab),
        baselines,
        history,
        why: String::new(),
    };
    save_draft(&block, frozen.state_scale, &vocab, r.out)?;
    std::fs::write(r.out.join("card.json"), serde_json::to_string_pretty(&card)?)?;
    Ok(card)
}

fn training_data(r: &TrainRun) -> Result<(Vec<Traced>, String)> {
    let cfg = &r.cfg;
    let (code, stdlib) = data::stdlib_prompts(cfg.code_prompts, cfg.seed)?;
    let chat = data::chat_prompts(cfg.chat_prompts, cfg.seed);
    let desc = format!(
        "self-distillation: the target's greedy continuations ({} tokens) of {} templated chat requests (chat template) and {} function headers with docstrings from the Python standard library ({}); labels are the target's greedy tokens at every position",
        cfg.max_new_tokens,
        chat.len(),
        code.len(),
        stdlib.display()
    );
    // `v3`: the everyday request forms (`v2`: the broader chat topics and templates).
    let key = format!("v3-{}-{}-{}-{}-{}", cfg.chat_prompts, cfg.code_prompts, cfg.max_new_tokens, cfg.exit_layer, cfg.seed);
    let path = r.out.join(format!("traced-{key}.safetensors"));
    if path.exists() {
        return Ok((data::load(&path)?, desc));
    }
    let tok = &r.model.tokenizer;
    let mut prompts: Vec<(Vec<u32>, &'static str)> = Vec::new();
    for p in &chat {
        prompts.push((tok.encode_prompt(&tok.chat_prompt(p))?, "chat"));
    }
    for p in &code {
        prompts.push((tok.encode_prompt(p)?, "code"));
    }
    let estimate: usize = prompts.iter().map(|(p, _)| p.len() + cfg.max_new_tokens).sum();
    let bar = crate::progress::bar(estimate as u64, "tracing the target over the training prompts");
    let traced = data::trace(r.model, &prompts, cfg.max_new_tokens, cfg.exit_layer, &bar)?;
    bar.finish();
    data::save(&path, &traced, r.model.llama.config().hidden)?;
    Ok((traced, desc))
}

/// Held-out sequences: the bench's chat set and HumanEval prompts with
/// the target's greedy outputs, traced the same way.
fn eval_data(r: &TrainRun) -> Result<Vec<Traced>> {
    let path = r.out.join(format!("eval-{}.safetensors", r.cfg.exit_layer));
    if path.exists() {
        return data::load(&path);
    }
    let (chat, _) = crate::prompts::load("chat", 12, 96, r.model)?;
    let (code, _) = crate::prompts::load("humaneval", 40, 96, r.model)?;
    let mut seqs: Vec<(Vec<u32>, &'static str)> = Vec::new();
    for (set, kind) in [(&chat, "chat"), (&code, "code")] {
        // The reference ends with a token never fed to the target.
        seqs.extend(set.iter().map(|p| (p.reference[..p.reference.len() - 1].to_vec(), kind)));
    }
    let bar = crate::progress::bar(seqs.iter().map(|s| s.0.len() as u64).sum(), "tracing the held-out prompts");
    let mut traced = data::trace(r.model, &seqs, 0, r.cfg.exit_layer, &bar)?;
    bar.finish();
    // Drafts are asked about positions after the first generated token.
    for (t, p) in traced.iter_mut().zip(chat.iter().chain(&code)) {
        t.prompt_len = p.tokens.len();
    }
    data::save(&path, &traced, r.model.llama.config().hidden)?;
    Ok(traced)
}

/// Groups sequences of similar length so that padding stays small.
fn make_batches(seqs: &[Traced], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..seqs.len()).collect();
    idx.sort_by_key(|&i| seqs[i].positions());
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in idx {
        let longest = seqs[i].positions();
        if !current.is_empty() && (current.len() + 1) * longest > batch_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// A padded batch: the block's input rows, the target's final hidden
/// states, labels and a weight per row (0 for padding; `from` picks which
/// positions count).
struct Batch {
    x: Tensor,
    /// What stands for each token in the projection (EAGLE-style methods).
    token_rows: Option<Tensor>,
    last: Tensor,
    labels: Tensor,
    weight: Tensor,
    b: usize,
    t: usize,
}

fn batch_tensors(block: &Block, method: Method, frozen: &Frozen, seqs: &[Traced], idx: &[usize], from: impl Fn(&Traced) -> usize) -> Result<Batch> {
    let hidden = frozen.final_norm.dim(0)?;
    let b = idx.len();
    let t = idx.iter().map(|&i| seqs[i].positions()).max().unwrap_or(1);
    let (mut input, mut last) = (vec![0f32; b * t * hidden], vec![0f32; b * t * hidden]);
    let (mut prev, mut tokens) = (vec![0f32; b * t * hidden], vec![0u32; b * t]);
    let (mut labels, mut weight) = (vec![0u32; b * t], vec![0f32; b * t]);
    for (row, &i) in idx.iter().enumerate() {
        let s = &seqs[i];
        let n = s.positions();
        let base = row * t;
        input[base * hidden..(base + n) * hidden].copy_from_slice(&s.exit);
        last[base * hidden..(base + n) * hidden].copy_from_slice(&s.last);
        // The previous position's feature (none before the first).
        prev[(base + 1) * hidden..(base + n) * hidden].copy_from_slice(&s.last[..(n - 1) * hidden]);
        tokens[base..base + n].copy_from_slice(&s.tokens);
        labels[base..base + n].copy_from_slice(&s.labels);
        for w in &mut weight[base + from(s).min(n)..base + n] {
            *w = 1.0;
        }
    }
    let rows = (b * t, hidden);
    let exit_rows = Tensor::from_vec(input, rows, &Device::Cpu)?;
    let token_rows = match method {
        Method::EarlyExit => None,
        Method::Eagle => Some(frozen.embed(&tokens)?),
        Method::EagleLayers => Some(exit_rows.clone()),
    };
    let x = match &token_rows {
        None => exit_rows,
        Some(r) => block.project(r, &Tensor::from_vec(prev, rows, &Device::Cpu)?)?,
    };
    Ok(Batch {
        x,
        token_rows,
        last: Tensor::from_vec(last, rows, &Device::Cpu)?,
        labels: Tensor::from_vec(labels, (b * t, 1), &Device::Cpu)?,
        weight: Tensor::from_vec(weight, (b * t, 1), &Device::Cpu)?,
        b,
        t,
    })
}

/// Loss (sum over rows), agreement and count of one pass's rows against
/// the batch's rows `index` (all of them when `None`), each row's weight
/// times `valid`.
fn rows_loss(out: &Tensor, frozen: &Frozen, batch: &Batch, index: Option<(&Tensor, &Tensor)>, regression_weight: f64) -> Result<(Tensor, f64, f64)> {
    let h = batch.last.dim(1)?;
    let pick = |x: &Tensor, width: usize| -> Result<Tensor> {
        Ok(match index {
            None => x.clone(),
            Some((idx, _)) => x.reshape((batch.b, batch.t, width))?.index_select(idx, 1)?.reshape(((), width))?,
        })
    };
    let weight = match index {
        None => batch.weight.clone(),
        Some((_, valid)) => pick(&batch.weight, 1)?.broadcast_mul(valid)?,
    };
    let (labels, last) = (pick(&batch.labels, 1)?, pick(&batch.last, h)?);
    // Cross-entropy against the target's token plus the regression of the
    // normalised state.
    let logits = net::logits(out, frozen)?;
    let max = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let ce = ((lse - logits.gather(&labels, 1)?)? * &weight)?.sum_all()?;
    let diff = (net::rms_norm(out, frozen.eps)? - net::rms_norm(&last, frozen.eps)?)?;
    let reg = (diff.sqr()?.mean_keepdim(1)? * &weight)?.sum_all()?;
    let agree = logits.argmax_keepdim(D::Minus1)?.eq(&labels)?.to_dtype(DType::F32)?;
    let agreed = (agree * &weight)?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(((ce + (reg * regression_weight)?)?, agreed, weight.sum_all()?.to_scalar::<f32>()? as f64))
}

/// What one batch scored.
struct BatchLoss {
    /// Sum over the first position's rows divided by their count, plus
    /// each later step's likewise, weighted.
    total: Tensor,
    /// The first drafted token's agreement and rows.
    agreed: f64,
    count: f64,
    /// Each later drafted token's (agreed, rows).
    later: Vec<(f64, f64)>,
}

/// Loss over a batch. EAGLE-style methods go on from the
/// teacher-forced pass as drafting does (EAGLE-3's training-time test):
/// chains starting at every `stride`-th position from `offset` take
/// `unroll − 1` more steps, each reading the token there and the draft's
/// own prediction of the previous state (at the target's median scale),
/// and attending to the teacher-forced pass up to the chain's start and to
/// the chain's own steps, so training sees the draft's own errors in the
/// context drafting gives it.
fn loss(block: &Block, frozen: &Frozen, batch: &Batch, weights: (f64, f64), unroll: (usize, usize, usize)) -> Result<BatchLoss> {
    let (regression_weight, later_weight) = weights;
    let (steps, stride, offset) = unroll;
    let (b, t) = (batch.b, batch.t);
    let (out, first) = block.forward(&batch.x, b, t, frozen)?;
    let (first_loss, agreed, count) = rows_loss(&out, frozen, batch, None, regression_weight)?;
    let mut total = (first_loss / count.max(1.0))?;
    let mut later = Vec::new();
    let Some(token_rows) = batch.token_rows.as_ref().filter(|_| later_weight > 0.0 && steps > 1 && offset < t) else {
        return Ok(BatchLoss { total, agreed, count, later });
    };
    let h = out.dim(1)?;
    let starts: Vec<usize> = (offset..t).step_by(stride).collect();
    let at = |positions: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(positions.iter().map(|&p| p.min(t - 1) as u32).collect::<Vec<_>>(), positions.len(), &Device::Cpu)?)
    };
    let rows_at = |x: &Tensor, idx: &Tensor| -> Result<Tensor> { Ok(x.reshape((b, t, h))?.index_select(idx, 1)?.reshape(((), h))?) };
    let mut previous = rows_at(&out, &at(&starts)?)?;
    let mut chain = Vec::new();
    for step in 1..steps {
        let positions: Vec<usize> = starts.iter().map(|&s| s + step).collect();
        let idx = at(&positions)?;
        let valid = Tensor::from_vec(positions.iter().map(|&p| f32::from(u8::from(p < t))).collect::<Vec<_>>(), (positions.len(), 1), &Device::Cpu)?;
        let valid = valid.unsqueeze(0)?.broadcast_as((b, positions.len(), 1))?.reshape(((), 1))?;
        let predicted = (net::rms_norm(&previous.detach(), frozen.eps)? * frozen.state_scale as f64)?;
        let x = block.project(&rows_at(token_rows, &idx)?, &predicted)?;
        let (out, kv) = block.forward_chain(&x, &starts, &positions, &first, &chain, frozen)?;
        let (step_loss, step_agreed, step_count) = rows_loss(&out, frozen, batch, Some((&idx, &valid)), regression_weight)?;
        total = (total + (step_loss * (later_weight / step_count.max(1.0)))?)?;
        later.push((step_agreed, step_count));
        chain.push(kv);
        previous = out;
    }
    Ok(BatchLoss { total, agreed, count, later })
}

fn train_step(block: &Block, opt: &mut net::AdamW, frozen: &Frozen, seqs: &[Traced], idx: &[usize], cfg: &TrainDraftConfig) -> Result<(f64, f64)> {
    let batch = batch_tensors(block, cfg.method, frozen, seqs, idx, |_| 0)?;
    let unroll = (cfg.unroll, cfg.unroll_stride, opt.step % cfg.unroll_stride);
    let scored = loss(block, frozen, &batch, (cfg.regression_weight, cfg.later_step_weight), unroll)?;
    let grads = scored.total.backward()?;
    // Linear warm-up over 50 steps (of fresh moments), then cosine decay
    // to a tenth.
    let warm = ((opt.moment_updates as f64 + 1.0) / 50.0).min(1.0);
    let progress = (opt.step as f64 / cfg.steps as f64).min(1.0);
    let lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
    opt.update(block, &grads, lr, cfg.weight_decay)?;
    Ok((scored.total.to_scalar::<f32>()? as f64, scored.agreed / scored.count.max(1.0)))
}

/// Held-out agreement: chains from every position, `unroll` steps.
fn evaluate(block: &Block, cfg: &TrainDraftConfig, frozen: &Frozen, eval: &[Traced]) -> Result<Agreement> {
    let mut per_kind: HashMap<&str, (f64, f64)> = HashMap::new();
    let mut later = vec![(0.0, 0.0); cfg.unroll.saturating_sub(1)];
    for (i, s) in eval.iter().enumerate() {
        let batch = batch_tensors(block, cfg.method, frozen, eval, &[i], |s| s.prompt_len)?;
        let scored = loss(block, frozen, &batch, (0.0, 1.0), (cfg.unroll, 1, 0))?;
        let e = per_kind.entry(s.kind).or_default();
        e.0 += scored.agreed;
        e.1 += scored.count;
        for (sum, (a, n)) in later.iter_mut().zip(scored.later) {
            *sum = (sum.0 + a, sum.1 + n);
        }
    }
    let later: Vec<f64> = later.iter().map(|(a, n)| a / n.max(1.0)).collect();
    Ok(Agreement { second: later.first().copied().unwrap_or(0.0), later, ..agreement(&per_kind) })
}

fn agreement(per_kind: &HashMap<&str, (f64, f64)>) -> Agreement {
    let rate = |k: &str| per_kind.get(k).map_or(0.0, |(a, n)| a / n.max(1.0));
    let (a, n) = per_kind.values().fold((0.0, 0.0), |acc, (a, n)| (acc.0 + a, acc.1 + n));
    Agreement { chat: rate("chat"), code: rate("code"), all: a / n.max(1.0), positions: n as usize, second: 0.0, later: vec![] }
}

fn outside_list(eval: &[Traced], vocab: &[u32]) -> f64 {
    let labels = || eval.iter().flat_map(|s| &s.labels[s.prompt_len..]);
    let outside = labels().filter(|l| vocab.binary_search(l).is_err()).count();
    outside as f64 / labels().count().max(1) as f64
}

/// Untrained drafts on the same positions: layer-skip `layers:N` (cost
/// `N` layers + head) and prompt lookup (`ngram`, free).
fn baselines(model: &LoadedModel, eval: &[Traced]) -> Result<Vec<(String, Agreement, f64)>> {
    let llama = &model.llama;
    let n = llama.config().n_layers;
    let mut out = Vec::new();
    for layers in [4, 8, 12, 16, 20, 25] {
        let mut per_kind: HashMap<&str, (f64, f64)> = HashMap::new();
        for s in eval {
            let mut cache = llama.new_cache(layers);
            let logits = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &s.tokens, logits: LogitsFor::All }])?;
            let e = per_kind.entry(s.kind).or_default();
            for i in s.prompt_len..s.positions() {
                e.0 += (tandem_model::argmax(logits[0].row(i)) == s.labels[i]) as u32 as f64;
                e.1 += 1.0;
            }
        }
        let cost = llama.weight_bytes(layers) as f64 / llama.weight_bytes(n) as f64;
        out.push((format!("layers:{layers}"), agreement(&per_kind), cost));
    }
    let mut per_kind: HashMap<&str, (f64, f64)> = HashMap::new();
    let mut ngram = tandem_model::NgramDraft::new(3);
    let mut rng = tandem_model::SessionRng::at(0, 0);
    for s in eval {
        let e = per_kind.entry(s.kind).or_default();
        for i in s.prompt_len..s.positions() {
            let p = tandem_model::DraftSource::propose(&mut ngram, &s.tokens[..=i], 0, 1, &Default::default(), &mut rng)?;
            e.0 += (p.tokens.first() == Some(&s.labels[i])) as u32 as f64;
            e.1 += 1.0;
        }
    }
    out.push(("ngram".into(), agreement(&per_kind), 0.0));
    Ok(out)
}

fn save_checkpoint(block: &Block, opt: &net::AdamW, history: &[EvalPoint], elapsed_s: f64, path: &Path) -> Result<()> {
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in &block.vars {
        map.insert(format!("w.{k}"), v.as_tensor().clone());
        map.insert(format!("m.{k}"), opt.m[k].clone());
        map.insert(format!("v.{k}"), opt.v[k].clone());
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path)?;
    let state = serde_json::json!({ "step": opt.step, "moment_updates": opt.moment_updates, "elapsed_s": elapsed_s, "history": history });
    std::fs::write(path.with_extension("json"), serde_json::to_string_pretty(&state)?)?;
    Ok(())
}

fn load_checkpoint(r: &TrainRun, path: &Path) -> Result<(Block, net::AdamW, Vec<EvalPoint>, f64)> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)?;
    let part =
        |prefix: &str| -> HashMap<String, Tensor> { map.iter().filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone()))).collect() };
    let block = Block::from_tensors(part("w."), r.model.llama.config().clone())?;
    anyhow::ensure!(block.is_eagle() == r.cfg.method.reads_target_states(), "{}: checkpoint of another method", path.display());
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.with_extension("json"))?)?;
    let step = state["step"].as_u64().unwrap_or(0) as usize;
    let moment_updates = state["moment_updates"].as_u64().map_or(step, |n| n as usize);
    let opt = net::AdamW { m: part("m."), v: part("v."), step, moment_updates };
    let history = serde_json::from_value(state["history"].clone())?;
    eprintln!("train-draft: resuming at step {}", opt.step);
    Ok((block, opt, history, state["elapsed_s"].as_f64().unwrap_or(0.0)))
}

/// Weights, schedule position and history of a committed draft, which must
/// have been trained on the same data (same prompts, lengths, exit layer,
/// seed) by the same method.
fn continue_from_draft(r: &TrainRun, dir: &Path) -> Result<(Block, net::AdamW, Vec<EvalPoint>, f64)> {
    let card_path = dir.join("card.json");
    let card: DraftCard = serde_json::from_str(&std::fs::read_to_string(&card_path).with_context(|| format!("reading {}", card_path.display()))?)
        .with_context(|| format!("parsing {}", card_path.display()))?;
    let (c, want) = (&card.config, &r.cfg);
    anyhow::ensure!(
        (c.method, c.chat_prompts, c.code_prompts, c.max_new_tokens, c.exit_layer, c.seed)
            == (want.method, want.chat_prompts, want.code_prompts, want.max_new_tokens, want.exit_layer, want.seed),
        "`--init-from` {}: trained with another method or data (method, prompts, lengths, exit layer and seed must match)",
        dir.display()
    );
    let mut map = candle_core::safetensors::load(dir.join("draft.safetensors"), &Device::Cpu)?;
    map.retain(|k, _| k != "state_scale" && k != "vocab");
    let block = Block::from_tensors(map, r.model.llama.config().clone())?;
    let mut opt = net::AdamW::new(&block)?;
    opt.step = card.steps;
    eprintln!("train-draft: continuing {} from step {} with fresh optimiser moments", dir.display(), opt.step);
    Ok((block, opt, card.history, card.train_seconds))
}

/// The median RMS of the target's final states: the draft's own
/// predictions, whose scale training leaves free (it regresses their
/// direction), are fed at this scale where they stand in for the target's.
/// The median, because a few positions (the first) have outsized states.
fn state_scale(seqs: &[Traced], hidden: usize) -> f32 {
    let mut rms: Vec<f32> =
        seqs.iter().flat_map(|s| s.last.chunks_exact(hidden)).map(|row| (row.iter().map(|v| v * v).sum::<f32>() / hidden as f32).sqrt()).collect();
    rms.sort_by(f32::total_cmp);
    rms.get(rms.len() / 2).copied().unwrap_or(1.0)
}

/// The trained weights, f16, named as the draft loader expects, and the
/// state scale.
fn save_draft(block: &Block, state_scale: f32, vocab: &[u32], out: &Path) -> Result<PathBuf> {
    let mut map: HashMap<String, Tensor> = block.vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F16)?))).collect::<Result<_>>()?;
    map.insert("state_scale".into(), Tensor::new(&[state_scale], &Device::Cpu)?);
    map.insert("vocab".into(), Tensor::new(vocab, &Device::Cpu)?);
    let path = out.join("draft.safetensors");
    candle_core::safetensors::save(&map, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trained layer's candle forward (RoPE, grouped-query attention,
    /// SwiGLU) computes what the target's own kernels do when it starts as
    /// one of the target's layers: trained weights mean the same thing at
    /// inference as in training.
    #[test]
    fn a_block_initialised_from_a_target_layer_computes_that_layer() {
        let model = LoadedModel::load(&tandem_model::fetch::ensure_default_model(false).unwrap()).unwrap();
        let (n, h) = (model.llama.config().n_layers, model.llama.config().hidden);
        let tokens = model.tokenizer.encode("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n").unwrap();
        let mut cache = model.llama.new_cache(n);
        let pass = SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::None };
        let (_, states) = model.llama.forward_capturing(&mut [pass], &[n - 1, n]).unwrap();
        let block = Block::from_target(&model, n - 1, false).unwrap();
        let t = tokens.len();
        let x = Tensor::from_vec(states[0].clone(), (t, h), &Device::Cpu).unwrap();
        let out = block.forward(&x, 1, t, &Frozen::new(&model).unwrap()).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in out.chunks(h).zip(states[1].chunks(h)).enumerate() {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let cos = dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt());
            assert!(cos > 0.999, "position {i}: cosine {cos}");
        }
    }

    /// A drafting step whose inputs are what the teacher-forced pass read
    /// at the same positions computes what that pass did there: chains see
    /// the verified context and their own steps, nothing else, and RoPE
    /// puts each row at its position.
    #[test]
    fn chain_steps_fed_the_teacher_inputs_reproduce_the_teacher_pass() {
        let model = LoadedModel::load(&tandem_model::fetch::ensure_default_model(false).unwrap()).unwrap();
        let h = model.llama.config().hidden;
        let (b, t) = (2, 9);
        let frozen = Frozen::new(&model).unwrap();
        let block = Block::from_target(&model, 20, false).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b * t, h), &Device::Cpu).unwrap();
        let (out, first) = block.forward(&x, b, t, &frozen).unwrap();
        let (starts, mut chain) = (vec![1, 4, 6], Vec::new());
        for step in 1..3 {
            let positions: Vec<usize> = starts.iter().map(|s| s + step).collect();
            let idx = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect::<Vec<_>>(), positions.len(), &Device::Cpu).unwrap();
            let rows = |y: &Tensor| y.reshape((b, t, h)).unwrap().index_select(&idx, 1).unwrap().reshape(((), h)).unwrap();
            let (got, kv) = block.forward_chain(&rows(&x), &starts, &positions, &first, &chain, &frozen).unwrap();
            let diff = (got - rows(&out)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-3, "step {step}: max difference {diff}");
            chain.push(kv);
        }
    }

    /// A saved draft continues at its step with its weights (f16-rounded)
    /// and fresh moments; a draft of other data is refused.
    #[test]
    fn a_saved_draft_continues_from_its_step_and_refuses_other_data() {
        let model_path = tandem_model::fetch::ensure_default_model(false).unwrap();
        let model = LoadedModel::load(&model_path).unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-continue-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let block = Block::from_target(&model, 20, true).unwrap();
        save_draft(&block, 1.0, &[1, 2], &dir).unwrap();
        let cfg = TrainDraftConfig::default();
        let point = EvalPoint { step: 300, loss: 1.0, train_agreement: 0.5, held_out: Agreement::default(), elapsed_s: 60.0 };
        let card = DraftCard {
            target: String::new(),
            method: cfg.method,
            config: cfg.clone(),
            data: String::new(),
            train_positions: 0,
            eval: String::new(),
            steps: 300,
            train_seconds: 60.0,
            held_out: Agreement::default(),
            held_out_outside_list: 0.0,
            baselines: vec![],
            history: vec![point],
            why: String::new(),
        };
        std::fs::write(dir.join("card.json"), serde_json::to_string(&card).unwrap()).unwrap();
        let run = |cfg: TrainDraftConfig| TrainRun {
            model: &model,
            model_path: &model_path,
            out: &dir,
            cfg,
            resume: false,
            init_from: Some(&dir),
            max_minutes: None,
        };

        let (loaded, opt, history, elapsed) = continue_from_draft(&run(cfg.clone()), &dir).unwrap();
        assert_eq!((opt.step, opt.moment_updates, history.len(), elapsed), (300, 0, 1, 60.0));
        for (name, var) in &block.vars {
            let want = var.as_tensor().to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
            let diff = (loaded.vars[name].as_tensor() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        let other = TrainDraftConfig { chat_prompts: cfg.chat_prompts + 1, ..cfg };
        let err = continue_from_draft(&run(other), &dir).err().expect("other data must be refused").to_string();
        assert!(err.contains("--init-from"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--resume` into a folder without a checkpoint fails at once (before
    /// minutes of tracing) instead of training from scratch.
    #[test]
    fn resume_without_a_checkpoint_is_refused() {
        let model_path = tandem_model::fetch::ensure_default_model(false).unwrap();
        let model = LoadedModel::load(&model_path).unwrap();
        let dir = std::env::temp_dir().join(format!("tandem-resume-{}", std::process::id()));
        let r =
            TrainRun { model: &model, model_path: &model_path, out: &dir, cfg: TrainDraftConfig::default(), resume: true, init_from: None, max_minutes: None };
        let err = run(&r).expect_err("no checkpoint must be refused").to_string();
        assert!(err.contains("--resume") && err.contains("checkpoint.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdlib_prompts_are_headers_with_docstrings() {
        let text = "import os\n\ndef walk(top):\n    \"\"\"Walk a tree.\n\n    Yields triples.\n    \"\"\"\n    pass\n\ndef _private():\n    \"\"\"Hidden.\"\"\"\n\ndef one(x):\n    \"\"\"One line.\"\"\"\n    return x\n\ndef bare(y):\n    return y\n";
        assert_eq!(
            data::functions_with_docstrings(text),
            vec!["def walk(top):\n    \"\"\"Walk a tree.\n\n    Yields triples.\n    \"\"\"\n", "def one(x):\n    \"\"\"One line.\"\"\"\n"]
        );
    }

    /// The bench's chat prompts are the held-out set: no training request
    /// is one of them, and the default asks for distinct requests.
    #[test]
    fn training_chat_requests_are_distinct_and_not_held_out() {
        let all = data::chat_prompts(usize::MAX, 7);
        let mut distinct = all.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), all.len());
        assert!(all.len() >= TrainDraftConfig::default().chat_prompts);
        assert!(all.iter().all(|p| !crate::prompts::CHAT_PROMPTS.contains(&p.as_str())));
    }

    /// Prompt positions do not count; a token in the list does not count.
    #[test]
    fn outside_list_counts_generated_labels_missing_from_the_list() {
        let seq = |labels: Vec<u32>, prompt_len| Traced { tokens: labels.clone(), labels, prompt_len, exit: vec![], last: vec![], kind: "chat" };
        let eval = [seq(vec![9, 9, 1, 2, 7], 2), seq(vec![3, 4, 5], 0)];
        assert_eq!(outside_list(&eval, &[1, 2, 3, 4]), 2.0 / 6.0);
    }
}
