//! Choosing what runs in the next forward pass. Pure: no clock, no I/O
//! (time is passed in), so batchers are tested alone and the simulator can
//! reuse them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tandem_estimators::{BatchShape, VerifyTimeCalibration, VerifyTimeEstimator};

/// Opaque session handle.
pub type SessionId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkKind {
    /// Prompt tokens still to prefill (chunkable).
    Prefill,
    /// The pending token plus k drafts.
    Verify,
    /// One server-only decode step.
    Decode,
}

/// One session's request for a share of a pass.
#[derive(Clone, Debug)]
pub struct PendingWork {
    pub session: SessionId,
    pub tenant: String,
    pub kind: WorkKind,
    /// Tokens it needs (for prefill: all that remain).
    pub tokens: usize,
    /// When it was queued.
    pub enqueued: Instant,
    /// When it must be done to meet its session's SLO (None: no objective).
    pub deadline: Option<Instant>,
    /// Positions already in the session's KV cache (attention work).
    pub context: usize,
    /// Tokens it is expected to yield (E_r; 1 for prefill and decode).
    pub expected_tokens: f64,
}

impl PendingWork {
    /// The shape of running `tokens` of this request.
    pub fn shape(&self, tokens: usize) -> BatchShape {
        BatchShape { seqs: 1, tokens, token_context: tokens * (self.context + tokens), prefill_tokens: if self.kind == WorkKind::Prefill { tokens } else { 0 } }
    }
}

/// A request chosen for the next pass, with the tokens it gets now (less
/// than asked only for a prefill chunk).
#[derive(Clone, Debug)]
pub struct Scheduled {
    pub work: PendingWork,
    pub tokens: usize,
}

impl Scheduled {
    /// What it costs its tenant's service counter: (prefill tokens,
    /// verified positions; a decode step verifies one).
    pub fn service(&self) -> (usize, usize) {
        if self.work.kind == WorkKind::Prefill {
            (self.tokens, 0)
        } else {
            (0, self.tokens)
        }
    }
}

/// The shape of a whole batch.
pub fn batch_shape(batch: &[Scheduled]) -> BatchShape {
    batch.iter().map(|s| s.work.shape(s.tokens)).sum()
}

/// Picks the next batch from the queue (removing what it takes). An empty
/// batch with work queued means "wait up to `max_delay` for more".
pub trait Batcher: Send {
    fn next_batch(&mut self, now: Instant, queue: &mut VecDeque<PendingWork>) -> Vec<Scheduled>;
    /// Feedback: what ran and how long it took.
    fn executed(&mut self, _batch: &[Scheduled], _measured_ms: f64) {}
    /// Estimated (expected, upper bound T_q) time of a pass of this shape,
    /// ms (None: no estimator).
    fn estimate_ms(&self, _shape: BatchShape) -> Option<(f64, f64)> {
        None
    }
    /// The draft length (1..=8) this batcher would have a session with
    /// `expected_tokens(k)` per round at `context` use (None: no opinion).
    fn suggested_k(&self, _expected_tokens: &dyn Fn(usize) -> f64, _context: usize) -> Option<usize> {
        None
    }
    /// The verification-time estimator, for admission (None: no estimator).
    fn estimator(&self) -> Option<&VerifyTimeEstimator> {
        None
    }
    /// Calibrates from a profiling sweep at start (shape, measured ms).
    fn warm_start(&mut self, _samples: &[(BatchShape, f64)]) {}
    /// Calibrates from an earlier start's calibration instead.
    fn restore(&mut self, _calibration: &VerifyTimeCalibration) {}
    fn set_tenant_weight(&mut self, _tenant: &str, _weight: f64) {}
    /// Fair-share counters per tenant, for metrics.
    fn tenant_counters(&self) -> Vec<(String, f64)> {
        vec![]
    }
    fn max_delay(&self) -> Duration {
        Duration::ZERO
    }
    /// When sessions waiting on their edges are expected to send their
    /// next rounds (see [`RoundClock`]), before each `next_batch`.
    fn expect_next_rounds(&mut self, _due: RoundsDue) {}
}

