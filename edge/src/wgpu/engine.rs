//! The draft forward on the GPU: weights uploaded once (still quantized),
//! pipelines, bind groups and every buffer built once per model, then one
//! command submission per token and a read-back of only the top-k logits
//! and four softmax statistics for the last token of a feed.

use super::gpu::{f32_bytes, Gpu};
use crate::EdgeError;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use tandem_model::kernels::{BlockKind, QLinear, QMatrix, QStorage};
use tandem_model::{DraftFeatures, Llama, LlamaConfig};
use tandem_protocol::limits::MAX_SPARSE_SUPPORT;

/// Logits read back per token: enough for any draft distribution (drafts
/// sample from at most `MAX_SPARSE_SUPPORT` tokens).
const TOP_K: usize = MAX_SPARSE_SUPPORT;
/// Logits per first-stage top-k workgroup (topk.wgsl's CHUNK).
const TOPK_CHUNK: usize = 1024;
/// Threads per workgroup of the largest kernels (rmsnorm, top-k).
const MAX_THREADS: u32 = 256;
/// Storage buffers the matmul kernel binds at once (the most of any kernel).
const MAX_STORAGE_BINDINGS: u32 = 8;
/// Workgroup memory of the largest user, topk.wgsl's `chunks` (a 1024-entry
/// sort of values and ids, a 256-float reduction).
const MAX_WORKGROUP_BYTES: u32 = 1024 * 8 + 256 * 4;

const COMMON: &str = include_str!("common.wgsl");
/// Weight bindings and decoding, for the kernels that read matrices.
const DEQUANT: &str = include_str!("dequant.wgsl");
/// Kernel name, whether it reads weight matrices, source.
const SOURCES: [(&str, bool, &str); 8] = [
    ("embed", true, include_str!("embed.wgsl")),
    ("rmsnorm", false, include_str!("rmsnorm.wgsl")),
    ("quantize", false, include_str!("quantize.wgsl")),
    ("matmul", true, include_str!("matmul.wgsl")),
    ("rope", false, include_str!("rope.wgsl")),
    ("attention", false, include_str!("attention.wgsl")),
    ("swiglu", false, include_str!("swiglu.wgsl")),
    ("topk", false, include_str!("topk.wgsl")),
];

/// What the matmuls multiply the (still quantized) weights with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations against weights decoded in the kernel: no activation
    /// rounding. Matches candle's dequantized f32 forward on the CPU (top-64
    /// logits within 3e-6 relative for 12 SmolLM2 layers, 3e-4 for all 30).
    #[default]
    F32,
    /// The activation quantized to 8 bits per 32-block and exact integer
    /// block dot products, as the CPU kernels do (scaled per four-quant
    /// group here, per block there). Equal to the CPU backend to float
    /// rounding until an 8-bit quant lands on the other side of a
    /// rounding boundary (exp and division round differently on the GPU);
    /// one such flip moves logits by up to ~1e-2 relative (README).
    Q8,
}

/// How the GPU draft is set up.
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Device limits to request instead of the adapter's own (each at most
    /// the adapter's). Tests lower them to exercise tiling and the errors.
    pub limits: Option<wgpu::Limits>,
    /// KV cache capacity in positions; the model's context length if `None`.
    pub max_positions: Option<usize>,
    pub activations: Activations,
}

/// The last fed token's logits as read back: the top `k` and softmax
/// statistics over the whole vocabulary (reduced on the GPU).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopLogits {
    /// Token ids, largest logit first (equal logits: lower id first, the
    /// CPU argmax's rule).
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    /// Largest logit.
    pub max: f32,
    /// Σ exp(l − max) over the vocabulary.
    pub z: f32,
    /// Σ exp(l − max) · l over the vocabulary.
    pub zl: f32,
    /// Σ l over the vocabulary.
    pub sum: f32,
    pub vocab: usize,
}

impl TopLogits {
    /// The greedy token.
    pub fn argmax(&self) -> u32 {
        self.tokens[0]
    }

