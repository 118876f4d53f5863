//! Opening a data directory: checking segments, finding the end of the log, cutting a torn
//! tail, and bringing the index up to date. See "Recovery on open" in `docs/storage.md`.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use redb::{Database, ReadableDatabase};

use crate::codec::{self, FRAME_HEADER_LEN, Frame, SEGMENT_HEADER_LEN};
use crate::index::{self, IndexEntry};
use crate::memtable::Memtable;
use crate::segments::{Address, RecordReader, Segment, read_full_at, segment_path};
use crate::{Error, io_error, redb_error};

/// Bytes read at a time while scanning the tail.
const SCAN_CHUNK: usize = 4 << 20;
/// Events replayed into the index per (non-durable) index transaction.
const REPLAY_BATCH: usize = 50_000;
/// The redb page cache; bounded so that resident memory stays predictable.
const INDEX_CACHE_BYTES: usize = 64 << 20;

/// What opening found and did.
pub struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    pub db: Database,
    /// The next position to assign.
    pub next_position: u64,
    /// Human-readable notes on repairs made (a cut tail, a rebuilt index).
    pub notes: Vec<String>,
}

/// Opens (or creates) the segments and the index in `dir` and makes them consistent.
pub fn recover(dir: &Path) -> Result<Recovered, Error> {
    let seg_dir = dir.join("segments");
    fs::create_dir_all(&seg_dir).map_err(|e| io_error(&seg_dir, e))?;
    let mut notes = Vec::new();
    let mut segments = open_segments(&seg_dir, &mut notes)?;
    if segments.is_empty() {
        segments.push(Arc::new(create_segment(&seg_dir, 0, 0)?));
    }
    let index_path = dir.join("index.redb");
    let mut db = open_index(&index_path, &mut notes)?;
    let mut indexed = indexed_through(&db)?;
    let start = match find_address(&db, &segments, indexed)? {
        Some(addr) => addr,
        None => {
            notes.push(format!(
                "the index claims {indexed} events but the segments hold fewer; rebuilding it"
            ));
            drop(db);
            fs::remove_file(&index_path).map_err(|e| io_error(&index_path, e))?;
            db = open_index(&index_path, &mut notes)?;
            indexed = 0;
            Address::new(0, SEGMENT_HEADER_LEN)
        }
    };
    let next_position = replay_tail(&db, &segments, start, indexed, &mut notes)?;
    for s in &segments {
        let len = s.file.metadata().map_err(|e| io_error(&s.path, e))?.len();
        s.committed_len
            .store(len, std::sync::atomic::Ordering::Release);
    }
    Ok(Recovered {
        segments,
        db,
        next_position,
        notes,
    })
}

fn open_index(path: &Path, notes: &mut Vec<String>) -> Result<Database, Error> {
    let open = || {
        Database::builder()
            .set_cache_size(INDEX_CACHE_BYTES)
            .create(path)
    };
    match open() {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(Error::Unavailable(format!(
            "{} is already open in another process",
            path.display()
        ))),
        Err(e) => {
            // The index is derived data: a damaged one is rebuilt, never trusted.
            notes.push(format!(
                "the index could not be opened ({e}); rebuilding it"
            ));
            fs::remove_file(path).map_err(|e| io_error(path, e))?;
            open().map_err(redb_error)
        }
    }
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
/// log), or `None` when the log ends before `target`.
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
    let mut reader = RecordReader::new(segments.to_vec());
    for s in segments {
        let len = s.file.metadata().map_err(|e| io_error(&s.path, e))?.len();
        s.committed_len
            .store(len, std::sync::atomic::Ordering::Release);
    }
    while pos < target {
        let seg = &segments[addr.ordinal() as usize];
        let len = seg.committed_len.load(std::sync::atomic::Ordering::Acquire);
        if addr.offset() >= len {
            return Ok(None);
        }
        // Damage here is below the indexed mark, in events that were acknowledged: it is
        // corruption, reported as such, not a torn tail.
        let body_len = reader.body_at(addr)?.len();
        addr = reader.next_address(addr, body_len);
        pos += 1;
    }
    Ok(Some(addr))
}

