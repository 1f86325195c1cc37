//! The verification service end to end: a real server process on loopback,
//! the real model, the real client library.

//! Faults, overload and hostile input are in the reliability suite
//! (`tests/`, crate `tandem-tests`).

use std::sync::Arc;
use std::time::Duration;
use tandem_edge::client::RemoteTarget;
use tandem_edge::controller::{SpeculationController, StopRule};
use tandem_edge::{Decoded, EdgeError, Emitted, GenerateRequest, Generation, LogprobInbox, LogprobsWanted, RoundOutcome, Speculator, Target, TargetFeatures};
use tandem_model::{
    DraftSpec, JsonObjectMode, JsonSchema, LogitsFor, OutputGrammar, OutputRegex, Penalties, SamplingParams, SeqPass, StopTokens, SyntheticDraft, TokenLogprob,
};
use tandem_protocol::wire::{EdgeMessage, Open, Sampling, ServerKind, ServerMessage, SparseDist, Tokens, VerifierClient};
use tandem_tests::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const TENANTS: &str = r#"
[[tenant]]
name = "alpha"
api_key = "alpha-key-123"
max_sessions = 4

[[tenant]]
name = "beta"
api_key = "beta-key-456"
weight = 2.0
max_sessions = 1
"#;

#[test]
fn drafting_server_only_and_local_outputs_are_identical() {
    lossless_under_policy("wisp", &["Write a Python function that reverses a string.", "Name three planets."]);
}

#[test]
fn the_fcfs_policy_is_lossless_too() {
    lossless_under_policy("fcfs", &["Name three planets."]);
}

fn lossless_under_policy(policy: &str, prompts: &[&str]) {
    let server = ServerProcess::start(&["--policy", policy]);
    for &prompt in prompts {
        let req = request(prompt, 24);
        let reference = local(&req);
        for draft in [DraftSpec::None, DraftSpec::Layers(25), DraftSpec::Ngram, DraftSpec::Trained(None)] {
            let g = remote(&server.url(), None, &draft, &req).unwrap();
            assert_eq!(g.tokens, reference, "{prompt:?} drafting with {draft}");
            assert_eq!(g.server_ms.len(), g.rounds, "one server time per round");
        }
        assert_eq!(remote_server_only(&server.url(), &req), reference, "{prompt:?} server-only");
    }
}

/// Each token's log-probability comes from the row the target computed
/// for its position, so drafting (greedy and sampled), a hand-off,
/// server-only decoding and a prompt prefilled in chunks report the bits
/// plain decoding does, and those of one forward pass over the whole text.
#[test]
fn log_probabilities_are_those_of_plain_decoding() {
    let config = write_file("chunks.toml", "[batcher]\nprefill_chunk = 8\n");
    let server = ServerProcess::start(&["--config", config.to_str().unwrap()]);
    let m = model();
    let top5 = LogprobsWanted { top: 5, prompt: true };
    let req = GenerateRequest { logprobs: Some(top5), ..request("Name three planets.", 24) };
    // Every position's after the first, from one pass over the whole text.
    let one_pass = |prompt: &[u32], tokens: &[u32], top: usize| -> Vec<TokenLogprob> {
        let text = [prompt, tokens].concat();
        let mut cache = m.llama.new_cache(m.llama.config().n_layers);
        let rows = m.llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &text[..text.len() - 1], logits: LogitsFor::All }]).unwrap().remove(0);
        text[1..].iter().enumerate().map(|(i, &t)| TokenLogprob::from_logits(rows.row(i), t, top)).collect()
    };
    let plain = local_with(&DraftSpec::None, &req);
    let p = req.prompt.len();
    assert_eq!([&plain.prompt_logprobs[..], &plain.logprobs[..]].concat(), one_pass(&req.prompt, &plain.tokens, 5));
    assert_eq!((plain.prompt_logprobs.len(), plain.logprobs.len()), (p - 1, plain.tokens.len()));
    assert!(plain.logprobs.iter().zip(&plain.tokens).all(|(lp, &t)| lp.top[0].token == t), "greedy decoding takes the most likely token");
    for draft in [DraftSpec::Layers(25), DraftSpec::Ngram] {
        let g = remote(&server.url(), None, &draft, &req).unwrap();
        assert_eq!((&g.tokens, &g.logprobs), (&plain.tokens, &plain.logprobs), "drafting with {draft}");
        assert_eq!(g.prompt_logprobs, plain.prompt_logprobs, "the prompt, prefilled 8 positions a pass");
    }
    let req = GenerateRequest { logprobs: Some(LogprobsWanted { prompt: false, ..top5 }), ..req };
    let sampling = SamplingParams { temperature: 0.8, top_p: 0.9, seed: 11, ..SamplingParams::default() };
    let sampled = GenerateRequest { sampling, logprobs: Some(LogprobsWanted { top: 2, prompt: false }), ..req.clone() };
    // Sampled speculation draws other tokens than sampled decoding (the
    // same distribution, other draws): their log-probabilities are still
    // those the target gives them.
    let g = remote(&server.url(), None, &DraftSpec::Layers(25), &sampled).unwrap();
    assert_eq!(g.logprobs, one_pass(&req.prompt, &g.tokens, 2)[p - 1..], "sampled with drafts");
    assert!(g.accepted > 0, "some drafts were judged and accepted");

    let mut target = client(&server.url(), None);
    target.want_logprobs(req.logprobs);
    let mut decoded = vec![];
    target.generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, |e| decoded.extend(e.logprob.cloned()), m.tokenizer.eos_tokens()).unwrap();
    assert_eq!(decoded, plain.logprobs, "server-only");
    // A session the server decodes after a hand-off (its hints always
    // suggest so): the tokens it decodes carry theirs too.
    let controller = SpeculationController::new(StopRule::Fixed, 4, true).with_tpot_objective(Some(1000.0));
    let spec = Speculator::new(PrefersDecoding(client(&server.url(), None)), DraftSpec::Layers(25).build(&m).unwrap(), m.tokenizer.clone());
    let g = spec.with_controller(controller).generate(&req, |_| {}).unwrap();
    assert!(g.server_decoded > 0, "handed off after {:?} tokens", g.handed_off_after);
    assert_eq!((&g.tokens, &g.logprobs), (&plain.tokens, &plain.logprobs), "handed off");
}

