//! Draft and verify in one process: the reference loop the networked client
//! must reproduce token for token.

use crate::EdgeError;
use serde::Serialize;
use std::time::Instant;
use tandem_model::{
    verify_greedy, verify_sampled, DraftSource, LoadedModel, LogitsFor, SamplingParams, SeqPass, SessionRng,
};
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
    fn validate(&self) -> Result<(), EdgeError> {
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
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Verification rounds after the prefill.
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
}

pub struct LocalGenerator {
    target: LoadedModel,
    draft: Box<dyn DraftSource>,
}

impl LocalGenerator {
    pub fn new(target: LoadedModel, draft: Box<dyn DraftSource>) -> Self {
        LocalGenerator { target, draft }
    }

    /// Generates, calling `on_token` with each token as soon as it is final.
    pub fn generate(&mut self, req: &GenerateRequest, mut on_token: impl FnMut(u32)) -> Result<Generation, EdgeError> {
        req.validate()?;
        let start = Instant::now();
        let llama = &self.target.llama;
        let eos = self.target.tokenizer.eos_tokens().to_vec();
        let mut target_rng = SessionRng::new(req.sampling.seed);
        // The draft's draws come from their own stream so the target's stay
        // those of a plain sampled run.
        let mut draft_rng = SessionRng::new(req.sampling.seed ^ 0x5EED_D4AF_7000_0001);
        let mut cache = llama.new_cache(llama.config().n_layers);

        let logits = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &req.prompt, logits: LogitsFor::Last }])?;
        let first = req.sampling.distribution(logits[0].row(0)).sample(&mut target_rng);
        let ttft_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut out = vec![first];
        on_token(first);

        let (mut rounds, mut drafted, mut accepted) = (0, 0, 0);
        let mut context = req.prompt.clone();
        while out.len() < req.max_new_tokens && !eos.contains(out.last().expect("non-empty")) {
            context.truncate(req.prompt.len());
            context.extend_from_slice(&out);
            // A round emits at most k + 1 tokens; never draft past the limit.
            let k = req.draft_len.min(req.max_new_tokens - out.len() - 1);
            let proposal = self.draft.propose(&context, k, &req.sampling, &mut draft_rng)?;
            let drafts = &proposal.tokens[..proposal.tokens.len().min(k)];

            // The cache holds everything but the last token: verify it and
            // the drafts in one pass, k + 1 rows of logits.
            let base = cache.len();
            let mut feed = vec![*out.last().expect("non-empty")];
            feed.extend_from_slice(drafts);
            let logits = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &feed, logits: LogitsFor::All }])?;
            let verdict = if req.sampling.is_greedy() {
                verify_greedy(drafts, |i| logits[0].row(i))
            } else {
                let p: Vec<_> = (0..=drafts.len()).map(|i| req.sampling.distribution(logits[0].row(i))).collect();
                verify_sampled(drafts, &proposal.dists[..drafts.len()], &p, &mut target_rng)
            };
            cache.truncate(base + 1 + verdict.accepted);
            rounds += 1;
            drafted += drafts.len();
            accepted += verdict.accepted;

            // An accepted end-of-sequence draft ends the generation there.
            for &t in drafts[..verdict.accepted].iter().chain([&verdict.next]) {
                out.push(t);
                on_token(t);
                if eos.contains(&t) {
                    break;
                }
            }
        }
        let wall_ms = start.elapsed().as_secs_f64() * 1e3;
        let stopped_on_eos = out.last().is_some_and(|t| eos.contains(t));
        Ok(Generation {
            text: self.target.tokenizer.decode(&out.iter().copied().filter(|&t| !self.target.tokenizer.is_special(t)).collect::<Vec<_>>())?,
            prompt_tokens: req.prompt.len(),
            rounds,
            drafted,
            accepted,
            acceptance_rate: if drafted == 0 { 0.0 } else { accepted as f64 / drafted as f64 },
            tokens_per_round: if rounds == 0 { 0.0 } else { (out.len() - 1) as f64 / rounds as f64 },
            ttft_ms,
            wall_ms,
            stopped_on_eos,
            tokens: out,
        })
    }
}