    /// The same features `DraftFeatures::from_logits` gives for the full
    /// row, from the statistics: top-1 = 1/Z, entropy = ln Z + max − Σp·l
    /// (exact, not an approximation over the top k), spread = max − Σl/V.
    pub fn features(&self, position: usize) -> DraftFeatures {
        let (max, z) = (self.max as f64, self.z as f64);
        let top1 = 1.0 / z;
        let top2 = self.logits.get(1).map_or(0.0, |&l| (l as f64 - max).exp() / z);
        DraftFeatures {
            top1: top1 as f32,
            entropy: (z.ln() + max - self.zl as f64 / z) as f32,
            margin: (top1 - top2) as f32,
            spread: (max - self.sum as f64 / self.vocab as f64) as f32,
            position: position as u32,
            copied: false,
        }
    }
}

/// One kernel launch, recorded once and replayed every token.
struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    grid: [u32; 2],
}

/// A llama-family model's first `n_layers` layers, final norm and head on
/// a wgpu device, with a GPU-resident KV cache.
pub struct WgpuModel {
    gpu: Gpu,
    vocab: usize,
    /// KV slots allocated per layer.
    capacity: usize,
    /// Positions the KV cache holds.
    len: usize,
    /// The per-token `Step` uniform (token, position).
    step: wgpu::Buffer,
    /// Embedding and decoder layers: every token.
    layers: Vec<Dispatch>,
    /// Final norm, head and top-k: the last token of a feed only.
    head: Vec<Dispatch>,
    result: wgpu::Buffer,
    /// Mappable copy of `result`, reused every read-back.
    staging: wgpu::Buffer,
    /// 0 pending, 1 mapped, 2 failed: set by the map callback.
    mapped: Arc<AtomicU8>,
    top: TopLogits,
}

