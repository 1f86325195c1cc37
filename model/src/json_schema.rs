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
//! - `enum` and `const` (JSON values, written as `serde_json` writes them);
//! - `anyOf` whose branches start differently: at most one object branch
//!   and one array branch, and an enum or const value that starts like
//!   another branch's values only where that branch admits it anyway (a
//!   string among free strings); `allOf` of one schema (Pydantic's
//!   wrapper of a described `$ref`), and `$ref` to `#/$defs/…` or
//!   `#/definitions/…`, inlined (a recursive schema is refused at the
//!   nesting limit);
//! - annotations (`title`, `description`, `default`, `examples`, …) are
//!   ignored.
//!
//! Keys and enum strings are produced as `serde_json` escapes them; free
//! strings and numbers follow JSON's grammar, whitespace JSON mode's rule.
//! No state is a dead end: every state the cursor reaches lets some byte
//! through until the object is complete.

use crate::json_mode::{string_step, whitespace_step, ByteGrammar, JsonState, Num, StrStep};
use crate::{ModelError, Result};
use serde_json::{Map, Value};

/// Deepest nesting of constrained objects and arrays.
pub const MAX_SCHEMA_DEPTH: usize = 16;
/// Most properties of one object, and most enum values of one node (a bit
/// each in the cursor).
const MAX_CHOICES: usize = 64;
const ANNOTATIONS: [&str; 10] = ["title", "description", "default", "examples", "$comment", "$schema", "$id", "$defs", "definitions", "strict"];
const SUPPORTED: &str = "type, properties, required, additionalProperties, items, minItems, maxItems, enum, const, anyOf, allOf of one schema, $ref";

/// A compiled schema.
#[derive(Debug)]
pub struct JsonSchema {
    nodes: Vec<Node>,
    root: u16,
    /// The schema as compact JSON text (what travels on the wire).
    source: String,
}

/// The values one (sub)schema admits, by how they start.
#[derive(Debug, Default)]
struct Node {
    /// Any JSON value.
    any: bool,
    /// Any string.
    string: bool,
    /// Any number, or only integers.
    number: bool,
    integer: bool,
    object: Option<ObjectShape>,
    array: Option<ArrayShape>,
    /// Whole values as JSON text: enum and const values, `true` and
    /// `false` for booleans, `null`.
    literals: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct ObjectShape {
    /// Any object (no properties named).
    free: bool,
    /// Each property's name as a JSON string, quotes included.
    keys: Vec<Vec<u8>>,
    values: Vec<u16>,
    /// A bit per property that must be present.
    required: u64,
}

#[derive(Debug)]
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
        let mut compiler = Compiler { root: schema, nodes: Vec::new(), refs: 0 };
        let root = compiler.node(schema, "schema", 0).map_err(ModelError::InvalidArgument)?;
        let nodes = compiler.nodes;
        let r = &nodes[root as usize];
        if r.any || r.string || r.number || r.integer || r.array.is_some() || !r.literals.is_empty() || r.object.is_none() {
            return Err(ModelError::InvalidArgument("the schema must describe an object (`\"type\": \"object\"`), as JSON mode answers with one".into()));
        }
        Ok(JsonSchema { nodes, root, source: schema.to_string() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Before the answer's first byte.
    pub(crate) fn start(&self) -> SchemaCursor<'_> {
        SchemaCursor { schema: self, frames: [Frame::default(); MAX_SCHEMA_DEPTH], depth: 0, cur: Cur::Value(self.root), ws: 0 }
    }
}

struct Compiler<'a> {
    /// For `$ref`s.
    root: &'a Value,
    nodes: Vec<Node>,
    /// `$ref`s being inlined, one inside another.
    refs: usize,
}

