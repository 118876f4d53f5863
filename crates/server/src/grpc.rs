//! The gRPC API (`proto/skald/v1/skald.proto`, `docs/grpc.md`): tonic services routed by the
//! same router as the HTTP API, so that they share the port, TLS, the guard (authentication,
//! rate limits) and the per-handler checks. Each method does what its HTTP endpoint does, with
//! the same [`Problem`] for each error, carried as a gRPC status.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use skald_core::{
    AppendCondition, AppendRequest, Category, Direction, EventData, EventStore, EventType,
    ExpectedRevision, Metadata, Position, ProposedEvent, Query, QueryItem, ReadRequest, ReadSource,
    RecordedEvent, Revision, StreamName, Tag,
};
use skald_hub::groups::{
    ConsumerEvent, GroupInfo, GroupSettings, GroupStart, NackAction, NewGroup, SettingsUpdate,
    Strategy,
};
use skald_hub::{AllSpec, Delivery, SourceSpec, Start, Subscription, filter_of};
use skald_proto::v1 as pb;
use skald_security::Permission;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Caller, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA, Recheck, Scope};
use crate::observe::Open;
use crate::{App, Problem, VERSION};

type Reply<T> = Result<Response<T>, Status>;
type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Responses waiting between a subscription or a consumer and its HTTP/2 stream. Kept small:
/// HTTP/2 flow control holds the rest back, and a stalled client costs little memory.
const QUEUE: usize = 4;
/// Events are sent in messages of about this size (at least one event each): what waits for a
/// slow client stays bounded in bytes, and no message nears a client's decoding limit (4 MiB by
/// default in most gRPC libraries) unless one event does.
const CHUNK_BYTES: usize = 64 * 1024;
/// Capacity of a consumer whose `Join` gives none.
const DEFAULT_CAPACITY: usize = 100;
/// The most a consumer may hold unacknowledged.
const MAX_CAPACITY: usize = 10_000;
/// Longest consumer name, in bytes.
const MAX_CONSUMER_NAME: usize = 128;

impl From<Problem> for Status {
    fn from(problem: Problem) -> Self {
        problem.to_grpc_status()
    }
}

fn problem(e: skald_core::Error) -> Status {
    Problem::from(e).to_grpc_status()
}

fn malformed(detail: impl Into<String>) -> Status {
    Problem::malformed(detail).to_grpc_status()
}

/// The caller the guard attached to the request; its absence is a bug and fails closed.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the request was not authenticated"))
}

// ---------------------------------------------------------------------------------------------
// Conversions

fn stream_name(raw: String, field: &str) -> Result<StreamName, Status> {
    if raw.is_empty() {
        return Err(malformed(format!("{field} is required")));
    }
    StreamName::new(raw).map_err(problem)
}

fn names<T>(
    field: &str,
    values: Vec<String>,
    parse: impl Fn(String) -> skald_core::Result<T>,
) -> Result<Vec<T>, Status> {
    values
        .into_iter()
        .map(|v| parse(v).map_err(|e| malformed(format!("{field}: {e}"))))
        .collect()
}

