//! What a device edge asks of the twins capability: a [`TwinOp`] (GET the twin or
//! PATCH its reported properties) through [`TwinRequests`], answered with a
//! [`TwinReply`] carrying Azure's status and error codes.

use async_trait::async_trait;
use bytes::Bytes;

use crate::registry::DeviceId;

/// A twin request from a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TwinOp {
    /// GET the twin.
    Get,
    /// PATCH reported properties with this JSON merge patch.
    PatchReported(Bytes),
}

/// The answer to a twin request, sent on `$iothub/twin/res/{status}/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinReply {
    /// 200 (GET), 204 (PATCH), 400, 429 or 500.
    pub status: u16,
    /// The response body (the twin for GET; empty or an error for others).
    pub body: Bytes,
    /// The new reported version after a PATCH.
    pub version: Option<u64>,
}

impl TwinReply {
    /// A refusal as Azure IoT Hub answers it: `status` on the topic and the body
    /// `{"errorCode": <Azure code>, "message": …}`. The Node SDK decides success or
    /// failure by the `errorCode` in the body, not by the status in the topic, so
    /// an error without it would reach the device as a success.
    pub fn error(status: u16, error_code: u32, message: &str) -> Self {
        Self {
            status,
            body: Bytes::from(
                serde_json::json!({ "errorCode": error_code, "message": message }).to_string(),
            ),
            version: None,
        }
    }
}

/// Azure's error codes in twin refusals (the same numbers the REST API uses).
pub mod twin_error_code {
    /// 400: the patch is not JSON, too large, too deep, or has a bad key.
    pub const INVALID: u32 = 400_004;
    /// 429: too many requests; try again later.
    pub const THROTTLED: u32 = 429_001;
    /// 500: the hub failed; nothing was changed.
    pub const INTERNAL: u32 = 500_001;
}

/// Serves twin requests from devices.
#[async_trait]
pub trait TwinRequests: Send + Sync + 'static {
    /// Answers `op` for `device`.
    async fn request(&self, device: &DeviceId, op: TwinOp) -> TwinReply;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_refusals_carry_azures_error_code() {
        let reply = TwinReply::error(400, twin_error_code::INVALID, "key \"a.b\" is not allowed");
        assert_eq!(reply.status, 400);
        assert_eq!(reply.version, None);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON body");
        assert_eq!(
            body,
            serde_json::json!({"errorCode": 400004, "message": "key \"a.b\" is not allowed"})
        );
    }
}
