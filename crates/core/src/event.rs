//! Events, appends and their results.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, EventId, EventType, Position, Query, Result, Revision, StreamName, Tag};

/// A point in time: microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

/// The source of the current time. Injected so that tests and simulations control it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// Reads the system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
    }
}

/// What an append expects of its stream before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExpectedRevision {
    /// No check.
    #[default]
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this revision.
    Exact(Revision),
}

impl ExpectedRevision {
    /// Whether a stream whose last revision is `actual` (`None`: no stream) satisfies this.
    pub fn is_satisfied_by(self, actual: Option<Revision>) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual.is_none(),
            Self::StreamExists => actual.is_some(),
            Self::Exact(r) => actual == Some(r),
        }
    }
}

impl fmt::Display for ExpectedRevision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::StreamExists => f.write_str("stream exists"),
            Self::Exact(r) => write!(f, "{r}"),
        }
    }
}

/// On the wire: `"any"`, `"noStream"`, `"streamExists"`, or a revision number.
impl Serialize for ExpectedRevision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Any => s.serialize_str("any"),
            Self::NoStream => s.serialize_str("noStream"),
            Self::StreamExists => s.serialize_str("streamExists"),
            Self::Exact(r) => s.serialize_u64(r.0),
        }
    }
}

impl<'de> Deserialize<'de> for ExpectedRevision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ExpectedRevision;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""any", "noStream", "streamExists" or a revision number (0 or more)"#)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(ExpectedRevision::Exact(Revision(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                u64::try_from(v)
                    .map(|v| ExpectedRevision::Exact(Revision(v)))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match v {
                    "any" => Ok(ExpectedRevision::Any),
                    "noStream" => Ok(ExpectedRevision::NoStream),
                    "streamExists" => Ok(ExpectedRevision::StreamExists),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Whether a content type is JSON (`application/json` or any `+json` suffix type).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// An event's payload: bytes with a content type. For JSON content types the bytes are
/// valid JSON text (checked at construction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventData {
    content_type: String,
    bytes: Vec<u8>,
}

impl EventData {
    /// JSON data; `json` must be valid JSON text.
    pub fn json(json: impl Into<String>) -> Result<Self> {
        let json = json.into();
        serde_json::from_str::<serde::de::IgnoredAny>(&json)
            .map_err(|e| Error::invalid(format!("data is not valid JSON: {e}")))?;
        Ok(Self {
            content_type: "application/json".to_owned(),
            bytes: json.into_bytes(),
        })
    }

    /// Data of any content type. JSON content types are checked to hold valid JSON.
    pub fn with_content_type(content_type: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        let content_type = content_type.into();
        if content_type.is_empty() || content_type.chars().any(|c| c.is_control()) {
            return Err(Error::invalid(format!(
                "datacontenttype {content_type:?} is not a valid media type"
            )));
        }
        if is_json_content_type(&content_type) {
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
                Error::invalid(format!("data is not valid JSON for {content_type}: {e}"))
            })?;
        }
        Ok(Self {
            content_type,
            bytes,
        })
    }

    /// Rebuilds data read back from storage, where it was validated before it was written.
    pub fn from_stored(content_type: String, bytes: Vec<u8>) -> Self {
        Self {
            content_type,
            bytes,
        }
    }

    /// The media type of the bytes.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The payload.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether the payload is JSON.
    pub fn is_json(&self) -> bool {
        is_json_content_type(&self.content_type)
    }
}

/// Event metadata: a JSON object, kept as its text. Correlation and causation ids live here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata(String);

impl Metadata {
    /// The empty object `{}`.
    pub fn empty() -> Self {
        Self("{}".to_owned())
    }

