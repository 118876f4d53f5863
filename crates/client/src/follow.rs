//! What projections, process managers and the aggregate helpers share: a forward walk over a
//! source, the wait for the next append, and the last event of a stream.

use std::future::Future;

use skald_core::{
    Direction, EventStore, Position, ReadRequest, ReadSource, RecordedEvent, StreamName,
};

/// Reads a source forward, a page at a time, from just after a checkpoint to what is stored
/// when it is read: the walk of projections, process managers and DCB decisions.
pub(crate) struct Cursor {
    source: ReadSource,
    from: u64,
    done: bool,
}

impl Cursor {
    /// From the first event after `checkpoint` (from the first event there is, without one).
    pub(crate) fn after(source: ReadSource, checkpoint: Option<Position>) -> Self {
        Self {
            source,
            from: checkpoint.map_or(0, |p| p.0 + 1),
            done: false,
        }
    }

    /// The next page of up to `limit` events (possibly none, when a filtered source scanned
    /// past events it does not return), or `None` once the source held nothing more.
    pub(crate) async fn next<S: EventStore>(
        &mut self,
        store: &S,
        limit: usize,
    ) -> skald_core::Result<Option<Vec<RecordedEvent>>> {
        if self.done {
            return Ok(None);
        }
        let asked = self.from;
        let page = store
            .read(ReadRequest {
                source: self.source.clone(),
                from: Some(asked),
                direction: Direction::Forward,
                limit,
            })
            .await?;
        if let Some(last) = page.events.last() {
            self.from = last.position.0 + 1;
        }
        match page.next {
            Some(next) if next > asked => self.from = self.from.max(next),
            _ => self.done = true,
        }
        Ok(Some(page.events))
    }
}

/// Waits until `stop` resolves (true) or the store holds more than `known` events (false).
/// `known` is taken before the read that came up empty, so an append that landed while it
/// ran still ends the wait.
pub(crate) async fn stopped_or_appended<S: EventStore>(
    store: &S,
    known: u64,
    stop: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> skald_core::Result<bool> {
    tokio::select! {
        () = stop => Ok(true),
        woke = store.wait_for_append(known) => woke.map(|_| false),
    }
}

/// The newest event of `stream`, or `None` when it has none.
pub(crate) async fn last_event<S: EventStore>(
    store: &S,
    stream: &StreamName,
) -> skald_core::Result<Option<RecordedEvent>> {
    let page = store
        .read(ReadRequest {
            source: ReadSource::Stream(stream.clone()),
            from: None,
            direction: Direction::Backward,
            limit: 1,
        })
        .await?;
    Ok(page.events.into_iter().next())
}
