//! OpenAI's JSON mode (`response_format: {"type": "json_object"}`): the
//! target may pick only tokens that keep the output a prefix of one JSON
//! object, and may end it only once the object is closed. A function of
//! the output so far, like the penalties, so drafting stays exact: drafts
//! propose freely and the target's masked rows judge them.
//!
//! The grammar is JSON's (RFC 8259) with an object at the top and
//! llama.cpp's whitespace rule from its `json.gbnf`: between tokens at
//! most one space, or a newline followed by up to 20 spaces or tabs. An
//! unbounded run would let a small model pad forever.

use crate::grammar::OutputGrammar;
use crate::json_schema::{JsonSchema, OutputRegex};
use crate::sampling::TokenLogits;
use crate::{StopTokens, Tokenizer};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Deepest nesting of objects and arrays.
const MAX_DEPTH: u8 = 64;
/// Spaces or tabs after a newline (llama.cpp's `[ \t]{0,20}`).
const MAX_INDENT: u8 = 20;
const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where the lexer stands between two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lex {
    /// Before the top-level object: `{`.
    Start,
    /// After `:` or an array's `,`: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After an object's `,`: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the container's closer; at depth 0 the
    /// object is complete and nothing may follow.
    After,
    /// In a string (a key if `key`). `escape`: 0 none, 1 after `\`, 2..=5
    /// inside `\uXXXX` (4 hex digits from 2); `utf8`: continuation bytes
    /// still due.
    Str {
        key: bool,
        escape: u8,
        utf8: u8,
    },
    Number(Num),
    /// In `true`, `false` or `null` (`WORDS[word]`), `at` bytes matched.
    Literal {
        word: u8,
        at: u8,
    },
}

/// A number's states: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// A number's first byte.
    pub(crate) fn first(b: u8) -> Option<Num> {
        match b {
            b'-' => Some(Num::Minus),
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int),
            _ => None,
        }
    }

    pub(crate) fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') | (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => Exp,
            (Exp, b'+' | b'-') => ExpSign,
            (Exp | ExpSign | ExpDigits, b'0'..=b'9') => ExpDigits,
            _ => return None,
        })
    }

    pub(crate) fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }

    /// Still an integer (no fraction or exponent yet).
    pub(crate) fn integral(self) -> bool {
        matches!(self, Num::Minus | Num::Zero | Num::Int)
    }
}

/// A valid prefix of one JSON object, byte by byte. Copy, so a candidate
/// token is tried on a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct JsonState {
    lex: Lex,
    depth: u8,
    /// Bit i set: the container at depth i + 1 is an object.
    objects: u64,
    /// The whitespace run so far: 0 none, 1 one space, 2 + n a newline
    /// and n spaces or tabs.
    ws: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState { lex: Lex::Start, depth: 0, objects: 0, ws: 0 }
    }
}

impl JsonState {
    /// Whether the object is closed (then only the end may follow).
    pub fn complete(&self) -> bool {
        self.lex == Lex::After && self.depth == 0
    }

    /// Feeds `bytes`; false (and a state to drop) if they leave the grammar.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Before one JSON value of any kind, not only an object (a JSON
    /// schema's unconstrained value).
    pub(crate) fn before_value() -> Self {
        JsonState { lex: Lex::Value, ..JsonState::default() }
    }

    /// Whether the value read so far may end before the next byte (a
    /// complete number may also go on).
    pub(crate) fn can_end(&self) -> bool {
        self.complete() || matches!(self.lex, Lex::Number(n) if n.complete())
    }

    /// Inside a string between characters, where plain text changes nothing.
    pub(crate) fn in_plain_string(&self) -> bool {
        matches!(self.lex, Lex::Str { escape: 0, utf8: 0, .. })
    }

