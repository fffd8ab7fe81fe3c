//! Edges of the device endpoint found in the hardening review (issue 11, item 14):
//! the TLS handshake and the first CONNECT share one deadline, and a device
//! cannot forge lines in the hub's log.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hub_tests::{HubOptions, mqtt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_handshake_and_connect_share_one_deadline() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[mqtt]\nconnect_timeout_secs = 2\n")?;
    let hub = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.to_str().context("utf-8 path")?])
        .start()
        .await?;
    let ca = std::fs::read_to_string(hub.data_dir().join("certs/ca.pem"))?;
    let addr = hub.endpoint("mqtts").context("mqtts")?;

    // A slow client: 1.5 s before its handshake, then nothing.
    let accepted = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tls = TlsConnector::from(mqtt::tls_config(&ca, None)?)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost")?,
            stream,
        )
        .await
        .context("handshake")?;
    let mut client = mqtt::RawClient::from_stream(tls);
    let closed = client.recv().await?;
    let elapsed = accepted.elapsed();
    ensure!(
        closed.is_none(),
        "expected the hub to close, got {closed:?}"
    );
    // One 2 s budget from accept, not 2 s for the handshake and 2 s more for CONNECT.
    ensure!(
        elapsed < Duration::from_millis(2900),
        "closed {elapsed:?} after accept"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_forge_log_lines() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "chatty").await?;
    let mut device = hub.connect_device("chatty", &key, true).await?;
    // A method answer nobody waits for is logged with its request id, which the
    // device chose: here it holds a line break and a forged log line.
    let forged = "FORGED 2026-01-01T00:00:00Z  INFO hub: device admin connected";
    let topic = format!(
        "$iothub/methods/res/200/?$rid=7%0A{}",
        forged.replace(' ', "%20")
    );
    let publish = rumqttc::mqttbytes::v4::Publish::new(
        topic,
        rumqttc::mqttbytes::QoS::AtMostOnce,
        b"{}".to_vec(),
    );
    device
        .send(&rumqttc::mqttbytes::v4::Packet::Publish(publish))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub.stderr().contains("method response") {
        ensure!(
            Instant::now() < deadline,
            "nothing logged: {}",
            hub.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = hub.stderr();
    ensure!(
        !log.lines().any(|line| line.starts_with("FORGED")),
        "a device started a log line of its own:\n{log}"
    );
    ensure!(
        log.contains("7\\nFORGED"),
        "the id is logged escaped:\n{log}"
    );
    Ok(())
}
