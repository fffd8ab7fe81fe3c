//! Routing and events (DESIGN section 9): telemetry and device events pushed to
//! where back ends want them.
//!
//! - [`config`]: the configuration in Azure's routing JSON, validated with errors
//!   that name the JSON path;
//! - [`condition`]: route conditions on the twin query language's expression core,
//!   and the row a message presents to them;
//! - [`events`]: device lifecycle, connection-state and twin-change events, told by
//!   the registry, presence and twin observers and written to the durable
//!   `device-events` stream;
//! - [`delivery`]: the compiled route table and the workers, one per endpoint, source
//!   log and partition, each behind its own durable cursor;
//! - [`endpoints`]: webhooks, NATS subjects and named streams;
//! - [`metrics`]: per-endpoint counters.
//!
//! [`Routing`] ties them together: it holds the configuration (persisted through
//! [`RoutingStore`]), the hub's extra streams (`device-events`, `dead-letters` and
//! the named ones), and restarts the workers when a new configuration is put.

pub mod condition;
pub mod config;
pub mod delivery;
pub mod endpoints;
pub mod events;
pub mod metrics;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::TelemetryConfig;
use crate::registry::Registry;
use crate::storage::StoreError;
use crate::telemetry::message::StoredMessage;
use crate::telemetry::{CheckpointStore, Telemetry, TelemetryError};
use crate::twins::Twins;
use condition::MessageRow;
pub use config::{ConfigError, RoutingConfig, Source};
use delivery::{Matched, SourceLog, Table, Worker};
use events::EventSink;
use metrics::RoutingMetrics;

/// The device-events stream's name.
pub const EVENTS_STREAM: &str = "device-events";
/// The dead-letter stream's name.
pub const DEAD_LETTER_STREAM: &str = "dead-letters";

/// Where the routing configuration is kept.
#[async_trait]
pub trait RoutingStore: Send + Sync + 'static {
    /// The stored configuration (JSON), if any.
    async fn load(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `json` durably.
    async fn save(&self, json: Vec<u8>) -> Result<(), StoreError>;
}

/// Failures of the routing capability.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The configuration is invalid; the message names the JSON path.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A stream could not be opened.
    #[error("stream {name}: {source}")]
    Stream {
        /// The stream.
        name: String,
        /// What failed.
        source: TelemetryError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The delivery runtime's thread could not be started.
    #[error("cannot start the delivery thread: {0}")]
    Runtime(std::io::Error),
    /// The stored configuration does not parse (written by another version?).
    #[error("the stored routing configuration is unreadable: {0}")]
    Stored(ConfigError),
}

/// `[routing]` settings the capability runs with.
#[derive(Debug, Clone)]
pub struct RoutingSettings {
    /// The hub's host name (`source` of CloudEvents, `hubName` of events).
    pub hostname: String,
    /// How long a message is retried before it is dead-lettered.
    pub retry_for: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// How long a webhook (or NATS server) may take to answer.
    pub webhook_timeout: Duration,
    /// Capacity of the device-event queue.
    pub event_queue: usize,
    /// The telemetry settings the hub's extra streams take (partitions, retention).
    pub telemetry: TelemetryConfig,
    /// Where the extra streams' files live.
    pub streams_dir: PathBuf,
}

/// Consumer-group checkpoints of one extra stream inside the shared checkpoint
/// store: its groups are prefixed with the stream's name.
struct PrefixedCheckpoints {
    prefix: String,
    inner: Arc<dyn CheckpointStore>,
}

#[async_trait]
impl CheckpointStore for PrefixedCheckpoints {
    async fn checkpoint(&self, group: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        self.inner
            .checkpoint(&format!("{}/{group}", self.prefix), partition)
            .await
    }

    async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StoreError> {
        self.inner
            .set_checkpoint(&format!("{}/{group}", self.prefix), partition, offset)
            .await
    }
}

/// A sample message for the routing test.
#[derive(Debug, Clone, Default)]
pub struct TestMessage {
    /// The sending device.
    pub device_id: String,
    /// The body text.
    pub body: String,
    /// Application properties.
    pub app_properties: BTreeMap<String, String>,
    /// System properties, by Azure's names (`contentType`) or the stored ones
    /// (`content-type`).
    pub system_properties: BTreeMap<String, String>,
}

/// Running workers of one configuration.
struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The runtime delivery runs on: its own thread, so that delivery work competes with
/// ingest as one thread among the hub's, not as tasks on the ingest workers; under a
/// saturated CPU ingest keeps its pace and routing lags, then catches up.
struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    fn start() -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(DELIVERY_THREADS)
            .thread_name("hub-routing")
            .enable_all()
            .build()
            .map(|runtime| Self(Some(runtime)))
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for DeliveryRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context may not do.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Threads of the delivery runtime.
const DELIVERY_THREADS: usize = 1;

