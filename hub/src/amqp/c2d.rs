//! `/messages/devicebound`: an AMQP message from `azure-iothub`'s `Client.send`
//! becomes a C2D send request for the Commands capability (the same queues, limits,
//! expiry and `iothub-ack` feedback as the REST send), and a refusal becomes the
//! rejected outcome with the condition the SDK maps to its error class.

use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use percent_encoding::percent_decode_str;

use crate::commands::c2d::AckMode;
use crate::commands::{CommandError, SendRequest};
use crate::registry::DeviceId;

/// Why a C2D message was refused: the outcome's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No such device (`amqp:not-found` → DeviceNotFoundError).
    #[error("{0}")]
    NotFound(String),
    /// The device's queue is full (`amqp:resource-limit-exceeded` →
    /// DeviceMaximumQueueDepthExceededError).
    #[error("{0}")]
    QueueFull(String),
    /// Over the C2D size limit (`amqp:link:message-size-exceeded`).
    #[error("{0}")]
    TooLarge(String),
    /// A bad `to`, property or body (`com.microsoft:argument-error`).
    #[error("{0}")]
    Invalid(String),
    /// The connection's claim no longer covers the send (`amqp:unauthorized-access`).
    #[error("{0}")]
    Unauthorized(String),
    /// The store or registry failed (`amqp:internal-error`, which the SDK retries).
    #[error("{0}")]
    Internal(String),
}

impl Refused {
    /// The AMQP error condition.
    pub fn condition(&self) -> ErrorCondition {
        match self {
            Refused::NotFound(_) => AmqpError::NotFound.into(),
            Refused::QueueFull(_) => AmqpError::ResourceLimitExceeded.into(),
            Refused::TooLarge(_) => LinkError::MessageSizeExceeded.into(),
            Refused::Invalid(_) => {
                ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error"))
            }
            Refused::Unauthorized(_) => AmqpError::UnauthorizedAccess.into(),
            Refused::Internal(_) => AmqpError::InternalError.into(),
        }
    }
}

impl From<CommandError> for Refused {
    fn from(err: CommandError) -> Self {
        match err {
            CommandError::NotFound(_) => Refused::NotFound(err.to_string()),
            CommandError::QueueFull(_) => Refused::QueueFull(err.to_string()),
            CommandError::TooLarge { .. } => Refused::TooLarge(err.to_string()),
            CommandError::Invalid(_) => Refused::Invalid(err.to_string()),
            _ => Refused::Internal(err.to_string()),
        }
    }
}

/// A message id (or correlation id) in its canonical string form: UUIDs hyphenated
/// in lower case, numbers in decimal, binary in hex.
pub fn id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => {
            let b = u.as_inner();
            let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
        }
        MessageId::Binary(bytes) => bytes.iter().map(|byte| format!("{byte:02x}")).collect(),
    }
}

/// An application property value as the device sees it (a string).
pub fn simple_to_string(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_string(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => t.milliseconds().to_string(),
        SimpleValue::Uuid(u) => id_string(&MessageId::Uuid(u.clone())),
        SimpleValue::Null => return None,
        _ => return None,
    })
}

/// The device a `to` of `/devices/{url-encoded id}/messages/devicebound` names.
pub fn device_of(to: &str) -> Result<DeviceId, Refused> {
    let invalid = || {
        Refused::Invalid(format!(
            "'to' must be /devices/{{deviceId}}/messages/devicebound, not {to:?}"
        ))
    };
    let path = to.trim_start_matches('/');
    let rest = path.strip_prefix("devices/").ok_or_else(invalid)?;
    let (encoded, tail) = rest.split_once('/').ok_or_else(invalid)?;
    if !tail.eq_ignore_ascii_case("messages/devicebound") {
        return Err(invalid());
    }
    let id = percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| invalid())?;
    DeviceId::parse(&id).map_err(|err| Refused::Invalid(err.to_string()))
}

