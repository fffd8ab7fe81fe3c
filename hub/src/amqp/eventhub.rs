//! The Event Hub-compatible entity: `$management` READ answers (the entity and each
//! partition), telemetry records as Event Hubs events (Azure's annotations, the
//! device's properties), and where a partition receiver starts.

use std::time::Duration;

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId,
    Properties,
};
use fe2o3_amqp::types::primitives::{Array, Binary, OrderedMap, Symbol, Timestamp, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use time::OffsetDateTime;

use super::cbs::app_property;
use super::filter::{self, FilterError, SELECTOR_CODE, SELECTOR_SYMBOL, StartPosition};
use crate::telemetry::message::StoredMessage;
use crate::telemetry::{PartitionInfo, Telemetry, TelemetryError};

/// Milliseconds since the Unix epoch of `time`.
fn millis(time: OffsetDateTime) -> i64 {
    (time.unix_timestamp_nanos() / 1_000_000) as i64
}

fn symbol_key(key: &str) -> Value {
    Value::Symbol(Symbol::from(key))
}

/// Why a `$management` request is refused: status code and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementError {
    /// 400, 401 or 404.
    pub status: i32,
    /// Why.
    pub description: String,
}

fn mgmt_error(status: i32, description: impl Into<String>) -> ManagementError {
    ManagementError {
        status,
        description: description.into(),
    }
}

/// Answers a `$management` READ for `entity` (created at `created`).
pub async fn read(
    telemetry: &Telemetry,
    entity: &str,
    created: OffsetDateTime,
    request: &Message<Body<Value>>,
) -> Result<Value, ManagementError> {
    match app_property(request, "operation") {
        Some("READ") => {}
        other => return Err(mgmt_error(400, format!("unsupported operation {other:?}"))),
    }
    let name = app_property(request, "name").unwrap_or(entity);
    if !name.eq_ignore_ascii_case(entity) {
        return Err(mgmt_error(
            404,
            format!("no entity {name:?}; this hub's is {entity:?}"),
        ));
    }
    let mut map = OrderedMap::new();
    match app_property(request, "type") {
        Some("com.microsoft:eventhub") => {
            let ids: Vec<Value> = (0..telemetry.partition_count())
                .map(|p| Value::String(p.to_string()))
                .collect();
            map.insert(symbol_key("name"), Value::String(entity.to_string()));
            map.insert(
                symbol_key("type"),
                Value::String("com.microsoft:eventhub".into()),
            );
            map.insert(
                symbol_key("created_at"),
                Value::Timestamp(Timestamp::from_milliseconds(millis(created))),
            );
            map.insert(symbol_key("partition_count"), Value::Int(ids.len() as i32));
            map.insert(symbol_key("partition_ids"), Value::Array(Array::from(ids)));
        }
        Some("com.microsoft:partition") => {
            let partition = app_property(request, "partition")
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or_else(|| mgmt_error(400, "missing or invalid partition"))?;
            let info = telemetry
                .partition_info(partition)
                .await
                .map_err(|err| match err {
                    TelemetryError::NoSuchPartition(..) => mgmt_error(404, err.to_string()),
                    other => mgmt_error(500, other.to_string()),
                })?;
            let last_time = last_enqueued_time(telemetry, &info).await;
            let empty = info.end_offset == info.first_offset;
            let last = info.end_offset as i64 - 1;
            map.insert(symbol_key("name"), Value::String(entity.to_string()));
            map.insert(
                symbol_key("type"),
                Value::String("com.microsoft:partition".into()),
            );
            map.insert(
                symbol_key("partition"),
                Value::String(partition.to_string()),
            );
            map.insert(
                symbol_key("begin_sequence_number"),
                Value::Long(info.first_offset as i64),
            );
            map.insert(
                symbol_key("last_enqueued_sequence_number"),
                Value::Long(last),
            );
            map.insert(
                symbol_key("last_enqueued_offset"),
                Value::String(last.to_string()),
            );
            map.insert(
                symbol_key("last_enqueued_time_utc"),
                Value::Timestamp(Timestamp::from_milliseconds(last_time)),
            );
            map.insert(symbol_key("is_partition_empty"), Value::Bool(empty));
        }
        other => return Err(mgmt_error(400, format!("unsupported type {other:?}"))),
    }
    Ok(Value::Map(map))
}

/// When the last message of a partition was enqueued (0 when it is empty).
async fn last_enqueued_time(telemetry: &Telemetry, info: &PartitionInfo) -> i64 {
    if info.end_offset == info.first_offset {
        return 0;
    }
    match telemetry
        .read(info.id, info.end_offset - 1, 1, Duration::ZERO)
        .await
    {
        Ok(messages) => messages
            .first()
            .map(|m| millis(m.enqueued_time))
            .unwrap_or_default(),
        Err(_) => 0,
    }
}

