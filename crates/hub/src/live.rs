//! The live tail: the most recent events of the global log, in memory, shared by every live
//! subscriber. One task (the tailer) reads new events from the store once and publishes them
//! here; subscribers take from it without touching the store. It is bounded by events and by
//! bytes; a subscriber whose next event has already left it reads from the store instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use skald_core::{Direction, EventStore, MAX_READ_PAGE, ReadRequest, ReadSource, RecordedEvent};
use tokio::sync::{Notify, watch};

use crate::subscription::matches_source;

/// A bound on the live tail. Both limits apply; the oldest events leave first.
#[derive(Clone, Copy, Debug)]
pub struct TailLimits {
    /// Most events held.
    pub events: usize,
    /// Most bytes held (data, metadata and names, approximately).
    pub bytes: usize,
}

impl Default for TailLimits {
    fn default() -> Self {
        Self {
            events: 65_536,
            bytes: 64 << 20,
        }
    }
}

/// The contiguous run of events `[start, start + events.len())` of the global log.
struct Ring {
    start: u64,
    events: VecDeque<Arc<RecordedEvent>>,
    bytes: usize,
    /// The positions in the ring of each stream's events, oldest first, so that a stream
    /// subscriber finds its events without looking at everyone else's.
    streams: HashMap<String, VecDeque<u64>>,
    /// The same for categories.
    categories: HashMap<String, VecDeque<u64>>,
}

impl Ring {
    /// Drops every event (and frees their memory); the ring restarts at `start`.
    fn empty_at(&mut self, start: u64) {
        self.start = start;
        self.events = VecDeque::new();
        self.bytes = 0;
        self.streams = HashMap::new();
        self.categories = HashMap::new();
    }
}

/// Notes `position` under `name`, allocating the name only for a new key.
fn index_push(index: &mut HashMap<String, VecDeque<u64>>, name: &str, position: u64) {
    match index.get_mut(name) {
        Some(positions) => positions.push_back(position),
        None => {
            index.insert(name.to_owned(), VecDeque::from([position]));
        }
    }
}

/// Forgets the oldest position under `name`, which must be `position`.
fn index_pop(index: &mut HashMap<String, VecDeque<u64>>, name: &str, position: u64) {
    let positions = index.get_mut(name).expect("every ring event is indexed");
    let oldest = positions.pop_front();
    debug_assert_eq!(oldest, Some(position), "the index follows the ring's order");
    if positions.is_empty() {
        index.remove(name);
    }
}

/// What [`LiveTail::take`] found at a cursor.
pub(crate) enum Take {
    /// The matching events (possibly none) among those scanned, and the cursor after the last
    /// event scanned.
    Events(Vec<Arc<RecordedEvent>>, u64),
    /// The event at the cursor has left the tail (or never entered it): read the store.
    Behind,
    /// Nothing matching at or after the cursor yet; the cursor may move to the given position
    /// (past the events that did not match).
    Ahead(u64),
}

/// Most events one [`LiveTail::take`] looks at, so that the read lock is held briefly.
const SCAN_LIMIT: usize = 8192;

/// Whom a published event concerns: subscribers are woken only for events they may want.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum WaitKey {
    Stream(String),
    Category(String),
    Everything,
}

impl WaitKey {
    pub fn of(source: &ReadSource) -> Self {
        match source {
            ReadSource::Stream(stream) => Self::Stream(stream.as_str().to_owned()),
            ReadSource::Category(category) => Self::Category(category.as_str().to_owned()),
            ReadSource::All(_) | ReadSource::Query(_) => Self::Everything,
        }
    }
}

/// A subscriber's registration for wake-ups; unregisters when dropped.
pub(crate) struct Waiter {
    tail: Arc<LiveTail>,
    key: WaitKey,
    id: u64,
    notify: Arc<Notify>,
}

impl Waiter {
    /// Resolves after an event this waiter may want was published since the last call (a
    /// wake-up that arrives before the call is kept, so none is lost).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.tail.waiters.lock().expect("waiters lock poisoned");
        if let Some(list) = waiters.get_mut(&self.key) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                waiters.remove(&self.key);
            }
        }
        drop(waiters);
        if self.tail.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tail.release_if_idle();
        }
    }
}

/// A waiter's id and the `Notify` that wakes it.
type Registration = (u64, Arc<Notify>);

/// The shared tail. See the module documentation.
pub(crate) struct LiveTail {
    ring: RwLock<Ring>,
    waiters: Mutex<HashMap<WaitKey, Vec<Registration>>>,
    next_waiter: AtomicU64,
    subscribers: AtomicUsize,
    limits: TailLimits,
}

