//! The endpoint kinds a routed message goes to: webhooks (CloudEvents 1.0
//! structured JSON or Event Grid schema, over hyper's pooled client with rustls),
//! NATS subjects (async-nats;
//! the CloudEvents JSON), and named streams inside the hub; and the shapes they
//! carry (Event Grid's telemetry and device event data).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::condition::body_is_json;
use super::config::{NatsEndpoint, WebhookEndpoint, WebhookSchema};
use super::events::{EventKind, OP_TYPE_PROPERTY};
use crate::auth::device::AuthMethod;
use crate::properties::PropertyBag;
use crate::registry::DeviceId;
use crate::telemetry::message::{self, DATA_SCHEMA, StoredMessage};
use crate::telemetry::{Telemetry, TelemetryIngest, TelemetryMessage};

/// A message on its way to an endpoint.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The message, enrichments added to its application properties.
    pub message: StoredMessage,
    /// The device event it is, if not telemetry.
    pub event: Option<EventKind>,
    /// A stable id: the log, partition and offset it was read at (a redelivery has
    /// the same id, so receivers can drop duplicates).
    pub id: String,
}

/// Why a delivery attempt failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The receiver answered with a status other than 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
    /// No answer, or the connection failed.
    #[error("{0}")]
    Transport(String),
    /// The hub's own stream refused the message.
    #[error("stream: {0}")]
    Stream(String),
}

/// Something messages are delivered to.
#[async_trait]
pub trait Endpoint: Send + Sync + 'static {
    /// Delivers `batch` (at most [`Endpoint::max_batch`] messages) in order; an error
    /// means none may count as delivered.
    async fn deliver(&self, batch: &[Outgoing]) -> Result<(), SendError>;
    /// The most messages one delivery carries.
    fn max_batch(&self) -> usize;
}

fn rfc3339(time: time::OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Event Grid's names for telemetry system properties.
fn event_grid_system_name(name: &str) -> &str {
    match name {
        "content-type" => "iothub-content-type",
        "content-encoding" => "iothub-content-encoding",
        other => other,
    }
}

/// The body as JSON when it is JSON text, else base64 (as Event Grid sends it).
fn body_value(message: &StoredMessage) -> Value {
    body_is_json(message)
        .then(|| serde_json::from_slice(&message.body).ok())
        .flatten()
        .unwrap_or_else(|| Value::String(STANDARD.encode(&message.body)))
}

/// Event Grid's `data` of a routed message.
pub fn event_data(outgoing: &Outgoing) -> Value {
    let message = &outgoing.message;
    let hub = message
        .properties
        .get("hubName")
        .cloned()
        .unwrap_or_default();
    match outgoing.event {
        None => {
            let mut system: Map<String, Value> = message
                .system_properties
                .iter()
                .map(|(k, v)| {
                    (
                        event_grid_system_name(k).to_string(),
                        Value::String(v.clone()),
                    )
                })
                .collect();
            system.insert("iothub-message-source".into(), "Telemetry".into());
            json!({
                "properties": message.properties,
                "systemProperties": system,
                "body": body_value(message),
            })
        }
        Some(kind @ (EventKind::Created | EventKind::Deleted)) => {
            let _ = kind;
            json!({ "twin": body_value(message), "hubName": hub, "deviceId": message.device_id })
        }
        Some(EventKind::Connected | EventKind::Disconnected) => json!({
            "deviceConnectionStateEventInfo": body_value(message),
            "hubName": hub,
            "deviceId": message.device_id,
            "moduleId": "",
        }),
        Some(kind) => {
            let mut data = match body_value(message) {
                Value::Object(map) => map,
                other => Map::from_iter([("body".to_string(), other)]),
            };
            data.insert("hubName".into(), hub.into());
            data.insert("deviceId".into(), message.device_id.clone().into());
            data.insert(OP_TYPE_PROPERTY.into(), kind.op_type().into());
            Value::Object(data)
        }
    }
}

fn event_type(outgoing: &Outgoing) -> &'static str {
    outgoing.event.map_or(
        "Microsoft.Devices.DeviceTelemetry",
        EventKind::event_grid_type,
    )
}

/// A CloudEvents 1.0 event (structured JSON) of a routed message.
pub fn cloud_event(hostname: &str, outgoing: &Outgoing) -> Value {
    json!({
        "specversion": "1.0",
        "id": outgoing.id,
        "source": hostname,
        "type": event_type(outgoing),
        "subject": format!("devices/{}", outgoing.message.device_id),
        "time": rfc3339(outgoing.message.enqueued_time),
        "datacontenttype": "application/json",
        "data": event_data(outgoing),
    })
}

/// An Event Grid schema event of a routed message.
pub fn event_grid_event(hostname: &str, outgoing: &Outgoing) -> Value {
    json!({
        "id": outgoing.id,
        "topic": format!("/hubs/{hostname}"),
        "subject": format!("devices/{}", outgoing.message.device_id),
        "eventType": event_type(outgoing),
        "eventTime": rfc3339(outgoing.message.enqueued_time),
        "data": event_data(outgoing),
        "dataVersion": "",
        "metadataVersion": "1",
    })
}

