//! Opening a data directory: checking segments, making the tail durable, finding the end of the
//! log, cutting a torn tail, and bringing the index up to date. See "Recovery on open" and "The
//! durability contract" in `docs/storage.md`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase};

use crate::codec::{self, FORMAT_VERSION, FRAME_HEADER_LEN, Frame, Record, SEGMENT_HEADER_LEN};
use crate::index::{self, IndexDb, IndexEntry, Opened, REBUILD_MARKER};
use crate::io::{self, FileIo, Fs, Open, read_full_uncached_at, write_all_at};
use crate::memtable::Memtable;
use crate::segments::{Address, RecordReader, Segment, segment_path};
use crate::{Error, io_error, redb_error};

/// Bytes read at a time while scanning the tail.
const SCAN_CHUNK: usize = 4 << 20;
/// Events replayed into the index per (non-durable) index transaction.
const REPLAY_BATCH: usize = 50_000;
/// The suffix of a segment being created; renamed away once its header is durable.
const CREATING: &str = ".tmp";

/// What opening found and did.
pub struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    pub index: IndexDb,
    /// The next position to assign.
    pub next_position: u64,
    /// Human-readable notes on repairs made (a cut tail, a rebuilt index).
    pub notes: Vec<String>,
}

/// Opens (or creates) the segments and the index in `dir` and makes them consistent and
/// durable. Nothing is committed to the index, and nothing served, before every byte the index
/// will point at is synced.
pub fn recover(fs: &Arc<dyn Fs>, dir: &Path, verify_index: bool) -> Result<Recovered, Error> {
    let seg_dir = dir.join("segments");
    io::create_dir_all_durably(fs.as_ref(), &seg_dir).map_err(|e| io_error(&seg_dir, e))?;
    let mut notes = Vec::new();
    remove_unfinished_segments(fs.as_ref(), &seg_dir, &mut notes)?;
    let mut segments = open_segments(fs.as_ref(), &seg_dir, &mut notes)?;
    if segments.is_empty() {
        segments.push(Arc::new(create_segment(fs.as_ref(), &seg_dir, 0, 0)?));
    }
    let marker = dir.join(REBUILD_MARKER);
    let rebuild_asked = fs.exists(&marker).map_err(|e| io_error(&marker, e))?;
    if rebuild_asked {
        let index_path = dir.join(index::INDEX_FILE);
        if fs
            .exists(&index_path)
            .map_err(|e| io_error(&index_path, e))?
        {
            fs.remove_file(&index_path)
                .map_err(|e| io_error(&index_path, e))?;
        }
        notes.push(format!(
            "{} asked for the index to be rebuilt; rebuilding it",
            marker.display()
        ));
    }
    let (mut index, mut indexed) = open_index(fs, dir, verify_index, &mut notes)?;
    let start = match find_address(&index.get(), &segments, indexed)? {
        Some(address) => address,
        None => {
            notes.push(format!(
                "the index claims {indexed} events but the segments hold fewer; rebuilding it"
            ));
            drop(index);
            let path = dir.join(index::INDEX_FILE);
            fs.remove_file(&path).map_err(|e| io_error(&path, e))?;
            (index, indexed) = open_index(fs, dir, verify_index, &mut notes)?;
            Address::new(0, SEGMENT_HEADER_LEN)
        }
    };
    // D1 of issue 23: the tail may be in the page cache only (a crash between write and
    // fdatasync). Sync it before anything is indexed or served, then read it from the disk.
    for segment in &segments[start.ordinal() as usize..] {
        segment
            .file
            .sync_data()
            .map_err(|e| io_error(&segment.path, e))?;
    }
    fs.sync_dir(&seg_dir).map_err(|e| io_error(&seg_dir, e))?;
    let db = index.get();
    let next_position = Replay::new(&db, &segments, indexed, &mut notes).run(start)?;
    if rebuild_asked {
        fs.remove_file(&marker).map_err(|e| io_error(&marker, e))?;
        fs.sync_dir(dir).map_err(|e| io_error(dir, e))?;
    }
    for s in &segments {
        let len = s.file.len().map_err(|e| io_error(&s.path, e))?;
        s.committed_len.store(len, Ordering::Release);
    }
    let last = Arc::clone(segments.last().expect("a store always has a segment"));
    if last.version < FORMAT_VERSION {
        // The writer writes only the current format; a file never mixes two.
        let next = create_segment(fs.as_ref(), &seg_dir, last.ordinal + 1, next_position)?;
        notes.push(format!(
            "started {} in format {FORMAT_VERSION} after {} (format {})",
            next.path.display(),
            last.path.display(),
            last.version
        ));
        segments.push(Arc::new(next));
    }
    Ok(Recovered {
        segments,
        index,
        next_position,
        notes,
    })
}

