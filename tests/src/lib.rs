//! The end-to-end harness: a real `tandem-server` process on loopback,
//! the real model and client library, and raw protocol streams for the
//! cases the client library would never send.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;
use tandem_edge::client::{ClientConfig, RemoteTarget};
use tandem_edge::{GenerateRequest, Generation, LocalTarget, Speculator};
use tandem_model::{fetch, DraftSpec, LoadedModel, SamplingParams};
use tandem_protocol::wire::{EdgeKind, EdgeMessage, Handoff, Open, Sampling, ServerMessage, SparseDist, VerifierClient, Verify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

pub use tandem_server::process::ServerProcess;

/// A binary of this workspace's build (cargo builds `tandem-server` and
/// `tandem-edge` for their packages' integration tests, so a
/// `cargo test --workspace` has both).
pub fn workspace_binary(name: &str) -> PathBuf {
    tandem_server::process::sibling_binary(name).unwrap_or_else(|e| panic!("{e}"))
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
        logprobs: None,
    }
}

/// Plain target decoding in this process: the reference output.
pub fn local(req: &GenerateRequest) -> Vec<u32> {
    local_with(&DraftSpec::None, req).tokens
}

/// Drafting with `draft` against the target in this process.
pub fn local_with(draft: &DraftSpec, req: &GenerateRequest) -> Generation {
    let m = model();
    Speculator::new(LocalTarget::new(m.clone()), draft.build(&m).unwrap(), m.tokenizer.clone()).generate(req, |_| {}).unwrap()
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
    let stop = req.sampling.stop_tokens(m.tokenizer.eos_tokens());
    client(url, None).generate_server_only(&req.prompt, &req.sampling, req.max_new_tokens, |_| {}, stop).unwrap()
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

pub fn write_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tandem-test-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// Resident memory of a process, bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("VmRSS");
    kb * 1024
}

/// One named value of a metrics scrape.
pub fn metric(metrics: &[(String, f64)], name: &str) -> Option<f64> {
    metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// A current-thread runtime for raw protocol work inside a sync test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Opens a raw stream: sends `open` first, with `key` as bearer token.
/// Returns the sender for further messages and the inbound stream (or the
/// status the call was refused with).
pub async fn open_raw(
    url: &str,
    key: Option<&str>,
    open: Open,
) -> Result<(tokio::sync::mpsc::Sender<EdgeMessage>, tonic::Streaming<ServerMessage>), tonic::Status> {
    let mut client = VerifierClient::connect(url.to_string()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open)) }).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(k) = key {
        request.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    Ok((tx, client.session(request).await?.into_inner()))
}

/// Sends `open`, waits for the first answer, then sends `then` one message
/// per answer; returns the messages received and the final status (Ok when
/// the stream ended cleanly).
pub fn raw(url: &str, key: Option<&str>, open: Open, then: impl Fn(&ServerMessage) -> Vec<EdgeMessage>) -> (Vec<ServerMessage>, Result<(), tonic::Status>) {
    runtime().block_on(async {
        let (tx, mut inbound) = match open_raw(url, key, open).await {
            Ok(s) => s,
            Err(s) => return (vec![], Err(s)),
        };
        let mut got = Vec::new();
        let mut queued: Vec<EdgeMessage> = Vec::new();
        let mut tx = Some(tx);
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await.expect("server answered in time") {
                Ok(Some(m)) => m,
                Ok(None) => return (got, Ok(())),
                Err(s) => return (got, Err(s)),
            };
            if got.is_empty() {
                queued = then(&msg);
                queued.reverse();
            }
            got.push(msg);
            match (queued.pop(), &tx) {
                (Some(next), Some(sender)) => sender.send(next).await.unwrap(),
                // Nothing more to say: half-close and read to the end.
                _ => tx = None,
            }
        }
    })
}

pub fn open_msg(prompt: Vec<u32>, max_new: u32, temperature: f32) -> Open {
    Open {
        prompt,
        max_new_tokens: max_new,
        sampling: Some(Sampling { temperature, top_k: 0, top_p: 1.0, seed: 1, ..Default::default() }),
        ..Default::default()
    }
}

pub fn verify(base_len: usize, draft: Vec<u32>, q: Vec<SparseDist>) -> EdgeMessage {
    EdgeMessage { kind: Some(EdgeKind::Verify(Verify { seq: 1, base_len: base_len as u32, draft, q })) }
}

pub fn handoff(base_len: usize) -> EdgeMessage {
    EdgeMessage { kind: Some(EdgeKind::Handoff(Handoff { base_len: base_len as u32 })) }
}

pub fn expect_status(result: &Result<(), tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(needle), "status {:?} does not name {needle:?}", s.message());
        }
        Ok(()) => panic!("expected {code:?} naming {needle:?}, the stream ended cleanly"),
    }
}

/// Debian's nginx in front of replicas, with `deploy/nginx/tandem.conf`
/// (its listen address and upstream servers swapped for the test's),
/// running unprivileged under its own prefix.
pub struct Nginx {
    child: Child,
    pub addr: String,
    prefix: PathBuf,
}

impl Nginx {
    pub fn start(replicas: &[&str]) -> Self {
        let binary = std::env::var_os("TANDEM_NGINX").map(PathBuf::from).unwrap_or_else(|| {
            ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .expect("nginx is not installed (.ci/run installs Debian's nginx; or set TANDEM_NGINX)")
        });
        let template = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nginx/tandem.conf")).expect("deploy/nginx/tandem.conf");
        let addr = format!("127.0.0.1:{}", free_port());
        let servers: String = replicas.iter().map(|r| format!("        server {r} max_fails=1 fail_timeout=10s;\n")).collect();
        let mut conf = String::new();
        let mut upstream_done = false;
        for line in template.lines() {
            if line.trim_start().starts_with("server 127.0.0.1:") {
                if !upstream_done {
                    conf.push_str(&servers);
                    upstream_done = true;
                }
                continue;
            }
            conf.push_str(&line.replace("listen 127.0.0.1:50050", &format!("listen {addr}")));
            conf.push('\n');
            if line.starts_with("worker_processes") {
                // One process, so killing it leaves no workers behind.
                conf.push_str("master_process off;\n");
            }
        }
        let prefix = std::env::temp_dir().join(format!("tandem-nginx-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(prefix.join("temp")).unwrap();
        // Workers run as `nobody` when the master is root.
        let _ = Command::new("chmod").arg("-R").arg("a+rwx").arg(&prefix).status();
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        // Its log (failovers are logged as errors) goes to the prefix.
        let log = std::fs::File::create(prefix.join("error.log")).unwrap();
        let child = Command::new(binary).arg("-p").arg(&prefix).arg("-c").arg(prefix.join("nginx.conf")).stderr(log).spawn().expect("start nginx");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start listening on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, addr, prefix }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}