fn query(q: Option<pb::Query>, field: &str) -> Result<Query, Status> {
    let q = q.ok_or_else(|| malformed(format!("{field} is required")))?;
    let items = q
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            Ok(QueryItem {
                types: names(
                    &format!("{field}.items[{i}].types"),
                    item.types,
                    EventType::new,
                )?,
                tags: names(&format!("{field}.items[{i}].tags"), item.tags, Tag::new)?,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let query = Query { items };
    query
        .validate()
        .map_err(|e| malformed(format!("{field}: {e}")))?;
    Ok(query)
}

/// A source to read or subscribe to, with its names checked.
fn source(source: Option<pb::Source>) -> Result<ReadSource, Status> {
    Ok(match source_spec(source)? {
        // System streams are readable as the rules allow, as over HTTP.
        SourceSpec::Stream(name) => ReadSource::Stream(crate::readable_stream_name(name)?),
        SourceSpec::All(all) => ReadSource::All(filter_of(all.types, all.tags)),
        SourceSpec::Category(name) => ReadSource::Category(
            Category::new(name).map_err(|e| malformed(format!("source.category: {e}")))?,
        ),
        SourceSpec::Query(q) => ReadSource::Query(q),
    })
}

fn proposed(e: pb::ProposedEvent, at: &str) -> Result<ProposedEvent, Status> {
    let id = crate::cloudevents::event_id(Some(e.id.as_str()).filter(|id| !id.is_empty()), at)?;
    let invalid = |err| crate::cloudevents::invalid_at(at, err);
    let event_type = EventType::new(e.r#type).map_err(invalid)?;
    let tags = e
        .tags
        .into_iter()
        .map(Tag::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let content_type = if e.content_type.is_empty() {
        "application/json".to_owned()
    } else {
        e.content_type
    };
    let data = EventData::with_content_type(content_type, e.data)
        .map_err(|err| malformed(format!("{at}.data: {err}")))?;
    let metadata = if e.metadata.is_empty() {
        Metadata::empty()
    } else {
        Metadata::new(e.metadata)
            .map_err(|_| malformed(format!("{at}.metadata must be a JSON object")))?
    };
    Ok(ProposedEvent {
        id,
        event_type,
        data,
        metadata,
        tags,
        source: e.source,
    })
}

fn expected(e: Option<pb::append_request::ExpectedRevision>) -> Result<ExpectedRevision, Status> {
    use pb::append_request::ExpectedRevision as E;
    Ok(match e {
        None => ExpectedRevision::Any,
        Some(E::ExpectedExact(r)) => ExpectedRevision::Exact(Revision(r)),
        Some(E::ExpectedState(state)) => match pb::StreamState::try_from(state) {
            Ok(pb::StreamState::Any) => ExpectedRevision::Any,
            Ok(pb::StreamState::NoStream) => ExpectedRevision::NoStream,
            Ok(pb::StreamState::Exists) => ExpectedRevision::StreamExists,
            Err(_) => {
                return Err(malformed(format!(
                    "expected_state {state} is not a StreamState (0 any, 1 no stream, 2 exists)"
                )));
            }
        },
    })
}

/// A stored event on the wire.
pub(crate) fn recorded(e: &RecordedEvent) -> pb::RecordedEvent {
    pb::RecordedEvent {
        id: e.id.0.to_string(),
        stream: e.stream.as_str().to_owned(),
        r#type: e.event_type.as_str().to_owned(),
        content_type: e.data.content_type().to_owned(),
        data: e.data.bytes().to_vec(),
        metadata: e.metadata.as_str().to_owned(),
        tags: e.tags.iter().map(|t| t.as_str().to_owned()).collect(),
        source: e.source.clone(),
        recorded_at_micros: e.recorded_at.0,
        revision: e.revision.0,
        position: e.position.0,
    }
}

/// Splits events into messages of about [`CHUNK_BYTES`].
fn chunks<'a>(events: impl IntoIterator<Item = &'a RecordedEvent>) -> Vec<Vec<pb::RecordedEvent>> {
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for event in events {
        bytes += event.data.bytes().len() + event.metadata.as_str().len() + 128;
        chunk.push(recorded(event));
        if bytes >= CHUNK_BYTES {
            out.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Streams

pub(crate) struct StreamsApi<S> {
    pub app: App<S>,
}

#[tonic::async_trait]
impl<S: EventStore> pb::streams_server::Streams for StreamsApi<S> {
    async fn append(&self, request: Request<pb::AppendRequest>) -> Reply<pb::AppendResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        // System streams (`$...`) are refused: only the server writes them.
        let stream = stream_name(r.stream, "stream")?;
        caller.require(Permission::Append, stream.as_str())?;
        let expected = expected(r.expected_revision)?;
        if r.condition.is_some() {
            caller.require_condition()?;
        }
        let condition = r
            .condition
            .map(|c| {
                Ok::<_, Status>(AppendCondition {
                    query: query(c.fail_if_events_match, "condition.fail_if_events_match")?,
                    after: c.after.map(Position),
                })
            })
            .transpose()?;
        let events = r
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| proposed(e, &format!("events[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let result = crate::append_traced(
            &self.app,
            AppendRequest {
                stream,
                expected,
                condition,
                events,
            },
        )
        .await
        .map_err(|e| caller.append_problem(e).to_grpc_status())?;
        Ok(Response::new(pb::AppendResponse {
            first_position: result.first_position.0,
            last_position: result.last_position.0,
            first_revision: result.first_revision.0,
            last_revision: result.last_revision.0,
            replayed: result.replayed,
        }))
    }

    type ReadStream = ReplyStream<pb::ReadResponse>;

    async fn read(&self, request: Request<pb::ReadRequest>) -> Reply<Self::ReadStream> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let source = source(r.source)?;
        let direction = match pb::Direction::try_from(r.direction) {
            Ok(pb::Direction::Forward) => Direction::Forward,
            Ok(pb::Direction::Backward) => Direction::Backward,
            Err(_) => {
                return Err(malformed(format!(
                    "direction {} is not a Direction (0 forward, 1 backward)",
                    r.direction
                )));
            }
        };
        caller.require_some(Permission::Read, Scope::from(&source))?;
        if let ReadSource::Stream(stream) = &source
            && self
                .app
                .store
                .stream_head(stream)
                .await
                .map_err(problem)?
                .is_none()
        {
            return Err(problem(skald_core::Error::StreamNotFound(stream.clone())));
        }
        let request = ReadRequest {
            source,
            from: r.from,
            direction,
            limit: 0,
        };
        let limit = (r.limit > 0).then(|| usize::try_from(r.limit).unwrap_or(usize::MAX));
        let access = crate::recheck_read(&self.app, &caller, &request.source);
        Ok(Response::new(read_pages(crate::Pages::new(
            Arc::clone(&self.app.store),
            request,
            limit,
            access,
        ))))
    }

    async fn head(&self, request: Request<pb::HeadRequest>) -> Reply<pb::HeadResponse> {
        let caller = caller(&request)?;
        let name = request.into_inner().stream;
        if name.is_empty() {
            return Err(malformed("stream is required"));
        }
        let stream = crate::readable_stream_name(name)?;
        caller.require(Permission::Read, stream.as_str())?;
        match self.app.store.stream_head(&stream).await.map_err(problem)? {
            Some(head) => Ok(Response::new(pb::HeadResponse {
                revision: head.revision.0,
                position: head.position.0,
            })),
            None => Err(problem(skald_core::Error::StreamNotFound(stream))),
        }
    }

    async fn info(&self, request: Request<pb::InfoRequest>) -> Reply<pb::InfoResponse> {
        // As over HTTP: only the version for callers who may read nothing.
        let caller = caller(&request)?;
        if caller.require_some(Permission::Read, Scope::All).is_err() {
            return Ok(Response::new(pb::InfoResponse {
                version: VERSION.to_owned(),
                ..Default::default()
            }));
        }
        let info = self.app.store.info().await.map_err(problem)?;
        Ok(Response::new(pb::InfoResponse {
            version: VERSION.to_owned(),
            head_position: info.head_position.map(|p| p.0),
            durability: info.durability.to_string(),
            storage_bytes: info.storage_bytes,
        }))
    }
}

/// A read as a stream of messages of about [`CHUNK_BYTES`], one store page at a time.
fn read_pages<S: EventStore>(pages: crate::Pages<S>) -> ReplyStream<pb::ReadResponse> {
    let messages = stream::unfold(pages, |mut pages| async move {
        loop {
            let messages: Vec<_> = match pages.next().await? {
                // A page the rules emptied is skipped, not sent empty.
                Ok(events) if events.is_empty() => continue,
                Ok(events) => chunks(&events)
                    .into_iter()
                    .map(|events| Ok(pb::ReadResponse { events }))
                    .collect(),
                Err(e) => vec![Err(e.to_grpc_status())],
            };
            return Some((stream::iter(messages), pages));
        }
    });
    Box::pin(messages.flatten())
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

pub(crate) struct SubscriptionsApi<S> {
    pub app: App<S>,
}

fn start(start: Option<pb::subscribe_request::Start>) -> Result<Start, Status> {
    use pb::subscribe_request::Start as P;
    start_at(match start {
        None => None,
        Some(P::At(at)) => Some(Err(at)),
        Some(P::Position(p)) => Some(Ok(Start::Position(p))),
        Some(P::Revision(r)) => Some(Ok(Start::Revision(r))),
    })
}

/// A start from a request's `start` oneof: `Err(at)` for a `StartAt` still to be checked.
fn start_at(start: Option<Result<Start, i32>>) -> Result<Start, Status> {
    match start {
        None => Ok(Start::Beginning),
        Some(Ok(start)) => Ok(start),
        Some(Err(at)) => match pb::StartAt::try_from(at) {
            Ok(pb::StartAt::Beginning) => Ok(Start::Beginning),
            Ok(pb::StartAt::Now) => Ok(Start::Now),
            Err(_) => Err(malformed(format!(
                "at {at} is not a StartAt (0 beginning, 1 now)"
            ))),
        },
    }
}

/// Ends a response stream: the receiver's items, then the reason the sender gave up, if any.
/// It is set beside the channel, not sent through it: a stalled client's channel is full.
struct Ending(std::sync::Mutex<Option<Status>>);

impl Ending {
    fn new() -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(None)))
    }

    fn end(&self, status: Status) {
        *self.0.lock().expect("not poisoned") = Some(status);
    }

    fn take(&self) -> Option<Status> {
        self.0.lock().expect("not poisoned").take()
    }
}

/// The response stream over `rx`, ended by the status in `ending` once the sender is gone.
fn response_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
    ending: Arc<Ending>,
) -> ReplyStream<T> {
    Box::pin(stream::unfold(
        (rx, ending, false),
        |(mut rx, ending, done)| async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(item) => Some((Ok(item), (rx, ending, false))),
                None => ending
                    .take()
                    .map(|status| (Err(status), (rx, ending, true))),
            }
        },
    ))
}