/// Opens the index, returning it with its `indexed_through`.
fn open_index(
    fs: &Arc<dyn Fs>,
    dir: &Path,
    verify: bool,
    notes: &mut Vec<String>,
) -> Result<(IndexDb, u64), Error> {
    let index = match IndexDb::open(Arc::clone(fs), dir, verify)? {
        Opened::Existing(index) => index,
        Opened::Empty(index, damage) => {
            if let Some(reason) = damage {
                // The index is derived data: a damaged one is rebuilt, never trusted.
                notes.push(format!(
                    "the index could not be opened ({reason}); rebuilding it"
                ));
            }
            index
        }
    };
    let indexed = indexed_through(&index.get())?;
    Ok((index, indexed))
}

fn indexed_through(db: &Database) -> Result<u64, Error> {
    let txn = db.begin_read().map_err(redb_error)?;
    let meta = match txn.open_table(index::META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(redb_error(e)),
    };
    Ok(meta
        .get(index::INDEXED_THROUGH)
        .map_err(redb_error)?
        .map_or(0, |v| v.value()))
}

/// The address where position `target` is (or would be written, when it is the end of the
/// log), past the batch end that closes the batch before it; `None` when the log ends before
/// `target` or the index does not agree with it.
fn find_address(
    db: &Database,
    segments: &[Arc<Segment>],
    target: u64,
) -> Result<Option<Address>, Error> {
    if target == 0 {
        return Ok(Some(Address::new(0, SEGMENT_HEADER_LEN)));
    }
    let txn = db.begin_read().map_err(redb_error)?;
    let sparse = txn.open_table(index::SPARSE).map_err(redb_error)?;
    let Some((mut pos, mut addr)) = index::scan_start(&sparse, target).map_err(redb_error)? else {
        return Ok(None);
    };
    for s in segments {
        let len = s.file.len().map_err(|e| io_error(&s.path, e))?;
        s.committed_len.store(len, Ordering::Release);
    }
    let mut reader = RecordReader::new(segments.to_vec());
    loop {
        let Some(seg) = segments.get(addr.ordinal() as usize) else {
            return Ok(None);
        };
        if addr.offset() >= seg.committed_len.load(Ordering::Acquire) {
            return Ok((pos == target).then_some(addr));
        }
        let body = match reader.body_at(addr) {
            Ok(body) => body,
            // At the index's end: the unindexed tail, which the scan judges (it may be torn).
            Err(_) if pos == target => return Ok(Some(addr)),
            // Below the indexed mark, in events that were acknowledged: corruption, reported
            // as such, not a torn tail.
            Err(e) => return Err(e),
        };
        let body_len = body.len();
        match codec::body_position(body) {
            // A batch end: no position; the one closing the last indexed batch is stepped over.
            None => {}
            Some(_) if pos == target => return Ok(Some(addr)),
            Some(found) if found != pos => return Ok(None),
            Some(_) => pos += 1,
        }
        addr = reader.next_address(addr, body_len);
    }
}

