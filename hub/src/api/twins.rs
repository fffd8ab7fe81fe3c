//! Twin routes: `GET/PATCH/PUT /twins/{id}` (with `If-Match`) and
//! `POST /devices/query` (paged with `x-ms-max-item-count` / `x-ms-continuation`).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use super::devices::{CONTINUATION, MAX_ITEM_COUNT};
use super::extract::{ApiJson, ApiPath, Authorized, RegistryRead, RegistryWrite};
use super::{ApiError, AppState};
use crate::registry::{DeviceId, IfMatch};
use crate::twins::{self, TwinError, TwinView, query};

impl From<TwinError> for ApiError {
    fn from(err: TwinError) -> Self {
        match err {
            TwinError::NotFound(id) => ApiError::DeviceNotFound(id.to_string()),
            TwinError::Invalid(_) | TwinError::BadRequest(_) => {
                ApiError::InvalidArgument(err.to_string())
            }
            TwinError::EtagMismatch(_) => ApiError::PreconditionFailed(err.to_string()),
            TwinError::Registry(err) => err.into(),
            TwinError::Store(detail) => ApiError::Internal(detail),
            TwinError::Contended(_) => ApiError::Throttled(err.to_string()),
            TwinError::QueryBudget(_) => ApiError::Throttled(format!(
                "{err}; narrow the query with WHERE or ask for fewer results"
            )),
        }
    }
}

/// Response header of `POST /devices/query`: `twin` or `raw`.
pub const ITEM_TYPE: HeaderName = HeaderName::from_static("x-ms-item-type");
/// The largest query page; larger requests are clamped to it.
const MAX_QUERY_PAGE: usize = 1000;

fn parse_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|err| ApiError::InvalidArgument(err.to_string()))
}

fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    headers
        .get(header::IF_MATCH)
        .map(|v| {
            v.to_str()
                .map(IfMatch::parse)
                .map_err(|_| ApiError::InvalidArgument("If-Match is not ASCII".into()))
        })
        .transpose()
}

/// Adds `cloudToDeviceMessageCount` (the length of each device's C2D queue, which the
/// twin service does not know) to twin documents.
async fn with_queue_counts(state: &AppState, twins: &mut [Value]) -> Result<(), ApiError> {
    let ids: Vec<DeviceId> = twins
        .iter()
        .filter_map(|twin| twin["deviceId"].as_str())
        .filter_map(|id| DeviceId::parse(id).ok())
        .collect();
    let counts = state.commands.queue_lengths(&ids).await?;
    let mut counts = counts.into_iter();
    // The ids were taken in order from the documents that have one.
    for twin in twins {
        let has_id = twin["deviceId"]
            .as_str()
            .is_some_and(|id| DeviceId::parse(id).is_ok());
        if let (true, Some(object)) = (has_id, twin.as_object_mut())
            && let Some(count) = counts.next()
        {
            object.insert("cloudToDeviceMessageCount".into(), Value::from(count));
        }
    }
    Ok(())
}

async fn respond(state: &AppState, view: &TwinView) -> Result<Response, ApiError> {
    let mut body = [twins::twin_json(
        &view.device,
        &view.twin,
        state.registry.presence(),
    )];
    with_queue_counts(state, &mut body).await?;
    let [body] = body;
    let mut response = ApiJson(body).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", twins::etag(&view.twin))) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    Ok(response)
}

/// `GET /twins/{id}`.
pub async fn get(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let view = state.twins.get(&parse_id(&id)?).await?;
    respond(&state, &view).await
}

/// `PATCH /twins/{id}`: merge-patch tags and desired properties.
pub async fn patch(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let view = state
        .twins
        .patch(&parse_id(&id)?, body, if_match(&headers)?)
        .await?;
    respond(&state, &view).await
}

/// `PUT /twins/{id}`: replace tags and desired properties.
pub async fn put(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let view = state
        .twins
        .replace(&parse_id(&id)?, body, if_match(&headers)?)
        .await?;
    respond(&state, &view).await
}

/// Body of `POST /devices/query`.
#[derive(Debug, Deserialize)]
pub struct QueryBody {
    query: String,
}

/// `POST /devices/query`.
pub async fn query(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<QueryBody>,
) -> Result<Response, ApiError> {
    let parsed =
        query::parse(&body.query).map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
    // Above the maximum is clamped (Azure does the same; its SDKs let callers ask
    // for any page size), zero or garbage refused.
    let limit = match headers
        .get(&MAX_ITEM_COUNT)
        .map(|v| v.to_str().map(str::trim))
    {
        None => 100,
        Some(Ok(raw)) => match raw.parse::<u64>() {
            Ok(n) if n >= 1 => usize::try_from(n)
                .unwrap_or(MAX_QUERY_PAGE)
                .min(MAX_QUERY_PAGE),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{MAX_ITEM_COUNT} must be a positive integer (pages hold at most {MAX_QUERY_PAGE})"
                )));
            }
        },
        Some(Err(_)) => {
            return Err(ApiError::InvalidArgument(format!(
                "{MAX_ITEM_COUNT} is not ASCII"
            )));
        }
    };
    let skip = match headers.get(&CONTINUATION) {
        None => 0,
        Some(raw) => raw
            .to_str()
            .ok()
            .and_then(|t| URL_SAFE_NO_PAD.decode(t.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("skip:").and_then(|n| n.parse().ok()))
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!("{CONTINUATION} is not a token this hub issued"))
            })?,
    };
    let page = state.twins.query(&parsed, skip, limit).await?;
    let whole_twins = parsed.selection == query::Selection::All;
    let mut items = page.items;
    if whole_twins {
        with_queue_counts(&state, &mut items).await?;
    }
    let mut response = ApiJson(Value::Array(items)).into_response();
    // What the items are, as Azure says it: whole twins, or rows of projections and
    // aggregates. The SDKs' `nextAsTwin` reads twins either way.
    response.headers_mut().insert(
        ITEM_TYPE,
        HeaderValue::from_static(if whole_twins { "twin" } else { "raw" }),
    );
    if let Some(next) = page.next_skip
        && let Ok(value) = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(format!("skip:{next}")))
    {
        response.headers_mut().insert(CONTINUATION, value);
    }
    Ok(response)
}
