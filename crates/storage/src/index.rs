//! The derived indexes, kept in redb. Everything here can be rebuilt from the segments.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableTable, TableDefinition};
use skald_core::Error;

use crate::io::{FileIo, Fs, IndexBackend, Open};
use crate::io_error;
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

/// The index file's name in the data directory.
pub const INDEX_FILE: &str = "index.redb";
/// A file whose presence makes the next open delete the index and rebuild it from the segments:
/// left by the writer when it finds the index disagreeing with the log.
pub const REBUILD_MARKER: &str = "index.rebuild";
/// The redb page cache; bounded so that resident memory stays predictable.
const INDEX_CACHE_BYTES: usize = 64 << 20;

/// The index database, reached through the I/O seam, and able to open itself again: redb
/// refuses every operation on a handle after one I/O error, so the flusher replaces the handle
/// after a failed flush (redb then rolls back to its last durable commit).
pub struct IndexDb {
    fs: Arc<dyn Fs>,
    path: PathBuf,
    current: RwLock<Handle>,
    /// Set by the backend when an `fdatasync` of the file fails.
    sync_failed: Arc<AtomicBool>,
    /// Why the index may not be opened again in this process (a failed `fdatasync`, damage,
    /// a panic in redb): the next start rebuilds it.
    condemned: Mutex<Option<String>>,
}

/// A redb handle and the file under it.
type Handle = (Arc<Database>, Arc<dyn FileIo>);

/// How the index was opened.
pub enum Opened {
    /// The file was there and passed redb's integrity check.
    Existing(IndexDb),
    /// It was missing, or was damaged and has been replaced by an empty one (the reason is
    /// given), to be rebuilt from the segments.
    Empty(IndexDb, Option<String>),
}

impl IndexDb {
    /// Opens `dir/index.redb`, checking every page when `verify` (redb's integrity check), inside
    /// `catch_unwind` (redb may panic on a file damaged outside it). A file that fails is deleted
    /// and an empty one made in its place.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, verify: bool) -> Result<Opened, Error> {
        let path = dir.join(INDEX_FILE);
        let existed = fs.exists(&path).map_err(|e| io_error(&path, e))?;
        let sync_failed = Arc::new(AtomicBool::new(false));
        let damage = if existed {
            match Self::open_file(fs.as_ref(), &path, verify, &sync_failed) {
                Ok(current) => {
                    let index = Self::new(fs, path, current, sync_failed);
                    return Ok(Opened::Existing(index));
                }
                Err(reason) => Some(reason),
            }
        } else {
            None
        };
        if existed {
            fs.remove_file(&path).map_err(|e| io_error(&path, e))?;
        }
        let current = Self::open_file(fs.as_ref(), &path, false, &sync_failed)
            .map_err(|reason| Error::Io(format!("cannot create {}: {reason}", path.display())))?;
        fs.sync_dir(dir).map_err(|e| io_error(dir, e))?;
        let index = Self::new(fs, path, current, sync_failed);
        Ok(Opened::Empty(index, damage))
    }

    fn new(fs: Arc<dyn Fs>, path: PathBuf, current: Handle, sync_failed: Arc<AtomicBool>) -> Self {
        Self {
            fs,
            path,
            current: RwLock::new(current),
            sync_failed,
            condemned: Mutex::new(None),
        }
    }

    /// One redb handle on the file; `Err` says why it cannot be trusted.
    fn open_file(
        fs: &dyn Fs,
        path: &Path,
        check: bool,
        sync_failed: &Arc<AtomicBool>,
    ) -> Result<Handle, String> {
        let file = fs
            .open(path, Open::CreateOrOpen)
            .map_err(|e| e.to_string())?;
        let backend = IndexBackend {
            file: Arc::clone(&file),
            sync_failed: Arc::clone(sync_failed),
        };
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Database::builder()
                .set_cache_size(INDEX_CACHE_BYTES)
                .set_check_integrity_on_open(check)
                .create_with_backend(backend)
        }));
        match opened {
            Ok(Ok(db)) => Ok((Arc::new(db), file)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_panic) => Err("redb panicked while opening it".to_owned()),
        }
    }

    /// The handle in use: views keep the one they opened with.
    pub fn get(&self) -> Arc<Database> {
        Arc::clone(&self.current.read().expect("index lock poisoned").0)
    }

    /// The index file's length in bytes.
    pub fn file_len(&self) -> u64 {
        let file = Arc::clone(&self.current.read().expect("index lock poisoned").1);
        file.len().unwrap_or(0)
    }

    /// Replaces `stale`, a handle that met an I/O error (redb then refuses every later call on
    /// it), with a new one on the same file, at its last durable commit; returns the handle to
    /// use. When someone else replaced it already, that one is returned. Views still holding
    /// the stale handle finish with it; it writes nothing more.
    pub fn replace(&self, stale: &Arc<Database>) -> Result<Arc<Database>, Error> {
        if let Some(reason) = self.condemned() {
            return Err(Error::Unavailable(format!(
                "the index cannot be used until a restart rebuilds it: {reason}"
            )));
        }
        let mut current = self.current.write().expect("index lock poisoned");
        if !Arc::ptr_eq(&current.0, stale) {
            return Ok(Arc::clone(&current.0));
        }
        *current = Self::open_file(self.fs.as_ref(), &self.path, false, &self.sync_failed)
            .map_err(|reason| Error::Io(format!("reopening {}: {reason}", self.path.display())))?;
        Ok(Arc::clone(&current.0))
    }

    /// Whether an `fdatasync` of the index failed since it was opened.
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// Forbids opening the file again in this process (see `condemned`).
    pub fn condemn(&self, reason: &str) {
        self.condemned
            .lock()
            .expect("index lock poisoned")
            .get_or_insert_with(|| reason.to_owned());
    }

    /// Why the index may not be opened again, if it may not.
    pub fn condemned(&self) -> Option<String> {
        self.condemned.lock().expect("index lock poisoned").clone()
    }
}
