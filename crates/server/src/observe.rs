//! Observability of the API: a request id and a log span for every request, request metrics,
//! `GET /metrics` (Prometheus text), and `GET /health/live` and `/health/ready`. The metric
//! names are listed in `docs/observability.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use skald_core::EventStore;
use skald_core::metrics::{Counter, DURATION_BOUNDS, Exposition, Histogram, Kind};
use skald_telemetry::{SpanKind, TraceContext};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{App, Problem, VERSION, json_response};

/// The response header (and the accepted request header) carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// What the API counts, shared by every request.
pub(crate) struct ApiMetrics {
    started: SystemTime,
    /// Requests and latency by route and method, looked up without allocating.
    routes: RwLock<HashMap<String, HashMap<Method, Arc<RouteMetrics>>>>,
    /// Open subscriptions by transport.
    pub sse: AtomicI64,
    pub websocket: AtomicI64,
    pub group_consumers: AtomicI64,
    pub grpc: AtomicI64,
    pub grpc_group_consumers: AtomicI64,
    /// Events handed to subscribers, by transport.
    pub sse_events: Counter,
    pub websocket_events: Counter,
    pub grpc_events: Counter,
    /// Subscribers disconnected for reading nothing.
    pub stalled: Counter,
    id_base: u32,
    next_id: AtomicU64,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let now = SystemTime::now();
        let nanos = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            started: now,
            routes: RwLock::new(HashMap::new()),
            sse: AtomicI64::new(0),
            websocket: AtomicI64::new(0),
            group_consumers: AtomicI64::new(0),
            grpc: AtomicI64::new(0),
            grpc_group_consumers: AtomicI64::new(0),
            sse_events: Counter::new(),
            websocket_events: Counter::new(),
            grpc_events: Counter::new(),
            stalled: Counter::new(),
            // Ids differ across restarts of the same server.
            id_base: nanos ^ std::process::id().rotate_left(16),
            next_id: AtomicU64::new(1),
        }
    }

    fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n:x}", self.id_base)
    }

    fn route(&self, route: &str, method: &Method) -> Arc<RouteMetrics> {
        let found = self
            .routes
            .read()
            .expect("metrics lock")
            .get(route)
            .and_then(|methods| methods.get(method))
            .cloned();
        found.unwrap_or_else(|| {
            let mut routes = self.routes.write().expect("metrics lock");
            let methods = routes.entry(route.to_owned()).or_default();
            Arc::clone(methods.entry(method.clone()).or_insert_with(|| {
                Arc::new(RouteMetrics {
                    latency: Histogram::new(DURATION_BOUNDS),
                    statuses: RwLock::new(Vec::new()),
                })
            }))
        })
    }

    fn record(&self, route: &str, method: &Method, status: u16, elapsed: std::time::Duration) {
        let metrics = self.route(route, method);
        metrics.latency.observe_duration(elapsed);
        let counted = metrics
            .statuses
            .read()
            .expect("metrics lock")
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, c)| c.inc())
            .is_some();
        if !counted {
            let mut statuses = metrics.statuses.write().expect("metrics lock");
            match statuses.iter().find(|(s, _)| *s == status) {
                Some((_, c)) => c.inc(),
                None => {
                    let counter = Counter::new();
                    counter.inc();
                    statuses.push((status, counter));
                }
            }
        }
    }

    fn write(&self, out: &mut Exposition) {
        let mut routes: Vec<(String, String, Arc<RouteMetrics>)> = self
            .routes
            .read()
            .expect("metrics lock")
            .iter()
            .flat_map(|(route, methods)| {
                methods
                    .iter()
                    .map(|(m, r)| (route.clone(), m.as_str().to_owned(), Arc::clone(r)))
            })
            .collect();
        routes.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out.family(
            "skald_http_requests_total",
            Kind::Counter,
            "HTTP requests by route, method and status.",
        );
        for (route, method, metrics) in &routes {
            let mut statuses: Vec<(u16, u64)> = metrics
                .statuses
                .read()
                .expect("metrics lock")
                .iter()
                .map(|(s, c)| (*s, c.get()))
                .collect();
            statuses.sort();
            for (status, count) in statuses {
                out.sample(
                    "skald_http_requests_total",
                    &[
                        ("route", route),
                        ("method", method),
                        ("status", &status.to_string()),
                    ],
                    count as f64,
                );
            }
        }
        out.family(
            "skald_http_request_duration_seconds",
            Kind::Histogram,
            "Time to answer an HTTP request (to the response head, for streams), by route and \
             method.",
        );
        for (route, method, metrics) in &routes {
            out.histogram(
                "skald_http_request_duration_seconds",
                &[("route", route), ("method", method)],
                &metrics.latency,
            );
        }
        let open = |gauge: &AtomicI64| gauge.load(Ordering::Relaxed) as f64;
        out.by_label(
            "skald_subscriptions",
            Kind::Gauge,
            "Open subscriptions by transport (group consumers counted apart).",
            "transport",
            &[
                ("sse", open(&self.sse)),
                ("websocket", open(&self.websocket)),
                ("group-websocket", open(&self.group_consumers)),
                ("grpc", open(&self.grpc)),
                ("group-grpc", open(&self.grpc_group_consumers)),
            ],
        );
        out.by_label(
            "skald_subscription_events_total",
            Kind::Counter,
            "Events delivered to catch-up subscribers, by transport.",
            "transport",
            &[
                ("sse", self.sse_events.get() as f64),
                ("websocket", self.websocket_events.get() as f64),
                ("grpc", self.grpc_events.get() as f64),
            ],
        );
        out.single(
            "skald_subscribers_stalled_total",
            Kind::Counter,
            "Subscribers disconnected because they read nothing for stall_timeout_ms.",
            self.stalled.get() as f64,
        );
    }
}

