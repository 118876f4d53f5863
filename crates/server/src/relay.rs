//! Group consumers that join on a WebSocket of a node that does not run the groups
//! (docs/postgres.md, "Owners across nodes"). The node opens a WebSocket of its own to the
//! owner, with the caller's credentials, joins the group there, and relays what the owner
//! sends to the client and what the client settles to the owner, until either side ends or
//! the owner changes. The owner authenticates and authorizes the consumer again, as it does a
//! forwarded HTTP request.

use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Uri, header};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use skald_core::{Error, EventStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::Problem;
use crate::coordination::{ANSWER_TIMEOUT, CONNECT_TIMEOUT, Coordination, FORWARDED_HEADER, PING};

/// How long the owner's socket may stay silent (pings are answered) before the relay gives
/// the owner up: an owner cut off from this node closes nothing.
const SILENCE: Duration = Duration::from_secs(15);
/// Acks and nacks waiting to be sent to the owner.
pub(crate) const SETTLE_QUEUE: usize = 16;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Upstream = WebSocketStream<Box<dyn Io>>;

/// What a relay hands to the client's socket.
pub(crate) enum Relayed {
    /// A message from the owner, as the owner sent it.
    Text(String),
    /// The relay ended: the owner closed, stopped answering or is no longer the owner.
    Ended(Problem),
}

/// How joining at the owner went.
pub(crate) enum Joined {
    /// The owner took the consumer: relay it with [`Relay::run`].
    Relay(Box<Relay>),
    /// The owner refused it with this error message, to be passed on as it is.
    Refused(Value),
}

/// A group consumer relayed to the owner's WebSocket.
pub(crate) struct Relay {
    upstream: Upstream,
    changes: watch::Receiver<u64>,
}

impl Relay {
    /// Opens a WebSocket to `owner` as the caller (`authorization`, the header the client's
    /// socket was opened with), sends it `subscribe` (a group join with the id `id`) and waits
    /// for the owner's answer.
    pub(crate) async fn join<S: EventStore>(
        coordination: &Coordination<S>,
        owner: &str,
        authorization: Option<&HeaderValue>,
        id: &str,
        subscribe: &Value,
    ) -> Result<Joined, Problem> {
        let changes = coordination.changes();
        let mut upstream = tokio::time::timeout(
            CONNECT_TIMEOUT + ANSWER_TIMEOUT,
            connect(coordination, owner, authorization),
        )
        .await
        .map_err(|_| gone("did not answer in time"))??;
        let sent = tokio::time::timeout(
            ANSWER_TIMEOUT,
            upstream.send(Message::Text(subscribe.to_string().into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(gone("closed the connection from this node"));
        }
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            loop {
                match upstream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(mut message) = serde_json::from_str::<Value>(text.as_str()) else {
                            continue;
                        };
                        let about_this = message["id"].as_str() == Some(id);
                        match message["type"].as_str() {
                            Some("subscribed") if about_this => return Ok(None),
                            // An error without an id refuses the whole socket.
                            Some("error") if about_this || message["id"].is_null() => {
                                message["id"] = Value::String(id.to_owned());
                                return Ok(Some(message));
                            }
                            _ => continue,
                        }
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        return Err(gone("closed the connection from this node"));
                    }
                }
            }
        })
        .await
        .map_err(|_| gone("did not answer in time"))??;
        Ok(match answer {
            None => Joined::Relay(Box::new(Relay { upstream, changes })),
            Some(refusal) => Joined::Refused(refusal),
        })
    }

    /// Relays until the client leaves (`settle` closes, or `tx`), the owner's socket ends or
    /// falls silent, or the owner changes; in the last three cases the client is told with
    /// [`Relayed::Ended`], so that it joins again (through this node, which then relays to the
    /// new owner). What the consumer held goes back to the group when the owner's socket
    /// closes, as it does for any consumer that leaves.
    pub(crate) async fn run<T>(
        mut self,
        mut settle: mpsc::Receiver<String>,
        tx: mpsc::Sender<T>,
        wrap: impl Fn(Relayed) -> T,
    ) {
        let mut ping = tokio::time::interval(PING);
        ping.reset();
        let mut heard = Instant::now();
        let ended = loop {
            tokio::select! {
                frame = self.upstream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        heard = Instant::now();
                        if tx.send(wrap(Relayed::Text(text.to_string()))).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        break Some(gone("closed the connection from this node"));
                    }
                    Some(Ok(_)) => heard = Instant::now(),
                },
                text = settle.recv() => match text {
                    Some(text) => {
                        let sent = tokio::time::timeout(
                            SILENCE,
                            self.upstream.send(Message::Text(text.into())),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            break Some(gone("stopped reading from this node"));
                        }
                    }
                    None => break None,
                },
                _ = ping.tick() => {
                    if heard.elapsed() > SILENCE {
                        break Some(gone("stopped answering this node"));
                    }
                    let sent = tokio::time::timeout(
                        SILENCE,
                        self.upstream.send(Message::Ping(Default::default())),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break Some(gone("stopped reading from this node"));
                    }
                }
                _ = self.changes.changed() => break Some(gone("is no longer the owner")),
            }
        };
        if let Some(problem) = ended {
            let _ = tx.send(wrap(Relayed::Ended(problem))).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.upstream.close(None)).await;
    }
}

/// Opens the WebSocket to the owner at `owner` (`http://host:port` or `https://…`).
async fn connect<S: EventStore>(
    coordination: &Coordination<S>,
    owner: &str,
    authorization: Option<&HeaderValue>,
) -> Result<Upstream, Problem> {
    let not_a_url = || {
        tracing::error!(
            owner,
            "the address of the node that runs groups and sagas is not an http:// or https:// \
             URL; set [cluster] advertise on that node"
        );
        gone("has an address that is not a URL")
    };
    let uri: Uri = owner.parse().map_err(|_| not_a_url())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(not_a_url()),
    };
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(not_a_url());
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let scheme = if tls { "wss" } else { "ws" };
    let mut request = format!("{scheme}://{authority}/v1/ws")
        .into_client_request()
        .map_err(|_| not_a_url())?;
    let headers = request.headers_mut();
    if let Some(authorization) = authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    headers.insert(
        FORWARDED_HEADER,
        HeaderValue::from_str(coordination.address().unwrap_or("unknown"))
            .unwrap_or(HeaderValue::from_static("unknown")),
    );
    let unreachable = |e: &dyn std::fmt::Display| {
        tracing::warn!(
            owner,
            "relaying a WebSocket group consumer to the node that runs groups: {e}"
        );
        gone("cannot be reached from this node now")
    };
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| unreachable(&e))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if tls {
        let config = coordination
            .tls()
            .ok_or_else(|| unreachable(&"no TLS settings"))?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| unreachable(&e))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(&e))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (upstream, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| unreachable(&e))?;
    Ok(upstream)
}

/// 503: the relay to the owner could not start or has ended; the client joins again.
fn gone(why: &str) -> Problem {
    Problem::from(Error::Unavailable(format!(
        "the node that runs consumer groups and sagas {why}; join the group again"
    )))
}
