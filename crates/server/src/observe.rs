//! Observability of the API: a request id and a log span for every request, request metrics,
//! `GET /metrics` (Prometheus text), and `GET /health/live` and `/health/ready`. The metric
//! names are listed in `docs/observability.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use skald_core::EventStore;
use skald_core::metrics::{Counter, DURATION_BOUNDS, Exposition, Histogram, Kind};
use tracing::Instrument;

use crate::{App, Problem, VERSION, json_response};

/// The response header (and the accepted request header) carrying the request id.
pub const REQUEST_ID: &str = "x-request-id";

/// What the API counts, shared by every request.
pub(crate) struct ApiMetrics {
    started: SystemTime,
    /// Requests by (route, method, status).
    requests: RwLock<HashMap<(String, String, u16), Arc<Counter>>>,
    /// Latency by (route, method).
    latency: RwLock<HashMap<(String, String), Arc<Histogram>>>,
    /// Open subscriptions by transport.
    pub sse: AtomicI64,
    pub websocket: AtomicI64,
    pub group_consumers: AtomicI64,
    /// Events handed to subscribers, by transport.
    pub sse_events: Counter,
    pub websocket_events: Counter,
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
            requests: RwLock::new(HashMap::new()),
            latency: RwLock::new(HashMap::new()),
            sse: AtomicI64::new(0),
            websocket: AtomicI64::new(0),
            group_consumers: AtomicI64::new(0),
            sse_events: Counter::new(),
            websocket_events: Counter::new(),
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

    fn record(&self, route: &str, method: &str, status: u16, elapsed: std::time::Duration) {
        let counter = {
            let key = (route.to_owned(), method.to_owned(), status);
            let found = self
                .requests
                .read()
                .expect("metrics lock")
                .get(&key)
                .cloned();
            match found {
                Some(c) => c,
                None => Arc::clone(
                    self.requests
                        .write()
                        .expect("metrics lock")
                        .entry(key)
                        .or_default(),
                ),
            }
        };
        counter.inc();
        let histogram = {
            let key = (route.to_owned(), method.to_owned());
            let found = self
                .latency
                .read()
                .expect("metrics lock")
                .get(&key)
                .cloned();
            match found {
                Some(h) => h,
                None => Arc::clone(
                    self.latency
                        .write()
                        .expect("metrics lock")
                        .entry(key)
                        .or_insert_with(|| Arc::new(Histogram::new(DURATION_BOUNDS))),
                ),
            }
        };
        histogram.observe_duration(elapsed);
    }

    fn write(&self, out: &mut Exposition) {
        out.family(
            "skald_http_requests_total",
            Kind::Counter,
            "HTTP requests by route, method and status.",
        );
        let mut requests: Vec<_> = self
            .requests
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, c)| (k.clone(), c.get()))
            .collect();
        requests.sort();
        for ((route, method, status), count) in requests {
            out.sample(
                "skald_http_requests_total",
                &[
                    ("route", &route),
                    ("method", &method),
                    ("status", &status.to_string()),
                ],
                count as f64,
            );
        }
        out.family(
            "skald_http_request_duration_seconds",
            Kind::Histogram,
            "Time to answer an HTTP request (to the response head, for streams), by route and \
             method.",
        );
        let mut latency: Vec<_> = self
            .latency
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, h)| (k.clone(), Arc::clone(h)))
            .collect();
        latency.sort_by(|a, b| a.0.cmp(&b.0));
        for ((route, method), histogram) in latency {
            out.histogram(
                "skald_http_request_duration_seconds",
                &[("route", &route), ("method", &method)],
                &histogram,
            );
        }
        out.family(
            "skald_subscriptions",
            Kind::Gauge,
            "Open subscriptions by transport (group consumers on WebSockets counted apart).",
        );
        for (transport, gauge) in [
            ("sse", &self.sse),
            ("websocket", &self.websocket),
            ("group-websocket", &self.group_consumers),
        ] {
            out.sample(
                "skald_subscriptions",
                &[("transport", transport)],
                gauge.load(Ordering::Relaxed) as f64,
            );
        }
        out.family(
            "skald_subscription_events_total",
            Kind::Counter,
            "Events delivered to catch-up subscribers, by transport.",
        );
        for (transport, counter) in [
            ("sse", &self.sse_events),
            ("websocket", &self.websocket_events),
        ] {
            out.sample(
                "skald_subscription_events_total",
                &[("transport", transport)],
                counter.get() as f64,
            );
        }
        out.single(
            "skald_subscribers_stalled_total",
            Kind::Counter,
            "Subscribers disconnected because they read nothing for stall_timeout_ms.",
            self.stalled.get() as f64,
        );
    }
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

/// A request id from the client is kept when it is short and printable.
fn client_request_id(request: &Request) -> Option<String> {
    let id = request.headers().get(REQUEST_ID)?.to_str().ok()?;
    let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| id.to_owned())
}

/// Gives each request an id (the client's `X-Request-Id`, or a new one), runs it inside a
/// log span carrying that id, returns the id in the response, and counts the request.
pub(crate) async fn middleware<S: EventStore>(
    State(app): State<App<S>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = client_request_id(&request).unwrap_or_else(|| app.metrics.request_id());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    app.metrics.record(&route, &method, status, elapsed);
    let _entered = span.enter();
    let micros = elapsed.as_micros() as u64;
    if status >= 500 {
        tracing::error!(status, micros, "request failed");
    } else {
        tracing::debug!(status, micros, "request");
    }
    response
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
pub(crate) async fn metrics<S: EventStore>(State(app): State<App<S>>) -> Response {
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
    out.single(
        "skald_live_subscribers",
        Kind::Gauge,
        "Subscriptions following the live tail, persistent subscription readers included.",
        app.hub.subscribers() as f64,
    );
    let groups = app.groups.list().await.unwrap_or_default();
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
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        out.finish(),
    )
        .into_response()
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
