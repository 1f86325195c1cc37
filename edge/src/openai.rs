//! `tandem-edge serve`: a local OpenAI-compatible HTTP endpoint backed by
//! the edge–cloud loop, so apps on the device use Tandem unchanged.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `stream: true` as server-sent events), `GET /v1/models`, `GET /health`.
//! Choices made where the OpenAI API leaves room:
//! * One device, one draft model: requests are served one at a time, in
//!   arrival order; the others wait.
//! * The `model` field is echoed but not checked (as llama.cpp's server
//!   does): apps configured with another name keep working.
//! * Defaults follow OpenAI: `temperature` 1, `top_p` 1, `max_tokens` 16
//!   for completions, up to the protocol's limit for chat; `seed` absent
//!   draws one; `stop` takes up to 4 strings.
//! * `n` choices (up to 16) are generated one after another, choice i
//!   drawing with `seed + i`: a seeded request's choices differ from each
//!   other. Greedy choices are all the same (as with OpenAI and vLLM).
//!   Completions' `best_of` may only equal `n`.
//! * `frequency_penalty` and `presence_penalty` are OpenAI's, and vLLM's
//!   `repetition_penalty` is taken too (see `Penalties`), as are vLLM's
//!   `top_k` (-1 or 0: all) and `min_p`.
//! * vLLM's `stop_token_ids`, `ignore_eos` and `min_tokens` too: the token
//!   that ends an answer shows no text, and before `min_tokens` the
//!   target may not pick one.
//! * `logit_bias` is added to the target's logits before the penalties.
//! * `response_format: {"type": "json_object"}` is OpenAI's JSON mode: the
//!   answer is one JSON object (see `JsonObjectMode`). With `{"type":
//!   "json_schema", "json_schema": {"schema": …}}` (structured outputs)
//!   the object also satisfies the schema: Tandem's subset of JSON
//!   Schema (see `JsonSchema`); a keyword outside it gets a 400 naming it.
//!   vLLM's `guided_json` (a schema, or its JSON text) is the same.
//! * vLLM's `guided_regex` (Rust's regex syntax) and `guided_choice` (a
//!   list of strings): the whole answer matches the regex, or is one of
//!   the strings (see `OutputRegex`). vLLM's `guided_grammar` and
//!   llama.cpp's `grammar`: a GBNF grammar whose `root` rule the whole
//!   answer follows (see `OutputGrammar`). vLLM's newer
//!   `structured_outputs: {"json" | "regex" | "choice" | "grammar" |
//!   "json_object"}` is the same as those fields.
//! * Function calling over structured outputs. The chat templates Tandem
//!   renders have no tool format, so the functions' names, descriptions
//!   and schemas go into the system turn (llama.cpp's generic tool format
//!   does alike), and the answer's shape is a schema:
//!   - `tool_choice` naming a function: the answer is its arguments,
//!     satisfying its `parameters` (none: `{}`); in a stream the call's
//!     id and name come first, then the arguments;
//!   - `required`: `{"calls": [{"name": …, "arguments": …}, …]}`, each
//!     call a union its name tags; in a stream each call opens once its
//!     name is written, and its arguments follow as they are written;
//!   - `auto` (the default with tools): `{"kind": "reply", "content": …}`
//!     or `{"kind": "call", "calls": […]}`; a reply's text streams out of
//!     its JSON string, calls as with `required`, with `finish_reason`
//!     `tool_calls`. Stop strings and log-probabilities, which would be
//!     of the JSON around the reply, are refused with it;
//!   - `none` ignores the tools.
//!
//!   `parallel_tool_calls` (true unless false, as OpenAI has it) lets an
//!   answer hold up to 16 calls; false holds it to one, and `required`
//!   with one tool is then that tool named. A forced call ends with
//!   `finish_reason` `stop`, as OpenAI gives it.
//!   Earlier assistant turns in `messages` take the shape the answer is
//!   held to (calls listed, an `auto` reply inside its JSON; a named
//!   call's arguments' text), and `tool` results a turn of their own.
//! * Parameters Tandem cannot honour (`functions`, `echo` with `stream`,
//!   …) are refused with a 400 naming them rather than silently ignored.
//! * `logprobs` (chat: `logprobs: true` and `top_logprobs` 0..=20;
//!   completions: `logprobs` 0..=20, vLLM's limit where OpenAI's is 5) are
//!   the target's, of its raw distribution (before temperature and
//!   top-p), as vLLM reports them: speculation leaves them as plain
//!   decoding would give them. They cover the tokens whose text is in the
//!   answer: not the end-of-sequence token, nor those cut with a stop
//!   string; in a stream each chunk carries its text's tokens.
//! * Completions' `echo` puts the prompt before the answer, and with
//!   `logprobs` the prompt's tokens' (the first has none: null), as
//!   evaluation harnesses score text with (lm-evaluation-harness's
//!   `loglikelihood`). Not in streams.
//! * `usage.tandem` carries the speculation counts (drafted, accepted,
//!   rounds, …); streaming responses carry usage when asked with
//!   `stream_options: {"include_usage": true}`.
//! * A client that disconnects mid-stream cancels its generation.

use crate::edge::Edge;
use crate::LogprobsWanted;
use crate::{EdgeError, GenerateRequest, Generation};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tandem_model::{ChatMessage, JsonObjectMode, JsonSchema, OutputGrammar, OutputRegex, Penalties, SamplingParams, StopTokens, TokenLogprob, Tokenizer};
use tandem_protocol::limits::{MAX_LOGIT_BIAS, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

#[derive(Clone)]
struct AppState {
    edge: Arc<Mutex<Edge>>,
    /// Shared with the edge, so requests are checked while another generates.
    tokenizer: Arc<Tokenizer>,
    /// JSON mode's token tables, built once (a few milliseconds) and
    /// shared by every JSON request.
    json_tables: JsonObjectMode,
    model_id: Arc<str>,
}

/// The endpoint's routes over `edge`.
pub fn router(edge: Edge) -> Router {
    let model_id: Arc<str> = edge.model_id().into();
    let (tokenizer, json_tables) = (edge.tokenizer.clone(), JsonObjectMode::new(edge.tokenizer.clone()));
    let state = AppState { tokenizer, json_tables, edge: Arc::new(Mutex::new(edge)), model_id };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves until `shutdown` resolves.
pub async fn serve(listener: tokio::net::TcpListener, edge: Edge, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router(edge)).with_graceful_shutdown(shutdown).await
}

/// An OpenAI-style error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param) }
    }

    fn body(&self) -> Value {
        let kind = if self.status.is_client_error() { "invalid_request_error" } else { "server_error" };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}})
    }
}

