//! KV cache rollback and byte accounting on the default model.

mod common;

use common::default_model;
use tandem_model::*;

#[test]
fn rollback_then_new_tokens_equals_a_fresh_run() {
    let model = default_model();
    let llama = &model.llama;
    let prompt = model.tokenizer.encode("Once upon a time").unwrap();
    let mut cache = llama.new_cache(llama.config().n_layers);
    llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &prompt, logits: LogitsFor::None }]).unwrap();
    let base = cache.len();
    assert_eq!(base, prompt.len());
    assert_eq!(cache.bytes(), base * cache.bytes_per_position());
    // 30 layers × (keys + values) × 3 kv heads × 64 dims × 2 bytes (f16).
    assert_eq!(cache.bytes_per_position(), 30 * 2 * 192 * 2);

    // A rejected draft of 4 tokens, rolled back.
    llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &[11, 22, 33, 44], logits: LogitsFor::All }]).unwrap();
    assert_eq!(cache.len(), base + 4);
    cache.truncate(base);
    assert_eq!(cache.bytes(), base * cache.bytes_per_position());
    let after_rollback = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &[55, 66], logits: LogitsFor::All }]).unwrap();

    let mut fresh = llama.new_cache(llama.config().n_layers);
    let all = [&prompt[..], &[55, 66]].concat();
    let direct = llama.forward(&mut [SeqPass { cache: &mut fresh, tokens: &all, logits: LogitsFor::All }]).unwrap();
    let vocab = llama.config().vocab;
    assert!(after_rollback[0].data == direct[0].data[(all.len() - 2) * vocab..], "rolled-back cache gives different logits");
}

#[test]
fn a_failed_pass_leaves_caches_untouched_and_names_the_problem() {
    let model = default_model();
    let llama = &model.llama;
    let mut a = llama.new_cache(llama.config().n_layers);
    let mut b = llama.new_cache(llama.config().n_layers);
    llama.forward(&mut [SeqPass { cache: &mut a, tokens: &[1, 2, 3], logits: LogitsFor::None }]).unwrap();
    let err = llama
        .forward(&mut [SeqPass { cache: &mut a, tokens: &[4], logits: LogitsFor::Last }, SeqPass { cache: &mut b, tokens: &[70_000], logits: LogitsFor::Last }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("70000") && err.contains("vocabulary"), "{err}");
    assert_eq!((a.len(), b.len()), (3, 0));
    let err = llama.forward(&mut [SeqPass { cache: &mut b, tokens: &[], logits: LogitsFor::Last }]).unwrap_err();
    assert!(err.to_string().contains("tokens"), "{err}");
    // A layer-skip cache cannot join a full-model pass.
    let mut short = llama.new_cache(20);
    let err = llama
        .forward(&mut [SeqPass { cache: &mut a, tokens: &[4], logits: LogitsFor::Last }, SeqPass { cache: &mut short, tokens: &[4], logits: LogitsFor::Last }])
        .unwrap_err();
    assert!(err.to_string().contains("layers"), "{err}");
}
