//! The accept loop: HTTP/1.1 connections (with upgrades, for WebSocket) and HTTP/2 ones (for
//! gRPC), over TCP or TLS, served by the router, each able to be closed from inside a handler, and a graceful shutdown
//! that lets requests in flight finish. It also enforces the connection limit, the header size
//! and the header-read timeout, and tells handlers the peer's address and client certificate.
//!
//! `axum::serve` cannot close one connection on demand. A Server-Sent Events response to a
//! client that stopped reading is stuck behind a full socket, where hyper never polls its body
//! again; the only way to free it is to drop the connection, which [`Connection::close_now`]
//! asks this loop to do.
//!
//! The protocol is chosen per connection: by ALPN on TLS, and on plain TCP by whether the
//! client opens with the HTTP/2 preface (prior knowledge, as gRPC clients do). Both waits fall
//! under the header-read timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skald_security::TlsSource;
use skald_security::x509::Subject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tower::ServiceExt;

/// How long a graceful shutdown waits for open connections before it drops them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Most calls open at once on one HTTP/2 connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// A handle to the connection a request arrived on, in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    close: Arc<Notify>,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The subject of the client certificate rustls verified, on an mTLS connection.
    pub certificate: Option<Arc<Subject>>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// How the listener treats connections.
#[derive(Clone)]
pub struct ListenOptions {
    /// TLS material; plain TCP without it.
    pub tls: Option<Arc<TlsSource>>,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: usize,
    /// A client that takes longer than this for its TLS handshake or a request's headers is
    /// dropped.
    pub header_read_timeout: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            tls: None,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl Connection {
    /// Drops the connection at once, without waiting for its responses to be written.
    pub fn close_now(&self) {
        self.close.notify_one();
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits (up to
/// [`SHUTDOWN_GRACE`]) for open connections to finish. Handlers that stream forever (the
/// subscriptions) must end on their own signal for this to be quick.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, app, ListenOptions::default(), shutdown).await
}

/// [`serve`] with TLS and limits.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    options: ListenOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Every connection task holds a sender; once all are dropped, every connection is done.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let stopping = watch::Sender::new(false);
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        // At the connection limit, stop accepting: new clients wait in the backlog.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Each response is written whole at once; Nagle's algorithm would only delay it.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let stopping = stopping.subscribe();
        let open = open_tx.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut connection = Connection {
                peer: Some(peer),
                ..Connection::default()
            };
            match &options.tls {
                None => {
                    let Some(h2) = opens_with_h2_preface(&tcp, options.header_read_timeout).await
                    else {
                        return;
                    };
                    serve_connection(tcp, h2, connection, app, &options, stopping, open).await
                }
                Some(tls) => {
                    // Taken before the material the handshake uses: a reload during the
                    // handshake then counts as one to check the client certificate against.
                    let reloads = tls.reloads();
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                    let handshake =
                        tokio::time::timeout(options.header_read_timeout, acceptor.accept(tcp));
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tls.handshake_failed(peer.ip(), &e);
                            return;
                        }
                        Err(_) => {
                            let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
                            tls.handshake_failed(peer.ip(), &timeout);
                            return;
                        }
                    };
                    connection.tls = true;
                    let chain = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(<[_]>::to_vec)
                        .unwrap_or_default();
                    connection.certificate = chain.first().and_then(|leaf| {
                        let mut subject = skald_security::x509::subject(leaf)?;
                        subject.not_after =
                            skald_security::x509::validity(leaf).map(|(_, after)| after);
                        Some(Arc::new(subject))
                    });
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    if chain.is_empty() {
                        return serve_connection(
                            stream, h2, connection, app, &options, stopping, open,
                        )
                        .await;
                    }
                    // The watcher cuts the connection (and whatever an upgrade handed it to)
                    // when the certificate is no longer accepted; it ends with the connection.
                    let wire = Arc::new(Tripwire::default());
                    let watcher = Arc::clone(&wire);
                    let tls = Arc::clone(tls);
                    tokio::spawn(async move {
                        tokio::select! {
                            () = while_trusted(tls, chain, peer.ip(), reloads) => watcher.trip(),
                            () = watcher.gone.notified() => {}
                        }
                    });
                    let io = Guarded { io: stream, wire };
                    serve_connection(io, h2, connection, app, &options, stopping, open).await
                }
            }
        });
    }
    drop(listener);
    stopping.send_replace(true);
    drop(open_tx);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv()).await;
    Ok(())
}