impl WgpuModel {
    /// Uploads `llama`'s first `n_layers` layers (1..=n_layers of the model).
    pub fn new(llama: &Llama, n_layers: usize, options: &WgpuOptions) -> Result<Self, EdgeError> {
        let cfg = llama.config().clone();
        if n_layers == 0 || n_layers > cfg.n_layers {
            return Err(EdgeError::InvalidArgument(format!("`n_layers` must be between 1 and the model's {}, got {n_layers}", cfg.n_layers)));
        }
        // The WGSL forward has no bias or per-head norm stage.
        if (0..n_layers).any(|i| llama.layer(i).qkv_bias.is_some()) {
            return Err(EdgeError::InvalidArgument("the wgpu backend does not run models with Q/K/V biases (Qwen2); use --backend cpu".into()));
        }
        if cfg.gemma.is_some() {
            return Err(EdgeError::InvalidArgument("the wgpu backend does not run Gemma's layers (GeGLU, soft caps, output norms); use --backend cpu".into()));
        }
        if (0..n_layers).any(|i| llama.layer(i).qk_norm.is_some()) {
            return Err(EdgeError::InvalidArgument("the wgpu backend does not run models with Q/K norms (Qwen3); use --backend cpu".into()));
        }
        let gpu = Gpu::new(options.limits.as_ref())?;
        check_kernel_limits(&gpu)?;
        let capacity = options.max_positions.unwrap_or(cfg.context_len).clamp(1, cfg.context_len);
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let built = Builder::new(&gpu, &cfg, capacity, options.activations).build(llama, n_layers);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(EdgeError::Gpu(format!("building the draft forward: {e}")));
        }
        let (step, layers, head, result) = built?;
        let k = TOP_K.min(cfg.vocab);
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("top-k read-back"),
            size: result.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        tracing::info!(adapter = %gpu.adapter, n_layers, capacity, "wgpu draft model uploaded");
        let top = TopLogits { tokens: Vec::with_capacity(k), logits: Vec::with_capacity(k), vocab: cfg.vocab, ..Default::default() };
        Ok(WgpuModel { gpu, vocab: cfg.vocab, capacity, len: 0, step, layers, head, result, staging, mapped: Arc::default(), top })
    }

    /// The adapter in use, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)".
    pub fn adapter(&self) -> &str {
        &self.gpu.adapter
    }

    /// Whether the adapter is a software rasterizer on the CPU (lavapipe).
    pub fn is_software(&self) -> bool {
        self.gpu.software
    }

    /// Positions the KV cache holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position at or after `len` (rollback). Slots are simply
    /// overwritten by the next tokens: attention never reads past the
    /// current position.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Feeds `tokens` at positions `len()..`, one submission each, and
    /// returns the last one's top logits. On error the cache is left as it
    /// was.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&TopLogits, EdgeError> {
        if tokens.is_empty() {
            return Err(EdgeError::InvalidArgument("`tokens` is empty".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(EdgeError::InvalidArgument(format!("token id {t} is outside the vocabulary of {}", self.vocab)));
        }
        if self.len + tokens.len() > self.capacity {
            return Err(EdgeError::InvalidArgument(format!(
                "{} positions exceed the GPU draft's KV cache of {} (`max_positions`)",
                self.len + tokens.len(),
                self.capacity
            )));
        }
        let scope = self.gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        for (i, &token) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            let mut step = [0u8; 8];
            step[..4].copy_from_slice(&token.to_le_bytes());
            step[4..].copy_from_slice(&((self.len + i) as u32).to_le_bytes());
            self.gpu.queue.write_buffer(&self.step, 0, &step);
            let mut encoder = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("draft step") });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("draft step"), timestamp_writes: None });
                let list = if last { [&self.layers[..], &self.head[..]] } else { [&self.layers[..], &[][..]] };
                for d in list.into_iter().flatten() {
                    pass.set_pipeline(&d.pipeline);
                    pass.set_bind_group(0, &d.bind, &[]);
                    pass.dispatch_workgroups(d.grid[0], d.grid[1], 1);
                }
            }
            if last {
                encoder.copy_buffer_to_buffer(&self.result, 0, &self.staging, 0, self.result.size());
            }
            self.gpu.queue.submit([encoder.finish()]);
        }
        let read = self.read_back();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(EdgeError::Gpu(format!("draft step: {e}")));
        }
        read?;
        self.len += tokens.len();
        Ok(&self.top)
    }

    /// Maps the staging buffer, decodes it into `self.top`, unmaps.
    fn read_back(&mut self) -> Result<(), EdgeError> {
        self.mapped.store(0, Ordering::Release);
        let flag = self.mapped.clone();
        self.staging.map_async(wgpu::MapMode::Read, .., move |r| flag.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release));
        self.gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| EdgeError::Gpu(format!("waiting for the draft step: {e}")))?;
        if self.mapped.load(Ordering::Acquire) != 1 {
            return Err(EdgeError::Gpu("mapping the top-k read-back failed".into()));
        }
        {
            let view = self.staging.get_mapped_range(..).map_err(|e| EdgeError::Gpu(format!("reading the top-k: {e}")))?;
            let word = |i: usize| u32::from_le_bytes([view[4 * i], view[4 * i + 1], view[4 * i + 2], view[4 * i + 3]]);
            let k = self.top.tokens.capacity();
            let top = &mut self.top;
            top.logits.clear();
            top.tokens.clear();
            top.logits.extend((0..k).map(|i| f32::from_bits(word(i))));
            top.tokens.extend((0..k).map(|i| word(k + i)));
            [top.max, top.z, top.zl, top.sum] = std::array::from_fn(|i| f32::from_bits(word(2 * k + i)));
        }
        self.staging.unmap();
        Ok(())
    }
}

/// The kernels' fixed workgroup shapes against the device's limits.
fn check_kernel_limits(gpu: &Gpu) -> Result<(), EdgeError> {
    let l = &gpu.limits;
    let checks = [
        ("max_compute_invocations_per_workgroup", MAX_THREADS, l.max_compute_invocations_per_workgroup),
        ("max_compute_workgroup_size_x", MAX_THREADS, l.max_compute_workgroup_size_x),
        ("max_storage_buffers_per_shader_stage", MAX_STORAGE_BINDINGS, l.max_storage_buffers_per_shader_stage),
        ("max_compute_workgroup_storage_size", MAX_WORKGROUP_BYTES, l.max_compute_workgroup_storage_size),
    ];
    for (limit, needed, allowed) in checks {
        if needed > allowed {
            return Err(EdgeError::GpuLimit { what: "the draft kernels".into(), limit, needed: needed as u64, allowed: allowed as u64 });
        }
    }
    Ok(())
}

