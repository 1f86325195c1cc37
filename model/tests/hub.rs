//! Models from the Hugging Face Hub (`hf:OWNER/NAME[/FILE.gguf][@REV]`),
//! fetched over HTTP from a stand-in for the Hub on loopback, since
//! huggingface.co does not resolve from the machines these tests run on.
//! The stand-in answers as the Hub does: the file list and the commit a
//! revision is at, at `/api/models/OWNER/NAME/revision/REV`; small files at
//! `/OWNER/NAME/resolve/REV/FILE` with their commit and ETag; weights there
//! as a redirect to a CDN address, with the commit and the content's hash
//! as `X-Linked-Etag`; byte ranges; `main` at a repo's latest commit, which
//! a test can move on; 401 for a gated repo without a token, 404 for what
//! does not exist. The client is the real one (`hf-hub` over
//! ureq), and so is the cache it fills.

mod common;

use candle_core::quantized::GgmlDType;
use common::{scratch, tiny_llama, write_folder, TinySpec};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tandem_model::hub::{fetch, HubModel, HubOptions};
use tandem_model::*;

const COMMIT: &str = "4f0c6a1e2b3d4c5e6f708192a3b4c5d6e7f80912";
const NEXT_COMMIT: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a990817263";
const TOKEN: &str = "hf_tandem_test_token";

/// A repo's commits (id, files), oldest first; `main` is at `commits[head]`.
struct StandInRepo {
    commits: Vec<(&'static str, HashMap<String, PathBuf>)>,
    head: Arc<AtomicUsize>,
    gated: bool,
}

impl StandInRepo {
    fn at(files: HashMap<String, PathBuf>, gated: bool) -> Self {
        StandInRepo { commits: vec![(COMMIT, files)], head: Arc::new(AtomicUsize::new(0)), gated }
    }

    /// The commit `rev` names (`main`: the head), and its files.
    fn revision(&self, rev: &str) -> Option<&(&'static str, HashMap<String, PathBuf>)> {
        match rev {
            "main" => self.commits.get(self.head.load(Ordering::SeqCst)),
            commit => self.commits.iter().find(|(id, _)| *id == commit),
        }
    }
}

/// The Hub stand-in: its address, the paths it was asked for (with the
/// byte range, if any), and whether to drop the next weights download
/// halfway.
struct StandIn {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    cut_next: Arc<AtomicBool>,
}

impl StandIn {
    fn start(repos: HashMap<String, StandInRepo>) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (requests, cut_next) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (repos, base, log, cut) = (Arc::new(repos), url.clone(), requests.clone(), cut_next.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, base, log, cut) = (repos.clone(), base.clone(), log.clone(), cut.clone());
                std::thread::spawn(move || {
                    let _ = answer(stream, &repos, &base, &log, &cut);
                });
            }
        });
        StandIn { url, requests, cut_next }
    }

    /// Requests for files' contents (not the one-byte probes of their
    /// commit and ETag).
    fn downloads(&self) -> usize {
        self.requests.lock().unwrap().iter().filter(|p| (p.contains("/resolve/") || p.starts_with("/cdn/")) && !p.ends_with("bytes=0-0")).count()
    }
}

