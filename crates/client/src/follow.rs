//! What projections, process managers and the aggregate helpers share: a forward walk over a
//! source, the wait for the next append, and the last event of a stream.

use std::future::Future;

use skald_core::{
    Direction, EventStore, Position, ReadRequest, ReadSource, RecordedEvent, StreamName,
};

/// Reads a source forward, a page at a time, from just after a checkpoint to what is stored
/// when it is read: the walk of projections, process managers and DCB decisions.
///
/// The checkpoint is a global position whatever the source. A stream is read by revision, so
/// for a stream source the cursor first finds the stream's first revision after the checkpoint
/// (positions grow with revisions within a stream), then moves by revisions.
pub(crate) struct Cursor {
    source: ReadSource,
    checkpoint: Option<Position>,
    /// The next `from`: a revision for a stream source once `resolved`, a position otherwise.
    from: u64,
    resolved: bool,
    done: bool,
}

impl Cursor {
    /// From the first event after `checkpoint` (from the first event there is, without one).
    pub(crate) fn after(source: ReadSource, checkpoint: Option<Position>) -> Self {
        let by_revision = matches!(source, ReadSource::Stream(_));
        Self {
            source,
            checkpoint,
            from: if by_revision {
                0
            } else {
                checkpoint.map_or(0, |p| p.0 + 1)
            },
            resolved: !by_revision || checkpoint.is_none(),
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
        if !self.resolved {
            if let (ReadSource::Stream(stream), Some(checkpoint)) = (&self.source, self.checkpoint)
            {
                self.from = skald_core::first_revision_at(store, stream, checkpoint.0 + 1).await?;
            }
            self.resolved = true;
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
            self.from = match self.source {
                ReadSource::Stream(_) => last.revision.0 + 1,
                _ => last.position.0 + 1,
            };
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
pub(crate) async fn stopped_or_appended<S: EventStore, F: Future<Output = ()>>(
    store: &S,
    known: u64,
    stop: &mut Stop<F>,
) -> skald_core::Result<bool> {
    tokio::select! {
        () = stop.wait() => Ok(true),
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

/// A runner's stop signal, which may be waited on more than once: once it has resolved, it
/// stays resolved (a bare future may not be polled again after it completed).
pub(crate) struct Stop<F> {
    future: Option<std::pin::Pin<Box<F>>>,
}

impl<F: Future<Output = ()>> Stop<F> {
    pub(crate) fn new(future: F) -> Self {
        Self {
            future: Some(Box::pin(future)),
        }
    }

    /// Resolves when the signal has been given (at once, if it was before).
    pub(crate) async fn wait(&mut self) {
        if let Some(future) = &mut self.future {
            future.as_mut().await;
            self.future = None;
        }
    }
}

impl Stop<std::future::Pending<()>> {
    /// A signal that is never given.
    pub(crate) fn never() -> Self {
        Self::new(std::future::pending())
    }
}

/// After try number `attempt` failed with `error`: waits out `policy`'s delay and counts the
/// next try (`Ok(true)`), returns `Ok(false)` when `stop` came first, or hands the error back
/// when it is not about reaching the store or the policy gave up.
pub(crate) async fn back_off<F: Future<Output = ()>>(
    policy: &crate::RetryPolicy,
    attempt: &mut u32,
    error: skald_core::Error,
    stop: &mut Stop<F>,
) -> skald_core::Result<bool> {
    tokio::select! {
        () = stop.wait() => Ok(false),
        again = policy.again(attempt, error) => again.map(|()| true),
    }
}
