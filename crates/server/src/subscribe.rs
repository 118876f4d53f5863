//! Catch-up-then-live subscriptions over Server-Sent Events and WebSocket. The protocols are
//! in `docs/subscriptions.md`; the delivery logic is in `skald-hub`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};
use skald_core::{Category, EventStore, EventType, Query, ReadSource, Tag};
use skald_hub::groups::{Consumer, ConsumerEvent, NackAction};
use skald_hub::{Delivery, Hub, SourceSpec, Start, Subscription, filter_of};
use skald_security::Permission;

use crate::access::{Caller, Recheck, Scope};
use tokio::sync::mpsc;

use crate::cloudevents::write_record;
use crate::listener::Connection;
use crate::observe::{ApiMetrics, Open};
use crate::{App, Problem, parse_json, parse_names, query_pairs};
use tracing::Instrument;

/// Chunks waiting between a subscription and its HTTP response. Kept tiny: a slow client
/// holds at most this many batches (plus the socket's buffers) in memory.
const SSE_QUEUE: usize = 2;
/// Messages waiting between a socket's subscriptions and the socket.
const WS_QUEUE: usize = 8;
/// A batch is split into chunks (SSE) or messages (WebSocket) of about this size, so that
/// what waits for a slow client is bounded in bytes, not only in events.
const CHUNK_BYTES: usize = 64 * 1024;
/// The read buffer of each WebSocket.
const WS_READ_BUFFER: usize = 4096;
/// The largest message a WebSocket client may send.
const WS_MAX_MESSAGE: usize = 1 << 20;
/// Longest subscription id on a WebSocket, in bytes.
const MAX_SUBSCRIPTION_ID: usize = 128;

/// Settings for live delivery, in the `[http]` table.
#[derive(Clone, Debug)]
pub struct SubscriptionSettings {
    pub heartbeat: Duration,
    pub stall_timeout: Duration,
    pub sse_retry: Duration,
    pub max_per_socket: usize,
}

// ---------------------------------------------------------------------------------------------
// Parsing what to subscribe to

/// The SSE query string: `from`, and per endpoint `types`/`tags` or `query`.
struct SseParams {
    start: Start,
    types: Vec<EventType>,
    tags: Vec<Tag>,
    query: Option<Query>,
}

fn parse_sse_params(
    raw: Option<String>,
    allowed: &[&str],
    is_stream: bool,
) -> Result<SseParams, Problem> {
    let mut p = SseParams {
        start: Start::Beginning,
        types: Vec::new(),
        tags: Vec::new(),
        query: None,
    };
    for (key, value) in query_pairs(raw, allowed)? {
        match key.as_str() {
            "from" => p.start = crate::start::parse_start(&value, is_stream)?,
            "types" => p
                .types
                .extend(parse_names(&key, &value, |v| EventType::new(v))?),
            "tags" => p.tags.extend(parse_names(&key, &value, |v| Tag::new(v))?),
            "query" => p.query = Some(parse_json(value.as_bytes(), "query parameter query")?),
            _ => unreachable!("checked against the allowed list"),
        }
    }
    Ok(p)
}

/// `Last-Event-ID` resumes after the position it names.
fn last_event_id(headers: &HeaderMap) -> Result<Option<Start>, Problem> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let position = text.parse::<u64>().map_err(|_| {
        Problem::malformed(format!(
            "Last-Event-ID {text:?} is not a position; Skald's SSE ids are event positions"
        ))
    })?;
    Ok(Some(Start::Position(position + 1)))
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events

pub(crate) async fn sse_all<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    connection: Option<axum::Extension<Connection>>,
) -> Result<Response, Problem> {
    let p = parse_sse_params(raw, &["from", "types", "tags"], false)?;
    let source = ReadSource::All(filter_of(p.types, p.tags));
    sse(app, &caller, source, p.start, &headers, connection).await
}

pub(crate) async fn sse_stream<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(stream): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    connection: Option<axum::Extension<Connection>>,
) -> Result<Response, Problem> {
    let stream = crate::readable_stream_name(stream)?;
    let p = parse_sse_params(raw, &["from"], true)?;
    sse(
        app,
        &caller,
        ReadSource::Stream(stream),
        p.start,
        &headers,
        connection,
    )
    .await
}

