//! A session as the runner holds it.

use crate::auth::Tenant;
use crate::batcher::{PendingWork, Scheduled, SessionId, WorkKind};
use crate::engine::OutSender;
use crate::kv_budget::KvLease;
use crate::validate::ValidVerify;
use crate::ServeError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_estimators::AcceptanceEstimator;
use tandem_model::{KvCache, LogitsFor, SamplingParams};
use tokio::sync::oneshot;

/// One generation's state on the server: its KV cache and reservation,
/// its tokens, sampling, objectives and stream.
pub(crate) struct Session {
    pub(crate) tenant: Arc<Tenant>,
    pub(crate) cache: KvCache,
    pub(crate) lease: KvLease,
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
    pub(crate) opened: bool,
    pub(crate) pending_verify: Option<(ValidVerify, oneshot::Sender<Result<(), ServeError>>, Instant)>,
    pub(crate) out: OutSender,
    pub(crate) last_active: Instant,
    pub(crate) opened_at: Instant,
    pub(crate) ttft: Option<Duration>,
    pub(crate) tpot: Option<Duration>,
    /// Per-position acceptance of this session's drafts.
    pub(crate) acceptance: AcceptanceEstimator,
    /// Draft length of the last round (for hints).
    pub(crate) last_k: usize,
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
        let deadline = match kind {
            WorkKind::Prefill => self.ttft.map(|t| self.opened_at + t),
            WorkKind::Verify | WorkKind::Decode => self.tpot.map(|t| now + t.mul_f64(expected_tokens)),
        };
        PendingWork {
            session: id,
            tenant: self.tenant.name.clone(),
            kind,
            tokens,
            enqueued: now,
            deadline,
            context: self.cache.len(),
            expected_tokens,
        }
    }

    pub(crate) fn finished(&self, eos: &[u32]) -> bool {
        self.generated >= self.max_new || (self.generated > 0 && self.context.last().is_some_and(|t| eos.contains(t)))
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

