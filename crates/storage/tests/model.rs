//! The model-based test: random sequences of appends (every kind of expected revision, DCB
//! conditions, idempotent retries, ids reused for other events), reads of every kind, and
//! close/reopen, run against the real store and a trivially correct in-memory model, compared
//! after every step.

use std::sync::Arc;

use proptest::prelude::*;
use skald_core::*;
use skald_storage::{Options, Store};

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_700_000_000_000_000)
    }
}

const STREAMS: [&str; 4] = ["order-1", "order-2", "user-1", "audit"];
const TYPES: [&str; 3] = ["Placed", "Paid", "Shipped"];
const TAGS: [&str; 3] = ["customer:1", "customer:2", "region:eu"];

#[derive(Clone, Debug)]
enum Expect {
    Any,
    NoStream,
    Exists,
    Current,
    Off(u64),
}

#[derive(Clone, Debug)]
enum Ids {
    Fresh,
    /// Resend an earlier append exactly (by index into the appends sent so far).
    Retry(usize),
    /// Take the id of an earlier event (by index) for a different event.
    Reuse(usize),
}

#[derive(Clone, Debug)]
struct ItemSpec {
    types: Vec<usize>,
    tags: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        stream: usize,
        expect: Expect,
        events: Vec<(usize, Vec<usize>)>,
        condition: Option<(Vec<ItemSpec>, Option<u64>)>,
        ids: Ids,
    },
    ReadStream {
        stream: usize,
        backward: bool,
        from: Option<u64>,
        limit: usize,
    },
    ReadAll {
        from: Option<u64>,
        limit: usize,
    },
    ReadCategory {
        category: usize,
        from: Option<u64>,
        limit: usize,
    },
    ReadQuery {
        items: Vec<ItemSpec>,
        from: Option<u64>,
        limit: usize,
    },
    Reopen,
}

fn item_spec() -> impl Strategy<Value = ItemSpec> {
    (
        proptest::collection::vec(0..TYPES.len(), 0..3),
        proptest::collection::vec(0..TAGS.len(), 0..3),
    )
        .prop_map(|(types, tags)| ItemSpec { types, tags })
}

fn op() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![
        1 => Just(Expect::Any),
        1 => Just(Expect::NoStream),
        1 => Just(Expect::Exists),
        3 => Just(Expect::Current),
        1 => (0u64..6).prop_map(Expect::Off),
    ];
    let ids = prop_oneof![
        6 => Just(Ids::Fresh),
        2 => (0usize..1000).prop_map(Ids::Retry),
        1 => (0usize..1000).prop_map(Ids::Reuse),
    ];
    let event = (
        0..TYPES.len(),
        proptest::collection::vec(0..TAGS.len(), 0..3),
    );
    let condition = proptest::option::weighted(
        0.3,
        (
            proptest::collection::vec(item_spec(), 1..3),
            proptest::option::of(0u64..40),
        ),
    );
    let limit = prop_oneof![1usize..4, Just(100usize)];
    prop_oneof![
        8 => (0..STREAMS.len(), expect, proptest::collection::vec(event, 1..4), condition, ids)
            .prop_map(|(stream, expect, events, condition, ids)| Op::Append { stream, expect, events, condition, ids }),
        2 => (0..STREAMS.len(), any::<bool>(), proptest::option::of(0u64..8), limit.clone())
            .prop_map(|(stream, backward, from, limit)| Op::ReadStream { stream, backward, from, limit }),
        2 => (proptest::option::of(0u64..40), limit.clone()).prop_map(|(from, limit)| Op::ReadAll { from, limit }),
        1 => (0usize..3, proptest::option::of(0u64..40), limit.clone())
            .prop_map(|(category, from, limit)| Op::ReadCategory { category, from, limit }),
        2 => (proptest::collection::vec(item_spec(), 1..3), proptest::option::of(0u64..40), limit)
            .prop_map(|(items, from, limit)| Op::ReadQuery { items, from, limit }),
        1 => Just(Op::Reopen),
    ]
}

