//! A session as the runner holds it.

use crate::admission::{prefill_shape, Demand, Ticket, DECODED_PACE_TOKENS};
use crate::auth::Tenant;
use crate::batcher::{PendingWork, RoundClock, Scheduled, SessionId, WorkKind};
use crate::engine::OutSender;
use crate::validate::{ValidOpen, ValidVerify};
use crate::ServeError;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_estimators::{AcceptanceEstimator, BatchShape};
use tandem_model::{KvCache, Logits, LogitsFor, SamplingParams, TokenLogprob};
use tandem_protocol::limits::{MAX_DRAFT_TOKENS, MAX_FEATURE_BYTES};
use tandem_protocol::wire::{TokenLogprob as WireLogprob, TopLogprob as WireTop};
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
    /// Decoded here since its edge handed it off (`server_only` as well):
    /// handed back to the edge's drafts where that pays (`hands_back`).
    pub(crate) handed_off: Option<HandedOff>,
    /// Report hidden states; those not sent yet: of the prefill so far,
    /// for `opened`, or of the positions decoded since a hand-off, for the
    /// hand-back (the latest that fit in one message).
    pub(crate) want_features: bool,
    pub(crate) held_features: Vec<f32>,
    /// Report generated tokens' log-probabilities, with this many
    /// alternatives (None: none).
    pub(crate) logprobs: Option<usize>,
    /// Also the prompt's: its prefill passes compute every position's logits.
    pub(crate) prompt_logprobs: bool,
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
    /// Drafts verified in its last round (None before its first).
    pub(crate) last_k: Option<usize>,
    /// When its edge should send the next round.
    pub(crate) round_clock: RoundClock,
}

impl Session {
    /// The wire log-probabilities of `emitted`, the i-th read from row i
    /// of `logits`; none unless the session asked for them.
    pub(crate) fn logprobs_of(&self, logits: &Logits, emitted: &[u32]) -> Vec<WireLogprob> {
        emitted.iter().enumerate().flat_map(|(i, &t)| self.logprobs_of_row(logits, i, t)).collect()
    }

    /// Row `row`'s for `token`, as [`Self::logprobs_of`].
    pub(crate) fn logprobs_of_row(&self, logits: &Logits, row: usize, token: u32) -> Vec<WireLogprob> {
        let Some(top) = self.logprobs else { return vec![] };
        let lp = TokenLogprob::from_logits(logits.row(row), token, top);
        vec![WireLogprob { token: lp.token, logprob: lp.logprob, top: lp.top.iter().map(|t| WireTop { token: t.token, logprob: t.logprob }).collect() }]
    }

    /// Holds `states` (rows of `hidden`) to send later, keeping the latest
    /// `MAX_FEATURE_BYTES` of them.
    pub(crate) fn hold_features(&mut self, states: &[f32], hidden: usize) {
        self.held_features.extend_from_slice(states);
        let most = MAX_FEATURE_BYTES / 2 / hidden * hidden;
        if self.held_features.len() > most {
            self.held_features.drain(..self.held_features.len() - most);
        }
    }

    /// A queue entry for `tokens` of `kind` work, with the deadline its SLO
    /// sets: TTFT from the open for prefill, the TPOT budget of the tokens
    /// a round is expected to yield for verification and decode.
    /// `pass`: what a pass takes lately; `reach`: how long generations
    /// here usually get (both for the catch-up a round may count on, see
    /// `Pace`).
    pub(crate) fn work(&self, id: SessionId, kind: WorkKind, tokens: usize, now: Instant, pass: Duration, reach: Option<usize>) -> PendingWork {
        let expected_tokens = match kind {
            WorkKind::Verify => self.acceptance.expected_tokens(tokens - 1),
            WorkKind::Prefill | WorkKind::Decode => 1.0,
        };
        let pace = self.first_token.map(|(first_token_at, base)| Pace {
            first_token_at,
            tokens_since: self.generated - base,
            prompt_per_token: prompt_per_token(self.server_only, self.round_clock.gap(), pass, expected_tokens),
            tokens_left: tokens_left(self.max_new, reach, self.generated, expected_tokens),
        });
        let deadline = work_deadline(kind, self.opened_at, pace, now, self.ttft, self.tpot, expected_tokens);
        PendingWork { session: id, tenant: self.tenant.name.clone(), kind, tokens, enqueued: now, deadline, context: self.cache.len(), expected_tokens }
    }

    /// What the session asks of each cycle now, for admission: its last
    /// round's, or before its first, the typical round's.
    pub(crate) fn demand(&self, typical: Option<TypicalRound>) -> Demand {
        let last = self.last_k.map(|k| (k, self.acceptance.expected_tokens(k)));
        let prefill_left = prefill_shape(self.prefill_target.saturating_sub(self.cache.len()), self.prefill_target);
        let demand = round_demand(self.server_only, last, typical, self.context.len() + (self.max_new - self.generated) / 2, self.tpot, prefill_left);
        demand.with_successor(self.prefill_target, self.max_new, self.tpot)
    }

