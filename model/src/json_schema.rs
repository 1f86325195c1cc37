//! OpenAI's structured outputs (`response_format: {"type": "json_schema"}`):
//! JSON mode's one object, which must also satisfy a JSON Schema. The
//! schema compiles to a tree of nodes, and [`SchemaCursor`] reads the
//! output byte by byte against it, as [`JsonState`] does for JSON mode,
//! so the same mask serves both (see `JsonObjectMode`).
//!
//! The subset, chosen to cover what OpenAI's strict mode and Pydantic
//! emit; any other keyword is refused by name rather than ignored:
//! - `type` (one or a list): `object`, `array`, `string`, `number`,
//!   `integer`, `boolean`, `null`;
//! - objects: `properties`, `required`, `additionalProperties`. Only the
//!   listed properties are produced, each at most once, in any order, and
//!   the object closes once every required one is there, which satisfies
//!   any `additionalProperties`. An object without `properties` (and
//!   without `additionalProperties` other than `true`) is any object;
//! - arrays: `items` (absent: any values), `minItems`, `maxItems`;
//! - strings: `pattern` (found anywhere in the string unless anchored, as
//!   JSON Schema means it; Rust's `regex` syntax, which Pydantic
//!   validates with too: no look-around or back-references), `format`
//!   (`date`, `time`, `date-time`, `uuid`, `email`, `ipv4`), and
//!   `minLength` and `maxLength` (in characters). A pattern or format
//!   compiles to a DFA over the string's decoded bytes (with lengths,
//!   stepped beside a count of characters; see [`Lengths`]); lengths
//!   alone are counted. Such a string writes no `\u` escapes, so control
//!   characters other than `\b\f\n\r\t` stay out;
//! - numbers: `minimum`, `maximum`, `exclusiveMinimum`,
//!   `exclusiveMaximum` (an integer's may be fractions; a number's must
//!   be whole). The range compiles to a regex of the numbers inside as
//!   JSON writes them (no exponent, no `-0`), stepped like a pattern;
//! - `enum` and `const` (JSON values, written as `serde_json` writes them);
//! - `anyOf` whose branches start differently: at most one array branch,
//!   and an enum or const value that starts like another branch's values
//!   only where that branch admits it anyway (a string among free
//!   strings). Several object branches need a tag: a property each
//!   requires whose values are literals no other branch has (Pydantic's
//!   discriminated unions); the object then reads its tag first, which
//!   picks the branch. `oneOf` is taken where no value satisfies two
//!   branches (objects: by their tags); `allOf` of one schema (Pydantic's
//!   wrapper of a described `$ref`), and `$ref` to `#/$defs/…` or
//!   `#/definitions/…`, inlined, each once per depth. A recursive
//!   schema (Pydantic's self-referencing models) is unrolled down to the
//!   nesting limit, past which its objects and arrays have no value: a
//!   tree's deepest children are `[]`, and optional properties and
//!   alternatives that would nest deeper are left out;
//! - annotations (`title`, `description`, `default`, `examples`,
//!   `discriminator`, …) are ignored.
//!
//! Keys and enum strings are produced as `serde_json` escapes them; free
//! strings and numbers follow JSON's grammar, whitespace JSON mode's rule.
//! No state is a dead end: every state the cursor reaches lets some byte
//! through until the object is complete.

use crate::json_mode::{string_step, whitespace_step, ByteGrammar, JsonState, MaskTable, Num, StrStep};
use crate::{ModelError, Result};
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::{Anchored, Input, MatchKind};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Deepest nesting of constrained objects and arrays.
pub const MAX_SCHEMA_DEPTH: usize = 16;
/// Most properties of one object, and most enum values of one node (a bit
/// each in the cursor).
const MAX_CHOICES: usize = 64;
const ANNOTATIONS: [&str; 11] =
    ["title", "description", "default", "examples", "$comment", "$schema", "$id", "$defs", "definitions", "strict", "discriminator"];
const SUPPORTED: &str = "type, properties, required, additionalProperties, items, minItems, maxItems, pattern, format, minLength, maxLength, \
                         minimum, maximum, exclusiveMinimum, exclusiveMaximum, enum, const, anyOf, oneOf, allOf of one schema, $ref";
/// Largest magnitude of a numeric bound (exact in f64 and in the ranges' arithmetic).
const MAX_BOUND: f64 = 1e15;
/// Memory the string constraints' DFAs of one schema may take together.
const MAX_DFA_BYTES: usize = 4 << 20;

/// The `format`s produced: a regex of the whole string. Each is stricter
/// than its RFC where a validator might be (years 0001–9999, no leap
/// second, at most 6 fraction digits, lowercase UUIDs), never looser.
fn format_regex(format: &str) -> Option<String> {
    const YEAR: &str = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)";
    const MONTH_DAY: &str = "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
    const LEAP_YEAR: &str = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)";
    const TIME: &str = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";
    const OCTET: &str = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    let date = format!("(?:{YEAR}-{MONTH_DAY}|{LEAP_YEAR}-02-29)");
    Some(match format {
        "date" => date,
        "time" => TIME.to_string(),
        "date-time" => format!("{date}T{TIME}"),
        "uuid" => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".to_string(),
        "email" => r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}".to_string(),
        "ipv4" => format!(r"{OCTET}(?:\.{OCTET}){{3}}"),
        _ => return None,
    })
}

/// A regex of the numbers `width` digits long (zero-padded) in `lo..=hi`.
fn fixed_width(lo: u64, hi: u64, width: u32) -> String {
    if width == 0 {
        return String::new();
    }
    let unit = 10u64.pow(width - 1);
    let (lo_head, lo_tail, hi_head, hi_tail) = (lo / unit, lo % unit, hi / unit, hi % unit);
    if lo_head == hi_head {
        return format!("{lo_head}{}", fixed_width(lo_tail, hi_tail, width - 1));
    }
    let mut alternatives = vec![];
    let mut first_whole = lo_head;
    if lo_tail != 0 {
        alternatives.push(format!("{lo_head}{}", fixed_width(lo_tail, unit - 1, width - 1)));
        first_whole += 1;
    }
    let last_whole = if hi_tail == unit - 1 { hi_head } else { hi_head - 1 };
    if first_whole <= last_whole {
        alternatives.push(format!("[{first_whole}-{last_whole}][0-9]{{{}}}", width - 1));
    }
    if hi_tail != unit - 1 {
        alternatives.push(format!("{hi_head}{}", fixed_width(0, hi_tail, width - 1)));
    }
    format!("(?:{})", alternatives.join("|"))
}

/// A regex of the naturals in `lo..=hi` (None: no end) as JSON writes
/// them (no leading zeros).
fn naturals(lo: u64, hi: Option<u64>) -> String {
    let digits = |n: u64| n.checked_ilog10().unwrap_or(0) + 1;
    let longest = hi.map_or(digits(lo), digits);
    let mut alternatives = vec![];
    for width in digits(lo)..=longest {
        let (from, to) = (lo.max(if width == 1 { 0 } else { 10u64.pow(width - 1) }), hi.unwrap_or(u64::MAX).min(10u64.pow(width) - 1));
        if from <= to {
            alternatives.push(fixed_width(from, to, width));
        }
    }
    if hi.is_none() {
        alternatives.push(format!("[1-9][0-9]{{{longest},}}"));
    }
    format!("(?:{})", alternatives.join("|"))
}

/// One end of a numeric range: a whole number, and whether it is excluded.
#[derive(Clone, Copy, Debug)]
struct Bound {
    at: u64,
    excluded: bool,
}

/// A regex of the non-negative numbers in `lo..hi` (each end a whole
/// number, included or not; `hi` None: no end) as JSON writes them, with
/// a fraction when `fractions` and never an exponent.
fn magnitudes(lo: Bound, hi: Option<Bound>, fractions: bool) -> Option<String> {
    let fraction = if fractions { r"(?:\.[0-9]+)?" } else { "" };
    let mut alternatives = vec![];
    // Whole parts strictly inside take any fraction.
    let first = lo.at + lo.excluded as u64;
    let last = hi.map(|h| h.at.checked_sub(1));
    if last.is_none_or(|last| last.is_some_and(|last| first <= last)) {
        alternatives.push(format!("{}{fraction}", naturals(first, last.flatten())));
    }
    // The upper end itself, with a zero fraction.
    if let Some(h) = hi.filter(|h| !h.excluded && (h.at > lo.at || h.at == lo.at && !lo.excluded)) {
        alternatives.push(format!("{}{}", h.at, if fractions { r"(?:\.0+)?" } else { "" }));
    }
    // An excluded lower end, with a fraction that is not zero.
    if fractions && lo.excluded && hi.is_none_or(|h| h.at > lo.at) {
        alternatives.push(format!(r"{}\.[0-9]*[1-9][0-9]*", lo.at));
    }
    (!alternatives.is_empty()).then(|| format!("(?:{})", alternatives.join("|")))
}

/// A regex of the numbers between `lo` and `hi` (None: no end; whole
/// numbers) as JSON writes them, without exponents; integers only unless
/// `fractions`. Negative values are the magnitudes of the mirrored range.
fn numbers_between(lo: Option<(i64, bool)>, hi: Option<(i64, bool)>, fractions: bool) -> Option<String> {
    let bound = |at: i64, excluded: bool| Bound { at: at.unsigned_abs(), excluded };
    let mut alternatives = vec![];
    // Zero and up.
    if hi.is_none_or(|(h, excluded)| h > 0 || h == 0 && !excluded) {
        let lower = match lo {
            Some((l, excluded)) if l >= 0 => bound(l, excluded),
            _ => bound(0, false),
        };
        alternatives.extend(magnitudes(lower, hi.map(|(h, e)| bound(h, e)), fractions));
    }
    // Below zero (never `-0`): magnitudes above zero, or above -hi.
    if lo.is_none_or(|(l, _)| l < 0) {
        let lower = match hi {
            Some((h, excluded)) if h < 0 => bound(h, excluded),
            _ => bound(0, true),
        };
        alternatives.extend(magnitudes(lower, lo.map(|(l, e)| bound(l, e)), fractions).map(|m| format!("-{m}")));
    }
    (!alternatives.is_empty()).then(|| format!("(?:{})", alternatives.join("|")))
}

/// A constrained string's rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StringRule {
    /// `pattern` or `format`: the schema's regex of this index.
    Regex(u16),
    /// `minLength` and `maxLength`, counted as the string is written.
    Length { min: u32, max: u32 },
}

/// A `pattern`, a `format` or a numeric range: a DFA over a value's
/// bytes (a string's decoded ones), anchored at its start, matching where
/// the whole value satisfies it.
#[derive(Debug)]
struct Dfa {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    /// By state id: some continuation the answer can write (bytes
    /// 0x20..=0xFF, or an escape's `\b\f\n\r\t`) reaches a match. Only
    /// those states are entered, so none is a dead end.
    live: Vec<bool>,
    /// A string's `minLength` and `maxLength` beside its pattern or format.
    lengths: Option<Lengths>,
}

/// Lengths (in characters) beside a string's DFA: the product of its
/// states and the count of characters written, by which pairs some
/// continuation still matches within the lengths. The cursor enters only
/// those, so a pattern never leads past `maxLength` or short of
/// `minLength` (`[0-9]` within 4 characters: the fourth is a digit if the
/// first three were not).
#[derive(Debug)]
struct Lengths {
    min: u32,
    /// None: no most; the count then stops at `min`, past which only the
    /// DFA matters.
    max: Option<u32>,
    /// Each reachable state's row, by state id (`u32::MAX`: unreachable).
    row: Vec<u32>,
    /// By `row * (top + 1) + count`.
    live: Vec<bool>,
}

impl Lengths {
    /// The highest count kept.
    fn top(&self) -> u32 {
        self.max.unwrap_or(self.min)
    }

    /// The count after a byte that begins a character or not (None: past
    /// the most).
    fn next(&self, count: u32, begins: bool) -> Option<u32> {
        match (begins, self.max) {
            (false, _) => Some(count),
            (true, Some(max)) => (count < max).then_some(count + 1),
            (true, None) => Some((count + 1).min(self.min)),
        }
    }

    fn live(&self, state: StateID, count: u32) -> bool {
        let row = self.row.get(state.as_usize()).copied().unwrap_or(u32::MAX);
        row != u32::MAX && self.live[row as usize * (self.top() as usize + 1) + count as usize]
    }
}

/// Whether a decoded byte begins a character (is no UTF-8 continuation byte).
fn begins_char(b: u8) -> bool {
    b & 0xc0 != 0x80
}

