//! The saga engine: definitions, the trigger loop, one task per running instance, and the
//! calls transports make (register, list, show, retry, cancel).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use skald_core::{
    AppendRequest, Category, Clock, Direction, Error, EventData, EventId, EventStore, EventType,
    ExpectedRevision, Metadata, ProposedEvent, ReadRequest, ReadSource, RecordedEvent, Result,
    Revision, StreamName, Timestamp,
};
use skald_hub::{Delivery, Hub, Start};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::actions::{self, Failure, HttpClient};
use crate::breaker::Breakers;
use crate::definition::{self, Action, Policy, SagaDefinition, Selection, key_at};
use crate::history::{Instance, Phase, SagaEvent, SagaState};
use crate::metrics::Metrics;
use crate::{Authority, Need, SagaOptions, Unrestricted, streams};

/// A registered definition, compiled for matching triggers.
struct Registered {
    definition: Arc<SagaDefinition>,
    trigger: Selection,
    position: u64,
    registered_at: Timestamp,
    /// Who registered it, as the server recorded them; its triggers and steps act with their
    /// rights (`Authority`).
    registrant: Option<Arc<Value>>,
}

impl Registered {
    fn new(
        definition: SagaDefinition,
        position: u64,
        registered_at: Timestamp,
        registrant: Option<Value>,
    ) -> Self {
        let trigger = Selection::new(
            definition.trigger.category.as_deref(),
            &definition.trigger.types,
            definition.trigger.query.as_deref(),
        );
        Self {
            definition: Arc::new(definition),
            trigger,
            position,
            registered_at,
            registrant: registrant.map(Arc::new),
        }
    }
}

/// Whether a definition starts instances for its triggers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Enabled,
    Disabled,
    /// Hidden from listings; its instances' histories stay. Registering the name again (at a
    /// higher version) brings it back, enabled.
    Deleted,
}

impl Status {
    fn event_type(self) -> &'static str {
        match self {
            Status::Enabled => "SagaEnabled",
            Status::Disabled => "SagaDisabled",
            Status::Deleted => "SagaDeleted",
        }
    }
}

/// One event of `$sagas-definitions`, read.
#[derive(Clone)]
enum Entry {
    Registered(Arc<Registered>),
    Status(String, Status),
}

/// Which definitions start instances, as of a position in the log: the newest version of
/// each name and its status. The trigger loop keeps one, fed in log order.
#[derive(Default)]
struct Triggering {
    newest: BTreeMap<String, Arc<Registered>>,
    status: HashMap<String, Status>,
}

impl Triggering {
    fn apply(&mut self, entry: &Entry) {
        match entry {
            Entry::Registered(r) => {
                let name = &r.definition.name;
                self.newest.insert(name.clone(), Arc::clone(r));
                if self.status.get(name) == Some(&Status::Deleted) {
                    self.status.remove(name);
                }
            }
            Entry::Status(name, status) => {
                self.status.insert(name.clone(), *status);
            }
        }
    }

    fn enabled(&self) -> impl Iterator<Item = &Arc<Registered>> {
        self.newest.values().filter(|r| {
            self.status
                .get(&r.definition.name)
                .is_none_or(|s| *s == Status::Enabled)
        })
    }
}

#[derive(Default)]
struct Catalog {
    /// Versions of each definition, oldest first (deleted ones too: their instances' histories
    /// name them).
    by_name: BTreeMap<String, Vec<Arc<Registered>>>,
    /// Every entry of `$sagas-definitions` with its position, in order.
    log: Vec<(u64, Entry)>,
    /// The status of each definition now.
    now: Triggering,
    /// The last revision of `$sagas-definitions`.
    revision: Option<u64>,
}

impl Catalog {
    fn add(&mut self, position: u64, entry: Entry) {
        if let Entry::Registered(r) = &entry {
            self.by_name
                .entry(r.definition.name.clone())
                .or_default()
                .push(Arc::clone(r));
        }
        self.now.apply(&entry);
        self.log.push((position, entry));
    }

    fn status(&self, name: &str) -> Option<Status> {
        self.by_name.contains_key(name).then(|| {
            self.now
                .status
                .get(name)
                .copied()
                .unwrap_or(Status::Enabled)
        })
    }

    /// The versions of a definition that is not deleted.
    fn visible(&self, name: &str) -> Result<&Vec<Arc<Registered>>> {
        match (self.by_name.get(name), self.status(name)) {
            (Some(_), Some(Status::Deleted)) => Err(Error::SagaNotFound(format!(
                "saga definition {name:?} was deleted; GET /v1/sagas lists the others"
            ))),
            (Some(versions), _) => Ok(versions),
            (None, _) => Err(Error::SagaNotFound(format!(
                "no saga definition is named {name:?}; GET /v1/sagas lists them"
            ))),
        }
    }
}

/// One instance the engine knows, running or not.
struct Live {
    stream: StreamName,
    definition: Arc<SagaDefinition>,
    /// The registrant of its definition's version.
    registrant: Option<Arc<Value>>,
    state: Mutex<Instance>,
    /// Serializes appends to the instance's stream, which go at exact expected revisions.
    writes: tokio::sync::Mutex<()>,
    /// Wakes the runner when a cancel arrives.
    wake: Notify,
}

impl Live {
    fn new(stream: StreamName, registered: &Registered, state: Instance) -> Arc<Self> {
        Arc::new(Self {
            stream,
            definition: Arc::clone(&registered.definition),
            registrant: registered.registrant.clone(),
            state: Mutex::new(state),
            writes: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }
}

pub(crate) struct Inner<S> {
    hub: Hub<S>,
    options: SagaOptions,
    clock: Arc<dyn Clock>,
    authority: Arc<dyn Authority>,
    catalog: Mutex<Catalog>,
    definition_writes: tokio::sync::Mutex<()>,
    instances: Mutex<HashMap<String, Arc<Live>>>,
    /// Finished instances in memory, in the order they finished, and counts of those let go.
    finished: Mutex<Finished>,
    running: Arc<Semaphore>,
    http: HttpClient,
    pub(crate) breakers: Breakers,
    pub(crate) metrics: Metrics,
    trigger_loop: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Signalled after each registration.
    registered: Notify,
    /// The first position the trigger loop has not finished with.
    trigger_next: AtomicU64,
}

/// Which finished instances stay in memory: at most `keep_finished`, the most recent.
#[derive(Default)]
struct Finished {
    order: VecDeque<String>,
    /// Instances let go, by definition and final state (for counts and metrics).
    released: BTreeMap<(String, SagaState), u64>,
}

/// The saga engine of one store. Cheap to clone.
pub struct Sagas<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Sagas<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The answer to a registration.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The definition's name.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// True when this exact definition was already registered: nothing was written.
    pub replayed: bool,
}

/// A definition and its versions, for listing.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefinitionSummary {
    /// The name.
    pub name: String,
    /// Whether its triggers start instances (`disable` stops them, `enable` resumes them).
    pub enabled: bool,
    /// The newest version.
    pub latest_version: u32,
    /// Every version, oldest first.
    pub versions: Vec<u32>,
    /// When the newest version was registered (µs since the epoch).
    pub registered_at: Timestamp,
    /// Instances by state.
    pub instances: BTreeMap<&'static str, u64>,
}

/// One instance, for listing.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSummary {
    /// The saga id.
    pub saga_id: String,
    /// Its history's stream.
    pub stream: String,
    /// The definition's name.
    pub definition: String,
    /// The version it runs on.
    pub version: u32,
    /// The correlation key.
    pub correlation_key: String,
    /// The trigger's stream.
    pub trigger_stream: String,
    /// Where it is.
    pub state: SagaState,
    /// Steps whose action succeeded, in order.
    pub completed_steps: Vec<String>,
    /// Steps whose compensation succeeded.
    pub compensated_steps: Vec<String>,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The last step error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it started (µs since the epoch).
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// What to list.
#[derive(Clone, Debug, Default)]
pub struct InstanceFilter {
    /// Only this state.
    pub state: Option<SagaState>,
    /// Only this definition.
    pub definition: Option<String>,
    /// At most this many (capped at [`MAX_LISTED`]).
    pub limit: Option<usize>,
}

/// The first pause of the trigger loop after a failed read; it doubles up to the most.
const TRIGGER_RETRY: Duration = Duration::from_millis(100);
const TRIGGER_RETRY_MAX: Duration = Duration::from_secs(5);
/// Events per page when instances are folded at start: with triggers up to the event size
/// limit, a page stays within tens of megabytes.
const FOLD_PAGE: usize = 64;

