//! The bytes before AMQP: reading the 8-byte protocol header a client opens with (to
//! choose the SASL or the plain acceptor, which `fe2o3-amqp` cannot do on one port)
//! and a stream that gives those bytes back before the rest.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a client's first 8 bytes ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `AMQP 0 1 0 0`: AMQP without SASL (Azure's IoT service SDK); CBS authenticates.
    Amqp,
    /// `AMQP 3 1 0 0`: a SASL layer first (the Event Hubs SDKs: ANONYMOUS).
    Sasl,
    /// Anything else, including `AMQP 2 …` (TLS inside AMQP, which no Azure client
    /// sends: they start TLS at once); answered by the plain acceptor, which replies
    /// with its own header and closes as the specification asks.
    Other,
}

/// Classifies a protocol header.
pub fn classify(header: &[u8; 8]) -> Header {
    match header {
        [b'A', b'M', b'Q', b'P', 0, 1, 0, 0] => Header::Amqp,
        [b'A', b'M', b'Q', b'P', 3, 1, 0, 0] => Header::Sasl,
        _ => Header::Other,
    }
}

/// Reads the 8-byte protocol header from `stream`.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<[u8; 8]> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await?;
    Ok(header)
}

/// `inner` with `prefix` read back first: the acceptor sees the header it expects.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: [u8; 8],
    consumed: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, which has already given `prefix`.
    pub fn new(prefix: [u8; 8], inner: S) -> Self {
        Self {
            prefix,
            consumed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.consumed < self.prefix.len() {
            let rest = &self.prefix[self.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.consumed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_header_is_read_back_before_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"AMQP\x03\x01\x00\x00rest").await.unwrap();
        drop(client);
        let mut server = server;
        let header = read_header(&mut server).await.unwrap();
        assert_eq!(classify(&header), Header::Sasl);
        let mut all = Vec::new();
        Rewind::new(header, server)
            .read_to_end(&mut all)
            .await
            .unwrap();
        assert_eq!(all, b"AMQP\x03\x01\x00\x00rest");
    }

    #[test]
    fn headers_are_classified() {
        assert_eq!(classify(b"AMQP\x00\x01\x00\x00"), Header::Amqp);
        assert_eq!(classify(b"AMQP\x03\x01\x00\x00"), Header::Sasl);
        assert_eq!(classify(b"AMQP\x02\x01\x00\x00"), Header::Other);
        assert_eq!(classify(b"GET / HT"), Header::Other);
    }
}
