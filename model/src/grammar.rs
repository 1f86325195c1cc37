//! GBNF grammars: llama.cpp's `grammar` and vLLM's `guided_grammar`. The
//! whole output is a sentence of the grammar's `root` rule; the mask lets
//! through only tokens that keep it a prefix of one.
//!
//! The syntax is llama.cpp's (`grammars/README.md` there):
//! `name ::= alternatives`, with `"literals"` (escapes `\n \r \t \\ \"
//! \xHH \uHHHH \UHHHHHHHH`), character classes `[a-z_]` and `[^"\\]`,
//! `.` (any character), rule names, groups `( … )`, alternatives `|`,
//! and the repetitions `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`;
//! `#` starts a comment. A rule ends at a line break outside
//! parentheses, unless the next line goes on with `|`. Errors name the
//! line and column, and a rule that is used but not defined, defined
//! twice, or left-recursive (it can reach itself before reading a
//! character, which llama.cpp refuses too).
//!
//! Reading the output works as llama.cpp's sampler does: a set of
//! stacks of positions in the rules (a grammar may be ambiguous), each
//! stack's top a character class; a character keeps the stacks whose
//! top takes it and expands what follows. A rule referenced last in an
//! alternative replaces its caller's entry (repetitions are right
//! recursion, so they do not deepen a stack). What differs is that the
//! sets are interned: each distinct set (with a UTF-8 character cut
//! short) is a state with a number, its transitions are tabled as they
//! are first taken, and so is its mask of the vocabulary (see
//! `JsonObjectMode`). The cursor is thus a number, as cheap to copy as
//! the JSON cursors, and an answer's masks after the first few rows of
//! a repetitive grammar are table lookups.
//!
//! Bounds, so that a request cannot take the server's memory: a stack
//! holds at most [`MAX_GRAMMAR_DEPTH`] positions (nesting deeper than
//! that is not produced), a state at most 256 stacks (the rest, past
//! the first 256 in order, are dropped: the output stays in the
//! grammar), and one grammar at most 16 384 states; past them the output
//! goes no further where it would need a new one.
//! Characters are Unicode scalar values: a class never takes a
//! surrogate, and bytes that are not UTF-8 never pass.

use crate::json_mode::{ByteGrammar, MaskTable};
use crate::{ModelError, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// Most positions on one stack: how deep rules may nest.
pub const MAX_GRAMMAR_DEPTH: usize = 64;
/// Most stacks a state keeps.
const MAX_STACKS: usize = 256;
/// Most stacks one character's expansion may produce before the rest
/// are cut (an ambiguous grammar's alternatives multiply).
const MAX_EXPANDED: usize = 4 * MAX_STACKS;
/// Most states tabled for one grammar.
const MAX_STATES: usize = 1 << 14;
/// Most elements the rules expand to (repetitions `{m,n}` are copies).
const MAX_ELEMENTS: usize = 1 << 16;
/// Largest bound of a `{m,n}` repetition.
const MAX_REPEAT: u32 = 1000;
const MAX_CHAR: u32 = 0x10ffff;
const SURROGATES: (u32, u32) = (0xd800, 0xdfff);
const DEAD: u32 = u32::MAX;
const UNKNOWN: u32 = u32::MAX - 1;

/// One element of a rule's alternative, in the rules' flat array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    /// A character of class `sets[i]`.
    Chars(u32),
    Rule(u32),
    /// The alternative's end.
    End,
}

/// A parsed rule body: alternatives of sequences.
#[derive(Debug)]
enum Expr {
    Chars(Vec<(u32, u32)>),
    Ref { name: String, at: usize },
    Group(Vec<Vec<Expr>>),
    Repeat { item: Box<Expr>, min: u32, max: Option<u32> },
}

/// The rules, lowered to llama.cpp's flat form.
#[derive(Debug)]
struct Rules {
    elems: Vec<Elem>,
    /// Each class's ranges of characters, sorted, apart, no surrogates.
    sets: Vec<Vec<(u32, u32)>>,
    /// Each rule's alternatives: where they start in `elems`.
    alts: Vec<Vec<u32>>,
    root: u32,
}

/// A UTF-8 character cut short: its bits so far, the bytes still to
/// come, and its length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Utf8 {
    bits: u32,
    left: u8,
    len: u8,
}

