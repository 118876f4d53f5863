//! Damaged files: a torn or corrupt tail is cut back to the last whole append on open; damage
//! anywhere else is reported as corruption naming the file and offset, never skipped.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// Frame offsets of every record in a segment, parsed from the lengths.
fn record_offsets(segment: &Path) -> Vec<u64> {
    let bytes = std::fs::read(segment).unwrap();
    let mut at = 32usize;
    let mut out = Vec::new();
    while at + 8 <= bytes.len() {
        out.push(at as u64);
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
