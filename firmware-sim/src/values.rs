//! The value types of the flags and their parsers, below every layer so each may use
//! them: rates, durations, how devices authenticate, what a run measures, how a storm
//! loses its connections, and MQTT targets resolved to addresses.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How fast each device sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second per device.
    PerSec(f64),
    /// As fast as PUBACKs (QoS 1) or the socket (QoS 0) allow.
    Max,
}

/// How devices authenticate.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// SAS tokens signed with the device's primary key.
    Sas,
    /// Device JWTs (HS256) signed with the device's primary key.
    Jwt,
    /// TLS client certificates signed by the hub's development CA (DATA_DIR/certs),
    /// CN = device id; devices are provisioned as `certificateAuthority`. Implies
    /// `--tls`.
    X509,
}

/// How a hub fleet gets its device identities.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provision {
    /// Devices are created (or found) through the service API, `PUT /devices/{id}`.
    #[default]
    Api,
    /// Each device registers through the Device Provisioning Service contract over
    /// MQTT with its key derived from enrollment group `--group`'s key, then connects
    /// to the hub it was assigned as the device id it was given.
    Dps,
}

/// What a run measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Devices send telemetry (the default).
    Telemetry,
    /// Connect N devices and hold them for --hold; hub RSS before, held and at the end.
    Connections,
    /// --total handshakes (CONNECT→CONNACK→DISCONNECT), --connect-inflight at once.
    ConnectRate,
    /// Direct-method round trips through the service API, --inflight per device.
    Methods,
    /// Twin reported-patch round trips over MQTT, --inflight per device.
    Twin,
    /// Connect N, drop every connection at once, time until all are back.
    Storm,
}

/// How the storm loses its connections.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StormMode {
    /// The simulator drops every connection at the same instant.
    #[default]
    Drop,
    /// The hub drops them (a script restarts it); devices retry until it is back.
    Restart,
}

/// `max` or a positive number of messages per second.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    if text.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let rate = parse_positive_f64(text.trim_end_matches("/s"))
        .map_err(|_| format!("{text:?} is neither `max` nor a positive rate per second"))?;
    Ok(Rate::PerSec(rate))
}

/// A duration: `250ms`, `30s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    if !value.is_finite() || value < 0.0 || value * scale > 1e9 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// `mqtt://host:port` (the host must resolve to an address).
pub fn parse_target(text: &str) -> Result<SocketAddr, String> {
    let rest = text
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("{text:?} is not mqtt://HOST:PORT"))?;
    resolve(rest.trim_end_matches('/'))
}

/// Resolves `host:port` to its first address.
pub fn resolve(host_port: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .map_err(|err| format!("{host_port:?}: {err}"))?
        .next()
        .ok_or_else(|| format!("{host_port:?} resolves to no address"))
}

pub(crate) fn parse_positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

pub(crate) fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_durations_and_targets_parse() {
        assert_eq!(parse_rate("max").unwrap(), Rate::Max);
        assert_eq!(parse_rate("2.5").unwrap(), Rate::PerSec(2.5));
        assert_eq!(parse_rate("10/s").unwrap(), Rate::PerSec(10.0));
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err() && parse_duration("soon").is_err());
        assert_eq!(
            parse_target("mqtt://127.0.0.1:1883").unwrap(),
            "127.0.0.1:1883".parse().unwrap()
        );
        assert!(parse_target("http://127.0.0.1:1883").is_err());
    }
}
