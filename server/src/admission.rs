//! Admission control, decided on the stream task the moment an `open`
//! arrives. The runner may be in the middle of a pass for a few hundred
//! milliseconds; a client that cannot be served should hear so at once
//! (RESOURCE_EXHAUSTED), and admitted sessions must not be slowed by ones
//! that never should have started.
//!
//! Three gates, in order: the tenant's session cap, the KV memory budget,
//! and SLO capacity. The last is the estimator's job (DESIGN.md: T_q is
//! "used for admission decisions"): a session is admitted only while every
//! session's round, the newcomer's included, still fits its round budget
//! behind the rounds that may go first, and the newcomer's prefill fits
//! its TTFT. The runner keeps each session's demand current and publishes
//! the estimator after every pass; the decision itself is the pure
//! [`check_capacity`].

use crate::batcher::SessionId;
use crate::kv_budget::{KvBudget, KvLease};
use crate::session::TypicalRound;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tandem_estimators::{BatchShape, UpperBound};

/// What one session asks of the verifier per round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// One round: its tokens (drafts + 1, or 1 decode step) at its context.
    pub round: BatchShape,
    /// How long a round may take, queueing included, ms: the TPOT budget
    /// of the tokens the round is expected to yield. None: no objective.
    pub budget_ms: Option<f64>,
    /// The server queues this session's rounds itself (the decode steps
    /// of a server-only session), each as the pass holding the one before
    /// ends, so none waits for a pass in flight.
    pub paced_by_server: bool,
    /// Its prompt still to prefill (empty once its first token is out).
    pub prefill_left: BatchShape,
    /// Its whole prompt, and how long its generation lasts at its TPOT
    /// objective, ms (None: no objective). When a session ends another
    /// takes its place, in an open loop at capacity as in a closed one, so
    /// each admitted session brings a prompt like this once per `life_ms`.
    pub prompt: BatchShape,
    pub life_ms: Option<f64>,
    /// The context its rounds are costed at, and its TPOT objective, ms:
    /// what a decode step of it would be ([`Demand::decoded`]).
    pub context: usize,
    pub tpot_ms: Option<f64>,
}

impl Demand {
    /// `n` such sessions as one: in every check of this module they weigh
    /// exactly as `n` copies would (equal budgets wait for each other).
    fn times(self, n: usize) -> Demand {
        let n_of = |s: BatchShape| std::iter::repeat_n(s, n).sum();
        Demand { round: n_of(self.round), prefill_left: n_of(self.prefill_left), prompt: n_of(self.prompt), ..self }
    }

    /// The same session decoded by the server: a step of one token, paced
    /// by the server, within one TPOT.
    fn decoded(self) -> Demand {
        Demand {
            round: BatchShape { seqs: 1, tokens: 1, token_context: self.context + 1, prefill_tokens: 0 },
            budget_ms: self.tpot_ms,
            paced_by_server: true,
            ..self
        }
    }

    /// The same demand, with the prompt (`prompt_tokens`) and life
    /// (`max_new` tokens at `tpot`) of the session that will follow it.
    pub fn with_successor(self, prompt_tokens: usize, max_new: usize, tpot: Option<Duration>) -> Demand {
        Demand { prompt: prefill_shape(prompt_tokens, prompt_tokens), life_ms: tpot.map(|t| t.as_secs_f64() * 1e3 * max_new.max(1) as f64), ..self }
    }
}

/// `left` prompt tokens of a `total`-token prompt still to prefill.
pub fn prefill_shape(left: usize, total: usize) -> BatchShape {
    if left == 0 {
        return BatchShape::default();
    }
    BatchShape { seqs: 1, tokens: left, token_context: left * total, prefill_tokens: left }
}

/// A newcomer's prefill and its time-to-first-token objective.
#[derive(Clone, Copy, Debug)]
pub struct Prefill {
    pub tokens: usize,
    pub ttft_ms: Option<f64>,
}

/// Pass limits the batcher works under.
#[derive(Clone, Copy, Debug)]
pub struct PassLimits {
    pub max_batch_tokens: usize,
    pub max_batch_seqs: usize,
    pub prefill_chunk: usize,
}

/// Time to serve `shape` in passes of at most `max_batch_tokens` tokens and
/// `max_batch_seqs` sequences: the work split into equal passes, each
/// bounded by `upper`; and one of those passes. (Where drafts are short and
/// the token budget large, the sequence cap is what sets the number of
/// passes: 64 rounds of 4 tokens fill a 64-sequence pass with half its 512
/// tokens unused.)
fn cycle_ms(upper: &dyn Fn(BatchShape) -> f64, shape: BatchShape, limits: PassLimits) -> (f64, f64) {
    if shape.tokens == 0 {
        return (0.0, 0.0);
    }
    let passes = shape.tokens.div_ceil(limits.max_batch_tokens.max(1)).max(shape.seqs.div_ceil(limits.max_batch_seqs.max(1)));
    let part = BatchShape {
        seqs: shape.seqs.div_ceil(passes),
        tokens: shape.tokens.div_ceil(passes),
        token_context: shape.token_context.div_ceil(passes),
        prefill_tokens: shape.prefill_tokens.div_ceil(passes),
    };
    let pass = upper(part);
    (passes as f64 * pass, pass)
}

