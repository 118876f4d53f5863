//! Saga definitions arrive as YAML or JSON (which is YAML). This turns the text into a JSON
//! value and remembers where each node started, so that every error can name a line and
//! column, including errors found after parsing (a missing compensation, a bad template).

use std::collections::HashMap;
use std::fmt;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Number, Value};

/// The largest definition accepted, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;

/// How deep a definition may nest: bounds recursion on hostile input.
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

/// Parses YAML (or JSON) text into a [`Document`]. Errors name the line and column.
pub fn parse(text: &str) -> Result<Document, (Location, String)> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err((
            Location { line: 1, column: 1 },
            format!(
                "the definition is {} bytes; at most {MAX_DEFINITION_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let marker = e.marker();
        (
            Location {
                line: marker.line(),
                column: marker.col() + 1,
            },
            e.info().to_owned(),
        )
    })?;
    let mut docs = docs.into_iter();
    let Some(root) = docs.next() else {
        return Err((
            Location { line: 1, column: 1 },
            "the definition is empty".into(),
        ));
    };
    if let Some(extra) = docs.next() {
        return Err((
            location_of(&extra),
            "only one YAML document is allowed; remove the `---` and what follows".into(),
        ));
    }
    let mut locations = HashMap::new();
    let value = convert(&root, String::new(), &mut locations, 0)?;
    Ok(Document { value, locations })
}

fn location_of(node: &MarkedYaml) -> Location {
    Location {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

fn convert(
    node: &MarkedYaml,
    pointer: String,
    locations: &mut HashMap<String, Location>,
    depth: usize,
) -> Result<Value, (Location, String)> {
    let here = location_of(node);
    if depth > MAX_DEPTH {
        return Err((here, format!("nested more than {MAX_DEPTH} levels deep")));
    }
    let value = match &node.data {
        YamlData::Value(scalar) => scalar_value(scalar).ok_or_else(|| {
            (
                here,
                "this number is not finite; JSON cannot hold it".to_owned(),
            )
        })?,
        YamlData::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(convert(
                    item,
                    format!("{pointer}/{i}"),
                    locations,
                    depth + 1,
                )?);
            }
            Value::Array(out)
        }
        YamlData::Mapping(entries) => {
            let mut out = Map::new();
            for (key, item) in entries {
                let key = match &key.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                    YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                    _ => {
                        return Err((
                            location_of(key),
                            "a mapping key must be a plain string".into(),
                        ));
                    }
                };
                let child = format!("{pointer}/{}", escape(&key));
                let value = convert(item, child, locations, depth + 1)?;
                out.insert(key, value);
            }
            Value::Object(out)
        }
        YamlData::Alias(_) => {
            return Err((here, "this alias names no anchor".into()));
        }
        YamlData::Tagged(..) => {
            return Err((here, "YAML tags (`!tag`) are not supported".into()));
        }
        YamlData::Representation(..) | YamlData::BadValue => {
            return Err((here, "this value cannot be read".into()));
        }
    };
    locations.insert(pointer, here);
    Ok(value)
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
        // Aliases are resolved to the anchored value.
        let doc = parse("a: &x 1\nb: *x\n").unwrap();
        assert_eq!(doc.value, serde_json::json!({"a": 1, "b": 1}));
        let (at, _) = parse("a: 1\nb: *nope\n").unwrap_err();
        assert_eq!(at.line, 2);
        assert!(parse("").is_err());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
    }
}
