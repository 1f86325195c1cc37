//! `tandem-edge`: the edge client.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tandem_edge::chat::Conversation;
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::config::EdgeConfig;
use tandem_edge::controller::{RejectionPredictor, SpeculationController, StopRule};
use tandem_edge::{explain, Backend, ControllerSample, Edge, EdgeError, EdgeOptions, Emitted, GenerateRequest, Generation, LogprobsWanted, Target, Verifier};
use tandem_model::{fetch, DraftSpec, JsonObjectMode, JsonSchema, LoadedModel, OutputGrammar, OutputRegex, Penalties, SamplingParams, StopTokens, Tokenizer};
use tandem_protocol::limits::MAX_TOP_LOGPROBS;

#[derive(Parser)]
#[command(name = "tandem-edge", version, about = "Tandem edge client: draft locally, verify on a server")]
struct Cli {
    /// Settings file (TOML; default: $TANDEM_CONFIG, else
    /// ~/.config/tandem/edge.toml if it exists). Flags and environment
    /// variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
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
    /// Talk with the model: an interactive conversation with history.
    /// Commands: /stats, /reset, /help, /exit. Ctrl-C stops the answer
    /// being written; Ctrl-D or /exit quits.
    Chat(ChatArgs),
    /// A local OpenAI-compatible HTTP endpoint (/v1/chat/completions,
    /// /v1/completions, /v1/models) backed by the edge–cloud loop.
    Serve(ServeArgs),
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
    /// With a model (`hf:OWNER/NAME[/FILE.gguf][@REV]`), fetch that one from
    /// the Hugging Face Hub instead, so a later start needs no network.
    Fetch {
        /// A Hub model; the default model if absent.
        #[arg(value_name = "MODEL")]
        hub_model: Option<PathBuf>,
    },
}

/// Where to verify, which model and draft, how to speculate.
#[derive(Args)]
struct EdgeArgs {
    /// Run draft and verification in this process (no server).
    #[arg(long)]
    local: bool,
    /// Verify on a Tandem server, e.g. http://127.0.0.1:50051 (https:// for TLS).
    #[arg(long, env = "TANDEM_SERVER")]
    server: Option<String>,
    /// API key for the server (sent as `authorization: Bearer KEY`).
    #[arg(long, env = "TANDEM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) that signed an https server's certificate.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Time-to-first-token objective sent to the server, ms (0: none).
    #[arg(long)]
    slo_ttft_ms: Option<u32>,
    /// Time-per-output-token objective sent to the server, ms (0: none).
    #[arg(long)]
    slo_tpot_ms: Option<u32>,
    /// Target model: a llama-family GGUF file or Hugging Face folder, or hf:OWNER/NAME[/FILE.gguf][@REV] on the Hub (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize a Hugging Face folder's weights as they load: q4_0, q4_1,
    /// q8_0, q4_k or q6_k (layers in the type, embedding and head in
    /// Q8_0, as llama.cpp lays out a GGUF) (default: f32, as published).
    #[arg(long)]
    quantize: Option<String>,
    /// Draft source: layers:N (the target's first N layers), trained (the
    /// built-in draft trained for the default model), trained:DIR (one made
    /// by `tandem-bench train-draft`), ngram, none or model:PATH; a model
    /// draft with `+lookup` copies from the context where its last tokens
    /// occurred before [default: trained+lookup with the default model on
    /// the cpu backend, else layers:N+lookup with N five sixths of the
    /// target's layers (25 of the default model's 30)].
    #[arg(long)]
    draft: Option<String>,
    /// Where the draft model runs: cpu or wgpu [default: cpu].
    #[arg(long)]
    backend: Option<String>,
    /// Drafted tokens per verification round (the most, with a controller) [default: 4].
    #[arg(long)]
    draft_len: Option<usize>,
    /// When to stop drafting in a round: fixed, confidence[:MIN_TOP1]
    /// (default 0.4) or predictor:WEIGHTS.json[:TAU] (default 0.5) [default: fixed].
    #[arg(long)]
    controller: Option<String>,
    /// Choose each round's draft length from measured costs and acceptance.
    #[arg(long)]
    adaptive_k: bool,
    /// Do not draft the next round while a round is being verified.
    #[arg(long)]
    no_pipeline: bool,
    /// Keep drafting to the end, even where the server would rather decode
    /// the session itself (with `--adaptive-k` and a TPOT objective).
    #[arg(long)]
    no_hand_off: bool,
    /// Append (features, accepted?) of every judged draft token to this JSONL file.
    #[arg(long)]
    log_controller: Option<PathBuf>,
}