fn query(items: &[ItemSpec]) -> Query {
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
#[derive(Default)]
struct Model {
    log: Vec<RecordedEvent>,
}

impl Model {
    fn last_revision(&self, stream: &StreamName) -> Option<Revision> {
        self.log
            .iter()
            .rev()
            .find(|e| &e.stream == stream)
            .map(|e| e.revision)
    }

    fn append(&mut self, r: &AppendRequest) -> Result<AppendResult, Error> {
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

    fn read(&self, r: &ReadRequest) -> ReadPage {
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
fn same_error(a: &Error, b: &Error) -> bool {
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

struct Harness {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    store: Option<Store>,
    model: Model,
    sent: Vec<AppendRequest>,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut h = Self {
            runtime,
            dir,
            store: None,
            model: Model::default(),
            sent: Vec::new(),
        };
        h.open();
        h
    }

    fn open(&mut self) {
        let options = Options {
            data_dir: self.dir.path().to_path_buf(),
            durability: Durability::None,
            // Tiny segments, so that sequences cross segment boundaries.
            segment_bytes: 2048,
            // Tiny memtables, so that reads merge redb with frozen and active memtables while
            // the flusher runs.
            memtable_events: 3,
            ..Options::default()
        };
        let (store, _) = Store::open_with_clock(options, Arc::new(FixedClock)).unwrap();
        self.store = Some(store);
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn build_append(
        &self,
        stream: usize,
        expect: &Expect,
        events: &[(usize, Vec<usize>)],
        condition: &Option<(Vec<ItemSpec>, Option<u64>)>,
        ids: &Ids,
    ) -> AppendRequest {
        if let Ids::Retry(i) = ids
            && !self.sent.is_empty()
        {
            return self.sent[i % self.sent.len()].clone();
        }
        let stream = StreamName::new(STREAMS[stream]).unwrap();
        let current = self.model.last_revision(&stream);
        let expected = match expect {
            Expect::Any => ExpectedRevision::Any,
            Expect::NoStream => ExpectedRevision::NoStream,
            Expect::Exists => ExpectedRevision::StreamExists,
            Expect::Current => current.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact),
            Expect::Off(r) => ExpectedRevision::Exact(Revision(*r)),
        };
        let mut events: Vec<ProposedEvent> = events
            .iter()
            .enumerate()
            .map(|(i, (t, tags))| {
                let mut e = ProposedEvent::new(
                    EventType::new(TYPES[*t]).unwrap(),
                    EventData::json(format!("{{\"n\":{i},\"at\":{}}}", self.model.log.len()))
                        .unwrap(),
                );
                let mut tags: Vec<Tag> = tags.iter().map(|t| Tag::new(TAGS[*t]).unwrap()).collect();
                tags.dedup();
                e.tags = tags;
                e
            })
            .collect();
        if let Ids::Reuse(i) = ids
            && !self.model.log.is_empty()
        {
            events[0].id = self.model.log[i % self.model.log.len()].id;
        }
        AppendRequest {
            stream,
            expected,
            condition: condition.as_ref().map(|(items, after)| AppendCondition {
                query: query(items),
                after: after.map(Position),
            }),
            events,
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Append {
                stream,
                expect,
                events,
                condition,
                ids,
            } => {
                let request = self.build_append(*stream, expect, events, condition, ids);
                let expected = self.model.append(&request);
                let actual = self.runtime.block_on(self.store().append(request.clone()));
                match (&expected, &actual) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "append {request:?}"),
                    (Err(a), Err(b)) => {
                        assert!(same_error(a, b), "append {request:?}: model {a}, store {b}")
                    }
                    _ => panic!("append {request:?}: model {expected:?}, store {actual:?}"),
                }
                if expected.is_ok() {
                    self.sent.push(request);
                }
            }
            Op::ReadStream {
                stream,
                backward,
                from,
                limit,
            } => self.compare_read(ReadRequest {
                source: ReadSource::Stream(StreamName::new(STREAMS[*stream]).unwrap()),
                from: *from,
                direction: if *backward {
                    Direction::Backward
                } else {
                    Direction::Forward
                },
                limit: *limit,
            }),
            Op::ReadAll { from, limit } => self.compare_read(ReadRequest {
                source: ReadSource::All(None),
                from: *from,
                direction: Direction::Forward,
                limit: *limit,
            }),
            Op::ReadCategory {
                category,
                from,
                limit,
            } => self.compare_read(ReadRequest {
                source: ReadSource::Category(
                    Category::new(["order", "user", "audit"][*category]).unwrap(),
                ),
                from: *from,
                direction: Direction::Forward,
                limit: *limit,
            }),
            Op::ReadQuery { items, from, limit } => self.compare_read(ReadRequest {
                source: ReadSource::Query(query(items)),
                from: *from,
                direction: Direction::Forward,
                limit: *limit,
            }),
            Op::Reopen => {
                let store = self.store.take().unwrap();
                self.runtime.block_on(store.shutdown());
                drop(store);
                self.open();
            }
        }
        // After every step: the whole log reads back exactly as the model has it.
        self.compare_read(ReadRequest {
            source: ReadSource::All(None),
            from: None,
            direction: Direction::Forward,
            limit: MAX_READ_PAGE,
        });
        for stream in STREAMS {
            let stream = StreamName::new(stream).unwrap();
            let head = self
                .runtime
                .block_on(self.store().stream_head(&stream))
                .unwrap();
            assert_eq!(head.map(|h| h.revision), self.model.last_revision(&stream));
        }
    }

    fn compare_read(&self, request: ReadRequest) {
        let expected = self.model.read(&request);
        let actual = self
            .runtime
            .block_on(self.store().read(request.clone()))
            .unwrap();
        assert_eq!(expected, actual, "read {request:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            h.step(op);
        }
        let store = h.store.take().unwrap();
        h.runtime.block_on(store.shutdown());
    }
}
