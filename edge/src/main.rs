//! `tandem-edge`: the edge client.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::{GenerateRequest, Generation, LocalTarget, Speculator};
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
    /// Drafted tokens per verification round.
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
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
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !args.local && args.server.is_none() {
        anyhow::bail!("say where to verify: `--local` (this process) or `--server URL`");
    }
    let draft: DraftSpec = args.draft.parse()?;
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
    let generation = match &args.server {
        None => Speculator::new(LocalTarget::new(target), draft_source, tokenizer.clone()).generate(&request, on_token)?,
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
                Speculator::new(remote, draft_source, tokenizer.clone()).generate(&request, on_token)?
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

/// `--server-only`: the server decodes; tokens stream back.
fn server_only(mut remote: RemoteTarget, req: &GenerateRequest, tokenizer: &tandem_model::Tokenizer, on_token: impl FnMut(u32)) -> Result<Generation> {
    req.validate()?;
    let start = std::time::Instant::now();
    let eos = tokenizer.eos_tokens().to_vec();
    let tokens = remote.generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, on_token, &eos)?;
    let g = Generation { prompt_tokens: req.prompt.len(), rounds: tokens.len().saturating_sub(1), tokens, ..Default::default() };
    Ok(g.finish(tokenizer, &eos, start)?)
}
