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

use crate::prompts::BenchPrompt;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::controller::{SpeculationController, StopRule};
use tandem_edge::{EdgeError, GenerateRequest, RoundOutcome, Speculator, Target};
use tandem_model::{DraftFeatures, DraftSource, LoadedModel, NgramDraft, Proposal, SamplingParams, SessionRng, SparseDist, SyntheticDraft};
use tandem_server::process::ServerProcess;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Centralized,
    Sled,
    Wisp,
}

impl std::str::FromStr for Policy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "centralized" => Ok(Policy::Centralized),
            "sled" => Ok(Policy::Sled),
            "wisp" => Ok(Policy::Wisp),
            _ => bail!("`--policies`: unknown policy `{s}` (expected centralized, sled, wisp)"),
        }
    }
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Centralized => "centralized",
            Policy::Sled => "sled",
            Policy::Wisp => "wisp",
        }
    }

    fn server_policy(self) -> &'static str {
        match self {
            Policy::Centralized | Policy::Sled => "fcfs",
            Policy::Wisp => "wisp",
        }
    }
}

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

/// `[[device]]` tables; devices take profiles in turn.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    pub device: Vec<DeviceProfile>,
}

pub fn load_profiles(path: &Path) -> Result<Vec<DeviceProfile>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --profiles {}", path.display()))?;
    let file: ProfilesFile = toml::from_str(&text).with_context(|| format!("parsing --profiles {}", path.display()))?;
    anyhow::ensure!(!file.device.is_empty(), "`--profiles {}` has no [[device]] table", path.display());
    for d in &file.device {
        DraftKind::parse(&d.draft)?;
        anyhow::ensure!(d.draft_ms_per_token >= 0.0 && d.rtt_ms >= 0.0 && d.jitter_ms >= 0.0, "profile `{}`: times must be ≥ 0", d.name);
        anyhow::ensure!(d.uplink_kbps > 0.0 && d.downlink_kbps > 0.0, "profile `{}`: bandwidths must be > 0", d.name);
    }
    Ok(file.device)
}

#[derive(Clone, Copy, Debug)]
enum DraftKind {
    Synthetic { alpha: f64 },
    Ngram,
}

impl DraftKind {
    fn parse(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "ngram" => Ok(DraftKind::Ngram),
            Some(("synthetic", rest)) => {
                let alpha = rest.strip_prefix("alpha=").and_then(|a| a.parse::<f64>().ok()).filter(|a| (0.0..=1.0).contains(a));
                alpha.map(|alpha| DraftKind::Synthetic { alpha }).context(format!("draft `{s}`: expected synthetic:alpha=A with A in [0, 1]"))
            }
            _ => bail!("draft `{s}`: expected synthetic:alpha=A or ngram"),
        }
    }
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
}

/// Pause of a closed-loop device before asking again after a refusal.
const REFUSED_RETRY: Duration = Duration::from_millis(200);

/// SLO attainment a load must keep to count as within capacity.
pub const CAPACITY_ATTAINMENT: f64 = 0.9;

/// One load tried by the capacity search.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub load: f64,
    pub slo_attainment: f64,
    pub goodput_tok_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Capacity {
    /// Largest load found with ≥ 90 % attainment (0: not even the smallest).
    pub load: f64,
    /// `devices` (closed loop) or `sessions/s` (open loop).
    pub unit: String,
    pub probes: Vec<Probe>,
}

impl Workload {
    fn load(&self) -> f64 {
        match *self {
            Workload::Closed { devices, .. } => devices as f64,
            Workload::Open { rate } => rate,
        }
    }

    fn with_load(&self, load: f64) -> Workload {
        match *self {
            Workload::Closed { think_ms, .. } => Workload::Closed { devices: load.round().max(1.0) as usize, think_ms },
            Workload::Open { .. } => Workload::Open { rate: load },
        }
    }
}

