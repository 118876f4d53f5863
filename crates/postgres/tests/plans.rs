//! Every read is served by an index: on a store of 1,000,000 events (written straight into
//! the tables, as `skald.append` would have: 10,000 streams, 1,000 tags, three types), the
//! plan PostgreSQL chooses for each statement a read runs has no sequential scan.

mod support;

use skald_core::*;
use skald_postgres::{PgOptions, PgStore, connect};
use support::Cluster;

const EVENTS: i64 = 1_000_000;

fn read(source: ReadSource, from: Option<u64>, direction: Direction) -> ReadRequest {
    ReadRequest {
        source,
        from,
        direction,
        limit: 100,
    }
}

fn item(types: &[&str], tags: &[&str]) -> QueryItem {
    QueryItem {
        types: types.iter().map(|t| EventType::new(*t).unwrap()).collect(),
        tags: tags.iter().map(|t| Tag::new(*t).unwrap()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_uses_an_index_on_a_million_events() {
    let cluster = Cluster::start();
    let url = cluster.database("plans").await;
    let store = PgStore::open(PgOptions::new(url.clone())).await.unwrap();
    let db = connect(&url).await.unwrap();
    db.batch_execute(&format!(
        "INSERT INTO skald.events
             SELECT g, 'order-' || (g % 10000), g / 10000, 'order', gen_random_uuid(),
                    (ARRAY['Placed', 'Paid', 'Shipped'])[g % 3 + 1], 'application/json',
                    '\\x7b7d'::bytea, '{{}}', ARRAY['customer:' || (g % 1000)], NULL, 0, g
             FROM generate_series(0, {last}) g;
         INSERT INTO skald.event_tags
             SELECT 'customer:' || (g % 1000), g FROM generate_series(0, {last}) g;
         INSERT INTO skald.streams
             SELECT 'order-' || s, ({EVENTS} - 1 - s) / 10000, {EVENTS} - 10000 + s
             FROM generate_series(0, 9999) s;
         UPDATE skald.head SET next_position = {EVENTS};
         ANALYZE;",
        last = EVENTS - 1
    ))
    .await
    .unwrap();
    assert_eq!(store.next_position().await.unwrap(), EVENTS as u64);

    let stream = || ReadSource::Stream(StreamName::new("order-42").unwrap());
    let query = |items| ReadSource::Query(Query::new(items).unwrap());
    let requests = [
        read(stream(), None, Direction::Forward),
        read(stream(), Some(50), Direction::Forward),
        read(stream(), None, Direction::Backward),
        read(ReadSource::All(None), Some(500_000), Direction::Forward),
        read(
            ReadSource::Category(Category::new("order").unwrap()),
            Some(900_000),
            Direction::Forward,
        ),
        read(
            query(vec![item(&[], &["customer:7"])]),
            Some(10),
            Direction::Forward,
        ),
        read(
            query(vec![
                item(&["Paid"], &["customer:7"]),
                item(&["Shipped"], &[]),
            ]),
            Some(700_000),
            Direction::Forward,
        ),
        read(
            ReadSource::All(Some(
                Query::new(vec![item(&["Placed", "Paid"], &[])]).unwrap(),
            )),
            None,
            Direction::Forward,
        ),
    ];
    let mut checked = 0;
    for request in requests {
        // The same read runs and answers, then its plans are checked.
        let page = store.read(request.clone()).await.unwrap();
        assert!(!page.events.is_empty(), "{request:?} found nothing");
        for plan in store.explain(request.clone()).await.unwrap() {
            assert!(
                !plan.contains("Seq Scan"),
                "{request:?} scans a whole table:\n{plan}"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 9,
        "one plan per statement: the two-item query runs two"
    );
    let head = db
        .query(
            "EXPLAIN SELECT last_revision, last_position FROM skald.streams WHERE stream = $1",
            &[&"order-42"],
        )
        .await
        .unwrap();
    let plan: Vec<String> = head.iter().map(|r| r.get(0)).collect();
    assert!(!plan.join("\n").contains("Seq Scan"), "{plan:?}");
    store.shutdown().await;
}
