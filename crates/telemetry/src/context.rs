//! W3C Trace Context: the `traceparent` header and its place in event metadata.

/// A span's identity as it travels: trace id, span id, and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

fn hex_into<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// Appends lowercase hex (spans write several ids each, so this avoids `format!`).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

impl TraceContext {
    /// Parses a `traceparent` value. Versions other than `00` are read by their first four
    /// fields, as the specification asks; `ff`, all-zero ids and malformed values are `None`.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let value = traceparent.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let version: [u8; 1] = hex_into(version)?;
        if version[0] == 0xff || (version[0] == 0 && parts.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = hex_into(trace)?;
        let span_id: [u8; 8] = hex_into(span)?;
        let flags: [u8; 1] = hex_into(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The `traceparent` value.
    pub fn to_header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }

    /// The `traceparent` in an event's metadata (a JSON object's text), if it has a valid one.
    /// Looks for the key as text first, so that events without one cost no JSON parse.
    pub fn from_metadata(metadata: &str) -> Option<Self> {
        if !metadata.contains("\"traceparent\"") {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(metadata).ok()?;
        Self::parse(value.get("traceparent")?.as_str()?)
    }
}

/// Adds `traceparent` (and `tracestate`, when given) to a metadata object's text, unless it
/// already has a `traceparent`. The text must be a JSON object (metadata always is).
pub fn inject(metadata: &str, context: &TraceContext, tracestate: Option<&str>) -> String {
    if metadata.contains("\"traceparent\"") {
        return metadata.to_owned();
    }
    let trimmed = metadata.trim_start();
    let Some(rest) = trimmed.strip_prefix('{') else {
        return metadata.to_owned();
    };
    let mut fields = format!("\"traceparent\":\"{}\"", context.to_header());
    if let Some(state) = tracestate {
        fields.push_str(",\"tracestate\":");
        fields.push_str(&serde_json::Value::String(state.to_owned()).to_string());
    }
    let empty = rest.trim_start().starts_with('}');
    if empty {
        format!("{{{fields}}}")
    } else {
        format!("{{{fields},{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_rejects_what_the_spec_rejects() {
        let c = TraceContext::parse(EXAMPLE).unwrap();
        assert!(c.sampled);
        assert_eq!(c.to_header(), EXAMPLE);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A future version keeps its first four fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn injection_keeps_the_object_valid_and_never_overwrites() {
        let c = TraceContext::parse(EXAMPLE).unwrap();
        let empty = inject("{}", &c, None);
        assert_eq!(TraceContext::from_metadata(&empty), Some(c));
        let full = inject("{\"correlationId\":\"x\"}", &c, Some("k=v"));
        let v: serde_json::Value = serde_json::from_str(&full).unwrap();
        assert_eq!(v["correlationId"], "x");
        assert_eq!(v["tracestate"], "k=v");
        assert_eq!(
            inject(
                &full,
                &TraceContext {
                    sampled: false,
                    ..c
                },
                None
            ),
            full
        );
        assert_eq!(TraceContext::from_metadata("{\"a\":1}"), None);
    }
}