/// The round with the least slack among `demands`: its budget less what
/// may be served before it.
struct TightestRound {
    slack_ms: f64,
    budget_ms: f64,
    /// Sessions whose rounds may go first (its own included), and their cycle.
    ahead: usize,
    cycle_ms: f64,
    pass_ms: f64,
    /// Whether the round may find a pass in flight (it is not paced by
    /// the server).
    after_pass_in_flight: bool,
}

impl TightestRound {
    fn refusal(&self, sessions: usize) -> String {
        let wait = if self.after_pass_in_flight {
            format!("a {:.0} ms pass in flight and a {:.0} ms cycle of {} sessions' rounds", self.pass_ms, self.cycle_ms, self.ahead)
        } else {
            format!("its pass ({:.0} ms) or a {:.0} ms cycle of {} sessions' rounds", self.pass_ms, self.cycle_ms, self.ahead)
        };
        format!("at SLO capacity: a round with a {:.0} ms budget may wait for {wait} ({sessions} sessions in all)", self.budget_ms)
    }
}

/// A session has at most one round outstanding and the scheduler serves
/// rounds by deadline, so in the worst case (every session's round arriving
/// at once) a round waits for the pass in flight and then for one round of
/// every session whose budget is no longer than its own: their cycle (by
/// the upper bound T_q, in the passes `limits` allow). A round the server
/// paces itself arrives as a pass ends: it waits for no pass in flight,
/// only for the pass that takes it (up to a pass of everyone) or for its
/// cycle where that spans several. (Charged a pass in flight too, the
/// decode steps of handed-off sessions held WISP on the simulated A100
/// with vLLM's pass caps to 205 devices, mean of four seeds, against 224.)
/// None without budgets.
fn tightest_round(upper: &dyn Fn(BatchShape) -> f64, demands: &[Demand], limits: PassLimits) -> Option<TightestRound> {
    let all: BatchShape = demands.iter().map(|d| d.round).sum();
    let (_, pass_ms) = cycle_ms(upper, all, limits);
    let mut by_budget: Vec<(f64, BatchShape, bool)> = demands.iter().filter_map(|d| d.budget_ms.map(|b| (b, d.round, d.paced_by_server))).collect();
    by_budget.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut ahead = BatchShape::default();
    // Whether every round with the budget in hand is paced by the server.
    let mut all_paced = true;
    let mut tightest: Option<TightestRound> = None;
    for (i, &(budget_ms, round, paced)) in by_budget.iter().enumerate() {
        ahead = ahead + round;
        all_paced &= paced;
        // Equal budgets wait for each other.
        if by_budget.get(i + 1).is_some_and(|next| next.0 == budget_ms) {
            continue;
        }
        let (cycle, _) = cycle_ms(upper, ahead, limits);
        let slack_ms = if all_paced { budget_ms - cycle.max(pass_ms) } else { budget_ms - cycle - pass_ms };
        if tightest.as_ref().is_none_or(|t| slack_ms < t.slack_ms) {
            tightest = Some(TightestRound { slack_ms, budget_ms, ahead: i + 1, cycle_ms: cycle, pass_ms, after_pass_in_flight: !all_paced });
        }
        all_paced = true;
    }
    tightest
}

/// The work `demands` bring in `window_ms` at their objectives' pace: a
/// round per round budget (one, without a budget) and a prompt per life.
/// Summed as fractions and rounded once: a session's share of a window is
/// rarely whole.
fn window_work(demands: &[Demand], window_ms: f64) -> BatchShape {
    let fields = |s: BatchShape| [s.seqs, s.tokens, s.token_context, s.prefill_tokens].map(|v| v as f64);
    let mut sum = [0.0; 4];
    for d in demands {
        let rounds = d.budget_ms.map_or(1.0, |b| window_ms / b.max(1e-3));
        let prompts = d.life_ms.map_or(0.0, |l| window_ms / l.max(1e-3));
        for ((s, r), p) in sum.iter_mut().zip(fields(d.round)).zip(fields(d.prompt)) {
            *s += rounds * r + prompts * p;
        }
    }
    let [seqs, tokens, token_context, prefill_tokens] = sum.map(|v| v.ceil() as usize);
    BatchShape { seqs, tokens, token_context, prefill_tokens }
}