/// How to pick tokens.
#[derive(Args)]
struct SamplingArgs {
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
    /// Keep the tokens at least this fraction as likely as the most likely (0..1; 0 keeps all).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Subtracted from a token's logit once per time the answer holds it (-2..2).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Subtracted from the logit of every token the answer holds (-2..2).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Divides the positive logits (multiplies the negative) of tokens in the prompt or answer (1: none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Adds BIAS (-100..100) to the logit of token ID; repeatable.
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Token ID also ends the answer (besides end-of-sequence); repeatable.
    #[arg(long = "stop-token-id", value_name = "ID")]
    stop_token_ids: Vec<u32>,
    /// End-of-sequence tokens do not end the answer.
    #[arg(long)]
    ignore_eos: bool,
    /// No token may end the answer before it holds this many.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Answer with one JSON object (OpenAI's JSON mode).
    #[arg(long)]
    json_mode: bool,
    /// Answer with one JSON object that satisfies this JSON Schema (a
    /// file; OpenAI's structured outputs, Tandem's subset; implies
    /// --json-mode).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<PathBuf>,
    /// Answer with text the whole of which matches this regex (Rust's
    /// regex syntax; vLLM's guided_regex).
    #[arg(long, value_name = "REGEX", conflicts_with_all = ["json_mode", "json_schema"])]
    regex: Option<String>,
    /// Answer with text that follows this GBNF grammar's `root` rule
    /// (llama.cpp's grammar syntax and flag; vLLM's guided_grammar).
    #[arg(long, value_name = "GBNF", conflicts_with_all = ["json_mode", "json_schema", "regex"])]
    grammar: Option<String>,
    /// --grammar, read from a file (llama.cpp's `.gbnf` files).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_mode", "json_schema", "regex", "grammar"])]
    grammar_file: Option<PathBuf>,
}

fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let parsed = s.split_once('=').and_then(|(id, bias)| Some((id.trim().parse().ok()?, bias.trim().parse().ok()?)));
    parsed.filter(|(_, b): &(u32, f32)| (-100.0..=100.0).contains(b)).ok_or_else(|| format!("expected ID=BIAS with BIAS in [-100, 100], got `{s}`"))
}

