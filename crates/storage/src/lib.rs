//! The embedded storage engine: append-only segment files with CRC-framed records, indexes in
//! redb, one writer thread with group commit. The format is specified in `docs/storage.md`.
//!
//! Build a [`Store`] from [`Options`] with [`Store::open`]; it implements
//! [`skald_core::EventStore`] and is cheap to clone. Call [`Store::shutdown`] to stop.

mod codec;
mod index;
pub mod io;
mod memtable;
mod metrics;
mod read;
mod recovery;
mod segments;
pub mod sim;
mod view;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skald_core::{
    AppendRequest, AppendResult, Clock, Direction, Durability, Error, EventStore, Limits,
    MAX_READ_PAGE, Position, ReadPage, ReadRequest, ReadSource, Revision, StoreInfo, StreamHead,
    StreamName,
};
use tokio::sync::{mpsc, oneshot};

use crate::index::IndexDb;
use crate::io::{Fs, RealFs};
use crate::segments::{RecordReader, Segments};
use crate::view::View;
use crate::writer::{Command, Writer, WriterConfig};

/// How the embedded store is built. Every field has a default.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the segments and the index live.
    pub data_dir: PathBuf,
    /// Whether an append waits for fdatasync. `Fsync` unless chosen otherwise.
    pub durability: Durability,
    /// Limits on appends.
    pub limits: Limits,
    /// A segment is closed and a new one started once it passes this size.
    pub segment_bytes: u64,
    /// Appends waiting for the writer; a full queue makes callers wait (back-pressure).
    pub write_queue_capacity: usize,
    /// Most events written in one group commit.
    pub max_batch_events: usize,
    /// Longest time between durable index checkpoints while appends happen; bounds the work
    /// of the next open after a crash.
    pub checkpoint_interval: Duration,
    /// Events indexed in memory before they are written to redb in one batch.
    pub memtable_events: u64,
    /// Whether opening reads the whole index to verify every page's checksum (rebuilding it on
    /// any damage). On by default; it costs about a second per 500 MB of index read from a cold
    /// cache (docs/benchmarks.md). Off, damage is still caught where it would matter: the writer
    /// checks the index against the log before deciding an append, and reads check each record
    /// against the index entry that led to it.
    pub verify_index_on_open: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("skald-data"),
            durability: Durability::Fsync,
            limits: Limits::default(),
            segment_bytes: 256 << 20,
            write_queue_capacity: 4096,
            max_batch_events: 8192,
            checkpoint_interval: Duration::from_secs(1),
            memtable_events: memtable::MEMTABLE_EVENTS,
            verify_index_on_open: true,
        }
    }
}

/// Reads the system clock (defined in `skald-core`, which every backend shares).
pub use skald_core::SystemClock;

/// State shared by the writer and readers.
pub(crate) struct Shared {
    pub dir: PathBuf,
    /// Every file operation goes through it.
    pub fs: Arc<dyn Fs>,
    pub durability: Durability,
    pub index: IndexDb,
    pub segments: Segments,
    /// The next position: every event before it is durable, indexed and visible.
    pub head: AtomicU64,
    /// The same head, for tasks that wait for it to move (live subscriptions). Sent after
    /// `head` is stored, so a woken waiter always reads what it was woken for.
    pub head_watch: tokio::sync::watch::Sender<u64>,
    /// Index entries not yet in redb.
    pub mem: memtable::Memtables,
    /// Why appends are refused, once the writer stopped trusting the files or the store is
    /// shutting down.
    pub unavailable: Mutex<Option<String>>,
    /// Set when the files can no longer be trusted (a failed `fdatasync` of a segment, by the
    /// writer or the flusher; a damaged index): appends are refused until a restart, reads go
    /// on.
    pub poisoned: Mutex<Option<String>>,
    pub metrics: metrics::StorageMetrics,
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

impl Shared {
    /// Refuses appends until a restart, and says why to readiness checks.
    pub(crate) fn poison(&self, reason: String) {
        *self.unavailable.lock().expect("unavailable lock") =
            Some(format!("appends are refused until a restart: {reason}"));
        self.poisoned
            .lock()
            .expect("poison lock")
            .get_or_insert(reason);
    }

