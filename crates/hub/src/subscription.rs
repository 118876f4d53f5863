//! Catch-up-then-live subscriptions: history from the store page by page, then live events
//! from the shared tail, with one cursor (a global position) so that nothing is missed or
//! delivered twice at the switch, or when a slow subscriber falls off the tail and back.

use std::sync::Arc;

use crate::live::{LiveTail, Take, Waiter};
use skald_core::{Direction, Error, EventStore, ReadRequest, ReadSource, RecordedEvent, Result};

/// Events per store read while catching up.
pub const CATCH_UP_PAGE: usize = 1024;
/// Most events handed over by one [`Subscription::next`] call from the live tail.
pub const LIVE_BATCH: usize = 512;

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first event there is.
    Beginning,
    /// The next event appended after subscribing.
    Now,
    /// The first matching event at or after this global position. `Last-Event-ID: P` resumes
    /// with `Position(P + 1)`.
    Position(u64),
    /// A stream subscription's first event at or after this revision.
    Revision(u64),
}

/// What a subscription hands over next.
#[derive(Debug)]
pub enum Delivery {
    /// Matching events, in position order, never empty.
    Events(Vec<Arc<RecordedEvent>>),
    /// Every matching event before `position` has been delivered; what follows is live.
    /// Sent each time the subscription reaches the live tail from the store.
    CaughtUp {
        /// The subscription's cursor.
        position: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Store,
    Live,
}

/// One subscriber's catch-up-then-live cursor over the store and the live tail.
pub struct Subscription<S> {
    store: Arc<S>,
    tail: Arc<LiveTail>,
    waiter: Waiter,
    source: ReadSource,
    /// Every matching event before this position has been delivered (or lies before the
    /// start); none at or after it has.
    cursor: u64,
    /// For stream subscriptions: the next revision to read from the store. It may trail the
    /// cursor (events below the cursor are dropped), never lead it.
    next_revision: u64,
    mode: Mode,
    announced_live: bool,
}

impl<S: EventStore> Subscription<S> {
    pub(crate) async fn start(
        store: Arc<S>,
        tail: Arc<LiveTail>,
        source: ReadSource,
        start: Start,
    ) -> Result<Self> {
        match (&source, start) {
            (ReadSource::Stream(_), _)
            | (_, Start::Beginning | Start::Now | Start::Position(_)) => {}
            (_, Start::Revision(_)) => {
                return Err(Error::invalid(
                    "a revision can only start a stream subscription; use a position",
                ));
            }
        }
        if let ReadSource::All(Some(query)) | ReadSource::Query(query) = &source {
            query.validate()?;
        }
        // Registered before the first read, so the tailer fills the tail from here on.
        let mut sub = Self {
            waiter: tail.register(&source),
            store,
            tail,
            source,
            cursor: 0,
            next_revision: 0,
            mode: Mode::Store,
            announced_live: false,
        };
        sub.seek(start).await?;
        Ok(sub)
    }

    /// The cursor: every matching event before it has been delivered.
    pub fn position(&self) -> u64 {
        self.cursor
    }

    async fn seek(&mut self, start: Start) -> Result<()> {
        match start {
            Start::Beginning => {}
            Start::Now => {
                if let ReadSource::Stream(stream) = &self.source {
                    // Read before the head, so the revision can only trail the cursor.
                    let head = self.store.stream_head(stream).await?;
                    self.next_revision = head.map_or(0, |h| h.revision.0 + 1);
                }
                self.cursor = self.store.next_position().await?;
            }
            Start::Position(position) => {
                self.cursor = position;
                if let ReadSource::Stream(stream) = &self.source {
                    let stream = stream.clone();
                    self.next_revision =
                        skald_core::first_revision_at(&*self.store, &stream, position).await?;
                }
            }
            Start::Revision(revision) => {
                // Every event of the stream below `revision` is skipped; events of other
                // streams do not matter. The cursor follows the first event read.
                self.next_revision = revision;
            }
        }
        Ok(())
    }

    /// The next delivery. Waits while there is nothing new; cancel-safe between deliveries
    /// (dropping the future loses nothing, since the cursor only moves when it resolves).
    pub async fn next(&mut self) -> Result<Delivery> {
        loop {
            match self.mode {
                Mode::Store => {
                    if let Some(events) = self.read_store_page().await? {
                        return Ok(Delivery::Events(events));
                    }
                }
                Mode::Live => match self.tail.take(self.cursor, LIVE_BATCH, &self.source) {
                    Take::Events(events, next) => {
                        if let Some(events) = self.accept_live(events, next) {
                            return Ok(Delivery::Events(events));
                        }
                    }
                    Take::Behind => {
                        self.mode = Mode::Store;
                        self.announced_live = false;
                    }
                    Take::Ahead(next) => {
                        self.cursor = next;
                        if !self.announced_live {
                            self.announced_live = true;
                            return Ok(Delivery::CaughtUp {
                                position: self.cursor,
                            });
                        }
                        self.waiter.woken().await;
                    }
                },
            }
        }
    }

    /// Reads one page from the store at the cursor. Returns the matching events, if any;
    /// switches to the live tail once the page shows the store has nothing more.
    async fn read_store_page(&mut self) -> Result<Option<Vec<Arc<RecordedEvent>>>> {
        // The head is read before the page: everything before it is in the page or does not
        // match, so the cursor may jump there when the page comes back short.
        let head = self.store.next_position().await?;
        let from = match self.source {
            ReadSource::Stream(_) => self.next_revision,
            _ => self.cursor,
        };
        let page = self
            .store
            .read(ReadRequest {
                source: self.source.clone(),
                from: Some(from),
                direction: Direction::Forward,
                limit: CATCH_UP_PAGE,
            })
            .await?;
        let full = page.next.is_some();
        if let Some(last) = page.events.last() {
            self.next_revision = last.revision.0 + 1;
        }
        let last_position = page.events.last().map(|e| e.position.0 + 1);
        let cursor = self.cursor;
        let events: Vec<_> = page
            .events
            .into_iter()
            .filter(|e| e.position.0 >= cursor)
            .map(Arc::new)
            .collect();
        if full {
            self.cursor = self
                .cursor
                .max(last_position.expect("a full page has events"));
        } else {
            self.cursor = self.cursor.max(head).max(last_position.unwrap_or(0));
            self.mode = Mode::Live;
        }
        Ok((!events.is_empty()).then_some(events))
    }

    /// Moves the cursor past the events the tail scanned and hands over the matching ones.
    fn accept_live(
        &mut self,
        matching: Vec<Arc<RecordedEvent>>,
        next: u64,
    ) -> Option<Vec<Arc<RecordedEvent>>> {
        debug_assert!(
            matching
                .iter()
                .all(|e| e.position.0 >= self.cursor && e.position.0 < next),
            "the tail hands over events between the cursor and the next cursor"
        );
        self.cursor = next;
        if let (ReadSource::Stream(_), Some(last)) = (&self.source, matching.last()) {
            self.next_revision = last.revision.0 + 1;
        }
        (!matching.is_empty()).then_some(matching)
    }
}

/// Whether `event` belongs to what `source` selects.
pub fn matches_source(source: &ReadSource, event: &RecordedEvent) -> bool {
    match source {
        ReadSource::Stream(stream) => event.stream == *stream,
        ReadSource::All(None) => true,
        ReadSource::All(Some(query)) | ReadSource::Query(query) => query.matches_event(event),
        ReadSource::Category(category) => event.stream.in_category(category),
    }
}