/// Where the output may stand in the grammar between two bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Config {
    /// Sorted, distinct; an empty stack means the output may end.
    stacks: Vec<Vec<u32>>,
    utf8: Utf8,
}

/// The states met so far and their transitions.
#[derive(Default)]
struct Table {
    configs: Vec<Config>,
    ids: HashMap<Config, u32>,
    /// Each state's next state by byte ([`UNKNOWN`] until first taken),
    /// once a byte was fed to it.
    next: Vec<Option<Box<[u32; 256]>>>,
    /// Whether the output may end in each state.
    complete: Vec<bool>,
}

/// A compiled GBNF grammar and the states its outputs have met.
pub struct OutputGrammar {
    rules: Rules,
    source: String,
    table: Mutex<Table>,
    masks: MaskTable<u32>,
}

impl std::fmt::Debug for OutputGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutputGrammar({:?})", self.source)
    }
}

impl OutputGrammar {
    /// Compiles a GBNF grammar whose `root` rule the whole output
    /// follows. Errors name the line and column, or the rule.
    pub fn new(source: &str) -> Result<Self> {
        let rules = compile(source).map_err(ModelError::InvalidArgument)?;
        let grammar = OutputGrammar { rules, source: source.to_string(), table: Mutex::default(), masks: MaskTable::default() };
        let mut start = Vec::new();
        for &alt in &grammar.rules.alts[grammar.rules.root as usize] {
            grammar.rules.expand(vec![alt], &mut start);
        }
        let start = Config { stacks: tidy(start), utf8: Utf8::default() };
        if start.stacks.is_empty() {
            return Err(ModelError::InvalidArgument("no output follows `root` (it nests deeper than the limit everywhere)".into()));
        }
        grammar.table().intern(start);
        Ok(grammar)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn masks(&self) -> &MaskTable<u32> {
        &self.masks
    }

    pub(crate) fn start(&self) -> GrammarCursor<'_> {
        GrammarCursor { grammar: self, state: 0 }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while tabling leaves the table consistent: entries are
        // added whole.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state after byte `b` ([`DEAD`]: none), tabled.
    fn next(&self, table: &mut Table, state: u32, b: u8) -> u32 {
        let row = table.next[state as usize].get_or_insert_with(|| Box::new([UNKNOWN; 256]));
        if row[b as usize] != UNKNOWN {
            return row[b as usize];
        }
        let next = match self.rules.step(&table.configs[state as usize], b) {
            Some(config) => match table.ids.get(&config) {
                Some(&id) => id,
                None if table.configs.len() < MAX_STATES => table.intern(config),
                None => DEAD,
            },
            None => DEAD,
        };
        table.next[state as usize].as_mut().expect("made above")[b as usize] = next;
        next
    }
}

impl Table {
    fn intern(&mut self, config: Config) -> u32 {
        let id = self.configs.len() as u32;
        self.complete.push(config.utf8.left == 0 && config.stacks.first().is_some_and(Vec::is_empty));
        self.next.push(None);
        self.ids.insert(config.clone(), id);
        self.configs.push(config);
        id
    }
}

/// Sorted, distinct, at most [`MAX_STACKS`].
fn tidy(mut stacks: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
    stacks.sort_unstable();
    stacks.dedup();
    stacks.truncate(MAX_STACKS);
    stacks
}

impl Rules {
    fn set(&self, pos: u32) -> Option<&[(u32, u32)]> {
        match self.elems[pos as usize] {
            Elem::Chars(set) => Some(&self.sets[set as usize]),
            _ => None,
        }
    }

    /// Adds to `out` the stacks `stack` stands for once its top is a
    /// character class (or it is empty: the output may end), rules
    /// expanded into their alternatives.
    fn expand(&self, mut stack: Vec<u32>, out: &mut Vec<Vec<u32>>) {
        loop {
            if out.len() >= MAX_EXPANDED {
                return;
            }
            let Some(&pos) = stack.last() else {
                out.push(stack);
                return;
            };
            match self.elems[pos as usize] {
                Elem::End => {
                    stack.pop();
                }
                Elem::Chars(set) => {
                    // An empty class never lets the output on.
                    if !self.sets[set as usize].is_empty() {
                        out.push(stack);
                    }
                    return;
                }
                Elem::Rule(rule) => {
                    stack.pop();
                    if self.elems[pos as usize + 1] != Elem::End {
                        stack.push(pos + 1);
                    }
                    if stack.len() >= MAX_GRAMMAR_DEPTH {
                        return;
                    }
                    for &alt in &self.alts[rule as usize] {
                        let mut s = stack.clone();
                        s.push(alt);
                        self.expand(s, out);
                    }
                    return;
                }
            }
        }
    }

