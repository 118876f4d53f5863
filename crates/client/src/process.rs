//! Process managers: react to events by sending commands, with their state kept in Skald.
//!
//! The state and the position of the last event handled are saved together as one event in
//! the stream `process-NAME`, after the commands a batch of events caused were sent. After a
//! crash the runner starts again from the last save and sends those commands again, each with
//! the same [`CommandKey`]. A command that appends through
//! [`Repository::execute_keyed`](crate::aggregate::Repository::execute_keyed) (or an HTTP
//! call with the key as its `Idempotency-Key`) is then applied once.
//!
//! Saves are appended at the revision the runner loaded, so two runners of one process
//! manager cannot both advance it: the second to save stops with
//! [`ProcessError::Superseded`].

use std::fmt;
use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;
use skald_core::{
    AppendRequest, Error, EventData, EventStore, EventType, ExpectedRevision, MAX_READ_PAGE,
    Position, ProposedEvent, ReadSource, RecordedEvent, Revision, StreamName,
};

use crate::aggregate::{CodecError, CommandKey};
use crate::follow::{Cursor, last_event, stopped_or_appended};

/// A process manager: state that follows events, and the commands it sends in response.
pub trait ProcessManager:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// What it sends.
    type Command: Send + Sync;

    /// Its name; its state is kept in the stream `process-NAME`.
    fn name() -> &'static str;

    /// The events it reacts to.
    fn source() -> ReadSource;

    /// Reacts to one event: changes the state and returns the commands to send.
    fn react(&mut self, event: &RecordedEvent) -> Vec<Self::Command>;
}

/// Sends a process manager's commands.
pub trait Dispatch<C>: Send + Sync {
    /// Why a command could not be sent; the runner stops, and sends it again when restarted.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `command`. `key` is the same every time this command is sent again: pass it to
    /// [`Repository::execute_keyed`](crate::aggregate::Repository::execute_keyed), or as an
    /// idempotency key.
    fn send(
        &self,
        command: &C,
        key: &CommandKey,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Why a process manager stopped.
#[derive(Debug)]
pub enum ProcessError<E> {
    /// The store failed, or refused a read or a save.
    Store(Error),
    /// Its saved state does not decode as the state type.
    State(CodecError),
    /// A command could not be sent. The batch it belongs to is not saved: a restart sends its
    /// commands again.
    Dispatch(E),
    /// Another runner saved this process manager's state since this one loaded it.
    Superseded(String),
}

impl<E: fmt::Display> fmt::Display for ProcessError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "{e}"),
            Self::State(e) => write!(f, "the saved state: {e}"),
            Self::Dispatch(e) => write!(f, "a command could not be sent: {e}"),
            Self::Superseded(name) => write!(
                f,
                "another runner of process manager {name} saved its state; only one may run at \
                 a time"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ProcessError<E> {}

/// The data of a state event.
#[derive(Serialize, serde::Deserialize)]
struct Saved<P> {
    /// The position of the last event handled.
    checkpoint: u64,
    state: P,
}

/// The type of state events.
const STATE_TYPE: &str = "ProcessState";

/// Runs a [`ProcessManager`]: loads its state from Skald, feeds it events after its
/// checkpoint, sends the commands it returns and saves the state after each batch.
pub struct ProcessRunner<'a, S, P, D> {
    store: &'a S,
    dispatch: D,
    stream: StreamName,
    batch: usize,
    state: P,
    checkpoint: Option<Position>,
    revision: Option<Revision>,
}

type Outcome<T, D, C> = Result<T, ProcessError<<D as Dispatch<C>>::Error>>;

impl<'a, S, P, D> ProcessRunner<'a, S, P, D>
where
    S: EventStore,
    P: ProcessManager,
    D: Dispatch<P::Command>,
{
    /// Loads the last saved state of `P` (or starts from the default) to run over `store`,
    /// sending through `dispatch`; saves after every 64 events.
    pub async fn load(store: &'a S, dispatch: D) -> Outcome<Self, D, P::Command> {
        let stream =
            StreamName::new(format!("process-{}", P::name())).map_err(ProcessError::Store)?;
        let last = last_event(store, &stream)
            .await
            .map_err(ProcessError::Store)?;
        let (state, checkpoint, revision) = match last {
            None => (P::default(), None, None),
            Some(event) => {
                let saved: Saved<P> = serde_json::from_slice(event.data.bytes()).map_err(|e| {
                    ProcessError::State(CodecError(format!(
                        "the state saved at revision {} of {} does not decode: {e}",
                        event.revision.0,
                        stream.as_str()
                    )))
                })?;
                (
                    saved.state,
                    Some(Position(saved.checkpoint)),
                    Some(event.revision),
                )
            }
        };
        Ok(Self {
            store,
            dispatch,
            stream,
            batch: 64,
            state,
            checkpoint,
            revision,
        })
    }

    /// At most `events` handled between two saves; between 1 and the read page limit.
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.clamp(1, MAX_READ_PAGE);
        self
    }

