//! One edge device's generator: the model, its draft, the controller and
//! where verification happens, assembled once and used for many
//! generations (`generate`, `chat`, `serve`).

use crate::candle_draft::CandleLayers;
use crate::client::{ClientConfig, RemoteTarget};
use crate::controller::SpeculationController;
use crate::{EdgeError, Emitted, GenerateRequest, Generation, LocalTarget, Speculator};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tandem_model::hf::Quantize;
use tandem_model::kernels::MatmulKernels;
use tandem_model::{Autoregressive, DraftSource, DraftSpec, LoadedModel, Tokenizer};

/// Where the draft model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// candle on the CPU with Tandem's quantized kernels.
    Cpu,
    /// Tandem's WGSL kernels through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// candle's Metal backend (cargo feature `metal`).
    Metal,
    /// The same candle code on candle's CPU device: how the Metal path is
    /// tested where there is no Metal.
    CandleCpu,
}

impl FromStr for Backend {
    type Err = EdgeError;
    fn from_str(s: &str) -> Result<Self, EdgeError> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "wgpu" => Ok(Backend::Wgpu),
            "metal" => Ok(Backend::Metal),
            "candle-cpu" => Ok(Backend::CandleCpu),
            other => Err(EdgeError::InvalidArgument(format!("`--backend {other}`: expected cpu, wgpu, metal or candle-cpu"))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Metal => "metal",
            Backend::CandleCpu => "candle-cpu",
        })
    }
}

/// Where drafts are verified.
#[derive(Clone, Debug)]
pub enum Verifier {
    /// The target model in this process.
    Local,
    /// A Tandem server.
    Server(ClientConfig),
}

/// What an [`Edge`] is made of.
pub struct EdgeOptions {
    pub model: PathBuf,
    /// Quantize a Hugging Face folder's weights as they load.
    pub quantize: Option<Quantize>,
    /// None: the target's first five sixths of layers, with prompt lookup
    /// (`layers:25+lookup` for a 30-layer model).
    pub draft: Option<DraftSpec>,
    pub backend: Backend,
    /// Drafted tokens per round (the most, with a controller).
    pub draft_len: usize,
    /// None: a fixed draft length every round.
    pub controller: Option<SpeculationController>,
    /// Draft ahead while a round is verified (remote verification only).
    pub pipeline: bool,
    pub verifier: Verifier,
    /// Where to record the controller's training samples.
    pub log: Option<Box<dyn Write + Send>>,
}

// One per process, built once: the size difference of the variants does
// not matter.
#[allow(clippy::large_enum_variant)]
enum AnySpeculator {
    Local(Speculator<LocalTarget>),
    Remote(Speculator<RemoteTarget>),
}

/// The draft a model gets when none is named: its first five sixths of
/// layers (25 of SmolLM2-135M's 30, where the figure was measured), with
/// prompt lookup.
fn default_layers_draft(n_layers: usize) -> DraftSpec {
    DraftSpec::WithLookup(Box::new(DraftSpec::Layers((n_layers * 5).div_ceil(6).max(1))))
}

/// A ready generator.
pub struct Edge {
    speculator: AnySpeculator,
    pub tokenizer: Arc<Tokenizer>,
    pub model_path: PathBuf,
    /// The draft (`layers:25`, `ngram`, …), as given or by default.
    pub draft: DraftSpec,
    pub draft_len: usize,
    cancel: Arc<AtomicBool>,
}

impl Edge {
    /// Loads the model, builds the draft and (for a server) the client.
    /// No connection is made until the first generation.
    pub fn open(opts: EdgeOptions) -> Result<Self, EdgeError> {
        let model = LoadedModel::load_as(&opts.model, MatmulKernels::Tandem, opts.quantize)?;
        let spec = opts.draft.unwrap_or_else(|| default_layers_draft(model.llama.config().n_layers));
        let draft = build_draft(&spec, opts.backend, &model, &opts.model)?;
        let tokenizer = model.tokenizer.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let speculator = match opts.verifier {
            Verifier::Local => {
                let s = Speculator::new(LocalTarget::new(model), draft, tokenizer.clone());
                AnySpeculator::Local(configure(s, &cancel, opts.controller, opts.log))
            }
            Verifier::Server(cfg) => {
                let s = Speculator::new(RemoteTarget::new(cfg)?, draft, tokenizer.clone()).with_pipelining(opts.pipeline);
                AnySpeculator::Remote(configure(s, &cancel, opts.controller, opts.log))
            }
        };
        Ok(Edge { speculator, tokenizer, model_path: opts.model, draft: spec, draft_len: opts.draft_len, cancel })
    }

