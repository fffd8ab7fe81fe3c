//! Start-up and shutdown of a hub: open the data directory, certificates, owner key
//! and store; bind the listeners; report the endpoints; serve until told to stop;
//! then stop accepting, drain, and close the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use certs::SubjectAltNames;
use tokio::net::TcpListener;

use crate::api::{self, AppState, HttpLimits};
use crate::auth::service::{ServiceKey, ServiceKeyError};
use crate::config::Config;
use crate::data_dir::{self, DataDir, DataDirError, Endpoints};
use crate::registry::{Presence, Registry};
use crate::store::StoreError;
use crate::store::embedded::EmbeddedStore;

/// Why the hub could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory or its certificates.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The owner key.
    #[error("service key: {0}")]
    ServiceKey(#[from] ServiceKeyError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    state: AppState,
    limits: HttpLimits,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the data directory (creating CA, server certificate and owner key on
    /// first start), the store, and binds the listeners; writes `endpoints.json`.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        let data_dir = DataDir::open(&config.data_dir)?;
        let ca = data_dir.ensure_ca()?;
        let names = SubjectAltNames::for_hub(
            &config.hostname,
            data_dir::listener_ips([
                config.mqtt.tcp_listen,
                config.mqtt.tls_listen,
                config.http.listen,
            ]),
        );
        data_dir.ensure_server_cert(&ca, &names)?;
        let service_key = ServiceKey::load_or_create(&data_dir.service_key_path())?;
        let store = EmbeddedStore::open(&data_dir.store_path())?;

        let http = TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| ServeError::Bind {
                listener: "http",
                addr: config.http.listen,
                source,
            })?;
        let endpoints = Endpoints {
            mqtt: None,
            mqtts: None,
            http: http.local_addr().map_err(|source| ServeError::Bind {
                listener: "http",
                addr: config.http.listen,
                source,
            })?,
        };
        data_dir.write_endpoints(&endpoints)?;

        let state = AppState {
            registry: Registry::new(Arc::new(store.clone()), Presence::default()),
            service_key: Arc::new(service_key),
            store: Arc::new(store),
        };
        Ok(Self {
            data_dir,
            endpoints,
            http,
            state,
            limits: HttpLimits {
                max_body_bytes: config.http.max_body_bytes,
                max_concurrent_requests: config.http.max_concurrent_requests,
            },
        })
    }

    /// The bound addresses.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints
    }

    /// Serves until `shutdown` completes, then drains in-flight requests and closes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let router = api::router(self.state, self.limits);
        let result = axum::serve(self.http, router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServeError::Serve {
                listener: "http",
                source,
            });
        // The addresses are no longer served; a stale file would mislead clients.
        let endpoints = data_dir::endpoints_path(self.data_dir.root());
        if let Err(err) = std::fs::remove_file(&endpoints) {
            tracing::warn!(path = %endpoints.display(), error = %err, "cannot remove endpoints file");
        }
        tracing::info!("hub stopped");
        result
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
