//! The `tandem-edge` binary as a user runs it, against a real server over
//! loopback: `generate` (pipelined or not, equal to server-only decoding,
//! across a server restart), settings from the config file and the
//! environment, clear errors, `serve` driven by the official OpenAI Python
//! client, and `chat` driven through a pseudo-terminal.

use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_tests::{free_port, workspace_binary, write_file, ServerProcess};

/// One test at a time: each starts servers, and two cores are all there is.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The edge binary with no settings from this machine's user.
fn edge() -> Command {
    let mut c = Command::new(workspace_binary("tandem-edge"));
    c.env_remove("TANDEM_SERVER")
        .env_remove("TANDEM_API_KEY")
        .env_remove("TANDEM_CONFIG")
        .env("XDG_CONFIG_HOME", std::env::temp_dir().join("tandem-test-no-config"));
    c
}

fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json_of(cmd: &mut Command) -> Value {
    serde_json::from_slice(&succeed(cmd).stdout).unwrap()
}

const PROMPT: &str = "Write a Python function that checks whether a number is prime.";

fn generate_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["generate", "--prompt", PROMPT, "--max-new-tokens", "48", "--json"].iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn generate_equals_server_only_with_settings_from_flags_env_or_file() {
    let _one = serial();
    let server = ServerProcess::start(&[]);
    let url = server.url();
    let reference = json_of(edge().args(generate_args(&["--server", &url, "--server-only"])));
    let reference_tokens = &reference["tokens"];
    assert_eq!(reference_tokens.as_array().unwrap().len(), 48);

    let pipelined = json_of(edge().args(generate_args(&["--server", &url, "--draft", "layers:25"])));
    assert_eq!(&pipelined["tokens"], reference_tokens, "pipelined drafting changed the output");
    let plain = json_of(edge().args(generate_args(&["--server", &url, "--draft", "ngram", "--no-pipeline"])));
    assert_eq!(&plain["tokens"], reference_tokens);
    assert_eq!(plain["ahead_drafted"], 0);

    // The server from the environment, then from the config file (which
    // also sets the draft); a flag beats both.
    let from_env = json_of(edge().args(generate_args(&["--draft", "ngram"])).env("TANDEM_SERVER", &url));
    assert_eq!(&from_env["tokens"], reference_tokens);
    let config = write_file("edge.toml", &format!("server = \"{url}\"\ndraft = \"ngram\"\ndraft_len = 3\n"));
    let from_file = json_of(edge().args(generate_args(&[])).env("TANDEM_CONFIG", &config));
    assert_eq!(&from_file["tokens"], reference_tokens);
    assert_eq!(from_file["draft"], "ngram");
    let flag_wins = json_of(edge().args(generate_args(&["--draft", "layers:20"])).arg("--config").arg(&config));
    assert_eq!(flag_wins["draft"], "layers:20");
    assert_eq!(&flag_wins["tokens"], reference_tokens);

    let typo = write_file("typo.toml", "sever = \"http://x\"\n");
    let out = edge().args(generate_args(&[])).arg("--config").arg(&typo).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--config") && err.contains("sever"), "{err}");
}

#[test]
fn unreachable_server_bad_key_and_missing_model_get_clear_errors() {
    let _one = serial();
    let tenants = write_file("tenants.toml", "[[tenant]]\nname = \"alpha\"\napi_key = \"alpha-key-123\"\n");
    let server = ServerProcess::start(&["--tenants", tenants.to_str().unwrap()]);
    let url = server.url();
    let expect_error = |cmd: &mut Command, needles: &[&str]| {
        let started = Instant::now();
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{cmd:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{cmd:?}: error does not say {n:?}: {err}");
        }
        started.elapsed()
    };
    expect_error(edge().args(generate_args(&["--server", &url, "--draft", "ngram"])), &["API key", "TANDEM_API_KEY"]);
    expect_error(edge().args(generate_args(&["--server", &url, "--draft", "ngram", "--api-key", "wrong"])), &["API key"]);
    let ok = json_of(edge().args(generate_args(&["--server", &url, "--draft", "ngram"])).env("TANDEM_API_KEY", "alpha-key-123"));
    assert_eq!(ok["tokens"].as_array().unwrap().len(), 48);

    // Nothing listens there: reported at once, not after a minute of retries.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let waited = expect_error(edge().args(generate_args(&["--server", &dead, "--draft", "ngram"])), &["cannot reach the server", &dead]);
    assert!(waited < Duration::from_secs(20), "took {waited:?} to report an unreachable server");
    expect_error(edge().args(generate_args(&["--local", "--model", "/nonexistent/model.gguf"])), &["--model", "/nonexistent/model.gguf"]);
    expect_error(edge().args(generate_args(&["--local", "--backend", "tpu"])), &["--backend tpu"]);
    expect_error(edge().args(generate_args(&[])), &["--local", "--server", "TANDEM_SERVER"]);
}

