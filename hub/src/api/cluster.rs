//! `GET /cluster`: the cluster's state (NATS nodes, stream and bucket leaders,
//! replicas and their lag) in cluster mode; `{"mode": "embedded"}` otherwise.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::extract::{Authorized, ServiceConnect};
use super::{ApiError, AppState};

/// `GET /cluster`.
pub async fn status(
    _auth: Authorized<ServiceConnect>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Ok(Json(json!({ "mode": "embedded" })));
    };
    let status = cluster.status().await.map_err(|err| {
        tracing::warn!(error = %err, "cluster status unavailable");
        ApiError::Unavailable
    })?;
    Ok(Json(status))
}
