//! Projections: events handled into a read model that keeps its own checkpoint, run from the
//! checkpoint onwards, catch-up then live, over any [`EventStore`].
//!
//! The contract that makes the effects exactly-once: [`Projection::apply`] writes what a batch
//! of events changes *and* the batch's checkpoint in one transaction of the read model's
//! database, and commits only if the stored checkpoint is still the one the batch follows
//! (compare-and-set). After a crash either both are there or neither is, and the [`Projector`]
//! starts again after the checkpoint it reads back, so no event is applied twice or skipped.
//! The compare-and-set is what keeps this true when two runners feed one read model (two
//! replicas, or a restart that overlaps the old process): the second to commit a batch finds
//! the checkpoint moved, rolls back, and its runner stops with the projection's error.
//! A read model that cannot compare-and-set its checkpoint must run one projector at a time;
//! a [`Lease`](crate::lease::Lease) held around the runner keeps it to one.
//!
//! [`Projector::run`] rides out a store that cannot be reached (a server restarting, a
//! network that drops): it tries again with capped back-off, without end by default
//! ([`Projector::retry`] sets a limit), and carries on from the checkpoint the read model
//! holds. Any other error stops it.

use std::fmt;
use std::future::Future;

use crate::RetryPolicy;
use crate::event::{CodecError, Envelope, Event};
use crate::follow::{Cursor, Stop, back_off, stopped_or_appended};
use skald_core::{Error, EventStore, MAX_READ_PAGE, Position, ReadSource};

/// A read model fed by events, decoded. Its state and its checkpoint live in the same
/// database.
pub trait Projection: Send {
    /// The events it takes in; events of the source of any other type are passed over (use
    /// [`AnyEvent`](crate::event::AnyEvent) to take in every one).
    type Event: Event;
    /// Why the read model could not be read or written.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The events it is built from: the global log, a category, a DCB query.
    fn source(&self) -> ReadSource;

    /// The position of the last event applied, as stored with the read model; `None` before
    /// the first.
    fn checkpoint(&mut self) -> impl Future<Output = Result<Option<Position>, Self::Error>> + Send;

    /// Applies `events` (in log order, all after `previous`) and stores `checkpoint` in one
    /// transaction: both or neither. `checkpoint` is the position of the last event of the
    /// source read, at or after the last of `events`; `events` may be empty when the source
    /// held only events of other types, and the checkpoint must still be stored. The
    /// transaction must commit only if the stored checkpoint is still `previous` (`None`:
    /// none stored), and otherwise fail: another runner applied these events already.
    fn apply(
        &mut self,
        events: &[Envelope<Self::Event>],
        previous: Option<Position>,
        checkpoint: Position,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Empties the read model and forgets the checkpoint, in one transaction, so that a
    /// rebuild starts from the first event.
    fn reset(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Why a projection stopped.
#[derive(Debug)]
pub enum ProjectionError<E> {
    /// The store failed, or refused the read.
    Store(Error),
    /// An event of one of the projection's types did not decode: fix the type or add an
    /// upcaster, then run it again.
    Codec(CodecError),
    /// The read model failed; nothing of the batch it was applying is kept.
    Projection(E),
}

impl<E: fmt::Display> fmt::Display for ProjectionError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "reading events failed: {e}"),
            Self::Codec(e) => write!(f, "{e}"),
            Self::Projection(e) => write!(f, "the read model failed: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ProjectionError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            Self::Codec(e) => Some(e),
            Self::Projection(e) => Some(e),
        }
    }
}

/// Runs a [`Projection`] over a store: reads from its checkpoint on and hands it the events in
/// batches, one transaction each. It owns the store handle (a [`Client`](crate::Client) or an
/// embedded store, both cheap to clone) and the projection, so it can be spawned.
pub struct Projector<S, P> {
    store: S,
    projection: P,
    batch: usize,
    retry: RetryPolicy,
}

impl<S: EventStore, P: Projection> Projector<S, P> {
    /// Runs `projection` over `store`, 256 events per transaction.
    pub fn new(store: S, projection: P) -> Self {
        Self {
            store,
            projection,
            batch: 256,
            retry: RetryPolicy::forever(),
        }
    }