/// The window over which `check_capacity` weighs the sessions' steady
/// stream of work against the verifier's time, ms.
const RATE_WINDOW_MS: f64 = 1000.0;
/// What the batcher's passes hold on average, as a share of their caps:
/// they take what is due, not whatever would fill them. So a stream of
/// work needs more passes than its tokens and sequences would fill
/// exactly, which costs where a pass has a fixed cost (a GPU's weight
/// read). Measured on the simulated H100: 57 sequences a pass of 64 at
/// 1600 devices, and fewer past capacity, where tight deadlines cut passes
/// short. At 0.9, with 600 sessions/s arriving, 64 % of the admitted met
/// their objectives; at 0.8, 86 % (capacity 1712 devices closed loop
/// against 1760 at 0.9, 512 sessions/s open loop against 480).
const PACKING: f64 = 0.8;

/// Whether `newcomer` (with its `prefill`) can join `admitted` with every
/// objective still met; Ok carries the headroom left, ms.
///
/// Every round budget (TPOT × the round's expected tokens) must hold the
/// worst case of `tightest_round`: the pass in flight plus a cycle of the
/// rounds with no longer budgets. Where every round fits one pass (a small
/// server) and the budgets are alike, that is two cycles of everyone; at
/// scale a cycle is many passes, and a round with a short budget goes
/// before the rest (latencies: `upper`, the bound T_q).
///
/// The steady stream must fit the verifier's time: every session's rounds
/// at its objective's pace, and the prompts of the sessions that follow
/// those that end (`window_work`), in passes packed as the batcher packs
/// them (`PACKING`), at their `expected` cost (a long run of passes costs
/// their mean, not their bound). The latency checks take a snapshot;
/// without this one, sessions running ahead of their pace hid a load the
/// verifier could not carry once they slowed to it, and a server past
/// capacity admitted sessions it then served late.
///
/// The newcomer's prefill must fit its TTFT twice over:
/// chunked, each chunk riding a cycle of everyone's rounds; and behind the
/// prompts already queued, or a burst of opens would all be admitted and
/// the last of them wait past their TTFT.
pub fn check_capacity(
    upper: &dyn Fn(BatchShape) -> f64,
    expected: &dyn Fn(BatchShape) -> f64,
    admitted: &[Demand],
    newcomer: Demand,
    prefill: Prefill,
    limits: PassLimits,
) -> Result<f64, String> {
    let all: Vec<Demand> = admitted.iter().copied().chain([newcomer]).collect();
    let tightest = rounds_fit(upper, expected, &all, limits)?;
    if let Some(ttft) = prefill.ttft_ms {
        let others: BatchShape = admitted.iter().map(|d| d.round).sum();
        let rounds = others + newcomer.round;
        let chunk = limits.prefill_chunk.clamp(1, prefill.tokens.max(1));
        let chunks = prefill.tokens.div_ceil(chunk);
        let chunk_shape = BatchShape { seqs: 1, tokens: chunk, token_context: chunk * prefill.tokens, prefill_tokens: chunk };
        let need = chunks as f64 * cycle_ms(upper, others + chunk_shape, limits).0;
        if need > ttft {
            return Err(format!(
                "at SLO capacity: prefilling {} tokens would take an estimated {need:.0} ms, over the TTFT objective of {ttft:.0} ms",
                prefill.tokens
            ));
        }
        // Prefill deadlines (open + TTFT) come in order of arrival, so the
        // newcomer's prompt goes after those queued before it; with them, a
        // round of every session. Rounds sent meanwhile are not counted:
        // counting one per round budget refused sessions that were served
        // in time (simulated capacity 3–7 % lower).
        let queued: BatchShape = admitted.iter().map(|d| d.prefill_left).sum();
        let need = cycle_ms(upper, rounds + queued + newcomer.prefill_left, limits).0;
        if need > ttft {
            return Err(format!(
                "at SLO capacity: {} prompt tokens are queued for prefill; with this one's {} and a round of every session that is an estimated {need:.0} ms, over the TTFT objective of {ttft:.0} ms",
                queued.prefill_tokens, prefill.tokens
            ));
        }
    }
    Ok(tightest.map_or(f64::INFINITY, |t| t.slack_ms))
}

/// The round and steady-stream checks of [`check_capacity`] for `all`
/// sessions; Ok carries the tightest round (None without budgets).
fn rounds_fit(
    upper: &dyn Fn(BatchShape) -> f64,
    expected: &dyn Fn(BatchShape) -> f64,
    all: &[Demand],
    limits: PassLimits,
) -> Result<Option<TightestRound>, String> {
    let tightest = tightest_round(upper, all, limits);
    if let Some(t) = tightest.as_ref().filter(|t| t.slack_ms < 0.0) {
        return Err(t.refusal(all.len()));
    }
    let packed = PassLimits {
        max_batch_tokens: ((limits.max_batch_tokens as f64 * PACKING) as usize).max(1),
        max_batch_seqs: ((limits.max_batch_seqs as f64 * PACKING) as usize).max(1),
        ..limits
    };
    let (need, _) = cycle_ms(expected, window_work(all, RATE_WINDOW_MS), packed);
    if need > RATE_WINDOW_MS {
        return Err(format!(
            "at SLO capacity: {} sessions' rounds at their objectives' pace, and the prompts of the sessions that follow them, need an estimated {need:.0} ms of every {RATE_WINDOW_MS:.0} ms",
            all.len()
        ));
    }
    Ok(tightest)
}

