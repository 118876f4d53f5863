//! Segment files and reading records from them by address.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::Error;
use crate::codec::{self, FRAME_HEADER_LEN, Frame, SEGMENT_HEADER_LEN};
use crate::io::{FileIo, read_full_at};

/// Bits of an address that hold the byte offset within a segment.
const OFFSET_BITS: u32 = 40;
/// The first read from a segment, and the read after a jump elsewhere: enough for a typical
/// record. A stream's records lie scattered over the log, so a larger read would mostly fetch
/// other streams' records (256 KiB per record made reading a 23-event stream cost 1.3 ms).
const MIN_WINDOW: usize = 4 * 1024;
/// The largest read: a reader moving forward through a segment (a scan of the log, a dense
/// category) doubles its window up to this, one system call per 256 KiB instead of one per
/// record.
const MAX_WINDOW: usize = 256 * 1024;

/// Where a record's frame starts: segment ordinal and byte offset, packed into a `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Address(pub u64);

impl Address {
    /// Packs an ordinal and an offset.
    pub fn new(ordinal: u32, offset: u64) -> Self {
        debug_assert!(offset < 1 << OFFSET_BITS);
        Self(u64::from(ordinal) << OFFSET_BITS | offset)
    }
    /// The segment ordinal.
    pub fn ordinal(self) -> u32 {
        (self.0 >> OFFSET_BITS) as u32
    }
    /// The byte offset within the segment.
    pub fn offset(self) -> u64 {
        self.0 & ((1 << OFFSET_BITS) - 1)
    }
}

/// One open segment file.
pub struct Segment {
    /// Its ordinal (and file name).
    pub ordinal: u32,
    /// The global position of its first record.
    pub first_position: u64,
    /// Its record format (`codec::FORMAT_VERSION`, or 1 for segments written before it).
    pub version: u32,
    /// Its path, for error messages.
    pub path: PathBuf,
    /// The file, read and written with positional I/O only.
    pub file: Arc<dyn FileIo>,
    /// Bytes that hold records visible to readers (everything up to the published head).
    pub committed_len: AtomicU64,
    /// The first failed `fdatasync` of this file, if any; also serializes them (see
    /// [`Segment::sync`]).
    pub sync_failure: std::sync::Mutex<Option<String>>,
}

impl Segment {
    /// `fdatasync` of the file, for every thread that needs one. After one failure every later
    /// call fails too: Linux may have marked the pages it could not write clean, so a later
    /// `fdatasync` would succeed without writing them, and only the thread that met the error
    /// would know.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut failure = self
            .sync_failure
            .lock()
            .expect("segment sync lock poisoned");
        if let Some(earlier) = &*failure {
            return Err(std::io::Error::other(format!(
                "an earlier fdatasync of this file failed: {earlier}"
            )));
        }
        let synced = self.file.sync_data();
        if let Err(e) = &synced {
            *failure = Some(e.to_string());
        }
        synced
    }
}

/// The file name of a segment.
pub fn segment_path(dir: &Path, ordinal: u32) -> PathBuf {
    dir.join(format!("{ordinal:010}.seg"))
}

/// The segments, shared between the writer (which adds them) and readers.
#[derive(Default)]
pub struct Segments {
    list: RwLock<Vec<Arc<Segment>>>,
}

impl Segments {
    /// Builds the set from segments opened at recovery.
    pub fn new(list: Vec<Arc<Segment>>) -> Self {
        Self {
            list: RwLock::new(list),
        }
    }
    /// A snapshot for one read.
    pub fn snapshot(&self) -> Vec<Arc<Segment>> {
        self.list
            .read()
            .expect("segment list lock poisoned")
            .clone()
    }
    /// Adds a new last segment.
    pub fn push(&self, segment: Arc<Segment>) {
        let mut list = self.list.write().expect("segment list lock poisoned");
        debug_assert_eq!(segment.ordinal as usize, list.len());
        list.push(segment);
    }
    /// The last segment.
    pub fn last(&self) -> Arc<Segment> {
        let list = self.list.read().expect("segment list lock poisoned");
        Arc::clone(list.last().expect("a store always has a segment"))
    }
    /// The sum of all segment file lengths.
    pub fn total_bytes(&self) -> u64 {
        let list = self.list.read().expect("segment list lock poisoned");
        list.iter()
            .map(|s| s.committed_len.load(Ordering::Acquire))
            .sum()
    }
}

/// Reads records by address through a window buffer, so that records read in file order
/// cost one system call per window rather than one per record, while a record far from the
/// last one costs one small read.
pub struct RecordReader {
    segments: Vec<Arc<Segment>>,
    window: Vec<u8>,
    window_ordinal: u32,
    window_offset: u64,
    /// Bytes the last read asked for; fewer arrived only at the end of the file.
    window_asked: usize,
    window_len: usize,
    /// The size of the next read: `MIN_WINDOW` after a jump, doubling while reads go forward.
    next_window: usize,
}

