//! The durability contract of docs/storage.md, one test per defect of issue 23, on the
//! simulated file system (`skald_storage::sim`): crashes that are power losses, failed
//! fdatasyncs, full disks, torn group commits. Each runs without root.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skald_core::*;
use skald_storage::io::Fs;
use skald_storage::sim::{Action, Fault, Op, PageFate, PowerLoss, Restart, SimFs};
use skald_storage::{OpenReport, Options, Store};

const DIR: &str = "/srv/skald";

struct FixedClock;
impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_700_000_000_000_000)
    }
}

fn options() -> Options {
    Options {
        data_dir: PathBuf::from(DIR),
        // No index flush unless a test asks for one: the tail stays unindexed.
        checkpoint_interval: Duration::from_secs(3600),
        ..Options::default()
    }
}

fn open_with(fs: &SimFs, options: Options) -> Result<(Store, OpenReport), Error> {
    Store::open_with(options, Arc::new(FixedClock), Arc::new(fs.clone()))
}

fn open(fs: &SimFs) -> (Store, OpenReport) {
    open_with(fs, options()).expect("the store opens")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An event with a fixed id, so that sending it again is an idempotent retry.
fn event(n: u128, pad: usize) -> ProposedEvent {
    let mut e = ProposedEvent::new(
        EventType::new("Happened").unwrap(),
        EventData::json(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(pad))).unwrap(),
    );
    e.id = EventId(uuid::Uuid::from_u128(n + 1));
    e
}

fn events(from: u128, count: u128, pad: usize) -> Vec<ProposedEvent> {
    (from..from + count).map(|n| event(n, pad)).collect()
}

fn append(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    stream: &str,
    events: &[ProposedEvent],
) -> Result<AppendResult, Error> {
    rt.block_on(store.append(AppendRequest {
        stream: StreamName::new(stream).unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: events.to_vec(),
    }))
}

fn read_all(rt: &tokio::runtime::Runtime, store: &Store) -> Vec<RecordedEvent> {
    rt.block_on(store.read(ReadRequest {
        source: ReadSource::All(None),
        from: None,
        direction: Direction::Forward,
        limit: MAX_READ_PAGE,
    }))
    .expect("reads work")
    .events
}

fn ids(events: &[RecordedEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.id).collect()
}

fn sent_ids(groups: &[&[ProposedEvent]]) -> Vec<EventId> {
    groups.iter().flat_map(|g| g.iter().map(|e| e.id)).collect()
}

fn segment(n: u32) -> PathBuf {
    Path::new(DIR).join("segments").join(format!("{n:010}.seg"))
}

/// Waits for `check` to hold, up to ten seconds.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// D1: the writer died inside the fdatasync of an append (the client got no answer), the
/// process was restarted with the page cache intact, the client's retry was answered
/// `replayed`, and then the power went. The retry's answer promised the events were stored.
#[test]
fn an_append_found_at_open_is_synced_before_a_retry_is_answered_replayed() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    let first = events(0, 1, 50);
    append(&rt, &store, "order-1", &first).unwrap();
    fs.inject(Fault::once(Op::Sync, ".seg", 0, Action::Crash));
    let second = events(1, 2, 50);
    assert!(append(&rt, &store, "order-1", &second).is_err());
    drop(store);

    let fs = fs.restart(Restart::ProcessCrash);
    let (store, _) = open(&fs);
    let retry = append(&rt, &store, "order-1", &second).expect("the retry is answered");
    assert!(retry.replayed, "the events were found at open");
    fs.crash();
    drop(store);

    let fs = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
    let (store, _) = open(&fs);
    assert_eq!(
        ids(&read_all(&rt, &store)),
        sent_ids(&[&first, &second]),
        "an append answered `replayed` survives the power loss"
    );
}