    /// The configuration after byte `b`, if the output can go on with it.
    fn step(&self, config: &Config, b: u8) -> Option<Config> {
        let u = config.utf8;
        let utf8 = if u.left == 0 {
            match b {
                0x00..=0x7f => Utf8 { bits: b as u32, left: 0, len: 1 },
                0xc2..=0xdf => Utf8 { bits: (b & 0x1f) as u32, left: 1, len: 2 },
                0xe0..=0xef => Utf8 { bits: (b & 0x0f) as u32, left: 2, len: 3 },
                0xf0..=0xf4 => Utf8 { bits: (b & 0x07) as u32, left: 3, len: 4 },
                _ => return None,
            }
        } else if b & 0xc0 == 0x80 {
            Utf8 { bits: u.bits << 6 | (b & 0x3f) as u32, left: u.left - 1, len: u.len }
        } else {
            return None;
        };
        // The characters this byte sequence can still become.
        let shift = 6 * utf8.left as u32;
        let shortest = [0, 0, 0x80, 0x800, 0x10000][utf8.len as usize];
        let lo = (utf8.bits << shift).max(shortest);
        let hi = (utf8.bits << shift | ((1 << shift) - 1)).min(MAX_CHAR);
        if lo > hi {
            return None;
        }
        let stacks = if utf8.left > 0 {
            let takes = |s: &&Vec<u32>| s.last().and_then(|&top| self.set(top)).is_some_and(|set| intersects(set, lo, hi));
            config.stacks.iter().filter(takes).cloned().collect()
        } else {
            let mut out = Vec::new();
            for stack in &config.stacks {
                let Some(&top) = stack.last() else { continue };
                if self.set(top).is_some_and(|set| intersects(set, lo, lo)) {
                    let mut s = stack.clone();
                    s.pop();
                    s.push(top + 1);
                    self.expand(s, &mut out);
                }
            }
            tidy(out)
        };
        (!stacks.is_empty()).then(|| Config { stacks, utf8: if utf8.left > 0 { utf8 } else { Utf8::default() } })
    }
}

/// Whether the sorted ranges `set` hold a character in `lo..=hi`.
fn intersects(set: &[(u32, u32)], lo: u32, hi: u32) -> bool {
    // The first range that ends at or after `lo`.
    let i = set.partition_point(|&(_, end)| end < lo);
    set.get(i).is_some_and(|&(start, _)| start <= hi)
}

/// Where the output stands in an [`OutputGrammar`]: a tabled state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GrammarCursor<'a> {
    grammar: &'a OutputGrammar,
    state: u32,
}

impl GrammarCursor<'_> {
    pub(crate) fn mask_key(&self) -> u32 {
        self.state
    }
}

impl ByteGrammar for GrammarCursor<'_> {
    fn feed(&mut self, b: u8) -> bool {
        self.feed_all(&[b])
    }

    /// Under one lock: the mask feeds every token's bytes.
    fn feed_all(&mut self, bytes: &[u8]) -> bool {
        let mut table = self.grammar.table();
        for &b in bytes {
            match self.grammar.next(&mut table, self.state, b) {
                DEAD => return false,
                next => self.state = next,
            }
        }
        true
    }

    fn complete(&self) -> bool {
        self.grammar.table().complete[self.state as usize]
    }

    fn plain_text_room(&self) -> Option<u32> {
        None
    }
}

// ---------------------------------------------------------------------
// Parsing and lowering.

