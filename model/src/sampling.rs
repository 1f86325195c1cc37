//! Sampling parameters, truncated distributions and the per-session RNG.

use crate::{JsonObjectMode, ModelError, Result};
use tandem_protocol::limits::MAX_SPARSE_SUPPORT;

/// How tokens are chosen. Temperature 0 is greedy (argmax, ties to the
/// lowest id); otherwise softmax(logits / T), then top-k, then top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches p; 1 keeps all.
    pub top_p: f32,
    /// vLLM's and llama.cpp's min-p: keep the tokens at least `min_p` times
    /// as likely as the most likely one, in [0, 1]; 0 keeps all. Applied
    /// after the temperature (vLLM's order; llama.cpp's default chain
    /// scales by the temperature last).
    pub min_p: f32,
    pub seed: u64,
    /// Applied to the logits before all of the above (greedy decoding
    /// included), after `logit_bias`; the target's and the drafts' alike
    /// (see [`Self::adjust_logits`]).
    pub penalties: Penalties,
    /// OpenAI's `logit_bias`: (token, bias in [−100, 100]) added to the
    /// logits first, ids ascending.
    pub logit_bias: Vec<(u32, f32)>,
    /// The tokens that end the generation; None: the model's end-of-sequence
    /// tokens, from the first output token on.
    pub stop: Option<StopTokens>,
    /// OpenAI's JSON mode: the output is one JSON object (see
    /// [`JsonObjectMode`]).
    pub json_object: Option<JsonObjectMode>,
}

/// vLLM's `stop_token_ids`, `ignore_eos` and `min_tokens`, resolved against
/// a model's end-of-sequence tokens: the tokens that end a generation, and
/// how many output tokens must come first. Until then the target may not
/// pick them (their logits are −∞, as in vLLM), so drafting stays exact
/// and a generation never ends early.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopTokens {
    /// Ascending, without repeats.
    pub tokens: Vec<u32>,
    pub min_tokens: usize,
}

impl StopTokens {
    /// `eos` (unless `ignore_eos`) and `extra`; None when that is just
    /// `eos` from the first token on (the default).
    pub fn resolve(eos: &[u32], extra: &[u32], ignore_eos: bool, min_tokens: usize) -> Option<Self> {
        if extra.is_empty() && !ignore_eos && min_tokens == 0 {
            return None;
        }
        let mut tokens: Vec<u32> = if ignore_eos { vec![] } else { eos.to_vec() };
        tokens.extend_from_slice(extra);
        tokens.sort_unstable();
        tokens.dedup();
        Some(StopTokens { tokens, min_tokens })
    }
}

/// Logits that [`SamplingParams::adjust_logits`] changes: a full row
/// (token t's logit at index t), or [`Candidates`].
pub trait TokenLogits {
    /// Token `t`'s logit, if held.
    fn logit_mut(&mut self, token: u32) -> Option<&mut f32>;
    /// Calls `f` on every (token, logit) held.
    fn for_each_logit(&mut self, f: impl FnMut(u32, &mut f32));
}

impl TokenLogits for [f32] {
    fn logit_mut(&mut self, token: u32) -> Option<&mut f32> {
        self.get_mut(token as usize)
    }

    fn for_each_logit(&mut self, mut f: impl FnMut(u32, &mut f32)) {
        for (t, l) in self.iter_mut().enumerate() {
            f(t as u32, l);
        }
    }
}

/// The logits of some tokens: what a draft that scores part of the
/// vocabulary holds (a trained draft's head, the GPU draft's top 64).
pub struct Candidates<'a> {
    ids: &'a [u32],
    logits: &'a mut [f32],
}

impl<'a> Candidates<'a> {
    /// `ids` ascending, one logit each.
    pub fn new(ids: &'a [u32], logits: &'a mut [f32]) -> Self {
        debug_assert!(ids.len() == logits.len() && ids.windows(2).all(|w| w[0] < w[1]));
        Candidates { ids, logits }
    }
}