impl From<EdgeError> for ApiError {
    fn from(e: EdgeError) -> Self {
        let status = match &e {
            EdgeError::InvalidArgument(_) | EdgeError::Model(tandem_model::ModelError::InvalidArgument(_)) => StatusCode::BAD_REQUEST,
            EdgeError::Server(s) => match s.code() {
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => StatusCode::BAD_GATEWAY,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            },
            EdgeError::Connect { .. } => StatusCode::BAD_GATEWAY,
            EdgeError::Model(_) | EdgeError::Gpu(_) | EdgeError::GpuLimit { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: crate::explain(&e), param: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, [(header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response()
    }
}

fn json_response(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn models(State(s): State<AppState>) -> Response {
    json_response(json!({"object": "list", "data": [{"id": &*s.model_id, "object": "model", "created": unix_now(), "owned_by": "tandem"}]}))
}

/// vLLM's `POST /tokenize`: `{"prompt": …}` (a string or token ids) as a
/// completion takes it, or `{"messages": […]}` (with `tools` and
/// `tool_choice`) in the chat template, as a chat completion does;
/// answers `{"tokens", "count"}`.
async fn tokenize(State(s): State<AppState>, body: Bytes) -> Response {
    let tokens = || -> Result<Vec<u32>, ApiError> {
        let obj = &json_object(&body)?;
        if obj.contains_key("messages") {
            let forced = tool_use(Kind::Chat, obj)?;
            return Ok(chat_prompt(obj, &s.tokenizer, forced.as_ref(), &crate::chat::today())?.0);
        }
        Ok(completion_prompt(obj, &s.tokenizer)?.0)
    };
    match tokens() {
        Ok(t) => json_response(json!({"count": t.len(), "tokens": t})),
        Err(e) => e.into_response(),
    }
}

/// vLLM's `POST /detokenize`: `{"tokens": […]}` → `{"prompt": text}`
/// (special tokens included).
async fn detokenize(State(s): State<AppState>, body: Bytes) -> Response {
    let text = || -> Result<String, ApiError> {
        let ids: Vec<u32> = json_object(&body)?
            .get("tokens")
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .ok_or_else(|| ApiError::invalid("tokens", "`tokens` must be an array of token ids"))?;
        s.tokenizer.decode(&ids).map_err(|e| ApiError::invalid("tokens", e.to_string()))
    };
    match text() {
        Ok(t) => json_response(json!({"prompt": t})),
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Chat,
    Text,
}

/// A request checked once: everything the generation needs.
#[derive(Debug)]
struct ValidCompletion {
    prompt: Vec<u32>,
    /// Choices asked for.
    n: usize,
    max_new_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Log-probabilities with this many alternatives (None: none).
    logprobs: Option<usize>,
    /// Completions' `echo`: the prompt's text, put before the answer.
    echo: Option<String>,
    /// The function call the answer is.
    tool_call: Option<Call>,
}

/// The most choices (`n`) one request may ask for: they are generated
/// one after another on this device.
const MAX_CHOICES: usize = 16;

/// Fields refused rather than ignored (unless null, false or empty):
/// ignoring one would answer as if it had not been asked (the legacy
/// `functions`; `suffix`, which needs a fill-in-the-middle model).
const UNSUPPORTED: [&str; 2] = ["functions", "suffix"];

/// How a chat answer uses the tools.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    /// It calls this function once: the answer is its arguments.
    Named(String),
    /// It makes calls: `{"calls": [{"name": …, "arguments": …}, …]}`.
    Chosen,
    /// It makes calls or replies: `{"kind": "call", "calls": […]}` or
    /// `{"kind": "reply", "content": …}`.
    Auto,
}

/// Most calls in one answer where `parallel_tool_calls` allows several:
/// a bound on a small model's repeating itself, far above what one turn
/// of a conversation asks for.
const MAX_TOOL_CALLS: usize = 16;

/// An `Auto` answer's reply text (None: a call, or cut short).
fn auto_reply(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    (v.get("kind")? == "reply").then(|| v.get("content")?.as_str().map(str::to_string)).flatten()
}

/// What a stream sends of a `Chosen` or `Auto` answer's calls.
#[derive(Debug, PartialEq)]
enum CallDelta {
    /// A call begins: its index and name; its arguments follow.
    Opened { index: usize, name: String },
    /// More of the open call's arguments' text.
    Arguments { index: usize, text: String },
    /// A call whose name came after its arguments, once it closes.
    Whole { index: usize, name: String, arguments: String },
}

/// The calls of a `Chosen` or `Auto` answer, read as it comes. Each
/// element of `calls` is an object at depth 2 (the schema puts no other
/// array in the answer's root) holding a name and its arguments, the only
/// object at depth 3. A call whose name comes first (as the tag of a
/// union of functions does) opens as its arguments begin, and their text
/// follows as it is written; the arguments are the model's text, as
/// OpenAI's are.
#[derive(Debug, Default)]
struct CallScanner {
    raw: String,
    /// Bytes of `raw` read.
    at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Where the element being read began, and its arguments.
    start: usize,
    arguments: Option<usize>,
    /// Where its arguments ended (the closing brace).
    arguments_end: Option<usize>,
    /// The open call's name, and the bytes of `raw` its deltas hold.
    open: Option<(String, usize)>,
    /// Calls closed: name and arguments' text.
    calls: Vec<(String, String)>,
}

impl CallScanner {
    /// Takes the answer's next text; returns what it adds to the calls.
    fn push(&mut self, text: &str) -> Vec<CallDelta> {
        self.raw.push_str(text);
        let mut deltas = vec![];
        for i in self.at..self.raw.len() {
            let b = self.raw.as_bytes()[i];
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    match self.depth {
                        2 => (self.start, self.arguments, self.arguments_end) = (i, None, None),
                        3 => {
                            self.arguments = Some(i);
                            // The name so far, if the members before the arguments hold it.
                            let head: Option<Value> = serde_json::from_str(&format!("{}null}}", &self.raw[self.start..i])).ok();
                            if let Some(name) = head.as_ref().and_then(|h| h.get("name")?.as_str()) {
                                deltas.push(CallDelta::Opened { index: self.calls.len(), name: name.to_string() });
                                self.open = Some((name.to_string(), i));
                            }
                        }
                        _ => {}
                    }
                    self.depth += 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    match self.depth {
                        3 => {
                            self.arguments_end = Some(i);
                            deltas.extend(self.more_arguments(i + 1));
                        }
                        2 => {
                            let (Some(from), Some(to)) = (self.arguments, self.arguments_end) else { continue };
                            let arguments = self.raw[from..=to].to_string();
                            match self.open.take() {
                                Some((name, _)) => self.calls.push((name, arguments)),
                                None => {
                                    let element: Option<Value> = serde_json::from_str(&self.raw[self.start..=i]).ok();
                                    if let Some(name) = element.as_ref().and_then(|e| e.get("name")?.as_str()) {
                                        deltas.push(CallDelta::Whole { index: self.calls.len(), name: name.to_string(), arguments: arguments.clone() });
                                        self.calls.push((name.to_string(), arguments));
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        self.at = self.raw.len();
        if self.arguments_end.is_none() {
            deltas.extend(self.more_arguments(self.raw.len()));
        }
        deltas
    }

    /// The open call's arguments up to `to`, if it adds to them.
    fn more_arguments(&mut self, to: usize) -> Option<CallDelta> {
        let (_, sent) = self.open.as_mut()?;
        let text = self.raw[*sent..to].to_string();
        *sent = to;
        (!text.is_empty()).then_some(CallDelta::Arguments { index: self.calls.len(), text })
    }

    /// The calls so far: those closed, and one still open with the
    /// arguments written so far (an answer cut short).
    fn calls(&self) -> Vec<(String, String)> {
        let mut calls = self.calls.clone();
        if let (Some((name, _)), Some(from)) = (&self.open, self.arguments) {
            calls.push((name.clone(), self.raw[from..self.arguments_end.map_or(self.raw.len(), |e| e + 1)].to_string()));
        }
        calls
    }
}

/// How a chat answer must use the tools, from `tools` and `tool_choice`.
#[derive(Debug)]
struct ToolUse {
    call: Call,
    /// What the system turn tells the model of the function.
    instruction: String,
    schema: Arc<JsonSchema>,
}

impl ToolUse {
    /// Adds the instruction to the conversation's system turn (the
    /// template's default one when it has none).
    fn instruct(&self, messages: &mut Vec<ChatMessage>, default_system: Option<&str>) {
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{}", m.content, self.instruction),
            _ => {
                let content = default_system.map_or(self.instruction.clone(), |s| format!("{s}\n\n{}", self.instruction));
                messages.insert(0, ChatMessage { role: "system".into(), content });
            }
        }
    }
}

/// OpenAI's rule for function names: 1 to 64 letters, digits, `_` or `-`.
fn is_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tools` and `tool_choice`: how the answer uses the tools (None: it
/// does not). Every tool is checked, used or not, as OpenAI does.
fn tool_use(kind: Kind, obj: &Map<String, Value>) -> Result<Option<ToolUse>, ApiError> {
    const TOOL: &str = "each of `tools` is {\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}";
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(_) => return Err(ApiError::invalid("tools", format!("`tools` must be an array; {TOOL}"))),
    };
    let choice = obj.get("tool_choice").filter(|c| !c.is_null());
    if kind == Kind::Text && (!tools.is_empty() || choice.is_some()) {
        let param = if tools.is_empty() { "tool_choice" } else { "tools" };
        return Err(ApiError::invalid(param, format!("`{param}` is a chat completions parameter")));
    }
    let mut functions: Vec<(&str, &Value)> = vec![];
    for (i, tool) in tools.iter().enumerate() {
        let function = tool.get("function").filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"));
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| ApiError::invalid("tools", format!("`tools[{i}]`: {TOOL}")))?;
        if !is_function_name(name) || functions.iter().any(|f| f.0 == name) {
            return Err(ApiError::invalid("tools", format!("`tools[{i}].function.name` must be 1 to 64 letters, digits, `_` or `-`, and unique")));
        }
        functions.push((name, function.expect("has a name")));
    }
    // OpenAI's default is true.
    let parallel = match obj.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(p)) => *p,
        Some(_) => return Err(ApiError::invalid("parallel_tool_calls", "`parallel_tool_calls` must be true or false")),
    };
    let call = match choice {
        None if functions.is_empty() => return Ok(None),
        Some(Value::String(c)) if c == "none" => return Ok(None),
        _ if functions.is_empty() => return Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`")),
        None => Call::Auto,
        Some(Value::String(c)) if c == "auto" => Call::Auto,
        Some(Value::String(c)) if c == "required" && functions.len() == 1 && !parallel => Call::Named(functions[0].0.to_string()),
        Some(Value::String(c)) if c == "required" => Call::Chosen,
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}",
            ))
        }
        Some(c) => {
            let name = c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            let (name, _) = functions
                .iter()
                .find(|f| Some(f.0) == name)
                .ok_or_else(|| ApiError::invalid("tool_choice", "`tool_choice.function.name` must name one of `tools`"))?;
            Call::Named(name.to_string())
        }
    };
    let mut parameters = vec![];
    for (i, (_, function)) in functions.iter().enumerate() {
        // No parameters: a function of none, called with `{}`.
        let schema = function.get("parameters").filter(|p| !p.is_null()).cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        let bad = |e: String| ApiError::invalid("tools", format!("`tools[{i}].function.parameters`: {e}"));
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(bad("must be the schema of an object (`\"type\": \"object\"`)".into()));
        }
        parameters.push((JsonSchema::from_value(&schema).map_err(|e| bad(e.to_string()))?, schema));
    }
    let describe =
        |(name, function): &(&str, &Value)| function.get("description").and_then(Value::as_str).map_or(format!("`{name}`"), |d| format!("`{name}` ({d})"));
    let list = functions.iter().map(|f| format!("- {}", describe(f))).collect::<Vec<_>>().join("\n");
    // The calls: each names its function, a union the name tags (see
    // `JsonSchema`).
    let calls = {
        let arms: Vec<Value> = functions
            .iter()
            .zip(&parameters)
            .map(|((name, _), (_, schema))| {
                json!({"type": "object", "properties": {"name": {"const": name}, "arguments": schema}, "required": ["name", "arguments"], "additionalProperties": false})
            })
            .collect();
        let call = if arms.len() == 1 { arms[0].clone() } else { json!({"anyOf": arms}) };
        json!({"type": "array", "items": call, "minItems": 1, "maxItems": if parallel { MAX_TOOL_CALLS } else { 1 }})
    };
    let (one_or_more, calls_are) = if parallel { ("one or more", "each call's") } else { ("one", "the call's") };
    let (schema, instruction) = match &call {
        Call::Named(name) => {
            let i = functions.iter().position(|f| f.0 == name).expect("a function of `tools`");
            let (compiled, schema) = parameters.swap_remove(i);
            let instruction = format!(
                "Call the function {}.\nReply with its arguments alone, as a JSON object that satisfies this JSON Schema:\n{schema}",
                describe(&functions[i])
            );
            return Ok(Some(ToolUse { call, instruction, schema: Arc::new(compiled) }));
        }
        Call::Chosen => (
            json!({"type": "object", "properties": {"calls": calls}, "required": ["calls"], "additionalProperties": false}),
            format!(
                "Call {one_or_more} of these functions:\n{list}\nReply with a JSON object whose `calls` lists {calls_are} function `name` and \
                 `arguments`, that satisfies this JSON Schema:\n"
            ),
        ),
        Call::Auto => {
            let reply = json!({"type": "object", "properties": {"kind": {"const": "reply"}, "content": {"type": "string"}}, "required": ["kind", "content"], "additionalProperties": false});
            let called = json!({"type": "object", "properties": {"kind": {"const": "call"}, "calls": calls}, "required": ["kind", "calls"], "additionalProperties": false});
            let instruction = format!(
                "You can call {one_or_more} of these functions:\n{list}\nTo call, reply with {{\"kind\": \"call\", \"calls\": [{{\"name\": …, \"arguments\": …}}]}}; \
                 otherwise answer with {{\"kind\": \"reply\", \"content\": your answer}}. Either satisfies this JSON Schema:\n"
            );
            (json!({"anyOf": [reply, called]}), instruction)
        }
    };
    // The functions' definitions go to the root, where their `$ref`s point.
    let mut schema = schema;
    for (_, parameters) in &parameters {
        for key in ["$defs", "definitions"] {
            for (name, definition) in parameters.get(key).and_then(Value::as_object).into_iter().flatten() {
                let held = schema.as_object_mut().expect("an object").entry(key).or_insert_with(|| json!({}));
                if held.get(name).is_some_and(|d| d != definition) {
                    return Err(ApiError::invalid("tools", format!("`tools`: two functions define `{key}.{name}` differently")));
                }
                held[name] = definition.clone();
            }
        }
    }
    let compiled = JsonSchema::from_value(&schema).map_err(|e| ApiError::invalid("tools", format!("`tools`: {e}")))?;
    Ok(Some(ToolUse { call, instruction: format!("{instruction}{schema}"), schema: Arc::new(compiled) }))
}

/// `logit_bias`: `{"token id": bias in [-100, 100]}`, ids ascending.
fn logit_bias(obj: &Map<String, Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = || ApiError::invalid("logit_bias", format!("`logit_bias` maps up to {MAX_LOGIT_BIAS} token ids below {vocab} to biases in [-100, 100]"));
    let map = match obj.get("logit_bias") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Object(map)) if map.len() <= MAX_LOGIT_BIAS => map,
        Some(_) => return Err(bad()),
    };
    let mut bias = map
        .iter()
        .map(|(id, b)| {
            let id = id.parse::<u32>().ok().filter(|&id| (id as usize) < vocab)?;
            let b = b.as_f64().filter(|b| (-100.0..=100.0).contains(b))?;
            Some((id, b as f32))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    bias.sort_by_key(|b| b.0);
    Ok(bias)
}

/// vLLM's `stop_token_ids`, `ignore_eos` and `min_tokens` (None: all absent).
fn stop_tokens(obj: &Map<String, Value>, tokenizer: &Tokenizer, max_new_tokens: usize) -> Result<Option<StopTokens>, ApiError> {
    let vocab = tokenizer.vocab_size();
    let ids = match obj.get("stop_token_ids") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|id| id.as_u64().filter(|&id| (id as usize) < vocab).map(|id| id as u32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop_token_ids", format!("`stop_token_ids` must be token ids below {vocab}")))?,
        Some(_) => return Err(ApiError::invalid("stop_token_ids", "`stop_token_ids` must be an array of token ids")),
    };
    let ignore_eos = match obj.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("ignore_eos", "`ignore_eos` must be true or false")),
    };
    let min_tokens = number(obj, "min_tokens")?.unwrap_or(0.0);
    if !(min_tokens >= 0.0 && min_tokens <= max_new_tokens as f64 && min_tokens.fract() == 0.0) {
        return Err(ApiError::invalid("min_tokens", format!("`min_tokens` must be an integer in 0..={max_new_tokens} (the answer's limit)")));
    }
    let stop = StopTokens::resolve(tokenizer.eos_tokens(), &ids, ignore_eos, min_tokens as usize);
    if stop.as_ref().is_some_and(|s| s.tokens.len() > MAX_STOP_TOKEN_IDS) {
        return Err(ApiError::invalid("stop_token_ids", format!("`stop_token_ids` may list {MAX_STOP_TOKEN_IDS} tokens with the end-of-sequence ones")));
    }
    Ok(stop)
}

/// `logprobs`: chat's flag with `top_logprobs`, or completions' count.
fn logprobs(kind: Kind, obj: &Map<String, Value>) -> Result<Option<usize>, ApiError> {
    let count = |name: &'static str| match number(obj, name)? {
        None => Ok(None),
        Some(n) if n >= 0.0 && n <= MAX_TOP_LOGPROBS as f64 && n.fract() == 0.0 => Ok(Some(n as usize)),
        Some(_) => Err(ApiError::invalid(name, format!("`{name}` must be an integer in 0..={MAX_TOP_LOGPROBS}"))),
    };
    match kind {
        Kind::Chat => {
            let on = match obj.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::invalid("logprobs", "`logprobs` must be true or false")),
            };
            match (on, count("top_logprobs")?) {
                (false, Some(n)) if n > 0 => Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
                (false, _) => Ok(None),
                (true, top) => Ok(Some(top.unwrap_or(0))),
            }
        }
        Kind::Text => {
            if obj.get("top_logprobs").is_some_and(|v| !v.is_null()) {
                return Err(ApiError::invalid("top_logprobs", "completions take the number of alternatives as `logprobs`"));
            }
            count("logprobs")
        }
    }
}