/// Most instances one listing returns.
pub const MAX_LISTED: usize = 1000;

/// Most history events one call returns.
pub const MAX_HISTORY: usize = 10_000;

/// One event of an instance's history.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// Its revision in the instance stream.
    pub revision: u64,
    /// Its global position.
    pub position: u64,
    /// When it was recorded (µs since the epoch).
    pub time: Timestamp,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The event's data.
    pub data: Value,
}

/// An instance with its whole history.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceHistory {
    /// The summary.
    #[serde(flatten)]
    pub summary: InstanceSummary,
    /// Every event, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// The saga id for a definition and correlation key: the same inputs give the same id, which
/// is what makes one instance per key.
pub fn saga_id(definition: &str, key: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(definition.len() + key.len() + 1);
    name.extend_from_slice(definition.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    uuid::Uuid::new_v5(&streams::NAMESPACE, &name)
}

enum Move {
    Run(usize, Phase),
    Record(Vec<SagaEvent>),
    Idle,
}

/// The step past which the instance can no longer be undone, if it has run or may have (an
/// attempt whose outcome is unknown).
fn passed_point_of_no_return<'a>(def: &'a SagaDefinition, state: &Instance) -> Option<&'a str> {
    let step = &def.steps[def.point_of_no_return()?];
    (state.outputs.contains_key(&step.name) || state.possibly_done.contains(&step.name))
        .then_some(step.name.as_str())
}

/// What an instance does next, from its definition and state alone.
fn next_move(def: &SagaDefinition, state: &Instance) -> Move {
    match state.state {
        SagaState::Running => {
            if state.cancel_requested && passed_point_of_no_return(def, state).is_none() {
                return Move::Record(vec![SagaEvent::SagaCompensating {
                    reason: "cancelled".into(),
                    step: None,
                }]);
            }
            match def
                .steps
                .iter()
                .position(|s| !state.outputs.contains_key(&s.name))
            {
                Some(i) => Move::Run(i, Phase::Action),
                None => Move::Record(vec![SagaEvent::SagaCompleted {}]),
            }
        }
        SagaState::Compensating => {
            // Steps that succeeded, and steps whose outcome is unknown (they may have acted),
            // newest first.
            let next = def.steps.iter().rposition(|s| {
                s.compensation.is_some()
                    && (state.outputs.contains_key(&s.name)
                        || state.possibly_done.contains(&s.name))
                    && !state.compensated.contains(&s.name)
            });
            match next {
                // A compensation that reads its step's output needs it first: the action is
                // sent again with its idempotency key, and its answer is the output.
                Some(i)
                    if !state.outputs.contains_key(&def.steps[i].name)
                        && def.steps[i].compensation_reads_own_output() =>
                {
                    Move::Run(i, Phase::Action)
                }
                Some(i) => Move::Run(i, Phase::Compensation),
                None if state.cancel_requested => Move::Record(vec![SagaEvent::SagaCancelled {}]),
                None => Move::Record(vec![SagaEvent::SagaCompensated {}]),
            }
        }
        _ => Move::Idle,
    }
}

impl<S: EventStore> Sagas<S> {
    /// Loads definitions and instances from the store, resumes every unfinished instance and
    /// starts following triggers.
    pub async fn start(hub: Hub<S>, options: SagaOptions, clock: Arc<dyn Clock>) -> Result<Self> {
        Self::start_with(hub, options, clock, Arc::new(Unrestricted)).await
    }

    /// [`Sagas::start`] with the authority that decides what each definition's registrant
    /// may still do.
    pub async fn start_with(
        hub: Hub<S>,
        options: SagaOptions,
        clock: Arc<dyn Clock>,
        authority: Arc<dyn Authority>,
    ) -> Result<Self> {
        let egress = crate::egress::Egress::new(&options.egress)
            .map_err(|e| Error::invalid(format!("[sagas.egress] {e}")))?;
        let inner = Arc::new(Inner {
            running: Arc::new(Semaphore::new(options.max_running)),
            breakers: Breakers::new(options.breaker.clone()),
            http: actions::http_client(Arc::new(egress), options.ca_file.as_deref())
                .map_err(|e| Error::InvalidConfig(format!("[sagas] ca_file: {e}")))?,
            hub,
            options,
            clock,
            authority,
            catalog: Mutex::new(Catalog::default()),
            definition_writes: tokio::sync::Mutex::new(()),
            instances: Mutex::new(HashMap::new()),
            finished: Mutex::new(Finished::default()),
            metrics: Metrics::default(),
            trigger_loop: Mutex::new(None),
            registered: Notify::new(),
            trigger_next: AtomicU64::new(0),
        });
        let sagas = Self { inner };
        sagas.load_definitions().await?;
        let from = sagas.trigger_start().await?;
        sagas.load_instances().await?;
        let preloaded = {
            let catalog = sagas.inner.catalog.lock().expect("catalog lock");
            let mut triggering = Triggering::default();
            for (_, entry) in catalog.log.iter().filter(|(p, _)| *p < from) {
                triggering.apply(entry);
            }
            triggering
        };
        sagas.inner.trigger_next.store(from, Ordering::Relaxed);
        let inner = Arc::clone(&sagas.inner);
        let task = tokio::spawn(async move {
            if let Err(e) = Inner::follow_triggers(&inner, from, preloaded).await {
                tracing::error!(
                    "the saga trigger loop stopped: {e}; no new sagas start until a restart"
                );
            }
        });
        *sagas.inner.trigger_loop.lock().expect("loop lock") = Some(task);
        Ok(sagas)
    }

    async fn read_all(&self, source: ReadSource, each: impl FnMut(&RecordedEvent)) -> Result<()> {
        skald_core::read_to_end(&**self.inner.hub.store(), source, each).await
    }

    async fn load_definitions(&self) -> Result<()> {
        let mut catalog = Catalog::default();
        self.read_all(ReadSource::Stream(streams::definitions()), |event| {
            catalog.revision = Some(event.revision.0);
            match entry_of(event) {
                Some(entry) => catalog.add(event.position.0, entry),
                None => tracing::warn!(
                    position = event.position.0,
                    "a saga definition event cannot be read and is ignored"
                ),
            }
        })
        .await?;
        *self.inner.catalog.lock().expect("catalog lock") = catalog;
        Ok(())
    }

    /// Where the trigger loop starts: after its checkpoint; else at the first definition (no
    /// trigger before it can match); else at the head.
    async fn trigger_start(&self) -> Result<u64> {
        let store = self.inner.hub.store();
        let last = store
            .read(ReadRequest {
                source: ReadSource::Stream(streams::triggers()),
                from: None,
                direction: Direction::Backward,
                limit: 1,
            })
            .await?;
        if let Some(event) = last.events.first() {
            let data: Value = serde_json::from_slice(event.data.bytes()).unwrap_or_default();
            if let Some(next) = data["next"].as_u64() {
                return Ok(next);
            }
        }
        match self.inner.first_definition_at_or_after(0) {
            Some(position) => Ok(position),
            None => store.next_position().await,
        }
    }

