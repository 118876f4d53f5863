//! One scenario, run against the embedded store directly and against a server through the
//! client: both must answer every step the same way (results, positions, revisions, the kind
//! and members of every error). Also: subscriptions and whole reads through the client, and
//! calls retried across a server restart.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use skald_client::{Client, ClientOptions, Delivery, RetryPolicy, Start};
use skald_core::{
    AppendCondition, AppendRequest, Direction, Error, EventData, EventId, EventStore, EventType,
    ExpectedRevision, Metadata, Position, ProposedEvent, Query, QueryItem, ReadRequest, ReadSource,
    Revision, StreamName, Tag,
};

mod support;

impl support::Backend for skald_postgres::PgStore {
    fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send {
        skald_postgres::PgStore::shutdown(self)
    }
}

/// A throwaway PostgreSQL, for the scenario on that backend.
#[path = "../../postgres/tests/support/mod.rs"]
mod cluster;

/// A [`skald_postgres::PgStore`] on a new database `name` of `cluster`, without waiting for
/// commits to reach the disk (tests only).
async fn pg_store(cluster: &cluster::Cluster, name: &str) -> skald_postgres::PgStore {
    use skald_postgres::{PgOptions, PgStore};
    let mut options = PgOptions::new(cluster.database(name).await);
    options.durability = skald_core::Durability::None;
    PgStore::open(options).await.unwrap()
}

use support::{serve, store};

fn id(n: u128) -> EventId {
    EventId(uuid::Uuid::from_u128(n))
}

