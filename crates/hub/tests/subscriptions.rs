//! The subscription property test: random interleavings of appends and subscription starts
//! (every source, every kind of start) against the real store, with subscribers reading
//! concurrently, some of them slowly enough to fall off a deliberately tiny live tail. Each
//! subscriber must receive exactly the events of its filter from its start, in position
//! order, with no gap and no duplicate across the catch-up-to-live switch.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use skald_core::*;
use skald_hub::{Delivery, Hub, HubOptions, Start, TailLimits};
use skald_storage::{Options, Store};

const STREAMS: [&str; 3] = ["order-1", "order-2", "user-1"];
const TYPES: [&str; 2] = ["Placed", "Paid"];
const TAGS: [&str; 2] = ["customer:1", "region:eu"];

#[derive(Clone, Debug)]
enum SourceSpec {
    All,
    AllFiltered(usize),
    Stream(usize),
    Category(usize),
    Query(usize, usize),
}

#[derive(Clone, Debug)]
enum StartSpec {
    Beginning,
    Now,
    /// A position chosen as a fraction (in percent) of the events appended so far.
    Position(u8),
    /// A revision chosen as a fraction of the stream's length (stream sources only).
    Revision(u8),
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        stream: usize,
        events: Vec<(usize, Vec<usize>)>,
    },
    Subscribe {
        source: SourceSpec,
        start: StartSpec,
        slow: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let event = (
        0..TYPES.len(),
        proptest::collection::vec(0..TAGS.len(), 0..=2),
    );
    prop_oneof![
        3 => (0..STREAMS.len(), proptest::collection::vec(event, 1..=4))
            .prop_map(|(stream, events)| Op::Append { stream, events }),
        1 => (
            prop_oneof![
                Just(SourceSpec::All),
                (0..TYPES.len()).prop_map(SourceSpec::AllFiltered),
                (0..STREAMS.len()).prop_map(SourceSpec::Stream),
                (0..2usize).prop_map(SourceSpec::Category),
                (0..TYPES.len(), 0..TAGS.len()).prop_map(|(t, g)| SourceSpec::Query(t, g)),
            ],
            prop_oneof![
                Just(StartSpec::Beginning),
                Just(StartSpec::Now),
                (0..=100u8).prop_map(StartSpec::Position),
                (0..=100u8).prop_map(StartSpec::Revision),
            ],
            any::<bool>(),
        )
            .prop_map(|(source, start, slow)| Op::Subscribe { source, start, slow }),
    ]
}

fn ty(i: usize) -> EventType {
    EventType::new(TYPES[i]).unwrap()
}

fn tag(i: usize) -> Tag {
    Tag::new(TAGS[i]).unwrap()
}

fn source_of(spec: &SourceSpec) -> ReadSource {
    let item = |types: Vec<usize>, tags: Vec<usize>| QueryItem {
        types: types.into_iter().map(ty).collect(),
        tags: tags.into_iter().map(tag).collect(),
    };
    match spec {
        SourceSpec::All => ReadSource::All(None),
        SourceSpec::AllFiltered(t) => {
            ReadSource::All(Some(Query::new(vec![item(vec![*t], vec![])]).unwrap()))
        }
        SourceSpec::Stream(s) => ReadSource::Stream(StreamName::new(STREAMS[*s]).unwrap()),
        SourceSpec::Category(c) => {
            ReadSource::Category(Category::new(["order", "user"][*c]).unwrap())
        }
        SourceSpec::Query(t, g) => ReadSource::Query(
            Query::new(vec![item(vec![*t], vec![]), item(vec![], vec![*g])]).unwrap(),
        ),
    }
}

/// What the model remembers of a stored event.
#[derive(Clone, Debug)]
struct Stored {
    position: u64,
    revision: u64,
    event: RecordedEvent,
}

