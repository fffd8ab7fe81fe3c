//! The AMQP 1.0 service endpoint: what Azure back ends speak to IoT Hub over AMQP.
//! `azure-iothub`'s `Client` sends cloud-to-device messages and reads their feedback;
//! Event Hubs clients (`@azure/event-hubs`, Python `azure-eventhub`) read telemetry
//! from the Event Hub-compatible entity. DESIGN section 7 is the contract.
//!
//! A connection flows through:
//! - [`io`]: TLS (or none), then the 8-byte protocol header decides SASL or not;
//! - `fe2o3-amqp`'s acceptor: framing, the connection, sessions and links;
//! - [`sasl`]: ANONYMOUS / MSSBCBS / EXTERNAL defer to CBS, PLAIN checks a policy token;
//! - [`connection`]: one task per connection and per session; each attach is routed by
//!   its [`address`] to a link task and refused unless a [`claims`] entry covers it;
//! - [`cbs`]: `$cbs` put-token → a claim; [`c2d`]: `/messages/devicebound` →
//!   the Commands capability; [`feedback`]: `/messages/serviceBound/feedback` ←
//!   Commands; [`eventhub`]: `$management` READ and partition receivers ← Telemetry,
//!   starting where the selector [`filter`] says;
//! - [`websocket`]: the same over WebSockets (`AMQPWSB10`) on the HTTPS listener.
//!
//! The edge uses the capabilities only (auth policies, commands, telemetry), never
//! another edge or a backend.

pub mod address;
pub mod c2d;
pub mod cbs;
pub mod claims;
pub mod connection;
pub mod eventhub;
pub mod feedback;
pub mod filter;
pub mod io;
pub mod sasl;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::auth::policy::Policies;
use crate::commands::Commands;
use crate::config::Config;
use crate::telemetry::Telemetry;

/// Bounds of the endpoint (`[amqp]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct AmqpLimits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Sessions per connection.
    pub max_sessions: u16,
    /// Links per session.
    pub max_links_per_session: u32,
    /// Largest frame.
    pub max_frame_size: u32,
    /// Largest message on a link.
    pub max_message_bytes: u64,
    /// Time for TLS and the protocol header (and SASL and open).
    pub handshake_timeout: Duration,
}

/// What every connection needs: the capabilities and the hub's names.
#[derive(Debug, Clone)]
pub struct AmqpContext {
    /// Shared access policies (CBS and SASL PLAIN tokens).
    pub policies: Arc<Policies>,
    /// C2D queues and feedback.
    pub commands: Commands,
    /// Telemetry partitions.
    pub telemetry: Arc<Telemetry>,
    /// The hub's host name (tokens' `sr`).
    pub hostname: String,
    /// The Event Hub-compatible entity name.
    pub entity: String,
    /// Bounds.
    pub limits: AmqpLimits,
    /// When this hub started (the entity's `created_at`).
    pub created: time::OffsetDateTime,
}

impl AmqpContext {
    /// The context for `config`.
    pub fn new(
        config: &Config,
        policies: Arc<Policies>,
        commands: Commands,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let a = &config.amqp;
        Self {
            policies,
            commands,
            telemetry,
            hostname: config.hostname.clone(),
            entity: config.event_hub_name(),
            limits: AmqpLimits {
                max_connections: a.max_connections,
                max_sessions: a.max_sessions,
                max_links_per_session: a.max_links_per_session,
                max_frame_size: a.max_frame_size,
                max_message_bytes: a.max_message_bytes,
                handshake_timeout: Duration::from_secs(a.handshake_timeout_secs),
            },
            created: time::OffsetDateTime::now_utc(),
        }
    }
}

/// The bound AMQP listeners.
#[derive(Debug)]
pub struct AmqpListeners {
    tls: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    tcp: Option<TcpListener>,
}

impl AmqpListeners {
    /// Binds `amqp.tls_listen` and, when set, `amqp.tcp_listen`. The error names the
    /// listener and address.
    pub async fn bind(
        config: &Config,
        tls_config: Arc<rustls::ServerConfig>,
    ) -> Result<Self, (&'static str, SocketAddr, std::io::Error)> {
        let tls_addr = config.amqp.tls_listen;
        let tls = TcpListener::bind(tls_addr)
            .await
            .map_err(|err| ("amqps", tls_addr, err))?;
        let tcp = match config.amqp.tcp_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|err| ("amqp", addr, err))?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            tls_config,
            tcp,
        })
    }

    /// The bound addresses: AMQP over TLS, plain AMQP.
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, Option<SocketAddr>)> {
        let tcp = match &self.tcp {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        };
        Ok((self.tls.local_addr()?, tcp))
    }

    /// Serves until `stopped` turns true; then stops accepting and closes every
    /// connection.
    pub fn spawn(
        self,
        context: AmqpContext,
        stopped: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let context = Arc::new(context);
        let slots = Arc::new(Semaphore::new(context.limits.max_connections));
        tokio::spawn(async move {
            let tls = tokio::spawn(accept_loop(
                self.tls,
                Some(TlsAcceptor::from(self.tls_config)),
                Arc::clone(&context),
                Arc::clone(&slots),
                stopped.clone(),
            ));
            let tcp = self.tcp.map(|listener| {
                tokio::spawn(accept_loop(
                    listener,
                    None,
                    Arc::clone(&context),
                    Arc::clone(&slots),
                    stopped.clone(),
                ))
            });
            let _ = tls.await;
            if let Some(tcp) = tcp {
                let _ = tcp.await;
            }
        })
    }
}

/// Completes once `stopped` turns true (or its sender is gone).
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, not held across the caller's awaits.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Accepts connections until stopped; each runs in its own task holding a slot.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    context: Arc<AmqpContext>,
    slots: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Waiting for a slot first: over the limit, clients wait in the backlog.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stopping(&mut stopped) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(%err, "amqp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopping(&mut stopped) => break,
        };
        let _ = stream.set_nodelay(true);
        let context = Arc::clone(&context);
        let tls = tls.clone();
        let stopped = stopped.clone();
        connections.spawn(async move {
            connection::serve_tcp(context, stream, peer, tls, stopped).await;
            drop(slot);
        });
        // Reap finished connections so the set stays as large as what is open.
        while connections.try_join_next().is_some() {}
    }
    // Connections see `stopped` and close themselves; give them a moment.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}
