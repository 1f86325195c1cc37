//! The lossless verification rule (DESIGN.md), as pure functions.
//!
//! The caller ran the target over `[last, d_1..d_k]` and hands in the k + 1
//! rows of logits (greedy) or the target's distributions p_1..p_{k+1} under
//! the request's sampling parameters. The verdict says how many drafts are
//! accepted and which token follows them.

use crate::sampling::{argmax, sample_weighted, SamplingParams, SessionRng, SparseDist};
use crate::Logits;

/// Outcome of one verification round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Drafts accepted, a prefix of the proposal.
    pub accepted: usize,
    /// The target's token after the accepted prefix: the correction at the
    /// first rejection, or the bonus token when all were accepted.
    pub next: u32,
}

/// Greedy rule: accept d_i while it is the target's argmax; emit the argmax
/// at the first mismatch, or after the last draft.
pub fn verify_greedy<'a>(drafts: &[u32], mut target_rows: impl FnMut(usize) -> &'a [f32]) -> Verdict {
    for (i, &d) in drafts.iter().enumerate() {
        let best = argmax(target_rows(i));
        if best != d {
            return Verdict { accepted: i, next: best };
        }
    }
    Verdict { accepted: drafts.len(), next: argmax(target_rows(drafts.len())) }
}

/// Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept
/// d_i with probability min(1, p_i(d_i) / q_i(d_i)); on rejection draw from
/// normalize(max(0, p_i − q_i)); if all are accepted draw from p_{k+1}.
/// The output is distributed exactly as sampling from p autoregressively.
///
/// `q[i]` must give d_i positive probability (the wire validation ensures
/// it); `target(i)` is p_{i+1}, for i in 0..=k, asked for in order and only
/// up to the first rejection (each costs a pass over the vocabulary).
pub fn verify_sampled(drafts: &[u32], q: &[SparseDist], mut target: impl FnMut(usize) -> SparseDist, rng: &mut SessionRng) -> Verdict {
    debug_assert_eq!(drafts.len(), q.len());
    for (i, &d) in drafts.iter().enumerate() {
        let p = target(i);
        let (pd, qd) = (p.prob(d), q[i].prob(d));
        if rng.next_f64() * qd < pd {
            continue;
        }
        let residual = p.tokens.iter().zip(&p.probs).map(|(&t, &pt)| (t, (pt as f64 - q[i].prob(t)).max(0.0)));
        // A zero residual means p ≤ q everywhere, i.e. p = q, where
        // rejection has probability zero; fall back to p for rounding.
        let next = sample_weighted(residual, rng).unwrap_or_else(|| p.sample(rng));
        return Verdict { accepted: i, next };
    }
    Verdict { accepted: drafts.len(), next: target(drafts.len()).sample(rng) }
}

