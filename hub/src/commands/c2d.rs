//! Cloud-to-device messages as stored: the queued message with its properties,
//! expiry, acknowledgement mode and delivery count; feedback records; and the store
//! trait a backend implements (one queue per device, capped; a feedback log).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::delivery::Delivery;
use crate::properties::PropertyBag;
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// Azure IoT Hub's cap on a cloud-to-device message, measured by [`C2dMessage::size`]
/// (64 KiB). The one place the default lives: `CommandLimits::max_message_bytes`
/// starts from it.
pub const MAX_C2D_MESSAGE_BYTES: usize = 64 * 1024;

/// Which outcomes produce feedback records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// No feedback.
    #[default]
    None,
    /// Feedback when the device completes the message.
    Positive,
    /// Feedback when the message expires, exceeds its delivery count or is purged.
    Negative,
    /// Both.
    Full,
}

impl AckMode {
    fn wants(self, status: FeedbackStatus) -> bool {
        match (self, status) {
            (AckMode::None, _) => false,
            (AckMode::Full, _) => true,
            (AckMode::Positive, FeedbackStatus::Success) => true,
            (AckMode::Positive, _) => false,
            (AckMode::Negative, FeedbackStatus::Success) => false,
            (AckMode::Negative, _) => true,
        }
    }

    /// The `iothub-ack` property value devices see.
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::None => "none",
            AckMode::Positive => "positive",
            AckMode::Negative => "negative",
            AckMode::Full => "full",
        }
    }
}

