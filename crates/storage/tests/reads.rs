//! Stream reads page by page, on both sides of the bound under which a read is answered on
//! the caller's task rather than on the blocking pool: every length, limit and direction must
//! give the stream's events once each, in order.

use skald_core::*;
use skald_storage::{Options, Store};

/// Streams of these lengths, around the inline bound of 32 records.
const LENGTHS: [u64; 8] = [0, 1, 31, 32, 33, 34, 65, 100];

fn event(stream: &str, revision: u64) -> ProposedEvent {
    ProposedEvent::new(
        EventType::new("Counted").unwrap(),
        EventData::json(format!("{{\"stream\":\"{stream}\",\"n\":{revision}}}")).unwrap(),
    )
}

async fn fill(store: &Store) {
    // Round-robin over the streams, so that each stream's records lie apart in the log, with
    // a small memtable so that some entries are in redb and the newest in memtables.
    let longest = LENGTHS.iter().copied().max().unwrap();
    for revision in 0..longest {
        for (i, &length) in LENGTHS.iter().enumerate() {
            if revision < length {
                let stream = format!("len-{i}");
                store
                    .append(AppendRequest {
                        stream: StreamName::new(&stream).unwrap(),
                        expected: match revision {
                            0 => ExpectedRevision::NoStream,
                            r => ExpectedRevision::Exact(Revision(r - 1)),
                        },
                        condition: None,
                        events: vec![event(&stream, revision)],
                    })
                    .await
                    .unwrap();
            }
        }
    }
}

