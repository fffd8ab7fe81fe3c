//! The hub's configuration: a serde TOML tree with documented defaults, the
//! precedence flags > `HUB_*` environment > file > defaults, and [`Config::validate`],
//! whose errors name the offending key.
//!
//! Flags and environment variables are resolved by clap in the binary (each flag has
//! its `HUB_*` variable) and arrive here as [`Overrides`]; this module layers them over
//! the file, which is layered over [`Config::default`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded. Every variant names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this tree (the message names the key).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// The TOML parser's message, which names the key and position.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("{key} {message}")]
    Invalid {
        /// Dotted path of the key, e.g. `mqtt.max_packet_size`.
        key: &'static str,
        /// What is wrong with it, e.g. `must be ≥ 1024`.
        message: String,
    },
}

/// The whole configuration tree. Every field has a default; a TOML file may set any
/// subset. Unknown keys are refused, so a typo fails start-up instead of being ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the store, certificates, the owner key and `endpoints.json`.
    /// Default `./hub-data`; created on first start.
    pub data_dir: PathBuf,
    /// The host name devices use to reach the hub: checked in SAS `sr` fields and JWT
    /// `aud` claims, and put in the server certificate. Default `localhost`.
    pub hostname: String,
    /// Device-facing MQTT listeners and limits.
    pub mqtt: MqttConfig,
    /// Service REST API listener and limits.
    pub http: HttpConfig,
    /// Telemetry streams.
    pub telemetry: TelemetryConfig,
    /// Cluster mode: the hub's state on NATS JetStream.
    pub cluster: ClusterConfig,
    /// Cloud-to-device messages and their feedback.
    pub commands: CommandsConfig,
    /// Device twins.
    pub twins: TwinsConfig,
    /// Operator-supplied certificates (unset: the development CA in the data dir).
    pub tls: TlsConfig,
    /// The AMQP 1.0 service endpoint (C2D sends, feedback, Event Hub-compatible reads).
    pub amqp: AmqpConfig,
    /// Routing and device events: delivery settings (the routes themselves are put
    /// through `PUT /configuration/routing`).
    pub routing: RoutingSettingsConfig,
}

/// `[routing]`: how routed messages are delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSettingsConfig {
    /// How long a message an endpoint refuses is retried before it goes to the
    /// `dead-letters` stream, seconds. Default 86400 (24 h); from 1 to 7 days.
    pub retry_for_secs: u64,
    /// The longest pause between two attempts, seconds (the backoff doubles from
    /// 100 ms up to this). Default 60; from 1 to 3600.
    pub max_backoff_secs: u64,
    /// How long a webhook or NATS server may take to answer, seconds. Default 10;
    /// from 1 to 300.
    pub webhook_timeout_secs: u64,
    /// Device events (created, deleted, connected, disconnected, twin changed) that
    /// may wait to be stored; past it an event is dropped and counted
    /// (`hub_routing_events_dropped_total`). Default 65536; from 16 to 1048576.
    pub event_queue: usize,
}

impl Default for RoutingSettingsConfig {
    fn default() -> Self {
        Self {
            retry_for_secs: 24 * 3600,
            max_backoff_secs: 60,
            webhook_timeout_secs: 10,
            event_queue: 65536,
        }
    }
}

/// `[amqp]`: the AMQP 1.0 service endpoint and its bounds (DECISIONS.md, "AMQP 1.0
/// service endpoint" and "Limits and abuse").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// AMQP over TLS (implicit TLS, the server certificate). Default
    /// `127.0.0.1:5671`, the port Azure's SDKs always dial; port 0 picks a free port.
    pub tls_listen: SocketAddr,
    /// Plain AMQP (for `UseDevelopmentEmulator=true` clients). Off unless set.
    pub tcp_listen: Option<SocketAddr>,
    /// The Event Hub-compatible entity name (`EntityPath=`). Default: the first label
    /// of the hostname (`iothub` for `localhost`-like names that are IP addresses).
    pub event_hub_name: Option<String>,
    /// Most open AMQP connections; over it new ones wait in the listen backlog.
    /// Default 1024.
    pub max_connections: usize,
    /// Most sessions per connection (`channel-max` + 1). Default 32.
    pub max_sessions: u16,
    /// Most links per session (`handle-max` + 1). Default 64.
    pub max_links_per_session: u32,
    /// Largest frame, in bytes (`max-frame-size`). Default 65536 (512–1 MiB).
    pub max_frame_size: u32,
    /// Largest message a client may send on a link, in bytes (a C2D message is
    /// further held to the C2D limit and refused per message). Default 1 MiB.
    pub max_message_bytes: u64,
    /// Seconds a client has for TLS and its protocol header. Default 10.
    pub handshake_timeout_secs: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            tls_listen: SocketAddr::from(([127, 0, 0, 1], 5671)),
            tcp_listen: None,
            event_hub_name: None,
            max_connections: 1024,
            max_sessions: 32,
            max_links_per_session: 64,
            max_frame_size: 65_536,
            max_message_bytes: 1024 * 1024,
            handshake_timeout_secs: 10,
        }
    }
}

