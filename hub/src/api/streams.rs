//! Stream routes: partition info, long-poll reads by offset / checkpoint /
//! earliest / latest, consumer-group checkpoints, and a WebSocket that pushes
//! messages as they commit; for `telemetry` and routing's streams (`device-events`,
//! `dead-letters` and the named stream endpoints), all read alike. All need the
//! `service:connect` scope.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiJson, ApiPath, ApiQuery, Authorized, ServiceConnect};
use super::{ApiError, AppState};
use crate::telemetry::{DEFAULT_GROUP, Telemetry, TelemetryError, message};

/// The stream named `name`: `telemetry` or one of routing's.
fn stream(state: &AppState, name: &str) -> Result<Arc<Telemetry>, ApiError> {
    if name == "telemetry" {
        return Ok(Arc::clone(&state.telemetry));
    }
    state
        .routing
        .as_ref()
        .and_then(|routing| routing.stream(name))
        .ok_or_else(|| ApiError::NotFound(format!("no stream is named {name:?}")))
}

/// Longest long-poll wait.
const MAX_WAIT_MS: u64 = 30_000;
/// Most messages per read.
const MAX_READ: usize = 1000;

impl From<TelemetryError> for ApiError {
    fn from(err: TelemetryError) -> Self {
        match err {
            TelemetryError::NoSuchPartition(..) => ApiError::InvalidArgument(err.to_string()),
            TelemetryError::BeforeRetention { requested, first } => ApiError::Gone(format!(
                "offset {requested} was removed by retention; the first available offset is {first}"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn parse_partition(raw: &str) -> Result<u32, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::InvalidArgument(format!("partition {raw:?} is not a partition number"))
    })
}

fn parse_group(raw: Option<&String>) -> Result<String, ApiError> {
    let group = raw.map(String::as_str).unwrap_or(DEFAULT_GROUP);
    let valid = !group.is_empty()
        && group.len() <= 128
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '$' | '.' | '_' | '-'));
    if valid {
        Ok(group.to_string())
    } else {
        Err(ApiError::InvalidArgument(
            "consumerGroup must be 1 to 128 of letters, digits, $ . _ -".into(),
        ))
    }
}

fn parse_number(
    query: &HashMap<String, String>,
    key: &str,
    default: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match query.get(key) {
        None => Ok(default),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => Err(ApiError::InvalidArgument(format!(
                "{key} must be an integer from 0 to {max}"
            ))),
        },
    }
}

/// Resolves `from=` to an offset: a number, `earliest`, `latest`, or `checkpoint`
/// (the default; the earliest offset when the group has none).
async fn resolve_from(
    log: &Telemetry,
    group: &str,
    partition: u32,
    from: Option<&String>,
) -> Result<u64, ApiError> {
    let info = log.partition_info(partition).await?;
    match from.map(String::as_str) {
        Some("earliest") => Ok(info.first_offset),
        Some("latest") => Ok(info.end_offset),
        None | Some("checkpoint") => Ok(log
            .checkpoint(group, partition)
            .await?
            .unwrap_or(info.first_offset)),
        Some(raw) => raw.parse().map_err(|_| {
            ApiError::InvalidArgument(
                "from must be an offset, earliest, latest or checkpoint".into(),
            )
        }),
    }
}

/// `GET /streams/{stream}`.
pub async fn info(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let log = stream(&state, &name)?;
    let partitions: Vec<Value> = log
        .info()
        .await?
        .into_iter()
        .map(|p| {
            json!({
                "id": p.id,
                "firstOffset": p.first_offset,
                "lastOffset": p.end_offset as i64 - 1,
            })
        })
        .collect();
    Ok(Json(
        json!({ "partitionCount": log.partition_count(), "partitions": partitions }),
    ))
}

