//! `tandem-bench kernels`: cost of one forward pass by shape.
//!
//! Single-sequence passes of n new tokens after a 64-token context (logits
//! for every new row, as verification needs, except the 98-token prefill,
//! which needs only the last), and a ragged batch of 8 sessions × 5 tokens
//! at different context lengths. Each row is timed with Tandem's kernels
//! and with candle's stock `QMatMul` on the same weights, in the same run.
//! Then the built-in trained draft's cost per drafted token, beside the
//! target's decode step (#10's measure).
//!
//! `--backend wgpu` times the draft forward instead: one decode step after
//! a 64-token context and a 98-token prefill, on the wgpu backend and on
//! the CPU, for a layer-skip draft and the full model.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tandem_edge::wgpu::{WgpuModel, WgpuOptions};
use tandem_model::kernels::MatmulKernels;
use tandem_model::{argmax, DraftSource, DraftSpec, KvCache, Llama, LoadedModel, LogitsFor, SamplingParams, SeqPass, SessionRng};

/// Where `tandem-bench kernels` runs the forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Tandem's CPU kernels (and candle's stock ones as the baseline).
    #[default]
    Cpu,
    /// The wgpu draft backend, next to the CPU on the same draft shapes.
    Wgpu,
}

pub struct KernelBenchConfig {
    pub model: PathBuf,
    pub backend: Backend,
    pub repeats: usize,
    /// Also time candle's stock kernels.
    pub stock: bool,
    /// Print each row to stderr as it completes.
    pub progress: bool,
}

const PASS_SIZES: [usize; 7] = [1, 2, 5, 8, 16, 32, 98];
const CONTEXT: usize = 64;
const RAGGED_CONTEXTS: [usize; 8] = [16, 48, 96, 160, 224, 320, 448, 640];
const RAGGED_TOKENS: usize = 5;

#[derive(Serialize)]
pub struct PassRow {
    /// Label: `n` for a single sequence, `8x5 ragged` for the batch.
    pub shape: String,
    pub tokens: usize,
    /// Median wall time of the pass, Tandem's kernels.
    pub ms: f64,
    pub tokens_per_s: f64,
    /// Median with candle's stock QMatMul (absent with --no-stock).
    pub stock_ms: Option<f64>,
    /// stock_ms / ms.
    pub speedup: Option<f64>,
    /// Weight bytes the pass reads once, over its duration.
    pub weight_gb_per_s: f64,
}

#[derive(Serialize)]
pub struct KernelReport {
    pub model: String,
    pub threads: usize,
    pub simd: String,
    pub weight_bytes_per_pass: usize,
    /// Read bandwidth of a plain parallel sum over 256 MiB, this process.
    pub probe_gb_per_s: f64,
    pub passes: Vec<PassRow>,
    pub ragged: PassRow,
    /// Ragged 8×5 batch over the single 5-token pass (target ≤ 4), each
    /// the median of its own row.
    pub ragged_over_single5: f64,
    /// The same ratio as the median over pairs of the two passes timed
    /// back to back (so both see the same phase of the machine)...
    pub ragged_over_single5_paired: f64,
    /// ...where each 5-token pass runs right after a ragged batch: its
    /// median ms there, against the row's in a loop of its own.
    pub single5_after_ragged_ms: f64,
    /// The built-in trained draft's cost per drafted token beside the
    /// target's decode step (absent for targets it was not trained for).
    pub trained_draft: Option<DraftCost>,
}

