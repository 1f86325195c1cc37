//! The WISP batch scheduler (DESIGN.md): SLO deadlines, a verification-time
//! estimator's upper bound T_q, and fair tenant counters decide each batch.
//!
//! 1. Urgent phase: requests whose slack is shorter than the next two
//!    passes take their place in least-slack order. (Two: a request left
//!    for the next pass with less than a pass of slack can then share it
//!    only with what fits in that slack, and a server past capacity
//!    collapses into small passes. Measured on the simulated H100 at 2144
//!    devices, late work served as in 4.: with one pass, passes of one
//!    round and 8 % attainment; with two, full passes and 53 %.)
//! 2. Density fill: the rest, lowest tenant counter first (in quanta of
//!    service), then by slack at the granularity of a pass (requests whose
//!    slack falls in the same pass-length window are equals), then by
//!    expected tokens per marginal estimated time. Deadlines follow each session's
//!    pace (`work_deadline`), so a session ahead of its TPOT objective
//!    yields to prefills and to sessions behind theirs: serving it sooner
//!    than its objective asks would only spend the slots others need.
//! 3. Batching delay: when everyone has ample slack, the batch is small and
//!    another session's round is due within the delay (its `RoundClock`),
//!    wait (bounded) for it.
//! 4. Requests already late are served best-effort: after the on-time work
//!    due within the next few passes (`YIELDS_TO_LATE_PASSES`), never at
//!    its expense, and before on-time work with more slack than that. That
//!    work belongs to sessions ahead of their pace, which a pass's wait
//!    cannot make late; served first, it kept a busy server from ever
//!    reaching the late work (on the simulated H100 at 1600 devices, 113
//!    prompts waited 15 s each behind rounds with a second of slack).
//! 5. Work without a deadline (a session that set no TPOT objective) is
//!    best-effort too: it rides along in a pass of on-time work only where
//!    it adds little to the pass (`best_effort_share`: a GPU, where tokens
//!    are nearly free), and a pass of best-effort work alone must end
//!    before a session with an objective is due to send its next round. A
//!    pass cannot be stopped once started, so this is what keeps a tenant
//!    that hammers without objectives out of the way of one that has them
//!    on a CPU, where every token costs. Best-effort work that has waited
//!    `best_effort_wait` joins as if it were on time, so it is never starved.
//!
//! Every addition must keep `now + T_q(batch)` within the deadline of every
//! on-time member, so a loose request never makes a tight one miss.
//! Pure: time is passed in.

use crate::batcher::{batch_shape, Batcher, PendingWork, RoundsDue, Scheduled, WorkKind};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tandem_estimators::{BatchShape, CounterWeights, TenantCounters, VerifyTimeCalibration, VerifyTimeEstimator};

/// Settings of the WISP scheduler.
#[derive(Clone, Debug)]
pub struct WispConfig {
    /// New tokens per pass.
    pub max_tokens: usize,
    pub max_seqs: usize,
    /// Largest prefill chunk in one pass.
    pub prefill_chunk: usize,
    /// Longest wait for more arrivals when nobody is in a hurry.
    pub max_delay: Duration,
    /// q of the T_q bound.
    pub quantile: f64,
    /// Service (counter units) within which tenants count as even.
    pub fairness_quantum: f64,
    pub weights: CounterWeights,
    /// Most that best-effort work may add to the estimated time of a pass
    /// of on-time work it rides along in, as a share of it.
    pub best_effort_share: f64,
    /// Wait after which best-effort work is served as on-time work.
    pub best_effort_wait: Duration,
}

impl Default for WispConfig {
    fn default() -> Self {
        WispConfig {
            max_tokens: 256,
            max_seqs: 32,
            prefill_chunk: 128,
            max_delay: Duration::from_millis(2),
            quantile: 0.9,
            fairness_quantum: 64.0,
            weights: CounterWeights::default(),
            best_effort_share: 0.05,
            best_effort_wait: Duration::from_millis(500),
        }
    }
}

