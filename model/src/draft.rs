//! Draft sources: what proposes tokens for the target to verify.

use crate::sampling::{argmax, max_of, Candidates, SamplingParams, SessionRng, SparseDist};
use crate::{Llama, LoadedModel, LogitsFor, ModelError, Result, SeqPass};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Tokens proposed for one verification round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    /// The distribution each token was drawn from (after temperature, top-k
    /// ≤ 64 and top-p); empty for greedy requests.
    pub dists: Vec<SparseDist>,
    /// Features of the draft distribution behind each token (model drafts only).
    pub features: Vec<DraftFeatures>,
}

impl Proposal {
    /// Draws the next draft token from `scores` (greedy, or from the draft
    /// distribution with the draws keyed by its position, see
    /// [`DRAFT_STREAM`]), which follow `sequence` (the context and the
    /// drafts so far), adjusted as the request's target rows are, and records it
    /// with the features of the unadjusted scores. Returns the token and
    /// whether drafting goes on (not past a stop token, nor where
    /// `keep_going` stops it); None when the adjustments leave no token.
    pub(crate) fn take(
        &mut self,
        scores: &mut impl NextTokenScores,
        sequence: &[u32],
        round: &DraftRound,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Option<(u32, bool)> {
        let features = scores.features(self.features.len());
        if round.sampling.adjusts_logits() {
            let (prompt, output) = sequence.split_at(round.prompt_len);
            if !scores.adjust(round.sampling, prompt, output) {
                return None;
            }
        }
        let token = if round.sampling.is_greedy() {
            scores.argmax()
        } else {
            let q = scores.distribution(&round.draft_sampling);
            let t = q.sample(&mut SessionRng::at(round.seed, sequence.len()));
            self.dists.push(q);
            t
        };
        Some(self.record(token, features, round.stop, keep_going))
    }

    /// Records `token`, copied by prompt lookup: a point mass.
    pub(crate) fn take_copy(&mut self, token: u32, round: &DraftRound, keep_going: &mut dyn FnMut(&DraftFeatures) -> bool) -> (u32, bool) {
        if !round.sampling.is_greedy() {
            self.dists.push(SparseDist::point(token));
        }
        let features = DraftFeatures { top1: 1.0, entropy: 0.0, margin: 1.0, spread: 0.0, position: self.features.len() as u32, copied: true };
        self.record(token, features, round.stop, keep_going)
    }

    fn record(&mut self, token: u32, features: DraftFeatures, stop: &[u32], keep_going: &mut dyn FnMut(&DraftFeatures) -> bool) -> (u32, bool) {
        self.tokens.push(token);
        self.features.push(features);
        (token, !stop.contains(&token) && keep_going(&features))
    }
}

/// Key of a sampled draft's draws, next to the request's seed (the
/// target's draws are keyed by the seed itself). A model draft draws the
/// token at sequence position P from `SessionRng::at(seed ^ DRAFT_STREAM,
/// P)`: the same context gives the same drafts however rounds are cut
/// (drafted ahead and carried over, or fresh), so with a fixed k a seeded
/// request's answer does not depend on timing.
pub const DRAFT_STREAM: u64 = 0x5EED_D4AF_7000_0001;

/// What a model draft's round draws under.
pub(crate) struct DraftRound<'a> {
    sampling: &'a SamplingParams,
    /// `sampling.seed ^ DRAFT_STREAM`.
    seed: u64,
    /// `sampling` with top-k ≤ 64 ([`SamplingParams::for_draft`]).
    draft_sampling: SamplingParams,
    /// The tokens after which drafting ends: the request's.
    stop: &'a [u32],
    /// Where the output starts in the sequence drafted after.
    prompt_len: usize,
}

impl<'a> DraftRound<'a> {
    /// For drafting after `context`, whose last `generated` tokens are
    /// output; `eos`: the model's end-of-sequence tokens.
    pub(crate) fn new(sampling: &'a SamplingParams, eos: &'a [u32], context: &[u32], generated: usize) -> Self {
        let prompt_len = context.len().saturating_sub(generated);
        DraftRound { sampling, seed: sampling.seed ^ DRAFT_STREAM, draft_sampling: sampling.for_draft(), stop: sampling.stop_tokens(eos), prompt_len }
    }

