//! The speculative loop: draft, verify, apply the verdict, repeat.

use crate::controller::SpeculationController;
use crate::target::{Emitted, LogprobsWanted, RoundOutcome, Target};
use crate::EdgeError;
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tandem_model::{DraftFeatures, DraftSource, Proposal, SamplingParams, SessionRng, SparseDist, TokenLogprob, Tokenizer, DRAFT_STREAM};
use tandem_protocol::limits::{MAX_DRAFT_TOKENS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS};

/// One generation.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Drafts proposed per round (the fixed-k policy until the speculation
    /// controller lands).
    pub draft_len: usize,
    pub sampling: SamplingParams,
    /// Report each generated token's log-probability under the target
    /// (see [`TokenLogprob`]), and perhaps the prompt's (None: none).
    pub logprobs: Option<LogprobsWanted>,
}

impl GenerateRequest {
    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |m: String| Err(EdgeError::InvalidArgument(m));
        if self.prompt.is_empty() {
            return bad("`prompt` is empty".into());
        }
        if self.prompt.len() > MAX_PROMPT_TOKENS {
            return bad(format!("`prompt` must be ≤ {MAX_PROMPT_TOKENS} tokens, got {}", self.prompt.len()));
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!("`max_new_tokens` must be in 1..={MAX_NEW_TOKENS}, got {}", self.max_new_tokens));
        }
        if let Some(w) = self.logprobs.filter(|w| w.top > MAX_TOP_LOGPROBS) {
            return bad(format!("`logprobs` must list at most {MAX_TOP_LOGPROBS} alternatives, got {}", w.top));
        }
        if self.draft_len > MAX_DRAFT_TOKENS {
            return bad(format!("`draft_len` must be ≤ {MAX_DRAFT_TOKENS}, got {}", self.draft_len));
        }
        if let Some(stop) = &self.sampling.stop {
            // They travel as one list, the end-of-sequence tokens included.
            if stop.tokens.len() > MAX_STOP_TOKEN_IDS {
                return bad(format!("`stop_token_ids` and the end-of-sequence tokens may be {MAX_STOP_TOKEN_IDS} tokens, got {}", stop.tokens.len()));
            }
            if stop.min_tokens > self.max_new_tokens {
                return bad(format!("`min_tokens` {} exceeds `max_new_tokens` {}", stop.min_tokens, self.max_new_tokens));
            }
        }
        self.sampling.validate().map_err(EdgeError::Model)
    }
}

/// What a generation produced, and how the speculation went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    /// With `GenerateRequest::logprobs`: one per token of `tokens`, and
    /// when asked one per prompt token after the first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompt_logprobs: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
    /// Verification rounds after the first token.
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
    pub acceptance_rate: f64,
    /// Tokens emitted per verification round (accepted drafts + the target's token).
    pub tokens_per_round: f64,
    pub ttft_ms: f64,
    pub wall_ms: f64,
    /// Stopped on a stop token: end-of-sequence or one of `stop_token_ids`
    /// (else on `max_new_tokens`).
    pub stopped_on_eos: bool,
    /// Server time of each round (remote runs only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub server_ms: Vec<f64>,
    /// Edge time spent drafting.
    pub draft_ms: f64,
    /// Drafting time spent on tokens after the first rejected position:
    /// thrown away, and waited on.
    pub wasted_draft_ms: f64,
    /// Mean round trip beyond the server's own time (remote runs).
    pub mean_rtt_ms: f64,
    /// Pipelining: tokens drafted while rounds were verified, and those of
    /// them used as the next round's drafts.
    pub ahead_drafted: usize,
    pub ahead_kept: usize,
    /// Ended early by the cancel flag.
    pub cancelled: bool,
    /// The tokens generated when the edge first handed the generation to
    /// the server to decode (none: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handed_off_after: Option<usize>,
    /// Tokens the server decoded after hand-offs (no round's).
    pub server_decoded: usize,
    /// Times the server handed the generation back to be drafted again.
    pub handed_back: usize,
}

/// One drafted token's features and whether the target accepted it: a
/// training example for the rejection predictor (JSONL, one per line).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ControllerSample {
    pub features: DraftFeatures,
    pub accepted: bool,
}

impl Generation {
    /// Adds a token that is final and passes it on.
    pub fn emit(&mut self, e: Emitted, on_token: &mut impl FnMut(Emitted)) {
        self.tokens.push(e.token);
        self.logprobs.extend(e.logprob.cloned());
        on_token(e);
    }