    async fn load_instances(&self) -> Result<()> {
        let mut folded: HashMap<StreamName, Instance> = HashMap::new();
        // Instances whose final event was folded, in the order they finished: at most
        // `keep_finished` stay, the older ones are only counted.
        let keep = self.inner.options.keep_finished;
        let mut finished: VecDeque<(StreamName, Instance)> = VecDeque::new();
        let mut released: BTreeMap<(String, SagaState), u64> = BTreeMap::new();
        let category = Category::from_stored(streams::INSTANCE_CATEGORY.to_owned());
        let store = self.inner.hub.store();
        // Small pages: a trigger may be large, and a page is held whole while it is folded.
        skald_core::read_to_end_by(
            &**store,
            ReadSource::Category(category),
            FOLD_PAGE,
            |event| {
                let Some(saga_event) = SagaEvent::from_recorded(event) else {
                    tracing::warn!(
                        stream = %event.stream,
                        revision = event.revision.0,
                        "a saga history event cannot be read and is ignored"
                    );
                    return;
                };
                let Some(state) = folded.get_mut(&event.stream) else {
                    if let Some(state) = Instance::start(&saga_event, event.recorded_at) {
                        folded.insert(event.stream.clone(), state);
                    }
                    return;
                };
                state.apply(&saga_event, event.recorded_at, event.revision.0);
                if state.state.is_final() {
                    // Nothing follows a final event: the instance leaves the fold compacted, and
                    // memory at start is bounded by the instances still running.
                    let (stream, mut state) = folded.remove_entry(&event.stream).expect("present");
                    state.compact();
                    finished.push_back((stream, state));
                    if finished.len() > keep
                        && let Some((_, old)) = finished.pop_front()
                    {
                        *released.entry((old.definition, old.state)).or_default() += 1;
                    }
                }
            },
        )
        .await?;
        let order: VecDeque<String> = finished
            .iter()
            .map(|(_, state)| state.saga_id.clone())
            .collect();
        // Every instance is in memory before any runner starts: one that finishes at once
        // then finds the finished ones kept, and lets go of the oldest.
        let mut runners = Vec::new();
        for (stream, state) in folded.into_iter().chain(finished) {
            let Some(registered) = self.definition_version(&state.definition, state.version) else {
                tracing::error!(
                    saga = %state.saga_id,
                    "saga definition {} version {} is not registered; the instance is left as it is",
                    state.definition,
                    state.version
                );
                continue;
            };
            let unfinished = matches!(state.state, SagaState::Running | SagaState::Compensating);
            let mut state = state;
            // The engine may have stopped while an attempt of the next step was in flight
            // (kill -9, power loss): nothing records such an attempt, and it may have reached
            // the target. That step (the first without an output, even when a cancel was
            // asked for) counts as possibly done, so that it is compensated if the saga is,
            // and a pivot is not followed by undoing the steps before it. Its next failure
            // records this (`outcomeUnknown`), so a later fold decides the same.
            if state.state == SagaState::Running
                && let Some(step) = registered
                    .definition
                    .steps
                    .iter()
                    .find(|s| !state.outputs.contains_key(&s.name))
                && matches!(step.action, Action::Http(_) | Action::Append(_))
            {
                state.possibly_done.insert(step.name.clone());
            }
            let live = Live::new(stream, &registered, state);
            let id = live.state.lock().expect("state lock").saga_id.clone();
            self.inner
                .instances
                .lock()
                .expect("instances lock")
                .insert(id, Arc::clone(&live));
            if unfinished {
                runners.push(live);
            }
        }
        {
            let mut kept = self.inner.finished.lock().expect("finished lock");
            kept.released = released;
            kept.order = order;
        }
        let resumed = runners.len();
        for live in runners {
            Inner::spawn_runner(&self.inner, live, None);
        }
        if resumed > 0 {
            tracing::info!(resumed, "resuming unfinished sagas");
        }
        Ok(())
    }

    /// An instance by id: from memory, or (a finished one let go) folded from its stream.
    async fn live_or_load(&self, saga_id: &str) -> Result<Arc<Live>> {
        if let Ok(live) = self.live(saga_id) {
            return Ok(live);
        }
        // Only a saga id (a UUID) names an instance stream.
        let Ok(id) = uuid::Uuid::parse_str(saga_id) else {
            return Err(Self::not_found(saga_id));
        };
        let stream = streams::instance(&id.to_string());
        let mut folded: Option<Instance> = None;
        skald_core::read_to_end_by(
            &**self.inner.hub.store(),
            ReadSource::Stream(stream.clone()),
            FOLD_PAGE,
            |event| {
                let Some(saga_event) = SagaEvent::from_recorded(event) else {
                    return;
                };
                match &mut folded {
                    Some(state) => {
                        state.apply(&saga_event, event.recorded_at, event.revision.0);
                        if state.state.is_final() {
                            state.compact();
                        }
                    }
                    None => folded = Instance::start(&saga_event, event.recorded_at),
                }
            },
        )
        .await?;
        // Only a finished instance is ever let go: one found running here is still being
        // started (its SagaStarted stored, the instance not yet in memory), and is answered
        // as in memory it is, not there yet.
        let state = folded
            .filter(|state| state.state.is_final())
            .ok_or_else(|| Self::not_found(saga_id))?;
        let registered = self
            .definition_version(&state.definition, state.version)
            .ok_or_else(|| Self::not_found(saga_id))?;
        Ok(Live::new(stream, &registered, state))
    }

    fn definition_version(&self, name: &str, version: u32) -> Option<Arc<Registered>> {
        let catalog = self.inner.catalog.lock().expect("catalog lock");
        catalog
            .by_name
            .get(name)?
            .iter()
            .find(|r| r.definition.version == version)
            .cloned()
    }

    /// Registers a definition from YAML or JSON text. Registering the same text again is a
    /// no-op; a version already registered with other content is a conflict.
    pub async fn register(&self, text: &str) -> Result<Registration> {
        let definition = definition::parse(text).map_err(|e| Error::InvalidSaga(e.to_string()))?;
        self.register_as(definition, None).await
    }

    /// Registers a parsed definition for `registrant` (recorded as given, read back by the
    /// [`Authority`] whenever a trigger or a step of it runs).
    pub async fn register_as(
        &self,
        definition: SagaDefinition,
        registrant: Option<Value>,
    ) -> Result<Registration> {
        let _writes = self.inner.definition_writes.lock().await;
        let (revision, latest) = {
            let catalog = self.inner.catalog.lock().expect("catalog lock");
            let versions = catalog.by_name.get(&definition.name);
            let deleted = catalog.status(&definition.name) == Some(Status::Deleted);
            if let Some(same) = versions.and_then(|v| {
                v.iter()
                    .find(|r| r.definition.version == definition.version)
            }) {
                if *same.definition == definition && !deleted {
                    return Ok(Registration {
                        name: definition.name,
                        version: definition.version,
                        replayed: true,
                    });
                }
                let next = versions
                    .and_then(|v| v.last())
                    .map_or(1, |r| r.definition.version + 1);
                return Err(Error::SagaConflict(if deleted {
                    format!(
                        "saga {} version {} was registered before it was deleted; register it \
                         again as version {next}",
                        definition.name, definition.version
                    )
                } else {
                    format!(
                        "saga {} version {} is already registered with different content; \
                         register it as version {next}",
                        definition.name, definition.version
                    )
                }));
            }
            (
                catalog.revision,
                versions
                    .and_then(|v| v.last())
                    .map(|r| r.definition.version),
            )
        };
        if let Some(latest) = latest.filter(|l| *l > definition.version) {
            return Err(Error::SagaConflict(format!(
                "saga {} is at version {latest}; a new version must be higher",
                definition.name
            )));
        }
        let mut data = json!({ "definition": definition });
        if let Some(registrant) = &registrant {
            data["registrant"] = registrant.clone();
        }
        let data = data.to_string();
        let event = ProposedEvent::new(
            EventType::from_stored("SagaRegistered".into()),
            EventData::json(data)?,
        );
        let result = self
            .inner
            .hub
            .store()
            .append(AppendRequest {
                stream: streams::definitions(),
                expected: match revision {
                    Some(r) => ExpectedRevision::Exact(Revision(r)),
                    None => ExpectedRevision::NoStream,
                },
                condition: None,
                events: vec![event],
            })
            .await?;
        let registered = Registered::new(
            definition.clone(),
            result.first_position.0,
            self.inner.clock.now(),
            registrant,
        );
        let mut catalog = self.inner.catalog.lock().expect("catalog lock");
        catalog.revision = Some(result.last_revision.0);
        catalog.add(
            result.first_position.0,
            Entry::Registered(Arc::new(registered)),
        );
        drop(catalog);
        self.inner.registered.notify_waiters();
        tracing::info!(saga = %definition.name, version = definition.version, "saga definition registered");
        Ok(Registration {
            name: definition.name,
            version: definition.version,
            replayed: false,
        })
    }

    /// Stops a definition's triggers from starting instances, from this point in the log on;
    /// instances already started run to their end. `Ok(false)` when it was disabled already.
    /// `by` is recorded with the event, as the registrant is.
    pub async fn disable(&self, name: &str, by: Option<Value>) -> Result<bool> {
        self.set_status(name, Status::Disabled, by).await
    }

    /// Lets a disabled definition's triggers start instances again, from this point in the log
    /// on (triggers while it was disabled start none). `Ok(false)` when it was enabled already.
    pub async fn enable(&self, name: &str, by: Option<Value>) -> Result<bool> {
        self.set_status(name, Status::Enabled, by).await
    }

