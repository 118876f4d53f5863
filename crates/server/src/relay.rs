//! Group consumers that join on a WebSocket of a node that does not run the groups
//! (docs/postgres.md, "Owners across nodes"). The node opens a WebSocket of its own to the
//! owner, with the caller's credentials, joins the group there, and relays what the owner
//! sends to the client and what the client settles to the owner, until either side ends or
//! the owner changes. The owner authenticates and authorizes the consumer again, as it does a
//! forwarded HTTP request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Uri, header};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use skald_core::{Error, EventStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Problem;
use crate::coordination::{
    ANSWER_TIMEOUT, CONNECT_TIMEOUT, Coordination, FORWARDED_HEADER, PING, RelayTo, set_certificate,
};
use skald_security::x509::Subject;

/// How long the owner's socket may stay silent (pings are answered) before the relay gives
/// the owner up: an owner cut off from this node closes nothing.
const SILENCE: Duration = Duration::from_secs(15);
/// Acks and nacks waiting to be sent to the owner.
pub(crate) const SETTLE_QUEUE: usize = 16;
/// The read buffer of a relay's socket to the owner (as small as the server's own sockets').
const READ_BUFFER: usize = 4096;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Upstream = WebSocketStream<Box<dyn Io>>;

/// What a relay hands to the client's socket.
pub(crate) enum Relayed {
    /// A message for the client, as the owner sent it (or `subscribed`).
    Text(String),
    /// The relay did not start or has ended: the owner cannot be reached, closed, stopped
    /// answering or is no longer the owner.
    Ended(Problem),
}

/// A group join to relay.
pub(crate) struct Join {
    /// Where to, and for how long.
    pub to: RelayTo,
    /// The `Authorization` header the client's socket was opened with.
    pub authorization: Option<HeaderValue>,
    /// The client certificate the client's socket was opened with.
    pub certificate: Option<Arc<Subject>>,
    /// The subscription's id on the client's socket, and on the owner's.
    pub id: String,
    /// The client's `subscribe` message.
    pub subscribe: Value,
}

/// Joins the group at the owner and relays the consumer: what the owner answers and sends
/// goes to the client through `tx` (each message wrapped by `wrap`), and what the client
/// settles (`settle`) goes to the owner, in order. Ends when the client leaves (`settle`
/// closes once the acks queued are sent, or `tx` closes), or with [`Relayed::Ended`] when the
/// owner's socket ends or falls silent or the owner changes, so that the client joins again
/// (through this node, which then relays to the new owner). What the consumer held goes back
/// to the group when the owner's socket closes, as for any consumer that leaves; acks still
/// queued when the owner went away are lost with it, and their messages delivered again.
pub(crate) async fn relay<S: EventStore, T>(
    coordination: Arc<Coordination<S>>,
    join: Join,
    mut settle: mpsc::Receiver<String>,
    tx: mpsc::Sender<T>,
    wrap: impl Fn(Relayed) -> T,
) {
    let Join {
        to,
        authorization,
        certificate,
        id,
        subscribe,
    } = join;
    let RelayTo {
        owner,
        mut changes,
        permit: _permit,
    } = to;
    let joined = tokio::select! {
        joined = tokio::time::timeout(
            CONNECT_TIMEOUT + ANSWER_TIMEOUT,
            open(
                &coordination,
                &owner,
                Caller {
                    authorization: authorization.as_ref(),
                    certificate: certificate.as_deref(),
                },
                &id,
                &subscribe,
            ),
        ) => joined.unwrap_or_else(|_| Err(gone("did not answer in time"))),
        _ = changes.changed() => Err(gone("is no longer the owner")),
    };
    let mut upstream = match joined {
        Ok(Ok(upstream)) => {
            let subscribed = serde_json::json!({"type": "subscribed", "id": id});
            if tx
                .send(wrap(Relayed::Text(subscribed.to_string())))
                .await
                .is_err()
            {
                return;
            }
            upstream
        }
        Ok(Err(refusal)) => {
            let _ = tx.send(wrap(Relayed::Text(refusal.to_string()))).await;
            return;
        }
        Err(problem) => {
            let _ = tx.send(wrap(Relayed::Ended(problem))).await;
            return;
        }
    };
    let mut ping = tokio::time::interval(PING);
    ping.reset();
    let mut heard = Instant::now();
    // A message from the owner that the client's socket has no room for yet: the owner's
    // socket is not read meanwhile (so a slow client slows the owner, whose stall timeout
    // ends it), while the client's acks go on flowing to the owner.
    let mut pending: Option<String> = None;
    let ended = loop {
        tokio::select! {
            permit = tx.reserve(), if pending.is_some() => match permit {
                Ok(permit) => {
                    permit.send(wrap(Relayed::Text(pending.take().expect("checked"))));
                    heard = Instant::now();
                }
                Err(_) => break None,
            },
            frame = upstream.next(), if pending.is_none() => match frame {
                Some(Ok(Message::Text(text))) => {
                    heard = Instant::now();
                    pending = Some(text.to_string());
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    break Some(gone("closed the connection from this node"));
                }
                Some(Ok(_)) => heard = Instant::now(),
            },
            text = settle.recv() => match text {
                Some(text) => {
                    let sent = tokio::time::timeout(
                        SILENCE,
                        upstream.send(Message::Text(text.into())),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break Some(gone("stopped reading from this node"));
                    }
                }
                None => break None,
            },
            _ = ping.tick() => {
                // Silence counts only while the owner's socket is being read.
                if pending.is_none() && heard.elapsed() > SILENCE {
                    break Some(gone("stopped answering this node"));
                }
                let sent = tokio::time::timeout(
                    SILENCE,
                    upstream.send(Message::Ping(Default::default())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break Some(gone("stopped reading from this node"));
                }
            }
            _ = changes.changed() => break Some(gone("is no longer the owner")),
        }
    };
    if let Some(problem) = ended {
        let _ = tx.send(wrap(Relayed::Ended(problem))).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), upstream.close(None)).await;
}

