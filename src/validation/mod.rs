//! Message validation for routes with `[routes.validate]` (DESIGN.md section 11): a
//! [`Validator`] per route, built once when the runtime is loaded (the schema file read
//! and compiled then), and used by the relay on every whole client text message.
//!
//! A message is checked in three steps, cheapest first:
//! 1. a depth pre-scan over the bytes ([`exceeds_depth`]): linear, no recursion, strings
//!    and their escapes skipped, so a nesting bomb is refused before any parser recurses;
//! 2. parsing into a `serde_json::Value`, refusing duplicate object keys (an upstream
//!    that keeps the first of two keys would otherwise see a value the schema never
//!    checked) and numbers out of range (`1e999999`);
//! 3. the JSON Schema, compiled offline: a `$ref` to a remote document is a load error,
//!    never a fetch, and `pattern` uses the linear-time `regex` engine.
//!
//! What a refusal reports ([`Invalid`]) names the reason, the JSON pointer and the
//! keyword, never a value from the message.

use crate::config::{ConfigError, OnInvalid, Validate};
use crate::error::MessageRejection;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::{borrow::Cow, fmt};

/// Longest JSON pointer reported or logged (pointers may hold the client's key names).
const MAX_POINTER: usize = 128;
/// Largest schema file read.
const MAX_SCHEMA_FILE: u64 = 1 << 20;
/// The error [`Strict`] raises for a repeated key; told apart from syntax errors by it.
const DUPLICATE_KEY: &str = "duplicate key";

/// The checks of one route.
pub struct Validator {
    /// The route's name, for the log event.
    pub route: String,
    json: bool,
    binary: bool,
    max_depth: u32,
    on_invalid: OnInvalid,
    schema: Option<jsonschema::Validator>,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validator")
            .field("route", &self.route)
            .field("json", &self.json)
            .field("binary", &self.binary)
            .field("max_depth", &self.max_depth)
            .field("on_invalid", &self.on_invalid)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

/// Why a message was refused, and where: never the message or a value from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: MessageRejection,
    /// JSON pointer of the failing value (`""` is the whole message); empty when the
    /// message did not parse.
    pub pointer: String,
    /// The failing schema keyword, or `json`, `max_depth`, `duplicate_key`, `binary`.
    pub keyword: Cow<'static, str>,
    /// For text that is not JSON: the parser's position ("line 1 column 7").
    pub position: Option<(usize, usize)>,
}

impl Invalid {
    fn new(reason: MessageRejection, keyword: &'static str) -> Invalid {
        Invalid {
            reason,
            pointer: String::new(),
            keyword: Cow::Borrowed(keyword),
            position: None,
        }
    }

    /// A binary message on a route that refuses them.
    pub fn binary() -> Invalid {
        Invalid::new(MessageRejection::Binary, "binary")
    }

    /// One line for the client, naming what failed and where.
    pub fn detail(&self) -> String {
        match (self.reason, self.position) {
            (MessageRejection::NotJson, Some((line, column))) if self.keyword == "duplicate_key" => {
                format!("duplicate object key at line {line} column {column}")
            }
            (MessageRejection::NotJson, Some((line, column))) => format!("not valid JSON at line {line} column {column}"),
            (MessageRejection::NotJson, None) if self.keyword == "number" => {
                "a number that cannot be checked exactly (over 15 significant digits, or out of the 64-bit integer range)".to_string()
            }
            (MessageRejection::NotJson, None) => "not valid JSON".to_string(),
            (MessageRejection::TooDeep, _) => "nested deeper than max_depth".to_string(),
            (MessageRejection::Binary, _) => "binary messages are not allowed".to_string(),
            (MessageRejection::Schema, _) => format!("{} failed at \"{}\"", self.keyword, self.pointer),
        }
    }

    /// The error message sent back with `on_invalid = "reply"`.
    pub fn reply(&self) -> Vec<u8> {
        serde_json::json!({
            "error": "invalid_message",
            "reason": self.reason.label(),
            "detail": self.detail(),
            "pointer": self.pointer,
            "keyword": self.keyword,
        })
        .to_string()
        .into_bytes()
    }
}

impl Validator {
    /// Build the checks of route `route` from its `[routes.validate]`; reads and compiles
    /// the schema file. Errors name the file and the config key and line.
    pub fn load(route: &str, v: &Validate, origin: &str) -> Result<Validator, ConfigError> {
        let schema = match &v.schema_file {
            None => None,
            Some(file) => {
                let text = crate::fsutil::read_limited(&file.value, MAX_SCHEMA_FILE)
                    .map_err(|e| file.error(origin, format!("{}: {e}", file.value.display())))?;
                let doc: Value =
                    serde_json::from_slice(&text).map_err(|e| file.error(origin, format!("{}: not JSON: {e}", file.value.display())))?;
                Some(compile(&doc).map_err(|e| file.error(origin, format!("{}: {e}", file.value.display())))?)
            }
        };
        Ok(Validator::with(route, v, schema))
    }

    /// Checks from a schema given in code (benches, tests).
    pub fn from_schema(route: &str, v: &Validate, schema: Option<&Value>) -> Result<Validator, String> {
        Ok(Validator::with(route, v, schema.map(compile).transpose()?))
    }