/// Removes segments whose creation a crash interrupted (`NNN.seg.tmp`): nothing was ever
/// written to them.
fn remove_unfinished_segments(
    fs: &dyn Fs,
    seg_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<(), Error> {
    let names = fs.list_dir(seg_dir).map_err(|e| io_error(seg_dir, e))?;
    let mut removed = false;
    for name in names.iter().filter(|n| n.ends_with(CREATING)) {
        let path = seg_dir.join(name);
        fs.remove_file(&path).map_err(|e| io_error(&path, e))?;
        notes.push(format!(
            "removed {} (cut off while it was created)",
            path.display()
        ));
        removed = true;
    }
    if removed {
        fs.sync_dir(seg_dir).map_err(|e| io_error(seg_dir, e))?;
    }
    Ok(())
}

fn open_segments(
    fs: &dyn Fs,
    seg_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<Arc<Segment>>, Error> {
    let mut ordinals: Vec<u32> = fs
        .list_dir(seg_dir)
        .map_err(|e| io_error(seg_dir, e))?
        .iter()
        .filter_map(|name| name.strip_suffix(".seg")?.parse().ok())
        .collect();
    ordinals.sort_unstable();
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    for (i, &ordinal) in ordinals.iter().enumerate() {
        let path = segment_path(seg_dir, ordinal);
        if ordinal as usize != i {
            return Err(corruption(
                &path,
                0,
                format!("segment {i} is missing; segments must be numbered from 0 without gaps"),
            ));
        }
        let file = fs
            .open(&path, Open::ReadWrite)
            .map_err(|e| io_error(&path, e))?;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        let n = io::read_full_at(file.as_ref(), &mut header, 0).map_err(|e| io_error(&path, e))?;
        let is_last = i + 1 == ordinals.len();
        let (first_position, version) = match codec::decode_segment_header(&header[..n]) {
            Ok(decoded) => decoded,
            // A segment is created under another name and renamed once its header is synced;
            // one made before that rule, cut off while created, holds a header (or less) of
            // zeros and no records, and is removed.
            Err(_)
                if is_last
                    && i > 0
                    && file.len().map_err(|e| io_error(&path, e))? <= SEGMENT_HEADER_LEN =>
            {
                notes.push(format!(
                    "removed {} (cut off while it was created)",
                    path.display()
                ));
                fs.remove_file(&path).map_err(|e| io_error(&path, e))?;
                fs.sync_dir(seg_dir).map_err(|e| io_error(seg_dir, e))?;
                break;
            }
            Err(reason) => return Err(corruption(&path, 0, reason)),
        };
        let ordered = segments
            .last()
            .is_none_or(|p| p.first_position <= first_position);
        if (i == 0 && first_position != 0) || !ordered {
            return Err(corruption(
                &path,
                16,
                format!("segment starts at position {first_position}, out of order"),
            ));
        }
        segments.push(Arc::new(Segment {
            ordinal,
            first_position,
            version,
            path,
            file,
            committed_len: AtomicU64::new(0),
            sync_failure: std::sync::Mutex::new(None),
        }));
    }
    Ok(segments)
}

/// Creates a new, empty segment of the current format and makes its existence durable: written
/// under a temporary name, synced, renamed, and the directory synced. On failure (a full disk)
/// nothing is left behind.
pub fn create_segment(
    fs: &dyn Fs,
    seg_dir: &Path,
    ordinal: u32,
    first_position: u64,
) -> Result<Segment, Error> {
    let path = segment_path(seg_dir, ordinal);
    let mut creating = path.clone().into_os_string();
    creating.push(CREATING);
    let creating = std::path::PathBuf::from(creating);
    let made = (|| {
        let file = fs.open(&creating, Open::CreateNew)?;
        write_all_at(
            file.as_ref(),
            &codec::encode_segment_header(first_position),
            0,
        )?;
        file.sync_all()?;
        fs.rename(&creating, &path)?;
        fs.sync_dir(seg_dir)?;
        // Reopened under its own name, so that its path in messages is the segment's.
        fs.open(&path, Open::ReadWrite)
    })();
    match made {
        Ok(file) => Ok(Segment {
            ordinal,
            first_position,
            version: FORMAT_VERSION,
            path,
            file,
            committed_len: AtomicU64::new(SEGMENT_HEADER_LEN),
            sync_failure: std::sync::Mutex::new(None),
        }),
        Err(e) => {
            // Best effort: the next open removes a leftover `.tmp` anyway.
            let _ = fs.remove_file(&creating);
            let _ = fs.sync_dir(seg_dir);
            Err(io_error(&path, e))
        }
    }
}

fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corruption {
        file: path.display().to_string(),
        offset,
        reason: reason.into(),
    }
}

/// One event read during the tail scan.
struct Pending {
    event: skald_core::RecordedEvent,
    address: Address,
}

/// The scan of the log from the index's end: indexing every whole batch (version 2) or append
/// (version 1), cutting a torn tail, and failing on damage anywhere else.
struct Replay<'a> {
    db: &'a Database,
    segments: &'a [Arc<Segment>],
    /// The next position expected.
    position: u64,
    /// Events read but not yet known to be kept: their batch (append, in version 1) is not
    /// known to be complete.
    uncommitted: Vec<Pending>,
    /// Whether the last event read carries its append's commit mark.
    last_commit: bool,
    /// Events known to be kept, waiting for an index transaction.
    batch: Vec<Pending>,
    /// The last revision of each stream read since the last index transaction; older ones are
    /// in the index.
    revisions: HashMap<String, u64>,
    replayed: u64,
    notes: &'a mut Vec<String>,
}

