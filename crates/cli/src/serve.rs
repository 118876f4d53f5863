//! `skald serve`: open the store (embedded, or PostgreSQL), serve the HTTP API, shut down
//! gracefully on SIGINT/SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use skald_core::{Durability, EventStore};
use skald_postgres::PgStore;
use skald_storage::Store;

use crate::config::ServeConfig;
use crate::coordinator::Coordinator;

/// How long a graceful stop waits for saga steps in flight; what is still running after it
/// runs again after the restart (steps run at least once).
const SAGA_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(mut config: ServeConfig) -> anyhow::Result<()> {
    let traces = skald_telemetry::Config::from_env(|name| std::env::var(name).ok())
        .map_err(|e| anyhow::anyhow!("traces: {e}"))?;
    if let Some(traces) = traces {
        tracing::info!(
            endpoint = %traces.endpoint,
            ratio = traces.sampler.ratio,
            "exporting traces (OTLP over HTTP, JSON)"
        );
        skald_telemetry::install(traces);
    }
    let data_dir = config.storage.data_dir.clone();
    let durability = config
        .postgres
        .as_ref()
        .map_or(config.storage.durability, |p| p.durability);
    if let Some(options) = config.postgres.clone() {
        let shown = options.url.to_string();
        let url = options.url.clone();
        let store = PgStore::open(options)
            .await
            .with_context(|| format!("cannot open the store in PostgreSQL at {shown}"))?;
        return serve_on(
            Arc::new(store),
            format!("store: {shown}"),
            durability,
            data_dir,
            config,
            Some(url),
        )
        .await;
    }
    let storage = std::mem::take(&mut config.storage);
    let (store, report) = Store::open(storage)
        .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
    for note in &report.notes {
        tracing::warn!(note = %note, "recovery repaired the store");
    }
    let shown = format!("data: {}", data_dir.display());
    serve_on(Arc::new(store), shown, durability, data_dir, config, None).await
}

/// A store `serve` can stop: each backend's shutdown, after the server has stopped.
trait Served: EventStore {
    fn stop(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl Served for Store {
    fn stop(&self) -> impl std::future::Future<Output = ()> + Send {
        self.shutdown()
    }
}

impl Served for PgStore {
    fn stop(&self) -> impl std::future::Future<Output = ()> + Send {
        self.shutdown()
    }
}

/// Who runs the groups and sagas of a node: this node always (embedded), or the holder of the
/// coordinator lease (PostgreSQL).
enum Owners<S> {
    Single(skald_server::Groups<S>, skald_server::Sagas<S>),
    Shared(Coordinator),
}

/// Serves `store` (shown as `shown` in the first line) until SIGINT or SIGTERM. `data_dir`
/// receives the initial admin key's file. `shared`: the PostgreSQL store other nodes may
/// share, whose groups and sagas run on one node at a time.
async fn serve_on<S: Served>(
    store_arc: Arc<S>,
    shown: String,
    durability: Durability,
    data_dir: PathBuf,
    config: ServeConfig,
    shared: Option<skald_postgres::PgUrl>,
) -> anyhow::Result<()> {
    let tls = match &config.tls {
        Some(tls) => Some(
            skald_security::TlsSource::new(tls.clone())
                .map_err(|e| anyhow::anyhow!("config [tls]: {e}"))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if durability == Durability::None {
        tracing::warn!(
            "--durability none: appends are acknowledged before they reach the disk and a \
             crash of the machine loses them. Use it for tests and benchmarks only."
        );
    }
    let security = skald_security::Security::start(
        Arc::clone(&store_arc),
        config.auth.clone(),
        config.rate_limit.clone(),
        tls.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start security: {e}"))?;
    if let Some(path) = security
        .ensure_initial_key(&data_dir)
        .await
        .map_err(|e| anyhow::anyhow!(e))?
    {
        tracing::warn!(
            file = %path.display(),
            "created the API key initial-admin (role admin) and wrote it to this file; revoke it \
             once you have made your own admin keys"
        );
    }
    if !security.enabled() {
        tracing::info!("authentication is off: every caller is an admin (loopback or --insecure)");
    }
    if let Some(tls) = &tls {
        tls.watch();
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Tests and scripts read this line to find the port when listening on port 0.
    let events = store_arc
        .next_position()
        .await
        .context("cannot read the store's head")?;
    println!(
        "skald {} listening on {scheme}://{addr} ({shown}, durability: {durability}, events: {events})",
        skald_server::VERSION,
    );
    std::io::stdout().flush()?;
    let hub = skald_server::Hub::start(Arc::clone(&store_arc), Default::default());
    let authority = Arc::new(skald_server::SagaAuthority::new(Arc::clone(&security)));
    let (app, owners) = match shared {
        None => {
            let groups = skald_server::Groups::start(hub.clone())
                .await
                .context("cannot start the persistent subscriptions")?;
            let sagas = skald_server::Sagas::start_with(
                hub.clone(),
                config.sagas,
                Arc::new(skald_storage::SystemClock),
                authority,
            )
            .await
            .context("cannot start the saga engine")?;
            let app = skald_server::router_secured(
                groups.clone(),
                sagas.clone(),
                config.http.clone(),
                security,
            );
            (app, Owners::Single(groups, sagas))
        }
        Some(url) => {
            let address = config.cluster.address(addr, scheme);
            let cluster = &config.cluster;
            let coordination = skald_server::Coordination::shared(
                address.clone(),
                skald_server::Peers {
                    ca_file: cluster.ca_file.as_deref(),
                    identity: cluster
                        .cert_file
                        .as_deref()
                        .zip(cluster.key_file.as_deref()),
                    nodes: &cluster.nodes,
                },
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let node = uuid::Uuid::new_v4().to_string();
            tracing::info!(
                node = %node,
                address = %address,
                "consumer groups and sagas run on the node that holds their lease; the others \
                 forward their requests to it"
            );
            let coordinator = Coordinator::start(
                hub.clone(),
                Arc::clone(&coordination),
                crate::coordinator::Setup {
                    url,
                    node,
                    address,
                    ttl: std::time::Duration::from_millis(config.cluster.lease_ms),
                    sagas: config.sagas,
                    clock: Arc::new(skald_storage::SystemClock),
                    authority,
                    grace: SAGA_GRACE,
                },
            );
            let app = skald_server::router_coordinated(
                hub.clone(),
                coordination,
                config.http.clone(),
                security,
            );
            (app, Owners::Shared(coordinator))
        }
    };
    let options = config.http.listen_options(tls);
    let coordinator = match &owners {
        Owners::Shared(coordinator) => Some(coordinator),
        Owners::Single(..) => None,
    };
    skald_server::listener::serve_with(listener, app, options, async {
        shutdown_signal().await;
        // Subscriptions stream forever; they end now so that the connections can close.
        hub.shutdown();
        // Another node takes the groups and sagas over while this one drains.
        if let Some(coordinator) = coordinator {
            coordinator.signal();
        }
    })
    .await
    .context("the HTTP server failed")?;
    // Groups write their last checkpoints (and a node of a shared store gives their lease
    // up); then requests in flight have finished, so the writer stops after what it has
    // queued.
    match owners {
        Owners::Single(groups, sagas) => {
            groups.stopped().await;
            sagas.stopped(SAGA_GRACE).await;
        }
        Owners::Shared(coordinator) => coordinator.stop().await,
    }
    store_arc.stop().await;
    skald_telemetry::flush(std::time::Duration::from_secs(5)).await;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}
