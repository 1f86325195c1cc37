//! The speculative loop: draft, verify, apply the verdict, repeat.

use crate::target::Target;
use crate::EdgeError;
use serde::Serialize;
use std::time::Instant;
use tandem_model::{DraftSource, SamplingParams, SessionRng, Tokenizer};
use tandem_protocol::limits::{MAX_DRAFT_TOKENS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS};

/// One generation.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Drafts proposed per round (the fixed-k policy until the speculation
    /// controller lands).
    pub draft_len: usize,
    pub sampling: SamplingParams,
}

impl GenerateRequest {
    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |m: String| Err(EdgeError::InvalidArgument(m));
        if self.prompt.is_empty() {
            return bad("`prompt` is empty".into());
        }
        if self.prompt.len() > MAX_PROMPT_TOKENS {
            return bad(format!("`prompt` must be ≤ {MAX_PROMPT_TOKENS} tokens, got {}", self.prompt.len()));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!("`max_new_tokens` must be in 1..={MAX_NEW_TOKENS}, got {}", self.max_new_tokens));
        }
        if self.draft_len > MAX_DRAFT_TOKENS {
            return bad(format!("`draft_len` must be ≤ {MAX_DRAFT_TOKENS}, got {}", self.draft_len));
        }
        self.sampling.validate().map_err(EdgeError::Model)
    }
}

/// What a generation produced, and how the speculation went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Verification rounds after the first token.
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub acceptance_rate: f64,
    /// Tokens emitted per verification round (accepted drafts + the target's token).
    pub tokens_per_round: f64,
    pub ttft_ms: f64,
    pub wall_ms: f64,
    /// Stopped on an end-of-sequence token (else on `max_new_tokens`).
    pub stopped_on_eos: bool,
    /// Server time of each round (remote runs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_ms: Vec<f64>,
}

impl Generation {
    /// Fills in text and the derived rates.
    pub fn finish(mut self, tokenizer: &Tokenizer, eos: &[u32], started: Instant) -> Result<Self, EdgeError> {
        let visible: Vec<u32> = self.tokens.iter().copied().filter(|&t| !tokenizer.is_special(t)).collect();
        self.text = tokenizer.decode(&visible)?;
        self.acceptance_rate = if self.drafted == 0 { 0.0 } else { self.accepted as f64 / self.drafted as f64 };
        self.tokens_per_round = if self.rounds == 0 { 0.0 } else { (self.tokens.len() - 1) as f64 / self.rounds as f64 };
        self.stopped_on_eos = self.tokens.last().is_some_and(|t| eos.contains(t));
        self.wall_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(self)
    }
}

/// Draft source + target, one generation at a time.
pub struct Speculator<T: Target> {
    pub target: T,
    draft: Box<dyn DraftSource>,
    tokenizer: std::sync::Arc<Tokenizer>,
}

impl<T: Target> Speculator<T> {
    pub fn new(target: T, draft: Box<dyn DraftSource>, tokenizer: std::sync::Arc<Tokenizer>) -> Self {
        Speculator { target, draft, tokenizer }
    }

    /// Generates, calling `on_token` with each token as soon as it is final.
    pub fn generate(&mut self, req: &GenerateRequest, mut on_token: impl FnMut(u32)) -> Result<Generation, EdgeError> {
        req.validate()?;
        let start = Instant::now();
        let eos = self.tokenizer.eos_tokens().to_vec();
        let first = self.target.open(&req.prompt, &req.sampling, req.max_new_tokens)?;
        let mut g = Generation { prompt_tokens: req.prompt.len(), ttft_ms: start.elapsed().as_secs_f64() * 1e3, ..Default::default() };
        g.tokens.push(first);
        on_token(first);

        let mut context = req.prompt.clone();
        context.push(first);
        while g.tokens.len() < req.max_new_tokens && !eos.contains(g.tokens.last().expect("non-empty")) {
            // A round emits at most k + 1 tokens; never draft past the limit.
            let k = req.draft_len.min(req.max_new_tokens - g.tokens.len() - 1);
            // Draft draws are keyed like the target's, from their own stream.
            let mut draft_rng = SessionRng::at(req.sampling.seed ^ 0x5EED_D4AF_7000_0001, context.len());
            let proposal = self.draft.propose(&context, k, &req.sampling, &mut draft_rng)?;
            let n = proposal.tokens.len().min(k);
            let drafts = &proposal.tokens[..n];
            let q = if req.sampling.is_greedy() { &[][..] } else { &proposal.dists[..n] };
            let round = self.target.verify(&context, drafts, q)?;
            let verdict = round.verdict;
            g.rounds += 1;
            g.drafted += drafts.len();
            g.accepted += verdict.accepted;
            g.server_ms.extend(round.server_ms);
            // An accepted end-of-sequence draft ends the generation there.
            for &t in drafts[..verdict.accepted].iter().chain([&verdict.next]) {
                g.tokens.push(t);
                context.push(t);
                on_token(t);
                if eos.contains(&t) {
                    break;
                }
            }
        }
        g.finish(&self.tokenizer, &eos, start)
    }
}
