//! The model-based test of the embedded engine (`support/model_run.rs` has the operations and
//! the comparison; the PostgreSQL backend runs the same), with tiny segments and memtables so
//! that sequences cross segment boundaries and reads merge redb with memtables.

use std::sync::Arc;

use proptest::prelude::*;
use skald_core::*;
use skald_storage::{Options, Store};

mod support;
use support::FixedClock;
use support::model_run::{Backend, Harness, op};

struct Embedded {
    dir: tempfile::TempDir,
}

impl Backend for Embedded {
    type Store = Store;

    fn open(&mut self, _runtime: &tokio::runtime::Runtime) -> Store {
        let options = Options {
            data_dir: self.dir.path().to_path_buf(),
            durability: Durability::None,
            // Tiny segments, so that sequences cross segment boundaries.
            segment_bytes: 2048,
            // Tiny memtables, so that reads merge redb with frozen and active memtables while
            // the flusher runs.
            memtable_events: 3,
            ..Options::default()
        };
        Store::open_with_clock(options, Arc::new(FixedClock))
            .unwrap()
            .0
    }

    fn close(&mut self, runtime: &tokio::runtime::Runtime, store: Store) {
        runtime.block_on(store.shutdown());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let backend = Embedded { dir: tempfile::tempdir().unwrap() };
        Harness::new(runtime, backend).run(&ops);
    }
}
