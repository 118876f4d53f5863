//! A lease kept in Skald: at most one holder at a time runs what it guards, for runners whose
//! read model cannot compare-and-set its checkpoint (a search index, a cache, an outbox).
//!
//! The lease named `NAME` is the stream `lease-NAME`. Taking it appends `LeaseTaken` at the
//! revision the taker read; renewing appends another at the holder's own last revision;
//! releasing appends `LeaseReleased`. Every append names the revision it follows, so of two
//! that race, one fails and only one holds.
//!
//! No clocks are compared, only durations. A holder holds until `ttl` minus a margin of a
//! quarter of it has passed since it *first sent* its last successful take or renewal; it
//! renews every quarter of `ttl`. Another runner takes a lease that is not released only after
//! it has watched its stream stay at one revision for a whole `ttl` (the longer of its own
//! and the one the holder wrote), which begins after that revision was appended. A renewal's
//! event id is derived from the revision it follows, so one whose answer was lost is answered
//! as a replay when sent again, not as a lease taken by someone else. So the two never overlap as long as clocks run at about the same
//! rate (a quarter of `ttl` apart at most over one `ttl`) and the holder's work stops when
//! [`Lease::hold`] drops it. Work that blocks a thread, or a process paused for longer
//! than the margin, is beyond any lease: use a compare-and-set checkpoint for those.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skald_core::{
    AppendRequest, Error, EventData, EventStore, EventType, ExpectedRevision, ProposedEvent,
    Revision, StreamName,
};
use tokio::time::Instant;

use crate::follow::last_event;

/// The data of a `LeaseTaken` event.
#[derive(Serialize, Deserialize)]
struct Taken {
    holder: String,
    #[serde(rename = "ttlMs")]
    ttl_ms: u64,
}

const TAKEN: &str = "LeaseTaken";
const RELEASED: &str = "LeaseReleased";

/// Why a lease was not taken or not kept.
#[derive(Debug)]
pub enum LeaseError {
    /// Another runner took it: the holder must have stopped what it guards.
    Lost {
        /// The lease's name.
        name: String,
        /// Who holds it now, when known.
        holder: Option<String>,
    },
    /// It could not be renewed in time: the store did not answer before the lease ran out.
    Expired {
        /// The lease's name.
        name: String,
        /// The last error of a renewal.
        error: Error,
    },
    /// The store failed, or refused the read or the append.
    Store(Error),
}

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lost { name, holder } => match holder {
                Some(holder) => write!(f, "lease {name:?} was taken by {holder:?}"),
                None => write!(f, "lease {name:?} was taken by another runner"),
            },
            Self::Expired { name, error } => write!(
                f,
                "lease {name:?} ran out before it could be renewed (last error: {error})"
            ),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LeaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Expired { error, .. } | Self::Store(error) => Some(error),
            Self::Lost { .. } => None,
        }
    }
}

/// A lease held by this runner. Drop it without [`Lease::release`] and another runner takes
/// it once `ttl` has passed.
pub struct Lease<'a, S> {
    store: &'a S,
    name: String,
    stream: StreamName,
    holder: String,
    ttl: Duration,
    revision: Revision,
    /// When the take or renewal that holds now was first sent.
    sent: Instant,
    /// When a renewal after `revision` was first sent, while none has been answered.
    renewing: Option<Instant>,
}

