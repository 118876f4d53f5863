//! Process managers: react to events by sending commands, with a state per instance (one
//! order, one user: the correlation key) kept in Skald.
//!
//! Where it is kept (`docs/client.md`, "Process managers", has the format):
//! - `process-NAME` holds the checkpoint, the position of the last event handled, one small
//!   event per batch;
//! - `process-NAME:i:INSTANCE` holds one instance's state, saved after each batch that
//!   changed it, with the position of the last event it took in;
//! - `process-NAME:parked` records the commands given up on (parked or skipped).
//!
//! A batch of events runs in this order: react and send every command, save each changed
//! instance, save the checkpoint. After a crash the runner starts again from the checkpoint:
//! an instance saved past an event passes over it (its commands were sent before the save),
//! the others react again and send the same commands with the same [`CommandKey`]s. A command
//! that appends through [`Repository::execute_keyed`](crate::aggregate::Repository::execute_keyed)
//! (or an HTTP call with the key as its `Idempotency-Key`) is then applied once.
//!
//! Every save is appended at the revision the runner read, so two runners of one process
//! manager cannot both advance it: the second to save stops with
//! [`ProcessError::Superseded`].
//!
//! A command that fails is handled as [`Dispatch::on_failure`] says: tried again with
//! back-off, parked or skipped (recorded, and the rest go on), or the runner stops.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use skald_core::{
    AppendRequest, Error, EventData, EventStore, EventType, ExpectedRevision, MAX_READ_PAGE,
    Position, ProposedEvent, ReadSource, RecordedEvent, Revision, StreamName,
};

use crate::RetryPolicy;
use crate::aggregate::{CommandError, CommandKey};
use crate::event::{CodecError, Envelope, Event};
use crate::follow::{Cursor, Stop, back_off, last_event, stopped_or_appended};

/// A process manager: how events change the state of the instance they belong to, and the
/// commands it sends in response.
pub trait ProcessManager: Send + Sync + 'static {
    /// The events it reacts to, decoded; events of the source of any other type are passed
    /// over.
    type Event: Event;
    /// The state of one instance; a new instance starts from the default.
    type State: Default + Clone + Serialize + DeserializeOwned + Send + Sync;
    /// What it sends; serializable, so that a parked command can be recorded.
    type Command: Serialize + Send + Sync;

    /// Its name: letters, digits, `-` and `_`. Its streams are named after it.
    fn name(&self) -> &str;

    /// The events it reacts to.
    fn source(&self) -> ReadSource;

    /// The instance `event` belongs to (its correlation key: an order id, a user id), or
    /// `None` when it concerns none.
    fn instance(&self, event: &Envelope<Self::Event>) -> Option<String>;

    /// Reacts to one event: changes its instance's state and returns the commands to send.
    fn react(&self, state: &mut Self::State, event: &Envelope<Self::Event>) -> Vec<Self::Command>;
}

/// What the runner does with a command whose send failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Send it again after a back-off (the runner's [`RetryPolicy`]); when the policy gives
    /// up, stop.
    Retry,
    /// Record it in `process-NAME:parked` as `CommandParked` (to be looked at and sent again
    /// by hand, with its key), and go on with the rest.
    Park,
    /// Record it in `process-NAME:parked` as `CommandSkipped`, and go on with the rest.
    Skip,
    /// Stop the runner with [`ProcessError::Dispatch`]; a restart sends the command again.
    Stop,
}

impl Failure {
    /// The usual answer for a command sent through a
    /// [`Repository`](crate::aggregate::Repository): a rejected command, a reused key or an
    /// event that does not decode is parked (sending it again would fail the same way), a
    /// conflict or an unreachable store is tried again, any other store error stops.
    pub fn of_command<E>(error: &CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(_) | CommandError::KeyReused { .. } | CommandError::Codec(_) => {
                Self::Park
            }
            CommandError::Conflict(_) | CommandError::Store(Error::Unavailable(_)) => Self::Retry,
            CommandError::Store(Error::InvalidEvent { .. }) => Self::Park,
            CommandError::Store(_) => Self::Stop,
        }
    }
}

