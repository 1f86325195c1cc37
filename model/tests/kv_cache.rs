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

/// A prefix copied from another sequence's cache, then the rest of the
/// prompt, gives the bits the whole prompt gives (the server's prefix
/// cache): also when the prefix ends inside a key block.
#[test]
fn a_copied_prefix_continues_as_the_whole_prompt_would() {
    let model = default_model();
    let llama = &model.llama;
    let shared = model.tokenizer.encode("The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill").unwrap();
    let prompt = [&shared[..], &[1234, 567, 89]].concat();
    let vocab = llama.config().vocab;
    let mut whole = llama.new_cache(llama.config().n_layers);
    let direct = llama.forward(&mut [SeqPass { cache: &mut whole, tokens: &prompt, logits: LogitsFor::All }]).unwrap().remove(0);
    // Another sequence computed the shared part, with other tokens after.
    let mut other = llama.new_cache(llama.config().n_layers);
    llama.forward(&mut [SeqPass { cache: &mut other, tokens: &[&shared[..], &[42, 43]].concat(), logits: LogitsFor::None }]).unwrap();
    for reused in [shared.len(), 16, 5] {
        let mut cache = llama.new_cache(llama.config().n_layers);
        cache.reserve(prompt.len());
        cache.extend_from_prefix(&other, reused);
        assert_eq!(cache.len(), reused);
        let rest = llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &prompt[reused..], logits: LogitsFor::All }]).unwrap().remove(0);
        assert!(rest.data == direct.data[reused * vocab..], "reusing {reused} positions changed the logits");
    }
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
