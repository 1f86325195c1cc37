//! `tandem-bench`: measurements of Tandem, each against its baseline in the same run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tandem_bench::estimator;
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
        Command::Kernels { model, threads, repeats, no_stock, json } => {
            if let Some(n) = threads {
                anyhow::ensure!(n > 0, "`--threads` must be at least 1");
                rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting --threads")?;
            }
            anyhow::ensure!(repeats > 0, "`--repeats` must be at least 1");
            let model = model_path(model)?;
            let report = kernels::run(&KernelBenchConfig { model, repeats, stock: !no_stock, progress: !json })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
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
