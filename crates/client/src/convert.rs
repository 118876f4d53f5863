//! Between `skald-core`'s types and the gRPC messages, and from gRPC statuses to
//! [`skald_core::Error`], so that a remote store answers exactly as an embedded one.

use std::collections::HashMap;

use skald_core::{
    AppendCondition, AppendRequest, AppendResult, Direction, Error, EventData, EventId, EventType,
    ExpectedRevision, Metadata, Position, ProposedEvent, Query, ReadSource, RecordedEvent,
    Revision, StreamName, Tag, Timestamp,
};
use skald_proto::v1 as pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

pub(crate) fn query(q: &Query) -> pb::Query {
    pb::Query {
        items: q
            .items
            .iter()
            .map(|item| pb::QueryItem {
                types: item.types.iter().map(|t| t.as_str().to_owned()).collect(),
                tags: item.tags.iter().map(|t| t.as_str().to_owned()).collect(),
            })
            .collect(),
    }
}

pub(crate) fn source(source: &ReadSource) -> pb::Source {
    let kind = match source {
        ReadSource::Stream(s) => pb::source::Kind::Stream(s.as_str().to_owned()),
        ReadSource::Category(c) => pb::source::Kind::Category(c.as_str().to_owned()),
        ReadSource::Query(q) => pb::source::Kind::Query(query(q)),
        ReadSource::All(None) => pb::source::Kind::All(pb::AllFilter::default()),
        // A filter of one item is what the global log's `types`/`tags` filter is; any other
        // query over the global log reads the same events as that query.
        ReadSource::All(Some(q)) if q.items.len() == 1 => pb::source::Kind::All(pb::AllFilter {
            types: q.items[0]
                .types
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
            tags: q.items[0]
                .tags
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
        }),
        ReadSource::All(Some(q)) => pb::source::Kind::Query(query(q)),
    };
    pb::Source { kind: Some(kind) }
}

pub(crate) fn direction(d: Direction) -> i32 {
    match d {
        Direction::Forward => pb::Direction::Forward as i32,
        Direction::Backward => pb::Direction::Backward as i32,
    }
}

fn proposed(e: &ProposedEvent) -> pb::ProposedEvent {
    pb::ProposedEvent {
        id: e.id.0.to_string(),
        r#type: e.event_type.as_str().to_owned(),
        content_type: e.data.content_type().to_owned(),
        data: e.data.bytes().to_vec(),
        metadata: e.metadata.as_str().to_owned(),
        tags: e.tags.iter().map(|t| t.as_str().to_owned()).collect(),
        source: e.source.clone(),
    }
}

pub(crate) fn append_request(r: &AppendRequest) -> pb::AppendRequest {
    use pb::append_request::ExpectedRevision as E;
    let expected_revision = Some(match r.expected {
        ExpectedRevision::Any => E::ExpectedState(pb::StreamState::Any as i32),
        ExpectedRevision::NoStream => E::ExpectedState(pb::StreamState::NoStream as i32),
        ExpectedRevision::StreamExists => E::ExpectedState(pb::StreamState::Exists as i32),
        ExpectedRevision::Exact(Revision(n)) => E::ExpectedExact(n),
    });
    pb::AppendRequest {
        stream: r.stream.as_str().to_owned(),
        expected_revision,
        condition: r
            .condition
            .as_ref()
            .map(|c: &AppendCondition| pb::AppendCondition {
                fail_if_events_match: Some(query(&c.query)),
                after: c.after.map(|p| p.0),
            }),
        events: r.events.iter().map(proposed).collect(),
    }
}

pub(crate) fn append_result(r: pb::AppendResponse) -> AppendResult {
    AppendResult {
        first_position: Position(r.first_position),
        last_position: Position(r.last_position),
        first_revision: Revision(r.first_revision),
        last_revision: Revision(r.last_revision),
        replayed: r.replayed,
    }
}