/// Approximate memory an event holds, for the byte bound.
fn event_bytes(e: &RecordedEvent) -> usize {
    e.data.bytes().len()
        + e.metadata.as_str().len()
        + e.stream.as_str().len()
        + e.event_type.as_str().len()
        + e.tags.iter().map(|t| t.as_str().len() + 24).sum::<usize>()
        + 160
}

impl LiveTail {
    pub fn new(start: u64, limits: TailLimits) -> Self {
        Self {
            ring: RwLock::new(Ring {
                start,
                events: VecDeque::new(),
                bytes: 0,
                streams: HashMap::new(),
                categories: HashMap::new(),
            }),
            waiters: Mutex::new(HashMap::new()),
            next_waiter: AtomicU64::new(0),
            subscribers: AtomicUsize::new(0),
            limits,
        }
    }

    /// Registers a subscriber, woken for the events `source` may select.
    pub fn register(self: &Arc<Self>, source: &ReadSource) -> Waiter {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        let key = WaitKey::of(source);
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.waiters
            .lock()
            .expect("waiters lock poisoned")
            .entry(key.clone())
            .or_default()
            .push((id, Arc::clone(&notify)));
        Waiter {
            tail: Arc::clone(self),
            key,
            id,
            notify,
        }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    /// The position after the last event in the ring.
    #[cfg(test)]
    fn end(&self) -> u64 {
        let ring = self.ring.read().expect("live tail lock poisoned");
        ring.start + ring.events.len() as u64
    }

    /// Up to `max` events selected by `source`, from position `cursor` on, scanning at most
    /// [`SCAN_LIMIT`] events.
    pub fn take(&self, cursor: u64, max: usize, source: &ReadSource) -> Take {
        let ring = self.ring.read().expect("live tail lock poisoned");
        let end = ring.start + ring.events.len() as u64;
        if cursor < ring.start {
            return Take::Behind;
        }
        if cursor >= end {
            return Take::Ahead(cursor);
        }
        let indexed = match source {
            ReadSource::Stream(stream) => Some(ring.streams.get(stream.as_str())),
            ReadSource::Category(category) => Some(ring.categories.get(category.as_str())),
            ReadSource::All(_) | ReadSource::Query(_) => None,
        };
        if let Some(positions) = indexed {
            // Every event of the stream (or category) in the ring is in its index: take them
            // from the cursor, and the cursor may move past everything else.
            let Some(positions) = positions else {
                return Take::Ahead(end);
            };
            let first = positions.partition_point(|p| *p < cursor);
            let matching: Vec<_> = positions
                .range(first..)
                .take(max.max(1))
                .map(|p| Arc::clone(&ring.events[(p - ring.start) as usize]))
                .collect();
            return match matching.last() {
                None => Take::Ahead(end),
                Some(_) if matching.len() < max.max(1) => Take::Events(matching, end),
                Some(last) => {
                    let next = last.position.0 + 1;
                    Take::Events(matching, next)
                }
            };
        }
        let from = usize::try_from(cursor - ring.start).expect("ring index fits in usize");
        let mut matching = Vec::new();
        let mut next = cursor;
        for event in ring.events.range(from..).take(SCAN_LIMIT) {
            next = event.position.0 + 1;
            if matches_source(source, event) {
                matching.push(Arc::clone(event));
                if matching.len() >= max.max(1) {
                    break;
                }
            }
        }
        if matching.is_empty() && next == end {
            Take::Ahead(next)
        } else {
            Take::Events(matching, next)
        }
    }

    /// Wakes the subscribers of `keys` and those of every event.
    fn wake(&self, keys: &HashSet<WaitKey>) {
        let waiters = self.waiters.lock().expect("waiters lock poisoned");
        let everything = std::iter::once(&WaitKey::Everything);
        for key in keys.iter().chain(everything) {
            for (_, notify) in waiters.get(key).into_iter().flatten() {
                notify.notify_one();
            }
        }
    }

    /// Frees the ring's events once the last subscriber has gone, instead of holding up to
    /// its bound until the next append. The ring stays where it ends, so the tailer goes on
    /// from there and a subscriber that arrives meanwhile reads the store first.
    fn release_if_idle(&self) {
        let mut ring = self.ring.write().expect("live tail lock poisoned");
        if self.subscribers() == 0 {
            let end = ring.start + ring.events.len() as u64;
            ring.empty_at(end);
        }
    }

    /// Wakes every subscriber (after the tail restarted somewhere else).
    fn wake_all(&self) {
        let waiters = self.waiters.lock().expect("waiters lock poisoned");
        for (_, notify) in waiters.values().flatten() {
            notify.notify_one();
        }
    }

    /// Appends the events that follow the ring's end, evicting the oldest past the bounds,
    /// then wakes the subscribers they concern.
    fn publish(&self, events: Vec<RecordedEvent>) {
        let mut keys = HashSet::new();
        for event in &events {
            if keys.insert(WaitKey::Stream(event.stream.as_str().to_owned())) {
                keys.insert(WaitKey::Category(
                    event.stream.category().as_str().to_owned(),
                ));
            }
        }
        {
            let mut ring = self.ring.write().expect("live tail lock poisoned");
            let end = ring.start + ring.events.len() as u64;
            for (expected, event) in (end..).zip(events) {
                // The tailer reads the log in order; a gap here would make a subscriber skip
                // events, so it is checked where the events cross into the tail.
                assert_eq!(event.position.0, expected, "live tail must stay contiguous");
                ring.bytes += event_bytes(&event);
                index_push(&mut ring.streams, event.stream.as_str(), expected);
                index_push(&mut ring.categories, event.stream.category_str(), expected);
                ring.events.push_back(Arc::new(event));
            }
            while ring.events.len() > self.limits.events
                || (ring.bytes > self.limits.bytes && ring.events.len() > 1)
            {
                let old = ring.events.pop_front().expect("ring is not empty");
                ring.bytes -= event_bytes(&old);
                let position = old.position.0;
                index_pop(&mut ring.streams, old.stream.as_str(), position);
                index_pop(&mut ring.categories, old.stream.category_str(), position);
                ring.start += 1;
            }
        }
        self.wake(&keys);
    }

    /// Empties the ring and restarts it at `start`: the tailer does this instead of reading
    /// while nobody listens, and after a failed read. Subscribers waiting in the old ring are
    /// woken to find they must read the store.
    fn reset(&self, start: u64) {
        {
            let mut ring = self.ring.write().expect("live tail lock poisoned");
            ring.empty_at(start);
        }
        self.wake_all();
    }
}

/// How long the tailer waits before trying again after a failed read.
const TAILER_RETRY: Duration = Duration::from_millis(200);

/// Reads every new event of the global log once and publishes it to `tail`, until `stop`
/// turns true. While no subscriber listens it only follows the head.
pub(crate) async fn run_tailer<S: EventStore>(
    store: Arc<S>,
    tail: Arc<LiveTail>,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursor = loop {
        match store.next_position().await {
            Ok(head) => break head,
            Err(_) => tokio::time::sleep(TAILER_RETRY).await,
        }
    };
    tail.reset(cursor);
    loop {
        let head = tokio::select! {
            head = store.wait_for_append(cursor) => head,
            _ = stop.wait_for(|stopping| *stopping) => return,
        };
        let Ok(head) = head else {
            return; // The store is shut down: nothing more will come.
        };
        if tail.subscribers() == 0 {
            tail.reset(head);
            cursor = head;
            continue;
        }
        while cursor < head {
            let page = store
                .read(ReadRequest {
                    source: ReadSource::All(None),
                    from: Some(cursor),
                    direction: Direction::Forward,
                    limit: MAX_READ_PAGE,
                })
                .await;
            match page {
                Ok(page) if !page.events.is_empty() => {
                    cursor = page.events.last().expect("page is not empty").position.0 + 1;
                    tail.publish(page.events);
                }
                Ok(_) => break,
                Err(_) => {
                    // Subscribers fall back to reading the store themselves, where they see
                    // the error; the tail starts again at the head.
                    tokio::time::sleep(TAILER_RETRY).await;
                    let head = store.next_position().await.unwrap_or(head);
                    tail.reset(head);
                    cursor = head;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skald_core::{
        EventData, EventId, EventType, Metadata, Position, Revision, StreamName, Timestamp,
    };

    fn event(position: u64) -> RecordedEvent {
        let stream = if position.is_multiple_of(2) {
            "even-1"
        } else {
            "odd-1"
        };
        RecordedEvent {
            id: EventId::generate(),
            stream: StreamName::new(stream).unwrap(),
            event_type: EventType::new("t").unwrap(),
            data: EventData::json("{}").unwrap(),
            metadata: Metadata::empty(),
            tags: vec![],
            source: None,
            recorded_at: Timestamp(0),
            revision: Revision(position / 2),
            position: Position(position),
        }
    }

    fn positions(take: Take) -> (Vec<u64>, u64) {
        match take {
            Take::Events(events, next) => (events.iter().map(|e| e.position.0).collect(), next),
            Take::Ahead(next) => (vec![], next),
            Take::Behind => panic!("behind"),
        }
    }

    const ALL: ReadSource = ReadSource::All(None);

    #[test]
    fn take_reports_behind_inside_and_ahead_and_evicts_oldest_first() {
        let tail = LiveTail::new(
            10,
            TailLimits {
                events: 3,
                bytes: usize::MAX,
            },
        );
        assert!(matches!(tail.take(10, 5, &ALL), Take::Ahead(10)));
        tail.publish((10..15).map(event).collect());
        assert_eq!(tail.end(), 15);
        assert!(matches!(tail.take(11, 5, &ALL), Take::Behind));
        assert_eq!(positions(tail.take(12, 2, &ALL)), (vec![12, 13], 14));
        assert!(matches!(tail.take(15, 5, &ALL), Take::Ahead(15)));
        tail.reset(20);
        assert!(matches!(tail.take(15, 5, &ALL), Take::Behind));
        assert!(matches!(tail.take(20, 5, &ALL), Take::Ahead(20)));
    }

    #[test]
    fn take_filters_and_moves_the_cursor_past_what_does_not_match() {
        let tail = LiveTail::new(0, TailLimits::default());
        tail.publish((0..6).map(event).collect());
        let odd = ReadSource::Stream(StreamName::new("odd-1").unwrap());
        assert_eq!(positions(tail.take(0, 2, &odd)), (vec![1, 3], 4));
        assert_eq!(positions(tail.take(4, 2, &odd)), (vec![5], 6));
        let even = ReadSource::Category(skald_core::Category::new("even").unwrap());
        assert_eq!(positions(tail.take(5, 2, &even)), (vec![], 6));
    }

    #[test]
    fn the_stream_index_follows_eviction() {
        let tail = LiveTail::new(
            0,
            TailLimits {
                events: 4,
                bytes: usize::MAX,
            },
        );
        let odd = ReadSource::Stream(StreamName::new("odd-1").unwrap());
        tail.publish((0..6).map(event).collect());
        // 0 and 1 left the ring; the index forgot 1 with them.
        assert!(matches!(tail.take(1, 9, &odd), Take::Behind));
        assert_eq!(positions(tail.take(2, 9, &odd)), (vec![3, 5], 6));
        tail.publish((6..10).map(event).collect());
        assert_eq!(positions(tail.take(6, 9, &odd)), (vec![7, 9], 10));
        let ring = tail.ring.read().unwrap();
        assert_eq!(ring.streams["odd-1"], [7, 9]);
        assert_eq!(ring.categories["even"], [6, 8]);
    }

    #[test]
    fn the_last_subscriber_leaving_frees_the_ring_where_it_ends() {
        let tail = Arc::new(LiveTail::new(0, TailLimits::default()));
        let waiter = tail.register(&ALL);
        tail.publish((0..5).map(event).collect());
        assert_eq!(positions(tail.take(0, 9, &ALL)).0.len(), 5);
        drop(waiter);
        assert!(matches!(tail.take(0, 9, &ALL), Take::Behind));
        assert_eq!(tail.end(), 5);
        // The tailer goes on where the ring ended.
        let _waiter = tail.register(&ALL);
        tail.publish((5..7).map(event).collect());
        assert_eq!(positions(tail.take(5, 9, &ALL)), (vec![5, 6], 7));
    }

    #[tokio::test]
    async fn publishing_wakes_only_the_subscribers_it_concerns() {
        let tail = Arc::new(LiveTail::new(0, TailLimits::default()));
        let odd = tail.register(&ReadSource::Stream(StreamName::new("odd-1").unwrap()));
        let even = tail.register(&ReadSource::Category(
            skald_core::Category::new("even").unwrap(),
        ));
        let all = tail.register(&ALL);
        assert_eq!(tail.subscribers(), 3);
        tail.publish(vec![event(0)]);
        let now = |w: &Waiter| {
            let mut f = std::pin::pin!(w.woken());
            let waker = std::task::Waker::noop();
            f.as_mut()
                .poll(&mut std::task::Context::from_waker(waker))
                .is_ready()
        };
        assert!(now(&even) && now(&all));
        assert!(
            !now(&odd),
            "an event of another stream does not wake a stream subscriber"
        );
        drop(odd);
        assert_eq!(tail.subscribers(), 2);
    }

    #[test]
    fn the_byte_bound_keeps_at_least_the_newest_event() {
        let tail = LiveTail::new(
            0,
            TailLimits {
                events: 100,
                bytes: 1,
            },
        );
        tail.publish((0..4).map(event).collect());
        assert!(matches!(tail.take(2, 5, &ALL), Take::Behind));
        assert!(matches!(tail.take(3, 5, &ALL), Take::Events(..)));
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_gap_in_what_the_tailer_publishes_is_caught() {
        let tail = LiveTail::new(0, TailLimits::default());
        tail.publish(vec![event(1)]);
    }
}
