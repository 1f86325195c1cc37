//! Fair per-tenant service counters (VTC, Sheng et al. OSDI'24; FairServe's
//! weighted counter), adapted to speculation: a tenant is charged for all
//! the verification work it caused — rejected drafts included — divided by
//! its weight. A tenant that becomes backlogged is lifted to the minimum
//! counter of the other backlogged tenants, so idling earns no credit.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Cost per token of each kind of work.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CounterWeights {
    /// Per prefill token (VTC's input cost, default 1).
    pub prefill: f64,
    /// Per verified position: accepted, rejected and the bonus token alike
    /// (VTC's output cost, default 2).
    pub verify: f64,
}

impl Default for CounterWeights {
    fn default() -> Self {
        CounterWeights { prefill: 1.0, verify: 2.0 }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Tenant {
    counter: f64,
    weight: f64,
    backlogged: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TenantCounters {
    weights: CounterWeights,
    tenants: BTreeMap<String, Tenant>,
}

impl TenantCounters {
    pub fn new(weights: CounterWeights) -> Self {
        TenantCounters { weights, tenants: BTreeMap::new() }
    }

    /// Declares a tenant's share (default 1).
    pub fn set_weight(&mut self, tenant: &str, weight: f64) {
        self.entry(tenant).weight = weight.max(1e-9);
    }

    fn entry(&mut self, tenant: &str) -> &mut Tenant {
        self.tenants.entry(tenant.to_string()).or_insert(Tenant { counter: 0.0, weight: 1.0, backlogged: false })
    }

    /// The scheduler saw which tenants have queued work. Newly backlogged
    /// tenants are lifted to the minimum counter of those already backlogged.
    pub fn set_backlogged<'a>(&mut self, backlogged: impl IntoIterator<Item = &'a str>) {
        let now: Vec<String> = backlogged.into_iter().map(str::to_string).collect();
        let floor = self.tenants.iter().filter(|(name, t)| t.backlogged && now.contains(name)).map(|(_, t)| t.counter).fold(f64::INFINITY, f64::min);
        for t in self.tenants.values_mut() {
            t.backlogged = false;
        }
        for name in &now {
            let t = self.entry(name);
            if !t.backlogged && floor.is_finite() && t.counter < floor {
                t.counter = floor;
            }
        }
        // Mark after lifting so every newcomer is lifted against the same floor.
        for name in &now {
            self.entry(name).backlogged = true;
        }
    }

    /// Charges an executed share of a batch.
    pub fn charge(&mut self, tenant: &str, prefill_tokens: usize, verified_positions: usize) {
        let w = self.weights;
        let t = self.entry(tenant);
        t.counter += (w.prefill * prefill_tokens as f64 + w.verify * verified_positions as f64) / t.weight;
    }

    pub fn counter(&self, tenant: &str) -> f64 {
        self.tenants.get(tenant).map_or(0.0, |t| t.counter)
    }

    /// All counters, for metrics.
    pub fn counters(&self) -> impl Iterator<Item = (&str, f64)> {
        self.tenants.iter().map(|(n, t)| (n.as_str(), t.counter))
    }
}

/// A run's fairness figure: the largest spread of service counters between
/// tenants backlogged at the same scheduling decision (what VTC bounds).
/// It keeps counters of its own, charged like the scheduler's, so a policy
/// whose batcher keeps none (FCFS) is measured on the same scale.
#[derive(Clone, Debug, Default)]
pub struct ServiceGap {
    counters: TenantCounters,
    max: f64,
}

impl ServiceGap {
    pub fn new(weights: CounterWeights) -> Self {
        ServiceGap { counters: TenantCounters::new(weights), max: 0.0 }
    }

    /// Declares a tenant's share, as the scheduler's counters have it.
    pub fn set_weight(&mut self, tenant: &str, weight: f64) {
        self.counters.set_weight(tenant, weight);
    }

    /// A scheduling decision with work of these tenants queued (repeats allowed).
    pub fn observe_backlog<'a>(&mut self, queued: impl IntoIterator<Item = &'a str>) {
        let mut names: Vec<&str> = queued.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        self.counters.set_backlogged(names.iter().copied());
        let counters = names.iter().map(|n| self.counters.counter(n));
        let (low, high) = counters.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| (lo.min(c), hi.max(c)));
        if high >= low {
            self.max = self.max.max(high - low);
        }
    }

    /// Charges an executed share of a pass.
    pub fn charge(&mut self, tenant: &str, prefill_tokens: usize, verified_positions: usize) {
        self.counters.charge(tenant, prefill_tokens, verified_positions);
    }

    /// The largest spread seen so far (0 with fewer than two tenants).
    pub fn max(&self) -> f64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_rejected_drafts_and_divides_by_weight() {
        let mut c = TenantCounters::new(CounterWeights::default());
        c.set_weight("b", 2.0);
        // Both verified 5 positions (a: 4 accepted + bonus; b: 0 accepted, 4 rejected + correction).
        c.charge("a", 10, 5);
        c.charge("b", 10, 5);
        assert_eq!(c.counter("a"), 20.0);
        assert_eq!(c.counter("b"), 10.0);
    }

    #[test]
    fn a_newly_backlogged_tenant_is_lifted_and_idling_earns_nothing() {
        let mut c = TenantCounters::new(CounterWeights::default());
        c.set_backlogged(["a"]);
        c.charge("a", 0, 100);
        c.set_backlogged(["a"]);
        // b arrives after idling: lifted to a's counter, no credit.
        c.set_backlogged(["a", "b"]);
        assert_eq!(c.counter("b"), c.counter("a"));
        // a goes idle, b works, a returns: lifted to b.
        c.set_backlogged(["b"]);
        c.charge("b", 0, 50);
        c.set_backlogged(["a", "b"]);
        assert_eq!(c.counter("a"), c.counter("b"));
    }

    #[test]
    fn service_gap_is_the_largest_spread_between_backlogged_tenants() {
        let mut g = ServiceGap::new(CounterWeights::default());
        g.set_weight("b", 2.0);
        g.observe_backlog(["a", "b", "a"]);
        g.charge("a", 10, 0);
        g.charge("b", 0, 5);
        g.observe_backlog(["a", "b"]);
        assert_eq!(g.max(), 5.0, "a at 10, b at 10 / 2");
        // A tenant served while the other idles opens no gap: the other
        // returns lifted to it.
        g.observe_backlog(["a"]);
        g.charge("a", 100, 0);
        g.observe_backlog(["a", "b"]);
        assert_eq!(g.max(), 5.0);
        // Served while the other waits, it does.
        g.charge("a", 20, 0);
        g.observe_backlog(["b", "a"]);
        assert_eq!(g.max(), 20.0);
    }
}
