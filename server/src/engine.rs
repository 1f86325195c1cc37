//! The batch runner: one thread owns the model and every session's KV
//! cache and runs `intake → next_batch → forward → judge → send → requeue`
//! forever. Stream tasks talk to it through a bounded command channel.

use crate::admission::{self, Admission, PassLimits, Prefill, Ticket};
use crate::auth::Tenant;
use crate::batcher::{batch_shape, Batcher, PendingWork, RoundsDue, Scheduled, SessionId, WorkKind};
use crate::kv_budget::KvBudget;
use crate::metrics::Metrics;
use crate::prefix_cache::{EntryId, PrefixIndex};
use crate::session::{feed, new_acceptance, opening_demand, HandedOff, RecentLengths, Session, TypicalRound, ASSUMED_DRAFTS};
use crate::validate::{OutputConstraint, ValidOpen, ValidVerify};
use crate::ServeError;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_estimators::{AcceptanceEstimator, BatchShape, CounterWeights, ServiceGap, VerifyTimeCalibration};
use tandem_model::{judge_round, JsonObjectMode, KvCache, LoadedModel, LogitsFor, SamplingParams, SeqPass, Verdict};
use tandem_protocol::features;
use tandem_protocol::limits::MAX_DRAFT_TOKENS;
use tandem_protocol::wire::{Hints, Opened, PromptLogprobs, ServerKind, ServerMessage, Tokens, Verdict as WireVerdict};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::{debug, info, instrument, warn};

/// Draft positions reached (every earlier one accepted) with a smaller
/// estimated probability than this are not verified. Public for the
/// simulator, which applies the same clip.
pub const REACH_FLOOR: f64 = 0.05;

/// Messages for one session's stream.
pub type OutSender = mpsc::Sender<Result<ServerMessage, Status>>;

pub enum Command {
    /// An admitted session (its ticket holds its KV reservation and slot).
    Open {
        tenant: Arc<Tenant>,
        /// Boxed: an open is rare and large beside the other commands.
        open: Box<ValidOpen>,
        ticket: Ticket,
        out: OutSender,
        reply: oneshot::Sender<Result<SessionId, ServeError>>,
    },
    /// Answered once the verdict is on the session's stream (or refused).
    Verify {
        session: SessionId,
        verify: ValidVerify,
        reply: oneshot::Sender<Result<(), ServeError>>,
    },
    /// The edge hands the session over: the server decodes the rest.
    Handoff {
        session: SessionId,
        base_len: usize,
        reply: oneshot::Sender<Result<(), ServeError>>,
    },
    Close {
        session: SessionId,
    },
    /// Finish the pass in flight, tell every client UNAVAILABLE, stop.
    Shutdown,
}

/// Cloneable handle the stream tasks use.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    kv_bytes_per_position: usize,
    /// The estimator's calibration right after the warm-start sweep.
    calibration: Option<VerifyTimeCalibration>,
}

/// The most a session's cache can hold: prompt, every token still to
/// generate, and one round of drafts beyond.
fn most_positions(open: &ValidOpen) -> usize {
    open.prompt.len() + (open.max_new_tokens - open.resumed) + MAX_DRAFT_TOKENS + 1
}

impl EngineHandle {
    /// The verification-time calibration the warm-start sweep produced
    /// (None: the batcher has no estimator), for `--calibration-out`.
    pub fn warm_start_calibration(&self) -> Option<&VerifyTimeCalibration> {
        self.calibration.as_ref()
    }

    fn gone() -> ServeError {
        ServeError::Unavailable("the server is shutting down; resume elsewhere".into())
    }