    /// Whether a prompt-lookup copy of `token` after `sequence` is worth
    /// proposing under the request's adjustments, which a copy, having no
    /// logits, does not go through: not banned (JSON mode's mask, a stop
    /// token before `min_tokens`) nor pushed down by more than 30 (a
    /// logit bias of −100, heavy penalties). Otherwise the model drafts.
    pub(crate) fn allows_copy(&self, sequence: &[u32], token: u32) -> bool {
        if !self.sampling.adjusts_logits() {
            return true;
        }
        let (prompt, output) = sequence.split_at(self.prompt_len);
        let mut logit = [0.0f32];
        self.sampling.adjust_logits(&mut Candidates::new(&[token], &mut logit), prompt, output);
        logit[0] > -30.0
    }
}

/// Cheap summary of the draft model's distribution at one draft step: what
/// a speculation controller uses to guess whether the token will be rejected.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DraftFeatures {
    /// Probability of the most likely token.
    pub top1: f32,
    /// Entropy of the distribution, nats.
    pub entropy: f32,
    /// Top-1 minus top-2 probability.
    pub margin: f32,
    /// Largest logit minus the mean logit.
    pub spread: f32,
    /// Draft position in the round (0 = first draft token).
    pub position: u32,
    /// Copied by prompt lookup (`+lookup`), not drawn from the model: the
    /// other fields then say nothing about the model.
    #[serde(default)]
    pub copied: bool,
}

impl DraftFeatures {
    /// From raw logits (temperature 1), in one pass over them once the two
    /// largest are known: entropy = ln Z − Σ e·(l − max) / Z with e = exp(l − max),
    /// so each logit costs one exponential. A draft computes these for
    /// every token it drafts: the straightforward form (two f64
    /// exponentials and a logarithm a logit) took 0.19 ms over the trained
    /// draft's 12 302 tokens, 0.77 ms over the whole vocabulary, against
    /// a 4 ms step of the target here.
    pub fn from_logits(logits: &[f32], position: usize) -> Self {
        const LANES: usize = 16;
        let top = argmax(logits) as usize;
        let max = logits.get(top).copied().unwrap_or(0.0);
        // The largest logit but the first maximum (a tie gives a margin of 0).
        let second = max_of(&logits[..top]).max(max_of(logits.get(top + 1..).unwrap_or(&[])));
        // Per-lane sums, so that the loop vectorizes: Z, Σ e·(l − max), Σ l.
        let (mut z, mut zd, mut sum) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let mut add = |j: usize, l: f32| {
            let d = l - max;
            let e = crate::sampling::exp_nonpositive(d);
            z[j] += e;
            zd[j] += e * d;
            sum[j] += l;
        };
        let chunks = logits.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (j, &l) in chunk.iter().enumerate() {
                add(j, l);
            }
        }
        for (j, &l) in rest.iter().enumerate() {
            add(j, l);
        }
        let total = |v: [f32; LANES]| v.iter().map(|&x| x as f64).sum::<f64>();
        let (z, zd, sum) = (total(z), total(zd), total(sum));
        let top1 = 1.0 / z;
        let top2 = if second.is_finite() { ((second - max) as f64).exp() / z } else { 0.0 };
        DraftFeatures {
            top1: top1 as f32,
            entropy: (z.ln() - zd / z).max(0.0) as f32,
            margin: (top1 - top2) as f32,
            spread: (max as f64 - sum / logits.len().max(1) as f64) as f32,
            position: position as u32,
            copied: false,
        }
    }
}

