//! `tandem-server`: the verification service.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_estimators::{MeasuredOn, VerifyTimeCalibration, VerifyTimeProfile};
use tandem_model::hf::Quantize;
use tandem_model::kernels::MatmulKernels;
use tandem_model::{fetch, LoadedModel};
use tandem_protocol::limits::MAX_MESSAGE_BYTES;
use tandem_protocol::wire::VerifierServer;
use tandem_server::auth::Auth;
use tandem_server::batcher::Batcher;
use tandem_server::config::ServerConfig;
use tandem_server::engine::{Engine, EngineConfig};
use tandem_server::metrics::{serve_metrics, Metrics};
use tandem_server::service::VerifierService;
use tandem_server::wisp::WispBatcher;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::info;

#[derive(Parser)]
#[command(name = "tandem-server", version, about = "Tandem verification server")]
struct Cli {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Target model, a llama-family GGUF file or Hugging Face folder, or hf:OWNER/NAME[/FILE.gguf][@REV] on the Hub [default: SmolLM2-135M-Instruct, fetched on first use].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Quantize a Hugging Face folder's weights as they load: q4_0, q4_1,
    /// q8_0, q4_k or q6_k (layers in the type, embedding and head in
    /// Q8_0, as llama.cpp lays out a GGUF) [default: f32, as published].
    #[arg(long)]
    quantize: Option<String>,
    /// cpu, cuda or metal [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// KV cache memory budget in MiB [default: 2048].
    #[arg(long)]
    kv_budget_mb: Option<usize>,
    /// KV cache memory of prompts kept for later sessions of the same
    /// tenant to reuse, MiB, on top of --kv-budget-mb; 0 keeps none
    /// [default: 64].
    #[arg(long)]
    prefix_cache_mb: Option<usize>,
    /// Tenants file (TOML `[[tenant]]` tables with name, api_key, weight, max_sessions).
    #[arg(long)]
    tenants: Option<PathBuf>,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address for Prometheus `/metrics`.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Seconds without a message after which a session is dropped [default: 60].
    #[arg(long)]
    idle_ttl_s: Option<u64>,
    /// On SIGTERM, seconds open sessions may finish before they are sent elsewhere [default: 10].
    #[arg(long)]
    drain_s: Option<u64>,
    /// Batch scheduling: wisp (SLO-aware, estimator, fair counters) or fcfs [default: wisp].
    #[arg(long)]
    policy: Option<String>,
    /// Pin the compute threads to CPUs, one each [default: true]; see
    /// README "Design choices worth knowing".
    #[arg(long)]
    pin_threads: Option<bool>,
    /// Decode sessions their edges hand off while there is room [default:
    /// true]; false hands every hand-off back after one token.
    #[arg(long)]
    hand_offs: Option<bool>,
    /// Write the verification-time calibration of the warm-start sweep here,
    /// with the idle penalty measured first (JSON `VerifyTimeProfile`, what
    /// `tandem-bench sim --calibration` reads).
    /// Needs a policy with an estimator (wisp).
    #[arg(long)]
    calibration_out: Option<PathBuf>,
    /// Warm-start the estimator from a file `--calibration-out` wrote on an
    /// earlier start with the same model, device and threads, instead of
    /// the profiling sweep (a few seconds sooner ready). Needs wisp.
    #[arg(long)]
    calibration: Option<PathBuf>,
}

fn load_config(cli: Cli) -> Result<ServerConfig> {
    let mut cfg = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --config {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing --config {}", path.display()))?
        }
        None => ServerConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => { $(if let Some(v) = cli.$field { cfg.$field = v; })* };
    }
    macro_rules! set_opt {
        ($($field:ident),*) => { $(if cli.$field.is_some() { cfg.$field = cli.$field; })* };
    }
    if let Some(p) = cli.policy.clone() {
        cfg.batcher.policy = p;
    }
    set!(listen, device, kv_budget_mb, prefix_cache_mb, idle_ttl_s, drain_s, pin_threads, hand_offs);
    set_opt!(model, quantize, tenants, tls_cert, tls_key, metrics_listen, calibration);
    cfg.batcher.check().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// The model and device this server measures pass times on.
