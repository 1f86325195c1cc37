//! Tokenizer built from GGUF metadata (`tokenizer.ggml.*`) or a Hugging Face
//! folder's `tokenizer.json`.
//!
//! candle's `Tokenizer::from_gguf` prepends a space to the input ("ĠHello"
//! for "Hello"), which the reference tokenizer of GPT-2-style BPE models does
//! not. Here the BPE model, its pre-tokenizer and the special tokens are
//! assembled explicitly with the HF `tokenizers` crate, as the model's own
//! `tokenizer.json` declares them. `model/tests/gguf_tokenizers.rs` checks
//! them against llama.cpp's own tokenizer tests.

use crate::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer as HfTokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or `tool` (a function's result).
    pub role: String,
    pub content: String,
}

pub struct Tokenizer {
    inner: HfTokenizer,
    /// Byte string of every token (byte-level BPE undone), for exact
    /// streaming decode.
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    eos: Vec<u32>,
    bos: Option<u32>,
    /// Whether a prompt starts with `bos` (Llama 2 and 3, Mistral: yes;
    /// SmolLM, Qwen: no).
    add_bos: bool,
    chat: Option<ChatTemplate>,
}

/// The chat formats Tandem renders (Jinja templates are not evaluated; the
/// format is recognised from the template text).
#[derive(Clone, Debug, PartialEq)]
enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n`, with the default system
    /// message the template inserts when none is given.
    ChatMl { default_system: Option<String> },
    /// Llama 3: `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`,
    /// each content trimmed, the first turn after the BOS token's text.
    /// Llama 3.1 and later open with a system turn that always holds
    /// their knowledge cut-off and a date, then the system message if
    /// there is one.
    Llama3 { bos: String, preamble: Option<Llama3Preamble> },
    /// Llama 2 chat and Mistral instruct: `[INST] user [/INST]answer</s>`,
    /// as `format` writes it.
    Inst { bos: String, eos: String, format: InstFormat },
    /// Role tags: `<|role|>\ncontent` and the turn's end, then a newline.
    /// Zephyr (TinyLlama chat) ends a turn with EOS, Phi-3 with `<|end|>`;
    /// Phi-4-mini writes neither newline (`newlines` false).
    RoleTags { end: String, newlines: bool },
    /// Gemma: BOS, then `<start_of_turn>role\ncontent<end_of_turn>\n` with
    /// the assistant's role named `model` and each content trimmed; a
    /// system message opens the first user turn (Gemma 3's template; Gemma
    /// 2's refuses one).
    Gemma { bos: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum InstFormat {
    /// Llama 2 chat: BOS before every exchange, the system message in a
    /// `<<SYS>>` block of the first user turn, answers padded with spaces.
    Llama2,
    /// Mistral v0.1 and v0.2: BOS once, contents trimmed, a system message
    /// as the first user turn's first paragraph.
    Mistral,
    /// Mistral v0.3, Nemo, Codestral: `[INST] user[/INST] answer</s>`,
    /// contents as written, a system message as the last user turn's
    /// first paragraph.
    MistralV3,
}

impl ChatTemplate {
    /// The format a template's text is written for, if Tandem renders it;
    /// `bos`, `eos`: the texts of the model's BOS and EOS tokens.
    fn recognise(text: &str, bos: &str, eos: &str) -> Option<ChatTemplate> {
        if text.contains("<|start_header_id|>") {
            return Some(ChatTemplate::Llama3 { bos: bos.to_string(), preamble: Llama3Preamble::recognise(text) });
        }
        if text.contains("[INST]") {
            let format = if text.contains("<<SYS>>") {
                InstFormat::Llama2
            } else if text.contains("+ '[/INST]'") {
                InstFormat::MistralV3
            } else {
                InstFormat::Mistral
            };
            return Some(ChatTemplate::Inst { bos: bos.to_string(), eos: eos.to_string(), format });
        }
        if text.contains("<start_of_turn>") {
            return Some(ChatTemplate::Gemma { bos: bos.to_string() });
        }
        // Phi-4-mini builds each tag from the role's name.
        let built_tags = text.contains("'<|' + message['role'] + '|>'");
        if built_tags || (text.contains("<|user|>") && text.contains("<|assistant|>")) {
            let end = if text.contains("<|end|>") { "<|end|>" } else { eos };
            let newlines = !text.contains("'|>' + message['content']");
            return Some(ChatTemplate::RoleTags { end: end.to_string(), newlines });
        }
        if !text.contains("<|im_start|>") {
            return None;
        }
        // The default system message: the first system turn the template
        // writes as literal text (Qwen2.5's comes after ones built from the
        // messages).
        let marker = "<|im_start|>system\n";
        let default_system = text.match_indices(marker).find_map(|(i, _)| {
            let rest = &text[i + marker.len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string()).filter(|s| !s.contains("{{") && !s.contains('\''))
        });
        Some(ChatTemplate::ChatMl { default_system })
    }

    /// The conversation, ending where the next assistant answer begins
    /// (`today`: see [`Tokenizer::chat_messages`]).
    fn render(&self, messages: &[ChatMessage], today: Option<&str>) -> String {
        let mut s = String::new();
        match self {
            ChatTemplate::ChatMl { default_system } => {
                if let Some(sys) = default_system.as_ref().filter(|_| messages.first().is_none_or(|m| m.role != "system")) {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                for m in messages {
                    s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
                }
                s.push_str("<|im_start|>assistant\n");
            }
            ChatTemplate::Llama3 { bos, preamble } => {
                s.push_str(bos);
                let preamble = preamble.as_ref().map(|p| p.text(today));
                let mut messages = messages;
                if let Some(preamble) = preamble {
                    let system = match messages.split_first() {
                        Some((first, rest)) if first.role == "system" => {
                            messages = rest;
                            first.content.trim()
                        }
                        _ => "",
                    };
                    s.push_str(&format!("<|start_header_id|>system<|end_header_id|>\n\n{preamble}{system}<|eot_id|>"));
                }
                for m in messages {
                    // Llama 3.1's template names a function's result `ipython`.
                    let role = if m.role == "tool" { "ipython" } else { &m.role };
                    s.push_str(&format!("<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>", m.content.trim()));
                }
                s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
            ChatTemplate::Inst { bos, eos, format: InstFormat::MistralV3 } => {
                let (system, turns) = match messages.split_first() {
                    Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
                    _ => (None, messages),
                };
                let last_user = turns.iter().rposition(|m| m.role != "assistant");
                s.push_str(bos);
                for (i, m) in turns.iter().enumerate() {
                    match (m.role.as_str(), system.filter(|_| Some(i) == last_user)) {
                        ("assistant", _) => s.push_str(&format!(" {}{eos}", m.content)),
                        (_, Some(sys)) => s.push_str(&format!("[INST] {sys}\n\n{}[/INST]", m.content)),
                        _ => s.push_str(&format!("[INST] {}[/INST]", m.content)),
                    }
                }
            }
            ChatTemplate::Inst { bos, eos, format } => {
                let system_block = *format == InstFormat::Llama2;
                let (system, turns) = match messages.split_first() {
                    Some((first, rest)) if first.role == "system" => (Some(first.content.trim()), rest),
                    _ => (None, messages),
                };
                if !system_block {
                    s.push_str(bos);
                }
                for (i, m) in turns.iter().enumerate() {
                    let content = m.content.trim();
                    match (m.role.as_str(), system.filter(|_| i == 0)) {
                        ("assistant", _) if system_block => s.push_str(&format!(" {content} {eos}")),
                        ("assistant", _) => s.push_str(&format!("{content}{eos}")),
                        (_, Some(sys)) if system_block => s.push_str(&format!("{bos}[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{content} [/INST]")),
                        (_, Some(sys)) => s.push_str(&format!("[INST] {sys}\n\n{content} [/INST]")),
                        _ if system_block => s.push_str(&format!("{bos}[INST] {content} [/INST]")),
                        _ => s.push_str(&format!("[INST] {content} [/INST]")),
                    }
                }
            }
            ChatTemplate::Gemma { bos } => {
                let (system, turns) = match messages.split_first() {
                    Some((first, rest)) if first.role == "system" => (Some(first.content.trim()), rest),
                    _ => (None, messages),
                };
                s.push_str(bos);
                for (i, m) in turns.iter().enumerate() {
                    let role = if m.role == "assistant" { "model" } else { m.role.as_str() };
                    let prefix = system.filter(|_| i == 0).map(|sys| format!("{sys}\n\n")).unwrap_or_default();
                    s.push_str(&format!("<start_of_turn>{role}\n{prefix}{}<end_of_turn>\n", m.content.trim()));
                }
                s.push_str("<start_of_turn>model\n");
            }
            ChatTemplate::RoleTags { end, newlines } => {
                let newline = if *newlines { "\n" } else { "" };
                for m in messages {
                    s.push_str(&format!("<|{}|>{newline}{}{end}{newline}", m.role, m.content));
                }
                s.push_str(&format!("<|assistant|>{newline}"));
            }
        }
        s
    }
}

impl Tokenizer {
    /// From a GGUF file's `tokenizer.ggml.*` metadata: byte-level BPE
    /// (`gpt2`: GPT-2, SmolLM, Llama 3, Qwen2, …) or SentencePiece (`llama`:
    /// Llama 2, Mistral, TinyLlama, …).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| md.get(key).ok_or_else(|| ModelError::Tokenizer(format!("missing metadata `{key}`")));
        let strings = |key: &str| -> Result<Vec<String>> { get(key)?.to_vec()?.iter().map(|v| Ok(v.to_string()?.clone())).collect() };
        let flag = |key: &str| md.get(key).map(Value::to_bool).transpose();
        let model = get("tokenizer.ggml.model")?.to_string()?;
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(Value::to_i32).collect::<candle_core::Result<_>>()?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Tokenizer(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let special: Vec<bool> = types.iter().map(|&t| matches!(t, TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)).collect();
        let (mut inner, spelling, add_bos) = match model.as_str() {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not two tokens")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let pre = md.get("tokenizer.ggml.pre").map(|v| v.to_string()).transpose()?.map(String::as_str).unwrap_or("default");
                let family = BpeFamily::named(pre)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab(&tokens), merges)
                    .ignore_merges(family.ignore_merges)
                    .build()
                    .map_err(|e| ModelError::Tokenizer(format!("building BPE: {e}")))?;
                let mut inner = HfTokenizer::new(bpe);
                if family.nfc {
                    inner.with_normalizer(Some(NFC));
                }
                inner.with_pre_tokenizer(Some(family.pre_tokenizer));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
                (inner, Spelling::ByteLevel, flag("tokenizer.ggml.add_bos_token")?.unwrap_or(family.add_bos))
            }
            "llama" => {
                let scores: Vec<f32> = get("tokenizer.ggml.scores")?.to_vec()?.iter().map(Value::to_f32).collect::<candle_core::Result<_>>()?;
                let add_space_prefix = flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let unk = md.get("tokenizer.ggml.unknown_token_id").map(Value::to_u32).transpose()?.and_then(|u| tokens.get(u as usize));
                let inner = sentencepiece(&tokens, &types, &scores, unk, add_space_prefix)?;
                (inner, Spelling::SentencePiece, flag("tokenizer.ggml.add_bos_token")?.unwrap_or(true))
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "tokenizer model `{other}` is not supported (supported: `gpt2`, byte-level BPE; `llama`, SentencePiece)"
                )))
            }
        };
        let added: Vec<AddedToken> = tokens.iter().zip(&special).filter(|(_, &s)| s).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| md.get(key).map(|v| v.to_u32()).transpose();
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        add_turn_ends(&tokens, &mut eos);
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let template = md.get("tokenizer.chat_template").map(|v| v.to_string()).transpose()?;
        let chat = template.and_then(|t| ChatTemplate::recognise(t, token_text(&tokens, bos.as_ref()), token_text(&tokens, eos.first())));
        let token_bytes = spelling.token_bytes(&tokens, |i| special[i]);
        Ok(Tokenizer { inner, token_bytes, special, eos, bos, add_bos, chat })
    }

    /// From a Hugging Face folder: `tokenizer.json` (byte-level BPE, as
    /// from GGUF), end tokens from `config.json` and
    /// `generation_config.json`, the chat format from
    /// `tokenizer_config.json`.
    pub fn from_hf_folder(dir: &std::path::Path, config: &serde_json::Value) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = HfTokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer(format!("`{}`: {e}", path.display())))?;
        let spelling = match (inner.get_decoder(), inner.get_model()) {
            (Some(DecoderWrapper::ByteLevel(_)), _) => Spelling::ByteLevel,
            // Llama 2 and Mistral folders: SentencePiece as BPE.
            (_, ModelWrapper::BPE(bpe)) if bpe.byte_fallback => Spelling::SentencePiece,
            _ => {
                return Err(ModelError::Tokenizer(format!(
                    "`{}`: only byte-level BPE and SentencePiece BPE (byte fallback) tokenizers are supported",
                    path.display()
                )))
            }
        };
        let vocab = inner.get_vocab(true);
        let mut tokens = vec![String::new(); vocab.values().max().map_or(0, |&m| m as usize + 1)];
        for (token, id) in vocab {
            tokens[id as usize] = token;
        }
        let added = inner.get_added_tokens_decoder();
        let special = (0..tokens.len() as u32).map(|i| added.get(&i).is_some_and(|t| t.special)).collect();
        let token_bytes = spelling.token_bytes(&tokens, |i| added.contains_key(&(i as u32)));
        let generation = crate::hf::read_json(&dir.join("generation_config.json")).unwrap_or_default();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                v => v.as_u64().map(|x| x as u32).into_iter().collect(),
            }
        };
        let mut eos = ids(&config["eos_token_id"]);
        // The EOS a chat template writes: the config's (first) one.
        let template_eos = eos.first().copied();
        eos.extend(ids(&generation["eos_token_id"]));
        eos.sort_unstable();
        eos.dedup();
        add_turn_ends(&tokens, &mut eos);
        let bos = config["bos_token_id"].as_u64().map(|b| b as u32);
        let tokenizer_config = crate::hf::read_json(&dir.join("tokenizer_config.json")).unwrap_or_default();
        // `add_bos_token` when the config says; otherwise whether the
        // tokenizer's post-processor adds BOS (Llama 3's does).
        let add_bos = match tokenizer_config["add_bos_token"].as_bool() {
            Some(add) => add,
            None => bos.is_some() && inner.encode("", true).map_err(|e| ModelError::Tokenizer(e.to_string()))?.get_ids().first() == bos.as_ref(),
        };
        let template = match &tokenizer_config["chat_template"] {
            serde_json::Value::String(t) => Some(t.clone()),
            // Several named templates: the default one.
            serde_json::Value::Array(named) => named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str().map(String::from)),
            _ => None,
        };
        let chat = template.and_then(|t| ChatTemplate::recognise(&t, token_text(&tokens, bos.as_ref()), token_text(&tokens, template_eos.as_ref())));
        Ok(Tokenizer { inner, token_bytes, special, eos, bos, add_bos, chat })
    }

    /// This tokenizer as a Hugging Face `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Encodes text exactly as given: special-token strings become their
    /// ids, nothing is prepended.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a prompt: as [`Tokenizer::encode`], with the model's BOS token
    /// in front when the model's prompts start with one (Llama 2 and 3,
    /// Mistral) and the text does not already begin with it (a chat
    /// template may write it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.bytes(ids)?).into_owned())
    }

    /// The bytes `ids` stand for, special tokens included: the text before
    /// UTF-8 decoding (a character may be split across tokens).
    pub fn bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            let b = self.token_bytes.get(id as usize).ok_or_else(|| ModelError::InvalidArgument(format!("token id {id} is outside the vocabulary")))?;
            out.extend_from_slice(b);
        }
        Ok(out)
    }

    /// One token's bytes (empty for an id outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Tokens that end generation.
    pub fn eos_tokens(&self) -> &[u32] {
        &self.eos
    }

    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    /// The prompt for one user message in the model's chat format, ending
    /// where the assistant's answer begins. Models without a recognised
    /// template get the text unchanged.
    /// Dated as [`Self::chat_messages`] with no `today`: the same prompt
    /// on every day (the bench's and the tests' prompts).
    pub fn chat_prompt(&self, user: &str) -> String {
        self.chat_messages(&[ChatMessage { role: "user".into(), content: user.into() }], None)
    }

    /// The prompt for a conversation (`system`, `user` and `assistant`
    /// turns), ending where the next assistant answer begins. The model's
    /// default system prompt is added when the conversation has none.
    /// Models without a recognised template get the turns' text joined by
    /// blank lines. `today` (as [`template_date`] writes it) is the date
    /// for templates that ask for the current one (Llama 3.2's); None
    /// keeps the template's default.
    pub fn chat_messages(&self, messages: &[ChatMessage], today: Option<&str>) -> String {
        match &self.chat {
            Some(template) => template.render(messages, today),
            None => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"),
        }
    }

    /// The system prompt the chat template writes when a conversation has
    /// none (SmolLM2's names the assistant).
    pub fn default_system(&self) -> Option<&str> {
        match &self.chat {
            Some(ChatTemplate::ChatMl { default_system }) => default_system.as_deref(),
            _ => None,
        }
    }

    /// A decoder that turns a stream of ids into text pieces, holding back
    /// bytes of a UTF-8 character split across tokens.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { tok: self, pending: Vec::new() }
    }
}