pub(crate) async fn sse_category<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(category): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    connection: Option<axum::Extension<Connection>>,
) -> Result<Response, Problem> {
    let category = Category::new(category).map_err(Problem::from)?;
    let p = parse_sse_params(raw, &["from"], false)?;
    sse(
        app,
        &caller,
        ReadSource::Category(category),
        p.start,
        &headers,
        connection,
    )
    .await
}

pub(crate) async fn sse_query<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    connection: Option<axum::Extension<Connection>>,
) -> Result<Response, Problem> {
    let p = parse_sse_params(raw, &["from", "query"], false)?;
    let query = p.query.ok_or_else(|| {
        Problem::malformed(
            "query parameter query is required: a DCB query as JSON, such as \
             {\"items\":[{\"types\":[\"Placed\"],\"tags\":[\"customer:1\"]}]}",
        )
    })?;
    query.validate()?;
    sse(
        app,
        &caller,
        ReadSource::Query(query),
        p.start,
        &headers,
        connection,
    )
    .await
}

async fn sse<S: EventStore>(
    app: App<S>,
    caller: &Caller,
    source: ReadSource,
    start: Start,
    headers: &HeaderMap,
    connection: Option<axum::Extension<Connection>>,
) -> Result<Response, Problem> {
    allow_subscription(caller, &source)?;
    let start = last_event_id(headers)?.unwrap_or(start);
    let access = recheck_subscription(&app, caller, &source);
    let subscription = app.hub.subscribe(source, start).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(SSE_QUEUE);
    tokio::spawn(
        pump_sse(
            subscription,
            access,
            tx,
            app.hub.clone(),
            app.config.subscriptions(),
            connection.map(|c| c.0),
            Arc::clone(&app.metrics),
        )
        .instrument(tracing::Span::current()),
    );
    let body = stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Proxies such as nginx would otherwise hold events back.
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Formats deliveries as SSE and hands them to the response until the client leaves, the
/// server stops, or the client stalls.
async fn pump_sse<S: EventStore>(
    mut subscription: Subscription<S>,
    mut access: Recheck<S>,
    tx: mpsc::Sender<Bytes>,
    hub: Hub<S>,
    settings: SubscriptionSettings,
    connection: Option<Connection>,
    metrics: Arc<ApiMetrics>,
) {
    let _open = Open::new(&metrics, |m| &m.sse);
    let retry = format!("retry: {}\n\n", settings.sse_retry.as_millis());
    if !send_sse(
        &tx,
        Bytes::from(retry),
        &settings,
        connection.as_ref(),
        &metrics,
    )
    .await
    {
        return;
    }
    // Made once, not per delivery: both register with a waker list or the timer wheel.
    let stopping = hub.stopping();
    tokio::pin!(stopping);
    let heartbeat = tokio::time::sleep(settings.heartbeat);
    tokio::pin!(heartbeat);
    loop {
        let delivery = tokio::select! {
            () = &mut stopping => return,
            () = tx.closed() => return,
            () = &mut heartbeat => Err(()),
            delivery = subscription.next() => Ok(delivery),
        };
        heartbeat
            .as_mut()
            .reset(tokio::time::Instant::now() + settings.heartbeat);
        if let Err(problem) = access.check() {
            let chunk = format!("event: error\ndata: {}\n\n", problem.to_json());
            send_sse(
                &tx,
                Bytes::from(chunk),
                &settings,
                connection.as_ref(),
                &metrics,
            )
            .await;
            return;
        }
        let sent = match delivery {
            Err(_) => {
                send_sse(
                    &tx,
                    Bytes::from_static(b": heartbeat\n\n"),
                    &settings,
                    connection.as_ref(),
                    &metrics,
                )
                .await
            }
            Ok(Ok(Delivery::Events(mut events))) => {
                access.caller().retain(&mut events, |e| &e.stream);
                if events.is_empty() {
                    continue;
                }
                metrics.sse_events.add(events.len() as u64);
                let _delivering = crate::observe::deliver_spans("sse", events.iter());
                // Sized for the batch (most live batches are one small event), not the chunk.
                let mut out = Vec::with_capacity((events.len() * 640).min(CHUNK_BYTES + 4096));
                let mut sent = true;
                for (i, event) in events.iter().enumerate() {
                    out.extend_from_slice(format!("id: {}\ndata: ", event.position).as_bytes());
                    write_record(&mut out, event);
                    out.extend_from_slice(b"\n\n");
                    if out.len() >= CHUNK_BYTES || i + 1 == events.len() {
                        let chunk = Bytes::from(std::mem::take(&mut out));
                        sent = send_sse(&tx, chunk, &settings, connection.as_ref(), &metrics).await;
                        if !sent {
                            break;
                        }
                    }
                }
                sent
            }
            Ok(Ok(Delivery::CaughtUp { position })) => {
                let chunk = format!("event: caught-up\ndata: {{\"position\":{position}}}\n\n");
                send_sse(
                    &tx,
                    Bytes::from(chunk),
                    &settings,
                    connection.as_ref(),
                    &metrics,
                )
                .await
            }
            Ok(Err(e)) => {
                let problem = Problem::from(e).to_json();
                let chunk = format!("event: error\ndata: {problem}\n\n");
                send_sse(
                    &tx,
                    Bytes::from(chunk),
                    &settings,
                    connection.as_ref(),
                    &metrics,
                )
                .await;
                false
            }
        };
        if !sent {
            return;
        }
    }
}

/// Hands one chunk to the response. False when the client is gone, or has read nothing for
/// the stall timeout, in which case its connection is dropped.
async fn send_sse(
    tx: &mpsc::Sender<Bytes>,
    chunk: Bytes,
    settings: &SubscriptionSettings,
    connection: Option<&Connection>,
    metrics: &ApiMetrics,
) -> bool {
    match tokio::time::timeout(settings.stall_timeout, tx.send(chunk)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::warn!(
                stall_timeout = ?settings.stall_timeout,
                "disconnecting an SSE subscriber that read nothing for the stall timeout"
            );
            metrics.stalled.inc();
            if let Some(connection) = connection {
                connection.close_now();
            }
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum ClientMessage {
    /// A catch-up subscription (`source`), or joining a persistent subscription (`group`).
    Subscribe {
        id: String,
        #[serde(default)]
        source: Option<SourceSpec>,
        #[serde(default)]
        from: Option<Value>,
        #[serde(default)]
        group: Option<String>,
        #[serde(default)]
        prefetch: Option<usize>,
        #[serde(default)]
        consumer: Option<String>,
    },
    Unsubscribe {
        id: String,
    },
    #[serde(rename_all = "camelCase")]
    Ack {
        id: String,
        ack_ids: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Nack {
        id: String,
        ack_ids: Vec<String>,
        action: NackAction,
        #[serde(default)]
        reason: String,
    },
    Ping {
        #[serde(default)]
        data: Value,
    },
}

/// Default and largest `prefetch` of a group consumer on a WebSocket.
const DEFAULT_PREFETCH: usize = 10;
const MAX_PREFETCH: usize = 1000;

/// A message from a subscription's pump to the socket, tagged so that messages of a
/// subscription that has since been unsubscribed can be dropped.
struct Outgoing {
    id: Arc<str>,
    generation: u64,
    text: String,
}

pub(crate) async fn websocket<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    headers: HeaderMap,
    connection: Option<axum::Extension<Connection>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Kept for a group consumer relayed to the node that runs the groups (crate::relay).
    let upstream = Upstream {
        authorization: headers.get(header::AUTHORIZATION).cloned(),
        // Passed on only for a caller named by its certificate.
        certificate: connection
            .and_then(|c| c.certificate.clone())
            .filter(|_| caller.by_certificate()),
        forwarded: headers.contains_key(crate::coordination::FORWARDED_HEADER),
    };
    // Clients send small control messages. tungstenite zero-fills its whole read buffer on
    // every read and allocates it per socket: at the 128 KiB default that was 30% of the
    // server's CPU with 1,000 sockets, and most of its memory per idle socket.
    upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| {
            // The socket's log lines carry the id of the request that opened it.
            ws_session(socket, app, caller, upstream).instrument(tracing::Span::current())
        })
}

fn close_message(code: u16, reason: &str) -> Message {
    // A close reason is at most 123 bytes.
    let mut reason = reason.to_owned();
    while reason.len() > 123 {
        reason.pop();
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    }))
}