/// Every page of a stream from the start in `direction`, `limit` events at a time.
async fn pages(store: &Store, stream: &str, direction: Direction, limit: usize) -> Vec<u64> {
    let mut from = None;
    let mut revisions = Vec::new();
    loop {
        let page = store
            .read(ReadRequest {
                source: ReadSource::Stream(StreamName::new(stream).unwrap()),
                from,
                direction,
                limit,
            })
            .await
            .unwrap();
        assert!(page.events.len() <= limit, "{stream} limit {limit}");
        for e in &page.events {
            assert_eq!(e.stream.as_str(), stream);
            let data: serde_json::Value = serde_json::from_slice(e.data.bytes()).unwrap();
            assert_eq!(
                data["n"], e.revision.0,
                "{stream}: the record at its revision"
            );
            revisions.push(e.revision.0);
        }
        match page.next {
            Some(next) => from = Some(next),
            None => return revisions,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_of_every_length_limit_and_direction_return_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        data_dir: dir.path().to_path_buf(),
        memtable_events: 16,
        ..Options::default()
    };
    let store = Store::open(options).unwrap().0;
    fill(&store).await;
    for (i, &length) in LENGTHS.iter().enumerate() {
        let stream = format!("len-{i}");
        let forward: Vec<u64> = (0..length).collect();
        let backward: Vec<u64> = (0..length).rev().collect();
        for limit in [1, 2, 31, 32, 33, 34, 35, 64, 100, 4096] {
            let got = pages(&store, &stream, Direction::Forward, limit).await;
            assert_eq!(got, forward, "{stream} forward, limit {limit}");
            let got = pages(&store, &stream, Direction::Backward, limit).await;
            assert_eq!(got, backward, "{stream} backward, limit {limit}");
        }
        // From the middle, both ways.
        if length > 2 {
            let middle = length / 2;
            let page = store
                .read(ReadRequest {
                    source: ReadSource::Stream(StreamName::new(&stream).unwrap()),
                    from: Some(middle),
                    direction: Direction::Backward,
                    limit: 40,
                })
                .await
                .unwrap();
            let got: Vec<u64> = page.events.iter().map(|e| e.revision.0).collect();
            let want: Vec<u64> = (middle.saturating_sub(39)..=middle).rev().collect();
            assert_eq!(got, want, "{stream} backward from {middle}");
        }
    }
    // A limit of zero reads nothing, inline or not.
    let page = store
        .read(ReadRequest {
            source: ReadSource::Stream(StreamName::new("len-7").unwrap()),
            from: None,
            direction: Direction::Forward,
            limit: 0,
        })
        .await
        .unwrap();
    assert!(page.events.is_empty() && page.next.is_none());
    store.shutdown().await;
}

/// Every page of `source` from its start, `limit` at a time: the positions read, and the
/// largest page in bytes.
async fn all_pages(store: &Store, source: ReadSource, limit: usize) -> (Vec<u64>, usize) {
    let mut from = Some(0);
    let (mut positions, mut largest) = (Vec::new(), 0);
    loop {
        let page = store
            .read(ReadRequest {
                source: source.clone(),
                from,
                direction: Direction::Forward,
                limit,
            })
            .await
            .unwrap();
        let bytes: usize = page.events.iter().map(RecordedEvent::size).sum();
        let last = page.events.last().map_or(0, RecordedEvent::size);
        // A page ends with the event that reaches the budget: without it, it is under.
        assert!(
            bytes - last < MAX_READ_PAGE_BYTES,
            "a page of {bytes} bytes went on past the budget"
        );
        largest = largest.max(bytes);
        positions.extend(page.events.iter().map(|e| e.position.0));
        match page.next {
            Some(next) => from = Some(next),
            None => return (positions, largest),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_large_events_are_bounded_by_bytes_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(Options {
        data_dir: dir.path().to_path_buf(),
        durability: Durability::None,
        ..Options::default()
    })
    .unwrap()
    .0;
    // 40 events of about 900 KB in two streams of one category, with small ones between.
    let big = "x".repeat(900 * 1024);
    for n in 0..40u64 {
        let stream = format!("big-{}", n % 2);
        for (event_type, pad) in [("Large", big.as_str()), ("Small", "s")] {
            store
                .append(AppendRequest {
                    stream: StreamName::new(&stream).unwrap(),
                    expected: ExpectedRevision::Any,
                    condition: None,
                    events: vec![ProposedEvent {
                        tags: vec![Tag::new("kind:big").unwrap()],
                        ..ProposedEvent::new(
                            EventType::new(event_type).unwrap(),
                            EventData::json(format!("{{\"n\":{n},\"pad\":\"{pad}\"}}")).unwrap(),
                        )
                    }],
                })
                .await
                .unwrap();
        }
    }
    let everything: Vec<u64> = (0..80).collect();
    let large: Vec<u64> = (0..80).step_by(2).collect();
    let stream0: Vec<u64> = (0..80).filter(|p| p % 4 < 2).collect();
    let cases = [
        (ReadSource::All(None), everything.clone()),
        (
            ReadSource::Category(Category::new("big").unwrap()),
            everything.clone(),
        ),
        (
            ReadSource::Query(
                Query::new(vec![QueryItem {
                    types: vec![EventType::new("Large").unwrap()],
                    tags: vec![],
                }])
                .unwrap(),
            ),
            large.clone(),
        ),
        (
            ReadSource::Query(
                Query::new(vec![
                    QueryItem {
                        types: vec![],
                        tags: vec![Tag::new("kind:big").unwrap()],
                    },
                    QueryItem {
                        types: vec![EventType::new("Small").unwrap()],
                        tags: vec![],
                    },
                ])
                .unwrap(),
            ),
            everything.clone(),
        ),
    ];
    for (source, want) in cases {
        let (got, largest) = all_pages(&store, source.clone(), MAX_READ_PAGE).await;
        assert_eq!(got, want, "{source:?}");
        assert!(
            largest < MAX_READ_PAGE_BYTES + 1024 * 1024,
            "{source:?}: a page of {largest} bytes"
        );
    }
    // A stream read, by revisions.
    let mut from = None;
    let mut positions = Vec::new();
    loop {
        let page = store
            .read(ReadRequest {
                source: ReadSource::Stream(StreamName::new("big-0").unwrap()),
                from,
                direction: Direction::Forward,
                limit: MAX_READ_PAGE,
            })
            .await
            .unwrap();
        let bytes: usize = page.events.iter().map(RecordedEvent::size).sum();
        assert!(bytes < MAX_READ_PAGE_BYTES + 1024 * 1024);
        positions.extend(page.events.iter().map(|e| e.position.0));
        match page.next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    assert_eq!(positions, stream0);
    store.shutdown().await;
}
