//! Who runs the consumer groups and the sagas (docs/postgres.md, "Owners across nodes").
//!
//! On the embedded engine this node always does. On a shared store one node at a time does:
//! the holder of the coordinator lease, decided outside this crate, which installs the
//! groups and sagas of each term with [`Coordination::own`] and takes them away with
//! [`Coordination::follow`]. Every other node forwards the HTTP and gRPC requests for groups
//! and sagas to the owner's address, with the caller's own credentials, so that a client may
//! use any node; the owner authenticates and authorizes the request again.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use skald_core::{Error, EventStore, Result};
use skald_security::x509::Subject;

use crate::{Groups, MAX_POLL_WAIT, Problem, Sagas};

/// Set on a request one node forwards to another; a node that receives one and does not own
/// the groups answers 503 instead of forwarding it again, so that two nodes that disagree
/// about the owner for a moment cannot pass a request back and forth.
pub const FORWARDED_HEADER: &str = "skald-forwarded-by";

/// Set by a follower on a request it forwards for a caller that showed it a client
/// certificate: that certificate's subject, which the owner takes as the caller only from a
/// node it knows (docs/postgres.md, "Nodes that know one another").
pub const FORWARDED_CERTIFICATE: &str = "skald-forwarded-certificate";

/// How long a forwarded request waits for a connection to the owner.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a forwarded request waits for the head of the owner's answer, beyond the wait a
/// long-poll asks for: an owner cut off from this node after the request was sent would
/// otherwise keep it waiting for ever.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept to the owner (HTTP/1.1; HTTP/2 multiplexes on one).
const IDLE_CONNECTIONS: usize = 64;
/// How often an idle HTTP/2 connection to the owner (a gRPC stream) is pinged, and how long
/// an answer may take before the connection is given up as dead.
pub(crate) const PING: Duration = Duration::from_secs(5);

/// What this node is for the groups and the sagas now.
pub enum Role<S> {
    /// It runs them.
    Owner {
        /// The consumer groups of this term.
        groups: Groups<S>,
        /// The saga engine of this term.
        sagas: Sagas<S>,
    },
    /// Another node runs them, reachable at `owner` (none while no node holds the lease).
    Follower {
        /// The owner's address, such as `http://10.0.0.1:7340`.
        owner: Option<String>,
    },
}

impl<S> Clone for Role<S> {
    fn clone(&self) -> Self {
        match self {
            Self::Owner { groups, sagas } => Self::Owner {
                groups: groups.clone(),
                sagas: sagas.clone(),
            },
            Self::Follower { owner } => Self::Follower {
                owner: owner.clone(),
            },
        }
    }
}

/// Where a request for the groups or the sagas goes.
pub(crate) enum Route {
    /// Served here.
    Local,
    /// Forwarded to the owner at this address.
    Forward(String),
    /// Refused with this problem (no owner now, or a forwarded request that found none).
    Refuse(Problem),
}

type Forwarding = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The role of this node, shared by every request.
pub struct Coordination<S> {
    role: RwLock<Role<S>>,
    /// Counts the changes of owner, so that a forwarded request still waiting for the old
    /// owner's answer gives up at once when the owner changes.
    changes: tokio::sync::watch::Sender<u64>,
    /// This node's own address, as it tells the others.
    address: Option<String>,
    /// HTTP/1.1 for the REST API, HTTP/2 for gRPC; `None` on a node that is always the owner.
    clients: Option<(Forwarding, Forwarding)>,
    /// The TLS settings for owners reached over `https://` (WebSocket relays).
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// One permit per WebSocket group consumer relayed to the owner.
    relays: Arc<tokio::sync::Semaphore>,
    /// The certificate CNs that are nodes (`[cluster] nodes`).
    nodes: Vec<String>,
}