/// The device and send request an AMQP C2D message describes, at `now_ms`.
pub fn to_request(
    message: &Message<Body<Value>>,
    now_ms: i64,
) -> Result<(DeviceId, SendRequest), Refused> {
    let props = message
        .properties
        .as_ref()
        .ok_or_else(|| Refused::Invalid("the message has no properties (no 'to')".into()))?;
    let to = props
        .to
        .as_deref()
        .ok_or_else(|| Refused::Invalid("the message has no 'to'".into()))?;
    let device = device_of(to)?;
    let mut ack = AckMode::None;
    let mut properties = Vec::new();
    if let Some(app) = &message.application_properties {
        for (key, value) in app.0.iter() {
            let Some(text) = simple_to_string(value) else {
                continue;
            };
            if key == "iothub-ack" {
                ack = match text.as_str() {
                    "none" => AckMode::None,
                    "positive" => AckMode::Positive,
                    "negative" => AckMode::Negative,
                    "full" => AckMode::Full,
                    other => {
                        return Err(Refused::Invalid(format!(
                            "iothub-ack must be none, positive, negative or full, not {other:?}"
                        )));
                    }
                };
            } else {
                properties.push((key.clone(), text));
            }
        }
    }
    let ttl = match &props.absolute_expiry_time {
        Some(expiry) => {
            let ms = expiry.milliseconds().saturating_sub(now_ms);
            if ms <= 0 {
                return Err(Refused::Invalid("the message has already expired".into()));
            }
            // Whole seconds, rounded up, so a short TTL does not become zero.
            Some(Duration::from_secs((ms as u64).div_ceil(1000)))
        }
        None => None,
    };
    let body = match &message.body {
        Body::Data(sections) => {
            let mut body = Vec::new();
            for section in sections.iter() {
                body.extend_from_slice(&section.0);
            }
            Bytes::from(body)
        }
        Body::Value(value) => match &value.0 {
            Value::Binary(bytes) => Bytes::from(bytes.to_vec()),
            Value::String(text) => Bytes::from(text.clone()),
            Value::Null => Bytes::new(),
            _ => {
                return Err(Refused::Invalid(
                    "the body must be a data section (or a binary or string value)".into(),
                ));
            }
        },
        Body::Empty => Bytes::new(),
        Body::Sequence(_) => {
            return Err(Refused::Invalid(
                "the body must be a data section, not an amqp-sequence".into(),
            ));
        }
    };
    Ok((
        device,
        SendRequest {
            body,
            message_id: props.message_id.as_ref().map(id_string),
            correlation_id: props.correlation_id.as_ref().map(id_string),
            content_type: props.content_type.as_ref().map(|s| s.as_str().to_string()),
            content_encoding: props
                .content_encoding
                .as_ref()
                .map(|s| s.as_str().to_string()),
            properties,
            ttl,
            ack,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Properties};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_to_parses_or_is_refused_without_panicking(to in ".{0,300}") {
            let _ = device_of(&to);
        }

        #[test]
        fn an_encoded_device_id_comes_back(id in "[A-Za-z0-9\\-:.+%_#*?!(),=@;$']{1,128}") {
            let encoded: String = percent_encoding::utf8_percent_encode(
                &id,
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string();
            let device = device_of(&format!("/devices/{encoded}/messages/devicebound"));
            prop_assert_eq!(device.map(|d| d.as_str().to_string()), Ok(id));
        }
    }
    use fe2o3_amqp::types::primitives::{Binary, Timestamp, Uuid};

    fn message(to: &str) -> Message<Body<Value>> {
        let mut app = ApplicationProperties::default();
        app.0
            .insert("iothub-ack".into(), SimpleValue::String("full".into()));
        app.0
            .insert("color".into(), SimpleValue::String("red".into()));
        app.0.insert("n".into(), SimpleValue::Int(3));
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                to: Some(to.into()),
                message_id: Some(MessageId::Uuid(Uuid::from([0xab; 16]))),
                correlation_id: Some(MessageId::String("c-1".into())),
                content_type: Some(Symbol::from("application/json")),
                absolute_expiry_time: Some(Timestamp::from_milliseconds(61_500)),
                ..Properties::default()
            }),
            application_properties: Some(app),
            body: Body::Data(vec![Data(Binary::from(b"{\"a\":1}".to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn an_sdk_message_becomes_a_send_request() {
        let (device, request) =
            to_request(&message("/devices/my%3Adev%25/messages/devicebound"), 1_000).unwrap();
        assert_eq!(device.as_str(), "my:dev%");
        assert_eq!(request.body.as_ref(), b"{\"a\":1}");
        assert_eq!(request.ack, AckMode::Full);
        assert_eq!(
            request.message_id.as_deref(),
            Some("abababab-abab-abab-abab-abababababab")
        );
        assert_eq!(request.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(request.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.ttl, Some(Duration::from_secs(61)));
        assert!(request.properties.contains(&("color".into(), "red".into())));
        assert!(request.properties.contains(&("n".into(), "3".into())));
    }

    #[test]
    fn a_bad_to_is_an_argument_error() {
        for to in [
            "/devices/x",
            "/modules/x/messages/devicebound",
            "/devices/%ff/messages/devicebound",
        ] {
            let err = to_request(&message(to), 0).unwrap_err();
            assert!(matches!(err, Refused::Invalid(_)), "{to}: {err:?}");
        }
        let err = to_request(&message("/devices/x/messages/devicebound"), 70_000).unwrap_err();
        assert!(matches!(err, Refused::Invalid(_)));
    }
}