    pub fn feed(&mut self, b: u8) -> bool {
        match self.lex {
            Lex::Str { key, escape, utf8 } => return self.string(key, escape, utf8, b),
            Lex::Literal { word, at } => {
                let w = WORDS[word as usize];
                if w[at as usize] != b {
                    return false;
                }
                self.lex = if at as usize + 1 == w.len() { Lex::After } else { Lex::Literal { word, at: at + 1 } };
                return true;
            }
            Lex::Number(n) => match n.next(b) {
                Some(n) => {
                    self.lex = Lex::Number(n);
                    return true;
                }
                // The byte ends the number and is read after it.
                None if n.complete() => self.lex = Lex::After,
                None => return false,
            },
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n') {
            return self.whitespace(b);
        }
        self.ws = 0;
        let in_object = self.depth > 0 && (self.objects >> (self.depth - 1)) & 1 == 1;
        match (self.lex, b) {
            (Lex::Start, b'{') => self.open(true),
            (Lex::ArrayFirst, b']') => self.close(),
            (Lex::Value | Lex::ArrayFirst, _) => self.value(b),
            (Lex::ObjectFirst, b'}') => self.close(),
            (Lex::ObjectFirst | Lex::Key, b'"') => {
                self.lex = Lex::Str { key: true, escape: 0, utf8: 0 };
                true
            }
            (Lex::Colon, b':') => {
                self.lex = Lex::Value;
                true
            }
            (Lex::After, b',') if self.depth > 0 => {
                self.lex = if in_object { Lex::Key } else { Lex::Value };
                true
            }
            (Lex::After, b'}') if in_object => self.close(),
            (Lex::After, b']') if self.depth > 0 && !in_object => self.close(),
            _ => false,
        }
    }

    fn value(&mut self, b: u8) -> bool {
        self.lex = match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b'"' => Lex::Str { key: false, escape: 0, utf8: 0 },
            b'-' | b'0'..=b'9' => Lex::Number(Num::first(b).expect("a number's first byte")),
            b't' => Lex::Literal { word: 0, at: 1 },
            b'f' => Lex::Literal { word: 1, at: 1 },
            b'n' => Lex::Literal { word: 2, at: 1 },
            _ => return false,
        };
        true
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        self.objects = self.objects & !(1 << self.depth) | (object as u64) << self.depth;
        self.depth += 1;
        self.lex = if object { Lex::ObjectFirst } else { Lex::ArrayFirst };
        true
    }

    fn close(&mut self) -> bool {
        self.depth -= 1;
        self.lex = Lex::After;
        true
    }

    fn whitespace(&mut self, b: u8) -> bool {
        if self.complete() {
            return false;
        }
        whitespace_step(&mut self.ws, b)
    }

    fn string(&mut self, key: bool, escape: u8, utf8: u8, b: u8) -> bool {
        match string_step(escape, utf8, b) {
            StrStep::Closed => self.lex = if key { Lex::Colon } else { Lex::After },
            StrStep::In { escape, utf8 } => self.lex = Lex::Str { key, escape, utf8 },
            StrStep::Refused => return false,
        }
        true
    }
}

/// The whitespace run `ws` (0 none, 1 one space, 2 + n a newline and n
/// spaces or tabs) after `b`; false if the run may not go on.
pub(crate) fn whitespace_step(ws: &mut u8, b: u8) -> bool {
    *ws = match (*ws, b) {
        (0, b' ') => 1,
        (0, b'\n') => 2,
        (w, b' ' | b'\t') if w >= 2 && w - 2 < MAX_INDENT => w + 1,
        _ => return false,
    };
    true
}

/// A string's next byte, from inside it (`escape` and `utf8` as in
/// [`Lex::Str`]).
pub(crate) enum StrStep {
    /// The closing quote.
    Closed,
    In {
        escape: u8,
        utf8: u8,
    },
    Refused,
}

pub(crate) fn string_step(escape: u8, utf8: u8, b: u8) -> StrStep {
    let (escape, utf8) = match (escape, utf8, b) {
        (0, 0, b'"') => return StrStep::Closed,
        (0, 0, b'\\') => (1, 0),
        (0, 0, 0..=0x1f) => return StrStep::Refused,
        (0, 0, 0x20..=0x7f) => (0, 0),
        // UTF-8: a lead byte, then its continuation bytes.
        (0, 0, 0xc2..=0xdf) => (0, 1),
        (0, 0, 0xe0..=0xef) => (0, 2),
        (0, 0, 0xf0..=0xf4) => (0, 3),
        (0, n, 0x80..=0xbf) if n > 0 => (0, n - 1),
        (1, _, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => (0, 0),
        (1, _, b'u') => (2, 0),
        (2..=5, _, b) if b.is_ascii_hexdigit() => (if escape == 5 { 0 } else { escape + 1 }, 0),
        _ => return StrStep::Refused,
    };
    StrStep::In { escape, utf8 }
}

/// A grammar the mask tries tokens on, byte by byte: a copy per try.
pub(crate) trait ByteGrammar: Copy {
    /// False (and a state to drop) if `b` leaves the grammar.
    fn feed(&mut self, b: u8) -> bool;
    /// Whether the output may end here: the stop tokens are let through
    /// (a JSON object then takes no more bytes; a regex's match may go on).
    fn complete(&self) -> bool;
    /// Inside a string between characters, how many characters of plain
    /// text it takes (`u32::MAX`: any number; they change nothing else);
    /// None elsewhere.
    fn plain_text_room(&self) -> Option<u32>;
    fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }
}

