//! `tandem-bench`: measurements of Tandem, each against its baseline in the same run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use tandem_bench::kernels::{self, KernelBenchConfig};
use tandem_bench::real_draft::RealDrafts;
use tandem_bench::report::{parse_policies, Policy, Report};
use tandem_bench::{estimator, live, paper, sim, train_draft};
use tandem_model::fetch;

#[derive(Parser)]
#[command(name = "tandem-bench", version, about = "Tandem benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Forward-pass cost per pass size and for a ragged batch, Tandem's
    /// kernels vs candle's stock QMatMul, with bytes read and bandwidth.
    Kernels {
        /// A llama-family GGUF file or Hugging Face folder, or hf:OWNER/NAME[/FILE.gguf][@REV] on the Hub (default: SmolLM2-135M-Instruct, fetched on first use).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed repetitions per row (the median is reported).
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// Skip the stock-candle baseline (faster).
        #[arg(long)]
        no_stock: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// `wgpu`: time the draft forward on the wgpu backend next to the CPU.
        #[arg(long, value_enum, default_value_t)]
        backend: kernels::Backend,
    },
    /// Accuracy of the verification-time estimator over real batches of
    /// varied shapes: MAPE, p50/p95 error, coverage of the T_q bound.
    Estimator {
        #[arg(long)]
        model: Option<PathBuf>,
        /// Batches to run after the warm-start sweep.
        #[arg(long, default_value_t = 300)]
        batches: usize,
        /// q of the T_q bound.
        #[arg(long, default_value_t = 0.9)]
        q: f64,
        #[arg(long)]
        json: bool,
    },
    /// Policies side by side on real servers with emulated edge devices
    /// (centralized, sled, wisp): SLO attainment, goodput, latencies.
    Live(LiveArgs),
    /// The same policies in a discrete-event simulation of many devices,
    /// with the server's scheduler, estimator and counters and the edge's
    /// controller, and pass times from a calibration file.
    Sim(SimArgs),
    /// The standard configuration end to end: live on this machine, sim
    /// with this machine's calibration and with a GPU roofline, and their
    /// agreement, all written to one folder.
    Paper {
        #[arg(long, default_value = "paper")]
        out: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
        /// Quantize a Hugging Face folder as it loads (q4_0, q4_1, q8_0,
        /// q4_k, q6_k), here and in the live servers.
        #[arg(long)]
        quantize: Option<String>,
    },
    /// Trains a draft for the target on this machine's CPU (one decoder
    /// layer on the target's frozen embedding and head) and writes
    /// `OUT/draft.safetensors` and `OUT/card.json`.
    TrainDraft(TrainDraftArgs),
    /// Re-renders a `live` or `sim` report (`report.json`): its Markdown
    /// table, and its plots beside it.
    Report {
        /// A report.json written by `live --out DIR` or `sim --out DIR`.
        run: PathBuf,
    },
}

#[derive(clap::Args)]
struct TrainDraftArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder for the traced data, checkpoints, the weights and the card.
    #[arg(long, default_value = "trained-draft")]
    out: PathBuf,
    /// [default: eagle-layers]
    #[arg(long, value_enum)]
    method: Option<train_draft::Method>,
    /// Optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Early exit: target layers run before the trained one.
    #[arg(long)]
    exit_layer: Option<usize>,
    /// Target layer whose weights initialise the trained one.
    #[arg(long)]
    init_layer: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    /// Templated chat requests and standard-library functions to trace.
    #[arg(long)]
    chat_prompts: Option<usize>,
    #[arg(long)]
    code_prompts: Option<usize>,
    /// Greedy tokens the target generates per training prompt.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Weight of each drafting step past the first, which reads the
    /// draft's own predicted states (EAGLE-style methods; 0 trains on the
    /// target's states only).
    #[arg(long)]
    later_step_weight: Option<f64>,
    /// Drafting steps trained per chain (1: teacher-forced only) [default: 4].
    #[arg(long)]
    unroll: Option<usize>,
    /// Later steps run on chains from every Nth position [default: 3].
    #[arg(long)]
    unroll_stride: Option<usize>,
    /// Stop (with a checkpoint) after this many minutes of training.
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Continue from `OUT/checkpoint.safetensors`.
    #[arg(long)]
    resume: bool,
    /// Continue training a draft folder (`draft.safetensors` + `card.json`,
    /// e.g. the committed one) from its step, with fresh optimiser moments.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    init_from: Option<PathBuf>,
}