/// The trained draft's rounds replayed over the target's greedy output,
/// each timed back to back with one decode step of the target at the same
/// context, so both see the same machine (on this shared VM, phases timed
/// minutes apart differ by 15–20 %).
#[derive(Serialize)]
pub struct DraftCost {
    pub rounds: usize,
    /// Tokens proposed per round (k = 5, greedy, no prompt lookup).
    pub k: usize,
    /// Median over rounds of the round's ms per drafted token: the catch-up
    /// over the target's token and each drafted token's own step.
    pub ms_per_drafted_token: f64,
    /// Median ms of the target's decode steps timed beside the rounds.
    pub target_step_ms: f64,
    /// Median over rounds of (ms per drafted token) / (the step beside it).
    pub draft_over_target_step: f64,
    /// Drafts accepted by the target's greedy output, over all rounds.
    pub acceptance: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Ms of one pass; the caches are rolled back after it.
fn time_once(llama: &Llama, caches: &mut [KvCache], tokens: &[Vec<u32>], logits: LogitsFor) -> Result<f64> {
    let bases: Vec<usize> = caches.iter().map(KvCache::len).collect();
    let start = Instant::now();
    let mut batch: Vec<SeqPass> = caches.iter_mut().zip(tokens).map(|(cache, t)| SeqPass { cache, tokens: t, logits }).collect();
    llama.forward(&mut batch)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    for (cache, &base) in caches.iter_mut().zip(&bases) {
        cache.truncate(base);
    }
    Ok(ms)
}

/// Median ms of `pass` after warming up: at least two passes and 0.3 s.
/// On this project's Intel VM the first passes of a shape ran up to a
/// third slower than the ones after (a 5-token pass 10 ms falling to 8 over
/// fifteen passes), which one warm-up pass left in the median.
fn time_pass(llama: &Llama, caches: &mut [KvCache], tokens: &[Vec<u32>], logits: LogitsFor, repeats: usize) -> Result<f64> {
    let start = Instant::now();
    for warm in 0.. {
        if warm >= 2 && start.elapsed().as_secs_f64() >= 0.3 {
            break;
        }
        time_once(llama, caches, tokens, logits)?;
    }
    Ok(median((0..repeats).map(|_| time_once(llama, caches, tokens, logits)).collect::<Result<_>>()?))
}

fn context_cache(llama: &Llama, text: &[u32], len: usize) -> Result<KvCache> {
    context_cache_layers(llama, text, len, llama.config().n_layers)
}

fn context_cache_layers(llama: &Llama, text: &[u32], len: usize, n_layers: usize) -> Result<KvCache> {
    let mut cache = llama.new_cache(n_layers);
    let tokens: Vec<u32> = text.iter().cycle().take(len).copied().collect();
    llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::None }])?;
    Ok(cache)
}

/// Every row of one model, timed.
struct Timings {
    /// Single-pass ms per size.
    singles: Vec<f64>,
    ragged: f64,
    /// Median ragged / single 5-token ratio over pairs timed back to back.
    paired_ratio: f64,
    /// Median ms of those single 5-token passes, each after a ragged batch.
    single5_after_ragged: f64,
}

fn time_model(llama: &Llama, text: &[u32], repeats: usize, mut report: impl FnMut(&str, f64)) -> Result<Timings> {
    let mut singles = Vec::new();
    for &n in &PASS_SIZES {
        let mut cache = [context_cache(llama, text, CONTEXT)?];
        let tokens = vec![text[CONTEXT % text.len()..].iter().cycle().take(n).copied().collect::<Vec<u32>>()];
        let logits = if n == 98 { LogitsFor::Last } else { LogitsFor::All };
        let reps = if n >= 32 { repeats.div_ceil(2) } else { repeats };
        let ms = time_pass(llama, &mut cache, &tokens, logits, reps)?;
        report(&n.to_string(), ms);
        singles.push(ms);
    }
    let mut caches = RAGGED_CONTEXTS.iter().map(|&c| context_cache(llama, text, c)).collect::<Result<Vec<_>>>()?;
    let tokens: Vec<Vec<u32>> = (0..RAGGED_CONTEXTS.len()).map(|i| text[i..i + RAGGED_TOKENS].to_vec()).collect();
    let ragged = time_pass(llama, &mut caches, &tokens, LogitsFor::All, repeats)?;
    report("8x5 ragged", ragged);
    // The ratio from pairs run back to back (a single 5-token pass, then the
    // ragged batch), so both sides of each pair see the same machine: on a
    // shared machine the rows above, timed minutes apart, can drift apart.
    // But each 5-token pass then follows a ragged batch: on the project's
    // Emerald Rapids VM it took 6.6–7.1 ms there against 4.6–5.1 in its
    // own loop (the weights read again from memory, it seems, at about the
    // probe's rate), so this ratio flatters the batch, and the rows'
    // medians, each shape in its own loop, give the headline.
    let mut single = [context_cache(llama, text, CONTEXT)?];
    let five = vec![text[CONTEXT % text.len()..].iter().cycle().take(RAGGED_TOKENS).copied().collect::<Vec<u32>>()];
    let (mut ratios, mut ones) = (Vec::with_capacity(2 * repeats), Vec::with_capacity(2 * repeats));
    for _ in 0..2 * repeats {
        let one = time_once(llama, &mut single, &five, LogitsFor::All)?;
        ratios.push(time_once(llama, &mut caches, &tokens, LogitsFor::All)? / one);
        ones.push(one);
    }
    // The first 5-token pass followed the ragged row's last pass too.
    Ok(Timings { singles, ragged, paired_ratio: median(ratios), single5_after_ragged: median(ones) })
}

