//! Speculation controller (DESIGN.md): how many tokens to draft each round.
//! Pure logic — measurements are passed in — so the bench simulator reuses it.
//!
//! * Stop rule inside a round: a rejection predictor (logistic regression on
//!   cheap features of the draft distribution, weights in JSON) stops when
//!   the cumulative P(some rejection) = 1 − Π(1 − p_j) passes τ; without a
//!   trained file, a confidence threshold on the draft's top-1 probability.
//! * Cost-aware k_max: the draft length maximising expected tokens per unit
//!   of wall time, E[tokens](k) / (k·t_draft + RTT + T_verify(k)).
//! * With a TPOT objective, SLO-aware k_max instead: of the draft lengths
//!   whose expected pace (drafting, round trip, measured server wait and
//!   verification per expected token) keeps a margin under the objective,
//!   the one nearest the server's suggested k (the least server time per
//!   token). A device that meets its objective anyway then drafts as the
//!   server's costs prefer: long rounds where a pass costs its weight read
//!   (each round takes one sequence slot of a pass, so longer rounds leave
//!   room for more devices), short ones where every rejected draft costs
//!   compute. The speed-optimal k only where the objective needs it.
//! * Hand-off: where the server would rather decode the session itself
//!   (suggested k 0, round after round) and its passes keep the objective,
//!   the edge stops drafting and the server decodes the rest.

use serde::{Deserialize, Serialize};
use tandem_model::DraftFeatures;

const N_FEATURES: usize = 5;

fn feature_vector(f: &DraftFeatures) -> [f64; N_FEATURES] {
    [f.top1 as f64, f.entropy as f64, f.margin as f64, f.spread as f64, f.position as f64]
}

/// Logistic regression P(reject | features), on standardised features.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RejectionPredictor {
    pub mean: [f64; N_FEATURES],
    pub std: [f64; N_FEATURES],
    pub weights: [f64; N_FEATURES],
    pub bias: f64,
}

/// How well a predictor separates accepted from rejected draft tokens.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PredictorQuality {
    pub samples: usize,
    /// Of the tokens predicted rejected, the fraction that were.
    pub precision: f64,
    /// Of the rejected tokens, the fraction predicted.
    pub recall: f64,
    /// Of the accepted tokens, the fraction predicted rejected (each would
    /// have stopped drafting too early).
    pub false_stop_rate: f64,
}

impl RejectionPredictor {
    pub fn p_reject(&self, f: &DraftFeatures) -> f64 {
        let x = feature_vector(f);
        let z = self.bias + (0..N_FEATURES).map(|i| self.weights[i] * (x[i] - self.mean[i]) / self.std[i]).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }

    /// Fits by full-batch gradient descent on the log loss (light L2).
    /// `samples` are (features, accepted?).
    pub fn train(samples: &[(DraftFeatures, bool)], epochs: usize) -> Self {
        let n = samples.len().max(1) as f64;
        let xs: Vec<[f64; N_FEATURES]> = samples.iter().map(|(f, _)| feature_vector(f)).collect();
        let mut mean = [0.0; N_FEATURES];
        let mut std = [0.0; N_FEATURES];
        for x in &xs {
            for i in 0..N_FEATURES {
                mean[i] += x[i] / n;
            }
        }
        for x in &xs {
            for i in 0..N_FEATURES {
                std[i] += (x[i] - mean[i]).powi(2) / n;
            }
        }
        let std = std.map(|v| v.sqrt().max(1e-6));
        let mut model = RejectionPredictor { mean, std, weights: [0.0; N_FEATURES], bias: 0.0 };
        let lr = 0.5;
        for _ in 0..epochs {
            let mut grad = [0.0; N_FEATURES];
            let mut grad_b = 0.0;
            for ((f, accepted), x) in samples.iter().zip(&xs) {
                let err = model.p_reject(f) - if *accepted { 0.0 } else { 1.0 };
                for i in 0..N_FEATURES {
                    grad[i] += err * (x[i] - mean[i]) / std[i] / n;
                }
                grad_b += err / n;
            }
            for (w, g) in model.weights.iter_mut().zip(grad) {
                *w -= lr * (g + 1e-4 * *w);
            }
            model.bias -= lr * grad_b;
        }
        model
    }