/// A queued cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct C2dMessage {
    /// Position in the device's queue (also the delivery id).
    pub seq: u64,
    /// `$.mid`.
    pub message_id: String,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.ct`.
    pub content_type: Option<String>,
    /// `$.ce`.
    pub content_encoding: Option<String>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
    /// The body.
    #[serde(with = "body_base64")]
    pub body: Bytes,
    /// When it was enqueued.
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued: OffsetDateTime,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expiry: OffsetDateTime,
    /// Feedback wanted.
    pub ack: AckMode,
    /// Times sent to the device without completion.
    pub delivery_count: u32,
    /// The `generationId` of the device it was sent to: a device deleted and created
    /// again under the id has another one, and never receives the earlier device's
    /// messages (a send racing the delete may still land in the queue). Empty in
    /// records written before it existed.
    #[serde(default)]
    pub generation_id: String,
}

mod body_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(body))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

impl C2dMessage {
    /// The size Azure IoT Hub checks against its limit: body bytes, plus the values of
    /// the system properties the sender sets (message id, correlation id, content
    /// type and encoding), plus the names and values of the application properties.
    /// Properties the hub adds on delivery (`$.to`, `$.exp`, `iothub-ack`) are not
    /// counted, so the limit does not depend on the device id's length.
    pub fn size(&self) -> usize {
        let system = [
            Some(&self.message_id),
            self.correlation_id.as_ref(),
            self.content_type.as_ref(),
            self.content_encoding.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(String::len)
        .sum::<usize>();
        let application = self
            .properties
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
        self.body.len() + system + application
    }

    /// The message as a delivery to `device`.
    pub fn delivery(&self, device: &DeviceId) -> Delivery {
        Delivery::CloudToDevice {
            id: self.seq,
            properties: self.property_bag(device),
            body: self.body.clone(),
        }
    }

    /// The property bag the device receives: system properties as Azure names them
    /// (`$.mid`, `$.to`, …), `iothub-ack`, then the application properties.
    pub fn property_bag(&self, device: &DeviceId) -> PropertyBag {
        let mut bag = vec![
            ("$.mid".to_string(), self.message_id.clone()),
            (
                "$.to".to_string(),
                format!("/devices/{device}/messages/deviceBound"),
            ),
        ];
        let optional = [
            ("$.cid", &self.correlation_id),
            ("$.ct", &self.content_type),
            ("$.ce", &self.content_encoding),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                bag.push((key.to_string(), value.clone()));
            }
        }
        let expiry = self
            .expiry
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        bag.push(("$.exp".to_string(), expiry));
        bag.push(("iothub-ack".to_string(), self.ack.as_str().to_string()));
        bag.extend(self.properties.iter().cloned());
        PropertyBag(bag)
    }

    /// A feedback record for `status`, if the message's ack mode asks for it.
    pub fn feedback(
        &self,
        device: &DeviceId,
        status: FeedbackStatus,
        description: &str,
    ) -> Option<FeedbackRecord> {
        self.ack.wants(status).then(|| FeedbackRecord {
            original_message_id: self.message_id.clone(),
            device_id: device.to_string(),
            status_code: status,
            enqueued_time_utc: OffsetDateTime::now_utc(),
            description: description.to_string(),
        })
    }
}

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedbackStatus {
    /// The device completed it.
    Success,
    /// Its TTL passed.
    Expired,
    /// It was delivered the maximum number of times without completion.
    DeliveryCountExceeded,
    /// The device rejected it.
    Rejected,
    /// The queue was purged.
    Purged,
}

/// A feedback record (Azure's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// The message's id.
    pub original_message_id: String,
    /// Its device.
    pub device_id: String,
    /// How it ended.
    pub status_code: FeedbackStatus,
    /// When the outcome happened.
    #[serde(with = "time::serde::rfc3339")]
    pub enqueued_time_utc: OffsetDateTime,
    /// Human-readable detail.
    pub description: String,
}

/// Why a message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The device's queue holds the maximum.
    #[error("the device's cloud-to-device queue is full ({0} messages)")]
    QueueFull(usize),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FeedbackStatus {
    /// The `description` of a feedback record with this status.
    pub fn description(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "the device completed the message",
            FeedbackStatus::Expired => "the message expired",
            FeedbackStatus::DeliveryCountExceeded => {
                "delivered the maximum number of times without completion"
            }
            FeedbackStatus::Rejected => "the device rejected the message",
            FeedbackStatus::Purged => "the queue was purged",
        }
    }
}

/// What a removal did: messages removed and feedback records written (in the same
/// transaction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Messages that were still queued and are now gone.
    pub messages: usize,
    /// Feedback records written for them (as their ack modes asked).
    pub feedback: usize,
}

impl std::ops::AddAssign for Removed {
    fn add_assign(&mut self, other: Self) {
        self.messages += other.messages;
        self.feedback += other.feedback;
    }
}

/// The outcome of [`CommandStore::lock_feedback`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedbackLock {
    /// A batch of records no other batch holds, locked under `token` until the lock
    /// time passes or the token is acknowledged.
    Locked {
        /// Acknowledges the batch.
        token: String,
        /// The records.
        records: Vec<FeedbackRecord>,
    },
    /// Nothing free. Look again at `retry` at the latest: a lock expires then, or the
    /// backend is shared with other hub nodes whose feedback this process is not told
    /// about. `None`: only feedback written through this process changes the answer.
    Empty {
        /// When to look again.
        retry: Option<Instant>,
    },
}

/// Durable C2D queues and feedback.
///
/// Shaped by what the service does on its hot paths, so that none of them reads a
/// whole queue (or every queue): counting is a count, completing a message finds it
/// by its sequence number, delivery reads only messages after a cursor, and the
/// expiry sweep reads only messages that are due. A removal writes the feedback of
/// the message as stored, and a message completed twice (a PUBACK racing the sweep)
/// yields one record.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Appends `message` (its `seq` is assigned here) unless `max` are queued.
    async fn enqueue(
        &self,
        device: &DeviceId,
        message: C2dMessage,
        max: usize,
    ) -> Result<C2dMessage, EnqueueError>;
    /// How many messages are queued for `device`.
    async fn count(&self, device: &DeviceId) -> Result<usize, StoreError>;
    /// How many messages are queued for each of `devices`, in order (a page of
    /// `GET /devices` asks for up to 1,000 at once).
    async fn counts(&self, devices: &[DeviceId]) -> Result<Vec<usize>, StoreError>;
    /// Up to `limit` queued messages of `device` with `seq > after`, oldest first.
    async fn pending(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>, StoreError>;
    /// Counts one more delivery of message `seq`; `false` when it is no longer queued.
    async fn record_delivery(&self, device: &DeviceId, seq: u64) -> Result<bool, StoreError>;
    /// Removes messages `seqs` of `device` that are still queued, with a feedback
    /// record of `status` for each whose ack mode asks for one.
    async fn complete(
        &self,
        device: &DeviceId,
        seqs: &[u64],
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError>;
    /// Drops `device`'s queue without feedback (the device was deleted).
    async fn drop_queue(&self, device: &DeviceId) -> Result<(), StoreError>;
    /// Removes every queued message of `device`, with a feedback record of `status`
    /// for each whose ack mode asks for one.
    async fn purge(&self, device: &DeviceId, status: FeedbackStatus)
    -> Result<Removed, StoreError>;
    /// Removes up to `limit` messages (of any device) that are due at `now`,
    /// earliest first, with Expired feedback where asked. Reads nothing else: the
    /// cost is proportional to what is due, not to what is queued.
    async fn expire(&self, now: OffsetDateTime, limit: usize) -> Result<Removed, StoreError>;
    /// Stored feedback records with their keys, oldest first.
    async fn feedback(&self) -> Result<Vec<(u64, FeedbackRecord)>, StoreError>;
    /// Deletes acknowledged feedback records.
    async fn remove_feedback(&self, keys: &[u64]) -> Result<(), StoreError>;
    /// Locks up to `max` feedback records no other batch holds for `lock`.
    async fn lock_feedback(&self, max: usize, lock: Duration) -> Result<FeedbackLock, StoreError>;
    /// Deletes the records of the batch locked under `token`; `false` when the token
    /// is unknown or its lock expired (the records are offered again).
    async fn acknowledge_feedback(&self, token: &str) -> Result<bool, StoreError>;
    /// Releases the batch locked under `token` without deleting it: its records are
    /// offered again at once. `false` when the token is unknown or its lock expired.
    async fn abandon_feedback(&self, token: &str) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ack: AckMode) -> C2dMessage {
        C2dMessage {
            seq: 1,
            message_id: "m/1".into(),
            correlation_id: Some("c1".into()),
            content_type: Some("application/json".into()),
            content_encoding: None,
            properties: vec![("k".into(), "v/w".into())],
            body: Bytes::from_static(b"{}"),
            enqueued: OffsetDateTime::UNIX_EPOCH,
            expiry: OffsetDateTime::UNIX_EPOCH,
            ack,
            delivery_count: 0,
            generation_id: String::new(),
        }
    }

    #[test]
    fn the_property_bag_carries_system_and_application_properties() {
        let bag = message(AckMode::Full).property_bag(&DeviceId::parse("d1").unwrap());
        assert_eq!(bag.get("$.mid"), Some("m/1"));
        assert_eq!(bag.get("$.to"), Some("/devices/d1/messages/deviceBound"));
        assert_eq!(bag.get("$.cid"), Some("c1"));
        assert_eq!(bag.get("$.ct"), Some("application/json"));
        assert_eq!(bag.get("$.exp"), Some("1970-01-01T00:00:00Z"));
        assert_eq!(bag.get("iothub-ack"), Some("full"));
        assert_eq!(bag.get("k"), Some("v/w"));
        assert!(
            !bag.encode().contains('/'),
            "slashes are escaped: {}",
            bag.encode()
        );
        // System properties as Azure writes them: the C SDKs know them only by `%24.`.
        assert_eq!(
            bag.encode(),
            "%24.mid=m%2F1&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&%24.cid=c1\
             &%24.ct=application%2Fjson&%24.exp=1970-01-01T00%3A00%3A00Z&iothub-ack=full&k=v%2Fw"
        );
    }

    #[test]
    fn the_size_counts_body_sender_system_values_and_application_properties() {
        let m = message(AckMode::Full);
        // body "{}" + "m/1" + "c1" + "application/json" + "k" + "v/w"
        assert_eq!(m.size(), 2 + 3 + 2 + 16 + 1 + 3);
    }

    #[test]
    fn feedback_follows_the_ack_mode() {
        let d = DeviceId::parse("d").unwrap();
        assert!(
            message(AckMode::None)
                .feedback(&d, FeedbackStatus::Success, "")
                .is_none()
        );
        assert!(
            message(AckMode::Positive)
                .feedback(&d, FeedbackStatus::Success, "")
                .is_some()
        );
        assert!(
            message(AckMode::Positive)
                .feedback(&d, FeedbackStatus::Expired, "")
                .is_none()
        );
        assert!(
            message(AckMode::Negative)
                .feedback(&d, FeedbackStatus::Expired, "")
                .is_some()
        );
        assert!(
            message(AckMode::Negative)
                .feedback(&d, FeedbackStatus::Success, "")
                .is_none()
        );
        assert!(
            message(AckMode::Full)
                .feedback(&d, FeedbackStatus::Purged, "")
                .is_some()
        );
        let json = serde_json::to_value(
            message(AckMode::Full)
                .feedback(&d, FeedbackStatus::DeliveryCountExceeded, "x")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["statusCode"], "DeliveryCountExceeded");
        assert_eq!(json["originalMessageId"], "m/1");
    }
}
