//! Where a subscription or a consumer group starts, as clients write it: in a query string
//! (`from=start|now|N|revision:N`) or in JSON (`"start"`, `"now"`, `N`, `{"revision": N}`).

use serde_json::Value;
use skald_hub::Start;

use crate::Problem;

/// Parses a start: `start`, `now`, a position, or `revision:N` (streams only).
pub(crate) fn parse_start(text: &str, is_stream: bool) -> Result<Start, Problem> {
    match text {
        "start" => return Ok(Start::Beginning),
        "now" => return Ok(Start::Now),
        _ => {}
    }
    if let Ok(position) = text.parse::<u64>() {
        return Ok(Start::Position(position));
    }
    if let Some(revision) = text.strip_prefix("revision:") {
        if !is_stream {
            return Err(Problem::malformed(format!(
                "from {text:?}: a revision can only start a stream subscription; give a position"
            )));
        }
        if let Ok(revision) = revision.parse::<u64>() {
            return Ok(Start::Revision(revision));
        }
    }
    Err(Problem::malformed(format!(
        "from {text:?} is not a start: use start, now, a position (a whole number), or \
         revision:N for a stream"
    )))
}

/// A start as JSON (WebSocket `from`, a group definition's `from`): `"start"`, `"now"`, a
/// position, or `{"revision": N}` for a stream.
pub(crate) fn start_from_json(from: Option<Value>, is_stream: bool) -> Result<Start, Problem> {
    match from {
        None => Ok(Start::Beginning),
        Some(Value::String(text)) if text != "revision" => parse_start(&text, is_stream),
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            Ok(Start::Position(n.as_u64().expect("checked")))
        }
        Some(Value::Object(o))
            if o.len() == 1 && o.get("revision").and_then(Value::as_u64).is_some() =>
        {
            if !is_stream {
                return Err(Problem::malformed(
                    "from: a revision can only start a stream subscription; give a position",
                ));
            }
            Ok(Start::Revision(o["revision"].as_u64().expect("checked")))
        }
        Some(other) => Err(Problem::malformed(format!(
            "from {other} is not a start: use \"start\", \"now\", a position, or {{\"revision\": N}} for a stream"
        ))),
    }
}
