//! What the embedded engine counts for `GET /metrics`, and its readiness checks.

use skald_core::metrics::{
    AppendOutcomes, Counter, DURATION_BOUNDS, Exposition, Histogram, Kind, SIZE_BOUNDS,
};

/// Below this much free space on the data directory's disk (or 5% of a disk smaller than
/// 1.25 GiB) the store reports itself not ready, before appends start failing with
/// `storage-full`.
pub(crate) const MIN_FREE_BYTES: u64 = 64 << 20;

/// Whether the disk is too full to call the store ready.
pub(crate) fn disk_low(disk: &crate::io::DiskSpace) -> bool {
    disk.free < MIN_FREE_BYTES.min(disk.total / 20)
}

/// Counters updated by the writer and readers; read when `/metrics` is scraped.
pub(crate) struct StorageMetrics {
    pub outcomes: AppendOutcomes,
    pub events_written: Counter,
    pub bytes_written: Counter,
    pub batch_events: Histogram,
    pub fsync_seconds: Histogram,
    pub reads: Counter,
    pub events_read: Counter,
}

impl StorageMetrics {
    pub fn new() -> Self {
        Self {
            outcomes: AppendOutcomes::new(),
            events_written: Counter::new(),
            bytes_written: Counter::new(),
            batch_events: Histogram::new(SIZE_BOUNDS),
            fsync_seconds: Histogram::new(DURATION_BOUNDS),
            reads: Counter::new(),
            events_read: Counter::new(),
        }
    }

    /// Counts one append's outcome.
    pub fn count_outcome(&self, outcome: &Result<skald_core::AppendResult, skald_core::Error>) {
        self.outcomes.count(outcome);
    }

    pub fn write(&self, out: &mut Exposition, head: u64, storage_bytes: u64, free: Option<u64>) {
        self.outcomes.write(out);
        out.single(
            "skald_events_written_total",
            Kind::Counter,
            "Events written.",
            self.events_written.get() as f64,
        );
        out.single(
            "skald_bytes_written_total",
            Kind::Counter,
            "Bytes written to segments.",
            self.bytes_written.get() as f64,
        );
        out.family(
            "skald_append_batch_events",
            Kind::Histogram,
            "Events per group commit (one write and one fdatasync).",
        );
        out.histogram("skald_append_batch_events", &[], &self.batch_events);
        out.family(
            "skald_fsync_duration_seconds",
            Kind::Histogram,
            "Time fdatasync took per group commit.",
        );
        out.histogram("skald_fsync_duration_seconds", &[], &self.fsync_seconds);
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
        out.single(
            "skald_storage_bytes",
            Kind::Gauge,
            "Bytes the store occupies (segments and index).",
            storage_bytes as f64,
        );
        if let Some(free) = free {
            out.single(
                "skald_disk_free_bytes",
                Kind::Gauge,
                "Bytes free for the store on the data directory's disk.",
                free as f64,
            );
        }
    }
}