/// Penalties and a logit bias change what the target picks; drafting,
/// which proposes under them too, gives plain decoding's output, over
/// gRPC as here (`model/tests/speculative_sampling.rs` checks the sampled
/// rule).
#[test]
fn penalized_output_is_plain_decodings() {
    let server = ServerProcess::start(&[]);
    let unpenalized = request("List ten fruits, one per line.", 40);
    let usual = local(&unpenalized);
    let penalties = Penalties { frequency: 0.5, presence: 0.3, repetition: 1.3 };
    // The usual first token banned.
    let sampling = SamplingParams { penalties, logit_bias: vec![(usual[0], -100.0)], ..SamplingParams::default() };
    let req = GenerateRequest { sampling, ..unpenalized.clone() };
    let plain = local(&req);
    assert_ne!(plain[0], usual[0], "the bias bans the usual first token");
    let only_penalties = GenerateRequest { sampling: SamplingParams { penalties, ..SamplingParams::default() }, ..unpenalized };
    assert_ne!(local(&only_penalties), usual, "the penalties change the answer");
    for draft in [DraftSpec::Layers(25), DraftSpec::Ngram] {
        assert_eq!(remote(&server.url(), None, &draft, &req).unwrap().tokens, plain, "drafting with {draft}");
    }
    assert_eq!(remote_server_only(&server.url(), &req), plain, "server-only");
    // At temperature 0.05 most of a draft's top 64 weigh 0 after the
    // exponential; they stay out of what is sent, since the server refuses
    // a probability of 0 (it did: `verify.q[0].probs[0]` = 0).
    let cold = GenerateRequest { sampling: SamplingParams { temperature: 0.05, seed: 4, ..SamplingParams::default() }, ..req.clone() };
    let g = remote(&server.url(), None, &DraftSpec::Layers(25), &cold).unwrap();
    assert!(g.accepted > 0, "cold drafts are accepted");
    // Min-p 1 keeps only the most likely token: sampling at temperature 1
    // with it is greedy decoding, on both sides of the wire.
    let min_p_1 = SamplingParams { temperature: 1.0, min_p: 1.0, seed: 9, ..req.sampling.clone() };
    let g = remote(&server.url(), None, &DraftSpec::Layers(25), &GenerateRequest { sampling: min_p_1, ..req }).unwrap();
    assert_eq!(g.tokens, plain, "sampled with min_p 1");
    assert!(g.accepted > 0, "drafts sampled with min_p 1 are accepted");
}

/// vLLM's `stop_token_ids`, `ignore_eos` and `min_tokens` end the answer
/// where plain decoding does, drafting over gRPC or not.
#[test]
fn stop_tokens_end_the_answer_where_plain_decoding_does() {
    let server = ServerProcess::start(&[]);
    let m = model();
    let eos = m.tokenizer.eos_tokens();
    let base = request("What is the capital of France? Answer in one sentence.", 32);
    let usual = local_with(&DraftSpec::None, &base);
    assert!(usual.stopped_on_eos && usual.tokens.len() < 24, "{usual:?}");
    let with = |stop: Option<StopTokens>| GenerateRequest { sampling: SamplingParams { stop, ..base.sampling.clone() }, ..base.clone() };
    // A token the answer holds first at position i ends it there, unshown.
    let i = (2..usual.tokens.len() - 1).find(|&i| !usual.tokens[..i].contains(&usual.tokens[i])).unwrap();
    let stop_at = with(StopTokens::resolve(eos, &[usual.tokens[i]], false, 0));
    let g = local_with(&DraftSpec::None, &stop_at);
    assert_eq!((&g.tokens[..], g.stopped_on_eos), (&usual.tokens[..=i], true));
    assert_eq!(g.text, m.tokenizer.decode(&usual.tokens[..i]).unwrap());
    // Longer: the end-of-sequence token banned for a while, or ignored.
    let min_tokens = with(StopTokens::resolve(eos, &[], false, usual.tokens.len() + 2));
    let longer = local(&min_tokens);
    assert!(longer.len() > usual.tokens.len() + 2, "{} tokens", longer.len());
    assert_eq!(longer[..usual.tokens.len() - 1], usual.tokens[..usual.tokens.len() - 1], "the same up to the banned end");
    let ignore_eos = with(StopTokens::resolve(eos, &[], true, 0));
    assert_eq!(local(&ignore_eos).len(), 32, "only max_new_tokens ends it");
    for req in [stop_at, min_tokens, ignore_eos] {
        let plain = local_with(&DraftSpec::None, &req);
        for draft in [DraftSpec::Layers(25), DraftSpec::Ngram] {
            let g = remote(&server.url(), None, &draft, &req).unwrap();
            assert_eq!((&g.tokens, &g.text), (&plain.tokens, &plain.text), "drafting with {draft}, {:?}", req.sampling.stop);
        }
        assert_eq!(remote_server_only(&server.url(), &req), plain.tokens, "server-only, {:?}", req.sampling.stop);
    }
}

