//! The device client: a driver task owns rumqttc's event loop — it reconnects with
//! jittered backoff and fresh credentials, renews SAS tokens before they expire,
//! resubscribes and re-reads the twin after every reconnect, pairs PUBACKs with the
//! callers waiting for durability, and routes what the hub sends (twin answers,
//! desired patches, method calls, C2D messages) to their receivers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, TlsConfiguration, Transport,
};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::Error;
use crate::backoff::Backoff;
use crate::connection_string::ConnectionString;
use crate::credentials::Credentials;
use crate::tracker::PublishTracker;

/// Escapes property-bag keys and values (everything but unreserved characters).
const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'$');

/// How the client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The hub's host name (in SAS tokens and the TLS certificate check).
    pub host: String,
    /// The device id.
    pub device_id: String,
    /// The credential.
    pub credentials: Credentials,
    /// Where to dial (default: `host`, port 8883 with TLS, 1883 without).
    pub endpoint: Option<(String, u16)>,
    /// The CA certificate(s) to trust (PEM); `None` with `tls` trusts nothing and
    /// fails, so tests always pass the hub's CA.
    pub ca_pem: Option<String>,
    /// TLS (default) or plain TCP (local testing only).
    pub tls: bool,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Telemetry messages that may wait while the client is offline; when full,
    /// [`DeviceClient::send_telemetry`] fails at once with [`Error::OfflineQueueFull`]
    /// (the newest message is refused; nothing queued is dropped).
    pub offline_queue: usize,
    /// How long twin requests wait for the hub's answer.
    pub request_timeout: Duration,
}

impl ClientOptions {
    /// Options from a connection string
    /// (`HostName=…;DeviceId=…;SharedAccessKey=…[;GatewayHostName=…]`).
    pub fn from_connection_string(text: &str) -> Result<Self, Error> {
        let cs: ConnectionString = text.parse()?;
        let mut options = Self::new(
            &cs.host_name,
            &cs.device_id,
            Credentials::Sas {
                key: cs.shared_access_key,
                ttl: Duration::from_secs(3600),
            },
        );
        options.endpoint = cs.gateway_host_name.map(|gateway| (gateway, 8883));
        Ok(options)
    }

    /// Options for `device_id` on `host` with `credentials` and the defaults.
    pub fn new(host: &str, device_id: &str, credentials: Credentials) -> Self {
        Self {
            host: host.to_string(),
            device_id: device_id.to_string(),
            credentials,
            endpoint: None,
            ca_pem: None,
            tls: true,
            keep_alive: Duration::from_secs(60),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            offline_queue: 1000,
            request_timeout: Duration::from_secs(30),
        }
    }

    /// Trusts `ca_pem` for the hub's certificate.
    pub fn with_ca(mut self, ca_pem: &str) -> Self {
        self.ca_pem = Some(ca_pem.to_string());
        self
    }

    /// Dials `host:port` instead of the default.
    pub fn with_endpoint(mut self, host: &str, port: u16) -> Self {
        self.endpoint = Some((host.to_string(), port));
        self
    }

    /// Plain TCP instead of TLS (local testing only: credentials travel in clear).
    pub fn without_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    fn username(&self) -> String {
        format!("{}/{}/?api-version=2021-04-12", self.host, self.device_id)
    }

