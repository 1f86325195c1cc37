//! `tandem-edge`: the edge client.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::controller::{RejectionPredictor, SpeculationController, StopRule};
use tandem_edge::{ControllerSample, GenerateRequest, Generation, LocalTarget, Speculator, Target};
use tandem_model::{fetch, DraftSpec, LoadedModel, SamplingParams};

#[derive(Parser)]
#[command(name = "tandem-edge", version, about = "Tandem edge client: draft locally, verify on a server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the default model.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Generate text for one prompt.
    Generate(GenerateArgs),
    /// The speculation controller's rejection predictor.
    Controller {
        #[command(subcommand)]
        action: ControllerAction,
    },
}

#[derive(Subcommand)]
enum ControllerAction {
    /// Fit the rejection predictor to a log written by `generate --log-controller`;
    /// prints precision, recall and false-stop rate on a held-out fifth.
    Train {
        /// JSONL log of (features, accepted) samples.
        log: PathBuf,
        /// Where to write the weights (JSON).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 400)]
        epochs: usize,
    },
}

#[derive(Subcommand)]
enum ModelAction {
    /// Download SmolLM2-135M-Instruct into $TANDEM_HOME (default ~/.cache/tandem),
    /// check its sha256 and print its path. Does nothing if it is already there.
    Fetch,
}

#[derive(Args)]
struct GenerateArgs {
    /// Run draft and verification in this process (no server).
    #[arg(long, conflicts_with = "server")]
    local: bool,
    /// Verify on a Tandem server, e.g. http://127.0.0.1:50051 (https:// for TLS).
    #[arg(long)]
    server: Option<String>,
    /// API key for the server (sent as `authorization: Bearer KEY`).
    #[arg(long, env = "TANDEM_API_KEY", requires = "server")]
    api_key: Option<String>,
    /// CA certificate (PEM) that signed an https server's certificate.
    #[arg(long, requires = "server")]
    ca_cert: Option<PathBuf>,
    /// Let the server decode everything itself (no drafting here).
    #[arg(long, requires = "server")]
    server_only: bool,
    /// Time-to-first-token objective sent to the server, ms (0: none).
    #[arg(long, default_value_t = 0, requires = "server")]
    slo_ttft_ms: u32,
    /// Time-per-output-token objective sent to the server, ms (0: none).
    #[arg(long, default_value_t = 0, requires = "server")]
    slo_tpot_ms: u32,
    /// Target model: a llama-family GGUF file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Draft source: none, ngram, layers:N (the target's first N layers) or model:PATH.
    #[arg(long, default_value = "layers:25")]
    draft: String,
    /// Drafted tokens per verification round (the most, with a controller).
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
    /// When to stop drafting in a round: fixed, confidence[:MIN_TOP1]
    /// (default 0.4) or predictor:WEIGHTS.json[:TAU] (default 0.5).
    #[arg(long, default_value = "fixed")]
    controller: String,
    /// Choose each round's draft length from measured costs and acceptance.
    #[arg(long)]
    adaptive_k: bool,
    /// Append (features, accepted?) of every judged draft token to this JSONL file.
    #[arg(long)]
    log_controller: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 keeps all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object with the text, token ids and speculation statistics.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Model { action: ModelAction::Fetch } => {
            let path = fetch::ensure_default_model(true)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Generate(args) => generate(args),
        Command::Controller { action: ControllerAction::Train { log, output, epochs } } => train(&log, &output, epochs),
    }
}

