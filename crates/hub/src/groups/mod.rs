//! Persistent subscriptions: named consumer groups whose checkpoint, definition and parked
//! messages are stored in the store itself. The design is in
//! `docs/persistent-subscriptions.md`.
//!
//! [`Groups`] holds the definitions and runs one task per group ([`actor`]); transports call
//! it to create, change and delete groups, to join one as a consumer, and to acknowledge.

mod actor;
mod definition;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use skald_core::{
    AppendRequest, Direction, Error, EventStore, ExpectedRevision, ReadRequest, ReadSource, Result,
    Revision,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use actor::{AckOutcome, ConsumerEvent, ConsumerStats, GroupMessage, GroupStats, NackAction};
pub use definition::{
    GroupDefinition, GroupSettings, GroupStart, MAX_BUFFER_SIZE, MAX_GROUP_NAME, SettingsUpdate,
    Strategy, validate_name,
};

use crate::{Hub, SourceSpec, Start};
use actor::{Command, Group, system_event};
use definition::{definitions_stream, validate_start};

/// What a client sends to create a group.
#[derive(Clone, Debug)]
pub struct NewGroup {
    /// The group's name.
    pub name: String,
    /// What it reads.
    pub source: SourceSpec,
    /// Where it starts.
    pub start: Start,
    /// Its settings.
    pub settings: GroupSettings,
}

/// A group and its state.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupInfo {
    /// The definition.
    #[serde(flatten)]
    pub definition: GroupDefinition,
    /// The state now.
    pub stats: GroupStats,
}

struct Running {
    definition: GroupDefinition,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

struct Registry {
    groups: BTreeMap<String, Running>,
    /// The last revision of `$groups`, for the next write's expected revision.
    revision: Option<u64>,
}

/// The persistent subscriptions of one store. Cheap to clone.
pub struct Groups<S> {
    hub: Hub<S>,
    registry: Arc<Mutex<Registry>>,
    /// Serializes changes to definitions, which await store writes.
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl<S> Clone for Groups<S> {
    fn clone(&self) -> Self {
        Self {
            hub: self.hub.clone(),
            registry: Arc::clone(&self.registry),
            writes: Arc::clone(&self.writes),
        }
    }
}

/// A consumer joined to a group. Dropping it leaves the group: messages it holds go back to
/// the other consumers.
pub struct Consumer {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<ConsumerEvent>,
}

impl Consumer {
    /// The next batch of messages, or why the consumer ended.
    pub async fn next(&mut self) -> ConsumerEvent {
        self.events
            .recv()
            .await
            .unwrap_or_else(|| ConsumerEvent::Ended(Error::Unavailable("the group stopped".into())))
    }

    /// Takes no more batches, and returns the messages of any the group already queued: once
    /// a long-poll's wait has run out, a batch handed over at that moment would otherwise stay
    /// in flight where no one sees it until it times out, using up a delivery. Batches the
    /// group sends after this go back to it at once.
    pub async fn stop_taking(&mut self) -> Vec<GroupMessage> {
        self.events.close();
        let mut queued = Vec::new();
        // `recv` (unlike `try_recv`) also waits for a send under way when the channel closed.
        while let Some(event) = self.events.recv().await {
            if let ConsumerEvent::Messages(messages) = event {
                queued.extend(messages);
            }
        }
        queued
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Batches handed over but never taken (a long-poll whose client went away) go back
        // at once, undelivered, rather than staying in flight unseen until they time out.
        self.events.close();
        let mut unseen = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if let ConsumerEvent::Messages(messages) = event {
                unseen.extend(messages.into_iter().map(|m| m.ack_id));
            }
        }
        if !unseen.is_empty() {
            let _ = self.commands.send(Command::GiveBack {
                consumer: self.id,
                ack_ids: unseen,
            });
        }
        let _ = self.commands.send(Command::Leave { consumer: self.id });
    }
}

impl<S: EventStore> Groups<S> {
    /// Loads every group from `$groups` and starts them.
    pub async fn start(hub: Hub<S>) -> Result<Self> {
        let store = Arc::clone(hub.store());
        let mut definitions: BTreeMap<String, GroupDefinition> = BTreeMap::new();
        let mut revision = None;
        let mut from = 0;
        loop {
            let page = store
                .read(ReadRequest {
                    source: ReadSource::Stream(definitions_stream()),
                    from: Some(from),
                    direction: Direction::Forward,
                    limit: 1024,
                })
                .await?;
            for event in &page.events {
                revision = Some(event.revision.0);
                apply_change(&mut definitions, event);
            }
            match page.next {
                Some(next) if !page.events.is_empty() => from = next,
                _ => break,
            }
        }
        let groups = Self {
            hub,
            registry: Arc::new(Mutex::new(Registry {
                groups: BTreeMap::new(),
                revision,
            })),
            writes: Arc::new(tokio::sync::Mutex::new(())),
        };
        for definition in definitions.into_values() {
            let name = definition.name.clone();
            // One group that cannot start must not keep the others, or the server, down.
            if let Err(e) = groups.launch(definition, true).await {
                tracing::warn!("group {name} cannot start and is left stopped: {e}");
            }
        }
        Ok(groups)
    }