/// How many times its sessions the server must have room to decode
/// before it suggests hand-offs ([`DecodeRoom::Spare`]): room for load
/// that is still rising. Measured in the simulator's H100 cases (stop 49),
/// with hand-backs: capacity stays within the probes' noise at margins 2,
/// 3, 4 and 8 (1712 devices; chat 1968–2016), while goodput at 128
/// devices is 1.56× margin 8's at 2–4 (more sessions decoded) and peak
/// goodput within 1 % at 4 (1.3 % below at 2). Before hand-backs
/// (stop 48) a margin of one cost 64 devices of capacity, and eight was
/// needed.
const ROOM_MARGIN: usize = 4;

/// The server's room to decode its sessions itself, judged after each
/// pass: admission's round and steady-stream checks with each admitted
/// session's round replaced by a decode step (one token, paced by the
/// server, within one TPOT).
///
/// Why two thresholds: a hand-off is suggested with room to spare and
/// undone only when the room is gone, so a session is not passed back and
/// forth as the load moves about its edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeRoom {
    /// Decoding every session would miss objectives: sessions handed off
    /// go back to drafting where a round of drafts costs the server less
    /// per token than decode steps ([`hands_back`]).
    None,
    /// Decoding every session fits, but not `ROOM_MARGIN` times over, or
    /// the server cannot judge (no estimator: policy `fcfs`): hand-offs
    /// made stand; no new ones are suggested.
    #[default]
    Some,
    /// Decoding every session fits `ROOM_MARGIN` times over: the server
    /// has room to spare, and a session it decodes costs the others
    /// nothing their objectives need (the load is below what centralized
    /// decoding carries). Hand-offs are suggested ([`suggested_k`]).
    Spare,
}

impl DecodeRoom {
    pub fn judge(upper: &dyn Fn(BatchShape) -> f64, expected: &dyn Fn(BatchShape) -> f64, demands: &[Demand], limits: PassLimits) -> DecodeRoom {
        let fits = |margin: usize| {
            let decoded: Vec<Demand> = demands.iter().map(|d| d.decoded().times(margin)).collect();
            rounds_fit(upper, expected, &decoded, limits).is_ok()
        };
        // Room for the sessions once is judged first: under load, where
        // there is none, that is the only judgement a pass pays for (room
        // for them `ROOM_MARGIN` times over implies room for them once).
        if !fits(1) {
            DecodeRoom::None
        } else if fits(ROOM_MARGIN) {
            DecodeRoom::Spare
        } else {
            DecodeRoom::Some
        }
    }

    /// The gauge's value: 0, 1, 2.
    pub fn level(self) -> i64 {
        self as i64
    }
}

/// The draft length the server suggests to a session: 0 (decode on the
/// server; the edge hands off after a few such rounds) where the server
/// has room to spare ([`DecodeRoom::Spare`]) and would give the session a
/// token sooner than it gets them now (`ms_per_token`, its time per token
/// so far): the session gains and nobody loses. A decoded session waits
/// for a pass (`pass_ms`, the recent one) or, where the sequence cap
/// splits a decode step of every session into several passes, all of them
/// (`decode_cycle_ms`, [`decode_cycle_ms`]). Otherwise the batcher's
/// suggestion (`batcher_k`, the least server time per token).
///
/// Why: below centralized decoding's capacity a drafting session waits for
/// its edge's drafts and a round trip each round, where the server would
/// give it a token a pass. On this CPU, two laptops' sessions took 22 ms a
/// token drafting and 10 decoded (docs/measurements.md, stop 44); whether
/// they were decoded hung on whether the estimator's refit at that load
/// set its per-sequence cost to zero (stop 48).
pub fn suggested_k(room: DecodeRoom, pass_ms: f64, decode_cycle_ms: f64, ms_per_token: Option<f64>, batcher_k: Option<usize>) -> Option<usize> {
    let decode_ms = pass_ms.max(decode_cycle_ms);
    if room == DecodeRoom::Spare && pass_ms > 0.0 && ms_per_token.is_some_and(|t| decode_ms < t) {
        Some(0)
    } else {
        batcher_k
    }
}

/// The passes a decode step of every session in `demands` takes, ms: what
/// a decoded session waits for each token when all are decoded. Why: on a
/// GPU whose passes hold 64 sequences, 256 decoded sessions get a token
/// every four passes, slower than their drafts gave them (measured in the
/// simulator's H100 case, stop 49).
pub fn decode_cycle_ms(expected: &dyn Fn(BatchShape) -> f64, demands: &[Demand], limits: PassLimits) -> f64 {
    let steps: BatchShape = demands.iter().map(|d| d.decoded().round).sum();
    cycle_ms(expected, steps, limits).0
}