    /// Fills in text and the derived rates. `stop`: the tokens that end
    /// the generation; the one it ended on is not in the text (vLLM's way).
    pub fn finish(mut self, tokenizer: &Tokenizer, stop: &[u32], started: Instant) -> Result<Self, EdgeError> {
        self.stopped_on_eos = self.tokens.last().is_some_and(|t| stop.contains(t));
        let shown = &self.tokens[..self.tokens.len() - self.stopped_on_eos as usize];
        let visible: Vec<u32> = shown.iter().copied().filter(|&t| !tokenizer.is_special(t)).collect();
        self.text = tokenizer.decode(&visible)?;
        self.acceptance_rate = if self.drafted == 0 { 0.0 } else { self.accepted as f64 / self.drafted as f64 };
        // Tokens the server decoded after a hand-off came from no round.
        let from_rounds = self.tokens.len() - 1 - self.server_decoded;
        self.tokens_per_round = if self.rounds == 0 { 0.0 } else { from_rounds as f64 / self.rounds as f64 };
        self.wall_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(self)
    }
}

/// Draft source + target, one generation at a time.
pub struct Speculator<T: Target> {
    pub target: T,
    draft: Box<dyn DraftSource>,
    tokenizer: Arc<Tokenizer>,
    /// None: a fixed `draft_len` every round.
    controller: Option<SpeculationController>,
    /// Where (features, accepted?) of each judged draft token go.
    log: Option<Box<dyn Write + Send>>,
    /// Draft the next round while this one is being verified.
    pipeline: bool,
    /// Set from elsewhere (Ctrl-C, a client that went away) to end the
    /// current generation after its round.
    cancel: Option<Arc<AtomicBool>>,
}

/// Drafts made ahead while a round was being verified, for the context
/// "every draft accepted, and the target's token is the draft's guess".
struct Ahead {
    /// The draft's guess of the target's token, then drafts after it.
    proposal: Proposal,
    ms: f64,
}

impl<T: Target + Send> Speculator<T> {
    pub fn new(mut target: T, draft: Box<dyn DraftSource>, tokenizer: Arc<Tokenizer>) -> Self {
        target.want_features(draft.wants_target_features());
        Speculator { target, draft, tokenizer, controller: None, log: None, pipeline: false, cancel: None }
    }

    /// Hands the target's latest hidden states to the draft.
    fn pass_features(&mut self) {
        if let Some(f) = self.target.take_features() {
            self.draft.observe_target_features(f.start, &f.values);
        }
    }

    pub fn with_controller(mut self, controller: SpeculationController) -> Self {
        self.controller = Some(controller);
        self
    }

    /// Records training samples for the rejection predictor.
    pub fn with_log(mut self, log: Box<dyn Write + Send>) -> Self {
        self.log = Some(log);
        self
    }

    /// Pipelining: while a round is verified, keep drafting as if all its
    /// drafts were accepted; the work is kept when they were and the
    /// target's token matched the draft's guess, and discarded otherwise.
    /// With a controller, only in rounds it judges likely to be accepted
    /// whole.
    /// It pays when verification happens elsewhere (a server): with a
    /// local target both would share this machine's cores.
    pub fn with_pipelining(mut self, on: bool) -> Self {
        self.pipeline = on;
        self
    }

