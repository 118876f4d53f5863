//! A consistent view of the indexes: a redb snapshot for positions below its
//! `indexed_through`, the memtables for positions at or above it, and nothing at or past `end`.

use std::cell::OnceCell;
use std::sync::{Arc, RwLock};

use redb::{
    Database, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, TableDefinition, Value,
};
use skald_core::{Direction, Error};

use crate::index::{self, IndexDb};
use crate::memtable::{Memtable, Postings};
use crate::redb_error;
use crate::segments::Address;

/// Which `(name, position)` index.
#[derive(Clone, Copy)]
pub enum Kind {
    Category,
    Tag,
    Type,
}

/// The tables open on first use: a head lookup needs one of the seven, and opening them all
/// cost a fifth of the server's CPU on one-event reads (docs/benchmarks.md).
pub struct View {
    /// Positions at or past this are not visible.
    pub end: u64,
    redb_through: u64,
    mems: Vec<Arc<RwLock<Memtable>>>,
    txn: ReadTransaction,
    /// The handle the transaction came from: kept while the view lives, even if the flusher
    /// replaces it after an I/O error.
    _db: Arc<Database>,
    streams: OnceCell<ReadOnlyTable<&'static str, (u64, u64)>>,
    stream_events: OnceCell<ReadOnlyTable<(&'static str, u64), u64>>,
    categories: OnceCell<ReadOnlyTable<(&'static str, u64), u64>>,
    tags: OnceCell<ReadOnlyTable<(&'static str, u64), u64>>,
    types: OnceCell<ReadOnlyTable<(&'static str, u64), u64>>,
    ids: OnceCell<ReadOnlyTable<&'static [u8; 16], (u64, u64)>>,
    sparse: OnceCell<ReadOnlyTable<u64, u64>>,
}

/// The table in `cell`, opened in `txn` the first time.
fn table<'c, K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    cell: &'c OnceCell<ReadOnlyTable<K, V>>,
    definition: TableDefinition<'static, K, V>,
) -> Result<&'c ReadOnlyTable<K, V>, Error> {
    if let Some(table) = cell.get() {
        return Ok(table);
    }
    let table = txn.open_table(definition).map_err(redb_error)?;
    Ok(cell.get_or_init(|| table))
}

fn read_mem(m: &RwLock<Memtable>) -> std::sync::RwLockReadGuard<'_, Memtable> {
    m.read().expect("memtable lock poisoned")
}

impl View {
    /// Opens a view on the index in use. `mems` must be taken before the redb transaction
    /// begins (see the module documentation of `memtable`). A handle that a failed flush left
    /// refusing every call is replaced, once.
    pub fn open(
        index: &IndexDb,
        mems: Vec<Arc<RwLock<Memtable>>>,
        end: u64,
    ) -> Result<Self, Error> {
        let db = index.get();
        match Self::open_on(Arc::clone(&db), mems.clone(), end) {
            Err(redb::Error::PreviousIo) => {
                let fresh = index.replace(&db)?;
                Self::open_on(fresh, mems, end).map_err(redb_error)
            }
            opened => opened.map_err(redb_error),
        }
    }

    /// Opens a view on one redb handle.
    pub fn open_on(
        db: Arc<Database>,
        mems: Vec<Arc<RwLock<Memtable>>>,
        end: u64,
    ) -> Result<Self, redb::Error> {
        let txn = db.begin_read()?;
        let meta = txn.open_table(index::META)?;
        let redb_through = meta.get(index::INDEXED_THROUGH)?.map_or(0, |v| v.value());
        drop(meta);
        Ok(Self {
            end,
            redb_through,
            mems,
            txn,
            _db: db,
            streams: OnceCell::new(),
            stream_events: OnceCell::new(),
            categories: OnceCell::new(),
            tags: OnceCell::new(),
            types: OnceCell::new(),
            ids: OnceCell::new(),
            sparse: OnceCell::new(),
        })
    }

    fn visible(&self, position: u64) -> bool {
        position >= self.redb_through && position < self.end
    }