/// The HTTP(S) client webhooks share: pooled connections, rustls for `https://`.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// Builds the webhooks' client with `tls` for `https://` URLs; connecting may take
/// up to `connect_timeout`.
pub fn http_client(tls: rustls::ClientConfig, connect_timeout: Duration) -> HttpClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(16)
        .build(connector)
}

/// A webhook: one POST per batch.
pub struct Webhook {
    config: WebhookEndpoint,
    uri: hyper::Uri,
    hostname: String,
    client: HttpClient,
    timeout: Duration,
}

impl Webhook {
    /// A webhook posting with `client`; an attempt may take up to `timeout`.
    pub fn new(
        config: WebhookEndpoint,
        hostname: String,
        client: HttpClient,
        timeout: Duration,
    ) -> Result<Self, SendError> {
        let uri = config
            .url
            .parse()
            .map_err(|err: hyper::http::uri::InvalidUri| SendError::Transport(err.to_string()))?;
        Ok(Self {
            config,
            uri,
            hostname,
            client,
            timeout,
        })
    }

    /// The body and content type of one POST.
    pub fn body(&self, batch: &[Outgoing]) -> (Vec<u8>, &'static str) {
        match self.config.schema {
            WebhookSchema::CloudEvents if self.config.max_batch_size == 1 && batch.len() == 1 => (
                cloud_event(&self.hostname, &batch[0])
                    .to_string()
                    .into_bytes(),
                "application/cloudevents+json; charset=utf-8",
            ),
            WebhookSchema::CloudEvents => {
                let events: Vec<Value> = batch
                    .iter()
                    .map(|o| cloud_event(&self.hostname, o))
                    .collect();
                (
                    Value::Array(events).to_string().into_bytes(),
                    "application/cloudevents-batch+json; charset=utf-8",
                )
            }
            WebhookSchema::EventGrid => {
                let events: Vec<Value> = batch
                    .iter()
                    .map(|o| event_grid_event(&self.hostname, o))
                    .collect();
                (
                    Value::Array(events).to_string().into_bytes(),
                    "application/json",
                )
            }
        }
    }

    async fn post(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        use http_body_util::BodyExt;
        let (body, content_type) = self.body(batch);
        let mut request = hyper::Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, content_type);
        if self.config.schema == WebhookSchema::EventGrid {
            request = request.header("aeg-event-type", "Notification");
        }
        for (key, value) in &self.config.headers {
            request = request.header(key.as_str(), value.as_str());
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|err| SendError::Transport(err.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| SendError::Transport(transport_error(&err)))?;
        let status = response.status();
        // Read the (small) answer so the connection goes back to the pool.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(SendError::Status(status.as_u16()))
        }
    }
}

#[async_trait]
impl Endpoint for Webhook {
    async fn deliver(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, self.post(batch)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Transport("no answer in time".into())),
        }
    }

    fn max_batch(&self) -> usize {
        self.config.max_batch_size
    }
}