#[test]
fn generate_resumes_across_a_server_restart_with_identical_text() {
    let _one = serial();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = ServerProcess::start(&["--listen", &listen]);
    let url = server.url();
    let args = ["generate", "--server", &url, "--draft", "layers:25", "--prompt", "Write a short story about a lighthouse keeper.", "--max-new-tokens", "160"];
    let reference = String::from_utf8(succeed(edge().args(args)).stdout).unwrap();
    assert!(reference.len() > 200, "{reference}");

    let mut child = edge().args(args).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    // Kill the server once a fifth of the answer is out.
    while seen.len() < reference.len() / 5 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the edge ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    server.signal(9);
    let _ = server.child.wait();
    server = ServerProcess::start(&["--listen", &listen]);
    stdout.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("resuming"), "no resume happened: {stderr}");
    assert_eq!(String::from_utf8(seen).unwrap(), reference, "the resumed text differs from the uninterrupted one");
    drop(server);
}

/// Where `.ci/run` installs the `openai` package (`pip install --target`).
fn python_path() -> PathBuf {
    std::env::var_os("TANDEM_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tandem-ci-python"))
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// `v` with every number a float: Pydantic gives a `float` field's 20 as 20.0.
fn as_floats(v: Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(as_floats).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, x)| (k, as_floats(x))).collect()),
        other => other,
    }
}

