//! The HTTPS listener (`--https`): the service API over TLS with the hub's server
//! certificate, answering as the plain HTTP listener does, and MQTT over WebSocket at
//! `/$iothub/websocket` running the same gateway session as MQTT over TLS.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use hub_tests::mqtt::{RawClient, azure_username, sas, tls_config};
use hub_tests::{Hub, HubOptions};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// HTTPS on another loopback address than the other listeners (127.0.0.1), so a
/// handshake that checks the address proves the certificate names the HTTPS one.
async fn start_hub(dir: &std::path::Path) -> Result<Hub> {
    HubOptions::new(dir)
        .args(["--https", "127.0.0.3:0"])
        .start()
        .await
}

/// One request over a fresh TLS connection trusting `ca_pem` (hyper's HTTP/1 client:
/// the workspace's reqwest has no TLS backend).
async fn https_call(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    path: &str,
    token: &str,
) -> Result<(u16, Value)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(tls_config(ca_pem, None)?)
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .context("TLS handshake")?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).with_context(|| format!("body {body:?}"))?
    };
    Ok((status, body))
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("body {text:?}"))?
    };
    Ok((status, body))
}

#[tokio::test]
async fn the_service_api_over_https_answers_as_over_http() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path()).await?;
    let https = hub.endpoint("https").context("hub ready has https=")?;
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("endpoints.json"))?)?;
    assert_eq!(endpoints["https"], https.to_string());
    let token = hub.owner_token().await?;
    let ca = std::fs::read_to_string(dir.path().join("certs/ca.pem"))?;

    let (status, created) = call(
        hub.http(),
        reqwest::Method::PUT,
        format!("{}/devices/over-https", hub.url()),
        &token,
        Some(json!({})),
    )
    .await?;
    assert_eq!(status, 200, "{created}");
    for path in [
        "/devices/over-https",
        "/twins/over-https",
        "/devices/nobody",
        "/no/such/route",
    ] {
        let over_https = https_call(https, &ca, path, &token).await?;
        let over_http = call(
            hub.http(),
            reqwest::Method::GET,
            format!("{}{path}", hub.url()),
            &token,
            None,
        )
        .await?;
        assert_eq!(over_https, over_http, "GET {path}");
    }
    let (status, _) = https_call(https, &ca, "/devices/over-https", "not-a-token").await?;
    assert_eq!(status, 401, "the same auth over HTTPS");

    // A client that does not trust the hub's CA is refused in the handshake.
    let stranger = certs::Ca::generate("someone else")?;
    assert!(
        https_call(https, stranger.cert_pem(), "/healthz", &token)
            .await
            .is_err()
    );
    Ok(())
}

/// Pumps bytes between a WebSocket (binary messages) and one end of an in-memory
/// pipe whose other end the raw MQTT client uses.
fn pump<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, mut local) = tokio::io::duplex(64 * 1024);
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                read = local.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let _ = sink.close().await;
                        return;
                    }
                    Ok(n) => {
                        let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                        if sink.send(Message::Binary(data)).await.is_err() {
                            return;
                        }
                    }
                },
                message = stream.next() => match message {
                    Some(Ok(Message::Binary(data))) => {
                        if local.write_all(&data).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    client
}

#[tokio::test]
async fn mqtt_over_websocket_runs_the_gateway_session() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start_hub(dir.path()).await?;
    let https = hub.endpoint("https").context("https endpoint")?;
    let token = hub.owner_token().await?;
    let (status, device) = call(
        hub.http(),
        reqwest::Method::PUT,
        format!("{}/devices/ws-device", hub.url()),
        &token,
        Some(json!({})),
    )
    .await?;
    assert_eq!(status, 200);
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("key")?;

    let ca = std::fs::read_to_string(dir.path().join("certs/ca.pem"))?;
    let tcp = TcpStream::connect(https).await?;
    let tls = TlsConnector::from(tls_config(&ca, None)?)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut request =
        format!("wss://localhost:{}/$iothub/websocket", https.port()).into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse()?);
    let (ws, response) = tokio_tungstenite::client_async(request, tls).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"mqtt"[..])
    );
    let mut mqtt = RawClient::from_stream(pump(ws));
    let password = sas("localhost", "ws-device", key, 3600)?;
    let ack = mqtt
        .connect(
            "ws-device",
            Some(&azure_username("localhost", "ws-device")),
            Some(&password),
            true,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let puback = mqtt
        .publish_acked(
            "devices/ws-device/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8",
            b"{\"over\":\"ws\"}",
        )
        .await?;
    assert!(puback.pkid > 0);

    // Read back through the stream API: the same session as MQTT over TLS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'found: loop {
        for partition in 0..4 {
            let (_, page) = call(
                hub.http(),
                reqwest::Method::GET,
                format!(
                    "{}/streams/telemetry/partitions/{partition}/messages?from=earliest",
                    hub.url()
                ),
                &token,
                None,
            )
            .await?;
            if page["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["deviceId"] == "ws-device" && m["body"] == json!({"over": "ws"}))
            {
                break 'found;
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the telemetry sent over WebSocket is not in the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The registry sees the device connected, as over MQTT/TLS.
    let (_, twin) = call(
        hub.http(),
        reqwest::Method::GET,
        format!("{}/twins/ws-device", hub.url()),
        &token,
        None,
    )
    .await?;
    assert_eq!(twin["connectionState"], "Connected", "{twin}");
    mqtt.ping().await?;
    Ok(())
}