    /// A flag that, once set, ends the running generation after the round
    /// in flight (the tokens so far are returned, `cancelled` set).
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Generates, calling `on_token` with each token as soon as it is final.
    pub fn generate(&mut self, req: &GenerateRequest, mut on_token: impl FnMut(Emitted)) -> Result<Generation, EdgeError> {
        req.validate()?;
        let vocab = self.tokenizer.vocab_size();
        if let Some(&(t, _)) = req.sampling.logit_bias.iter().find(|b| b.0 as usize >= vocab) {
            return Err(EdgeError::InvalidArgument(format!("`logit_bias` names token {t}, outside the vocabulary of {vocab}")));
        }
        if let Some(t) = req.sampling.stop.iter().flat_map(|s| &s.tokens).find(|&&t| t as usize >= vocab) {
            return Err(EdgeError::InvalidArgument(format!("`stop_token_ids` names token {t}, outside the vocabulary of {vocab}")));
        }
        let start = Instant::now();
        let eos = req.sampling.stop_tokens(self.tokenizer.eos_tokens()).to_vec();
        self.target.want_logprobs(req.logprobs);
        let first = self.target.open(&req.prompt, &req.sampling, req.max_new_tokens)?;
        self.pass_features();
        let mut g = Generation { prompt_tokens: req.prompt.len(), ttft_ms: start.elapsed().as_secs_f64() * 1e3, ..Default::default() };
        g.prompt_logprobs = self.target.take_prompt_logprobs();
        let logprobs = self.target.take_logprobs();
        g.emit(Emitted { token: first, logprob: logprobs.first() }, &mut on_token);

        let mut context = req.prompt.clone();
        context.push(first);
        let mut rtt_total = 0.0;
        let mut carried: Option<Proposal> = None;
        while g.tokens.len() < req.max_new_tokens && !eos.contains(g.tokens.last().expect("non-empty")) {
            if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                g.cancelled = true;
                break;
            }
            // A round emits at most k + 1 tokens; never draft past the limit.
            let planned = self.controller.as_ref().map_or(req.draft_len, |c| c.round_k().min(req.draft_len));
            let k = planned.min(req.max_new_tokens - g.tokens.len() - 1);
            let draft_start = Instant::now();
            let (proposal, stamps, fresh) = self.draft_round(&context, k, carried.take(), req)?;
            let draft_ms = draft_start.elapsed().as_secs_f64() * 1e3;
            let n = proposal.tokens.len();
            let drafts = &proposal.tokens[..];
            let q = if req.sampling.is_greedy() { &[][..] } else { &proposal.dists[..] };
            let verify_start = Instant::now();
            let ahead_pays = self.controller.as_ref().is_none_or(|c| c.worth_drafting_ahead(n));
            let (round, ahead) = if self.pipeline && n > 0 && ahead_pays {
                let (round, ahead) = self.verify_drafting_ahead(&context, drafts, q, req)?;
                (round, Some(ahead))
            } else {
                (self.target.verify(&context, drafts, q)?, None)
            };
            let verify_ms = verify_start.elapsed().as_secs_f64() * 1e3;
            self.pass_features();
            let verdict = round.verdict;
            let rtt = round.server_ms.map_or(0.0, |s| (verify_ms - s).max(0.0));
            g.rounds += 1;
            g.drafted += n;
            g.accepted += verdict.accepted;
            g.server_ms.extend(round.server_ms);
            g.draft_ms += draft_ms;
            rtt_total += rtt;
            // Tokens strictly after the first rejected position were wasted.
            if verdict.accepted + 1 < n {
                g.wasted_draft_ms += stamps[n - 1] - stamps[verdict.accepted];
            }
            if let Some(ahead) = ahead {
                g.draft_ms += ahead.ms;
                g.ahead_drafted += ahead.proposal.tokens.len();
                let all_accepted = verdict.accepted == n;
                if all_accepted && ahead.proposal.tokens.first() == Some(&verdict.next) && !eos.contains(&verdict.next) {
                    let kept = tail(ahead.proposal, 1);
                    g.ahead_kept += kept.tokens.len();
                    carried = Some(kept);
                } else {
                    g.wasted_draft_ms += ahead.ms;
                }
            }
            if let Some(c) = self.controller.as_mut() {
                let per_token = (fresh > 0).then(|| draft_ms / fresh as f64);
                c.end_round(round.verified, verdict.accepted, per_token, rtt, round.server_ms.unwrap_or(verify_ms), &round.hints);
            }
            if let Some(log) = self.log.as_mut() {
                // Positions after the first rejection, or past those the
                // target verified, were never judged; copied tokens say
                // nothing about the model.
                for (i, f) in proposal.features.iter().take(round.verified).enumerate().take(verdict.accepted + 1).filter(|(_, f)| !f.copied) {
                    let sample = ControllerSample { features: *f, accepted: i < verdict.accepted };
                    serde_json::to_writer(&mut *log, &sample).map_err(|e| EdgeError::InvalidArgument(format!("writing the controller log: {e}")))?;
                    let _ = log.write_all(b"\n");
                }
            }
            // An accepted end-of-sequence draft ends the generation there.
            let logprobs = self.target.take_logprobs();
            for (i, &t) in drafts[..verdict.accepted].iter().chain([&verdict.next]).enumerate() {
                context.push(t);
                g.emit(Emitted { token: t, logprob: logprobs.get(i) }, &mut on_token);
                if eos.contains(&t) {
                    break;
                }
            }
            let more = g.tokens.len() < req.max_new_tokens && !eos.contains(g.tokens.last().expect("non-empty"));
            if more && self.controller.as_ref().is_some_and(|c| c.hand_off()) {
                g.handed_off_after.get_or_insert(g.tokens.len());
                let cancel = self.cancel.clone();
                let cancelled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
                let decoded = self.target.hand_off(&context, &mut |e| g.emit(e, &mut on_token), &eos, &cancelled)?;
                g.server_decoded += decoded.tokens.len();
                context.extend_from_slice(&decoded.tokens);
                if !decoded.handed_back {
                    g.cancelled = cancelled() && g.tokens.len() < req.max_new_tokens && !eos.contains(g.tokens.last().expect("non-empty"));
                    break;
                }
                // Drafting again from where the server stopped: drafts
                // made ahead continued the old context.
                g.handed_back += 1;
                carried = None;
                self.pass_features();
                if let Some(c) = self.controller.as_mut() {
                    c.handed_back();
                }
            }
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
        g.mean_rtt_ms = if g.rounds == 0 { 0.0 } else { rtt_total / g.rounds as f64 };
        g.finish(&self.tokenizer, &eos, start)
    }