/// JSON mode: the answer is one JSON object, closed before it ends, and
/// drafting over gRPC (which proposes without the mask) gives plain
/// decoding's answer; sampled answers are JSON objects too.
#[test]
fn json_mode_answers_are_json_objects_as_plain_decoding_gives_them() {
    let server = ServerProcess::start(&[]);
    let m = model();
    let json = SamplingParams { json_object: Some(JsonObjectMode::new(m.tokenizer.clone())), ..SamplingParams::default() };
    let req = GenerateRequest { sampling: json, ..request("Describe a cat as JSON with the keys name, age and colour.", 96) };
    let object = |g: &Generation| {
        assert!(g.stopped_on_eos, "the object was not closed in {} tokens: {:?}", g.tokens.len(), g.text);
        let v = serde_json::from_str::<serde_json::Value>(&g.text).unwrap_or_else(|e| panic!("{e}: {:?}", g.text));
        assert!(v.is_object(), "{:?}", g.text);
    };
    let plain = as_plain_decoding_gives_it(&server, &req, &[DraftSpec::Layers(25), DraftSpec::Ngram], 0.7, object);
    assert_ne!(plain.tokens, local(&request("Describe a cat as JSON with the keys name, age and colour.", 96)), "the mask changed the answer");
}

/// A constrained request's answer, plain decoding's, which `check`
/// passes: drafting over gRPC with each of `drafts` and server-only
/// decoding give the same, and sampled answers (seeds 1 to 3 at
/// `temperature`, drafting with the first) pass `check` too.
fn as_plain_decoding_gives_it(
    server: &ServerProcess,
    req: &GenerateRequest,
    drafts: &[DraftSpec],
    temperature: f32,
    check: impl Fn(&Generation),
) -> Generation {
    let plain = local_with(&DraftSpec::None, req);
    check(&plain);
    for draft in drafts {
        let g = remote(&server.url(), None, draft, req).unwrap();
        assert_eq!((&g.tokens, &g.text), (&plain.tokens, &plain.text), "drafting with {draft}");
    }
    assert_eq!(remote_server_only(&server.url(), req), plain.tokens, "server-only");
    for seed in 1..=3 {
        let sampled = GenerateRequest { sampling: SamplingParams { temperature, seed, ..req.sampling.clone() }, ..req.clone() };
        check(&remote(&server.url(), None, &drafts[0], &sampled).unwrap());
    }
    plain
}

fn with_schema(open: Open, schema: &str) -> Open {
    let sampling = open.sampling.clone().map(|s| Sampling { json_schema: schema.into(), ..s });
    Open { sampling, ..open }
}

/// Structured outputs: with a JSON Schema (bounds, a pattern, a format
/// and a length among its constraints) the answer satisfies it. The
/// schema travels as text and the server compiles it again; drafting over
/// gRPC, the trained draft's head included, and server-only decoding give
/// plain decoding's answer, and sampled answers satisfy it too.
#[test]
fn json_schema_answers_satisfy_the_schema_as_plain_decoding_gives_them() {
    let server = ServerProcess::start(&[]);
    let m = model();
    let schema = r#"{"type":"object","additionalProperties":false,"required":["name","age","colour","born","chip"],
        "properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0,"maximum":30},"colour":{"enum":["black","white","ginger"]},"indoor":{"type":"boolean"},
        "born":{"type":"string","format":"date"},"chip":{"type":"string","pattern":"^[A-Z]{2}[0-9]{4}$"},"motto":{"type":"string","maxLength":20}}}"#;
    let mode = JsonObjectMode::new(m.tokenizer.clone()).with_schema(Some(Arc::new(JsonSchema::parse(schema).unwrap())));
    let req = GenerateRequest {
        sampling: SamplingParams { json_object: Some(mode), ..SamplingParams::default() },
        ..request("Describe a cat called Tom as JSON.", 160)
    };
    let satisfies = |g: &Generation| {
        assert!(g.stopped_on_eos, "the object was not closed in {} tokens: {:?}", g.tokens.len(), g.text);
        let v: serde_json::Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {:?}", g.text));
        let o = v.as_object().unwrap();
        assert!(o.keys().all(|k| ["name", "age", "colour", "indoor", "born", "chip", "motto"].contains(&k.as_str())) && o.len() >= 5, "{:?}", g.text);
        assert!(o["name"].is_string() && o["age"].as_u64().is_some_and(|a| a <= 30), "{:?}", g.text);
        assert!(["black", "white", "ginger"].iter().any(|c| o["colour"] == *c) && o.get("indoor").is_none_or(|b| b.is_boolean()), "{:?}", g.text);
        let text = |k: &str| o[k].as_str().unwrap_or_else(|| panic!("{k} in {:?}", g.text)).as_bytes();
        let (born, chip) = (text("born"), text("chip"));
        let digits = |b: &[u8]| b.iter().all(u8::is_ascii_digit);
        assert!(born.len() == 10 && digits(&born[..4]) && born[4] == b'-' && digits(&born[5..7]) && born[7] == b'-' && digits(&born[8..]), "{:?}", g.text);
        assert!(chip.len() == 6 && chip[..2].iter().all(u8::is_ascii_uppercase) && digits(&chip[2..]), "{:?}", g.text);
        assert!(o.get("motto").is_none_or(|m| m.as_str().is_some_and(|m| m.chars().count() <= 20)), "{:?}", g.text);
    };
    as_plain_decoding_gives_it(&server, &req, &[DraftSpec::Layers(25), DraftSpec::Trained(None)], 0.8, satisfies);
}

