//! The device side of provisioning without a transport: parsing a register request
//! body and shaping every answer (status, JSON body, `retry-after`) exactly as the
//! MQTT topics and the HTTPS routes carry them, so both edges answer alike.

use serde_json::{Value, json};

use super::{MAX_REGISTER_BODY_BYTES, ProvisioningError, RETRY_AFTER_SECS, Registration};

/// An answer to a device: status, JSON body and the seconds to wait before polling
/// or retrying, when there are any.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReply {
    /// HTTP-style status (also the `$dps/registrations/res/{status}` topic level).
    pub status: u16,
    /// The JSON body.
    pub body: Value,
    /// `retry-after` seconds.
    pub retry_after: Option<u32>,
}

impl DeviceReply {
    /// A register request was accepted: the device polls `operationId`.
    pub fn assigning(registration: &Registration) -> Self {
        // The outcome (assigned, disabled, failed) is known at once, but told at the
        // first poll: the SDKs expect 202 `assigning` first.
        Self {
            status: 202,
            body: json!({ "operationId": registration.operation_id, "status": "assigning" }),
            retry_after: Some(RETRY_AFTER_SECS),
        }
    }

    /// The operation's outcome.
    pub fn outcome(registration: &Registration) -> Self {
        Self {
            status: 200,
            body: registration.operation_json(),
            retry_after: None,
        }
    }

    /// A refusal in Azure's error shape (`errorCode`, `trackingId`, `message`, `timestampUtc`).
    pub fn error(err: &ProvisioningError) -> Self {
        let tracking: u64 = rand::random();
        Self {
            status: err.status(),
            body: json!({
                "errorCode": err.error_code(),
                "trackingId": format!("{tracking:016x}"),
                "message": err.to_string(),
                "timestampUtc": super::enrollment::rfc3339(time::OffsetDateTime::now_utc()),
            }),
            retry_after: matches!(err, ProvisioningError::Throttled).then_some(RETRY_AFTER_SECS),
        }
    }

    /// The body as bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).unwrap_or_default()
    }
}

/// Parses a register request body: `{"registrationId": "…", "payload": …}`; both
/// fields optional, an empty body is `{}`. Returns the payload.
pub fn parse_register_body(
    body: &[u8],
    registration_id: &str,
) -> Result<Option<Value>, ProvisioningError> {
    if body.len() > MAX_REGISTER_BODY_BYTES {
        return Err(ProvisioningError::BadRequest(format!(
            "register body of {} bytes exceeds the limit of {MAX_REGISTER_BODY_BYTES}",
            body.len()
        )));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(body).map_err(|err| {
        ProvisioningError::BadRequest(format!("register body is not JSON: {err}"))
    })?;
    let Value::Object(mut fields) = value else {
        return Err(ProvisioningError::BadRequest(
            "register body must be a JSON object".into(),
        ));
    };
    match fields.get("registrationId") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if id == registration_id => {}
        Some(other) => {
            return Err(ProvisioningError::BadRequest(format!(
                "registrationId {other} in the body does not match {registration_id:?}"
            )));
        }
    }
    Ok(fields.remove("payload").filter(|p| !p.is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_bodies_are_checked() {
        assert_eq!(parse_register_body(b"", "d").unwrap(), None);
        assert_eq!(parse_register_body(b" ", "d").unwrap(), None);
        assert_eq!(
            parse_register_body(br#"{"registrationId":"d","payload":{"a":1}}"#, "d").unwrap(),
            Some(json!({"a": 1}))
        );
        assert_eq!(
            parse_register_body(br#"{"registrationId":"d"}"#, "d").unwrap(),
            None
        );
        for bad in [&br#"{"registrationId":"e"}"#[..], b"[1]", b"{", b"\"x\""] {
            let err = parse_register_body(bad, "d").unwrap_err();
            assert_eq!(err.status(), 400, "{err}");
        }
        let big = vec![b' '; MAX_REGISTER_BODY_BYTES + 1];
        assert_eq!(parse_register_body(&big, "d").unwrap_err().status(), 400);
    }

    #[test]
    fn errors_carry_azures_shape() {
        let reply = DeviceReply::error(&ProvisioningError::Throttled);
        assert_eq!(reply.status, 429);
        assert_eq!(reply.retry_after, Some(RETRY_AFTER_SECS));
        assert_eq!(reply.body["errorCode"], 429_001);
        assert!(reply.body["message"].is_string());
    }
}