impl<S> fmt::Debug for Lease<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl<'a, S: EventStore> Lease<'a, S> {
    /// Waits until `holder` (a name for this runner, unique among them, such as host and
    /// process id) holds the lease `name`, and returns it. A lease released, or left without
    /// a renewal for `ttl`, is taken; `ttl` is at least 100 ms.
    pub async fn acquire(
        store: &'a S,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Self, LeaseError> {
        let ttl = ttl.max(Duration::from_millis(100));
        let stream = StreamName::new(format!("lease-{name}")).map_err(LeaseError::Store)?;
        // The revision last seen, and since when it has not moved.
        let mut watched: Option<(Revision, Instant)> = None;
        loop {
            let last = last_event(store, &stream)
                .await
                .map_err(LeaseError::Store)?;
            let (expected, free) = match &last {
                None => (ExpectedRevision::NoStream, true),
                Some(event) => {
                    let released = event.event_type.as_str() == RELEASED;
                    // The holder's own ttl, when it is longer than ours.
                    let wait = serde_json::from_slice::<Taken>(event.data.bytes())
                        .map_or(ttl, |t| ttl.max(Duration::from_millis(t.ttl_ms)));
                    let still = match watched {
                        Some((revision, since)) if revision == event.revision => {
                            since.elapsed() >= wait
                        }
                        _ => {
                            watched = Some((event.revision, Instant::now()));
                            false
                        }
                    };
                    (ExpectedRevision::Exact(event.revision), released || still)
                }
            };
            if free {
                let sent = Instant::now();
                match append(store, &stream, expected, holder, ttl, TAKEN, None).await {
                    Ok(revision) => {
                        return Ok(Self {
                            store,
                            name: name.to_owned(),
                            stream,
                            holder: holder.to_owned(),
                            ttl,
                            revision,
                            sent,
                            renewing: None,
                        });
                    }
                    // Someone else was quicker; watch again from what they wrote.
                    Err(Error::WrongExpectedRevision { .. }) => watched = None,
                    Err(e) => return Err(LeaseError::Store(e)),
                }
                continue;
            }
            tokio::time::sleep(ttl / 4).await;
        }
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Until when this runner may act on the lease: `ttl` less a quarter after its last
    /// successful take or renewal was sent.
    pub fn valid_until(&self) -> Instant {
        self.sent + self.ttl - self.ttl / 4
    }

    /// Renews the lease once. [`LeaseError::Lost`] when another runner took it. A renewal
    /// sent again after an error is the same event, so one that landed unanswered is not
    /// mistaken for someone else's.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        let sent = *self.renewing.get_or_insert_with(Instant::now);
        let id = skald_core::EventId(uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "{}/{}/{}",
                self.stream.as_str(),
                self.holder,
                self.revision.0
            )
            .as_bytes(),
        ));
        match append(
            self.store,
            &self.stream,
            ExpectedRevision::Exact(self.revision),
            &self.holder,
            self.ttl,
            TAKEN,
            Some(id),
        )
        .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.sent = sent;
                self.renewing = None;
                Ok(())
            }
            Err(Error::WrongExpectedRevision { .. }) => Err(self.lost().await),
            Err(e) => Err(LeaseError::Store(e)),
        }
    }

    /// Runs `work` while holding the lease, renewing it every quarter of `ttl`; returns what
    /// `work` returns, or an error (with `work` dropped, and so stopped) when the lease is
    /// lost or could not be renewed before [`Lease::valid_until`].
    pub async fn hold<F: Future>(&mut self, work: F) -> Result<F::Output, LeaseError> {
        let expired = |name: &str, why: &str| LeaseError::Expired {
            name: name.to_owned(),
            error: Error::Unavailable(why.to_owned()),
        };
        // Entered late (after a slow start, or a second time): renew before any work.
        if Instant::now() + self.ttl / 8 >= self.valid_until() {
            let deadline = self.valid_until();
            match tokio::time::timeout_at(deadline, self.renew()).await {
                Ok(renewed) => renewed?,
                Err(_) => return Err(expired(&self.name, "the renewal was not answered in time")),
            }
        }
        tokio::pin!(work);
        let mut next = Instant::now() + self.ttl / 4;
        loop {
            tokio::select! {
                // Expiry first: work is never polled past the lease.
                biased;
                () = tokio::time::sleep_until(self.valid_until()) => {
                    return Err(expired(&self.name, "no renewal was answered in time"));
                }
                () = tokio::time::sleep_until(next) => {}
                output = &mut work => return Ok(output),
            }
            let deadline = self.valid_until();
            let renewed = tokio::select! {
                biased;
                renewed = tokio::time::timeout_at(deadline, self.renew()) => renewed,
                output = &mut work => return Ok(output),
            };
            match renewed {
                Ok(Ok(())) => next = Instant::now() + self.ttl / 4,
                Ok(Err(LeaseError::Store(Error::Unavailable(_)))) => {
                    // Try again soon, while the lease lasts.
                    next = Instant::now() + self.ttl / 16;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(expired(&self.name, "the renewal was not answered in time")),
            }
        }
    }

    /// Gives the lease up, so that another runner takes it at once.
    pub async fn release(self) -> Result<(), LeaseError> {
        match append(
            self.store,
            &self.stream,
            ExpectedRevision::Exact(self.revision),
            &self.holder,
            self.ttl,
            RELEASED,
            None,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(Error::WrongExpectedRevision { .. }) => Err(self.lost().await),
            Err(e) => Err(LeaseError::Store(e)),
        }
    }

    /// The error for a lease another runner took, naming it when it can be read.
    async fn lost(&self) -> LeaseError {
        let holder = match last_event(self.store, &self.stream).await {
            Ok(Some(event)) if event.event_type.as_str() == TAKEN => {
                serde_json::from_slice::<Taken>(event.data.bytes())
                    .ok()
                    .map(|t| t.holder)
            }
            _ => None,
        };
        LeaseError::Lost {
            name: self.name.clone(),
            holder,
        }
    }
}

async fn append<S: EventStore>(
    store: &S,
    stream: &StreamName,
    expected: ExpectedRevision,
    holder: &str,
    ttl: Duration,
    kind: &str,
    id: Option<skald_core::EventId>,
) -> skald_core::Result<Revision> {
    let data = serde_json::to_string(&Taken {
        holder: holder.to_owned(),
        ttl_ms: ttl.as_millis() as u64,
    })
    .expect("strings and numbers serialize");
    let mut event = ProposedEvent::new(EventType::new(kind)?, EventData::json(data)?);
    if let Some(id) = id {
        event.id = id;
    }
    let result = store
        .append(AppendRequest {
            stream: stream.clone(),
            expected,
            condition: None,
            events: vec![event],
        })
        .await?;
    Ok(result.last_revision)
}
