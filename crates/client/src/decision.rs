//! DCB decisions: the state folded from the events a query matches, and an append on the
//! condition that none arrived since. By hand ([`Decision::build`]) or typed ([`StateQuery`],
//! [`Decider`]). Re-exported from [`crate::aggregate`].

use std::fmt;

use skald_core::{
    AppendCondition, AppendRequest, AppendResult, Error, EventStore, ExpectedRevision,
    MAX_READ_PAGE, Position, Query, ReadSource, RecordedEvent, StreamName,
};

use crate::event::{CodecError, Envelope, Event, propose};
use crate::follow::Cursor;

/// A DCB decision: the state folded from every event matching a query, and the position it was
/// read to. Appending with [`Decision::condition`] fails if a matching event arrived since, so
/// the decision holds without an aggregate (unique usernames, seat bookings).
#[derive(Debug)]
pub struct Decision<T> {
    /// The folded state.
    pub state: T,
    query: Query,
    after: Option<Position>,
}

impl<T> Decision<T> {
    /// Reads every event matching `query` and folds it into `initial` with `fold`.
    pub async fn build<S: EventStore>(
        store: &S,
        query: Query,
        initial: T,
        mut fold: impl FnMut(T, &RecordedEvent) -> T,
    ) -> skald_core::Result<Self> {
        let mut state = initial;
        let mut after = None;
        let mut cursor = Cursor::after(ReadSource::Query(query.clone()), None);
        while let Some(page) = cursor.next(store, MAX_READ_PAGE).await? {
            for event in &page {
                state = fold(state, event);
                after = Some(event.position);
            }
        }
        // Nothing matched: the condition holds until anything matching appears.
        Ok(Self {
            state,
            query,
            after,
        })
    }

    /// The condition that keeps this decision true: no new event matching the query.
    pub fn condition(&self) -> AppendCondition {
        AppendCondition {
            query: self.query.clone(),
            after: self.after,
        }
    }
}

/// The state a typed DCB decision needs, folded from the events its query matches: a
/// consistency boundary drawn by event types and tags instead of a stream.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use skald_client::aggregate::{CodecError, Envelope, Event, StateQuery, tag};
/// # use skald_client::skald_core::Query;
/// #[derive(Event, Serialize, Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum NameEvent {
///     Claimed { #[tag("username")] name: String, user: String },
/// }
///
/// /// Who holds a username.
/// struct Holder { name: String, by: Option<String> }
///
/// impl StateQuery for Holder {
///     type Event = NameEvent;
///     type Error = std::convert::Infallible;
///     fn query(&self) -> Result<Query, CodecError> {
///         Ok(NameEvent::query(vec![tag("username", &self.name)?]))
///     }
///     fn fold(&mut self, event: Envelope<NameEvent>) -> Result<(), Self::Error> {
///         let NameEvent::Claimed { user, .. } = event.event;
///         self.by = Some(user);
///         Ok(())
///     }
/// }
/// ```
pub trait StateQuery: Send + Sync {
    /// The events it folds (often an enum of just the events of its boundary).
    type Event: Event;
    /// Why an event cannot be folded: the history breaks a rule the state relies on.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The boundary: built with [`Event::query`] or [`Event::query_item`] from the types of
    /// [`StateQuery::Event`] and the tags that pick this decision's events.
    fn query(&self) -> Result<Query, CodecError>;

    /// Takes in one event of the boundary, oldest first.
    fn fold(&mut self, event: Envelope<Self::Event>) -> Result<(), Self::Error>;
}

/// Why a typed DCB decision did not append.
#[derive(Debug)]
pub enum DecideError<F, R> {
    /// The decision turned the command down.
    Rejected(R),
    /// An event of the boundary could not be folded.
    Fold(F),
    /// An event of the boundary did not decode, or a new one did not encode.
    Codec(CodecError),
    /// Every try was overtaken: an event matching the boundary arrived between the read and
    /// the append each time.
    Contended {
        /// The tries made.
        attempts: u32,
    },
    /// The store failed, or refused the read or the append.
    Store(Error),
}