/// `GET /streams/{stream}/partitions/{p}/messages?consumerGroup=&from=&max=&waitMs=`.
pub async fn read(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath((name, partition)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let log = stream(&state, &name)?;
    let partition = parse_partition(&partition)?;
    let group = parse_group(query.get("consumerGroup"))?;
    let max = parse_number(&query, "max", 100, MAX_READ as u64)?.max(1) as usize;
    let wait = Duration::from_millis(parse_number(&query, "waitMs", 0, MAX_WAIT_MS)?);
    let from = resolve_from(&log, &group, partition, query.get("from")).await?;
    let messages = log.read(partition, from, max, wait).await?;
    let next_offset = messages.last().map_or(from, |m| m.offset + 1);
    let messages: Vec<Value> = messages.iter().map(message::to_json).collect();
    Ok(Json(
        json!({ "messages": messages, "nextOffset": next_offset }),
    ))
}

/// Body of a checkpoint PUT.
#[derive(Debug, Deserialize)]
pub struct CheckpointBody {
    /// The next offset the group will read.
    offset: u64,
}

/// `PUT /streams/{stream}/consumergroups/{g}/partitions/{p}/checkpoint` `{offset}`.
pub async fn put_checkpoint(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath((name, group, partition)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<CheckpointBody>,
) -> Result<Json<Value>, ApiError> {
    let log = stream(&state, &name)?;
    let group = parse_group(Some(&group))?;
    let partition = parse_partition(&partition)?;
    let info = log.partition_info(partition).await?;
    if body.offset > info.end_offset {
        return Err(ApiError::InvalidArgument(format!(
            "offset {} is beyond the end of partition {partition} ({})",
            body.offset, info.end_offset
        )));
    }
    log.set_checkpoint(&group, partition, body.offset).await?;
    Ok(Json(
        json!({ "consumerGroup": group, "partition": partition, "offset": body.offset }),
    ))
}

/// `GET /streams/{stream}/partitions/{p}/ws?from=&consumerGroup=`: a WebSocket that
/// sends each message (one JSON text frame) as soon as it is durable.
#[allow(clippy::too_many_arguments)]
pub async fn websocket(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
    ApiPath((name, partition)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    long_slot: Option<axum::Extension<super::LongRequestSlot>>,
    connection_slot: Option<axum::Extension<crate::http::serve::ConnectionSlot>>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| ApiError::InvalidArgument(rejection.body_text()))?;
    let log = stream(&state, &name)?;
    let partition = parse_partition(&partition)?;
    let group = parse_group(query.get("consumerGroup"))?;
    let from = match query.get("from") {
        // A live view starts at the end unless told otherwise.
        None => log.partition_info(partition).await?.end_offset,
        Some(_) => resolve_from(&log, &group, partition, query.get("from")).await?,
    };
    // A browser offers `hub.v1` (and its credential) as subprotocols and fails the
    // connection unless one is selected; other clients offer none.
    let upgrade = upgrade.protocols([super::extract::WEBSOCKET_PROTOCOL]);
    Ok(upgrade.on_upgrade(move |socket| async move {
        // The stream outlives this request and its HTTP connection: it keeps their
        // slots (a long request's and a connection's) until it ends.
        let _slots = (long_slot, connection_slot);
        stream_partition(socket, log, partition, from).await;
    }))
}

async fn stream_partition(
    mut socket: WebSocket,
    log: Arc<Telemetry>,
    partition: u32,
    mut next: u64,
) {
    loop {
        let read = tokio::select! {
            // The client went away (or sent a close): stop.
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
            read = log.read(partition, next, 100, Duration::from_secs(30)) => read,
        };
        let messages = match read {
            Ok(messages) => messages,
            Err(err) => {
                let body = json!({ "error": err.to_string() }).to_string();
                let _ = socket.send(Message::Text(body.into())).await;
                return;
            }
        };
        for message in messages {
            next = message.offset + 1;
            let text = message::to_json(&message).to_string();
            if socket.send(Message::Text(text.into())).await.is_err() {
                return;
            }
        }
    }
}
