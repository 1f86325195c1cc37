//! Speculative sampling reproduces the target's distribution exactly.
//!
//! A tiny random target and a different tiny random draft (vocabulary 8):
//! the first two tokens after a fixed prompt are generated many times with
//! draft + verify rounds, and their empirical joint distribution is compared
//! with the exact p(t1)·p(t2 | t1) of the target by a chi-square test. The
//! same harness with a subtly wrong rule (resampling from p instead of the
//! residual max(0, p − q) after a rejection) must fail, so the test has the
//! power to catch a broken rule. With prompt lookup (`+lookup`) the draft
//! mixes copied tokens (point masses) with sampled ones.

mod common;

use candle_core::quantized::GgmlDType;
use common::{scratch, tiny_llama, TinySpec};
use tandem_model::*;

const VOCAB: usize = 8;
const PROMPT: [u32; 3] = [1, 5, 2];
/// Ends with a pair seen before: a lookup draft copies `2, 1, …` first.
const REPEATING_PROMPT: [u32; 5] = [1, 5, 2, 1, 5];
const SAMPLES: usize = 12_000;

fn spec(layers: usize, head_gain: f32) -> TinySpec {
    TinySpec { vocab: VOCAB, hidden: 32, heads: 4, kv_heads: 2, ffn: 64, layers, dtype: GgmlDType::F32, head_gain }
}

/// vLLM's penalties, written out here on their own: repetition over the
/// prompt's and output's tokens, then frequency and presence over the output's.
fn penalized(row: &[f32], prompt: &[u32], output: &[u32], p: &Penalties) -> Vec<f32> {
    let mut row = row.to_vec();
    for (t, l) in row.iter_mut().enumerate() {
        let t = t as u32;
        if prompt.contains(&t) || output.contains(&t) {
            *l = if *l > 0.0 { *l / p.repetition } else { *l * p.repetition };
        }
        let count = output.iter().filter(|&&o| o == t).count();
        if count > 0 {
            *l -= p.frequency * count as f32 + p.presence;
        }
    }
    row
}

/// The target's exact distribution over (t1, t2).
fn exact_joint(target: &Llama, params: &SamplingParams, prompt: &[u32]) -> Vec<f64> {
    let dist = |tokens: &[u32]| {
        let mut cache = target.new_cache(target.config().n_layers);
        let logits = target.forward(&mut [SeqPass { cache: &mut cache, tokens, logits: LogitsFor::Last }]).unwrap();
        params.distribution(&penalized(logits[0].row(0), prompt, &tokens[prompt.len()..], &params.penalties))
    };
    let p1 = dist(prompt);
    let mut joint = vec![0.0; VOCAB * VOCAB];
    for t1 in 0..VOCAB as u32 {
        let pt1 = p1.prob(t1);
        if pt1 == 0.0 {
            continue;
        }
        let p2 = dist(&[prompt, &[t1]].concat());
        for t2 in 0..VOCAB as u32 {
            joint[t1 as usize * VOCAB + t2 as usize] = pt1 * p2.prob(t2);
        }
    }
    joint
}

#[derive(Clone, Copy, PartialEq)]
enum Rule {
    Correct,
    /// `judge_round`, as servers run it (penalties applied there), with a
    /// seed of its own for each sample: its draws are keyed by position.
    JudgeRound,
    /// After a rejection, sample from p instead of normalize(max(0, p − q)).
    ResampleFromTarget,
}

/// Generates the first two tokens after `prompt` with k-token draft rounds.
#[allow(clippy::too_many_arguments)] // a test helper: each knob is one the tests vary
fn speculative_pair(
    prompt: &[u32],
    target: &Llama,
    draft: &mut ModelDraft,
    params: &SamplingParams,
    rule: Rule,
    k: usize,
    rng: &mut SessionRng,
    draft_rng: &mut SessionRng,
) -> (u32, u32) {
    // Each sample is a request with a seed of its own: a model draft keys
    // its draws by the seed and the position.
    let params = &SamplingParams { seed: draft_rng.next_u64(), ..params.clone() };
    let mut cache = target.new_cache(target.config().n_layers);
    let prefix = &prompt[..prompt.len() - 1];
    target.forward(&mut [SeqPass { cache: &mut cache, tokens: prefix, logits: LogitsFor::None }]).unwrap();
    let mut out: Vec<u32> = Vec::new();
    let mut context = prompt.to_vec();
    while out.len() < 2 {
        let proposal = draft.propose(&context, out.len(), k, params, draft_rng).unwrap();
        let mut feed = vec![*context.last().unwrap()];
        feed.extend(&proposal.tokens);
        let base = cache.len();
        let logits = target.forward(&mut [SeqPass { cache: &mut cache, tokens: &feed, logits: LogitsFor::All }]).unwrap();
        let p: Vec<SparseDist> = (0..feed.len()).map(|i| params.distribution(logits[0].row(i))).collect();
        let verdict = match rule {
            Rule::Correct => verify_sampled(&proposal.tokens, &proposal.dists, |i| p[i].clone(), rng),
            Rule::JudgeRound => {
                let params = SamplingParams { seed: rng.next_u64(), ..params.clone() };
                judge_round(&params, &context, out.len(), &proposal.tokens, &proposal.dists, &logits[0])
            }
            Rule::ResampleFromTarget => {
                let mut accepted = proposal.tokens.len();
                for (i, &d) in proposal.tokens.iter().enumerate() {
                    if rng.next_f64() * proposal.dists[i].prob(d) >= p[i].prob(d) {
                        accepted = i;
                        break;
                    }
                }
                Verdict { accepted, next: p[accepted].sample(rng) }
            }
        };
        cache.truncate(base + 1 + verdict.accepted);
        out.extend(&proposal.tokens[..verdict.accepted]);
        out.push(verdict.next);
        context = [prompt, &out[..]].concat();
    }
    (out[0], out[1])
}