/// A request body: a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("the body is not JSON: {e}")))? {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::invalid("body", "the body must be a JSON object")),
    }
}

/// `json_tables`: JSON mode's, for `tokenizer`.
fn parse_request(kind: Kind, body: &[u8], tokenizer: &Tokenizer, json_tables: &JsonObjectMode, today: &str) -> Result<ValidCompletion, ApiError> {
    let obj = &json_object(body)?;
    for name in UNSUPPORTED {
        let off = |x: &Value| match x {
            Value::Null | Value::Bool(false) => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if obj.get(name).is_some_and(|x| !off(x)) {
            return Err(ApiError::invalid(name, format!("`{name}` is not supported by Tandem")));
        }
    }
    let penalty = |name: &'static str, default: f64, ok: fn(f64) -> bool, range: &str| match number(obj, name)? {
        Some(v) if !ok(v) => Err(ApiError::invalid(name, format!("`{name}` must be {range}"))),
        v => Ok(v.unwrap_or(default) as f32),
    };
    let penalties = Penalties {
        frequency: penalty("frequency_penalty", 0.0, |v| (-2.0..=2.0).contains(&v), "in [-2, 2]")?,
        presence: penalty("presence_penalty", 0.0, |v| (-2.0..=2.0).contains(&v), "in [-2, 2]")?,
        repetition: penalty("repetition_penalty", 1.0, |v| v > 0.0 && v.is_finite(), "> 0")?,
    };
    // None: text; Some(None): any object; Some(Some(schema)).
    let json_mode: Option<Option<Arc<JsonSchema>>> = match obj.get("response_format") {
        None | Some(Value::Null) => None,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(None),
            Some("json_schema") => match format.get("json_schema").map(|j| j.get("schema")) {
                Some(None | Some(Value::Null)) => Some(None),
                Some(Some(schema)) => Some(Some(Arc::new(
                    JsonSchema::from_value(schema).map_err(|e| ApiError::invalid("response_format", format!("`response_format.json_schema.schema`: {e}")))?,
                ))),
                None => return Err(ApiError::invalid("response_format", "`response_format` of type `json_schema` needs a `json_schema` object")),
            },
            _ => return Err(ApiError::invalid("response_format", "`response_format` must be of type `text`, `json_object` or `json_schema`")),
        },
    };
    let guided = guided(obj)?;
    let json_mode = if guided.json_object && json_mode.is_none() { Some(None) } else { json_mode };
    // vLLM's `guided_json`: a schema, as an object or as JSON text.
    let json_mode = match guided.json {
        None => json_mode,
        Some((param, _)) if matches!(json_mode, Some(Some(_))) => {
            return Err(ApiError::invalid(param, format!("`{param}` and `response_format` both give a schema")))
        }
        Some((param, schema)) => {
            let schema = match schema {
                Value::String(text) => JsonSchema::parse(text),
                _ => JsonSchema::from_value(schema),
            };
            Some(Some(Arc::new(schema.map_err(|e| ApiError::invalid(param, format!("`{param}`: {e}")))?)))
        }
    };
    let forced = tool_use(kind, obj)?;
    let json_mode = match (json_mode, &forced) {
        (Some(_), Some(_)) => {
            let param = guided.json.map_or("response_format", |j| j.0);
            return Err(ApiError::invalid(param, format!("`{param}` and a forced `tool_choice` both constrain the answer")));
        }
        (json_mode, None) => json_mode,
        (None, Some(call)) => Some(Some(call.schema.clone())),
    };
    let rule = text_rule(&guided)?;
    if let Some((param, _)) = rule.as_ref().filter(|_| json_mode.is_some()) {
        return Err(ApiError::invalid(param, format!("`{param}` and a JSON answer (`response_format`, a schema or `tools`) both constrain the answer")));
    }
    let n = number(obj, "n")?.unwrap_or(1.0);
    if !(1.0..=MAX_CHOICES as f64).contains(&n) || n.fract() != 0.0 {
        return Err(ApiError::invalid("n", format!("`n` must be an integer in 1..={MAX_CHOICES}")));
    }
    if number(obj, "best_of")?.is_some_and(|b| b != n) {
        return Err(ApiError::invalid("best_of", "`best_of` must equal `n`: Tandem returns every choice it generates"));
    }
    let (prompt, text) = match kind {
        Kind::Chat => chat_prompt(obj, tokenizer, forced.as_ref(), today)?,
        Kind::Text => completion_prompt(obj, tokenizer)?,
    };
    let echo = match obj.get("echo") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if kind == Kind::Text => true,
        Some(_) => return Err(ApiError::invalid("echo", "`echo` is a completions parameter: true or false")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt.len() > MAX_PROMPT_TOKENS {
        let param = if kind == Kind::Chat { "messages" } else { "prompt" };
        return Err(ApiError::invalid(param, format!("the prompt is {} tokens; at most {MAX_PROMPT_TOKENS}", prompt.len())));
    }
    let default_max = if kind == Kind::Chat { MAX_NEW_TOKENS } else { 16 };
    let (max_name, max) = match (number(obj, "max_completion_tokens")?, number(obj, "max_tokens")?) {
        (Some(m), _) => ("max_completion_tokens", m),
        (None, Some(m)) => ("max_tokens", m),
        (None, None) => ("max_tokens", default_max as f64),
    };
    if !(max >= 1.0 && max <= MAX_NEW_TOKENS as f64 && max.fract() == 0.0) {
        return Err(ApiError::invalid(max_name, format!("`{max_name}` must be an integer in 1..={MAX_NEW_TOKENS}")));
    }
    let temperature = number(obj, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "`temperature` must be in [0, 2]"));
    }
    let top_p = number(obj, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "`top_p` must be in (0, 1]"));
    }
    // vLLM's extra parameters (not OpenAI's): `top_k` (-1 or 0 keeps all) and `min_p`.
    let top_k = number(obj, "top_k")?.unwrap_or(0.0);
    if !(top_k >= -1.0 && top_k.fract() == 0.0) {
        return Err(ApiError::invalid("top_k", "`top_k` must be an integer ≥ -1 (-1 or 0: all)"));
    }
    let min_p = number(obj, "min_p")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid("min_p", "`min_p` must be in [0, 1]"));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(s) => s.as_u64().or_else(|| s.as_i64().map(|i| i as u64)).ok_or_else(|| ApiError::invalid("seed", "`seed` must be an integer"))?,
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or up to 4 strings"))?,
        Some(_) => return Err(ApiError::invalid("stop", "`stop` must be a string or up to 4 strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` strings must not be empty"));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be true or false")),
    };
    let include_usage = obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let logprobs = logprobs(kind, obj)?;
    if echo && stream {
        return Err(ApiError::invalid("echo", "`echo` is not supported with `stream`"));
    }
    // An `auto` answer is JSON around the reply: stop strings and
    // log-probabilities would be of that text, not the reply's.
    if forced.as_ref().is_some_and(|t| t.call == Call::Auto) {
        if let Some(param) = [("stop", !stop.is_empty()), ("logprobs", logprobs.is_some())].into_iter().find_map(|(p, on)| on.then_some(p)) {
            return Err(ApiError::invalid(param, format!("`{param}` is not supported with `tools` when `tool_choice` is `auto`")));
        }
    }
    Ok(ValidCompletion {
        prompt,
        n: n as usize,
        max_new_tokens: max as usize,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k: top_k.max(0.0) as usize,
            top_p: top_p as f32,
            min_p: min_p as f32,
            seed,
            penalties,
            logit_bias: logit_bias(obj, tokenizer.vocab_size())?,
            stop: stop_tokens(obj, tokenizer, max as usize)?,
            json_object: match rule {
                Some((_, TextRule::Regex(regex))) => Some(json_tables.with_regex(regex)),
                Some((_, TextRule::Grammar(grammar))) => Some(json_tables.with_grammar(grammar)),
                None => json_mode.map(|schema| json_tables.with_schema(schema)),
            },
        },
        stop,
        stream,
        include_usage,
        logprobs,
        echo: echo.then_some(text),
        tool_call: forced.map(|forced| forced.call),
    })
}

/// vLLM's constraints beside OpenAI's `response_format`: the
/// `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`
/// fields (llama.cpp's `grammar` for the last) or, as vLLM names them
/// since 0.10, `structured_outputs: {"json", "regex", "choice",
/// "grammar", "json_object"}`. Each one given, with the name errors use.
struct Guided<'a> {
    json: Option<(&'static str, &'a Value)>,
    regex: Option<(&'static str, &'a Value)>,
    choice: Option<(&'static str, &'a Value)>,
    grammar: Option<(&'static str, &'a Value)>,
    /// `structured_outputs.json_object: true`: JSON mode.
    json_object: bool,
}

fn guided(obj: &Map<String, Value>) -> Result<Guided<'_>, ApiError> {
    fn given(v: Option<&Value>) -> Option<&Value> {
        v.filter(|v| !v.is_null())
    }
    let old = |name: &'static str| given(obj.get(name)).map(|v| (name, v));
    let Some(outputs) = given(obj.get("structured_outputs")) else {
        if let (Some(_), Some(_)) = (old("guided_grammar"), old("grammar")) {
            return Err(ApiError::invalid("grammar", "`guided_grammar` and `grammar` both constrain the answer"));
        }
        let grammar = old("guided_grammar").or(old("grammar"));
        return Ok(Guided { json: old("guided_json"), regex: old("guided_regex"), choice: old("guided_choice"), grammar, json_object: false });
    };
    let bad = |message: String| ApiError::invalid("structured_outputs", message);
    let outputs = outputs.as_object().ok_or_else(|| bad("`structured_outputs` must be an object".into()))?;
    let olds = ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "grammar"];
    if let Some((name, _)) = olds.into_iter().find_map(old) {
        return Err(bad(format!("`structured_outputs` and `{name}` both constrain the answer")));
    }
    // Options set to false change nothing (`disable_fallback`, …).
    const KEYS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];
    if let Some(key) = outputs.iter().find(|(k, v)| !matches!(v, Value::Null | Value::Bool(false)) && !KEYS.contains(&k.as_str())) {
        return Err(bad(format!("`structured_outputs.{}` is not supported ({})", key.0, KEYS.join(", "))));
    }
    let json_object = match given(outputs.get("json_object")) {
        None => false,
        Some(Value::Bool(on)) => *on,
        Some(_) => return Err(bad("`structured_outputs.json_object` must be true or false".into())),
    };
    let new = |key: &str, name: &'static str| given(outputs.get(key)).map(|v| (name, v));
    Ok(Guided {
        json: new("json", "structured_outputs.json"),
        regex: new("regex", "structured_outputs.regex"),
        choice: new("choice", "structured_outputs.choice"),
        grammar: new("grammar", "structured_outputs.grammar"),
        json_object,
    })
}

/// A constraint on the answer's text (rather than a JSON answer).
enum TextRule {
    Regex(Arc<OutputRegex>),
    Grammar(Arc<OutputGrammar>),
}

/// vLLM's `guided_regex` (a regex the whole answer matches),
/// `guided_choice` (strings, one of which is the answer) or
/// `guided_grammar` (a GBNF grammar it follows), and which.
fn text_rule(guided: &Guided) -> Result<Option<(&'static str, TextRule)>, ApiError> {
    let given = [guided.regex, guided.choice, guided.grammar];
    if let [first, second, ..] = given.iter().flatten().map(|g| g.0).collect::<Vec<_>>()[..] {
        return Err(ApiError::invalid(second, format!("`{first}` and `{second}` both constrain the answer")));
    }
    fn string<'v>((param, v): (&'static str, &'v Value)) -> Result<&'v str, ApiError> {
        v.as_str().ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a string")))
    }
    let (param, rule) = match given {
        [Some(regex), _, _] => (regex.0, OutputRegex::new(string(regex)?).map(|r| TextRule::Regex(Arc::new(r)))),
        [_, Some((param, choice)), _] => {
            let options = choice.as_array().filter(|c| !c.is_empty()).and_then(|c| c.iter().map(Value::as_str).collect::<Option<Vec<_>>>());
            let options = options.ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a non-empty array of strings")))?;
            (param, OutputRegex::choice(&options).map(|r| TextRule::Regex(Arc::new(r))))
        }
        [_, _, Some(grammar)] => (grammar.0, OutputGrammar::new(string(grammar)?).map(|g| TextRule::Grammar(Arc::new(g)))),
        [None, None, None] => return Ok(None),
    };
    let rule = rule.map_err(|e| ApiError::invalid(param, format!("`{param}`: {e}")))?;
    Ok(Some((param, rule)))
}

