//! Damaged files: a torn or corrupt tail is cut back to the last whole append on open; damage
//! anywhere else is reported as corruption naming the file and offset, never skipped.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use redb::ReadableTable;
use skald_core::*;
use skald_storage::{Options, Store};

fn options(dir: &Path) -> Options {
    Options {
        data_dir: dir.to_path_buf(),
        ..Options::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn event(n: usize) -> ProposedEvent {
    ProposedEvent::new(
        EventType::new("Happened").unwrap(),
        EventData::json(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(100))).unwrap(),
    )
}

/// Writes `appends` appends of `per_append` events each to one stream and closes cleanly.
/// Returns the first segment's path.
fn write_log(dir: &Path, appends: usize, per_append: usize) -> PathBuf {
    write_log_with(options(dir), appends, per_append)
}

fn write_log_with(options: Options, appends: usize, per_append: usize) -> PathBuf {
    let dir = options.data_dir.clone();
    let rt = rt();
    let (store, _) = Store::open(options).unwrap();
    let stream = StreamName::new("s-1").unwrap();
    for a in 0..appends {
        let events = (0..per_append).map(|i| event(a * per_append + i)).collect();
        rt.block_on(store.append(AppendRequest {
            stream: stream.clone(),
            expected: ExpectedRevision::Any,
            condition: None,
            events,
        }))
        .unwrap();
    }
    rt.block_on(store.shutdown());
    dir.join("segments").join("0000000000.seg")
}

/// Frame offsets of every event record in a segment, parsed from the lengths (batch ends,
/// record kind 2, are stepped over: they hold no event).
fn record_offsets(segment: &Path) -> Vec<u64> {
    let bytes = std::fs::read(segment).unwrap();
    let mut at = 32usize;
    let mut out = Vec::new();
    while at + 8 <= bytes.len() {
        if bytes[at + 8] == 1 {
            out.push(at as u64);
        }
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    out
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// Simulates a crash before the index caught up: the whole log becomes the tail to check.
fn drop_index(dir: &Path) {
    std::fs::remove_file(dir.join("index.redb")).unwrap();
}

/// The last revision of the test stream `s-1`.
fn head_revision(store: &Store) -> Option<Revision> {
    let head = rt().block_on(store.stream_head(&StreamName::new("s-1").unwrap()));
    head.unwrap().map(|h| h.revision)
}

fn read_all(store: &Store) -> Result<Vec<RecordedEvent>, Error> {
    rt().block_on(store.read(ReadRequest {
        source: ReadSource::All(None),
        from: None,
        direction: Direction::Forward,
        limit: MAX_READ_PAGE,
    }))
    .map(|p| p.events)
}

#[test]
fn a_flipped_byte_in_the_last_record_is_cut_back_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 5, 1);
    let offsets = record_offsets(&segment);
    flip_byte(&segment, offsets[4] + 40);
    drop_index(dir.path());

    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        report.notes
    );
    let events = read_all(&store).unwrap();
    assert_eq!(
        events.len(),
        4,
        "the damaged last append is dropped, the rest kept"
    );
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), offsets[4]);
    // The store takes new appends at the next position.
    let result = rt()
        .block_on(store.append(AppendRequest {
            stream: StreamName::new("s-1").unwrap(),
            expected: ExpectedRevision::Exact(Revision(3)),
            condition: None,
            events: vec![event(99)],
        }))
        .unwrap();
    assert_eq!(result.first_position, Position(4));
}

#[test]
fn a_torn_multi_event_append_is_dropped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 2, 3);
    let offsets = record_offsets(&segment);
    // Cut in the middle of the second append's second record: its first record is whole but
    // has no commit mark, so the append must vanish entirely.
    let f = OpenOptions::new().write(true).open(&segment).unwrap();
    f.set_len(offsets[4] + 10).unwrap();
    drop_index(dir.path());

    let (store, _) = Store::open(options(dir.path())).unwrap();
    let events = read_all(&store).unwrap();
    assert_eq!(
        events.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), offsets[3]);
}

#[test]
fn a_flipped_byte_in_an_earlier_record_fails_open_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 5, 1);
    let offsets = record_offsets(&segment);
    flip_byte(&segment, offsets[1] + 50);
    drop_index(dir.path());
    let before = std::fs::read(&segment).unwrap();

    let err = Store::open(options(dir.path()))
        .err()
        .expect("open must fail");
    match err {
        Error::Corruption { file, offset, .. } => {
            assert!(file.ends_with("0000000000.seg"), "{file}");
            assert_eq!(offset, offsets[1]);
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        before,
        "nothing was cut or rewritten"
    );
}

