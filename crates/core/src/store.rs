//! The backend-neutral store contract.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::{
    AppendRequest, AppendResult, Category, Limits, Position, Query, RecordedEvent, Result,
    Revision, StreamName,
};

/// The most events one [`EventStore::read`] call returns, whatever limit was asked for.
/// Larger reads are made of pages, so memory stays bounded however much is read.
pub const MAX_READ_PAGE: usize = 4096;

/// About the most bytes of events ([`RecordedEvent::size`]) one read page holds: a page ends
/// with the event that reaches it (so it always holds at least one) and then says where the
/// next page starts, as a full page does. Large events thus cost memory by bytes, not count.
pub const MAX_READ_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// Whether appends wait for their bytes to reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge only after fdatasync (or the backend's equivalent). The default.
    #[default]
    Fsync,
    /// Acknowledge after the write reaches the operating system. For tests and benchmarks only.
    None,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fsync => "fsync",
            Self::None => "none",
        })
    }
}

/// Reading forward (oldest first) or backward (newest first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first (stream reads only).
    Backward,
}

/// What a read selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// One stream, by revision.
    Stream(StreamName),
    /// The global log, by position, optionally filtered by a query.
    All(Option<Query>),
    /// Every stream of a category, by position.
    Category(Category),
    /// Events matching a DCB query, by position.
    Query(Query),
}

/// One page of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// What to read.
    pub source: ReadSource,
    /// Start here, inclusive: a revision for stream reads, a position otherwise. `None` means
    /// the start (forward) or the end (backward).
    pub from: Option<u64>,
    /// Forward or backward. Backward is only allowed for stream reads.
    pub direction: Direction,
    /// Most events to return; the store caps it at [`MAX_READ_PAGE`].
    pub limit: usize,
}

/// The result of one read call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPage {
    /// The events, in the order asked for.
    pub events: Vec<RecordedEvent>,
    /// The `from` to pass for the next page, or `None` when nothing more was there when this
    /// page was read.
    pub next: Option<u64>,
}

/// The last event of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamHead {
    /// The stream's last revision.
    pub revision: Revision,
    /// The global position of that event.
    pub position: Position,
}

/// A summary of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreInfo {
    /// Position of the last stored event, or `None` when the store is empty.
    pub head_position: Option<Position>,
    /// How appends are made durable.
    pub durability: Durability,
    /// Bytes the store occupies.
    pub storage_bytes: u64,
}