/// Where the scan of one segment is.
struct SegmentScan {
    /// The next record's offset.
    offset: u64,
    /// Where the group commit in progress started, and its first position (version 2); `None`
    /// between batches.
    open_batch: Option<(u64, u64)>,
    /// The end of the last complete batch (version 2) or append (version 1): where a torn tail
    /// is cut.
    safe_end: u64,
    /// Where the scan of this segment began when it resumed from the index's end (rather than
    /// a segment's start): the batch end of the last indexed batch may be found there.
    resumed_at: Option<u64>,
}

/// A checked frame read during the scan.
enum Step {
    Record { body: Vec<u8>, len: u64 },
    End,
    Damage(&'static str),
}

impl<'a> Replay<'a> {
    fn new(
        db: &'a Database,
        segments: &'a [Arc<Segment>],
        indexed: u64,
        notes: &'a mut Vec<String>,
    ) -> Self {
        Self {
            db,
            segments,
            position: indexed,
            uncommitted: Vec::new(),
            last_commit: true,
            batch: Vec::new(),
            revisions: HashMap::new(),
            replayed: 0,
            notes,
        }
    }

    /// Scans from `start` to the end of the log; returns the end position.
    fn run(mut self, start: Address) -> Result<u64, Error> {
        for seg in &self.segments[start.ordinal() as usize..] {
            let offset = if seg.ordinal == start.ordinal() {
                start.offset()
            } else {
                SEGMENT_HEADER_LEN
            };
            if offset == SEGMENT_HEADER_LEN && seg.first_position != self.position {
                return Err(corruption(
                    &seg.path,
                    16,
                    format!(
                        "segment starts at position {}, but the previous one ends at {}",
                        seg.first_position, self.position
                    ),
                ));
            }
            self.scan_segment(seg, offset)?;
        }
        self.replayed += self.batch.len() as u64;
        self.index_batch(true)?;
        if self.replayed > 0 {
            self.notes.push(format!(
                "indexed {} events found after the last index checkpoint",
                self.replayed
            ));
        }
        Ok(self.position)
    }

    fn scan_segment(&mut self, seg: &Segment, offset: u64) -> Result<(), Error> {
        let is_last = seg.ordinal as usize + 1 == self.segments.len();
        let v2 = seg.version >= FORMAT_VERSION;
        let file_len = seg.file.len().map_err(|e| io_error(&seg.path, e))?;
        let mut reader = TailReader::new(seg.file.as_ref(), file_len);
        let mut at = SegmentScan {
            offset,
            open_batch: None,
            safe_end: offset,
            resumed_at: (offset > SEGMENT_HEADER_LEN).then_some(offset),
        };
        let damage = loop {
            match reader.next(at.offset).map_err(|e| io_error(&seg.path, e))? {
                Step::End => break None,
                Step::Damage(reason) => break Some(reason),
                Step::Record { body, len } => {
                    let record = codec::decode_record(&body, seg.version)
                        .map_err(|reason| corruption(&seg.path, at.offset, reason))?;
                    self.take(seg, &mut at, record, len)?;
                    at.offset += len;
                }
            }
        };
        let unfinished = if v2 {
            at.open_batch.is_some()
        } else {
            !self.uncommitted.is_empty()
        };
        match damage {
            None if !unfinished => Ok(()),
            // A later segment proves this one's last batch was synced whole.
            None if !is_last && v2 => self.commit_batch(seg),
            None if !is_last => Err(corruption(
                &seg.path,
                at.offset,
                "an append without its commit mark ends a segment that is not the last",
            )),
            None if v2 => self.cut(seg, &at, "a group commit without its end"),
            None => self.cut(seg, &at, "an append without its commit mark"),
            Some(reason) => {
                if !is_last || self.damage_is_inside_synced_data(seg, at.offset, file_len)? {
                    Err(corruption(&seg.path, at.offset, reason))
                } else {
                    self.cut(seg, &at, reason)
                }
            }
        }
    }

