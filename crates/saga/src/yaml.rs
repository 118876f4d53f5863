//! Saga definitions arrive as YAML or JSON (which is YAML). This turns the text into a JSON
//! value and remembers where each node started, so that every error can name a line and
//! column, including errors found after parsing (a missing compensation, a bad template).

use std::collections::HashMap;
use std::fmt;

use saphyr::{Scalar, ScalarStyle, Tag};
use saphyr_parser::{Event, Parser};
use serde_json::{Map, Number, Value};

/// The largest definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;

/// How deep a definition may nest.
const MAX_DEPTH: usize = 64;

/// A line and column, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A parsed document: its value and where each node (by JSON pointer) began.
#[derive(Debug)]
pub struct Document {
    /// The document as JSON.
    pub value: Value,
    locations: HashMap<String, Location>,
}

impl Document {
    /// Where the node at `pointer` begins, or its nearest ancestor that exists (a missing
    /// field is reported at the object that should hold it).
    pub fn locate(&self, pointer: &str) -> Location {
        let mut pointer = pointer;
        loop {
            if let Some(location) = self.locations.get(pointer) {
                return *location;
            }
            match pointer.rfind('/') {
                Some(i) => pointer = &pointer[..i],
                None => return Location { line: 1, column: 1 },
            }
        }
    }
}

/// Most nodes (scalars, sequences, mappings) in one definition.
const MAX_NODES: usize = 20_000;

/// The longest mapping key.
const MAX_KEY_BYTES: usize = 1024;

/// Most bytes of JSON pointers kept for locating errors: each node's pointer repeats its
/// ancestors' keys, so long keys nested deep would otherwise cost far more than the text.
const MAX_LOCATION_BYTES: usize = 4 * 1024 * 1024;

/// A container being built.
enum Open {
    Sequence {
        items: Vec<Value>,
        pointer: String,
    },
    Mapping {
        entries: Map<String, Value>,
        pointer: String,
        /// The key whose value comes next, once read.
        key: Option<String>,
    },
}

type Failure = (Location, String);

/// Parses YAML (or JSON) text into a [`Document`]. Errors name the line and column.
///
/// Built from the parser's events with an explicit stack, never as a tree first: depth
/// (`MAX_DEPTH`) and node count (`MAX_NODES`) are checked as the events arrive, and aliases are
/// refused, so neither deep nesting nor an alias bomb can exhaust the stack or the memory.
pub fn parse(text: &str) -> Result<Document, Failure> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err((
            Location { line: 1, column: 1 },
            format!(
                "the definition is {} bytes; at most {MAX_DEFINITION_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| {
            let marker = e.marker();
            (
                Location {
                    line: marker.line(),
                    column: marker.col() + 1,
                },
                e.info().to_owned(),
            )
        })?;
        let here = Location {
            line: span.start.line(),
            column: span.start.col() + 1,
        };
        if builder.take(event, here)? {
            break;
        }
    }
    let value = builder.root.ok_or_else(|| {
        (
            Location { line: 1, column: 1 },
            "the definition is empty".to_owned(),
        )
    })?;
    Ok(Document {
        value,
        locations: builder.locations,
    })
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Value>,
    locations: HashMap<String, Location>,
    documents: usize,
    nodes: usize,
    location_bytes: usize,
}