/// vLLM's `guided_regex` and `guided_grammar`: the whole answer matches
/// the regex, or follows the GBNF grammar. Each travels as text and the
/// server compiles it again; drafting over gRPC and server-only decoding
/// give plain decoding's answer, and sampled answers match too.
#[test]
fn regex_and_grammar_answers_match_as_plain_decoding_gives_them() {
    let server = ServerProcess::start(&[]);
    let m = model();
    let tables = JsonObjectMode::new(m.tokenizer.clone());
    let grammar = r#"root ::= answer ", because " reason "."
answer ::= "Yes" | "No"
reason ::= word (" " word){2,12}   # a few words
word ::= [a-z]{1,12}"#;
    for mode in [
        tables.with_regex(Arc::new(OutputRegex::new(r"(Yes|No), because [a-z ,]{10,60}\.").unwrap())),
        tables.with_grammar(Arc::new(OutputGrammar::new(grammar).unwrap())),
    ] {
        let req = GenerateRequest {
            sampling: SamplingParams { json_object: Some(mode.clone()), ..SamplingParams::default() },
            ..request("Is the sky blue? Answer yes or no, and say why.", 48)
        };
        let matches = |g: &Generation| {
            assert!(g.stopped_on_eos, "no end in {} tokens: {:?}", g.tokens.len(), g.text);
            assert_eq!(mode.check(&g.tokens[..g.tokens.len() - 1]), Some(true), "{:?}", g.text);
            assert!((g.text.starts_with("Yes, because ") || g.text.starts_with("No, because ")) && g.text.ends_with('.'), "{:?}", g.text);
        };
        as_plain_decoding_gives_it(&server, &req, &[DraftSpec::Layers(25), DraftSpec::Ngram], 0.8, matches);
    }
}

/// The trained (EAGLE-style) draft reads the target's hidden states: over
/// gRPC they come with every verdict, as half floats, and the draft makes
/// the same proposals as beside a local target (whose states it also sees
/// through half floats), so acceptance is identical, not just the output.
#[test]
fn a_trained_draft_gets_the_targets_states_over_the_wire() {
    let server = ServerProcess::start(&[]);
    for prompt in ["Write a Python function that reverses a string.", "Explain why the sky is blue."] {
        let req = request(prompt, 48);
        let draft = DraftSpec::Trained(None);
        let here = local_with(&draft, &req);
        let there = remote(&server.url(), None, &draft, &req).unwrap();
        assert_eq!(there.tokens, here.tokens, "{prompt:?}");
        assert_eq!((there.rounds, there.accepted), (here.rounds, here.accepted), "{prompt:?}: the drafts differ");
        assert!(there.accepted > 0, "{prompt:?}: nothing accepted");
    }
}

#[test]
fn concurrent_sessions_of_two_tenants_are_each_lossless() {
    let tenants = write_file("tenants.toml", TENANTS);
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let server = ServerProcess::start(&["--tenants", tenants.to_str().unwrap(), "--metrics-listen", &metrics_addr]);
    let prompts = ["Name a fruit.", "What is 2 + 2?", "Write a haiku about rain."];
    let jobs: Vec<(&str, &str)> = vec![("alpha-key-123", prompts[0]), ("alpha-key-123", prompts[1]), ("beta-key-456", prompts[2])];
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(key, prompt)| {
            let url = server.url();
            std::thread::spawn(move || {
                let req = request(prompt, 20);
                let g = remote(&url, Some(key), &DraftSpec::Layers(25), &req).unwrap();
                (req, g.tokens)
            })
        })
        .collect();
    for h in handles {
        let (req, tokens) = h.join().unwrap();
        assert_eq!(tokens, local(&req), "a concurrent session's output differs from plain decoding");
    }
    let metrics = parse_metrics(&scrape(&metrics_addr));
    let get = |name: &str| metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    assert_eq!(get("tandem_sessions_opened_total{tenant=\"alpha\"}"), Some(2.0));
    assert_eq!(get("tandem_sessions_opened_total{tenant=\"beta\"}"), Some(1.0));
    assert!(get("tandem_spec_decode_num_draft_tokens_total{tenant=\"alpha\"}").unwrap() > 0.0);
    assert!(get("tandem_pass_seconds_count").unwrap() > 0.0);
    assert_eq!(get("tandem_sessions"), Some(0.0));
    assert_eq!(get("tandem_kv_bytes_reserved"), Some(0.0), "finished sessions must return their KV reservation");
    // Every round had a deadline (the client sends TTFT and TPOT objectives).
    let rounds = get("tandem_slo_met_total{tenant=\"alpha\"}").unwrap() + get("tandem_slo_missed_total{tenant=\"alpha\"}").unwrap();
    assert!(rounds > 2.0, "SLO attainment is not counted");
    assert!(get("tandem_tenant_service_counter{tenant=\"beta\"}").unwrap() > 0.0, "fair-share counters are not exported");
    let counters = ["alpha", "beta"].map(|t| get(&format!("tandem_tenant_service_counter{{tenant=\"{t}\"}}")).unwrap());
    let gap = get("tandem_tenant_service_gap_max").expect("the service gap is not exported");
    assert!((0.0..=counters[0] + counters[1]).contains(&gap), "service gap {gap} outside 0..={counters:?}'s sum");
    assert!(get("tandem_estimator_relative_error").is_some());
    let _ = std::fs::remove_file(tenants);
}

