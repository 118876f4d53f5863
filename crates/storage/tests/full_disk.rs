//! A full disk: appends fail with a clear storage-full error, nothing acknowledged is lost,
//! reads keep working, and appends succeed again once there is room.
//!
//! The disk is a 3 MiB tmpfs mounted for the test, which needs root (CI runs as root; run
//! elsewhere without root, the test says it was skipped).

use std::path::{Path, PathBuf};
use std::process::Command;

use skald_core::*;
use skald_storage::{Options, Store};

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Self(path.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn append(rt: &tokio::runtime::Runtime, store: &Store, n: usize) -> Result<AppendResult, Error> {
    let event = ProposedEvent::new(
        EventType::new("Filled").unwrap(),
        EventData::json(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(1000))).unwrap(),
    );
    rt.block_on(store.append(AppendRequest {
        stream: StreamName::new("disk-1").unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: vec![event],
    }))
}

/// Every event, page after page (pages are bounded by bytes too, so one may not hold all).
fn read_all(rt: &tokio::runtime::Runtime, store: &Store) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    rt.block_on(read_to_end(store, ReadSource::All(None), |e| {
        events.push(e.clone())
    }))
    .unwrap();
    events
}

#[test]
fn a_full_disk_fails_appends_cleanly_and_recovers_when_space_returns() {
    let root = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let _mount = match Mount::tmpfs(root.path(), "3m") {
        Ok(m) => m,
        Err(e) if !is_root && std::env::var_os("CI").is_none() => {
            eprintln!("skipped: mounting a tmpfs needs root ({e})");
            return;
        }
        Err(e) => panic!("cannot mount a tmpfs for the full-disk test: {e}"),
    };
    let filler = root.path().join("filler");
    std::fs::write(&filler, vec![0u8; 512 * 1024]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let options = Options {
        data_dir: root.path().join("data"),
        ..Options::default()
    };
    let (store, _) = Store::open(options.clone()).unwrap();
    assert_eq!(store.readiness(), Ok(()));

    let mut acknowledged = 0u64;
    let error = loop {
        assert!(acknowledged < 10_000, "a 3 MiB disk never filled up");
        match append(&rt, &store, acknowledged as usize) {
            Ok(r) => {
                assert_eq!(r.first_position, Position(acknowledged));
                acknowledged += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(error, Error::StorageFull(_)),
        "expected storage full, got {error}"
    );
    assert!(error.to_string().contains("No space left"), "{error}");
    assert!(acknowledged > 100, "only {acknowledged} appends fit");

    // The readiness check says so, with the reason.
    let not_ready = store.readiness().unwrap_err();
    assert!(not_ready.contains("free on the disk"), "{not_ready}");

    // Still full: still a clear error, and nothing half-written is visible.
    assert!(matches!(append(&rt, &store, 0), Err(Error::StorageFull(_))));
    let events = read_all(&rt, &store);
    assert_eq!(events.len() as u64, acknowledged);
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, e)| e.position.0 == i as u64)
    );

    // Room again: appends continue at the next position.
    std::fs::remove_file(&filler).unwrap();
    let r = append(&rt, &store, 0).expect("appends work again once there is room");
    assert_eq!(r.first_position, Position(acknowledged));
    assert_eq!(store.readiness(), Ok(()));

    rt.block_on(store.shutdown());
    let stopped = store.readiness().unwrap_err();
    assert!(stopped.contains("shutting down"), "{stopped}");
    drop(store);
    let (store, _) = Store::open(options).unwrap();
    assert_eq!(read_all(&rt, &store).len() as u64, acknowledged + 1);
    rt.block_on(store.shutdown());
}
