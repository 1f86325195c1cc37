//! Pipelined drafting (draft the next round while this one is verified)
//! and cancellation keep the output exactly the target's own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_edge::controller::{SpeculationController, StopRule};
use tandem_edge::{GenerateRequest, LocalTarget, Speculator};
use tandem_model::{fetch, DraftSpec, LoadedModel, SamplingParams, SyntheticDraft};

fn setup() -> (LoadedModel, GenerateRequest, Vec<u32>) {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let prompt = model.tokenizer.encode(&model.tokenizer.chat_prompt("Write a Python function that reverses a list.")).unwrap();
    let req = GenerateRequest { prompt, max_new_tokens: 40, draft_len: 4, sampling: SamplingParams::default(), logprobs: None };
    let plain = Speculator::new(LocalTarget::new(model.clone()), DraftSpec::None.build(&model).unwrap(), model.tokenizer.clone())
        .generate(&req, |_| {})
        .unwrap()
        .tokens;
    (model, req, plain)
}

/// A draft that proposes the target's own next token with probability
/// `alpha`. An always-right one takes 0.1 ms a token, so that drafting a
/// whole round ahead (0.5 ms) is far quicker than any 5-token pass of the
/// target, however fast the kernels and however loaded the host; the
/// others take 2 ms a token, so that the verdict may cut them short.
fn synthetic(req: &GenerateRequest, reference: &[u32], alpha: f64) -> Box<SyntheticDraft> {
    let full: Vec<u32> = req.prompt.iter().chain(reference).copied().collect();
    let pace = if alpha == 1.0 { Duration::from_micros(100) } else { Duration::from_millis(2) };
    Box::new(SyntheticDraft::new(full, alpha, pace))
}

#[test]
fn drafting_ahead_is_kept_when_right_and_discarded_when_wrong() {
    let (model, req, reference) = setup();
    for alpha in [1.0, 0.6, 0.0] {
        let mut spec = Speculator::new(LocalTarget::new(model.clone()), synthetic(&req, &reference, alpha), model.tokenizer.clone()).with_pipelining(true);
        let g = spec.generate(&req, |_| {}).unwrap();
        assert_eq!(g.tokens, reference, "alpha {alpha}: pipelined output differs from the target's");
        assert!(g.ahead_drafted > 0, "alpha {alpha}: nothing drafted ahead");
        assert!(g.ahead_kept <= g.ahead_drafted);
        match alpha {
            // Every round's drafts and guess are right: the next round's
            // drafts come from drafting ahead.
            1.0 => assert!(g.ahead_kept * 2 >= g.drafted, "alpha 1: kept {} of {} drafts", g.ahead_kept, g.drafted),
            0.0 => {
                assert_eq!(g.ahead_kept, 0, "alpha 0: a wrong round's ahead work was kept");
                assert!(g.wasted_draft_ms > 0.0);
            }
            _ => {}
        }
    }
}

#[test]
fn with_a_controller_drafting_ahead_follows_measured_acceptance() {
    let (model, req, reference) = setup();
    let run = |alpha: f64| {
        let controller = SpeculationController::new(StopRule::Fixed, req.draft_len, false);
        let mut spec = Speculator::new(LocalTarget::new(model.clone()), synthetic(&req, &reference, alpha), model.tokenizer.clone())
            .with_controller(controller)
            .with_pipelining(true);
        let g = spec.generate(&req, |_| {}).unwrap();
        assert_eq!(g.tokens, reference, "alpha {alpha}");
        g
    };
    let right = run(1.0);
    assert!(right.ahead_kept > 0, "an always-right draft should draft ahead: {right:?}");
    let wrong = run(0.0);
    assert_eq!(wrong.ahead_drafted, 0, "an always-wrong draft should not draft ahead");
}

#[test]
fn cancelling_ends_the_generation_with_a_prefix_of_the_output() {
    let (model, req, reference) = setup();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut spec = Speculator::new(LocalTarget::new(model.clone()), synthetic(&req, &reference, 0.5), model.tokenizer.clone()).with_cancel(cancel.clone());
    let mut seen = 0;
    let g = spec
        .generate(&req, |_| {
            seen += 1;
            if seen == 6 {
                cancel.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert!(g.cancelled);
    assert!(g.tokens.len() >= 6 && g.tokens.len() < reference.len(), "{} tokens", g.tokens.len());
    assert_eq!(g.tokens[..], reference[..g.tokens.len()]);
}
