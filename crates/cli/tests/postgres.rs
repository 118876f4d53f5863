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

/// Network namespaces for a partition: PostgreSQL in one, on a bridge there, and each node in
/// one of its own, linked to the bridge by a veth pair that `cut_node` takes down on the
/// bridge's side (packets then vanish without an error, as in a real partition); nodes reach
/// PostgreSQL and each other over the bridge (10.201.0.0/24). A second pair links each node to
/// this process. Removed when dropped.
struct Partition {
    id: u32,
    db: String,
    nodes: usize,
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
        Self::with_nodes(1)
    }

    fn with_nodes(nodes: usize) -> Self {
        // Tests of this process run at once, each with partitions of its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 100 * 2 + n) % 200 + 20;
        let p = Self {
            id,
            db: format!("skald-db-{id}"),
            nodes,
        };
        ip(&["netns", "add", &p.db]);
        ip(&["-n", &p.db, "link", "set", "lo", "up"]);
        let bridge = p.bridge();
        ip(&["-n", &p.db, "link", "add", &bridge, "type", "bridge"]);
        ip(&["-n", &p.db, "addr", "add", "10.201.0.1/24", "dev", &bridge]);
        ip(&["-n", &p.db, "link", "set", &bridge, "up"]);
        for k in 0..nodes {
            let ns = p.namespace(k);
            let (vd, vn, vt, vr) = p.links(k);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["link", "add", &vd, "type", "veth", "peer", "name", &vn]);
            ip(&["link", "set", &vd, "netns", &p.db]);
            ip(&["-n", &p.db, "link", "set", &vd, "master", &bridge]);
            ip(&["-n", &p.db, "link", "set", &vd, "up"]);
            ip(&["link", "set", &vn, "netns", &ns]);
            let inside = format!("{}/24", p.bridge_address(k));
            ip(&["-n", &ns, "addr", "add", &inside, "dev", &vn]);
            ip(&["-n", &ns, "link", "set", &vn, "up"]);
            ip(&["link", "add", &vt, "type", "veth", "peer", "name", &vr]);
            ip(&["link", "set", &vr, "netns", &ns]);
            ip(&[
                "addr",
                "add",
                &format!("10.{}.{id}.1/24", 202 + k),
                "dev",
                &vt,
            ]);
            ip(&["link", "set", &vt, "up"]);
            let outside = format!("{}/24", p.node_address_of(k));
            ip(&["-n", &ns, "addr", "add", &outside, "dev", &vr]);
            ip(&["-n", &ns, "link", "set", &vr, "up"]);
        }
        p
    }

    fn bridge(&self) -> String {
        format!("skbr{}", self.id)
    }

    fn namespace(&self, k: usize) -> String {
        format!("skald-node-{}-{k}", self.id)
    }

    fn links(&self, k: usize) -> (String, String, String, String) {
        let id = self.id;
        (
            format!("skvd{id}{k}"),
            format!("skvn{id}{k}"),
            format!("skvt{id}{k}"),
            format!("skvr{id}{k}"),
        )
    }

    /// Node `k`'s address on the bridge, where PostgreSQL and the other nodes reach it.
    fn bridge_address(&self, k: usize) -> String {
        format!("10.201.0.{}", k + 2)
    }

    /// Node `k`'s address as this process reaches it.
    fn node_address_of(&self, k: usize) -> String {
        format!("10.{}.{}.2", 202 + k, self.id)
    }

    fn cut_node(&self, k: usize) {
        ip(&["-n", &self.db, "link", "set", &self.links(k).0, "down"]);
    }

    fn heal_node(&self, k: usize) {
        ip(&["-n", &self.db, "link", "set", &self.links(k).0, "up"]);
    }

    fn cut(&self) {
        self.cut_node(0);
    }

    fn heal(&self) {
        self.heal_node(0);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for k in 0..self.nodes {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &self.links(k).2])
                .output();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.namespace(k)])
                .output();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.db])
            .output();
    }
}

/// `skald serve` inside the node's namespace, listening on its address there.
fn serve_in(partition: &Partition, dir: &std::path::Path, store: &str) -> Server {
    serve_node(partition, 0, dir, store, "")
}

