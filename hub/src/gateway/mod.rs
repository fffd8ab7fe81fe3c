//! The MQTT gateway: the device-facing endpoint (DESIGN section 2).
//!
//! Bytes flow [`listener`] → [`connection`] (one task per connection) → [`codec`]
//! (bytes ↔ packets) → [`session`] (the protocol, without I/O; [`topic`] is the topic
//! contract) → actions that the connection executes against the capability
//! [`services`]. [`connections`] is the table of live connections that other
//! capabilities deliver through and that revocations close.

pub mod codec;
pub mod connection;
pub mod connections;
pub mod listener;
pub mod metrics;
pub mod services;
pub mod session;
pub mod tls;
pub mod topic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::auth::device::DeviceAuthenticator;
use crate::registry::{Presence, Registry, RegistryEvent};
use connections::Connections;
use metrics::GatewayMetrics;
use services::{DeviceServices, SessionStore};
use session::{CloseReason, SessionLimits};

/// What every connection task shares.
pub struct GatewayContext {
    /// Checks CONNECT credentials.
    pub authenticator: DeviceAuthenticator,
    /// Persisted sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Live connections.
    pub connections: Connections,
    /// Where device traffic goes.
    pub services: DeviceServices,
    /// Live device state for the registry views.
    pub presence: Presence,
    /// Counters.
    pub metrics: Arc<GatewayMetrics>,
    /// Session limits.
    pub limits: SessionLimits,
    /// Largest MQTT packet accepted.
    pub max_packet_size: usize,
}

impl std::fmt::Debug for GatewayContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayContext").finish_non_exhaustive()
    }
}

/// Bound, not yet accepting, listeners.
pub struct Gateway {
    ctx: Arc<GatewayContext>,
    tcp: TcpListener,
    tls: TcpListener,
    acceptor: TlsAcceptor,
    max_connections: usize,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("tcp", &self.tcp)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct RunningGateway {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    slots: Arc<Semaphore>,
    max_connections: usize,
}

/// How long shutdown waits for connections to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Gateway {
    /// Binds both listeners.
    pub fn bind(
        ctx: GatewayContext,
        tcp: SocketAddr,
        tls: SocketAddr,
        tls_config: Arc<rustls::ServerConfig>,
        max_connections: usize,
    ) -> Result<Self, (&'static str, SocketAddr, std::io::Error)> {
        let tcp_listener = listener::bind(tcp).map_err(|err| ("mqtt", tcp, err))?;
        let tls_listener = listener::bind(tls).map_err(|err| ("mqtts", tls, err))?;
        Ok(Self {
            ctx: Arc::new(ctx),
            tcp: tcp_listener,
            tls: tls_listener,
            acceptor: TlsAcceptor::from(tls_config),
            max_connections,
        })
    }

    /// The bound addresses (TCP, TLS).
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.tcp.local_addr()?, self.tls.local_addr()?))
    }

    /// The shared context (connection table, metrics).
    pub fn context(&self) -> &Arc<GatewayContext> {
        &self.ctx
    }

    /// Starts accepting; `revocations` closes connections of disabled or deleted
    /// devices at once.
    pub fn start(self, registry: &Registry) -> RunningGateway {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.max_connections));
        let tasks = vec![
            tokio::spawn(listener::accept_loop(
                self.tcp,
                None,
                Arc::clone(&self.ctx),
                Arc::clone(&slots),
                shutdown_rx.clone(),
            )),
            tokio::spawn(listener::accept_loop(
                self.tls,
                Some(self.acceptor),
                Arc::clone(&self.ctx),
                Arc::clone(&slots),
                shutdown_rx.clone(),
            )),
            tokio::spawn(revoke_on_registry_change(
                registry.clone(),
                registry.subscribe(),
                self.ctx.connections.clone(),
                shutdown_rx,
            )),
        ];
        RunningGateway {
            shutdown,
            tasks,
            slots,
            max_connections: self.max_connections,
        }
    }
}

impl RunningGateway {
    /// Stops accepting, closes every connection and waits (bounded) for them to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(DRAIN_TIMEOUT, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the drain timeout");
        }
    }
}

/// Closes the live connection of a device that is disabled or deleted.
async fn revoke_on_registry_change(
    registry: Registry,
    mut events: broadcast::Receiver<RegistryEvent>,
    connections: Connections,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(RegistryEvent::Revoked(device)) => {
                if connections.close(&device, CloseReason::DeviceRevoked) {
                    tracing::info!(%device, "closed the connection of a disabled or deleted device");
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Events were lost: check every connected device against the registry.
                for device in connections.devices() {
                    let enabled = matches!(
                        registry.get(&device).await,
                        Ok(d) if d.status == crate::registry::DeviceStatus::Enabled
                    );
                    if !enabled {
                        connections.close(&device, CloseReason::DeviceRevoked);
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
