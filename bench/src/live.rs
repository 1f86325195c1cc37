//! `tandem-bench live`: real `tandem-server` processes, emulated edge
//! devices driving them over loopback gRPC with the real client library.
//!
//! An emulated edge sleeps for its device profile's drafting time and link
//! delays instead of burning this machine's cores, so the cores go to the
//! server. Each policy runs against its own fresh server with the same
//! prompts, seeds and workload:
//! - `centralized`: the server decodes everything (server-only sessions,
//!   first-come-first-served batching);
//! - `sled`: edge drafting with a fixed draft length, fcfs batching, no
//!   estimator (the SLED baseline);
//! - `wisp`: edge drafting with the speculation controller (confidence stop
//!   rule, cost-aware k from the server's hints), the SLO-aware scheduler,
//!   the estimator and the fair counters.

use crate::progress;
use crate::prompts::BenchPrompt;
use crate::real_draft::RealDrafts;
use crate::report::{ratios, search_capacity, summarize, Policy, Probe, Report, ServerFigures, SessionRecord};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::controller::{SpeculationController, StopRule};
use tandem_edge::{Decoded, EdgeError, Emitted, GenerateRequest, Generation, LogprobInbox, RoundOutcome, Speculator, Target, TargetFeatures};
use tandem_model::{DraftFeatures, DraftSource, LoadedModel, NgramDraft, Proposal, SamplingParams, SessionRng, SparseDist, SyntheticDraft};
use tandem_server::process::ServerProcess;

/// An edge device: how fast it drafts and what its link is like.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    pub name: String,
    /// Drafting time per draft token, ms.
    pub draft_ms_per_token: f64,
    /// Round-trip time to the server and its jitter (uniform ±), ms.
    pub rtt_ms: f64,
    #[serde(default)]
    pub jitter_ms: f64,
    /// Link bandwidth, kbit/s.
    pub uplink_kbps: f64,
    pub downlink_kbps: f64,
    /// `synthetic:alpha=A` or `ngram`.
    pub draft: String,
}

impl DeviceProfile {
    /// A laptop on a good Wi-Fi link with a draft accepting 70 % of tokens.
    pub fn laptop() -> Self {
        DeviceProfile {
            name: "laptop".into(),
            draft_ms_per_token: 8.0,
            rtt_ms: 20.0,
            jitter_ms: 4.0,
            uplink_kbps: 20_000.0,
            downlink_kbps: 50_000.0,
            draft: "synthetic:alpha=0.7".into(),
        }
    }
}

impl DeviceProfile {
    /// One line for a report header; synthetic drafts are labelled.
    pub fn describe(&self) -> String {
        format!(
            "device `{}`: draft {}{}, {} ms/token, RTT {} ± {} ms, {}/{} kbit/s up/down",
            self.name,
            self.draft,
            match self.draft.split(':').next() {
                Some("synthetic") => " (SYNTHETIC draft)",
                Some("real") => " (real draft model, proposals precomputed and cached)",
                _ => "",
            },
            self.draft_ms_per_token,
            self.rtt_ms,
            self.jitter_ms,
            self.uplink_kbps,
            self.downlink_kbps
        )
    }
}

/// `[[device]]` tables; devices take profiles in turn.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    pub device: Vec<DeviceProfile>,
}

pub fn load_profiles(path: &Path) -> Result<Vec<DeviceProfile>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --profiles {}", path.display()))?;
    parse_profiles(&text, &path.display().to_string())
}

/// Profiles from TOML text (`origin` names it in errors).
pub fn parse_profiles(text: &str, origin: &str) -> Result<Vec<DeviceProfile>> {
    let file: ProfilesFile = toml::from_str(text).with_context(|| format!("parsing --profiles {origin}"))?;
    anyhow::ensure!(!file.device.is_empty(), "`--profiles {origin}` has no [[device]] table");
    for d in &file.device {
        DraftKind::parse(&d.draft)?;
        anyhow::ensure!(d.draft_ms_per_token >= 0.0 && d.rtt_ms >= 0.0 && d.jitter_ms >= 0.0, "profile `{}`: times must be ≥ 0", d.name);
        anyhow::ensure!(d.uplink_kbps > 0.0 && d.downlink_kbps > 0.0, "profile `{}`: bandwidths must be > 0", d.name);
    }
    Ok(file.device)
}

