//! Drafts trained for a target by `tandem-bench train-draft`: one decoder
//! layer of the target's shape on the target's own embedding, final norm
//! and head, stored as a small safetensors file and a JSON card.
//!
//! - `early-exit`: the target's first N layers, then the trained layer.
//! - `eagle`: the trained layer reads `[embedding of token i | the
//!   target's final hidden state at i − 1]` projected to the hidden size
//!   (EAGLE). The target's states come back with each verdict; positions
//!   not verified yet (the draft's own tokens) use the draft's predicted
//!   state instead.
//! - `eagle-layers`: the same with the token's state after the target's
//!   first N layers in place of its embedding.
//!
//! The default model's trained draft is built into the binary
//! (`--draft trained`); `--draft trained:DIR` loads another.

use crate::draft::{reusable_prefix, DraftFeatures, DraftRound, DraftSource, NextTokenScores, PromptLookup, Proposal};
use crate::kernels::{QLinear, QMatrix};
use crate::llama::Layer;
use crate::sampling::{argmax, max_of, Candidates, SamplingParams, SessionRng, SparseDist};
use crate::{KvCache, Llama, LoadedModel, ModelDraft, ModelError, Result, SeqPass};
use candle_core::{Device, Tensor};
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

/// The trained draft for SmolLM2-135M-Instruct, made on this machine kind
/// by `tandem-bench train-draft` (see its card).
const BUILT_IN_WEIGHTS: &[u8] = include_bytes!("../drafts/smollm2-135m-instruct/draft.safetensors");
const BUILT_IN_CARD: &str = include_str!("../drafts/smollm2-135m-instruct/card.json");

/// What the loader needs from a draft's card.
#[derive(serde::Deserialize)]
struct Card {
    method: String,
    config: CardConfig,
}

#[derive(serde::Deserialize)]
struct CardConfig {
    exit_layer: usize,
}

/// The weights and card of the trained draft in `dir` (None: built in).
fn read_trained(dir: Option<&Path>) -> Result<(Cow<'static, [u8]>, Cow<'static, str>)> {
    match dir {
        None => Ok((BUILT_IN_WEIGHTS.into(), BUILT_IN_CARD.into())),
        Some(d) => {
            let read = |f: &str| std::fs::read(d.join(f)).map_err(|source| ModelError::Io { path: d.join(f).display().to_string(), source });
            Ok((read("draft.safetensors")?.into(), String::from_utf8_lossy(&read("card.json")?).into_owned().into()))
        }
    }
}

/// A hash of a trained draft's weights (FNV-1a): tools caching its
/// proposals key them on it.
pub fn trained_draft_fingerprint(dir: Option<&Path>) -> Result<u64> {
    let (weights, card) = read_trained(dir)?;
    Ok(weights.iter().chain(card.as_bytes()).fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)))
}

