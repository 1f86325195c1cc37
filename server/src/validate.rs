//! Wire messages → validated requests. Nothing past this point sees raw
//! protobuf, and nothing invalid reaches the model.

use crate::ServeError;
use std::sync::Arc;
use tandem_model::{JsonSchema, OutputGrammar, OutputRegex, Penalties, SamplingParams, SparseDist, StopTokens};
use tandem_protocol::wire::{DraftMode, Open, Verify};
use tandem_protocol::{validate_open, validate_verify};

/// An `Open` with every default filled in.
#[derive(Clone, Debug)]
pub struct ValidOpen {
    /// Prompt, with resumed tokens at the end.
    pub prompt: Vec<u32>,
    /// How many tokens at the end of `prompt` were generated earlier.
    pub resumed: usize,
    pub max_new_tokens: usize,
    /// Without JSON mode's vocabulary table, which the engine attaches.
    pub sampling: SamplingParams,
    /// What the whole output must be (None: any text).
    pub constraint: Option<OutputConstraint>,
    pub server_only: bool,
    /// Report the target's hidden states (EAGLE-style edge drafts).
    pub want_features: bool,
    /// Report generated tokens' log-probabilities with this many
    /// alternatives each (None: none).
    pub logprobs: Option<usize>,
    /// Report the prompt's tokens' log-probabilities too.
    pub prompt_logprobs: bool,
    /// TTFT and TPOT objectives, ms (None: no objective).
    pub ttft_ms: Option<u32>,
    pub tpot_ms: Option<u32>,
}

/// What a session's whole output must be: the engine attaches the
/// vocabulary's tables to it (`JsonObjectMode`).
#[derive(Clone, Debug)]
pub enum OutputConstraint {
    /// OpenAI's JSON mode: one object, satisfying the schema if any
    /// (structured outputs).
    Object(Option<Arc<JsonSchema>>),
    /// vLLM's `guided_regex`.
    Regex(Arc<OutputRegex>),
    /// A GBNF grammar (llama.cpp's `grammar`, vLLM's `guided_grammar`).
    Grammar(Arc<OutputGrammar>),
}

impl ValidOpen {
    /// `eos`: the model's end-of-sequence tokens.
    pub fn new(open: Open, vocab: usize, context_len: usize, eos: &[u32]) -> Result<Self, ServeError> {
        validate_open(&open, vocab)?;
        let sampling = open.sampling.unwrap_or_default();
        let fresh_prompt = open.prompt.len() - open.resumed as usize;
        if fresh_prompt + open.max_new_tokens as usize > context_len {
            return Err(ServeError::InvalidArgument(format!(
                "`open.prompt` ({fresh_prompt} tokens) + `open.max_new_tokens` ({}) exceed the model's context of {context_len}",
                open.max_new_tokens
            )));
        }
        let invalid = |field: &str, e: tandem_model::ModelError| ServeError::InvalidArgument(format!("`open.sampling.{field}`: {e}"));
        // The wire's validation let through at most one of them.
        let constraint = if !sampling.json_schema.is_empty() {
            Some(OutputConstraint::Object(Some(Arc::new(JsonSchema::parse(&sampling.json_schema).map_err(|e| invalid("json_schema", e))?))))
        } else if sampling.json_object {
            Some(OutputConstraint::Object(None))
        } else if !sampling.regex.is_empty() {
            Some(OutputConstraint::Regex(Arc::new(OutputRegex::new(&sampling.regex).map_err(|e| invalid("regex", e))?)))
        } else if !sampling.grammar.is_empty() {
            Some(OutputConstraint::Grammar(Arc::new(OutputGrammar::new(&sampling.grammar).map_err(|e| invalid("grammar", e))?)))
        } else {
            None
        };
        let slo = open.slo.unwrap_or_default();
        Ok(ValidOpen {
            resumed: open.resumed as usize,
            max_new_tokens: open.max_new_tokens as usize,
            sampling: SamplingParams {
                temperature: sampling.temperature,
                top_k: sampling.top_k as usize,
                top_p: if sampling.top_p == 0.0 { 1.0 } else { sampling.top_p },
                min_p: sampling.min_p,
                seed: sampling.seed,
                penalties: Penalties {
                    frequency: sampling.frequency_penalty,
                    presence: sampling.presence_penalty,
                    repetition: if sampling.repetition_penalty == 0.0 { 1.0 } else { sampling.repetition_penalty },
                },
                logit_bias: {
                    let mut bias: Vec<(u32, f32)> = sampling.logit_bias.into_iter().collect();
                    bias.sort_by_key(|b| b.0);
                    bias
                },
                stop: StopTokens::resolve(eos, &sampling.stop_token_ids, sampling.ignore_eos, sampling.min_tokens as usize),
                json_object: None,
            },
            constraint,
            server_only: open.draft_mode == DraftMode::ServerOnly as i32,
            want_features: open.want_features,
            logprobs: open.want_logprobs.then_some(open.top_logprobs as usize),
            prompt_logprobs: open.want_prompt_logprobs,
            ttft_ms: (slo.ttft_ms > 0).then_some(slo.ttft_ms),
            tpot_ms: (slo.tpot_ms > 0).then_some(slo.tpot_ms),
            prompt: open.prompt,
        })
    }

    /// Positions to prefill before the session is open: the whole prompt,
    /// or on resume all but its last token, which the first round carries.
    pub fn prefill_target(&self) -> usize {
        if self.resumed > 0 {
            self.prompt.len() - 1
        } else {
            self.prompt.len()
        }
    }
}

/// A `Verify` whose drafts and distributions are well-formed.
#[derive(Clone, Debug)]
pub struct ValidVerify {
    pub seq: u64,
    pub base_len: usize,
    pub draft: Vec<u32>,
    /// Empty for greedy sessions.
    pub q: Vec<SparseDist>,
}

impl ValidVerify {
    pub fn new(v: Verify, vocab: usize, sampled: bool) -> Result<Self, ServeError> {
        validate_verify(&v, vocab, sampled)?;
        Ok(ValidVerify {
            seq: v.seq,
            base_len: v.base_len as usize,
            q: v.q.into_iter().map(|q| SparseDist { tokens: q.ids, probs: q.probs }).collect(),
            draft: v.draft,
        })
    }

    /// Keeps only the first `n` drafts (and their distributions).
    pub fn clip(&mut self, n: usize) {
        self.draft.truncate(n);
        self.q.truncate(n);
    }
}
