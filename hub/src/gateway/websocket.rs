//! MQTT over WebSocket, as Azure IoT Hub serves it on 443: an upgrade at
//! `/$iothub/websocket` with subprotocol `mqtt` on the HTTPS listener runs the same
//! gateway session as a TLS connection, over the WebSocket's binary messages.
//!
//! [`WsStream`] (shared with the other WebSocket protocols) turns the WebSocket into a
//! byte stream. A WebSocket connection
//! counts against `mqtt.max_connections` and in the gateway metrics like a TLS one,
//! not against the HTTP listener's connection cap (it gives its HTTP slot back on
//! upgrade), so the two listeners' limits stay about what they serve.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::GatewayContext;
use super::connection::{self, Transport};
use crate::http::error::azure_error;
use crate::http::websocket::{WsStream, upgrade_parts};

/// Where Azure's device SDKs open MQTT over WebSocket.
pub const PATH: &str = "/$iothub/websocket";

/// What the upgrade handler shares with the TLS and TCP accept loops: the context,
/// the connection slots (`mqtt.max_connections`) and the shutdown signal.
#[derive(Clone)]
pub struct WebSocketGateway {
    pub(super) ctx: Arc<GatewayContext>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for WebSocketGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketGateway").finish_non_exhaustive()
    }
}

impl WebSocketGateway {
    /// The route to merge into the HTTPS listener's router.
    pub fn router(self) -> Router {
        Router::new()
            .route(PATH, get(upgrade))
            .with_state(Arc::new(self))
    }
}

async fn upgrade(
    State(gateway): State<Arc<WebSocketGateway>>,
    ws: WebSocketUpgrade,
    mut request: Request,
) -> Response {
    // The WebSocket is an MQTT connection from here on: it holds an MQTT slot, and
    // releases the HTTP listener's one when this request ends.
    let certificates = upgrade_parts(&mut request);
    let ctx = Arc::clone(&gateway.ctx);
    let Ok(permit) = Arc::clone(&gateway.slots).try_acquire_owned() else {
        ctx.metrics.refused_at_limit.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("websocket refused: mqtt.max_connections reached");
        return azure_error(
            StatusCode::SERVICE_UNAVAILABLE,
            503001,
            "too many MQTT connections; retry later",
        );
    };
    ctx.metrics.accepted.fetch_add(1, Ordering::Relaxed);
    let open = ctx.metrics.open_connection();
    let accepted_at = Instant::now();
    let shutdown = gateway.shutdown.clone();
    // A message may carry a whole packet and a little more (SDKs write one packet per
    // message); anything larger is refused by the WebSocket layer before buffering.
    let max_message = ctx.max_packet_size.saturating_add(64 * 1024);
    // Azure's SDKs ask for `mqtt`; a client that names no subprotocol is served too.
    ws.protocols(["mqtt"])
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| async move {
            let _held = (open, permit);
            let stream = WsStream::new(socket);
            connection::serve(stream, certificates, ctx, shutdown, accepted_at).await;
        })
}

impl Transport for WsStream {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        // The WebSocket buffers frames itself: read directly.
        std::future::ready(Ok(()))
    }
}