impl Config {
    /// The Event Hub-compatible entity name: `amqp.event_hub_name`, else the first
    /// label of the hostname (`iothub` when the hostname is an IP address).
    pub fn event_hub_name(&self) -> String {
        if let Some(name) = &self.amqp.event_hub_name {
            return name.clone();
        }
        if self.hostname.parse::<std::net::IpAddr>().is_ok() {
            return "iothub".to_string();
        }
        self.hostname
            .split('.')
            .next()
            .filter(|label| !label.is_empty())
            .unwrap_or("iothub")
            .to_string()
    }
}

/// `[tls]`: the operator's certificates, reloaded on SIGHUP and when the files change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM server certificate chain (leaf first) for the MQTT/TLS and HTTPS
    /// listeners, instead of the development server certificate. Set with `server_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cert: Option<PathBuf>,
    /// PEM private key of `server_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_key: Option<PathBuf>,
    /// PEM bundle of trusted device CA certificates (certificates only: a file with a
    /// private key is refused) for X.509 CA-signed devices. When set it replaces the
    /// development device CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_ca_bundle: Option<PathBuf>,
}

/// The largest `commands.queue_depth`: queued messages are kept in the store, but a
/// device's whole queue is scanned on connect, so it stays bounded.
pub const MAX_C2D_QUEUE_DEPTH: usize = 10_000;
/// The longest `commands.max_ttl_secs` (30 days).
pub const MAX_C2D_TTL_SECS: u64 = 30 * 24 * 3600;
/// The largest `twins.max_properties_bytes` (256 KiB): a twin document with both
/// sections at the limit, their `$metadata` and the tags must still fit in one value
/// of the store (a NATS KV value is at most 1 MiB by default).
pub const MAX_TWIN_PROPERTIES_BYTES: usize = 256 * 1024;
/// The largest `twins.max_tags_bytes` (64 KiB).
pub const MAX_TWIN_TAGS_BYTES: usize = 64 * 1024;
/// The largest record of a telemetry segment (a message plus its metadata); the
/// telemetry capability's segment format takes its limit from here.
pub const MAX_TELEMETRY_RECORD_BYTES: usize = 4 * 1024 * 1024;
/// Bytes a telemetry record may take beyond the message's body and property bag: the
/// length prefix, the JSON framing and key names, the device id (twice) and the
/// properties the hub stamps.
pub const TELEMETRY_RECORD_OVERHEAD: usize = 4096;
/// The largest `mqtt.max_telemetry_bytes` (body + property bag) whose every message
/// fits in one segment record: JSON escaping can at most double the property bag
/// (`%01` → `\u0001`), so body + 2 × bag + overhead must stay within the record limit.
pub const MAX_TELEMETRY_BYTES: usize = (MAX_TELEMETRY_RECORD_BYTES - TELEMETRY_RECORD_OVERHEAD) / 2;

/// `[commands]`: cloud-to-device messages and their feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// How long a received feedback batch stays locked before it is offered again
    /// unless acknowledged, seconds. Default 60 (Azure IoT Hub's lock time).
    pub feedback_lock_secs: u64,
    /// Messages queued per device; a send to a full queue is refused (403004).
    /// Default 50 (Azure IoT Hub's); at most 10000.
    pub queue_depth: usize,
    /// Time to live of a message whose sender gives none, seconds. Default 3600.
    pub default_ttl_secs: u64,
    /// Longest time to live a sender may ask for, seconds. Default 172800 (2 days,
    /// Azure's); at most 30 days.
    pub max_ttl_secs: u64,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            feedback_lock_secs: 60,
            queue_depth: 50,
            default_ttl_secs: 3600,
            max_ttl_secs: 2 * 24 * 3600,
        }
    }
}

/// `[twins]`: device twin limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwinsConfig {
    /// Largest desired and largest reported section (each), bytes of JSON. Default
    /// 32768 (Azure's 32 KiB); from 1024 to 262144.
    pub max_properties_bytes: usize,
    /// Largest tags section, bytes of JSON. Default 8192 (Azure's 8 KiB); from 1024
    /// to 65536.
    pub max_tags_bytes: usize,
}

impl Default for TwinsConfig {
    fn default() -> Self {
        Self {
            max_properties_bytes: 32 * 1024,
            max_tags_bytes: 8 * 1024,
        }
    }
}