/// Most (state, count) pairs a pattern beside lengths may take, and most
/// edges walked to find the live ones: about a second of one core.
const MAX_LENGTH_CELLS: usize = 1 << 21;
const MAX_LENGTH_STEPS: usize = 1 << 27;

/// What went wrong building a DFA, on one line: a syntax error's reason
/// (the cause of "error building NFA", whose text draws the regex with
/// a caret under the place), or the error itself.
fn build_error(e: &dyn std::error::Error) -> String {
    let mut innermost = e;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    let text = innermost.to_string();
    match text.lines().last() {
        Some(reason) if text.contains("regex parse error") => format!("regex parse error: {}", reason.trim_start_matches("error: ")),
        _ => text,
    }
}

/// Decoded bytes a constrained string can hold: what it writes as itself
/// (UTF-8 the DFA checks), and the control characters it escapes.
fn writable(b: u8) -> bool {
    b >= 0x20 || matches!(b, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d)
}

impl Dfa {
    /// The DFA of `regex`; with `lengths` (`minLength`, `maxLength`), of
    /// the strings it matches that are that long.
    fn new(regex: &str, lengths: Option<(u32, Option<u32>)>) -> Result<Dfa, String> {
        let config = dense::Config::new()
            .match_kind(MatchKind::All)
            .start_kind(StartKind::Anchored)
            .dfa_size_limit(Some(MAX_DFA_BYTES))
            .determinize_size_limit(Some(MAX_DFA_BYTES));
        let dfa = dense::Builder::new().configure(config).build(regex).map_err(|e| build_error(&e))?;
        let start = dfa.start_state_forward(&Input::new("").anchored(Anchored::Yes)).map_err(|e| e.to_string())?;
        // The states reached from the start, and their edges reversed: one
        // byte per class of bytes the DFA does not tell apart (and per
        // kind, beginning a character or not, for the lengths' count).
        let classes = dfa.byte_classes();
        let mut bytes: Vec<u8> = Vec::new();
        for b in (0..=255u8).filter(|&b| writable(b)) {
            if !bytes.iter().any(|&x| classes.get(x) == classes.get(b) && begins_char(x) == begins_char(b)) {
                bytes.push(b);
            }
        }
        let (mut seen, mut order, mut edges) = (vec![start], 0, Vec::new());
        let mut known = std::collections::HashSet::from([start]);
        while order < seen.len() {
            let from = seen[order];
            order += 1;
            for &b in &bytes {
                let to = dfa.next_state(from, b);
                if !dfa.is_dead_state(to) {
                    edges.push((to, from, begins_char(b)));
                    if known.insert(to) {
                        seen.push(to);
                    }
                }
            }
        }
        let mut live = vec![false; seen.iter().map(|s| s.as_usize()).max().unwrap_or(0) + 1];
        let matches = |s: StateID| dfa.is_match_state(dfa.next_eoi_state(s));
        let mut work: Vec<StateID> = seen.iter().copied().filter(|&s| matches(s)).collect();
        edges.sort_unstable();
        while let Some(s) = work.pop() {
            if std::mem::replace(&mut live[s.as_usize()], true) {
                continue;
            }
            let at = edges.partition_point(|e| e.0 < s);
            work.extend(edges[at..].iter().take_while(|e| e.0 == s).map(|e| e.1).filter(|p| !live[p.as_usize()]));
        }
        let lengths = match lengths {
            None | Some((0, None)) => None,
            Some((min, max)) => Some(Self::lengths(&seen, &edges, &matches, min, max)?),
        };
        if !live[start.as_usize()] || lengths.as_ref().is_some_and(|l| !l.live(start, 0)) {
            return Err("no string the answer can write satisfies it".into());
        }
        Ok(Dfa { dfa, start, live, lengths })
    }

    /// The live (state, count) pairs, counts from the top down: a pair is
    /// live where its state may end there, or an edge leads to a live
    /// pair. An edge that begins a character leads to the next count
    /// (done before); one that does not stays at this count, so those
    /// are followed back within it.
    fn lengths(seen: &[StateID], edges: &[(StateID, StateID, bool)], matches: &dyn Fn(StateID) -> bool, min: u32, max: Option<u32>) -> Result<Lengths, String> {
        let mut l = Lengths { min, max, row: vec![u32::MAX; seen.iter().map(|s| s.as_usize()).max().unwrap_or(0) + 1], live: vec![] };
        let width = l.top() as usize + 1;
        if seen.len().saturating_mul(width) > MAX_LENGTH_CELLS || edges.len().saturating_mul(width) > MAX_LENGTH_STEPS {
            return Err(format!("the pattern beside these lengths takes too many steps ({} states, {width} counts)", seen.len()));
        }
        for (i, s) in seen.iter().enumerate() {
            l.row[s.as_usize()] = i as u32;
        }
        l.live = vec![false; seen.len() * width];
        let at = |l: &Lengths, s: StateID, count: u32| l.row[s.as_usize()] as usize * width + count as usize;
        for count in (0..width as u32).rev() {
            let mut work: Vec<StateID> = seen.iter().copied().filter(|&s| count >= min && matches(s)).collect();
            for &(to, from, begins) in edges {
                if let Some(next) = l.next(count, begins).filter(|&n| n != count) {
                    if l.live[at(&l, to, next)] {
                        work.push(from);
                    }
                }
            }
            while let Some(s) = work.pop() {
                let cell = at(&l, s, count);
                if std::mem::replace(&mut l.live[cell], true) {
                    continue;
                }
                let first = edges.partition_point(|e| e.0 < s);
                let within = edges[first..].iter().take_while(|e| e.0 == s).filter(|e| l.next(count, e.2) == Some(count));
                work.extend(within.map(|e| e.1).filter(|&p| !l.live[at(&l, p, count)]));
            }
        }
        Ok(l)
    }

    /// The state after decoded byte `b`, if live (a number's range).
    fn step(&self, state: StateID, b: u8) -> Option<StateID> {
        let next = self.dfa.next_state(state, b);
        self.live.get(next.as_usize()).copied().unwrap_or(false).then_some(next)
    }

    /// A string's state and count of characters after decoded byte `b`,
    /// if live.
    fn step_char(&self, state: StateID, count: u32, b: u8) -> Option<(StateID, u32)> {
        let Some(lengths) = &self.lengths else { return self.step(state, b).map(|s| (s, 0)) };
        let next = self.dfa.next_state(state, b);
        let count = lengths.next(count, begins_char(b))?;
        lengths.live(next, count).then_some((next, count))
    }

    /// Whether the value may end in `state`, `count` characters long.
    fn may_end(&self, state: StateID, count: u32) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(state)) && self.lengths.as_ref().is_none_or(|l| count >= l.min)
    }

    /// Whether a constrained string can be `text` (an enum value's).
    fn accepts(&self, text: &str) -> bool {
        let end = text.bytes().try_fold((self.start, 0), |(s, count), b| if writable(b) { self.step_char(s, count, b) } else { None });
        end.is_some_and(|(s, count)| self.may_end(s, count))
    }

    fn memory(&self) -> usize {
        self.dfa.memory_usage() + self.live.len() + self.lengths.as_ref().map_or(0, |l| l.live.len() + 4 * l.row.len())
    }
}

/// vLLM's `guided_regex` and `guided_choice`: the whole output is a
/// match of a regex (Rust's `regex` syntax, as for `pattern`), whose DFA
/// the mask steps over the output's bytes. As in a constrained string,
/// the cursor enters only states from which a match can still be
/// written, and control characters other than `\b\t\n\f\r` stay out.
#[derive(Debug)]
pub struct OutputRegex {
    dfa: Dfa,
    source: String,
    masks: MaskTable<StateID>,
}

impl OutputRegex {
    /// Compiles `regex`, matched against the whole output. Errors say why
    /// (syntax, past 4 MiB of DFA, or nothing writable matches).
    pub fn new(regex: &str) -> Result<Self> {
        let dfa = Dfa::new(&format!("(?:{regex})"), None).map_err(ModelError::InvalidArgument)?;
        if dfa.memory() > MAX_DFA_BYTES {
            return Err(ModelError::InvalidArgument(format!("its DFA takes more than {} MiB", MAX_DFA_BYTES >> 20)));
        }
        Ok(OutputRegex { dfa, source: regex.to_string(), masks: MaskTable::default() })
    }

    /// A regex of exactly these strings (`guided_choice`).
    pub fn choice(options: &[&str]) -> Result<Self> {
        // Rust regex's meta characters; any other character is itself.
        let escape = |o: &str| {
            o.chars().fold(String::new(), |mut out, c| {
                if r"\.+*?()|[]{}^$#&-~".contains(c) {
                    out.push('\\');
                }
                out.push(c);
                out
            })
        };
        OutputRegex::new(&options.iter().map(|o| escape(o)).collect::<Vec<_>>().join("|"))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn masks(&self) -> &MaskTable<StateID> {
        &self.masks
    }

    pub(crate) fn start(&self) -> RegexCursor<'_> {
        RegexCursor { regex: self, state: self.dfa.start }
    }
}

/// Where the output stands in an [`OutputRegex`]'s DFA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RegexCursor<'a> {
    regex: &'a OutputRegex,
    state: StateID,
}

impl RegexCursor<'_> {
    pub(crate) fn mask_key(&self) -> StateID {
        self.state
    }
}

impl ByteGrammar for RegexCursor<'_> {
    fn feed(&mut self, b: u8) -> bool {
        match self.regex.dfa.step(self.state, b).filter(|_| writable(b)) {
            Some(next) => {
                self.state = next;
                true
            }
            None => false,
        }
    }

    /// A match may end here; it may also go on.
    fn complete(&self) -> bool {
        self.regex.dfa.may_end(self.state, 0)
    }

    fn plain_text_room(&self) -> Option<u32> {
        None
    }
}

