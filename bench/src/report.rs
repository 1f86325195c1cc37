//! What `live` and `sim` measure, in one shape: per-session records, the
//! per-policy summary computed from them, the capacity search, the WISP
//! ratios, and the report (JSON, Markdown, plots) `tandem-bench report`
//! re-renders.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    pub fn name(self) -> &'static str {
        match self {
            Policy::Centralized => "centralized",
            Policy::Sled => "sled",
            Policy::Wisp => "wisp",
        }
    }

    /// The server's batch scheduler under this policy.
    pub fn server_policy(self) -> &'static str {
        match self {
            Policy::Centralized | Policy::Sled => "fcfs",
            Policy::Wisp => "wisp",
        }
    }
}

/// Parses `--policies`, refusing an empty list.
pub fn parse_policies(names: &[String]) -> Result<Vec<Policy>> {
    let policies = names.iter().map(|p| p.parse()).collect::<Result<Vec<Policy>>>()?;
    anyhow::ensure!(!policies.is_empty(), "`--policies` is empty");
    Ok(policies)
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
    /// The edge handed the rest of the session to the server to decode.
    #[serde(default)]
    pub handed_off: bool,
    /// Times the server handed the session back to be drafted again (each
    /// after a hand-off; reports before stop 51 kept only whether it did).
    #[serde(default)]
    pub hand_backs: usize,
    pub slo_met: bool,
    /// The output differs from the target's own greedy output (a bug).
    pub mismatch: bool,
    /// When its last token arrived, seconds from the start of the run (0
    /// in reports written before it was kept).
    #[serde(default)]
    pub ended_s: f64,
}

impl SessionRecord {
    /// Its tokens that had arrived `t_s` seconds into the run: the first
    /// `tpot × (tokens − 1)` before its end, the rest one a TPOT after it.
    fn tokens_by(&self, t_s: f64) -> f64 {
        let first_s = self.ended_s - self.tpot_ms * self.tokens.saturating_sub(1) as f64 / 1e3;
        if self.tokens == 0 || t_s < first_s {
            0.0
        } else if self.tpot_ms <= 0.0 {
            self.tokens as f64
        } else {
            (1.0 + (t_s - first_s) * 1e3 / self.tpot_ms).min(self.tokens as f64)
        }
    }
}

/// How every report counts goodput and throughput (see [`summarize`]).
pub const GOODPUT_NOTE: &str =
    "goodput and throughput: the tokens that arrived within the load window (the run's duration, while sessions still started), over it; the sessions under way then finish after it, and that drain is not counted";

/// SLO attainment a load must keep to count as within capacity.
pub const CAPACITY_ATTAINMENT: f64 = 0.9;

/// One load tried by the capacity search.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub load: f64,
    pub slo_attainment: f64,
    /// [`PolicyReport::corrected_attainment`] at this load.
    #[serde(default)]
    pub corrected_attainment: Option<f64>,
    pub goodput_tok_s: f64,
}

impl Probe {
    pub fn of(load: f64, r: &PolicyReport) -> Self {
        Probe { load, slo_attainment: r.slo_attainment, corrected_attainment: r.corrected_attainment, goodput_tok_s: r.goodput_tok_s }
    }

    /// Whether this load is within capacity. A closed loop is judged by
    /// [`PolicyReport::corrected_attainment`]: there a device stuck waiting
    /// for its first token opens no other session, so counting sessions
    /// alone lets a server that starves a few devices look as if it served
    /// everyone else's load (coordinated omission). Open-loop arrivals do
    /// not wait for earlier sessions, so each session counts once.
    pub fn holds(&self, closed: bool) -> bool {
        self.judged_attainment(closed) >= CAPACITY_ATTAINMENT
    }