/// Prompts that start alike: a later session of the same tenant copies
/// the positions an earlier one computed (the prefix cache), including a
/// finished session's answer (the next turn of a chat), and gives plain
/// decoding's output; another tenant's session computes its own.
#[test]
fn a_shared_prompt_start_is_computed_once_per_tenant() {
    let tenants = write_file("tenants-prefix.toml", TENANTS);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(&["--tenants", tenants.to_str().unwrap(), "--metrics-listen", &metrics_addr]);
    let document = "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, \
                    and watched the fishing boats come home across the grey water of the bay.";
    let first = request(&format!("{document}\n\nSummarise the text above in one sentence."), 12);
    let second = request(&format!("{document}\n\nWho climbs the stairs?"), 12);
    let shared = first.prompt.iter().zip(&second.prompt).take_while(|(a, b)| a == b).count();
    assert!(shared >= 30, "the prompts share only {shared} tokens");
    let run = |key: &str, req: &tandem_edge::GenerateRequest| {
        let g = remote(&server.url(), Some(key), &DraftSpec::Ngram, req).unwrap();
        assert_eq!(g.tokens, local(req), "{key}: the output differs from plain decoding");
        g.tokens
    };
    let answer = run("alpha-key-123", &first);
    run("alpha-key-123", &second);
    run("beta-key-456", &second);
    // The next turn: the first prompt, its answer, and more.
    let next = tandem_edge::GenerateRequest { prompt: [&first.prompt[..], &answer, &[198, 198]].concat(), ..first.clone() };
    run("alpha-key-123", &next);
    let metrics = parse_metrics(&scrape(&metrics_addr));
    let get = |name: &str, tenant: &str| metric(&metrics, &format!("{name}{{tenant=\"{tenant}\"}}")).unwrap();
    let asked = (first.prompt.len() + second.prompt.len() + next.prompt.len()) as f64;
    // The first answer's last token never entered its cache.
    let hits = shared + first.prompt.len() + answer.len() - 1;
    assert_eq!(get("tandem_prefix_cache_queries_total", "alpha"), asked);
    assert_eq!(get("tandem_prefix_cache_hits_total", "alpha"), hits as f64);
    assert_eq!(get("tandem_prefill_tokens_total", "alpha"), asked - hits as f64);
    assert_eq!(get("tandem_prefix_cache_hits_total", "beta"), 0.0);
    assert_eq!(get("tandem_prefill_tokens_total", "beta"), second.prompt.len() as f64);
    assert!(metric(&metrics, "tandem_prefix_cache_bytes").unwrap() > 0.0);
    let _ = std::fs::remove_file(tenants);
}