/// Read bandwidth of this machine as this process sees it.
fn bandwidth_probe() -> f64 {
    use rayon::prelude::*;
    let data = vec![1u64; 32 << 20]; // 256 MiB
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..4 {
        let start = Instant::now();
        sink = sink.wrapping_add(data.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v))).sum::<u64>());
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (data.len() * 8) as f64 / best / 1e9
}

/// What `tandem-bench kernels` prints, by backend.
#[derive(Serialize)]
#[serde(untagged)]
pub enum KernelOutput {
    Cpu(KernelReport),
    Wgpu(DraftReport),
}

impl KernelOutput {
    pub fn markdown(&self) -> String {
        match self {
            KernelOutput::Cpu(r) => r.markdown(),
            KernelOutput::Wgpu(r) => r.markdown(),
        }
    }
}

pub fn run(cfg: &KernelBenchConfig) -> Result<KernelOutput> {
    Ok(match cfg.backend {
        Backend::Cpu => KernelOutput::Cpu(run_cpu(cfg)?),
        Backend::Wgpu => KernelOutput::Wgpu(run_wgpu(cfg)?),
    })
}

fn run_cpu(cfg: &KernelBenchConfig) -> Result<KernelReport> {
    let progress = |m: &str| {
        if cfg.progress {
            eprintln!("{m}");
        }
    };
    let model = LoadedModel::load(&cfg.model).with_context(|| format!("loading --model {}", cfg.model.display()))?;
    let text = model.tokenizer.encode(&corpus())?;
    anyhow::ensure!(text.len() > 100, "the benchmark text tokenizes to too few tokens");
    let llama = &model.llama;
    let bytes = llama.weight_bytes(llama.config().n_layers);
    let probe = bandwidth_probe();
    progress(&format!("bandwidth probe: {probe:.1} GB/s"));
    let trained_draft = match DraftSpec::Trained(None).build(&model) {
        Ok(draft) => Some(time_trained_draft(&model, draft)?),
        Err(e) => {
            progress(&format!("trained draft not timed: {e}"));
            None
        }
    };
    if let Some(d) = &trained_draft {
        progress(&format!("trained draft: {:.2} ms per drafted token, {:.2}× the target's step", d.ms_per_drafted_token, d.draft_over_target_step));
    }

    let ours = time_model(llama, &text, cfg.repeats, |s, ms| progress(&format!("tandem  {s:>11}: {ms:8.1} ms")))?;
    let (stock, stock_ragged) = if cfg.stock {
        drop(model);
        let stock_model = LoadedModel::load_with(&cfg.model, MatmulKernels::CandleStock)?;
        // candle's stock matmuls run on candle's own pool, whose helper
        // spins between calls and floats between CPUs. Called from a thread
        // pinned to a CPU (the global pool here, as in the server), the
        // helper shared that CPU with it and the baseline lost about 10×
        // (1 token: 366 ms against 37 ms), so it runs on unpinned threads,
        // as candle does by itself.
        let unpinned = rayon::ThreadPoolBuilder::new().num_threads(rayon::current_num_threads()).build()?;
        let t =
            unpinned.install(|| time_model(&stock_model.llama, &text, cfg.repeats.div_ceil(2), |s, ms| progress(&format!("stock   {s:>11}: {ms:8.1} ms"))))?;
        (t.singles.into_iter().map(Some).collect(), Some(t.ragged))
    } else {
        (vec![None; PASS_SIZES.len()], None)
    };
    let row = |shape: String, tokens: usize, ms: f64, stock_ms: Option<f64>| PassRow {
        shape,
        tokens,
        ms,
        tokens_per_s: tokens as f64 / ms * 1e3,
        stock_ms,
        speedup: stock_ms.map(|s| s / ms),
        weight_gb_per_s: bytes as f64 / ms / 1e6,
    };
    let five = ours.singles[PASS_SIZES.iter().position(|&n| n == RAGGED_TOKENS).expect("a 5-token row")];
    let passes: Vec<PassRow> = PASS_SIZES.iter().zip(ours.singles.iter().zip(stock)).map(|(&n, (&ms, s))| row(n.to_string(), n, ms, s)).collect();
    Ok(KernelReport {
        model: cfg.model.display().to_string(),
        threads: rayon::current_num_threads(),
        simd: format!("{:?}", tandem_model::kernels::simd_level()),
        weight_bytes_per_pass: bytes,
        probe_gb_per_s: probe,
        passes,
        ragged: row("8x5 ragged".into(), RAGGED_CONTEXTS.len() * RAGGED_TOKENS, ours.ragged, stock_ragged),
        ragged_over_single5: ours.ragged / five,
        ragged_over_single5_paired: ours.paired_ratio,
        single5_after_ragged_ms: ours.single5_after_ragged,
        trained_draft,
    })
}