    /// Its time per token since its first on this connection, ms (None
    /// before it has more than one).
    pub(crate) fn ms_per_token(&self, now: Instant) -> Option<f64> {
        let (at, base) = self.first_token?;
        let tokens = self.generated.checked_sub(base).filter(|&n| n > 0)?;
        Some(now.saturating_duration_since(at).as_secs_f64() * 1e3 / tokens as f64)
    }

    /// Whether it reached `max_new` tokens or a stop token (`eos`: the model's).
    pub(crate) fn finished(&self, eos: &[u32]) -> bool {
        let stop = self.sampling.stop_tokens(eos);
        self.generated >= self.max_new || (self.generated > 0 && self.context.last().is_some_and(|t| stop.contains(t)))
    }
}

/// Where a session stood when its edge handed it off: when, its tokens
/// then, and its time per token until then (ms). Public for the simulator.
#[derive(Clone, Copy, Debug)]
pub struct HandedOff {
    pub at: Instant,
    pub generated: usize,
    pub drafting_ms: Option<f64>,
}

impl HandedOff {
    /// Its time per token drafting and, after `DECODED_PACE_TOKENS`,
    /// decoded (ms), with `generated` tokens at `now`: what `hands_back`
    /// compares.
    pub fn paces(&self, now: Instant, generated: usize) -> (Option<f64>, Option<f64>) {
        let decoded = generated.saturating_sub(self.generated);
        let decoded_ms = (decoded >= DECODED_PACE_TOKENS).then(|| now.saturating_duration_since(self.at).as_secs_f64() * 1e3 / decoded as f64);
        (self.drafting_ms, decoded_ms)
    }
}

/// Where a generation stands against its TPOT objective: when its first
/// token left the server and how many tokens it has produced since.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub first_token_at: Instant,
    pub tokens_since: usize,
    /// The session's time per token when each of its rounds is verified
    /// at once: its edge's gap between rounds plus a pass, over the tokens
    /// a round yields (None until a gap has been seen).
    pub prompt_per_token: Option<Duration>,
    /// Tokens it is likely to generate after this request (`tokens_left`).
    pub tokens_left: usize,
}

/// A deadline is never set closer than this share of the round's own TPOT
/// budget from now: a session behind its pace is urgent, not written off
/// as already late (TPOT is an average, so it can still catch up).
const MIN_ROUND_BUDGET: f64 = 0.5;
/// The same for a decode step on the server: its whole budget. A session
/// the server decodes gains a token a pass; at half a budget, behind-pace
/// steps cut every pass to half a TPOT, where a pass that costs compute
/// pays its fixed cost more often per token than it saves. (Simulated
/// A100, vLLM's pass caps: WISP's capacity 224 → 236 devices, mean of
/// four seeds, peak goodput 1540 → 1676 tok/s; this CPU's calibration and
/// the H100 cases unchanged within a device over 20 and 1 seeds.)
const MIN_DECODE_BUDGET: f64 = 1.0;

/// Tokens over which a round served behind its pace is to be made up:
/// TPOT is an average, so a session whose rounds take less than TPOT per
/// token when served at once can fall behind by what this many of them win
/// back.
/// A burst of opening sessions then gets the passes it needs for its TTFT
/// instead of young sessions' rounds being served exactly on pace.
const CATCH_UP_TOKENS: usize = 16;

/// A session's time per token when each of its rounds is served at once
/// (`Pace::prompt_per_token`): its edge's `gap` between rounds plus a
/// pass, over the tokens a round yields; a pass a token where the server
/// decodes it (no gap). Public for the simulator.
pub fn prompt_per_token(server_only: bool, gap: Option<Duration>, pass: Duration, expected_tokens: f64) -> Option<Duration> {
    if server_only {
        return Some(pass);
    }
    gap.map(|gap| (gap + pass).div_f64(expected_tokens.max(1.0)))
}

/// Tokens a generation at `generated` is likely to go on to after a round
/// yielding `expected`: up to `max_new`, or to `reach` (what nine in ten
/// recent generations reached) if that comes first. Public for the simulator.
pub fn tokens_left(max_new: usize, reach: Option<usize>, generated: usize, expected: f64) -> usize {
    (max_new.min(reach.unwrap_or(max_new)).saturating_sub(generated) as f64 - expected).max(0.0) as usize
}