impl Builder {
    /// Takes one event; `true` at the end of the stream.
    fn take(&mut self, event: Event<'_>, here: Location) -> Result<bool, Failure> {
        match event {
            Event::StreamEnd => return Ok(true),
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => {}
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err((
                        here,
                        "only one YAML document is allowed; remove the `---` and what follows"
                            .into(),
                    ));
                }
            }
            Event::Alias(_) => {
                return Err((
                    here,
                    "YAML aliases (*name) are not supported: write the value out".into(),
                ));
            }
            Event::Scalar(text, style, _anchor, tag) => {
                self.count(here)?;
                let scalar = scalar_of(text, style, tag.as_ref(), here)?;
                if let Some(Open::Mapping {
                    key: key @ None, ..
                }) = self.stack.last_mut()
                {
                    let text = key_of(&scalar)
                        .ok_or_else(|| (here, "a mapping key must be a plain string".to_owned()))?;
                    if text.len() > MAX_KEY_BYTES {
                        return Err((
                            here,
                            format!("a mapping key is longer than {MAX_KEY_BYTES} bytes"),
                        ));
                    }
                    *key = Some(text);
                    return Ok(false);
                }
                let value = scalar_value(&scalar).ok_or_else(|| {
                    (
                        here,
                        "this number is not finite; JSON cannot hold it".to_owned(),
                    )
                })?;
                let pointer = self.child_pointer(here)?;
                self.locate(pointer, here)?;
                self.complete(value, here)?;
            }
            Event::SequenceStart(_, tag) | Event::MappingStart(_, tag) if tag.is_some() => {
                return Err((here, "YAML tags (`!tag`) are not supported".into()));
            }
            Event::SequenceStart(..) => {
                let pointer = self.open(here)?;
                self.stack.push(Open::Sequence {
                    items: Vec::new(),
                    pointer,
                });
            }
            Event::MappingStart(..) => {
                let pointer = self.open(here)?;
                self.stack.push(Open::Mapping {
                    entries: Map::new(),
                    pointer,
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let value = match self.stack.pop() {
                    Some(Open::Sequence { items, .. }) => Value::Array(items),
                    Some(Open::Mapping { entries, .. }) => Value::Object(entries),
                    None => return Err((here, "a collection ends that never began".into())),
                };
                self.complete(value, here)?;
            }
        }
        Ok(false)
    }

    fn count(&mut self, here: Location) -> Result<(), Failure> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err((
                here,
                format!("more than {MAX_NODES} values in one definition"),
            ));
        }
        Ok(())
    }

    /// A sequence or mapping begins: checks the limits and where it may stand, and records
    /// its location; returns its pointer.
    fn open(&mut self, here: Location) -> Result<String, Failure> {
        self.count(here)?;
        if self.stack.len() >= MAX_DEPTH {
            return Err((here, format!("nested more than {MAX_DEPTH} levels deep")));
        }
        if let Some(Open::Mapping { key: None, .. }) = self.stack.last() {
            return Err((here, "a mapping key must be a plain string".into()));
        }
        let pointer = self.child_pointer(here)?;
        self.locate(pointer.clone(), here)?;
        Ok(pointer)
    }

    /// Remembers where the node at `pointer` began, within [`MAX_LOCATION_BYTES`].
    fn locate(&mut self, pointer: String, here: Location) -> Result<(), Failure> {
        self.location_bytes += pointer.len();
        if self.location_bytes > MAX_LOCATION_BYTES {
            return Err((
                here,
                "the definition nests too many long keys too deep; shorten them".to_owned(),
            ));
        }
        self.locations.insert(pointer, here);
        Ok(())
    }

    /// The pointer of the node that comes next in the open container.
    fn child_pointer(&self, here: Location) -> Result<String, Failure> {
        Ok(match self.stack.last() {
            None if self.root.is_some() => {
                return Err((here, "only one value is allowed at the top".into()));
            }
            None => String::new(),
            Some(Open::Sequence { items, pointer }) => format!("{pointer}/{}", items.len()),
            Some(Open::Mapping {
                pointer,
                key: Some(key),
                ..
            }) => format!("{pointer}/{}", escape(key)),
            Some(Open::Mapping { key: None, .. }) => {
                return Err((here, "a mapping key must be a plain string".into()));
            }
        })
    }

    /// A node is whole: it goes into its container, or becomes the document.
    fn complete(&mut self, value: Value, here: Location) -> Result<(), Failure> {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Open::Sequence { items, .. }) => items.push(value),
            Some(Open::Mapping { entries, key, .. }) => {
                let key = key.take().expect("a value in a mapping follows its key");
                if entries.contains_key(&key) {
                    return Err((here, format!("key {key:?} appears twice in this mapping")));
                }
                entries.insert(key, value);
            }
        }
        Ok(())
    }
}

/// A scalar as YAML 1.2's core schema reads it; tags other than the core ones are refused.
fn scalar_of<'t>(
    text: std::borrow::Cow<'t, str>,
    style: ScalarStyle,
    tag: Option<&std::borrow::Cow<'t, Tag>>,
    here: Location,
) -> Result<Scalar<'t>, Failure> {
    if tag.is_some_and(|t| !t.is_yaml_core_schema()) {
        return Err((here, "YAML tags (`!tag`) are not supported".into()));
    }
    Scalar::parse_from_cow_and_metadata(text, style, tag)
        .ok_or_else(|| (here, "this value does not match its tag".to_owned()))
}

