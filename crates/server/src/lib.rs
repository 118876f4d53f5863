//! The HTTP API (axum). Only this crate knows HTTP. It is generic over
//! [`skald_core::EventStore`], so every backend gets the same API. See `docs/http-api.md`.

mod access;
mod admin;
mod cloudevents;
pub mod coordination;
mod groups;
mod grpc;
pub mod listener;
mod observe;
mod problem;
mod relay;
mod sagas;
mod start;
mod subscribe;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use serde::Deserialize;
use skald_core::{
    AppendCondition, AppendRequest, Category, Direction, EventStore, EventType, ExpectedRevision,
    MAX_READ_PAGE, Position, Query, QueryItem, ReadRequest, ReadSource, RecordedEvent, StreamName,
    Tag,
};

pub use coordination::{Coordination, Peers, Role};
pub use problem::Problem;
pub use sagas::SagaAuthority;
pub use skald_hub::{Groups, Hub};
pub use skald_saga::{SagaOptions, Sagas};
pub use skald_security::Security;

use crate::access::{Caller, Scope};
use crate::cloudevents::{CloudEventIn, write_record};
use skald_security::Permission;

/// The OpenAPI document served at `GET /v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");
/// The Skald release this server belongs to.
pub const VERSION: &str = "0.1.0";
/// Longest wait of one long-poll of a group (`GET /v1/groups/{name}/messages?wait=MS`); a
/// node that forwards a poll waits as long.
pub(crate) const MAX_POLL_WAIT: Duration = Duration::from_secs(60);
/// Default events per page of a JSON read.
const DEFAULT_JSON_LIMIT: usize = 100;

/// HTTP settings. Every field has a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// A subscription silent this long gets a heartbeat (an SSE comment, a WebSocket ping).
    pub heartbeat_ms: u64,
    /// A subscriber that reads nothing for this long while events wait is disconnected.
    pub stall_timeout_ms: u64,
    /// The reconnect delay SSE clients are told to use.
    pub sse_retry_ms: u64,
    /// Most subscriptions open at once on one WebSocket.
    pub max_subscriptions_per_socket: usize,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: usize,
    /// A client slower than this to finish its TLS handshake or send a request's headers is
    /// dropped.
    pub header_read_timeout_ms: u64,
    /// Origins allowed by CORS (`"*"` for any); empty turns CORS off.
    pub cors_allowed_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            heartbeat_ms: 15_000,
            stall_timeout_ms: 30_000,
            sse_retry_ms: 2_000,
            max_subscriptions_per_socket: 64,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// Checks the settings; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("heartbeat_ms", self.heartbeat_ms),
            ("stall_timeout_ms", self.stall_timeout_ms),
            (
                "max_subscriptions_per_socket",
                self.max_subscriptions_per_socket as u64,
            ),
            ("max_connections", self.max_connections as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err("max_header_bytes must be 1024 to 1048576".to_owned());
        }
        for origin in &self.cors_allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(format!(
                    "cors_allowed_origins: {origin:?} is not an origin such as https://app.example.com \
                     (or \"*\")"
                ));
            }
        }
        Ok(())
    }

    /// The listener's settings, with TLS when given.
    pub fn listen_options(
        &self,
        tls: Option<Arc<skald_security::TlsSource>>,
    ) -> listener::ListenOptions {
        listener::ListenOptions {
            tls,
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes.max(8192),
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms.max(1)),
        }
    }

    fn subscriptions(&self) -> subscribe::SubscriptionSettings {
        subscribe::SubscriptionSettings {
            heartbeat: Duration::from_millis(self.heartbeat_ms.max(1)),
            stall_timeout: Duration::from_millis(self.stall_timeout_ms.max(1)),
            sse_retry: Duration::from_millis(self.sse_retry_ms),
            max_per_socket: self.max_subscriptions_per_socket.max(1),
        }
    }
}

/// What every handler shares, behind one `Arc`: axum clones the state for every request (and
/// the observing middleware once more), and cloning the fields one by one (a dozen `Arc`s
/// through the hub and the groups) took 3% of a small append's CPU.
type App<S> = Arc<AppState<S>>;

