//! AMQP over WebSockets on the HTTPS listener (subprotocol `AMQPWSB10`): the
//! `AmqpWs` transports of Azure's service SDK (`/$iothub/websocket`, shared with MQTT
//! over WebSockets and told apart by the subprotocol) and of the Event Hubs SDKs
//! (`/$servicebus/websocket`). Binary messages carry the AMQP byte stream
//! ([`WsStream`], shared with MQTT over WebSockets); the connection is then served as
//! one over TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use tokio::sync::watch;

use super::AmqpContext;
use super::connection::serve_stream;
use crate::http::websocket::WsStream;

/// The IoT Hub service SDK's path (MQTT over WebSockets uses it too).
pub const IOTHUB_PATH: &str = "/$iothub/websocket";
/// The Event Hubs SDKs' path.
pub const SERVICEBUS_PATH: &str = "/$servicebus/websocket";
/// The subprotocol AMQP clients ask for.
pub const SUBPROTOCOL: &str = "AMQPWSB10";

/// Whether an upgrade request asks for AMQP (`AMQPWSB10` among its subprotocols).
pub fn wants_amqp(headers: &HeaderMap) -> bool {
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim().eq_ignore_ascii_case(SUBPROTOCOL))
}

#[derive(Debug, Clone)]
struct WsState {
    context: Arc<AmqpContext>,
    stopped: watch::Receiver<bool>,
}

/// The AMQP WebSocket routes for the HTTPS listener: `(iothub, servicebus)`. The
/// second is merged into the listener's router; the first is for the composition
/// root to call for `/$iothub/websocket` requests that ask for `AMQPWSB10` (that path
/// is MQTT's otherwise).
pub fn routers(context: Arc<AmqpContext>, stopped: watch::Receiver<bool>) -> (Router, Router) {
    let state = WsState { context, stopped };
    (
        Router::new()
            .route(IOTHUB_PATH, get(upgrade))
            .with_state(state.clone()),
        Router::new()
            .route(SERVICEBUS_PATH, get(upgrade))
            .with_state(state),
    )
}

async fn upgrade(State(state): State<WsState>, ws: WebSocketUpgrade, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    // One AMQP frame per message at most, with room for a WebSocket's own framing.
    let max_message = state.context.limits.max_frame_size as usize + 64 * 1024;
    ws.protocols([SUBPROTOCOL])
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| {
            serve_stream(state.context, WsStream::new(socket), peer, state.stopped)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subprotocol_is_found_among_several() {
        let mut headers = HeaderMap::new();
        headers.insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        assert!(!wants_amqp(&headers));
        headers.insert("sec-websocket-protocol", "amqp, AMQPWSB10".parse().unwrap());
        assert!(wants_amqp(&headers));
    }
}
