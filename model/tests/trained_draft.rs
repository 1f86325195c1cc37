//! The built-in trained draft agrees with the target where it was trained
//! to: given the target's states of the context, its first proposal is the
//! target's greedy token far more often than the untrained drafts'.

use tandem_model::{argmax, fetch, DraftSpec, JsonObjectMode, LoadedModel, LogitsFor, SamplingParams, SeqPass, SessionRng, StopTokens};

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
        let p = draft.propose(&tokens[..c], 0, 1, &SamplingParams::default(), &mut SessionRng::new(0)).unwrap();
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

/// A draft whose file lists a vocabulary computes only those rows of the
/// head: every proposal is a listed token, and wherever the built-in
/// draft's choice is in the shorter list the two propose the same token.
#[test]
fn a_draft_listing_its_tokens_proposes_only_those() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let text = model.tokenizer.chat_prompt("Name three uses of copper.")
        + "Copper carries electricity in wires, moves heat in cooking pots and radiators, and resists corrosion in pipes and roofs.";
    let tokens = model.tokenizer.encode(&text).unwrap();
    // The listed tokens: every second token of the text, so that about
    // half of the built-in draft's choices are outside the list.
    let mut listed: Vec<u32> = tokens.iter().step_by(2).copied().collect();
    listed.sort_unstable();
    listed.dedup();
    let dir = std::env::temp_dir().join(format!("tandem-draft-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let built_in = concat!(env!("CARGO_MANIFEST_DIR"), "/drafts/smollm2-135m-instruct");
    std::fs::copy(format!("{built_in}/card.json"), dir.join("card.json")).unwrap();
    let mut weights = candle_core::safetensors::load(format!("{built_in}/draft.safetensors"), &candle_core::Device::Cpu).unwrap();
    // Within the built-in draft's own list, if it has one, so that the
    // whole head's choice among listed tokens is the smaller head's choice.
    if let Some(own) = weights.get("vocab") {
        let own: Vec<u32> = own.to_vec1().unwrap();
        listed.retain(|t| own.binary_search(t).is_ok());
    }
    weights.insert("vocab".into(), candle_core::Tensor::new(listed.as_slice(), &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&weights, dir.join("draft.safetensors")).unwrap();

    let llama = &model.llama;
    let (n, h) = (llama.config().n_layers, llama.config().hidden);
    let mut cache = llama.new_cache(n);
    let (_, states) = llama.forward_capturing(&mut [SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::None }], &[n]).unwrap();
    let mut whole = DraftSpec::Trained(None).build(&model).unwrap();
    let mut part = DraftSpec::Trained(Some(dir.clone())).build(&model).unwrap();
    let (mut same, mut outside) = (0, 0);
    for c in tokens.len() / 2..tokens.len() {
        let first = |d: &mut Box<dyn tandem_model::DraftSource>| {
            d.observe_target_features(0, &states[0][..(c - 1) * h]);
            d.propose(&tokens[..c], 0, 1, &SamplingParams::default(), &mut SessionRng::new(0)).unwrap().tokens[0]
        };
        let (w, p) = (first(&mut whole), first(&mut part));
        assert!(listed.binary_search(&p).is_ok(), "position {c}: proposed {p}, not listed");
        if listed.binary_search(&w).is_ok() {
            assert_eq!(w, p, "position {c}: the built-in draft's listed choice differs");
            same += 1;
        } else {
            outside += 1;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(same > 0 && outside > 0, "both cases met: {same} listed choices, {outside} outside the list");
}

/// The trained draft keeps its caches from round to round (the rows of
/// accepted drafted tokens among them). Over rounds of greedy speculative
/// decoding it proposes exactly what a fresh draft given the same context
/// and target states proposes.
#[test]
fn a_draft_carried_across_rounds_proposes_what_a_fresh_one_does() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let llama = &model.llama;
    let (n, h) = (llama.config().n_layers, llama.config().hidden);
    let mut context = model.tokenizer.encode(&model.tokenizer.chat_prompt("List the planets of the solar system in order.")).unwrap();
    let greedy = SamplingParams::default();
    let mut carried = DraftSpec::Trained(None).build(&model).unwrap();
    let mut accepted_drafts = 0;
    for round in 0..12 {
        // The target's states of the context but its last token, as a verdict reports them.
        let mut cache = llama.new_cache(n);
        let (_, states) = llama.forward_capturing(&mut [SeqPass { cache: &mut cache, tokens: &context, logits: LogitsFor::None }], &[n]).unwrap();
        let known = &states[0][..(context.len() - 1) * h];
        carried.observe_target_features(0, known);
        let proposal = carried.propose(&context, 0, 5, &greedy, &mut SessionRng::new(0)).unwrap();
        let mut fresh = DraftSpec::Trained(None).build(&model).unwrap();
        fresh.observe_target_features(0, known);
        assert_eq!(proposal.tokens, fresh.propose(&context, 0, 5, &greedy, &mut SessionRng::new(0)).unwrap().tokens, "round {round}");
        // Greedy verification: the drafts the target agrees with, then its own token.
        let mut cache = llama.new_cache(n);
        let all = [context.as_slice(), &proposal.tokens].concat();
        let logits = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &all, logits: LogitsFor::All }]).unwrap();
        let base = context.len() - 1;
        for i in 0..=proposal.tokens.len() {
            let want = argmax(logits[0].row(base + i));
            context.push(want);
            if proposal.tokens.get(i) != Some(&want) {
                break;
            }
            accepted_drafts += 1;
        }
    }
    eprintln!("{accepted_drafts} drafts accepted in 12 rounds");
    assert!(accepted_drafts > 0, "no draft was accepted: the carried rows were never reused");
}

