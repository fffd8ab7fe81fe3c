//! The MQTT gateway: the device-facing endpoint (DESIGN section 2).
//!
//! Bytes flow [`listener`] → [`connection`] (one task per connection) → [`codec`]
//! (bytes ↔ packets) → [`session`] (the protocol, without I/O; [`topic`] is the topic
//! contract) → actions that the connection executes against the capability
//! [`services`]. A CONNECT with a provisioning username goes to [`provisioning`]
//! instead (the DPS device contract). [`connections`] is the table of live connections that other
//! capabilities deliver through and that revocations close.

pub mod codec;
pub mod connection;
pub mod connections;
pub mod listener;
pub mod metrics;
pub mod provisioning;
pub mod services;
pub mod session;
pub mod tls;
pub mod topic;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::auth::device::DeviceAuthenticator;
use crate::delivery::SessionStore;
use crate::registry::{DeviceId, Presence, Registry, RegistryError, RegistryEvent};
use connections::Connections;
use metrics::GatewayMetrics;
use services::DeviceServices;
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
    /// Answers provisioning clients (`{idScope}/registrations/…` usernames); without
    /// it such a CONNECT is handled as a device's.
    pub provisioning: Option<crate::provisioning::Provisioning>,
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
    ctx: Arc<GatewayContext>,
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
            ctx: self.ctx,
            shutdown,
            tasks,
            slots,
            max_connections: self.max_connections,
        }
    }
}

