//! `{{ path }}` templates in step actions, rendered against a saga's context.
//!
//! The context is a JSON object: `saga` (id, correlationKey, definition, version), `trigger`
//! (the event) and `steps.NAME.output`. A string that is exactly one template takes the
//! value's JSON type; otherwise each template is replaced by the value as text.

use serde_json::{Map, Value};

/// Fields of `saga` a template may name.
pub const SAGA_FIELDS: &[&str] = &["id", "correlationKey", "definition", "version"];

/// Fields of the trigger event (and of an awaited event) a template or pointer may name.
pub const EVENT_FIELDS: &[&str] = &[
    "id",
    "stream",
    "type",
    "source",
    "datacontenttype",
    "data",
    "metadata",
    "tags",
    "position",
    "revision",
    "time",
];

/// Most templates in one string: bounds the work of rendering.
const MAX_TEMPLATES_PER_STRING: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Path(Vec<String>),
}

/// One parsed string: text and template paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Parses `text`. Errors say what is wrong with the template syntax.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(format!(
                    "{text:?} opens a template with {{{{ that is never closed"
                ));
            };
            let path = after[..close].trim();
            if path.is_empty() {
                return Err(format!("{text:?} has an empty template {{{{}}}}"));
            }
            if path.contains("{{") {
                return Err(format!("{text:?} has a template inside a template"));
            }
            let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
            if segments
                .iter()
                .any(|s| s.is_empty() || s.contains(char::is_whitespace))
            {
                return Err(format!(
                    "template {{{{{path}}}}} is not a dot-separated path such as trigger.data.orderId"
                ));
            }
            parts.push(Part::Path(segments));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let templates = parts.iter().filter(|p| matches!(p, Part::Path(_))).count();
        if templates > MAX_TEMPLATES_PER_STRING {
            return Err(format!(
                "{text:?} has {templates} templates; at most {MAX_TEMPLATES_PER_STRING} are allowed"
            ));
        }
        Ok(Self(parts))
    }

    /// The paths this string names.
    pub fn paths(&self) -> impl Iterator<Item = &[String]> {
        self.0.iter().filter_map(|p| match p {
            Part::Path(path) => Some(path.as_slice()),
            Part::Text(_) => None,
        })
    }

    /// The text in pieces, `None` for each template (which may render to any characters): what
    /// the access rules are checked against for a stream name template.
    pub fn pieces(&self) -> Vec<Option<&str>> {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Path(_) => None,
            })
            .collect()
    }

    /// The text with every template replaced by `placeholder`: used to validate URLs and
    /// names before any value is known.
    pub fn with_placeholder(&self, placeholder: &str) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.as_str(),
                Part::Path(_) => placeholder,
            })
            .collect()
    }

    /// Renders to a JSON value: exactly one template keeps its value's type.
    pub fn render(&self, context: &Value) -> Result<Value, String> {
        if let [Part::Path(path)] = self.0.as_slice() {
            return lookup(context, path).cloned();
        }
        self.render_text(context).map(Value::String)
    }

    /// Renders to text: strings as they are, other values as JSON text.
    pub fn render_text(&self, context: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Path(path) => match lookup(context, path)? {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(out)
    }
}

/// The value at `path` in `context`, or an error naming the first segment that is missing.
fn lookup<'a>(context: &'a Value, path: &[String]) -> Result<&'a Value, String> {
    let mut node = context;
    for (i, segment) in path.iter().enumerate() {
        let next = match node {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        node = next.ok_or_else(|| {
            let parent = if i == 0 {
                "the context".to_owned()
            } else {
                path[..i].join(".")
            };
            format!(
                "template {{{{{}}}}}: {parent} has no {segment:?}",
                path.join(".")
            )
        })?;
    }
    Ok(node)
}

/// Renders every string inside a JSON value (object keys stay as they are).
pub fn render_value(value: &Value, context: &Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Template::parse(s)?.render(context)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_value(v, context))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), render_value(v, context)?);
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

/// Every string inside a JSON value, with its JSON pointer relative to the value.
pub fn strings_in(value: &Value, pointer: String, out: &mut Vec<(String, String)>) {
    match value {
        Value::String(s) => out.push((pointer, s.clone())),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings_in(v, format!("{pointer}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                strings_in(v, format!("{pointer}/{}", crate::yaml::escape(k)), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "saga": {"id": "s-1", "correlationKey": "42"},
            "trigger": {"data": {"orderId": 42, "items": [{"sku": "a"}]}},
            "steps": {"reserve": {"output": {"id": "r-9"}}}
        })
    }

    #[test]
    fn a_lone_template_keeps_its_type_and_text_interpolates() {
        let ctx = context();
        let t = Template::parse("{{trigger.data.orderId}}").unwrap();
        assert_eq!(t.render(&ctx).unwrap(), json!(42));
        let t =
            Template::parse("/r/{{ steps.reserve.output.id }}?o={{trigger.data.orderId}}").unwrap();
        assert_eq!(t.render(&ctx).unwrap(), json!("/r/r-9?o=42"));
        let t = Template::parse("{{trigger.data.items.0.sku}}").unwrap();
        assert_eq!(t.render(&ctx).unwrap(), json!("a"));
        let body = json!({"order": "{{trigger.data.orderId}}", "n": [1, "x{{saga.id}}"]});
        assert_eq!(
            render_value(&body, &ctx).unwrap(),
            json!({"order": 42, "n": [1, "xs-1"]})
        );
    }

    #[test]
    fn missing_paths_and_bad_syntax_are_named() {
        let ctx = context();
        let err = Template::parse("{{trigger.data.customer.name}}")
            .unwrap()
            .render(&ctx)
            .unwrap_err();
        assert!(err.contains("trigger.data has no \"customer\""), "{err}");
        assert!(
            Template::parse("a {{b")
                .unwrap_err()
                .contains("never closed")
        );
        assert!(Template::parse("{{}}").unwrap_err().contains("empty"));
        assert!(Template::parse("{{a..b}}").is_err());
        assert_eq!(
            Template::parse("x{{a.b}}y").unwrap().with_placeholder("_"),
            "x_y"
        );
    }
}