    /// Whether anything valid written after `bad` proves the damaged data was synced: in
    /// version 2, a record of a later batch written after the earlier ones were synced (not
    /// one written with durability `none`); in version 1, any record of a later position.
    fn damage_is_inside_synced_data(
        &self,
        seg: &Segment,
        bad: u64,
        file_len: u64,
    ) -> Result<bool, Error> {
        let v2 = seg.version >= FORMAT_VERSION;
        let position = self.position;
        // Judged on a candidate's first bytes, before its checksum is computed.
        let candidate = |frame_start: u64, body: &[u8]| {
            if v2 {
                codec::body_batch_start(body)
                    .is_some_and(|start| bad < start && start <= frame_start)
                    && !codec::body_unsynced(body)
            } else {
                codec::body_position(body)
                    .is_some_and(|p| (position..position + (1 << 32)).contains(&p))
            }
        };
        valid_record_after(seg, bad, file_len, candidate)
    }

    /// Cuts the segment back to the end of the last whole batch (append, in version 1) and
    /// syncs the cut before anything is indexed.
    fn cut(&mut self, seg: &Segment, at: &SegmentScan, reason: &str) -> Result<(), Error> {
        let file_len = seg.file.len().map_err(|e| io_error(&seg.path, e))?;
        let dropped = self.uncommitted.len();
        self.position -= dropped as u64;
        self.uncommitted.clear();
        self.last_commit = true;
        self.notes.push(format!(
            "cut a torn tail of {} bytes from {} at offset {} ({reason} at offset {}; {dropped} \
             unacknowledged events dropped)",
            file_len - at.safe_end,
            seg.path.display(),
            at.safe_end,
            at.offset,
        ));
        seg.file
            .set_len(at.safe_end)
            .and_then(|()| seg.file.sync_data())
            .map_err(|e| io_error(&seg.path, e))
    }

    /// Takes one record into the scan, checking it against what came before.
    fn take(
        &mut self,
        seg: &Segment,
        at: &mut SegmentScan,
        record: Record,
        len: u64,
    ) -> Result<(), Error> {
        let here = at.offset;
        match record {
            Record::BatchEnd(end)
                if at.open_batch.is_none()
                    && at.resumed_at == Some(here)
                    && end.end_position == self.position =>
            {
                // The end of the last indexed batch, which the step to the index's end could
                // not read through the page cache: it closes what is already indexed.
                at.safe_end = here + len;
            }
            Record::BatchEnd(end) => {
                let expected = at
                    .open_batch
                    .map(|(start, first)| (start, first, self.position));
                if expected != Some((end.batch_start, end.first_position, end.end_position)) {
                    return Err(corruption(
                        &seg.path,
                        here,
                        format!(
                            "a batch end for positions {}..{} of the group commit at {}, but \
                             the one in progress (start, first position, end) is {expected:?}",
                            end.first_position, end.end_position, end.batch_start
                        ),
                    ));
                }
                self.commit_batch(seg)?;
                at.open_batch = None;
                at.safe_end = here + len;
            }
            Record::Event(decoded) => {
                match (decoded.batch_start, at.open_batch) {
                    (None, _) => {}
                    (Some(start), Some((open, _))) if start == open => {}
                    (Some(start), open) if start == here => {
                        if open.is_some() {
                            // A new batch proves the one before it was synced whole.
                            self.commit_batch(seg)?;
                            at.safe_end = here;
                        }
                        at.open_batch = Some((here, self.position));
                    }
                    (Some(start), open) => {
                        return Err(corruption(
                            &seg.path,
                            here,
                            format!(
                                "the record names its group commit at offset {start}, but the \
                                 one in progress started at {:?}",
                                open.map(|o| o.0)
                            ),
                        ));
                    }
                }
                let commit = decoded.commit;
                self.event(seg, here, decoded.event, commit)?;
                if commit && decoded.batch_start.is_none() {
                    // Version 1: every whole append is kept.
                    self.commit_batch(seg)?;
                    at.safe_end = here + len;
                }
            }
        }
        Ok(())
    }

