//! The `OTEL_*` configuration and the batch exporter: spans go into a bounded buffer and one
//! task posts them as OTLP JSON (`ExportTraceServiceRequest`) every `OTEL_BSP_SCHEDULE_DELAY`
//! or when a batch is full.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::fmt::Write;

use tokio::sync::{Notify, oneshot};

use crate::context::push_hex;
use crate::{Sampler, SpanData, Value};

/// Where and how spans are exported.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The URL spans are posted to.
    pub endpoint: hyper::Uri,
    /// Extra headers sent with every export.
    pub headers: Vec<(String, String)>,
    /// Per export.
    pub timeout: Duration,
    /// `service.name`.
    pub service_name: String,
    /// How traces are sampled.
    pub sampler: Sampler,
    /// Between exports.
    pub schedule_delay: Duration,
    /// Spans waiting for export at most.
    pub max_queue: usize,
    /// Spans per export at most.
    pub max_batch: usize,
}

impl Config {
    /// Reads the `OTEL_*` variables through `var`. `Ok(None)` when traces are not exported
    /// (no endpoint, or `OTEL_TRACES_EXPORTER=none`); an error names the variable at fault.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let get = |name: &str| {
            var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        match get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other:?}: Skald exports traces with otlp, or not at all (none)"
                ));
            }
        }
        let endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(full), _) => full,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let endpoint: hyper::Uri = endpoint
            .parse()
            .map_err(|e| format!("OTLP endpoint {endpoint:?} is not a URL: {e}"))?;
        if endpoint.scheme_str() != Some("http") || endpoint.host().is_none() {
            return Err(format!(
                "OTLP endpoint {endpoint} must be an http:// URL with a host (TLS to collectors is not built yet)"
            ));
        }
        match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("http/json") => {}
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: Skald exports OTLP as http/json only"
                ));
            }
        }
        let mut headers = Vec::new();
        for pair in get("OTEL_EXPORTER_OTLP_HEADERS")
            .iter()
            .flat_map(|h| h.split(','))
        {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("OTEL_EXPORTER_OTLP_HEADERS: {pair:?} is not key=value"))?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let number = |name: &str, default: u64, min: u64| -> Result<u64, String> {
            match get(name) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().ok().filter(|n| *n >= min).ok_or_else(|| {
                    format!("{name}={v:?} must be a whole number of at least {min}")
                }),
            }
        };
        let ratio = match get("OTEL_TRACES_SAMPLER_ARG") {
            None => 1.0,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG={v:?} must be a ratio from 0 to 1")
                })?,
        };
        let sampler = match get("OTEL_TRACES_SAMPLER").as_deref() {
            None | Some("parentbased_always_on") => Sampler {
                ratio: 1.0,
                parent_based: true,
            },
            Some("parentbased_always_off") => Sampler {
                ratio: 0.0,
                parent_based: true,
            },
            Some("parentbased_traceidratio") => Sampler {
                ratio,
                parent_based: true,
            },
            Some("always_on") => Sampler {
                ratio: 1.0,
                parent_based: false,
            },
            Some("always_off") => Sampler {
                ratio: 0.0,
                parent_based: false,
            },
            Some("traceidratio") => Sampler {
                ratio,
                parent_based: false,
            },
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not one of parentbased_always_on, \
                     parentbased_always_off, parentbased_traceidratio, always_on, always_off, \
                     traceidratio"
                ));
            }
        };
        Ok(Some(Self {
            endpoint,
            headers,
            timeout: Duration::from_millis(number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000, 1)?),
            service_name: get("OTEL_SERVICE_NAME").unwrap_or_else(|| "skald".to_owned()),
            sampler,
            schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 1000, 1)?),
            max_queue: number("OTEL_BSP_MAX_QUEUE_SIZE", 8192, 1)? as usize,
            max_batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, 1)? as usize,
        }))
    }
}

