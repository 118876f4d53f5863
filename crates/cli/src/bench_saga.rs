//! `skald bench saga --embedded`: the saga engine in this process against a target HTTP
//! service in this process, both on this machine. A 3-step saga (reserve, charge, ship) runs
//! `--sagas` times on the success path, then `--sagas` times on the compensation path (ship
//! answers 400; charge and reserve are compensated). Reports completed sagas per second and
//! the latency from the trigger's append to the saga's final event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::http::{StatusCode, Uri};
use hdrhistogram::Histogram;
use serde::Serialize;
use skald_core::{
    AppendRequest, Category, EventData, EventStore, EventType, ExpectedRevision, ProposedEvent,
    ReadSource, StreamName,
};
use skald_hub::{Delivery, Hub, Start};
use skald_saga::{SagaOptions, Sagas};
use skald_storage::Store;

use crate::bench::{BenchArgs, Latency, Target, open_target, print_latency};

/// The longest a path may take before the run is called failed.
const PATH_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Serialize)]
struct PathReport {
    path: &'static str,
    sagas: usize,
    seconds: f64,
    sagas_per_sec: f64,
    http_calls: usize,
    latency: Latency,
}

#[derive(Serialize)]
struct SagaReport {
    workload: &'static str,
    durability: String,
    writers: usize,
    /// Triggers per second asked for; 0 for as fast as possible.
    rate: u64,
    success: PathReport,
    compensation: PathReport,
}

fn definition(name: &str, trigger: &str, base: &str, ship: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
trigger: {{category: benchorder, types: [{trigger}]}}
correlationKey: /data/orderId
steps:
  - name: reserve
    action: {{http: {{method: POST, url: "{base}/reserve", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/unreserve"}}}}
  - name: charge
    action: {{http: {{method: POST, url: "{base}/charge", body: {{amount: 42}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/refund"}}}}
  - name: ship
    pivot: true
    action: {{http: {{method: POST, url: "{base}{ship}"}}}}
"#
    )
}

/// The target service: every path answers 200 with a small JSON body except `/fail` (400).
async fn start_target(calls: Arc<AtomicUsize>) -> anyhow::Result<String> {
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            if uri.path() == "/fail" {
                (StatusCode::BAD_REQUEST, "{\"error\":\"no carrier\"}")
            } else {
                (StatusCode::OK, "{\"ok\":true}")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the bench target service failed: {e}");
        }
    });
    Ok(base)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !args.embedded {
        bail!(
            "bench saga runs the engine in this process (--embedded), with its target service \
             beside it"
        );
    }
    if args.sagas == 0 {
        bail!("--sagas must be at least 1");
    }
    let Target::Embedded(store, _dir) = open_target(args).await? else {
        unreachable!("--embedded opens an embedded store");
    };
    let durability = store.info().await?.durability.to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let base = start_target(Arc::clone(&calls)).await?;
    let hub = Hub::start(Arc::new(store.clone()), Default::default());
    // The bench's own target listens on loopback, which the egress policy refuses by default.
    let mut options = SagaOptions::default();
    options.egress.allow.push("127.0.0.1".to_owned());
    let sagas = Sagas::start(hub.clone(), options, Arc::new(skald_storage::SystemClock)).await?;
    sagas
        .register(&definition("bench-ok", "OrderPlaced", &base, "/ship"))
        .await?;
    sagas
        .register(&definition("bench-fail", "OrderRejected", &base, "/fail"))
        .await?;
    let success = run_path(args, &hub, "success", "bench-ok", "OrderPlaced", &calls).await?;
    let compensation = run_path(
        args,
        &hub,
        "compensation",
        "bench-fail",
        "OrderRejected",
        &calls,
    )
    .await?;
    hub.shutdown();
    sagas.stopped(Duration::from_secs(10)).await;
    store.shutdown().await;
    let report = SagaReport {
        workload: "saga",
        durability,
        writers: args.writers,
        rate: args.saga_rate,
        success,
        compensation,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let pace = match report.rate {
            0 => "as fast as they can".to_owned(),
            r => format!("{r} triggers/s"),
        };
        println!(
            "{:<12} 3-step saga, embedded engine and target service (durability {}), {} writers, {pace}",
            "workload", report.durability, report.writers
        );
        for p in [&report.success, &report.compensation] {
            println!(
                "{:<12} {} sagas in {:.2} s: {:.0} sagas/s, {} HTTP calls",
                p.path, p.sagas, p.seconds, p.sagas_per_sec, p.http_calls
            );
            print_latency("  latency", &p.latency);
        }
    }
    Ok(())
}

async fn run_path(
    args: &BenchArgs,
    hub: &Hub<Store>,
    path: &'static str,
    definition: &str,
    trigger: &str,
    calls: &AtomicUsize,
) -> anyhow::Result<PathReport> {
    let count = args.sagas;
    let started: Arc<Mutex<HashMap<String, Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(count)));
    let mut finals = hub
        .subscribe(
            ReadSource::Category(Category::from_stored("$saga".into())),
            Start::Now,
        )
        .await?;
    let calls_before = calls.load(Ordering::Relaxed);
    let begin = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let rate = args.saga_rate;
    let mut writers = Vec::new();
    for _ in 0..args.writers.min(count) {
        let store = Arc::clone(hub.store());
        let started = Arc::clone(&started);
        let next = Arc::clone(&next);
        let definition = definition.to_owned();
        let trigger = EventType::new(trigger)?;
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                if rate > 0 {
                    let due = begin + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = format!("{path}-{i}");
                let id = skald_saga::saga_id(&definition, &key).to_string();
                started.lock().expect("lock").insert(id, Instant::now());
                let data = format!("{{\"orderId\":\"{key}\"}}");
                store
                    .append(AppendRequest {
                        stream: StreamName::new(format!("benchorder-{key}"))?,
                        expected: ExpectedRevision::NoStream,
                        condition: None,
                        events: vec![ProposedEvent::new(trigger.clone(), EventData::json(data)?)],
                    })
                    .await
                    .context("appending a trigger")?;
            }
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + PATH_DEADLINE;
    while done < count {
        let delivery = tokio::time::timeout_at(deadline, finals.next())
            .await
            .with_context(|| format!("only {done} of {count} sagas finished in time"))??;
        let Delivery::Events(events) = delivery else {
            continue;
        };
        let now = Instant::now();
        for event in events {
            if !matches!(
                event.event_type.as_str(),
                "SagaCompleted" | "SagaCompensated" | "SagaStuck" | "SagaCancelled"
            ) {
                continue;
            }
            let id = event.stream.as_str().trim_start_matches("$saga-");
            if let Some(at) = started.lock().expect("lock").remove(id) {
                latency.saturating_record(((now - at).as_micros() as u64).max(1));
                done += 1;
            }
        }
    }
    let seconds = begin.elapsed().as_secs_f64();
    for w in writers {
        w.await??;
    }
    Ok(PathReport {
        path,
        sagas: count,
        seconds,
        sagas_per_sec: count as f64 / seconds,
        http_calls: calls.load(Ordering::Relaxed) - calls_before,
        latency: Latency::of(&latency),
    })
}