/// `[cluster]`: cluster mode. With no `nats` servers the hub keeps its state in its
/// data directory (embedded); with some, every capability's state lives in NATS
/// JetStream streams and KV buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`). Default none (embedded store).
    pub nats: Vec<String>,
    /// Replicas of every stream and bucket. Default 3; 1 for a single NATS server.
    pub replicas: usize,
    /// How long a write keeps retrying through a JetStream leader change before the
    /// device or caller gets an error, seconds. Default 30.
    pub retry_secs: u64,
    /// Telemetry messages per partition that may wait for JetStream's ack before
    /// devices are slowed down. Default 8192.
    pub max_pending_publishes: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats: Vec::new(),
            replicas: 3,
            retry_secs: 30,
            max_pending_publishes: 8192,
        }
    }
}

impl ClusterConfig {
    /// Whether the hub runs in cluster mode.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }
}

/// `[telemetry]`: durable partitioned streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Partitions. Fixed by the first start of a data dir. Default 4.
    pub partitions: u32,
    /// Group-committer threads; partition p is committed by thread p mod
    /// committers (embedded mode). Default 1.
    pub committers: u32,
    /// Messages older than this (seconds) are deleted, a segment at a time.
    /// Default 86400 (24 h).
    pub retention_secs: u64,
    /// Total bytes kept over all partitions; the oldest segments go first.
    /// Default 10 GiB.
    pub retention_bytes: u64,
    /// How often retention runs, seconds. Default 60.
    pub retention_interval_secs: u64,
    /// Size at which a partition starts a new segment file. Default 64 MiB.
    pub segment_bytes: u64,
    /// Most messages in one durable commit (one committer pass over its partitions).
    /// Default 65536: what the connections' pending limits let wait is taken in one
    /// pass, so a QoS 0 stream is bound by `max_batch_bytes` per sync, not by a count.
    pub max_batch_messages: usize,
    /// Most bytes in one durable commit. Default 8 MiB.
    pub max_batch_bytes: usize,
    /// How long a commit waits for more messages after the first, microseconds
    /// (0: commit what is queued; batches still form during the previous sync).
    /// Default 0.
    pub max_batch_wait_micros: u64,
    /// Bytes per partition that may wait for a commit before devices are slowed
    /// down. Default 64 MiB.
    pub queue_bytes: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            partitions: 4,
            committers: 1,
            retention_secs: 24 * 3600,
            retention_bytes: 10 * 1024 * 1024 * 1024,
            retention_interval_secs: 60,
            segment_bytes: 64 * 1024 * 1024,
            max_batch_messages: 65536,
            max_batch_bytes: 8 * 1024 * 1024,
            max_batch_wait_micros: 0,
            queue_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[mqtt]`: the device-facing MQTT endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// MQTT over TCP. Default `127.0.0.1:1883`; port 0 picks a free port.
    pub tcp_listen: SocketAddr,
    /// MQTT over TLS. Default `127.0.0.1:8883` (the port Azure's device SDKs dial).
    pub tls_listen: SocketAddr,
    /// Largest MQTT packet accepted, in bytes: the telemetry limit (256 KiB) plus
    /// headroom for topic and properties. Default 270336 (264 KiB); at least 1024.
    pub max_packet_size: usize,
    /// Most device connections served at once. Default 100000.
    pub max_connections: usize,
    /// Largest telemetry message (body + properties), bytes. Larger closes the
    /// connection. Default 262144 (256 KiB).
    pub max_telemetry_bytes: usize,
    /// Seconds from accept to CONNECT (including the TLS handshake). Default 10.
    pub connect_timeout_secs: u64,
    /// Longest device JWT lifetime (`exp - iat`) accepted, seconds. Default 86400.
    pub jwt_max_lifetime_secs: u64,
    /// Clock skew allowed on device JWT `exp`/`iat`, seconds. Default 60.
    pub jwt_clock_skew_secs: u64,
    /// Furthest a device SAS token's expiry (`se`) may lie in the future, seconds; a
    /// token beyond it is refused with CONNACK 5. Azure's SDKs sign 1 h tokens and the
    /// hub's device-sdk renews at 80 % of its (1 h default) lifetime, so the default is
    /// generous: 31536000 (365 days). At most 3153600000 (100 years).
    pub sas_max_lifetime_secs: u64,
}

/// `[http]`: the service REST API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8080`; port 0 picks a free port.
    pub listen: SocketAddr,
    /// HTTPS listen address: the same service API over TLS with the server
    /// certificate, plus MQTT over WebSocket at `/$iothub/websocket` (Azure serves
    /// both on 443). Off unless set (so `hub print-config` shows it only when set);
    /// port 0 picks a free port.
    pub https_listen: Option<SocketAddr>,
    /// Largest request body accepted, in bytes (larger gets 413). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most short requests (everything but the long ones below and the health
    /// probes) handled at once; further ones wait. Default 1024.
    pub max_concurrent_requests: usize,
    /// Most long requests (direct-method calls, telemetry long-polls and WebSocket
    /// streams, feedback long-polls) at once; one more gets 429 (429001) at once, so
    /// they can never take the slots of short requests or of `/healthz`/`/readyz`,
    /// which have no limit. Default 512; less than `max_connections`.
    pub max_long_requests: usize,
    /// Most open HTTP connections (WebSockets included). Over it the hub stops
    /// accepting: a new connection waits in the listen backlog until one closes.
    /// Default 2048.
    pub max_connections: usize,
    /// Seconds a client has to send a whole request header, and that an idle
    /// keep-alive connection stays open; then it is closed. Default 30 (1–300).
    pub header_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./hub-data"),
            hostname: "localhost".to_string(),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            telemetry: TelemetryConfig::default(),
            cluster: ClusterConfig::default(),
            commands: CommandsConfig::default(),
            twins: TwinsConfig::default(),
            tls: TlsConfig::default(),
            amqp: AmqpConfig::default(),
            routing: RoutingSettingsConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            tcp_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tls_listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            max_packet_size: 264 * 1024,
            max_connections: 100_000,
            max_telemetry_bytes: 256 * 1024,
            connect_timeout_secs: 10,
            jwt_max_lifetime_secs: 24 * 3600,
            jwt_clock_skew_secs: 60,
            sas_max_lifetime_secs: DEFAULT_SAS_MAX_LIFETIME_SECS,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            https_listen: None,
            max_body_bytes: 1024 * 1024,
            max_concurrent_requests: 1024,
            max_long_requests: 512,
            max_connections: 2048,
            header_timeout_secs: 30,
        }
    }
}