/// Laptops, phones and desktops in turn (`bench/profiles/mixed.toml`).
pub fn mixed_profiles() -> Vec<DeviceProfile> {
    parse_profiles(include_str!("../profiles/mixed.toml"), "bench/profiles/mixed.toml").expect("the shipped profiles parse")
}

/// Where an edge's drafts come from (a profile's `draft`).
#[derive(Clone, Debug)]
pub enum DraftKind {
    /// Right with probability alpha per token (labelled SYNTHETIC).
    Synthetic { alpha: f64 },
    /// Prompt lookup.
    Ngram,
    /// A real draft model's proposals (`real:SPEC`, e.g. `real:layers:25`),
    /// precomputed and cached (see `real_draft`).
    Real(String),
}

impl DraftKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "ngram" => Ok(DraftKind::Ngram),
            Some(("synthetic", rest)) => {
                let alpha = rest.strip_prefix("alpha=").and_then(|a| a.parse::<f64>().ok()).filter(|a| (0.0..=1.0).contains(a));
                alpha.map(|alpha| DraftKind::Synthetic { alpha }).context(format!("draft `{s}`: expected synthetic:alpha=A with A in [0, 1]"))
            }
            Some(("real", spec)) => {
                spec.parse::<tandem_model::DraftSpec>().with_context(|| format!("draft `{s}`"))?;
                Ok(DraftKind::Real(spec.to_string()))
            }
            _ => bail!("draft `{s}`: expected synthetic:alpha=A, ngram or real:SPEC (e.g. real:layers:25)"),
        }
    }
}

/// The one real draft spec the profiles ask for, if any.
pub fn real_draft_spec(profiles: &[DeviceProfile]) -> Result<Option<String>> {
    let mut specs: Vec<String> = profiles
        .iter()
        .filter_map(|p| match DraftKind::parse(&p.draft) {
            Ok(DraftKind::Real(spec)) => Some(spec),
            _ => None,
        })
        .collect();
    specs.dedup();
    anyhow::ensure!(specs.len() <= 1, "profiles ask for several real drafts ({specs:?}); use one");
    Ok(specs.pop())
}

/// The speculation controller of `wisp` edges: a confidence stop rule,
/// SLO-aware k and, where allowed, hand-offs (the simulator builds the same).
pub fn wisp_controller(draft_len: usize, slo_tpot_ms: u32, hand_off: bool) -> SpeculationController {
    SpeculationController::new(StopRule::Confidence { min_top1: 0.4 }, draft_len, true).with_tpot_objective(Some(slo_tpot_ms.into())).with_hand_off(hand_off)
}

/// Hand-offs are on unless a run says otherwise (reports written before
/// them read as on: their edges had no hand-off to turn off).
pub fn hand_off_default() -> bool {
    true
}

/// When closed-loop device `device` of `devices` starts its first session:
/// devices join evenly over the first second (a quarter of a shorter run),
/// as real ones do, rather than all in one instant — a burst of every
/// device's prefill at time zero would measure the burst, not the load.
pub fn join_delay(device: usize, devices: usize, duration_s: f64) -> Duration {
    Duration::from_secs_f64(device as f64 / devices.max(1) as f64 * (duration_s / 4.0).min(1.0))
}

