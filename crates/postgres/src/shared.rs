//! What a node's store handle, writer and tailer share.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use skald_core::metrics::{Histogram, StoreCounters};
use skald_core::{Clock, Error};
use tokio::sync::watch;

use crate::conn::{Conn, PgOptions};

pub(crate) struct Shared {
    pub(crate) options: PgOptions,
    pub(crate) clock: Arc<dyn Clock>,
    /// The next position as this node knows it: every event before it is committed.
    pub(crate) head: watch::Sender<u64>,
    pub(crate) readers: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    pub(crate) next_reader: AtomicUsize,
    /// Why the tailer, which reads the head every poll interval, cannot reach the database
    /// now: what `/health/ready` answers.
    pub(crate) trouble: Mutex<Option<String>>,
    /// Set for good when the log was found shorter than this node had seen it.
    pub(crate) alarm: Mutex<Option<String>>,
    pub(crate) metrics: PgMetrics,
}

/// What a node on PostgreSQL counts for `GET /metrics`: what every backend counts, and the
/// append call's time in place of fdatasync's.
pub(crate) struct PgMetrics {
    pub(crate) store: StoreCounters,
    pub(crate) call_seconds: Histogram,
    /// The size of the schema's tables with their indexes and TOAST, as last measured (the
    /// tailer measures it every `SIZE_EVERY`; `info` too); `u64::MAX` until then.
    pub(crate) storage_bytes: std::sync::atomic::AtomicU64,
}

/// The schema's size on disk: every table of `skald` with its indexes and TOAST.
pub(crate) const SIZE_QUERY: &str = "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = 'skald' AND c.relkind = 'r'";

/// How often the tailer measures the schema's size for `skald_storage_bytes`.
pub(crate) const SIZE_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

impl Shared {
    pub(crate) fn failed(&self, e: &Error) {
        *self.trouble.lock().expect("trouble lock") = Some(e.to_string());
    }

    pub(crate) fn recovered(&self) {
        *self.trouble.lock().expect("trouble lock") = None;
    }

    /// Moves this node's head forward to `next` (never back).
    pub(crate) fn advance(&self, next: u64) {
        self.head.send_if_modified(|head| {
            let moved = next > *head;
            *head = (*head).max(next);
            moved
        });
    }
}