fn train(log: &std::path::Path, output: &std::path::Path, epochs: usize) -> Result<()> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let samples: Vec<(tandem_model::DraftFeatures, bool)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<ControllerSample>(l)
                .map(|s| (s.features, s.accepted))
                .with_context(|| format!("{} line {}: not a controller sample", log.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(samples.len() >= 20, "{}: {} samples, need at least 20", log.display(), samples.len());
    // Every fifth sample is held out for the printed figures.
    let (held, fit): (Vec<_>, Vec<_>) = samples.iter().enumerate().partition(|(i, _)| i % 5 == 0);
    let fit: Vec<_> = fit.into_iter().map(|(_, s)| *s).collect();
    let held: Vec<_> = held.into_iter().map(|(_, s)| *s).collect();
    let model = RejectionPredictor::train(&fit, epochs);
    let q = model.evaluate(&held, 0.5);
    let rejected = samples.iter().filter(|s| !s.1).count();
    println!(
        "{} samples ({:.1} % rejected); held-out {}: precision {:.3}, recall {:.3}, false-stop rate {:.3}",
        samples.len(),
        100.0 * rejected as f64 / samples.len() as f64,
        q.samples,
        q.precision,
        q.recall,
        q.false_stop_rate
    );
    std::fs::write(output, serde_json::to_string_pretty(&model)?).with_context(|| format!("writing {}", output.display()))?;
    println!("weights written to {}", output.display());
    Ok(())
}

fn parse_controller(spec: &str) -> Result<StopRule> {
    let bad = || anyhow::anyhow!("`--controller {spec}`: expected fixed, confidence[:MIN_TOP1] or predictor:WEIGHTS.json[:TAU]");
    let mut parts = spec.splitn(2, ':');
    match (parts.next(), parts.next()) {
        (Some("fixed"), None) => Ok(StopRule::Fixed),
        (Some("confidence"), p) => {
            let min_top1 = p.map(str::parse).transpose().map_err(|_| bad())?.unwrap_or(0.4);
            Ok(StopRule::Confidence { min_top1 })
        }
        (Some("predictor"), Some(rest)) => {
            let (path, tau) = match rest.rsplit_once(':') {
                Some((p, t)) if t.parse::<f64>().is_ok() => (p, t.parse().expect("checked")),
                _ => (rest, 0.5),
            };
            let text = std::fs::read_to_string(path).with_context(|| format!("`--controller`: reading {path}"))?;
            let model: RejectionPredictor = serde_json::from_str(&text).with_context(|| format!("`--controller`: {path} is not predictor weights"))?;
            Ok(StopRule::Predictor { model, tau })
        }
        _ => Err(bad()),
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !args.local && args.server.is_none() {
        anyhow::bail!("say where to verify: `--local` (this process) or `--server URL`");
    }
    let draft: DraftSpec = args.draft.parse()?;
    let rule = parse_controller(&args.controller)?;
    let log: Option<Box<dyn Write + Send>> = match &args.log_controller {
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening --log-controller {}", p.display()))?,
        ))),
        None => None,
    };
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => fetch::ensure_default_model(false).context("fetching the default model (or pass --model PATH)")?,
    };
    let target = LoadedModel::load(&model_path).with_context(|| format!("loading --model {}", model_path.display()))?;
    let draft_source = draft.build(&target).with_context(|| format!("building --draft {draft}"))?;
    let text = if args.raw { args.prompt.clone() } else { target.tokenizer.chat_prompt(&args.prompt) };
    let prompt = target.tokenizer.encode(&text)?;
    let request = GenerateRequest {
        prompt,
        max_new_tokens: args.max_new_tokens,
        draft_len: args.draft_len,
        sampling: SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed },
    };
    let tokenizer = target.tokenizer.clone();
    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout();
    let json = args.json;
    let on_token = |t: u32| {
        if !json {
            if let Ok(piece) = stream.push(t) {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        }
    };
    let controller = SpeculationController::new(rule, args.draft_len, args.adaptive_k);
    let generation = match &args.server {
        None => configured(Speculator::new(LocalTarget::new(target), draft_source, tokenizer.clone()), controller, log)
            .generate(&request, on_token)?,
        Some(url) => {
            let mut cfg = ClientConfig::new(url.clone());
            cfg.api_key = args.api_key.clone();
            (cfg.ttft_ms, cfg.tpot_ms) = (args.slo_ttft_ms, args.slo_tpot_ms);
            if let Some(ca) = &args.ca_cert {
                cfg.ca_cert = Some(std::fs::read(ca).with_context(|| format!("reading --ca-cert {}", ca.display()))?);
            }
            let remote = RemoteTarget::new(cfg)?;
            if args.server_only {
                server_only(remote, &request, &tokenizer, on_token)?
            } else {
                configured(Speculator::new(remote, draft_source, tokenizer.clone()), controller, log).generate(&request, on_token)?
            }
        }
    };
    if json {
        let mut value = serde_json::to_value(&generation)?;
        let mode = if args.server_only { "server_only".to_string() } else { draft.to_string() };
        value["draft"] = serde_json::Value::String(mode);
        value["model"] = serde_json::Value::String(model_path.display().to_string());
        println!("{value}");
    } else {
        println!();
        eprintln!(
            "[{} tokens, {} rounds, acceptance {:.1} %, {:.2} tokens/round, {:.0} ms]",
            generation.tokens.len(),
            generation.rounds,
            100.0 * generation.acceptance_rate,
            generation.tokens_per_round,
            generation.wall_ms
        );
    }
    Ok(())
}

fn configured<T: Target>(s: Speculator<T>, controller: SpeculationController, log: Option<Box<dyn Write + Send>>) -> Speculator<T> {
    let s = s.with_controller(controller);
    match log {
        Some(log) => s.with_log(log),
        None => s,
    }
}

/// `--server-only`: the server decodes; tokens stream back.
fn server_only(mut remote: RemoteTarget, req: &GenerateRequest, tokenizer: &tandem_model::Tokenizer, on_token: impl FnMut(u32)) -> Result<Generation> {
    req.validate()?;
    let start = std::time::Instant::now();
    let eos = tokenizer.eos_tokens().to_vec();
    let tokens = remote.generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, on_token, &eos)?;
    let g = Generation { prompt_tokens: req.prompt.len(), rounds: tokens.len().saturating_sub(1), tokens, ..Default::default() };
    Ok(g.finish(tokenizer, &eos, start)?)
}
