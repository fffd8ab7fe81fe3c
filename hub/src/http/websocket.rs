//! A WebSocket read and written as a byte stream, for protocols that run over
//! WebSocket binary messages (MQTT's `mqtt` and AMQP's `AMQPWSB10` subprotocols):
//! binary messages are read as one concatenated stream (a packet may span messages,
//! and a message may hold several), and each write goes out as one binary message.
//! Also what an upgrade handler takes from its request ([`upgrade_parts`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::serve::{ConnectionSlot, PeerCertificates};

/// Prepares an upgrade request for a connection that outlives it: gives back the HTTP
/// listener's connection slot (the upgraded connection counts against its own
/// protocol's limit instead) and returns the client certificates of the TLS handshake.
pub fn upgrade_parts(request: &mut Request) -> Vec<CertificateDer<'static>> {
    drop(request.extensions_mut().remove::<ConnectionSlot>());
    request
        .extensions()
        .get::<PeerCertificates>()
        .map(|peer| peer.0.as_ref().clone())
        .unwrap_or_default()
}

/// A WebSocket as a byte stream (see the module documentation).
pub struct WsStream<W = WebSocket> {
    ws: W,
    /// The unread rest of the last binary message.
    pending: Bytes,
}

impl<W> std::fmt::Debug for WsStream<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
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
