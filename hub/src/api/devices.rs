//! Registry routes: `PUT/GET/DELETE /devices/{id}` and `GET /devices` (paged with
//! `x-ms-max-item-count` and `x-ms-continuation`), with etags and `If-Match`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use time::OffsetDateTime;

use super::extract::{ApiJson, ApiPath, Authorized, RegistryRead, RegistryWrite};
use super::{ApiError, AppState};
use crate::registry::{
    Authentication, Device, DeviceId, DeviceSpec, DeviceStatus, IfMatch, Presence,
};

/// Request header: page size of `GET /devices`.
pub const MAX_ITEM_COUNT: HeaderName = HeaderName::from_static("x-ms-max-item-count");
/// Request and response header: where the next page of `GET /devices` starts.
pub const CONTINUATION: HeaderName = HeaderName::from_static("x-ms-continuation");

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A device as the API shows it: the stored identity plus live connection state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView<'a> {
    device_id: &'a DeviceId,
    generation_id: &'a str,
    etag: String,
    status: DeviceStatus,
    status_reason: Option<&'a str>,
    #[serde(with = "time::serde::rfc3339")]
    status_updated_time: OffsetDateTime,
    authentication: &'a Authentication,
    connection_state: &'static str,
    #[serde(with = "time::serde::rfc3339::option")]
    last_activity_time: Option<OffsetDateTime>,
    cloud_to_device_message_count: usize,
}

impl<'a> DeviceView<'a> {
    /// Joins a stored device with its presence and the length of its C2D queue.
    pub fn new(device: &'a Device, presence: &Presence, queued: usize) -> Self {
        let live = presence.get(&device.device_id);
        Self {
            device_id: &device.device_id,
            generation_id: &device.generation_id,
            etag: device.etag(),
            status: device.status,
            status_reason: device.status_reason.as_deref(),
            status_updated_time: device.status_updated_time,
            authentication: &device.authentication,
            connection_state: match live {
                Some(p) if p.connected => "Connected",
                _ => "Disconnected",
            },
            last_activity_time: live.map(|p| p.last_activity),
            cloud_to_device_message_count: queued,
        }
    }
}

fn parse_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|err| ApiError::InvalidArgument(err.to_string()))
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::InvalidArgument(format!("header {name} is not ASCII")))
        })
        .transpose()
}

async fn with_etag(
    state: &AppState,
    device: &Device,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let queued = state.commands.queue_length(&device.device_id).await?;
    let mut response = (
        status,
        ApiJson(DeviceView::new(device, state.registry.presence(), queued)),
    )
        .into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", device.etag())) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

/// `PUT /devices/{id}`: creates without `If-Match` (409 if it exists, also with
/// `If-None-Match: *`), updates with it (412 on a stale etag, `*` forces).
pub async fn put(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<DeviceSpec>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let if_match = header_str(&headers, &header::IF_MATCH)?;
    let if_none_match = header_str(&headers, &header::IF_NONE_MATCH)?;
    let device = match (if_match, if_none_match) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidArgument(
                "If-Match and If-None-Match cannot be combined".into(),
            ));
        }
        (Some(if_match), None) => {
            state
                .registry
                .update(id, spec, IfMatch::parse(if_match))
                .await?
        }
        // Without If-Match a PUT creates; `If-None-Match: *` says so explicitly.
        (None, Some(value)) if value.trim() != "*" => {
            return Err(ApiError::InvalidArgument(
                "If-None-Match supports only `*` (create, fail if the device exists)".into(),
            ));
        }
        (None, _) => state.registry.create(id, spec).await?,
    };
    with_etag(&state, &device, StatusCode::OK).await
}

/// `GET /devices/{id}`.
pub async fn get(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let device = state.registry.get(&parse_id(&id)?).await?;
    with_etag(&state, &device, StatusCode::OK).await
}

/// `DELETE /devices/{id}`, honouring `If-Match`.
pub async fn delete(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let if_match = header_str(&headers, &header::IF_MATCH)?.map(IfMatch::parse);
    state.registry.delete(&id, if_match).await?;
    // The embedded store dropped the queue with the device; a cluster's queues are a
    // stream of their own. A device created again with this id starts empty.
    state.commands.forget(&id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /devices`: a JSON array, at most `x-ms-max-item-count` long; a
/// `x-ms-continuation` response header means more follow.
pub async fn list(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let limit = match header_str(&headers, &MAX_ITEM_COUNT)? {
        None => DEFAULT_PAGE,
        Some(raw) => match raw.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{MAX_ITEM_COUNT} must be an integer from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let after = header_str(&headers, &CONTINUATION)?
        .map(decode_continuation)
        .transpose()?;
    let page = state.registry.list(after.as_ref(), limit).await?;
    let presence = state.registry.presence();
    // One trip to the store for the page's queue lengths, each a count of keys.
    let ids: Vec<DeviceId> = page.devices.iter().map(|d| d.device_id.clone()).collect();
    let queued = state.commands.queue_lengths(&ids).await?;
    let views: Vec<DeviceView<'_>> = page
        .devices
        .iter()
        .zip(queued)
        .map(|(device, queued)| DeviceView::new(device, presence, queued))
        .collect();
    let mut response = ApiJson(views).into_response();
    if let Some(next) = page.next_after {
        let token = URL_SAFE_NO_PAD.encode(next.as_str());
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert(CONTINUATION, value);
        }
    }
    Ok(response)
}

fn decode_continuation(token: &str) -> Result<DeviceId, ApiError> {
    let invalid =
        || ApiError::InvalidArgument(format!("{CONTINUATION} is not a token this hub issued"));
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| invalid())?;
    let id = String::from_utf8(bytes).map_err(|_| invalid())?;
    DeviceId::parse(&id).map_err(|_| invalid())
}