/// How load arrives.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Workload {
    /// `devices` edges, each starting its next session `think_ms` after the last.
    Closed { devices: usize, think_ms: u64 },
    /// Sessions arriving as a Poisson process, per second.
    Open { rate: f64 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveConfig {
    pub policies: Vec<Policy>,
    pub workload: Workload,
    pub duration_s: f64,
    pub max_new_tokens: usize,
    /// Draft length: fixed for `sled`, the largest for `wisp`.
    pub draft_len: usize,
    pub slo_ttft_ms: u32,
    pub slo_tpot_ms: u32,
    pub seed: u64,
    /// An already running server (policies then differ only at the edge).
    pub server: Option<String>,
    /// Also search each policy's capacity: the largest load (devices, or
    /// arrivals per second) with ≥ 90 % SLO attainment.
    pub capacity_search: bool,
    /// `wisp` edges may hand their sessions to the server.
    #[serde(default = "hand_off_default")]
    pub hand_off: bool,
    /// Devices belong to tenants `tenant-0..` in turn (as in the simulator).
    #[serde(default = "one_tenant")]
    pub tenants: usize,
    /// The model the servers the bench starts run, when not the default:
    /// the one the bench tokenizes the prompts with and drafts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<std::path::PathBuf>,
    /// `--quantize` for a Hugging Face folder, as the bench loaded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
}

/// Reports written before tenants were configurable ran one.
fn one_tenant() -> usize {
    1
}

/// The API key of tenant `i` on the servers the bench starts.
fn tenant_key(i: usize) -> String {
    format!("tandem-bench-tenant-{i}")
}

/// A tenants file for the bench's servers (`tenant-0..`, equal weights),
/// removed when dropped.
struct TenantsFile(std::path::PathBuf);

impl TenantsFile {
    fn write(tenants: usize) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("tandem-bench-tenants-{}.toml", std::process::id()));
        let text: String = (0..tenants).map(|i| format!("[[tenant]]\nname = \"tenant-{i}\"\napi_key = \"{}\"\n\n", tenant_key(i))).collect();
        std::fs::write(&path, text).with_context(|| format!("writing the tenants file {}", path.display()))?;
        Ok(TenantsFile(path))
    }
}

impl Drop for TenantsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pause of a closed-loop device before asking again after a refusal.
pub const REFUSED_RETRY: Duration = Duration::from_millis(200);

impl Workload {
    pub fn load(&self) -> f64 {
        match *self {
            Workload::Closed { devices, .. } => devices as f64,
            Workload::Open { rate } => rate,
        }
    }

    pub fn with_load(&self, load: f64) -> Workload {
        match *self {
            Workload::Closed { think_ms, .. } => Workload::Closed { devices: load.round().max(1.0) as usize, think_ms },
            Workload::Open { .. } => Workload::Open { rate: load },
        }
    }
}

/// A link between an emulated edge and the server: each message waits half
/// the round trip (with jitter) plus its size over the link's bandwidth.
struct EmulatedLink<T> {
    inner: T,
    profile: DeviceProfile,
    rng: SessionRng,
}

impl<T> EmulatedLink<T> {
    fn one_way(&mut self, bytes: usize, kbps: f64) {
        let jitter = (self.rng.next_f64() * 2.0 - 1.0) * self.profile.jitter_ms;
        let ms = (self.profile.rtt_ms / 2.0 + jitter / 2.0).max(0.0) + bytes as f64 * 8.0 / kbps;
        std::thread::sleep(Duration::from_secs_f64(ms / 1e3));
    }
}

impl<T: Target> Target for EmulatedLink<T> {
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError> {
        self.one_way(64 + 4 * prompt.len(), self.profile.uplink_kbps);
        let first = self.inner.open(prompt, sampling, max_new_tokens)?;
        self.one_way(64, self.profile.downlink_kbps);
        Ok(first)
    }

    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError> {
        let q_bytes: usize = q.iter().map(|d| 8 * d.tokens.len()).sum();
        self.one_way(32 + 4 * drafts.len() + q_bytes, self.profile.uplink_kbps);
        let outcome = self.inner.verify(context, drafts, q)?;
        self.one_way(96, self.profile.downlink_kbps);
        Ok(outcome)
    }

    /// The hand-off goes up the link; the decoded tokens come back one way
    /// (the last one's trip is waited for).
    fn hand_off(&mut self, context: &[u32], on_token: &mut dyn FnMut(Emitted), eos: &[u32], stop: &dyn Fn() -> bool) -> Result<Decoded, EdgeError> {
        self.one_way(32, self.profile.uplink_kbps);
        let decoded = self.inner.hand_off(context, on_token, eos, stop)?;
        self.one_way(64, self.profile.downlink_kbps);
        Ok(decoded)
    }

    fn want_features(&mut self, on: bool) {
        self.inner.want_features(on)
    }

    fn take_features(&mut self) -> Option<TargetFeatures> {
        self.inner.take_features()
    }

    fn logprob_inbox(&mut self) -> &mut LogprobInbox {
        self.inner.logprob_inbox()
    }
}

/// A draft source that takes the device's drafting time per token.
struct Paced<D> {
    inner: D,
    pace: Duration,
}

impl<D: DraftSource> DraftSource for Paced<D> {
    fn wants_target_features(&self) -> bool {
        self.inner.wants_target_features()
    }

