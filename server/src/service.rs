//! The gRPC service: authenticates a stream, validates every message into a
//! `Valid*` type and hands it to the runner.

use crate::auth::Auth;
use crate::engine::EngineHandle;
use crate::validate::{ValidOpen, ValidVerify};
use crate::ServeError;
use std::sync::Arc;
use tandem_protocol::wire::{EdgeKind, EdgeMessage, ServerMessage, Verifier};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

pub struct VerifierService {
    pub engine: EngineHandle,
    pub auth: Arc<Auth>,
    pub vocab: usize,
    pub context_len: usize,
    /// The model's end-of-sequence tokens.
    pub eos: Arc<[u32]>,
    /// A stream that sends no `open` for this long is ended (it holds no
    /// KV memory, but a task and an HTTP/2 stream).
    pub open_timeout: std::time::Duration,
}

/// Messages a session's stream may hold before the runner drops a client
/// that does not read.
const OUT_CAPACITY: usize = 64;

#[tonic::async_trait]
impl Verifier for VerifierService {
    type SessionStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn session(&self, request: Request<Streaming<EdgeMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let tenant = self.auth.authenticate(request.metadata())?;
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(OUT_CAPACITY);
        let stream = StreamTask {
            engine: self.engine.clone(),
            vocab: self.vocab,
            context_len: self.context_len,
            eos: self.eos.clone(),
            open_timeout: self.open_timeout,
            out,
        };
        tokio::spawn(stream.run(tenant, inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct StreamTask {
    engine: EngineHandle,
    vocab: usize,
    context_len: usize,
    eos: Arc<[u32]>,
    open_timeout: std::time::Duration,
    out: mpsc::Sender<Result<ServerMessage, Status>>,
}

impl StreamTask {
    async fn run(self, tenant: Arc<crate::auth::Tenant>, mut inbound: Streaming<EdgeMessage>) {
        // The first message opens the session.
        let first = match tokio::time::timeout(self.open_timeout, inbound.message()).await {
            Ok(first) => first,
            Err(_) => {
                let secs = self.open_timeout.as_secs();
                return self.fail(ServeError::Idle(format!("no `open` within {secs} s of the stream starting"))).await;
            }
        };
        let open = match first {
            Ok(Some(EdgeMessage { kind: Some(EdgeKind::Open(open)) })) => open,
            Ok(Some(EdgeMessage { kind: Some(EdgeKind::Verify(_)) })) => {
                return self.fail(ServeError::NotFound("no session is open on this stream; send `open` first".into())).await;
            }
            Ok(Some(_)) => return self.fail(ServeError::FailedPrecondition("the first message must be `open`".into())).await,
            Ok(None) => return,
            // Undecodable or oversized: say so (the client may still be reading).
            Err(status) => return drop(self.out.send(Err(status)).await),
        };
        let sampled = open.sampling.as_ref().is_some_and(|s| s.temperature > 0.0);
        // A schema's patterns, a regex or a grammar may take up to a second
        // to compile: off the runtime's worker, so other streams go on
        // meanwhile.
        let compiles = open.sampling.as_ref().is_some_and(|s| !(s.json_schema.is_empty() && s.regex.is_empty() && s.grammar.is_empty()));
        let validate = || ValidOpen::new(open, self.vocab, self.context_len, &self.eos);
        let valid = match if compiles { tokio::task::block_in_place(validate) } else { validate() } {
            Ok(v) => v,
            Err(e) => return self.fail(e).await,
        };
        let id = match self.engine.open(tenant, valid, self.out.clone()).await {
            Ok(id) => id,
            Err(e) => return self.fail(e).await,
        };
        debug!(session = id, "stream open");
        // One message at a time: the next is read only when the previous
        // verification's verdict is out, so a client sending drafts faster
        // than verdicts return is held back by flow control.
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = self.out.closed() => break,
            };
            let result = match msg {
                Ok(Some(EdgeMessage { kind: Some(EdgeKind::Verify(v)) })) => match ValidVerify::new(v, self.vocab, sampled) {
                    Ok(v) => self.engine.verify(id, v).await,
                    Err(e) => Err(e),
                },
                Ok(Some(EdgeMessage { kind: Some(EdgeKind::Handoff(h)) })) => self.engine.hand_off(id, h.base_len as usize).await,
                Ok(Some(EdgeMessage { kind: Some(EdgeKind::Open(_)) })) => {
                    Err(ServeError::FailedPrecondition("a session is already open on this stream".into()))
                }
                Ok(Some(EdgeMessage { kind: Some(EdgeKind::Close(_)) })) | Ok(None) => break,
                Err(status) => {
                    let _ = self.out.send(Err(status)).await;
                    break;
                }
                Ok(Some(EdgeMessage { kind: None })) => Err(ServeError::InvalidArgument("empty message".into())),
            };
            if let Err(e) = result {
                self.engine.close(id).await;
                return self.fail(e).await;
            }
        }
        self.engine.close(id).await;
    }

    async fn fail(&self, e: ServeError) {
        debug!(error = %e, "stream refused");
        let _ = self.out.send(Err(e.into())).await;
    }
}