    /// The last `(revision, position)` of a stream.
    pub fn stream_last(&self, stream: &str) -> Result<Option<(u64, u64)>, Error> {
        Ok(self
            .stream_end(stream)?
            .map(|(revision, position, _)| (revision, position)))
    }

    /// The last `(revision, position)` of a stream, and whether redb (rather than a memtable)
    /// answered: what redb says is read from a file that may be damaged, so the writer checks
    /// it against the log before deciding an append.
    pub fn stream_end(&self, stream: &str) -> Result<Option<(u64, u64, bool)>, Error> {
        for m in self.mems.iter().rev() {
            let m = read_mem(m);
            if let Some(list) = m.streams.get(stream)
                && let Some(e) = list.iter().rev().find(|e| self.visible(e.1))
            {
                return Ok(Some((e.0, e.1, false)));
            }
        }
        let streams = table(&self.txn, &self.streams, index::STREAMS)?;
        let v = streams.get(stream).map_err(redb_error)?;
        Ok(v.map(|v| {
            let (revision, position) = v.value();
            (revision, position, true)
        }))
    }

    /// The address redb holds for one revision of a stream.
    pub fn indexed_address(&self, stream: &str, revision: u64) -> Result<Option<Address>, Error> {
        let table = table(&self.txn, &self.stream_events, index::STREAM_EVENTS)?;
        let v = table.get((stream, revision)).map_err(redb_error)?;
        Ok(v.map(|v| Address(v.value())))
    }

    /// Where the event with this id is.
    pub fn id(&self, id: &[u8; 16]) -> Result<Option<(u64, Address)>, Error> {
        for m in self.mems.iter().rev() {
            if let Some(&(p, a)) = read_mem(m).ids.get(id)
                && self.visible(p)
            {
                return Ok(Some((p, a)));
            }
        }
        let ids = table(&self.txn, &self.ids, index::IDS)?;
        let v = ids.get(id).map_err(redb_error)?;
        Ok(v.map(|v| {
            let (p, a) = v.value();
            (p, Address(a))
        }))
    }

