//! The HTTP listener's accept loop: a cap on open connections, a header read timeout
//! that also closes idle keep-alive connections, and graceful shutdown.
//!
//! `axum::serve` has neither a header timeout nor a connection cap, so a client that
//! sends half a request header and stalls would hold its socket forever. Here every
//! connection is served by hyper's HTTP/1 connection with a timer: a header that is
//! not complete within the timeout, or a keep-alive connection that sends no next
//! request within it, is closed. A semaphore caps open connections: at the cap the
//! loop stops accepting, so the next connection waits in the kernel's listen backlog
//! until one closes (stalled clients go within the header timeout). A request body
//! that stalls for as long is cut off too.
//!
//! The HTTPS listener is the same loop with a TLS acceptor: the handshake runs in the
//! connection's task within the header timeout, and the client certificates it saw
//! travel with every request as [`PeerCertificates`] (MQTT over WebSocket
//! authenticates X.509 devices with them).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

/// Limits of the HTTP listener itself (the per-request limits are layers of the
/// router, see `crate::api::router`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most open connections, WebSockets included.
    pub max_connections: usize,
    /// Time to send a whole request header, and that an idle keep-alive connection
    /// stays open.
    pub header_timeout: Duration,
}

/// One of the [`ConnectionLimits::max_connections`] slots, held while the connection
/// is open. Every request carries it as an extension so that a WebSocket, which
/// outlives its HTTP connection, keeps the slot until it closes.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The certificate chain the client presented in the TLS handshake (empty over plain
/// HTTP or when it sent none), carried by every request of the connection.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificates(pub Arc<Vec<CertificateDer<'static>>>);

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting,
/// lets every connection finish its request in flight (idle ones close at once) and
/// returns when all have closed. With `tls`, every connection is a TLS one.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the cap nothing is accepted and new connections wait
        // in the backlog rather than being accepted only to be dropped. Cancelling the
        // wait on shutdown loses nothing.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        // Cancelling `accept` on shutdown drops no connection: none was taken yet.
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
        };
        // Finished connections leave the set here, so it holds only open ones.
        while connections.try_join_next().is_some() {}
        tracing::trace!(%peer, "http connection");
        connections.spawn(accept_connection(
            stream,
            tls.clone(),
            router.clone(),
            ConnectionSlot(Arc::new(slot)),
            limits.header_timeout,
            stopping.clone(),
        ));
    }
    drop(listener);
    // Every receiver was cloned before this send, so each one sees it.
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Errors of `accept` concern one connection (reset before it was accepted) or the
/// process (out of descriptors). The latter would spin; back off briefly, as
/// `axum::serve` does, until descriptors free up.
async fn accept_error(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %err, "http accept failed; retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs the TLS handshake when the listener has one, then serves the connection.
async fn accept_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    router: Router,
    slot: ConnectionSlot,
    header_timeout: Duration,
    stopping: watch::Receiver<bool>,
) {
    let Some(acceptor) = tls else {
        let peer = PeerCertificates::default();
        serve_connection(stream, peer, router, slot, header_timeout, stopping).await;
        return;
    };
    // The handshake shares the header's budget: a client that stalls in it goes as
    // soon as one that stalls in its header would.
    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let chain = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let peer = PeerCertificates(Arc::new(chain));
            serve_connection(stream, peer, router, slot, header_timeout, stopping).await;
        }
        Ok(Err(err)) => tracing::debug!(error = %err, "https: TLS handshake failed"),
        Err(_) => tracing::debug!("https: TLS handshake timed out"),
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: PeerCertificates,
    router: Router,
    slot: ConnectionSlot,
    header_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request_slot = slot.clone();
    let service = router.map_request(move |request: Request<Incoming>| {
        // A body that stops arriving for as long as a header may take fails the
        // request (400) instead of holding its request slot forever.
        let mut request = request.map(|body| Body::new(TimeoutBody::new(header_timeout, body)));
        request.extensions_mut().insert(request_slot.clone());
        request.extensions_mut().insert(peer.clone());
        request
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        // Shutdown (the only change ever sent). Safe to leave the `select!`: the
        // connection future is pinned above and polled to its end below.
        _ = stopping.changed() => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            // Finish the request in flight, then close; an idle connection closes now.
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(err) = result {
        // Timeouts, resets and malformed requests are the client's business.
        tracing::debug!(error = %err, "http connection closed with an error");
    }
    drop(slot);
}
