//! The record and segment-header codec. The layout is specified in `docs/storage.md`; any
//! change here must change that page and the format version.

use skald_core::{
    EventData, EventId, EventType, Metadata, Position, ProposedEvent, RecordedEvent, Revision,
    StreamName, Tag, Timestamp,
};

/// Bytes of a segment file's header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Bytes of a record frame's header (length and CRC).
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest record body accepted when reading; anything larger is damage.
pub const MAX_RECORD_BODY: usize = 64 << 20;
/// The record kind of an event.
const KIND_EVENT: u8 = 1;
/// The record kind of a batch end (version 2): written after the last event of a group commit.
const KIND_BATCH_END: u8 = 2;
/// Flag bit: this record is the last event of its append.
pub const FLAG_COMMIT: u8 = 1;
/// Flag bit (version 2): written with durability `none`, so the group commits before it were
/// not synced before it was written, and its presence proves nothing about them.
pub const FLAG_UNSYNCED: u8 = 2;
const SEGMENT_MAGIC: &[u8; 8] = b"SKALDSEG";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The first format, still read: no `batch_start` in events, no batch ends.
pub const FORMAT_V1: u32 = 1;
/// Bytes of a batch end's body, the smallest body there is.
const BATCH_END_LEN: usize = 1 + 1 + 2 + 8 + 8 + 8;

/// Encodes a segment header of the current format for a segment whose first record has
/// `first_position`.
pub fn encode_segment_header(first_position: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    encode_segment_header_version(first_position, FORMAT_VERSION)
}

/// Encodes a segment header of any format (tests write version 1 with it).
pub fn encode_segment_header_version(
    first_position: u64,
    version: u32,
) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&first_position.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header, returning the first position and the format version, or what is
/// wrong with it.
pub fn decode_segment_header(h: &[u8]) -> Result<(u64, u32), String> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err(format!("segment header is {} bytes, expected 32", h.len()));
    }
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("not a Skald segment (bad magic)".to_owned());
    }
    let crc = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&h[0..24]) {
        return Err("segment header checksum mismatch".to_owned());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "segment format version {version} is not supported (this build reads 1 to \
             {FORMAT_VERSION})"
        ));
    }
    Ok((
        u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
        version,
    ))
}

/// What is needed to write one event record.
pub struct RecordToWrite<'a> {
    /// Global position.
    pub position: u64,
    /// Revision in the stream.
    pub revision: u64,
    /// Recorded time.
    pub recorded_at: Timestamp,
    /// Whether this is the last event of its append.
    pub commit: bool,
    /// Whether it is written without waiting for the earlier group commits' `fdatasync`.
    pub unsynced: bool,
    /// The segment offset of the first record of this record's group commit.
    pub batch_start: u64,
    /// The stream.
    pub stream: &'a StreamName,
    /// The event.
    pub event: &'a ProposedEvent,
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("names are validated to fit in u16");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).expect("event size is limited far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends one framed event record of the current format to `out` and returns the frame's
/// length in bytes.
pub fn encode_record(out: &mut Vec<u8>, r: &RecordToWrite<'_>) -> usize {
    encode_record_version(out, r, FORMAT_VERSION)
}

/// [`encode_record`] in any format (tests write version 1 with it).
pub fn encode_record_version(out: &mut Vec<u8>, r: &RecordToWrite<'_>, version: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let body_start = out.len();
    out.push(KIND_EVENT);
    let unsynced = if r.unsynced && version >= 2 {
        FLAG_UNSYNCED
    } else {
        0
    };
    out.push(if r.commit { FLAG_COMMIT } else { 0 } | unsynced);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&r.position.to_le_bytes());
    out.extend_from_slice(&r.revision.to_le_bytes());
    out.extend_from_slice(&r.recorded_at.0.to_le_bytes());
    out.extend_from_slice(r.event.id.0.as_bytes());
    if version >= 2 {
        out.extend_from_slice(&r.batch_start.to_le_bytes());
    }
    put_str16(out, r.stream.as_str());
    put_str16(out, r.event.event_type.as_str());
    put_str16(out, r.event.data.content_type());
    put_str16(out, r.event.source.as_deref().unwrap_or(""));
    let tag_count = u16::try_from(r.event.tags.len()).expect("tag count is limited");
    out.extend_from_slice(&tag_count.to_le_bytes());
    for tag in &r.event.tags {
        put_str16(out, tag.as_str());
    }
    put_bytes32(out, r.event.metadata.as_str().as_bytes());
    put_bytes32(out, r.event.data.bytes());
    let body_len = out.len() - body_start;
    assert!(
        body_len <= MAX_RECORD_BODY,
        "record body over the format maximum"
    );
    seal_frame(out, start, body_start)
}

