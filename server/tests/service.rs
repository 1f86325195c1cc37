//! The verification service end to end: a real server process on loopback,
//! the real model, the real client library.

mod common;

use common::*;
use std::time::Duration;
use tandem_model::DraftSpec;
use tandem_protocol::wire::{EdgeKind, EdgeMessage, Open, Sampling, ServerKind, ServerMessage, SparseDist, Verify, VerifierClient};
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
        for draft in [DraftSpec::None, DraftSpec::Layers(25), DraftSpec::Ngram] {
            let g = remote(&server.url(), None, &draft, &req).unwrap();
            assert_eq!(g.tokens, reference, "{prompt:?} drafting with {draft}");
            assert_eq!(g.server_ms.len(), g.rounds, "one server time per round");
        }
        assert_eq!(remote_server_only(&server.url(), &req), reference, "{prompt:?} server-only");
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
    assert!(get("tandem_estimator_relative_error").is_some());
    let _ = std::fs::remove_file(tenants);
}

/// Sends `open`, waits for `opened` (if the open is accepted), then sends
/// `then` one message at a time; returns the messages received and the
/// final status (Ok when the stream ended cleanly).
fn raw(url: &str, key: Option<&str>, open: Open, then: impl Fn(&ServerMessage) -> Vec<EdgeMessage>) -> (Vec<ServerMessage>, Result<(), tonic::Status>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = VerifierClient::connect(url.to_string()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open)) }).await.unwrap();
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(k) = key {
            request.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        let mut inbound = match client.session(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (vec![], Err(s)),
        };
        let mut got = Vec::new();
        let mut queued: Vec<EdgeMessage> = Vec::new();
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
            match queued.pop() {
                Some(next) => tx.send(next).await.unwrap(),
                None => {
                    drop(tx);
                    // Drain to the end of the stream.
                    loop {
                        match inbound.message().await {
                            Ok(Some(m)) => got.push(m),
                            Ok(None) => return (got, Ok(())),
                            Err(s) => return (got, Err(s)),
                        }
                    }
                }
            }
        }
    })
}

fn open_msg(prompt: Vec<u32>, max_new: u32, temperature: f32) -> Open {
    Open { prompt, max_new_tokens: max_new, sampling: Some(Sampling { temperature, top_k: 0, top_p: 1.0, seed: 1 }), ..Default::default() }
}

fn verify(base_len: usize, draft: Vec<u32>, q: Vec<SparseDist>) -> EdgeMessage {
    EdgeMessage { kind: Some(EdgeKind::Verify(Verify { seq: 1, base_len: base_len as u32, draft, q })) }
}

fn expect_status(result: &Result<(), tonic::Status>, code: Code, needle: &str) {
    match result {
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(s.message().contains(needle), "status {:?} does not name {needle:?}", s.message());
        }
        Ok(()) => panic!("expected {code:?} naming {needle:?}, the stream ended cleanly"),
    }
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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = VerifierClient::connect(url.clone()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open_msg(prompt.clone(), 8, 0.0))) }).await.unwrap();
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert("authorization", "Bearer beta-key-456".parse().unwrap());
        let mut held = client.session(req).await.unwrap().into_inner();
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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = VerifierClient::connect(url).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open_msg(vec![1, 9690, 198], 8, 0.0))) }).await.unwrap();
        let mut inbound = client.session(tonic::Request::new(ReceiverStream::new(rx))).await.unwrap().into_inner();
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
fn client_resumes_after_the_server_is_killed_and_restarted() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let server = ServerProcess::start(&["--listen", &listen]);
    let url = server.url();
    let req = request("Write a short story about a robot learning to paint.", 64);
    let reference = local(&req);
    let (progress_tx, progress_rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn({
        let req = req.clone();
        move || {
            let m = model();
            let mut spec = tandem_edge::Speculator::new(client(&url, None), DraftSpec::Ngram.build(&m).unwrap(), m.tokenizer.clone());
            let mut n = 0;
            let g = spec.generate(&req, |_| {
                n += 1;
                let _ = progress_tx.send(n);
            });
            (g.map(|g| g.tokens), spec.target.resumes)
        }
    });
    // Kill the server mid-generation, then bring it back on the same port.
    while progress_rx.recv_timeout(Duration::from_secs(60)).expect("generation progresses") < 16 {}
    server.signal(9);
    drop(server);
    let _restarted = ServerProcess::start(&["--listen", &listen]);
    let (tokens, resumes) = worker.join().unwrap();
    assert_eq!(tokens.unwrap(), reference, "resumed output differs from an uninterrupted run");
    assert!(resumes >= 1, "the client never resumed");
}

#[test]
fn a_verify_without_an_open_session_is_not_found() {
    let server = ServerProcess::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
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

#[test]
fn an_idle_session_is_dropped_and_its_kv_reservation_freed() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = ServerProcess::start(&["--idle-ttl-s", "1", "--metrics-listen", &metrics_addr]);
    let reserved = || {
        parse_metrics(&scrape(&metrics_addr)).into_iter().find(|(n, _)| n == "tandem_kv_bytes_reserved").map(|(_, v)| v).unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = VerifierClient::connect(server.url()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open_msg(vec![1, 9690, 198], 16, 0.0))) }).await.unwrap();
        let mut inbound = client.session(tonic::Request::new(ReceiverStream::new(rx))).await.unwrap().into_inner();
        assert!(matches!(inbound.message().await.unwrap().unwrap().kind, Some(ServerKind::Opened(_))));
        assert!(reserved() > 0.0, "an open session holds a KV reservation");
        // Say nothing: the server ends the session after the TTL.
        let status = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("expiry").unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        drop(tx);
    });
    assert_eq!(reserved(), 0.0, "the expired session's KV reservation was not returned");
}

#[test]
fn tls_serves_https_clients_and_refuses_plaintext() {
    let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    // A self-signed leaf certificate for localhost / 127.0.0.1.
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (installed by .ci/run)");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let server = ServerProcess::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let req = request("Name a colour.", 8);
    let mut cfg = tandem_edge::client::ClientConfig::new(format!("https://localhost:{port}"));
    cfg.ca_cert = Some(std::fs::read(&cert).unwrap());
    let m = model();
    let tls = tandem_edge::Speculator::new(tandem_edge::client::RemoteTarget::new(cfg).unwrap(), DraftSpec::Ngram.build(&m).unwrap(), m.tokenizer.clone())
        .generate(&req, |_| {})
        .unwrap();
    assert_eq!(tls.tokens, local(&req));
    // A plaintext client gets no session.
    let (_, status) = raw(&server.url(), None, open_msg(vec![1, 9690, 198], 2, 0.0), |_| vec![]);
    assert!(status.is_err(), "a plaintext client was served over a TLS port");
    let _ = std::fs::remove_dir_all(dir);
}