impl SamplingArgs {
    fn params(&self, tokenizer: &Arc<Tokenizer>) -> Result<SamplingParams> {
        let eos = tokenizer.eos_tokens();
        let penalties = Penalties { frequency: self.frequency_penalty, presence: self.presence_penalty, repetition: self.repetition_penalty };
        // Ids ascending; a token given twice keeps its last bias.
        let logit_bias = self.logit_bias.iter().copied().collect::<std::collections::BTreeMap<_, _>>().into_iter().collect();
        let stop = StopTokens::resolve(eos, &self.stop_token_ids, self.ignore_eos, self.min_tokens);
        let schema = match &self.json_schema {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("`--json-schema`: reading {}", path.display()))?;
                Some(Arc::new(JsonSchema::parse(&text).with_context(|| format!("`--json-schema` {}", path.display()))?))
            }
        };
        let grammar = match (&self.grammar, &self.grammar_file) {
            (Some(text), _) => Some(OutputGrammar::new(text).context("`--grammar`")?),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("`--grammar-file`: reading {}", path.display()))?;
                Some(OutputGrammar::new(&text).with_context(|| format!("`--grammar-file` {}", path.display()))?)
            }
            (None, None) => None,
        };
        let tables = || JsonObjectMode::new(tokenizer.clone());
        let json_object = match (&self.regex, grammar) {
            (Some(regex), _) => Some(tables().with_regex(Arc::new(OutputRegex::new(regex).context("`--regex`")?))),
            (None, Some(grammar)) => Some(tables().with_grammar(Arc::new(grammar))),
            (None, None) => (self.json_mode || schema.is_some()).then(|| tables().with_schema(schema)),
        };
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            penalties,
            logit_bias,
            stop,
            json_object,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    edge: EdgeArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Let the server decode everything itself (no drafting here).
    #[arg(long)]
    server_only: bool,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Print one JSON object with the text, token ids and speculation statistics.
    #[arg(long)]
    json: bool,
    /// With --json: each token's log-probability under the target's raw
    /// distribution and the N most likely tokens at its position (0..=20).
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    /// With --logprobs: the prompt's tokens' too (`prompt_logprobs`).
    #[arg(long, requires = "logprobs")]
    prompt_logprobs: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    edge: EdgeArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System prompt (default: the model's own).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    edge: EdgeArgs,
    /// Address of the HTTP endpoint.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = || EdgeConfig::load(cli.config.as_deref()).map_err(anyhow::Error::from);
    let result = match cli.command {
        Command::Model { action: ModelAction::Fetch { hub_model: None } } => {
            fetch::ensure_default_model(true).map(|path| println!("{}", path.display())).map_err(Into::into)
        }
        Command::Model { action: ModelAction::Fetch { hub_model: Some(model) } } => {
            fetch::resolve_model(Some(&model)).map(|path| println!("{}", path.display())).map_err(Into::into)
        }
        Command::Generate(args) => config().and_then(|c| generate(args, &c)),
        Command::Chat(args) => config().and_then(|c| chat(args, &c)),
        Command::Serve(args) => config().and_then(|c| serve(args, &c)),
        Command::Controller { action: ControllerAction::Train { log, output, epochs } } => train(&log, &output, epochs),
    };
    // Server errors get their explanation: what to do about an
    // unreachable server or a refused key.
    result.map_err(|e| match e.downcast_ref::<EdgeError>() {
        Some(edge @ (EdgeError::Server(_) | EdgeError::Connect { .. })) => anyhow::anyhow!(explain(edge)),
        _ => e,
    })
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

/// The model file: `--model`, the config file's, or the default (fetched).
fn model_path(args: &EdgeArgs, file: &EdgeConfig) -> Result<PathBuf> {
    fetch::resolve_model(args.model.as_deref().or(file.model.as_deref())).context("`--model`")
}

/// Where to verify: `--local` wins; else the server from the flag,
/// TANDEM_SERVER or the config file.
fn verifier(args: &EdgeArgs, file: &EdgeConfig) -> Result<Verifier> {
    if args.local {
        return Ok(Verifier::Local);
    }
    let Some(url) = args.server.clone().or_else(|| file.server.clone()) else {
        anyhow::bail!("say where to verify: `--local` (this process) or `--server URL` (or TANDEM_SERVER, or `server` in the config file)");
    };
    let mut cfg = ClientConfig::new(url);
    cfg.api_key = args.api_key.clone().or_else(|| file.api_key.clone());
    cfg.ttft_ms = args.slo_ttft_ms.or(file.slo_ttft_ms).unwrap_or(0);
    cfg.tpot_ms = args.slo_tpot_ms.or(file.slo_tpot_ms).unwrap_or(0);
    if let Some(ca) = args.ca_cert.as_ref().or(file.ca_cert.as_ref()) {
        cfg.ca_cert = Some(std::fs::read(ca).with_context(|| format!("reading --ca-cert {}", ca.display()))?);
    }
    Ok(Verifier::Server(cfg))
}

/// Everything an [`Edge`] needs, from flags over environment over file.
fn edge_options(args: &EdgeArgs, file: &EdgeConfig) -> Result<EdgeOptions> {
    let backend: Backend = args.backend.as_deref().or(file.backend.as_deref()).unwrap_or("cpu").parse()?;
    // The built-in trained draft is made for the default model and runs on
    // the CPU kernels; other models and backends draft with the target's
    // first five sixths of layers (`Edge::open`). Prompt lookup raised
    // tokens per round with both (see `PromptLookup`).
    let default_model = args.model.is_none() && file.model.is_none();
    let draft: Option<DraftSpec> = match args.draft.as_deref().or(file.draft.as_deref()) {
        Some(spec) => Some(spec.parse()?),
        None if default_model && backend == Backend::Cpu => Some("trained+lookup".parse()?),
        None => None,
    };
    let draft_len = args.draft_len.or(file.draft_len).unwrap_or(4);
    let rule = parse_controller(args.controller.as_deref().or(file.controller.as_deref()).unwrap_or("fixed"))?;
    let log: Option<Box<dyn Write + Send>> = match &args.log_controller {
        Some(p) => Some(Box::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening --log-controller {}", p.display()))?,
        ))),
        None => None,
    };
    Ok(EdgeOptions {
        model: model_path(args, file)?,
        quantize: args.quantize.as_deref().or(file.quantize.as_deref()).map(str::parse).transpose()?,
        // k follows the session's TPOT objective where it has one.
        controller: Some(
            SpeculationController::new(rule, draft_len, args.adaptive_k)
                .with_tpot_objective(args.slo_tpot_ms.or(file.slo_tpot_ms).map(f64::from))
                .with_hand_off(!args.no_hand_off),
        ),
        draft,
        backend,
        draft_len,
        pipeline: !args.no_pipeline,
        verifier: verifier(args, file)?,
        log,
    })
}

