//! Tandem's model core: GGUF and Hugging Face folder loading, the
//! tokenizer, a llama-family forward over ragged multi-sequence batches
//! with per-sequence KV caches, draft sources, sampling and the lossless
//! verification rule.
//!
//! Everything here is pure computation over model files: no network, no
//! clocks (the exceptions, fetching the default model and models from the
//! Hugging Face Hub, are in `fetch` and `hub`).

mod draft;
mod error;
pub mod fetch;
mod grammar;
pub mod hf;
#[cfg(feature = "hub")]
pub mod hub;
mod json_mode;
mod json_schema;
pub mod kernels;
mod kv_cache;
mod llama;
mod pool;
mod sampling;
mod tokenizer;
mod trained;
mod verify;

pub use draft::{
    check_layers, load_model_draft, Autoregressive, DraftFeatures, DraftSource, DraftSpec, LlamaLayers, ModelDraft, NextTokenScores, NgramDraft, NoDraft,
    PromptLookup, Proposal, StepForward, SyntheticDraft, DRAFT_STREAM,
};
pub use error::{ModelError, Result};
pub use grammar::{OutputGrammar, MAX_GRAMMAR_DEPTH};
pub use json_mode::JsonObjectMode;
pub use json_schema::{JsonSchema, OutputRegex, MAX_SCHEMA_DEPTH};
pub use kv_cache::KvCache;
pub use llama::{LayerWeights, Llama, LlamaConfig, Logits, LogitsFor, QkNorm, SeqPass};
pub use pool::build_compute_pool;
pub use sampling::{argmax, Candidates, Penalties, SamplingParams, SessionRng, SparseDist, StopTokens, TokenLogits, TokenLogprob, TopLogprob};
pub use tokenizer::{template_date, ChatMessage, TextStream, Tokenizer};
pub use trained::trained_draft_fingerprint;
pub use verify::{judge_round, verify_greedy, verify_sampled, Verdict};

use candle_core::quantized::gguf_file;
use std::path::Path;
use std::sync::Arc;

/// A model file loaded once: weights and tokenizer.
#[derive(Clone)]
pub struct LoadedModel {
    pub llama: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
}

impl LoadedModel {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, kernels::MatmulKernels::Tandem)
    }

    /// A GGUF file, or a Hugging Face folder (`config.json`,
    /// `*.safetensors`, `tokenizer.json`).
    pub fn load_with(path: &Path, kernels: kernels::MatmulKernels) -> Result<Self> {
        Self::load_as(path, kernels, None)
    }

    /// [`LoadedModel::load_with`], a folder's weights quantized as they
    /// load (`--quantize`; a GGUF is refused: it is quantized already).
    pub fn load_as(path: &Path, kernels: kernels::MatmulKernels, quantize: Option<hf::Quantize>) -> Result<Self> {
        if path.is_dir() {
            let (llama, tokenizer) = hf::load(path, kernels, quantize)?;
            return Ok(LoadedModel { llama: Arc::new(llama), tokenizer: Arc::new(tokenizer) });
        }
        if let Some(q) = quantize {
            return Err(ModelError::InvalidArgument(format!(
                "`--quantize {q}` applies to Hugging Face folders; `{}` is a GGUF file, quantized already",
                path.display()
            )));
        }
        let io_err = |source| ModelError::Io { path: path.display().to_string(), source };
        let mut file = std::fs::File::open(path).map_err(io_err)?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Format(format!("`{}` is not a readable GGUF file: {e}", path.display())))?;
        let tokenizer = Tokenizer::from_gguf(&content)?;
        let llama = Llama::from_gguf_with(&content, &mut file, kernels)?;
        Ok(LoadedModel { llama: Arc::new(llama), tokenizer: Arc::new(tokenizer) })
    }
}