/// Fills in the frame header of the record whose frame starts at `start` in `out`.
fn seal_frame(out: &mut [u8], start: usize, body_start: usize) -> usize {
    let body_len = out.len() - body_start;
    let crc = crc32c::crc32c(&out[body_start..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// The end of a group commit: where it started in its segment and the positions it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchEnd {
    /// Written with durability `none` (see [`FLAG_UNSYNCED`]).
    pub unsynced: bool,
    /// The segment offset of the batch's first record.
    pub batch_start: u64,
    /// The position of the batch's first event.
    pub first_position: u64,
    /// The position after the batch's last event.
    pub end_position: u64,
}

/// Appends a framed batch end to `out` and returns the frame's length in bytes.
pub fn encode_batch_end(out: &mut Vec<u8>, end: &BatchEnd) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let body_start = out.len();
    let flags = if end.unsynced { FLAG_UNSYNCED } else { 0 };
    out.extend_from_slice(&[KIND_BATCH_END, flags, 0, 0]);
    out.extend_from_slice(&end.batch_start.to_le_bytes());
    out.extend_from_slice(&end.first_position.to_le_bytes());
    out.extend_from_slice(&end.end_position.to_le_bytes());
    debug_assert_eq!(out.len() - body_start, BATCH_END_LEN);
    seal_frame(out, start, body_start)
}

/// The result of checking the frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A whole frame with a valid CRC; the body is `buf[8..8 + body_len]`.
    Valid { body_len: usize },
    /// The buffer ends before the frame does.
    Incomplete { needed: usize },
    /// The length is zero or over the maximum: the bytes are not a frame.
    BadLength,
    /// The body does not match its checksum.
    BadChecksum,
}

/// Checks the frame at the start of `buf`.
pub fn check_frame(buf: &[u8]) -> Frame {
    if buf.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete {
            needed: FRAME_HEADER_LEN,
        };
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(BATCH_END_LEN..=MAX_RECORD_BODY).contains(&len) {
        return Frame::BadLength;
    }
    let total = FRAME_HEADER_LEN + len;
    if buf.len() < total {
        return Frame::Incomplete { needed: total };
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[FRAME_HEADER_LEN..total]) != crc {
        return Frame::BadChecksum;
    }
    Frame::Valid { body_len: len }
}

/// A decoded event record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Whether it is the last event of its append.
    pub commit: bool,
    /// The segment offset where its group commit starts (version 2; `None` in version 1).
    pub batch_start: Option<u64>,
    /// The event.
    pub event: RecordedEvent,
}

/// Any decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An event.
    Event(Box<Decoded>),
    /// The end of a group commit.
    BatchEnd(BatchEnd),
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| format!("field overruns the record at byte {}", self.at))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u16(&mut self) -> Result<usize, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, len: usize) -> Result<String, String> {
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a name is not valid UTF-8".to_owned())
    }
    fn str16(&mut self) -> Result<String, String> {
        let n = self.u16()?;
        self.string(n)
    }
}

/// Decodes an event record's body (checksum verified) of a segment of format `version`. A
/// batch end is an error here: nothing that expects an event may point at one.
pub fn decode_body(body: &[u8], version: u32) -> Result<Decoded, String> {
    if body.first() == Some(&KIND_BATCH_END) && version >= 2 {
        return Err("a batch end where an event record was expected".to_owned());
    }
    decode_event(body, version)
}