/// Anything that can propose continuations. Sources keep their own state
/// (a KV cache) and resynchronise from `context` on every call, so a
/// rejection needs no separate rollback call.
pub trait DraftSource: Send {
    /// Proposes up to `k` tokens to follow `context` (prompt and every token
    /// accepted so far), whose last `generated` tokens are output (what the
    /// penalties count). After each drafted token `keep_going` sees its
    /// features (model drafts) and may end the round early. Model drafts
    /// key their draws by position ([`DRAFT_STREAM`]); `rng` is for
    /// sources that simulate drafting.
    fn propose_until(
        &mut self,
        context: &[u32],
        generated: usize,
        k: usize,
        sampling: &SamplingParams,
        rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Result<Proposal>;

    /// Whether the source drafts from the target's final hidden states
    /// (EAGLE-style): targets then report them after every round.
    fn wants_target_features(&self) -> bool {
        false
    }

    /// The target's final hidden states (before the norm) at positions
    /// `start..` of the context, `hidden` values each.
    fn observe_target_features(&mut self, _start: usize, _rows: &[f32]) {}

    /// Turns on prompt lookup ([`PromptLookup`]) in a model draft.
    fn use_prompt_lookup(&mut self) -> Result<()> {
        Err(ModelError::InvalidArgument("`+lookup` goes with model drafts only (layers:N, model:PATH, trained)".into()))
    }

    /// Proposes exactly up to `k` tokens, never stopping early.
    fn propose(&mut self, context: &[u32], generated: usize, k: usize, sampling: &SamplingParams, rng: &mut SessionRng) -> Result<Proposal> {
        self.propose_until(context, generated, k, sampling, rng, &mut |_| true)
    }
}

/// The `--draft` argument.
#[derive(Clone, Debug, PartialEq)]
pub enum DraftSpec {
    /// No drafting: plain target decoding.
    None,
    /// Prompt lookup over the session's own tokens.
    Ngram,
    /// The target's own first N layers, final norm and head.
    Layers(usize),
    /// Another GGUF model with the target's vocabulary.
    Model(PathBuf),
    /// A draft trained for the target by `tandem-bench train-draft`: the
    /// built-in one for the default model, or the folder given.
    Trained(Option<PathBuf>),
    /// A model draft (`SPEC+lookup`) that copies from the context where
    /// [`PromptLookup`] finds a match, and runs the model elsewhere.
    WithLookup(Box<DraftSpec>),
}

impl FromStr for DraftSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            ModelError::InvalidArgument(format!(
                "`--draft {s}`: {why} (expected none, ngram, layers:N, model:PATH, trained or trained:DIR, the last four optionally +lookup)"
            ))
        };
        if let Some(inner) = s.strip_suffix("+lookup") {
            return match inner.parse()? {
                DraftSpec::None | DraftSpec::Ngram | DraftSpec::WithLookup(_) => Err(bad("`+lookup` goes with model drafts only")),
                spec => Ok(DraftSpec::WithLookup(Box::new(spec))),
            };
        }
        match s.split_once(':') {
            None if s == "none" => Ok(DraftSpec::None),
            None if s == "ngram" => Ok(DraftSpec::Ngram),
            None if s == "trained" => Ok(DraftSpec::Trained(None)),
            Some(("trained", p)) if !p.is_empty() => Ok(DraftSpec::Trained(Some(PathBuf::from(p)))),
            Some(("layers", n)) => n.parse().map(DraftSpec::Layers).map_err(|_| bad("N must be a positive integer")),
            Some(("model", p)) if !p.is_empty() => Ok(DraftSpec::Model(PathBuf::from(p))),
            _ => Err(bad("unknown draft")),
        }
    }
}

impl std::fmt::Display for DraftSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DraftSpec::None => write!(f, "none"),
            DraftSpec::Ngram => write!(f, "ngram"),
            DraftSpec::Layers(n) => write!(f, "layers:{n}"),
            DraftSpec::Model(p) => write!(f, "model:{}", p.display()),
            DraftSpec::Trained(None) => write!(f, "trained"),
            DraftSpec::Trained(Some(p)) => write!(f, "trained:{}", p.display()),
            DraftSpec::WithLookup(inner) => write!(f, "{inner}+lookup"),
        }
    }
}

