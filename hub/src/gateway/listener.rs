//! Accept loops for the MQTT listeners (TCP and TLS): a listen backlog that absorbs
//! connect bursts, a cap on open connections, and survival when file descriptors run
//! out (the new connection waits in the backlog; the open ones keep being served).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::{GatewayContext, connection};

/// Pending connections the kernel queues per listener (Mosquitto uses 100, which
/// makes connects wait a second once a few hundred are in flight).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until `shutdown` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<GatewayContext>,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fd_warned = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                fd_warned = false;
                accepted
            }
            Err(err) if is_out_of_fds(&err) => {
                ctx.metrics.refused_no_fds.fetch_add(1, Ordering::Relaxed);
                if !fd_warned {
                    tracing::warn!(error = %err, "out of file descriptors: new connections wait");
                    fd_warned = true;
                }
                // Leave the connection in the backlog; retry once descriptors free up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(err) => {
                tracing::debug!(error = %err, "accept failed");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            ctx.metrics.refused_at_limit.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection refused: mqtt.max_connections reached");
            drop(stream);
            continue;
        };
        ctx.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        // Moved into the task: dropped when it ends, however it ends (a panic too).
        let open = ctx.metrics.open_connection();
        let ctx = Arc::clone(&ctx);
        let shutdown = shutdown.clone();
        let _ = stream.set_nodelay(true);
        // Two task types: a plain TCP connection's task must not carry the (much
        // larger) TLS future, since idle connections are mostly this task's memory.
        match &tls {
            None => {
                tokio::spawn(async move {
                    let _held = (open, permit);
                    connection::serve(stream, Vec::new(), ctx, shutdown, Instant::now()).await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _held = (open, permit);
                    serve_tls(stream, acceptor, ctx, shutdown).await;
                });
            }
        }
    }
}

async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    ctx: Arc<GatewayContext>,
    shutdown: watch::Receiver<bool>,
) {
    // The handshake counts against the first-CONNECT deadline: one budget for both.
    let accepted_at = Instant::now();
    match tokio::time::timeout(ctx.limits.connect_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let certificates = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            connection::serve(tls_stream, certificates, ctx, shutdown, accepted_at).await;
        }
        Ok(Err(err)) => {
            ctx.metrics.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %err, "TLS handshake failed");
        }
        Err(_) => {
            ctx.metrics.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("TLS handshake timed out");
        }
    }
}

fn is_out_of_fds(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}