    /// Checks an event's position and revision, and holds it until its batch is complete.
    fn event(
        &mut self,
        seg: &Segment,
        here: u64,
        event: skald_core::RecordedEvent,
        commit: bool,
    ) -> Result<(), Error> {
        if event.position.0 != self.position {
            return Err(corruption(
                &seg.path,
                here,
                format!(
                    "record has position {}, expected {}",
                    event.position, self.position
                ),
            ));
        }
        let previous = self.last_revision(event.stream.as_str())?;
        let expected = previous.map_or(0, |r| r + 1);
        if event.revision.0 != expected {
            return Err(corruption(
                &seg.path,
                here,
                format!(
                    "stream {} has revision {} here, but its previous event has revision {}",
                    event.stream,
                    event.revision,
                    previous.map_or_else(|| "none".to_owned(), |r| r.to_string())
                ),
            ));
        }
        self.revisions
            .insert(event.stream.as_str().to_owned(), event.revision.0);
        self.last_commit = commit;
        self.uncommitted.push(Pending {
            event,
            address: Address::new(seg.ordinal, here),
        });
        self.position += 1;
        Ok(())
    }

    /// The last revision of a stream: read in this scan, or in the index.
    fn last_revision(&self, stream: &str) -> Result<Option<u64>, Error> {
        if let Some(&revision) = self.revisions.get(stream) {
            return Ok(Some(revision));
        }
        let txn = self.db.begin_read().map_err(redb_error)?;
        let streams = match txn.open_table(index::STREAMS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(redb_error(e)),
        };
        let last = streams.get(stream).map_err(redb_error)?;
        Ok(last.map(|v| v.value().0))
    }

    /// The events read so far belong to complete appends of a complete batch: keep them.
    fn commit_batch(&mut self, seg: &Segment) -> Result<(), Error> {
        if let Some(last) = self.uncommitted.last()
            && !self.last_commit
            && seg.version >= FORMAT_VERSION
        {
            return Err(corruption(
                &seg.path,
                last.address.offset(),
                "a group commit ends inside an append (its last event has no commit mark)",
            ));
        }
        self.last_commit = true;
        self.batch.append(&mut self.uncommitted);
        if self.batch.len() >= REPLAY_BATCH {
            self.replayed += self.batch.len() as u64;
            self.index_batch(false)?;
        }
        Ok(())
    }

    /// Indexes the kept events in one transaction, durable or not (the last one is).
    fn index_batch(&mut self, durable: bool) -> Result<(), Error> {
        let base = self
            .batch
            .first()
            .map_or(self.position, |p| p.event.position.0);
        let mut memtable = Memtable::new(base);
        for p in &self.batch {
            let e = &p.event;
            let seg = &self.segments[p.address.ordinal() as usize];
            memtable.insert(&IndexEntry {
                stream: e.stream.as_str(),
                category: e.stream.category().as_str(),
                event_type: e.event_type.as_str(),
                tags: &e.tags,
                id: e.id.0.as_bytes(),
                revision: e.revision.0,
                position: e.position.0,
                address: p.address,
                first_in_segment: e.position.0 == seg.first_position,
            });
        }
        memtable.commit_to(self.db, durable)?;
        self.batch.clear();
        // What the map held is in the index now, except the events still held back.
        self.revisions.clear();
        for p in &self.uncommitted {
            self.revisions
                .insert(p.event.stream.as_str().to_owned(), p.event.revision.0);
        }
        Ok(())
    }
}

/// Reads the frames of a segment's tail in order, past the page cache.
struct TailReader<'f> {
    file: &'f dyn FileIo,
    file_len: u64,
    buf: Vec<u8>,
    buf_offset: u64,
    buf_len: usize,
}