/// The first next round expected from the sessions waiting on their edges.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundsDue {
    /// Of any session, at its usual gap.
    pub any: Option<Instant>,
    /// The soonest a round with a deadline (of a session with a TPOT
    /// objective) may come, of those not yet overdue by more than a grace:
    /// work without a deadline must not hold it up.
    pub with_deadline: Option<Instant>,
}

impl RoundsDue {
    /// From each waiting session's clock and whether its rounds have
    /// deadlines. A round overdue by more than `grace` past its usual gap
    /// is no longer waited for (its edge may have gone).
    pub fn from_clocks<'a>(now: Instant, grace: Duration, clocks: impl IntoIterator<Item = (&'a RoundClock, bool)>) -> RoundsDue {
        let mut due = RoundsDue::default();
        let earlier = |a: Option<Instant>, b: Instant| Some(a.map_or(b, |a| a.min(b)));
        for (clock, with_deadline) in clocks {
            let (Some(usual), Some(soonest)) = (clock.due(), clock.soonest()) else { continue };
            due.any = earlier(due.any, usual);
            if with_deadline && now < usual + grace {
                due.with_deadline = earlier(due.with_deadline, soonest);
            }
        }
        due
    }
}

/// When a session's next verification round should reach the server: when
/// its last verdict (or `Opened`) left, plus its usual gap, drafting and the
/// network (an EWMA over its rounds). The runner and the simulator keep one
/// per session, for the batcher's delay decision and the catch-up a
/// round's deadline may count on (`work_deadline`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundClock {
    answered: Option<Instant>,
    gap: Option<Duration>,
    /// Lower envelope of the gaps: drops to a shorter gap at once, rises
    /// slowly (an edge whose draft length varies sends some rounds much
    /// sooner than its average).
    short_gap: Option<Duration>,
}

impl RoundClock {
    /// A verdict or `Opened` left for the edge.
    pub fn answered(&mut self, now: Instant) {
        self.answered = Some(now);
    }

    /// The session's next round arrived.
    pub fn arrived(&mut self, now: Instant) {
        if let Some(answered) = self.answered.take() {
            let gap = now.saturating_duration_since(answered);
            self.gap = Some(self.gap.map_or(gap, |g| g.mul_f64(0.7) + gap.mul_f64(0.3)));
            self.short_gap = Some(self.short_gap.map_or(gap, |s| if gap < s { gap } else { s.mul_f64(0.9) + gap.mul_f64(0.1) }));
        }
    }

    /// The session's usual time between a verdict and its next round
    /// (drafting plus the network), once seen.
    pub fn gap(&self) -> Option<Duration> {
        self.gap
    }

    /// When the next round is due (None: one is queued, none is expected,
    /// or no gap has been seen yet).
    pub fn due(&self) -> Option<Instant> {
        Some(self.answered? + self.gap?)
    }

    /// The soonest the next round is likely to come: at the shortest gaps
    /// seen lately.
    pub fn soonest(&self) -> Option<Instant> {
        Some(self.answered? + self.short_gap?)
    }
}

/// First come, first served, up to a token and a sequence budget (the SLED
/// baseline's policy). Prefill is cut into chunks that fit, so a long prompt
/// never stalls the queue behind it for more than one pass.
pub struct FifoBatcher {
    pub max_tokens: usize,
    pub max_seqs: usize,
}