/// Lengths of the generations that ended lately. A round served behind its
/// pace is made up only if the generation goes on long enough: one that
/// stops at end-of-sequence first misses its TPOT (the overload test's
/// chat answers of four tokens did, 21 % of them, when every round counted
/// on `max_new_tokens`).
#[derive(Clone, Debug, Default)]
pub struct RecentLengths {
    lengths: VecDeque<usize>,
    /// `reach()`, kept as lengths are recorded (it is read for every round).
    reach: Option<usize>,
}

impl RecentLengths {
    const KEEP: usize = 64;

    pub fn record(&mut self, generated: usize) {
        if self.lengths.len() == Self::KEEP {
            self.lengths.pop_front();
        }
        self.lengths.push_back(generated);
        let mut sorted: Vec<usize> = self.lengths.iter().copied().collect();
        sorted.sort_unstable();
        self.reach = sorted.get(sorted.len() / 10).copied();
    }

    /// What nine in ten recent generations reached (None before any ended).
    pub fn reach(&self) -> Option<usize> {
        self.reach
    }
}

/// The deadline a session's SLO sets for a request queued at `now`: TTFT
/// from the open for prefill; otherwise the time its pace is due to reach
/// the tokens this round (or decode step) is expected to yield — the first
/// token's time plus TPOT per token since — so slack a session gained
/// (a fast device) or lost (slow drafting, a long round trip) carries over
/// from round to round, plus the catch-up the session's prompt pace
/// allows (`CATCH_UP_TOKENS`). Without a pace yet, the round's own TPOT
/// budget. Public for the simulator.
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
            let floor = now + t.mul_f64(expected_tokens * if kind == WorkKind::Decode { MIN_DECODE_BUDGET } else { MIN_ROUND_BUDGET });
            match pace {
                Some(p) => {
                    let on_pace = p.first_token_at + t.mul_f64(p.tokens_since as f64 + expected_tokens);
                    let catch_up =
                        p.prompt_per_token.filter(|&fast| fast < t).map_or(Duration::ZERO, |fast| (t - fast) * CATCH_UP_TOKENS.min(p.tokens_left) as u32);
                    (on_pace + catch_up).max(floor)
                }
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
            let logits = match (sess.prompt_logprobs, to == sess.prefill_target && sess.sample_first) {
                (true, _) => LogitsFor::All,
                (false, true) => LogitsFor::Last,
                (false, false) => LogitsFor::None,
            };
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
pub(crate) const ASSUMED_DRAFTS: usize = 4;

/// A fresh session's per-position acceptance: a 0.5 prior, EWMA weight 0.2.
pub fn new_acceptance() -> AcceptanceEstimator {
    AcceptanceEstimator::new(MAX_DRAFT_TOKENS, 0.5, 0.2)
}

/// What the verified rounds of sessions past their first look like now:
/// the mean number of drafts verified and of tokens a round yields. A new
/// session is costed at it for admission until its own first round: the
/// edges' controllers pick k from the server's hints and the server clips
/// drafts to what the session's tenant reaches, so a round here is often
/// one or two drafts, not the four assumed before any is seen (which made
/// admission refuse half of a burst of sessions it then served on time).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TypicalRound {
    pub drafts: f64,
    pub expected_tokens: f64,
}

impl Default for TypicalRound {
    /// Before any round is seen: the assumed draft length at the prior acceptance.
    fn default() -> Self {
        TypicalRound { drafts: ASSUMED_DRAFTS as f64, expected_tokens: new_acceptance().expected_tokens(ASSUMED_DRAFTS) }
    }
}

impl TypicalRound {
    /// The mean over `rounds` of (drafts, expected tokens); None if empty.
    pub fn of(rounds: impl Iterator<Item = (usize, f64)>) -> Option<TypicalRound> {
        let (n, drafts, expected) = rounds.fold((0usize, 0usize, 0.0), |(n, d, e), (k, x)| (n + 1, d + k, e + x));
        (n > 0).then(|| TypicalRound { drafts: drafts as f64 / n as f64, expected_tokens: expected / n as f64 })
    }

    /// Tokens a round verifies (drafts rounded up, plus the last token) and
    /// the tokens it yields.
    fn shape(self) -> (usize, f64) {
        (self.drafts.ceil() as usize + 1, self.expected_tokens)
    }
}

/// An opening session's demand: the typical round, at the context half way
/// through its generation, and its whole prompt to prefill.
pub(crate) fn opening_demand(open: &ValidOpen, typical: Option<TypicalRound>) -> Demand {
    let tpot = open.tpot_ms.map(|ms| Duration::from_millis(ms.into()));
    let prefill_left = prefill_shape(open.prefill_target(), open.prefill_target());
    let demand = round_demand(open.server_only, None, typical, open.prompt.len() + (open.max_new_tokens - open.resumed) / 2, tpot, prefill_left);
    demand.with_successor(open.prefill_target(), open.max_new_tokens, tpot)
}