impl<F: fmt::Display, R: fmt::Display> fmt::Display for DecideError<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(e) => write!(f, "the command was rejected: {e}"),
            Self::Fold(e) => write!(f, "an event of the boundary could not be folded: {e}"),
            Self::Codec(e) => write!(f, "{e}"),
            Self::Contended { attempts } => write!(
                f,
                "the decision was overtaken by other writers {attempts} times; try again"
            ),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

impl<F, R> std::error::Error for DecideError<F, R>
where
    F: std::error::Error + 'static,
    R: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Rejected(e) => Some(e),
            Self::Fold(e) => Some(e),
            Self::Codec(e) => Some(e),
            Self::Store(e) => Some(e),
            Self::Contended { .. } => None,
        }
    }
}

impl<Q: StateQuery> Decision<Q> {
    /// Folds `state` from every event its [`StateQuery::query`] matches, oldest first.
    pub async fn fold<S: EventStore, R>(
        store: &S,
        mut state: Q,
    ) -> Result<Self, DecideError<Q::Error, R>> {
        let query = state.query().map_err(DecideError::Codec)?;
        let mut after = None;
        let mut cursor = Cursor::after(ReadSource::Query(query.clone()), None);
        while let Some(page) = cursor
            .next(store, MAX_READ_PAGE)
            .await
            .map_err(DecideError::Store)?
        {
            for recorded in page {
                let position = recorded.position;
                if let Some(envelope) = Envelope::decode(recorded).map_err(DecideError::Codec)? {
                    state.fold(envelope).map_err(DecideError::Fold)?;
                }
                after = Some(position);
            }
        }
        Ok(Self {
            state,
            query,
            after,
        })
    }
}

/// Makes typed DCB decisions over a store: folds the state, decides, and appends on the
/// condition that nothing matching the boundary arrived since; when something did, decides
/// again on what is stored then.
pub struct Decider<'a, S> {
    store: &'a S,
    attempts: u32,
}

impl<'a, S: EventStore> Decider<'a, S> {
    /// Decisions over `store`, tried up to 5 times when overtaken.
    pub fn new(store: &'a S) -> Self {
        Self { store, attempts: 5 }
    }

    /// Tries in all when overtaken (at least 1).
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// Folds a fresh state from `make`, decides with `decide`, and appends what it decided to
    /// `stream` (with each event's tags) on the decision's condition. Nothing decided is
    /// `Ok(None)`. A decision overtaken by a matching append is made again on a fresh state.
    pub async fn execute<Q, E, R>(
        &self,
        make: impl Fn() -> Q,
        stream: &StreamName,
        decide: impl Fn(&Q) -> Result<Vec<E>, R>,
    ) -> Result<Option<AppendResult>, DecideError<Q::Error, R>>
    where
        Q: StateQuery,
        E: Event,
    {
        for _ in 0..self.attempts {
            let decision = Decision::fold(self.store, make()).await?;
            let events = decide(&decision.state).map_err(DecideError::Rejected)?;
            if events.is_empty() {
                return Ok(None);
            }
            let proposed = events
                .iter()
                .map(propose)
                .collect::<Result<Vec<_>, _>>()
                .map_err(DecideError::Codec)?;
            match self
                .store
                .append(AppendRequest {
                    stream: stream.clone(),
                    expected: ExpectedRevision::Any,
                    condition: Some(decision.condition()),
                    events: proposed,
                })
                .await
            {
                Ok(result) => return Ok(Some(result)),
                Err(Error::ConditionFailed { .. }) => continue,
                Err(e) => return Err(DecideError::Store(e)),
            }
        }
        Err(DecideError::Contended {
            attempts: self.attempts,
        })
    }
}
