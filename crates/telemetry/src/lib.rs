//! OpenTelemetry traces for Skald: W3C Trace Context propagation, spans, sampling, and export
//! as OTLP over HTTP with JSON bodies, configured by the standard `OTEL_*` variables. Described
//! in `docs/observability.md`, "Traces".
//!
//! One process-wide tracer, as OpenTelemetry's own SDKs have: [`install`] it once at start;
//! until then (and in tests that do not) spans are not recorded, but contexts still propagate.

mod context;
mod export;

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use context::{TraceContext, inject};
pub use export::Config;

use skald_core::metrics::{Exposition, Kind};

/// What a span stands for, as OTLP numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside the process.
    Internal = 1,
    /// A request served.
    Server = 2,
    /// A call to another service.
    Client = 3,
    /// A message handed to a consumer.
    Consumer = 5,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Text.
    Text(String),
    /// A whole number.
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Self {
        Self::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// A finished span, as exported.
#[derive(Clone, Debug)]
pub struct SpanData {
    /// Its identity.
    pub context: TraceContext,
    /// The parent's span id, if any.
    pub parent: Option<[u8; 8]>,
    /// Its name.
    pub name: Cow<'static, str>,
    /// Its kind.
    pub kind: SpanKind,
    /// Nanoseconds since the epoch.
    pub start_ns: u64,
    /// Nanoseconds since the epoch.
    pub end_ns: u64,
    /// Attributes.
    pub attributes: Vec<(&'static str, Value)>,
    /// An error message when it failed.
    pub error: Option<String>,
}

/// A span in progress. Ends (and is queued for export, when recording) when dropped.
#[derive(Debug)]
pub struct Span {
    context: TraceContext,
    recording: Option<Box<SpanData>>,
}

impl Span {
    /// Its context, to pass on as a parent or in a `traceparent`.
    pub fn context(&self) -> TraceContext {
        self.context
    }

    /// Whether it will be exported.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Adds an attribute (a no-op on spans that are not recorded).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(data) = &mut self.recording {
            data.attributes.push((key, value.into()));
        }
    }

    /// Marks it failed.
    pub fn fail(&mut self, message: impl Into<String>) {
        if let Some(data) = &mut self.recording {
            data.error = Some(message.into());
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut data) = self.recording.take() {
            data.end_ns = now_ns();
            if let Some(tracer) = TRACER.get() {
                tracer.exporter.submit(*data);
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How root spans are sampled, and whether children follow their parent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// Share of new traces sampled, 0 to 1.
    pub ratio: f64,
    /// Whether a span with a parent follows the parent's decision.
    pub parent_based: bool,
}

impl Sampler {
    fn sample(&self, trace_id: &[u8; 16], parent: Option<&TraceContext>) -> bool {
        if let Some(parent) = parent.filter(|_| self.parent_based) {
            return parent.sampled;
        }
        if self.ratio >= 1.0 {
            return true;
        }
        // The trace id's low 8 bytes as a fraction: the same trace decides the same everywhere.
        let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
        (low as f64) < self.ratio * (u64::MAX as f64)
    }
}

struct Tracer {
    sampler: Sampler,
    exporter: export::Exporter,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Installs the process's tracer and starts its exporter on the current tokio runtime. Only
/// the first call counts.
pub fn install(config: Config) {
    let sampler = config.sampler;
    let exporter = export::Exporter::start(config);
    let _ = TRACER.set(Tracer { sampler, exporter });
}

/// Whether spans are recorded and exported.
pub fn is_enabled() -> bool {
    TRACER.get().is_some()
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        fastrand::fill(&mut id);
        if id != [0u8; N] {
            return id;
        }
    }
}

/// Starts a span: the child of `parent`, or the root of a new trace. Without an installed
/// tracer the span is not recorded, but it has a context to propagate (sampled as its parent
/// was).
pub fn start_span(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    parent: Option<&TraceContext>,
) -> Span {
    let name = name.into();
    start_span_named(kind, parent, move || name)
}

/// [`start_span`] with a name made only when the span is recorded, so that unsampled
/// requests pay no formatting.
pub fn start_span_named(
    kind: SpanKind,
    parent: Option<&TraceContext>,
    name: impl FnOnce() -> Cow<'static, str>,
) -> Span {
    let trace_id = parent.map_or_else(random_id::<16>, |p| p.trace_id);
    let span_id = random_id::<8>();
    let (sampled, recording) = match TRACER.get() {
        Some(tracer) => {
            let sampled = tracer.sampler.sample(&trace_id, parent);
            (sampled, sampled)
        }
        None => (parent.is_some_and(|p| p.sampled), false),
    };
    let context = TraceContext {
        trace_id,
        span_id,
        sampled,
    };
    let recording = recording.then(|| {
        Box::new(SpanData {
            context,
            parent: parent.map(|p| p.span_id),
            name: name(),
            kind,
            start_ns: now_ns(),
            end_ns: 0,
            attributes: Vec::new(),
            error: None,
        })
    });
    Span { context, recording }
}

/// Sends what is queued; waits at most `within`.
pub async fn flush(within: Duration) {
    if let Some(tracer) = TRACER.get() {
        tracer.exporter.flush(within).await;
    }
}

/// The tracer's counters for `GET /metrics` (zeros when no tracer is installed).
pub fn write_metrics(out: &mut Exposition) {
    let (exported, dropped, failures) = TRACER.get().map_or((0, 0, 0), |t| t.exporter.counts());
    out.single(
        "skald_trace_spans_exported_total",
        Kind::Counter,
        "Spans the trace collector accepted.",
        exported as f64,
    );
    out.single(
        "skald_trace_spans_dropped_total",
        Kind::Counter,
        "Spans dropped because the export queue was full.",
        dropped as f64,
    );
    out.single(
        "skald_trace_export_failures_total",
        Kind::Counter,
        "Span exports that failed; their spans are lost.",
        failures as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_sampler_is_decided_by_the_trace_id() {
        let half = Sampler {
            ratio: 0.5,
            parent_based: true,
        };
        let mut low = [0u8; 16];
        low[8] = 0x10;
        let mut high = [0u8; 16];
        high[8] = 0xf0;
        assert!(half.sample(&low, None));
        assert!(!half.sample(&high, None));
        let parent = TraceContext {
            trace_id: high,
            span_id: [1; 8],
            sampled: true,
        };
        assert!(
            half.sample(&high, Some(&parent)),
            "children follow a sampled parent"
        );
        let own = Sampler {
            parent_based: false,
            ..half
        };
        assert!(!own.sample(&high, Some(&parent)));
    }

    #[test]
    fn without_a_tracer_spans_propagate_but_do_not_record() {
        let root = start_span("a", SpanKind::Internal, None);
        assert!(!root.is_recording());
        assert!(!root.context().sampled);
        let parent =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let child = start_span("b", SpanKind::Internal, Some(&parent));
        assert_eq!(child.context().trace_id, parent.trace_id);
        assert_ne!(child.context().span_id, parent.span_id);
        assert!(child.context().sampled);
    }
}