#[test]
fn bad_inputs_get_statuses_naming_the_field_and_the_server_keeps_serving() {
    let server = ServerProcess::start(&[]);
    let url = server.url();
    let prompt = vec![1u32, 9690, 198, 19556, 2, 198];
    let n = prompt.len();
    let nothing = |_: &ServerMessage| vec![];
    let still_serves = || {
        let (got, status) = raw(&url, None, open_msg(prompt.clone(), 3, 0.0), |_| vec![verify(n + 1, vec![], vec![])]);
        assert!(status.is_ok(), "a valid session failed after bad input: {status:?}");
        assert!(matches!(got.last().and_then(|m| m.kind.clone()), Some(ServerKind::Verdict(_))));
    };
    let open_cases: Vec<(Open, Code, &str)> = vec![
        (open_msg(vec![1, 70_000], 4, 0.0), Code::InvalidArgument, "open.prompt[1]"),
        (open_msg(vec![1; 5000], 4, 0.0), Code::InvalidArgument, "open.prompt"),
        (open_msg(vec![], 4, 0.0), Code::InvalidArgument, "open.prompt"),
        (open_msg(prompt.clone(), 0, 0.0), Code::InvalidArgument, "open.max_new_tokens"),
        (open_msg(prompt.clone(), 4, -1.0), Code::InvalidArgument, "temperature"),
        (
            with_schema(open_msg(prompt.clone(), 4, 0.0), r#"{"type":"object","properties":{"a":{"type":"string","format":"uri"}}}"#),
            Code::InvalidArgument,
            "open.sampling.json_schema",
        ),
        (with_schema(open_msg(prompt.clone(), 4, 0.0), "{"), Code::InvalidArgument, "open.sampling.json_schema"),
        (
            {
                let open = open_msg(prompt.clone(), 4, 0.0);
                Open { sampling: open.sampling.clone().map(|s| Sampling { regex: "(".into(), ..s }), ..open }
            },
            Code::InvalidArgument,
            "open.sampling.regex",
        ),
        (
            {
                let open = open_msg(prompt.clone(), 4, 0.0);
                Open { sampling: open.sampling.clone().map(|s| Sampling { grammar: "root ::= x".into(), ..s }), ..open }
            },
            Code::InvalidArgument,
            "open.sampling.grammar",
        ),
    ];
    for (open, code, field) in open_cases {
        let (_, status) = raw(&url, None, open, nothing);
        expect_status(&status, code, field);
        still_serves();
    }
    // A verification before any open: unknown session.
    let (_, status) = raw(&url, None, Open::default(), nothing);
    expect_status(&status, Code::InvalidArgument, "open.prompt");
    let verify_cases: Vec<(f32, EdgeMessage, Code, &str)> = vec![
        (0.0, verify(n + 1, vec![5; 17], vec![]), Code::InvalidArgument, "verify.draft"),
        (0.0, verify(n + 1, vec![5, 80_000], vec![]), Code::InvalidArgument, "verify.draft[1]"),
        (0.0, verify(n, vec![5], vec![]), Code::FailedPrecondition, "base_len"),
        (0.0, verify(n + 1, vec![5; 10], vec![]), Code::InvalidArgument, "max_new_tokens"),
        (1.0, verify(n + 1, vec![5], vec![]), Code::InvalidArgument, "verify.q"),
        (1.0, verify(n + 1, vec![5], vec![SparseDist { ids: vec![5, 6], probs: vec![0.9, 0.9] }]), Code::InvalidArgument, "verify.q[0].probs"),
        (1.0, verify(n + 1, vec![5], vec![SparseDist { ids: vec![6, 5], probs: vec![0.5, 0.5] }]), Code::InvalidArgument, "ascending"),
        (1.0, verify(n + 1, vec![5], vec![SparseDist { ids: vec![5], probs: vec![-1.0] }]), Code::InvalidArgument, "verify.q[0].probs[0]"),
    ];
    for (temperature, msg, code, field) in verify_cases {
        let (got, status) = raw(&url, None, open_msg(prompt.clone(), 8, temperature), |_| vec![msg.clone()]);
        assert!(matches!(got.first().and_then(|m| m.kind.clone()), Some(ServerKind::Opened(_))), "open refused: {status:?}");
        expect_status(&status, code, field);
        still_serves();
    }
}

/// An edge may stop drafting between rounds and hand the rest of its
/// session to the server: the output is still the target's own, the
/// server counts the hand-off, and drafts sent after it, or a hand-off
/// from a stale context, are refused with the field named.
#[test]
fn a_handed_off_session_is_decoded_by_the_server_losslessly() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(&["--metrics-listen", &metrics_addr]);
    let req = request("Name three planets.", 24);
    let reference = local(&req);
    let mut target = client(&server.url(), None);
    let first = target.open(&req.prompt, &req.sampling, req.max_new_tokens).unwrap();
    let mut context = [req.prompt.clone(), vec![first]].concat();
    // One round whose two drafts are the target's own next tokens, drafted
    // at a device's pace: a session that had its tokens faster drafting
    // than decoded would be handed back (`admission::hands_back`).
    std::thread::sleep(Duration::from_millis(300));
    let round = target.verify(&context, &reference[1..3], &[]).unwrap();
    assert_eq!(round.verdict.accepted, 2);
    assert!(round.hints.pass_ms.is_some_and(|ms| ms > 0.0), "the hints carry the server's pass time");
    context.extend_from_slice(&reference[1..3]);
    context.push(round.verdict.next);
    let mut streamed = Vec::new();
    let decoded = target.hand_off(&context, &mut |e| streamed.push(e.token), model().tokenizer.eos_tokens(), &|| false).unwrap();
    assert!(!decoded.handed_back, "an idle server kept the session to its end");
    let decoded = decoded.tokens;
    assert_eq!(decoded, streamed, "each decoded token is passed on as it comes");
    assert_eq!([&context[req.prompt.len()..], &decoded[..]].concat(), reference, "a handed-off session's output differs from plain decoding");
    let metrics = parse_metrics(&scrape(&metrics_addr));
    let handoffs: f64 = metrics.iter().filter(|(n, _)| n.starts_with("tandem_handoffs_total")).map(|(_, v)| v).sum();
    assert_eq!(handoffs, 1.0);

    // The speculative loop hands off by itself where the server prefers to
    // decode round after round. Drafts that are never right make that so
    // whatever this server's fitted costs: k = 0 wins once the session's
    // acceptance falls below a token's share of a one-token round's cost.
    // (N-gram drafts of prose, right a third of the time or so, sit near
    // that boundary on this CPU: whether they hand off depends on the
    // costs each server measures at start.)
    let m = model();
    let controller = SpeculationController::new(StopRule::Fixed, 4, true).with_tpot_objective(Some(1000.0));
    let req = request("Explain why the sky is blue.", 32);
    let wrong = SyntheticDraft::new([req.prompt.clone(), local(&req)].concat(), 0.0, Duration::ZERO);
    let g = Speculator::new(client(&server.url(), None), Box::new(wrong), m.tokenizer.clone()).with_controller(controller).generate(&req, |_| {}).unwrap();
    assert_eq!(g.tokens, local(&req), "a handed-off generation differs from plain decoding");
    let after = g.handed_off_after.expect("the controller handed off");
    assert!(after > g.rounds && after < g.tokens.len(), "handed off after {after} of {} tokens, {} rounds", g.tokens.len(), g.rounds);

    let prompt = vec![1u32, 9690, 198, 19556, 2, 198];
    let n = prompt.len();
    let (_, status) = raw(&server.url(), None, open_msg(prompt.clone(), 8, 0.0), |_| vec![handoff(n)]);
    expect_status(&status, Code::FailedPrecondition, "handoff.base_len");
    // After the hand-off the server decodes; a verification is refused.
    let (got, status) = raw(&server.url(), None, open_msg(prompt.clone(), 8, 0.0), |_| vec![handoff(n + 1), verify(n + 2, vec![5], vec![])]);
    assert!(matches!(got.get(1).and_then(|m| m.kind.clone()), Some(ServerKind::Tokens(_))), "{got:?}");
    expect_status(&status, Code::FailedPrecondition, "server-only");
    // An edge that wants the target's states gets the prompt's, and none
    // with the tokens of a hand-off: they would be used only were the
    // session handed back (which then carries them all).
    let (got, status) = raw(&server.url(), None, Open { want_features: true, ..open_msg(prompt, 8, 0.0) }, |_| vec![handoff(n + 1)]);
    assert!(status.is_ok(), "{status:?}");
    assert!(matches!(&got[0].kind, Some(ServerKind::Opened(o)) if !o.features.is_empty()), "{:?}", got[0]);
    let tokens: Vec<Tokens> = got[1..].iter().filter_map(|m| if let Some(ServerKind::Tokens(t)) = &m.kind { Some(t.clone()) } else { None }).collect();
    assert_eq!(tokens.len(), got.len() - 1, "{got:?}");
    assert!(!tokens.is_empty(), "{got:?}");
    assert!(tokens.iter().all(|t| !t.handed_back && t.features.is_empty()), "{tokens:?}");
}

/// A server target whose hints always suggest decoding on the server: the
/// controller hands off whenever its rule lets it.
struct PrefersDecoding(RemoteTarget);

impl Target for PrefersDecoding {
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError> {
        self.0.open(prompt, sampling, max_new_tokens)
    }
    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[tandem_model::SparseDist]) -> Result<RoundOutcome, EdgeError> {
        let mut round = self.0.verify(context, drafts, q)?;
        round.hints.suggested_k = Some(0);
        Ok(round)
    }
    fn hand_off(&mut self, context: &[u32], on_token: &mut dyn FnMut(Emitted), eos: &[u32], stop: &dyn Fn() -> bool) -> Result<Decoded, EdgeError> {
        self.0.hand_off(context, on_token, eos, stop)
    }
    fn want_features(&mut self, on: bool) {
        self.0.want_features(on)
    }
    fn take_features(&mut self) -> Option<TargetFeatures> {
        self.0.take_features()
    }
    fn logprob_inbox(&mut self) -> &mut LogprobInbox {
        self.0.logprob_inbox()
    }
}

