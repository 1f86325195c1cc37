//! gRPC client for a Tandem server, with resume: when a stream breaks
//! (server restart, network), the client reconnects with backoff and
//! re-opens the session with the prompt and every token accepted so far,
//! so nothing is lost or duplicated.

use crate::target::{RoundOutcome, Target};
use crate::EdgeError;
use std::time::{Duration, Instant};
use tandem_model::{SamplingParams, SparseDist, Verdict};
use tandem_protocol::limits::MAX_MESSAGE_BYTES;
use tandem_protocol::wire::{
    DraftMode, EdgeKind, EdgeMessage, Open, Sampling, ServerKind, ServerMessage, Slo, SparseDist as WireDist, Verify,
    VerifierClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{info, warn};

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub api_key: Option<String>,
    /// CA certificate (PEM) for `https` servers with a private CA.
    pub ca_cert: Option<Vec<u8>>,
    /// Latency objectives sent with every open, ms.
    pub ttft_ms: u32,
    pub tpot_ms: u32,
    /// Give up reconnecting after this long without success.
    pub reconnect_deadline: Duration,
}

impl ClientConfig {
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig { url: url.into(), api_key: None, ca_cert: None, ttft_ms: 0, tpot_ms: 0, reconnect_deadline: Duration::from_secs(60) }
    }
}

/// Codes after which a resume can succeed (the server went away or
/// dropped the session); everything else is the request's fault.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded)
}

struct Stream {
    tx: mpsc::Sender<EdgeMessage>,
    rx: Streaming<ServerMessage>,
    seq: u64,
}

/// One generation at a time against a server.
pub struct RemoteTarget {
    cfg: ClientConfig,
    rt: tokio::runtime::Runtime,
    stream: Option<Stream>,
    prompt_len: usize,
    sampling: SamplingParams,
    max_new_tokens: usize,
    /// Streams re-opened after a failure, over this target's life.
    pub resumes: usize,
}