/// Builds the trained draft in `dir` (None: the built-in one) for `target`.
pub fn build_trained(dir: Option<&Path>, target: &LoadedModel) -> Result<Box<dyn DraftSource>> {
    let name = dir.map_or_else(|| "trained".to_string(), |d| format!("trained:{}", d.display()));
    let bad = |why: String| ModelError::DraftMismatch { draft: name.clone(), reason: why };
    let (weights, card) = read_trained(dir)?;
    let card: Card = serde_json::from_str(&card).map_err(|e| bad(format!("card.json: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&weights, &Device::Cpu).map_err(|e| bad(format!("draft.safetensors: {e}")))?;
    let cfg = target.llama.config();
    let mut get = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
        let t = tensors.get(name).ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        if t.elem_count() != rows * cols {
            return Err(bad(format!("tensor `{name}` has {:?}, the target needs {rows} × {cols} (trained for another model?)", t.dims())));
        }
        Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let layer = Layer::from_f32(cfg, &mut get)?;
    let check_exit = |n: usize| match n {
        1.. if n < cfg.n_layers => Ok(n),
        _ => Err(bad(format!("exit layer {n} is not inside the target's {} layers", cfg.n_layers))),
    };
    let stop = target.tokenizer.eos_tokens().to_vec();
    match card.method.as_str() {
        "early-exit" => {
            let n = check_exit(card.config.exit_layer)?;
            let llama = Arc::new(target.llama.with_layers(n, vec![layer]));
            Ok(Box::new(ModelDraft::from_layers(llama, n + 1, stop)))
        }
        "eagle" | "eagle-layers" => {
            let fc = QLinear::new(QMatrix::q8_0("fc", cfg.hidden, 2 * cfg.hidden, get("fc", cfg.hidden, 2 * cfg.hidden)?)?);
            let prefix = match card.method.as_str() {
                "eagle" => 0,
                _ => check_exit(card.config.exit_layer)?,
            };
            let state_scale = get("state_scale", 1, 1)?[0];
            let head = DraftHead::new(&target.llama, tensors.get("vocab")).map_err(|e| bad(format!("vocab: {e}")))?;
            Ok(Box::new(EagleDraft::new(&target.llama, prefix, layer, fc, head, state_scale, stop)))
        }
        other => Err(bad(format!("unknown method `{other}` in card.json"))),
    }
}

/// The tokens a trained draft's head scores. Drafts trained with a
/// `vocab` list (the tokens the target ever chose in the training data, a
/// few thousand of 49 152 for the default model) compute only those rows
/// of the target's head: the full head is most of what an EAGLE draft's
/// step costs (4.2 → 1.0 ms a drafted token here). Proposing only those tokens
/// loses nothing (verification decides) and little acceptance (the
/// target rarely picks others). Without the list the whole head is used.
struct DraftHead {
    ids: Arc<[u32]>,
    /// The head's rows for `ids` (None: the target's head, `ids` = all).
    rows: Option<QLinear>,
}

impl DraftHead {
    fn new(target: &Llama, vocab: Option<&Tensor>) -> std::result::Result<Self, String> {
        let n = target.config().vocab;
        let Some(vocab) = vocab else {
            return Ok(DraftHead { ids: (0..n as u32).collect(), rows: None });
        };
        let ids: Vec<u32> = vocab.to_vec1().map_err(|e| e.to_string())?;
        if ids.is_empty() || ids.windows(2).any(|w| w[0] >= w[1]) || ids[ids.len() - 1] as usize >= n {
            return Err(format!("not an increasing list of token ids below {n}"));
        }
        let head = &target.head().parts()[0];
        let values: Vec<f32> = ids.iter().flat_map(|&t| head.dequantize_row(t as usize)).collect();
        let rows = QMatrix::q8_0("draft_head", ids.len(), head.cols(), values).map_err(|e| e.to_string())?;
        Ok(DraftHead { ids: ids.into(), rows: Some(QLinear::new(rows)) })
    }
}

/// Logits over a draft head's tokens.
struct HeadScores {
    ids: Arc<[u32]>,
    logits: Vec<f32>,
}

impl NextTokenScores for HeadScores {
    fn argmax(&self) -> u32 {
        self.ids[argmax(&self.logits) as usize]
    }
    fn distribution(&self, draft_sampling: &SamplingParams) -> SparseDist {
        if draft_sampling.is_greedy() {
            return SparseDist::point(self.argmax());
        }
        draft_sampling.distribution_over(self.ids.iter().copied().zip(self.logits.iter().copied()))
    }
    fn features(&self, position: usize) -> DraftFeatures {
        DraftFeatures::from_logits(&self.logits, position)
    }
    fn adjust(&mut self, sampling: &SamplingParams, prompt: &[u32], output: &[u32]) -> bool {
        sampling.adjust_logits(&mut Candidates::new(&self.ids, &mut self.logits), prompt, output);
        max_of(&self.logits) > f32::NEG_INFINITY
    }
}

/// Scales each `width`-wide row to an RMS of `scale`.
fn rms_to(values: &mut [f32], width: usize, scale: f32) {
    for row in values.chunks_exact_mut(width) {
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / width as f32).sqrt().max(1e-6);
        row.iter_mut().for_each(|v| *v *= scale / rms);
    }
}

/// An EAGLE-style draft: one trained layer over projected target features.
pub struct EagleDraft {
    /// The target's first N layers (`eagle-layers`) and their cache: what
    /// stands for a token next to the target's previous state (its
    /// embedding when N = 0).
    prefix: Option<(Arc<Llama>, KvCache)>,
    /// What stands for each token of `tokens`, `hidden` values a position.
    /// They depend on the tokens alone, so a drafted token that is accepted
    /// keeps its row: a round's catch-up computes only the target's token
    /// (20 layers over one token instead of over every accepted one).
    rows: Vec<f32>,
    /// The tokens whose rows (and prefix cache positions) are held.
    tokens: Vec<u32>,
    /// The trained layer on the target's embedding, norm and head.
    llama: Arc<Llama>,
    /// `[embedding | previous feature] → hidden`.
    fc: QLinear,
    /// The tokens the head scores.
    head_ids: Arc<[u32]>,
    /// The trained layer's cache: positions `0..cache.len()` of `tokens`.
    cache: KvCache,
    /// The draft's predicted final state at each cached position, at the
    /// target's median scale.
    predicted: Vec<f32>,
    /// Leading cached positions computed from the target's own states.
    exact: usize,
    /// The target's final states of positions `0..`, as verdicts report them.
    target: Vec<f32>,
    stop: Vec<u32>,
    /// The "previous state" of position 0.
    zeros: Vec<f32>,
    /// The target's median state RMS (measured on the training data).
    state_scale: f32,
    lookup: Option<PromptLookup>,
}

impl EagleDraft {
    fn new(target: &Llama, prefix_layers: usize, layer: Layer, fc: QLinear, head: DraftHead, state_scale: f32, stop: Vec<u32>) -> Self {
        let prefix = (prefix_layers > 0).then(|| {
            let p = Arc::new(target.with_layers(prefix_layers, vec![]));
            let cache = p.new_cache(prefix_layers);
            (p, cache)
        });
        let llama = target.with_layers(0, vec![layer]);
        let llama = Arc::new(match head.rows {
            Some(rows) => llama.with_head(rows),
            None => llama,
        });
        let cache = llama.new_cache(1);
        let zeros = vec![0.0; llama.config().hidden];
        let (rows, tokens, predicted, target) = (vec![], vec![], vec![], vec![]);
        EagleDraft { prefix, rows, tokens, llama, fc, head_ids: head.ids, cache, predicted, exact: 0, target, stop, zeros, state_scale, lookup: None }
    }

    /// The rows of `tokens` at positions `start..` (`start` ≤ the rows
    /// held): those held for the same tokens are reused, the rest (from
    /// the first token that differs) computed: the embedding, or the
    /// target's first N layers in one pass.
    fn token_rows(&mut self, start: usize, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden();
        let same = self.tokens[start..].iter().zip(tokens).take_while(|(a, b)| a == b).count();
        let new = &tokens[same..];
        if !new.is_empty() {
            // Rows held past the first differing token are for other tokens;
            // matching rows past the end of `tokens` stay for later calls.
            self.truncate_rows(start + same);
            let rows = match self.prefix.as_mut() {
                None => new.iter().flat_map(|&t| self.llama.embedding().dequantize_row(t as usize)).collect(),
                Some((llama, cache)) => {
                    let n = llama.config().n_layers;
                    let pass = SeqPass { cache, tokens: new, logits: crate::LogitsFor::None };
                    llama.forward_capturing(&mut [pass], &[n])?.1.remove(0)
                }
            };
            self.rows.extend_from_slice(&rows);
            self.tokens.extend_from_slice(new);
        }
        Ok(self.rows[start * h..(start + tokens.len()) * h].to_vec())
    }

    /// Keeps the rows (and the trained layer's positions) of `0..len`.
    fn truncate_rows(&mut self, len: usize) {
        if let Some((_, cache)) = self.prefix.as_mut() {
            cache.truncate(len);
        }
        self.tokens.truncate(len);
        self.rows.truncate(len * self.hidden());
        self.truncate(len);
    }

    /// Keeps the trained layer's positions `0..len`.
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.predicted.truncate(len * self.hidden());
        self.exact = self.exact.min(len);
    }

    fn hidden(&self) -> usize {
        self.llama.config().hidden
    }

    /// The previous-position feature for position `i`: zeros at 0, the
    /// target's state where known, else the draft's own prediction.
    fn previous(&self, i: usize) -> (&[f32], bool) {
        let h = self.hidden();
        if i == 0 {
            return (&self.zeros, true);
        }
        match self.target.get((i - 1) * h..i * h) {
            Some(row) => (row, true),
            None => (&self.predicted[(i - 1) * h..i * h], false),
        }
    }

    /// Feeds `tokens` at positions `cache.len()..`; returns the logits
    /// after the last. On error every cache is cut back to `start`.
    fn feed(&mut self, tokens: &[u32]) -> Result<HeadScores> {
        let start = self.cache.len();
        // On a pool thread, so that the prefix pass, the projection and the
        // trained layer's pass run their parallel loops without a hand-off
        // from this thread each.
        let result = rayon::scope(|_| self.feed_unchecked(tokens, start));
        if result.is_err() {
            self.truncate_rows(start);
        }
        result
    }

    /// Feeds the positions of `sequence` past the cached ones; returns
    /// the scores after the last. Runs whose previous states are the
    /// target's go in one pass; past them, one position at a time.
    fn catch_up(&mut self, sequence: &[u32]) -> Result<HeadScores> {
        let h = self.hidden();
        let mut i = self.cache.len();
        let mut scores = HeadScores { ids: self.head_ids.clone(), logits: vec![] };
        while i < sequence.len() {
            let known = self.target.len() / h;
            let end = if i <= known { sequence.len().min(known + 1) } else { i + 1 };
            scores = self.feed(&sequence[i..end])?;
            i = end;
        }
        Ok(scores)
    }

    fn feed_unchecked(&mut self, tokens: &[u32], start: usize) -> Result<HeadScores> {
        let h = self.hidden();
        let token_rows = self.token_rows(start, tokens)?;
        let mut rows = Vec::with_capacity(tokens.len() * 2 * h);
        let mut all_exact = self.exact == start;
        for (j, token_row) in token_rows.chunks_exact(h).enumerate() {
            rows.extend_from_slice(token_row);
            let (prev, exact) = self.previous(start + j);
            rows.extend_from_slice(prev);
            all_exact &= exact;
        }
        let x = self.fc.forward(&Tensor::from_vec(rows, (tokens.len(), 2 * h), &Device::Cpu)?)?.flatten_all()?.to_vec1::<f32>()?;
        let pass = SeqPass { cache: &mut self.cache, tokens, logits: crate::LogitsFor::Last };
        let (logits, mut hidden) = self.llama.forward_with_inputs(pass, x)?;
        // Training fixed only the direction of the predicted states; they
        // stand in for the target's at the target's median scale.
        rms_to(&mut hidden, h, self.state_scale);
        self.predicted.extend_from_slice(&hidden);
        if all_exact {
            self.exact = self.cache.len();
        }
        Ok(HeadScores { ids: self.head_ids.clone(), logits: logits.into_row(0) })
    }
}

impl DraftSource for EagleDraft {
    fn wants_target_features(&self) -> bool {
        true
    }

    fn observe_target_features(&mut self, start: usize, rows: &[f32]) {
        let h = self.hidden();
        // Only a contiguous extension (or a restatement from `start`) is kept.
        if start * h <= self.target.len() {
            self.target.truncate(start * h);
            self.target.extend_from_slice(rows);
        }
    }

    fn propose_until(
        &mut self,
        context: &[u32],
        generated: usize,
        k: usize,
        sampling: &SamplingParams,
        _: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Result<Proposal> {
        let mut proposal = Proposal::default();
        if k == 0 || context.is_empty() {
            return Ok(proposal);
        }
        let h = self.hidden();
        let known = self.target.len() / h;
        // The target's states are never longer than the context they came with.
        if known >= context.len() {
            self.target.truncate((context.len() - 1) * h);
        }
        // Positions computed from predicted states are redone once the
        // target's own states for them have arrived.
        let mut common = reusable_prefix(&self.tokens[..self.cache.len()], context);
        if known >= self.exact {
            common = common.min(self.exact);
        }
        self.truncate(common);

        // Copied: `catch_up` borrows the draft mutably below.
        let eos = self.stop.clone();
        let round = DraftRound::new(sampling, &eos, context, generated);
        let mut sequence = context.to_vec();
        loop {
            let (token, more) = match self.lookup.and_then(|l| l.next(&sequence)).filter(|&copy| round.allows_copy(&sequence, copy)) {
                Some(copy) => proposal.take_copy(copy, &round, keep_going),
                None => {
                    let mut scores = self.catch_up(&sequence)?;
                    match proposal.take(&mut scores, &sequence, &round, keep_going) {
                        Some(drawn) => drawn,
                        None => break,
                    }
                }
            };
            if !more || proposal.tokens.len() == k {
                break;
            }
            sequence.push(token);
        }
        Ok(proposal)
    }

    fn use_prompt_lookup(&mut self) -> Result<()> {
        self.lookup = Some(PromptLookup);
        Ok(())
    }
}