/// How a socket's group consumers reach the node that runs the groups, when this node does
/// not: the caller's credentials, and whether the socket was itself opened by such a relay.
struct Upstream {
    authorization: Option<HeaderValue>,
    certificate: Option<Arc<skald_security::x509::Subject>>,
    forwarded: bool,
}

struct Session<S> {
    app: App<S>,
    caller: Caller,
    settings: SubscriptionSettings,
    tx: mpsc::Sender<Outgoing>,
    active: HashMap<Arc<str>, (u64, tokio::task::JoinHandle<()>)>,
    /// The group of each subscription that is a group consumer of this node's groups.
    groups: HashMap<Arc<str>, String>,
    /// Where the acks and nacks of each group consumer relayed to the owner go.
    relays: HashMap<Arc<str>, mpsc::Sender<String>>,
    upstream: Upstream,
    generation: u64,
}

/// What the session does after a client message.
enum Next {
    Reply(Value),
    Silent,
    Close(Value, String),
}

async fn ws_session<S: EventStore>(
    mut socket: WebSocket,
    app: App<S>,
    caller: Caller,
    upstream: Upstream,
) {
    let settings = app.config.subscriptions();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(WS_QUEUE);
    let hub = app.hub.clone();
    // The socket itself lasts only as long as the credential it was opened with.
    let mut access = Recheck::new(
        Arc::clone(&app.security),
        caller.clone(),
        Box::new(|_| Ok(())),
    );
    let mut session = Session {
        app,
        caller,
        settings: settings.clone(),
        tx,
        active: HashMap::new(),
        groups: HashMap::new(),
        relays: HashMap::new(),
        upstream,
        generation: 0,
    };
    let mut heartbeat = tokio::time::interval(settings.heartbeat);
    heartbeat.reset();
    loop {
        let outgoing: Message = tokio::select! {
            () = hub.stopping() => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    socket.send(close_message(1001, "the server is shutting down")),
                ).await;
                break;
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    let next = match (access.check(), message) {
                        (Err(problem), _) => protocol_error(problem),
                        (Ok(()), Message::Text(text)) => session.handle(text.as_str()).await,
                        _ => protocol_error(Problem::malformed(
                            "binary messages are not understood; send JSON text messages",
                        )),
                    };
                    match next {
                        Next::Reply(value) => Message::Text(value.to_string().into()),
                        Next::Silent => continue,
                        Next::Close(value, reason) => {
                            let error = Message::Text(value.to_string().into());
                            let _ = tokio::time::timeout(settings.stall_timeout, socket.send(error)).await;
                            let close = close_message(1008, &reason);
                            let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                            break;
                        }
                    }
                }
                // Pings are answered by the WebSocket layer; pongs need nothing.
                Some(Ok(_)) => continue,
            },
            Some(out) = rx.recv() => {
                let current = session.active.get(&out.id).is_some_and(|(g, _)| *g == out.generation);
                if !current {
                    continue;
                }
                Message::Text(out.text.into())
            }
            _ = heartbeat.tick() => match access.check() {
                Ok(()) => Message::Ping(Bytes::new()),
                Err(problem) => {
                    let (value, reason) = closing(problem);
                    let error = Message::Text(value.to_string().into());
                    let _ = tokio::time::timeout(settings.stall_timeout, socket.send(error)).await;
                    let close = close_message(1008, &reason);
                    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                    break;
                }
            },
        };
        match tokio::time::timeout(settings.stall_timeout, socket.send(outgoing)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!(
                    stall_timeout = ?settings.stall_timeout,
                    "closing a WebSocket whose client read nothing for the stall timeout"
                );
                session.app.metrics.stalled.inc();
                let reason = format!("the client read nothing for {:?}", settings.stall_timeout);
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    socket.send(close_message(1008, &reason)),
                )
                .await;
                break;
            }
        }
    }
    for (id, (_, task)) in session.active.drain() {
        // A relay ends by itself once it has sent the acks still queued.
        if !session.relays.contains_key(&id) {
            task.abort();
        }
    }
}