/// The contract every backend implements. Futures are `Send` so that servers can run them on
/// any worker thread.
pub trait EventStore: Send + Sync + 'static {
    /// Appends atomically, after checking the expected revision, the condition and idempotency.
    fn append(&self, request: AppendRequest) -> impl Future<Output = Result<AppendResult>> + Send;

    /// Reads one page.
    fn read(&self, request: ReadRequest) -> impl Future<Output = Result<ReadPage>> + Send;

    /// The last event of a stream, or `None` when it has none.
    fn stream_head(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<Option<StreamHead>>> + Send;

    /// A summary of the store.
    fn info(&self) -> impl Future<Output = Result<StoreInfo>> + Send;

    /// The position the next append will take, which is the number of events stored. Every
    /// event before it is visible to reads.
    fn next_position(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Resolves once the store holds more than `known` events (its next position is past
    /// `known`), with the new next position. Live subscriptions wait on this instead of
    /// polling.
    fn wait_for_append(&self, known: u64) -> impl Future<Output = Result<u64>> + Send;

    /// The limits this store enforces.
    fn limits(&self) -> &Limits;

    /// Writes the backend's own metrics (writes, syncs, reads, size) for `GET /metrics`. The
    /// default writes none.
    fn write_metrics(&self, _out: &mut crate::metrics::Exposition) {}

    /// Whether the store can take appends now, or why not (a failed disk, a full disk, a
    /// shutdown). `GET /health/ready` answers with it.
    fn readiness(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

impl ReadPage {
    /// A page of a stream read: its events, and the revision the next page starts at when the
    /// page is cut (full, or at the byte budget).
    pub fn of_stream(events: Vec<RecordedEvent>, limit: usize, direction: Direction) -> Self {
        let next = page_is_cut(&events, limit)
            .then(|| events.last().map(|e| e.revision.0))
            .flatten()
            .and_then(|last| match direction {
                Direction::Forward => Some(last + 1),
                Direction::Backward => last.checked_sub(1),
            });
        Self { events, next }
    }

    /// A page of a read by position (the log, a category, a query): its events, and the
    /// position the next page starts at when the page is cut.
    pub fn of_positions(events: Vec<RecordedEvent>, limit: usize) -> Self {
        let next = page_is_cut(&events, limit)
            .then(|| events.last().map(|e| e.position.0 + 1))
            .flatten();
        Self { events, next }
    }
}

/// The bytes of a page's events.
pub fn page_bytes(events: &[RecordedEvent]) -> usize {
    events.iter().map(RecordedEvent::size).sum()
}

/// Whether a page may have stopped before the end: it holds `limit` events, or reached
/// [`MAX_READ_PAGE_BYTES`].
pub fn page_is_cut(events: &[RecordedEvent], limit: usize) -> bool {
    limit > 0
        && !events.is_empty()
        && (events.len() >= limit || page_bytes(events) >= MAX_READ_PAGE_BYTES)
}

/// Ends the page with the event that reaches [`MAX_READ_PAGE_BYTES`].
pub fn truncate_to_budget(events: &mut Vec<RecordedEvent>) {
    let mut bytes = 0;
    if let Some(end) = events.iter().position(|e| {
        bytes += e.size();
        bytes >= MAX_READ_PAGE_BYTES
    }) {
        events.truncate(end + 1);
    }
}

/// One page of a DCB query from the pages of its items: each item's events from the same
/// position, in position order, at most `limit` of them and cut at the byte budget. Past the
/// last event of an item whose page was cut, events of that item may be missing, so the page
/// ends there; events matching several items appear once.
pub fn merge_query_items(items: Vec<Vec<RecordedEvent>>, limit: usize) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut complete_to: Option<u64> = None;
    for mut found in items {
        if page_is_cut(&found, limit)
            && let Some(last) = found.last()
        {
            complete_to = Some(complete_to.map_or(last.position.0, |p| p.min(last.position.0)));
        }
        out.append(&mut found);
    }
    out.sort_unstable_by_key(|e| e.position);
    out.dedup_by_key(|e| e.position);
    if let Some(last) = complete_to {
        out.retain(|e| e.position.0 <= last);
    }
    truncate_to_budget(&mut out);
    out.truncate(limit);
    out
}

/// The lowest revision of `stream` whose position is at least `position` (the stream's next
/// revision when none is): a binary search over one-event reads, since positions grow with
/// revisions within a stream. How a stream is read from a global position.
pub async fn first_revision_at<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamName,
    position: u64,
) -> Result<u64> {
    let Some(head) = store.stream_head(stream).await? else {
        return Ok(0);
    };
    let (mut low, mut high) = (0, head.revision.0 + 1);
    while low < high {
        let mid = low + (high - low) / 2;
        let page = store
            .read(ReadRequest {
                source: ReadSource::Stream(stream.clone()),
                from: Some(mid),
                direction: Direction::Forward,
                limit: 1,
            })
            .await?;
        match page.events.first() {
            Some(e) if e.position.0 < position => low = mid + 1,
            _ => high = mid,
        }
    }
    Ok(low)
}

/// Reads `source` forward from its start to what is stored now, page by page, handing each
/// event to `each`: memory stays bounded by one page. For loading state kept in system streams.
pub async fn read_to_end<S: EventStore + ?Sized>(
    store: &S,
    source: ReadSource,
    each: impl FnMut(&RecordedEvent),
) -> Result<()> {
    read_to_end_by(store, source, MAX_READ_PAGE, each).await
}

/// [`read_to_end`] in pages of at most `page_size` events, for sources whose events may be large
/// (a page is held whole while its events are handed over).
pub async fn read_to_end_by<S: EventStore + ?Sized>(
    store: &S,
    source: ReadSource,
    page_size: usize,
    mut each: impl FnMut(&RecordedEvent),
) -> Result<()> {
    let mut from = 0;
    loop {
        let page = store
            .read(ReadRequest {
                source: source.clone(),
                from: Some(from),
                direction: Direction::Forward,
                limit: page_size.clamp(1, MAX_READ_PAGE),
            })
            .await?;
        page.events.iter().for_each(&mut each);
        match page.next {
            Some(next) if !page.events.is_empty() => from = next,
            _ => return Ok(()),
        }
    }
}