impl TokenLogits for Candidates<'_> {
    fn logit_mut(&mut self, token: u32) -> Option<&mut f32> {
        self.ids.binary_search(&token).ok().map(|i| &mut self.logits[i])
    }

    fn for_each_logit(&mut self, mut f: impl FnMut(u32, &mut f32)) {
        for (&t, l) in self.ids.iter().zip(self.logits.iter_mut()) {
            f(t, l);
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            penalties: Penalties::default(),
            logit_bias: vec![],
            stop: None,
            json_object: None,
        }
    }
}

/// vLLM's penalties: `repetition` (> 0; 1 is none) divides the positive
/// logits of every token in the prompt or the output and multiplies the
/// negative ones; then OpenAI's `frequency` and `presence` (in [−2, 2])
/// subtract `frequency · count + presence` from each token the output
/// holds `count > 0` times. Functions of the text so far, so a verified
/// position is penalized by the tokens before it, drafts included: the
/// rule stays exact (a draft's distribution is whatever it sampled from).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Penalties {
    pub frequency: f32,
    pub presence: f32,
    pub repetition: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties { frequency: 0.0, presence: 0.0, repetition: 1.0 }
    }
}

impl Penalties {
    pub fn is_none(&self) -> bool {
        *self == Penalties::default()
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("frequency_penalty", self.frequency), ("presence_penalty", self.presence)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ModelError::InvalidArgument(format!("`{name}` must be in [-2, 2], got {v}")));
            }
        }
        if !(self.repetition.is_finite() && self.repetition > 0.0) {
            return Err(ModelError::InvalidArgument(format!("`repetition_penalty` must be > 0, got {}", self.repetition)));
        }
        Ok(())
    }

    /// Penalizes `row`, the logits that follow `prompt` then `output`.
    pub fn apply<R: TokenLogits + ?Sized>(&self, row: &mut R, prompt: &[u32], output: &[u32]) {
        if self.repetition != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(output) {
                if let Some(l) = row.logit_mut(t).filter(|_| seen.insert(t)) {
                    *l = if *l > 0.0 { *l / self.repetition } else { *l * self.repetition };
                }
            }
        }
        if self.frequency != 0.0 || self.presence != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, count) in counts {
                if let Some(l) = row.logit_mut(t) {
                    *l -= self.frequency * count as f32 + self.presence;
                }
            }
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::InvalidArgument(format!("`temperature` must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidArgument(format!("`top_p` must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ModelError::InvalidArgument(format!("`min_p` must be in [0, 1], got {}", self.min_p)));
        }
        if let Some(&(t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(ModelError::InvalidArgument(format!("`logit_bias` of token {t} must be in [-100, 100], got {b}")));
        }
        if self.json_object.is_some() && self.stop.as_ref().is_some_and(|s| s.tokens.is_empty()) {
            return Err(ModelError::InvalidArgument("`json_object` needs a token to end the answer: not `ignore_eos` without `stop_token_ids`".into()));
        }
        self.penalties.validate()
    }

    /// Whether the logits are changed before sampling.
    pub fn adjusts_logits(&self) -> bool {
        !(self.penalties.is_none() && self.logit_bias.is_empty() && self.stop.as_ref().is_none_or(|s| s.min_tokens == 0) && self.json_object.is_none())
    }

    /// Changes `row`, the logits after `prompt` then `output`: the logit
    /// bias, then the penalties (vLLM's order), the stop tokens banned
    /// before `min_tokens`, and JSON mode's mask. The target's rows get
    /// this, and so do a draft's (its drafts so far counted as output): a
    /// draft that proposes under the same constraints is accepted more
    /// often, and the rule stays exact, since a draft's distribution is
    /// whatever it sampled from.
    pub fn adjust_logits<R: TokenLogits + ?Sized>(&self, row: &mut R, prompt: &[u32], output: &[u32]) {
        for &(t, bias) in &self.logit_bias {
            if let Some(l) = row.logit_mut(t) {
                *l += bias;
            }
        }
        self.penalties.apply(row, prompt, output);
        if let Some(stop) = self.stop.as_ref().filter(|s| output.len() < s.min_tokens) {
            for &t in &stop.tokens {
                if let Some(l) = row.logit_mut(t) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(json) = &self.json_object {
            json.mask(row, output, self.stop.as_ref());
        }
    }

    /// The tokens that end the generation, given the model's `eos`.
    pub fn stop_tokens<'a>(&'a self, eos: &'a [u32]) -> &'a [u32] {
        self.stop.as_ref().map_or(eos, |s| &s.tokens)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The parameters a draft samples with: the same, but never more than
    /// `MAX_SPARSE_SUPPORT` tokens, so the draft distribution is exactly
    /// sparse and travels exactly.
    pub fn for_draft(&self) -> SamplingParams {
        let top_k = if self.top_k == 0 { MAX_SPARSE_SUPPORT } else { self.top_k.min(MAX_SPARSE_SUPPORT) };
        SamplingParams { top_k, ..self.clone() }
    }

    /// Draws a token from `logits` for sequence position `position`
    /// (draws keyed by position, see [`SessionRng::at`]). No bias nor
    /// penalties: see [`Self::next_token`].
    pub fn sample_at(&self, logits: &[f32], position: usize) -> u32 {
        self.distribution(logits).sample(&mut SessionRng::at(self.seed, position))
    }

    /// The target's token after `context`, whose last `generated` tokens
    /// are output, from its `logits`: adjusted, then drawn at the
    /// context's length.
    pub fn next_token(&self, logits: &[f32], context: &[u32], generated: usize) -> u32 {
        if !self.adjusts_logits() {
            return self.sample_at(logits, context.len());
        }
        let mut row = logits.to_vec();
        let (prompt, output) = context.split_at(context.len() - generated);
        self.adjust_logits(row.as_mut_slice(), prompt, output);
        self.sample_at(&row, context.len())
    }

    /// The distribution these parameters sample from, given raw logits.
    pub fn distribution(&self, logits: &[f32]) -> SparseDist {
        if self.is_greedy() {
            return SparseDist { tokens: vec![argmax(logits)], probs: vec![1.0] };
        }
        self.distribution_over(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)))
    }

    /// [`distribution`](Self::distribution) from `(token, logit)` candidates
    /// only. Exact when they include the `top_k` largest logits and
    /// `0 < top_k ≤` their number (a GPU draft reads back only its top 64;
    /// [`for_draft`](Self::for_draft) keeps `top_k ≤ 64`). Not for greedy
    /// parameters.
    pub fn distribution_over(&self, candidates: impl Iterator<Item = (u32, f32)>) -> SparseDist {
        let inv_t = 1.0 / self.temperature;
        let (mut ids, mut weights): (Vec<u32>, Vec<f32>) = candidates.unzip();
        let max = max_of(&weights);
        // In a loop of its own, which vectorizes.
        for w in &mut weights {
            *w = exp_nonpositive((*w - max) * inv_t);
        }
        if self.min_p > 0.0 {
            // The most likely token weighs exactly 1, so min-p is a cut at
            // `min_p`; made first, it also shrinks what top-k and top-p sort.
            // Relative to the maximum, it is the same before or after them.
            (ids, weights) = ids.iter().zip(&weights).filter(|(_, &w)| w >= self.min_p).map(|(&i, &w)| (i, w)).unzip();
        }
        // Sorting every candidate took 1.7 ms over this model's 49 152
        // tokens, for each of a round's k + 1 positions: the most likely
        // are found by selection over the weights and only they are sorted.
        // The order is total, so the set kept and its order are a full sort's.
        let entries = if self.top_k > 0 {
            let mut top = most_likely(&ids, &weights, self.top_k);
            if self.top_p < 1.0 {
                let total: f64 = top.iter().map(|e| e.1).sum();
                let keep = reach(&top, total, self.top_p as f64).unwrap_or(top.len());
                top.truncate(keep);
            }
            top
        } else if self.top_p < 1.0 {
            // The nucleus among the 256 most likely, else 4× as many.
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            let mut n = 256;
            loop {
                let mut top = most_likely(&ids, &weights, n);
                if let Some(keep) = reach(&top, total, self.top_p as f64) {
                    top.truncate(keep);
                    break top;
                }
                if n >= weights.len() {
                    break top;
                }
                n *= 4;
            }
        } else {
            ids.into_iter().zip(weights.into_iter().map(f64::from)).collect()
        };
        let total: f64 = entries.iter().map(|e| e.1).sum();
        SparseDist { tokens: entries.iter().map(|e| e.0).collect(), probs: entries.iter().map(|e| (e.1 / total) as f32).collect() }
    }
}