impl<'f> TailReader<'f> {
    fn new(file: &'f dyn FileIo, file_len: u64) -> Self {
        Self {
            file,
            file_len,
            buf: Vec::new(),
            buf_offset: 0,
            buf_len: 0,
        }
    }

    /// The checked frame at `offset`.
    fn next(&mut self, offset: u64) -> std::io::Result<Step> {
        loop {
            if offset >= self.file_len {
                return Ok(Step::End);
            }
            let in_buf =
                offset >= self.buf_offset && offset - self.buf_offset < self.buf_len as u64;
            let have = if in_buf {
                &self.buf[(offset - self.buf_offset) as usize..self.buf_len]
            } else {
                &[][..]
            };
            match codec::check_frame(have) {
                Frame::Valid { body_len } => {
                    let body = have[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len].to_vec();
                    let len = (FRAME_HEADER_LEN + body_len) as u64;
                    return Ok(Step::Record { body, len });
                }
                Frame::Incomplete { needed } if offset + needed as u64 <= self.file_len => {
                    let want = needed.max(SCAN_CHUNK);
                    if self.buf.len() < want {
                        self.buf.resize(want, 0);
                    }
                    let n = read_full_uncached_at(self.file, &mut self.buf[..want], offset)?;
                    if n < needed {
                        // The file is shorter than its length said: cut short.
                        return Ok(Step::Damage("record is cut short"));
                    }
                    self.buf_len = n;
                    self.buf_offset = offset;
                }
                Frame::Incomplete { .. } => return Ok(Step::Damage("record is cut short")),
                Frame::BadLength => return Ok(Step::Damage("record length is invalid")),
                Frame::BadChecksum => return Ok(Step::Damage("record checksum mismatch")),
            }
        }
    }
}

/// The smallest event body of any format (the fixed fields and the empty variable ones).
const MIN_EVENT_BODY: usize = 62;
/// The body of a batch end.
const BATCH_END_BODY: usize = 28;