struct Inner {
    settings: RoutingSettings,
    runtime: DeliveryRuntime,
    telemetry: Arc<Telemetry>,
    events: Arc<Telemetry>,
    dead_letters: Arc<Telemetry>,
    checkpoints: Arc<dyn CheckpointStore>,
    streams: Mutex<BTreeMap<String, Arc<Telemetry>>>,
    store: Arc<dyn RoutingStore>,
    twins: Twins,
    config: Mutex<(RoutingConfig, Arc<Table>)>,
    running: tokio::sync::Mutex<Option<Running>>,
    metrics: RoutingMetrics,
    sink: Arc<EventSink>,
    http: endpoints::HttpClient,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The routing service.
#[derive(Clone)]
pub struct Routing {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").finish_non_exhaustive()
    }
}

/// Opens an extra stream under `dir`.
fn open_stream(
    settings: &RoutingSettings,
    name: &str,
    partitions: u32,
    checkpoints: &Arc<dyn CheckpointStore>,
) -> Result<Arc<Telemetry>, RoutingError> {
    let config = TelemetryConfig {
        partitions,
        ..settings.telemetry.clone()
    };
    let prefixed = Arc::new(PrefixedCheckpoints {
        prefix: name.to_string(),
        inner: Arc::clone(checkpoints),
    });
    Telemetry::open(&settings.streams_dir.join(name), &config, prefixed)
        .map(Arc::new)
        .map_err(|source| RoutingError::Stream {
            name: name.to_string(),
            source,
        })
}

impl Routing {
    /// Opens the device-events and dead-letter streams, starts the event writer,
    /// hooks the registry, presence and twin observers, loads the stored
    /// configuration and starts its workers.
    pub async fn start(
        settings: RoutingSettings,
        telemetry: Arc<Telemetry>,
        checkpoints: Arc<dyn CheckpointStore>,
        store: Arc<dyn RoutingStore>,
        registry: &Registry,
        twins: Twins,
    ) -> Result<Self, RoutingError> {
        let partitions = settings.telemetry.partitions;
        let events = open_stream(&settings, EVENTS_STREAM, partitions, &checkpoints)?;
        let dead_letters = open_stream(&settings, DEAD_LETTER_STREAM, partitions, &checkpoints)?;
        let (sink, writer) = EventSink::start(
            settings.hostname.clone(),
            twins.clone(),
            Arc::clone(&events),
            settings.event_queue,
        );
        registry.observe(Arc::clone(&sink) as _);
        registry.presence().observe(Arc::clone(&sink) as _);
        twins.observe(Arc::clone(&sink) as _);
        let config = match store.load().await? {
            Some(json) => config::parse(&json).map_err(RoutingError::Stored)?,
            None => RoutingConfig::default(),
        };
        let table =
            Arc::new(Table::compile(&config, &settings.hostname).map_err(RoutingError::Stored)?);
        let tls = webhook_tls().map_err(|err| {
            RoutingError::Invalid(ConfigError {
                path: "$".into(),
                message: format!("cannot set up TLS for webhooks: {err}"),
            })
        })?;
        let http = endpoints::http_client(tls, settings.webhook_timeout);
        let runtime = DeliveryRuntime::start().map_err(RoutingError::Runtime)?;
        let routing = Self {
            inner: Arc::new(Inner {
                settings,
                telemetry,
                events,
                dead_letters,
                checkpoints,
                streams: Mutex::new(BTreeMap::new()),
                store,
                twins,
                config: Mutex::new((config.clone(), table)),
                running: tokio::sync::Mutex::new(None),
                runtime,
                metrics: RoutingMetrics::default(),
                sink,
                http,
                background: Mutex::new(vec![writer]),
            }),
        };
        routing.open_streams(&config)?;
        let retention = tokio::spawn(run_retention(
            Arc::downgrade(&routing.inner),
            Duration::from_secs(
                routing
                    .inner
                    .settings
                    .telemetry
                    .retention_interval_secs
                    .max(1),
            ),
        ));
        routing
            .inner
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(retention);
        routing.restart().await;
        Ok(routing)
    }

    /// The configuration in force.
    pub fn config(&self) -> RoutingConfig {
        self.lock_config().0.clone()
    }

