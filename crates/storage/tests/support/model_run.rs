//! The model-based test, for any backend: random sequences of appends (every kind of expected
//! revision, DCB conditions, idempotent retries, ids reused for other events), reads of every
//! kind, and stops and starts, run against a real store and the trivially correct in-memory
//! [`Model`], compared after every step. The embedded engine's test (`tests/model.rs`) and the
//! PostgreSQL backend's (`crates/postgres/tests/model.rs`) both run it.

use proptest::prelude::*;
use skald_core::*;

use super::{ItemSpec, Model, STREAMS, TAGS, TYPES, query, same_error};

#[derive(Clone, Debug)]
pub enum Expect {
    Any,
    NoStream,
    Exists,
    Current,
    Off(u64),
}

#[derive(Clone, Debug)]
pub enum Ids {
    Fresh,
    /// Resend an earlier append exactly (by index into the appends sent so far).
    Retry(usize),
    /// Take the id of an earlier event (by index) for a different event.
    Reuse(usize),
}

#[derive(Clone, Debug)]
pub enum Op {
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

pub fn op() -> impl Strategy<Value = Op> {
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

/// A backend under test: how to start its store (with [`FixedClock`]) and how to stop it.
/// Starting again after a stop must find everything stored before.
pub trait Backend {
    type Store: EventStore;
    fn open(&mut self, runtime: &tokio::runtime::Runtime) -> Self::Store;
    fn close(&mut self, runtime: &tokio::runtime::Runtime, store: Self::Store);
}

pub struct Harness<B: Backend> {
    runtime: tokio::runtime::Runtime,
    backend: B,
    store: Option<B::Store>,
    model: Model,
    sent: Vec<AppendRequest>,
}

impl<B: Backend> Harness<B> {
    pub fn new(runtime: tokio::runtime::Runtime, backend: B) -> Self {
        let mut h = Self {
            runtime,
            backend,
            store: None,
            model: Model::default(),
            sent: Vec::new(),
        };
        h.open();
        h
    }

    /// Runs `ops`, comparing the store with the model after each, then stops the store.
    pub fn run(mut self, ops: &[Op]) {
        for op in ops {
            self.step(op);
        }
        let store = self.store.take().unwrap();
        self.backend.close(&self.runtime, store);
    }

    fn open(&mut self) {
        self.store = Some(self.backend.open(&self.runtime));
    }

    fn store(&self) -> &B::Store {
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
                self.backend.close(&self.runtime, store);
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