/// How a node of a shared store reaches and recognises the others (`[cluster]`).
#[derive(Clone, Copy, Default)]
pub struct Peers<'a> {
    /// PEM roots trusted for other nodes' `https://` addresses (default: the system's).
    pub ca_file: Option<&'a Path>,
    /// This node's client certificate and key, shown to the nodes it forwards to.
    pub identity: Option<(&'a Path, &'a Path)>,
    /// The CNs of client certificates that are nodes.
    pub nodes: &'a [String],
}

/// Most WebSocket group consumers one node relays to the owner at once: each is a connection
/// to the owner.
pub const MAX_RELAYS: usize = 1024;

/// A group consumer to relay: to `owner`, until `changes` says the owner changed, holding
/// one of this node's relay permits.
pub(crate) struct RelayTo {
    pub owner: String,
    pub changes: tokio::sync::watch::Receiver<u64>,
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

impl<S: EventStore> Coordination<S> {
    /// A node that always runs the groups and sagas (the embedded engine).
    pub fn single(groups: Groups<S>, sagas: Sagas<S>) -> Arc<Self> {
        Arc::new(Self {
            role: RwLock::new(Role::Owner { groups, sagas }),
            changes: tokio::sync::watch::Sender::new(0),
            address: None,
            clients: None,
            tls: None,
            relays: Arc::new(tokio::sync::Semaphore::new(MAX_RELAYS)),
            nodes: Vec::new(),
        })
    }

    /// A node of a shared store, at `address`, following until it is given a term with
    /// [`Coordination::own`], reaching and recognising the other nodes as `peers` says.
    pub fn shared(address: String, peers: Peers<'_>) -> Result<Arc<Self>> {
        let tls =
            skald_security::tls::client_config(peers.ca_file, peers.identity).map_err(|e| {
                Error::InvalidConfig(format!("[cluster] ca_file, cert_file or key_file: {e}"))
            })?;
        let client = |http2: bool| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            connector.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http();
            let https = if http2 {
                https.enable_http2().wrap_connector(connector)
            } else {
                https.enable_http1().wrap_connector(connector)
            };
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .http2_only(http2)
                .pool_max_idle_per_host(IDLE_CONNECTIONS);
            if http2 {
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .http2_keep_alive_interval(PING)
                    .http2_keep_alive_timeout(PING)
                    .http2_keep_alive_while_idle(true);
            }
            builder.build(https)
        };
        Ok(Arc::new(Self {
            role: RwLock::new(Role::Follower { owner: None }),
            changes: tokio::sync::watch::Sender::new(0),
            address: Some(address),
            clients: Some((client(false), client(true))),
            tls: Some(Arc::new(tls)),
            relays: Arc::new(tokio::sync::Semaphore::new(MAX_RELAYS)),
            nodes: peers.nodes.to_vec(),
        }))
    }

    /// Starts a term: this node runs `groups` and `sagas` (started on a scoped hub), and
    /// serves their requests. Returns the role it had.
    pub fn own(&self, groups: Groups<S>, sagas: Sagas<S>) -> Role<S> {
        self.set(Role::Owner { groups, sagas })
    }

    /// Ends a term, or learns of another owner: requests go to `owner` from now on. Returns
    /// the role it had (the caller stops the old term's groups and sagas).
    pub fn follow(&self, owner: Option<String>) -> Role<S> {
        self.set(Role::Follower { owner })
    }

    fn set(&self, role: Role<S>) -> Role<S> {
        let old = std::mem::replace(&mut *self.role.write().expect("not poisoned"), role.clone());
        let same = matches!((&old, &role), (Role::Follower { owner: a }, Role::Follower { owner: b }) if a == b);
        if !same {
            self.changes.send_modify(|n| *n += 1);
        }
        old
    }

    /// The role now.
    pub fn role(&self) -> Role<S> {
        self.role.read().expect("not poisoned").clone()
    }