impl ByteGrammar for JsonState {
    fn feed(&mut self, b: u8) -> bool {
        JsonState::feed(self, b)
    }
    fn complete(&self) -> bool {
        JsonState::complete(self)
    }
    fn plain_text_room(&self) -> Option<u32> {
        self.in_plain_string().then_some(u32::MAX)
    }
}

/// Masks of the vocabulary (a bit per token) by state: along an answer
/// the states recur (every character of free text or of a JSON string
/// leads back to the same one), and computing a mask costs a pass over
/// the vocabulary. The key is what the mask depends on: a JSON state, a
/// schema cursor's stack and place, a regex's or grammar's state number.
pub(crate) struct MaskTable<K>(Mutex<HashMap<K, Arc<[u64]>>>);

/// Most masks one table holds (6 KiB each for this vocabulary); a full
/// table starts again.
const MAX_MASKS: usize = 512;

impl<K> Default for MaskTable<K> {
    fn default() -> Self {
        MaskTable(Mutex::default())
    }
}

impl<K> std::fmt::Debug for MaskTable<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MaskTable({} masks)", self.lock().len())
    }
}

impl<K> MaskTable<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<[u64]>>> {
        // Entries are inserted whole: a panic elsewhere leaves it sound.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<K: Hash + Eq> MaskTable<K> {
    /// `key`'s mask, from the table or computed and tabled. It is
    /// computed unlocked: it feeds cursors that may take locks.
    fn get_or_compute(&self, key: K, compute: impl FnOnce() -> Vec<u64>) -> Arc<[u64]> {
        if let Some(mask) = self.lock().get(&key) {
            return mask.clone();
        }
        let mask: Arc<[u64]> = compute().into();
        let mut masks = self.lock();
        if masks.len() >= MAX_MASKS {
            masks.clear();
        }
        masks.insert(key, mask.clone());
        mask
    }
}

/// JSON mode for one model's vocabulary: any JSON object, or with a
/// schema ([`JsonSchema`]) one that satisfies it; or, on the same tables,
/// text that matches a regex ([`OutputRegex`], vLLM's `guided_regex`) or
/// follows a grammar ([`OutputGrammar`], llama.cpp's GBNF).
#[derive(Clone)]
pub struct JsonObjectMode {
    tokenizer: Arc<Tokenizer>,
    tokens: Arc<TokenClasses>,
    constraint: Constraint,
}

/// What the output must be.
#[derive(Clone)]
enum Constraint {
    /// A JSON object (satisfying the schema, if any).
    Object(Option<Arc<JsonSchema>>),
    Regex(Arc<OutputRegex>),
    Grammar(Arc<OutputGrammar>),
}

impl Constraint {
    /// The schema, regex or grammar as given (None: any object).
    fn source(&self) -> Option<&str> {
        match self {
            Constraint::Object(schema) => schema.as_ref().map(|s| s.source()),
            Constraint::Regex(regex) => Some(regex.source()),
            Constraint::Grammar(grammar) => Some(grammar.source()),
        }
    }
}

/// What the mask needs of each token at a glance. Trying every token's
/// bytes took 2.4 ms a row over this model's 49 152 tokens; most fail on
/// their first byte, and inside a string most are plain text that leaves
/// the state as it was, so a row now costs a pass over these tables and
/// the bytes of the few tokens left.
struct TokenClasses {
    first: Vec<u8>,
    /// Special or empty: never allowed (except as a stop token).
    banned: Vec<bool>,
    /// Characters of tokens that are whole UTF-8 characters without `"`,
    /// `\\` or control bytes (0: other tokens). Inside a string, between
    /// characters, such a token changes nothing but the string's length.
    plain_chars: Vec<u16>,
    /// JSON mode's masks, shared by every answer in JSON mode.
    json_masks: MaskTable<JsonState>,
}