    /// Generates; ends early (keeping the tokens so far) once the flag of
    /// [`Edge::cancel_flag`] is set. The flag is cleared at the start.
    pub fn generate(&mut self, req: &GenerateRequest, on_token: impl FnMut(Emitted)) -> Result<Generation, EdgeError> {
        self.cancel.store(false, Ordering::Relaxed);
        match &mut self.speculator {
            AnySpeculator::Local(s) => s.generate(req, on_token),
            AnySpeculator::Remote(s) => s.generate(req, on_token),
        }
    }

    /// Setting it ends the generation in progress after its current round.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Model name as the OpenAI endpoint reports it (the file's stem).
    pub fn model_id(&self) -> String {
        self.model_path.file_stem().map_or_else(|| "tandem".into(), |s| s.to_string_lossy().into_owned())
    }
}

fn configure<T: crate::Target + Send>(
    s: Speculator<T>,
    cancel: &Arc<AtomicBool>,
    controller: Option<SpeculationController>,
    log: Option<Box<dyn Write + Send>>,
) -> Speculator<T> {
    let s = s.with_cancel(cancel.clone());
    let s = match controller {
        Some(c) => s.with_controller(c),
        None => s,
    };
    match log {
        Some(log) => s.with_log(log),
        None => s,
    }
}

/// The draft source for `spec` on `backend` (`target_path`: the target's
/// file, whose first layers a `layers:N` draft runs). Drafts without a
/// model (`none`, `ngram`) ignore the backend.
pub fn build_draft(spec: &DraftSpec, backend: Backend, target: &LoadedModel, target_path: &Path) -> Result<Box<dyn DraftSource>, EdgeError> {
    let (path, layers) = match spec {
        DraftSpec::WithLookup(inner) => {
            let mut draft = build_draft(inner, backend, target, target_path)?;
            draft.use_prompt_lookup()?;
            return Ok(draft);
        }
        DraftSpec::None | DraftSpec::Ngram => return Ok(spec.build(target)?),
        DraftSpec::Trained(_) if backend == Backend::Cpu => return Ok(spec.build(target)?),
        DraftSpec::Trained(_) => return Err(trained_on_cpu_only(&backend.to_string())),
        DraftSpec::Layers(n) => (target_path, Some(tandem_model::check_layers(*n, target)?)),
        DraftSpec::Model(p) => (p.as_path(), None),
    };
    let stop = target.tokenizer.eos_tokens().to_vec();
    match backend {
        Backend::Cpu => Ok(spec.build(target)?),
        Backend::Wgpu => wgpu_draft(spec, target),
        Backend::Metal | Backend::CandleCpu => {
            // A `model:` draft: its local file (`hf:` fetched), checked
            // against the target's vocabulary before candle loads it.
            let path = tandem_model::fetch::resolve_model(Some(path))?;
            if let DraftSpec::Model(_) = spec {
                tandem_model::load_model_draft(&path, target)?;
            }
            let device = crate::candle_draft::device(&backend.to_string())?;
            Ok(Box::new(Autoregressive::new(CandleLayers::load(&path, layers, &device)?, stop)))
        }
    }
}

/// Trained drafts run on Tandem's CPU kernels only (their one f32 layer
/// is not ported to the other backends).
pub(crate) fn trained_on_cpu_only(backend: &str) -> EdgeError {
    EdgeError::InvalidArgument(format!("`--draft trained` runs on `--backend cpu` only, not `--backend {backend}`"))
}

#[cfg(feature = "wgpu")]
fn wgpu_draft(spec: &DraftSpec, target: &LoadedModel) -> Result<Box<dyn DraftSource>, EdgeError> {
    crate::wgpu::build_draft(spec, target)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_draft(_: &DraftSpec, _: &LoadedModel) -> Result<Box<dyn DraftSource>, EdgeError> {
    Err(EdgeError::InvalidArgument("`--backend wgpu`: this build has no wgpu backend (build with `--features wgpu`)".into()))
}