    pub fn evaluate(&self, samples: &[(DraftFeatures, bool)], threshold: f64) -> PredictorQuality {
        let (mut tp, mut fp, mut fn_, mut tn) = (0usize, 0usize, 0usize, 0usize);
        for (f, accepted) in samples {
            match (self.p_reject(f) >= threshold, *accepted) {
                (true, false) => tp += 1,
                (true, true) => fp += 1,
                (false, false) => fn_ += 1,
                (false, true) => tn += 1,
            }
        }
        let ratio = |a: usize, b: usize| if a + b == 0 { 0.0 } else { a as f64 / (a + b) as f64 };
        PredictorQuality { samples: samples.len(), precision: ratio(tp, fp), recall: ratio(tp, fn_), false_stop_rate: ratio(fp, tn) }
    }
}

/// When to stop drafting inside a round.
#[derive(Clone, Debug)]
pub enum StopRule {
    /// Always draft k tokens.
    Fixed,
    /// Stop after a token whose draft probability is below `min_top1`.
    Confidence { min_top1: f32 },
    /// Stop once 1 − Π(1 − P(reject)) passes `tau`.
    Predictor { model: RejectionPredictor, tau: f64 },
}

/// Expected tokens a round of k drafts emits at per-token acceptance α.
pub fn expected_tokens(alpha: f64, k: usize) -> f64 {
    (0..=k).map(|j| alpha.powi(j as i32)).sum()
}

/// The k in 0..=k_max with the most expected tokens per ms of wall time.
pub fn best_k(alpha: f64, t_draft_ms: f64, rtt_ms: f64, verify_ms: impl Fn(usize) -> f64, k_max: usize) -> usize {
    (0..=k_max)
        .map(|k| (k, expected_tokens(alpha, k) / (k as f64 * t_draft_ms + rtt_ms + verify_ms(k)).max(1e-9)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0, |(k, _)| k)
}

/// What the server said for the next round (remote targets; empty locally).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundHints {
    /// Estimated verification time for k = 1..8, ms.
    pub verify_ms_by_k: Vec<f32>,
    /// The draft length with the least server time per expected token
    /// (0: a decode step on the server).
    pub suggested_k: Option<usize>,
    /// How long the server's passes take lately, ms: the pace of a
    /// session it decodes.
    pub pass_ms: Option<f64>,
}

/// Share of the TPOT objective a round's expected pace may use (the rest
/// absorbs queueing jitter).
const TPOT_MARGIN: f64 = 0.8;
/// A draft position is worth sending only if it is accepted with at least
/// this probability (α^k): beyond it, drafting is mostly wasted.
const MIN_USEFUL: f64 = 0.1;

/// With a TPOT objective: of the k whose expected pace — drafting,
/// `fixed_ms` (round trip and server wait) and verification per expected
/// token — stays within TPOT_MARGIN of the objective (and, past the
/// fastest k, whose last draft is used with probability ≥ MIN_USEFUL), the
/// one nearest `preferred` (the server's suggestion: the least server time
/// per token); the fastest k when none keeps the pace.
pub fn slo_k(alpha: f64, t_draft_ms: f64, fixed_ms: f64, verify_ms: impl Fn(usize) -> f64, k_max: usize, tpot_ms: f64, preferred: usize) -> usize {
    let fastest = best_k(alpha, t_draft_ms, fixed_ms, &verify_ms, k_max);
    let pace = |k: usize| (k as f64 * t_draft_ms + fixed_ms + verify_ms(k)) / expected_tokens(alpha, k);
    let keeps_pace = |k: usize| pace(k) <= TPOT_MARGIN * tpot_ms && (k <= fastest || alpha.powi(k as i32) >= MIN_USEFUL);
    (0..=k_max).filter(|&k| keeps_pace(k)).min_by_key(|&k| k.abs_diff(preferred)).unwrap_or(fastest)
}

