//! Telemetry messages as stored and as served: the mapping from the device's
//! property bag to Azure's system property names, the record payload encoding, and
//! the JSON shape of the read API.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::ingest::TelemetryMessage;
use crate::auth::device::AuthMethod;

/// Device property-bag keys and the system property names they are stored under
/// (Azure's names, as its routing and Event Hubs consumers see them).
pub const SYSTEM_PROPERTIES: [(&str, &str); 8] = [
    ("$.mid", "message-id"),
    ("$.cid", "correlation-id"),
    ("$.uid", "user-id"),
    ("$.ct", "content-type"),
    ("$.ce", "content-encoding"),
    ("$.exp", "expiry-time-utc"),
    ("$.ctime", "iothub-creation-time-utc"),
    // The Plug and Play component the message belongs to.
    ("$.sub", "dt-subject"),
];

/// Azure system properties kept under their own bag names: the module output name,
/// the interface id and the distributed-tracing diagnostics (`$.diagid`,
/// `$.diagctx`, …). Other `$.` keys stay reserved for the hub and are dropped.
pub fn kept_under_own_name(key: &str) -> bool {
    matches!(key, "$.on" | "$.ifid") || key.starts_with("$.diag")
}

/// The system property the model id from the CONNECT username is stamped as.
pub const DATA_SCHEMA: &str = "dt-dataschema";
/// The system properties the hub stamps on every message.
const DEVICE_ID: &str = "iothub-connection-device-id";
const AUTH_METHOD: &str = "iothub-connection-auth-method";
const ENQUEUED_TIME: &str = "iothub-enqueuedtime";

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What is stored with each message besides its body, as read back. Records written
/// before the hub stored the auth method as a tag (`m`) carry every stamped system
/// property in `s`; newer ones leave out what the record already says (the device id,
/// the receipt time) and what the tag names, and [`decode`] adds them back.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Meta {
    #[serde(rename = "d")]
    device_id: String,
    #[serde(rename = "m", default)]
    auth_method: Option<String>,
    #[serde(rename = "s")]
    system_properties: BTreeMap<String, String>,
    #[serde(rename = "p")]
    properties: BTreeMap<String, String>,
}

/// Where a property-bag key goes in the stored record.
enum Destination {
    /// A system property, under this name.
    System(&'static str),
    /// A system property under its own bag name.
    SystemAsIs,
    /// An application property.
    Application,
    /// A reserved `$.` key the hub does not keep.
    Dropped,
}

fn destination(key: &str) -> Destination {
    match SYSTEM_PROPERTIES
        .iter()
        .find(|(bag_key, _)| *bag_key == key)
    {
        Some((_, name)) => Destination::System(name),
        None if kept_under_own_name(key) => Destination::SystemAsIs,
        // Unknown `$.` keys are reserved for the hub; they are not application
        // properties.
        None if key.starts_with("$.") => Destination::Dropped,
        None => Destination::Application,
    }
}

/// The stored metadata of a message, serialized straight from the gateway's message:
/// no intermediate maps, no copies of its strings (the ingest hot path). A key the bag
/// holds twice is written twice; reading keeps the last, as a map built here would.
struct MetaOut<'a>(&'a TelemetryMessage);

/// The system or the application properties of a message's bag.
struct BagOut<'a> {
    message: &'a TelemetryMessage,
    system: bool,
}

impl Serialize for MetaOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let message = self.0;
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("d", message.device_id.as_str())?;
        map.serialize_entry("m", message.auth_method.tag())?;
        map.serialize_entry(
            "s",
            &BagOut {
                message,
                system: true,
            },
        )?;
        map.serialize_entry(
            "p",
            &BagOut {
                message,
                system: false,
            },
        )?;
        map.end()
    }
}

impl Serialize for BagOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in &self.message.properties.0 {
            match (destination(key), self.system) {
                (Destination::System(name), true) => map.serialize_entry(name, value)?,
                (Destination::SystemAsIs, true) | (Destination::Application, false) => {
                    map.serialize_entry(key, value)?
                }
                _ => {}
            }
        }
        // Stamped by the hub from the authenticated connection: no bag key maps to
        // it, so a device cannot claim another model per message.
        if self.system
            && let Some(model_id) = &self.message.model_id
        {
            map.serialize_entry(DATA_SCHEMA, model_id)?;
        }
        map.end()
    }
}

/// A message read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in its partition.
    pub offset: u64,
    /// When the hub received it.
    pub enqueued_time: OffsetDateTime,
    /// The sending device.
    pub device_id: String,
    /// System properties under Azure's names (absent ones omitted).
    pub system_properties: BTreeMap<String, String>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// The body.
    pub body: Bytes,
}