/// The requests of one route and method.
struct RouteMetrics {
    latency: Histogram,
    /// Requests by status; a handful per route.
    statuses: RwLock<Vec<(u16, Counter)>>,
}

/// Counts one open subscription of a transport while it lives.
pub(crate) struct Open {
    metrics: Arc<ApiMetrics>,
    gauge: fn(&ApiMetrics) -> &AtomicI64,
}

impl Open {
    pub fn new(metrics: &Arc<ApiMetrics>, gauge: fn(&ApiMetrics) -> &AtomicI64) -> Self {
        gauge(metrics).fetch_add(1, Ordering::Relaxed);
        Self {
            metrics: Arc::clone(metrics),
            gauge,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The trace context of the request being served, for handlers that start spans of their
/// own or store it in events. Set only while a trace is recorded or the client sent a
/// `traceparent`: otherwise nothing propagates and nothing is added to events.
#[derive(Clone, Debug)]
pub(crate) struct RequestTrace {
    /// The request's server span.
    pub context: TraceContext,
    /// The client's `tracestate`, carried along as it came.
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static TRACE: RequestTrace;
}

/// The trace of the request this task serves, if it has one.
pub(crate) fn current_trace() -> Option<RequestTrace> {
    TRACE.try_with(Clone::clone).ok()
}

/// The client's trace context: a valid `traceparent` and its `tracestate`.
fn client_trace(request: &Request) -> Option<(TraceContext, Option<String>)> {
    let headers = request.headers();
    let parent = TraceContext::parse(headers.get("traceparent")?.to_str().ok()?)?;
    let state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 512)
        .map(str::to_owned);
    Some((parent, state))
}

/// A request id from the client is kept when it is short and printable.
/// The request's method when HTTP defines it, else `_OTHER` (as OpenTelemetry names it): the
/// method is a metric label, a span name and a log field, and made-up ones must not grow them.
fn known_method(method: &Method) -> Method {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    if KNOWN.contains(method) {
        method.clone()
    } else {
        Method::from_bytes(b"_OTHER").expect("a valid method token")
    }
}

fn client_request_id(request: &Request) -> Option<String> {
    let id = request.headers().get(REQUEST_ID)?.to_str().ok()?;
    let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| id.to_owned())
}

/// The layer that gives each request an id (the client's `X-Request-Id`, or a new one),
/// returns it in the response, logs the request with it, and counts the request. A plain
/// tower layer rather than `axum::middleware::from_fn`, which clones the inner service for
/// every request.
#[derive(Clone)]
pub(crate) struct ObserveLayer {
    pub metrics: Arc<ApiMetrics>,
}

impl<I> Layer<I> for ObserveLayer {
    type Service = Observe<I>;