impl RunningGateway {
    /// MQTT over WebSocket for the HTTPS listener: sessions that share this
    /// gateway's connection slots and shutdown.
    pub fn websocket(&self) -> websocket::WebSocketGateway {
        websocket::WebSocketGateway {
            ctx: Arc::clone(&self.ctx),
            slots: Arc::clone(&self.slots),
            shutdown: self.shutdown.subscribe(),
        }
    }

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

/// Closes the live connection of a device that is disabled or deleted, or whose
/// credential was changed away.
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
            Ok(RegistryEvent::CredentialsChanged(device)) => {
                recheck(&registry, &connections, &device).await;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Events were lost: check every connected device against the registry.
                for device in connections.devices() {
                    recheck(&registry, &connections, &device).await;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Closes `device`'s live connection unless the registry still accepts the credential
/// it connected with (the registry's current record is read after the change, so a
/// later change is judged too).
async fn recheck(registry: &Registry, connections: &Connections, device: &DeviceId) {
    let current = match registry.get(device).await {
        Ok(current) => Some(current),
        Err(RegistryError::NotFound(_)) => None,
        Err(err) => {
            // Unknown state: closing is safe (the device reconnects and is checked
            // afresh); keeping a possibly revoked connection is not.
            tracing::warn!(%device, error = %err, "cannot read the device; closing its connection");
            None
        }
    };
    let closed = connections.close_if(device, CloseReason::CredentialRevoked, |credential| {
        current
            .as_ref()
            .is_none_or(|current| credential.check(current).is_err())
    });
    if closed {
        tracing::info!(%device, "closed a connection whose credential is no longer valid");
    }
}

#[cfg(test)]
mod tests {
    //! A registry change that lands between a CONNECT's registry read and the
    //! connection's registration, made deterministic: the session store, which the
    //! connection reads exactly in that window, makes the change.

    use async_trait::async_trait;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::auth::jwt::JwtPolicy;
    use crate::auth::x509::DeviceCa;
    use crate::delivery::{StoredSession, Subscription};
    use crate::registry::{
        AuthenticationSpec, DeviceSpec, DeviceStatus, IfMatch, SymmetricKeySpec,
    };
    use crate::storage::StoreError;
    use crate::store::embedded::EmbeddedStore;

    #[derive(Clone, Copy, Debug)]
    enum Change {
        Disable,
        Delete,
        RotatePrimaryKey,
        RotateSecondaryKey,
        /// No registry change; the store holds a session an earlier device of the same
        /// id left behind (deleted, created again, and a CONNECT racing the delete).
        StaleSession,
    }

    /// A session store whose `load` applies `change` to the registry first.
    struct ChangingSessions {
        registry: Registry,
        change: Change,
    }

    #[async_trait]
    impl SessionStore for ChangingSessions {
        async fn load(&self, device: &DeviceId) -> Result<Option<StoredSession>, StoreError> {
            let key = |primary: bool| SymmetricKeySpec {
                primary_key: primary.then(|| STANDARD.encode([9u8; 32])),
                secondary_key: (!primary).then(|| STANDARD.encode([9u8; 32])),
            };
            let rotate = |primary: bool| DeviceSpec {
                authentication: Some(AuthenticationSpec {
                    symmetric_key: Some(key(primary)),
                    ..AuthenticationSpec::default()
                }),
                ..DeviceSpec::default()
            };
            let changed = match self.change {
                Change::Disable => {
                    let disable = DeviceSpec {
                        status: Some(DeviceStatus::Disabled),
                        ..DeviceSpec::default()
                    };
                    self.registry
                        .update(device.clone(), disable, IfMatch::Any)
                        .await
                }
                Change::Delete => self.registry.delete(device, None).await,
                Change::StaleSession => {
                    return Ok(Some(StoredSession {
                        generation_id: "an earlier device".into(),
                        subscriptions: [Subscription::Methods].into(),
                    }));
                }
                Change::RotatePrimaryKey => {
                    self.registry
                        .update(device.clone(), rotate(true), IfMatch::Any)
                        .await
                }
                Change::RotateSecondaryKey => {
                    self.registry
                        .update(device.clone(), rotate(false), IfMatch::Any)
                        .await
                }
            };
            changed.map_err(|err| StoreError::Backend(err.to_string()))?;
            Ok(None)
        }

        async fn save(
            &self,
            _device: &DeviceId,
            _session: &StoredSession,
        ) -> Result<(), StoreError> {
            Ok(())
        }

        async fn remove(&self, _device: &DeviceId) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// A gateway context over `registry` with `sessions`.
    fn context(
        registry: Registry,
        presence: Presence,
        sessions: Arc<dyn SessionStore>,
    ) -> Arc<GatewayContext> {
        let ca = certs::Ca::generate("test CA").unwrap();
        Arc::new(GatewayContext {
            authenticator: DeviceAuthenticator::new(
                registry,
                "localhost".into(),
                DeviceCa::from_pem(ca.cert_pem()).unwrap(),
                JwtPolicy::default(),
                Duration::from_secs(3600),
            ),
            sessions,
            connections: Connections::default(),
            services: DeviceServices::not_yet_available(),
            presence,
            metrics: Arc::default(),
            limits: SessionLimits::default(),
            max_packet_size: 64 * 1024,
            provisioning: None,
        })
    }

    /// Connects a SAS device (primary key) while `change` lands in the window; returns
    /// the CONNACK code, whether the hub then closed the connection, and the gateway.
    async fn connect_while(change: Change) -> (ConnectReturnCode, bool, Arc<GatewayContext>, bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let presence = Presence::default();
        let registry = Registry::new(Arc::new(store), presence.clone());
        let id = DeviceId::parse("racer").unwrap();
        let device = registry
            .create(id.clone(), DeviceSpec::default())
            .await
            .unwrap();
        let key = device.authentication.symmetric_key.unwrap().primary_key;
        let ctx = context(
            registry.clone(),
            presence.clone(),
            Arc::new(ChangingSessions {
                registry: registry.clone(),
                change,
            }),
        );
        let (_stop, stopped) = watch::channel(false);
        tokio::spawn(revoke_on_registry_change(
            registry.clone(),
            registry.subscribe(),
            ctx.connections.clone(),
            stopped.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = {
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                connection::serve(
                    stream,
                    Vec::new(),
                    ctx,
                    stopped,
                    tokio::time::Instant::now(),
                )
                .await;
            })
        };

        let mut client = TcpStream::connect(addr).await.unwrap();
        let token = crate::auth::sas::sign(
            "localhost",
            "racer",
            &STANDARD.decode(key).unwrap(),
            crate::auth::unix_now() + 600,
        );
        let mut connect = Connect::new("racer");
        connect.clean_session = false;
        connect.login = Some(Login::new("localhost/racer/?api-version=1", token));
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .unwrap();
        client.write_all(&out).await.unwrap();

        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        let mut closed = false;
        // Read the CONNACK, then see whether the hub closes the connection; a
        // PINGREQ keeps an open one answering, so this never waits on a timer.
        while !closed && packets.len() < 2 {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(packet) => {
                    packets.push(packet);
                    if packets.len() == 1 {
                        let mut ping = BytesMut::new();
                        Packet::PingReq.write(&mut ping, usize::MAX).unwrap();
                        // Refused connections may already be gone.
                        let _ = client.write_all(&ping).await;
                    }
                    continue;
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => panic!("undecodable packet: {err}"),
            }
            match tokio::time::timeout(Duration::from_secs(10), client.read_buf(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => closed = true,
                Ok(Ok(_)) => {}
                Err(_) => panic!("no answer from the hub"),
            }
        }
        let (code, session_present) = match packets.first() {
            Some(Packet::ConnAck(ack)) => (ack.code, ack.session_present),
            other => panic!("expected a CONNACK, got {other:?}"),
        };
        if closed {
            server.await.unwrap();
        }
        (code, closed, ctx, session_present)
    }

    #[tokio::test]
    async fn a_change_between_the_registry_read_and_the_registration_is_not_missed() {
        for change in [Change::Disable, Change::Delete, Change::RotatePrimaryKey] {
            let (code, closed, ctx, _) = connect_while(change).await;
            assert_eq!(code, ConnectReturnCode::NotAuthorized, "{change:?}");
            assert!(closed, "{change:?}");
            let id = DeviceId::parse("racer").unwrap();
            assert!(!ctx.connections.is_connected(&id), "{change:?}");
            assert!(
                ctx.presence.get(&id).is_none_or(|p| !p.connected),
                "{change:?}"
            );
        }
        // A change that leaves the connection's own key registered does not refuse it.
        let (code, closed, _ctx, _) = connect_while(Change::RotateSecondaryKey).await;
        assert_eq!(code, ConnectReturnCode::Success);
        assert!(!closed);
    }

    #[tokio::test]
    async fn a_session_left_by_an_earlier_device_of_the_same_id_is_not_restored() {
        let (code, closed, _ctx, session_present) = connect_while(Change::StaleSession).await;
        assert_eq!(code, ConnectReturnCode::Success);
        assert!(!closed);
        assert!(
            !session_present,
            "the earlier device's session was restored"
        );
    }

    /// The task of an idle plain-TCP connection is most of what the hub holds per
    /// connection (issue 28): its future stays small; the large futures of rare steps
    /// (authentication, provisioning) are boxed while they run.
    #[tokio::test]
    async fn a_plain_tcp_connection_task_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap());
        let presence = Presence::default();
        let registry = Registry::new(store.clone(), presence.clone());
        let ctx = context(registry, presence, store);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (_stop, stopped) = watch::channel(false);
        let task = connection::serve(
            stream,
            Vec::new(),
            ctx,
            stopped,
            tokio::time::Instant::now(),
        );
        let size = std::mem::size_of_val(&task);
        // Debug build: 5,512 bytes with authentication, the first read and the
        // provisioning session inline; 1,360 with them boxed.
        assert!(size <= 1440, "a connection task's future is {size} bytes");
    }
}