/// Values given as flags or `HUB_*` environment variables; each one set replaces the
/// file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir` / `HUB_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--hostname` / `HUB_HOSTNAME`.
    pub hostname: Option<String>,
    /// `--mqtt` / `HUB_MQTT`.
    pub mqtt: Option<SocketAddr>,
    /// `--mqtts` / `HUB_MQTTS`.
    pub mqtts: Option<SocketAddr>,
    /// `--http` / `HUB_HTTP`.
    pub http: Option<SocketAddr>,
    /// `--https` / `HUB_HTTPS`.
    pub https: Option<SocketAddr>,
    /// `--cluster` / `HUB_CLUSTER`: comma-separated NATS URLs.
    pub cluster: Option<Vec<String>>,
    /// `--amqps` / `HUB_AMQPS`.
    pub amqps: Option<SocketAddr>,
    /// `--amqp` / `HUB_AMQP`.
    pub amqp: Option<SocketAddr>,
}

/// Default `mqtt.sas_max_lifetime_secs`: 365 days.
pub const DEFAULT_SAS_MAX_LIFETIME_SECS: u64 = 365 * 24 * 3600;
/// Largest `mqtt.sas_max_lifetime_secs`: 100 years, far below where a connection's
/// expiry deadline could overflow.
const MAX_SAS_MAX_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

/// The largest packet MQTT 3.1.1 can express (remaining length of four bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;