/// Opens a WebSocket to `owner` as the caller, sends it `subscribe` (a group join with the id
/// `id`) and waits for the owner's answer: the socket, once the owner took the consumer, or
/// the owner's refusal (its error message, to be passed on as it is).
async fn open<S: EventStore>(
    coordination: &Coordination<S>,
    owner: &str,
    caller: Caller<'_>,
    id: &str,
    subscribe: &Value,
) -> Result<Result<Upstream, Value>, Problem> {
    let mut upstream = connect(coordination, owner, caller).await?;
    if upstream
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .is_err()
    {
        return Err(gone("closed the connection from this node"));
    }
    loop {
        match upstream.next().await {
            Some(Ok(Message::Text(text))) => {
                let Ok(mut message) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                let about_this = message["id"].as_str() == Some(id);
                match message["type"].as_str() {
                    Some("subscribed") if about_this => return Ok(Ok(upstream)),
                    // An error without an id refuses the whole socket.
                    Some("error") if about_this || message["id"].is_null() => {
                        message["id"] = Value::String(id.to_owned());
                        return Ok(Err(message));
                    }
                    _ => continue,
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(gone("closed the connection from this node")),
        }
    }
}

/// The credentials the client's socket was opened with.
#[derive(Clone, Copy)]
struct Caller<'a> {
    authorization: Option<&'a HeaderValue>,
    certificate: Option<&'a Subject>,
}

/// Opens the WebSocket to the owner at `owner` (`http://host:port` or `https://…`).
async fn connect<S: EventStore>(
    coordination: &Coordination<S>,
    owner: &str,
    caller: Caller<'_>,
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
    if let Some(authorization) = caller.authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    set_certificate(headers, caller.certificate);
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
    // The owner is trusted with the size of what it sends: a group batch may hold events up
    // to the store's largest.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(None)
        .max_frame_size(None);
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((upstream, _)) => Ok(upstream),
        // The owner refused the caller's credentials (a caller authenticated by a client
        // certificate, which stays with the first hop), or limited it.
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            tracing::debug!(owner, status = %response.status(), "the owner refused a relayed WebSocket");
            Err(refused(response.status()))
        }
        Err(e) => Err(unreachable(&e)),
    }
}

/// The owner's refusal of the relay's socket, with its status.
fn refused(status: axum::http::StatusCode) -> Problem {
    match status.as_u16() {
        401 => Problem::unauthenticated(
            "refused-by-owner",
            "the node that runs consumer groups refused the caller's credentials for this \
             relayed consumer (a caller authenticated by a client certificate must connect \
             to that node directly)"
                .into(),
        ),
        429 => Problem::rate_limited("principal", Duration::from_secs(1)),
        _ => gone(&format!(
            "refused this node's WebSocket with status {status}"
        )),
    }
}

/// 503: the relay to the owner could not start or has ended; the client joins again.
fn gone(why: &str) -> Problem {
    Problem::from(Error::Unavailable(format!(
        "the node that runs consumer groups and sagas {why}; join the group again"
    )))
}