fn compile(source: &str) -> std::result::Result<Rules, String> {
    let parsed = Parser { text: source.chars().collect(), pos: 0, nested: 0 }.grammar()?;
    let mut lower = Lower { ids: HashMap::new(), names: Vec::new(), bodies: Vec::new(), sets: Vec::new(), set_ids: HashMap::new(), elems: 0 };
    for (name, at, _) in &parsed {
        if lower.ids.insert(name.clone(), lower.names.len() as u32).is_some() {
            return Err(format!("{}: rule `{name}` is defined twice", place(source, *at)));
        }
        lower.names.push(name.clone());
        lower.bodies.push(Vec::new());
    }
    let root = *lower.ids.get("root").ok_or("no rule `root`: the output follows it")?;
    for (i, (_, _, alts)) in parsed.iter().enumerate() {
        let body = alts.iter().map(|seq| lower.seq(seq, i as u32, source)).collect::<std::result::Result<_, _>>()?;
        lower.bodies[i] = body;
    }
    lower.check_left_recursion()?;
    let mut elems = Vec::new();
    let alts = lower
        .bodies
        .iter()
        .map(|body| {
            body.iter()
                .map(|seq| {
                    let start = elems.len() as u32;
                    elems.extend_from_slice(seq);
                    elems.push(Elem::End);
                    start
                })
                .collect()
        })
        .collect();
    Ok(Rules { elems, sets: lower.sets, alts, root })
}

/// "line L, column C" of char index `at`.
fn place(source: &str, at: usize) -> String {
    let before: Vec<char> = source.chars().take(at).collect();
    let line = before.iter().filter(|&&c| c == '\n').count() + 1;
    let column = before.iter().rev().take_while(|&&c| c != '\n').count() + 1;
    format!("line {line}, column {column}")
}

struct Parser {
    text: Vec<char>,
    pos: usize,
    /// Open parentheses: inside them a line break is space.
    nested: usize,
}

type ParsedRule = (String, usize, Vec<Vec<Expr>>);

impl Parser {
    fn peek(&self) -> Option<char> {
        self.text.get(self.pos).copied()
    }

    fn error(&self, what: impl std::fmt::Display) -> String {
        let source: String = self.text.iter().collect();
        format!("{}: {what}", place(&source, self.pos))
    }

