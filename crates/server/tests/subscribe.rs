//! Live delivery over real sockets: SSE (catch-up then live, `Last-Event-ID` resume, bad
//! input), WebSocket (several subscriptions on one socket, unsubscribe, ping, bad input), and a
//! stalled reader that must not hold up appends or other subscribers, and is disconnected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use skald_core::{
    AppendRequest, Durability, EventData, EventStore, EventType, ExpectedRevision, ProposedEvent,
    StreamName,
};
use skald_server::{HttpConfig, Hub};
use skald_storage::{Options, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    addr: std::net::SocketAddr,
    store: Store,
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
            durability: Durability::None,
            ..Options::default()
        })
        .unwrap();
        let hub = Hub::start(Arc::new(store.clone()), Default::default());
        let groups = skald_server::Groups::start(hub.clone()).await.unwrap();
        let sagas = skald_server::Sagas::start(
            hub.clone(),
            Default::default(),
            Arc::new(skald_saga::WallClock),
        )
        .await
        .unwrap();
        let app = skald_server::router_with(groups, sagas, http);
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
            hub,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn append(&self, stream: &str, event_type: &str, count: usize) {
        let events = (0..count)
            .map(|i| {
                ProposedEvent::new(
                    EventType::new(event_type).unwrap(),
                    EventData::json(format!("{{\"n\":{i}}}")).unwrap(),
                )
            })
            .collect();
        self.store
            .append(AppendRequest {
                stream: StreamName::new(stream).unwrap(),
                expected: ExpectedRevision::Any,
                condition: None,
                events,
            })
            .await
            .unwrap();
    }

    /// Stops the server the way `serve` does, and checks it stops although subscriptions are
    /// open.
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(DEADLINE, self.task.take().unwrap())
            .await
            .expect("the server stops with subscriptions open")
            .unwrap();
        self.store.shutdown().await;
    }
}

/// An SSE client over hyper: the response head, then frames parsed as they arrive.
struct Sse {
    status: u16,
    body: Incoming,
    buffer: String,
}

#[derive(Debug, PartialEq)]
struct SseFrame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    comment: bool,
    retry: Option<u64>,
}

