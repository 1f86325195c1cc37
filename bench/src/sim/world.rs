//! The discrete-event core: edge devices, links and one verification
//! server, advanced from event to event. Pure: the caller passes the epoch
//! (the `Instant` simulated time 0 maps to) and everything else is derived
//! from the configuration and the seed; no clock is read, nothing sleeps.
//!
//! What runs here is the real code, unchanged: the server's batchers
//! (`FifoBatcher`, `WispBatcher` with its estimator and fair counters), its
//! request deadlines (`work_deadline`), reach clip (`REACH_FLOOR`,
//! per-tenant `AcceptanceEstimator`s) and hints (`verify_ms_by_k`); the
//! edge's `SpeculationController`; the server's SLO admission gate
//! (`check_capacity`, sessions costed by `round_demand` at the typical
//! round); the model crate's draft sources
//! (`SyntheticDraft`, `NgramDraft`, cached real proposals). What is
//! modelled: a pass takes the calibration's predicted time times a ratio
//! drawn from the calibration's measured residuals, plus its idle penalty
//! (what a pass costs after the device idled, by the idle time since the
//! last pass ended), or, for a computed profile, its roofline's time of
//! the pass itself (which sees each sequence's context, where the fit sees
//! only the batch's sums); links take half the round trip (± jitter) plus
//! size over bandwidth, as in `live`.

use crate::live::{join_delay, DeviceProfile, REFUSED_RETRY};
use crate::prompts::BenchPrompt;
use crate::report::{Policy, SessionRecord};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tandem_edge::controller::{RoundHints, SpeculationController};
use tandem_estimators::{AcceptanceEstimator, BatchShape, CounterWeights, Roofline, ServiceGap, VerifyTimeEstimator, VerifyTimeProfile};
use tandem_model::{DraftSource, SamplingParams, SessionRng};
use tandem_server::admission::{check_capacity, hands_back, judge_decoding, prefill_shape, suggested_k, DecodeRoom, Demand, PassLimits, Prefill};
use tandem_server::batcher::{batch_shape, Batcher, PendingWork, RoundClock, RoundsDue, Scheduled, WorkKind};
use tandem_server::engine::{verify_ms_by_k, REACH_FLOOR};
use tandem_server::{new_acceptance, prompt_per_token, round_demand, tokens_left, work_deadline, HandedOff, Pace, RecentLengths, TypicalRound};

/// Simulated time, ns since the epoch.
type Ns = u64;

fn ns(ms: f64) -> Ns {
    (ms.max(0.0) * 1e6).round() as Ns
}

fn ms(ns: Ns) -> f64 {
    ns as f64 / 1e6
}

/// How sessions arrive.
#[derive(Clone, Copy, Debug)]
pub enum Arrivals {
    /// `devices` devices, each starting a session `think_ms` after its last.
    Closed { devices: usize, think_ms: f64 },
    /// Poisson arrivals, sessions per second; each session is its own device.
    Open { rate: f64 },
}

/// One simulated run of one policy.
pub struct WorldConfig<'a> {
    pub policy: Policy,
    pub arrivals: Arrivals,
    /// Sessions start during this long; all started ones finish.
    pub duration_s: f64,
    pub max_new_tokens: usize,
    pub draft_len: usize,
    pub slo_ttft_ms: u32,
    pub slo_tpot_ms: u32,
    pub seed: u64,
    /// Devices belong to tenants `tenant-0..` in turn.
    pub tenants: usize,
    pub profiles: &'a [DeviceProfile],
    pub prompts: &'a [BenchPrompt],
    /// The ground truth of pass times.
    pub pass_times: &'a VerifyTimeProfile,
    /// The pass limits admission costs sessions under (a batcher with an
    /// estimator gates opens on SLO capacity, as the server does).
    pub limits: PassLimits,
}

/// Builds the edge's draft source and controller for a device profile.
pub trait EdgeFactory {
    fn draft(&self, profile: &DeviceProfile, prompt: &BenchPrompt) -> Box<dyn DraftSource>;
    fn controller(&self, policy: Policy, draft_len: usize, slo_tpot_ms: u32) -> Option<SpeculationController>;
}

/// What one run produced.
pub struct Outcome {
    pub records: Vec<SessionRecord>,
    /// Simulated time from the first arrival to the last finish, s.
    pub wall_s: f64,
    /// Σ pass time, ms, and the number of passes.
    pub busy_ms: f64,
    pub passes: usize,
    /// |predicted − actual| / actual per pass (empty without an estimator).
    pub estimate_errors: Vec<f64>,
    /// Largest spread of fair-share counters between backlogged tenants.
    pub max_service_gap: f64,
}