    /// This round's drafts (at most `k`): those carried over from drafting
    /// ahead, re-judged by the controller, then fresh ones. Returns the
    /// proposal, each token's completion time (ms since the round began;
    /// carried tokens cost the round nothing) and how many were fresh.
    fn draft_round(&mut self, context: &[u32], k: usize, carried: Option<Proposal>, req: &GenerateRequest) -> Result<(Proposal, Vec<f64>, usize), EdgeError> {
        let sampling = &req.sampling;
        let started = Instant::now();
        let mut proposal = carried.unwrap_or_default();
        truncate(&mut proposal, k);
        let controller = &mut self.controller;
        if let Some(c) = controller.as_mut() {
            c.begin_round();
            if let Some(stop) = proposal.features.iter().position(|f| !c.keep_going(f)) {
                truncate(&mut proposal, stop + 1);
                let stamps = vec![0.0; proposal.tokens.len()];
                return Ok((proposal, stamps, 0));
            }
        }
        let carried_n = proposal.tokens.len();
        let mut stamps = vec![0.0; carried_n];
        if k > carried_n {
            // The context is copied only when carried drafts extend it.
            let extended: std::borrow::Cow<[u32]> = if carried_n == 0 { context.into() } else { [context, &proposal.tokens[..]].concat().into() };
            // Draft draws are keyed like the target's, from their own stream.
            let mut rng = SessionRng::at(sampling.seed ^ DRAFT_STREAM, extended.len());
            let generated = extended.len() - req.prompt.len();
            let fresh = self.draft.propose_until(&extended, generated, k - carried_n, sampling, &mut rng, &mut |f| {
                stamps.push(started.elapsed().as_secs_f64() * 1e3);
                controller.as_mut().is_none_or(|c| c.keep_going(f))
            })?;
            append(&mut proposal, fresh);
            truncate(&mut proposal, k);
            // Drafts without features (n-gram lookup) finish all at once.
            stamps.resize(proposal.tokens.len(), started.elapsed().as_secs_f64() * 1e3);
        }
        let fresh = proposal.tokens.len() - carried_n;
        Ok((proposal, stamps, fresh))
    }

    /// Verifies on another thread and drafts ahead here until the verdict
    /// is back (or a full round plus the guess is drafted, or the
    /// controller would stop).
    fn verify_drafting_ahead(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist], req: &GenerateRequest) -> Result<(RoundOutcome, Ahead), EdgeError> {
        let arrived = AtomicBool::new(false);
        let target = &mut self.target;
        let draft = &mut self.draft;
        let controller = &mut self.controller;
        let mut assumed = context.to_vec();
        assumed.extend_from_slice(drafts);
        let mut rng = SessionRng::at(req.sampling.seed ^ DRAFT_STREAM, assumed.len());
        let (round, ahead) = std::thread::scope(|scope| {
            let verifying = scope.spawn(|| {
                let r = target.verify(context, drafts, q);
                arrived.store(true, Ordering::Release);
                r
            });
            let started = Instant::now();
            // The cumulative stop rule goes on from the round in flight:
            // ahead work is kept only if all of it is accepted.
            let ahead = draft.propose_until(&assumed, assumed.len() - req.prompt.len(), req.draft_len + 1, &req.sampling, &mut rng, &mut |f| {
                !arrived.load(Ordering::Acquire) && controller.as_mut().is_none_or(|c| c.keep_going(f))
            });
            let ms = started.elapsed().as_secs_f64() * 1e3;
            (verifying.join().expect("the verifying thread does not panic"), ahead.map(|proposal| Ahead { proposal, ms }))
        });
        Ok((round?, ahead?))
    }
}

/// The proposal without its first `skip` tokens.
fn tail(p: Proposal, skip: usize) -> Proposal {
    Proposal {
        tokens: p.tokens.into_iter().skip(skip).collect(),
        dists: p.dists.into_iter().skip(skip).collect(),
        features: p.features.into_iter().skip(skip).collect(),
    }
}

fn truncate(p: &mut Proposal, n: usize) {
    p.tokens.truncate(n);
    p.dists.truncate(n);
    p.features.truncate(n);
}

fn append(p: &mut Proposal, more: Proposal) {
    p.tokens.extend(more.tokens);
    p.dists.extend(more.dists);
    p.features.extend(more.features);
}
