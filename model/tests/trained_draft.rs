//! The built-in trained draft agrees with the target where it was trained
//! to: given the target's states of the context, its first proposal is the
//! target's greedy token far more often than the untrained drafts'.

use tandem_model::{argmax, fetch, DraftSpec, LoadedModel, LogitsFor, SamplingParams, SeqPass, SessionRng};

fn agreement(model: &LoadedModel, spec: &DraftSpec, text: &str) -> f64 {
    let llama = &model.llama;
    let n = llama.config().n_layers;
    let tokens = model.tokenizer.encode(text).unwrap();
    let mut cache = llama.new_cache(n);
    let (logits, states) = llama.forward_capturing(&mut [SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::All }], &[n]).unwrap();
    let states = &states[0];
    let h = llama.config().hidden;
    let mut draft = spec.build(model).unwrap();
    let (mut agree, mut total) = (0, 0);
    for c in tokens.len() / 2..tokens.len() {
        draft.observe_target_features(0, &states[..(c - 1) * h]);
        let p = draft.propose(&tokens[..c], 1, &SamplingParams::default(), &mut SessionRng::new(0)).unwrap();
        agree += (p.tokens.first() == Some(&argmax(logits[0].row(c - 1)))) as usize;
        total += 1;
    }
    agree as f64 / total as f64
}

#[test]
fn the_trained_draft_agrees_with_the_target_far_more_than_layer_skip() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let text = model.tokenizer.chat_prompt("Describe how a refrigerator keeps food cold.")
        + "A refrigerator keeps food cold by moving heat from the inside to the outside. A refrigerant is compressed, which makes it hot; it then releases that heat through coils at the back, expands through a valve, becomes cold, and absorbs heat from the food compartment.";
    let trained = agreement(&model, &DraftSpec::Trained(None), &text);
    let skip = agreement(&model, &DraftSpec::Layers(12), &text);
    eprintln!("teacher-forced agreement: trained {trained:.2}, layers:12 {skip:.2}");
    assert!(trained > skip + 0.1, "trained {trained:.2} vs layers:12 {skip:.2}");
}