    fn observe_target_features(&mut self, start: usize, rows: &[f32]) {
        self.inner.observe_target_features(start, rows)
    }

    fn propose_until(
        &mut self,
        context: &[u32],
        generated: usize,
        k: usize,
        sampling: &SamplingParams,
        rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> tandem_model::Result<Proposal> {
        // Each token's time passes before the stop rule sees it, as on a
        // device, so the edge's timestamps (wasted drafting) include it;
        // a source that never asks (n-gram lookup) is paced after.
        let (pace, mut paced) = (self.pace, 0u32);
        let proposal = self.inner.propose_until(context, generated, k, sampling, rng, &mut |f| {
            std::thread::sleep(pace);
            paced += 1;
            keep_going(f)
        })?;
        std::thread::sleep(pace * (proposal.tokens.len() as u32).saturating_sub(paced));
        Ok(proposal)
    }
}

fn draft_for(profile: &DeviceProfile, prompt: &BenchPrompt, real: Option<&RealDrafts>) -> Result<Box<dyn DraftSource>> {
    let pace = Duration::from_secs_f64(profile.draft_ms_per_token / 1e3);
    Ok(match DraftKind::parse(&profile.draft)? {
        DraftKind::Synthetic { alpha } => Box::new(SyntheticDraft::new(prompt.reference.clone(), alpha, pace)),
        DraftKind::Ngram => Box::new(Paced { inner: NgramDraft::new(3), pace }),
        DraftKind::Real(spec) => Box::new(Paced { inner: real.context(format!("draft `real:{spec}`: proposals not loaded"))?.source(prompt), pace }),
    })
}

/// One session of `policy` by device `device`.
fn run_session(
    policy: Policy,
    cfg: &LiveConfig,
    url: &str,
    inputs: &LiveInputs,
    device: usize,
    profile: &DeviceProfile,
    prompt: &BenchPrompt,
) -> SessionRecord {
    let (model, real) = (inputs.model, inputs.real);
    let mut record = SessionRecord { device, prompt: prompt.id.clone(), ..Default::default() };
    let mut client = ClientConfig::new(url);
    (client.ttft_ms, client.tpot_ms) = (cfg.slo_ttft_ms, cfg.slo_tpot_ms);
    if cfg.tenants > 1 {
        client.api_key = Some(tenant_key(device % cfg.tenants));
    }
    let target = match RemoteTarget::new(client) {
        Ok(t) => t,
        Err(e) => {
            record.failed = Some(e.to_string());
            return record;
        }
    };
    let link_seed = cfg.seed ^ (device as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let request = GenerateRequest {
        prompt: prompt.tokens.clone(),
        max_new_tokens: cfg.max_new_tokens,
        draft_len: cfg.draft_len,
        sampling: SamplingParams { seed: cfg.seed, ..SamplingParams::default() },
        logprobs: None,
    };
    let start = Instant::now();
    let result = match policy {
        Policy::Centralized => {
            let mut link = EmulatedLink { inner: target, profile: profile.clone(), rng: SessionRng::new(link_seed) };
            // The open goes up the link; tokens stream back one way.
            link.one_way(64 + 4 * request.prompt.len(), profile.uplink_kbps);
            let mut first_at = None;
            let eos = request.sampling.stop_tokens(model.tokenizer.eos_tokens()).to_vec();
            link.inner
                .generate_server_only(
                    &request.prompt,
                    &request.sampling,
                    request.max_new_tokens,
                    |_| {
                        first_at.get_or_insert_with(Instant::now);
                    },
                    &eos,
                )
                .map(|tokens| {
                    let down = profile.rtt_ms / 2.0;
                    let ttft_ms = first_at.map_or(0.0, |t| t.duration_since(start).as_secs_f64() * 1e3) + down;
                    Generation { tokens, ttft_ms, wall_ms: start.elapsed().as_secs_f64() * 1e3 + down, ..Default::default() }
                })
        }
        Policy::Sled | Policy::Wisp => {
            let draft = match draft_for(profile, prompt, real) {
                Ok(d) => d,
                Err(e) => {
                    record.failed = Some(e.to_string());
                    return record;
                }
            };
            let link = EmulatedLink { inner: target, profile: profile.clone(), rng: SessionRng::new(link_seed) };
            let mut spec = Speculator::new(link, draft, model.tokenizer.clone());
            if policy == Policy::Wisp {
                spec = spec.with_controller(wisp_controller(cfg.draft_len, cfg.slo_tpot_ms, cfg.hand_off));
            }
            spec.generate(&request, |_| {})
        }
    };
    match result {
        Ok(g) => {
            let tokens = g.tokens.len();
            record.mismatch = !prompt.reference[prompt.tokens.len()..].starts_with(&g.tokens);
            record.tokens = tokens;
            record.ttft_ms = g.ttft_ms;
            record.tpot_ms = if tokens > 1 { (g.wall_ms - g.ttft_ms) / (tokens - 1) as f64 } else { 0.0 };
            (record.rounds, record.drafted, record.accepted, record.wasted_draft_ms) = (g.rounds, g.drafted, g.accepted, g.wasted_draft_ms);
            record.handed_off = g.handed_off_after.is_some();
            record.hand_backs = g.handed_back;
            record.slo_met = record.ttft_ms <= cfg.slo_ttft_ms as f64 && record.tpot_ms <= cfg.slo_tpot_ms as f64;
        }
        Err(EdgeError::Server(s)) if s.code() == tonic::Code::ResourceExhausted => record.refused = true,
        Err(e) => record.failed = Some(e.to_string()),
    }
    record
}

/// Runs the workload once against `url` with `policy`'s edges: every
/// session's record and the wall time, s.
fn run_policy(policy: Policy, cfg: &LiveConfig, url: &str, inputs: &LiveInputs) -> (Vec<SessionRecord>, f64) {
    let (profiles, prompts) = (inputs.profiles, inputs.prompts);
    let records = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(cfg.duration_s);
    std::thread::scope(|s| match cfg.workload {
        Workload::Closed { devices, think_ms } => {
            for device in 0..devices {
                let records = records.clone();
                s.spawn(move || {
                    std::thread::sleep(join_delay(device, devices, cfg.duration_s));
                    let mut n = 0;
                    while Instant::now() < until {
                        let prompt = &prompts[(device + n * devices) % prompts.len()];
                        // A refused request is tried again after a pause, as
                        // a user would; its wait counts against its TTFT.
                        let asked = Instant::now();
                        let mut r = run_session(policy, cfg, url, inputs, device, &profiles[device % profiles.len()], prompt);
                        while r.refused && Instant::now() < until {
                            std::thread::sleep(REFUSED_RETRY);
                            let waited = asked.elapsed().as_secs_f64() * 1e3;
                            r = run_session(policy, cfg, url, inputs, device, &profiles[device % profiles.len()], prompt);
                            if !r.refused && r.failed.is_none() {
                                r.ttft_ms += waited;
                                r.slo_met = r.ttft_ms <= cfg.slo_ttft_ms as f64 && r.tpot_ms <= cfg.slo_tpot_ms as f64;
                            }
                        }
                        r.ended_s = start.elapsed().as_secs_f64();
                        records.lock().unwrap().push(r);
                        std::thread::sleep(Duration::from_millis(think_ms));
                        n += 1;
                    }
                });
            }
        }
        Workload::Open { rate } => {
            let mut rng = SessionRng::new(cfg.seed);
            let mut next = 0.0;
            let mut arrival = 0;
            while start + Duration::from_secs_f64(next) < until {
                let wait = next - start.elapsed().as_secs_f64();
                if wait > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(wait));
                }
                let records = records.clone();
                let (device, prompt) = (arrival, &prompts[arrival % prompts.len()]);
                s.spawn(move || {
                    let mut r = run_session(policy, cfg, url, inputs, device, &profiles[device % profiles.len()], prompt);
                    r.ended_s = start.elapsed().as_secs_f64();
                    records.lock().unwrap().push(r);
                });
                arrival += 1;
                next += -(1.0 - rng.next_f64()).ln() / rate;
            }
        }
    });
    let wall_s = start.elapsed().as_secs_f64();
    let records = Arc::try_unwrap(records).expect("threads joined").into_inner().unwrap();
    (records, wall_s)
}