/// A mapping key as text: strings, integers and booleans.
fn key_of(scalar: &Scalar<'_>) -> Option<String> {
    match scalar {
        Scalar::String(s) => Some(s.to_string()),
        Scalar::Integer(i) => Some(i.to_string()),
        Scalar::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn scalar_value(scalar: &Scalar) -> Option<Value> {
    Some(match scalar {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(*b),
        Scalar::Integer(i) => Value::Number((*i).into()),
        Scalar::FloatingPoint(f) => Value::Number(Number::from_f64(f.into_inner())?),
        Scalar::String(s) => Value::String(s.to_string()),
    })
}

/// Escapes a key for a JSON pointer (RFC 6901).
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_types_and_locations() {
        let doc = parse("name: a\nsteps:\n  - n: 12\n    q: '12'\n    z: ~\n    f: 1.5\n").unwrap();
        assert_eq!(
            doc.value,
            serde_json::json!({"name": "a", "steps": [{"n": 12, "q": "12", "z": null, "f": 1.5}]})
        );
        assert_eq!(doc.locate("/steps/0/q"), Location { line: 4, column: 8 });
        // A missing node is reported where its parent is.
        assert_eq!(
            doc.locate("/steps/0/missing"),
            Location { line: 3, column: 5 }
        );
    }

    #[test]
    fn json_is_accepted_with_locations() {
        let doc = parse("{\"a\": 1,\n \"b\": [true, null]}").unwrap();
        assert_eq!(doc.value, serde_json::json!({"a": 1, "b": [true, null]}));
        assert_eq!(doc.locate("/b/1").line, 2);
    }

    #[test]
    fn syntax_errors_and_aliases_name_the_place() {
        let (at, why) = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(at.line >= 2, "{at} {why}");
        // Aliases are refused, where they are.
        let (at, why) = parse("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(at.line, 2);
        assert!(why.contains("aliases"), "{why}");
        assert!(parse("").is_err());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert!(parse("a: 1\na: 2\n").unwrap_err().1.contains("twice"));
        assert!(parse("a: !custom 1\n").is_err());
        assert_eq!(
            parse("a: !!str 12\n").unwrap().value,
            serde_json::json!({"a": "12"})
        );
    }

    /// Runs `f` on a thread with a small stack: a parser that recursed per level of nesting
    /// would overflow it (and abort the process) on these inputs.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(f)
            .unwrap()
            .join()
            .expect("no stack overflow")
    }

    #[test]
    fn hostile_shapes_are_refused_quickly_and_on_a_small_stack() {
        let nested_block = format!("{}x", "- ".repeat(5000));
        let (_, why) = on_small_stack(move || parse(&nested_block)).unwrap_err();
        assert!(why.contains("nested"), "{why}");
        let nested_flow = "[".repeat(100_000);
        assert!(on_small_stack(move || parse(&nested_flow)).is_err());
        // The 399-byte alias bomb of issue 25: 7 levels of 9-way anchors.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for level in 1..7 {
            let prev = format!("*a{}", level - 1);
            let refs = [prev.as_str(); 9].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        let (_, why) = on_small_stack(move || parse(&bomb)).unwrap_err();
        assert!(why.contains("aliases"), "{why}");
        let wide = format!("[{}]", vec!["1"; MAX_NODES + 1].join(","));
        let (_, why) = parse(&wide).unwrap_err();
        assert!(why.contains("values"), "{why}");
        // Long keys repeat in every pointer below them (a `/` escapes to two bytes): in JSON
        // flow style the parser's own key limit does not apply.
        let key = "/".repeat(200_000);
        let long = format!("{{\"{key}\": [{}]}}", vec!["0"; 19_998].join(","));
        let (_, why) = parse(&long).unwrap_err();
        assert!(why.contains("longer than"), "{why}");
        let key = "/".repeat(MAX_KEY_BYTES);
        let mut deep = String::new();
        for _ in 0..MAX_DEPTH - 2 {
            deep.push_str(&format!("{{\"{key}\": "));
        }
        deep.push_str(&format!("[{}]", vec!["0"; 15_000].join(",")));
        deep.push_str(&"}".repeat(MAX_DEPTH - 2));
        let (_, why) = parse(&deep).unwrap_err();
        assert!(why.contains("too deep"), "{why}");
    }
}