    /// How [`Projector::run`] tries again when the store cannot be reached; without end
    /// ([`RetryPolicy::forever`]) when not set.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// At most `events` per call of [`Projection::apply`] (one transaction); between 1 and
    /// the read page limit.
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.clamp(1, MAX_READ_PAGE);
        self
    }

    /// The projection, to query the read model.
    pub fn projection(&mut self) -> &mut P {
        &mut self.projection
    }

    /// The projection, with the runner gone.
    pub fn into_inner(self) -> P {
        self.projection
    }

    /// Applies every event stored now after the checkpoint; returns the new checkpoint.
    pub async fn catch_up(&mut self) -> Result<Option<Position>, ProjectionError<P::Error>> {
        let checkpoint = self
            .projection
            .checkpoint()
            .await
            .map_err(ProjectionError::Projection)?;
        self.drain(checkpoint).await
    }

    /// Empties the read model and applies every event from the first; returns the checkpoint.
    pub async fn rebuild(&mut self) -> Result<Option<Position>, ProjectionError<P::Error>> {
        self.projection
            .reset()
            .await
            .map_err(ProjectionError::Projection)?;
        self.catch_up().await
    }

    /// Catches up, then applies events as they are appended, until `stop` resolves (between
    /// two transactions: a batch is never cut short) or something fails. A store that cannot
    /// be reached is tried again as [`Projector::retry`] says.
    pub async fn run(
        &mut self,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<Position>, ProjectionError<P::Error>> {
        let mut stop = Stop::new(stop);
        let mut attempt = 1;
        loop {
            match self.follow(&mut stop, &mut attempt).await {
                Err(ProjectionError::Store(error)) => {
                    let again = back_off(&self.retry, &mut attempt, error, &mut stop)
                        .await
                        .map_err(ProjectionError::Store)?;
                    if !again {
                        return self
                            .projection
                            .checkpoint()
                            .await
                            .map_err(ProjectionError::Projection);
                    }
                }
                done => return done,
            }
        }
    }

    /// From the checkpoint the read model holds, applies what is stored and then what is
    /// appended, until `stop` (`Ok`) or an error; resets `attempt` after each pass that read.
    async fn follow<F: Future<Output = ()>>(
        &mut self,
        stop: &mut Stop<F>,
        attempt: &mut u32,
    ) -> Result<Option<Position>, ProjectionError<P::Error>> {
        let mut checkpoint = self
            .projection
            .checkpoint()
            .await
            .map_err(ProjectionError::Projection)?;
        loop {
            let known = self
                .store
                .next_position()
                .await
                .map_err(ProjectionError::Store)?;
            checkpoint = self.drain(checkpoint).await?;
            *attempt = 1;
            if stopped_or_appended(&self.store, known, stop)
                .await
                .map_err(ProjectionError::Store)?
            {
                return Ok(checkpoint);
            }
        }
    }

    /// Applies what is stored after `checkpoint`, a batch at a time.
    async fn drain(
        &mut self,
        mut checkpoint: Option<Position>,
    ) -> Result<Option<Position>, ProjectionError<P::Error>> {
        let mut cursor = Cursor::after(self.projection.source(), checkpoint);
        while let Some(page) = cursor
            .next(&self.store, self.batch)
            .await
            .map_err(ProjectionError::Store)?
        {
            // Never an event at or before the checkpoint, whatever the source returns.
            let mut last = None;
            let mut events = Vec::with_capacity(page.len());
            for recorded in page {
                if checkpoint.is_some_and(|c| recorded.position <= c) {
                    continue;
                }
                last = Some(recorded.position);
                if let Some(event) = Envelope::decode(recorded).map_err(ProjectionError::Codec)? {
                    events.push(event);
                }
            }
            if let Some(last) = last {
                self.projection
                    .apply(&events, checkpoint, last)
                    .await
                    .map_err(ProjectionError::Projection)?;
                checkpoint = Some(last);
            }
        }
        Ok(checkpoint)
    }
}