    /// The index disagrees with the log: leaves `index.rebuild` so that the next open rebuilds
    /// it from the segments, and says so to readiness checks.
    pub(crate) fn index_is_damaged(&self, reason: &str) {
        let marker = self.dir.join(index::REBUILD_MARKER);
        let written = self
            .fs
            .open(&marker, io::Open::CreateOrOpen)
            .and_then(|f| f.sync_all())
            .and_then(|()| self.fs.sync_dir(&self.dir));
        let mut unavailable = self.unavailable.lock().expect("unavailable lock");
        match written {
            Ok(()) => {
                unavailable.get_or_insert_with(|| {
                    format!("the index is damaged ({reason}); restart to rebuild it")
                });
            }
            Err(e) => {
                *unavailable = Some(format!(
                    "the index is damaged ({reason}) and {} could not be written ({e}): delete \
                     {} and restart",
                    marker.display(),
                    self.dir.join(index::INDEX_FILE).display()
                ));
            }
        }
    }
}

/// The embedded store. Cheap to clone; every clone talks to the same writer.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    limits: Arc<Limits>,
    durability: Durability,
}

/// What opening a store repaired, for the operator to read.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// One line per repair (a torn tail cut, an index rebuilt or caught up).
    pub notes: Vec<String>,
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> Error {
    let message = format!("{}: {e}", path.display());
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::StorageFull(message)
    } else {
        Error::Io(message)
    }
}

/// What a call on an index handle that an earlier I/O error spoiled answers (redb refuses every
/// call on it from then on). The handle is replaced; the call can be made again.
const SPOILED_INDEX: &str = "index: the index handle refused the call after an earlier I/O error";

/// Whether `e` is the answer of a spoiled index handle, so that the operation may be run once
/// more on a fresh one.
pub(crate) fn spoiled_index(e: &Error) -> bool {
    matches!(e, Error::Io(message) if message == SPOILED_INDEX)
}

pub(crate) fn redb_error(e: impl Into<redb::Error>) -> Error {
    let e = e.into();
    if matches!(e, redb::Error::PreviousIo) {
        return Error::Io(SPOILED_INDEX.to_owned());
    }
    let full = match &e {
        redb::Error::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    };
    if full {
        Error::StorageFull(format!("index: {e}"))
    } else {
        Error::Io(format!("index: {e}"))
    }
}

fn lock_data_dir(fs: &dyn Fs, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>, Error> {
    let path = dir.join("LOCK");
    fs.lock(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            Error::Unavailable(format!(
                "data directory {} is in use by another Skald process",
                dir.display()
            ))
        } else {
            io_error(&path, e)
        }
    })
}

impl Store {
    /// Opens (or creates) the store in `options.data_dir`, recovering from any crash, and
    /// starts the writer with the system clock.
    pub fn open(options: Options) -> Result<(Self, OpenReport), Error> {
        Self::open_with_clock(options, Arc::new(SystemClock))
    }

    /// [`Store::open`] with an injected clock.
    pub fn open_with_clock(
        options: Options,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, OpenReport), Error> {
        Self::open_with(options, clock, Arc::new(RealFs))
    }

    /// [`Store::open`] with an injected clock and file system (tests pass a
    /// [`sim::SimFs`]).
    pub fn open_with(
        options: Options,
        clock: Arc<dyn Clock>,
        fs: Arc<dyn Fs>,
    ) -> Result<(Self, OpenReport), Error> {
        options.limits.validate()?;
        if options.write_queue_capacity == 0 || options.max_batch_events == 0 {
            return Err(Error::invalid(
                "write_queue_capacity and max_batch_events must be at least 1",
            ));
        }
        let dir = options.data_dir.clone();
        io::create_dir_all_durably(fs.as_ref(), &dir).map_err(|e| io_error(&dir, e))?;
        let lock = lock_data_dir(fs.as_ref(), &dir)?;
        let recovered = recovery::recover(&fs, &dir, options.verify_index_on_open)?;
        let shared = Arc::new(Shared {
            dir,
            fs,
            durability: options.durability,
            index: recovered.index,
            segments: Segments::new(recovered.segments),
            head: AtomicU64::new(recovered.next_position),
            head_watch: tokio::sync::watch::Sender::new(recovered.next_position),
            mem: memtable::Memtables::new(recovered.next_position),
            unavailable: Mutex::new(None),
            poisoned: Mutex::new(None),
            metrics: metrics::StorageMetrics::new(),
            _lock: lock,
        });
        let flusher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("skald-flusher".to_owned())
                .spawn(move || writer::run_flusher(shared))
                .map_err(|e| Error::Io(format!("starting the index flusher thread: {e}")))?
        };
        let (commands, receiver) = mpsc::channel(options.write_queue_capacity);
        let writer = Writer::new(
            Arc::clone(&shared),
            WriterConfig {
                durability: options.durability,
                segment_bytes: options.segment_bytes,
                max_batch_events: options.max_batch_events,
                checkpoint_interval: options.checkpoint_interval,
                memtable_events: options.memtable_events.max(1),
                clock,
            },
            recovered.next_position,
            flusher,
        );
        let thread = std::thread::Builder::new()
            .name("skald-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|e| Error::Io(format!("starting the writer thread: {e}")))?;
        let store = Self {
            shared,
            commands,
            writer: Arc::new(Mutex::new(Some(thread))),
            limits: Arc::new(options.limits),
            durability: options.durability,
        };
        Ok((
            store,
            OpenReport {
                notes: recovered.notes,
            },
        ))
    }

