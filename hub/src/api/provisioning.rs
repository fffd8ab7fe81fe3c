//! Provisioning routes. The service API in the shapes of Azure's provisioning
//! service (api-version 2021-10-01): `PUT|GET|DELETE /enrollmentGroups/{id}`,
//! `/enrollments/{id}`, `POST …/query`, `GET|DELETE /registrations/{id}`,
//! `POST /registrations/{groupId}/query`, under `provisioning:read|write`. And the
//! HTTPS device contract: `PUT /{idScope}/registrations/{id}/register` and
//! `GET /{idScope}/registrations/{id}/operations/{operationId}`, authorised by the
//! device's registration SAS token, answered like the MQTT topics.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::extract::{ApiJson, ApiPath, Authorized, ProvisioningRead, ProvisioningWrite};
use super::{ApiError, AppState};
use crate::provisioning::device::{DeviceReply, parse_register_body};
use crate::provisioning::{
    EnrollmentKind, EnrollmentSpec, Provisioning, ProvisioningError, Registration,
};
use crate::registry::IfMatch;

impl From<ProvisioningError> for ApiError {
    fn from(err: ProvisioningError) -> Self {
        match err {
            ProvisioningError::BadRequest(_) | ProvisioningError::InvalidRegistrationId { .. } => {
                ApiError::InvalidArgument(err.to_string())
            }
            ProvisioningError::Unauthorized(message) => ApiError::Unauthenticated(message),
            ProvisioningError::NotFound(message) => ApiError::NotFound(message),
            ProvisioningError::PreconditionFailed(message) => ApiError::PreconditionFailed(message),
            ProvisioningError::Throttled => ApiError::Throttled(err.to_string()),
            ProvisioningError::Limit(message) => ApiError::QuotaExceeded(message),
            ProvisioningError::Internal(message) => ApiError::Internal(message),
        }
    }
}

fn if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, ApiError> {
    headers
        .get(header::IF_MATCH)
        .map(|v| {
            v.to_str()
                .map(IfMatch::parse)
                .map_err(|_| ApiError::InvalidArgument("header if-match is not ASCII".into()))
        })
        .transpose()
}

fn with_etag(json: Value, etag: &str) -> Response {
    let mut response = axum::Json(json).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

async fn put_enrollment(
    state: &AppState,
    kind: EnrollmentKind,
    id: &str,
    headers: &HeaderMap,
    spec: EnrollmentSpec,
) -> Result<Response, ApiError> {
    let stored = state
        .provisioning
        .put_enrollment(kind, id, spec, if_match(headers)?)
        .await?;
    Ok(with_etag(stored.to_json(kind), &stored.etag()))
}

/// `PUT /enrollmentGroups/{id}`: create or replace an enrollment group.
pub async fn put_group(
    _auth: Authorized<ProvisioningWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<EnrollmentSpec>,
) -> Result<Response, ApiError> {
    put_enrollment(&state, EnrollmentKind::Group, &id, &headers, spec).await
}

/// `PUT /enrollments/{id}`: create or replace an individual enrollment.
pub async fn put_individual(
    _auth: Authorized<ProvisioningWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(spec): ApiJson<EnrollmentSpec>,
) -> Result<Response, ApiError> {
    put_enrollment(&state, EnrollmentKind::Individual, &id, &headers, spec).await
}

async fn get_enrollment(
    state: &AppState,
    kind: EnrollmentKind,
    id: &str,
) -> Result<Response, ApiError> {
    let enrollment = state.provisioning.enrollment(kind, id).await?;
    Ok(with_etag(enrollment.to_json(kind), &enrollment.etag()))
}

/// `GET /enrollmentGroups/{id}`.
pub async fn get_group(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    get_enrollment(&state, EnrollmentKind::Group, &id).await
}

/// `GET /enrollments/{id}`.
pub async fn get_individual(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    get_enrollment(&state, EnrollmentKind::Individual, &id).await
}

/// `DELETE /enrollmentGroups/{id}` (If-Match honoured).
pub async fn delete_group(
    _auth: Authorized<ProvisioningWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    state
        .provisioning
        .delete_enrollment(EnrollmentKind::Group, &id, if_match(&headers)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /enrollments/{id}` (If-Match honoured).
pub async fn delete_individual(
    _auth: Authorized<ProvisioningWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    state
        .provisioning
        .delete_enrollment(EnrollmentKind::Individual, &id, if_match(&headers)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list(state: &AppState, kind: EnrollmentKind) -> Result<Response, ApiError> {
    let all = state.provisioning.enrollments(kind).await?;
    let json: Vec<Value> = all.iter().map(|e| e.to_json(kind)).collect();
    Ok(axum::Json(json).into_response())
}

/// `POST /enrollmentGroups/query`: every group (the query body is not interpreted:
/// Azure's only documented query is `*`).
pub async fn query_groups(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    list(&state, EnrollmentKind::Group).await
}

/// `POST /enrollments/query`: every individual enrollment.
pub async fn query_individuals(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    list(&state, EnrollmentKind::Individual).await
}

/// `GET /registrations/{id}`: a registration's state.
pub async fn get_registration(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let registration = state.provisioning.registration(&id).await?;
    Ok(with_etag(registration.state_json(), &registration.etag()))
}

/// `DELETE /registrations/{id}`: forget a registration (its device stays).
pub async fn delete_registration(
    _auth: Authorized<ProvisioningWrite>,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.provisioning.delete_registration(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /registrations/{groupId}/query`: the registrations of a group.
pub async fn query_registrations(
    _auth: Authorized<ProvisioningRead>,
    State(state): State<AppState>,
    ApiPath(group): ApiPath<String>,
) -> Result<Response, ApiError> {
    let registrations = state.provisioning.registrations(Some(&group)).await?;
    let json: Vec<Value> = registrations.iter().map(Registration::state_json).collect();
    Ok(axum::Json(json).into_response())
}

/// Writes a device reply: status, JSON body, `Retry-After`.
fn device_response(reply: DeviceReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(reply.body.clone())).into_response();
    if let Some(seconds) = reply.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

async fn attested(
    provisioning: &Provisioning,
    headers: &HeaderMap,
    scope: &str,
    registration_id: &str,
) -> Result<crate::provisioning::Attested, ProvisioningError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ProvisioningError::Unauthorized(
                "missing Authorization: SharedAccessSignature … header".into(),
            )
        })?;
    provisioning
        .attest(scope, registration_id, token, crate::auth::unix_now())
        .await
}

/// `PUT /{idScope}/registrations/{id}/register`: 202 with the operation to poll.
pub async fn device_register(
    State(state): State<AppState>,
    ApiPath((scope, registration_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let provisioning = &state.provisioning;
    let reply = async {
        let attested = attested(provisioning, &headers, &scope, &registration_id).await?;
        let payload = parse_register_body(&body, &registration_id)?;
        provisioning.register(&attested, payload).await
    }
    .await;
    device_response(match reply {
        Ok(registration) => DeviceReply::assigning(&registration),
        Err(err) => DeviceReply::error(&err),
    })
}

/// `GET /{idScope}/registrations/{id}/operations/{operationId}`.
pub async fn device_operation(
    State(state): State<AppState>,
    ApiPath((scope, registration_id, operation_id)): ApiPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let provisioning = &state.provisioning;
    let reply = async {
        let attested = attested(provisioning, &headers, &scope, &registration_id).await?;
        provisioning.operation(&attested, &operation_id).await
    }
    .await;
    device_response(match reply {
        Ok(registration) => DeviceReply::outcome(&registration),
        Err(err) => DeviceReply::error(&err),
    })
}
