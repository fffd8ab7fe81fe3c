//! A hub run in-process through the library (`hub::Server`), with recording
//! capability services, for gateway tests that must observe what the gateway hands
//! on (telemetry, method answers, delivery acks) before those capabilities exist.
//! The recorder is test code: it stores what it is given and answers twin requests
//! with a fixed document.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use hub::commands::{DeliveryAcks, MethodResponses};
use hub::delivery::DeliveryId;
use hub::gateway::connections::Connections;
use hub::gateway::metrics::GatewayMetrics;
use hub::gateway::services::DeviceServices;
use hub::registry::{Device, DeviceId, DeviceSpec, Registry};
use hub::telemetry::{Durable, IngestError, TelemetryIngest, TelemetryMessage};
use hub::twins::{TwinOp, TwinReply, TwinRequests};
use hub::{Config, ServeError, Server};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// Records what the gateway hands to the capability services.
#[derive(Debug, Default)]
pub struct Recorder {
    telemetry: Mutex<Vec<TelemetryMessage>>,
    methods: Mutex<Vec<(DeviceId, String, i32, Bytes)>>,
    delivered: Mutex<Vec<(DeviceId, DeliveryId)>>,
    changed: Notify,
}

impl Recorder {
    /// Telemetry received so far.
    pub fn telemetry(&self) -> Vec<TelemetryMessage> {
        self.telemetry.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Method answers received so far: (device, rid, status, payload).
    pub fn methods(&self) -> Vec<(DeviceId, String, i32, Bytes)> {
        self.methods.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Delivery acknowledgements received so far.
    pub fn delivered(&self) -> Vec<(DeviceId, DeliveryId)> {
        self.delivered.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Waits until `check` holds (checked after every recorded event), up to 10 s.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Recorder) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.changed.notified();
            if check(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("timed out waiting for {what}");
            }
        }
    }
}

#[async_trait]
impl TelemetryIngest for Recorder {
    async fn submit(&self, messages: Vec<TelemetryMessage>) -> Result<Durable, IngestError> {
        if let Ok(mut telemetry) = self.telemetry.lock() {
            telemetry.extend(messages);
        }
        self.changed.notify_waiters();
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
}

#[async_trait]
impl TwinRequests for Recorder {
    async fn request(&self, _device: &DeviceId, op: TwinOp) -> TwinReply {
        match op {
            TwinOp::Get => TwinReply {
                status: 200,
                body: Bytes::from_static(
                    br#"{"desired":{"$version":1},"reported":{"$version":1}}"#,
                ),
                version: None,
            },
            TwinOp::PatchReported(_) => TwinReply {
                status: 204,
                body: Bytes::new(),
                version: Some(2),
            },
        }
    }
}

impl MethodResponses for Recorder {
    fn respond(&self, device: &DeviceId, rid: &str, status: i32, payload: Bytes) {
        if let Ok(mut methods) = self.methods.lock() {
            methods.push((device.clone(), rid.to_string(), status, payload));
        }
        self.changed.notify_waiters();
    }
}

impl hub::commands::ConnectionEvents for Recorder {
    fn subscriptions(
        &self,
        _device: &DeviceId,
        _connection: u64,
        _subscriptions: &std::collections::BTreeSet<hub::delivery::Subscription>,
    ) {
    }
    fn disconnected(&self, _device: &DeviceId, _connection: u64) {}
}

impl DeliveryAcks for Recorder {
    fn delivered(&self, device: &DeviceId, id: DeliveryId) {
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.push((device.clone(), id));
        }
        self.changed.notify_waiters();
    }
}

/// A hub running inside the test process.
#[derive(Debug)]
pub struct InProcessHub {
    /// MQTT over TCP.
    pub mqtt: SocketAddr,
    /// MQTT over TLS.
    pub mqtts: SocketAddr,
    /// REST API.
    pub http: SocketAddr,
    /// The device registry.
    pub registry: Registry,
    /// Live device connections.
    pub connections: Connections,
    /// Gateway counters.
    pub metrics: Arc<GatewayMetrics>,
    /// What the gateway handed on.
    pub recorder: Arc<Recorder>,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// The configuration tests use: everything on ephemeral loopback ports.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.mqtt.tcp_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.mqtt.tls_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.amqp.tls_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config
}

impl InProcessHub {
    /// Starts a hub on `data_dir` with [`test_config`].
    pub async fn start(data_dir: &Path) -> Result<Self> {
        Self::start_with(test_config(data_dir)).await
    }

    /// Starts a hub with `config`.
    pub async fn start_with(config: Config) -> Result<Self> {
        Self::start_with_services(config, |recorder| DeviceServices {
            telemetry: recorder.clone(),
            twins: recorder.clone(),
            methods: recorder.clone(),
            deliveries: recorder.clone(),
            events: recorder,
        })
        .await
    }

    /// Starts a hub with `config` whose device traffic goes to the services `wire`
    /// builds around the recorder.
    pub async fn start_with_services(
        config: Config,
        wire: impl FnOnce(Arc<Recorder>) -> DeviceServices,
    ) -> Result<Self> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        let recorder = Arc::new(Recorder::default());
        let services = wire(Arc::clone(&recorder));
        let server = Server::start_with(config, |_| services).await?;
        let endpoints = server.endpoints();
        let registry = server.registry().clone();
        let connections = server.connections();
        let metrics = server.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            mqtt: endpoints.mqtt.context("no mqtt endpoint")?,
            mqtts: endpoints.mqtts.context("no mqtts endpoint")?,
            http: endpoints.http,
            registry,
            connections,
            metrics,
            recorder,
            data_dir,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The development CA certificate (PEM) devices trust.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("certs/ca.pem"))?)
    }

    /// The development CA, to issue device certificates.
    pub fn ca(&self) -> Result<certs::Ca> {
        certs::Ca::read(&self.data_dir.join("certs"), "ca")?.context("no CA in the data dir")
    }

    /// Creates a device from a JSON body as `PUT /devices/{id}` takes it.
    pub async fn create_device(&self, id: &str, spec: serde_json::Value) -> Result<Device> {
        let spec: DeviceSpec = serde_json::from_value(spec)?;
        Ok(self.registry.create(DeviceId::parse(id)?, spec).await?)
    }

    /// The primary key (base64) of a SAS device.
    pub fn primary_key(device: &Device) -> Result<String> {
        Ok(device
            .authentication
            .symmetric_key
            .as_ref()
            .context("device has no symmetric key")?
            .primary_key
            .clone())
    }

    /// Stops the hub and waits for it to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => Ok(task.await??),
            None => Ok(()),
        }
    }
}

impl Drop for InProcessHub {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