    /// The hub the groups read through.
    pub fn hub(&self) -> &Hub<S> {
        &self.hub
    }

    /// Opens a group and runs it. `retry`: a group that cannot open now (its state cannot be
    /// read) is tried again in the background, and refuses requests until then; otherwise
    /// the error is returned (a group being created).
    async fn launch(&self, definition: GroupDefinition, retry: bool) -> Result<()> {
        // Bounded by its callers, not the type: every command but `Leave` waits for its reply,
        // so at most one is queued per request in flight (and requests are bounded by the
        // server's connections); `Leave` comes once per consumer, from `Drop`, which cannot
        // wait for room in a bounded channel.
        let (tx, rx) = mpsc::unbounded_channel();
        let name = definition.name.clone();
        let first = match Group::open(self.hub.clone(), definition.clone(), rx).await {
            Ok(group) => Ok(group),
            Err((e, rx)) if retry => {
                tracing::warn!("group {name} cannot open now, retrying: {e}");
                Err(rx)
            }
            Err((e, _)) => return Err(e),
        };
        let task = tokio::spawn(supervise(
            first,
            self.hub.clone(),
            Arc::clone(&self.registry),
            name.clone(),
        ));
        let running = Running {
            definition,
            commands: tx,
            task,
        };
        self.registry
            .lock()
            .expect("not poisoned")
            .groups
            .insert(name, running);
        Ok(())
    }

    /// Appends one change to `$groups` at its expected revision.
    async fn record(&self, event_type: &str, data: serde_json::Value) -> Result<()> {
        let revision = self.registry.lock().expect("not poisoned").revision;
        let result = self
            .hub
            .store()
            .append(AppendRequest {
                stream: definitions_stream(),
                expected: revision.map_or(ExpectedRevision::NoStream, |r| {
                    ExpectedRevision::Exact(Revision(r))
                }),
                condition: None,
                events: vec![system_event(event_type, data.to_string())],
            })
            .await?;
        self.registry.lock().expect("not poisoned").revision = Some(result.last_revision.0);
        Ok(())
    }

    fn commands(&self, name: &str) -> Result<mpsc::UnboundedSender<Command>> {
        self.registry
            .lock()
            .expect("not poisoned")
            .groups
            .get(name)
            .map(|g| g.commands.clone())
            .ok_or_else(|| Error::GroupNotFound(name.to_owned()))
    }

    /// Creates a group and starts it.
    pub async fn create(&self, new: NewGroup) -> Result<GroupInfo> {
        validate_name(&new.name)?;
        new.settings.validate()?;
        let source = new.source.to_read_source()?;
        if let skald_core::ReadSource::Category(category) = &source
            && category.as_str().starts_with('$')
        {
            return Err(Error::invalid(format!(
                "category {category:?} is a system category; groups never see system streams"
            )));
        }
        validate_start(&source, new.start)?;
        let _writing = self.writes.lock().await;
        if self.commands(&new.name).is_ok() {
            return Err(Error::GroupExists(new.name));
        }
        let start = match new.start {
            Start::Beginning => GroupStart::Position(0),
            Start::Now => GroupStart::Position(self.hub.store().next_position().await?),
            Start::Position(p) => GroupStart::Position(p),
            Start::Revision(r) => GroupStart::Revision(r),
        };
        // Writes to `$groups` expect its exact revision, so the creating event takes the
        // next one: a generation no other group of this name ever had.
        let generation = self
            .registry
            .lock()
            .expect("not poisoned")
            .revision
            .map_or(0, |r| r + 1);
        let definition = GroupDefinition {
            name: new.name,
            source: new.source,
            start,
            generation,
            settings: new.settings,
        };
        self.record("$group-created", json!(definition)).await?;
        let name = definition.name.clone();
        self.launch(definition, false).await?;
        drop(_writing);
        self.info(&name).await
    }