/// The byte an escape's letter stands for.
fn unescaped(b: u8) -> Option<u8> {
    Some(match b {
        b'"' | b'\\' | b'/' => b,
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// A compiled schema.
#[derive(Debug)]
pub struct JsonSchema {
    nodes: Vec<Node>,
    regexes: Vec<Dfa>,
    root: u16,
    /// The schema as compact JSON text (what travels on the wire).
    source: String,
    masks: MaskTable<SchemaKey>,
}

/// The values one (sub)schema admits, by how they start.
#[derive(Clone, Debug, Default)]
struct Node {
    /// Any JSON value.
    any: bool,
    /// Any string, or those of a rule.
    string: bool,
    string_rule: Option<StringRule>,
    /// Any number, or only integers.
    number: bool,
    integer: bool,
    /// The numbers' range, as a regex (either kind).
    number_rule: Option<u16>,
    object: Option<ObjectShape>,
    /// Object alternatives: `object` is then the tag alone, and each of
    /// the tag node's literals picks an arm.
    arms: Vec<Arm>,
    array: Option<ArrayShape>,
    /// Whole values as JSON text: enum and const values, `true` and
    /// `false` for booleans, `null`.
    literals: Vec<Vec<u8>>,
}

#[derive(Clone, Debug)]
struct ObjectShape {
    /// Any object (no properties named).
    free: bool,
    /// Each property's name as a JSON string, quotes included.
    keys: Vec<Vec<u8>>,
    values: Vec<u16>,
    /// A bit per property that must be present.
    required: u64,
}

/// An object alternative of a union: its node, and its tag's property bit.
#[derive(Clone, Copy, Debug)]
struct Arm {
    node: u16,
    tag: u64,
}

#[derive(Clone, Copy, Debug)]
struct ArrayShape {
    items: u16,
    min: u64,
    max: u64,
}

impl JsonSchema {
    /// Compiles a schema given as JSON text.
    pub fn parse(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::InvalidArgument(format!("not JSON: {e}")))?;
        JsonSchema::from_value(&value)
    }

    /// Compiles a schema. Errors name the keyword's place in the schema.
    pub fn from_value(schema: &Value) -> Result<Self> {
        let mut compiler = Compiler { root: schema, nodes: Vec::new(), regexes: Vec::new(), refs: Vec::new(), recursive: 0, inlined: HashMap::new() };
        let root = compiler.node(schema, "schema", 0).map_err(ModelError::InvalidArgument)?.expect("outside a recursion, no value is an error");
        let Compiler { nodes, regexes, .. } = compiler;
        let r = &nodes[root as usize];
        if r.any || r.string || r.number || r.integer || r.array.is_some() || !r.literals.is_empty() || r.object.is_none() {
            return Err(ModelError::InvalidArgument("the schema must describe an object (`\"type\": \"object\"`), as JSON mode answers with one".into()));
        }
        Ok(JsonSchema { nodes, regexes, root, source: schema.to_string(), masks: MaskTable::default() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Before the answer's first byte.
    pub(crate) fn masks(&self) -> &MaskTable<SchemaKey> {
        &self.masks
    }

    pub(crate) fn start(&self) -> SchemaCursor<'_> {
        SchemaCursor { schema: self, frames: [Frame::default(); MAX_SCHEMA_DEPTH], depth: 0, cur: Cur::Value(self.root), ws: 0 }
    }
}

struct Compiler<'a> {
    /// For `$ref`s.
    root: &'a Value,
    nodes: Vec<Node>,
    regexes: Vec<Dfa>,
    /// `$ref`s being inlined, one inside another, and the depth of each.
    refs: Vec<(String, usize)>,
    /// How many of those refer to one of their own.
    recursive: usize,
    /// Each definition's node at each depth, built once.
    inlined: HashMap<(String, usize), Node>,
}

/// Most `$ref`s inlined one inside another.
const MAX_REFS: usize = 4 * MAX_SCHEMA_DEPTH;

impl Compiler<'_> {
    /// Compiles `schema` (at `path`, inside `depth` constrained
    /// containers) and returns its node; None where a recursive schema
    /// has no value this deep (see `reference`).
    fn node(&mut self, schema: &Value, path: &str, depth: usize) -> Result<Option<u16>, String> {
        let mut node = self.build(schema, path, depth)?;
        if self.recursive > 0 && is_empty(&node) {
            return Ok(None);
        }
        // The cursor takes a value's first byte as a literal's if one starts
        // with it, so a literal may not start like a kind's other values:
        // those a kind admits anyway go, the others are refused.
        let literals = std::mem::take(&mut node.literals);
        for literal in literals {
            let integral = !literal.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
            let (covered, clash) = match literal[0] {
                _ if node.any => (true, false),
                b'"' => match node.string_rule.filter(|_| node.string) {
                    Some(rule) => {
                        let text: String = serde_json::from_slice(&literal).expect("a literal string is JSON");
                        let covered = match rule {
                            StringRule::Regex(i) => self.regexes[i as usize].accepts(&text),
                            StringRule::Length { min, max } => (min as usize..=max as usize).contains(&text.chars().count()) && text.bytes().all(writable),
                        };
                        (covered, true)
                    }
                    None => (node.string, false),
                },
                b'-' | b'0'..=b'9' => match node.number_rule {
                    Some(rule) => (std::str::from_utf8(&literal).is_ok_and(|text| self.regexes[rule as usize].accepts(text)), true),
                    None => (node.number || node.integer && integral, node.integer),
                },
                b'{' => (node.object.as_ref().is_some_and(|o| o.free), node.object.is_some()),
                b'[' => (false, node.array.is_some()),
                _ => (false, false),
            };
            if clash && !covered {
                return Err(format!("`{path}`: the value {} starts like the values of another alternative; not supported", String::from_utf8_lossy(&literal)));
            }
            if !covered {
                node.literals.push(literal);
            }
        }
        if node.literals.len() > MAX_CHOICES {
            return Err(format!("`{path}` admits {} enum values; at most {MAX_CHOICES}", node.literals.len()));
        }
        if is_empty(&node) {
            return Err(format!("no value satisfies `{path}`"));
        }
        self.push(node).map(Some)
    }

    fn push(&mut self, node: Node) -> Result<u16, String> {
        self.nodes.push(node);
        u16::try_from(self.nodes.len() - 1).map_err(|_| "the schema is too large".to_string())
    }

    fn build(&mut self, schema: &Value, path: &str, depth: usize) -> Result<Node, String> {
        let map = match schema {
            Value::Bool(true) => return Ok(Node { any: true, ..Node::default() }),
            Value::Bool(false) => return Err(format!("`{path}` is `false`: no value satisfies it")),
            Value::Object(map) => map,
            _ => return Err(format!("`{path}` must be a schema (an object or a boolean)")),
        };
        const KEYWORDS: [&str; 21] = [
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "minItems",
            "maxItems",
            "pattern",
            "format",
            "minLength",
            "maxLength",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "enum",
            "const",
            "anyOf",
            "oneOf",
            "allOf",
            "$ref",
        ];
        if let Some(key) = map.keys().find(|k| !KEYWORDS.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str())) {
            return Err(format!("`{path}.{key}` is not supported (Tandem's JSON Schema subset: {SUPPORTED})"));
        }
        let constraints: Vec<&str> = map.keys().map(String::as_str).filter(|k| KEYWORDS.contains(k)).collect();
        if let Some(target) = map.get("$ref") {
            if constraints.len() > 1 {
                return Err(format!("`{path}.$ref` beside other keywords is not supported"));
            }
            return self.reference(target, path, depth);
        }
        // Pydantic wraps a `$ref` with a description in `allOf`.
        if let Some(all) = map.get("allOf") {
            let [one] = all.as_array().map(Vec::as_slice).unwrap_or_default() else {
                return Err(format!("`{path}.allOf` of more than one schema is not supported"));
            };
            if constraints.len() > 1 {
                return Err(format!("`{path}.allOf` beside other keywords is not supported"));
            }
            return self.build(one, &format!("{path}.allOf[0]"), depth);
        }
        // `oneOf` as `anyOf`, where no value satisfies two alternatives.
        if let Some((key, branches)) = ["anyOf", "oneOf"].into_iter().find_map(|k| Some((k, map.get(k)?))) {
            if constraints.len() > 1 {
                return Err(format!("`{path}.{key}` beside other keywords is not supported"));
            }
            let branches = branches.as_array().filter(|b| !b.is_empty()).ok_or_else(|| format!("`{path}.{key}` must be a non-empty array of schemas"))?;
            let (mut node, mut built, mut objects) = (Node::default(), Vec::<Node>::new(), vec![]);
            for (i, branch) in branches.iter().enumerate() {
                let mut branch = self.build(branch, &format!("{path}.{key}[{i}]"), depth)?;
                objects.extend(branch.object.take());
                if key == "oneOf" && built.iter().any(|b| overlap(b, &branch)) {
                    return Err(format!("`{path}.oneOf[{i}]` admits values of another alternative; not supported"));
                }
                let (any, string, number, integer, array) = (branch.any, branch.string, branch.number, branch.integer, branch.array);
                built.push(Node { any, string, number, integer, array, literals: branch.literals.clone(), ..Node::default() });
                merge(&mut node, branch, path)?;
            }
            (node.object, node.arms) = match objects.len() {
                0 | 1 => (objects.pop(), vec![]),
                _ => self.union(objects, path).map(|(shape, arms)| (Some(shape), arms))?,
            };
            return Ok(node);
        }
        if let Some(value) = map.get("const") {
            if map.contains_key("enum") {
                return Err(format!("`{path}` has both `enum` and `const`"));
            }
            return Ok(Node { literals: vec![value.to_string().into_bytes()], ..Node::default() });
        }
        if let Some(values) = map.get("enum") {
            let values = values.as_array().filter(|v| !v.is_empty()).ok_or_else(|| format!("`{path}.enum` must be a non-empty array"))?;
            let mut literals: Vec<Vec<u8>> = Vec::new();
            for v in values {
                let text = v.to_string().into_bytes();
                if !literals.contains(&text) {
                    literals.push(text);
                }
            }
            return Ok(Node { literals, ..Node::default() });
        }
        let types: Vec<&str> = match map.get("type") {
            None if map.contains_key("properties") || map.contains_key("required") => vec!["object"],
            None if map.contains_key("items") => vec!["array"],
            // String and number keywords (`pattern` to `exclusiveMaximum`)
            // apply to their kind only, so beside any value they would
            // need a rule beside free values.
            None => match KEYWORDS[7..15].iter().find(|k| map.contains_key(**k)) {
                Some(key) => return Err(format!("`{path}.{key}` without a `type` it applies to is not supported")),
                None => return Ok(Node { any: true, ..Node::default() }),
            },
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => {
                ts.iter().map(|t| t.as_str().ok_or_else(|| format!("`{path}.type` must list type names"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(format!("`{path}.type` must be a type name or a non-empty list of them")),
        };
        let mut node = Node::default();
        for t in types {
            let one = match t {
                "object" => Node { object: self.object(map, path, depth)?, ..Node::default() },
                "array" => Node { array: self.array(map, path, depth)?, ..Node::default() },
                "string" => Node { string: true, string_rule: self.string_rule(map, path)?, ..Node::default() },
                "number" => Node { number: true, number_rule: self.number_rule(map, path, false)?, ..Node::default() },
                "integer" => Node { integer: true, number_rule: self.number_rule(map, path, true)?, ..Node::default() },
                "boolean" => Node { literals: vec![b"true".to_vec(), b"false".to_vec()], ..Node::default() },
                "null" => Node { literals: vec![b"null".to_vec()], ..Node::default() },
                _ => return Err(format!("`{path}.type`: `{t}` is not a JSON Schema type")),
            };
            merge(&mut node, one, path)?;
        }
        Ok(node)
    }

    fn reference(&mut self, target: &Value, path: &str, depth: usize) -> Result<Node, String> {
        let name = target.as_str().ok_or_else(|| format!("`{path}.$ref` must be a string"))?;
        let root = self.root;
        let resolved = ["#/$defs/", "#/definitions/"]
            .iter()
            .find_map(|prefix| root.get(&prefix[2..prefix.len() - 1])?.get(name.strip_prefix(prefix)?))
            .ok_or_else(|| format!("`{path}.$ref`: `{name}` is not a schema under `#/$defs` or `#/definitions`"))?;
        // A recursive schema is unrolled as deep as the cursor goes: past
        // that, its objects and arrays have no value, which drops the
        // alternatives and optional properties that hold them, and holds
        // such arrays empty (a tree's leaves). Each definition is built
        // once per depth.
        if let Some(node) = self.inlined.get(&(name.to_string(), depth)) {
            return Ok(node.clone());
        }
        if self.refs.iter().any(|(n, d)| n == name && *d == depth) {
            return Err(format!("`{path}.$ref`: `{name}` refers to itself outside any object or array"));
        }
        if self.refs.len() == MAX_REFS {
            return Err(format!("`{path}.$ref`: references nest deeper than {MAX_REFS}"));
        }
        let recursive = self.refs.iter().any(|(n, _)| n == name);
        self.recursive += recursive as usize;
        self.refs.push((name.to_string(), depth));
        let node = self.build(resolved, path, depth);
        self.refs.pop();
        self.recursive -= recursive as usize;
        let node = node?;
        self.inlined.insert((name.to_string(), depth), node.clone());
        Ok(node)
    }

    /// An object's shape (None: none this deep in a recursive schema).
    fn object(&mut self, map: &Map<String, Value>, path: &str, depth: usize) -> Result<Option<ObjectShape>, String> {
        let properties = match map.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(format!("`{path}.properties` must be an object")),
        };
        let additional = map.get("additionalProperties");
        if !matches!(additional, None | Some(Value::Bool(_)) | Some(Value::Object(_))) {
            return Err(format!("`{path}.additionalProperties` must be a boolean or a schema"));
        }
        let required: Vec<&str> = match map.get("required") {
            None => vec![],
            Some(Value::Array(names)) => {
                names.iter().map(|n| n.as_str().ok_or_else(|| format!("`{path}.required` must list property names"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(format!("`{path}.required` must be an array of names")),
        };
        let Some(properties) = properties else {
            if let Some(name) = required.first() {
                return Err(format!("`{path}.required` names `{name}`, which `{path}.properties` does not describe"));
            }
            // Any members, unless the schema limits the extra ones.
            let free = matches!(additional, None | Some(Value::Bool(true)));
            return Ok(Some(ObjectShape { free, keys: vec![], values: vec![], required: 0 }));
        };
        if properties.len() > MAX_CHOICES {
            return Err(format!("`{path}.properties` lists {} properties; at most {MAX_CHOICES}", properties.len()));
        }
        if let Some(name) = required.iter().find(|n| !properties.contains_key(**n)) {
            return Err(format!("`{path}.required` names `{name}`, which `{path}.properties` does not describe"));
        }
        if depth == MAX_SCHEMA_DEPTH {
            return match self.recursive {
                0 => Err(format!("`{path}`: objects and arrays nest deeper than {MAX_SCHEMA_DEPTH}")),
                _ => Ok(None),
            };
        }
        let mut shape = ObjectShape { free: false, keys: vec![], values: vec![], required: 0 };
        for (name, schema) in properties {
            let needed = required.contains(&name.as_str());
            // A property of no value this deep is left out, or leaves out
            // the object that requires it.
            let Some(value) = self.node(schema, &format!("{path}.properties.{name}"), depth + 1)? else {
                if needed {
                    return Ok(None);
                }
                continue;
            };
            if needed {
                shape.required |= 1 << shape.keys.len();
            }
            shape.keys.push(Value::String(name.clone()).to_string().into_bytes());
            shape.values.push(value);
        }
        Ok(Some(shape))
    }

    /// A string node's `pattern`, `format` or lengths, as a rule (None:
    /// any string).
    fn string_rule(&mut self, map: &Map<String, Value>, path: &str) -> Result<Option<StringRule>, String> {
        let text = |key: &str| match map.get(key) {
            None => Ok(None),
            Some(Value::String(t)) => Ok(Some(t.as_str())),
            Some(_) => Err(format!("`{path}.{key}` must be a string")),
        };
        let count = |key: &str| match map.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or_else(|| format!("`{path}.{key}` must be a non-negative integer")),
        };
        let (min, max) = (count("minLength")?, count("maxLength")?);
        let (min, max) = (min.unwrap_or(0), max);
        if max.is_some_and(|max| min > max) {
            return Err(format!("`{path}`: `minLength` {min} exceeds `maxLength` {}", max.unwrap_or(0)));
        }
        let regex = match (text("pattern")?, text("format")?) {
            (Some(_), Some(_)) => return Err(format!("`{path}`: `pattern` beside `format` is not supported")),
            // JSON Schema's patterns are found anywhere unless anchored.
            (Some(pattern), None) => format!("(?s:.*)(?:{pattern})(?s:.*)"),
            (None, Some(format)) => {
                format_regex(format).ok_or_else(|| format!("`{path}.format`: `{format}` is not supported (date, time, date-time, uuid, email, ipv4)"))?
            }
            (None, None) => {
                return Ok(match (min, max) {
                    (0, None) => None,
                    (min, max) => Some(StringRule::Length { min, max: max.unwrap_or(u32::MAX) }),
                })
            }
        };
        let key = if map.contains_key("pattern") { "pattern" } else { "format" };
        self.regex(regex, path, key, Some((min, max))).map(|r| Some(StringRule::Regex(r)))
    }

    /// A number node's `minimum`, `maximum`, `exclusiveMinimum` and
    /// `exclusiveMaximum`, as a regex (None: any number of its kind).
    fn number_rule(&mut self, map: &Map<String, Value>, path: &str, integer: bool) -> Result<Option<u16>, String> {
        let end = |inclusive: &str, exclusive: &str| -> Result<Option<(f64, bool)>, String> {
            let get = |key: &str| match map.get(key) {
                None => Ok(None),
                Some(v) => {
                    v.as_f64().filter(|v| v.abs() <= MAX_BOUND).map(Some).ok_or_else(|| format!("`{path}.{key}` must be a number of magnitude at most 1e15"))
                }
            };
            match (get(inclusive)?, get(exclusive)?) {
                (Some(_), Some(_)) => Err(format!("`{path}`: `{inclusive}` beside `{exclusive}` is not supported")),
                (at, excluded) => Ok(at.map(|a| (a, false)).or(excluded.map(|e| (e, true)))),
            }
        };
        let (lo, hi) = (end("minimum", "exclusiveMinimum")?, end("maximum", "exclusiveMaximum")?);
        if lo.is_none() && hi.is_none() {
            return Ok(None);
        }
        // An integer's ends become the nearest integers inside; a
        // number's must be whole.
        let whole = |end: Option<(f64, bool)>, lower: bool| -> Result<Option<(i64, bool)>, String> {
            Ok(match end {
                None => None,
                Some((at, excluded)) if integer => {
                    let inside = match (lower, excluded) {
                        (true, true) => at.floor() + 1.0,
                        (true, false) => at.ceil(),
                        (false, true) => at.ceil() - 1.0,
                        (false, false) => at.floor(),
                    };
                    Some((inside as i64, false))
                }
                Some((at, _)) if at.fract() != 0.0 => return Err(format!("`{path}`: the bounds of a `number` must be whole numbers")),
                Some((at, excluded)) => Some((at as i64, excluded)),
            })
        };
        let regex = numbers_between(whole(lo, true)?, whole(hi, false)?, !integer).ok_or_else(|| format!("no number satisfies `{path}`"))?;
        let key = ["minimum", "exclusiveMinimum", "maximum"].into_iter().find(|k| map.contains_key(*k)).unwrap_or("exclusiveMaximum");
        self.regex(regex, path, key, None).map(Some)
    }

    /// Compiles a pattern, format or range (`key`, for errors).
    fn regex(&mut self, regex: String, path: &str, key: &str, lengths: Option<(u32, Option<u32>)>) -> Result<u16, String> {
        let compiled = Dfa::new(&regex, lengths).map_err(|e| format!("`{path}.{key}`: {e}"))?;
        if self.regexes.iter().map(Dfa::memory).sum::<usize>() + compiled.memory() > MAX_DFA_BYTES {
            return Err(format!("`{path}.{key}`: the schema's patterns take more than {} MiB", MAX_DFA_BYTES >> 20));
        }
        self.regexes.push(compiled);
        u16::try_from(self.regexes.len() - 1).map_err(|_| "the schema is too large".to_string())
    }

    /// Object alternatives told apart by a tag: a property each requires
    /// whose values are literals no other alternative has (Pydantic's
    /// discriminated unions, a choice of functions). The object reads its
    /// tag first, which picks the alternative (see [`Arm`]).
    fn union(&mut self, shapes: Vec<ObjectShape>, path: &str) -> Result<(ObjectShape, Vec<Arm>), String> {
        let no_tag = || format!("`{path}`: object alternatives need a tag (a property each requires, of literal values no other has)");
        if shapes.iter().any(|s| s.free) {
            return Err(no_tag());
        }
        let literal_only = |n: &Node| !(n.any || n.string || n.number || n.integer || n.object.is_some() || n.array.is_some());
        let tag_of = |key: &Vec<u8>| -> Option<Vec<(usize, Vec<Vec<u8>>)>> {
            let per: Vec<(usize, Vec<Vec<u8>>)> = shapes
                .iter()
                .map(|s| {
                    let i = s.keys.iter().position(|k| k == key)?;
                    let value = &self.nodes[s.values[i] as usize];
                    (s.required >> i & 1 == 1 && literal_only(value)).then(|| (i, value.literals.clone()))
                })
                .collect::<Option<_>>()?;
            let mut all: Vec<&Vec<u8>> = per.iter().flat_map(|p| &p.1).collect();
            let count = all.len();
            all.sort();
            all.dedup();
            (all.len() == count).then_some(per)
        };
        let (key, per) = shapes[0].keys.iter().find_map(|k| Some((k.clone(), tag_of(k)?))).ok_or_else(no_tag)?;
        let (mut literals, mut arms) = (vec![], vec![]);
        for (shape, (i, tags)) in shapes.into_iter().zip(per) {
            self.nodes.push(Node { object: Some(shape), ..Node::default() });
            let node = u16::try_from(self.nodes.len() - 1).map_err(|_| "the schema is too large".to_string())?;
            arms.extend(tags.iter().map(|_| Arm { node, tag: 1 << i }));
            literals.extend(tags);
        }
        if literals.len() > MAX_CHOICES {
            return Err(format!("`{path}`: the alternatives' tags take {} values; at most {MAX_CHOICES}", literals.len()));
        }
        self.nodes.push(Node { literals, ..Node::default() });
        let tag = u16::try_from(self.nodes.len() - 1).map_err(|_| "the schema is too large".to_string())?;
        Ok((ObjectShape { free: false, keys: vec![key], values: vec![tag], required: 1 }, arms))
    }

    /// An array's shape (None: none this deep in a recursive schema).
    fn array(&mut self, map: &Map<String, Value>, path: &str, depth: usize) -> Result<Option<ArrayShape>, String> {
        if depth == MAX_SCHEMA_DEPTH {
            return match self.recursive {
                0 => Err(format!("`{path}`: objects and arrays nest deeper than {MAX_SCHEMA_DEPTH}")),
                _ => Ok(None),
            };
        }
        let count = |key: &str, default: u64| match map.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| format!("`{path}.{key}` must be a non-negative integer")),
        };
        let (min, max) = (count("minItems", 0)?, count("maxItems", u64::MAX)?);
        if min > max {
            return Err(format!("`{path}`: `minItems` {min} exceeds `maxItems` {max}"));
        }
        let items = self.node(map.get("items").unwrap_or(&Value::Bool(true)), &format!("{path}.items"), depth + 1)?;
        Ok(match items {
            Some(items) => Some(ArrayShape { items, min, max }),
            // Items of no value this deep: only `[]`, where allowed.
            None if min == 0 => Some(ArrayShape { items: self.push(Node::default())?, min, max: 0 }),
            None => None,
        })
    }
}

/// Whether a node admits no value.
fn is_empty(n: &Node) -> bool {
    !(n.any || n.string || n.number || n.integer || n.object.is_some() || n.array.is_some() || !n.literals.is_empty())
}

/// Whether some value satisfies both alternatives (objects aside: theirs
/// are told apart by a tag, or refused).
fn overlap(a: &Node, b: &Node) -> bool {
    let numeric = |n: &Node| n.number || n.integer;
    let admits = |n: &Node, literal: &[u8]| match literal[0] {
        b'"' => n.string,
        b'-' | b'0'..=b'9' => numeric(n),
        b'[' => n.array.is_some(),
        _ => false,
    };
    a.any
        || b.any
        || a.string && b.string
        || numeric(a) && numeric(b)
        || a.array.is_some() && b.array.is_some()
        || a.literals.iter().any(|l| admits(b, l) || b.literals.contains(l))
        || b.literals.iter().any(|l| admits(a, l))
}

/// Adds `branch`'s values to `node`'s (a type list, `anyOf`).
fn merge(node: &mut Node, branch: Node, path: &str) -> Result<(), String> {
    if node.object.is_some() && branch.object.is_some() || node.array.is_some() && branch.array.is_some() {
        return Err(format!("`{path}`: at most one object and one array alternative are supported"));
    }
    // Strings of two rules would need the DFAs' product; a free string
    // covers any rule.
    node.string_rule = match (node.string, branch.string) {
        (true, true) if node.string_rule != branch.string_rule && node.string_rule.is_some() && branch.string_rule.is_some() => {
            return Err(format!("`{path}`: two constrained string alternatives are not supported"))
        }
        (true, true) => node.string_rule.and(branch.string_rule),
        (false, _) => branch.string_rule,
        (true, false) => node.string_rule,
    };
    // A range beside other numbers would need their union.
    let numeric = |n: &Node| n.number || n.integer;
    if numeric(node) && numeric(&branch) && (node.number_rule.is_some() || branch.number_rule.is_some()) {
        return Err(format!("`{path}`: a bounded number beside other numbers is not supported"));
    }
    node.number_rule = node.number_rule.or(branch.number_rule);
    node.any |= branch.any;
    node.string |= branch.string;
    node.number |= branch.number;
    node.integer |= branch.integer;
    node.object = node.object.take().or(branch.object);
    node.array = node.array.take().or(branch.array);
    for literal in branch.literals {
        if !node.literals.contains(&literal) {
            node.literals.push(literal);
        }
    }
    Ok(())
}

/// One open constrained container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Frame {
    node: u16,
    object: bool,
    /// An object's properties present so far (a bit each); an array's
    /// items begun.
    bits: u64,
}

/// Where the cursor stands between two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Cur {
    /// Before a value of a node.
    Value(u16),
    /// After `{`: a key or `}`.
    MemberFirst,
    /// After an object's `,`: a key.
    Member,
    /// In a key: the properties whose names (quotes included) start with
    /// the `at` bytes read.
    Key {
        cands: u64,
        at: u16,
    },
    /// After property `prop`'s key: `:`.
    Colon(u8),
    /// After `[`: an item or `]`.
    ItemFirst,
    /// In a node's literal: those that start with the `at` bytes read.
    Lit {
        node: u16,
        cands: u64,
        at: u16,
    },
    Str {
        escape: u8,
        utf8: u8,
    },
    /// In a string of regex `regex`, the DFA in `state`; after a
    /// backslash when `escape`.
    Regex {
        regex: u16,
        state: StateID,
        escape: bool,
        /// Characters written (where the pattern has lengths beside it).
        count: u32,
    },
    /// In a string of node `node`'s lengths, `count` characters written.
    Len {
        node: u16,
        count: u32,
        escape: u8,
        utf8: u8,
    },
    Num {
        num: Num,
        integer: bool,
    },
    /// In a number of a range: regex `regex`'s DFA in `state`.
    Range {
        regex: u16,
        state: StateID,
    },
    /// In an unconstrained value.
    Any(JsonState),
    /// After a value: `,` or the container's closer; at depth 0 the
    /// answer is complete.
    After,
}

/// A valid prefix of an answer to a schema, byte by byte. Copy, so a
/// candidate token is tried on a copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SchemaCursor<'a> {
    schema: &'a JsonSchema,
    frames: [Frame; MAX_SCHEMA_DEPTH],
    depth: u8,
    cur: Cur,
    ws: u8,
}

/// What a [`SchemaCursor`]'s mask depends on: its open containers, its
/// place and its whitespace (the frames past the depth cleared).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SchemaKey([Frame; MAX_SCHEMA_DEPTH], u8, Cur, u8);

impl SchemaCursor<'_> {
    pub(crate) fn mask_key(&self) -> SchemaKey {
        let mut frames = self.frames;
        frames[self.depth as usize..].fill(Frame::default());
        SchemaKey(frames, self.depth, self.cur, self.ws)
    }
}

/// The candidates in `cands` whose byte `at` is `b`.
fn matching(texts: &[Vec<u8>], cands: u64, at: u16, b: u8) -> u64 {
    bits(cands).filter(|&i| texts[i].get(at as usize) == Some(&b)).fold(0, |m, i| m | 1 << i)
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask >> i & 1 == 1)
}