/// The estimator's forgetting factor: the last few hundred passes matter.
const FORGETTING: f64 = 0.995;

/// Passes of slack within which on-time work is urgent.
const URGENT_PASSES: f64 = 2.0;
/// Passes of slack beyond which on-time work is relaxed: a small batch of
/// it may wait for more arrivals.
const RELAXED_PASSES: f64 = 4.0;
/// Passes of slack beyond which on-time work yields to late work. (At
/// four, on this CPU's live server, where a pass is a tenth of a round's
/// budget, the overload test's admitted sessions missed TPOT four times as
/// often: 17–22 of about 940 against 6–8 at eight; the simulated H100,
/// whose rounds run seconds ahead of their pace, did the same at both.)
const YIELDS_TO_LATE_PASSES: f64 = 8.0;

pub struct WispBatcher {
    cfg: WispConfig,
    pub estimator: VerifyTimeEstimator,
    pub counters: TenantCounters,
    /// When the current batching delay began.
    delaying_since: Option<Instant>,
    /// When sessions on their edges should send their next rounds.
    next_rounds: RoundsDue,
}

#[derive(Clone, Copy)]
struct Candidate {
    index: usize,
    tokens: usize,
    deadline: Option<Instant>,
    late: bool,
    /// No deadline, and not waited `best_effort_wait` yet.
    best_effort: bool,
    /// Deadline − now − T_q(alone) (− a pass per later prefill chunk), ms
    /// (infinite without a deadline).
    slack_ms: f64,
}

impl WispBatcher {
    pub fn new(cfg: WispConfig) -> Self {
        let estimator = VerifyTimeEstimator::new(cfg.quantile, FORGETTING);
        Self::with_estimator(cfg, estimator)
    }

    /// With a given (for instance calibrated or simulated) estimator.
    pub fn with_estimator(cfg: WispConfig, estimator: VerifyTimeEstimator) -> Self {
        let counters = TenantCounters::new(cfg.weights);
        WispBatcher { cfg, estimator, counters, delaying_since: None, next_rounds: RoundsDue::default() }
    }

    fn tq(&self, shape: BatchShape) -> Duration {
        Duration::from_secs_f64(self.estimator.upper(shape).max(0.0) / 1e3)
    }