/// Incremental detokenizer (see [`Tokenizer::stream`]).
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl TextStream<'_> {
    /// Text completed by `id`; special tokens produce nothing.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.tok.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend(self.tok.bytes(&[id])?);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits for the next token;
            // an invalid sequence is emitted lossily.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        Ok(text)
    }
}

/// Llama 3.1 and later templates' fixed start of the system turn:
/// `Cutting Knowledge Date: …\nToday Date: …\n\n`.
#[derive(Clone, Debug, PartialEq)]
struct Llama3Preamble {
    cutoff: String,
    /// The template's literal date ("26 Jul 2024" in Meta's): what Llama
    /// 3.1's template always renders, and Llama 3.2's when not given
    /// today's.
    default_date: String,
    /// Whether the template asks for today's date (`strftime_now`, Llama
    /// 3.2), as llama.cpp's and transformers' renderers give it.
    asks_today: bool,
}

impl Llama3Preamble {
    fn recognise(template: &str) -> Option<Llama3Preamble> {
        // Up to the end of the template's string literal, or its `\n`.
        let literal = |after: &str| -> Option<String> {
            let rest = &template[template.find(after)? + after.len()..];
            let end = rest.find(['"', '\'', '\\', '\n']).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        };
        Some(Llama3Preamble {
            cutoff: literal("Cutting Knowledge Date: ")?,
            default_date: literal("set date_string = \"").unwrap_or_else(|| "26 Jul 2024".to_string()),
            asks_today: template.contains("strftime_now"),
        })
    }