/// Sends a process manager's commands.
pub trait Dispatch<C>: Send + Sync {
    /// Why a command could not be sent.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `command`. `key` is the same every time this command is sent again: pass it to
    /// [`Repository::execute_keyed`](crate::aggregate::Repository::execute_keyed), or as an
    /// idempotency key.
    fn send(
        &self,
        command: &C,
        key: &CommandKey,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// What to do when `send` failed with `error`: tell a transient failure (retry) from a
    /// refusal (park or skip, so that one bad command does not hold up the rest).
    /// [`Failure::of_command`] answers for the errors of a repository.
    fn on_failure(&self, error: &Self::Error) -> Failure;
}

/// Why a process manager stopped.
#[derive(Debug)]
pub enum ProcessError<E> {
    /// The store failed, or refused a read or a save.
    Store(Error),
    /// A saved state does not decode as the state type, or a state does not serialize.
    State(CodecError),
    /// An event of one of the process manager's types did not decode: fix the type or add an
    /// upcaster, then run it again.
    Codec(CodecError),
    /// A command could not be sent, and [`Dispatch::on_failure`] said to stop (or its retries
    /// ran out). The batch it belongs to is not saved: a restart sends its commands again.
    Dispatch(E),
    /// Another runner saved this process manager's state since this one read it.
    Superseded(String),
}

impl<E: fmt::Display> fmt::Display for ProcessError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "{e}"),
            Self::State(e) => write!(f, "the saved state: {e}"),
            Self::Codec(e) => write!(f, "{e}"),
            Self::Dispatch(e) => write!(f, "a command could not be sent: {e}"),
            Self::Superseded(name) => write!(
                f,
                "another runner of process manager {name} saved its state; only one may run at \
                 a time"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ProcessError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            Self::State(e) | Self::Codec(e) => Some(e),
            Self::Dispatch(e) => Some(e),
            Self::Superseded(_) => None,
        }
    }
}

/// The data of a `ProcessCheckpoint` event.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    /// The position of the last event handled.
    checkpoint: u64,
    /// The runner that saved it, so that it knows its own save after a lost answer.
    #[serde(default)]
    runner: String,
}

/// The data of a `ProcessInstance` event.
#[derive(Serialize, Deserialize)]
struct Saved<T> {
    /// The position of the last event the state took in.
    through: u64,
    state: T,
}

/// The data of a `CommandParked` or `CommandSkipped` event.
#[derive(Serialize)]
struct Parked<'a, C> {
    key: &'a str,
    instance: &'a str,
    command: &'a C,
    error: String,
    cause: Cause<'a>,
}

/// The event a parked command was the answer to.
#[derive(Serialize)]
struct Cause<'a> {
    id: String,
    stream: &'a str,
    revision: u64,
    position: u64,
}

const CHECKPOINT_TYPE: &str = "ProcessCheckpoint";
const INSTANCE_TYPE: &str = "ProcessInstance";
/// What an earlier version of this client saved: the whole state in one event.
const WHOLE_STATE_TYPE: &str = "ProcessState";

/// Instances kept in memory between batches; past this the cache is emptied.
const CACHED_INSTANCES: usize = 1024;

/// An instance whose saved state is larger than this is read again when next needed rather
/// than kept in memory.
const CACHED_STATE_BYTES: usize = 64 * 1024;

/// A batch that changed no instance saves its checkpoint only once it is this many positions
/// past the last one saved: a process manager over a busy log does not write for every page
/// of events that are not its business.
const IDLE_SAVE_EVERY: u64 = 4096;

/// The longest instance stream name written as the key itself; a longer one is named after a
/// hash of the key (the server's limit on stream names in appends is 256 bytes).
const MAX_INSTANCE_STREAM: usize = 200;

/// The types of the events process managers write; never the input of one.
const OWN_TYPES: [&str; 4] = [
    CHECKPOINT_TYPE,
    INSTANCE_TYPE,
    "CommandParked",
    "CommandSkipped",
];

/// One instance as loaded or changed: its state, the revision of its stream, the position of
/// the last event it took in, and whether this batch changed it.
#[derive(Clone)]
struct Instance<T> {
    state: T,
    revision: Option<Revision>,
    through: Option<u64>,
    changed: bool,
    /// Small enough to keep in memory between batches.
    cacheable: bool,
}

/// The name of the stream `instance`'s state is kept in: `process-NAME:i:KEY` with
/// whitespace, control characters, `/` and `%` percent-encoded (stream names cannot hold the
/// first three); when that would be longer than 200 bytes, `process-NAME:h:UUID`, the UUID
/// derived (v5) from the key.
pub fn instance_stream(name: &str, instance: &str) -> String {
    let mut encoded = String::with_capacity(instance.len());
    for c in instance.chars() {
        if c.is_whitespace() || c.is_control() || c == '/' || c == '%' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                encoded.push_str(&format!("%{b:02X}"));
            }
        } else {
            encoded.push(c);
        }
    }
    let plain = format!("process-{name}:i:{encoded}");
    if plain.len() <= MAX_INSTANCE_STREAM {
        return plain;
    }
    let hashed = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, instance.as_bytes());
    format!("process-{name}:h:{hashed}")
}

