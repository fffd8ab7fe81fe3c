//! Extractors whose rejections are [`ApiError`]s: JSON bodies, path parameters, and
//! [`Authorized`], which checks the credential (a bearer token or a shared access
//! policy's SAS token) and the scope a handler declares.

use std::marker::PhantomData;

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::{ApiError, AppState};
use crate::auth::policy::PolicyError;
use crate::auth::service::{Scope, TokenError};

/// `axum::Json` with [`ApiError`] rejections (400004, 413001, 415001).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` with [`ApiError`] rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// `axum::extract::Query` with [`ApiError`] rejections.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// A scope a route requires, as a type so handlers declare it in their signature.
pub trait RequiredScope: Send + Sync + 'static {
    /// The scope.
    const SCOPE: Scope;
}

/// Marker: the route needs `registry:read`.
#[derive(Debug)]
pub struct RegistryRead;
impl RequiredScope for RegistryRead {
    const SCOPE: Scope = Scope::RegistryRead;
}

/// Marker: the route needs `registry:write`.
#[derive(Debug)]
pub struct RegistryWrite;
impl RequiredScope for RegistryWrite {
    const SCOPE: Scope = Scope::RegistryWrite;
}

/// Marker: the route needs `service:connect`.
#[derive(Debug)]
pub struct ServiceConnect;
impl RequiredScope for ServiceConnect {
    const SCOPE: Scope = Scope::ServiceConnect;
}

/// Marker: the route needs `provisioning:read`.
#[derive(Debug)]
pub struct ProvisioningRead;
impl RequiredScope for ProvisioningRead {
    const SCOPE: Scope = Scope::ProvisioningRead;
}

/// Marker: the route needs `provisioning:write`.
#[derive(Debug)]
pub struct ProvisioningWrite;
impl RequiredScope for ProvisioningWrite {
    const SCOPE: Scope = Scope::ProvisioningWrite;
}

/// Proof that the request carries a valid service token with scope `S`.
#[derive(Debug)]
pub struct Authorized<S>(PhantomData<S>);

/// The subprotocol a browser's WebSocket names to be served (it cannot set headers on
/// a WebSocket, so it offers this and its credential as subprotocols).
pub const WEBSOCKET_PROTOCOL: &str = "hub.v1";
/// The prefix of the subprotocol carrying the credential: `hub.auth.` + base64url (no
/// padding) of what the Authorization header would hold.
const WEBSOCKET_AUTH_PREFIX: &str = "hub.auth.";
/// The longest credential taken from a subprotocol (a SAS token or a JWT is far
/// shorter); longer ones are refused before decoding.
const MAX_WEBSOCKET_CREDENTIAL: usize = 8 * 1024;

/// The credential of a WebSocket upgrade that names it in `Sec-WebSocket-Protocol`
/// (`hub.auth.<base64url>`), decoded; `None` when no subprotocol carries one.
fn websocket_credential(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let malformed = || ApiError::Unauthenticated("malformed hub.auth subprotocol".into());
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| protocol.trim().strip_prefix(WEBSOCKET_AUTH_PREFIX));
    let Some(encoded) = offered else {
        return Ok(None);
    };
    if encoded.len() > MAX_WEBSOCKET_CREDENTIAL {
        return Err(malformed());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| malformed())?;
    String::from_utf8(bytes).map(Some).map_err(|_| malformed())
}

impl<S: RequiredScope> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let value = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => value
                .to_str()
                .map_err(|_| ApiError::Unauthenticated("malformed Authorization header".into()))?
                .to_string(),
            None => websocket_credential(&parts.headers)?
                .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))?,
        };
        let value = value.as_str();
        let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("SharedAccessSignature") {
            let (policy, scopes) = state
                .policies
                .verify(value, parts.uri.path(), crate::auth::unix_now())
                .map_err(|err| match err {
                    PolicyError::Expired => ApiError::TokenExpired,
                    other => {
                        tracing::debug!(reason = %other, "refused shared access signature");
                        ApiError::Unauthenticated(other.to_string())
                    }
                })?;
            if !scopes.contains(&S::SCOPE) {
                return Err(ApiError::PolicyLacksPermission {
                    policy: policy.to_string(),
                    scope: S::SCOPE,
                });
            }
            tracing::debug!(%policy, scope = %S::SCOPE, "authorized request");
            return Ok(Self(PhantomData));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthenticated(
                "the Authorization header must be `Bearer <token>` or `SharedAccessSignature …`"
                    .into(),
            ));
        }
        let token = credential.trim();
        let claims = state.service_key.verify(token).map_err(|err| match err {
            TokenError::Expired => ApiError::TokenExpired,
            TokenError::Invalid(reason) => {
                tracing::debug!(%reason, "refused service token");
                ApiError::Unauthenticated("invalid bearer token".into())
            }
        })?;
        if !claims.has(S::SCOPE) {
            return Err(ApiError::MissingScope(S::SCOPE));
        }
        tracing::debug!(subject = %claims.sub, scope = %S::SCOPE, "authorized request");
        Ok(Self(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn offered(protocols: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(protocols).unwrap(),
        );
        headers
    }

    #[test]
    fn a_websocket_credential_is_read_from_its_subprotocol_and_bounded() {
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("Bearer abc.def");
        let headers = offered(&format!("hub.v1, hub.auth.{encoded}"));
        assert_eq!(
            websocket_credential(&headers).unwrap().as_deref(),
            Some("Bearer abc.def")
        );
        assert_eq!(websocket_credential(&offered("mqtt")).unwrap(), None);
        assert!(websocket_credential(&offered("hub.v1, hub.auth.!!!")).is_err());
        let huge = format!("hub.auth.{}", "A".repeat(MAX_WEBSOCKET_CREDENTIAL + 4));
        assert!(websocket_credential(&offered(&huge)).is_err());
    }
}