    /// Deletes a definition: it is no longer listed and starts no instances; its instances'
    /// histories stay. Refused while any instance of it is running, compensating or stuck.
    /// `Ok(false)` when it was deleted already.
    pub async fn delete(&self, name: &str, by: Option<Value>) -> Result<bool> {
        self.set_status(name, Status::Deleted, by).await
    }

    async fn set_status(&self, name: &str, status: Status, by: Option<Value>) -> Result<bool> {
        let _writes = self.inner.definition_writes.lock().await;
        let revision = {
            let catalog = self.inner.catalog.lock().expect("catalog lock");
            match catalog.status(name) {
                Some(Status::Deleted) if status == Status::Deleted => return Ok(false),
                Some(now) if now == status => return Ok(false),
                _ => {
                    catalog.visible(name)?;
                }
            }
            catalog.revision
        };
        if status == Status::Deleted {
            let unfinished: Vec<String> = self
                .state_counts()
                .into_iter()
                .filter(|((d, s), _)| d == name && !s.is_final())
                .map(|((_, s), n)| format!("{n} {}", s.as_str()))
                .collect();
            if !unfinished.is_empty() {
                return Err(Error::SagaConflict(format!(
                    "saga {name} has unfinished instances ({}); disable it so that no more \
                     start, let them end (retry or cancel the stuck ones), then delete it",
                    unfinished.join(", ")
                )));
            }
        }
        let mut data = json!({ "name": name });
        if let Some(by) = by {
            data["by"] = by;
        }
        let event = ProposedEvent::new(
            EventType::from_stored(status.event_type().into()),
            EventData::json(data.to_string())?,
        );
        let result = self
            .inner
            .hub
            .store()
            .append(AppendRequest {
                stream: streams::definitions(),
                expected: match revision {
                    Some(r) => ExpectedRevision::Exact(Revision(r)),
                    None => ExpectedRevision::NoStream,
                },
                condition: None,
                events: vec![event],
            })
            .await?;
        let mut catalog = self.inner.catalog.lock().expect("catalog lock");
        catalog.revision = Some(result.last_revision.0);
        catalog.add(
            result.first_position.0,
            Entry::Status(name.to_owned(), status),
        );
        drop(catalog);
        tracing::info!(saga = %name, "saga definition {}", status.event_type());
        Ok(true)
    }

    /// Every definition, with its versions and instance counts.
    pub fn definitions(&self) -> Vec<DefinitionSummary> {
        let counts = self.state_counts();
        let catalog = self.inner.catalog.lock().expect("catalog lock");
        catalog
            .by_name
            .iter()
            .filter_map(|(name, versions)| {
                let latest = versions.last()?;
                let status = catalog.status(name)?;
                if status == Status::Deleted {
                    return None;
                }
                Some(DefinitionSummary {
                    enabled: status == Status::Enabled,
                    name: name.clone(),
                    latest_version: latest.definition.version,
                    versions: versions.iter().map(|r| r.definition.version).collect(),
                    registered_at: latest.registered_at,
                    instances: counts
                        .iter()
                        .filter(|((d, _), _)| d == name)
                        .map(|((_, s), n)| (s.as_str(), *n))
                        .collect(),
                })
            })
            .collect()
    }