    fn layer(&self, inner: I) -> Observe<I> {
        Observe {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<I> {
    inner: I,
    metrics: Arc<ApiMetrics>,
}

impl<I> Service<Request> for Observe<I>
where
    I: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    I::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let id = client_request_id(&request).unwrap_or_else(|| metrics.request_id());
        let matched = request.extensions().get::<MatchedPath>().cloned();
        let method = known_method(request.method());
        // A span costs several percent of a small append's CPU (measured), so ordinary
        // requests name their id in their own log line instead; subscriptions, which live
        // long and log from their own tasks, get one, and so does every request while debug
        // logging is on.
        let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
        let long_lived = route.starts_with("/v1/subscribe/") || route == "/v1/ws";
        let span = (long_lived || tracing::enabled!(tracing::Level::DEBUG)).then(
            || tracing::info_span!("request", request_id = %id, method = %method, route = %route),
        );
        let client = client_trace(&request);
        let mut trace_span = (client.is_some() || skald_telemetry::is_enabled()).then(|| {
            let parent = client.as_ref().map(|(p, _)| p);
            let mut span = skald_telemetry::start_span_named(SpanKind::Server, parent, || {
                format!("{method} {route}").into()
            });
            span.set("http.request.method", method.as_str());
            span.set("http.route", route);
            span.set("skald.request_id", id.as_str());
            span
        });
        // An unsampled root trace propagates nowhere: its events get no context.
        let from_client = client.is_some();
        let trace = trace_span
            .as_ref()
            .filter(|span| from_client || span.is_recording())
            .map(|span| RequestTrace {
                context: span.context(),
                tracestate: client.and_then(|(_, state)| state),
            });
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = match (span, trace) {
                (Some(span), Some(trace)) => TRACE.scope(trace, future).instrument(span).await?,
                (Some(span), None) => future.instrument(span).await?,
                (None, Some(trace)) => TRACE.scope(trace, future).await?,
                (None, None) => future.await?,
            };
            if let Some(span) = &mut trace_span {
                let status = response.status().as_u16();
                span.set("http.response.status_code", u64::from(status));
                if status >= 500 {
                    span.fail(format!("answered {status}"));
                }
            }
            drop(trace_span);
            let elapsed = started.elapsed();
            let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
            let status = response.status().as_u16();
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            metrics.record(route, &method, status, elapsed);
            let micros = elapsed.as_micros() as u64;
            if status >= 500 {
                tracing::error!(request_id = %id, method = %method, route, status, micros, "request failed");
            } else {
                tracing::debug!(request_id = %id, method = %method, route, status, micros, "request");
            }
            Ok(response)
        })
    }
}

