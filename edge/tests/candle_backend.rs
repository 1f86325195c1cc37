//! The candle-device draft (`--backend metal`, tested here on candle's CPU
//! device) drafts what the CPU backend drafts, across cache reuse and
//! rollback.

use std::path::PathBuf;
use tandem_edge::{build_draft, Backend};
use tandem_model::{fetch, DraftSpec, LoadedModel, SamplingParams, SessionRng};

#[test]
fn candle_device_drafts_match_the_cpu_backend() {
    let path: PathBuf = fetch::ensure_default_model(false).unwrap();
    let model = LoadedModel::load(&path).unwrap();
    let spec = DraftSpec::Layers(12);
    let mut cpu = build_draft(&spec, Backend::Cpu, &model, &path).unwrap();
    let mut candle = build_draft(&spec, Backend::CandleCpu, &model, &path).unwrap();
    let greedy = SamplingParams::default();
    let mut rng = SessionRng::new(0);
    let prompt = model.tokenizer.encode(&model.tokenizer.chat_prompt("Write a haiku about autumn leaves.")).unwrap();
    let mut context = prompt.clone();
    let mut compared = 0;
    // Extend by the drafts, then roll back by two (the cached prefix is
    // reused and truncated), several times.
    for round in 0..4 {
        let a = cpu.propose(&context, 6, &greedy, &mut rng).unwrap();
        let b = candle.propose(&context, 6, &greedy, &mut rng).unwrap();
        assert_eq!(a.tokens, b.tokens, "round {round}: drafts differ");
        // Different kernels (candle's quantize activations differently)
        // move this small model's probabilities by a few hundredths: on
        // this prompt the first 12 layers on Tandem's kernels differ from
        // candle's dequantized f32 forward by up to 0.065 in top-1
        // probability (0.055 with the kernels' previous float order), and
        // entropies differ by up to 15 %.
        for (fa, fb) in a.features.iter().zip(&b.features) {
            assert!((fa.top1 - fb.top1).abs() < 0.1, "round {round}: top-1 {} vs {}", fa.top1, fb.top1);
            assert!((fa.entropy - fb.entropy).abs() < 0.2 * fa.entropy.max(1.0), "round {round}: entropy {} vs {}", fa.entropy, fb.entropy);
        }
        compared += a.tokens.len();
        context.extend_from_slice(&a.tokens[..a.tokens.len() - 2]);
    }
    assert!(compared >= 20, "{compared}");
    // A fresh, shorter context after all that: the cache rolls back fully.
    let a = cpu.propose(&prompt, 4, &greedy, &mut rng).unwrap();
    let b = candle.propose(&prompt, 4, &greedy, &mut rng).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn backends_that_are_not_built_in_say_which_feature_they_need() {
    let path: PathBuf = fetch::ensure_default_model(false).unwrap();
    let model = LoadedModel::load(&path).unwrap();
    if !cfg!(feature = "metal") {
        let err = build_draft(&DraftSpec::Layers(4), Backend::Metal, &model, &path).err().expect("no Metal in this build").to_string();
        assert!(err.contains("--backend metal") && err.contains("--features metal"), "{err}");
    }
    let err = "tpu".parse::<Backend>().unwrap_err().to_string();
    assert!(err.contains("--backend tpu"), "{err}");
}
