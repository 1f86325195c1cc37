//! gRPC client for a Tandem server, with resume: when a stream breaks
//! (server restart, network), the client reconnects with backoff and
//! re-opens the session with the prompt and every token accepted so far,
//! so nothing is lost or duplicated.

use crate::controller::RoundHints;
use crate::target::{Decoded, Emitted, LogprobInbox, RoundOutcome, Target, TargetFeatures};
use crate::EdgeError;
use std::time::{Duration, Instant};
use tandem_model::{SamplingParams, SparseDist, TokenLogprob, TopLogprob, Verdict};
use tandem_protocol::features;
use tandem_protocol::limits::MAX_MESSAGE_BYTES;
use tandem_protocol::wire::{
    DraftMode, EdgeKind, EdgeMessage, Handoff, Open, Opened, Sampling, ServerKind, ServerMessage, Slo, SparseDist as WireDist, TokenLogprob as WireLogprob,
    VerifierClient, Verify,
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
    /// Routing key of the next generation (`x-tandem-session`); None draws
    /// a random one per generation. After a failed open a random key is
    /// drawn either way.
    pub routing_key: Option<String>,
}

impl ClientConfig {
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig { url: url.into(), api_key: None, ca_cert: None, ttft_ms: 0, tpot_ms: 0, reconnect_deadline: Duration::from_secs(60), routing_key: None }
    }
}

/// Codes after which a resume can succeed (the server went away or
/// dropped the session); everything else is the request's fault. An
/// `INTERNAL` status made by the transport itself (it carries the h2 error
/// as its source: a proxy reset the stream when its replica died) is a lost
/// connection too; one sent by a server is not.
fn retryable(status: &Status) -> bool {
    use std::error::Error;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::DeadlineExceeded => true,
        Code::Internal => status.source().is_some(),
        _ => false,
    }
}

/// Header carrying a session's routing key, for proxies that hash on it
/// (see `deploy/nginx/tandem.conf`).
pub const ROUTING_HEADER: &str = "x-tandem-session";

/// A fresh random routing key.
fn new_routing_key() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:016x}", tandem_model::SessionRng::new(seed).next_u64())
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
    /// Sent with every stream of a generation so a consistent-hash proxy
    /// keeps them on one replica; replaced when an open fails, so a
    /// session refused by a draining or dead replica lands on another.
    routing_key: String,
    /// Streams re-opened after a failure, over this target's life.
    pub resumes: usize,
    /// Ask for the target's hidden states (EAGLE-style drafts).
    want_features: bool,
    /// States received and not yet taken by the draft.
    features: Option<TargetFeatures>,
    /// Which log-probabilities to ask for; those received with `opened`
    /// and verdicts, and the prompt's, not yet taken.
    logprobs: LogprobInbox,
    /// A stream has been opened once: from then on an unreachable server
    /// is waited for (it may be restarting); before, it is reported at
    /// once (a wrong URL or a server that is not running).
    reached: bool,
}