/// The room to decode `demands` and their decode cycle ([`DecodeRoom`],
/// [`decode_cycle_ms`]) by the estimator's `bound`, as the runner judges
/// them after each pass (the simulator too); without an estimator, the
/// default room and no cycle.
pub fn judge_decoding(bound: Option<&UpperBound>, demands: &[Demand], limits: PassLimits) -> (DecodeRoom, f64) {
    bound.map_or((DecodeRoom::default(), 0.0), |est| {
        (DecodeRoom::judge(&|s| est.upper(s), &|s| est.expected(s), demands, limits), decode_cycle_ms(&|s| est.expected(s), demands, limits))
    })
}

/// Tokens a session must have been decoded for before its pace decoded is
/// judged ([`hands_back`]). Why 16: over fewer, one pass that prefills
/// another session's prompt reads as a slow pace on a CPU, where a
/// prompt costs compute. Simulated with this CPU's calibration at four
/// devices (stop 49): after 4 tokens 15 % of the sessions were handed
/// back and goodput fell 1.5 %; after 8, 5 %; after 16, none. On the
/// simulated H100 the count moved nothing.
pub const DECODED_PACE_TOKENS: usize = 16;

/// Whether the server hands a session it decodes for its edge back to the
/// edge's drafts. Only where the batcher's draft length for the session
/// (`batcher_k`) is not 0, so its rounds cost the server less per token
/// than decode steps (a session whose drafts cost more than they save
/// stays decoded: handing it back would load the server more); and then
/// where the server has no room to decode every session
/// ([`DecodeRoom::None`]), or where the session, decoded, gets its tokens
/// more slowly (`decoded_ms`, ms per token since the hand-off) than it
/// did drafting (`drafting_ms`, ms per token before it).
///
/// Why the pace: a session handed off while the load was low is decoded at
/// its objective's pace once passes fill (the scheduler serves it by its
/// deadline), and may then be slower than its edge's drafts were. On the
/// simulated H100 (margin 2), handing such sessions back raised the
/// goodput of a 512-device probe, whose first sessions handed off while
/// its devices were still joining, by 1.5 % (stop 49).
pub fn hands_back(room: DecodeRoom, batcher_k: Option<usize>, drafting_ms: Option<f64>, decoded_ms: Option<f64>) -> bool {
    let slower = decoded_ms.zip(drafting_ms).is_some_and(|(decoded, drafting)| decoded > drafting);
    batcher_k.is_some_and(|k| k > 0) && (room == DecodeRoom::None || slower)
}

/// The refusal reason of a draining server (UNAVAILABLE: go elsewhere).
pub const DRAINING: &str = "draining";

/// Why an `open` was refused, and the metric label counting it.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// The admission gate shared by the stream tasks and the runner.
pub struct Admission {
    budget: KvBudget,
    limits: PassLimits,
    next_id: AtomicU64,
    draining: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The runner's latest estimator; None (policy `fcfs`, the SLED
    /// baseline) disables the SLO gate.
    estimator: Option<UpperBound>,
    /// The runner's latest typical round (None until one is seen).
    typical: Option<TypicalRound>,
    demands: HashMap<SessionId, Demand>,
    per_tenant: HashMap<String, usize>,
    /// The server's room to decode every admitted session, and the passes
    /// a decode step of each takes ([`decode_cycle_ms`]), as of the latest pass.
    decode_room: DecodeRoom,
    decode_cycle_ms: f64,
}

/// One admitted session's claim: its id, KV reservation, tenant slot and
/// demand. Dropping it gives all of them back.
pub struct Ticket {
    pub id: SessionId,
    tenant: String,
    admission: Arc<Admission>,
    _lease: KvLease,
}

/// What an `open` asks for.
pub struct Request<'a> {
    pub tenant: &'a str,
    pub max_sessions: usize,
    pub kv_bytes: usize,
    pub demand: Demand,
    pub prefill: Prefill,
}

