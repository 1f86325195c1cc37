//! `tandem-bench sim`: discrete-event simulation of many edge devices and
//! one verification server, with the server's own batchers, estimator and
//! counters and the edge's own controller (see `world`), and pass times
//! from a calibration file: one a server measured (`tandem-server
//! --calibration-out`) or a GPU roofline (`roofline`), labelled as such.

mod roofline;
mod world;

pub use roofline::{named as roofline, profile as roofline_profile, Gpu, ModelShape, A100_SXM_80GB, H100_SXM, LLAMA3_8B_BF16, QWEN3_32B_BF16};
pub use world::{Arrivals, EdgeFactory, Outcome, World, WorldConfig};

use crate::live::{self, DeviceProfile, DraftKind, Workload};
use crate::progress;
use crate::prompts::BenchPrompt;
use crate::real_draft::RealDrafts;
use crate::report::{ratios, search_capacity, summarize, Policy, PolicyReport, Probe, Report, ServerFigures};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tandem_edge::controller::SpeculationController;
use tandem_estimators::{VerifyTimeEstimator, VerifyTimeProfile};
use tandem_model::{DraftSource, NgramDraft, SyntheticDraft};
use tandem_server::batcher::Batcher;
use tandem_server::config::BatcherConfig;
use tandem_server::wisp::WispBatcher;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimConfig {
    pub policies: Vec<Policy>,
    pub workload: Workload,
    /// Simulated seconds of load per run (sessions started finish).
    pub duration_s: f64,
    pub max_new_tokens: usize,
    /// Draft length: fixed for sled, the largest for wisp.
    pub draft_len: usize,
    pub slo_ttft_ms: u32,
    pub slo_tpot_ms: u32,
    pub seed: u64,
    /// Devices belong to this many tenants in turn.
    pub tenants: usize,
    /// The server's pass budgets (its defaults unless set).
    pub max_batch_tokens: usize,
    pub max_batch_seqs: usize,
    pub capacity_search: bool,
    /// `wisp` edges may hand their sessions to the server.
    #[serde(default = "live::hand_off_default")]
    pub hand_off: bool,
}

/// Where a calibration comes from: a file, or a named roofline.
pub fn load_calibration(spec: &str) -> Result<VerifyTimeProfile> {
    if let Some(name) = spec.strip_prefix("roofline:") {
        return roofline(name).with_context(|| format!("--calibration {spec}: known rooflines are roofline:h100-llama3-8b and roofline:a100-qwen3-32b"));
    }
    let text =
        std::fs::read_to_string(spec).with_context(|| format!("reading --calibration {spec} (a file, roofline:h100-llama3-8b or roofline:a100-qwen3-32b)"))?;
    serde_json::from_str(&text).with_context(|| format!("--calibration {spec} is not a VerifyTimeProfile (tandem-server --calibration-out writes one)"))
}

/// The edges' draft sources and controllers, as `live` builds them.
pub struct Edges<'a> {
    pub real: Option<&'a RealDrafts>,
    pub hand_off: bool,
}

impl EdgeFactory for Edges<'_> {
    fn draft(&self, profile: &DeviceProfile, prompt: &BenchPrompt) -> Box<dyn DraftSource> {
        // The simulator adds each token's drafting time itself.
        match DraftKind::parse(&profile.draft) {
            Ok(DraftKind::Synthetic { alpha }) => Box::new(SyntheticDraft::new(prompt.reference.clone(), alpha, Duration::ZERO)),
            Ok(DraftKind::Ngram) => Box::new(NgramDraft::new(3)),
            Ok(DraftKind::Real(_)) => Box::new(self.real.expect("real drafts are loaded when a profile asks for them").source(prompt)),
            Err(_) => unreachable!("profiles are validated when loaded"),
        }
    }

    fn controller(&self, policy: Policy, draft_len: usize, slo_tpot_ms: u32) -> Option<SpeculationController> {
        (policy == Policy::Wisp).then(|| live::wisp_controller(draft_len, slo_tpot_ms, self.hand_off))
    }
}

/// Everything a simulation reads besides its configuration.
pub struct SimInputs<'a> {
    pub calibration: &'a VerifyTimeProfile,
    pub profiles: &'a [DeviceProfile],
    pub prompts: &'a [BenchPrompt],
    pub provenance: &'a str,
    pub real: Option<&'a RealDrafts>,
}

