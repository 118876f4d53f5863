//! Typed events, aggregates with a repository, a given-when-then test helper, and DCB
//! decisions, over any [`EventStore`]: the embedded store or a [`crate::Client`].

use std::fmt;
use std::marker::PhantomData;

use crate::follow::last_event;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use skald_core::{
    AppendRequest, AppendResult, Direction, Error, EventData, EventId, EventStore, EventType,
    ExpectedRevision, MAX_READ_PAGE, Position, ProposedEvent, ReadRequest, ReadSource,
    RecordedEvent, Revision, StreamName,
};

pub use crate::decision::{DecideError, Decider, Decision, StateQuery};
pub use crate::event::{
    AnyEvent, CodecError, Envelope, Event, Upcaster, decode, decode_known, encode, propose, tag,
};

/// A consistency boundary that decides commands against its state, rebuilt from its events.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// Its events.
    type Event: Event;
    /// The commands it decides.
    type Command: Send + Sync;
    /// Why it turns a command down.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The stream of the instance with this id, such as `account-42`.
    fn stream(id: &str) -> String;

    /// Changes the state by one event. Must not fail: the event has happened.
    fn apply(&mut self, event: &Self::Event);

    /// Decides a command against the state: the events it causes, or why not.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// What running a command can end in.
#[derive(Debug)]
pub enum CommandError<E> {
    /// The aggregate turned the command down.
    Rejected(E),
    /// The stream was written by someone else each time the command was tried.
    Conflict(Error),
    /// The store failed, or refused the append.
    Store(Error),
    /// A stored event did not decode.
    Codec(CodecError),
    /// The command key was used before for another command: on another stream, or for events
    /// that differ from what this command decides. Nothing was appended; use a fresh key.
    KeyReused {
        /// The key.
        key: String,
        /// How its earlier use differs.
        reason: String,
    },
}

impl<E: fmt::Display> fmt::Display for CommandError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(e) => write!(f, "the command was rejected: {e}"),
            Self::Conflict(e) => write!(f, "the command kept conflicting: {e}"),
            Self::Store(e) => write!(f, "{e}"),
            Self::Codec(e) => write!(f, "{e}"),
            Self::KeyReused { key, reason } => write!(
                f,
                "command key {key:?} was used before for another command ({reason}); nothing \
                 was appended: give this command a key of its own"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CommandError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Rejected(e) => Some(e),
            Self::Conflict(e) | Self::Store(e) => Some(e),
            Self::Codec(e) => Some(e),
            Self::KeyReused { .. } => None,
        }
    }
}

/// An aggregate's state and the revision it was loaded at.
#[derive(Debug)]
pub struct Loaded<A> {
    /// The state after every stored event.
    pub state: A,
    /// The stream's last revision, or `None` when it has no events.
    pub revision: Option<Revision>,
}

/// Loads aggregates by replaying their streams and saves their new events with the revision
/// they were decided at.
pub struct Repository<'a, S, A> {
    store: &'a S,
    retries: u32,
    snapshots: Option<Snapshots<A>>,
    aggregate: PhantomData<fn() -> A>,
}

/// The stream an aggregate's snapshots are kept in: `snapshot-` before its own stream's name,
/// so that they fall in the `snapshot` category and never into the aggregate's.
pub fn snapshot_stream(stream: &str) -> String {
    format!("snapshot-{stream}")
}

/// The type of snapshot events.
const SNAPSHOT_TYPE: &str = "Snapshot";

/// How a repository keeps snapshots: every how many events, under which version of the
/// state's shape, and the state's serde functions (so that only repositories with snapshots
/// need a serializable state).
struct Snapshots<A> {
    every: u64,
    version: u32,
    write: fn(&A) -> Result<Value, CodecError>,
    read: fn(Value) -> Result<A, CodecError>,
}

/// A snapshot event's data.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotData {
    /// The version of the state's shape it was written under.
    version: u32,
    /// The revision of the aggregate's stream the state is at.
    revision: u64,
    state: Value,
}

impl<'a, S: EventStore, A: Aggregate> Repository<'a, S, A> {
    /// A repository over `store` that does not retry on conflict.
    pub fn new(store: &'a S) -> Self {
        Self {
            store,
            retries: 0,
            snapshots: None,
            aggregate: PhantomData,
        }
    }

    /// On a conflict (another writer appended between load and save), loads again and decides
    /// again, up to `retries` more times. Only for commands whose decision may be repeated on
    /// newer state.
    pub fn retry_on_conflict(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The instance `id`: its latest usable snapshot, then the events after it, page by
    /// page (all of them without snapshots).
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = StreamName::new(A::stream(id)).map_err(CommandError::Store)?;
        Ok(self.replay(&stream, None, true).await?.loaded)
    }