    /// This node's address, when it shares its store with others.
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// Where a group consumer joining on a WebSocket of this node goes: `None` to this node's
    /// own groups, or to be relayed to the owner ([`RelayTo`]), or a refusal (no owner now,
    /// or this node relays [`MAX_RELAYS`] already). A socket that was itself opened by another
    /// node's relay (`forwarded`) is never relayed again.
    pub(crate) fn relay_to(
        &self,
        forwarded: bool,
    ) -> std::result::Result<Option<RelayTo>, Problem> {
        let role = self.role.read().expect("not poisoned");
        let owner = match &*role {
            Role::Owner { .. } => return Ok(None),
            Role::Follower { .. } if forwarded => return Err(no_longer_owner()),
            Role::Follower { owner: None } => return Err(Problem::from(elsewhere(None))),
            Role::Follower { owner: Some(owner) } => owner.clone(),
        };
        // Subscribed under the lock, so that no change of owner after this read is missed.
        let changes = self.changes.subscribe();
        drop(role);
        let permit = Arc::clone(&self.relays).try_acquire_owned().map_err(|_| {
            Problem::from(Error::Unavailable(format!(
                "this node already relays {MAX_RELAYS} WebSocket group consumers to the node \
                 that runs the groups, the most it may; join through another node, or retry"
            )))
        })?;
        Ok(Some(RelayTo {
            owner,
            changes,
            permit,
        }))
    }

    /// Whether a verified client certificate with this subject is another node's: exactly one
    /// readable CN, named in `[cluster] nodes`.
    pub(crate) fn is_node(&self, subject: &Subject) -> bool {
        match (
            &subject.common_names[..],
            &subject.unreadable_common_names[..],
        ) {
            ([name], []) => self.nodes.iter().any(|node| node == name),
            _ => false,
        }
    }

    /// The TLS settings for owners reached over `https://`.
    pub(crate) fn tls(&self) -> Option<Arc<tokio_rustls::rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The groups, when this node runs them.
    pub fn groups(&self) -> Result<Groups<S>> {
        match &*self.role.read().expect("not poisoned") {
            Role::Owner { groups, .. } => Ok(groups.clone()),
            Role::Follower { owner } => Err(elsewhere(owner.as_deref())),
        }
    }

    /// The saga engine, when this node runs it.
    pub fn sagas(&self) -> Result<Sagas<S>> {
        match &*self.role.read().expect("not poisoned") {
            Role::Owner { sagas, .. } => Ok(sagas.clone()),
            Role::Follower { owner } => Err(elsewhere(owner.as_deref())),
        }
    }

    /// Where a request for `path` goes; everything but the groups and the sagas is served
    /// here.
    pub(crate) fn route(&self, request: &Request) -> Route {
        if !is_coordinated(request.uri().path()) {
            return Route::Local;
        }
        match &*self.role.read().expect("not poisoned") {
            Role::Owner { .. } => Route::Local,
            Role::Follower { .. } if request.headers().contains_key(FORWARDED_HEADER) => {
                Route::Refuse(no_longer_owner())
            }
            Role::Follower { owner: Some(owner) } => Route::Forward(owner.clone()),
            Role::Follower { owner: None } => Route::Refuse(Problem::from(elsewhere(None))),
        }
    }

