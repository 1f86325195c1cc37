//! Verification-time estimator: T = c0 + c1·seqs + c2·tokens +
//! c3·Σ(tokens×context) + c4·scored, non-negative coefficients, refitted
//! online by recursive least squares with forgetting; an upper bound T_q
//! from the quantiles of the ratio measured / predicted.
//!
//! `scored` counts the positions whose logits the pass computes
//! (verification and decode positions; a prefill chunk needs none): the
//! head's matmul is about a fifth of a small model's work per token, so a
//! prefill token costs less than a verified one, which a non-negative
//! coefficient per prefill token could not say.
//!
//! Not done, on purpose: scaling predictions by a "pace" (the mean of
//! measured / fitted over the last few batches). On the project's 2-core
//! VM pass times drift in phases of a few batches (consecutive residuals
//! correlate at 0.57) and a pace cut the MAPE from 10 to 9 %, but in
//! interleaved runs of the reliability suite it raised the honest
//! tenant's p99 round beside a junk-drafting one by about a sixth.
//!
//! The recursion keeps the exponentially forgotten normal equations
//! (R = λR + xxᵀ, r = λr + xy) and solves the non-negative least-squares
//! problem on them after each batch by coordinate descent. Clamping the
//! classic covariance-form RLS instead breaks its recursion and diverges.

use quantiles::ckms::CKMS;
use serde::{Deserialize, Serialize};

/// The shape of a candidate batch: what its latency depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchShape {
    pub seqs: usize,
    /// New tokens in the pass (all kinds).
    pub tokens: usize,
    /// Σ over sequences of new tokens × context length (attention work).
    pub token_context: usize,
    /// Of `tokens`, how many are prefill.
    pub prefill_tokens: usize,
}

/// Shapes add up: two batches' work run as one pass.
impl std::ops::Add for BatchShape {
    type Output = BatchShape;

    fn add(self, other: BatchShape) -> BatchShape {
        BatchShape {
            seqs: self.seqs + other.seqs,
            tokens: self.tokens + other.tokens,
            token_context: self.token_context + other.token_context,
            prefill_tokens: self.prefill_tokens + other.prefill_tokens,
        }
    }
}

impl std::iter::Sum for BatchShape {
    fn sum<I: Iterator<Item = BatchShape>>(shapes: I) -> BatchShape {
        shapes.fold(BatchShape::default(), |acc, s| acc + s)
    }
}

impl BatchShape {
    /// One session's verification round alone: `drafts` drafts plus the
    /// last verified token, at `context` positions already cached.
    pub fn verify_round(drafts: usize, context: usize) -> BatchShape {
        let tokens = drafts + 1;
        BatchShape { seqs: 1, tokens, token_context: tokens * (context + tokens), prefill_tokens: 0 }
    }

    /// Positions whose logits the pass computes.
    pub fn scored(&self) -> usize {
        self.tokens.saturating_sub(self.prefill_tokens)
    }

    /// Features, scaled so the coefficients have similar magnitudes.
    fn features(&self) -> [f64; DIM] {
        [1.0, self.seqs as f64, self.tokens as f64, self.token_context as f64 / 1000.0, self.scored() as f64]
    }
}

const DIM: usize = 5;
/// Passes shorter than this weigh in the fit as if they took this long.
const MIN_WEIGHTED_MS: f64 = 0.05;
/// Residual ratios kept to rebuild the quantile sketch as old ones age out.
const WINDOW: usize = 512;

/// What the server measured, for the simulator or a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyTimeCalibration {
    /// c0..c4 in ms (c3 per 1000 token×context, c4 per scored position).
    pub coefficients: [f64; DIM],
    pub quantile: f64,
    /// Recent measured/predicted ratios.
    pub residual_ratios: Vec<f64>,
    /// The forgotten normal equations, so fitting continues where it was.
    pub gram: [[f64; DIM]; DIM],
    pub moment: [f64; DIM],
}

