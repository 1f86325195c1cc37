//! Tokenizer built from GGUF metadata (`tokenizer.ggml.*`).
//!
//! candle's `Tokenizer::from_gguf` prepends a space to the input ("ĠHello"
//! for "Hello"), which the reference tokenizer of GPT-2-style BPE models does
//! not. Here the BPE model, its pre-tokenizer and the special tokens are
//! assembled explicitly with the HF `tokenizers` crate, as the model's own
//! `tokenizer.json` declares them.

use crate::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
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
    Llama3 { bos: String },
}

impl ChatTemplate {
    /// The format a template's text is written for, if Tandem renders it;
    /// `bos`: the text of the model's BOS token.
    fn recognise(text: &str, bos: Option<&str>) -> Option<ChatTemplate> {
        if text.contains("<|start_header_id|>") {
            return Some(ChatTemplate::Llama3 { bos: bos.unwrap_or_default().to_string() });
        }
        if !text.contains("<|im_start|>") {
            return None;
        }
        let marker = "<|im_start|>system\n";
        let default_system = text.find(marker).and_then(|i| {
            let rest = &text[i + marker.len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string()).filter(|s| !s.contains("{{") && !s.contains('\''))
        });
        Some(ChatTemplate::ChatMl { default_system })
    }

    /// The conversation, ending where the next assistant answer begins.
    fn render(&self, messages: &[ChatMessage]) -> String {
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
            ChatTemplate::Llama3 { bos } => {
                s.push_str(bos);
                for m in messages {
                    s.push_str(&format!("<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>", m.role, m.content.trim()));
                }
                s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        s
    }
}

impl Tokenizer {
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| md.get(key).ok_or_else(|| ModelError::Tokenizer(format!("missing metadata `{key}`")));
        let model = get("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")));
        }
        let strings = |key: &str| -> Result<Vec<String>> { get(key)?.to_vec()?.iter().map(|v| Ok(v.to_string()?.clone())).collect() };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(Value::to_i32).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| ModelError::Tokenizer(format!("building BPE: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = pre_tokenizer(md.get("tokenizer.ggml.pre").map(|v| v.to_string()).transpose()?.map(String::as_str))?;
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<bool> = types.iter().map(|&t| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED).collect();
        let added: Vec<AddedToken> = tokens.iter().zip(&special).filter(|(_, &s)| s).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
        inner.add_special_tokens(&added);

        let unbyte = byte_decoder();
        let token_bytes = tokens.iter().zip(&special).map(|(t, &s)| if s { t.as_bytes().to_vec() } else { t.chars().map(&unbyte).collect() }).collect();
        let id = |key: &str| md.get(key).map(|v| v.to_u32()).transpose();
        let mut eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        add_turn_ends(&tokens, &mut eos);
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let bos_text = bos.and_then(|b| tokens.get(b as usize)).map(String::as_str);
        let chat = md.get("tokenizer.chat_template").map(|v| v.to_string()).transpose()?.and_then(|t| ChatTemplate::recognise(t, bos_text));
        Ok(Tokenizer { inner, token_bytes, special, eos, bos, chat })
    }

    /// From a Hugging Face folder: `tokenizer.json` (byte-level BPE, as
    /// from GGUF), end tokens from `config.json` and
    /// `generation_config.json`, the chat format from
    /// `tokenizer_config.json`.
    pub(crate) fn from_hf_folder(dir: &std::path::Path, config: &serde_json::Value) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = HfTokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer(format!("`{}`: {e}", path.display())))?;
        if !matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err(ModelError::Tokenizer(format!("`{}`: only byte-level BPE tokenizers are supported", path.display())));
        }
        let vocab = inner.get_vocab(true);
        let mut tokens = vec![String::new(); vocab.values().max().map_or(0, |&m| m as usize + 1)];
        for (token, id) in vocab {
            tokens[id as usize] = token;
        }
        // Added tokens are stored as their text, the rest byte-level.
        let added = inner.get_added_tokens_decoder();
        let special = (0..tokens.len() as u32).map(|i| added.get(&i).is_some_and(|t| t.special)).collect();
        let unbyte = byte_decoder();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| if added.contains_key(&(i as u32)) { t.as_bytes().to_vec() } else { t.chars().map(&unbyte).collect() })
            .collect();
        let generation = crate::hf::read_json(&dir.join("generation_config.json")).unwrap_or_default();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                v => v.as_u64().map(|x| x as u32).into_iter().collect(),
            }
        };
        let mut eos = ids(&config["eos_token_id"]);
        eos.extend(ids(&generation["eos_token_id"]));
        eos.sort_unstable();
        eos.dedup();
        add_turn_ends(&tokens, &mut eos);
        let bos = config["bos_token_id"].as_u64().map(|b| b as u32);
        let template = crate::hf::read_json(&dir.join("tokenizer_config.json")).ok().and_then(|c| match &c["chat_template"] {
            serde_json::Value::String(t) => Some(t.clone()),
            // Several named templates: the default one.
            serde_json::Value::Array(named) => named.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str().map(String::from)),
            _ => None,
        });
        let bos_text = bos.and_then(|b| tokens.get(b as usize)).map(String::as_str);
        Ok(Tokenizer { inner, token_bytes, special, eos, bos, chat: template.as_deref().and_then(|t| ChatTemplate::recognise(t, bos_text)) })
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

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.bytes(ids)?).into_owned())
    }

    fn bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            let b = self.token_bytes.get(id as usize).ok_or_else(|| ModelError::InvalidArgument(format!("token id {id} is outside the vocabulary")))?;
            out.extend_from_slice(b);
        }
        Ok(out)
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
    pub fn chat_prompt(&self, user: &str) -> String {
        self.chat_messages(&[ChatMessage { role: "user".into(), content: user.into() }])
    }

    /// The prompt for a conversation (`system`, `user` and `assistant`
    /// turns), ending where the next assistant answer begins. The model's
    /// default system prompt is added when the conversation has none.
    /// Models without a recognised template get the turns' text joined by
    /// blank lines.
    pub fn chat_messages(&self, messages: &[ChatMessage]) -> String {
        match &self.chat {
            Some(template) => template.render(messages),
            None => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"),
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

/// ChatML models end a turn with <|im_end|> and a document with
/// <|endoftext|>, Llama 3 a turn with <|eot_id|>; each ends generation.
fn add_turn_ends(tokens: &[String], eos: &mut Vec<u32>) {
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(i) = tokens.iter().position(|t| t == name) {
            if !eos.contains(&(i as u32)) {
                eos.push(i as u32);
            }
        }
    }
}

fn pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    // `use_regex` applies GPT-2's split pattern; no prefix space is added.
    let byte_level = ByteLevel::new(false, false, true);
    match pre.unwrap_or("default") {
        // SmolLM / StarCoder: every digit on its own, then GPT-2 byte-level.
        "smollm" | "starcoder" | "refact" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]))),
        "default" | "gpt2" | "gpt-2" => Ok(byte_level.into()),
        other => Err(ModelError::Tokenizer(format!("pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, refact, gpt2, default)"))),
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
        let chat = ChatTemplate::recognise(template, Some("<|begin_of_text|>")).expect("recognised");
        assert_eq!(
            chat.render(&[turn("system", "Be brief."), turn("user", " Hi \n"), turn("assistant", "Hello."), turn("user", "Bye")]),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(ChatTemplate::recognise("{{ messages }}", Some("<s>")), None);
    }
}
