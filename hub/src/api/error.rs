//! [`ApiError`]: every failure of the REST API, mapped to an HTTP status and the JSON
//! body `{"errorCode": <Azure-style number>, "message": "...", "Message":
//! "ErrorCode:<Azure name>;...", "ExceptionMessage": "..."}` with the header
//! `iothub-errorcode: <Azure name>`: the first two are the hub's own shape, the rest
//! Azure's, which its service SDKs turn into typed errors (`DeviceNotFoundError`, …).
//! Internal details are logged, never sent.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::auth::service::Scope;
use crate::http::error::azure_error;
use crate::registry::RegistryError;

/// A REST API failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 / 400004: an invalid body, query parameter, header or id.
    #[error("{0}")]
    InvalidArgument(String),
    /// 401 / 401002: no bearer token, or one that does not verify.
    #[error("{0}")]
    Unauthenticated(String),
    /// 401 / 401003: the bearer token has expired.
    #[error("the bearer token has expired")]
    TokenExpired,
    /// 403 / 403001: the token lacks the scope the route needs.
    #[error("the bearer token lacks the scope {0}")]
    MissingScope(Scope),
    /// 401 / 401002: a shared access policy's signature, valid, but the policy lacks
    /// the permission the route needs (Azure answers 401 here, and its service SDKs
    /// raise `UnauthorizedError` for it).
    #[error("the shared access policy {policy} lacks the permission {scope}")]
    PolicyLacksPermission {
        /// The policy that signed.
        policy: String,
        /// What the route needs.
        scope: Scope,
    },
    /// 403 / 403004: the device's C2D queue is full.
    #[error("{0}")]
    QueueFull(String),
    /// 404 / 404103: the device is not online (or not subscribed to methods).
    #[error("{0}")]
    DeviceOffline(String),
    /// 504 / 504101: the device did not answer the method in time.
    #[error("{0}")]
    MethodTimeout(String),
    /// 404 / 404000: no such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// 404 / 404001: no such device.
    #[error("device {0} not found")]
    DeviceNotFound(String),
    /// 404 / 404000: no such resource (enrollment, group, registration); the message
    /// names it.
    #[error("{0}")]
    NotFound(String),
    /// 403 / 403002: a quota of the hub (enrollment groups) is reached.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 405 / 405000: the route exists but not with this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 409 / 409001: the device exists.
    #[error("device {0} already exists")]
    DeviceExists(String),
    /// 410 / 410001: the offset was removed by retention.
    #[error("{0}")]
    Gone(String),
    /// 412 / 412001: If-Match does not match the current etag.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413 / 413001: the body exceeds the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429 / 429001: the request costs more than the hub grants one request (a query
    /// past its time budget).
    #[error("{0}")]
    Throttled(String),
    /// 415 / 415001: the body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503 / 503001: the store does not answer.
    #[error("the store is not available")]
    Unavailable,
    /// 429 / 429001: every slot for long requests (method calls, long-polls, streams)
    /// is taken; retry later.
    #[error(
        "too many long-running requests (method calls, long-polls, streams) at once; retry later"
    )]
    TooManyLongRequests,
    /// 500 / 500001: anything else; the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and Azure-style error code.
    pub fn status_and_code(&self) -> (StatusCode, u32) {
        match self {
            ApiError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, 400004),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, 401002),
            ApiError::TokenExpired => (StatusCode::UNAUTHORIZED, 401003),
            ApiError::MissingScope(_) => (StatusCode::FORBIDDEN, 403001),
            ApiError::PolicyLacksPermission { .. } => (StatusCode::UNAUTHORIZED, 401002),
            ApiError::QueueFull(_) => (StatusCode::FORBIDDEN, 403004),
            ApiError::DeviceOffline(_) => (StatusCode::NOT_FOUND, 404103),
            ApiError::MethodTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, 504101),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, 404000),
            ApiError::DeviceNotFound(_) => (StatusCode::NOT_FOUND, 404001),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, 404000),
            ApiError::QuotaExceeded(_) => (StatusCode::FORBIDDEN, 403002),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 405000),
            ApiError::DeviceExists(_) => (StatusCode::CONFLICT, 409001),
            ApiError::Gone(_) => (StatusCode::GONE, 410001),
            ApiError::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, 412001),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, 413001),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 415001),
            ApiError::Throttled(_) => (StatusCode::TOO_MANY_REQUESTS, 429001),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, 503001),
            ApiError::TooManyLongRequests => (StatusCode::TOO_MANY_REQUESTS, 429001),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, 500001),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        azure_error(status, code, &self.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
            _ => ApiError::InvalidArgument(message),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::InvalidArgument(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::InvalidArgument(rejection.body_text())
    }
}

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::NotFound(id) => ApiError::DeviceNotFound(id.to_string()),
            RegistryError::AlreadyExists(id) => ApiError::DeviceExists(id.to_string()),
            RegistryError::EtagMismatch { .. } => ApiError::PreconditionFailed(err.to_string()),
            RegistryError::Invalid(message) => ApiError::InvalidArgument(message),
            RegistryError::Store(err) => ApiError::Internal(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ERROR_CODE_HEADER;
    use serde_json::json;

    #[tokio::test]
    async fn internal_errors_do_not_leak_their_detail() {
        let response = ApiError::Internal("redb: page 42 checksum".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errorCode"], json!(500001));
        assert_eq!(body["message"], json!("internal error"));
        assert_eq!(
            body["Message"],
            json!("ErrorCode:ServerError;internal error")
        );
        assert!(!body.to_string().contains("redb"), "{body}");
    }

    #[tokio::test]
    async fn errors_carry_azures_message_exception_message_and_header() {
        let response = ApiError::DeviceNotFound("d;1".into()).into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers().get(ERROR_CODE_HEADER).unwrap(),
            "DeviceNotFound"
        );
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errorCode"], json!(404001));
        assert_eq!(body["message"], json!("device d;1 not found"));
        assert_eq!(
            body["Message"],
            json!("ErrorCode:DeviceNotFound;device d,1 not found")
        );
        assert_eq!(body["ExceptionMessage"], json!("device d;1 not found"));
    }
}