/// A calibration with what it describes: the file `tandem-server
/// --calibration-out` writes and `tandem-bench sim` reads. It holds
/// measured profiles (a server's warm-start sweep) and computed ones (a
/// GPU's roofline), told apart by `measured` and named in `label`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyTimeProfile {
    /// What was measured or computed, on which device and model, e.g.
    /// "measured: tandem-server warm-start sweep, cpu, SmolLM2-135M" or
    /// "roofline, not measured: H100 SXM, Llama-3-8B bf16".
    pub label: String,
    /// False for a profile computed from datasheet figures.
    pub measured: bool,
    pub calibration: VerifyTimeCalibration,
    /// What a pass costs beyond `calibration` when the device idled
    /// before it (measured profiles; none for rooflines and for files
    /// written before stop 50).
    #[serde(default)]
    pub idle_penalty: IdlePenalty,
    /// The cost model a computed profile was fitted to. A simulator takes
    /// it, not `calibration`'s linear fit, as the pass times' ground truth
    /// (measured profiles have none; nor do files written before stop 51).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roofline: Option<Roofline>,
    /// What a measured profile was measured with, so a server started from
    /// the file (`tandem-server --calibration`) can check it is the same
    /// (none for rooflines and for files written before stop 52).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_on: Option<MeasuredOn>,
}

/// The model and device a measured profile describes. Pass times follow
/// the model's shape and quantization and the device's cores, so a
/// calibration taken on another is wrong from the first pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasuredOn {
    /// The model file's name and size in bytes.
    pub model: String,
    pub model_bytes: u64,
    /// The server's `--device` and how many compute threads it ran.
    pub device: String,
    pub threads: usize,
}

/// A pass's time on a device with nothing but its datasheet: the longer
/// of its memory time and its compute time.
/// - memory: the weights once, plus the K and V of every position each
///   sequence attends to, once (a fused attention kernel reads a
///   sequence's cache once for all its new tokens);
/// - compute: a matmul's FLOPs per new token, plus attention's FLOPs per
///   new token and position attended to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dense FLOP/s at the weights' precision.
    pub flops: f64,
    /// Bytes read once per pass (the weights).
    pub weight_bytes: f64,
    /// K and V of one cached position, all layers, bytes.
    pub kv_bytes_per_position: f64,
    /// FLOPs per new token outside attention (2 × parameters).
    pub flops_per_token: f64,
    /// Attention FLOPs per new token and position it attends to
    /// (4 × layers × hidden).
    pub flops_per_token_position: f64,
}

impl Roofline {
    /// A pass of `tokens` new tokens whose sequences attend to `positions`
    /// positions in all (Σ context + new tokens) and `token_context` in
    /// all over their new tokens (as `BatchShape::token_context`), ms.
    pub fn pass_ms(&self, tokens: usize, positions: usize, token_context: usize) -> f64 {
        let memory = (self.weight_bytes + positions as f64 * self.kv_bytes_per_position) / self.bandwidth;
        let compute = (self.flops_per_token * tokens as f64 + self.flops_per_token_position * token_context as f64) / self.flops;
        memory.max(compute) * 1e3
    }
}

/// The extra time of a pass that follows an idle gap, by the gap's
/// length: linear between measured points, none after no gap, flat past
/// the last point. On the project's VM (a microVM whose idle vCPUs halt
/// and give their cores away) a pass after 32 ms of idle costs a few
/// milliseconds more, whatever its size, than one right after another
/// (+5 to +6 ms in stop 47, +0.7 to +2.5 ms in stop 50), so the penalty
/// is added, not a factor on the pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IdlePenalty {
    /// (idle ms, extra ms), by increasing idle time.
    pub points: Vec<(f64, f64)>,
}

impl IdlePenalty {
    /// Extra ms of a pass after `idle_ms` of idle.
    pub fn extra_ms(&self, idle_ms: f64) -> f64 {
        let mut last = (0.0, 0.0);
        for &(idle, extra) in &self.points {
            if idle_ms < idle {
                return last.1 + (extra - last.1) * (idle_ms - last.0).max(0.0) / (idle - last.0);
            }
            last = (idle, extra);
        }
        last.1
    }
}

/// The upper bound T_q as a small copy: what a reader on another thread
/// (admission) needs, without the estimator's fitting state.
#[derive(Clone, Copy, Debug)]
pub struct UpperBound {
    theta: [f64; DIM],
    ratio: f64,
}

