//! The accept loop: HTTP/1.1 connections (with upgrades, for WebSocket) served by the router,
//! each able to be closed from inside a handler, and a graceful shutdown that lets requests in
//! flight finish.
//!
//! `axum::serve` cannot close one connection on demand. A Server-Sent Events response to a
//! client that stopped reading is stuck behind a full socket, where hyper never polls its body
//! again; the only way to free it is to drop the connection, which [`Connection::close_now`]
//! asks this loop to do.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tower::ServiceExt;

/// How long a graceful shutdown waits for open connections before it drops them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A handle to the connection a request arrived on, in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    close: Arc<Notify>,
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
    // Every connection task holds a sender; once all are dropped, every connection is done.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let stopping = watch::Sender::new(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
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
        tokio::spawn(serve_connection(
            tcp,
            app.clone(),
            stopping.subscribe(),
            open_tx.clone(),
        ));
    }
    drop(listener);
    stopping.send_replace(true);
    drop(open_tx);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, open_rx.recv()).await;
    Ok(())
}

async fn serve_connection(
    tcp: TcpStream,
    app: Router,
    mut stopping: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) {
    let connection = Connection::default();
    let close = Arc::clone(&connection.close);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(connection.clone());
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
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