    /// One definition: a version, or the newest.
    pub fn definition(&self, name: &str, version: Option<u32>) -> Result<SagaDefinition> {
        let catalog = self.inner.catalog.lock().expect("catalog lock");
        let versions = catalog.visible(name)?;
        let found = match version {
            Some(v) => versions.iter().find(|r| r.definition.version == v),
            None => versions.last(),
        };
        found.map(|r| (*r.definition).clone()).ok_or_else(|| {
            Error::SagaNotFound(format!(
                "saga {name} has no version {}; it has {}",
                version.unwrap_or_default(),
                versions
                    .iter()
                    .map(|r| r.definition.version.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Instance counts by definition and state.
    pub fn state_counts(&self) -> BTreeMap<(String, SagaState), u64> {
        // Held throughout (finished, then instances, as everywhere), so that an instance let
        // go meanwhile is counted once.
        let finished = self.inner.finished.lock().expect("finished lock");
        let mut counts = finished.released.clone();
        let instances = self.inner.instances.lock().expect("instances lock");
        for live in instances.values() {
            let state = live.state.lock().expect("state lock");
            *counts
                .entry((state.definition.clone(), state.state))
                .or_default() += 1;
        }
        counts
    }

    /// Instances matching a filter, newest first.
    pub fn instances(&self, filter: &InstanceFilter) -> Vec<InstanceSummary> {
        let limit = filter.limit.unwrap_or(100).min(MAX_LISTED);
        let instances = self.inner.instances.lock().expect("instances lock");
        let mut found: Vec<InstanceSummary> = instances
            .values()
            .filter_map(|live| {
                let state = live.state.lock().expect("state lock");
                let wanted = filter.state.is_none_or(|s| s == state.state)
                    && filter
                        .definition
                        .as_ref()
                        .is_none_or(|d| *d == state.definition);
                wanted.then(|| summary_of(live, &state))
            })
            .collect();
        found.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then_with(|| a.saga_id.cmp(&b.saga_id))
        });
        found.truncate(limit);
        found
    }

    fn live(&self, saga_id: &str) -> Result<Arc<Live>> {
        self.inner
            .instances
            .lock()
            .expect("instances lock")
            .get(saga_id)
            .cloned()
            .ok_or_else(|| Self::not_found(saga_id))
    }

    /// One instance's summary, without reading its history (unless it is a finished one no
    /// longer kept in memory).
    pub async fn summary(&self, saga_id: &str) -> Result<InstanceSummary> {
        let live = self.live_or_load(saga_id).await?;
        let state = live.state.lock().expect("state lock");
        Ok(summary_of(&live, &state))
    }

    /// The answer for an instance a caller may not see: the same as for one that does not
    /// exist, so that neither its existence nor its definition is told.
    pub fn not_found(saga_id: &str) -> Error {
        Error::SagaNotFound(format!(
            "no saga instance has id {saga_id:?}; GET /v1/saga-instances lists them"
        ))
    }

    /// One instance with its history.
    pub async fn history(&self, saga_id: &str) -> Result<InstanceHistory> {
        let live = self.live_or_load(saga_id).await?;
        let summary = summary_of(&live, &live.state.lock().expect("state lock"));
        let mut history = Vec::new();
        self.read_all(ReadSource::Stream(live.stream.clone()), |event| {
            if history.len() < MAX_HISTORY {
                history.push(HistoryEntry {
                    revision: event.revision.0,
                    position: event.position.0,
                    time: event.recorded_at,
                    event_type: event.event_type.as_str().to_owned(),
                    data: serde_json::from_slice(event.data.bytes()).unwrap_or(Value::Null),
                });
            }
        })
        .await?;
        Ok(InstanceHistory { summary, history })
    }

    /// Resumes a stuck instance where it stopped, with fresh attempts.
    pub async fn retry(&self, saga_id: &str) -> Result<InstanceSummary> {
        let live = self.live_or_load(saga_id).await?;
        {
            let _writes = live.writes.lock().await;
            let state = live.state.lock().expect("state lock").state;
            if state != SagaState::Stuck {
                return Err(Error::SagaConflict(format!(
                    "saga {saga_id} is {}; only a stuck saga can be retried",
                    state.as_str()
                )));
            }
            Inner::append_locked(&self.inner, &live, vec![SagaEvent::SagaRetryRequested {}])
                .await?;
        }
        Inner::spawn_runner(&self.inner, Arc::clone(&live), None);
        Ok(summary_of(&live, &live.state.lock().expect("state lock")))
    }

    /// Cancels a running instance: the step in flight finishes its attempt, then the completed
    /// steps are compensated.
    pub async fn cancel(&self, saga_id: &str, reason: &str) -> Result<InstanceSummary> {
        let live = self.live_or_load(saga_id).await?;
        {
            let _writes = live.writes.lock().await;
            let (state, past_pivot) = {
                let state = live.state.lock().expect("state lock");
                let past = passed_point_of_no_return(&live.definition, &state);
                (state.state, past.map(str::to_owned))
            };
            if state != SagaState::Running {
                return Err(Error::SagaConflict(format!(
                    "saga {saga_id} is {}; only a running saga can be cancelled (retry a stuck \
                     one)",
                    state.as_str()
                )));
            }
            if let Some(step) = past_pivot {
                return Err(Error::SagaConflict(format!(
                    "saga {saga_id} is past its point of no return (step {step:?} succeeded, \
                     or may have: an attempt's outcome is unknown) and can no longer be cancelled"
                )));
            }
            Inner::append_locked(
                &self.inner,
                &live,
                vec![SagaEvent::SagaCancelRequested {
                    reason: reason.to_owned(),
                }],
            )
            .await?;
        }
        // A stored permit, so that a runner about to wait still sees it.
        live.wake.notify_one();
        Ok(summary_of(&live, &live.state.lock().expect("state lock")))
    }

    /// The first position the trigger loop has not finished with.
    pub fn trigger_position(&self) -> u64 {
        self.inner.trigger_next.load(Ordering::Relaxed)
    }

    /// Writes the engine's metrics.
    pub fn write_metrics(&self, out: &mut skald_core::metrics::Exposition) {
        crate::metrics::write(self, &self.inner, out);
    }

    /// Waits (after [`Hub::shutdown`]) for the trigger loop to write its checkpoint and for
    /// runners to stop at their next step boundary, at most `grace`.
    pub async fn stopped(&self, grace: Duration) {
        let task = self.inner.trigger_loop.lock().expect("loop lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let all = u32::try_from(self.inner.options.max_running).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, self.inner.running.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                "saga steps still in flight after {grace:?}; they run again after the restart"
            );
        }
    }
}

/// Why a runner of a node whose lease on the sagas ran out records nothing more.
fn lease_ended() -> Error {
    Error::Unavailable(
        "this node's lease on the sagas ended; the instance goes on where they run now".into(),
    )
}

/// An event of `$sagas-definitions`, read; `None` when it cannot be.
fn entry_of(event: &RecordedEvent) -> Option<Entry> {
    let data: Value = serde_json::from_slice(event.data.bytes()).ok()?;
    let status = match event.event_type.as_str() {
        "SagaRegistered" => {
            let definition: SagaDefinition =
                serde_json::from_value(data.get("definition")?.clone()).ok()?;
            return Some(Entry::Registered(Arc::new(Registered::new(
                definition,
                event.position.0,
                event.recorded_at,
                data.get("registrant").cloned(),
            ))));
        }
        "SagaEnabled" => Status::Enabled,
        "SagaDisabled" => Status::Disabled,
        "SagaDeleted" => Status::Deleted,
        _ => return None,
    };
    Some(Entry::Status(
        data.get("name")?.as_str()?.to_owned(),
        status,
    ))
}

fn summary_of(live: &Live, state: &Instance) -> InstanceSummary {
    InstanceSummary {
        saga_id: state.saga_id.clone(),
        stream: live.stream.as_str().to_owned(),
        definition: state.definition.clone(),
        version: state.version,
        correlation_key: state.correlation_key.clone(),
        trigger_stream: state.trigger_stream.clone(),
        state: state.state,
        completed_steps: live
            .definition
            .steps
            .iter()
            .filter(|s| state.outputs.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect(),
        compensated_steps: state.compensated.iter().cloned().collect(),
        cancel_requested: state.cancel_requested,
        last_error: state.last_error.clone(),
        started_at: state.started_at,
        updated_at: state.updated_at,
    }
}

fn proposed(event: &SagaEvent, metadata: &str) -> Result<ProposedEvent> {
    let (kind, data) = event.to_parts();
    Ok(ProposedEvent {
        id: EventId::generate(),
        event_type: EventType::from_stored(kind),
        data: EventData::json(data)?,
        metadata: Metadata::from_stored(metadata.to_owned()),
        tags: Vec::new(),
        source: None,
    })
}

impl<S: EventStore> Inner<S> {
    /// An instance has just finished: it joins the finished ones kept in memory, and the
    /// oldest beyond `keep_finished` leave it (counted by definition and state).
    fn finished_one(&self, live: &Live) {
        let id = live.state.lock().expect("state lock").saga_id.clone();
        let mut finished = self.finished.lock().expect("finished lock");
        finished.order.push_back(id);
        while finished.order.len() > self.options.keep_finished {
            let Some(old) = finished.order.pop_front() else {
                break;
            };
            let mut instances = self.instances.lock().expect("instances lock");
            let gone = instances
                .get(&old)
                .filter(|l| l.state.lock().expect("state lock").state.is_final())
                .cloned();
            if let Some(gone) = gone {
                instances.remove(&old);
                let state = gone.state.lock().expect("state lock");
                *finished
                    .released
                    .entry((state.definition.clone(), state.state))
                    .or_default() += 1;
            }
        }
    }

    /// Follows the global log: definitions as they are registered, and trigger events.
    async fn follow_triggers(inner: &Arc<Self>, from: u64, preloaded: Triggering) -> Result<()> {
        let mut active = preloaded;
        let mut from = from;
        if active.newest.is_empty() {
            // Nothing can trigger before the first definition: a store without sagas does not
            // pay for following its log.
            match inner.first_registration(from).await {
                Some(position) => from = from.max(position),
                None => return Ok(()),
            }
        }
        // `None` after a failed read: the loop subscribes again from `seen` after a pause, as
        // groups do, rather than stopping until a restart.
        let mut subscription = None;
        let mut failures = 0u32;
        let starting = Arc::new(Semaphore::new(inner.options.max_starting));
        let mut rate = StartRate::new(inner.options.max_starts_per_second);
        // Positions whose starts are not all stored yet (several definitions may start from one
        // event), with how many are under way; the checkpoint stays before the oldest.
        let in_flight: Arc<Mutex<BTreeMap<u64, usize>>> = Arc::new(Mutex::new(BTreeMap::new()));
        // Saga ids with a start under way, each with what closes when it is done.
        let starting_ids: Arc<Mutex<HashMap<String, tokio::sync::watch::Receiver<()>>>> =
            Arc::new(Mutex::new(HashMap::new()));
        let mut seen = from;
        let mut written = from;
        let mut checkpoint_timer = tokio::time::interval(inner.options.checkpoint_every);
        checkpoint_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'follow: loop {
            if failures > 0 {
                // 100 ms, 200 ms, ... up to 5 s.
                let pause = TRIGGER_RETRY
                    .saturating_mul(1 << (failures - 1).min(6))
                    .min(TRIGGER_RETRY_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = inner.hub.stopping() => break,
                }
            }
            let follower = match &mut subscription {
                Some(follower) => follower,
                None => match inner
                    .hub
                    .subscribe(ReadSource::All(None), Start::Position(seen))
                    .await
                {
                    Ok(follower) => subscription.insert(follower),
                    Err(e) => {
                        failures += 1;
                        inner
                            .metrics
                            .trigger_read_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "the saga trigger loop cannot follow the log from position {seen}: {e}; \
                             it tries again"
                        );
                        continue;
                    }
                },
            };
            let delivery = tokio::select! {
                d = follower.next() => d,
                _ = checkpoint_timer.tick() => {
                    written = inner.write_checkpoint(seen, &in_flight, written).await;
                    continue;
                }
                _ = inner.hub.stopping() => break,
            };
            let events = match delivery {
                Ok(Delivery::Events(events)) => events,
                Ok(Delivery::CaughtUp { .. }) => {
                    failures = 0;
                    continue;
                }
                Err(e) if inner.hub.is_stopping() => {
                    tracing::debug!("trigger loop ends: {e}");
                    break;
                }
                Err(e) => {
                    failures += 1;
                    inner
                        .metrics
                        .trigger_read_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "the saga trigger loop cannot read the log at position {seen}: {e}; it \
                         tries again"
                    );
                    subscription = None;
                    continue;
                }
            };
            failures = 0;
            // A disable or delete stops starts at once, also of triggers logged before it that
            // the loop has not reached yet (a backlog must not outlast the kill switch); an
            // enable takes effect from its position only.
            let stopped = inner.stopped_now();
            // `seen` moves past an event only once every start it triggers is under way, so
            // that a shutdown while waiting for room cannot checkpoint past a trigger. Such a
            // shutdown ends the whole loop: were a later delivery taken after it, its starts
            // would move `seen` past the event whose start never happened.
            for event in events {
                // The loop's own checkpoints do not move it: were they to, each checkpoint
                // would call for the next, one event a second for ever on an idle store.
                if event.stream == streams::triggers() {
                    continue;
                }
                if event.stream == streams::definitions() {
                    if let Some(entry) = entry_of(&event) {
                        active.apply(&entry);
                    }
                } else if !event.stream.is_system() {
                    for registered in active.enabled() {
                        if !registered.trigger.matches(&event)
                            || stopped.contains(&registered.definition.name)
                        {
                            continue;
                        }
                        let need = Need::Read(event.stream.as_str());
                        if let Err(why) = inner
                            .authority
                            .check(registered.registrant.as_deref(), need)
                        {
                            inner
                                .metrics
                                .refused_triggers
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                saga = %registered.definition.name,
                                position = event.position.0,
                                "the trigger starts no saga: its registrant may not read it: {why}"
                            );
                            continue;
                        }
                        while let Some(wait) =
                            rate.take(&registered.definition.name, Instant::now())
                        {
                            inner.metrics.start_waits.fetch_add(1, Ordering::Relaxed);
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = inner.hub.stopping() => break 'follow,
                            }
                        }
                        let trigger = definition::event_json(&event);
                        let key = key_at(&trigger, &registered.definition.correlation_key);
                        let id = key
                            .as_ref()
                            .map(|key| saga_id(&registered.definition.name, key).to_string());
                        // The first trigger for a saga wins. Starts run concurrently, in no
                        // fixed order, so a later trigger for the same saga waits until the
                        // start of an earlier one is done (and then finds the saga there).
                        // A saga that exists already: the trigger is a duplicate, and waits for
                        // nothing.
                        if id.as_ref().is_some_and(|id| {
                            inner
                                .instances
                                .lock()
                                .expect("instances lock")
                                .contains_key(id)
                        }) {
                            inner.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let earlier = id.as_ref().and_then(|id| {
                            starting_ids.lock().expect("starting lock").get(id).cloned()
                        });
                        if let Some(mut done) = earlier {
                            tokio::select! {
                                () = async { while done.changed().await.is_ok() {} } => {}
                                _ = inner.hub.stopping() => break 'follow,
                            }
                        }
                        let permit = tokio::select! {
                            p = Arc::clone(&inner.running).acquire_owned() => p.expect("never closed"),
                            _ = inner.hub.stopping() => break 'follow,
                        };
                        let start_slot = Arc::clone(&starting)
                            .acquire_owned()
                            .await
                            .expect("never closed");
                        let position = event.position.0;
                        *in_flight
                            .lock()
                            .expect("in-flight lock")
                            .entry(position)
                            .or_default() += 1;
                        let inner = Arc::clone(inner);
                        let registered = Arc::clone(registered);
                        let event = Arc::clone(&event);
                        let in_flight = Arc::clone(&in_flight);
                        let (done, done_rx) = tokio::sync::watch::channel(());
                        if let Some(id) = &id {
                            starting_ids
                                .lock()
                                .expect("starting lock")
                                .insert(id.clone(), done_rx.clone());
                        }
                        let starting_ids = Arc::clone(&starting_ids);
                        tokio::spawn(async move {
                            inner
                                .start_instance(&registered, &event, trigger, key, permit)
                                .await;
                            if let Some(id) = id {
                                let mut ids = starting_ids.lock().expect("starting lock");
                                if ids.get(&id).is_some_and(|r| r.same_channel(&done_rx)) {
                                    ids.remove(&id);
                                }
                            }
                            drop(done);
                            let mut in_flight = in_flight.lock().expect("in-flight lock");
                            let starts = in_flight.get_mut(&position).expect("counted above");
                            *starts -= 1;
                            if *starts == 0 {
                                in_flight.remove(&position);
                            }
                            drop(start_slot);
                        });
                    }
                }
                seen = event.position.0 + 1;
            }
            inner
                .trigger_next
                .store(checkpoint_of(seen, &in_flight), Ordering::Relaxed);
        }
        // Starts in flight finish before the last checkpoint, so that it can pass them.
        let _ = starting
            .acquire_many(u32::try_from(inner.options.max_starting).unwrap_or(u32::MAX))
            .await;
        inner.write_checkpoint(seen, &in_flight, written).await;
        Ok(())
    }