/// Rounds in a row the server must suggest decoding on its side before a
/// session hands off: a hand-off is for the rest of the session, and a
/// burst that fills passes for a moment makes them compute-bound for a
/// moment (measured in the simulator's H100 case with Poisson arrivals:
/// with one round, 1 % of sessions handed off in bursts, and attainment
/// at 512 sessions/s fell from 91.2 to 89.8 %).
const HANDOFF_ROUNDS: usize = 3;

/// Exponentially weighted mean.
#[derive(Clone, Copy, Debug)]
struct Ewma {
    value: Option<f64>,
    weight: f64,
}

impl Ewma {
    fn add(&mut self, x: f64) {
        self.value = Some(self.value.map_or(x, |v| v + self.weight * (x - v)));
    }
    fn get(&self, default: f64) -> f64 {
        self.value.unwrap_or(default)
    }
}

/// Per-position acceptance α of the geometric model, estimated as the
/// maximum-likelihood ratio over recent rounds: accepted positions over
/// judged ones (a round judges its accepted prefix and, if it stopped
/// short, the first rejection), both decayed by a factor a round and
/// started from a prior.
///
/// Why a ratio of sums and not an average of each round's ratio: the
/// average weighs a round that judged one position like one that judged
/// five, and reads low: at α = 0.8 and four drafts it comes to about 0.65.
/// Taken from the first round alone, one rejected first draft would put α
/// at 0 and hold k at its minimum for many rounds.
#[derive(Clone, Copy, Debug)]
struct AcceptanceRate {
    accepted: f64,
    judged: f64,
}

impl AcceptanceRate {
    /// The prior: α = 0.5, worth two judged positions.
    const PRIOR: AcceptanceRate = AcceptanceRate { accepted: 1.0, judged: 2.0 };
    /// What a round's evidence keeps of its weight per later round (a
    /// memory of about ten rounds, as the other measurements have).
    const DECAY: f64 = 0.9;

    fn observe(&mut self, drafted: usize, accepted: usize) {
        let judged = (accepted + 1).min(drafted);
        self.accepted = Self::DECAY * self.accepted + accepted as f64;
        self.judged = Self::DECAY * self.judged + judged as f64;
    }

    fn get(&self) -> f64 {
        self.accepted / self.judged
    }
}

/// Per-round decisions and what they are based on.
pub struct SpeculationController {
    rule: StopRule,
    k_max: usize,
    /// Choose k per round from measured costs (else always k_max).
    adaptive: bool,
    alpha: AcceptanceRate,
    t_draft_ms: Ewma,
    rtt_ms: Ewma,
    /// Verification time by k (index k), from the server's hints or measured.
    verify_ms: Vec<Option<f64>>,
    /// Measured server time of a round beyond its verification estimate
    /// (queueing), ms.
    wait_ms: Ewma,
    /// The session's TPOT objective, ms.
    tpot_ms: Option<f64>,
    /// The server's suggested draft length.
    suggested_k: Option<usize>,
    /// The server's recent pass time, ms.
    pass_ms: Option<f64>,
    /// Rounds in a row the server suggested decoding on its side.
    decode_suggested: usize,
    /// Whether the session may be handed to the server.
    hand_off_allowed: bool,
    keep_prob: f64,
}

impl SpeculationController {
    pub fn new(rule: StopRule, k_max: usize, adaptive: bool) -> Self {
        SpeculationController {
            rule,
            k_max,
            adaptive,
            alpha: AcceptanceRate::PRIOR,
            t_draft_ms: Ewma { value: None, weight: 0.2 },
            rtt_ms: Ewma { value: None, weight: 0.2 },
            verify_ms: vec![None; k_max + 1],
            wait_ms: Ewma { value: None, weight: 0.2 },
            tpot_ms: None,
            suggested_k: None,
            pass_ms: None,
            decode_suggested: 0,
            hand_off_allowed: true,
            keep_prob: 1.0,
        }
    }

