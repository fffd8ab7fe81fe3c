//! The service REST API (axum): routes, shared state, body and concurrency limits,
//! and the JSON error shape. Handlers live one file per resource; extractors in
//! [`extract`] turn every rejection into an [`ApiError`].

mod cluster;
mod commands;
mod devices;
mod error;
mod extract;
mod health;
mod streams;
mod twins;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{delete, get, post, put};

pub use error::ApiError;

use crate::auth::service::ServiceKey;
use crate::gateway::metrics::GatewayMetrics;
use crate::registry::Registry;
use crate::store::StoreHealth;
use crate::telemetry::Telemetry;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Device identities.
    pub registry: Registry,
    /// Verifies bearer tokens.
    pub service_key: Arc<ServiceKey>,
    /// Answers readiness checks.
    pub store: Arc<dyn StoreHealth>,
    /// Gateway counters for `/metrics`.
    pub metrics: Arc<GatewayMetrics>,
    /// Telemetry streams.
    pub telemetry: Arc<Telemetry>,
    /// Device twins.
    pub twins: crate::twins::Twins,
    /// Cloud-to-device messages and direct methods.
    pub commands: crate::commands::Commands,
    /// The NATS cluster, in cluster mode.
    pub nats: Option<crate::store::nats::NatsStore>,
}

/// Limits of the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most requests handled at once; more wait.
    pub max_concurrent_requests: usize,
}

/// The router with every route and layer.
pub fn router(state: AppState, limits: HttpLimits) -> Router {
    Router::new()
        .route("/devices", get(devices::list))
        .route("/cluster", get(cluster::status))
        .route(
            "/devices/{id}",
            get(devices::get).put(devices::put).delete(devices::delete),
        )
        .route("/devices/query", post(twins::query))
        .route("/devices/{id}/messages/deviceBound", post(commands::send))
        .route("/devices/{id}/commands", delete(commands::purge))
        .route("/messages/serviceBound/feedback", get(commands::feedback))
        .route(
            "/messages/serviceBound/feedback/{token}",
            delete(commands::acknowledge),
        )
        .route("/twins/{id}/methods", post(commands::invoke))
        .route(
            "/twins/{id}",
            get(twins::get).patch(twins::patch).put(twins::put),
        )
        .route("/streams/telemetry", get(streams::info))
        .route(
            "/streams/telemetry/partitions/{p}/messages",
            get(streams::read),
        )
        .route(
            "/streams/telemetry/partitions/{p}/ws",
            get(streams::websocket),
        )
        .route(
            "/streams/telemetry/consumergroups/{g}/partitions/{p}/checkpoint",
            put(streams::put_checkpoint),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrent_requests,
        ))
        .with_state(state)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
