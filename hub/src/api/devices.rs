//! Registry routes: `PUT/GET/DELETE /devices/{id}` and `GET /devices` (paged with
//! `x-ms-max-item-count` and `x-ms-continuation`, or up to `?top=N` in one answer),
//! with etags and `If-Match`; Azure's bulk registry operation `POST /devices`; and
//! `GET /statistics/devices`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::extract::{ApiJson, ApiPath, ApiQuery, Authorized, RegistryRead, RegistryWrite};
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
/// The most devices one `POST /devices` may carry (Azure's limit).
pub const MAX_BULK: usize = 100;

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
    let device = state.registry.current(&parse_id(&id)?).await?;
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

/// Query parameters of `GET /devices`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    /// Azure's `top`: how many devices, 1–1000.
    top: Option<String>,
}

/// `GET /devices`: a JSON array, at most `x-ms-max-item-count` long; a
/// `x-ms-continuation` response header means more follow. Without either paging header
/// the answer holds up to `top` devices (default and maximum 1000) in one array:
/// Azure's service SDKs (`registry.list()`) never follow a continuation.
pub async fn list(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Response, ApiError> {
    let page_size = match header_str(&headers, &MAX_ITEM_COUNT)? {
        None => None,
        Some(raw) => match raw.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{MAX_ITEM_COUNT} must be an integer from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let top = match params.top.as_deref() {
        None => None,
        Some(raw) => match raw.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "top must be an integer from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let paging = page_size.is_some() || headers.contains_key(&CONTINUATION);
    let limit = match (page_size, top) {
        (Some(size), _) => size,
        (None, Some(top)) => top,
        (None, None) if paging => DEFAULT_PAGE,
        (None, None) => MAX_PAGE,
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

/// One entry of `POST /devices`: Azure's `ExportImportDevice`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkEntry {
    id: String,
    import_mode: String,
    /// Azure's field is `eTag`; the Node SDK's `updateDevices` passes its devices'
    /// `etag` through as is.
    #[serde(rename = "eTag", alias = "etag")]
    e_tag: Option<String>,
    tags: Option<Value>,
    properties: Option<Value>,
}

/// What one entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImportMode {
    Create,
    Update,
    UpdateIfMatchEtag,
    Delete,
    DeleteIfMatchEtag,
}

impl ImportMode {
    /// Azure's names, compared case-insensitively (the Node SDK sends `create`,
    /// `Update`, `UpdateIfMatchETag`, `Delete`, `DeleteIfMatchETag`).
    fn parse(raw: &str) -> Option<Self> {
        [
            ("create", ImportMode::Create),
            ("update", ImportMode::Update),
            ("updateIfMatchETag", ImportMode::UpdateIfMatchEtag),
            ("delete", ImportMode::Delete),
            ("deleteIfMatchETag", ImportMode::DeleteIfMatchEtag),
        ]
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(raw))
        .map(|(_, mode)| mode)
    }
}

/// A failed entry, in Azure's `DeviceRegistryOperationError` shape.
fn bulk_error(device_id: &str, operation: &str, err: &ApiError) -> Value {
    let (_, code) = err.status_and_code();
    json!({
        "deviceId": device_id,
        "errorCode": crate::http::error::azure_error_name(code),
        "errorStatus": err.to_string(),
        "operation": operation,
    })
}

/// `POST /devices`: Azure's bulk registry operation. At most 100 entries, each
/// `{id, importMode, eTag?, status?, authentication?, tags?, properties?}`, applied one
/// by one (not as a transaction, like Azure): the answer is `{isSuccessful, errors,
/// warnings}`, 200 when every entry succeeded, else 400 with an error per failed
/// entry.
pub async fn bulk(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    ApiJson(entries): ApiJson<Vec<Value>>,
) -> Result<Response, ApiError> {
    if entries.is_empty() || entries.len() > MAX_BULK {
        return Err(ApiError::InvalidArgument(format!(
            "a bulk operation takes 1 to {MAX_BULK} devices, not {}",
            entries.len()
        )));
    }
    let mut errors = Vec::new();
    for raw in entries {
        let entry: BulkEntry = match serde_json::from_value(raw.clone()) {
            Ok(entry) => entry,
            Err(err) => {
                let id = raw["id"].as_str().unwrap_or_default().to_string();
                errors.push(bulk_error(
                    &id,
                    "",
                    &ApiError::InvalidArgument(format!("invalid entry: {err}")),
                ));
                continue;
            }
        };
        let operation = entry.import_mode.clone();
        if let Err(err) = bulk_entry(&state, entry, raw).await {
            let id = err.0;
            errors.push(bulk_error(&id, &operation, &err.1));
        }
    }
    let status = if errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let body = json!({
        "isSuccessful": errors.is_empty(),
        "errors": errors,
        "warnings": [],
    });
    Ok((status, ApiJson(body)).into_response())
}

/// Applies one bulk entry; on failure, the entry's id and why.
async fn bulk_entry(
    state: &AppState,
    entry: BulkEntry,
    raw: Value,
) -> Result<(), (String, ApiError)> {
    let fail = |err: ApiError| (entry.id.clone(), err);
    let id = parse_id(&entry.id).map_err(fail)?;
    let mode = ImportMode::parse(&entry.import_mode).ok_or_else(|| {
        fail(ApiError::InvalidArgument(format!(
            "importMode {:?} is not supported (create, update, updateIfMatchETag, delete, deleteIfMatchETag)",
            entry.import_mode
        )))
    })?;
    let etag = || match &entry.e_tag {
        Some(etag) => Ok(IfMatch::parse(etag)),
        None => Err(fail(ApiError::InvalidArgument(
            "this importMode needs the entry's eTag".into(),
        ))),
    };
    let spec = || {
        let mut spec: DeviceSpec = serde_json::from_value(raw.clone())
            .map_err(|err| fail(ApiError::InvalidArgument(format!("invalid entry: {err}"))))?;
        // The entry names the device by `id`; a `deviceId` beside it must agree.
        spec.device_id.get_or_insert_with(|| entry.id.clone());
        Ok::<_, (String, ApiError)>(spec)
    };
    match mode {
        ImportMode::Create => {
            state
                .registry
                .create(id.clone(), spec()?)
                .await
                .map_err(|err| fail(err.into()))?;
        }
        ImportMode::Update | ImportMode::UpdateIfMatchEtag => {
            let if_match = match mode {
                ImportMode::Update => IfMatch::Any,
                _ => etag()?,
            };
            state
                .registry
                .update(id.clone(), spec()?, if_match)
                .await
                .map_err(|err| fail(err.into()))?;
        }
        ImportMode::Delete | ImportMode::DeleteIfMatchEtag => {
            let if_match = match mode {
                ImportMode::Delete => IfMatch::Any,
                _ => etag()?,
            };
            state
                .registry
                .delete(&id, Some(if_match))
                .await
                .map_err(|err| fail(err.into()))?;
            state.commands.forget(&id).await;
            return Ok(());
        }
    }
    // Tags and desired properties given with a create or update go to the twin.
    if entry.tags.is_some() || entry.properties.is_some() {
        let mut patch = serde_json::Map::new();
        if let Some(tags) = entry.tags {
            patch.insert("tags".into(), tags);
        }
        if let Some(desired) = entry.properties.and_then(|p| p.get("desired").cloned()) {
            patch.insert("properties".into(), json!({ "desired": desired }));
        }
        state
            .twins
            .patch(&id, Value::Object(patch), None)
            .await
            .map_err(|err| fail(err.into()))?;
    }
    Ok(())
}

/// `GET /statistics/devices`: Azure's registry statistics.
pub async fn statistics(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
) -> Result<ApiJson<Value>, ApiError> {
    let (mut total, mut enabled) = (0u64, 0u64);
    let mut after = None;
    loop {
        let page = state.registry.list(after.as_ref(), MAX_PAGE).await?;
        total += page.devices.len() as u64;
        enabled += page
            .devices
            .iter()
            .filter(|d| d.status == DeviceStatus::Enabled)
            .count() as u64;
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(ApiJson(json!({
        "totalDeviceCount": total,
        "enabledDeviceCount": enabled,
        "disabledDeviceCount": total - enabled,
    })))
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
