//! Routing configuration routes: `GET|PUT /configuration/routing` (Azure's routing
//! JSON; a PUT is validated, stored and in force at once) and `POST
//! /configuration/routing/test` (which routes a sample message takes, in the shape
//! of Azure's "test all routes").

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiJson, Authorized, RegistryRead, RegistryWrite};
use super::{ApiError, AppState};
use crate::routing::{Routing, RoutingError, Source, TestMessage, config};

impl From<RoutingError> for ApiError {
    fn from(err: RoutingError) -> Self {
        match err {
            RoutingError::Invalid(err) => ApiError::InvalidArgument(err.to_string()),
            RoutingError::Store(_) => ApiError::Unavailable,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn routing(state: &AppState) -> Result<&Routing, ApiError> {
    state.routing.as_ref().ok_or_else(|| {
        ApiError::InvalidArgument("routing is not served in cluster mode yet".into())
    })
}

/// `GET /configuration/routing`.
pub async fn get(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
) -> Result<Json<config::RoutingConfig>, ApiError> {
    Ok(Json(routing(&state)?.config()))
}

/// `PUT /configuration/routing`: the whole configuration.
pub async fn put(
    _auth: Authorized<RegistryWrite>,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<config::RoutingConfig>, ApiError> {
    let routing = routing(&state)?;
    let config = config::parse(&body).map_err(RoutingError::from)?;
    Ok(Json(routing.set_config(config).await?))
}

/// The sample message of a routing test.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SampleMessage {
    /// The body: a string as is, anything else as its JSON text.
    body: Value,
    /// Application properties.
    app_properties: BTreeMap<String, String>,
    /// System properties (`contentType`, `contentEncoding`, …).
    system_properties: BTreeMap<String, String>,
}

/// `POST /configuration/routing/test` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestRequest {
    /// The source the sample comes from (default `DeviceMessages`).
    #[serde(default)]
    routing_source: Option<Source>,
    /// The sample.
    #[serde(default)]
    message: SampleMessage,
    /// The device twin conditions read (`{"tags": …, "properties": {…}}`).
    #[serde(default)]
    twin: Option<Value>,
    /// The sending device (`$connectionDeviceId`); default `sample-device`.
    #[serde(default)]
    device_id: Option<String>,
}

/// `POST /configuration/routing/test`: `{"routes": [{"properties": route}, …]}`, the
/// enabled routes the message takes (with the fallback route when it goes there).
pub async fn test(
    _auth: Authorized<RegistryRead>,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TestRequest>,
) -> Result<Json<Value>, ApiError> {
    let routing = routing(&state)?;
    let source = request.routing_source.unwrap_or(Source::DeviceMessages);
    let device_id = request.device_id.unwrap_or_else(|| "sample-device".into());
    let mut system_properties = request.message.system_properties;
    system_properties
        .entry("iothub-connection-device-id".into())
        .or_insert_with(|| device_id.clone());
    let sample = TestMessage {
        device_id,
        body: match request.message.body {
            Value::String(text) => text,
            Value::Null => String::new(),
            other => other.to_string(),
        },
        app_properties: request.message.app_properties,
        system_properties,
    };
    let matched = routing.test(source, &sample, request.twin);
    let mut routes: Vec<Value> = matched
        .routes
        .iter()
        .map(|route| json!({ "properties": route }))
        .collect();
    if matched.fallback
        && let Some(fallback) = routing.fallback()
    {
        routes.push(json!({ "properties": fallback }));
    }
    Ok(Json(json!({ "routes": routes })))
}