impl RemoteTarget {
    pub fn new(cfg: ClientConfig) -> Result<Self, EdgeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EdgeError::Connect { url: cfg.url.clone(), reason: e.to_string() })?;
        Ok(RemoteTarget {
            cfg,
            rt,
            stream: None,
            prompt_len: 0,
            sampling: SamplingParams::default(),
            max_new_tokens: 0,
            routing_key: new_routing_key(),
            resumes: 0,
            want_features: false,
            features: None,
            logprobs: LogprobInbox::default(),
            reached: false,
        })
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

    /// Opens a stream with this generation's routing key; a failed open
    /// draws a new key for the next attempt.
    fn open_stream(&mut self, open: Open) -> Result<(Stream, u32, bool), EdgeError> {
        // The server prefills the prompt, or all but the last resumed token.
        let prefilled = open.prompt.len() - usize::from(open.resumed > 0);
        let result = self.rt.block_on(Self::open_stream_with(&self.cfg, &self.routing_key, open));
        match result {
            Ok((stream, opened, prompt_logprobs)) => {
                self.reached = true;
                let start = opened.features_start as usize;
                self.receive_features(start, prefilled.saturating_sub(start), &opened.features)?;
                self.logprobs.generated.extend(opened.logprobs.into_iter().map(from_wire));
                if !prompt_logprobs.is_empty() {
                    self.logprobs.prompt = prompt_logprobs;
                }
                Ok((stream, opened.first_token, opened.finished))
            }
            Err(e) => {
                self.routing_key = new_routing_key();
                Err(e)
            }
        }
    }

    /// Keeps states the server sent (a resumed stream restates them from
    /// its prompt on).
    fn receive_features(&mut self, start: usize, rows: usize, bytes: &[u8]) -> Result<(), EdgeError> {
        if !self.want_features || bytes.is_empty() {
            return Ok(());
        }
        let values = features::decode(bytes).filter(|v| rows > 0 && v.len() % rows == 0);
        let values =
            values.ok_or_else(|| EdgeError::Server(Status::internal(format!("`features`: {} bytes are not {rows} rows of half floats", bytes.len()))))?;
        TargetFeatures::merge(&mut self.features, TargetFeatures { start, rows, values });
        Ok(())
    }

    /// Opens a stream and sends `open`; returns the stream, `Opened` and
    /// the prompt's log-probabilities that came before it.
    async fn open_stream_with(cfg: &ClientConfig, routing_key: &str, open: Open) -> Result<(Stream, Opened, Vec<TokenLogprob>), EdgeError> {
        let channel = Self::channel(cfg).await?;
        let mut client = VerifierClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        tx.send(EdgeMessage { kind: Some(EdgeKind::Open(open)) }).await.expect("fresh channel");
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let key = routing_key.parse().map_err(|_| EdgeError::InvalidArgument("the routing key has characters not allowed in a header".into()))?;
        request.metadata_mut().insert(ROUTING_HEADER, key);
        if let Some(key) = &cfg.api_key {
            let value = format!("Bearer {key}").parse().map_err(|_| EdgeError::InvalidArgument("`--api-key` has characters not allowed in a header".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = client.session(request).await.map_err(EdgeError::Server)?.into_inner();
        let mut prompt_logprobs = vec![];
        loop {
            match inbound.message().await.map_err(EdgeError::Server)? {
                Some(ServerMessage { kind: Some(ServerKind::PromptLogprobs(p)) }) => prompt_logprobs.extend(p.logprobs.into_iter().map(from_wire)),
                Some(ServerMessage { kind: Some(ServerKind::Opened(o)) }) => return Ok((Stream { tx, rx: inbound, seq: 0 }, o, prompt_logprobs)),
                other => return Err(EdgeError::Server(Status::internal(format!("expected `opened`, got {other:?}")))),
            }
        }
    }

    fn open_message(&self, context: &[u32], server_only: bool) -> Open {
        Open {
            prompt: context.to_vec(),
            sampling: Some(Sampling {
                temperature: self.sampling.temperature,
                top_k: self.sampling.top_k as u32,
                top_p: self.sampling.top_p,
                min_p: self.sampling.min_p,
                seed: self.sampling.seed,
                frequency_penalty: self.sampling.penalties.frequency,
                presence_penalty: self.sampling.penalties.presence,
                repetition_penalty: self.sampling.penalties.repetition,
                logit_bias: self.sampling.logit_bias.iter().copied().collect(),
                // Resolved here, so the list holds the end-of-sequence
                // tokens, and the server's own are ignored.
                stop_token_ids: self.sampling.stop.as_ref().map_or(vec![], |s| s.tokens.clone()),
                ignore_eos: self.sampling.stop.is_some(),
                min_tokens: self.sampling.stop.as_ref().map_or(0, |s| s.min_tokens as u32),
                json_object: self.sampling.json_object.as_ref().is_some_and(|j| j.is_object()),
                json_schema: self.sampling.json_object.as_ref().and_then(|j| j.schema()).map_or(String::new(), |s| s.source().to_string()),
                regex: self.sampling.json_object.as_ref().and_then(|j| j.regex()).map_or(String::new(), |r| r.source().to_string()),
                grammar: self.sampling.json_object.as_ref().and_then(|j| j.grammar()).map_or(String::new(), |g| g.source().to_string()),
            }),
            slo: Some(Slo { ttft_ms: self.cfg.ttft_ms, tpot_ms: self.cfg.tpot_ms }),
            max_new_tokens: self.max_new_tokens as u32,
            draft_mode: if server_only { DraftMode::ServerOnly } else { DraftMode::Edge } as i32,
            resumed: (context.len() - self.prompt_len) as u32,
            want_features: self.want_features && !server_only,
            want_logprobs: self.logprobs.wanted.is_some(),
            top_logprobs: self.logprobs.wanted.map_or(0, |w| w.top) as u32,
            // A resumed stream's prompt was reported by the first.
            want_prompt_logprobs: self.logprobs.wanted.is_some_and(|w| w.prompt) && context.len() == self.prompt_len,
        }
    }

    /// A new generation: its parameters and its own routing key.
    fn start(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) {
        self.prompt_len = prompt.len();
        self.sampling = sampling.clone();
        self.max_new_tokens = max_new_tokens;
        self.routing_key = self.cfg.routing_key.clone().unwrap_or_else(new_routing_key);
        self.features = None;
        self.logprobs.generated.clear();
        self.logprobs.prompt.clear();
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
                        EdgeError::Connect { .. } => self.reached,
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
        let (stream, _, _) = self.open_stream(open)?;
        self.stream = Some(stream);
        self.resumes += 1;
        info!(tokens = context.len(), "session resumed");
        Ok(())
    }

    /// Asks the server to decode the session from `context` on.
    fn send_handoff(&mut self, context: &[u32]) -> Result<(), EdgeError> {
        let stream = self.stream.as_mut().expect("a stream is open");
        let msg = Handoff { base_len: context.len() as u32 };
        self.rt
            .block_on(stream.tx.send(EdgeMessage { kind: Some(EdgeKind::Handoff(msg)) }))
            .map_err(|_| EdgeError::Server(Status::unavailable("stream closed")))
    }

    /// Makes sure a stream is open on which the session is handed off:
    /// a lost one resumes as a drafting session and hands off at once.
    /// (Resuming in server-only mode, as before stop 50, left the session
    /// on the server for good: it cannot tell such a session has a draft.)
    fn ensure_handed_off(&mut self, context: &[u32]) -> Result<(), EdgeError> {
        if self.stream.is_some() {
            return Ok(());
        }
        self.ensure_stream(context, false)?;
        self.send_handoff(context)
    }

    /// Server-only generation: the server decodes; tokens stream back.
    pub fn generate_server_only(
        &mut self,
        prompt: &[u32],
        sampling: &SamplingParams,
        max_new_tokens: usize,
        mut on_token: impl FnMut(Emitted),
        eos: &[u32],
    ) -> Result<Vec<u32>, EdgeError> {
        self.start(prompt, sampling, max_new_tokens);
        let mut context = prompt.to_vec();
        let open = self.open_message(&context, true);
        let (first, finished) = self.with_resume(|t| {
            let (stream, first, finished) = t.open_stream(open.clone())?;
            t.stream = Some(stream);
            Ok((first, finished))
        })?;
        context.push(first);
        let first_logprob = self.take_logprobs().pop();
        on_token(Emitted { token: first, logprob: first_logprob.as_ref() });
        if !finished && !eos.contains(&first) {
            // Sessions opened in server-only mode are never handed back.
            self.receive_decoded(&mut context, false, &mut on_token, eos, &|| false)?;
        }
        Ok(context[prompt.len()..].to_vec())
    }

    /// Reads the tokens the server decodes until the generation ends,
    /// `stop` says so or the server hands the session back (then returns
    /// true), appending them to `context`. If the stream is lost it
    /// resumes as it was opened: a session the edge handed off reopens as
    /// a drafting one and hands off again, so the new server may hand it
    /// back; a server-only one reopens in server-only mode. Stopping
    /// closes the stream, which ends the session on the server.
    fn receive_decoded(
        &mut self,
        context: &mut Vec<u32>,
        handed_off: bool,
        on_token: &mut dyn FnMut(Emitted),
        eos: &[u32],
        stop: &dyn Fn() -> bool,
    ) -> Result<bool, EdgeError> {
        let mut done = false;
        while !done && context.len() - self.prompt_len < self.max_new_tokens {
            if stop() {
                self.stream = None;
                break;
            }
            let msg = self.with_resume(|t| {
                match handed_off {
                    true => t.ensure_handed_off(context)?,
                    false => t.ensure_stream(context, true)?,
                }
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
            let mut logprobs = tokens.logprobs.into_iter().map(from_wire);
            for t in tokens.tokens {
                context.push(t);
                on_token(Emitted { token: t, logprob: logprobs.next().as_ref() });
                done |= eos.contains(&t);
            }
            done |= tokens.finished;
            if tokens.handed_back && !done {
                // The states of the positions decoded from, up to the last token.
                let start = tokens.features_start as usize;
                self.receive_features(start, (context.len() - 1).saturating_sub(start), &tokens.features)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Target for RemoteTarget {
    fn want_features(&mut self, on: bool) {
        self.want_features = on;
    }

    fn take_features(&mut self) -> Option<TargetFeatures> {
        self.features.take()
    }

    fn logprob_inbox(&mut self) -> &mut LogprobInbox {
        &mut self.logprobs
    }

    fn open(&mut self, prompt: &[u32], sampling: &SamplingParams, max_new_tokens: usize) -> Result<u32, EdgeError> {
        self.start(prompt, sampling, max_new_tokens);
        let open = self.open_message(prompt, false);
        self.with_resume(|t| {
            let (stream, first, _) = t.open_stream(open.clone())?;
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
                stream.tx.send(EdgeMessage { kind: Some(EdgeKind::Verify(msg)) }).await.map_err(|_| Status::unavailable("stream closed"))?;
                stream.rx.message().await
            });
            match reply {
                Ok(Some(ServerMessage { kind: Some(ServerKind::Verdict(v)) })) => {
                    t.receive_features(context.len() - 1, v.accepted as usize + 1, &v.features)?;
                    t.logprobs.generated.extend(v.logprobs.into_iter().map(from_wire));
                    Ok(RoundOutcome {
                        verdict: Verdict { accepted: v.accepted as usize, next: v.next_token },
                        verified: (v.verified as usize).min(drafts.len()),
                        server_ms: Some(v.server_ms as f64),
                        hints: v
                            .hints
                            .map(|h| RoundHints {
                                verify_ms_by_k: h.est_verify_ms_by_k,
                                suggested_k: Some(h.suggested_k as usize),
                                pass_ms: (h.pass_ms > 0.0).then_some(h.pass_ms as f64),
                            })
                            .unwrap_or_default(),
                    })
                }
                Ok(Some(other)) => Err(EdgeError::Server(Status::internal(format!("expected a verdict, got {other:?}")))),
                Ok(None) => Err(EdgeError::Server(Status::unavailable("stream ended"))),
                Err(s) => Err(EdgeError::Server(s)),
            }
        })
    }

    fn hand_off(&mut self, context: &[u32], on_token: &mut dyn FnMut(Emitted), eos: &[u32], stop: &dyn Fn() -> bool) -> Result<Decoded, EdgeError> {
        self.with_resume(|t| match t.stream.is_some() {
            true => t.send_handoff(context),
            false => t.ensure_handed_off(context),
        })?;
        let mut decoded = context.to_vec();
        let handed_back = self.receive_decoded(&mut decoded, true, on_token, eos, stop)?;
        Ok(Decoded { tokens: decoded.split_off(context.len()), handed_back })
    }
}

fn from_wire(lp: WireLogprob) -> TokenLogprob {
    TokenLogprob { token: lp.token, logprob: lp.logprob, top: lp.top.into_iter().map(|t| TopLogprob { token: t.token, logprob: t.logprob }).collect() }
}
