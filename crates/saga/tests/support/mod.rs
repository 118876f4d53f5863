//! A scriptable HTTP target service on loopback, and a store with a saga engine over it.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use skald_core::*;
use skald_hub::{Hub, HubOptions};
use skald_saga::{SagaOptions, Sagas, WallClock};
use skald_storage::{Options, Store};

pub const WAIT: Duration = Duration::from_secs(20);

/// One answer the target gives.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub delay: Duration,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            delay: Duration::ZERO,
            body: String::new(),
        }
    }

    pub fn slow(delay: Duration) -> Self {
        Self {
            status: 200,
            delay,
            body: "{}".into(),
        }
    }
}

/// One request the target received.
#[derive(Clone, Debug)]
pub struct Call {
    pub route: String,
    pub idempotency_key: Option<String>,
    pub body: serde_json::Value,
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    /// Answers queued per route (`METHOD /path`), used first.
    queued: HashMap<String, VecDeque<Reply>>,
    /// The answer once the queue is empty; 200 with `{"id": route}` when unset.
    fixed: HashMap<String, Reply>,
    calls: Vec<Call>,
}

/// The target service.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    scheme: &'static str,
}

impl Target {
    /// A target over plain HTTP.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A target over HTTPS with `server.pem` and `server-key.pem` of `certs` (as `skald certs
    /// dev` writes them: for 127.0.0.1 and localhost, signed by `ca.pem`).
    pub async fn start_tls(certs: &Path) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(certs.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(certs.join("server-key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = Arc::clone(&script);
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let script = Arc::clone(&shared);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let script = Arc::clone(&script);
                        async move { Ok::<_, Infallible>(answer(&script, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                                .await
                        }
                        Some(tls) => {
                            // A client that refuses the certificate ends the handshake.
                            let Ok(socket) = tls.accept(socket).await else {
                                return;
                            };
                            http.serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                                .await
                        }
                    };
                });
            }
        });
        Self {
            addr,
            script,
            scheme,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Queues answers for a route, given before the fixed one.
    pub fn queue(&self, route: &str, replies: Vec<Reply>) {
        self.script
            .lock()
            .unwrap()
            .queued
            .entry(route.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Sets the answer a route gives once its queue is empty.
    pub fn fix(&self, route: &str, reply: Reply) {
        self.script
            .lock()
            .unwrap()
            .fixed
            .insert(route.to_owned(), reply);
    }

    pub fn unfix(&self, route: &str) {
        self.script.lock().unwrap().fixed.remove(route);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.script.lock().unwrap().calls.clone()
    }

    /// The routes called, in order.
    pub fn routes(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.route).collect()
    }
}

async fn answer(script: &Mutex<Script>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let route = format!("{} {}", req.method(), req.uri().path());
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let reply = {
        let mut script = script.lock().unwrap();
        script.calls.push(Call {
            route: route.clone(),
            idempotency_key: key,
            body,
            at: Instant::now(),
        });
        let queued = script.queued.get_mut(&route).and_then(VecDeque::pop_front);
        queued
            .or_else(|| script.fixed.get(&route).cloned())
            .unwrap_or_else(|| Reply {
                status: 200,
                delay: Duration::ZERO,
                body: serde_json::json!({ "id": route }).to_string(),
            })
    };
    tokio::time::sleep(reply.delay).await;
    Response::builder()
        .status(reply.status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap()
}

/// A store, its hub and a saga engine.
pub struct Engine {
    pub store: Store,
    pub hub: Hub<Store>,
    pub sagas: Sagas<Store>,
}

impl Engine {
    /// Opens the store and the engine; the test targets listen on loopback, so the egress
    /// policy lets steps reach it.
    pub async fn open(dir: &Path, mut options: SagaOptions) -> Self {
        options.egress.allow.push("127.0.0.0/8".to_owned());
        Self::open_with(dir, options, Arc::new(skald_saga::Unrestricted)).await
    }

    /// [`Engine::open`] with the options as given (loopback refused unless they list it) and an
    /// authority for the registrants.
    pub async fn open_with(
        dir: &Path,
        options: SagaOptions,
        authority: Arc<dyn skald_saga::Authority>,
    ) -> Self {
        let mut attempts = 0;
        let store = loop {
            let opened = Store::open(Options {
                data_dir: dir.to_path_buf(),
                durability: Durability::None,
                ..Options::default()
            });
            match opened {
                Ok((store, _)) => break store,
                Err(Error::Unavailable(_)) if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
        let sagas = Sagas::start_with(hub.clone(), options, Arc::new(WallClock), authority)
            .await
            .unwrap();
        Self { store, hub, sagas }
    }

    pub async fn stop(self) {
        self.hub.shutdown();
        self.sagas.stopped(Duration::from_secs(5)).await;
        self.hub.stopped().await;
        self.store.shutdown().await;
    }

    /// Appends one event of `event_type` with JSON `data` to `stream`.
    pub async fn append(
        &self,
        stream: &str,
        event_type: &str,
        data: serde_json::Value,
    ) -> AppendResult {
        self.store
            .append(AppendRequest {
                stream: StreamName::new(stream).unwrap(),
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![ProposedEvent::new(
                    EventType::new(event_type).unwrap(),
                    EventData::json(data.to_string()).unwrap(),
                )],
            })
            .await
            .unwrap()
    }

    /// Waits until instance `id` exists and `done` holds for its history.
    pub async fn wait_until(
        &self,
        id: &str,
        done: impl Fn(&skald_saga::InstanceHistory) -> bool,
    ) -> skald_saga::InstanceHistory {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.sagas.history(id).await.ok();
            if let Some(h) = found.as_ref().filter(|h| done(h)) {
                return h.clone();
            }
            assert!(
                Instant::now() < deadline,
                "saga {id} never got there: {found:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the instance for `definition` and `key` is in `state`.
    pub async fn wait_for(
        &self,
        definition: &str,
        key: &str,
        state: &str,
    ) -> skald_saga::InstanceHistory {
        let id = skald_saga::saga_id(definition, key).to_string();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(h) = self.sagas.history(&id).await {
                if h.summary.state.as_str() == state {
                    return h;
                }
                if Instant::now() > deadline {
                    panic!(
                        "saga {definition}/{key} is {:?}, not {state}: {:#?}",
                        h.summary.state, h.history
                    );
                }
            } else if Instant::now() > deadline {
                panic!("saga {definition}/{key} never started");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The event types of a history, in order, with step names for step events.
pub fn story(history: &skald_saga::InstanceHistory) -> Vec<String> {
    history
        .history
        .iter()
        .map(|e| match e.data.get("step").and_then(|s| s.as_str()) {
            Some(step) => format!(
                "{}:{step}:{}",
                e.event_type,
                e.data["phase"].as_str().unwrap_or("")
            ),
            None => e.event_type.clone(),
        })
        .collect()
}

/// A one-step definition named `finished`, for instances written straight into the store.
pub const FINISHED_SAGA: &str = r#"
name: finished
version: 1
trigger: {category: finished, types: [Happened]}
correlationKey: /data/key
steps:
  - name: only
    pivot: true
    action: {http: {method: POST, url: "http://127.0.0.1:9/only"}}
"#;

/// Writes `count` instances of [`FINISHED_SAGA`] that started from a trigger carrying
/// `trigger_bytes` of data and completed, as the engine stores them, 100 instances per append
/// batch. The definition must be registered.
pub async fn write_finished_instances(store: &Store, count: usize, trigger_bytes: usize) {
    use skald_saga::history::SagaEvent;
    let padding = "x".repeat(trigger_bytes);
    for first in (0..count).step_by(100) {
        for n in first..(first + 100).min(count) {
            let key = n.to_string();
            let id = skald_saga::saga_id("finished", &key).to_string();
            let trigger = serde_json::json!({
                "stream": format!("finished-{n}"),
                "type": "Happened",
                "data": {"key": key, "padding": padding},
            });
            let history = [
                SagaEvent::SagaStarted {
                    saga_id: id.clone(),
                    definition: "finished".into(),
                    version: 1,
                    correlation_key: key,
                    trigger,
                },
                SagaEvent::StepSucceeded {
                    step: "only".into(),
                    phase: skald_saga::Phase::Action,
                    attempt: 1,
                    output: serde_json::json!({"id": n}),
                    duration_ms: 1,
                },
                SagaEvent::SagaCompleted {},
            ];
            append_history(store, &id, &history).await;
        }
    }
}

/// Writes an instance's history straight into its stream, as the engine stores it.
pub async fn append_history(
    store: &Store,
    saga_id: &str,
    history: &[skald_saga::history::SagaEvent],
) {
    let events = history
        .iter()
        .map(|event| {
            let (kind, data) = event.to_parts();
            ProposedEvent::new(
                EventType::new(kind).unwrap(),
                EventData::json(data).unwrap(),
            )
        })
        .collect();
    store
        .append(AppendRequest {
            stream: skald_saga::streams::instance(saga_id),
            expected: ExpectedRevision::NoStream,
            condition: None,
            events,
        })
        .await
        .unwrap();
}