/// Pearson chi-square statistic and its 0.1 % critical value
/// (Wilson–Hilferty approximation), over bins with expected count ≥ 5.
fn chi_square(counts: &[usize], expected_p: &[f64], n: usize) -> (f64, f64) {
    let mut stat = 0.0;
    let mut bins = 0usize;
    let (mut other_obs, mut other_exp) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected_p) {
        let e = p * n as f64;
        if e >= 5.0 {
            stat += (c as f64 - e).powi(2) / e;
            bins += 1;
        } else {
            other_obs += c as f64;
            other_exp += e;
        }
    }
    if other_exp > 0.0 {
        stat += (other_obs - other_exp).powi(2) / other_exp.max(1e-9);
        bins += 1;
    }
    let df = (bins - 1) as f64;
    let z = 3.09; // one-sided 0.1 %
    let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, crit)
}

fn run(params: SamplingParams, rule: Rule, lookup: bool) -> (f64, f64) {
    let prompt: &[u32] = if lookup { &REPEATING_PROMPT } else { &PROMPT };
    let dir = scratch("specsample");
    let target = LoadedModel::load(&tiny_llama(&dir, "target.gguf", &spec(2, 3.0), 11)).unwrap().llama;
    // A different random model: its q differs a lot from p, so rejections
    // (and the residual distribution) matter.
    let draft_model = LoadedModel::load(&tiny_llama(&dir, "draft.gguf", &spec(1, 3.0), 29)).unwrap().llama;
    let mut draft = ModelDraft::from_layers(draft_model, 1, vec![]);
    if lookup {
        draft.use_prompt_lookup().unwrap();
    }
    let joint = exact_joint(&target, &params, prompt);
    let mut counts = vec![0usize; VOCAB * VOCAB];
    let mut rng = SessionRng::new(params.seed);
    let mut draft_rng = SessionRng::new(params.seed + 1);
    for i in 0..SAMPLES {
        let k = 1 + i % 3;
        let (a, b) = speculative_pair(prompt, &target, &mut draft, &params, rule, k, &mut rng, &mut draft_rng);
        counts[a as usize * VOCAB + b as usize] += 1;
    }
    let (stat, crit) = chi_square(&counts, &joint, SAMPLES);
    eprintln!("chi-square {stat:.1}, critical value {crit:.1}");
    let _ = std::fs::remove_dir_all(&dir);
    (stat, crit)
}

#[test]
fn speculative_sampling_matches_target_distribution() {
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42, ..Default::default() };
    let (stat, crit) = run(params, Rule::Correct, false);
    assert!(stat < crit, "chi-square {stat:.1} ≥ critical {crit:.1}: speculative output is not the target distribution");
}

#[test]
fn speculative_sampling_matches_truncated_target_distribution() {
    // Truncation on both sides: the draft's q (top-k 64 ⊇ all 8 tokens, top-p)
    // and the target's p (top-k 5, top-p 0.95, min-p 0.05) differ in support.
    let params = SamplingParams { temperature: 0.8, top_k: 5, top_p: 0.95, min_p: 0.05, seed: 7, ..Default::default() };
    let (stat, crit) = run(params, Rule::Correct, false);
    assert!(stat < crit, "chi-square {stat:.1} ≥ critical {crit:.1}");
}

#[test]
fn speculative_sampling_with_penalties_matches_the_penalized_target() {
    // The draft's rows and the target's are penalized alike, by the output
    // before each position, drafts included.
    let penalties = Penalties { frequency: 0.6, presence: 0.4, repetition: 1.8 };
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 5, penalties, ..Default::default() };
    let (stat, crit) = run(params.clone(), Rule::JudgeRound, false);
    assert!(stat < crit, "chi-square {stat:.1} ≥ critical {crit:.1}");
    // The harness tells penalties from none: the unpenalized rule misses.
    let (stat, crit) = run(params, Rule::Correct, false);
    assert!(stat > crit, "penalties changed nothing the harness can see: chi-square {stat:.1} < {crit:.1}");
}

#[test]
fn a_wrong_rule_is_detected() {
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42, ..Default::default() };
    let (stat, crit) = run(params, Rule::ResampleFromTarget, false);
    assert!(stat > crit, "the harness cannot tell a wrong rule apart: chi-square {stat:.1} < {crit:.1}");
}

#[test]
fn speculative_sampling_with_prompt_lookup_matches_target_distribution() {
    // Copied drafts are point masses: accepted with probability p(t).
    let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3, ..Default::default() };
    let (stat, crit) = run(params, Rule::Correct, true);
    assert!(stat < crit, "chi-square {stat:.1} ≥ critical {crit:.1}");
}