fn open_segments(seg_dir: &Path, notes: &mut Vec<String>) -> Result<Vec<Arc<Segment>>, Error> {
    let mut ordinals = Vec::new();
    for entry in fs::read_dir(seg_dir).map_err(|e| io_error(seg_dir, e))? {
        let entry = entry.map_err(|e| io_error(seg_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".seg")
            && let Ok(ordinal) = stem.parse::<u32>()
        {
            ordinals.push(ordinal);
        }
    }
    ordinals.sort_unstable();
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    for (i, &ordinal) in ordinals.iter().enumerate() {
        let path = segment_path(seg_dir, ordinal);
        if ordinal as usize != i {
            return Err(Error::Corruption {
                file: path.display().to_string(),
                offset: 0,
                reason: format!(
                    "segment {i} is missing; segments must be numbered from 0 without gaps"
                ),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        let n = read_full_at(&file, &mut header, 0).map_err(|e| io_error(&path, e))?;
        let is_last = i + 1 == ordinals.len();
        let first_position = match codec::decode_segment_header(&header[..n]) {
            Ok(p) => p,
            // A crash while a new segment was being started leaves a short header and no
            // records: the segment never held anything, so it is removed.
            Err(_) if is_last && i > 0 && n < SEGMENT_HEADER_LEN as usize => {
                notes.push(format!(
                    "removed {} (cut off while it was created)",
                    path.display()
                ));
                fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
                break;
            }
            Err(reason) => {
                return Err(Error::Corruption {
                    file: path.display().to_string(),
                    offset: 0,
                    reason,
                });
            }
        };
        let ordered = segments
            .last()
            .is_none_or(|p| p.first_position <= first_position);
        if (i == 0 && first_position != 0) || !ordered {
            return Err(Error::Corruption {
                file: path.display().to_string(),
                offset: 16,
                reason: format!("segment starts at position {first_position}, out of order"),
            });
        }
        segments.push(Arc::new(Segment {
            ordinal,
            first_position,
            path,
            file,
            committed_len: AtomicU64::new(0),
        }));
    }
    Ok(segments)
}

/// Creates a new, empty segment and makes its existence durable.
pub fn create_segment(seg_dir: &Path, ordinal: u32, first_position: u64) -> Result<Segment, Error> {
    let path = segment_path(seg_dir, ordinal);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&codec::encode_segment_header(first_position), 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(&path, e))?;
    File::open(seg_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(seg_dir, e))?;
    Ok(Segment {
        ordinal,
        first_position,
        path,
        file,
        committed_len: AtomicU64::new(SEGMENT_HEADER_LEN),
    })
}

/// One event read during the tail scan, waiting for the commit mark of its append.
struct Pending {
    event: skald_core::RecordedEvent,
    address: Address,
}

/// Scans from `start` (position `position`) to the end of the log, indexing every whole
/// append, cutting a torn tail and failing on damage anywhere else. Returns the end position.
fn replay_tail(
    db: &Database,
    segments: &[Arc<Segment>],
    start: Address,
    mut position: u64,
    notes: &mut Vec<String>,
) -> Result<u64, Error> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut batch: Vec<Pending> = Vec::new();
    let mut replayed = 0u64;
    // Where the last whole append ends: (segment index, offset).
    let mut committed_end = (start.ordinal() as usize, start.offset());
    for (i, seg) in segments.iter().enumerate().skip(start.ordinal() as usize) {
        let is_last = i + 1 == segments.len();
        let mut offset = if i == start.ordinal() as usize {
            start.offset()
        } else {
            SEGMENT_HEADER_LEN
        };
        if seg.first_position != position && offset == SEGMENT_HEADER_LEN {
            return Err(Error::Corruption {
                file: seg.path.display().to_string(),
                offset: 16,
                reason: format!(
                    "segment starts at position {}, but the previous one ends at {position}",
                    seg.first_position
                ),
            });
        }
        let file_len = seg
            .file
            .metadata()
            .map_err(|e| io_error(&seg.path, e))?
            .len();
        let mut buf = vec![0u8; SCAN_CHUNK];
        let mut buf_offset = u64::MAX;
        let mut buf_len = 0usize;
        let damage = loop {
            if offset >= file_len {
                break None;
            }
            let rel = offset.wrapping_sub(buf_offset) as usize;
            let have = if buf_offset <= offset && rel < buf_len {
                &buf[rel..buf_len]
            } else {
                &[][..]
            };
            match codec::check_frame(have) {
                Frame::Valid { body_len } => {
                    let body = &have[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
                    let decoded = codec::decode_body(body).map_err(|reason| Error::Corruption {
                        file: seg.path.display().to_string(),
                        offset,
                        reason,
                    })?;
                    if decoded.event.position.0 != position {
                        return Err(Error::Corruption {
                            file: seg.path.display().to_string(),
                            offset,
                            reason: format!(
                                "record has position {}, expected {position}",
                                decoded.event.position
                            ),
                        });
                    }
                    pending.push(Pending {
                        event: decoded.event,
                        address: Address::new(seg.ordinal, offset),
                    });
                    position += 1;
                    offset += (FRAME_HEADER_LEN + body_len) as u64;
                    if decoded.commit {
                        batch.append(&mut pending);
                        committed_end = (i, offset);
                        if batch.len() >= REPLAY_BATCH {
                            replayed += batch.len() as u64;
                            index_batch(db, segments, &mut batch, position, false)?;
                        }
                    }
                }
                Frame::Incomplete { needed } if offset + needed as u64 <= file_len => {
                    let want = needed.max(SCAN_CHUNK);
                    if buf.len() < want {
                        buf.resize(want, 0);
                    }
                    buf_len = read_full_at(&seg.file, &mut buf[..want], offset)
                        .map_err(|e| io_error(&seg.path, e))?;
                    buf_offset = offset;
                }
                Frame::Incomplete { .. } => break Some((offset, "record is cut short")),
                Frame::BadLength => break Some((offset, "record length is invalid")),
                Frame::BadChecksum => break Some((offset, "record checksum mismatch")),
            }
        };
        let torn = damage.is_some() || !pending.is_empty();
        if torn {
            let (bad_offset, reason) = damage.unwrap_or((offset, "append without its commit mark"));
            let first_pending = pending
                .first()
                .map(|p| p.address.offset())
                .unwrap_or(bad_offset);
            if !is_last || valid_frame_after(seg, bad_offset, file_len, position)? {
                return Err(Error::Corruption {
                    file: seg.path.display().to_string(),
                    offset: bad_offset,
                    reason: reason.to_owned(),
                });
            }
            let keep = if committed_end.0 == i {
                committed_end.1
            } else {
                SEGMENT_HEADER_LEN
            };
            debug_assert!(keep <= first_pending);
            position -= pending.len() as u64;
            notes.push(format!(
                "cut a torn tail of {} bytes from {} at offset {keep} ({reason} at offset {bad_offset}; \
                 {} unacknowledged events dropped)",
                file_len - keep,
                seg.path.display(),
                pending.len()
            ));
            pending.clear();
            seg.file
                .set_len(keep)
                .and_then(|()| seg.file.sync_all())
                .map_err(|e| io_error(&seg.path, e))?;
        }
    }
    replayed += batch.len() as u64;
    index_batch(db, segments, &mut batch, position, true)?;
    if replayed > 0 {
        notes.push(format!(
            "indexed {replayed} events found after the last index checkpoint"
        ));
    }
    Ok(position)
}

/// Whether any whole record with a position after `min_position` starts after `bad_offset`:
/// if one does, the damage is in the middle of the log, not a torn tail.
fn valid_frame_after(
    seg: &Segment,
    bad_offset: u64,
    file_len: u64,
    min_position: u64,
) -> Result<bool, Error> {
    let mut at = bad_offset + 1;
    let mut buf = vec![0u8; SCAN_CHUNK];
    while at + FRAME_HEADER_LEN as u64 <= file_len {
        let n = read_full_at(&seg.file, &mut buf, at).map_err(|e| io_error(&seg.path, e))?;
        for i in 0..n.saturating_sub(FRAME_HEADER_LEN + 12) {
            let body = &buf[i + FRAME_HEADER_LEN..];
            // Cheap filters before the checksum: the record kind, the reserved bytes and a
            // plausible position.
            if body[0] != 1 || body[2] != 0 || body[3] != 0 {
                continue;
            }
            let pos = codec::body_position(body);
            if pos < min_position || pos > min_position + (1 << 32) {
                continue;
            }
            let frame_start = at + i as u64;
            let len = u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes")) as u64;
            if frame_start + FRAME_HEADER_LEN as u64 + len > file_len {
                continue;
            }
            let mut frame = vec![0u8; FRAME_HEADER_LEN + len as usize];
            read_full_at(&seg.file, &mut frame, frame_start).map_err(|e| io_error(&seg.path, e))?;
            if matches!(codec::check_frame(&frame), Frame::Valid { .. }) {
                return Ok(true);
            }
        }
        // Overlap the windows so that a frame header across the boundary is still seen.
        at += (n.saturating_sub(FRAME_HEADER_LEN + 12)).max(1) as u64;
    }
    Ok(false)
}

fn index_batch(
    db: &Database,
    segments: &[Arc<Segment>],
    batch: &mut Vec<Pending>,
    next_position: u64,
    durable: bool,
) -> Result<(), Error> {
    let base = batch.first().map_or(next_position, |p| p.event.position.0);
    let mut memtable = Memtable::new(base);
    for p in batch.iter() {
        let e = &p.event;
        let seg = &segments[p.address.ordinal() as usize];
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
    memtable.commit_to(db, durable)?;
    batch.clear();
    Ok(())
}