    /// Sends `request` to the owner at `owner` and returns its answer, streamed (a long-poll,
    /// an SSE stream or a gRPC stream flows through as it comes). `certificate` is the client
    /// certificate that named the caller, if one did.
    pub(crate) async fn forward(
        &self,
        mut request: Request,
        owner: &str,
        grpc: bool,
        certificate: Option<&Subject>,
    ) -> Response {
        let Some((http1, http2)) = &self.clients else {
            return unreachable_owner(grpc, "is another node, and this one forwards nothing");
        };
        let target = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri = match format!("{}{target}", owner.trim_end_matches('/')).parse::<Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                tracing::error!(
                    owner,
                    "the address of the node that runs groups and sagas is not a URL ({e}); set \
                     [cluster] advertise on that node"
                );
                return unreachable_owner(grpc, "has an address that is not a URL");
            }
        };
        *request.uri_mut() = uri;
        *request.version_mut() = if grpc {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let headers = request.headers_mut();
        for hop in [
            header::HOST,
            header::CONNECTION,
            header::UPGRADE,
            header::TRANSFER_ENCODING,
            header::PROXY_AUTHORIZATION,
        ] {
            headers.remove(hop);
        }
        headers.remove("keep-alive");
        set_certificate(headers, certificate);
        headers.insert(
            FORWARDED_HEADER,
            HeaderValue::from_str(self.address.as_deref().unwrap_or("unknown"))
                .unwrap_or(HeaderValue::from_static("unknown")),
        );
        let client = if grpc { http2 } else { http1 };
        let within = ANSWER_TIMEOUT + poll_wait(&target);
        let mut changes = self.changes.subscribe();
        let answer = tokio::select! {
            answer = tokio::time::timeout(within, client.request(request)) => answer,
            _ = changes.changed() => {
                return unreachable_owner(grpc, "stopped running them while this request waited");
            }
        };
        match answer {
            Ok(Ok(response)) => response.map(Body::new),
            Ok(Err(e)) => {
                tracing::warn!(
                    owner,
                    "forwarding to the node that runs groups and sagas: {e}"
                );
                unreachable_owner(grpc, "cannot be reached from this node now")
            }
            Err(_) => {
                tracing::warn!(
                    owner,
                    "the node that runs groups and sagas did not answer in time"
                );
                unreachable_owner(grpc, "did not answer in time")
            }
        }
    }
}

/// Sets [`FORWARDED_CERTIFICATE`] on a request forwarded for a caller this node named by the
/// client certificate `certificate`, unless the request carries an `Authorization` header;
/// whatever the client put there itself is never passed on.
pub(crate) fn set_certificate(headers: &mut HeaderMap, certificate: Option<&Subject>) {
    headers.remove(FORWARDED_CERTIFICATE);
    if let Some(subject) = certificate
        && !headers.contains_key(header::AUTHORIZATION)
    {
        let json = serde_json::to_vec(subject).expect("a subject serializes");
        let value = URL_SAFE_NO_PAD.encode(json);
        headers.insert(
            FORWARDED_CERTIFICATE,
            HeaderValue::from_str(&value).expect("base64 is a header value"),
        );
    }
}

/// The subject a node forwarded in [`FORWARDED_CERTIFICATE`], or why it cannot be read.
pub(crate) fn forwarded_certificate(
    headers: &HeaderMap,
) -> std::result::Result<Option<Subject>, String> {
    let Some(value) = headers.get(FORWARDED_CERTIFICATE) else {
        return Ok(None);
    };
    let unreadable = |why: String| {
        format!("the {FORWARDED_CERTIFICATE} header another node sent cannot be read: {why}")
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(value.as_bytes())
        .map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| unreadable(e.to_string()))
}

/// How long a forwarded request may wait for its answer beyond [`ANSWER_TIMEOUT`]: a
/// long-poll (`GET /v1/groups/{name}/messages`) as long as the API lets any wait (the owner
/// reads the query, not this node, so that no reading of `wait` here can cut a poll short and
/// lose the batch it returns); nothing for every other request.
fn poll_wait(target: &str) -> Duration {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path.ends_with("/messages") {
        MAX_POLL_WAIT
    } else {
        Duration::ZERO
    }
}