/// Decodes any record body (checksum verified) of a segment of format `version`.
pub fn decode_record(body: &[u8], version: u32) -> Result<Record, String> {
    let mut c = Cursor { buf: body, at: 0 };
    let head = c.take(4)?;
    if head[0] == KIND_BATCH_END && version >= 2 {
        let end = BatchEnd {
            unsynced: head[1] & FLAG_UNSYNCED != 0,
            batch_start: c.u64()?,
            first_position: c.u64()?,
            end_position: c.u64()?,
        };
        if c.at != body.len() || end.end_position <= end.first_position {
            return Err("malformed batch end".to_owned());
        }
        return Ok(Record::BatchEnd(end));
    }
    decode_event(body, version).map(|decoded| Record::Event(Box::new(decoded)))
}

/// Decodes an event body of a segment of format `version`.
fn decode_event(body: &[u8], version: u32) -> Result<Decoded, String> {
    let mut c = Cursor { buf: body, at: 0 };
    let head = c.take(4)?;
    if head[0] != KIND_EVENT {
        return Err(format!("unknown record kind {}", head[0]));
    }
    let commit = head[1] & FLAG_COMMIT != 0;
    let position = c.u64()?;
    let revision = c.u64()?;
    let recorded_at = c.u64()? as i64;
    let id = uuid::Uuid::from_slice(c.take(16)?).expect("16 bytes");
    let batch_start = if version >= 2 { Some(c.u64()?) } else { None };
    let stream = c.str16()?;
    let event_type = c.str16()?;
    let content_type = c.str16()?;
    let source = c.str16()?;
    let tag_count = c.u16()?;
    let mut tags = Vec::with_capacity(tag_count);
    for _ in 0..tag_count {
        tags.push(Tag::from_stored(c.str16()?));
    }
    let meta_len = c.u32()?;
    let metadata = c.string(meta_len)?;
    let data_len = c.u32()?;
    let data = c.take(data_len)?.to_vec();
    if c.at != body.len() {
        return Err(format!(
            "{} unexpected bytes after the record",
            body.len() - c.at
        ));
    }
    Ok(Decoded {
        commit,
        batch_start,
        event: RecordedEvent {
            id: EventId(id),
            stream: StreamName::from_stored(stream),
            event_type: EventType::from_stored(event_type),
            data: EventData::from_stored(content_type, data),
            metadata: Metadata::from_stored(metadata),
            tags,
            source: (!source.is_empty()).then_some(source),
            recorded_at: Timestamp(recorded_at),
            revision: Revision(revision),
            position: Position(position),
        },
    })
}

/// The position of an event body (bytes 4..12), read without decoding; `None` for any other
/// record.
pub fn body_position(body: &[u8]) -> Option<u64> {
    (body.first() == Some(&KIND_EVENT))
        .then(|| u64::from_le_bytes(body[4..12].try_into().expect("checked frames are longer")))
}

/// Whether a version-2 record was written with durability `none` ([`FLAG_UNSYNCED`]).
pub fn body_unsynced(body: &[u8]) -> bool {
    body.get(1).is_some_and(|flags| flags & FLAG_UNSYNCED != 0)
}

