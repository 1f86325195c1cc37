//! Structural checks of incoming messages. Each failure names the field.

use crate::limits::*;
use crate::pb::{Open, SparseDist, Verify};

/// A message that must not reach the model, with the gRPC code to answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: tonic::Code,
    pub message: String,
}

impl WireError {
    pub fn invalid(message: impl Into<String>) -> Self {
        WireError { code: tonic::Code::InvalidArgument, message: message.into() }
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::new(e.code, e.message)
    }
}

fn check_ids(field: &str, ids: &[u32], vocab: usize) -> Result<(), WireError> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(WireError::invalid(format!("`{field}[{i}]` = {} is outside the vocabulary of {vocab} tokens", ids[i]))),
        None => Ok(()),
    }
}

/// Checks an `Open` against the limits and the model's vocabulary.
pub fn validate_open(open: &Open, vocab: usize) -> Result<(), WireError> {
    if open.prompt.is_empty() {
        return Err(WireError::invalid("`open.prompt` is empty"));
    }
    if open.prompt.len() > MAX_PROMPT_TOKENS {
        return Err(WireError::invalid(format!("`open.prompt` must be ≤ {MAX_PROMPT_TOKENS} tokens, got {}", open.prompt.len())));
    }
    check_ids("open.prompt", &open.prompt, vocab)?;
    let max_new = open.max_new_tokens as usize;
    if max_new == 0 || max_new > MAX_NEW_TOKENS {
        return Err(WireError::invalid(format!("`open.max_new_tokens` must be in 1..={MAX_NEW_TOKENS}, got {max_new}")));
    }
    let resumed = open.resumed as usize;
    if resumed >= open.prompt.len() || resumed > max_new {
        return Err(WireError::invalid(format!(
            "`open.resumed` = {resumed} must be < the prompt's {} tokens and ≤ `max_new_tokens` {max_new}",
            open.prompt.len()
        )));
    }
    if let Some(s) = &open.sampling {
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return Err(WireError::invalid(format!("`open.sampling.temperature` must be ≥ 0, got {}", s.temperature)));
        }
        if !(s.top_p.is_finite() && (0.0..=1.0).contains(&s.top_p)) {
            return Err(WireError::invalid(format!("`open.sampling.top_p` must be in (0, 1], got {}", s.top_p)));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return Err(WireError::invalid(format!("`open.sampling.min_p` must be in [0, 1], got {}", s.min_p)));
        }
        for (name, v) in [("frequency_penalty", s.frequency_penalty), ("presence_penalty", s.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(WireError::invalid(format!("`open.sampling.{name}` must be in [-2, 2], got {v}")));
            }
        }
        if s.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(WireError::invalid(format!("`open.sampling.logit_bias` lists {} tokens; at most {MAX_LOGIT_BIAS}", s.logit_bias.len())));
        }
        for (&t, &b) in &s.logit_bias {
            if t as usize >= vocab || !(-100.0..=100.0).contains(&b) {
                return Err(WireError::invalid(format!("`open.sampling.logit_bias[{t}]` = {b}: ids below {vocab}, biases in [-100, 100]")));
            }
        }
        if s.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(WireError::invalid(format!("`open.sampling.stop_token_ids` lists {} tokens; at most {MAX_STOP_TOKEN_IDS}", s.stop_token_ids.len())));
        }
        check_ids("open.sampling.stop_token_ids", &s.stop_token_ids, vocab)?;
        if s.min_tokens as usize > max_new {
            return Err(WireError::invalid(format!("`open.sampling.min_tokens` = {} exceeds `open.max_new_tokens` {max_new}", s.min_tokens)));
        }
        let json = s.json_object || !s.json_schema.is_empty();
        let constraints = [("json_object", json), ("regex", !s.regex.is_empty()), ("grammar", !s.grammar.is_empty())];
        let mut given = constraints.iter().filter(|c| c.1).map(|c| c.0);
        if let (Some(first), Some(second)) = (given.next(), given.next()) {
            return Err(WireError::invalid(format!("`open.sampling.{second}` is not taken with `{first}`: one constraint on the output")));
        }
        if let Some((constrained, _)) = constraints.iter().find(|c| c.1) {
            if s.ignore_eos && s.stop_token_ids.is_empty() {
                return Err(WireError::invalid(format!(
                    "`open.sampling.{constrained}` needs a token to end the answer: not `ignore_eos` without `stop_token_ids`"
                )));
            }
        }
        for (name, text, most) in
            [("json_schema", &s.json_schema, MAX_JSON_SCHEMA_BYTES), ("regex", &s.regex, MAX_REGEX_BYTES), ("grammar", &s.grammar, MAX_GRAMMAR_BYTES)]
        {
            if text.len() > most {
                return Err(WireError::invalid(format!("`open.sampling.{name}` is {} bytes; at most {most}", text.len())));
            }
        }
        if !(s.repetition_penalty.is_finite() && s.repetition_penalty >= 0.0) {
            return Err(WireError::invalid(format!("`open.sampling.repetition_penalty` must be > 0 (0: none), got {}", s.repetition_penalty)));
        }
    }
    if open.top_logprobs as usize > MAX_TOP_LOGPROBS || (open.top_logprobs > 0 && !open.want_logprobs) {
        return Err(WireError::invalid(format!(
            "`open.top_logprobs` must be in 0..={MAX_TOP_LOGPROBS}, and 0 without `open.want_logprobs`; got {}",
            open.top_logprobs
        )));
    }
    if open.want_prompt_logprobs && (!open.want_logprobs || resumed > 0) {
        return Err(WireError::invalid("`open.want_prompt_logprobs` needs `open.want_logprobs` and a fresh prompt (`open.resumed` = 0)"));
    }
    if crate::pb::DraftMode::try_from(open.draft_mode).is_err() {
        return Err(WireError::invalid(format!("`open.draft_mode` = {} is not a known mode", open.draft_mode)));
    }
    Ok(())
}