/// Why a stored record does not decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable telemetry record at offset {offset}: {reason}")]
pub struct DecodeError {
    offset: u64,
    reason: String,
}

/// Bytes a record payload may take beyond the message's body and property bag (the
/// configuration's ceiling on `mqtt.max_telemetry_bytes` leaves this much).
pub use crate::config::TELEMETRY_RECORD_OVERHEAD as ENCODING_OVERHEAD;

/// The largest `mqtt.max_telemetry_bytes`, as the configuration bounds it.
pub use crate::config::MAX_TELEMETRY_BYTES;

/// Encodes a gateway message into a record payload: `meta length | meta JSON | body`,
/// in one buffer sized up front.
pub fn encode(message: &TelemetryMessage) -> Bytes {
    use bytes::BufMut;
    // JSON escaping can at most double the bag; the rest is framing and short names.
    let estimate = 4
        + 160
        + message.device_id.as_str().len()
        + 2 * message.properties.byte_len()
        + message.model_id.as_ref().map_or(0, |m| 2 * m.len())
        + message.body.len();
    let mut out = BytesMut::with_capacity(estimate);
    out.put_u32_le(0);
    let mut writer = out.writer();
    // Serializing strings into memory cannot fail.
    let _ = serde_json::to_writer(&mut writer, &MetaOut(message));
    let mut out = writer.into_inner();
    let meta_len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&message.body);
    out.freeze()
}

/// Decodes a record payload stored at `offset` with enqueued time `time` (Unix ns).
pub fn decode(offset: u64, time: i64, payload: &Bytes) -> Result<StoredMessage, DecodeError> {
    let err = |reason: &str| DecodeError {
        offset,
        reason: reason.to_string(),
    };
    let len = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| err("short record"))? as usize;
    let meta_bytes = payload
        .get(4..4 + len)
        .ok_or_else(|| err("short metadata"))?;
    let mut meta: Meta = serde_json::from_slice(meta_bytes).map_err(|e| err(&e.to_string()))?;
    let enqueued_time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(time))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    if let Some(tag) = &meta.auth_method {
        let method = AuthMethod::from_tag(tag).ok_or_else(|| err("unknown auth method"))?;
        let system = &mut meta.system_properties;
        system.insert(AUTH_METHOD.into(), method.stamp().into());
        system.insert(DEVICE_ID.into(), meta.device_id.clone());
        system.insert(ENQUEUED_TIME.into(), rfc3339(enqueued_time));
    }
    Ok(StoredMessage {
        offset,
        enqueued_time,
        device_id: meta.device_id,
        system_properties: meta.system_properties,
        properties: meta.properties,
        body: payload.slice(4 + len..),
    })
}

