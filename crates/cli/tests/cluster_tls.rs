//! Nodes of a PostgreSQL store that know one another by their certificates
//! (docs/postgres.md, "Nodes that know one another"): two real nodes on one PostgreSQL 15,
//! each listening with TLS and requiring client certificates, each authenticating its
//! callers by them. A caller authenticated by its certificate reaches the groups through the
//! node that does not run them, over HTTP and a WebSocket; the headers that carry a caller
//! between nodes are believed from a node's certificate only, and never make the node itself
//! the caller.

mod support;

#[path = "../../postgres/tests/support/mod.rs"]
mod cluster;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use support::Server;
use tokio_tungstenite::tungstenite::Message;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Talks to the nodes over TLS as the holder of one of `skald certs dev`'s certificates.
struct As {
    config: Arc<rustls::ClientConfig>,
}

impl As {
    /// `who` is `client` (CN=dev-client, O=admin) or `node` (CN=skald-node, no roles).
    fn new(certs: &Path, who: &str) -> Self {
        let cert = certs.join(format!("{who}.pem"));
        let key = certs.join(format!("{who}-key.pem"));
        let config = skald_security::tls::client_config(
            Some(&certs.join("ca.pem")),
            Some((cert.as_path(), key.as_path())),
        )
        .unwrap();
        Self {
            config: Arc::new(config),
        }
    }

