//! One group's task: it owns the window of messages between the checkpoint and the reader,
//! hands them to consumers, takes acks and nacks, redelivers on timeouts, parks, and writes
//! checkpoints. Transports talk to it through [`Command`]s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use skald_core::{
    AppendRequest, Direction, Error, EventData, EventStore, EventType, ExpectedRevision,
    ProposedEvent, ReadRequest, ReadSource, RecordedEvent, Result, StreamName,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::definition::parked_stream;
use super::definition::{GroupDefinition, GroupSettings, Strategy, checkpoint_stream};
use crate::{Delivery, Hub, Start, Subscription};

/// Parked entries read per store call while loading a replay.
const PARKED_PAGE: usize = 256;
/// How long deliveries are counted for the delivery rate.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Deliveries this close together are counted as one entry of the rate window.
const RATE_BUCKET: Duration = Duration::from_millis(100);
/// The wait after a failed store read or write before the group tries again.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// A message's place in the window. Replays of parked messages sort first, so they go out
/// before new events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Key {
    /// The parked entry at this revision of `$parked-NAME`.
    Parked(u64),
    /// The source's event at this global position.
    Source(u64),
}

impl Key {
    fn ack_id(self) -> String {
        match self {
            Self::Parked(revision) => format!("parked-{revision}"),
            Self::Source(position) => position.to_string(),
        }
    }

    fn parse(id: &str) -> Option<Self> {
        match id.strip_prefix("parked-") {
            Some(revision) => revision.parse().ok().map(Self::Parked),
            None => id.parse().ok().map(Self::Source),
        }
    }
}

/// What an ack id names: one delivery of one message by one incarnation of a group.
/// Written `KEY.DELIVERY.TOKEN` (`17.2.5f0c1a9e`, `parked-3.1.5f0c1a9e`): a late ack of an
/// earlier delivery, or one from before a restart or from a deleted group of the same name,
/// names no delivery in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AckId {
    key: Key,
    delivery: u32,
    token: u32,
}

impl AckId {
    fn format(self) -> String {
        format!("{}.{}.{:08x}", self.key.ack_id(), self.delivery, self.token)
    }

    fn parse(id: &str) -> Option<Self> {
        let mut parts = id.rsplitn(3, '.');
        let token = parts.next()?;
        let delivery = parts.next()?.parse().ok()?;
        let key = Key::parse(parts.next()?)?;
        (token.len() == 8)
            .then(|| u32::from_str_radix(token, 16).ok())
            .flatten()
            .map(|token| Self {
                key,
                delivery,
                token,
            })
    }
}

/// A token for this incarnation of a group: new at each start (a restart, a re-create).
fn incarnation_token(generation: u64) -> u32 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((generation, now)) as u32
}

/// One event handed to a consumer.
#[derive(Clone, Debug)]
pub struct GroupMessage {
    /// What to acknowledge it with.
    pub ack_id: String,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
    /// The event.
    pub event: Arc<RecordedEvent>,
}

/// What a consumer receives.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Messages to handle and acknowledge.
    Messages(Vec<GroupMessage>),
    /// The consumer is ended (the group was deleted, or the server is stopping).
    Ended(Error),
}

/// What to do with a message a consumer could not handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NackAction {
    /// Deliver it again after its back-off (parked once it has been delivered the most times).
    Retry,
    /// Park it now.
    Park,
    /// Drop it: it counts as handled.
    Skip,
}

/// The result of an ack or a nack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AckOutcome {
    /// Messages the ack or nack applied to.
    pub done: usize,
    /// Ids that named no message in flight: unknown, already acknowledged, or taken back after
    /// a timeout.
    pub unknown: Vec<String>,
}

/// A consumer as the stats show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStats {
    /// The consumer's name.
    pub name: String,
    /// `websocket` or `http`.
    pub kind: &'static str,
    /// Messages it holds unacknowledged.
    pub in_flight: usize,
    /// The most it may hold.
    pub capacity: usize,
}

/// A group's state, for `GET /v1/groups/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupStats {
    /// Consumers connected now.
    pub consumers: Vec<ConsumerStats>,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: usize,
    /// Messages in the window waiting for a consumer or for a retry.
    pub available: usize,
    /// Every matching event before this position has been acknowledged, skipped or parked.
    pub checkpoint: u64,
    /// The store's next position.
    pub head: u64,
    /// `head - checkpoint`.
    pub lag: u64,
    /// Messages parked and not replayed.
    pub parked: u64,
    /// Deliveries since the server started (redeliveries included).
    pub delivered: u64,
    /// Deliveries per second over the last 10 seconds.
    pub delivery_rate: f64,
}

