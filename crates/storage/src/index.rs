//! The derived indexes, kept in redb. Everything here can be rebuilt from the segments.

use redb::{ReadableTable, TableDefinition};

use crate::segments::Address;

/// `"indexed_through"`: the next position to index (everything before it is indexed).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Stream name to (last revision, last position).
pub const STREAMS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("streams");
/// (stream, revision) to address.
pub const STREAM_EVENTS: TableDefinition<(&str, u64), u64> = TableDefinition::new("stream_events");
/// (category, position) to address.
pub const CATEGORIES: TableDefinition<(&str, u64), u64> = TableDefinition::new("categories");
/// (tag, position) to address.
pub const TAGS: TableDefinition<(&str, u64), u64> = TableDefinition::new("tags");
/// (event type, position) to address.
pub const TYPES: TableDefinition<(&str, u64), u64> = TableDefinition::new("types");
/// Event id to (position, address).
pub const IDS: TableDefinition<&[u8; 16], (u64, u64)> = TableDefinition::new("ids");
/// Every [`SPARSE_EVERY`]th position, and each segment's first, to its address.
pub const SPARSE: TableDefinition<u64, u64> = TableDefinition::new("sparse");

/// How often a position is entered into [`SPARSE`]; a global read scans at most this many
/// records to find its start.
pub const SPARSE_EVERY: u64 = 1024;
/// The key of the indexed-through mark in [`META`].
pub const INDEXED_THROUGH: &str = "indexed_through";

/// Every table, open in one write transaction.
pub struct Tables<'t> {
    pub meta: redb::Table<'t, &'static str, u64>,
    pub streams: redb::Table<'t, &'static str, (u64, u64)>,
    pub stream_events: redb::Table<'t, (&'static str, u64), u64>,
    pub categories: redb::Table<'t, (&'static str, u64), u64>,
    pub tags: redb::Table<'t, (&'static str, u64), u64>,
    pub types: redb::Table<'t, (&'static str, u64), u64>,
    pub ids: redb::Table<'t, &'static [u8; 16], (u64, u64)>,
    pub sparse: redb::Table<'t, u64, u64>,
}

impl<'t> Tables<'t> {
    /// Opens (creating when missing) every table in `txn`.
    pub fn open(txn: &'t redb::WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            meta: txn.open_table(META)?,
            streams: txn.open_table(STREAMS)?,
            stream_events: txn.open_table(STREAM_EVENTS)?,
            categories: txn.open_table(CATEGORIES)?,
            tags: txn.open_table(TAGS)?,
            types: txn.open_table(TYPES)?,
            ids: txn.open_table(IDS)?,
            sparse: txn.open_table(SPARSE)?,
        })
    }

    /// Records that every position before `next` is indexed.
    pub fn set_indexed_through(&mut self, next: u64) -> Result<(), redb::Error> {
        self.meta.insert(INDEXED_THROUGH, next)?;
        Ok(())
    }
}

/// What the indexes need to know about one event.
pub struct IndexEntry<'a> {
    pub stream: &'a str,
    pub category: &'a str,
    pub event_type: &'a str,
    pub tags: &'a [skald_core::Tag],
    pub id: &'a [u8; 16],
    pub revision: u64,
    pub position: u64,
    pub address: Address,
    pub first_in_segment: bool,
}

/// The address to start a scan of the global log that should reach `position`: the greatest
/// sparse entry at or before it.
pub fn scan_start(
    sparse: &impl ReadableTable<u64, u64>,
    position: u64,
) -> Result<Option<(u64, Address)>, redb::Error> {
    let mut range = sparse.range(..=position)?;
    Ok(match range.next_back() {
        Some(entry) => {
            let (k, v) = entry?;
            Some((k.value(), Address(v.value())))
        }
        None => None,
    })
}