enum Event {
    /// Closed loop: `device` starts a session. Open loop: arrival `device`.
    Start {
        device: usize,
    },
    OpenAtServer {
        session: usize,
    },
    VerifyAtServer {
        session: usize,
        drafts: Vec<u32>,
    },
    OpenedAtEdge {
        session: usize,
    },
    VerdictAtEdge {
        session: usize,
        verified: usize,
        accepted: usize,
        server_ms: f64,
        hints: RoundHints,
    },
    /// The edge hands the rest of the session to the server to decode.
    HandoffAtServer {
        session: usize,
    },
    /// The server's hand-back, with the session's `tokens` so far, reached
    /// the edge: it drafts again.
    HandedBackAtEdge {
        session: usize,
        tokens: usize,
    },
    /// Server-only: the last token reached the edge.
    FinishedAtEdge {
        session: usize,
    },
    PassDone,
    /// End of a batching delay.
    Wake,
}

/// A session on both sides of the link.
struct Session {
    device: usize,
    prompt: usize,
    tenant: String,
    started: Ns,
    // Edge side.
    ttft_ms: Option<f64>,
    tokens: usize,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    wasted_ms: f64,
    draft: Option<Box<dyn DraftSource>>,
    controller: Option<SpeculationController>,
    link: SessionRng,
    verify_sent: Ns,
    draft_ms: f64,
    sent_drafts: usize,
    // Server side.
    opened_at: Ns,
    /// When prefill ended (the first token left the server).
    first_token_at: Option<Ns>,
    prefilled: usize,
    generated: usize,
    acceptance: AcceptanceEstimator,
    /// Drafts and verified positions of the round queued, and when it was queued.
    pending: Option<(Vec<u32>, usize, Ns)>,
    /// When its next round should arrive (for the batcher, as in the server).
    round_clock: RoundClock,
    /// Drafts verified in its last round (None before its first).
    last_k: Option<usize>,
    /// Decoded on the server since the edge handed it off.
    handed_off: Option<HandedOff>,
    /// Ever handed off, and times handed back (for its record).
    ever_handed_off: bool,
    hand_backs: usize,
}

pub struct World<'a, F: EdgeFactory> {
    cfg: WorldConfig<'a>,
    factory: &'a F,
    epoch: Instant,
    now: Ns,
    events: BinaryHeap<Reverse<(Ns, u64, usize)>>,
    payloads: HashMap<usize, Event>,
    next_event: u64,
    sessions: Vec<Session>,
    batcher: Box<dyn Batcher>,
    truth: PassTimes,
    noise: SessionRng,
    arrivals: SessionRng,
    queue: VecDeque<PendingWork>,
    /// The pass running and its duration, ms.
    in_flight: Option<(Vec<Scheduled>, f64)>,
    wake_pending: bool,
    tenant_acceptance: HashMap<String, AcceptanceEstimator>,
    /// Sessions' next rounds by when they are due (the earliest goes to
    /// the batcher, as the server's runner sends it).
    rounds_due: BTreeSet<(Instant, usize)>,
    /// Sessions admitted and not yet finished.
    admitted: BTreeSet<usize>,
    /// The bench's own fair-share counters (the same VTC rule for every policy).
    service: ServiceGap,
    records: Vec<SessionRecord>,
    per_device_next: Vec<usize>,
    last_finish: Ns,
    /// When the latest pass ended (the device idles from then).
    last_pass_end: Ns,
    busy_ms: f64,
    /// EWMA of pass times, ms (the server's `last_pass_ms`).
    last_pass_ms: f64,
    /// The server's room to decode every admitted session, as of the
    /// latest pass, and a decode step of each's passes (its
    /// `Admission::decode_room`, `decode_cycle_ms`).
    decode_room: DecodeRoom,
    decode_cycle_ms: f64,
    /// Lengths of the generations that ended (the server's).
    lengths: RecentLengths,
    passes: usize,
    estimate_errors: Vec<f64>,
}

/// The ground truth of pass times.
enum PassTimes {
    /// A measured profile: its fit times a ratio drawn from its residuals.
    Fitted { fit: Box<VerifyTimeEstimator>, residuals: Vec<f64> },
    /// A computed profile: the cost model it was fitted to.
    Roofline(Roofline),
}