    /// Every queued request as a candidate for the next pass, with its
    /// slack; and the pass horizon: what the next pass would take if it
    /// were filled first come, first served, ms.
    fn candidates(&self, now: Instant, queue: &VecDeque<PendingWork>) -> (Vec<Candidate>, f64) {
        let chunk = |w: &PendingWork| if w.kind == WorkKind::Prefill { w.tokens.min(self.cfg.prefill_chunk).min(self.cfg.max_tokens) } else { w.tokens };
        let mut pool: Vec<Candidate> = queue
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let tokens = chunk(w).max(1);
                let alone = self.tq(w.shape(tokens));
                let slack_ms = match w.deadline {
                    Some(d) => {
                        let until = if d >= now { (d - now).as_secs_f64() } else { -(now - d).as_secs_f64() };
                        (until - alone.as_secs_f64()) * 1e3
                    }
                    None => f64::INFINITY,
                };
                let best_effort = w.deadline.is_none() && now.saturating_duration_since(w.enqueued) < self.cfg.best_effort_wait;
                Candidate { index, tokens, deadline: w.deadline, late: slack_ms < 0.0, best_effort, slack_ms }
            })
            .collect();
        let mut fifo_tokens = 0;
        let horizon_shape = queue
            .iter()
            .zip(&pool)
            .take(self.cfg.max_seqs)
            .take_while(|(_, c)| {
                fifo_tokens += c.tokens;
                fifo_tokens <= self.cfg.max_tokens
            })
            .map(|(w, c)| w.shape(c.tokens))
            .sum::<BatchShape>();
        let horizon_ms = self.estimator.upper(horizon_shape);
        // A prefill longer than a chunk needs a pass per chunk: its urgency
        // counts the passes after this one (whether it is late still goes
        // by this chunk alone), or its last chunk would find the deadline
        // gone and wait behind all on-time work.
        for c in pool.iter_mut() {
            let later_passes = queue[c.index].tokens.div_ceil(c.tokens).saturating_sub(1);
            c.slack_ms -= later_passes as f64 * horizon_ms;
        }
        (pool, horizon_ms)
    }

    /// Whether `batch` plus `extra` fits the budgets and every on-time
    /// member still meets its deadline.
    fn fits(&self, now: Instant, queue: &VecDeque<PendingWork>, batch: &Building, extra: &Candidate) -> bool {
        if batch.tokens + extra.tokens > self.cfg.max_tokens || batch.members.len() + 1 > self.cfg.max_seqs {
            return false;
        }
        let end = now + self.tq(batch.shape + queue[extra.index].shape(extra.tokens));
        let extra_deadline = if extra.late { None } else { extra.deadline };
        batch.earliest.into_iter().chain(extra_deadline).all(|d| end <= d)
    }

    /// Density fill of the candidates `eligible` picks: lowest counter
    /// quantum first, then the least slack in windows of a pass's length,
    /// then most expected tokens per marginal estimated time. A candidate
    /// joins if it `fits` and `admit` accepts the batch's shape with it.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        now: Instant,
        queue: &VecDeque<PendingWork>,
        pool: &[Candidate],
        taken: &mut [bool],
        batch: &mut Building,
        horizon_ms: f64,
        eligible: impl Fn(&Candidate) -> bool,
        admit: impl Fn(BatchShape) -> bool,
    ) {
        loop {
            let base = self.estimator.upper(batch.shape);
            let mut best: Option<(usize, (i64, i64, f64))> = None;
            for (i, c) in pool.iter().enumerate() {
                let w = &queue[c.index];
                let shape = batch.shape + w.shape(c.tokens);
                if taken[i] || !eligible(c) || !self.fits(now, queue, batch, c) || !admit(shape) {
                    continue;
                }
                let marginal = (self.estimator.upper(shape) - base).max(1e-3);
                let quantum = (self.counters.counter(&w.tenant) / self.cfg.fairness_quantum).floor() as i64;
                // Float-to-int casts saturate: no deadline is the last window.
                let window = (c.slack_ms / horizon_ms.max(1e-3)).floor() as i64;
                let key = (quantum, window, -(w.expected_tokens / marginal));
                if best.as_ref().is_none_or(|(_, k)| (key.0, key.1).cmp(&(k.0, k.1)).then(key.2.total_cmp(&k.2)).is_lt()) {
                    best = Some((i, key));
                }
            }
            let Some((i, _)) = best else { break };
            taken[i] = true;
            batch.push(queue, pool[i]);
        }
    }
}

/// A batch being chosen, with what `fits` asks of it kept up to date.
#[derive(Default)]
struct Building {
    members: Vec<Candidate>,
    shape: BatchShape,
    tokens: usize,
    /// The earliest deadline of an on-time member.
    earliest: Option<Instant>,
}