/// A server without room to decode hands a handed-off session back (here
/// one that decodes for no edge, `--hand-offs false`, so after one
/// token): the edge drafts again from the server's tokens, the output is
/// still the target's own, and an EAGLE-style draft gets the states of the
/// positions the server decoded.
#[test]
fn a_session_handed_back_is_drafted_again_losslessly() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(&["--hand-offs", "false", "--metrics-listen", &metrics_addr]);
    let m = model();
    let req = request("Name three planets.", 24);
    let reference = local(&req);
    let mut target = client(&server.url(), None);
    target.want_features(true);
    let first = target.open(&req.prompt, &req.sampling, req.max_new_tokens).unwrap();
    assert!(target.take_features().is_some(), "the prompt's states come with `opened`");
    let mut context = [req.prompt.clone(), vec![first]].concat();
    let decoded = target.hand_off(&context, &mut |_| {}, m.tokenizer.eos_tokens(), &|| false).unwrap();
    assert_eq!(decoded, Decoded { tokens: reference[1..2].to_vec(), handed_back: true });
    let states = target.take_features().expect("the decoded position's state");
    assert_eq!((states.start, states.rows, states.values.len()), (context.len() - 1, 1, m.llama.config().hidden));
    // Drafting again: a round at the server's count of tokens.
    context.extend_from_slice(&decoded.tokens);
    let round = target.verify(&context, &reference[2..4], &[]).unwrap();
    assert_eq!((round.verdict.accepted, round.verdict.next), (2, reference[4]));
    assert!(round.hints.suggested_k.is_some_and(|k| k > 0), "a server without room suggests drafts");

    // The speculative loop hands off whenever it may, is handed back each
    // time, and goes on drafting to the same output.
    let controller = SpeculationController::new(StopRule::Fixed, 4, true).with_tpot_objective(Some(1000.0));
    let req = request("Explain why the sky is blue.", 32);
    let spec = Speculator::new(PrefersDecoding(client(&server.url(), None)), DraftSpec::Trained(None).build(&m).unwrap(), m.tokenizer.clone());
    let g = spec.with_controller(controller).generate(&req, |_| {}).unwrap();
    assert_eq!(g.tokens, local(&req), "a generation handed back differs from plain decoding");
    assert!(g.handed_back >= 2 && g.server_decoded == g.handed_back, "{} hand-backs, {} tokens decoded by the server", g.handed_back, g.server_decoded);
    assert!(g.handed_off_after.is_some_and(|n| n > g.rounds.min(3)), "first handed off after {:?} tokens", g.handed_off_after);
    let metrics = parse_metrics(&scrape(&metrics_addr));
    let handbacks: f64 = metrics.iter().filter(|(n, _)| n.starts_with("tandem_handbacks_total")).map(|(_, v)| v).sum();
    assert_eq!(handbacks, 1.0 + g.handed_back as f64);
}

/// A handed-off session whose stream is lost (here: its server killed
/// mid-hand-off and restarted on the same port) resumes as a drafting
/// session that hands off again, so the new server may still hand it back;
/// the tokens are the target's own throughout.
#[test]
fn a_hand_off_resumed_on_a_new_stream_can_still_be_handed_back() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Some(ServerProcess::start(&["--listen", &listen]));
    let m = model();
    let req = request("Write a short story about a robot learning to paint.", 48);
    let reference = local(&req);
    let mut target = client(&server.as_ref().unwrap().url(), None);
    let first = target.open(&req.prompt, &req.sampling, req.max_new_tokens).unwrap();
    let context = [req.prompt.clone(), vec![first]].concat();
    // An idle server with room decodes the hand-off; after its second token
    // it dies, and its successor has no room for edges' sessions.
    let mut restarted = None;
    let mut received = 0;
    let decoded = target
        .hand_off(
            &context,
            &mut |_| {
                received += 1;
                if received == 2 {
                    let old = server.take().expect("the first server");
                    old.signal(9);
                    drop(old);
                    restarted = Some(ServerProcess::start(&["--listen", &listen, "--hand-offs", "false"]));
                }
            },
            m.tokenizer.eos_tokens(),
            &|| false,
        )
        .unwrap();
    assert!(restarted.is_some() && target.resumes >= 1, "the stream was never lost");
    assert!(decoded.handed_back, "the resumed hand-off was never handed back ({} tokens decoded)", decoded.tokens.len());
    assert!(decoded.tokens.len() >= 2 && decoded.tokens.len() < req.max_new_tokens - 1);
    assert_eq!(decoded.tokens, reference[1..1 + decoded.tokens.len()], "decoded tokens differ from plain decoding");
    // Drafting again, on the new server.
    let context = [context, decoded.tokens.clone()].concat();
    let at = context.len() - req.prompt.len();
    let round = target.verify(&context, &reference[at..at + 2], &[]).unwrap();
    assert_eq!((round.verdict.accepted, round.verdict.next), (2, reference[at + 2]));
}