    fn text(&self, today: Option<&str>) -> String {
        let date = today.filter(|_| self.asks_today).unwrap_or(&self.default_date);
        format!("Cutting Knowledge Date: {}\nToday Date: {date}\n\n", self.cutoff)
    }
}

/// A day as Llama 3.2's template writes it (`strftime("%d %b %Y")`:
/// "07 Dec 2026"), from seconds since the Unix epoch (UTC).
pub fn template_date(unix_secs: u64) -> String {
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!("{day:02} {} {year}", MONTHS[month as usize - 1])
}

/// The text of token `id`, or nothing.
fn token_text<'a>(tokens: &'a [String], id: Option<&u32>) -> &'a str {
    id.and_then(|&i| tokens.get(i as usize)).map_or("", String::as_str)
}

/// ChatML models end a turn with <|im_end|> and a document with
/// <|endoftext|>, Llama 3 a turn with <|eot_id|>, Phi-3 with <|end|>, Gemma
/// with <end_of_turn>; each ends generation.
fn add_turn_ends(tokens: &[String], eos: &mut Vec<u32>) {
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
        if let Some(i) = tokens.iter().position(|t| t == name) {
            if !eos.contains(&(i as u32)) {
                eos.push(i as u32);
            }
        }
    }
}

fn vocab(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect()
}