impl<S: EventStore> Session<S> {
    async fn handle(&mut self, text: &str) -> Next {
        let message: ClientMessage = match parse_json(text.as_bytes(), "message") {
            Ok(message) => message,
            Err(problem) => return protocol_error(problem),
        };
        match message {
            ClientMessage::Ping { data } => Next::Reply(json!({"type": "pong", "data": data})),
            ClientMessage::Unsubscribe { id } => match self.active.remove(id.as_str()) {
                Some((_, task)) => {
                    self.groups.remove(id.as_str());
                    // A relay ends by itself once it has sent the acks still queued.
                    if self.relays.remove(id.as_str()).is_none() {
                        task.abort();
                    }
                    Next::Reply(json!({"type": "unsubscribed", "id": id}))
                }
                None => Next::Reply(error_reply(
                    Some(&id),
                    Problem::malformed(format!("no subscription {id:?} on this socket")),
                )),
            },
            ClientMessage::Subscribe {
                id,
                source,
                from,
                group,
                prefetch,
                consumer,
            } => {
                let subscribed = match (source, group) {
                    (Some(source), None) if prefetch.is_none() && consumer.is_none() => {
                        self.subscribe(&id, source, from).await
                    }
                    (None, Some(group)) if from.is_none() => {
                        match self.app.coordination.relay_to(self.upstream.forwarded) {
                            Ok(None) => self.join(&id, group, prefetch, consumer).await,
                            Ok(Some(to)) => {
                                return self.relay(id, to, group, prefetch, consumer).await;
                            }
                            Err(problem) => Err(problem),
                        }
                    }
                    _ => Err(Problem::malformed(
                        "subscribe takes either source (and from) for a catch-up subscription, \
                         or group (and prefetch, consumer) to join a persistent subscription",
                    )),
                };
                match subscribed {
                    Ok(()) => Next::Reply(json!({"type": "subscribed", "id": id})),
                    Err(problem) => Next::Reply(error_reply(Some(&id), problem)),
                }
            }
            ClientMessage::Ack { id, ack_ids } => self.settle(id, ack_ids, None, text).await,
            ClientMessage::Nack {
                id,
                ack_ids,
                action,
                reason,
            } => self.settle(id, ack_ids, Some((action, reason)), text).await,
        }
    }

