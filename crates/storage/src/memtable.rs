//! Index entries of recent events, in memory, until the flusher writes them to redb in one
//! large sorted transaction. See "The memtable" in `docs/storage.md`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::index::{IndexEntry, SPARSE_EVERY, Tables};
use crate::redb_error;
use crate::segments::Address;

/// Events in the active memtable before it is frozen and flushed (the default of
/// `Options::memtable_events`).
pub const MEMTABLE_EVENTS: u64 = 65_536;
/// Frozen memtables that may wait for the flusher before the writer waits too.
pub const MAX_FROZEN: usize = 4;

/// `(position, address)` entries of one index key, in position order.
pub type Postings = Vec<(u64, Address)>;

/// The index entries of the events at positions `base..end`.
pub struct Memtable {
    pub base: u64,
    pub end: u64,
    /// Stream name to `(revision, position, address)`, in revision order.
    pub streams: HashMap<String, Vec<(u64, u64, Address)>>,
    pub categories: HashMap<String, Postings>,
    pub tags: HashMap<String, Postings>,
    pub types: HashMap<String, Postings>,
    pub ids: HashMap<[u8; 16], (u64, Address)>,
    pub sparse: Postings,
    /// The first and last segment ordinal of its events.
    ordinals: Option<(u32, u32)>,
}

fn push_posting(map: &mut HashMap<String, Postings>, key: &str, position: u64, address: Address) {
    match map.get_mut(key) {
        Some(list) => list.push((position, address)),
        None => {
            map.insert(key.to_owned(), vec![(position, address)]);
        }
    }
}

impl Memtable {
    /// An empty memtable whose first event will be at `base`.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            end: base,
            streams: HashMap::new(),
            categories: HashMap::new(),
            tags: HashMap::new(),
            types: HashMap::new(),
            ids: HashMap::new(),
            sparse: Vec::new(),
            ordinals: None,
        }
    }

    /// Events held.
    pub fn len(&self) -> u64 {
        self.end - self.base
    }

    /// Adds one event; events arrive in position order.
    pub fn insert(&mut self, e: &IndexEntry<'_>) {
        debug_assert_eq!(
            e.position, self.end,
            "memtable entries arrive in position order"
        );
        let (p, a) = (e.position, e.address);
        let ordinal = a.ordinal();
        self.ordinals = Some(self.ordinals.map_or((ordinal, ordinal), |(first, last)| {
            (first.min(ordinal), last.max(ordinal))
        }));
        match self.streams.get_mut(e.stream) {
            Some(list) => list.push((e.revision, p, a)),
            None => {
                self.streams
                    .insert(e.stream.to_owned(), vec![(e.revision, p, a)]);
            }
        }
        push_posting(&mut self.categories, e.category, p, a);
        for tag in e.tags {
            // A tag given twice on one event is indexed once.
            if self
                .tags
                .get(tag.as_str())
                .and_then(|l| l.last())
                .map(|l| l.0)
                != Some(p)
            {
                push_posting(&mut self.tags, tag.as_str(), p, a);
            }
        }
        push_posting(&mut self.types, e.event_type, p, a);
        self.ids.insert(*e.id, (p, a));
        if p.is_multiple_of(SPARSE_EVERY) || e.first_in_segment {
            self.sparse.push((p, a));
        }
        self.end = p + 1;
    }

    /// Removes every entry at or after `position` (a failed batch).
    pub fn rollback(&mut self, position: u64) {
        if position >= self.end {
            return;
        }
        self.streams.retain(|_, list| {
            while list.last().is_some_and(|e| e.1 >= position) {
                list.pop();
            }
            !list.is_empty()
        });
        for map in [&mut self.categories, &mut self.tags, &mut self.types] {
            map.retain(|_, list| {
                while list.last().is_some_and(|e| e.0 >= position) {
                    list.pop();
                }
                !list.is_empty()
            });
        }
        self.ids.retain(|_, (p, _)| *p < position);
        while self.sparse.last().is_some_and(|e| e.0 >= position) {
            self.sparse.pop();
        }
        self.end = position.max(self.base);
    }

    /// Commits every entry to redb in one transaction that also moves `indexed_through` to
    /// `end`: durable (the flusher, the end of recovery) or not (recovery's intermediate
    /// batches, made durable by the last one).
    pub fn commit_to(&self, db: &redb::Database, durable: bool) -> Result<(), skald_core::Error> {
        self.commit_raw(db, durable).map_err(redb_error)
    }

    /// [`Memtable::commit_to`] with redb's own error, for the flusher to tell a full disk from
    /// worse.
    pub fn commit_raw(&self, db: &redb::Database, durable: bool) -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        if durable {
            txn.set_quick_repair(true);
        } else {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut tables = Tables::open(&txn)?;
            self.flush_into(&mut tables)?;
        }
        Ok(txn.commit()?)
    }

    /// The segments its events are in (first and last ordinal), if it holds any.
    pub fn ordinals(&self) -> Option<(u32, u32)> {
        self.ordinals
    }

    /// Writes every entry into redb, table by table in key order (sorted inserts are several
    /// times cheaper than scattered ones).
    fn flush_into(&self, t: &mut Tables<'_>) -> Result<(), redb::Error> {
        let mut streams: Vec<_> = self.streams.iter().collect();
        streams.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (name, list) in &streams {
            for (rev, _, addr) in list.iter() {
                t.stream_events.insert((name.as_str(), *rev), addr.0)?;
            }
            let (rev, pos, _) = list.last().expect("lists are never empty");
            t.streams.insert(name.as_str(), (*rev, *pos))?;
        }
        for (map, table) in [
            (&self.categories, &mut t.categories),
            (&self.tags, &mut t.tags),
            (&self.types, &mut t.types),
        ] {
            let mut keys: Vec<_> = map.iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (name, list) in keys {
                for (pos, addr) in list {
                    table.insert((name.as_str(), *pos), addr.0)?;
                }
            }
        }
        let mut ids: Vec<_> = self.ids.iter().collect();
        ids.sort_unstable_by_key(|(id, _)| **id);
        for (id, (pos, addr)) in ids {
            t.ids.insert(id, (*pos, addr.0))?;
        }
        for (pos, addr) in &self.sparse {
            t.sparse.insert(*pos, addr.0)?;
        }
        t.set_indexed_through(self.end)
    }
}

/// The memtables: frozen ones waiting for the flusher (oldest first) and the active one.
pub struct MemState {
    pub frozen: VecDeque<Arc<RwLock<Memtable>>>,
    pub active: Arc<RwLock<Memtable>>,
    /// The last flush failure (a full disk, say), cleared when a retry succeeds. While it is
    /// set and the frozen queue is full, the writer refuses appends with it.
    pub failed: Option<skald_core::Error>,
    /// Set at shutdown once everything is frozen: the flusher stops when the queue is empty.
    pub closing: bool,
}

/// The memtables with the condition variable the writer and the flusher wait on.
pub struct Memtables {
    pub state: Mutex<MemState>,
    pub changed: Condvar,
}

impl Memtables {
    /// Empty memtables starting at position `base`.
    pub fn new(base: u64) -> Self {
        Self {
            state: Mutex::new(MemState {
                frozen: VecDeque::new(),
                active: Arc::new(RwLock::new(Memtable::new(base))),
                failed: None,
                closing: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Every memtable, oldest first, for a reader.
    pub fn snapshot(&self) -> Vec<Arc<RwLock<Memtable>>> {
        let s = self.state.lock().expect("memtable lock poisoned");
        s.frozen
            .iter()
            .cloned()
            .chain(std::iter::once(Arc::clone(&s.active)))
            .collect()
    }
}
