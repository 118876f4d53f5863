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
    cluster.database("skald").await;
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

/// Two network namespaces for a partition: PostgreSQL in one, a node in the other, linked by
/// a veth pair that `cut` takes down on PostgreSQL's side (packets then vanish without an
/// error, as in a real partition); a second pair links the node to this process. Removed
/// when dropped.
struct Partition {
    id: u32,
    db: String,
    node: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Partition {
    fn new() -> Self {
        let id = std::process::id() % 200 + 20;
        let (db, node) = (format!("skald-db-{id}"), format!("skald-node-{id}"));
        let p = Self { id, db, node };
        let (vd, vn, vt, vr) = p.links();
        for ns in [&p.db, &p.node] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["link", "add", &vd, "type", "veth", "peer", "name", &vn]);
        ip(&["link", "set", &vd, "netns", &p.db]);
        ip(&["link", "set", &vn, "netns", &p.node]);
        ip(&["-n", &p.db, "addr", "add", "10.201.0.1/24", "dev", &vd]);
        ip(&["-n", &p.db, "link", "set", &vd, "up"]);
        ip(&["-n", &p.node, "addr", "add", "10.201.0.2/24", "dev", &vn]);
        ip(&["-n", &p.node, "link", "set", &vn, "up"]);
        ip(&["link", "add", &vt, "type", "veth", "peer", "name", &vr]);
        ip(&["link", "set", &vr, "netns", &p.node]);
        ip(&["addr", "add", &format!("10.202.{id}.1/24"), "dev", &vt]);
        ip(&["link", "set", &vt, "up"]);
        ip(&[
            "-n",
            &p.node,
            "addr",
            "add",
            &format!("10.202.{id}.2/24"),
            "dev",
            &vr,
        ]);
        ip(&["-n", &p.node, "link", "set", &vr, "up"]);
        p
    }

    fn links(&self) -> (String, String, String, String) {
        let id = self.id;
        (
            format!("skvd{id}"),
            format!("skvn{id}"),
            format!("skvt{id}"),
            format!("skvr{id}"),
        )
    }

    /// The node's address, as this process reaches it.
    fn node_address(&self) -> String {
        format!("10.202.{}.2", self.id)
    }

    fn cut(&self) {
        ip(&["-n", &self.db, "link", "set", &self.links().0, "down"]);
    }

    fn heal(&self) {
        ip(&["-n", &self.db, "link", "set", &self.links().0, "up"]);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let vt = self.links().2;
        for args in [
            vec!["link", "del", vt.as_str()],
            vec!["netns", "del", self.db.as_str()],
            vec!["netns", "del", self.node.as_str()],
        ] {
            let _ = std::process::Command::new("ip").args(&args).output();
        }
    }
}