    /// Skips spaces, tabs and comments, and line breaks if `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.text[start..self.pos].iter().collect())
    }

    fn grammar(mut self) -> std::result::Result<Vec<ParsedRule>, String> {
        let mut rules = Vec::new();
        loop {
            self.space(true);
            if self.peek().is_none() {
                return Ok(rules);
            }
            let at = self.pos;
            let name = self.name().ok_or_else(|| self.error("expected a rule name"))?;
            self.space(false);
            if !self.text[self.pos..].starts_with(&[':', ':', '=']) {
                return Err(self.error(format!("expected `::=` after `{name}`")));
            }
            self.pos += 3;
            self.space(true);
            let alts = self.alternatives()?;
            rules.push((name, at, alts));
            self.space(false);
            if !matches!(self.peek(), None | Some('\n' | '\r')) {
                return Err(self.error("expected a line break after the rule"));
            }
        }
    }

    fn alternatives(&mut self) -> std::result::Result<Vec<Vec<Expr>>, String> {
        let mut alts = vec![self.sequence()?];
        loop {
            // A rule goes on on the next line that starts with `|`.
            let back = self.pos;
            self.space(true);
            if self.peek() != Some('|') {
                self.pos = back;
                return Ok(alts);
            }
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence()?);
        }
    }

    fn sequence(&mut self) -> std::result::Result<Vec<Expr>, String> {
        let mut seq = Vec::new();
        loop {
            self.space(self.nested > 0);
            let at = self.pos;
            let item = match self.peek() {
                Some('"') => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    loop {
                        match self.peek() {
                            None | Some('\n') => return Err(self.error("unterminated literal")),
                            Some('"') => break,
                            Some(_) => chars.push(self.char_in(false)?),
                        }
                    }
                    self.pos += 1;
                    Expr::Group(vec![chars.into_iter().map(|c| Expr::Chars(vec![(c, c)])).collect()])
                }
                Some('[') => self.class()?,
                Some('.') => {
                    self.pos += 1;
                    Expr::Chars(normalize(vec![(0, MAX_CHAR)], false))
                }
                Some('(') => {
                    self.pos += 1;
                    self.nested += 1;
                    self.space(true);
                    let alts = self.alternatives()?;
                    self.space(true);
                    if self.peek() != Some(')') {
                        return Err(self.error("expected `)`"));
                    }
                    self.pos += 1;
                    self.nested -= 1;
                    Expr::Group(alts)
                }
                Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                    let name = self.name().expect("a name character");
                    // The next rule's head, on the same line: a missing line break.
                    let back = self.pos;
                    self.space(false);
                    if self.text[self.pos..].starts_with(&[':', ':', '=']) {
                        self.pos = at;
                        return Err(self.error(format!("rule `{name}` starts before the line breaks")));
                    }
                    self.pos = back;
                    Expr::Ref { name, at }
                }
                _ => return Ok(seq),
            };
            seq.push(self.repetitions(item)?);
        }
    }

    /// `item` with the repetitions written after it.
    fn repetitions(&mut self, mut item: Expr) -> std::result::Result<Expr, String> {
        loop {
            let (min, max) = match self.peek() {
                Some('*') => (0, None),
                Some('+') => (1, None),
                Some('?') => (0, Some(1)),
                Some('{') => self.bounds()?,
                _ => return Ok(item),
            };
            // The symbol, or the bounds' `}`.
            self.pos += 1;
            item = Expr::Repeat { item: Box::new(item), min, max };
        }
    }

    /// `{m}`, `{m,}`, `{m,n}` or `{,n}`, read up to its `}` (left unread).
    fn bounds(&mut self) -> std::result::Result<(u32, Option<u32>), String> {
        self.pos += 1;
        let number = |p: &mut Parser| -> std::result::Result<Option<u32>, String> {
            p.space(false);
            let start = p.pos;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
            let digits: String = p.text[start..p.pos].iter().collect();
            p.space(false);
            if digits.is_empty() {
                return Ok(None);
            }
            match digits.parse::<u32>() {
                Ok(n) if n <= MAX_REPEAT => Ok(Some(n)),
                _ => Err(p.error(format!("a repetition's bound is at most {MAX_REPEAT}"))),
            }
        };
        let min = number(self)?;
        let max = if self.peek() == Some(',') {
            self.pos += 1;
            number(self)?
        } else {
            Some(min.ok_or_else(|| self.error("expected a number in `{}`"))?)
        };
        if self.peek() != Some('}') {
            return Err(self.error("expected `}`"));
        }
        let min = min.unwrap_or(0);
        if max.is_some_and(|max| max < min) {
            return Err(self.error("a repetition's maximum is below its minimum"));
        }
        Ok((min, max))
    }

    /// `[…]`, the `[` not yet read.
    fn class(&mut self) -> std::result::Result<Expr, String> {
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated character class")),
                Some(']') => break,
                Some(_) => {
                    let lo = self.char_in(true)?;
                    let hi = if self.peek() == Some('-') && self.text.get(self.pos + 1).is_some_and(|&c| c != ']') {
                        self.pos += 1;
                        self.char_in(true)?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(self.error("a range's end is before its start"));
                    }
                    ranges.push((lo, hi));
                }
            }
        }
        self.pos += 1;
        Ok(Expr::Chars(normalize(ranges, negated)))
    }

    /// One character of a literal or a class, escapes read.
    fn char_in(&mut self, class: bool) -> std::result::Result<u32, String> {
        let c = self.peek().ok_or_else(|| self.error("unexpected end"))?;
        self.pos += 1;
        if c != '\\' {
            return Ok(c as u32);
        }
        let e = self.peek().ok_or_else(|| self.error("unexpected end after `\\`"))?;
        self.pos += 1;
        let hex = |p: &mut Parser, n: usize| {
            let digits: String = p.text.get(p.pos..p.pos + n).map(|d| d.iter().collect()).unwrap_or_default();
            let v = u32::from_str_radix(&digits, 16).ok().filter(|_| digits.len() == n).ok_or_else(|| p.error(format!("expected {n} hex digits")))?;
            p.pos += n;
            char::from_u32(v).map(|c| c as u32).ok_or_else(|| p.error(format!("U+{v:X} is not a character")))
        };
        Ok(match e {
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            'n' => '\n' as u32,
            'r' => '\r' as u32,
            't' => '\t' as u32,
            '0' => 0,
            '\\' | '"' | '\'' | '[' | ']' | '/' => e as u32,
            '-' | '^' if class => e as u32,
            _ => {
                self.pos -= 2;
                return Err(self.error(format!("unknown escape `\\{e}`")));
            }
        })
    }
}