/// What a byte-level BPE tokenizer does before its merges, by the
/// `tokenizer.ggml.pre` name llama.cpp's converter writes. The split
/// patterns are the ones the models' own `tokenizer.json` files declare.
struct BpeFamily {
    pre_tokenizer: PreTokenizerWrapper,
    /// Unicode NFC first (Qwen2).
    nfc: bool,
    /// A pre-token found whole in the vocabulary is one token, whatever the
    /// merges would make of it (Llama 3).
    ignore_merges: bool,
    /// Whether prompts start with BOS when the file does not say.
    add_bos: bool,
}

impl BpeFamily {
    fn named(pre: &str) -> Result<BpeFamily> {
        // GPT-2's split pattern (`use_regex`), no prefix space.
        let gpt2 = || ByteLevel::new(false, false, true);
        // Split patterns applied in turn (and every digit alone, with
        // `digits`), then byte-level BPE on each piece.
        let splits = |patterns: &[&str], digits: bool| -> Result<PreTokenizerWrapper> {
            let mut steps = patterns
                .iter()
                .map(|p| {
                    let split = Split::new(SplitPattern::Regex(p.to_string()), SplitDelimiterBehavior::Isolated, false);
                    split.map(PreTokenizerWrapper::from).map_err(|e| ModelError::Tokenizer(format!("split pattern: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            if digits {
                steps.push(Digits::new(true).into());
            }
            steps.push(ByteLevel::new(false, true, false).into());
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(steps)))
        };
        let family = |pre_tokenizer, nfc, ignore_merges, add_bos| BpeFamily { pre_tokenizer, nfc, ignore_merges, add_bos };
        Ok(match pre {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" => family(gpt2().into(), false, false, false),
            // SmolLM, StarCoder: every digit on its own, then GPT-2's pattern.
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => {
                family(PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), gpt2().into()])), false, false, false)
            }
            "llama-bpe" | "llama3" | "llama-v3" => family(splits(&[LLAMA3_SPLIT], false)?, false, true, true),
            "qwen2" | "deepseek-r1-qwen" => family(splits(&[QWEN2_SPLIT], false)?, true, false, false),
            // Phi-4-mini (o200k), Llama 4.
            "gpt-4o" | "llama4" => family(splits(&[GPT4O_SPLIT], false)?, false, false, false),
            // Newlines, words of Latin, Greek, Cyrillic, … letters,
            // punctuation runs, trailing spaces, CJK runs, digit runs.
            "deepseek-llm" => family(splits(&["[\r\n]", DEEPSEEK_LLM_WORD, DEEPSEEK_LLM_PUNCTUATION, r"\s+$", "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"], false)?, false, false, true),
            // Newlines, words, punctuation runs, CJK runs, then digits.
            "deepseek-coder" => family(splits(&["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+"], true)?, false, false, true),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "pre-tokenizer `{other}` is not supported (supported: llama-bpe, qwen2, gpt-4o, llama4, deepseek-llm, deepseek-coder, smollm, starcoder, refact, codeshell, command-r, gpt-2, mpt, olmo, default)"
                )))
            }
        })
    }
}