/// One session as its edge saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    pub device: usize,
    pub prompt: String,
    pub refused: bool,
    pub failed: Option<String>,
    pub tokens: usize,
    pub ttft_ms: f64,
    pub tpot_ms: f64,
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub wasted_draft_ms: f64,
    pub slo_met: bool,
    /// The output differs from the target's own greedy output (a bug).
    pub mismatch: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    pub policy: Policy,
    pub sessions: usize,
    pub refused: usize,
    pub failed: usize,
    /// Outputs that differ from the target's own (must be 0: lossless).
    pub mismatched: usize,
    /// Sessions meeting both objectives, of all offered (refused count as misses).
    pub slo_attainment: f64,
    /// Tokens per second of sessions that met their objectives.
    pub goodput_tok_s: f64,
    pub throughput_tok_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    pub acceptance: f64,
    pub tokens_per_round: f64,
    pub wasted_draft_ms_per_session: f64,
    pub wall_s: f64,
    pub capacity: Option<Capacity>,
    pub records: Vec<SessionRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveReport {
    pub config: LiveConfig,
    pub profiles: Vec<DeviceProfile>,
    /// Where the prompts come from.
    pub prompts: String,
    /// Every synthetic draft is labelled as such.
    pub synthetic_drafts: bool,
    pub policies: Vec<PolicyReport>,
    /// WISP's goodput over the others' (when both ran).
    pub ratios: HashMap<String, f64>,
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
}

/// A draft source that takes the device's drafting time per token.
struct Paced<D> {
    inner: D,
    pace: Duration,
}

impl<D: DraftSource> DraftSource for Paced<D> {
    fn propose_until(
        &mut self,
        context: &[u32],
        k: usize,
        sampling: &SamplingParams,
        rng: &mut SessionRng,
        keep_going: &mut dyn FnMut(&DraftFeatures) -> bool,
    ) -> tandem_model::Result<Proposal> {
        let proposal = self.inner.propose_until(context, k, sampling, rng, keep_going)?;
        std::thread::sleep(self.pace * proposal.tokens.len() as u32);
        Ok(proposal)
    }
}

fn draft_for(profile: &DeviceProfile, prompt: &BenchPrompt) -> Result<Box<dyn DraftSource>> {
    let pace = Duration::from_secs_f64(profile.draft_ms_per_token / 1e3);
    Ok(match DraftKind::parse(&profile.draft)? {
        DraftKind::Synthetic { alpha } => Box::new(SyntheticDraft::new(prompt.reference.clone(), alpha, pace)),
        DraftKind::Ngram => Box::new(Paced { inner: NgramDraft::new(3), pace }),
    })
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

/// One session of `policy` by device `device`.
fn run_session(policy: Policy, cfg: &LiveConfig, url: &str, model: &LoadedModel, device: usize, profile: &DeviceProfile, prompt: &BenchPrompt) -> SessionRecord {
    let mut record = SessionRecord { device, prompt: prompt.id.clone(), ..Default::default() };
    let mut client = ClientConfig::new(url);
    (client.ttft_ms, client.tpot_ms) = (cfg.slo_ttft_ms, cfg.slo_tpot_ms);
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
    };
    let start = Instant::now();
    let result = match policy {
        Policy::Centralized => {
            let mut link = EmulatedLink { inner: target, profile: profile.clone(), rng: SessionRng::new(link_seed) };
            // The open goes up the link; tokens stream back one way.
            link.one_way(64 + 4 * request.prompt.len(), profile.uplink_kbps);
            let mut first_at = None;
            let eos = model.tokenizer.eos_tokens().to_vec();
            link.inner
                .generate_server_only(&request.prompt, &request.sampling, request.max_new_tokens, |_| {
                    first_at.get_or_insert_with(Instant::now);
                }, &eos)
                .map(|tokens| {
                    let down = profile.rtt_ms / 2.0;
                    let ttft = first_at.map_or(0.0, |t| t.duration_since(start).as_secs_f64() * 1e3) + down;
                    let wall = start.elapsed().as_secs_f64() * 1e3 + down;
                    (tokens, ttft, wall, 0, 0, 0, 0.0)
                })
        }
        Policy::Sled | Policy::Wisp => {
            let draft = match draft_for(profile, prompt) {
                Ok(d) => d,
                Err(e) => {
                    record.failed = Some(e.to_string());
                    return record;
                }
            };
            let link = EmulatedLink { inner: target, profile: profile.clone(), rng: SessionRng::new(link_seed) };
            let mut spec = Speculator::new(link, draft, model.tokenizer.clone());
            if policy == Policy::Wisp {
                spec = spec.with_controller(SpeculationController::new(StopRule::Confidence { min_top1: 0.4 }, cfg.draft_len, true));
            }
            spec.generate(&request, |_| {}).map(|g| (g.tokens, g.ttft_ms, g.wall_ms, g.rounds, g.drafted, g.accepted, g.wasted_draft_ms))
        }
    };
    match result {
        Ok((output, ttft, wall, rounds, drafted, accepted, wasted)) => {
            let tokens = output.len();
            record.mismatch = !prompt.reference[prompt.tokens.len()..].starts_with(&output);
            record.tokens = tokens;
            record.ttft_ms = ttft;
            record.tpot_ms = if tokens > 1 { (wall - ttft) / (tokens - 1) as f64 } else { 0.0 };
            (record.rounds, record.drafted, record.accepted, record.wasted_draft_ms) = (rounds, drafted, accepted, wasted);
            record.slo_met = record.ttft_ms <= cfg.slo_ttft_ms as f64 && record.tpot_ms <= cfg.slo_tpot_ms as f64;
        }
        Err(EdgeError::Server(s)) if s.code() == tonic::Code::ResourceExhausted => record.refused = true,
        Err(e) => record.failed = Some(e.to_string()),
    }
    record
}