/// The read API's JSON for a message. The body is JSON when the content type says
/// JSON and it parses as JSON (in UTF-8), else base64.
pub fn to_json(message: &StoredMessage) -> serde_json::Value {
    let is_json = message
        .system_properties
        .get("content-type")
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
        && message
            .system_properties
            .get("content-encoding")
            .is_none_or(|ce| ce.eq_ignore_ascii_case("utf-8") || ce.eq_ignore_ascii_case("utf8"));
    let body = is_json
        .then(|| serde_json::from_slice::<serde_json::Value>(&message.body).ok())
        .flatten()
        .unwrap_or_else(|| serde_json::Value::String(STANDARD.encode(&message.body)));
    serde_json::json!({
        "offset": message.offset,
        "enqueuedTime": rfc3339(message.enqueued_time),
        "deviceId": message.device_id,
        "systemProperties": message.system_properties,
        "properties": message.properties,
        "body": body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::device::AuthMethod;
    use crate::properties::PropertyBag;
    use crate::registry::DeviceId;

    fn message(bag: &[(&str, &str)], body: &'static [u8]) -> TelemetryMessage {
        TelemetryMessage {
            device_id: DeviceId::parse("d1").unwrap(),
            auth_method: AuthMethod::Sas,
            properties: PropertyBag(
                bag.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            body: Bytes::from_static(body),
            enqueued_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            model_id: None,
        }
    }

    #[test]
    fn azures_other_system_properties_are_kept_and_the_model_id_is_stamped() {
        let mut m = message(
            &[
                ("$.ctime", "2026-11-30T10:00:00Z"),
                ("$.sub", "thermostat1"),
                ("$.on", "out1"),
                ("$.ifid", "urn:x"),
                ("$.diagid", "d-1"),
                ("$.diagctx", "creationtimeutc=1"),
                ("$.nope", "dropped"),
                ("app", "v"),
            ],
            b"{}",
        );
        m.model_id = Some("dtmi:com:example:Thermostat;1".into());
        let stored = decode(0, 0, &encode(&m)).unwrap();
        let system = &stored.system_properties;
        assert_eq!(system["iothub-creation-time-utc"], "2026-11-30T10:00:00Z");
        assert_eq!(system["dt-subject"], "thermostat1");
        assert_eq!(system["$.on"], "out1");
        assert_eq!(system["$.ifid"], "urn:x");
        assert_eq!(system["$.diagid"], "d-1");
        assert_eq!(system["$.diagctx"], "creationtimeutc=1");
        assert_eq!(system["dt-dataschema"], "dtmi:com:example:Thermostat;1");
        assert!(!system.contains_key("$.nope"));
        assert_eq!(stored.properties.len(), 1);
        assert_eq!(stored.properties["app"], "v");
        // Without a model id on the connection nothing claims one.
        m.model_id = None;
        let stored = decode(0, 0, &encode(&m)).unwrap();
        assert!(!stored.system_properties.contains_key("dt-dataschema"));
    }

    #[test]
    fn system_and_application_properties_are_separated_and_stamped() {
        let m = message(
            &[
                ("$.mid", "m1"),
                ("$.ct", "application/json"),
                ("$.xyz", "?"),
                ("temp", "hot"),
            ],
            b"{\"t\":1}",
        );
        let stored = decode(7, 1_800_000_000_000_000_000, &encode(&m)).unwrap();
        assert_eq!(stored.offset, 7);
        assert_eq!(stored.device_id, "d1");
        assert_eq!(stored.system_properties["message-id"], "m1");
        assert_eq!(stored.system_properties["content-type"], "application/json");
        assert_eq!(
            stored.system_properties["iothub-connection-device-id"],
            "d1"
        );
        assert!(stored.system_properties["iothub-connection-auth-method"].contains("sas"));
        assert_eq!(
            stored.system_properties["iothub-enqueuedtime"],
            "2027-01-15T08:00:00Z"
        );
        assert!(!stored.system_properties.contains_key("$.xyz"));
        assert_eq!(stored.properties.len(), 1);
        assert_eq!(stored.properties["temp"], "hot");
        assert_eq!(stored.body.as_ref(), b"{\"t\":1}");
    }

    #[test]
    fn records_written_before_the_auth_method_tag_read_the_same() {
        // The layout stored until the hub kept the auth method as a tag: every stamp
        // in `s`.
        let meta = br#"{"d":"d1","s":{"iothub-connection-auth-method":"{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\"}","iothub-connection-device-id":"d1","iothub-enqueuedtime":"2027-01-15T08:00:00Z","message-id":"m1"},"p":{"temp":"hot"}}"#;
        let mut legacy = (meta.len() as u32).to_le_bytes().to_vec();
        legacy.extend_from_slice(meta);
        legacy.extend_from_slice(b"{\"t\":1}");
        let time = 1_800_000_000_000_000_000;
        let old = decode(7, time, &Bytes::from(legacy)).unwrap();
        let m = message(&[("$.mid", "m1"), ("temp", "hot")], b"{\"t\":1}");
        let new = decode(7, time, &encode(&m)).unwrap();
        assert_eq!(old, new);
    }

    #[test]
    fn a_key_given_twice_keeps_the_last_value() {
        let m = message(
            &[("a", "1"), ("a", "2"), ("$.mid", "x"), ("$.mid", "y")],
            b"",
        );
        let stored = decode(0, 0, &encode(&m)).unwrap();
        assert_eq!(stored.properties["a"], "2");
        assert_eq!(stored.system_properties["message-id"], "y");
    }

    #[test]
    fn a_record_naming_an_unknown_auth_method_is_refused() {
        let meta = br#"{"d":"d1","m":"telepathy","s":{},"p":{}}"#;
        let mut record = (meta.len() as u32).to_le_bytes().to_vec();
        record.extend_from_slice(meta);
        assert!(decode(0, 0, &Bytes::from(record)).is_err());
    }

    #[test]
    fn bodies_are_json_when_declared_and_valid_else_base64() {
        let json = to_json(
            &decode(
                0,
                0,
                &encode(&message(&[("$.ct", "application/json")], b"{\"t\":1}")),
            )
            .unwrap(),
        );
        assert_eq!(json["body"], serde_json::json!({"t": 1}));
        let invalid = to_json(
            &decode(
                0,
                0,
                &encode(&message(&[("$.ct", "application/json")], b"{oops")),
            )
            .unwrap(),
        );
        assert_eq!(
            invalid["body"],
            serde_json::json!(STANDARD.encode(b"{oops"))
        );
        let binary = to_json(&decode(0, 0, &encode(&message(&[], b"\x00\x01"))).unwrap());
        assert_eq!(binary["body"], serde_json::json!("AAE="));
        assert_eq!(binary["deviceId"], "d1");
    }
}