impl DraftSpec {
    /// Builds the source for `target`. Model drafts must share the target's
    /// vocabulary token for token.
    pub fn build(&self, target: &LoadedModel) -> Result<Box<dyn DraftSource>> {
        let stop = target.tokenizer.eos_tokens().to_vec();
        Ok(match self {
            DraftSpec::None => Box::new(NoDraft),
            DraftSpec::Ngram => Box::new(NgramDraft::new(3)),
            DraftSpec::Layers(n) => Box::new(ModelDraft::from_layers(target.llama.clone(), check_layers(*n, target)?, stop)),
            DraftSpec::Model(path) => {
                let draft = load_model_draft(path, target)?;
                let n = draft.llama.config().n_layers;
                Box::new(ModelDraft::from_layers(draft.llama, n, stop))
            }
            DraftSpec::Trained(dir) => crate::trained::build_trained(dir.as_deref(), target)?,
            DraftSpec::WithLookup(inner) => {
                let mut draft = inner.build(target)?;
                draft.use_prompt_lookup()?;
                draft
            }
        })
    }

    /// The spec without `+lookup`.
    pub fn model(&self) -> &DraftSpec {
        match self {
            DraftSpec::WithLookup(inner) => inner,
            spec => spec,
        }
    }
}

/// Loads a `model:PATH` draft, checked against `target`'s vocabulary
/// (shared with drafts running on other backends).
pub fn load_model_draft(path: &Path, target: &LoadedModel) -> Result<LoadedModel> {
    let draft = LoadedModel::load(&crate::fetch::resolve_model(Some(path))?)?;
    check_same_vocab(target, &draft, &DraftSpec::Model(path.to_path_buf()).to_string())?;
    Ok(draft)
}

/// `n` if `layers:n` is a valid layer-skip draft of `target`.
pub fn check_layers(n: usize, target: &LoadedModel) -> Result<usize> {
    let total = target.llama.config().n_layers;
    if n == 0 || n > total {
        return Err(ModelError::InvalidArgument(format!("`--draft layers:{n}`: N must be between 1 and the target's {total} layers")));
    }
    Ok(n)
}

fn check_same_vocab(target: &LoadedModel, draft: &LoadedModel, name: &str) -> Result<()> {
    let (t, d) = (&target.tokenizer, &draft.tokenizer);
    let mismatch = |reason: String| Err(ModelError::DraftMismatch { draft: name.to_string(), reason });
    if t.vocab_size() != d.vocab_size() || target.llama.config().vocab != draft.llama.config().vocab {
        return mismatch(format!("vocabulary of {} tokens, the target has {}", draft.llama.config().vocab, target.llama.config().vocab));
    }
    if let Some(id) = (0..t.vocab_size() as u32).find(|&i| t.decode(&[i]).ok() != d.decode(&[i]).ok()) {
        return mismatch(format!("token {id} differs from the target's"));
    }
    Ok(())
}

/// Proposes nothing: every round verifies only the last token.
pub struct NoDraft;

impl DraftSource for NoDraft {
    fn propose_until(
        &mut self,
        _: &[u32],
        _: usize,
        _: usize,
        _: &SamplingParams,
        _: &mut SessionRng,
        _: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Result<Proposal> {
        Ok(Proposal::default())
    }
}

/// Prompt lookup: find the latest earlier occurrence of the context's last
/// n tokens (n from `max_ngram` down to 1) and propose what followed it.
pub struct NgramDraft {
    max_ngram: usize,
}

impl NgramDraft {
    pub fn new(max_ngram: usize) -> Self {
        NgramDraft { max_ngram }
    }