    /// Loads `id`, decides `command`, and appends the events at the revision it loaded. The
    /// result is `None` when the command caused no events.
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Option<AppendResult>, CommandError<A::Error>> {
        self.run(id, command, None).await
    }

    /// [`Repository::execute`] for a command that may be sent again, such as one a process
    /// manager sends before a crash and again after it. The events get ids derived from
    /// `key`, so the repeat is recognised and nothing is applied twice: the result is `None`
    /// when the command's events are already stored (or it caused none).
    ///
    /// The repeat is found among the events loaded (after the latest snapshot) or by the
    /// store's idempotency check on the ids. Should it be decided again on a state that
    /// already holds its first effect, a rejection can come back for a command that was
    /// applied once; it is never applied twice.
    pub async fn execute_keyed(
        &self,
        id: &str,
        command: &A::Command,
        key: &CommandKey,
    ) -> Result<Option<AppendResult>, CommandError<A::Error>> {
        self.run(id, command, Some(key)).await
    }

    async fn run(
        &self,
        id: &str,
        command: &A::Command,
        key: Option<&CommandKey>,
    ) -> Result<Option<AppendResult>, CommandError<A::Error>> {
        let stream = StreamName::new(A::stream(id)).map_err(CommandError::Store)?;
        let mut tries = 0;
        loop {
            let replayed = self.replay(&stream, key, true).await?;
            if let (Some(key), false) = (key, replayed.keyed.is_empty()) {
                return self.repeat(&stream, command, key, &replayed.keyed).await;
            }
            let hidden = replayed.snapshot.is_some();
            let mut loaded = replayed.loaded;
            let events = match loaded.state.decide(command) {
                Ok(events) => events,
                // A snapshot may hide the key's first use, whose effect is in the state: look
                // before it.
                Err(rejected) => match key {
                    Some(key) if hidden => {
                        let full = self.replay(&stream, Some(key), false).await?;
                        if full.keyed.is_empty() {
                            return Err(CommandError::Rejected(rejected));
                        }
                        return self.repeat(&stream, command, key, &full.keyed).await;
                    }
                    _ => return Err(CommandError::Rejected(rejected)),
                },
            };
            if events.is_empty() {
                return Ok(None);
            }
            let mut proposed = events
                .iter()
                .map(propose)
                .collect::<Result<Vec<_>, _>>()
                .map_err(CommandError::Codec)?;
            if let Some(key) = key {
                for (i, event) in proposed.iter_mut().enumerate() {
                    event.id = key.event_id(i);
                }
            }
            let expected = match loaded.revision {
                None => ExpectedRevision::NoStream,
                Some(r) => ExpectedRevision::Exact(r),
            };
            let appended = self
                .store
                .append(AppendRequest {
                    stream: stream.clone(),
                    expected,
                    condition: None,
                    events: proposed,
                })
                .await;
            match appended {
                Ok(result) if result.replayed => return Ok(None),
                Ok(result) => {
                    for event in &events {
                        loaded.state.apply(event);
                    }
                    self.maybe_snapshot(&stream, replayed.snapshot, &loaded.state, &result)
                        .await;
                    return Ok(Some(result));
                }
                // The key's ids are stored already: on this stream (behind a snapshot, or
                // appended by a racing send of the same command after this one loaded; then it
                // is a repeat if the command decides the same there), or elsewhere.
                Err(Error::IdReused { reason, .. }) if key.is_some() => {
                    let key = key.expect("checked");
                    let full = self.replay(&stream, Some(key), false).await?;
                    if !full.keyed.is_empty() {
                        return self.repeat(&stream, command, key, &full.keyed).await;
                    }
                    return Err(CommandError::KeyReused {
                        key: key.as_str().to_owned(),
                        reason,
                    });
                }
                Err(e @ Error::WrongExpectedRevision { .. }) => {
                    if tries >= self.retries {
                        return Err(CommandError::Conflict(e));
                    }
                    tries += 1;
                }
                Err(e) => return Err(CommandError::Store(e)),
            }
        }
    }