impl UpperBound {
    /// T_q of a batch of this shape, ms.
    pub fn upper(&self, shape: BatchShape) -> f64 {
        predict(&self.theta, shape) * self.ratio.max(1.0)
    }

    /// The expected time of a batch of this shape, ms: what a long run of
    /// such batches costs on average.
    pub fn expected(&self, shape: BatchShape) -> f64 {
        predict(&self.theta, shape)
    }
}

fn predict(theta: &[f64; DIM], shape: BatchShape) -> f64 {
    let x = shape.features();
    (0..DIM).map(|i| theta[i] * x[i]).sum::<f64>().max(0.0)
}

pub struct VerifyTimeEstimator {
    theta: [f64; DIM],
    /// Forgotten Σ x xᵀ and Σ x y.
    gram: [[f64; DIM]; DIM],
    moment: [f64; DIM],
    forgetting: f64,
    quantile: f64,
    sketch: CKMS<f64>,
    /// The sketch's q-quantile, refreshed on insert: `upper` is called many
    /// times per scheduling decision and must not walk the sketch.
    ratio_q: f64,
    recent: Vec<f64>,
    next: usize,
    samples: u64,
}

impl VerifyTimeEstimator {
    /// `quantile` is q of T_q (default 0.9); `forgetting` in (0, 1] weighs
    /// old batches down (0.995 ≈ the last few hundred batches matter).
    pub fn new(quantile: f64, forgetting: f64) -> Self {
        VerifyTimeEstimator {
            theta: [1.0, 0.0, 1.0, 0.0, 0.0],
            gram: [[0.0; DIM]; DIM],
            moment: [0.0; DIM],
            forgetting,
            quantile,
            sketch: CKMS::new(0.001),
            ratio_q: 1.2,
            recent: Vec::with_capacity(WINDOW),
            next: 0,
            samples: 0,
        }
    }

    pub fn from_calibration(c: &VerifyTimeCalibration, forgetting: f64) -> Self {
        let mut e = Self::new(c.quantile, forgetting);
        e.theta = c.coefficients;
        e.gram = c.gram;
        e.moment = c.moment;
        for &r in &c.residual_ratios {
            e.push_ratio(r);
        }
        e
    }

    pub fn calibration(&self) -> VerifyTimeCalibration {
        VerifyTimeCalibration { coefficients: self.theta, quantile: self.quantile, residual_ratios: self.recent.clone(), gram: self.gram, moment: self.moment }
    }

    /// Warm start from a profiling sweep: refits from scratch on `samples`
    /// (shape, measured ms), several passes so the fit settles.
    pub fn warm_start(&mut self, samples: &[(BatchShape, f64)]) {
        *self = Self::new(self.quantile, self.forgetting);
        let keep = self.forgetting;
        self.forgetting = 1.0;
        for _ in 0..3 {
            for &(shape, ms) in samples {
                self.fit(shape, ms);
            }
        }
        self.forgetting = keep;
        for &(shape, ms) in samples {
            self.push_ratio(ms / self.predict(shape).max(1e-6));
        }
    }

    pub fn coefficients(&self) -> [f64; DIM] {
        self.theta
    }

    /// Expected latency of a batch of this shape, ms.
    pub fn predict(&self, shape: BatchShape) -> f64 {
        predict(&self.theta, shape)
    }

    /// Upper bound T_q: the prediction times the q-quantile of recent
    /// measured/predicted ratios (never below the prediction).
    pub fn upper(&self, shape: BatchShape) -> f64 {
        self.bound().upper(shape)
    }

    pub fn bound(&self) -> UpperBound {
        UpperBound { theta: self.theta, ratio: self.ratio_q }
    }