impl Config {
    /// Loads the configuration: defaults, then `file` if given, then `overrides`;
    /// validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file over the defaults (without validating).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text over the defaults (without validating).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())
    }

    /// Replaces file values with the ones given on the command line or environment.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(dir) = &overrides.data_dir {
            self.data_dir.clone_from(dir);
        }
        if let Some(hostname) = &overrides.hostname {
            self.hostname.clone_from(hostname);
        }
        if let Some(addr) = overrides.mqtt {
            self.mqtt.tcp_listen = addr;
        }
        if let Some(addr) = overrides.mqtts {
            self.mqtt.tls_listen = addr;
        }
        if let Some(addr) = overrides.http {
            self.http.listen = addr;
        }
        if let Some(addr) = overrides.https {
            self.http.https_listen = Some(addr);
        }
        if let Some(urls) = &overrides.cluster {
            self.cluster.nats.clone_from(urls);
        }
        if let Some(addr) = overrides.amqps {
            self.amqp.tls_listen = addr;
        }
        if let Some(addr) = overrides.amqp {
            self.amqp.tcp_listen = Some(addr);
        }
    }

    /// Checks every value against its allowed range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        let routing = &self.routing;
        if !(1..=7 * 24 * 3600).contains(&routing.retry_for_secs) {
            return invalid(
                "routing.retry_for_secs",
                "must be from 1 to 604800 (7 days)",
            );
        }
        if !(1..=3600).contains(&routing.max_backoff_secs) {
            return invalid("routing.max_backoff_secs", "must be from 1 to 3600");
        }
        if !(1..=300).contains(&routing.webhook_timeout_secs) {
            return invalid("routing.webhook_timeout_secs", "must be from 1 to 300");
        }
        if !(16..=1_048_576).contains(&routing.event_queue) {
            return invalid("routing.event_queue", "must be from 16 to 1048576");
        }
        match (&self.tls.server_cert, &self.tls.server_key) {
            (Some(_), None) => {
                return invalid("tls.server_key", "must be set with tls.server_cert");
            }
            (None, Some(_)) => {
                return invalid("tls.server_cert", "must be set with tls.server_key");
            }
            _ => {}
        }
        let empty =
            |path: &Option<PathBuf>| path.as_ref().is_some_and(|p| p.as_os_str().is_empty());
        if empty(&self.tls.server_cert) {
            return invalid("tls.server_cert", "must not be empty");
        }
        if empty(&self.tls.server_key) {
            return invalid("tls.server_key", "must not be empty");
        }
        if empty(&self.tls.device_ca_bundle) {
            return invalid("tls.device_ca_bundle", "must not be empty");
        }
        if !is_valid_hostname(&self.hostname) {
            return invalid(
                "hostname",
                "must be a DNS name or IP address (letters, digits, '-', '.', ':')",
            );
        }
        if self.mqtt.max_packet_size < 1024 {
            return invalid("mqtt.max_packet_size", "must be ≥ 1024");
        }
        if self.mqtt.max_packet_size > MQTT_MAX_PACKET {
            return invalid(
                "mqtt.max_packet_size",
                "must be ≤ 268435455 (the MQTT maximum)",
            );
        }
        if self.mqtt.max_connections == 0 {
            return invalid("mqtt.max_connections", "must be ≥ 1");
        }
        if self.mqtt.max_telemetry_bytes == 0
            || self.mqtt.max_telemetry_bytes > self.mqtt.max_packet_size
        {
            return invalid(
                "mqtt.max_telemetry_bytes",
                "must be ≥ 1 and ≤ mqtt.max_packet_size",
            );
        }
        if self.mqtt.max_telemetry_bytes > MAX_TELEMETRY_BYTES {
            return invalid(
                "mqtt.max_telemetry_bytes",
                &format!(
                    "must be ≤ {MAX_TELEMETRY_BYTES} (a telemetry segment record holds at most \
                     {MAX_TELEMETRY_RECORD_BYTES} bytes, properties and metadata included)"
                ),
            );
        }
        if self.mqtt.connect_timeout_secs == 0 {
            return invalid("mqtt.connect_timeout_secs", "must be ≥ 1");
        }
        if self.mqtt.jwt_max_lifetime_secs == 0 {
            return invalid("mqtt.jwt_max_lifetime_secs", "must be ≥ 1");
        }
        if !(1..=MAX_SAS_MAX_LIFETIME_SECS).contains(&self.mqtt.sas_max_lifetime_secs) {
            return invalid(
                "mqtt.sas_max_lifetime_secs",
                "must be from 1 to 3153600000 (100 years)",
            );
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be ≥ 1024");
        }
        if self.http.max_concurrent_requests == 0 {
            return invalid("http.max_concurrent_requests", "must be ≥ 1");
        }
        if self.http.max_connections == 0 {
            return invalid("http.max_connections", "must be ≥ 1");
        }
        if self.http.max_long_requests == 0
            || self.http.max_long_requests >= self.http.max_connections
        {
            return invalid(
                "http.max_long_requests",
                "must be ≥ 1 and < http.max_connections (long requests must leave connections for short ones)",
            );
        }
        if !(1..=300).contains(&self.http.header_timeout_secs) {
            return invalid("http.header_timeout_secs", "must be from 1 to 300");
        }
        let t = &self.telemetry;
        if !(1..=1024).contains(&t.partitions) {
            return invalid("telemetry.partitions", "must be from 1 to 1024");
        }
        if !(1..=t.partitions).contains(&t.committers) {
            return invalid(
                "telemetry.committers",
                "must be from 1 to telemetry.partitions",
            );
        }
        if t.retention_secs == 0 {
            return invalid("telemetry.retention_secs", "must be ≥ 1");
        }
        if t.retention_interval_secs == 0 {
            return invalid("telemetry.retention_interval_secs", "must be ≥ 1");
        }
        if t.segment_bytes < 4096 {
            return invalid("telemetry.segment_bytes", "must be ≥ 4096");
        }
        if t.max_batch_messages == 0 {
            return invalid("telemetry.max_batch_messages", "must be ≥ 1");
        }
        if t.max_batch_bytes < self.mqtt.max_telemetry_bytes {
            return invalid(
                "telemetry.max_batch_bytes",
                "must be ≥ mqtt.max_telemetry_bytes",
            );
        }
        if t.queue_bytes < self.mqtt.max_telemetry_bytes {
            return invalid(
                "telemetry.queue_bytes",
                "must be ≥ mqtt.max_telemetry_bytes",
            );
        }
        let c = &self.cluster;
        for url in &c.nats {
            let rest = url.strip_prefix("nats://").unwrap_or("");
            if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
                return Err(ConfigError::Invalid {
                    key: "cluster.nats",
                    message: format!("{url:?} is not of the form nats://host:port"),
                });
            }
        }
        if !(1..=5).contains(&c.replicas) {
            return invalid(
                "cluster.replicas",
                "must be from 1 to 5 (JetStream's limit)",
            );
        }
        if c.retry_secs == 0 {
            return invalid("cluster.retry_secs", "must be ≥ 1");
        }
        if self.commands.feedback_lock_secs == 0 {
            return invalid("commands.feedback_lock_secs", "must be ≥ 1");
        }
        if !(1..=MAX_C2D_QUEUE_DEPTH).contains(&self.commands.queue_depth) {
            return invalid("commands.queue_depth", "must be from 1 to 10000");
        }
        if !(1..=MAX_C2D_TTL_SECS).contains(&self.commands.max_ttl_secs) {
            return invalid(
                "commands.max_ttl_secs",
                "must be from 1 to 2592000 (30 days)",
            );
        }
        if !(1..=self.commands.max_ttl_secs).contains(&self.commands.default_ttl_secs) {
            return invalid(
                "commands.default_ttl_secs",
                "must be ≥ 1 and ≤ commands.max_ttl_secs",
            );
        }
        if !(1024..=MAX_TWIN_PROPERTIES_BYTES).contains(&self.twins.max_properties_bytes) {
            return invalid(
                "twins.max_properties_bytes",
                "must be from 1024 to 262144 (256 KiB)",
            );
        }
        if !(1024..=MAX_TWIN_TAGS_BYTES).contains(&self.twins.max_tags_bytes) {
            return invalid(
                "twins.max_tags_bytes",
                "must be from 1024 to 65536 (64 KiB)",
            );
        }
        if c.max_pending_publishes == 0 {
            return invalid("cluster.max_pending_publishes", "must be ≥ 1");
        }
        let a = &self.amqp;
        if let Some(name) = &a.event_hub_name
            && (name.is_empty()
                || name.len() > 256
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return invalid(
                "amqp.event_hub_name",
                "must be 1–256 letters, digits, '-', '_' or '.'",
            );
        }
        if a.max_connections == 0 {
            return invalid("amqp.max_connections", "must be ≥ 1");
        }
        if a.max_sessions == 0 {
            return invalid("amqp.max_sessions", "must be ≥ 1");
        }
        if !(1..=65_536).contains(&a.max_links_per_session) {
            return invalid("amqp.max_links_per_session", "must be from 1 to 65536");
        }
        if !(512..=1024 * 1024).contains(&a.max_frame_size) {
            return invalid("amqp.max_frame_size", "must be from 512 to 1048576");
        }
        if !(1024..=256 * 1024 * 1024).contains(&a.max_message_bytes) {
            return invalid(
                "amqp.max_message_bytes",
                "must be from 1024 to 268435456 (256 MiB)",
            );
        }
        if !(1..=300).contains(&a.handshake_timeout_secs) {
            return invalid("amqp.handshake_timeout_secs", "must be from 1 to 300");
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `hub print-config`.
    pub fn to_toml(&self) -> String {
        // A tree of plain strings, paths and integers always serializes.
        toml::to_string_pretty(self).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }
}

fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.data_dir, PathBuf::from("./hub-data"));
        assert_eq!(config.hostname, "localhost");
        assert_eq!(config.mqtt.tcp_listen.to_string(), "127.0.0.1:1883");
        assert_eq!(config.mqtt.tls_listen.to_string(), "127.0.0.1:8883");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.mqtt.sas_max_lifetime_secs, 365 * 24 * 3600);
        config.validate().unwrap();
    }

    #[test]
    fn the_sas_lifetime_cap_is_bounded() {
        let mut config = Config::default();
        config.mqtt.sas_max_lifetime_secs = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("mqtt.sas_max_lifetime_secs ")
        );
        config.mqtt.sas_max_lifetime_secs = u64::MAX;
        assert!(config.validate().is_err());
        let parsed = Config::from_toml("[mqtt]\nsas_max_lifetime_secs = 3600\n").unwrap();
        assert_eq!(parsed.mqtt.sas_max_lifetime_secs, 3600);
    }

    #[test]
    fn a_file_sets_a_subset_and_keeps_the_other_defaults() {
        let config =
            Config::from_toml("hostname = 'hub.lan'\n[mqtt]\nmax_packet_size = 4096\n").unwrap();
        assert_eq!(config.hostname, "hub.lan");
        assert_eq!(config.mqtt.max_packet_size, 4096);
        assert_eq!(config.http, HttpConfig::default());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut config = Config::from_toml("[http]\nlisten = '127.0.0.1:9000'\n").unwrap();
        config.apply(&Overrides {
            http: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:0");
        assert_eq!(config.http.https_listen, None, "HTTPS is off by default");
        let mut config = Config::from_toml("[http]\nhttps_listen = '127.0.0.1:9443'\n").unwrap();
        assert_eq!(
            config.http.https_listen,
            Some("127.0.0.1:9443".parse().unwrap())
        );
        config.apply(&Overrides {
            https: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(
            config.http.https_listen,
            Some("127.0.0.1:0".parse().unwrap())
        );
    }

    #[test]
    fn amqp_defaults_overrides_and_validation() {
        let config = Config::default();
        assert_eq!(config.amqp.tls_listen.to_string(), "127.0.0.1:5671");
        assert_eq!(config.amqp.tcp_listen, None, "plain AMQP is off by default");
        assert_eq!(config.event_hub_name(), "localhost");
        let mut config = Config {
            hostname: "myhub.example.com".into(),
            ..Config::default()
        };
        assert_eq!(config.event_hub_name(), "myhub");
        config.hostname = "127.0.0.5".into();
        assert_eq!(config.event_hub_name(), "iothub");
        config.amqp.event_hub_name = Some("telemetry".into());
        assert_eq!(config.event_hub_name(), "telemetry");
        config.apply(&Overrides {
            amqps: Some("127.0.0.1:0".parse().unwrap()),
            amqp: Some("127.0.0.1:0".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(config.amqp.tls_listen.to_string(), "127.0.0.1:0");
        assert_eq!(config.amqp.tcp_listen, Some("127.0.0.1:0".parse().unwrap()));
        config.validate().unwrap();
        for (toml, key) in [
            ("[amqp]\nmax_sessions = 0\n", "amqp.max_sessions"),
            (
                "[amqp]\nmax_links_per_session = 0\n",
                "amqp.max_links_per_session",
            ),
            ("[amqp]\nmax_frame_size = 100\n", "amqp.max_frame_size"),
            ("[amqp]\nmax_message_bytes = 10\n", "amqp.max_message_bytes"),
            ("[amqp]\nmax_connections = 0\n", "amqp.max_connections"),
            (
                "[amqp]\nhandshake_timeout_secs = 0\n",
                "amqp.handshake_timeout_secs",
            ),
            ("[amqp]\nevent_hub_name = 'a/b'\n", "amqp.event_hub_name"),
        ] {
            let err = Config::from_toml(toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn validation_errors_name_the_key() {
        let mut config = Config::default();
        config.mqtt.max_packet_size = 10;
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(err, "mqtt.max_packet_size must be ≥ 1024");

        let config = Config {
            hostname: "bad host".into(),
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("hostname ")
        );
    }

    #[test]
    fn committers_are_at_least_one_and_at_most_the_partitions() {
        let mut config = Config::default();
        config.telemetry.committers = 5;
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "telemetry.committers must be from 1 to telemetry.partitions"
        );
        config.telemetry.committers = 0;
        assert!(config.validate().is_err());
        config.telemetry.committers = 4;
        config.validate().unwrap();
    }

    #[test]
    fn telemetry_larger_than_a_segment_record_is_refused_at_start_up() {
        let mut config = Config::default();
        config.mqtt.max_packet_size = MQTT_MAX_PACKET;
        config.mqtt.max_telemetry_bytes = 8 * 1024 * 1024;
        config.telemetry.max_batch_bytes = 16 * 1024 * 1024;
        config.telemetry.queue_bytes = 64 * 1024 * 1024;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("mqtt.max_telemetry_bytes must be ≤ "),
            "{err}"
        );
        config.mqtt.max_telemetry_bytes = MAX_TELEMETRY_BYTES;
        config.validate().unwrap();
    }

    #[test]
    fn http_limits_are_validated_by_key() {
        let check = |edit: fn(&mut HttpConfig)| {
            let mut config = Config::default();
            edit(&mut config.http);
            config.validate().unwrap_err().to_string()
        };
        assert!(check(|h| h.max_connections = 0).starts_with("http.max_connections "));
        assert!(check(|h| h.max_long_requests = 0).starts_with("http.max_long_requests "));
        assert!(
            check(|h| h.max_long_requests = h.max_connections)
                .starts_with("http.max_long_requests ")
        );
        assert!(check(|h| h.header_timeout_secs = 0).starts_with("http.header_timeout_secs "));
        assert!(check(|h| h.header_timeout_secs = 301).starts_with("http.header_timeout_secs "));
        let http = Config::default().http;
        assert_eq!(http.header_timeout_secs, 30, "≤ 30 s by default");
        assert!(http.max_long_requests < http.max_connections);
    }

    #[test]
    fn parse_errors_name_the_key_and_unknown_keys_are_refused() {
        let err = Config::from_toml("[mqtt]\nmax_packet_size = 'big'\n").unwrap_err();
        assert!(err.contains("max_packet_size"), "{err}");
        let err = Config::from_toml("[http]\nlistn = '127.0.0.1:1'\n").unwrap_err();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn c2d_and_twin_limits_are_configurable_and_validated_by_key() {
        let config = Config::from_toml(
            "[commands]\nqueue_depth = 500\ndefault_ttl_secs = 60\nmax_ttl_secs = 86400\n\
             [twins]\nmax_properties_bytes = 65536\nmax_tags_bytes = 16384\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.commands.queue_depth, 500);
        assert_eq!(config.twins.max_properties_bytes, 65536);
        let printed = config.to_toml();
        assert!(printed.contains("queue_depth = 500"), "{printed}");
        assert!(printed.contains("max_tags_bytes = 16384"), "{printed}");

        let defaults = Config::default();
        assert_eq!(defaults.commands.queue_depth, 50);
        assert_eq!(defaults.commands.default_ttl_secs, 3600);
        assert_eq!(defaults.commands.max_ttl_secs, 172_800);
        assert_eq!(defaults.twins.max_properties_bytes, 32 * 1024);
        assert_eq!(defaults.twins.max_tags_bytes, 8 * 1024);

        let check = |edit: fn(&mut Config)| {
            let mut config = Config::default();
            edit(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert!(check(|c| c.commands.queue_depth = 0).starts_with("commands.queue_depth "));
        assert!(check(|c| c.commands.queue_depth = 10_001).starts_with("commands.queue_depth "));
        assert!(check(|c| c.commands.max_ttl_secs = 0).starts_with("commands.max_ttl_secs "));
        assert!(
            check(|c| c.commands.max_ttl_secs = MAX_C2D_TTL_SECS + 1)
                .starts_with("commands.max_ttl_secs ")
        );
        assert!(
            check(|c| c.commands.default_ttl_secs = c.commands.max_ttl_secs + 1)
                .starts_with("commands.default_ttl_secs ")
        );
        assert!(
            check(|c| c.commands.default_ttl_secs = 0).starts_with("commands.default_ttl_secs ")
        );
        assert!(
            check(|c| c.twins.max_properties_bytes = 1023)
                .starts_with("twins.max_properties_bytes ")
        );
        assert!(
            check(|c| c.twins.max_properties_bytes = MAX_TWIN_PROPERTIES_BYTES + 1)
                .starts_with("twins.max_properties_bytes ")
        );
        assert!(check(|c| c.twins.max_tags_bytes = 0).starts_with("twins.max_tags_bytes "));
        assert!(
            check(|c| c.twins.max_tags_bytes = MAX_TWIN_TAGS_BYTES + 1)
                .starts_with("twins.max_tags_bytes ")
        );
        assert_eq!(defaults.routing.retry_for_secs, 86_400);
        assert!(check(|c| c.routing.retry_for_secs = 0).starts_with("routing.retry_for_secs "));
        assert!(check(|c| c.routing.max_backoff_secs = 0).starts_with("routing.max_backoff_secs "));
        assert!(
            check(|c| c.routing.webhook_timeout_secs = 301)
                .starts_with("routing.webhook_timeout_secs ")
        );
        assert!(check(|c| c.routing.event_queue = 1).starts_with("routing.event_queue "));
    }

    #[test]
    fn print_config_output_parses_back_to_the_same_tree() {
        let config = Config::default();
        assert_eq!(Config::from_toml(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn operator_certificates_are_configured_in_pairs_and_printed() {
        let config = Config::from_toml(
            "[tls]\nserver_cert = '/etc/hub/server.pem'\nserver_key = '/etc/hub/server.key'\n\
             device_ca_bundle = '/etc/hub/device-cas.pem'\n",
        )
        .unwrap();
        config.validate().unwrap();
        let printed = config.to_toml();
        assert!(printed.contains("device_ca_bundle = \"/etc/hub/device-cas.pem\""));
        assert_eq!(Config::from_toml(&printed).unwrap(), config);
        let mut half = config.clone();
        half.tls.server_key = None;
        assert!(
            half.validate()
                .unwrap_err()
                .to_string()
                .starts_with("tls.server_key ")
        );
        let mut half = config.clone();
        half.tls.server_cert = None;
        assert!(
            half.validate()
                .unwrap_err()
                .to_string()
                .starts_with("tls.server_cert ")
        );
        let mut empty = config;
        empty.tls.device_ca_bundle = Some(PathBuf::new());
        assert!(
            empty
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("tls.device_ca_bundle ")
        );
        assert!(
            !Config::default().to_toml().contains("server_cert"),
            "unset stays unset"
        );
    }
}