struct AppState<S> {
    store: Arc<S>,
    hub: Hub<S>,
    coordination: Arc<Coordination<S>>,
    config: HttpConfig,
    metrics: Arc<observe::ApiMetrics>,
    security: Arc<Security<S>>,
}

impl<S: EventStore> AppState<S> {
    /// The consumer groups, when this node runs them.
    fn groups(&self) -> skald_core::Result<Groups<S>> {
        self.coordination.groups()
    }

    /// The saga engine, when this node runs it.
    fn sagas(&self) -> skald_core::Result<Sagas<S>> {
        self.coordination.sagas()
    }

    /// The `Access-Control-Allow-Origin` for `origin`, when CORS allows it.
    fn allowed_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        let origins = &self.config.cors_allowed_origins;
        if origins.iter().any(|o| o == "*") {
            Some(HeaderValue::from_static("*"))
        } else if origins.iter().any(|o| o == text) {
            Some(origin.clone())
        } else {
            None
        }
    }
}

/// Builds the API's router over `store`, starting a hub for its subscriptions, its
/// persistent subscriptions and its saga engine on the current tokio runtime.
pub async fn router<S: EventStore>(
    store: Arc<S>,
    config: HttpConfig,
) -> skald_core::Result<Router> {
    let hub = Hub::start(store, skald_hub::HubOptions::default());
    let groups = Groups::start(hub.clone()).await?;
    let sagas = Sagas::start(hub, SagaOptions::default(), Arc::new(skald_saga::WallClock)).await?;
    Ok(router_with(groups, sagas, config))
}

/// Builds the API's router over the hub and the store of `groups` and `sagas` (which share
/// one hub). Call [`Hub::shutdown`] to end every subscription before a graceful shutdown, then
/// [`Groups::stopped`] and [`Sagas::stopped`] to let them write their checkpoints.
pub fn router_with<S: EventStore>(
    groups: Groups<S>,
    sagas: Sagas<S>,
    config: HttpConfig,
) -> Router {
    let security = Security::disabled(Arc::clone(groups.hub().store()));
    router_secured(groups, sagas, config, security)
}

/// [`router_with`] with authentication, authorization, rate limits and audit by `security`.
pub fn router_secured<S: EventStore>(
    groups: Groups<S>,
    sagas: Sagas<S>,
    config: HttpConfig,
    security: Arc<Security<S>>,
) -> Router {
    let hub = groups.hub().clone();
    router_coordinated(hub, Coordination::single(groups, sagas), config, security)
}

