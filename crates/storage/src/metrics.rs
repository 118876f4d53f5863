//! What the embedded engine counts for `GET /metrics`, and its readiness checks.

use skald_core::metrics::{Counter, DURATION_BOUNDS, Exposition, Histogram, Kind, StoreCounters};

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
    /// What every backend counts.
    pub store: StoreCounters,
    pub bytes_written: Counter,
    pub fsync_seconds: Histogram,
}

impl StorageMetrics {
    pub fn new() -> Self {
        Self {
            store: StoreCounters::new(),
            bytes_written: Counter::new(),
            fsync_seconds: Histogram::new(DURATION_BOUNDS),
        }
    }

    /// Counts one append's outcome.
    pub fn count_outcome(&self, outcome: &Result<skald_core::AppendResult, skald_core::Error>) {
        self.store.outcomes.count(outcome);
    }

    pub fn write(&self, out: &mut Exposition, head: u64, storage_bytes: u64, free: Option<u64>) {
        self.store.write(out, head);
        out.single(
            "skald_bytes_written_total",
            Kind::Counter,
            "Bytes written to segments.",
            self.bytes_written.get() as f64,
        );
        out.family(
            "skald_fsync_duration_seconds",
            Kind::Histogram,
            "Time fdatasync took per group commit.",
        );
        out.histogram("skald_fsync_duration_seconds", &[], &self.fsync_seconds);
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