/// What transports ask of a group.
pub(crate) enum Command {
    Join {
        name: Arc<str>,
        kind: &'static str,
        capacity: usize,
        /// An HTTP poll: the consumer leaves after its first batch, and what it took stays in
        /// flight.
        one_batch: bool,
        reply: oneshot::Sender<(u64, mpsc::UnboundedReceiver<ConsumerEvent>)>,
    },
    Leave {
        consumer: u64,
    },
    /// Messages handed to a consumer that never took them.
    GiveBack {
        consumer: u64,
        ack_ids: Vec<String>,
    },
    Ack {
        ids: Vec<String>,
        reply: oneshot::Sender<AckOutcome>,
    },
    Nack {
        ids: Vec<String>,
        action: NackAction,
        reason: String,
        reply: oneshot::Sender<AckOutcome>,
    },
    Update(GroupSettings),
    ReplayParked {
        reply: oneshot::Sender<u64>,
    },
    Stats {
        reply: oneshot::Sender<GroupStats>,
    },
    /// The group was deleted: end the consumers, write nothing more.
    Delete,
}

/// The stored checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Checkpoint {
    pub generation: u64,
    pub position: u64,
    pub parked_from: u64,
    pub parked_to: u64,
}

/// A parked entry in `$parked-NAME`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParkedEntry {
    generation: u64,
    position: u64,
    stream: String,
    revision: u64,
    event_id: String,
    #[serde(rename = "type")]
    event_type: String,
    deliveries: u32,
    reason: String,
}

#[derive(Clone, Debug)]
enum State {
    Available,
    InFlight { consumer: u64, deadline: Instant },
    Waiting { until: Instant },
}

struct Message {
    event: Arc<RecordedEvent>,
    deliveries: u32,
    state: State,
}

struct Consumer {
    id: u64,
    name: Arc<str>,
    kind: &'static str,
    capacity: usize,
    in_flight: usize,
    one_batch: bool,
    tx: mpsc::UnboundedSender<ConsumerEvent>,
}

pub(crate) struct Group<S> {
    store: Arc<S>,
    hub: Hub<S>,
    definition: GroupDefinition,
    commands: mpsc::UnboundedReceiver<Command>,
    reader: Subscription<S>,
    reader_paused_until: Option<Instant>,
    window: BTreeMap<Key, Message>,
    /// Messages in the window that came from the source (not replays).
    source_messages: usize,
    /// The bytes of the events in the window ([`RecordedEvent::size`]), bounded by
    /// `bufferBytes` (plus the last delivery taken).
    window_bytes: usize,
    consumers: Vec<Consumer>,
    next_consumer: u64,
    round_robin: usize,
    /// A message finished since the last checkpoint was written.
    dirty: bool,
    last_checkpoint: Checkpoint,
    /// The revision of the checkpoint stream's last event, which the next write expects.
    checkpoint_revision: Option<u64>,
    /// Another owner wrote the group's state: this one stops.
    fenced: bool,
    last_write: Instant,
    /// Length of `$parked-NAME`.
    parked_len: u64,
    /// The end of the replay asked for.
    parked_to: u64,
    /// The next parked entry to load for the replay.
    replay_loaded: u64,
    to_park: Vec<(Key, String)>,
    delivered: u64,
    recent: RateWindow,
    /// Set in every ack id: see [`AckId`].
    token: u32,
}

/// Messages delivered in the last `RATE_WINDOW`, in buckets of `RATE_BUCKET`: at most about
/// a hundred entries however fast messages go and however rarely the rate is read.
#[derive(Default)]
struct RateWindow(VecDeque<(Instant, u64)>);

impl RateWindow {
    fn record(&mut self, now: Instant, count: u64) {
        match self.0.back_mut() {
            Some((at, n)) if now.saturating_duration_since(*at) < RATE_BUCKET => *n += count,
            _ => self.0.push_back((now, count)),
        }
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.0.pop_front();
        }
    }

    /// Messages per second over the window.
    fn per_second(&mut self, now: Instant) -> f64 {
        self.trim(now);
        self.0.iter().map(|(_, n)| *n).sum::<u64>() as f64 / RATE_WINDOW.as_secs_f64()
    }
}

