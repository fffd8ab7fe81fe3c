//! AMQP over WebSockets on the HTTPS listener (subprotocol `AMQPWSB10`): the
//! `AmqpWs` transports of Azure's service SDK (`/$iothub/websocket`, shared with MQTT
//! over WebSockets and told apart by the subprotocol) and of the Event Hubs SDKs
//! (`/$servicebus/websocket`). Binary messages carry the AMQP byte stream; the
//! connection is then served as one over TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::AmqpContext;
use super::connection::serve_stream;

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
        .on_upgrade(move |socket| serve_socket(state, socket, peer))
}

/// Pumps the WebSocket's binary messages to and from an in-memory pipe whose other end
/// is served as an AMQP connection; ends when either side ends.
async fn serve_socket(state: WsState, socket: WebSocket, peer: SocketAddr) {
    let (amqp_end, pump_end) = tokio::io::duplex(64 * 1024);
    let connection = tokio::spawn(serve_stream(
        Arc::clone(&state.context),
        amqp_end,
        peer,
        state.stopped.clone(),
    ));
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut from_amqp, mut to_amqp) = tokio::io::split(pump_end);
    let inbound = async {
        while let Some(Ok(message)) = ws_rx.next().await {
            match message {
                Message::Binary(data) => {
                    if to_amqp.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                // Text is not AMQP; pings are answered by the WebSocket layer.
                Message::Text(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        let _ = to_amqp.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_amqp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    // Either direction ending ends the connection: the AMQP side sees end of stream
    // or a failed write and stops.
    tokio::select! {
        () = inbound => {}
        () = outbound => {}
    }
    let _ = connection.await;
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