#[derive(Default)]
struct Counts {
    exported: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

/// Spans wait in a buffer that the export task takes whole: submitting a span is a push under
/// a lock, not a message that wakes a task, so a sampled request costs little more than its
/// span's allocation.
struct Shared {
    queue: Mutex<Vec<SpanData>>,
    /// Wakes the task early, when a batch is full or a flush is asked for.
    wake: Notify,
    /// Flushes asked for and not yet answered.
    flushes: Mutex<Vec<oneshot::Sender<()>>>,
    counts: Counts,
    max_queue: usize,
    max_batch: usize,
}

pub(crate) struct Exporter {
    shared: Arc<Shared>,
}

impl Exporter {
    pub(crate) fn start(config: Config) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::with_capacity(config.max_batch)),
            wake: Notify::new(),
            flushes: Mutex::new(Vec::new()),
            counts: Counts::default(),
            max_queue: config.max_queue,
            max_batch: config.max_batch,
        });
        tokio::spawn(run(config, Arc::clone(&shared)));
        Self { shared }
    }

    pub(crate) fn submit(&self, span: SpanData) {
        let mut queue = self.shared.queue.lock().expect("span queue lock");
        if queue.len() >= self.shared.max_queue {
            drop(queue);
            self.shared.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push(span);
        let full = queue.len() == self.shared.max_batch;
        drop(queue);
        if full {
            self.shared.wake.notify_one();
        }
    }

    pub(crate) async fn flush(&self, within: Duration) {
        let (done, wait) = oneshot::channel();
        self.shared.flushes.lock().expect("flush lock").push(done);
        self.shared.wake.notify_one();
        let _ = tokio::time::timeout(within, wait).await;
    }

    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        let c = &self.shared.counts;
        (
            c.exported.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
        )
    }
}