struct Subscriber {
    expected: Vec<u64>,
    received: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The model's answer: positions of the stored events a subscription must deliver.
fn expected(
    stored: &[Stored],
    source: &ReadSource,
    first_position: u64,
    first_revision: u64,
) -> Vec<u64> {
    stored
        .iter()
        .filter(|s| skald_hub::matches_source(source, &s.event))
        .filter(|s| s.position >= first_position && s.revision >= first_revision)
        .map(|s| s.position)
        .collect()
}

fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(Options {
            data_dir: dir.path().to_owned(),
            durability: Durability::None,
            ..Options::default()
        })
        .unwrap();
        let store = Arc::new(store);
        // A tail of four events: subscribers fall off it and back all the time.
        let hub = Hub::start(
            Arc::clone(&store),
            HubOptions {
                tail: TailLimits {
                    events: 4,
                    bytes: usize::MAX,
                },
            },
        );
        let mut stored: Vec<Stored> = Vec::new();
        let mut subscribers = Vec::new();
        for op in ops {
            match op {
                Op::Append { stream, events } => {
                    let name = StreamName::new(STREAMS[stream]).unwrap();
                    let proposed: Vec<ProposedEvent> = events
                        .iter()
                        .map(|(t, tags)| {
                            let mut e = ProposedEvent::new(ty(*t), EventData::json("{}").unwrap());
                            e.tags = tags.iter().map(|g| tag(*g)).collect();
                            e.tags.sort();
                            e.tags.dedup();
                            e
                        })
                        .collect();
                    let result = store
                        .append(AppendRequest {
                            stream: name.clone(),
                            expected: ExpectedRevision::Any,
                            condition: None,
                            events: proposed.clone(),
                        })
                        .await
                        .unwrap();
                    for (i, p) in proposed.into_iter().enumerate() {
                        let position = result.first_position.0 + i as u64;
                        let revision = result.first_revision.0 + i as u64;
                        stored.push(Stored {
                            position,
                            revision,
                            event: RecordedEvent {
                                id: p.id,
                                stream: name.clone(),
                                event_type: p.event_type,
                                data: p.data,
                                metadata: p.metadata,
                                tags: p.tags,
                                source: None,
                                recorded_at: Timestamp(0),
                                revision: Revision(revision),
                                position: Position(position),
                            },
                        });
                    }
                }
                Op::Subscribe {
                    source,
                    start,
                    slow,
                } => {
                    let read_source = source_of(&source);
                    let head = stored.len() as u64;
                    let (start, first_position, first_revision) = match (start, &source) {
                        (StartSpec::Beginning, _) => (Start::Beginning, 0, 0),
                        (StartSpec::Now, _) => (Start::Now, head, 0),
                        (StartSpec::Position(pct), _) => {
                            let p = head * u64::from(pct) / 100;
                            (Start::Position(p), p, 0)
                        }
                        (StartSpec::Revision(pct), SourceSpec::Stream(s)) => {
                            let len = stored
                                .iter()
                                .filter(|e| e.event.stream.as_str() == STREAMS[*s])
                                .count() as u64;
                            let r = len * u64::from(pct) / 100;
                            (Start::Revision(r), 0, r)
                        }
                        (StartSpec::Revision(_), _) => {
                            let err = hub.subscribe(read_source, Start::Revision(0)).await.err();
                            let rejected = matches!(err, Some(Error::InvalidEvent { .. }));
                            prop_assert!(rejected, "a revision start on {:?} was accepted", source);
                            continue;
                        }
                    };
                    let mut sub = hub.subscribe(read_source.clone(), start).await.unwrap();
                    let received = Arc::new(Mutex::new(Vec::new()));
                    let sink = Arc::clone(&received);
                    let task = tokio::spawn(async move {
                        loop {
                            match sub.next().await.unwrap() {
                                Delivery::Events(events) => {
                                    sink.lock()
                                        .unwrap()
                                        .extend(events.iter().map(|e| e.position.0));
                                }
                                Delivery::CaughtUp { position } => {
                                    let got = sink.lock().unwrap();
                                    assert!(got.last().is_none_or(|last| *last < position));
                                }
                            }
                            if slow {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    });
                    subscribers.push((
                        read_source,
                        first_position,
                        first_revision,
                        Subscriber {
                            expected: Vec::new(),
                            received,
                            task,
                        },
                    ));
                }
            }
            tokio::task::yield_now().await;
        }
        for (source, first_position, first_revision, sub) in &mut subscribers {
            sub.expected = expected(&stored, source, *first_position, *first_revision);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for (source, _, _, sub) in &subscribers {
            while sub.received.lock().unwrap().len() < sub.expected.len()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // A little longer, for anything delivered twice or past the end to show up.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let got = sub.received.lock().unwrap().clone();
            prop_assert_eq!(&got, &sub.expected, "source {:?}", source);
            prop_assert!(
                !sub.task.is_finished(),
                "subscriber task stopped (panicked?)"
            );
        }
        for (_, _, _, sub) in subscribers {
            sub.task.abort();
        }
        hub.shutdown();
        store.shutdown().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn every_subscriber_gets_exactly_its_events_in_order(ops in proptest::collection::vec(op(), 1..40)) {
        run_case(ops)?;
    }
}
