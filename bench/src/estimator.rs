//! `tandem-bench estimator`: accuracy of the verification-time estimator on
//! the real model. The estimator is warm-started by the server's own sweep,
//! then a few hundred batches of varied shapes run; each is predicted
//! before it runs (and learned from after), as in the live server.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use tandem_estimators::VerifyTimeEstimator;
use tandem_model::{LoadedModel, SessionRng};
use tandem_server::profile::{sweep, Profiler};

#[derive(Serialize)]
pub struct EstimatorReport {
    pub batches: usize,
    /// Mean absolute percentage error of the expected time (fraction).
    pub mape: f64,
    pub p50_error: f64,
    pub p95_error: f64,
    /// Fraction of batches that finished within the T_q bound.
    pub coverage: f64,
    pub q: f64,
    /// The same shapes timed again and again: mean |time − median| / time.
    /// What a predictor that knew each shape's median time exactly would
    /// score as MAPE; the machine's own run-to-run noise.
    pub repeat_error: f64,
    /// Fitted coefficients: ms, per sequence, per token, per 1000 token×context, per scored position.
    pub coefficients: [f64; 5],
}

pub fn run(model: &Path, batches: usize, q: f64, progress: bool) -> Result<EstimatorReport> {
    let model = LoadedModel::load(model).with_context(|| format!("loading --model {}", model.display()))?;
    let llama = &model.llama;
    let mut estimator = VerifyTimeEstimator::new(q, 0.995);
    estimator.warm_start(&sweep(llama)?);
    let mut profiler = Profiler::new(llama);
    let mut rng = SessionRng::new(2024);
    let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
    let contexts = [16, 64, 128, 256, 384];
    let mut errors = Vec::with_capacity(batches);
    let mut covered = 0;
    for i in 0..batches {
        let seqs: Vec<(usize, usize)> = (0..1 + pick(8)).map(|_| (1 + pick(9), contexts[pick(contexts.len())])).collect();
        let prefill = if pick(6) == 0 { 16 * (1 + pick(4)) } else { 0 };
        let (shape, ms) = profiler.time_batch(&seqs, prefill)?;
        let (predicted, upper) = (estimator.predict(shape), estimator.upper(shape));
        errors.push((predicted - ms).abs() / ms);
        covered += usize::from(ms <= upper);
        estimator.observe(shape, ms);
        if progress && (i + 1) % 50 == 0 {
            eprintln!("{} batches, MAPE so far {:.1} %", i + 1, 100.0 * errors.iter().sum::<f64>() / errors.len() as f64);
        }
    }
    let mape = errors.iter().sum::<f64>() / errors.len() as f64;
    let repeat_error = repeat_error(&mut profiler)?;
    errors.sort_by(f64::total_cmp);
    let at = |p: f64| errors[((errors.len() as f64 * p) as usize).min(errors.len() - 1)];
    Ok(EstimatorReport {
        batches,
        mape,
        p50_error: at(0.5),
        p95_error: at(0.95),
        coverage: covered as f64 / batches as f64,
        q,
        repeat_error,
        coefficients: estimator.coefficients(),
    })
}

/// Four shapes (a decode step to a full verification batch), each timed
/// 15 times back to back.
fn repeat_error(profiler: &mut Profiler) -> Result<f64> {
    let mut deviations = Vec::new();
    for (seqs, tokens, context) in [(1, 1, 64), (1, 5, 128), (4, 5, 128), (8, 5, 256)] {
        let mut ms = (0..15).map(|_| Ok(profiler.time_batch(&vec![(tokens, context); seqs], 0)?.1)).collect::<Result<Vec<f64>>>()?;
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        deviations.extend(ms.iter().map(|t| (t - median).abs() / t));
    }
    Ok(deviations.iter().sum::<f64>() / deviations.len() as f64)
}

impl EstimatorReport {
    pub fn markdown(&self) -> String {
        format!(
            "| batches | MAPE | p50 error | p95 error | T_q coverage (q = {q}) |\n|---|---|---|---|---|\n| {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % |\n\n\
             the same shape timed 15 times here varies by {:.1} % (mean |time − median| / time: the MAPE of a predictor that knew each shape's median)\n\
             targets: MAPE ≤ 8 %, p95 ≤ 20 %, coverage ≥ {:.0} %\ncoefficients (ms; per seq, per token, per 1000 token×context, per scored position): {:.3?}\n",
            self.batches,
            100.0 * self.mape,
            100.0 * self.p50_error,
            100.0 * self.p95_error,
            100.0 * self.coverage,
            100.0 * self.repeat_error,
            100.0 * (self.q - 0.05),
            self.coefficients,
            q = self.q
        )
    }
}
