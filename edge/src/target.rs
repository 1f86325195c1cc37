//! Where verification happens: the target model in this process, or a
//! Tandem server (see `client`). The speculative loop is the same for both.

use crate::EdgeError;
use tandem_model::{judge_round, KvCache, LoadedModel, LogitsFor, SamplingParams, SeqPass, SparseDist, Verdict};

/// Verifies drafts for one generation at a time.
pub trait Target {
    /// Starts a generation of `prompt`; returns the first generated token.
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError>;

    /// Verifies `drafts` continuing `context` (prompt and every generated
    /// token; the last one has not been verified against yet).
    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError>;
}

#[derive(Clone, Debug)]
pub struct RoundOutcome {
    pub verdict: Verdict,
    /// Drafts the target judged, a prefix of those sent (a server verifies
    /// only the positions a session's history says may be reached).
    pub verified: usize,
    /// Server-side time of the round, queueing included (remote targets).
    pub server_ms: Option<f64>,
    /// The server's estimated verification time for k = 1..8 (remote targets).
    pub hinted_verify_ms: Vec<f32>,
}

/// The target model in this process (`generate --local`).
pub struct LocalTarget {
    model: LoadedModel,
    cache: KvCache,
    sampling: SamplingParams,
}

impl LocalTarget {
    pub fn new(model: LoadedModel) -> Self {
        let cache = model.llama.new_cache(model.llama.config().n_layers);
        LocalTarget { model, cache, sampling: SamplingParams::default() }
    }
}

impl Target for LocalTarget {
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, _max_new_tokens: usize) -> Result<u32, EdgeError> {
        let llama = &self.model.llama;
        self.cache = llama.new_cache(llama.config().n_layers);
        self.sampling = sampling.clone();
        let logits = llama.forward(&mut [SeqPass { cache: &mut self.cache, tokens: prompt, logits: LogitsFor::Last }])?;
        Ok(sampling.sample_at(logits[0].row(0), prompt.len()))
    }

    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError> {
        // The cache holds everything but the last token: verify it and the
        // drafts in one pass, k + 1 rows of logits.
        let base = self.cache.len();
        debug_assert_eq!(base + 1, context.len());
        let mut feed = vec![*context.last().expect("context is never empty")];
        feed.extend_from_slice(drafts);
        let logits = self.model.llama.forward(&mut [SeqPass { cache: &mut self.cache, tokens: &feed, logits: LogitsFor::All }])?;
        let verdict = judge_round(&self.sampling, context.len(), drafts, q, &logits[0]);
        self.cache.truncate(base + 1 + verdict.accepted);
        Ok(RoundOutcome { verdict, verified: drafts.len(), server_ms: None, hinted_verify_ms: vec![] })
    }
}
