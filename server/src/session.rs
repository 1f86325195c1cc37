//! A session as the runner holds it.

use crate::admission::{Demand, Ticket};
use crate::auth::Tenant;
use crate::batcher::{PendingWork, RoundClock, Scheduled, SessionId, WorkKind};
use crate::engine::OutSender;
use crate::validate::{ValidOpen, ValidVerify};
use crate::ServeError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_estimators::{AcceptanceEstimator, BatchShape};
use tandem_model::{KvCache, LogitsFor, SamplingParams};
use tandem_protocol::limits::MAX_DRAFT_TOKENS;
use tokio::sync::oneshot;

/// A verification waiting for its pass: the request, where its outcome
/// goes, and when it arrived.
pub(crate) type PendingVerify = (ValidVerify, oneshot::Sender<Result<(), ServeError>>, Instant);

/// One generation's state on the server: its KV cache and admission ticket
/// (KV reservation, tenant slot, demand), its tokens, sampling, objectives
/// and stream.
pub(crate) struct Session {
    pub(crate) tenant: Arc<Tenant>,
    pub(crate) cache: KvCache,
    pub(crate) ticket: Ticket,
    /// Prompt and every generated token; the last is not yet in the cache
    /// (once prefill is done).
    pub(crate) context: Vec<u32>,
    /// Positions of `context` to prefill before the session is open.
    pub(crate) prefill_target: usize,
    /// Generate a first token after prefill (false on resume).
    pub(crate) sample_first: bool,
    pub(crate) generated: usize,
    pub(crate) max_new: usize,
    pub(crate) sampling: SamplingParams,
    pub(crate) server_only: bool,
    /// Report hidden states; those of the prefill so far (the latest
    /// that fit in `opened.features`).
    pub(crate) want_features: bool,
    pub(crate) prefill_features: Vec<f32>,
    pub(crate) opened: bool,
    pub(crate) pending_verify: Option<PendingVerify>,
    pub(crate) out: OutSender,
    pub(crate) last_active: Instant,
    pub(crate) opened_at: Instant,
    pub(crate) ttft: Option<Duration>,
    pub(crate) tpot: Option<Duration>,
    /// When the first token of this connection went out, and `generated`
    /// then: the start of the session's TPOT pace.
    pub(crate) first_token: Option<(Instant, usize)>,
    /// Per-position acceptance of this session's drafts.
    pub(crate) acceptance: AcceptanceEstimator,
    /// Draft length of the last round (for hints).
    pub(crate) last_k: usize,
    /// When its edge should send the next round.
    pub(crate) round_clock: RoundClock,
}

impl Session {
    /// A queue entry for `tokens` of `kind` work, with the deadline its SLO
    /// sets: TTFT from the open for prefill, the TPOT budget of the tokens
    /// a round is expected to yield for verification and decode.
    pub(crate) fn work(&self, id: SessionId, kind: WorkKind, tokens: usize, now: Instant) -> PendingWork {
        let expected_tokens = match kind {
            WorkKind::Verify => self.acceptance.expected_tokens(tokens - 1),
            WorkKind::Prefill | WorkKind::Decode => 1.0,
        };
        let pace = self.first_token.map(|(first_token_at, base)| Pace { first_token_at, tokens_since: self.generated - base });
        let deadline = work_deadline(kind, self.opened_at, pace, now, self.ttft, self.tpot, expected_tokens);
        PendingWork { session: id, tenant: self.tenant.name.clone(), kind, tokens, enqueued: now, deadline, context: self.cache.len(), expected_tokens }
    }

    /// What the session asks of each cycle now, for admission.
    pub(crate) fn demand(&self) -> Demand {
        let (tokens, expected) = if self.server_only { (1, 1.0) } else { (self.last_k + 1, self.acceptance.expected_tokens(self.last_k)) };
        round_demand(tokens, self.context.len() + (self.max_new - self.generated) / 2, self.tpot, expected)
    }

    pub(crate) fn finished(&self, eos: &[u32]) -> bool {
        self.generated >= self.max_new || (self.generated > 0 && self.context.last().is_some_and(|t| eos.contains(t)))
    }
}

/// Where a generation stands against its TPOT objective: when its first
/// token left the server and how many tokens it has produced since.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub first_token_at: Instant,
    pub tokens_since: usize,
}

/// A deadline is never set closer than this share of the round's own TPOT
/// budget from now: a session behind its pace is urgent, not written off
/// as already late (TPOT is an average, so it can still catch up).
const MIN_ROUND_BUDGET: f64 = 0.5;