/// Whether a plain-TCP client opens with the HTTP/2 preface (`PRI * HTTP/2.0...`) rather than
/// an HTTP/1 request line, looking at its first bytes without taking them; `None` when it
/// closes or sends nothing in time.
async fn opens_with_h2_preface(tcp: &TcpStream, timeout: Duration) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // "P" or "PR" so far (it could still be POST): wait for the next bytes.
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(1)),
        )
        .await;
    }
}

/// Cuts an IO: once tripped, every read and write of the `Guarded` IO fails, and whoever
/// waits on one is woken. A connection whose client certificate is no longer accepted is cut
/// this way, which also reaches a WebSocket that an upgrade took out of hyper's hands.
#[derive(Default)]
struct Tripwire {
    tripped: AtomicBool,
    /// The tasks waiting to read and to write.
    wakers: Mutex<[Option<Waker>; 2]>,
    /// Told when the IO is dropped, so that its watcher ends too.
    gone: Notify,
}

impl Tripwire {
    fn trip(&self) {
        self.tripped.store(true, Ordering::SeqCst);
        for waker in self.wakers.lock().expect("tripwire lock").iter_mut() {
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
    }

    /// `Err` once tripped; otherwise remembers who to wake (slot 0 reads, 1 writes).
    fn check(&self, slot: usize, cx: &Context<'_>) -> std::io::Result<()> {
        let cut = || {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the client certificate is no longer accepted",
            )
        };
        if self.tripped.load(Ordering::SeqCst) {
            return Err(cut());
        }
        {
            let mut wakers = self.wakers.lock().expect("tripwire lock");
            match &mut wakers[slot] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
        }
        // Tripped after the first look: `trip` either saw the waker or is seen here.
        if self.tripped.load(Ordering::SeqCst) {
            return Err(cut());
        }
        Ok(())
    }
}

/// An IO behind a [`Tripwire`].
struct Guarded<T> {
    io: T,
    wire: Arc<Tripwire>,
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        self.wire.gone.notify_one();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.wire.check(0, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.wire.check(1, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.wire.check(1, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.wire.check(1, cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Returns when the client certificate a connection presented is no longer accepted: after
/// a reload of the TLS files (one during the handshake included) that revokes it or no
/// longer trusts its CA, or when it expires.
async fn while_trusted(
    tls: Arc<TlsSource>,
    chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    peer: std::net::IpAddr,
    mut reloads: watch::Receiver<u64>,
) {
    // The earliest end of the chain presented: an intermediate may expire before the leaf.
    let mut not_after = chain
        .iter()
        .filter_map(|cert| skald_security::x509::validity(cert).map(|(_, after)| after))
        .min();
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // Long waits are cut into days: the timer does not take centuries.
        let wait = not_after.map_or(86_400, |t| (t + 1 - now).clamp(0, 86_400)) as u64;
        tokio::select! {
            changed = reloads.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
            () = tokio::time::sleep(Duration::from_secs(wait)) => {
                if not_after.is_none_or(|t| t >= now + wait as i64) {
                    continue;
                }
                // Checked once at expiry; should the clock say otherwise, again in a minute.
                not_after = Some(now + wait as i64 + 60);
            }
        }
        if let Err((reason, detail)) = tls.verify_client(&chain) {
            tls.connection_distrusted(peer, reason, detail);
            return;
        }
    }
}

async fn serve_connection<T>(
    io: T,
    h2: bool,
    connection: Connection,
    app: Router,
    options: &ListenOptions,
    mut stopping: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let close = Arc::clone(&connection.close);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(connection.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(options.max_header_bytes as u32)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // A peer that vanished without a FIN is found by a ping it does not answer.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return,
            () = close.notified() => return,
            _ = stopping.wait_for(|stopping| *stopping) => {}
        }
        // GOAWAY: the calls in flight finish, no new ones start.
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            _ = conn.as_mut() => {}
            () = close.notified() => {}
        }
        return;
    }
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = close.notified() => return,
        _ = stopping.wait_for(|stopping| *stopping) => {}
    }
    // Finish the request in flight (if any), then close.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = close.notified() => {}
    }
}