fn number(obj: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number"))),
    }
}

/// The conversation's turns; earlier assistant turns as the model would
/// have written them under `call` (see `assistant_turn`).
fn messages(obj: &Map<String, Value>, call: Option<&Call>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = obj.get("messages").and_then(Value::as_array).ok_or_else(|| ApiError::invalid("messages", "`messages` must be an array of {role, content}"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    list.iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("messages", "each message needs a `role`"))?;
            // The API's "developer" role is its new name for "system".
            let role = match role {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => return Err(ApiError::invalid("messages", format!("message role `{other}` is not supported (system, user, assistant, tool)"))),
            };
            let mut content = content_text(m.get("content"))?;
            if role == "assistant" {
                let calls = match m.get("tool_calls") {
                    None | Some(Value::Null) => Some(vec![]),
                    Some(calls) => calls.as_array().and_then(|calls| {
                        calls
                            .iter()
                            .map(|c| {
                                let f = c.get("function")?;
                                Some((f.get("name")?.as_str()?, f.get("arguments")?.as_str()?))
                            })
                            .collect::<Option<Vec<_>>>()
                    }),
                };
                let calls =
                    calls.ok_or_else(|| ApiError::invalid("messages", "an assistant's `tool_calls` must be an array of {function: {name, arguments}}"))?;
                content = assistant_turn(content, &calls, call);
            }
            Ok(ChatMessage { role: role.into(), content })
        })
        .collect()
}

/// An earlier assistant turn (its text and calls: function name and
/// arguments' JSON) as the model writes its answer under `call`, so that
/// the conversation shows it the shape it is held to: calls listed as in
/// the schema (tags first), an `auto` reply inside its JSON. Where the
/// answer is arguments alone, or without tools, the arguments' text.
fn assistant_turn(content: String, calls: &[(&str, &str)], call: Option<&Call>) -> String {
    let listed = || {
        let calls: Vec<String> = calls
            .iter()
            .map(|(name, arguments)| {
                // Arguments as sent, where they are JSON (their keys' order kept).
                let arguments = if serde_json::from_str::<Value>(arguments).is_ok() { arguments.to_string() } else { json!(arguments).to_string() };
                format!(r#"{{"name":{},"arguments":{arguments}}}"#, json!(name))
            })
            .collect();
        format!("[{}]", calls.join(","))
    };
    match call {
        Some(Call::Auto) if calls.is_empty() => format!(r#"{{"kind":"reply","content":{}}}"#, json!(content)),
        _ if calls.is_empty() => content,
        Some(Call::Auto) => format!(r#"{content}{{"kind":"call","calls":{}}}"#, listed()),
        Some(Call::Chosen) => format!(r#"{content}{{"calls":{}}}"#, listed()),
        None | Some(Call::Named(_)) => content + &calls.iter().map(|c| c.1).collect::<Vec<_>>().join("\n"),
    }
}

/// A chat's prompt, tokens and text: its messages in the chat template,
/// the forced call's instruction in the system turn.
fn chat_prompt(obj: &Map<String, Value>, tokenizer: &Tokenizer, forced: Option<&ToolUse>, today: &str) -> Result<(Vec<u32>, String), ApiError> {
    let mut messages = messages(obj, forced.map(|f| &f.call))?;
    if let Some(call) = forced {
        call.instruct(&mut messages, tokenizer.default_system());
    }
    let text = tokenizer.chat_messages(&messages, Some(today));
    Ok((tokenizer.encode_prompt(&text).map_err(EdgeError::from)?, text))
}

/// A message's content: a string, or an array of parts of which only
/// `text` parts are supported.
fn content_text(content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(ApiError::invalid("messages", "only `text` content parts are supported")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
        Some(_) => Err(ApiError::invalid("messages", "message `content` must be a string or an array of text parts")),
    }
}

/// A completion's prompt, tokens and text: a string, or token ids as
/// evaluation harnesses send them (lm-evaluation-harness's
/// `tokenized_requests`), each alone or as an array of one.
fn completion_prompt(obj: &Map<String, Value>, tokenizer: &Tokenizer) -> Result<(Vec<u32>, String), ApiError> {
    const WHAT: &str = "`prompt` must be a string or an array of token ids (or an array of one of them)";
    let prompt = match obj.get("prompt") {
        Some(Value::Array(a)) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => &a[0],
        Some(p) => p,
        None => return Err(ApiError::invalid("prompt", WHAT)),
    };
    match prompt {
        Value::String(s) => Ok((tokenizer.encode_prompt(s).map_err(EdgeError::from)?, s.clone())),
        Value::Array(ids) => {
            let vocab = tokenizer.vocab_size();
            let ids = ids
                .iter()
                .map(|id| id.as_u64().filter(|&id| (id as usize) < vocab).map(|id| id as u32))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| ApiError::invalid("prompt", format!("{WHAT}; token ids are integers below the vocabulary's {vocab}")))?;
            let text = tokenizer.decode(&ids).map_err(EdgeError::from)?;
            Ok((ids, text))
        }
        _ => Err(ApiError::invalid("prompt", WHAT)),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn fresh_seed() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A response's (`chatcmpl`, `cmpl`) or a tool call's (`call`) id.
fn next_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:04x}", unix_now())
}

/// Holds back the end of the text while it could still become a stop
/// string, and reports when one appears.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops, held: String::new() }
    }

    /// Adds generated text; returns what may be shown now and whether a
    /// stop string was reached (the text before it is all that is shown).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let shown = self.held[..at].to_string();
            self.held.clear();
            return (shown, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep =
            self.stops.iter().flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n)).find(|&n| self.held.ends_with(&s[..n]))).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let shown = self.held[..cut].to_string();
        self.held.drain(..cut);
        (shown, false)
    }

    /// The generation ended without a stop string: the rest.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// A token's log-probability as the chat API writes it (`token`,
/// `logprob`, `bytes`, `top_logprobs`); completions' arrays are made from
/// these. A token's text is its bytes, lossily: a character split across
/// tokens shows in `bytes`.
fn logprob_entry(tokenizer: &Tokenizer, lp: &TokenLogprob) -> Value {
    let token = |id: u32, logprob: f32| {
        let bytes = tokenizer.bytes(&[id]).unwrap_or_default();
        // JSON has no −∞; OpenAI writes −9999 for a token of no mass.
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": logprob.max(-9999.0), "bytes": bytes})
    };
    let mut entry = token(lp.token, lp.logprob);
    entry["top_logprobs"] = lp.top.iter().map(|t| token(t.token, t.logprob)).collect();
    entry
}

/// Hands out tokens' log-probabilities as the text they make is shown (the
/// stop matcher holds text back, and a stop string cuts the rest): an
/// entry goes once the answer's text up to its token's end has.
#[derive(Debug, Default)]
struct LogprobRelease {
    /// Entries not out yet, with where their token's text starts and ends
    /// in the answer, in characters.
    pending: VecDeque<(Value, usize, usize)>,
    pushed: usize,
    shown: usize,
}

impl LogprobRelease {
    fn push(&mut self, entry: Value, piece_chars: usize) {
        self.pending.push_back((entry, self.pushed, self.pushed + piece_chars));
        self.pushed += piece_chars;
    }

    /// `chars` more characters were shown: the entries now out, each with
    /// its text's offset.
    fn shown(&mut self, chars: usize) -> Vec<(Value, usize)> {
        self.shown += chars;
        let out = self.pending.iter().take_while(|e| e.2 <= self.shown).count();
        self.pending.drain(..out).map(|(entry, start, _)| (entry, start)).collect()
    }
}

/// What the generating thread sends to the response.
enum Update {
    /// Choice `index`'s text now final, and the log-probabilities of its
    /// tokens (when asked).
    Text {
        index: usize,
        text: String,
        logprobs: Vec<(Value, usize)>,
    },
    /// `echo`: the prompt's text and its tokens' log-probabilities come at the end.
    Done {
        index: usize,
        generation: Box<Generation>,
        stopped: bool,
        echo: Option<(String, Vec<(Value, usize)>)>,
    },
    Failed(ApiError),
}

/// Runs the generation on a blocking thread (one at a time per edge),
/// sending text as it becomes final.
fn spawn_generation(state: &AppState, req: ValidCompletion, tx: mpsc::Sender<Update>) {
    let edge = state.edge.clone();
    tokio::task::spawn_blocking(move || {
        let mut edge = edge.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // With `echo` and `logprobs`, the prompt's, asked for once.
        let mut prompt_logprobs = None;
        for index in 0..req.n {
            let (update, client_gone) = generate_choice(&mut edge, &req, index, &mut prompt_logprobs, &tx);
            let failed = matches!(update, Update::Failed(_));
            if tx.blocking_send(update).is_err() || client_gone || failed {
                return;
            }
        }
    });
}

/// Generates choice `index` of `req` (drawing with `seed + index`),
/// sending its text as it becomes final; returns the closing update and
/// whether the client went away. `prompt_logprobs`: the prompt's, once an
/// earlier choice brought them (they are the same for every choice, and
/// a session asking for them cannot start from the server's prefix cache).
fn generate_choice(
    edge: &mut Edge,
    req: &ValidCompletion,
    index: usize,
    prompt_logprobs: &mut Option<Vec<TokenLogprob>>,
    tx: &mpsc::Sender<Update>,
) -> (Update, bool) {
    let logprobs = req.logprobs.map(|top| LogprobsWanted { top, prompt: req.echo.is_some() && prompt_logprobs.is_none() });
    let sampling = SamplingParams { seed: req.sampling.seed.wrapping_add(index as u64), ..req.sampling.clone() };
    let request = GenerateRequest { prompt: req.prompt.clone(), max_new_tokens: req.max_new_tokens, draft_len: edge.draft_len, sampling, logprobs };
    let cancel = edge.cancel_flag();
    let tokenizer = edge.tokenizer.clone();
    // The token that ends the answer shows no text (vLLM's way).
    let stop_tokens = request.sampling.stop_tokens(tokenizer.eos_tokens()).to_vec();
    let mut pieces = tokenizer.stream();
    let mut matcher = StopMatcher::new(req.stop.clone());
    let mut release = LogprobRelease::default();
    let (mut stopped, mut client_gone) = (false, false);
    let result = edge.generate(&request, |e| {
        if stopped || stop_tokens.contains(&e.token) {
            return;
        }
        let piece = pieces.push(e.token).unwrap_or_default();
        if let Some(lp) = e.logprob {
            release.push(logprob_entry(&tokenizer, lp), piece.chars().count());
        }
        let (text, hit) = matcher.push(&piece);
        let logprobs = release.shown(text.chars().count());
        // A client that went away ends the generation.
        if !(text.is_empty() && logprobs.is_empty()) && tx.blocking_send(Update::Text { index, text, logprobs }).is_err() {
            client_gone = true;
            cancel.store(true, Ordering::Relaxed);
        }
        if hit {
            stopped = true;
            cancel.store(true, Ordering::Relaxed);
        }
    });
    let update = match result {
        Ok(generation) => {
            let text = if stopped { String::new() } else { matcher.finish() };
            let logprobs = release.shown(text.chars().count());
            if !(text.is_empty() && logprobs.is_empty()) {
                let _ = tx.blocking_send(Update::Text { index, text, logprobs });
            }
            info!(tokens = generation.tokens.len(), acceptance = generation.acceptance_rate, index, "completion served");
            let prompt_logprobs = prompt_logprobs.get_or_insert_with(|| generation.prompt_logprobs.clone());
            let echo = req.echo.clone().map(|text| {
                // The first prompt token has no log-probability.
                let first = logprob_entry(&tokenizer, &TokenLogprob { token: request.prompt[0], logprob: 0.0, top: vec![] });
                let first = json!({"token": first["token"], "logprob": null, "bytes": first["bytes"], "top_logprobs": null});
                let mut at = 0;
                let entries = std::iter::once(first)
                    .chain(prompt_logprobs.iter().map(|lp| logprob_entry(&tokenizer, lp)))
                    .map(|e| {
                        let start = at;
                        at += e["token"].as_str().map_or(0, |t| t.chars().count());
                        (e, start)
                    })
                    .collect::<Vec<_>>();
                (text, if request.logprobs.is_some() { entries } else { vec![] })
            });
            Update::Done { index, generation: Box::new(generation), stopped, echo }
        }
        Err(e) => {
            warn!(error = %e, "completion failed");
            Update::Failed(e.into())
        }
    };
    (update, client_gone)
}