fn open_edge(args: &EdgeArgs, file: &EdgeConfig) -> Result<Edge> {
    let opts = edge_options(args, file)?;
    let model = opts.model.clone();
    let draft = opts.draft.as_ref().map_or_else(|| "the default layers draft".to_string(), |d| format!("--draft {d}"));
    Edge::open(opts).map_err(|e| match e {
        EdgeError::Model(m) => anyhow::anyhow!("loading --model {} with {draft}: {m}", model.display()),
        other => other.into(),
    })
}

fn generate(args: GenerateArgs, file: &EdgeConfig) -> Result<()> {
    let json = args.json;
    if args.logprobs.is_some() && !json {
        anyhow::bail!("`--logprobs` needs `--json`: the log-probabilities are reported in the JSON object");
    }
    if args.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        anyhow::bail!("`--logprobs` must be at most {MAX_TOP_LOGPROBS}");
    }
    let logprobs = args.logprobs.map(|top| LogprobsWanted { top, prompt: args.prompt_logprobs });
    if args.server_only {
        let Verifier::Server(cfg) = verifier(&args.edge, file)? else {
            anyhow::bail!("`--server-only` needs `--server URL`, not `--local`");
        };
        let path = model_path(&args.edge, file)?;
        let model = LoadedModel::load(&path).with_context(|| format!("loading --model {}", path.display()))?;
        let prompt = encode_prompt(&model.tokenizer, &args.prompt, args.raw)?;
        let sampling = args.sampling.params(&model.tokenizer)?;
        let req = GenerateRequest { prompt, max_new_tokens: args.sampling.max_new_tokens, draft_len: 0, sampling, logprobs };
        let mut out = TokenPrinter::new(&model.tokenizer, !json, &req);
        let g = server_only(RemoteTarget::new(cfg)?, &req, &model.tokenizer, |e| out.push(e.token))?;
        return report(&g, json, "server_only", &path);
    }
    let mut edge = open_edge(&args.edge, file)?;
    let tokenizer = edge.tokenizer.clone();
    let prompt = encode_prompt(&tokenizer, &args.prompt, args.raw)?;
    let sampling = args.sampling.params(&tokenizer)?;
    let req = GenerateRequest { prompt, max_new_tokens: args.sampling.max_new_tokens, draft_len: edge.draft_len, sampling, logprobs };
    let mut out = TokenPrinter::new(&tokenizer, !json, &req);
    let g = edge.generate(&req, |e| out.push(e.token))?;
    report(&g, json, &edge.draft.to_string(), &edge.model_path)
}

fn encode_prompt(tokenizer: &tandem_model::Tokenizer, prompt: &str, raw: bool) -> Result<Vec<u32>> {
    let turn = tandem_model::ChatMessage { role: "user".into(), content: prompt.into() };
    let text = if raw { prompt.to_string() } else { tokenizer.chat_messages(&[turn], Some(&tandem_edge::chat::today())) };
    Ok(tokenizer.encode_prompt(&text)?)
}

/// Writes tokens to stdout as text as soon as they are final.
struct TokenPrinter<'a> {
    stream: Option<tandem_model::TextStream<'a>>,
    shown: String,
    /// The token that ends the answer shows no text.
    stop_tokens: Vec<u32>,
}

impl<'a> TokenPrinter<'a> {
    fn new(tokenizer: &'a tandem_model::Tokenizer, print: bool, req: &GenerateRequest) -> Self {
        let stop_tokens = req.sampling.stop_tokens(tokenizer.eos_tokens()).to_vec();
        TokenPrinter { stream: print.then(|| tokenizer.stream()), shown: String::new(), stop_tokens }
    }

    fn push(&mut self, t: u32) {
        if self.stop_tokens.contains(&t) {
            return;
        }
        if let Some(piece) = self.stream.as_mut().and_then(|s| s.push(t).ok()) {
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            self.shown.push_str(&piece);
        }
    }
}