/// What a live run reads besides its configuration.
#[derive(Clone, Copy)]
pub struct LiveInputs<'a> {
    pub model: &'a LoadedModel,
    pub profiles: &'a [DeviceProfile],
    pub prompts: &'a [BenchPrompt],
    pub provenance: &'a str,
    pub real: Option<&'a RealDrafts>,
}

/// A few figures from the server's Prometheus `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
struct Scrape {
    /// `tandem_pass_seconds_sum`: forward-pass seconds so far.
    pass_seconds: f64,
    /// `tandem_estimator_relative_error` (absent without an estimator).
    estimator_error: Option<f64>,
    /// `tandem_tenant_service_gap_max` (absent from servers before it).
    service_gap_max: Option<f64>,
}

/// Reads `/metrics` at `addr` with a plain HTTP/1.0 GET.
fn scrape(addr: &str) -> Result<Scrape> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    let value = |name: &str| body.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse::<f64>().ok()));
    Ok(Scrape {
        pass_seconds: value("tandem_pass_seconds_sum").context("no tandem_pass_seconds_sum in /metrics")?,
        estimator_error: value("tandem_estimator_relative_error"),
        service_gap_max: value("tandem_tenant_service_gap_max"),
    })
}

/// A free loopback port for the server's metrics endpoint.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The flags of the server the bench starts for `policy`: its model (and
/// how it is quantized), its metrics address, where the wisp server writes
/// its calibration, and the tenants file. Its prefix cache is off: the
/// bench's devices cycle through a fixed prompt set, so every prompt after
/// its first session would be copied whole, which no deployment sees (and
/// the simulator does not model).
fn server_args(cfg: &LiveConfig, policy: Policy, metrics: &str, calibration_out: Option<&Path>, tenants: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> =
        ["--policy", policy.server_policy(), "--metrics-listen", metrics, "--prefix-cache-mb", "0"].into_iter().map(String::from).collect();
    let path = |p: &Path| p.display().to_string();
    let flags = [
        ("--model", cfg.model.as_deref().map(path)),
        ("--quantize", cfg.quantize.clone()),
        ("--calibration-out", calibration_out.filter(|_| policy == Policy::Wisp).map(path)),
        ("--tenants", tenants.map(path)),
    ];
    for (flag, value) in flags {
        if let Some(value) = value {
            args.extend([flag.to_string(), value]);
        }
    }
    args
}

