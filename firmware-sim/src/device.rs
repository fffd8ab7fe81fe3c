//! Who a simulated device is on the wire and how its connection fails: its
//! [`Identity`] (client id, CONNECT login, telemetry topic, source address) and
//! [`DeviceError`], shared by every device path (lean, device-sdk) and by the
//! scenarios' connections ([`crate::wire`]).

use std::time::Duration;

use rumqttc::mqttbytes::v4::ConnectReturnCode;

/// How long a CONNACK may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How one device connects.
#[derive(Debug, Clone)]
pub struct Identity {
    /// MQTT client id (= device id).
    pub client_id: String,
    /// CONNECT username and password, if any.
    pub login: Option<(String, String)>,
    /// Telemetry topic.
    pub topic: String,
    /// The local address to connect from (`--source-addrs`); `None`: the kernel's
    /// choice.
    pub bind: Option<std::net::IpAddr>,
}

impl Identity {
    /// A hub device: Azure's CONNECT username for `hostname`, `password` a SAS token
    /// or device JWT, telemetry on the device's events topic.
    pub fn hub_device(hostname: &str, id: String, password: String) -> Self {
        Self {
            login: Some((
                format!("{hostname}/{id}/?api-version=2021-04-12&DeviceClientType=firmware-sim"),
                password,
            )),
            topic: format!("devices/{id}/messages/events/"),
            client_id: id,
            bind: None,
        }
    }
}

/// Failures of one device's connection.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// TCP failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The TLS client could not be set up (the handshake's failures are `Io`).
    #[error("{0}: TLS: {1}")]
    Tls(String, String),
    /// The broker refused the CONNECT.
    #[error("{0}: CONNECT refused: {1:?}")]
    Refused(String, ConnectReturnCode),
    /// The broker sent something that is not MQTT, or not what was expected.
    #[error("{0}: protocol: {1}")]
    Protocol(String, String),
    /// The device-sdk client failed.
    #[error("{0}: {1}")]
    Sdk(String, String),
    /// No CONNACK in time.
    #[error("{0}: no CONNACK within {CONNECT_TIMEOUT:?}")]
    Timeout(String),
}
