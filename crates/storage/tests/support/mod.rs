//! What the storage tests share: the trivially correct in-memory model of the store, and the
//! names, types and tags their random operations draw from.

#![allow(dead_code)]

pub mod model_run;

use skald_core::*;

pub struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_700_000_000_000_000)
    }
}

pub const STREAMS: [&str; 4] = ["order-1", "order-2", "user-1", "audit"];
pub const TYPES: [&str; 3] = ["Placed", "Paid", "Shipped"];
pub const TAGS: [&str; 3] = ["customer:1", "customer:2", "region:eu"];

#[derive(Clone, Debug)]
pub struct ItemSpec {
    pub types: Vec<usize>,
    pub tags: Vec<usize>,
}

pub fn query(items: &[ItemSpec]) -> Query {
    Query::new(
        items
            .iter()
            .map(|i| QueryItem {
                types: i
                    .types
                    .iter()
                    .map(|t| EventType::new(TYPES[*t]).unwrap())
                    .collect(),
                tags: i.tags.iter().map(|t| Tag::new(TAGS[*t]).unwrap()).collect(),
            })
            .collect(),
    )
    .unwrap()
}

/// The trivially correct model: a vector of events.
#[derive(Default, Clone)]
pub struct Model {
    pub log: Vec<RecordedEvent>,
}

impl Model {
    pub fn last_revision(&self, stream: &StreamName) -> Option<Revision> {
        self.log
            .iter()
            .rev()
            .find(|e| &e.stream == stream)
            .map(|e| e.revision)
    }

    pub fn append(&mut self, r: &AppendRequest) -> Result<AppendResult, Error> {
        let stored: Vec<(&ProposedEvent, &RecordedEvent)> = r
            .events
            .iter()
            .filter_map(|e| self.log.iter().find(|s| s.id == e.id).map(|s| (e, s)))
            .collect();
        if let Some((e, s)) = stored.first() {
            let reused = |id, p: Position| {
                Err(Error::IdReused {
                    id,
                    position: p,
                    reason: String::new(),
                    stream: None,
                })
            };
            if stored.len() < r.events.len() {
                return reused(e.id, s.position);
            }
            for (i, (e, s)) in stored.iter().enumerate() {
                if s.stream != r.stream
                    || s.position.0 != stored[0].1.position.0 + i as u64
                    || e.differs_from(s).is_some()
                {
                    return reused(e.id, s.position);
                }
            }
            let last = stored.last().unwrap().1;
            return Ok(AppendResult {
                first_position: s.position,
                last_position: last.position,
                first_revision: s.revision,
                last_revision: last.revision,
                replayed: true,
            });
        }
        let current = self.last_revision(&r.stream);
        if !r.expected.is_satisfied_by(current) {
            return Err(Error::WrongExpectedRevision {
                stream: r.stream.clone(),
                expected: r.expected,
                actual: current,
            });
        }
        if let Some(c) = &r.condition {
            let from = c.after.map_or(0, |p| p.0 + 1);
            if let Some(e) = self
                .log
                .iter()
                .skip(from as usize)
                .find(|e| c.query.matches_event(e))
            {
                return Err(Error::ConditionFailed {
                    position: e.position,
                });
            }
        }
        let first_revision = current.map_or(0, |r| r.0 + 1);
        let first_position = self.log.len() as u64;
        for (i, e) in r.events.iter().enumerate() {
            self.log.push(RecordedEvent {
                id: e.id,
                stream: r.stream.clone(),
                event_type: e.event_type.clone(),
                data: e.data.clone(),
                metadata: e.metadata.clone(),
                tags: e.tags.clone(),
                source: e.source.clone(),
                recorded_at: FixedClock.now(),
                revision: Revision(first_revision + i as u64),
                position: Position(first_position + i as u64),
            });
        }
        let n = r.events.len() as u64;
        Ok(AppendResult {
            first_position: Position(first_position),
            last_position: Position(first_position + n - 1),
            first_revision: Revision(first_revision),
            last_revision: Revision(first_revision + n - 1),
            replayed: false,
        })
    }

    pub fn read(&self, r: &ReadRequest) -> ReadPage {
        let limit = r.limit.min(MAX_READ_PAGE);
        let events: Vec<RecordedEvent> = match &r.source {
            ReadSource::Stream(s) => {
                let mut v: Vec<_> = self
                    .log
                    .iter()
                    .filter(|e| &e.stream == s)
                    .cloned()
                    .collect();
                match r.direction {
                    Direction::Forward => v.retain(|e| e.revision.0 >= r.from.unwrap_or(0)),
                    Direction::Backward => {
                        v.retain(|e| e.revision.0 <= r.from.unwrap_or(u64::MAX));
                        v.reverse();
                    }
                }
                v
            }
            ReadSource::All(q) => self
                .log
                .iter()
                .skip(r.from.unwrap_or(0) as usize)
                .filter(|e| q.as_ref().is_none_or(|q| q.matches_event(e)))
                .cloned()
                .collect(),
            ReadSource::Query(q) => self
                .log
                .iter()
                .skip(r.from.unwrap_or(0) as usize)
                .filter(|e| q.matches_event(e))
                .cloned()
                .collect(),
            ReadSource::Category(c) => self
                .log
                .iter()
                .skip(r.from.unwrap_or(0) as usize)
                .filter(|e| &e.stream.category() == c)
                .cloned()
                .collect(),
        };
        let events: Vec<_> = events.into_iter().take(limit).collect();
        let next = if events.len() == limit && limit > 0 {
            let last = events.last().unwrap();
            match (&r.source, r.direction) {
                (ReadSource::Stream(_), Direction::Forward) => Some(last.revision.0 + 1),
                (ReadSource::Stream(_), Direction::Backward) => last.revision.0.checked_sub(1),
                _ => Some(last.position.0 + 1),
            }
        } else {
            None
        };
        ReadPage { events, next }
    }
}

/// Errors compare by kind and the fields a client relies on; `IdReused` reasons are prose.
pub fn same_error(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (
            Error::IdReused {
                id: i1,
                position: p1,
                ..
            },
            Error::IdReused {
                id: i2,
                position: p2,
                ..
            },
        ) => i1 == i2 && p1 == p2,
        _ => a == b,
    }
}
