//! Real draft proposals, precomputed and cached on disk.
//!
//! Verification is greedy and lossless, so a session's context is always
//! the prompt followed by a prefix of the target's own output: the draft
//! model's proposal at each such context is all a run can ever ask for.
//! `RealDrafts::load` runs the real draft model (`DraftSpec::build`, e.g.
//! the target's `layers:25` self-draft) once at every reachable context of
//! every prompt, for the longest draft, and caches tokens and features in
//! `$TANDEM_HOME`. A shorter draft is a prefix of the longest (greedy), and
//! the controller's stop rule sees the same features, so replaying the
//! cache proposes exactly what the model would — at no cost to the cores,
//! which go to the server (`live`) or the simulator.

use crate::prompts::BenchPrompt;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tandem_model::{fetch, kernels, DraftFeatures, DraftSource, DraftSpec, LoadedModel, LogitsFor, Proposal, SamplingParams, SeqPass, SessionRng};

/// The proposal at one context: tokens and the features seen drafting them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Cached {
    tokens: Vec<u32>,
    features: Vec<DraftFeatures>,
}

/// Proposals of one draft model for a set of prompts.
pub struct RealDrafts {
    pub spec: String,
    /// Per prompt id: proposals by context length.
    by_prompt: HashMap<String, Arc<HashMap<usize, Cached>>>,
}

impl RealDrafts {
    /// Computes (or reads from the cache) `spec`'s proposals of up to
    /// `draft_len` tokens at every context each prompt's sessions reach.
    pub fn load(spec: &str, draft_len: usize, model: &LoadedModel, prompts: &[BenchPrompt]) -> Result<Self> {
        let parsed: DraftSpec = spec.parse().with_context(|| format!("draft `real:{spec}`"))?;
        let safe: String = spec.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let path = fetch::tandem_home().join(format!("bench-drafts-{safe}.json"));
        let mut cache: HashMap<String, HashMap<usize, Cached>> =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        // A retrained draft proposes differently: its weights are in the key.
        let weights = match parsed.model() {
            DraftSpec::Trained(dir) => format!(":{:016x}", tandem_model::trained_draft_fingerprint(dir.as_deref())?),
            _ => String::new(),
        };
        let mut computed = 0;
        let mut by_prompt = HashMap::new();
        for p in prompts {
            let key = format!("{spec}{weights}:k{}:{draft_len}:{}:{:?}", kernels::NUMERICS, model.llama.config().vocab, p.reference);
            if !cache.contains_key(&key) {
                eprintln!("bench: real `{spec}` draft proposals for {} ...", p.id);
                cache.insert(key.clone(), propose_all(&parsed, draft_len, model, p)?);
                computed += 1;
            }
            by_prompt.insert(p.id.clone(), Arc::new(cache[&key].clone()));
        }
        if computed > 0 {
            std::fs::write(&path, serde_json::to_string(&cache)?).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(RealDrafts { spec: spec.to_string(), by_prompt })
    }

    /// A draft source replaying `prompt`'s proposals.
    pub fn source(&self, prompt: &BenchPrompt) -> CachedDraft {
        CachedDraft { proposals: self.by_prompt.get(&prompt.id).cloned().unwrap_or_default() }
    }

    /// Of the first draft tokens at every reachable context, the fraction
    /// the target accepts (its own next token).
    pub fn first_token_agreement(&self, prompts: &[BenchPrompt]) -> f64 {
        let (mut hits, mut total) = (0usize, 0usize);
        for p in prompts {
            for (&context, c) in self.by_prompt.get(&p.id).map(|m| m.iter()).into_iter().flatten() {
                if let (Some(t), Some(r)) = (c.tokens.first(), p.reference.get(context)) {
                    total += 1;
                    hits += usize::from(t == r);
                }
            }
        }
        hits as f64 / total.max(1) as f64
    }
}

/// The real model's proposal at each context `prompt + output[..i]`, i ≥ 1
/// (the first output token comes from the server's prefill).
fn propose_all(spec: &DraftSpec, draft_len: usize, model: &LoadedModel, p: &BenchPrompt) -> Result<HashMap<usize, Cached>> {
    let mut draft = spec.build(model)?;
    // A draft reading the target's states gets those of every context
    // position but the last, as a server's verdicts would have sent them.
    let states = if draft.wants_target_features() {
        let llama = &model.llama;
        let mut cache = llama.new_cache(llama.config().n_layers);
        let pass = SeqPass { cache: &mut cache, tokens: &p.reference, logits: LogitsFor::None };
        let states = llama.forward_capturing(&mut [pass], &[llama.config().n_layers])?.1.remove(0);
        tandem_protocol::features::round_trip(&states)
    } else {
        vec![]
    };
    let hidden = model.llama.config().hidden;
    let mut out = HashMap::new();
    for context in p.tokens.len() + 1..p.reference.len() {
        let k = draft_len.min(p.reference.len() - context);
        if !states.is_empty() {
            draft.observe_target_features(0, &states[..(context - 1) * hidden]);
        }
        let mut rng = SessionRng::new(0);
        let proposal = draft.propose_until(&p.reference[..context], context - p.tokens.len(), k, &SamplingParams::default(), &mut rng, &mut |_| true)?;
        out.insert(context, Cached { tokens: proposal.tokens, features: proposal.features });
    }
    Ok(out)
}

/// Replays cached proposals, calling the stop rule on each token's
/// features as the model would have.
pub struct CachedDraft {
    proposals: Arc<HashMap<usize, Cached>>,
}

impl DraftSource for CachedDraft {
    fn propose_until(
        &mut self,
        context: &[u32],
        _generated: usize,
        k: usize,
        _sampling: &SamplingParams,
        _rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> tandem_model::Result<Proposal> {
        let mut proposal = Proposal::default();
        let Some(cached) = self.proposals.get(&context.len()) else { return Ok(proposal) };
        for (&token, features) in cached.tokens.iter().zip(&cached.features).take(k) {
            proposal.tokens.push(token);
            proposal.features.push(*features);
            if !keep_going(features) {
                break;
            }
        }
        Ok(proposal)
    }
}
