//! Azure's error response, as every HTTP edge writes it: the status, the JSON body
//! `{"errorCode": <Azure-style number>, "message": "...", "Message":
//! "ErrorCode:<Azure name>;...", "ExceptionMessage": "..."}` and the header
//! `iothub-errorcode: <Azure name>`, which Azure's SDKs turn into typed errors.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Response header: Azure's error code name.
pub const ERROR_CODE_HEADER: HeaderName = HeaderName::from_static("iothub-errorcode");

/// Azure's name for an error code, as in its `Message` (`ErrorCode:<name>;…`) and the
/// `iothub-errorcode` header. Where Azure has the same number, its name; otherwise the
/// closest Azure name, so the SDKs' mapping by status still holds.
pub fn azure_error_name(code: u32) -> &'static str {
    match code {
        400004 => "ArgumentInvalid",
        401002 => "IotHubUnauthorizedAccess",
        401003 => "IotHubUnauthorized",
        403001 => "IotHubUnauthorizedAccess",
        403002 => "IotHubQuotaExceeded",
        403004 => "DeviceMaximumQueueDepthExceeded",
        404000 => "NotFound",
        404001 => "DeviceNotFound",
        404103 => "DeviceNotOnline",
        405000 => "MethodNotAllowed",
        409001 => "DeviceAlreadyExists",
        410001 => "MessageExpired",
        412001 => "PreconditionFailed",
        413001 => "MessageTooLarge",
        415001 => "InvalidProtocolVersion",
        429001 => "ThrottlingException",
        503001 => "ServiceUnavailable",
        504101 => "GatewayTimeout",
        _ => "ServerError",
    }
}

/// The response for an error of `status` with Azure-style `code` and `message` (which
/// must say nothing internal: it is sent as is).
pub fn azure_error(status: StatusCode, code: u32, message: &str) -> Response {
    let name = azure_error_name(code);
    let body = json!({
        "errorCode": code,
        "message": message,
        // The SDKs split on `;` and `:`: the message keeps neither out of
        // Azure's part.
        "Message": format!("ErrorCode:{name};{}", message.replace(';', ",")),
        // Azure puts a tracking id and a time here, which no SDK reads; the same
        // request gets the same answer here, so the message itself.
        "ExceptionMessage": message,
    });
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(ERROR_CODE_HEADER, HeaderValue::from_static(name));
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body was not read, so this connection cannot carry
        // another request; say so, or a pooling client reuses it and fails.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