/// The selector expression of a source's filter set, if any: the value under the
/// `apache.org:selector-filter:string` key, described by that symbol or by the code
/// `0x468C00000004` (or bare).
pub fn selector(filter: Option<&OrderedMap<Symbol, Value>>) -> Result<Option<String>, FilterError> {
    let Some(filter) = filter else {
        return Ok(None);
    };
    for (key, value) in filter.iter() {
        let is_selector_value = |described: &Described<Value>| match &described.descriptor {
            Descriptor::Name(name) => name.as_str() == SELECTOR_SYMBOL,
            Descriptor::Code(code) => *code == SELECTOR_CODE,
        };
        let expression = match value {
            Value::Described(described) if is_selector_value(described) => &described.value,
            Value::String(_) if key.as_str() == SELECTOR_SYMBOL => value,
            _ if key.as_str() == SELECTOR_SYMBOL => return Err(FilterError::Syntax),
            _ => continue,
        };
        return match expression {
            Value::String(text) => Ok(Some(text.clone())),
            _ => Err(FilterError::Syntax),
        };
    }
    Ok(None)
}

/// The start of a receiver on a partition holding `info`: the filter's position,
/// resolved (a time is searched for in the stream, oldest first).
pub async fn start_offset(
    telemetry: &Telemetry,
    info: &PartitionInfo,
    position: StartPosition,
) -> Result<u64, TelemetryError> {
    if let Some(offset) = position.offset_in(info.first_offset, info.end_offset) {
        return Ok(offset);
    }
    let StartPosition::EnqueuedTime {
        millis: at,
        inclusive,
    } = position
    else {
        return Ok(info.first_offset);
    };
    // Offsets are in enqueue order: the first message at or after the time is the
    // start. A linear scan of what is retained, in pages.
    let mut next = info.first_offset;
    while next < info.end_offset {
        let page = telemetry.read(info.id, next, 1000, Duration::ZERO).await?;
        let Some(last) = page.last() else {
            break;
        };
        for message in &page {
            let t = millis(message.enqueued_time);
            if t > at || (inclusive && t == at) {
                return Ok(message.offset);
            }
        }
        next = last.offset + 1;
    }
    Ok(info.end_offset)
}

/// A selector string into a start position (no filter: the earliest retained).
pub fn position(expression: Option<&str>) -> Result<StartPosition, FilterError> {
    match expression {
        Some(text) => filter::parse(text),
        None => Ok(StartPosition::Earliest),
    }
}

/// Properties the device set that travel in the properties section.
const PROPERTY_FIELDS: [&str; 5] = [
    "message-id",
    "correlation-id",
    "user-id",
    "content-type",
    "content-encoding",
];

/// A stored telemetry message as an Event Hubs event.
pub fn event(message: &StoredMessage) -> Message<Body<Value>> {
    let mut annotations = MessageAnnotations::default();
    let mut put = |key: &str, value: Value| {
        annotations
            .0
            .insert(OwnedKey::Symbol(Symbol::from(key)), value);
    };
    let enqueued = Timestamp::from_milliseconds(millis(message.enqueued_time));
    put("x-opt-sequence-number", Value::Long(message.offset as i64));
    put("x-opt-offset", Value::String(message.offset.to_string()));
    put("x-opt-enqueued-time", Value::Timestamp(enqueued.clone()));
    put("iothub-message-source", Value::String("Telemetry".into()));
    let mut props = Properties::default();
    for (key, value) in &message.system_properties {
        match key.as_str() {
            "message-id" => props.message_id = Some(MessageId::String(value.clone())),
            "correlation-id" => props.correlation_id = Some(MessageId::String(value.clone())),
            "user-id" => props.user_id = Some(Binary::from(value.as_bytes().to_vec())),
            "content-type" => props.content_type = Some(Symbol::from(value.as_str())),
            "content-encoding" => props.content_encoding = Some(Symbol::from(value.as_str())),
            "iothub-enqueuedtime" => put(key, Value::Timestamp(enqueued.clone())),
            _ if PROPERTY_FIELDS.contains(&key.as_str()) => {}
            // The creation time is an application property on Azure.
            "iothub-creation-time-utc" => {}
            _ => put(key, Value::String(value.clone())),
        }
    }
    put(
        "iothub-connection-device-id",
        Value::String(message.device_id.clone()),
    );
    let mut app = ApplicationProperties::default();
    for (key, value) in &message.properties {
        app.0.insert(
            key.clone(),
            fe2o3_amqp::types::primitives::SimpleValue::String(value.clone()),
        );
    }
    if let Some(created) = message.system_properties.get("iothub-creation-time-utc") {
        app.0.insert(
            "iothub-creation-time-utc".into(),
            fe2o3_amqp::types::primitives::SimpleValue::String(created.clone()),
        );
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(props),
        application_properties: Some(app),
        body: Body::Data(vec![Data(Binary::from(message.body.to_vec()))].into()),
        footer: None,
    }
}

/// An amqp-value body for a `$management` reply.
pub fn value_body(value: Value) -> Body<Value> {
    Body::Value(AmqpValue(value))
}