impl Batcher for FifoBatcher {
    fn next_batch(&mut self, _now: Instant, queue: &mut VecDeque<PendingWork>) -> Vec<Scheduled> {
        let mut batch = Vec::new();
        let mut room = self.max_tokens;
        while batch.len() < self.max_seqs {
            let Some(front) = queue.front() else { break };
            let take = if front.kind == WorkKind::Prefill { front.tokens.min(room) } else { front.tokens };
            if take == 0 || take > room {
                break;
            }
            let work = queue.pop_front().expect("front exists");
            room -= take;
            batch.push(Scheduled { work, tokens: take });
        }
        // Always make progress: a single request larger than the budget runs alone.
        if batch.is_empty() {
            if let Some(work) = queue.pop_front() {
                let tokens = if work.kind == WorkKind::Prefill { work.tokens.min(self.max_tokens.max(1)) } else { work.tokens };
                batch.push(Scheduled { work, tokens });
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(session: SessionId, kind: WorkKind, tokens: usize, now: Instant) -> PendingWork {
        PendingWork { session, tenant: "t".into(), kind, tokens, enqueued: now, deadline: None, context: 0, expected_tokens: 1.0 }
    }

    #[test]
    fn fifo_fills_the_token_budget_in_order_and_chunks_prefill() {
        let now = Instant::now();
        let mut queue: VecDeque<_> = [work(1, WorkKind::Verify, 5, now), work(2, WorkKind::Prefill, 100, now), work(3, WorkKind::Verify, 5, now)].into();
        let mut b = FifoBatcher { max_tokens: 32, max_seqs: 8 };
        let batch = b.next_batch(now, &mut queue);
        let got: Vec<(SessionId, usize)> = batch.iter().map(|s| (s.work.session, s.tokens)).collect();
        // Session 2's prefill gets the 27 tokens left; session 3 waits its turn.
        assert_eq!(got, vec![(1, 5), (2, 27)]);
        assert_eq!(queue.len(), 1);
        assert_eq!(queue[0].session, 3);
    }

    #[test]
    fn a_round_is_due_one_usual_gap_after_its_verdict() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut clock = RoundClock::default();
        clock.answered(t);
        assert_eq!(clock.due(), None, "no gap seen yet");
        clock.arrived(t + ms(40));
        assert_eq!(clock.due(), None, "a round is queued");
        clock.answered(t + ms(50));
        assert_eq!(clock.due(), Some(t + ms(90)));
        clock.arrived(t + ms(70));
        clock.answered(t + ms(80));
        // 0.7 · 40 + 0.3 · 20 = 34 ms.
        assert_eq!(clock.due(), Some(t + ms(114)));
        assert_eq!(clock.gap(), Some(ms(34)));
        // The shortest gap lately: 20 ms at once, rising a tenth of the way
        // to a longer one.
        assert_eq!(clock.soonest(), Some(t + ms(100)));
        clock.arrived(t + ms(120));
        clock.answered(t + ms(130));
        assert_eq!(clock.soonest(), Some(t + ms(152)));
    }

    #[test]
    fn rounds_with_deadlines_are_awaited_from_their_soonest_until_overdue() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Gaps of 10 then 30 ms: usual 16, soonest 12 after the verdict at 40.
        let mut clock = RoundClock::default();
        clock.answered(t);
        clock.arrived(t + ms(10));
        clock.answered(t + ms(10));
        clock.arrived(t + ms(40));
        clock.answered(t + ms(40));
        let (usual, soonest) = (clock.due().unwrap(), clock.soonest().unwrap());
        assert_eq!((usual, soonest), (t + ms(56), t + ms(52)));
        let due = |now, with_deadline| RoundsDue::from_clocks(now, ms(2), [(&clock, with_deadline)]);
        assert_eq!(due(t + ms(45), true).with_deadline, Some(soonest));
        assert_eq!(due(t + ms(45), true).any, Some(usual));
        assert_eq!(due(t + ms(45), false).with_deadline, None, "a session without a TPOT objective");
        assert_eq!(due(t + ms(57), true).with_deadline, Some(soonest), "within the grace");
        assert_eq!(due(t + ms(58), true).with_deadline, None, "overdue past the grace: not awaited");
    }

    #[test]
    fn fifo_respects_the_sequence_cap_and_always_progresses() {
        let now = Instant::now();
        let mut queue: VecDeque<_> = (0..5).map(|i| work(i, WorkKind::Decode, 1, now)).collect();
        let mut b = FifoBatcher { max_tokens: 100, max_seqs: 2 };
        assert_eq!(b.next_batch(now, &mut queue).len(), 2);
        let mut big: VecDeque<_> = [work(9, WorkKind::Verify, 17, now)].into();
        let mut tiny = FifoBatcher { max_tokens: 8, max_seqs: 2 };
        let batch = tiny.next_batch(now, &mut big);
        assert_eq!((batch[0].work.session, batch[0].tokens), (9, 17));
    }
}
