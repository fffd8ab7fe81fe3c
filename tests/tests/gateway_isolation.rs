//! A device can never touch another device's topics: wildcard and foreign
//! subscriptions get SUBACK 0x80 (the connection stays open), and a publish to
//! another device's telemetry topic closes the connection with nothing ingested.
//! Azure's Embedded C SDK subscribes `devices/+/messages/devicebound/#`: granted, and it
//! brings the device its own C2D messages only, never another device's.

use std::time::Duration;

use anyhow::{Result, bail};
use hub_tests::Hub;
use hub_tests::inproc::InProcessHub;
use hub_tests::mqtt::{self, azure_username, sas};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, SubscribeReasonCode};
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
        "devices/+/messages/#",
        "devices/+/messages/devicebound/+",
        "devices/+/+/devicebound/#",
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

/// The next PUBLISH the hub sends `client`, acknowledged.
async fn next_c2d(
    client: &mut mqtt::RawClient<tokio::net::TcpStream>,
) -> Result<(String, Vec<u8>)> {
    let packet = tokio::time::timeout(Duration::from_secs(10), client.recv()).await??;
    let Some(Packet::Publish(publish)) = packet else {
        bail!("expected a C2D PUBLISH, got {packet:?}");
    };
    client
        .send(&Packet::PubAck(PubAck::new(publish.pkid)))
        .await?;
    Ok((publish.topic, publish.payload.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_c_wildcard_subscription_brings_only_the_devices_own_c2d() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let alice_key = hub.create_device(&token, "alice").await?;
    let bob_key = hub.create_device(&token, "bob").await?;
    let send = |id: &'static str, body: &'static str| {
        let request = hub
            .http()
            .post(format!("{}/devices/{id}/messages/deviceBound", hub.url()))
            .bearer_auth(&token)
            .json(&json!({ "body": body }));
        async move {
            let status = request.send().await?.status();
            anyhow::ensure!(status == 202, "C2D to {id}: {status}");
            Ok::<_, anyhow::Error>(())
        }
    };

    // Alice subscribes the way Azure's Embedded C SDK does.
    let mut alice = hub.connect_device("alice", &alice_key, true).await?;
    let ack = alice
        .subscribe(&["devices/+/messages/devicebound/#"])
        .await?;
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut bob = hub.connect_device("bob", &bob_key, true).await?;
    bob.subscribe(&["devices/bob/messages/devicebound/#"])
        .await?;

    // Bob's message reaches Bob; Alice's next delivery is her own message, on her own
    // topic, with nothing of Bob's before it.
    send("bob", "for bob").await?;
    let (topic, body) = next_c2d(&mut bob).await?;
    assert!(
        topic.starts_with("devices/bob/messages/devicebound/"),
        "{topic}"
    );
    assert_eq!(body, b"for bob");
    send("alice", "for alice").await?;
    let (topic, body) = next_c2d(&mut alice).await?;
    assert!(
        topic.starts_with("devices/alice/messages/devicebound/"),
        "{topic}"
    );
    assert_eq!(body, b"for alice");
    // The bag as the Embedded C SDK parses it: system properties only by `%24.`, and no
    // raw `/` after the topic's fixed part.
    let bag = topic
        .strip_prefix("devices/alice/messages/devicebound/")
        .unwrap_or_default();
    assert!(bag.starts_with("%24.mid="), "{bag}");
    assert!(
        bag.contains("&%24.to=%2Fdevices%2Falice%2Fmessages%2FdeviceBound&"),
        "{bag}"
    );
    assert!(bag.contains("&%24.exp="), "{bag}");
    assert!(!bag.contains('/') && !bag.contains('$'), "{bag}");
    // Nothing else is waiting for Alice: the next packet is the answer to her ping.
    alice.ping().await?;
    assert!(hub.stop().await?.success());
    Ok(())
}
