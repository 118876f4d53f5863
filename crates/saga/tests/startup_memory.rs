//! Start-up memory is bounded by the instances still running, not by history: finished
//! instances with large triggers and outputs are compacted as soon as their final event is
//! folded, and the fold reads small pages. Measured with a counting allocator (the peak of
//! bytes allocated while the engine starts), not with time.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use skald_hub::{Hub, HubOptions};
use skald_saga::{SagaOptions, SagaState, Sagas, WallClock};
use skald_storage::{Options, Store};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const INSTANCES: usize = 1_000;
const TRIGGER_BYTES: usize = 64 * 1024;

/// Opens the store, waiting for a read of the previous opening that still holds its lock for
/// a moment after shutdown.
async fn open_store(dir: &std::path::Path) -> Store {
    for _ in 0..100 {
        let opened = Store::open(Options {
            data_dir: dir.to_path_buf(),
            durability: skald_core::Durability::None,
            ..Options::default()
        });
        match opened {
            Ok((store, _)) => return store,
            Err(skald_core::Error::Unavailable(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the store stayed locked");
}

#[tokio::test]
async fn finished_instances_with_large_triggers_do_not_grow_startup_memory() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = support::Engine::open(dir.path(), SagaOptions::default()).await;
        engine.sagas.register(support::FINISHED_SAGA).await.unwrap();
        support::write_finished_instances(&engine.store, INSTANCES, TRIGGER_BYTES).await;
        engine.stop().await;
    }
    // 64 MiB of triggers in all.
    let history = INSTANCES * TRIGGER_BYTES;

    let store = open_store(dir.path()).await;
    let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let sagas = Sagas::start(hub.clone(), SagaOptions::default(), Arc::new(WallClock))
        .await
        .unwrap();
    let grew = PEAK.load(Ordering::Relaxed) - before;
    eprintln!("start-up peak allocation: {grew} bytes");

    // What stays once started: the finished instances' summaries, at most `keep_finished`.
    let retained = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!("retained after start-up: {retained} bytes");
    let counts = sagas.state_counts();
    assert_eq!(
        counts.get(&("finished".to_owned(), SagaState::Completed)),
        Some(&(INSTANCES as u64)),
        "every finished instance is loaded: {counts:?}"
    );
    // Before the fix the fold held every trigger and output, and a page of 4,096 events whole:
    // well over the history's size. Now: one page of 64 events (at most 4 MiB of triggers here)
    // and the compact summaries.
    assert!(
        grew < history / 4,
        "start-up allocated a peak of {grew} bytes for {history} bytes of finished history"
    );

    hub.shutdown();
    sagas.stopped(std::time::Duration::from_secs(5)).await;
    hub.stopped().await;
    store.shutdown().await;
    drop((sagas, hub, store));

    // Keeping 10 finished instances in memory instead of all 1,000: what stays shrinks with
    // them, and every instance is still counted.
    let store = open_store(dir.path()).await;
    let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
    let before = LIVE.load(Ordering::Relaxed);
    let options = SagaOptions {
        keep_finished: 10,
        ..SagaOptions::default()
    };
    let sagas = Sagas::start(hub.clone(), options, Arc::new(WallClock))
        .await
        .unwrap();
    let kept = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!("retained with keep_finished = 10: {kept} bytes");
    assert_eq!(
        sagas
            .state_counts()
            .get(&("finished".to_owned(), SagaState::Completed)),
        Some(&(INSTANCES as u64))
    );
    assert!(
        kept * 4 < retained,
        "keeping 10 finished instances retained {kept} bytes, all 1,000 {retained}"
    );
    hub.shutdown();
    sagas.stopped(std::time::Duration::from_secs(5)).await;
    hub.stopped().await;
    store.shutdown().await;
}