/// Drafted tokens a round.
const DRAFT_K: usize = 5;
/// New tokens of the target's greedy output per prompt.
const DRAFT_REPLAY_TOKENS: usize = 96;

/// Replays the trained draft's rounds over the target's greedy output of
/// four of the bench's chat prompts (held out from the draft's training):
/// each round proposes `DRAFT_K` tokens from the context and the target's
/// states of it, as a verdict would have left them; the context then
/// advances by the accepted drafts and the target's token, as in a session.
fn time_trained_draft(model: &LoadedModel, mut draft: Box<dyn DraftSource>) -> Result<DraftCost> {
    let llama = &model.llama;
    let (n, h) = (llama.config().n_layers, llama.config().hidden);
    let greedy = SamplingParams::default();
    let (mut per_token, mut steps, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut drafted, mut accepted) = (0, 0);
    for prompt in crate::prompts::CHAT_PROMPTS.iter().take(4) {
        // The target's greedy output, then its final states over all of it.
        let mut tokens = model.tokenizer.encode_prompt(&model.tokenizer.chat_prompt(prompt))?;
        let prompt_len = tokens.len();
        let mut cache = llama.new_cache(n);
        let mut next = tokens.clone();
        for _ in 0..DRAFT_REPLAY_TOKENS {
            let logits = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &next, logits: LogitsFor::Last }])?;
            next = vec![argmax(logits[0].row(0))];
            tokens.push(next[0]);
        }
        let mut cache = llama.new_cache(n);
        let (_, states) = llama.forward_capturing(&mut [SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::None }], &[n])?;
        let states = &states[0];

        // The target's cache for its decode steps: the context but its last token.
        let mut target = llama.new_cache(n);
        let mut c = prompt_len;
        llama.forward(&mut [SeqPass { cache: &mut target, tokens: &tokens[..c - 1], logits: LogitsFor::None }])?;
        while c + DRAFT_K < tokens.len() {
            draft.observe_target_features(0, &states[..(c - 1) * h]);
            let start = Instant::now();
            let proposal = draft.propose(&tokens[..c], c - prompt_len, DRAFT_K, &greedy, &mut SessionRng::new(0))?;
            let round_ms = start.elapsed().as_secs_f64() * 1e3;
            let start = Instant::now();
            llama.forward(&mut [SeqPass { cache: &mut target, tokens: &tokens[c - 1..c], logits: LogitsFor::Last }])?;
            let step_ms = start.elapsed().as_secs_f64() * 1e3;
            anyhow::ensure!(!proposal.tokens.is_empty(), "the trained draft proposed nothing");
            let ms = round_ms / proposal.tokens.len() as f64;
            per_token.push(ms);
            steps.push(step_ms);
            ratios.push(ms / step_ms);
            let a = proposal.tokens.iter().zip(&tokens[c..]).take_while(|(p, t)| p == t).count();
            drafted += proposal.tokens.len();
            accepted += a;
            // The accepted drafts and the target's token join the context.
            if a > 0 {
                llama.forward(&mut [SeqPass { cache: &mut target, tokens: &tokens[c..c + a], logits: LogitsFor::None }])?;
            }
            c += a + 1;
        }
    }
    Ok(DraftCost {
        rounds: ratios.len(),
        k: DRAFT_K,
        ms_per_drafted_token: median(per_token),
        target_step_ms: median(steps),
        draft_over_target_step: median(ratios),
        acceptance: accepted as f64 / drafted.max(1) as f64,
    })
}