impl Compiler<'_> {
    /// Compiles `schema` (at `path`, inside `depth` constrained
    /// containers) and returns its node.
    fn node(&mut self, schema: &Value, path: &str, depth: usize) -> Result<u16, String> {
        let mut node = self.build(schema, path, depth)?;
        // The cursor takes a value's first byte as a literal's if one starts
        // with it, so a literal may not start like a kind's other values:
        // those a kind admits anyway go, the others are refused.
        let literals = std::mem::take(&mut node.literals);
        for literal in literals {
            let integral = !literal.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
            let (covered, clash) = match literal[0] {
                _ if node.any => (true, false),
                b'"' => (node.string, false),
                b'-' | b'0'..=b'9' => (node.number || node.integer && integral, node.integer),
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
        if !(node.any || node.string || node.number || node.integer || node.object.is_some() || node.array.is_some() || !node.literals.is_empty()) {
            return Err(format!("no value satisfies `{path}`"));
        }
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
        const KEYWORDS: [&str; 12] =
            ["type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const", "anyOf", "allOf", "$ref"];
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
        if let Some(branches) = map.get("anyOf") {
            if constraints.len() > 1 {
                return Err(format!("`{path}.anyOf` beside other keywords is not supported"));
            }
            let branches = branches.as_array().filter(|b| !b.is_empty()).ok_or_else(|| format!("`{path}.anyOf` must be a non-empty array of schemas"))?;
            let mut node = Node::default();
            for (i, branch) in branches.iter().enumerate() {
                let branch = self.build(branch, &format!("{path}.anyOf[{i}]"), depth)?;
                merge(&mut node, branch, path)?;
            }
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
            None => return Ok(Node { any: true, ..Node::default() }),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => {
                ts.iter().map(|t| t.as_str().ok_or_else(|| format!("`{path}.type` must list type names"))).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(format!("`{path}.type` must be a type name or a non-empty list of them")),
        };
        let mut node = Node::default();
        for t in types {
            let one = match t {
                "object" => Node { object: Some(self.object(map, path, depth)?), ..Node::default() },
                "array" => Node { array: Some(self.array(map, path, depth)?), ..Node::default() },
                "string" => Node { string: true, ..Node::default() },
                "number" => Node { number: true, ..Node::default() },
                "integer" => Node { integer: true, ..Node::default() },
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
        if self.refs == MAX_SCHEMA_DEPTH {
            return Err(format!("`{path}.$ref`: references nest deeper than {MAX_SCHEMA_DEPTH} (a recursive schema?)"));
        }
        self.refs += 1;
        let node = self.build(resolved, path, depth);
        self.refs -= 1;
        node
    }

    fn object(&mut self, map: &Map<String, Value>, path: &str, depth: usize) -> Result<ObjectShape, String> {
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
            return Ok(ObjectShape { free, keys: vec![], values: vec![], required: 0 });
        };
        if properties.len() > MAX_CHOICES {
            return Err(format!("`{path}.properties` lists {} properties; at most {MAX_CHOICES}", properties.len()));
        }
        if depth == MAX_SCHEMA_DEPTH {
            return Err(format!("`{path}`: objects and arrays nest deeper than {MAX_SCHEMA_DEPTH}"));
        }
        let mut shape = ObjectShape { free: false, keys: vec![], values: vec![], required: 0 };
        for (name, schema) in properties {
            shape.keys.push(Value::String(name.clone()).to_string().into_bytes());
            shape.values.push(self.node(schema, &format!("{path}.properties.{name}"), depth + 1)?);
        }
        for name in required {
            let i = properties
                .keys()
                .position(|k| k == name)
                .ok_or_else(|| format!("`{path}.required` names `{name}`, which `{path}.properties` does not describe"))?;
            shape.required |= 1 << i;
        }
        Ok(shape)
    }

    fn array(&mut self, map: &Map<String, Value>, path: &str, depth: usize) -> Result<ArrayShape, String> {
        if depth == MAX_SCHEMA_DEPTH {
            return Err(format!("`{path}`: objects and arrays nest deeper than {MAX_SCHEMA_DEPTH}"));
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
        Ok(ArrayShape { items, min, max })
    }
}

/// Adds `branch`'s values to `node`'s (a type list, `anyOf`).
fn merge(node: &mut Node, branch: Node, path: &str) -> Result<(), String> {
    if node.object.is_some() && branch.object.is_some() || node.array.is_some() && branch.array.is_some() {
        return Err(format!("`{path}`: at most one object and one array alternative are supported"));
    }
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Frame {
    node: u16,
    object: bool,
    /// An object's properties present so far (a bit each); an array's
    /// items begun.
    bits: u64,
}

/// Where the cursor stands between two bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    Num {
        num: Num,
        integer: bool,
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
            b'"' if node.string => Cur::Str { escape: 0, utf8: 0 },
            b'-' | b'0'..=b'9' if node.number || node.integer => Cur::Num { num: Num::first(b).expect("a number's first byte"), integer: !node.number },
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
                if !bits(cands).any(|i| literals[i].len() == at as usize) {
                    return false;
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

    fn in_plain_string(&self) -> bool {
        match self.cur {
            Cur::Str { escape: 0, utf8: 0 } => true,
            Cur::Any(inner) => inner.in_plain_string(),
            _ => false,
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
            (r#"{"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}"#, "`schema.properties.a.pattern` is not supported"),
            (r#"{"type":"array"}"#, "must describe an object"),
            (r#"{"type":"object","required":["a"]}"#, "`schema.required` names `a`"),
            (r#"{"type":"object","properties":{"a":{"type":"decimal"}}}"#, "`decimal` is not a JSON Schema type"),
            (r#"{"type":"object","properties":{"a":{"type":"array","minItems":3,"maxItems":2}}}"#, "`schema.properties.a`: `minItems` 3 exceeds `maxItems` 2"),
            (r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/Missing"}}}"##, "`#/$defs/Missing` is not a schema"),
            (r##"{"$defs":{"N":{"type":"object","properties":{"next":{"$ref":"#/$defs/N"}}}},"$ref":"#/$defs/N"}"##, "deeper than 16"),
            (r#"{"type":"object","properties":{"a":false}}"#, "`schema.properties.a` is `false`"),
            (r#"{"type":"object","properties":{"a":{"anyOf":[{"type":"object"},{"type":"object"}]}}}"#, "at most one object"),
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
        let alphabet: Vec<u8> = b"{}[]\",: \n-.0123456789trufalsnxyz\\".to_vec();
        for source in [
            PERSON,
            r#"{"type":"object"}"#,
            r#"{"type":"object","properties":{"a":{"type":"array","items":{"type":["integer","null"]},"maxItems":2}},"required":["a"]}"#,
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
            Value::Array(a) => {
                let count = |key: &str, default: u64| m.get(key).and_then(Value::as_u64).unwrap_or(default);
                (count("minItems", 0)..=count("maxItems", u64::MAX)).contains(&(a.len() as u64))
                    && a.iter().all(|x| m.get("items").is_none_or(|i| satisfies(i, root, x)))
            }
            _ => true,
        }
    }
}