/// [`router_secured`] for a node of a shared store: `coordination` says whether this node runs
/// the groups and sagas now, and where to forward their requests when it does not. `hub` is
/// the node's own (each term's groups and sagas run on a [`Hub::scoped`] one of it).
pub fn router_coordinated<S: EventStore>(
    hub: Hub<S>,
    coordination: Arc<Coordination<S>>,
    config: HttpConfig,
    security: Arc<Security<S>>,
) -> Router {
    let limit = config.max_body_bytes;
    let store = Arc::clone(hub.store());
    let app: App<S> = Arc::new(AppState {
        store,
        hub,
        coordination,
        config,
        metrics: Arc::new(observe::ApiMetrics::new()),
        security,
    });
    let router = grpc::routes(Router::new(), &app);
    router
        .route(
            "/v1/streams/{stream}",
            post(append::<S>).get(read_stream::<S>),
        )
        .route("/v1/streams/{stream}/head", get(stream_head::<S>))
        .route("/v1/all", get(read_all::<S>))
        .route("/v1/categories/{category}", get(read_category::<S>))
        .route("/v1/query", post(read_query::<S>))
        .route("/v1/info", get(info::<S>))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/subscribe/all", get(subscribe::sse_all::<S>))
        .route(
            "/v1/subscribe/streams/{stream}",
            get(subscribe::sse_stream::<S>),
        )
        .route(
            "/v1/subscribe/categories/{category}",
            get(subscribe::sse_category::<S>),
        )
        .route("/v1/subscribe/query", get(subscribe::sse_query::<S>))
        .route("/v1/ws", get(subscribe::websocket::<S>))
        .route(
            "/v1/groups",
            post(groups::create::<S>).get(groups::list::<S>),
        )
        .route(
            "/v1/groups/{name}",
            get(groups::info::<S>)
                .patch(groups::update::<S>)
                .delete(groups::delete::<S>),
        )
        .route(
            "/v1/groups/{name}/replay-parked",
            post(groups::replay_parked::<S>),
        )
        .route("/v1/groups/{name}/messages", get(groups::poll::<S>))
        .route("/v1/groups/{name}/ack", post(groups::ack::<S>))
        .route("/v1/groups/{name}/nack", post(groups::nack::<S>))
        .route(
            "/v1/sagas",
            post(sagas::register::<S>).get(sagas::list::<S>),
        )
        .route(
            "/v1/sagas/{name}",
            get(sagas::show::<S>).delete(sagas::delete::<S>),
        )
        .route("/v1/sagas/{name}/disable", post(sagas::disable::<S>))
        .route("/v1/sagas/{name}/enable", post(sagas::enable::<S>))
        .route("/v1/saga-instances", get(sagas::instances::<S>))
        .route("/v1/saga-instances/{id}", get(sagas::history::<S>))
        .route("/v1/saga-instances/{id}/retry", post(sagas::retry::<S>))
        .route("/v1/saga-instances/{id}/cancel", post(sagas::cancel::<S>))
        .route(
            "/v1/admin/keys",
            post(admin::create_key::<S>).get(admin::list_keys::<S>),
        )
        .route(
            "/v1/admin/keys/{id}",
            axum::routing::delete(admin::revoke_key::<S>),
        )
        .route(
            "/v1/admin/rules",
            get(admin::rules::<S>).put(admin::set_rules::<S>),
        )
        .route("/metrics", get(observe::metrics::<S>))
        .route("/health/live", get(observe::live))
        .route("/health/ready", get(observe::ready::<S>))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(access::GuardLayer {
            app: Arc::clone(&app),
        })
        .layer(observe::ObserveLayer {
            metrics: Arc::clone(&app.metrics),
        })
        .with_state(app)
}

async fn not_found(uri: Uri) -> Problem {
    Problem::no_route(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::method_not_allowed(method.as_str(), uri.path())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn stream_name(raw: String) -> Result<StreamName, Problem> {
    StreamName::new(raw).map_err(Problem::from)
}

/// A stream to read: a user stream, or a system stream (`$...`, such as `$audit`), which the
/// rules keep to admins unless a `$` pattern grants it.
pub(crate) fn readable_stream_name(raw: String) -> Result<StreamName, Problem> {
    if raw.starts_with('$') {
        StreamName::system(raw).map_err(Problem::from)
    } else {
        stream_name(raw)
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, Problem> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large(limit)
        } else {
            Problem::malformed(format!("the request body could not be read: {rejection}"))
        }
    })
}

