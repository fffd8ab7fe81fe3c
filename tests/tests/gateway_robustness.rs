//! Bad input closes only the offending connection: garbage bytes, a truncated
//! packet, an oversized packet, a PUBLISH before CONNECT, QoS 2, an MQTT 5 CONNECT,
//! and a silent TCP connection. The hub keeps serving the others.

use std::time::{Duration, Instant};

use anyhow::Result;
use hub_tests::inproc::{InProcessHub, test_config};
use hub_tests::mqtt::{self, azure_username, sas};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use serde_json::json;

async fn healthy_device_still_works(hub: &InProcessHub, id: &str) -> Result<()> {
    let device = hub.create_device(id, json!({})).await?;
    let token = sas("localhost", id, &InProcessHub::primary_key(&device)?, 600)?;
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let ack = client
        .connect(
            id,
            Some(&azure_username("localhost", id)),
            Some(&token),
            true,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    client
        .publish_acked(&format!("devices/{id}/messages/events/"), b"ok")
        .await?;
    Ok(())
}

#[tokio::test]
async fn malformed_input_closes_that_connection_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = test_config(dir.path());
    config.mqtt.max_packet_size = 4096;
    config.mqtt.max_telemetry_bytes = 2048;
    config.mqtt.connect_timeout_secs = 1;
    let hub = InProcessHub::start_with(config).await?;

    // A connected device that must survive everything below.
    let device = hub.create_device("survivor", json!({})).await?;
    let token = sas(
        "localhost",
        "survivor",
        &InProcessHub::primary_key(&device)?,
        600,
    )?;
    let mut survivor = mqtt::tcp(hub.mqtt).await?;
    survivor
        .connect(
            "survivor",
            Some(&azure_username("localhost", "survivor")),
            Some(&token),
            true,
        )
        .await?;

    // Garbage bytes.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    client.expect_closed().await?;

    // A truncated packet, then end of stream.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .send_raw(&[0x10, 0x20, 0x00, 0x04, b'M', b'Q'])
        .await?;
    client.shutdown_write().await?;
    client.expect_closed().await?;

    // A malformed remaining length.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .send_raw(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await?;
    client.expect_closed().await?;

    // An oversized packet (announced length over mqtt.max_packet_size): closed before
    // the body is read.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .connect(
            "survivor",
            Some(&azure_username("localhost", "survivor")),
            Some(&token),
            true,
        )
        .await?;
    let big = Publish::new(
        "devices/survivor/messages/events/",
        QoS::AtMostOnce,
        vec![0u8; 8192],
    );
    client.send(&Packet::Publish(big)).await?;
    client.expect_closed().await?;
    // That connection replaced the survivor's: reconnect the survivor.
    let mut survivor2 = mqtt::tcp(hub.mqtt).await?;
    survivor2
        .connect(
            "survivor",
            Some(&azure_username("localhost", "survivor")),
            Some(&token),
            true,
        )
        .await?;
    drop(survivor);
    let mut survivor = survivor2;

    // Telemetry over the telemetry limit but under the packet limit.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let device = hub.create_device("big-sender", json!({})).await?;
    let big_token = sas(
        "localhost",
        "big-sender",
        &InProcessHub::primary_key(&device)?,
        600,
    )?;
    client
        .connect(
            "big-sender",
            Some(&azure_username("localhost", "big-sender")),
            Some(&big_token),
            true,
        )
        .await?;
    client
        .publish_qos1("devices/big-sender/messages/events/", &[1u8; 3000])
        .await?;
    client.expect_closed().await?;
    assert!(
        hub.recorder.telemetry().is_empty(),
        "nothing partial is stored"
    );

    // PUBLISH before CONNECT.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .publish_qos1("devices/survivor/messages/events/", b"early")
        .await?;
    client.expect_closed().await?;

    // QoS 2.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .connect(
            "big-sender",
            Some(&azure_username("localhost", "big-sender")),
            Some(&big_token),
            true,
        )
        .await?;
    let mut qos2 = Publish::new(
        "devices/big-sender/messages/events/",
        QoS::ExactlyOnce,
        b"x".to_vec(),
    );
    qos2.pkid = 7;
    client.send(&Packet::Publish(qos2)).await?;
    client.expect_closed().await?;

    // MQTT 5 CONNECT: CONNACK "unacceptable protocol version" (1), then close.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    client
        .send_raw(&[
            0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'c',
        ])
        .await?;
    match client.recv().await? {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, ConnectReturnCode::RefusedProtocolVersion)
        }
        other => anyhow::bail!("expected CONNACK 1, got {other:?}"),
    }
    client.expect_closed().await?;

    // A silent TCP connection is closed after the first-CONNECT deadline (1 s here).
    let started = Instant::now();
    let mut silent = mqtt::tcp(hub.mqtt).await?;
    silent.expect_closed().await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );

    assert!(
        hub.metrics
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    survivor.ping().await?;
    healthy_device_still_works(&hub, "newcomer").await?;
    hub.stop().await
}
