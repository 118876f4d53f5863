//! The gRPC API over a real socket, on the same port as HTTP: appends and every error kind
//! with its details, reads of every source as streams of pages, head and info, catch-up then
//! live subscriptions with resume, a persistent-subscription consumer acking and nacking,
//! health checks, reflection, unknown methods, and HTTP/1.1 still served beside it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use skald_core::EventStore;
use skald_hub::groups::{GroupSettings, NewGroup};
use skald_hub::{SourceSpec, Start};
use skald_proto::v1 as pb;
use skald_proto::v1::groups_client::GroupsClient;
use skald_proto::v1::streams_client::StreamsClient;
use skald_proto::v1::subscriptions_client::SubscriptionsClient;
use skald_server::{Groups, HttpConfig, Hub};
use skald_storage::{Options, Store};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    addr: std::net::SocketAddr,
    store: Store,
    groups: Groups<Store>,
    hub: Hub<Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(http: HttpConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(Options {
            data_dir: dir.path().to_owned(),
            durability: skald_core::Durability::None,
            ..Options::default()
        })
        .unwrap();
        let hub = Hub::start(Arc::new(store.clone()), Default::default());
        let groups = Groups::start(hub.clone()).await.unwrap();
        let sagas = skald_server::Sagas::start(
            hub.clone(),
            Default::default(),
            Arc::new(skald_saga::WallClock),
        )
        .await
        .unwrap();
        let app = skald_server::router_with(groups.clone(), sagas, http);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown_hub = hub.clone();
        let task = tokio::spawn(async move {
            skald_server::listener::serve(listener, app, async move {
                let _ = stopped.await;
                shutdown_hub.shutdown();
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            store,
            groups,
            hub,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(DEADLINE, self.task.take().unwrap())
            .await
            .expect("the server stops with calls open")
            .unwrap();
        self.hub.stopped().await;
        self.store.shutdown().await;
    }
}

fn event(id: &str, event_type: &str, data: &str, tags: &[&str]) -> pb::ProposedEvent {
    pb::ProposedEvent {
        id: id.to_owned(),
        r#type: event_type.to_owned(),
        content_type: String::new(),
        data: data.as_bytes().to_vec(),
        metadata: String::new(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        source: None,
    }
}

fn append(stream: &str, events: Vec<pb::ProposedEvent>) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: stream.to_owned(),
        expected_revision: None,
        condition: None,
        events,
    }
}

/// The ErrorInfo every Skald error carries: its reason and metadata.
fn info(status: &Status) -> (String, HashMap<String, String>) {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "skald");
    assert_eq!(
        info.metadata["type"],
        format!("urn:skald:problem:{}", info.reason)
    );
    (info.reason.clone(), info.metadata.clone())
}

async fn read_all(
    client: &mut StreamsClient<Channel>,
    request: pb::ReadRequest,
) -> Result<Vec<pb::RecordedEvent>, Status> {
    let mut stream = client.read(request).await?.into_inner();
    let mut events = Vec::new();
    while let Some(page) = stream.message().await? {
        assert!(!page.events.is_empty(), "pages are never empty");
        events.extend(page.events);
    }
    Ok(events)
}

fn source(kind: pb::source::Kind) -> Option<pb::Source> {
    Some(pb::Source { kind: Some(kind) })
}

#[tokio::test]
async fn appends_reads_and_their_errors() {
    let server = Server::start(HttpConfig::default()).await;
    let mut client = StreamsClient::new(server.channel().await);

    let id = "0b6a2d6e-8f34-4c4e-9a3c-0d8d1f9e7a01";
    let first = client
        .append(append(
            "order-1",
            vec![
                event(id, "Placed", r#"{"total":5}"#, &["customer:1"]),
                event("", "Paid", "{}", &[]),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.first_position, first.last_position, first.replayed),
        (0, 1, false)
    );
    // The same append again (same ids) is a replay; with a generated id it could not be.
    let mut retry = append(
        "order-1",
        vec![event(id, "Placed", r#"{"total":5}"#, &["customer:1"])],
    );
    let replay = client.append(retry.clone()).await.unwrap().into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.first_position, 0);
    // The id reused for another event.
    retry.events[0].data = br#"{"total":6}"#.to_vec();
    let reused = client.append(retry).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(info(&reused).0, "event-id-reused");

    client
        .append(append(
            "order-2",
            vec![event("", "Placed", r#"{"total":7}"#, &["customer:2"])],
        ))
        .await
        .unwrap();
    client
        .append(append("invoice-1", content_type_probe()))
        .await
        .unwrap();

    // Expected revision: exact, no stream, exists.
    let mut request = append("order-1", vec![event("", "Shipped", "{}", &[])]);
    request.expected_revision = Some(pb::append_request::ExpectedRevision::ExpectedExact(0));
    let conflict = client.append(request.clone()).await.unwrap_err();
    assert_eq!(conflict.code(), Code::Aborted);
    let (reason, meta) = info(&conflict);
    assert_eq!(reason, "wrong-expected-revision");
    assert_eq!(meta["expectedRevision"], "0");
    assert_eq!(meta["actualRevision"], "1");
    assert_eq!(meta["stream"], "order-1");
    request.expected_revision = Some(pb::append_request::ExpectedRevision::ExpectedState(
        pb::StreamState::NoStream as i32,
    ));
    let conflict = client.append(request.clone()).await.unwrap_err();
    assert_eq!(info(&conflict).1["expectedRevision"], "noStream");
    request.expected_revision = Some(pb::append_request::ExpectedRevision::ExpectedState(
        pb::StreamState::Exists as i32,
    ));
    assert_eq!(
        client
            .append(request.clone())
            .await
            .unwrap()
            .into_inner()
            .first_revision,
        2
    );
    request.expected_revision = Some(pb::append_request::ExpectedRevision::ExpectedState(9));
    let bad = client.append(request).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("StreamState"), "{bad:?}");

    // A DCB condition: no other Placed event for customer 2 after position 0.
    let condition = |after| pb::AppendCondition {
        fail_if_events_match: Some(pb::Query {
            items: vec![pb::QueryItem {
                types: vec!["Placed".into()],
                tags: vec!["customer:2".into()],
            }],
        }),
        after,
    };
    let mut request = append("order-3", vec![event("", "Placed", "{}", &["customer:2"])]);
    request.condition = Some(condition(Some(0)));
    let failed = client.append(request.clone()).await.unwrap_err();
    assert_eq!(failed.code(), Code::Aborted);
    let (reason, meta) = info(&failed);
    assert_eq!(reason, "append-condition-failed");
    assert_eq!(meta["position"], "2");
    request.condition = Some(condition(Some(2)));
    client.append(request).await.unwrap();

    // Bad input names what is wrong.
    for (request, reason, needle) in [
        (
            append("no spaces allowed", vec![event("", "A", "{}", &[])]),
            "invalid-event",
            "stream",
        ),
        (
            append("", vec![event("", "A", "{}", &[])]),
            "malformed-request",
            "stream is required",
        ),
        (
            append("s-1", vec![event("", "", "{}", &[])]),
            "invalid-event",
            "events[0]",
        ),
        (
            append("s-1", vec![event("not-a-uuid", "A", "{}", &[])]),
            "malformed-request",
            "events[0].id",
        ),
        (
            append("s-1", vec![event("", "A", "{nope", &[])]),
            "malformed-request",
            "events[0].data",
        ),
        (
            append("$system", vec![event("", "A", "{}", &[])]),
            "invalid-event",
            "$",
        ),
        (append("s-1", vec![]), "invalid-event", "event"),
    ] {
        let status = client.append(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(info(&status).0, reason, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    let mut request = append("s-1", vec![event("", "A", "{}", &[])]);
    request.events[0].metadata = "[1]".into();
    let status = client.append(request).await.unwrap_err();
    assert!(status.message().contains("metadata"), "{status:?}");

    // Reads: a stream both ways, with a limit; the global log filtered; a category; a query.
    let stream = |from, direction: pb::Direction, limit| pb::ReadRequest {
        source: source(pb::source::Kind::Stream("order-1".into())),
        from,
        direction: direction as i32,
        limit,
    };
    let forward = read_all(&mut client, stream(None, pb::Direction::Forward, 0))
        .await
        .unwrap();
    assert_eq!(
        forward
            .iter()
            .map(|e| e.r#type.as_str())
            .collect::<Vec<_>>(),
        ["Placed", "Paid", "Shipped"]
    );
    assert_eq!(forward[0].id, id);
    assert_eq!(forward[0].tags, ["customer:1"]);
    assert_eq!(forward[0].content_type, "application/json");
    assert_eq!(forward[0].data, br#"{"total":5}"#);
    assert_eq!(forward[0].metadata, "{}");
    assert!(forward[0].recorded_at_micros > 0);
    let backward = read_all(&mut client, stream(Some(1), pb::Direction::Backward, 5))
        .await
        .unwrap();
    assert_eq!(
        backward.iter().map(|e| e.revision).collect::<Vec<_>>(),
        [1, 0]
    );
    let limited = read_all(&mut client, stream(Some(1), pb::Direction::Forward, 1))
        .await
        .unwrap();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].revision, 1);

    let filtered = read_all(
        &mut client,
        pb::ReadRequest {
            source: source(pb::source::Kind::All(pb::AllFilter {
                types: vec!["Placed".into()],
                tags: vec![],
            })),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        filtered
            .iter()
            .map(|e| e.stream.as_str())
            .collect::<Vec<_>>(),
        ["order-1", "order-2", "order-3"]
    );
    let category = read_all(
        &mut client,
        pb::ReadRequest {
            source: source(pb::source::Kind::Category("invoice".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(category.len(), 1);
    assert_eq!(category[0].content_type, "text/plain");
    assert_eq!(category[0].source.as_deref(), Some("urn:test"));
    let query = read_all(
        &mut client,
        pb::ReadRequest {
            source: source(pb::source::Kind::Query(pb::Query {
                items: vec![pb::QueryItem {
                    types: vec![],
                    tags: vec!["customer:2".into()],
                }],
            })),
            from: Some(3),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        query.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>(),
        ["order-3"]
    );

    let missing = read_all(
        &mut client,
        pb::ReadRequest {
            source: source(pb::source::Kind::Stream("nothing-here".into())),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(info(&missing).0, "stream-not-found");
    let no_source = read_all(&mut client, pb::ReadRequest::default())
        .await
        .unwrap_err();
    assert_eq!(no_source.code(), Code::InvalidArgument);
    assert!(no_source.message().contains("source is required"));
    let backward_all = read_all(
        &mut client,
        pb::ReadRequest {
            source: source(pb::source::Kind::All(Default::default())),
            direction: pb::Direction::Backward as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        backward_all.code(),
        Code::InvalidArgument,
        "{backward_all:?}"
    );

    // Head and info.
    let head = client
        .head(pb::HeadRequest {
            stream: "order-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((head.revision, head.position), (2, 4));
    let missing = client
        .head(pb::HeadRequest {
            stream: "nothing-here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.head_position, Some(5));
    assert_eq!(info.durability, "none");
    assert!(!info.version.is_empty());
    assert_eq!(
        server.store.next_position().await.unwrap(),
        6,
        "what the API reported is what is stored"
    );

    server.stop().await;
}

/// A text event with a CloudEvents source, to check both survive the round trip.
fn content_type_probe() -> Vec<pb::ProposedEvent> {
    vec![pb::ProposedEvent {
        content_type: "text/plain".into(),
        data: b"hello".to_vec(),
        source: Some("urn:test".into()),
        ..event("", "Noted", "", &[])
    }]
}

#[tokio::test]
async fn a_message_over_the_body_limit_is_refused_and_nothing_is_stored() {
    let server = Server::start(HttpConfig {
        max_body_bytes: 4096,
        ..HttpConfig::default()
    })
    .await;
    let mut client = StreamsClient::new(server.channel().await);
    let big = "x".repeat(8000);
    let status = client
        .append(append(
            "s-1",
            vec![event("", "A", &format!("\"{big}\""), &[])],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("4096"), "{status:?}");
    assert_eq!(server.store.next_position().await.unwrap(), 0);
    // The connection is still good.
    client
        .append(append("s-1", vec![event("", "A", "{}", &[])]))
        .await
        .unwrap();
    server.stop().await;
}

async fn next_subscribe(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
) -> pb::subscribe_response::Kind {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a message in time")
        .unwrap()
        .expect("the subscription is open")
        .kind
        .unwrap()
}

#[tokio::test]
async fn subscriptions_catch_up_then_go_live_and_resume() {
    let server = Server::start(HttpConfig::default()).await;
    let channel = server.channel().await;
    let mut streams = StreamsClient::new(channel.clone());
    let mut subscriptions = SubscriptionsClient::new(channel);
    for i in 0..3 {
        streams
            .append(append(
                &format!("cart-{i}"),
                vec![event("", "Added", "{}", &[])],
            ))
            .await
            .unwrap();
    }
    streams
        .append(append("other-1", vec![event("", "Added", "{}", &[])]))
        .await
        .unwrap();

    let mut sub = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::Category("cart".into())),
            start: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        match next_subscribe(&mut sub).await {
            pb::subscribe_response::Kind::Events(batch) => {
                seen.extend(batch.events.into_iter().map(|e| e.position));
            }
            pb::subscribe_response::Kind::CaughtUp(c) => {
                assert_eq!(c.position, 4);
                break;
            }
        }
    }
    assert_eq!(seen, [0, 1, 2]);
    // Live: a new cart event arrives; another category's does not.
    streams
        .append(append("other-2", vec![event("", "Added", "{}", &[])]))
        .await
        .unwrap();
    streams
        .append(append("cart-9", vec![event("", "Added", "{}", &[])]))
        .await
        .unwrap();
    match next_subscribe(&mut sub).await {
        pb::subscribe_response::Kind::Events(batch) => {
            assert_eq!(
                batch.events.iter().map(|e| e.position).collect::<Vec<_>>(),
                [5]
            );
        }
        other => panic!("expected the live event, got {other:?}"),
    }
    drop(sub);

    // Resume after position 1: positions 2 and 5, nothing twice.
    let mut resumed = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::Category("cart".into())),
            start: Some(pb::subscribe_request::Start::Position(2)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let pb::subscribe_response::Kind::Events(batch) = next_subscribe(&mut resumed).await {
            seen.extend(batch.events.into_iter().map(|e| e.position));
        }
    }
    assert_eq!(seen, [2, 5]);

    // A stream from a revision, and from now.
    let mut by_revision = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::Stream("cart-9".into())),
            start: Some(pb::subscribe_request::Start::Revision(0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_subscribe(&mut by_revision).await,
        pb::subscribe_response::Kind::Events(b) if b.events[0].position == 5
    ));
    let mut from_now = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::All(Default::default())),
            start: Some(pb::subscribe_request::Start::At(pb::StartAt::Now as i32)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_subscribe(&mut from_now).await,
        pb::subscribe_response::Kind::CaughtUp(c) if c.position == 6
    ));

    // Bad requests.
    let status = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::Category("cart".into())),
            start: Some(pb::subscribe_request::Start::Revision(0)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("revision"), "{status:?}");
    let status = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::Query(pb::Query {
                items: vec![pb::QueryItem {
                    types: vec![String::new()],
                    tags: vec![],
                }],
            })),
            start: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("source.query.items[0].types"),
        "{status:?}"
    );

    // Stopping the server ends open subscriptions with UNAVAILABLE.
    let hub = server.hub.clone();
    let waiter = tokio::spawn(async move {
        loop {
            match from_now.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    });
    drop(by_revision);
    drop(resumed);
    hub.shutdown();
    assert_eq!(
        tokio::time::timeout(DEADLINE, waiter)
            .await
            .unwrap()
            .unwrap(),
        Some(Code::Unavailable)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_ended_and_appends_go_on() {
    let server = Server::start(HttpConfig {
        stall_timeout_ms: 300,
        ..HttpConfig::default()
    })
    .await;
    let channel = server.channel().await;
    let mut streams = StreamsClient::new(channel.clone());
    let mut subscriptions = SubscriptionsClient::new(server.channel().await);
    let mut sub = subscriptions
        .subscribe(pb::SubscribeRequest {
            source: source(pb::source::Kind::All(Default::default())),
            start: Some(pb::subscribe_request::Start::At(pb::StartAt::Now as i32)),
        })
        .await
        .unwrap()
        .into_inner();
    // Enough to fill the stream's HTTP/2 window (2 MiB in hyper's client), the sockets'
    // buffers and the queue behind them, never read: 12.8 MB.
    let data = format!("\"{}\"", "y".repeat(32 * 1024));
    for _ in 0..400 {
        tokio::time::timeout(
            DEADLINE,
            streams.append(append("big-1", vec![event("", "Big", &data, &[])])),
        )
        .await
        .expect("appends are not held up by a stalled subscriber")
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match sub.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .unwrap()
    .expect("the subscription ends with a status");
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("read nothing"), "{ended:?}");
    server.stop().await;
}

/// A consumer's call: what it sends, what it receives.
struct Consumer {
    tx: mpsc::Sender<pb::ConsumeRequest>,
    rx: tonic::Streaming<pb::ConsumeResponse>,
}

impl Consumer {
    async fn join(channel: Channel, group: &str, capacity: u32) -> Result<Self, Status> {
        let (tx, requests) = mpsc::channel(8);
        tx.send(pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Join(pb::Join {
                group: group.into(),
                consumer: "test".into(),
                capacity,
            })),
        })
        .await
        .unwrap();
        let mut rx = GroupsClient::new(channel)
            .consume(tokio_stream_of(requests))
            .await?
            .into_inner();
        match rx.message().await? {
            Some(pb::ConsumeResponse {
                kind: Some(pb::consume_response::Kind::Joined(j)),
            }) => assert_eq!(j.group, group),
            other => panic!("expected Joined, got {other:?}"),
        }
        Ok(Self { tx, rx })
    }

    async fn next(&mut self) -> pb::consume_response::Kind {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("the call is open")
            .kind
            .unwrap()
    }

    async fn messages(&mut self) -> Vec<pb::GroupMessage> {
        match self.next().await {
            pb::consume_response::Kind::Messages(m) => m.messages,
            other => panic!("expected messages, got {other:?}"),
        }
    }

    async fn send(&self, kind: pb::consume_request::Kind) {
        self.tx
            .send(pb::ConsumeRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    async fn result(&mut self) -> pb::AckResult {
        match self.next().await {
            pb::consume_response::Kind::AckResult(r) => r,
            other => panic!("expected an ack result, got {other:?}"),
        }
    }
}

fn tokio_stream_of(
    mut rx: mpsc::Receiver<pb::ConsumeRequest>,
) -> impl futures_util::Stream<Item = pb::ConsumeRequest> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_group_consumer_acks_nacks_and_hands_back_what_it_held() {
    let server = Server::start(HttpConfig::default()).await;
    let channel = server.channel().await;
    let mut streams = StreamsClient::new(channel.clone());
    for i in 0..3 {
        streams
            .append(append(
                "job-1",
                vec![event("", "Queued", &format!("{{\"n\":{i}}}"), &[])],
            ))
            .await
            .unwrap();
    }
    server
        .groups
        .create(NewGroup {
            name: "workers".into(),
            source: SourceSpec::Stream("job-1".into()),
            start: Start::Beginning,
            settings: GroupSettings {
                retry_delay_ms: 10,
                ..GroupSettings::default()
            },
        })
        .await
        .unwrap();

    let mut consumer = Consumer::join(channel.clone(), "workers", 2).await.unwrap();
    let first = consumer.messages().await;
    let revisions: Vec<u64> = first
        .iter()
        .map(|m| m.event.as_ref().unwrap().revision)
        .collect();
    assert_eq!(revisions, [0, 1], "capacity 2 holds two");
    assert!(first.iter().all(|m| m.deliveries == 1));
    consumer
        .send(pb::consume_request::Kind::Ack(pb::Ack {
            ack_ids: vec![first[0].ack_id.clone(), "no-such-id".into()],
        }))
        .await;
    // The ack's result and the next message can come in either order.
    let mut result = None;
    let mut more = Vec::new();
    while result.is_none() || more.is_empty() {
        match consumer.next().await {
            pb::consume_response::Kind::AckResult(r) => result = Some(r),
            pb::consume_response::Kind::Messages(m) => more.extend(m.messages),
            other => panic!("unexpected {other:?}"),
        }
    }
    let result = result.unwrap();
    assert_eq!(result.done, 1);
    assert_eq!(result.unknown, ["no-such-id"]);
    assert_eq!(more[0].event.as_ref().unwrap().revision, 2);
    // Nack revision 1 to retry: it comes back with its delivery count raised.
    consumer
        .send(pb::consume_request::Kind::Nack(pb::Nack {
            ack_ids: vec![first[1].ack_id.clone()],
            action: pb::NackAction::Retry as i32,
            reason: "try again".into(),
        }))
        .await;
    let mut again = None;
    let mut results = 0;
    while again.is_none() || results == 0 {
        match consumer.next().await {
            pb::consume_response::Kind::AckResult(r) => {
                assert_eq!(r.done, 1);
                results += 1;
            }
            pb::consume_response::Kind::Messages(m) => again = m.messages.into_iter().next(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let again = again.unwrap();
    assert_eq!(again.event.as_ref().unwrap().revision, 1);
    assert_eq!(again.deliveries, 2);
    // Leaving with messages held hands them to the next consumer.
    drop(consumer);
    let mut next = Consumer::join(channel.clone(), "workers", 10)
        .await
        .unwrap();
    let mut revisions = Vec::new();
    while revisions.len() < 2 {
        revisions.extend(
            next.messages()
                .await
                .iter()
                .map(|m| m.event.as_ref().unwrap().revision),
        );
    }
    revisions.sort_unstable();
    assert_eq!(revisions, [1, 2]);
    // A second Join on the same call is refused, and ends it.
    next.send(pb::consume_request::Kind::Join(pb::Join::default()))
        .await;
    let ended = tokio::time::timeout(DEADLINE, next.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument);
    assert!(ended.message().contains("joins one group once"));
    drop(next);
    let mut last = Consumer::join(channel.clone(), "workers", 10)
        .await
        .unwrap();
    let held = last.messages().await;
    last.send(pb::consume_request::Kind::Ack(pb::Ack {
        ack_ids: held.iter().map(|m| m.ack_id.clone()).collect(),
    }))
    .await;
    assert_eq!(last.result().await.done as usize, held.len());

    // An unknown group; a first message that is not a Join.
    let unknown = Consumer::join(channel.clone(), "nobody", 1)
        .await
        .err()
        .expect("no such group");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(info(&unknown).0, "group-not-found");
    let (tx, requests) = mpsc::channel(1);
    tx.send(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Ack(pb::Ack::default())),
    })
    .await
    .unwrap();
    let status = GroupsClient::new(channel.clone())
        .consume(tokio_stream_of(requests))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("first message must be a Join"));

    // Deleting the group ends its consumers with NOT_FOUND.
    server.groups.delete("workers").await.unwrap();
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match last.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ended, Some(Code::NotFound));
    server.stop().await;
}

#[tokio::test]
async fn health_reflection_unknown_methods_and_http_on_the_same_port() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = Server::start(HttpConfig::default()).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "skald.v1.Streams", "skald.v1.Groups"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "skald.v1.Groups",
            "skald.v1.Sagas",
            "skald.v1.Streams",
            "skald.v1.Subscriptions"
        ]
    );

    // A method nobody serves.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<pb::InfoRequest, pb::InfoResponse, _>(
            tonic::Request::new(pb::InfoRequest {}),
            "/skald.v1.Streams/Nope".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("/skald.v1.Streams/Nope"));

    // HTTP/1.1 on the same port.
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /v1/info HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn groups_are_managed_over_grpc() {
    let server = Server::start(HttpConfig::default()).await;
    let channel = server.channel().await;
    let mut streams = StreamsClient::new(channel.clone());
    let mut groups = GroupsClient::new(channel.clone());
    streams
        .append(append("mail-1", vec![event("", "Queued", "{}", &[])]))
        .await
        .unwrap();
    let create = |name: &str, settings: Option<pb::GroupSettings>| pb::CreateGroupRequest {
        name: name.into(),
        source: source(pb::source::Kind::Category("mail".into())),
        start: None,
        settings,
    };
    let created = groups
        .create(create(
            "mailers",
            Some(pb::GroupSettings {
                max_deliveries: Some(3),
                strategy: Some(pb::Strategy::Pinned as i32),
                ..Default::default()
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "mailers");
    assert_eq!(
        created.source.unwrap().kind,
        Some(pb::source::Kind::Category("mail".into()))
    );
    assert_eq!(created.start, Some(pb::group_info::Start::StartPosition(0)));
    let settings = created.settings.unwrap();
    assert_eq!(settings.max_deliveries, Some(3));
    assert_eq!(settings.strategy, Some(pb::Strategy::Pinned as i32));
    assert_eq!(
        settings.message_timeout_ms,
        Some(30_000),
        "unset fields take their defaults"
    );

    // Taken names, bad names, bad settings.
    let taken = groups.create(create("mailers", None)).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert_eq!(info(&taken).0, "group-exists");
    let bad = groups.create(create("no spaces", None)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let bad = groups
        .create(create(
            "zero",
            Some(pb::GroupSettings {
                buffer_size: Some(0),
                ..Default::default()
            }),
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("bufferSize"), "{bad:?}");
    let bad = groups
        .create(create(
            "odd",
            Some(pb::GroupSettings {
                strategy: Some(7),
                ..Default::default()
            }),
        ))
        .await
        .unwrap_err();
    assert!(bad.message().contains("Strategy"), "{bad:?}");

    // Update changes only what it names.
    let updated = groups
        .update(pb::UpdateGroupRequest {
            name: "mailers".into(),
            settings: Some(pb::GroupSettings {
                retry_delay_ms: Some(5),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(updated.retry_delay_ms, Some(5));
    assert_eq!(updated.max_deliveries, Some(3));

    // A parked message comes back after ReplayParked; the stats show it.
    let mut consumer = Consumer::join(channel.clone(), "mailers", 5).await.unwrap();
    let held = consumer.messages().await;
    consumer
        .send(pb::consume_request::Kind::Nack(pb::Nack {
            ack_ids: vec![held[0].ack_id.clone()],
            action: pb::NackAction::Park as i32,
            reason: "bounced".into(),
        }))
        .await;
    assert_eq!(consumer.result().await.done, 1);
    let reader = groups.clone();
    let get = || {
        let mut groups = reader.clone();
        async move {
            groups
                .get(pb::GetGroupRequest {
                    name: "mailers".into(),
                })
                .await
        }
    };
    let mut parked = 0;
    for _ in 0..100 {
        let stats = get().await.unwrap().into_inner().stats.unwrap();
        assert_eq!(stats.consumers.len(), 1);
        assert_eq!(stats.consumers[0].kind, "grpc");
        parked = stats.parked;
        if parked == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(parked, 1);
    let replaying = groups
        .replay_parked(pb::ReplayParkedRequest {
            name: "mailers".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .replaying;
    assert_eq!(replaying, 1);
    let again = consumer.messages().await;
    assert_eq!(again[0].event.as_ref().unwrap().stream, "mail-1");

    let listed = groups
        .list(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(
        listed.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        ["mailers"]
    );

    // Delete: the consumer's call ends, and the group is gone.
    groups
        .delete(pb::DeleteGroupRequest {
            name: "mailers".into(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match consumer.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ended, Some(Code::NotFound));
    assert_eq!(get().await.unwrap_err().code(), Code::NotFound);
    server.stop().await;
}

const SHIPMENT_SAGA: &str = r#"
name: shipment
version: 1
trigger: {category: order, types: [Placed]}
correlationKey: /stream
steps:
  - name: reserve
    action: {append: {stream: "stock-{{saga.correlationKey}}", type: Reserve}}
    compensation: {append: {stream: "stock-{{saga.correlationKey}}", type: Release}}
  - name: ship
    pivot: true
    action: {append: {stream: "ship-{{saga.correlationKey}}", type: Ship}}
"#;

#[tokio::test]
async fn sagas_are_registered_watched_and_steered_over_grpc() {
    use skald_proto::v1::sagas_client::SagasClient;
    let server = Server::start(HttpConfig::default()).await;
    let channel = server.channel().await;
    let mut sagas = SagasClient::new(channel.clone());
    let register = |text: &str| pb::RegisterSagaRequest {
        definition: text.to_owned(),
    };
    let created = sagas
        .register(register(SHIPMENT_SAGA))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (created.name.as_str(), created.version, created.replayed),
        ("shipment", 1, false)
    );
    assert!(
        sagas
            .register(register(SHIPMENT_SAGA))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    let broken = SHIPMENT_SAGA.replace(
        "    compensation: {append: {stream: \"stock-{{saga.correlationKey}}\", type: Release}}\n",
        "",
    );
    let invalid = sagas.register(register(&broken)).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(info(&invalid).0, "invalid-saga-definition");
    assert!(
        invalid.message().contains("line 7, column 5"),
        "{invalid:?}"
    );

    let definition = sagas
        .get_definition(pb::GetSagaDefinitionRequest {
            name: "shipment".into(),
            version: None,
        })
        .await
        .unwrap()
        .into_inner();
    let json: serde_json::Value = serde_json::from_str(&definition.json).unwrap();
    assert_eq!(json["steps"][1]["name"], "ship");
    let missing = sagas
        .get_definition(pb::GetSagaDefinitionRequest {
            name: "nope".into(),
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // A trigger runs an instance to completion.
    StreamsClient::new(channel.clone())
        .append(append("order-7", vec![event("", "Placed", "{}", &[])]))
        .await
        .unwrap();
    let completed = || pb::ListSagaInstancesRequest {
        state: pb::SagaState::Completed as i32,
        definition: "shipment".into(),
        limit: 0,
    };
    let mut instances = Vec::new();
    for _ in 0..200 {
        instances = sagas
            .list_instances(completed())
            .await
            .unwrap()
            .into_inner()
            .instances;
        if !instances.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(instances.len(), 1, "the instance completes");
    let instance = &instances[0];
    assert_eq!(instance.correlation_key, "order-7");
    assert_eq!(instance.completed_steps, ["reserve", "ship"]);
    let history = sagas
        .get_instance(pb::GetSagaInstanceRequest {
            saga_id: instance.saga_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.summary.unwrap().state,
        pb::SagaState::Completed as i32
    );
    assert!(history.history.len() >= 3, "{:?}", history.history);
    assert!(history.history.iter().all(|h| h.data_json.starts_with('{')));
    let listed = sagas
        .list_definitions(pb::ListSagaDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .definitions;
    assert_eq!(listed[0].name, "shipment");
    assert_eq!(listed[0].instances.get("completed"), Some(&1));

    // A completed instance can be neither retried nor cancelled; an unknown one is not found.
    let id = || instance.saga_id.clone();
    let retry = sagas
        .retry(pb::RetrySagaRequest { saga_id: id() })
        .await
        .unwrap_err();
    assert_eq!(retry.code(), Code::FailedPrecondition, "{retry:?}");
    assert_eq!(info(&retry).0, "saga-conflict");
    let cancel = sagas
        .cancel(pb::CancelSagaRequest {
            saga_id: id(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Code::FailedPrecondition, "{cancel:?}");
    let unknown = sagas
        .get_instance(pb::GetSagaInstanceRequest {
            saga_id: "no-such-saga".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let bad = sagas
        .list_instances(pb::ListSagaInstancesRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}