/// D1, fsyncgate: an fdatasync failed, so Linux marked the pages clean without writing them,
/// and the process then died (before it could cut the file back). After a restart the page
/// cache still holds the events; the disk does not. They must not be served or answered as
/// stored.
#[test]
fn events_whose_fdatasync_failed_are_not_served_after_a_restart() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    let first = events(0, 1, 50);
    append(&rt, &store, "order-1", &first).unwrap();
    fs.inject(Fault::once(Op::Sync, ".seg", 0, Action::Fail(libc::EIO)));
    fs.inject(Fault::once(Op::SetLen, ".seg", 0, Action::Crash));
    let second = events(1, 2, 50);
    let error = append(&rt, &store, "order-1", &second).unwrap_err();
    assert!(
        error.to_string().contains("may or may not be stored"),
        "the answer says the outcome is unknown: {error}"
    );
    drop(store);

    let fs = fs.restart(Restart::ProcessCrash);
    let (store, report) = open(&fs);
    assert_eq!(
        ids(&read_all(&rt, &store)),
        sent_ids(&[&first]),
        "only what reached the disk is served ({:?})",
        report.notes
    );
    let again = append(&rt, &store, "order-1", &second).unwrap();
    assert!(!again.replayed, "the retry writes the events anew");
    assert_eq!(again.first_position, Position(1));
    fs.crash();
    drop(store);

    let fs = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
    let (store, _) = open(&fs);
    assert_eq!(ids(&read_all(&rt, &store)), sent_ids(&[&first, &second]));
}

/// After a failed fdatasync the writer refuses appends until a restart (the page cache can no
/// longer be trusted) and says so; reads go on.
#[test]
fn a_failed_fdatasync_stops_appends_until_a_restart_and_reads_go_on() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    let first = events(0, 1, 50);
    append(&rt, &store, "order-1", &first).unwrap();
    fs.inject(Fault::once(Op::Sync, ".seg", 0, Action::Fail(libc::EIO)));
    assert!(matches!(
        append(&rt, &store, "order-1", &events(1, 1, 50)),
        Err(Error::Unavailable(_))
    ));
    let refused = append(&rt, &store, "order-2", &events(2, 1, 50)).unwrap_err();
    assert!(
        refused.to_string().contains("refused until a restart"),
        "{refused}"
    );
    let not_ready = store.readiness().unwrap_err();
    assert!(not_ready.contains("fdatasync"), "{not_ready}");
    assert_eq!(ids(&read_all(&rt, &store)), sent_ids(&[&first]));
}

/// D3: a 40-event group commit was written but its fdatasync never finished; the power loss
/// kept its later pages but not its second one (out-of-order persistence). Nothing of it was
/// acknowledged: the store opens, without it.
#[test]
fn a_hole_in_an_unacknowledged_group_commit_is_cut_as_a_torn_tail() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    let first = events(0, 1, 50);
    append(&rt, &store, "order-1", &first).unwrap();
    fs.inject(Fault::once(Op::Sync, ".seg", 0, Action::Crash));
    let batch = events(1, 40, 200);
    assert!(append(&rt, &store, "order-1", &batch).is_err());
    drop(store);
    let written = fs.contents(&segment(0)).unwrap().len();
    assert!(
        written > 3 * 4096,
        "the batch spans several pages ({written} bytes)"
    );

    let fs = fs.restart(Restart::PowerLoss(PowerLoss::Pages(Box::new(
        |path, page| {
            if path.to_string_lossy().ends_with(".seg") && page == 1 {
                PageFate::Old
            } else {
                PageFate::New
            }
        },
    ))));
    let (store, report) = open_with(&fs, options()).expect("the store opens");
    assert!(
        report.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        report.notes
    );
    assert_eq!(ids(&read_all(&rt, &store)), sent_ids(&[&first]));
    let next = append(&rt, &store, "order-1", &events(100, 1, 10)).unwrap();
    assert_eq!(next.first_position, Position(1));
}