impl Building {
    fn push(&mut self, queue: &VecDeque<PendingWork>, c: Candidate) {
        self.shape = self.shape + queue[c.index].shape(c.tokens);
        self.tokens += c.tokens;
        if !c.late {
            self.earliest = match (self.earliest, c.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.members.push(c);
    }
}

impl Batcher for WispBatcher {
    fn next_batch(&mut self, now: Instant, queue: &mut VecDeque<PendingWork>) -> Vec<Scheduled> {
        if queue.is_empty() {
            return vec![];
        }
        self.counters.set_backlogged(queue.iter().map(|w| w.tenant.as_str()));
        let (pool, horizon_ms) = self.candidates(now, queue);
        let mut batch = Building::default();
        // 1. Urgent: least slack first.
        let mut urgent: Vec<usize> = (0..pool.len()).filter(|&i| !pool[i].late && pool[i].slack_ms < URGENT_PASSES * horizon_ms).collect();
        urgent.sort_by(|&a, &b| pool[a].slack_ms.total_cmp(&pool[b].slack_ms));
        let mut taken = vec![false; pool.len()];
        for i in urgent {
            if self.fits(now, queue, &batch, &pool[i]) {
                taken[i] = true;
                batch.push(queue, pool[i]);
            }
        }
        // 2. Density fill of on-time work. Where some work is late: first
        //    of the work due within YIELDS_TO_LATE_PASSES passes, then (4.)
        //    the late requests, best effort, in order of arrival, never at
        //    on-time members' expense; then the rest.
        let any_late = pool.iter().any(|c| c.late);
        if any_late {
            let yields_ms = YIELDS_TO_LATE_PASSES * horizon_ms.max(1.0);
            self.fill(now, queue, &pool, &mut taken, &mut batch, horizon_ms, |c| !c.late && !c.best_effort && c.slack_ms <= yields_ms, |_| true);
            for (i, c) in pool.iter().enumerate() {
                if !taken[i] && c.late && self.fits(now, queue, &batch, c) {
                    taken[i] = true;
                    batch.push(queue, *c);
                }
            }
        }
        self.fill(now, queue, &pool, &mut taken, &mut batch, horizon_ms, |c| !c.late && !c.best_effort, |_| true);
        // 3. Batching delay: small batch, everyone relaxed, nobody late,
        //    and another session's round due before the delay would end
        //    (waiting for nobody only adds latency).
        let relaxed = batch.members.iter().all(|c| c.slack_ms > RELAXED_PASSES * horizon_ms.max(1.0));
        let small = batch.tokens * 4 < self.cfg.max_tokens && batch.members.len() * 4 < self.cfg.max_seqs;
        let all_on_time_taken = batch.members.len() == pool.iter().filter(|c| !c.best_effort).count();
        if !batch.members.is_empty() && relaxed && small && !any_late && all_on_time_taken {
            let since = *self.delaying_since.get_or_insert(now);
            let end = since + self.cfg.max_delay;
            if now < end && self.next_rounds.any.is_some_and(|due| due <= end) {
                return vec![];
            }
        }
        self.delaying_since = None;
        // 5. Work without a deadline: beside other work only where it adds
        //    little; alone only if the pass ends before a round with a
        //    deadline may come.
        let yield_to = self.next_rounds.with_deadline;
        let limit_ms = self.estimator.upper(batch.shape) * (1.0 + self.cfg.best_effort_share);
        let alone = batch.members.is_empty();
        self.fill(
            now,
            queue,
            &pool,
            &mut taken,
            &mut batch,
            horizon_ms,
            |c| c.best_effort,
            |shape| {
                if alone {
                    yield_to.is_none_or(|due| now + self.tq(shape) <= due)
                } else {
                    self.estimator.upper(shape) <= limit_ms
                }
            },
        );
        let mut batch = batch.members;
        if batch.is_empty() {
            // Best-effort work waits for the round it would hold up.
            if yield_to.is_some() && pool.iter().any(|c| c.best_effort) {
                return vec![];
            }
            // Nothing fits (a single request over budget): run the oldest alone.
            batch.push(pool[0]);
        }
        // Take the chosen entries out in batch order; the rest keep theirs.
        let mut slots: Vec<Option<PendingWork>> = queue.drain(..).map(Some).collect();
        let scheduled = batch.iter().map(|c| Scheduled { work: slots[c.index].take().expect("each candidate is taken once"), tokens: c.tokens }).collect();
        queue.extend(slots.into_iter().flatten());
        scheduled
    }

    fn executed(&mut self, batch: &[Scheduled], measured_ms: f64) {
        self.estimator.observe(batch_shape(batch), measured_ms);
        for s in batch {
            let (prefill, verified) = s.service();
            self.counters.charge(&s.work.tenant, prefill, verified);
        }
    }

    fn estimate_ms(&self, shape: BatchShape) -> Option<(f64, f64)> {
        Some((self.estimator.predict(shape), self.estimator.upper(shape)))
    }

    fn estimator(&self) -> Option<&VerifyTimeEstimator> {
        Some(&self.estimator)
    }

    /// The k with the least marginal server time per expected token when
    /// the round shares a full pass: its own per-sequence and per-token
    /// cost plus its share of the pass's fixed cost. Where a pass costs
    /// about its weight read whatever it holds (a GPU), that is a long
    /// draft; where tokens cost compute (a CPU, a big model), a short one,
    /// since every rejected draft is paid for. k = 0 is a decode step on
    /// the server (one position, one token): it wins where a position
    /// costs more than the sequence slot that speculation saves.
    fn suggested_k(&self, expected_tokens: &dyn Fn(usize) -> f64, context: usize) -> Option<usize> {
        let fixed = self.estimator.predict(BatchShape::default());
        let cost = |k: usize| {
            (self.estimator.predict(BatchShape::verify_round(k, context)) - fixed + fixed / self.cfg.max_seqs.max(1) as f64) / expected_tokens(k).max(1e-9)
        };
        (0..=8).min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
    }

    fn warm_start(&mut self, samples: &[(BatchShape, f64)]) {
        self.estimator.warm_start(samples);
    }

    fn restore(&mut self, calibration: &VerifyTimeCalibration) {
        // The fit is the file's; the quantile of T_q is this server's.
        let calibration = VerifyTimeCalibration { quantile: self.cfg.quantile, ..calibration.clone() };
        self.estimator = VerifyTimeEstimator::from_calibration(&calibration, FORGETTING);
    }

    fn set_tenant_weight(&mut self, tenant: &str, weight: f64) {
        self.counters.set_weight(tenant, weight);
    }

    fn tenant_counters(&self) -> Vec<(String, f64)> {
        self.counters.counters().map(|(n, c)| (n.to_string(), c)).collect()
    }

    fn max_delay(&self) -> Duration {
        self.cfg.max_delay
    }

    fn expect_next_rounds(&mut self, due: RoundsDue) {
        self.next_rounds = due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::SessionId;
    use proptest::prelude::*;
    use tandem_estimators::VerifyTimeCalibration;

    /// Known costs: T = 3 + 0.5·seqs + 2·tokens + 0.2·(Σ tokens×context)/1000
    /// + 0.5·scored positions ms, and T_q = T exactly.
    fn known() -> VerifyTimeEstimator {
        VerifyTimeEstimator::from_calibration(
            &VerifyTimeCalibration {
                coefficients: [3.0, 0.5, 2.0, 0.2, 0.5],
                quantile: 0.9,
                residual_ratios: vec![1.0; 64],
                gram: [[0.0; 5]; 5],
                moment: [0.0; 5],
            },
            1.0,
        )
    }

    fn batcher() -> WispBatcher {
        let cfg = WispConfig { max_tokens: 48, max_seqs: 6, prefill_chunk: 16, max_delay: Duration::ZERO, ..WispConfig::default() };
        WispBatcher::with_estimator(cfg, known())
    }

    fn arb_work(now: Instant) -> impl Strategy<Value = PendingWork> {
        (0u8..3, 1usize..10, 0usize..600, prop::option::weighted(0.8, -30i64..250), 0u8..2).prop_map(move |(kind, k, context, deadline, tenant)| {
            let kind = [WorkKind::Verify, WorkKind::Decode, WorkKind::Prefill][kind as usize];
            let tokens = match kind {
                WorkKind::Verify => k,
                WorkKind::Decode => 1,
                WorkKind::Prefill => k * 9,
            };
            let deadline = deadline.map(|ms| if ms >= 0 { now + Duration::from_millis(ms as u64) } else { now - Duration::from_millis((-ms) as u64) });
            PendingWork {
                session: 0,
                tenant: ["a", "b"][tenant as usize].into(),
                kind,
                tokens,
                enqueued: now,
                deadline,
                context,
                expected_tokens: 1.0 + k as f64 * 0.3,
            }
        })
    }

    fn shape(batch: &[(PendingWork, usize)]) -> BatchShape {
        batch.iter().map(|(w, t)| w.shape(*t)).sum()
    }

    fn meets_alone(b: &WispBatcher, now: Instant, w: &PendingWork, tokens: usize) -> bool {
        w.deadline.is_none_or(|d| now + b.tq(w.shape(tokens)) <= d)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn wisp_keeps_on_time_members_on_time_and_late_work_last(
            mut works in prop::collection::vec(arb_work(Instant::now() + Duration::from_secs(3600)), 1..16)
        ) {
            let now = Instant::now() + Duration::from_secs(3600);
            for (i, w) in works.iter_mut().enumerate() {
                w.session = i as u64;
            }
            let mut b = batcher();
            let mut queue: VecDeque<PendingWork> = works.iter().cloned().collect();
            let batch = b.next_batch(now, &mut queue);
            prop_assert!(!batch.is_empty(), "with no batching delay a non-empty queue gives a batch");
            let members: Vec<(PendingWork, usize)> = batch.iter().map(|s| (s.work.clone(), s.tokens)).collect();
            let total: usize = members.iter().map(|m| m.1).sum();
            // Budgets: tokens and prefill chunks (a lone oversized request excepted).
            prop_assert!(total <= 48 || members.len() == 1, "{total} tokens");
            prop_assert!(members.len() <= 6);
            for (w, t) in &members {
                if w.kind == WorkKind::Prefill {
                    prop_assert!(*t <= 16 && *t <= w.tokens);
                } else {
                    prop_assert_eq!(*t, w.tokens);
                }
            }
            // Every member that could meet its deadline alone meets it in the batch.
            let end = now + b.tq(shape(&members));
            for (w, t) in &members {
                if meets_alone(&b, now, w, *t) {
                    prop_assert!(w.deadline.is_none_or(|d| end <= d), "an on-time member misses in the batch");
                }
            }
            // No on-time request due within YIELDS_TO_LATE_PASSES passes
            // waits behind a late one: if a late request was taken, each such one
            // left out could not have joined the on-time members. (Work
            // without a deadline is best-effort, as late work is: it is not
            // on-time work. Work with more slack yields to late work.)
            let (pool, horizon_ms) = b.candidates(now, &works.iter().cloned().collect());
            let relaxed = |w: &PendingWork| pool[w.session as usize].slack_ms > YIELDS_TO_LATE_PASSES * horizon_ms.max(1.0);
            let on_time_alone = |w: &PendingWork, t| w.deadline.is_some() && meets_alone(&b, now, w, t);
            let any_late = members.iter().any(|(w, t)| !meets_alone(&b, now, w, *t));
            if any_late {
                let on_time: Vec<(PendingWork, usize)> = members.iter().filter(|(w, t)| on_time_alone(w, *t)).cloned().collect();
                for w in queue.iter() {
                    let t = if w.kind == WorkKind::Prefill { w.tokens.min(16) } else { w.tokens };
                    if !on_time_alone(w, t) || relaxed(w) {
                        continue;
                    }
                    let mut with: Vec<(PendingWork, usize)> = on_time.clone();
                    with.push((w.clone(), t));
                    let tokens: usize = with.iter().map(|m| m.1).sum();
                    let end = now + b.tq(shape(&with));
                    let fits = tokens <= 48 && with.len() <= 6 && with.iter().all(|(m, _)| m.deadline.is_none_or(|d| end <= d));
                    prop_assert!(!fits, "an on-time request was left out while a late one ran");
                }
            }
        }
    }

    #[test]
    fn the_tenant_with_less_service_goes_first_under_contention() {
        let now = Instant::now();
        let mut b = WispBatcher::with_estimator(WispConfig { max_tokens: 10, max_seqs: 2, max_delay: Duration::ZERO, ..WispConfig::default() }, known());
        b.counters.charge("heavy", 0, 500);
        let w = |tenant: &str, session| PendingWork {
            session,
            tenant: tenant.into(),
            kind: WorkKind::Verify,
            tokens: 5,
            enqueued: now,
            deadline: None,
            context: 10,
            expected_tokens: 2.0,
        };
        let mut queue: VecDeque<_> = [w("heavy", 1), w("heavy", 2), w("light", 3)].into();
        let batch = b.next_batch(now, &mut queue);
        assert!(batch.iter().any(|s| s.work.tenant == "light"), "the light tenant waited behind the heavy one");
    }

    #[test]
    fn late_work_goes_before_work_far_ahead_of_its_pace() {
        // Six rounds with ten seconds of slack fill the six sequences of a
        // pass; a prompt already past its deadline, queued after them,
        // still gets a place: the rounds lose nothing by a pass's wait.
        let now = Instant::now() + Duration::from_secs(60);
        let work = |session, kind, tokens, deadline| PendingWork {
            session,
            tenant: "a".into(),
            kind,
            tokens,
            enqueued: now,
            deadline: Some(deadline),
            context: 10,
            expected_tokens: 2.0,
        };
        let mut queue: VecDeque<_> = (0..6).map(|i| work(i, WorkKind::Verify, 5, now + Duration::from_secs(10))).collect();
        queue.push_back(work(6, WorkKind::Prefill, 9, now - Duration::from_millis(100)));
        let batch = batcher().next_batch(now, &mut queue);
        assert_eq!(batch.len(), 6);
        assert!(batch.iter().any(|s| s.work.session == 6), "the late prompt waited behind rounds ten seconds from their deadlines");
    }

    #[test]
    fn suggested_k_is_long_where_tokens_are_cheap_and_short_where_they_cost() {
        let with = |coefficients| {
            let calibration = VerifyTimeCalibration { coefficients, quantile: 0.9, residual_ratios: vec![1.0; 64], gram: [[0.0; 5]; 5], moment: [0.0; 5] };
            WispBatcher::with_estimator(WispConfig::default(), VerifyTimeEstimator::from_calibration(&calibration, 1.0))
        };
        let expected = |k: usize| (0..=k).map(|j| 0.7f64.powi(j as i32)).sum::<f64>();
        // A pass costs about its weight read (a GPU): a long draft.
        let gpu = with([5.0, 0.01, 0.003, 0.005, 0.0]).suggested_k(&expected, 100).unwrap();
        assert!(gpu >= 6, "{gpu}");
        // A token costs 1 ms of compute (a CPU): every rejected draft is
        // paid for, so one draft is cheapest per token where a sequence
        // costs half a token, and a decode step on the server (k = 0)
        // where it costs little.
        assert_eq!(with([5.0, 0.5, 1.0, 0.0, 0.0]).suggested_k(&expected, 100), Some(1));
        assert_eq!(with([5.0, 0.05, 1.0, 0.0, 0.0]).suggested_k(&expected, 100), Some(0));
    }

    fn best_effort_case(tenant: &str, session: SessionId, deadline: Option<Instant>, enqueued: Instant) -> PendingWork {
        PendingWork { session, tenant: tenant.into(), kind: WorkKind::Verify, tokens: 2, enqueued, deadline, context: 10, expected_tokens: 1.5 }
    }

    #[test]
    fn work_without_a_deadline_rides_along_only_where_it_adds_little() {
        let now = Instant::now();
        let cfg = WispConfig { max_delay: Duration::ZERO, ..WispConfig::default() };
        let queue = || -> VecDeque<_> { [best_effort_case("a", 1, Some(now + Duration::from_secs(10)), now), best_effort_case("b", 2, None, now)].into() };
        let sessions = |batch: Vec<Scheduled>| batch.iter().map(|s| s.work.session).collect::<Vec<_>>();
        // Tokens cost compute (2 ms each): B would add about half to A's pass.
        let mut cpu = WispBatcher::with_estimator(cfg.clone(), known());
        let mut q = queue();
        assert_eq!(sessions(cpu.next_batch(now, &mut q)), vec![1]);
        assert_eq!(sessions(cpu.next_batch(now, &mut q)), vec![2], "and runs once the on-time work is done");
        // A pass costs about its weight read (a GPU): B rides along.
        let calibration = VerifyTimeCalibration {
            coefficients: [5.0, 0.01, 0.003, 0.005, 0.0],
            quantile: 0.9,
            residual_ratios: vec![1.0; 64],
            gram: [[0.0; 5]; 5],
            moment: [0.0; 5],
        };
        let mut gpu = WispBatcher::with_estimator(cfg.clone(), VerifyTimeEstimator::from_calibration(&calibration, 1.0));
        assert_eq!(sessions(gpu.next_batch(now, &mut queue())), vec![1, 2]);
        // Work that has waited `best_effort_wait` joins as on-time work.
        let mut q: VecDeque<_> =
            [best_effort_case("a", 1, Some(now + Duration::from_secs(10)), now), best_effort_case("b", 2, None, now - cfg.best_effort_wait)].into();
        assert_eq!(sessions(cpu.next_batch(now, &mut q)).len(), 2);
    }

    #[test]
    fn work_without_a_deadline_alone_ends_before_a_round_with_one_may_come() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut b = WispBatcher::with_estimator(WispConfig { max_delay: Duration::ZERO, ..WispConfig::default() }, known());
        // Alone, B's round takes 3 + 0.5 + 4 + ... ≈ 7.5 ms.
        let mut queue: VecDeque<_> = [best_effort_case("b", 2, None, now)].into();
        b.expect_next_rounds(RoundsDue { any: Some(now), with_deadline: Some(now + ms(5)) });
        assert!(b.next_batch(now, &mut queue).is_empty(), "it would still run when the round comes");
        b.expect_next_rounds(RoundsDue { any: Some(now), with_deadline: Some(now + ms(20)) });
        assert_eq!(b.next_batch(now, &mut queue).len(), 1, "it ends before the round comes");
        let mut queue: VecDeque<_> = [best_effort_case("b", 2, None, now)].into();
        b.expect_next_rounds(RoundsDue { any: Some(now), with_deadline: None });
        assert_eq!(b.next_batch(now, &mut queue).len(), 1, "no round with a deadline is awaited");
    }

    #[test]
    fn batching_delay_is_bounded() {
        let now = Instant::now();
        let mut b = WispBatcher::with_estimator(WispConfig { max_delay: Duration::from_millis(2), ..WispConfig::default() }, known());
        let relaxed = PendingWork {
            session: 1,
            tenant: "a".into(),
            kind: WorkKind::Verify,
            tokens: 3,
            enqueued: now,
            deadline: Some(now + Duration::from_secs(10)),
            context: 10,
            expected_tokens: 2.0,
        };
        // Nobody else is due: no wait.
        let mut queue: VecDeque<_> = [relaxed.clone()].into();
        b.expect_next_rounds(RoundsDue { any: Some(now + Duration::from_millis(30)), with_deadline: None });
        assert_eq!(b.next_batch(now, &mut queue).len(), 1, "a lone relaxed request waited for nobody");
        // Another session's round is due within the delay.
        let mut queue: VecDeque<_> = [relaxed].into();
        b.expect_next_rounds(RoundsDue { any: Some(now + Duration::from_millis(1)), with_deadline: None });
        assert!(b.next_batch(now, &mut queue).is_empty(), "a lone relaxed request waits for company");
        assert!(b.next_batch(now + Duration::from_millis(1), &mut queue).is_empty(), "an overdue round is still awaited");
        assert_eq!(b.next_batch(now + Duration::from_millis(2), &mut queue).len(), 1, "but not past max_delay");
    }
}