    /// The state as last saved.
    pub fn state(&self) -> &P {
        &self.state
    }

    /// The position of the last event handled and saved.
    pub fn checkpoint(&self) -> Option<Position> {
        self.checkpoint
    }

    /// Handles every event stored now after the checkpoint; returns the new checkpoint.
    pub async fn catch_up(&mut self) -> Outcome<Option<Position>, D, P::Command> {
        let mut cursor = Cursor::after(P::source(), self.checkpoint);
        while let Some(page) = cursor
            .next(self.store, self.batch)
            .await
            .map_err(ProcessError::Store)?
        {
            // Its own state events are never its input, whatever the source; a page of only
            // those is passed over without a save (which would be one more of them).
            let events: Vec<&RecordedEvent> =
                page.iter().filter(|e| e.stream != self.stream).collect();
            if let Some(last) = events.last().map(|e| e.position) {
                self.handle(&events, last).await?;
            }
        }
        Ok(self.checkpoint)
    }

    /// Catches up, then handles events as they are appended, until `stop` resolves (between
    /// batches) or something fails.
    pub async fn run(
        &mut self,
        stop: impl Future<Output = ()>,
    ) -> Outcome<Option<Position>, D, P::Command> {
        tokio::pin!(stop);
        loop {
            let known = self
                .store
                .next_position()
                .await
                .map_err(ProcessError::Store)?;
            self.catch_up().await?;
            if stopped_or_appended(self.store, known, stop.as_mut())
                .await
                .map_err(ProcessError::Store)?
            {
                return Ok(self.checkpoint);
            }
        }
    }

    /// Reacts to `events` on a copy of the state, sends every command, then saves the copy
    /// with `checkpoint`; only then is it the state.
    async fn handle(
        &mut self,
        events: &[&RecordedEvent],
        checkpoint: Position,
    ) -> Outcome<(), D, P::Command> {
        let mut draft = self.state.clone();
        for event in events {
            for (i, command) in draft.react(event).iter().enumerate() {
                let key = CommandKey::new(format!("{}/{}/{i}", self.stream.as_str(), event.id));
                self.dispatch
                    .send(command, &key)
                    .await
                    .map_err(ProcessError::Dispatch)?;
            }
        }
        let saved = Saved {
            checkpoint: checkpoint.0,
            state: &draft,
        };
        let data = serde_json::to_string(&saved)
            .map_err(|e| {
                ProcessError::State(CodecError(format!("the state does not serialize: {e}")))
            })
            .and_then(|json| EventData::json(json).map_err(ProcessError::Store))?;
        let event = ProposedEvent::new(
            EventType::new(STATE_TYPE).map_err(ProcessError::Store)?,
            data,
        );
        let expected = match self.revision {
            None => ExpectedRevision::NoStream,
            Some(r) => ExpectedRevision::Exact(r),
        };
        let appended = self
            .store
            .append(AppendRequest {
                stream: self.stream.clone(),
                expected,
                condition: None,
                events: vec![event],
            })
            .await;
        match appended {
            Ok(result) => {
                self.state = draft;
                self.checkpoint = Some(checkpoint);
                self.revision = Some(result.last_revision);
                Ok(())
            }
            Err(Error::WrongExpectedRevision { .. }) => {
                Err(ProcessError::Superseded(P::name().to_owned()))
            }
            Err(e) => Err(ProcessError::Store(e)),
        }
    }
}