    /// Finishes the appends already queued, checkpoints the index and stops the writer.
    /// Appends after this fail with [`Error::Unavailable`]; reads keep working.
    pub async fn shutdown(&self) {
        self.shared
            .unavailable
            .lock()
            .expect("unavailable lock")
            .get_or_insert_with(|| "the store is shutting down".to_owned());
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Shutdown { done }).await.is_ok() {
            let _ = wait.await;
        }
        let handle = self
            .writer
            .lock()
            .expect("writer handle lock poisoned")
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    /// Bytes of segments and index on disk.
    fn storage_bytes(&self) -> u64 {
        self.shared.segments.total_bytes() + self.shared.index.file_len()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The next position to be written: the number of events stored.
    pub fn head(&self) -> u64 {
        self.shared.head.load(Ordering::Acquire)
    }

    /// A view of everything visible now: the head first, then the memtables, then redb.
    fn view(shared: &Shared) -> Result<View, Error> {
        let end = shared.head.load(Ordering::Acquire);
        View::open(&shared.index, shared.mem.snapshot(), end)
    }

    /// A stream read that covers at most [`INLINE_READ_RECORDS`] records (loading a small
    /// aggregate, the last event of a stream), answered on the caller's task: the hand-off to
    /// the blocking pool costs more than such a read (docs/benchmarks.md). `None` for any
    /// other read, which goes to the pool; the index is asked for one entry more than the
    /// bound, so the work done here stays bounded whatever the stream's length.
    fn read_short_stream(
        &self,
        view: &View,
        request: &ReadRequest,
    ) -> Result<Option<ReadPage>, Error> {
        let ReadSource::Stream(stream) = &request.source else {
            return Ok(None);
        };
        let limit = request.limit.min(MAX_READ_PAGE);
        let probe = limit.min(INLINE_READ_RECORDS + 1);
        let entries =
            view.stream_events(stream.as_str(), request.from, request.direction, probe)?;
        if entries.len() == probe && probe < limit {
            return Ok(None);
        }
        let mut reader = RecordReader::new(self.shared.segments.snapshot());
        let events = read::decode_stream(&mut reader, stream.as_str(), &entries, view.end)?;
        Ok(Some(ReadPage::of_stream(events, limit, request.direction)))
    }

    /// One attempt at a read. One view serves the probe for a short stream read and, when the
    /// read is longer, the whole read on the pool.
    async fn read_once(&self, request: ReadRequest) -> Result<ReadPage, Error> {
        let view = Self::view(&self.shared)?;
        if let Some(page) = self.read_short_stream(&view, &request)? {
            return Ok(page);
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || Self::read_blocking(&shared, &view, &request))
            .await
            .map_err(|e| Error::Io(format!("read task failed: {e}")))?
    }

    /// A read of any size, through `view`, on the blocking pool.
    fn read_blocking(
        shared: &Shared,
        view: &View,
        request: &ReadRequest,
    ) -> Result<ReadPage, Error> {
        let limit = request.limit.min(MAX_READ_PAGE);
        if request.direction == Direction::Backward
            && !matches!(request.source, ReadSource::Stream(_))
        {
            return Err(Error::invalid("only stream reads can go backward"));
        }
        let mut reader = RecordReader::new(shared.segments.snapshot());
        let from = request.from.unwrap_or(0);
        let events = match &request.source {
            ReadSource::Stream(stream) => {
                let events = read::scan_stream(
                    view,
                    &mut reader,
                    stream.as_str(),
                    request.from,
                    request.direction,
                    limit,
                )?;
                return Ok(ReadPage::of_stream(events, limit, request.direction));
            }
            ReadSource::All(None) => {
                let mut out = Vec::new();
                read::scan_global(view, &mut reader, from, limit, |_| true, &mut out)?;
                out
            }
            ReadSource::All(Some(query)) | ReadSource::Query(query) => {
                query.validate()?;
                read::scan_query(view, &mut reader, query, from, limit)?
            }
            ReadSource::Category(category) => {
                read::scan_category(view, &mut reader, category.as_str(), from, limit)?
            }
        };
        Ok(ReadPage::of_positions(events, limit))
    }
}

/// The most records a stream read answers on the caller's task.
const INLINE_READ_RECORDS: usize = 32;

impl EventStore for Store {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        self.limits.check_append(&request)?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append { request, reply })
            .await
            .map_err(|_| Error::Unavailable("the store is shut down".to_owned()))?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the store stopped before answering".to_owned()))?
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadPage, Error> {
        let page = match self.read_once(request.clone()).await {
            // A failed index flush spoiled the handle during the read: once more, on a fresh one.
            Err(e) if spoiled_index(&e) => self.read_once(request).await,
            other => other,
        };
        let page = page.inspect_err(|e| {
            if let Error::Corruption { reason, .. } = e
                && read::is_index_damage(e)
            {
                self.shared.index_is_damaged(reason);
            }
        })?;
        self.shared.metrics.store.page_read(page.events.len());
        Ok(page)
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamHead>, Error> {
        // A point lookup (memtables, then one B-tree search in pages that are almost always
        // cached) runs on the caller's task: handing it to the blocking pool cost more than
        // the lookup itself (a wake-up on each side; docs/benchmarks.md, "Ceilings").
        let last = match Self::view(&self.shared)?.stream_last(stream.as_str()) {
            Err(e) if spoiled_index(&e) => Self::view(&self.shared)?.stream_last(stream.as_str()),
            other => other,
        };
        Ok(last?.map(|(revision, position)| StreamHead {
            revision: Revision(revision),
            position: Position(position),
        }))
    }

    async fn info(&self) -> Result<StoreInfo, Error> {
        Ok(StoreInfo {
            head_position: self.head().checked_sub(1).map(Position),
            durability: self.durability,
            storage_bytes: self.storage_bytes(),
        })
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn write_metrics(&self, out: &mut skald_core::metrics::Exposition) {
        self.shared.metrics.write(
            out,
            self.head(),
            self.storage_bytes(),
            self.shared.fs.disk_space(&self.shared.dir).map(|d| d.free),
        );
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        if let Some(reason) = self
            .shared
            .unavailable
            .lock()
            .expect("unavailable lock")
            .clone()
        {
            return Err(reason);
        }
        if let Some(e) = &self.shared.mem.state.lock().expect("memtable lock").failed {
            return Err(format!("the index cannot be written: {e}"));
        }
        match self.shared.fs.disk_space(&self.shared.dir) {
            Some(disk) if metrics::disk_low(&disk) => Err(format!(
                "only {} KiB free on the disk of {}; appends fail once it is full",
                disk.free >> 10,
                self.shared.dir.display()
            )),
            _ => Ok(()),
        }
    }

    async fn next_position(&self) -> Result<u64, Error> {
        Ok(self.head())
    }

    async fn wait_for_append(&self, known: u64) -> Result<u64, Error> {
        let mut watch = self.shared.head_watch.subscribe();
        let head = watch
            .wait_for(|head| *head > known)
            .await
            .map_err(|_| Error::Unavailable("the store is shut down".to_owned()))?;
        Ok(*head)
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes `bytes` as recovery does: a frame, its checksum, then its body. Must never
    /// panic, whatever the bytes.
    pub fn decode_record(bytes: &[u8]) {
        let _ = crate::codec::decode_segment_header(bytes);
        if let crate::codec::Frame::Valid { body_len } = crate::codec::check_frame(bytes) {
            let body = &bytes[8..8 + body_len];
            for version in [crate::codec::FORMAT_V1, crate::codec::FORMAT_VERSION] {
                let _ = crate::codec::decode_record(body, version);
            }
        }
        // Bodies without a valid frame too, so that the fuzzer need not forge CRCs.
        for version in [crate::codec::FORMAT_V1, crate::codec::FORMAT_VERSION] {
            let _ = crate::codec::decode_record(bytes, version);
            let _ = crate::codec::body_batch_start(bytes);
        }
    }
}