/// Parses JSON with errors that name the field path and the line and column. The fast parser
/// runs first; the path-tracking one only runs again to word an error.
fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, Problem> {
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Problem::malformed(format!("{what}: {inner}"))
        } else {
            Problem::malformed(format!("{what}: at {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Problem::malformed(format!("{what}: {e}")))?;
    Ok(value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppendBody {
    #[serde(default)]
    expected_revision: ExpectedRevision,
    condition: Option<ConditionBody>,
    events: Vec<CloudEventIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionBody {
    fail_if_events_match: Query,
    after: Option<Position>,
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn expected_from_header(headers: &HeaderMap) -> Result<ExpectedRevision, Problem> {
    let Some(value) = headers.get("skald-expected-revision") else {
        return Ok(ExpectedRevision::Any);
    };
    let text = value.to_str().unwrap_or("");
    let json = if text.parse::<u64>().is_ok() {
        text.to_owned()
    } else {
        format!("{text:?}")
    };
    serde_json::from_str(&json).map_err(|_| {
        Problem::malformed(format!(
            "header Skald-Expected-Revision is {text:?}; expected any, noStream, streamExists or a revision number"
        ))
    })
}

async fn append<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    // System streams (`$...`) are refused here: only the server writes them.
    let stream = stream_name(stream)?;
    caller.require(Permission::Append, stream.as_str())?;
    let media = media_type(&headers);
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let (expected, condition, events) = match media.as_str() {
        "application/json" => {
            let b: AppendBody = parse_json(&body, "request body")?;
            let condition = b.condition.map(|c| AppendCondition {
                query: c.fail_if_events_match,
                after: c.after,
            });
            if condition.is_some() {
                caller.require_condition()?;
            }
            (b.expected_revision, condition, b.events)
        }
        "application/cloudevents-batch+json" => {
            let events: Vec<CloudEventIn> = parse_json(&body, "CloudEvents batch")?;
            (expected_from_header(&headers)?, None, events)
        }
        other => return Err(Problem::unsupported_media_type(other)),
    };
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.into_event(&stream, &format!("events[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let result = append_traced(
        &app,
        AppendRequest {
            stream,
            expected,
            condition,
            events,
        },
    )
    .await
    .map_err(|e| caller.append_problem(e))?;
    let status = if result.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        json_response(serde_json::to_vec(&result).expect("serializable")),
    )
        .into_response())
}

/// Appends in a `store.append` span of the request's trace, when it has one. The span's
/// context is stored in each event's metadata, so that subscribers and sagas join the trace.
async fn append_traced<S: EventStore>(
    app: &App<S>,
    mut request: AppendRequest,
) -> skald_core::Result<skald_core::AppendResult> {
    let AppendRequest { stream, events, .. } = &mut request;
    let mut span = observe::current_trace().map(|trace| {
        let mut span = skald_telemetry::start_span(
            "store.append",
            skald_telemetry::SpanKind::Internal,
            Some(&trace.context),
        );
        span.set("skald.stream", stream.as_str());
        span.set("skald.events", events.len() as u64);
        for event in events.iter_mut() {
            event.metadata = skald_core::Metadata::from_stored(skald_telemetry::inject(
                event.metadata.as_str(),
                &span.context(),
                trace.tracestate.as_deref(),
            ));
        }
        span
    });
    let appended = app.store.append(request).await;
    if let Some(span) = &mut span {
        match &appended {
            Ok(result) => span.set("skald.position", result.first_position.0),
            Err(e) => span.fail(e.to_string()),
        }
    }
    appended
}

fn json_response(body: Vec<u8>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
}

/// Query-string parameters of the read endpoints, parsed by hand so that each error names the
/// parameter and the bad value.
#[derive(Default)]
struct ReadParams {
    from: Option<u64>,
    limit: Option<usize>,
    direction: Direction,
    types: Vec<EventType>,
    tags: Vec<Tag>,
}

/// The decoded `key=value` pairs of a query string, each key checked against `allowed`.
fn query_pairs(query: Option<String>, allowed: &[&str]) -> Result<Vec<(String, String)>, Problem> {
    let query = query.unwrap_or_default();
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| {
            Problem::malformed(format!("query parameter {key} is not valid UTF-8"))
        })?;
        if !allowed.contains(&key) {
            return Err(Problem::malformed(format!(
                "unknown query parameter {key:?}; this endpoint takes {}",
                allowed.join(", ")
            )));
        }
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

/// Parses a comma-separated list of names (`types`, `tags`), naming the parameter on error.
fn parse_names<T>(
    key: &str,
    value: &str,
    parse: impl Fn(&str) -> skald_core::Result<T>,
) -> Result<Vec<T>, Problem> {
    value
        .split(',')
        .map(|v| parse(v).map_err(|e| Problem::malformed(format!("{key}: {e}"))))
        .collect()
}

fn parse_params(query: Option<String>, allowed: &[&str]) -> Result<ReadParams, Problem> {
    let mut p = ReadParams::default();
    for (key, value) in query_pairs(query, allowed)? {
        let number = |v: &str| {
            v.parse::<u64>().map_err(|_| {
                Problem::malformed(format!(
                    "query parameter {key} must be a whole number ≥ 0, got {v:?}"
                ))
            })
        };
        match key.as_str() {
            "from" => p.from = Some(number(&value)?),
            "limit" => p.limit = Some(number(&value)? as usize),
            "direction" => {
                p.direction = match value.as_str() {
                    "forward" => Direction::Forward,
                    "backward" => Direction::Backward,
                    v => {
                        return Err(Problem::malformed(format!(
                            "query parameter direction must be forward or backward, got {v:?}"
                        )));
                    }
                }
            }
            "types" => p
                .types
                .extend(parse_names(&key, &value, |v| EventType::new(v))?),
            "tags" => p.tags.extend(parse_names(&key, &value, |v| Tag::new(v))?),
            _ => unreachable!("checked against the allowed list"),
        }
    }
    Ok(p)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'%' => return None,
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"))
}

/// Answers a read: a JSON page, or an NDJSON stream of pages.
async fn respond_read<S: EventStore>(
    app: App<S>,
    caller: &Caller,
    headers: &HeaderMap,
    source: ReadSource,
    params: &ReadParams,
) -> Result<Response, Problem> {
    caller.require_some(Permission::Read, Scope::from(&source))?;
    // A single stream was checked whole; many streams are filtered event by event.
    let reader = caller.clone();
    let request = ReadRequest {
        source,
        from: params.from,
        direction: params.direction,
        limit: 0,
    };
    if wants_ndjson(headers) {
        let access = recheck_read(&app, caller, &request.source);
        return Ok(ndjson_stream(Pages::new(
            Arc::clone(&app.store),
            request,
            params.limit,
            access,
        )));
    }
    let limit = params.limit.unwrap_or(DEFAULT_JSON_LIMIT);
    if limit > MAX_READ_PAGE {
        return Err(Problem::malformed(format!(
            "limit {limit} is over {MAX_READ_PAGE} for a JSON page; page with `next`, or ask for \
             Accept: application/x-ndjson to stream any number"
        )));
    }
    let mut span = observe::current_trace().map(|trace| {
        skald_telemetry::start_span(
            "store.read",
            skald_telemetry::SpanKind::Internal,
            Some(&trace.context),
        )
    });
    let read = filtered_page(&app, &reader, request, limit).await;
    if let Some(span) = &mut span {
        match &read {
            Ok(page) => span.set("skald.events", page.events.len() as u64),
            Err(e) => span.fail(e.to_string()),
        }
    }
    drop(span);
    let page = read?;
    let mut out = Vec::with_capacity(page.events.len() * 512 + 32);
    out.extend_from_slice(b"{\"events\":[");
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_record(&mut out, e);
    }
    out.extend_from_slice(b"],\"next\":");
    out.extend_from_slice(
        page.next
            .map_or("null".to_owned(), |n| n.to_string())
            .as_bytes(),
    );
    out.push(b'}');
    Ok(json_response(out).into_response())
}

/// Most events one JSON page looks at to fill itself with events the caller may read.
const FILTERED_SCAN_BUDGET: usize = 16 * MAX_READ_PAGE;

/// One JSON page of `request` with up to `limit` events the caller may read. Its `next` says
/// nothing of the events the caller may not read: the page reads on past them until it is full
/// or reaches the end, and then `next` follows its last event (or is `None` at the end, as it
/// would be without them). Only when [`FILTERED_SCAN_BUDGET`] events were looked at without
/// filling the page does `next` move past what was skipped, so that paging goes on.
async fn filtered_page<S: EventStore>(
    app: &App<S>,
    reader: &Caller,
    mut request: ReadRequest,
    limit: usize,
) -> skald_core::Result<skald_core::ReadPage> {
    let mut events = Vec::new();
    let mut scanned = 0;
    loop {
        // The first read asks for the page; reading on past hidden events, whole store pages.
        let mut page = app
            .store
            .read(ReadRequest {
                limit: if scanned == 0 { limit } else { MAX_READ_PAGE },
                ..request.clone()
            })
            .await?;
        let read = page.events.len();
        scanned += read;
        reader.retain(&mut page.events, |e| &e.stream);
        let hidden = read - page.events.len();
        events.append(&mut page.events);
        if hidden == 0 && scanned == read {
            // Nothing skipped (a stream read always ends here): the store's page as it is.
            return Ok(skald_core::ReadPage {
                events,
                next: page.next,
            });
        }
        // Only reads over many streams, forward by position, get here. A later read asks
        // for a whole store page, so it may bring more than the page still needs.
        if events.len() > limit {
            events.truncate(limit);
            let last = events.last().expect("a full page").position.0;
            return Ok(skald_core::ReadPage {
                events,
                next: Some(last + 1),
            });
        }
        let next = match page.next {
            Some(next) if read > 0 => next,
            // The end: `None` whether or not events were skipped.
            _ => return Ok(skald_core::ReadPage { events, next: None }),
        };
        let bytes: usize = events.iter().map(skald_core::RecordedEvent::size).sum();
        if events.len() == limit || bytes >= skald_core::MAX_READ_PAGE_BYTES {
            let last = events.last().expect("a full page").position.0;
            return Ok(skald_core::ReadPage {
                events,
                next: Some(last + 1),
            });
        }
        if scanned >= FILTERED_SCAN_BUDGET {
            return Ok(skald_core::ReadPage {
                events,
                next: Some(next),
            });
        }
        request.from = Some(next);
    }
}

/// The check a streamed read repeats before each page: it may run for long.
pub(crate) fn recheck_read<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    source: &ReadSource,
) -> access::Recheck<S> {
    let source = source.clone();
    access::Recheck::new(
        Arc::clone(&app.security),
        caller.clone(),
        Box::new(move |caller| caller.require_some(Permission::Read, Scope::from(&source))),
    )
}

/// A read's pages, one store page at a time, each filtered to what the caller may read. HTTP
/// NDJSON and gRPC reads walk the same cursor, so memory stays bounded by one page. Before
/// each page the caller is checked again ([`access::Recheck`]): a streamed read ends when its
/// credential or its rules do.
pub(crate) struct Pages<S> {
    store: Arc<S>,
    request: ReadRequest,
    remaining: usize,
    done: bool,
    access: access::Recheck<S>,
}

impl<S: EventStore> Pages<S> {
    /// Pages of `request` (whose `limit` is ignored) until `limit` events, or all of them.
    pub(crate) fn new(
        store: Arc<S>,
        request: ReadRequest,
        limit: Option<usize>,
        access: access::Recheck<S>,
    ) -> Self {
        Self {
            store,
            request,
            remaining: limit.unwrap_or(usize::MAX),
            done: false,
            access,
        }
    }

    /// The next page (empty when the rules filtered out all of it), or `None` at the end.
    /// After an error there is no next page.
    pub(crate) async fn next(&mut self) -> Option<Result<Vec<RecordedEvent>, Problem>> {
        if self.done || self.remaining == 0 {
            return None;
        }
        if let Err(problem) = self.access.check() {
            self.done = true;
            return Some(Err(problem));
        }
        let page_request = ReadRequest {
            limit: self.remaining.min(MAX_READ_PAGE),
            ..self.request.clone()
        };
        match self.store.read(page_request).await {
            Ok(mut page) => {
                let read = page.events.len();
                self.access.caller().retain(&mut page.events, |e| &e.stream);
                self.remaining = self.remaining.saturating_sub(page.events.len());
                match page.next {
                    Some(next) if read > 0 => self.request.from = Some(next),
                    _ => self.done = true,
                }
                Some(Ok(page.events))
            }
            Err(e) => {
                self.done = true;
                Some(Err(Problem::from(e)))
            }
        }
    }
}

/// Streams a read as NDJSON, one page at a time, so memory stays bounded by one page.
fn ndjson_stream<S: EventStore>(pages: Pages<S>) -> Response {
    let body = stream::unfold(pages, |mut pages| async move {
        let mut out = Vec::new();
        match pages.next().await? {
            Ok(events) => {
                for e in &events {
                    write_record(&mut out, e);
                    out.push(b'\n');
                }
            }
            Err(problem) => {
                out.extend_from_slice(format!("{{\"error\":{}}}\n", problem.to_json()).as_bytes());
            }
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), pages))
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        Body::from_stream(body),
    )
        .into_response()
}

async fn read_stream<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(stream): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let stream = readable_stream_name(stream)?;
    caller.require(Permission::Read, stream.as_str())?;
    let params = parse_params(query, &["from", "direction", "limit"])?;
    if app.store.stream_head(&stream).await?.is_none() {
        return Err(skald_core::Error::StreamNotFound(stream).into());
    }
    respond_read(app, &caller, &headers, ReadSource::Stream(stream), &params).await
}

