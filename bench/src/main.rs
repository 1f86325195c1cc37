//! `tandem-bench`: measurements of Tandem, each against its baseline in the same run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tandem_bench::{estimator, live};
use tandem_bench::kernels::{self, KernelBenchConfig};
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
        /// A llama-family GGUF (default: SmolLM2-135M-Instruct, fetched on first use).
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
    /// Re-renders a `live` report (`report.json`) as its Markdown table.
    Report {
        /// A report.json written by `live --out DIR`.
        run: PathBuf,
    },
}

#[derive(clap::Args)]
struct LiveArgs {
    /// Policies to compare, each on a fresh server: centralized, sled, wisp.
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
    /// Device profiles (TOML `[[device]]` tables); default: one laptop profile.
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Drive a running server instead of starting one per policy.
    #[arg(long)]
    server: Option<String>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also find each policy's capacity (largest load with ≥ 90 % SLO
    /// attainment) by doubling and bisecting the load, `--duration-s` per probe.
    #[arg(long)]
    capacity: bool,
    /// Write report.json and report.md here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn live(args: LiveArgs) -> Result<()> {
    let policies = args.policies.iter().map(|p| p.parse()).collect::<Result<Vec<live::Policy>>>()?;
    anyhow::ensure!(!policies.is_empty(), "`--policies` is empty");
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
    let model = tandem_model::LoadedModel::load(&model_path(args.model)?).context("loading the target model")?;
    let (prompts, provenance) = tandem_bench::prompts::load(&args.prompts, args.num_prompts, args.max_new_tokens, &model)?;
    let cfg = live::LiveConfig {
        policies,
        workload,
        duration_s: args.duration_s,
        max_new_tokens: args.max_new_tokens,
        draft_len: args.draft_len,
        slo_ttft_ms: args.slo_ttft_ms,
        slo_tpot_ms: args.slo_tpot_ms,
        seed: args.seed,
        server: args.server,
        capacity_search: args.capacity,
    };
    let report = live::run(&cfg, &model, &profiles, &prompts, &provenance)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating --out {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
        std::fs::write(dir.join("report.md"), report.markdown())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}

fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p),
        None => fetch::ensure_default_model(false).context("fetching the default model (or pass --model PATH)"),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Command::Kernels { model, threads, repeats, no_stock, json, backend } => {
            if let Some(n) = threads {
                anyhow::ensure!(n > 0, "`--threads` must be at least 1");
                rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting --threads")?;
            }
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
        Command::Report { run } => {
            let text = std::fs::read_to_string(&run).with_context(|| format!("reading {}", run.display()))?;
            let report: live::LiveReport = serde_json::from_str(&text).with_context(|| format!("{} is not a live report", run.display()))?;
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
