//! `/messages/serviceBound/feedback`: C2D feedback batches from the Commands
//! capability as Azure sends them (one JSON array per message, content type
//! `application/vnd.microsoft.iothub.feedback.json`, a data-section body); the
//! client's `accepted` completes a batch, `released` (or `modified`) returns it.

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    Body, Data, Message, MessageAnnotations, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, Symbol, Timestamp, Value};

use crate::commands::FeedbackBatch;

/// The feedback content type.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// What to do with a batch after the client's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Delete it (accepted; rejected dead-letters, which for feedback is the same).
    Complete,
    /// Offer it again (released, modified, or no outcome).
    Abandon,
}

/// The client's outcome as a settlement.
pub fn settle(outcome: &Outcome) -> Settle {
    match outcome {
        Outcome::Accepted(_) | Outcome::Rejected(_) => Settle::Complete,
        _ => Settle::Abandon,
    }
}

/// A feedback batch as an AMQP message from hub `hub_name`, at `now_ms`.
pub fn message(batch: &FeedbackBatch, hub_name: &str, now_ms: i64) -> Message<Body<Value>> {
    // Records serialize to plain JSON (strings and an RFC 3339 time).
    let body = serde_json::to_vec(&batch.records).unwrap_or_else(|_| b"[]".to_vec());
    let mut annotations = MessageAnnotations::default();
    annotations.0.insert(
        OwnedKey::Symbol(Symbol::from("iothub-enqueuedtime")),
        Value::Timestamp(Timestamp::from_milliseconds(now_ms)),
    );
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(Properties {
            message_id: Some(MessageId::String(batch.lock_token.clone())),
            user_id: Some(Binary::from(hub_name.as_bytes().to_vec())),
            content_type: Some(Symbol::from(CONTENT_TYPE)),
            ..Properties::default()
        }),
        application_properties: None,
        body: Body::Data(vec![Data(Binary::from(body))].into()),
        footer: None,
    }
}