    /// Acks or nacks messages of the group subscription `id`; silent unless some ids are
    /// unknown. A relayed consumer's are sent on to the owner as the client wrote them
    /// (`text`), and the owner's answer comes back through the relay.
    async fn settle(
        &mut self,
        id: String,
        ack_ids: Vec<String>,
        nack: Option<(NackAction, String)>,
        text: &str,
    ) -> Next {
        // A consumer that ended (its group deleted, say) settles nothing any more.
        if self
            .active
            .get(id.as_str())
            .is_none_or(|(_, task)| task.is_finished())
        {
            self.active.remove(id.as_str());
            self.groups.remove(id.as_str());
            self.relays.remove(id.as_str());
        }
        if let Some(relay) = self.relays.get(id.as_str()) {
            // Waits while the owner's socket is slow (the client's own socket is read no
            // faster than the owner takes its acks), for the stall timeout at most.
            let queued =
                tokio::time::timeout(self.settings.stall_timeout, relay.send(text.to_owned()))
                    .await;
            return match queued {
                Ok(Ok(())) => Next::Silent,
                Ok(Err(_)) => Next::Reply(error_reply(
                    Some(&id),
                    Problem::malformed(format!("group subscription {id:?} has ended")),
                )),
                Err(_) => Next::Reply(error_reply(
                    Some(&id),
                    Problem::from(skald_core::Error::Unavailable(format!(
                        "the node that runs consumer groups took no ack or nack of subscription \
                         {id:?} for {:?}; this one was not sent, send it again",
                        self.settings.stall_timeout
                    ))),
                )),
            };
        }
        let Some(group) = self.groups.get(id.as_str()).cloned() else {
            return Next::Reply(error_reply(
                Some(&id),
                Problem::malformed(format!(
                    "no group subscription {id:?} on this socket (it ended, or never was); ack \
                     and nack name the id of a subscribe with a group"
                )),
            ));
        };
        // The rules may have changed since the join.
        if let Err(problem) = crate::groups::allow_existing(&self.app, &self.caller, &group).await {
            return Next::Reply(error_reply(Some(&id), problem));
        }
        let outcome = match nack {
            None => match self.app.groups() {
                Ok(groups) => groups.ack(&group, ack_ids).await,
                Err(e) => Err(e),
            },
            Some((action, reason)) => match self.app.groups() {
                Ok(groups) => groups.nack(&group, ack_ids, action, reason).await,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(outcome) if outcome.unknown.is_empty() => Next::Silent,
            Ok(outcome) => Next::Reply(error_reply(
                Some(&id),
                Problem::malformed(format!(
                    "these ack ids name no message in flight (already acknowledged, taken back \
                     after a timeout, or never delivered): {}",
                    outcome.unknown.join(", ")
                )),
            )),
            Err(e) => Next::Reply(error_reply(Some(&id), crate::groups::group_problem(e))),
        }
    }

    /// Checks a new subscription id: its length, that it is free, and the socket's limit.
    fn check_id(&mut self, id: &str) -> Result<(), Problem> {
        if id.is_empty() || id.len() > MAX_SUBSCRIPTION_ID {
            return Err(Problem::malformed(format!(
                "a subscription id must be 1 to {MAX_SUBSCRIPTION_ID} bytes long"
            )));
        }
        self.active.retain(|_, (_, task)| !task.is_finished());
        let active = &self.active;
        self.groups.retain(|id, _| active.contains_key(id));
        self.relays.retain(|id, _| active.contains_key(id));
        if self.active.contains_key(id) {
            return Err(Problem::malformed(format!(
                "subscription {id:?} is already open on this socket"
            )));
        }
        if self.active.len() >= self.settings.max_per_socket {
            return Err(Problem::malformed(format!(
                "this socket already has {} subscriptions, the most allowed; unsubscribe one first",
                self.settings.max_per_socket
            )));
        }
        Ok(())
    }

    async fn join(
        &mut self,
        id: &str,
        group: String,
        prefetch: Option<usize>,
        consumer: Option<String>,
    ) -> Result<(), Problem> {
        self.check_id(id)?;
        let prefetch = prefetch.unwrap_or(DEFAULT_PREFETCH);
        if !(1..=MAX_PREFETCH).contains(&prefetch) {
            return Err(Problem::malformed(format!(
                "prefetch must be 1 to {MAX_PREFETCH}, got {prefetch}"
            )));
        }
        let access = crate::groups::allow_consumer(&self.app, &self.caller, &group).await?;
        self.generation += 1;
        let name = consumer.unwrap_or_else(|| format!("websocket-{id}"));
        if name.is_empty() || name.len() > MAX_SUBSCRIPTION_ID {
            return Err(Problem::malformed(format!(
                "a consumer name must be 1 to {MAX_SUBSCRIPTION_ID} bytes long"
            )));
        }
        let consumer = self
            .app
            .groups()?
            .join(&group, &name, "websocket", prefetch)
            .await
            .map_err(crate::groups::group_problem)?;
        let id: Arc<str> = Arc::from(id);
        let task = tokio::spawn(
            pump_group(
                consumer,
                access,
                Arc::clone(&id),
                self.generation,
                self.tx.clone(),
                Open::new(&self.app.metrics, |m| &m.group_consumers),
            )
            .in_current_span(),
        );
        self.active.insert(Arc::clone(&id), (self.generation, task));
        self.groups.insert(id, group);
        Ok(())
    }

    /// Joins `group` at the node that runs the groups and relays the consumer
    /// (crate::relay); the owner's answer comes later, from the relay.
    async fn relay(
        &mut self,
        id: String,
        to: crate::coordination::RelayTo,
        group: String,
        prefetch: Option<usize>,
        consumer: Option<String>,
    ) -> Next {
        // A join costs the owner a connection: it counts against the caller's rate, as a
        // request would.
        if let Err(problem) = self
            .check_id(&id)
            .and_then(|()| self.caller.limit(&self.app.security))
        {
            return Next::Reply(error_reply(Some(&id), problem));
        }
        let join = crate::relay::Join {
            to,
            authorization: self.upstream.authorization.clone(),
            certificate: self.upstream.certificate.clone(),
            subscribe: json!({"type": "subscribe", "id": id, "group": group,
                              "prefetch": prefetch, "consumer": consumer}),
            id: id.clone(),
        };
        self.generation += 1;
        let generation = self.generation;
        let id: Arc<str> = Arc::from(id);
        let (settle, settled) = mpsc::channel(crate::relay::SETTLE_QUEUE);
        let tagged = Arc::clone(&id);
        let wrap = move |relayed| Outgoing {
            id: Arc::clone(&tagged),
            generation,
            text: match relayed {
                crate::relay::Relayed::Text(text) => text,
                crate::relay::Relayed::Ended(problem) => {
                    error_reply(Some(&tagged), problem).to_string()
                }
            },
        };
        let relay = crate::relay::relay(
            Arc::clone(&self.app.coordination),
            join,
            settled,
            self.tx.clone(),
            wrap,
        );
        let task = tokio::spawn(relay.in_current_span());
        self.active.insert(Arc::clone(&id), (generation, task));
        self.relays.insert(id, settle);
        Next::Silent
    }

    async fn subscribe(
        &mut self,
        id: &str,
        source: SourceSpec,
        from: Option<Value>,
    ) -> Result<(), Problem> {
        self.check_id(id)?;
        let source = source.to_read_source().map_err(Problem::from)?;
        let start = crate::start::start_from_json(from, matches!(source, ReadSource::Stream(_)))?;
        allow_subscription(&self.caller, &source)?;
        let access = recheck_subscription(&self.app, &self.caller, &source);
        let subscription = self.app.hub.subscribe(source, start).await?;
        self.generation += 1;
        let id: Arc<str> = Arc::from(id);
        let task = tokio::spawn(
            pump_ws(
                subscription,
                access,
                Arc::clone(&id),
                self.generation,
                self.tx.clone(),
                Arc::clone(&self.app.metrics),
            )
            .in_current_span(),
        );
        self.active.insert(id, (self.generation, task));
        Ok(())
    }
}

/// A live subscription needs `subscribe` on the source (all of one stream, some stream of
/// many) and `read` likewise; what it delivers is then filtered by `read`.
pub(crate) fn allow_subscription(caller: &Caller, source: &ReadSource) -> Result<(), Problem> {
    caller.require_some(Permission::Subscribe, Scope::from(source))?;
    caller.require_some(Permission::Read, Scope::from(source))
}

/// The check a subscription to `source` repeats as it runs.
pub(crate) fn recheck_subscription<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    source: &ReadSource,
) -> Recheck<S> {
    let source = source.clone();
    Recheck::new(
        Arc::clone(&app.security),
        caller.clone(),
        Box::new(move |caller| allow_subscription(caller, &source)),
    )
}