    async fn connect(&self, url: &str) -> Tls {
        let address = url.trim_start_matches("https://");
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// One request with `headers`; the status and the body as JSON (`Null` when empty).
    async fn call(
        &self,
        url: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (StatusCode, Value) {
        let tls = self.connect(url).await;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            sender.send_request(request.body(Full::new(body)).unwrap()),
        )
        .await
        .expect("an answer within 30 s")
        .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn websocket(&self, url: &str) -> tokio_tungstenite::WebSocketStream<Tls> {
        let tls = self.connect(url).await;
        tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
            .await
            .unwrap()
            .0
    }
}

/// The next JSON message on `ws`.
async fn next_message(ws: &mut tokio_tungstenite::WebSocketStream<Tls>) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// A node's configuration: TLS with client certificates required and naming the caller, and
/// the other nodes known by `node.pem`'s CN.
fn node_config(dir: &Path, certs: &Path) -> PathBuf {
    let c = certs.display();
    let path = dir.with_extension("toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert_file = \"{c}/server.pem\"\nkey_file = \"{c}/server-key.pem\"\n\
             client_ca_file = \"{c}/ca.pem\"\n\n[auth]\nmtls = true\n\n\
             [cluster]\nlease_ms = 1500\nca_file = \"{c}/ca.pem\"\n\
             cert_file = \"{c}/node.pem\"\nkey_file = \"{c}/node-key.pem\"\n\
             nodes = [\"skald-node\"]\n"
        ),
    )
    .unwrap();
    path
}

/// The index of the node that runs the groups, once both agree on it.
async fn owner(client: &As, urls: &[String]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut infos = Vec::new();
        for url in urls {
            infos.push(
                client
                    .call(url, Method::GET, "/v1/info", &[], Value::Null)
                    .await
                    .1,
            );
        }
        let owners: Vec<usize> = (0..urls.len())
            .filter(|&i| infos[i]["node"]["groupsAndSagas"] == "owner")
            .collect();
        if let [owner] = owners[..]
            && infos
                .iter()
                .all(|info| info["node"]["owner"] == infos[owner]["node"]["address"])
        {
            return owner;
        }
        assert!(Instant::now() < deadline, "no single owner: {infos:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_know_one_another_forward_callers_authenticated_by_certificate() {
    let pg = cluster::Cluster::start();
    pg.database("skald").await;
    let store = pg.postgres_url("skald");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let (ok, _, err) = support::skald(&["certs", "dev", "--out", certs.to_str().unwrap()]);
    assert!(ok, "{err}");
    let nodes: Vec<Server> = (0..2)
        .map(|i| {
            let data = dir.path().join(format!("node-{i}"));
            let config = node_config(&data, &certs);
            Server::start(
                &data,
                &["--store", &store, "--config", config.to_str().unwrap()],
            )
        })
        .collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
    let client = As::new(&certs, "client");
    let node = As::new(&certs, "node");
    let owner = owner(&client, &urls).await;
    let (owner, follower) = (&urls[owner], &urls[1 - owner]);

    // The caller, named by its certificate (CN=dev-client, O=admin), creates and reads a
    // group through the node that does not run it: that node shows the owner its own
    // certificate, and the caller's.
    let (status, body) = client
        .call(
            follower,
            Method::POST,
            "/v1/groups",
            &[],
            json!({"name": "ledger", "source": {"category": "order"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = client
        .call(follower, Method::GET, "/v1/groups/ledger", &[], Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "ledger");
    let (status, body) = client
        .call(
            follower,
            Method::POST,
            "/v1/streams/order-1",
            &[],
            json!({"events": [{"type": "Placed", "data": {"n": 1}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The gRPC API too, through the same node.
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let grpc = skald_client::Client::connect_with(
        follower,
        skald_client::ClientOptions {
            ca_certificate_pem: Some(read("ca.pem")),
            client_identity_pem: Some((read("client.pem"), read("client-key.pem"))),
            tls_domain: Some("localhost".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let info = grpc.group("ledger").await.expect("GetGroup forwarded");
    assert_eq!(info.name, "ledger");

    // A WebSocket consumer of the caller's, on the node that does not run the group, is
    // relayed to the owner with the caller's certificate and receives the event.
    let mut ws = client.websocket(follower).await;
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "w", "group": "ledger"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let joined = next_message(&mut ws).await;
    assert_eq!(joined["type"], "subscribed", "{joined}");
    let delivered = next_message(&mut ws).await;
    assert_eq!(delivered["type"], "messages", "{delivered}");
    assert_eq!(delivered["messages"][0]["event"]["stream"], "order-1");

    // What a node's certificate is believed for, asked of the owner directly.
    let forwarded_by = ("skald-forwarded-by", "https://elsewhere");
    // Forwarded, with no caller: refused, never served as the node itself.
    let (status, body) = node
        .call(
            owner,
            Method::GET,
            "/v1/groups",
            &[forwarded_by],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["reason"], "missing", "{body}");
    // Not forwarded: the node is a caller of its own, with no roles.
    let (status, body) = node
        .call(owner, Method::GET, "/v1/groups", &[], Value::Null)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Forwarded with a caller's certificate: that caller.
    let admin = base64_json(
        json!({"commonNames": ["dev-client"], "organizations": ["admin"],
                                   "unreadableCommonNames": [], "notAfter": null}),
    );
    let (status, body) = node
        .call(
            owner,
            Method::GET,
            "/v1/groups/ledger",
            &[forwarded_by, ("skald-forwarded-certificate", &admin)],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An unreadable one is refused and says why.
    let (status, body) = node
        .call(
            owner,
            Method::GET,
            "/v1/groups/ledger",
            &[forwarded_by, ("skald-forwarded-certificate", "not base64!")],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["reason"], "certificate", "{body}");
    // So is one that has expired.
    let expired = base64_json(
        json!({"commonNames": ["dev-client"], "organizations": ["admin"],
                                     "unreadableCommonNames": [], "notAfter": 1_000_000_000}),
    );
    let (status, body) = node
        .call(
            owner,
            Method::GET,
            "/v1/groups/ledger",
            &[forwarded_by, ("skald-forwarded-certificate", &expired)],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    // From a caller that is not a node the header is not believed, and a request that says
    // it was forwarded is not named by its connection's certificate either: the admin naming
    // a caller with no roles is neither, and is refused (had the header been believed, the
    // answer would have been 403; had the connection's certificate named it, 200).
    let nobody = base64_json(json!({"commonNames": ["nobody"], "organizations": [],
                                    "unreadableCommonNames": [], "notAfter": null}));
    let (status, body) = client
        .call(
            owner,
            Method::GET,
            "/v1/groups/ledger",
            &[forwarded_by, ("skald-forwarded-certificate", &nobody)],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["reason"], "missing", "{body}");
    // Sent through the follower, a client's own header is replaced by its real certificate.
    let (status, body) = client
        .call(
            follower,
            Method::GET,
            "/v1/groups/ledger",
            &[("skald-forwarded-certificate", &nobody)],
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    for node in nodes {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}

fn base64_json(value: Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}