impl Admission {
    pub fn new(budget: KvBudget, limits: PassLimits) -> Arc<Self> {
        Arc::new(Admission { budget, limits, next_id: AtomicU64::new(1), draining: AtomicBool::new(false), state: Mutex::default() })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is plain bookkeeping: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admit(self: &Arc<Self>, req: Request<'_>) -> Result<Ticket, Refusal> {
        if self.is_draining() {
            return Err(Refusal { reason: DRAINING, message: "the server is draining; open the session on another replica".into() });
        }
        let mut state = self.state();
        let count = state.per_tenant.get(req.tenant).copied().unwrap_or(0);
        if count >= req.max_sessions {
            return Err(Refusal {
                reason: "tenant_sessions",
                message: format!("tenant `{}` already has its maximum of {} sessions", req.tenant, req.max_sessions),
            });
        }
        if let Some(est) = &state.estimator {
            let admitted: Vec<Demand> = state.demands.values().copied().collect();
            check_capacity(&|s| est.upper(s), &|s| est.expected(s), &admitted, req.demand, req.prefill, self.limits)
                .map_err(|message| Refusal { reason: "slo_capacity", message })?;
        }
        let lease = self.budget.try_reserve(req.kv_bytes).ok_or_else(|| Refusal {
            reason: "kv_budget",
            message: format!(
                "KV memory budget exhausted: the session needs {} KiB, {} KiB of {} KiB are free",
                req.kv_bytes / 1024,
                (self.budget.capacity() - self.budget.reserved()) / 1024,
                self.budget.capacity() / 1024
            ),
        })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        state.demands.insert(id, req.demand);
        *state.per_tenant.entry(req.tenant.to_string()).or_default() += 1;
        Ok(Ticket { id, tenant: req.tenant.to_string(), admission: self.clone(), _lease: lease })
    }

    /// The runner's estimator bound and typical round after its latest pass.
    /// Also judges the server's room to decode every session.
    pub fn publish(&self, bound: Option<UpperBound>, typical: Option<TypicalRound>) {
        let mut state = self.state();
        state.estimator = bound;
        state.typical = typical;
        let demands: Vec<Demand> = state.demands.values().copied().collect();
        (state.decode_room, state.decode_cycle_ms) = judge_decoding(bound.as_ref(), &demands, self.limits);
    }

    /// The server's room, at the latest pass, to decode every admitted
    /// session within its objectives.
    pub fn decode_room(&self) -> DecodeRoom {
        self.state().decode_room
    }

    /// The passes, at the latest pass, that a decode step of every admitted
    /// session takes ([`decode_cycle_ms`]).
    pub fn decode_cycle_ms(&self) -> f64 {
        self.state().decode_cycle_ms
    }

    /// What a new session's rounds are costed at (see `TypicalRound`).
    pub fn typical_round(&self) -> Option<TypicalRound> {
        self.state().typical
    }

    /// Estimated headroom of the admitted sessions' tightest round budget
    /// (`tightest_round`), ms (None without an estimator or objectives).
    pub fn headroom_ms(&self) -> Option<f64> {
        let state = self.state();
        let est = state.estimator.as_ref()?;
        let demands: Vec<Demand> = state.demands.values().copied().collect();
        tightest_round(&|s| est.upper(s), &demands, self.limits).map(|t| t.slack_ms)
    }

    /// From now on every `open` is refused (the server is going away).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Sessions holding a ticket.
    pub fn sessions(&self) -> usize {
        self.state().demands.len()
    }

    pub fn reserved_bytes(&self) -> usize {
        self.budget.reserved()
    }
}

impl Ticket {
    /// The session's demand changed (its draft length, context or acceptance).
    pub fn update(&self, demand: Demand) {
        if let Some(d) = self.admission.state().demands.get_mut(&self.id) {
            *d = demand;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.state();
        state.demands.remove(&self.id);
        if let Some(n) = state.per_tenant.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 ms per pass plus 2 ms per token.
    fn upper(s: BatchShape) -> f64 {
        10.0 + 2.0 * s.tokens as f64
    }

    fn round(tokens: usize, budget_ms: Option<f64>) -> Demand {
        Demand { round: BatchShape { seqs: 1, tokens, token_context: tokens * 100, prefill_tokens: 0 }, budget_ms, ..Demand::default() }
    }

    const LIMITS: PassLimits = PassLimits { max_batch_tokens: 1000, max_batch_seqs: 100, prefill_chunk: 64 };
    const NO_PREFILL: Prefill = Prefill { tokens: 0, ttft_ms: None };

    #[test]
    fn admits_while_two_cycles_fit_the_tightest_budget() {
        // Each 5-token round adds 10 ms: n sessions cost 10 + 10 n per cycle.
        let mut admitted = vec![];
        while check_capacity(&upper, &upper, &admitted, round(5, Some(200.0)), NO_PREFILL, LIMITS).is_ok() {
            admitted.push(round(5, Some(200.0)));
        }
        // 2 × (10 + 10 n) ≤ 200  ⇔  n ≤ 9.
        assert_eq!(admitted.len(), 9);
        // A session with no objective still costs time: it is refused only
        // through the others' budgets.
        assert!(check_capacity(&upper, &upper, &admitted, round(5, None), NO_PREFILL, LIMITS).is_err());
        assert!(check_capacity(&upper, &upper, &admitted[..3], round(5, None), NO_PREFILL, LIMITS).is_ok());
    }

    #[test]
    fn a_tight_newcomer_is_refused_where_a_loose_one_fits() {
        let admitted = vec![round(5, Some(1000.0)); 4];
        // The pass in flight, with the newcomer: 10 + 50 = 60 ms; then the
        // newcomer's own round, 20 ms.
        assert!(check_capacity(&upper, &upper, &admitted, round(5, Some(79.0)), NO_PREFILL, LIMITS).is_err());
        let headroom = check_capacity(&upper, &upper, &admitted, round(5, Some(400.0)), NO_PREFILL, LIMITS).unwrap();
        assert_eq!(headroom, 400.0 - 60.0 - 20.0);
    }

    #[test]
    fn at_scale_a_round_waits_for_one_pass_of_the_cycle() {
        // Passes of at most 50 tokens: 40 five-token rounds are 4 passes of
        // 10 + 100 ms. A cycle plus a pass is 550 ms, not two cycles' 880.
        // The same four passes where the cap is ten sequences a pass.
        for limits in [PassLimits { max_batch_tokens: 50, ..LIMITS }, PassLimits { max_batch_seqs: 10, ..LIMITS }] {
            let forty = |budget| check_capacity(&upper, &upper, &vec![round(5, Some(budget)); 39], round(5, Some(budget)), NO_PREFILL, limits);
            assert_eq!(forty(550.0), Ok(0.0), "{limits:?}");
            assert!(forty(549.0).is_err(), "{limits:?}");
        }
    }

    #[test]
    fn a_decode_step_the_server_paces_waits_for_no_pass_in_flight() {
        let decode = |budget_ms| Demand { paced_by_server: true, ..round(1, Some(budget_ms)) };
        // Ten one-token steps: one pass of 10 + 20 = 30 ms. The server
        // queues a step as the pass before it ends, so it waits for its
        // own pass only; a round an edge sends may find a pass just begun.
        let nine = vec![decode(40.0); 9];
        assert_eq!(check_capacity(&upper, &upper, &nine, decode(40.0), NO_PREFILL, LIMITS), Ok(10.0));
        assert!(check_capacity(&upper, &upper, &vec![round(1, Some(40.0)); 9], round(1, Some(40.0)), NO_PREFILL, LIMITS).is_err());
        // A round from an edge among them, with the same budget, waits for
        // the pass in flight, and so does everyone it waits with.
        let refused = check_capacity(&upper, &upper, &nine, round(1, Some(40.0)), NO_PREFILL, LIMITS).unwrap_err();
        assert!(refused.contains("pass in flight"), "{refused}");
        // Where one pass cannot hold them all, a step waits for its cycle:
        // two passes of five steps, 20 ms each.
        let ten = vec![decode(100.0); 10];
        let tightest = tightest_round(&upper, &ten, PassLimits { max_batch_seqs: 5, ..LIMITS }).unwrap();
        assert_eq!((tightest.cycle_ms, tightest.pass_ms, tightest.slack_ms), (40.0, 20.0, 60.0));
    }

    #[test]
    fn a_round_with_a_short_budget_goes_before_the_rest() {
        // Ten five-token rounds in one pass of 110 ms. The newcomer's round
        // waits for that pass and then its own (20 ms), not for all of
        // them twice (220 ms).
        let admitted = vec![round(5, Some(1000.0)); 9];
        assert_eq!(check_capacity(&upper, &upper, &admitted, round(5, Some(130.0)), NO_PREFILL, LIMITS), Ok(0.0));
        assert!(check_capacity(&upper, &upper, &admitted, round(5, Some(129.0)), NO_PREFILL, LIMITS).is_err());
        // The others' rounds wait for it too.
        assert!(check_capacity(&upper, &upper, &vec![round(5, Some(219.0)); 9], round(5, Some(130.0)), NO_PREFILL, LIMITS).is_err());
    }

    #[test]
    fn prefill_must_fit_the_ttft_objective() {
        let admitted = vec![round(5, None); 2];
        let prefill = |ttft| Prefill { tokens: 256, ttft_ms: Some(ttft) };
        // 4 chunks of 64, each riding a cycle of 10 + 2 × (10 + 64) ms.
        assert!(check_capacity(&upper, &upper, &admitted, round(5, None), prefill(4.0 * 158.0), LIMITS).is_ok());
        assert!(check_capacity(&upper, &upper, &admitted, round(5, None), prefill(4.0 * 158.0 - 1.0), LIMITS).is_err());
    }

    #[test]
    fn a_prompt_waits_behind_the_prompts_queued_before_it() {
        let newcomer = Demand { prefill_left: prefill_shape(100, 100), ..round(5, None) };
        let prefill = |ttft| Prefill { tokens: 100, ttft_ms: Some(ttft) };
        // Two admitted sessions with 200 prompt tokens each still to prefill:
        // one pass of 15 round tokens and 500 prompt tokens, 1040 ms.
        let queued = vec![Demand { prefill_left: prefill_shape(200, 200), ..round(5, None) }; 2];
        assert!(check_capacity(&upper, &upper, &queued, newcomer, prefill(1040.0), LIMITS).is_ok());
        assert!(check_capacity(&upper, &upper, &queued, newcomer, prefill(1039.0), LIMITS).is_err());
        // Once theirs are done, it only waits for the rounds.
        assert!(check_capacity(&upper, &upper, &[round(5, None), round(5, None)], newcomer, prefill(1039.0), LIMITS).is_ok());
    }

    #[test]
    fn the_steady_stream_of_rounds_and_prompts_must_fit() {
        // A round a second and, every second, the 100-token prompt of the
        // session that follows: 105 tokens a second each. Four sessions
        // fit a second (one pass of 10 + 840 ms); five (1060 ms) do not,
        // though their rounds alone wait only 120 ms.
        let session = round(5, Some(1000.0)).with_successor(100, 10, Some(Duration::from_millis(100)));
        assert!(check_capacity(&upper, &upper, &[session; 3], session, NO_PREFILL, LIMITS).is_ok());
        let refused = check_capacity(&upper, &upper, &[session; 4], session, NO_PREFILL, LIMITS).unwrap_err();
        assert!(refused.contains("1060 ms of every 1000 ms"), "{refused}");
        // Sessions without a TPOT objective bring no prompt stream.
        let open_ended = round(5, Some(1000.0)).with_successor(100, 10, None);
        assert!(check_capacity(&upper, &upper, &[open_ended; 4], open_ended, NO_PREFILL, LIMITS).is_ok());
    }

    #[test]
    fn the_server_has_room_to_decode_while_many_times_its_sessions_fit() {
        // Sessions drafting 5-token rounds at a 100 ms TPOT objective;
        // decoded, each is a 1-token step within 100 ms.
        let session = Demand { context: 99, tpot_ms: Some(100.0), ..round(5, Some(200.0)) };
        assert_eq!(session.decoded().round, BatchShape { seqs: 1, tokens: 1, token_context: 100, prefill_tokens: 0 });
        assert!(session.decoded().paced_by_server && session.decoded().budget_ms == Some(100.0));
        // ROOM_MARGIN × n steps share one pass of 10 + 2 ms each, which
        // must end within 100 ms: room to spare for n ≤ 45 / ROOM_MARGIN
        // (11 at a margin of 4), some room for n ≤ 45, none past that.
        let spare = 45 / ROOM_MARGIN;
        let room = |n| DecodeRoom::judge(&upper, &upper, &vec![session; n], LIMITS);
        assert_eq!(room(spare), DecodeRoom::Spare);
        assert_eq!(room(spare + 1), DecodeRoom::Some);
        assert_eq!(room(45), DecodeRoom::Some);
        assert_eq!(room(46), DecodeRoom::None);
        // Without room, sessions go back to drafting where drafts pay.
        assert!(hands_back(room(46), Some(2), None, None));
        assert!(!hands_back(room(46), Some(0), None, None) && !hands_back(room(46), None, None, None));
        assert!(!hands_back(room(45), Some(2), None, None) && !hands_back(room(spare), Some(2), Some(20.0), Some(10.0)));
        // With room, where decoding is slower than drafting was.
        assert!(hands_back(room(spare), Some(2), Some(20.0), Some(30.0)));
        assert!(!hands_back(room(spare), Some(0), Some(20.0), Some(30.0)));
    }

    #[test]
    fn decoding_is_suggested_where_there_is_room_and_it_is_faster() {
        // Room to spare, and a pass (8 ms) and a decode step of every
        // session (16 ms) shorter than the session's 20 ms a token.
        let spare = DecodeRoom::Spare;
        assert_eq!(suggested_k(spare, 8.0, 16.0, Some(20.0), Some(3)), Some(0));
        // Otherwise the batcher's suggestion: a pass, or a decode step of
        // every session, slower than the session's own pace; room but
        // none to spare; no room; no pace yet; no pass measured yet.
        assert_eq!(suggested_k(spare, 25.0, 0.0, Some(20.0), Some(3)), Some(3));
        assert_eq!(suggested_k(spare, 8.0, 24.0, Some(20.0), Some(3)), Some(3));
        assert_eq!(suggested_k(DecodeRoom::Some, 8.0, 8.0, Some(20.0), Some(3)), Some(3));
        assert_eq!(suggested_k(DecodeRoom::None, 8.0, 8.0, Some(20.0), Some(3)), Some(3));
        assert_eq!(suggested_k(spare, 8.0, 8.0, None, Some(3)), Some(3));
        assert_eq!(suggested_k(spare, 0.0, 0.0, Some(20.0), None), None);
    }

    #[test]
    fn tickets_return_tenant_slots_and_kv_bytes_when_dropped() {
        let admission = Admission::new(KvBudget::new(1000), LIMITS);
        let req = |tenant, kv_bytes| Request { tenant, max_sessions: 2, kv_bytes, demand: round(5, None), prefill: NO_PREFILL };
        let a = admission.admit(req("a", 400)).unwrap();
        let b = admission.admit(req("a", 400)).unwrap();
        assert_eq!(admission.admit(req("a", 1)).err().expect("over the cap").reason, "tenant_sessions");
        assert_eq!(admission.admit(req("b", 400)).err().expect("over the budget").reason, "kv_budget");
        assert_ne!(a.id, b.id);
        drop(a);
        assert_eq!(admission.reserved_bytes(), 400);
        let c = admission.admit(req("a", 400)).unwrap();
        drop((b, c));
        assert_eq!(admission.reserved_bytes(), 0);
        assert!(admission.state().demands.is_empty() && admission.state().per_tenant.values().all(|&n| n == 0));
    }
}
