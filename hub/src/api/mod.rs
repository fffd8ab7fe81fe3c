//! The service REST API (axum): routes, shared state, body and concurrency limits,
//! and the JSON error shape. Handlers live one file per resource; extractors in
//! [`extract`] turn every rejection into an [`ApiError`]; the listener (connection
//! cap, header timeout, graceful shutdown) is [`crate::http::serve`], shared with the
//! other HTTP-based edges.
//!
//! Requests fall in three classes with limits of their own, so that one class cannot
//! starve another: long requests (direct-method calls, telemetry long-polls and
//! WebSocket streams, feedback long-polls) take a slot of `http.max_long_requests` or
//! get 429 at once; short requests wait for one of `http.max_concurrent_requests`;
//! the probes `/healthz`, `/readyz` and `/metrics` have no limit (only the connection
//! cap, which long requests cannot fill: they have fewer slots than it).

mod cluster;
mod commands;
mod devices;
mod error;
mod extract;
mod health;
mod provisioning;
mod routing;
mod streams;
mod twins;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use error::ApiError;

use crate::auth::service::ServiceKey;
use crate::registry::Registry;
use crate::storage::StoreHealth;
use crate::telemetry::Telemetry;

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Device identities.
    pub registry: Registry,
    /// Verifies bearer tokens.
    pub service_key: Arc<ServiceKey>,
    /// Verifies shared access signatures of Azure-style policies.
    pub policies: Arc<crate::auth::policy::Policies>,
    /// Answers readiness checks.
    pub store: Arc<dyn StoreHealth>,
    /// The device edges' counters for `/metrics`.
    pub metrics: MetricsText,
    /// Telemetry streams.
    pub telemetry: Arc<Telemetry>,
    /// Device twins.
    pub twins: crate::twins::Twins,
    /// Cloud-to-device messages and direct methods.
    pub commands: crate::commands::Commands,
    /// Enrollments and registrations (service API and HTTPS device contract).
    pub provisioning: crate::provisioning::Provisioning,
    /// The cluster's state for `GET /cluster`, in cluster mode.
    pub cluster: Option<Arc<dyn crate::storage::ClusterView>>,
    /// Routes, endpoints and the hub's extra streams (embedded mode).
    pub routing: Option<crate::routing::Routing>,
}

/// Renders counters as Prometheus text, for `/metrics`.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Limits of the HTTP edge.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most short requests handled at once; more wait.
    pub max_concurrent_requests: usize,
    /// Most long requests at once; more get 429.
    pub max_long_requests: usize,
}

/// A slot of `max_long_requests`, held by a long request while it runs. It is an
/// extension of the request so a WebSocket can keep it for the stream's lifetime.
#[derive(Debug, Clone)]
pub struct LongRequestSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The long-request slots, for `/metrics`.
#[derive(Debug, Clone)]
pub struct LongRequestSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

impl LongRequestSlots {
    /// Prometheus text: long requests running and their limit.
    pub fn render(&self) -> String {
        let running = self.max.saturating_sub(self.slots.available_permits());
        format!(
            "# HELP hub_http_long_requests Long HTTP requests (method calls, long-polls, streams) running.\n\
             # TYPE hub_http_long_requests gauge\n\
             hub_http_long_requests {running}\n\
             # HELP hub_http_long_requests_limit Most long HTTP requests at once (http.max_long_requests).\n\
             # TYPE hub_http_long_requests_limit gauge\n\
             hub_http_long_requests_limit {}\n",
            self.max
        )
    }
}

/// Takes a long-request slot or answers 429 (429001) at once: a waiting long request
/// would hold its connection for nothing.
async fn long_request_slot(
    State(slots): State<Arc<Semaphore>>,
    mut request: Request,
    next: Next,
) -> Response {
    match slots.try_acquire_owned() {
        Ok(slot) => {
            let slot = LongRequestSlot(Arc::new(slot));
            // The extension is dropped with the request's parts once the extractors
            // ran; this copy holds the slot until the response is ready.
            request.extensions_mut().insert(slot.clone());
            let response = next.run(request).await;
            drop(slot);
            response
        }
        Err(_) => ApiError::TooManyLongRequests.into_response(),
    }
}

/// The router with every route and layer.
pub fn router(state: AppState, limits: HttpLimits) -> Router {
    let long_slots = Arc::new(Semaphore::new(limits.max_long_requests));
    let long = Router::new()
        .route("/messages/serviceBound/feedback", get(commands::feedback))
        .route("/twins/{id}/methods", post(commands::invoke))
        .route(
            "/streams/{stream}/partitions/{p}/messages",
            get(streams::read),
        )
        .route(
            "/streams/{stream}/partitions/{p}/ws",
            get(streams::websocket),
        )
        .layer(middleware::from_fn_with_state(
            Arc::clone(&long_slots),
            long_request_slot,
        ));
    let probes = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .layer(axum::Extension(LongRequestSlots {
            slots: long_slots,
            max: limits.max_long_requests,
        }));
    Router::new()
        .route("/devices", get(devices::list).post(devices::bulk))
        // Azure's service SDKs list with `GET /devices/?api-version=…`.
        .route("/devices/", get(devices::list).post(devices::bulk))
        .route("/statistics/devices", get(devices::statistics))
        .route("/cluster", get(cluster::status))
        .route(
            "/devices/{id}",
            get(devices::get).put(devices::put).delete(devices::delete),
        )
        .route("/devices/query", post(twins::query))
        .route("/devices/{id}/messages/deviceBound", post(commands::send))
        .route("/devices/{id}/commands", delete(commands::purge))
        .route(
            "/messages/serviceBound/feedback/{token}",
            delete(commands::acknowledge),
        )
        .route(
            "/messages/serviceBound/feedback/{token}/abandon",
            post(commands::abandon),
        )
        .route(
            "/twins/{id}",
            get(twins::get).patch(twins::patch).put(twins::put),
        )
        .route(
            "/enrollmentGroups/{id}",
            get(provisioning::get_group)
                .put(provisioning::put_group)
                .delete(provisioning::delete_group),
        )
        .route("/enrollmentGroups/query", post(provisioning::query_groups))
        .route(
            "/enrollments/{id}",
            get(provisioning::get_individual)
                .put(provisioning::put_individual)
                .delete(provisioning::delete_individual),
        )
        .route("/enrollments/query", post(provisioning::query_individuals))
        .route(
            "/registrations/{id}",
            get(provisioning::get_registration).delete(provisioning::delete_registration),
        )
        .route(
            "/registrations/{id}/query",
            post(provisioning::query_registrations),
        )
        .route(
            "/{scope}/registrations/{id}/register",
            put(provisioning::device_register),
        )
        .route(
            "/{scope}/registrations/{id}/operations/{operation}",
            get(provisioning::device_operation),
        )
        .route("/streams/{stream}", get(streams::info))
        .route(
            "/streams/{stream}/consumergroups/{g}/partitions/{p}/checkpoint",
            put(streams::put_checkpoint),
        )
        .route(
            "/configuration/routing",
            get(routing::get).put(routing::put),
        )
        .route("/configuration/routing/test", post(routing::test))
        // Only the routes above wait for a short-request slot; the merged ones have
        // their own limit (long) or none (probes).
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrent_requests,
        ))
        .merge(long)
        .merge(probes)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