    /// Validates that `json` is a JSON object.
    pub fn new(json: impl Into<String>) -> Result<Self> {
        let json = json.into();
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json)
            .map_err(|e| Error::invalid(format!("metadata must be a JSON object: {e}")))?;
        Ok(Self(json))
    }

    /// Rebuilds metadata read back from storage, where it was validated before it was written.
    pub fn from_stored(json: String) -> Self {
        Self(json)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event as a client proposes it for appending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposedEvent {
    /// The event's unique id.
    pub id: EventId,
    /// The event type.
    pub event_type: EventType,
    /// The payload.
    pub data: EventData,
    /// The metadata object.
    pub metadata: Metadata,
    /// Tags for DCB queries.
    pub tags: Vec<Tag>,
    /// The CloudEvents `source`, if the client gave one.
    pub source: Option<String>,
}

impl ProposedEvent {
    /// A JSON event with a fresh id, no tags and empty metadata.
    pub fn new(event_type: EventType, data: EventData) -> Self {
        Self {
            id: EventId::generate(),
            event_type,
            data,
            metadata: Metadata::empty(),
            tags: Vec::new(),
            source: None,
        }
    }

    /// The bytes this event counts against the event-size limit: payload, metadata, type,
    /// tags and source.
    pub fn size_bytes(&self) -> usize {
        self.data.bytes().len()
            + self.data.content_type().len()
            + self.metadata.as_str().len()
            + self.event_type.as_str().len()
            + self.tags.iter().map(|t| t.as_str().len()).sum::<usize>()
            + self.source.as_ref().map_or(0, String::len)
    }

    /// Whether `other` (a stored event) is the same event: everything but position, revision
    /// and time. Used to tell an idempotent retry from a reused id. Returns what differs.
    pub fn differs_from(&self, other: &RecordedEvent) -> Option<&'static str> {
        if self.event_type != other.event_type {
            Some("the event type differs")
        } else if self.data != other.data {
            Some("the data differs")
        } else if !same_metadata(&self.metadata, &other.metadata) {
            Some("the metadata differs")
        } else if self.tags != other.tags {
            Some("the tags differ")
        } else if self.source != other.source {
            Some("the source differs")
        } else {
            None
        }
    }
}

/// Keys of metadata that describe the request that carried an event, not the event: an
/// idempotent retry comes with a new trace context and is still the same event.
const TRANSPORT_METADATA: [&str; 2] = ["traceparent", "tracestate"];

fn same_metadata(a: &Metadata, b: &Metadata) -> bool {
    if a == b {
        return true;
    }
    let parse = |m: &Metadata| {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m.as_str()).map(
            |mut map| {
                for key in TRANSPORT_METADATA {
                    map.remove(key);
                }
                map
            },
        )
    };
    matches!((parse(a), parse(b)), (Ok(a), Ok(b)) if a == b)
}

/// A stored event, as reads return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The event's unique id.
    pub id: EventId,
    /// The stream it belongs to.
    pub stream: StreamName,
    /// The event type.
    pub event_type: EventType,
    /// The payload.
    pub data: EventData,
    /// The metadata object.
    pub metadata: Metadata,
    /// Tags for DCB queries.
    pub tags: Vec<Tag>,
    /// The CloudEvents `source`, if the client gave one.
    pub source: Option<String>,
    /// When the store recorded it.
    pub recorded_at: Timestamp,
    /// Its revision in its stream.
    pub revision: Revision,
    /// Its global position.
    pub position: Position,
}

impl RecordedEvent {
    /// About how many bytes the event holds: its data, metadata, names, tags and source. What
    /// read pages and consumer-group windows are bounded by.
    pub fn size(&self) -> usize {
        self.data.bytes().len()
            + self.data.content_type().len()
            + self.metadata.as_str().len()
            + self.stream.as_str().len()
            + self.event_type.as_str().len()
            + self.tags.iter().map(|t| t.as_str().len()).sum::<usize>()
            + self.source.as_ref().map_or(0, String::len)
            + 64
    }
}

/// A DCB append condition: fail if any event matching `query` exists after `after`
/// (or at all, when `after` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendCondition {
    /// Events that must not exist.
    pub query: Query,
    /// Only events at positions strictly greater than this count.
    pub after: Option<Position>,
}