impl RemoteTarget {
    pub fn new(cfg: ClientConfig) -> Result<Self, EdgeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EdgeError::Connect { url: cfg.url.clone(), reason: e.to_string() })?;
        Ok(RemoteTarget { cfg, rt, stream: None, prompt_len: 0, sampling: SamplingParams::default(), max_new_tokens: 0, resumes: 0 })
    }

    async fn channel(cfg: &ClientConfig) -> Result<Channel, EdgeError> {
        let err = |reason: String| EdgeError::Connect { url: cfg.url.clone(), reason };
        let mut endpoint = Endpoint::from_shared(cfg.url.clone()).map_err(|e| err(format!("bad --server URL: {e}")))?;
        endpoint = endpoint.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true);
        if cfg.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &cfg.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| err(e.to_string()))?;
        }
        endpoint.connect().await.map_err(|e| err(e.to_string()))
    }

    /// Opens a stream and sends `open`; returns the stream and `Opened`'s first token.
    async fn open_stream(cfg: &ClientConfig, open: Open) -> Result<(Stream, u32, bool), EdgeError> {
        let channel = Self::channel(cfg).await?;
        let mut client = VerifierClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open)) }).await.expect("fresh channel");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(key) = &cfg.api_key {
            let value = format!("Bearer {key}").parse().map_err(|_| EdgeError::InvalidArgument("`--api-key` has characters not allowed in a header".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = client.session(request).await.map_err(EdgeError::Server)?.into_inner();
        match inbound.message().await.map_err(EdgeError::Server)? {
            Some(ServerMessage { kind: Some(ServerKind::Opened(o)) }) => Ok((Stream { tx, rx: inbound, seq: 0 }, o.first_token, o.finished)),
            other => Err(EdgeError::Server(Status::internal(format!("expected `opened`, got {other:?}")))),
        }
    }

    fn open_message(&self, context: &[u32], server_only: bool) -> Open {
        Open {
            prompt: context.to_vec(),
            sampling: Some(Sampling {
                temperature: self.sampling.temperature,
                top_k: self.sampling.top_k as u32,
                top_p: self.sampling.top_p,
                seed: self.sampling.seed,
            }),
            slo: Some(Slo { ttft_ms: self.cfg.ttft_ms, tpot_ms: self.cfg.tpot_ms }),
            max_new_tokens: self.max_new_tokens as u32,
            draft_mode: if server_only { DraftMode::ServerOnly } else { DraftMode::Edge } as i32,
            resumed: (context.len() - self.prompt_len) as u32,
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the reconnect
    /// deadline passes; a retryable failure drops the stream so the next
    /// attempt resumes.
    fn with_resume<R>(&mut self, mut attempt: impl FnMut(&mut Self) -> Result<R, EdgeError>) -> Result<R, EdgeError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match attempt(self) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let again = match &e {
                        EdgeError::Server(s) => retryable(s),
                        EdgeError::Connect { .. } => true,
                        _ => false,
                    };
                    if !again || started.elapsed() > self.cfg.reconnect_deadline {
                        return Err(e);
                    }
                    warn!(error = %e, "stream lost; resuming in {backoff:?}");
                    self.stream = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Makes sure a stream is open for `context` (resuming if needed).
    fn ensure_stream(&mut self, context: &[u32], server_only: bool) -> Result<(), EdgeError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let open = self.open_message(context, server_only);
        let (stream, _, _) = self.rt.block_on(Self::open_stream(&self.cfg, open))?;
        self.stream = Some(stream);
        self.resumes += 1;
        info!(tokens = context.len(), "session resumed");
        Ok(())
    }

    /// Server-only generation: the server decodes; tokens stream back.
    pub fn generate_server_only(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize, mut on_token: impl FnMut(u32), eos: &[u32]) -> Result<Vec<u32>, EdgeError> {
        self.prompt_len = prompt.len();
        self.sampling = sampling.clone();
        self.max_new_tokens = max_new_tokens;
        let mut context = prompt.to_vec();
        let open = self.open_message(&context, true);
        let (first, finished) = self.with_resume(|t| {
            let (stream, first, finished) = t.rt.block_on(Self::open_stream(&t.cfg, open.clone()))?;
            t.stream = Some(stream);
            Ok((first, finished))
        })?;
        context.push(first);
        on_token(first);
        let mut done = finished || eos.contains(&first);
        while !done && context.len() - prompt.len() < max_new_tokens {
            let msg = self.with_resume(|t| {
                t.ensure_stream(&context, true)?;
                let stream = t.stream.as_mut().expect("ensured");
                match t.rt.block_on(stream.rx.message()) {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(EdgeError::Server(Status::unavailable("stream ended before the generation finished"))),
                    Err(s) => Err(EdgeError::Server(s)),
                }
            })?;
            let Some(ServerKind::Tokens(tokens)) = msg.kind else {
                return Err(EdgeError::Server(Status::internal("expected `tokens` in server-only mode")));
            };
            for t in tokens.tokens {
                context.push(t);
                on_token(t);
                done |= eos.contains(&t);
            }
            done |= tokens.finished;
        }
        Ok(context[prompt.len()..].to_vec())
    }
}

impl Target for RemoteTarget {
    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError> {
        self.prompt_len = prompt.len();
        self.sampling = sampling.clone();
        self.max_new_tokens = max_new_tokens;
        let open = self.open_message(prompt, false);
        self.with_resume(|t| {
            let (stream, first, _) = t.rt.block_on(Self::open_stream(&t.cfg, open.clone()))?;
            t.stream = Some(stream);
            Ok(first)
        })
    }

    fn verify(&mut self, context: &[u32], drafts: &[u32], q: &[SparseDist]) -> Result<RoundOutcome, EdgeError> {
        // The wire wants each distribution's ids ascending.
        let q: Vec<WireDist> = q
            .iter()
            .map(|d| {
                let mut pairs: Vec<(u32, f32)> = d.tokens.iter().copied().zip(d.probs.iter().copied()).collect();
                pairs.sort_by_key(|p| p.0);
                WireDist { ids: pairs.iter().map(|p| p.0).collect(), probs: pairs.iter().map(|p| p.1).collect() }
            })
            .collect();
        self.with_resume(|t| {
            t.ensure_stream(context, false)?;
            let stream = t.stream.as_mut().expect("ensured");
            stream.seq += 1;
            let msg = Verify { seq: stream.seq, base_len: context.len() as u32, draft: drafts.to_vec(), q: q.clone() };
            let reply = t.rt.block_on(async {
                stream
                    .tx
                    .send(EdgeMessage { kind: Some(EdgeKind::Verify(msg)) })
                    .await
                    .map_err(|_| Status::unavailable("stream closed"))?;
                stream.rx.message().await
            });
            match reply {
                Ok(Some(ServerMessage { kind: Some(ServerKind::Verdict(v)) })) => Ok(RoundOutcome {
                    verdict: Verdict { accepted: v.accepted as usize, next: v.next_token },
                    verified: (v.verified as usize).min(drafts.len()),
                    server_ms: Some(v.server_ms as f64),
                    hinted_verify_ms: v.hints.map(|h| h.est_verify_ms_by_k).unwrap_or_default(),
                }),
                Ok(Some(other)) => Err(EdgeError::Server(Status::internal(format!("expected a verdict, got {other:?}")))),
                Ok(None) => Err(EdgeError::Server(Status::unavailable("stream ended"))),
                Err(s) => Err(EdgeError::Server(s)),
            }
        })
    }
}