    /// The attainment the capacity search judges a load by.
    pub fn judged_attainment(&self, closed: bool) -> f64 {
        if closed {
            self.corrected_attainment.unwrap_or(self.slo_attainment)
        } else {
            self.slo_attainment
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Capacity {
    /// Largest load found with ≥ 90 % attainment (0: not even the smallest).
    pub load: f64,
    /// `devices` (closed loop) or `sessions/s` (open loop).
    pub unit: String,
    pub probes: Vec<Probe>,
}

impl Capacity {
    /// Searched over devices in a closed loop (else over an arrival rate).
    pub fn closed(&self) -> bool {
        self.unit == "devices"
    }
}

/// Server-side figures a run adds to what the edges saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    /// Mean |predicted − measured| / measured pass time (None: no estimator).
    pub estimator_mape: Option<f64>,
    /// Largest difference in service counters between backlogged tenants.
    pub max_service_gap: Option<f64>,
    /// Forward-pass (verification device) seconds per output token.
    pub verify_s_per_token: Option<f64>,
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
    /// [`Self::slo_attainment`] corrected for coordinated omission: every
    /// wait for a first token beyond the TTFT objective also counts as
    /// the sessions of mean length that would have fitted in it, all
    /// missed. In a closed loop those are the sessions the waiting device
    /// did not open: a device starved for a minute weighs a minute's
    /// sessions. (None in reports written before it was measured.)
    #[serde(default)]
    pub corrected_attainment: Option<f64>,
    /// Tokens per second of sessions that met their objectives, over the
    /// load window (see [`summarize`]).
    pub goodput_tok_s: f64,
    pub throughput_tok_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p99_ms: f64,
    pub acceptance: f64,
    pub tokens_per_round: f64,
    /// Share of the served sessions handed to the server to decode (None
    /// in reports written before hand-offs).
    #[serde(default)]
    pub handed_off: Option<f64>,
    /// Share of the served sessions the server handed back (None in
    /// reports written before hand-backs).
    #[serde(default)]
    pub handed_back: Option<f64>,
    /// Hand-backs per session handed back, on average: how often a
    /// session went between drafting and being decoded (None when none
    /// was, and in reports before stop 51).
    #[serde(default)]
    pub hand_backs_per_session: Option<f64>,
    pub wasted_draft_ms_per_session: f64,
    /// Jain's index of tokens served per device (1: perfectly even).
    #[serde(default)]
    pub jain_index: f64,
    #[serde(default)]
    pub server: ServerFigures,
    /// TTFT and TPOT at percentiles 0, 1, …, 100 (for the CDF plots), ms.
    #[serde(default)]
    pub ttft_cdf_ms: Vec<f64>,
    #[serde(default)]
    pub tpot_cdf_ms: Vec<f64>,
    pub wall_s: f64,
    /// The load of the main run (devices or sessions/s).
    #[serde(default)]
    pub load: f64,
    pub capacity: Option<Capacity>,
    /// Every session (live only: a simulation's would be millions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<SessionRecord>,
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

/// Jain's fairness index (Σx)² / (n·Σx²): 1 when all shares are equal, 1/n
/// when one holder has everything.
pub fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    if shares.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

/// The per-policy summary of a run's sessions, under a TTFT objective of
/// `slo_ttft_ms`. The run lasted `wall_s` seconds; its load was applied
/// for the first `window_s` (devices start sessions, or sessions arrive,
/// until then; the sessions under way finish after it).
///
/// Goodput and throughput count the tokens that arrived within the load
/// window, over the window. Counted over the wall time instead, they
/// weighed how fast the last few sessions finish once the load is gone:
/// with the server decoding whoever it has room for (stop 48), WISP's
/// simulated H100 at 512 devices ended 1.4 s sooner and its goodput read
/// 9 % higher, for about as many tokens within the window (22113 against
/// 22057 tok/s counted there).
pub fn summarize(policy: Policy, records: Vec<SessionRecord>, wall_s: f64, window_s: f64, slo_ttft_ms: f64, server: ServerFigures) -> PolicyReport {
    let served: Vec<&SessionRecord> = records.iter().filter(|r| !r.refused && r.failed.is_none()).collect();
    let ttft: Vec<f64> = served.iter().map(|r| r.ttft_ms).collect();
    let tpot: Vec<f64> = served.iter().map(|r| r.tpot_ms).collect();
    let (drafted, accepted, rounds) = served.iter().fold((0, 0, 0), |a, r| (a.0 + r.drafted, a.1 + r.accepted, a.2 + r.rounds));
    let share = |which: &dyn Fn(&SessionRecord) -> bool| served.iter().filter(|r| which(r)).count() as f64 / served.len().max(1) as f64;
    let tokens: f64 = served.iter().map(|r| r.tokens_by(window_s)).sum();
    let good: f64 = served.iter().filter(|r| r.slo_met).map(|r| r.tokens_by(window_s)).sum();
    let session_ms = |r: &&SessionRecord| r.ttft_ms + r.tpot_ms * r.tokens.saturating_sub(1) as f64;
    let mean_session_ms = served.iter().map(session_ms).sum::<f64>() / served.len().max(1) as f64;
    let unopened: f64 = if mean_session_ms > 0.0 { served.iter().map(|r| (r.ttft_ms - slo_ttft_ms).max(0.0) / mean_session_ms).sum() } else { 0.0 };
    let met = served.iter().filter(|r| r.slo_met).count() as f64;
    let mut per_device: BTreeMap<usize, f64> = BTreeMap::new();
    for r in &records {
        *per_device.entry(r.device).or_default() += r.tokens as f64;
    }
    let cdf = |v: &[f64]| if v.is_empty() { vec![] } else { (0..=100).map(|p| percentile(v, p as f64 / 100.0)).collect() };
    PolicyReport {
        policy,
        sessions: records.len(),
        refused: records.iter().filter(|r| r.refused).count(),
        failed: records.iter().filter(|r| r.failed.is_some()).count(),
        mismatched: records.iter().filter(|r| r.mismatch).count(),
        slo_attainment: met / records.len().max(1) as f64,
        corrected_attainment: Some(met / (records.len() as f64 + unopened).max(1.0)),
        goodput_tok_s: good / window_s,
        throughput_tok_s: tokens / window_s,
        ttft_p50_ms: percentile(&ttft, 0.5),
        ttft_p99_ms: percentile(&ttft, 0.99),
        tpot_p50_ms: percentile(&tpot, 0.5),
        tpot_p99_ms: percentile(&tpot, 0.99),
        acceptance: if drafted == 0 { 0.0 } else { accepted as f64 / drafted as f64 },
        tokens_per_round: if rounds == 0 { 0.0 } else { (accepted + rounds) as f64 / rounds as f64 },
        handed_off: Some(share(&|r| r.handed_off)),
        handed_back: Some(share(&|r| r.hand_backs > 0)),
        hand_backs_per_session: {
            let back = served.iter().filter(|r| r.hand_backs > 0);
            let (sessions, hand_backs) = back.fold((0, 0), |(n, sum), r| (n + 1, sum + r.hand_backs));
            (sessions > 0).then(|| hand_backs as f64 / sessions as f64)
        },
        wasted_draft_ms_per_session: served.iter().map(|r| r.wasted_draft_ms).sum::<f64>() / served.len().max(1) as f64,
        jain_index: jain(&per_device.values().copied().collect::<Vec<_>>()),
        server,
        ttft_cdf_ms: cdf(&ttft),
        tpot_cdf_ms: cdf(&tpot),
        wall_s,
        load: 0.0,
        capacity: None,
        records,
    }
}

/// Doubling from `start` until a load does not hold (see [`Probe::holds`]:
/// 90 % attainment, corrected for coordinated omission when `closed`), then bisection
/// between the last load that held and the first that did not (to one
/// device when `closed`, else to 10 % of the rate). `probe` runs one load.
pub fn search_capacity(start: f64, closed: bool, mut probe: impl FnMut(f64) -> Probe) -> Capacity {
    let mut probes = Vec::new();
    let mut holds = |load: f64| {
        let p = probe(load);
        let ok = p.holds(closed);
        probes.push(p);
        ok
    };
    let (mut good, mut bad) = (0.0, start);
    // Fourteen doublings at most: 1 → 16384 devices.
    for _ in 0..14 {
        if !holds(bad) {
            break;
        }
        good = bad;
        bad *= 2.0;
    }
    let resolution = if closed { 1.0f64.max(0.02 * good) } else { 0.1 * bad };
    let floor = if closed { 1.0 } else { 0.0 };
    while bad - good > resolution && bad - good > 1e-9 {
        let mid = if closed { ((good + bad) / 2.0).floor().max(floor) } else { (good + bad) / 2.0 };
        if mid <= good {
            break;
        }
        if holds(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    probes.sort_by(|a, b| a.load.total_cmp(&b.load));
    Capacity { load: good, unit: if closed { "devices" } else { "sessions/s" }.into(), probes }
}

/// The most goodput a policy gave at any load tried: the main run's, or a
/// capacity probe's. At one low load every policy serves all it is asked
/// (closed-loop goodput is then set by how fast the devices are), so the
/// comparison is of what each sustains at its best.
pub fn peak_goodput(r: &PolicyReport) -> f64 {
    r.capacity.iter().flat_map(|c| c.probes.iter().map(|p| p.goodput_tok_s)).fold(r.goodput_tok_s, f64::max)
}

/// WISP's peak goodput and capacity over each baseline's (when both ran and
/// the baseline's is positive).
pub fn ratios(reports: &[PolicyReport]) -> HashMap<String, f64> {
    let mut ratios = HashMap::new();
    type Figure = fn(&PolicyReport) -> Option<f64>;
    let figures: [(&str, Figure); 2] = [("goodput", |r| Some(peak_goodput(r))), ("capacity", |r| r.capacity.as_ref().map(|c| c.load))];
    for (figure, get) in figures {
        let of = |p: Policy| reports.iter().find(|r| r.policy == p).and_then(get);
        let Some(w) = of(Policy::Wisp) else { continue };
        for base in [Policy::Centralized, Policy::Sled] {
            if let Some(b) = of(base).filter(|&b| b > 0.0) {
                ratios.insert(format!("{figure}_vs_{}", base.name()), w / b);
            }
        }
    }
    ratios
}

/// A whole run of `live` or `sim`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `live` or `sim` (reports from before `sim` existed are live ones).
    #[serde(default = "live_kind")]
    pub kind: String,
    /// What ran, one line each (configuration, devices, calibration).
    #[serde(default)]
    pub header: Vec<String>,
    /// The run's configuration as given.
    pub config: serde_json::Value,
    /// Every synthetic draft is labelled as such.
    pub synthetic_drafts: bool,
    pub policies: Vec<PolicyReport>,
    /// `capacity_vs_centralized`, `capacity_vs_sled`, `goodput_vs_centralized`,
    /// `goodput_vs_sled` (goodput: the peak over the loads tried).
    pub ratios: HashMap<String, f64>,
    /// Where each figure comes from.
    #[serde(default)]
    pub notes: Vec<String>,
}

fn live_kind() -> String {
    "live".into()
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".into(), f)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("\n| policy | sessions | refused | failed | SLO attainment (corrected) | goodput tok/s | throughput tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | acceptance | tokens/round | handed off | wasted draft ms/session | estimator MAPE | Jain (devices) | max service gap | verify s/token |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.policies {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} % ({}) | {:.2} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} % | {:.2} | {} | {:.0} | {} | {:.3} | {} | {} |\n",
                r.policy.name(),
                r.sessions,
                r.refused,
                r.failed,
                r.slo_attainment * 100.0,
                opt(r.corrected_attainment, |v| format!("{:.1} %", v * 100.0)),
                r.goodput_tok_s,
                r.throughput_tok_s,
                r.ttft_p50_ms,
                r.ttft_p99_ms,
                r.tpot_p50_ms,
                r.tpot_p99_ms,
                r.acceptance * 100.0,
                r.tokens_per_round,
                opt(r.handed_off, |v| match (r.handed_back.filter(|b| *b > 0.0), r.hand_backs_per_session) {
                    (Some(b), Some(times)) => format!("{:.0} % ({:.0} % back, {times:.1}× each)", v * 100.0, b * 100.0),
                    (Some(b), None) => format!("{:.0} % ({:.0} % back)", v * 100.0, b * 100.0),
                    (None, _) => format!("{:.0} %", v * 100.0),
                }),
                r.wasted_draft_ms_per_session,
                opt(r.server.estimator_mape, |v| format!("{:.1} %", v * 100.0)),
                r.jain_index,
                opt(r.server.max_service_gap, |v| format!("{v:.0}")),
                opt(r.server.verify_s_per_token, |v| format!("{:.2} ms", v * 1e3)),
            ));
        }
        for r in &self.policies {
            if let Some(c) = &r.capacity {
                // Reports written before the correction was measured lack it.
                let corrected = c.closed() && c.probes.iter().all(|p| p.corrected_attainment.is_some());
                out.push_str(&format!(
                    "\n{} capacity: {} {} (≥ {:.0} % SLO attainment{}), peak goodput {:.1} tok/s; probes:",
                    r.policy.name(),
                    c.load,
                    c.unit,
                    CAPACITY_ATTAINMENT * 100.0,
                    if corrected { ", corrected for coordinated omission" } else { "" },
                    peak_goodput(r)
                ));
                for p in &c.probes {
                    out.push_str(&format!(" {}→{:.0} %", p.load, p.slo_attainment * 100.0));
                    if let Some(v) = p.corrected_attainment.filter(|_| corrected) {
                        out.push_str(&format!(" ({:.0} %)", v * 100.0));
                    }
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
        for n in &self.notes {
            out.push_str(&format!("\n- {n}"));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }

    /// `DIR/report.json`, `DIR/report.md` and the plots.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        crate::plots::render(self, dir)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a tandem-bench report", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_is_one_when_even_and_one_over_n_when_one_takes_all() {
        assert!((jain(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[9.0, 0.0, 0.0]) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn capacity_search_finds_the_threshold_of_a_known_curve() {
        // Attainment falls below 90 % above 37 devices.
        let attainment = |load: f64| if load <= 37.0 { 1.0 } else { 0.5 };
        let cap = search_capacity(2.0, true, |load| Probe {
            load,
            slo_attainment: attainment(load),
            corrected_attainment: Some(attainment(load)),
            goodput_tok_s: load,
        });
        assert_eq!(cap.load, 37.0);
        assert!(cap.probes.windows(2).all(|w| w[0].load <= w[1].load), "probes sorted by load for the plots");
    }

    #[test]
    fn a_closed_loop_is_judged_with_its_unopened_sessions() {
        // Above 20 devices a few starved devices stop opening sessions.
        let probe = |load: f64| Probe { load, slo_attainment: 0.95, corrected_attainment: Some(if load <= 20.0 { 0.95 } else { 0.6 }), goodput_tok_s: load };
        assert_eq!(search_capacity(2.0, true, probe).load, 20.0);
        // Open-loop arrivals do not wait on earlier sessions: sessions count.
        assert!(search_capacity(2.0, false, probe).load > 1000.0);
    }

    #[test]
    fn goodput_counts_the_tokens_that_arrived_within_the_load_window() {
        // 11 tokens at 100 ms each after the first, ending at 12 s: the
        // first at 11 s, six by 11.5 s, all by 12 s.
        let r = SessionRecord { tokens: 11, ttft_ms: 300.0, tpot_ms: 100.0, slo_met: true, ended_s: 12.0, ..Default::default() };
        assert_eq!([10.9, 11.0, 11.5, 12.0, 13.0].map(|t| r.tokens_by(t)), [0.0, 1.0, 6.0, 11.0, 11.0]);
        // A session ending in the drain after a 10 s window counts none of
        // its tokens there, however long the drain lasts; one missing its
        // objective counts towards throughput only.
        let within = SessionRecord { ended_s: 9.0, ..r.clone() };
        let missed = SessionRecord { slo_met: false, ..within.clone() };
        let summary = summarize(Policy::Wisp, vec![within, r, missed], 30.0, 10.0, 1000.0, ServerFigures::default());
        assert_eq!((summary.goodput_tok_s, summary.throughput_tok_s), (1.1, 2.2));
    }

    #[test]
    fn a_wait_past_the_ttft_objective_counts_the_sessions_it_displaced() {
        let session = |ttft_ms: f64, slo_met: bool| SessionRecord { tokens: 101, ttft_ms, tpot_ms: 50.0, slo_met, ..Default::default() };
        // Nine sessions of 5.2 s met; one waited 46.2 s for its first
        // token, 45.2 s past the objective: 45.2 s / 9.8 s (the mean
        // session) more missed sessions.
        let mut records = vec![session(200.0, true); 9];
        records.push(session(46_200.0, false));
        let r = summarize(Policy::Wisp, records, 60.0, 60.0, 1000.0, ServerFigures::default());
        assert!((r.slo_attainment - 0.9).abs() < 1e-12);
        let corrected = r.corrected_attainment.unwrap();
        assert!((corrected - 9.0 / (10.0 + 45.2 / 9.8)).abs() < 1e-9, "{corrected}");
        // A TPOT miss displaces nothing the edge waited for.
        let mut records = vec![session(200.0, true); 9];
        records.push(SessionRecord { tpot_ms: 500.0, ..session(200.0, false) });
        assert_eq!(summarize(Policy::Wisp, records, 60.0, 60.0, 1000.0, ServerFigures::default()).corrected_attainment, Some(0.9));
    }
}