    /// Admits the session here, on the stream task, so a refusal never
    /// waits for the runner's pass; then hands it to the runner.
    pub async fn open(&self, tenant: Arc<Tenant>, open: ValidOpen, out: OutSender) -> Result<SessionId, ServeError> {
        // A best-effort tenant's objectives are neither reserved for at
        // admission nor scheduled for.
        let open = if tenant.best_effort { ValidOpen { ttft_ms: None, tpot_ms: None, ..open } } else { open };
        let request = admission::Request {
            tenant: &tenant.name,
            max_sessions: tenant.max_sessions,
            kv_bytes: most_positions(&open) * self.kv_bytes_per_position,
            demand: opening_demand(&open, self.admission.typical_round()),
            prefill: Prefill { tokens: open.prompt.len(), ttft_ms: open.ttft_ms.map(f64::from) },
        };
        let ticket = self.admission.admit(request).map_err(|r| {
            self.metrics.refused(r.reason);
            match r.reason {
                admission::DRAINING => ServeError::Unavailable(r.message),
                _ => ServeError::ResourceExhausted(r.message),
            }
        })?;
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Open { tenant, open: Box::new(open), ticket, out, reply }).await.map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }

    /// # Cancel safety
    /// Dropping the future leaves the verification queued; its verdict
    /// still goes to the session's stream.
    pub async fn verify(&self, session: SessionId, verify: ValidVerify) -> Result<(), ServeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Verify { session, verify, reply }).await.map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }

    pub async fn hand_off(&self, session: SessionId, base_len: usize) -> Result<(), ServeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Handoff { session, base_len, reply }).await.map_err(|_| Self::gone())?;
        rx.await.map_err(|_| Self::gone())?
    }

    pub async fn close(&self, session: SessionId) {
        let _ = self.tx.send(Command::Close { session }).await;
    }

    /// Refuses new sessions (UNAVAILABLE) and waits until the open ones
    /// finish or `grace` passes.
    pub async fn drain(&self, grace: Duration) {
        self.admission.start_draining();
        self.metrics.draining.store(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + grace;
        while self.admission.sessions() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// Settings of the runner.
pub struct EngineConfig {
    pub kv_budget_bytes: usize,
    pub idle_ttl: Duration,
    /// The batcher's pass limits, for admission.
    pub limits: PassLimits,
    /// Every tenant's fair-share weight (the batcher's), for the service gap.
    pub tenant_weights: Vec<(String, f64)>,
    /// Decode sessions their edges hand off while there is room (see
    /// `ServerConfig::hand_offs`).
    pub hand_offs: bool,
    /// An earlier start's calibration to warm-start the estimator from
    /// (`--calibration`); None: the profiling sweep.
    pub warm_start: Option<VerifyTimeCalibration>,
    /// KV bytes of prompts kept for reuse (`prefix_cache`), on top of
    /// `kv_budget_bytes`; 0: none kept.
    pub prefix_cache_bytes: usize,
}

pub struct Engine {
    model: LoadedModel,
    batcher: Box<dyn Batcher>,
    cfg: EngineConfig,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Command>,
    runtime: tokio::runtime::Handle,
    sessions: HashMap<SessionId, Session>,
    /// Each tenant's recent draft acceptance: a new session starts from it,
    /// so opening fresh sessions does not reset a junk drafter's record.
    tenant_acceptance: HashMap<String, AcceptanceEstimator>,
    queue: VecDeque<PendingWork>,
    /// EWMA of pass time per token and of the last pass, for hints.
    ms_per_token: f64,
    last_pass_ms: f64,
    /// How long generations here got lately (see `RecentLengths`).
    lengths: RecentLengths,
    /// Fairness as served, whatever the policy (the simulator's measure).
    service_gap: ServiceGap,
    /// Prompts whose caches are kept for later sessions to copy from, and
    /// those caches.
    prefixes: PrefixIndex,
    prefix_caches: HashMap<EntryId, KvCache>,
    /// JSON mode's tables for this vocabulary, built by the first session
    /// that asks (4 ms) and shared.
    json_mode: Option<JsonObjectMode>,
}

impl Engine {
    /// Starts the runner thread. A batcher with an estimator is first
    /// calibrated, from `cfg.warm_start` or by a profiling sweep on the
    /// real model (a few seconds).
    pub fn spawn(
        model: LoadedModel,
        mut batcher: Box<dyn Batcher>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(EngineHandle, std::thread::JoinHandle<()>), ServeError> {
        if batcher.estimate_ms(Default::default()).is_some() {
            if let Some(calibration) = &cfg.warm_start {
                batcher.restore(calibration);
                info!("verification-time estimator calibrated from --calibration");
            } else {
                let start = Instant::now();
                let samples = crate::profile::sweep(&model.llama)?;
                batcher.warm_start(&samples);
                info!(batches = samples.len(), ms = start.elapsed().as_millis() as u64, "verification-time estimator calibrated");
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let admission = Admission::new(KvBudget::new(cfg.kv_budget_bytes), cfg.limits);
        admission.publish(batcher.estimator().map(|e| e.bound()), None);
        metrics.kv_budget_bytes.store(cfg.kv_budget_bytes as i64, Ordering::Relaxed);
        let kv_bytes_per_position = model.llama.new_cache(model.llama.config().n_layers).bytes_per_position();
        let calibration = batcher.estimator().map(|e| e.calibration());
        let mut service_gap = ServiceGap::new(CounterWeights::default());
        for (tenant, weight) in &cfg.tenant_weights {
            service_gap.set_weight(tenant, *weight);
        }
        let handle = EngineHandle { tx, admission: admission.clone(), metrics: metrics.clone(), kv_bytes_per_position, calibration };
        let prefix_positions = cfg.prefix_cache_bytes / kv_bytes_per_position;
        let engine = Engine {
            model,
            batcher,
            cfg,
            admission,
            metrics,
            rx,
            runtime: tokio::runtime::Handle::current(),
            sessions: HashMap::new(),
            tenant_acceptance: HashMap::new(),
            queue: VecDeque::new(),
            ms_per_token: 5.0,
            last_pass_ms: 10.0,
            lengths: RecentLengths::default(),
            service_gap,
            prefixes: PrefixIndex::new(prefix_positions),
            prefix_caches: HashMap::new(),
            json_mode: None,
        };
        let thread = std::thread::Builder::new()
            .name("tandem-runner".into())
            .spawn(move || {
                // Without its runner the server cannot serve anything: exit
                // rather than answer UNAVAILABLE forever.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run_loop())).is_err() {
                    tracing::error!("the batch runner panicked; exiting");
                    std::process::exit(70);
                }
            })
            .expect("spawn runner");
        Ok((handle, thread))
    }

    fn run_loop(mut self) {
        info!("runner started");
        // End of the batching delay in progress: arrivals during it do not
        // restart it (as in the simulator, which wakes once).
        let mut delay_until: Option<Instant> = None;
        loop {
            if !self.intake() {
                break;
            }
            self.expire_idle(Instant::now());
            let clocks = self.sessions.values().map(|s| (&s.round_clock, s.tpot.is_some()));
            self.batcher.expect_next_rounds(RoundsDue::from_clocks(Instant::now(), self.batcher.max_delay(), clocks));
            if !self.queue.is_empty() {
                self.service_gap.observe_backlog(self.queue.iter().map(|w| w.tenant.as_str()));
            }
            let batch = self.batcher.next_batch(Instant::now(), &mut self.queue);
            if !batch.is_empty() {
                delay_until = None;
                self.run_batch(batch);
            } else if !self.queue.is_empty() {
                // The batcher chose to wait for more arrivals (bounded).
                let now = Instant::now();
                let until = *delay_until.get_or_insert(now + self.batcher.max_delay());
                if let Some(cmd) = self.next_command_before(until.max(now + Duration::from_micros(100))) {
                    if !self.handle(cmd) {
                        break;
                    }
                }
            }
            self.update_gauges();
        }
        self.drain();
        info!("runner stopped");
    }

    /// Takes every waiting command, blocking (up to a second, for idle
    /// expiry) when there is no work. Returns false on shutdown.
    fn intake(&mut self) -> bool {
        if self.queue.is_empty() {
            let rx = &mut self.rx;
            let wait = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), rx.recv()).await });
            match wait {
                Ok(Some(cmd)) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
        while let Ok(cmd) = self.rx.try_recv() {
            if !self.handle(cmd) {
                return false;
            }
        }
        true
    }

    /// The next command if one arrives by `until`. Polled: tokio's timer
    /// ticks in whole milliseconds, which made the batcher's 2 ms wait
    /// about 3 ms (a third more latency on every round it delayed).
    fn next_command_before(&mut self, until: Instant) -> Option<Command> {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => return Some(cmd),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            std::thread::sleep((until - now).min(Duration::from_micros(50)));
        }
    }

    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Open { tenant, open, ticket, out, reply } => {
                let _ = reply.send(Ok(self.admit(tenant, *open, ticket, out)));
            }
            Command::Verify { session, verify, reply } => {
                if let Err(e) = self.accept_verify(session, verify, reply) {
                    debug!(session, error = %e, "verify refused");
                }
            }
            Command::Handoff { session, base_len, reply } => {
                let _ = reply.send(self.accept_handoff(session, base_len));
            }
            Command::Close { session } => self.drop_session(session, None),
            Command::Shutdown => return false,
        }
        true
    }

    fn admit(&mut self, tenant: Arc<Tenant>, open: ValidOpen, ticket: Ticket, out: OutSender) -> SessionId {
        let llama = &self.model.llama;
        // The memory admission charged for, reserved now: a pass that grew
        // the cache would copy all of it (a latency spike the estimator
        // cannot see coming). Pages are touched only as positions are written.
        let mut cache = llama.new_cache(llama.config().n_layers);
        cache.reserve(most_positions(&open));
        let id = ticket.id;
        let resumed = open.resumed > 0;
        let prefill_target = open.prefill_target();
        // A draft that reads the target's hidden states needs them for the
        // whole prompt, and prompt log-probabilities need its logits;
        // copied positions come without.
        let whole = open.want_features || open.prompt_logprobs;
        let reused = if whole { 0 } else { self.reuse_prefix(&tenant.name, &open.prompt[..prefill_target], &mut cache) };
        self.metrics.tenant(&tenant.name, |t| {
            t.sessions_opened += 1;
            t.prefill_tokens += (prefill_target - reused) as u64;
            t.prefix_cache_queries += if whole { 0 } else { prefill_target as u64 };
            t.prefix_cache_hits += reused as u64;
        });
        let now = Instant::now();
        debug!(session = id, tenant = %tenant.name, prompt = open.prompt.len(), resumed = open.resumed, "session admitted");
        let acceptance = self.tenant_acceptance.get(&tenant.name).cloned().unwrap_or_else(new_acceptance);
        let session = Session {
            tenant,
            cache,
            ticket,
            context: open.prompt,
            prefill_target,
            sample_first: !resumed,
            generated: open.resumed,
            max_new: open.max_new_tokens,
            sampling: SamplingParams {
                json_object: open.constraint.as_ref().map(|constraint| {
                    let tables = self.json_mode.get_or_insert_with(|| JsonObjectMode::new(self.model.tokenizer.clone()));
                    match constraint {
                        OutputConstraint::Object(schema) => tables.with_schema(schema.clone()),
                        OutputConstraint::Regex(regex) => tables.with_regex(regex.clone()),
                        OutputConstraint::Grammar(grammar) => tables.with_grammar(grammar.clone()),
                    }
                }),
                ..open.sampling
            },
            server_only: open.server_only,
            handed_off: None,
            want_features: open.want_features,
            held_features: Vec::new(),
            logprobs: open.logprobs,
            prompt_logprobs: open.prompt_logprobs,
            opened: false,
            pending_verify: None,
            out,
            last_active: now,
            opened_at: now,
            ttft: open.ttft_ms.map(|ms| Duration::from_millis(ms as u64)),
            tpot: open.tpot_ms.map(|ms| Duration::from_millis(ms as u64)),
            first_token: None,
            acceptance,
            last_k: None,
            round_clock: Default::default(),
        };
        self.queue.push_back(session.work(id, WorkKind::Prefill, prefill_target - reused, now, self.pass_time(), self.lengths.reach()));
        self.sessions.insert(id, session);
        self.update_gauges();
        id
    }

    fn accept_verify(&mut self, id: SessionId, verify: ValidVerify, reply: oneshot::Sender<Result<(), ServeError>>) -> Result<(), ServeError> {
        let refuse = |reply: oneshot::Sender<Result<(), ServeError>>, e: ServeError| {
            let msg = e.to_string();
            let _ = reply.send(Err(e));
            Err(ServeError::FailedPrecondition(msg))
        };
        let (pass, reach) = (self.pass_time(), self.lengths.reach());
        let Some(s) = self.sessions.get_mut(&id) else {
            return refuse(reply, ServeError::NotFound(format!("session {id} does not exist (closed, finished or expired)")));
        };
        s.last_active = Instant::now();
        s.round_clock.arrived(s.last_active);
        if let Some(p) = not_between_rounds(s, "verify", verify.base_len) {
            return refuse(reply, ServeError::FailedPrecondition(p));
        }
        if s.generated + verify.draft.len() + 1 > s.max_new {
            let remaining = s.max_new - s.generated;
            return refuse(
                reply,
                ServeError::InvalidArgument(format!(
                    "`verify.draft` has {} tokens, but only {} may be drafted with {remaining} left before `max_new_tokens`",
                    verify.draft.len(),
                    remaining.saturating_sub(1)
                )),
            );
        }
        // Verify only the positions this session's history says may be
        // reached: junk drafts cost one position a round, not sixteen.
        let mut verify = verify;
        verify.clip(s.acceptance.reachable(verify.draft.len(), REACH_FLOOR));
        let tokens = verify.draft.len() + 1;
        let now = Instant::now();
        s.pending_verify = Some((verify, reply, now));
        self.queue.push_back(s.work(id, WorkKind::Verify, tokens, now, pass, reach));
        Ok(())
    }

    /// From now on the session is decoded here, as in server-only mode.
    fn accept_handoff(&mut self, id: SessionId, base_len: usize) -> Result<(), ServeError> {
        let (pass, reach) = (self.pass_time(), self.lengths.reach());
        let Some(s) = self.sessions.get_mut(&id) else {
            return Err(ServeError::NotFound(format!("session {id} does not exist (closed, finished or expired)")));
        };
        if let Some(p) = not_between_rounds(s, "handoff", base_len) {
            return Err(ServeError::FailedPrecondition(p));
        }
        let now = Instant::now();
        s.last_active = now;
        s.server_only = true;
        s.handed_off = Some(HandedOff { at: now, generated: s.generated, drafting_ms: s.ms_per_token(now) });
        // No more rounds are coming: the batcher must not wait for one.
        s.round_clock = Default::default();
        s.ticket.update(s.demand(self.admission.typical_round()));
        self.metrics.tenant(&s.tenant.name, |t| t.handoffs += 1);
        debug!(session = id, tokens = base_len, "session handed off");
        self.queue.push_back(s.work(id, WorkKind::Decode, 1, now, pass, reach));
        Ok(())
    }

    /// Forward pass over the batch, then each member's outcome.
    #[instrument(skip_all, fields(seqs = batch.len()))]
    fn run_batch(&mut self, batch: Vec<Scheduled>) {
        // Take the members out of the table so their caches can be
        // borrowed mutably side by side; closed ones are skipped.
        let mut members: Vec<(Scheduled, Session)> = batch.into_iter().filter_map(|s| self.sessions.remove(&s.work.session).map(|sess| (s, sess))).collect();
        if members.is_empty() {
            return;
        }
        let executed: Vec<Scheduled> = members.iter().map(|(s, _)| s.clone()).collect();
        let estimate = self.batcher.estimate_ms(batch_shape(&executed));
        let feeds: Vec<(Vec<u32>, LogitsFor)> = members.iter().map(|(s, sess)| feed(s, sess)).collect();
        let total: usize = feeds.iter().map(|f| f.0.len()).sum();
        let start = Instant::now();
        // Final hidden states only when a member's draft reads them.
        let n_layers = self.model.llama.config().n_layers;
        let capture: &[usize] = if members.iter().any(|(_, s)| s.want_features) { &[n_layers] } else { &[] };
        let result = {
            let mut passes: Vec<SeqPass> =
                members.iter_mut().zip(&feeds).map(|((_, sess), (tokens, logits))| SeqPass { cache: &mut sess.cache, tokens, logits: *logits }).collect();
            self.model.llama.forward_capturing(&mut passes, capture)
        };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.observe_pass(members.len(), total, ms);
        if let Some((predicted, _)) = estimate {
            self.metrics.observe_estimate(predicted, ms);
        }
        self.batcher.executed(&executed, ms);
        for s in &executed {
            let (prefill, verified) = s.service();
            self.service_gap.charge(&s.work.tenant, prefill, verified);
        }
        self.publish_admission();
        let (logits, captured) = match result {
            Ok(r) => r,
            Err(e) => {
                // Validation makes this unreachable; never crash the server.
                warn!(error = %e, "forward pass failed; ending its sessions");
                for (s, sess) in members {
                    self.sessions.insert(s.work.session, sess);
                    self.drop_session(s.work.session, Some(ServeError::Model(tandem_model::ModelError::InvalidArgument(e.to_string()))));
                }
                return;
            }
        };
        let hidden = self.model.llama.config().hidden;
        let mut row = 0;
        for (((scheduled, mut sess), logits), (fed, _)) in members.into_iter().zip(logits).zip(&feeds) {
            let id = scheduled.work.session;
            let states = captured.first().map_or(&[][..], |c| &c[row * hidden..(row + fed.len()) * hidden]);
            row += fed.len();
            if let Some(deadline) = scheduled.work.deadline {
                let final_step = scheduled.work.kind != WorkKind::Prefill || sess.cache.len() >= sess.prefill_target;
                if final_step {
                    self.metrics.observe_slo(&sess.tenant.name, Instant::now() <= deadline);
                }
            }
            let keep = match scheduled.work.kind {
                WorkKind::Prefill => self.after_prefill(id, &scheduled, &mut sess, &logits, states),
                WorkKind::Verify => self.after_verify(&mut sess, &logits, states),
                WorkKind::Decode => self.after_decode(id, &mut sess, &logits, states),
            };
            self.sessions.insert(id, sess);
            if !keep {
                self.drop_session(id, None);
            }
        }
    }

    /// Gives admission the estimator after a pass and the typical round of
    /// the sessions past their first, and costs the sessions before theirs
    /// at it.
    fn publish_admission(&self) {
        let typical =
            TypicalRound::of(self.sessions.values().filter(|s| !s.server_only).filter_map(|s| s.last_k.map(|k| (k, s.acceptance.expected_tokens(k)))));
        self.admission.publish(self.batcher.estimator().map(|e| e.bound()), typical);
        for s in self.sessions.values().filter(|s| s.last_k.is_none()) {
            s.ticket.update(s.demand(typical));
        }
    }

    /// The batcher's draft length for a session: the least server time per
    /// expected token (0: a decode step).
    fn batcher_k(&self, s: &Session) -> Option<usize> {
        self.batcher.suggested_k(&|k| s.acceptance.expected_tokens(k), s.cache.len())
    }

    /// What a pass takes lately (an EWMA).
    fn pass_time(&self) -> Duration {
        Duration::from_secs_f64(self.last_pass_ms.max(0.0) / 1e3)
    }

    /// What the edge should know for its next round: expected queueing,
    /// verification time by draft length, and the suggested draft length
    /// (`admission::suggested_k`: decoding on the server while it has room,
    /// else the least server time per expected token).
    fn hints(&self, s: &Session) -> Hints {
        let queued = self.queue.iter().map(|w| w.shape(w.tokens)).sum::<BatchShape>();
        let Some((queue_ms, _)) = self.batcher.estimate_ms(queued) else {
            let queued_tokens: usize = self.queue.iter().map(|w| w.tokens).sum();
            return Hints {
                est_queue_ms: (queued_tokens as f64 * self.ms_per_token) as f32,
                est_verify_ms: self.last_pass_ms as f32,
                suggested_k: 4,
                est_verify_ms_by_k: vec![],
                pass_ms: self.last_pass_ms as f32,
            };
        };
        let by_k = verify_ms_by_k(self.batcher.as_ref(), s.cache.len());
        let suggested_k = match self.cfg.hand_offs {
            true => admission::suggested_k(
                self.admission.decode_room(),
                self.last_pass_ms,
                self.admission.decode_cycle_ms(),
                s.ms_per_token(Instant::now()),
                self.batcher_k(s),
            ),
            // Never a decode step: the session would be handed straight back.
            false => self.batcher_k(s).map(|k| k.max(1)),
        }
        .unwrap_or(4);
        Hints {
            est_queue_ms: queue_ms as f32,
            est_verify_ms: by_k[s.last_k.unwrap_or(ASSUMED_DRAFTS).clamp(1, 8) - 1],
            suggested_k: suggested_k as u32,
            est_verify_ms_by_k: by_k,
            pass_ms: self.last_pass_ms as f32,
        }
    }

    /// Copies into `cache` (empty) the longest start of `prompt` the prefix
    /// cache holds for `tenant`, leaving at least the last token to compute
    /// (the pass that samples the first token needs its logits); returns
    /// the positions copied.
    fn reuse_prefix(&mut self, tenant: &str, prompt: &[u32], cache: &mut KvCache) -> usize {
        let Some(reuse) = self.prefixes.lookup(tenant, prompt, prompt.len().saturating_sub(1)) else { return 0 };
        cache.extend_from_prefix(&self.prefix_caches[&reuse.entry], reuse.positions);
        debug!(tenant, positions = reuse.positions, "prompt prefix reused");
        reuse.positions
    }

    /// Offers the prefix cache a prompt (or a finished session's prompt
    /// and answer) whose positions `cache` holds now.
    fn keep_prefix(&mut self, tenant: &str, prompt: &[u32], cache: &KvCache) {
        let Some(inserted) = self.prefixes.insert(tenant, prompt) else { return };
        for entry in inserted.evicted {
            self.prefix_caches.remove(&entry);
        }
        let mut kept = self.model.llama.new_cache(cache.n_layers());
        kept.reserve(prompt.len());
        kept.extend_from_prefix(cache, prompt.len());
        self.prefix_caches.insert(inserted.entry, kept);
        let bytes = self.prefixes.held_positions() * cache.bytes_per_position();
        self.metrics.prefix_cache_bytes.store(bytes as i64, Ordering::Relaxed);
    }

    /// Returns whether the session lives on.
    fn after_prefill(&mut self, id: SessionId, scheduled: &Scheduled, s: &mut Session, logits: &tandem_model::Logits, states: &[f32]) -> bool {
        let done = s.cache.len();
        if s.want_features {
            s.hold_features(states, self.model.llama.config().hidden);
        }
        if s.prompt_logprobs {
            // Row j of the pass follows position from + j: the prompt's
            // next token, or past its end the first generated one.
            let from = done - scheduled.tokens;
            let next = s.context[from + 1..s.prefill_target].iter().take(scheduled.tokens).copied().collect::<Vec<_>>();
            let msg = PromptLogprobs { start: (from + 1) as u32, logprobs: s.logprobs_of(logits, &next) };
            if !next.is_empty() && !send(&s.out, ServerKind::PromptLogprobs(msg)) {
                return false;
            }
        }
        if done < s.prefill_target {
            // Continue with the next chunk before anything queued later.
            self.queue.push_front(PendingWork { tokens: s.prefill_target - done, context: done, ..scheduled.work.clone() });
            return true;
        }
        self.keep_prefix(&s.tenant.name, &s.context[..s.prefill_target], &s.cache);
        let mut first_logprob = vec![];
        if s.sample_first {
            let last = logits.rows() - 1;
            let first = s.sampling.next_token(logits.row(last), &s.context, s.generated);
            first_logprob = s.logprobs_of_row(logits, last, first);
            s.context.push(first);
            s.generated += 1;
            self.metrics.tenant(&s.tenant.name, |t| t.generated_tokens += 1);
        }
        s.opened = true;
        s.first_token = Some((Instant::now(), s.generated));
        s.ticket.update(s.demand(self.admission.typical_round()));
        let finished = s.finished(self.model.tokenizer.eos_tokens());
        let features = features::encode(&std::mem::take(&mut s.held_features));
        let features_start = (s.prefill_target - features.len() / 2 / self.model.llama.config().hidden) as u32;
        let msg = Opened {
            session_id: id.to_string(),
            first_token: *s.context.last().expect("prompt non-empty"),
            hints: Some(self.hints(s)),
            finished,
            features,
            features_start,
            logprobs: first_logprob,
        };
        if !send(&s.out, ServerKind::Opened(msg)) || finished {
            return false;
        }
        if s.server_only {
            self.queue.push_back(s.work(id, WorkKind::Decode, 1, Instant::now(), self.pass_time(), self.lengths.reach()));
        } else {
            s.round_clock.answered(Instant::now());
        }
        true
    }

    fn after_verify(&mut self, s: &mut Session, logits: &tandem_model::Logits, states: &[f32]) -> bool {
        let Some((verify, reply, queued_at)) = s.pending_verify.take() else { return true };
        let drafts = &verify.draft;
        let verdict = judge_round(&s.sampling, &s.context, s.generated, drafts, &verify.q, logits);
        // An accepted stop token (end-of-sequence, …) ends the output there.
        let eos = self.model.tokenizer.eos_tokens();
        let stop = s.sampling.stop_tokens(eos);
        let verdict = match drafts[..verdict.accepted].iter().position(|t| stop.contains(t)) {
            Some(j) => Verdict { accepted: j, next: drafts[j] },
            None => verdict,
        };
        let emitted: Vec<u32> = drafts[..verdict.accepted].iter().copied().chain([verdict.next]).collect();
        let logprobs = s.logprobs_of(logits, &emitted);
        let base = s.context.len() - 1;
        s.cache.truncate(base + 1 + verdict.accepted);
        s.context.extend_from_slice(&drafts[..verdict.accepted]);
        s.context.push(verdict.next);
        s.generated += verdict.accepted + 1;
        s.acceptance.observe(drafts.len(), verdict.accepted);
        self.tenant_acceptance.entry(s.tenant.name.clone()).or_insert_with(new_acceptance).observe(drafts.len(), verdict.accepted);
        s.last_k = Some(drafts.len());
        self.metrics.tenant(&s.tenant.name, |t| {
            if !drafts.is_empty() {
                t.num_drafts += 1;
            }
            t.num_draft_tokens += drafts.len() as u64;
            t.num_accepted_tokens += verdict.accepted as u64;
            t.verified_positions += drafts.len() as u64 + 1;
            t.generated_tokens += verdict.accepted as u64 + 1;
        });
        let finished = s.finished(eos);
        let msg = WireVerdict {
            seq: verify.seq,
            accepted: verdict.accepted as u32,
            next_token: verdict.next,
            hints: Some(self.hints(s)),
            finished,
            server_ms: queued_at.elapsed().as_secs_f32() * 1e3,
            verified: drafts.len() as u32,
            // The last verified token and the accepted drafts.
            features: match s.want_features {
                true => features::encode(states.get(..(verdict.accepted + 1) * self.model.llama.config().hidden).unwrap_or_default()),
                false => vec![],
            },
            logprobs,
        };
        s.ticket.update(s.demand(self.admission.typical_round()));
        s.round_clock.answered(Instant::now());
        let delivered = send(&s.out, ServerKind::Verdict(msg));
        let _ = reply.send(Ok(()));
        delivered && !finished
    }

    fn after_decode(&mut self, id: SessionId, s: &mut Session, logits: &tandem_model::Logits, states: &[f32]) -> bool {
        let token = s.sampling.next_token(logits.row(0), &s.context, s.generated);
        let logprobs = s.logprobs_of(logits, &[token]);
        s.context.push(token);
        s.generated += 1;
        self.metrics.tenant(&s.tenant.name, |t| {
            t.verified_positions += 1;
            t.generated_tokens += 1;
        });
        let finished = s.finished(self.model.tokenizer.eos_tokens());
        let now = Instant::now();
        let handed_back = !finished
            && s.handed_off.as_ref().is_some_and(|h| {
                let (drafting_ms, decoded_ms) = h.paces(now, s.generated);
                !self.cfg.hand_offs || admission::hands_back(self.admission.decode_room(), self.batcher_k(s), drafting_ms, decoded_ms)
            });
        // The decoded positions' states go to the edge only if it drafts again.
        let hidden = self.model.llama.config().hidden;
        if s.want_features && s.handed_off.is_some() {
            s.hold_features(states.get(..hidden).unwrap_or_default(), hidden);
        }
        let (features, features_start) = match handed_back {
            true => {
                let rows = s.held_features.len() / hidden;
                (features::encode(&std::mem::take(&mut s.held_features)), (s.context.len() - 1 - rows) as u32)
            }
            false => (vec![], 0),
        };
        if !send(&s.out, ServerKind::Tokens(Tokens { tokens: vec![token], finished, handed_back, features, features_start, logprobs })) || finished {
            return false;
        }
        if handed_back {
            // Drafting again: the session's next message is a round.
            s.server_only = false;
            s.handed_off = None;
            s.last_active = now;
            s.round_clock.answered(now);
            s.ticket.update(s.demand(self.admission.typical_round()));
            self.metrics.tenant(&s.tenant.name, |t| t.handbacks += 1);
            debug!(session = id, tokens = s.context.len(), "session handed back");
            return true;
        }
        self.queue.push_back(s.work(id, WorkKind::Decode, 1, now, self.pass_time(), self.lengths.reach()));
        true
    }

    fn observe_pass(&mut self, seqs: usize, tokens: usize, ms: f64) {
        self.metrics.batch_seqs.observe(seqs as f64);
        self.metrics.batch_tokens.observe(tokens as f64);
        self.metrics.pass_seconds.observe(ms / 1e3);
        self.ms_per_token = 0.8 * self.ms_per_token + 0.2 * ms / tokens.max(1) as f64;
        self.last_pass_ms = 0.8 * self.last_pass_ms + 0.2 * ms;
    }

    /// Ends a session; with an error, the client receives it as its status.
    fn drop_session(&mut self, id: SessionId, error: Option<ServeError>) {
        let Some(s) = self.sessions.remove(&id) else { return };
        if error.is_none() && s.finished(self.model.tokenizer.eos_tokens()) {
            self.lengths.record(s.generated);
            // The next turn of a chat sends this prompt and answer back
            // with its question after them.
            let positions = s.cache.len().min(s.context.len());
            self.keep_prefix(&s.tenant.name, &s.context[..positions], &s.cache);
        }
        self.queue.retain(|w| w.session != id);
        if let Some((_, reply, _)) = s.pending_verify {
            let _ = reply.send(Err(ServeError::NotFound(format!("session {id} ended"))));
        }
        // Gauges first, so a client that sees its stream end sees the
        // memory returned too.
        drop(s.ticket);
        self.update_gauges();
        if let Some(e) = error {
            let _ = s.out.try_send(Err(e.into()));
        }
        debug!(session = id, "session dropped");
    }

    fn expire_idle(&mut self, now: Instant) {
        let ttl = self.cfg.idle_ttl;
        let idle: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.pending_verify.is_none() && !s.server_only && s.opened && now.duration_since(s.last_active) > ttl)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.drop_session(id, Some(ServeError::Idle(format!("no message for {} s; resume to continue", ttl.as_secs()))));
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.sessions.store(self.sessions.len() as i64, Ordering::Relaxed);
        m.queue_depth.store(self.queue.len() as i64, Ordering::Relaxed);
        m.kv_bytes_in_use.store(self.sessions.values().map(|s| s.cache.bytes()).sum::<usize>() as i64, Ordering::Relaxed);
        m.kv_bytes_reserved.store(self.admission.reserved_bytes() as i64, Ordering::Relaxed);
        m.set_admission_headroom(self.admission.headroom_ms());
        m.set_service_counters(self.batcher.tenant_counters());
        m.decode_room.store(self.admission.decode_room().level(), Ordering::Relaxed);
        m.set_estimator_coefficients(self.batcher.estimator().map(|e| e.coefficients()));
        m.set_service_gap(self.service_gap.max());
    }

    /// Shutdown: every client is told to resume elsewhere.
    fn drain(&mut self) {
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.drop_session(id, Some(ServeError::Unavailable("the server is shutting down; resume elsewhere".into())));
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Open { reply, .. } => drop(reply.send(Err(EngineHandle::gone()))),
                Command::Verify { reply, .. } | Command::Handoff { reply, .. } => drop(reply.send(Err(EngineHandle::gone()))),
                Command::Close { .. } | Command::Shutdown => {}
            }
        }
        self.update_gauges();
    }
}