/// The server's batcher settings the simulation runs under.
fn batcher_config(cfg: &SimConfig) -> BatcherConfig {
    BatcherConfig { max_batch_tokens: cfg.max_batch_tokens, max_batch_seqs: cfg.max_batch_seqs, ..BatcherConfig::default() }
}

fn batcher(policy: Policy, cfg: &SimConfig, calibration: &VerifyTimeProfile) -> Box<dyn Batcher> {
    let b = batcher_config(cfg);
    match policy.server_policy() {
        "wisp" => Box::new(WispBatcher::with_estimator(b.wisp(), VerifyTimeEstimator::from_calibration(&calibration.calibration, 0.995))),
        _ => Box::new(b.fifo()),
    }
}

/// The world of one run of `policy` at `workload`.
fn world_config<'a>(policy: Policy, cfg: &SimConfig, workload: Workload, inputs: &SimInputs<'a>) -> WorldConfig<'a> {
    let arrivals = match workload {
        Workload::Closed { devices, think_ms } => Arrivals::Closed { devices, think_ms: think_ms as f64 },
        Workload::Open { rate } => Arrivals::Open { rate },
    };
    WorldConfig {
        policy,
        arrivals,
        duration_s: cfg.duration_s,
        max_new_tokens: cfg.max_new_tokens,
        draft_len: cfg.draft_len,
        slo_ttft_ms: cfg.slo_ttft_ms,
        slo_tpot_ms: cfg.slo_tpot_ms,
        seed: cfg.seed,
        tenants: cfg.tenants,
        profiles: inputs.profiles,
        prompts: inputs.prompts,
        pass_times: inputs.calibration,
        limits: batcher_config(cfg).pass_limits(),
    }
}

/// One run of `policy` at `workload`.
pub fn simulate(policy: Policy, cfg: &SimConfig, workload: Workload, inputs: &SimInputs, epoch: Instant) -> PolicyReport {
    let world_cfg = world_config(policy, cfg, workload, inputs);
    let edges = Edges { real: inputs.real, hand_off: cfg.hand_off };
    let out = World::new(world_cfg, batcher(policy, cfg, inputs.calibration), &edges, epoch).run();
    let tokens: usize = out.records.iter().map(|r| r.tokens).sum();
    let figures = ServerFigures {
        estimator_mape: (!out.estimate_errors.is_empty()).then(|| out.estimate_errors.iter().sum::<f64>() / out.estimate_errors.len() as f64),
        max_service_gap: Some(out.max_service_gap),
        verify_s_per_token: (tokens > 0).then(|| out.busy_ms / 1e3 / tokens as f64),
    };
    let mut report = summarize(policy, out.records, out.wall_s, cfg.duration_s, cfg.slo_ttft_ms.into(), figures);
    report.load = workload.load();
    report.records.clear();
    report
}

