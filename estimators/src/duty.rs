//! How a device's pass time follows its recent load: on a CPU whose clock
//! (or whose host's scheduling of it) follows how busy it has been, the
//! same pass runs slower after idle spells. On the project's 2-vCPU VM a
//! 1-token pass took 4.4 ms with passes back to back, 5.4 ms with 2 ms
//! gaps, 6.5 ms with 16–32 ms gaps, and 7.1 ms right after 300 ms idle,
//! falling to 4.3 ms over about 110 ms of back-to-back passes. So a server
//! that decodes back to back (centralized decoding) runs each pass about a
//! third faster than one whose rounds leave gaps, which the simulator must
//! know to agree with live runs. GPUs are not modelled so: their curve is
//! empty and every factor 1.

use serde::{Deserialize, Serialize};

/// Time constant of [`BusyFraction`], ms: busy throughout from idle, the
/// fraction reaches 0.9 after 115 ms, about where the VM's passes stopped
/// speeding up.
pub const BUSY_TAU_MS: f64 = 50.0;

/// The share of recent time the device spent running passes: an
/// exponentially weighted average of busy (1) and idle (0), [`BUSY_TAU_MS`].
#[derive(Clone, Copy, Debug)]
pub struct BusyFraction {
    value: f64,
}

impl Default for BusyFraction {
    /// Starts idle.
    fn default() -> Self {
        BusyFraction { value: 0.0 }
    }
}

impl BusyFraction {
    pub fn value(&self) -> f64 {
        self.value
    }

    pub fn idle(&mut self, ms: f64) {
        self.value *= (-ms.max(0.0) / BUSY_TAU_MS).exp();
    }

    pub fn busy(&mut self, ms: f64) {
        self.value = 1.0 - (1.0 - self.value) * (-ms.max(0.0) / BUSY_TAU_MS).exp();
    }
}

/// Pass time by busy fraction, measured, relative to the pass time when
/// busy throughout; and the busy fraction the calibration's coefficients
/// were measured at, so its predictions can be moved to another.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DutyCurve {
    /// (busy fraction, time factor ≥ about 1), busy fraction ascending.
    pub points: Vec<(f64, f64)>,
    /// The mean busy fraction at the middle of the calibration's timed
    /// passes (where [`DutyCurve::relative`] reads a pass's factor).
    pub calibrated_at: f64,
}

impl DutyCurve {
    /// The time factor at `busy`, linear between points and flat beyond
    /// the ends; 1 without points.
    pub fn factor(&self, busy: f64) -> f64 {
        let p = &self.points;
        let (Some(first), Some(last)) = (p.first(), p.last()) else { return 1.0 };
        if busy <= first.0 {
            return first.1;
        }
        if busy >= last.0 {
            return last.1;
        }
        let i = p.partition_point(|&(b, _)| b <= busy);
        let ((b0, f0), (b1, f1)) = (p[i - 1], p[i]);
        if b1 > b0 {
            f0 + (f1 - f0) * (busy - b0) / (b1 - b0)
        } else {
            f1
        }
    }

    /// What a pass predicted by the calibration takes when started at busy
    /// fraction `busy`, as a factor of the prediction. The device keeps
    /// warming during a long pass, so the factor is read at the fraction
    /// its middle would reach.
    pub fn relative(&self, busy: f64, predicted_ms: f64) -> f64 {
        if self.points.is_empty() {
            return 1.0;
        }
        let at_calibration = self.factor(self.calibrated_at);
        let mut mid = BusyFraction { value: busy };
        mid.busy(predicted_ms * self.factor(busy) / at_calibration / 2.0);
        self.factor(mid.value) / at_calibration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_fraction_rises_while_busy_and_decays_while_idle() {
        let mut b = BusyFraction::default();
        b.busy(115.0);
        assert!((b.value() - 0.9).abs() < 0.01, "{}", b.value());
        let before = b.value();
        b.idle(BUSY_TAU_MS);
        assert!((b.value() - before / std::f64::consts::E).abs() < 1e-12);
        b.idle(-5.0);
        assert!(b.value() > 0.3, "negative spans change nothing");
    }

    #[test]
    fn factors_interpolate_and_are_relative_to_the_calibrations_conditions() {
        let curve = DutyCurve { points: vec![(0.2, 1.5), (0.6, 1.2), (1.0, 1.0)], calibrated_at: 0.6 };
        assert_eq!(curve.factor(0.0), 1.5);
        assert!((curve.factor(0.8) - 1.1).abs() < 1e-12);
        assert_eq!(curve.factor(1.0), 1.0);
        // A short pass when busy throughout: faster than calibrated.
        assert!((curve.relative(1.0, 0.1) - 1.0 / 1.2).abs() < 1e-9);
        // A short pass after idle: slower.
        assert!((curve.relative(0.0, 0.01) - 1.5 / 1.2).abs() < 1e-3);
        // A long pass after idle warms the device as it runs.
        assert!(curve.relative(0.0, 200.0) < 1.0);
        // No curve (a GPU): the calibration as it is.
        assert_eq!(DutyCurve::default().relative(0.0, 5.0), 1.0);
    }
}