fn all(n: usize) -> u64 {
    if n == 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

impl<'a> SchemaCursor<'a> {
    fn node(&self, n: u16) -> &'a Node {
        &self.schema.nodes[n as usize]
    }

    fn top(&self) -> Option<Frame> {
        self.depth.checked_sub(1).map(|d| self.frames[d as usize])
    }

    fn shape(&self, frame: Frame) -> &'a ObjectShape {
        self.node(frame.node).object.as_ref().expect("an object frame's node has a shape")
    }

    fn items(&self, frame: Frame) -> &'a ArrayShape {
        self.node(frame.node).array.as_ref().expect("an array frame's node has a shape")
    }

    fn value(&mut self, n: u16, b: u8) -> bool {
        let node = self.node(n);
        if node.any {
            let mut inner = JsonState::before_value();
            self.cur = Cur::Any(inner);
            if !inner.feed(b) {
                return false;
            }
            self.cur = Cur::Any(inner);
            return true;
        }
        let cands = matching(&node.literals, all(node.literals.len()), 0, b);
        if cands != 0 {
            self.cur = Cur::Lit { node: n, cands, at: 1 };
            return true;
        }
        self.cur = match b {
            b'{' => match &node.object {
                Some(shape) if shape.free => {
                    let mut inner = JsonState::default();
                    inner.feed(b);
                    Cur::Any(inner)
                }
                Some(_) => return self.open(n, true),
                None => return false,
            },
            b'[' if node.array.is_some() => return self.open(n, false),
            b'"' if node.string => match node.string_rule {
                Some(StringRule::Regex(regex)) => Cur::Regex { regex, state: self.schema.regexes[regex as usize].start, escape: false, count: 0 },
                Some(StringRule::Length { .. }) => Cur::Len { node: n, count: 0, escape: 0, utf8: 0 },
                None => Cur::Str { escape: 0, utf8: 0 },
            },
            b'-' | b'0'..=b'9' if node.number || node.integer => match node.number_rule {
                Some(regex) => match self.schema.regexes[regex as usize].step(self.schema.regexes[regex as usize].start, b) {
                    Some(state) => Cur::Range { regex, state },
                    None => return false,
                },
                None => Cur::Num { num: Num::first(b).expect("a number's first byte"), integer: !node.number },
            },
            _ => return false,
        };
        true
    }

    fn open(&mut self, node: u16, object: bool) -> bool {
        if self.depth as usize == MAX_SCHEMA_DEPTH {
            return false;
        }
        self.frames[self.depth as usize] = Frame { node, object, bits: 0 };
        self.depth += 1;
        self.cur = if object { Cur::MemberFirst } else { Cur::ItemFirst };
        true
    }

    fn close(&mut self) -> bool {
        self.depth -= 1;
        self.cur = Cur::After;
        true
    }

    /// A key's opening quote: the properties not yet present.
    fn key(&mut self, frame: Frame) -> bool {
        let cands = all(self.shape(frame).keys.len()) & !frame.bits;
        self.cur = Cur::Key { cands, at: 1 };
        cands != 0
    }
}