/// Judges one round of `drafts` after `context` (whose last `generated`
/// tokens are output) from the target's k + 1 rows of logits, biased and
/// penalized as `sampling` says (row i by the context and the drafts
/// before it):
/// the greedy rule, or speculative sampling with the draws keyed by the
/// context's length, so any verifier of the same session (local, a
/// server, a resumed one) makes the same draws.
pub fn judge_round(sampling: &SamplingParams, context: &[u32], generated: usize, drafts: &[u32], q: &[SparseDist], logits: &Logits) -> Verdict {
    let penalized;
    let logits = if !sampling.adjusts_logits() {
        logits
    } else {
        let mut rows = logits.clone();
        let (prompt, output) = context.split_at(context.len() - generated);
        for i in 0..rows.rows() {
            let output = [output, &drafts[..i.min(drafts.len())]].concat();
            sampling.adjust_logits(&mut rows.data[i * rows.vocab..(i + 1) * rows.vocab], prompt, &output);
        }
        penalized = rows;
        &penalized
    };
    if sampling.is_greedy() {
        return verify_greedy(drafts, |i| logits.row(i));
    }
    verify_sampled(drafts, q, |i| sampling.distribution(logits.row(i)), &mut SessionRng::at(sampling.seed, context.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_accepts_prefix_and_corrects() {
        let rows = [vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]];
        assert_eq!(verify_greedy(&[1, 0], |i| &rows[i]), Verdict { accepted: 2, next: 2 });
        assert_eq!(verify_greedy(&[1, 2], |i| &rows[i]), Verdict { accepted: 1, next: 0 });
        assert_eq!(verify_greedy(&[0, 0], |i| &rows[i]), Verdict { accepted: 0, next: 1 });
        assert_eq!(verify_greedy(&[], |i| &rows[i]), Verdict { accepted: 0, next: 1 });
    }

    #[test]
    fn penalties_count_the_drafts_before_each_position() {
        use crate::sampling::Penalties;
        // Token 0 leads token 1 by 0.5 at every position; one count of it
        // costs 1. Prompt [2]; output so far [3].
        let logits = Logits { vocab: 4, data: [2.0, 1.5, 0.0, 0.0].repeat(3) };
        let greedy = SamplingParams { penalties: Penalties { frequency: 1.0, ..Penalties::default() }, ..SamplingParams::default() };
        let verdict = judge_round(&greedy, &[2, 3], 1, &[0, 0], &[], &logits);
        assert_eq!(verdict, Verdict { accepted: 1, next: 1 }, "the first draft's 0 counts against the second");
        let verdict = judge_round(&SamplingParams::default(), &[2, 3], 1, &[0, 0], &[], &logits);
        assert_eq!(verdict, Verdict { accepted: 2, next: 0 });
        // The output's tokens count, the prompt's do not.
        assert_eq!(judge_round(&greedy, &[0, 3], 1, &[0], &[], &logits).accepted, 1);
        assert_eq!(judge_round(&greedy, &[3, 0], 1, &[0], &[], &logits), Verdict { accepted: 0, next: 1 });
        // A bias comes first: token 1 lifted by 1 leads everywhere.
        let biased = SamplingParams { logit_bias: vec![(1, 1.0)], ..greedy };
        assert_eq!(judge_round(&biased, &[2, 3], 1, &[0], &[], &logits), Verdict { accepted: 0, next: 1 });
        assert_eq!(judge_round(&biased, &[2, 3], 1, &[1, 1], &[], &logits), Verdict { accepted: 1, next: 0 }, "1.5 + 1 − 1 < 2");
    }

    #[test]
    fn stop_tokens_are_banned_until_min_tokens_drafts_included() {
        use crate::sampling::StopTokens;
        // Token 0 (end-of-sequence) leads everywhere; output so far [3].
        let logits = Logits { vocab: 4, data: [2.0, 1.5, 0.0, 0.0].repeat(3) };
        let min = |min_tokens| SamplingParams { stop: StopTokens::resolve(&[0], &[], false, min_tokens), ..SamplingParams::default() };
        // Three output tokens before a stop token (vLLM's count): with the
        // drafted 1 there are two, so 0 may come fourth at the earliest.
        assert_eq!(judge_round(&min(3), &[2, 3], 1, &[1, 0], &[], &logits), Verdict { accepted: 1, next: 1 });
        assert_eq!(judge_round(&min(3), &[2, 3], 1, &[1, 1], &[], &logits), Verdict { accepted: 2, next: 0 });
        assert_eq!(judge_round(&min(2), &[2, 3], 1, &[0], &[], &logits), Verdict { accepted: 0, next: 1 });
        assert_eq!(judge_round(&min(1), &[2, 3], 1, &[0], &[], &logits), Verdict { accepted: 1, next: 0 });
        // Sampled: the banned token has no mass.
        let sampled = SamplingParams { temperature: 1.0, ..min(3) };
        assert_eq!(judge_round(&sampled, &[2, 3], 1, &[0], &[SparseDist::point(0)], &logits).accepted, 0);
        // What ends it: the end-of-sequence tokens unless ignored, and the extra ones.
        assert_eq!(StopTokens::resolve(&[0, 2], &[7, 2], false, 0).unwrap().tokens, [0, 2, 7]);
        assert_eq!(StopTokens::resolve(&[0, 2], &[7], true, 0).unwrap().tokens, [7]);
        assert_eq!(StopTokens::resolve(&[0, 2], &[], false, 0), None);
        assert_eq!(SamplingParams::default().stop_tokens(&[5]), [5]);
        assert!(min(1).adjusts_logits() && !SamplingParams { stop: StopTokens::resolve(&[0], &[3], false, 0), ..SamplingParams::default() }.adjusts_logits());
        assert_eq!(min(1).stop_tokens(&[5]), [0]);
    }

    #[test]
    fn sampled_rejects_tokens_the_target_cannot_produce() {
        let q = [SparseDist::point(3)];
        let p = [SparseDist { tokens: vec![1, 2], probs: vec![0.5, 0.5] }, SparseDist::point(0)];
        let mut rng = SessionRng::new(3);
        for _ in 0..100 {
            let v = verify_sampled(&[3], &q, |i| p[i].clone(), &mut rng);
            assert_eq!(v.accepted, 0);
            assert!(v.next == 1 || v.next == 2);
        }
    }

    #[test]
    fn sampled_always_accepts_when_draft_equals_target() {
        let d = SparseDist { tokens: vec![4, 5], probs: vec![0.25, 0.75] };
        let mut rng = SessionRng::new(9);
        for _ in 0..100 {
            let p = [d.clone(), d.clone(), SparseDist::point(7)];
            let v = verify_sampled(&[5, 4], &[d.clone(), d.clone()], |i| p[i].clone(), &mut rng);
            assert_eq!(v, Verdict { accepted: 2, next: 7 });
        }
    }
}
