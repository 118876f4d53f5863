//! The CloudEvents 1.0 JSON shape, in both directions: parsing appended events and writing
//! read records. See `docs/http-api.md`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::value::RawValue;
use skald_core::{
    EventData, EventId, EventType, Metadata, ProposedEvent, RecordedEvent, StreamName, Tag,
};

use crate::problem::Problem;

/// One event as a client sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudEventIn {
    specversion: Option<String>,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: String,
    source: Option<String>,
    subject: Option<String>,
    datacontenttype: Option<String>,
    data: Option<Box<RawValue>>,
    data_base64: Option<String>,
    #[allow(dead_code)] // accepted for CloudEvents compatibility; the store records its own time
    time: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    metadata: Option<Box<RawValue>>,
}

impl CloudEventIn {
    /// Turns the wire event into a proposed event for `stream`. `at` names it in errors.
    pub fn into_event(self, stream: &StreamName, at: &str) -> Result<ProposedEvent, Problem> {
        if let Some(v) = &self.specversion
            && v != "1.0"
        {
            return Err(Problem::malformed(format!(
                "{at}.specversion is {v:?}; only \"1.0\" is supported"
            )));
        }
        if let Some(subject) = &self.subject
            && subject != stream.as_str()
        {
            return Err(Problem::malformed(format!(
                "{at}.subject is {subject:?} but the stream is {stream:?}; they must match"
            )));
        }
        let id = event_id(self.id.as_deref(), at)?;
        let invalid = |e| invalid_at(at, e);
        let event_type = EventType::new(self.event_type).map_err(invalid)?;
        let tags = self
            .tags
            .into_iter()
            .map(Tag::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let data = parse_data(self.datacontenttype, self.data, self.data_base64, at)?;
        let metadata = match self.metadata {
            None => Metadata::empty(),
            Some(raw) => Metadata::new(raw.get())
                .map_err(|_| Problem::malformed(format!("{at}.metadata must be a JSON object")))?,
        };
        Ok(ProposedEvent {
            id,
            event_type,
            data,
            metadata,
            tags,
            source: self.source,
        })
    }
}

/// The event id a client gave (a UUID), or a new one when it gave none.
pub(crate) fn event_id(text: Option<&str>, at: &str) -> Result<EventId, Problem> {
    match text {
        None => Ok(EventId::generate()),
        Some(text) => Ok(EventId(uuid::Uuid::parse_str(text).map_err(|e| {
            Problem::malformed(format!("{at}.id {text:?} is not a UUID: {e}"))
        })?)),
    }
}

/// A name that failed its check, as an invalid event whose reason says which event (`at`).
pub(crate) fn invalid_at(at: &str, e: skald_core::Error) -> Problem {
    let reason = match e {
        skald_core::Error::InvalidEvent { reason } => format!("{at}: {reason}"),
        other => other.to_string(),
    };
    skald_core::Error::invalid(reason).into()
}

fn parse_data(
    content_type: Option<String>,
    data: Option<Box<RawValue>>,
    data_base64: Option<String>,
    at: &str,
) -> Result<EventData, Problem> {
    let invalid = |e: skald_core::Error| -> Problem { Problem::malformed(format!("{at}: {e}")) };
    match (data, data_base64) {
        (Some(_), Some(_)) => Err(Problem::malformed(format!(
            "{at} has both data and data_base64; send one"
        ))),
        (None, Some(b64)) => {
            let bytes = BASE64.decode(b64.as_bytes()).map_err(|e| {
                Problem::malformed(format!("{at}.data_base64 is not valid base64: {e}"))
            })?;
            let ct = content_type.unwrap_or_else(|| "application/octet-stream".to_owned());
            EventData::with_content_type(ct, bytes).map_err(invalid)
        }
        (data, None) => {
            let ct = content_type.unwrap_or_else(|| "application/json".to_owned());
            let raw = data.as_deref().map_or("null", RawValue::get);
            if skald_core::is_json_content_type(&ct) {
                return EventData::with_content_type(ct, raw.as_bytes().to_vec()).map_err(invalid);
            }
            let text: String = serde_json::from_str(raw).map_err(|_| {
                Problem::malformed(format!(
                    "{at}.data must be a string for datacontenttype {ct:?}; send binary as data_base64"
                ))
            })?;
            EventData::with_content_type(ct, text.into_bytes()).map_err(invalid)
        }
    }
}

/// Formats microseconds since the epoch as RFC 3339.
fn rfc3339(micros: i64) -> String {
    let time = if micros >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros as u64)
    } else {
        std::time::UNIX_EPOCH
    };
    humantime::format_rfc3339_micros(time).to_string()
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Appends one record as a JSON object to `out`. Data and metadata were validated as JSON
/// when appended, so they are copied as they are rather than parsed again.
pub fn write_record(out: &mut Vec<u8>, e: &RecordedEvent) {
    out.extend_from_slice(br#"{"specversion":"1.0","id":""#);
    out.extend_from_slice(
        e.id.0
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(br#"","source":"#);
    match &e.source {
        Some(s) => push_str(out, s),
        None => push_str(out, &format!("/streams/{}", e.stream)),
    }
    out.extend_from_slice(br#","type":"#);
    push_str(out, e.event_type.as_str());
    out.extend_from_slice(br#","subject":"#);
    push_str(out, e.stream.as_str());
    out.extend_from_slice(br#","time":""#);
    out.extend_from_slice(rfc3339(e.recorded_at.0).as_bytes());
    out.extend_from_slice(br#"","datacontenttype":"#);
    push_str(out, e.data.content_type());
    let bytes = e.data.bytes();
    if e.data.is_json() {
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(bytes);
    } else if let (true, Ok(text)) = (
        e.data.content_type().starts_with("text/"),
        std::str::from_utf8(bytes),
    ) {
        out.extend_from_slice(br#","data":"#);
        push_str(out, text);
    } else {
        out.extend_from_slice(br#","data_base64":""#);
        out.extend_from_slice(BASE64.encode(bytes).as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(br#","stream":"#);
    push_str(out, e.stream.as_str());
    out.extend_from_slice(
        format!(
            r#","revision":{},"position":{},"tags":["#,
            e.revision, e.position
        )
        .as_bytes(),
    );
    for (i, tag) in e.tags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, tag.as_str());
    }
    out.extend_from_slice(br#"],"metadata":"#);
    out.extend_from_slice(e.metadata.as_str().as_bytes());
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use skald_core::{Position, Revision, Timestamp};

    fn parse(json: &str) -> Result<ProposedEvent, Problem> {
        let e: CloudEventIn = serde_json::from_str(json).unwrap();
        e.into_event(&StreamName::new("order-1").unwrap(), "events[0]")
    }

    #[test]
    fn json_data_text_data_and_base64_data() {
        let e = parse(r#"{"type":"A","data":{"x":[1,2]}}"#).unwrap();
        assert_eq!(e.data.bytes(), br#"{"x":[1,2]}"#);
        assert_eq!(e.data.content_type(), "application/json");
        let e = parse(r#"{"type":"A","datacontenttype":"text/plain","data":"hi\n"}"#).unwrap();
        assert_eq!(e.data.bytes(), b"hi\n");
        let e =
            parse(r#"{"type":"A","datacontenttype":"image/png","data_base64":"AAEC"}"#).unwrap();
        assert_eq!(e.data.bytes(), [0, 1, 2]);
        let e = parse(r#"{"type":"A"}"#).unwrap();
        assert_eq!(e.data.bytes(), b"null");
    }

    #[test]
    fn bad_events_say_which_field_is_wrong() {
        let detail = |json: &str| {
            parse(json).unwrap_err().to_json()["detail"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(detail(r#"{"type":"A","id":"nope"}"#).contains("events[0].id"));
        assert!(detail(r#"{"type":"A","data":1,"data_base64":"AA=="}"#).contains("both"));
        assert!(
            detail(r#"{"type":"A","datacontenttype":"text/plain","data":{}}"#)
                .contains("must be a string")
        );
        assert!(
            detail(r#"{"type":"A","metadata":[1]}"#).contains("metadata must be a JSON object")
        );
        assert!(detail(r#"{"type":"A","specversion":"0.3"}"#).contains("specversion"));
        assert!(detail(r#"{"type":"A","subject":"other"}"#).contains("subject"));
        let empty_type = parse(r#"{"type":""}"#).unwrap_err();
        assert_eq!(empty_type.status().as_u16(), 422);
    }

    #[test]
    fn a_written_record_is_valid_json_with_every_field() {
        let stream = StreamName::new("order-1").unwrap();
        let mut p = parse(r#"{"type":"A","data":{"q":"\"x\""},"tags":["t:1"],"metadata":{"c":1}}"#)
            .unwrap();
        p.source = None;
        let e = RecordedEvent {
            id: p.id,
            stream: stream.clone(),
            event_type: p.event_type,
            data: p.data,
            metadata: p.metadata,
            tags: p.tags,
            source: None,
            recorded_at: Timestamp(1_700_000_000_123_456),
            revision: Revision(3),
            position: Position(9),
        };
        let mut out = Vec::new();
        write_record(&mut out, &e);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"]["q"], "\"x\"");
        assert_eq!(v["source"], "/streams/order-1");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["revision"], 3);
        assert_eq!(v["position"], 9);
        assert_eq!(v["tags"][0], "t:1");
        assert_eq!(v["metadata"]["c"], 1);
        assert_eq!(v["subject"], "order-1");
    }
}