/// Input that is not a message: an error with no id, then the socket closes with the detail.
fn protocol_error(problem: Problem) -> Next {
    let (error, reason) = closing(problem);
    Next::Close(error, reason)
}

/// The error message with no id that precedes closing the socket, and the close reason.
fn closing(problem: Problem) -> (Value, String) {
    let reason = problem.to_json()["detail"]
        .as_str()
        .unwrap_or("bad message")
        .to_owned();
    (error_reply(None, problem), reason)
}

fn error_reply(id: Option<&str>, problem: Problem) -> Value {
    json!({"type": "error", "id": id, "problem": problem.to_json()})
}

/// Hands a group consumer's messages to the socket until it leaves or the group ends it.
async fn pump_group<S: EventStore>(
    mut consumer: Consumer,
    mut access: Recheck<S>,
    id: Arc<str>,
    generation: u64,
    tx: mpsc::Sender<Outgoing>,
    _open: Open,
) {
    let quoted_id = serde_json::to_string(&*id).expect("a string serializes");
    loop {
        let event = consumer.next().await;
        if let Err(problem) = access.check() {
            // Dropping the consumer hands what it holds back to the group.
            let text = error_reply(Some(&id), problem).to_string();
            let _ = tx
                .send(Outgoing {
                    id: Arc::clone(&id),
                    generation,
                    text,
                })
                .await;
            return;
        }
        let text = match event {
            ConsumerEvent::Messages(messages) => {
                let mut out = format!("{{\"type\":\"messages\",\"id\":{quoted_id},\"messages\":")
                    .into_bytes();
                let _delivering = crate::observe::deliver_spans(
                    "group-websocket",
                    messages.iter().map(|m| &m.event),
                );
                crate::groups::write_messages(&mut out, &messages);
                out.push(b'}');
                String::from_utf8(out).expect("messages are UTF-8")
            }
            ConsumerEvent::Ended(e) => {
                let text = error_reply(Some(&id), crate::groups::group_problem(e)).to_string();
                let _ = tx
                    .send(Outgoing {
                        id: Arc::clone(&id),
                        generation,
                        text,
                    })
                    .await;
                return;
            }
        };
        let sent = tx
            .send(Outgoing {
                id: Arc::clone(&id),
                generation,
                text,
            })
            .await;
        if sent.is_err() {
            return;
        }
    }
}