    /// The definitions disabled or deleted now.
    fn stopped_now(&self) -> std::collections::HashSet<String> {
        let catalog = self.catalog.lock().expect("catalog lock");
        catalog
            .now
            .status
            .iter()
            .filter(|(_, status)| **status != Status::Enabled)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The position of the first definition registered at or after `from`.
    fn first_definition_at_or_after(&self, from: u64) -> Option<u64> {
        self.catalog
            .lock()
            .expect("catalog lock")
            .by_name
            .values()
            .flatten()
            .map(|r| r.position)
            .filter(|p| *p >= from)
            .min()
    }

    /// Waits for the first definition registered at or after `from`; `None` on shutdown.
    async fn first_registration(&self, from: u64) -> Option<u64> {
        loop {
            let registered = self.registered.notified();
            let first = self.first_definition_at_or_after(from);
            if first.is_some() {
                return first;
            }
            tokio::select! {
                _ = registered => {}
                _ = self.hub.stopping() => return None,
            }
        }
    }

    async fn write_checkpoint(
        &self,
        seen: u64,
        in_flight: &Mutex<BTreeMap<u64, usize>>,
        written: u64,
    ) -> u64 {
        let next = checkpoint_of(seen, in_flight);
        self.trigger_next.store(next, Ordering::Relaxed);
        if next == written {
            return written;
        }
        let event = ProposedEvent::new(
            EventType::from_stored("TriggerCheckpoint".into()),
            EventData::json(json!({ "next": next }).to_string()).expect("valid JSON"),
        );
        let request = AppendRequest {
            stream: streams::triggers(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event],
        };
        match self.hub.store().append(request).await {
            Ok(_) => next,
            Err(e) => {
                tracing::warn!("the saga trigger checkpoint cannot be written: {e}");
                written
            }
        }
    }

    /// Starts one instance for a trigger event, unless its key already has one.
    async fn start_instance(
        self: &Arc<Self>,
        registered: &Registered,
        event: &RecordedEvent,
        trigger: Value,
        key: Option<String>,
        permit: OwnedSemaphorePermit,
    ) {
        let def = &registered.definition;
        let Some(key) = key else {
            self.metrics.no_key.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                saga = %def.name,
                position = event.position.0,
                "trigger event has no value at {}; no saga starts",
                def.correlation_key
            );
            return;
        };
        let id = saga_id(&def.name, &key).to_string();
        let stream = streams::instance(&id);
        let started = SagaEvent::SagaStarted {
            saga_id: id.clone(),
            definition: def.name.clone(),
            version: def.version,
            correlation_key: key.clone(),
            trigger,
        };
        let metadata = instance_metadata(&id, event);
        let mut delay = Duration::from_millis(100);
        let result = loop {
            if self.hub.expired() {
                break Err(lease_ended());
            }
            let proposed = match proposed(&started, &metadata) {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            let request = AppendRequest {
                stream: stream.clone(),
                expected: ExpectedRevision::NoStream,
                condition: None,
                events: vec![proposed],
            };
            match self.hub.store().append(request).await {
                Err(e @ (Error::Unavailable(_) | Error::StorageFull(_) | Error::Io(_)))
                    if !self.hub.is_stopping() =>
                {
                    tracing::warn!(saga = %id, "cannot start the saga yet: {e}; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.hub.stopping() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => break other,
            }
        };
        match result {
            Ok(appended) => {
                let state = Instance::start(&started, self.clock.now()).expect("a start event");
                debug_assert_eq!(appended.first_revision.0, 0);
                let live = Live::new(stream, registered, state);
                self.instances
                    .lock()
                    .expect("instances lock")
                    .insert(id, Arc::clone(&live));
                self.metrics.started(&def.name);
                Inner::spawn_runner(self, live, Some(permit));
            }
            Err(Error::WrongExpectedRevision { .. }) => {
                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(saga = %id, "duplicate trigger: the instance exists");
            }
            Err(e) => {
                // The store refuses the start for good (the trigger, embedded in SagaStarted,
                // is too large, say): this trigger starts nothing, and a later one may.
                self.metrics.start_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    saga = %id,
                    position = event.position.0,
                    "the saga cannot start from this trigger: {e}"
                );
            }
        }
    }

    fn spawn_runner(inner: &Arc<Self>, live: Arc<Live>, permit: Option<OwnedSemaphorePermit>) {
        let inner = Arc::clone(inner);
        tokio::spawn(async move {
            let _permit = match permit {
                Some(p) => p,
                None => match Arc::clone(&inner.running).acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let id = live.state.lock().expect("state lock").saga_id.clone();
            let e = loop {
                match inner.run(&live).await {
                    Ok(()) => return,
                    // Another writer recorded progress first: an owner of the sagas on another
                    // node whose lease ended, whose last write reached the store late. What it
                    // wrote is folded in and the instance goes on from there.
                    Err(e @ Error::WrongExpectedRevision { .. }) if !inner.hub.is_stopping() => {
                        match inner.catch_up(&live).await {
                            Ok(0) => break e,
                            Ok(_) => {}
                            Err(e) => break e,
                        }
                    }
                    Err(e) => break e,
                }
            };
            if inner.hub.is_stopping() {
                tracing::debug!(saga = %id, "the saga runner stops with the engine: {e}");
                return;
            }
            // Recorded as stuck, with the reason, so that a person sees it and retry and
            // cancel work; an instance left `running` with nothing running it would not.
            let (step, phase) = {
                let state = live.state.lock().expect("state lock");
                match next_move(&live.definition, &state) {
                    Move::Run(index, phase) => (live.definition.steps[index].name.clone(), phase),
                    _ => (String::new(), Phase::Action),
                }
            };
            tracing::error!(saga = %id, step, "the saga runner stopped: {e}; the saga is stuck");
            let stuck = SagaEvent::SagaStuck {
                step,
                phase,
                error: format!("the engine could not record the saga's progress: {e}"),
            };
            if let Err(again) = inner.append(&live, vec![stuck]).await {
                tracing::error!(
                    saga = %id,
                    "the saga cannot be recorded as stuck either: {again}; it resumes after a restart"
                );
            }
        });
    }

    /// Folds in what the instance's stream holds beyond the state in memory; returns how many
    /// events it folded. An event it cannot read stops it with an error (the instance is then
    /// recorded as stuck), rather than being skipped and read again for ever.
    async fn catch_up(&self, live: &Live) -> Result<usize> {
        let _writes = live.writes.lock().await;
        let mut folded = 0;
        loop {
            if self.hub.is_stopping() {
                return Ok(folded);
            }
            let revision = live.state.lock().expect("state lock").revision;
            let page = self
                .hub
                .store()
                .read(ReadRequest {
                    source: ReadSource::Stream(live.stream.clone()),
                    from: Some(revision + 1),
                    direction: Direction::Forward,
                    limit: FOLD_PAGE,
                })
                .await?;
            if page.events.is_empty() {
                return Ok(folded);
            }
            for event in &page.events {
                let Some(saga_event) = SagaEvent::from_recorded(event) else {
                    return Err(Error::Corruption {
                        file: live.stream.to_string(),
                        offset: event.position.0,
                        reason: format!(
                            "revision {} ({}) is not a saga event this engine can read",
                            event.revision, event.event_type
                        ),
                    });
                };
                let (previous, now) = {
                    let mut state = live.state.lock().expect("state lock");
                    let previous = state.state;
                    state.apply(&saga_event, event.recorded_at, event.revision.0);
                    (previous, state.state)
                };
                folded += 1;
                if now.is_final() && !previous.is_final() {
                    live.state.lock().expect("state lock").compact();
                    self.finished_one(live);
                }
                if now != previous {
                    self.metrics.transition(&live.definition.name, now);
                }
            }
        }
    }

    /// Runs an instance until it is final, stuck, or the engine stops.
    async fn run(self: &Arc<Self>, live: &Arc<Live>) -> Result<()> {
        loop {
            if self.hub.is_stopping() {
                return Ok(());
            }
            let next = next_move(&live.definition, &live.state.lock().expect("state lock"));
            match next {
                Move::Idle => return Ok(()),
                Move::Record(events) => self.append(live, events).await?,
                Move::Run(index, phase) => self.run_step(live, index, phase).await?,
            }
        }
    }

    /// Runs one step's action or compensation until it succeeds or fails for good (or a
    /// cancel or a shutdown interrupts its back-off).
    async fn run_step(
        self: &Arc<Self>,
        live: &Arc<Live>,
        index: usize,
        phase: Phase,
    ) -> Result<()> {
        let def = &live.definition;
        let step = &def.steps[index];
        let policy = Policy::of(def, step);
        let action = match phase {
            Phase::Action => &step.action,
            Phase::Compensation => step.compensation.as_ref().expect("only steps with one"),
        };
        loop {
            let (attempt, used, context, saga_id, key, trigger_position, deadline) = {
                let state = live.state.lock().expect("state lock");
                (
                    state.next_attempt(&step.name, phase),
                    state.attempts_used(&step.name, phase),
                    context_of(def, &state),
                    state.saga_id.clone(),
                    state.correlation_key.clone(),
                    state.trigger["position"].as_u64().unwrap_or(0),
                    state.deadlines.get(&step.name).copied(),
                )
            };
            let deadline = match (action, deadline) {
                (Action::Await(_), None) => {
                    let deadline = Timestamp(
                        self.clock.now().0
                            + i64::try_from(policy.timeout.as_micros()).unwrap_or(i64::MAX),
                    );
                    self.append(
                        live,
                        vec![SagaEvent::StepStarted {
                            step: step.name.clone(),
                            phase,
                            deadline,
                        }],
                    )
                    .await?;
                    Some(deadline)
                }
                (_, deadline) => deadline,
            };
            let began = Instant::now();
            // Each attempt is a span in the trigger's trace; HTTP targets and appended events
            // carry it on.
            let parent = context["trigger"]["metadata"]["traceparent"]
                .as_str()
                .and_then(skald_telemetry::TraceContext::parse);
            let mut span = skald_telemetry::start_span(
                format!("saga {} {} {}", def.name, step.name, phase.as_str()),
                match action {
                    Action::Http(_) => skald_telemetry::SpanKind::Client,
                    _ => skald_telemetry::SpanKind::Internal,
                },
                parent.as_ref(),
            );
            span.set("skald.saga.id", saga_id.as_str());
            span.set("skald.saga.step", step.name.as_str());
            span.set("skald.saga.attempt", u64::from(attempt));
            let traceparent =
                (parent.is_some() || span.is_recording()).then(|| span.context().to_header());
            let registrant = live.registrant.as_deref();
            let authority = &self.authority;
            let trigger_stream = context["trigger"]["stream"].as_str().unwrap_or_default();
            let outcome = match action {
                Action::Http(_)
                    if let Err(why) = authority.check(registrant, Need::Read(trigger_stream)) =>
                {
                    // The call may carry the trigger's data out.
                    Err(Failure::Forbidden(why))
                }
                Action::Http(http) => {
                    let key = format!("{saga_id}:{}:{}", step.name, phase.as_str());
                    actions::call_http(
                        &self.http,
                        &self.breakers,
                        http,
                        &context,
                        &key,
                        traceparent.as_deref(),
                        policy.timeout,
                    )
                    .await
                }
                Action::Append(append) => {
                    let id = uuid::Uuid::new_v5(
                        &streams::NAMESPACE,
                        format!("{saga_id}:{}:{}", step.name, phase.as_str()).as_bytes(),
                    );
                    let mut metadata = json!({
                        "sagaId": saga_id,
                        "correlationId": context["trigger"]["metadata"]["correlationId"]
                            .as_str()
                            .unwrap_or(&saga_id),
                        "causationId": context["trigger"]["id"],
                    });
                    if let Some(traceparent) = &traceparent {
                        metadata["traceparent"] = json!(traceparent);
                    }
                    tokio::time::timeout(
                        policy.timeout,
                        actions::append(
                            self.hub.store().as_ref(),
                            append,
                            &context,
                            id,
                            &metadata,
                            |stream| authority.check(registrant, Need::Append(stream)),
                        ),
                    )
                    .await
                    .unwrap_or(Err(Failure::Timeout(policy.timeout)))
                }
                Action::Await(wait) => {
                    let remaining = deadline.map_or(0, |d| d.0 - self.clock.now().0).max(0);
                    let until = tokio::time::Instant::now()
                        + Duration::from_micros(u64::try_from(remaining).unwrap_or(0));
                    let pointer = wait.correlation.as_deref().unwrap_or(&def.correlation_key);
                    tokio::select! {
                        r = actions::await_event(
                            &self.hub,
                            wait,
                            pointer,
                            &key,
                            trigger_position,
                            until,
                            |stream| authority.check(registrant, Need::Read(stream)).is_ok(),
                        ) => r,
                        // A cancel ends the wait; `run` then starts the compensation.
                        _ = live.wake.notified() => return Ok(()),
                        _ = self.hub.stopping() => return Ok(()),
                    }
                }
            };
            if let Err(failure) = &outcome {
                span.fail(failure.to_string());
            }
            drop(span);
            let duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.metrics
                .step(&def.name, &step.name, phase, &outcome, began.elapsed());
            let failure = match outcome {
                Ok(output) => {
                    return self
                        .append(
                            live,
                            vec![SagaEvent::StepSucceeded {
                                step: step.name.clone(),
                                phase,
                                attempt,
                                output,
                                duration_ms,
                            }],
                        )
                        .await;
                }
                Err(failure) => failure,
            };
            let retryable = failure.is_retryable(&policy.retry_on);
            let exhausted = policy.max_attempts.is_some_and(|max| used + 1 >= max);
            let is_final = !retryable || exhausted;
            // The target refused the step's idempotency key: it did not act on it, earlier
            // attempts included. Other answers say nothing of them.
            let status = match failure {
                Failure::Status(code, _) => Some(code),
                _ => None,
            };
            let answered = status.is_some_and(crate::history::refuses_key);
            // Recorded as unknown when this attempt may have acted, and also when the step may
            // have acted before (a crash cut an attempt short) and nothing since says it did
            // not: so the fold after a restart decides as this run does.
            let may_have_acted = phase == Phase::Action
                && matches!(action, Action::Http(_) | Action::Append(_))
                && failure.may_have_acted();
            let outcome_unknown = phase == Phase::Action
                && (may_have_acted
                    || (!answered
                        && live
                            .state
                            .lock()
                            .expect("state lock")
                            .possibly_done
                            .contains(&step.name)));
            let error = failure.to_string();
            tracing::debug!(saga = %saga_id, step = %step.name, attempt, "step attempt failed: {error}");
            let mut events = vec![SagaEvent::StepFailed {
                step: step.name.clone(),
                phase,
                attempt,
                error: error.clone(),
                retryable,
                is_final,
                duration_ms,
                outcome_unknown,
                status,
            }];
            if is_final {
                // A failed pivot undoes the steps before it; past the pivot nothing is undone.
                let (compensating, possibly_done) = {
                    let state = live.state.lock().expect("state lock");
                    (
                        state.state == SagaState::Compensating,
                        outcome_unknown || (state.possibly_done.contains(&step.name) && !answered),
                    )
                };
                let undoable = phase == Phase::Action && !step.retriable;
                let past_pivot = def.point_of_no_return().is_some_and(|p| p < index);
                if compensating && phase == Phase::Action && answered {
                    // Sent again to learn its output, the action was refused: it never acted,
                    // and there is nothing to compensate (the fold drops it from the steps
                    // that may have acted); compensation goes on with the steps before it.
                } else if compensating && phase == Phase::Action {
                    // The action was sent again to learn the output its compensation reads.
                    events.push(SagaEvent::SagaStuck {
                        step: step.name.clone(),
                        phase,
                        error: format!(
                            "step {} may have acted (its outcome was not known) and its \
                             compensation reads its output; sending the action again with its \
                             idempotency key to learn that output failed: {error}",
                            step.name
                        ),
                    });
                } else if undoable && !past_pivot && step.pivot && possibly_done {
                    // The pivot may have acted: undoing the steps before it could leave its
                    // effect standing alone, so a person decides.
                    events.push(SagaEvent::SagaStuck {
                        step: step.name.clone(),
                        phase,
                        error: format!(
                            "the pivot step {} may have acted (its outcome is not known): {error}; \
                             find out at the target, then retry the saga (the step is sent again \
                             with its idempotency key)",
                            step.name
                        ),
                    });
                } else if undoable && !past_pivot {
                    events.push(SagaEvent::SagaCompensating {
                        reason: format!("step {} failed: {error}", step.name),
                        step: Some(step.name.clone()),
                    });
                } else {
                    events.push(SagaEvent::SagaStuck {
                        step: step.name.clone(),
                        phase,
                        error,
                    });
                }
                return self.append(live, events).await;
            }
            self.append(live, events).await?;
            let wait = policy.backoff(attempt, fastrand::f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = live.wake.notified(), if phase == Phase::Action => {}
                _ = self.hub.stopping() => return Ok(()),
            }
            if phase == Phase::Action && live.state.lock().expect("state lock").cancel_requested {
                return Ok(());
            }
        }
    }

    /// Appends events to an instance's stream at its exact revision, and folds them in. When
    /// the instance would then finish, the finishing event goes in the same append.
    async fn append(&self, live: &Live, events: Vec<SagaEvent>) -> Result<()> {
        let _writes = live.writes.lock().await;
        Inner::append_locked(self, live, events).await
    }

    async fn append_locked(&self, live: &Live, mut events: Vec<SagaEvent>) -> Result<()> {
        let (expected, mut tentative) = {
            let state = live.state.lock().expect("state lock");
            (state.revision, state.clone())
        };
        let now = self.clock.now();
        for (i, e) in events.iter().enumerate() {
            tentative.apply(e, now, expected + 1 + i as u64);
        }
        if let Move::Record(finish) = next_move(&live.definition, &tentative)
            && finish.iter().all(|e| {
                matches!(
                    e,
                    SagaEvent::SagaCompleted {}
                        | SagaEvent::SagaCompensated {}
                        | SagaEvent::SagaCancelled {}
                )
            })
        {
            for e in &finish {
                tentative.apply(e, now, expected + 1 + events.len() as u64);
                events.push(e.clone());
            }
        }
        let metadata = json!({ "sagaId": tentative.saga_id }).to_string();
        let proposed = events
            .iter()
            .map(|e| proposed(e, &metadata))
            .collect::<Result<Vec<_>>>()?;
        let mut delay = Duration::from_millis(100);
        loop {
            // This node's lease on the sagas may have run out while it waited: another node
            // may run this instance now, and this one records nothing more.
            if self.hub.expired() {
                return Err(lease_ended());
            }
            let request = AppendRequest {
                stream: live.stream.clone(),
                expected: ExpectedRevision::Exact(Revision(expected)),
                condition: None,
                events: proposed.clone(),
            };
            match self.hub.store().append(request).await {
                Ok(_) => break,
                Err(e @ (Error::Unavailable(_) | Error::StorageFull(_) | Error::Io(_)))
                    if !self.hub.is_stopping() =>
                {
                    tracing::warn!(stream = %live.stream, "cannot record saga progress yet: {e}; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.hub.stopping() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        let previous = {
            let mut state = live.state.lock().expect("state lock");
            let previous = state.state;
            *state = tentative;
            if state.state.is_final() {
                state.compact();
            }
            previous
        };
        let state = live.state.lock().expect("state lock").state;
        if state.is_final() && !previous.is_final() {
            self.finished_one(live);
        }
        if state != previous {
            self.metrics.transition(&live.definition.name, state);
        }
        Ok(())
    }
}

/// Token buckets of instance starts, one per definition (`SagaOptions::max_starts_per_second`,
/// with a burst of one second's worth).
struct StartRate {
    per_second: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl StartRate {
    fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes a start for `definition`: `None` when it may start now, else how long to wait.
    fn take(&mut self, definition: &str, now: Instant) -> Option<Duration> {
        let per_second = self.per_second;
        let (tokens, at) = self
            .buckets
            .entry(definition.to_owned())
            .or_insert((per_second, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(per_second);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - *tokens) / per_second))
        }
    }
}

fn checkpoint_of(seen: u64, in_flight: &Mutex<BTreeMap<u64, usize>>) -> u64 {
    in_flight
        .lock()
        .expect("in-flight lock")
        .first_key_value()
        .map_or(seen, |(position, _)| *position)
}

fn instance_metadata(saga_id: &str, trigger: &RecordedEvent) -> String {
    let trigger_meta: Value = serde_json::from_str(trigger.metadata.as_str()).unwrap_or_default();
    let correlation = trigger_meta["correlationId"]
        .as_str()
        .map_or_else(|| saga_id.to_owned(), str::to_owned);
    json!({
        "sagaId": saga_id,
        "correlationId": correlation,
        "causationId": trigger.id.to_string(),
    })
    .to_string()
}

/// The context templates read.
fn context_of(def: &SagaDefinition, state: &Instance) -> Value {
    let steps: serde_json::Map<String, Value> = state
        .outputs
        .iter()
        .map(|(name, output)| (name.clone(), json!({ "output": output })))
        .collect();
    json!({
        "saga": {
            "id": state.saga_id,
            "correlationKey": state.correlation_key,
            "definition": def.name,
            "version": def.version,
        },
        "trigger": state.trigger,
        "steps": steps,
    })
}