impl RecordReader {
    /// A reader over a snapshot of the segments.
    pub fn new(segments: Vec<Arc<Segment>>) -> Self {
        Self {
            segments,
            window: Vec::new(),
            window_ordinal: u32::MAX,
            window_offset: 0,
            window_asked: 0,
            window_len: 0,
            next_window: MIN_WINDOW,
        }
    }

    /// The record format of a segment (for decoding what [`RecordReader::body_at`] returns).
    pub fn version(&self, ordinal: u32) -> u32 {
        self.segments
            .get(ordinal as usize)
            .map_or(codec::FORMAT_VERSION, |s| s.version)
    }

    /// The segment an address points into.
    fn segment(&self, ordinal: u32) -> Result<&Arc<Segment>, Error> {
        self.segments
            .get(ordinal as usize)
            .ok_or_else(|| Error::Corruption {
                file: "index".to_owned(),
                offset: 0,
                reason: format!("the index points at segment {ordinal}, which does not exist"),
            })
    }

    /// The checked body of the record at `addr`. A damaged record is an
    /// [`Error::Corruption`] naming the file and offset.
    pub fn body_at(&mut self, addr: Address) -> Result<&[u8], Error> {
        let (ordinal, offset) = (addr.ordinal(), addr.offset());
        let in_window = ordinal == self.window_ordinal
            && offset >= self.window_offset
            && offset < self.window_offset + self.window_len as u64;
        let mut start = (offset - if in_window { self.window_offset } else { 0 }) as usize;
        if !in_window {
            // Just past the window, within the next window's reach: a forward scan, so read
            // more at once. Anywhere else (another stream's record, a read backward): a small
            // read.
            let window_end = self.window_offset + self.window_len as u64;
            let forward = ordinal == self.window_ordinal
                && offset >= window_end
                && offset - window_end < self.next_window as u64;
            self.next_window = if forward {
                (self.next_window * 2).min(MAX_WINDOW)
            } else {
                MIN_WINDOW
            };
            self.fill(ordinal, offset, self.next_window)?;
            start = 0;
        }
        let mut frame = check_frame_or_corrupt(self, ordinal, offset, start)?;
        if let Err(needed) = frame {
            // The record runs past the window's end: a scan reached it, or the record is
            // larger than the window.
            self.next_window = (self.next_window * 2).min(MAX_WINDOW);
            self.fill(ordinal, offset, needed.max(self.next_window))?;
            start = 0;
            frame = check_frame_or_corrupt(self, ordinal, offset, start)?;
        }
        let body_len = frame.map_err(|_| self.corrupt(ordinal, offset, "record is cut short"))?;
        Ok(&self.window[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + body_len])
    }

    fn fill(&mut self, ordinal: u32, offset: u64, len: usize) -> Result<(), Error> {
        let segment = Arc::clone(self.segment(ordinal)?);
        if self.window.len() < len {
            self.window.resize(len, 0);
        }
        // `read_full_at` reads all `len` bytes unless the file ends first.
        let n = read_full_at(segment.file.as_ref(), &mut self.window[..len], offset)
            .map_err(|e| Error::Io(format!("reading {}: {e}", segment.path.display())))?;
        self.window_ordinal = ordinal;
        self.window_offset = offset;
        self.window_asked = len;
        self.window_len = n;
        Ok(())
    }

    fn corrupt(&self, ordinal: u32, offset: u64, reason: &str) -> Error {
        let file = self.segments.get(ordinal as usize).map_or_else(
            || format!("segment {ordinal}"),
            |s| s.path.display().to_string(),
        );
        Error::Corruption {
            file,
            offset,
            reason: reason.to_owned(),
        }
    }

    /// The address of the record after the one at `addr` with a body of `body_len` bytes,
    /// moving to the next segment at the end of a segment.
    pub fn next_address(&self, addr: Address, body_len: usize) -> Address {
        let next = addr.offset() + (FRAME_HEADER_LEN + body_len) as u64;
        let segment = &self.segments[addr.ordinal() as usize];
        let is_last = addr.ordinal() as usize + 1 == self.segments.len();
        if !is_last && next >= segment.committed_len.load(Ordering::Acquire) {
            Address::new(addr.ordinal() + 1, SEGMENT_HEADER_LEN)
        } else {
            Address::new(addr.ordinal(), next)
        }
    }
}

