//! `tandem-bench`: measurements of Tandem, each against its baseline in the same run.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
            let model = match model {
                Some(p) => p,
                None => fetch::ensure_default_model(false).context("fetching the default model (or pass --model PATH)")?,
            };
            let report = kernels::run(&KernelBenchConfig { model, repeats, stock: !no_stock, progress: !json })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
            Ok(())
        }
    }
}
