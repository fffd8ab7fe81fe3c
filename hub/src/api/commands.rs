//! Cloud-to-device and method routes: `POST /devices/{id}/messages/deviceBound`,
//! `DELETE /devices/{id}/commands`, feedback (`GET /messages/serviceBound/feedback`,
//! `DELETE …/{lockToken}`) and `POST /twins/{id}/methods`. All need
//! `service:connect`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiJson, ApiPath, ApiQuery, Authorized, ServiceConnect};
use super::{ApiError, AppState};
use crate::commands::c2d::AckMode;
use crate::commands::{CommandError, SendRequest};
use crate::registry::DeviceId;

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        match err {
            CommandError::NotFound(id) => ApiError::DeviceNotFound(id.to_string()),
            // Too large is a 400 (400004), not 413001: the request body was read in
            // full and was within the HTTP limit; the message it describes is what is
            // over Azure's C2D cap (DECISIONS.md, "Limits and abuse").
            CommandError::Invalid(_)
            | CommandError::UnknownLock
            | CommandError::TooLarge { .. } => ApiError::InvalidArgument(err.to_string()),
            CommandError::QueueFull(_) => ApiError::QueueFull(err.to_string()),
            CommandError::Offline(_) => ApiError::DeviceOffline(err.to_string()),
            CommandError::Timeout(..) => ApiError::MethodTimeout(err.to_string()),
            CommandError::Registry(err) => err.into(),
            CommandError::Store(err) => ApiError::Internal(err.to_string()),
        }
    }
}

fn parse_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|err| ApiError::InvalidArgument(err.to_string()))
}

/// Body of a C2D send.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendBody {
    body: Option<Value>,
    content_encoding: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    content_type: Option<String>,
    ttl_seconds: Option<u64>,
    #[serde(default)]
    ack: AckMode,
}

/// `POST /devices/{id}/messages/deviceBound` → 202 `{"messageId"}`.
pub async fn send(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    // `contentEncoding: base64` says how the body travels in this request; any other
    // encoding is passed to the device as `$.ce`.
    let base64 = request
        .content_encoding
        .as_deref()
        .is_some_and(|e| e.eq_ignore_ascii_case("base64"));
    let body = match request.body {
        None | Some(Value::Null) => Bytes::new(),
        Some(Value::String(text)) if base64 => Bytes::from(
            STANDARD
                .decode(text.as_bytes())
                .map_err(|_| ApiError::InvalidArgument("body is not valid base64".into()))?,
        ),
        Some(Value::String(text)) => Bytes::from(text),
        // A JSON body is sent as its JSON text.
        Some(other) => Bytes::from(other.to_string()),
    };
    let message_id = state
        .commands
        .send(
            &id,
            SendRequest {
                body,
                message_id: request.message_id,
                correlation_id: request.correlation_id,
                content_type: request.content_type,
                content_encoding: request.content_encoding.filter(|_| !base64),
                properties: request.properties.into_iter().collect(),
                ttl: request.ttl_seconds.map(Duration::from_secs),
                ack: request.ack,
            },
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(json!({ "messageId": message_id })),
    )
        .into_response())
}

/// `DELETE /devices/{id}/commands`: purge the queue.
pub async fn purge(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_id(&id)?;
    let purged = state.commands.purge(&id).await?;
    Ok(ApiJson(
        json!({ "deviceId": id, "totalMessagesPurged": purged }),
    ))
}

/// `GET /messages/serviceBound/feedback?waitMs=` → 200 batch or 204.
pub async fn feedback(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let wait = match query.get("waitMs") {
        None => 0,
        Some(raw) => match raw.parse::<u64>() {
            Ok(ms) if ms <= 30_000 => ms,
            _ => {
                return Err(ApiError::InvalidArgument(
                    "waitMs must be an integer from 0 to 30000".into(),
                ));
            }
        },
    };
    match state
        .commands
        .receive_feedback(Duration::from_millis(wait))
        .await?
    {
        Some(batch) => Ok(ApiJson(
            json!({ "lockToken": batch.lock_token, "records": batch.records }),
        )
        .into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// `DELETE /messages/serviceBound/feedback/{lockToken}` → 204.
pub async fn acknowledge(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.commands.acknowledge_feedback(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /messages/serviceBound/feedback/{lockToken}/abandon` → 204: the batch is
/// offered again at once (Azure's abandon), instead of after its lock.
pub async fn abandon(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.commands.abandon_feedback(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of a method call.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvokeBody {
    method_name: String,
    #[serde(default)]
    payload: Value,
    response_timeout_in_seconds: Option<u64>,
    connect_timeout_in_seconds: Option<u64>,
}

/// `POST /twins/{id}/methods` → 200 `{status, payload}`.
pub async fn invoke(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<InvokeBody>,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_id(&id)?;
    let name = request.method_name.trim();
    // The name goes raw into the device's topic `$iothub/methods/POST/{name}/`
    // (Azure's SDKs match it undecoded), so nothing that would change the topic's
    // structure or make it an invalid MQTT topic (U+0000) is admitted.
    if name.is_empty()
        || name.len() > 256
        || name.contains(['/', '#', '+'])
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::InvalidArgument(
            "methodName must be 1 to 256 characters without '/', '#', '+' or control characters"
                .into(),
        ));
    }
    let response_timeout = request.response_timeout_in_seconds.unwrap_or(30);
    if !(5..=300).contains(&response_timeout) {
        return Err(ApiError::InvalidArgument(
            "responseTimeoutInSeconds must be from 5 to 300".into(),
        ));
    }
    let connect_timeout = request.connect_timeout_in_seconds.unwrap_or(0);
    if connect_timeout > 300 {
        return Err(ApiError::InvalidArgument(
            "connectTimeoutInSeconds must be from 0 to 300".into(),
        ));
    }
    let payload = match request.payload {
        Value::Null => Bytes::new(),
        other => Bytes::from(other.to_string()),
    };
    let (status, answer) = state
        .commands
        .invoke(
            &id,
            name,
            payload,
            Duration::from_secs(response_timeout),
            Duration::from_secs(connect_timeout),
        )
        .await?;
    let payload = if answer.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&answer)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer).into_owned()))
    };
    Ok(ApiJson(json!({ "status": status, "payload": payload })))
}