fn measured_on(model_path: &std::path::Path, quantize: Option<Quantize>, device: &str, threads: usize) -> Result<MeasuredOn> {
    let mut model = model_path.file_name().map_or_else(|| model_path.display().to_string(), |n| n.to_string_lossy().into_owned());
    if let Some(q) = quantize {
        model = format!("{model} as {q}");
    }
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("reading --model {}", model_path.display()));
    // A Hugging Face folder: its weights' files.
    let model_bytes = if model_path.is_dir() {
        let files = std::fs::read_dir(model_path).with_context(|| format!("reading --model {}", model_path.display()))?;
        files.filter_map(|f| f.ok().map(|f| f.path())).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).map(|p| size(&p)).sum::<Result<u64>>()?
    } else {
        size(model_path)?
    };
    Ok(MeasuredOn { model, model_bytes, device: device.to_string(), threads })
}

/// An earlier start's calibration (`--calibration`), if it was measured
/// with this model on this device: another's pass times would mislead
/// admission from the first session.
fn read_calibration(path: &std::path::Path, here: &MeasuredOn) -> Result<VerifyTimeCalibration> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --calibration {}", path.display()))?;
    let profile: VerifyTimeProfile = serde_json::from_str(&text)
        .with_context(|| format!("--calibration {}: not a calibration file (`tandem-server --calibration-out` writes one)", path.display()))?;
    let Some(there) = profile.measured_on.filter(|_| profile.measured) else {
        bail!(
            "--calibration {}: \"{}\" records no server measurement (a computed roofline, or a file an older tandem-server wrote); write one with `tandem-server --calibration-out`",
            path.display(),
            profile.label
        );
    };
    if &there != here {
        bail!(
            "--calibration {}: measured with {} ({} bytes) on {} with {} threads; this server runs {} ({} bytes) on {} with {} threads",
            path.display(),
            there.model,
            there.model_bytes,
            there.device,
            there.threads,
            here.model,
            here.model_bytes,
            here.device,
            here.threads
        );
    }
    Ok(profile.calibration)
}

/// How long open connections may linger after a drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?.block_on(serve())
}

/// glibc gives threads that allocate at once their own arenas (up to eight
/// per core) and keeps what each has freed: a burst of flooding clients
/// (the reliability suite's) left the server 31–34 MiB larger, against
/// 1–17 MiB with one arena, whose free top is returned to the system.
/// Small blocks still come from per-thread caches without a lock. Set
/// before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; called before
    // other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