    /// Changes a group's settings while it runs.
    pub async fn update(&self, name: &str, update: &SettingsUpdate) -> Result<GroupInfo> {
        let _writing = self.writes.lock().await;
        let mut definition = self.definition(name)?;
        let settings = update.apply(&definition.settings);
        settings.validate()?;
        definition.settings = settings.clone();
        self.record("$group-updated", json!(definition)).await?;
        {
            let mut registry = self.registry.lock().expect("not poisoned");
            let running = registry
                .groups
                .get_mut(name)
                .ok_or_else(|| Error::GroupNotFound(name.to_owned()))?;
            running.definition = definition;
            let _ = running.commands.send(Command::Update(settings));
        }
        drop(_writing);
        self.info(name).await
    }

    /// Deletes a group: its consumers are ended, and it reads nothing more. Its checkpoints and
    /// parked messages stay in their streams; a new group of the same name ignores them.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let _writing = self.writes.lock().await;
        self.definition(name)?;
        self.record("$group-deleted", json!({ "name": name }))
            .await?;
        let running = self
            .registry
            .lock()
            .expect("not poisoned")
            .groups
            .remove(name);
        if let Some(running) = running {
            let _ = running.commands.send(Command::Delete);
            let _ = running.task.await;
        }
        Ok(())
    }

    fn definition(&self, name: &str) -> Result<GroupDefinition> {
        self.registry
            .lock()
            .expect("not poisoned")
            .groups
            .get(name)
            .map(|g| g.definition.clone())
            .ok_or_else(|| Error::GroupNotFound(name.to_owned()))
    }

    async fn ask<T>(
        &self,
        name: &str,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands(name)?
            .send(command(tx))
            .map_err(|_| stopped(name))?;
        rx.await.map_err(|_| stopped(name))
    }

    /// A group with its stats.
    pub async fn info(&self, name: &str) -> Result<GroupInfo> {
        let definition = self.definition(name)?;
        let stats = self.ask(name, |reply| Command::Stats { reply }).await?;
        Ok(GroupInfo { definition, stats })
    }

