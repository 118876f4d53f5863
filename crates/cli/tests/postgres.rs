//! `skald serve --store postgres://…`: three real nodes on one PostgreSQL 15. Writers on every
//! node contend on the same streams with expected revisions while subscribers on two nodes
//! follow the log; one node is killed with SIGKILL in the middle of appends. Afterwards every
//! acknowledged event is at its acknowledged position, no append is partly stored, positions
//! and revisions are dense, each subscriber received the whole log once and in order, and a
//! node started again on the database serves the same log.

mod support;

#[path = "../../postgres/tests/support/mod.rs"]
mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use skald_client::{Client, ClientOptions, Delivery, RetryPolicy, Start};
use skald_core::{
    AppendRequest, Error, EventData, EventId, EventStore, EventType, ExpectedRevision,
    ProposedEvent, ReadSource, RecordedEvent, StreamName, read_to_end,
};
use support::Server;

/// One append a writer sent: its ids and, if acknowledged, its first position.
struct Sent {
    ids: Vec<EventId>,
    acknowledged: Option<u64>,
    refused: bool,
}

async fn client(url: &str) -> Client {
    let options = ClientOptions {
        // A writer on the killed node sees its failure instead of retrying for seconds.
        retry: RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    };
    Client::connect_with(url, options).await.unwrap()
}

async fn writer(url: String, w: usize, stop: Arc<AtomicBool>, sent: Arc<Mutex<Vec<Sent>>>) {
    let client = client(&url).await;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let stream = StreamName::new(format!("acct-{}", n % 3)).unwrap();
        let Ok(head) = client.stream_head(&stream).await else {
            return;
        };
        let events: Vec<ProposedEvent> = (0..2)
            .map(|i| {
                ProposedEvent::new(
                    EventType::new("Moved").unwrap(),
                    EventData::json(format!("{{\"w\":{w},\"n\":{n},\"i\":{i}}}")).unwrap(),
                )
            })
            .collect();
        let index = {
            let mut s = sent.lock().unwrap();
            s.push(Sent {
                ids: events.iter().map(|e| e.id).collect(),
                acknowledged: None,
                refused: false,
            });
            s.len() - 1
        };
        let request = AppendRequest {
            stream,
            expected: head.map_or(ExpectedRevision::NoStream, |h| {
                ExpectedRevision::Exact(h.revision)
            }),
            condition: None,
            events,
        };
        match client.append(request).await {
            Ok(result) => {
                sent.lock().unwrap()[index].acknowledged = Some(result.first_position.0);
            }
            Err(Error::WrongExpectedRevision { .. }) => sent.lock().unwrap()[index].refused = true,
            // The node died under it: this writer stops; the append may or may not be stored.
            Err(_) => return,
        }
    }
}

async fn read_all(url: &str) -> Vec<RecordedEvent> {
    let client = Client::connect(url).await.unwrap();
    let mut all = Vec::new();
    read_to_end(&client, ReadSource::All(None), |e| all.push(e.clone()))
        .await
        .unwrap();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_postgres_lose_nothing_when_one_is_killed() {
    let cluster = cluster::Cluster::start();
    let admin =
        skald_postgres::connect(&skald_postgres::PgUrl::parse(&cluster.url("postgres")).unwrap())
            .await
            .unwrap();
    admin.batch_execute("CREATE DATABASE skald").await.unwrap();
    let url = cluster.postgres_url("skald");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Server> = dirs
        .iter()
        .map(|d| Server::start(d.path(), &["--store", &url]))
        .collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();

    // Subscribers from the beginning on the two nodes that stay up.
    let mut subscribers = Vec::new();
    for node in [1, 2] {
        let received = Arc::new(Mutex::new(Vec::<RecordedEvent>::new()));
        let client = Client::connect(&urls[node]).await.unwrap();
        let into = Arc::clone(&received);
        subscribers.push((
            received,
            tokio::spawn(async move {
                let mut deliveries =
                    Box::pin(client.subscribe(ReadSource::All(None), Start::Beginning));
                while let Some(delivery) = deliveries.next().await {
                    if let Delivery::Event(e) = delivery.unwrap() {
                        into.lock().unwrap().push(e);
                    }
                }
            }),
        ));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..6 {
        writers.push(tokio::spawn(writer(
            urls[w % 3].clone(),
            w,
            Arc::clone(&stop),
            Arc::clone(&sent),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut nodes = nodes.into_iter();
    nodes.next().unwrap().kill9();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let all = read_all(&urls[1]).await;
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let acknowledged = sent.iter().filter(|s| s.acknowledged.is_some()).count();
    let refused = sent.iter().filter(|s| s.refused).count();
    assert!(
        acknowledged > 20,
        "only {acknowledged} appends were acknowledged"
    );
    assert!(
        refused > 0,
        "the writers never contended; the test proves nothing"
    );
    // Dense positions, dense revisions per stream.
    let mut revisions: BTreeMap<&str, u64> = BTreeMap::new();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.position.0, i as u64, "positions have a hole");
        let r = revisions.entry(e.stream.as_str()).or_insert(0);
        assert_eq!(e.revision.0, *r, "{} revisions have a hole", e.stream);
        *r += 1;
    }
    // Every acknowledged append where it was acknowledged; none partly stored; refused
    // ones absent.
    let at: HashMap<EventId, u64> = all.iter().map(|e| (e.id, e.position.0)).collect();
    for s in sent.iter() {
        let found: Vec<Option<&u64>> = s.ids.iter().map(|id| at.get(id)).collect();
        if let Some(first) = s.acknowledged {
            for (i, position) in found.iter().enumerate() {
                assert_eq!(
                    **position.as_ref().expect("acknowledged and lost"),
                    first + i as u64
                );
            }
        } else if s.refused {
            assert!(
                found.iter().all(Option::is_none),
                "a refused append was stored"
            );
        } else {
            let stored = found.iter().filter(|f| f.is_some()).count();
            assert!(
                stored == 0 || stored == s.ids.len(),
                "an append is partly stored"
            );
        }
    }
    // Each subscriber got the whole log, once, in order.
    for (received, task) in subscribers {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while received.lock().unwrap().len() < all.len() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a subscriber fell behind"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        assert_eq!(received.lock().unwrap()[..], all[..]);
    }
    // The killed node, started again, serves the same log and takes appends.
    let again = Server::start(dirs[0].path(), &["--store", &url]);
    assert_eq!(read_all(&again.url).await, all);
    let client = client(&again.url).await;
    let result = client
        .append(AppendRequest {
            stream: StreamName::new("acct-9").unwrap(),
            expected: ExpectedRevision::NoStream,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Opened").unwrap(),
                EventData::json("{}").unwrap(),
            )],
        })
        .await
        .unwrap();
    assert_eq!(result.first_position.0, all.len() as u64);
    let (status, stderr) = again.terminate();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
}