/// D3, the other side: damage inside a group commit that a later one follows is damage to
/// acknowledged data, and is reported, naming the file and offset.
#[test]
fn damage_inside_a_group_commit_that_a_later_one_follows_is_corruption() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    append(&rt, &store, "order-1", &events(0, 40, 200)).unwrap();
    append(&rt, &store, "order-1", &events(40, 1, 10)).unwrap();
    fs.crash();
    drop(store);
    let fs = fs.restart(Restart::ProcessCrash);
    fs.damage(&segment(0), 5000, &[0u8; 64]);

    match open_with(&fs, options()) {
        Err(Error::Corruption { file, offset, .. }) => {
            assert!(file.ends_with("0000000000.seg"), "{file}");
            assert!((4000..5100).contains(&offset), "offset {offset}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("damage to acknowledged data was not reported"),
    }
}

/// D4: the disk is full when the writer starts a new segment. The append is answered
/// storage-full, nothing is left behind, and appends work again once there is room, without a
/// restart.
#[test]
fn a_full_disk_while_starting_a_segment_answers_storage_full_and_leaves_nothing_behind() {
    let rt = rt();
    let fs = SimFs::new();
    let options = Options {
        segment_bytes: 4096,
        ..options()
    };
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    let mut sent = 0u128;
    while fs.contents(&segment(0)).unwrap().len() < 4096 {
        append(&rt, &store, "order-1", &events(sent, 1, 500)).unwrap();
        sent += 1;
    }
    fs.set_capacity(Some(fs.used()));
    for _ in 0..2 {
        let error = append(&rt, &store, "order-1", &events(sent, 1, 500)).unwrap_err();
        assert!(matches!(error, Error::StorageFull(_)), "{error}");
    }
    let names = fs.list_dir(&Path::new(DIR).join("segments")).unwrap();
    assert_eq!(
        names,
        vec!["0000000000.seg".to_owned()],
        "nothing left behind"
    );

    fs.set_capacity(None);
    let result = append(&rt, &store, "order-1", &events(sent, 1, 500)).unwrap();
    assert_eq!(result.first_position, Position(sent as u64));
    rt.block_on(store.shutdown());
    drop(store);
    let (store, _) = open_with(&fs, options).unwrap();
    assert_eq!(read_all(&rt, &store).len() as u128, sent + 1);
}

/// D5: an index flush meets a full disk. redb refuses everything on that handle afterwards,
/// so the store must open it again; once there is room the index catches up, readiness
/// recovers, and nothing needs replaying at the next open.
#[test]
fn an_index_flush_that_meets_a_full_disk_recovers_once_there_is_room() {
    let rt = rt();
    let fs = SimFs::new();
    let options = Options {
        memtable_events: 10,
        ..options()
    };
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    for n in 0..9 {
        append(&rt, &store, "order-1", &events(n, 1, 50)).unwrap();
    }
    // Room for one more page: the next event's, none for the index's new pages.
    fs.set_capacity(Some(fs.used() + 4096));
    append(&rt, &store, "order-1", &events(9, 1, 50)).unwrap();
    eventually("the failed flush shows in readiness", || {
        store
            .readiness()
            .is_err_and(|r| r.contains("the index cannot be written"))
    });
    assert_eq!(read_all(&rt, &store).len(), 10, "reads go on meanwhile");

    fs.set_capacity(None);
    eventually("the index is written again", || store.readiness().is_ok());
    append(&rt, &store, "order-1", &events(10, 1, 50)).unwrap();
    assert_eq!(read_all(&rt, &store).len(), 11);
    rt.block_on(store.shutdown());
    drop(store);
    let (store, report) = open_with(&fs, options).unwrap();
    assert!(
        !report.notes.iter().any(|n| n.contains("indexed")),
        "the index held everything: {:?}",
        report.notes
    );
    assert_eq!(read_all(&rt, &store).len(), 11);
}

/// The data directory and `segments/` are new: their entries must survive a power loss, or
/// acknowledged events vanish with them.
#[test]
fn a_new_data_directory_survives_a_power_loss() {
    let rt = rt();
    let fs = SimFs::new();
    let (store, _) = open(&fs);
    let first = events(0, 2, 10);
    append(&rt, &store, "order-1", &first).unwrap();
    fs.crash();
    drop(store);
    let fs = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
    let (store, _) = open(&fs);
    assert_eq!(ids(&read_all(&rt, &store)), sent_ids(&[&first]));
}

/// An append answered "storage full: nothing of this request was stored" must not come back
/// after a crash, even when another thread's fsync committed the file system's journal (ext4
/// writes the data and size of the failed write then) just before the cut-back.
#[test]
fn an_append_answered_storage_full_does_not_come_back_after_a_power_loss() {
    let rt = rt();
    let first = events(0, 1, 50);
    let second = events(1, 3, 300);
    // The size of the second append's records, measured on a scratch store (same clock, same
    // ids: the same bytes): its batch end is the 36 bytes after them.
    let records = {
        let fs = SimFs::new();
        let (store, _) = open(&fs);
        append(&rt, &store, "order-1", &first).unwrap();
        let before = fs.contents(&segment(0)).unwrap().len();
        append(&rt, &store, "order-1", &second).unwrap();
        fs.contents(&segment(0)).unwrap().len() - before - 36
    };

    let fs = SimFs::new();
    let (store, _) = open(&fs);
    append(&rt, &store, "order-1", &first).unwrap();
    // The disk fills up after the three records, whole, and part of what ends the group commit.
    fs.inject(Fault::once(
        Op::Write,
        ".seg",
        0,
        Action::FailAfter(records + 10, libc::ENOSPC),
    ));
    fs.inject(Fault::once(
        Op::SetLen,
        ".seg",
        0,
        Action::CommitJournalFirst,
    ));
    let error = append(&rt, &store, "order-1", &second).unwrap_err();
    assert!(matches!(error, Error::StorageFull(_)), "{error}");
    fs.crash();
    drop(store);

    let fs = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
    let (store, _) = open(&fs);
    assert_eq!(ids(&read_all(&rt, &store)), sent_ids(&[&first]));
}

/// A crash while a segment is being created, at each step, then a power loss that keeps any
/// part of the unsynced state: the store opens with every acknowledged event.
#[test]
fn a_crash_while_a_segment_is_created_leaves_a_store_that_opens() {
    let rt = rt();
    let steps = [
        Fault::once(Op::Write, ".seg.tmp", 0, Action::TearAndCrash(10)),
        Fault::once(Op::Sync, ".seg.tmp", 0, Action::Crash),
        Fault::once(Op::Namespace, ".seg.tmp", 1, Action::Crash),
        Fault::once(Op::SyncDir, "segments", 0, Action::Crash),
    ];
    for (step, fault) in steps.into_iter().enumerate() {
        for seed in 0..8 {
            let fs = SimFs::new();
            let options = Options {
                segment_bytes: 2048,
                ..options()
            };
            let (store, _) = open_with(&fs, options.clone()).unwrap();
            let mut acknowledged = Vec::new();
            while fs.contents(&segment(0)).unwrap().len() < 2048 {
                let e = events(acknowledged.len() as u128, 1, 300);
                append(&rt, &store, "order-1", &e).unwrap();
                acknowledged.extend(e);
            }
            fs.inject(fault.clone());
            let e = events(1000, 1, 300);
            assert!(
                append(&rt, &store, "order-1", &e).is_err(),
                "step {step}: the roll crashed"
            );
            drop(store);
            let fs = fs.restart(Restart::PowerLoss(PowerLoss::Random(seed)));
            let (store, report) =
                open_with(&fs, options).unwrap_or_else(|e| panic!("step {step}, seed {seed}: {e}"));
            let found = read_all(&rt, &store);
            let acknowledged: Vec<EventId> = acknowledged.iter().map(|e| e.id).collect();
            assert_eq!(
                ids(&found),
                acknowledged,
                "step {step}, seed {seed}: {:?}",
                report.notes
            );
            append(&rt, &store, "order-1", &events(2000, 1, 300))
                .unwrap_or_else(|e| panic!("step {step}, seed {seed}: {e}"));
        }
    }
}

/// Found by the seeded simulation (seed 6): the index covers the log up to the end of a
/// segment, and the first write to the next segment is torn by a crash. The torn record is the
/// first past the index's end: the tail scan cuts it; it is not corruption.
#[test]
fn a_torn_first_record_just_past_the_index_end_is_cut() {
    let rt = rt();
    let fs = SimFs::new();
    let options = Options {
        segment_bytes: 2048,
        ..options()
    };
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    let mut acknowledged = Vec::new();
    while fs.contents(&segment(0)).unwrap().len() < 2048 {
        let e = events(acknowledged.len() as u128, 1, 300);
        append(&rt, &store, "order-1", &e).unwrap();
        acknowledged.extend(e);
    }
    rt.block_on(store.shutdown());
    drop(store);
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    // The first write is the new segment's header; the second, its first batch, is torn.
    fs.inject(Fault::once(Op::Write, ".seg", 1, Action::TearAndCrash(100)));
    assert!(append(&rt, &store, "order-1", &events(500, 1, 300)).is_err());
    drop(store);

    let fs = fs.restart(Restart::ProcessCrash);
    let (store, report) = open_with(&fs, options).expect("the store opens");
    assert!(
        report.notes.iter().any(|n| n.contains("torn tail")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        ids(&read_all(&rt, &store)),
        acknowledged.iter().map(|e| e.id).collect::<Vec<_>>()
    );
}

/// With durability `none` nothing waits for the disk, so after a power loss an earlier group
/// commit may be missing while a later one is there, and a segment may be cut short under the
/// next one. The store loses recent appends (what `none` means) but always opens, and what it
/// keeps is a prefix of what was acknowledged.
#[test]
fn with_durability_none_a_power_loss_loses_a_suffix_and_the_store_opens() {
    let rt = rt();
    for seed in 0..24 {
        let fs = SimFs::new();
        let options = Options {
            durability: Durability::None,
            segment_bytes: 4096,
            memtable_events: 8,
            ..options()
        };
        let (store, _) = open_with(&fs, options.clone()).unwrap();
        let mut acknowledged = Vec::new();
        for n in 0..60u128 {
            let e = events(n, 1, 200);
            append(&rt, &store, "order-1", &e).unwrap();
            acknowledged.extend(e);
        }
        fs.crash();
        drop(store);
        let policy = if seed % 3 == 0 {
            PowerLoss::KeepNothing
        } else {
            PowerLoss::Random(seed)
        };
        let fs = fs.restart(Restart::PowerLoss(policy));
        let (store, report) = open_with(&fs, options)
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not open: {e}"));
        let kept = ids(&read_all(&rt, &store));
        let sent: Vec<EventId> = acknowledged.iter().map(|e| e.id).collect();
        assert_eq!(
            kept[..],
            sent[..kept.len()],
            "seed {seed}: not a prefix ({:?})",
            report.notes
        );
    }
}

/// After a failed fdatasync of `index.redb` the page cache may hold index pages the disk never
/// got: the index must not be opened again in this process. The store says so, leaves the
/// rebuild marker, and the restart rebuilds the index: nothing acknowledged is lost, even to
/// a power loss.
#[test]
fn a_failed_fdatasync_of_the_index_condemns_it_until_a_restart() {
    let rt = rt();
    let fs = SimFs::new();
    let options = Options {
        memtable_events: 4,
        ..options()
    };
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    fs.inject(Fault::once(
        Op::Sync,
        "index.redb",
        0,
        Action::Fail(libc::EIO),
    ));
    let mut acknowledged = Vec::new();
    for n in 0..8u128 {
        let e = events(n, 1, 50);
        append(&rt, &store, "order-1", &e).unwrap();
        acknowledged.extend(e);
    }
    eventually("the failed flush shows in readiness", || {
        store.readiness().is_err_and(|r| r.contains("restart"))
    });
    assert!(
        fs.exists(&Path::new(DIR).join("index.rebuild")).unwrap(),
        "the rebuild marker is left"
    );
    fs.crash();
    drop(store);

    let fs = fs.restart(Restart::PowerLoss(PowerLoss::KeepNothing));
    let (store, report) = open_with(&fs, options).unwrap();
    assert!(
        report.notes.iter().any(|n| n.contains("rebuil")),
        "{:?}",
        report.notes
    );
    assert_eq!(
        ids(&read_all(&rt, &store)),
        acknowledged.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    assert_eq!(store.readiness(), Ok(()));
}

/// The disk looks fine but a write of the index fails with ENOSPC (it filled between the check
/// and the commit): redb refuses everything on that handle afterwards, so the store opens it
/// again; reads go on, and the flush succeeds on the retry.
#[test]
fn an_index_write_that_meets_enospc_is_retried_on_a_fresh_handle() {
    let rt = rt();
    let fs = SimFs::new();
    let options = Options {
        memtable_events: 4,
        ..options()
    };
    let (store, _) = open_with(&fs, options.clone()).unwrap();
    fs.inject(Fault::once(
        Op::Write,
        "index.redb",
        0,
        Action::Fail(libc::ENOSPC),
    ));
    for n in 0..12 {
        append(&rt, &store, "order-1", &events(n, 1, 50)).unwrap();
        assert_eq!(read_all(&rt, &store).len() as u128, n + 1, "reads go on");
    }
    eventually("a flush met the full disk", || fs.faults_fired() == 1);
    eventually("the index is written again", || store.readiness().is_ok());
    rt.block_on(store.shutdown());
    drop(store);
    let (store, report) = open_with(&fs, options).unwrap();
    assert!(
        !report.notes.iter().any(|n| n.contains("indexed")),
        "the index held everything: {:?}",
        report.notes
    );
    assert_eq!(read_all(&rt, &store).len(), 12);
}