    fn lock_config(&self) -> std::sync::MutexGuard<'_, (RoutingConfig, Arc<Table>)> {
        self.inner
            .config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn open_streams(&self, config: &RoutingConfig) -> Result<(), RoutingError> {
        let inner = &self.inner;
        for stream in &config.endpoints.streams {
            let key = stream.name.to_ascii_lowercase();
            if inner
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&key)
            {
                continue;
            }
            let partitions = stream
                .partitions
                .unwrap_or(inner.settings.telemetry.partitions);
            let log = open_stream(&inner.settings, &key, partitions, &inner.checkpoints)?;
            inner
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, log);
        }
        Ok(())
    }

    /// Validates, opens new streams, stores and puts `config` in force (the workers
    /// restart from their cursors).
    pub async fn set_config(&self, config: RoutingConfig) -> Result<RoutingConfig, RoutingError> {
        config.validate()?;
        let table = Arc::new(Table::compile(&config, &self.inner.settings.hostname)?);
        let this = self.clone();
        let opening = config.clone();
        // Opening segment files blocks.
        tokio::task::spawn_blocking(move || this.open_streams(&opening))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))??;
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|err| StoreError::Backend(err.to_string()))?;
        // Holding the workers' lock orders concurrent PUTs: the last stored is the
        // one in force.
        let mut running = self.inner.running.lock().await;
        self.inner.store.save(json).await?;
        *self.lock_config() = (config.clone(), table);
        self.stop_workers(&mut running).await;
        self.place_cursors().await;
        *running = Some(self.spawn_workers());
        Ok(config)
    }

    async fn restart(&self) {
        let mut running = self.inner.running.lock().await;
        self.stop_workers(&mut running).await;
        self.place_cursors().await;
        *running = Some(self.spawn_workers());
    }

    /// Before the workers start (and before a PUT answers): an endpoint without a
    /// cursor in a log starts at its end, and so does one that no route takes that log
    /// to (when a route does, it starts from that moment, not from old history). So
    /// an endpoint gets exactly what arrives after the configuration is in force.
    async fn place_cursors(&self) {
        let inner = &self.inner;
        let (config, table) = self.lock_config().clone();
        for (name, _) in self.endpoints(&config) {
            let sources = table.sources_for(&name);
            let group = delivery::cursor_group(&name);
            for (log, events) in [(&inner.telemetry, false), (&inner.events, true)] {
                let needed = sources.iter().any(|s| s.is_event() == events);
                for partition in 0..log.partition_count() {
                    let placed = match log.checkpoint(&group, partition).await {
                        Ok(Some(_)) if needed => continue,
                        Ok(_) => log
                            .partition_info(partition)
                            .await
                            .map(|info| info.end_offset),
                        Err(err) => Err(err),
                    };
                    let stored = match placed {
                        Ok(end) => log.set_checkpoint(&group, partition, end).await,
                        Err(err) => Err(err),
                    };
                    if let Err(err) = stored {
                        tracing::error!(endpoint = %name, %err, "routing: cannot place the cursor");
                    }
                }
            }
        }
    }

    async fn stop_workers(&self, running: &mut Option<Running>) {
        if let Some(running) = running.take() {
            let _ = running.stop.send(true);
            for task in running.tasks {
                let _ = task.await;
            }
        }
    }

    fn spawn_workers(&self) -> Running {
        let inner = &self.inner;
        let current = tokio::runtime::Handle::current();
        let spawner = inner.runtime.handle().unwrap_or(&current);
        let (config, table) = self.lock_config().clone();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        for (name, endpoint) in self.endpoints(&config) {
            let sources = table.sources_for(&name);
            for source in [
                SourceLog {
                    name: "telemetry",
                    log: Arc::clone(&inner.telemetry),
                },
                SourceLog {
                    name: EVENTS_STREAM,
                    log: Arc::clone(&inner.events),
                },
            ] {
                let needed = sources
                    .iter()
                    .any(|s| s.is_event() == (source.name == EVENTS_STREAM));
                if !needed {
                    continue;
                }
                for partition in 0..source.log.partition_count() {
                    let worker = Worker {
                        table: Arc::clone(&table),
                        endpoint_name: name.clone(),
                        endpoint: Arc::clone(&endpoint),
                        source: source.clone(),
                        partition,
                        twins: inner.twins.clone(),
                        metrics: inner.metrics.endpoint(&name),
                        dead_letters: Arc::clone(&inner.dead_letters),
                        retry_for: inner.settings.retry_for,
                        max_backoff: inner.settings.max_backoff,
                    };
                    tasks.push(spawner.spawn(worker.run(stopped.clone())));
                }
            }
        }
        Running { stop, tasks }
    }

    /// The configured endpoints by lower-case name.
    fn endpoints(&self, config: &RoutingConfig) -> Vec<(String, Arc<dyn endpoints::Endpoint>)> {
        let settings = &self.inner.settings;
        let mut out: Vec<(String, Arc<dyn endpoints::Endpoint>)> = Vec::new();
        for hook in &config.endpoints.webhooks {
            match endpoints::Webhook::new(
                hook.clone(),
                settings.hostname.clone(),
                self.inner.http.clone(),
                settings.webhook_timeout,
            ) {
                Ok(webhook) => out.push((hook.name.to_ascii_lowercase(), Arc::new(webhook))),
                // Validation parsed the URL already.
                Err(err) => {
                    tracing::error!(endpoint = %hook.name, %err, "routing: bad webhook URL")
                }
            }
        }
        for nats in &config.endpoints.nats {
            out.push((
                nats.name.to_ascii_lowercase(),
                Arc::new(endpoints::Nats::new(
                    nats.clone(),
                    settings.hostname.clone(),
                    settings.webhook_timeout,
                )),
            ));
        }
        for stream in &config.endpoints.streams {
            if let Some(log) = self.stream(&stream.name) {
                out.push((
                    stream.name.to_ascii_lowercase(),
                    Arc::new(endpoints::Stream::new(log)),
                ));
            }
        }
        out
    }

    /// A stream by name: `device-events`, `dead-letters` or a configured named stream
    /// (`telemetry` is the telemetry capability's).
    pub fn stream(&self, name: &str) -> Option<Arc<Telemetry>> {
        let inner = &self.inner;
        if name.eq_ignore_ascii_case(EVENTS_STREAM) {
            return Some(Arc::clone(&inner.events));
        }
        if name.eq_ignore_ascii_case(DEAD_LETTER_STREAM) {
            return Some(Arc::clone(&inner.dead_letters));
        }
        let configured = self
            .config()
            .endpoints
            .streams
            .iter()
            .any(|s| s.name.eq_ignore_ascii_case(name));
        if !configured {
            return None;
        }
        inner
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    /// Which routes a sample message of `source` takes, with `twin` as its device's
    /// twin (`POST /configuration/routing/test`).
    pub fn test(&self, source: Source, sample: &TestMessage, twin: Option<Value>) -> Matched {
        let table = Arc::clone(&self.lock_config().1);
        let system_properties = sample
            .system_properties
            .iter()
            .map(|(k, v)| {
                let name =
                    condition::stored_system_name(k).map_or_else(|| k.clone(), str::to_string);
                (name, v.clone())
            })
            .collect();
        let message = StoredMessage {
            offset: 0,
            enqueued_time: time::OffsetDateTime::now_utc(),
            device_id: sample.device_id.clone(),
            system_properties,
            properties: sample.app_properties.clone(),
            body: bytes::Bytes::from(sample.body.clone()),
        };
        let twin = move || twin.clone();
        let row = MessageRow::new(&message, &twin);
        table.matched(source, &row)
    }

    /// The fallback route in force.
    pub fn fallback(&self) -> Option<config::Route> {
        self.lock_config().1.fallback().cloned()
    }

    /// Prometheus text: per-endpoint counters and the event queue.
    pub fn render_metrics(&self) -> String {
        let mut out = self.inner.metrics.render();
        out.push_str(&self.inner.sink.queue.render_metrics());
        out
    }

    /// Stops the workers (storing their cursors), the event writer and closes the
    /// extra streams. Call after the edges have stopped.
    pub async fn shutdown(&self) {
        let mut running = self.inner.running.lock().await;
        self.stop_workers(&mut running).await;
        let background = std::mem::take(
            &mut *self
                .inner
                .background
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // The edges have stopped: the last events (disconnects) are queued. Give the
        // writer a moment to store them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.inner.sink.queue.drained() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for task in &background {
            task.abort();
        }
        // Wait until each aborted task is dropped: they hold the store, which a hub
        // started next on the same data dir must be able to open.
        for task in background {
            let _ = task.await;
        }
        let logs = self.inner.logs();
        let _ = tokio::task::spawn_blocking(move || {
            for log in logs {
                log.close();
            }
        })
        .await;
    }
}

/// TLS for `https://` webhooks: the ring provider the hub uses everywhere, and the
/// system's trusted roots.
fn webhook_tls() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(%err, "webhooks: cannot load a system root certificate");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(roots = added, "webhooks: trusted roots");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Inner {
    /// The hub's extra streams.
    fn logs(&self) -> Vec<Arc<Telemetry>> {
        let mut logs = vec![Arc::clone(&self.events), Arc::clone(&self.dead_letters)];
        logs.extend(
            self.streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned(),
        );
        logs
    }
}

/// Applies retention to the hub's extra streams every `interval`.
async fn run_retention(inner: std::sync::Weak<Inner>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let logs = inner.logs();
        drop(inner);
        let _ = tokio::task::spawn_blocking(move || {
            for log in logs {
                log.apply_retention();
            }
        })
        .await;
    }
}