/// Every policy (in parallel, one thread each), with capacity searches if asked.
pub fn run(cfg: &SimConfig, inputs: &SimInputs, epoch: Instant) -> Result<Report> {
    anyhow::ensure!(!inputs.prompts.is_empty(), "no prompts");
    let closed = matches!(cfg.workload, Workload::Closed { .. });
    let bars = indicatif::MultiProgress::new();
    let reports: Vec<PolicyReport> = std::thread::scope(|s| {
        let handles: Vec<_> = cfg
            .policies
            .iter()
            .map(|&policy| {
                let bar = bars.add(progress::spinner(&format!("sim {}", policy.name())));
                s.spawn(move || {
                    let mut report = simulate(policy, cfg, cfg.workload, inputs, epoch);
                    if cfg.capacity_search {
                        report.capacity = Some(search_capacity(cfg.workload.load(), closed, |load| {
                            let r = simulate(policy, cfg, cfg.workload.with_load(load), inputs, epoch);
                            bar.set_message(format!("sim {}: load {load:.1} → {:.1} % met SLO", policy.name(), r.slo_attainment * 100.0));
                            Probe::of(load, &r)
                        }));
                    }
                    bar.finish_with_message(format!(
                        "sim {}: {:.1} % met SLO, goodput {:.0} tok/s{}",
                        policy.name(),
                        report.slo_attainment * 100.0,
                        report.goodput_tok_s,
                        report.capacity.as_ref().map_or(String::new(), |c| format!(", capacity {} {}", c.load, c.unit))
                    ));
                    report
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a simulation thread panicked")).collect()
    });
    let mut header = vec![
        format!(
            "sim: {:?}, {:.0} s simulated per run, {} new tokens, SLO TTFT {} ms / TPOT {} ms, {} tenants, passes ≤ {} tokens / {} sequences; prompts: {}",
            cfg.workload,
            cfg.duration_s,
            cfg.max_new_tokens,
            cfg.slo_ttft_ms,
            cfg.slo_tpot_ms,
            cfg.tenants,
            cfg.max_batch_tokens,
            cfg.max_batch_seqs,
            inputs.provenance
        ),
        format!("verification-time model: {}", inputs.calibration.label),
    ];
    header.extend(inputs.profiles.iter().map(DeviceProfile::describe));
    Ok(Report {
        kind: "sim".into(),
        header,
        config: serde_json::to_value(cfg)?,
        synthetic_drafts: inputs.profiles.iter().any(|p| p.draft.starts_with("synthetic")),
        ratios: ratios(&reports),
        policies: reports,
        notes: vec![
            format!(
                "simulated, not measured: pass times {}{}; links as in live",
                match (&inputs.calibration.roofline, inputs.calibration.measured) {
                    (Some(_), _) => "from the roofline itself (not measured; the scheduler's estimator starts from its linear fit)",
                    (None, true) => "from the measured calibration's fit times ratios drawn from its residuals",
                    (None, false) => "from the calibration's fit (not measured) times ratios drawn from its residuals",
                },
                if inputs.calibration.idle_penalty.points.is_empty() { "" } else { ", plus its measured penalty for idling before a pass" }
            ),
            "estimator MAPE: the scheduler's estimator against the simulated pass times; service gap: the largest spread of VTC counters (prefill 1, verified position 2) between backlogged tenants; verify s/token: simulated pass seconds per output token".into(),
            crate::report::GOODPUT_NOTE.into(),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_estimators::{IdlePenalty, VerifyTimeCalibration};

    /// A pass cost of `coefficients` (pass, sequence, token, token×context,
    /// scored; ms), ±10 % residuals.
    fn profile(label: &str, coefficients: [f64; 5]) -> VerifyTimeProfile {
        VerifyTimeProfile {
            label: label.into(),
            measured: false,
            calibration: VerifyTimeCalibration {
                coefficients,
                quantile: 0.9,
                residual_ratios: vec![0.9, 0.95, 1.0, 1.05, 1.1],
                gram: [[0.0; 5]; 5],
                moment: [0.0; 5],
            },
            idle_penalty: Default::default(),
            roofline: None,
            measured_on: None,
        }
    }

    /// A CPU-like pass cost: 9 ms + 4 ms per token (what this machine's
    /// server measures for the default model).
    fn cpu_like() -> VerifyTimeProfile {
        profile("test: CPU-like", [9.0, 0.0, 4.0, 0.05, 0.0])
    }

    /// A GPU-like pass cost, nearly flat in its tokens: 5 ms + 0.01 ms per
    /// sequence + 0.003 ms per token.
    fn gpu_like() -> VerifyTimeProfile {
        profile("test: GPU-like", [5.0, 0.01, 0.003, 0.0, 0.0])
    }

    /// Prompts of made-up tokens: the simulator only compares drafts with
    /// the reference, so any tokens do.
    fn prompts(output: usize) -> Vec<BenchPrompt> {
        (0..6)
            .map(|i| {
                let prompt: Vec<u32> = (0..20 + 10 * i).map(|t| 100 + t as u32).collect();
                let reference = prompt.iter().copied().chain((0..output).map(|t| 5000 + (t * 7 + i) as u32)).collect();
                BenchPrompt { id: format!("p{i}"), tokens: prompt, reference }
            })
            .collect()
    }

    fn config(devices: usize, tpot_ms: u32) -> SimConfig {
        SimConfig {
            policies: vec![Policy::Centralized, Policy::Sled, Policy::Wisp],
            workload: Workload::Closed { devices, think_ms: 0 },
            duration_s: 20.0,
            max_new_tokens: 24,
            draft_len: 4,
            slo_ttft_ms: 3000,
            slo_tpot_ms: tpot_ms,
            seed: 7,
            tenants: 2,
            max_batch_tokens: 256,
            max_batch_seqs: 32,
            capacity_search: false,
            hand_off: true,
        }
    }

    fn run_one(policy: Policy, cfg: &SimConfig) -> PolicyReport {
        run_on(policy, cfg, &cpu_like())
    }

    fn run_on(policy: Policy, cfg: &SimConfig, calibration: &VerifyTimeProfile) -> PolicyReport {
        let prompts = prompts(cfg.max_new_tokens);
        let profiles = [DeviceProfile::laptop()];
        let inputs = SimInputs { calibration, profiles: &profiles, prompts: &prompts, provenance: "test", real: None };
        let epoch = Instant::now();
        let world = world_config(policy, cfg, cfg.workload, &inputs);
        let edges = Edges { real: None, hand_off: true };
        let out = World::new(world, batcher(policy, cfg, calibration), &edges, epoch).run();
        // Conservation: every session ends with its whole output, made of
        // the prefill's first token plus each round's accepted drafts and
        // one more token, and after a hand-off the server's decode steps.
        for r in out.records.iter().filter(|r| !r.refused) {
            let p = prompts.iter().find(|p| p.id == r.prompt).expect("known prompt");
            assert_eq!(r.tokens, p.reference.len() - p.tokens.len(), "{policy:?}: a session ended early");
            if policy != Policy::Centralized {
                let from_rounds = 1 + r.rounds + r.accepted;
                match r.handed_off {
                    true => assert!(from_rounds < r.tokens, "{policy:?}: a handed-off session was not decoded"),
                    false => assert_eq!(r.tokens, from_rounds, "{policy:?}: tokens not conserved"),
                }
                assert!(r.accepted <= r.drafted);
            }
            assert!(r.ttft_ms > 0.0 && r.tpot_ms >= 0.0);
        }
        // Busy time fits in the run and each device ran sessions back to back.
        assert!(out.busy_ms <= out.wall_s * 1e3 + 1e-6, "the server was busy longer than the run");
        let report = simulate(policy, cfg, cfg.workload, &inputs, epoch);
        assert!((0.0..=1.0).contains(&report.slo_attainment));
        assert_eq!(report.sessions, out.records.len(), "simulate and World agree");
        report
    }

    /// Mean simulated pass, ms, of one device's sessions under `policy`.
    fn mean_pass_ms(policy: Policy, calibration: &VerifyTimeProfile) -> f64 {
        let cfg = config(1, 300);
        let prompts = prompts(cfg.max_new_tokens);
        let profiles = [DeviceProfile::laptop()];
        let inputs = SimInputs { calibration, profiles: &profiles, prompts: &prompts, provenance: "test", real: None };
        let edges = Edges { real: None, hand_off: false };
        let out = World::new(world_config(policy, &cfg, cfg.workload, &inputs), batcher(policy, &cfg, calibration), &edges, Instant::now()).run();
        out.busy_ms / out.passes as f64
    }

    #[test]
    fn a_pass_after_idle_pays_the_idle_penalty() {
        let idling = VerifyTimeProfile { idle_penalty: IdlePenalty { points: vec![(8.0, 2.0), (32.0, 5.0)] }, ..cpu_like() };
        // SLED's server waits a round trip and the drafting (over 50 ms)
        // before every pass; centralized decoding runs its steps back to
        // back and idles only between sessions.
        let sled = mean_pass_ms(Policy::Sled, &idling) - mean_pass_ms(Policy::Sled, &cpu_like());
        assert!((4.0..=5.5).contains(&sled), "SLED's passes: {sled:.2} ms more");
        let centralized = mean_pass_ms(Policy::Centralized, &idling) - mean_pass_ms(Policy::Centralized, &cpu_like());
        assert!((0.0..0.5).contains(&centralized), "centralized decoding's passes: {centralized:.2} ms more");
    }

    #[test]
    fn a_computed_profile_times_passes_by_its_roofline_not_its_fit() {
        // A fit that says 1 ms a pass, beside the H100 roofline it
        // (deliberately wrongly) stands for: 16 GB of weights at 3.35 TB/s
        // is 4.8 ms whatever one device's pass holds.
        let fitted = profile("test: 1 ms", [1.0, 0.0, 0.0, 0.0, 0.0]);
        let computed = VerifyTimeProfile { roofline: Some(roofline::roofline(&H100_SXM, &LLAMA3_8B_BF16)), ..fitted.clone() };
        for policy in [Policy::Centralized, Policy::Sled] {
            let by_fit = mean_pass_ms(policy, &fitted);
            assert!((0.9..1.1).contains(&by_fit), "{policy:?} by the fit: {by_fit:.3} ms");
            let by_roofline = mean_pass_ms(policy, &computed);
            assert!((4.79..4.9).contains(&by_roofline), "{policy:?} by the roofline: {by_roofline:.3} ms");
        }
    }

    #[test]
    fn sim_conserves_tokens_and_is_deterministic_for_a_seed() {
        let cfg = config(4, 300);
        for policy in [Policy::Centralized, Policy::Sled, Policy::Wisp] {
            let a = run_one(policy, &cfg);
            let b = run_one(policy, &cfg);
            assert!(a.sessions > 10, "{policy:?}: only {} sessions", a.sessions);
            // On a CPU every verified position costs compute: wisp's
            // server asks its sessions to hand off (SLED's has no estimator).
            let handed_off = a.handed_off.unwrap_or(0.0);
            assert!((handed_off > 0.5) == (policy == Policy::Wisp), "{policy:?}: {:.0} % handed off", handed_off * 100.0);
            assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap(), "{policy:?}: two runs with one seed differ");
        }
        let other = run_one(Policy::Wisp, &SimConfig { seed: 8, ..cfg.clone() });
        assert_ne!(serde_json::to_string(&other).unwrap(), serde_json::to_string(&run_one(Policy::Wisp, &cfg)).unwrap(), "the seed is used");
    }

    #[test]
    fn wisp_refuses_opens_past_its_slo_capacity_and_keeps_the_admitted_on_time() {
        // Open loop, arrivals past what the CPU-like server can serve (fcfs
        // meets the SLO for about two sessions in five): the wisp server's
        // admission gate refuses some (fcfs has none), and the ones it
        // admits are served on time.
        let cfg = SimConfig { workload: Workload::Open { rate: 8.0 }, duration_s: 5.0, ..config(0, 300) };
        let sled = run_one(Policy::Sled, &cfg);
        let wisp = run_one(Policy::Wisp, &cfg);
        assert_eq!(sled.refused, 0);
        assert!(wisp.refused > 0, "nothing refused at {} sessions", wisp.sessions);
        // Attainment counts refused sessions as misses.
        let of_admitted = wisp.slo_attainment * wisp.sessions as f64 / (wisp.sessions - wisp.refused) as f64;
        assert!(of_admitted >= 0.9, "admitted sessions met their SLO {of_admitted:.3} of the time");
    }

    #[test]
    fn sessions_handed_off_go_back_to_drafting_where_drafts_pay() {
        // On a GPU-like server, drafts cost less per token than decode
        // steps. Sessions arriving while it is nearly idle hand off; as
        // arrivals pile up, their decode steps slow to their objective's
        // pace, behind what their drafts gave them, and the server hands
        // them back (`run_on` checks that their tokens add up).
        let cfg = SimConfig { policies: vec![Policy::Wisp], workload: Workload::Open { rate: 200.0 }, duration_s: 2.0, max_new_tokens: 256, ..config(0, 100) };
        let wisp = run_on(Policy::Wisp, &cfg, &gpu_like());
        let (handed_off, handed_back) = (wisp.handed_off.unwrap_or(0.0), wisp.handed_back.unwrap_or(0.0));
        assert!(handed_back > 0.0 && handed_back < handed_off, "{:.1} % handed off, {:.1} % back", handed_off * 100.0, handed_back * 100.0);
        // Each hand-back is counted: at least one for every session handed back.
        assert!(wisp.hand_backs_per_session.is_some_and(|n| n >= 1.0), "{:?} hand-backs each", wisp.hand_backs_per_session);
        assert!(wisp.slo_attainment >= 0.99, "attainment {:.3}", wisp.slo_attainment);
    }

    #[test]
    fn wisp_keeps_more_sessions_within_slo_than_fcfs_when_overloaded() {
        // Far more devices than the CPU-like server can serve at 150 ms TPOT.
        let cfg = config(12, 150);
        let sled = run_one(Policy::Sled, &cfg);
        let wisp = run_one(Policy::Wisp, &cfg);
        assert!(sled.slo_attainment < 0.9, "the configuration must overload fcfs ({:.2})", sled.slo_attainment);
        assert!(wisp.slo_attainment > sled.slo_attainment, "wisp {:.3} ≤ sled {:.3}", wisp.slo_attainment, sled.slo_attainment);
    }
}
