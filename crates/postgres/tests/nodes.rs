//! Several nodes on one PostgreSQL: concurrent appends to the same streams through all of
//! them (for each expected revision exactly one wins; positions and revisions stay dense), a
//! follower on another node that sees every event once and in order, a retry on another node
//! answered with the first result, and a database that restarts under a node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skald_core::*;
use skald_postgres::{PgOptions, PgStore, PgUrl, connect};

mod support;
use support::Cluster;

async fn database(cluster: &Cluster, name: &str) -> PgUrl {
    cluster.database(name).await
}

async fn node(url: &PgUrl) -> PgStore {
    let mut options = PgOptions::new(url.clone());
    options.timeout = Duration::from_secs(2);
    options.poll = Duration::from_millis(50);
    PgStore::open(options).await.unwrap()
}

fn event(n: usize) -> ProposedEvent {
    let mut e = ProposedEvent::new(
        EventType::new("Counted").unwrap(),
        EventData::json(format!("{{\"n\":{n}}}")).unwrap(),
    );
    e.tags = vec![Tag::new(format!("n:{}", n % 7)).unwrap()];
    e
}

async fn read_all<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    read_to_end(store, ReadSource::All(None), |e| all.push(e.clone()))
        .await
        .unwrap();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_append_to_the_same_streams_and_a_follower_misses_nothing() {
    let cluster = Cluster::start();
    let url = database(&cluster, "nodes").await;
    let nodes = Arc::new([node(&url).await, node(&url).await, node(&url).await]);

    // A follower on the third node: waits for the head, reads from where it is. Positions
    // must come one after the other, with no gap and nothing twice.
    let follower = {
        let nodes = Arc::clone(&nodes);
        tokio::spawn(async move {
            let store = &nodes[2];
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut next = 0;
            while next < 600 {
                store.wait_for_append(next).await.unwrap();
                let page = store
                    .read(ReadRequest {
                        source: ReadSource::All(None),
                        from: Some(next),
                        direction: Direction::Forward,
                        limit: 100,
                    })
                    .await
                    .unwrap();
                for e in page.events {
                    assert_eq!(e.position.0, next, "the follower skipped or repeated");
                    next += 1;
                    seen.push(e);
                }
            }
            seen
        })
    };

    // Twelve writers, four per node, on five streams: each reads the stream's head and
    // appends three events expecting it.
    let mut writers = Vec::new();
    for w in 0..12usize {
        let nodes = Arc::clone(&nodes);
        writers.push(tokio::spawn(async move {
            let store = &nodes[w % 3];
            let mut won = Vec::new();
            let mut lost = 0;
            let mut n = 0;
            while won.len() < 50 / 3 + 1 && n < 2000 {
                n += 1;
                let stream = StreamName::new(format!("counter-{}", (w + n) % 5)).unwrap();
                let head = store.stream_head(&stream).await.unwrap();
                let expected = head.map_or(ExpectedRevision::NoStream, |h| {
                    ExpectedRevision::Exact(h.revision)
                });
                let request = AppendRequest {
                    stream: stream.clone(),
                    expected,
                    condition: None,
                    events: (0..3).map(|i| event(w * 10_000 + n * 3 + i)).collect(),
                };
                match store.append(request).await {
                    Ok(result) => won.push((stream, result)),
                    Err(Error::WrongExpectedRevision { actual, .. }) => {
                        let actual = actual.expect("the stream exists once someone lost to it");
                        if let ExpectedRevision::Exact(r) = expected {
                            assert!(actual > r, "a loser is shown a newer revision");
                        }
                        lost += 1;
                    }
                    Err(e) => panic!("writer {w}: {e}"),
                }
            }
            (won, lost)
        }));
    }
    let mut won = Vec::new();
    let mut lost = 0;
    for writer in writers {
        let (w, l) = writer.await.unwrap();
        won.extend(w);
        lost += l;
    }
    let total: u64 = won.len() as u64 * 3;
    assert!(total >= 600, "the writers appended {total} events");
    assert!(
        lost > 0,
        "the writers never contended; the test proves nothing"
    );

    // For each stream and revision exactly one append won.
    let mut claimed = HashSet::new();
    for (stream, result) in &won {
        for r in result.first_revision.0..=result.last_revision.0 {
            assert!(
                claimed.insert((stream.clone(), r)),
                "{stream} {r} won twice"
            );
        }
    }
    // The log is dense, in commit order, and each stream's revisions are dense from 0.
    for store in nodes.iter() {
        let all = read_all(store).await;
        assert_eq!(all.len() as u64, total);
        let mut revisions: BTreeMap<StreamName, u64> = BTreeMap::new();
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.position.0, i as u64);
            let r = revisions.entry(e.stream.clone()).or_insert(0);
            assert_eq!(e.revision.0, *r, "{} revisions have a hole", e.stream);
            *r += 1;
        }
        assert_eq!(store.next_position().await.unwrap(), total);
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the follower sees the head within 30 s")
        .unwrap();
    let all = read_all(&nodes[0]).await;
    assert!(seen.len() >= 600, "the follower saw {} events", seen.len());
    assert!(
        seen[..600] == all[..600],
        "the follower saw other events than the log holds"
    );
    for store in nodes.iter() {
        store.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_node_gets_the_first_result() {
    let cluster = Cluster::start();
    let url = database(&cluster, "retry").await;
    let (a, b) = (node(&url).await, node(&url).await);
    let request = AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::NoStream,
        condition: None,
        events: vec![event(1), event(2)],
    };
    let first = a.append(request.clone()).await.unwrap();
    let again = b.append(request.clone()).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        (again.first_position, again.last_revision),
        (first.first_position, first.last_revision)
    );
    // The same id for another event is refused, naming where the id is.
    let mut other = request.clone();
    other.events[0].data = EventData::json("{\"n\":99}").unwrap();
    match b.append(other).await {
        Err(Error::IdReused {
            position, reason, ..
        }) => {
            assert_eq!(position, first.first_position);
            assert!(reason.contains("data differs"), "{reason}");
        }
        other => panic!("expected IdReused, got {other:?}"),
    }
    // A DCB condition on one node sees what another wrote.
    let condition = AppendRequest {
        stream: StreamName::new("order-2").unwrap(),
        expected: ExpectedRevision::Any,
        condition: Some(AppendCondition {
            query: Query::new(vec![QueryItem {
                types: vec![],
                tags: vec![Tag::new("n:2").unwrap()],
            }])
            .unwrap(),
            after: None,
        }),
        events: vec![event(3)],
    };
    assert_eq!(
        b.append(condition).await,
        Err(Error::ConditionFailed {
            position: Position(1)
        })
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_gives_unavailable_then_the_node_reconnects() {
    let cluster = Cluster::start();
    let url = database(&cluster, "restart").await;
    let store = node(&url).await;
    let append = |n| AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: vec![event(n)],
    };
    store.append(append(1)).await.unwrap();

    cluster.stop();
    let started = Instant::now();
    match store.append(append(2)).await {
        Err(Error::Unavailable(reason)) => assert!(reason.contains("PostgreSQL"), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the append hung for {:?}",
        started.elapsed()
    );
    match store
        .read(ReadRequest {
            source: ReadSource::All(None),
            from: None,
            direction: Direction::Forward,
            limit: 10,
        })
        .await
    {
        Err(Error::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // The tailer, which reads the head every poll, finds the database gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        match store.readiness() {
            Err(reason) => break reason,
            Ok(()) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(()) => panic!("still ready 5 s after the database stopped"),
        }
    };
    assert!(reason.contains("PostgreSQL at postgres://"), "{reason}");

    cluster.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    let result = loop {
        match store.append(append(3)).await {
            Ok(result) => break result,
            Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("after the restart: {e}"),
        }
    };
    assert_eq!(
        result.first_position,
        Position(1),
        "the append refused did not land"
    );
    let all = read_all(&store).await;
    assert_eq!(all.len(), 2);
    // Ready again once the tailer is back, whether or not anything is read.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.readiness().is_err() {
        assert!(Instant::now() < deadline, "{:?}", store.readiness());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_of_several_items_read_while_appends_land_never_skips() {
    // Each item of a query is a statement of its own; read while two nodes append, a page
    // must still be a prefix of the log for every item, or a reader following the pages
    // (from the last event's position) skips events of one item for good.
    let cluster = Cluster::start();
    let url = database(&cluster, "items").await;
    let (a, b, reader) = (node(&url).await, node(&url).await, node(&url).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, store) in [a, b].into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let events = ["Opened", "Closed"]
                    .iter()
                    .map(|t| {
                        ProposedEvent::new(
                            EventType::new(*t).unwrap(),
                            EventData::json(format!("{{\"w\":{w},\"n\":{n}}}")).unwrap(),
                        )
                    })
                    .collect();
                n += 1;
                store
                    .append(AppendRequest {
                        stream: StreamName::new(format!("door-{w}")).unwrap(),
                        expected: ExpectedRevision::Any,
                        condition: None,
                        events,
                    })
                    .await
                    .unwrap();
            }
            store
        }));
    }
    let query = Query::new(vec![
        QueryItem {
            types: vec![EventType::new("Opened").unwrap()],
            tags: vec![],
        },
        QueryItem {
            types: vec![EventType::new("Closed").unwrap()],
            tags: vec![],
        },
    ])
    .unwrap();
    let mut followed = Vec::new();
    let mut from = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let page = reader
            .read(ReadRequest {
                source: ReadSource::Query(query.clone()),
                from: Some(from),
                direction: Direction::Forward,
                limit: 1000,
            })
            .await
            .unwrap();
        if let Some(last) = page.events.last() {
            from = last.position.0 + 1;
        }
        followed.extend(page.events.into_iter().map(|e| e.position.0));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap().shutdown().await;
    }
    // Every event of the log up to the last one followed was followed, in order.
    let last = *followed.last().expect("the reader followed something");
    let expected: Vec<u64> = (0..=last).collect();
    assert_eq!(followed, expected, "the reader skipped events");
    reader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_found_shorter_than_seen_raises_an_alarm() {
    // What a failover to a standby that missed committed events looks like to a node.
    let cluster = Cluster::start();
    let url = database(&cluster, "shorter").await;
    let store = node(&url).await;
    for n in 0..3 {
        store
            .append(AppendRequest {
                stream: StreamName::new("order-1").unwrap(),
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![event(n)],
            })
            .await
            .unwrap();
    }
    assert_eq!(store.readiness(), Ok(()));
    let db = connect(&url).await.unwrap();
    db.batch_execute(
        "DELETE FROM skald.event_tags WHERE position = 2; \
         DELETE FROM skald.events WHERE position = 2; \
         UPDATE skald.head SET next_position = 2",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        if let Err(reason) = store.readiness() {
            break reason;
        }
        assert!(
            Instant::now() < deadline,
            "no alarm 5 s after the log got shorter"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        reason.contains("failover lost committed events"),
        "{reason}"
    );
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_in_utf8_is_refused() {
    let cluster = Cluster::start();
    cluster
        .admin()
        .await
        .batch_execute(
            "CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0",
        )
        .await
        .unwrap();
    let url = PgUrl::parse(&cluster.url("latin")).unwrap();
    match PgStore::open(PgOptions::new(url)).await {
        Err(Error::InvalidConfig(reason)) => {
            assert!(
                reason.contains("LATIN1") && reason.contains("UTF8"),
                "{reason}"
            )
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_append_the_database_refuses_fails_alone() {
    // A tag over PostgreSQL's largest index entry (limits raised to allow it) fails its
    // append in the database; the appends batched with it must not fail with it.
    let cluster = Cluster::start();
    let url = database(&cluster, "alone").await;
    let mut options = PgOptions::new(url);
    options.limits.max_name_bytes = 4000;
    options.limits.max_event_bytes = 64 * 1024;
    let store = Arc::new(PgStore::open(options).await.unwrap());
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let incompressible: String = (0..3900)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
            alphabet[(seed % 62) as usize] as char
        })
        .collect();
    let mut tasks = Vec::new();
    for n in 0..40 {
        let store = Arc::clone(&store);
        let mut e = event(n);
        if n == 20 {
            e.tags = vec![Tag::new(format!("big:{incompressible}")).unwrap()];
        }
        tasks.push(tokio::spawn(async move {
            store
                .append(AppendRequest {
                    stream: StreamName::new(format!("order-{n}")).unwrap(),
                    expected: ExpectedRevision::Any,
                    condition: None,
                    events: vec![e],
                })
                .await
        }));
    }
    for (n, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        if n == 20 {
            match outcome {
                Err(Error::Io(reason)) => assert!(reason.contains("index row"), "{reason}"),
                other => panic!("the oversized tag: expected Io, got {other:?}"),
            }
        } else {
            outcome.unwrap_or_else(|e| panic!("append {n} failed with the bad one: {e}"));
        }
    }
    assert_eq!(read_all(&*store).await.len(), 39);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_decided_together_in_one_batch_stay_consistent() {
    // Many appends at once to one node are decided in batches: appends to one stream, DCB
    // conditions that must see the batch's earlier appends, retries and refusals all in
    // one call. Whatever the batches, the outcomes must be those of the appends applied one
    // at a time in position order.
    let cluster = Cluster::start();
    let url = database(&cluster, "batches").await;
    let store = Arc::new(node(&url).await);
    let mut tasks = Vec::new();
    for t in 0..48usize {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..20usize {
                let stream = StreamName::new(format!("acct-{}", (t + n) % 4)).unwrap();
                let mut e = event(t * 1000 + n);
                e.tags = vec![Tag::new(format!("k:{}", (t * 7 + n) % 3)).unwrap()];
                let expected = match n % 4 {
                    0 => ExpectedRevision::Any,
                    1 => match store.stream_head(&stream).await.unwrap() {
                        Some(h) => ExpectedRevision::Exact(h.revision),
                        None => ExpectedRevision::NoStream,
                    },
                    2 => ExpectedRevision::StreamExists,
                    _ => ExpectedRevision::Any,
                };
                let after = store.next_position().await.unwrap().saturating_sub(2);
                let condition = (n % 3 == 0).then(|| AppendCondition {
                    query: Query::new(vec![QueryItem {
                        types: vec![],
                        tags: vec![Tag::new(format!("k:{}", (t + n) % 3)).unwrap()],
                    }])
                    .unwrap(),
                    after: Some(Position(after)),
                });
                let request = AppendRequest {
                    stream,
                    expected,
                    condition,
                    events: vec![e],
                };
                let outcome = store.append(request.clone()).await;
                // Every fifth append is sent again at once: a retry.
                let retry = (n % 5 == 0).then(|| request.clone());
                sent.push((request, outcome));
                if let Some(retry) = retry {
                    let again = store.append(retry.clone()).await;
                    sent.push((retry, again));
                }
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    let log = read_all(&*store).await;
    // Dense positions and revisions.
    let mut revisions: BTreeMap<StreamName, u64> = BTreeMap::new();
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.position.0, i as u64);
        let r = revisions.entry(e.stream.clone()).or_insert(0);
        assert_eq!(e.revision.0, *r);
        *r += 1;
    }
    let mut ok = 0;
    for (request, outcome) in &sent {
        let id = request.events[0].id;
        match outcome {
            Ok(result) => {
                ok += 1;
                let stored = &log[result.first_position.0 as usize];
                assert_eq!(stored.id, id);
                assert_eq!(stored.revision, result.first_revision);
                let before: Vec<_> = log[..result.first_position.0 as usize]
                    .iter()
                    .filter(|e| e.stream == request.stream)
                    .collect();
                let previous = before.last().map(|e| e.revision);
                if !result.replayed {
                    assert!(
                        request.expected.is_satisfied_by(previous),
                        "{:?} written after revision {previous:?}",
                        request.expected
                    );
                }
                if let (Some(c), false) = (&request.condition, result.replayed) {
                    let from = c.after.map_or(0, |p| p.0 + 1) as usize;
                    let end = result.first_position.0 as usize;
                    if from < end {
                        assert!(
                            !log[from..end].iter().any(|e| c.query.matches_event(e)),
                            "a condition let an append through past a matching event"
                        );
                    }
                }
            }
            Err(Error::ConditionFailed { position }) => {
                let c = request.condition.as_ref().unwrap();
                let e = &log[position.0 as usize];
                assert!(c.query.matches_event(e));
                assert!(c.after.is_none_or(|a| position.0 > a.0));
                assert!(
                    !log.iter().any(|e| e.id == id),
                    "a refused append was stored"
                );
            }
            Err(Error::WrongExpectedRevision { actual, .. }) => {
                assert!(!request.expected.is_satisfied_by(*actual));
                assert!(
                    !log.iter().any(|e| e.id == id),
                    "a refused append was stored"
                );
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // Each id is stored at most once, and every append that succeeded is there.
    let ids: HashSet<_> = log.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), log.len());
    assert!(ok > 100, "only {ok} appends succeeded");
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_that_does_not_start_where_the_store_ends_writes_nothing() {
    // What `skald migrate` meets when a node appends during the copy.
    let cluster = Cluster::start();
    let url = database(&cluster, "import").await;
    let store = node(&url).await;
    store
        .append(AppendRequest {
            stream: StreamName::new("order-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event(1)],
        })
        .await
        .unwrap();
    let copied = read_all(&store).await;
    let mut importer = skald_postgres::Importer::connect(&url).await.unwrap();
    match importer.write(&copied).await {
        Err(Error::InvalidConfig(reason)) => {
            assert!(reason.contains("ends at position 1"), "{reason}");
            assert!(reason.contains("stop every Skald node"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(read_all(&store).await, copied);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_function_answers_a_retry_in_the_same_batch_as_stored() {
    // The node never sends a retry in its original's batch, but an older node might, and the
    // function must not depend on it: the retry is answered `stored`, not `wrong-revision`.
    let cluster = Cluster::start();
    let url = database(&cluster, "samebatch").await;
    let store = node(&url).await;
    let db = connect(&url).await.unwrap();
    let rows = db
        .query(
            "SELECT kind, at, revision, stored FROM skald.append(0, \
             ARRAY['order-1', 'order-1'], ARRAY['order', 'order'], ARRAY[-2, -2]::bigint[], \
             ARRAY[1, 1], ARRAY[NULL, NULL]::text[], \
             ARRAY['00000000-0000-0000-0000-000000000001', \
                   '00000000-0000-0000-0000-000000000001']::uuid[], \
             ARRAY['Placed', 'Placed'], ARRAY['application/json', 'application/json'], \
             ARRAY['\\x7b7d', '\\x7b7d']::bytea[], ARRAY['{}', '{}'], \
             ARRAY[NULL, NULL]::text[], ARRAY[0, 0], ARRAY[]::text[])",
            &[],
        )
        .await
        .unwrap();
    let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(kinds, ["ok", "stored"]);
    let stored: Vec<i64> = rows[1].get(3);
    assert_eq!(stored, [0]);
    // A batch that wrote nothing leaves the head as it was.
    db.query(
        "SELECT * FROM skald.append(9999999999999999, ARRAY['order-1'], ARRAY['order'], \
         ARRAY[-2]::bigint[], ARRAY[1], ARRAY[NULL]::text[], \
         ARRAY['00000000-0000-0000-0000-000000000002']::uuid[], ARRAY['Placed'], \
         ARRAY['application/json'], ARRAY['\\x7b7d']::bytea[], ARRAY['{}'], \
         ARRAY[NULL]::text[], ARRAY[0], ARRAY[]::text[])",
        &[],
    )
    .await
    .unwrap();
    let (next, time): (i64, i64) = db
        .query_one("SELECT next_position, recorded_at FROM skald.head", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(next, 1);
    assert!(
        time < 9999999999999999,
        "a refused batch moved the recorded time"
    );
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_no_acknowledged_append() {
    // Writers on two nodes append without pause; PostgreSQL is stopped (fast shutdown, as an
    // operator's restart) and started again in the middle. Every append acknowledged before,
    // during or after is stored once at its acknowledged position; one whose answer was lost
    // is retried with the same ids and gets the first result or its own, never two copies.
    let cluster = Cluster::start();
    let url = database(&cluster, "underload").await;
    let nodes = Arc::new([node(&url).await, node(&url).await]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8usize {
        let (nodes, stop) = (Arc::clone(&nodes), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let store = &nodes[w % 2];
            let mut acknowledged = Vec::new();
            let mut refused = 0;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let request = AppendRequest {
                    stream: StreamName::new(format!("load-{w}")).unwrap(),
                    expected: ExpectedRevision::Any,
                    condition: None,
                    events: vec![event(w * 100_000 + n)],
                };
                // Retried with the same ids until answered, as a client does.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match store.append(request.clone()).await {
                        Ok(result) => {
                            acknowledged.push((request.events[0].id, result.first_position));
                            break;
                        }
                        Err(Error::Unavailable(_)) if Instant::now() < deadline => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            }
            (acknowledged, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.resume();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for w in writers {
        let (a, r) = w.await.unwrap();
        acknowledged.extend(a);
        refused += r;
    }
    assert!(
        refused > 0,
        "no append met the restart; the test proves nothing"
    );
    let log = read_all(&nodes[0]).await;
    let at: HashMap<EventId, u64> = log.iter().map(|e| (e.id, e.position.0)).collect();
    assert_eq!(at.len(), log.len(), "an id is stored twice");
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.position.0, i as u64, "positions have a hole");
    }
    for (id, position) in &acknowledged {
        assert_eq!(
            at.get(id),
            Some(&position.0),
            "acknowledged {id} lost or moved"
        );
    }
    assert!(
        acknowledged.len() > 50,
        "only {} appends were acknowledged",
        acknowledged.len()
    );
    for store in nodes.iter() {
        store.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_counts_its_appends_batches_and_reads_for_metrics() {
    let cluster = Cluster::start();
    let url = database(&cluster, "metrics").await;
    let store = node(&url).await;
    let request = AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::NoStream,
        condition: None,
        events: vec![event(1), event(2)],
    };
    store.append(request.clone()).await.unwrap();
    store.append(request.clone()).await.unwrap(); // a replay
    assert!(
        store
            .append(AppendRequest {
                events: vec![event(3)],
                ..request
            })
            .await
            .is_err()
    ); // the stream exists: rejected
    read_all(&store).await;
    // The store's size, as the tailer measures it (at once, then every 15 s) and `info` does.
    let info = store.info().await.unwrap();
    assert!(info.storage_bytes > 0);
    let mut out = skald_core::metrics::Exposition::new();
    store.write_metrics(&mut out);
    let text = out.finish();
    let bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("skald_storage_bytes "))
        .unwrap_or_else(|| panic!("no skald_storage_bytes in\n{text}"))
        .parse()
        .unwrap();
    // Measured by the tailer or by `info`; nothing was written between them.
    assert!(bytes > 0 && bytes <= 2 * info.storage_bytes, "{bytes}");
    for line in [
        "skald_appends_total{result=\"written\"} 1",
        "skald_appends_total{result=\"replayed\"} 1",
        "skald_appends_total{result=\"rejected\"} 1",
        "skald_appends_total{result=\"failed\"} 0",
        "skald_events_written_total 2",
        "skald_events_read_total 2",
        "skald_events_stored 2",
        "skald_postgres_append_call_duration_seconds_count 3",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // What docs/observability.md lists for PostgreSQL is what a node writes.
    let docs = include_str!("../../../docs/observability.md");
    let documented: HashSet<&str> = docs
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("skald_postgres_"))
        .collect();
    assert!(!documented.is_empty());
    for name in documented {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "docs/observability.md lists {name}, which a node does not write"
        );
    }
    store.shutdown().await;
}
