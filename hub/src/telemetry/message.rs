//! Telemetry messages as stored and as served: the mapping from the device's
//! property bag to Azure's system property names, the record payload encoding, and
//! the JSON shape of the read API.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::gateway::services::TelemetryMessage;

/// Device property-bag keys and the system property names they are stored under
/// (Azure's names, as its routing and Event Hubs consumers see them).
const SYSTEM_PROPERTIES: [(&str, &str); 8] = [
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
fn kept_under_own_name(key: &str) -> bool {
    matches!(key, "$.on" | "$.ifid") || key.starts_with("$.diag")
}

/// The system property the model id from the CONNECT username is stamped as.
const DATA_SCHEMA: &str = "dt-dataschema";

/// What is stored with each message besides its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    #[serde(rename = "d")]
    device_id: String,
    #[serde(rename = "s")]
    system_properties: BTreeMap<String, String>,
    #[serde(rename = "p")]
    properties: BTreeMap<String, String>,
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

/// Bytes a record payload may take beyond the message's body and property bag: the
/// length prefix, the JSON framing and key names, the device id (twice) and the
/// properties the hub stamps.
pub const ENCODING_OVERHEAD: usize = 4096;

/// The largest `mqtt.max_telemetry_bytes` (body + property bag) whose every message
/// fits in one segment record: JSON escaping can at most double the property bag
/// (`%01` → `\u0001`), so body + 2 × bag + overhead must stay within the record limit.
pub const MAX_TELEMETRY_BYTES: usize = (super::segment::MAX_PAYLOAD - ENCODING_OVERHEAD) / 2;

/// Encodes a gateway message into a record payload: `meta length | meta JSON | body`.
pub fn encode(message: &TelemetryMessage) -> Bytes {
    let mut system_properties = BTreeMap::new();
    let mut properties = BTreeMap::new();
    for (key, value) in &message.properties.0 {
        match SYSTEM_PROPERTIES.iter().find(|(bag_key, _)| bag_key == key) {
            Some((_, name)) => {
                system_properties.insert((*name).to_string(), value.clone());
            }
            None if kept_under_own_name(key) => {
                system_properties.insert(key.clone(), value.clone());
            }
            // Unknown `$.` keys are reserved for the hub; they are not application
            // properties.
            None if key.starts_with("$.") => {}
            None => {
                properties.insert(key.clone(), value.clone());
            }
        }
    }
    let enqueued = message
        .enqueued_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    system_properties.insert(
        "iothub-connection-device-id".into(),
        message.device_id.to_string(),
    );
    system_properties.insert(
        "iothub-connection-auth-method".into(),
        message.auth_method.stamp().into(),
    );
    system_properties.insert("iothub-enqueuedtime".into(), enqueued);
    // Stamped by the hub from the authenticated connection: no bag key maps to it, so
    // a device cannot claim another model per message.
    if let Some(model_id) = &message.model_id {
        system_properties.insert(DATA_SCHEMA.into(), model_id.clone());
    }
    let meta = Meta {
        device_id: message.device_id.to_string(),
        system_properties,
        properties,
    };
    // A map of strings always serializes.
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + meta.len() + message.body.len());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
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
    let meta: Meta = serde_json::from_slice(meta_bytes).map_err(|e| err(&e.to_string()))?;
    Ok(StoredMessage {
        offset,
        enqueued_time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(time))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
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
        "enqueuedTime": message
            .enqueued_time
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
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
    use crate::gateway::topic::PropertyBag;
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