#[test]
fn damage_behind_the_index_is_reported_when_read() {
    let dir = tempfile::tempdir().unwrap();
    // Enough events that the damage lies behind the last sparse index entry, which open does
    // not re-read.
    let segment = write_log(dir.path(), 25, 100);
    let offsets = record_offsets(&segment);
    flip_byte(&segment, offsets[2] + 60);

    let (store, _) = Store::open(options(dir.path())).unwrap();
    match read_all(&store) {
        Err(Error::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert!(file.ends_with("0000000000.seg"), "{file}");
            assert_eq!(offset, offsets[2]);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Reads that do not touch the damaged record still work.
    assert_eq!(head_revision(&store), Some(Revision(2499)));
}

#[test]
fn damage_near_the_index_end_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 5, 1);
    let offsets = record_offsets(&segment);
    flip_byte(&segment, offsets[2] + 60);
    match Store::open(options(dir.path())) {
        Err(Error::Corruption { offset, .. }) => assert_eq!(offset, offsets[2]),
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("open must report the damaged record"),
    }
    assert!(
        dir.path().join("index.redb").exists(),
        "the index is not thrown away"
    );
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = Store::open(options(dir.path())).unwrap();
    match Store::open(options(dir.path())) {
        Err(Error::Unavailable(message)) => assert!(message.contains("in use"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a second open of the same directory must fail"),
    }
}

#[test]
fn a_deleted_index_is_rebuilt_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 20, 3);
    drop_index(dir.path());
    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("indexed 60")),
        "{:?}",
        report.notes
    );
    let page = rt()
        .block_on(store.read(ReadRequest {
            source: ReadSource::Stream(StreamName::new("s-1").unwrap()),
            from: Some(57),
            direction: Direction::Forward,
            limit: 10,
        }))
        .unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.revision.0).collect::<Vec<_>>(),
        vec![57, 58, 59]
    );
}

#[test]
fn a_garbage_index_file_is_rebuilt_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, 2);
    std::fs::write(
        dir.path().join("index.redb"),
        b"this is not a redb file at all",
    )
    .unwrap();
    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuilding")),
        "{:?}",
        report.notes
    );
    assert_eq!(read_all(&store).unwrap().len(), 20);
    assert_eq!(head_revision(&store), Some(Revision(19)));
}

#[test]
fn a_missing_segment_fails_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let small = Options {
        segment_bytes: 4096,
        ..options(dir.path())
    };
    write_log_with(small.clone(), 60, 1);
    let segments = dir.path().join("segments");
    assert!(
        segments.join("0000000002.seg").exists(),
        "the log spans several segments"
    );
    std::fs::remove_file(segments.join("0000000001.seg")).unwrap();
    match Store::open(small) {
        Err(Error::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("0000000002.seg"), "{file}");
            assert!(reason.contains("segment 1 is missing"), "{reason}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("open must fail when a segment is missing"),
    }
}

#[test]
fn a_damaged_segment_header_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 3, 1);
    flip_byte(&segment, 3);
    match Store::open(options(dir.path())) {
        Err(Error::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert!(file.ends_with("0000000000.seg"), "{file}");
            assert_eq!(offset, 0);
            assert!(reason.contains("magic"), "{reason}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("open must fail on a damaged segment header"),
    }
}

/// Writes 1,000 events to other streams, then three to `order-1` (revisions 0 to 2 at
/// positions 1,000 to 1,002), and closes cleanly: the index holds all of it.
fn write_order_log(dir: &Path) {
    let rt = rt();
    let (store, _) = Store::open(options(dir)).unwrap();
    for chunk in 0..10 {
        let events = (0..100).map(|i| event(chunk * 100 + i)).collect();
        rt.block_on(store.append(AppendRequest {
            stream: StreamName::new(format!("other-{chunk}")).unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events,
        }))
        .unwrap();
    }
    for n in 0..3 {
        rt.block_on(store.append(AppendRequest {
            stream: StreamName::new("order-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event(5000 + n)],
        }))
        .unwrap();
    }
    rt.block_on(store.shutdown());
}

fn append_order(store: &Store, expected: u64) -> Result<AppendResult, Error> {
    rt().block_on(store.append(AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::Exact(Revision(expected)),
        condition: None,
        events: vec![event(9000 + expected as usize)],
    }))
}

/// The offsets of `needle` in `haystack`.
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// D2: one byte of `index.redb` changed so that `order-1` seems to end at revision 1. The
/// integrity check at open finds it and the index is rebuilt, so an append expecting revision
/// 1 is refused with the true revision.
#[test]
fn a_changed_byte_in_the_index_is_found_at_open_and_the_index_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    let index = dir.path().join("index.redb");
    let mut bytes = std::fs::read(&index).unwrap();
    let value = [2u64.to_le_bytes(), 1002u64.to_le_bytes()].concat();
    let found = find_all(&bytes, &value);
    assert_eq!(found.len(), 1, "the streams table's value for order-1");
    bytes[found[0]] = 1;
    std::fs::write(&index, &bytes).unwrap();

    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuilding")),
        "{:?}",
        report.notes
    );
    match append_order(&store, 1) {
        Err(Error::WrongExpectedRevision { actual, .. }) => assert_eq!(actual, Some(Revision(2))),
        other => panic!("expected a conflict at revision 2, got {other:?}"),
    }
    assert_eq!(append_order(&store, 2).unwrap().first_revision, Revision(3));
}