impl Sse {
    async fn open(addr: std::net::SocketAddr, path: &str, last_event_id: Option<&str>) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = hyper::Request::get(path).header("host", "localhost");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        Self {
            status: response.status().as_u16(),
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    async fn text(self) -> String {
        let bytes = self.body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    async fn frame(&mut self) -> SseFrame {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut frame = SseFrame {
                    id: None,
                    event: None,
                    data: None,
                    comment: false,
                    retry: None,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        frame.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        frame.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        frame.data = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        frame.retry = Some(v.parse().unwrap());
                    } else if line.starts_with(':') {
                        frame.comment = true;
                    }
                }
                return frame;
            }
            let next = tokio::time::timeout(DEADLINE, self.body.frame())
                .await
                .expect("an SSE frame in time")
                .expect("the stream is open")
                .unwrap();
            if let Ok(data) = next.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The next event frame, skipping heartbeats.
    async fn event(&mut self) -> (u64, Value) {
        loop {
            let frame = self.frame().await;
            if frame.comment || frame.retry.is_some() {
                continue;
            }
            assert_eq!(frame.event, None, "expected an event, got {frame:?}");
            let id = frame.id.expect("events carry an id").parse().unwrap();
            let data: Value = serde_json::from_str(&frame.data.unwrap()).unwrap();
            assert_eq!(data["position"], id, "the SSE id is the position");
            return (id, data);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_delivers_history_then_live_and_resumes_after_last_event_id() {
    let server = Server::start(HttpConfig::default()).await;
    server.append("order-1", "Placed", 2).await;
    server.append("user-1", "Joined", 1).await;
    server.append("order-1", "Paid", 1).await;

    let mut sse = Sse::open(server.addr, "/v1/subscribe/streams/order-1", None).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.frame().await.retry, Some(2000));
    let mut got = Vec::new();
    for _ in 0..3 {
        let (id, data) = sse.event().await;
        assert_eq!(data["stream"], "order-1");
        got.push((id, data["revision"].as_u64().unwrap()));
    }
    assert_eq!(got, [(0, 0), (1, 1), (3, 2)]);
    let caught_up = sse.frame().await;
    assert_eq!(caught_up.event.as_deref(), Some("caught-up"));
    assert_eq!(caught_up.data.as_deref(), Some("{\"position\":4}"));

    server.append("user-1", "Left", 1).await;
    server.append("order-1", "Shipped", 1).await;
    let (id, data) = sse.event().await;
    assert_eq!((id, data["type"].as_str()), (5, Some("Shipped")));

    // A browser reconnecting sends the last id it saw; the ?from is then ignored.
    let mut resumed = Sse::open(server.addr, "/v1/subscribe/all?from=now", Some("1")).await;
    assert_eq!(resumed.status, 200);
    let ids: Vec<u64> = [
        resumed.event().await.0,
        resumed.event().await.0,
        resumed.event().await.0,
        resumed.event().await.0,
    ]
    .into();
    assert_eq!(ids, [2, 3, 4, 5]);

    // A stream subscription resumes by position too.
    let mut stream = Sse::open(server.addr, "/v1/subscribe/streams/order-1", Some("1")).await;
    assert_eq!(stream.event().await.0, 3);
    assert_eq!(stream.event().await.0, 5);

    // Filters: types on the global log, a category, a query, and from=now.
    let mut paid = Sse::open(server.addr, "/v1/subscribe/all?types=Paid,Shipped", None).await;
    assert_eq!(paid.event().await.0, 3);
    assert_eq!(paid.event().await.0, 5);
    let mut users = Sse::open(server.addr, "/v1/subscribe/categories/user?from=3", None).await;
    assert_eq!(users.event().await.0, 4);
    let query = "%7B%22items%22%3A%5B%7B%22types%22%3A%5B%22Joined%22%5D%7D%5D%7D";
    let mut joined = Sse::open(
        server.addr,
        &format!("/v1/subscribe/query?query={query}"),
        None,
    )
    .await;
    assert_eq!(joined.event().await.0, 2);
    let mut now = Sse::open(server.addr, "/v1/subscribe/all?from=now", None).await;
    assert_eq!(now.frame().await.retry, Some(2000));
    assert_eq!(now.frame().await.event.as_deref(), Some("caught-up"));
    server.append("order-2", "Placed", 1).await;
    assert_eq!(now.event().await.0, 6);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_bad_input_is_a_problem_before_the_stream_starts() {
    let server = Server::start(HttpConfig::default()).await;
    for (path, last_id, needle) in [
        ("/v1/subscribe/all?from=yesterday", None, "not a start"),
        (
            "/v1/subscribe/all?from=revision:3",
            None,
            "only start a stream",
        ),
        ("/v1/subscribe/all?limit=3", None, "unknown query parameter"),
        ("/v1/subscribe/streams/a%20b", None, "whitespace"),
        (
            "/v1/subscribe/query",
            None,
            "query parameter query is required",
        ),
        (
            "/v1/subscribe/query?query=%7B",
            None,
            "query parameter query",
        ),
        ("/v1/subscribe/all", Some("abc"), "Last-Event-ID"),
    ] {
        let sse = Sse::open(server.addr, path, last_id).await;
        let status = sse.status;
        let text = sse.text().await;
        assert!(status == 400 || status == 422, "{path}: {status} {text}");
        assert!(text.contains(needle), "{path}: {text}");
    }
    server.stop().await;
}

async fn ws_connect(
    addr: std::net::SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap();
    ws
}

async fn ws_next<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => {
                return json!({"closed": frame.map(|f| (u16::from(f.code), f.reason.to_string()))});
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_carries_several_subscriptions_on_one_socket() {
    let server = Server::start(HttpConfig::default()).await;
    server.append("order-1", "Placed", 2).await;
    server.append("user-1", "Joined", 1).await;
    let mut ws = ws_connect(server.addr).await;

    let send = |value: Value| Message::Text(value.to_string().into());
    ws.send(send(
        json!({"type": "subscribe", "id": "orders", "source": {"category": "order"}}),
    ))
    .await
    .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "subscribed", "id": "orders"})
    );
    let batch = ws_next(&mut ws).await;
    assert_eq!(batch["type"], "events");
    assert_eq!(batch["id"], "orders");
    let positions: Vec<u64> = batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [0, 1]);
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "caught-up", "id": "orders", "position": 3})
    );

    ws.send(send(json!({"type": "subscribe", "id": "joined", "source": {"all": {"types": ["Joined"]}}, "from": 0})))
        .await
        .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "subscribed", "id": "joined"})
    );
    let batch = ws_next(&mut ws).await;
    assert_eq!(
        (
            batch["id"].as_str(),
            batch["events"][0]["position"].as_u64()
        ),
        (Some("joined"), Some(2))
    );
    assert_eq!(ws_next(&mut ws).await["type"], "caught-up");

    // A duplicate id and a bad source are reported against the id; the socket stays open.
    ws.send(send(
        json!({"type": "subscribe", "id": "orders", "source": {"all": {}}}),
    ))
    .await
    .unwrap();
    let error = ws_next(&mut ws).await;
    assert_eq!(
        (error["type"].as_str(), error["id"].as_str()),
        (Some("error"), Some("orders"))
    );
    assert!(
        error["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("already open"),
        "{error}"
    );
    ws.send(send(
        json!({"type": "subscribe", "id": "bad", "source": {"stream": "a b"}}),
    ))
    .await
    .unwrap();
    let error = ws_next(&mut ws).await;
    assert_eq!(error["id"], "bad");
    assert!(
        error["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("whitespace"),
        "{error}"
    );

    ws.send(send(json!({"type": "ping", "data": 7})))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut ws).await, json!({"type": "pong", "data": 7}));

    // Live events go to each subscription that selects them, under its id.
    server.append("order-2", "Placed", 1).await;
    let live = ws_next(&mut ws).await;
    assert_eq!(
        (live["id"].as_str(), live["events"][0]["position"].as_u64()),
        (Some("orders"), Some(3))
    );

    ws.send(send(json!({"type": "unsubscribe", "id": "orders"})))
        .await
        .unwrap();
    assert_eq!(
        ws_next(&mut ws).await,
        json!({"type": "unsubscribed", "id": "orders"})
    );
    server.append("order-2", "Placed", 1).await;
    server.append("user-2", "Joined", 1).await;
    let live = ws_next(&mut ws).await;
    assert_eq!(
        (live["id"].as_str(), live["events"][0]["position"].as_u64()),
        (Some("joined"), Some(5))
    );

    // Input that is not a message is answered with an error, then the socket is closed.
    ws.send(Message::Text("{\"type\": \"subscribe\"".into()))
        .await
        .unwrap();
    let error = ws_next(&mut ws).await;
    assert_eq!(
        (error["type"].as_str(), error["id"].is_null()),
        (Some("error"), true)
    );
    let closed = ws_next(&mut ws).await;
    assert_eq!(closed["closed"][0], 1008, "{closed}");

    // Server shutdown closes open sockets with 1001.
    let mut other = ws_connect(server.addr).await;
    other
        .send(send(
            json!({"type": "subscribe", "id": "a", "source": {"all": {}}, "from": "now"}),
        ))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut other).await["type"], "subscribed");
    assert_eq!(ws_next(&mut other).await["type"], "caught-up");
    let hub_subscribers = server.hub.subscribers();
    assert!(hub_subscribers >= 1);
    server.stop().await;
    assert_eq!(ws_next(&mut other).await["closed"][0], 1001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_up_nobody_and_is_disconnected() {
    let server = Server::start(HttpConfig {
        stall_timeout_ms: 300,
        ..HttpConfig::default()
    })
    .await;
    // A client that asks for everything and then never reads a byte.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    stalled
        .write_all(b"GET /v1/subscribe/all HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // A well-behaved subscriber beside it.
    let mut ws = ws_connect(server.addr).await;
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "all", "source": {"all": {}}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(ws_next(&mut ws).await["type"], "subscribed");

    // Far more than the stalled socket's buffers hold: 2,000 events of 8 KiB.
    let big = "x".repeat(8192);
    let total = 2000u64;
    let writer = {
        let store = server.store.clone();
        tokio::spawn(async move {
            for _ in 0..total / 50 {
                let events = (0..50)
                    .map(|_| {
                        ProposedEvent::new(
                            EventType::new("Big").unwrap(),
                            EventData::json(format!("{{\"pad\":\"{big}\"}}")).unwrap(),
                        )
                    })
                    .collect();
                store
                    .append(AppendRequest {
                        stream: StreamName::new("load-1").unwrap(),
                        expected: ExpectedRevision::Any,
                        condition: None,
                        events,
                    })
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::timeout(DEADLINE, writer)
        .await
        .expect("appends finish while a reader stalls")
        .unwrap();

    let mut next = 0u64;
    while next < total {
        let message = ws_next(&mut ws).await;
        if message["type"] == "events" {
            for event in message["events"].as_array().unwrap() {
                assert_eq!(event["position"], next, "in order, no gap, no duplicate");
                next += 1;
            }
        }
    }

    // The stalled client is cut off: its subscription ends (only the WebSocket's is left),
    // and once its buffers are drained, the socket ends.
    let started = Instant::now();
    while server.hub.subscribers() > 1 {
        assert!(
            started.elapsed() < DEADLINE,
            "the stalled subscriber is still subscribed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut read_total = 0usize;
    loop {
        match tokio::time::timeout(DEADLINE, stalled.read(&mut buf))
            .await
            .expect("the stalled socket is closed in time")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                read_total += n;
            }
        }
        assert!(started.elapsed() < DEADLINE, "read {read_total} bytes");
    }
    server.stop().await;
}

/// Posts JSON to the server over a fresh HTTP/1 connection; returns the status and body.
async fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consumers_share_messages_over_websockets_and_ack_there() {
    let server = Server::start(HttpConfig::default()).await;
    let (status, _) = post(
        server.addr,
        "/v1/groups",
        json!({"name": "mail", "source": {"category": "order"}, "maxDeliveries": 1}),
    )
    .await;
    assert_eq!(status, 201);
    let mut sockets = Vec::new();
    for name in ["a", "b"] {
        let mut ws = ws_connect(server.addr).await;
        ws.send(Message::text(
            json!({"type": "subscribe", "id": "c", "group": "mail", "prefetch": 2, "consumer": name})
                .to_string(),
        ))
        .await
        .unwrap();
        assert_eq!(
            ws_next(&mut ws).await,
            json!({"type": "subscribed", "id": "c"})
        );
        sockets.push(ws);
    }
    server.append("order-1", "Placed", 10).await;
    server.append("user-1", "Joined", 3).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut per_socket = [0; 2];
    let mut parked = None;
    while seen.len() < 10 {
        for (i, ws) in sockets.iter_mut().enumerate() {
            let next = tokio::time::timeout(Duration::from_millis(50), ws_next(ws)).await;
            let Ok(message) = next else { continue };
            assert_eq!(message["type"], "messages", "{message}");
            let mut ids = Vec::new();
            for m in message["messages"].as_array().unwrap() {
                assert_eq!(m["event"]["subject"], "order-1", "{m}");
                assert!(
                    seen.insert(m["event"]["position"].as_u64().unwrap()),
                    "twice: {m}"
                );
                ids.push(m["ackId"].clone());
            }
            per_socket[i] += ids.len();
            // The first message of all is parked by its consumer; the rest are acknowledged.
            if parked.is_none() {
                parked = Some(ids.remove(0));
                ws.send(Message::text(
                    json!({"type": "nack", "id": "c", "ackIds": [parked], "action": "park",
                           "reason": "malformed address"})
                    .to_string(),
                ))
                .await
                .unwrap();
            }
            ws.send(Message::text(
                json!({"type": "ack", "id": "c", "ackIds": ids}).to_string(),
            ))
            .await
            .unwrap();
        }
    }
    assert!(per_socket.iter().all(|n| *n > 0), "{per_socket:?}");
    // An ack nobody holds is reported on its subscription, and the socket stays open.
    let ws = &mut sockets[0];
    ws.send(Message::text(
        json!({"type": "ack", "id": "c", "ackIds": [parked]}).to_string(),
    ))
    .await
    .unwrap();
    let error = ws_next(ws).await;
    assert_eq!(error["type"], "error");
    assert!(
        error["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("no message in flight"),
        "{error}"
    );
    // Both source and group is a mistake, said on that id.
    ws.send(Message::text(
        json!({"type": "subscribe", "id": "x", "group": "mail", "source": {"all": {}}}).to_string(),
    ))
    .await
    .unwrap();
    let error = ws_next(ws).await;
    assert_eq!(
        (error["type"].as_str(), error["id"].as_str()),
        (Some("error"), Some("x"))
    );
    // Deleting the group ends its consumers with a group-not-found error.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let deleted = sender
        .send_request(
            hyper::Request::delete("/v1/groups/mail")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    for ws in &mut sockets {
        let ended = ws_next(ws).await;
        assert_eq!(
            ended["problem"]["type"], "urn:skald:problem:group-not-found",
            "{ended}"
        );
    }
    // A group of the same name, created again, is another group: an ack on the ended
    // subscription does not reach it.
    let (status, _) = post(
        server.addr,
        "/v1/groups",
        json!({"name": "mail", "source": {"category": "order"}}),
    )
    .await;
    assert_eq!(status, 201);
    let ws = &mut sockets[0];
    ws.send(Message::text(
        json!({"type": "ack", "id": "c", "ackIds": [parked]}).to_string(),
    ))
    .await
    .unwrap();
    let error = ws_next(ws).await;
    assert!(
        error["problem"]["detail"]
            .as_str()
            .unwrap()
            .contains("no group subscription \"c\" on this socket (it ended"),
        "{error}"
    );
    server.stop().await;
}
