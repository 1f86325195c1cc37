//! `DraftSource` over the GPU forward.

use super::engine::{WgpuModel, WgpuOptions};
use crate::EdgeError;
use tandem_model::{
    check_layers, load_model_draft, reusable_prefix, DraftFeatures, DraftSource, DraftSpec, Llama, LoadedModel, ModelError,
    Proposal, SamplingParams, SessionRng,
};

/// A llama-family model (or its first N layers) drafting on the GPU. Like
/// the CPU's `ModelDraft`, it keeps the KV cache of the longest prefix the
/// new context shares with the last one and drops the rest (rollback).
pub struct WgpuDraft {
    model: WgpuModel,
    /// Tokens whose keys and values the GPU cache holds.
    cached: Vec<u32>,
    stop: Vec<u32>,
}

impl WgpuDraft {
    pub fn new(llama: &Llama, n_layers: usize, stop: Vec<u32>, options: &WgpuOptions) -> Result<Self, EdgeError> {
        Ok(WgpuDraft { model: WgpuModel::new(llama, n_layers, options)?, cached: Vec::new(), stop })
    }

    /// The adapter drafting, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)".
    pub fn adapter(&self) -> &str {
        self.model.adapter()
    }
}

/// The `--draft` source for `--backend wgpu`: `layers:N` and `model:PATH`
/// run on the GPU (the default adapter, its own limits); `none` and
/// `ngram` need no model and are the same as on the CPU.
pub fn build_draft(spec: &DraftSpec, target: &LoadedModel) -> Result<Box<dyn DraftSource>, EdgeError> {
    let stop = target.tokenizer.eos_tokens().to_vec();
    let options = WgpuOptions::default();
    Ok(match spec {
        DraftSpec::None | DraftSpec::Ngram => spec.build(target)?,
        DraftSpec::Layers(n) => Box::new(WgpuDraft::new(&target.llama, check_layers(*n, target)?, stop, &options)?),
        DraftSpec::Model(path) => {
            let draft = load_model_draft(path, target)?;
            Box::new(WgpuDraft::new(&draft.llama, draft.llama.config().n_layers, stop, &options)?)
        }
    })
}

impl DraftSource for WgpuDraft {
    fn propose_until(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> tandem_model::Result<Proposal> {
        let mut proposal = Proposal::default();
        if k == 0 || context.is_empty() {
            return Ok(proposal);
        }
        let common = reusable_prefix(&self.cached, context);
        self.model.truncate(common);
        self.cached.truncate(common);
        let draft_sampling = sampling.for_draft();
        let backend = |e: EdgeError| ModelError::Backend(e.to_string());
        let mut token = 0;
        for i in 0..k {
            let feed = if i == 0 { &context[common..] } else { std::slice::from_ref(&token) };
            let top = self.model.forward(feed).map_err(backend)?;
            self.cached.extend_from_slice(feed);
            token = if sampling.is_greedy() {
                top.argmax()
            } else {
                // Exact: the draft keeps at most the 64 tokens read back.
                let q = draft_sampling.distribution_over(top.tokens.iter().copied().zip(top.logits.iter().copied()));
                let t = q.sample(rng);
                proposal.dists.push(q);
                t
            };
            proposal.tokens.push(token);
            let features = top.features(proposal.features.len());
            proposal.features.push(features);
            if self.stop.contains(&token) || !keep_going(&features) {
                break;
            }
        }
        Ok(proposal)
    }
}