    fn mqtt_options(&self) -> Result<MqttOptions, Error> {
        let (dial, port) = self
            .endpoint
            .clone()
            .unwrap_or_else(|| (self.host.clone(), if self.tls { 8883 } else { 1883 }));
        let mut options = MqttOptions::new(self.device_id.clone(), dial, port);
        options.set_keep_alive(self.keep_alive);
        // Azure's contract: a persistent session, so subscriptions and undelivered C2D
        // messages survive reconnects.
        options.set_clean_session(false);
        options.set_manual_acks(true);
        options.set_inflight(100);
        options.set_max_packet_size(300 * 1024, 300 * 1024);
        options.set_request_channel_capacity(self.offline_queue.max(1));
        if self.tls {
            options.set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls_config()?)));
        }
        Ok(options)
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls = |err: String| Error::Tls(err);
        let mut roots = rustls::RootCertStore::empty();
        let ca = self
            .ca_pem
            .as_deref()
            .ok_or_else(|| tls("no CA certificate given (ClientOptions::with_ca)".into()))?;
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(cert.map_err(|e| tls(e.to_string()))?)
                .map_err(|e| tls(e.to_string()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots);
        let config = match &self.credentials {
            Credentials::X509 { cert_pem, key_pem } => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls(e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| tls(e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// A telemetry message.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The body.
    pub body: Bytes,
    /// `$.mid`.
    pub message_id: Option<String>,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.ct`.
    pub content_type: Option<String>,
    /// `$.ce`.
    pub content_encoding: Option<String>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
}

impl Message {
    /// A message with a raw body.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// A JSON message (content type `application/json`, encoding UTF-8).
    pub fn json<T: Serialize>(value: &T) -> Result<Self, Error> {
        Ok(Self {
            body: Bytes::from(serde_json::to_vec(value)?),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ..Self::default()
        })
    }

    /// Sets the message id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Adds an application property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    fn topic(&self, device: &str) -> String {
        let system = [
            ("$.mid", &self.message_id),
            ("$.cid", &self.correlation_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
        ];
        let pairs: Vec<String> = system
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
            .chain(self.properties.iter().cloned())
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(&k, BAG),
                    utf8_percent_encode(&v, BAG)
                )
            })
            .collect();
        format!("devices/{device}/messages/events/{}", pairs.join("&"))
    }
}

/// A device twin as the device sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// Desired properties, with `$version`.
    pub desired: Value,
    /// Reported properties, with `$version`.
    pub reported: Value,
}

/// A change of desired properties.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredUpdate {
    /// A patch pushed by the hub (with `$version`).
    Patch(Value),
    /// The whole desired section, read again after a reconnect (patches may have been
    /// missed while offline).
    Full(Value),
}

/// A direct method call; answer it with [`MethodCall::respond`].
#[derive(Debug)]
pub struct MethodCall {
    /// The method name.
    pub name: String,
    /// The payload (`null` when empty).
    pub payload: Value,
    rid: String,
    client: AsyncClient,
}

impl MethodCall {
    /// Sends the answer.
    pub async fn respond(self, status: i32, payload: &Value) -> Result<(), Error> {
        let topic = format!("$iothub/methods/res/{status}/?$rid={}", self.rid);
        self.client
            .publish(topic, QoS::AtMostOnce, false, serde_json::to_vec(payload)?)
            .await
            .map_err(|_| Error::Closed)
    }
}

/// A cloud-to-device message; [`CloudMessage::complete`] acknowledges it (until then
/// the hub redelivers it after a reconnect).
#[derive(Debug)]
pub struct CloudMessage {
    /// The body.
    pub body: Bytes,
    /// All properties of the topic's bag (`$.mid`, `$.cid`, …, application ones).
    pub properties: Vec<(String, String)>,
    publish: Publish,
    client: AsyncClient,
}

impl CloudMessage {
    /// The message id (`$.mid`).
    pub fn message_id(&self) -> Option<&str> {
        self.property("$.mid")
    }

    /// A property by key.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Completes the message (sends its PUBACK).
    pub async fn complete(self) -> Result<(), Error> {
        self.client
            .ack(&self.publish)
            .await
            .map_err(|_| Error::Closed)
    }
}

/// Whether the client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connected (CONNACK received).
    Connected,
    /// Not connected; reconnecting.
    Disconnected,
}

/// What the hub sends the device.
#[derive(Debug)]
pub struct DeviceEvents {
    /// Desired-property changes.
    pub desired: mpsc::Receiver<DesiredUpdate>,
    /// Direct method calls.
    pub methods: mpsc::Receiver<MethodCall>,
    /// Cloud-to-device messages.
    pub messages: mpsc::Receiver<CloudMessage>,
}

type TwinAnswer = (u16, Option<u64>, Bytes);

struct Shared {
    tracker: Mutex<PublishTracker>,
    twin_requests: Mutex<HashMap<String, oneshot::Sender<TwinAnswer>>>,
    next_rid: AtomicU64,
    closing: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connected (or reconnecting) device.
#[derive(Clone)]
pub struct DeviceClient {
    client: AsyncClient,
    shared: Arc<Shared>,
    device_id: String,
    request_timeout: Duration,
    state: watch::Receiver<ConnectionState>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl DeviceClient {
    /// Starts the client; it connects in the background and keeps reconnecting.
    pub fn start(options: ClientOptions) -> Result<(DeviceClient, DeviceEvents), Error> {
        let mut mqtt = options.mqtt_options()?;
        let (password, ttl) = options
            .credentials
            .password(&options.host, &options.device_id, SystemTime::now())?
            .map_or((String::new(), None), |(p, ttl)| (p, Some(ttl)));
        mqtt.set_credentials(options.username(), password);
        let (client, eventloop) = AsyncClient::new(mqtt, options.offline_queue.max(1));
        let shared = Arc::new(Shared {
            tracker: Mutex::default(),
            twin_requests: Mutex::default(),
            next_rid: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        });
        let (state_tx, state) = watch::channel(ConnectionState::Disconnected);
        let (desired_tx, desired) = mpsc::channel(64);
        let (methods_tx, methods) = mpsc::channel(64);
        let (messages_tx, messages) = mpsc::channel(64);
        let device = DeviceClient {
            client: client.clone(),
            shared: Arc::clone(&shared),
            device_id: options.device_id.clone(),
            request_timeout: options.request_timeout,
            state,
        };
        let driver = Driver {
            options,
            ttl,
            eventloop,
            device: device.clone(),
            state: state_tx,
            desired: desired_tx,
            methods: methods_tx,
            messages: messages_tx,
            generation: Arc::new(AtomicU64::new(0)),
        };
        tokio::spawn(driver.run());
        Ok((
            device,
            DeviceEvents {
                desired,
                methods,
                messages,
            },
        ))
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Waits until the client is connected, up to `within`.
    pub async fn connected(&self, within: Duration) -> Result<(), Error> {
        let mut state = self.state.clone();
        tokio::time::timeout(within, state.wait_for(|s| *s == ConnectionState::Connected))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Closed)?;
        Ok(())
    }

    /// Sends telemetry and returns once the hub acknowledged it — that is, once it is
    /// durable. While offline the message waits in the offline queue.
    pub async fn send_telemetry(&self, message: Message) -> Result<(), Error> {
        if self.shared.closing.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        let topic = message.topic(&self.device_id);
        let (done, durable) = oneshot::channel();
        {
            // Submitted under the tracker lock, so the tracker's order is rumqttc's.
            let mut tracker = lock(&self.shared.tracker);
            self.client
                .try_publish(topic.clone(), QoS::AtLeastOnce, false, message.body.clone())
                .map_err(|_| Error::OfflineQueueFull)?;
            tracker.submitted(topic, message.body, done);
        }
        durable.await.map_err(|_| Error::Closed)?
    }

    async fn twin_request(&self, topic_prefix: &str, body: Vec<u8>) -> Result<TwinAnswer, Error> {
        let rid = self
            .shared
            .next_rid
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let (answer, answered) = oneshot::channel();
        lock(&self.shared.twin_requests).insert(rid.clone(), answer);
        let sent = self.client.try_publish(
            format!("{topic_prefix}?$rid={rid}"),
            QoS::AtMostOnce,
            false,
            body,
        );
        if sent.is_err() {
            lock(&self.shared.twin_requests).remove(&rid);
            return Err(Error::OfflineQueueFull);
        }
        let result = tokio::time::timeout(self.request_timeout, answered).await;
        lock(&self.shared.twin_requests).remove(&rid);
        match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Reads the twin (desired and reported, with versions).
    pub async fn get_twin(&self) -> Result<Twin, Error> {
        let (status, _, body) = self.twin_request("$iothub/twin/GET/", Vec::new()).await?;
        if status != 200 {
            return Err(Error::Rejected {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let mut doc: Value = serde_json::from_slice(&body)?;
        Ok(Twin {
            desired: doc["desired"].take(),
            reported: doc["reported"].take(),
        })
    }

    /// Patches reported properties (`null` deletes); returns the new reported version.
    pub async fn patch_reported<T: Serialize>(&self, patch: &T) -> Result<u64, Error> {
        let body = serde_json::to_vec(patch)?;
        let (status, version, answer) = self
            .twin_request("$iothub/twin/PATCH/properties/reported/", body)
            .await?;
        match (status, version) {
            (204, Some(version)) => Ok(version),
            _ => Err(Error::Rejected {
                status,
                message: String::from_utf8_lossy(&answer).into_owned(),
            }),
        }
    }

    /// Disconnects and stops reconnecting; waiting sends fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect().await;
    }
}

struct Driver {
    options: ClientOptions,
    ttl: Option<Duration>,
    eventloop: EventLoop,
    device: DeviceClient,
    state: watch::Sender<ConnectionState>,
    desired: mpsc::Sender<DesiredUpdate>,
    methods: mpsc::Sender<MethodCall>,
    messages: mpsc::Sender<CloudMessage>,
    /// Counts connections, so a renewal timer of an old one does nothing.
    generation: Arc<AtomicU64>,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.options.backoff_base, self.options.backoff_max);
        loop {
            match self.eventloop.poll().await {
                Ok(event) => self.handle(event, &mut backoff),
                Err(err) => {
                    let _ = self.state.send(ConnectionState::Disconnected);
                    if self.device.shared.closing.load(Ordering::Relaxed) {
                        lock(&self.device.shared.tracker).fail_all(|| Error::Closed);
                        return;
                    }
                    let delay = backoff.next_delay(&mut rand::rng());
                    tracing::info!(error = %err, ?delay, "device connection lost; reconnecting");
                    tokio::time::sleep(delay).await;
                    self.refresh_credentials();
                }
            }
        }
    }

    /// A fresh token for the next connection attempt.
    fn refresh_credentials(&mut self) {
        match self.options.credentials.password(
            &self.options.host,
            &self.options.device_id,
            SystemTime::now(),
        ) {
            Ok(Some((password, ttl))) => {
                self.ttl = Some(ttl);
                self.eventloop
                    .mqtt_options
                    .set_credentials(self.options.username(), password);
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "cannot renew the device credential"),
        }
    }

    fn handle(&mut self, event: Event, backoff: &mut Backoff) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                backoff.reset();
                let _ = self.state.send(ConnectionState::Connected);
                self.on_connected(ack.session_present);
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                lock(&self.device.shared.tracker).acknowledged(ack.pkid)
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                lock(&self.device.shared.tracker).written(pkid)
            }
            Event::Incoming(Packet::Publish(publish)) => self.route(publish),
            _ => {}
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        let device = &self.device;
        if !session_present {
            // rumqttc dropped what it would have resent: publish it again ourselves.
            let mut tracker = lock(&device.shared.tracker);
            for pending in tracker.session_lost() {
                if device
                    .client
                    .try_publish(
                        pending.topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        pending.payload.clone(),
                    )
                    .is_ok()
                {
                    tracker.submitted(pending.topic, pending.payload, pending.done);
                } else {
                    let _ = pending.done.send(Err(Error::OfflineQueueFull));
                }
            }
        }
        let id = &device.device_id;
        let filters = vec![
            SubscribeFilter::new(
                format!("devices/{id}/messages/devicebound/#"),
                QoS::AtLeastOnce,
            ),
            SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
            SubscribeFilter::new(
                "$iothub/twin/PATCH/properties/desired/#".into(),
                QoS::AtMostOnce,
            ),
            SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
        ];
        if device.client.try_subscribe_many(filters).is_err() {
            tracing::warn!("cannot queue the subscriptions");
        }
        // Desired patches may have been missed while offline: read the twin again.
        let (reader, desired) = (device.clone(), self.desired.clone());
        tokio::spawn(async move {
            if let Ok(twin) = reader.get_twin().await {
                let _ = desired.send(DesiredUpdate::Full(twin.desired)).await;
            }
        });
        // Renew a token-based credential at 80 % of its lifetime by reconnecting.
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(ttl) = self.ttl {
            let (client, current) = (device.client.clone(), Arc::clone(&self.generation));
            tokio::spawn(async move {
                tokio::time::sleep(ttl.mul_f64(0.8)).await;
                if current.load(Ordering::Relaxed) == generation {
                    tracing::info!("renewing the device credential");
                    let _ = client.try_disconnect();
                }
            });
        }
    }

    fn route(&mut self, publish: Publish) {
        let topic = publish.topic.clone();
        if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
            let bag = parse_bag(query.trim_start_matches('?'));
            let find = |key: &str| bag.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            if let Some(rid) = find("$rid")
                && let Some(waiter) = lock(&self.device.shared.twin_requests).remove(&rid)
            {
                let version = find("$version").and_then(|v| v.parse().ok());
                let _ = waiter.send((status.parse().unwrap_or(0), version, publish.payload));
            }
        } else if topic.starts_with("$iothub/twin/PATCH/properties/desired/") {
            if let Ok(patch) = serde_json::from_slice(&publish.payload) {
                let _ = self.desired.try_send(DesiredUpdate::Patch(patch));
            }
            self.ack(&publish);
        } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let (name, query) = rest.split_once('/').unwrap_or((rest, ""));
            let bag = parse_bag(query.trim_start_matches('?'));
            let rid = bag
                .iter()
                .find(|(k, _)| k == "$rid")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let payload = if publish.payload.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&publish.payload).unwrap_or(Value::Null)
            };
            let call = MethodCall {
                name: percent_decode_str(name).decode_utf8_lossy().into_owned(),
                payload,
                rid,
                client: self.device.client.clone(),
            };
            if self.methods.try_send(call).is_err() {
                tracing::warn!("method call dropped: the methods receiver is full or gone");
            }
            self.ack(&publish);
        } else if let Some(bag) = topic.strip_prefix(&format!(
            "devices/{}/messages/devicebound/",
            self.device.device_id
        )) {
            let message = CloudMessage {
                body: publish.payload.clone(),
                properties: parse_bag(bag),
                publish,
                client: self.device.client.clone(),
            };
            // Not completed when nobody takes it: the hub delivers it again later.
            if self.messages.try_send(message).is_err() {
                tracing::warn!("C2D message not taken: the messages receiver is full or gone");
            }
        } else {
            self.ack(&publish);
        }
    }

    fn ack(&self, publish: &Publish) {
        if publish.qos == QoS::AtLeastOnce {
            let _ = self.device.client.try_ack(publish);
        }
    }
}

fn parse_bag(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|f| !f.is_empty())
        .map(|field| {
            let (k, v) = field.split_once('=').unwrap_or((field, ""));
            let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topics_carry_escaped_properties() {
        let message = Message::new("x")
            .with_id("m/1")
            .with_property("room", "hall 2");
        assert_eq!(
            message.topic("d1"),
            "devices/d1/messages/events/$.mid=m%2F1&room=hall%202"
        );
        let json = Message::json(&serde_json::json!({"t": 1})).unwrap();
        assert_eq!(
            json.topic("d1"),
            "devices/d1/messages/events/$.ct=application%2Fjson&$.ce=utf-8"
        );
    }

    #[test]
    fn bags_decode() {
        assert_eq!(
            parse_bag("%24.mid=m1&k=v%2Fw&flag"),
            vec![
                ("$.mid".into(), "m1".into()),
                ("k".into(), "v/w".into()),
                ("flag".into(), String::new())
            ]
        );
    }

    #[test]
    fn options_from_a_connection_string() {
        let options = ClientOptions::from_connection_string(
            "HostName=hub;DeviceId=d;SharedAccessKey=a2V5a2V5a2V5a2V5;GatewayHostName=10.0.0.9",
        )
        .unwrap();
        assert_eq!(options.endpoint, Some(("10.0.0.9".to_string(), 8883)));
        assert_eq!(options.username(), "hub/d/?api-version=2021-04-12");
        assert!(
            options.mqtt_options().is_err(),
            "TLS without a CA is refused"
        );
        assert!(options.without_tls().mqtt_options().is_ok());
    }
}