impl KernelReport {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "model {}\nthreads {}, SIMD {}, weights read per pass {:.1} MB, bandwidth probe {:.1} GB/s\n\n",
            self.model,
            self.threads,
            self.simd,
            self.weight_bytes_per_pass as f64 / 1e6,
            self.probe_gb_per_s
        );
        s += "| pass | tokens | ms (median) | tokens/s | stock candle ms | speed-up | weight GB/s |\n|---|---|---|---|---|---|---|\n";
        for r in self.passes.iter().chain([&self.ragged]) {
            let opt = |v: Option<f64>, suffix: &str| v.map_or("–".to_string(), |v| format!("{v:.1}{suffix}"));
            s += &format!(
                "| {} | {} | {:.1} | {:.0} | {} | {} | {:.1} |\n",
                r.shape,
                r.tokens,
                r.ms,
                r.tokens_per_s,
                opt(r.stock_ms, ""),
                opt(r.speedup, "×"),
                r.weight_gb_per_s
            );
        }
        s += &format!(
            "\nragged 8×5 batch / single 5-token pass, the rows' medians: {:.2}× (target ≤ 4×); median of pairs timed back to back: {:.2}×, \
             where each 5-token pass, right after a ragged batch, took {:.1} ms (median)\n",
            self.ragged_over_single5, self.ragged_over_single5_paired, self.single5_after_ragged_ms
        );
        if let Some(d) = &self.trained_draft {
            s += &format!(
                "trained draft (k = {}, greedy, {} rounds over the target's output of 4 chat prompts): {:.2} ms per drafted token beside a {:.2} ms target step, \
                 median of rounds timed back to back with a step: {:.2}× the target's cost per token (target ≤ 0.6×); acceptance {:.1} %\n",
                d.k,
                d.rounds,
                d.ms_per_drafted_token,
                d.target_step_ms,
                d.draft_over_target_step,
                d.acceptance * 100.0
            );
        }
        s
    }
}

/// Layer-skip draft timed beside the full model.
const DRAFT_LAYERS: usize = 12;
const PREFILL: usize = 98;

#[derive(Serialize)]
pub struct DraftRow {
    /// Layers run (the first N of the model; all of them for the full model).
    pub layers: usize,
    /// Median ms of one decode step after a 64-token context, CPU backend.
    pub cpu_step_ms: f64,
    pub cpu_tokens_per_s: f64,
    /// The same on the wgpu backend (top-64 read back).
    pub wgpu_step_ms: f64,
    pub wgpu_tokens_per_s: f64,
    /// Median ms of a 98-token prefill, CPU (one batched pass).
    pub cpu_prefill_ms: f64,
    /// wgpu (one submission per token).
    pub wgpu_prefill_ms: f64,
}

#[derive(Serialize)]
pub struct DraftReport {
    pub model: String,
    pub adapter: String,
    /// The adapter runs on the CPU (lavapipe): timings check the path, they
    /// say nothing about GPU speed.
    pub software_adapter: bool,
    pub cpu_threads: usize,
    pub rows: Vec<DraftRow>,
}

