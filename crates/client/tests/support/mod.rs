//! A store in a directory, and a server over one on a listener, for the client's tests.

use std::sync::Arc;

use skald_core::{
    AppendRequest, Durability, EventData, EventStore, EventType, ExpectedRevision, ProposedEvent,
    StreamName,
};
use skald_storage::{Options, Store};

/// What a test store does with an append: a fault the real store cannot produce on demand (a
/// writer slipping in first, a crash before the append, an answer lost after it).
#[allow(dead_code)] // not every test binary injects faults
pub trait OnAppend<S>: Send + Sync + 'static {
    fn append(
        &self,
        store: &S,
        request: AppendRequest,
    ) -> impl std::future::Future<Output = skald_core::Result<skald_core::AppendResult>> + Send;
}

/// `store` with its appends handed to `hook`; everything else goes straight to `store`.
#[allow(dead_code)]
pub struct Faulty<S, H> {
    pub store: S,
    pub hook: H,
}

impl<S: EventStore, H: OnAppend<S>> EventStore for Faulty<S, H> {
    async fn append(&self, request: AppendRequest) -> skald_core::Result<skald_core::AppendResult> {
        self.hook.append(&self.store, request).await
    }

    async fn read(
        &self,
        request: skald_core::ReadRequest,
    ) -> skald_core::Result<skald_core::ReadPage> {
        self.store.read(request).await
    }

    async fn stream_head(
        &self,
        stream: &StreamName,
    ) -> skald_core::Result<Option<skald_core::StreamHead>> {
        self.store.stream_head(stream).await
    }

    async fn info(&self) -> skald_core::Result<skald_core::StoreInfo> {
        self.store.info().await
    }

    async fn next_position(&self) -> skald_core::Result<u64> {
        self.store.next_position().await
    }

    async fn wait_for_append(&self, known: u64) -> skald_core::Result<u64> {
        self.store.wait_for_append(known).await
    }

    fn limits(&self) -> &skald_core::Limits {
        self.store.limits()
    }
}

/// Appends one event of `event_type` with JSON `data` to `stream`, at any revision.
#[allow(dead_code)] // not every test binary appends bare events
pub async fn append_json<S: EventStore>(store: &S, stream: &str, event_type: &str, data: &str) {
    store
        .append(AppendRequest {
            stream: StreamName::new(stream).unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new(event_type).unwrap(),
                EventData::json(data).unwrap(),
            )],
        })
        .await
        .unwrap();
}

/// A store without fdatasync (tests only) in `dir`.
pub fn store(dir: &std::path::Path) -> Store {
    Store::open(Options {
        data_dir: dir.to_owned(),
        durability: Durability::None,
        ..Options::default()
    })
    .unwrap()
    .0
}

/// A store a server can stop with: each backend's shutdown.
pub trait Backend: EventStore {
    fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl Backend for Store {
    fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send {
        Store::shutdown(self)
    }
}

/// A server over a store in `dir`, on `listener`; returns a handle that stops it.
pub async fn serve(dir: &std::path::Path, listener: tokio::net::TcpListener) -> Running {
    serve_with(dir, listener, skald_server::HttpConfig::default()).await
}

/// [`serve`] with `config` for its HTTP and gRPC settings.
pub async fn serve_with(
    dir: &std::path::Path,
    listener: tokio::net::TcpListener,
    config: skald_server::HttpConfig,
) -> Running {
    serve_store(Arc::new(store(dir)), listener, config).await
}

/// A server over `store`, on `listener`, with `config` for its HTTP and gRPC settings.
pub async fn serve_store<S: Backend>(
    store: Arc<S>,
    listener: tokio::net::TcpListener,
    config: skald_server::HttpConfig,
) -> Running<S> {
    let hub = skald_server::Hub::start(Arc::clone(&store), Default::default());
    let groups = skald_server::Groups::start(hub.clone()).await.unwrap();
    let sagas = skald_server::Sagas::start(
        hub.clone(),
        Default::default(),
        Arc::new(skald_saga::WallClock),
    )
    .await
    .unwrap();
    let app = skald_server::router_with(groups, sagas, config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown_hub = hub.clone();
    let task = tokio::spawn(async move {
        skald_server::listener::serve(listener, app, async move {
            let _ = stopped.await;
            shutdown_hub.shutdown();
        })
        .await
        .unwrap();
    });
    Running {
        store,
        hub,
        stop,
        task,
    }
}

/// A running server; `store` is the store it serves.
pub struct Running<S: Backend = Store> {
    pub store: Arc<S>,
    hub: skald_server::Hub<S>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Backend> Running<S> {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
        self.hub.stopped().await;
        self.store.shutdown().await;
    }
}