/// The requests only the owner serves: the groups' and the sagas' REST and gRPC APIs.
fn is_coordinated(path: &str) -> bool {
    ["/v1/groups", "/v1/sagas", "/v1/saga-instances"]
        .iter()
        .any(|prefix| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
        || path.starts_with("/skald.v1.Groups/")
        || path.starts_with("/skald.v1.Sagas/")
}

/// 503 for a request that could not be forwarded, as a gRPC status to a gRPC caller. The
/// owner's address is logged, not told to the caller.
fn unreachable_owner(grpc: bool, why: &str) -> Response {
    let problem = Problem::from(Error::Unavailable(format!(
        "the node that runs consumer groups and sagas {why}; retry"
    )));
    if grpc {
        problem.to_grpc_status().into_http()
    } else {
        problem.into_response()
    }
}

/// 503 for a request another node forwarded here that this node can no longer serve.
fn no_longer_owner() -> Problem {
    Problem::from(Error::Unavailable(
        "this request was forwarded to this node as the owner of consumer groups and sagas, \
         and it owns them no more (the lease is moving between nodes); retry"
            .into(),
    ))
}

/// Why this node cannot serve a group or saga request itself.
fn elsewhere(owner: Option<&str>) -> Error {
    match owner {
        Some(owner) => Error::Unavailable(format!(
            "consumer groups and sagas are run by the node at {owner}; any node forwards their \
             requests to it"
        )),
        None => Error::Unavailable(
            "no node runs consumer groups and sagas at this moment (their lease is moving \
             between nodes, or no node can reach the database); retry"
                .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        FORWARDED_CERTIFICATE, HeaderMap, HeaderValue, Subject, forwarded_certificate,
        is_coordinated, poll_wait, set_certificate,
    };
    use std::time::Duration;

    #[test]
    fn a_callers_certificate_crosses_to_the_owner_whole_and_replaces_a_clients_own() {
        let subject = Subject {
            common_names: vec!["Zoë, ops".into()],
            organizations: vec!["admin".into(), "auditors".into()],
            unreadable_common_names: vec![],
            not_after: Some(1_900_000_000),
        };
        let mut headers = HeaderMap::new();
        headers.insert(FORWARDED_CERTIFICATE, HeaderValue::from_static("forged"));
        set_certificate(&mut headers, Some(&subject));
        assert_eq!(forwarded_certificate(&headers), Ok(Some(subject.clone())));
        // No certificate: whatever the client sent is removed.
        headers.insert(FORWARDED_CERTIFICATE, HeaderValue::from_static("forged"));
        set_certificate(&mut headers, None);
        assert_eq!(forwarded_certificate(&headers), Ok(None));
        // A caller that authenticates by its Authorization header is that header's.
        headers.insert("authorization", HeaderValue::from_static("Bearer x"));
        headers.insert(FORWARDED_CERTIFICATE, HeaderValue::from_static("forged"));
        set_certificate(&mut headers, Some(&subject));
        assert_eq!(forwarded_certificate(&headers), Ok(None));
        // Unreadable: base64 that is not a subject, and not base64 at all.
        for bad in ["e30", "not base64!", "eyJjb21tb25OYW1lcyI6W10sIngiOjF9"] {
            headers.insert(FORWARDED_CERTIFICATE, HeaderValue::from_static(bad));
            let err = forwarded_certificate(&headers).unwrap_err();
            assert!(err.contains(FORWARDED_CERTIFICATE), "{err}");
        }
    }

    #[test]
    fn a_forwarded_long_poll_may_wait_as_long_as_any_poll() {
        for target in [
            "/v1/groups/a/messages?count=5&wait=1500",
            "/v1/groups/a/messages",
            "/v1/groups/a/messages?wait=1&wait=60000",
        ] {
            assert_eq!(poll_wait(target), Duration::from_secs(60), "{target}");
        }
        assert_eq!(poll_wait("/v1/groups/a/ack?x=/messages"), Duration::ZERO);
    }

    #[test]
    fn only_the_groups_and_sagas_go_to_the_owner() {
        for path in [
            "/v1/groups",
            "/v1/groups/orders/messages",
            "/v1/sagas",
            "/v1/sagas/payment/disable",
            "/v1/saga-instances/abc",
            "/skald.v1.Groups/Consume",
            "/skald.v1.Sagas/ListInstances",
        ] {
            assert!(is_coordinated(path), "{path}");
        }
        for path in [
            "/v1/streams/groups",
            "/v1/groupsx",
            "/v1/all",
            "/v1/ws",
            "/skald.v1.Streams/Append",
            "/health/ready",
        ] {
            assert!(!is_coordinated(path), "{path}");
        }
    }
}