/// Drafts propose under the request's adjustments, as the target's rows
/// are judged: a layer-skip draft over whole rows, the trained draft over
/// its head's tokens. In JSON mode every drafted prefix stays inside the
/// grammar, greedy or sampled (no probability of 0 in what is sent); stop
/// tokens wait for `min_tokens`, then a logit bias brings one at once.
#[test]
fn drafts_propose_under_the_requests_logit_adjustments() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let tokenizer = &model.tokenizer;
    let prompt = tokenizer.encode(&tokenizer.chat_prompt("Describe a cat called Tom, aged 3, in a few words.")).unwrap();
    let json = JsonObjectMode::new(tokenizer.clone());
    let eos = tokenizer.eos_tokens()[0];
    let greedy = SamplingParams { json_object: Some(json.clone()), ..SamplingParams::default() };
    let sampled = SamplingParams { temperature: 0.7, seed: 3, ..greedy.clone() };
    let early_stop = SamplingParams { logit_bias: vec![(eos, 100.0)], stop: StopTokens::resolve(&[eos], &[], false, 3), ..SamplingParams::default() };
    for spec in [DraftSpec::Layers(12), DraftSpec::Trained(None)] {
        let mut draft = spec.build(&model).unwrap();
        for sampling in [&greedy, &sampled] {
            let mut context = prompt.clone();
            for round in 0..8 {
                let p = draft.propose(&context, context.len() - prompt.len(), 5, sampling, &mut SessionRng::new(round)).unwrap();
                assert!(!p.tokens.is_empty(), "{spec}, round {round}: nothing drafted");
                assert!(p.dists.iter().all(|q| q.probs.iter().all(|&x| x > 0.0)), "{spec}: a probability of 0 in {:?}", p.dists);
                context.extend_from_slice(&p.tokens);
                // An end-of-sequence token may only end a complete object.
                let ended = tokenizer.eos_tokens().contains(p.tokens.last().unwrap());
                let body = &context[prompt.len()..context.len() - ended as usize];
                let text = tokenizer.decode(body).unwrap();
                assert!(
                    json.check(body).is_some_and(|complete| !ended || complete),
                    "{spec}, temperature {}: the drafts left JSON: {text:?}",
                    sampling.temperature
                );
                if ended {
                    break;
                }
            }
        }
        let p = draft.propose(&prompt, 0, 5, &early_stop, &mut SessionRng::new(0)).unwrap();
        assert_eq!(p.tokens.len(), 4, "{spec}: {:?}", p.tokens);
        assert!(!p.tokens[..3].contains(&eos) && p.tokens[3] == eos, "{spec}: {:?}", p.tokens);
    }
}

/// Prompt lookup (`+lookup`) copies only what the request's adjustments
/// leave possible: after a complete object in JSON mode the prompt's next
/// token is banned, so the model drafts (end-of-sequence, the one token
/// left); a −100 bias on the copied token does the same.
#[test]
fn prompt_lookup_copies_respect_the_requests_adjustments() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let tokenizer = &model.tokenizer;
    let prompt = tokenizer.encode(r#"{"a": 1} and then some words"#).unwrap();
    let output = tokenizer.encode(r#"{"a": 1}"#).unwrap();
    assert!(prompt.starts_with(&output), "{prompt:?} {output:?}");
    let copy = prompt[output.len()];
    let context = [&prompt[..], &output].concat();
    let json = SamplingParams { json_object: Some(JsonObjectMode::new(tokenizer.clone())), ..SamplingParams::default() };
    let biased = SamplingParams { logit_bias: vec![(copy, -100.0)], ..SamplingParams::default() };
    for spec in ["layers:12+lookup", "trained+lookup"] {
        let mut draft = spec.parse::<DraftSpec>().unwrap().build(&model).unwrap();
        let mut first = |sampling: &SamplingParams| draft.propose(&context, output.len(), 3, sampling, &mut SessionRng::new(0)).unwrap().tokens[0];
        assert_eq!(first(&SamplingParams::default()), copy, "{spec}: the lookup did not copy");
        assert!(tokenizer.eos_tokens().contains(&first(&json)), "{spec}: JSON mode");
        assert_ne!(first(&biased), copy, "{spec}: a -100 bias");
    }
}

/// A sampled draft's token at each position is drawn with the request's
/// seed keyed by that position: drafting 6 at once, or 2 then 4 after
/// them (a round drafted ahead and carried over), proposes the same.
#[test]
fn sampled_drafts_do_not_depend_on_how_rounds_are_cut() {
    let model = LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap();
    let prompt = model.tokenizer.encode(&model.tokenizer.chat_prompt("Write a line about the sea.")).unwrap();
    for spec in [DraftSpec::Layers(12), DraftSpec::Trained(None)] {
        let mut draft = spec.build(&model).unwrap();
        for seed in 0..4 {
            let sampling = SamplingParams { temperature: 1.0, seed, ..SamplingParams::default() };
            let whole = draft.propose(&prompt, 0, 6, &sampling, &mut SessionRng::new(1)).unwrap().tokens;
            let first = draft.propose(&prompt, 0, 2, &sampling, &mut SessionRng::new(2)).unwrap().tokens;
            let context = [&prompt[..], &first].concat();
            let rest = draft.propose(&context, 2, 4, &sampling, &mut SessionRng::new(3)).unwrap().tokens;
            assert_eq!(whole, [first, rest].concat(), "{spec}, seed {seed}");
        }
    }
}