/// Median ms of `step` after one warm-up.
fn time_steps(repeats: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut samples = Vec::with_capacity(repeats);
    for i in 0..=repeats {
        let start = Instant::now();
        step()?;
        if i > 0 {
            samples.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(samples))
}

fn run_wgpu(cfg: &KernelBenchConfig) -> Result<DraftReport> {
    let model = LoadedModel::load(&cfg.model).with_context(|| format!("loading --model {}", cfg.model.display()))?;
    let text = model.tokenizer.encode(&corpus())?;
    anyhow::ensure!(text.len() > PREFILL, "the benchmark text tokenizes to too few tokens");
    let llama = &model.llama;
    let prompt: Vec<u32> = text.iter().cycle().take(PREFILL).copied().collect();
    let next = [text[CONTEXT % text.len()]];
    let mut rows = Vec::new();
    let mut adapter = (String::new(), false);
    for layers in [DRAFT_LAYERS.min(llama.config().n_layers), llama.config().n_layers] {
        let mut cache = [context_cache_layers(llama, &text, CONTEXT, layers)?];
        let cpu_step = time_pass(llama, &mut cache, &[next.to_vec()], LogitsFor::Last, cfg.repeats)?;
        let mut empty = [llama.new_cache(layers)];
        let cpu_prefill = time_pass(llama, &mut empty, std::slice::from_ref(&prompt), LogitsFor::Last, cfg.repeats.div_ceil(2))?;

        let mut gpu = WgpuModel::new(llama, layers, &WgpuOptions::default())?;
        adapter = (gpu.adapter().to_string(), gpu.is_software());
        gpu.forward(&prompt[..CONTEXT])?;
        let wgpu_step = time_steps(cfg.repeats, || {
            gpu.forward(&next)?;
            gpu.truncate(CONTEXT);
            Ok(())
        })?;
        let wgpu_prefill = time_steps(cfg.repeats.div_ceil(2), || {
            gpu.truncate(0);
            gpu.forward(&prompt)?;
            Ok(())
        })?;
        if cfg.progress {
            eprintln!("layers {layers:>2}: step cpu {cpu_step:.1} ms, wgpu {wgpu_step:.1} ms; prefill cpu {cpu_prefill:.1} ms, wgpu {wgpu_prefill:.1} ms");
        }
        rows.push(DraftRow {
            layers,
            cpu_step_ms: cpu_step,
            cpu_tokens_per_s: 1e3 / cpu_step,
            wgpu_step_ms: wgpu_step,
            wgpu_tokens_per_s: 1e3 / wgpu_step,
            cpu_prefill_ms: cpu_prefill,
            wgpu_prefill_ms: wgpu_prefill,
        });
    }
    Ok(DraftReport { model: cfg.model.display().to_string(), adapter: adapter.0, software_adapter: adapter.1, cpu_threads: rayon::current_num_threads(), rows })
}

impl DraftReport {
    pub fn markdown(&self) -> String {
        let mut s = format!("model {}\nwgpu adapter {}, CPU threads {}\n", self.model, self.adapter, self.cpu_threads);
        if self.software_adapter {
            s += "NOTE: this adapter is a software renderer running on the CPU (e.g. Mesa's lavapipe): the wgpu \
                  figures show the backend works, not how fast a GPU drafts.\n";
        }
        s += "\n| layers | CPU step ms | CPU tokens/s | wgpu step ms | wgpu tokens/s | CPU 98-token prefill ms | wgpu prefill ms |\n|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |\n",
                r.layers, r.cpu_step_ms, r.cpu_tokens_per_s, r.wgpu_step_ms, r.wgpu_tokens_per_s, r.cpu_prefill_ms, r.wgpu_prefill_ms
            );
        }
        s
    }
}

/// Real English and code to tokenize for pass inputs.
fn corpus() -> String {
    "Speculative decoding lets a small draft model propose several tokens that a large target model \
     verifies in a single forward pass. def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    \
     middle = len(items) // 2\n    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n    \
     return merge(left, right)\n The verifier accepts the longest prefix it agrees with and adds one token of \
     its own, so the output is exactly what the target alone would have written."
        .to_string()
}
