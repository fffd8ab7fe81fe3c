//! A device can never touch another device's topics: wildcard and foreign
//! subscriptions get SUBACK 0x80 (the connection stays open), and a publish to
//! another device's telemetry topic closes the connection with nothing ingested.

use anyhow::Result;
use hub_tests::inproc::InProcessHub;
use hub_tests::mqtt::{self, azure_username, sas};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, SubscribeReasonCode};
use serde_json::json;

async fn connected(hub: &InProcessHub, id: &str) -> Result<mqtt::RawClient<tokio::net::TcpStream>> {
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
    Ok(client)
}

#[tokio::test]
async fn subscriptions_outside_the_devices_own_topics_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let mut client = connected(&hub, "alice").await?;
    hub.create_device("bob", json!({})).await?;

    let refused = [
        "#",
        "+/#",
        "devices/#",
        "devices/+/messages/devicebound/#",
        "devices/bob/messages/devicebound/#",
        "devices/bob/messages/events/",
        "devices/alice/messages/events/",
        "$iothub/#",
        "$iothub/twin/#",
        "$iothub/+/res/#",
        "$SYS/#",
    ];
    for filter in refused {
        let ack = client.subscribe(&[filter]).await?;
        assert_eq!(
            ack.return_codes,
            vec![SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    // A mix in one SUBSCRIBE: each filter gets its own code.
    let ack = client
        .subscribe(&[
            "devices/alice/messages/devicebound/#",
            "devices/bob/messages/devicebound/#",
            "$iothub/twin/res/#",
        ])
        .await?;
    assert_eq!(
        ack.return_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    client.ping().await?;
    hub.stop().await
}

#[tokio::test]
async fn publishing_as_another_device_closes_the_connection_and_ingests_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    hub.create_device("bob", json!({})).await?;
    for topic in [
        "devices/bob/messages/events/",
        "devices/bob/messages/events/%24.mid=spoof",
        "devices/alice/messages/devicebound/",
        "$iothub/twin/PATCH/properties/desired/?$rid=1",
        "some/other/topic",
    ] {
        let mut client = connected(&hub, &format!("alice-{}", topic.len())).await?;
        client.publish_qos1(topic, b"spoofed").await?;
        client.expect_closed().await?;
    }
    assert!(hub.recorder.telemetry().is_empty(), "nothing ingested");

    // The device's own topic works, and the stamp names the device that connected.
    let mut client = connected(&hub, "carol").await?;
    client
        .publish_acked("devices/carol/messages/events/", b"mine")
        .await?;
    let telemetry = hub.recorder.telemetry();
    assert_eq!(telemetry.len(), 1);
    assert_eq!(telemetry[0].device_id.as_str(), "carol");
    hub.stop().await
}