    /// Chooses k against this TPOT objective (ms; none: for speed alone).
    pub fn with_tpot_objective(mut self, tpot_ms: Option<f64>) -> Self {
        self.tpot_ms = tpot_ms.filter(|t| *t > 0.0);
        self
    }

    /// Whether the session may be handed to the server to decode (see
    /// [`Self::hand_off`]; on by default).
    pub fn with_hand_off(mut self, allowed: bool) -> Self {
        self.hand_off_allowed = allowed;
        self
    }

    /// Drafts to aim for this round.
    pub fn round_k(&self) -> usize {
        if !self.adaptive {
            return self.k_max;
        }
        let known = |k: usize| self.verify_ms.get(k).copied().flatten();
        // Unmeasured lengths: interpolate from the nearest measured one.
        let verify = |k: usize| {
            known(k).or_else(|| (0..=self.k_max).filter_map(|j| known(j).map(|v| (j.abs_diff(k), v))).min_by_key(|p| p.0).map(|p| p.1)).unwrap_or(10.0)
        };
        let (alpha, t_draft, rtt) = (self.alpha.get(), self.t_draft_ms.get(5.0), self.rtt_ms.get(1.0));
        let k = match self.tpot_ms {
            // A suggestion of 0 (decode on the server) is read by
            // `hand_off`; while drafting, the nearest is one draft.
            Some(tpot) => slo_k(alpha, t_draft, rtt + self.wait_ms.get(0.0), verify, self.k_max, tpot, self.suggested_k.map_or(self.k_max, |k| k.max(1))),
            None => best_k(alpha, t_draft, rtt, verify, self.k_max),
        };
        // At least one draft: a round without drafts measures no acceptance,
        // so a device that once saw a bad streak would never find out that
        // its draft does better (measured: simulated phones stuck at k = 0
        // for most of their rounds).
        k.clamp(1.min(self.k_max), self.k_max)
    }

    /// Whether to hand the rest of the session to the server, to decode it
    /// there: when the server suggests k = 0 (a decode step costs it less
    /// per token than any round of drafts, its passes being compute-bound;
    /// or it has room to decode every session and its passes beat this
    /// session's rounds) three rounds in a row, and its
    /// passes keep the TPOT objective's pace (a session the server decodes
    /// gains a token a pass, with no round trip and no drafting). Only
    /// with an objective: a session drafting for speed alone weighs no
    /// server costs, and a shared server is where objectives are set.
    ///
    /// Not done: handing off whenever no draft length keeps the pace (a
    /// phone on a loaded server). Measured in the simulator, it cut the
    /// H100 case's capacity from 1712 devices to 1040: on a server bound
    /// by sequence slots, a decoded session takes a slot a token.
    pub fn hand_off(&self) -> bool {
        let (Some(tpot), Some(pass_ms)) = (self.tpot_ms, self.pass_ms) else { return false };
        self.adaptive && self.hand_off_allowed && self.decode_suggested >= HANDOFF_ROUNDS && pass_ms <= TPOT_MARGIN * tpot
    }

    /// The server handed the session back (its room to decode is gone, or
    /// the session got its tokens more slowly decoded than drafting): the
    /// server's suggestion to decode is void, and a new hand-off needs
    /// `HANDOFF_ROUNDS` new ones.
    pub fn handed_back(&mut self) {
        self.decode_suggested = 0;
        self.suggested_k = None;
    }

    /// Whether drafting ahead while `in_flight` drafts are verified is
    /// likely to pay: the work is kept only if every one of them is
    /// accepted, so it is done when that has a fair chance (α^n ≥ 1/4, α
    /// the measured per-position acceptance). Otherwise it would only burn
    /// the device's cores (and, where the server shares them, the server's).
    pub fn worth_drafting_ahead(&self, in_flight: usize) -> bool {
        self.alpha.get().powi(in_flight as i32) >= 0.25
    }