/// Runs the workload once against `url` with `policy`'s edges.
fn run_policy(policy: Policy, cfg: &LiveConfig, url: &str, model: &LoadedModel, profiles: &[DeviceProfile], prompts: &[BenchPrompt]) -> PolicyReport {
    let records = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(cfg.duration_s);
    std::thread::scope(|s| match cfg.workload {
        Workload::Closed { devices, think_ms } => {
            for device in 0..devices {
                let records = records.clone();
                s.spawn(move || {
                    let mut n = 0;
                    while Instant::now() < until {
                        let prompt = &prompts[(device + n * devices) % prompts.len()];
                        // A refused request is tried again after a pause, as
                        // a user would; its wait counts against its TTFT.
                        let asked = Instant::now();
                        let mut r = run_session(policy, cfg, url, model, device, &profiles[device % profiles.len()], prompt);
                        while r.refused && Instant::now() < until {
                            std::thread::sleep(REFUSED_RETRY);
                            let waited = asked.elapsed().as_secs_f64() * 1e3;
                            r = run_session(policy, cfg, url, model, device, &profiles[device % profiles.len()], prompt);
                            if !r.refused && r.failed.is_none() {
                                r.ttft_ms += waited;
                                r.slo_met = r.ttft_ms <= cfg.slo_ttft_ms as f64 && r.tpot_ms <= cfg.slo_tpot_ms as f64;
                            }
                        }
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
                    let r = run_session(policy, cfg, url, model, device, &profiles[device % profiles.len()], prompt);
                    records.lock().unwrap().push(r);
                });
                arrival += 1;
                next += -(1.0 - rng.next_f64()).ln() / rate;
            }
        }
    });
    let wall_s = start.elapsed().as_secs_f64();
    let records = Arc::try_unwrap(records).expect("threads joined").into_inner().unwrap();
    summarize(policy, records, wall_s)
}

fn summarize(policy: Policy, records: Vec<SessionRecord>, wall_s: f64) -> PolicyReport {
    let served: Vec<&SessionRecord> = records.iter().filter(|r| !r.refused && r.failed.is_none()).collect();
    let ttft: Vec<f64> = served.iter().map(|r| r.ttft_ms).collect();
    let tpot: Vec<f64> = served.iter().map(|r| r.tpot_ms).collect();
    let (drafted, accepted, rounds) = served.iter().fold((0, 0, 0), |a, r| (a.0 + r.drafted, a.1 + r.accepted, a.2 + r.rounds));
    let tokens: usize = served.iter().map(|r| r.tokens).sum();
    let good: usize = served.iter().filter(|r| r.slo_met).map(|r| r.tokens).sum();
    PolicyReport {
        policy,
        sessions: records.len(),
        refused: records.iter().filter(|r| r.refused).count(),
        failed: records.iter().filter(|r| r.failed.is_some()).count(),
        mismatched: records.iter().filter(|r| r.mismatch).count(),
        slo_attainment: served.iter().filter(|r| r.slo_met).count() as f64 / records.len().max(1) as f64,
        goodput_tok_s: good as f64 / wall_s,
        throughput_tok_s: tokens as f64 / wall_s,
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        tpot_p50_ms: percentile(&tpot, 0.5),
        tpot_p99_ms: percentile(&tpot, 0.99),
        acceptance: if drafted == 0 { 0.0 } else { accepted as f64 / drafted as f64 },
        tokens_per_round: if rounds == 0 { 0.0 } else { (accepted + rounds) as f64 / rounds as f64 },
        wasted_draft_ms_per_session: served.iter().map(|r| r.wasted_draft_ms).sum::<f64>() / served.len().max(1) as f64,
        wall_s,
        capacity: None,
        records,
    }
}

/// Doubling from the configured load until attainment drops below 90 %,
/// then bisection between the last load that held and the first that did
/// not (to one device, or 10 % of the rate).
fn search_capacity(policy: Policy, cfg: &LiveConfig, url: &str, model: &LoadedModel, profiles: &[DeviceProfile], prompts: &[BenchPrompt]) -> Capacity {
    let closed = matches!(cfg.workload, Workload::Closed { .. });
    let mut probes = Vec::new();
    let mut probe = |load: f64| {
        let c = LiveConfig { workload: cfg.workload.with_load(load), ..cfg.clone() };
        let r = run_policy(policy, &c, url, model, profiles, prompts);
        eprintln!("live: {} capacity probe at {load:.2}: {:.0} % met SLO", policy.name(), r.slo_attainment * 100.0);
        probes.push(Probe { load, slo_attainment: r.slo_attainment, goodput_tok_s: r.goodput_tok_s });
        r.slo_attainment >= CAPACITY_ATTAINMENT
    };
    let (mut good, mut bad) = (0.0, cfg.workload.load());
    // Ten doublings at most: 1 → 1024 devices.
    for _ in 0..10 {
        if !probe(bad) {
            break;
        }
        good = bad;
        bad *= 2.0;
    }
    let resolution = if closed { 1.0 } else { 0.1 * bad };
    let floor = if closed { 1.0 } else { 0.0 };
    while bad - good > resolution && bad - good > 1e-9 {
        let mid = if closed { ((good + bad) / 2.0).floor().max(floor) } else { (good + bad) / 2.0 };
        if mid <= good {
            break;
        }
        if probe(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Capacity { load: good, unit: if closed { "devices" } else { "sessions/s" }.into(), probes }
}

/// Every policy in turn, each on a fresh server (or on `cfg.server`).
pub fn run(cfg: &LiveConfig, model: &LoadedModel, profiles: &[DeviceProfile], prompts: &[BenchPrompt], provenance: &str) -> Result<LiveReport> {
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    let mut reports = Vec::new();
    for &policy in &cfg.policies {
        let server = match &cfg.server {
            Some(_) => None,
            None => Some(ServerProcess::try_start(&["--policy", policy.server_policy()]).context("starting tandem-server")?),
        };
        let url = cfg.server.clone().unwrap_or_else(|| server.as_ref().expect("started").url());
        eprintln!("live: {} against {url} for {:.0} s ...", policy.name(), cfg.duration_s);
        let mut report = run_policy(policy, cfg, &url, model, profiles, prompts);
        if cfg.capacity_search {
            report.capacity = Some(search_capacity(policy, cfg, &url, model, profiles, prompts));
        }
        eprintln!(
            "live: {}: {} sessions, {:.0} % met SLO, goodput {:.1} tok/s",
            policy.name(),
            report.sessions,
            report.slo_attainment * 100.0,
            report.goodput_tok_s
        );
        if let Some(r) = report.records.iter().find(|r| r.failed.is_some()) {
            eprintln!("live: {}: {} sessions failed, first: {}", policy.name(), report.failed, r.failed.as_deref().unwrap_or_default());
        }
        anyhow::ensure!(report.mismatched == 0, "{}: {} outputs differ from the target's own greedy output", policy.name(), report.mismatched);
        reports.push(report);
    }
    let mut ratios = HashMap::new();
    let figures: [(&str, fn(&PolicyReport) -> Option<f64>); 2] =
        [("goodput", |r| Some(r.goodput_tok_s)), ("capacity", |r| r.capacity.as_ref().map(|c| c.load))];
    for (figure, get) in figures {
        let of = |p: Policy| reports.iter().find(|r| r.policy == p).and_then(get);
        let Some(w) = of(Policy::Wisp) else { continue };
        for (base_name, base) in [("centralized", Policy::Centralized), ("sled", Policy::Sled)] {
            if let Some(b) = of(base).filter(|&b| b > 0.0) {
                ratios.insert(format!("{figure}_vs_{base_name}"), w / b);
            }
        }
    }
    let synthetic_drafts = profiles.iter().any(|p| p.draft.starts_with("synthetic"));
    Ok(LiveReport { config: cfg.clone(), profiles: profiles.to_vec(), prompts: provenance.to_string(), synthetic_drafts, policies: reports, ratios })
}

impl LiveReport {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let w = &self.config.workload;
        out.push_str(&format!(
            "live: {w:?}, {:.0} s per policy, {} new tokens, SLO TTFT {} ms / TPOT {} ms; prompts: {}\n",
            self.config.duration_s, self.config.max_new_tokens, self.config.slo_ttft_ms, self.config.slo_tpot_ms, self.prompts
        ));
        for p in &self.profiles {
            out.push_str(&format!(
                "device `{}`: draft {}{}, {} ms/token, RTT {} ± {} ms, {}/{} kbit/s up/down\n",
                p.name,
                p.draft,
                if p.draft.starts_with("synthetic") { " (SYNTHETIC draft)" } else { "" },
                p.draft_ms_per_token,
                p.rtt_ms,
                p.jitter_ms,
                p.uplink_kbps,
                p.downlink_kbps
            ));
        }
        out.push_str("\n| policy | sessions | refused | failed | SLO attainment | goodput tok/s | throughput tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | acceptance | tokens/round | wasted draft ms/session |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.policies {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} % | {:.2} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} % | {:.2} | {:.0} |\n",
                r.policy.name(),
                r.sessions,
                r.refused,
                r.failed,
                r.slo_attainment * 100.0,
                r.goodput_tok_s,
                r.throughput_tok_s,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.tpot_p50_ms,
                r.tpot_p99_ms,
                r.acceptance * 100.0,
                r.tokens_per_round,
                r.wasted_draft_ms_per_session
            ));
        }
        for r in &self.policies {
            if let Some(c) = &r.capacity {
                out.push_str(&format!("\n{} capacity: {} {} (≥ {:.0} % SLO attainment); probes:", r.policy.name(), c.load, c.unit, CAPACITY_ATTAINMENT * 100.0));
                for p in &c.probes {
                    out.push_str(&format!(" {}→{:.0} %", p.load, p.slo_attainment * 100.0));
                }
                out.push('\n');
            }
        }
        let mut ratios: Vec<_> = self.ratios.iter().collect();
        ratios.sort_by(|a, b| a.0.cmp(b.0));
        for (name, v) in ratios {
            out.push_str(&format!("\n{name}: {v:.2}×"));
        }
        out.push('\n');
        out
    }
}