    /// Up to `limit` `(revision, address)` of a stream from revision `from` (inclusive), in
    /// the given direction.
    pub fn stream_events(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(u64, Address)>, Error> {
        let mut recent: Vec<(u64, Address)> = Vec::new();
        for m in &self.mems {
            if let Some(list) = read_mem(m).streams.get(stream) {
                recent.extend(
                    list.iter()
                        .filter(|e| self.visible(e.1))
                        .map(|e| (e.0, e.2)),
                );
            }
        }
        let mut out = Vec::new();
        match direction {
            Direction::Forward => {
                let from = from.unwrap_or(0);
                let range = table(&self.txn, &self.stream_events, index::STREAM_EVENTS)?
                    .range((stream, from)..=(stream, u64::MAX))
                    .map_err(redb_error)?;
                for entry in range {
                    if out.len() >= limit {
                        return Ok(out);
                    }
                    let (k, v) = entry.map_err(redb_error)?;
                    out.push((k.value().1, Address(v.value())));
                }
                out.extend(recent.into_iter().filter(|e| e.0 >= from));
            }
            Direction::Backward => {
                let from = from.unwrap_or(u64::MAX);
                out.extend(recent.into_iter().rev().filter(|e| e.0 <= from));
                let range = table(&self.txn, &self.stream_events, index::STREAM_EVENTS)?
                    .range((stream, 0)..=(stream, from))
                    .map_err(redb_error)?;
                for entry in range.rev() {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, v) = entry.map_err(redb_error)?;
                    out.push((k.value().1, Address(v.value())));
                }
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// `(position, address)` entries of one index key from position `from`, in order: redb's
    /// lazily, then the memtables'.
    pub fn postings<'a>(
        &'a self,
        kind: Kind,
        name: &'a str,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, Address), Error>> + 'a, Error> {
        let table = match kind {
            Kind::Category => table(&self.txn, &self.categories, index::CATEGORIES)?,
            Kind::Tag => table(&self.txn, &self.tags, index::TAGS)?,
            Kind::Type => table(&self.txn, &self.types, index::TYPES)?,
        };
        let stored_end = self.redb_through.min(self.end);
        let stored = table
            .range((name, from)..(name, stored_end.max(from)))
            .map_err(redb_error)?
            .map(|entry| {
                let (k, v) = entry.map_err(redb_error)?;
                Ok((k.value().1, Address(v.value())))
            });
        let mut recent: Postings = Vec::new();
        for m in &self.mems {
            let m = read_mem(m);
            let map = match kind {
                Kind::Category => &m.categories,
                Kind::Tag => &m.tags,
                Kind::Type => &m.types,
            };
            if let Some(list) = map.get(name) {
                let start = list.partition_point(|e| e.0 < from);
                recent.extend(list[start..].iter().filter(|e| self.visible(e.0)));
            }
        }
        Ok(stored.chain(recent.into_iter().map(Ok)))
    }

    /// The greatest sparse entry at or before `position`: where a scan of the global log starts.
    pub fn scan_start(&self, position: u64) -> Result<Option<(u64, Address)>, Error> {
        let sparse = table(&self.txn, &self.sparse, index::SPARSE)?;
        let mut best = index::scan_start(sparse, position).map_err(redb_error)?;
        for m in &self.mems {
            let m = read_mem(m);
            let i = m.sparse.partition_point(|e| e.0 <= position);
            if i > 0 {
                let candidate = m.sparse[i - 1];
                if best.is_none_or(|b| b.0 < candidate.0) {
                    best = Some(candidate);
                }
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexEntry;
    use skald_core::Tag;

    /// A memtable that the flusher has written to redb but not yet dropped is seen in both
    /// places; the view must answer with each entry once.
    #[test]
    fn a_flushed_memtable_still_listed_is_not_read_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(redb::Database::create(dir.path().join("i.redb")).unwrap());
        let tag = [Tag::new("t").unwrap()];
        let mut flushed = Memtable::new(0);
        for p in 0..3u64 {
            flushed.insert(&IndexEntry {
                stream: "s-1",
                category: "s",
                event_type: "T",
                tags: &tag,
                id: &[p as u8; 16],
                revision: p,
                position: p,
                address: Address(100 + p),
                first_in_segment: p == 0,
            });
        }
        flushed.commit_to(&db, true).unwrap();
        let mut active = Memtable::new(3);
        active.insert(&IndexEntry {
            stream: "s-1",
            category: "s",
            event_type: "T",
            tags: &tag,
            id: &[9; 16],
            revision: 3,
            position: 3,
            address: Address(103),
            first_in_segment: false,
        });
        let mems = vec![
            Arc::new(RwLock::new(flushed)),
            Arc::new(RwLock::new(active)),
        ];
        let view = View::open_on(Arc::clone(&db), mems, 4).unwrap();

        for kind in [Kind::Category, Kind::Tag, Kind::Type] {
            let name = match kind {
                Kind::Category => "s",
                Kind::Tag => "t",
                Kind::Type => "T",
            };
            let got: Vec<u64> = view
                .postings(kind, name, 0)
                .unwrap()
                .map(|e| e.unwrap().0)
                .collect();
            assert_eq!(got, vec![0, 1, 2, 3]);
        }
        let forward: Vec<u64> = view
            .stream_events("s-1", None, Direction::Forward, 100)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(forward, vec![0, 1, 2, 3]);
        let backward: Vec<u64> = view
            .stream_events("s-1", Some(2), Direction::Backward, 100)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(backward, vec![2, 1, 0]);
        assert_eq!(view.stream_last("s-1").unwrap(), Some((3, 3)));
        assert_eq!(view.id(&[1; 16]).unwrap().map(|e| e.0), Some(1));
        assert_eq!(view.scan_start(2).unwrap(), Some((0, Address(100))));

        // A view whose end is before the active memtable's event does not see it.
        let early = View::open_on(db, view.mems.clone(), 3).unwrap();
        assert_eq!(early.stream_last("s-1").unwrap(), Some((2, 2)));
    }
}