    fn with(route: &str, v: &Validate, schema: Option<jsonschema::Validator>) -> Validator {
        Validator {
            route: route.to_string(),
            json: v.json,
            binary: v.binary,
            max_depth: v.max_depth,
            on_invalid: v.on_invalid,
            schema,
        }
    }

    /// Text messages are assembled and checked (else they stream through).
    pub fn checks_text(&self) -> bool {
        self.json
    }

    pub fn allows_binary(&self) -> bool {
        self.binary
    }

    pub fn on_invalid(&self) -> OnInvalid {
        self.on_invalid
    }

    /// Check one whole text message (already checked as UTF-8 by the relay).
    pub fn check(&self, text: &[u8]) -> Result<(), Invalid> {
        if !self.json {
            return Ok(());
        }
        if exceeds_depth(text, self.max_depth) {
            return Err(Invalid::new(MessageRejection::TooDeep, "max_depth"));
        }
        let value = parse(text)?;
        let Some(schema) = &self.schema else { return Ok(()) };
        // The schema sees numbers as i64, u64 or f64; the upstream may read the text
        // exactly (Python ints, BigDecimal, json.Number). A number the two would read
        // differently could pass `minimum`, `maximum` or `enum` here and not there.
        if has_inexact_number(text) {
            return Err(Invalid::new(MessageRejection::NotJson, "number"));
        }
        if schema.is_valid(&value) {
            return Ok(());
        }
        let Err(e) = schema.validate(&value) else { return Ok(()) };
        Err(Invalid {
            reason: MessageRejection::Schema,
            pointer: bounded(e.instance_path().as_str()),
            keyword: Cow::Owned(bounded(e.kind().keyword())),
            position: None,
        })
    }
}

/// Compile a draft 2020-12 schema: no remote or file retrieval (a `$ref` outside the
/// document is an error here, not a request at load time), linear-time regexes,
/// formats asserted.
fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .offline()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        // `format` asserts (2020-12 makes it an annotation by default): a schema that says
        // `"format": "email"` means it, as the applications behind us expect. A format
        // name the crate does not know is a load error, not a check silently skipped.
        .should_validate_formats(true)
        .should_ignore_unknown_formats(false)
        .build(schema)
        .map_err(|e| {
            format!(
                "invalid JSON Schema at \"{}\": {}",
                bounded(e.instance_path().as_str()),
                e.kind().keyword()
            )
        })
}

/// `s` cut to [`MAX_POINTER`] bytes at a character boundary.
fn bounded(s: &str) -> String {
    let mut n = s.len().min(MAX_POINTER);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    s[..n].to_string()
}

/// Whether JSON text nests arrays and objects deeper than `max`. One pass, no recursion:
/// brackets inside strings (escaped quotes included) do not count. Text that is not
/// JSON may pass; the parser refuses it next, and both agree on every valid prefix, so
/// the parser never nests deeper than `max` either.
pub fn exceeds_depth(text: &[u8], max: u32) -> bool {
    let mut depth = 0u32;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = string_end(text, i),
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The index of the quote that closes the JSON string opening at `text[open]` (escapes,
/// `\"` included, skipped), or `text.len()` when it does not close.
fn string_end(text: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return i,
            _ => i += 1,
        }
    }
    text.len()
}

/// Whether valid JSON `text` holds a number that does not survive the trip through
/// the 64-bit types the schema compares: an integer outside `i64::MIN..=u64::MAX`, or a
/// number with a fraction or exponent that has more than 15 significant digits
/// (`f64` round-trips 15) or is too small for a normal `f64` (`1e-400` reads as 0).
pub fn has_inexact_number(text: &[u8]) -> bool {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => i = string_end(text, i) + 1,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < text.len() && matches!(text[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                if !number_is_exact(&text[start..i]) {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// One JSON number literal (already known to be valid JSON).
fn number_is_exact(lit: &[u8]) -> bool {
    let Ok(lit) = std::str::from_utf8(lit) else { return false };
    if !lit.contains(['.', 'e', 'E']) {
        return lit.len() <= 21
            && lit
                .parse::<i128>()
                .is_ok_and(|n| n >= i128::from(i64::MIN) && n <= i128::from(u64::MAX));
    }
    let mantissa = lit.split(['e', 'E']).next().unwrap_or("");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.len() > 15 {
        return false;
    }
    match lit.parse::<f64>() {
        Ok(f) if significant.is_empty() => f == 0.0,
        Ok(f) => f.is_normal(),
        Err(_) => false,
    }
}

/// Parse JSON text, refusing duplicate keys.
fn parse(text: &[u8]) -> Result<Value, Invalid> {
    match serde_json::from_slice::<Strict>(text) {
        Ok(Strict(v)) => Ok(v),
        Err(e) => {
            let duplicate = e.is_data() && e.to_string().starts_with(DUPLICATE_KEY);
            let mut inv = Invalid::new(MessageRejection::NotJson, if duplicate { "duplicate_key" } else { "json" });
            inv.position = Some((e.line(), e.column()));
            Err(inv)
        }
    }
}

/// A `serde_json::Value` whose objects hold no key twice.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let Strict(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests;