impl PassTimes {
    fn of(profile: &VerifyTimeProfile) -> Self {
        if let Some(roofline) = &profile.roofline {
            return PassTimes::Roofline(roofline.clone());
        }
        let residuals: Vec<f64> = profile.calibration.residual_ratios.iter().copied().filter(|r| r.is_finite() && *r > 0.0).collect();
        PassTimes::Fitted {
            fit: Box::new(VerifyTimeEstimator::from_calibration(&profile.calibration, 1.0)),
            residuals: if residuals.is_empty() { vec![1.0] } else { residuals },
        }
    }

    /// How long `batch` (of `shape`) takes, ms, idle penalty aside.
    fn pass_ms(&self, batch: &[Scheduled], shape: BatchShape, noise: &mut SessionRng) -> f64 {
        match self {
            PassTimes::Fitted { fit, residuals } => {
                let ratio = residuals[(noise.next_f64() * residuals.len() as f64) as usize % residuals.len()];
                (fit.predict(shape) * ratio).max(1e-3)
            }
            PassTimes::Roofline(roofline) => {
                let positions = batch.iter().map(|s| s.work.context + s.tokens).sum();
                roofline.pass_ms(shape.tokens, positions, shape.token_context)
            }
        }
    }
}

impl<'a, F: EdgeFactory> World<'a, F> {
    /// `epoch` is the instant simulated time 0 stands for (the batchers
    /// take `Instant`s); it is never compared with a clock.
    pub fn new(cfg: WorldConfig<'a>, batcher: Box<dyn Batcher>, factory: &'a F, epoch: Instant) -> Self {
        let truth = PassTimes::of(cfg.pass_times);
        let seed = cfg.seed;
        World {
            cfg,
            factory,
            epoch,
            now: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            next_event: 0,
            sessions: Vec::new(),
            batcher,
            truth,
            noise: SessionRng::new(seed ^ 0x0A55_0000),
            arrivals: SessionRng::new(seed ^ 0xA771_7A15),
            queue: VecDeque::new(),
            in_flight: None,
            wake_pending: false,
            tenant_acceptance: HashMap::new(),
            rounds_due: BTreeSet::new(),
            admitted: BTreeSet::new(),
            service: ServiceGap::new(CounterWeights::default()),
            records: Vec::new(),
            per_device_next: Vec::new(),
            last_finish: 0,
            last_pass_end: 0,
            busy_ms: 0.0,
            last_pass_ms: 10.0,
            decode_room: DecodeRoom::default(),
            decode_cycle_ms: 0.0,
            lengths: RecentLengths::default(),
            passes: 0,
            estimate_errors: Vec::new(),
        }
    }

    fn at(&mut self, t: Ns, e: Event) {
        let id = self.next_event as usize;
        self.next_event += 1;
        self.payloads.insert(id, e);
        self.events.push(Reverse((t, id as u64, id)));
    }

    fn instant(&self, t: Ns) -> Instant {
        self.epoch + Duration::from_nanos(t)
    }

    fn until(&self) -> Ns {
        ns(self.cfg.duration_s * 1e3)
    }

    /// Runs to completion.
    pub fn run(mut self) -> Outcome {
        match self.cfg.arrivals {
            Arrivals::Closed { devices, .. } => {
                self.per_device_next = vec![0; devices];
                for device in 0..devices {
                    self.at(join_delay(device, devices, self.cfg.duration_s).as_nanos() as Ns, Event::Start { device });
                }
            }
            Arrivals::Open { .. } => self.at(0, Event::Start { device: 0 }),
        }
        while let Some(Reverse((t, _, id))) = self.events.pop() {
            self.now = t;
            let event = self.payloads.remove(&id).expect("each event is scheduled once");
            self.handle(event);
        }
        let wall_s = ms(self.last_finish.max(self.until())) / 1e3;
        Outcome {
            records: self.records,
            wall_s,
            busy_ms: self.busy_ms,
            passes: self.passes,
            estimate_errors: self.estimate_errors,
            max_service_gap: self.service.max(),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start { device } => self.start(device),
            Event::OpenAtServer { session } => self.open_at_server(session),
            Event::VerifyAtServer { session, drafts } => self.verify_at_server(session, drafts),
            Event::OpenedAtEdge { session } => self.opened_at_edge(session),
            Event::VerdictAtEdge { session, verified, accepted, server_ms, hints } => self.verdict_at_edge(session, verified, accepted, server_ms, &hints),
            Event::HandoffAtServer { session } => self.handoff_at_server(session),
            Event::HandedBackAtEdge { session, tokens } => self.handed_back_at_edge(session, tokens),
            Event::FinishedAtEdge { session } => self.finish(session),
            Event::PassDone => self.pass_done(),
            Event::Wake => {
                self.wake_pending = false;
                self.schedule();
            }
        }
    }