/// What a session asks of each cycle, for admission: a decode step if the
/// server generates alone, else its `last` round's (drafts verified,
/// tokens expected) or, before its first, the typical round's; at
/// `context` (half way through its generation); and its prompt still to
/// prefill. Public for the simulator.
pub fn round_demand(
    server_only: bool,
    last: Option<(usize, f64)>,
    typical: Option<TypicalRound>,
    context: usize,
    tpot: Option<Duration>,
    prefill_left: BatchShape,
) -> Demand {
    let (tokens, expected_tokens) = match (server_only, last) {
        (true, _) => (1, 1.0),
        (false, Some((k, expected))) => (k + 1, expected),
        (false, None) => typical.unwrap_or_default().shape(),
    };
    Demand {
        round: BatchShape { seqs: 1, tokens, token_context: tokens * (context + tokens), prefill_tokens: 0 },
        budget_ms: tpot.map(|t| t.as_secs_f64() * 1e3 * expected_tokens),
        paced_by_server: server_only,
        prefill_left,
        context,
        tpot_ms: tpot.map(|t| t.as_secs_f64() * 1e3),
        ..Demand::default()
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
        let pace = Pace { first_token_at: t0, tokens_since: 10, prompt_per_token: None, tokens_left: 30 };
        assert_eq!(at(Some(pace), t0 + ms(1000)), t0 + ms(1200));
        // Ahead of pace (a fast device) the slack carries over...
        assert_eq!(at(Some(pace), t0 + ms(300)), t0 + ms(1200));
        // ...behind it the deadline tightens, but never below half the round's budget,
        // or a decode step's whole budget.
        assert_eq!(at(Some(pace), t0 + ms(1150)), t0 + ms(1250));
        assert_eq!(work_deadline(WorkKind::Decode, t0, Some(pace), t0 + ms(1150), None, tpot, 1.0), Some(t0 + ms(1250)));
        // A session whose rounds take 40 ms a token when served at once
        // may fall behind by what 16 of them win back: 16 × 60 ms...
        let quick = Pace { prompt_per_token: Some(ms(40)), ..pace };
        assert_eq!(at(Some(quick), t0 + ms(1000)), t0 + ms(1200 + 960));
        // ...or fewer near its end...
        assert_eq!(at(Some(Pace { tokens_left: 5, ..quick }), t0 + ms(1000)), t0 + ms(1200 + 300));
        // ...and not at all if it is no quicker than its objective.
        assert_eq!(at(Some(Pace { prompt_per_token: Some(ms(120)), ..pace }), t0 + ms(1000)), t0 + ms(1200));
        // Served at once, a round takes its edge's gap plus a pass; a
        // session the server decodes takes a pass a token.
        assert_eq!(prompt_per_token(false, Some(ms(60)), ms(40), 2.0), Some(ms(50)));
        assert_eq!(prompt_per_token(false, None, ms(40), 2.0), None);
        assert_eq!(prompt_per_token(true, None, ms(40), 1.0), Some(ms(40)));
        // Prefill: TTFT from the open.
        assert_eq!(work_deadline(WorkKind::Prefill, t0, Some(pace), t0 + ms(50), Some(ms(700)), tpot, 1.0), Some(t0 + ms(700)));
    }

    #[test]
    fn catch_up_counts_only_on_tokens_generations_here_reach() {
        let mut lengths = RecentLengths::default();
        assert_eq!(lengths.reach(), None);
        assert_eq!(tokens_left(48, lengths.reach(), 10, 2.0), 36, "no history: max_new_tokens");
        // Nine in ten of the last 64 reached 12 tokens or more.
        for i in 0..100 {
            lengths.record(if i % 10 == 0 { 4 } else { 12 + i % 7 });
        }
        assert_eq!(lengths.reach(), Some(12));
        assert_eq!(tokens_left(48, lengths.reach(), 10, 1.5), 0);
        assert_eq!(tokens_left(48, lengths.reach(), 3, 1.5), 7);
        assert_eq!(tokens_left(8, lengths.reach(), 3, 1.5), 3, "max_new_tokens first");
    }

    #[test]
    fn a_new_session_is_costed_at_the_typical_round() {
        assert_eq!(TypicalRound::of(std::iter::empty()), None);
        let typical = TypicalRound::of([(1, 1.6), (2, 2.0), (2, 2.4)].into_iter()).unwrap();
        assert!((typical.drafts - 5.0 / 3.0).abs() < 1e-9 && (typical.expected_tokens - 2.0).abs() < 1e-9);
        // Drafts rounded up, plus the last token.
        assert_eq!(typical.shape(), (3, 2.0));
        // Before any round: the assumed four drafts at the 0.5 prior.
        assert_eq!(TypicalRound::default().shape(), (5, 1.9375));
    }
}