impl TokenClasses {
    fn new(tokenizer: &Tokenizer) -> Self {
        let n = tokenizer.vocab_size() as u32;
        let bytes = |t| tokenizer.token_bytes(t);
        let in_string = JsonState { lex: Lex::Str { key: false, escape: 0, utf8: 0 }, ..JsonState::default() };
        TokenClasses {
            first: (0..n).map(|t| bytes(t).first().copied().unwrap_or(0)).collect(),
            banned: (0..n).map(|t| tokenizer.is_special(t) || bytes(t).is_empty()).collect(),
            plain_chars: (0..n)
                .map(|t| {
                    let mut s = in_string;
                    // Escapes are tried: a counted string takes no `\u`.
                    let plain = s.feed_all(bytes(t)) && s == in_string && !bytes(t).contains(&b'\\');
                    if plain {
                        String::from_utf8_lossy(bytes(t)).chars().count() as u16
                    } else {
                        0
                    }
                })
                .collect(),
            json_masks: MaskTable::default(),
        }
    }
}

impl std::fmt::Debug for JsonObjectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.constraint {
            Constraint::Object(None) => f.write_str("JsonObjectMode"),
            Constraint::Object(Some(schema)) => write!(f, "JsonObjectMode({})", schema.source()),
            Constraint::Regex(regex) => write!(f, "JsonObjectMode(regex {})", regex.source()),
            Constraint::Grammar(grammar) => write!(f, "JsonObjectMode(grammar {:?})", grammar.source()),
        }
    }
}

/// Equal for the same vocabulary and the same kind of constraint, given
/// by the same text.
impl PartialEq for JsonObjectMode {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.tokenizer, &other.tokenizer)
            && std::mem::discriminant(&self.constraint) == std::mem::discriminant(&other.constraint)
            && self.constraint.source() == other.constraint.source()
    }
}

