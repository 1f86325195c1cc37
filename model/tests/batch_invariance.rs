//! A sequence's logits are bit-identical whether computed alone, beside
//! other sequences, or in passes of different sizes.

mod common;

use candle_core::quantized::GgmlDType;
use common::{default_model, scratch, tiny_llama, TinySpec};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};
use tandem_model::*;

fn tiny() -> Arc<Llama> {
    static MODEL: OnceLock<Arc<Llama>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            // Quantized weights, so the block kernels are exercised.
            let spec = TinySpec { vocab: 50, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, layers: 2, dtype: GgmlDType::Q4_1, head_gain: 1.0 };
            LoadedModel::load(&tiny_llama(&scratch("invariance"), "tiny.gguf", &spec, 5)).unwrap().llama
        })
        .clone()
}

/// Logits of every position of each sequence, each sequence alone in one pass.
fn alone(model: &Llama, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|s| {
            let mut cache = model.new_cache(model.config().n_layers);
            model.forward(&mut [SeqPass { cache: &mut cache, tokens: s, logits: LogitsFor::All }]).unwrap().remove(0).data
        })
        .collect()
}

/// The same logits computed by a schedule of ragged batched passes: in each
/// step every unfinished sequence contributes its next `chunk` tokens.
fn scheduled(model: &Llama, seqs: &[Vec<u32>], chunks: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut caches: Vec<KvCache> = seqs.iter().map(|_| model.new_cache(model.config().n_layers)).collect();
    let mut out = vec![Vec::new(); seqs.len()];
    let mut step = 0;
    loop {
        let mut members = Vec::new();
        for (i, cache) in caches.iter().enumerate() {
            let done = cache.len();
            if done < seqs[i].len() {
                let n = chunks[i][step % chunks[i].len()].min(seqs[i].len() - done);
                members.push((i, done, n));
            }
        }
        if members.is_empty() {
            return out;
        }
        let mut passes: Vec<SeqPass> = Vec::new();
        let mut rest: &mut [KvCache] = &mut caches;
        let mut offset = 0;
        for &(i, done, n) in &members {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - offset);
            let (cache, tail) = tail.split_first_mut().unwrap();
            rest = tail;
            offset = i + 1;
            passes.push(SeqPass { cache, tokens: &seqs[i][done..done + n], logits: LogitsFor::All });
        }
        let logits = model.forward(&mut passes).unwrap();
        for (&(i, _, _), l) in members.iter().zip(logits) {
            out[i].extend(l.data);
        }
        step += 1;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn logits_do_not_depend_on_batch_composition_or_pass_size(
        seqs in prop::collection::vec(prop::collection::vec(0u32..50, 1..24), 1..5),
        chunks in prop::collection::vec(prop::collection::vec(1usize..7, 1..4), 5),
    ) {
        let model = tiny();
        let reference = alone(&model, &seqs);
        let batched = scheduled(&model, &seqs, &chunks);
        prop_assert_eq!(&reference, &batched);
        // One token at a time, each sequence alone.
        let single = scheduled(&model, &seqs[..1], &[vec![1]]);
        prop_assert_eq!(&reference[..1], &single[..]);
    }
}

#[test]
fn default_model_verification_pass_equals_single_steps_and_batching() {
    let model = default_model();
    let tok = &model.tokenizer;
    let seqs: Vec<Vec<u32>> = ["def fib(n):\n    return", "<|im_start|>user\nName three colours.<|im_end|>\n", "The quick brown fox jumps over"]
        .iter()
        .map(|s| tok.encode(s).unwrap())
        .collect();
    let reference = alone(&model.llama, &seqs);
    // Prefill-like chunks, verification-like 5-token passes and decode steps, ragged.
    let batched = scheduled(&model.llama, &seqs, &[vec![3, 5], vec![1], vec![5, 1, 2]]);
    assert!(reference == batched, "batched logits differ from the sequences run alone");
}