/// `skald serve` inside node `k`'s namespace, listening on every address there and
/// advertising its bridge address to the other nodes; `extra` is more of the config file.
fn serve_node(
    partition: &Partition,
    k: usize,
    dir: &std::path::Path,
    store: &str,
    extra: &str,
) -> Server {
    use std::io::{BufRead, BufReader};
    let config = dir.join("skald.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npostgres_timeout_ms = 1000\n\n[cluster]\nadvertise = \"http://{}:7340\"\n{extra}",
            partition.bridge_address(k)
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &partition.namespace(k),
            support::SKALD,
            "serve",
        ])
        .args(["--store", store, "--listen", "0.0.0.0:7340", "--insecure"])
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
        url: format!("http://{}:7340", partition.node_address_of(k)),
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

/// Polls one batch of `ledger` through `http` as `consumer`: the positions and ack ids, or
/// `None` when the node answered anything but 200 (it cannot serve it now).
async fn poll_group(
    http: &support::Http,
    consumer: &str,
    count: usize,
) -> Option<Vec<(u64, serde_json::Value)>> {
    let (status, body) = http
        .call(
            hyper::Method::GET,
            &format!("/v1/groups/ledger/messages?consumer={consumer}&count={count}&wait=250"),
            "application/json",
            String::new(),
        )
        .await
        .ok()?;
    if status != hyper::StatusCode::OK {
        return None;
    }
    let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Some(
        batch["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["event"]["position"].as_u64().unwrap(), m["ackId"].clone()))
            .collect(),
    )
}

/// [`poll_group`] as consumer `c1`, 25 at a time.
async fn poll_ledger(http: &support::Http) -> Option<Vec<(u64, serde_json::Value)>> {
    poll_group(http, "c1", 25).await
}

async fn ack_ledger(http: &support::Http, ids: Vec<serde_json::Value>) -> bool {
    matches!(
        http.call(
            hyper::Method::POST,
            "/v1/groups/ledger/ack",
            "application/json",
            serde_json::json!({ "ids": ids }).to_string(),
        )
        .await,
        Ok((hyper::StatusCode::OK, _))
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_open(url: &str) -> Ws {
    let url = format!("{}/v1/ws", url.replacen("http://", "ws://", 1));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn ws_send(ws: &mut Ws, message: serde_json::Value) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        message.to_string().into(),
    ))
    .await
    .unwrap();
}

/// The next JSON message on `ws`.
async fn ws_next(ws: &mut Ws) -> serde_json::Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Joins `ledger` as subscription `w` on `ws`: the node's answer.
async fn ws_join(ws: &mut Ws) -> serde_json::Value {
    ws_send(
        ws,
        serde_json::json!({"type": "subscribe", "id": "w", "group": "ledger", "prefetch": 5,
                           "consumer": "ws-1"}),
    )
    .await;
    ws_next(ws).await
}

/// The positions and ack ids of a `messages` message.
fn ws_batch(message: &serde_json::Value) -> Vec<(u64, serde_json::Value)> {
    assert_eq!(message["type"], "messages", "{message}");
    message["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["event"]["position"].as_u64().unwrap(), m["ackId"].clone()))
        .collect()
}

async fn ws_ack(ws: &mut Ws, batch: &[(u64, serde_json::Value)]) {
    let ids: Vec<_> = batch.iter().map(|(_, id)| id.clone()).collect();
    ws_send(
        ws,
        serde_json::json!({"type": "ack", "id": "w", "ackIds": ids}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_runs_on_one_node_serves_consumers_on_any_and_moves_when_that_node_is_killed() {
    const EVENTS: u64 = 300;
    const LEASE_MS: u64 = 1500;
    let cluster = cluster::Cluster::start();
    cluster.database("skald").await;
    let url = cluster.postgres_url("skald");
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, urls) = support::start_nodes(dir.path(), 3, &url, LEASE_MS);
    let owner = support::owner_among(&urls, Duration::from_secs(30)).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let creator = support::Http::new(&urls[followers[0]]);
    let consumer = support::Http::new(&urls[followers[1]]);

    // Created through a node that does not run the groups: forwarded to the one that does.
    let (status, body) = creator
        .call(
            hyper::Method::POST,
            "/v1/groups",
            "application/json",
            serde_json::json!({"name": "ledger", "source": {"category": "order"},
                               "checkpointAfterMs": 20})
            .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        hyper::StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let mut stored = std::collections::BTreeSet::new();
    for i in 0..EVENTS {
        let (status, body) = support::Http::new(&urls[(i % 3) as usize])
            .call(
                hyper::Method::POST,
                &format!("/v1/streams/order-{}", i % 7),
                "application/json",
                serde_json::json!({"events": [{"type": "Placed", "data": {"i": i}}]}).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(status, hyper::StatusCode::CREATED, "{body:?}");
        let result: serde_json::Value = serde_json::from_slice(&body).unwrap();
        stored.insert(result["firstPosition"].as_u64().unwrap());
    }

    // A consumer on the third node takes and acknowledges a third of the messages, then
    // holds one batch without acknowledging it while the owner is killed.
    let mut acked: std::collections::BTreeSet<u64> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < 100 {
        assert!(std::time::Instant::now() < deadline, "the consumer starved");
        let batch = poll_ledger(&consumer)
            .await
            .expect("served through a follower");
        let ids = batch.iter().map(|(_, id)| id.clone()).collect();
        assert!(ack_ledger(&consumer, ids).await);
        acked.extend(batch.iter().map(|(p, _)| *p));
    }
    // The gRPC API is forwarded too: a unary call and a bidirectional consumer stream,
    // through the node that created the group.
    let grpc = Client::connect(&urls[followers[0]]).await.unwrap();
    let info = grpc.group("ledger").await.expect("GetGroup forwarded");
    assert_eq!(info.name, "ledger");
    let mut streamed = grpc.consume("ledger", "grpc-1", 10).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(30), streamed.next())
        .await
        .expect("a batch over the forwarded stream")
        .unwrap()
        .expect("the stream is open");
    assert!(!batch.is_empty());
    let ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
    assert_eq!(streamed.ack(&ids).await.unwrap().done, ids.len() as u64);
    acked.extend(batch.iter().map(|m| m.event.position.0));
    drop(streamed);
    // A WebSocket consumer on a node that does not run the group is relayed to the one that
    // does. At most five messages are in flight to it (its prefetch), so that receiving
    // twenty proves its acks reached the owner.
    let mut ws = ws_open(&urls[followers[0]]).await;
    let joined = ws_join(&mut ws).await;
    assert_eq!(joined["type"], "subscribed", "{joined}");
    // A socket another node opened to relay is not relayed again by a node that does not run
    // the groups: two nodes that disagree about the owner for a moment cannot pass a consumer
    // back and forth.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/v1/ws",
            urls[followers[1]].replacen("http://", "ws://", 1)
        );
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("skald-forwarded-by", "http://elsewhere".parse().unwrap());
        let mut relayed = tokio_tungstenite::connect_async(request).await.unwrap().0;
        let refused = ws_join(&mut relayed).await;
        assert_eq!(refused["problem"]["status"], 503, "{refused}");
    }
    let mut over_ws = 0;
    while over_ws < 20 {
        let batch = ws_batch(&ws_next(&mut ws).await);
        assert!(batch.len() <= 5, "{batch:?}");
        ws_ack(&mut ws, &batch).await;
        over_ws += batch.len();
        acked.extend(batch.iter().map(|(p, _)| *p));
    }
    // The owner's refusal comes back as it is: an unknown ack id names the subscription.
    ws_send(
        &mut ws,
        serde_json::json!({"type": "ack", "id": "w", "ackIds": ["no-such-message"]}),
    )
    .await;
    let refused = loop {
        let message = ws_next(&mut ws).await;
        if message["type"] == "error" {
            break message;
        }
        // Messages delivered meanwhile are held unacknowledged through the kill below.
        ws_batch(&message);
    };
    assert_eq!(refused["id"], "w", "{refused}");
    assert_eq!(refused["problem"]["status"], 400, "{refused}");
    let held: Vec<u64> = loop {
        let batch = poll_ledger(&consumer).await.unwrap();
        if !batch.is_empty() {
            break batch.into_iter().map(|(p, _)| p).collect();
        }
    };
    nodes[owner].take().unwrap().kill9();
    let killed = std::time::Instant::now();
    let survivors: Vec<String> = followers.iter().map(|&i| urls[i].clone()).collect();
    let new_owner = support::owner_among(&survivors, Duration::from_secs(30)).await;
    let took_over = killed.elapsed();
    assert!(
        took_over <= Duration::from_millis(2 * LEASE_MS + 1000),
        "another node took over after {took_over:?}, more than two leases of {LEASE_MS} ms"
    );
    eprintln!("took over {took_over:?} after the owner was killed");
    // The relayed WebSocket consumer was told that its owner went away; joined again on the
    // same socket, it is relayed to the new owner (or served by its node, if that took over).
    let ended = loop {
        let message = ws_next(&mut ws).await;
        if message["type"] == "error" {
            break message;
        }
        ws_batch(&message);
    };
    assert_eq!(ended["id"], "w", "{ended}");
    assert_eq!(ended["problem"]["status"], 503, "{ended}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let joined = ws_join(&mut ws).await;
        if joined["type"] == "subscribed" {
            break;
        }
        assert_eq!(joined["problem"]["status"], 503, "{joined}");
        assert!(std::time::Instant::now() < deadline, "{joined}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batch = ws_batch(&ws_next(&mut ws).await);
    ws_ack(&mut ws, &batch).await;
    acked.extend(batch.iter().map(|(p, _)| *p));
    ws_send(
        &mut ws,
        serde_json::json!({"type": "unsubscribe", "id": "w"}),
    )
    .await;
    loop {
        // Messages delivered after the ack go back to the group when the consumer leaves.
        let message = ws_next(&mut ws).await;
        if message["type"] == "unsubscribed" {
            break;
        }
        ws_batch(&message);
    }

    // The new owner delivers what was held unacknowledged again, and everything else; no
    // acknowledged message is lost.
    let mut redelivered_held = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (acked.len() as u64) < EVENTS {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {EVENTS} acknowledged",
            acked.len()
        );
        let Some(batch) = poll_ledger(&consumer).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        redelivered_held |= batch.iter().any(|(p, _)| held.contains(p));
        let ids = batch.iter().map(|(_, id)| id.clone()).collect();
        if ack_ledger(&consumer, ids).await {
            acked.extend(batch.iter().map(|(p, _)| *p));
        }
    }
    assert!(
        redelivered_held,
        "the batch held at the kill was not delivered again"
    );
    assert_eq!(acked, stored);
    let (status, body) = support::Http::new(&survivors[1 - new_owner])
        .call(
            hyper::Method::GET,
            "/v1/groups/ledger",
            "application/json",
            String::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, hyper::StatusCode::OK);
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["stats"]["inFlight"], 0, "{info}");
    // A graceful stop gives the lease up: the last node takes over at its next round, well
    // before the lease would have run out.
    let (status, stderr) = nodes[followers[new_owner]].take().unwrap().terminate();
    assert!(status.success(), "{stderr}");
    let stopped = std::time::Instant::now();
    let last = [survivors[1 - new_owner].clone()];
    support::owner_among(&last, Duration::from_secs(30)).await;
    assert!(
        stopped.elapsed() < Duration::from_millis(LEASE_MS),
        "the last node took over {:?} after a graceful stop",
        stopped.elapsed()
    );
    for node in nodes.into_iter().flatten() {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}

/// One poll of `ledger` as `consumer`, ten at a time: the positions only.
async fn poll_as(http: &support::Http, consumer: &str) -> Option<Vec<u64>> {
    let batch = poll_group(http, consumer, 10).await?;
    Some(batch.into_iter().map(|(p, _)| p).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_cut_off_from_postgres_stops_before_another_node_takes_over() {
    use hyper::{Method, StatusCode};
    use std::time::Instant;
    const LEASE_MS: u64 = 2000;
    let partition = Partition::with_nodes(2);
    let cluster = cluster::Cluster::start_in_netns(&partition.db, "10.201.0.1", "10.201.0.0/24");
    cluster.database("skald").await;
    let store = "postgres://postgres@10.201.0.1:5432/skald";
    let lease = format!("lease_ms = {LEASE_MS}\n");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // Node A starts first and takes the lease; B follows it.
    let a = serve_node(&partition, 0, dirs[0].path(), store, &lease);
    assert_eq!(
        support::owner_among(std::slice::from_ref(&a.url), Duration::from_secs(30)).await,
        0
    );
    let b = serve_node(&partition, 1, dirs[1].path(), store, &lease);
    let urls = vec![a.url.clone(), b.url.clone()];
    assert_eq!(
        support::owner_among(&urls, Duration::from_secs(30)).await,
        0
    );
    let (a_http, b_http) = (support::Http::new(&a.url), support::Http::new(&b.url));

    // A group created through B (forwarded to A over the bridge), whose messages stay with
    // their consumer for a minute: only a new owner delivers a held one again.
    let (status, body) = b_http
        .call(
            Method::POST,
            "/v1/groups",
            "application/json",
            serde_json::json!({"name": "ledger", "source": {"category": "order"},
                               "checkpointAfterMs": 20, "messageTimeoutMs": 60000})
            .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    for i in 0..40 {
        let (status, _) = a_http
            .call(
                Method::POST,
                &format!("/v1/streams/order-{}", i % 5),
                "application/json",
                format!(r#"{{"events": [{{"type": "Placed", "data": {{"i": {i}}}}}]}}"#),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED);
    }
    // A consumer on A holds a batch, unacknowledged.
    let held = poll_as(&a_http, "on-a").await.expect("A serves the group");
    assert!(!held.is_empty());

    partition.cut_node(0);
    let cut = Instant::now();
    // From the consumers' side: A keeps serving only until its lease runs out by its own
    // clock; B delivers the held messages again only once it owns the group. Every batch A
    // delivers must arrive before the first one B delivers. The two consumers poll at once,
    // each on its own task.
    let on_a = tokio::spawn(async move {
        let mut last_delivery = None;
        loop {
            assert!(
                cut.elapsed() < Duration::from_secs(30),
                "A still serves the group"
            );
            match poll_as(&a_http, "on-a").await {
                Some(batch) if !batch.is_empty() => last_delivery = Some(Instant::now()),
                Some(_) => {}
                None => return (last_delivery, Instant::now()),
            }
        }
    });
    let on_b = tokio::spawn(async move {
        loop {
            assert!(
                cut.elapsed() < Duration::from_secs(30),
                "B never served the group"
            );
            if let Some(batch) = poll_as(&b_http, "on-b").await
                && !batch.is_empty()
            {
                return (Instant::now(), batch);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let (last_from_a, a_refused) = on_a.await.unwrap();
    let (first_from_b, taken_by_b) = on_b.await.unwrap();
    assert!(
        a_refused < first_from_b,
        "A still served the group {:?} after the cut, B delivered at {:?}",
        a_refused - cut,
        first_from_b - cut
    );
    if let Some(last) = last_from_a {
        assert!(last < first_from_b, "two owners delivered at once");
    }
    assert!(
        a_refused - cut < Duration::from_millis(LEASE_MS),
        "A served the group {:?} after it was cut off, longer than its lease",
        a_refused - cut
    );
    assert!(
        taken_by_b.iter().any(|p| held.contains(p)),
        "B did not deliver again what A's consumer held: {taken_by_b:?}, held {held:?}"
    );
    eprintln!(
        "A stopped serving {:?} after the cut; B delivered {:?} after it",
        a_refused - cut,
        first_from_b - cut
    );

    // Healed, A rejoins as a follower of B and forwards to it.
    partition.heal_node(0);
    assert_eq!(
        support::owner_among(&urls, Duration::from_secs(30)).await,
        1
    );
    assert!(
        poll_as(&support::Http::new(&urls[0]), "on-a")
            .await
            .is_some(),
        "A forwards to B"
    );
    for node in [a, b] {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}