/// The group-commit start of a version-2 record (an event or a batch end), read without
/// decoding.
pub fn body_batch_start(body: &[u8]) -> Option<u64> {
    let at = match *body.first()? {
        KIND_EVENT => 44,
        KIND_BATCH_END => 4,
        _ => return None,
    };
    Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ProposedEvent {
        let mut e = ProposedEvent::new(
            EventType::new("OrderPlaced").unwrap(),
            EventData::json(r#"{"total":42}"#).unwrap(),
        );
        e.tags = vec![
            Tag::new("customer:1").unwrap(),
            Tag::new("order:9").unwrap(),
        ];
        e.metadata = Metadata::new(r#"{"correlationId":"c"}"#).unwrap();
        e.source = Some("/shop".to_owned());
        e
    }

    #[test]
    fn a_record_round_trips() {
        let stream = StreamName::new("order-9").unwrap();
        let e = event();
        let mut buf = Vec::new();
        let len = encode_record(
            &mut buf,
            &RecordToWrite {
                position: 12,
                revision: 3,
                recorded_at: Timestamp(1_700_000_000_000_000),
                commit: true,
                unsynced: false,
                batch_start: 4096,
                stream: &stream,
                event: &e,
            },
        );
        assert_eq!(len, buf.len());
        let Frame::Valid { body_len } = check_frame(&buf) else {
            panic!("frame invalid")
        };
        let body = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
        assert_eq!(body_position(body), Some(12));
        assert_eq!(body_batch_start(body), Some(4096));
        let d = decode_body(body, FORMAT_VERSION).unwrap();
        assert!(d.commit);
        assert_eq!(d.batch_start, Some(4096));
        assert_eq!(d.event.position, Position(12));
        assert_eq!(d.event.revision, Revision(3));
        assert_eq!(d.event.stream, stream);
        assert_eq!(e.differs_from(&d.event), None);
    }

    #[test]
    fn a_version_1_record_decodes_without_a_batch_start() {
        let stream = StreamName::new("order-9").unwrap();
        let e = event();
        let mut buf = Vec::new();
        encode_record_version(
            &mut buf,
            &RecordToWrite {
                position: 5,
                revision: 0,
                recorded_at: Timestamp(0),
                commit: true,
                unsynced: false,
                batch_start: 999,
                stream: &stream,
                event: &e,
            },
            FORMAT_V1,
        );
        let Frame::Valid { body_len } = check_frame(&buf) else {
            panic!("frame invalid")
        };
        let body = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
        let d = decode_body(body, FORMAT_V1).unwrap();
        assert_eq!(d.batch_start, None);
        assert_eq!(d.event.position, Position(5));
        assert_eq!(e.differs_from(&d.event), None);
        assert!(
            decode_body(body, FORMAT_VERSION).is_err(),
            "the layouts differ"
        );
    }

    #[test]
    fn a_batch_end_round_trips_and_is_not_an_event() {
        let end = BatchEnd {
            unsynced: true,
            batch_start: 32,
            first_position: 7,
            end_position: 9,
        };
        let mut buf = Vec::new();
        let len = encode_batch_end(&mut buf, &end);
        assert_eq!(len, buf.len());
        let Frame::Valid { body_len } = check_frame(&buf) else {
            panic!("frame invalid")
        };
        let body = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len];
        assert_eq!(decode_record(body, 2), Ok(Record::BatchEnd(end)));
        assert_eq!(body_position(body), None);
        assert_eq!(body_batch_start(body), Some(32));
        assert!(body_unsynced(body));
        assert!(decode_body(body, 2).is_err());
        assert!(
            decode_record(body, 1).is_err(),
            "version 1 has no batch ends"
        );
    }

    #[test]
    fn every_flipped_byte_is_detected_and_every_cut_is_incomplete() {
        let stream = StreamName::new("s").unwrap();
        let e = event();
        let mut buf = Vec::new();
        encode_record(
            &mut buf,
            &RecordToWrite {
                position: 0,
                revision: 0,
                recorded_at: Timestamp(0),
                commit: false,
                unsynced: true,
                batch_start: 32,
                stream: &stream,
                event: &e,
            },
        );
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x20;
            assert!(
                !matches!(check_frame(&bad), Frame::Valid { .. }),
                "byte {i}"
            );
        }
        for cut in 0..buf.len() {
            assert!(
                matches!(check_frame(&buf[..cut]), Frame::Incomplete { .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn segment_headers_are_checked() {
        let h = encode_segment_header(4096);
        assert_eq!(decode_segment_header(&h), Ok((4096, FORMAT_VERSION)));
        let v1 = encode_segment_header_version(4096, FORMAT_V1);
        assert_eq!(decode_segment_header(&v1), Ok((4096, FORMAT_V1)));
        let v3 = encode_segment_header_version(4096, 3);
        assert!(decode_segment_header(&v3).is_err());
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(b"SKALDSEG").is_err());
    }
}
