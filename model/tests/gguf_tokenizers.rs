//! GGUF tokenizers other than the default model's, checked against
//! llama.cpp's own tokenizer tests: its `models/ggml-vocab-*.gguf` files
//! (vocabulary only) with `.inp` (texts) and `.out` (the ids the model's
//! reference tokenizer gives each text). They ship in the `llama-cpp-python`
//! sdist on PyPI, which is fetched once (76 MB) and checked against its
//! sha256.

mod common;

use candle_core::quantized::gguf_file;
use common::scratch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tandem_model::{fetch, Tokenizer};

const SDIST_URL: &str =
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz";
const SDIST_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";

/// The vocabularies checked, by `tokenizer.ggml.pre` family: SentencePiece
/// (Llama 2, Phi-3), Llama 3, Qwen2, DeepSeek Coder, GPT-2, MPT,
/// StarCoder, Refact, Command-R.
const VOCABS: [&str; 11] = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder", "gpt-2", "mpt", "starcoder", "refact", "command-r"];

/// The folder holding the fixtures, fetched on first use (once per run).
fn fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(fetch_fixtures).clone()
}

fn fetch_fixtures() -> PathBuf {
    let dir = fetch::tandem_home().join("llama-cpp-vocab-0.3.36");
    if VOCABS.iter().all(|v| dir.join(format!("ggml-vocab-{v}.gguf.out")).exists()) {
        return dir;
    }
    let members: Vec<String> = VOCABS.iter().flat_map(|v| ["", ".inp", ".out"].map(|ext| format!("ggml-vocab-{v}.gguf{ext}"))).collect();
    // Download, check, and unpack only the fixtures, into a folder renamed
    // into place when complete.
    let script = r#"
import hashlib, os, shutil, sys, tarfile, tempfile, urllib.request
url, sha, dest, *members = sys.argv[1:]
os.makedirs(os.path.dirname(dest), exist_ok=True)
work = tempfile.mkdtemp(dir=os.path.dirname(dest))
try:
    sdist = os.path.join(work, "sdist.tar.gz")
    urllib.request.urlretrieve(url, sdist)
    got = hashlib.sha256(open(sdist, "rb").read()).hexdigest()
    if got != sha:
        sys.exit(f"{url}: sha256 {got}, expected {sha}")
    out = os.path.join(work, "out")
    os.makedirs(out)
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            name = os.path.basename(m.name)
            if "/vendor/llama.cpp/models/" in m.name and name in members:
                with open(os.path.join(out, name), "wb") as f:
                    f.write(t.extractfile(m).read())
    missing = set(members) - set(os.listdir(out))
    if missing:
        sys.exit(f"not in the sdist: {sorted(missing)}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(out, dest)
finally:
    shutil.rmtree(work, ignore_errors=True)
"#;
    let status = Command::new("python3").arg("-c").arg(script).arg(SDIST_URL).arg(SDIST_SHA256).arg(&dir).args(&members).status().expect("python3 runs");
    assert!(status.success(), "fetching llama.cpp's tokenizer fixtures from PyPI failed");
    dir
}

fn load(dir: &Path, vocab: &str) -> Tokenizer {
    let path = dir.join(format!("ggml-vocab-{vocab}.gguf"));
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content).unwrap_or_else(|e| panic!("{vocab}: {e}"))
}

/// llama.cpp's test cases: texts each followed by `\n__ggml_vocab_test__\n`,
/// one line of ids per text.
fn cases(dir: &Path, vocab: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
    const SEPARATOR: &str = "\n__ggml_vocab_test__\n";
    let texts: Vec<&str> = inp.strip_suffix(SEPARATOR).unwrap_or(&inp).split(SEPARATOR).collect();
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{vocab}: texts and outputs differ in number");
    texts.into_iter().map(String::from).zip(ids).collect()
}

#[test]
fn gguf_tokenizers_match_llama_cpps_tests() {
    let dir = fixtures();
    let mut failures = Vec::new();
    for vocab in VOCABS {
        let tok = load(&dir, vocab);
        let cases = cases(&dir, vocab);
        assert!(cases.len() >= 30, "{vocab}: {} cases", cases.len());
        for (text, want) in &cases {
            let got = tok.encode(text).unwrap();
            if &got != want {
                failures.push(format!("{vocab} {text:?}: got {got:?}, want {want:?}"));
                continue;
            }
            // Decoding gives the text back (SentencePiece adds one space in front).
            let decoded = tok.decode(&got).unwrap();
            let decoded = if vocab.ends_with("spm") || vocab == "phi-3" { decoded.strip_prefix(' ').unwrap_or(&decoded).to_string() } else { decoded };
            if &decoded != text {
                failures.push(format!("{vocab} {text:?}: decoded as {decoded:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    // Qwen2 composes accents first (its tokenizer.json's NFC normalizer).
    let qwen = load(&dir, "qwen2");
    assert_eq!(qwen.encode("cafe\u{301}").unwrap(), qwen.encode("caf\u{e9}").unwrap());
}

/// Llama 2 and 3 prompts start with BOS, once; Qwen2 and StarCoder prompts
/// do not.
#[test]
fn prompts_start_with_bos_where_the_model_wants_it() {
    let dir = fixtures();
    for (vocab, bos) in [("llama-spm", Some(1)), ("llama-bpe", Some(128000)), ("qwen2", None), ("starcoder", None)] {
        let tok = load(&dir, vocab);
        let plain = tok.encode("Hello world").unwrap();
        let prompt = tok.encode_prompt("Hello world").unwrap();
        match bos {
            Some(bos) => {
                assert_eq!(prompt[0], bos, "{vocab}");
                assert_eq!(&prompt[1..], &plain[..], "{vocab}");
                // A prompt that already starts with BOS (as a chat template
                // writes it) does not get a second one.
                let text = format!("{}Hello world", tok.decode(&[bos]).unwrap());
                let once = tok.encode_prompt(&text).unwrap();
                assert_eq!(once.iter().filter(|&&t| t == bos).count(), 1, "{vocab}: {once:?}");
            }
            None => assert_eq!(prompt, plain, "{vocab}"),
        }
    }
}

/// The same vocabularies as Hugging Face folders (`tokenizer.json` as this
/// tokenizer writes it): SentencePiece ones too load, and encode and decode
/// as from GGUF.
#[test]
fn the_same_tokenizers_load_from_a_folder() {
    let dir = fixtures();
    for vocab in ["llama-spm", "llama-bpe", "qwen2"] {
        let gguf = load(&dir, vocab);
        let folder = scratch(vocab);
        std::fs::write(folder.join("tokenizer.json"), gguf.to_json().unwrap()).unwrap();
        let config = serde_json::json!({ "bos_token_id": gguf.bos_token(), "eos_token_id": gguf.eos_tokens() });
        let tok = Tokenizer::from_hf_folder(&folder, &config).unwrap_or_else(|e| panic!("{vocab}: {e}"));
        for (text, want) in cases(&dir, vocab) {
            let ids = tok.encode(&text).unwrap();
            assert_eq!(ids, want, "{vocab} {text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), gguf.decode(&ids).unwrap(), "{vocab} {text:?}");
        }
        std::fs::remove_dir_all(folder).unwrap();
    }
}