async fn read_all<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let mut params = parse_params(query, &["from", "limit", "types", "tags"])?;
    let filter = if params.types.is_empty() && params.tags.is_empty() {
        None
    } else {
        Some(Query {
            items: vec![QueryItem {
                types: std::mem::take(&mut params.types),
                tags: std::mem::take(&mut params.tags),
            }],
        })
    };
    respond_read(app, &caller, &headers, ReadSource::All(filter), &params).await
}

async fn read_category<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(category): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let category = Category::new(category).map_err(Problem::from)?;
    let params = parse_params(query, &["from", "limit"])?;
    respond_read(
        app,
        &caller,
        &headers,
        ReadSource::Category(category),
        &params,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    query: Query,
    from: Option<u64>,
    limit: Option<usize>,
}

async fn read_query<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let q: QueryBody = parse_json(&body, "request body")?;
    q.query.validate()?;
    let params = ReadParams {
        from: q.from,
        limit: q.limit,
        ..ReadParams::default()
    };
    respond_read(app, &caller, &headers, ReadSource::Query(q.query), &params).await
}

async fn stream_head<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(stream): Path<String>,
) -> Result<Response, Problem> {
    let stream = readable_stream_name(stream)?;
    caller.require(Permission::Read, stream.as_str())?;
    match app.store.stream_head(&stream).await? {
        Some(head) => {
            Ok(json_response(serde_json::to_vec(&head).expect("serializable")).into_response())
        }
        None => Err(skald_core::Error::StreamNotFound(stream).into()),
    }
}

