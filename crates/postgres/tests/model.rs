//! The model-based test of the embedded engine, run unchanged against the PostgreSQL backend:
//! the same random operations (`crates/storage/tests/support/model_run.rs`), each case on a
//! database of its own in one throwaway PostgreSQL 15, a stop and start of the node for
//! `Reopen`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::test_runner::{Config, TestRunner};
use skald_core::Durability;
use skald_postgres::{PgOptions, PgStore, PgUrl};

#[path = "../../storage/tests/support/mod.rs"]
mod model;
mod support;

use model::FixedClock;
use model::model_run::{Backend, Harness, op};
use support::Cluster;

struct Postgres {
    url: PgUrl,
}

impl Backend for Postgres {
    type Store = PgStore;

    fn open(&mut self, runtime: &tokio::runtime::Runtime) -> PgStore {
        let mut options = PgOptions::new(self.url.clone());
        options.durability = Durability::None;
        options.readers = 2;
        runtime
            .block_on(PgStore::open_with_clock(options, Arc::new(FixedClock)))
            .unwrap()
    }

    fn close(&mut self, runtime: &tokio::runtime::Runtime, store: PgStore) {
        runtime.block_on(store.shutdown());
    }
}

#[test]
fn the_postgres_store_behaves_like_the_model() {
    let cluster = Cluster::start();
    let databases = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        max_shrink_iters: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let name = format!("model{}", databases.fetch_add(1, Ordering::Relaxed));
        let url = runtime.block_on(cluster.database(&name));
        let backend = Postgres { url };
        Harness::new(runtime, backend).run(&ops);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