/// Sorted, merged ranges without surrogates; the complement if `negated`.
fn normalize(mut ranges: Vec<(u32, u32)>, negated: bool) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::new();
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    if negated {
        let mut next = 0;
        let mut complement = Vec::new();
        for (lo, hi) in merged {
            if lo > next {
                complement.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= MAX_CHAR {
            complement.push((next, MAX_CHAR));
        }
        merged = complement;
    }
    merged
        .into_iter()
        .flat_map(|(lo, hi)| {
            let (s0, s1) = SURROGATES;
            [(lo, hi.min(s0 - 1)), (lo.max(s1 + 1), hi)]
        })
        .filter(|(lo, hi)| lo <= hi)
        .collect()
}

/// Lowering parsed rules to elements, with a rule for each group of
/// several alternatives and each unbounded or optional repetition.
struct Lower {
    ids: HashMap<String, u32>,
    /// Each rule's name; a made rule bears the name of the rule it was
    /// made for.
    names: Vec<String>,
    bodies: Vec<Vec<Vec<Elem>>>,
    sets: Vec<Vec<(u32, u32)>>,
    set_ids: HashMap<Vec<(u32, u32)>, u32>,
    elems: usize,
}

impl Lower {
    fn made_rule(&mut self, owner: u32, body: Vec<Vec<Elem>>) -> std::result::Result<u32, String> {
        self.elems += body.iter().map(|alt| alt.len() + 1).sum::<usize>();
        if self.elems > MAX_ELEMENTS {
            return Err(format!("the grammar expands to more than {MAX_ELEMENTS} elements (its repetitions are copies)"));
        }
        self.names.push(self.names[owner as usize].clone());
        self.bodies.push(body);
        Ok(self.bodies.len() as u32 - 1)
    }

    fn seq(&mut self, seq: &[Expr], owner: u32, source: &str) -> std::result::Result<Vec<Elem>, String> {
        let mut out = Vec::new();
        for expr in seq {
            match expr {
                Expr::Chars(set) => {
                    let next = self.sets.len() as u32;
                    let id = *self.set_ids.entry(set.clone()).or_insert(next);
                    if id == next {
                        self.sets.push(set.clone());
                    }
                    out.push(Elem::Chars(id));
                }
                Expr::Ref { name, at } => {
                    let id = *self.ids.get(name).ok_or_else(|| format!("{}: rule `{name}` is not defined", place(source, *at)))?;
                    out.push(Elem::Rule(id));
                }
                Expr::Group(alts) if alts.len() == 1 => out.extend(self.seq(&alts[0], owner, source)?),
                Expr::Group(alts) => {
                    let body = alts.iter().map(|a| self.seq(a, owner, source)).collect::<std::result::Result<_, _>>()?;
                    out.push(Elem::Rule(self.made_rule(owner, body)?));
                }
                Expr::Repeat { item, min, max } => {
                    let one = self.seq(std::slice::from_ref(item), owner, source)?;
                    self.elems += one.len() * *min as usize;
                    if self.elems > MAX_ELEMENTS {
                        return Err(format!("the grammar expands to more than {MAX_ELEMENTS} elements (its repetitions are copies)"));
                    }
                    for _ in 0..*min {
                        out.extend_from_slice(&one);
                    }
                    match max {
                        // item*: r ::= item r | (nothing)
                        None => {
                            let r = self.made_rule(owner, Vec::new())?;
                            self.bodies[r as usize] = vec![[one.as_slice(), &[Elem::Rule(r)]].concat(), Vec::new()];
                            self.elems += one.len() + 2;
                            out.push(Elem::Rule(r));
                        }
                        // Up to max − min more: r_k ::= item r_(k−1) | (nothing).
                        Some(max) => {
                            let mut inner: Option<u32> = None;
                            for _ in *min..*max {
                                let mut alt = one.clone();
                                alt.extend(inner.map(Elem::Rule));
                                inner = Some(self.made_rule(owner, vec![alt, Vec::new()])?);
                            }
                            out.extend(inner.map(Elem::Rule));
                        }
                    }
                }
            }
        }
        self.elems += out.len() + 1;
        if self.elems > MAX_ELEMENTS {
            return Err(format!("the grammar expands to more than {MAX_ELEMENTS} elements (its repetitions are copies)"));
        }
        Ok(out)
    }

    /// Refuses a rule that can reach itself before reading a character:
    /// expanding it would never end.
    fn check_left_recursion(&self) -> std::result::Result<(), String> {
        let n = self.bodies.len();
        let mut nullable = vec![false; n];
        loop {
            let mut changed = false;
            for r in 0..n {
                let empty = |alt: &Vec<Elem>| alt.iter().all(|e| matches!(e, Elem::Rule(q) if nullable[*q as usize]));
                if !nullable[r] && self.bodies[r].iter().any(empty) {
                    nullable[r] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // The rules each can start with.
        let firsts: Vec<Vec<u32>> = self
            .bodies
            .iter()
            .map(|body| {
                let mut out = Vec::new();
                for alt in body {
                    for e in alt {
                        match e {
                            Elem::Rule(q) => {
                                out.push(*q);
                                if !nullable[*q as usize] {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
                out
            })
            .collect();
        // Depth-first search for a cycle: 0 unseen, 1 on the path, 2 done.
        let mut mark = vec![0u8; n];
        fn visit(r: usize, firsts: &[Vec<u32>], mark: &mut [u8]) -> Option<usize> {
            mark[r] = 1;
            for &q in &firsts[r] {
                match mark[q as usize] {
                    1 => return Some(q as usize),
                    0 => {
                        if let Some(c) = visit(q as usize, firsts, mark) {
                            return Some(c);
                        }
                    }
                    _ => {}
                }
            }
            mark[r] = 2;
            None
        }
        for r in 0..n {
            if mark[r] == 0 {
                if let Some(c) = visit(r, &firsts, &mut mark) {
                    return Err(format!(
                        "rule `{}` is left-recursive: it can reach itself before reading a character (a repetition of something that can be empty does too)",
                        self.names[c]
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn fed<'a>(grammar: &'a OutputGrammar, text: &str) -> Option<GrammarCursor<'a>> {
        let mut c = grammar.start();
        c.feed_all(text.as_bytes()).then_some(c)
    }

    fn assert_language(source: &str, sentences: &[&str], refused: &[&str]) {
        let g = OutputGrammar::new(source).unwrap();
        for text in sentences {
            assert!(fed(&g, text).is_some_and(|c| c.complete()), "{text:?} in {source:?}");
            for cut in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert!(fed(&g, &text[..cut]).is_some(), "{:?} of {text:?} in {source:?}", &text[..cut]);
            }
        }
        for text in refused {
            assert!(!fed(&g, text).is_some_and(|c| c.complete()), "{text:?} taken by {source:?}");
        }
    }

    #[test]
    fn sentences_of_grammars_and_only_those() {
        assert_language(r#"root ::= "yes" | "no""#, &["yes", "no"], &["", "ye", "yesno", "No"]);
        // Nesting, through a rule used inside itself.
        let arithmetic = r#"
# Sums and products of digits, with parentheses.
root ::= expr
expr ::= term ("+" term)*
term ::= factor ("*" factor)*
factor ::= [0-9]+ | "(" expr ")"
"#;
        assert_language(arithmetic, &["1", "12+3*4", "(1+2)*((3))", "((((((9))))))"], &["", "1+", "(1", "1)", "+1", "(1+2"]);
        assert!(fed(&OutputGrammar::new(arithmetic).unwrap(), "1)").is_none(), "a dead end is never entered");
        // Repetition bounds, classes, negation, `.`, escapes, comments, alternatives over lines.
        assert_language(
            r#"root ::= [a-c]{2,3} "-" x{2} "-" y? "-" [^"\\\n]* "-" . "-" "\x41\u00e9\n" z{,2}   # a comment
x ::= [0-9]
y ::= "a"
  | "b" # continued
z ::= ("q" | "r") [\]\-]"#,
            &["ab-12---é-Aé\n", "abc-34-a-x'y-日-Aé\nq]r-", "ac-00-b-\t-\u{10ffff}-Aé\n"],
            &["a-12---é-Aé\n", "abcd-12---é-Aé\n", "ab-1---é-Aé\n", "ab-12-c--é-Aé\n", "ab-12--\"-é-Aé\n", "ab-12---é-Aé\nq]r]q]"],
        );
        // JSON in the style of llama.cpp's grammar files: empty alternatives,
        // bodies over several lines, escapes in classes, comments.
        let json = r#"
root ::= value
value ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
    string ":" ws value     # the first member
    ("," ws string ":" ws value)*
  )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
  )* "\"" ws
number ::= "-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;
        assert_language(
            json,
            &[r#"{"a": [1, -2.5e3, "x\n\u00e9"], "b": {}}"#, "[]", "true ", "\"é日\"", "{\n  \"k\": null\n}"],
            &["{", "[1,]", "01", r#""\x""#, r#"{"a" 1}"#, "\"\u{1}\""],
        );
        // UTF-8 is read as characters: a class of one takes its bytes, no other.
        let g = OutputGrammar::new("root ::= [é日]+").unwrap();
        let mut c = g.start();
        assert!(c.feed(0xc3) && !{ c }.feed(0xaa) && c.feed(0xa9) && c.complete());
        assert!(!{ c }.feed(0xff) && !{ c }.feed(0x80) && !{ g.start() }.feed(0xed), "not UTF-8, or no character of the class");
        assert_language("root ::= [^ac]", &["b", "é", "\u{10ffff}"], &["a", "c", "bb"]);
        // An empty root, and a root that may be empty or go on.
        assert_language("root ::= \"\"", &[""], &["a"]);
        assert_language("root ::= \"a\"*", &["", "a", "aaaa"], &["b"]);
    }

    #[test]
    fn nesting_past_the_limit_is_not_produced() {
        let g = OutputGrammar::new(r#"root ::= "(" root ")" | "x""#).unwrap();
        let deep = |n: usize| format!("{}x{}", "(".repeat(n), ")".repeat(n));
        assert!(fed(&g, &deep(MAX_GRAMMAR_DEPTH - 2)).is_some_and(|c| c.complete()));
        let deeper = "(".repeat(MAX_GRAMMAR_DEPTH + 1);
        assert!(fed(&g, &deeper).is_none());
    }

    #[test]
    fn bad_grammars_are_refused_with_where_and_why() {
        for (source, why) in [
            ("root ::= \"a", "line 1, column 12: unterminated literal"),
            ("root ::= a", "line 1, column 10: rule `a` is not defined"),
            ("expr ::= \"a\"", "no rule `root`"),
            ("root ::= \"a\"\nroot ::= \"b\"", "line 2, column 1: rule `root` is defined twice"),
            ("root ::= root \"a\" | \"b\"", "rule `root` is left-recursive"),
            ("root ::= x \"a\"\nx ::= \"\" | root", "left-recursive"),
            ("root ::= (\"a\"?)*", "left-recursive"),
            ("root ::= [b-a]", "line 1, column 14: a range's end is before its start"),
            ("root ::= \"a\"{3,2}", "line 1, column 17: a repetition's maximum is below its minimum"),
            ("root ::= \"a\"{2000}", "at most 1000"),
            ("root ::= \"\\q\"", "line 1, column 11: unknown escape `\\q`"),
            ("root ::= (\"a\" | \"b\"", "expected `)`"),
            ("root ::= \"a\" x ::= \"b\"", "line 1, column 14: rule `x` starts before the line breaks"),
            ("root = \"a\"", "line 1, column 6: expected `::=` after `root`"),
            ("root ::= [a-z]{1000}{1000}", "more than 65536 elements"),
            ("root ::= \"\\uD800\"", "U+D800 is not a character"),
        ] {
            let err = OutputGrammar::new(source).unwrap_err().to_string();
            assert!(err.contains(why), "{source:?}: {err}");
        }
    }

    #[test]
    fn the_mask_is_every_tokens_bytes_tried() {
        use crate::json_mode::tests::{assert_mask_is_every_tokens_bytes_tried, default_tokenizer};
        use crate::JsonObjectMode;
        let grammar = Arc::new(
            OutputGrammar::new(
                r#"root ::= "{" ws pair ("," ws pair)* ws "}"
pair ::= "\"" [a-z]+ "\":" ws (num | "\"" [^"\\]* "\"")
num ::= "-"? [0-9]+
ws ::= [ \n]{0,2}"#,
            )
            .unwrap(),
        );
        let mode = JsonObjectMode::new(default_tokenizer()).with_grammar(grammar.clone());
        let texts = ["{ \"ab\": -12, \"c\":\"Fé日 x\"}", "{\n\"a\": \"é", "{ \"xyz\": 7"];
        assert_mask_is_every_tokens_bytes_tried(&mode, grammar.start(), &texts);
        assert!(grammar.masks.len() > 10);
    }
}