#[tonic::async_trait]
impl<S: EventStore> pb::subscriptions_server::Subscriptions for SubscriptionsApi<S> {
    type SubscribeStream = ReplyStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Reply<Self::SubscribeStream> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let source = source(r.source)?;
        let start = start(r.start)?;
        crate::subscribe::allow_subscription(&caller, &source)?;
        let access = crate::subscribe::recheck_subscription(&self.app, &caller, &source);
        let subscription = self
            .app
            .hub
            .subscribe(source, start)
            .await
            .map_err(problem)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let ending = Ending::new();
        tokio::spawn(pump_subscription(
            subscription,
            access,
            tx,
            Arc::clone(&ending),
            self.app.clone(),
        ));
        Ok(Response::new(response_stream(rx, ending)))
    }
}

/// Hands deliveries to the response until the client leaves, the server stops, or the client
/// stalls for longer than the stall timeout.
async fn pump_subscription<S: EventStore>(
    mut subscription: Subscription<S>,
    mut access: Recheck<S>,
    tx: mpsc::Sender<pb::SubscribeResponse>,
    ending: Arc<Ending>,
    app: App<S>,
) {
    let _open = Open::new(&app.metrics, |m| &m.grpc);
    let stall = app.config.subscriptions().stall_timeout;
    let stopping = app.hub.stopping();
    tokio::pin!(stopping);
    loop {
        let delivery = tokio::select! {
            () = &mut stopping => {
                ending.end(Status::unavailable("the server is stopping; resubscribe from the last position + 1"));
                return;
            }
            () = tx.closed() => return,
            delivery = subscription.next() => delivery,
        };
        if let Err(problem) = access.check() {
            ending.end(problem.to_grpc_status());
            return;
        }
        let mut _delivering = Vec::new();
        let messages = match delivery {
            Ok(Delivery::Events(mut events)) => {
                access.caller().retain(&mut events, |e| &e.stream);
                if events.is_empty() {
                    continue;
                }
                app.metrics.grpc_events.add(events.len() as u64);
                _delivering = crate::observe::deliver_spans("grpc", events.iter());
                chunks(events.iter().map(|e| &**e))
                    .into_iter()
                    .map(|events| pb::subscribe_response::Kind::Events(pb::EventBatch { events }))
                    .collect()
            }
            Ok(Delivery::CaughtUp { position }) => {
                vec![pb::subscribe_response::Kind::CaughtUp(pb::CaughtUp {
                    position,
                })]
            }
            Err(e) => {
                ending.end(problem(e));
                return;
            }
        };
        for kind in messages {
            let message = pb::SubscribeResponse { kind: Some(kind) };
            match tokio::time::timeout(stall, tx.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    app.metrics.stalled.add(1);
                    ending.end(Problem::subscriber_stalled(stall).to_grpc_status());
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Groups

pub(crate) struct GroupsApi<S> {
    pub app: App<S>,
}

fn group_status(e: skald_core::Error) -> Status {
    crate::groups::group_problem(e).to_grpc_status()
}

/// A source as groups store it: filters and queries checked, stream and category names left
/// to whoever uses the source.
fn source_spec(source: Option<pb::Source>) -> Result<SourceSpec, Status> {
    let kind = source
        .and_then(|s| s.kind)
        .ok_or_else(|| malformed("source is required: a stream, all, a category or a query"))?;
    Ok(match kind {
        pb::source::Kind::Stream(name) => SourceSpec::Stream(name),
        pb::source::Kind::Category(name) => SourceSpec::Category(name),
        pb::source::Kind::All(filter) => SourceSpec::All(AllSpec {
            types: names("source.all.types", filter.types, EventType::new)?,
            tags: names("source.all.tags", filter.tags, Tag::new)?,
        }),
        pb::source::Kind::Query(q) => SourceSpec::Query(query(Some(q), "source.query")?),
    })
}

fn source_message(spec: &SourceSpec) -> pb::Source {
    let kind = match spec {
        SourceSpec::Stream(name) => pb::source::Kind::Stream(name.clone()),
        SourceSpec::Category(name) => pb::source::Kind::Category(name.clone()),
        SourceSpec::All(all) => pb::source::Kind::All(pb::AllFilter {
            types: all.types.iter().map(|t| t.as_str().to_owned()).collect(),
            tags: all.tags.iter().map(|t| t.as_str().to_owned()).collect(),
        }),
        SourceSpec::Query(q) => pb::source::Kind::Query(pb::Query {
            items: q
                .items
                .iter()
                .map(|item| pb::QueryItem {
                    types: item.types.iter().map(|t| t.as_str().to_owned()).collect(),
                    tags: item.tags.iter().map(|t| t.as_str().to_owned()).collect(),
                })
                .collect(),
        }),
    };
    pb::Source { kind: Some(kind) }
}

/// The settings a request gives, as a change to apply (to the defaults, on creation).
fn settings_update(settings: Option<pb::GroupSettings>) -> Result<SettingsUpdate, Status> {
    let s = settings.unwrap_or_default();
    let strategy = s
        .strategy
        .map(|v| match pb::Strategy::try_from(v) {
            Ok(pb::Strategy::RoundRobin) => Ok(Strategy::RoundRobin),
            Ok(pb::Strategy::Pinned) => Ok(Strategy::Pinned),
            Err(_) => Err(malformed(format!(
                "settings.strategy {v} is not a Strategy (0 round robin, 1 pinned)"
            ))),
        })
        .transpose()?;
    Ok(SettingsUpdate {
        strategy,
        message_timeout_ms: s.message_timeout_ms,
        max_deliveries: s.max_deliveries,
        retry_delay_ms: s.retry_delay_ms,
        max_retry_delay_ms: s.max_retry_delay_ms,
        buffer_size: s
            .buffer_size
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
        buffer_bytes: s
            .buffer_bytes
            .map(|v| usize::try_from(v).unwrap_or(usize::MAX)),
        checkpoint_after_ms: s.checkpoint_after_ms,
    })
}

fn group_message(info: &GroupInfo) -> pb::GroupInfo {
    let d = &info.definition;
    let s = &d.settings;
    let stats = &info.stats;
    pb::GroupInfo {
        name: d.name.clone(),
        source: Some(source_message(&d.source)),
        start: Some(match d.start {
            GroupStart::Position(p) => pb::group_info::Start::StartPosition(p),
            GroupStart::Revision(r) => pb::group_info::Start::StartRevision(r),
        }),
        settings: Some(pb::GroupSettings {
            strategy: Some(match s.strategy {
                Strategy::RoundRobin => pb::Strategy::RoundRobin,
                Strategy::Pinned => pb::Strategy::Pinned,
            } as i32),
            message_timeout_ms: Some(s.message_timeout_ms),
            max_deliveries: Some(s.max_deliveries),
            retry_delay_ms: Some(s.retry_delay_ms),
            max_retry_delay_ms: Some(s.max_retry_delay_ms),
            buffer_size: Some(s.buffer_size as u64),
            buffer_bytes: Some(s.buffer_bytes as u64),
            checkpoint_after_ms: Some(s.checkpoint_after_ms),
        }),
        stats: Some(pb::GroupStats {
            consumers: stats
                .consumers
                .iter()
                .map(|c| pb::ConsumerStats {
                    name: c.name.clone(),
                    kind: c.kind.to_owned(),
                    in_flight: c.in_flight as u64,
                    capacity: c.capacity as u64,
                })
                .collect(),
            in_flight: stats.in_flight as u64,
            available: stats.available as u64,
            checkpoint: stats.checkpoint,
            head: stats.head,
            lag: stats.lag,
            parked: stats.parked,
            delivered: stats.delivered,
            delivery_rate: stats.delivery_rate,
        }),
    }
}

#[tonic::async_trait]
impl<S: EventStore> pb::groups_server::Groups for GroupsApi<S> {
    type ConsumeStream = ReplyStream<pb::ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Reply<Self::ConsumeStream> {
        let caller = caller(&request)?;
        let mut inbound = request.into_inner();
        let join = match inbound.message().await? {
            Some(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Join(join)),
            }) => join,
            Some(_) => return Err(malformed("the first message must be a Join")),
            None => return Err(malformed("the call ended before its Join")),
        };
        let capacity = match join.capacity as usize {
            0 => DEFAULT_CAPACITY,
            n if n <= MAX_CAPACITY => n,
            n => {
                return Err(malformed(format!(
                    "capacity must be 1 to {MAX_CAPACITY} (or 0 for {DEFAULT_CAPACITY}), got {n}"
                )));
            }
        };
        let name = if join.consumer.is_empty() {
            "grpc".to_owned()
        } else {
            join.consumer
        };
        if name.len() > MAX_CONSUMER_NAME {
            return Err(malformed(format!(
                "a consumer name must be at most {MAX_CONSUMER_NAME} bytes long"
            )));
        }
        let group = join.group;
        let mut access = crate::groups::allow_consumer(&self.app, &caller, &group).await?;
        let mut consumer = self
            .app
            .groups()
            .map_err(group_status)?
            .join(&group, &name, "grpc", capacity)
            .await
            .map_err(group_status)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let ending = Ending::new();
        let _ = tx
            .send(pb::ConsumeResponse {
                kind: Some(pb::consume_response::Kind::Joined(pb::Joined {
                    group: group.clone(),
                })),
            })
            .await;
        let app = self.app.clone();
        let end = Arc::clone(&ending);
        tokio::spawn(async move {
            let _open = Open::new(&app.metrics, |m| &m.grpc_group_consumers);
            let stopping = app.hub.stopping();
            tokio::pin!(stopping);
            loop {
                let message = tokio::select! {
                    () = &mut stopping => {
                        end.end(Status::unavailable("the server is stopping; join again"));
                        return;
                    }
                    () = tx.closed() => return,
                    event = consumer.next() => match (access.check(), event) {
                        (Err(problem), _) => {
                            // Dropping the consumer hands what it holds back to the group.
                            end.end(problem.to_grpc_status());
                            return;
                        }
                        (Ok(()), ConsumerEvent::Messages(messages)) => {
                            let _delivering = crate::observe::deliver_spans(
                                "group-grpc",
                                messages.iter().map(|m| &m.event),
                            );
                            pb::consume_response::Kind::Messages(pb::Messages {
                                messages: messages
                                    .iter()
                                    .map(|m| pb::GroupMessage {
                                        ack_id: m.ack_id.clone(),
                                        deliveries: m.deliveries,
                                        event: Some(recorded(&m.event)),
                                    })
                                    .collect(),
                            })
                        }
                        (Ok(()), ConsumerEvent::Ended(e)) => {
                            end.end(group_status(e));
                            return;
                        }
                    },
                    inbound = inbound.next() => match inbound {
                        None => return,
                        Some(Err(_)) => return,
                        Some(Ok(_)) if let Err(problem) = access.check() => {
                            end.end(problem.to_grpc_status());
                            return;
                        }
                        Some(Ok(request)) => match settle(&app, &group, request).await {
                            Ok(outcome) => pb::consume_response::Kind::AckResult(outcome),
                            Err(status) => {
                                end.end(status);
                                return;
                            }
                        },
                    },
                };
                let response = pb::ConsumeResponse {
                    kind: Some(message),
                };
                if tx.send(response).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(response_stream(rx, ending)))
    }

    async fn create(&self, request: Request<pb::CreateGroupRequest>) -> Reply<pb::GroupInfo> {
        use pb::create_group_request::Start as P;
        let caller = caller(&request)?;
        let r = request.into_inner();
        let source = source_spec(r.source)?;
        crate::groups::allow_group(&caller, &source)?;
        let start = start_at(r.start.map(|s| match s {
            P::At(at) => Err(at),
            P::Position(p) => Ok(Start::Position(p)),
            P::Revision(v) => Ok(Start::Revision(v)),
        }))?;
        let settings = settings_update(r.settings)?.apply(&GroupSettings::default());
        let info = self
            .app
            .groups()
            .map_err(group_status)?
            .create(NewGroup {
                name: r.name,
                source,
                start,
                settings,
            })
            .await
            .map_err(group_status)?;
        Ok(Response::new(group_message(&info)))
    }

    async fn get(&self, request: Request<pb::GetGroupRequest>) -> Reply<pb::GroupInfo> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        crate::groups::allow_existing(&self.app, &caller, &name).await?;
        let info = self
            .app
            .groups()
            .map_err(group_status)?
            .info(&name)
            .await
            .map_err(group_status)?;
        Ok(Response::new(group_message(&info)))
    }

    async fn list(&self, request: Request<pb::ListGroupsRequest>) -> Reply<pb::ListGroupsResponse> {
        let caller = caller(&request)?;
        caller.require_held(Permission::Subscribe)?;
        let groups = self
            .app
            .groups()
            .map_err(group_status)?
            .list()
            .await
            .map_err(group_status)?;
        let groups = groups
            .iter()
            .filter(|g| crate::groups::allow_group(&caller, &g.definition.source).is_ok())
            .map(group_message)
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn update(&self, request: Request<pb::UpdateGroupRequest>) -> Reply<pb::GroupInfo> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        crate::groups::allow_existing(&self.app, &caller, &r.name).await?;
        let update = settings_update(r.settings)?;
        let info = self
            .app
            .groups()
            .map_err(group_status)?
            .update(&r.name, &update)
            .await
            .map_err(group_status)?;
        Ok(Response::new(group_message(&info)))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Reply<pb::DeleteGroupResponse> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        crate::groups::allow_existing(&self.app, &caller, &name).await?;
        self.app
            .groups()
            .map_err(group_status)?
            .delete(&name)
            .await
            .map_err(group_status)?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn replay_parked(
        &self,
        request: Request<pb::ReplayParkedRequest>,
    ) -> Reply<pb::ReplayParkedResponse> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        crate::groups::allow_existing(&self.app, &caller, &name).await?;
        let replaying = self
            .app
            .groups()
            .map_err(group_status)?
            .replay_parked(&name)
            .await
            .map_err(group_status)?;
        Ok(Response::new(pb::ReplayParkedResponse { replaying }))
    }
}

/// Applies one Ack or Nack of a consumer's call.
async fn settle<S: EventStore>(
    app: &App<S>,
    group: &str,
    request: pb::ConsumeRequest,
) -> Result<pb::AckResult, Status> {
    let outcome = match request.kind {
        Some(pb::consume_request::Kind::Ack(ack)) => {
            app.groups()
                .map_err(group_status)?
                .ack(group, ack.ack_ids)
                .await
        }
        Some(pb::consume_request::Kind::Nack(nack)) => {
            let action = match pb::NackAction::try_from(nack.action) {
                Ok(pb::NackAction::Retry) => NackAction::Retry,
                Ok(pb::NackAction::Park) => NackAction::Park,
                Ok(pb::NackAction::Skip) => NackAction::Skip,
                Err(_) => {
                    return Err(malformed(format!(
                        "nack action {} is not a NackAction (0 retry, 1 park, 2 skip)",
                        nack.action
                    )));
                }
            };
            app.groups()
                .map_err(group_status)?
                .nack(group, nack.ack_ids, action, nack.reason)
                .await
        }
        Some(pb::consume_request::Kind::Join(_)) => {
            return Err(malformed(
                "a call joins one group once; open another call to join again",
            ));
        }
        None => return Err(malformed("a ConsumeRequest needs an ack or a nack")),
    }
    .map_err(group_status)?;
    Ok(pb::AckResult {
        done: outcome.done as u64,
        unknown: outcome.unknown,
    })
}

// ---------------------------------------------------------------------------------------------
// Sagas

pub(crate) struct SagasApi<S> {
    pub app: App<S>,
}

fn saga_state(state: skald_saga::SagaState) -> pb::SagaState {
    use skald_saga::SagaState as S;
    match state {
        S::Running => pb::SagaState::Running,
        S::Compensating => pb::SagaState::Compensating,
        S::Completed => pb::SagaState::Completed,
        S::Compensated => pb::SagaState::Compensated,
        S::Stuck => pb::SagaState::Stuck,
        S::Cancelled => pb::SagaState::Cancelled,
    }
}

fn instance_summary(i: &skald_saga::InstanceSummary) -> pb::SagaInstanceSummary {
    pb::SagaInstanceSummary {
        saga_id: i.saga_id.clone(),
        stream: i.stream.clone(),
        definition: i.definition.clone(),
        version: i.version,
        correlation_key: i.correlation_key.clone(),
        state: saga_state(i.state) as i32,
        completed_steps: i.completed_steps.clone(),
        compensated_steps: i.compensated_steps.clone(),
        cancel_requested: i.cancel_requested,
        last_error: i.last_error.clone(),
        started_at_micros: i.started_at.0,
        updated_at_micros: i.updated_at.0,
    }
}

impl<S: EventStore> SagasApi<S> {
    async fn change(
        &self,
        request: Request<pb::ChangeSagaRequest>,
        change: crate::sagas::Change,
    ) -> Reply<pb::ChangeSagaResponse> {
        let caller = caller(&request)?;
        let name = request.into_inner().name;
        let changed = crate::sagas::change_audited(&self.app, &caller, &name, change).await?;
        Ok(Response::new(pb::ChangeSagaResponse { changed }))
    }
}

#[tonic::async_trait]
impl<S: EventStore> pb::sagas_server::Sagas for SagasApi<S> {
    async fn register(
        &self,
        request: Request<pb::RegisterSagaRequest>,
    ) -> Reply<pb::RegisterSagaResponse> {
        let caller = caller(&request)?;
        let text = request.into_inner().definition;
        let r = crate::sagas::register_text(&self.app, &caller, &text).await?;
        Ok(Response::new(pb::RegisterSagaResponse {
            name: r.name,
            version: r.version,
            replayed: r.replayed,
        }))
    }

    async fn list_definitions(
        &self,
        request: Request<pb::ListSagaDefinitionsRequest>,
    ) -> Reply<pb::ListSagaDefinitionsResponse> {
        let caller = caller(&request)?;
        caller.require_held(Permission::Saga)?;
        let definitions = self
            .app
            .sagas()
            .map_err(problem)?
            .definitions()
            .into_iter()
            .filter(|d| caller.require(Permission::Saga, &d.name).is_ok())
            .map(|d| pb::SagaDefinitionSummary {
                name: d.name,
                latest_version: d.latest_version,
                versions: d.versions,
                registered_at_micros: d.registered_at.0,
                enabled: d.enabled,
                instances: d
                    .instances
                    .into_iter()
                    .map(|(state, n)| (state.to_owned(), n))
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListSagaDefinitionsResponse {
            definitions,
        }))
    }

    async fn get_definition(
        &self,
        request: Request<pb::GetSagaDefinitionRequest>,
    ) -> Reply<pb::SagaDefinition> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        caller.require(Permission::Saga, &r.name)?;
        let definition = self
            .app
            .sagas()
            .map_err(problem)?
            .definition(&r.name, r.version)
            .map_err(problem)?;
        Ok(Response::new(pb::SagaDefinition {
            name: definition.name.clone(),
            version: definition.version,
            json: serde_json::to_string(&definition).expect("a definition serializes"),
        }))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListSagaInstancesRequest>,
    ) -> Reply<pb::ListSagaInstancesResponse> {
        use skald_saga::SagaState as S;
        let caller = caller(&request)?;
        caller.require_held(Permission::Saga)?;
        let r = request.into_inner();
        let state = match pb::SagaState::try_from(r.state) {
            Ok(pb::SagaState::Unspecified) => None,
            Ok(pb::SagaState::Running) => Some(S::Running),
            Ok(pb::SagaState::Compensating) => Some(S::Compensating),
            Ok(pb::SagaState::Completed) => Some(S::Completed),
            Ok(pb::SagaState::Compensated) => Some(S::Compensated),
            Ok(pb::SagaState::Stuck) => Some(S::Stuck),
            Ok(pb::SagaState::Cancelled) => Some(S::Cancelled),
            Err(_) => return Err(malformed(format!("state {} is not a SagaState", r.state))),
        };
        let limit = match r.limit as usize {
            0 => skald_saga::MAX_LISTED,
            n if n <= skald_saga::MAX_LISTED => n,
            n => {
                return Err(malformed(format!(
                    "limit must be 1 to {} (or 0 for all), got {n}",
                    skald_saga::MAX_LISTED
                )));
            }
        };
        let filter = skald_saga::InstanceFilter {
            state,
            definition: (!r.definition.is_empty()).then_some(r.definition),
            limit: Some(limit),
        };
        let instances = self
            .app
            .sagas()
            .map_err(problem)?
            .instances(&filter)
            .into_iter()
            .filter(|i| caller.require(Permission::Saga, &i.definition).is_ok())
            .map(|mut i| {
                crate::sagas::redact_summary(&caller, &mut i);
                instance_summary(&i)
            })
            .collect();
        Ok(Response::new(pb::ListSagaInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        request: Request<pb::GetSagaInstanceRequest>,
    ) -> Reply<pb::SagaInstance> {
        let caller = caller(&request)?;
        let id = request.into_inner().saga_id;
        crate::sagas::allow_instance(&self.app, &caller, &id).await?;
        let mut history = self
            .app
            .sagas()
            .map_err(problem)?
            .history(&id)
            .await
            .map_err(problem)?;
        crate::sagas::redact_history(&caller, &mut history);
        Ok(Response::new(pb::SagaInstance {
            summary: Some(instance_summary(&history.summary)),
            history: history
                .history
                .iter()
                .map(|h| pb::SagaHistoryEntry {
                    revision: h.revision,
                    position: h.position,
                    time_micros: h.time.0,
                    r#type: h.event_type.clone(),
                    data_json: h.data.to_string(),
                })
                .collect(),
        }))
    }

    async fn retry(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Reply<pb::SagaInstanceSummary> {
        let caller = caller(&request)?;
        let id = request.into_inner().saga_id;
        crate::sagas::allow_instance(&self.app, &caller, &id).await?;
        let summary = self
            .app
            .sagas()
            .map_err(problem)?
            .retry(&id)
            .await
            .map_err(problem)?;
        Ok(Response::new(instance_summary(&summary)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelSagaRequest>,
    ) -> Reply<pb::SagaInstanceSummary> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        crate::sagas::allow_instance(&self.app, &caller, &r.saga_id).await?;
        let reason = if r.reason.is_empty() {
            "cancelled through the API".to_owned()
        } else {
            r.reason
        };
        let summary = crate::sagas::cancel_audited(&self.app, &caller, &r.saga_id, &reason).await?;
        Ok(Response::new(instance_summary(&summary)))
    }

    async fn disable(
        &self,
        request: Request<pb::ChangeSagaRequest>,
    ) -> Reply<pb::ChangeSagaResponse> {
        self.change(request, crate::sagas::Change::Disable).await
    }

    async fn enable(
        &self,
        request: Request<pb::ChangeSagaRequest>,
    ) -> Reply<pb::ChangeSagaResponse> {
        self.change(request, crate::sagas::Change::Enable).await
    }

    async fn delete(
        &self,
        request: Request<pb::ChangeSagaRequest>,
    ) -> Reply<pb::ChangeSagaResponse> {
        self.change(request, crate::sagas::Change::Delete).await
    }
}

// ---------------------------------------------------------------------------------------------
// Health (grpc.health.v1), from the store's readiness

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// How often `Watch` looks at readiness again.
const HEALTH_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The services health checks know: the server as a whole ("") and each API service.
const HEALTH_SERVICES: [&str; 5] = ["", STREAMS, SUBSCRIPTIONS, GROUPS, SAGAS];

pub(crate) struct HealthApi<S> {
    pub app: App<S>,
    pub watches: Arc<Watches>,
}

/// Most `Health/Watch` calls open at once from one client address, and from all together: the
/// health service needs no credentials, so its open calls are bounded here.
const MAX_WATCHES_PER_ADDRESS: usize = 16;
const MAX_WATCHES: usize = 1024;

/// The `Health/Watch` calls open, by client address.
#[derive(Default)]
pub(crate) struct Watches {
    open: std::sync::Mutex<(
        usize,
        std::collections::HashMap<Option<std::net::IpAddr>, usize>,
    )>,
}

impl Watches {
    /// Counts one more watch from `address`, or says why not; dropping the guard uncounts it.
    fn open(self: &Arc<Self>, address: Option<std::net::IpAddr>) -> Result<WatchGuard, Status> {
        let mut open = self.open.lock().expect("watches lock");
        let (total, by_address) = &mut *open;
        let mine = by_address.get(&address).copied().unwrap_or(0);
        if mine >= MAX_WATCHES_PER_ADDRESS {
            return Err(Status::resource_exhausted(format!(
                "this address has {mine} health watches open, the most allowed; close one, or \
                 poll with Check"
            )));
        }
        if *total >= MAX_WATCHES {
            return Err(Status::resource_exhausted(format!(
                "the server has {total} health watches open, the most allowed; poll with Check"
            )));
        }
        *total += 1;
        *by_address.entry(address).or_default() += 1;
        Ok(WatchGuard {
            watches: Arc::clone(self),
            address,
        })
    }
}

struct WatchGuard {
    watches: Arc<Watches>,
    address: Option<std::net::IpAddr>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().expect("watches lock");
        let (total, by_address) = &mut *open;
        *total -= 1;
        if let Some(n) = by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

impl<S: EventStore> HealthApi<S> {
    fn status(&self, service: &str) -> Result<ServingStatus, Status> {
        if !HEALTH_SERVICES.contains(&service) {
            return Err(Status::not_found(format!(
                "no service {service:?} here; health is reported for \"\" and {}",
                HEALTH_SERVICES[1..].join(", ")
            )));
        }
        Ok(
            if self.app.hub.is_stopping() || self.app.store.readiness().is_err() {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            },
        )
    }
}

#[tonic::async_trait]
impl<S: EventStore> tonic_health::pb::health_server::Health for HealthApi<S> {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Reply<HealthCheckResponse> {
        let status = self.status(&request.into_inner().service)?;
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = ReplyStream<HealthCheckResponse>;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Reply<Self::WatchStream> {
        let address = request
            .extensions()
            .get::<crate::listener::Connection>()
            .and_then(|c| c.peer)
            .map(|p| p.ip());
        let guard = self.watches.open(address)?;
        let service = request.into_inner().service;
        let app = self.app.clone();
        let watches = Arc::clone(&self.watches);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _counted = guard;
            let health = HealthApi { app, watches };
            let mut last = None;
            loop {
                // An unknown service is reported, and the call stays open (as the protocol asks).
                let status = health
                    .status(&service)
                    .unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(status) {
                    let response = HealthCheckResponse {
                        status: status as i32,
                    };
                    if tx.send(response).await.is_err() {
                        return;
                    }
                    last = Some(status);
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(HEALTH_POLL) => {}
                }
            }
        });
        Ok(Response::new(response_stream(rx, Ending::new())))
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

use axum::Router;

const STREAMS: &str = pb::streams_server::SERVICE_NAME;
const SUBSCRIPTIONS: &str = pb::subscriptions_server::SERVICE_NAME;
const GROUPS: &str = pb::groups_server::SERVICE_NAME;
const SAGAS: &str = pb::sagas_server::SERVICE_NAME;

/// Adds the gRPC services to `router`, one route per method, so that metrics name each method
/// and an unknown method falls through to the fallback (which a gRPC client reads as
/// UNIMPLEMENTED). Messages may be as large as HTTP bodies.
pub(crate) fn routes<S: EventStore>(router: Router<App<S>>, app: &App<S>) -> Router<App<S>> {
    let limit = app.config.max_body_bytes;
    let streams = pb::streams_server::StreamsServer::new(StreamsApi { app: app.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let subscriptions =
        pb::subscriptions_server::SubscriptionsServer::new(SubscriptionsApi { app: app.clone() })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
    let groups = pb::groups_server::GroupsServer::new(GroupsApi { app: app.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let sagas = pb::sagas_server::SagasServer::new(SagasApi { app: app.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let health = tonic_health::pb::health_server::HealthServer::new(HealthApi {
        app: app.clone(),
        watches: Arc::default(),
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(skald_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the descriptor sets are valid");
    let router = add(
        router,
        STREAMS,
        &["Append", "Read", "Head", "Info"],
        streams,
    );
    let router = add(router, SUBSCRIPTIONS, &["Subscribe"], subscriptions);
    let router = add(
        router,
        GROUPS,
        &[
            "Consume",
            "Create",
            "Get",
            "List",
            "Update",
            "Delete",
            "ReplayParked",
        ],
        groups,
    );
    let router = add(
        router,
        SAGAS,
        &[
            "Register",
            "ListDefinitions",
            "GetDefinition",
            "ListInstances",
            "GetInstance",
            "Retry",
            "Cancel",
            "Disable",
            "Enable",
            "Delete",
        ],
        sagas,
    );
    let router = add(router, HEALTH, &["Check", "Watch"], health);
    let router = add(
        router,
        REFLECTION_V1,
        &["ServerReflectionInfo"],
        reflection_v1,
    );
    add(
        router,
        REFLECTION_V1ALPHA,
        &["ServerReflectionInfo"],
        reflection_v1alpha,
    )
}

fn add<S, T>(router: Router<App<S>>, service: &str, methods: &[&str], svc: T) -> Router<App<S>>
where
    S: EventStore,
    T: tower::Service<axum::http::Request<axum::body::Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    T::Response: axum::response::IntoResponse,
    T::Future: Send + 'static,
{
    methods.iter().fold(router, |router, method| {
        router.route_service(&format!("/{service}/{method}"), svc.clone())
    })
}