/// Whether a whole, valid record that `candidate` accepts (given its frame offset and the first
/// bytes of its body) starts anywhere after `bad_offset`. Lengths, kinds and `candidate` are
/// checked on the bytes in hand; only what passes is checksummed, from the buffer when the
/// frame is in it.
fn valid_record_after(
    seg: &Segment,
    bad_offset: u64,
    file_len: u64,
    candidate: impl Fn(u64, &[u8]) -> bool,
) -> Result<bool, Error> {
    /// Bytes of a frame looked at before its checksum: the header and the fixed body fields.
    const PEEK: usize = FRAME_HEADER_LEN + 52;
    let mut at = bad_offset + 1;
    let mut buf = vec![0u8; SCAN_CHUNK];
    while at + (FRAME_HEADER_LEN + BATCH_END_BODY) as u64 <= file_len {
        let n = read_full_uncached_at(seg.file.as_ref(), &mut buf, at)
            .map_err(|e| io_error(&seg.path, e))?;
        if n < FRAME_HEADER_LEN + BATCH_END_BODY {
            break;
        }
        // Every start looked at here has its first PEEK bytes in the buffer, unless the file
        // ends first; the next window starts where this one stopped looking.
        let last = if at + n as u64 >= file_len {
            n - (FRAME_HEADER_LEN + BATCH_END_BODY)
        } else {
            n.saturating_sub(PEEK)
        };
        for i in 0..=last {
            let head = &buf[i..n.min(i + PEEK)];
            let body = &head[FRAME_HEADER_LEN..];
            let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
            let plausible = match body[0] {
                1 => (MIN_EVENT_BODY..=codec::MAX_RECORD_BODY).contains(&len),
                2 => len == BATCH_END_BODY,
                _ => false,
            };
            let frame_start = at + i as u64;
            if !plausible
                || body[2] != 0
                || body[3] != 0
                || frame_start + (FRAME_HEADER_LEN + len) as u64 > file_len
                || !candidate(frame_start, body)
            {
                continue;
            }
            let whole = if i + FRAME_HEADER_LEN + len <= n {
                codec::check_frame(&buf[i..i + FRAME_HEADER_LEN + len])
            } else {
                let mut frame = vec![0u8; FRAME_HEADER_LEN + len];
                read_full_uncached_at(seg.file.as_ref(), &mut frame, frame_start)
                    .map_err(|e| io_error(&seg.path, e))?;
                codec::check_frame(&frame)
            };
            if matches!(whole, Frame::Valid { .. }) {
                return Ok(true);
            }
        }
        // Overlap the windows so that a frame header across the boundary is still seen.
        at += (last + 1) as u64;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use skald_core::{
        AppendRequest, Direction, EventData, EventStore, EventType, ExpectedRevision,
        ProposedEvent, ReadRequest, ReadSource, StreamName, Timestamp,
    };

    use super::*;
    use crate::codec::{
        FORMAT_V1, RecordToWrite, encode_record_version, encode_segment_header_version,
    };
    use crate::sim::{Restart, SimFs};
    use crate::{Options, Store, SystemClock};

    /// A segment in format 1 (no batch starts, no batch ends): `appends` appends of two events
    /// to `s-1`.
    fn version_1_segment(appends: u64) -> Vec<u8> {
        let stream = StreamName::new("s-1").unwrap();
        let mut bytes = encode_segment_header_version(0, FORMAT_V1).to_vec();
        for position in 0..appends * 2 {
            let event = ProposedEvent::new(
                EventType::new("Old").unwrap(),
                EventData::json(format!("{{\"n\":{position}}}")).unwrap(),
            );
            encode_record_version(
                &mut bytes,
                &RecordToWrite {
                    position,
                    revision: position,
                    recorded_at: Timestamp(0),
                    commit: position % 2 == 1,
                    unsynced: false,
                    batch_start: 0,
                    stream: &stream,
                    event: &event,
                },
                FORMAT_V1,
            );
        }
        bytes
    }

    fn read_all(rt: &tokio::runtime::Runtime, store: &Store) -> Vec<u64> {
        let page = rt.block_on(store.read(ReadRequest {
            source: ReadSource::All(None),
            from: None,
            direction: Direction::Forward,
            limit: 1000,
        }));
        page.unwrap().events.iter().map(|e| e.position.0).collect()
    }

    #[test]
    fn a_store_written_in_format_1_opens_and_appends_go_to_a_new_format_2_segment() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let fs = SimFs::new();
        let dir = PathBuf::from("/old");
        io::create_dir_all_durably(&fs, &dir.join("segments")).unwrap();
        let mut bytes = version_1_segment(3);
        // A torn last append (its first event only) is cut by the format-1 rule.
        let whole = bytes.len();
        bytes.extend_from_slice(&version_1_segment(4)[whole..whole + 40]);
        let file = fs
            .open(&segment_path(&dir.join("segments"), 0), Open::CreateNew)
            .unwrap();
        write_all_at(file.as_ref(), &bytes, 0).unwrap();
        let options = Options {
            data_dir: dir.clone(),
            ..Options::default()
        };
        let open = |fs: &SimFs| {
            Store::open_with(options.clone(), Arc::new(SystemClock), Arc::new(fs.clone())).unwrap()
        };

        let (store, report) = open(&fs);
        assert!(
            report.notes.iter().any(|n| n.contains("torn tail")),
            "{:?}",
            report.notes
        );
        assert!(report.notes.iter().any(|n| n.contains("format 2")));
        assert_eq!(read_all(&rt, &store), (0..6).collect::<Vec<_>>());
        let appended = rt
            .block_on(store.append(AppendRequest {
                stream: StreamName::new("s-1").unwrap(),
                expected: ExpectedRevision::Exact(skald_core::Revision(5)),
                condition: None,
                events: vec![ProposedEvent::new(
                    EventType::new("New").unwrap(),
                    EventData::json("{}").unwrap(),
                )],
            }))
            .unwrap();
        assert_eq!(appended.first_position.0, 6);
        rt.block_on(store.shutdown());
        drop(store);

        // And again, from the segments alone.
        let fs = fs.restart(Restart::ProcessCrash);
        fs.remove_file(&dir.join(index::INDEX_FILE)).unwrap();
        let (store, _) = open(&fs);
        assert_eq!(read_all(&rt, &store), (0..7).collect::<Vec<_>>());
        let names = fs.list_dir(&dir.join("segments")).unwrap();
        assert_eq!(names, vec!["0000000000.seg", "0000000001.seg"]);
    }
}