    fn lookup(&self, context: &[u32], k: usize) -> Vec<u32> {
        match latest_match(context, 1, self.max_ngram) {
            Some((from, _)) => context[from..(from + k).min(context.len())].to_vec(),
            None => Vec::new(),
        }
    }
}

/// The latest earlier occurrence of `context`'s longest suffix of
/// `min_ngram..=max_ngram` tokens that occurred before: where what
/// followed it starts, and the suffix's length.
fn latest_match(context: &[u32], min_ngram: usize, max_ngram: usize) -> Option<(usize, usize)> {
    let len = context.len();
    // Each length scans the whole context: lengths that could not be used are not tried.
    for n in (min_ngram.max(1)..=max_ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &context[len - n..];
        // Latest match whose continuation lies inside the context.
        if let Some(start) = (0..len - n).rev().find(|&i| &context[i..i + n] == suffix) {
            return Some((start + n, n));
        }
    }
    None
}

/// Prompt lookup inside a model draft (`+lookup`): where the context's
/// last two or more tokens occurred before, the draft proposes what
/// followed them (the latest occurrence of the longest such suffix, up to
/// eight tokens) instead of running its model for that token; the model
/// catches up on copied tokens when it next runs, in one pass. Code and
/// answers that quote the prompt repeat identifiers and phrases the model
/// drafts poorly. Measured with the built-in trained draft (k = 5, the
/// held-out prompts of `scripts/draft_compare.sh`): tokens per round 1.93 →
/// 2.15 on chat and 1.86 → 3.39 on code (on other held-out prompts 1.74 →
/// 2.03 and 2.00 → 2.95). A one-token match proposes too much noise (chat
/// fell to 1.87), and letting the model overrule copies where it is
/// confident gave less (code 2.99 with top-1 ≥ 0.6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PromptLookup;

impl PromptLookup {
    const MIN_MATCH: usize = 2;
    const MAX_NGRAM: usize = 8;

    /// The copied next token of `sequence`, if any.
    pub fn next(&self, sequence: &[u32]) -> Option<u32> {
        latest_match(sequence, Self::MIN_MATCH, Self::MAX_NGRAM).map(|(from, _)| sequence[from])
    }
}

impl DraftSource for NgramDraft {
    fn propose_until(
        &mut self,
        context: &[u32],
        _: usize,
        k: usize,
        sampling: &SamplingParams,
        _: &mut SessionRng,
        _: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Result<Proposal> {
        let tokens = self.lookup(context, k);
        // A lookup is deterministic: its distribution is a point mass.
        let dists = if sampling.is_greedy() { vec![] } else { tokens.iter().map(|&t| SparseDist::point(t)).collect() };
        Ok(Proposal { tokens, dists, features: vec![] })
    }
}

/// How many leading tokens of `cached` (what a draft's KV cache holds) a
/// call with `context` (non-empty) can keep: the prefix both agree on, but
/// never all of `context`, since the last context token is fed again to get
/// its logits.
pub(crate) fn reusable_prefix(cached: &[u32], context: &[u32]) -> usize {
    cached.iter().zip(context).take_while(|(a, b)| a == b).count().min(context.len().saturating_sub(1))
}

/// What one forward step gives a draft: enough to pick the next token and
/// describe its distribution (full logits on the CPU; the top 64 logits
/// and a few sums where reading everything back would cost too much).
pub trait NextTokenScores {
    /// The greedy token.
    fn argmax(&self) -> u32;
    /// The sparse distribution a sampled draft draws from; `draft_sampling`
    /// comes from [`SamplingParams::for_draft`] (top-k ≤ 64).
    fn distribution(&self, draft_sampling: &SamplingParams) -> SparseDist;
    fn features(&self, position: usize) -> DraftFeatures;
    /// Applies [`SamplingParams::adjust_logits`] after `prompt` then
    /// `output`; false when no token is left to draft.
    fn adjust(&mut self, sampling: &SamplingParams, prompt: &[u32], output: &[u32]) -> bool;
}

/// A full row of logits.
impl NextTokenScores for Vec<f32> {
    fn argmax(&self) -> u32 {
        argmax(self)
    }
    fn distribution(&self, draft_sampling: &SamplingParams) -> SparseDist {
        draft_sampling.distribution(self)
    }
    fn features(&self, position: usize) -> DraftFeatures {
        DraftFeatures::from_logits(self, position)
    }
    fn adjust(&mut self, sampling: &SamplingParams, prompt: &[u32], output: &[u32]) -> bool {
        sampling.adjust_logits(self.as_mut_slice(), prompt, output);
        max_of(self) > f32::NEG_INFINITY
    }
}

/// A model that scores the next token, keeping its own KV cache: what an
/// autoregressive draft needs from a backend (Tandem's CPU kernels here;
/// candle devices and wgpu in the edge crate).
pub trait StepForward: Send {
    type Scores: NextTokenScores;
    /// Forgets the cached positions from `len` on.
    fn truncate(&mut self, len: usize);
    /// Appends `tokens` to the cache; returns the scores after the last.
    fn step(&mut self, tokens: &[u32]) -> Result<Self::Scores>;
}

/// Drafts autoregressively with a [`StepForward`], reusing the cached
/// prefix the context still agrees with and dropping the rest (rollback).
pub struct Autoregressive<F> {
    forward: F,
    /// Tokens whose keys and values the cache holds.
    cached: Vec<u32>,
    stop: Vec<u32>,
    lookup: Option<PromptLookup>,
}

impl<F: StepForward> Autoregressive<F> {
    /// `stop`: tokens after which drafting ends (end of sequence).
    pub fn new(forward: F, stop: Vec<u32>) -> Self {
        Autoregressive { forward, cached: Vec::new(), stop, lookup: None }
    }