/// The request's usage: its choices' tokens and speculation counts added
/// up (the prompt counted once; rates over the sums; the first choice's
/// time to first token and all choices' wall time, as they run in turn).
fn usage(choices: &[Generation]) -> Value {
    let sum = |f: fn(&Generation) -> usize| choices.iter().map(f).sum::<usize>();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (prompt_tokens, completion_tokens) = (choices.first().map_or(0, |g| g.prompt_tokens), sum(|g| g.tokens.len()));
    let (drafted, accepted, rounds) = (sum(|g| g.drafted), sum(|g| g.accepted), sum(|g| g.rounds));
    // Tokens the server decoded after a hand-off came from no round.
    let from_rounds = sum(|g| g.tokens.len().saturating_sub(1 + g.server_decoded));
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "tandem": {
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": ratio(accepted, drafted),
            "rounds": rounds,
            "tokens_per_round": ratio(from_rounds, rounds),
            "wasted_draft_ms": choices.iter().map(|g| g.wasted_draft_ms).sum::<f64>(),
            "ttft_ms": choices.first().map_or(0.0, |g| g.ttft_ms),
            "wall_ms": choices.iter().map(|g| g.wall_ms).sum::<f64>(),
        }
    })
}

fn finish_reason(g: &Generation, stopped: bool) -> &'static str {
    if stopped || g.stopped_on_eos {
        "stop"
    } else {
        "length"
    }
}

async fn chat_completions(State(s): State<AppState>, body: Bytes) -> Response {
    complete(s, Kind::Chat, body).await
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    complete(s, Kind::Text, body).await
}

/// A choice's `logprobs`: null when not asked for; chat's `content` list,
/// or completions' parallel arrays (offsets into the answer's text).
fn choice_logprobs(kind: Kind, asked: bool, entries: &[(Value, usize)]) -> Value {
    if !asked {
        return Value::Null;
    }
    match kind {
        Kind::Chat => json!({"content": entries.iter().map(|e| e.0.clone()).collect::<Vec<_>>()}),
        Kind::Text => {
            let top = |e: &Value| -> Value {
                match e["top_logprobs"].as_array() {
                    Some(alternatives) => {
                        Value::Object(alternatives.iter().map(|t| (t["token"].as_str().unwrap_or_default().to_string(), t["logprob"].clone())).collect())
                    }
                    None => Value::Null,
                }
            };
            json!({
                "tokens": entries.iter().map(|e| e.0["token"].clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.0["logprob"].clone()).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| top(&e.0)).collect::<Vec<_>>(),
                "text_offset": entries.iter().map(|e| e.1).collect::<Vec<_>>(),
            })
        }
    }
}

async fn complete(state: AppState, kind: Kind, body: Bytes) -> Response {
    // A schema or a regex may take a while to compile: off the worker.
    let req = match tokio::task::block_in_place(|| parse_request(kind, &body, &state.tokenizer, &state.json_tables, &crate::chat::today())) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel(64);
    let (stream, include_usage, logprobs, n, tool_call) = (req.stream, req.include_usage, req.logprobs.is_some(), req.n, req.tool_call.clone());
    spawn_generation(&state, req, tx);
    let id = next_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let head = ResponseHead { kind, id, created: unix_now(), model: state.model_id.to_string(), logprobs, n, tool_call };
    if stream {
        stream_response(head, include_usage, rx).into_response()
    } else {
        whole_response(head, rx).await
    }
}

/// What every response (or chunk) of a request repeats.
struct ResponseHead {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// Log-probabilities were asked for.
    logprobs: bool,
    /// Choices asked for.
    n: usize,
    /// The function call each chat choice is.
    tool_call: Option<Call>,
}

/// One entry of a message's `tool_calls`.
fn tool_call_entry(name: &str, arguments: &str) -> Value {
    json!({"id": next_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}})
}

/// A chat choice's whole message: its text, or the calls it makes (an
/// answer cut short before its first call opened stays text).
fn chat_message(text: String, tool_call: Option<&Call>) -> Value {
    let reply = if tool_call == Some(&Call::Auto) { auto_reply(&text) } else { None };
    let calls = match tool_call {
        _ if reply.is_some() => vec![],
        None => vec![],
        Some(Call::Named(name)) => vec![(name.clone(), text.clone())],
        Some(Call::Chosen | Call::Auto) => {
            let mut scanner = CallScanner::default();
            scanner.push(&text);
            scanner.calls()
        }
    };
    if calls.is_empty() {
        return json!({"role": "assistant", "content": reply.unwrap_or(text)});
    }
    let entries: Vec<Value> = calls.iter().map(|(name, arguments)| tool_call_entry(name, arguments)).collect();
    json!({"role": "assistant", "content": null, "tool_calls": entries})
}

