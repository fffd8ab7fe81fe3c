//! Twin routes: `GET/PATCH/PUT /twins/{id}` (with `If-Match`) and
//! `POST /devices/query` (paged with `x-ms-max-item-count` / `x-ms-continuation`).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
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

fn respond(state: &AppState, view: &TwinView) -> Response {
    let body = twins::twin_json(&view.device, &view.twin, state.registry.presence());
    let mut response = ApiJson(body).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", twins::etag(&view.twin))) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// `GET /twins/{id}`.
pub async fn get(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let view = state.twins.get(&parse_id(&id)?).await?;
    Ok(respond(&state, &view))
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
    Ok(respond(&state, &view))
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
    Ok(respond(&state, &view))
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
    let limit = match headers
        .get(&MAX_ITEM_COUNT)
        .map(|v| v.to_str().map(str::trim))
    {
        None => 100,
        Some(Ok(raw)) => match raw.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "{MAX_ITEM_COUNT} must be an integer from 1 to 1000"
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
    let mut response = ApiJson(Value::Array(page.items)).into_response();
    if let Some(next) = page.next_skip
        && let Ok(value) = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(format!("skip:{next}")))
    {
        response.headers_mut().insert(CONTINUATION, value);
    }
    Ok(response)
}