async fn serve() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let calibration_out = cli.calibration_out.clone();
    let cfg = load_config(cli)?;
    let threads = tandem_model::build_compute_pool(None, cfg.pin_threads).context("building the compute pool")?;
    match cfg.device.as_str() {
        "cpu" => {}
        "cuda" | "metal" => {
            bail!("`--device {}`: this build runs the model on the CPU only (GPU kernels for Tandem's model are not implemented yet)", cfg.device)
        }
        other => bail!("`--device {other}`: expected cpu, cuda or metal"),
    }
    let auth = match &cfg.tenants {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading --tenants {}", path.display()))?;
            Auth::from_file(&text).map_err(|e| anyhow::anyhow!("--tenants {}: {e}", path.display()))?
        }
        None if cfg.listen.ip().is_loopback() => Auth::local_only(),
        None => bail!("`--listen {}` is not a loopback address: pass `--tenants FILE` so clients must authenticate", cfg.listen),
    };
    let model_path = fetch::resolve_model(cfg.model.as_deref()).context("`--model`")?;
    let quantize = cfg.quantize.as_deref().map(str::parse::<Quantize>).transpose()?;
    let model = LoadedModel::load_as(&model_path, MatmulKernels::Tandem, quantize).with_context(|| format!("loading --model {}", model_path.display()))?;
    let (vocab, context_len) = (model.llama.config().vocab, model.llama.config().context_len);
    let eos: Arc<[u32]> = model.tokenizer.eos_tokens().into();
    let measured_on = measured_on(&model_path, quantize, &cfg.device, threads)?;
    if cfg.calibration.is_some() && cfg.batcher.policy != "wisp" {
        bail!("`--calibration` needs `--policy wisp` (fcfs has no estimator)");
    }
    let warm_start = cfg.calibration.as_deref().map(|path| read_calibration(path, &measured_on)).transpose()?;
    let metrics = Arc::new(Metrics::default());
    let b = &cfg.batcher;
    let mut batcher: Box<dyn Batcher> = match b.policy.as_str() {
        "fcfs" => Box::new(b.fifo()),
        "wisp" => Box::new(WispBatcher::new(b.wisp())),
        other => bail!("`--policy {other}`: expected wisp or fcfs"),
    };
    let tenant_weights = auth.tenant_weights();
    for (name, weight) in &tenant_weights {
        batcher.set_tenant_weight(name, *weight);
    }
    let engine_cfg = EngineConfig {
        kv_budget_bytes: cfg.kv_budget_mb << 20,
        idle_ttl: Duration::from_secs(cfg.idle_ttl_s),
        limits: b.pass_limits(),
        tenant_weights,
        hand_offs: cfg.hand_offs,
        warm_start,
        prefix_cache_bytes: cfg.prefix_cache_mb << 20,
    };
    // For the simulator, which adds it to the sweep's back-to-back fit (the
    // server's own estimator refits from the passes it serves, after idle
    // or not).
    let idle_penalty = calibration_out.as_ref().map(|_| tandem_server::profile::idle_penalty(&model.llama)).transpose()?;
    let (engine, runner) = Engine::spawn(model, batcher, engine_cfg, metrics.clone())?;
    if let (Some(path), Some(idle_penalty)) = (&calibration_out, idle_penalty) {
        let calibration = engine.warm_start_calibration().context("`--calibration-out` needs `--policy wisp` (fcfs has no estimator)")?;
        let source = if cfg.calibration.is_some() { "calibration carried over from --calibration" } else { "warm-start sweep" };
        let profile = VerifyTimeProfile {
            label: format!("measured: tandem-server {source}, {} ({} threads), {}", measured_on.device, measured_on.threads, measured_on.model),
            measured: true,
            calibration: calibration.clone(),
            idle_penalty,
            roofline: None,
            measured_on: Some(measured_on),
        };
        std::fs::write(path, serde_json::to_string_pretty(&profile)?).with_context(|| format!("writing --calibration-out {}", path.display()))?;
        info!(path = %path.display(), "calibration written");
    }

    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --metrics-listen {addr}"))?;
        info!(%addr, "metrics on /metrics");
        tokio::spawn(serve_metrics(listener, metrics.clone()));
    }
    let open_timeout = Duration::from_secs(cfg.idle_ttl_s);
    let service = VerifierServer::new(VerifierService { engine: engine.clone(), auth: Arc::new(auth), vocab, context_len, eos, open_timeout })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Keepalive pings find clients that vanished without closing their
    // connection; a per-connection stream cap bounds what one client holds.
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        let cert = std::fs::read(cert).with_context(|| format!("reading --tls-cert {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("reading --tls-key {}", key.display()))?;
        server = server.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key))).context("TLS configuration")?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding --listen {}", cfg.listen))?;
    let local = listener.local_addr()?;
    info!(addr = %local, model = %model_path.display(), "serving");
    // Printed for scripts and tests that listen on port 0.
    println!("listening on {local}");

    // grpc.health.v1: SERVING from here on (the model is loaded and the
    // estimator calibrated before the port opens), NOT_SERVING once draining.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<VerifierServer<VerifierService>>().await;

    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
    let shutdown = {
        let engine = engine.clone();
        let drain = Duration::from_secs(cfg.drain_s);
        async move {
            wait_for_signal().await;
            info!(drain_s = drain.as_secs(), "draining: NOT_SERVING, no new connections or sessions");
            health.set_not_serving::<VerifierServer<VerifierService>>().await;
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            let _ = stop_accepting.send(true);
            engine.drain(drain).await;
            info!("shutting down: finishing the pass in flight, sending the remaining sessions elsewhere");
            engine.shutdown().await;
            let _ = drained_tx.send(());
        }
    };
    let serve =
        server.add_service(health_service).add_service(service).serve_with_incoming_shutdown(tandem_server::listen::incoming(listener, accepting), shutdown);
    // Every client has been told to resume elsewhere; one that keeps its
    // connection open anyway must not hold the process up for long.
    let grace = async {
        if drained_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = serve => served.context("gRPC server")?,
        _ = grace => tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown; closing them"),
    }
    drop(engine);
    let _ = tokio::task::spawn_blocking(move || runner.join()).await;
    info!("stopped");
    Ok(())
}

/// Concurrent streams (sessions) one connection may hold.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