/// D2: an index that passes redb's checks but disagrees with the log (written through redb:
/// `order-1` ends at revision 1). The writer checks the index against the stream's last record
/// before deciding: it refuses the append (and every append) instead of writing a second
/// revision 2, and the next open rebuilds the index.
#[test]
fn an_index_that_disagrees_with_the_log_refuses_appends_and_is_rebuilt_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    {
        let db = redb::Database::create(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let streams: redb::TableDefinition<&str, (u64, u64)> =
                redb::TableDefinition::new("streams");
            let mut table = txn.open_table(streams).unwrap();
            table.insert("order-1", (1u64, 1002u64)).unwrap();
        }
        txn.commit().unwrap();
    }

    let (store, _) = Store::open(options(dir.path())).unwrap();
    match append_order(&store, 1) {
        Err(Error::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("index.redb"), "{file}");
            assert!(reason.contains("order-1"), "{reason}");
        }
        other => panic!("expected the index to be found damaged, got {other:?}"),
    }
    let refused = rt()
        .block_on(store.append(AppendRequest {
            stream: StreamName::new("other-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event(7000)],
        }))
        .unwrap_err();
    assert!(
        refused.to_string().contains("rebuilds the index"),
        "{refused}"
    );
    assert!(store.readiness().unwrap_err().contains("index"));
    assert_eq!(read_all(&store).unwrap().len(), 1003, "reads go on");
    rt().block_on(store.shutdown());
    drop(store);

    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuilt")),
        "{:?}",
        report.notes
    );
    match append_order(&store, 1) {
        Err(Error::WrongExpectedRevision { actual, .. }) => assert_eq!(actual, Some(Revision(2))),
        other => panic!("expected a conflict at revision 2, got {other:?}"),
    }
    assert_eq!(append_order(&store, 2).unwrap().first_revision, Revision(3));
}

/// D2: damage anywhere in `index.redb`, page by page, never stops the store from opening and
/// never changes what it serves (redb may panic on a damaged file; the store rebuilds instead).
#[test]
fn damage_to_any_page_of_the_index_leaves_a_store_that_opens_whole() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    let expected = read_all(&Store::open(options(dir.path())).unwrap().0).unwrap();
    let pristine = std::fs::read(dir.path().join("index.redb")).unwrap();
    let pages = pristine.len().div_ceil(4096);
    assert!(pages >= 10, "{pages} pages");
    for page in 0..pages {
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("segments")).unwrap();
        std::fs::copy(
            dir.path().join("segments/0000000000.seg"),
            copy.path().join("segments/0000000000.seg"),
        )
        .unwrap();
        let mut damaged = pristine.clone();
        let start = page * 4096 + 512;
        for b in damaged.iter_mut().skip(start).take(256) {
            *b ^= 0xA5;
        }
        std::fs::write(copy.path().join("index.redb"), &damaged).unwrap();
        let (store, report) = Store::open(options(copy.path()))
            .unwrap_or_else(|e| panic!("page {page}: the store does not open: {e}"));
        let events = read_all(&store).unwrap_or_else(|e| panic!("page {page}: {e} {report:?}"));
        assert_eq!(events, expected, "page {page}: {:?}", report.notes);
        assert_eq!(
            head_revision_of(&store, "order-1"),
            Some(Revision(2)),
            "page {page}"
        );
    }
}

fn head_revision_of(store: &Store, stream: &str) -> Option<Revision> {
    let head = rt().block_on(store.stream_head(&StreamName::new(stream).unwrap()));
    head.unwrap().map(|h| h.revision)
}