fn answer(stream: TcpStream, repos: &HashMap<String, StandInRepo>, base: &str, log: &Mutex<Vec<String>>, cut: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        match line.trim_end().split_once(':') {
            Some((name, value)) => headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string()),
            None => break,
        };
    }
    log.lock().unwrap().push(format!("{path} {}", headers.get("range").map_or("", String::as_str)));
    let mut out = stream;
    let status = |out: &mut TcpStream, code: &str| write!(out, "HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");

    if let Some(rest) = path.strip_prefix("/cdn/") {
        // A signed CDN address: no token asked.
        let (repo, rest) = split_repo(rest);
        let (commit, file) = rest.split_once('/').unwrap_or_default();
        // A connection dropped halfway through a whole-file download.
        let whole = headers.get("range").is_some_and(|r| r.ends_with('-'));
        let cut = whole && cut.swap(false, Ordering::SeqCst);
        return match repos.get(&repo).and_then(|r| r.revision(commit)).and_then(|(_, files)| files.get(file)) {
            Some(local) => send_ranged(&mut out, local, &headers, &[], cut),
            None => status(&mut out, "404 Not Found"),
        };
    }
    let api = path.strip_prefix("/api/models/");
    let (repo, rest) = split_repo(api.unwrap_or(path.trim_start_matches('/')));
    let Some(r) = repos.get(&repo) else { return status(&mut out, "404 Not Found") };
    if r.gated && headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        return status(&mut out, "401 Unauthorized");
    }
    if api.is_some() {
        let Some((commit, files)) = rest.strip_prefix("revision/").and_then(|rev| r.revision(rev)) else { return status(&mut out, "404 Not Found") };
        let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo, "sha": commit, "siblings": siblings }).to_string();
        return write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    }
    let Some((rev, file)) = rest.strip_prefix("resolve/").and_then(|r| r.split_once('/')) else { return status(&mut out, "404 Not Found") };
    let Some((commit, local)) = r.revision(rev).and_then(|(commit, files)| Some((commit, files.get(file)?))) else { return status(&mut out, "404 Not Found") };
    let hash = fetch::sha256_file(local).unwrap();
    if file.ends_with(".safetensors") || file.ends_with(".gguf") {
        // Large files live in LFS: the Hub redirects to a CDN, naming the
        // commit and the content's sha256.
        return write!(
            out,
            "HTTP/1.1 302 Found\r\nLocation: {base}/cdn/{repo}/{commit}/{file}\r\nX-Repo-Commit: {commit}\r\nX-Linked-Etag: \"{hash}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    // Small files: a git blob id; the content's hash stands in for it.
    send_ranged(&mut out, local, &headers, &[("X-Repo-Commit", commit.to_string()), ("ETag", format!("\"{}\"", &hash[..40]))], false)
}

/// `OWNER/NAME/rest` as (`OWNER/NAME`, `rest`).
fn split_repo(path: &str) -> (String, &str) {
    let mut parts = path.splitn(3, '/');
    let (owner, name, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    (format!("{owner}/{name}"), rest)
}

/// The file, or the byte range the request asks for; `cut`: only the first
/// half of it, then the connection closes.
fn send_ranged(out: &mut TcpStream, local: &Path, headers: &HashMap<String, String>, extra: &[(&str, String)], cut: bool) -> std::io::Result<()> {
    let mut file = std::fs::File::open(local)?;
    let size = file.metadata()?.len();
    let range = headers.get("range").and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-'));
    let (start, end) = match range {
        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap_or(size - 1).min(size - 1)),
        None => (0, size - 1),
    };
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{size}\r\nConnection: close\r\n", end + 1 - start)?;
    for (name, value) in extra {
        write!(out, "{name}: {value}\r\n")?;
    }
    write!(out, "\r\n")?;
    file.seek(SeekFrom::Start(start))?;
    let len = if cut { (end + 1 - start) / 2 } else { end + 1 - start };
    std::io::copy(&mut file.take(len), out)?;
    out.flush()
}

fn files_of(dir: &Path) -> HashMap<String, PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p)).collect()
}

fn hub(spec: &str) -> HubModel {
    HubModel::parse(spec).expect("an hf: spec").unwrap()
}

fn last_logits(model: &LoadedModel, text: &str) -> Vec<f32> {
    let tokens = model.tokenizer.encode(text).unwrap();
    let llama = &model.llama;
    let mut cache = llama.new_cache(llama.config().n_layers);
    llama.forward(&mut [SeqPass { cache: &mut cache, tokens: &tokens, logits: LogitsFor::Last }]).unwrap().remove(0).into_row(0)
}