/// `GET /v1/info`: the version to anyone authenticated; the log's head, durability and size
/// only to callers who may read some stream.
async fn info<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    if caller
        .require_some(Permission::Read, access::Scope::All)
        .is_err()
    {
        let body = serde_json::json!({ "version": VERSION });
        return Ok(json_response(body.to_string().into_bytes()).into_response());
    }
    let info = app.store.info().await?;
    let mut body = serde_json::json!({
        "version": VERSION,
        "headPosition": info.head_position,
        "durability": info.durability,
        "storageBytes": info.storage_bytes,
    });
    // On a shared store: whether this node runs the groups and sagas, and which node does.
    if let Some(address) = app.coordination.address() {
        let (role, owner) = match app.coordination.role() {
            Role::Owner { .. } => ("owner", Some(address.to_owned())),
            Role::Follower { owner } => ("follower", owner),
        };
        body["node"] = serde_json::json!({
            "address": address,
            "groupsAndSagas": role,
            "owner": owner,
        });
    }
    Ok(json_response(body.to_string().into_bytes()).into_response())
}

/// Entry points for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Parses an append body as `POST /v1/streams/{stream}` does, for both content types,
    /// without a store. Must never panic.
    pub fn parse_append_body(bytes: &[u8]) {
        let stream = StreamName::new("fuzz-1").expect("valid");
        if let Ok(b) = parse_json::<AppendBody>(bytes, "request body") {
            if let Some(c) = &b.condition {
                let _ = c.fail_if_events_match.validate();
            }
            for (i, e) in b.events.into_iter().enumerate() {
                let _ = e.into_event(&stream, &format!("events[{i}]"));
            }
        }
        if let Ok(events) = parse_json::<Vec<CloudEventIn>>(bytes, "CloudEvents batch") {
            for e in events {
                let _ = e.into_event(&stream, "event");
            }
        }
        if let Ok(q) = parse_json::<QueryBody>(bytes, "request body") {
            let _ = q.query.validate();
        }
    }

    /// Parses a query string as the read endpoints do.
    pub fn parse_query_string(text: &str) {
        let _ = parse_params(
            Some(text.to_owned()),
            &["from", "limit", "types", "tags", "direction"],
        );
    }
}
