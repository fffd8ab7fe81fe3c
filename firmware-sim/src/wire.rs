//! MQTT 3.1.1 on rumqttc's packet codec for the scenarios (connections, round trips,
//! storms, flapping): one connection with its read buffer, CONNECT→CONNACK timed, and
//! packets written and read one at a time. The telemetry path keeps its own batched
//! loop in [`crate::lean`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::device::{DeviceError, Identity};

/// Largest packet accepted from the broker.
const MAX_INCOMING: usize = 1 << 20;

/// One open MQTT connection.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    id: String,
}

/// Opens a connection as `identity` (from `bind` when given) and waits up to
/// `timeout` for a successful CONNACK; returns it with the time from the TCP connect
/// to the CONNACK.
pub async fn open(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    identity: &Identity,
    keep_alive: u16,
    timeout: Duration,
) -> Result<(Conn, Duration), DeviceError> {
    let id = identity.client_id.clone();
    let started = Instant::now();
    let attempt = async {
        let stream = crate::net::connect(addr, bind)
            .await
            .map_err(|err| DeviceError::Io(id.clone(), err))?;
        stream
            .set_nodelay(true)
            .map_err(|err| DeviceError::Io(id.clone(), err))?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(256),
            out: BytesMut::with_capacity(256),
            id: id.clone(),
        };
        let mut connect = Connect::new(id.clone());
        connect.keep_alive = keep_alive;
        connect.clean_session = true;
        if let Some((user, pass)) = &identity.login {
            connect.login = Some(Login::new(user.clone(), pass.clone()));
        }
        conn.send(Packet::Connect(connect)).await?;
        match conn.read().await? {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(conn),
            Some(Packet::ConnAck(ack)) => Err(DeviceError::Refused(id.clone(), ack.code)),
            Some(other) => Err(DeviceError::Protocol(
                id.clone(),
                format!("expected CONNACK, got {other:?}"),
            )),
            None => Err(DeviceError::Protocol(
                id.clone(),
                "closed before CONNACK".into(),
            )),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(conn)) => Ok((conn, started.elapsed())),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(DeviceError::Timeout(id)),
    }
}

impl Conn {
    /// The device (client id) this connection is.
    pub fn client_id(&self) -> &str {
        &self.id
    }

    /// Encodes `packet` into the write buffer without sending it.
    pub fn queue(&mut self, packet: Packet) -> Result<(), DeviceError> {
        packet
            .write(&mut self.out, usize::MAX)
            .map(|_| ())
            .map_err(|err| DeviceError::Protocol(self.id.clone(), err.to_string()))
    }

    /// Sends what [`Conn::queue`] gathered.
    pub async fn flush(&mut self) -> Result<(), DeviceError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        result.map_err(|err| DeviceError::Io(self.id.clone(), err))
    }

    /// Sends one packet.
    pub async fn send(&mut self, packet: Packet) -> Result<(), DeviceError> {
        self.queue(packet)?;
        self.flush().await
    }

    /// The next packet; `None` when the broker closed the connection. Cancel-safe:
    /// bytes read before a cancellation stay in the buffer.
    pub async fn read(&mut self) -> Result<Option<Packet>, DeviceError> {
        loop {
            match Packet::read(&mut self.buf, MAX_INCOMING) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => return Err(DeviceError::Protocol(self.id.clone(), err.to_string())),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(err) => return Err(DeviceError::Io(self.id.clone(), err)),
            }
        }
    }

    /// DISCONNECT and close; errors are moot at that point.
    pub async fn close(mut self) {
        let _ = self.send(Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }

    /// Whether the broker has not closed the connection (nothing to read, no EOF, no
    /// reset), checked without waiting.
    pub fn is_open(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.try_read(&mut byte) {
            Err(err) => err.kind() == std::io::ErrorKind::WouldBlock,
            // Unexpected data still means open.
            Ok(n) => n > 0,
        }
    }
}