#[test]
fn a_model_on_the_hub_is_fetched_into_the_hub_cache_once_and_loads() {
    let dir = scratch("hub");
    let spec = TinySpec { vocab: 60, hidden: 64, heads: 4, kv_heads: 2, ffn: 128, layers: 2, dtype: GgmlDType::Q8_0, head_gain: 1.0 };
    let gguf = tiny_llama(&dir, "tiny.gguf", &spec, 7);
    let target = LoadedModel::load(&gguf).unwrap();
    let single = files_of(&write_folder(&gguf, &dir.join("single"), &target, 1));
    let sharded = files_of(&write_folder(&gguf, &dir.join("sharded"), &target, 3));
    assert_eq!(sharded.keys().filter(|f| f.ends_with(".safetensors")).count(), 3);
    let with_gguf = |mut files: HashMap<String, PathBuf>| {
        files.insert("tiny.gguf".into(), gguf.clone());
        files
    };
    // A repo whose main moves on to a commit that changes only the chat
    // template.
    let mut retemplated = single.clone();
    let new_template = dir.join("tokenizer_config-next.json");
    std::fs::write(&new_template, r#"{"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}"#).unwrap();
    retemplated.insert("tokenizer_config.json".into(), new_template.clone());
    let moving_head = Arc::new(AtomicUsize::new(0));
    let moving = StandInRepo { commits: vec![(COMMIT, single.clone()), (NEXT_COMMIT, retemplated)], head: moving_head.clone(), gated: false };
    let stand_in = StandIn::start(HashMap::from([
        ("tandem-test/tiny".to_string(), StandInRepo::at(with_gguf(single.clone()), false)),
        ("tandem-test/tiny-sharded".to_string(), StandInRepo::at(sharded.clone(), false)),
        ("tandem-test/tiny-gguf".to_string(), StandInRepo::at(with_gguf(HashMap::new()), false)),
        ("tandem-test/tiny-gated".to_string(), StandInRepo::at(single.clone(), true)),
        ("tandem-test/tiny-moving".to_string(), moving),
    ]));
    let cache = dir.join("hf-cache");
    let options = HubOptions { endpoint: Some(stand_in.url.clone()), cache: Some(cache.clone()), ..HubOptions::default() };

    // A safetensors folder: every file in the cache's snapshot folder, byte
    // for byte, and it loads as the model it was written from.
    let folder = fetch(&hub("hf:tandem-test/tiny"), &options).unwrap();
    assert_eq!(folder, cache.join("models--tandem-test--tiny").join("snapshots").join(COMMIT));
    for (name, source) in &single {
        assert_eq!(std::fs::read(folder.join(name)).unwrap(), std::fs::read(source).unwrap(), "{name}");
    }
    assert_eq!(std::fs::read_to_string(cache.join("models--tandem-test--tiny/refs/main")).unwrap(), COMMIT);
    let model = LoadedModel::load(&folder).unwrap();
    assert_eq!(model.llama.config(), target.llama.config());
    let logits = last_logits(&model, "abcabd");

    // Shards: all of them, loading as the same weights; the first one's
    // connection drops halfway, and its download resumes from there.
    stand_in.cut_next.store(true, Ordering::SeqCst);
    let folder = fetch(&hub("hf:tandem-test/tiny-sharded"), &options).unwrap();
    assert!(!stand_in.cut_next.load(Ordering::SeqCst), "no download was cut");
    for (name, source) in &sharded {
        assert_eq!(std::fs::read(folder.join(name)).unwrap(), std::fs::read(source).unwrap(), "{name}");
    }
    let resumed = stand_in.requests.lock().unwrap().iter().any(|r| r.starts_with("/cdn/") && r.split("bytes=").nth(1).is_some_and(|b| !b.starts_with("0-")));
    assert!(resumed, "the cut download was not resumed with a ranged request");
    assert_eq!(last_logits(&LoadedModel::load(&folder).unwrap(), "abcabd"), logits);

    // One GGUF file of a repo, and a revision named by its commit.
    let file = fetch(&hub("hf:tandem-test/tiny/tiny.gguf"), &options).unwrap();
    assert_eq!(fetch::sha256_file(&file).unwrap(), fetch::sha256_file(&gguf).unwrap());
    let pinned = fetch(&hub(&format!("hf:tandem-test/tiny@{COMMIT}")), &options).unwrap();
    assert_eq!(pinned, cache.join("models--tandem-test--tiny").join("snapshots").join(COMMIT));

    // Fetched once: a second start asks for the file list, downloads nothing.
    let before = stand_in.downloads();
    fetch(&hub("hf:tandem-test/tiny"), &options).unwrap();
    fetch(&hub("hf:tandem-test/tiny/tiny.gguf"), &options).unwrap();
    assert_eq!(stand_in.downloads(), before, "a cached model was downloaded again");

    // The branch moves on to a commit that changes one file: the new
    // commit's snapshot is made, the unchanged files linked to the blobs
    // the cache holds (probed for their ETag, not downloaded), the changed
    // one downloaded; main's ref names the new commit, and the older
    // snapshot stays, whole, for a deployment pinned to it.
    assert!(single.contains_key("tokenizer_config.json"));
    let first = fetch(&hub("hf:tandem-test/tiny-moving"), &options).unwrap();
    let moving_repo = cache.join("models--tandem-test--tiny-moving");
    assert_eq!(first, moving_repo.join("snapshots").join(COMMIT));
    moving_head.store(1, Ordering::SeqCst);
    let before = stand_in.downloads();
    let (next, log) = logged(|| fetch(&hub("hf:tandem-test/tiny-moving"), &options).unwrap());
    assert_eq!(next, moving_repo.join("snapshots").join(NEXT_COMMIT));
    assert_eq!(stand_in.downloads() - before, 1, "only the changed file is downloaded");
    assert_eq!(log.matches("linked to the cached blob").count(), single.len() - 1, "{log}");
    assert_eq!(std::fs::read_to_string(moving_repo.join("refs/main")).unwrap(), NEXT_COMMIT);
    assert_eq!(std::fs::read(next.join("tokenizer_config.json")).unwrap(), std::fs::read(&new_template).unwrap());
    for (name, source) in single.iter().filter(|(name, _)| *name != "tokenizer_config.json") {
        assert_eq!(std::fs::read(next.join(name)).unwrap(), std::fs::read(source).unwrap(), "{name}");
        assert!(std::fs::symlink_metadata(next.join(name)).unwrap().file_type().is_symlink(), "{name}");
    }
    assert_eq!(last_logits(&LoadedModel::load(&next).unwrap(), "abcabd"), logits);
    let pinned = fetch(&hub(&format!("hf:tandem-test/tiny-moving@{COMMIT}")), &HubOptions { offline: true, ..options.clone() }).unwrap();
    assert_eq!(pinned, first);
    for (name, source) in &single {
        assert_eq!(std::fs::read(first.join(name)).unwrap(), std::fs::read(source).unwrap(), "{name}");
    }

    // Offline (HF_HUB_OFFLINE), or the Hub unreachable: the cache serves.
    let offline = HubOptions { offline: true, ..options.clone() };
    assert_eq!(fetch(&hub("hf:tandem-test/tiny-sharded"), &offline).unwrap(), folder);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let unreachable = HubOptions { endpoint: Some(format!("http://{closed}")), ..options.clone() };
    assert_eq!(fetch(&hub("hf:tandem-test/tiny-sharded"), &unreachable).unwrap(), folder);
    let err = fetch(&hub("hf:tandem-test/tiny-gguf"), &unreachable).unwrap_err().to_string();
    assert!(err.contains("unreachable") && err.contains("not in the cache"), "{err}");
    let err = fetch(&hub("hf:tandem-test/tiny-gguf"), &offline).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    // A gated repo needs a token; with one it serves.
    let err = fetch(&hub("hf:tandem-test/tiny-gated"), &options).unwrap_err().to_string();
    assert!(err.contains("HF_TOKEN"), "{err}");
    let with_token = HubOptions { token: Some(TOKEN.into()), ..options.clone() };
    LoadedModel::load(&fetch(&hub("hf:tandem-test/tiny-gated"), &with_token).unwrap()).unwrap();

    // What is not there is refused by name; a GGUF-only repo names its files.
    for (spec, needle) in [
        ("hf:tandem-test/absent", "not found"),
        ("hf:tandem-test/tiny/absent.gguf", "absent.gguf: not found"),
        ("hf:tandem-test/tiny@v9", "not found"),
        ("hf:tandem-test/tiny-gguf", "hf:OWNER/NAME/FILE.gguf (tiny.gguf)"),
    ] {
        let err = fetch(&hub(spec), &options).unwrap_err().to_string();
        assert!(err.starts_with(spec) && err.contains(needle), "{spec}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What `f` returns, and what it logged.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    (out, log)
}