    pub fn forward(&self) -> &F {
        &self.forward
    }
}

impl<F: StepForward> DraftSource for Autoregressive<F> {
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
        let common = reusable_prefix(&self.cached, context);
        self.forward.truncate(common);
        self.cached.truncate(common);
        let round = DraftRound::new(sampling, &self.stop, context, generated);
        let mut sequence = context.to_vec();
        for _ in 0..k {
            let (token, more) = match self.lookup.and_then(|l| l.next(&sequence)).filter(|&copy| round.allows_copy(&sequence, copy)) {
                Some(copy) => proposal.take_copy(copy, &round, keep_going),
                None => {
                    let feed = &sequence[self.cached.len()..];
                    let mut scores = self.forward.step(feed)?;
                    self.cached.extend_from_slice(feed);
                    match proposal.take(&mut scores, &sequence, &round, keep_going) {
                        Some(drawn) => drawn,
                        None => break,
                    }
                }
            };
            if !more {
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

/// The first N layers of a [`Llama`] (all of them for a separate draft
/// model) on Tandem's kernels.
pub struct LlamaLayers {
    llama: Arc<Llama>,
    cache: crate::KvCache,
}

impl StepForward for LlamaLayers {
    type Scores = Vec<f32>;
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut logits = self.llama.forward(&mut [SeqPass { cache: &mut self.cache, tokens, logits: LogitsFor::Last }])?;
        Ok(logits.swap_remove(0).into_row(0))
    }
}

/// A llama-family model (or the first N layers of one) drafting on
/// Tandem's CPU kernels.
pub type ModelDraft = Autoregressive<LlamaLayers>;

impl ModelDraft {
    pub fn from_layers(llama: Arc<Llama>, n_layers: usize, stop: Vec<u32>) -> Self {
        let cache = llama.new_cache(n_layers);
        Autoregressive::new(LlamaLayers { llama, cache }, stop)
    }
}

/// A synthetic draft for tests and benchmarks, always labelled as such: it
/// knows the target's greedy output (`reference`: prompt followed by the
/// output) and proposes its next token with probability `alpha` per
/// position, a wrong token otherwise, so the acceptance rate is set rather
/// than learned. Its features carry a confidence signal correlated with
/// correctness. `pace` is slept per token to stand for an edge device's
/// drafting time without using this machine's cores. Greedy requests only.
pub struct SyntheticDraft {
    reference: Vec<u32>,
    alpha: f64,
    pace: std::time::Duration,
}

impl SyntheticDraft {
    pub fn new(reference: Vec<u32>, alpha: f64, pace: std::time::Duration) -> Self {
        SyntheticDraft { reference, alpha: alpha.clamp(0.0, 1.0), pace }
    }
}

impl DraftSource for SyntheticDraft {
    fn propose_until(
        &mut self,
        context: &[u32],
        _generated: usize,
        k: usize,
        _sampling: &SamplingParams,
        rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> Result<Proposal> {
        let mut proposal = Proposal::default();
        for position in 0..k {
            let Some(&truth) = self.reference.get(context.len() + position) else { break };
            std::thread::sleep(self.pace);
            let right = rng.next_f64() < self.alpha;
            // Any other token is wrong; its neighbour will do.
            let token = if right { truth } else { truth ^ 1 };
            let top1 = if right { 0.55 + 0.45 * rng.next_f64() } else { 0.1 + 0.6 * rng.next_f64() } as f32;
            let features =
                DraftFeatures { top1, entropy: 2.0 * (1.0 - top1), margin: top1 / 2.0, spread: 10.0 * top1, position: position as u32, copied: false };
            proposal.tokens.push(token);
            proposal.features.push(features);
            if !keep_going(&features) {
                break;
            }
        }
        Ok(proposal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for s in ["none", "ngram", "layers:20", "model:/tmp/x.gguf", "trained", "trained:/tmp/d", "trained+lookup", "layers:25+lookup", "trained:/tmp/d+lookup"]
        {
            assert_eq!(s.parse::<DraftSpec>().unwrap().to_string(), s);
        }
        for bad in ["layers:", "layers:x", "model:", "trained:", "bogus", "ngram+lookup", "none+lookup", "trained+lookup+lookup", "+lookup"] {
            let err = bad.parse::<DraftSpec>().unwrap_err().to_string();
            assert!(err.contains("--draft"), "{err}");
        }
    }

    #[test]
    fn prompt_lookup_copies_after_the_longest_repeated_suffix() {
        let next = |s: &[u32]| PromptLookup.next(s);
        // [1, 2] occurred at 0 and was followed by 3; the later one-token
        // match of [2] (followed by 5) is shorter and loses.
        assert_eq!(next(&[1, 2, 3, 4, 2, 5, 1, 2]), Some(3));
        // Of equal matches the latest wins.
        assert_eq!(next(&[1, 2, 3, 1, 2, 4, 1, 2]), Some(4));
        // A one-token match is not enough.
        assert_eq!(next(&[1, 2, 3, 9, 2]), None);
        assert_eq!(next(&[7]), None);
        assert_eq!(next(&[]), None);
    }

    /// The one-pass features equal the textbook definitions over a real-
    /// sized, ragged-length row.
    #[test]
    fn features_match_their_definitions() {
        let logits: Vec<f32> = (0..12_301).map(|i| ((i * 7919 % 1000) as f32) / 90.0 - 4.0 + if i == 77 { 9.0 } else { 0.0 }).collect();
        let f = DraftFeatures::from_logits(&logits, 1);
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        let p: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp() / z).collect();
        let entropy: f64 = p.iter().map(|&p| -p * p.ln()).sum();
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let mean = logits.iter().map(|&l| l as f64).sum::<f64>() / logits.len() as f64;
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0);
        assert!(close(f.top1, sorted[0]) && close(f.margin, sorted[0] - sorted[1]), "{f:?}");
        assert!(close(f.entropy, entropy) && close(f.spread, max - mean), "{f:?} vs entropy {entropy}");
    }

    #[test]
    fn features_summarise_the_distribution() {
        let sharp = DraftFeatures::from_logits(&[10.0, 0.0, 0.0, 0.0], 2);
        let flat = DraftFeatures::from_logits(&[1.0, 1.0, 1.0, 1.0], 0);
        assert!(sharp.top1 > 0.99 && sharp.margin > 0.99 && sharp.entropy < 0.01 && sharp.position == 2);
        assert!((flat.top1 - 0.25).abs() < 1e-6 && flat.margin.abs() < 1e-6);
        assert!((flat.entropy - 4f32.ln()).abs() < 1e-5 && flat.spread == 0.0);
        assert!((sharp.spread - 7.5).abs() < 1e-5);
    }

    #[test]
    fn ngram_proposes_what_followed_the_latest_match() {
        let d = NgramDraft::new(3);
        // "1 2 3 4 5 | 1 2 3" → continue with 4 5.
        assert_eq!(d.lookup(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 2), vec![4, 5]);
        // Longest suffix first: "7 8" matches at the end of the first run.
        assert_eq!(d.lookup(&[7, 8, 1, 6, 8, 2, 7, 8], 3), vec![1, 6, 8]);
        assert_eq!(d.lookup(&[1, 2, 3], 4), Vec::<u32>::new());
        assert_eq!(d.lookup(&[], 4), Vec::<u32>::new());
    }
}