impl ByteGrammar for SchemaCursor<'_> {
    fn feed(&mut self, b: u8) -> bool {
        match self.cur {
            Cur::Str { escape, utf8 } => {
                self.cur = match string_step(escape, utf8, b) {
                    StrStep::Closed => Cur::After,
                    StrStep::In { escape, utf8 } => Cur::Str { escape, utf8 },
                    StrStep::Refused => return false,
                };
                return true;
            }
            Cur::Regex { regex, state, escape, count } => {
                let r = &self.schema.regexes[regex as usize];
                let decoded = match (escape, b) {
                    (false, b'"') if r.may_end(state, count) => {
                        self.cur = Cur::After;
                        return true;
                    }
                    // An escape begins where some escaped byte may follow.
                    (false, b'\\') => {
                        self.cur = Cur::Regex { regex, state, escape: true, count };
                        return b"\"\\/bfnrt".iter().any(|&e| r.step_char(state, count, unescaped(e).expect("an escape")).is_some());
                    }
                    (false, b'"' | 0..=0x1f) => return false,
                    (false, b) => b,
                    (true, b) => match unescaped(b) {
                        Some(b) => b,
                        None => return false,
                    },
                };
                let Some((state, count)) = r.step_char(state, count, decoded) else { return false };
                self.cur = Cur::Regex { regex, state, escape: false, count };
                return true;
            }
            Cur::Len { node, count, escape, utf8 } => {
                let Some(StringRule::Length { min, max }) = self.node(node).string_rule else { unreachable!("a counted string's node has lengths") };
                // A character begins at a byte outside any character (not
                // the closing quote) and counts at its first byte; an
                // escape counts at its backslash and writes no `\u`.
                let begins = escape == 0 && utf8 == 0 && b != b'"';
                if escape == 1 && b == b'u' || begins && count == max {
                    return false;
                }
                self.cur = match string_step(escape, utf8, b) {
                    StrStep::Closed if count >= min => Cur::After,
                    StrStep::In { escape, utf8 } => Cur::Len { node, count: count + begins as u32, escape, utf8 },
                    StrStep::Closed | StrStep::Refused => return false,
                };
                return true;
            }
            Cur::Key { cands, at } => {
                let frame = self.top().expect("keys are inside an object");
                let keys = &self.shape(frame).keys;
                let next = matching(keys, cands, at, b);
                let Some(i) = bits(next).next() else { return false };
                // A JSON string ends at its closing quote, so no name is a
                // prefix of another: the one that ends here is the only one.
                self.cur = if keys[i].len() == at as usize + 1 {
                    self.frames[self.depth as usize - 1].bits |= 1 << i;
                    Cur::Colon(i as u8)
                } else {
                    Cur::Key { cands: next, at: at + 1 }
                };
                return true;
            }
            Cur::Lit { node, cands, at } => {
                let literals = &self.node(node).literals;
                let next = matching(literals, cands, at, b);
                if next != 0 {
                    self.cur = Cur::Lit { node, cands: next, at: at + 1 };
                    return true;
                }
                // The byte ends a complete literal and is read after it.
                let Some(done) = bits(cands).find(|&i| literals[i].len() == at as usize) else { return false };
                // A union's tag (its only value) picks the alternative.
                if let Some(frame) = self.top().filter(|f| f.object && !self.node(f.node).arms.is_empty()) {
                    let arm = self.node(frame.node).arms[done];
                    self.frames[self.depth as usize - 1] = Frame { node: arm.node, object: true, bits: arm.tag };
                }
                self.cur = Cur::After;
            }
            Cur::Num { num, integer } => match num.next(b).filter(|n| !integer || n.integral()) {
                Some(num) => {
                    self.cur = Cur::Num { num, integer };
                    return true;
                }
                None if num.complete() => self.cur = Cur::After,
                None => return false,
            },
            Cur::Range { regex, state } => {
                let r = &self.schema.regexes[regex as usize];
                match r.step(state, b) {
                    Some(state) => {
                        self.cur = Cur::Range { regex, state };
                        return true;
                    }
                    // The byte ends the number and is read after it.
                    None if r.may_end(state, 0) => self.cur = Cur::After,
                    None => return false,
                }
            }
            Cur::Any(inner) => {
                let mut next = inner;
                if next.feed(b) {
                    self.cur = Cur::Any(next);
                    return true;
                }
                if !inner.can_end() {
                    return false;
                }
                self.cur = Cur::After;
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n') {
            return !self.complete() && whitespace_step(&mut self.ws, b);
        }
        self.ws = 0;
        let top = self.top();
        match (self.cur, b, top) {
            (Cur::Value(n), _, _) => self.value(n, b),
            (Cur::MemberFirst | Cur::After, b'}', Some(f)) if f.object && self.shape(f).required & !f.bits == 0 => self.close(),
            (Cur::MemberFirst | Cur::Member, b'"', Some(f)) => self.key(f),
            (Cur::Colon(p), b':', Some(f)) => {
                self.cur = Cur::Value(self.shape(f).values[p as usize]);
                true
            }
            (Cur::ItemFirst, b']', Some(f)) if self.items(f).min == 0 => self.close(),
            (Cur::ItemFirst, _, Some(f)) if self.items(f).max > 0 => {
                self.frames[self.depth as usize - 1].bits = 1;
                self.value(self.items(f).items, b)
            }
            (Cur::After, b',', Some(f)) if f.object => {
                self.cur = Cur::Member;
                all(self.shape(f).keys.len()) & !f.bits != 0
            }
            (Cur::After, b',', Some(f)) if f.bits < self.items(f).max => {
                self.frames[self.depth as usize - 1].bits += 1;
                self.cur = Cur::Value(self.items(f).items);
                true
            }
            (Cur::After, b']', Some(f)) if !f.object && f.bits >= self.items(f).min => self.close(),
            _ => false,
        }
    }

    fn complete(&self) -> bool {
        // A free root object ends inside its unconstrained value.
        self.depth == 0 && (self.cur == Cur::After || matches!(self.cur, Cur::Any(inner) if inner.complete()))
    }

    fn plain_text_room(&self) -> Option<u32> {
        match self.cur {
            Cur::Str { escape: 0, utf8: 0 } => Some(u32::MAX),
            Cur::Any(inner) => inner.in_plain_string().then_some(u32::MAX),
            Cur::Len { node, count, escape: 0, utf8: 0 } => match self.node(node).string_rule {
                Some(StringRule::Length { max, .. }) => Some(max - count),
                _ => unreachable!("a counted string's node has lengths"),
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_mode::tests::{assert_mask_is_every_tokens_bytes_tried, default_tokenizer};
    use crate::JsonObjectMode;
    use std::sync::Arc;

    /// What Pydantic writes for a model with a nested model, an optional
    /// field, an enum and a list, plus free values.
    const PERSON: &str = r##"{
        "$defs": {"Address": {"type": "object", "title": "Address", "additionalProperties": false,
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}, "required": ["city"]}},
        "type": "object", "title": "Person",
        "properties": {
            "name": {"type": "string", "description": "full name"},
            "age": {"type": "integer"},
            "height": {"type": "number"},
            "alive": {"type": "boolean"},
            "pet": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "address": {"allOf": [{"$ref": "#/$defs/Address"}], "description": "where"},
            "extra": {},
            "meta": {"type": "object"},
            "code": {"const": 7}
        },
        "required": ["name", "age", "colour", "tags"]
    }"##;

    /// String constraints: patterns, formats, lengths.
    const STRINGS: &str = r#"{"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
        "word": {"type": "string", "pattern": "ab"},
        "day": {"type": "string", "format": "date"},
        "at": {"type": "string", "format": "date-time"},
        "t": {"type": "string", "format": "time"},
        "id": {"type": "string", "format": "uuid"},
        "mail": {"type": "string", "format": "email"},
        "ip": {"type": "string", "format": "ipv4"},
        "short": {"type": "string", "minLength": 2, "maxLength": 4},
        "opt": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}, {"enum": ["no"]}]},
        "slug": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "minLength": 3, "maxLength": 8},
        "pin": {"type": "string", "pattern": "[0-9]", "maxLength": 4},
        "long_mail": {"type": "string", "format": "email", "minLength": 12}
    }, "required": ["code", "day", "short"]}"#;

    fn fed<'a>(schema: &'a JsonSchema, text: &str) -> Option<SchemaCursor<'a>> {
        let mut s = schema.start();
        s.feed_all(text.as_bytes()).then_some(s)
    }

    const VALID: [&str; 5] = [
        r#"{"name":"Tom","age":3,"colour":"red","tags":["cat"]}"#,
        "{\n  \"age\": -12,\n  \"name\": \"T\\u00e9 \\\"x\\\" é\",\n  \"colour\": \"blue\", \"tags\": [\"a\", \"b\", \"c\"], \"pet\": null, \"height\": 1.5e3, \"alive\": false, \"address\": {\"zip\": 12345, \"city\": \"Paris\"}, \"extra\": [1, {\"k\": null}], \"meta\": {\"a\": [true]}}",
        r#"{"name":"a","age":0,"colour":"green","tags":["x"],"pet":"Rex","code":7}"#,
        r#"{"name":"a","age":0,"colour":"green","tags":["x"],"extra":12}"#,
        r#"{"extra":"s","name":"a","age":0,"colour":"green","tags":["x"],"meta":{}}"#,
    ];

    #[test]
    fn answers_to_the_schema_are_taken_and_others_refused_where_they_break_it() {
        let schema = JsonSchema::parse(PERSON).unwrap();
        for text in VALID {
            let root: Value = serde_json::from_str(PERSON).unwrap();
            assert!(satisfies(&root, &root, &serde_json::from_str(text).unwrap()), "{text}");
            assert!(fed(&schema, text).is_some_and(|s| s.complete()), "{text:?}");
            for cut in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert!(fed(&schema, &text[..cut]).is_some_and(|s| !s.complete()), "{:?}", &text[..cut]);
            }
        }
        // Each is refused at its last byte, not before.
        for text in [
            r#"{"name":"Tom","age":3,"colour":"red"}"#,
            r#"{"ni"#,
            r#"{"name":"a","n"#,
            r#"{"name":3"#,
            r#"{"name":"a","age":3."#,
            r#"{"name":"a","age":3e"#,
            r#"{"name":"a","colour":"p"#,
            r#"{"name":"a","colour":"redd"#,
            r#"{"tags":["a","b","c","#,
            r#"{"tags":[]"#,
            r#"{"tags":[1"#,
            r#"{"address":{"zip":1}"#,
            r#"{"address":{"city":"x","s"#,
            r#"{"pet":t"#,
            r#"{"alive":""#,
            r#"{"code":8"#,
            r#"{"code":70"#,
            r#"{"name":"a","age":0,"colour":"green","tags":["x"]} "#,
            r#"["#,
        ] {
            assert!(fed(&schema, &text[..text.len() - 1]).is_some(), "{text:?} was refused early");
            assert!(fed(&schema, text).is_none(), "{text:?} was taken");
        }
    }

    #[test]
    fn strings_follow_their_pattern_format_and_lengths() {
        let root: Value = serde_json::from_str(STRINGS).unwrap();
        let schema = JsonSchema::from_value(&root).unwrap();
        for text in [
            r#"{"code":"AB-123","day":"2024-02-29","short":"ab"}"#,
            concat!(
                r#"{"short":"é\n\"/","code":"ZZ-000","word":"x\\ab\\","day":"0001-12-31","at":"2026-12-07T21:30:00.123456Z","#,
                r#""t":"00:00:59-11:30","id":"123e4567-e89b-12d3-a456-426614174000","mail":"a.b+c@mail.example.org","ip":"255.0.10.199","opt":"no"}"#
            ),
            r#"{"code":"AB-123","day":"2000-02-29","short":"abcd","opt":null,"word":"ab"}"#,
            r#"{"code":"AB-123","day":"2000-02-29","short":"ab","slug":"a-b","pin":"ab\n7","long_mail":"a@bb.example"}"#,
            r#"{"code":"AB-123","day":"2000-02-29","short":"ab","slug":"ab-cdefg","pin":"é5","long_mail":"abcdefgh@x.io"}"#,
        ] {
            assert!(satisfies(&root, &root, &serde_json::from_str(text).unwrap()), "{text}");
            assert!(fed(&schema, text).is_some_and(|s| s.complete()), "{text:?}");
        }
        // Each is refused at its last byte, not before.
        for text in [
            r#"{"code":"Ab"#,
            r#"{"code":"AB-1234"#,
            r#"{"word":"x\u"#,
            r#"{"word":"xyz""#,
            r#"{"day":"2023-02-29"#,
            r#"{"day":"1900-02-29"#,
            r#"{"day":"2024-04-31"#,
            r#"{"day":"0000"#,
            r#"{"at":"2024-01-01 "#,
            r#"{"t":"24"#,
            r#"{"t":"12:00:00""#,
            r#"{"t":"12:00:00.1234567"#,
            r#"{"id":"123E"#,
            r#"{"mail":"a@b""#,
            r#"{"mail":"a.."#,
            r#"{"ip":"256"#,
            r#"{"ip":"1.2.3.4."#,
            r#"{"short":"a""#,
            r#"{"short":"abcde"#,
            r#"{"short":"abcd\"#,
            r#"{"short":"\u"#,
            r#"{"opt":"abcd"#,
            r#"{"ip":"01"#,
            // A pattern beside lengths: a character past the most, an end
            // short of the least, one that leaves no room for the rest.
            r#"{"slug":"abcdefghi"#,
            r#"{"slug":"ab""#,
            r#"{"slug":"abcdefg-"#,
            r#"{"slug":"-"#,
            r#"{"pin":"abcd"#,
            r#"{"pin":"\n\né\"#,
            r#"{"pin":"12345"#,
            r#"{"long_mail":"a@b.io""#,
        ] {
            assert!(fed(&schema, &text[..text.len() - 1]).is_some(), "{text:?} was refused early");
            assert!(fed(&schema, text).is_none(), "{text:?} was taken");
        }
        // A control character the DFA takes comes through its escape.
        let tabs = JsonSchema::parse(r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^\\t+$"}}}"#).unwrap();
        assert!(fed(&tabs, r#"{"a":"\t\t"}"#).is_some_and(|s| s.complete()));
        assert!(fed(&tabs, r#"{"a":"\n"#).is_none());
    }

    /// vLLM's `guided_regex` and `guided_choice`: the whole output
    /// matches; an end is allowed at each match, and a match may go on.
    #[test]
    fn output_regexes_match_the_whole_output() {
        fn fed<'a>(r: &'a OutputRegex, text: &str) -> Option<RegexCursor<'a>> {
            let mut c = r.start();
            c.feed_all(text.as_bytes()).then_some(c)
        }
        let phone = OutputRegex::new(r"\(?[0-9]{3}\)? [0-9]{3}-[0-9]{4}").unwrap();
        assert!(fed(&phone, "(555) 123-4567").is_some_and(|c| c.complete()));
        assert!(fed(&phone, "555 123-456").is_some_and(|c| !c.complete()));
        assert!(fed(&phone, "555 123-45678").is_none() && fed(&phone, "x").is_none());
        let more = OutputRegex::new("ab+").unwrap();
        assert!(fed(&more, "ab").is_some_and(|c| c.complete()) && fed(&more, "abbb").is_some_and(|c| c.complete()) && fed(&more, "abc").is_none());
        // Choices are literals, their meta characters escaped.
        let choice = OutputRegex::choice(&["positive", "négatif", "a.b", "x|y", "(1+1)*2"]).unwrap();
        for option in ["positive", "négatif", "a.b", "x|y", "(1+1)*2"] {
            assert!(fed(&choice, option).is_some_and(|c| c.complete()), "{option}");
        }
        for other in ["positives", "a-b", "x", "y", "2"] {
            assert!(!fed(&choice, other).is_some_and(|c| c.complete()), "{other}");
        }
        assert!(fed(&choice, "posi").is_some_and(|c| !c.complete()) && fed(&choice, "pz").is_none());
        for (bad, why) in [
            ("(", "unclosed group"),
            ("\u{1}", "no string"),
            (r"\w{4000}", "exceeded size limit"),
            ("a{2,1}", "regex parse error: invalid repetition count range"),
        ] {
            assert!(OutputRegex::new(bad).is_err_and(|e| e.to_string().contains(why)), "{bad}: {why}");
        }
        // The mask is the same as trying every token's bytes.
        let mode = JsonObjectMode::new(default_tokenizer());
        let choice = Arc::new(choice);
        assert_mask_is_every_tokens_bytes_tried(&mode.with_regex(choice.clone()), choice.start(), &["positive", "négatif", "(1+1)*2"]);
        let phone = Arc::new(phone);
        assert_mask_is_every_tokens_bytes_tried(&mode.with_regex(phone.clone()), phone.start(), &["(555) 123-4567"]);
        let more = Arc::new(more);
        assert_mask_is_every_tokens_bytes_tried(&mode.with_regex(more.clone()), more.start(), &["abbbb"]);
    }

    /// A pattern beside lengths keeps exactly the strings both allow.
    #[test]
    fn pattern_lengths_are_the_product_of_both() {
        let cases = [(0, Some(0)), (0, Some(1)), (2, Some(2)), (3, Some(5)), (4, None), (0, Some(7)), (7, None), (2, None), (2, Some(4))];
        for (pattern, (min, max)) in ["^(ab|c)+$", "^(a|bca)$"].into_iter().flat_map(|p| cases.map(|c| (p, c))) {
            let regex = regex::Regex::new(pattern).unwrap();
            let dfa = Dfa::new(pattern, Some((min, max)));
            // Every string of a, b and c up to 8 long, against the regex.
            let mut all = vec![String::new()];
            for _ in 0..8 {
                all.extend(
                    all.iter().filter(|s| s.len() == all.last().unwrap().len()).flat_map(|s| ["a", "b", "c"].map(|c| format!("{s}{c}"))).collect::<Vec<_>>(),
                );
            }
            let wanted = |t: &str| regex.is_match(t) && t.len() >= min as usize && max.is_none_or(|m| t.len() <= m as usize);
            match &dfa {
                Err(e) => assert!(!all.iter().any(|t| wanted(t)) && e.contains("no string"), "{pattern} {min}..{max:?}: {e}"),
                Ok(dfa) => {
                    for t in &all {
                        assert_eq!(dfa.accepts(t), wanted(t), "{t:?} in {pattern} {min}..{max:?}");
                        // A prefix is entered only where some string it begins is wanted.
                        let entered = t.bytes().try_fold((dfa.start, 0), |(s, c), b| dfa.step_char(s, c, b)).is_some();
                        let extends = all.iter().any(|u| u.starts_with(t.as_str()) && wanted(u)) || max.is_none() && t.len() == 8 && entered;
                        assert_eq!(entered, extends, "{t:?} in {pattern} {min}..{max:?}");
                    }
                }
            }
        }
        // Too large a product is refused.
        let huge = JsonSchema::parse(r#"{"type":"object","properties":{"a":{"type":"string","pattern":"[a-z]","maxLength":4000000}}}"#);
        assert!(huge.is_err_and(|e| e.to_string().contains("too many steps")));
    }

    /// A recursive schema (Pydantic's self-referencing models): a tree
    /// whose nodes have children and maybe a `next` and a `left`.
    const TREE: &str = r##"{"$defs": {"Node": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 3},
        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2},
        "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
        "left": {"$ref": "#/$defs/Node"}
    }, "required": ["name", "children"]}}, "type": "object", "properties": {"root": {"$ref": "#/$defs/Node"}}, "required": ["root"]}"##;

    /// A recursive schema is unrolled as deep as the cursor goes: each
    /// definition is built once per depth, and at the last level a node's
    /// children can only be `[]` and its `next` only null.
    #[test]
    fn recursive_schemas_unroll_to_the_cursors_depth() {
        let root: Value = serde_json::from_str(TREE).unwrap();
        let schema = JsonSchema::from_value(&root).unwrap();
        // Children's nodes at depths 1, 3, …, 13 (7 levels); a node of
        // depth 15 would need children at 16.
        let nest = |levels: usize| {
            let mut text = r#"{"name":"a","children":[]}"#.to_string();
            for _ in 1..levels {
                text = format!(r#"{{"name":"b","next":null,"children":[{text},{{"name":"c","children":[]}}]}}"#);
            }
            format!(r#"{{"root":{text}}}"#)
        };
        let deepest = nest(7);
        assert!(satisfies(&root, &root, &serde_json::from_str(&deepest).unwrap()));
        assert!(fed(&schema, &deepest).is_some_and(|s| s.complete()), "{deepest}");
        let innermost = deepest.find(r#"{"name":"a""#).unwrap() + r#"{"name":"a","children":["#.len();
        assert!(fed(&schema, &format!("{}{{", &deepest[..innermost])).is_none(), "an 8th level was taken");
        // Its `next` (an object at 14) has children at 15: `[]` only, and
        // its own `next` (at 15) could have none: null only; its `left`,
        // being optional, is left out.
        let next = format!(r#"{}],"next":{{"name":"d","children":["#, &deepest[..innermost]);
        assert!(fed(&schema, &format!("{next}]")).is_some() && fed(&schema, &format!("{next}{{")).is_none());
        assert!(fed(&schema, &format!(r#"{next}],"l"#)).is_none() && fed(&schema, &format!(r#"{}],"l"#, &deepest[..innermost])).is_some());
        let last = format!(r#"{next}],"next":"#);
        assert!(fed(&schema, &format!("{last}n")).is_some() && fed(&schema, &format!("{last}{{")).is_none());
        // `next` chains alike, one level per object.
        let chain = (0..6).fold(r#"{"name":"z","children":[]}"#.to_string(), |inner, _| format!(r#"{{"name":"y","children":[],"next":{inner}}}"#));
        assert!(fed(&schema, &format!(r#"{{"root":{chain}}}"#)).is_some_and(|s| s.complete()));
        // Three references per level, built once per depth, not 4^7 times.
        assert!(schema.nodes.len() < 200, "{} nodes", schema.nodes.len());
    }

    /// Integers and numbers between bounds, each end included or not.
    const NUMBERS: &str = r#"{"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "temp": {"type": "integer", "exclusiveMaximum": -5},
        "n": {"type": ["integer", "null"], "minimum": 2.5},
        "big": {"type": "number", "minimum": -1000000}
    }, "required": ["age", "score"]}"#;

    #[test]
    fn numbers_stay_within_their_bounds() {
        let root: Value = serde_json::from_str(NUMBERS).unwrap();
        let schema = JsonSchema::from_value(&root).unwrap();
        for text in [
            r#"{"age":0,"score":1}"#,
            r#"{"age":30,"score":0.001,"temp":-6,"n":3,"big":-999999.5}"#,
            r#"{"score":1.000,"age":7,"n":null,"temp":-1234567,"big":123456789012}"#,
        ] {
            assert!(satisfies(&root, &root, &serde_json::from_str(text).unwrap()), "{text}");
            assert!(fed(&schema, text).is_some_and(|s| s.complete()), "{text:?}");
        }
        // Each is refused at its last byte, not before.
        for text in [
            r#"{"age":-"#,
            r#"{"age":31"#,
            r#"{"age":300"#,
            r#"{"age":3."#,
            r#"{"age":07"#,
            r#"{"score":2"#,
            r#"{"score":1.1"#,
            r#"{"score":0,"#,
            r#"{"score":0.00}"#,
            r#"{"score":1e"#,
            r#"{"temp":-5,"#,
            r#"{"temp":0"#,
            r#"{"n":2,"#,
            r#"{"big":-1000000.01"#,
        ] {
            assert!(fed(&schema, &text[..text.len() - 1]).is_some(), "{text:?} was refused early");
            assert!(fed(&schema, text).is_none(), "{text:?} was taken");
        }
    }

    /// Every range's regex against the numbers' values, over integers and
    /// decimals around its ends.
    #[test]
    fn ranges_take_exactly_the_numbers_inside() {
        let ends = [None, Some(-1000), Some(-123), Some(-10), Some(-1), Some(0), Some(1), Some(9), Some(10), Some(99), Some(100), Some(1000)];
        let mut texts: Vec<String> = (-1100..=1100).map(|n: i64| n.to_string()).collect();
        for n in (-130..=130).chain([-1000, -999, 999, 1000]) {
            for fraction in ["5", "25", "0", "00", "05", "999"] {
                let sign = if n == 0 { "-" } else { "" };
                texts.push(format!("{n}.{fraction}"));
                texts.push(format!("{sign}{n}.{fraction}").replace("--", "-"));
            }
        }
        texts.retain(|t| !(t.starts_with('-') && t.parse::<f64>().unwrap() == 0.0));
        texts.dedup();
        for lo in ends.iter().flat_map(|e| [e.map(|e| (e, false)), e.map(|e| (e, true))]) {
            for hi in ends.iter().flat_map(|e| [e.map(|e| (e, false)), e.map(|e| (e, true))]) {
                for fractions in [false, true] {
                    let inside = |t: &str| {
                        let v: f64 = t.parse().unwrap();
                        (fractions || !t.contains('.'))
                            && lo.is_none_or(|(l, excluded)| if excluded { v > l as f64 } else { v >= l as f64 })
                            && hi.is_none_or(|(h, excluded)| if excluded { v < h as f64 } else { v <= h as f64 })
                    };
                    match numbers_between(lo, hi, fractions) {
                        None => assert!(!texts.iter().any(|t| inside(t)), "{lo:?}..{hi:?} has numbers"),
                        Some(regex) => {
                            let dfa = Dfa::new(&regex, None).unwrap();
                            for t in &texts {
                                assert_eq!(dfa.accepts(t), inside(t), "{t} in {lo:?}..{hi:?} (fractions: {fractions}): {regex}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// A discriminated union as Pydantic writes it (`oneOf` of `$ref`s
    /// with a `const` tag), and `oneOf` of kinds.
    const UNION: &str = r##"{"$defs": {
        "Cat": {"type": "object", "properties": {"pet_type": {"const": "cat", "type": "string"}, "meows": {"type": "integer"}},
            "required": ["pet_type", "meows"], "additionalProperties": false},
        "Dog": {"type": "object", "properties": {"pet_type": {"const": "dog", "type": "string"}, "barks": {"type": "number"}, "good": {"type": "boolean"}},
            "required": ["pet_type", "barks"]},
        "Bird": {"type": "object", "properties": {"kind": {"enum": ["parrot", "crow"]}, "pet_type": {"enum": ["bird", "fowl"]}}, "required": ["pet_type"]}
    }, "type": "object", "properties": {
        "pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"$ref": "#/$defs/Bird"}], "discriminator": {"propertyName": "pet_type"}},
        "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "maybe": {"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
    }, "required": ["pet"]}"##;

    #[test]
    fn a_union_reads_its_tag_first_and_then_that_alternative() {
        let root: Value = serde_json::from_str(UNION).unwrap();
        let schema = JsonSchema::from_value(&root).unwrap();
        for text in [
            r#"{"pet":{"pet_type":"cat","meows":3}}"#,
            r#"{"pet":{"pet_type":"dog","good":true,"barks":1.5},"owner":null,"maybe":"x"}"#,
            r#"{"pet": {"pet_type": "fowl"}, "maybe": 3}"#,
            r#"{"maybe":null,"pet":{"pet_type":"bird","kind":"crow"}}"#,
        ] {
            assert!(satisfies(&root, &root, &serde_json::from_str(text).unwrap()), "{text}");
            assert!(fed(&schema, text).is_some_and(|s| s.complete()), "{text:?}");
        }
        // Each is refused at its last byte, not before.
        for text in [
            r#"{"pet":{"m"#,
            r#"{"pet":{}"#,
            r#"{"pet":{"pet_type":"co"#,
            r#"{"pet":{"pet_type":"cat","b"#,
            r#"{"pet":{"pet_type":"cat"}"#,
            r#"{"pet":{"pet_type":"dog","m"#,
            r#"{"pet":{"pet_type":"bird","kind":"crow","#,
            r#"{"pet":{"pet_type":"cat","meows":1."#,
        ] {
            assert!(fed(&schema, &text[..text.len() - 1]).is_some(), "{text:?} was refused early");
            assert!(fed(&schema, text).is_none(), "{text:?} was taken");
        }
    }

    /// Enum values a branch's kind admits anyway do not narrow it.
    #[test]
    fn values_another_branch_covers_leave_it_whole() {
        let schema =
            JsonSchema::parse(r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"string"},{"type":"number"},{"enum":["x",2,null]}]}}}"#).unwrap();
        for text in [r#"{"a":"y"}"#, r#"{"a":"x"}"#, r#"{"a":25}"#, r#"{"a":2}"#, r#"{"a":null}"#] {
            assert!(fed(&schema, text).is_some_and(|s| s.complete()), "{text}");
        }
    }

    #[test]
    fn unsupported_or_contradictory_schemas_are_refused_by_name() {
        let many = format!(r#"{{"type":"object","properties":{{"a":{{"enum":[{}]}}}}}}"#, (0..65).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        for (schema, says) in [
            (r#"{"type":"object","properties":{"a":{"type":"string","pattern":"(?<=x)y"}}}"#, "`schema.properties.a.pattern`: "),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^\\u0001$"}}}"#,
                "`schema.properties.a.pattern`: no string the answer can write",
            ),
            (r#"{"type":"object","properties":{"a":{"type":"string","pattern":"\\w{4000}"}}}"#, "`schema.properties.a.pattern`: "),
            (r#"{"type":"object","properties":{"a":{"type":"string","format":"uri"}}}"#, "`schema.properties.a.format`: `uri` is not supported"),
            (r#"{"type":"object","properties":{"a":{"type":"number","minimum":0.5}}}"#, "the bounds of a `number` must be whole numbers"),
            (r#"{"type":"object","properties":{"a":{"type":"integer","minimum":1,"exclusiveMinimum":0}}}"#, "`minimum` beside `exclusiveMinimum`"),
            (r#"{"type":"object","properties":{"a":{"type":"integer","minimum":5,"exclusiveMaximum":5}}}"#, "no number satisfies `schema.properties.a`"),
            (r#"{"type":"object","properties":{"a":{"type":"integer","maximum":1e16}}}"#, "`schema.properties.a.maximum` must be a number of magnitude"),
            (r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"integer","minimum":0},{"type":"number"}]}}}"#, "a bounded number beside other numbers"),
            (r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"integer","minimum":0},{"enum":[-1]}]}}}"#, "the value -1 starts like"),
            (r#"{"type":"object","properties":{"a":{"minimum":0}}}"#, "`schema.properties.a.minimum` without a `type`"),
            (r#"{"type":"object","properties":{"a":{"format":"date"}}}"#, "`schema.properties.a.format` without a `type` it applies to"),
            (r#"{"type":"object","properties":{"a":{"type":"string","format":"date","pattern":"x"}}}"#, "`pattern` beside `format`"),
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"^xyz$","maxLength":2}}}"#,
                "`schema.properties.a.pattern`: no string the answer can write",
            ),
            (r#"{"type":"object","properties":{"a":{"type":"string","minLength":3,"maxLength":2}}}"#, "`minLength` 3 exceeds `maxLength` 2"),
            (r#"{"type":"object","properties":{"a":{"type":"string","minLength":-1}}}"#, "`schema.properties.a.minLength` must be a non-negative integer"),
            (
                r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"string","format":"date"},{"type":"string","format":"uuid"}]}}}"#,
                "two constrained string",
            ),
            (r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"string","pattern":"^x+$"},{"enum":["xx","y"]}]}}}"#, "the value \"y\" starts like"),
            (r#"{"type":"array"}"#, "must describe an object"),
            (r#"{"type":"object","required":["a"]}"#, "`schema.required` names `a`"),
            (r#"{"type":"object","properties":{"a":{"type":"decimal"}}}"#, "`decimal` is not a JSON Schema type"),
            (r#"{"type":"object","properties":{"a":{"type":"array","minItems":3,"maxItems":2}}}"#, "`schema.properties.a`: `minItems` 3 exceeds `maxItems` 2"),
            (r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/Missing"}}}"##, "`#/$defs/Missing` is not a schema"),
            (
                r##"{"$defs":{"N":{"type":"object","properties":{"next":{"$ref":"#/$defs/N"}},"required":["next"]}},"$ref":"#/$defs/N"}"##,
                "no value satisfies `schema.properties.next`",
            ),
            (
                r##"{"$defs":{"A":{"anyOf":[{"$ref":"#/$defs/A"},{"type":"null"}]}},"type":"object","properties":{"a":{"$ref":"#/$defs/A"}}}"##,
                "`#/$defs/A` refers to itself outside any object",
            ),
            (
                r##"{"$defs":{"L":{"type":"array","items":{"$ref":"#/$defs/L"},"minItems":1}},"type":"object","properties":{"a":{"$ref":"#/$defs/L"}},"required":["a"]}"##,
                "no value satisfies `schema.properties.a.items`",
            ),
            (r#"{"type":"object","properties":{"a":false}}"#, "`schema.properties.a` is `false`"),
            (
                r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"object"},{"type":"object"}]}}}"#,
                "`schema.properties.a`: object alternatives need a tag",
            ),
            (
                r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"object","properties":{"t":{"const":1}},"required":["t"]},{"type":"object","properties":{"t":{"enum":[2,1]}},"required":["t"]}]}}}"#,
                "object alternatives need a tag",
            ),
            (
                r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"object","properties":{"t":{"const":1}},"required":["t"]},{"type":"object","properties":{"t":{"const":2}}}]}}}"#,
                "object alternatives need a tag",
            ),
            (r#"{"type":"object","properties":{"a":{"oneOf":[{"type":"string"},{"enum":["x"]}]}}}"#, "`schema.properties.a.oneOf[1]` admits values of another"),
            (
                r#"{"type":"object","properties":{"a":{"oneOf":[{"type":"integer"},{"type":"number"}]}}}"#,
                "`schema.properties.a.oneOf[1]` admits values of another",
            ),
            (r#"{"type":"object","properties":{"a":{"enum":[]}}}"#, "`schema.properties.a.enum` must be a non-empty array"),
            (r#"{"type":"object","properties":{"a":{"allOf":[{"type":"string"},{"type":"null"}]}}}"#, "`schema.properties.a.allOf` of more than one"),
            (&many, "at most 64"),
            (r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"integer"},{"const":1.5}]}}}"#, "the value 1.5 starts like"),
            ("{", "not JSON"),
        ] {
            let err = JsonSchema::parse(schema).unwrap_err().to_string();
            assert!(err.contains(says), "{schema}: {err:?} does not say {says:?}");
        }
    }

    /// From every state a random walk reaches some byte is taken until the
    /// answer is complete, and nothing after; every complete answer
    /// satisfies the schema.
    #[test]
    fn no_state_is_a_dead_end_and_complete_answers_satisfy_the_schema() {
        // No `e`: serde_json refuses exponents out of f64's range, which
        // JSON allows (`true` and `false` still get theirs, the only byte
        // taken there).
        let alphabet: Vec<u8> = b"{}[]\",: \n-.0123456789trufalsnxyzb@\\".to_vec();
        for source in [
            PERSON,
            r#"{"type":"object"}"#,
            r#"{"type":"object","properties":{"a":{"type":"array","items":{"type":["integer","null"]},"maxItems":2}},"required":["a"]}"#,
            STRINGS,
            NUMBERS,
            UNION,
            // A recursive list whose items may hold one more.
            r##"{"$defs": {"Item": {"type": "object", "properties": {"v": {"type": "integer", "maximum": 9}, "rest": {"anyOf": [{"$ref": "#/$defs/Item"}, {"type": "null"}]},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 1}}, "required": ["v"]}},
                "type": "object", "properties": {"list": {"$ref": "#/$defs/Item"}}, "required": ["list"]}"##,
        ] {
            let root: Value = serde_json::from_str(source).unwrap();
            let schema = JsonSchema::from_value(&root).unwrap();
            let mut completed = 0;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..60 {
                let (mut state, mut text) = (schema.start(), Vec::new());
                for _ in 0..3000 {
                    let allowed: Vec<u8> = (0..=255u8).filter(|&b| { state }.feed(b)).collect();
                    if state.complete() {
                        assert!(allowed.is_empty(), "bytes after a complete answer: {:?}", String::from_utf8_lossy(&text));
                        break;
                    }
                    assert!(!allowed.is_empty(), "a dead end after {:?}", String::from_utf8_lossy(&text));
                    let preferred: Vec<u8> = allowed.iter().copied().filter(|b| alphabet.contains(b)).collect();
                    let pool = if preferred.is_empty() { &allowed } else { &preferred };
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let b = pool[(rng % pool.len() as u64) as usize];
                    assert!(state.feed(b));
                    text.push(b);
                }
                if state.complete() {
                    completed += 1;
                    let value: Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&text)));
                    assert!(satisfies(&root, &root, &value), "{source}: {value}");
                }
            }
            assert!(completed >= 20, "{source}: only {completed} of 60 walks completed");
        }
    }

    #[test]
    fn the_mask_is_every_tokens_bytes_tried() {
        let schema = Arc::new(JsonSchema::parse(PERSON).unwrap());
        let mode = JsonObjectMode::new(default_tokenizer()).with_schema(Some(schema.clone()));
        let cuts = [r#"{"colour":"gr"#, r#"{"address":{"c"#, r#"{"age":-"#, r#"{"tags":["a","#, r#"{"extra":[1, {"#];
        let texts: Vec<&str> = [VALID[1], VALID[4]].iter().chain(&cuts).copied().collect();
        assert_mask_is_every_tokens_bytes_tried(&mode, schema.start(), &texts);
        let strings = Arc::new(JsonSchema::parse(STRINGS).unwrap());
        let mode = mode.with_schema(Some(strings.clone()));
        let texts = [
            r#"{"code":"AB-12"#,
            r#"{"at":"2024-02-2"#,
            r#"{"mail":"a.b@x"#,
            r#"{"short":"é"#,
            r#"{"short":"abc"#,
            r#"{"word":"a\"#,
            r#"{"pin":"ab"#,
            r#"{"slug":"ab-c"#,
        ];
        assert_mask_is_every_tokens_bytes_tried(&mode, strings.start(), &texts);
        let numbers = Arc::new(JsonSchema::parse(NUMBERS).unwrap());
        let mode = mode.with_schema(Some(numbers.clone()));
        assert_mask_is_every_tokens_bytes_tried(&mode, numbers.start(), &[r#"{"age":3"#, r#"{"score":0."#, r#"{"temp":-"#, r#"{"big":12"#]);
        let union = Arc::new(JsonSchema::parse(UNION).unwrap());
        let mode = mode.with_schema(Some(union.clone()));
        assert_mask_is_every_tokens_bytes_tried(&mode, union.start(), &[r#"{"pet":{"#, r#"{"pet":{"pet_type":"#, r#"{"pet":{"pet_type":"dog","#]);
    }

    /// A small validator of the subset's meaning (JSON Schema's, not
    /// the cursor's), for the answers above.
    fn satisfies(s: &Value, root: &Value, v: &Value) -> bool {
        let Some(m) = s.as_object() else { return s == &Value::Bool(true) };
        if let Some(r) = m.get("$ref") {
            return satisfies(&root["$defs"][r.as_str().unwrap().trim_start_matches("#/$defs/")], root, v);
        }
        if let Some(branches) = m.get("anyOf") {
            return branches.as_array().unwrap().iter().any(|b| satisfies(b, root, v));
        }
        if let Some(branches) = m.get("oneOf") {
            return branches.as_array().unwrap().iter().filter(|b| satisfies(b, root, v)).count() == 1;
        }
        if let Some(all) = m.get("allOf") {
            return all.as_array().unwrap().iter().all(|b| satisfies(b, root, v));
        }
        if let Some(c) = m.get("const") {
            return c == v;
        }
        if let Some(e) = m.get("enum") {
            return e.as_array().unwrap().contains(v);
        }
        if let Some(t) = m.get("type") {
            let types: Vec<&str> = t.as_array().map_or_else(|| vec![t.as_str().unwrap()], |a| a.iter().map(|x| x.as_str().unwrap()).collect());
            let typed = types.iter().any(|t| match (*t, v) {
                ("object", Value::Object(_)) | ("array", Value::Array(_)) | ("string", Value::String(_)) | ("number", Value::Number(_)) => true,
                ("boolean", Value::Bool(_)) | ("null", Value::Null) => true,
                ("integer", Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
                _ => false,
            });
            if !typed {
                return false;
            }
        }
        match v {
            Value::Object(o) => {
                let props = m.get("properties").and_then(Value::as_object);
                let required = m.get("required").and_then(Value::as_array).into_iter().flatten();
                required.into_iter().all(|r| o.contains_key(r.as_str().unwrap()))
                    && o.iter().all(|(k, x)| match props.and_then(|p| p.get(k)) {
                        Some(p) => satisfies(p, root, x),
                        None => m.get("additionalProperties").is_none_or(|a| satisfies(a, root, x)),
                    })
            }
            Value::Number(n) => {
                let v = n.as_f64().unwrap();
                let bound = |key: &str, ok: fn(f64, f64) -> bool| m.get(key).is_none_or(|b| ok(v, b.as_f64().unwrap()));
                bound("minimum", |v, b| v >= b)
                    && bound("maximum", |v, b| v <= b)
                    && bound("exclusiveMinimum", |v, b| v > b)
                    && bound("exclusiveMaximum", |v, b| v < b)
            }
            Value::String(text) => {
                let count = |key: &str, default: u64| m.get(key).and_then(Value::as_u64).unwrap_or(default);
                let chars = text.chars().count() as u64;
                (count("minLength", 0)..=count("maxLength", u64::MAX)).contains(&chars)
                    && m.get("pattern").is_none_or(|p| regex::Regex::new(p.as_str().unwrap()).unwrap().is_match(text))
                    && m.get("format").is_none_or(|f| has_format(f.as_str().unwrap(), text))
            }
            Value::Array(a) => {
                let count = |key: &str, default: u64| m.get(key).and_then(Value::as_u64).unwrap_or(default);
                (count("minItems", 0)..=count("maxItems", u64::MAX)).contains(&(a.len() as u64))
                    && a.iter().all(|x| m.get("items").is_none_or(|i| satisfies(i, root, x)))
            }
            _ => true,
        }
    }

    /// The formats' meaning, checked by hand rather than by regex.
    fn has_format(format: &str, text: &str) -> bool {
        let digits = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
        let number = |t: &str| t.parse::<u32>().unwrap_or(u32::MAX);
        let date = |t: &str| {
            let parts: Vec<&str> = t.split('-').collect();
            let [y, m, d] = parts[..] else { return false };
            let (year, month, day) = (number(y), number(m), number(d));
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
            digits(y, 4) && digits(m, 2) && digits(d, 2) && year >= 1 && (1..=12).contains(&month) && (1..=days[month as usize - 1]).contains(&day)
        };
        let clock = |t: &str| {
            let parts: Vec<&str> = t.split(':').collect();
            parts.len() >= 2 && parts.iter().all(|p| digits(p, 2)) && number(parts[0]) < 24 && parts[1..].iter().all(|p| number(p) < 60)
        };
        let time = |t: &str| {
            let (rest, zone) = match t.strip_suffix('Z') {
                Some(rest) => (rest, "00:00"),
                None if t.len() > 6 && matches!(t.as_bytes()[t.len() - 6], b'+' | b'-') => (&t[..t.len() - 6], &t[t.len() - 5..]),
                None => return false,
            };
            let (hms, fraction) = rest.split_once('.').unwrap_or((rest, "0"));
            hms.len() == 8 && clock(hms) && zone.len() == 5 && clock(zone) && (1..=6).contains(&fraction.len()) && fraction.bytes().all(|b| b.is_ascii_digit())
        };
        match format {
            "date" => date(text),
            "time" => time(text),
            "date-time" => text.split_once('T').is_some_and(|(d, t)| date(d) && time(t)),
            "uuid" => {
                text.len() == 36 && text.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { matches!(c, '0'..='9' | 'a'..='f') })
            }
            "email" => text.split_once('@').is_some_and(|(local, domain)| {
                let atom = |a: &str| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"_%+-".contains(&b));
                let label = |l: &str| {
                    (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-')
                };
                let labels: Vec<&str> = domain.split('.').collect();
                local.split('.').all(atom)
                    && labels.len() >= 2
                    && labels.iter().all(|l| label(l))
                    && labels.last().is_some_and(|t| t.len() >= 2 && t.bytes().all(|b| b.is_ascii_alphabetic()))
            }),
            "ipv4" => {
                let parts: Vec<&str> = text.split('.').collect();
                parts.len() == 4
                    && parts.iter().all(|p| {
                        !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) && (p.len() == 1 || !p.starts_with('0')) && number(p) <= 255
                    })
            }
            _ => false,
        }
    }
}
