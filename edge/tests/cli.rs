//! The `tandem-edge` binary as a user runs it.

use std::process::Command;

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem-edge"))
}

#[test]
fn model_fetch_is_idempotent_and_prints_the_path() {
    for _ in 0..2 {
        let out = edge().args(["model", "fetch"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = String::from_utf8(out.stdout).unwrap();
        assert!(path.trim().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
        assert!(std::path::Path::new(path.trim()).is_file());
    }
}

#[test]
fn generate_local_json_reports_the_run() {
    let out = edge().args(["generate", "--local", "--prompt", "Name a colour.", "--max-new-tokens", "12", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = v["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 12);
    assert!(!v["text"].as_str().unwrap().is_empty());
    for field in ["rounds", "drafted", "accepted", "acceptance_rate", "tokens_per_round", "wall_ms", "ttft_ms"] {
        assert!(v[field].is_number(), "missing {field} in {v}");
    }
    let rate = v["acceptance_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    // The default draft for the default model.
    assert_eq!(v["draft"], "trained+lookup");
}

/// Another model drafts, when no draft is named, with its own first five
/// sixths of layers: 10 of a 12-layer model (the default model cut after
/// its 12th layer), which the default model's `layers:25` would not fit.
#[test]
fn another_model_gets_a_layers_draft_of_its_own_size() {
    use candle_core::quantized::gguf_file::{self, Value};
    let fetched = edge().args(["model", "fetch"]).output().unwrap();
    let src = String::from_utf8(fetched.stdout).unwrap();
    let mut file = std::fs::File::open(src.trim()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let kept = |name: &str| name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| l < 12);
    let tensors: Vec<(String, _)> =
        content.tensor_infos.keys().filter(|n| kept(n)).map(|n| (n.clone(), content.tensor(&mut file, n, &candle_core::Device::Cpu).unwrap())).collect();
    let mut metadata = content.metadata.clone();
    metadata.insert("llama.block_count".into(), Value::U32(12));
    let dst = std::env::temp_dir().join(format!("tandem-12-layers-{}.gguf", std::process::id()));
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &_)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(&dst).unwrap(), &md, &ts).unwrap();
    let v = tokens_of(&["generate", "--local", "--model", dst.to_str().unwrap(), "--prompt", "Name a colour.", "--max-new-tokens", "6", "--json"]);
    assert_eq!(v["draft"], "layers:10+lookup", "{v}");
    std::fs::remove_file(dst).unwrap();
}

#[test]
fn sampled_generation_is_reproducible_for_a_seed() {
    let run = |seed: &str| {
        let out = edge()
            .args(["generate", "--local", "--draft", "ngram", "--prompt", "Tell me a story.", "--max-new-tokens", "16"])
            .args(["--temperature", "0.9", "--top-p", "0.95", "--seed", seed, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(run("5"), run("5"));
}

#[test]
fn text_mode_streams_the_answer() {
    let out =
        edge().args(["generate", "--local", "--draft", "none", "--raw", "--prompt", "The capital of France is", "--max-new-tokens", "4"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
}

/// `--grammar-file`: a llama.cpp `.gbnf` file the whole answer follows.
#[test]
fn a_grammar_file_shapes_the_answer() {
    let file = std::env::temp_dir().join(format!("tandem-answer-{}.gbnf", std::process::id()));
    std::fs::write(&file, "# yes or no, then why\nroot ::= (\"Yes\" | \"No\") \", \" [a-z]+ \".\"\n").unwrap();
    let v = tokens_of(&["generate", "--local", "--prompt", "Is the sky blue?", "--max-new-tokens", "16", "--grammar-file", file.to_str().unwrap(), "--json"]);
    std::fs::remove_file(&file).unwrap();
    let text = v["text"].as_str().unwrap();
    let word = text.strip_prefix("Yes, ").or(text.strip_prefix("No, ")).and_then(|t| t.strip_suffix('.'));
    assert!(word.is_some_and(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase())), "{text:?}");
}

#[test]
fn bad_flags_get_messages_naming_them() {
    let cases: [(&[&str], &str); 17] = [
        (&["generate", "--local", "--draft", "bogus", "--prompt", "x"], "--draft"),
        (&["generate", "--local", "--draft", "layers:99", "--prompt", "x"], "--draft"),
        (&["generate", "--local", "--model", "/nonexistent.gguf", "--prompt", "x"], "--model"),
        (&["generate", "--local", "--model", "hf:no-owner", "--prompt", "x"], "--model"),
        (&["generate", "--local", "--draft", "model:hf:owner/name/weights.bin", "--prompt", "x"], ".gguf"),
        (&["generate", "--local", "--prompt", "x", "--top-p", "0"], "top_p"),
        (&["generate", "--local", "--prompt", "x", "--min-p", "2"], "min_p"),
        (&["generate", "--local", "--prompt", "x", "--max-new-tokens", "4", "--min-tokens", "5"], "min_tokens"),
        (&["generate", "--local", "--prompt", "x", "--stop-token-id", "49152"], "stop_token_ids"),
        (&["generate", "--local", "--prompt", "x", "--json-mode", "--ignore-eos"], "json_object"),
        (&["generate", "--local", "--prompt", "x", "--json-schema", "/nonexistent.json"], "--json-schema"),
        (&["generate", "--local", "--prompt", "x", "--regex", "("], "--regex"),
        (&["generate", "--local", "--prompt", "x", "--regex", "a", "--json-mode"], "--regex"),
        (&["generate", "--local", "--prompt", "x", "--grammar", "root ::= x"], "--grammar"),
        (&["generate", "--local", "--prompt", "x", "--grammar-file", "/nonexistent.gbnf"], "--grammar-file"),
        (&["generate", "--local", "--prompt", "x", "--grammar", "root ::= \"a\"", "--regex", "a"], "--grammar"),
        (&["generate", "--prompt", "x"], "--local"),
    ];
    for (args, flag) in cases {
        let out = edge().args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: error does not name {flag}: {err}");
    }
}

fn tokens_of(args: &[&str]) -> serde_json::Value {
    let out = edge().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
}

#[test]
fn controller_log_train_and_every_stop_rule_stay_lossless() {
    let dir = std::env::temp_dir().join(format!("tandem-controller-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (log, weights) = (dir.join("log.jsonl"), dir.join("weights.json"));
    let base = ["generate", "--local", "--draft", "layers:25", "--max-new-tokens", "24", "--json"];
    let prompts = ["Write a Python function that adds two numbers.", "Explain what a hash map is.", "Name four oceans."];
    let mut reference = Vec::new();
    for p in prompts {
        let v = tokens_of(&[&base[..], &["--prompt", p, "--log-controller", log.to_str().unwrap()]].concat());
        assert!(v["wasted_draft_ms"].is_number() && v["draft_ms"].as_f64().unwrap() > 0.0, "{v}");
        reference.push(v["tokens"].clone());
    }
    let samples = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(samples >= 20, "only {samples} controller samples logged");
    let out = edge().args(["controller", "train", log.to_str().unwrap(), "-o", weights.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("precision") && report.contains("false-stop rate"), "{report}");
    let predictor = format!("predictor:{}", weights.display());
    // With prompt lookup too: copied tokens pass the stop rules unjudged.
    for draft in ["layers:25", "layers:25+lookup"] {
        for controller in [&["--controller", "confidence"][..], &["--controller", &predictor], &["--controller", &predictor, "--adaptive-k"]] {
            for (p, want) in prompts.iter().zip(&reference) {
                let v = tokens_of(&[&base[..2], &["--draft", draft], &base[4..], &["--prompt", p], controller].concat());
                assert_eq!(&v["tokens"], want, "{draft} with {controller:?} changed the output");
            }
        }
    }
    let out = edge().args([&base[..], &["--prompt", "x", "--controller", "predictor:/nonexistent.json"]].concat()).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--controller"));
    let _ = std::fs::remove_dir_all(dir);
}