/// The end of a `generate`: a JSON summary, or a stats line after the text.
fn report(g: &Generation, json: bool, draft: &str, model: &std::path::Path) -> Result<()> {
    if json {
        let mut value = serde_json::to_value(g)?;
        value["draft"] = serde_json::Value::String(draft.to_string());
        value["model"] = serde_json::Value::String(model.display().to_string());
        println!("{value}");
    } else {
        println!();
        let handed_off = match (g.handed_off_after, g.handed_back) {
            (None, _) => String::new(),
            (Some(n), 0) => format!(", handed to the server after {n} tokens"),
            (Some(n), back) => format!(", handed to the server after {n} tokens, back {back} times ({} tokens decoded there)", g.server_decoded),
        };
        eprintln!(
            "[{} tokens, {} rounds, acceptance {:.1} %, {:.2} tokens/round{handed_off}, {:.0} ms]",
            g.tokens.len(),
            g.rounds,
            100.0 * g.acceptance_rate,
            g.tokens_per_round,
            g.wall_ms
        );
    }
    Ok(())
}

/// `chat`: read a line, answer it, repeat. Ctrl-C while an answer is being
/// written stops that answer (it stays in the history as far as it got);
/// at the prompt it only reminds how to quit.
fn chat(args: ChatArgs, file: &EdgeConfig) -> Result<()> {
    let mut edge = open_edge(&args.edge, file)?;
    let tokenizer = edge.tokenizer.clone();
    let sampling = args.sampling.params(&tokenizer)?;
    let generating = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(edge.cancel_flag(), generating.clone())?;
    let mut conversation = Conversation::new(args.system.clone());
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    println!("Tandem chat ({}, draft {}). /help lists commands; Ctrl-D quits.", edge.model_id(), edge.draft);
    loop {
        print!("> ");
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            println!();
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/stats" => println!("{}", conversation.stats()),
            "/reset" => {
                conversation.reset();
                println!("(history cleared)");
            }
            "/help" => {
                println!("/stats  speculation statistics\n/reset  forget the conversation\n/exit   quit (or Ctrl-D)\nCtrl-C stops the answer being written.")
            }
            cmd if cmd.starts_with('/') => println!("unknown command {cmd}; /help lists them"),
            question => {
                let prompt = match conversation.ask(question, &tokenizer, &tandem_edge::chat::today()) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("error: {}", explain(&e));
                        continue;
                    }
                };
                let req = GenerateRequest {
                    prompt,
                    max_new_tokens: args.sampling.max_new_tokens,
                    draft_len: edge.draft_len,
                    sampling: sampling.clone(),
                    logprobs: None,
                };
                let mut out = TokenPrinter::new(&tokenizer, true, &req);
                generating.store(true, Ordering::SeqCst);
                let result = edge.generate(&req, |e| out.push(e.token));
                generating.store(false, Ordering::SeqCst);
                match result {
                    Ok(g) => {
                        println!("{}", if g.cancelled { " [stopped]" } else { "" });
                        conversation.answered(&out.shown, g);
                    }
                    Err(e) => {
                        eprintln!("\nerror: {}", explain(&e));
                        conversation.unanswered();
                    }
                }
            }
        }
    }
}

/// Ctrl-C sets `cancel` while `generating`; otherwise prints a reminder.
fn watch_ctrl_c(cancel: Arc<AtomicBool>, generating: Arc<AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                if generating.load(Ordering::SeqCst) {
                    cancel.store(true, Ordering::SeqCst);
                } else {
                    eprint!("\n(Ctrl-D or /exit quits)\n> ");
                }
            }
        })
    });
    Ok(())
}

/// `serve`: the OpenAI-compatible endpoint until Ctrl-C or SIGTERM.
fn serve(args: ServeArgs, file: &EdgeConfig) -> Result<()> {
    let edge = open_edge(&args.edge, file)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("`--listen {}`", args.listen))?;
        // Scripts wait for this line.
        eprintln!("tandem-edge serve: OpenAI-compatible endpoint on http://{}/v1 (model {})", listener.local_addr()?, edge.model_id());
        tandem_edge::openai::serve(listener, edge, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `--server-only`: the server decodes; tokens stream back.
fn server_only(mut remote: RemoteTarget, req: &GenerateRequest, tokenizer: &tandem_model::Tokenizer, mut on_token: impl FnMut(Emitted)) -> Result<Generation> {
    req.validate()?;
    let start = std::time::Instant::now();
    let eos = req.sampling.stop_tokens(tokenizer.eos_tokens()).to_vec();
    let mut g = Generation { prompt_tokens: req.prompt.len(), ..Default::default() };
    remote.want_logprobs(req.logprobs);
    remote.generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, |e| g.emit(e, &mut on_token), &eos)?;
    g.prompt_logprobs = remote.take_prompt_logprobs();
    g.rounds = g.tokens.len().saturating_sub(1);
    Ok(g.finish(tokenizer, &eos, start)?)
}