async fn whole_response(head: ResponseHead, mut rx: mpsc::Receiver<Update>) -> Response {
    let ResponseHead { kind, id, created, model, logprobs, n, tool_call } = head;
    let mut texts = vec![String::new(); n];
    let mut entries = vec![vec![]; n];
    let (mut choices, mut generations) = (vec![], vec![]);
    while let Some(update) = rx.recv().await {
        match update {
            Update::Text { index, text, logprobs } => {
                texts[index].push_str(&text);
                entries[index].extend(logprobs);
            }
            Update::Failed(e) => return e.into_response(),
            Update::Done { index, generation, stopped, echo } => {
                let (mut text, mut entries) = (std::mem::take(&mut texts[index]), std::mem::take(&mut entries[index]));
                let reason = finish_reason(&generation, stopped);
                if let Some((prompt, prompt_entries)) = echo {
                    let shift = prompt.chars().count();
                    entries = prompt_entries.into_iter().chain(entries.into_iter().map(|(e, at)| (e, at + shift))).collect();
                    text.insert_str(0, &prompt);
                }
                let logprobs = choice_logprobs(kind, logprobs, &entries);
                choices.push(match kind {
                    Kind::Chat => {
                        let message = chat_message(text, tool_call.as_ref());
                        let reason = if message["tool_calls"].is_array() { call_reason(tool_call.as_ref(), reason) } else { reason };
                        json!({"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs})
                    }
                    Kind::Text => json!({"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}),
                });
                generations.push(*generation);
                if choices.len() == n {
                    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
                    return json_response(
                        json!({"id": id, "object": object, "created": created, "model": model, "choices": choices, "usage": usage(&generations)}),
                    );
                }
            }
        }
    }
    ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: "the generation ended without a result".into(), param: None }.into_response()
}

fn stream_response(head: ResponseHead, include_usage: bool, mut rx: mpsc::Receiver<Update>) -> impl IntoResponse {
    let ResponseHead { kind, id, created, model, logprobs, n, tool_call } = head;
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u;
        }
        Event::default().data(c.to_string())
    };
    let choice = move |index: usize, delta: Value, text: Option<&str>, reason: Option<&str>, entries: &[(Value, usize)]| {
        let logprobs = choice_logprobs(kind, logprobs && text.is_some(), entries);
        match kind {
            Kind::Chat => json!([{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]),
            Kind::Text => json!([{"index": index, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": logprobs}]),
        }
    };
    // A named call's arguments come as its deltas, after its name and id
    // in the opening one; so do chosen calls' and an `auto` answer's, each
    // opening once its name is written (see `CallScanner`). An `auto`
    // reply's text streams out of its JSON string.
    let named = matches!(tool_call, Some(Call::Named(_)));
    let (chosen, auto) = (tool_call == Some(Call::Chosen), tool_call == Some(Call::Auto));
    let text_delta = move |t: &str| if named { json!({"tool_calls": [{"index": 0, "function": {"arguments": t}}]}) } else { json!({"content": t}) };
    // Updates become events on a task of their own; a full channel waits
    // for the client, a closed one (client gone) drops the updates.
    let (events_tx, events_rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // Each choice's role comes first, as vLLM sends it.
        if kind == Kind::Chat {
            for index in 0..n {
                let delta = match &tool_call {
                    None => json!({"role": "assistant", "content": ""}),
                    Some(Call::Named(name)) => json!({"role": "assistant", "content": null, "tool_calls": [
                        {"index": 0, "id": next_id("call"), "type": "function", "function": {"name": name, "arguments": ""}}
                    ]}),
                    Some(Call::Chosen) => json!({"role": "assistant", "content": null}),
                    Some(Call::Auto) => json!({"role": "assistant"}),
                };
                let opening = chunk(json!([{"index": index, "delta": delta, "finish_reason": null, "logprobs": null}]), None);
                let _ = events_tx.send(opening).await;
            }
        }
        let mut generations = vec![];
        // Chosen calls' or an `auto` answer's calls as they come, the
        // log-probabilities not yet sent with them, and the reply text
        // streamed out of the latter.
        let mut scanners: Vec<CallScanner> = (0..if chosen || auto { n } else { 0 }).map(|_| CallScanner::default()).collect();
        let mut pending = vec![vec![]; scanners.len()];
        let mut replies: Vec<AutoReply> = (0..if auto { n } else { 0 }).map(|_| AutoReply::default()).collect();
        while let Some(update) = rx.recv().await {
            let events = match update {
                Update::Text { index, text, logprobs } if chosen || auto => {
                    pending[index].extend(logprobs);
                    let mut events = vec![];
                    let shown = if auto { replies[index].push(&text) } else { String::new() };
                    if !shown.is_empty() {
                        events.push(chunk(choice(index, json!({"content": shown}), Some(&shown), None, &[]), None));
                    }
                    for delta in scanners[index].push(&text) {
                        let entry = match delta {
                            CallDelta::Opened { index, name } => {
                                json!({"index": index, "id": next_id("call"), "type": "function", "function": {"name": name, "arguments": ""}})
                            }
                            CallDelta::Arguments { index, text } => json!({"index": index, "function": {"arguments": text}}),
                            CallDelta::Whole { index, name, arguments } => {
                                json!({"index": index, "id": next_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}})
                            }
                        };
                        let entries = std::mem::take(&mut pending[index]);
                        events.push(chunk(choice(index, json!({"tool_calls": [entry]}), Some(""), None, &entries), None));
                    }
                    events
                }
                Update::Text { index, text, logprobs } => vec![chunk(choice(index, text_delta(&text), Some(&text), None, &logprobs), None)],
                Update::Done { index, generation, stopped, .. } => {
                    let mut last = vec![];
                    let mut reason = finish_reason(&generation, stopped);
                    let mut entries = vec![];
                    if chosen || auto && replies[index].is_call() {
                        entries = std::mem::take(&mut pending[index]);
                        if !scanners[index].calls().is_empty() {
                            reason = call_reason(tool_call.as_ref(), reason);
                        } else {
                            // Cut short before a call opened: the answer's text.
                            let text = std::mem::take(&mut scanners[index].raw);
                            last.push(chunk(choice(index, json!({"content": text}), Some(&text), None, &std::mem::take(&mut entries)), None));
                        }
                    }
                    // Log-probabilities of the answer's closing tokens, if any.
                    let closing = (!entries.is_empty()).then_some("");
                    last.push(chunk(choice(index, json!({}), closing, Some(reason), &entries), None));
                    generations.push(*generation);
                    if generations.len() == n {
                        if include_usage {
                            last.push(chunk(json!([]), Some(usage(&generations))));
                        }
                        last.push(Event::default().data("[DONE]"));
                    }
                    last
                }
                Update::Failed(e) => vec![Event::default().data(e.body().to_string())],
            };
            for e in events {
                if events_tx.send(e).await.is_err() {
                    return;
                }
            }
        }
    });
    let events = ReceiverStream::new(events_rx).map(Ok::<_, std::convert::Infallible>);
    Sse::new(events)
}

/// A call's `finish_reason`: `tool_calls` where the model chose to call
/// (`auto`); a forced call's stays `stop`, as OpenAI gives it.
fn call_reason(call: Option<&Call>, reason: &'static str) -> &'static str {
    if call == Some(&Call::Auto) && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// An `auto` answer read as it comes: its reply's text is decoded out of
/// its JSON string as soon as whole (`{"kind": "reply", "content": "…`),
/// and a call is known at its kind.
#[derive(Debug, Default)]
struct AutoReply {
    raw: String,
    /// Bytes of `raw` read.
    at: usize,
    phase: ReplyPhase,
}

#[derive(Debug, Default, PartialEq)]
enum ReplyPhase {
    #[default]
    Head,
    Content,
    Call,
    Done,
}

impl AutoReply {
    /// Takes the answer's next text; returns the reply's text it completes.
    fn push(&mut self, text: &str) -> String {
        self.raw.push_str(text);
        if self.phase == ReplyPhase::Head {
            // The schema puts the kind first, and nothing before the
            // content's string has whitespace of its own.
            const REPLY: &str = r#"{"kind":"reply","content":""#;
            const CALL: &str = r#"{"kind":"call""#;
            let mut seen = String::new();
            for (i, c) in self.raw.char_indices().filter(|(_, c)| !c.is_ascii_whitespace()) {
                seen.push(c);
                if seen == REPLY {
                    (self.phase, self.at) = (ReplyPhase::Content, i + 1);
                    break;
                }
                if seen == CALL {
                    self.phase = ReplyPhase::Call;
                    break;
                }
            }
        }
        let mut out = String::new();
        while self.phase == ReplyPhase::Content {
            let rest = &self.raw[self.at..];
            let Some(c) = rest.chars().next() else { break };
            let (decoded, used) = match c {
                '"' => {
                    self.phase = ReplyPhase::Done;
                    (None, 1)
                }
                '\\' => match json_escape(rest) {
                    Some(step) => step,
                    None => break,
                },
                c => (Some(c), c.len_utf8()),
            };
            out.extend(decoded);
            self.at += used;
        }
        out
    }

    fn is_call(&self) -> bool {
        self.phase == ReplyPhase::Call
    }
}

/// The character an escape at the start of `s` stands for, and its
/// length; None while the escape is incomplete (a lone surrogate becomes
/// U+FFFD, as serde_json would refuse it).
fn json_escape(s: &str) -> Option<(Option<char>, usize)> {
    let b = s.as_bytes();
    let hex = |at: usize| b.get(at..at + 4).and_then(|h| u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
    Some(match *b.get(1)? {
        b'u' => {
            let unit = hex(2)?;
            if (0xd800..0xdc00).contains(&unit) {
                if b.len() < 12 {
                    return None;
                }
                match (b[6], b[7], hex(8)) {
                    (b'\\', b'u', Some(low)) if (0xdc00..0xe000).contains(&low) => (char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00)), 12),
                    _ => (Some('\u{fffd}'), 6),
                }
            } else {
                (Some(char::from_u32(unit).unwrap_or('\u{fffd}')), 6)
            }
        }
        e => (Some(unescaped_char(e)), 2),
    })
}

fn unescaped_char(e: u8) -> char {
    match e {
        b'n' => '\n',
        b't' => '\t',
        b'r' => '\r',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        other => other as char,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        let path = tandem_model::fetch::ensure_default_model(false).unwrap();
        tandem_model::LoadedModel::load(&path).unwrap().tokenizer
    }

    #[test]
    fn requests_are_checked_once_with_errors_naming_the_field() {
        let tok = tokenizer();
        let tables = JsonObjectMode::new(tok.clone());
        let chat = |body: &str| parse_request(Kind::Chat, body.as_bytes(), &tok, &tables, "07 Dec 2026");
        let ok = chat(r#"{"model":"x","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#).unwrap();
        assert_eq!(ok.max_new_tokens, MAX_NEW_TOKENS);
        assert_eq!((ok.sampling.temperature, ok.sampling.top_p, ok.stream), (1.0, 1.0, false));
        assert!(ok.stop.is_empty());
        let text = tok.decode(&ok.prompt).unwrap();
        assert!(text.contains("Be brief.") && text.contains("Hi") && !text.contains("named SmolLM"), "{text}");
        let ok = chat(r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":7,"temperature":0,"seed":3,"stop":["\n","END"],"stream":true,"stream_options":{"include_usage":true},"tools":[],"logprobs":false}"#).unwrap();
        assert_eq!((ok.max_new_tokens, ok.sampling.seed, ok.stop.len(), ok.stream, ok.include_usage), (7, 3, 2, true, true));
        let text = parse_request(Kind::Text, br#"{"prompt":["Once upon"],"max_tokens":5}"#, &tok, &tables, "07 Dec 2026").unwrap();
        assert_eq!(tok.decode(&text.prompt).unwrap(), "Once upon");
        assert_eq!(parse_request(Kind::Text, br#"{"prompt":"x"}"#, &tok, &tables, "07 Dec 2026").unwrap().max_new_tokens, 16);
        assert_eq!((ok.n, parse_request(Kind::Text, br#"{"prompt":"x","n":3,"best_of":3}"#, &tok, &tables, "07 Dec 2026").unwrap().n), (1, 3));
        assert_eq!(ok.logprobs, None);
        let penalized = chat(r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":0.5,"frequency_penalty":-1,"repetition_penalty":1.2}"#).unwrap();
        assert_eq!(penalized.sampling.penalties, Penalties { frequency: -1.0, presence: 0.5, repetition: 1.2 });
        let biased = chat(r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"198":-100,"2":5.5}}"#).unwrap();
        assert_eq!(biased.sampling.logit_bias, [(2, 5.5), (198, -100.0)]);
        let vllm = chat(r#"{"messages":[{"role":"user","content":"x"}],"top_k":40,"min_p":0.05}"#).unwrap();
        assert_eq!((vllm.sampling.top_k, vllm.sampling.min_p), (40, 0.05));
        assert_eq!(chat(r#"{"messages":[{"role":"user","content":"x"}],"top_k":-1}"#).unwrap().sampling.top_k, 0);
        let eos = tok.eos_tokens();
        let stop = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":8,"stop_token_ids":[13],"min_tokens":3}"#).unwrap();
        assert_eq!(stop.sampling.stop, StopTokens::resolve(eos, &[13], false, 3));
        let ignoring = chat(r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":true}"#).unwrap();
        assert_eq!(ignoring.sampling.stop, Some(StopTokens { tokens: vec![], min_tokens: 0 }));
        assert_eq!(chat(r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":false,"stop_token_ids":[]}"#).unwrap().sampling.stop, None);
        let json = chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#).unwrap();
        assert_eq!(json.sampling.json_object, Some(tables.clone()));
        let schema = r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}"#;
        let structured = chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{{"type":"json_schema","json_schema":{{"name":"t","strict":true,"schema":{schema}}}}}}}"#)).unwrap();
        assert_eq!(
            structured.sampling.json_object.as_ref().and_then(|j| j.schema()).map(|s| s.source()),
            Some(&*serde_json::from_str::<Value>(schema).unwrap().to_string())
        );
        let guided = chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"guided_json":{}}}"#, serde_json::to_string(schema).unwrap())).unwrap();
        assert_eq!(guided.sampling.json_object, structured.sampling.json_object);
        let unnamed = chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"t"}}}"#).unwrap();
        assert_eq!(unnamed.sampling.json_object, Some(tables.clone()));
        assert_eq!(chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"text"}}"#).unwrap().sampling.json_object, None);
        // vLLM's `guided_regex` and `guided_choice`: a regex of the whole answer.
        let regex = |body: &str| chat(body).unwrap().sampling.json_object.and_then(|j| j.regex().map(|r| r.source().to_string()));
        assert_eq!(regex(r#"{"messages":[{"role":"user","content":"x"}],"guided_regex":"[0-9]{3}"}"#).as_deref(), Some("[0-9]{3}"));
        assert_eq!(regex(r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":["yes","no (why?)"]}"#).as_deref(), Some(r"yes|no \(why\?\)"));
        // The same under vLLM's newer `structured_outputs`.
        assert_eq!(
            regex(r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"regex":"[0-9]{3}","disable_fallback":false}}"#).as_deref(),
            Some("[0-9]{3}")
        );
        assert_eq!(regex(r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"choice":["yes","no"]}}"#).as_deref(), Some("yes|no"));
        // vLLM's `guided_grammar`, llama.cpp's `grammar`: GBNF.
        let grammar = |body: &str| chat(body).unwrap().sampling.json_object.and_then(|j| j.grammar().map(|g| g.source().to_string()));
        for field in [r#""guided_grammar":"#, r#""grammar":"#, r#""structured_outputs":{"grammar":"#] {
            let close = if field.contains('{') { "}" } else { "" };
            let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{field}"root ::= [a-z]+ \"!\""{close}}}"#);
            assert_eq!(grammar(&body).as_deref(), Some(r#"root ::= [a-z]+ "!""#), "{body}");
        }
        let outputs = |so: &str| chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"structured_outputs":{so}}}"#)).unwrap().sampling.json_object;
        assert_eq!(outputs(&format!(r#"{{"json":{schema}}}"#)), structured.sampling.json_object);
        assert_eq!(outputs(r#"{"json_object":true}"#), Some(tables.clone()));
        let choice = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":["yes","no"],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none"}"#,
        );
        assert!(choice.is_ok_and(|c| c.tool_call.is_none() && c.sampling.json_object.is_some_and(|j| j.regex().is_some())));
        // Forced calls: the named function's schema constrains the answer,
        // and the system turn (the template's default one here) describes it.
        let weather = r#"{"type":"function","function":{"name":"get_weather","description":"Today's weather in a city.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}"#;
        let other = r#"{"type":"function","function":{"name":"noop"}}"#;
        let forced = chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{other},{weather}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}},"parallel_tool_calls":false}}"#
        ))
        .unwrap();
        assert_eq!(forced.tool_call, Some(Call::Named("get_weather".into())));
        let parameters = r#"{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}"#;
        assert_eq!(forced.sampling.json_object.as_ref().and_then(|j| j.schema()).map(|s| s.source()), Some(parameters));
        let text = tok.decode(&forced.prompt).unwrap();
        let instruction = format!("Call the function `get_weather` (Today's weather in a city.).\nReply with its arguments alone, as a JSON object that satisfies this JSON Schema:\n{parameters}");
        assert!(
            text.starts_with(&format!("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n{instruction}<|im_end|>")),
            "{text}"
        );
        // `required` with one tool and no parallel calls: that tool, named.
        let noop = chat(&format!(
            r#"{{"messages":[{{"role":"system","content":"Be brief."}},{{"role":"user","content":"x"}}],"tools":[{other}],"tool_choice":"required","parallel_tool_calls":false}}"#
        ))
        .unwrap();
        assert_eq!(noop.tool_call, Some(Call::Named("noop".into())));
        assert_eq!(noop.sampling.json_object.as_ref().and_then(|j| j.schema()).map(|s| s.source()), Some(r#"{"properties":{},"type":"object"}"#));
        assert!(tok.decode(&noop.prompt).unwrap().starts_with("<|im_start|>system\nBe brief.\n\nCall the function `noop`.\nReply"));
        // `required` otherwise: a list of calls, each naming its function,
        // the functions' union tagged by the name; up to 16 of them, or
        // one without parallel calls.
        let required = |tools: &str, parallel: &str| {
            chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{tools}],"tool_choice":"required"{parallel}}}"#)).unwrap()
        };
        let arm = |name: &str, arguments: &str| {
            format!(
                r#"{{"additionalProperties":false,"properties":{{"arguments":{arguments},"name":{{"const":"{name}"}}}},"required":["name","arguments"],"type":"object"}}"#
            )
        };
        let listed = |call: String, most: usize| {
            format!(
                r#"{{"additionalProperties":false,"properties":{{"calls":{{"items":{call},"maxItems":{most},"minItems":1,"type":"array"}}}},"required":["calls"],"type":"object"}}"#
            )
        };
        let source = |r: &ValidCompletion| r.sampling.json_object.as_ref().and_then(|j| j.schema()).map(|s| s.source().to_string());
        let repeated = required(other, "");
        assert_eq!((&repeated.tool_call, source(&repeated)), (&Some(Call::Chosen), Some(listed(arm("noop", r#"{"properties":{},"type":"object"}"#), 16))));
        let either = required(&format!("{other},{weather}"), "");
        assert_eq!(either.tool_call, Some(Call::Chosen));
        let union = format!(r#"{{"anyOf":[{},{}]}}"#, arm("noop", r#"{"properties":{},"type":"object"}"#), arm("get_weather", parameters));
        assert_eq!(source(&either), Some(listed(union.clone(), 16)));
        let text = tok.decode(&either.prompt).unwrap();
        assert!(
            text.contains("Call one or more of these functions:\n- `noop`\n- `get_weather` (Today's weather in a city.)\nReply with a JSON object whose `calls` lists each call's"),
            "{text}"
        );
        let single = required(&format!("{other},{weather}"), r#","parallel_tool_calls":false"#);
        assert_eq!(source(&single), Some(listed(union, 1)));
        assert!(tok.decode(&single.prompt).unwrap().contains("Call one of these functions:\n"));
        // The schema holds the answer to the calls it allows.
        let validates = |r: &ValidCompletion, text: &str| r.sampling.json_object.as_ref().unwrap().check(&tok.encode(text).unwrap()) == Some(true);
        let schema = |text: &str| validates(&single, text);
        let one = r#"{"calls":[{"name":"noop","arguments":{}}]}"#;
        assert!(schema(one) && !schema(r#"{"calls":[{"name":"noop","arguments":{}},{"name":"noop","arguments":{}}]}"#));
        assert!(!schema(r#"{"calls":[]}"#) && !schema(r#"{"calls":[{"name":"other","arguments":{}}]}"#));
        assert!(validates(&either, r#"{"calls":[{"name":"noop","arguments":{}},{"name":"get_weather","arguments":{"city":"Paris"}}]}"#));
        // Calls are read as they come: one opens as its arguments begin,
        // after its name, and their text follows; one whose name comes
        // after its arguments comes whole as it closes.
        let three = r#"{"calls": [{"name": "get_weather", "arguments": {"city": "Pa\"ris}", "at": [1, {"x": "]é"}]}}, {"name":"noop","arguments":{}}, {"arguments": {"q": 1}, "name": "noop"}]}"#;
        let calls = [("get_weather", r#"{"city": "Pa\"ris}", "at": [1, {"x": "]é"}]}"#), ("noop", "{}"), ("noop", r#"{"q": 1}"#)]
            .map(|(n, a)| (n.to_string(), a.to_string()));
        let assemble = |deltas: Vec<CallDelta>| {
            let mut calls: Vec<(String, String)> = vec![];
            for d in deltas {
                match d {
                    CallDelta::Opened { index, name } if index == calls.len() => calls.push((name, String::new())),
                    CallDelta::Whole { index, name, arguments } if index == calls.len() => calls.push((name, arguments)),
                    CallDelta::Arguments { index, text } => calls[index].1.push_str(&text),
                    other => panic!("out of order: {other:?}"),
                }
            }
            calls
        };
        let first_arguments = three.find(r#"{"city""#).unwrap();
        let mut scanner = CallScanner::default();
        assert_eq!(
            scanner.push(&three[..=first_arguments]),
            [CallDelta::Opened { index: 0, name: "get_weather".into() }, CallDelta::Arguments { index: 0, text: "{".into() }]
        );
        assert_eq!(scanner.push(r#""ci"#), [CallDelta::Arguments { index: 0, text: r#""ci"#.into() }]);
        let whole = CallScanner::default().push(three);
        assert!(matches!(whole.last(), Some(CallDelta::Whole { index: 2, .. })), "{whole:?}");
        assert_eq!(assemble(whole), calls);
        for cut in (1..three.len()).filter(|&c| three.is_char_boundary(c)) {
            let mut scanner = CallScanner::default();
            let mut deltas = scanner.push(&three[..cut]);
            deltas.extend(scanner.push(&three[cut..]));
            assert_eq!(assemble(deltas), calls, "cut at {cut}");
        }
        let mut scanner = CallScanner::default();
        let deltas: Vec<CallDelta> = three.chars().flat_map(|c| scanner.push(&c.to_string())).collect();
        assert_eq!((assemble(deltas), scanner.calls()), (calls.to_vec(), calls.to_vec()));
        let message = chat_message(three.to_string(), Some(&Call::Chosen));
        let listed: Vec<_> = message["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["function"]["name"].clone(), c["function"]["arguments"].clone(), c["id"].as_str().unwrap().to_string()))
            .collect();
        assert!(
            listed.len() == 3 && listed[0].0 == "get_weather" && listed[0].1 == calls[0].1 && listed[2].0 == "noop" && listed[0].2 != listed[1].2,
            "{message}"
        );
        // Cut short: the calls so far, the open one with its arguments so far.
        let cut = &three[..first_arguments + 8];
        assert_eq!(chat_message(cut.to_string(), Some(&Call::Chosen))["tool_calls"][0]["function"], json!({"name": "get_weather", "arguments": r#"{"city":"#}));
        assert_eq!(chat_message(three[..30].to_string(), Some(&Call::Chosen)), json!({"role": "assistant", "content": &three[..30]}));
        // Their `$defs` are hoisted to the union's root, where `$ref`s point.
        let with_defs = |name: &str, city: &str| {
            format!(
                r##"{{"type":"function","function":{{"name":"{name}","parameters":{{"$defs":{{"City":{city}}},"type":"object","properties":{{"at":{{"$ref":"#/$defs/City"}}}},"required":["at"]}}}}}}"##
            )
        };
        let city = r#"{"type":"string","maxLength":30}"#;
        let both = chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{},{}],"tool_choice":"required"}}"#,
            with_defs("a", city),
            with_defs("b", city)
        ));
        assert!(both.is_ok_and(|r| r.tool_call == Some(Call::Chosen)));
        let clash = chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{},{}],"tool_choice":"required"}}"#,
            with_defs("a", city),
            with_defs("b", "{}")
        ));
        assert!(clash.is_err_and(|e| e.param == Some("tools") && e.message.contains("`$defs.City` differently")));
        // `auto` (the default with tools): a reply or a call, told apart by
        // `kind`; no stop strings or log-probabilities of the JSON around it.
        let auto = chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}]}}"#)).unwrap();
        assert_eq!(auto.tool_call, Some(Call::Auto));
        let text = tok.decode(&auto.prompt).unwrap();
        assert!(text.contains("You can call one or more of these functions:\n- `get_weather` (Today's weather in a city.)\nTo call, reply with"), "{text}");
        let schema = auto.sampling.json_object.as_ref().and_then(|j| j.schema()).unwrap();
        assert!(
            schema.source().starts_with(r#"{"anyOf":[{"additionalProperties":false,"properties":{"content":{"type":"string"},"kind":{"const":"reply"}}"#),
            "{}",
            schema.source()
        );
        assert_eq!(
            chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}],"tool_choice":"auto"}}"#)).unwrap().tool_call,
            Some(Call::Auto)
        );
        assert_eq!(auto_reply(r#"{"kind": "reply", "content": "Hi \"you\""}"#), Some("Hi \"you\"".into()));
        let called = r#"{"kind":"call","calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}"#;
        assert_eq!(auto_reply(called), None);
        assert!(validates(&auto, called) && validates(&auto, r#"{"kind": "reply", "content": "[{\"name\": 1}]"}"#));
        assert_eq!(
            chat_message(called.into(), Some(&Call::Auto))["tool_calls"][0]["function"],
            json!({"name": "get_weather", "arguments": r#"{"city":"Paris"}"#})
        );
        assert_eq!(
            chat_message(r#"{"kind": "reply", "content": "[{\"name\": \"a\", \"arguments\": 1}]"}"#.into(), Some(&Call::Auto))["content"],
            r#"[{"name": "a", "arguments": 1}]"#
        );
        assert_eq!(auto_reply(r#"{"kind":"reply","content":"cut"#), None);
        assert_eq!(
            [call_reason(Some(&Call::Auto), "stop"), call_reason(Some(&Call::Auto), "length"), call_reason(Some(&Call::Chosen), "stop")],
            ["tool_calls", "length", "stop"]
        );
        let unused = chat(&format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}],"tool_choice":"none"}}"#)).unwrap();
        assert_eq!(
            (unused.tool_call, unused.sampling.json_object, unused.prompt),
            (None, None, chat(r#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap().prompt)
        );
        // An earlier call is the assistant's turn of its arguments; its result, a `tool` turn.
        let history = chat(r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"call-1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"call-1","content":"sunny"}]}"#).unwrap();
        let text = tok.decode(&history.prompt).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n{\"city\":\"Paris\"}<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n"), "{text}");
        // With tools, earlier turns take the answer's shape: its tags first,
        // an `auto` reply inside its JSON; such a turn satisfies the schema.
        let turns = r#"{"role":"user","content":"x"},{"role":"assistant","content":"Hi \"you\""},{"role":"user","content":"y"},{"role":"assistant","content":null,"tool_calls":[{"id":"call-1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}},{"id":"call-2","type":"function","function":{"name":"noop","arguments":"{}"}}]},{"role":"tool","tool_call_id":"call-1","content":"sunny"}"#;
        let with_tools = |choice: &str| chat(&format!(r#"{{"messages":[{turns}],"tools":[{other},{weather}]{choice}}}"#)).unwrap();
        let (auto_history, required_history) = (with_tools(""), with_tools(r#","tool_choice":"required""#));
        let calls = r#"[{"name":"get_weather","arguments":{"city": "Paris"}},{"name":"noop","arguments":{}}]"#;
        let reply = r#"{"kind":"reply","content":"Hi \"you\""}"#;
        let text = tok.decode(&auto_history.prompt).unwrap();
        assert!(text.contains(&format!("<|im_start|>assistant\n{reply}<|im_end|>")), "{text}");
        let called = format!(r#"{{"kind":"call","calls":{calls}}}"#);
        assert!(text.contains(&format!("<|im_start|>assistant\n{called}<|im_end|>")), "{text}");
        assert!(validates(&auto_history, reply) && validates(&auto_history, &called));
        let text = tok.decode(&required_history.prompt).unwrap();
        assert!(
            text.contains(&format!("<|im_start|>assistant\n{{\"calls\":{calls}}}<|im_end|>")) && text.contains("<|im_start|>assistant\nHi \"you\"<|im_end|>"),
            "{text}"
        );
        assert!(validates(&required_history, &format!(r#"{{"calls":{calls}}}"#)));
        let lp = |kind, body: &str| parse_request(kind, body.as_bytes(), &tok, &tables, "07 Dec 2026").map(|r| r.logprobs).map_err(|e| e.param);
        assert_eq!(lp(Kind::Chat, r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":3}"#), Ok(Some(3)));
        assert_eq!(lp(Kind::Chat, r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true}"#), Ok(Some(0)));
        assert_eq!(lp(Kind::Chat, r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}"#), Err(Some("top_logprobs")));
        assert_eq!(lp(Kind::Chat, r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#), Err(Some("top_logprobs")));
        assert_eq!(lp(Kind::Chat, r#"{"messages":[{"role":"user","content":"x"}],"logprobs":2}"#), Err(Some("logprobs")));
        assert_eq!(lp(Kind::Text, r#"{"prompt":"x","logprobs":0}"#), Ok(Some(0)));
        assert_eq!(lp(Kind::Text, r#"{"prompt":"x","logprobs":true}"#), Err(Some("logprobs")));
        assert_eq!(lp(Kind::Text, r#"{"prompt":"x","logprobs":2,"top_logprobs":2}"#), Err(Some("top_logprobs")));

        let cases = [
            ("not json", "body"),
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"messages":[{"role":"function","content":"x"}]}"#, "messages"),
            (r#"{"messages":[{"role":"assistant","tool_calls":[{"function":{"name":"f"}}]}]}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":1e9}"#, "max_completion_tokens"),
            (r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, "temperature"),
            (r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#, "top_p"),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#, "n"),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":1.5}"#, "n"),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":2,"best_of":3}"#, "best_of"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stop":[""]}"#, "stop"),
            (r#"{"messages":[{"role":"user","content":"x"}],"seed":"s"}"#, "seed"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "stream"),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#, "tools"),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":{"type":"function"}}"#, "tools"),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a b"}}],"tool_choice":"required"}"#, "tools"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}],"tool_choice":"none"}"#,
                "tools",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"string","format":"uri"}}}}}],"tool_choice":"required"}"#,
                "tools",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"string"}}}],"tool_choice":"required"}"#,
                "tools",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"sometimes"}"#, "tool_choice"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"parallel_tool_calls":"yes"}"#,
                "parallel_tool_calls",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"stop":"."}"#, "stop"),
            (r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"logprobs":true}"#, "logprobs"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}"#,
                "tool_choice",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"function","function":{"name":"g"}}}"#, "tool_choice"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required","response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":2.5}"#, "presence_penalty"),
            (r#"{"messages":[{"role":"user","content":"x"}],"frequency_penalty":"high"}"#, "frequency_penalty"),
            (r#"{"messages":[{"role":"user","content":"x"}],"repetition_penalty":0}"#, "repetition_penalty"),
            (r#"{"messages":[{"role":"user","content":"x"}],"min_p":1.5}"#, "min_p"),
            (r#"{"messages":[{"role":"user","content":"x"}],"top_k":2.5}"#, "top_k"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stop_token_ids":[49152]}"#, "stop_token_ids"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stop_token_ids":7}"#, "stop_token_ids"),
            (r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":1}"#, "ignore_eos"),
            (r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#, "response_format"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object","properties":{"a":{"type":"string","format":"uri"}}}}}}"#,
                "response_format",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#, "response_format"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_json":{"type":"string"}}"#, "guided_json"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"guided_json":{},"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}}"#,
                "guided_json",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_grammar":"root ::= x"}"#, "guided_grammar"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":[]}"#, "guided_choice"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":["a",1]}"#, "guided_choice"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":["a"],"guided_regex":"a"}"#, "guided_choice"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_regex":"("}"#, "guided_regex"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_regex":7}"#, "guided_regex"),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"regex":"("}}"#, "structured_outputs.regex"),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"choice":"yes"}}"#, "structured_outputs.choice"),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"json":{"type":"string"}}}"#, "structured_outputs.json"),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"grammar":"root ::= x"}}"#, "structured_outputs.grammar"),
            (r#"{"messages":[{"role":"user","content":"x"}],"grammar":7}"#, "grammar"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_grammar":"root ::= \"a\"","grammar":"root ::= \"a\""}"#, "grammar"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_grammar":"root ::= \"a\"","guided_regex":"a"}"#, "guided_grammar"),
            (r#"{"messages":[{"role":"user","content":"x"}],"grammar":"root ::= \"a\"","response_format":{"type":"json_object"}}"#, "grammar"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"grammar":"root ::= \"a\""},"grammar":"root ::= \"a\""}"#,
                "structured_outputs",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":{"regex":"a"},"guided_regex":"a"}"#, "structured_outputs"),
            (r#"{"messages":[{"role":"user","content":"x"}],"structured_outputs":[]}"#, "structured_outputs"),
            (r#"{"messages":[{"role":"user","content":"x"}],"guided_regex":"a","response_format":{"type":"json_object"}}"#, "guided_regex"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"guided_choice":["a"],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required"}"#,
                "guided_choice",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":4,"min_tokens":5}"#, "min_tokens"),
            (r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"abc":1}}"#, "logit_bias"),
            (r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":-101}}"#, "logit_bias"),
            (r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"49152":1}}"#, "logit_bias"),
        ];
        for (body, param) in cases {
            let err = chat(body).expect_err(body);
            assert_eq!(err.param, Some(param), "{body}: {}", err.message);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.body()["error"]["param"], param);
        }
        assert_eq!(parse_request(Kind::Text, br#"{"prompt":7}"#, &tok, &tables, "07 Dec 2026").unwrap_err().param, Some("prompt"));
        assert_eq!(
            parse_request(Kind::Text, br#"{"prompt":"x","tools":[{"type":"function","function":{"name":"f"}}]}"#, &tok, &tables, "07 Dec 2026")
                .unwrap_err()
                .param,
            Some("tools")
        );
        let ids = tok.encode("Once upon").unwrap();
        for body in [json!({"prompt": ids}), json!({"prompt": [ids]})] {
            let r = parse_request(Kind::Text, body.to_string().as_bytes(), &tok, &tables, "07 Dec 2026").unwrap();
            assert_eq!(r.prompt, ids, "token ids are taken as they are");
        }
        let echoed = parse_request(Kind::Text, json!({"prompt": [ids], "echo": true}).to_string().as_bytes(), &tok, &tables, "07 Dec 2026").unwrap();
        assert_eq!(echoed.echo.as_deref(), Some("Once upon"));
        for bad in [json!({"prompt": [1, -2]}), json!({"prompt": [49_152]}), json!({"prompt": [[1], [2]]}), json!({"prompt": [1.5]})] {
            assert_eq!(parse_request(Kind::Text, bad.to_string().as_bytes(), &tok, &tables, "07 Dec 2026").unwrap_err().param, Some("prompt"), "{bad}");
        }
    }

    /// A stream of calls: each opens with its index, a fresh id and its
    /// name, its arguments follow as they are written, then the reason;
    /// an answer cut short keeps its calls so far, and is text before the
    /// first; an `auto` reply streams as content.
    #[tokio::test]
    async fn calls_stream_in_order_as_they_are_written() {
        async fn stream(call: Call, pieces: Vec<&str>, stopped: bool) -> (Vec<Value>, String, Vec<Value>) {
            let head = ResponseHead { kind: Kind::Chat, id: "chatcmpl-1".into(), created: 0, model: "m".into(), logprobs: false, n: 1, tool_call: Some(call) };
            let (tx, rx) = mpsc::channel(64);
            for text in pieces {
                tx.send(Update::Text { index: 0, text: text.into(), logprobs: vec![] }).await.unwrap();
            }
            tx.send(Update::Done { index: 0, generation: Box::default(), stopped, echo: None }).await.unwrap();
            drop(tx);
            let body = axum::body::to_bytes(stream_response(head, false, rx).into_response().into_body(), usize::MAX).await.unwrap();
            let chunks: Vec<Value> = std::str::from_utf8(&body)
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0].clone())
                .collect();
            let calls: Vec<Value> = chunks.iter().flat_map(|c| c["delta"]["tool_calls"].as_array().cloned().unwrap_or_default()).collect();
            let content: String = chunks.iter().filter_map(|c| c["delta"]["content"].as_str()).collect();
            let reasons: Vec<Value> = chunks.iter().map(|c| c["finish_reason"].clone()).filter(|r| !r.is_null()).collect();
            (calls, content, reasons)
        }
        let answer = r#"{"calls": [{"name": "a", "arguments": {"x": "}]"}}, {"name": "b", "arguments": {}}, {"name": "a", "arguments": {"x": ""}}]}"#;
        let pieces: Vec<&str> = answer.as_bytes().chunks(5).map(|c| std::str::from_utf8(c).unwrap()).collect();
        // Each call: its index, id, name and arguments' text put together.
        let whole = |deltas: &[Value]| {
            let mut calls: Vec<(u64, String, String, String)> = vec![];
            for d in deltas {
                let index = d["index"].as_u64().unwrap();
                if let Some(id) = d["id"].as_str() {
                    assert!(index as usize == calls.len() && d["type"] == "function", "{d}");
                    calls.push((index, id.to_string(), d["function"]["name"].as_str().unwrap().to_string(), String::new()));
                } else {
                    assert!(index as usize + 1 == calls.len() && d["function"].get("name").is_none(), "{d}");
                }
                calls[index as usize].3.push_str(d["function"]["arguments"].as_str().unwrap());
            }
            calls
        };
        let (deltas, content, reasons) = stream(Call::Chosen, pieces.clone(), true).await;
        let calls = whole(&deltas);
        let seen: Vec<(u64, &str, &str)> = calls.iter().map(|c| (c.0, c.2.as_str(), c.3.as_str())).collect();
        assert_eq!(seen, [(0, "a", r#"{"x": "}]"}"#), (1, "b", "{}"), (2, "a", r#"{"x": ""}"#)]);
        let ids: std::collections::HashSet<&str> = calls.iter().map(|c| c.1.as_str()).collect();
        assert!(ids.len() == 3 && deltas.len() > 6, "arguments in several pieces: {deltas:?}");
        assert_eq!((content.as_str(), reasons), ("", vec![json!("stop")]));
        // Under `auto`, calls end with `tool_calls`; a reply is content.
        let called = format!(r#"{{"kind": "call", {}"#, &answer[1..]);
        let (deltas, content, reasons) = stream(Call::Auto, vec![&called], true).await;
        assert_eq!((whole(&deltas).len(), content.as_str(), reasons), (3, "", vec![json!("tool_calls")]));
        let (deltas, content, reasons) = stream(Call::Auto, vec![r#"{"kind": "reply", "content": "Hi [{"#, r#"\"x\"}]"}"#], true).await;
        assert_eq!((deltas.len(), content.as_str(), reasons), (0, r#"Hi [{"x"}]"#, vec![json!("stop")]));
        // Cut short: the calls so far, the last with its arguments so far,
        // or the text before the first.
        let (deltas, content, reasons) = stream(Call::Chosen, vec![&answer[..answer.find(r#""}]"#).unwrap()]], false).await;
        assert_eq!((whole(&deltas)[0].3.as_str(), content.as_str(), reasons), (r#"{"x": "#, "", vec![json!("length")]));
        let (deltas, content, _) = stream(Call::Chosen, vec![&answer[..20]], false).await;
        assert_eq!((deltas.len(), content.as_str()), (0, &answer[..20]));
    }

    /// An `auto` reply's text comes out of its JSON string however the
    /// answer is cut into pieces, escapes and surrogate pairs included.
    #[test]
    fn auto_replies_stream_out_of_their_json_string() {
        let answer = "{\n  \"kind\": \"reply\",\n  \"content\": \"Na\\u00efve \\\"caf\u{e9}\\\"\\n\\ud83d\\ude00 \\\\ end\"\n}";
        let content: Value = serde_json::from_str(answer).unwrap();
        let whole = content["content"].as_str().unwrap();
        let cuts: Vec<usize> = (1..answer.len()).filter(|&i| answer.is_char_boundary(i)).collect();
        for &cut in &cuts {
            let mut reply = AutoReply::default();
            let out = reply.push(&answer[..cut]) + &reply.push(&answer[cut..]);
            assert_eq!(out, whole, "cut at {cut}");
            assert!(!reply.is_call());
        }
        let mut reply = AutoReply::default();
        let out: String = answer.chars().map(|c| reply.push(&c.to_string())).collect();
        assert_eq!(out, whole, "a character at a time");
        let mut call = AutoReply::default();
        assert_eq!(call.push("{ \"kind\" : \"call\", \"call\": {\"name\": \"f\", \"arguments\": {\"content\": \"x\"}}}"), "");
        assert!(call.is_call());
    }

    #[test]
    fn log_probabilities_go_out_with_the_text_of_their_tokens() {
        let mut release = LogprobRelease::default();
        let mut m = StopMatcher::new(vec!["END".into()]);
        let mut out = vec![];
        for (i, piece) in ["Hello", "", " wor", "ld E", "NDING"].into_iter().enumerate() {
            release.push(json!(i), piece.chars().count());
            let (shown, _) = m.push(piece);
            out.push(release.shown(shown.chars().count()));
        }
        let ids = |v: &[(Value, usize)]| v.iter().map(|(e, at)| (e.as_u64().unwrap(), *at)).collect::<Vec<_>>();
        assert_eq!(ids(&out[0]), [(0, 0)]);
        assert_eq!(ids(&out[1]), [(1, 5)], "a token of no text (half a character) goes with what came before");
        assert_eq!(ids(&out[2]), [(2, 5)]);
        assert_eq!(ids(&out[3]), [], "\"ld \" is shown but the token's \"E\" is held back");
        assert!(out[4].is_empty(), "tokens cut by the stop string never go out");
    }

    #[test]
    fn stop_strings_hold_back_possible_prefixes_and_cut_at_the_match() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("Hello"), ("Hello".into(), false));
        assert_eq!(m.push(" wor"), (" wor".into(), false));
        assert_eq!(m.push("ld\n"), ("ld".into(), false), "a lone newline may start a stop string");
        assert_eq!(m.push("E"), ("\n".into(), false), "\\nE cannot become \\n\\n, but E may become END");
        assert_eq!(m.push("NDING"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("a\n"), ("a".into(), false));
        assert_eq!(m.finish(), "\n", "the held text comes out at the end");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("x\n\n"), ("x\n\n".into(), false));
    }
}
