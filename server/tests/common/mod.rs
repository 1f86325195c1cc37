//! A real `tandem-server` process on loopback, and helpers to talk to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::{GenerateRequest, Generation, LocalTarget, Speculator};
use tandem_model::{fetch, DraftSpec, LoadedModel, SamplingParams};

pub struct ServerProcess {
    pub child: Child,
    pub addr: String,
}

impl ServerProcess {
    /// Starts the server with `args` (plus `--listen 127.0.0.1:0` unless
    /// given) and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-server"));
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tandem-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server did not start listening");
        ServerProcess { child, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a signal by number (15 = SIGTERM, 9 = SIGKILL).
    pub fn signal(&self, sig: i32) {
        Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn model() -> LoadedModel {
    static MODEL: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&fetch::ensure_default_model(false).unwrap()).unwrap()).clone()
}

pub fn request(prompt: &str, max_new_tokens: usize) -> GenerateRequest {
    let m = model();
    GenerateRequest {
        prompt: m.tokenizer.encode(&m.tokenizer.chat_prompt(prompt)).unwrap(),
        max_new_tokens,
        draft_len: 4,
        sampling: SamplingParams::default(),
    }
}

/// Plain target decoding in this process: the reference output.
pub fn local(req: &GenerateRequest) -> Vec<u32> {
    let m = model();
    Speculator::new(LocalTarget::new(m.clone()), DraftSpec::None.build(&m).unwrap(), m.tokenizer.clone()).generate(req, |_| {}).unwrap().tokens
}

pub fn client(url: &str, api_key: Option<&str>) -> RemoteTarget {
    let mut cfg = ClientConfig::new(url);
    cfg.api_key = api_key.map(str::to_string);
    // Objectives generous enough for a loaded 2-core CI machine.
    (cfg.ttft_ms, cfg.tpot_ms) = (5_000, 1_000);
    RemoteTarget::new(cfg).unwrap()
}

/// Drafting with `draft` against the server.
pub fn remote(url: &str, api_key: Option<&str>, draft: &DraftSpec, req: &GenerateRequest) -> Result<Generation, tandem_edge::EdgeError> {
    let m = model();
    Speculator::new(client(url, api_key), draft.build(&m).unwrap(), m.tokenizer.clone()).generate(req, |_| {})
}

/// Server-only decoding.
pub fn remote_server_only(url: &str, req: &GenerateRequest) -> Vec<u32> {
    let m = model();
    client(url, None).generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, |_| {}, m.tokenizer.eos_tokens()).unwrap()
}

/// `GET /metrics` over plain HTTP/1.1.
pub fn scrape(addr: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// Parses Prometheus text into (name with labels, value).
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad metrics line {l:?}"));
            (name.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn write_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tandem-server-test-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}