/// Checks a `Verify` against the limits, the vocabulary and whether the
/// session samples (then every draft token needs its exact distribution).
pub fn validate_verify(v: &Verify, vocab: usize, sampled: bool) -> Result<(), WireError> {
    if v.draft.len() > MAX_DRAFT_TOKENS {
        return Err(WireError::invalid(format!("`verify.draft` must be ≤ {MAX_DRAFT_TOKENS} tokens, got {}", v.draft.len())));
    }
    check_ids("verify.draft", &v.draft, vocab)?;
    if !sampled {
        if !v.q.is_empty() {
            return Err(WireError::invalid("`verify.q` must be empty for a greedy session"));
        }
        return Ok(());
    }
    if v.q.len() != v.draft.len() {
        return Err(WireError::invalid(format!("`verify.q` must hold one distribution per draft token ({}), got {}", v.draft.len(), v.q.len())));
    }
    for (i, (q, &d)) in v.q.iter().zip(&v.draft).enumerate() {
        check_sparse(&format!("verify.q[{i}]"), q, vocab)?;
        if q.ids.binary_search(&d).is_err() {
            return Err(WireError::invalid(format!("`verify.q[{i}]` gives draft token {d} no probability")));
        }
    }
    Ok(())
}

fn check_sparse(field: &str, q: &SparseDist, vocab: usize) -> Result<(), WireError> {
    if q.ids.is_empty() || q.ids.len() > MAX_SPARSE_SUPPORT {
        return Err(WireError::invalid(format!("`{field}.ids` must hold 1..={MAX_SPARSE_SUPPORT} tokens, got {}", q.ids.len())));
    }
    if q.ids.len() != q.probs.len() {
        return Err(WireError::invalid(format!("`{field}.probs` has {} entries for {} ids", q.probs.len(), q.ids.len())));
    }
    check_ids(&format!("{field}.ids"), &q.ids, vocab)?;
    if let Some(i) = q.ids.windows(2).position(|w| w[0] >= w[1]) {
        return Err(WireError::invalid(format!("`{field}.ids` must be strictly ascending (unsorted or duplicate at {})", i + 1)));
    }
    if let Some(i) = q.probs.iter().position(|&p| !(p > 0.0 && p <= 1.0)) {
        return Err(WireError::invalid(format!("`{field}.probs[{i}]` = {} is not in (0, 1]", q.probs[i])));
    }
    let mass: f32 = q.probs.iter().sum();
    if (mass - 1.0).abs() > MASS_TOLERANCE {
        return Err(WireError::invalid(format!("`{field}.probs` sum to {mass}, not 1")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Sampling;

    fn open() -> Open {
        Open { prompt: vec![1, 2, 3], max_new_tokens: 8, ..Default::default() }
    }

    fn q(ids: Vec<u32>, probs: Vec<f32>) -> SparseDist {
        SparseDist { ids, probs }
    }

    #[test]
    fn every_open_limit_names_its_field() {
        assert_eq!(validate_open(&open(), 100), Ok(()));
        assert_eq!(validate_open(&Open { want_logprobs: true, top_logprobs: MAX_TOP_LOGPROBS as u32, ..open() }, 100), Ok(()));
        let cases: Vec<(Open, &str)> = vec![
            (Open { prompt: vec![], ..open() }, "open.prompt"),
            (Open { prompt: vec![1; MAX_PROMPT_TOKENS + 1], ..open() }, "open.prompt"),
            (Open { prompt: vec![1, 100], ..open() }, "open.prompt[1]"),
            (Open { max_new_tokens: 0, ..open() }, "open.max_new_tokens"),
            (Open { max_new_tokens: MAX_NEW_TOKENS as u32 + 1, ..open() }, "open.max_new_tokens"),
            (Open { resumed: 3, ..open() }, "open.resumed"),
            (Open { sampling: Some(Sampling { temperature: -1.0, ..Default::default() }), ..open() }, "temperature"),
            (Open { sampling: Some(Sampling { top_p: 1.5, ..Default::default() }), ..open() }, "top_p"),
            (Open { sampling: Some(Sampling { min_p: -0.1, ..Default::default() }), ..open() }, "min_p"),
            (Open { sampling: Some(Sampling { stop_token_ids: vec![100], ..Default::default() }), ..open() }, "open.sampling.stop_token_ids[0]"),
            (Open { sampling: Some(Sampling { stop_token_ids: vec![1; 65], ..Default::default() }), ..open() }, "stop_token_ids"),
            (Open { sampling: Some(Sampling { min_tokens: 9, ..Default::default() }), ..open() }, "min_tokens"),
            (Open { sampling: Some(Sampling { json_object: true, ignore_eos: true, ..Default::default() }), ..open() }, "open.sampling.json_object"),
            (Open { sampling: Some(Sampling { json_schema: "{}".into(), ignore_eos: true, ..Default::default() }), ..open() }, "open.sampling.json_object"),
            (
                Open { sampling: Some(Sampling { json_schema: " ".repeat(MAX_JSON_SCHEMA_BYTES + 1), ..Default::default() }), ..open() },
                "open.sampling.json_schema",
            ),
            (Open { sampling: Some(Sampling { regex: "a".repeat(MAX_REGEX_BYTES + 1), ..Default::default() }), ..open() }, "open.sampling.regex"),
            (Open { sampling: Some(Sampling { regex: "a".into(), json_object: true, ..Default::default() }), ..open() }, "open.sampling.regex"),
            (Open { sampling: Some(Sampling { regex: "a".into(), ignore_eos: true, ..Default::default() }), ..open() }, "open.sampling.regex"),
            (Open { sampling: Some(Sampling { grammar: "a".repeat(MAX_GRAMMAR_BYTES + 1), ..Default::default() }), ..open() }, "open.sampling.grammar"),
            (Open { sampling: Some(Sampling { grammar: "a".into(), regex: "a".into(), ..Default::default() }), ..open() }, "open.sampling.grammar"),
            (Open { sampling: Some(Sampling { grammar: "a".into(), ignore_eos: true, ..Default::default() }), ..open() }, "open.sampling.grammar"),
            (Open { sampling: Some(Sampling { presence_penalty: 2.5, ..Default::default() }), ..open() }, "open.sampling.presence_penalty"),
            (Open { sampling: Some(Sampling { frequency_penalty: f32::NAN, ..Default::default() }), ..open() }, "open.sampling.frequency_penalty"),
            (Open { sampling: Some(Sampling { repetition_penalty: -1.0, ..Default::default() }), ..open() }, "open.sampling.repetition_penalty"),
            (Open { sampling: Some(Sampling { logit_bias: [(100, 1.0)].into(), ..Default::default() }), ..open() }, "open.sampling.logit_bias[100]"),
            (Open { sampling: Some(Sampling { logit_bias: [(5, -101.0)].into(), ..Default::default() }), ..open() }, "open.sampling.logit_bias[5]"),
            (
                Open { sampling: Some(Sampling { logit_bias: (0..MAX_LOGIT_BIAS as u32 + 1).map(|t| (t, 0.0)).collect(), ..Default::default() }), ..open() },
                "open.sampling.logit_bias",
            ),
            (Open { draft_mode: 7, ..open() }, "open.draft_mode"),
            (Open { want_logprobs: true, top_logprobs: MAX_TOP_LOGPROBS as u32 + 1, ..open() }, "open.top_logprobs"),
            (Open { top_logprobs: 2, ..open() }, "open.top_logprobs"),
            (Open { want_prompt_logprobs: true, ..open() }, "open.want_prompt_logprobs"),
            (Open { want_logprobs: true, want_prompt_logprobs: true, resumed: 1, ..open() }, "open.want_prompt_logprobs"),
        ];
        for (o, field) in cases {
            let err = validate_open(&o, 100).unwrap_err();
            assert_eq!(err.code, tonic::Code::InvalidArgument);
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
    }

    #[test]
    fn every_verify_limit_names_its_field() {
        let ok = Verify { draft: vec![5, 6], q: vec![q(vec![5, 9], vec![0.5, 0.5]), q(vec![6], vec![1.0])], ..Default::default() };
        assert_eq!(validate_verify(&ok, 100, true), Ok(()));
        assert_eq!(validate_verify(&Verify { q: vec![], ..ok.clone() }, 100, false), Ok(()));
        let cases: Vec<(Verify, bool, &str)> = vec![
            (Verify { draft: vec![1; MAX_DRAFT_TOKENS + 1], q: vec![], ..ok.clone() }, false, "verify.draft"),
            (Verify { draft: vec![5, 100], ..ok.clone() }, false, "verify.draft[1]"),
            (ok.clone(), false, "verify.q"),
            (Verify { q: vec![], ..ok.clone() }, true, "verify.q"),
            (Verify { q: vec![q(vec![9, 5], vec![0.5, 0.5]), ok.q[1].clone()], ..ok.clone() }, true, "ascending"),
            (Verify { q: vec![q(vec![5, 5], vec![0.5, 0.5]), ok.q[1].clone()], ..ok.clone() }, true, "ascending"),
            (Verify { q: vec![q(vec![5, 9], vec![1.5, -0.5]), ok.q[1].clone()], ..ok.clone() }, true, "verify.q[0].probs[0]"),
            (Verify { q: vec![q(vec![5, 9], vec![0.5, 0.2]), ok.q[1].clone()], ..ok.clone() }, true, "sum"),
            (Verify { q: vec![q(vec![7, 9], vec![0.5, 0.5]), ok.q[1].clone()], ..ok.clone() }, true, "no probability"),
            (Verify { q: vec![q(vec![5, 200], vec![0.5, 0.5]), ok.q[1].clone()], ..ok.clone() }, true, "verify.q[0].ids[1]"),
            (Verify { q: vec![q(vec![], vec![]), ok.q[1].clone()], ..ok.clone() }, true, "verify.q[0].ids"),
            (Verify { q: vec![q(vec![5], vec![0.5, 0.5]), ok.q[1].clone()], ..ok.clone() }, true, "verify.q[0].probs"),
        ];
        for (v, sampled, field) in cases {
            let err = validate_verify(&v, 100, sampled).unwrap_err();
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
    }
}
