//! Ops endpoints: `/healthz` (the process answers), `/readyz` (the store answers)
//! and `/metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// Liveness: answers while the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: answers 200 only if the store completes a read.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
        Err(err) => {
            tracing::warn!(error = %err, "readiness check failed");
            Err(ApiError::Unavailable)
        }
    }
}

/// Prometheus text exposition of the hub's counters.
pub async fn metrics(
    State(state): State<AppState>,
    long_requests: Option<axum::Extension<super::LongRequestSlots>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        (state.metrics)()
            + &state.telemetry.render_metrics()
            + &long_requests
                .map(|slots| slots.render())
                .unwrap_or_default(),
    )
}