/// A weight matrix's rows `row0..row0 + rows` on the GPU: small enough for
/// one storage binding (large tables are split into several).
struct Tile {
    kind: u32,
    row0: u32,
    rows: u32,
    cols: u32,
    w: wgpu::Buffer,
    d: wgpu::Buffer,
    m: wgpu::Buffer,
}

/// The activation row in 8-bit blocks (quantize.wgsl's output).
struct QAct {
    qs: wgpu::Buffer,
    d: wgpu::Buffer,
    dsum: wgpu::Buffer,
}

/// The forward's working buffers.
struct Buffers {
    x: wgpu::Buffer,
    h: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    gate_up: wgpu::Buffer,
    gated: wgpu::Buffer,
    logits: wgpu::Buffer,
    scores: wgpu::Buffer,
    act: QAct,
}

/// Builds the dispatch lists once: uploads, pipelines, bind groups.
struct Builder<'a> {
    gpu: &'a Gpu,
    cfg: &'a LlamaConfig,
    capacity: usize,
    activations: Activations,
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    pipelines: HashMap<PipelineKey, wgpu::ComputePipeline>,
    /// Uploaded matrices by address: the tied head reuses the embedding's.
    uploaded: HashMap<usize, Arc<Vec<Tile>>>,
}

type Built = (wgpu::Buffer, Vec<Dispatch>, Vec<Dispatch>, wgpu::Buffer);
/// Kernel, entry point, override constants.
type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u32)>);

impl<'a> Builder<'a> {
    fn new(gpu: &'a Gpu, cfg: &'a LlamaConfig, capacity: usize, activations: Activations) -> Self {
        Builder { gpu, cfg, capacity, activations, modules: HashMap::new(), pipelines: HashMap::new(), uploaded: HashMap::new() }
    }

    fn build(mut self, llama: &Llama, n_layers: usize) -> Result<Built, EdgeError> {
        let (cfg, gpu) = (self.cfg, self.gpu);
        let q_dim = cfg.n_heads * cfg.head_dim;
        let kv_dim = cfg.kv_dim();
        let max_cols = cfg.hidden.max(q_dim).max(cfg.ffn);
        let b = Buffers {
            x: gpu.storage("residual", cfg.hidden)?,
            h: gpu.storage("normed", cfg.hidden)?,
            qkv: gpu.storage("qkv", q_dim + 2 * kv_dim)?,
            attn: gpu.storage("attention output", q_dim)?,
            gate_up: gpu.storage("gate/up", 2 * cfg.ffn)?,
            gated: gpu.storage("gated", cfg.ffn)?,
            logits: gpu.storage("logits", cfg.vocab)?,
            scores: gpu.storage("attention scores", cfg.n_heads * self.capacity)?,
            act: QAct {
                qs: gpu.storage("quantized activation", max_cols / 4)?,
                d: gpu.storage("activation scales", max_cols / 32)?,
                dsum: gpu.storage("activation sums", max_cols / 32)?,
            },
        };
        let step = gpu.uniform("step", &[0, 0]);
        let half = cfg.head_dim / 2;
        let (cos, sin) = llama.rope_tables();
        let rope_cos = gpu.storage_init("RoPE cos", &f32_bytes(&cos[..self.capacity * half]))?;
        let rope_sin = gpu.storage_init("RoPE sin", &f32_bytes(&sin[..self.capacity * half]))?;

        let mut layers = self.embed(llama.embedding(), &b.x, &step)?;
        for i in 0..n_layers {
            let w = llama.layer(i);
            let keys = gpu.storage(&format!("layer {i} KV cache (keys)"), self.capacity * kv_dim)?;
            let values = gpu.storage(&format!("layer {i} KV cache (values)"), self.capacity * kv_dim)?;
            layers.push(self.rmsnorm(&format!("blk.{i}.attn_norm"), w.attn_norm, &b.x, &b.h)?);
            layers.extend(self.quantize(&b.h, cfg.hidden, &b.act)?);
            layers.extend(self.linear(&format!("blk.{i}.qkv"), w.qkv, &b.h, &b.act, &b.qkv, false)?);
            layers.push(self.rope(&b.qkv, &rope_cos, &rope_sin, &keys, &values, &step)?);
            layers.push(self.attention(&b, &keys, &values, &step)?);
            layers.extend(self.quantize(&b.attn, q_dim, &b.act)?);
            layers.extend(self.linear(&format!("blk.{i}.attn_output"), w.wo, &b.attn, &b.act, &b.x, true)?);
            layers.push(self.rmsnorm(&format!("blk.{i}.ffn_norm"), w.ffn_norm, &b.x, &b.h)?);
            layers.extend(self.quantize(&b.h, cfg.hidden, &b.act)?);
            layers.extend(self.linear(&format!("blk.{i}.gate_up"), w.gate_up, &b.h, &b.act, &b.gate_up, false)?);
            layers.push(self.swiglu(&b.gate_up, &b.gated)?);
            layers.extend(self.quantize(&b.gated, cfg.ffn, &b.act)?);
            layers.extend(self.linear(&format!("blk.{i}.ffn_down"), w.down, &b.gated, &b.act, &b.x, true)?);
        }

        let mut head = vec![self.rmsnorm("output_norm", llama.output_norm(), &b.x, &b.h)?];
        head.extend(self.quantize(&b.h, cfg.hidden, &b.act)?);
        head.extend(self.linear("output", llama.head(), &b.h, &b.act, &b.logits, false)?);
        let (topk, result) = self.topk(&b.logits)?;
        head.extend(topk);
        Ok((step, layers, head, result))
    }