/// The deadline a session's SLO sets for a request queued at `now`: TTFT
/// from the open for prefill; otherwise the time its pace is due to reach
/// the tokens this round (or decode step) is expected to yield — the first
/// token's time plus TPOT per token since — so slack a session gained
/// (a fast device) or lost (slow drafting, a long round trip) carries over
/// from round to round. Without a pace yet, the round's own TPOT budget.
/// Public for the simulator.
pub fn work_deadline(
    kind: WorkKind,
    opened_at: Instant,
    pace: Option<Pace>,
    now: Instant,
    ttft: Option<Duration>,
    tpot: Option<Duration>,
    expected_tokens: f64,
) -> Option<Instant> {
    match kind {
        WorkKind::Prefill => ttft.map(|t| opened_at + t),
        WorkKind::Verify | WorkKind::Decode => tpot.map(|t| {
            let floor = now + t.mul_f64(expected_tokens * MIN_ROUND_BUDGET);
            match pace {
                Some(p) => (p.first_token_at + t.mul_f64(p.tokens_since as f64 + expected_tokens)).max(floor),
                None => now + t.mul_f64(expected_tokens),
            }
        }),
    }
}

/// The tokens a scheduled request feeds to the model, and which logits it needs.
pub(crate) fn feed(s: &Scheduled, sess: &Session) -> (Vec<u32>, LogitsFor) {
    match s.work.kind {
        WorkKind::Prefill => {
            let from = sess.cache.len();
            let to = from + s.tokens;
            let logits = if to == sess.prefill_target && sess.sample_first { LogitsFor::Last } else { LogitsFor::None };
            (sess.context[from..to].to_vec(), logits)
        }
        WorkKind::Verify => {
            let mut tokens = vec![*sess.context.last().expect("non-empty")];
            if let Some((v, _, _)) = &sess.pending_verify {
                tokens.extend_from_slice(&v.draft);
            }
            (tokens, LogitsFor::All)
        }
        WorkKind::Decode => (vec![*sess.context.last().expect("non-empty")], LogitsFor::Last),
    }
}

/// Draft length assumed for a session that has not sent a round yet.
const ASSUMED_DRAFTS: usize = 4;

/// A fresh session's per-position acceptance: a 0.5 prior, EWMA weight 0.2.
pub fn new_acceptance() -> AcceptanceEstimator {
    AcceptanceEstimator::new(MAX_DRAFT_TOKENS, 0.5, 0.2)
}

/// An opening session's demand: the assumed draft length at the prior
/// acceptance, at the context half way through its generation.
pub(crate) fn opening_demand(open: &ValidOpen) -> Demand {
    let (tokens, expected) = if open.server_only { (1, 1.0) } else { (ASSUMED_DRAFTS + 1, new_acceptance().expected_tokens(ASSUMED_DRAFTS)) };
    let tpot = open.tpot_ms.map(|ms| Duration::from_millis(ms.into()));
    round_demand(tokens, open.prompt.len() + (open.max_new_tokens - open.resumed) / 2, tpot, expected)
}

fn round_demand(tokens: usize, context: usize, tpot: Option<Duration>, expected_tokens: f64) -> Demand {
    Demand {
        round: BatchShape { seqs: 1, tokens, token_context: tokens * (context + tokens), prefill_tokens: 0 },
        budget_ms: tpot.map(|t| t.as_secs_f64() * 1e3 * expected_tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_deadlines_follow_the_sessions_pace() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let tpot = Some(ms(100));
        let at = |pace, now| work_deadline(WorkKind::Verify, t0, pace, now, None, tpot, 2.0).unwrap();
        // Before the first token: the round's own budget.
        assert_eq!(at(None, t0 + ms(5)), t0 + ms(205));
        // On pace: 10 tokens after the first at +1 s; 2 more are due at +1.2 s.
        let pace = Pace { first_token_at: t0, tokens_since: 10 };
        assert_eq!(at(Some(pace), t0 + ms(1000)), t0 + ms(1200));
        // Ahead of pace (a fast device) the slack carries over...
        assert_eq!(at(Some(pace), t0 + ms(300)), t0 + ms(1200));
        // ...behind it the deadline tightens, but never below half the round's budget.
        assert_eq!(at(Some(pace), t0 + ms(1150)), t0 + ms(1250));
        // Prefill: TTFT from the open.
        assert_eq!(work_deadline(WorkKind::Prefill, t0, Some(pace), t0 + ms(50), Some(ms(700)), tpot, 1.0), Some(t0 + ms(700)));
    }
}