fn process_metrics(out: &mut Exposition, started: SystemTime) {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        out.single(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
            (kb * 1024) as f64,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.single(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let start = started
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    out.single(
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since the Unix epoch, in seconds.",
        start.floor(),
    );
    out.single(
        "skald_uptime_seconds",
        Kind::Gauge,
        "Seconds since the server started.",
        started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
    );
}

/// `GET /metrics`.
pub(crate) async fn metrics<S: EventStore>(
    State(app): State<App<S>>,
    caller: crate::access::Caller,
) -> Result<Response, Problem> {
    caller.require_held(skald_security::Permission::Admin)?;
    let mut out = Exposition::new();
    out.family(
        "skald_build_info",
        Kind::Gauge,
        "The Skald version serving, as a label; always 1.",
    );
    out.sample("skald_build_info", &[("version", VERSION)], 1.0);
    process_metrics(&mut out, app.metrics.started);
    out.single(
        "skald_ready",
        Kind::Gauge,
        "1 when the store takes appends and the disk has room (GET /health/ready), else 0.",
        if readiness(&app).is_none() { 1.0 } else { 0.0 },
    );
    app.metrics.write(&mut out);
    app.store.write_metrics(&mut out);
    // Only the node that runs the sagas and groups reports them; the others would report
    // nothing true.
    if let Ok(sagas) = app.sagas() {
        sagas.write_metrics(&mut out);
    }
    app.security.write_metrics(&mut out);
    skald_telemetry::write_metrics(&mut out);
    out.single(
        "skald_live_subscribers",
        Kind::Gauge,
        "Subscriptions following the live tail, persistent subscription readers included.",
        app.hub.subscribers() as f64,
    );
    let groups = match app.groups() {
        Ok(groups) => groups.list().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    type Family = (
        &'static str,
        Kind,
        &'static str,
        fn(&skald_hub::groups::GroupStats) -> f64,
    );
    let group_gauges: [Family; 6] = [
        (
            "skald_group_lag",
            Kind::Gauge,
            "Positions between a persistent subscription's checkpoint and the head.",
            |s| s.lag as f64,
        ),
        (
            "skald_group_in_flight",
            Kind::Gauge,
            "Messages delivered and not yet acknowledged.",
            |s| s.in_flight as f64,
        ),
        (
            "skald_group_available",
            Kind::Gauge,
            "Messages waiting for a consumer or a retry.",
            |s| s.available as f64,
        ),
        (
            "skald_group_parked",
            Kind::Gauge,
            "Messages parked and not replayed.",
            |s| s.parked as f64,
        ),
        (
            "skald_group_consumers",
            Kind::Gauge,
            "Consumers connected.",
            |s| s.consumers.len() as f64,
        ),
        (
            "skald_group_delivered_total",
            Kind::Counter,
            "Deliveries since the server started, redeliveries included.",
            |s| s.delivered as f64,
        ),
    ];
    for (name, kind, help, value) in group_gauges {
        out.family(name, kind, help);
        for group in &groups {
            out.sample(
                name,
                &[("group", &group.definition.name)],
                value(&group.stats),
            );
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out.finish(),
    )
        .into_response())
}

/// `GET /health/live`: the process answers.
pub(crate) async fn live() -> Response {
    json_response(br#"{"status":"live"}"#.to_vec()).into_response()
}

/// `GET /health/ready`: the store takes appends, the disk has room, and the server is not
/// stopping.
pub(crate) async fn ready<S: EventStore>(State(app): State<App<S>>) -> Response {
    match readiness(&app) {
        None => json_response(br#"{"status":"ready"}"#.to_vec()).into_response(),
        Some(reason) => Problem::not_ready(reason).into_response(),
    }
}

/// Why the server is not ready, or `None` when it is.
fn readiness<S: EventStore>(app: &App<S>) -> Option<String> {
    if app.hub.is_stopping() {
        Some("the server is shutting down".to_owned())
    } else {
        app.store.readiness().err()
    }
}

/// A `deliver` span for each event whose stored trace context is sampled, ended when the
/// returned spans drop (after the events are handed to the connection). Nothing when traces
/// are not exported.
pub(crate) fn deliver_spans<'a>(
    transport: &'static str,
    events: impl IntoIterator<Item = &'a Arc<skald_core::RecordedEvent>>,
) -> Vec<skald_telemetry::Span> {
    if !skald_telemetry::is_enabled() {
        return Vec::new();
    }
    events
        .into_iter()
        .filter_map(|event| {
            let parent = skald_telemetry::TraceContext::from_metadata(event.metadata.as_str())
                .filter(|p| p.sampled)?;
            let mut span = skald_telemetry::start_span(
                "deliver",
                skald_telemetry::SpanKind::Consumer,
                Some(&parent),
            );
            span.set("skald.transport", transport);
            span.set("skald.stream", event.stream.as_str());
            span.set("skald.position", event.position.0);
            Some(span)
        })
        .collect()
}