    pub fn begin_round(&mut self) {
        self.keep_prob = 1.0;
    }

    /// Called after each drafted token: whether to draft another. Copied
    /// tokens (prompt lookup) cost no drafting and carry nothing about the
    /// model's confidence: the rule judges the model's tokens only.
    pub fn keep_going(&mut self, f: &DraftFeatures) -> bool {
        if f.copied {
            return true;
        }
        match &self.rule {
            StopRule::Fixed => true,
            StopRule::Confidence { min_top1 } => f.top1 >= *min_top1,
            StopRule::Predictor { model, tau } => {
                self.keep_prob *= 1.0 - model.p_reject(f);
                1.0 - self.keep_prob <= *tau
            }
        }
    }

    /// Learns from a finished round.
    pub fn end_round(&mut self, drafted: usize, accepted: usize, draft_ms_per_token: Option<f64>, rtt_ms: f64, verify_ms: f64, hints: &RoundHints) {
        let hinted_verify_ms = &hints.verify_ms_by_k;
        if hints.suggested_k.is_some() {
            self.suggested_k = hints.suggested_k;
            self.decode_suggested = if hints.suggested_k == Some(0) { self.decode_suggested + 1 } else { 0 };
        }
        if hints.pass_ms.is_some() {
            self.pass_ms = hints.pass_ms;
        }
        if drafted > 0 {
            self.alpha.observe(drafted, accepted);
        }
        if let Some(t) = draft_ms_per_token {
            self.t_draft_ms.add(t);
        }
        self.rtt_ms.add(rtt_ms.max(0.0));
        if let Some(hinted) = drafted.checked_sub(1).and_then(|i| hinted_verify_ms.get(i)) {
            self.wait_ms.add((verify_ms - *hinted as f64).max(0.0));
        }
        if let Some(slot) = self.verify_ms.get_mut(drafted) {
            *slot = Some(slot.map_or(verify_ms, |v| v + 0.2 * (verify_ms - v)));
        }
        for (i, &ms) in hinted_verify_ms.iter().enumerate() {
            if let Some(slot) = self.verify_ms.get_mut(i + 1) {
                *slot = Some(ms as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_aware_k_picks_the_analytic_optimum() {
        // Closed form check by brute force over a fine grid of inputs.
        for &(alpha, t, rtt) in &[(0.8, 2.0, 20.0), (0.3, 5.0, 1.0), (0.95, 1.0, 50.0), (0.0, 3.0, 5.0)] {
            let verify = |k: usize| 10.0 + 2.0 * k as f64;
            let k = best_k(alpha, t, rtt, verify, 8);
            let rate = |k: usize| expected_tokens(alpha, k) / (k as f64 * t + rtt + verify(k));
            for other in 0..=8 {
                assert!(rate(k) >= rate(other), "alpha {alpha}: k={k} worse than {other}");
            }
        }
        // Known values: free drafting and verification → longest draft;
        // hopeless drafts → none.
        assert_eq!(best_k(0.9, 0.0, 10.0, |_| 0.0, 8), 8);
        assert_eq!(best_k(0.0, 5.0, 10.0, |k| 10.0 + k as f64, 8), 0);
        assert!((expected_tokens(0.5, 3) - 1.875).abs() < 1e-12);
    }

    fn feat(top1: f32, position: u32) -> DraftFeatures {
        DraftFeatures { top1, entropy: 1.0 - top1, margin: top1 / 2.0, spread: 3.0 * top1, position, copied: false }
    }

    #[test]
    fn predictor_stop_rule_uses_the_cumulative_rejection_probability() {
        let model = RejectionPredictor { mean: [0.0; 5], std: [1.0; 5], weights: [0.0; 5], bias: (0.3f64 / 0.7).ln() };
        // p = 0.3 each: cumulative 0.3, 0.51, 0.657 → stop at the third with τ = 0.6.
        let mut c = SpeculationController::new(StopRule::Predictor { model, tau: 0.6 }, 8, false);
        c.begin_round();
        assert!(c.keep_going(&feat(0.5, 0)));
        assert!(c.keep_going(&feat(0.5, 1)));
        assert!(!c.keep_going(&feat(0.5, 2)));
        c.begin_round();
        assert!(c.keep_going(&feat(0.5, 0)), "each round starts afresh");
        // A copied token (prompt lookup) is not judged and does not count.
        let copy = DraftFeatures { copied: true, ..feat(0.0, 1) };
        assert!(c.keep_going(&copy) && c.keep_going(&feat(0.5, 2)));
        assert!(!c.keep_going(&feat(0.5, 3)));
        let mut conf = SpeculationController::new(StopRule::Confidence { min_top1: 0.4 }, 8, false);
        assert!(conf.keep_going(&feat(0.9, 0)) && !conf.keep_going(&feat(0.2, 1)));
    }

    #[test]
    fn a_trained_predictor_separates_confident_from_unsure_drafts() {
        // Accepted when top1 is high, with a little label noise.
        let samples: Vec<(DraftFeatures, bool)> = (0..400)
            .map(|i| {
                let top1 = (i % 100) as f32 / 100.0;
                (feat(top1, (i % 6) as u32), (top1 > 0.5) ^ (i % 37 == 0))
            })
            .collect();
        let model = RejectionPredictor::train(&samples, 300);
        assert!(model.p_reject(&feat(0.95, 0)) < 0.2 && model.p_reject(&feat(0.05, 0)) > 0.8);
        let q = model.evaluate(&samples, 0.5);
        assert!(q.precision > 0.85 && q.recall > 0.85 && q.false_stop_rate < 0.15, "{q:?}");
        let json = serde_json::to_string(&model).unwrap();
        assert_eq!(serde_json::from_str::<RejectionPredictor>(&json).unwrap().p_reject(&feat(0.3, 1)), model.p_reject(&feat(0.3, 1)));
    }

    #[test]
    fn acceptance_is_accepted_over_judged_positions() {
        // Rounds of four drafts, each accepted with probability 0.8 until
        // the first rejection.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut rate = AcceptanceRate::PRIOR;
        let mut sum = 0.0;
        for round in 0..4000 {
            let accepted = (0..4).take_while(|_| uniform() < 0.8).count();
            rate.observe(4, accepted);
            if round >= 1000 {
                sum += rate.get();
            }
        }
        // The mean of each round's accepted/judged would read about 0.65.
        let mean = sum / 3000.0;
        assert!((mean - 0.8).abs() < 0.02, "mean estimate {mean}");
        // One rejected first draft moves the prior, not to zero.
        let mut first = AcceptanceRate::PRIOR;
        first.observe(4, 0);
        assert!(first.get() > 0.3, "{}", first.get());
    }

    #[test]
    fn drafting_ahead_only_when_a_whole_round_is_likely_accepted() {
        let mut c = SpeculationController::new(StopRule::Fixed, 4, false);
        for _ in 0..50 {
            c.end_round(4, 4, Some(1.0), 10.0, 12.0, &RoundHints::default());
        }
        assert!(c.worth_drafting_ahead(4), "all accepted so far");
        for _ in 0..50 {
            c.end_round(4, 1, Some(1.0), 10.0, 12.0, &RoundHints::default());
        }
        // α = 1/2: a one-draft round is worth it, a four-draft one is not.
        assert!(c.worth_drafting_ahead(1) && !c.worth_drafting_ahead(4));
    }

    #[test]
    fn slo_aware_k_drafts_longer_only_within_the_objective() {
        let verify = |k: usize| 5.0 + 0.1 * k as f64;
        // A fast device (α 0.8, 4 ms a draft, 10 ms round trip): 3 drafts
        // give the most tokens per ms, but it meets 100 ms/token with 8 at
        // half the rounds' share of server slots per token.
        let fastest = best_k(0.8, 4.0, 10.0, verify, 8);
        assert!(fastest < 8);
        // α^k ≥ 0.1 caps it at 10 (0.8^10 = 0.107); k_max 8 caps it first.
        assert_eq!(slo_k(0.8, 4.0, 10.0, verify, 8, 100.0, 8), 8);
        // Where the server finds 2 drafts cheapest per token, 2.
        assert_eq!(slo_k(0.8, 4.0, 10.0, verify, 8, 100.0, 2), 2);
        // A slow device (α 0.5, 20 ms a draft, 60 ms round trip and wait)
        // against 80 ms/token: 2 drafts keep 60 ms/token, 3 would take 67.
        let k = slo_k(0.5, 20.0, 60.0, verify, 8, 80.0, 8);
        let pace = |k: usize| (k as f64 * 20.0 + 60.0 + verify(k)) / expected_tokens(0.5, k);
        assert_eq!(k, 2);
        assert!(pace(2) <= 0.8 * 80.0 && pace(3) > 0.8 * 80.0);
        // Hopeless objective: the fastest k.
        assert_eq!(slo_k(0.5, 20.0, 60.0, verify, 8, 10.0, 8), best_k(0.5, 20.0, 60.0, verify, 8));
        // Unlikely drafts are not sent however loose the objective
        // (0.5^3 ≥ 0.1 > 0.5^4).
        assert_eq!(best_k(0.5, 2.0, 10.0, verify, 8), 2);
        assert_eq!(slo_k(0.5, 2.0, 10.0, verify, 8, 1e6, 8), 3);
    }

    #[test]
    fn hands_off_only_where_the_server_prefers_decoding_and_its_passes_keep_the_pace() {
        let hints = |suggested_k: usize, pass_ms: f64| RoundHints { verify_ms_by_k: vec![30.0; 8], suggested_k: Some(suggested_k), pass_ms: Some(pass_ms) };
        let after = |c: SpeculationController, h: &RoundHints| {
            let mut c = c;
            for _ in 0..HANDOFF_ROUNDS {
                c.end_round(2, 1, Some(5.0), 20.0, 40.0, h);
            }
            c.hand_off()
        };
        let slo = || SpeculationController::new(StopRule::Fixed, 4, true).with_tpot_objective(Some(100.0));
        // Decoding is cheaper for the server and 60 ms passes keep 100 ms
        // a token, round after round.
        assert!(after(slo(), &hints(0, 60.0)));
        // The server still prefers drafts; or its passes are too slow for
        // the objective (80 % of it is the margin); or there is no objective.
        assert!(!after(slo(), &hints(1, 60.0)));
        assert!(!after(slo(), &hints(0, 85.0)));
        assert!(!after(SpeculationController::new(StopRule::Fixed, 4, true), &hints(0, 60.0)));
        assert!(!after(slo().with_hand_off(false), &hints(0, 60.0)));
        // Without the server's hints (a local target), never.
        assert!(!after(slo(), &RoundHints::default()));
        // Not on one round's say (a burst), and only in a row.
        let mut c = slo();
        for suggested in [0, 0, 2, 0, 0] {
            c.end_round(2, 1, Some(5.0), 20.0, 40.0, &hints(suggested, 60.0));
            assert!(!c.hand_off());
        }
        c.end_round(2, 1, Some(5.0), 20.0, 40.0, &hints(0, 60.0));
        assert!(c.hand_off());
    }

    #[test]
    fn adaptive_k_follows_measured_acceptance() {
        let mut c = SpeculationController::new(StopRule::Fixed, 8, true);
        for _ in 0..50 {
            c.end_round(
                4,
                4,
                Some(1.0),
                10.0,
                12.0,
                &RoundHints { verify_ms_by_k: vec![10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0], ..Default::default() },
            );
        }
        let high = c.round_k();
        for _ in 0..80 {
            c.end_round(4, 0, Some(1.0), 10.0, 12.0, &RoundHints::default());
        }
        assert!(high >= 6, "a draft that is always right should draft long, got {high}");
        assert!(c.round_k() <= 1, "a draft that is always wrong should barely draft, got {}", c.round_k());
    }
}
