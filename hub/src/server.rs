//! Start-up and shutdown of a hub: open the data directory, certificates, owner key
//! and store; bind the listeners; report the endpoints; serve until told to stop;
//! then stop accepting, close device connections, drain requests, close the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use certs::SubjectAltNames;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

mod certificates;

pub use certificates::{CertificateError, Reloader};

use crate::amqp::{self, AmqpContext, AmqpListeners};
use crate::api::{self, AppState, HttpLimits};
use crate::auth::device::DeviceAuthenticator;
use crate::auth::jwt::JwtPolicy;
use crate::auth::policy::{Policies, PolicyFileError, PolicySet};
use crate::auth::service::{ServiceKey, ServiceKeyError};
use crate::auth::x509::{DeviceCa, X509Error};
use crate::commands::c2d::CommandStore;
use crate::commands::{CommandLimits, Commands};
use crate::config::Config;
use crate::data_dir::{self, DataDir, DataDirError, Endpoints};
use crate::delivery::SessionStore;
use crate::gateway::connections::Connections;
use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::services::DeviceServices;
use crate::gateway::session::SessionLimits;
use crate::gateway::tls::{self, TlsError};
use crate::gateway::{Gateway, GatewayContext, listener};
use crate::http::serve::ConnectionLimits;
use crate::provisioning::scope::{self, IdScope, ScopeError};
use crate::provisioning::{Provisioning, ProvisioningStore};
use crate::registry::{Presence, Registry, RegistryError};
use crate::routing::{Routing, RoutingError, RoutingSettings};
use crate::storage::{ClusterView, StoreError, StoreHealth};
use crate::store::embedded::EmbeddedStore;
use crate::store::embedded_provisioning::EmbeddedProvisioning;
use crate::store::embedded_routing::EmbeddedRouting;
use crate::store::embedded_twins::EmbeddedTwins;
use crate::store::nats::NatsStore;
use crate::store::nats::c2d::NatsCommands;
use crate::store::nats::checkpoints::NatsCheckpoints;
use crate::store::nats::nodes::NodeRouter;
use crate::store::nats::provisioning::NatsProvisioning;
use crate::store::nats::registry::NatsRegistry;
use crate::store::nats::secrets;
use crate::store::nats::sessions::NatsSessions;
use crate::store::nats::telemetry::JetStreamTelemetry;
use crate::store::nats::twins::NatsTwins;
use crate::telemetry::{Telemetry, TelemetryError};
use crate::twins::document::TwinLimits;
use crate::twins::{TwinError, TwinStore, Twins};