async fn run(config: Config, shared: Arc<Shared>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let _ = tokio::time::timeout(config.schedule_delay, shared.wake.notified()).await;
        let flushes = std::mem::take(&mut *shared.flushes.lock().expect("flush lock"));
        loop {
            let spans: Vec<SpanData> = {
                let mut queue = shared.queue.lock().expect("span queue lock");
                let n = queue.len().min(config.max_batch);
                queue.drain(..n).collect()
            };
            if spans.is_empty() {
                break;
            }
            let n = spans.len() as u64;
            match send(&client, &config, &spans).await {
                Ok(()) => {
                    shared.counts.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.counts.failures.fetch_add(1, Ordering::Relaxed);
                    // One warning a minute at most: a collector that is down must not flood
                    // the logs.
                    let now = tokio::time::Instant::now();
                    if last_warning.is_none_or(|t| now - t > Duration::from_secs(60)) {
                        last_warning = Some(now);
                        tracing::warn!(endpoint = %config.endpoint, "trace export failed, {n} spans lost: {e}");
                    }
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    config: &Config,
    spans: &[SpanData],
) -> Result<(), String> {
    let body = request_body(&config.service_name, spans);
    let mut request =
        hyper::Request::post(config.endpoint.clone()).header("content-type", "application/json");
    for (k, v) in &config.headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the export: {e}"))?;
    let response = tokio::time::timeout(config.timeout, client.request(request))
        .await
        .map_err(|_| format!("no answer within {:?}", config.timeout))?
        .map_err(|e| format!("cannot reach the collector: {e}"))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

fn push_json_str(out: &mut String, text: &str) {
    // serde_json writes the escaping; a string cannot fail to serialize.
    out.push_str(&serde_json::to_string(text).expect("a string serializes"));
}

fn push_attribute(out: &mut String, key: &str, value: &Value) {
    out.push_str("{\"key\":");
    push_json_str(out, key);
    match value {
        Value::Text(s) => {
            out.push_str(",\"value\":{\"stringValue\":");
            push_json_str(out, s);
            out.push_str("}}");
        }
        Value::Int(n) => {
            let _ = write!(out, ",\"value\":{{\"intValue\":\"{n}\"}}}}");
        }
    }
}

/// An OTLP/JSON `ExportTraceServiceRequest`: ids in hex, times as decimal strings. Written
/// directly, not through `serde_json::Value`: with every trace sampled, building and dropping
/// the values was most of the exporter's cost (perf).
pub(crate) fn request_body(service_name: &str, spans: &[SpanData]) -> String {
    let mut out = String::with_capacity(256 + spans.len() * 400);
    out.push_str("{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
    push_attribute(
        &mut out,
        "service.name",
        &Value::Text(service_name.to_owned()),
    );
    out.push_str("]},\"scopeSpans\":[{\"scope\":{\"name\":\"skald\",\"version\":\"");
    out.push_str(env!("CARGO_PKG_VERSION"));
    out.push_str("\"},\"spans\":[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"traceId\":\"");
        push_hex(&mut out, &s.context.trace_id);
        out.push_str("\",\"spanId\":\"");
        push_hex(&mut out, &s.context.span_id);
        out.push('"');
        if let Some(parent) = &s.parent {
            out.push_str(",\"parentSpanId\":\"");
            push_hex(&mut out, parent);
            out.push('"');
        }
        out.push_str(",\"name\":");
        push_json_str(&mut out, &s.name);
        let _ = write!(
            out,
            ",\"kind\":{},\"startTimeUnixNano\":\"{}\",\"endTimeUnixNano\":\"{}\",\"attributes\":[",
            s.kind as i32, s.start_ns, s.end_ns
        );
        for (j, (key, value)) in s.attributes.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            push_attribute(&mut out, key, value);
        }
        out.push_str("],\"status\":");
        match &s.error {
            Some(message) => {
                out.push_str("{\"code\":2,\"message\":");
                push_json_str(&mut out, message);
                out.push('}');
            }
            None => out.push_str("{\"code\":0}"),
        }
        out.push('}');
    }
    out.push_str("]}]}]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_request_body_is_otlp_json() {
        use crate::{SpanKind, TraceContext};
        let span = SpanData {
            context: TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .unwrap(),
            parent: Some([0xab; 8]),
            name: "POST \"x\"".into(),
            kind: SpanKind::Server,
            start_ns: 1,
            end_ns: 2,
            attributes: vec![("a", Value::Text("b\n".into())), ("n", Value::Int(-3))],
            error: Some("bad".into()),
        };
        let root = SpanData {
            parent: None,
            error: None,
            attributes: Vec::new(),
            ..span.clone()
        };
        let body: serde_json::Value =
            serde_json::from_str(&request_body("svc", &[span, root])).unwrap();
        let resource = &body["resourceSpans"][0];
        assert_eq!(
            resource["resource"]["attributes"][0],
            serde_json::json!({"key": "service.name", "value": {"stringValue": "svc"}})
        );
        let spans = &resource["scopeSpans"][0]["spans"];
        assert_eq!(
            spans[0],
            serde_json::json!({
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "spanId": "00f067aa0ba902b7",
                "parentSpanId": "abababababababab",
                "name": "POST \"x\"",
                "kind": 2,
                "startTimeUnixNano": "1",
                "endTimeUnixNano": "2",
                "attributes": [
                    {"key": "a", "value": {"stringValue": "b\n"}},
                    {"key": "n", "value": {"intValue": "-3"}}
                ],
                "status": {"code": 2, "message": "bad"}
            })
        );
        assert!(spans[1].get("parentSpanId").is_none());
        assert_eq!(spans[1]["status"], serde_json::json!({"code": 0}));
    }

    #[test]
    fn configuration_comes_from_the_standard_variables() {
        assert_eq!(Config::from_env(env(&[])).unwrap(), None);
        let c = Config::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=b, c = d"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(
            c.sampler,
            Sampler {
                ratio: 0.25,
                parent_based: true
            }
        );
        assert_eq!(
            c.headers,
            [("a".into(), "b".into()), ("c".into(), "d".into())]
        );
        assert_eq!(
            Config::from_env(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "x"),
                ("OTEL_TRACES_EXPORTER", "none")
            ]))
            .unwrap(),
            None
        );
        for (pairs, named) in [
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ][..],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1"),
                    ("OTEL_TRACES_SAMPLER", "sometimes"),
                ][..],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://h:1")][..],
                "http://",
            ),
            (
                &[("OTEL_TRACES_EXPORTER", "zipkin")][..],
                "OTEL_TRACES_EXPORTER",
            ),
        ] {
            let err = Config::from_env(env(pairs)).unwrap_err();
            assert!(err.contains(named), "{err}");
        }
    }
}