/// Most likely first; equal weights by id, so the order is total.
fn most_likely_first(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` most likely candidates (all, if fewer), most likely first:
/// those weighing at least the n-th largest weight, found by selection
/// over the weights alone, sorted, then cut to `n` (ties by id). Weights
/// of 0 (a logit of −∞, or one whose exponential underflowed) are left
/// out: they are never drawn, and a draft's distribution travels with
/// probabilities in (0, 1] only.
fn most_likely(ids: &[u32], weights: &[f32], n: usize) -> Vec<(u32, f64)> {
    let n = n.min(weights.len());
    if n == 0 {
        return Vec::new();
    }
    let mut scratch = weights.to_vec();
    let (_, &mut nth, _) = scratch.select_nth_unstable_by(n - 1, |a, b| b.total_cmp(a));
    let mut top: Vec<(u32, f64)> = ids.iter().zip(weights).filter(|(_, &w)| w >= nth && w > 0.0).map(|(&i, &w)| (i, w as f64)).collect();
    top.sort_by(most_likely_first);
    top.truncate(n);
    top
}

/// How many of `sorted` (most likely first, of weights summing to
/// `total`) it takes to reach `top_p` of the mass, if they do.
fn reach(sorted: &[(u32, f64)], total: f64, top_p: f64) -> Option<usize> {
    let mut mass = 0.0;
    sorted
        .iter()
        .position(|e| {
            mass += e.1 / total;
            mass >= top_p
        })
        .map(|i| i + 1)
}

/// e^x for x ≤ 0, within a few units in the last place, and 0 below −87
/// (where e^x < 1.7e-38); free of branches and calls so that loops over it
/// vectorize (`f32::exp` is a libm call per value).
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // x = n·ln 2 + r, |r| ≤ ln 2 / 2; e^x = 2^n · e^r.
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let tiny = x < -87.0;
    let x = if tiny { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor to r^6: the next term is below 1.2e-7 of the result.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from t's low bits, which hold n (an integer conversion of n
    // itself would not vectorize).
    let e = p * f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if tiny {
        0.0
    } else {
        e
    }
}

/// Index of the largest logit, ties to the lowest index (0 for an empty
/// row). The maximum first, then the first chunk holding it: both loops
/// vectorize (27 → ~7 µs over this model's 49 152 logits, for every
/// verified position and drafted token).
pub fn argmax(logits: &[f32]) -> u32 {
    const CHUNK: usize = 64;
    let max = max_of(logits);
    let Some(c) = logits.chunks(CHUNK).position(|chunk| chunk.iter().fold(false, |seen, &l| seen | (l == max))) else {
        return 0;
    };
    let first = logits[c * CHUNK..].iter().position(|&l| l == max).unwrap_or(0);
    (c * CHUNK + first) as u32
}

/// The largest value (−∞ for none), over sixteen lanes so that it vectorizes.
pub(crate) fn max_of(v: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    for (m, &l) in m.iter_mut().zip(chunks.remainder()) {
        *m = m.max(l);
    }
    for chunk in chunks {
        for (m, &l) in m.iter_mut().zip(chunk) {
            *m = m.max(l);
        }
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// A generated token's log-probability under the target's raw
/// distribution — softmax of the logits, before temperature, top-k and
/// top-p, as vLLM reports by default (`raw_logprobs`) — and the most
/// likely tokens at its position. A function of the logits row alone, so
/// speculation, which gives the target the same rows, gives the same bits.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first, ties to the lower id; empty unless asked for.
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TopLogprob {
    pub token: u32,
    pub logprob: f32,
}

impl TokenLogprob {
    /// `token`'s log-probability in `logits` and the `top` most likely
    /// tokens' (the wire's limit, `MAX_TOP_LOGPROBS`, is checked where it is
    /// asked for).
    pub fn from_logits(logits: &[f32], token: u32, top: usize) -> Self {
        let max = max_of(logits);
        let log_z = max as f64 + sum_exp_below(logits, max).ln();
        let logprob = |l: f32| (l as f64 - log_z) as f32;
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &l) in logits.iter().enumerate() {
                // Strictly greater: an equal logit later in the row ranks below.
                if best.len() == top && l <= best[top - 1].1 {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
        TokenLogprob {
            token,
            logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| logprob(l)),
            top: best.into_iter().map(|(token, l)| TopLogprob { token, logprob: logprob(l) }).collect(),
        }
    }
}

/// Σ e^(l − max) over `logits` (max their largest): sixteen f32 lanes,
/// which vectorize (libm's exp per logit took about 0.3 ms a row of this
/// model), each adding at most 256 terms before its total goes into an
/// f64, so the sum is good to about 1e-6 of itself.
fn sum_exp_below(logits: &[f32], max: f32) -> f64 {
    const LANES: usize = 16;
    let mut sum = 0.0f64;
    for block in logits.chunks(LANES * 256) {
        let mut lanes = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        for (lane, &l) in lanes.iter_mut().zip(chunks.remainder()) {
            *lane += exp_nonpositive(l - max);
        }
        for chunk in chunks {
            for (lane, &l) in lanes.iter_mut().zip(chunk) {
                *lane += exp_nonpositive(l - max);
            }
        }
        sum += lanes.iter().map(|&l| l as f64).sum::<f64>();
    }
    sum
}

/// A probability distribution over the tokens it lists (all others have
/// probability 0). Probabilities sum to 1 up to rounding.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDist {
    pub tokens: Vec<u32>,
    pub probs: Vec<f32>,
}

impl SparseDist {
    /// A distribution that puts all its mass on one token.
    pub fn point(token: u32) -> Self {
        SparseDist { tokens: vec![token], probs: vec![1.0] }
    }

    pub fn prob(&self, token: u32) -> f64 {
        self.tokens.iter().position(|&t| t == token).map_or(0.0, |i| self.probs[i] as f64)
    }

    pub fn sample(&self, rng: &mut SessionRng) -> u32 {
        sample_weighted(self.tokens.iter().copied().zip(self.probs.iter().map(|&p| p as f64)), rng).unwrap_or(self.tokens[0])
    }
}

/// Draws from unnormalised non-negative weights in the order given; `None`
/// when they sum to zero.
pub(crate) fn sample_weighted(weights: impl Iterator<Item = (u32, f64)> + Clone, rng: &mut SessionRng) -> Option<u32> {
    let total: f64 = weights.clone().map(|w| w.1).sum();
    if total <= 0.0 {
        return None;
    }
    let target = rng.next_f64() * total;
    let mut acc = 0.0;
    let mut last = None;
    for (t, w) in weights {
        if w <= 0.0 {
            continue;
        }
        acc += w;
        last = Some(t);
        if target < acc {
            return Some(t);
        }
    }
    last
}

/// Seeded per-session generator (xoshiro256**, seeded through SplitMix64),
/// so a session's draws are reproducible on every platform and version.
#[derive(Clone, Debug)]
pub struct SessionRng {
    s: [u64; 4],
}

impl SessionRng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        SessionRng { s: [next(), next(), next(), next()] }
    }

    /// The generator for the draws made at sequence position `position`
    /// of a session seeded with `seed`. Keying draws by position (not by
    /// how many came before) lets a resumed session, or another server,
    /// make exactly the draws an uninterrupted one would.
    pub fn at(seed: u64, position: usize) -> Self {
        Self::new(seed ^ (position as u64).wrapping_mul(0xA076_1D64_78BD_642F).rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_agrees_with_libm() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (fast, exact) = (exp_nonpositive(x) as f64, (x as f64).exp());
            if x >= -87.0 {
                assert!((fast - exact).abs() <= 4e-7 * exact, "exp({x}): {fast} vs {exact}");
            } else {
                assert_eq!(fast, 0.0);
            }
        }
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax_with_the_top_ranked() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, 0.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = TokenLogprob::from_logits(&logits, 4, 3);
        assert_eq!(lp.token, 4);
        assert!((lp.logprob as f64 - (0.5 - z.ln())).abs() < 1e-6);
        let top: Vec<u32> = lp.top.iter().map(|t| t.token).collect();
        assert_eq!(top, [1, 3, 0], "ranked, ties to the lower id");
        assert!((lp.top[0].logprob as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(TokenLogprob::from_logits(&logits, 2, 0).top.is_empty());
        // Far from zero the maximum is taken out first, so nothing overflows.
        let shifted: Vec<f32> = logits.iter().map(|l| l + 500.0).collect();
        let far = TokenLogprob::from_logits(&shifted, 4, 6);
        assert!((far.logprob - lp.logprob).abs() < 1e-4, "{far:?}");
        assert_eq!(far.top.len(), 6);
        let mass: f64 = far.top.iter().map(|t| (t.logprob as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-5);
        // A vocabulary-sized row, against libm in f64.
        let mut rng = SessionRng::new(5);
        let row: Vec<f32> = (0..49_152).map(|_| (rng.next_f64() * 30.0 - 20.0) as f32).collect();
        let z: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
        for t in [0, 17, 49_151] {
            let lp = TokenLogprob::from_logits(&row, t, 1);
            assert!((lp.logprob as f64 - (row[t as usize] as f64 - z.ln())).abs() < 1e-5, "{lp:?}");
        }
    }

    #[test]
    fn penalties_follow_vllm() {
        let penalties = Penalties { frequency: 0.5, presence: 0.25, repetition: 2.0 };
        let mut row = [1.0f32, -1.0, 2.0, 0.5, 3.0];
        penalties.apply(&mut row[..], &[0, 1], &[2, 2, 3, 9]);
        // Repetition over prompt and output, once per token; then
        // frequency · count + presence over the output (id 9 is past the row).
        assert_eq!(row, [0.5, -2.0, 1.0 - 1.25, 0.25 - 0.75, 3.0]);
        assert!(Penalties::default().is_none());
        let bad = Penalties { repetition: 0.0, ..Penalties::default() };
        assert!(SamplingParams { penalties: bad, ..Default::default() }.validate().unwrap_err().to_string().contains("repetition_penalty"));
        let bad = Penalties { presence: -2.5, ..Penalties::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("presence_penalty"));
    }

    #[test]
    fn greedy_picks_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        let d = SamplingParams::default().distribution(&[0.0, 5.0, 5.0]);
        assert_eq!(d, SparseDist::point(1));
    }

    #[test]
    fn top_k_and_top_p_truncate_and_renormalise() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let p = SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() }.distribution(&logits);
        assert_eq!(p.tokens, vec![3, 2]);
        assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, ..Default::default() }.distribution(&logits);
        // softmax mass of token 3 alone is 0.64 ≥ 0.5.
        assert_eq!(p.tokens, vec![3]);
        assert_eq!(SamplingParams { temperature: 1.0, ..Default::default() }.for_draft().top_k, MAX_SPARSE_SUPPORT);
        // Weights of 0 stay out: −∞ (a masked token), and e^(−100 / 0.5),
        // which underflows. A draft's distribution travels with
        // probabilities in (0, 1] only.
        let logits = [0.0f32, -5.0, -100.0, f32::NEG_INFINITY];
        for params in
            [SamplingParams { temperature: 0.5, top_k: 4, ..Default::default() }, SamplingParams { temperature: 0.5, top_p: 0.999_999, ..Default::default() }]
        {
            let p = params.distribution(&logits);
            assert_eq!(p.tokens, vec![0, 1]);
            assert!(p.probs.iter().all(|&x| x > 0.0), "{p:?}");
        }
    }

    #[test]
    fn min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely() {
        // Weights e^(l − 3): 1, 0.368, 0.135, 0.050.
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let p = SamplingParams { temperature: 1.0, min_p: 0.1, ..Default::default() }.distribution(&logits);
        assert_eq!(p.tokens, vec![1, 2, 3]);
        let mass = 1.0 + (-1.0f64).exp() + (-2.0f64).exp();
        assert!((p.probs[2] as f64 - 1.0 / mass).abs() < 1e-6);
        // After the temperature: at 0.5 the weights are 1, 0.135, 0.018, 0.002.
        let p = SamplingParams { temperature: 0.5, min_p: 0.1, ..Default::default() }.distribution(&logits);
        assert_eq!(p.tokens, vec![2, 3]);
        // With top-k and top-p, in any order: the same set.
        let p = SamplingParams { temperature: 1.0, top_k: 3, top_p: 0.99, min_p: 0.1, ..Default::default() }.distribution(&logits);
        assert_eq!(p.tokens, vec![3, 2, 1]);
        assert!(SamplingParams { min_p: 1.5, ..Default::default() }.validate().unwrap_err().to_string().contains("min_p"));
    }

    #[test]
    fn rng_is_reproducible_and_uniform_enough() {
        let a: Vec<u64> = (0..4).scan(SessionRng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..4).scan(SessionRng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let mut rng = SessionRng::new(1);
        let mean = (0..10_000).map(|_| rng.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn argmax_takes_the_first_of_the_largest() {
        let textbook = |v: &[f32]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32;
        for len in [0, 1, 15, 16, 17, 33, 49_152] {
            // Values repeat, so the largest occurs in several lanes and the remainder.
            let row: Vec<f32> = (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) % 97) as f32 - 50.0).collect();
            assert_eq!(argmax(&row), textbook(&row), "length {len}");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        let mut last = vec![0.0f32; 40];
        last[39] = 1.0;
        assert_eq!(argmax(&last), 39);
        last[20] = 1.0;
        assert_eq!(argmax(&last), 20);
    }

    /// Selecting the most likely before sorting keeps what sorting every
    /// candidate kept, in the same order, over a vocabulary-sized row with
    /// ties, a flat tail and a nucleus past the first 256 tokens.
    #[test]
    fn truncation_keeps_what_a_full_sort_keeps() {
        let logits: Vec<f32> = (0..49_152u32).map(|i| (i.wrapping_mul(2_654_435_761) % 4096) as f32 / 600.0 + if i % 7919 == 0 { 6.0 } else { 0.0 }).collect();
        for (temperature, top_k, top_p) in [(0.7, 0, 0.9), (1.0, 0, 0.5), (1.0, 0, 0.99), (0.8, 40, 1.0), (1.3, 64, 0.8), (1.0, 100_000, 0.95)] {
            let params = SamplingParams { temperature, top_k, top_p, ..Default::default() };
            let fast = params.distribution(&logits);
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
            let mut all: Vec<(u32, f64)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, exp_nonpositive((l - max) * (1.0 / temperature)) as f64)).collect();
            all.sort_by(most_likely_first);
            all.truncate(if top_k == 0 { all.len() } else { top_k });
            let total: f64 = all.iter().map(|e| e.1).sum();
            let mut mass = 0.0;
            let keep = all.iter().position(|e| {
                mass += e.1 / total;
                mass >= top_p as f64
            });
            all.truncate(keep.map_or(all.len(), |i| i + 1));
            let tokens: Vec<u32> = all.iter().map(|e| e.0).collect();
            assert_eq!(fast.tokens, tokens, "t {temperature}, top-k {top_k}, top-p {top_p}");
            let total: f64 = all.iter().map(|e| e.1).sum();
            for (&p, e) in fast.probs.iter().zip(&all) {
                assert!((p as f64 - e.1 / total).abs() <= 1e-6 * (e.1 / total), "t {temperature}, top-k {top_k}, top-p {top_p}: {p:e} vs {:e}", e.1 / total);
            }
        }
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        let err = SamplingParams { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("top_p"));
        let err = SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("temperature"));
    }
}