/// What `live` and `sim` share: the workload, objectives, prompts, devices.
#[derive(clap::Args)]
struct LoadArgs {
    /// Policies to compare: centralized, sled, wisp.
    #[arg(long, value_delimiter = ',', default_value = "centralized,sled,wisp")]
    policies: Vec<String>,
    /// Closed loop: this many edge devices, each running sessions back to back.
    #[arg(long, default_value_t = 4, conflicts_with = "rate")]
    devices: usize,
    /// Closed loop: pause between a device's sessions, ms.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Open loop instead: Poisson arrivals, sessions per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load per policy (sessions started before the end finish).
    #[arg(long, default_value_t = 30.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// Draft length: fixed for sled, the largest for wisp.
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
    #[arg(long, default_value_t = 3000)]
    slo_ttft_ms: u32,
    #[arg(long, default_value_t = 300)]
    slo_tpot_ms: u32,
    /// chat, humaneval or mixed.
    #[arg(long, default_value = "mixed")]
    prompts: String,
    #[arg(long, default_value_t = 12)]
    num_prompts: usize,
    /// Device profiles (TOML `[[device]]` tables, `draft` = synthetic:alpha=A,
    /// ngram or real:SPEC such as real:layers:25); default: one laptop profile.
    #[arg(long)]
    profiles: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize a Hugging Face folder as it loads (q4_0, q4_1, q8_0, q4_k,
    /// q6_k), here and in the servers `live` starts.
    #[arg(long)]
    quantize: Option<String>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also find each policy's capacity (largest load with ≥ 90 % SLO
    /// attainment) by doubling and bisecting the load, `--duration-s` per probe.
    #[arg(long)]
    capacity: bool,
    /// `wisp` edges keep drafting to the end of every session, never
    /// handing it to the server (to measure what hand-offs do).
    #[arg(long)]
    no_hand_off: bool,
    /// Write report.json, report.md and the plots here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LiveArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Drive a running server instead of starting one per policy.
    #[arg(long)]
    server: Option<String>,
    /// Have the wisp server write its calibration here (for `sim --calibration`).
    #[arg(long)]
    calibration_out: Option<PathBuf>,
    /// Devices belong to this many tenants in turn, each with its own API
    /// key on the servers the bench starts (one: every device is `local`).
    #[arg(long, default_value_t = 1)]
    tenants: usize,
}

#[derive(clap::Args)]
struct SimArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// A calibration file (`tandem-server --calibration-out`), or a GPU
    /// roofline (computed, not measured): `roofline:h100-llama3-8b`,
    /// `roofline:a100-qwen3-32b`.
    #[arg(long, default_value = "roofline:h100-llama3-8b")]
    calibration: String,
    /// Devices belong to this many tenants in turn.
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    /// The server's pass budgets [default: the server's defaults].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    #[arg(long)]
    max_batch_seqs: Option<usize>,
}

/// The inputs `live` and `sim` load from their arguments.
struct Loaded {
    policies: Vec<Policy>,
    workload: live::Workload,
    model: tandem_model::LoadedModel,
    /// The model's file or folder when `--model` named one.
    model_path: Option<PathBuf>,
    prompts: Vec<tandem_bench::prompts::BenchPrompt>,
    provenance: String,
    profiles: Vec<live::DeviceProfile>,
    real: Option<RealDrafts>,
}

