//! Where verification happens: the target model in this process, or a
//! Tandem server (see `client`). The speculative loop is the same for both.

use crate::controller::RoundHints;
use crate::EdgeError;
use tandem_model::{judge_round, KvCache, LoadedModel, Logits, LogitsFor, SamplingParams, SeqPass, SparseDist, TokenLogprob, Verdict};

/// A generated token as it becomes final, with its log-probability when
/// the generation asked for them.
#[derive(Clone, Copy, Debug)]
pub struct Emitted<'a> {
    pub token: u32,
    pub logprob: Option<&'a TokenLogprob>,
}

/// Verifies drafts for one generation at a time.
pub trait Target {
    /// Starts a generation of `prompt`; returns the first generated token.
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError>;

    /// Verifies `drafts` continuing `context` (prompt and every generated
    /// token; the last one has not been verified against yet).
    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError>;

    /// Hands the rest of the generation to the target, which decodes it
    /// itself: the tokens after `context`, each passed to `on_token` as it
    /// comes, until the end, until `stop` says so, or until the target
    /// hands the generation back. Only a server does (see
    /// `SpeculationController::hand_off`).
    fn hand_off(&mut self, _context: &[u32], _on_token: &mut dyn FnMut(Emitted), _eos: &[u32], _stop: &dyn Fn() -> bool) -> Result<Decoded, EdgeError> {
        Err(EdgeError::InvalidArgument("only a server target decodes a handed-off generation".into()))
    }

    /// Asks for the target's final hidden states with every open and
    /// round (for EAGLE-style drafts); targets that cannot give them
    /// report none and the draft runs on its own predictions.
    fn want_features(&mut self, _on: bool) {}

    /// The states reported since the last call.
    fn take_features(&mut self) -> Option<TargetFeatures> {
        None
    }

    /// Where the target keeps the log-probabilities asked for and not yet
    /// taken.
    fn logprob_inbox(&mut self) -> &mut LogprobInbox;

    /// Asks for the log-probability of every token `open` and `verify`
    /// emit from now on (None: none).
    fn want_logprobs(&mut self, wanted: Option<LogprobsWanted>) {
        self.logprob_inbox().wanted = wanted;
    }

    /// The log-probabilities of the tokens `open` and `verify` emitted
    /// since the last call, in order (handed-off tokens carry theirs in
    /// [`Emitted`]).
    fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprob_inbox().generated)
    }

    /// With [`LogprobsWanted::prompt`], after `open`: the prompt's tokens'
    /// log-probabilities, each after the first.
    fn take_prompt_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprob_inbox().prompt)
    }
}

/// The log-probabilities a target was asked for, and those it has that
/// the generation has not taken yet.
#[derive(Clone, Debug, Default)]
pub struct LogprobInbox {
    pub wanted: Option<LogprobsWanted>,
    pub generated: Vec<TokenLogprob>,
    pub prompt: Vec<TokenLogprob>,
}

/// Which log-probabilities a generation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogprobsWanted {
    /// Alternatives listed with each token (≤ `MAX_TOP_LOGPROBS`).
    pub top: usize,
    /// The prompt's tokens' too (each after the first), not only the
    /// generated ones.
    pub prompt: bool,
}

/// What the target decoded of a generation handed to it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoded {
    pub tokens: Vec<u32>,
    /// The target handed the generation back before its end (a server
    /// without room to decode, or decoding it more slowly than it was
    /// drafted): the edge drafts again.
    pub handed_back: bool,
}

/// The target's final hidden states for consecutive context positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetFeatures {
    /// Position of the first row.
    pub start: usize,
    pub rows: usize,
    /// `rows × hidden`, row-major.
    pub values: Vec<f32>,
}

