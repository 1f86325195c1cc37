//! Acceptance estimator: per draft position, an EWMA of whether the draft
//! token at that position was accepted (given the ones before it were).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AcceptanceEstimator {
    /// P(accept position i | positions < i accepted).
    per_position: Vec<f64>,
    /// EWMA weight of a new observation.
    alpha: f64,
}

impl AcceptanceEstimator {
    /// `prior` is the starting acceptance; `alpha` the EWMA weight (0.1).
    pub fn new(max_positions: usize, prior: f64, alpha: f64) -> Self {
        AcceptanceEstimator { per_position: vec![prior.clamp(0.0, 1.0); max_positions.max(1)], alpha }
    }

    /// Records a round: `drafted` tokens proposed, the first `accepted` kept.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        let n = self.per_position.len();
        for i in 0..drafted.min(n) {
            if i > accepted {
                break; // positions after the first rejection were never judged
            }
            let hit = if i < accepted { 1.0 } else { 0.0 };
            self.per_position[i] += self.alpha * (hit - self.per_position[i]);
        }
    }

    /// Acceptance at position `i` (the last one is reused beyond the table).
    pub fn rate(&self, i: usize) -> f64 {
        self.per_position[i.min(self.per_position.len() - 1)]
    }

    /// Mean per-position acceptance over the first `k` positions (α).
    pub fn alpha(&self, k: usize) -> f64 {
        let k = k.clamp(1, self.per_position.len());
        self.per_position[..k].iter().sum::<f64>() / k as f64
    }

    /// How many of `k` drafted positions are worth verifying: those reached
    /// (every earlier one accepted) with estimated probability at least
    /// `floor`. The first is always verified, so the estimate keeps learning.
    pub fn reachable(&self, k: usize, floor: f64) -> usize {
        let mut reach = 1.0;
        for i in 0..k {
            if reach < floor {
                return i.max(1);
            }
            reach *= self.rate(i);
        }
        k
    }

    /// Expected tokens a round with `k` drafts emits: accepted drafts plus
    /// the target's own token, Σ_{j=0..k} Π_{i<j} rate(i).
    pub fn expected_tokens(&self, k: usize) -> f64 {
        let mut total = 1.0;
        let mut reach = 1.0;
        for i in 0..k {
            reach *= self.rate(i);
            total += reach;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_tokens_matches_the_closed_form_for_constant_acceptance() {
        let e = AcceptanceEstimator::new(8, 0.6, 0.1);
        for k in 0..8 {
            let closed = (1.0 - 0.6f64.powi(k as i32 + 1)) / (1.0 - 0.6);
            assert!((e.expected_tokens(k) - closed).abs() < 1e-12, "k={k}");
        }
    }

    #[test]
    fn learns_per_position_rates() {
        let mut e = AcceptanceEstimator::new(4, 0.5, 0.05);
        // Position 0 always accepted, position 1 never.
        for _ in 0..400 {
            e.observe(4, 1);
        }
        assert!(e.rate(0) > 0.95 && e.rate(1) < 0.05);
        // Positions after the first rejection stay at their prior.
        assert_eq!(e.rate(2), 0.5);
        assert!((e.expected_tokens(4) - 2.0).abs() < 0.1);
    }

    #[test]
    fn reachable_positions_shrink_for_junk_and_recover() {
        let mut e = AcceptanceEstimator::new(16, 0.5, 0.2);
        // Prior 0.5: positions reached with ≥ 5 % are the first five.
        assert_eq!(e.reachable(16, 0.05), 5);
        assert_eq!(e.reachable(3, 0.05), 3);
        for _ in 0..30 {
            e.observe(16, 0);
        }
        assert_eq!(e.reachable(16, 0.05), 1, "junk keeps one position, so it can recover");
        assert_eq!(e.reachable(0, 0.05), 0);
        for _ in 0..30 {
            e.observe(1, 1);
        }
        assert!(e.reachable(16, 0.05) >= 2);
    }
}