/// Why the hub could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory or its certificates.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The owner key.
    #[error("service key: {0}")]
    ServiceKey(#[from] ServiceKeyError),
    /// The shared access policies.
    #[error("shared access policies: {0}")]
    Policies(#[from] PolicyFileError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server certificate could not be loaded into TLS.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The device CA could not be loaded.
    #[error(transparent)]
    DeviceCa(#[from] X509Error),
    /// The operator's certificate files (`[tls]`) could not be loaded.
    #[error(transparent)]
    Certificates(#[from] CertificateError),
    /// The registry could not be read.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The twins could not be loaded.
    #[error("twins: {0}")]
    Twins(#[from] TwinError),
    /// The provisioning ID scope file could not be read or written.
    #[error("provisioning ID scope: {0}")]
    Scope(#[from] ScopeError),
    /// The telemetry streams could not be opened.
    #[error("telemetry: {0}")]
    Telemetry(#[from] TelemetryError),
    /// Routing could not start (its streams or its stored configuration).
    #[error("routing: {0}")]
    Routing(#[from] RoutingError),
    /// A listener could not be bound.
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        /// `http`, `mqtt` or `mqtts`.
        listener: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Serving failed after start-up.
    #[error("{listener} listener failed: {source}")]
    Serve {
        /// Which listener.
        listener: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A started hub: everything open and bound, not yet serving.
#[derive(Debug)]
pub struct Server {
    data_dir: DataDir,
    endpoints: Endpoints,
    http: TcpListener,
    /// The HTTPS listener (service API + MQTT over WebSocket) and its TLS, when set.
    https: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    gateway: Gateway,
    state: AppState,
    /// The NATS store, in cluster mode.
    nats: Option<NatsStore>,
    limits: HttpLimits,
    connection_limits: ConnectionLimits,
    retention_interval: Duration,
    /// Cluster mode: the task feeding the registry mirror from the bucket's changes.
    registry_feed: Option<tokio::task::JoinHandle<()>>,
    /// Cluster mode: presence, heartbeat and routing to the other hub nodes.
    router: Option<NodeRouter>,
    /// The AMQP listeners and what their connections use.
    amqp: (AmqpListeners, AmqpContext),
    /// Reloads the operator's certificates (`[tls]`) into the live TLS and device CA.
    cert_reloader: Reloader,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl Server {
    /// Starts a hub.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        Self::start_with(config, |services| services).await
    }

    /// Opens the data directory (creating CA, server certificate and owner key on
    /// first start), the store and the telemetry streams, binds the listeners, writes
    /// `endpoints.json`. `services` may replace the capability services device
    /// traffic goes to (tests record it).
    pub async fn start_with(
        config: Config,
        services: impl FnOnce(DeviceServices) -> DeviceServices,
    ) -> Result<Self, ServeError> {
        if let Some(limit) = listener::raise_fd_limit() {
            tracing::debug!(limit, "open-file limit");
        }
        let data_dir = DataDir::open(&config.data_dir)?;
        let mut cluster_policies = None;
        let nats = match config.cluster.enabled() {
            true => {
                let nats = NatsStore::connect(&config.cluster).await?;
                // Every node signs and checks with the same owner key, CA and
                // shared access policies.
                secrets::adopt(&nats, &data_dir).await?;
                cluster_policies = Some(secrets::adopt_policies(&nats, &data_dir).await?);
                Some(nats)
            }
            false => None,
        };
        let policies = match cluster_policies {
            Some(set) => set,
            None => PolicySet::load_or_create(&data_dir.policies_path())?,
        };
        let policies = Arc::new(Policies::new(&config.hostname, policies));
        let ca = data_dir.ensure_ca()?;
        let names = SubjectAltNames::for_hub(
            &config.hostname,
            data_dir::listener_ips(
                [
                    config.mqtt.tcp_listen,
                    config.mqtt.tls_listen,
                    config.http.listen,
                    config.amqp.tls_listen,
                ]
                .into_iter()
                .chain(config.http.https_listen)
                .chain(config.amqp.tcp_listen),
            ),
        );
        // The operator's certificates when configured, else the development ones.
        let operator_cert = certificates::load_server_cert(&config.tls)?;
        let server_cert = match &operator_cert {
            Some(cert) => cert.clone(),
            None => {
                let dev = data_dir.ensure_server_cert(&ca, &names)?;
                tls::ServerCert::from_pem(&dev.cert_pem, &dev.key_pem)?
            }
        };
        let tls_config = tls::server_config_with(&server_cert)?;
        // The HTTPS and AMQPS listeners present the same server certificate as MQTT/TLS.
        let https_tls = Arc::clone(&tls_config);
        let amqps_tls = Arc::clone(&tls_config);
        let operator_ca = certificates::load_device_ca(&config.tls)?;
        let device_ca = match &operator_ca {
            Some(bundle) => bundle.clone(),
            None => DeviceCa::from_pem(ca.cert_pem())?,
        };
        let cert_reloader =
            certificates::Reloader::new(config.tls.clone(), operator_cert, operator_ca);
        let service_key = ServiceKey::load_or_create(&data_dir.service_key_path())?;
        let store = EmbeddedStore::open(&data_dir.prepare_store_file()?)?;
        let presence = Presence::default();
        let Backends {
            telemetry,
            health,
            registry,
            registry_feed,
            sessions,
            twin_store,
            nats,
        } = if let Some(nats) = nats {
            Backends::cluster(&config, &presence, nats).await?
        } else {
            let telemetry = Telemetry::open(
                &data_dir.root().join("telemetry"),
                &config.telemetry,
                Arc::new(store.clone()),
            )?;
            Backends {
                telemetry: Arc::new(telemetry),
                health: Arc::new(store.clone()),
                registry: Registry::new(Arc::new(store.clone()), presence.clone()),
                registry_feed: None,
                sessions: Arc::new(store.clone()),
                twin_store: Arc::new(EmbeddedTwins::open(store.clone())?),
                nats: None,
            }
        };

        let metrics = Arc::new(GatewayMetrics::default());
        let connections = Connections::default();
        let twins = Twins::start(
            twin_store,
            registry.clone(),
            Arc::new(connections.clone()),
            TwinLimits {
                max_properties_bytes: config.twins.max_properties_bytes,
                max_tags_bytes: config.twins.max_tags_bytes,
                ..TwinLimits::default()
            },
        )
        .await?;
        let limits = CommandLimits {
            feedback_lock: Duration::from_secs(config.commands.feedback_lock_secs),
            queue: config.commands.queue_depth,
            default_ttl: Duration::from_secs(config.commands.default_ttl_secs),
            max_ttl: Duration::from_secs(config.commands.max_ttl_secs),
            ..CommandLimits::default()
        };
        let command_store: Arc<dyn CommandStore> = match &nats {
            Some(nats) => {
                tracing::info!("cluster mode: C2D queues and feedback on NATS JetStream");
                Arc::new(NatsCommands::open(nats, limits.queue, limits.feedback_lock).await?)
            }
            None => Arc::new(store.clone()),
        };
        let commands = Commands::new(
            command_store,
            registry.clone(),
            Arc::new(connections.clone()),
            limits,
        );
        let router = match &nats {
            Some(nats) => {
                let router = NodeRouter::open(nats, Arc::new(connections.clone())).await?;
                commands.set_routing(Arc::new(router.clone()));
                Some(router)
            }
            None => None,
        };
        // Routing runs in embedded mode; cluster mode does not serve it yet
        // (docs/DECISIONS.md, "Routing and events").
        let routing = match &nats {
            Some(_) => None,
            None => Some(
                Routing::start(
                    RoutingSettings {
                        hostname: config.hostname.clone(),
                        retry_for: Duration::from_secs(config.routing.retry_for_secs),
                        max_backoff: Duration::from_secs(config.routing.max_backoff_secs),
                        webhook_timeout: Duration::from_secs(config.routing.webhook_timeout_secs),
                        event_queue: config.routing.event_queue,
                        telemetry: config.telemetry.clone(),
                        streams_dir: data_dir.root().join("streams"),
                    },
                    Arc::clone(&telemetry),
                    Arc::new(store.clone()),
                    Arc::new(EmbeddedRouting::open(&store)),
                    &registry,
                    twins.clone(),
                )
                .await?,
            ),
        };
        let scope_path = scope::scope_path(data_dir.root());
        let local_scope = IdScope::load_or_create(&scope_path)?;
        let (provisioning_store, id_scope): (Arc<dyn ProvisioningStore>, IdScope) = match &nats {
            Some(nats) => {
                tracing::info!("cluster mode: enrollments and registrations on NATS JetStream");
                let store = NatsProvisioning::open(nats).await?;
                let scope = store.adopt_scope(local_scope, &scope_path).await?;
                (Arc::new(store), scope)
            }
            None => (Arc::new(EmbeddedProvisioning::open(&store)?), local_scope),
        };
        let provisioning = Provisioning::new(
            provisioning_store,
            registry.clone(),
            twins.clone(),
            config.hostname.clone(),
            id_scope,
            Duration::from_secs(config.mqtt.sas_max_lifetime_secs),
        );
        let services = services(DeviceServices {
            telemetry: telemetry.clone(),
            twins: Arc::new(twins.clone()),
            methods: Arc::new(commands.clone()),
            deliveries: Arc::new(commands.clone()),
            events: Arc::new(commands.clone()),
        });
        let mqtt = &config.mqtt;
        let context = GatewayContext {
            authenticator: DeviceAuthenticator::new(
                registry.clone(),
                config.hostname.clone(),
                device_ca,
                JwtPolicy {
                    max_lifetime: Duration::from_secs(mqtt.jwt_max_lifetime_secs),
                    skew: Duration::from_secs(mqtt.jwt_clock_skew_secs),
                },
                Duration::from_secs(mqtt.sas_max_lifetime_secs),
            ),
            sessions,
            connections,
            services,
            presence,
            metrics: Arc::clone(&metrics),
            limits: SessionLimits {
                connect_timeout: Duration::from_secs(mqtt.connect_timeout_secs),
                max_telemetry_bytes: mqtt.max_telemetry_bytes,
                ..SessionLimits::default()
            },
            max_packet_size: mqtt.max_packet_size,
            provisioning: Some(provisioning.clone()),
        };
        let gateway = Gateway::bind(
            context,
            mqtt.tcp_listen,
            mqtt.tls_listen,
            tls_config,
            mqtt.max_connections,
        )
        .map_err(|(listener, addr, source)| ServeError::Bind {
            listener,
            addr,
            source,
        })?;
        let (mqtt_addr, mqtts_addr) = gateway.local_addrs().map_err(|source| ServeError::Bind {
            listener: "mqtt",
            addr: mqtt.tcp_listen,
            source,
        })?;

        let bind_err = |source| ServeError::Bind {
            listener: "http",
            addr: config.http.listen,
            source,
        };
        let http = TcpListener::bind(config.http.listen)
            .await
            .map_err(bind_err)?;
        let https = match config.http.https_listen {
            Some(addr) => {
                let bind_err = |source| ServeError::Bind {
                    listener: "https",
                    addr,
                    source,
                };
                let listener = listener::bind(addr).map_err(bind_err)?;
                let local = listener.local_addr().map_err(bind_err)?;
                Some((listener, https_tls, local))
            }
            None => None,
        };
        let amqp_listeners =
            AmqpListeners::bind(&config, amqps_tls)
                .await
                .map_err(|(listener, addr, source)| ServeError::Bind {
                    listener,
                    addr,
                    source,
                })?;
        let (amqps_addr, amqp_addr) =
            amqp_listeners
                .local_addrs()
                .map_err(|source| ServeError::Bind {
                    listener: "amqps",
                    addr: config.amqp.tls_listen,
                    source,
                })?;
        let amqp_context = AmqpContext::new(
            &config,
            Arc::clone(&policies),
            commands.clone(),
            Arc::clone(&telemetry),
        );
        let endpoints = Endpoints {
            mqtt: Some(mqtt_addr),
            mqtts: Some(mqtts_addr),
            http: http.local_addr().map_err(bind_err)?,
            https: https.as_ref().map(|(_, _, addr)| *addr),
            amqps: Some(amqps_addr),
            amqp: amqp_addr,
        };
        if let Some(router) = &router {
            // Joins before the listeners accept: every connection is announced.
            router
                .start(commands.clone(), endpoints.http, mqtt_addr)
                .await?;
        }
        data_dir.write_endpoints(&endpoints)?;

        let state = AppState {
            registry,
            service_key: Arc::new(service_key),
            policies,
            store: health,
            metrics: {
                let metrics = Arc::clone(&metrics);
                let routing = routing.clone();
                Arc::new(move || {
                    let mut text = metrics.render();
                    if let Some(routing) = &routing {
                        text.push_str(&routing.render_metrics());
                    }
                    text
                })
            },
            routing,
            telemetry,
            twins,
            commands,
            provisioning,
            cluster: nats
                .clone()
                .map(|nats| Arc::new(nats) as Arc<dyn ClusterView>),
        };
        Ok(Self {
            data_dir,
            endpoints,
            http,
            https: https.map(|(listener, acceptor, _)| (listener, acceptor)),
            gateway,
            state,
            nats,
            limits: HttpLimits {
                max_body_bytes: config.http.max_body_bytes,
                max_concurrent_requests: config.http.max_concurrent_requests,
                max_long_requests: config.http.max_long_requests,
            },
            connection_limits: ConnectionLimits {
                max_connections: config.http.max_connections,
                header_timeout: Duration::from_secs(config.http.header_timeout_secs),
            },
            retention_interval: Duration::from_secs(config.telemetry.retention_interval_secs),
            registry_feed,
            router,
            amqp: (amqp_listeners, amqp_context),
            cert_reloader,
        })
    }

    /// The bound addresses.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    /// The device registry.
    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    /// The live device connections (to deliver messages to devices).
    pub fn connections(&self) -> Connections {
        self.gateway.context().connections.clone()
    }

    /// Gateway counters.
    pub fn metrics(&self) -> Arc<GatewayMetrics> {
        Arc::clone(&self.gateway.context().metrics)
    }

    /// Serves until `shutdown` completes, then closes device connections, drains
    /// in-flight requests and closes the store.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let running = self.gateway.start(&self.state.registry);
        let telemetry = Arc::clone(&self.state.telemetry);
        let routing = self.state.routing.clone();
        let retention = tokio::spawn(run_retention(
            Arc::clone(&telemetry),
            self.retention_interval,
        ));
        let expiry = tokio::spawn(
            self.state
                .commands
                .clone()
                .run_expiry(Duration::from_secs(1)),
        );
        // Registered before anything else is served, so a SIGHUP never finds the
        // default (terminating) disposition once operator certificates are in use.
        let reloader = self
            .cert_reloader
            .is_active()
            .then(|| self.cert_reloader.clone().spawn());
        let policy_tasks = watch_policies(&self.data_dir, &self.state, self.nats.as_ref());
        let router = api::router(self.state, self.limits).merge(crate::console::router());
        // Every listener stops on the one shutdown signal.
        let (stop, stopped) = watch::channel(false);
        let (amqp_listeners, amqp_context) = self.amqp;
        let (amqp_ws_iothub, amqp_ws_servicebus) =
            amqp::websocket::routers(Arc::new(amqp_context.clone()), stopped.clone());
        let amqp = amqp_listeners.spawn(amqp_context, stopped.clone());
        let https = self.https.map(|(listener, tls)| {
            // `/$iothub/websocket` is MQTT unless the client asks for AMQP
            // (`AMQPWSB10`, Azure's `AmqpWs` transports); `/$servicebus/websocket` is
            // AMQP only.
            let amqp_iothub = amqp_ws_iothub.clone();
            let router = router
                .clone()
                .merge(running.websocket().router())
                .layer(axum::middleware::from_fn(
                    move |request: axum::extract::Request, next: axum::middleware::Next| {
                        let amqp_iothub = amqp_iothub.clone();
                        async move {
                            if request.uri().path() == amqp::websocket::IOTHUB_PATH
                                && amqp::websocket::wants_amqp(request.headers())
                            {
                                use tower::ServiceExt;
                                match amqp_iothub.oneshot(request).await {
                                    Ok(response) => response,
                                    Err(never) => match never {},
                                }
                            } else {
                                next.run(request).await
                            }
                        }
                    },
                ))
                .merge(amqp_ws_servicebus.clone());
            let mut stopped = stopped.clone();
            tokio::spawn(crate::http::serve::serve(
                listener,
                router,
                self.connection_limits,
                Some(TlsAcceptor::from(tls)),
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            ))
        });
        let mut http_stopped = stopped;
        let result = crate::http::serve::serve(
            self.http,
            router,
            self.connection_limits,
            None,
            async move {
                shutdown.await;
                let _ = stop.send(true);
                let _ = http_stopped.wait_for(|stop| *stop).await;
            },
        )
        .await
        .map_err(|source| ServeError::Serve {
            listener: "http",
            source,
        });
        let result = match https {
            Some(task) => match task.await {
                Ok(Ok(())) => result,
                Ok(Err(source)) => result.and(Err(ServeError::Serve {
                    listener: "https",
                    source,
                })),
                Err(err) => result.and(Err(ServeError::Serve {
                    listener: "https",
                    source: std::io::Error::other(err),
                })),
            },
            None => result,
        };
        let _ = amqp.await;
        running.shutdown().await;
        if let Some(router) = &self.router {
            router.stop().await;
        }
        retention.abort();
        expiry.abort();
        for task in &policy_tasks {
            task.abort();
        }
        if let Some(reloader) = &reloader {
            reloader.abort();
        }
        if let Some(feed) = &self.registry_feed {
            feed.abort();
        }
        let _ = retention.await;
        let _ = expiry.await;
        if let Some(routing) = &routing {
            routing.shutdown().await;
        }
        // Device connections are closed: the committers commit what is queued and stop.
        let _ = tokio::task::spawn_blocking(move || telemetry.close()).await;
        // The addresses are no longer served; a stale file would mislead clients.
        let endpoints = data_dir::endpoints_path(self.data_dir.root());
        if let Err(err) = std::fs::remove_file(&endpoints) {
            tracing::warn!(path = %endpoints.display(), error = %err, "cannot remove endpoints file");
        }
        tracing::info!("hub stopped");
        result
    }
}

/// Keeps the live policies current: the file in the data dir is polled (a `hub
/// policy rotate` while the hub runs takes effect within a second); in cluster
/// mode a change of the file is also published to the other nodes, and the
/// cluster's value is watched.
fn watch_policies(
    data_dir: &DataDir,
    state: &AppState,
    nats: Option<&NatsStore>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let path = data_dir.policies_path();
    let policies = &state.policies;
    match nats {
        None => vec![policies.spawn_file_watch(path, POLICY_POLL, |_| {})],
        Some(nats) => {
            let publisher = nats.clone();
            let file = policies.spawn_file_watch(path.clone(), POLICY_POLL, move |set| {
                let nats = publisher.clone();
                tokio::spawn(async move {
                    if let Err(err) = secrets::publish_policies(&nats, set).await {
                        tracing::error!(%err, "cannot publish rotated policies to the cluster");
                    }
                });
            });
            let cluster = secrets::spawn_policy_watch(nats, Arc::clone(policies), path);
            vec![file, cluster]
        }
    }
}

/// How often the policies file is checked for a rotation.
const POLICY_POLL: Duration = Duration::from_secs(1);

/// The capabilities whose backend depends on the mode (embedded or cluster).
struct Backends {
    telemetry: Arc<Telemetry>,
    health: Arc<dyn StoreHealth>,
    registry: Registry,
    /// Cluster mode: the task feeding the registry's mirror.
    registry_feed: Option<tokio::task::JoinHandle<()>>,
    sessions: Arc<dyn SessionStore>,
    /// Twin documents.
    twin_store: Arc<dyn TwinStore>,
    /// Cluster mode: the connection (C2D queues and `GET /cluster` use it too).
    nats: Option<NatsStore>,
}

impl Backends {
    /// Cluster mode: telemetry, checkpoints, the registry, twins and sessions on NATS
    /// JetStream (C2D queues are opened beside).
    async fn cluster(
        config: &Config,
        presence: &Presence,
        nats: NatsStore,
    ) -> Result<Self, ServeError> {
        nats.claim_partition_count(config.telemetry.partitions)
            .await?;
        let log = JetStreamTelemetry::open(
            &nats,
            &config.telemetry,
            config.cluster.max_pending_publishes,
        )
        .await?;
        let checkpoints = NatsCheckpoints::open(&nats).await?;
        let telemetry = Telemetry::new(Arc::new(log), &config.telemetry, Arc::new(checkpoints));
        // Other hubs write the registry too: this hub's registry mirrors the bucket
        // through its change feed, caught up before anything reads it.
        let devices = NatsRegistry::open(&nats).await?;
        let registry = Registry::mirrored(Arc::new(devices.clone()), presence.clone());
        let registry_feed = devices.follow(registry.clone());
        registry.catch_up().await?;
        let sessions = NatsSessions::open(&nats).await?;
        let twin_store = NatsTwins::open(&nats).await?;
        tracing::info!(
            node = nats.node_id(),
            "cluster mode: telemetry, checkpoints, registry, twins, sessions and C2D on NATS JetStream"
        );
        Ok(Self {
            telemetry: Arc::new(telemetry),
            health: Arc::new(nats.clone()),
            registry,
            registry_feed: Some(registry_feed),
            sessions: Arc::new(sessions),
            twin_store: Arc::new(twin_store),
            nats: Some(nats),
        })
    }
}

/// Applies telemetry retention every `interval`.
async fn run_retention(telemetry: Arc<Telemetry>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let telemetry = Arc::clone(&telemetry);
        // Deleting files blocks; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || telemetry.apply_retention()).await;
    }
}

/// Starts a hub, prints the `hub ready …` line on stdout, and serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let server = Server::start(config).await?;
    println!("{}", server.endpoints().ready_line());
    server.serve(shutdown).await
}