/// One or more events for one stream, written atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    /// The stream to append to.
    pub stream: StreamName,
    /// The optimistic-concurrency check on the stream.
    pub expected: ExpectedRevision,
    /// The optional DCB condition, checked in the same atomic step.
    pub condition: Option<AppendCondition>,
    /// The events, in order; at least one.
    pub events: Vec<ProposedEvent>,
}

/// Where an append's events landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppendResult {
    /// Position of the first event.
    pub first_position: Position,
    /// Position of the last event.
    pub last_position: Position,
    /// Revision of the first event in its stream.
    pub first_revision: Revision,
    /// Revision of the last event in its stream.
    pub last_revision: Revision,
    /// True when this was an idempotent retry of an append already stored: nothing was written
    /// and the positions are those of the original append.
    pub replayed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_revision_round_trips_on_the_wire() {
        for (text, value) in [
            (r#""any""#, ExpectedRevision::Any),
            (r#""noStream""#, ExpectedRevision::NoStream),
            (r#""streamExists""#, ExpectedRevision::StreamExists),
            ("7", ExpectedRevision::Exact(Revision(7))),
        ] {
            let parsed: ExpectedRevision = serde_json::from_str(text).unwrap();
            assert_eq!(parsed, value);
            assert_eq!(serde_json::to_string(&value).unwrap(), text);
        }
        for bad in [r#""nostream""#, "-1", "1.5", "null"] {
            assert!(
                serde_json::from_str::<ExpectedRevision>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_retry_with_another_trace_context_is_the_same_event() {
        let mut proposed =
            ProposedEvent::new(EventType::new("A").unwrap(), EventData::json("{}").unwrap());
        proposed.metadata = Metadata::new(
            r#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","k":1}"#,
        )
        .unwrap();
        let stored = RecordedEvent {
            id: proposed.id,
            stream: StreamName::new("s").unwrap(),
            event_type: proposed.event_type.clone(),
            data: proposed.data.clone(),
            metadata: Metadata::new(
                r#"{"k":1,"traceparent":"00-11111111111111111111111111111111-2222222222222222-00","tracestate":"x=y"}"#,
            )
            .unwrap(),
            tags: Vec::new(),
            source: None,
            recorded_at: Timestamp(0),
            revision: Revision(0),
            position: Position(0),
        };
        assert_eq!(proposed.differs_from(&stored), None);
        proposed.metadata = Metadata::new(r#"{"k":2}"#).unwrap();
        assert_eq!(proposed.differs_from(&stored), Some("the metadata differs"));
    }

    #[test]
    fn expected_revision_checks() {
        use ExpectedRevision::*;
        assert!(Any.is_satisfied_by(None));
        assert!(NoStream.is_satisfied_by(None));
        assert!(!NoStream.is_satisfied_by(Some(Revision(0))));
        assert!(StreamExists.is_satisfied_by(Some(Revision(3))));
        assert!(!StreamExists.is_satisfied_by(None));
        assert!(Exact(Revision(3)).is_satisfied_by(Some(Revision(3))));
        assert!(!Exact(Revision(3)).is_satisfied_by(Some(Revision(4))));
        assert!(!Exact(Revision(0)).is_satisfied_by(None));
    }

    #[test]
    fn json_data_and_metadata_are_checked() {
        assert!(EventData::json("{\"a\":1}").is_ok());
        assert!(EventData::json("{").is_err());
        assert!(
            EventData::with_content_type("application/cloudevents+json", b"[1]".to_vec()).is_ok()
        );
        assert!(EventData::with_content_type("application/vnd.x+json", b"nope".to_vec()).is_err());
        assert!(EventData::with_content_type("image/png", vec![0, 159, 146]).is_ok());
        assert!(EventData::with_content_type("", vec![]).is_err());
        assert!(Metadata::new("{\"correlationId\":\"x\"}").is_ok());
        assert!(Metadata::new("[1]").is_err());
    }
}
