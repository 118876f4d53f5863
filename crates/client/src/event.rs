//! Typed events: a serde enum whose variants are the stored event types, with a version per
//! type, the DCB tags each event carries, and upcasters that bring old versions up to date
//! when they are read.
//!
//! Stored form: the event type is the variant's name (or its `#[serde(rename)]`), the data is
//! its fields as JSON, the tags are those [`Event::tags`] gives, and a version above 1 is kept
//! in the metadata as `{"eventVersion": N}` (none means 1, so events written before a type had
//! versions read as version 1).

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use skald_core::{
    EventData, EventType, Metadata, ProposedEvent, Query, QueryItem, RecordedEvent, Tag,
};

/// Implements [`Event`] for a serde enum; see the trait.
pub use skald_client_derive::Event;

/// A domain event as a Rust type: an enum serialized by serde with
/// `#[serde(tag = "type", content = "data")]`, so that each variant's name is the stored event
/// type and its fields the stored data.
///
/// Derive it rather than writing it:
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use skald_client::aggregate::{Event, Upcaster};
///
/// #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
/// #[serde(tag = "type", content = "data")]
/// #[event(upcasters = upcasters)]
/// enum AccountEvent {
///     Opened { #[tag("account")] id: String, owner: String },
///     // Version 1 was `MoneyDeposited { cents }`.
///     #[event(version = 2)]
///     Deposited { #[tag("account")] id: String, amount: u64 },
/// }
///
/// fn upcasters() -> Vec<Upcaster> {
///     vec![Upcaster::new("MoneyDeposited", 1, |data| {
///         ("Deposited".to_owned(), serde_json::json!({"id": data["id"], "amount": data["cents"]}))
///     })]
/// }
///
/// assert_eq!(AccountEvent::TYPES, ["Opened", "Deposited"]);
/// assert_eq!(AccountEvent::version("Deposited"), 2);
/// let tags = AccountEvent::Opened { id: "7".into(), owner: "ada".into() }.tags().unwrap();
/// assert_eq!(tags[0].as_str(), "account:7");
/// ```
///
/// The derive refuses, at compile time, an enum stored any other way than
/// `{"type": .., "data": ..}`:
///
/// ```compile_fail
/// use skald_client::aggregate::Event;
///
/// #[derive(Event, serde::Serialize, serde::Deserialize)]
/// enum Forgotten { Happened { at: u64 } }
/// ```
///
/// Nor a variant written any other way (untagged, skipped, renamed for all):
///
/// ```compile_fail
/// use skald_client::aggregate::Event;
///
/// #[derive(Event, serde::Serialize, serde::Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum Loose { #[serde(untagged)] Anything(u64) }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stored event types of the variants, in order.
    const TYPES: &'static [&'static str];

    /// Other names a variant was stored under and still reads (its `#[serde(alias)]`es).
    const ALIASES: &'static [&'static str] = &[];

    /// Whether its version is checked: every typed enum; not [`AnyEvent`], which takes events
    /// as they are stored.
    const VERSIONED: bool = true;

    /// Whether a stored event of `event_type` (brought up to date) is one of these: one of
    /// [`Event::TYPES`] or [`Event::ALIASES`] unless overridden ([`AnyEvent`] takes every
    /// type).
    fn accepts(event_type: &str) -> bool {
        Self::TYPES.contains(&event_type) || Self::ALIASES.contains(&event_type)
    }

    /// Every stored type these events may be read from: the types, the aliases, and the
    /// types the upcasters start from (old names of renamed types). What a query of these
    /// events lists, so that no old event falls outside it.
    fn stored_types() -> Vec<String> {
        let mut types: Vec<String> = Self::TYPES
            .iter()
            .chain(Self::ALIASES)
            .map(|t| (*t).to_owned())
            .collect();
        for upcaster in Self::upcasters() {
            if !types.iter().any(|t| t == upcaster.event_type) {
                types.push(upcaster.event_type.to_owned());
            }
        }
        types
    }

    /// The version `event_type` is written at now; 1 unless the variant says otherwise.
    fn version(event_type: &str) -> u32 {
        let _ = event_type;
        1
    }

    /// The DCB tags this event carries (the fields marked `#[tag]`).
    fn tags(&self) -> Result<Vec<Tag>, CodecError> {
        Ok(Vec::new())
    }

    /// The steps from older versions of stored events to the current ones.
    fn upcasters() -> Vec<Upcaster> {
        Vec::new()
    }

    /// The query of every event of these types that carries all of `tags`.
    fn query(tags: Vec<Tag>) -> Query {
        Query {
            items: vec![Self::query_item(tags)],
        }
    }

    /// One item of a query: events of these types (all of [`Event::stored_types`]) that
    /// carry all of `tags`.
    fn query_item(tags: Vec<Tag>) -> QueryItem {
        QueryItem {
            types: Self::stored_types()
                .into_iter()
                .map(EventType::from_stored)
                .collect(),
            tags,
        }
    }
}