    /// The key's events are on this stream: the command is a repeat if, decided on the state
    /// just before them, it causes exactly those events (`Ok(None)`); otherwise the key was
    /// used for another command.
    async fn repeat(
        &self,
        stream: &StreamName,
        command: &A::Command,
        key: &CommandKey,
        stored: &[RecordedEvent],
    ) -> Result<Option<AppendResult>, CommandError<A::Error>> {
        let before = stored[0].revision.0;
        let mut state = A::default();
        let mut from = 0;
        while from < before {
            let page = self
                .store
                .read(ReadRequest {
                    source: ReadSource::Stream(stream.clone()),
                    from: Some(from),
                    direction: Direction::Forward,
                    limit: MAX_READ_PAGE.min((before - from) as usize),
                })
                .await
                .map_err(CommandError::Store)?;
            let Some(last) = page.events.last() else {
                break;
            };
            from = last.revision.0 + 1;
            for event in page.events.iter().filter(|e| e.revision.0 < before) {
                state.apply(&decode(event).map_err(CommandError::Codec)?);
            }
        }
        let reused = |reason: String| CommandError::KeyReused {
            key: key.as_str().to_owned(),
            reason,
        };
        let decided = match state.decide(command) {
            Ok(events) => events,
            Err(e) => {
                return Err(reused(format!(
                    "it was first used at revision {before} of {stream}, where this command is \
                     rejected: {e}"
                )));
            }
        };
        let proposed = decided
            .iter()
            .map(propose)
            .collect::<Result<Vec<_>, _>>()
            .map_err(CommandError::Codec)?;
        // Compared as the events read today (upcast, then encoded again), so that an event
        // stored in an older shape still matches its repeat.
        let mut same = proposed.len() == stored.len();
        for (p, s) in proposed.iter().zip(stored) {
            let now = propose(&decode::<A::Event>(s).map_err(CommandError::Codec)?)
                .map_err(CommandError::Codec)?;
            same &= p.event_type == now.event_type && p.data.bytes() == now.data.bytes();
        }
        if same {
            Ok(None)
        } else {
            Err(reused(format!(
                "it was first used for other events, at revision {before} of {stream}"
            )))
        }
    }

    /// Replays `stream` from the latest usable snapshot on (from its start without
    /// `use_snapshot`), keeping the events stored under `watch` that go by.
    async fn replay(
        &self,
        stream: &StreamName,
        watch: Option<&CommandKey>,
        use_snapshot: bool,
    ) -> Result<Replayed<A>, CommandError<A::Error>> {
        let snapshot = if use_snapshot {
            self.latest_snapshot(stream).await?
        } else {
            None
        };
        let (mut state, mut revision, at) = match snapshot {
            Some((state, at)) => (state, Some(at), Some(at)),
            None => (A::default(), None, None),
        };
        let mut keyed: Vec<RecordedEvent> = Vec::new();
        let mut from = revision.map_or(0, |r| r.0 + 1);
        loop {
            let page = self
                .store
                .read(ReadRequest {
                    source: ReadSource::Stream(stream.clone()),
                    from: Some(from),
                    direction: Direction::Forward,
                    limit: MAX_READ_PAGE,
                })
                .await
                .map_err(CommandError::Store)?;
            for event in &page.events {
                if watch.is_some_and(|key| event.id == key.event_id(keyed.len())) {
                    keyed.push(event.clone());
                }
                state.apply(&decode(event).map_err(CommandError::Codec)?);
                revision = Some(event.revision);
            }
            match page.next {
                Some(next) if !page.events.is_empty() => from = next,
                _ => {
                    return Ok(Replayed {
                        loaded: Loaded { state, revision },
                        snapshot: at,
                        keyed,
                    });
                }
            }
        }
    }

    /// The newest snapshot of `stream` written under this repository's version, if there is
    /// one. Any other (an older version, a state that no longer decodes) is passed over: a
    /// snapshot only saves reading, the events are the truth.
    async fn latest_snapshot(
        &self,
        stream: &StreamName,
    ) -> Result<Option<(A, Revision)>, CommandError<A::Error>> {
        let Some(snapshots) = &self.snapshots else {
            return Ok(None);
        };
        let name =
            StreamName::new(snapshot_stream(stream.as_str())).map_err(CommandError::Store)?;
        let Some(event) = last_event(self.store, &name)
            .await
            .map_err(CommandError::Store)?
        else {
            return Ok(None);
        };
        let Ok(data) = serde_json::from_slice::<SnapshotData>(event.data.bytes()) else {
            return Ok(None);
        };
        if data.version != snapshots.version {
            return Ok(None);
        }
        Ok((snapshots.read)(data.state)
            .ok()
            .map(|state| (state, Revision(data.revision))))
    }