fn event(n: u128, event_type: &str, data: &str, tags: &[&str]) -> ProposedEvent {
    ProposedEvent {
        id: id(n),
        event_type: EventType::new(event_type).unwrap(),
        data: EventData::json(data).unwrap(),
        metadata: Metadata::new(r#"{"correlationId":"c-1"}"#).unwrap(),
        tags: tags.iter().map(|t| Tag::new(*t).unwrap()).collect(),
        source: None,
    }
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn append(name: &str, expected: ExpectedRevision, events: Vec<ProposedEvent>) -> AppendRequest {
    AppendRequest {
        stream: stream(name),
        expected,
        condition: None,
        events,
    }
}

fn placed_for(customer: &str) -> Query {
    Query {
        items: vec![QueryItem {
            types: vec![EventType::new("Placed").unwrap()],
            tags: vec![Tag::new(customer).unwrap()],
        }],
    }
}

/// An error as the transcript records it: its kind and structured members, not its wording
/// (which says where in a request the problem is, and differs by transport).
fn error_line(e: &Error) -> String {
    match e {
        Error::InvalidEvent { .. } => "InvalidEvent".to_owned(),
        Error::IdReused { id, position, .. } => {
            format!("IdReused {{ id: {id:?}, position: {position:?} }}")
        }
        other => format!("{other:?}"),
    }
}

/// The scenario: every kind of append and read, each answer written down.
async fn scenario<S: EventStore>(store: &S) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |step: &str, line: String| out.push(format!("{step}: {line}"));
    macro_rules! step {
        ($name:expr, $call:expr) => {
            match $call.await {
                Ok(value) => note($name, format!("{value:?}")),
                Err(e) => note($name, error_line(&e)),
            }
        };
    }
    use ExpectedRevision::*;
    step!(
        "first append",
        store.append(append(
            "order-1",
            NoStream,
            vec![
                event(1, "Placed", r#"{"total":5}"#, &["customer:1"]),
                event(2, "Paid", "{}", &["customer:1"])
            ]
        ))
    );
    step!(
        "no stream, again",
        store.append(append(
            "order-1",
            NoStream,
            vec![event(3, "Shipped", "{}", &[])]
        ))
    );
    step!(
        "exact 1",
        store.append(append(
            "order-1",
            Exact(Revision(1)),
            vec![event(3, "Shipped", "{}", &[])]
        ))
    );
    step!(
        "exact 7",
        store.append(append(
            "order-1",
            Exact(Revision(7)),
            vec![event(4, "Lost", "{}", &[])]
        ))
    );
    step!(
        "exists, on a new stream",
        store.append(append(
            "order-2",
            StreamExists,
            vec![event(4, "Placed", "{}", &[])]
        ))
    );
    step!(
        "any",
        store.append(append(
            "order-2",
            Any,
            vec![event(4, "Placed", "{}", &["customer:2"])]
        ))
    );
    step!(
        "a retry of the first append",
        store.append(append(
            "order-1",
            NoStream,
            vec![
                event(1, "Placed", r#"{"total":5}"#, &["customer:1"]),
                event(2, "Paid", "{}", &["customer:1"])
            ]
        ))
    );
    step!(
        "an id reused for other data",
        store.append(append(
            "order-3",
            Any,
            vec![event(1, "Placed", r#"{"total":6}"#, &[])]
        ))
    );
    let mut conditioned = append(
        "order-3",
        Any,
        vec![event(5, "Placed", "{}", &["customer:2"])],
    );
    conditioned.condition = Some(AppendCondition {
        query: placed_for("customer:2"),
        after: None,
    });
    step!("a condition that fails", store.append(conditioned.clone()));
    conditioned.condition = Some(AppendCondition {
        query: placed_for("customer:2"),
        after: Some(Position(3)),
    });
    step!("a condition that holds", store.append(conditioned));
    step!("no events", store.append(append("order-4", Any, vec![])));
    let many_tags: Vec<String> = (0..100).map(|i| format!("t:{i}")).collect();
    let tags: Vec<&str> = many_tags.iter().map(String::as_str).collect();
    step!(
        "too many tags",
        store.append(append(
            "order-4",
            Any,
            vec![event(6, "Placed", "{}", &tags)]
        ))
    );
    step!(
        "text data",
        store.append(append(
            "note-1",
            Any,
            vec![ProposedEvent {
                data: EventData::with_content_type("text/plain", b"hello".to_vec()).unwrap(),
                source: Some("urn:test".into()),
                ..event(7, "Noted", "{}", &[])
            }]
        ))
    );

    // Reads: pages with their `next`, every source, both directions.
    let read = |source: ReadSource, from: Option<u64>, direction: Direction, limit: usize| {
        store.read(ReadRequest {
            source,
            from,
            direction,
            limit,
        })
    };
    let order1 = || ReadSource::Stream(stream("order-1"));
    step!(
        "stream, first page",
        read(order1(), None, Direction::Forward, 2)
    );
    step!(
        "stream, second page",
        read(order1(), Some(2), Direction::Forward, 2)
    );
    step!(
        "stream, backward",
        read(order1(), None, Direction::Backward, 2)
    );
    step!(
        "stream, backward from 0",
        read(order1(), Some(0), Direction::Backward, 5)
    );
    step!(
        "stream, past the end",
        read(order1(), Some(10), Direction::Forward, 5)
    );
    step!(
        "a stream with no events",
        read(
            ReadSource::Stream(stream("nothing-1")),
            None,
            Direction::Forward,
            5
        )
    );
    step!(
        "all",
        read(ReadSource::All(None), None, Direction::Forward, 4)
    );
    step!(
        "all, from 4",
        read(ReadSource::All(None), Some(4), Direction::Forward, 100)
    );
    step!(
        "all, filtered",
        read(
            ReadSource::All(Some(placed_for("customer:2"))),
            None,
            Direction::Forward,
            100
        )
    );
    step!(
        "category",
        read(
            ReadSource::Category(skald_core::Category::new("order").unwrap()),
            Some(1),
            Direction::Forward,
            2
        )
    );
    step!(
        "query",
        read(
            ReadSource::Query(Query {
                items: vec![
                    QueryItem {
                        types: vec![],
                        tags: vec![Tag::new("customer:1").unwrap()],
                    },
                    QueryItem {
                        types: vec![EventType::new("Noted").unwrap()],
                        tags: vec![],
                    }
                ],
            }),
            None,
            Direction::Forward,
            100
        )
    );
    step!(
        "backward over the global log",
        read(ReadSource::All(None), None, Direction::Backward, 5)
    );
    step!("head", store.stream_head(&stream("order-1")));
    step!("head of nothing", store.stream_head(&stream("nothing-1")));
    step!("next position", store.next_position());
    step!("head position", async {
        store.info().await.map(|i| i.head_position)
    });
    out.into_iter().map(|line| normalize_times(&line)).collect()
}

/// Recorded times differ between two runs; everything else must not.
fn normalize_times(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("recorded_at: Timestamp(") {
        out.push_str(&rest[..i]);
        out.push_str("recorded_at: T");
        let after = &rest[i + "recorded_at: Timestamp(".len()..];
        let end = after.find(')').unwrap();
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn the_client_answers_every_step_as_the_embedded_store_does() {
    let embedded_dir = tempfile::tempdir().unwrap();
    let embedded = store(embedded_dir.path());
    let expected = scenario(&embedded).await;
    embedded.shutdown().await;

    let server_dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(server_dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    let remote = scenario(&client).await;
    for (i, (a, b)) in expected.iter().zip(&remote).enumerate() {
        assert_eq!(a, b, "step {i} differs");
    }
    assert_eq!(expected.len(), remote.len());
    // The scenario did reach the server: what it stored is what the embedded store stored.
    assert_eq!(
        server.store.next_position().await.unwrap(),
        client.next_position().await.unwrap()
    );
    server.stop().await;
}

/// The same scenario on the PostgreSQL backend: directly, and through a server on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_backend_answers_every_step_as_the_embedded_store_does() {
    let embedded_dir = tempfile::tempdir().unwrap();
    let embedded = store(embedded_dir.path());
    let expected = scenario(&embedded).await;
    embedded.shutdown().await;

    let cluster = cluster::Cluster::start();
    let direct = pg_store(&cluster, "direct").await;
    let answered = scenario(&direct).await;
    for (i, (a, b)) in expected.iter().zip(&answered).enumerate() {
        assert_eq!(a, b, "step {i} differs on PostgreSQL");
    }
    assert_eq!(expected.len(), answered.len());
    direct.shutdown().await;

    let store = Arc::new(pg_store(&cluster, "served").await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = support::serve_store(store, listener, Default::default()).await;
    let client = Client::connect(&url).await.unwrap();
    let remote = scenario(&client).await;
    for (i, (a, b)) in expected.iter().zip(&remote).enumerate() {
        assert_eq!(a, b, "step {i} differs through a server on PostgreSQL");
    }
    assert_eq!(expected.len(), remote.len());
    assert_eq!(
        server.store.next_position().await.unwrap(),
        client.next_position().await.unwrap()
    );
    server.stop().await;
}

#[tokio::test]
async fn reads_and_subscriptions_stream_and_resume_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(dir.path(), listener).await;
    // The default options: they ride out a restart of a few seconds.
    let client = Client::connect(&format!("http://{addr}")).await.unwrap();
    // 10,000 events in 100 appends; read back whole, across pages and messages.
    for batch in 0..100u128 {
        let events = (0..100)
            .map(|i| event(batch * 100 + i + 1, "Tick", "{}", &[]))
            .collect();
        client
            .append(append(
                &format!("tick-{}", batch % 7),
                ExpectedRevision::Any,
                events,
            ))
            .await
            .unwrap();
    }
    let all: Vec<_> = client
        .read_events(ReadRequest {
            source: ReadSource::All(None),
            from: None,
            direction: Direction::Forward,
            limit: 0,
        })
        .collect()
        .await;
    assert_eq!(all.len(), 10_000);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, e)| e.as_ref().unwrap().position.0 == i as u64),
        "gapless and in order"
    );

    // A subscription catches up, goes live, and survives a restart of the server.
    let subscription = client.subscribe(
        ReadSource::Category(skald_core::Category::new("tick").unwrap()),
        Start::Position(9_990),
    );
    futures_util::pin_mut!(subscription);
    let mut positions = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Delivery::Event(e) => positions.push(e.position.0),
            Delivery::CaughtUp { position } => {
                assert_eq!(position, 10_000);
                break;
            }
        }
    }
    assert_eq!(positions, (9_990..10_000).collect::<Vec<_>>());
    server.stop().await;

    // The server restarts on the same port and data, 3 s later; the client retries its way
    // back, calls and subscription alike.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = serve(dir.path(), listener).await;
    let appended = client
        .append(append(
            "tick-1",
            ExpectedRevision::Any,
            vec![event(20_001, "Tick", "{}", &[])],
        ))
        .await
        .unwrap();
    assert_eq!(appended.first_position, Position(10_000));
    let mut live = Vec::new();
    while live.is_empty() {
        match tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .expect("the subscription resumes")
            .unwrap()
            .unwrap()
        {
            Delivery::Event(e) => live.push(e.position.0),
            Delivery::CaughtUp { .. } => {}
        }
    }
    assert_eq!(live, [10_000], "nothing missed, nothing twice");

    // A retried append whose first try was stored is a replay, not a second copy.
    let again = client
        .append(append(
            "tick-1",
            ExpectedRevision::Any,
            vec![event(20_001, "Tick", "{}", &[])],
        ))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.first_position, Position(10_000));
    server.stop().await;

    // With no server at all, calls give up with Unavailable once the retries are spent.
    let impatient = Client::connect_with(
        &format!("http://{addr}"),
        ClientOptions {
            retry: RetryPolicy {
                attempts: 2,
                first_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            },
            ..ClientOptions::default()
        },
    )
    .await;
    match impatient {
        Err(Error::Unavailable(_)) => {}
        Ok(c) => assert!(matches!(c.info().await, Err(Error::Unavailable(_)))),
        Err(other) => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A subscriber that reads too slowly is ended by the server with `subscriber-stalled`; the
/// client resubscribes after the last event it delivered, so the slow reader still gets every
/// event once, in order, and no error.
#[tokio::test]
async fn a_slow_subscriber_resumes_after_the_server_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = support::serve_with(
        dir.path(),
        listener,
        skald_server::HttpConfig {
            stall_timeout_ms: 100,
            ..skald_server::HttpConfig::default()
        },
    )
    .await;
    let client = Client::connect(&url).await.unwrap();
    // 4,000 events of 2 KiB: 8 MiB, more than HTTP/2 windows and the server's queue hold.
    let data = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2048));
    for batch in 0..40u128 {
        let events = (0..100)
            .map(|i| event(batch * 100 + i + 1, "Tick", &data, &[]))
            .collect();
        client
            .append(append("tick-1", ExpectedRevision::Any, events))
            .await
            .unwrap();
    }
    let subscription = client.subscribe(ReadSource::All(None), Start::Beginning);
    futures_util::pin_mut!(subscription);
    let mut positions = Vec::new();
    while positions.len() < 4_000 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("the subscription goes on")
            .expect("the subscription does not end")
            .expect("no error reaches the reader");
        if let Delivery::Event(e) = delivery {
            positions.push(e.position.0);
            if positions.len() == 1 {
                // Reads nothing for far longer than the stall timeout.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    assert_eq!(positions, (0..4_000).collect::<Vec<_>>());
    let metrics = get_metrics(&url).await;
    let stalled: u64 = metrics
        .lines()
        .find(|l| l.starts_with("skald_subscribers_stalled_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("the metric is there");
    assert!(
        stalled >= 1,
        "the server did end the subscriber:\n{metrics}"
    );
    server.stop().await;
}

/// Settings that cannot work are refused as such, not as an unreachable server that a
/// retry might reach; a server that accepts and never answers is given up on after the
/// per-call timeout.
#[tokio::test]
async fn bad_settings_and_silent_servers() {
    for url in [
        "127.0.0.1:7340",
        "ftp://127.0.0.1:7340",
        "http://exa mple:1",
    ] {
        match Client::connect(url).await {
            Err(Error::InvalidConfig(reason)) => assert!(!reason.is_empty()),
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }
    let with_ca = ClientOptions {
        ca_certificate_pem: Some(b"not a certificate".to_vec()),
        ..ClientOptions::default()
    };
    match Client::connect_with("http://127.0.0.1:7340", with_ca).await {
        Err(Error::InvalidConfig(reason)) => assert!(reason.contains("https://"), "{reason}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }

    // Accepts connections, reads what comes, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        loop {
            let (socket, _) = silent.accept().await.unwrap();
            open.push(socket);
        }
    });
    let options = ClientOptions {
        timeout: Some(Duration::from_millis(200)),
        connect_timeout: Some(Duration::from_millis(500)),
        retry: RetryPolicy {
            attempts: 2,
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
        },
        ..ClientOptions::default()
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        match Client::connect_with(&format!("http://{addr}"), options).await {
            Ok(client) => client.info().await.map(|_| ()),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("the timeout ends the call");
    assert!(
        matches!(answered, Err(Error::Unavailable(_))),
        "{answered:?}"
    );
    held.abort();
}

/// The server's `GET /metrics`, over a bare HTTP/1.1 connection.
async fn get_metrics(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: skald\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    socket.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// A TCP proxy in front of a server. Once it has passed client bytes holding `marker`, it
/// holds back everything the server sends on that connection until `cut` is notified, then
/// drops the connection; every other connection (and any after the cut) is passed through.
async fn proxy(
    server: std::net::SocketAddr,
    marker: &'static [u8],
    cut: Arc<tokio::sync::Notify>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = upstream.into_split();
            let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (armed, held_up, cut) = (armed.clone(), held.clone(), cut.clone());
            let up = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if buf[..n].windows(marker.len()).any(|w| w == marker)
                        && armed.swap(false, std::sync::atomic::Ordering::SeqCst)
                    {
                        held_up.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let read = tokio::select! {
                        read = server_read.read(&mut buf) => read,
                        () = cut.notified(), if held.load(std::sync::atomic::Ordering::SeqCst) => {
                            // Dropping both halves closes the connection on both sides.
                            up.abort();
                            return;
                        }
                    };
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if held.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A `Start::Now` subscription whose connection drops before its `CaughtUp` arrived: it
/// resubscribes from the position it opened at, so an event appended in between is
/// delivered, not skipped.
#[tokio::test]
async fn a_now_subscription_dropped_before_caught_up_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let server = serve(dir.path(), listener).await;
    let direct = Client::connect(&format!("http://{server_addr}"))
        .await
        .unwrap();
    direct
        .append(append(
            "nowmark-1",
            ExpectedRevision::Any,
            vec![event(1, "Before", "{}", &[])],
        ))
        .await
        .unwrap();
    let cut = Arc::new(tokio::sync::Notify::new());
    let via = proxy(server_addr, b"nowmark-1", cut.clone()).await;
    let client = Client::connect(&format!("http://{via}")).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let subscription = client.subscribe(ReadSource::Stream(stream("nowmark-1")), Start::Now);
        futures_util::pin_mut!(subscription);
        while let Some(delivery) = subscription.next().await {
            if tx.send(delivery).is_err() {
                return;
            }
        }
    });
    // The subscription is open on the server (its CaughtUp held back by the proxy); an event
    // is appended; then the connection drops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    direct
        .append(append(
            "nowmark-1",
            ExpectedRevision::Any,
            vec![event(2, "During", "{}", &[])],
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cut.notify_one();
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery after the drop")
            .unwrap()
            .unwrap()
        {
            Delivery::Event(e) => break e,
            Delivery::CaughtUp { .. } => {
                // Nothing was missed yet only if the next event is the one appended during.
                direct
                    .append(append(
                        "nowmark-1",
                        ExpectedRevision::Any,
                        vec![event(3, "After", "{}", &[])],
                    ))
                    .await
                    .unwrap();
            }
        }
    };
    assert_eq!(
        first.event_type.as_str(),
        "During",
        "the event appended in between"
    );
    reader.abort();
    server.stop().await;
}
