//! A registration as stored (its state, substatus, etag and the operation that last
//! touched it) and Azure's JSON shapes of it: `registrationState` and the operation
//! status a device polls.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::enrollment::rfc3339;
use crate::registry::DeviceId;

/// Where a registration stands (Azure's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationStatus {
    /// The device is assigned to this hub.
    Assigned,
    /// The enrollment (or group) is disabled: nothing was created.
    Disabled,
    /// Registration failed; `error_code` says why.
    Failed,
}

impl RegistrationStatus {
    /// Azure's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationStatus::Assigned => "assigned",
            RegistrationStatus::Disabled => "disabled",
            RegistrationStatus::Failed => "failed",
        }
    }
}

/// How the assignment came about (Azure's `substatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Substatus {
    /// The first assignment of this registration id.
    InitialAssignment,
    /// Registered again; the twin was kept (`migrateDeviceData`).
    DeviceDataMigrated,
    /// Registered again; the twin was reset to the enrollment's initial twin.
    DeviceDataReset,
}

/// Which enrollment a registration came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "id")]
pub enum Source {
    /// An enrollment group, by id.
    Group(String),
    /// The individual enrollment of the registration id.
    Individual,
}

/// One registration id's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The registration id.
    pub registration_id: String,
    /// The hub device (absent unless assigned once).
    pub device_id: Option<DeviceId>,
    /// The hub's host name at assignment.
    pub assigned_hub: Option<String>,
    /// Where it stands.
    pub status: RegistrationStatus,
    /// How it was assigned.
    pub substatus: Option<Substatus>,
    /// Why it failed or is disabled.
    pub error_code: Option<u32>,
    /// The message to `error_code`.
    pub error_message: Option<String>,
    /// The enrollment it came through.
    pub source: Source,
    /// The operation id of the last registration request (what devices poll).
    pub operation_id: String,
    /// The device's `payload` of the last request. Kept, not echoed: Azure's
    /// `registrationState.payload` is what a custom allocation returns, and this hub
    /// allocates statically.
    pub payload: Option<Value>,
    /// Bumped on every write; the etag is derived from it.
    pub version: u64,
    /// First registered.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Last registered.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

impl Registration {
    /// The entity tag.
    pub fn etag(&self) -> String {
        STANDARD_NO_PAD.encode(self.version.to_string())
    }

    /// Azure's `registrationState` (`DeviceRegistrationResult`).
    pub fn state_json(&self) -> Value {
        let mut state = json!({
            "registrationId": self.registration_id,
            "createdDateTimeUtc": rfc3339(self.created),
            "status": self.status.as_str(),
            "lastUpdatedDateTimeUtc": rfc3339(self.updated),
            "etag": self.etag(),
        });
        if let Some(hub) = &self.assigned_hub {
            state["assignedHub"] = json!(hub);
        }
        if let Some(device) = &self.device_id {
            state["deviceId"] = json!(device.as_str());
        }
        if let Some(substatus) = self.substatus {
            state["substatus"] = json!(substatus);
        }
        if let Some(code) = self.error_code {
            state["errorCode"] = json!(code);
        }
        if let Some(message) = &self.error_message {
            state["errorMessage"] = json!(message);
        }
        match &self.source {
            Source::Group(group) => {
                state["symmetricKey"] = json!({ "enrollmentGroupId": group });
            }
            Source::Individual => {
                state["symmetricKey"] = json!({ "registrationId": self.registration_id });
            }
        }
        state
    }

    /// The final answer to a device polling `operation_id`.
    pub fn operation_json(&self) -> Value {
        json!({
            "operationId": self.operation_id,
            "status": self.status.as_str(),
            "registrationState": self.state_json(),
        })
    }
}

/// A new operation id: random, unguessable (a device polls only its own).
pub fn new_operation_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("5.{}.{}", &hex[..16], &hex[16..])
}