/// `skald serve` inside the node's namespace, listening on its address there.
fn serve_in(partition: &Partition, dir: &std::path::Path, store: &str) -> Server {
    use std::io::{BufRead, BufReader};
    let config = dir.join("skald.toml");
    std::fs::write(&config, "[storage]\npostgres_timeout_ms = 1000\n").unwrap();
    let listen = format!("{}:7340", partition.node_address());
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &partition.node, support::SKALD, "serve"])
        .args(["--store", store, "--listen", &listen, "--insecure"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("skald starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    Server {
        child,
        url: format!("http://{listen}"),
        stderr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgres_answers_503_in_time_and_rejoins() {
    use hyper::{Method, StatusCode};
    use std::time::Instant;
    let partition = Partition::new();
    let cluster = cluster::Cluster::start_in_netns(&partition.db, "10.201.0.1", "10.201.0.0/24");
    cluster.database("skald").await;
    let dir = tempfile::tempdir().unwrap();
    let node = serve_in(
        &partition,
        dir.path(),
        "postgres://postgres@10.201.0.1:5432/skald",
    );
    let http = support::Http::new(&node.url);
    let append = |n: usize| {
        let http = http.clone();
        async move {
            http.call(
                Method::POST,
                "/v1/streams/order-1",
                "application/json",
                format!(r#"{{"events": [{{"type": "Placed", "data": {{"n": {n}}}}}]}}"#),
            )
            .await
            .unwrap()
        }
    };
    let mut acknowledged = 0;
    for n in 0..5 {
        assert_eq!(append(n).await.0, StatusCode::CREATED);
        acknowledged += 1;
    }

    partition.cut();
    // Appends and reads answer 503 within the configured second (and the time a connection
    // attempt takes), never hang.
    for _ in 0..3 {
        let started = Instant::now();
        let (status, body) = append(99).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let (status, _) = http
            .call(
                Method::GET,
                "/v1/streams/order-1",
                "application/json",
                String::new(),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http
            .call(
                Method::GET,
                "/health/ready",
                "application/json",
                String::new(),
            )
            .await
            .unwrap();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("PostgreSQL"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready 10 s into the partition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    partition.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = append(100).await;
        if status == StatusCode::CREATED {
            acknowledged += 1;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no append succeeded 30 s after the partition healed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = http.read_all().await;
    let data: Vec<i64> = all
        .iter()
        .map(|e| e["data"]["n"].as_i64().unwrap())
        .collect();
    // Every acknowledged append is there; the refused ones (99) may be, if their commit
    // landed before the answer was lost, but each at most once per try.
    for n in [0, 1, 2, 3, 4, 100] {
        assert!(
            data.contains(&n),
            "acknowledged event {n} is missing: {data:?}"
        );
    }
    assert!(all.len() >= acknowledged);
    let (status, stderr) = node.terminate();
    assert!(status.success(), "{stderr}");
}

/// Appends `count` events to an embedded store in `dir`: tags, metadata, sources, several
/// streams and a system stream, as a real store holds.
async fn fill_embedded(dir: &std::path::Path, from: usize, count: usize) {
    use skald_core::{Metadata, Tag};
    let (store, _) = skald_storage::Store::open(skald_storage::Options {
        data_dir: dir.to_owned(),
        ..skald_storage::Options::default()
    })
    .unwrap();
    for n in from..from + count {
        let stream = if n % 10 == 9 {
            StreamName::system("$audit").unwrap()
        } else {
            StreamName::new(format!("order-{}", n % 4)).unwrap()
        };
        let mut e = ProposedEvent::new(
            EventType::new(["Placed", "Paid"][n % 2]).unwrap(),
            EventData::json(format!("{{\"n\":{n}}}")).unwrap(),
        );
        e.tags = vec![Tag::new(format!("customer:{}", n % 3)).unwrap()];
        e.metadata = Metadata::new(format!("{{\"correlationId\":\"c-{n}\"}}")).unwrap();
        e.source = (n % 3 == 0).then(|| "urn:shop".to_owned());
        store
            .append(AppendRequest {
                stream,
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![e],
            })
            .await
            .unwrap();
    }
    store.shutdown().await;
}

async fn read_embedded(dir: &std::path::Path) -> Vec<RecordedEvent> {
    let (store, _) = skald_storage::Store::open(skald_storage::Options {
        data_dir: dir.to_owned(),
        ..skald_storage::Options::default()
    })
    .unwrap();
    let mut all = Vec::new();
    read_to_end(&store, ReadSource::All(None), |e| all.push(e.clone()))
        .await
        .unwrap();
    store.shutdown().await;
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_an_embedded_store_resumes_and_refuses_another_store() {
    let cluster = cluster::Cluster::start();
    let admin = cluster.admin().await;
    for name in ["moved", "other"] {
        cluster.database(name).await;
    }
    let embedded = tempfile::tempdir().unwrap();
    fill_embedded(embedded.path(), 0, 50).await;
    let url = cluster.postgres_url("moved");
    let migrate = |url: &str| {
        support::skald(&[
            "migrate",
            "--store",
            url,
            "--from-data-dir",
            embedded.path().to_str().unwrap(),
            "--page",
            "7",
        ])
    };
    let (ok, out, err) = migrate(&url);
    assert!(ok, "{out}{err}");
    assert!(out.contains("verified: 50 events"), "{out}");
    assert!(out.contains("the stream, tag and head rows"), "{out}");

    // More events, then again: it goes on after what is there.
    fill_embedded(embedded.path(), 50, 23).await;
    let (ok, out, err) = migrate(&url);
    assert!(ok, "{out}{err}");
    assert!(out.contains("50 events were already copied"), "{out}");
    assert!(
        out.contains("copied 23 events") && out.contains("verified: 73 events"),
        "{out}"
    );

    // A node on the copy serves exactly the embedded store's log, and appends after it.
    let expected = read_embedded(embedded.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = Server::start(dir.path(), &["--store", &url]);
    assert_eq!(read_all(&node.url).await, expected);
    let client = client(&node.url).await;
    let result = client
        .append(AppendRequest {
            stream: StreamName::new("order-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Shipped").unwrap(),
                EventData::json("{}").unwrap(),
            )],
        })
        .await
        .unwrap();
    assert_eq!(result.first_position.0, 73);
    let last_order_1 = expected
        .iter()
        .rfind(|e| e.stream.as_str() == "order-1")
        .unwrap()
        .revision
        .0;
    assert_eq!(result.first_revision.0, last_order_1 + 1);
    let (status, stderr) = node.terminate();
    assert!(status.success(), "{stderr}");

    // A store that is not an earlier copy of this one is refused, and left as it was.
    let other_url = cluster.postgres_url("other");
    let other = skald_postgres::PgStore::open(skald_postgres::PgOptions::new(
        skald_postgres::PgUrl::parse(&other_url).unwrap(),
    ))
    .await
    .unwrap();
    other
        .append(AppendRequest {
            stream: StreamName::new("order-0").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Placed").unwrap(),
                EventData::json("{}").unwrap(),
            )],
        })
        .await
        .unwrap();
    // Refused while a node is connected to the database.
    let (ok, out, err) = migrate(&other_url);
    assert!(!ok, "{out}");
    assert!(err.contains("stop every node"), "{err}");
    other.shutdown().await;
    drop(other);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let open: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'other' \
                 AND application_name LIKE 'skald %'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node's sessions stay open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, out, err) = migrate(&other_url);
    assert!(!ok, "{out}");
    assert!(
        err.contains("differs from the embedded one at position 0"),
        "{err}"
    );
    assert!(err.contains("nothing was copied"), "{err}");
    // Left as it was, and marked unfinished: a node refuses to start on it.
    let other_db = skald_postgres::connect(&skald_postgres::PgUrl::parse(&other_url).unwrap())
        .await
        .unwrap();
    let head: i64 = other_db
        .query_one("SELECT next_position FROM skald.head", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(head, 1);
    match skald_postgres::PgStore::open(skald_postgres::PgOptions::new(
        skald_postgres::PgUrl::parse(&other_url).unwrap(),
    ))
    .await
    {
        Err(skald_core::Error::InvalidConfig(reason)) => {
            assert!(reason.contains("has not finished"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    // A data directory that is not one, and a URL that is not PostgreSQL's.
    let (ok, _, err) = support::skald(&[
        "migrate",
        "--store",
        &url,
        "--from-data-dir",
        "/nonexistent/skald-data",
    ]);
    assert!(!ok && err.contains("is not a directory"), "{err}");
    let (ok, _, err) = support::skald(&[
        "migrate",
        "--store",
        "mysql://a@b/c",
        "--from-data-dir",
        embedded.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("postgres:// URL"), "{err}");
}