#[test]
fn missing_or_wrong_keys_and_tenant_caps_are_refused() {
    let tenants = write_file("caps.toml", TENANTS);
    let server = ServerProcess::start(&["--tenants", tenants.to_str().unwrap()]);
    let url = server.url();
    let prompt = vec![1u32, 9690, 198];
    let (_, status) = raw(&url, None, open_msg(prompt.clone(), 2, 0.0), |_| vec![]);
    expect_status(&status, Code::Unauthenticated, "API key");
    let (_, status) = raw(&url, Some("not-a-key-000"), open_msg(prompt.clone(), 2, 0.0), |_| vec![]);
    expect_status(&status, Code::Unauthenticated, "invalid API key");

    // beta may hold one session: keep one open (a slow client), a second is refused.
    runtime().block_on(async {
        let (tx, mut held) = open_raw(&url, Some("beta-key-456"), open_msg(prompt.clone(), 8, 0.0)).await.unwrap();
        assert!(matches!(held.message().await.unwrap().unwrap().kind, Some(ServerKind::Opened(_))));
        let url = url.clone();
        let prompt = prompt.clone();
        let (_, status) = tokio::task::spawn_blocking(move || raw(&url, Some("beta-key-456"), open_msg(prompt, 2, 0.0), |_| vec![])).await.unwrap();
        expect_status(&status, Code::ResourceExhausted, "beta");
        drop(tx);
    });
    // The other tenant is unaffected.
    let (_, status) = raw(&url, Some("alpha-key-123"), open_msg(prompt, 2, 0.0), |_| vec![]);
    assert!(status.is_ok(), "{status:?}");
    let _ = std::fs::remove_file(tenants);
}

#[test]
fn kv_budget_refuses_with_resource_exhausted_and_recovers() {
    // 1 MiB holds about 22 positions of this model's KV cache.
    let server = ServerProcess::start(&["--kv-budget-mb", "1"]);
    let (_, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 64, 0.0), |_| vec![]);
    expect_status(&status, Code::ResourceExhausted, "KV memory budget");
    let (got, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 1, 0.0), |_| vec![]);
    assert!(status.is_ok() && !got.is_empty(), "a session that fits was refused: {status:?}");
}

#[test]
fn sigterm_finishes_the_pass_tells_clients_unavailable_and_exits() {
    let mut server = ServerProcess::start(&[]);
    let url = server.url();
    runtime().block_on(async {
        let (tx, mut inbound) = open_raw(&url, None, open_msg(vec![1, 9690, 198], 8, 0.0)).await.unwrap();
        assert!(matches!(inbound.message().await.unwrap().unwrap().kind, Some(ServerKind::Opened(_))));
        server.signal(15);
        let status = tokio::time::timeout(Duration::from_secs(20), inbound.message()).await.expect("answer after SIGTERM").unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        drop(tx);
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            assert!(code.success(), "server exited with {code:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_verify_without_an_open_session_is_not_found() {
    let server = ServerProcess::start(&[]);
    runtime().block_on(async {
        let mut client = VerifierClient::connect(server.url()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(verify(3, vec![5], vec![])).await.unwrap();
        let mut inbound = client.session(tonic::Request::new(ReceiverStream::new(rx))).await.unwrap().into_inner();
        let status = inbound.message().await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(status.message().contains("open"), "{status:?}");
    });
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let config = write_file("server.toml", "kv_budget_mb = 1\n[batcher]\npolicy = \"fcfs\"\nmax_batch_tokens = 64\n");
    let server = ServerProcess::start(&["--config", config.to_str().unwrap()]);
    let (_, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 64, 0.0), |_| vec![]);
    expect_status(&status, Code::ResourceExhausted, "KV memory budget");
    drop(server);
    let server = ServerProcess::start(&["--config", config.to_str().unwrap(), "--kv-budget-mb", "64"]);
    let (got, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 64, 0.0), |_| vec![]);
    assert!(status.is_ok() && !got.is_empty(), "the flag did not override the file's budget: {status:?}");
    let _ = std::fs::remove_file(config);
}

/// `--calibration-out` at one start, `--calibration` at the next: the
/// second server takes the file's fit instead of sweeping (it writes it
/// back bit for bit) and serves; a file measured with other threads, or
/// a roofline, is refused naming the flag.
#[test]
fn a_calibration_written_at_one_start_warm_starts_the_next() {
    let dir = std::env::temp_dir().join(format!("tandem-calibration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (dir.join("first.json"), dir.join("second.json"));
    drop(ServerProcess::start(&["--calibration-out", first.to_str().unwrap()]));
    let server = ServerProcess::start(&["--calibration", first.to_str().unwrap(), "--calibration-out", second.to_str().unwrap()]);
    let read = |p: &std::path::Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (a, b) = (read(&first), read(&second));
    assert_eq!(a["calibration"]["coefficients"], b["calibration"]["coefficients"], "the second start did not take the file's fit");
    assert_eq!(a["measured_on"], b["measured_on"]);
    assert!(b["label"].as_str().unwrap().contains("carried over"), "{}", b["label"]);
    let (got, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 8, 0.0), |_| vec![]);
    assert!(status.is_ok() && !got.is_empty(), "a server started from a calibration did not serve: {status:?}");
    drop(server);

    let mut other = a.clone();
    other["measured_on"]["threads"] = serde_json::json!(64);
    let mut computed = a.clone();
    computed["measured"] = serde_json::json!(false);
    computed.as_object_mut().unwrap().remove("measured_on");
    for (name, file, needle) in [("threads.json", other, "64 threads"), ("computed.json", computed, "records no server measurement")] {
        let path = dir.join(name);
        std::fs::write(&path, file.to_string()).unwrap();
        // A server that accepted the file would serve on: started as a
        // `ServerProcess`, it must fail to listen.
        let mut child = std::process::Command::new(workspace_binary("tandem-server"))
            .args(["--listen", "127.0.0.1:0", "--calibration", path.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: the server started from a calibration it should refuse");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--calibration") && stderr.contains(needle), "{name}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `--quantize` applies to Hugging Face folders: an unknown type, or a GGUF
/// (quantized already), stops the server with a message naming the flag.
#[test]
fn quantize_is_refused_by_name_where_it_cannot_apply() {
    for (value, needle) in [("q5", "expected one of q4_0, q4_1, q8_0, q4_k, q6_k"), ("q8_0", "quantized already")] {
        let out = std::process::Command::new(workspace_binary("tandem-server"))
            .args(["--listen", "127.0.0.1:0", "--quantize", value])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&format!("`--quantize {value}`")) && stderr.contains(needle), "{value}: {stderr}");
    }
}