fn load(args: &LoadArgs) -> Result<Loaded> {
    let policies = parse_policies(&args.policies)?;
    anyhow::ensure!(args.duration_s > 0.0, "`--duration-s` must be positive");
    anyhow::ensure!(args.max_new_tokens > 1, "`--max-new-tokens` must be at least 2");
    anyhow::ensure!((1..=tandem_protocol::limits::MAX_DRAFT_TOKENS).contains(&args.draft_len), "`--draft-len` must be 1..=16");
    let workload = match args.rate {
        Some(rate) => {
            anyhow::ensure!(rate > 0.0, "`--rate` must be positive");
            live::Workload::Open { rate }
        }
        None => {
            anyhow::ensure!(args.devices > 0, "`--devices` must be at least 1");
            live::Workload::Closed { devices: args.devices, think_ms: args.think_ms }
        }
    };
    let profiles = match &args.profiles {
        Some(p) => live::load_profiles(p)?,
        None => vec![live::DeviceProfile::laptop()],
    };
    let path = model_path(args.model.clone())?;
    let quantize = args.quantize.as_deref().map(str::parse::<tandem_model::hf::Quantize>).transpose()?;
    let model = tandem_model::LoadedModel::load_as(&path, tandem_model::kernels::MatmulKernels::Tandem, quantize).context("loading the target model")?;
    let model_path = args.model.is_some().then_some(path);
    let (prompts, provenance) = tandem_bench::prompts::load(&args.prompts, args.num_prompts, args.max_new_tokens, &model)?;
    let real = live::real_draft_spec(&profiles)?.map(|spec| RealDrafts::load(&spec, args.draft_len, &model, &prompts)).transpose()?;
    Ok(Loaded { policies, workload, model, model_path, prompts, provenance, profiles, real })
}