/// One step of an upcaster chain: reads a stored event of `event_type` at `version` and gives
/// its type and data at `version + 1` (the type may change, for a rename).
#[derive(Clone, Copy)]
pub struct Upcaster {
    event_type: &'static str,
    version: u32,
    upcast: fn(Value) -> (String, Value),
}

impl Upcaster {
    /// The step from `version` of `event_type` to the next version.
    pub fn new(
        event_type: &'static str,
        version: u32,
        upcast: fn(Value) -> (String, Value),
    ) -> Self {
        Self {
            event_type,
            version,
            upcast,
        }
    }
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Upcaster({} v{})", self.event_type, self.version)
    }
}

/// Why a typed event could not be written or read: what and where, and the serde error
/// underneath when there is one.
#[derive(Debug)]
pub struct CodecError {
    message: String,
    source: Option<serde_json::Error>,
}

impl CodecError {
    /// An error that says `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    fn json(message: String, source: serde_json::Error) -> Self {
        Self {
            message: format!("{message}: {source}"),
            source: Some(source),
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// The tag `name:value`, for `#[tag]` fields.
pub fn tag(name: &str, value: &impl fmt::Display) -> Result<Tag, CodecError> {
    Tag::new(format!("{name}:{value}"))
        .map_err(|e| CodecError::new(format!("the tag of field {name}: {e}")))
}

/// The type and data a typed event is stored as.
pub fn encode<E: Event>(event: &E) -> Result<(EventType, EventData), CodecError> {
    let value = serde_json::to_value(event)
        .map_err(|e| CodecError::json("the event does not serialize".to_owned(), e))?;
    let Value::Object(mut fields) = value else {
        return Err(CodecError::new(
            "an event must serialize as {\"type\": .., \"data\": ..}: mark the enum \
             #[serde(tag = \"type\", content = \"data\")]",
        ));
    };
    let Some(Value::String(name)) = fields.remove("type") else {
        return Err(CodecError::new(
            "the event has no \"type\": mark the enum #[serde(tag = \"type\", content = \"data\")]",
        ));
    };
    // A unit variant has no "data": it is stored as an empty object.
    let data = fields
        .remove("data")
        .unwrap_or(Value::Object(Default::default()));
    let event_type = EventType::new(name).map_err(|e| CodecError::new(e.to_string()))?;
    let data = EventData::json(data.to_string()).map_err(|e| CodecError::new(e.to_string()))?;
    Ok((event_type, data))
}

/// A new event to append, with a fresh id, its tags, and its version when above 1 (in the
/// metadata as `{"eventVersion": N}`: metadata set afterwards must keep that key, or the event
/// reads back as version 1).
pub fn propose<E: Event>(event: &E) -> Result<ProposedEvent, CodecError> {
    let (event_type, data) = encode(event)?;
    let version = E::version(event_type.as_str());
    let mut proposed = ProposedEvent::new(event_type, data);
    proposed.tags = event.tags()?;
    if version > 1 {
        proposed.metadata = Metadata::new(format!(r#"{{"eventVersion":{version}}}"#))
            .map_err(|e| CodecError::new(e.to_string()))?;
    }
    Ok(proposed)
}

/// The version a stored event was written at: `eventVersion` in its metadata, or 1.
fn stored_version(event: &RecordedEvent) -> Result<u32, CodecError> {
    let metadata = event.metadata.as_str();
    if !metadata.contains("eventVersion") {
        return Ok(1);
    }
    let value: Value = serde_json::from_str(metadata).map_err(|e| {
        CodecError::json(
            format!("the metadata of the event at position {}", event.position.0),
            e,
        )
    })?;
    match value.get("eventVersion") {
        None => Ok(1),
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                CodecError::new(format!(
                    "the event at position {} has eventVersion {v}, not a version",
                    event.position.0
                ))
            }),
    }
}

/// A stored event as `E`, brought to the current version by the upcasters. An event of a
/// type `E` does not know is an error; [`decode_known`] passes over those.
pub fn decode<E: Event>(event: &RecordedEvent) -> Result<E, CodecError> {
    match decode_known(event)? {
        Some(decoded) => Ok(decoded),
        None => Err(CodecError::new(format!(
            "the event at position {} is a {:?}, which is none of {:?}",
            event.position.0,
            event.event_type.as_str(),
            E::TYPES
        ))),
    }
}

/// A stored event as `E`, or `None` when, brought up to date, its type is none of `E`'s.
pub fn decode_known<E: Event>(event: &RecordedEvent) -> Result<Option<E>, CodecError> {
    // An AnyEvent takes events as they are stored, whatever their metadata says.
    let mut version = if E::VERSIONED {
        stored_version(event)?
    } else {
        1
    };
    let mut event_type = event.event_type.as_str().to_owned();
    let upcasters = E::upcasters();
    let stale = upcasters
        .iter()
        .any(|u| u.event_type == event_type && u.version == version);
    if !stale && !E::accepts(&event_type) {
        return Ok(None);
    }
    let mut data: Value = if event.data.bytes().is_empty() {
        Value::Object(Default::default())
    } else if !E::VERSIONED {
        // Taken as stored: data that is not JSON (another content type) is left in the
        // record, and `data` is null.
        serde_json::from_slice(event.data.bytes()).unwrap_or(Value::Null)
    } else {
        serde_json::from_slice(event.data.bytes()).map_err(|e| {
            CodecError::json(
                format!(
                    "the event at position {} ({}) has data that is not JSON",
                    event.position.0,
                    event.event_type.as_str()
                ),
                e,
            )
        })?
    };
    // Each step raises the version, so the chain ends.
    while let Some(step) = upcasters
        .iter()
        .find(|u| u.event_type == event_type && u.version == version)
    {
        (event_type, data) = (step.upcast)(data);
        version += 1;
    }
    if !E::accepts(&event_type) {
        return Ok(None);
    }
    let current = E::version(&event_type);
    if E::VERSIONED && version != current {
        return Err(CodecError::new(if version > current {
            format!(
                "the event at position {} is {event_type} version {version}, and this code \
                 knows version {current}: it was written by newer code, or a renamed type \
                 started its versions again (they must go on from the old name's)",
                event.position.0
            )
        } else {
            format!(
                "the event at position {} is {event_type} version {version}, and no upcaster \
                 takes it from there to version {current}",
                event.position.0
            )
        }));
    }
    let unit = data.as_object().is_some_and(|o| o.is_empty());
    let decoded = serde_json::from_value(serde_json::json!({"type": event_type, "data": data}));
    let decoded = match decoded {
        // A unit variant: serde reads it without "data".
        Err(_) if unit => serde_json::from_value(serde_json::json!({"type": event_type})),
        decoded => decoded,
    };
    decoded.map(Some).map_err(|e| {
        CodecError::json(
            format!(
                "the event at position {} of type {event_type:?} does not decode",
                event.position.0
            ),
            e,
        )
    })
}

/// A decoded event with where and when it was stored.
#[derive(Clone, Debug)]
pub struct Envelope<E> {
    /// The event, up to date.
    pub event: E,
    /// The stored event it was decoded from (stream, revision, position, id, time, tags,
    /// metadata).
    pub recorded: RecordedEvent,
}

impl<E: Event> Envelope<E> {
    /// `recorded` decoded as `E`, or `None` when its type is none of `E`'s.
    pub fn decode(recorded: RecordedEvent) -> Result<Option<Self>, CodecError> {
        Ok(decode_known(&recorded)?.map(|event| Self { event, recorded }))
    }
}

/// Any event, not decoded into a type of its own: its stored type and its data as JSON. For
/// read models that take in every event of their source (an audit trail, a search index).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AnyEvent {
    /// The stored event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The data (an empty object for an event without data).
    pub data: Value,
}

impl Event for AnyEvent {
    /// None listed: it takes every type, and a query built from it matches any type.
    const TYPES: &'static [&'static str] = &[];
    const VERSIONED: bool = false;

    fn accepts(_: &str) -> bool {
        true
    }
}