    fn profile(&self, device: usize) -> &'a DeviceProfile {
        &self.cfg.profiles[device % self.cfg.profiles.len()]
    }

    /// Half a round trip with jitter plus the message over the link, ms (as `live`'s EmulatedLink).
    fn one_way(&mut self, session: usize, bytes: usize, up: bool) -> f64 {
        let p = self.profile(self.sessions[session].device);
        let jitter = (self.sessions[session].link.next_f64() * 2.0 - 1.0) * p.jitter_ms;
        let kbps = if up { p.uplink_kbps } else { p.downlink_kbps };
        (p.rtt_ms / 2.0 + jitter / 2.0).max(0.0) + bytes as f64 * 8.0 / kbps
    }

    fn start(&mut self, device: usize) {
        if self.now >= self.until() {
            return;
        }
        let prompt = match self.cfg.arrivals {
            Arrivals::Closed { devices, .. } => {
                let n = self.per_device_next[device];
                self.per_device_next[device] += 1;
                (device + n * devices) % self.cfg.prompts.len()
            }
            Arrivals::Open { rate } => {
                let gap = -(1.0 - self.arrivals.next_f64()).ln() / rate;
                self.at(self.now + ns(gap * 1e3), Event::Start { device: device + 1 });
                device % self.cfg.prompts.len()
            }
        };
        let profile = self.profile(device);
        let prompts = self.cfg.prompts;
        let bench_prompt = &prompts[prompt];
        let drafting = self.cfg.policy != Policy::Centralized;
        let id = self.sessions.len();
        let tenant = format!("tenant-{}", device % self.cfg.tenants.max(1));
        let acceptance = self.tenant_acceptance.get(&tenant).cloned().unwrap_or_else(new_acceptance);
        self.sessions.push(Session {
            device,
            prompt,
            tenant,
            started: self.now,
            ttft_ms: None,
            tokens: 0,
            rounds: 0,
            drafted: 0,
            accepted: 0,
            wasted_ms: 0.0,
            draft: drafting.then(|| self.factory.draft(profile, bench_prompt)),
            controller: if drafting { self.factory.controller(self.cfg.policy, self.cfg.draft_len, self.cfg.slo_tpot_ms) } else { None },
            link: SessionRng::new(self.cfg.seed ^ (device as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id as u64),
            verify_sent: 0,
            draft_ms: 0.0,
            sent_drafts: 0,
            opened_at: 0,
            first_token_at: None,
            prefilled: 0,
            generated: 0,
            acceptance,
            pending: None,
            round_clock: RoundClock::default(),
            last_k: None,
            handed_off: None,
            ever_handed_off: false,
            hand_backs: 0,
        });
        let up = self.one_way(id, 64 + 4 * bench_prompt.tokens.len(), true);
        self.at(self.now + ns(up), Event::OpenAtServer { session: id });
    }

    fn output_len(&self, session: usize) -> usize {
        let p = &self.cfg.prompts[self.sessions[session].prompt];
        p.reference.len() - p.tokens.len()
    }

    fn open_at_server(&mut self, session: usize) {
        let now = self.now;
        let prompt_len = self.cfg.prompts[self.sessions[session].prompt].tokens.len();
        if !self.admit(prompt_len) {
            self.refused(session);
            return;
        }
        self.admitted.insert(session);
        let s = &mut self.sessions[session];
        s.opened_at = now;
        let deadline = self.deadline(session, WorkKind::Prefill, 1.0);
        let s = &self.sessions[session];
        self.queue.push_back(PendingWork {
            session: session as u64,
            tenant: s.tenant.clone(),
            kind: WorkKind::Prefill,
            tokens: prompt_len,
            enqueued: self.instant(now),
            deadline,
            context: 0,
            expected_tokens: 1.0,
        });
        self.schedule();
    }

    /// The server's SLO gate (only with an estimator, as there): every
    /// admitted session costed at its last round, or the typical round
    /// before its first, and the newcomer at the typical round.
    fn admit(&self, prompt_len: usize) -> bool {
        let Some(estimator) = self.batcher.estimator() else { return true };
        let bound = estimator.bound();
        let (admitted, typical) = self.admitted_demands();
        let (tpot, max_new) = (self.tpot(), self.cfg.max_new_tokens);
        let newcomer =
            round_demand(false, None, typical, prompt_len + max_new / 2, tpot, prefill_shape(prompt_len, prompt_len)).with_successor(prompt_len, max_new, tpot);
        let prefill = Prefill { tokens: prompt_len, ttft_ms: Some(self.cfg.slo_ttft_ms.into()) };
        check_capacity(&|s| bound.upper(s), &|s| bound.expected(s), &admitted, newcomer, prefill, self.cfg.limits).is_ok()
    }

    fn tpot(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.cfg.slo_tpot_ms.into()))
    }

    /// Every admitted session costed at its last round, or the typical
    /// round before its first (as the server's tickets hold them); and the
    /// typical round.
    fn admitted_demands(&self) -> (Vec<Demand>, Option<TypicalRound>) {
        let (tpot, max_new) = (self.tpot(), self.cfg.max_new_tokens);
        let last = |s: &Session| s.last_k.map(|k| (k, s.acceptance.expected_tokens(k)));
        let typical = TypicalRound::of(self.admitted.iter().filter(|&&i| self.sessions[i].handed_off.is_none()).filter_map(|&i| last(&self.sessions[i])));
        let admitted = self
            .admitted
            .iter()
            .map(|&i| {
                let s = &self.sessions[i];
                let prompt = self.cfg.prompts[s.prompt].tokens.len();
                let prefill_left = prefill_shape(prompt - s.prefilled, prompt);
                round_demand(s.handed_off.is_some(), last(s), typical, prompt + s.generated + max_new.saturating_sub(s.generated) / 2, tpot, prefill_left)
                    .with_successor(prompt, max_new, tpot)
            })
            .collect();
        (admitted, typical)
    }

    /// A refused open: a closed-loop device asks again after a pause (as
    /// `live`'s, the wait counting against the session's TTFT) until the
    /// run ends; an open-loop arrival is lost.
    fn refused(&mut self, session: usize) {
        let device = self.sessions[session].device;
        let retry = matches!(self.cfg.arrivals, Arrivals::Closed { .. }) && self.now < self.until();
        if retry {
            let prompt_tokens = self.cfg.prompts[self.sessions[session].prompt].tokens.len();
            let trip = self.one_way(session, 64, false) + REFUSED_RETRY.as_secs_f64() * 1e3 + self.one_way(session, 64 + 4 * prompt_tokens, true);
            self.at(self.now + ns(trip), Event::OpenAtServer { session });
            return;
        }
        let s = &self.sessions[session];
        self.records.push(SessionRecord { device, prompt: self.cfg.prompts[s.prompt].id.clone(), refused: true, ..Default::default() });
        self.sessions[session].draft = None;
        self.sessions[session].controller = None;
    }

    fn deadline(&self, session: usize, kind: WorkKind, expected_tokens: f64) -> Option<Instant> {
        let s = &self.sessions[session];
        let ttft = Duration::from_millis(self.cfg.slo_ttft_ms.into());
        let tpot = Duration::from_millis(self.cfg.slo_tpot_ms.into());
        let pass = Duration::from_secs_f64(self.last_pass_ms / 1e3);
        let pace = s.first_token_at.map(|t| Pace {
            first_token_at: self.instant(t),
            tokens_since: s.generated - 1,
            prompt_per_token: prompt_per_token(s.handed_off.is_some(), s.round_clock.gap(), pass, expected_tokens),
            tokens_left: tokens_left(self.cfg.max_new_tokens, self.lengths.reach(), s.generated, expected_tokens),
        });
        work_deadline(kind, self.instant(s.opened_at), pace, self.instant(self.now), Some(ttft), Some(tpot), expected_tokens)
    }

    /// Positions in the session's KV cache: the prompt and every generated
    /// token but the last.
    fn cache_len(&self, session: usize) -> usize {
        let s = &self.sessions[session];
        self.cfg.prompts[s.prompt].tokens.len() + s.generated - 1
    }

    fn queue_step(&mut self, session: usize, kind: WorkKind, tokens: usize) {
        let expected = if kind == WorkKind::Verify { self.sessions[session].acceptance.expected_tokens(tokens - 1) } else { 1.0 };
        let deadline = self.deadline(session, kind, expected);
        self.queue.push_back(PendingWork {
            session: session as u64,
            tenant: self.sessions[session].tenant.clone(),
            kind,
            tokens,
            enqueued: self.instant(self.now),
            deadline,
            context: self.cache_len(session),
            expected_tokens: expected,
        });
    }

    /// Updates a session's round clock and the set of due rounds.
    fn round_clock(&mut self, session: usize, update: impl FnOnce(&mut RoundClock, Instant)) {
        let now = self.instant(self.now);
        let clock = &mut self.sessions[session].round_clock;
        if let Some(due) = clock.due() {
            self.rounds_due.remove(&(due, session));
        }
        update(clock, now);
        if let Some(due) = clock.due() {
            self.rounds_due.insert((due, session));
        }
    }

    fn verify_at_server(&mut self, session: usize, drafts: Vec<u32>) {
        self.round_clock(session, RoundClock::arrived);
        // Verify only the positions the session's history says may be reached.
        let verified = self.sessions[session].acceptance.reachable(drafts.len(), REACH_FLOOR);
        self.sessions[session].pending = Some((drafts, verified, self.now));
        self.queue_step(session, WorkKind::Verify, verified + 1);
        self.schedule();
    }

    /// The device is free: the batcher picks the next pass.
    fn schedule(&mut self) {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return;
        }
        self.service.observe_backlog(self.queue.iter().map(|w| w.tenant.as_str()));
        let now = self.instant(self.now);
        // Every simulated session has a TPOT objective.
        let first = self.rounds_due.first().map(|&(due, _)| due);
        self.batcher.expect_next_rounds(RoundsDue { any: first, with_deadline: first });
        let batch = self.batcher.next_batch(now, &mut self.queue);
        if batch.is_empty() {
            // The batcher waits for more arrivals (as the server's runner, at least 100 µs).
            if !self.wake_pending {
                self.wake_pending = true;
                let delay = self.batcher.max_delay().max(Duration::from_micros(100));
                self.at(self.now + delay.as_nanos() as Ns, Event::Wake);
            }
            return;
        }
        let shape = batch_shape(&batch);
        let idle_ms = ms(self.now - self.last_pass_end);
        let actual = self.truth.pass_ms(&batch, shape, &mut self.noise) + self.cfg.pass_times.idle_penalty.extra_ms(idle_ms);
        if let Some((predicted, _)) = self.batcher.estimate_ms(shape) {
            self.estimate_errors.push((predicted - actual).abs() / actual);
        }
        self.busy_ms += actual;
        self.passes += 1;
        self.in_flight = Some((batch, actual));
        self.at(self.now + ns(actual), Event::PassDone);
    }

    fn pass_done(&mut self) {
        let (batch, measured) = self.in_flight.take().expect("a pass was running");
        self.last_pass_end = self.now;
        self.batcher.executed(&batch, measured);
        self.last_pass_ms = 0.8 * self.last_pass_ms + 0.2 * measured;
        // As the server's runner publishes to admission after each pass.
        let bound = self.batcher.estimator().map(|e| e.bound());
        (self.decode_room, self.decode_cycle_ms) = judge_decoding(bound.as_ref(), &self.admitted_demands().0, self.cfg.limits);
        for s in &batch {
            let (prefill, verified) = s.service();
            self.service.charge(&s.work.tenant, prefill, verified);
        }
        for s in batch {
            let session = s.work.session as usize;
            match s.work.kind {
                WorkKind::Prefill => self.after_prefill(session, s),
                WorkKind::Verify => self.after_verify(session),
                WorkKind::Decode => self.after_decode(session),
            }
        }
        self.schedule();
    }

    fn after_prefill(&mut self, session: usize, s: Scheduled) {
        let prompt_len = self.cfg.prompts[self.sessions[session].prompt].tokens.len();
        self.sessions[session].prefilled += s.tokens;
        let done = self.sessions[session].prefilled;
        if done < prompt_len {
            // The next chunk goes before anything queued later, as in the server.
            self.queue.push_front(PendingWork { tokens: prompt_len - done, context: done, ..s.work });
            return;
        }
        self.sessions[session].generated = 1;
        self.sessions[session].first_token_at = Some(self.now);
        let finished = self.output_len(session) <= 1;
        if self.cfg.policy == Policy::Centralized {
            // Tokens come back over loopback plus half the round trip (as in `live`).
            let down = self.profile(self.sessions[session].device).rtt_ms / 2.0;
            self.at(self.now + ns(down), Event::OpenedAtEdge { session });
            if finished {
                self.at(self.now + ns(down), Event::FinishedAtEdge { session });
            } else {
                self.queue_step(session, WorkKind::Decode, 1);
            }
        } else {
            self.round_clock(session, RoundClock::answered);
            let down = self.one_way(session, 64, false);
            self.at(self.now + ns(down), Event::OpenedAtEdge { session });
        }
    }

    fn after_verify(&mut self, session: usize) {
        let (drafts, verified, queued) = self.sessions[session].pending.take().expect("a verification was queued");
        let prompts = self.cfg.prompts;
        let prompt = &prompts[self.sessions[session].prompt];
        let context = prompt.tokens.len() + self.sessions[session].generated;
        // Greedy verification against the target's own output.
        let mut accepted = drafts[..verified].iter().zip(&prompt.reference[context..]).take_while(|(d, r)| d == r).count();
        // An accepted draft at the end of the output (end of sequence) is
        // the round's last token, as in the server.
        if context + accepted >= prompt.reference.len() {
            accepted -= 1;
        }
        let s = &mut self.sessions[session];
        s.generated += accepted + 1;
        s.acceptance.observe(verified, accepted);
        s.last_k = Some(verified);
        let tenant = s.tenant.clone();
        self.tenant_acceptance.entry(tenant).or_insert_with(new_acceptance).observe(verified, accepted);
        let cached = self.cache_len(session);
        let hints = match self.batcher.estimator() {
            Some(_) => RoundHints {
                verify_ms_by_k: verify_ms_by_k(self.batcher.as_ref(), cached),
                suggested_k: suggested_k(self.decode_room, self.last_pass_ms, self.decode_cycle_ms, self.ms_per_token(session), self.batcher_k(session)),
                pass_ms: Some(self.last_pass_ms),
            },
            None => RoundHints::default(),
        };
        let server_ms = ms(self.now - queued);
        self.round_clock(session, RoundClock::answered);
        let down = self.one_way(session, 96, false);
        self.at(self.now + ns(down), Event::VerdictAtEdge { session, verified, accepted, server_ms, hints });
    }

    /// The session's time per token since its first, ms (the server's
    /// `Session::ms_per_token`).
    fn ms_per_token(&self, session: usize) -> Option<f64> {
        let s = &self.sessions[session];
        s.first_token_at.filter(|_| s.generated > 1).map(|at| ms(self.now - at) / (s.generated - 1) as f64)
    }

    /// The batcher's draft length for a session (the server's `batcher_k`).
    fn batcher_k(&self, session: usize) -> Option<usize> {
        self.batcher.suggested_k(&|k| self.sessions[session].acceptance.expected_tokens(k), self.cache_len(session))
    }

    fn after_decode(&mut self, session: usize) {
        self.sessions[session].generated += 1;
        let generated = self.sessions[session].generated;
        if generated >= self.output_len(session) {
            let down = self.profile(self.sessions[session].device).rtt_ms / 2.0;
            self.at(self.now + ns(down), Event::FinishedAtEdge { session });
        } else if self.sessions[session].handed_off.is_some_and(|h| {
            let (drafting_ms, decoded_ms) = h.paces(self.instant(self.now), generated);
            hands_back(self.decode_room, self.batcher_k(session), drafting_ms, decoded_ms)
        }) {
            // As the server's `after_decode`: the session's next message is a round.
            self.sessions[session].handed_off = None;
            self.sessions[session].hand_backs += 1;
            self.round_clock(session, RoundClock::answered);
            let down = self.one_way(session, 64, false);
            self.at(self.now + ns(down), Event::HandedBackAtEdge { session, tokens: generated });
        } else {
            self.queue_step(session, WorkKind::Decode, 1);
        }
    }

    fn opened_at_edge(&mut self, session: usize) {
        let s = &mut self.sessions[session];
        s.ttft_ms = Some(ms(self.now - s.started));
        s.tokens = 1;
        if self.cfg.policy == Policy::Centralized {
            return;
        }
        self.next_round(session);
    }

    /// The edge drafts a round (as `Speculator::generate`) and sends it.
    fn next_round(&mut self, session: usize) {
        if self.sessions[session].tokens >= self.output_len(session) {
            self.finish(session);
            return;
        }
        let profile = self.profile(self.sessions[session].device);
        let prompts = self.cfg.prompts;
        let prompt = &prompts[self.sessions[session].prompt];
        let max_new = self.cfg.max_new_tokens;
        let draft_len = self.cfg.draft_len;
        let seed = self.cfg.seed;
        let s = &mut self.sessions[session];
        let planned = s.controller.as_ref().map_or(draft_len, |c| c.round_k().min(draft_len));
        let k = planned.min(max_new.saturating_sub(s.tokens + 1));
        let context = &prompt.reference[..prompt.tokens.len() + s.tokens];
        let mut rng = SessionRng::at(seed ^ tandem_model::DRAFT_STREAM, context.len());
        if let Some(c) = s.controller.as_mut() {
            c.begin_round();
        }
        let controller = &mut s.controller;
        let proposal = s
            .draft
            .as_mut()
            .expect("drafting policies have a draft")
            .propose_until(context, s.tokens, k, &SamplingParams::default(), &mut rng, &mut |f| controller.as_mut().is_none_or(|c| c.keep_going(f)))
            // Synthetic, n-gram and cached drafts do not fail; were one to,
            // the round would go out with no drafts, as a plain decode step.
            .unwrap_or_default();
        let n = proposal.tokens.len().min(k);
        let drafts = proposal.tokens[..n].to_vec();
        s.draft_ms = n as f64 * profile.draft_ms_per_token;
        s.sent_drafts = n;
        let sent = self.now + ns(s.draft_ms);
        s.verify_sent = sent;
        let up = self.one_way(session, 32 + 4 * n, true);
        self.at(sent + ns(up), Event::VerifyAtServer { session, drafts });
    }

    fn verdict_at_edge(&mut self, session: usize, verified: usize, accepted: usize, server_ms: f64, hints: &RoundHints) {
        let pace = self.profile(self.sessions[session].device).draft_ms_per_token;
        let s = &mut self.sessions[session];
        let n = s.sent_drafts;
        let verify_ms = ms(self.now - s.verify_sent);
        let rtt = (verify_ms - server_ms).max(0.0);
        s.rounds += 1;
        s.drafted += n;
        s.accepted += accepted;
        // Tokens strictly after the first rejected position were wasted.
        if accepted + 1 < n {
            s.wasted_ms += (n - 1 - accepted) as f64 * pace;
        }
        let per_token = (n > 0).then(|| s.draft_ms / n as f64);
        if let Some(c) = s.controller.as_mut() {
            c.end_round(verified, accepted, per_token, rtt, server_ms, hints);
        }
        s.tokens += accepted + 1;
        let hand_off = s.controller.as_ref().is_some_and(|c| c.hand_off());
        if hand_off && s.tokens < self.output_len(session) {
            let up = self.one_way(session, 32, true);
            self.at(self.now + ns(up), Event::HandoffAtServer { session });
            return;
        }
        self.next_round(session);
    }

    /// The server decodes the rest of a handed-off session, as in
    /// server-only mode.
    fn handoff_at_server(&mut self, session: usize) {
        let handed_off = HandedOff { at: self.instant(self.now), generated: self.sessions[session].generated, drafting_ms: self.ms_per_token(session) };
        self.sessions[session].handed_off = Some(handed_off);
        self.sessions[session].ever_handed_off = true;
        self.round_clock(session, |clock, _| *clock = RoundClock::default());
        self.queue_step(session, WorkKind::Decode, 1);
        self.schedule();
    }

    /// The edge drafts again from the server's tokens (as `Speculator::generate`).
    fn handed_back_at_edge(&mut self, session: usize, tokens: usize) {
        let s = &mut self.sessions[session];
        s.tokens = tokens;
        if let Some(c) = s.controller.as_mut() {
            c.handed_back();
        }
        self.next_round(session);
    }

    fn finish(&mut self, session: usize) {
        let out_len = self.output_len(session);
        let s = &self.sessions[session];
        let wall = ms(self.now - s.started);
        let ttft = s.ttft_ms.unwrap_or(wall);
        let tokens = out_len;
        let tpot = if tokens > 1 { (wall - ttft) / (tokens - 1) as f64 } else { 0.0 };
        self.lengths.record(tokens);
        self.records.push(SessionRecord {
            device: s.device,
            prompt: self.cfg.prompts[s.prompt].id.clone(),
            tokens,
            ttft_ms: ttft,
            tpot_ms: tpot,
            rounds: s.rounds,
            drafted: s.drafted,
            accepted: s.accepted,
            wasted_draft_ms: s.wasted_ms,
            handed_off: s.ever_handed_off,
            hand_backs: s.hand_backs,
            slo_met: ttft <= self.cfg.slo_ttft_ms as f64 && tpot <= self.cfg.slo_tpot_ms as f64,
            ended_s: ms(self.now) / 1e3,
            ..Default::default()
        });
        self.last_finish = self.last_finish.max(self.now);
        // Release the draft state: long runs hold many finished sessions.
        let device = s.device;
        self.admitted.remove(&session);
        self.round_clock(session, |clock, _| *clock = RoundClock::default());
        self.sessions[session].draft = None;
        self.sessions[session].controller = None;
        if let Arrivals::Closed { think_ms, .. } = self.cfg.arrivals {
            self.at(self.now + ns(think_ms), Event::Start { device });
        }
    }
}
