//! Measures the saga engine's start-up memory over a store of finished instances.
//!
//! ```text
//! cargo run -p skald-saga --example startup_memory -- populate DIR COUNT TRIGGER_BYTES
//! cargo run -p skald-saga --example startup_memory -- open DIR
//! ```
//!
//! `populate` registers a one-step definition and writes COUNT completed instances whose
//! trigger carries TRIGGER_BYTES of data; `open` starts the engine over DIR in
//! a fresh process and prints the peak resident memory (VmHWM) and the time it took.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use skald_hub::{Hub, HubOptions};
use skald_saga::{SagaOptions, Sagas, WallClock};
use skald_storage::{Options, Store};

fn usage() -> ! {
    eprintln!("usage: startup_memory populate DIR COUNT TRIGGER_BYTES | open DIR");
    std::process::exit(2)
}

fn resident(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .map(|line| line[field.len()..].trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["populate", dir, count, bytes] => {
            let count: usize = count.parse().unwrap_or_else(|_| usage());
            let bytes: usize = bytes.parse().unwrap_or_else(|_| usage());
            let engine = support::Engine::open(dir.as_ref(), SagaOptions::default()).await;
            engine.sagas.register(support::FINISHED_SAGA).await.unwrap();
            support::write_finished_instances(&engine.store, count, bytes).await;
            engine.stop().await;
            println!("wrote {count} finished instances with {bytes}-byte triggers to {dir}");
        }
        ["open", dir] => {
            let (store, _) = Store::open(Options {
                data_dir: dir.into(),
                ..Options::default()
            })
            .unwrap();
            let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
            let before = resident("VmRSS:");
            let started = Instant::now();
            let sagas = Sagas::start(hub.clone(), SagaOptions::default(), Arc::new(WallClock))
                .await
                .unwrap();
            let took = started.elapsed();
            let loaded: u64 = sagas.state_counts().values().sum();
            println!(
                "loaded {loaded} instances in {:.2} s; VmRSS before {before}, after {}; VmHWM {}",
                took.as_secs_f64(),
                resident("VmRSS:"),
                resident("VmHWM:")
            );
            hub.shutdown();
            sagas.stopped(Duration::from_secs(5)).await;
            hub.stopped().await;
            store.shutdown().await;
        }
        _ => usage(),
    }
}