    fn pipeline(&mut self, name: &'static str, entry: &'static str, constants: &[(&'static str, u32)]) -> wgpu::ComputePipeline {
        let key = (name, entry, constants.to_vec());
        if let Some(p) = self.pipelines.get(&key) {
            return p.clone();
        }
        let device = &self.gpu.device;
        let module = self.modules.entry(name).or_insert_with(|| {
            let (_, weights, source) = SOURCES.iter().find(|s| s.0 == name).copied().unwrap_or_default();
            let dequant = if weights { DEQUANT } else { "" };
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(format!("{COMMON}\n{dequant}\n{source}").into()),
            })
        });
        let constants: Vec<(&str, f64)> = constants.iter().map(|&(k, v)| (k, v as f64)).collect();
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, ..Default::default() },
            cache: None,
        });
        self.pipelines.insert(key, pipeline.clone());
        pipeline
    }

    /// A dispatch binding `buffers` to bindings 0, 1, 2, … in order.
    fn dispatch(&self, pipeline: wgpu::ComputePipeline, buffers: &[&wgpu::Buffer], grid: [u32; 2]) -> Dispatch {
        let at: Vec<(u32, &wgpu::Buffer)> = buffers.iter().enumerate().map(|(i, b)| (i as u32, *b)).collect();
        self.dispatch_at(pipeline, &at, grid)
    }

    /// A dispatch binding each buffer to the binding number given with it.
    fn dispatch_at(&self, pipeline: wgpu::ComputePipeline, buffers: &[(u32, &wgpu::Buffer)], grid: [u32; 2]) -> Dispatch {
        let entries: Vec<wgpu::BindGroupEntry> =
            buffers.iter().map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() }).collect();
        let bind = self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.get_bind_group_layout(0), entries: &entries });
        Dispatch { pipeline, bind, grid }
    }

    /// `mat` on the GPU, split by rows into tiles that each fit one
    /// storage binding.
    fn upload(&mut self, what: &str, mat: &QMatrix) -> Result<Arc<Vec<Tile>>, EdgeError> {
        let key = mat as *const QMatrix as usize;
        if let Some(tiles) = self.uploaded.get(&key) {
            return Ok(tiles.clone());
        }
        let (rows, cols) = (mat.rows(), mat.cols());
        let nb = cols / 32;
        // Kind code (common.wgsl), then quants (or f32 values), scales and
        // minimums with their bytes per row.
        type Arrays<'m> = (u32, Cow<'m, [u8]>, usize, Vec<u8>, usize, Vec<u8>, usize);
        let (kind, w, w_row, d, d_row, m, m_row): Arrays = match mat.storage() {
            QStorage::F32(v) => (KIND_F32, Cow::Owned(f32_bytes(v)), cols * 4, vec![], 0, vec![], 0),
            QStorage::Blocks { kind, d, m, qs } => {
                let code = match kind {
                    BlockKind::Q4_0 => 0,
                    BlockKind::Q4_1 => 1,
                    BlockKind::Q8_0 => 2,
                    BlockKind::Q8Half => 3,
                };
                let m_row = if m.is_empty() { 0 } else { nb * 4 };
                (code, Cow::Owned(qs), nb * kind.quant_bytes(), f32_bytes(&d), nb * kind.scales() * 4, f32_bytes(&m), m_row)
            }
        };
        let widest = w_row.max(d_row).max(m_row) as u64;
        self.gpu.check_storage(&format!("one row of `{what}`"), widest)?;
        let per_tile = (self.gpu.max_storage_bytes() / widest) as usize;
        let mut tiles = Vec::new();
        for row0 in (0..rows).step_by(per_tile) {
            let n = per_tile.min(rows - row0);
            let part = |bytes: &[u8], per_row: usize| bytes.get(row0 * per_row..(row0 + n) * per_row).unwrap_or(&[]).to_vec();
            let label = format!("`{what}` rows {row0}..{}", row0 + n);
            tiles.push(Tile {
                kind,
                row0: row0 as u32,
                rows: n as u32,
                cols: cols as u32,
                w: self.gpu.storage_init(&label, &part(&w, w_row))?,
                d: self.gpu.storage_init(&label, &part(&d, d_row))?,
                m: self.gpu.storage_init(&label, &part(&m, m_row))?,
            });
        }
        if tiles.len() > 1 {
            tracing::debug!(what, tiles = tiles.len(), "matrix split to fit max_storage_buffer_binding_size");
        }
        let tiles = Arc::new(tiles);
        self.uploaded.insert(key, tiles.clone());
        Ok(tiles)
    }

    fn embed(&mut self, table: &QMatrix, x: &wgpu::Buffer, step: &wgpu::Buffer) -> Result<Vec<Dispatch>, EdgeError> {
        let tiles = self.upload("token_embd", table)?;
        let grid = self.gpu.grid("the embedding lookup", table.cols().div_ceil(64) as u32)?;
        let mut out = Vec::new();
        for t in tiles.iter() {
            let p = self.pipeline("embed", "main", &[("KIND", t.kind)]);
            let range = self.gpu.uniform("embedding rows", &[t.row0, t.rows, t.cols]);
            out.push(self.dispatch(p, &[&t.w, &t.d, &t.m, x, &range, step], grid));
        }
        Ok(out)
    }

    fn rmsnorm(&mut self, what: &str, gain: &[f32], x: &wgpu::Buffer, out: &wgpu::Buffer) -> Result<Dispatch, EdgeError> {
        let gain = self.gpu.storage_init(what, &f32_bytes(gain))?;
        let shape = self.gpu.uniform(what, &[self.cfg.hidden as u32, self.cfg.rms_eps.to_bits()]);
        let p = self.pipeline("rmsnorm", "main", &[]);
        Ok(self.dispatch(p, &[x, &gain, out, &shape], [1, 1]))
    }

    /// Quantizes the activation `x` for the next matmul; nothing to do with
    /// f32 activations.
    fn quantize(&mut self, x: &wgpu::Buffer, n: usize, act: &QAct) -> Result<Option<Dispatch>, EdgeError> {
        if self.activations == Activations::F32 {
            return Ok(None);
        }
        let grid = self.gpu.grid("activation quantization", (n / 32).div_ceil(64) as u32)?;
        let len = self.gpu.uniform("activation length", &[n as u32]);
        let p = self.pipeline("quantize", "main", &[]);
        Ok(Some(self.dispatch(p, &[x, &act.qs, &act.d, &act.dsum, &len], grid)))
    }

    /// `out[..] (+)= lin · x`, one dispatch per part and tile.
    fn linear(&mut self, what: &str, lin: &QLinear, x: &wgpu::Buffer, act: &QAct, out: &wgpu::Buffer, accumulate: bool) -> Result<Vec<Dispatch>, EdgeError> {
        let mut dispatches = Vec::new();
        let mut offset = 0;
        let f32_act = (self.activations == Activations::F32) as u32;
        for (pi, part) in lin.parts().iter().enumerate() {
            let tiles = self.upload(&format!("{what}[{pi}]"), part)?;
            for t in tiles.iter() {
                // Eight rows per workgroup (matmul.wgsl's ROWS).
                let grid = self.gpu.grid(&format!("`{what}`"), t.rows.div_ceil(8))?;
                let shape = self.gpu.uniform(what, &[t.rows, t.cols, offset + t.row0, accumulate as u32]);
                let p = self.pipeline("matmul", "main", &[("KIND", t.kind), ("F32_ACT", f32_act)]);
                dispatches.push(self.dispatch(p, &[&t.w, &t.d, &t.m, &act.qs, &act.d, &act.dsum, x, out, &shape], grid));
            }
            offset += part.rows() as u32;
        }
        Ok(dispatches)
    }

    fn rope(
        &mut self,
        qkv: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        keys: &wgpu::Buffer,
        values: &wgpu::Buffer,
        step: &wgpu::Buffer,
    ) -> Result<Dispatch, EdgeError> {
        let cfg = self.cfg;
        let threads = cfg.kv_dim().max((cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim / 2);
        let grid = self.gpu.grid("RoPE", threads.div_ceil(64) as u32)?;
        let heads = self.gpu.uniform("heads", &[cfg.n_heads as u32, cfg.n_kv_heads as u32, cfg.head_dim as u32]);
        let p = self.pipeline("rope", "main", &[]);
        Ok(self.dispatch(p, &[qkv, cos, sin, keys, values, &heads, step], grid))
    }

    fn attention(&mut self, b: &Buffers, keys: &wgpu::Buffer, values: &wgpu::Buffer, step: &wgpu::Buffer) -> Result<Dispatch, EdgeError> {
        let cfg = self.cfg;
        let grid = self.gpu.grid("attention", cfg.n_heads as u32)?;
        // The CPU's scale, computed the same way.
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let shape = [cfg.n_heads as u32, cfg.n_kv_heads as u32, cfg.head_dim as u32, self.capacity as u32, scale.to_bits()];
        let shape = self.gpu.uniform("attention", &shape);
        let p = self.pipeline("attention", "main", &[]);
        Ok(self.dispatch(p, &[&b.qkv, keys, values, &b.scores, &b.attn, &shape, step], grid))
    }

    fn swiglu(&mut self, gate_up: &wgpu::Buffer, gated: &wgpu::Buffer) -> Result<Dispatch, EdgeError> {
        let grid = self.gpu.grid("SwiGLU", self.cfg.ffn.div_ceil(64) as u32)?;
        let len = self.gpu.uniform("ffn", &[self.cfg.ffn as u32]);
        let p = self.pipeline("swiglu", "main", &[]);
        Ok(self.dispatch(p, &[gate_up, gated, &len], grid))
    }

    /// The two top-k stages and the buffer the result lands in.
    fn topk(&mut self, logits: &wgpu::Buffer) -> Result<(Vec<Dispatch>, wgpu::Buffer), EdgeError> {
        let vocab = self.cfg.vocab;
        let k = TOP_K.min(vocab);
        let n_chunks = vocab.div_ceil(TOPK_CHUNK);
        let gpu = self.gpu;
        let cand_val = gpu.storage("top-k candidates", n_chunks * k)?;
        let cand_idx = gpu.storage("top-k candidate ids", n_chunks * k)?;
        let stats = gpu.storage("softmax statistics", n_chunks * 4)?;
        let result = gpu.storage("top-k result", 2 * k + 4)?;
        let shape = gpu.uniform("top-k", &[vocab as u32, TOPK_CHUNK as u32, n_chunks as u32]);
        let grid = gpu.grid("top-k", n_chunks as u32)?;
        let constant = &[("K", k as u32)];
        let chunks = self.pipeline("topk", "chunks", constant);
        let merge = self.pipeline("topk", "merge", constant);
        let chunks = self.dispatch_at(chunks, &[(0, logits), (1, &cand_val), (2, &cand_idx), (3, &stats), (5, &shape)], grid);
        let merge = self.dispatch_at(merge, &[(1, &cand_val), (2, &cand_idx), (3, &stats), (4, &result), (5, &shape)], [1, 1]);
        Ok((vec![chunks, merge], result))
    }
}

/// `KIND_F32` in common.wgsl.
const KIND_F32: u32 = 4;
