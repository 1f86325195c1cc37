//! Scale-out: two `tandem-server` replicas behind Debian's nginx with
//! `deploy/nginx/tandem.conf` (consistent hash on the session's routing
//! key), the real client library and model.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tandem_edge::client::{ClientConfig, RemoteTarget, ROUTING_HEADER};
use tandem_edge::Speculator;
use tandem_model::DraftSpec;
use tandem_protocol::wire::ServerKind;
use tandem_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

struct Replica {
    server: ServerProcess,
    metrics: String,
}

fn replica(extra: &[&str]) -> Replica {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics-listen", &metrics];
    args.extend_from_slice(extra);
    Replica { server: ServerProcess::start(&args), metrics }
}

fn opened(r: &Replica) -> f64 {
    parse_metrics(&scrape(&r.metrics)).iter().filter(|(n, _)| n.starts_with("tandem_sessions_opened_total")).map(|(_, v)| v).sum()
}

/// Which replica a routing key lands on: a one-token session through the
/// proxy, then which replica counted it.
fn route_of(proxy: &str, key: &str, replicas: &[&Replica]) -> usize {
    let before: Vec<f64> = replicas.iter().map(|r| opened(r)).collect();
    runtime().block_on(async {
        let mut client = tandem_protocol::wire::VerifierClient::connect(proxy.to_string()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(tandem_protocol::wire::EdgeMessage { kind: Some(tandem_protocol::wire::EdgeKind::Open(open_msg(vec![1, 9690, 198], 1, 0.0))) }).await.unwrap();
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert(ROUTING_HEADER, key.parse().unwrap());
        let mut inbound = client.session(req).await.unwrap().into_inner();
        assert!(matches!(inbound.message().await.unwrap().unwrap().kind, Some(ServerKind::Opened(_))));
    });
    let after: Vec<f64> = replicas.iter().map(|r| opened(r)).collect();
    (0..replicas.len()).find(|&i| after[i] > before[i]).expect("no replica counted the session")
}

fn client_via(url: &str, key: Option<&str>) -> RemoteTarget {
    let mut cfg = ClientConfig::new(url);
    (cfg.ttft_ms, cfg.tpot_ms) = (10_000, 2_000);
    cfg.routing_key = key.map(str::to_string);
    RemoteTarget::new(cfg).unwrap()
}

#[test]
fn scale_out_sessions_survive_a_replica_killed_behind_nginx() {
    let (a, b) = (replica(&[]), replica(&[]));
    let nginx = Nginx::start(&[&a.server.addr, &b.server.addr]);
    // Four keys for each replica, found through the proxy itself.
    let mut keys: HashMap<usize, Vec<String>> = HashMap::new();
    for i in 0..64 {
        let key = format!("session-{i}");
        let r = route_of(&nginx.url(), &key, &[&a, &b]);
        if keys.entry(r).or_default().len() < 4 {
            keys.get_mut(&r).unwrap().push(key);
        }
        if keys.values().all(|k| k.len() == 4) && keys.len() == 2 {
            break;
        }
    }
    assert!(keys.len() == 2 && keys.values().all(|k| k.len() == 4), "the proxy does not spread keys over both replicas: {keys:?}");
    let prompts = [
        "Name three planets.",
        "Write a haiku about rain.",
        "Explain how a bicycle works.",
        "Give me a tip for learning to cook.",
        "Why is the sky blue?",
        "Suggest a name for a cat.",
        "What is the capital of France?",
        "List five uses of a paperclip.",
    ];
    let routed: Vec<(String, &str)> = keys[&0].iter().chain(&keys[&1]).cloned().zip(prompts).collect();
    let (progress_tx, progress_rx) = std::sync::mpsc::channel();
    let sessions: Vec<_> = routed
        .iter()
        .map(|(key, prompt)| {
            let (url, key, req, progress) = (nginx.url(), key.clone(), request(prompt, 48), progress_tx.clone());
            std::thread::spawn(move || {
                let m = model();
                let mut spec = Speculator::new(client_via(&url, Some(&key)), DraftSpec::Ngram.build(&m).unwrap(), m.tokenizer.clone());
                let g = spec.generate(&req, |_| {
                    let _ = progress.send(());
                });
                (req, g.map(|g| g.tokens), spec.target.resumes)
            })
        })
        .collect();
    drop(progress_tx);
    // Both replicas busy, then one dies.
    let start = Instant::now();
    let mut tokens = 0;
    while tokens < 40 {
        progress_rx.recv_timeout(Duration::from_secs(120)).expect("sessions progress");
        tokens += 1;
    }
    a.server.signal(9);
    let mut resumes = 0;
    for s in sessions {
        let (req, out, r) = s.join().unwrap();
        assert_eq!(out.expect("a session failed after the replica died"), local(&req), "output changed by the failover");
        resumes += r;
    }
    assert!(resumes >= 1, "no session resumed on the surviving replica");
    eprintln!("scale_out: 8 sessions over 2 replicas, one killed after {tokens} tokens; {resumes} resumes; {:.1} s", start.elapsed().as_secs_f64());
    drop(b);
}

#[test]
fn scale_out_draining_replica_reports_not_serving_and_gets_no_new_sessions() {
    let (a, b) = (replica(&["--drain-s", "6"]), replica(&[]));
    let nginx = Nginx::start(&[&a.server.addr, &b.server.addr]);
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(a.server.url()).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel);
        let status = |service: &str| HealthCheckRequest { service: service.to_string() };
        for service in ["", "tandem.v1.Verifier"] {
            let s = health.check(status(service)).await.unwrap().into_inner().status;
            assert_eq!(s, ServingStatus::Serving as i32, "{service:?} not SERVING once started");
        }
        // A session open on A when the drain starts.
        let prompt = vec![1u32, 9690, 198, 19556, 2, 198];
        let (tx, mut held) = open_raw(&a.server.url(), None, open_msg(prompt.clone(), 16, 0.0)).await.unwrap();
        let Some(ServerKind::Opened(o)) = held.message().await.unwrap().unwrap().kind else { panic!("open failed") };
        a.server.signal(15);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = health.check(status("")).await.unwrap().into_inner().status;
            if s == ServingStatus::NotServing as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "a draining replica still reports SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = health.check(status("tandem.v1.Verifier")).await.unwrap().into_inner().status;
        assert_eq!(s, ServingStatus::NotServing as i32);
        // New sessions through the proxy all land on B while A drains.
        let (a_before, b_before) = (opened(&a), opened(&b));
        let url = nginx.url();
        let reqs: Vec<_> = ["Name a fruit.", "Name a colour.", "Name a river.", "Name a tree."].iter().map(|p| request(p, 6)).collect();
        let outputs = tokio::task::spawn_blocking(move || {
            reqs.into_iter()
                .map(|req| {
                    let m = model();
                    let g = Speculator::new(client_via(&url, None), DraftSpec::Ngram.build(&m).unwrap(), m.tokenizer.clone()).generate(&req, |_| {}).unwrap();
                    (req, g.tokens)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for (req, out) in outputs {
            assert_eq!(out, local(&req));
        }
        assert_eq!(opened(&a), a_before, "the draining replica took new sessions");
        assert_eq!(opened(&b), b_before + 4.0, "the other replica did not take them");
        // The session open on A carries on while A drains.
        tx.send(verify(prompt.len() + 1, vec![o.first_token], vec![])).await.unwrap();
        assert!(matches!(held.message().await.unwrap().unwrap().kind, Some(ServerKind::Verdict(_))), "the draining replica dropped its open session");
        drop(tx);
    });
}