/// Llama 3's split: contractions, words with one leading non-letter, numbers
/// in groups of up to three, punctuation runs, newlines, spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's: Llama 3's, but a word is a run of capitals then one of lower
/// case (`fooBar` is two), with its contraction, and a punctuation run
/// takes the newlines and slashes after it.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's words: an optional space, then letters of the scripts
/// with case (its `tokenizer.json` lists them as ranges).
const DEEPSEEK_LLM_WORD: &str = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";
/// DeepSeek LLM's punctuation runs, ASCII and full-width.
const DEEPSEEK_LLM_PUNCTUATION: &str = r"\s?[!-/:-~！-／：-～‘-‟　-。]+";
/// Qwen2's: Llama 3's with every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A SentencePiece BPE vocabulary (GGUF `llama` tokenizers) as a BPE model
/// with merges: SentencePiece joins the adjacent pair whose joined piece
/// scores highest, so every split of a piece into two pieces is a merge,
/// ranked by the joined piece's score. Text gets `▁` for spaces (and one in
/// front, unless the file says not to); characters outside the vocabulary
/// fall back to byte tokens (`<0x0A>`).
fn sentencepiece(tokens: &[String], types: &[i32], scores: &[f32], unk: Option<&String>, add_space_prefix: bool) -> Result<HfTokenizer> {
    if scores.len() != tokens.len() {
        return Err(ModelError::Tokenizer(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|&(i, _)| types[i] == TOKEN_TYPE_NORMAL).map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (&piece, &id) in &ids {
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..cut]), ids.get(&piece[cut..])) {
                merges.push((scores[id], l, r, id));
            }
        }
    }
    // Highest score first; one piece's splits in the order of their ids.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.3.cmp(&b.3)).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = merges.into_iter().map(|(_, l, r, _)| (tokens[l].clone(), tokens[r].clone())).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab(tokens), merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk.clone());
    }
    let mut inner = HfTokenizer::new(bpe.build().map_err(|e| ModelError::Tokenizer(format!("building BPE: {e}")))?);
    let space = Replace::new(" ", "\u{2581}").map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let normalizer: NormalizerWrapper =
        if add_space_prefix { NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), space.into()]).into() } else { space.into() };
    inner.with_normalizer(Some(normalizer));
    let to_space = Replace::new("\u{2581}", " ").map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut decoders: Vec<DecoderWrapper> = vec![to_space.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// How a vocabulary spells a token's bytes.
enum Spelling {
    /// GPT-2's byte-to-character map.
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xAB>` for a byte of its own.
    SentencePiece,
}

impl Spelling {
    /// The bytes of every token; `as_text(i)`: token `i` stands for its own
    /// text (special and added tokens).
    fn token_bytes(&self, tokens: &[String], as_text: impl Fn(usize) -> bool) -> Vec<Vec<u8>> {
        let unbyte = byte_decoder();
        let spell = |t: &String| -> Vec<u8> {
            match self {
                Spelling::ByteLevel => t.chars().map(&unbyte).collect(),
                Spelling::SentencePiece => match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2) {
                    Some(hex) => u8::from_str_radix(hex, 16).map_or_else(|_| t.as_bytes().to_vec(), |b| vec![b]),
                    None => t.replace('\u{2581}', " ").into_bytes(),
                },
            }
        };
        tokens.iter().enumerate().map(|(i, t)| if as_text(i) { t.as_bytes().to_vec() } else { spell(t) }).collect()
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes map to
/// themselves, the other 68 to U+0100 onwards.
fn byte_decoder() -> impl Fn(char) -> u8 {
    let mut table = std::collections::HashMap::new();
    let mut next = 0u32;
    for b in 0u32..=255 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let c = if printable {
            b
        } else {
            next += 1;
            255 + next
        };
        table.insert(char::from_u32(c).expect("valid code point"), b as u8);
    }
    move |c| table.get(&c).copied().unwrap_or(b'?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// Meta-Llama-3-8B-Instruct's template, as its tokenizer_config.json
    /// holds it, renders as that template does: BOS first, each turn's
    /// content trimmed, the assistant's header last.
    #[test]
    fn a_llama_3_template_renders_its_header_format() {
        let template = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let chat = ChatTemplate::recognise(template, "<|begin_of_text|>", "<|end_of_text|>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("system", "Be brief."), turn("user", " Hi \n"), turn("assistant", "Hello."), turn("user", "Bye")], None),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(ChatTemplate::recognise("{{ messages }}", "<s>", "</s>"), None);
    }

    /// Llama-3.1-8B-Instruct's template (its tool branches cut): a system
    /// turn with the knowledge cut-off and the date always comes first.
    #[test]
    fn a_llama_3_1_template_opens_with_its_dated_system_turn() {
        let template = "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";
        let chat = ChatTemplate::recognise(template, "<|begin_of_text|>", "<|eot_id|>").expect("recognised");
        let preamble = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
        assert_eq!(
            chat.render(&[turn("user", "Hi")], None),
            format!("{preamble}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        );
        assert_eq!(
            chat.render(&[turn("system", " Be brief. "), turn("user", "Hi")], None),
            format!("{preamble}Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        );
        // A function's result is an `ipython` turn, as Llama 3.1's tool branches write it.
        assert!(chat
            .render(&[turn("user", "Hi"), turn("assistant", "{}"), turn("tool", "42")], None)
            .ends_with("<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
        // Llama 3.1's keeps its date whatever the day.
        assert_eq!(chat.render(&[turn("user", "Hi")], Some("07 Dec 2026")), chat.render(&[turn("user", "Hi")], None));
        // Llama 3.2's asks for today's date, and has the default otherwise.
        let llama_3_2 = "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}{%- endif %}{{- \"Cutting Knowledge Date: December 2023\\n\" }}";
        let preamble = Llama3Preamble::recognise(llama_3_2).unwrap();
        assert_eq!(preamble.text(Some("07 Dec 2026")), "Cutting Knowledge Date: December 2023\nToday Date: 07 Dec 2026\n\n");
        assert_eq!(preamble.text(None), "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n");
        assert_eq!(Llama3Preamble::recognise("{{ bos_token }}<|start_header_id|>"), None);
    }

    #[test]
    fn template_dates_are_strftime_s_day_month_year() {
        assert_eq!(template_date(0), "01 Jan 1970");
        // 2024-02-29 12:00 UTC, a leap day; 2026-12-07 23:59:59 UTC.
        assert_eq!(template_date(1_709_208_000), "29 Feb 2024");
        assert_eq!(template_date(1_796_687_999), "07 Dec 2026");
        assert_eq!(template_date(1_796_688_000), "08 Dec 2026");
    }

    /// Qwen2.5's template writes its default system message after system
    /// turns built from the messages.
    #[test]
    fn a_qwen_2_5_template_gives_its_default_system_message() {
        let template = "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- endif %}";
        let chat = ChatTemplate::recognise(template, "", "<|endoftext|>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("user", "Hi")], None),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    /// Llama-2-7b-chat-hf's template: BOS and `[INST]` for every user turn,
    /// the system message in a `<<SYS>>` block of the first, answers padded
    /// with spaces and closed with EOS.
    #[test]
    fn a_llama_2_template_renders_its_inst_format() {
        let template = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
        let chat = ChatTemplate::recognise(template, "<s>", "</s>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("system", "Be brief."), turn("user", "Hi "), turn("assistant", "Hello."), turn("user", "Bye")], None),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
        );
        assert_eq!(chat.render(&[turn("user", "Hi")], None), "<s>[INST] Hi [/INST]");
    }

    /// Mistral-7B-Instruct-v0.1's template: BOS once, answers closed with
    /// EOS; a system message becomes the first user turn's first paragraph.
    #[test]
    fn a_mistral_template_renders_its_inst_format() {
        let template = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";
        let chat = ChatTemplate::recognise(template, "<s>", "</s>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("user", "Hi"), turn("assistant", "Hello."), turn("user", "Bye")], None),
            "<s>[INST] Hi [/INST]Hello.</s>[INST] Bye [/INST]"
        );
        assert_eq!(chat.render(&[turn("system", "Be brief."), turn("user", "Hi")], None), "<s>[INST] Be brief.\n\nHi [/INST]");
    }

    /// Mistral-7B-Instruct-v0.3's template (Nemo's and Codestral's too): no
    /// space before `[/INST]`, one before each answer, contents untrimmed,
    /// the system message in the last user turn.
    #[test]
    fn a_mistral_v0_3_template_renders_its_tighter_inst_format() {
        let template = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.last and system_message is defined %}\n            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n        {%- else %}\n            {{- '[INST] ' + message['content'] + '[/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n";
        let chat = ChatTemplate::recognise(template, "<s>", "</s>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello!"), turn("user", "  padded  ")], None),
            "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\n  padded  [/INST]"
        );
    }

    /// TinyLlama-1.1B-Chat's (Zephyr) template, and Phi-3-mini's.
    #[test]
    fn zephyr_and_phi_3_templates_render_their_role_tags() {
        let template = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
        let chat = ChatTemplate::recognise(template, "<s>", "</s>").expect("recognised");
        assert_eq!(chat.render(&[turn("system", "Be brief."), turn("user", "Hi")], None), "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n");
        let phi3 = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}";
        let chat = ChatTemplate::recognise(phi3, "<s>", "<|endoftext|>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("user", "Hi"), turn("assistant", "Hello."), turn("user", "Bye")], None),
            "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
        );
    }

    /// Gemma 2's template (gemma-2-2b-it): `model` for the assistant,
    /// contents trimmed; a system message opens the first user turn, as
    /// Gemma 3's template writes it.
    #[test]
    fn a_gemma_template_renders_its_turns() {
        let template = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";
        let chat = ChatTemplate::recognise(template, "<bos>", "<eos>").expect("recognised");
        assert_eq!(
            chat.render(&[turn("user", " Hi "), turn("assistant", "Hello."), turn("user", "Bye")], None),
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            chat.render(&[turn("system", "Be brief."), turn("user", "Hi")], None),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    /// Phi-4-mini-instruct's template builds each tag from the role and
    /// writes no newlines.
    #[test]
    fn a_phi_4_mini_template_renders_its_tags_without_newlines() {
        let template = "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";
        let chat = ChatTemplate::recognise(template, "<|endoftext|>", "<|endoftext|>").expect("recognised");
        assert_eq!(chat.render(&[turn("system", "Be brief."), turn("user", "Hi")], None), "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>");
    }

    /// GPT-4o's split (Phi-4-mini's GGUF `tokenizer.ggml.pre`): pieces as
    /// its pattern cuts them; the pattern's parts are marked.
    #[test]
    fn the_gpt_4o_split_cuts_camel_case_numbers_and_punctuation() {
        let BpeFamily { pre_tokenizer, .. } = BpeFamily::named("gpt-4o").unwrap();
        let mut s = tokenizers::PreTokenizedString::from("HTTPServer's fooBar 12345 ./\n\n  x");
        tokenizers::PreTokenizer::pre_tokenize(&pre_tokenizer, &mut s).unwrap();
        let pieces: Vec<String> =
            s.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect();
        // Byte-level: Ġ is a space, Ċ a newline.
        assert_eq!(pieces, ["HTTPServer's", "Ġfoo", "Bar", "Ġ", "123", "45", "Ġ./ĊĊ", "Ġ", "Ġx"]);
    }
}