    /// Every group, by name.
    pub async fn list(&self) -> Result<Vec<GroupInfo>> {
        let names: Vec<String> = self
            .registry
            .lock()
            .expect("not poisoned")
            .groups
            .keys()
            .cloned()
            .collect();
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            match self.info(&name).await {
                Ok(info) => infos.push(info),
                // Deleted since the names were taken.
                Err(Error::GroupNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(infos)
    }

    /// Delivers the parked messages again; returns how many there are to replay.
    pub async fn replay_parked(&self, name: &str) -> Result<u64> {
        self.ask(name, |reply| Command::ReplayParked { reply })
            .await
    }

    /// Joins a group as a consumer that may hold `capacity` messages unacknowledged.
    pub async fn join(
        &self,
        name: &str,
        consumer: &str,
        kind: &'static str,
        capacity: usize,
    ) -> Result<Consumer> {
        self.join_as(name, consumer, kind, capacity, false).await
    }

    async fn join_as(
        &self,
        name: &str,
        consumer: &str,
        kind: &'static str,
        capacity: usize,
        one_batch: bool,
    ) -> Result<Consumer> {
        let commands = self.commands(name)?;
        let (id, events) = self
            .ask(name, |reply| Command::Join {
                name: Arc::from(consumer),
                kind,
                capacity,
                one_batch,
                reply,
            })
            .await?;
        Ok(Consumer {
            id,
            commands,
            events,
        })
    }

    /// Long-polls: up to `count` messages, waiting up to `wait` for the first. What it returns
    /// stays in flight until acknowledged or timed out.
    pub async fn poll(
        &self,
        name: &str,
        consumer: &str,
        count: usize,
        wait: Duration,
    ) -> Result<Vec<GroupMessage>> {
        let mut consumer = self.join_as(name, consumer, "http", count, true).await?;
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(ConsumerEvent::Messages(messages)) => Ok(messages),
            Ok(ConsumerEvent::Ended(e)) => Err(e),
            Err(_) => Ok(consumer.stop_taking().await),
        }
    }

    /// Acknowledges messages by ack id.
    pub async fn ack(&self, name: &str, ids: Vec<String>) -> Result<AckOutcome> {
        self.ask(name, |reply| Command::Ack { ids, reply }).await
    }

    /// Turns messages down: retry, park or skip.
    pub async fn nack(
        &self,
        name: &str,
        ids: Vec<String>,
        action: NackAction,
        reason: String,
    ) -> Result<AckOutcome> {
        self.ask(name, |reply| Command::Nack {
            ids,
            action,
            reason,
            reply,
        })
        .await
    }

    /// Waits for every group to write its last checkpoint after [`Hub::shutdown`].
    pub async fn stopped(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut registry = self.registry.lock().expect("not poisoned");
            std::mem::take(&mut registry.groups)
                .into_values()
                .map(|g| g.task)
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Runs a group's actor, and opens it again while the hub runs: after another writer fenced
/// it (docs/postgres.md, "Owners across nodes": a write of an old owner that reached the
/// store late), or when it could not open (`first` is then its command channel). Until it is
/// open, requests are answered at once that the group is not available. A stale owner stops
/// for good: its hub is stopping by then.
async fn supervise<S: EventStore>(
    first: std::result::Result<Group<S>, mpsc::UnboundedReceiver<Command>>,
    hub: Hub<S>,
    registry: Arc<Mutex<Registry>>,
    name: String,
) {
    let mut next = first;
    let mut delay = REOPEN_AFTER;
    loop {
        let mut commands = match next {
            Ok(group) => match group.run().await {
                None => return,
                Some(commands) => commands,
            },
            Err(commands) => commands,
        };
        loop {
            // Requests meanwhile are dropped, which answers them that the group is stopping.
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    command = commands.recv() => if command.is_none() { return },
                    () = hub.stopping() => return,
                }
            }
            let definition = registry
                .lock()
                .expect("not poisoned")
                .groups
                .get(&name)
                .map(|g| g.definition.clone());
            let Some(definition) = definition else {
                return;
            };
            match Group::open(hub.clone(), definition, commands).await {
                Ok(group) => {
                    next = Ok(group);
                    delay = REOPEN_AFTER;
                    break;
                }
                Err((e, back)) => {
                    tracing::warn!("group {name}: cannot open it again yet: {e}");
                    commands = back;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// How long a fenced group waits before it reads its state again.
const REOPEN_AFTER: Duration = Duration::from_millis(500);

fn stopped(name: &str) -> Error {
    Error::Unavailable(format!("group {name:?} is stopping"))
}

/// Applies one event of `$groups`. Events that cannot be read are reported and skipped, so
/// that one bad record cannot stop every other group.
fn apply_change(
    definitions: &mut BTreeMap<String, GroupDefinition>,
    event: &skald_core::RecordedEvent,
) {
    let bytes = event.data.bytes();
    match event.event_type.as_str() {
        "$group-created" | "$group-updated" => {
            match serde_json::from_slice::<GroupDefinition>(bytes) {
                Ok(definition) => {
                    definitions.insert(definition.name.clone(), definition);
                }
                Err(e) => tracing::warn!(
                    "$groups at position {} is not a group definition, skipped: {e}",
                    event.position
                ),
            }
        }
        "$group-deleted" => {
            match serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v["name"].as_str().map(str::to_owned))
            {
                Some(name) => {
                    definitions.remove(&name);
                }
                None => tracing::warn!(
                    "$groups at position {} names no group to delete, skipped",
                    event.position
                ),
            }
        }
        other => tracing::warn!(
            "$groups at position {} has unknown type {other:?}, skipped",
            event.position
        ),
    }
}