/// The stream parked and skipped commands are recorded in.
pub fn parked_stream(name: &str) -> String {
    format!("process-{name}:parked")
}

/// Runs a [`ProcessManager`]: reads its checkpoint from Skald, feeds it the events after it,
/// sends the commands it returns, and saves the changed instances and the checkpoint after
/// each batch. It owns the store handle, the manager and the dispatch, so it can be spawned.
pub struct ProcessRunner<S, P: ProcessManager, D> {
    store: S,
    manager: P,
    dispatch: D,
    stream: StreamName,
    batch: usize,
    retry: RetryPolicy,
    /// The position of the last event handled (saved, or passed over since the last save).
    checkpoint: Option<Position>,
    /// The checkpoint as last saved.
    saved: Option<Position>,
    revision: Option<Revision>,
    /// This runner's id, written with its checkpoints.
    runner: String,
    cache: HashMap<String, Instance<P::State>>,
}

type Outcome<T, D, C> = Result<T, ProcessError<<D as Dispatch<C>>::Error>>;

/// Whether a pass ended because the stop signal came.
enum Pass {
    Done,
    Stopped,
}

impl<S, P, D> ProcessRunner<S, P, D>
where
    S: EventStore,
    P: ProcessManager,
    D: Dispatch<P::Command>,
{
    /// Reads the checkpoint of `manager` (none: it starts from the first event) to run over
    /// `store`, sending through `dispatch`; saves after every 64 events.
    pub async fn load(store: S, manager: P, dispatch: D) -> Outcome<Self, D, P::Command> {
        let name = manager.name();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ProcessError::Store(Error::InvalidConfig(format!(
                "process manager name {name:?} must be 1 to 64 letters, digits, '-' and '_'"
            ))));
        }
        let stream = StreamName::new(format!("process-{name}")).map_err(ProcessError::Store)?;
        let last = last_event(&store, &stream)
            .await
            .map_err(ProcessError::Store)?;
        let (checkpoint, revision) = match last {
            None => (None, None),
            Some(event) if event.event_type.as_str() == WHOLE_STATE_TYPE => {
                return Err(ProcessError::State(CodecError::new(format!(
                    "{} holds the whole state of an earlier version of this client, which \
                     this one does not read; start the process manager under a new name",
                    stream.as_str()
                ))));
            }
            Some(event) => {
                let saved: Checkpoint =
                    serde_json::from_slice(event.data.bytes()).map_err(|e| {
                        ProcessError::State(CodecError::new(format!(
                            "the checkpoint saved at revision {} of {} does not decode: {e}",
                            event.revision.0,
                            stream.as_str()
                        )))
                    })?;
                (Some(Position(saved.checkpoint)), Some(event.revision))
            }
        };
        Ok(Self {
            store,
            manager,
            dispatch,
            stream,
            batch: 64,
            retry: RetryPolicy::forever(),
            checkpoint,
            saved: checkpoint,
            revision,
            runner: uuid::Uuid::new_v4().to_string(),
            cache: HashMap::new(),
        })
    }

    /// At most `events` handled between two saves; between 1 and the read page limit.
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.clamp(1, MAX_READ_PAGE);
        self
    }

    /// How a command that failed with [`Failure::Retry`], and a store that cannot be reached
    /// in [`ProcessRunner::run`], are tried again; without end ([`RetryPolicy::forever`])
    /// when not set.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The position of the last event handled and saved.
    pub fn checkpoint(&self) -> Option<Position> {
        self.checkpoint
    }

    /// The state of `instance` as saved, or `None` when it has none.
    pub async fn state(&self, instance: &str) -> Outcome<Option<P::State>, D, P::Command> {
        let stream = StreamName::new(instance_stream(self.manager.name(), instance))
            .map_err(ProcessError::Store)?;
        let instance = self.load_instance(&stream).await?;
        Ok(instance.revision.map(|_| instance.state))
    }

    /// Handles every event stored now after the checkpoint; returns the new checkpoint.
    pub async fn catch_up(&mut self) -> Outcome<Option<Position>, D, P::Command> {
        self.drain(&mut Stop::never()).await?;
        Ok(self.checkpoint)
    }

    /// Catches up, then handles events as they are appended, until `stop` resolves (between
    /// batches, or while waiting to try again) or something fails. A store that cannot be
    /// reached is tried again as [`ProcessRunner::retry`] says.
    pub async fn run(
        &mut self,
        stop: impl Future<Output = ()>,
    ) -> Outcome<Option<Position>, D, P::Command> {
        let mut stop = Stop::new(stop);
        let mut attempt = 1;
        loop {
            match self.follow(&mut stop, &mut attempt).await {
                Err(ProcessError::Store(error)) => {
                    // Whatever was cached may be behind what a lost answer saved.
                    self.cache.clear();
                    let again = back_off(&self.retry, &mut attempt, error, &mut stop)
                        .await
                        .map_err(ProcessError::Store)?;
                    if !again {
                        return Ok(self.checkpoint);
                    }
                    self.adopt_own_save().await;
                }
                done => return done,
            }
        }
    }

    /// After a store error: when the last checkpoint saved is this runner's own (an append
    /// whose answer was lost), takes it as saved, instead of failing the next save as if
    /// another runner had written it. A read that fails leaves things as they are.
    async fn adopt_own_save(&mut self) {
        let Ok(Some(event)) = last_event(&self.store, &self.stream).await else {
            return;
        };
        let Ok(saved) = serde_json::from_slice::<Checkpoint>(event.data.bytes()) else {
            return;
        };
        if saved.runner == self.runner && Some(event.revision) != self.revision {
            let position = Some(Position(saved.checkpoint));
            self.revision = Some(event.revision);
            self.saved = position;
            self.checkpoint = self.checkpoint.max(position);
        }
    }

    async fn follow<F: Future<Output = ()>>(
        &mut self,
        stop: &mut Stop<F>,
        attempt: &mut u32,
    ) -> Outcome<Option<Position>, D, P::Command> {
        loop {
            let known = self
                .store
                .next_position()
                .await
                .map_err(ProcessError::Store)?;
            if let Pass::Stopped = self.drain(stop).await? {
                return Ok(self.checkpoint);
            }
            *attempt = 1;
            if stopped_or_appended(&self.store, known, stop)
                .await
                .map_err(ProcessError::Store)?
            {
                return Ok(self.checkpoint);
            }
        }
    }

    /// Handles what is stored after the checkpoint, a batch at a time.
    async fn drain<F: Future<Output = ()>>(
        &mut self,
        stop: &mut Stop<F>,
    ) -> Outcome<Pass, D, P::Command> {
        let mut cursor = Cursor::after(self.manager.source(), self.checkpoint);
        let own = format!("{}:", self.stream.as_str());
        while let Some(page) = cursor
            .next(&self.store, self.batch)
            .await
            .map_err(ProcessError::Store)?
        {
            // Its own events, and the bookkeeping of any process manager, are never its input,
            // whatever the source; a page of only those is passed over without a save (which
            // would be one more of them).
            let mut last = None;
            let mut events = Vec::with_capacity(page.len());
            for recorded in page {
                let theirs = recorded.stream != self.stream
                    && !recorded.stream.as_str().starts_with(&own)
                    && !(recorded.stream.as_str().starts_with("process-")
                        && OWN_TYPES.contains(&recorded.event_type.as_str()));
                if !theirs || self.checkpoint.is_some_and(|c| recorded.position <= c) {
                    continue;
                }
                last = Some(recorded.position);
                if let Some(event) = Envelope::decode(recorded).map_err(ProcessError::Codec)? {
                    events.push(event);
                }
            }
            if let Some(last) = last {
                match self.handle(&events, last, stop).await {
                    Ok(Pass::Done) => {}
                    Ok(Pass::Stopped) => return Ok(Pass::Stopped),
                    Err(e) => {
                        // Some saves of the batch may have landed: what is cached is behind.
                        self.cache.clear();
                        return Err(e);
                    }
                }
            }
        }
        Ok(Pass::Done)
    }

    /// Reacts to `events` on copies of their instances, sends every command, then saves the
    /// changed instances and `checkpoint`; only then are the copies the state.
    async fn handle<F: Future<Output = ()>>(
        &mut self,
        events: &[Envelope<P::Event>],
        checkpoint: Position,
        stop: &mut Stop<F>,
    ) -> Outcome<Pass, D, P::Command> {
        let mut drafts: HashMap<String, (StreamName, Instance<P::State>)> = HashMap::new();
        // Whether a command was sent or an instance saved: then the checkpoint is saved too.
        let mut sent = false;
        let mut touched = false;
        for event in events {
            let Some(key) = self.manager.instance(event) else {
                continue;
            };
            if !drafts.contains_key(&key) {
                let stream =
                    StreamName::new(instance_stream(self.manager.name(), &key)).map_err(|e| {
                        ProcessError::Store(Error::invalid(format!(
                            "instance {key:?} of the event at position {}: {e}",
                            event.recorded.position.0
                        )))
                    })?;
                let instance = match self.cache.get(&key) {
                    Some(cached) => cached.clone(),
                    None => self.load_instance(&stream).await?,
                };
                drafts.insert(key.clone(), (stream, instance));
            }
            let (_, draft) = drafts.get_mut(&key).expect("inserted above");
            // Saved past this event before a crash: its commands were sent before that save.
            if draft
                .through
                .is_some_and(|t| t >= event.recorded.position.0)
            {
                continue;
            }
            let commands = self.manager.react(&mut draft.state, event);
            draft.through = Some(event.recorded.position.0);
            draft.changed = true;
            for (i, command) in commands.iter().enumerate() {
                sent = true;
                let command_key = CommandKey::new(format!(
                    "{}/{}/{i}",
                    self.stream.as_str(),
                    event.recorded.id
                ));
                if let Pass::Stopped = self
                    .send(command, &command_key, &key, &event.recorded, stop)
                    .await?
                {
                    return Ok(Pass::Stopped);
                }
            }
        }
        for (key, (stream, draft)) in &mut drafts {
            if !draft.changed {
                continue;
            }
            let saved = Saved {
                through: draft.through.expect("changed instances took in an event"),
                state: &draft.state,
            };
            let data = serde_json::to_string(&saved).map_err(|e| {
                ProcessError::State(CodecError::new(format!(
                    "the state of instance {key:?} does not serialize: {e}"
                )))
            })?;
            let size = data.len();
            let revision = match self.save(stream, draft.revision, INSTANCE_TYPE, data).await {
                Err(ProcessError::Store(Error::InvalidEvent { reason })) => {
                    return Err(ProcessError::State(CodecError::new(format!(
                        "the state of instance {key:?} ({size} bytes) cannot be saved: {reason}; \
                         keep less in one instance"
                    ))));
                }
                saved => saved?,
            };
            draft.revision = Some(revision);
            draft.changed = false;
            draft.cacheable = size <= CACHED_STATE_BYTES;
            touched = true;
        }
        let idle = self
            .saved
            .is_some_and(|s| checkpoint.0.saturating_sub(s.0) < IDLE_SAVE_EVERY);
        if touched || sent || !idle {
            let data = serde_json::to_string(&Checkpoint {
                checkpoint: checkpoint.0,
                runner: self.runner.clone(),
            })
            .expect("a number and a string serialize");
            let stream = self.stream.clone();
            self.revision = Some(
                self.save(&stream, self.revision, CHECKPOINT_TYPE, data)
                    .await?,
            );
            self.saved = Some(checkpoint);
        }
        self.checkpoint = Some(checkpoint);
        if self.cache.len() + drafts.len() > CACHED_INSTANCES {
            self.cache.clear();
        }
        self.cache.extend(
            drafts
                .into_iter()
                .filter(|(_, (_, draft))| draft.cacheable)
                .map(|(key, (_, draft))| (key, draft)),
        );
        Ok(Pass::Done)
    }

    /// Sends one command until it is sent, parked or skipped, or the runner must stop.
    async fn send<F: Future<Output = ()>>(
        &self,
        command: &P::Command,
        key: &CommandKey,
        instance: &str,
        cause: &RecordedEvent,
        stop: &mut Stop<F>,
    ) -> Outcome<Pass, D, P::Command> {
        let mut attempt = 1u32;
        loop {
            let error = match self.dispatch.send(command, key).await {
                Ok(()) => return Ok(Pass::Done),
                Err(error) => error,
            };
            let kind = match self.dispatch.on_failure(&error) {
                Failure::Retry => {
                    let Some(wait) = self.retry.next_wait(&mut attempt) else {
                        return Err(ProcessError::Dispatch(error));
                    };
                    tokio::select! {
                        () = stop.wait() => return Ok(Pass::Stopped),
                        () = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                Failure::Stop => return Err(ProcessError::Dispatch(error)),
                Failure::Park => "CommandParked",
                Failure::Skip => "CommandSkipped",
            };
            self.record(kind, command, key, instance, cause, &error)
                .await?;
            return Ok(Pass::Done);
        }
    }

    /// Appends a parked or skipped command to `process-NAME:parked`, with an id derived from
    /// its key, so that a batch run again after a crash records it once (the id is taken,
    /// whatever the error said the second time).
    async fn record(
        &self,
        kind: &str,
        command: &P::Command,
        key: &CommandKey,
        instance: &str,
        cause: &RecordedEvent,
        error: &D::Error,
    ) -> Outcome<(), D, P::Command> {
        let parked = Parked {
            key: key.as_str(),
            instance,
            command,
            error: truncated(error.to_string()),
            cause: Cause {
                id: cause.id.0.to_string(),
                stream: cause.stream.as_str(),
                revision: cause.revision.0,
                position: cause.position.0,
            },
        };
        let data = serde_json::to_string(&parked).map_err(|e| {
            ProcessError::State(CodecError::new(format!(
                "the command to park does not serialize: {e}"
            )))
        })?;
        let mut event = ProposedEvent::new(
            EventType::new(kind).map_err(ProcessError::Store)?,
            EventData::json(data).map_err(ProcessError::Store)?,
        );
        // Not the key's own first event id: a command may have appended under it.
        event.id = CommandKey::new(format!("{}/parked", key.as_str())).event_id(0);
        let parked_stream =
            StreamName::new(parked_stream(self.manager.name())).map_err(ProcessError::Store)?;
        match self
            .store
            .append(AppendRequest {
                stream: parked_stream.clone(),
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![event],
            })
            .await
        {
            Ok(_) => Ok(()),
            // Recorded by an earlier run of this batch: the id is taken in the parked stream.
            // Taken anywhere else, it is not this record, and nothing is recorded.
            Err(Error::IdReused {
                stream: Some(taken),
                ..
            }) if taken == parked_stream => Ok(()),
            Err(e) => Err(ProcessError::Store(e)),
        }
    }

    /// The last saved state of the instance whose stream is `stream` (the default, when none
    /// is saved).
    async fn load_instance(
        &self,
        stream: &StreamName,
    ) -> Outcome<Instance<P::State>, D, P::Command> {
        let last = last_event(&self.store, stream)
            .await
            .map_err(ProcessError::Store)?;
        Ok(match last {
            None => Instance {
                state: P::State::default(),
                revision: None,
                through: None,
                changed: false,
                cacheable: true,
            },
            Some(event) => {
                let saved: Saved<P::State> =
                    serde_json::from_slice(event.data.bytes()).map_err(|e| {
                        ProcessError::State(CodecError::new(format!(
                            "the state saved at revision {} of {} does not decode: {e}",
                            event.revision.0,
                            stream.as_str()
                        )))
                    })?;
                Instance {
                    state: saved.state,
                    revision: Some(event.revision),
                    through: Some(saved.through),
                    changed: false,
                    cacheable: event.data.bytes().len() <= CACHED_STATE_BYTES,
                }
            }
        })
    }

    /// Appends one event of `kind` with `data` to `stream` at `revision`; another runner's
    /// save in between supersedes this one.
    async fn save(
        &self,
        stream: &StreamName,
        revision: Option<Revision>,
        kind: &str,
        data: String,
    ) -> Outcome<Revision, D, P::Command> {
        let event = ProposedEvent::new(
            EventType::new(kind).map_err(ProcessError::Store)?,
            EventData::json(data).map_err(ProcessError::Store)?,
        );
        let expected = match revision {
            None => ExpectedRevision::NoStream,
            Some(r) => ExpectedRevision::Exact(r),
        };
        match self
            .store
            .append(AppendRequest {
                stream: stream.clone(),
                expected,
                condition: None,
                events: vec![event],
            })
            .await
        {
            Ok(result) => Ok(result.last_revision),
            Err(Error::WrongExpectedRevision { .. }) => {
                Err(ProcessError::Superseded(self.manager.name().to_owned()))
            }
            Err(e) => Err(ProcessError::Store(e)),
        }
    }
}

/// At most 4 KiB of an error's text, cut at a character boundary.
fn truncated(mut text: String) -> String {
    const MAX: usize = 4096;
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}
