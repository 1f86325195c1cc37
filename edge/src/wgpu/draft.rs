//! `DraftSource` over the GPU forward.

use super::engine::{TopLogits, WgpuModel, WgpuOptions};
use crate::edge::trained_on_cpu_only;
use crate::EdgeError;
use tandem_model::{
    check_layers, load_model_draft, Autoregressive, Candidates, DraftFeatures, DraftSource, DraftSpec, Llama, LoadedModel, ModelError, NextTokenScores,
    SamplingParams, SparseDist, StepForward,
};

/// A llama-family model (or its first N layers) drafting on the GPU, with
/// the same loop as every other model draft: the KV cache of the longest
/// prefix the new context shares with the last one is kept, the rest
/// dropped (rollback).
pub type WgpuDraft = Autoregressive<WgpuModel>;

pub fn wgpu_draft(llama: &Llama, n_layers: usize, stop: Vec<u32>, options: &WgpuOptions) -> Result<WgpuDraft, EdgeError> {
    Ok(Autoregressive::new(WgpuModel::new(llama, n_layers, options)?, stop))
}

impl StepForward for WgpuModel {
    type Scores = TopLogits;

    fn truncate(&mut self, len: usize) {
        WgpuModel::truncate(self, len);
    }

    fn step(&mut self, tokens: &[u32]) -> tandem_model::Result<TopLogits> {
        self.forward(tokens).cloned().map_err(|e| ModelError::Backend(e.to_string()))
    }
}

impl NextTokenScores for TopLogits {
    fn argmax(&self) -> u32 {
        TopLogits::argmax(self)
    }

    /// Exact: the draft keeps at most the 64 tokens read back.
    fn distribution(&self, draft_sampling: &SamplingParams) -> SparseDist {
        draft_sampling.distribution_over(self.tokens.iter().copied().zip(self.logits.iter().copied()))
    }

    fn features(&self, position: usize) -> DraftFeatures {
        TopLogits::features(self, position)
    }

    /// Over the 64 tokens read back (the rest stay out of the draft), which
    /// are then ordered largest first again; `max` and the sums, which
    /// only the features read, keep the unadjusted row's values.
    fn adjust(&mut self, sampling: &SamplingParams, prompt: &[u32], output: &[u32]) -> bool {
        let mut by_id: Vec<(u32, f32)> = self.tokens.iter().copied().zip(self.logits.iter().copied()).collect();
        by_id.sort_unstable_by_key(|p| p.0);
        let (ids, mut logits): (Vec<u32>, Vec<f32>) = by_id.into_iter().unzip();
        sampling.adjust_logits(&mut Candidates::new(&ids, &mut logits), prompt, output);
        let mut ranked: Vec<(u32, f32)> = ids.into_iter().zip(logits).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        (self.tokens, self.logits) = ranked.into_iter().unzip();
        self.logits.first().is_some_and(|&l| l > f32::NEG_INFINITY)
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
        DraftSpec::Layers(n) => Box::new(wgpu_draft(&target.llama, check_layers(*n, target)?, stop, &options)?),
        DraftSpec::Model(path) => {
            let draft = load_model_draft(path, target)?;
            Box::new(wgpu_draft(&draft.llama, draft.llama.config().n_layers, stop, &options)?)
        }
        DraftSpec::Trained(_) => return Err(trained_on_cpu_only("wgpu")),
        DraftSpec::WithLookup(inner) => {
            let mut draft = build_draft(inner, target)?;
            draft.use_prompt_lookup()?;
            draft
        }
    })
}