    /// Learns from one executed batch.
    pub fn observe(&mut self, shape: BatchShape, measured_ms: f64) {
        if !(measured_ms.is_finite() && measured_ms >= 0.0) {
            return;
        }
        let predicted = self.predict(shape);
        if predicted > 0.0 {
            self.push_ratio(measured_ms / predicted);
        }
        self.fit(shape, measured_ms);
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// One forgetting step of the normal equations, then the
    /// non-negative solution (warm-started from the previous one).
    ///
    /// Each batch is weighted by 1/y², so the fit minimises relative
    /// error, which is what the scheduler's slack and the reported MAPE
    /// are made of. Unweighted, a 10 % error on a 75 ms prefill counts
    /// over 600 times as much as one on a 3 ms decode step: on this project's CPU the cost of a pass is
    /// flat for the first few tokens (the weights are read once whatever
    /// the batch) and the linear fit over the sweep predicted a 1-token
    /// step at 4.9–8.3 ms against 3.1 ms measured back to back.
    fn fit(&mut self, shape: BatchShape, y: f64) {
        let x = shape.features();
        let w = 1.0 / y.max(MIN_WEIGHTED_MS).powi(2);
        let lambda = self.forgetting;
        for i in 0..DIM {
            for j in 0..DIM {
                self.gram[i][j] = lambda * self.gram[i][j] + w * x[i] * x[j];
            }
            self.moment[i] = lambda * self.moment[i] + w * x[i] * y;
        }
        self.samples += 1;
        // A light ridge keeps unobserved directions at their previous value.
        let ridge = 1e-6 * (0..DIM).map(|i| self.gram[i][i]).fold(0.0, f64::max).max(1e-9);
        for _ in 0..64 {
            let mut moved = 0.0f64;
            for i in 0..DIM {
                let diag = self.gram[i][i] + ridge;
                let others: f64 = (0..DIM).filter(|&j| j != i).map(|j| self.gram[i][j] * self.theta[j]).sum();
                let next = ((self.moment[i] - others + ridge * self.theta[i]) / diag).max(0.0);
                moved = moved.max((next - self.theta[i]).abs());
                self.theta[i] = next;
            }
            if moved < 1e-9 {
                break;
            }
        }
    }

    fn push_ratio(&mut self, r: f64) {
        if !r.is_finite() {
            return;
        }
        if self.recent.len() < WINDOW {
            self.recent.push(r);
        } else {
            self.recent[self.next] = r;
            self.next = (self.next + 1) % WINDOW;
            // Rebuild the sketch from the window now and then so old
            // residuals age out with the model they belonged to.
            if self.next == 0 {
                self.sketch = CKMS::new(0.001);
                for &v in &self.recent {
                    self.sketch.insert(v);
                }
                self.refresh_quantile();
                return;
            }
        }
        self.sketch.insert(r);
        self.refresh_quantile();
    }

    fn refresh_quantile(&mut self) {
        self.ratio_q = self.sketch.query(self.quantile).map_or(1.2, |(_, v)| v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1).
    fn noise(i: u64) -> f64 {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(23) ^ 0xD1B5_4A32_D192_ED03;
        (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn shape(i: u64) -> BatchShape {
        let seqs = 1 + (i % 8) as usize;
        let tokens = seqs * (1 + (i / 8 % 6) as usize);
        let prefill = if i.is_multiple_of(5) { 32 } else { 0 };
        BatchShape { seqs, tokens: tokens + prefill, token_context: (tokens + prefill) * (50 + (i % 13) as usize * 40), prefill_tokens: prefill }
    }

    const TRUE: [f64; DIM] = [4.0, 0.3, 3.5, 0.8, 0.5];

    fn truth(s: BatchShape) -> f64 {
        let x = s.features();
        (0..DIM).map(|i| TRUE[i] * x[i]).sum()
    }

    #[test]
    fn converges_to_known_coefficients_under_noise() {
        let mut e = VerifyTimeEstimator::new(0.9, 0.995);
        for i in 0..3000 {
            let s = shape(i);
            e.observe(s, truth(s) * (1.0 + 0.05 * noise(i)));
        }
        let c = e.coefficients();
        for i in 0..DIM {
            assert!((c[i] - TRUE[i]).abs() < 0.15 * TRUE[i].max(1.0), "coefficient {i}: {} vs {}", c[i], TRUE[i]);
        }
        // T_q covers about q of fresh batches, each bounded before it runs
        // and learned from after, as in the server.
        let covered = (5000..6000)
            .filter(|&i| {
                let measured = truth(shape(i)) * (1.0 + 0.05 * noise(i));
                let within = measured <= e.upper(shape(i));
                e.observe(shape(i), measured);
                within
            })
            .count();
        assert!((850..=960).contains(&covered), "coverage {covered} / 1000");
    }

    #[test]
    fn coefficients_stay_non_negative_and_calibration_round_trips() {
        let mut e = VerifyTimeEstimator::new(0.9, 0.99);
        // Data that an unconstrained fit would explain with a negative slope.
        for i in 0..500 {
            let s = BatchShape { seqs: 1 + (i % 4) as usize, tokens: 4, token_context: 400, prefill_tokens: 0 };
            e.observe(s, 10.0 - s.seqs as f64);
        }
        assert!(e.coefficients().iter().all(|&c| c >= 0.0), "{:?}", e.coefficients());
        let json = serde_json::to_string(&e.calibration()).unwrap();
        let back = VerifyTimeEstimator::from_calibration(&serde_json::from_str(&json).unwrap(), 0.99);
        let s = shape(7);
        assert!((back.predict(s) - e.predict(s)).abs() < 1e-9 * e.predict(s));
        assert!((back.upper(s) - e.upper(s)).abs() < 1e-9 * e.upper(s).max(1.0) + 0.05 * e.upper(s));
    }

    #[test]
    fn warm_start_fits_a_sweep() {
        let sweep: Vec<(BatchShape, f64)> = (0..60).map(|i| (shape(i), truth(shape(i)))).collect();
        let mut e = VerifyTimeEstimator::new(0.9, 0.995);
        e.warm_start(&sweep);
        let mape = (100..200).map(|i| (e.predict(shape(i)) - truth(shape(i))).abs() / truth(shape(i))).sum::<f64>() / 100.0;
        assert!(mape < 0.05, "MAPE after warm start {mape}");
    }

    #[test]
    fn idle_penalty_interpolates_and_profiles_without_one_still_load() {
        let penalty = IdlePenalty { points: vec![(2.0, 1.0), (8.0, 4.0), (32.0, 5.0)] };
        for (idle, extra) in [(0.0, 0.0), (1.0, 0.5), (2.0, 1.0), (5.0, 2.5), (20.0, 4.5), (32.0, 5.0), (500.0, 5.0)] {
            assert!((penalty.extra_ms(idle) - extra).abs() < 1e-9, "after {idle} ms: {} against {extra}", penalty.extra_ms(idle));
        }
        assert_eq!(IdlePenalty::default().extra_ms(100.0), 0.0);
        // A file written before the penalty existed.
        let calibration = VerifyTimeEstimator::new(0.9, 0.99).calibration();
        let mut json = serde_json::to_value(VerifyTimeProfile {
            label: "old".into(),
            measured: true,
            calibration,
            idle_penalty: penalty.clone(),
            roofline: None,
            measured_on: None,
        })
        .unwrap();
        json.as_object_mut().unwrap().remove("idle_penalty");
        let old: VerifyTimeProfile = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.idle_penalty, IdlePenalty::default());
        json["idle_penalty"] = serde_json::to_value(&penalty).unwrap();
        assert_eq!(serde_json::from_value::<VerifyTimeProfile>(json).unwrap().idle_penalty, penalty);
    }

    #[test]
    fn warm_start_fits_small_passes_beside_large_ones_in_relative_terms() {
        // A CPU's pass: the weights' read sets a floor the first few tokens
        // barely move; past it each token costs compute.
        let cost = |tokens: usize| (3.0 + 0.1 * tokens as f64).max(0.6 * tokens as f64);
        let sweep: Vec<(BatchShape, f64)> = [1, 2, 4, 5, 8, 12, 16, 24, 32, 48, 64, 96, 128]
            .iter()
            .map(|&tokens| (BatchShape { seqs: 1, tokens, token_context: tokens * 64, prefill_tokens: 0 }, cost(tokens)))
            .collect();
        let mut e = VerifyTimeEstimator::new(0.9, 0.995);
        e.warm_start(&sweep);
        for &(shape, ms) in &sweep {
            let error = (e.predict(shape) - ms).abs() / ms;
            assert!(error < 0.3, "{} tokens: {:.2} ms predicted against {ms:.2}", shape.tokens, e.predict(shape));
        }
    }
}