/// D2: a log whose revisions of one stream skip (a record edited with a valid checksum) is
/// corruption, reported when the index is rebuilt, naming the file and the record's offset.
#[test]
fn a_log_whose_revisions_skip_is_corruption_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 3, 1);
    let offsets = record_offsets(&segment);
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = offsets[1] as usize;
    let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    // The body's revision (bytes 12..20) from 1 to 5, and its checksum made valid again.
    bytes[at + 8 + 12..at + 8 + 20].copy_from_slice(&5u64.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[at + 8..at + 8 + len]);
    bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();
    drop_index(dir.path());

    match Store::open(options(dir.path())) {
        Err(Error::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert!(file.ends_with("0000000000.seg"), "{file}");
            assert_eq!(offset, offsets[1]);
            assert!(reason.contains("revision 5"), "{reason}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("a revision gap was accepted"),
    }
}

/// A segment a crash left with a header of zeros (and nothing else), as stores made before
/// segments were created under another name could: removed at open, not called corruption.
#[test]
fn a_last_segment_holding_only_a_header_of_zeros_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let segment = write_log(dir.path(), 3, 1);
    std::fs::write(segment.with_file_name("0000000001.seg"), [0u8; 32]).unwrap();
    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("removed")),
        "{:?}",
        report.notes
    );
    assert_eq!(read_all(&store).unwrap().len(), 3);
    assert_eq!(head_revision(&store), Some(Revision(2)));
}

/// An index entry that points at another record (written through redb, so redb's checks pass):
/// a read refuses to serve the wrong event, readiness says the index is damaged, and the next
/// start rebuilds it.
#[test]
fn a_read_through_an_index_entry_that_points_elsewhere_is_refused_and_the_index_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    {
        let db = redb::Database::create(dir.path().join("index.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let stream_events: redb::TableDefinition<(&str, u64), u64> =
                redb::TableDefinition::new("stream_events");
            let mut table = txn.open_table(stream_events).unwrap();
            let first = table.get(("order-1", 0)).unwrap().unwrap().value();
            table.insert(("order-1", 1), first).unwrap();
        }
        txn.commit().unwrap();
    }

    let (store, _) = Store::open(options(dir.path())).unwrap();
    let read = rt().block_on(store.read(ReadRequest {
        source: ReadSource::Stream(StreamName::new("order-1").unwrap()),
        from: None,
        direction: Direction::Forward,
        limit: 10,
    }));
    match read {
        Err(Error::Corruption { file, reason, .. }) => {
            assert_eq!(file, "index.redb");
            assert!(reason.contains("revision 1 of stream order-1"), "{reason}");
        }
        other => panic!("expected the damaged index to be refused, got {other:?}"),
    }
    let not_ready = store.readiness().unwrap_err();
    assert!(not_ready.contains("index is damaged"), "{not_ready}");
    rt().block_on(store.shutdown());
    drop(store);

    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuilt")),
        "{:?}",
        report.notes
    );
    let events = rt()
        .block_on(store.read(ReadRequest {
            source: ReadSource::Stream(StreamName::new("order-1").unwrap()),
            from: None,
            direction: Direction::Forward,
            limit: 10,
        }))
        .unwrap()
        .events;
    let revisions: Vec<u64> = events.iter().map(|e| e.revision.0).collect();
    assert_eq!(revisions, vec![0, 1, 2]);
    assert_eq!(store.readiness(), Ok(()));
}

/// With the check at open turned off, the changed byte of
/// `a_changed_byte_in_the_index_is_found_at_open_and_the_index_rebuilt` is still caught before
/// it decides anything: the writer checks the index against the log.
#[test]
fn with_the_check_at_open_off_a_changed_byte_is_caught_before_an_append_is_decided() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    let index = dir.path().join("index.redb");
    let mut bytes = std::fs::read(&index).unwrap();
    let value = [2u64.to_le_bytes(), 1002u64.to_le_bytes()].concat();
    let found = find_all(&bytes, &value);
    assert_eq!(found.len(), 1, "the streams table's value for order-1");
    bytes[found[0]] = 1;
    std::fs::write(&index, &bytes).unwrap();

    let (store, report) = Store::open(Options {
        verify_index_on_open: false,
        ..options(dir.path())
    })
    .unwrap();
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    match append_order(&store, 1) {
        Err(Error::Corruption { file, .. }) => assert!(file.ends_with("index.redb"), "{file}"),
        other => panic!("expected the index to be found damaged, got {other:?}"),
    }
}

