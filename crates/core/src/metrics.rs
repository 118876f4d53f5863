//! Metric primitives and the Prometheus text format, with no I/O: counters, gauges and
//! histograms are atomics that any crate updates on its hot path; [`Exposition`] writes them
//! out when `GET /metrics` is scraped. Names follow Prometheus conventions (`_total` for
//! counters, base units such as `_seconds` and `_bytes`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A value that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A distribution over fixed buckets: how many observations fell at or below each bound, their
/// count and their sum. Observing is a few relaxed atomic additions.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, increasing; an implicit `+Inf` bucket follows.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, in millionths of the unit, so that it adds atomically.
    sum_micros: AtomicU64,
}

/// Bounds for durations in seconds, from 50 µs to 10 s.
pub const DURATION_BOUNDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Bounds for sizes counted in items (events per batch), from 1 to 8192.
pub const SIZE_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

impl Histogram {
    /// An empty histogram over `bounds`, which must increase.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds increase");
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let bucket = self.bounds.partition_point(|b| *b < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = (value.max(0.0) * 1e6).round() as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, elapsed: std::time::Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    /// How many observations there are.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The kind of a metric family, for its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

/// The Prometheus text format (version 0.0.4) being written. Each family is announced once
/// with [`Exposition::family`]; its samples follow.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        write_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// A whole family of one unlabelled counter or gauge.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A whole family of one counter or gauge split by one label: `(label value, value)`.
    pub fn by_label(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        values: &[(&str, f64)],
    ) {
        self.family(name, kind, help);
        for (value_of_label, value) in values {
            self.sample(name, &[(label, value_of_label)], *value);
        }
    }

    /// The samples of one histogram (of a family started with [`Kind::Histogram`]).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0;
        for (i, count) in histogram.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = match histogram.bounds.get(i) {
                Some(b) => {
                    let mut s = String::new();
                    write_value(&mut s, *b);
                    s
                }
                None => "+Inf".to_owned(),
            };
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(&bound));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), labels, sum);
        // The count is the +Inf bucket, so that the two always agree.
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (key, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_count_matches_the_inf_bucket() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 7.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.family("x_seconds", Kind::Histogram, "x");
        e.histogram("x_seconds", &[("op", "a\"b")], &h);
        let text = e.finish();
        assert!(
            text.contains("x_seconds_bucket{op=\"a\\\"b\",le=\"0.1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{op=\"a\\\"b\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{op=\"a\\\"b\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_sum{op=\"a\\\"b\"} 7.65\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_count{op=\"a\\\"b\"} 4\n"),
            "{text}"
        );
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn families_announce_help_and_type() {
        let mut e = Exposition::new();
        e.single("up_total", Kind::Counter, "line\nbreak", 3.0);
        assert_eq!(
            e.finish(),
            "# HELP up_total line\\nbreak\n# TYPE up_total counter\nup_total 3\n"
        );
    }
}

/// Append requests by result, as every backend counts them for `skald_appends_total`.
#[derive(Debug, Default)]
pub struct AppendOutcomes {
    written: Counter,
    replayed: Counter,
    rejected: Counter,
    failed: Counter,
}

impl AppendOutcomes {
    /// No appends yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one append's outcome: the client's errors (a conflict, an invalid request) are
    /// `rejected`, the store's `failed`.
    pub fn count(&self, outcome: &crate::Result<crate::AppendResult>) {
        use crate::Error;
        match outcome {
            Ok(result) if result.replayed => self.replayed.inc(),
            Ok(_) => self.written.inc(),
            Err(
                Error::InvalidEvent { .. }
                | Error::WrongExpectedRevision { .. }
                | Error::ConditionFailed { .. }
                | Error::IdReused { .. }
                | Error::StreamNotFound(_),
            ) => self.rejected.inc(),
            Err(_) => self.failed.inc(),
        }
    }

    /// Writes `skald_appends_total`.
    pub fn write(&self, out: &mut Exposition) {
        out.by_label(
            "skald_appends_total",
            Kind::Counter,
            "Append requests by result: written, replayed (idempotent repeat), rejected (the \
             client's: conflict or invalid), failed (the store's).",
            "result",
            &[
                ("written", self.written.get() as f64),
                ("replayed", self.replayed.get() as f64),
                ("rejected", self.rejected.get() as f64),
                ("failed", self.failed.get() as f64),
            ],
        );
    }
}

/// What every backend counts under the same names: append outcomes, events written, events
/// per group commit, read pages and the events they returned. Dashboards and alerts work on
/// either backend because both write these through [`StoreCounters::write`].
#[derive(Debug)]
pub struct StoreCounters {
    /// Append requests by result.
    pub outcomes: AppendOutcomes,
    /// Events written.
    pub events_written: Counter,
    /// Events per group commit.
    pub batch_events: Histogram,
    /// Read pages served.
    pub reads: Counter,
    /// Events those reads returned.
    pub events_read: Counter,
}

impl Default for StoreCounters {
    fn default() -> Self {
        Self {
            outcomes: AppendOutcomes::new(),
            events_written: Counter::new(),
            batch_events: Histogram::new(SIZE_BOUNDS),
            reads: Counter::new(),
            events_read: Counter::new(),
        }
    }
}

impl StoreCounters {
    /// Nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one read page of `events` events.
    pub fn page_read(&self, events: usize) {
        self.reads.inc();
        self.events_read.add(events as u64);
    }

    /// Writes the families, and `skald_events_stored` from `head` (the next position).
    pub fn write(&self, out: &mut Exposition, head: u64) {
        self.outcomes.write(out);
        out.single(
            "skald_events_written_total",
            Kind::Counter,
            "Events written.",
            self.events_written.get() as f64,
        );
        out.family(
            "skald_append_batch_events",
            Kind::Histogram,
            "Events per group commit: one write and one fdatasync on the embedded engine, one \
             call of the append function on PostgreSQL.",
        );
        out.histogram("skald_append_batch_events", &[], &self.batch_events);
        out.single(
            "skald_reads_total",
            Kind::Counter,
            "Read pages served (stream, category, query and global-log reads, subscriptions' \
             catch-up included).",
            self.reads.get() as f64,
        );
        out.single(
            "skald_events_read_total",
            Kind::Counter,
            "Events returned by reads.",
            self.events_read.get() as f64,
        );
        out.single(
            "skald_events_stored",
            Kind::Gauge,
            "Events in the store; the next append's position.",
            head as f64,
        );
    }
}