    /// Writes a snapshot of `state` when the append that brought the stream to it took the
    /// stream `every` events or more past the snapshot it was loaded from. A snapshot that
    /// cannot be written is left out: the command's events are stored, and the next command
    /// tries again.
    async fn maybe_snapshot(
        &self,
        stream: &StreamName,
        loaded_from: Option<Revision>,
        state: &A,
        appended: &AppendResult,
    ) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let since = loaded_from.map_or(0, |r| r.0 + 1);
        if appended.last_revision.0 + 1 - since < snapshots.every {
            return;
        }
        let Ok(state) = (snapshots.write)(state) else {
            return;
        };
        let data = SnapshotData {
            version: snapshots.version,
            revision: appended.last_revision.0,
            state,
        };
        let (Ok(name), Ok(event_type), Ok(data)) = (
            StreamName::new(snapshot_stream(stream.as_str())),
            EventType::new(SNAPSHOT_TYPE),
            serde_json::to_string(&data)
                .map_err(|e| e.to_string())
                .and_then(|json| EventData::json(json).map_err(|e| e.to_string())),
        ) else {
            return;
        };
        let _ = self
            .store
            .append(AppendRequest {
                stream: name,
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![ProposedEvent::new(event_type, data)],
            })
            .await;
    }
}

impl<S: EventStore, A: Aggregate + Serialize + DeserializeOwned> Repository<'_, S, A> {
    /// Keeps a snapshot of the state in Skald (stream [`snapshot_stream`]) once a command
    /// takes the stream `events` or more past the last one, and loads from the newest
    /// snapshot on. `version` names the state's shape: raise it when the state type changes,
    /// and older snapshots are passed over (the stream is replayed in full once, and a new
    /// snapshot is written).
    pub fn snapshot_every(mut self, events: u64, version: u32) -> Self {
        self.snapshots = Some(Snapshots {
            every: events.max(1),
            version,
            write: |state| {
                serde_json::to_value(state)
                    .map_err(|e| CodecError::new(format!("the state does not serialize: {e}")))
            },
            read: |value| {
                serde_json::from_value(value)
                    .map_err(|e| CodecError::new(format!("the snapshot does not decode: {e}")))
            },
        });
        self
    }
}

/// What a replay found: the state, the snapshot it started from, and whether the watched
/// event id went by.
struct Replayed<A> {
    loaded: Loaded<A>,
    snapshot: Option<Revision>,
    /// The events stored under the watched key, when the replay passed them.
    keyed: Vec<RecordedEvent>,
}

/// The identity of one command, the same each time the command is sent again (by a process
/// manager after a crash). The ids of the events it causes are derived from it, so a repeat
/// is recognised by the store instead of applied twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CommandKey(String);

/// The namespace of the name-based (v5) UUIDs derived from command keys.
const COMMAND_KEY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5a1d_c0de_7e1f_4b2a_9c6e_0d4f_8a3b_2e17);

impl CommandKey {
    /// A key from any text that identifies the command, such as the id of the event that
    /// caused it and the command's index among those it caused.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key as text, for an `Idempotency-Key` header of an HTTP call.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the `index`th event the command appends: the same for the same key.
    pub fn event_id(&self, index: usize) -> EventId {
        EventId(uuid::Uuid::new_v5(
            &COMMAND_KEY_NAMESPACE,
            format!("{}/{index}", self.0).as_bytes(),
        ))
    }
}

/// Given-when-then for an aggregate, without a store: `given(events).when(command)` then
/// `then(events)` or `then_rejected(check)`.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in events {
        state.apply(&event);
    }
    Given { state }
}

/// The state a given-when-then test starts from.
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` against the state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let outcome = self.state.decide(&command);
        Then { outcome }
    }
}

/// What a command decided, to be checked.
pub struct Then<A: Aggregate> {
    outcome: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq + fmt::Debug,
    A::Error: fmt::Debug,
{
    /// Asserts the command caused exactly `expected`, and that each survives being stored and
    /// read back.
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) {
        match self.outcome {
            Ok(events) => {
                assert_eq!(events, expected, "the command caused other events");
                for event in &events {
                    // As it is written: with its version and tags.
                    let proposed = propose(event).expect("the event encodes");
                    let stored = RecordedEvent {
                        id: proposed.id,
                        stream: StreamName::from_stored("test-1".to_owned()),
                        event_type: proposed.event_type,
                        data: proposed.data,
                        metadata: proposed.metadata,
                        tags: proposed.tags,
                        source: None,
                        recorded_at: skald_core::Timestamp(0),
                        revision: Revision(0),
                        position: Position(0),
                    };
                    assert_eq!(&decode::<A::Event>(&stored).expect("it decodes"), event);
                }
            }
            Err(e) => panic!("the command was rejected: {e:?}; expected events {expected:?}"),
        }
    }

    /// Asserts the command was turned down, and hands the error to `check`.
    #[track_caller]
    pub fn then_rejected(self, check: impl FnOnce(&A::Error)) {
        match self.outcome {
            Ok(events) => panic!("the command was accepted with {events:?}; expected a rejection"),
            Err(e) => check(&e),
        }
    }
}