/// Runs `damage` on the index of a closed store (through redb, so its checks pass).
fn damage_index(dir: &Path, damage: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::create(dir.join("index.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    damage(&txn);
    txn.commit().unwrap();
}

/// A `streams` table that lost a stream: redb says it has no events, so an append expecting
/// no stream would write revision 0 a second time. The writer finds revision 0 in the index
/// and refuses; the restart rebuilds.
#[test]
fn a_stream_missing_from_the_index_is_not_taken_for_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    damage_index(dir.path(), |txn| {
        let streams: redb::TableDefinition<&str, (u64, u64)> =
            redb::TableDefinition::new("streams");
        txn.open_table(streams).unwrap().remove("order-1").unwrap();
    });
    let (store, _) = Store::open(options(dir.path())).unwrap();
    let created = rt().block_on(store.append(AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::NoStream,
        condition: None,
        events: vec![event(8000)],
    }));
    match created {
        Err(Error::Corruption { file, reason, .. }) => {
            assert!(file.ends_with("index.redb"), "{file}");
            assert!(reason.contains("revision 0"), "{reason}");
        }
        other => panic!("expected the index to be found damaged, got {other:?}"),
    }
    rt().block_on(store.shutdown());
    drop(store);
    let (store, _) = Store::open(options(dir.path())).unwrap();
    assert_eq!(head_revision_of(&store, "order-1"), Some(Revision(2)));
}

/// An index entry that points into the middle of a record: the read cannot find an event
/// there, and the damage is the index's (the rebuild will read every segment and report
/// damage in them as what it is).
#[test]
fn an_index_entry_pointing_into_a_record_is_index_damage() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    damage_index(dir.path(), |txn| {
        let stream_events: redb::TableDefinition<(&str, u64), u64> =
            redb::TableDefinition::new("stream_events");
        let mut table = txn.open_table(stream_events).unwrap();
        let address = table.get(("order-1", 1)).unwrap().unwrap().value();
        table.insert(("order-1", 1), address + 3).unwrap();
    });
    let (store, _) = Store::open(options(dir.path())).unwrap();
    let read = rt().block_on(store.read(ReadRequest {
        source: ReadSource::Stream(StreamName::new("order-1").unwrap()),
        from: None,
        direction: Direction::Forward,
        limit: 10,
    }));
    match read {
        Err(Error::Corruption { file, .. }) => assert_eq!(file, "index.redb"),
        other => panic!("expected index damage, got {other:?}"),
    }
    assert!(dir.path().join("index.rebuild").exists());
}

/// An id entry that points at another event: an append resending that id must not be judged
/// on the wrong record. Appends stop until the restart rebuilds the index.
#[test]
fn an_id_entry_pointing_at_another_event_stops_appends_until_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    write_order_log(dir.path());
    let (store, _) = Store::open(options(dir.path())).unwrap();
    let last = rt()
        .block_on(store.read(ReadRequest {
            source: ReadSource::Stream(StreamName::new("order-1").unwrap()),
            from: None,
            direction: Direction::Forward,
            limit: 10,
        }))
        .unwrap()
        .events;
    rt().block_on(store.shutdown());
    drop(store);
    let (first_id, second) = (last[0].id, last[1].clone());
    damage_index(dir.path(), |txn| {
        let ids: redb::TableDefinition<&[u8; 16], (u64, u64)> = redb::TableDefinition::new("ids");
        let mut table = txn.open_table(ids).unwrap();
        let other = table.get(second.id.0.as_bytes()).unwrap().unwrap().value();
        table.insert(first_id.0.as_bytes(), other).unwrap();
    });

    let (store, _) = Store::open(options(dir.path())).unwrap();
    let mut resent = event(5000);
    resent.id = first_id;
    let retried = rt().block_on(store.append(AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: vec![resent],
    }));
    assert!(
        matches!(&retried, Err(e @ Error::Corruption { .. }) if e.to_string().contains("index")),
        "{retried:?}"
    );
    let refused = rt()
        .block_on(store.append(AppendRequest {
            stream: StreamName::new("other-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event(7001)],
        }))
        .unwrap_err();
    assert!(
        refused.to_string().contains("refused until a restart"),
        "{refused}"
    );
    rt().block_on(store.shutdown());
    drop(store);
    let (store, report) = Store::open(options(dir.path())).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuilt")),
        "{:?}",
        report.notes
    );
    assert_eq!(head_revision_of(&store, "order-1"), Some(Revision(2)));
}