/// A stored event from the wire. The server checked every name when it was appended.
pub(crate) fn recorded(e: pb::RecordedEvent) -> Result<RecordedEvent, Error> {
    let id = uuid::Uuid::parse_str(&e.id)
        .map_err(|err| Error::Io(format!("the server sent an event id {:?}: {err}", e.id)))?;
    Ok(RecordedEvent {
        id: EventId(id),
        stream: StreamName::from_stored(e.stream),
        event_type: EventType::from_stored(e.r#type),
        data: EventData::from_stored(e.content_type, e.data),
        metadata: Metadata::from_stored(e.metadata),
        tags: e.tags.into_iter().map(Tag::from_stored).collect(),
        source: e.source,
        recorded_at: Timestamp(e.recorded_at_micros),
        revision: Revision(e.revision),
        position: Position(e.position),
    })
}

/// Whether the server ended a subscription because its reader fell behind (problem kind
/// `subscriber-stalled`): the reader resumes by subscribing again.
pub(crate) fn is_stall(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && status
            .get_error_details()
            .error_info()
            .is_some_and(|i| i.domain == "skald" && i.reason == "subscriber-stalled")
}

/// The [`Error`] a status stands for: the server's problem kind and members (from the
/// `google.rpc.ErrorInfo` in the details) back in the shape the embedded store gives.
pub(crate) fn error(status: Status) -> Error {
    let details = status.get_error_details();
    let Some(info) = details.error_info().filter(|i| i.domain == "skald") else {
        // No Skald problem: the transport failed, or something in between answered.
        return match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                Error::Unavailable(format!(
                    "the server could not be reached: {}",
                    status.message()
                ))
            }
            Code::Unauthenticated => refused("unauthenticated", status.message()),
            Code::PermissionDenied => refused("forbidden", status.message()),
            code => Error::Io(format!(
                "the server answered {code:?}: {}",
                status.message()
            )),
        };
    };
    let m: &HashMap<String, String> = &info.metadata;
    let detail = status.message().to_owned();
    let number = |key: &str| m.get(key).and_then(|v| v.parse::<u64>().ok());
    match info.reason.as_str() {
        "wrong-expected-revision" => {
            let expected = m
                .get("expectedRevision")
                .and_then(|v| parse_expected(v))
                .unwrap_or(ExpectedRevision::Any);
            Error::WrongExpectedRevision {
                stream: StreamName::from_stored(m.get("stream").cloned().unwrap_or_default()),
                expected,
                actual: number("actualRevision").map(Revision),
            }
        }
        "append-condition-failed" => Error::ConditionFailed {
            position: Position(number("position").unwrap_or(0)),
        },
        "event-id-reused" => Error::IdReused {
            id: EventId(
                m.get("id")
                    .and_then(|v| uuid::Uuid::parse_str(v).ok())
                    .unwrap_or_default(),
            ),
            position: Position(number("position").unwrap_or(0)),
            reason: detail,
            stream: m.get("stream").map(|s| StreamName::from_stored(s.clone())),
        },
        "stream-not-found" => Error::StreamNotFound(StreamName::from_stored(
            m.get("stream").cloned().unwrap_or_default(),
        )),
        "group-not-found" => Error::GroupNotFound(m.get("group").cloned().unwrap_or_default()),
        "group-exists" => Error::GroupExists(m.get("group").cloned().unwrap_or_default()),
        "saga-not-found" => Error::SagaNotFound(detail),
        "invalid-saga-definition" => Error::InvalidSaga(detail),
        "saga-conflict" => Error::SagaConflict(detail),
        "invalid-event" | "malformed-request" | "payload-too-large" => {
            Error::InvalidEvent { reason: detail }
        }
        "storage-full" => Error::StorageFull(detail),
        "unavailable" | "not-ready" => Error::Unavailable(detail),
        "corruption" => Error::Corruption {
            file: "(on the server)".to_owned(),
            offset: 0,
            reason: detail,
        },
        kind @ ("unauthenticated" | "forbidden" | "rate-limited") => refused(kind, &detail),
        _ => Error::Io(detail),
    }
}

fn refused(kind: &str, detail: &str) -> Error {
    Error::Refused {
        kind: kind.to_owned(),
        detail: detail.to_owned(),
    }
}

fn parse_expected(text: &str) -> Option<ExpectedRevision> {
    Some(match text {
        "any" => ExpectedRevision::Any,
        "noStream" => ExpectedRevision::NoStream,
        "streamExists" => ExpectedRevision::StreamExists,
        n => ExpectedRevision::Exact(Revision(n.parse().ok()?)),
    })
}