async fn pump_ws<S: EventStore>(
    mut subscription: Subscription<S>,
    mut access: Recheck<S>,
    id: Arc<str>,
    generation: u64,
    tx: mpsc::Sender<Outgoing>,
    metrics: Arc<ApiMetrics>,
) {
    let _open = Open::new(&metrics, |m| &m.websocket);
    let quoted_id = serde_json::to_string(&*id).expect("a string serializes");
    let send = |text: String| {
        tx.send(Outgoing {
            id: Arc::clone(&id),
            generation,
            text,
        })
    };
    loop {
        let delivery = subscription.next().await;
        if let Err(problem) = access.check() {
            let _ = send(error_reply(Some(&id), problem).to_string()).await;
            return;
        }
        match delivery {
            Ok(Delivery::Events(mut events)) => {
                access.caller().retain(&mut events, |e| &e.stream);
                if events.is_empty() {
                    continue;
                }
                metrics.websocket_events.add(events.len() as u64);
                let _delivering = crate::observe::deliver_spans("websocket", events.iter());
                for batch in ws_batches(&quoted_id, &events) {
                    if send(batch).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Delivery::CaughtUp { position }) => {
                let text = format!(
                    "{{\"type\":\"caught-up\",\"id\":{quoted_id},\"position\":{position}}}"
                );
                if send(text).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = send(error_reply(Some(&id), Problem::from(e)).to_string()).await;
                return;
            }
        }
    }
}

/// `events` messages of about [`CHUNK_BYTES`] each (at least one event each).
fn ws_batches(quoted_id: &str, events: &[Arc<skald_core::RecordedEvent>]) -> Vec<String> {
    let head = format!("{{\"type\":\"events\",\"id\":{quoted_id},\"events\":[");
    let mut batches = Vec::new();
    let mut out = Vec::new();
    for event in events {
        if out.is_empty() {
            out.extend_from_slice(head.as_bytes());
        } else {
            out.push(b',');
        }
        write_record(&mut out, event);
        if out.len() >= CHUNK_BYTES {
            out.extend_from_slice(b"]}");
            batches.push(String::from_utf8(std::mem::take(&mut out)).expect("records are UTF-8"));
        }
    }
    if !out.is_empty() {
        out.extend_from_slice(b"]}");
        batches.push(String::from_utf8(out).expect("records are UTF-8"));
    }
    batches
}