impl TargetFeatures {
    /// Adds states reported later: appended where they continue (or
    /// restate part of) these, replacing them otherwise.
    pub fn merge(pending: &mut Option<TargetFeatures>, next: TargetFeatures) {
        match pending {
            Some(p) if next.start >= p.start && next.start <= p.start + p.rows && p.rows > 0 => {
                let width = p.values.len() / p.rows;
                p.rows = next.start - p.start;
                p.values.truncate(p.rows * width);
                p.rows += next.rows;
                p.values.extend(next.values);
            }
            _ => *pending = Some(next),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RoundOutcome {
    pub verdict: Verdict,
    /// Drafts the target judged, a prefix of those sent (a server verifies
    /// only the positions a session's history says may be reached).
    pub verified: usize,
    /// Server-side time of the round, queueing included (remote targets).
    pub server_ms: Option<f64>,
    /// The server's hints for the next round (remote targets).
    pub hints: RoundHints,
}

/// The target model in this process (`generate --local`).
pub struct LocalTarget {
    model: LoadedModel,
    cache: KvCache,
    sampling: SamplingParams,
    want_features: bool,
    features: Option<TargetFeatures>,
    logprobs: LogprobInbox,
    /// Of the generation's context (penalties tell prompt from output).
    prompt_len: usize,
}

impl LocalTarget {
    pub fn new(model: LoadedModel) -> Self {
        let cache = model.llama.new_cache(model.llama.config().n_layers);
        LocalTarget {
            model,
            cache,
            sampling: SamplingParams::default(),
            want_features: false,
            features: None,
            logprobs: LogprobInbox::default(),
            prompt_len: 0,
        }
    }

    /// The log-probabilities of `tokens`, the i-th from row `first + i`.
    fn logprobs_of(&self, logits: &Logits, first: usize, tokens: impl Iterator<Item = u32>) -> Vec<TokenLogprob> {
        let Some(w) = self.logprobs.wanted else { return vec![] };
        tokens.enumerate().map(|(i, t)| TokenLogprob::from_logits(logits.row(first + i), t, w.top)).collect()
    }

    /// One pass over `tokens` at the cache's end; records their final
    /// hidden states when asked for them.
    fn pass(&mut self, tokens: &[u32], logits: LogitsFor) -> Result<Logits, EdgeError> {
        let llama = &self.model.llama;
        let start = self.cache.len();
        let capture: &[usize] = if self.want_features { &[llama.config().n_layers] } else { &[] };
        let (mut out, states) = llama.forward_capturing(&mut [SeqPass { cache: &mut self.cache, tokens, logits }], capture)?;
        if let Some(states) = states.into_iter().next() {
            // Rounded as the wire carries them, so a draft sees the same
            // states here as from a server.
            let values = tandem_protocol::features::round_trip(&states);
            TargetFeatures::merge(&mut self.features, TargetFeatures { start, rows: tokens.len(), values });
        }
        Ok(out.remove(0))
    }
}

impl Target for LocalTarget {
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, _max_new_tokens: usize) -> Result<u32, EdgeError> {
        let llama = &self.model.llama;
        self.cache = llama.new_cache(llama.config().n_layers);
        self.sampling = sampling.clone();
        self.prompt_len = prompt.len();
        self.features = None;
        let of_prompt = self.logprobs.wanted.is_some_and(|w| w.prompt);
        let logits = self.pass(prompt, if of_prompt { LogitsFor::All } else { LogitsFor::Last })?;
        let last = logits.rows() - 1;
        let first = sampling.next_token(logits.row(last), prompt, 0);
        self.logprobs.generated = self.logprobs_of(&logits, last, [first].into_iter());
        self.logprobs.prompt = if of_prompt { self.logprobs_of(&logits, 0, prompt[1..].iter().copied()) } else { vec![] };
        Ok(first)
    }

    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError> {
        // The cache holds everything but the last token: verify it and the
        // drafts in one pass, k + 1 rows of logits.
        let base = self.cache.len();
        debug_assert_eq!(base + 1, context.len());
        let mut feed = vec![*context.last().expect("context is never empty")];
        feed.extend_from_slice(drafts);
        let logits = self.pass(&feed, LogitsFor::All)?;
        let verdict = judge_round(&self.sampling, context, context.len() - self.prompt_len, drafts, q, &logits);
        let logprobs = self.logprobs_of(&logits, 0, drafts[..verdict.accepted].iter().copied().chain([verdict.next]));
        self.logprobs.generated.extend(logprobs);
        self.cache.truncate(base + 1 + verdict.accepted);
        // States past the accepted drafts belong to rejected tokens.
        if let Some(f) = self.features.as_mut() {
            let keep = base + 1 + verdict.accepted - f.start;
            f.values.truncate(keep * f.values.len() / f.rows.max(1));
            f.rows = keep;
        }
        Ok(RoundOutcome { verdict, verified: drafts.len(), server_ms: None, hints: RoundHints::default() })
    }

    fn want_features(&mut self, on: bool) {
        self.want_features = on;
    }

    fn take_features(&mut self) -> Option<TargetFeatures> {
        self.features.take()
    }

    fn logprob_inbox(&mut self) -> &mut LogprobInbox {
        &mut self.logprobs
    }
}

#[cfg(test)]
mod tests {
    use super::TargetFeatures;

    fn rows(start: usize, rows: usize) -> TargetFeatures {
        // Width 2; each value names its position.
        TargetFeatures { start, rows, values: (start..start + rows).flat_map(|p| [p as f32, p as f32]).collect() }
    }

    #[test]
    fn later_states_extend_or_restate_earlier_ones() {
        let mut pending = None;
        TargetFeatures::merge(&mut pending, rows(0, 3));
        TargetFeatures::merge(&mut pending, rows(3, 2));
        assert_eq!(pending, Some(rows(0, 5)), "a contiguous verdict extends the prompt's states");
        TargetFeatures::merge(&mut pending, rows(2, 4));
        assert_eq!(pending, Some(rows(0, 6)), "a restatement from inside replaces the tail");
        TargetFeatures::merge(&mut pending, rows(9, 1));
        assert_eq!(pending, Some(rows(9, 1)), "a gap keeps only the newest");
    }
}