impl<S: EventStore> Group<S> {
    /// Reads the checkpoint, opens the reader, and returns the group ready to [`run`].
    pub(crate) async fn open(
        hub: Hub<S>,
        definition: GroupDefinition,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> std::result::Result<Self, (Error, mpsc::UnboundedReceiver<Command>)> {
        // Loaded with a channel no one sends on, then given the real one: a group that cannot
        // open gives its channel back, for its supervisor to try again with.
        let (_, idle) = mpsc::unbounded_channel();
        match Self::load(hub, definition, idle).await {
            Ok(mut group) => {
                group.commands = commands;
                Ok(group)
            }
            Err(e) => Err((e, commands)),
        }
    }

    async fn load(
        hub: Hub<S>,
        definition: GroupDefinition,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<Self> {
        let store = Arc::clone(hub.store());
        let parked_len = store
            .stream_head(&parked_stream(&definition.name))
            .await?
            .map_or(0, |h| h.revision.0 + 1);
        let (stored, mut checkpoint_revision) = read_checkpoint(&*store, &definition).await?;
        let (start, checkpoint) = match stored {
            Some(c) => (Start::Position(c.position), c),
            None => {
                let start = match definition.start {
                    super::GroupStart::Position(p) => Start::Position(p),
                    super::GroupStart::Revision(r) => Start::Revision(r),
                };
                let position = match definition.start {
                    super::GroupStart::Position(p) => p,
                    super::GroupStart::Revision(_) => 0,
                };
                let c = Checkpoint {
                    generation: definition.generation,
                    position,
                    parked_from: parked_len,
                    parked_to: parked_len,
                };
                checkpoint_revision = Some(
                    write_checkpoint(&*store, &definition.name, c, checkpoint_revision).await?,
                );
                (start, c)
            }
        };
        let source = definition.source.to_read_source()?;
        let reader = hub.subscribe(source, start).await?;
        let token = incarnation_token(definition.generation);
        Ok(Self {
            store,
            hub,
            definition,
            commands,
            reader,
            reader_paused_until: None,
            window: BTreeMap::new(),
            source_messages: 0,
            window_bytes: 0,
            consumers: Vec::new(),
            next_consumer: 1,
            round_robin: 0,
            dirty: false,
            last_checkpoint: checkpoint,
            checkpoint_revision,
            fenced: false,
            last_write: Instant::now(),
            parked_len,
            parked_to: checkpoint.parked_to.max(checkpoint.parked_from),
            replay_loaded: checkpoint.parked_from,
            to_park: Vec::new(),
            delivered: 0,
            recent: RateWindow::default(),
            token,
        })
    }

    fn settings(&self) -> &GroupSettings {
        &self.definition.settings
    }

    /// Whether the window may take more from the source: under `bufferSize` messages and
    /// under `bufferBytes` bytes. One delivery is taken whole, so the window may pass the
    /// byte budget by one store page (at most [`skald_core::MAX_READ_PAGE_BYTES`] and one
    /// event), and a single event larger than the budget still goes through.
    fn has_room(&self) -> bool {
        self.source_messages < self.settings().buffer_size
            && self.window_bytes < self.settings().buffer_bytes
    }

    /// Runs until the group stops: `None`; or until another owner wrote its state, when it
    /// ends its consumers and gives its command channel back (`Some`), so that the caller may
    /// open the group again from the state the other owner wrote, if this node still owns it.
    pub(crate) async fn run(mut self) -> Option<mpsc::UnboundedReceiver<Command>> {
        let hub = self.hub.clone();
        let mut stopping = Box::pin(async move { hub.stopping().await });
        loop {
            // A store call may have outlasted the hub (the end of this node's lease passed
            // meanwhile): nothing more goes out.
            if self.hub.is_stopping() {
                self.stop().await;
                return None;
            }
            self.dispatch();
            let room =
                self.has_room() && self.reader_paused_until.is_none_or(|t| t <= Instant::now());
            let timer = self.next_timer();
            let checkpoint_due = self.dirty.then(|| {
                self.last_write + Duration::from_millis(self.settings().checkpoint_after_ms)
            });
            tokio::select! {
                biased;
                () = &mut stopping => {
                    self.stop().await;
                    return None;
                }
                command = self.commands.recv() => match command {
                    None => {
                        self.write_checkpoint_now().await;
                        return None;
                    }
                    Some(Command::Delete) => {
                        self.end_consumers(Error::GroupNotFound(self.definition.name.clone()));
                        return None;
                    }
                    Some(command) => self.handle(command).await,
                },
                delivery = self.reader.next(), if room => self.take_delivery(delivery),
                () = sleep_until(timer), if timer.is_some() => self.expire(Instant::now()),
                () = sleep_until(checkpoint_due), if checkpoint_due.is_some() => {
                    self.write_checkpoint_now().await;
                }
            }
            if !self.to_park.is_empty() {
                self.park().await;
            }
            if self.fenced {
                return Some(self.commands);
            }
            if self.replay_loaded < self.parked_to
                && self.window.len() < self.settings().buffer_size
                && self.window_bytes < self.settings().buffer_bytes
            {
                self.load_parked().await;
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Join {
                name,
                kind,
                capacity,
                one_batch,
                reply,
            } => {
                // Bounded by the protocol, not the type: the actor sends a consumer a batch
                // only while its in-flight count is under `capacity`, so at most `capacity`
                // messages (and one `Ended`) are ever queued here.
                let (tx, rx) = mpsc::unbounded_channel();
                let id = self.next_consumer;
                self.next_consumer += 1;
                self.consumers.push(Consumer {
                    id,
                    name,
                    kind,
                    capacity: capacity.max(1),
                    in_flight: 0,
                    one_batch,
                    tx,
                });
                let _ = reply.send((id, rx));
            }
            Command::Leave { consumer } => self.leave(consumer),
            Command::GiveBack { consumer, ack_ids } => {
                self.give_back(consumer, ack_ids.iter().map(String::as_str));
            }
            Command::Ack { ids, reply } => {
                let outcome = self.settle(&ids, |group, key| group.finish(key));
                let _ = reply.send(outcome);
            }
            Command::Nack {
                ids,
                action,
                reason,
                reply,
            } => {
                let outcome = self.settle(&ids, |group, key| match action {
                    NackAction::Retry => group.retry_or_park(key, &reason),
                    NackAction::Park => group.to_park.push((key, nack_reason(&reason))),
                    NackAction::Skip => group.finish(key),
                });
                let _ = reply.send(outcome);
            }
            Command::Update(settings) => self.definition.settings = settings,
            Command::ReplayParked { reply } => {
                self.parked_to = self.parked_len;
                let _ = reply.send(self.parked_to - self.parked_from());
            }
            Command::Stats { reply } => {
                let stats = self.stats().await;
                let _ = reply.send(stats);
            }
            Command::Delete => unreachable!("handled by run"),
        }
    }

    /// Applies `apply` to each id that names a message in flight; the rest are unknown.
    fn settle(&mut self, ids: &[String], mut apply: impl FnMut(&mut Self, Key)) -> AckOutcome {
        let mut outcome = AckOutcome::default();
        for id in ids {
            // Only the delivery in flight now: not an earlier one of the same message (taken
            // back after a timeout, given to another consumer), nor one of another incarnation.
            let key = AckId::parse(id)
                .filter(|ack| {
                    ack.token == self.token
                        && self.window.get(&ack.key).is_some_and(|m| {
                            matches!(m.state, State::InFlight { .. })
                                && m.deliveries == ack.delivery
                        })
                        && !self.to_park.iter().any(|(k, _)| *k == ack.key)
                })
                .map(|ack| ack.key);
            match key {
                Some(key) => {
                    self.release(key);
                    apply(self, key);
                    outcome.done += 1;
                }
                None => outcome.unknown.push(id.clone()),
            }
        }
        outcome
    }

    /// Takes a message back from the consumer holding it, leaving it available.
    fn release(&mut self, key: Key) {
        let Some(message) = self.window.get_mut(&key) else {
            return;
        };
        if let State::InFlight { consumer, .. } = message.state {
            message.state = State::Available;
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == consumer) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }

    /// The message is handled: it leaves the window.
    fn finish(&mut self, key: Key) {
        if let Some(message) = self.window.remove(&key) {
            self.window_bytes -= message.event.size();
            if matches!(key, Key::Source(_)) {
                self.source_messages -= 1;
            }
            self.dirty = true;
        }
    }

    /// Waits before delivering again, or parks a message delivered the most times.
    fn retry_or_park(&mut self, key: Key, reason: &str) {
        let max = self.settings().max_deliveries;
        let Some(message) = self.window.get_mut(&key) else {
            return;
        };
        if message.deliveries >= max {
            self.to_park.push((
                key,
                format!("delivered {max} times without an ack; last: {reason}"),
            ));
        } else {
            let delay = self.definition.settings.retry_delay(message.deliveries);
            message.state = State::Waiting {
                until: Instant::now() + delay,
            };
            self.recall_later(key);
        }
    }

    fn leave(&mut self, consumer: u64) {
        let Some(index) = self.consumers.iter().position(|c| c.id == consumer) else {
            return;
        };
        let gone = self.consumers.remove(index);
        if gone.one_batch {
            return;
        }
        // What it held goes to the others at once; the delivery already counted.
        for message in self.window.values_mut() {
            if matches!(message.state, State::InFlight { consumer, .. } if consumer == gone.id) {
                message.state = State::Available;
            }
        }
    }

    /// Ends the consumers and writes the last checkpoint, unless the hub's end by the clock
    /// has passed (this node's lease on the group ran out: another may own it now).
    async fn stop(&mut self) {
        self.end_consumers(Error::Unavailable(
            "the group stops on this node (the server is shutting down, or the group moves to \
             another node); connect again"
                .into(),
        ));
        if !self.hub.expired() {
            self.write_checkpoint_now().await;
        }
    }

    /// Another owner wrote the group's state since this one read it: it has taken the group
    /// over (this node lost its lease). This one ends its consumers and stops, writing nothing
    /// more; what they held unacknowledged is delivered again by the new owner.
    fn fence(&mut self) {
        tracing::warn!(
            "group {}: another node has taken the group over; this node stops serving it",
            self.definition.name
        );
        self.fenced = true;
        self.end_consumers(Error::Unavailable(format!(
            "group {:?} has moved to another node; connect again",
            self.definition.name
        )));
    }

    fn end_consumers(&mut self, error: Error) {
        for consumer in self.consumers.drain(..) {
            let _ = consumer.tx.send(ConsumerEvent::Ended(error.clone()));
        }
    }

    fn take_delivery(&mut self, delivery: Result<Delivery>) {
        match delivery {
            Ok(Delivery::Events(events)) => {
                for event in events {
                    // Groups never see system streams, their own checkpoints included.
                    if event.stream.is_system() {
                        continue;
                    }
                    let key = Key::Source(event.position.0);
                    self.window_bytes += event.size();
                    self.window.insert(
                        key,
                        Message {
                            event,
                            deliveries: 0,
                            state: State::Available,
                        },
                    );
                    self.source_messages += 1;
                }
            }
            Ok(Delivery::CaughtUp { .. }) => {}
            Err(e) => {
                tracing::warn!(
                    "group {}: reading its source failed, retrying in {STORE_RETRY:?}: {e}",
                    self.definition.name
                );
                self.reader_paused_until = Some(Instant::now() + STORE_RETRY);
            }
        }
    }

    /// Timeouts become retries; retries whose wait is over become available.
    fn expire(&mut self, now: Instant) {
        let mut timed_out = Vec::new();
        for (key, message) in &mut self.window {
            match message.state {
                State::InFlight { deadline, .. } if deadline <= now => timed_out.push(*key),
                State::Waiting { until } if until <= now => message.state = State::Available,
                _ => {}
            }
        }
        let timeout = Duration::from_millis(self.settings().message_timeout_ms);
        for key in timed_out {
            self.release(key);
            self.retry_or_park(key, &format!("no ack within {timeout:?}"));
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        self.window
            .values()
            .filter_map(|m| match m.state {
                State::InFlight { deadline, .. } => Some(deadline),
                State::Waiting { until } => Some(until),
                State::Available => None,
            })
            .min()
    }

    /// Hands available messages to consumers with room.
    fn dispatch(&mut self) {
        if !self.consumers.iter().any(|c| c.in_flight < c.capacity) {
            return;
        }
        let parking: Vec<Key> = self.to_park.iter().map(|(k, _)| *k).collect();
        let mut batches: HashMap<u64, Vec<GroupMessage>> = HashMap::new();
        match self.settings().strategy {
            Strategy::RoundRobin => {
                let keys: Vec<Key> = self
                    .window
                    .iter()
                    .filter(|(k, m)| matches!(m.state, State::Available) && !parking.contains(k))
                    .map(|(k, _)| *k)
                    .collect();
                for key in keys {
                    let Some(index) = self.next_with_room() else {
                        break;
                    };
                    self.assign(key, index, &mut batches);
                }
            }
            Strategy::Pinned => self.dispatch_pinned(&parking, &mut batches),
        }
        self.send(batches);
    }

    /// The next consumer in turn that has room.
    fn next_with_room(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        for step in 0..n {
            let index = (self.round_robin + step) % n;
            if self.consumers[index].in_flight < self.consumers[index].capacity {
                self.round_robin = (index + 1) % n;
                return Some(index);
            }
        }
        None
    }

    /// Each stream goes to one consumer at a time: the one holding any of its messages in
    /// flight (a consumer, not a name: two polls under one name are two consumers), else a
    /// consumer of the name the stream hashes to. A message goes out only once every earlier
    /// message of its stream is done or in flight to that same consumer.
    fn dispatch_pinned(&mut self, parking: &[Key], batches: &mut HashMap<u64, Vec<GroupMessage>>) {
        enum Stream {
            HeldBy(u64),
            Blocked,
        }
        let mut names: Vec<Arc<str>> = self.consumers.iter().map(|c| Arc::clone(&c.name)).collect();
        names.sort();
        names.dedup();
        // Who holds each stream, over the whole window: a later message in flight binds the
        // stream as much as an earlier one.
        let mut streams: HashMap<StreamName, Stream> = HashMap::new();
        for message in self.window.values() {
            if let State::InFlight { consumer, .. } = message.state {
                let next = match streams.get(&message.event.stream) {
                    None => Stream::HeldBy(consumer),
                    Some(Stream::HeldBy(holder)) if *holder == consumer => continue,
                    Some(_) => Stream::Blocked,
                };
                streams.insert(message.event.stream.clone(), next);
            }
        }
        // Streams whose next message cannot go out now: what follows it waits too.
        let mut stopped: std::collections::HashSet<StreamName> = std::collections::HashSet::new();
        let keys: Vec<Key> = self.window.keys().copied().collect();
        for key in keys {
            let message = &self.window[&key];
            let stream = message.event.stream.clone();
            if parking.contains(&key) || matches!(message.state, State::Waiting { .. }) {
                stopped.insert(stream);
                continue;
            }
            if !matches!(message.state, State::Available) || stopped.contains(&stream) {
                continue;
            }
            let index = match streams.get(&stream) {
                Some(Stream::Blocked) => None,
                Some(Stream::HeldBy(holder)) => self
                    .consumers
                    .iter()
                    .position(|c| c.id == *holder && c.in_flight < c.capacity),
                None => {
                    let target = &names[pin(&stream, names.len())];
                    self.consumers
                        .iter()
                        .position(|c| c.name == *target && c.in_flight < c.capacity)
                }
            };
            match index {
                Some(index) => {
                    let holder = self.consumers[index].id;
                    self.assign(key, index, batches);
                    streams.insert(stream, Stream::HeldBy(holder));
                }
                None => {
                    stopped.insert(stream);
                }
            }
        }
    }

    /// With pinned ordering, a message that goes back to wait for a retry takes back the later
    /// messages of its stream still in flight: they go out again after it, in order (their
    /// deliveries counted, their ack ids no longer in force).
    fn recall_later(&mut self, key: Key) {
        if self.settings().strategy != Strategy::Pinned {
            return;
        }
        let Some(stream) = self.window.get(&key).map(|m| m.event.stream.clone()) else {
            return;
        };
        let later: Vec<Key> = self
            .window
            .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
            .filter(|(_, m)| m.event.stream == stream && matches!(m.state, State::InFlight { .. }))
            .map(|(k, _)| *k)
            .collect();
        for key in later {
            self.release(key);
        }
    }

    fn assign(&mut self, key: Key, index: usize, batches: &mut HashMap<u64, Vec<GroupMessage>>) {
        let timeout = Duration::from_millis(self.settings().message_timeout_ms);
        let consumer = &mut self.consumers[index];
        let message = self.window.get_mut(&key).expect("assigned from the window");
        message.deliveries += 1;
        message.state = State::InFlight {
            consumer: consumer.id,
            deadline: Instant::now() + timeout,
        };
        consumer.in_flight += 1;
        batches.entry(consumer.id).or_default().push(GroupMessage {
            ack_id: AckId {
                key,
                delivery: message.deliveries,
                token: self.token,
            }
            .format(),
            deliveries: message.deliveries,
            event: Arc::clone(&message.event),
        });
    }

    fn send(&mut self, batches: HashMap<u64, Vec<GroupMessage>>) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (id, batch) in batches {
            let count = batch.len();
            let Some(consumer) = self.consumers.iter().find(|c| c.id == id) else {
                continue;
            };
            let one_batch = consumer.one_batch;
            let sent = consumer.tx.send(ConsumerEvent::Messages(batch));
            if let Err(unsent) = sent {
                // It left, or stopped taking (a long-poll whose wait ran out): the batch never
                // reached it, so it goes back at once, its delivery not counted.
                if let ConsumerEvent::Messages(batch) = unsent.0 {
                    self.give_back(id, batch.iter().map(|m| m.ack_id.as_str()));
                }
                gone.push(id);
                continue;
            }
            self.delivered += count as u64;
            self.recent.record(now, count as u64);
            if one_batch {
                gone.push(id);
            }
        }
        for id in gone {
            self.leave(id);
        }
    }

    /// Makes messages in flight to `consumer` that never reached it available again, their
    /// delivery not counted.
    fn give_back<'a>(&mut self, consumer: u64, ack_ids: impl Iterator<Item = &'a str>) {
        for id in ack_ids {
            let Some(ack) = AckId::parse(id).filter(|ack| ack.token == self.token) else {
                continue;
            };
            let Some(held) = self.window.get_mut(&ack.key) else {
                continue;
            };
            if held.deliveries == ack.delivery
                && matches!(held.state, State::InFlight { consumer: c, .. } if c == consumer)
            {
                held.state = State::Available;
                held.deliveries = held.deliveries.saturating_sub(1);
                if let Some(c) = self.consumers.iter_mut().find(|c| c.id == consumer) {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
            }
        }
    }

    fn parked_from(&self) -> u64 {
        match self.window.keys().next() {
            Some(Key::Parked(revision)) => *revision,
            _ => self.replay_loaded,
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        let position = self
            .window
            .keys()
            .find_map(|k| match k {
                Key::Source(position) => Some(*position),
                Key::Parked(_) => None,
            })
            .unwrap_or_else(|| self.reader.position());
        Checkpoint {
            generation: self.definition.generation,
            position: position.max(self.last_checkpoint.position),
            parked_from: self.parked_from(),
            parked_to: self.parked_to,
        }
    }

    async fn write_checkpoint_now(&mut self) {
        self.last_write = Instant::now();
        let checkpoint = self.checkpoint();
        if checkpoint == self.last_checkpoint {
            self.dirty = false;
            return;
        }
        match write_checkpoint(
            &*self.store,
            &self.definition.name,
            checkpoint,
            self.checkpoint_revision,
        )
        .await
        {
            Ok(revision) => {
                self.checkpoint_revision = Some(revision);
                self.last_checkpoint = checkpoint;
                self.dirty = false;
            }
            Err(Error::WrongExpectedRevision { .. }) => self.fence(),
            Err(e) => tracing::warn!(
                "group {}: writing its checkpoint failed, retrying later: {e}",
                self.definition.name
            ),
        }
    }

    /// Appends the messages to park to `$parked-NAME` in one append; they are done once it
    /// is stored.
    async fn park(&mut self) {
        let to_park = std::mem::take(&mut self.to_park);
        let mut events = Vec::with_capacity(to_park.len());
        for (key, reason) in &to_park {
            let message = &self.window[key];
            let e = &message.event;
            let entry = ParkedEntry {
                generation: self.definition.generation,
                position: e.position.0,
                stream: e.stream.to_string(),
                revision: e.revision.0,
                event_id: e.id.to_string(),
                event_type: e.event_type.to_string(),
                deliveries: message.deliveries,
                reason: reason.clone(),
            };
            events.push(system_event(
                "$parked",
                serde_json::to_string(&entry).expect("serializable"),
            ));
        }
        let request = AppendRequest {
            stream: parked_stream(&self.definition.name),
            expected: exactly_after(self.parked_len.checked_sub(1)),
            condition: None,
            events,
        };
        match self.store.append(request).await {
            Ok(result) => {
                self.parked_len = result.last_revision.0 + 1;
                for (key, _) in to_park {
                    self.release(key);
                    self.finish(key);
                }
            }
            Err(Error::WrongExpectedRevision { .. }) => self.fence(),
            Err(e) => {
                tracing::warn!(
                    "group {}: parking {} messages failed, retrying them later: {e}",
                    self.definition.name,
                    to_park.len()
                );
                let until = Instant::now() + STORE_RETRY;
                for (key, _) in to_park {
                    self.release(key);
                    if let Some(m) = self.window.get_mut(&key) {
                        m.state = State::Waiting { until };
                    }
                }
            }
        }
    }

    /// Loads parked entries of the replay into the window.
    async fn load_parked(&mut self) {
        let room = self
            .settings()
            .buffer_size
            .saturating_sub(self.window.len());
        let limit = room
            .min(PARKED_PAGE)
            .min((self.parked_to - self.replay_loaded) as usize);
        let page = self
            .store
            .read(ReadRequest {
                source: ReadSource::Stream(parked_stream(&self.definition.name)),
                from: Some(self.replay_loaded),
                direction: Direction::Forward,
                limit,
            })
            .await;
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(
                    "group {}: reading parked messages failed: {e}",
                    self.definition.name
                );
                return;
            }
        };
        if page.events.is_empty() {
            // The parked stream is shorter than the replay asked: nothing more to load.
            self.replay_loaded = self.parked_to;
            return;
        }
        for parked in page.events {
            let revision = parked.revision.0;
            if revision >= self.parked_to {
                break;
            }
            match self.parked_event(&parked).await {
                Ok(Some(event)) => {
                    self.window_bytes += event.size();
                    self.window.insert(
                        Key::Parked(revision),
                        Message {
                            event: Arc::new(event),
                            deliveries: 0,
                            state: State::Available,
                        },
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(
                        "group {}: loading parked message {revision} failed: {e}",
                        self.definition.name
                    );
                    return;
                }
            }
            self.replay_loaded = revision + 1;
            self.dirty = true;
        }
    }

    /// The event a parked entry names, or `None` for entries of another generation or that
    /// cannot be read back (logged).
    async fn parked_event(&self, parked: &RecordedEvent) -> Result<Option<RecordedEvent>> {
        let Ok(entry) = serde_json::from_slice::<ParkedEntry>(parked.data.bytes()) else {
            tracing::warn!(
                "group {}: parked entry at position {} is not a parked message; skipped",
                self.definition.name,
                parked.position
            );
            return Ok(None);
        };
        if entry.generation != self.definition.generation {
            return Ok(None);
        }
        let page = self
            .store
            .read(ReadRequest {
                source: ReadSource::All(None),
                from: Some(entry.position),
                direction: Direction::Forward,
                limit: 1,
            })
            .await?;
        match page.events.into_iter().next() {
            Some(event)
                if event.position.0 == entry.position && event.id.to_string() == entry.event_id =>
            {
                Ok(Some(event))
            }
            _ => {
                tracing::warn!(
                    "group {}: parked event {} at position {} is not in the store; skipped",
                    self.definition.name,
                    entry.event_id,
                    entry.position
                );
                Ok(None)
            }
        }
    }

    async fn stats(&mut self) -> GroupStats {
        // A live reader is woken only by events it selects, so its cursor may still stand
        // before events of other streams; one poll moves it to the tail's end, so that the lag
        // counts what the group has left to do. Cancel-safe: nothing is lost if it is not ready.
        if self.has_room() {
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            let polled = std::pin::pin!(self.reader.next()).poll(&mut context);
            if let std::task::Poll::Ready(delivery) = polled {
                self.take_delivery(delivery);
            }
        }
        let delivery_rate = self.recent.per_second(Instant::now());
        let in_flight = self
            .window
            .values()
            .filter(|m| matches!(m.state, State::InFlight { .. }))
            .count();
        let checkpoint = self.checkpoint();
        let head = self
            .store
            .next_position()
            .await
            .unwrap_or(checkpoint.position);
        GroupStats {
            consumers: self
                .consumers
                .iter()
                .map(|c| ConsumerStats {
                    name: c.name.to_string(),
                    kind: c.kind,
                    in_flight: c.in_flight,
                    capacity: c.capacity,
                })
                .collect(),
            in_flight,
            available: self.window.len() - in_flight,
            checkpoint: checkpoint.position,
            head,
            lag: head.saturating_sub(checkpoint.position),
            parked: self.parked_len.saturating_sub(checkpoint.parked_from),
            delivered: self.delivered,
            delivery_rate,
        }
    }
}

/// Which of `n` consumers a stream is pinned to (FNV-1a of its name).
fn pin(stream: &StreamName, n: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % n as u64) as usize
}

fn nack_reason(reason: &str) -> String {
    if reason.is_empty() {
        "parked by a consumer".to_owned()
    } else {
        format!("parked by a consumer: {reason}")
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn system_event(event_type: &str, data: String) -> ProposedEvent {
    ProposedEvent::new(
        EventType::new(event_type).expect("a valid event type"),
        EventData::json(data).expect("serde_json writes JSON"),
    )
}

/// Appends `checkpoint` after the revision `after` (none: the stream's first event) and
/// returns its revision. Written at that exact revision, so that an owner of the group that
/// another node has taken over cannot write over the new owner's state: its write fails with
/// `WrongExpectedRevision`, and it stops (docs/postgres.md, "Owners across nodes").
async fn write_checkpoint<S: EventStore>(
    store: &S,
    name: &str,
    checkpoint: Checkpoint,
    after: Option<u64>,
) -> Result<u64> {
    store
        .append(AppendRequest {
            stream: checkpoint_stream(name),
            expected: exactly_after(after),
            condition: None,
            events: vec![system_event("$checkpoint", json!(checkpoint).to_string())],
        })
        .await
        .map(|r| r.last_revision.0)
}

fn exactly_after(revision: Option<u64>) -> ExpectedRevision {
    revision.map_or(ExpectedRevision::NoStream, |r| {
        ExpectedRevision::Exact(skald_core::Revision(r))
    })
}

/// The group's latest checkpoint, if it has one of its own generation, and the revision of the
/// checkpoint stream's last event (of any generation), which the next write expects.
async fn read_checkpoint<S: EventStore>(
    store: &S,
    definition: &GroupDefinition,
) -> Result<(Option<Checkpoint>, Option<u64>)> {
    let page = store
        .read(ReadRequest {
            source: ReadSource::Stream(checkpoint_stream(&definition.name)),
            from: None,
            direction: Direction::Backward,
            limit: 1,
        })
        .await?;
    let Some(last) = page.events.first() else {
        return Ok((None, None));
    };
    let revision = Some(last.revision.0);
    match serde_json::from_slice::<Checkpoint>(last.data.bytes()) {
        Ok(c) if c.generation == definition.generation => Ok((Some(c), revision)),
        Ok(_) => Ok((None, revision)),
        Err(e) => Err(Error::Corruption {
            file: checkpoint_stream(&definition.name).to_string(),
            offset: last.position.0,
            reason: format!(
                "the checkpoint at position {} is unreadable: {e}",
                last.position
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_stays_small_however_often_it_is_fed_and_never_read() {
        let start = Instant::now();
        let mut window = RateWindow::default();
        // One batch every millisecond for a minute, the rate never read.
        for ms in 0..60_000u64 {
            window.record(start + Duration::from_millis(ms), 2);
        }
        let entries = window.0.len();
        let most = (RATE_WINDOW.as_millis() / RATE_BUCKET.as_millis()) as usize + 2;
        assert!(entries <= most, "{entries} entries");
        let end = start + Duration::from_millis(60_000);
        let rate = window.per_second(end);
        assert!((rate - 2000.0).abs() < 50.0, "{rate}");
        assert_eq!(window.per_second(end + RATE_WINDOW * 2), 0.0);
    }
}
