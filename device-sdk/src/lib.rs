//! The Rust device client for the hub (and any broker that speaks Azure IoT Hub's
//! device MQTT contract), built on rumqttc.
//!
//! ```no_run
//! # async fn hello() -> Result<(), device_sdk::Error> {
//! let options = device_sdk::ClientOptions::from_connection_string(
//!     "HostName=localhost;DeviceId=sensor-1;SharedAccessKey=…",
//! )?
//! .with_ca(&std::fs::read_to_string("hub-data/certs/ca.pem").unwrap_or_default());
//! let (client, _events) = device_sdk::DeviceClient::start(options)?;
//! client.send_telemetry(device_sdk::Message::json(&serde_json::json!({"temp": 21.5}))?).await?;
//! # Ok(()) }
//! ```
//!
//! `send_telemetry` returns once the hub acknowledged the message, i.e. once it is
//! durable. [`DeviceEvents`] carries what the hub sends: desired-property updates,
//! direct method calls (answer with [`MethodCall::respond`]) and cloud-to-device
//! messages (acknowledge with [`CloudMessage::complete`]).
//!
//! Modules: [`client`] (the driver: reconnects with jittered [`backoff`], renews
//! [`credentials`], resubscribes and re-reads the twin after a reconnect),
//! [`tracker`] (which PUBACK acknowledges which send, without I/O), and
//! [`connection_string`].

pub mod backoff;
pub mod client;
pub mod connection_string;
pub mod credentials;
pub mod tracker;

pub use client::{
    ClientOptions, CloudMessage, ConnectionState, DesiredUpdate, DeviceClient, DeviceEvents,
    Message, MethodCall, Twin,
};
pub use credentials::Credentials;

/// Failures of the device client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The connection string is malformed.
    #[error("invalid connection string: {0}")]
    ConnectionString(String),
    /// A credential could not be produced.
    #[error("credential: {0}")]
    Credentials(String),
    /// The TLS configuration is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The offline queue is full; the message was not queued.
    #[error("the offline queue is full")]
    OfflineQueueFull,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The hub did not answer in time.
    #[error("no answer from the hub in time")]
    Timeout,
    /// The hub refused a request.
    #[error("the hub refused the request with status {status}: {message}")]
    Rejected {
        /// The status on the response topic.
        status: u16,
        /// The hub's message.
        message: String,
    },
    /// A body was not valid JSON.
    #[error("JSON: {0}")]
    Json(String),
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::Json(err.to_string())
    }
}