/// Every policy in turn, each on a fresh server (or on `cfg.server`).
/// `calibration_out`: where the wisp server writes its calibration.
pub fn run(cfg: &LiveConfig, inputs: &LiveInputs, calibration_out: Option<&Path>) -> Result<Report> {
    let (profiles, prompts, provenance) = (inputs.profiles, inputs.prompts, inputs.provenance);
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    anyhow::ensure!(cfg.tenants > 0, "`--tenants` must be at least 1");
    anyhow::ensure!(
        cfg.tenants == 1 || cfg.server.is_none(),
        "`--tenants {}` needs the servers the bench starts (their tenants file holds the keys); with `--server` devices run as one tenant",
        cfg.tenants
    );
    let tenants_file = (cfg.tenants > 1).then(|| TenantsFile::write(cfg.tenants)).transpose()?;
    let mut reports = Vec::new();
    for &policy in &cfg.policies {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let server = match &cfg.server {
            Some(_) => None,
            None => {
                let args = server_args(cfg, policy, &metrics, calibration_out, tenants_file.as_ref().map(|f| f.0.as_path()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Some(ServerProcess::try_start(&args).context("starting tandem-server")?)
            }
        };
        let url = cfg.server.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
        let bar = progress::spinner(&format!("live {} ({url}, {:.0} s per run)", policy.name(), cfg.duration_s));
        let before = server.as_ref().map(|_| scrape(&metrics)).transpose()?;
        let (records, wall_s) = run_policy(policy, cfg, &url, inputs);
        let figures = match before {
            Some(before) => {
                let after = scrape(&metrics)?;
                let tokens: usize = records.iter().map(|r| r.tokens).sum();
                ServerFigures {
                    estimator_mape: after.estimator_error,
                    max_service_gap: after.service_gap_max,
                    verify_s_per_token: (tokens > 0).then(|| (after.pass_seconds - before.pass_seconds) / tokens as f64),
                }
            }
            None => ServerFigures::default(),
        };
        let mut report = summarize(policy, records, wall_s, cfg.duration_s, cfg.slo_ttft_ms.into(), figures);
        report.load = cfg.workload.load();
        if cfg.capacity_search {
            let closed = matches!(cfg.workload, Workload::Closed { .. });
            report.capacity = Some(search_capacity(cfg.workload.load(), closed, |load| {
                let c = LiveConfig { workload: cfg.workload.with_load(load), ..cfg.clone() };
                let (records, wall_s) = run_policy(policy, &c, &url, inputs);
                let r = summarize(policy, records, wall_s, c.duration_s, cfg.slo_ttft_ms.into(), ServerFigures::default());
                bar.set_message(format!("live {}: capacity probe at {load:.2}: {:.0} % met SLO", policy.name(), r.slo_attainment * 100.0));
                Probe::of(load, &r)
            }));
        }
        bar.finish_with_message(format!(
            "live {}: {} sessions, {:.0} % met SLO, goodput {:.1} tok/s",
            policy.name(),
            report.sessions,
            report.slo_attainment * 100.0,
            report.goodput_tok_s
        ));
        if let Some(r) = report.records.iter().find(|r| r.failed.is_some()) {
            eprintln!("live: {}: {} sessions failed, first: {}", policy.name(), report.failed, r.failed.as_deref().unwrap_or_default());
        }
        anyhow::ensure!(report.mismatched == 0, "{}: {} outputs differ from the target's own greedy output", policy.name(), report.mismatched);
        reports.push(report);
    }
    let synthetic_drafts = profiles.iter().any(|p| p.draft.starts_with("synthetic"));
    let mut header = vec![format!(
        "live: {:?}, {:.0} s per policy, {} new tokens, SLO TTFT {} ms / TPOT {} ms, {} tenants; prompts: {}",
        cfg.workload, cfg.duration_s, cfg.max_new_tokens, cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.tenants, provenance
    )];
    header.extend(profiles.iter().map(DeviceProfile::describe));
    Ok(Report {
        kind: "live".into(),
        header,
        config: serde_json::to_value(cfg)?,
        synthetic_drafts,
        ratios: ratios(&reports),
        policies: reports,
        notes: vec![
            "live server figures come from the server's Prometheus /metrics (scraped before and after the main run): estimator MAPE is its EWMA of |predicted − measured| / measured pass time; verify s/token is forward-pass seconds over the tokens the edges received".into(),
            "Jain's index is over tokens served per device, from what the edges saw; max service gap is the server's tandem_tenant_service_gap_max after the main run: the largest spread of VTC counters (prefill 1, verified position 2) between tenants with work queued at once (0 with one tenant)".into(),
            crate::report::GOODPUT_NOTE.into(),
            "timings on this shared 2-core CPU machine are perturbed by whatever else runs (e.g. compilers)".into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The servers the bench starts run the model it loaded (named only
    /// when it is not the default), and only wisp's writes a calibration.
    #[test]
    fn started_servers_run_the_benchs_model() {
        let mut cfg = LiveConfig {
            policies: vec![Policy::Wisp, Policy::Sled],
            workload: Workload::Closed { devices: 1, think_ms: 0 },
            duration_s: 1.0,
            max_new_tokens: 8,
            draft_len: 4,
            slo_ttft_ms: 0,
            slo_tpot_ms: 0,
            seed: 1,
            server: None,
            capacity_search: false,
            hand_off: true,
            tenants: 1,
            model: None,
            quantize: None,
        };
        let calibration = Path::new("/tmp/calibration.json");
        let args = server_args(&cfg, Policy::Wisp, "127.0.0.1:9", Some(calibration), None);
        assert_eq!(args, ["--policy", "wisp", "--metrics-listen", "127.0.0.1:9", "--prefix-cache-mb", "0", "--calibration-out", "/tmp/calibration.json"]);
        cfg.model = Some("/models/folder".into());
        cfg.quantize = Some("q4_1".into());
        let args = server_args(&cfg, Policy::Sled, "127.0.0.1:9", Some(calibration), Some(Path::new("/tmp/tenants.toml")));
        assert_eq!(
            args,
            [
                "--policy",
                "fcfs",
                "--metrics-listen",
                "127.0.0.1:9",
                "--prefix-cache-mb",
                "0",
                "--model",
                "/models/folder",
                "--quantize",
                "q4_1",
                "--tenants",
                "/tmp/tenants.toml"
            ]
        );
    }
}
