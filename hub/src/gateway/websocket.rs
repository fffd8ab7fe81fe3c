//! MQTT over WebSocket, as Azure IoT Hub serves it on 443: an upgrade at
//! `/$iothub/websocket` with subprotocol `mqtt` on the HTTPS listener runs the same
//! gateway session as a TLS connection, over the WebSocket's binary messages.
//!
//! [`WsStream`] turns the WebSocket into a byte stream: binary messages are read as
//! one concatenated stream (MQTT packets may span messages, and a message may hold
//! several), and each write goes out as one binary message. A WebSocket connection
//! counts against `mqtt.max_connections` and in the gateway metrics like a TLS one,
//! not against the HTTP listener's connection cap (it gives its HTTP slot back on
//! upgrade), so the two listeners' limits stay about what they serve.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::GatewayContext;
use super::connection::{self, Transport};
use crate::api::ApiError;
use crate::api::serve::{ConnectionSlot, PeerCertificates};

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
    drop(request.extensions_mut().remove::<ConnectionSlot>());
    let certificates = request
        .extensions()
        .get::<PeerCertificates>()
        .map(|peer| peer.0.as_ref().clone())
        .unwrap_or_default();
    let ctx = Arc::clone(&gateway.ctx);
    let Ok(permit) = Arc::clone(&gateway.slots).try_acquire_owned() else {
        ctx.metrics.refused_at_limit.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("websocket refused: mqtt.max_connections reached");
        return ApiError::Unavailable.into_response();
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

/// A WebSocket as a byte stream (see the module documentation).
pub struct WsStream<W = WebSocket> {
    ws: W,
    /// The unread rest of the last binary message.
    pending: Bytes,
}

impl<W> WsStream<W> {
    /// Wraps an open WebSocket.
    pub fn new(ws: W) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
        }
    }
}

impl<W, E> AsyncRead for WsStream<W>
where
    W: Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // End of stream: the peer closed.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket takes binary messages, not text",
                    )));
                }
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
            }
        }
    }
}

impl<W, E> AsyncWrite for WsStream<W>
where
    W: Sink<Message, Error = E> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sends the close frame.
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

impl Transport for WsStream {
    fn ready(&self) -> impl Future<Output = io::Result<()>> + Send {
        // The WebSocket buffers frames itself: read directly.
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use tokio::io::AsyncReadExt;

    #[derive(Debug, thiserror::Error)]
    #[error("test")]
    struct TestError;

    #[tokio::test]
    async fn binary_messages_read_as_one_byte_stream_until_close() {
        let messages: Vec<Result<Message, TestError>> = vec![
            Ok(Message::Binary(Bytes::from_static(&[0x10, 0x02]))),
            Ok(Message::Ping(Bytes::new())),
            Ok(Message::Binary(Bytes::from_static(&[0xAA, 0xBB, 0xC0]))),
            Ok(Message::Close(None)),
            Ok(Message::Binary(Bytes::from_static(&[0xFF]))),
        ];
        let mut stream = WsStream::new(stream::iter(messages));
        let mut first = [0u8; 3];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(first, [0x10, 0x02, 0xAA], "a read spans messages");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [0xBB, 0xC0], "close ends the stream");
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let messages: Vec<Result<Message, TestError>> = vec![Ok(Message::Text("CONNECT".into()))];
        let mut stream = WsStream::new(stream::iter(messages));
        let err = stream.read_u8().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn each_write_is_one_binary_message() {
        use tokio::io::AsyncWriteExt;
        let mut stream = WsStream::new(Vec::<Message>::new());
        stream.write_all(&[1, 2, 3]).await.unwrap();
        stream.write_all(&[4]).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(
            stream.ws,
            vec![
                Message::Binary(Bytes::from_static(&[1, 2, 3])),
                Message::Binary(Bytes::from_static(&[4]))
            ]
        );
    }
}