/// Why a session cannot take a `what` message (`verify`, `handoff`) for
/// `base_len` tokens now; None when it is between rounds.
fn not_between_rounds(s: &Session, what: &str, base_len: usize) -> Option<String> {
    if !s.opened {
        Some("the session is still prefilling; wait for `Opened`".to_string())
    } else if s.server_only {
        Some(format!("`{what}` is not accepted in server-only mode"))
    } else if s.pending_verify.is_some() {
        Some("a verification for this session is already in flight".to_string())
    } else if base_len != s.context.len() {
        Some(format!("`{what}.base_len` is {base_len}, the session holds {} tokens (stale drafts)", s.context.len()))
    } else {
        None
    }
}

/// The batcher's upper bound T_q of one session's verification round of
/// k = 1..=8 drafts at `context` positions, ms: the hint edges size their
/// rounds by. Public for the simulator.
pub fn verify_ms_by_k(batcher: &dyn Batcher, context: usize) -> Vec<f32> {
    (1..=8).map(|k| batcher.estimate_ms(BatchShape::verify_round(k, context)).map_or(0.0, |e| e.1 as f32)).collect()
}

/// Puts a message on a session's stream; false when the client is gone or
/// not reading (its session is then dropped rather than buffered without bound).
fn send(out: &OutSender, msg: ServerKind) -> bool {
    out.try_send(Ok(ServerMessage { kind: Some(msg) })).is_ok()
}