/// `Ok(Ok(body_len))` for a valid frame in the window at `start`, `Ok(Err(needed))` when the
/// window holds only part of it, and a corruption error when it is damaged.
fn check_frame_or_corrupt(
    r: &RecordReader,
    ordinal: u32,
    offset: u64,
    start: usize,
) -> Result<Result<usize, usize>, Error> {
    match codec::check_frame(&r.window[start..r.window_len]) {
        Frame::Valid { body_len } => Ok(Ok(body_len)),
        Frame::Incomplete { needed } if start > 0 || r.window_len == r.window_asked => {
            Ok(Err(needed))
        }
        Frame::Incomplete { .. } => Err(r.corrupt(ordinal, offset, "record is cut short")),
        Frame::BadLength => Err(r.corrupt(ordinal, offset, "record length is invalid")),
        Frame::BadChecksum => Err(r.corrupt(ordinal, offset, "record checksum mismatch")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{RecordToWrite, body_position, encode_record, encode_segment_header};
    use crate::io::{Fs, Open, RealFs};
    use skald_core::{EventData, EventType, ProposedEvent, StreamName, Timestamp};

    /// A segment of `sizes.len()` records whose data are `sizes[i]` bytes long, and the address
    /// of each record.
    fn segment(dir: &Path, sizes: &[usize]) -> (Arc<Segment>, Vec<Address>) {
        let stream = StreamName::new("s").unwrap();
        let mut bytes = encode_segment_header(0).to_vec();
        let mut addresses = Vec::new();
        for (position, &size) in sizes.iter().enumerate() {
            let event = ProposedEvent::new(
                EventType::new("T").unwrap(),
                EventData::with_content_type(
                    "application/octet-stream",
                    vec![position as u8; size],
                )
                .unwrap(),
            );
            addresses.push(Address::new(0, bytes.len() as u64));
            encode_record(
                &mut bytes,
                &RecordToWrite {
                    position: position as u64,
                    revision: position as u64,
                    recorded_at: Timestamp(0),
                    commit: true,
                    unsynced: false,
                    batch_start: addresses.last().map_or(32, |a: &Address| a.offset()),
                    stream: &stream,
                    event: &event,
                },
            );
        }
        let path = segment_path(dir, 0);
        std::fs::write(&path, &bytes).unwrap();
        let segment = Segment {
            ordinal: 0,
            first_position: 0,
            version: codec::FORMAT_VERSION,
            path: path.clone(),
            file: RealFs.open(&path, Open::ReadWrite).unwrap(),
            committed_len: AtomicU64::new(bytes.len() as u64),
            sync_failure: std::sync::Mutex::new(None),
        };
        (Arc::new(segment), addresses)
    }

    fn position_at(reader: &mut RecordReader, address: Address) -> u64 {
        body_position(reader.body_at(address).unwrap()).unwrap()
    }

    #[test]
    fn records_read_in_any_order_and_any_size_with_windows_that_follow_the_access() {
        let dir = tempfile::tempdir().unwrap();
        // Mostly small records, with some larger than the smallest window and one larger than
        // the largest.
        let sizes: Vec<usize> = (0..3_000)
            .map(|i| match i {
                1_000 => MAX_WINDOW + 10_000,
                _ if i % 97 == 0 => 3 * MIN_WINDOW,
                _ => 200 + i % 50,
            })
            .collect();
        let (segment, addresses) = segment(dir.path(), &sizes);

        // Forward: the window grows to the largest size and records come from it.
        let mut reader = RecordReader::new(vec![Arc::clone(&segment)]);
        let mut largest = 0;
        for (position, &address) in addresses.iter().enumerate() {
            assert_eq!(position_at(&mut reader, address), position as u64);
            largest = largest.max(reader.next_window);
        }
        assert_eq!(largest, MAX_WINDOW, "a forward scan reads large windows");

        // Scattered, as a stream's records are: each read is a small one.
        let mut reader = RecordReader::new(vec![Arc::clone(&segment)]);
        for position in (0..3_000).step_by(211).chain((5..3_000).rev().step_by(389)) {
            assert_eq!(
                position_at(&mut reader, addresses[position]),
                position as u64
            );
            if sizes[position] < MIN_WINDOW {
                assert_eq!(reader.window_asked, MIN_WINDOW, "record {position}");
            }
        }

        // Backward, record by record.
        let mut reader = RecordReader::new(vec![segment]);
        for position in (0..3_000).rev() {
            assert_eq!(
                position_at(&mut reader, addresses[position]),
                position as u64
            );
        }
    }

    #[test]
    fn a_record_cut_short_by_the_end_of_the_file_is_corruption_whatever_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (segment, addresses) = segment(dir.path(), &[300, 300, 3 * MIN_WINDOW]);
        let len = segment.file.len().unwrap();
        // Cut the last record (larger than the first window) in half.
        segment.file.set_len(len - (MIN_WINDOW as u64)).unwrap();
        let mut reader = RecordReader::new(vec![segment]);
        assert_eq!(position_at(&mut reader, addresses[0]), 0);
        assert_eq!(position_at(&mut reader, addresses[1]), 1);
        match reader.body_at(addresses[2]) {
            Err(Error::Corruption { reason, offset, .. }) => {
                assert_eq!(reason, "record is cut short");
                assert_eq!(offset, addresses[2].offset());
            }
            other => panic!("expected corruption, got {:?}", other.map(|b| b.len())),
        }
    }
}