impl JsonObjectMode {
    /// Builds the vocabulary's tables (a few milliseconds).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let tokens = Arc::new(TokenClasses::new(&tokenizer));
        JsonObjectMode { tokenizer, tokens, constraint: Constraint::Object(None) }
    }

    /// The same vocabulary's tables, constrained by `schema` (None: any
    /// object).
    pub fn with_schema(&self, schema: Option<Arc<JsonSchema>>) -> Self {
        JsonObjectMode { constraint: Constraint::Object(schema), ..self.clone() }
    }

    /// The same vocabulary's tables, for text that matches `regex`.
    pub fn with_regex(&self, regex: Arc<OutputRegex>) -> Self {
        JsonObjectMode { constraint: Constraint::Regex(regex), ..self.clone() }
    }

    /// The same vocabulary's tables, for text that follows `grammar`.
    pub fn with_grammar(&self, grammar: Arc<OutputGrammar>) -> Self {
        JsonObjectMode { constraint: Constraint::Grammar(grammar), ..self.clone() }
    }

    /// Whether the output is a JSON object (with or without a schema).
    pub fn is_object(&self) -> bool {
        matches!(self.constraint, Constraint::Object(_))
    }

    pub fn schema(&self) -> Option<&JsonSchema> {
        match &self.constraint {
            Constraint::Object(schema) => schema.as_deref(),
            _ => None,
        }
    }

    pub fn regex(&self) -> Option<&OutputRegex> {
        match &self.constraint {
            Constraint::Regex(regex) => Some(regex),
            _ => None,
        }
    }

    pub fn grammar(&self) -> Option<&OutputGrammar> {
        match &self.constraint {
            Constraint::Grammar(grammar) => Some(grammar),
            _ => None,
        }
    }

    /// Whether `output` is a prefix of an answer: None if it already left
    /// the grammar (an output that did not start in JSON mode: nothing is
    /// masked then), else whether the answer may end here (the object is
    /// complete, the regex matched, the grammar's root is whole).
    pub fn check(&self, output: &[u32]) -> Option<bool> {
        match &self.constraint {
            Constraint::Object(None) => self.state_after(JsonState::default(), output).map(|s| s.complete()),
            Constraint::Object(Some(schema)) => self.state_after(schema.start(), output).map(|s| s.complete()),
            Constraint::Regex(regex) => self.state_after(regex.start(), output).map(|s| s.complete()),
            Constraint::Grammar(grammar) => self.state_after(grammar.start(), output).map(|s| s.complete()),
        }
    }

    fn state_after<G: ByteGrammar>(&self, mut state: G, output: &[u32]) -> Option<G> {
        output.iter().all(|&t| state.feed_all(self.tokenizer.token_bytes(t))).then_some(state)
    }

    /// Gives −∞ to every token of `row` (the logits after `output`) that
    /// cannot come next: one that leaves the grammar, special tokens and
    /// empty ones, and the stop tokens (`stop`, else the end-of-sequence
    /// ones) until the answer may end (an object's once it is complete,
    /// after which only they remain; a regex's at each match).
    pub fn mask<R: TokenLogits + ?Sized>(&self, row: &mut R, output: &[u32], stop: Option<&StopTokens>) {
        match &self.constraint {
            Constraint::Object(None) => self.mask_from(self.state_after(JsonState::default(), output), &self.tokens.json_masks, |s| *s, row, stop),
            Constraint::Object(Some(schema)) => self.mask_from(self.state_after(schema.start(), output), schema.masks(), |c| c.mask_key(), row, stop),
            Constraint::Regex(regex) => self.mask_from(self.state_after(regex.start(), output), regex.masks(), |c| c.mask_key(), row, stop),
            Constraint::Grammar(grammar) => self.mask_from(self.state_after(grammar.start(), output), grammar.masks(), |c| c.mask_key(), row, stop),
        }
    }

    /// The mask of `state` (None: the output left the grammar, nothing is
    /// masked), from `table` under `key(state)` or computed and tabled.
    fn mask_from<G: ByteGrammar, K: Hash + Eq, R: TokenLogits + ?Sized>(
        &self,
        state: Option<G>,
        table: &MaskTable<K>,
        key: impl Fn(&G) -> K,
        row: &mut R,
        stop: Option<&StopTokens>,
    ) {
        let Some(state) = state else { return };
        let vocab = self.tokenizer.vocab_size();
        let bits = table.get_or_compute(key(&state), || {
            let mut allowed = self.token_filter(state);
            let mut bits = vec![0u64; vocab.div_ceil(64)];
            for t in (0..vocab).filter(|&t| allowed(t as u32)) {
                bits[t / 64] |= 1 << (t % 64);
            }
            bits
        });
        self.mask_with(row, stop, state.complete(), |t| bits.get(t as usize / 64).is_some_and(|w| w >> (t % 64) & 1 == 1));
    }

    /// Gives −∞ to the tokens of `row` not `allowed`, and to the stop
    /// tokens unless the answer is `complete`.
    fn mask_with<R: TokenLogits + ?Sized>(&self, row: &mut R, stop: Option<&StopTokens>, complete: bool, mut allowed: impl FnMut(u32) -> bool) {
        let stop = stop.map_or(self.tokenizer.eos_tokens(), |s| &s.tokens);
        let stop_logits: Vec<(u32, f32)> = stop.iter().filter_map(|&t| Some((t, *row.logit_mut(t)?))).collect();
        row.for_each_logit(|t, l| {
            if !allowed(t) {
                *l = f32::NEG_INFINITY;
            }
        });
        for (t, l) in stop_logits {
            *row.logit_mut(t).expect("held above") = if complete { l } else { f32::NEG_INFINITY };
        }
    }

    /// Whether a token may come next from `state`: not special or empty,
    /// and its bytes keep the output in the grammar.
    fn token_filter<'a, G: ByteGrammar + 'a>(&'a self, state: G) -> impl FnMut(u32) -> bool + 'a {
        let first_ok: [bool; 256] = std::array::from_fn(|b| { state }.feed(b as u8));
        let plain_text_room = state.plain_text_room();
        // Between values most tokens that pass the first byte (a space, a
        // quote) fail on the second, and trying one costs a copy of the
        // state (a schema's cursor is 300 bytes): the second bytes each
        // first byte's state takes are tabled on first use. Not inside a
        // string, where the few tokens tried start with ~200 first bytes.
        let mut second_ok: Vec<Option<Box<[bool; 256]>>> = vec![None; if plain_text_room.is_some() { 0 } else { 256 }];
        let classes = &self.tokens;
        move |t| {
            let i = t as usize;
            !classes.banned[i] && first_ok[classes.first[i] as usize] && {
                let bytes = self.tokenizer.token_bytes(t);
                if let Some(room) = plain_text_room {
                    match classes.plain_chars[i] {
                        0 => { state }.feed_all(bytes),
                        chars => chars as u32 <= room,
                    }
                } else {
                    let mut takes_two = |b0: u8, b1: u8| {
                        second_ok[b0 as usize].get_or_insert_with(|| {
                            let mut after = state;
                            after.feed(b0);
                            Box::new(std::array::from_fn(|b| { after }.feed(b as u8)))
                        })[b1 as usize]
                    };
                    (bytes.len() < 2 || takes_two(bytes[0], bytes[1])) && { state }.feed_all(bytes)
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn fed(text: &str) -> Option<JsonState> {
        let mut s = JsonState::default();
        s.feed_all(text.as_bytes()).then_some(s)
    }

    #[test]
    fn valid_prefixes_and_complete_objects() {
        for text in [
            "{}",
            "{\"a\": 1}",
            "{\"a\":[1,-2.5e+3,0.25,true,false,null,\"x\\n\\u00e9\"],\"b\":{\"c\":{}}}",
            " {\n  \"k\": \"naïve 日本\"\n}",
            "{\"a\": [ ], \"b\": [[]]}",
        ] {
            assert!(fed(text).is_some_and(|s| s.complete()), "{text:?}");
            serde_json::from_str::<serde_json::Value>(text).unwrap();
            for cut in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert!(fed(&text[..cut]).is_some_and(|s| !s.complete()), "{:?}", &text[..cut]);
            }
        }
    }

    #[test]
    fn invalid_text_is_refused() {
        for text in [
            "[]",
            "\"a\"",
            "{\"a\" 1",
            "{\"a\":01",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":tru}",
            "{\"a\":1,}",
            "{,",
            "{\"a\":1]",
            "{\"a\":[1}",
            "{} ",
            "{}{",
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12g\"}",
            "{\"a\":  1}",
            "{\"a\":\t1}",
            "{\"a\":\r1}",
            "{\n                     \"a\":1}",
        ] {
            assert!(fed(text).is_none(), "{text:?} was taken");
        }
        // Twenty spaces or tabs after a newline are the most.
        assert!(fed("{\n                    \"a\":1}").is_some());
        // A lone UTF-8 continuation byte, or a lead byte cut short.
        let mut s = fed("{\"a\":\"").unwrap();
        assert!(!{ s }.feed(0x80) && s.feed(0xc3) && !s.feed(b'"'));
    }

    /// The tables give what trying every token's bytes from `start` gives,
    /// after every prefix of each text's tokens.
    pub(crate) fn assert_mask_is_every_tokens_bytes_tried<G: ByteGrammar>(mode: &JsonObjectMode, start: G, texts: &[&str]) {
        let tokenizer = &mode.tokenizer;
        let eos = tokenizer.eos_tokens();
        for text in texts {
            let ids = tokenizer.encode(text).unwrap();
            for output in (0..=ids.len()).map(|n| &ids[..n]) {
                let mut state = start;
                if !output.iter().all(|&t| state.feed_all(tokenizer.token_bytes(t))) {
                    continue;
                }
                assert_eq!(mode.check(output), Some(state.complete()));
                // Twice: a tabled mask is computed, then read from its table.
                for row in [0, 1].map(|_| {
                    let mut row = vec![0.5f32; tokenizer.vocab_size()];
                    mode.mask(&mut row[..], output, None);
                    row
                }) {
                    for (t, &l) in row.iter().enumerate() {
                        let t = t as u32;
                        let bytes = tokenizer.token_bytes(t);
                        let expected =
                            if eos.contains(&t) { state.complete() } else { !tokenizer.is_special(t) && !bytes.is_empty() && { state }.feed_all(bytes) };
                        assert_eq!(l.is_finite(), expected, "token {t} ({:?}) after {:?}", String::from_utf8_lossy(bytes), tokenizer.decode(output));
                    }
                }
            }
        }
    }

    pub(crate) fn default_tokenizer() -> Arc<Tokenizer> {
        crate::LoadedModel::load(&crate::fetch::ensure_default_model(false).unwrap()).unwrap().tokenizer
    }

    #[test]
    fn the_mask_is_every_tokens_bytes_tried() {
        let mode = JsonObjectMode::new(default_tokenizer());
        // Every prefix, and cuts inside multi-byte characters and escapes.
        let texts = [
            "{\n  \"name\": \"Fé\\u00e9lix\",\n  \"age\": [2.5e3, true], \"x\": {}}",
            "{\"a\":\"\\",
            "{\"a\":\"\\u00",
            "{\"a\":\"é",
            "{\"a\":-",
            "{\"a\":1",
            "{\"a\":\n  ",
        ];
        assert_mask_is_every_tokens_bytes_tried(&mode, JsonState::default(), &texts);
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{{\"a\":{}", "[".repeat(MAX_DEPTH as usize - 1));
        let mut s = fed(&deep).unwrap();
        assert!(!s.feed(b'['), "deeper than {MAX_DEPTH}");
        let closed = format!("{deep}{}}}", "]".repeat(MAX_DEPTH as usize - 1));
        assert!(fed(&closed).is_some_and(|s| s.complete()));
    }
}
