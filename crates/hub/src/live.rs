//! The live tail: the most recent events of the global log, in memory, shared by every live
//! subscriber. One task (the tailer) reads new events from the store once and publishes them
//! here; subscribers take from it without touching the store. It is bounded by events and by
//! bytes; a subscriber whose next event has already left it reads from the store instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use skald_core::{Direction, EventStore, MAX_READ_PAGE, ReadRequest, ReadSource, RecordedEvent};
use tokio::sync::watch;

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
}

/// What [`LiveTail::take`] found at a cursor.
pub(crate) enum Take {
    /// Events from the cursor on, in position order (never empty).
    Events(Vec<Arc<RecordedEvent>>),
    /// The event at the cursor has left the tail (or never entered it): read the store.
    Behind,
    /// Nothing at or after the cursor yet.
    Ahead,
}

/// The shared tail. See the module documentation.
pub(crate) struct LiveTail {
    ring: RwLock<Ring>,
    /// The position after the last event in the ring; subscribers wait on it.
    end: watch::Sender<u64>,
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
            }),
            end: watch::Sender::new(start),
            subscribers: AtomicUsize::new(0),
            limits,
        }
    }

    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    pub fn add_subscriber(&self) {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
    }

    pub fn remove_subscriber(&self) {
        self.subscribers.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    /// Up to `max` events from position `cursor` on.
    pub fn take(&self, cursor: u64, max: usize) -> Take {
        let ring = self.ring.read().expect("live tail lock poisoned");
        let end = ring.start + ring.events.len() as u64;
        if cursor < ring.start {
            return Take::Behind;
        }
        if cursor >= end {
            return Take::Ahead;
        }
        let from = usize::try_from(cursor - ring.start).expect("ring index fits in usize");
        let to = ring.events.len().min(from + max.max(1));
        Take::Events(ring.events.range(from..to).cloned().collect())
    }

    /// Appends the events that follow the ring's end, evicting the oldest past the bounds.
    fn publish(&self, events: Vec<RecordedEvent>) {
        let Some(last) = events.last().map(|e| e.position.0) else {
            return;
        };
        {
            let mut ring = self.ring.write().expect("live tail lock poisoned");
            let end = ring.start + ring.events.len() as u64;
            for (expected, event) in (end..).zip(events) {
                // The tailer reads the log in order; a gap here would make a subscriber skip
                // events, so it is checked where the events cross into the tail.
                assert_eq!(event.position.0, expected, "live tail must stay contiguous");
                ring.bytes += event_bytes(&event);
                ring.events.push_back(Arc::new(event));
            }
            while ring.events.len() > self.limits.events
                || (ring.bytes > self.limits.bytes && ring.events.len() > 1)
            {
                let old = ring.events.pop_front().expect("ring is not empty");
                ring.bytes -= event_bytes(&old);
                ring.start += 1;
            }
        }
        self.end.send_replace(last + 1);
    }

    /// Empties the ring and restarts it at `start`: the tailer does this instead of reading
    /// while nobody listens.
    fn reset(&self, start: u64) {
        {
            let mut ring = self.ring.write().expect("live tail lock poisoned");
            ring.events.clear();
            ring.bytes = 0;
            ring.start = start;
        }
        self.end.send_replace(start);
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
        RecordedEvent {
            id: EventId::generate(),
            stream: StreamName::new("s").unwrap(),
            event_type: EventType::new("t").unwrap(),
            data: EventData::json("{}").unwrap(),
            metadata: Metadata::empty(),
            tags: vec![],
            source: None,
            recorded_at: Timestamp(0),
            revision: Revision(position),
            position: Position(position),
        }
    }

    #[test]
    fn take_reports_behind_inside_and_ahead_and_evicts_oldest_first() {
        let tail = LiveTail::new(
            10,
            TailLimits {
                events: 3,
                bytes: usize::MAX,
            },
        );
        assert!(matches!(tail.take(10, 5), Take::Ahead));
        tail.publish((10..15).map(event).collect());
        assert_eq!(*tail.end.borrow(), 15);
        assert!(matches!(tail.take(11, 5), Take::Behind));
        let Take::Events(got) = tail.take(12, 2) else {
            panic!("12 is in the tail")
        };
        assert_eq!(
            got.iter().map(|e| e.position.0).collect::<Vec<_>>(),
            [12, 13]
        );
        assert!(matches!(tail.take(15, 5), Take::Ahead));
        tail.reset(20);
        assert!(matches!(tail.take(15, 5), Take::Behind));
        assert!(matches!(tail.take(20, 5), Take::Ahead));
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
        assert!(matches!(tail.take(2, 5), Take::Behind));
        assert!(matches!(tail.take(3, 5), Take::Events(_)));
    }

    #[test]
    #[should_panic(expected = "contiguous")]
    fn a_gap_in_what_the_tailer_publishes_is_caught() {
        let tail = LiveTail::new(0, TailLimits::default());
        tail.publish(vec![event(1)]);
    }
}