#[test]
fn serve_answers_the_official_openai_client() {
    let _one = serial();
    let pythonpath = python_path();
    let probe = Command::new("python3").args(["-c", "import openai"]).env("PYTHONPATH", &pythonpath).output().unwrap();
    assert!(
        probe.status.success(),
        "the `openai` Python package is missing: `.ci/run` installs it (python3 -m pip install --target {} openai)",
        pythonpath.display()
    );
    let server = ServerProcess::start(&[]);
    let port = free_port();
    let mut serve = edge()
        .args(["serve", "--server", &server.url(), "--draft", "layers:25", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let mut stderr = serve.stderr.take().unwrap();
    let mut byte = [0u8; 1];
    while !banner.contains("/v1") && stderr.read(&mut byte).unwrap() == 1 {
        banner.push(byte[0] as char);
    }
    assert!(banner.contains("OpenAI-compatible endpoint"), "{banner}");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    let out =
        Command::new("python3").arg(script("openai_client.py")).arg(format!("http://127.0.0.1:{port}/v1")).env("PYTHONPATH", &pythonpath).output().unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();

    // The reference: the same question through `generate`.
    let generated = json_of(edge().args([
        "generate",
        "--server",
        &server.url(),
        "--draft",
        "ngram",
        "--prompt",
        "Name three colours.",
        "--max-new-tokens",
        "24",
        "--json",
        "--logprobs",
        "3",
    ]));
    assert_eq!(v["whole"], generated["text"], "{v}");
    assert_eq!(v["streamed"], generated["text"], "{v}");
    assert!(v["stream_chunks"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["whole_finish"], "length");
    assert_eq!(v["stream_finish"], serde_json::json!(["length"]));
    for usage in [&v["whole_usage"], &v["stream_usage"]] {
        assert_eq!(usage["completion_tokens"], 24, "{v}");
        let drafted = usage["tandem"]["drafted"].as_u64().unwrap();
        let accepted = usage["tandem"]["accepted"].as_u64().unwrap();
        assert!(drafted > 0 && accepted <= drafted, "{v}");
    }
    assert!(v["completion"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["models"], serde_json::json!(["SmolLM2-135M-Instruct.Q4_1"]));
    assert_eq!(v["refused_param"], "temperature");
    // `stop_token_ids`: the answer up to its first comma, which ends it unshown.
    let comma = v["comma"][0].as_u64().unwrap();
    let until_comma = generated["tokens"].as_array().unwrap().iter().position(|t| t.as_u64() == Some(comma)).expect("the answer has a comma");
    let before_comma = generated["text"].as_str().unwrap().split(',').next().unwrap();
    assert_eq!(v["at_comma"], serde_json::json!([before_comma, "stop", until_comma + 1]), "{v}");
    assert_eq!(v["at_comma_streamed"], before_comma, "{v}");
    // `n`: sampled choices draw with seeds of their own (11, 12, 13), so
    // they differ; greedy ones, streamed, are each the greedy answer. Usage
    // adds the choices up, in one chunk at the end of a stream.
    let several = v["several"].as_array().unwrap();
    assert_eq!(several.iter().map(|c| c[0].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2], "{v}");
    assert!(several[0][1] != several[1][1] && several[1][1] != several[2][1], "{v}");
    assert!(several.iter().all(|c| c[2] == "stop" || c[2] == "length"), "{v}");
    let sampled_tokens = v["several_tokens"].as_u64().unwrap();
    assert!(sampled_tokens > 12 && sampled_tokens <= 36, "{v}");
    assert_eq!(v["several_streamed"], serde_json::json!([generated["text"], generated["text"]]), "{v}");
    assert_eq!(v["several_stream_roles"], serde_json::json!([0, 1]), "{v}");
    assert_eq!(v["several_stream_finish"], serde_json::json!([[0, "length"], [1, "length"]]), "{v}");
    assert_eq!(v["several_stream_tokens"], serde_json::json!([48]), "{v}");
    // JSON mode: one object, closed.
    assert_eq!(v["json_mode"][1], "stop", "{v}");
    assert!(serde_json::from_str::<Value>(v["json_mode"][0].as_str().unwrap()).unwrap().is_object(), "{v}");
    // Structured outputs: the client's helper parsed the answer into its
    // Pydantic model (which it validates); the text is that object.
    assert_eq!(v["structured"][1], "stop", "{v}");
    let cat = &v["structured"][2];
    assert_eq!(as_floats(serde_json::from_str(v["structured"][0].as_str().unwrap()).unwrap()), as_floats(cat.clone()), "{v}");
    assert!(cat["toys"].as_array().is_some_and(|t| t.len() <= 3) && ["black", "white", "ginger"].iter().any(|c| cat["colour"] == *c), "{v}");
    // Pydantic took the bounds, the date, the pattern and the length; the same here.
    let chip = cat["chip"].as_str().unwrap().as_bytes();
    assert!(chip.len() == 6 && chip[..2].iter().all(u8::is_ascii_uppercase) && chip[2..].iter().all(u8::is_ascii_digit), "{v}");
    assert!(cat["motto"].as_str().unwrap().chars().count() <= 20 && cat["born"].as_str().unwrap().len() == 10, "{v}");
    let name = cat["name"].as_str().unwrap().as_bytes();
    assert!(name.len() <= 12 && name[0].is_ascii_uppercase() && name[1..].iter().all(u8::is_ascii_lowercase) && name.len() > 1, "{v}");
    assert!(cat["age"].as_u64().is_some_and(|a| a <= 30) && cat["weight_kg"].as_f64().is_some_and(|w| w > 0.0 && w <= 20.0), "{v}");
    // A forced call: no content, one call of the named function whose
    // arguments the helper parsed into the model; the same streamed, its
    // name and id in the first delta and the arguments after.
    let call = &v["tool_call"];
    assert_eq!((&call[0], &call[1]), (&Value::Null, &serde_json::json!("stop")), "{v}");
    let calls = call[2].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!((&calls[0][0], &calls[0][1]), (&serde_json::json!("function"), &serde_json::json!("describe_cat")), "{v}");
    // /tokenize counts the prompt with the call's instruction, as the request sent it.
    let prompts = &call[3];
    assert!(prompts[0] == prompts[1] && prompts[1].as_u64() > prompts[2].as_u64(), "{v}");
    let arguments = calls[0][2].as_str().unwrap();
    assert_eq!(as_floats(serde_json::from_str(arguments).unwrap()), as_floats(calls[0][3].clone()), "{v}");
    let streamed = &v["tool_call_streamed"];
    let opening = streamed[0].as_array().unwrap();
    assert!(opening.len() == 1 && opening[0][0] == 0 && opening[0][2] == "describe_cat", "{v}");
    assert!(opening[0][1].as_str().is_some_and(|id| id.starts_with("call-")), "{v}");
    assert_eq!((&streamed[1], &streamed[2], &streamed[3]), (&serde_json::json!(arguments), &serde_json::json!(["stop"]), &serde_json::json!(false)), "{v}");
    // `required` with two tools: calls of either, each with its function's
    // arguments; streamed, the same.
    let is_call = |call: &Value| {
        let arguments: Value = serde_json::from_str(call[1].as_str().unwrap()).unwrap();
        match call[0].as_str().unwrap() {
            "get_weather" => arguments["city"].is_string() && arguments.as_object().unwrap().len() == 1,
            "describe_cat" => arguments["chip"].is_string(),
            _ => false,
        }
    };
    let picked = &v["picked"];
    assert_eq!(picked[0], "stop", "{v}");
    let calls = picked[1].as_array().unwrap();
    assert!((1..=16).contains(&calls.len()) && calls.iter().all(is_call), "{v}");
    assert_eq!(picked[2], picked[1], "{v}");
    // Parallel calls: up to 16 of the weather (the default model calls it
    // for Paris, then London), each streamed with its index and id and
    // then its arguments as written, put together the same as whole; one
    // without them.
    let parallel = &v["parallel"];
    assert_eq!(parallel[0], "stop", "{v}");
    let (calls, deltas) = (parallel[1].as_array().unwrap(), parallel[2].as_array().unwrap());
    assert!((1..=16).contains(&calls.len()) && calls.iter().all(|c| c[0] == "get_weather" && is_call(c)), "{v}");
    assert_eq!(
        deltas.iter().map(|d| [d[2].clone(), d[3].clone()]).collect::<Vec<_>>(),
        calls.iter().map(|c| [c[0].clone(), c[1].clone()]).collect::<Vec<_>>(),
        "{v}"
    );
    let ids: std::collections::HashSet<&str> = deltas.iter().map(|d| d[1].as_str().unwrap()).collect();
    assert!(deltas.iter().enumerate().all(|(i, d)| d[0] == i) && ids.len() == deltas.len(), "{v}");
    assert!(parallel[3].as_array().is_some_and(|calls| calls.len() == 1 && is_call(&calls[0])), "{v}");
    // vLLM's `guided_choice` and `guided_regex`: one of the strings, a match.
    let guided = &v["guided"];
    assert!(["yes", "no"].iter().any(|c| guided[0][0] == *c) && guided[0][1] == "stop", "{v}");
    let phone = guided[1][0].as_str().unwrap().as_bytes();
    let digits = |b: &[u8]| b.iter().all(u8::is_ascii_digit);
    assert!(
        phone.len() == 14
            && phone[0] == b'('
            && digits(&phone[1..4])
            && &phone[4..6] == b") "
            && digits(&phone[6..9])
            && phone[9] == b'-'
            && digits(&phone[10..]),
        "{v}"
    );
    assert_eq!(guided[1][1], "stop", "{v}");
    // A GBNF grammar (`guided_grammar`): two or three lines "- Word".
    let lines: Vec<&str> = guided[2][0].as_str().unwrap().split('\n').collect();
    let item = |l: &&str| {
        l.strip_prefix("- ").is_some_and(|w| {
            w.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && w[1..].chars().all(|c| c.is_ascii_lowercase()) && (2..=13).contains(&w.len())
        })
    };
    assert!((2..=3).contains(&lines.len()) && lines.iter().all(item) && guided[2][1] == "stop", "{v}");
    // `auto`: a reply (its text out of the JSON around it) or a call
    // (`tool_calls`), the same whole and streamed.
    let auto = &v["auto"];
    assert_eq!(v["auto_streamed"], *auto, "{v}");
    match auto[2].as_array().unwrap().as_slice() {
        [] => assert!(auto[0] == serde_json::json!(["stop"]) && !auto[1].as_str().unwrap().is_empty(), "{v}"),
        calls => assert!(auto[0] == serde_json::json!(["tool_calls"]) && calls.iter().all(|c| c[0] == "get_weather" && is_call(c)) && auto[1] == "", "{v}"),
    }

    // Log-probabilities: one per answer token (none for a stop token), their
    // bytes making the text, the same streamed, and the same as the
    // target's in `generate --logprobs` (another draft, another process).
    let logprobs = v["logprobs"].as_array().unwrap();
    assert_eq!(v["logprobs_text"], generated["text"], "{v}");
    assert_eq!(logprobs.len(), 24, "{v}");
    let bytes: Vec<u8> = logprobs.iter().flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), generated["text"].as_str().unwrap());
    assert_eq!(v["streamed_logprobs"], v["logprobs"], "streamed chunks carry their tokens' log-probabilities");
    let as_f32 = |x: &Value| x.as_f64().unwrap() as f32;
    for (e, r) in logprobs.iter().zip(generated["logprobs"].as_array().unwrap()) {
        assert_eq!(as_f32(&e["logprob"]), as_f32(&r["logprob"]), "{e} against {r}");
        let top = e["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!((&top[0][0], as_f32(&top[0][1])), (&e["token"], as_f32(&e["logprob"])), "greedy takes the most likely token: {e}");
        assert!(top.windows(2).all(|w| as_f32(&w[0][1]) >= as_f32(&w[1][1])), "{e}");
        let alternatives: Vec<f32> = r["top"].as_array().unwrap().iter().map(|t| as_f32(&t["logprob"])).collect();
        assert_eq!(top.iter().map(|t| as_f32(&t[1])).collect::<Vec<_>>(), alternatives);
    }
    let completion = &v["completion_logprobs"];
    let tokens: Vec<&str> = completion["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), v["completion_logprobs_text"].as_str().unwrap(), "{completion}");
    let offsets: Vec<usize> = completion["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap() as usize).collect();
    let starts: Vec<usize> = tokens.iter().scan(0, |at, t| Some(std::mem::replace(at, *at + t.chars().count()))).collect();
    assert_eq!(offsets, starts, "{completion}");
    assert!(completion["top_logprobs"].as_array().unwrap().iter().all(|m| m.as_object().unwrap().len() == 2), "{completion}");

    // `echo`: the prompt, then the answer, with the prompt's tokens'
    // log-probabilities (null for the first), as `--prompt-logprobs` gives them.
    let echoed = &v["echo_logprobs"];
    let prompt = "The capital of France is";
    assert!(v["echo_text"].as_str().unwrap().starts_with(prompt), "{v}");
    let scored = json_of(edge().args(["generate", "--server", &server.url(), "--raw", "--prompt", prompt, "--max-new-tokens", "1", "--json"]).args([
        "--logprobs",
        "1",
        "--prompt-logprobs",
    ]));
    let prompt_logprobs = scored["prompt_logprobs"].as_array().unwrap();
    let token_logprobs = echoed["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), prompt_logprobs.len() + 2, "the prompt's tokens and one new one: {echoed}");
    assert!(token_logprobs[0].is_null() && echoed["top_logprobs"][0].is_null(), "{echoed}");
    for (e, r) in token_logprobs[1..].iter().zip(prompt_logprobs.iter().chain(scored["logprobs"].as_array().unwrap())) {
        assert_eq!(as_f32(e), as_f32(&r["logprob"]), "{echoed} against {scored}");
    }
    let tokens: Vec<&str> = echoed["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), v["echo_text"].as_str().unwrap());
    // The prompt as /tokenize's token ids: the same tokens, the same scores.
    assert_eq!((&v["echo_ids_text"], &v["echo_ids_logprobs"]), (&v["echo_text"], echoed));
    // With `n` 2 each choice echoes them, though the server was asked once.
    assert_eq!(v["echo_twice_logprobs"], serde_json::json!([echoed, echoed]), "{v}");
    assert_eq!(v["detokenized"], prompt);
}

#[test]
fn chat_through_a_terminal_keeps_going_after_ctrl_c() {
    let _one = serial();
    let edge_bin = workspace_binary("tandem-edge");
    let out = Command::new("python3")
        .arg(script("chat_pty.py"))
        .arg(&edge_bin)
        .args(["chat", "--local", "--draft", "layers:25", "--max-new-tokens", "400"])
        .env("XDG_CONFIG_HOME", std::env::temp_dir().join("tandem-test-no-config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let transcript = v["transcript"].as_str().unwrap();
    for step in ["banner", "answer", "stats", "stopped", "stats_after_stop"] {
        assert_eq!(v["steps"][step], true, "step {step} did not happen:\n{transcript}");
    }
    assert!(transcript.contains("acceptance"), "{transcript}");
    assert!(transcript.contains("(cancelled)"), "/stats after Ctrl-C should say the answer was cancelled:\n{transcript}");
    assert!(transcript.contains("2 answers"), "{transcript}");
    assert_eq!(v["exit_status"], 0, "{transcript}");
}