/// A client error with its cause but without the URL (a URL's query may carry a
/// secret).
fn transport_error(err: &hyper_util::client::legacy::Error) -> String {
    let kind = if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(err);
    let mut detail = String::new();
    while let Some(cause) = source {
        detail = cause.to_string();
        source = cause.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

/// Most messages per NATS delivery (published, then one flush).
const NATS_BATCH: usize = 256;

/// A NATS subject: each message published as its CloudEvents JSON, with the id in
/// `Nats-Msg-Id` (JetStream drops redeliveries by it).
pub struct Nats {
    config: NatsEndpoint,
    hostname: String,
    timeout: Duration,
    client: Mutex<Option<async_nats::Client>>,
}

impl Nats {
    /// A NATS endpoint; it connects on first use (and again after a failure).
    pub fn new(config: NatsEndpoint, hostname: String, timeout: Duration) -> Self {
        Self {
            config,
            hostname,
            timeout,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<async_nats::Client, SendError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let connect = async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .connect(self.config.url.as_str());
        let client = connect
            .await
            .map_err(|err| SendError::Transport(err.to_string()))?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

#[async_trait]
impl Endpoint for Nats {
    async fn deliver(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        let client = self.client().await?;
        let publish = async {
            for outgoing in batch {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", outgoing.id.as_str());
                headers.insert("Content-Type", "application/cloudevents+json");
                let payload = cloud_event(&self.hostname, outgoing).to_string();
                client
                    .publish_with_headers(self.config.subject.clone(), headers, payload.into())
                    .await
                    .map_err(|err| SendError::Transport(err.to_string()))?;
            }
            client
                .flush()
                .await
                .map_err(|err| SendError::Transport(err.to_string()))
        };
        match tokio::time::timeout(self.timeout, publish).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Transport("no answer in time".into())),
        }
    }

    fn max_batch(&self) -> usize {
        NATS_BATCH
    }
}

/// Most messages per append to a named stream.
const STREAM_BATCH: usize = 256;

/// A named stream inside the hub.
pub struct Stream {
    log: Arc<Telemetry>,
}

impl Stream {
    /// Appends to `log`.
    pub fn new(log: Arc<Telemetry>) -> Self {
        Self { log }
    }
}

/// Appends `messages` to `log` in order and waits until all are durable.
pub async fn append(log: &Telemetry, messages: Vec<TelemetryMessage>) -> Result<(), SendError> {
    let mut pending = Vec::with_capacity(messages.len());
    for message in messages {
        let durable = log
            .submit(vec![message])
            .await
            .map_err(|err| SendError::Stream(err.to_string()))?;
        pending.push(durable);
    }
    for durable in pending {
        durable
            .await
            .map_err(|err| SendError::Stream(err.to_string()))?;
    }
    Ok(())
}

#[async_trait]
impl Endpoint for Stream {
    async fn deliver(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        let messages = batch
            .iter()
            .filter_map(|o| to_ingest(&o.message, &[]))
            .collect();
        append(&self.log, messages).await
    }

    fn max_batch(&self) -> usize {
        STREAM_BATCH
    }
}

/// A stored message as a message to append elsewhere (a named stream, the
/// dead-letter stream), with `extra` application properties: the device's property
/// bag rebuilt from the stored system properties, the enqueue time kept.
pub fn to_ingest(message: &StoredMessage, extra: &[(String, String)]) -> Option<TelemetryMessage> {
    let device_id = DeviceId::parse(&message.device_id).ok()?;
    let mut bag = Vec::new();
    let mut auth_method = AuthMethod::Sas;
    let mut model_id = None;
    for (name, value) in &message.system_properties {
        if let Some((key, _)) = message::SYSTEM_PROPERTIES.iter().find(|(_, n)| n == name) {
            bag.push((key.to_string(), value.clone()));
        } else if message::kept_under_own_name(name) {
            bag.push((name.clone(), value.clone()));
        } else if name == DATA_SCHEMA {
            model_id = Some(value.clone());
        } else if name == "iothub-connection-auth-method" {
            let stamp: Value = serde_json::from_str(value).unwrap_or(Value::Null);
            if let Some(method) = stamp["type"].as_str().and_then(AuthMethod::from_tag) {
                auth_method = method;
            }
        }
    }
    bag.extend(
        message
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    bag.extend(extra.iter().cloned());
    Some(TelemetryMessage {
        device_id,
        auth_method,
        properties: PropertyBag(bag),
        body: message.body.clone(),
        enqueued_at: message.enqueued_time,
        model_id,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn outgoing(event: Option<EventKind>, body: &str) -> Outgoing {
        let mut system = BTreeMap::new();
        system.insert("content-type".to_string(), "application/json".to_string());
        system.insert("message-id".to_string(), "m1".to_string());
        system.insert(
            "iothub-connection-auth-method".to_string(),
            AuthMethod::Jwt.stamp().to_string(),
        );
        let mut properties = BTreeMap::new();
        properties.insert("hubName".to_string(), "hub".to_string());
        Outgoing {
            message: StoredMessage {
                offset: 3,
                enqueued_time: time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
                device_id: "d1".into(),
                system_properties: system,
                properties,
                body: bytes::Bytes::from(body.to_string()),
            },
            event,
            id: "telemetry-0-3".into(),
        }
    }

    #[test]
    fn cloud_events_carry_event_grid_types_and_data() {
        let telemetry = cloud_event("hub.example", &outgoing(None, r#"{"t":1}"#));
        assert_eq!(telemetry["specversion"], "1.0");
        assert_eq!(telemetry["type"], "Microsoft.Devices.DeviceTelemetry");
        assert_eq!(telemetry["subject"], "devices/d1");
        assert_eq!(telemetry["source"], "hub.example");
        assert_eq!(telemetry["data"]["body"]["t"], 1);
        assert_eq!(
            telemetry["data"]["systemProperties"]["iothub-content-type"],
            "application/json"
        );
        let connected = cloud_event(
            "hub.example",
            &outgoing(Some(EventKind::Connected), r#"{"sequenceNumber":"01"}"#),
        );
        assert_eq!(connected["type"], "Microsoft.Devices.DeviceConnected");
        assert_eq!(
            connected["data"]["deviceConnectionStateEventInfo"]["sequenceNumber"],
            "01"
        );
        let grid = event_grid_event("hub.example", &outgoing(Some(EventKind::Created), "{}"));
        assert_eq!(grid["eventType"], "Microsoft.Devices.DeviceCreated");
        assert_eq!(grid["data"]["twin"], json!({}));
    }

    #[test]
    fn a_stored_message_becomes_its_bag_again() {
        let o = outgoing(None, "x");
        let ingest = to_ingest(&o.message, &[("k".into(), "v".into())]).unwrap();
        let again = message::decode(0, 0, &message::encode(&ingest)).unwrap();
        assert_eq!(again.system_properties["message-id"], "m1");
        assert_eq!(again.system_properties["content-type"], "application/json");
        assert_eq!(ingest.auth_method, AuthMethod::Jwt);
        assert_eq!(again.properties["k"], "v");
        assert_eq!(again.properties["hubName"], "hub");
    }
}