fn emit(report: &Report, out: Option<&PathBuf>, json: bool) -> Result<()> {
    if let Some(dir) = out {
        report.write(dir)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}

fn live(args: LiveArgs) -> Result<()> {
    let l = load(&args.load)?;
    let a = &args.load;
    let cfg = live::LiveConfig {
        policies: l.policies.clone(),
        workload: l.workload,
        duration_s: a.duration_s,
        max_new_tokens: a.max_new_tokens,
        draft_len: a.draft_len,
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        seed: a.seed,
        server: args.server,
        capacity_search: a.capacity,
        hand_off: !a.no_hand_off,
        tenants: args.tenants,
        model: l.model_path.clone(),
        quantize: a.quantize.clone(),
    };
    let inputs = live::LiveInputs { model: &l.model, profiles: &l.profiles, prompts: &l.prompts, provenance: &l.provenance, real: l.real.as_ref() };
    let report = live::run(&cfg, &inputs, args.calibration_out.as_deref())?;
    emit(&report, a.out.as_ref(), a.json)
}

fn sim(args: SimArgs) -> Result<()> {
    let l = load(&args.load)?;
    let a = &args.load;
    anyhow::ensure!(args.tenants > 0, "`--tenants` must be at least 1");
    let defaults = tandem_server::config::BatcherConfig::default();
    let cfg = sim::SimConfig {
        policies: l.policies.clone(),
        workload: l.workload,
        duration_s: a.duration_s,
        max_new_tokens: a.max_new_tokens,
        draft_len: a.draft_len,
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        seed: a.seed,
        tenants: args.tenants,
        max_batch_tokens: args.max_batch_tokens.unwrap_or(defaults.max_batch_tokens),
        max_batch_seqs: args.max_batch_seqs.unwrap_or(defaults.max_batch_seqs),
        capacity_search: a.capacity,
        hand_off: !a.no_hand_off,
    };
    let calibration = sim::load_calibration(&args.calibration)?;
    let inputs = sim::SimInputs { calibration: &calibration, profiles: &l.profiles, prompts: &l.prompts, provenance: &l.provenance, real: l.real.as_ref() };
    // The one clock read: simulated time 0 is mapped to this instant.
    let report = sim::run(&cfg, &inputs, Instant::now())?;
    emit(&report, a.out.as_ref(), a.json)
}

fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    fetch::resolve_model(model.as_deref()).context("`--model`")
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Kernels { threads, .. } => *threads,
        _ => None,
    };
    anyhow::ensure!(threads != Some(0), "`--threads` must be at least 1");
    // The server's pool (threads pinned to CPUs), so what is timed here is
    // what the server runs.
    tandem_model::build_compute_pool(threads, true).context("building the compute pool")?;
    match cli.command {
        Command::Kernels { model, threads: _, repeats, no_stock, json, backend } => {
            anyhow::ensure!(repeats > 0, "`--repeats` must be at least 1");
            let model = model_path(model)?;
            let report = kernels::run(&KernelBenchConfig { model, backend, repeats, stock: !no_stock, progress: !json })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
            Ok(())
        }
        Command::Live(args) => live(args),
        Command::Sim(args) => sim(args),
        Command::Paper { out, model, quantize } => {
            let named = model.is_some();
            let path = model_path(model)?;
            let parsed = quantize.as_deref().map(str::parse::<tandem_model::hf::Quantize>).transpose()?;
            let model = tandem_model::LoadedModel::load_as(&path, tandem_model::kernels::MatmulKernels::Tandem, parsed).context("loading the target model")?;
            paper::run(&out, &model, named.then_some(path.as_path()), quantize)
        }
        Command::TrainDraft(a) => {
            let model_path = model_path(a.model)?;
            let model = tandem_model::LoadedModel::load(&model_path).context("loading the target model")?;
            let d = train_draft::TrainDraftConfig::default();
            let cfg = train_draft::TrainDraftConfig {
                method: a.method.unwrap_or(d.method),
                steps: a.steps.unwrap_or(d.steps),
                exit_layer: a.exit_layer.unwrap_or(d.exit_layer),
                init_layer: a.init_layer.unwrap_or(d.init_layer),
                lr: a.lr.unwrap_or(d.lr),
                chat_prompts: a.chat_prompts.unwrap_or(d.chat_prompts),
                code_prompts: a.code_prompts.unwrap_or(d.code_prompts),
                max_new_tokens: a.max_new_tokens.unwrap_or(d.max_new_tokens),
                later_step_weight: a.later_step_weight.unwrap_or(d.later_step_weight),
                unroll: a.unroll.unwrap_or(d.unroll),
                unroll_stride: a.unroll_stride.unwrap_or(d.unroll_stride),
                ..d
            };
            let n = model.llama.config().n_layers;
            anyhow::ensure!(cfg.exit_layer >= 1 && cfg.exit_layer < n, "`--exit-layer` must be in 1..{n}");
            anyhow::ensure!(cfg.init_layer < n, "`--init-layer` must be below {n}");
            anyhow::ensure!(cfg.steps > 0, "`--steps` must be at least 1");
            anyhow::ensure!(cfg.max_new_tokens > 0, "`--max-new-tokens` must be at least 1");
            anyhow::ensure!(cfg.later_step_weight >= 0.0, "`--later-step-weight` must be at least 0");
            anyhow::ensure!(cfg.unroll >= 1, "`--unroll` must be at least 1");
            anyhow::ensure!(cfg.unroll_stride >= 1, "`--unroll-stride` must be at least 1");
            let run = train_draft::TrainRun {
                model: &model,
                model_path: &model_path,
                out: &a.out,
                cfg,
                resume: a.resume,
                init_from: a.init_from.as_deref(),
                max_minutes: a.max_minutes,
            };
            let card = train_draft::run(&run)?;
            println!("{}", serde_json::to_string_pretty(&card)?);
            Ok(())
        }
        Command::Report { run } => {
            let report = Report::read(&run)?;
            if let Some(dir) = run.parent() {
                tandem_bench::plots::render(&report, dir)?;
            }
            print!("{}", report.markdown());
            Ok(())
        }
        Command::Estimator { model, batches, q, json } => {
            anyhow::ensure!(batches >= 20, "`--batches` must be at least 20");
            anyhow::ensure!(q > 0.0 && q < 1.0, "`--q` must be in (0, 1)");
            let report = estimator::run(&model_path(model)?, batches, q, !json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
            Ok(())
        }
    }
}
