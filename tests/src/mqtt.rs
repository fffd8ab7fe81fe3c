//! A minimal MQTT 3.1.1 test client over raw TCP or TLS, written on rumqttc's packet
//! codec, for tests that need exact control (refusals, malformed bytes, session
//! flags); plus SAS and JWT helpers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, Login, Packet, PubAck, Publish, SubAck, Subscribe, SubscribeFilter,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long a test waits for a packet.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A SAS token for `device` signed with `key_b64`, valid for `ttl_secs` (may be negative).
pub fn sas(hostname: &str, device: &str, key_b64: &str, ttl_secs: i64) -> Result<String> {
    let key = STANDARD.decode(key_b64)?;
    let expiry = (unix_now() as i64 + ttl_secs).max(1) as u64;
    Ok(hub::auth::sas::sign(hostname, device, &key, expiry))
}

/// The username Azure's SDKs send.
pub fn azure_username(hostname: &str, device: &str) -> String {
    format!("{hostname}/{device}/?api-version=2021-04-12&DeviceClientType=hub-tests")
}

/// A test MQTT client.
#[derive(Debug)]
pub struct RawClient<S> {
    stream: S,
    buf: BytesMut,
    next_pkid: u16,
}

/// Connects over plain TCP.
pub async fn tcp(addr: SocketAddr) -> Result<RawClient<TcpStream>> {
    Ok(RawClient::new(TcpStream::connect(addr).await?))
}

/// TLS client configuration trusting `ca_pem`, optionally presenting a certificate.
pub fn tls_config(ca_pem: &str, client: Option<(&str, &str)>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Connects over TLS to `addr` as `localhost`.
pub async fn tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<RawClient<TlsStream<TcpStream>>> {
    let stream = TcpStream::connect(addr).await?;
    let stream = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, stream)
        .await
        .context("TLS handshake")?;
    Ok(RawClient::new(stream))
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// A client over an already connected stream (e.g. a TLS stream set up by hand).
    pub fn from_stream(stream: S) -> Self {
        Self::new(stream)
    }

    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            next_pkid: 1,
        }
    }

    /// Writes a packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX)?;
        self.send_raw(&out).await
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Half-closes the write side.
    pub async fn shutdown_write(&mut self) -> Result<()> {
        self.stream.shutdown().await?;
        Ok(())
    }

    /// The next packet; `None` when the hub closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Packet>> {
        tokio::time::timeout(RECV_TIMEOUT, self.recv_inner())
            .await
            .context("no packet from the hub in time")?
    }

    async fn recv_inner(&mut self) -> Result<Option<Packet>> {
        loop {
            match Packet::read(&mut self.buf, 1 << 24) {
                Ok(packet) => return Ok(Some(packet)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => bail!("undecodable packet from the hub: {err}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                // A reset counts as closed.
                Err(_) => return Ok(None),
            }
        }
    }

    /// Sends CONNECT and returns the CONNACK.
    pub async fn connect(
        &mut self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
        clean_session: bool,
    ) -> Result<ConnAck> {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = 60;
        connect.clean_session = clean_session;
        if username.is_some() || password.is_some() {
            connect.login = Some(Login::new(
                username.unwrap_or_default(),
                password.unwrap_or_default(),
            ));
        }
        self.send(&Packet::Connect(connect)).await?;
        match self.recv().await? {
            Some(Packet::ConnAck(ack)) => Ok(ack),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to `filters` at QoS 1 and returns the SUBACK.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Result<SubAck> {
        let pkid = self.pkid();
        let mut subscribe = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new((*f).to_string(), QoS::AtLeastOnce)),
        );
        subscribe.pkid = pkid;
        self.send(&Packet::Subscribe(subscribe)).await?;
        match self.recv().await? {
            Some(Packet::SubAck(ack)) if ack.pkid == pkid => Ok(ack),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish_acked(&mut self, topic: &str, payload: &[u8]) -> Result<PubAck> {
        let pkid = self.publish_qos1(topic, payload).await?;
        match self.recv().await? {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => Ok(ack),
            other => bail!("expected PUBACK {pkid}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 without waiting; returns the packet id.
    pub async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> Result<u16> {
        let pkid = self.pkid();
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = pkid;
        self.send(&Packet::Publish(publish)).await?;
        Ok(pkid)
    }

    /// Waits for the hub to close the connection; fails if it stays open.
    pub async fn expect_closed(&mut self) -> Result<()> {
        loop {
            match self.recv().await? {
                None => return Ok(()),
                Some(Packet::PubAck(_) | Packet::PingResp) => {}
                Some(other) => bail!("expected the connection to close, got {other:?}"),
            }
        }
    }

    /// Pings and expects the answer: the connection is alive.
    pub async fn ping(&mut self) -> Result<()> {
        self.send(&Packet::PingReq).await?;
        match self.recv().await? {
            Some(Packet::PingResp) => Ok(()),
            other => bail!("expected PINGRESP, got {other:?}"),
        }
    }

    fn pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        pkid
    }
}
